//! The data plane end to end: network-namespace Pods with the real `init`
//! iptables rules, real proxies, the real identity and destination services,
//! real applications, and real clients (curl, openssl, python sockets).
//! Needs root, ip and iptables; skips with one line otherwise.

use std::time::{Duration, Instant};

use serde_json::json;
use sidemesh_tests::mesh::{Mesh, ProxyOptions, Workload};
use sidemesh_tests::netns::{self, Pod, service_ip};
use sidemesh_tests::objects::{pod, service, slice, yaml};
use sidemesh_tests::process::{Proc, binary, metric_value};

const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";
const T: Duration = Duration::from_secs(20);

/// The test application in a Pod: HTTP on 8080, TCP echo on 9000, a
/// server-first banner on 3306 (a well-known opaque port) and on 7000 (not).
fn start_apps(pod: &Pod) -> Vec<Proc> {
    let app = binary("sidemesh-test-app");
    let apps = vec![
        pod.start("app-http", &app, &["http", "0.0.0.0:8080", "web"], &[]),
        pod.start("app-echo", &app, &["echo", "0.0.0.0:9000"], &[]),
        pod.start("app-mysql", &app, &["banner", "0.0.0.0:3306", "mysql-greeting"], &[]),
        pod.start("app-banner", &app, &["banner", "0.0.0.0:7000", "hello-first"], &[]),
    ];
    for port in [8080, 9000, 3306, 7000] {
        assert!(pod.wait_listening(port, Duration::from_secs(10)), "app port {port}");
    }
    apps
}

struct Shop {
    mesh: Mesh,
    client: Workload,
    server: Workload,
    _apps: Vec<Proc>,
}

/// `web` (ClusterIP 10.214.0.10) → the server Pod; the client is `frontend`.
fn shop(prefix: &str, server_opts: ProxyOptions) -> Shop {
    let mesh = Mesh::start(prefix);
    let client_pod = mesh.plain_pod("client");
    let server_pod = mesh.plain_pod("server");
    let vip = service_ip(10).to_string();
    let sip = server_pod.ip().to_string();
    let cip = client_pod.ip().to_string();
    mesh.set_objects(&yaml(&[
        service(
            "shop",
            "web",
            &vip,
            &[
                ("http", 80),
                ("tcp", 9000),
                ("mysql", 3306),
                ("banner", 7000),
                ("ws", 8765),
            ],
            json!({}),
        ),
        slice(
            "shop",
            "web-1",
            "web",
            &[
                ("http", 8080),
                ("tcp", 9000),
                ("mysql", 3306),
                ("banner", 7000),
                ("ws", 8765),
            ],
            &[(&sip, "server", true)],
        ),
        pod("shop", "server", &sip, "web", true),
        pod("default", "client", &cip, "frontend", true),
    ]));
    let apps = start_apps(&server_pod);
    let server = mesh.mesh(server_pod, "shop", "web", &server_opts);
    let client_opts = ProxyOptions {
        env: server_opts.env.clone(),
        ..ProxyOptions::default()
    };
    let client = mesh.mesh(client_pod, "default", "frontend", &client_opts);
    Shop {
        mesh,
        client,
        server,
        _apps: apps,
    }
}

fn curl(w: &Workload, args: &[&str]) -> String {
    let mut all = vec!["-sS", "--max-time", "10"];
    all.extend(args);
    let out = w.run("curl", &all, T);
    assert!(
        out.success(),
        "curl {args:?} failed: {}\nclient proxy:\n{}",
        out.stderr,
        w.proxy.log()
    );
    out.stdout
}

/// A TCP exchange from inside a Pod: connect, optionally read a banner,
/// send `payload`, half-close, read everything. Returns (text, seconds to first byte).
fn tcp(pod: &Pod, addr: &str, payload: &str, expect_banner: bool) -> (String, f64) {
    let (host, port) = addr.rsplit_once(':').expect("addr");
    let script = format!(
        r#"
import socket, sys, time
t = time.time()
s = socket.create_connection(("{host}", {port}), timeout=10)
first = None
data = b""
if {banner}:
    data = s.recv(4096)
    first = time.time() - t
s.sendall(b"{payload}")
s.shutdown(socket.SHUT_WR)
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    if first is None:
        first = time.time() - t
    data += chunk
sys.stdout.write(data.decode() + "\n" + str(first))
"#,
        banner = if expect_banner { "True" } else { "False" },
    );
    let out = pod.run("python3", &["-c", &script], T);
    assert!(out.success(), "tcp {addr}: {}", out.stderr);
    let (text, first) = out.stdout.rsplit_once('\n').expect("output");
    (text.to_owned(), first.trim().parse().unwrap_or(f64::MAX))
}

