//! HTTP/1.1 upgrades: WebSocket, and any other protocol a client switches to
//! with `Connection: upgrade`. HTTP/2 has no such mechanism, so an upgrade
//! cannot ride the pooled HTTP/2 connection between proxies: the request
//! gets a connection of its own (an opaque mTLS stream to a meshed endpoint,
//! which the server proxy relays to the application as TCP; plain TCP
//! otherwise), is sent there as HTTP/1.1, and when the upstream answers
//! `101 Switching Protocols` both sides are handed to a byte relay.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::drain::Guard;
use crate::http::{Body, strip_hop_by_hop};

/// Whether a request head asks to switch protocols (HTTP/1.1 only). An
/// upgrade to `h2c` is not one: the proxy answers in HTTP/1.1 as a server
/// that ignores it would (the header goes with the hop-by-hop ones), and
/// the requests stay visible to routing, retries and metrics.
pub fn requested(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers
            .get(header::UPGRADE)
            .is_some_and(|u| !u.as_bytes().eq_ignore_ascii_case(b"h2c"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Hop-by-hop headers removed as for any request, except the two that ask
/// the next hop to switch protocols.
fn keep_upgrade_only(headers: &mut HeaderMap) {
    let upgrade = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(headers);
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Sends the upgrade request `req` (origin-form URI, `Host` set) on `io`,
/// a connection made for it. On `101` the downstream connection (the one
/// `req` came on) and `io` are relayed until both close, holding `guard`
/// so that a drain waits for them; any other answer is returned as it is.
pub async fn send<IO>(io: IO, mut req: Request<Body>, guard: Guard) -> Result<Response<Incoming>, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let downstream = hyper::upgrade::on(&mut req);
    keep_upgrade_only(req.headers_mut());
    let (mut sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection failed");
        }
    });
    let mut rsp = sender.send_request(req).await?;
    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut rsp);
        tokio::spawn(async move {
            let _guard = guard;
            match tokio::join!(downstream, upstream) {
                (Ok(d), Ok(u)) => {
                    let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                (d, u) => tracing::debug!(
                    downstream = ?d.err(),
                    upstream = ?u.err(),
                    "upgrade did not complete"
                ),
            }
        });
    }
    Ok(rsp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn an_upgrade_needs_both_headers_and_http_1_1() {
        let ws = head(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert!(requested(Version::HTTP_11, &ws));
        assert!(!requested(Version::HTTP_10, &ws));
        assert!(!requested(Version::HTTP_2, &ws));
        assert!(!requested(Version::HTTP_11, &head(&[("upgrade", "websocket")])));
        assert!(!requested(Version::HTTP_11, &head(&[("connection", "upgrade")])));
        assert!(!requested(
            Version::HTTP_11,
            &head(&[("connection", "upgraded"), ("upgrade", "foo")])
        ));
        let h2c = head(&[("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c")]);
        assert!(!requested(Version::HTTP_11, &h2c));
    }

    #[test]
    fn only_the_upgrade_headers_survive_the_hop() {
        let mut h = head(&[
            ("connection", "Upgrade, x-private"),
            ("upgrade", "websocket"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        keep_upgrade_only(&mut h);
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert!(h.get("x-private").is_none() && h.get("keep-alive").is_none());
        assert!(h.get("sec-websocket-key").is_some());
    }
}
