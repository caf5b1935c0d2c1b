//! Traffic policy end to end: HTTPRoutes (file source) applied by real
//! client-side proxies in network-namespace Pods — canary weights, retries
//! within the budget, timeouts, and load balancing around a dead endpoint —
//! measured with wrk from inside the client Pod.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidemesh_tests::mesh::{Mesh, ProxyOptions, Workload};
use sidemesh_tests::netns::{self, Pod, service_ip};
use sidemesh_tests::objects::{pod, service, slice, yaml};
use sidemesh_tests::process::{Proc, binary};

/// An HTTPRoute attached to Service `parent` with one rule.
fn route(name: &str, parent: &str, backends: &[(&str, u32)], extra: Value) -> Value {
    let mut rule = json!({
        "backendRefs": backends.iter().map(|(b, w)| json!({ "kind": "Service", "name": b, "port": 80, "weight": w })).collect::<Vec<_>>(),
    });
    if let (Some(rule), Some(extra)) = (rule.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            rule.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": { "name": name, "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": parent, "port": 80 }],
            "rules": [rule],
        },
    })
}

struct Backend {
    name: &'static str,
    w: Workload,
    app: Option<Proc>,
}

/// A meshed backend Pod running the test app, `fail_pct`% of its answers 503.
fn backend(mesh: &Mesh, name: &'static str, fail_pct: u32) -> Backend {
    let pod = mesh.plain_pod(name);
    let pct = fail_pct.to_string();
    let app = pod.start(
        "app",
        binary("sidemesh-test-app"),
        &["http", "0.0.0.0:8080", name],
        &[("SIDEMESH_TEST_FAIL_PCT", &pct)],
    );
    assert!(pod.wait_listening(8080, Duration::from_secs(10)));
    let w = mesh.mesh(pod, "shop", "reviews", &ProxyOptions::default());
    Backend {
        name,
        w,
        app: Some(app),
    }
}

/// Services: `reviews` (VIP .20, all backends), and one Service per backend
/// (VIPs .21…) for routes to split between.
fn objects(backends: &[&Backend], client: &Pod, routes: &[Value]) -> String {
    let mut objs = vec![pod("default", "client", &client.ip().to_string(), "frontend", true)];
    let all: Vec<(String, &str)> = backends.iter().map(|b| (b.w.ip().to_string(), b.name)).collect();
    objs.push(service(
        "shop",
        "reviews",
        &service_ip(20).to_string(),
        &[("http", 80)],
        json!({}),
    ));
    objs.push(slice(
        "shop",
        "reviews-all",
        "reviews",
        &[("http", 8080)],
        &all.iter().map(|(ip, n)| (ip.as_str(), *n, true)).collect::<Vec<_>>(),
    ));
    for (i, b) in backends.iter().enumerate() {
        let ip = b.w.ip().to_string();
        let vip = service_ip(21 + i as u8).to_string();
        objs.push(service("shop", b.name, &vip, &[("http", 80)], json!({})));
        objs.push(slice(
            "shop",
            &format!("{}-s", b.name),
            b.name,
            &[("http", 8080)],
            &[(&ip, b.name, true)],
        ));
        objs.push(pod("shop", b.name, &ip, "reviews", true));
    }
    objs.extend(routes.iter().cloned());
    yaml(&objs)
}

const COUNT_LUA: &str = r#"
counts = {}
failures = 0
response = function(status, headers, body)
  if status >= 200 and status < 300 then
    local name = string.match(body, "name=(%S+)")
    counts[name] = (counts[name] or 0) + 1
  else
    failures = failures + 1
  end
end
local threads = {}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency, requests)
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do io.write("count " .. k .. " " .. v .. "\n") end
    io.write("failures " .. t:get("failures") .. "\n")
  end
  io.write("total " .. summary.requests .. "\n")
  io.write("errors " .. (summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout) .. "\n")
end
"#;

/// Result of a wrk run: responses per backend name, non-2xx, socket errors, total.
#[derive(Debug, Default)]
struct Load {
    by_backend: HashMap<String, u64>,
    failures: u64,
    errors: u64,
    total: u64,
}

impl Load {
    fn ok(&self) -> u64 {
        self.by_backend.values().sum()
    }
    fn success_rate(&self) -> f64 {
        self.ok() as f64 / self.total.max(1) as f64
    }
}

