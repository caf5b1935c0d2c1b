//! The destination service, driven as proxies drive it: the real
//! `sidemesh-identity` and `sidemesh-destination` binaries, a workload
//! certificate from the identity service, and the `Discover` stream over
//! mutual TLS. Sources: a YAML file, and the stand-in Kubernetes API server
//! (real list/watch protocol, dropped and expired watches).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{Value, json};
use sidemesh_identity_client::manager::{CertManager, CertManagerConfig};
use sidemesh_identity_client::tls::CurrentCert;
use sidemesh_identity_client::verify::ServerIdVerifier;
use sidemesh_identity_client::{SpiffeId, TrustBundle, TrustStore};
use sidemesh_proto::destination::v1 as pb;
use sidemesh_proto::destination::v1::destination_client::DestinationClient;
use sidemesh_proto::destination::v1::{
    DiscoveryRequest, DiscoveryResponse, Endpoint, discovery_request, discovery_response,
};
use sidemesh_tests::apiserver::ApiServer;
use sidemesh_tests::free_port;
use sidemesh_tests::objects::{httproute, rule};
use sidemesh_tests::pki::{self, Pki};
use sidemesh_tests::process::{Proc, http_get, metric_value, run};
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::{Channel, Endpoint as GrpcEndpoint};

const IDENTITY_ID: &str = "spiffe://cluster.local/ns/sidemesh-system/sa/sidemesh-identity";
const DESTINATION_ID: &str = "spiffe://cluster.local/ns/sidemesh-system/sa/sidemesh-destination";
const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";
/// The longest any expected update may take (the goal is well under 1 s).
const UPDATE_WITHIN: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------- objects

fn service(ns: &str, name: &str, ip: &str, ports: &[(&str, u16)], annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": ns, "annotations": annotations },
        "spec": {
            "clusterIP": ip, "clusterIPs": [ip],
            "ports": ports.iter().map(|(n, p)| json!({ "name": n, "port": p, "protocol": "TCP" })).collect::<Vec<_>>(),
        },
    })
}

/// An EndpointSlice of `svc` with `(ip, pod, ready)` endpoints.
fn slice(ns: &str, name: &str, svc: &str, ports: &[(&str, u16)], endpoints: &[(&str, &str, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": name, "namespace": ns, "labels": { "kubernetes.io/service-name": svc } },
        "addressType": "IPv4",
        "ports": ports.iter().map(|(n, p)| json!({ "name": n, "port": p, "protocol": "TCP" })).collect::<Vec<_>>(),
        "endpoints": endpoints.iter().map(|(ip, pod, ready)| json!({
            "addresses": [ip],
            "conditions": { "ready": ready, "serving": ready, "terminating": false },
            "targetRef": { "kind": "Pod", "name": pod, "namespace": ns },
        })).collect::<Vec<_>>(),
    })
}

fn pod(ns: &str, name: &str, ip: &str, sa: &str, meshed: bool) -> Value {
    let annotations = if meshed {
        json!({ "sidemesh.io/injected": "true" })
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "annotations": annotations },
        "spec": { "serviceAccountName": sa, "containers": [{ "name": "app", "image": "app" }] },
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }],
            "conditions": [{ "type": "Ready", "status": "True" }],
        },
    })
}

/// The shop: `web` (10.96.0.10:80 → 8080, two ready endpoints and one not
/// ready), `db` (10.96.0.20:5432, opaque), and their Pods.
fn shop() -> Vec<Value> {
    vec![
        service("shop", "web", "10.96.0.10", &[("http", 80), ("admin", 81)], json!({})),
        slice(
            "shop",
            "web-abc",
            "web",
            &[("http", 8080), ("admin", 9000)],
            &[
                ("10.1.0.1", "web-1", true),
                ("10.1.0.2", "web-2", true),
                ("10.1.0.3", "web-3", false),
            ],
        ),
        pod("shop", "web-1", "10.1.0.1", "web", true),
        pod("shop", "web-2", "10.1.0.2", "", true),
        pod("shop", "web-3", "10.1.0.3", "web", true),
        service(
            "shop",
            "db",
            "10.96.0.20",
            &[("", 5432)],
            json!({ "config.sidemesh.io/opaque-ports": "5432" }),
        ),
        slice("shop", "db-xyz", "db", &[("", 5432)], &[("10.1.0.9", "db-0", true)]),
        pod("shop", "db-0", "10.1.0.9", "db", false),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "name": "web", "namespace": "shop" },
            "spec": { "parentRefs": [{ "kind": "Service", "name": "web", "port": 80 }] },
        }),
    ]
}

/// A multi-document YAML file of objects (JSON is YAML).
fn yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{}\n", serde_json::to_string_pretty(o).unwrap_or_default()))
        .collect()
}

// ---------------------------------------------------------------- processes

struct Mesh {
    identity: Proc,
    identity_addr: String,
    pki: Pki,
    dir: tempfile::TempDir,
}

impl Mesh {
    fn start() -> Self {
        sidemesh_identity_client::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(dir.path());
        pki::write(
            &pki.path("tokens.yaml"),
            &(pki::token_line("token-of-destination", "sidemesh-system", "sidemesh-destination")
                + &pki::token_line("token-of-frontend", "default", "frontend")),
        );
        std::fs::write(pki.path("destination.token"), "token-of-destination\n").expect("token");
        std::fs::write(pki.path("frontend.token"), "token-of-frontend\n").expect("token");
        let identity_addr = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let p = |n: &str| pki.path(n).display().to_string();
        let reviewer = format!("file:{}", p("tokens.yaml"));
        let args = [
            "--listen",
            &identity_addr,
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
        ];
        let mut identity = Proc::start("sidemesh-identity", &args, &[], dir.path());
        identity.wait_ready(&admin, Duration::from_secs(20));
        Self {
            identity,
            identity_addr,
            pki,
            dir,
        }
    }

    fn trust(&self) -> TrustStore {
        TrustStore::new(TrustBundle::from_pem(self.pki.root.cert.as_bytes()).expect("bundle"))
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SIDEMESH_IDENTITY_ADDR".into(), self.identity_addr.clone()),
            (
                "SIDEMESH_TOKEN_PATH".into(),
                self.pki.path("destination.token").display().to_string(),
            ),
            (
                "SIDEMESH_TRUST_BUNDLE".into(),
                self.pki.path("bundle.pem").display().to_string(),
            ),
        ]
    }

    /// Starts the destination service with `source` and waits until ready.
    fn destination(&self, source: &str, extra_args: &[&str], extra_env: &[(&str, &str)]) -> Destination {
        let d = self.destination_unready(source, extra_args, extra_env);
        let mut d = d;
        d.proc.wait_ready(&d.admin, Duration::from_secs(30));
        d
    }

    fn destination_unready(&self, source: &str, extra_args: &[&str], extra_env: &[(&str, &str)]) -> Destination {
        let addr = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["--listen", &addr, "--admin-addr", &admin, "--source", source];
        args.extend(extra_args);
        let mut env = self.env();
        env.extend(extra_env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let proc = Proc::start("sidemesh-destination", &args, &env, self.dir.path());
        Destination { proc, addr, admin }
    }

    /// A workload certificate for `frontend`, as a proxy holds one.
    async fn frontend_cert(&self) -> CertManager {
        let manager = CertManager::spawn(CertManagerConfig {
            identity_addr: self.identity_addr.clone(),
            identity_server_id: IDENTITY_ID.parse().expect("id"),
            token_path: self.pki.path("frontend.token"),
            workload_id: FRONTEND.parse::<SpiffeId>().expect("id"),
            trust: self.trust(),
            renew_jitter: Duration::from_secs(1),
        });
        tokio::time::timeout(Duration::from_secs(10), manager.ready())
            .await
            .expect("frontend certified within 10s");
        manager
    }
}

