//! A stand-in Kubernetes API server for tests: real HTTPS, bearer-token
//! authentication, and the real REST shapes (JSON objects, `Status` errors,
//! `201 Created` on create). It serves what sidemesh uses of the API:
//! `TokenReview` create. Clients reach it through a kubeconfig it writes,
//! exactly as they would reach a real cluster.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

/// The bearer token clients must present (written into the kubeconfig).
pub const ADMIN_TOKEN: &str = "stand-in-admin-token";

/// A token the stand-in knows: whose it is and for which audiences.
#[derive(Debug, Clone)]
pub struct KnownToken {
    /// e.g. `system:serviceaccount:default:frontend`.
    pub username: String,
    /// Audiences the token was issued for.
    pub audiences: Vec<String>,
}

/// A running stand-in API server.
#[derive(Debug)]
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// A kubeconfig pointing at it.
    pub kubeconfig: PathBuf,
    tokens: Arc<Mutex<HashMap<String, KnownToken>>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: tokio::sync::watch::Sender<bool>,
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

        let tokens: Arc<Mutex<HashMap<String, KnownToken>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let state = State {
            tokens: tokens.clone(),
            requests: requests.clone(),
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut accept_stopped = stopped.clone();
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
                        async move { Ok::<_, std::convert::Infallible>(state.handle(req).await) }
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
            tokens,
            requests,
            stop,
        })
    }

    /// Makes `token` valid for `system:serviceaccount:<ns>:<sa>` and `audiences`.
    pub fn add_token(&self, token: &str, namespace: &str, service_account: &str, audiences: &[&str]) {
        if let Ok(mut t) = self.tokens.lock() {
            t.insert(
                token.to_owned(),
                KnownToken {
                    username: format!("system:serviceaccount:{namespace}:{service_account}"),
                    audiences: audiences.iter().map(|s| (*s).to_owned()).collect(),
                },
            );
        }
    }

    /// `METHOD path` of every request served so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Stops serving (the listener closes; clients see connection refused).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

#[derive(Clone)]
struct State {
    tokens: Arc<Mutex<HashMap<String, KnownToken>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// A `metav1.Status` failure, as the API server sends it.
fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

impl State {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let line = format!("{} {}", req.method(), req.uri().path());
        if let Ok(mut r) = self.requests.lock() {
            r.push(line);
        }
        let authorized = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {ADMIN_TOKEN}"));
        if !authorized {
            return status_error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return status_error(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
            }
        };
        match (method, path.as_str()) {
            (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => self.token_review(&body),
            _ => status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            ),
        }
    }

    fn token_review(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let Ok(review) = serde_json::from_slice::<Value>(body) else {
            return status_error(StatusCode::BAD_REQUEST, "BadRequest", "the body is not a TokenReview");
        };
        if review["kind"] != "TokenReview" || review["apiVersion"] != "authentication.k8s.io/v1" {
            return status_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the body is not an authentication.k8s.io/v1 TokenReview",
            );
        }
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let wanted: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let known = self.tokens.lock().ok().and_then(|t| t.get(token).cloned());
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
}
