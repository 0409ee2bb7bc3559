//! A per-module budget for the log lines a module can make the daemon
//! write (refused connections and lookups, refused HTTP requests): past
//! [`LINES_PER_WINDOW`] in a [`WINDOW`], lines are counted instead of
//! written, and one line says how many were suppressed. A module looping on
//! a refused call cannot fill the daemon's log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a module may cause per window.
pub const LINES_PER_WINDOW: u32 = 20;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct State {
    start: Instant,
    written: u32,
    suppressed: u64,
}

/// One module's budget.
#[derive(Debug)]
pub struct LogLimiter {
    module: Box<str>,
    what: &'static str,
    state: Mutex<State>,
}

impl LogLimiter {
    /// A budget for `module`'s lines about `what` (e.g. "network refusals").
    pub fn new(module: &str, what: &'static str) -> Self {
        Self {
            module: module.into(),
            what,
            state: Mutex::new(State {
                start: Instant::now(),
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether the next line may be written; at the start of a window,
    /// first writes how many were suppressed in the last.
    pub fn allow(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        if now.duration_since(s.start) >= WINDOW {
            if s.suppressed > 0 {
                tracing::warn!(module = %self.module, suppressed = s.suppressed, "{} suppressed in the last {WINDOW:?} (over {LINES_PER_WINDOW})", self.what);
            }
            *s = State {
                start: now,
                written: 0,
                suppressed: 0,
            };
        }
        if s.written < LINES_PER_WINDOW {
            s.written += 1;
            true
        } else {
            s.suppressed += 1;
            false
        }
    }
}

impl Drop for LogLimiter {
    fn drop(&mut self) {
        if let Ok(s) = self.state.get_mut()
            && s.suppressed > 0
        {
            tracing::warn!(module = %self.module, suppressed = s.suppressed, "{} suppressed (over {LINES_PER_WINDOW} per {WINDOW:?})", self.what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_per_window() {
        let l = LogLimiter::new("m", "refusals");
        let allowed = (0..1000).filter(|_| l.allow()).count();
        assert_eq!(allowed, LINES_PER_WINDOW as usize);
        assert_eq!(
            l.state.lock().unwrap().suppressed,
            1000 - u64::from(LINES_PER_WINDOW)
        );
    }
}
