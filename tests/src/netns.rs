//! "Pods" as Linux network namespaces, for tests that need real iptables
//! capture and real addresses: a [`Network`] is a private "switch" namespace
//! holding a bridge; each [`Pod`] is a namespace with `lo` up and an `eth0`
//! veth into that bridge, an address in `10.213.N.0/24` (and
//! `fd00:213:N::/64`), and a default route via the bridge's gateway address,
//! so that connections to Service-like virtual IPs ([`service_ip`], in
//! `10.214.0.0/24`, owned by nobody) leave through OUTPUT where iptables can
//! capture them.
//!
//! Nothing is created in the root namespace: the bridge and the host ends of
//! the veths live in the switch namespace, so networks of concurrent tests
//! cannot see each other even when their subnets coincide (N is still varied
//! per network, which keeps logs and packet captures unambiguous). Packets
//! nobody captured die at the gateway, which does not forward.
//!
//! Everything is removed on drop, also when a test panics: first the
//! processes still running inside a Pod's namespace, then the namespace; the
//! switch namespace goes when the network and all its Pods are gone.
//! Namespaces left behind by a test process that was killed outright are
//! deleted by the next [`Network::new`] (they carry the creator's pid).
//!
//! ```no_run
//! use sidemesh_tests::netns::{self, Network};
//! if netns::skip_unless_capable("my_test") {
//!     return;
//! }
//! let net = Network::new("mytest");
//! let server = net.add_pod("server");
//! let client = net.add_pod("client");
//! let _listener = server.start("listener", "python3", &["-m", "http.server", "8080"], &[]);
//! assert!(server.wait_listening(8080, std::time::Duration::from_secs(5)));
//! let url = format!("http://{}:8080/", server.ip());
//! let out = client.run("curl", &["-sS", "--max-time", "5", &url], std::time::Duration::from_secs(10));
//! assert!(out.success(), "{}", out.stderr);
//! ```

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process::Proc;

/// Prefix of every namespace this module creates (`smt-<pid>-<n>-…`).
const NS_PREFIX: &str = "smt-";
/// Bound for one `ip` invocation.
const IP_TIMEOUT: Duration = Duration::from_secs(20);
/// The Service-like virtual range: routed out of every Pod, owned by nobody.
pub const SERVICE_CIDR: &str = "10.214.0.0/24";
/// The IPv6 Service-like virtual range.
pub const SERVICE_CIDR_V6: &str = "fd00:214::/64";

static NETWORKS: AtomicU32 = AtomicU32::new(0);

/// A Service-like virtual IPv4 address `10.214.0.<host>`.
pub fn service_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 214, 0, host)
}

/// A Service-like virtual IPv6 address `fd00:214::<host>`.
pub fn service_ip_v6(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x214, 0, 0, 0, 0, 0, host)
}

/// True (after printing one line saying why) when this process cannot run
/// network-namespace tests: not root, `ip` or `iptables` missing, or
/// namespaces cannot be created here. Use as `if skip_unless_capable(..) { return; }`.
pub fn skip_unless_capable(test_name: &str) -> bool {
    static CAPABLE: OnceLock<Result<(), String>> = OnceLock::new();
    match CAPABLE.get_or_init(probe) {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipping {test_name}: needs root, ip and iptables ({why})");
            true
        }
    }
}

/// Like [`skip_unless_capable`], and also needs each of `tools` in PATH
/// (e.g. `curl`, `python3`); prints one line naming what is missing.
pub fn skip_unless_tools(test_name: &str, tools: &[&str]) -> bool {
    if skip_unless_capable(test_name) {
        return true;
    }
    let missing: Vec<&str> = tools.iter().copied().filter(|t| find_program(t).is_none()).collect();
    if missing.is_empty() {
        return false;
    }
    eprintln!("skipping {test_name}: needs {}", missing.join(", "));
    true
}