#[test]
fn http1_http2_and_tcp_through_service_vip_and_pod_ip_with_mtls_identities() {
    if netns::skip_unless_capable("http1_http2_and_tcp_through_service_vip_and_pod_ip_with_mtls_identities") {
        return;
    }
    let shop = shop("mesh-basic", ProxyOptions::default());
    let vip = service_ip(10);
    let sip = shop.server.ip();

    let h1 = curl(&shop.client, &[&format!("http://{vip}/hello")]);
    assert!(h1.contains("name=web version=HTTP/1.1 path=/hello"), "{h1}");
    assert!(
        h1.contains(&format!("client-id={FRONTEND}")),
        "the server saw the client's mTLS identity: {h1}"
    );

    let h2 = curl(&shop.client, &["--http2-prior-knowledge", &format!("http://{vip}/h2")]);
    assert!(h2.contains("version=HTTP/2.0 path=/h2"), "{h2}");
    assert!(h2.contains(&format!("client-id={FRONTEND}")), "{h2}");

    let direct = curl(&shop.client, &[&format!("http://{sip}:8080/pod-ip")]);
    assert!(
        direct.contains("path=/pod-ip") && direct.contains(&format!("client-id={FRONTEND}")),
        "{direct}"
    );

    // A forged identity header from the application is dropped.
    let forged = curl(
        &shop.client,
        &[
            "-H",
            "sidemesh-client-id: spiffe://cluster.local/ns/x/sa/admin",
            &format!("http://{vip}/"),
        ],
    );
    assert!(forged.contains(&format!("client-id={FRONTEND}")), "{forged}");

    let (echo, _) = tcp(&shop.client.pod, &format!("{vip}:9000"), "opaque-bytes", false);
    assert_eq!(echo, "opaque-bytes");

    // Many sequential requests on fresh connections all succeed.
    for i in 0..50 {
        let out = curl(&shop.client, &[&format!("http://{vip}/n{i}")]);
        assert!(out.contains(&format!("path=/n{i}")), "{out}");
    }

    let state = shop.client.state();
    assert_eq!(state["identity"], FRONTEND, "{state}");
    assert_eq!(state["discovery"]["connected"], true, "{state}");
    let root = sidemesh_identity_client::fingerprint(&pem_der(&shop.mesh.pki.root.cert));
    assert_eq!(state["certificate"]["root_fingerprint"], root.as_str(), "{state}");
    assert_eq!(state["trusted_roots"], json!([root]), "{state}");
    let targets = state["discovery"]["targets"].as_array().cloned().unwrap_or_default();
    assert!(
        targets
            .iter()
            .any(|t| t["kind"] == "service" && t["service"] == "shop/web"),
        "{state}"
    );
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("pem")
        .to_vec()
}

#[test]
fn no_plaintext_crosses_the_wire_between_meshed_pods() {
    if netns::skip_unless_tools("no_plaintext_crosses_the_wire_between_meshed_pods", &["tcpdump"]) {
        return;
    }
    let shop = shop("mesh-wire", ProxyOptions::default());
    let outsider = shop.mesh.plain_pod("outsider");
    let pcap = shop.mesh.dir().join("bridge.pcap");
    let pcap_s = pcap.display().to_string();
    let mut tcpdump = shop
        .mesh
        .net
        .switch_cmd("tcpdump")
        .args([
            "-i",
            "br0",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-s",
            "0",
            "-w",
            &pcap_s,
            "tcp",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tcpdump");
    // Capture only starts once tcpdump says it is listening.
    let stderr = tcpdump.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(15))
        .expect("tcpdump listening within 15 s");
    let vip = service_ip(10);
    let meshed_marker = "MESHED-SECRET-7f3a";
    let plain_marker = "PLAIN-CONTROL-91bc";
    curl(&shop.client, &[&format!("http://{vip}/{meshed_marker}")]);
    let (echo, _) = tcp(&shop.client.pod, &format!("{vip}:9000"), meshed_marker, false);
    assert_eq!(echo, meshed_marker);
    // Positive control: an unmeshed client's plaintext must be visible, or
    // the capture proves nothing.
    let out = outsider.run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            &format!("http://{}:8080/{plain_marker}", shop.server.ip()),
        ],
        T,
    );
    assert!(out.success(), "{}", out.stderr);
    // Stop only once the control has reached the file (bounded).
    let contains_in_file = |needle: &str| {
        let bytes = std::fs::read(&pcap).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !contains_in_file(plain_marker) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::process::Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcpdump.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = tcpdump.kill();
    let _ = tcpdump.wait();
    let bytes = std::fs::read(&pcap).expect("pcap");
    let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        contains(plain_marker),
        "the capture saw no plaintext at all ({} bytes): broken capture",
        bytes.len()
    );
    assert!(
        !contains(meshed_marker),
        "meshed traffic crossed the bridge in plaintext"
    );
}

