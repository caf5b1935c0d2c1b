//! Protocol detection on a connection's first bytes, by peeking (nothing is
//! consumed, so whatever handles the connection next reads it from the start).
//!
//! A client that sends nothing within the detection timeout is taken to be
//! waiting for the server (MySQL, SMTP, …) and the connection is proxied as
//! opaque TCP at once; well-known server-first ports skip detection entirely.

use std::time::Duration;

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

/// `METHOD SP request-target SP HTTP/1.x CRLF`.
fn classify_http1(buf: &[u8]) -> Verdict {
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() {
        return if method_len <= 16 {
            Verdict::NeedMore
        } else {
            Verdict::Is(Protocol::Opaque)
        };
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

/// Peeks at `stream` until its protocol is known or `timeout` passes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Protocol> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; PEEK];
    let mut last_len = usize::MAX;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) => return Ok(Protocol::Opaque),
            Ok(r) => r?,
        };
        if n == 0 {
            // Closed before saying anything.
            return Ok(Protocol::Opaque);
        }
        if let Verdict::Is(p) = classify(&buf[..n]) {
            return Ok(p);
        }
        // Peek returns at once while data is waiting; back off briefly until
        // more arrives rather than spin.
        if n == last_len {
            if tokio::time::Instant::now() >= deadline {
                return Ok(Protocol::Opaque);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        last_len = n;
    }
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
    }
}
