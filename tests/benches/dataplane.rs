//! Benchmark: the data plane in network-namespace Pods, client sidecar +
//! server sidecar with mTLS, against the same path with no proxies measured
//! in the same run, with standard tools (wrk, iperf3) and a small-message
//! round-trip client. Prints a table of medians of `BENCH_RUNS` runs.
//!
//! `cargo dist --workspace --bins && cargo bench-dist -p sidemesh-tests --bench dataplane`
//! (the shipped `dist` profile: aliases in `.cargo/config.toml`).
//! Needs root, iptables, wrk, iperf3, h2load; says so and exits 0 otherwise.
//!
//! `BENCH_ONLY=keepalive,one,new,bulk,rtt,cpu,rss` runs only the named rows
//! (for profiling one case: the proxies' PIDs are printed at start).
//!
//! With `stunnel` installed (Debian's `stunnel4`), each traffic row also
//! measures an L4 mTLS data plane on the same machine in the same run: a
//! stunnel client in the unmeshed client Pod and a stunnel server in the
//! unmeshed server Pod. That path has the mesh's extra sockets and TLS
//! ends, and none of its L7 work (no HTTP parsing, no pooling, no
//! discovery). `BENCH_STUNNEL=0` leaves it out.

use std::time::{Duration, Instant};

use serde_json::json;
use sidemesh_tests::mesh::{Mesh, ProxyOptions, Workload};
use sidemesh_tests::netns::{self, Pod, service_ip};
use sidemesh_tests::objects::{pod, service, slice, yaml};
use sidemesh_tests::process::binary;

/// Which data plane a measurement goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Application to application, no proxy.
    Direct,
    /// Through both sidemesh sidecars.
    Mesh,
    /// Through the stunnel pair (see [`start_stunnel`]).
    Stunnel,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `wrk` requests/s from inside `pod`.
fn wrk(pod: &Pod, url: &str, conns: u32, secs: u64, extra: &[&str]) -> f64 {
    let c = conns.to_string();
    let d = format!("{secs}s");
    let mut args = vec!["-t1", "-c", &c, "-d", &d];
    args.extend(extra);
    args.push(url);
    let out = pod.run("wrk", &args, Duration::from_secs(secs + 30));
    let rps = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:").map(|v| v.trim().parse().unwrap_or(0.0)))
        .unwrap_or(0.0);
    let errors = out
        .stdout
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        eprintln!("wrk {url} -c{conns} {extra:?}: {e}");
    }
    rps
}

fn iperf(pod: &Pod, host: &str, port: u16, secs: u64) -> f64 {
    let (t, p) = (secs.to_string(), port.to_string());
    let out = pod.run(
        "iperf3",
        &["-c", host, "-p", &p, "-t", &t, "-J"],
        Duration::from_secs(secs + 30),
    );
    serde_json::from_str::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["end"]["sum_received"]["bits_per_second"].as_f64())
        .unwrap_or(0.0)
}

fn rtt(pod: &Pod, addr: &str) -> (f64, f64) {
    let app = binary("sidemesh-test-app");
    let out = pod.run(&app, &["rtt", addr, "5000"], Duration::from_secs(60));
    let mut it = out.stdout.split_whitespace().filter_map(|w| w.parse::<f64>().ok());
    (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0))
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the comm.
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS:")
}

/// One `kB` line of `/proc/PID/status`, in MB.
fn status_mb(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Where a proxy's resident memory is: file pages (mostly its own text) and
/// anonymous pages (heap, stacks), and the heap alone from `smaps`.
fn rss_breakdown(pid: u32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut region, mut heap_kb, mut binary_kb) = (String::new(), 0.0, 0.0);
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Rss:") {
            let kb: f64 = kb.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            if region == "[heap]" {
                heap_kb += kb;
            } else if region.ends_with("/sidemesh-proxy") {
                binary_kb += kb;
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|a| a.contains('-') && a.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        {
            region = line.split_whitespace().nth(5).unwrap_or_default().to_owned();
        }
    }
    format!(
        "file {:.1} MB, anon {:.1} MB; of these the binary's mappings {:.1} MB (its text, and its data pages once written, which count as anon), heap {:.1} MB",
        status_mb(pid, "RssFile:"),
        status_mb(pid, "RssAnon:"),
        binary_kb / 1024.0,
        heap_kb / 1024.0
    )
}

/// The server Pods' applications: HTTP, a TCP echo for round trips, iperf3.
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const IPERF_PORT: u16 = 5201;

/// One application port carried by the stunnel reference.
struct Tunnel {
    /// stunnel's service name.
    name: &'static str,
    /// The application's port in the server Pod.
    app: u16,
    /// The stunnel server's TLS port.
    tls: u16,
    /// The stunnel client's port on 127.0.0.1 in the client Pod.
    local: u16,
}

