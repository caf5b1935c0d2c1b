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

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}
