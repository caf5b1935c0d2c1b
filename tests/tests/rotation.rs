//! Root-of-trust rotation end to end (issue 7): network-namespace Pods with
//! strict-mode proxies under continuous load while the real
//! `sidemesh trust rotate --local` walks A → A+B → issuer(B) → B; refused
//! bundles and issuers leave everything as it was; an identity-service
//! outage longer than a renewal period costs nothing; `sidemesh check`
//! reports agreement and disagreement. The netns tests need root, ip and
//! iptables and skip with one line otherwise; the offline `check` tests
//! always run.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use sidemesh_identity::ca::{self, PemPair};
use sidemesh_identity_client::{TrustBundle, fingerprint};
use sidemesh_tests::mesh::{IDENTITY_PORT, Mesh, ProxyOptions, Workload};
use sidemesh_tests::netns::{self, Pod, run_bounded, service_ip};
use sidemesh_tests::objects::{pod, service, slice, yaml};
use sidemesh_tests::pki;
use sidemesh_tests::process::{Proc, binary, metric_value};

const T: Duration = Duration::from_secs(20);
const DAY: Duration = Duration::from_secs(86400);

fn der(pem: &str) -> Vec<u8> {
    rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
        .expect("PEM certificate")
}

fn fp(pem: &str) -> String {
    fingerprint(&der(pem))
}

/// The mesh of these tests: `web` (VIP 10.214.0.10, HTTP on 80 → 8080, TCP
/// echo on 9000) in a strict-mode server Pod, and `clients` strict-mode
/// client Pods, every proxy re-certifying within 2 s of an issuer switch.
struct Rig {
    mesh: Mesh,
    server: Workload,
    clients: Vec<Workload>,
    _apps: Vec<Proc>,
}

fn strict() -> ProxyOptions {
    ProxyOptions {
        policy: Some("strict"),
        env: vec![("SIDEMESH_RENEW_JITTER".into(), "2s".into())],
        ..ProxyOptions::default()
    }
}

fn rig_on(mesh: Mesh, clients: usize) -> Rig {
    let server_pod = mesh.plain_pod("server");
    let client_pods: Vec<Pod> = (0..clients).map(|i| mesh.plain_pod(&format!("client{i}"))).collect();
    let vip = service_ip(10).to_string();
    let sip = server_pod.ip().to_string();
    let mut objects = vec![
        service("shop", "web", &vip, &[("http", 80), ("tcp", 9000)], json!({})),
        slice(
            "shop",
            "web-1",
            "web",
            &[("http", 8080), ("tcp", 9000)],
            &[(&sip, "server", true)],
        ),
        pod("shop", "server", &sip, "web", true),
    ];
    for (i, p) in client_pods.iter().enumerate() {
        objects.push(pod(
            "default",
            &format!("client{i}"),
            &p.ip().to_string(),
            &format!("frontend{i}"),
            true,
        ));
    }
    mesh.set_objects(&yaml(&objects));
    let app = binary("sidemesh-test-app");
    let apps = vec![
        server_pod.start("app-http", &app, &["http", "0.0.0.0:8080", "web"], &[]),
        server_pod.start("app-echo", &app, &["echo", "0.0.0.0:9000"], &[]),
    ];
    for port in [8080, 9000] {
        assert!(
            server_pod.wait_listening(port, Duration::from_secs(10)),
            "app port {port}"
        );
    }
    let server = mesh.mesh(server_pod, "shop", "web", &strict());
    let clients = client_pods
        .into_iter()
        .enumerate()
        .map(|(i, p)| mesh.mesh(p, "default", &format!("frontend{i}"), &strict()))
        .collect();
    Rig {
        mesh,
        server,
        clients,
        _apps: apps,
    }
}

impl Rig {
    fn workloads(&self) -> Vec<&Workload> {
        let mut all = vec![&self.server];
        all.extend(self.clients.iter());
        all
    }

    /// The proxies' admin endpoints, as seen from the control-plane Pod.
    fn admin_endpoints(&self) -> String {
        self.workloads()
            .iter()
            .map(|w| format!("http://{}:15020", w.ip()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.workloads().iter().map(|w| w.proxy.pid()).collect();
        pids.push(self.mesh.identity.pid());
        pids.push(self.mesh.destination.pid());
        pids
    }

    fn path(&self, name: &str) -> String {
        self.mesh.pki.path(name).display().to_string()
    }

    /// `sidemesh <args>` run inside the control-plane Pod (where the proxies'
    /// admin endpoints and the control plane are reachable).
    fn sidemesh(&self, args: &[&str], timeout: Duration) -> netns::Output {
        let mut cmd = self.mesh.cp.cmd(binary("sidemesh"));
        cmd.args(args).env("NO_COLOR", "1").env("SIDEMESH_LOG", "warn");
        run_bounded(&mut cmd, timeout).unwrap_or_else(|e| panic!("sidemesh {args:?}: {e}"))
    }

    /// `sidemesh check --output json …` against every proxy and the control plane.
    fn check(&self, bundle: &str, issuer: &str) -> (bool, Value, String) {
        let endpoints = self.admin_endpoints();
        let servers = format!("{}:{IDENTITY_PORT},{}", self.mesh.cp.ip(), self.mesh.destination_addr());
        let out = self.sidemesh(
            &[
                "check",
                "--bundle",
                bundle,
                "--issuer",
                issuer,
                "--proxies",
                &endpoints,
                "--tls-endpoints",
                &servers,
                "--output",
                "json",
            ],
            T,
        );
        let doc: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        (out.success(), doc, format!("{}\n{}", out.stdout, out.stderr))
    }
}

/// A client running in the background inside a Pod, stopped by SIGINT (wrk
/// prints its summary then) or by a stop file (the Python loader).
struct Background {
    child: Child,
    out: std::thread::JoinHandle<String>,
}

impl Background {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting a background client");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let out = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            format!("{text}\n{err}")
        });
        Self { child, out }
    }

    /// Waits (bounded) for the exit after asking with SIGINT if `interrupt`.
    fn finish(mut self, interrupt: bool, timeout: Duration) -> String {
        if interrupt {
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.out.join().unwrap_or_default();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("a background client did not stop within {timeout:?}");
    }
}

/// wrk with keep-alive connections through the client proxy (HTTP/1 in,
/// pooled HTTP/2 over mTLS between the proxies), until interrupted.
fn start_wrk(pod: &Pod, url: &str) -> Background {
    let mut cmd = pod.cmd("wrk");
    cmd.args(["-t1", "-c2", "-d", "600s", "--timeout", "5s", url]);
    Background::start(cmd)
}

