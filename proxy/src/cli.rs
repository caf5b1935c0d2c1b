//! The `sidemesh-proxy` command line: `run` (the default) and `init`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::ffi::OsString;

use crate::capture;

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
    Run(Box<crate::config::ProxyArgs>),
    /// Program the Pod's iptables so its TCP traffic passes through the proxy.
    Init(capture::InitArgs),
}

/// The run settings alone, for when no subcommand is given.
#[derive(Debug, Parser)]
#[command(name = "sidemesh-proxy")]
struct RunOnly {
    #[command(flatten)]
    args: crate::config::ProxyArgs,
}

/// Parses `args` (the first is the program name) and runs `run` or `init`.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let program = args.first().cloned();
    let args = Args::parse_from(args);
    if let Err(e) = sidemesh_telemetry::logging::init() {
        eprintln!("sidemesh-proxy: {e}");
        return ExitCode::from(2);
    }
    let command = match args.command {
        Some(c) => c,
        // `sidemesh-proxy` alone runs the sidecar with settings from the environment.
        None => match RunOnly::try_parse_from(program) {
            Ok(r) => Command::Run(Box::new(r.args)),
            Err(e) => e.exit(),
        },
    };
    let result = match command {
        Command::Run(args) => crate::run(*args),
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
