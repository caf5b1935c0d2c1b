//! `sidemesh`: the operator's command — demo, inject, install, trust, check.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod check;
mod component;
mod demo;
mod files;
mod inject;
mod install;
mod rotate;
mod trust;

/// sidemesh: a sidecar service mesh for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "sidemesh", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole mesh on this machine with no Kubernetes.
    Demo {
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
        /// Use loopback ports instead of network namespaces.
        #[arg(long)]
        no_netns: bool,
    },
    /// Inject the sidecar into YAML offline.
    Inject {
        /// File to read, or `-` for standard input.
        #[arg(short = 'f', long = "filename", default_value = "-")]
        file: String,
    },
    /// Print the control-plane manifests.
    Install(install::InstallArgs),
    /// Make and inspect roots, issuers and bundles.
    #[command(subcommand)]
    Trust(trust::TrustCommand),
    /// Verify a bundle/issuer/leaf chain offline, and that proxies agree with the bundle.
    Check(check::CheckArgs),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    if args.get(1).map(String::as_str) == Some("__component") {
        return component::main(&args[2..]);
    }
    let cli = Cli::parse();
    if let Err(e) = sidemesh_telemetry::logging::init() {
        eprintln!("sidemesh: {e}");
        return ExitCode::from(2);
    }
    sidemesh_identity_client::install_crypto_provider();
    let result = match cli.command {
        Command::Trust(cmd) => trust::run(cmd),
        Command::Demo { duration, no_netns } => demo::run(duration, no_netns),
        Command::Inject { file } => inject::run(&file),
        Command::Install(args) => install::run(args),
        Command::Check(args) => match check::run(args) {
            Ok(true) => Ok(()),
            // The report already says what is wrong.
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidemesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}
