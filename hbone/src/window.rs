//! A budget for the HTTP/2 connection windows an HBONE server grants.
//!
//! A tunnel's received bytes are acknowledged (their window released) only once the upstream has
//! taken them, so a pod that reads slowly leaves up to a connection window of its peer's data
//! held in the server's memory, per connection. With the full window on every connection, what
//! peers can make a node hold grows with the number of connections, not with anything the node
//! chose. Carving each connection's window out of one budget bounds it: the budget, plus HTTP/2's
//! initial window for each connection beyond it.

use std::sync::{Arc, Mutex};

use crate::settings::CONNECTION_WINDOW;

/// HTTP/2's initial connection window. A receiver cannot take it back, so it is the least a
/// connection gets once the budget is spent.
pub const MIN_WINDOW: u32 = 65_535;

pub struct WindowBudget {
    total: u64,
    granted: Mutex<u64>,
}

/// One connection's window, returned to the budget when dropped.
pub struct WindowGrant {
    budget: Arc<WindowBudget>,
    size: u32,
}

impl WindowBudget {
    pub fn new(total: u64) -> Arc<WindowBudget> {
        Arc::new(WindowBudget { total, granted: Mutex::new(0) })
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
}

impl Drop for WindowGrant {
    fn drop(&mut self) {
        let mut granted = self.budget.granted.lock().unwrap_or_else(|e| e.into_inner());
        *granted -= u64::from(self.size);
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
}
