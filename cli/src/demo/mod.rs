//! `sidemesh demo`: the whole mesh on this machine, no Kubernetes.
//!
//! As root, every workload is a "Pod": a network namespace joined to a
//! bridge, with the real `sidemesh-proxy init` iptables rules, its
//! application, and its proxy running as UID 1337; a control-plane Pod runs
//! the identity service (with a fresh root) and the destination service fed
//! by `examples/demo/mesh.yaml`. The frontend Pod drives traffic; the view
//! refreshes every second from what it measures and from its proxy's
//! metrics and state. Everything made is removed on any exit.

pub mod app;
mod net;
mod view;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use net::Net;

/// The demo mesh objects (addresses match [`net::POD_PREFIX`]).
const MESH_YAML: &str = include_str!("../../../examples/demo/mesh.yaml");

/// Workload Pods: (pod, namespace, serviceaccount, last octet, application args).
const WORKLOADS: &[(&str, &str, &str, u8, &[&str])] = &[
    (
        "reviews-v1-a",
        "shop",
        "reviews",
        20,
        &["http", "0.0.0.0:9080", "reviews-v1", "0"],
    ),
    (
        "reviews-v1-b",
        "shop",
        "reviews",
        21,
        &["http", "0.0.0.0:9080", "reviews-v1", "0"],
    ),
    (
        "reviews-v2-a",
        "shop",
        "reviews",
        22,
        &["http", "0.0.0.0:9080", "reviews-v2", "15"],
    ),
    ("ratings-a", "shop", "ratings", 30, &["echo", "0.0.0.0:9000"]),
    ("frontend", "default", "frontend", 10, &[]),
];

/// The Service the frontend calls, and the TCP one.
const REVIEWS_URL: &str = "http://10.214.250.10/";
const RATINGS_ADDR: &str = "10.214.250.20:9000";
/// Requests per second the frontend sends.
const RPS: &str = "200";