/// (requests, failures = non-2xx + socket errors, text) of a wrk summary.
fn wrk_counts(text: &str) -> (u64, u64) {
    let requests = text
        .lines()
        .find_map(|l| l.trim().split(" requests in ").next()?.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let non2xx = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Non-2xx or 3xx responses:")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let socket_errors: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|rest| {
            rest.split(',')
                .filter_map(|kv| kv.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    (requests, non2xx + socket_errors)
}

/// A new connection per request: an HTTP GET and an opaque TCP echo each
/// iteration, so that mesh handshakes (each opaque stream is its own mTLS
/// connection) happen throughout the rotation, not only pooled requests.
const CHURN: &str = r#"
import socket, sys, os, time, json, http.client
vip, stop, limit = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
res = {"http_ok": 0, "http_fail": 0, "tcp_ok": 0, "tcp_fail": 0, "errors": []}
def fail(kind, e):
    res[kind + "_fail"] += 1
    if len(res["errors"]) < 20:
        res["errors"].append("%.3f %s: %s" % (time.time(), kind, e))
i = 0
while not os.path.exists(stop) and time.time() < limit:
    i += 1
    try:
        c = http.client.HTTPConnection(vip, 80, timeout=10)
        c.request("GET", "/churn/%d" % i, headers={"Connection": "close"})
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status == 200 and b"name=web" in body:
            res["http_ok"] += 1
        else:
            fail("http", "status %d %r" % (r.status, body[:200]))
    except Exception as e:
        fail("http", repr(e))
    try:
        s = socket.create_connection((vip, 9000), timeout=10)
        msg = ("ping-%d" % i).encode()
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        if data == msg:
            res["tcp_ok"] += 1
        else:
            fail("tcp", "echo %r" % data[:100])
    except Exception as e:
        fail("tcp", repr(e))
print(json.dumps(res))
"#;

fn start_churn(pod: &Pod, vip: &str, stop: &Path) -> Background {
    let mut cmd = pod.cmd("python3");
    cmd.args(["-c", CHURN, vip, &stop.display().to_string(), "600"]);
    Background::start(cmd)
}

fn churn_counts(text: &str) -> Value {
    text.lines()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .unwrap_or(Value::Null)
}

fn wait_state(w: &Workload, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let state = w.state();
        if pred(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {what} not reached within {timeout:?}: {state}\nproxy log:\n{}",
            w.pod.name(),
            w.proxy.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn roots_of(state: &Value) -> Vec<String> {
    state["trusted_roots"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// A workload leaf for `id` from the issuer `issuer` (under `root`), with
/// the issuer appended, written as `<name>.crt` / `<name>.key` in `dir`.
fn leaf_files(dir: &Path, name: &str, root: &str, issuer: &PemPair, id: &str) -> (String, String) {
    let bundle = TrustBundle::from_pem(root.as_bytes()).expect("root");
    let signer = sidemesh_identity::issuer::Issuer::from_pem(issuer.cert.as_bytes(), issuer.key.as_bytes(), &bundle)
        .expect("issuer");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let (leaf, _) = signer
        .sign(&id.parse().expect("id"), &[], &key, Duration::from_secs(3600))
        .expect("leaf");
    let pem = sidemesh_identity_client::bundle::pem_encode("CERTIFICATE", &leaf);
    let (cert, keyf) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&cert, format!("{pem}{}", issuer.cert)).expect("write leaf");
    std::fs::write(&keyf, key.serialize_pem()).expect("write key");
    (cert.display().to_string(), keyf.display().to_string())
}

/// An mTLS handshake with `connect` (`ip:port`) from an outside Pod,
/// offering `alpn` and presenting `cert`: true when it was accepted (the
/// connection stays open until `timeout` ends it, no alert).
fn handshake_accepted(pod: &Pod, connect: &str, alpn: &str, cert: &str, key: &str) -> (bool, String) {
    let out = pod.run(
        "bash",
        &[
            "-c",
            &format!(
                "printf 'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' | timeout 4 openssl s_client -connect {connect} -alpn {alpn} -cert {cert} -cert_chain {cert} -key {key} -tls1_3 -quiet 2>&1; true"
            ),
        ],
        T,
    );
    (!out.stdout.to_lowercase().contains("alert"), out.stdout)
}

#[test]
fn root_rotation_under_load_fails_no_request_and_restarts_nothing() {
    let name = "root_rotation_under_load_fails_no_request_and_restarts_nothing";
    if netns::skip_unless_tools(name, &["wrk", "curl", "python3", "openssl"]) {
        return;
    }
    let rig = rig_on(Mesh::start("rot-main"), 2);
    let pids = rig.pids();
    let a_root = rig.mesh.pki.root.cert.clone();
    let a = fp(&a_root);
    let a_issuer = fp(&rig.mesh.pki.issuer.cert);
    let (bundle, issuer_cert, issuer_key) = (rig.path("bundle.pem"), rig.path("issuer.crt"), rig.path("issuer.key"));
    let state_dir = rig.mesh.dir().join("rotation");
    let state = state_dir.display().to_string();

    // Before: everyone agrees with the bundle and the issuer.
    let (ok, doc, text) = rig.check(&bundle, &issuer_cert);
    assert!(ok, "check before the rotation: {text}");
    assert_eq!(doc["proxies"]["agreeing"], 3, "{text}");

    let vip = service_ip(10).to_string();
    let stop = rig.mesh.dir().join("stop-churn");
    let wrk = start_wrk(&rig.clients[0].pod, &format!("http://{vip}/load"));
    let churn = start_churn(&rig.clients[1].pod, &vip, &stop);
    std::thread::sleep(Duration::from_secs(2));

    let proxies = rig.admin_endpoints();
    let identity = format!("{}:{IDENTITY_PORT}", rig.mesh.cp.ip());
    let servers = format!("{identity},{}", rig.mesh.destination_addr());
    let rotate = |extra: &[&str]| {
        let mut args = vec![
            "trust",
            "rotate",
            "--local",
            "--yes",
            "--state-dir",
            &state,
            "--bundle",
            &bundle,
            "--issuer-cert",
            &issuer_cert,
            "--issuer-key",
            &issuer_key,
            "--proxies",
            &proxies,
            "--identity-addr",
            &identity,
            "--tls-endpoints",
            &servers,
            "--timeout",
            "90s",
            "--poll",
            "250ms",
        ];
        args.extend_from_slice(extra);
        let out = rig.sidemesh(&args, Duration::from_secs(300));
        assert!(
            out.success(),
            "sidemesh trust rotate {extra:?} failed:\n{}\n{}\nidentity:\n{}",
            out.stdout,
            out.stderr,
            rig.mesh.identity.log()
        );
        out.stdout
    };

    // Steps 1–3, then stop: the state file is how a re-run resumes.
    let started = Instant::now();
    let first = rotate(&["--stop-after", "wait-trust"]);
    assert!(first.contains("stopped after step 3"), "{first}");
    let saved: Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("state.json")).expect("state.json")).expect("state JSON");
    assert_eq!(
        saved["done"],
        json!(["new-root", "publish-both", "wait-trust"]),
        "{saved}"
    );
    let b_root = std::fs::read_to_string(state_dir.join("new-root.crt")).expect("new root");
    let b = fp(&b_root);
    for w in rig.workloads() {
        let st = w.state();
        assert_eq!(roots_of(&st), vec![a.clone(), b.clone()], "{}: {st}", w.pod.name());
        assert_eq!(st["certificate"]["root_fingerprint"], a.as_str());
    }
    // Mid-rotation, `check` agrees with the A+B bundle and disagrees with the old one.
    let (ok, doc, text) = rig.check(&bundle, &issuer_cert);
    assert!(ok, "check against A+B: {text}");
    assert_eq!(doc["proxies"]["trusted_roots"][b.as_str()], 3, "{text}");
    let old_bundle = state_dir.join("old-bundle.pem").display().to_string();
    let (ok, doc, text) = rig.check(&old_bundle, &issuer_cert);
    assert!(!ok, "check against the old bundle must fail: {text}");
    assert_eq!(doc["proxies"]["agreeing"], 0, "{text}");
    assert!(text.contains("disagrees"), "{text}");

    // Steps 4–6, resumed.
    let second = rotate(&[]);
    let took = started.elapsed();
    assert!(second.contains("resuming"), "{second}");
    assert!(second.contains("done before"), "{second}");
    assert!(second.contains("rotation complete"), "{second}");
    let b_issuer = fp(&std::fs::read_to_string(state_dir.join("new-issuer.crt")).expect("new issuer"));

    // Load continued through all of it.
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(&stop, "").expect("stop file");
    let churned = churn_counts(&churn.finish(false, Duration::from_secs(30)));
    let wrk_text = wrk.finish(true, Duration::from_secs(30));
    let (requests, failures) = wrk_counts(&wrk_text);
    eprintln!("rotation took {took:?}; wrk: {requests} requests, {failures} failures; churn: {churned}\n{second}");
    assert!(requests > 3000, "too little load to mean anything: {wrk_text}");
    assert_eq!(failures, 0, "requests failed during the rotation: {wrk_text}");
    assert!(churned["http_ok"].as_u64().unwrap_or(0) > 50, "{churned}");
    assert!(churned["tcp_ok"].as_u64().unwrap_or(0) > 50, "{churned}");
    assert_eq!(churned["http_fail"], 0, "{churned}");
    assert_eq!(churned["tcp_fail"], 0, "{churned}");

    // Nothing restarted; everyone ends on B and no longer trusts A.
    assert_eq!(rig.pids(), pids, "a process was replaced");
    for w in rig.workloads() {
        let st = w.state();
        assert_eq!(roots_of(&st), vec![b.clone()], "{}: {st}", w.pod.name());
        assert_eq!(st["certificate"]["root_fingerprint"], b.as_str(), "{st}");
        assert_eq!(st["certificate"]["issuer_fingerprint"], b_issuer.as_str(), "{st}");
        let m = w.metrics();
        assert_eq!(metric_value(&m, "sidemesh_proxy_trust_roots", &[]), 1.0, "{m}");
        assert_eq!(
            metric_value(&m, "sidemesh_proxy_trust_root_info", &[&format!("fingerprint=\"{b}\"")]),
            1.0,
            "{m}"
        );
        assert_eq!(
            metric_value(
                &m,
                "sidemesh_proxy_certificate_info",
                &[
                    &format!("issuer_fingerprint=\"{b_issuer}\""),
                    &format!("root_fingerprint=\"{b}\"")
                ]
            ),
            1.0,
            "{m}"
        );
        assert!(
            metric_value(&m, "sidemesh_proxy_certificate_expiry_timestamp_seconds", &[]) > 0.0,
            "{m}"
        );
    }
    assert_ne!(a_issuer, b_issuer);
    let (ok, doc, text) = rig.check(&bundle, &issuer_cert);
    assert!(ok, "check after the rotation: {text}");
    assert_eq!(doc["proxies"]["agreeing"], 3, "{text}");

    // A fresh handshake with an A-chain certificate is refused; a B-chain one is accepted.
    let outsider = rig.mesh.plain_pod("outsider");
    let dir = rig.mesh.dir().join("leaves");
    std::fs::create_dir_all(&dir).expect("dir");
    let id = "spiffe://cluster.local/ns/default/sa/outsider";
    let (cert, key) = leaf_files(&dir, "a", &a_root, &rig.mesh.pki.issuer, id);
    let inbound = format!("{}:8080", rig.server.ip());
    let destination = rig.mesh.destination_addr();
    let (accepted, text) = handshake_accepted(&outsider, &inbound, "sidemesh.h2", &cert, &key);
    assert!(!accepted, "an A-chain certificate is still accepted by a proxy: {text}");
    let (accepted, text) = handshake_accepted(&outsider, &destination, "h2", &cert, &key);
    assert!(
        !accepted,
        "an A-chain certificate is still accepted by the destination service: {text}"
    );
    let b_pair = PemPair {
        cert: std::fs::read_to_string(state_dir.join("new-issuer.crt")).expect("issuer"),
        key: std::fs::read_to_string(state_dir.join("new-issuer.key")).expect("key"),
    };
    let (cert, key) = leaf_files(&dir, "b", &b_root, &b_pair, id);
    let (accepted, text) = handshake_accepted(&outsider, &inbound, "sidemesh.h2", &cert, &key);
    assert!(accepted, "a B-chain certificate is refused by a proxy: {text}");
    let (accepted, text) = handshake_accepted(&outsider, &destination, "h2", &cert, &key);
    assert!(
        accepted,
        "a B-chain certificate is refused by the destination service: {text}"
    );

    // A re-run after the end changes nothing and still passes.
    let third = rotate(&[]);
    assert!(third.contains("this rotation is complete"), "{third}");
    assert_eq!(roots_of(&rig.server.state()), vec![b.clone()]);
    let mut rig = rig;
    for w in rig.clients.iter_mut().chain(std::iter::once(&mut rig.server)) {
        assert!(w.proxy.is_running(), "{} exited", w.pod.name());
    }
    assert!(rig.mesh.identity.is_running() && rig.mesh.destination.is_running());
}

fn identity_metrics(mesh: &Mesh) -> String {
    mesh.cp
        .run("curl", &["-sf", "--max-time", "5", "http://127.0.0.1:9990/metrics"], T)
        .stdout
}

#[test]
fn bad_bundles_and_issuers_are_refused_and_traffic_is_unaffected() {
    let name = "bad_bundles_and_issuers_are_refused_and_traffic_is_unaffected";
    if netns::skip_unless_tools(name, &["wrk", "curl"]) {
        return;
    }
    let rig = rig_on(Mesh::start("rot-bad"), 1);
    let pids = rig.pids();
    let a = fp(&rig.mesh.pki.root.cert);
    let a_issuer = fp(&rig.mesh.pki.issuer.cert);
    let vip = service_ip(10).to_string();
    let wrk = start_wrk(&rig.clients[0].pod, &format!("http://{vip}/load"));
    std::thread::sleep(Duration::from_secs(1));
    let (bundle, issuer_cert, issuer_key) = (
        rig.mesh.pki.path("bundle.pem"),
        rig.mesh.pki.path("issuer.crt"),
        rig.mesh.pki.path("issuer.key"),
    );
    let unchanged = |what: &str| {
        for w in rig.workloads() {
            let st = w.state();
            assert_eq!(roots_of(&st), vec![a.clone()], "{what}: {}: {st}", w.pod.name());
            assert_eq!(
                st["certificate"]["issuer_fingerprint"],
                a_issuer.as_str(),
                "{what}: {st}"
            );
        }
        let (ok, doc, text) = rig.check(&rig.path("good-bundle.pem"), &rig.path("old-issuer.crt"));
        assert!(ok, "{what}: check: {text}");
        for s in doc["tls_endpoints"].as_array().expect("servers") {
            assert_eq!(s["issuer_fingerprint"], a_issuer.as_str(), "{what}: {s}");
        }
    };
    std::fs::write(rig.mesh.pki.path("old-issuer.crt"), &rig.mesh.pki.issuer.cert).expect("copy");
    std::fs::write(rig.mesh.pki.path("good-bundle.pem"), &rig.mesh.pki.root.cert).expect("copy");
    // Wait out one poll of the watchers (inotify is faster; the 5 s poll is the backstop).
    let settle = || std::thread::sleep(Duration::from_secs(6));

    // 1. A bundle of garbage, then a bundle whose "root" is not a CA.
    pki::write(&bundle, "this is not PEM at all\n");
    settle();
    unchanged("garbage bundle");
    let leaf_dir = rig.mesh.dir().join("leafbundle");
    std::fs::create_dir_all(&leaf_dir).expect("dir");
    let (leaf, _) = leaf_files(
        &leaf_dir,
        "leaf",
        &rig.mesh.pki.root.cert,
        &rig.mesh.pki.issuer,
        "spiffe://cluster.local/ns/default/sa/x",
    );
    let leaf_pem = std::fs::read_to_string(&leaf).expect("leaf");
    pki::write(
        &bundle,
        &leaf_pem[..leaf_pem.find("-----END CERTIFICATE-----").expect("end") + 26],
    );
    settle();
    unchanged("bundle holding a leaf");
    pki::write(&bundle, &rig.mesh.pki.root.cert);
    for p in [&rig.mesh.identity, &rig.server.proxy] {
        assert!(p.log().contains("trust bundle refused"), "{}", p.log());
    }

    // 2. An issuer whose key is not its certificate's (a new issuer, old key).
    let other = ca::new_issuer(&rig.mesh.pki.root.cert, &rig.mesh.pki.root.key, DAY).expect("issuer");
    pki::write(&issuer_cert, &other.cert);
    settle();
    unchanged("mismatched issuer key");
    assert!(
        rig.mesh.identity.log().contains("issuer key does not match"),
        "{}",
        rig.mesh.identity.log()
    );
    pki::write(&issuer_cert, &rig.mesh.pki.issuer.cert);

    // 3. An issuer (with its own key) under a root the bundle does not hold.
    let foreign_root = ca::new_root("cluster.local", DAY).expect("root");
    let foreign = ca::new_issuer(&foreign_root.cert, &foreign_root.key, DAY).expect("issuer");
    pki::write(&issuer_key, &foreign.key);
    pki::write(&issuer_cert, &foreign.cert);
    settle();
    unchanged("issuer under a foreign root");
    assert!(
        rig.mesh
            .identity
            .log()
            .contains("does not chain to any root of the trust bundle"),
        "{}",
        rig.mesh.identity.log()
    );
    let m = identity_metrics(&rig.mesh);
    assert!(
        metric_value(&m, "sidemesh_identity_issuer_reloads_total", &["result=\"refused\""]) >= 2.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "sidemesh_identity_ca_expiring", &[]),
        0.0,
        "nothing is near its end here: {m}"
    );
    assert!(
        metric_value(
            &m,
            "sidemesh_identity_ca_time_to_expiry_seconds",
            &["kind=\"issuer\"", &format!("fingerprint=\"{a_issuer}\"")]
        ) > 300.0 * 86400.0,
        "{m}"
    );
    pki::write(&issuer_key, &rig.mesh.pki.issuer.key);
    pki::write(&issuer_cert, &rig.mesh.pki.issuer.cert);

    // Traffic never noticed.
    let text = wrk.finish(true, Duration::from_secs(30));
    let (requests, failures) = wrk_counts(&text);
    eprintln!("refusals: wrk {requests} requests, {failures} failures");
    assert!(requests > 1000, "{text}");
    assert_eq!(failures, 0, "{text}");
    assert_eq!(rig.pids(), pids, "a process was replaced");
    // A fresh request still works end to end.
    let out = rig.clients[0].run("curl", &["-sS", "--max-time", "10", &format!("http://{vip}/after")], T);
    assert!(out.stdout.contains("name=web"), "{}{}", out.stdout, out.stderr);
}

/// Starts an identity service in the control-plane Pod as `Mesh::start`
/// does, with `--leaf-lifetime lifetime`.
fn start_identity(mesh: &Mesh, lifetime: &str) -> Proc {
    let p = |n: &str| mesh.pki.path(n).display().to_string();
    let listen = format!("0.0.0.0:{IDENTITY_PORT}");
    let reviewer = format!("file:{}", p("tokens.yaml"));
    let proc = mesh.cp.start(
        "identity",
        binary("sidemesh-identity"),
        &[
            "--listen",
            &listen,
            "--admin-addr",
            "0.0.0.0:9990",
            "--token-reviewer",
            &reviewer,
            "--trust-bundle",
            &p("bundle.pem"),
            "--issuer-cert",
            &p("issuer.crt"),
            "--issuer-key",
            &p("issuer.key"),
            "--leaf-lifetime",
            lifetime,
        ],
        &[],
    );
    assert!(
        mesh.cp.wait_listening(IDENTITY_PORT, Duration::from_secs(20)),
        "identity did not listen:\n{}",
        proc.log()
    );
    proc
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[test]
fn identity_outage_longer_than_a_renewal_keeps_proxies_serving_and_they_recover() {
    let name = "identity_outage_longer_than_a_renewal_keeps_proxies_serving_and_they_recover";
    if netns::skip_unless_tools(name, &["wrk", "curl"]) {
        return;
    }
    // Leaves of 150 s (backdated 60 s: 210 s of validity) are renewed at
    // 65–75% of that, 76–98 s after issue. The outage below covers that
    // point, and the certificates stay valid 150 s after issue, which leaves
    // room for the 30 s backoff cap once the service is back.
    let mut mesh = Mesh::start("rot-outage");
    // SIGTERM ends the WatchIssuer streams (the destination service holds
    // one), so the service stops at once instead of after its 30 s grace.
    assert!(
        mesh.identity.terminate(Duration::from_secs(10)).is_some(),
        "identity did not stop"
    );
    mesh.identity = start_identity(&mesh, "150s");
    let rig = rig_on(mesh, 1);
    let certs: Vec<(u64, u64)> = rig
        .workloads()
        .iter()
        .map(|w| {
            let st = w.state();
            (
                st["certificate"]["not_before_unix"].as_u64().expect("not_before"),
                st["certificate"]["expiry_unix"].as_u64().expect("expiry"),
            )
        })
        .collect();
    for (nb, na) in &certs {
        assert!(na - nb <= 215, "leaves should live 150 s + 60 s backdating: {nb} {na}");
    }
    let proxy_pids: Vec<u32> = rig.workloads().iter().map(|w| w.proxy.pid()).collect();
    let vip = service_ip(10).to_string();
    let wrk = start_wrk(&rig.clients[0].pod, &format!("http://{vip}/load"));

    // Down until every proxy is past the latest point it would have renewed at.
    let mut rig = rig;
    assert!(
        rig.mesh.identity.terminate(Duration::from_secs(10)).is_some(),
        "identity did not stop"
    );
    let down_at = unix_now();
    let renew_by = certs.iter().map(|(nb, na)| nb + (na - nb) * 3 / 4).max().unwrap_or(0) + 3;
    let earliest_expiry = certs.iter().map(|(_, na)| *na).min().unwrap_or(0);
    while unix_now() < renew_by {
        std::thread::sleep(Duration::from_secs(1));
    }
    let outage = unix_now() - down_at;
    // Past the renewal point and still serving on the certificates held.
    for (w, (_, na)) in rig.workloads().iter().zip(&certs) {
        let st = w.state();
        assert_eq!(st["certificate"]["expiry_unix"].as_u64(), Some(*na), "{st}");
        assert!(
            w.proxy
                .log()
                .contains("certification failed; the current certificate stays in use"),
            "{} did not try to renew during the outage:\n{}",
            w.pod.name(),
            w.proxy.log()
        );
    }
    let out = rig.clients[0].run("curl", &["-sS", "--max-time", "10", &format!("http://{vip}/outage")], T);
    assert!(
        out.stdout.contains("name=web"),
        "during the outage: {}{}",
        out.stdout,
        out.stderr
    );

    // Back: every proxy renews, before its certificate ends.
    rig.mesh.identity = start_identity(&rig.mesh, "150s");
    let back_at = unix_now();
    for (w, (_, na)) in rig.workloads().iter().zip(&certs) {
        wait_state(w, "a renewed certificate", Duration::from_secs(45), |st| {
            st["certificate"]["expiry_unix"].as_u64().is_some_and(|e| e > *na)
        });
    }
    let recovered = unix_now();
    assert!(
        recovered < earliest_expiry,
        "renewed only after the old certificates ended ({recovered} ≥ {earliest_expiry})"
    );
    let text = wrk.finish(true, Duration::from_secs(30));
    let (requests, failures) = wrk_counts(&text);
    eprintln!(
        "outage of {outage} s (renewal due during it), recovery {} s after return; wrk {requests} requests, {failures} failures",
        recovered - back_at
    );
    assert!(requests > 1000, "{text}");
    assert_eq!(failures, 0, "{text}");
    let now: Vec<u32> = rig.workloads().iter().map(|w| w.proxy.pid()).collect();
    assert_eq!(now, proxy_pids, "a proxy was replaced");
    for w in &mut rig.clients {
        assert!(w.proxy.is_running());
    }
}

// ---- offline `sidemesh check`: always run ----

fn sidemesh(args: &[&str]) -> (bool, String) {
    let (status, out, err) = sidemesh_tests::process::run("sidemesh", args, T);
    (status.success(), format!("{out}{err}"))
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn put(&self, name: &str, text: &str) -> String {
        let p: PathBuf = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }
}

#[test]
fn check_offline_verifies_the_chain_and_the_expiry_threshold() {
    let f = Files::new();
    let root = ca::new_root("cluster.local", 3650 * DAY).expect("root");
    let issuer = ca::new_issuer(&root.cert, &root.key, 365 * DAY).expect("issuer");
    let bundle = f.put("bundle.pem", &root.cert);
    let cert = f.put("issuer.crt", &issuer.cert);
    let key = f.put("issuer.key", &issuer.key);
    let (leaf, _) = leaf_files(
        f.dir.path(),
        "leaf",
        &root.cert,
        &issuer,
        "spiffe://cluster.local/ns/default/sa/web",
    );
    let (ok, out) = sidemesh(&[
        "check",
        "--bundle",
        &bundle,
        "--issuer",
        &cert,
        "--issuer-key",
        &key,
        "--leaf",
        &leaf,
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("check: OK") && out.contains("spiffe://cluster.local/ns/default/sa/web"),
        "{out}"
    );

    // The issuer ends within the threshold: non-zero, and says why.
    let (ok, out) = sidemesh(&["check", "--bundle", &bundle, "--issuer", &cert, "--threshold", "400d"]);
    assert!(!ok, "{out}");
    assert!(out.contains("expires in") && out.contains("threshold"), "{out}");
    // So does a root.
    let short_root = ca::new_root("cluster.local", 10 * DAY).expect("root");
    let short_bundle = f.put("short.pem", &short_root.cert);
    let (ok, out) = sidemesh(&["check", "--bundle", &short_bundle]);
    assert!(!ok && out.contains("root"), "{out}");

    // A key that is not the issuer's, an issuer under another root, a leaf
    // that does not verify: each is a problem.
    let other = ca::new_issuer(&root.cert, &root.key, 365 * DAY).expect("issuer");
    let wrong_key = f.put("wrong.key", &other.key);
    let (ok, out) = sidemesh(&[
        "check",
        "--bundle",
        &bundle,
        "--issuer",
        &cert,
        "--issuer-key",
        &wrong_key,
    ]);
    assert!(!ok && out.contains("does not match"), "{out}");
    let foreign_root = ca::new_root("cluster.local", 3650 * DAY).expect("root");
    let foreign = ca::new_issuer(&foreign_root.cert, &foreign_root.key, 365 * DAY).expect("issuer");
    let foreign_cert = f.put("foreign.crt", &foreign.cert);
    let (ok, out) = sidemesh(&["check", "--bundle", &bundle, "--issuer", &foreign_cert]);
    assert!(!ok && out.contains("does not chain"), "{out}");
    let foreign_bundle = f.put("foreign-bundle.pem", &foreign_root.cert);
    let (ok, out) = sidemesh(&["check", "--bundle", &foreign_bundle, "--leaf", &leaf]);
    assert!(!ok && out.contains("does not verify"), "{out}");

    // JSON for scripts.
    let (ok, out) = sidemesh(&["check", "--bundle", &bundle, "--issuer", &cert, "--output", "json"]);
    assert!(ok, "{out}");
    let doc: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["issuer"]["root_fingerprint"], fp(&root.cert).as_str());

    // Unreachable proxies are a problem, not a hang.
    let (ok, out) = sidemesh(&[
        "check",
        "--bundle",
        &bundle,
        "--proxies",
        "127.0.0.1:1",
        "--timeout",
        "2s",
    ]);
    assert!(!ok && out.contains("127.0.0.1:1"), "{out}");
    let (ok, out) = sidemesh(&["check"]);
    assert!(!ok && out.contains("nothing to check"), "{out}");
}

#[test]
fn rotate_refuses_to_start_without_what_it_needs() {
    let f = Files::new();
    let root = ca::new_root("cluster.local", 3650 * DAY).expect("root");
    let issuer = ca::new_issuer(&root.cert, &root.key, 365 * DAY).expect("issuer");
    let bundle = f.put("bundle.pem", &root.cert);
    let cert = f.put("issuer.crt", &issuer.cert);
    let key = f.put("issuer.key", &issuer.key);
    let state = f.dir.path().join("state").display().to_string();
    let (ok, out) = sidemesh(&["trust", "rotate", "--state-dir", &state, "--yes"]);
    assert!(!ok && out.contains("--local"), "{out}");
    let (ok, out) = sidemesh(&[
        "trust",
        "rotate",
        "--local",
        "--state-dir",
        &state,
        "--yes",
        "--bundle",
        &bundle,
    ]);
    assert!(!ok && out.contains("--issuer-cert"), "{out}");
    let base = [
        "trust",
        "rotate",
        "--local",
        "--state-dir",
        &state,
        "--bundle",
        &bundle,
        "--issuer-cert",
        &cert,
        "--issuer-key",
        &key,
    ];
    let (ok, out) = sidemesh(&[&base[..], &["--yes"]].concat());
    assert!(!ok && out.contains("nothing to watch"), "{out}");
    // Not a terminal and no --yes: it does not guess.
    let (ok, out) = sidemesh(&[&base[..], &["--proxies", "127.0.0.1:1"]].concat());
    assert!(!ok && out.contains("--yes"), "{out}");
    // An issuer that does not fit the bundle is refused before anything changes.
    let foreign_root = ca::new_root("cluster.local", DAY).expect("root");
    let foreign_bundle = f.put("foreign.pem", &foreign_root.cert);
    let (ok, out) = sidemesh(&[
        "trust",
        "rotate",
        "--local",
        "--state-dir",
        &state,
        "--bundle",
        &foreign_bundle,
        "--issuer-cert",
        &cert,
        "--issuer-key",
        &key,
        "--proxies",
        "127.0.0.1:1",
        "--yes",
    ]);
    assert!(!ok && out.contains("not usable with the bundle"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&foreign_bundle).expect("bundle"),
        foreign_root.cert
    );
    // With nobody answering, step 3 times out (bounded), keeping its progress.
    let (ok, out) = sidemesh(
        &[
            &base[..],
            &[
                "--proxies",
                "127.0.0.1:1",
                "--yes",
                "--timeout",
                "2s",
                "--poll",
                "200ms",
            ],
        ]
        .concat(),
    );
    assert!(!ok && out.contains("timed out") && out.contains("re-run"), "{out}");
    let saved: Value =
        serde_json::from_slice(&std::fs::read(Path::new(&state).join("state.json")).expect("state")).expect("json");
    assert_eq!(saved["done"], json!(["new-root", "publish-both"]), "{saved}");
    let published = TrustBundle::from_file(Path::new(&bundle)).expect("bundle");
    assert_eq!(published.roots().len(), 2, "A+B was published");
}

// ---- `sidemesh check --cluster` against a small fake API server ----

/// Serves what `sidemesh check --cluster` reads: the bundle ConfigMaps, the
/// issuer Secret, the Pod list, and each Pod's `/debug/state` through the
/// Pod proxy subresource. The answers live in `state`; requested paths are
/// recorded.
struct FakeApi {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<Value>>,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

impl FakeApi {
    fn start(state: Value) -> Self {
        use http_body_util::Full;
        use hyper::body::Bytes;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = std::sync::Arc::new(std::sync::Mutex::new(state));
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (st, rq) = (state.clone(), requests.clone());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (st, rq) = (st.clone(), rq.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (st, rq) = (st.clone(), rq.clone());
                        async move {
                            use http_body_util::BodyExt as _;
                            let method = req.method().as_str().to_owned();
                            let path = req.uri().path().to_owned();
                            rq.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(format!("{method} {}", req.uri()));
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let (code, answer) = {
                                let mut state = st.lock().unwrap_or_else(|p| p.into_inner());
                                fake_answer(&mut state, &method, &path, &patch)
                            };
                            let mut rsp = hyper::Response::new(Full::new(Bytes::from(answer.to_string())));
                            *rsp.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
                            rsp.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, std::convert::Infallible>(rsp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            state,
            requests,
            _rt: rt,
        }
    }

    fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: fake\n  user:\n    token: fake-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }
}

/// Merges a JSON merge patch's `data` into `object`.
fn merge_data(object: &mut Value, patch: &Value) {
    if let Some(data) = patch["data"].as_object() {
        for (k, v) in data {
            object["data"][k] = v.clone();
        }
    }
}

fn unb64(v: &Value) -> String {
    use base64::Engine as _;
    v.as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A proxy's `/debug/state` as a real one would have it: it trusts its
/// namespace's bundle, and holds a certificate from the issuer in the
/// Secret once that issuer chains to a root it trusts (else it keeps the
/// one it had).
fn simulated_state(state: &mut Value, ns: &str, name: &str) -> Option<Value> {
    let cms = state["configmaps"].as_array()?.clone();
    let pem = cms
        .iter()
        .find(|cm| cm["metadata"]["namespace"] == ns)
        .and_then(|cm| cm["data"]["ca-bundle.crt"].as_str())?
        .to_owned();
    let bundle = TrustBundle::from_pem(pem.as_bytes()).ok()?;
    let cert = unb64(&state["secret"]["data"]["tls.crt"]);
    let key = unb64(&state["secret"]["data"]["tls.key"]);
    let key_name = format!("{ns}/{name}");
    if let Ok(issuer) = sidemesh_identity::issuer::Issuer::from_pem(cert.as_bytes(), key.as_bytes(), &bundle) {
        state["held"][&key_name] = json!({ "issuer": issuer.fingerprint(), "root": issuer.root_fingerprint() });
    }
    let held = state["held"][&key_name].clone();
    Some(json!({
        "identity": format!("spiffe://cluster.local/ns/{ns}/sa/{name}"),
        "certificate": { "issuer_fingerprint": held["issuer"], "root_fingerprint": held["root"], "expiry_unix": 4_000_000_000u64 },
        "trusted_roots": bundle.fingerprints(),
    }))
}

fn fake_answer(state: &mut Value, method: &str, path: &str, patch: &Value) -> (u16, Value) {
    let list = |kind: &str, items: &Value| json!({ "kind": kind, "apiVersion": "v1", "metadata": { "resourceVersion": "1" }, "items": items });
    let not_found = || json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{path} not found") });
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("GET", ["api", "v1", "configmaps"]) => (200, list("ConfigMapList", &state["configmaps"])),
        ("GET", ["api", "v1", "pods"]) => (200, list("PodList", &state["pods"])),
        (
            "GET",
            [
                "api",
                "v1",
                "namespaces",
                "sidemesh-system",
                "secrets",
                "sidemesh-issuer",
            ],
        ) => (200, state["secret"].clone()),
        (
            "PATCH",
            [
                "api",
                "v1",
                "namespaces",
                "sidemesh-system",
                "secrets",
                "sidemesh-issuer",
            ],
        ) => {
            merge_data(&mut state["secret"], patch);
            (200, state["secret"].clone())
        }
        ("PATCH", ["api", "v1", "namespaces", ns, "configmaps", _]) => {
            let Some(cm) = state["configmaps"]
                .as_array_mut()
                .and_then(|a| a.iter_mut().find(|cm| cm["metadata"]["namespace"] == *ns))
            else {
                return (404, not_found());
            };
            merge_data(cm, patch);
            (200, cm.clone())
        }
        ("GET", ["api", "v1", "namespaces", ns, "pods", pod, "proxy", "debug", "state"]) => {
            let Some(name) = pod.strip_suffix(":15020") else {
                return (404, not_found());
            };
            if state["simulate"] == true {
                return match simulated_state(state, ns, name) {
                    Some(doc) => (200, doc),
                    None => (404, not_found()),
                };
            }
            match state["states"].get(format!("{ns}/{name}")) {
                Some(doc) => (200, doc.clone()),
                None => (404, not_found()),
            }
        }
        _ => (404, not_found()),
    }
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn check_cluster_reads_configmaps_secret_and_proxies_through_the_api_server() {
    let root_a = ca::new_root("cluster.local", 3650 * DAY).expect("root");
    let root_b = ca::new_root("cluster.local", 3650 * DAY).expect("root");
    let issuer = ca::new_issuer(&root_a.cert, &root_a.key, 365 * DAY).expect("issuer");
    let (a, b, i) = (fp(&root_a.cert), fp(&root_b.cert), fp(&issuer.cert));
    let cm = |ns: &str, pem: &str| json!({ "kind": "ConfigMap", "apiVersion": "v1", "metadata": { "name": "sidemesh-trust-bundle", "namespace": ns }, "data": { "ca-bundle.crt": pem } });
    let pod = |ns: &str, name: &str, injected: bool, phase: &str| {
        let annotations = if injected {
            json!({ "sidemesh.io/injected": "true" })
        } else {
            json!({})
        };
        json!({ "metadata": { "name": name, "namespace": ns, "annotations": annotations }, "status": { "phase": phase } })
    };
    let proxy_state = |sa: &str, roots: &[&str]| {
        json!({
            "identity": format!("spiffe://cluster.local/ns/x/sa/{sa}"),
            "certificate": { "issuer_fingerprint": i, "root_fingerprint": a, "expiry_unix": 4_000_000_000u64 },
            "trusted_roots": roots,
        })
    };
    let api = FakeApi::start(json!({
        "configmaps": [cm("sidemesh-system", &root_a.cert), cm("shop", &root_a.cert)],
        "secret": { "kind": "Secret", "apiVersion": "v1", "metadata": { "name": "sidemesh-issuer", "namespace": "sidemesh-system" },
                    "type": "kubernetes.io/tls", "data": { "tls.crt": b64(&issuer.cert), "tls.key": b64(&issuer.key) } },
        "pods": [pod("shop", "web-1", true, "Running"), pod("default", "front-1", true, "Running"),
                 pod("default", "plain", false, "Running"), pod("default", "starting", true, "Pending")],
        "states": { "shop/web-1": proxy_state("web", &[&a]), "default/front-1": proxy_state("front", &[&a]) },
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path());
    let check = || {
        let mut cmd = Command::new(binary("sidemesh"));
        cmd.args(["check", "--cluster", "--output", "json", "--timeout", "5s"])
            .env("KUBECONFIG", &kubeconfig)
            .env("NO_COLOR", "1");
        let out = run_bounded(&mut cmd, T).expect("sidemesh check --cluster");
        let doc: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        (out.success(), doc, format!("{}{}", out.stdout, out.stderr))
    };

    let (ok, doc, text) = check();
    assert!(ok, "{text}");
    assert_eq!(
        doc["bundle"]["source"], "configmap sidemesh-system/sidemesh-trust-bundle",
        "{text}"
    );
    assert_eq!(doc["issuer"]["fingerprint"], i.as_str(), "{text}");
    assert_eq!(doc["configmaps"]["agreeing"], 2, "{text}");
    assert_eq!(doc["proxies"]["total"], 2, "only running, injected Pods: {text}");
    assert_eq!(doc["proxies"]["agreeing"], 2, "{text}");
    let asked = api.requests.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        asked
            .iter()
            .any(|p| p.starts_with("GET /api/v1/namespaces/shop/pods/web-1:15020/proxy/debug/state")),
        "{asked:?}"
    );

    // Mid-rotation, half done: one namespace and one proxy already have A+B.
    let both = format!("{}{}", root_a.cert, root_b.cert);
    {
        let mut st = api.state.lock().unwrap_or_else(|p| p.into_inner());
        st["configmaps"] = json!([cm("sidemesh-system", &root_a.cert), cm("shop", &both)]);
        st["states"]["shop/web-1"] = proxy_state("web", &[&a, &b]);
    }
    let (ok, doc, text) = check();
    assert!(!ok, "{text}");
    assert_eq!(doc["configmaps"]["agreeing"], 1, "{text}");
    assert_eq!(doc["proxies"]["agreeing"], 1, "{text}");
    assert_eq!(doc["proxies"]["trusted_roots"][b.as_str()], 1, "{text}");
    let problems = doc["problems"].to_string();
    assert!(
        problems.contains("namespace shop") && problems.contains("shop/web-1"),
        "{text}"
    );

    // A Pod whose proxy does not answer is a problem, not a hang.
    {
        let mut st = api.state.lock().unwrap_or_else(|p| p.into_inner());
        st["configmaps"] = json!([cm("sidemesh-system", &root_a.cert), cm("shop", &root_a.cert)]);
        st["states"] = json!({ "shop/web-1": proxy_state("web", &[&a]) });
    }
    let (ok, doc, text) = check();
    assert!(!ok, "{text}");
    assert!(doc["problems"].to_string().contains("default/front-1"), "{text}");
}

#[test]
fn rotate_against_a_cluster_patches_configmaps_and_the_secret_and_follows_the_pods() {
    let root_a = ca::new_root("cluster.local", 3650 * DAY).expect("root");
    let issuer_a = ca::new_issuer(&root_a.cert, &root_a.key, 365 * DAY).expect("issuer");
    let (a, ia) = (fp(&root_a.cert), fp(&issuer_a.cert));
    let cm = |ns: &str, pem: &str, labels: Value| {
        json!({ "kind": "ConfigMap", "apiVersion": "v1",
                "metadata": { "name": "sidemesh-trust-bundle", "namespace": ns, "labels": labels },
                "data": { "ca-bundle.crt": pem } })
    };
    let pod = |ns: &str, name: &str| {
        json!({ "metadata": { "name": name, "namespace": ns, "annotations": { "sidemesh.io/injected": "true" } },
                "status": { "phase": "Running" } })
    };
    let held = json!({ "issuer": ia, "root": a });
    let cluster = |labels: Value| {
        json!({
            "simulate": true,
            "configmaps": [cm("sidemesh-system", &root_a.cert, json!({})), cm("shop", &root_a.cert, labels),
                           cm("default", &root_a.cert, json!({}))],
            "secret": { "kind": "Secret", "apiVersion": "v1",
                        "metadata": { "name": "sidemesh-issuer", "namespace": "sidemesh-system" },
                        "type": "kubernetes.io/tls",
                        "data": { "tls.crt": b64(&issuer_a.cert), "tls.key": b64(&issuer_a.key) } },
            "pods": [pod("shop", "web-1"), pod("default", "front-1")],
            "held": { "shop/web-1": held, "default/front-1": held },
        })
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let rotate = |api: &FakeApi, state: &Path| {
        let kubeconfig = api.kubeconfig(dir.path());
        let mut cmd = Command::new(binary("sidemesh"));
        cmd.args([
            "trust",
            "rotate",
            "--yes",
            "--timeout",
            "20s",
            "--poll",
            "100ms",
            "--renew-jitter",
            "1s",
            "--state-dir",
        ])
        .arg(state)
        .env("KUBECONFIG", &kubeconfig)
        .env("NO_COLOR", "1");
        let out = run_bounded(&mut cmd, Duration::from_secs(60)).expect("sidemesh trust rotate");
        (out.success(), format!("{}{}", out.stdout, out.stderr))
    };

    // ConfigMaps that trust-manager writes are not ours to patch.
    let managed = FakeApi::start(cluster(
        json!({ "trust.cert-manager.io/bundle": "sidemesh-trust-bundle" }),
    ));
    let (ok, out) = rotate(&managed, &dir.path().join("managed"));
    assert!(!ok && out.contains("trust-manager"), "{out}");
    let asked = managed.requests.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(!asked.iter().any(|r| r.starts_with("PATCH")), "{asked:?}");

    let api = FakeApi::start(cluster(json!({})));
    let state_dir = dir.path().join("state");
    let (ok, out) = rotate(&api, &state_dir);
    assert!(ok, "{out}");
    assert!(out.contains("2 of 2 proxies trust the new root"), "{out}");
    assert!(out.contains("rotation complete"), "{out}");
    let b = fp(&std::fs::read_to_string(state_dir.join("new-root.crt")).expect("root"));
    let ib = fp(&std::fs::read_to_string(state_dir.join("new-issuer.crt")).expect("issuer"));
    let st = api.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for cm in st["configmaps"].as_array().expect("configmaps") {
        let bundle =
            TrustBundle::from_pem(cm["data"]["ca-bundle.crt"].as_str().unwrap_or("").as_bytes()).expect("bundle");
        assert_eq!(
            bundle.fingerprints(),
            vec![b.clone()],
            "{}",
            cm["metadata"]["namespace"]
        );
    }
    assert_eq!(fp(&unb64(&st["secret"]["data"]["tls.crt"])), ib);
    assert_eq!(st["held"]["shop/web-1"]["root"], b.as_str());
    let asked = api.requests.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let patches: Vec<&String> = asked.iter().filter(|r| r.starts_with("PATCH")).collect();
    // Three namespaces twice (A+B, then B), and the Secret once.
    assert_eq!(patches.len(), 7, "{patches:?}");
    assert!(
        asked
            .iter()
            .any(|r| r.contains("/pods/front-1:15020/proxy/debug/state")),
        "{asked:?}"
    );
}

#[test]
fn identity_warns_when_its_issuer_or_a_root_nears_its_end() {
    use sidemesh_tests::process::http_get;
    let dir = tempfile::tempdir().expect("tempdir");
    // An issuer with 10 days left, and a second root with 20 days left.
    let pki = sidemesh_tests::pki::Pki::with_issuer_lifetime(dir.path(), 10 * DAY);
    let short_root = ca::new_root("cluster.local", 20 * DAY).expect("root");
    pki::write(
        &pki.path("bundle.pem"),
        &format!("{}{}", pki.root.cert, short_root.cert),
    );
    pki::write(&pki.path("tokens.yaml"), &pki::token_line("t", "default", "x"));
    let admin = format!("127.0.0.1:{}", sidemesh_tests::free_port());
    let listen = format!("127.0.0.1:{}", sidemesh_tests::free_port());
    let p = |n: &str| pki.path(n).display().to_string();
    let reviewer = format!("file:{}", p("tokens.yaml"));
    let mut identity = Proc::start(
        "sidemesh-identity",
        &[
            "--listen",
            &listen,
            "--admin-addr",
            &admin,
            "--token-reviewer",
            &reviewer,
            "--trust-bundle",
            &p("bundle.pem"),
            "--issuer-cert",
            &p("issuer.crt"),
            "--issuer-key",
            &p("issuer.key"),
        ],
        &[],
        dir.path(),
    );
    identity.wait_ready(&admin, T);
    let m = http_get(&admin, "/metrics").map(|(_, b)| b).unwrap_or_default();
    assert_eq!(
        metric_value(&m, "sidemesh_identity_ca_expiring", &["kind=\"issuer\""]),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "sidemesh_identity_ca_expiring", &["kind=\"root\""]),
        1.0,
        "{m}"
    );
    let issuer_left = metric_value(
        &m,
        "sidemesh_identity_ca_time_to_expiry_seconds",
        &["kind=\"issuer\"", &format!("fingerprint=\"{}\"", fp(&pki.issuer.cert))],
    );
    assert!(issuer_left > 9.0 * 86400.0 && issuer_left <= 10.0 * 86400.0, "{m}");
    let root_left = metric_value(
        &m,
        "sidemesh_identity_ca_time_to_expiry_seconds",
        &["kind=\"root\"", &format!("fingerprint=\"{}\"", fp(&short_root.cert))],
    );
    assert!(root_left > 19.0 * 86400.0 && root_left <= 20.0 * 86400.0, "{m}");
    let log = identity.log();
    assert!(log.contains("issuer expires within 30 days"), "{log}");
    assert!(log.contains("root expires within 30 days"), "{log}");
    // The short root leaves the bundle: it is no longer reported.
    pki::write(&pki.path("bundle.pem"), &pki.root.cert);
    let deadline = Instant::now() + T;
    loop {
        let m = http_get(&admin, "/metrics").map(|(_, b)| b).unwrap_or_default();
        if metric_value(&m, "sidemesh_identity_ca_expiring", &["kind=\"root\""]) == 0.0 {
            assert!(!m.contains(&fp(&short_root.cert)), "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "the bundle change was not reflected: {m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