fn wrk(client: &Workload, mesh: &Mesh, url: &str, conns: u32, secs: u64) -> Load {
    let script = mesh.dir().join("count.lua");
    std::fs::write(&script, COUNT_LUA).expect("lua");
    let (c, d) = (conns.to_string(), format!("{secs}s"));
    let s = script.display().to_string();
    let out = client.run(
        "wrk",
        &["-t1", "-c", &c, "-d", &d, "-s", &s, url],
        Duration::from_secs(secs + 30),
    );
    assert!(out.success(), "wrk: {}", out.stderr);
    let mut load = Load::default();
    for line in out.stdout.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["count", name, n] => {
                *load.by_backend.entry((*name).to_owned()).or_default() += n.parse::<u64>().unwrap_or(0)
            }
            ["failures", n] => load.failures += n.parse::<u64>().unwrap_or(0),
            ["errors", n] => load.errors += n.parse::<u64>().unwrap_or(0),
            ["total", n] => load.total = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    load
}

fn hits(b: &Backend) -> u64 {
    let out = b.w.pod.run(
        "curl",
        &["-sf", "http://127.0.0.1:8080/__count"],
        Duration::from_secs(10),
    );
    out.stdout.trim().parse().unwrap_or(0)
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The client's proxy shows the route for `reviews` with `weights`.
fn wait_weights(client: &Workload, weights: &[u32]) {
    wait_for("route weights reach the proxy", Duration::from_secs(10), || {
        let state = client.state();
        let targets = state["discovery"]["targets"].as_array()?.clone();
        let reviews = targets.iter().find(|t| t["service"] == "shop/reviews")?;
        let got: Vec<u32> = reviews["routes"][0]["backends"]
            .as_array()?
            .iter()
            .filter_map(|b| b["weight"].as_u64().map(|w| w as u32))
            .collect();
        (got == weights).then_some(())
    });
}

#[test]
fn canary_weights_are_accurate_and_change_live() {
    if netns::skip_unless_tools("canary_weights_are_accurate_and_change_live", &["wrk"]) {
        return;
    }
    let mesh = Mesh::start("pol-canary");
    let client_pod = mesh.plain_pod("client");
    let (v1, v2) = (backend(&mesh, "reviews-v1", 0), backend(&mesh, "reviews-v2", 0));
    mesh.set_objects(&objects(
        &[&v1, &v2],
        &client_pod,
        &[route(
            "canary",
            "reviews",
            &[("reviews-v1", 90), ("reviews-v2", 10)],
            json!({}),
        )],
    ));
    let client = mesh.mesh(client_pod, "default", "frontend", &ProxyOptions::default());
    let url = format!("http://{}/", service_ip(20));
    // Prime discovery, then measure.
    assert!(client.run("curl", &["-sf", &url], Duration::from_secs(10)).success());
    wait_weights(&client, &[90, 10]);
    let load = wrk(&client, &mesh, &url, 8, 6);
    assert!(load.total >= 10_000, "need ≥ 10,000 requests, got {load:?}");
    assert_eq!((load.failures, load.errors), (0, 0), "{load:?}");
    let share = load.by_backend.get("reviews-v2").copied().unwrap_or(0) as f64 / load.ok() as f64;
    assert!(
        (share - 0.10).abs() <= 0.015,
        "v2 share {share:.4} not within 10% ± 1.5 points: {load:?}"
    );

    // Re-weight to 50/50 through the file while traffic flows.
    std::thread::scope(|s| {
        let running = s.spawn(|| wrk(&client, &mesh, &url, 8, 5));
        std::thread::sleep(Duration::from_millis(1500));
        mesh.set_objects(&objects(
            &[&v1, &v2],
            &client.pod,
            &[route(
                "canary",
                "reviews",
                &[("reviews-v1", 50), ("reviews-v2", 50)],
                json!({}),
            )],
        ));
        let during = running.join().expect("load");
        assert_eq!(
            (during.failures, during.errors),
            (0, 0),
            "requests failed during the re-weight: {during:?}"
        );
    });
    wait_weights(&client, &[50, 50]);
    let after = wrk(&client, &mesh, &url, 8, 3);
    let share = after.by_backend.get("reviews-v2").copied().unwrap_or(0) as f64 / after.ok() as f64;
    assert!(
        (share - 0.5).abs() <= 0.03,
        "after re-weight v2 share {share:.3}: {after:?}"
    );
}

#[test]
fn retries_hide_a_flaky_backend_and_the_budget_caps_a_dead_one() {
    if netns::skip_unless_tools("retries_hide_a_flaky_backend_and_the_budget_caps_a_dead_one", &["wrk"]) {
        return;
    }
    let mesh = Mesh::start("pol-retry");
    let client_pod = mesh.plain_pod("client");
    let flaky = backend(&mesh, "flaky", 10);
    let dead = backend(&mesh, "dead", 100);
    let retry = json!({ "retry": { "attempts": 3, "codes": [503], "backoff": "10ms" } });
    let routes = [
        route("with-retry", "flaky", &[("flaky", 1)], retry.clone()),
        route("dead-retry", "dead", &[("dead", 1)], retry),
    ];
    mesh.set_objects(&objects(&[&flaky, &dead], &client_pod, &routes));
    let client = mesh.mesh(client_pod, "default", "frontend", &ProxyOptions::default());

    // Without retries (the per-backend Service `reviews`, no route): the raw failure rate.
    let raw_url = format!("http://{}/", service_ip(20));
    let flaky_url = format!("http://{}/", service_ip(21));
    let dead_url = format!("http://{}/", service_ip(22));
    for url in [&raw_url, &flaky_url, &dead_url] {
        let _ = client.run("curl", &["-s", "-o", "/dev/null", url], Duration::from_secs(10));
    }
    wait_for("routes reach the proxy", Duration::from_secs(10), || {
        let state = client.state();
        let n = state["discovery"]["targets"]
            .as_array()?
            .iter()
            .filter(|t| t["routes"].as_array().is_some_and(|r| !r.is_empty()))
            .count();
        (n == 2).then_some(())
    });
    let with = wrk(&client, &mesh, &flaky_url, 4, 4);
    assert!(with.total > 1000, "{with:?}");
    assert!(
        with.success_rate() >= 0.999,
        "with retries: {:.4} {with:?}",
        with.success_rate()
    );

    // Bodies of unknown length (chunked uploads; gRPC over HTTP/2 is the same
    // to the proxy) are streamed to the first attempt and replayed on a retry.
    let script = format!(
        "head -c 3000 /dev/zero | tr '\\0' x > /tmp/sidemesh-upload-$$; \
         for i in $(seq 40); do curl -s --max-time 5 -w ' status=%{{http_code}}\\n' \
         -H 'Transfer-Encoding: chunked' --data-binary @/tmp/sidemesh-upload-$$ {flaky_url}; done; \
         rm -f /tmp/sidemesh-upload-$$"
    );
    let out = client.run("sh", &["-c", &script], Duration::from_secs(60));
    let statuses: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("status="))
        .collect();
    let bodies: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("name=")).collect();
    assert_eq!(statuses, vec!["200"; 40], "{}", out.stdout);
    assert_eq!(bodies.len(), 40, "{}", out.stdout);
    assert!(
        bodies.iter().all(|b| b.contains("body-bytes=3000")),
        "an upload arrived cut: {}",
        out.stdout
    );
    assert!(
        bodies.iter().any(|b| !b.contains("attempt=0")),
        "no upload needed a retry, so none was replayed: {}",
        out.stdout
    );

    let before = hits(&flaky);
    let raw = {
        // `reviews` spans flaky and dead: use a direct Pod-IP call to flaky instead (no route, no retry).
        let url = format!("http://{}:8080/", flaky.w.ip());
        wrk(&client, &mesh, &url, 4, 3)
    };
    let _ = before;
    let raw_rate = raw.failures as f64 / raw.total.max(1) as f64;
    assert!(
        (0.07..=0.13).contains(&raw_rate),
        "without retries the raw ~10% failure shows: {raw_rate:.3} {raw:?}"
    );

    // A dead backend: retries stay within 20% extra + 10/s.
    let before = hits(&dead);
    let started = Instant::now();
    let load = wrk(&client, &mesh, &dead_url, 4, 4);
    let secs = started.elapsed().as_secs_f64();
    let reached = hits(&dead) - before;
    let bound = load.total as f64 * 1.2 + 10.0 * secs + 100.0;
    assert!(load.success_rate() < 0.01, "{load:?}");
    assert!(
        (reached as f64) <= bound,
        "backend hits {reached} > requests {} × 1.2 + 10/s (+ the 10 s reserve) = {bound:.0}",
        load.total
    );
}

