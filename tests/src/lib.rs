//! Support for sidemesh's end-to-end tests: the real binaries started as
//! processes ([`process`]), throw-away PKIs ([`pki`]), and a stand-in
//! Kubernetes API server that speaks the real REST protocol ([`apiserver`]),
//! and network namespaces as Pods for iptables-capture tests ([`netns`]).
//! The tests themselves live in `tests/tests/`.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod mesh;
pub mod netns;
pub mod objects;
pub mod pki;
pub mod process;
pub mod webhook;

/// Ports [`free_port`] hands out: below Linux's default ephemeral range
/// (32768–60999), so that no outgoing connection of a busy test run can take
/// the port between the check and the server's own bind (a port from
/// `bind(0)` comes from that very range, and did get taken).
const TEST_PORTS: std::ops::Range<u32> = 20_000..32_000;

/// A free TCP port on 127.0.0.1: distinct on every call within a test
/// binary, and starting at a different place in every process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = TEST_PORTS.end - TEST_PORTS.start;
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for _ in 0..span {
        let offset = seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(TEST_PORTS.start + offset) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}
