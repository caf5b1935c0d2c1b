//! Talking to the injector as the API server does: AdmissionReview JSON over
//! HTTPS on a kept-alive connection, verifying the webhook's certificate
//! against the `caBundle` CA; and validating objects against the Kubernetes
//! schemas with `kubernetes-validate` (strict).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

/// An HTTP/1.1 connection to the webhook over TLS, kept alive.
pub struct WebhookClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl std::fmt::Debug for WebhookClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookClient").finish_non_exhaustive()
    }
}

/// A TLS client configuration trusting only `ca_pem`.
pub fn tls_config(ca_pem: &str, alpn: &[&[u8]]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

impl WebhookClient {
    /// Connects to `addr`, verifying the certificate for `server_name` against `ca_pem`.
    pub async fn connect(addr: SocketAddr, ca_pem: &str, server_name: &str) -> anyhow::Result<Self> {
        let config = tls_config(ca_pem, &[b"http/1.1"])?;
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(server_name.to_owned())?, tcp)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { sender })
    }

    /// Sends `method path` with `body`; returns status, content type and body.
    pub async fn request(&mut self, method: &str, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, String, Vec<u8>)> {
        self.sender.ready().await?;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "sidemesh-injector.sidemesh-system.svc")
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, */*")
            .body(Full::new(Bytes::from(body)))?;
        let rsp = self.sender.send_request(req).await?;
        let status = rsp.status().as_u16();
        let content_type = rsp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = rsp.into_body().collect().await?.to_bytes().to_vec();
        Ok((status, content_type, body))
    }

    /// POSTs an AdmissionReview to `/inject`; returns status and body.
    pub async fn review(&mut self, review: &Value) -> anyhow::Result<(u16, Vec<u8>)> {
        let (status, _, body) = self.request("POST", "/inject", serde_json::to_vec(review)?).await?;
        Ok((status, body))
    }
}

/// An `admission.k8s.io/v1` AdmissionReview for creating `pod` in
/// `namespace`, shaped as the API server sends it.
pub fn pod_review(uid: &str, namespace: &str, pod: &Value) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"].as_str().unwrap_or_default(),
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "1d2a1e9e-0000-0000-0000-000000000000",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// The decoded JSON Patch of an AdmissionReview answer, if it has one.
pub fn decode_patch(answer: &Value) -> anyhow::Result<Option<Value>> {
    let Some(patch) = answer["response"].get("patch") else {
        return Ok(None);
    };
    let text = patch
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("response.patch is not a string: {patch}"))?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text)?;
    Ok(Some(serde_json::from_slice(&bytes)?))
}

/// Whether `kubernetes-validate` is installed (`pip install kubernetes-validate`).
pub fn have_kubernetes_validate() -> bool {
    Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Validates objects against the Kubernetes 1.34 schemas in strict mode
/// (unknown fields are errors). `Err` holds the tool's report.
pub fn kubernetes_validate(dir: &Path, name: &str, objects: &[Value]) -> Result<(), String> {
    let mut files = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        let path = dir.join(format!("{name}-{i}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(object).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        files.push(path);
    }
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", "1.34.0"])
        .args(&files)
        .output()
        .map_err(|e| format!("running kubernetes-validate: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
