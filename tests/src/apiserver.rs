//! A stand-in Kubernetes API server for tests: real HTTPS, bearer-token
//! authentication, and the real REST shapes (JSON objects, `metav1.Status`
//! errors, `201 Created` on create). It serves what sidemesh uses of the API:
//!
//! - `TokenReview` create;
//! - get, list and watch of Services, Pods, Namespaces, EndpointSlices
//!   (`discovery.k8s.io/v1`) and HTTPRoutes (`gateway.networking.k8s.io/v1`),
//!   cluster-wide and namespaced, with the real list/watch protocol:
//!   `…List` with `metadata.resourceVersion`, `limit`/`continue` paging at a
//!   consistent resourceVersion, `resourceVersionMatch`, label and field
//!   (`metadata.name`, `metadata.namespace`) selectors, and
//!   `?watch=true&resourceVersion=N` streaming newline-delimited
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":…}` events,
//!   `allowWatchBookmarks`, `sendInitialEvents`, `timeoutSeconds`, and an
//!   `ERROR` event with a `410 Expired` Status for a resourceVersion older
//!   than the history kept (as the watch cache answers);
//! - the `status` subresource (`GET`, and `PATCH` with a JSON merge patch,
//!   `application/merge-patch+json`): only `status` changes, a
//!   `metadata.resourceVersion` in the patch is a precondition (409 Conflict
//!   when stale), and the change is a new resourceVersion seen by watches.
//!
//! Tests change objects with [`ApiServer::create`], [`ApiServer::update`],
//! [`ApiServer::apply`] and [`ApiServer::delete`] (each a new resourceVersion,
//! seen by watches), and disturb clients with [`ApiServer::drop_watches`],
//! [`ApiServer::set_available`], [`ApiServer::compact`] and
//! [`ApiServer::set_served`] (a CRD not installed). Clients reach it
//! through a kubeconfig it writes, exactly as they would reach a real cluster.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;

/// The bearer token clients must present (written into the kubeconfig).
pub const ADMIN_TOKEN: &str = "stand-in-admin-token";

/// Events kept for watches to resume from; older resourceVersions get 410.
const HISTORY: usize = 10_000;

/// A token the stand-in knows: whose it is and for which audiences.
#[derive(Debug, Clone)]
pub struct KnownToken {
    /// e.g. `system:serviceaccount:default:frontend`.
    pub username: String,
    /// Audiences the token was issued for.
    pub audiences: Vec<String>,
}

/// A resource type the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResourceType {
    group_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const RESOURCES: &[ResourceType] = &[
    ResourceType {
        group_version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
    },
    ResourceType {
        group_version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
    },
    ResourceType {
        group_version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    ResourceType {
        group_version: "discovery.k8s.io/v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    ResourceType {
        group_version: "gateway.networking.k8s.io/v1",
        plural: "httproutes",
        kind: "HTTPRoute",
        namespaced: true,
    },
];

fn resource_of(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group_version == api_version && r.kind == kind)
}

/// Object identity in the store: resource, namespace ("" when cluster-scoped), name.
type ObjKey = (usize, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug, Clone)]
struct Logged {
    rv: u64,
    key: ObjKey,
    kind: EventType,
    /// The object after the change (for a deletion: as deleted).
    object: Value,
    /// The object before the change (none for an addition).
    before: Option<Value>,
}

#[derive(Debug, Default)]
struct Store {
    /// The last resourceVersion issued.
    rv: u64,
    objects: BTreeMap<ObjKey, Value>,
    log: VecDeque<Logged>,
    /// History up to and including this resourceVersion is gone.
    compacted: u64,
    uid: u64,
}

