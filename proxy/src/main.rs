//! `sidemesh-proxy`: the sidecar data plane and its iptables init step.
//! Not built yet: both subcommands say so and exit non-zero.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Init,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let what = match args.command.unwrap_or(Command::Run) {
        Command::Run => "run",
        Command::Init => "init",
    };
    eprintln!("sidemesh-proxy: `{what}` is not built yet in this version of sidemesh");
    ExitCode::FAILURE
}
