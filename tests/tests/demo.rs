//! `sidemesh demo` as a newcomer runs it: a short run, its summary (canary
//! shares, success, identities), and nothing left behind.

use std::time::Duration;

use sidemesh_tests::netns;
use sidemesh_tests::process::run;

/// The demos use fixed addresses: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn demo_dirs() -> Vec<std::path::PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("sidemesh-demo-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn field<'a>(summary: &'a str, key: &str) -> Option<&'a str> {
    summary.lines().find_map(|l| l.strip_prefix(key))
}

fn percent(s: &str) -> f64 {
    s.trim().trim_end_matches('%').parse().unwrap_or(f64::NAN)
}

#[test]
fn the_demo_runs_reports_and_cleans_up() {
    if netns::skip_unless_capable("the_demo_runs_reports_and_cleans_up") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dirs_before = demo_dirs();
    let (status, out, err) = run("sidemesh", &["demo", "--duration", "10"], Duration::from_secs(120));
    assert!(status.success(), "demo failed: {err}\n{out}");
    let summary = out
        .split("\nsummary\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary:\n{out}\n{err}"));

    let requests: u64 = field(summary, "requests=")
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(requests > 800, "too little traffic: {summary}");
    let success = summary
        .lines()
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("success=")))
        .map(percent)
        .unwrap_or(0.0);
    assert!(success >= 99.0, "retries should hide v2's failures: {summary}");
    let v2 = field(summary, "share reviews-v2=").map(percent).unwrap_or(0.0);
    assert!(
        (12.0..=28.0).contains(&v2),
        "canary share of v2 is {v2}%, expected about 20%: {summary}"
    );
    assert_eq!(
        field(summary, "identity seen-by-backends="),
        Some("spiffe://cluster.local/ns/default/sa/frontend"),
        "{summary}"
    );
    assert!(
        summary.contains("→ shop/reviews: spiffe://cluster.local/ns/shop/sa/reviews"),
        "{summary}"
    );
    let tcp_ok: u64 = field(summary, "tcp ok=")
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(tcp_ok > 10, "{summary}");
    assert!(out.contains("cleanup: stopped"), "{out}");

    // Nothing left behind: namespaces, processes, temp files.
    let ns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains("smdemo-"),
        "namespaces left behind"
    );
    let procs = std::process::Command::new("pgrep")
        .args(["-f", "sidemesh __component"])
        .output()
        .expect("pgrep");
    assert!(
        procs.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
    let leftovers: Vec<_> = demo_dirs().into_iter().filter(|d| !dirs_before.contains(d)).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn without_namespaces_the_demo_runs_on_loopback_and_says_so() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (status, out, err) = run(
        "sidemesh",
        &["demo", "--no-netns", "--duration", "6"],
        Duration::from_secs(90),
    );
    assert!(status.success(), "loopback demo failed: {err}\n{out}");
    let first = out.lines().next().unwrap_or("");
    assert!(
        first.contains("no network namespaces") && first.contains("loopback"),
        "{first}"
    );
    let summary = out
        .split("\nsummary\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary:\n{out}\n{err}"));
    let success = summary
        .lines()
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("success=")))
        .map(percent)
        .unwrap_or(0.0);
    assert!(success >= 99.0, "{summary}");
    assert_eq!(
        field(summary, "identity seen-by-backends="),
        Some("spiffe://cluster.local/ns/default/sa/frontend"),
        "mTLS between proxies on loopback too: {summary}"
    );
    let procs = std::process::Command::new("pgrep")
        .args(["-f", "sidemesh __component"])
        .output()
        .expect("pgrep");
    assert!(
        procs.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}