#[test]
fn timeouts_answer_504_on_time() {
    if netns::skip_unless_capable("timeouts_answer_504_on_time") {
        return;
    }
    let mesh = Mesh::start("pol-timeout");
    let client_pod = mesh.plain_pod("client");
    let slow = backend(&mesh, "slow", 0);
    let routes = [route(
        "t",
        "slow",
        &[("slow", 1)],
        json!({ "timeouts": { "request": "300ms" } }),
    )];
    mesh.set_objects(&objects(&[&slow], &client_pod, &routes));
    let client = mesh.mesh(client_pod, "default", "frontend", &ProxyOptions::default());
    let url = format!("http://{}/", service_ip(21));
    assert!(client.run("curl", &["-sf", &url], Duration::from_secs(10)).success());
    wait_for("route reaches the proxy", Duration::from_secs(10), || {
        let state = client.state();
        state["discovery"]["targets"]
            .as_array()?
            .iter()
            .any(|t| t["routes"].as_array().is_some_and(|r| !r.is_empty()))
            .then_some(())
    });
    let slow_url = format!("http://{}/x?sleep_ms=2000", service_ip(21));
    let out = client.run(
        "curl",
        &["-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", &slow_url],
        Duration::from_secs(10),
    );
    let mut parts = out.stdout.split_whitespace();
    let (code, secs) = (
        parts.next().unwrap_or(""),
        parts.next().and_then(|s| s.parse::<f64>().ok()).unwrap_or(99.0),
    );
    assert_eq!(code, "504", "{}", out.stdout);
    assert!((0.25..1.0).contains(&secs), "504 after {secs:.3}s for a 300ms timeout");
    // The attempt the timeout cut off counts as the 504 it became.
    let m = client.metrics();
    let attempts = |code: &str| {
        let code = format!("http_response_status_code=\"{code}\"");
        sidemesh_tests::process::metric_value(&m, "sidemesh_http_attempts_total", &[code.as_str()])
    };
    assert_eq!((attempts("200"), attempts("504")), (1.0, 1.0), "{m}");
    let fast = client.run(
        "curl",
        &["-s", "-o", "/dev/null", "-w", "%{http_code}", &url],
        Duration::from_secs(10),
    );
    assert_eq!(fast.stdout, "200");
}