#[test]
fn strict_mode_refuses_plaintext_and_foreign_certificates() {
    if netns::skip_unless_tools("strict_mode_refuses_plaintext_and_foreign_certificates", &["openssl"]) {
        return;
    }
    let shop = shop(
        "mesh-strict",
        ProxyOptions {
            policy: Some("strict"),
            ..ProxyOptions::default()
        },
    );
    let vip = service_ip(10);
    // Mesh traffic still flows.
    let ok = curl(&shop.client, &[&format!("http://{vip}/strict")]);
    assert!(ok.contains(&format!("client-id={FRONTEND}")), "{ok}");
    // Plaintext from an unmeshed Pod is refused.
    let outsider = shop.mesh.plain_pod("outsider");
    let out = outsider.run(
        "curl",
        &["-sS", "--max-time", "5", &format!("http://{}:8080/", shop.server.ip())],
        T,
    );
    assert!(!out.success(), "strict mode served plaintext: {}", out.stdout);
    // A client certificate from a foreign root, offering the mesh ALPN, fails the handshake.
    let dir = shop.mesh.dir().join("foreign");
    std::fs::create_dir_all(&dir).expect("dir");
    let root = sidemesh_identity::ca::new_root("cluster.local", Duration::from_secs(86400)).expect("root");
    let issuer = sidemesh_identity::ca::new_issuer(&root.cert, &root.key, Duration::from_secs(86400)).expect("issuer");
    std::fs::write(dir.join("cert.pem"), &issuer.cert).expect("write");
    std::fs::write(dir.join("key.pem"), &issuer.key).expect("write");
    let connect = format!("{}:8080", shop.server.ip());
    let (cert, key) = (
        dir.join("cert.pem").display().to_string(),
        dir.join("key.pem").display().to_string(),
    );
    let out = outsider.run(
        "bash",
        &[
            "-c",
            &format!(
                "printf 'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | timeout 10 openssl s_client -connect {connect} -alpn sidemesh.h2 -cert {cert} -key {key} -tls1_3 -quiet 2>&1"
            ),
        ],
        T,
    );
    assert!(
        !out.stdout.contains("name=web"),
        "a foreign certificate reached the app: {}",
        out.stdout
    );
    let log = shop.server.proxy.log();
    assert!(log.contains("strict inbound policy"), "{log}");
}

