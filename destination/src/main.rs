//! `sidemesh-destination`: the mesh's discovery service.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    sidemesh_destination::cli::main_from(std::env::args_os())
}
