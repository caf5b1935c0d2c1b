//! The `sidemesh.destination.v1.Destination` service: one `Discover` stream
//! per proxy, any number of subscriptions on it (up to a limit), and for each
//! the full state at once and again on every change.
//!
//! Per stream the memory is bounded: one watch receiver per subscription
//! (which only ever holds the latest state) and a short outbound queue. A slow
//! reader therefore skips intermediate states instead of growing a backlog.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sidemesh_proto::destination::v1::destination_server::Destination;
use sidemesh_proto::destination::v1::{DiscoveryRequest, DiscoveryResponse, discovery_request};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::{StreamExt as _, StreamMap};
use tonic::{Request, Response, Status, Streaming};

use crate::index::Resolution;
use crate::indexer::{Indexer, Resolved};
use crate::metrics::DestinationMetrics;
use crate::server::stopped;

/// Responses queued per stream before the stream waits for the client.
const OUTBOUND_QUEUE: usize = 16;
/// The longest target string accepted (`[ipv6]:port` is at most 47 bytes).
const MAX_TARGET_LEN: usize = 64;
/// How long a closing status may wait for room in a slow client's queue.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The discovery service.
#[derive(Clone, Debug)]
pub struct Discovery {
    indexer: Indexer,
    metrics: DestinationMetrics,
    max_subscriptions: usize,
    shutdown: watch::Receiver<bool>,
}

impl Discovery {
    /// Serves `indexer`; streams end with `UNAVAILABLE` once `shutdown` is true.
    pub fn new(
        indexer: Indexer,
        metrics: DestinationMetrics,
        max_subscriptions: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            indexer,
            metrics,
            max_subscriptions,
            shutdown,
        }
    }
}

/// Parses a subscription target: `ip:port` or `[ipv6]:port`, a unicast
/// address and a non-zero port. IPv4-mapped IPv6 addresses become IPv4 (what
/// the original destination of an IPv4 connection on a dual-stack socket is).
pub fn parse_target(s: &str) -> Result<SocketAddr, String> {
    if s.len() > MAX_TARGET_LEN {
        let head: String = s.chars().take(32).collect();
        return Err(format!(
            "{head:?}… ({} bytes) is not an ip:port address: longer than {MAX_TARGET_LEN} bytes",
            s.len()
        ));
    }
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an ip:port address (such as \"10.96.0.10:80\" or \"[fd00::10]:80\")"))?;
    let ip = addr.ip().to_canonical();
    if addr.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{s:?} is not a unicast address with a non-zero port"));
    }
    Ok(SocketAddr::new(ip, addr.port()))
}

fn result_label(r: &Resolution) -> &'static str {
    match r {
        Resolution::Service(_) => "service",
        Resolution::Pod(_) => "pod",
        Resolution::Unknown(_) => "unknown",
    }
}

/// The subscriptions of one stream; releases them however the stream ends.
struct Subscriptions {
    streams: StreamMap<SocketAddr, WatchStream<Arc<Resolved>>>,
    /// Targets whose next state is the one current when subscribed (no lag to report).
    fresh: HashSet<SocketAddr>,
    indexer: Indexer,
    metrics: DestinationMetrics,
}

impl Subscriptions {
    fn add(&mut self, target: SocketAddr) {
        let stream = WatchStream::new(self.indexer.subscribe(target));
        if self.streams.insert(target, stream).is_none() {
            self.metrics.subscriptions(1);
        }
        self.fresh.insert(target);
    }

    fn remove(&mut self, target: SocketAddr) {
        if let Some(stream) = self.streams.remove(&target) {
            // The receiver must be gone before the indexer checks for followers.
            drop(stream);
            self.fresh.remove(&target);
            self.indexer.release(target);
            self.metrics.subscriptions(-1);
        }
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        let targets: Vec<SocketAddr> = self.streams.keys().copied().collect();
        self.streams = StreamMap::new();
        for target in &targets {
            self.indexer.release(*target);
        }
        self.metrics.subscriptions(-(targets.len() as i64));
        self.metrics.stream(-1);
    }
}

