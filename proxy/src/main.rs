//! `sidemesh-proxy`: the sidecar data plane and its iptables init step.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sidemesh_proxy::capture;

/// The sidemesh sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "sidemesh-proxy", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Run(Box<sidemesh_proxy::config::ProxyArgs>),
    /// Program the Pod's iptables so its TCP traffic passes through the proxy.
    Init(capture::InitArgs),
}

/// The run settings alone, for when no subcommand is given.
#[derive(Debug, Parser)]
#[command(name = "sidemesh-proxy")]
struct RunOnly {
    #[command(flatten)]
    args: sidemesh_proxy::config::ProxyArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = sidemesh_telemetry::logging::init() {
        eprintln!("sidemesh-proxy: {e}");
        return ExitCode::from(2);
    }
    let command = match args.command {
        Some(c) => c,
        // `sidemesh-proxy` alone runs the sidecar with settings from the environment.
        None => match RunOnly::try_parse_from(std::env::args_os().take(1)) {
            Ok(r) => Command::Run(Box::new(r.args)),
            Err(e) => e.exit(),
        },
    };
    let result = match command {
        Command::Run(args) => sidemesh_proxy::run(*args),
        Command::Init(init) => capture::run(init),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidemesh-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
