//! Process resource gauges every component exports, read from `/proc/self`
//! when metrics are collected (nothing runs in between), named after the
//! OpenTelemetry process semantic conventions:
//!
//! - `process.cpu.time` (s, counter; `cpu.mode` = `user` / `system`);
//! - `process.memory.usage` (By, gauge): resident set size;
//! - `process.memory.virtual` (By, gauge);
//! - `process.thread.count` (`{thread}`, gauge);
//! - `process.open_file_descriptor.count` (`{file_descriptor}`, gauge).

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;

/// Clock ticks per second of `/proc/<pid>/stat` times. Linux fixes USER_HZ at
/// 100 for userspace on every architecture sidemesh runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// User and system CPU seconds from the text of `/proc/self/stat`.
pub(crate) fn cpu_seconds(stat: &str) -> Option<(f64, f64)> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), the 12th and 13th after the name.
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user / TICKS_PER_SECOND, system / TICKS_PER_SECOND))
}

/// A `VmRSS:`-style line of `/proc/self/status` in bytes.
pub(crate) fn status_bytes(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

fn status_count(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key))?.trim().parse().ok()
}

/// Registers the process instruments on `meter`.
pub fn register(meter: &Meter) {
    meter
        .f64_observable_counter("process.cpu.time")
        .with_description("CPU time used by the process, by mode")
        .with_unit("s")
        .with_callback(|obs| {
            if let Some((user, system)) = std::fs::read_to_string("/proc/self/stat")
                .ok()
                .as_deref()
                .and_then(cpu_seconds)
            {
                obs.observe(user, &[KeyValue::new("cpu.mode", "user")]);
                obs.observe(system, &[KeyValue::new("cpu.mode", "system")]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.memory.usage")
        .with_description("Resident set size of the process")
        .with_unit("By")
        .with_callback(|obs| {
            if let Some(rss) = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| status_bytes(&s, "VmRSS:"))
            {
                obs.observe(rss, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.memory.virtual")
        .with_description("Virtual memory size of the process")
        .with_unit("By")
        .with_callback(|obs| {
            if let Some(vm) = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| status_bytes(&s, "VmSize:"))
            {
                obs.observe(vm, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.thread.count")
        .with_description("Threads of the process")
        .with_unit("{thread}")
        .with_callback(|obs| {
            if let Some(n) = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| status_count(&s, "Threads:"))
            {
                obs.observe(n, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.open_file_descriptor.count")
        .with_description("File descriptors the process holds open (sockets included)")
        .with_unit("{file_descriptor}")
        .with_callback(|obs| {
            if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
                obs.observe(dir.count() as u64, &[]);
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 3 0";
        assert_eq!(cpu_seconds(stat), Some((2.5, 0.75)));
        assert_eq!(cpu_seconds("garbage"), None);
        let status = "Name:\tx\nVmSize:\t  2000 kB\nVmRSS:\t  1024 kB\nThreads:\t3\n";
        assert_eq!(status_bytes(status, "VmRSS:"), Some(1024 * 1024));
        assert_eq!(status_count(status, "Threads:"), Some(3));
        assert!(cpu_seconds(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default()).is_some());
    }
}
