//! `sidemesh-identity`: the mesh's certificate authority service.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    sidemesh_identity::cli::main_from(std::env::args_os())
}
