//! Plain HTTP to the local application and to unmeshed upstreams, pooled
//! per address: idle HTTP/1.1 connections for reuse, one shared HTTP/2
//! connection.
//!
//! Built on hyper's connection API rather than hyper-util's pooled client:
//! a request here is a lookup in a short list, not a boxed multi-kilobyte
//! future and a spawned task to return the connection to the pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::http::Body;
use crate::pool::{ConnectError, connect_tcp, drive};

/// HTTP/1.1 connections kept per address for reuse; a connection finishing
/// past this is closed.
const MAX_HTTP1: usize = 256;

/// A connection unused this long is closed (hyper-util's pooled client's
/// default is 90 s; an application's own idle timeout is usually longer).
const IDLE: Duration = Duration::from_secs(60);

/// How often the pools are swept of idle and closed connections.
const SWEEP: Duration = Duration::from_secs(10);

/// Why a plain request failed.
#[derive(Debug, thiserror::Error)]
pub enum PlainError {
    /// No connection.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection failed before a response.
    #[error("HTTP to {addr}: {source}")]
    Http {
        /// Upstream.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: hyper::Error,
    },
}

/// Pooled plain HTTP connections.
#[derive(Debug, Default)]
pub struct PlainClients {
    /// Connections handed out, newest last. A connection goes back as soon
    /// as its response head arrives and is reused once hyper says it is
    /// ready again (its response body done), so this list may hold busy ones.
    http1: Mutex<Http1Pools>,
    http2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

/// HTTP/1 connections per address, each with when it was last handed back.
#[derive(Debug)]
struct Http1Pools {
    by_addr: HashMap<SocketAddr, Vec<(http1::SendRequest<Body>, Instant)>>,
    swept: Instant,
}

impl Default for Http1Pools {
    fn default() -> Self {
        Self {
            by_addr: HashMap::new(),
            swept: Instant::now(),
        }
    }
}

impl Http1Pools {
    /// Drops closed connections and those idle past [`IDLE`], everywhere.
    fn sweep(&mut self, now: Instant) {
        self.swept = now;
        self.by_addr.retain(|_, list| {
            list.retain(|(s, used)| !s.is_closed() && now.duration_since(*used) < IDLE);
            !list.is_empty()
        });
    }
}

/// Requests on an HTTP/1 connection carry the origin form (`/path?query`).
pub(crate) fn origin_form(uri: &mut Uri) {
    let path = match uri.path_and_query() {
        Some(p) if p.as_str() != "/" && !p.as_str().is_empty() => p.clone(),
        _ => http::uri::PathAndQuery::from_static("/"),
    };
    *uri = Uri::from(path);
}

impl PlainClients {
    /// Empty pools.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `req` to `addr` over HTTP/2 (prior knowledge) when it is an
    /// HTTP/2 request, else over HTTP/1.1.
    pub async fn request(&self, addr: SocketAddr, req: Request<Body>) -> Result<Response<Incoming>, PlainError> {
        if req.version() == Version::HTTP_2 {
            self.request_http2(addr, req).await
        } else {
            self.request_http1(addr, req).await
        }
    }

    /// A ready pooled HTTP/1 connection to `addr`; closed ones are dropped.
    fn ready_http1(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut pools = self.http1.lock().unwrap_or_else(|p| p.into_inner());
        let list = pools.by_addr.get_mut(&addr)?;
        list.retain(|(s, _)| !s.is_closed());
        let found = list.iter().rposition(|(s, _)| s.is_ready()).map(|i| list.remove(i).0);
        if list.is_empty() {
            pools.by_addr.remove(&addr);
        }
        found
    }

    fn release_http1(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        let now = Instant::now();
        let mut pools = self.http1.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(pools.swept) >= SWEEP {
            pools.sweep(now);
            let mut h2 = self.http2.lock().unwrap_or_else(|p| p.into_inner());
            h2.retain(|_, s| !s.is_closed());
        }
        let list = pools.by_addr.entry(addr).or_default();
        if list.len() < MAX_HTTP1 {
            list.push((sender, now));
        }
    }

