//! `sidemesh-proxy init`, run as the init container runs it: inside a fresh
//! network-namespace "Pod", checked with `iptables-save` and with real
//! connections (curl) whose original destination small listeners report.
//!
//! Needs root, ip, iptables, curl, python3 and setpriv; each test skips with
//! one line otherwise. Build first: `cargo build -p sidemesh-proxy --bins`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sidemesh_tests::netns::{self, Network, Output, Pod};
use sidemesh_tests::process::{Proc, binary};

const T: Duration = Duration::from_secs(30);
const PROXY_UID: u32 = 1337;
const TOOLS: [&str; 4] = ["curl", "python3", "setpriv", "ss"];

/// Listeners that answer with the connection's original destination
/// (`report`), or forward like a proxy's outbound (`relay`: to the original
/// destination, or what SIDEMESH_TEST_MAP maps it to) or inbound side
/// (`deliver`: to loopback on the original port). Args: `label=host:port:mode`.
const LISTENERS_PY: &str = r#"
import os, socket, struct, sys, threading

SO_ORIGINAL_DST = 80  # also IP6T_SO_ORIGINAL_DST

def log(msg):
    print(msg, file=sys.stderr, flush=True)

def fmt(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

def original_dst(conn):
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]
    except OSError:
        return None

def report(conn, label, peer, mode, mapping):
    conn.settimeout(5)
    data = b""
    try:
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    orig = original_dst(conn)
    body = (f"label={label} orig={fmt(orig) if orig else 'none'} local={fmt(conn.getsockname())} "
            f"peer={fmt(peer)} uid={os.getuid()}\n").encode()
    head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    try:
        conn.sendall(head + body)
    finally:
        conn.close()

def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass

def relay(conn, label, peer, mode, mapping):
    orig = original_dst(conn)
    if orig is None:
        log(f"{label} no original destination")
        conn.close()
        return
    if mode == "deliver":
        target = ("::1" if conn.family == socket.AF_INET6 else "127.0.0.1", orig[1])
    else:
        target = mapping.get(fmt(orig), orig)
    log(f"{label} accepted peer={fmt(peer)} orig={fmt(orig)} to={fmt(target)}")
    try:
        up = socket.create_connection(target, timeout=5)
    except OSError as e:
        log(f"{label} connect {fmt(target)} failed: {e}")
        conn.close()
        return
    up.settimeout(10)
    conn.settimeout(10)
    back = threading.Thread(target=pump, args=(up, conn), daemon=True)
    back.start()
    pump(conn, up)
    back.join(10)
    up.close()
    conn.close()

def serve(sock, label, mode, mapping):
    handler = report if mode == "report" else relay
    while True:
        conn, peer = sock.accept()
        threading.Thread(target=handler, args=(conn, label, peer, mode, mapping), daemon=True).start()

mapping = {}
for item in filter(None, os.environ.get("SIDEMESH_TEST_MAP", "").split(",")):
    key, value = item.split("=")
    host, port = value.rsplit(":", 1)
    mapping[key] = (host.strip("[]"), int(port))
listeners = []
for spec in sys.argv[1:]:
    label, rest = spec.split("=", 1)
    hostport, mode = rest.rsplit(":", 1)
    host, port = hostport.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, int(port)))
    sock.listen(128)
    listeners.append((sock, label, mode))
for sock, label, mode in listeners:
    threading.Thread(target=serve, args=(sock, label, mode, mapping), daemon=True).start()
log("ready")
threading.Event().wait()
"#;

fn skip(test: &str) -> bool {
    netns::skip_unless_tools(test, &TOOLS)
}

/// A python3 every uid can run (pyenv shims under /root are not).
fn python() -> PathBuf {
    let system = Path::new("/usr/bin/python3");
    if system.is_file() {
        return system.to_owned();
    }
    netns::find_program("python3").unwrap_or_else(|| PathBuf::from("python3"))
}

/// Runs `sidemesh-proxy init <args>` inside the Pod.
fn init(pod: &Pod, args: &[&str]) -> Output {
    let mut full = vec!["init"];
    full.extend_from_slice(args);
    pod.run(binary("sidemesh-proxy"), &full, T)
}

