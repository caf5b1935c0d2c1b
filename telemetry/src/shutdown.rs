//! The shutdown signal: SIGTERM (what the kubelet sends) or SIGINT (Ctrl-C).

use tokio::signal::unix::{self, SignalKind};

/// Resolves when the process is asked to stop.
pub async fn signal() {
    let term = unix::signal(SignalKind::terminate());
    let int = unix::signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        // Without signal handlers the process can still be killed; never
        // resolve rather than shutting down at once.
        _ => std::future::pending().await,
    }
}
