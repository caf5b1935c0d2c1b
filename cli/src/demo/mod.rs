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
use sidemesh_injector::inject::PROXY_GLIBC_TUNABLES;

/// The demo mesh objects (addresses match [`net::POD_PREFIX`]).
const MESH_YAML: &str = include_str!("../../../examples/demo/mesh.yaml");
/// The same on loopback addresses, for a demo without network namespaces.
const MESH_LOOPBACK_YAML: &str = include_str!("../../../examples/demo/mesh-loopback.yaml");

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
    for tool in ["ip", "iptables", "nsenter", "setpriv"] {
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
    /// `None` on loopback (no namespaces, no capture).
    net: Option<Net>,
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
        let mut cmd = match &self.net {
            Some(net) => net.enter(pod),
            None => Command::new(&self.exe),
        };
        if let (Some(uid), Some(_)) = (uid, &self.net) {
            let uid = uid.to_string();
            cmd.args(["setpriv", "--reuid", &uid, "--regid", &uid, "--clear-groups"]);
        }
        if self.net.is_some() {
            cmd.arg(&self.exe);
        }
        cmd.arg("__component").args(args);
        cmd.env("SIDEMESH_LOG", "warn").env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Own process group: Ctrl-C in the terminal reaches only the demo,
        // which then stops everything in order.
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// A command run inside Pod `pod` (on loopback: right here).
    fn in_pod(&self, pod: &str) -> Command {
        match &self.net {
            Some(net) => {
                let mut cmd = net.enter(pod);
                cmd.arg(&self.exe);
                cmd
            }
            None => Command::new(&self.exe),
        }
    }

    /// Waits until `url` answers 200 inside `pod`.
    fn wait_ok(&mut self, name: &str, pod: &str, url: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self
                .in_pod(pod)
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
        for (_, child) in &mut self.children {
            // `nsenter` and `setpriv` exec in place, so the child is the
            // component itself: SIGTERM it by its own (positive) PID, never a
            // process group — `kill -TERM -N` is read differently by
            // different kill(1)s, and one reading signals every process.
            if child.try_wait().ok().flatten().is_none() {
                let _ = Command::new("kill")
                    .args(["-s", "TERM", &child.id().to_string()])
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for (_, child) in &mut self.children {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if child.try_wait().ok().flatten().is_none() {
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

/// Where the workload Pod with last octet `octet` lives.
fn pod_addr(loopback: bool, octet: u8) -> String {
    if loopback {
        format!("127.0.250.{octet}")
    } else {
        net::pod_ip(octet).to_string()
    }
}

fn setup(exe: PathBuf, loopback: bool) -> anyhow::Result<Demo> {
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
    write(
        &p("mesh.yaml"),
        if loopback { MESH_LOOPBACK_YAML } else { MESH_YAML },
        0o644,
    )?;
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
    let net = if loopback { None } else { Some(Net::create(&pods)?) };
    let mut demo = Demo {
        exe,
        dir,
        net,
        children: Vec::new(),
    };
    let s = |p: PathBuf| p.display().to_string();
    let (bundle, issuer_crt, issuer_key) = (s(p("bundle.pem")), s(p("issuer.crt")), s(p("issuer.key")));
    let reviewer = format!("file:{}", s(p("tokens.yaml")));
    let cp = pod_addr(loopback, 2);
    let (id_listen, id_admin) = (format!("{cp}:8443"), format!("{cp}:9990"));
    let (dst_listen, dst_admin) = (format!("{cp}:8086"), format!("{cp}:9996"));
    demo.spawn(
        "identity",
        "cp",
        None,
        &[
            "identity",
            "--listen",
            &id_listen,
            "--admin-addr",
            &id_admin,
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
    demo.wait_ok(
        "identity",
        "cp",
        &format!("http://{id_admin}/ready"),
        Duration::from_secs(20),
    )?;
    let source = format!("file:{}", s(p("mesh.yaml")));
    demo.spawn(
        "destination",
        "cp",
        None,
        &[
            "destination",
            "--listen",
            &dst_listen,
            "--admin-addr",
            &dst_admin,
            "--source",
            &source,
            "--workers",
            "1",
        ],
        &[
            ("SIDEMESH_IDENTITY_ADDR", id_listen.clone()),
            ("SIDEMESH_TOKEN_PATH", s(p("destination.token"))),
            ("SIDEMESH_TRUST_BUNDLE", bundle.clone()),
        ],
    )?;
    demo.wait_ok(
        "destination",
        "cp",
        &format!("http://{dst_admin}/ready"),
        Duration::from_secs(20),
    )?;

    // Opaque TCP needs capture: the TCP service is left out on loopback.
    let workloads: Vec<_> = WORKLOADS
        .iter()
        .filter(|w| !(loopback && w.4.first() == Some(&"echo")))
        .collect();
    for (pod, ns, sa, octet, app) in &workloads {
        let ip = pod_addr(loopback, *octet);
        if !loopback {
            let out = demo
                .in_pod(pod)
                .args(["__component", "proxy", "init"])
                .output()
                .context("running proxy init")?;
            anyhow::ensure!(
                out.status.success(),
                "init in {pod}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let [mode, listen, rest @ ..] = app {
            // In a Pod the app listens everywhere (its proxy delivers on
            // 127.0.0.1); on loopback, on its own address.
            let listen = if loopback {
                listen.replace("0.0.0.0", &ip)
            } else {
                (*listen).to_owned()
            };
            let mut args = vec!["app", mode, listen.as_str()];
            args.extend(rest.iter());
            demo.spawn(&format!("{pod}-app"), pod, None, &args, &[])?;
        }
        let mut env = vec![
            ("SIDEMESH_IDENTITY_ADDR", id_listen.clone()),
            ("SIDEMESH_DESTINATION_ADDR", dst_listen.clone()),
            ("SIDEMESH_TOKEN_PATH", s(p(&format!("{pod}.token")))),
            ("SIDEMESH_TRUST_BUNDLE", bundle.clone()),
            (
                "SIDEMESH_WORKLOAD_ID",
                format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            ),
            ("SIDEMESH_INBOUND_POLICY", "strict".to_owned()),
            // As the injector sets it in every Pod.
            ("GLIBC_TUNABLES", PROXY_GLIBC_TUNABLES.to_owned()),
        ];
        if loopback {
            // No capture: each proxy on its own loopback address, delivering
            // inbound traffic to its application's fixed port.
            env.extend([
                ("SIDEMESH_INBOUND_ADDR", format!("{ip}:15006")),
                ("SIDEMESH_OUTBOUND_ADDR", format!("{ip}:15001")),
                ("SIDEMESH_ADMIN_ADDR", format!("{ip}:15020")),
                ("SIDEMESH_APP_ADDR", format!("{ip}:9080")),
            ]);
        }
        demo.spawn(&format!("{pod}-proxy"), pod, Some(1337), &["proxy", "run"], &env)?;
    }
    for (pod, _, _, octet, _) in &workloads {
        let admin = if loopback {
            format!("{}:15020", pod_addr(true, *octet))
        } else {
            "127.0.0.1:15020".to_owned()
        };
        demo.wait_ok(
            &format!("{pod}-proxy"),
            pod,
            &format!("http://{admin}/ready"),
            Duration::from_secs(20),
        )?;
    }
    let stats = s(p("stats.json"));
    if loopback {
        let fe = pod_addr(true, 10);
        let (via, admin) = (format!("{fe}:15001"), format!("{fe}:15020"));
        demo.spawn(
            "frontend-load",
            "frontend",
            None,
            &["app", "load", "http://127.0.251.10/", "-", RPS, &stats, &via, &admin],
            &[],
        )?;
    } else {
        demo.spawn(
            "frontend-load",
            "frontend",
            None,
            &["app", "load", REVIEWS_URL, RATINGS_ADDR, RPS, &stats],
            &[],
        )?;
    }
    Ok(demo)
}

/// Runs the demo for `duration` seconds (until Ctrl-C without one).
pub fn run(duration: Option<u64>, no_netns: bool) -> anyhow::Result<()> {
    let why = if no_netns {
        Some("--no-netns".to_owned())
    } else {
        netns_unavailable()
    };
    let loopback = why.is_some();
    let exe = std::env::current_exe().context("locating the sidemesh binary")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match &why {
        Some(why) => println!(
            "sidemesh demo: no network namespaces ({why}): running on loopback ports 127.0.250.0/24 without traffic capture, HTTP only (as root it uses namespaces and iptables)"
        ),
        None => println!(
            "sidemesh demo: starting the control plane and 5 workloads in network namespaces (real iptables capture, mTLS)…"
        ),
    }
    let started = Instant::now();
    let mut demo = setup(exe, loopback)?;
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
                } else if view.seconds().is_multiple_of(5) {
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
    let namespaces = demo.net.as_ref().map_or(0, Net::len);
    drop(demo);
    println!("{}", view.summary());
    println!("cleanup: stopped {processes} processes, removed {namespaces} network namespaces and the temporary files");
    Ok(())
}
