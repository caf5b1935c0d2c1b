//! `sidemesh-proxy`: the sidecar data plane and its iptables init step.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    sidemesh_proxy::cli::main_from(std::env::args_os())
}
