//! Benchmark: what telemetry costs on the hot path. One client → server
//! proxy pair in network-namespace Pods (mTLS, a Service with an HTTPRoute
//! with retries), the proxies restarted between configurations and measured
//! in interleaved rounds of the same run:
//!
//! - **off**: `SIDEMESH_TELEMETRY=off` on both proxies (no data-plane
//!   instruments, no spans);
//! - **on**: metrics on, exported over OTLP every 10 s to a receiver and
//!   scraped on `/metrics` every 5 s, traces exported with the default
//!   sampler (requests carry no trace context, as most do);
//! - **on, every request traced**: the same proxies, every request carrying
//!   a sampled `traceparent` (the worst case: two spans per request).
//!
//! Figures: p50/p99 latency (wrk `--latency`) and the CPU of both proxies per
//! request at a paced rate (each wrk connection waits 2 ms between requests,
//! so every configuration sees about the same request rate), and requests/s
//! plus CPU per request at saturation. Pinned so that the scheduler does not
//! decide the result: client proxy and wrk on core 0, server proxy and the
//! application on core 1. Medians of `BENCH_RUNS` rounds.
//!
//! `cargo build --release --workspace --bins && cargo build --release -p sidemesh-tests --bins && cargo bench -p sidemesh-tests --bench telemetry`
//! Needs root, iptables, wrk and taskset; says so and exits 0 otherwise.

use std::time::{Duration, Instant};

use serde_json::json;
use sidemesh_tests::mesh::{Mesh, ProxyOptions, Workload};
use sidemesh_tests::netns::{self, Pod, service_ip};
use sidemesh_tests::objects::{httproute, pod, rule, service, slice, yaml};
use sidemesh_tests::process::{Proc, binary};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// A wrk duration (`812.00us`, `1.20ms`, `2.00s`) in ms.
fn wrk_ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let num: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => num / 1000.0,
        "ms" => num,
        "s" => num * 1000.0,
        "m" => num * 60_000.0,
        _ => f64::NAN,
    }
}

/// One wrk run's figures.
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU of both proxies per request, µs.
    cpu_us_per_req: f64,
    /// CPU of both proxies, cores.
    cores: f64,
}

struct Pair {
    client: Workload,
    server: Workload,
    url: String,
}

/// Paces each connection: `delay` ms between a response and the next request.
const PACE_LUA: &str = "function delay() return 2 end\n";
const TRACE_LUA: &str = "wrk.headers[\"traceparent\"] = \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\"\n";

fn wrk(pair: &Pair, conns: u32, secs: u64, script: Option<&str>) -> Run {
    let pids = [pair.client.proxy.pid(), pair.server.proxy.pid()];
    let (c, d) = (conns.to_string(), format!("{secs}s"));
    let mut args = vec!["-t1", "-c", &c, "-d", &d, "--latency"];
    if let Some(s) = script {
        args.extend(["-s", s]);
    }
    args.push(&pair.url);
    let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let t0 = Instant::now();
    let mut pinned = vec!["-c", "0", "wrk"];
    pinned.extend(args.iter().copied());
    let out = pair.client.run("taskset", &pinned, Duration::from_secs(secs + 30));
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
    if let Some(e) = out
        .stdout
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        eprintln!("wrk {} {args:?}: {e}", pair.url);
    }
    let pct = |p: &str| {
        out.stdout
            .lines()
            .find(|l| l.trim_start().starts_with(p))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(wrk_ms)
            .unwrap_or(f64::NAN)
    };
    let requests: f64 = out
        .stdout
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    Run {
        rps: requests / elapsed,
        p50_ms: pct("50%"),
        p99_ms: pct("99%"),
        cpu_us_per_req: cpu / requests.max(1.0) * 1e6,
        cores: cpu / elapsed,
    }
}

fn start_app(pod: &Pod) -> Proc {
    let app = pod.start(
        "app",
        binary("sidemesh-test-app"),
        &["http", "0.0.0.0:8080", "web"],
        &[],
    );
    assert!(pod.wait_listening(8080, Duration::from_secs(10)));
    app
}

