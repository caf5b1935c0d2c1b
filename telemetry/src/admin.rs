//! The plain-HTTP admin endpoint every component serves: `/live`, `/ready`,
//! `/metrics`, plus routes a component adds (the proxy's `/debug/state`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::Metrics;

/// Extra routes: returns `None` for paths it does not serve.
pub type ExtraRoutes = Arc<dyn Fn(&Method, &str) -> Option<Response<Full<Bytes>>> + Send + Sync>;

/// What the admin endpoint serves.
#[derive(Clone)]
pub struct Admin {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    extra: Option<ExtraRoutes>,
}

impl Admin {
    /// An admin endpoint that reports not-ready until [`Admin::set_ready`].
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            extra: None,
        }
    }

    /// Adds component-specific routes.
    pub fn with_routes(mut self, extra: ExtraRoutes) -> Self {
        self.extra = Some(extra);
        self
    }

    /// Marks the component ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") if self.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
            (&Method::GET, "/ready") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            (&Method::GET, "/metrics") => {
                let mut rsp = Response::new(Full::new(Bytes::from(self.metrics.render())));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                rsp
            }
            (method, path) => self
                .extra
                .as_ref()
                .and_then(|extra| extra(method, path))
                .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n")),
        }
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let this = Arc::new(self);
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::debug!(error = %e, "admin accept");
                        continue;
                    }
                },
            };
            let this = this.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let rsp = this.respond(&req);
                    async move { Ok::<_, Infallible>(rsp) }
                });
                if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                    tracing::debug!(error = %e, "admin connection");
                }
            });
        }
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp
}
