//! Benchmark: what traffic policy costs and how fast balancing reacts, in
//! network-namespace Pods with real proxies.
//!
//! 1. Added latency of routing + retry machinery: p99 through a Service with
//!    an HTTPRoute (a weighted split, retries, timeouts) next to the same
//!    backends through a route-less Service, in the same run (wrk --latency).
//! 2. Balancer reaction: three endpoints at 1000 requests/s; one becomes 10×
//!    slower; the time until it gets less than 10% of the traffic it had.
//!
//! `cargo build --release --workspace --bins && cargo build --release -p sidemesh-tests --bins && cargo bench -p sidemesh-tests --bench policy`

use std::time::Duration;

use serde_json::json;
use sidemesh_tests::mesh::{Mesh, ProxyOptions, Workload};
use sidemesh_tests::netns::{self, service_ip};
use sidemesh_tests::objects::{pod, service, slice, yaml};
use sidemesh_tests::process::{Proc, binary};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// wrk p99 in ms.
fn p99(client: &Workload, url: &str) -> f64 {
    let out = client.run(
        "wrk",
        &["-t1", "-c4", "-d4s", "--latency", url],
        Duration::from_secs(40),
    );
    let line = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("99%"))
        .unwrap_or("");
    let v = line.split_whitespace().nth(1).unwrap_or("0");
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let num: f64 = num.parse().unwrap_or(0.0);
    match unit {
        "us" => num / 1000.0,
        "ms" => num,
        "s" => num * 1000.0,
        _ => num,
    }
}