/// An HTTP/1.1 request with a forged identity header, sent from inside a Pod
/// on a connection left idle for `idle` first, as a pool's spare connection is.
fn late_http(pod: &Pod, addr: &str, idle: Duration) -> String {
    let (host, port) = addr.rsplit_once(':').expect("addr");
    let script = format!(
        r#"
import socket, sys, time
s = socket.create_connection(("{host}", {port}), timeout=10)
time.sleep({idle})
s.sendall(b"GET /late HTTP/1.1\r\nHost: {host}\r\nsidemesh-client-id: spiffe://cluster.local/ns/x/sa/admin\r\nConnection: close\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode(errors="replace"))
"#,
        idle = idle.as_secs_f64(),
    );
    let out = pod.run("python3", &["-c", &script], T);
    assert!(out.success(), "late request to {addr}: {}", out.stderr);
    out.stdout
}

#[test]
fn http_clients_that_connect_ahead_of_their_first_request_are_still_proxied_as_http() {
    if netns::skip_unless_capable("http_clients_that_connect_ahead_of_their_first_request_are_still_proxied_as_http") {
        return;
    }
    let shop = shop("mesh-late", ProxyOptions::default());
    let vip = service_ip(10);
    // Idle three times the 500 ms detection timeout. Taken for opaque TCP, the
    // request would reach the app raw, forged header and all.
    let idle = Duration::from_millis(1500);
    let meshed = late_http(&shop.client.pod, &format!("{vip}:80"), idle);
    assert!(meshed.starts_with("HTTP/1.1 200"), "{meshed}");
    assert!(
        meshed.contains(&format!("client-id={FRONTEND}")),
        "the late request went through HTTP routing and mTLS identity: {meshed}"
    );
    // The same from outside the mesh straight to the Pod (permissive): the
    // server proxy still proxies it request by request and drops the header.
    let outsider = shop.mesh.plain_pod("outsider");
    let plain = late_http(&outsider, &format!("{}:8080", shop.server.ip()), idle);
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    assert!(
        plain.contains("client-id=-"),
        "a forged identity reached the app: {plain}"
    );
    let detected = |m: &str, direction: &str, protocol: &str| {
        let (d, p) = (format!("direction=\"{direction}\""), format!("protocol=\"{protocol}\""));
        metric_value(m, "sidemesh_detect_results_total", &[&d, &p])
    };
    let (client, server) = (shop.client.metrics(), shop.server.metrics());
    assert_eq!(detected(&client, "outbound", "http1"), 1.0, "{client}");
    assert_eq!(detected(&client, "outbound", "opaque"), 0.0, "{client}");
    assert_eq!(detected(&server, "inbound", "http1"), 1.0, "{server}");
}

#[test]
fn a_request_whose_client_gives_up_is_recorded_as_499_by_both_proxies() {
    if netns::skip_unless_capable("a_request_whose_client_gives_up_is_recorded_as_499_by_both_proxies") {
        return;
    }
    let shop = shop("mesh-gaveup", ProxyOptions::default());
    let vip = service_ip(10);
    let out = shop.client.run(
        "curl",
        &["-sS", "--max-time", "0.5", &format!("http://{vip}/slow?sleep_ms=3000")],
        T,
    );
    assert!(!out.success(), "curl was to give up: {}", out.stdout);
    let closed = |w: &Workload, name: &str| metric_value(&w.metrics(), name, &["http_response_status_code=\"499\""]);
    // The server proxy learns of it when the client proxy resets the stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let counts = (
            closed(&shop.client, "http_client_request_duration_seconds_count"),
            closed(&shop.server, "http_server_request_duration_seconds_count"),
        );
        if counts == (1.0, 1.0) || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        counts,
        (1.0, 1.0),
        "(client proxy, server proxy) requests recorded as 499"
    );
    // Its one attempt, cut off with it, is counted too (and only once).
    let m = shop.client.metrics();
    assert_eq!(metric_value(&m, "sidemesh_http_attempts_total", &[]), 1.0, "{m}");
    assert_eq!(
        metric_value(
            &m,
            "sidemesh_http_attempts_total",
            &["http_response_status_code=\"499\""]
        ),
        1.0,
        "{m}"
    );
}

#[test]
fn an_idle_mesh_connection_is_closed_and_the_next_request_reconnects() {
    if netns::skip_unless_capable("an_idle_mesh_connection_is_closed_and_the_next_request_reconnects") {
        return;
    }
    let shop = shop(
        "mesh-idle",
        ProxyOptions {
            env: vec![("SIDEMESH_MESH_IDLE_TIMEOUT".into(), "1s".into())],
            ..ProxyOptions::default()
        },
    );
    let vip = service_ip(10);
    // The client proxy's pooled connection to the server Pod (curl's own
    // connection goes to the VIP, redirected to the local proxy).
    let upstream = format!("dst {}:8080", shop.server.ip());
    let pooled = || {
        let out = shop.client.run("ss", &["-Htn", "state", "established", &upstream], T);
        out.stdout.lines().filter(|l| !l.trim().is_empty()).count()
    };
    assert!(curl(&shop.client, &[&format!("http://{vip}/first")]).contains("path=/first"));
    assert_eq!(pooled(), 1, "one pooled mesh connection after a request");
    // Unused, it is closed within two idle timeouts; the HTTP/2 keep-alive
    // pings (every 30 s) would otherwise hold it for ever.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pooled() > 0 {
        assert!(Instant::now() < deadline, "the idle mesh connection is still open");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(curl(&shop.client, &[&format!("http://{vip}/again")]).contains("path=/again"));
    let m = shop.client.metrics();
    let handshakes = metric_value(
        &m,
        "sidemesh_tls_handshakes_total",
        &["direction=\"outbound\"", "result=\"success\""],
    );
    assert_eq!(handshakes, 2.0, "the second request connected anew\n{m}");
}