#[test]
fn a_killed_endpoint_is_ejected_and_retries_hide_it() {
    if netns::skip_unless_tools("a_killed_endpoint_is_ejected_and_retries_hide_it", &["wrk"]) {
        return;
    }
    let mesh = Mesh::start("pol-eject");
    let client_pod = mesh.plain_pod("client");
    let mut backends = vec![
        backend(&mesh, "r1", 0),
        backend(&mesh, "r2", 0),
        backend(&mesh, "r3", 0),
    ];
    // One route on `reviews` (all three endpoints), retrying connection failures.
    let routes = [json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": { "name": "all", "namespace": "shop" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": "reviews", "port": 80 }],
            "rules": [{ "backendRefs": [{ "kind": "Service", "name": "reviews", "port": 80 }], "retry": { "attempts": 3, "codes": [502, 503], "backoff": "5ms" } }],
        },
    })];
    let refs: Vec<&Backend> = backends.iter().collect();
    mesh.set_objects(&objects(&refs, &client_pod, &routes));
    let client = mesh.mesh(client_pod, "default", "frontend", &ProxyOptions::default());
    let url = format!("http://{}/", service_ip(20));
    assert!(client.run("curl", &["-sf", &url], Duration::from_secs(10)).success());
    wait_for("route reaches the proxy", Duration::from_secs(10), || {
        let state = client.state();
        state["discovery"]["targets"]
            .as_array()?
            .iter()
            .any(|t| t["routes"].as_array().is_some_and(|r| !r.is_empty()))
            .then_some(())
    });
    std::thread::scope(|s| {
        let running = s.spawn(|| wrk(&client, &mesh, &url, 8, 6));
        std::thread::sleep(Duration::from_millis(1500));
        // Kill r2's application mid-load: its proxy now fails every request to it.
        drop(backends[1].app.take());
        let load = running.join().expect("load");
        let r2_after = load.by_backend.get("r2").copied().unwrap_or(0);
        assert!(
            load.success_rate() >= 0.999,
            "success {:.4} with a killed endpoint: {load:?}",
            load.success_rate()
        );
        assert!(r2_after > 0, "r2 served before it was killed: {load:?}");
    });
    let after = wrk(&client, &mesh, &url, 8, 2);
    assert!(
        !after.by_backend.contains_key("r2"),
        "the dead endpoint still gets traffic: {after:?}"
    );
    assert!(after.success_rate() >= 0.999, "{after:?}");
    let _ = &mut backends;
}
