//! `sidemesh __component <name> …`: every component of the mesh, run from
//! this one binary, so that `sidemesh demo` needs nothing but itself (the
//! README's `cargo run --release --bin sidemesh -- demo` builds only it).
//! Hidden from `--help`: operators run the dedicated binaries.

use std::process::ExitCode;

/// Runs component `args[0]` with the rest of `args`.
pub fn main(args: &[String]) -> ExitCode {
    let Some((name, rest)) = args.split_first() else {
        eprintln!("sidemesh __component: which component?");
        return ExitCode::from(2);
    };
    let with_program = |program: &str| {
        std::iter::once(program.to_owned())
            .chain(rest.iter().cloned())
            .collect::<Vec<_>>()
    };
    match name.as_str() {
        "identity" => sidemesh_identity::cli::main_from(with_program("sidemesh-identity")),
        "destination" => sidemesh_destination::cli::main_from(with_program("sidemesh-destination")),
        "proxy" => sidemesh_proxy::cli::main_from(with_program("sidemesh-proxy")),
        "app" => match crate::demo::app::main(rest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sidemesh demo app: {e:#}");
                ExitCode::FAILURE
            }
        },
        "probe" => crate::demo::probe(rest),
        other => {
            eprintln!("sidemesh __component: unknown component {other:?}");
            ExitCode::from(2)
        }
    }
}