const HTTP_TUNNEL: Tunnel = Tunnel {
    name: "http",
    app: HTTP_PORT,
    tls: 18080,
    local: 28080,
};
const ECHO_TUNNEL: Tunnel = Tunnel {
    name: "tcp",
    app: ECHO_PORT,
    tls: 19000,
    local: 29000,
};
const IPERF_TUNNEL: Tunnel = Tunnel {
    name: "iperf",
    app: IPERF_PORT,
    tls: 15201,
    local: 25201,
};
const TUNNELS: [Tunnel; 3] = [HTTP_TUNNEL, ECHO_TUNNEL, IPERF_TUNNEL];

/// A running stunnel pair, and the files it reads.
struct Stunnel {
    _procs: Vec<sidemesh_tests::process::Proc>,
    _dir: tempfile::TempDir,
}

/// Starts the L4 mTLS reference: a stunnel client in `client` listening on
/// 127.0.0.1 at each [`TUNNELS`] local port, a stunnel server in
/// `server` in front of its applications. Both sides present certificates
/// of one CA and check the other's (ECDSA P-256, TLS 1.3 with
/// AES-128-GCM, as between sidemesh proxies). `None` without stunnel.
fn start_stunnel(client: &Pod, server: &Pod) -> Option<Stunnel> {
    if std::env::var("BENCH_STUNNEL").is_ok_and(|v| v == "0") {
        return None;
    }
    let Some(program) = netns::find_program("stunnel") else {
        eprintln!("stunnel not installed (apt-get install stunnel4): no L4 mTLS reference column");
        return None;
    };
    let dir = tempfile::tempdir().ok()?;
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).ok();
    let ca_key = rcgen::KeyPair::generate().ok()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).ok()?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // rcgen's default subject is the same for every certificate, and OpenSSL
    // takes a leaf whose subject is its issuer's for self-signed.
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "bench CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).ok()?;
    write("ca.pem", &ca.pem())?;
    for (name, san) in [("server", server.ip().to_string()), ("client", "client".to_owned())] {
        let key = rcgen::KeyPair::generate().ok()?;
        let cert = rcgen::CertificateParams::new(vec![san])
            .ok()?
            .signed_by(&key, &ca)
            .ok()?;
        write(&format!("{name}.pem"), &cert.pem())?;
        write(&format!("{name}.key"), &key.serialize_pem())?;
    }
    let d = dir.path().display();
    let common = |name: &str| {
        format!(
            "cert = {d}/{name}.pem\nkey = {d}/{name}.key\nCAfile = {d}/ca.pem\nverifyChain = yes\n\
             sslVersionMin = TLSv1.3\nciphersuites = TLS_AES_128_GCM_SHA256\n\
             socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
        )
    };
    let global = "foreground = yes\npid =\nsyslog = no\ndebug = 3\n";
    let (mut client_conf, mut server_conf) = (global.to_owned(), global.to_owned());
    for Tunnel { name, app, tls, local } in TUNNELS {
        client_conf += &format!(
            "[{name}]\nclient = yes\naccept = 127.0.0.1:{local}\nconnect = {}:{tls}\ncheckIP = {}\n{}",
            server.ip(),
            server.ip(),
            common("client")
        );
        server_conf += &format!(
            "[{name}]\naccept = 0.0.0.0:{tls}\nconnect = 127.0.0.1:{app}\n{}",
            common("server")
        );
    }
    write("client.conf", &client_conf)?;
    write("server.conf", &server_conf)?;
    let conf = |name: &str| dir.path().join(name).display().to_string();
    let procs = vec![
        server.start("stunnel", &program, &[&conf("server.conf")], &[]),
        client.start("stunnel", &program, &[&conf("client.conf")], &[]),
    ];
    for Tunnel { tls, local, .. } in TUNNELS {
        if !server.wait_listening(tls, Duration::from_secs(10))
            || !client.wait_listening(local, Duration::from_secs(10))
        {
            eprintln!(
                "stunnel did not start (logs in {}): no L4 mTLS reference column",
                client.log_dir().display()
            );
            return None;
        }
    }
    Some(Stunnel {
        _procs: procs,
        _dir: dir,
    })
}

fn start_apps(pod: &Pod) -> Vec<sidemesh_tests::process::Proc> {
    let app = binary("sidemesh-test-app");
    let procs = vec![
        pod.start("app-http", &app, &["http", &format!("0.0.0.0:{HTTP_PORT}"), "web"], &[]),
        pod.start("app-echo", &app, &["echo", &format!("0.0.0.0:{ECHO_PORT}")], &[]),
        pod.start("iperf3", "iperf3", &["-s", "-p", &IPERF_PORT.to_string()], &[]),
    ];
    for port in [HTTP_PORT, ECHO_PORT, IPERF_PORT] {
        assert!(pod.wait_listening(port, Duration::from_secs(10)), "port {port}");
    }
    procs
}

