//! Protocol detection on a connection's first bytes, by peeking (nothing is
//! consumed, so whatever handles the connection next reads it from the start).
//!
//! A client that sends nothing within the detection timeout may be waiting
//! for a server-first protocol (MySQL, SMTP, …), or may be an HTTP client
//! that opened the connection ahead of its first request (connection pools
//! do, and may leave it idle for seconds). So the upstream is connected then
//! and whoever speaks first decides: the server's greeting makes the
//! connection opaque TCP; the client's first bytes are detected as if it had
//! sent them at once. Well-known server-first ports skip detection entirely.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::TcpStream;

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How much is peeked at most.
const PEEK: usize = 2048;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// A TLS ClientHello (inbound: a mesh peer or the app's own TLS).
    Tls,
    /// Anything else, or nothing within the timeout.
    Opaque,
}

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Is(Protocol),
    NeedMore,
}

fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Is(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => Verdict::NeedMore,
            Some(3) => Verdict::Is(Protocol::Tls),
            Some(_) => Verdict::Is(Protocol::Opaque),
        };
    }
    classify_http1(buf)
}

/// The longest method taken for HTTP; longer runs of capitals are another protocol.
const MAX_METHOD: usize = 16;

/// `METHOD SP request-target SP HTTP/1.x CRLF`.
fn classify_http1(buf: &[u8]) -> Verdict {
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    // Decided on the method alone, so the verdict cannot depend on how the
    // bytes were split into segments.
    if method_len > MAX_METHOD {
        return Verdict::Is(Protocol::Opaque);
    }
    if method_len == buf.len() {
        return Verdict::NeedMore;
    }
    if method_len == 0 || buf[method_len] != b' ' {
        return Verdict::Is(Protocol::Opaque);
    }
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= PEEK {
            Verdict::Is(Protocol::Opaque)
        } else {
            Verdict::NeedMore
        };
    };
    let line = &buf[..eol];
    let is_http1 = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
    Verdict::Is(if is_http1 { Protocol::Http1 } else { Protocol::Opaque })
}

/// What a connection's first bytes say: `None` until there are enough to
/// tell. Once it says something, more bytes never change it.
pub fn classify_prefix(first_bytes: &[u8]) -> Option<Protocol> {
    match classify(first_bytes) {
        Verdict::Is(p) => Some(p),
        Verdict::NeedMore => None,
    }
}

/// The most bytes detection ever looks at: a prefix this long is decided.
pub const MAX_PREFIX: usize = PEEK;

/// Peeks at `stream` until its protocol is known or `timeout` passes;
/// `None` when the client sent nothing at all in that time.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Option<Protocol>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; PEEK];
    let mut last_len = usize::MAX;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) if last_len == usize::MAX => return Ok(None),
            // Some bytes, then nothing that settles it: not a protocol we speak.
            Err(_) => return Ok(Some(Protocol::Opaque)),
            Ok(r) => r?,
        };
        if n == 0 {
            // Closed before saying anything.
            return Ok(Some(Protocol::Opaque));
        }
        if let Verdict::Is(p) = classify(&buf[..n]) {
            return Ok(Some(p));
        }
        // Peek returns at once while data is waiting; back off briefly until
        // more arrives rather than spin.
        if n == last_len {
            if tokio::time::Instant::now() >= deadline {
                return Ok(Some(Protocol::Opaque));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        last_len = n;
    }
}

/// Detection for a client that must speak first (it talks to the proxy
/// itself, so no server could greet it): waits as long as the client does.
pub async fn detect_patiently(stream: &TcpStream, timeout: Duration) -> std::io::Result<Protocol> {
    if let Some(p) = detect(stream, timeout).await? {
        return Ok(p);
    }
    stream.peek(&mut [0u8; 1]).await?;
    Ok(detect(stream, timeout).await?.unwrap_or(Protocol::Opaque))
}

/// What a connection turned out to be, by [`detect_or_connect`].
#[derive(Debug)]
pub enum Detected<U> {
    /// The client spoke first, and said this.
    Client(Protocol),
    /// The client was silent and the server spoke first: relay, starting with
    /// its `greeting` (empty if it closed).
    Server {
        /// The connected upstream.
        upstream: U,
        /// What the server has said so far.
        greeting: Vec<u8>,
    },
    /// The client closed without a word.
    Closed,
}

