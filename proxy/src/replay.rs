//! Request bodies of unknown length kept for a retry (gRPC requests over
//! HTTP/2 and chunked HTTP/1 uploads carry no Content-Length). Buffering such
//! a body before sending would stall a client that waits for the response
//! before it finishes its request, so the first attempt streams the body as
//! it arrives and keeps a copy of up to [`MAX_RETRY_BODY`] bytes on the way.
//! A retry replays the copy only when the first attempt read the whole body
//! and it fit; otherwise the first attempt's answer stands, as it would
//! without retries.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::retry::MAX_RETRY_BODY;

/// What the first attempt read of the body.
#[derive(Debug, Default)]
struct Copy {
    data: BytesMut,
    /// The body ended (no more frames).
    complete: bool,
    /// Too large, broken off, or with trailers: cannot be replayed.
    unusable: bool,
}

/// The first attempt's body: `Incoming`, copied as it streams.
#[derive(Debug)]
pub struct Recording {
    inner: Incoming,
    copy: Arc<Mutex<Copy>>,
}

/// Held by the attempt loop: the copy the first attempt makes.
#[derive(Debug, Clone)]
pub struct Recorder {
    copy: Arc<Mutex<Copy>>,
}

/// Wraps `body` for a first attempt that may have to be retried.
pub fn record(body: Incoming) -> (Recorder, Recording) {
    let copy = Arc::new(Mutex::new(Copy::default()));
    (Recorder { copy: copy.clone() }, Recording { inner: body, copy })
}

impl Recorder {
    /// The whole body, when the first attempt has read all of it and it fit
    /// (and had no trailers).
    pub fn replay(&self) -> Option<Bytes> {
        let copy = self.copy.lock().ok()?;
        (copy.complete && !copy.unusable).then(|| copy.data.clone().freeze())
    }
}

impl Body for Recording {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let ended = self.inner.is_end_stream();
        if let Ok(mut copy) = self.copy.lock() {
            match &frame {
                Some(Ok(f)) => match f.data_ref() {
                    Some(d) if !copy.unusable && copy.data.len() + d.len() <= MAX_RETRY_BODY => {
                        copy.data.extend_from_slice(d);
                    }
                    Some(_) => {
                        copy.unusable = true;
                        copy.data = BytesMut::new();
                    }
                    // Trailers: rare on requests, and a replay carries none.
                    None => copy.unusable = true,
                },
                Some(Err(_)) => copy.unusable = true,
                None => copy.complete = true,
            }
            // hyper stops polling a body that says it has ended.
            copy.complete |= ended;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http::{HeaderMap, Request, Response};
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;

    /// A client body of unknown length (as a gRPC request is).
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    /// Sends `frames` over a real HTTP/2 connection; the server side reads
    /// the body through a [`Recording`] and answers what [`Recorder::replay`]
    /// then holds (`None` as an empty 404).
    async fn replayed(frames: Vec<Frame<Bytes>>) -> (Option<Bytes>, Bytes) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let (recorder, body) = record(req.into_body());
            let seen = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let rsp = match recorder.replay() {
                Some(copy) => {
                    assert_eq!(copy, seen, "the copy is what the first attempt read");
                    Response::new(Full::new(copy))
                }
                None => {
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = http::StatusCode::NOT_FOUND;
                    r
                }
            };
            Ok::<_, std::convert::Infallible>(rsp)
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server_io), svc),
        );
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let sent: Bytes = frames
            .iter()
            .filter_map(|f| f.data_ref().cloned())
            .flat_map(|b| b.to_vec())
            .collect::<Vec<u8>>()
            .into();
        let req = Request::post("http://test/").body(Frames(frames.into())).unwrap();
        let rsp = sender.send_request(req).await.unwrap();
        let ok = rsp.status().is_success();
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        (ok.then_some(body), sent)
    }

    fn data(n: usize, byte: u8) -> Frame<Bytes> {
        Frame::data(Bytes::from(vec![byte; n]))
    }

    #[tokio::test]
    async fn a_whole_small_body_is_kept_in_order() {
        let (copy, sent) = replayed(vec![data(1000, b'a'), data(10, b'b'), data(2000, b'c')]).await;
        assert_eq!(copy, Some(sent));
        let (copy, _) = replayed(vec![data(MAX_RETRY_BODY, b'a')]).await;
        assert_eq!(copy.map(|c| c.len()), Some(MAX_RETRY_BODY), "exactly the limit fits");
    }

    #[tokio::test]
    async fn too_large_or_with_trailers_is_not_kept() {
        let (copy, _) = replayed(vec![data(MAX_RETRY_BODY, b'a'), data(1, b'b')]).await;
        assert_eq!(copy, None, "one byte over the limit");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let (copy, _) = replayed(vec![data(10, b'a'), Frame::trailers(trailers)]).await;
        assert_eq!(copy, None, "a replay would lose the trailers");
    }
}