#[test]
fn server_first_protocols_answer_without_waiting_for_the_client() {
    if netns::skip_unless_capable("server_first_protocols_answer_without_waiting_for_the_client") {
        return;
    }
    let shop = shop("mesh-srvfirst", ProxyOptions::default());
    let vip = service_ip(10);
    // 3306 is opaque by default: no detection at all.
    let (text, first) = tcp(&shop.client.pod, &format!("{vip}:3306"), "ping", true);
    assert!(text.starts_with("mysql-greeting\n"), "{text}");
    assert!(first < 0.4, "banner on an opaque port took {first:.3}s");
    // 7000 is not: detection gives up on a silent client after its short timeout.
    let (text, first) = tcp(&shop.client.pod, &format!("{vip}:7000"), "ping", true);
    assert!(text.starts_with("hello-first\n"), "{text}");
    assert!(
        first < 1.5,
        "banner after detection timeout took {first:.3}s (must be far below 10 s)"
    );
}

#[test]
fn sigterm_drains_in_flight_requests() {
    if netns::skip_unless_capable("sigterm_drains_in_flight_requests") {
        return;
    }
    let mut shop = shop("mesh-drain", ProxyOptions::default());
    let vip = service_ip(10);
    // Start a slow request, then SIGTERM the server's proxy while it is in flight.
    let url = format!("http://{vip}/slow?sleep_ms=1500");
    let mut slow = shop
        .client
        .pod
        .cmd("curl")
        .args(["-sS", "--max-time", "10", &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let _ = shop.server.proxy.terminate(Duration::from_millis(1)); // send SIGTERM, do not wait here
    let output = wait_with_timeout(&mut slow, Duration::from_secs(15));
    assert!(output.0, "the in-flight request failed during drain: {}", output.1);
    assert!(output.1.contains("path=/slow"), "{}", output.1);
    let status = shop
        .server
        .proxy
        .terminate(Duration::from_secs(10))
        .expect("proxy exited after draining");
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn wait_with_timeout(child: &mut std::process::Child, timeout: Duration) -> (bool, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut out = String::new();
            if let Some(mut s) = child.stdout.take() {
                let _ = std::io::Read::read_to_string(&mut s, &mut out);
            }
            if let Some(mut s) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut s, &mut out);
            }
            return (status.success(), out);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return (false, "timed out".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn garbage_on_every_listener_does_not_hurt() {
    if netns::skip_unless_capable("garbage_on_every_listener_does_not_hurt") {
        return;
    }
    let shop = shop("mesh-garbage", ProxyOptions::default());
    let sip = shop.server.ip();
    let script = format!(
        r#"
import os, socket
targets = [("{sip}", 8080), ("{sip}", 15020), ("127.0.0.1", 15001), ("127.0.0.1", 15006)]
payloads = [os.urandom(3000), b"\x16\x03\x01\x00\x05hello-garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(500), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(100), b"GET / HTTP/1.1\r\nHost: \x00\xff\r\n\r\n", b""]
held = []
for host, port in targets:
    for p in payloads:
        try:
            s = socket.create_connection((host, port), timeout=3)
            s.sendall(p)
            held.append(s)  # half-open: never closed until the end
        except OSError:
            pass
print(len(held))
"#
    );
    let out = shop.client.run("python3", &["-c", &script], T);
    assert!(out.success(), "{}", out.stderr);
    let out = shop
        .server
        .pod
        .run("python3", &["-c", &script.replace(&sip.to_string(), "127.0.0.1")], T);
    assert!(out.success(), "{}", out.stderr);
    // Both proxies still serve.
    let ok = curl(&shop.client, &[&format!("http://{}/after-garbage", service_ip(10))]);
    assert!(ok.contains("path=/after-garbage"), "{ok}");
    assert!(
        shop.client
            .pod
            .run("curl", &["-sf", "http://127.0.0.1:15020/live"], T)
            .success()
    );
}

/// wrk from inside a Pod: (requests, failures = non-2xx + socket errors).
fn wrk_counts(pod: &Pod, url: &str, secs: u64) -> (u64, u64, String) {
    let d = format!("{secs}s");
    let out = pod.run("wrk", &["-t1", "-c4", "-d", &d, url], Duration::from_secs(secs + 20));
    assert!(out.success(), "wrk: {}", out.stderr);
    let requests = out
        .stdout
        .lines()
        .find_map(|l| l.trim().split(" requests in ").next()?.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let non2xx = out
        .stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Non-2xx or 3xx responses:")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let socket_errors: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|rest| {
            rest.split(',')
                .filter_map(|kv| kv.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    (requests, non2xx + socket_errors, out.stdout)
}

fn wait_state(
    w: &Workload,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let state = w.state();
        if pred(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {what} not reached within {timeout:?}: {state}",
            w.pod.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn renewal_and_bundle_changes_under_load_fail_no_request_and_restart_nothing() {
    if netns::skip_unless_tools(
        "renewal_and_bundle_changes_under_load_fail_no_request_and_restart_nothing",
        &["wrk"],
    ) {
        return;
    }
    let opts = ProxyOptions {
        env: vec![("SIDEMESH_RENEW_JITTER".into(), "1s".into())],
        ..ProxyOptions::default()
    };
    let shop = shop("mesh-renew", opts.clone());
    let (client_pid, server_pid) = (shop.client.proxy.pid(), shop.server.proxy.pid());
    let old_issuer = shop.client.state()["certificate"]["issuer_fingerprint"].clone();
    let url = format!("http://{}/load", service_ip(10));
    let mesh = &shop.mesh;
    std::thread::scope(|s| {
        let load = s.spawn(|| wrk_counts(&shop.client.pod, &url, 8));
        std::thread::sleep(Duration::from_secs(2));
        // A new issuer under the same root: every proxy re-certifies within the jitter.
        let issuer =
            sidemesh_identity::ca::new_issuer(&mesh.pki.root.cert, &mesh.pki.root.key, Duration::from_secs(86400))
                .expect("issuer");
        sidemesh_tests::pki::write(&mesh.pki.path("issuer.crt"), &issuer.cert);
        sidemesh_tests::pki::write(&mesh.pki.path("issuer.key"), &issuer.key);
        let new_fp = sidemesh_identity_client::fingerprint(&pem_der(&issuer.cert));
        for w in [&shop.client, &shop.server] {
            wait_state(w, "certificate from the new issuer", Duration::from_secs(10), |st| {
                st["certificate"]["issuer_fingerprint"] == new_fp.as_str()
            });
        }
        // A second root joins the bundle: picked up without restart.
        let extra = sidemesh_identity::ca::new_root("cluster.local", Duration::from_secs(86400)).expect("root");
        sidemesh_tests::pki::write(
            &mesh.pki.path("bundle.pem"),
            &format!("{}{}", mesh.pki.root.cert, extra.cert),
        );
        for w in [&shop.client, &shop.server] {
            wait_state(w, "two trusted roots", Duration::from_secs(10), |st| {
                st["trusted_roots"].as_array().is_some_and(|r| r.len() == 2)
            });
        }
        let (requests, failures, text) = load.join().expect("load thread");
        assert!(requests > 200, "too little load to mean anything: {text}");
        assert_eq!(failures, 0, "requests failed during renewal and bundle change: {text}");
    });
    assert_ne!(shop.client.state()["certificate"]["issuer_fingerprint"], old_issuer);
    assert_eq!(
        (shop.client.proxy.pid(), shop.server.proxy.pid()),
        (client_pid, server_pid)
    );
    let mut client_proxy = shop.client.proxy;
    assert!(client_proxy.is_running(), "no proxy restarted or died");
}

#[test]
fn a_destination_that_speaks_nonsense_leaves_traffic_flowing() {
    if netns::skip_unless_capable("a_destination_that_speaks_nonsense_leaves_traffic_flowing") {
        return;
    }
    let mesh = Mesh::start("mesh-nonsense");
    let server = mesh.plain_pod("server");
    let _apps = start_apps(&server);
    // A "destination service" that answers every connection with garbage.
    let liar = mesh.plain_pod("liar");
    let app = binary("sidemesh-test-app");
    let _garbage = liar.start(
        "garbage",
        &app,
        &["banner", "0.0.0.0:8086", "\u{16}\u{3}\u{3}garbage-not-tls"],
        &[],
    );
    assert!(liar.wait_listening(8086, Duration::from_secs(10)));
    let opts = ProxyOptions {
        env: vec![("SIDEMESH_DESTINATION_ADDR".into(), format!("{}:8086", liar.ip()))],
        ..ProxyOptions::default()
    };
    let client = mesh.mesh(mesh.plain_pod("client"), "default", "frontend", &opts);
    // Discovery never answers sensibly: the destination is forwarded as-is.
    let out = curl(&client, &[&format!("http://{}:8080/still-works", server.ip())]);
    assert!(out.contains("path=/still-works"), "{out}");
    let state = client.state();
    assert_eq!(state["discovery"]["connected"], false, "{state}");
    let mut proxy = client.proxy;
    assert!(proxy.is_running());
}

/// An inbound mTLS handshake count of a proxy, from its `/metrics`.
fn inbound_handshakes(w: &Workload) -> u64 {
    w.metrics()
        .lines()
        .filter(|l| l.starts_with("sidemesh_tls_handshakes_total") && l.contains(r#"direction="inbound""#))
        .filter(|l| l.contains(r#"result="success""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn websocket_upgrades_pass_through_the_mesh() {
    if netns::skip_unless_capable("websocket_upgrades_pass_through_the_mesh") {
        return;
    }
    if !std::process::Command::new("python3")
        .args(["-c", "import websockets"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!(
            "SKIP websocket_upgrades_pass_through_the_mesh: python3 module websockets missing (pip install websockets)"
        );
        return;
    }
    let shop = shop("mesh-ws", ProxyOptions::default());
    // A real WebSocket server (python websockets) that echoes with its path
    // and the identity its proxy vouched for.
    let server = r#"
import asyncio
from websockets.asyncio.server import serve
async def echo(ws):
    who = ws.request.headers.get("sidemesh-client-id", "-")
    async for m in ws:
        await ws.send(ws.request.path + " " + who + " " + m)
async def main():
    async with serve(echo, "0.0.0.0", 8765):
        await asyncio.Future()
asyncio.run(main())
"#;
    let _ws = shop.server.pod.start("app-ws", "python3", &["-c", server], &[]);
    assert!(shop.server.pod.wait_listening(8765, Duration::from_secs(10)));
    // A real client: several messages both ways on one upgraded connection,
    // with a forged identity header that no proxy may let through.
    let client = |url: &str| {
        format!(
            r#"
from websockets.sync.client import connect
forged = {{"sidemesh-client-id": "spiffe://cluster.local/ns/x/sa/admin"}}
with connect("{url}", open_timeout=10, additional_headers=forged) as ws:
    for i in range(3):
        ws.send("hello-%d" % i)
        print(ws.recv(timeout=10))
"#
        )
    };
    let vip = service_ip(10);
    let before = inbound_handshakes(&shop.server);
    let out = shop
        .client
        .run("python3", &["-c", &client(&format!("ws://{vip}:8765/chat"))], T);
    assert!(
        out.success(),
        "meshed WebSocket failed: {}\nclient proxy:\n{}",
        out.stderr,
        shop.client.proxy.log()
    );
    let lines: Vec<String> = (0..3).map(|i| format!("/chat {FRONTEND} hello-{i}")).collect();
    assert_eq!(
        out.stdout.trim(),
        lines.join("\n"),
        "the client's identity, not the forged one"
    );
    // It crossed between the proxies as mTLS (its own stream, not the HTTP/2 pool).
    assert!(
        inbound_handshakes(&shop.server) > before,
        "the upgrade did not arrive over mesh mTLS"
    );
    // The server's proxy saw the upgrade request itself: counted, with its client.
    let m = shop.server.metrics();
    let upgrades = metric_value(
        &m,
        "http_server_request_duration_seconds_count",
        &[
            "http_response_status_code=\"101\"",
            &format!("source_workload=\"{FRONTEND}\""),
        ],
    );
    assert_eq!(upgrades, 1.0, "{m}");
    // Plaintext from outside the mesh into the server's Pod (permissive).
    let outsider = shop.mesh.plain_pod("outsider");
    let out = outsider.run(
        "python3",
        &["-c", &client(&format!("ws://{}:8765/direct", shop.server.ip()))],
        T,
    );
    assert!(out.success(), "inbound plaintext WebSocket failed: {}", out.stderr);
    assert!(
        out.stdout.starts_with("/direct - hello-0"),
        "unauthenticated: {}",
        out.stdout
    );
    // An upgrade the application refuses is answered as it answered.
    let refused = curl(
        &shop.client,
        &[
            "-si",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            &format!("http://{vip}:8765/no-key"),
        ],
    );
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    // Plain HTTP on the same proxies is untouched.
    let ok = curl(&shop.client, &[&format!("http://{vip}/after-ws")]);
    assert!(ok.contains("path=/after-ws"), "{ok}");
    // curl --http2 asks to upgrade to h2c: that is not taken, the request
    // stays HTTP/1.1 and goes the request-by-request way.
    let h2c = curl(&shop.client, &["-si", "--http2", &format!("http://{vip}/h2c")]);
    assert!(h2c.starts_with("HTTP/1.1 200"), "{h2c}");
    assert!(h2c.contains("path=/h2c") && h2c.contains("version=HTTP/1.1"), "{h2c}");
}

#[test]
fn idle_destinations_are_unsubscribed_so_the_stream_limit_is_not_reached() {
    if netns::skip_unless_capable("idle_destinations_are_unsubscribed_so_the_stream_limit_is_not_reached") {
        return;
    }
    // A destination service that lets a stream follow 3 targets, and a
    // client proxy that forgets a destination idle for 1 s.
    let mesh = Mesh::start_with("mesh-evict", &["--max-subscriptions", "3"]);
    let client_pod = mesh.plain_pod("client");
    let server_pod = mesh.plain_pod("server");
    let (sip, cip) = (server_pod.ip().to_string(), client_pod.ip().to_string());
    let (vip, vip2) = (service_ip(10), service_ip(11));
    mesh.set_objects(&yaml(&[
        service("shop", "web", &vip.to_string(), &[("http", 80)], json!({})),
        slice("shop", "web-1", "web", &[("http", 8080)], &[(&sip, "server", true)]),
        service("shop", "web2", &vip2.to_string(), &[("http", 80)], json!({})),
        slice("shop", "web2-1", "web2", &[("http", 8080)], &[(&sip, "server", true)]),
        pod("shop", "server", &sip, "web", true),
        pod("default", "client", &cip, "frontend", true),
    ]));
    let _apps = start_apps(&server_pod);
    let _server = mesh.mesh(server_pod, "shop", "web", &ProxyOptions::default());
    let client = mesh.mesh(
        client_pod,
        "default",
        "frontend",
        &ProxyOptions {
            env: vec![("SIDEMESH_DISCOVERY_IDLE_TIMEOUT".into(), "1s".into())],
            ..ProxyOptions::default()
        },
    );
    let ok = curl(&client, &[&format!("http://{vip}/first")]);
    assert!(ok.contains(&format!("client-id={FRONTEND}")), "{ok}");
    // Five more destinations, one after another, each left idle: together
    // with the first they are twice the service's limit.
    for port in 9001..9006 {
        let script = format!(
            "import socket\ntry:\n    socket.create_connection(('{sip}', {port}), timeout=2).close()\nexcept OSError:\n    pass\n"
        );
        assert!(client.run("python3", &["-c", &script], T).success());
        std::thread::sleep(Duration::from_millis(1700));
    }
    // A new Service still resolves: the stream was never refused.
    let ok = curl(&client, &[&format!("http://{vip2}/after")]);
    assert!(
        ok.contains(&format!("client-id={FRONTEND}")),
        "{ok}\nclient proxy:\n{}",
        client.proxy.log()
    );
    let log = mesh.destination.log();
    assert!(
        !log.contains("the limit"),
        "the destination service refused the stream:\n{log}"
    );
    // And the proxy follows what is in use, not all it has met.
    let state = client.run("curl", &["-sf", "http://127.0.0.1:15020/debug/state"], T);
    let state: serde_json::Value = serde_json::from_str(&state.stdout).expect("debug/state JSON");
    let followed = state["discovery"]["targets"].as_array().map_or(usize::MAX, Vec::len);
    assert!(followed <= 2, "{followed} targets followed: {state}");
    assert_eq!(state["discovery"]["connected"], true, "{state}");
}
