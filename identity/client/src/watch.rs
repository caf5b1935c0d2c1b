//! Re-reading a file when it changes. Kubernetes updates a mounted ConfigMap
//! or Secret by swapping a `..data` symlink in the directory, so the parent
//! directory is watched (inotify through `notify`), and a slow poll backs the
//! watch up where events are lost (some overlay and network filesystems).
//! Only events that can change the file count: inotify also reports every
//! open and read in the directory, the watcher's own re-read among them,
//! which would otherwise re-trigger it for ever.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};

/// How often the file is read even without an event.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// After an event, how long to wait for a burst of writes to settle.
const SETTLE: Duration = Duration::from_millis(50);

/// Whether `event` may have changed the file named `name` in the watched
/// directory: a write, create, rename or removal of the file itself or of a
/// `..`-prefixed entry (the `..data` symlink and timestamped directories
/// Kubernetes swaps on an update), or a writer closing it. Opens, reads and
/// other files do not count.
fn may_change(event: &notify::Event, name: &OsStr) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    if matches!(event.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) {
        return false;
    }
    // An event without paths (e.g. the kernel's queue overflowed) may be anything.
    event.paths.is_empty()
        || event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|f| f == name || f.as_encoded_bytes().starts_with(b".."))
        })
}

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
    let name = path.file_name().map(OsStr::to_owned).unwrap_or_default();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // An error from the watcher may mean lost events: re-read to be safe.
        if res.as_ref().map_or(true, |ev| may_change(ev, &name)) {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
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

#[cfg(test)]
mod tests {
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RemoveKind};

    use super::*;

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn only_changes_to_the_file_or_the_kubernetes_symlinks_count() {
        let name = OsStr::new("bundle.pem");
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(may_change(&event(write, "/etc/sidemesh/bundle.pem"), name));
        assert!(may_change(
            &event(EventKind::Create(CreateKind::Any), "/etc/sidemesh/..data"),
            name
        ));
        assert!(may_change(
            &event(
                EventKind::Remove(RemoveKind::Any),
                "/etc/sidemesh/..2026_12_06_10_00_00.1"
            ),
            name
        ));
        assert!(may_change(&notify::Event::new(EventKind::Any), name));
        // A writer closing the file is done writing: the settled content.
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(may_change(&event(closed, "/etc/sidemesh/bundle.pem"), name));
        // The watcher's own re-read, and anything else in the directory.
        for access in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Close(AccessMode::Read),
            AccessKind::Read,
        ] {
            assert!(!may_change(
                &event(EventKind::Access(access), "/etc/sidemesh/bundle.pem"),
                name
            ));
        }
        assert!(!may_change(&event(write, "/etc/sidemesh/other.log"), name));
    }

    /// A change is read once; the watcher's own read is not another change
    /// (before the filter, it re-read the file every 50 ms for ever).
    #[tokio::test]
    async fn reading_the_file_does_not_trigger_another_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bundle.pem");
        std::fs::write(&path, "a").expect("write");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        spawn(path.clone(), move |bytes| tx.send(bytes.to_vec()).is_ok());
        // Count the opens of the file, as inotify reports them to anyone.
        let opens = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = opens.clone();
        let mut spy = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && matches!(ev.kind, EventKind::Access(AccessKind::Open(_)))
            {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .expect("watcher");
        spy.watch(dir.path(), RecursiveMode::NonRecursive).expect("watch");
        std::fs::write(&path, "b").expect("write");
        let got = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await;
        assert_eq!(got.ok().flatten().as_deref(), Some(&b"b"[..]));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let settled = opens.load(std::sync::atomic::Ordering::SeqCst);
        assert!(settled >= 1, "the spy saw no open at all: {settled}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let later = opens.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(later, settled, "the file was read again without a change");
    }
}
