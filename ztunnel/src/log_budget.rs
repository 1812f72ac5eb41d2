//! Budgets for warnings that anyone who can reach a listener can trigger at will: a scanner, a
//! misconfigured client hammering a denied service, a flood of bad handshakes. Each call site
//! logs at most [`LINES_PER_WINDOW`] lines per [`WINDOW`]. The first line after a window that
//! dropped some says how many, so the log stays readable and bounded and still tells the operator
//! that it happened. The rejection counters in the metrics count every event.
//!
//! ```ignore
//! warn_limited!("HBONE TLS handshake rejected", %src, error = %e);
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(10);
pub const LINES_PER_WINDOW: u32 = 20;

/// One call site's budget.
pub struct LogBudget {
    what: &'static str,
    window: Mutex<Window>,
}

struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// What one event may do: log its line, and first report the lines an earlier window dropped.
#[derive(Debug, PartialEq)]
struct Verdict {
    log: bool,
    earlier_suppressed: Option<(u64, Instant)>,
}

impl LogBudget {
    pub const fn new(what: &'static str) -> LogBudget {
        LogBudget { what, window: Mutex::new(Window { start: None, logged: 0, suppressed: 0 }) }
    }

    /// Whether this event may log its line.
    pub fn allow(&self) -> bool {
        let now = Instant::now();
        let v = self.take(now);
        if let Some((lines, since)) = v.earlier_suppressed {
            tracing::warn!(
                lines,
                what = self.what,
                window_start = ?now.saturating_duration_since(since),
                "warnings suppressed: more of these than {LINES_PER_WINDOW} per {WINDOW:?} (window_start is how long ago that window began)"
            );
        }
        v.log
    }

    fn take(&self, now: Instant) -> Verdict {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let mut earlier_suppressed = None;
        let expired = w.start.is_none_or(|s| now.saturating_duration_since(s) >= WINDOW);
        if expired {
            if let (n @ 1.., Some(start)) = (w.suppressed, w.start) {
                earlier_suppressed = Some((n, start));
            }
            *w = Window { start: Some(now), logged: 0, suppressed: 0 };
        }
        let log = w.logged < LINES_PER_WINDOW;
        if log {
            w.logged += 1;
        } else {
            w.suppressed += 1;
        }
        Verdict { log, earlier_suppressed }
    }
}

/// `tracing::warn!` within a budget of its own: the message comes first, then the fields.
macro_rules! warn_limited {
    ($msg:literal $(, $($fields:tt)+)?) => {{
        static BUDGET: $crate::log_budget::LogBudget = $crate::log_budget::LogBudget::new($msg);
        if BUDGET.allow() {
            tracing::warn!($($($fields)+ ,)? $msg);
        }
    }};
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_to_the_budget_and_the_next_window_says_how_much_was_dropped() {
        let b = LogBudget::new("test");
        let t0 = Instant::now();
        for i in 0..LINES_PER_WINDOW {
            assert_eq!(b.take(t0 + Duration::from_millis(i as u64)), Verdict { log: true, earlier_suppressed: None });
        }
        for _ in 0..500 {
            assert!(!b.take(t0 + Duration::from_secs(1)).log);
        }
        let next = b.take(t0 + WINDOW);
        assert_eq!(next, Verdict { log: true, earlier_suppressed: Some((500, t0)) });
        // Reported once; a quiet window reports nothing.
        assert_eq!(b.take(t0 + WINDOW * 3).earlier_suppressed, None);
    }
}
