//! How many tunnels a connection carries, and since when it has carried none: what both ends
//! use to release idle connections, the client pool and the server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) struct Usage {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Usage {
    pub(crate) fn new() -> Arc<Usage> {
        Arc::new(Usage { active: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()) })
    }

    /// Takes a slot if fewer than `max` are taken.
    pub(crate) fn try_enter(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.clone()))
    }

    pub(crate) fn enter(self: &Arc<Self>) -> Slot {
        self.active.fetch_add(1, Ordering::AcqRel);
        Slot(self.clone())
    }

    /// How long the connection has been without tunnels, or `None` while it has some.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        (self.active.load(Ordering::Acquire) == 0).then(|| since.elapsed())
    }

    /// Completes once the connection has had no tunnels for `timeout`.
    pub(crate) async fn idle(&self, timeout: Duration) {
        loop {
            let wait = match self.idle_for() {
                Some(idle) if idle >= timeout => return,
                Some(idle) => timeout - idle,
                None => timeout,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// One tunnel's hold on a connection; the last one out starts the idle clock.
pub(crate) struct Slot(Arc<Usage>);

impl Slot {
    /// The connection's usage this slot counts in.
    pub(crate) fn usage(&self) -> &Arc<Usage> {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut idle_since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *idle_since = Instant::now();
        }
    }
}
