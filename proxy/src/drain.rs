//! Graceful shutdown: a signal that tells every listener and connection to
//! stop taking new work, and a count of connections still in flight that the
//! process waits on (up to the grace period) before exiting.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

/// Shared by everything that must finish before the process exits.
#[derive(Clone, Debug)]
pub struct Drain {
    signal: watch::Sender<bool>,
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

/// Held by a connection while it runs.
#[derive(Debug)]
pub struct Guard {
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain that has not started.
    pub fn new() -> Self {
        Self {
            signal: watch::Sender::new(false),
            active: Arc::default(),
            idle: Arc::default(),
        }
    }

    /// Counts a connection until the guard drops.
    pub fn guard(&self) -> Guard {
        self.active.fetch_add(1, Ordering::AcqRel);
        Guard {
            active: self.active.clone(),
            idle: self.idle.clone(),
        }
    }

    /// Starts draining.
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once draining starts.
    pub async fn signaled(&self) {
        let mut rx = self.signal.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Runs the HTTP connection `conn` to its end; once draining starts it
    /// is told to finish (`shutdown`, hyper's `graceful_shutdown`: answer
    /// what is in flight, take nothing new) and still run to its end.
    pub async fn serve<C, E>(&self, conn: C, shutdown: impl FnOnce(Pin<&mut C>)) -> anyhow::Result<()>
    where
        C: Future<Output = Result<(), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut conn = std::pin::pin!(conn);
        let done = tokio::select! {
            r = conn.as_mut() => r,
            _ = self.signaled() => {
                shutdown(conn.as_mut());
                conn.await
            }
        };
        // Boxed, not formatted: the log line keeps the error's causes.
        done.map_err(|e| anyhow::Error::from_boxed(e.into()))
    }

    /// Connections in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves when no connection is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}
