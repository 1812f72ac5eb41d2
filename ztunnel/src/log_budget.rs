//! Budgets for warnings that anyone who can reach a listener can trigger at will: a scanner, a
//! misconfigured client hammering a denied service, a flood of bad handshakes. Each call site
//! logs at most [`LINES_PER_WINDOW`] lines per [`WINDOW`], and a site that names the source it
//! is about gives each source at most [`LINES_PER_SOURCE`] of them, so that one noisy caller
//! cannot hide another's denials. Once a window that dropped lines is over, one line says how
//! many ([`report_suppressed`] runs every window, so the count does not wait for the next event).
//! The log stays readable and bounded and still tells the operator that it happened; the
//! rejection counters in the metrics count every event.
//!
//! ```ignore
//! warn_limited!(per src.ip(); "HBONE TLS handshake rejected", %src, error = %e);
//! warn_limited!("accept failed", port, error = %e);
//! ```

use std::net::IpAddr;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(10);
pub const LINES_PER_WINDOW: u32 = 20;
pub const LINES_PER_SOURCE: u32 = 5;

/// One call site's budget.
pub struct LogBudget {
    what: &'static str,
    window: Mutex<Window>,
    /// Done once this budget is in [`BUDGETS`], for [`report_suppressed`].
    listed: Once,
}

#[derive(Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    /// Lines logged per source this window: at most [`LINES_PER_WINDOW`] entries, since only a
    /// source that logs gets one.
    by_source: Vec<(IpAddr, u32)>,
    suppressed: u64,
}

/// Every budget that has been used, so that suppressed lines are reported once their window is
/// over even if no event follows. Call sites are static, so this only ever grows to their number.
static BUDGETS: Mutex<Vec<&'static LogBudget>> = Mutex::new(Vec::new());

/// What one event may do: log its line, and first report the lines an earlier window dropped.
#[derive(Debug, PartialEq)]
struct Verdict {
    log: bool,
    earlier_suppressed: Option<(u64, Instant)>,
}

impl LogBudget {
    pub const fn new(what: &'static str) -> LogBudget {
        LogBudget {
            what,
            window: Mutex::new(Window { start: None, logged: 0, by_source: Vec::new(), suppressed: 0 }),
            listed: Once::new(),
        }
    }

    /// Whether this event, about `source` if the site names one, may log its line.
    pub fn allow(&'static self, source: Option<IpAddr>) -> bool {
        let now = Instant::now();
        let v = self.take(now, source);
        self.listed.call_once(|| BUDGETS.lock().unwrap_or_else(|e| e.into_inner()).push(self));
        self.report(now, v.earlier_suppressed);
        v.log
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self, now: Instant, suppressed: Option<(u64, Instant)>) {
        if let Some((lines, since)) = suppressed {
            tracing::warn!(
                lines,
                what = self.what,
                window_start = ?now.saturating_duration_since(since),
                "warnings suppressed: more of these than {LINES_PER_WINDOW} per {WINDOW:?}, or than {LINES_PER_SOURCE} from one source (window_start is how long ago that window began)"
            );
        }
    }

    fn take(&self, now: Instant, source: Option<IpAddr>) -> Verdict {
        let mut w = self.lock();
        let earlier_suppressed = Self::close_expired(&mut w, now);
        if w.start.is_none() {
            w.start = Some(now);
        }
        let from_source = source.and_then(|s| w.by_source.iter().position(|(k, _)| *k == s));
        let source_full = from_source.is_some_and(|i| w.by_source[i].1 >= LINES_PER_SOURCE);
        let log = w.logged < LINES_PER_WINDOW && !source_full;
        if !log {
            w.suppressed += 1;
            return Verdict { log, earlier_suppressed };
        }
        w.logged += 1;
        match (from_source, source) {
            (Some(i), _) => w.by_source[i].1 += 1,
            (None, Some(s)) => w.by_source.push((s, 1)),
            (None, None) => {}
        }
        Verdict { log, earlier_suppressed }
    }