fn init_ok(pod: &Pod, args: &[&str]) -> Output {
    let out = init(pod, args);
    assert!(out.success(), "init {args:?} failed: {}{}", out.stdout, out.stderr);
    out
}

/// `iptables-save -t nat` (or ip6tables) in the Pod, without the comment lines
/// (they carry timestamps) and with the chains' counters zeroed: a packet
/// crossing the table between two saves is traffic, not a rule change.
fn nat(pod: &Pod, save: &str) -> String {
    let out = pod.run(save, &["-t", "nat"], T);
    assert!(out.success(), "{save}: {}", out.stderr);
    strip_comments(&out.stdout)
        .lines()
        .map(|l| match l.rfind(" [") {
            Some(i) if l.starts_with(':') && l.ends_with(']') => format!("{} [0:0]\n", &l[..i]),
            _ => format!("{l}\n"),
        })
        .collect()
}

fn nat4(pod: &Pod) -> String {
    nat(pod, "iptables-save")
}

fn nat6(pod: &Pod) -> String {
    nat(pod, "ip6tables-save")
}

fn strip_comments(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The `*nat … COMMIT` blocks of a dry run, in order (IPv4 first).
fn blocks(dry_run: &str) -> Vec<String> {
    let text = strip_comments(dry_run);
    text.split_inclusive("COMMIT\n").map(str::to_owned).collect()
}

/// What `iptables-save` shows of a table besides the builtin chains' policies.
fn without_builtin_policies(save: &str) -> String {
    save.lines()
        .filter(|l| !(l.starts_with(':') && l.contains(" ACCEPT [")))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Starts the listener script in the Pod, optionally as the proxy's uid, and
/// waits until every port listens.
fn listeners(pod: &Pod, label: &str, as_proxy: bool, specs: &[&str], env: &[(&str, &str)]) -> Proc {
    let script = pod.log_dir().join("listeners.py");
    if !script.exists() {
        std::fs::write(&script, LISTENERS_PY).expect("write listeners.py");
    }
    let python = python();
    let script = script.display().to_string();
    let mut args = vec!["-u", script.as_str()];
    args.extend_from_slice(specs);
    let mut proc = if as_proxy {
        pod.start_as(PROXY_UID, label, &python, &args, env)
    } else {
        pod.start(label, &python, &args, env)
    };
    for spec in specs {
        let port: u16 = spec
            .rsplit(':')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bad listener spec {spec}"));
        if !pod.wait_listening(port, Duration::from_secs(10)) {
            assert!(proc.is_running(), "listeners exited:\n{}", proc.log());
            panic!("{spec} not listening in {}:\n{}", pod.name(), proc.log());
        }
    }
    proc
}

/// One answer of a `report` listener: `label`, `orig`, `local`, `peer`, `uid`.
#[derive(Debug)]
struct Reply(HashMap<String, String>);

impl Reply {
    fn get(&self, key: &str) -> &str {
        self.0.get(key).map(String::as_str).unwrap_or("")
    }
}

/// `curl` from inside the Pod (as the proxy's uid if asked), parsing the reply.
fn curl(pod: &Pod, url: &str, as_proxy: bool, extra: &[&str]) -> Result<Reply, String> {
    let uid = PROXY_UID.to_string();
    let mut args: Vec<&str> = Vec::new();
    if as_proxy {
        args.extend(["--reuid", &uid, "--regid", &uid, "--clear-groups", "curl"]);
    }
    args.extend(["-sS", "-g", "--max-time", "5"]);
    args.extend_from_slice(extra);
    args.push(url);
    let out = pod.run(if as_proxy { "setpriv" } else { "curl" }, &args, T);
    if !out.success() {
        return Err(format!("curl {url} from {}: {}", pod.name(), out.stderr.trim()));
    }
    let fields = out
        .stdout
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Ok(Reply(fields))
}

/// Asserts which listener answered and, when given, the original destination it saw.
#[track_caller]
fn expect(reply: Result<Reply, String>, label: &str, orig: Option<&str>, what: &str) {
    let reply = reply.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(reply.get("label"), label, "{what}: {reply:?}");
    if let Some(orig) = orig {
        assert_eq!(reply.get("orig"), orig, "{what}: {reply:?}");
    }
}

#[test]
fn dry_run_prints_the_exact_rules_and_changes_nothing() {
    if netns::skip_unless_capable("dry_run_prints_the_exact_rules_and_changes_nothing") {
        return;
    }
    let net = Network::new("cap-dry");
    let pod = net.add_pod("app");
    let flags = [
        "--ipv6",
        "--skip-inbound-ports",
        "22,8000-8100",
        "--skip-outbound-ports",
        "3306",
        "--skip-outbound-cidrs",
        "10.96.0.0/12,fd00:abc::/32",
    ];
    let (before4, before6) = (nat4(&pod), nat6(&pod));
    let mut args = vec!["--dry-run"];
    args.extend(flags);
    let dry = init_ok(&pod, &args);
    assert_eq!(nat4(&pod), before4, "--dry-run changed the IPv4 nat table");
    assert_eq!(nat6(&pod), before6, "--dry-run changed the IPv6 nat table");
    assert!(dry.stdout.starts_with("# using iptables-"), "{}", dry.stdout);
    let blocks = blocks(&dry.stdout);
    assert_eq!(blocks.len(), 2, "one block per family:\n{}", dry.stdout);
    assert!(blocks[0].contains("-A SIDEMESH_OUTBOUND -d 10.96.0.0/12 -j RETURN\n"));
    assert!(blocks[1].contains("-A SIDEMESH_OUTBOUND -d fd00:abc::/32 -j RETURN\n"));

    // What it printed is exactly what the real run leaves in the tables.
    init_ok(&pod, &flags);
    assert_eq!(without_builtin_policies(&nat4(&pod)), blocks[0]);
    assert_eq!(without_builtin_policies(&nat6(&pod)), blocks[1]);

    // A dry run over installed rules shows a re-run: no second jump.
    let again = init_ok(&pod, &args);
    assert!(
        !again.stdout.contains("-A PREROUTING") && !again.stdout.contains("-A OUTPUT"),
        "{}",
        again.stdout
    );
}

#[test]
fn apply_is_idempotent_and_programs_ipv6() {
    if netns::skip_unless_capable("apply_is_idempotent_and_programs_ipv6") {
        return;
    }
    let net = Network::new("cap-idem");
    let pod = net.add_pod("app");
    let flags = [
        "--ipv6",
        "--skip-inbound-ports",
        "9901",
        "--skip-outbound-cidrs",
        "10.96.0.0/12",
    ];
    let first = init_ok(&pod, &flags);
    assert!(
        first.stderr.contains("using iptables-"),
        "says which iptables: {}",
        first.stderr
    );
    let (v4, v6) = (nat4(&pod), nat6(&pod));
    for line in [
        "-A PREROUTING -p tcp -j SIDEMESH_INBOUND",
        "-A OUTPUT -p tcp -j SIDEMESH_OUTBOUND",
        "-A SIDEMESH_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A SIDEMESH_INBOUND -p tcp -m tcp --dport 9901 -j RETURN",
        "-A SIDEMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A SIDEMESH_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
        "-A SIDEMESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert_eq!(v4.matches(&format!("{line}\n")).count(), 1, "{line} once in:\n{v4}");
        assert_eq!(v6.matches(&format!("{line}\n")).count(), 1, "{line} once in:\n{v6}");
    }
    assert!(v4.contains("-A SIDEMESH_OUTBOUND -d 127.0.0.0/8 -j RETURN\n"), "{v4}");
    assert!(v4.contains("-A SIDEMESH_OUTBOUND -d 10.96.0.0/12 -j RETURN\n"), "{v4}");
    assert!(v6.contains("-A SIDEMESH_OUTBOUND -d ::1/128 -j RETURN\n"), "{v6}");
    assert!(!v6.contains("10.96.0.0"), "{v6}");

    init_ok(&pod, &flags);
    assert_eq!(nat4(&pod), v4, "second run changed iptables-save output");
    assert_eq!(nat6(&pod), v6, "second run changed ip6tables-save output");

    // Different flags replace our rules rather than adding to them.
    init_ok(&pod, &["--inbound-port", "16006"]);
    let changed = nat4(&pod);
    assert!(
        changed.contains("--to-ports 16006") && !changed.contains("--to-ports 15006"),
        "{changed}"
    );
    assert_eq!(
        changed.matches("-j SIDEMESH_INBOUND\n").count(),
        2,
        "one jump + the lo rule:\n{changed}"
    );
    assert!(!changed.contains("--dport 9901"), "{changed}");
}

#[test]
fn uninstall_removes_only_ours() {
    if netns::skip_unless_capable("uninstall_removes_only_ours") {
        return;
    }
    let net = Network::new("cap-uninst");
    let pod = net.add_pod("app");
    for (tool, addr) in [("iptables", "10.9.9.9"), ("ip6tables", "fd00:9::9")] {
        for args in [
            vec!["-t", "nat", "-N", "FOREIGN"],
            vec!["-t", "nat", "-A", "FOREIGN", "-d", addr, "-j", "RETURN"],
            vec!["-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "FOREIGN"],
            vec![
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "7777",
                "-j",
                "RETURN",
            ],
        ] {
            let out = pod.run(tool, &args, T);
            assert!(out.success(), "{tool} {args:?}: {}", out.stderr);
        }
    }
    let (before4, before6) = (nat4(&pod), nat6(&pod));
    init_ok(&pod, &["--ipv6"]);
    assert!(nat4(&pod).contains("SIDEMESH_OUTBOUND") && nat6(&pod).contains("SIDEMESH_OUTBOUND"));
    // The foreign rules stay where they were, ours come after them.
    assert!(
        nat4(&pod)
            .contains("-A PREROUTING -p tcp -m tcp --dport 7777 -j RETURN\n-A PREROUTING -p tcp -j SIDEMESH_INBOUND\n")
    );

    let out = init_ok(&pod, &["--uninstall", "--ipv6"]);
    assert_eq!(
        nat4(&pod),
        before4,
        "uninstall left or removed something: {}",
        out.stderr
    );
    assert_eq!(
        nat6(&pod),
        before6,
        "uninstall left or removed something: {}",
        out.stderr
    );

    // Nothing of ours left: still fine, still nothing else touched.
    let out = init_ok(&pod, &["--uninstall", "--ipv6"]);
    assert!(out.stderr.contains("nothing of sidemesh's to remove"), "{}", out.stderr);
    assert_eq!(nat4(&pod), before4);
    assert_eq!(nat6(&pod), before6);
}

#[test]
fn bad_flags_are_one_line_and_change_nothing() {
    if netns::skip_unless_capable("bad_flags_are_one_line_and_change_nothing") {
        return;
    }
    let net = Network::new("cap-bad");
    let pod = net.add_pod("app");
    init_ok(&pod, &["--ipv6", "--skip-inbound-ports", "22"]);
    let (before4, before6) = (nat4(&pod), nat6(&pod));
    let cases: [(&[&str], &str, &str); 9] = [
        (&["--inbound-port", "70000"], "--inbound-port", "\"70000\""),
        (&["--outbound-port", "0"], "--outbound-port", "\"0\""),
        (&["--admin-port", "http"], "--admin-port", "\"http\""),
        (
            &["--skip-outbound-cidrs", "10.0.0.0/33"],
            "--skip-outbound-cidrs",
            "\"10.0.0.0/33\"",
        ),
        (
            &["--skip-outbound-cidrs", "garbage"],
            "--skip-outbound-cidrs",
            "\"garbage\"",
        ),
        (
            &["--skip-inbound-ports", "80,70000"],
            "--skip-inbound-ports",
            "\"80,70000\"",
        ),
        (
            &["--skip-outbound-ports", "9000-8000"],
            "--skip-outbound-ports",
            "\"9000-8000\"",
        ),
        (&["--proxy-uid", "nobody"], "--proxy-uid", "\"nobody\""),
        (&["--outbound-port", "15006"], "--outbound-port", "--inbound-port"),
    ];
    for (args, flag, needle) in cases {
        for extra in [&[][..], &["--uninstall"][..], &["--dry-run"][..]] {
            let mut all = args.to_vec();
            all.extend_from_slice(extra);
            all.push("--ipv6");
            let out = init(&pod, &all);
            assert!(!out.success(), "{all:?} was accepted");
            let err = out.stderr.trim();
            assert_eq!(err.lines().count(), 1, "{all:?}: not one line:\n{err}");
            assert!(err.contains(flag) && err.contains(needle), "{all:?}: {err}");
            assert!(out.stdout.is_empty(), "{all:?} printed: {}", out.stdout);
        }
    }
    assert_eq!(nat4(&pod), before4, "a rejected run changed iptables");
    assert_eq!(nat6(&pod), before6, "a rejected run changed ip6tables");
}

#[test]
fn ip6tables_failure_rolls_back_ipv4() {
    if netns::skip_unless_capable("ip6tables_failure_rolls_back_ipv4") {
        return;
    }
    let net = Network::new("cap-rollback");
    let pod = net.add_pod("app");
    let out = pod.run(
        "iptables",
        &["-t", "nat", "-A", "OUTPUT", "-d", "10.9.9.9", "-j", "RETURN"],
        T,
    );
    assert!(out.success(), "{}", out.stderr);
    let fake = net.log_dir().join("fake-bin");
    std::fs::create_dir_all(&fake).expect("mkdir");
    for name in ["ip6tables-restore", "ip6tables-nft-restore", "ip6tables-legacy-restore"] {
        let path = fake.join(name);
        std::fs::write(
            &path,
            "#!/bin/sh\ncat >/dev/null\necho 'simulated ip6tables failure' >&2\nexit 1\n",
        )
        .expect("write fake");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    }
    let path = format!("PATH={}:{}", fake.display(), std::env::var("PATH").unwrap_or_default());
    let (before4, before6) = (nat4(&pod), nat6(&pod));
    let proxy = binary("sidemesh-proxy").display().to_string();
    let out = pod.run("env", &[&path, &proxy, "init", "--ipv6"], T);
    assert!(!out.success(), "init succeeded with a failing ip6tables-restore");
    let last = out.stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("sidemesh-proxy: ")
            && last.contains("simulated ip6tables failure")
            && last.contains("rolled back"),
        "{}",
        out.stderr
    );
    assert_eq!(nat4(&pod), before4, "IPv4 rules were not rolled back");
    assert_eq!(nat6(&pod), before6);
}

#[test]
fn existing_legacy_rules_select_iptables_legacy() {
    if netns::skip_unless_tools(
        "existing_legacy_rules_select_iptables_legacy",
        &["iptables-legacy", "iptables-nft"],
    ) {
        return;
    }
    let net = Network::new("cap-legacy");
    let pod = net.add_pod("app");
    let out = pod.run(
        "iptables-legacy",
        &["-t", "nat", "-A", "OUTPUT", "-d", "10.9.9.9", "-j", "RETURN"],
        T,
    );
    assert!(out.success(), "{}", out.stderr);
    let out = init_ok(&pod, &[]);
    assert!(out.stderr.contains("using iptables-legacy"), "{}", out.stderr);
    assert!(nat(&pod, "iptables-legacy-save").contains("-A OUTPUT -p tcp -j SIDEMESH_OUTBOUND"));
    assert!(
        !nat(&pod, "iptables-nft-save").contains("SIDEMESH"),
        "rules went to both variants"
    );
    init_ok(&pod, &["--uninstall"]);
    assert!(!nat(&pod, "iptables-legacy-save").contains("SIDEMESH"));
}

#[test]
fn real_traffic_is_captured_as_configured() {
    if skip("real_traffic_is_captured_as_configured") {
        return;
    }
    let net = Network::new("cap-traffic");
    let app = net.add_pod("app");
    let client = net.add_pod("client");
    let peer = net.add_pod("peer");
    let (a, c, p) = (app.ip(), client.ip(), peer.ip());

    init_ok(
        &app,
        &[
            "--skip-inbound-ports",
            "9901",
            "--skip-outbound-ports",
            "9902",
            "--skip-outbound-cidrs",
            &format!("{p}/32"),
        ],
    );
    let _app = listeners(
        &app,
        "listeners",
        false,
        &[
            "out=127.0.0.1:15001:report",
            "in=0.0.0.0:15006:report",
            "admin=0.0.0.0:15020:report",
            "app-8080=0.0.0.0:8080:report",
            "app-9901=0.0.0.0:9901:report",
            "app-lo=127.0.0.1:8082:report",
        ],
        &[],
    );
    let _client = listeners(
        &client,
        "listeners",
        false,
        &["client-8081=0.0.0.0:8081:report", "client-9902=0.0.0.0:9902:report"],
        &[],
    );
    let _peer = listeners(&peer, "listeners", false, &["peer-8081=0.0.0.0:8081:report"], &[]);
    let vip = netns::service_ip(10);

    // Outbound: a Service VIP and another Pod go to 15001, original destination intact.
    let r = curl(&app, &format!("http://{vip}:80/"), false, &[]);
    expect(r, "out", Some(&format!("{vip}:80")), "app → Service VIP");
    let r = curl(&app, &format!("http://{c}:8081/"), false, &[]);
    expect(r, "out", Some(&format!("{c}:8081")), "app → other Pod");

    // Inbound: an app port lands on 15006; the admin port and skipped ports do not.
    let r = curl(&client, &format!("http://{a}:8080/"), false, &[]);
    expect(r, "in", Some(&format!("{a}:8080")), "client → app port");
    let r = curl(&client, &format!("http://{a}:15020/"), false, &[]);
    expect(r, "admin", None, "client → admin port");
    let r = curl(&client, &format!("http://{a}:9901/"), false, &[]);
    expect(r, "app-9901", None, "client → skipped inbound port");

    // Skipped outbound port and CIDR reach the real destination.
    let r = curl(&app, &format!("http://{c}:9902/"), false, &[]);
    expect(r, "client-9902", None, "app → skipped outbound port");
    let r = curl(&app, &format!("http://{p}:8081/"), false, &[]);
    expect(r, "peer-8081", None, "app → skipped outbound CIDR");

    // The proxy's own traffic leaves as it is.
    let r = curl(&app, &format!("http://{c}:8081/"), true, &[]);
    expect(r, "client-8081", None, "proxy uid → other Pod");

    // Loopback is never redirected.
    let r = curl(&app, "http://127.0.0.1:8082/", false, &[]);
    expect(r, "app-lo", Some("127.0.0.1:8082"), "app → loopback");
    let r = curl(&app, "http://127.0.0.1:15020/", false, &[]);
    expect(r, "admin", None, "app → loopback admin");
    let r = curl(&app, "http://127.0.0.1:8082/", true, &[]);
    expect(r, "app-lo", None, "proxy uid → loopback");

    // The Pod's own IP: the app's call goes outbound, the proxy's onward hop inbound
    // (except to the proxy's own or skipped ports), the 127.0.0.6 passthrough straight in.
    let r = curl(&app, &format!("http://{a}:8080/"), false, &[]);
    expect(r, "out", Some(&format!("{a}:8080")), "app → own Pod IP");
    let r = curl(&app, &format!("http://{a}:8080/"), true, &[]);
    expect(r, "in", Some(&format!("{a}:8080")), "proxy uid → own Pod IP");
    let r = curl(&app, &format!("http://{a}:15020/"), true, &[]);
    expect(r, "admin", None, "proxy uid → own admin port");
    let r = curl(&app, &format!("http://{a}:9901/"), true, &[]);
    expect(r, "app-9901", None, "proxy uid → own skipped inbound port");
    let r = curl(&app, &format!("http://{a}:8080/"), true, &["--interface", "127.0.0.6"]);
    expect(r, "app-8080", None, "proxy uid from 127.0.0.6 → own Pod IP");

    // The client Pod has no rules: its own connections are untouched.
    let r = curl(&client, &format!("http://{p}:8081/"), false, &[]);
    expect(r, "peer-8081", None, "uncaptured Pod → peer");
}

#[test]
fn own_pod_ip_goes_outbound_then_inbound_without_loop() {
    if skip("own_pod_ip_goes_outbound_then_inbound_without_loop") {
        return;
    }
    let net = Network::new("cap-self");
    let app = net.add_pod("app");
    let client = net.add_pod("client");
    let a = app.ip();
    let vip = netns::service_ip(20);
    init_ok(&app, &[]);
    // Stand-ins for the proxy, running as its uid: outbound forwards to the
    // original destination (a Service VIP resolved to this very Pod), inbound
    // delivers to the app on loopback.
    let map = format!("{vip}:80={a}:8080");
    let proxy = listeners(
        &app,
        "proxy",
        true,
        &["outbound=127.0.0.1:15001:relay", "inbound=0.0.0.0:15006:deliver"],
        &[("SIDEMESH_TEST_MAP", &map)],
    );
    let _app = listeners(&app, "app", false, &["app-8080=0.0.0.0:8080:report"], &[]);

    let hops = |log: &str, who: &str| {
        log.lines()
            .filter(|l| l.starts_with(&format!("{who} accepted")))
            .count()
    };
    let mut seen = (0, 0);
    let mut check = |r: Result<Reply, String>, what: &str, outbound: usize, inbound: usize| {
        let r = r.unwrap_or_else(|e| panic!("{what}: {e}\n{}", proxy.log()));
        assert_eq!(r.get("label"), "app-8080", "{what}: {r:?}");
        assert_eq!(
            r.get("peer").split(':').next(),
            Some("127.0.0.1"),
            "delivered over loopback: {r:?}"
        );
        assert_eq!(r.get("uid"), "0");
        let log = proxy.log();
        seen = (seen.0 + outbound, seen.1 + inbound);
        assert_eq!(
            (hops(&log, "outbound"), hops(&log, "inbound")),
            seen,
            "{what}: hops\n{log}"
        );
    };
    check(
        curl(&app, &format!("http://{a}:8080/"), false, &[]),
        "app → own Pod IP",
        1,
        1,
    );
    check(
        curl(&app, &format!("http://{vip}:80/"), false, &[]),
        "app → Service landing on itself",
        1,
        1,
    );
    check(
        curl(&client, &format!("http://{a}:8080/"), false, &[]),
        "client → app",
        0,
        1,
    );
    let log = proxy.log();
    assert!(log.contains(&format!("outbound accepted peer={a}:")), "{log}");
    assert!(log.contains(&format!("orig={vip}:80 to={a}:8080")), "{log}");
    assert!(
        log.contains(&format!("inbound accepted peer={a}:"))
            && log.contains(&format!("orig={a}:8080 to=127.0.0.1:8080")),
        "{log}"
    );
}

#[test]
fn ipv6_traffic_is_captured() {
    if skip("ipv6_traffic_is_captured") {
        return;
    }
    let net = Network::new("cap-v6");
    let app = net.add_pod("app");
    let client = net.add_pod("client");
    let (Some(a), Some(_)) = (app.ipv6(), client.ipv6()) else {
        eprintln!("skipping ipv6_traffic_is_captured: no IPv6 in network namespaces");
        return;
    };
    init_ok(&app, &["--ipv6"]);
    let _app = listeners(
        &app,
        "listeners",
        false,
        &[
            "out6=[::1]:15001:report",
            "in6=[::]:15006:report",
            "admin6=[::]:15020:report",
            "lo6=[::1]:8082:report",
        ],
        &[],
    );
    let vip = netns::service_ip_v6(10);
    let r = curl(&app, &format!("http://[{vip}]:80/"), false, &[]);
    expect(r, "out6", Some(&format!("[{vip}]:80")), "app → IPv6 Service VIP");
    let r = curl(&client, &format!("http://[{a}]:8080/"), false, &[]);
    expect(r, "in6", Some(&format!("[{a}]:8080")), "client → app over IPv6");
    let r = curl(&client, &format!("http://[{a}]:15020/"), false, &[]);
    expect(r, "admin6", None, "client → admin over IPv6");
    let r = curl(&app, "http://[::1]:8082/", false, &[]);
    expect(r, "lo6", Some("[::1]:8082"), "app → ::1");
    let r = curl(&app, &format!("http://[{a}]:8080/"), true, &[]);
    expect(r, "in6", Some(&format!("[{a}]:8080")), "proxy uid → own IPv6");
}