fn probe() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("reading /proc/self/status: {e}"))?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Err(format!("running as uid {euid}"));
    }
    for tool in ["ip", "nsenter", "ss", "iptables", "iptables-save", "iptables-restore"] {
        if find_program(tool).is_none() {
            return Err(format!("{tool} not found"));
        }
    }
    // Root in a container may still lack CAP_SYS_ADMIN/CAP_NET_ADMIN: try it.
    let name = format!("{NS_PREFIX}{}-probe", std::process::id());
    let added = ip_cmd(&["netns", "add", &name]);
    let usable = added.and_then(|()| ip_cmd(&["-n", &name, "link", "add", "probe0", "type", "bridge"]));
    let _ = ip_cmd(&["netns", "del", &name]);
    usable.map_err(|e| format!("cannot create network namespaces: {e}"))
}

/// Looks a program up in PATH and the usual sbin directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// What a command run with [`run_bounded`] produced.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Output {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Runs `cmd` to completion with piped output, killing it after `timeout`
/// (an `ErrorKind::TimedOut` error then).
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> std::io::Result<Output> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Drained on threads so a full pipe cannot stall the child while we poll.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let stuck = where_stuck(child.id());
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("did not finish within {timeout:?} ({stuck})"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// What process `pid` is and where the kernel has it waiting, for the
/// message of a command that overran.
fn where_stuck(pid: u32) -> String {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
    let state = read("status")
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    format!(
        "pid {pid} {} in state {state}, waiting in {}",
        read("comm").trim(),
        read("wchan").trim()
    )
}

/// Runs `ip <args>`; the error holds its stderr.
fn ip_cmd(args: &[&str]) -> Result<(), String> {
    let out =
        run_bounded(Command::new("ip").args(args), IP_TIMEOUT).map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), out.stderr.trim()))
    }
}

/// Like [`ip_cmd`], panicking with the command and its error.
fn must_ip(args: &[&str]) {
    if let Err(e) = ip_cmd(args) {
        panic!("network namespace setup failed: {e}");
    }
}

/// Kills what still runs in `ns` (only processes inside a namespace we
/// created) and deletes it; bounded, errors ignored (this runs in Drop).
fn remove_namespace(ns: &str) {
    for _ in 0..3 {
        let pids = run_bounded(Command::new("ip").args(["netns", "pids", ns]), IP_TIMEOUT)
            .map(|o| o.stdout)
            .unwrap_or_default();
        let pids: Vec<&str> = pids
            .split_whitespace()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        if pids.is_empty() {
            break;
        }
        let _ = run_bounded(Command::new("kill").arg("-KILL").args(&pids), IP_TIMEOUT);
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = ip_cmd(&["netns", "del", ns]);
}

/// Deletes namespaces of this module whose creating process is gone (a test
/// binary killed before its destructors ran). Once per process.
fn collect_stale_namespaces() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let Ok(list) = run_bounded(Command::new("ip").args(["netns", "list"]), IP_TIMEOUT) else {
            return;
        };
        for name in list.stdout.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(pid) = name.strip_prefix(NS_PREFIX).and_then(|r| r.split('-').next()) else {
                continue;
            };
            let dead = pid
                .parse::<u32>()
                .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists());
            if dead {
                let _ = ip_cmd(&["netns", "del", name]);
            }
        }
    });
}

/// Keeps a name to what `ip netns` and file names accept, short enough to read.
fn sanitize(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(max)
        .collect();
    if clean.is_empty() { "x".to_owned() } else { clean }
}

/// State shared by a network and its pods; the switch goes with the last of them.
#[derive(Debug)]
struct Shared {
    id: String,
    switch_ns: String,
    subnet: u8,
    /// Next host number and next veth index.
    next: Mutex<(u8, u32)>,
    log_dir: tempfile::TempDir,
}

impl Drop for Shared {
    fn drop(&mut self) {
        remove_namespace(&self.switch_ns);
    }
}

