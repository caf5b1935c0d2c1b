//! The `sidemesh.identity.v1.Identity` gRPC service: `Certify` and `WatchIssuer`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use sidemesh_identity_client::SpiffeId;
use sidemesh_proto::identity::v1::identity_server::Identity;
use sidemesh_proto::identity::v1::{CertifyRequest, CertifyResponse, IssuerState, WatchIssuerRequest};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::issuer::Issuer;
use crate::metrics::IdentityMetrics;
use crate::token::{ReviewError, TokenReviewer};

/// The certificate authority behind the gRPC API.
#[derive(Clone, Debug)]
pub struct Authority {
    trust_domain: Arc<str>,
    leaf_lifetime: Duration,
    reviewer: TokenReviewer,
    issuer: watch::Receiver<Arc<Issuer>>,
    metrics: IdentityMetrics,
    shutdown: Option<watch::Receiver<bool>>,
}

/// A refusal: the gRPC status and the metric reason.
struct Refusal(Status, &'static str);

impl Authority {
    /// An authority issuing for `trust_domain` with the issuer published on `issuer`.
    pub fn new(
        trust_domain: &str,
        leaf_lifetime: Duration,
        reviewer: TokenReviewer,
        issuer: watch::Receiver<Arc<Issuer>>,
        metrics: IdentityMetrics,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            leaf_lifetime,
            reviewer,
            issuer,
            metrics,
            shutdown: None,
        }
    }

    /// Ends `WatchIssuer` streams once `shutdown` turns true: a stream that
    /// never ends would hold a stopping server for its whole grace period,
    /// and its clients are better off reconnecting to another replica at once.
    pub fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    async fn certify(&self, req: CertifyRequest) -> Result<CertifyResponse, Refusal> {
        let invalid = |reason, msg: String| Refusal(Status::invalid_argument(msg), reason);
        let denied = |reason, msg: String| Refusal(Status::permission_denied(msg), reason);
        if req.identity.is_empty() {
            return Err(invalid(
                "missing_field",
                "identity is empty: set it to the SPIFFE ID to certify".into(),
            ));
        }
        if req.token.is_empty() {
            return Err(invalid(
                "missing_field",
                "token is empty: send the ServiceAccount token".into(),
            ));
        }
        let id: SpiffeId = req
            .identity
            .parse()
            .map_err(|e: sidemesh_identity_client::spiffe::SpiffeIdError| invalid("bad_identity", e.to_string()))?;
        if id.trust_domain() != &*self.trust_domain {
            return Err(denied(
                "foreign_trust_domain",
                format!("{id} is not in trust domain {}", self.trust_domain),
            ));
        }
        // Cheap local checks before the token review, which may be a network call.
        let csr = crate::csr::check(&req.certificate_signing_request).map_err(|e| invalid("bad_csr", e.to_string()))?;
        if csr.other_sans || csr.uris.is_empty() || csr.uris.len() > 1 {
            return Err(invalid(
                "bad_csr",
                format!(
                    "the CSR's only SAN must be the URI {id}; it asks for {:?} and other names: {}",
                    csr.uris, csr.other_sans
                ),
            ));
        }
        let sa = self.reviewer.review(&req.token).await.map_err(|e| match e {
            ReviewError::Rejected(m) => Refusal(Status::permission_denied(format!("token refused: {m}")), "bad_token"),
            ReviewError::Unavailable(m) => Refusal(Status::unavailable(m), "reviewer_unavailable"),
        })?;
        if sa.namespace != id.namespace() || sa.service_account != id.service_account() {
            return Err(denied(
                "identity_mismatch",
                format!(
                    "the token is for serviceaccount {}/{}, which may not request {id}",
                    sa.namespace, sa.service_account
                ),
            ));
        }
        if csr.uris[0] != id.to_string() {
            return Err(denied(
                "csr_identity_mismatch",
                format!("the CSR asks for {}, but the request is for {id}", csr.uris[0]),
            ));
        }
        let issuer = self.issuer.borrow().clone();
        let dns = control_plane_dns_names(&id);
        let (leaf, valid_until) = issuer
            .sign(&id, &dns, &csr.public_key, self.leaf_lifetime)
            .map_err(|e| Refusal(Status::internal(format!("signing: {e}")), "signing_failed"))?;
        tracing::debug!(%id, issuer = %issuer.fingerprint(), "certificate issued");
        Ok(CertifyResponse {
            leaf_certificate: leaf.to_vec(),
            intermediate_certificates: issuer.chain().iter().map(|c| c.to_vec()).collect(),
            valid_until: Some(timestamp(valid_until)),
        })
    }
}

/// Control-plane workloads (ServiceAccounts in `sidemesh-system`) also get the
/// DNS names of their Service, so standard gRPC clients can verify them.
pub fn control_plane_dns_names(id: &SpiffeId) -> Vec<String> {
    if id.namespace() != "sidemesh-system" {
        return Vec::new();
    }
    let svc = format!("{}.{}.svc", id.service_account(), id.namespace());
    vec![format!("{svc}.cluster.local"), svc]
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

type IssuerStream = Pin<Box<dyn Stream<Item = Result<IssuerState, Status>> + Send>>;

#[tonic::async_trait]
impl Identity for Authority {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let started = Instant::now();
        let identity = request.get_ref().identity.clone();
        match Authority::certify(self, request.into_inner()).await {
            Ok(rsp) => {
                self.metrics.issued(started.elapsed().as_secs_f64());
                Ok(Response::new(rsp))
            }
            Err(Refusal(status, reason)) => {
                self.metrics.refused(reason, started.elapsed().as_secs_f64());
                tracing::info!(identity = %identity.chars().take(200).collect::<String>(), reason, message = status.message(), "certify refused");
                Err(status)
            }
        }
    }

    type WatchIssuerStream = IssuerStream;

    async fn watch_issuer(&self, _request: Request<WatchIssuerRequest>) -> Result<Response<IssuerStream>, Status> {
        let stream = tokio_stream::wrappers::WatchStream::new(self.issuer.clone());
        let stopped = {
            let shutdown = self.shutdown.clone();
            async move {
                match shutdown {
                    Some(mut rx) => {
                        let _ = rx.wait_for(|s| *s).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        };
        let stream = futures::StreamExt::take_until(stream, Box::pin(stopped));
        let stream = futures::StreamExt::map(stream, |issuer| {
            Ok(IssuerState {
                issuer_fingerprint: issuer.fingerprint().to_owned(),
                since: Some(timestamp(issuer.loaded_at())),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