impl Store {
    fn record(&mut self, key: ObjKey, kind: EventType, object: Value, before: Option<Value>) {
        self.log.push_back(Logged {
            rv: self.rv,
            key,
            kind,
            object,
            before,
        });
        while self.log.len() > HISTORY {
            if let Some(old) = self.log.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    /// The objects of `res` as they were at `rv`, or `None` if that history is gone.
    fn state_at(&self, res: usize, rv: u64) -> Option<BTreeMap<ObjKey, Value>> {
        if rv < self.compacted {
            return None;
        }
        let mut state: BTreeMap<ObjKey, Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.0 == res)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ev in self.log.iter().rev().take_while(|e| e.rv > rv) {
            if ev.key.0 != res {
                continue;
            }
            match &ev.before {
                Some(before) => {
                    state.insert(ev.key.clone(), before.clone());
                }
                None => {
                    state.remove(&ev.key);
                }
            }
        }
        Some(state)
    }
}

#[derive(Debug)]
struct Shared {
    tokens: Mutex<HashMap<String, KnownToken>>,
    requests: Mutex<Vec<String>>,
    store: Mutex<Store>,
    /// The last resourceVersion, for watches to wake on.
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch.
    drops: watch::Sender<u64>,
    available: AtomicBool,
    bookmark_interval_ms: AtomicU64,
    watches_open: AtomicU64,
    watches_started: AtomicU64,
    /// Resources answered 404, as when their CRD is not installed (by plural).
    unserved: Mutex<Vec<&'static str>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running stand-in API server.
#[derive(Debug)]
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// A kubeconfig pointing at it.
    pub kubeconfig: PathBuf,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl ApiServer {
    /// Starts on 127.0.0.1 and writes `kubeconfig` in `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        params.is_ca = rcgen::IsCa::NoCa;
        let cert = params.self_signed(&key)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;

        let kubeconfig = dir.join("kubeconfig");
        let ca = base64::engine::general_purpose::STANDARD.encode(cert.pem());
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: admin\ncurrent-context: stand-in\n",
                port = addr.port()
            ),
        )?;

