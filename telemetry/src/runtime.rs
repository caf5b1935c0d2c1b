//! The entry every sidemesh service shares: logging first, then the tokio
//! runtime its `--workers` asks for, then the service, with its error
//! printed as `program: error: cause` and the exit code set.

use std::fmt::Display;
use std::process::ExitCode;

/// The runtime for `workers` threads; `None` is one per core.
///
/// One worker is a current-thread runtime: besides saving a thread, its
/// scheduler runs a woken connection task after the tasks already queued
/// (the multi-thread one runs it next, from its LIFO slot), so responses
/// finished together leave in one write instead of one `writev` each.
pub fn build(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match workers {
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

/// Sets up logging, runs `service` to its end on the runtime for `workers`,
/// and turns the outcome into the exit code: 2 when logging cannot be set
/// up, 1 when the runtime cannot start or the service fails.
pub fn main<F, E>(program: &str, workers: Option<usize>, service: impl FnOnce() -> F) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: Display,
{
    if let Err(e) = crate::logging::init() {
        eprintln!("{program}: {e}");
        return ExitCode::from(2);
    }
    let rt = match build(workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(service()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints an anyhow error with its chain of causes.
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