/// Pins every thread of `pid` to `core`.
fn pin(pid: u32, core: u32) {
    let out = std::process::Command::new("taskset")
        .args(["-apc", &core.to_string(), &pid.to_string()])
        .output();
    if !out.is_ok_and(|o| o.status.success()) {
        eprintln!("could not pin {pid} to core {core}");
    }
}

fn main() {
    if netns::skip_unless_tools("telemetry benchmark", &["wrk", "curl", "taskset"]) {
        return;
    }
    let runs = env_or("BENCH_RUNS", 5) as usize;
    let secs = env_or("BENCH_SECONDS", 5);
    let paced_conns = env_or("BENCH_PACED_CONNECTIONS", 8) as u32;
    let mesh = Mesh::start("bench-tel");
    // Not in the mesh's directory: the proxies watch it (trust bundle, tokens),
    // and every line written there would wake them.
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().join("otlp.jsonl");
    let receiver_proc = mesh.cp.start(
        "otlp",
        binary("sidemesh-test-otlp"),
        &["0.0.0.0:4317", &out.display().to_string()],
        &[("SIDEMESH_TEST_OTLP_COUNT_ONLY", "1")],
    );
    assert!(mesh.cp.wait_listening(4317, Duration::from_secs(10)));
    let receiver_pid = receiver_proc.pid();

    let (client_pod, server_pod) = (mesh.plain_pod("client"), mesh.plain_pod("server"));
    let (cip, sip) = (client_pod.ip().to_string(), server_pod.ip().to_string());
    mesh.set_objects(&yaml(&[
        service("shop", "web", &service_ip(10).to_string(), &[("http", 80)], json!({})),
        slice("shop", "web-1", "web", &[("http", 8080)], &[(&sip, "web", true)]),
        pod("shop", "web", &sip, "web", true),
        pod("default", "client", &cip, "frontend", true),
        httproute(
            "shop",
            "web",
            "web",
            Some(80),
            vec![rule(
                &[("web", 80, 1)],
                json!({ "retry": { "attempts": 2, "codes": [503] } }),
            )],
        ),
    ]));
    let receiver = format!("http://{}:4317", mesh.cp.ip());
    let off = ProxyOptions {
        env: vec![("SIDEMESH_TELEMETRY".into(), "off".into())],
        ..ProxyOptions::default()
    };
    let on = ProxyOptions {
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver),
            ("OTEL_METRIC_EXPORT_INTERVAL".into(), "10000".into()),
        ],
        ..ProxyOptions::default()
    };
    let app = start_app(&server_pod);
    pin(app.pid(), 1);
    let server = mesh.mesh(server_pod, "shop", "web", &off);
    let client = mesh.mesh(client_pod, "default", "frontend", &off);
    let mut pair = Pair {
        client,
        server,
        url: format!("http://{}/", service_ip(10)),
    };
    let dir = mesh.dir().to_path_buf();
    let pace = dir.join("pace.lua");
    let trace = dir.join("trace.lua");
    let trace_paced = dir.join("trace-paced.lua");
    std::fs::write(&pace, PACE_LUA).expect("lua");
    std::fs::write(&trace, TRACE_LUA).expect("lua");
    std::fs::write(&trace_paced, format!("{TRACE_LUA}{PACE_LUA}")).expect("lua");
    let (pace, trace, trace_paced) = (
        pace.display().to_string(),
        trace.display().to_string(),
        trace_paced.display().to_string(),
    );
    // (Re)starts both proxies with `opts`, pinned, and warms the path up.
    let configure = |pair: &mut Pair, opts: &ProxyOptions| {
        mesh.restart_proxy(&mut pair.server, opts);
        mesh.restart_proxy(&mut pair.client, opts);
        pin(pair.client.proxy.pid(), 0);
        pin(pair.server.proxy.pid(), 1);
        let warm = pair.client.run("curl", &["-sf", &pair.url], Duration::from_secs(10));
        assert!(warm.success(), "{}", warm.stderr);
        let _ = wrk(pair, 16, 1, None);
    };

    // A scraper, as Prometheus would be, on both proxies' /metrics.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let admin: Vec<String> = [pair.client.ip(), pair.server.ip()]
        .iter()
        .map(|ip| format!("http://{ip}:15020/metrics"))
        .collect();
    let label = ["off", "on", "on, every request traced"];
    let (mut paced, mut saturated): (Vec<Vec<Run>>, Vec<Vec<Run>>) = (vec![Vec::new(); 3], vec![Vec::new(); 3]);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for url in &admin {
                    let _ = mesh
                        .cp
                        .run("curl", &["-sf", "-o", "/dev/null", url], Duration::from_secs(10));
                }
                std::thread::sleep(Duration::from_secs(5));
            }
        });
        let mut current_on = None;
        for round in 0..runs {
            // Alternate the order so drift in the machine's load favours no side.
            let order: [usize; 3] = if round % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
            for k in order {
                let want_on = k > 0;
                if current_on != Some(want_on) {
                    configure(&mut pair, if want_on { &on } else { &off });
                    current_on = Some(want_on);
                }
                let (paced_script, sat_script) = match k {
                    2 => (trace_paced.as_str(), Some(trace.as_str())),
                    _ => (pace.as_str(), None),
                };
                let p = wrk(&pair, paced_conns, secs, Some(paced_script));
                let s = wrk(&pair, 32, secs, sat_script);
                // Whatever the run left behind (an export backlog) shows up as idle CPU.
                let pids = [pair.client.proxy.pid(), pair.server.proxy.pid(), receiver_pid];
                let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
                std::thread::sleep(Duration::from_secs(2));
                let idle: Vec<String> = pids
                    .iter()
                    .zip(&before)
                    .map(|(p, b)| format!("{:.3}", (cpu_seconds(*p) - b) / 2.0))
                    .collect();
                eprintln!(
                    "round {round} {:<26} paced {p:?}\n{:<35} saturating {s:?}\n{:<35} idle cores after (client, server, receiver): {}",
                    label[k],
                    "",
                    "",
                    idle.join(" ")
                );
                paced[k].push(p);
                saturated[k].push(s);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let spans = std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["total"].as_u64())
        .max()
        .unwrap_or(0);

    let m = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    println!();
    println!(
        "telemetry cost: client + server proxy (mTLS, HTTPRoute with retries), medians of {runs} interleaved rounds of {secs} s"
    );
    println!("| load | telemetry | requests/s | p50 ms | p99 ms | proxy CPU µs/request | proxy CPU cores |");
    println!("|---|---|---|---|---|---|---|");
    for (name, set) in [
        (format!("paced, {paced_conns} connections"), &paced),
        ("saturating, 32 connections".to_owned(), &saturated),
    ] {
        for k in 0..3 {
            println!(
                "| {name} | {} | {:.0} | {:.3} | {:.3} | {:.1} | {:.3} |",
                label[k],
                m(&set[k], |r| r.rps),
                m(&set[k], |r| r.p50_ms),
                m(&set[k], |r| r.p99_ms),
                m(&set[k], |r| r.cpu_us_per_req),
                m(&set[k], |r| r.cores),
            );
        }
    }
    let delta = |set: &[Vec<Run>], k: usize, f: fn(&Run) -> f64| (m(&set[k], f) / m(&set[0], f) - 1.0) * 100.0;
    println!();
    println!(
        "on vs off, paced: p99 {:+.1}%, CPU/request {:+.1}% (goal ≤ 2%, ≤ 3%); saturating: requests/s {:+.1}%, CPU/request {:+.1}%",
        delta(&paced, 1, |r| r.p99_ms),
        delta(&paced, 1, |r| r.cpu_us_per_req),
        delta(&saturated, 1, |r| r.rps),
        delta(&saturated, 1, |r| r.cpu_us_per_req),
    );
    println!(
        "every request traced vs off, paced: p99 {:+.1}%, CPU/request {:+.1}%; saturating: requests/s {:+.1}%; {spans} spans received",
        delta(&paced, 2, |r| r.p99_ms),
        delta(&paced, 2, |r| r.cpu_us_per_req),
        delta(&saturated, 2, |r| r.rps),
    );
    drop(app);
}