        let shared = Arc::new(Shared {
            tokens: Mutex::default(),
            requests: Mutex::default(),
            store: Mutex::new(Store {
                // Resource versions are opaque to clients; not starting at 1
                // keeps tests from relying on small numbers.
                rv: 1000,
                compacted: 1000,
                ..Store::default()
            }),
            changed: watch::channel(1000).0,
            drops: watch::channel(0).0,
            available: AtomicBool::new(true),
            bookmark_interval_ms: AtomicU64::new(1000),
            watches_open: AtomicU64::new(0),
            watches_started: AtomicU64::new(0),
            unserved: Mutex::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let mut accept_stopped = stopped.clone();
        let state = shared.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = accept_stopped.wait_for(|s| *s) => return,
                    a = listener.accept() => a,
                };
                let Ok((tcp, _)) = accepted else { continue };
                let acceptor = acceptor.clone();
                let state = state.clone();
                let mut conn_stopped = stopped.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(state, req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(tls), svc);
                    // Stopping drops live connections too, as a crashed API server would.
                    tokio::select! {
                        _ = conn => {}
                        _ = conn_stopped.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            kubeconfig,
            shared,
            stop,
        })
    }

    /// Makes `token` valid for `system:serviceaccount:<ns>:<sa>` and `audiences`.
    pub fn add_token(&self, token: &str, namespace: &str, service_account: &str, audiences: &[&str]) {
        lock(&self.shared.tokens).insert(
            token.to_owned(),
            KnownToken {
                username: format!("system:serviceaccount:{namespace}:{service_account}"),
                audiences: audiences.iter().map(|s| (*s).to_owned()).collect(),
            },
        );
    }

    /// `METHOD path` of every request served so far.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }

    /// Stops serving (the listener closes; clients see connection refused).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Creates an object (`apiVersion`, `kind`, `metadata.name` required;
    /// a namespaced object without namespace goes to `default`). Returns it as
    /// stored, with `resourceVersion`, `uid` and `creationTimestamp` set.
    pub fn create(&self, object: Value) -> anyhow::Result<Value> {
        self.write(object, Write::Create)
    }

    /// Replaces an existing object. A `metadata.resourceVersion` in `object`
    /// must match the stored one (409 Conflict otherwise), as on a real server;
    /// leave it out to overwrite unconditionally.
    pub fn update(&self, object: Value) -> anyhow::Result<Value> {
        self.write(object, Write::Update)
    }

    /// Creates or replaces an object.
    pub fn apply(&self, object: Value) -> anyhow::Result<Value> {
        self.write(object, Write::Apply)
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds).
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> anyhow::Result<()> {
        let res =
            resource_of(api_version, kind).ok_or_else(|| anyhow::anyhow!("{api_version}/{kind} is not served"))?;
        let ns = if RESOURCES[res].namespaced { namespace } else { "" };
        let key = (res, ns.to_owned(), name.to_owned());
        let mut store = lock(&self.shared.store);
        let Some(before) = store.objects.remove(&key) else {
            anyhow::bail!("{kind} {namespace}/{name} not found");
        };
        store.rv += 1;
        let mut deleted = before.clone();
        deleted["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        store.record(key, EventType::Deleted, deleted, Some(before));
        let rv = store.rv;
        drop(store);
        self.shared.changed.send_replace(rv);
        Ok(())
    }

    /// Ends every open watch (their responses end, as when an API server
    /// restarts or a load balancer drops idle connections); clients must
    /// watch again from the last resourceVersion they saw.
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|g| *g += 1);
    }

    /// While unavailable, every request is answered `503 ServiceUnavailable`
    /// (an API server that is up but cannot serve).
    pub fn set_available(&self, available: bool) {
        self.shared.available.store(available, Ordering::Release);
    }

    /// Forgets all history: resuming a watch or a paged list from an older
    /// resourceVersion then gets `410 Expired`, forcing a relist.
    pub fn compact(&self) {
        let mut store = lock(&self.shared.store);
        store.log.clear();
        store.compacted = store.rv;
    }

    /// How often open watches that asked for bookmarks get one (default 1 s;
    /// real servers send one about every minute).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared
            .bookmark_interval_ms
            .store(every.as_millis().max(1) as u64, Ordering::Release);
    }

    /// Watches currently open.
    pub fn watches_open(&self) -> u64 {
        self.shared.watches_open.load(Ordering::Acquire)
    }

    /// Watches started so far.
    pub fn watches_started(&self) -> u64 {
        self.shared.watches_started.load(Ordering::Acquire)
    }

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv
    }

    /// Serves a resource type (by plural, such as `httproutes`) or answers
    /// every request for it `404 NotFound`, as an API server without its CRD
    /// does. Objects stored meanwhile are kept.
    pub fn set_served(&self, plural: &str, served: bool) {
        let Some(res) = RESOURCES.iter().find(|r| r.plural == plural) else {
            return;
        };
        let mut unserved = lock(&self.shared.unserved);
        unserved.retain(|p| *p != res.plural);
        if !served {
            unserved.push(res.plural);
        }
    }

    /// An object as stored, if it exists (`namespace` is ignored for cluster-scoped kinds).
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = resource_of(api_version, kind)?;
        let ns = if RESOURCES[res].namespaced { namespace } else { "" };
        lock(&self.shared.store)
            .objects
            .get(&(res, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    fn write(&self, mut object: Value, how: Write) -> anyhow::Result<Value> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let res =
            resource_of(&api_version, &kind).ok_or_else(|| anyhow::anyhow!("{api_version}/{kind} is not served"))?;
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(!name.is_empty(), "metadata.name is required");
        let ns = if RESOURCES[res].namespaced {
            let ns = object["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            if let Some(meta) = object["metadata"].as_object_mut() {
                meta.remove("namespace");
            }
            String::new()
        };
        let key = (res, ns.clone(), name.clone());
        let mut store = lock(&self.shared.store);
        let before = store.objects.get(&key).cloned();
        let kind_of_change = match (&before, how) {
            (Some(_), Write::Create) => anyhow::bail!("409 AlreadyExists: {kind} {ns}/{name} already exists"),
            (None, Write::Update) => anyhow::bail!("404 NotFound: {kind} {ns}/{name} not found"),
            (None, _) => EventType::Added,
            (Some(_), _) => EventType::Modified,
        };
        if let Some(old) = &before {
            if how == Write::Update
                && let Some(want) = object["metadata"]["resourceVersion"].as_str()
                && !want.is_empty()
                && Some(want) != old["metadata"]["resourceVersion"].as_str()
            {
                anyhow::bail!(
                    "409 Conflict: the object has been modified; please apply your changes to the latest version and try again"
                );
            }
            object["metadata"]["uid"] = old["metadata"]["uid"].clone();
            object["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
            // metadata.generation counts spec changes, as for CRDs and most built-in kinds.
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            let spec_changed = object.get("spec") != old.get("spec");
            object["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
        } else {
            store.uid += 1;
            object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", store.uid));
            object["metadata"]["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
            object["metadata"]["generation"] = json!(1);
        }
        store.rv += 1;
        object["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        store.objects.insert(key.clone(), object.clone());
        store.record(key, kind_of_change, object.clone(), before);
        let rv = store.rv;
        drop(store);
        self.shared.changed.send_replace(rv);
        Ok(object)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Create,
    Update,
    Apply,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// `2006-01-02T15:04:05Z` for a time (UTC).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

fn status_value(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

/// A `metav1.Status` failure, as the API server sends it.
fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_value(code, reason, message))
}

fn bad_request(message: &str) -> Response<Body> {
    status_error(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn not_found() -> Response<Body> {
    status_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
}

async fn handle(state: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let line = format!("{} {}", req.method(), req.uri().path());
    lock(&state.requests).push(line);
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {ADMIN_TOKEN}"));
    if !authorized {
        return status_error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if !state.available.load(Ordering::Acquire) {
        return status_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query().unwrap_or_default());
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if let Some(r) = route(&path) {
        let res = match r {
            Route::Collection { res, .. } | Route::Item { res, .. } | Route::Status { res, .. } => res,
        };
        if lock(&state.unserved).contains(&RESOURCES[res].plural) {
            return not_found();
        }
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad_request("unreadable body"),
    };
    match (method, path.as_str()) {
        (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => token_review(&state, &body),
        (Method::GET, path) => match route(path) {
            Some(Route::Collection { res, namespace }) => {
                let selectors = match Selectors::parse(&query) {
                    Ok(s) => s,
                    Err(e) => return bad_request(&e),
                };
                let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
                if watching {
                    watch(&state, res, namespace, selectors, &query)
                } else {
                    list(&state, res, namespace.as_deref(), &selectors, &query)
                }
            }
            Some(Route::Item { res, namespace, name } | Route::Status { res, namespace, name }) => {
                get(&state, res, &namespace, &name)
            }
            None => not_found(),
        },
        (Method::PATCH, path) if matches!(route(path), Some(Route::Status { .. })) => {
            let Some(Route::Status { res, namespace, name }) = route(path) else {
                return not_found();
            };
            patch_status(&state, res, &namespace, &name, &content_type, &body)
        }
        (Method::POST | Method::PUT | Method::PATCH | Method::DELETE, path) if route(path).is_some() => status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the stand-in API server changes objects only through its test API",
        ),
        _ => not_found(),
    }
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes a
/// key, anything else (lists included) replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (k, v) in patch {
            if v.is_null() {
                target.remove(k);
            } else {
                merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// `PATCH …/{name}/status` with a merge patch: only `status` changes.
fn patch_status(
    state: &Shared,
    res: usize,
    namespace: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    if content_type.split(';').next().map(str::trim) != Some("application/merge-patch+json") {
        return status_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the stand-in accepts only application/merge-patch+json status patches, not {content_type:?}"),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return bad_request("the body is not a JSON merge patch");
    };
    let key = (res, namespace.to_owned(), name.to_owned());
    let mut store = lock(&state.store);
    let Some(before) = store.objects.get(&key).cloned() else {
        drop(store);
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} \"{name}\" not found", RESOURCES[res].plural),
        );
    };
    if let Some(want) = patch["metadata"]["resourceVersion"].as_str()
        && want != before["metadata"]["resourceVersion"].as_str().unwrap_or_default()
    {
        drop(store);
        return status_error(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                RESOURCES[res].plural
            ),
        );
    }
    let mut object = before.clone();
    // The status subresource ignores everything but status.
    if let Some(status) = patch.get("status") {
        merge_patch(&mut object["status"], status);
    }
    store.rv += 1;
    object["metadata"]["resourceVersion"] = json!(store.rv.to_string());
    store.objects.insert(key.clone(), object.clone());
    store.record(key, EventType::Modified, object.clone(), Some(before));
    let rv = store.rv;
    drop(store);
    state.changed.send_replace(rv);
    json_response(StatusCode::OK, &object)
}

fn token_review(state: &Shared, body: &[u8]) -> Response<Body> {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return bad_request("the body is not a TokenReview");
    };
    if review["kind"] != "TokenReview" || review["apiVersion"] != "authentication.k8s.io/v1" {
        return bad_request("the body is not an authentication.k8s.io/v1 TokenReview");
    }
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let known = lock(&state.tokens).get(token).cloned();
    let status = match known {
        None => {
            json!({ "authenticated": false, "error": "[invalid bearer token, token lookup failed]" })
        }
        Some(t) => {
            // The API server authenticates for the requested audiences only,
            // and answers with the intersection.
            let wanted = if wanted.is_empty() {
                vec!["https://kubernetes.default.svc".to_owned()]
            } else {
                wanted
            };
            let granted: Vec<&String> = wanted.iter().filter(|a| t.audiences.contains(a)).collect();
            if granted.is_empty() {
                json!({
                    "authenticated": false,
                    "error": format!("[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]", t.audiences, wanted),
                })
            } else {
                json!({
                    "authenticated": true,
                    "user": { "username": t.username, "uid": "00000000-0000-0000-0000-000000000000", "groups": ["system:serviceaccounts", "system:authenticated"] },
                    "audiences": granted,
                })
            }
        }
    };
    json_response(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": { "creationTimestamp": null },
            "spec": review["spec"],
            "status": status,
        }),
    )
}

enum Route {
    Collection {
        res: usize,
        namespace: Option<String>,
    },
    Item {
        res: usize,
        namespace: String,
        name: String,
    },
    Status {
        res: usize,
        namespace: String,
        name: String,
    },
}

/// `/api/v1/...` and `/apis/<group>/<version>/...` paths of served resources.
fn route(path: &str) -> Option<Route> {
    let (gv, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
        ("v1".to_owned(), rest)
    } else {
        let rest = path.strip_prefix("/apis/")?;
        let mut parts = rest.splitn(3, '/');
        let (group, version, rest) = (parts.next()?, parts.next()?, parts.next()?);
        (format!("{group}/{version}"), rest)
    };
    let find = |plural: &str| {
        RESOURCES
            .iter()
            .position(|r| r.group_version == gv && r.plural == plural)
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return None;
    }
    match segments.as_slice() {
        [plural] => Some(Route::Collection {
            res: find(plural)?,
            namespace: None,
        }),
        ["namespaces", ns, plural] => {
            let res = find(plural).filter(|r| RESOURCES[*r].namespaced)?;
            Some(Route::Collection {
                res,
                namespace: Some((*ns).to_owned()),
            })
        }
        [plural, name] => {
            let res = find(plural).filter(|r| !RESOURCES[*r].namespaced)?;
            Some(Route::Item {
                res,
                namespace: String::new(),
                name: (*name).to_owned(),
            })
        }
        ["namespaces", ns, plural, name] => {
            let res = find(plural).filter(|r| RESOURCES[*r].namespaced)?;
            Some(Route::Item {
                res,
                namespace: (*ns).to_owned(),
                name: (*name).to_owned(),
            })
        }
        // EndpointSlices have no status subresource.
        ["namespaces", ns, plural, name, "status"] if *plural != "endpointslices" => {
            let res = find(plural).filter(|r| RESOURCES[*r].namespaced)?;
            Some(Route::Status {
                res,
                namespace: (*ns).to_owned(),
                name: (*name).to_owned(),
            })
        }
        [plural, name, "status"] => {
            let res = find(plural).filter(|r| !RESOURCES[*r].namespaced)?;
            Some(Route::Status {
                res,
                namespace: String::new(),
                name: (*name).to_owned(),
            })
        }
        _ => None,
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Label and field selectors (equality-based; set-based label selectors are
/// refused rather than misread).
#[derive(Debug, Clone, Default)]
struct Selectors {
    labels: Vec<(String, Op, String)>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Exists,
    NotExists,
}

impl Selectors {
    fn parse(query: &HashMap<String, String>) -> Result<Self, String> {
        let mut sel = Selectors::default();
        for term in query
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            if term.contains('(') || term.contains(' ') {
                return Err(format!(
                    "unable to parse requirement: set-based selector {term:?} is not supported by the stand-in"
                ));
            }
            let parsed = if let Some((k, v)) = term.split_once("!=") {
                (k, Op::Ne, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, Op::Eq, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, Op::Eq, v)
            } else if let Some(k) = term.strip_prefix('!') {
                (k, Op::NotExists, "")
            } else {
                (term, Op::Exists, "")
            };
            sel.labels.push((parsed.0.to_owned(), parsed.1, parsed.2.to_owned()));
        }
        for term in query
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let (field, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: {term:?}; can't understand"));
            };
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(format!("field label not supported: {field}"));
            }
            sel.fields.push((field.to_owned(), equal, value.to_owned()));
        }
        Ok(sel)
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let labels_ok = self.labels.iter().all(|(k, op, v)| {
            let have = labels.get(k).and_then(Value::as_str);
            match op {
                Op::Eq => have == Some(v.as_str()),
                Op::Ne => have != Some(v.as_str()),
                Op::Exists => have.is_some(),
                Op::NotExists => have.is_none(),
            }
        });
        let fields_ok = self.fields.iter().all(|(field, equal, v)| {
            let path = field.trim_start_matches("metadata.");
            let have = object["metadata"][path].as_str().unwrap_or_default();
            (have == v) == *equal
        });
        labels_ok && fields_ok
    }
}

/// An object as list items carry it: without `apiVersion` and `kind`.
fn as_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    item
}

fn get(state: &Shared, res: usize, namespace: &str, name: &str) -> Response<Body> {
    let key = (res, namespace.to_owned(), name.to_owned());
    match lock(&state.store).objects.get(&key) {
        Some(obj) => json_response(StatusCode::OK, obj),
        None => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} \"{name}\" not found", RESOURCES[res].plural),
        ),
    }
}

