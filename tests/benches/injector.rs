//! Benchmark: AdmissionReview latency of the real `sidemesh-injector` over
//! HTTPS on kept-alive connections, as the API server calls it, and
//! admissions per second. Every review is a Pod CREATE in a Namespace with
//! `sidemesh.io/inject: enabled` (the full path: parse, cache lookup,
//! validation, patch, base64), the Namespace cache fed by the stand-in API
//! server. Goal: p99 ≤ 2 ms.
//!
//! `cargo build --release -p sidemesh-injector && cargo bench -p sidemesh-tests --bench injector`
//! Options (env): `BENCH_SECONDS` (default 5 per row), `BENCH_CONCURRENCY` (default 16).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sidemesh_injector::certs::{service_dns_names, webhook_pki};
use sidemesh_tests::apiserver::ApiServer;
use sidemesh_tests::process::{Proc, http_get, metric_value};
use sidemesh_tests::webhook::{WebhookClient, pod_review};
use sidemesh_tests::{free_port, pki};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A realistic Pod as the API server sends it to a mutating webhook.
fn pod(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "web-7d9c8b6f5-", "namespace": "apps",
            "labels": {"app": "web", "pod-template-hash": "7d9c8b6f5", "i": i.to_string()},
            "annotations": {"prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9c8b6f5",
                "uid": "6f2d1f7a-1111-2222-3333-444455556666", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "containers": [{
                "name": "web", "image": "registry.example/web:1.2.3",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                "volumeMounts": [{"name": "kube-api-access-abcde", "readOnly": true,
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "volumes": [{"name": "kube-api-access-abcde", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
            ], "defaultMode": 420}}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "web", "serviceAccount": "web", "securityContext": {},
            "schedulerName": "default-scheduler", "enableServiceLinks": true, "priority": 0
        }
    })
}

/// `concurrency` connections, each sending reviews back to back for `seconds`.
async fn load(
    addr: SocketAddr,
    ca: &str,
    bodies: &Arc<Vec<Value>>,
    concurrency: usize,
    seconds: u64,
) -> (u64, u64, Vec<Duration>, Duration) {
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        clients.push(
            WebhookClient::connect(addr, ca, "sidemesh-injector.sidemesh-system.svc")
                .await
                .expect("connect"),
        );
    }
    // Warm-up: TLS sessions, allocator, caches.
    for c in &mut clients {
        for b in bodies.iter().take(50) {
            let _ = c.review(b).await;
        }
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (w, mut client) in clients.into_iter().enumerate() {
        let bodies = bodies.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::with_capacity(200_000));
            let mut i = w;
            while Instant::now() < deadline {
                let body = &bodies[i % bodies.len()];
                i += 1;
                let t = Instant::now();
                match client.review(body).await {
                    Ok((200, rsp)) if rsp.windows(11).any(|w| w == b"\"JSONPatch\"") => {
                        lat.push(t.elapsed());
                        ok += 1;
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed, lat)
        }));
    }
    let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        if let Ok((o, f, l)) = t.await {
            ok += o;
            failed += f;
            lat.extend(l);
        }
    }
    let elapsed = start.elapsed();
    lat.sort_unstable();
    (ok, failed, lat, elapsed)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async_main());
}

async fn async_main() {
    sidemesh_identity_client::install_crypto_provider();
    let seconds = env_or("BENCH_SECONDS", 5);
    let concurrency = env_or("BENCH_CONCURRENCY", 16) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let api = ApiServer::start(dir.path()).await.expect("stand-in API server");
    for i in 0..200 {
        let name = if i == 0 { "apps".to_owned() } else { format!("team-{i}") };
        api.create(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": {"sidemesh.io/inject": "enabled"}}}))
            .expect("namespace");
    }
    let webhook = webhook_pki(
        &[
            service_dns_names("sidemesh-injector", "sidemesh-system"),
            vec!["127.0.0.1".to_owned()],
        ]
        .concat(),
        Duration::from_secs(86400),
    )
    .expect("certificates");
    pki::write(&dir.path().join("tls.crt"), &webhook.cert);
    pki::write(&dir.path().join("tls.key"), &webhook.key);
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let (cert, key) = (
        dir.path().join("tls.crt").display().to_string(),
        dir.path().join("tls.key").display().to_string(),
    );
    let kubeconfig = api.kubeconfig.display().to_string();
    // The injector on core 0, this client on core 1: the figures are the
    // injector's, not a scheduler's compromise between the two.
    let injector = sidemesh_tests::process::binary("sidemesh-injector");
    let mut proc = Proc::start_program(
        std::path::Path::new("taskset"),
        "sidemesh-injector",
        &[
            "-c",
            "0",
            injector.to_str().unwrap_or_default(),
            "--listen",
            &listen,
            "--admin-addr",
            &admin,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--workers",
            "1",
        ],
        &[("KUBECONFIG", &kubeconfig), ("SIDEMESH_LOG", "warn")],
        dir.path(),
    );
    proc.wait_ready(&admin, Duration::from_secs(20));
    let _ = std::process::Command::new("taskset")
        .args(["-p", "-c", "1", &std::process::id().to_string()])
        .output();
    let addr: SocketAddr = listen.parse().expect("addr");
    let bodies: Arc<Vec<Value>> = Arc::new(
        (0..64)
            .map(|i| pod_review(&format!("00000000-0000-0000-0000-{i:012}"), "apps", &pod(i)))
            .collect(),
    );
    let body_len = serde_json::to_vec(&bodies[0]).map(|b| b.len()).unwrap_or_default();

    println!(
        "\nsidemesh-injector admission benchmark (release, --workers 1 on core 0, client on core 1, HTTPS keep-alive, {body_len}-byte Pod reviews, every one injected)"
    );
    println!(
        "{:<28} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "load", "admissions/s", "p50", "p90", "p99", "p99.9", "max", "failed"
    );
    let mut p99_single = Duration::ZERO;
    for (label, c) in [("1 connection, sequential", 1), ("concurrent connections", concurrency)] {
        let (ok, failed, lat, elapsed) = load(addr, &webhook.ca_cert, &bodies, c, seconds).await;
        let rate = ok as f64 / elapsed.as_secs_f64();
        let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
        if c == 1 {
            p99_single = percentile(&lat, 0.99);
        }
        let label = if c == 1 {
            label.to_owned()
        } else {
            format!("{c} {label}")
        };
        println!(
            "{:<28} {:>12.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            label,
            rate,
            us(percentile(&lat, 0.50)),
            us(percentile(&lat, 0.90)),
            us(percentile(&lat, 0.99)),
            us(percentile(&lat, 0.999)),
            us(lat.last().copied().unwrap_or_default()),
            failed
        );
    }
    let metrics = http_get(&admin, "/metrics").map(|(_, b)| b).unwrap_or_default();
    let injected = metric_value(
        &metrics,
        "sidemesh_injector_admissions_total",
        &["outcome=\"injected\""],
    );
    let rss = std::fs::read_to_string(format!("/proc/{}/status", proc.pid()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.trim_start_matches("VmRSS:").trim().to_owned())
        })
        .unwrap_or_default();
    println!("injected (server's own count): {injected:.0}; injector RSS after the run: {rss}");
    println!(
        "goal p99 ≤ 2 ms on one connection: {} (p99 {:.0} µs)",
        if p99_single <= Duration::from_millis(2) {
            "met"
        } else {
            "NOT met"
        },
        p99_single.as_secs_f64() * 1e6
    );
    drop(proc);
}
