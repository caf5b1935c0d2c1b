//! A small real application for end-to-end tests: an HTTP/1 + HTTP/2 (h2c)
//! server that reports what it received, a TCP echo server, and a
//! server-speaks-first TCP server.
//!
//! `sidemesh-test-app http <addr> <name>` — answers every request with
//! `name=<name> version=<v> path=<p> client-id=<sidemesh-client-id or ->`;
//! `?status=N` sets the status, `?sleep_ms=N` delays the answer.
//! `sidemesh-test-app echo <addr>` — echoes bytes until the client half-closes.
//! `sidemesh-test-app banner <addr> <text>` — writes `<text>\n` on accept, then echoes.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn answer(name: String, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(ms) = query(&req, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let status = query(&req, "status")
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let client = req
        .headers()
        .get("sidemesh-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let body = format!(
        "name={name} version={:?} path={} client-id={client}\n",
        req.version(),
        req.uri().path()
    );
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    Ok(rsp)
}

async fn echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: sidemesh-test-app http|echo|banner <addr> [name|text]");
        std::process::exit(2);
    };
    let extra = args.get(3).cloned().unwrap_or_else(|| "app".to_owned());
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let extra = extra.clone();
        match mode.as_str() {
            "http" => {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(extra.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            "echo" => {
                tokio::spawn(echo(stream));
            }
            "banner" => {
                tokio::spawn(async move {
                    let mut stream = stream;
                    if stream.write_all(format!("{extra}\n").as_bytes()).await.is_ok() {
                        echo(stream).await;
                    }
                });
            }
            other => {
                eprintln!("unknown mode {other}");
                std::process::exit(2);
            }
        }
    }
}