fn main() {
    if netns::skip_unless_tools("dataplane benchmark", &["wrk", "iperf3", "h2load"]) {
        return;
    }
    let runs = env_or("BENCH_RUNS", 3) as usize;
    let secs = env_or("BENCH_SECONDS", 5);
    let mesh = Mesh::start("bench");
    let client_pod = mesh.plain_pod("client");
    let server_pod = mesh.plain_pod("server");
    let dclient = mesh.plain_pod("dclient");
    let dserver = mesh.plain_pod("dserver");
    let vip = service_ip(10).to_string();
    let (sip, cip) = (server_pod.ip().to_string(), client_pod.ip().to_string());
    mesh.set_objects(&yaml(&[
        service(
            "shop",
            "web",
            &vip,
            &[("http", 80), ("tcp", ECHO_PORT), ("iperf", IPERF_PORT)],
            json!({}),
        ),
        slice(
            "shop",
            "web-1",
            "web",
            &[("http", HTTP_PORT), ("tcp", ECHO_PORT), ("iperf", IPERF_PORT)],
            &[(&sip, "server", true)],
        ),
        pod("shop", "server", &sip, "web", true),
        pod("default", "client", &cip, "frontend", true),
    ]));
    let _apps = start_apps(&server_pod);
    let _dapps = start_apps(&dserver);
    let stunnel = start_stunnel(&dclient, &dserver);
    let idle_started = Instant::now();
    let server = mesh.mesh(server_pod, "shop", "web", &ProxyOptions::default());
    let mut client = mesh.mesh(client_pod, "default", "frontend", &ProxyOptions::default());
    // Start-up time is one sample per start: take the median of several
    // (the first start and restarts), and show the slowest too.
    let ready_of = |w: &Workload| {
        w.proxy
            .log()
            .lines()
            .filter(|l| l.contains("proxy ready"))
            .filter_map(|l| l.split("ms=").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
            .next_back()
            .unwrap_or(f64::NAN)
    };
    let mut starts = vec![ready_of(&client)];
    for _ in 0..4 {
        mesh.restart_proxy(&mut client, &ProxyOptions::default());
        starts.push(ready_of(&client));
    }
    let ready_max = starts.iter().copied().fold(f64::NAN, f64::max);
    let ready_ms = median(starts);
    let _ = idle_started;
    // Warm the mesh path (discovery answer, pooled connection) before measuring.
    let warm = client.run("curl", &["-sf", &format!("http://{vip}/warm")], Duration::from_secs(10));
    assert!(warm.success(), "mesh path does not work: {}", warm.stderr);
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = rss_mb(client.proxy.pid()).max(rss_mb(server.proxy.pid()));
    eprintln!(
        "idle RSS: client proxy {}; server proxy {}",
        rss_breakdown(client.proxy.pid()),
        rss_breakdown(server.proxy.pid())
    );

    let mesh_url = format!("http://{vip}/");
    let direct_url = format!("http://{}:{HTTP_PORT}/", dserver.ip());
    let close = ["-H", "Connection: close"];
    let mut rows: Vec<(String, f64, f64, Option<f64>, String)> = Vec::new();
    let only = std::env::var("BENCH_ONLY").ok();
    let wanted = |key: &str| only.as_deref().is_none_or(|o| o.split(',').any(|k| k.trim() == key));
    eprintln!(
        "client proxy pid {}, server proxy pid {}",
        client.proxy.pid(),
        server.proxy.pid()
    );
    let l4 = stunnel.is_some();
    let mut measure = |key: &str, name: &str, goal: &str, f: &dyn Fn(Path) -> f64| {
        if !wanted(key) {
            return;
        }
        let (mut direct, mut meshed, mut stunneled) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            direct.push(f(Path::Direct));
            meshed.push(f(Path::Mesh));
            if l4 {
                stunneled.push(f(Path::Stunnel));
            }
        }
        let stunneled = l4.then(|| median(stunneled));
        rows.push((
            name.to_owned(),
            median(direct),
            median(meshed),
            stunneled,
            goal.to_owned(),
        ));
    };
    let (c, d) = (&client.pod, &dclient);
    let stunnel_url = format!("http://127.0.0.1:{}/", HTTP_TUNNEL.local);
    let url = |p: Path| match p {
        Path::Direct => &direct_url,
        Path::Mesh => &mesh_url,
        Path::Stunnel => &stunnel_url,
    };
    let on = |p: Path| if p == Path::Mesh { c } else { d };
    measure(
        "keepalive",
        "HTTP/1.1 keep-alive, 64 connections, requests/s",
        "≥ 0.35",
        &|p| wrk(on(p), url(p), 64, secs, &[]),
    );
    measure("one", "HTTP/1.1 one connection, requests/s", "≥ 0.6", &|p| {
        wrk(on(p), url(p), 1, secs, &[])
    });
    measure(
        "new",
        "HTTP/1.1 new connection per request, requests/s",
        "≥ 0.27",
        &|p| wrk(on(p), url(p), 16, secs, &close),
    );
    let dserver_ip = dserver.ip().to_string();
    measure("bulk", "bulk TCP, one stream, Gbit/s", "≥ 0.45", &|p| {
        let (host, port) = match p {
            Path::Direct => (dserver_ip.as_str(), IPERF_PORT),
            Path::Mesh => (vip.as_str(), IPERF_PORT),
            Path::Stunnel => ("127.0.0.1", IPERF_TUNNEL.local),
        };
        iperf(on(p), host, port, secs) / 1e9
    });
    let mut rtts = None;
    if wanted("rtt") {
        let (mut direct, mut meshed, mut stunneled) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            direct.push(rtt(d, &format!("{}:{ECHO_PORT}", dserver.ip())).0);
            meshed.push(rtt(c, &format!("{vip}:{ECHO_PORT}")).0);
            if l4 {
                stunneled.push(rtt(d, &format!("127.0.0.1:{}", ECHO_TUNNEL.local)).0);
            }
        }
        rtts = Some((median(direct), median(meshed), l4.then(|| median(stunneled))));
    }

    // CPU of both proxies per 1000 requests/s, under saturating keep-alive load.
    let mut cpu_row = None;
    if wanted("cpu") {
        let pids = [client.proxy.pid(), server.proxy.pid()];
        let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
        let t0 = Instant::now();
        let rps = wrk(c, &mesh_url, 64, secs, &[]);
        let cpu = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
        cpu_row = Some((rps, (cpu / t0.elapsed().as_secs_f64()) / (rps / 1000.0)));
    }

    // RSS at 1000 requests/s over 100 connections (h2load: 100 clients × 10 rps).
    let mut rss_load = None;
    if wanted("rss") {
        let h2 = c
            .cmd("h2load")
            .args(["--h1", "-c", "100", "--rps", "10", "-D", "8", &mesh_url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut peak: f64 = 0.0;
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            peak = peak.max(rss_mb(client.proxy.pid())).max(rss_mb(server.proxy.pid()));
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Ok(mut h2) = h2 {
            let _ = h2.wait();
        }
        rss_load = Some(peak);
    }

    println!();
    println!(
        "data plane: client sidecar + server sidecar (mTLS) vs direct, medians of {runs} runs of {secs} s, one run"
    );
    println!("| figure | direct | sidemesh | ratio | stunnel (L4 mTLS) | ratio | goal |");
    println!("|---|---|---|---|---|---|---|");
    let ratio = |x: f64, direct: f64| x / direct.max(f64::MIN_POSITIVE);
    for (name, direct, meshed, stunneled, goal) in &rows {
        let l4 = stunneled.map_or(" | ".to_owned(), |s| format!("{s:.1} | {:.2}", ratio(s, *direct)));
        println!(
            "| {name} | {direct:.1} | {meshed:.1} | **{:.2}** | {l4} | {goal} |",
            ratio(*meshed, *direct)
        );
    }
    if let Some((direct, meshed, stunneled)) = rtts {
        let l4 = stunneled.map_or(" | ".to_owned(), |s| format!("{s:.0} | +{:.0} µs", s - direct));
        println!(
            "| small-message round trip p50 (64 B, TCP), µs | {direct:.0} | {meshed:.0} | +{:.0} µs | {l4} | |",
            meshed - direct
        );
    }
    if let Some((rps, vcpu)) = cpu_row {
        println!("| CPU of both proxies per 1000 requests/s (at {rps:.0} rps) | | {vcpu:.3} vCPU | | | | ≤ 0.04 |");
    }
    println!("| proxy RSS idle (max of the two), MB | | {rss_idle:.1} | | | | ≤ 8 |");
    if let Some(peak) = rss_load {
        println!("| proxy RSS at 1000 rps over 100 connections, MB | | {peak:.1} | | | | ≤ 15 |");
    }
    println!(
        "| proxy ready after start (certificate held), ms, median of 5 starts (slowest {ready_max:.0}) | | {ready_ms:.0} | | | | ≤ 50 |"
    );
}
