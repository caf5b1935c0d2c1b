//! A whole mesh in network namespaces: a control-plane "Pod" running the real
//! identity and destination services (file source), and workload Pods each
//! with the real `sidemesh-proxy init` rules, a real proxy running as UID
//! 1337, and an application. Tests drive it with real clients (curl, h2load,
//! openssl) run inside the Pods.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::netns::{Network, Output, Pod};
use crate::pki::{self, Pki};
use crate::process::{Proc, binary};
use sidemesh_injector::inject::PROXY_GLIBC_TUNABLES;

/// Identity service port in the control-plane Pod.
pub const IDENTITY_PORT: u16 = 8443;
/// Destination service port in the control-plane Pod.
pub const DESTINATION_PORT: u16 = 8086;

/// The control plane and its files.
pub struct Mesh {
    /// The network (switch namespace and bridge).
    pub net: Network,
    /// The control-plane Pod.
    pub cp: Pod,
    /// Root, issuer, bundle.
    pub pki: Pki,
    /// The destination service's objects file.
    pub objects: PathBuf,
    tokens: Mutex<String>,
    /// The identity service.
    pub identity: Proc,
    /// The destination service.
    pub destination: Proc,
    dir: tempfile::TempDir,
}

/// A meshed workload Pod.
pub struct Workload {
    /// Its namespace.
    pub pod: Pod,
    /// Its proxy.
    pub proxy: Proc,
    /// Its SPIFFE ID.
    pub id: String,
}

/// How a workload's proxy is configured.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// `strict` or `permissive` (default).
    pub policy: Option<&'static str>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Extra `init` flags.
    pub init_args: Vec<String>,
}

