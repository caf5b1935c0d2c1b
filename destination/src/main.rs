//! `sidemesh-destination`: not built yet; it says so and exits non-zero.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

/// The sidemesh destination service (not built yet).
#[derive(Debug, Parser)]
#[command(name = "sidemesh-destination", version)]
struct Args {}

fn main() -> ExitCode {
    let _ = Args::parse();
    eprintln!("sidemesh-destination: not built yet in this version of sidemesh");
    ExitCode::FAILURE
}
