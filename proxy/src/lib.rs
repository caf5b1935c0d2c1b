//! The sidemesh sidecar proxy.
//!
//! - [`capture`]: `sidemesh-proxy init`, the iptables rules that send the
//!   Pod's TCP traffic through the proxy.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod capture;