    /// Starts afresh if the window is over; what it dropped, to report.
    fn close_expired(w: &mut Window, now: Instant) -> Option<(u64, Instant)> {
        let start = w.start?;
        if now.saturating_duration_since(start) < WINDOW {
            return None;
        }
        let dropped = (w.suppressed > 0).then_some((w.suppressed, start));
        *w = Window::default();
        dropped
    }
}

/// Runs [`report_suppressed`] every [`WINDOW`], forever.
pub async fn report_suppressed_every_window() {
    let mut every = tokio::time::interval(WINDOW);
    loop {
        every.tick().await;
        report_suppressed();
    }
}

/// Reports the lines dropped in windows now over.
pub fn report_suppressed() {
    let now = Instant::now();
    let budgets = BUDGETS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for b in budgets {
        let dropped = LogBudget::close_expired(&mut b.lock(), now);
        b.report(now, dropped);
    }
}

/// `tracing::warn!` within a budget of its own: the message comes first, then the fields. With
/// `per <IpAddr>;` first, each source also has a budget of its own within the site's.
macro_rules! warn_limited {
    (per $source:expr; $msg:literal $(, $($fields:tt)+)?) => {{
        static BUDGET: $crate::log_budget::LogBudget = $crate::log_budget::LogBudget::new($msg);
        if BUDGET.allow(Some($source)) {
            tracing::warn!($($($fields)+ ,)? $msg);
        }
    }};
    ($msg:literal $(, $($fields:tt)+)?) => {{
        static BUDGET: $crate::log_budget::LogBudget = $crate::log_budget::LogBudget::new($msg);
        if BUDGET.allow(None) {
            tracing::warn!($($($fields)+ ,)? $msg);
        }
    }};
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_to_the_budget_and_the_window_after_says_how_much_was_dropped() {
        let b = LogBudget::new("test");
        let t0 = Instant::now();
        for i in 0..LINES_PER_WINDOW {
            let at = t0 + Duration::from_millis(i as u64);
            assert_eq!(b.take(at, None), Verdict { log: true, earlier_suppressed: None });
        }
        for _ in 0..500 {
            assert!(!b.take(t0 + Duration::from_secs(1), None).log);
        }
        let next = b.take(t0 + WINDOW, None);
        assert_eq!(next, Verdict { log: true, earlier_suppressed: Some((500, t0)) });
        // Reported once; a quiet window reports nothing.
        assert_eq!(b.take(t0 + WINDOW * 3, None).earlier_suppressed, None);
    }

    #[test]
    fn one_source_cannot_use_up_what_others_may_log() {
        let b = LogBudget::new("test");
        let t0 = Instant::now();
        let (noisy, other): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let logged = (0..1000).filter(|_| b.take(t0, Some(noisy)).log).count() as u32;
        assert_eq!(logged, LINES_PER_SOURCE);
        assert!(b.take(t0, Some(other)).log, "another source still logs");
        // Many sources together still stop at the site's budget.
        let many = (0..100u8).filter(|i| b.take(t0, Some([10, 1, 0, *i].into())).log).count() as u32;
        assert_eq!(many, LINES_PER_WINDOW - LINES_PER_SOURCE - 1);
        assert!(!b.take(t0, Some(other)).log && !b.take(t0, None).log);
        // The next window starts every source afresh.
        assert!(b.take(t0 + WINDOW, Some(noisy)).log);
    }

    #[test]
    fn dropped_lines_are_counted_for_the_report_once_the_window_is_over_without_another_event() {
        static B: LogBudget = LogBudget::new("test");
        let t0 = Instant::now();
        for _ in 0..LINES_PER_WINDOW + 7 {
            B.take(t0, None);
        }
        assert_eq!(LogBudget::close_expired(&mut B.lock(), t0 + Duration::from_secs(1)), None, "not over yet");
        assert_eq!(LogBudget::close_expired(&mut B.lock(), t0 + WINDOW), Some((7, t0)));
        assert_eq!(LogBudget::close_expired(&mut B.lock(), t0 + WINDOW * 2), None, "reported once");
        // Used sites are listed for the periodic report.
        assert!(B.allow(None));
        assert!(BUDGETS.lock().unwrap().iter().any(|b| std::ptr::eq(*b, &B)));
    }
}
