//! A budget for the HTTP/2 connection windows HBONE connections grant their peers.
//!
//! A tunnel's received bytes are acknowledged (their window released) only once the pod on this
//! side has taken them, so a pod that reads slowly leaves up to a connection window of its peer's
//! data held in memory, per connection. With the full window on every connection, what peers can
//! make a node hold grows with the number of connections, not with anything the node chose.
//! Carving each connection's window out of one budget bounds it: the budget, plus HTTP/2's
//! initial window for each connection beyond it.
//!
//! A connection that got less than the full window grows toward it as other connections return
//! theirs, so a burst of connections does not leave the ones that came last short for good.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::settings::CONNECTION_WINDOW;

/// HTTP/2's initial connection window. A receiver cannot take it back, so it is the least a
/// connection gets once the budget is spent.
pub const MIN_WINDOW: u32 = 65_535;

pub struct WindowBudget {
    total: u64,
    granted: Mutex<u64>,
    /// Wakes one grant waiting to grow whenever window returns to the budget; that one wakes the
    /// next if it left some. One at a time, so a close costs the same however many connections
    /// wait (with all of them woken, a node short of window would spend its time waking them).
    returned: Notify,
}

/// One connection's window, returned to the budget when dropped.
pub struct WindowGrant {
    budget: Arc<WindowBudget>,
    size: u32,
}

impl WindowBudget {
    pub fn new(total: u64) -> Arc<WindowBudget> {
        Arc::new(WindowBudget { total, granted: Mutex::new(0), returned: Notify::new() })
    }

    /// The full connection window while the budget lasts, what is left of it after that, and
    /// [`MIN_WINDOW`] once it is spent.
    pub fn grant(self: &Arc<Self>) -> WindowGrant {
        let mut granted = self.granted.lock().unwrap_or_else(|e| e.into_inner());
        let left = self.total.saturating_sub(*granted);
        let size = left.clamp(u64::from(MIN_WINDOW), u64::from(CONNECTION_WINDOW)) as u32;
        *granted += u64::from(size);
        WindowGrant { budget: self.clone(), size }
    }

    /// Bytes of window the connections share.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes of window currently granted, across all connections.
    pub fn granted(&self) -> u64 {
        *self.granted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl WindowGrant {
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Takes what the budget has left, up to the full window; the new size if it grew. Passes
    /// the wake-up on when some is left after it.
    fn grow(&mut self) -> Option<u32> {
        let mut granted = self.budget.granted.lock().unwrap_or_else(|e| e.into_inner());
        let extra = self.budget.total.saturating_sub(*granted).min(u64::from(CONNECTION_WINDOW - self.size));
        if extra == 0 {
            return None;
        }
        *granted += extra;
        let left = *granted < self.budget.total;
        drop(granted);
        self.size += extra as u32;
        if left {
            self.budget.returned.notify_one();
        }
        Some(self.size)
    }

    /// Completes with the grant's new size once it has grown with window other connections
    /// returned; never, once it is the full window. The connection then raises the window it
    /// advertises to the new size. Cancel-safe: dropping the future loses nothing.
    pub async fn grown(&mut self) -> u32 {
        loop {
            if self.size >= CONNECTION_WINDOW {
                return std::future::pending().await;
            }
            // Registered before looking, so a return between the look and the wait is not missed.
            let budget = self.budget.clone();
            let returned = budget.returned.notified();
            let mut returned = std::pin::pin!(returned);
            returned.as_mut().enable();
            if let Some(size) = self.grow() {
                return size;
            }
            returned.await;
        }
    }
}

/// [`WindowGrant::grown`] of a connection's grant, if it has one; never otherwise.
pub async fn grown(grant: Option<&mut WindowGrant>) -> u32 {
    match grant {
        Some(g) => g.grown().await,
        None => std::future::pending().await,
    }
}

impl Drop for WindowGrant {
    fn drop(&mut self) {
        let mut granted = self.budget.granted.lock().unwrap_or_else(|e| e.into_inner());
        *granted -= u64::from(self.size);
        drop(granted);
        self.budget.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_windows_while_the_budget_lasts_then_the_minimum() {
        let b = WindowBudget::new(u64::from(CONNECTION_WINDOW) + 1000);
        let first = b.grant();
        assert_eq!(first.size(), CONNECTION_WINDOW);
        let second = b.grant();
        assert_eq!(second.size(), MIN_WINDOW, "1000 bytes left is less than the minimum");
        let third = b.grant();
        assert_eq!(third.size(), MIN_WINDOW);
        assert_eq!(b.granted(), u64::from(CONNECTION_WINDOW) + 2 * u64::from(MIN_WINDOW));
        drop(first);
        let again = b.grant();
        assert_eq!(again.size(), CONNECTION_WINDOW - 2 * MIN_WINDOW + 1000, "what is left, once returned");
        drop((second, third, again));
        assert_eq!(b.granted(), 0, "every grant comes back");
    }

    #[tokio::test]
    async fn a_short_grant_grows_with_what_others_return() {
        let b = WindowBudget::new(u64::from(CONNECTION_WINDOW) + 1000);
        let first = b.grant();
        let mut short = b.grant();
        assert_eq!(short.size(), MIN_WINDOW);
        let waiting = tokio::spawn(async move {
            let size = short.grown().await;
            (size, short)
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "nothing was returned, so nothing can grow");
        drop(first);
        let (size, short) = waiting.await.unwrap();
        assert_eq!(size, CONNECTION_WINDOW, "the returned window, up to the full window");
        assert_eq!((short.size(), b.granted()), (CONNECTION_WINDOW, u64::from(CONNECTION_WINDOW)));
        let mut full = short;
        let never = tokio::time::timeout(std::time::Duration::from_millis(50), full.grown()).await;
        assert!(never.is_err(), "a full grant never grows");
        drop(full);
        assert_eq!(b.granted(), 0, "a grown grant returns all it took");
    }

    /// One return wakes one waiting grant, which wakes the next while window is left: a return
    /// reaches as many short grants as it can grow, however many wait.
    #[tokio::test]
    async fn a_return_reaches_every_grant_it_can_grow() {
        let total = 2 * u64::from(CONNECTION_WINDOW) - 1000;
        let b = WindowBudget::new(total);
        let big = b.grant();
        // 1000 short of the full window, then two at the minimum.
        let shorts = [b.grant(), b.grant(), b.grant()];
        let sizes: Vec<u32> = shorts.iter().map(WindowGrant::size).collect();
        assert_eq!(sizes, [CONNECTION_WINDOW - 1000, MIN_WINDOW, MIN_WINDOW]);
        let waiting: Vec<_> = shorts
            .into_iter()
            .map(|mut short| tokio::spawn(async move { (short.size(), short.grown().await, short) }))
            .collect();
        tokio::task::yield_now().await;
        drop(big);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (done, pending): (Vec<_>, Vec<_>) = waiting.into_iter().partition(|w| w.is_finished());
        assert_eq!((done.len(), pending.len()), (2, 1), "the return fills one grant, then most of a second");
        let (mut grown, mut kept) = (0, Vec::new());
        for w in done {
            let (before, after, short) = w.await.unwrap();
            grown += u64::from(after - before);
            kept.push(short);
        }
        assert_eq!(b.granted(), total, "everything returned was handed on");
        assert_eq!(grown, u64::from(CONNECTION_WINDOW) - 2 * u64::from(MIN_WINDOW));
    }
}