/// Why a stream is ended by the server.
struct Refusal(Status, &'static str);

impl Discovery {
    fn handle(&self, subs: &mut Subscriptions, req: DiscoveryRequest) -> Result<(), Refusal> {
        let bad = |m: String| Refusal(Status::invalid_argument(m), "bad_target");
        match req.request {
            Some(discovery_request::Request::Subscribe(t)) => {
                let target = parse_target(&t).map_err(|e| bad(format!("subscribe: {e}")))?;
                if !subs.streams.contains_key(&target) && subs.streams.len() >= self.max_subscriptions {
                    return Err(Refusal(
                        Status::resource_exhausted(format!(
                            "subscribe {target}: this stream already follows {} targets, the limit; unsubscribe from some first",
                            self.max_subscriptions
                        )),
                        "too_many_subscriptions",
                    ));
                }
                subs.add(target);
            }
            Some(discovery_request::Request::Unsubscribe(t)) => {
                let target = parse_target(&t).map_err(|e| bad(format!("unsubscribe: {e}")))?;
                subs.remove(target);
            }
            None => {
                return Err(Refusal(
                    Status::invalid_argument("empty DiscoveryRequest: set subscribe or unsubscribe"),
                    "empty_request",
                ));
            }
        }
        Ok(())
    }

    async fn run(
        self,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        peer: String,
        peer_ns: Option<String>,
    ) {
        self.metrics.stream(1);
        let mut subs = Subscriptions {
            streams: StreamMap::new(),
            fresh: HashSet::new(),
            indexer: self.indexer.clone(),
            metrics: self.metrics.clone(),
        };
        let mut shutdown = self.shutdown.clone();
        let mut shutdown_while_sending = self.shutdown.clone();
        let mut inbound_open = true;
        let closing = loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => {
                    break Some(Status::unavailable("the destination service is shutting down; reconnect"));
                }
                _ = tx.closed() => break None,
                msg = inbound.message(), if inbound_open => match msg {
                    Ok(Some(req)) => {
                        if let Err(Refusal(status, reason)) = self.handle(&mut subs, req) {
                            self.metrics.refused(reason);
                            tracing::info!(%peer, reason, message = status.message(), "discovery stream refused");
                            break Some(status);
                        }
                    }
                    // The client will send no more requests; it still wants updates.
                    Ok(None) => inbound_open = false,
                    // A cancelled stream, or a request that could not be decoded
                    // (too large, not protobuf): say why, in case anyone listens.
                    Err(status) => {
                        tracing::debug!(%peer, error = %status, "discovery request stream failed");
                        break Some(status);
                    }
                },
                Some((target, state)) = subs.streams.next(), if !subs.streams.is_empty() => {
                    let lag = if subs.fresh.remove(&target) {
                        None
                    } else {
                        state.changed_at.map(|at| at.elapsed().as_secs_f64())
                    };
                    let label = result_label(&state.result);
                    // Consumer routes are chosen per client namespace here, so
                    // that the per-address state stays shared by all streams.
                    let rsp = DiscoveryResponse {
                        target: target.to_string(),
                        result: Some(state.view(peer_ns.as_deref())),
                    };
                    tokio::select! {
                        sent = tx.send(Ok(rsp)) => if sent.is_err() { break None },
                        _ = stopped(&mut shutdown_while_sending) => {
                            break Some(Status::unavailable("the destination service is shutting down; reconnect"));
                        }
                    }
                    self.metrics.update_sent(label, lag);
                }
            }
        };
        drop(subs);
        if let Some(status) = closing {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, tx.send(Err(status))).await;
        }
    }
}

/// The SPIFFE ID of the client, from the certificate it presented.
fn peer_id<T>(request: &Request<T>) -> Option<sidemesh_identity_client::SpiffeId> {
    request
        .peer_certs()
        .and_then(|certs| {
            certs
                .first()
                .map(|leaf| sidemesh_identity_client::verify::peer_id(leaf))
        })
        .and_then(Result::ok)
}

#[tonic::async_trait]
impl Destination for Discovery {
    type DiscoverStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn discover(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::DiscoverStream>, Status> {
        let id = peer_id(&request);
        let peer = id.as_ref().map_or_else(|| "unknown".to_owned(), ToString::to_string);
        let peer_ns = id.map(|id| id.namespace().to_owned());
        tracing::debug!(%peer, "discovery stream opened");
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        tokio::spawn(self.clone().run(request.into_inner(), tx, peer, peer_ns));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("10.0.0.1:80").unwrap().to_string(), "10.0.0.1:80");
        assert_eq!(parse_target("[fd00::1]:80").unwrap().to_string(), "[fd00::1]:80");
        assert_eq!(parse_target("[::ffff:10.0.0.1]:80").unwrap().to_string(), "10.0.0.1:80");
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1:0",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "10.0.0.1:65536",
            "web.default:80",
            "fd00::1:80",
            &"9".repeat(5000),
        ] {
            assert!(parse_target(bad).is_err(), "{bad:?}");
        }
    }
}