fn expired(message: &str) -> Response<Body> {
    status_error(StatusCode::GONE, "Expired", message)
}

fn list(
    state: &Shared,
    res: usize,
    namespace: Option<&str>,
    selectors: &Selectors,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let rt = RESOURCES[res];
    let store = lock(&state.store);
    let parse_rv = |s: &str| s.parse::<u64>().map_err(|_| format!("invalid resource version {s:?}"));
    // Paging continues at the resourceVersion of the first page.
    let (at, start_after): (u64, Option<(String, String)>) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(token)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            let Some(t) = decoded else {
                return bad_request("continue key is not valid");
            };
            let rv = t["rv"].as_u64().unwrap_or_default();
            let after = (
                t["ns"].as_str().unwrap_or_default().to_owned(),
                t["name"].as_str().unwrap_or_default().to_owned(),
            );
            (rv, Some(after))
        }
        None => {
            let rv = query.get("resourceVersion").map(String::as_str).unwrap_or_default();
            match query.get("resourceVersionMatch").map(String::as_str) {
                Some("Exact") => match parse_rv(rv) {
                    Ok(n) => (n, None),
                    Err(e) => return bad_request(&e),
                },
                None | Some("" | "NotOlderThan") => {
                    if !rv.is_empty()
                        && let Err(e) = parse_rv(rv)
                    {
                        return bad_request(&e);
                    }
                    (store.rv, None)
                }
                Some(other) => return bad_request(&format!("resourceVersionMatch: Unsupported value: {other:?}")),
            }
        }
    };
    let Some(objects) = store.state_at(res, at) else {
        return if start_after.is_some() {
            expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results.",
            )
        } else {
            expired(&format!("too old resource version: {at} ({})", store.compacted + 1))
        };
    };
    drop(store);
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let matching: Vec<(&ObjKey, &Value)> = objects
        .iter()
        .filter(|(k, _)| namespace.is_none_or(|ns| k.1 == ns))
        .filter(|(k, _)| start_after.as_ref().is_none_or(|(ns, name)| (&k.1, &k.2) > (ns, name)))
        .filter(|(_, v)| selectors.matches(v))
        .collect();
    let total = matching.len();
    let page: Vec<&(&ObjKey, &Value)> = matching.iter().take(limit.unwrap_or(usize::MAX)).collect();
    let mut metadata = json!({ "resourceVersion": at.to_string() });
    if page.len() < total
        && let Some((last, _)) = page.last()
    {
        let token = json!({ "rv": at, "ns": last.1, "name": last.2 });
        metadata["continue"] = json!(base64::engine::general_purpose::STANDARD.encode(token.to_string()));
        metadata["remainingItemCount"] = json!(total - page.len());
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", rt.kind),
            "apiVersion": rt.group_version,
            "metadata": metadata,
            "items": page.iter().map(|(_, v)| as_item(v)).collect::<Vec<_>>(),
        }),
    )
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(rt: ResourceType, rv: u64, initial_events_end: bool) -> Bytes {
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end {
        meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    event_line(
        "BOOKMARK",
        &json!({ "kind": rt.kind, "apiVersion": rt.group_version, "metadata": meta }),
    )
}

/// How a watch starts.
enum Start {
    /// Synthetic ADDED events for the current state, then changes (no or "0"
    /// resourceVersion, or `sendInitialEvents`); the flag asks for the
    /// closing bookmark of `sendInitialEvents`.
    Current { initial_events_end: bool },
    /// Changes after this resourceVersion.
    After(u64),
}

fn watch(
    state: &Arc<Shared>,
    res: usize,
    namespace: Option<String>,
    selectors: Selectors,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let bookmarks = matches!(query.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"));
    let send_initial = matches!(query.get("sendInitialEvents").map(String::as_str), Some("true" | "1"));
    let rv = query.get("resourceVersion").map(String::as_str).unwrap_or_default();
    let start = if send_initial {
        if query.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") || !bookmarks {
            return status_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "sendInitialEvents requires resourceVersionMatch=NotOlderThan and allowWatchBookmarks=true",
            );
        }
        Start::Current {
            initial_events_end: true,
        }
    } else if rv.is_empty() || rv == "0" {
        Start::Current {
            initial_events_end: false,
        }
    } else {
        match rv.parse::<u64>() {
            Ok(n) => Start::After(n),
            Err(_) => return bad_request(&format!("invalid resource version {rv:?}")),
        }
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        // Without a timeout a real server picks one between 30 and 60 minutes.
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    state.watches_started.fetch_add(1, Ordering::AcqRel);
    // A drop after this request was accepted must end it, even if its task
    // has not started yet.
    let generation = *state.drops.borrow();
    tokio::spawn(run_watch(
        state.clone(),
        WatchSpec {
            res,
            namespace,
            selectors,
            start,
            bookmarks,
            timeout,
            generation,
        },
        tx,
    ));
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok(Frame::data(b))));
    let mut rsp = Response::new(body.boxed_unsync());
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

