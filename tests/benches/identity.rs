//! Benchmark: certificates issued per second by one identity service pinned
//! to one core, and latency percentiles, next to this machine's own ECDSA
//! P-256 sign+verify limit measured by `openssl speed` in the same run.
//!
//! `cargo build --release --workspace --bins && cargo bench -p sidemesh-tests --bench identity`
//! Options (env): `BENCH_SECONDS` (default 10), `BENCH_CONCURRENCY` (default 64).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use sidemesh_identity_client::{TrustBundle, TrustStore};
use sidemesh_proto::identity::v1::CertifyRequest;
use sidemesh_tests::pki::{self, Pki};
use sidemesh_tests::process::{Proc, http_get, metric_value};

const SERVER_ID: &str = "spiffe://cluster.local/ns/sidemesh-system/sa/sidemesh-identity";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `openssl speed ecdsap256` on core 0: (signs/s, verifies/s).
fn openssl_limit(seconds: u64) -> Option<(f64, f64)> {
    let out = Command::new("taskset")
        .args([
            "-c",
            "0",
            "openssl",
            "speed",
            "-seconds",
            &seconds.to_string(),
            "ecdsap256",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // " 256 bits ecdsa (nistp256)   0.0000s   0.0001s  47000.0  15000.0"
    let line = text.lines().find(|l| l.contains("ecdsa (nistp256)"))?;
    let nums: Vec<f64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let n = nums.len();
    (n >= 2).then(|| (nums[n - 2], nums[n - 1]))
}

fn csr(i: usize) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let id = format!("spiffe://cluster.local/ns/bench/sa/w{i}");
    params.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
    params.serialize_request(&key).expect("csr").der().to_vec()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

type Client = sidemesh_proto::identity::v1::identity_client::IdentityClient<tonic::transport::Channel>;

/// `concurrency` callers, each issuing Certify back to back for `seconds`.
async fn load(
    clients: &[Client],
    csrs: &Arc<Vec<CertifyRequest>>,
    concurrency: usize,
    seconds: u64,
) -> (u64, u64, Vec<Duration>, Duration) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut client = clients[w % clients.len()].clone();
        let csrs = csrs.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::with_capacity(100_000));
            let mut i = w;
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.certify(csrs[i % csrs.len()].clone()).await {
                    Ok(_) => {
                        ok += 1;
                        lat.push(t.elapsed());
                    }
                    Err(_) => failed += 1,
                }
                i += concurrency;
            }
            (ok, failed, lat)
        }));
    }
    let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (o, f, l) = t.await.expect("task");
        ok += o;
        failed += f;
        lat.extend(l);
    }
    (ok, failed, lat, start.elapsed())
}

fn main() {
    let seconds = env_or("BENCH_SECONDS", 10);
    let concurrency = env_or("BENCH_CONCURRENCY", 64) as usize;
    sidemesh_identity_client::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    const WORKLOADS: usize = 64;
    let mut tokens = String::new();
    for i in 0..WORKLOADS {
        tokens.push_str(&pki::token_line(&format!("t{i}"), "bench", &format!("w{i}")));
    }
    pki::write(&pki.path("tokens.yaml"), &tokens);
    let addr = format!("127.0.0.1:{}", sidemesh_tests::free_port());
    let admin = format!("127.0.0.1:{}", sidemesh_tests::free_port());
    let reviewer = format!("file:{}", pki.path("tokens.yaml").display());
    let (c, k, b) = (pki.path("issuer.crt"), pki.path("issuer.key"), pki.path("bundle.pem"));
    // The server on core 0 with one worker thread; the load on core 1.
    let identity = sidemesh_tests::process::binary("sidemesh-identity");
    let mut server = Proc::start_program(
        std::path::Path::new("taskset"),
        "sidemesh-identity",
        &[
            "-c",
            "0",
            identity.to_str().unwrap_or_default(),
            "--workers",
            "1",
            "--listen",
            &addr,
            "--admin-addr",
            &admin,
            "--token-reviewer",
            &reviewer,
            "--issuer-cert",
            c.to_str().unwrap_or_default(),
            "--issuer-key",
            k.to_str().unwrap_or_default(),
            "--trust-bundle",
            b.to_str().unwrap_or_default(),
        ],
        &[("SIDEMESH_LOG", "warn")],
        dir.path(),
    );
    server.wait_ready(&admin, Duration::from_secs(30));
    let _ = Command::new("taskset")
        .args(["-p", "-c", "1", &std::process::id().to_string()])
        .output();

    let csrs: Arc<Vec<CertifyRequest>> = Arc::new(
        (0..WORKLOADS)
            .map(|i| CertifyRequest {
                identity: format!("spiffe://cluster.local/ns/bench/sa/w{i}"),
                token: format!("t{i}").into_bytes(),
                certificate_signing_request: csr(i),
            })
            .collect(),
    );
    let trust = TrustStore::new(TrustBundle::from_pem(pki.root.cert.as_bytes()).expect("bundle"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let clients: Vec<_> = rt.block_on(async {
        // A few HTTP/2 connections, many streams each, like many proxies at once.
        let clients: Vec<_> = (0..4)
            .map(|_| {
                sidemesh_identity_client::client::identity_client(&addr, SERVER_ID.parse().expect("id"), trust.clone())
                    .expect("client")
            })
            .collect();
        for (i, c) in clients.iter().enumerate() {
            let mut c = c.clone();
            c.certify(csrs[i].clone()).await.expect("warm-up certify");
        }
        clients
    });
    let (ok, failed, mut latencies, elapsed) = rt.block_on(load(&clients, &csrs, concurrency, seconds));
    let (_, _, mut single, _) = rt.block_on(load(&clients[..1], &csrs, 1, 3));
    single.sort_unstable();
    latencies.sort_unstable();
    let metrics = http_get(&admin, "/metrics").map(|(_, b)| b).unwrap_or_default();
    let issued_by_server = metric_value(&metrics, "sidemesh_identity_certificates_issued_total", &[]);
    drop(server);

    let rate = ok as f64 / elapsed.as_secs_f64();
    let limit = openssl_limit(3);
    println!();
    println!("identity service: Certify on one core (--workers 1, taskset -c 0), {concurrency} in flight, {seconds} s");
    println!("| figure | value |");
    println!("|---|---|");
    println!("| certificates issued/s | {rate:.0} |");
    println!("| failed requests | {failed} |");
    println!("| issued (server's own counter) | {issued_by_server:.0} |");
    println!(
        "| latency p50 | {:.2} ms |",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3
    );
    println!(
        "| latency p99 | {:.2} ms |",
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "| latency p50, one request at a time | {:.3} ms |",
        percentile(&single, 0.50).as_secs_f64() * 1e3
    );
    println!(
        "| latency p99, one request at a time | {:.3} ms |",
        percentile(&single, 0.99).as_secs_f64() * 1e3
    );
    match limit {
        Some((sign, verify)) => {
            let limit = 1.0 / (1.0 / sign + 1.0 / verify);
            println!("| openssl speed ecdsap256, same core: sign/s | {sign:.0} |");
            println!("| openssl speed ecdsap256, same core: verify/s | {verify:.0} |");
            println!("| sign+verify limit (1 / (1/sign + 1/verify)) | {limit:.0}/s |");
            println!("| **ratio to the limit** | **{:.2}** (goal ≥ 0.70) |", rate / limit);
        }
        None => println!("| openssl speed | not available |"),
    }
}