/// Detects the protocol of `stream`; if the client is silent for `timeout`,
/// connects the upstream and lets whoever speaks first decide (see the module
/// doc). Without an upstream (`connect` failed) it waits for the client.
pub async fn detect_or_connect<U, E, F, Fut>(
    stream: &TcpStream,
    timeout: Duration,
    connect: F,
) -> std::io::Result<Detected<U>>
where
    U: AsyncRead + Unpin,
    E: std::fmt::Display,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<U, E>>,
{
    if let Some(p) = detect(stream, timeout).await? {
        return Ok(Detected::Client(p));
    }
    let mut first = [0u8; 1];
    let client_said = match connect().await {
        Ok(mut upstream) => {
            let mut greeting = vec![0u8; PEEK];
            // Both are cancel-safe: a peek consumes nothing, and a read that
            // has not completed has not taken any bytes.
            tokio::select! {
                biased;
                peeked = stream.peek(&mut first) => peeked?,
                read = upstream.read(&mut greeting) => {
                    greeting.truncate(read?);
                    return Ok(Detected::Server { upstream, greeting });
                }
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "silent client and no upstream to wait on: waiting for the client");
            stream.peek(&mut first).await?
        }
    };
    if client_said == 0 {
        return Ok(Detected::Closed);
    }
    // The client spoke: decide as if it had spoken at once.
    Ok(Detected::Client(
        detect(stream, timeout).await?.unwrap_or(Protocol::Opaque),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(classify(b"POST /a?b=c HTTP/1.0\r\n"), Verdict::Is(Protocol::Http1));
        assert_eq!(classify(b"GET / HTTP/1.1"), Verdict::NeedMore);
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        assert_eq!(classify(H2_PREFACE), Verdict::Is(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), Verdict::NeedMore);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Verdict::Is(Protocol::Tls));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Verdict::Is(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Verdict::Is(Protocol::Opaque));
        assert_eq!(classify(b"GET / SPDY/3\r\n"), Verdict::Is(Protocol::Opaque));
        assert_eq!(classify(b"\x00\x01\x02"), Verdict::Is(Protocol::Opaque));
        assert_eq!(classify(&[b'A'; 40]), Verdict::Is(Protocol::Opaque));
        // A 17-letter "method" is opaque whether or not its space has arrived.
        assert_eq!(classify(&[b'A'; 17]), Verdict::Is(Protocol::Opaque));
        assert_eq!(
            classify(b"AAAAAAAAAAAAAAAAA / HTTP/1.1\r\n"),
            Verdict::Is(Protocol::Opaque)
        );
    }

    /// A connected (client, proxy-side) pair on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_silent_client_then_http_is_http_and_the_upstream_is_dropped() {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, proxied) = pair().await;
        let (upstream, mut server) = pair().await;
        let writer = tokio::spawn(async move {
            // Idle well past the timeout, as a pool's spare connection does.
            tokio::time::sleep(SHORT * 4).await;
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            client
        });
        let detected = detect_or_connect(&proxied, SHORT, || async { Ok::<_, std::io::Error>(upstream) })
            .await
            .expect("detect");
        assert!(matches!(detected, Detected::Client(Protocol::Http1)), "{detected:?}");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty(), "the upstream got nothing and was closed");
        let _client = writer.await.expect("writer");
    }

    #[tokio::test]
    async fn a_silent_client_gets_the_servers_greeting() {
        use tokio::io::AsyncWriteExt as _;
        let (_client, proxied) = pair().await;
        let (upstream, mut server) = pair().await;
        server.write_all(b"220 smtp ready\r\n").await.expect("greet");
        let detected = detect_or_connect(&proxied, SHORT, || async { Ok::<_, std::io::Error>(upstream) })
            .await
            .expect("detect");
        match detected {
            Detected::Server { greeting, .. } => assert_eq!(greeting, b"220 smtp ready\r\n"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn without_an_upstream_it_waits_for_the_client_and_sees_a_close() {
        let (client, proxied) = pair().await;
        let closer = tokio::spawn(async move {
            tokio::time::sleep(SHORT * 2).await;
            drop(client);
        });
        let detected = detect_or_connect(&proxied, SHORT, || async { Err::<TcpStream, _>("no endpoint") })
            .await
            .expect("detect");
        assert!(matches!(detected, Detected::Closed), "{detected:?}");
        closer.await.expect("closer");
    }

    #[tokio::test]
    async fn partial_bytes_that_never_settle_are_opaque_not_silent() {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, proxied) = pair().await;
        client.write_all(b"GET / HT").await.expect("write");
        assert_eq!(detect(&proxied, SHORT).await.expect("detect"), Some(Protocol::Opaque));
        let (_quiet, proxied) = pair().await;
        assert_eq!(detect(&proxied, SHORT).await.expect("detect"), None);
    }
}