fn make_readable(path: &Path, mode: u32) {
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

impl Mesh {
    /// Starts identity and destination in a control-plane Pod.
    pub fn start(prefix: &str) -> Self {
        Self::start_with(prefix, &[])
    }

    /// [`Mesh::start`], with extra flags for the destination service.
    pub fn start_with(prefix: &str, destination_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // The proxies run as UID 1337 and read the bundle and their tokens.
        make_readable(dir.path(), 0o755);
        let pki = Pki::new(dir.path());
        for f in ["root.crt", "issuer.crt", "bundle.pem"] {
            make_readable(&pki.path(f), 0o644);
        }
        let net = Network::new(prefix);
        let cp = net.add_pod("cp");
        let tokens = pki::token_line("token-sidemesh-destination", "sidemesh-system", "sidemesh-destination");
        pki::write(&pki.path("tokens.yaml"), &tokens);
        std::fs::write(pki.path("destination.token"), "token-sidemesh-destination\n").expect("token");
        let objects = dir.path().join("mesh.yaml");
        pki::write(&objects, "");
        let p = |n: &str| pki.path(n).display().to_string();
        let listen = format!("0.0.0.0:{IDENTITY_PORT}");
        let reviewer = format!("file:{}", p("tokens.yaml"));
        let identity_bin = binary("sidemesh-identity");
        let identity = cp.start(
            "identity",
            &identity_bin,
            &[
                "--listen",
                &listen,
                "--admin-addr",
                "0.0.0.0:9990",
                "--token-reviewer",
                &reviewer,
                "--trust-bundle",
                &p("bundle.pem"),
                "--issuer-cert",
                &p("issuer.crt"),
                "--issuer-key",
                &p("issuer.key"),
            ],
            &[],
        );
        assert!(
            cp.wait_listening(IDENTITY_PORT, Duration::from_secs(20)),
            "identity did not listen:\n{}",
            identity.log()
        );
        let identity_addr = format!("{}:{IDENTITY_PORT}", cp.ip());
        let source = format!("file:{}", objects.display());
        let dlisten = format!("0.0.0.0:{DESTINATION_PORT}");
        let destination_bin = binary("sidemesh-destination");
        let token = p("destination.token");
        let bundle = p("bundle.pem");
        let mut dargs = vec![
            "--listen",
            &dlisten,
            "--admin-addr",
            "0.0.0.0:9996",
            "--source",
            &source,
        ];
        dargs.extend_from_slice(destination_args);
        let destination = cp.start(
            "destination",
            &destination_bin,
            &dargs,
            &[
                ("SIDEMESH_IDENTITY_ADDR", &identity_addr),
                ("SIDEMESH_TOKEN_PATH", &token),
                ("SIDEMESH_TRUST_BUNDLE", &bundle),
                (
                    "SIDEMESH_WORKLOAD_ID",
                    "spiffe://cluster.local/ns/sidemesh-system/sa/sidemesh-destination",
                ),
            ],
        );
        let mesh = Self {
            net,
            cp,
            pki,
            objects,
            tokens: Mutex::new(tokens),
            identity,
            destination,
            dir,
        };
        mesh.wait_http_ok(&mesh.cp, "127.0.0.1:9996", "/ready", Duration::from_secs(30));
        mesh
    }

    /// The temporary directory of this mesh.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ip:port` of the identity service.
    pub fn identity_addr(&self) -> String {
        format!("{}:{IDENTITY_PORT}", self.cp.ip())
    }

    /// `ip:port` of the destination service.
    pub fn destination_addr(&self) -> String {
        format!("{}:{DESTINATION_PORT}", self.cp.ip())
    }

    /// Replaces the destination service's objects.
    pub fn set_objects(&self, yaml: &str) {
        pki::write(&self.objects, yaml);
    }

    /// Polls `GET http://addr path` from inside `pod` until 200, or panics.
    pub fn wait_http_ok(&self, pod: &Pod, addr: &str, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let url = format!("http://{addr}{path}");
        while Instant::now() < deadline {
            if pod
                .run("curl", &["-sf", "--max-time", "2", &url], Duration::from_secs(5))
                .success()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{url} not OK in {} within {timeout:?}\nidentity:\n{}\ndestination:\n{}",
            pod.name(),
            self.identity.log(),
            self.destination.log()
        );
    }

    /// A Pod without a proxy.
    pub fn plain_pod(&self, name: &str) -> Pod {
        self.net.add_pod(name)
    }

    /// Meshes `pod` as ServiceAccount `ns/sa`: token, `init` rules, proxy as
    /// UID 1337; waits until the proxy is ready.
    pub fn mesh(&self, pod: Pod, ns: &str, sa: &str, opts: &ProxyOptions) -> Workload {
        let token = format!("token-{ns}-{sa}-{}", pod.name());
        {
            let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            tokens.push_str(&pki::token_line(&token, ns, sa));
            pki::write(&self.pki.path("tokens.yaml"), &tokens);
        }
        let token_path = self.dir.path().join(format!("{}.token", pod.name()));
        std::fs::write(&token_path, format!("{token}\n")).expect("token file");
        make_readable(&token_path, 0o644);
        let proxy_bin = binary("sidemesh-proxy");
        let mut init: Vec<&str> = vec!["init"];
        init.extend(opts.init_args.iter().map(String::as_str));
        let out = pod.run(&proxy_bin, &init, Duration::from_secs(30));
        assert!(out.success(), "init failed in {}: {}", pod.name(), out.stderr);
        let id = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
        let proxy = self.start_proxy(&pod, &token_path, &id, opts);
        Workload { pod, proxy, id }
    }

    /// Stops `w`'s proxy and starts it again with `opts` (same identity and
    /// token, `init` rules kept); waits until it is ready.
    pub fn restart_proxy(&self, w: &mut Workload, opts: &ProxyOptions) {
        let _ = w.proxy.terminate(Duration::from_secs(10));
        let token_path = self.dir.path().join(format!("{}.token", w.pod.name()));
        w.proxy = self.start_proxy(&w.pod, &token_path, &w.id, opts);
    }

    fn start_proxy(&self, pod: &Pod, token_path: &Path, id: &str, opts: &ProxyOptions) -> Proc {
        let mut env: Vec<(String, String)> = vec![
            ("SIDEMESH_IDENTITY_ADDR".into(), self.identity_addr()),
            ("SIDEMESH_DESTINATION_ADDR".into(), self.destination_addr()),
            ("SIDEMESH_TOKEN_PATH".into(), token_path.display().to_string()),
            (
                "SIDEMESH_TRUST_BUNDLE".into(),
                self.pki.path("bundle.pem").display().to_string(),
            ),
            ("SIDEMESH_WORKLOAD_ID".into(), id.to_owned()),
            (
                "SIDEMESH_INBOUND_POLICY".into(),
                opts.policy.unwrap_or("permissive").into(),
            ),
            // As the injector sets it in every Pod.
            ("GLIBC_TUNABLES".into(), PROXY_GLIBC_TUNABLES.into()),
        ];
        env.extend(opts.env.iter().cloned());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let proxy = pod.start_as(1337, "proxy", binary("sidemesh-proxy"), &["run"], &env);
        self.wait_http_ok(pod, "127.0.0.1:15020", "/ready", Duration::from_secs(30));
        proxy
    }
}

impl Workload {
    /// The Pod's IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ip()
    }

    /// `/debug/state` of its proxy as JSON.
    pub fn state(&self) -> serde_json::Value {
        let out = self.pod.run(
            "curl",
            &["-sf", "--max-time", "5", "http://127.0.0.1:15020/debug/state"],
            Duration::from_secs(30),
        );
        serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// `/metrics` of its proxy (Prometheus text; empty if it did not answer).
    pub fn metrics(&self) -> String {
        self.pod
            .run(
                "curl",
                &["-sf", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
                Duration::from_secs(30),
            )
            .stdout
    }

    /// Runs a client inside the Pod.
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Output {
        self.pod.run(program, args, timeout)
    }
}