    async fn request_http1(&self, addr: SocketAddr, mut req: Request<Body>) -> Result<Response<Incoming>, PlainError> {
        origin_form(req.uri_mut());
        if let Some(mut sender) = self.ready_http1(addr) {
            match sender.try_send_request(req).await {
                Ok(rsp) => {
                    self.release_http1(addr, sender);
                    return Ok(rsp);
                }
                // The upstream closed the idle connection before the request
                // went out: it is safe to send again on a new one.
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => {
                        return Err(PlainError::Http {
                            addr,
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
        // Boxed: connecting is rare and its future large.
        let mut sender = Box::pin(connect_http1(addr)).await?;
        let rsp = sender
            .send_request(req)
            .await
            .map_err(|source| PlainError::Http { addr, source })?;
        self.release_http1(addr, sender);
        Ok(rsp)
    }

    async fn request_http2(&self, addr: SocketAddr, req: Request<Body>) -> Result<Response<Incoming>, PlainError> {
        let pooled = {
            let pools = self.http2.lock().unwrap_or_else(|p| p.into_inner());
            pools.get(&addr).filter(|s| s.is_ready()).cloned()
        };
        let mut sender = match pooled {
            Some(s) => s,
            None => {
                let s = Box::pin(connect_http2(addr)).await?;
                let mut pools = self.http2.lock().unwrap_or_else(|p| p.into_inner());
                pools.insert(addr, s.clone());
                s
            }
        };
        sender
            .send_request(req)
            .await
            .map_err(|source| PlainError::Http { addr, source })
    }
}

async fn connect_http1(addr: SocketAddr) -> Result<http1::SendRequest<Body>, PlainError> {
    let tcp = connect_tcp(addr).await?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|source| PlainError::Http { addr, source })?;
    drive(addr, "HTTP/1", conn);
    Ok(sender)
}

async fn connect_http2(addr: SocketAddr) -> Result<http2::SendRequest<Body>, PlainError> {
    let tcp = connect_tcp(addr).await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|source| PlainError::Http { addr, source })?;
    drive(addr, "HTTP/2", conn);
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt as _, Full};
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn origin_form_keeps_path_and_query_only() {
        let mut uri: Uri = "http://10.0.0.1:8080/a/b?x=1".parse().expect("uri");
        origin_form(&mut uri);
        assert_eq!(uri, "/a/b?x=1");
        let mut uri: Uri = "http://10.0.0.1:8080".parse().expect("uri");
        origin_form(&mut uri);
        assert_eq!(uri, "/");
    }

    /// An HTTP/1.1 server answering every request with its path; it counts
    /// connections and, with `close_after_response`, closes each after one response.
    async fn server(close_after_response: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = Full::new(bytes::Bytes::from(req.uri().path().to_owned()));
                    Ok::<_, std::convert::Infallible>(Response::new(body))
                });
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close_after_response)
                        .serve_connection(TokioIo::new(tcp), svc);
                    let _ = conn.await;
                });
            }
        });
        (addr, accepted)
    }

    async fn get(clients: &PlainClients, addr: SocketAddr, path: &str) -> String {
        let req = Request::get(format!("http://{addr}{path}"))
            .header(http::header::HOST, addr.to_string())
            .body(crate::http::full(bytes::Bytes::new()))
            .expect("request");
        let rsp = clients.request(addr, req).await.expect("response");
        let body = rsp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = server(false).await;
        let clients = PlainClients::new();
        for i in 0..5 {
            assert_eq!(get(&clients, addr, &format!("/r{i}")).await, format!("/r{i}"));
            // Let the connection task see the response through, as the next request would.
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_a_failed_request() {
        let (addr, accepted) = server(true).await;
        let clients = PlainClients::new();
        for i in 0..3 {
            assert_eq!(get(&clients, addr, &format!("/c{i}")).await, format!("/c{i}"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }
}