fn main() {
    if netns::skip_unless_tools("policy benchmark", &["wrk"]) {
        return;
    }
    let runs = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mesh = Mesh::start("bench-pol");
    let client_pod = mesh.plain_pod("client");
    let app = binary("sidemesh-test-app");
    let mut backends: Vec<(Workload, Proc, std::path::PathBuf)> = Vec::new();
    for name in ["e1", "e2", "e3"] {
        let pod = mesh.plain_pod(name);
        let delay = mesh.dir().join(format!("{name}.delay"));
        std::fs::write(&delay, "2").expect("delay file");
        let d = delay.display().to_string();
        let proc = pod.start(
            "app",
            &app,
            &["http", "0.0.0.0:8080", name],
            &[("SIDEMESH_TEST_DELAY_FILE", &d)],
        );
        assert!(pod.wait_listening(8080, Duration::from_secs(10)));
        let w = mesh.mesh(pod, "shop", "web", &ProxyOptions::default());
        backends.push((w, proc, delay));
    }
    let ips: Vec<String> = backends.iter().map(|(w, _, _)| w.ip().to_string()).collect();
    let eps: Vec<(&str, &str, bool)> = ips
        .iter()
        .zip(["e1", "e2", "e3"])
        .map(|(ip, n)| (ip.as_str(), n, true))
        .collect();
    let mut objs = vec![
        pod("default", "client", &client_pod.ip().to_string(), "frontend", true),
        service("shop", "plain", &service_ip(30).to_string(), &[("http", 80)], json!({})),
        slice("shop", "plain-s", "plain", &[("http", 8080)], &eps),
        service(
            "shop",
            "routed",
            &service_ip(31).to_string(),
            &[("http", 80)],
            json!({}),
        ),
        slice("shop", "routed-s", "routed", &[("http", 8080)], &eps),
        service(
            "shop",
            "canary",
            &service_ip(32).to_string(),
            &[("http", 80)],
            json!({}),
        ),
        slice("shop", "canary-s", "canary", &[("http", 8080)], &eps),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "name": "routed", "namespace": "shop" },
            "spec": {
                "parentRefs": [{ "group": "", "kind": "Service", "name": "routed", "port": 80 }],
                "rules": [
                    { "matches": [{ "path": { "type": "PathPrefix", "value": "/never" } }], "backendRefs": [{ "kind": "Service", "name": "plain", "port": 80 }] },
                    { "matches": [{ "path": { "type": "PathPrefix", "value": "/" }, "headers": [] }],
                      "backendRefs": [{ "kind": "Service", "name": "routed", "port": 80, "weight": 90 }, { "kind": "Service", "name": "canary", "port": 80, "weight": 10 }],
                      "timeouts": { "request": "10s", "backendRequest": "5s" },
                      "retry": { "attempts": 2, "codes": [503], "backoff": "10ms" } },
                ],
            },
        }),
    ];
    for (i, (w, _, _)) in backends.iter().enumerate() {
        objs.push(pod("shop", ["e1", "e2", "e3"][i], &w.ip().to_string(), "web", true));
    }
    mesh.set_objects(&yaml(&objs));
    let client = mesh.mesh(client_pod, "default", "frontend", &ProxyOptions::default());
    let (plain_url, routed_url) = (
        format!("http://{}/", service_ip(30)),
        format!("http://{}/", service_ip(31)),
    );
    for u in [&plain_url, &routed_url] {
        assert!(
            client.run("curl", &["-sf", u], Duration::from_secs(10)).success(),
            "{u}"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let (mut plain, mut routed) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        plain.push(p99(&client, &plain_url));
        routed.push(p99(&client, &routed_url));
    }
    let (plain, routed) = (median(plain), median(routed));

    // Balancer reaction at 1000 rps: e1 becomes 10× slower after 3 s.
    let slow = backends[0].2.clone();
    let url = plain_url.clone();
    let app_s = app.display().to_string();
    let lines = std::thread::scope(|s| {
        let load = s.spawn(|| client.run(&app_s, &["load", &url, "1000", "8"], Duration::from_secs(60)));
        std::thread::sleep(Duration::from_secs(3));
        std::fs::write(&slow, "20").expect("slow down e1");
        load.join().expect("load").stdout
    });
    // Share of e1 in 100 ms windows (by completion time, which trails the
    // slowdown by at most its latency).
    let samples: Vec<(u64, String)> = lines
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse().ok()?, it.nth(1)?.to_owned()))
        })
        .collect();
    let share = |from: u64, to: u64| {
        let w: Vec<&(u64, String)> = samples.iter().filter(|(t, _)| *t >= from && *t < to).collect();
        let e1 = w.iter().filter(|(_, n)| n == "e1").count();
        (e1 as f64 / w.len().max(1) as f64, w.len())
    };
    let (before, _) = share(1000, 3000);
    let switch_ms = samples
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| *t >= 3000)
        .min()
        .unwrap_or(3000);
    let mut reaction = None;
    let mut t = switch_ms;
    while t + 500 < 8000 {
        // Reacted when every later 500 ms window stays below 10% of the old share.
        let settled = (0..)
            .map(|k| t + k * 250)
            .take_while(|s| s + 500 <= 8000)
            .all(|s| share(s, s + 500).0 < before * 0.1);
        if settled {
            reaction = Some(t - switch_ms);
            break;
        }
        t += 50;
    }
    println!();
    println!("traffic policy: real proxies in network-namespace Pods, medians of {runs} runs, one run");
    println!("| figure | value | goal |");
    println!("|---|---|---|");
    println!("| p99, route-less Service (wrk -c4) | {plain:.3} ms | |");
    println!("| p99, Service with HTTPRoute: 2 rules, 90/10 split, retries, timeouts | {routed:.3} ms | |");
    println!(
        "| **added p99 of routing + retry machinery** | **{:+.1}%** | ≤ +5% |",
        100.0 * (routed - plain) / plain.max(1e-9)
    );
    println!(
        "| slow endpoint's share before the slowdown (1000 rps, 3 endpoints) | {:.1}% | |",
        100.0 * before
    );
    match reaction {
        Some(ms) => {
            println!("| **time for a 10× slower endpoint to lose ≥ 90% of its traffic** | **{ms} ms** | ≤ 2000 ms |")
        }
        None => println!(
            "| **time for a 10× slower endpoint to lose ≥ 90% of its traffic** | not within the run | ≤ 2000 ms |"
        ),
    }
}
