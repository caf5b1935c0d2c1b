//! A small real application for end-to-end tests: an HTTP/1 + HTTP/2 (h2c)
//! server that reports what it received, a TCP echo server, and a
//! server-speaks-first TCP server.
//!
//! `sidemesh-test-app http <addr> <name>` — answers every request with
//! `name=<name> version=<v> path=<p> client-id=<sidemesh-client-id or ->
//! attempt=<x-sidemesh-retry-attempt or 0> traceparent=<…> body-bytes=<n>`
//! (the request body is read whole first; -1 when it broke off);
//! `?status=N` sets the status, `?sleep_ms=N` delays the answer; with
//! `SIDEMESH_TEST_FAIL_PCT=P` in the environment, P% of requests get 503.
//! With `SIDEMESH_TEST_DELAY_FILE=F`, each answer waits the milliseconds
//! written in F (read per request, so a test can slow a backend down live).
//! `sidemesh-test-app load <url> <rps> <secs>` — an open-loop HTTP/1.1 client
//! printing `<ms since start> <status> <name>` per answer.
//! `GET /__count` answers the number of other requests served (for tests
//! that count what reached a backend).
//! `sidemesh-test-app echo <addr>` — echoes bytes until the client half-closes.
//! `sidemesh-test-app banner <addr> <text>` — writes `<text>\n` on accept, then echoes.
//! `sidemesh-test-app rtt <addr> <count>` — a client: `count` round trips of a
//! 64-byte message against an echo server on one connection; prints
//! `p50_us p99_us`.
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

static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn fail_pct() -> u64 {
    std::env::var("SIDEMESH_TEST_FAIL_PCT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn answer(name: String, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    use std::sync::atomic::Ordering;
    if req.uri().path() == "/__count" {
        return Ok(Response::new(Full::new(Bytes::from(format!(
            "{}\n",
            SERVED.load(Ordering::Relaxed)
        )))));
    }
    let n = SERVED.fetch_add(1, Ordering::Relaxed);
    if let Ok(path) = std::env::var("SIDEMESH_TEST_DELAY_FILE")
        && let Some(ms) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        && ms > 0
    {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    if let Some(ms) = query(&req, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let pct = fail_pct();
    // Deterministic spread: every request whose number falls in the first P of each 100 fails.
    let injected = pct > 0 && (n * 37) % 100 < pct;
    let status = query(&req, "status")
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(if injected {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        });
    let client = req
        .headers()
        .get("sidemesh-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let attempt = req
        .headers()
        .get("x-sidemesh-retry-attempt")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0")
        .to_owned();
    let trace = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let (version, path) = (req.version(), req.uri().path().to_owned());
    // Read whole before answering, as an RPC server does; its size is reported.
    let received = http_body_util::BodyExt::collect(req.into_body())
        .await
        .map_or(-1, |b| b.to_bytes().len() as i64);
    let body = format!(
        "name={name} version={version:?} path={path} client-id={client} attempt={attempt} traceparent={trace} body-bytes={received}\n"
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

async fn rtt(addr: &str, count: usize) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let msg = [b'x'; 64];
    let mut buf = [0u8; 64];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + 100 {
        let t = std::time::Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut buf).await?;
        // The first 100 warm the path up.
        if i >= 100 {
            samples.push(t.elapsed().as_micros() as u64);
        }
    }
    samples.sort_unstable();
    let at = |p: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!("{} {}", at(0.5), at(0.99));
    Ok(())
}

async fn load(url: &str, rps: u64, secs: u64) -> std::io::Result<()> {
    use http_body_util::BodyExt as _;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = url.parse().map_err(|_| std::io::Error::other("bad url"))?;
    let start = std::time::Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rps.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = rps * secs;
    for _ in 0..total {
        tick.tick().await;
        let (client, uri, tx) = (client.clone(), uri.clone(), tx.clone());
        tokio::spawn(async move {
            let line = match client.get(uri).await {
                Ok(rsp) => {
                    let status = rsp.status().as_u16();
                    let body = rsp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let text = String::from_utf8_lossy(&body);
                    let name = text
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("name="))
                        .unwrap_or("?")
                        .to_owned();
                    format!("{} {status} {name}", start.elapsed().as_millis())
                }
                Err(_) => format!("{} 0 -", start.elapsed().as_millis()),
            };
            let _ = tx.send(line);
        });
    }
    drop(tx);
    let mut out = String::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .ok()
        .flatten()
    {
        out.push_str(&line);
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: sidemesh-test-app http|echo|banner <addr> [name|text]");
        std::process::exit(2);
    };
    let extra = args.get(3).cloned().unwrap_or_else(|| "app".to_owned());
    if mode == "rtt" {
        return rtt(addr, extra.parse().unwrap_or(1000)).await;
    }
    if mode == "load" {
        let secs = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(5);
        return load(addr, extra.parse().unwrap_or(100), secs).await;
    }
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
