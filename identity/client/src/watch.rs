//! Re-reading a file when it changes. Kubernetes updates a mounted ConfigMap
//! or Secret by swapping a `..data` symlink in the directory, so the parent
//! directory is watched (inotify through `notify`), and a slow poll backs the
//! watch up where events are lost (some overlay and network filesystems).

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};

/// How often the file is read even without an event.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// After an event, how long to wait for a burst of writes to settle.
const SETTLE: Duration = Duration::from_millis(50);

/// Calls `on_change` with the file's new content each time it differs from the
/// last content seen (the content at spawn time counts as seen). Stops when
/// `on_change` returns `false`. A file that cannot be read is logged and
/// skipped: the last good content stays in force.
pub fn spawn<F>(path: PathBuf, mut on_change: F)
where
    F: FnMut(&[u8]) -> bool + Send + 'static,
{
    let mut last = std::fs::read(&path).ok();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    // The watcher lives as long as the task; if it cannot be set up, polling
    // alone still picks changes up.
    let watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = tx.send(());
    })
    .and_then(|mut w| {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        w.watch(dir, RecursiveMode::NonRecursive).map(|()| w)
    });
    if let Err(e) = &watcher {
        tracing::warn!(path = %path.display(), error = %e, "cannot watch file; polling every {POLL_INTERVAL:?}");
    }
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.tick().await;
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    if ev.is_none() {
                        // The watcher is gone; keep polling.
                        poll.tick().await;
                    }
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = poll.tick() => {}
            }
            match tokio::fs::read(&path).await {
                Ok(bytes) if last.as_deref() != Some(&bytes[..]) => {
                    let keep_going = on_change(&bytes);
                    last = Some(bytes);
                    if !keep_going {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "re-reading watched file")
                }
            }
        }
    });
}