struct WatchSpec {
    res: usize,
    namespace: Option<String>,
    selectors: Selectors,
    start: Start,
    bookmarks: bool,
    timeout: Duration,
    /// The drop generation when the watch was accepted.
    generation: u64,
}

impl WatchSpec {
    fn wants(&self, key: &ObjKey, object: &Value) -> bool {
        key.0 == self.res && self.namespace.as_ref().is_none_or(|ns| *ns == key.1) && self.selectors.matches(object)
    }
}

/// Counts an open watch for as long as it lives.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.watches_open.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn run_watch(state: Arc<Shared>, spec: WatchSpec, tx: mpsc::Sender<Bytes>) {
    state.watches_open.fetch_add(1, Ordering::AcqRel);
    let _open = OpenWatch(state.clone());
    let rt = RESOURCES[spec.res];
    let mut changed = state.changed.subscribe();
    let mut drops = state.drops.subscribe();
    if *drops.borrow_and_update() != spec.generation {
        return;
    }
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let too_old = |rv: u64, compacted: u64| {
        event_line(
            "ERROR",
            &status_value(
                StatusCode::GONE,
                "Expired",
                &format!("too old resource version: {rv} ({})", compacted + 1),
            ),
        )
    };

    let (mut cursor, initial, expired) = {
        changed.borrow_and_update();
        let store = lock(&state.store);
        match spec.start {
            Start::Current { initial_events_end } => {
                let mut lines: Vec<Bytes> = store
                    .objects
                    .iter()
                    .filter(|(k, v)| spec.wants(k, v))
                    .map(|(_, v)| event_line("ADDED", v))
                    .collect();
                if initial_events_end {
                    lines.push(bookmark(rt, store.rv, true));
                }
                (store.rv, lines, false)
            }
            Start::After(rv) if rv < store.compacted => (rv, vec![too_old(rv, store.compacted)], true),
            Start::After(rv) => (rv, Vec::new(), false),
        }
    };
    for line in initial {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    if expired {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(
        state.bookmark_interval_ms.load(Ordering::Acquire).max(1),
    ));
    ticker.tick().await;
    loop {
        let (lines, expired) = {
            let store = lock(&state.store);
            if cursor < store.compacted {
                // The watcher fell behind the history kept.
                (vec![too_old(cursor, store.compacted)], true)
            } else {
                let mut lines = Vec::new();
                for ev in store.log.iter().filter(|e| e.rv > cursor) {
                    let now = spec.wants(&ev.key, &ev.object);
                    let before = ev.before.as_ref().is_some_and(|b| spec.wants(&ev.key, b));
                    // An object entering or leaving a selector is added or
                    // deleted as far as this watch is concerned.
                    let kind = match (ev.kind, before, now) {
                        (EventType::Deleted, true, _) => Some(EventType::Deleted),
                        (EventType::Deleted, false, _) => None,
                        (_, false, true) => Some(EventType::Added),
                        (_, true, true) => Some(EventType::Modified),
                        (_, true, false) => Some(EventType::Deleted),
                        (_, false, false) => None,
                    };
                    if let Some(kind) = kind {
                        lines.push(event_line(kind.as_str(), &ev.object));
                    }
                }
                cursor = cursor.max(store.rv);
                (lines, false)
            }
        };
        for line in lines {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        tokio::select! {
            c = changed.changed() => if c.is_err() { return },
            _ = drops.changed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = ticker.tick(), if spec.bookmarks => {
                if tx.send(bookmark(rt, cursor, false)).await.is_err() {
                    return;
                }
            }
        }
    }
}