struct Destination {
    proc: Proc,
    addr: String,
    admin: String,
}

impl Destination {
    fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// Waits (bounded) until a metric satisfies `ok`: a client may see an
    /// update a moment before the server has counted it.
    async fn wait_metric(&self, name: &str, needles: &[&str], ok: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.metrics();
            if ok(metric_value(&m, name, needles)) {
                return;
            }
            assert!(Instant::now() < deadline, "{name} {needles:?}: {m}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How the client authenticates.
enum ClientCert {
    /// The workload certificate from a manager.
    Workload(CertManager),
    /// A fixed chain and key.
    Fixed(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    /// None.
    Anonymous,
}

/// A gRPC channel over mTLS to the destination service, verifying that it
/// presents `DESTINATION_ID`, as a proxy connects.
fn channel(addr: &str, trust: TrustStore, cert: ClientCert) -> Channel {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerIdVerifier::new(
            trust,
            DESTINATION_ID.parse().expect("id"),
        )));
    let mut config = match cert {
        ClientCert::Workload(m) => builder.with_client_cert_resolver(Arc::new(CurrentCert::new(m.subscribe()))),
        ClientCert::Fixed(chain, key) => builder.with_client_auth_cert(chain, key).expect("client cert"),
        ClientCert::Anonymous => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = addr.to_owned();
    GrpcEndpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let connector = connector.clone();
            let target = target.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                let name = ServerName::try_from("sidemesh-destination.sidemesh-system.svc").expect("name");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
}

/// One Discover stream.
struct Discover {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
    /// Answers for other targets read while waiting for one.
    backlog: std::collections::VecDeque<DiscoveryResponse>,
}

impl Discover {
    async fn open(channel: Channel) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(64);
        let mut client = DestinationClient::new(channel);
        let rsp = tokio::time::timeout(
            Duration::from_secs(10),
            client.discover(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("opening the stream took over 10s"))??;
        Ok(Self {
            tx,
            rx: rsp.into_inner(),
            backlog: Default::default(),
        })
    }

    async fn send(&self, request: discovery_request::Request) {
        self.tx
            .send(DiscoveryRequest { request: Some(request) })
            .await
            .expect("request stream open");
    }

    async fn subscribe(&self, target: &str) {
        self.send(discovery_request::Request::Subscribe(target.to_owned()))
            .await;
    }

    /// The next message, or the stream's end (`Ok(None)`) or error, within `within`.
    async fn next(&mut self, within: Duration) -> Result<Option<DiscoveryResponse>, tonic::Status> {
        tokio::time::timeout(within, self.rx.message())
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded(format!("nothing within {within:?}"))))
    }

    /// Reads until an answer for `target` satisfies `want`.
    async fn until(
        &mut self,
        target: &str,
        within: Duration,
        want: impl Fn(&discovery_response::Result) -> bool,
    ) -> discovery_response::Result {
        let deadline = Instant::now() + within;
        let mut last = None;
        let mut kept = std::collections::VecDeque::new();
        while let Some(rsp) = self.backlog.pop_front() {
            if rsp.target != target {
                kept.push_back(rsp);
                continue;
            }
            let result = rsp.result.expect("every answer has a result");
            if want(&result) {
                kept.extend(self.backlog.drain(..));
                self.backlog = kept;
                return result;
            }
            last = Some(result);
        }
        self.backlog = kept;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Ok(Some(rsp)) if rsp.target == target => {
                    let result = rsp.result.expect("every answer has a result");
                    if want(&result) {
                        return result;
                    }
                    last = Some(result);
                }
                Ok(Some(rsp)) => self.backlog.push_back(rsp),
                other => panic!("waiting for {target}: {other:?}; last state: {last:#?}"),
            }
        }
    }
}

fn endpoints(r: &discovery_response::Result) -> Vec<Endpoint> {
    match r {
        discovery_response::Result::Service(s) => s
            .default_backend
            .as_ref()
            .map(|b| b.endpoints.clone())
            .unwrap_or_default(),
        other => panic!("not a service: {other:?}"),
    }
}

fn addresses(r: &discovery_response::Result) -> Vec<String> {
    match r {
        discovery_response::Result::Service(_) => endpoints(r).iter().map(|e| e.address.clone()).collect(),
        _ => Vec::new(),
    }
}