/// `GET url` from inside a Pod; exit 0 on 200 (readiness probes).
pub fn probe(args: &[String]) -> ExitCode {
    let Some(url) = args.first() else {
        return ExitCode::from(2);
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return ExitCode::FAILURE;
    };
    let ok = rt.block_on(async {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let Ok(uri) = url.parse::<http::Uri>() else {
            return false;
        };
        matches!(tokio::time::timeout(Duration::from_secs(2), client.get(uri)).await, Ok(Ok(r)) if r.status() == 200)
    });
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Why the demo cannot use network namespaces, if it cannot.
fn netns_unavailable() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse::<u32>().ok())
    });
    if uid != Some(0) {
        return Some("not running as root".into());
    }
    for tool in ["ip", "iptables", "setpriv"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// Everything the demo started; dropping it stops and removes all of it.
struct Demo {
    exe: PathBuf,
    dir: tempfile::TempDir,
    net: Net,
    children: Vec<(String, Child)>,
}

impl Demo {
    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts `__component args` in Pod `pod` (as `uid` when given).
    fn spawn(
        &mut self,
        name: &str,
        pod: &str,
        uid: Option<u32>,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.log(name))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.net.ns(pod)]);
        if let Some(uid) = uid {
            let uid = uid.to_string();
            cmd.args(["setpriv", "--reuid", &uid, "--regid", &uid, "--clear-groups"]);
        }
        cmd.arg(&self.exe).arg("__component").args(args);
        cmd.env("SIDEMESH_LOG", "warn").env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Own process group: Ctrl-C in the terminal reaches the demo, which
        // then stops everything in order.
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Waits until `url` answers 200 inside `pod`.
    fn wait_ok(&mut self, name: &str, pod: &str, url: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = Command::new("ip")
                .args(["netns", "exec", &self.net.ns(pod)])
                .arg(&self.exe)
                .args(["__component", "probe", url])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if status.is_ok_and(|s| s.success()) {
                return Ok(());
            }
            for (n, child) in &mut self.children {
                if let Ok(Some(st)) = child.try_wait() {
                    anyhow::bail!(
                        "{n} exited ({st}):\n{}",
                        tail(&self.dir.path().join(format!("{n}.log")))
                    );
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("{name} not ready within {timeout:?}:\n{}", tail(&self.log(name)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) -> usize {
        let n = self.children.len();
        for (_, child) in &self.children {
            // The whole group: `ip netns exec` and `setpriv` exec, but be thorough.
            let _ = Command::new("kill")
                .args(["-TERM", &format!("-{}", child.id())])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for (_, child) in &mut self.children {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = Command::new("kill")
                    .args(["-KILL", &format!("-{}", child.id())])
                    .status();
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.children.clear();
        n
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop();
        // Namespaces go with Net's own Drop; the temp dir with TempDir's.
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn write(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn setup(exe: PathBuf) -> anyhow::Result<Demo> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::Builder::new().prefix("sidemesh-demo-").tempdir()?;
    // Proxies run as UID 1337 and read the bundle and their tokens.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let base = dir.path().to_path_buf();
    let p = |n: &str| base.join(n);
    let root = sidemesh_identity::ca::new_root("cluster.local", Duration::from_secs(7 * 86400))?;
    let issuer = sidemesh_identity::ca::new_issuer(&root.cert, &root.key, Duration::from_secs(2 * 86400))?;
    write(&p("bundle.pem"), &root.cert, 0o644)?;
    write(&p("issuer.crt"), &issuer.cert, 0o644)?;
    write(&p("issuer.key"), &issuer.key, 0o600)?;
    write(&p("mesh.yaml"), MESH_YAML, 0o644)?;
    let mut tokens =
        String::from("\"token-destination\": { namespace: sidemesh-system, serviceAccount: sidemesh-destination }\n");
    for (pod, ns, sa, _, _) in WORKLOADS {
        tokens.push_str(&format!(
            "\"token-{pod}\": {{ namespace: {ns}, serviceAccount: {sa} }}\n"
        ));
        write(&p(&format!("{pod}.token")), &format!("token-{pod}\n"), 0o644)?;
    }
    write(&p("destination.token"), "token-destination\n", 0o644)?;
    write(&p("tokens.yaml"), &tokens, 0o600)?;

    let mut pods: Vec<(&str, u8)> = vec![("cp", 2)];
    pods.extend(WORKLOADS.iter().map(|(pod, _, _, octet, _)| (*pod, *octet)));
    let net = Net::create(&pods)?;
    let mut demo = Demo {
        exe,
        dir,
        net,
        children: Vec::new(),
    };
    let s = |p: PathBuf| p.display().to_string();
    let (bundle, issuer_crt, issuer_key) = (s(p("bundle.pem")), s(p("issuer.crt")), s(p("issuer.key")));
    let reviewer = format!("file:{}", s(p("tokens.yaml")));
    demo.spawn(
        "identity",
        "cp",
        None,
        &[
            "identity",
            "--listen",
            "0.0.0.0:8443",
            "--admin-addr",
            "0.0.0.0:9990",
            "--token-reviewer",
            &reviewer,
            "--trust-bundle",
            &bundle,
            "--issuer-cert",
            &issuer_crt,
            "--issuer-key",
            &issuer_key,
            "--workers",
            "1",
        ],
        &[],
    )?;
    demo.wait_ok("identity", "cp", "http://127.0.0.1:9990/ready", Duration::from_secs(20))?;
    let identity_addr = format!("{}:8443", net::pod_ip(2));
    let source = format!("file:{}", s(p("mesh.yaml")));
    demo.spawn(
        "destination",
        "cp",
        None,
        &[
            "destination",
            "--listen",
            "0.0.0.0:8086",
            "--admin-addr",
            "0.0.0.0:9996",
            "--source",
            &source,
            "--workers",
            "1",
        ],
        &[
            ("SIDEMESH_IDENTITY_ADDR", identity_addr.clone()),
            ("SIDEMESH_TOKEN_PATH", s(p("destination.token"))),
            ("SIDEMESH_TRUST_BUNDLE", bundle.clone()),
        ],
    )?;
    demo.wait_ok(
        "destination",
        "cp",
        "http://127.0.0.1:9996/ready",
        Duration::from_secs(20),
    )?;

    for (pod, ns, sa, _, app) in WORKLOADS {
        let out = Command::new("ip")
            .args(["netns", "exec", &demo.net.ns(pod)])
            .arg(&demo.exe)
            .args(["__component", "proxy", "init"])
            .output()
            .context("running proxy init")?;
        anyhow::ensure!(
            out.status.success(),
            "init in {pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if !app.is_empty() {
            let mut args = vec!["app"];
            args.extend(app.iter());
            demo.spawn(&format!("{pod}-app"), pod, None, &args, &[])?;
        }
        demo.spawn(
            &format!("{pod}-proxy"),
            pod,
            Some(1337),
            &["proxy", "run"],
            &[
                ("SIDEMESH_IDENTITY_ADDR", identity_addr.clone()),
                ("SIDEMESH_DESTINATION_ADDR", format!("{}:8086", net::pod_ip(2))),
                ("SIDEMESH_TOKEN_PATH", s(p(&format!("{pod}.token")))),
                ("SIDEMESH_TRUST_BUNDLE", bundle.clone()),
                (
                    "SIDEMESH_WORKLOAD_ID",
                    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
                ),
                ("SIDEMESH_INBOUND_POLICY", "strict".to_owned()),
            ],
        )?;
    }
    for (pod, _, _, _, _) in WORKLOADS {
        demo.wait_ok(
            &format!("{pod}-proxy"),
            pod,
            "http://127.0.0.1:15020/ready",
            Duration::from_secs(20),
        )?;
    }
    let stats = s(p("stats.json"));
    demo.spawn(
        "frontend-load",
        "frontend",
        None,
        &["app", "load", REVIEWS_URL, RATINGS_ADDR, RPS, &stats],
        &[],
    )?;
    Ok(demo)
}

/// Runs the demo for `duration` seconds (until Ctrl-C without one).
pub fn run(duration: Option<u64>, no_netns: bool) -> anyhow::Result<()> {
    let why = if no_netns {
        Some("--no-netns".to_owned())
    } else {
        netns_unavailable()
    };
    if let Some(why) = why {
        anyhow::bail!(
            "the demo needs network namespaces and iptables ({why}); a loopback fallback is not built yet — run as root: sudo $(which sidemesh) demo"
        );
    }
    let exe = std::env::current_exe().context("locating the sidemesh binary")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    println!(
        "sidemesh demo: starting the control plane and 5 workloads in network namespaces (real iptables capture, mTLS)…"
    );
    let started = Instant::now();
    let mut demo = setup(exe)?;
    println!(
        "mesh up in {:.1}s; driving traffic (Ctrl-C to stop)",
        started.elapsed().as_secs_f64()
    );
    let stats = demo.dir.path().join("stats.json");
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let deadline = duration.map(|d| Instant::now() + Duration::from_secs(d));
    let mut view = view::View::new();
    let interrupted = rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::signal::ctrl_c() => return true,
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => return true,
            }
            if let Some(snap) = std::fs::read(&stats).ok().and_then(|b| serde_json::from_slice::<app::Snapshot>(&b).ok()) {
                view.update(snap);
                if tty {
                    print!("\x1b[2J\x1b[H{}", view.render());
                } else if view.seconds() % 5 == 0 {
                    println!("{}", view.line());
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
        }
    });
    if interrupted {
        println!("\ninterrupted; stopping");
    }
    let processes = demo.stop();
    let namespaces = demo.net.len();
    drop(demo);
    println!("{}", view.summary());
    println!("cleanup: stopped {processes} processes, removed {namespaces} network namespaces and the temporary files");
    Ok(())
}