/// A test network: a bridge in its own namespace, the gateway of its Pods.
#[derive(Debug)]
pub struct Network {
    shared: Arc<Shared>,
}

impl Network {
    /// Creates the switch namespace with bridge `br0` at `10.213.N.1/24` (and
    /// `fd00:213:N::1/64`); `prefix` (e.g. the test's name) goes into every
    /// namespace name. Panics with the failing command if setup fails.
    pub fn new(prefix: &str) -> Self {
        collect_stale_namespaces();
        let pid = std::process::id();
        let n = NETWORKS.fetch_add(1, Ordering::Relaxed);
        let subnet = ((u64::from(pid) * 31 + u64::from(n)) % 250 + 1) as u8;
        let id = format!("{NS_PREFIX}{pid}-{n}-{}", sanitize(prefix, 24));
        let switch_ns = format!("{id}-sw");
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("temporary directory for {id}: {e}"));
        // Processes started as another uid (e.g. the proxy's 1337) read scripts from here.
        let _ = std::fs::set_permissions(log_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755));
        must_ip(&["netns", "add", &switch_ns]);
        let shared = Arc::new(Shared {
            id,
            switch_ns,
            subnet,
            next: Mutex::new((2, 0)),
            log_dir,
        });
        let sw = shared.switch_ns.as_str();
        let gw4 = format!("{}/24", Self::gateway_of(subnet));
        let gw6 = format!("{}/64", Self::gateway_v6_of(subnet));
        must_ip(&["-n", sw, "link", "set", "lo", "up"]);
        must_ip(&["-n", sw, "link", "add", "br0", "type", "bridge"]);
        must_ip(&["-n", sw, "addr", "add", &gw4, "dev", "br0"]);
        let _ = ip_cmd(&["-n", sw, "addr", "add", &gw6, "dev", "br0", "nodad"]);
        must_ip(&["-n", sw, "link", "set", "br0", "up"]);
        Self { shared }
    }

    fn gateway_of(subnet: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, subnet, 1)
    }

    fn gateway_v6_of(subnet: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x213, u16::from(subnet), 0, 0, 0, 0, 1)
    }

    /// The gateway (bridge) address, every Pod's default route.
    pub fn gateway(&self) -> Ipv4Addr {
        Self::gateway_of(self.shared.subnet)
    }

    /// The Pods' IPv4 subnet, e.g. `10.213.7.0/24`.
    pub fn cidr(&self) -> String {
        format!("10.213.{}.0/24", self.shared.subnet)
    }

    /// The Pods' IPv6 subnet, e.g. `fd00:213:7::/64`.
    pub fn cidr_v6(&self) -> String {
        format!("fd00:213:{:x}::/64", self.shared.subnet)
    }

    /// Name of the switch namespace (e.g. for `tcpdump -i br0` inside it).
    pub fn switch_netns(&self) -> &str {
        &self.shared.switch_ns
    }

    /// A directory removed with the network, for logs and scripts (mode 0755).
    pub fn log_dir(&self) -> &Path {
        self.shared.log_dir.path()
    }

    /// A command run inside the switch namespace.
    pub fn switch_cmd(&self, program: impl AsRef<OsStr>) -> Command {
        netns_cmd(&self.shared.switch_ns, program)
    }

    /// Adds a Pod: namespace, `lo` up, `eth0` into the bridge with the next
    /// free address, default routes via the gateway. Panics if setup fails
    /// or the /24 is full.
    pub fn add_pod(&self, name: &str) -> Pod {
        let (host, veth) = {
            let mut next = self.shared.next.lock().unwrap_or_else(|p| p.into_inner());
            let taken = *next;
            assert!(taken.0 < 255, "network {} has no free addresses left", self.shared.id);
            next.0 += 1;
            next.1 += 1;
            taken
        };
        let name = sanitize(name, 24);
        let ns = format!("{}-{name}-{host}", self.shared.id);
        // Only unique inside the switch namespace, so short: "veth<n>" ≤ 15 chars.
        let host_end = format!("veth{veth}");
        let ip = Ipv4Addr::new(10, 213, self.shared.subnet, host);
        let ipv6 = Ipv6Addr::new(
            0xfd00,
            0x213,
            u16::from(self.shared.subnet),
            0,
            0,
            0,
            0,
            u16::from(host),
        );
        must_ip(&["netns", "add", &ns]);
        // From here on the Pod exists, so a failing step still cleans up on unwind.
        let mut pod = Pod {
            shared: Arc::clone(&self.shared),
            ns,
            name,
            ip,
            ipv6: None,
            host_end,
        };
        let (sw, ns, he) = (self.shared.switch_ns.as_str(), pod.ns.as_str(), pod.host_end.as_str());
        must_ip(&["-n", ns, "link", "set", "lo", "up"]);
        must_ip(&[
            "-n", sw, "link", "add", he, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        must_ip(&["-n", sw, "link", "set", he, "master", "br0", "up"]);
        must_ip(&["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        let v6 = ip_cmd(&["-n", ns, "addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"]).is_ok();
        must_ip(&["-n", ns, "link", "set", "eth0", "up"]);
        must_ip(&["-n", ns, "route", "add", "default", "via", &self.gateway().to_string()]);
        if v6 {
            let gw6 = Self::gateway_v6_of(self.shared.subnet).to_string();
            if ip_cmd(&["-n", ns, "-6", "route", "add", "default", "via", &gw6]).is_ok() {
                pod.ipv6 = Some(ipv6);
            }
        }
        pod
    }
}

/// `nsenter --net=/run/netns/<ns> -- <program>`.
///
/// Not `ip netns exec`: that also unshares a mount namespace and remounts
/// /sys for every command, and each long-running process then holds its own
/// copy of the mount tree, which every later `ip netns add`/`del` of
/// concurrent tests must propagate into under the kernel's global mount
/// lock. With a few dozen such processes, entering a namespace was seen to
/// stall for over 30 s (CI, 2026-12-06). Nothing run in a Pod needs /sys.
fn netns_cmd(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(netns_flag(ns)).arg("--").arg(program);
    cmd
}

/// nsenter's flag that enters the named network namespace.
fn netns_flag(ns: &str) -> String {
    format!("--net=/run/netns/{ns}")
}

/// A "Pod": a network namespace on a [`Network`].
#[derive(Debug)]
pub struct Pod {
    shared: Arc<Shared>,
    ns: String,
    name: String,
    ip: Ipv4Addr,
    ipv6: Option<Ipv6Addr>,
    host_end: String,
}

impl Pod {
    /// The name given to [`Network::add_pod`] (sanitized).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its IPv4 address on the bridge.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its IPv6 address, when the kernel allowed one.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6
    }

    /// The namespace name (under /run/netns, for `ip -n` or `nsenter`).
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// The network's log directory (see [`Network::log_dir`]).
    pub fn log_dir(&self) -> &Path {
        self.shared.log_dir.path()
    }

    /// A command that runs `program` inside this Pod.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        netns_cmd(&self.ns, program)
    }

    /// Runs `program args` inside the Pod to completion (bounded by
    /// `timeout`); panics only if it cannot be started or overruns.
    pub fn run(&self, program: impl AsRef<OsStr>, args: &[&str], timeout: Duration) -> Output {
        let program = program.as_ref();
        let mut cmd = self.cmd(program);
        cmd.args(args);
        run_bounded(&mut cmd, timeout).unwrap_or_else(|e| {
            panic!(
                "in pod {}: {} {}: {e}",
                self.name,
                program.to_string_lossy(),
                args.join(" ")
            )
        })
    }

    /// Starts a long-running `program args` inside the Pod, killed when the
    /// returned [`Proc`] drops; stderr goes to a log in [`Pod::log_dir`].
    pub fn start(&self, label: &str, program: impl AsRef<OsStr>, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let program = program.as_ref().to_string_lossy().into_owned();
        let net = netns_flag(&self.ns);
        let mut full: Vec<&str> = vec![&net, "--", &program];
        full.extend_from_slice(args);
        let label = format!("{}-{label}", self.name);
        Proc::start_program(Path::new("nsenter"), &label, &full, env, self.shared.log_dir.path())
    }

    /// Like [`Pod::start`], as `uid`/gid `uid` with no supplementary groups
    /// (e.g. the proxy's 1337, whose traffic the capture rules exempt); the
    /// program and its files must be readable by that uid.
    pub fn start_as(
        &self,
        uid: u32,
        label: &str,
        program: impl AsRef<OsStr>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let uid = uid.to_string();
        let program = program.as_ref().to_string_lossy().into_owned();
        let mut full: Vec<&str> = vec!["--reuid", &uid, "--regid", &uid, "--clear-groups", &program];
        full.extend_from_slice(args);
        self.start(label, "setpriv", &full, env)
    }

    /// Waits until something in the Pod listens on TCP `port` (any address);
    /// false after `timeout`.
    pub fn wait_listening(&self, port: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let filter = format!("sport = :{port}");
        loop {
            let out = run_bounded(self.cmd("ss").args(["-Hltn", &filter]), IP_TIMEOUT);
            if out.is_ok_and(|o| o.success() && !o.stdout.trim().is_empty()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Deleting the host end first detaches the Pod from the bridge even
        // if something keeps the namespace alive.
        let _ = ip_cmd(&["-n", &self.shared.switch_ns, "link", "del", &self.host_end]);
        remove_namespace(&self.ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_clean() {
        assert_eq!(sanitize("My Test::case_1", 24), "my-test--case-1");
        assert_eq!(sanitize("", 5), "x");
        assert_eq!(sanitize("abcdefgh", 3), "abc");
    }

    #[test]
    fn pods_talk_and_everything_is_removed() {
        if skip_unless_tools("pods_talk_and_everything_is_removed", &["curl", "python3", "ss"]) {
            return;
        }
        let (switch, pod_ns) = {
            let net = Network::new("harness");
            let a = net.add_pod("a");
            let b = net.add_pod("b");
            assert_ne!(a.ip(), b.ip());
            let _server = b.start("http", "python3", &["-m", "http.server", "--bind", "::", "8080"], &[]);
            assert!(
                b.wait_listening(8080, Duration::from_secs(10)),
                "http.server did not listen"
            );
            let url = format!("http://{}:8080/", b.ip());
            let out = a.run(
                "curl",
                &["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", &url],
                Duration::from_secs(10),
            );
            assert_eq!(out.stdout, "200", "curl {url}: {}", out.stderr);
            if let Some(v6) = b.ipv6() {
                let url = format!("http://[{v6}]:8080/");
                let out = a.run(
                    "curl",
                    &[
                        "-sS",
                        "-g",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "5",
                        &url,
                    ],
                    Duration::from_secs(10),
                );
                assert_eq!(out.stdout, "200", "curl {url}: {}", out.stderr);
            }
            let route = a.run(
                "ip",
                &["route", "get", &service_ip(10).to_string()],
                Duration::from_secs(5),
            );
            assert!(
                route.stdout.contains(&format!("via {}", net.gateway())),
                "{}",
                route.stdout
            );
            // Left running on purpose: the Pod's drop must still remove its namespace.
            std::mem::forget(a.start("sleeper", "sleep", &["30"], &[]));
            (net.switch_netns().to_owned(), a.netns().to_owned())
        };
        let list = run_bounded(Command::new("ip").args(["netns", "list"]), IP_TIMEOUT)
            .map(|o| o.stdout)
            .unwrap_or_default();
        assert!(
            !list.contains(&switch) && !list.contains(&pod_ns),
            "left behind:\n{list}"
        );
    }
}
