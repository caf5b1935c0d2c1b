//! Telemetry end to end, in network-namespace meshes with the real proxies:
//!
//! - OTLP: a receiver built on the official OTLP protos gets the proxies'
//!   metrics and spans; names, units and attributes are what docs/metrics.md
//!   says, a sampled `traceparent` yields a client and a server span of one
//!   trace, anything else yields none and passes the header on untouched,
//!   and a proxy stopped with SIGTERM flushes what it still held;
//! - dashboards: a real Prometheus (the Debian `prometheus` package) scrapes
//!   the proxies' admin ports while traffic flows through a canary split,
//!   retries, a dead backend, timeouts and TCP, and every panel query of
//!   every dashboard in `deploy/grafana/` must return data.
//!
//! Needs root, ip and iptables (and curl, wrk, prometheus); skips with one
//! line otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidemesh_tests::mesh::{Mesh, ProxyOptions, Workload};
use sidemesh_tests::netns::{self, Pod, service_ip};
use sidemesh_tests::objects::{httproute, pod, rule, service, slice, yaml};
use sidemesh_tests::process::{Proc, binary};

const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const T: Duration = Duration::from_secs(20);

fn wait_for<R>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<R>) -> R {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn curl(w: &Workload, args: &[&str]) -> String {
    let mut all = vec!["-sS", "--max-time", "10"];
    all.extend(args);
    let out = w.run("curl", &all, T);
    assert!(out.success(), "curl {args:?}: {}\n{}", out.stderr, w.proxy.log());
    out.stdout
}

/// The HTTP test application on 8080 (and a TCP echo on 9000) in `pod`.
fn start_app(pod: &Pod, name: &str, fail_pct: u32) -> Vec<Proc> {
    let app = binary("sidemesh-test-app");
    let pct = fail_pct.to_string();
    let procs = vec![
        pod.start(
            "app",
            &app,
            &["http", "0.0.0.0:8080", name],
            &[("SIDEMESH_TEST_FAIL_PCT", &pct)],
        ),
        pod.start("echo", &app, &["echo", "0.0.0.0:9000"], &[]),
    ];
    assert!(pod.wait_listening(8080, Duration::from_secs(10)), "app of {name}");
    assert!(pod.wait_listening(9000, Duration::from_secs(10)), "echo of {name}");
    procs
}

/// The `traceparent` the test application says it received (`-` for none).
fn echoed_traceparent(body: &str) -> &str {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("traceparent="))
        .unwrap_or("")
}

