//! The demo's workloads, run inside their Pods: an HTTP service that names
//! itself and fails a share of requests, a TCP echo service, and the load
//! generator that plays the frontend, measuring what its users would see and
//! writing a snapshot (with its proxy's metrics and state) every second.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// `http <listen> <name> <fail-percent>`.
async fn http_server(listen: &str, name: String, fail_pct: f64) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let name = name.clone();
                async move {
                    let client = req
                        .headers()
                        .get("sidemesh-client-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let failed = rand::random_range(0.0..100.0) < fail_pct;
                    let mut rsp = Response::new(Full::new(Bytes::from(format!("name={name} client-id={client}\n"))));
                    if failed {
                        *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok::<_, Infallible>(rsp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `echo <listen>`: a TCP service.
async fn echo_server(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = s.shutdown().await;
        });
    }
}

/// What the frontend saw in one second-long slice, cumulative since start.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Seconds since the load started.
    pub elapsed: f64,
    /// HTTP requests completed.
    pub requests: u64,
    /// HTTP requests answered 2xx.
    pub ok: u64,
    /// 2xx answers by backend name.
    pub by_backend: BTreeMap<String, u64>,
    /// Identity the backends saw (from their answer).
    pub client_id: String,
    /// Latencies of the last second, p50 and p99, ms.
    pub p50_ms: f64,
    /// p99 of the last second, ms.
    pub p99_ms: f64,
    /// TCP exchanges that came back intact / failed.
    pub tcp_ok: u64,
    /// TCP exchanges that failed.
    pub tcp_failed: u64,
    /// The frontend proxy's `/metrics` text.
    pub metrics: String,
    /// The frontend proxy's `/debug/state`.
    pub state: serde_json::Value,
}

#[derive(Default)]
struct Counters {
    snap: Snapshot,
    latencies: Vec<f64>,
}

/// Where the load generator sends and reads from.
struct LoadTarget {
    /// The Service URL.
    url: String,
    /// The TCP service, or `-` for none.
    tcp: String,
    /// Connect here instead of the URL's authority (the proxy, without iptables).
    via: Option<String>,
    /// The local proxy's admin address.
    admin: String,
}

/// `load <http-url> <tcp-addr|-> <rps> <out-file> [<via> <admin>]`.
async fn load(target: LoadTarget, rps: u32, out: PathBuf) -> anyhow::Result<()> {
    let LoadTarget {
        url,
        tcp,
        via,
        admin: admin_addr,
    } = target;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let counters = Arc::new(Mutex::new(Counters::default()));
    let started = Instant::now();
    let service: http::Uri = url.parse().context("load URL")?;
    let host = service.authority().map(|a| a.to_string()).unwrap_or_default();
    // Without iptables the request goes to the proxy and names the Service.
    let uri: http::Uri = match &via {
        Some(via) => format!("http://{via}{}", service.path()).parse().context("via")?,
        None => service.clone(),
    };
    // Open-loop: a request every 1/rps seconds, whatever the answers do.
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut report = tokio::time::interval(Duration::from_secs(1));
    let mut tcp_tick = tokio::time::interval(Duration::from_millis(250));
    let admin: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let client = client.clone();
                let counters = counters.clone();
                let uri = uri.clone();
                let host = host.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let req = http::Request::get(uri).header(http::header::HOST, host.as_str()).body(Empty::new());
                    let result = match req {
                        Ok(req) => client.request(req).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    let (ok, body) = match result {
                        Ok(rsp) => {
                            let ok = rsp.status().is_success();
                            let body = rsp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            (ok, String::from_utf8_lossy(&body).into_owned())
                        }
                        Err(_) => (false, String::new()),
                    };
                    let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
                    c.snap.requests += 1;
                    c.latencies.push(ms);
                    if ok {
                        c.snap.ok += 1;
                        let name = body.split_whitespace().find_map(|w| w.strip_prefix("name=")).unwrap_or("?").to_owned();
                        if let Some(id) = body.split_whitespace().find_map(|w| w.strip_prefix("client-id=")) {
                            c.snap.client_id = id.to_owned();
                        }
                        *c.snap.by_backend.entry(name).or_default() += 1;
                    }
                });
            }
            _ = tcp_tick.tick(), if tcp != "-" => {
                let counters = counters.clone();
                let tcp = tcp.clone();
                tokio::spawn(async move {
                    let ok = tcp_exchange(&tcp).await.unwrap_or(false);
                    let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
                    if ok { c.snap.tcp_ok += 1 } else { c.snap.tcp_failed += 1 }
                });
            }
            _ = report.tick() => {
                let metrics = fetch(&admin, &format!("http://{admin_addr}/metrics")).await;
                let state = serde_json::from_str(&fetch(&admin, &format!("http://{admin_addr}/debug/state")).await).unwrap_or_default();
                let snap = {
                    let mut c = counters.lock().unwrap_or_else(|p| p.into_inner());
                    let mut lat = std::mem::take(&mut c.latencies);
                    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
                    let at = |p: f64| lat.get(((lat.len().max(1) - 1) as f64 * p) as usize).copied().unwrap_or(0.0);
                    c.snap.p50_ms = at(0.5);
                    c.snap.p99_ms = at(0.99);
                    c.snap.elapsed = started.elapsed().as_secs_f64();
                    let mut snap = c.snap.clone();
                    snap.metrics = metrics;
                    snap.state = state;
                    snap
                };
                let tmp = out.with_extension("tmp");
                if std::fs::write(&tmp, serde_json::to_vec(&snap).unwrap_or_default()).is_ok() {
                    let _ = std::fs::rename(&tmp, &out);
                }
            }
        }
    }
}

async fn fetch(client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>, url: &str) -> String {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return String::new();
    };
    match tokio::time::timeout(Duration::from_secs(1), client.get(uri)).await {
        Ok(Ok(rsp)) => {
            let body = rsp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            String::from_utf8_lossy(&body).into_owned()
        }
        _ => String::new(),
    }
}

async fn tcp_exchange(addr: &str) -> anyhow::Result<bool> {
    let work = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"ratings please").await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await?;
        Ok::<_, std::io::Error>(back == b"ratings please")
    };
    Ok(tokio::time::timeout(Duration::from_secs(3), work).await??)
}

/// Runs a demo workload: `http`, `echo` or `load` with its arguments.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    rt.block_on(async {
        match arg(0).as_str() {
            "http" => http_server(&arg(1), arg(2), arg(3).parse().unwrap_or(0.0)).await,
            "echo" => echo_server(&arg(1)).await,
            "load" => {
                let target = LoadTarget {
                    url: arg(1),
                    tcp: arg(2),
                    via: args.get(5).cloned(),
                    admin: args.get(6).cloned().unwrap_or_else(|| "127.0.0.1:15020".to_owned()),
                };
                load(target, arg(3).parse().unwrap_or(100), PathBuf::from(arg(4))).await
            }
            other => anyhow::bail!("unknown demo workload {other:?}"),
        }
    })
}