fn is_service(r: &discovery_response::Result) -> bool {
    matches!(r, discovery_response::Result::Service(_))
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_source_resolves_services_pods_and_unknown_addresses() {
    let mesh = Mesh::start();
    let file = mesh.dir.path().join("mesh.yaml");
    pki::write(&file, &yaml(&shop()));
    let dest = mesh.destination(&format!("file:{}", file.display()), &[], &[]);
    let cert = mesh.frontend_cert().await;
    let mut d = Discover::open(channel(&dest.addr, mesh.trust(), ClientCert::Workload(cert)))
        .await
        .expect("stream");

    d.subscribe("10.96.0.10:80").await;
    let web = d.until("10.96.0.10:80", UPDATE_WITHIN, |_| true).await;
    let discovery_response::Result::Service(svc) = &web else {
        panic!("{web:?}")
    };
    assert_eq!(
        (svc.namespace.as_str(), svc.name.as_str(), svc.port),
        ("shop", "web", 80)
    );
    assert!(!svc.opaque);
    let backend = svc.default_backend.as_ref().expect("backend");
    assert_eq!(backend.key, "shop/web:80");
    let eps: Vec<(String, u32, String, bool, String, bool)> = backend
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.clone(),
                e.port,
                e.identity.clone(),
                e.meshed,
                e.pod.clone(),
                e.ready,
            )
        })
        .collect();
    assert_eq!(
        eps,
        vec![
            (
                "10.1.0.1".into(),
                8080,
                "spiffe://cluster.local/ns/shop/sa/web".into(),
                true,
                "web-1".into(),
                true
            ),
            (
                "10.1.0.2".into(),
                8080,
                "spiffe://cluster.local/ns/shop/sa/default".into(),
                true,
                "web-2".into(),
                true
            ),
        ],
        "ready endpoints only, targetPort by port name, identity from the ServiceAccount"
    );
    let budget = svc.retry_budget.as_ref().expect("budget");
    assert_eq!((budget.ratio, budget.min_retries_per_second), (0.2, 10));

    // The second Service port maps to the second slice port.
    d.subscribe("10.96.0.10:81").await;
    let admin = d.until("10.96.0.10:81", UPDATE_WITHIN, |_| true).await;
    assert!(endpoints(&admin).iter().all(|e| e.port == 9000), "{admin:?}");

    // Opaque Service port; a non-meshed endpoint has no identity.
    d.subscribe("10.96.0.20:5432").await;
    let db = d.until("10.96.0.20:5432", UPDATE_WITHIN, |_| true).await;
    let discovery_response::Result::Service(db_svc) = &db else {
        panic!("{db:?}")
    };
    assert!(db_svc.opaque, "opaque-ports annotation");
    assert_eq!(endpoints(&db)[0].identity, "");
    assert!(!endpoints(&db)[0].meshed);

    // A Pod IP, on any port.
    d.subscribe("10.1.0.1:8080").await;
    let p = d.until("10.1.0.1:8080", UPDATE_WITHIN, |_| true).await;
    let discovery_response::Result::Pod(p) = p else {
        panic!("{p:?}")
    };
    assert_eq!(p.identity, "spiffe://cluster.local/ns/shop/sa/web");
    assert!(p.meshed && p.ready);
    assert_eq!(
        (p.address.as_str(), p.port, p.pod.as_str()),
        ("10.1.0.1", 8080, "web-1")
    );

    // Unknown: not in the mesh's view, and a Service IP on a port it does not serve.
    for unknown in ["192.0.2.7:443", "10.96.0.10:8080"] {
        d.subscribe(unknown).await;
        let u = d.until(unknown, UPDATE_WITHIN, |_| true).await;
        assert!(matches!(u, discovery_response::Result::Unknown(_)), "{unknown}: {u:?}");
    }
    // Targets come back in canonical form.
    d.subscribe("[::ffff:10.96.0.10]:80").await;
    d.until("10.96.0.10:80", UPDATE_WITHIN, is_service).await;

    let m = dest.metrics();
    assert_eq!(metric_value(&m, "sidemesh_destination_subscriptions", &[]), 6.0, "{m}");
    dest.wait_metric("sidemesh_destination_updates_total", &["result=\"service\""], |v| {
        v >= 4.0
    })
    .await;
    assert_eq!(
        metric_value(&m, "sidemesh_destination_source_synced", &["source=\"file\""]),
        1.0
    );
    assert_eq!(
        metric_value(&m, "sidemesh_destination_index_objects", &["kind=\"Pod\""]),
        4.0
    );
    drop(d);
    // Subscriptions are released when the stream goes away.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_value(&dest.metrics(), "sidemesh_destination_subscriptions", &[]) != 0.0 {
        assert!(
            Instant::now() < deadline,
            "subscriptions not released: {}",
            dest.metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edits_reach_subscribers_and_a_broken_file_keeps_the_last_good_state() {
    let mesh = Mesh::start();
    let file = mesh.dir.path().join("mesh.yaml");
    let mut objects = shop();
    pki::write(&file, &yaml(&objects));
    let dest = mesh.destination(&format!("file:{}", file.display()), &[], &[]);
    let cert = mesh.frontend_cert().await;
    let ch = channel(&dest.addr, mesh.trust(), ClientCert::Workload(cert));
    let mut d = Discover::open(ch.clone()).await.expect("stream");
    d.subscribe("10.96.0.10:80").await;
    d.subscribe("10.1.0.4:8080").await;
    d.until("10.96.0.10:80", UPDATE_WITHIN, is_service).await;
    d.until("10.1.0.4:8080", UPDATE_WITHIN, |r| {
        matches!(r, discovery_response::Result::Unknown(_))
    })
    .await;

    // Scale up: web-3 becomes ready and a new meshed Pod web-4 joins.
    objects[1] = slice(
        "shop",
        "web-abc",
        "web",
        &[("http", 8080), ("admin", 9000)],
        &[
            ("10.1.0.1", "web-1", true),
            ("10.1.0.2", "web-2", true),
            ("10.1.0.3", "web-3", true),
            ("10.1.0.4", "web-4", true),
        ],
    );
    objects.push(pod("shop", "web-4", "10.1.0.4", "web", true));
    let edited = Instant::now();
    pki::write(&file, &yaml(&objects));
    let r = d
        .until("10.96.0.10:80", UPDATE_WITHIN, |r| addresses(r).len() == 4)
        .await;
    let took = edited.elapsed();
    eprintln!("file edit reached the subscriber in {took:?}");
    assert!(
        took < Duration::from_millis(1500),
        "update took {took:?}; the goal is well within 1 s"
    );
    assert!(
        endpoints(&r)
            .iter()
            .all(|e| e.meshed && e.identity.ends_with("/sa/web") || e.pod == "web-2")
    );
    d.until(
        "10.1.0.4:8080",
        UPDATE_WITHIN,
        |r| matches!(r, discovery_response::Result::Pod(p) if p.pod == "web-4" && p.meshed),
    )
    .await;
    dest.wait_metric("sidemesh_destination_update_lag_seconds_count", &[], |v| v >= 2.0)
        .await;

    // A broken file is refused: no update, and new subscribers see the old state.
    pki::write(&file, "apiVersion: v1\nkind: Service\nmetadata: { name: [oops\n");
    match d.next(Duration::from_millis(800)).await {
        Err(s) if s.code() == Code::DeadlineExceeded => {}
        other => panic!("no update expected for a broken file: {other:?}"),
    }
    let mut fresh = Discover::open(ch.clone()).await.expect("stream");
    fresh.subscribe("10.96.0.10:80").await;
    let r = fresh.until("10.96.0.10:80", UPDATE_WITHIN, |_| true).await;
    assert_eq!(addresses(&r).len(), 4, "last good state kept");
    let m = dest.metrics();
    assert!(
        metric_value(
            &m,
            "sidemesh_destination_source_errors_total",
            &["source=\"file\"", "kind=\"parse\""]
        ) >= 1.0,
        "{m}"
    );

    // A file that parses but has a bad object is refused too.
    pki::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: { name: x }\nspec: { ports: [{ port: eighty }] }\n",
    );
    // Fixing the file applies again: deleting the Service makes it unknown.
    tokio::time::sleep(Duration::from_millis(300)).await;
    objects.remove(0);
    pki::write(&file, &yaml(&objects));
    d.until("10.96.0.10:80", UPDATE_WITHIN, |r| {
        matches!(r, discovery_response::Result::Unknown(_))
    })
    .await;
    assert!(dest.proc.log().contains("source file refused"), "refusals are logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_source_lists_watches_and_resumes_dropped_and_expired_watches() {
    let mesh = Mesh::start();
    let api = ApiServer::start(mesh.dir.path()).await.expect("stand-in API server");
    for o in shop() {
        api.create(o).expect("create");
    }
    api.create(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop" } }))
        .expect("namespace");
    let kubeconfig = api.kubeconfig.display().to_string();
    let dest = mesh.destination("kubernetes", &[], &[("KUBECONFIG", &kubeconfig)]);
    let cert = mesh.frontend_cert().await;
    let mut d = Discover::open(channel(&dest.addr, mesh.trust(), ClientCert::Workload(cert)))
        .await
        .expect("stream");
    d.subscribe("10.96.0.10:80").await;
    let r = d
        .until("10.96.0.10:80", UPDATE_WITHIN, |r| addresses(r).len() == 2)
        .await;
    assert_eq!(endpoints(&r)[0].identity, "spiffe://cluster.local/ns/shop/sa/web");
    let lists: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET /api"))
        .collect();
    for path in [
        "GET /api/v1/services",
        "GET /api/v1/pods",
        "GET /apis/discovery.k8s.io/v1/endpointslices",
        "GET /apis/gateway.networking.k8s.io/v1/httproutes",
    ] {
        assert!(lists.iter().any(|r| r == path), "{path} not requested: {lists:?}");
    }

    // A watch event: web-3 becomes ready.
    let ready3 = |ready: bool| {
        slice(
            "shop",
            "web-abc",
            "web",
            &[("http", 8080), ("admin", 9000)],
            &[
                ("10.1.0.1", "web-1", true),
                ("10.1.0.2", "web-2", true),
                ("10.1.0.3", "web-3", ready),
            ],
        )
    };
    let changed = Instant::now();
    api.update(ready3(true)).expect("update");
    d.until("10.96.0.10:80", UPDATE_WITHIN, |r| addresses(r).len() == 3)
        .await;
    eprintln!("watch event reached the subscriber in {:?}", changed.elapsed());

    // Dropped watches are resumed from the last resourceVersion: a change made
    // while no watch is open arrives once the watch is back.
    wait_watches(&api).await;
    let started = api.watches_started();
    api.set_available(false);
    api.drop_watches();
    api.update(ready3(false)).expect("update while down");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.watches_open(), 0, "watches are down");
    api.set_available(true);
    d.until("10.96.0.10:80", UPDATE_WITHIN * 3, |r| addresses(r).len() == 2)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.watches_open() < 4 || api.watches_started() < started + 4 {
        assert!(
            Instant::now() < deadline,
            "all four watches resumed: {}",
            api.watches_open()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A Pod change while down: web-2 loses its sidecar.
    wait_watches(&api).await;
    api.set_available(false);
    api.drop_watches();
    api.update(pod("shop", "web-2", "10.1.0.2", "", false))
        .expect("pod update");
    api.set_available(true);
    d.until("10.96.0.10:80", UPDATE_WITHIN * 3, |r| {
        endpoints(r)
            .iter()
            .any(|e| e.pod == "web-2" && !e.meshed && e.identity.is_empty())
    })
    .await;

    // History lost while down (410 Expired on resume): a relist, which also
    // notices a deletion it never saw as an event.
    wait_watches(&api).await;
    let m = dest.metrics();
    let errors_before = metric_value(&m, "sidemesh_destination_source_errors_total", &[]);
    api.set_available(false);
    api.drop_watches();
    api.delete("discovery.k8s.io/v1", "EndpointSlice", "shop", "web-abc")
        .expect("delete");
    api.create(slice(
        "shop",
        "web-def",
        "web",
        &[("http", 8080)],
        &[("10.1.0.7", "web-7", true)],
    ))
    .expect("create");
    api.compact();
    api.set_available(true);
    let r = d
        .until("10.96.0.10:80", UPDATE_WITHIN * 3, |r| addresses(r) == ["10.1.0.7"])
        .await;
    assert_eq!(endpoints(&r)[0].pod, "web-7");
    let m = dest.metrics();
    assert!(
        metric_value(
            &m,
            "sidemesh_destination_source_errors_total",
            &["source=\"kubernetes\""]
        ) > errors_before,
        "watch failures are counted: {m}"
    );
    assert_eq!(
        metric_value(&m, "sidemesh_destination_source_synced", &["source=\"kubernetes\""]),
        1.0
    );
    // The service is deleted: its address becomes unknown.
    api.delete("v1", "Service", "shop", "web").expect("delete");
    d.until("10.96.0.10:80", UPDATE_WITHIN, |r| {
        matches!(r, discovery_response::Result::Unknown(_))
    })
    .await;
}

// ---------------------------------------------------------------- routes

/// A route change must reach subscribers within this (the contract).
const ROUTE_UPDATE_WITHIN: Duration = Duration::from_secs(1);

fn svc_of(r: &discovery_response::Result) -> &pb::Service {
    match r {
        discovery_response::Result::Service(s) => s,
        other => panic!("not a service: {other:?}"),
    }
}

/// `(route name, rule index)` of each route, in order.
fn route_ids(r: &discovery_response::Result) -> Vec<(String, u32)> {
    match r {
        discovery_response::Result::Service(s) => s.routes.iter().map(|r| (r.name.clone(), r.rule)).collect(),
        _ => Vec::new(),
    }
}

fn weights(route: &pb::Route) -> Vec<(&str, u32)> {
    route.backends.iter().map(|b| (b.key.as_str(), b.weight)).collect()
}

fn backend<'a>(svc: &'a pb::Service, key: &str) -> &'a pb::Backend {
    svc.backends
        .iter()
        .find(|b| b.key == key)
        .unwrap_or_else(|| panic!("no backend {key} in {:?}", svc.backends))
}

fn secs(d: &Option<prost_types::Duration>) -> Option<f64> {
    d.map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

/// The canary Service next to the shop's `web`, and its Pod.
fn canary(endpoints: &[(&str, &str, bool)]) -> Vec<Value> {
    let mut out = vec![
        service("shop", "web-canary", "10.96.0.11", &[("http", 80)], json!({})),
        slice("shop", "web-canary-1", "web-canary", &[("http", 8080)], endpoints),
    ];
    out.extend(
        endpoints
            .iter()
            .map(|(ip, pod_name, _)| pod("shop", pod_name, ip, "web", true)),
    );
    out
}

/// `web-split`: a 90/10 canary on `/api` with timeouts and retries, a rule
/// with a broken regex (dropped), and a rule naming a missing Service.
fn split_route(stable: i64, canary: i64) -> Value {
    httproute(
        "shop",
        "web-split",
        "web",
        Some(80),
        vec![
            rule(
                &[("web", 80, stable), ("web-canary", 80, canary)],
                json!({
                    "matches": [{
                        "path": { "type": "PathPrefix", "value": "/api" },
                        "headers": [{ "name": "X-Canary", "value": "yes" }],
                        "method": "GET",
                    }],
                    "timeouts": { "request": "10s", "backendRequest": "500ms" },
                    "retry": { "attempts": 2, "codes": [503, 502], "backoff": "50ms" },
                }),
            ),
            rule(
                &[("web", 80, 1)],
                json!({ "matches": [{ "path": { "type": "RegularExpression", "value": "/(unclosed" } }] }),
            ),
            rule(
                &[("web", 80, 1), ("nowhere", 80, 1)],
                json!({ "matches": [{ "path": { "type": "Exact", "value": "/health" } }] }),
            ),
        ],
    )
}

/// The shop with the canary, the split route, and budget-ratio annotations
/// (valid on `web`, invalid on `db`).
fn shop_with_routes(stable: i64, canary_weight: i64, canary_eps: &[(&str, &str, bool)]) -> Vec<Value> {
    let mut objects = shop();
    objects[0] = service(
        "shop",
        "web",
        "10.96.0.10",
        &[("http", 80), ("admin", 81)],
        json!({ "retry.sidemesh.io/budget-ratio": "0.5" }),
    );
    objects[5] = service(
        "shop",
        "db",
        "10.96.0.20",
        &[("", 5432)],
        json!({ "config.sidemesh.io/opaque-ports": "5432", "retry.sidemesh.io/budget-ratio": "-1" }),
    );
    objects.extend(canary(canary_eps));
    objects.push(split_route(stable, canary_weight));
    objects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_source_serves_routes_and_route_changes_reach_subscribers_within_a_second() {
    let mesh = Mesh::start();
    let file = mesh.dir.path().join("mesh.yaml");
    let one_canary = [("10.1.0.21", "canary-1", true)];
    pki::write(&file, &yaml(&shop_with_routes(90, 10, &one_canary)));
    let dest = mesh.destination(&format!("file:{}", file.display()), &[], &[]);
    let cert = mesh.frontend_cert().await;
    let mut d = Discover::open(channel(&dest.addr, mesh.trust(), ClientCert::Workload(cert)))
        .await
        .expect("stream");
    d.subscribe("10.96.0.10:80").await;
    let r = d.until("10.96.0.10:80", UPDATE_WITHIN, is_service).await;
    let svc = svc_of(&r);

    // The shop's catch-all route `web` (no rules: one rule matching
    // everything, to the Service itself) and the split's valid rules; files
    // carry no creationTimestamp, so the order is namespace/name, then rule.
    assert_eq!(
        route_ids(&r),
        vec![
            ("shop/web".to_owned(), 0),
            ("shop/web-split".to_owned(), 0),
            ("shop/web-split".to_owned(), 2)
        ],
        "the rule with a broken regex is dropped, the others stay"
    );
    assert_eq!(weights(&svc.routes[0]), vec![("shop/web:80", 1)]);
    let split = &svc.routes[1];
    assert_eq!(weights(split), vec![("shop/web:80", 90), ("shop/web-canary:80", 10)]);
    let m = &split.matches[0];
    let path = m.path.as_ref().expect("path");
    assert_eq!(
        (path.kind, path.value.as_str(), m.method.as_str()),
        (pb::path_match::Kind::Prefix as i32, "/api", "GET")
    );
    assert_eq!(
        (
            m.headers[0].name.as_str(),
            m.headers[0].value.as_str(),
            m.headers[0].regex
        ),
        ("x-canary", "yes", false)
    );
    assert_eq!(secs(&split.request_timeout), Some(10.0));
    assert_eq!(secs(&split.backend_request_timeout), Some(0.5));
    let retry = split.retry.as_ref().expect("retry");
    assert_eq!(retry.attempts, 3, "2 retries = 3 attempts");
    assert_eq!(retry.codes, vec![503, 502]);
    assert_eq!(secs(&retry.backoff), Some(0.05));
    assert_eq!(
        weights(&svc.routes[2]),
        vec![("shop/web:80", 1), ("shop/nowhere:80", 1)]
    );
    // Backends other than the Service itself, with endpoints built like its own.
    let canary_backend = backend(svc, "shop/web-canary:80");
    assert!(!canary_backend.unresolved);
    let eps: Vec<(&str, u32, &str, bool, bool)> = canary_backend
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.port, e.identity.as_str(), e.meshed, e.ready))
        .collect();
    assert_eq!(
        eps,
        vec![("10.1.0.21", 8080, "spiffe://cluster.local/ns/shop/sa/web", true, true)]
    );
    let nowhere = backend(svc, "shop/nowhere:80");
    assert!(nowhere.unresolved && nowhere.endpoints.is_empty(), "{nowhere:?}");
    assert_eq!(svc.backends.len(), 2, "the Service's own backend is default_backend");
    // Budget ratio from the annotation; an invalid one is ignored and counted.
    let budget = svc.retry_budget.as_ref().expect("budget");
    assert_eq!((budget.ratio, budget.min_retries_per_second), (0.5, 10));
    assert_eq!(budget.window.map(|w| w.seconds), Some(10));
    d.subscribe("10.96.0.20:5432").await;
    let db = d.until("10.96.0.20:5432", UPDATE_WITHIN, is_service).await;
    assert_eq!(svc_of(&db).retry_budget.as_ref().map(|b| b.ratio), Some(0.2));
    assert!(route_ids(&db).is_empty());
    dest.wait_metric(
        "sidemesh_destination_annotations_invalid",
        &["annotation=\"retry.sidemesh.io/budget-ratio\""],
        |v| v == 1.0,
    )
    .await;
    dest.wait_metric("sidemesh_destination_route_problems", &["reason=\"bad_regex\""], |v| {
        v == 1.0
    })
    .await;
    dest.wait_metric(
        "sidemesh_destination_route_problems",
        &["reason=\"backend_not_found\""],
        |v| v == 1.0,
    )
    .await;
    let log = dest.proc.log();
    assert!(
        log.contains("HTTPRoute has problems") && log.contains("does not compile"),
        "{log}"
    );
    assert!(
        log.contains("retry.sidemesh.io/budget-ratio"),
        "invalid annotation logged"
    );

    // Live re-weight through the file.
    let edited = Instant::now();
    pki::write(&file, &yaml(&shop_with_routes(50, 50, &one_canary)));
    let r = d
        .until("10.96.0.10:80", UPDATE_WITHIN, |r| {
            svc_of(r)
                .routes
                .get(1)
                .is_some_and(|s| weights(s) == [("shop/web:80", 50), ("shop/web-canary:80", 50)])
        })
        .await;
    let took = edited.elapsed();
    eprintln!("re-weight reached the subscriber in {took:?}");
    assert!(took < ROUTE_UPDATE_WITHIN, "re-weight took {took:?}");
    assert_eq!(route_ids(&r).len(), 3);

    // A backend's endpoints change: the parent's subscribers hear of it.
    let two_canaries = [("10.1.0.21", "canary-1", true), ("10.1.0.22", "canary-2", true)];
    let edited = Instant::now();
    pki::write(&file, &yaml(&shop_with_routes(50, 50, &two_canaries)));
    d.until("10.96.0.10:80", UPDATE_WITHIN, |r| {
        backend(svc_of(r), "shop/web-canary:80").endpoints.len() == 2
    })
    .await;
    let took = edited.elapsed();
    eprintln!("backend endpoint change reached the subscriber in {took:?}");
    assert!(took < ROUTE_UPDATE_WITHIN, "backend endpoints took {took:?}");

    // A consumer route (in the client's namespace, `default`) replaces the
    // producer routes for this client only.
    let mut consumer = httproute(
        "default",
        "frontend-timeouts",
        "web",
        None,
        vec![json!({ "timeouts": { "request": "1s" } })],
    );
    consumer["spec"]["parentRefs"][0]["namespace"] = json!("shop");
    let mut objects = shop_with_routes(50, 50, &two_canaries);
    objects.push(consumer);
    pki::write(&file, &yaml(&objects));
    let r = d
        .until("10.96.0.10:80", UPDATE_WITHIN, |r| {
            route_ids(r) == [("default/frontend-timeouts".to_owned(), 0)]
        })
        .await;
    let route = &svc_of(&r).routes[0];
    assert_eq!(
        weights(route),
        vec![("shop/web:80", 1)],
        "no backendRefs: the Service itself"
    );
    assert_eq!(secs(&route.request_timeout), Some(1.0));
    assert!(svc_of(&r).backends.is_empty());

    // Routes deleted: back to the Service's own endpoints, no routes.
    let mut objects = shop();
    objects.pop();
    pki::write(&file, &yaml(&objects));
    let r = d
        .until("10.96.0.10:80", UPDATE_WITHIN, |r| route_ids(r).is_empty())
        .await;
    assert_eq!(addresses(&r).len(), 2);
    dest.wait_metric("sidemesh_destination_route_problems", &["reason=\"bad_regex\""], |v| {
        v == 0.0
    })
    .await;
}

/// Waits (bounded) until the status sidemesh wrote on a route satisfies `ok`.
async fn wait_route_status(api: &ApiServer, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let route = api
            .get("gateway.networking.k8s.io/v1", "HTTPRoute", "shop", name)
            .unwrap_or(Value::Null);
        let ours = route["status"]["parents"]
            .as_array()
            .and_then(|ps| {
                ps.iter()
                    .find(|p| p["controllerName"] == "sidemesh.io/destination")
                    .cloned()
            })
            .unwrap_or(Value::Null);
        if ok(&ours) {
            return route;
        }
        assert!(Instant::now() < deadline, "status of {name}: {route:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(status, reason)` of condition `kind` in a `status.parents[]` entry.
fn condition(parent: &Value, kind: &str) -> (String, String) {
    parent["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_source_routes_follow_watch_events_and_statuses_are_written() {
    let mesh = Mesh::start();
    let api = ApiServer::start(mesh.dir.path()).await.expect("stand-in API server");
    // No Gateway API CRDs at first: the destination service must still become ready.
    api.set_served("httproutes", false);
    let mut objects = shop();
    objects.extend(canary(&[("10.1.0.21", "canary-1", true)]));
    for o in objects {
        api.create(o).expect("create");
    }
    let kubeconfig = api.kubeconfig.display().to_string();
    let dest = mesh.destination("kubernetes", &[], &[("KUBECONFIG", &kubeconfig)]);
    assert!(dest.proc.log().contains("is not served"), "{}", dest.proc.log());
    let cert = mesh.frontend_cert().await;
    let mut d = Discover::open(channel(&dest.addr, mesh.trust(), ClientCert::Workload(cert)))
        .await
        .expect("stream");
    d.subscribe("10.96.0.10:80").await;
    let r = d.until("10.96.0.10:80", UPDATE_WITHIN, is_service).await;
    assert!(route_ids(&r).is_empty(), "no CRD, no routes: {r:?}");

    // The CRD appears: the watcher's retry picks the routes up.
    api.set_served("httproutes", true);
    d.until("10.96.0.10:80", Duration::from_secs(20), |r| {
        route_ids(r) == [("shop/web".to_owned(), 0)]
    })
    .await;

    // A route added through the API, with another controller's status entry
    // that sidemesh must keep.
    let mut split = split_route(90, 10);
    split["status"] = json!({ "parents": [{
        "parentRef": { "name": "gw", "kind": "Gateway", "group": "gateway.networking.k8s.io" },
        "controllerName": "example.com/gateway",
        "conditions": [],
    }] });
    let added = Instant::now();
    api.create(split).expect("create route");
    let r = d
        .until("10.96.0.10:80", UPDATE_WITHIN, |r| route_ids(r).len() == 3)
        .await;
    eprintln!("route added reached the subscriber in {:?}", added.elapsed());
    assert!(added.elapsed() < ROUTE_UPDATE_WITHIN);
    // The API server's creationTimestamp orders routes: shop/web is older.
    assert_eq!(
        route_ids(&r),
        vec![
            ("shop/web".to_owned(), 0),
            ("shop/web-split".to_owned(), 0),
            ("shop/web-split".to_owned(), 2)
        ]
    );
    assert_eq!(
        weights(&svc_of(&r).routes[1]),
        vec![("shop/web:80", 90), ("shop/web-canary:80", 10)]
    );
    assert_eq!(backend(svc_of(&r), "shop/web-canary:80").endpoints.len(), 1);

    // Status: accepted with a dropped rule, and an unresolved backendRef.
    let route = wait_route_status(&api, "web-split", |p| {
        condition(p, "ResolvedRefs") == ("False".into(), "BackendNotFound".into())
    })
    .await;
    let parents = route["status"]["parents"].as_array().cloned().unwrap_or_default();
    assert_eq!(parents.len(), 2, "the other controller's entry is kept: {parents:#?}");
    let ours = parents
        .iter()
        .find(|p| p["controllerName"] == "sidemesh.io/destination")
        .cloned()
        .unwrap_or_default();
    assert_eq!(condition(&ours, "Accepted"), ("True".into(), "Accepted".into()));
    assert_eq!(
        condition(&ours, "PartiallyInvalid"),
        ("True".into(), "UnsupportedValue".into())
    );
    assert_eq!(
        ours["parentRef"],
        json!({ "group": "", "kind": "Service", "name": "web", "port": 80 })
    );
    assert_eq!(ours["conditions"][0]["observedGeneration"], 1, "{ours:#}");
    assert!(
        ours["conditions"][0]["lastTransitionTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{ours:#}"
    );
    // The shop's route, valid, is accepted with its references resolved.
    wait_route_status(&api, "web", |p| {
        condition(p, "Accepted") == ("True".into(), "Accepted".into())
            && condition(p, "ResolvedRefs") == ("True".into(), "ResolvedRefs".into())
    })
    .await;

    // Re-weight through a watch event.
    let mut reweighted = split_route(50, 50);
    reweighted["status"] = route["status"].clone();
    let changed = Instant::now();
    api.update(reweighted).expect("update");
    d.until("10.96.0.10:80", UPDATE_WITHIN, |r| {
        svc_of(r)
            .routes
            .get(1)
            .is_some_and(|s| weights(s) == [("shop/web:80", 50), ("shop/web-canary:80", 50)])
    })
    .await;
    eprintln!(
        "re-weight through a watch event reached the subscriber in {:?}",
        changed.elapsed()
    );
    assert!(changed.elapsed() < ROUTE_UPDATE_WITHIN);

    // The missing backend Service appears: the backend resolves, and so does the status.
    api.create(service("shop", "nowhere", "10.96.0.30", &[("http", 80)], json!({})))
        .expect("create");
    api.create(slice(
        "shop",
        "nowhere-1",
        "nowhere",
        &[("http", 8080)],
        &[("10.1.0.31", "nowhere-0", true)],
    ))
    .expect("create");
    let r = d
        .until("10.96.0.10:80", UPDATE_WITHIN, |r| {
            svc_of(r)
                .backends
                .iter()
                .any(|b| b.key == "shop/nowhere:80" && !b.unresolved && b.endpoints.len() == 1)
        })
        .await;
    assert_eq!(route_ids(&r).len(), 3);
    wait_route_status(&api, "web-split", |p| {
        condition(p, "ResolvedRefs") == ("True".into(), "ResolvedRefs".into())
    })
    .await;

    // Statuses settle: no patch loop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let patches = || {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("PATCH ") && r.ends_with("/status"))
            .count()
    };
    let settled = patches();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(patches(), settled, "status patches stop once statuses are current");
    assert!(settled >= 3, "{settled} status patches");

    // Deleted through a watch event.
    api.delete("gateway.networking.k8s.io/v1", "HTTPRoute", "shop", "web-split")
        .expect("delete");
    d.until("10.96.0.10:80", UPDATE_WITHIN, |r| {
        route_ids(r) == [("shop/web".to_owned(), 0)]
    })
    .await;
    assert!(!dest.proc.log().contains("panicked"));
}

/// Waits (bounded) until the four watches of the destination service are open.
async fn wait_watches(api: &ApiServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.watches_open() < 4 {
        assert!(
            Instant::now() < deadline,
            "the four watches are not all open: {}",
            api.watches_open()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stand_in_api_server_speaks_list_and_watch() {
    // The stand-in's protocol, checked directly (kube's client is the other check).
    let dir = tempfile::tempdir().expect("tempdir");
    let api = ApiServer::start(dir.path()).await.expect("stand-in");
    for i in 0..5 {
        api.create(pod("shop", &format!("p{i}"), &format!("10.1.0.{i}"), "", i % 2 == 0))
            .expect("create");
    }
    let client = reqwest_like::Client::new(&api);
    let (code, list) = client.get("/api/v1/namespaces/shop/pods?limit=2").await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2));
    assert!(list["items"][0].get("kind").is_none(), "list items carry no kind");
    let rv = list["metadata"]["resourceVersion"].as_str().expect("rv").to_owned();
    let token = list["metadata"]["continue"].as_str().expect("continue").to_owned();
    assert_eq!(list["metadata"]["remainingItemCount"], 3);
    // A change between pages does not show in the next page (consistent snapshot).
    api.delete("v1", "Pod", "shop", "p3").expect("delete");
    let (_, page2) = client
        .get(&format!("/api/v1/namespaces/shop/pods?limit=10&continue={token}"))
        .await;
    let names: Vec<&str> = page2["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["p2", "p3", "p4"]);
    assert_eq!(page2["metadata"]["resourceVersion"].as_str(), Some(rv.as_str()));
    // Watch from the list's resourceVersion: the deletion, then a bookmark.
    api.set_bookmark_interval(Duration::from_millis(200));
    let lines = client
        .watch(
            &format!("/api/v1/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1"),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(lines[0]["type"], "DELETED", "{lines:?}");
    assert_eq!(lines[0]["object"]["metadata"]["name"], "p3");
    assert_eq!(lines[0]["object"]["kind"], "Pod", "watch objects carry their kind");
    assert!(lines.iter().any(|l| l["type"] == "BOOKMARK"), "{lines:?}");
    // Label selectors, and a watch without resourceVersion starting with ADDED.
    let (_, sel) = client.get("/api/v1/pods?labelSelector=app%3Dnone").await;
    assert_eq!(sel["items"].as_array().map(Vec::len), Some(0));
    let lines = client
        .watch("/api/v1/pods?watch=1&timeoutSeconds=1", Duration::from_secs(5))
        .await;
    assert_eq!(lines.iter().filter(|l| l["type"] == "ADDED").count(), 4);
    // Expired history: an ERROR event with a 410 Status, and 410 for a stale page.
    api.compact();
    let lines = client
        .watch(
            &format!("/api/v1/pods?watch=true&resourceVersion={rv}"),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "ERROR");
    assert_eq!(lines[0]["object"]["code"], 410);
    assert_eq!(lines[0]["object"]["reason"], "Expired");
    let (code, gone) = client
        .get(&format!("/api/v1/namespaces/shop/pods?limit=1&continue={token}"))
        .await;
    assert_eq!((code, gone["reason"].as_str()), (410, Some("Expired")));
    // Other resources, single objects, unknown ones.
    let (code, _) = client.get("/apis/discovery.k8s.io/v1/endpointslices").await;
    assert_eq!(code, 200);
    let (code, _) = client
        .get("/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes")
        .await;
    assert_eq!(code, 200);
    let (code, p) = client.get("/api/v1/namespaces/shop/pods/p0").await;
    assert_eq!((code, p["kind"].as_str()), (200, Some("Pod")));
    let (code, nf) = client.get("/api/v1/namespaces/shop/pods/p3").await;
    assert_eq!((code, nf["reason"].as_str()), (404, Some("NotFound")));
    let (code, _) = client.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dx").await;
    assert_eq!(code, 400, "unsupported field selectors are refused, not ignored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_mesh_certificate_are_refused() {
    let mesh = Mesh::start();
    let file = mesh.dir.path().join("mesh.yaml");
    pki::write(&file, &yaml(&shop()));
    let dest = mesh.destination(&format!("file:{}", file.display()), &[], &[]);

    // No client certificate.
    let err = Discover::open(channel(&dest.addr, mesh.trust(), ClientCert::Anonymous))
        .await
        .err()
        .expect("anonymous client refused");
    eprintln!("anonymous: {err}");
    assert_ne!(err.code(), Code::Ok);

    // A certificate for a mesh identity, but from a foreign root.
    let foreign_dir = tempfile::tempdir().expect("tempdir");
    let foreign = Pki::new(foreign_dir.path());
    let bundle = TrustBundle::from_pem(foreign.root.cert.as_bytes()).expect("bundle");
    let issuer = sidemesh_identity::issuer::Issuer::from_pem(
        foreign.issuer.cert.as_bytes(),
        foreign.issuer.key.as_bytes(),
        &bundle,
    )
    .expect("issuer");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let (leaf, _) = issuer
        .sign(&FRONTEND.parse().expect("id"), &[], &key, Duration::from_secs(3600))
        .expect("leaf");
    let mut chain = vec![leaf];
    chain.extend(issuer.chain().iter().cloned());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let result = async {
        let mut d = Discover::open(channel(&dest.addr, mesh.trust(), ClientCert::Fixed(chain, key))).await?;
        d.subscribe("10.96.0.10:80").await;
        d.next(Duration::from_secs(5)).await
    }
    .await;
    let err = result.expect_err("foreign-root client refused");
    eprintln!("foreign root: {err}");
    assert_ne!(err.code(), Code::DeadlineExceeded, "refused, not hanging");

    // The service still serves mesh clients.
    let cert = mesh.frontend_cert().await;
    let mut d = Discover::open(channel(&dest.addr, mesh.trust(), ClientCert::Workload(cert)))
        .await
        .expect("stream");
    d.subscribe("10.96.0.10:80").await;
    d.until("10.96.0.10:80", UPDATE_WITHIN, is_service).await;
    assert!(dest.proc.log().contains("TLS handshake failed") || !dest.proc.log().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_requests_get_clear_errors_and_the_server_keeps_serving() {
    let mesh = Mesh::start();
    let file = mesh.dir.path().join("mesh.yaml");
    pki::write(&file, &yaml(&shop()));
    let mut dest = mesh.destination(&format!("file:{}", file.display()), &["--max-subscriptions", "8"], &[]);
    let cert = mesh.frontend_cert().await;
    let ch = channel(&dest.addr, mesh.trust(), ClientCert::Workload(cert));

    let huge = "9".repeat(10_000);
    let cases: Vec<(Vec<discovery_request::Request>, Code, &str)> = vec![
        (
            vec![discovery_request::Request::Subscribe("web.shop.svc:80".into())],
            Code::InvalidArgument,
            "is not an ip:port address",
        ),
        (
            vec![discovery_request::Request::Subscribe("10.0.0.1:0".into())],
            Code::InvalidArgument,
            "non-zero port",
        ),
        (
            vec![discovery_request::Request::Unsubscribe("\u{0}\u{1}garbage".into())],
            Code::InvalidArgument,
            "unsubscribe",
        ),
        (
            vec![discovery_request::Request::Subscribe(huge.clone())],
            Code::InvalidArgument,
            "longer than 64 bytes",
        ),
        (
            (1..=9)
                .map(|i| discovery_request::Request::Subscribe(format!("10.9.0.{i}:80")))
                .collect(),
            Code::ResourceExhausted,
            "limit",
        ),
    ];
    for (requests, code, needle) in cases {
        let mut d = Discover::open(ch.clone()).await.expect("stream");
        for r in requests {
            d.send(r).await;
        }
        let status = loop {
            match d.next(Duration::from_secs(5)).await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without a status"),
                Err(s) => break s,
            }
        };
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(needle), "{needle:?} not in {status:?}");
        assert!(status.message().len() < 400, "short message: {}", status.message());
    }
    // An empty request.
    let d = Discover::open(ch.clone()).await.expect("stream");
    d.tx.send(DiscoveryRequest { request: None }).await.expect("send");
    let mut d = d;
    let status = d.next(Duration::from_secs(5)).await.expect_err("error");
    assert_eq!(status.code(), Code::InvalidArgument);
    // An oversized message (over the 16 KiB request limit).
    let mut d = Discover::open(ch.clone()).await.expect("stream");
    d.subscribe(&"1".repeat(100_000)).await;
    let status = d.next(Duration::from_secs(5)).await.expect_err("error");
    assert_ne!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // Random bytes and a half-open connection on the gRPC port.
    {
        use tokio::io::AsyncWriteExt as _;
        let mut tcp = tokio::net::TcpStream::connect(&dest.addr).await.expect("connect");
        let _ = tcp.write_all(b"\x16\x03\x01\x00\x05garbage-not-a-client-hello").await;
        let _half_open = tokio::net::TcpStream::connect(&dest.addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Still serving; refusals were counted.
    let mut d = Discover::open(ch.clone()).await.expect("stream");
    d.subscribe("10.96.0.10:80").await;
    d.until("10.96.0.10:80", UPDATE_WITHIN, is_service).await;
    let m = dest.metrics();
    assert!(
        metric_value(
            &m,
            "sidemesh_destination_requests_refused_total",
            &["reason=\"bad_target\""]
        ) >= 4.0,
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            "sidemesh_destination_requests_refused_total",
            &["reason=\"too_many_subscriptions\""]
        ) >= 1.0
    );
    assert!(dest.proc.is_running());
    assert!(!dest.proc.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_certified_and_sigterm_ends_streams_and_exits_cleanly() {
    let mesh = Mesh::start();
    let file = mesh.dir.path().join("mesh.yaml");
    pki::write(&file, &yaml(&shop()));
    // No token yet: the destination service cannot get its certificate.
    let missing = mesh.dir.path().join("later.token");
    let missing_s = missing.display().to_string();
    let mut dest = mesh.destination_unready(
        &format!("file:{}", file.display()),
        &["--shutdown-grace", "5s"],
        &[("SIDEMESH_TOKEN_PATH", &missing_s)],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(&dest.admin, "/ready") {
            Some((503, _)) => break,
            _ if Instant::now() > deadline => panic!("admin endpoint not up:\n{}", dest.proc.log()),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        http_get(&dest.admin, "/ready").map(|r| r.0),
        Some(503),
        "not ready without a certificate"
    );
    std::fs::write(&missing, "token-of-destination\n").expect("token");
    dest.proc.wait_ready(&dest.admin, Duration::from_secs(40));

    let cert = mesh.frontend_cert().await;
    let mut d = Discover::open(channel(&dest.addr, mesh.trust(), ClientCert::Workload(cert)))
        .await
        .expect("stream");
    d.subscribe("10.96.0.10:80").await;
    d.until("10.96.0.10:80", UPDATE_WITHIN, is_service).await;

    let pid = dest.proc.pid().to_string();
    let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
    let status = d.next(Duration::from_secs(5)).await;
    match status {
        Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        Ok(None) => {}
        Ok(Some(m)) => panic!("unexpected message after SIGTERM: {m:?}"),
    }
    let exit = dest.proc.terminate(Duration::from_secs(10)).expect("exited within 10s");
    assert!(exit.success(), "{exit}");
    let _ = &mesh.identity;
}

#[test]
fn bad_configuration_is_one_clear_line_and_nonzero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    pki::write(&pki.path("broken.yaml"), "{ this is: [not, valid");
    pki::write(&pki.path("token"), "t");
    let p = |n: &str| pki.path(n).display().to_string();
    let common = [
        "--listen",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--identity-addr",
        "127.0.0.1:1",
        "--token-path",
        &p("token"),
        "--trust-bundle",
        &p("bundle.pem"),
    ];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--source".into(), "etcd".into()],
            "must be `kubernetes` or `file:<path>`",
        ),
        (
            vec!["--source".into(), format!("file:{}", p("missing.yaml"))],
            "missing.yaml",
        ),
        (
            vec!["--source".into(), format!("file:{}", p("broken.yaml"))],
            "not valid YAML",
        ),
        (
            vec![
                "--source".into(),
                "file:x".into(),
                "--shutdown-grace".into(),
                "soon".into(),
            ],
            "duration",
        ),
        (
            vec![
                "--source".into(),
                "file:x".into(),
                "--trust-domain".into(),
                "Bad Domain".into(),
            ],
            "SIDEMESH_TRUST_DOMAIN",
        ),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<&str> = common.to_vec();
        args.extend(extra.iter().map(String::as_str));
        let (status, _, stderr) = run("sidemesh-destination", &args, Duration::from_secs(20));
        assert!(!status.success(), "{args:?} started");
        assert!(stderr.contains(needle), "{args:?}: stderr {stderr:?} lacks {needle:?}");
        assert!(stderr.trim().lines().count() <= 3, "not one clear line: {stderr}");
    }
    // Missing identity settings.
    let (status, _, stderr) = run(
        "sidemesh-destination",
        &[
            "--source",
            &format!("file:{}", p("broken.yaml")),
            "--admin-addr",
            "127.0.0.1:0",
        ],
        Duration::from_secs(20),
    );
    assert!(!status.success());
    assert!(
        stderr.contains("SIDEMESH_TRUST_BUNDLE") || stderr.contains("SIDEMESH_IDENTITY_ADDR"),
        "{stderr}"
    );
}

/// A tiny HTTPS client for the stand-in API server's own test: trusts the CA
/// from the kubeconfig and presents the admin token, as kubectl would.
mod reqwest_like {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use base64::Engine as _;
    use http_body_util::BodyExt as _;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, ServerName};
    use serde_json::Value;
    use sidemesh_tests::apiserver::{ADMIN_TOKEN, ApiServer};

    pub struct Client {
        addr: std::net::SocketAddr,
        tls: tokio_rustls::TlsConnector,
    }

    impl Client {
        pub fn new(api: &ApiServer) -> Self {
            let kubeconfig = std::fs::read_to_string(&api.kubeconfig).expect("kubeconfig");
            let b64 = kubeconfig
                .lines()
                .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
                .expect("CA in kubeconfig");
            let pem = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
            let ca = CertificateDer::from_pem_slice(&pem).expect("CA PEM");
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).expect("CA");
            let mut config =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Self {
                addr: api.addr,
                tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            }
        }

        async fn request(&self, path: &str) -> http::Response<hyper::body::Incoming> {
            let tcp = tokio::net::TcpStream::connect(self.addr).await.expect("connect");
            let name = ServerName::IpAddress(self.addr.ip().into());
            let tls = self.tls.connect(name, tcp).await.expect("TLS to the stand-in");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header("host", "127.0.0.1")
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request");
            sender.send_request(req).await.expect("response")
        }

        /// Status code and JSON body.
        pub async fn get(&self, path: &str) -> (u16, Value) {
            let rsp = tokio::time::timeout(Duration::from_secs(5), async {
                let rsp = self.request(path).await;
                let code = rsp.status().as_u16();
                let body = rsp.into_body().collect().await.expect("body").to_bytes();
                (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
            })
            .await;
            rsp.expect("answer within 5s")
        }

        /// The events of a watch until it ends or `within` passes.
        pub async fn watch(&self, path: &str, within: Duration) -> Vec<Value> {
            let deadline = Instant::now() + within;
            let rsp = self.request(path).await;
            assert_eq!(rsp.status().as_u16(), 200, "{path}");
            let mut body = rsp.into_body();
            let mut buf = Vec::new();
            while let Ok(Some(Ok(frame))) =
                tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), body.frame()).await
            {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            buf.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).expect("each line is one JSON event"))
                .collect()
        }
    }
}