/// What the OTLP receiver wrote, one JSON value per line.
fn received(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn instance(v: &Value) -> &str {
    v["resource"]["service.instance.id"].as_str().unwrap_or("")
}

fn otlp_env(receiver: &str, instance: &str, interval_ms: u64) -> Vec<(String, String)> {
    let interval = interval_ms.to_string();
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{receiver}")),
        ("OTEL_METRIC_EXPORT_INTERVAL", interval.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", interval),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            format!("service.instance.id={instance},k8s.pod.name={instance}"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[test]
fn otlp_metrics_and_spans_reach_a_receiver_with_names_units_and_attributes() {
    if netns::skip_unless_tools(
        "otlp_metrics_and_spans_reach_a_receiver_with_names_units_and_attributes",
        &["curl"],
    ) {
        return;
    }
    let mesh = Mesh::start("tel-otlp");
    // Not in the mesh's directory: the proxies watch it (trust bundle, tokens),
    // and every line written there would wake them.
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().join("otlp.jsonl");
    let _receiver = mesh.cp.start(
        "otlp",
        binary("sidemesh-test-otlp"),
        &["0.0.0.0:4317", &out.display().to_string()],
        &[],
    );
    assert!(mesh.cp.wait_listening(4317, T), "the OTLP receiver did not listen");
    let receiver = format!("{}:4317", mesh.cp.ip());

    let client_pod = mesh.plain_pod("client");
    let server_pod = mesh.plain_pod("server");
    let (cip, sip, vip) = (
        client_pod.ip().to_string(),
        server_pod.ip().to_string(),
        service_ip(10).to_string(),
    );
    mesh.set_objects(&yaml(&[
        service("shop", "web", &vip, &[("http", 80)], json!({})),
        slice("shop", "web-1", "web", &[("http", 8080)], &[(&sip, "server", true)]),
        pod("shop", "server", &sip, "web", true),
        pod("default", "client", &cip, "frontend", true),
        httproute(
            "shop",
            "web-route",
            "web",
            Some(80),
            vec![rule(
                &[("web", 80, 1)],
                json!({ "retry": { "attempts": 2, "codes": [503] } }),
            )],
        ),
    ]));
    let _apps = start_app(&server_pod, "web", 0);
    // The server proxy exports every second; the client proxy only when it
    // stops (an hour's interval), which is what shows the flush on SIGTERM.
    let server = mesh.mesh(
        server_pod,
        "shop",
        "web",
        &ProxyOptions {
            env: otlp_env(&receiver, "server", 1000),
            ..ProxyOptions::default()
        },
    );
    let mut client = mesh.mesh(
        client_pod,
        "default",
        "frontend",
        &ProxyOptions {
            env: otlp_env(&receiver, "client", 3_600_000),
            ..ProxyOptions::default()
        },
    );
    let url = format!("http://{vip}/hello");
    wait_for("the route reaches the client proxy", T, || {
        let state = client.state();
        state["discovery"]["targets"]
            .as_array()?
            .iter()
            .any(|t| t["routes"].as_array().is_some_and(|r| !r.is_empty()))
            .then_some(())
            .or_else(|| {
                let _ = client.run("curl", &["-s", "-o", "/dev/null", &url], T);
                None
            })
    });

    // A sampled request: the proxies continue the trace, the app sees the server span as parent.
    let (tid, sid) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let sampled = format!("00-{tid}-{sid}-01");
    let body = curl(&client, &["-H", &format!("traceparent: {sampled}"), &url]);
    let echoed = echoed_traceparent(&body).to_owned();
    let parts: Vec<&str> = echoed.split('-').collect();
    assert_eq!(parts.len(), 4, "{body}");
    assert_eq!((parts[0], parts[1], parts[3]), ("00", tid, "01"), "{body}");
    assert_ne!(parts[2], sid, "the app's parent is the server proxy's span: {body}");
    let app_parent = parts[2].to_owned();

    // Not sampled, and no context at all: no spans, the header passes untouched.
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let body = curl(&client, &["-H", &format!("traceparent: {unsampled}"), &url]);
    assert_eq!(echoed_traceparent(&body), unsampled, "{body}");
    let body = curl(&client, &[&url]);
    assert_eq!(echoed_traceparent(&body), "-", "{body}");

    // The server proxy's export arrives on its own.
    let server_span = wait_for("the server span", T, || {
        received(&out)
            .into_iter()
            .find(|v| v["signal"] == "span" && v["kind"] == "server" && v["trace_id"] == tid)
    });
    wait_for("the server's request metrics", T, || {
        received(&out)
            .into_iter()
            .any(|v| v["name"] == "http.server.request.duration" && instance(&v) == "server")
            .then_some(())
    });
    assert!(
        !received(&out).iter().any(|v| instance(v) == "client"),
        "the client proxy exported before it was asked to stop"
    );

    // SIGTERM: the client proxy drains, then flushes metrics and spans.
    let status = client.proxy.terminate(Duration::from_secs(40));
    assert!(
        status.is_some_and(|s| s.success()),
        "client proxy exit: {status:?}\n{}",
        client.proxy.log()
    );
    let client_span = wait_for("the client span after SIGTERM", T, || {
        received(&out)
            .into_iter()
            .find(|v| v["signal"] == "span" && v["kind"] == "client" && v["trace_id"] == tid)
    });
    wait_for("the client's metrics after SIGTERM", T, || {
        received(&out)
            .into_iter()
            .any(|v| v["name"] == "http.client.request.duration" && instance(&v) == "client")
            .then_some(())
    });

    // One trace: app → client span → server span → app.
    assert_eq!(client_span["parent_span_id"], sid, "{client_span}");
    assert_eq!(server_span["parent_span_id"], client_span["span_id"], "{server_span}");
    assert_eq!(server_span["span_id"], app_parent.as_str(), "{server_span}");
    assert_eq!(client_span["resource"]["service.name"], "sidemesh-proxy");
    let all = received(&out);
    let spans: Vec<&Value> = all.iter().filter(|v| v["signal"] == "span").collect();
    assert!(
        spans.iter().all(|s| s["trace_id"] == tid),
        "only the sampled request makes spans: {spans:?}"
    );
    assert_eq!(spans.len(), 2, "{spans:?}");
    let route_attrs = json!({
        "destination_service": "shop/web", "route": "shop/web-route", "backend": "shop/web:80",
        "source_workload": FRONTEND, "destination_workload": WEB, "tls": "mtls",
        "http.request.method": "GET", "http.response.status_code": 200,
    });
    for (span, direction) in [(&client_span, "outbound"), (&server_span, "inbound")] {
        let attrs = &span["attributes"];
        assert_eq!(attrs["direction"], direction, "{span}");
        for (k, v) in route_attrs.as_object().into_iter().flatten() {
            assert_eq!(&attrs[k], v, "{k} of {span}");
        }
        assert_eq!(span["name"], "GET shop/web", "{span}");
    }

    // Metric names, units, types and attributes.
    let metric = |name: &str, inst: &str| -> Vec<&Value> {
        all.iter()
            .filter(|v| v["signal"] == "metric" && v["name"] == name && instance(v) == inst)
            .collect()
    };
    let expect = |name: &str, inst: &str, unit: &str, kind: &str| -> Vec<&Value> {
        let points = metric(name, inst);
        assert!(!points.is_empty(), "{name} from {inst} missing");
        for p in &points {
            assert_eq!(p["unit"], unit, "unit of {name}: {p}");
            assert_eq!(p["type"], kind, "type of {name}: {p}");
        }
        points
    };
    let request_keys = [
        "direction",
        "source_workload",
        "destination_workload",
        "destination_service",
        "route",
        "backend",
        "tls",
        "http.request.method",
        "http.response.status_code",
    ];
    for (name, inst, direction) in [
        ("http.client.request.duration", "client", "outbound"),
        ("http.server.request.duration", "server", "inbound"),
        ("sidemesh.http.attempts", "client", "outbound"),
    ] {
        let kind = if name.starts_with("http.") { "histogram" } else { "sum" };
        let unit = if name.starts_with("http.") { "s" } else { "{attempt}" };
        let points = expect(name, inst, unit, kind);
        // The latest export (cumulative) holds every request so far.
        let p = points
            .iter()
            .rev()
            .find(|p| p["attributes"]["direction"] == direction && p["attributes"]["route"] == "shop/web-route")
            .unwrap_or_else(|| panic!("{name}: no {direction} point on the route: {points:?}"));
        let keys: Vec<&str> = p["attributes"]
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let mut want = request_keys.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want, "attribute keys of {name}: {p}");
        for (k, v) in route_attrs.as_object().into_iter().flatten() {
            assert_eq!(&p["attributes"][k], v, "{k} of {name}: {p}");
        }
        if kind == "histogram" {
            assert!(p["count"].as_u64().unwrap_or(0) >= 3, "{p}");
        }
    }
    let bytes = expect("sidemesh.tcp.bytes", "server", "By", "sum");
    assert!(
        bytes.iter().any(|p| p["attributes"]["direction"] == "inbound"
            && p["attributes"]["peer_direction"] == "read"
            && p["value"].as_i64().unwrap_or(0) > 0),
        "{bytes:?}"
    );
    for (name, unit, kind) in [
        ("sidemesh.tcp.connections.opened", "{connection}", "sum"),
        ("sidemesh.tcp.connections.active", "{connection}", "sum"),
        ("sidemesh.tls.handshakes", "{handshake}", "sum"),
        ("sidemesh.detect.results", "{connection}", "sum"),
        ("process.cpu.time", "s", "sum"),
        ("process.memory.usage", "By", "gauge"),
        ("sidemesh.proxy.certificate.expiry_timestamp", "s", "gauge"),
    ] {
        expect(name, "server", unit, kind);
    }
    assert!(
        metric("sidemesh.tls.handshakes", "client")
            .iter()
            .any(|p| p["attributes"]["direction"] == "outbound" && p["attributes"]["result"] == "success"),
        "client handshakes"
    );
    assert!(
        metric("sidemesh.discovery.stream.state", "client")
            .iter()
            .any(|p| p["value"] == 1),
        "discovery state"
    );
    assert!(
        metric("process.cpu.time", "server")
            .iter()
            .any(|p| p["attributes"]["cpu.mode"] == "user"),
        "cpu.mode"
    );
    // The same instruments on the admin port, with the Prometheus names.
    let page = server.metrics();
    for name in [
        "http_server_request_duration_seconds_bucket{",
        "sidemesh_tcp_bytes_total{",
        "process_cpu_time_seconds_total{",
        "process_memory_usage_bytes ",
    ] {
        assert!(page.contains(name), "{name} missing from /metrics:\n{}", page);
    }
    drop(server);
}

// ---------------------------------------------------------------------------
// Dashboards against a real Prometheus.

/// Backends of the dashboard scenario: (Service, fail %).
const BACKENDS: &[(&str, u32)] = &[("reviews-v1", 0), ("reviews-v2", 0), ("flaky", 10), ("dead", 100)];

struct Scenario {
    mesh: Mesh,
    client: Workload,
    backends: Vec<(Workload, Vec<Proc>)>,
}

/// The objects of the scenario, the canary split at `v1`/`v2`.
fn scenario_objects(client_ip: &str, backend_ips: &[String], v1: i64, v2: i64) -> String {
    let mut objects = vec![pod("default", "client", client_ip, "frontend", true)];
    for (i, ((name, _), ip)) in BACKENDS.iter().zip(backend_ips).enumerate() {
        let vip = service_ip(21 + i as u8).to_string();
        objects.push(service("shop", name, &vip, &[("http", 80), ("tcp", 9000)], json!({})));
        objects.push(slice(
            "shop",
            &format!("{name}-s"),
            name,
            &[("http", 8080), ("tcp", 9000)],
            &[(ip, name, true)],
        ));
        objects.push(pod("shop", name, ip, "reviews", true));
    }
    objects.push(service(
        "shop",
        "reviews",
        &service_ip(20).to_string(),
        &[("http", 80)],
        json!({}),
    ));
    let retry = json!({ "retry": { "attempts": 3, "codes": [503], "backoff": "5ms" } });
    objects.extend([
        httproute(
            "shop",
            "reviews-canary",
            "reviews",
            Some(80),
            vec![rule(&[("reviews-v1", 80, v1), ("reviews-v2", 80, v2)], json!({}))],
        ),
        httproute(
            "shop",
            "flaky-retry",
            "flaky",
            Some(80),
            vec![rule(&[("flaky", 80, 1)], retry.clone())],
        ),
        httproute(
            "shop",
            "dead-retry",
            "dead",
            Some(80),
            vec![rule(&[("dead", 80, 1)], retry)],
        ),
        httproute(
            "shop",
            "v1-slow",
            "reviews-v1",
            Some(80),
            vec![
                rule(
                    &[("reviews-v1", 80, 1)],
                    json!({ "matches": [{ "path": { "type": "PathPrefix", "value": "/slow" } }],
                            "timeouts": { "request": "100ms" } }),
                ),
                rule(&[("reviews-v1", 80, 1)], json!({})),
            ],
        ),
    ]);
    yaml(&objects)
}

/// `reviews` (VIP .20) split 90/10 between reviews-v1 (.21) and reviews-v2
/// (.22); `flaky` (.23) retried on 503; `dead` (.24) always 503, retried
/// (budget exhausted, endpoint ejected); a `slow` route on reviews-v1 with a
/// 100 ms request timeout; TCP to the echo port of reviews-v1.
fn scenario(prefix: &str) -> Scenario {
    let mesh = Mesh::start(prefix);
    let client_pod = mesh.plain_pod("client");
    let mut pods = Vec::new();
    for (name, fail) in BACKENDS {
        let p = mesh.plain_pod(name);
        let apps = start_app(&p, name, *fail);
        pods.push((p, apps));
    }
    let ips: Vec<String> = pods.iter().map(|(p, _)| p.ip().to_string()).collect();
    mesh.set_objects(&scenario_objects(&client_pod.ip().to_string(), &ips, 90, 10));
    let backends: Vec<(Workload, Vec<Proc>)> = pods
        .into_iter()
        .map(|(p, apps)| (mesh.mesh(p, "shop", "reviews", &ProxyOptions::default()), apps))
        .collect();
    let client = mesh.mesh(client_pod, "default", "frontend", &ProxyOptions::default());
    Scenario { mesh, client, backends }
}

impl Scenario {
    /// Re-weights the canary (a discovery update the proxies follow live).
    fn reweight(&self, v1: i64, v2: i64) {
        let ips: Vec<String> = self.backends.iter().map(|(w, _)| w.ip().to_string()).collect();
        self.mesh
            .set_objects(&scenario_objects(&self.client.ip().to_string(), &ips, v1, v2));
    }
}

const WRK_SECONDS: u64 = 20;

/// Traffic for every panel: the canary, retries, the dead backend, timeouts, TCP.
fn drive(s: &Scenario) {
    let vip = |i: u8| service_ip(i).to_string();
    let urls = [
        format!("http://{}/", vip(20)),
        format!("http://{}/", vip(23)),
        format!("http://{}/", vip(24)),
    ];
    // Discovery first, so wrk measures routed traffic.
    for u in &urls {
        let _ = s.client.run("curl", &["-s", "-o", "/dev/null", u], T);
    }
    wait_for("routes reach the client proxy", T, || {
        let state = s.client.state();
        let n = state["discovery"]["targets"]
            .as_array()?
            .iter()
            .filter(|t| t["routes"].as_array().is_some_and(|r| !r.is_empty()))
            .count();
        (n >= 3).then_some(())
    });
    std::thread::scope(|scope| {
        for (u, c) in urls.iter().zip(["4", "2", "2"]) {
            let client = &s.client;
            let d = format!("{WRK_SECONDS}s");
            scope.spawn(move || {
                let out = client.run(
                    "wrk",
                    &["-t1", "-c", c, "-d", &d, u],
                    Duration::from_secs(WRK_SECONDS + 30),
                );
                assert!(out.success(), "wrk {u}: {}", out.stderr);
            });
        }
        // Halfway, the canary moves on: the split panels show it, and the
        // destination service measures its update lag.
        scope.spawn(move || {
            std::thread::sleep(Duration::from_secs(WRK_SECONDS / 2));
            s.reweight(70, 30);
        });
        let client = &s.client;
        scope.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(WRK_SECONDS);
            let slow = format!("http://{}/slow?sleep_ms=300", vip(21));
            let echo = format!("{}:9000", vip(21));
            while Instant::now() < deadline {
                let _ = client.run("curl", &["-s", "-o", "/dev/null", "--max-time", "5", &slow], T);
                // A TCP stream through the mesh (opaque: the echo app).
                let _ = client.run(
                    "python3",
                    &[
                        "-c",
                        &format!(
                            "import socket; s=socket.create_connection(('{}', 9000), timeout=5); s.sendall(b'x'*4096); s.shutdown(1); print(len(s.recv(65536)))",
                            echo.split(':').next().unwrap_or("")
                        ),
                    ],
                    T,
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        });
    });
}

/// A proxy whose token the identity service does not know: it keeps asking
/// for a certificate and is refused (the identity dashboard's refusals).
fn refused_workload(mesh: &Mesh) -> (Pod, Proc) {
    let pod = mesh.plain_pod("impostor");
    let token = mesh.dir().join("impostor.token");
    std::fs::write(&token, "not-a-known-token\n").expect("token");
    let _ = std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let bundle = mesh.pki.path("bundle.pem").display().to_string();
    let token = token.display().to_string();
    let identity = mesh.identity_addr();
    let proc = pod.start_as(
        1337,
        "proxy",
        binary("sidemesh-proxy"),
        &["run"],
        &[
            ("SIDEMESH_IDENTITY_ADDR", &identity),
            ("SIDEMESH_TOKEN_PATH", &token),
            ("SIDEMESH_TRUST_BUNDLE", &bundle),
            ("SIDEMESH_WORKLOAD_ID", "spiffe://cluster.local/ns/default/sa/impostor"),
        ],
    );
    (pod, proc)
}

/// A minimal Prometheus in the control-plane Pod scraping every proxy and
/// the control plane's admin ports each second.
fn start_prometheus(s: &Scenario) -> (Proc, PathBuf) {
    let dir = s.mesh.dir().join("prometheus");
    std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
    let mut proxies: Vec<String> = s.backends.iter().map(|(w, _)| format!("{}:15020", w.ip())).collect();
    proxies.push(format!("{}:15020", s.client.ip()));
    let config = json!({
        "global": { "scrape_interval": "1s", "evaluation_interval": "1s" },
        "scrape_configs": [
            { "job_name": "sidemesh-proxy", "static_configs": [{ "targets": proxies }] },
            { "job_name": "sidemesh-identity", "static_configs": [{ "targets": ["127.0.0.1:9990"] }] },
            { "job_name": "sidemesh-destination", "static_configs": [{ "targets": ["127.0.0.1:9996"] }] },
        ],
    });
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap_or_default()).expect("config");
    let proc = s.mesh.cp.start(
        "prometheus",
        "/usr/bin/prometheus",
        &[
            &format!("--config.file={}", config_path.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            "--web.listen-address=127.0.0.1:9090",
            "--log.level=warn",
        ],
        &[],
    );
    assert!(
        s.mesh.cp.wait_listening(9090, Duration::from_secs(30)),
        "prometheus did not listen:\n{}",
        proc.log()
    );
    (proc, dir)
}

/// `GET /api/v1/<path>` on the Prometheus in the control-plane Pod.
fn prom_api(cp: &Pod, path: &str, params: &[(&str, &str)]) -> Value {
    let mut args = vec![
        "-sS".to_owned(),
        "--max-time".to_owned(),
        "10".to_owned(),
        "-G".to_owned(),
        format!("http://127.0.0.1:9090/api/v1/{path}"),
    ];
    for (k, v) in params {
        args.push("--data-urlencode".to_owned());
        args.push(format!("{k}={v}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cp.run("curl", &args, T);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|_| json!({ "status": "error", "raw": out.stdout, "err": out.stderr }))
}

/// Every PromQL expression of a dashboard, with the panel title.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            if let Some(inner) = p.get("panels") {
                walk(inner, out);
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((p["title"].as_str().unwrap_or("?").to_owned(), expr.to_owned()));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The dashboard's variables with the values a test substitutes: the
/// variable's current value, `.*` for "All".
fn variables(dashboard: &Value) -> Vec<(String, String, Value)> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let name = v["name"].as_str()?.to_owned();
            let current = v["current"]["value"].clone();
            let value = match &current {
                Value::Array(a) if a.iter().any(|x| x == "$__all") => v["allValue"].as_str().unwrap_or(".*").to_owned(),
                Value::Array(a) => a.first().and_then(Value::as_str).unwrap_or("").to_owned(),
                Value::String(s) if s == "$__all" => v["allValue"].as_str().unwrap_or(".*").to_owned(),
                Value::String(s) => s.clone(),
                _ => String::new(),
            };
            Some((name, value, v.clone()))
        })
        .collect()
}

fn substitute(expr: &str, vars: &[(String, String, Value)]) -> String {
    let mut e = expr
        .replace("$__rate_interval", "30s")
        .replace("${__rate_interval}", "30s")
        .replace("$__interval", "5s")
        .replace("$__range", "5m");
    // Longest names first, so `$service` does not eat `$service_x`.
    let mut vars: Vec<&(String, String, Value)> = vars.iter().collect();
    vars.sort_by_key(|(n, _, _)| std::cmp::Reverse(n.len()));
    for (name, value, _) in vars {
        e = e
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    e
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                v,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn dashboards_are_well_formed() {
    let all = dashboards();
    assert!(all.len() >= 5, "five dashboards expected, found {}", all.len());
    let mut uids = std::collections::BTreeSet::new();
    for (file, d) in &all {
        assert!(
            uids.insert(d["uid"].as_str().unwrap_or("").to_owned()),
            "{file}: duplicate uid"
        );
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "{file}: title");
        let vars = variables(d);
        let ds = vars.iter().find(|(_, _, v)| v["type"] == "datasource");
        assert!(
            ds.is_some_and(|(_, _, v)| v["query"] == "prometheus"),
            "{file}: a Prometheus datasource variable"
        );
        let ds_name = ds.map(|(n, _, _)| format!("${{{n}}}")).unwrap_or_default();
        let mut n = 0;
        let mut walk = vec![d["panels"].clone()];
        while let Some(panels) = walk.pop() {
            for p in panels.as_array().into_iter().flatten() {
                if let Some(inner) = p.get("panels") {
                    walk.push(inner.clone());
                }
                let kind = p["type"].as_str().unwrap_or("");
                if kind == "row" {
                    continue;
                }
                n += 1;
                assert!(
                    ["timeseries", "stat", "table", "gauge", "bargauge", "piechart", "text"].contains(&kind),
                    "{file}: panel {:?} is {kind:?}; modern panels only",
                    p["title"]
                );
                if kind != "text" {
                    assert_eq!(
                        p["datasource"]["uid"],
                        ds_name.as_str(),
                        "{file}: panel {:?} datasource",
                        p["title"]
                    );
                    assert!(
                        p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                        "{file}: panel {:?} has no query",
                        p["title"]
                    );
                }
            }
        }
        assert!(n >= 3, "{file}: {n} panels");
    }
}

#[test]
fn every_dashboard_panel_query_returns_data_from_a_real_prometheus() {
    if netns::skip_unless_tools(
        "every_dashboard_panel_query_returns_data_from_a_real_prometheus",
        &["curl", "wrk", "python3", "/usr/bin/prometheus"],
    ) {
        return;
    }
    let s = scenario("tel-dash");
    let (_prometheus, _dir) = start_prometheus(&s);
    let _refused = refused_workload(&s.mesh);
    wait_for("prometheus sees every target up", Duration::from_secs(30), || {
        let r = prom_api(&s.mesh.cp, "query", &[("query", "count(up == 1)")]);
        let n = r["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        (n == BACKENDS.len() + 3).then_some(())
    });
    drive(&s);
    // Two more scrapes after the load, so every rate window holds its end.
    std::thread::sleep(Duration::from_secs(3));

    let mut failures: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut checked = 0;
    for (file, d) in dashboards() {
        let vars = variables(&d);
        // Each query variable must itself find values.
        for (name, _, v) in &vars {
            if v["type"] != "query" {
                continue;
            }
            let q = v["query"]["query"]
                .as_str()
                .or_else(|| v["query"].as_str())
                .unwrap_or("");
            let q = substitute(q, &vars);
            let ok = match q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
                Some(inner) => {
                    let (selector, label) = match inner.rsplit_once(',') {
                        Some((sel, label)) => (sel.trim().to_owned(), label.trim().to_owned()),
                        None => (String::new(), inner.trim().to_owned()),
                    };
                    let params: Vec<(&str, &str)> = if selector.is_empty() {
                        vec![]
                    } else {
                        vec![("match[]", selector.as_str())]
                    };
                    let r = prom_api(&s.mesh.cp, &format!("label/{label}/values"), &params);
                    r["data"].as_array().is_some_and(|a| !a.is_empty())
                }
                None => {
                    let r = prom_api(&s.mesh.cp, "query", &[("query", &q)]);
                    r["data"]["result"].as_array().is_some_and(|a| !a.is_empty())
                }
            };
            checked += 1;
            if !ok {
                failures
                    .entry(file.clone())
                    .or_default()
                    .push(format!("variable ${name}: {q}"));
            }
        }
        for (title, expr) in panel_queries(&d) {
            let q = substitute(&expr, &vars);
            let r = prom_api(&s.mesh.cp, "query", &[("query", &q)]);
            checked += 1;
            let ok = r["status"] == "success" && r["data"]["result"].as_array().is_some_and(|a| !a.is_empty());
            if !ok {
                failures.entry(file.clone()).or_default().push(format!(
                    "panel {title:?}: {q}\n    -> {}",
                    r.to_string().chars().take(300).collect::<String>()
                ));
            }
        }
    }
    assert!(checked > 40, "only {checked} queries found");
    assert!(
        failures.is_empty(),
        "queries without data ({} of {checked}):\n{}",
        failures.values().map(Vec::len).sum::<usize>(),
        failures
            .iter()
            .map(|(f, l)| format!("{f}:\n  {}", l.join("\n  ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Without an exporter nothing is sampled: the header reached the app untouched.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = curl(
        &s.client,
        &[
            "-H",
            &format!("traceparent: {tp}"),
            &format!("http://{}/", service_ip(21)),
        ],
    );
    assert_eq!(echoed_traceparent(&body), tp, "{body}");
}
