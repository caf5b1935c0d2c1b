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
    Run,
    /// Program the Pod's iptables so its TCP traffic passes through the proxy.
    Init(capture::InitArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command.unwrap_or(Command::Run) {
        Command::Run => Err(anyhow::anyhow!("`sidemesh-proxy run` is not built yet")),
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
