//! What every accept loop shares: a failed `accept()` (EMFILE, ENOBUFS) is retried, and its
//! log line is rate-limited so that running out of descriptors does not also flood the log.

use std::time::{Duration, Instant};

/// At most one "accept failed" line per this interval: when descriptors run out, accept
/// fails on every retry, and a line per failure would flood the log.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Rate-limits one accept loop's error line: the first failure is logged at once, later
/// ones at most every [`ACCEPT_ERROR_LOG_INTERVAL`], with the number left out in between.
#[derive(Debug)]
pub(crate) struct AcceptErrors {
    /// The log message, naming the listener.
    message: &'static str,
    /// When a line was last written; `None` before the first failure.
    last_logged: Option<Instant>,
    /// Failures since that line that were not logged.
    suppressed: u64,
}

impl AcceptErrors {
    /// A limiter for the loop whose failures log `message`.
    pub(crate) fn new(message: &'static str) -> Self {
        Self {
            message,
            last_logged: None,
            suppressed: 0,
        }
    }

    /// Records a failed `accept()` at `now`; logs it unless a line went out less than the
    /// interval ago. Returns whether it logged.
    pub(crate) fn failed(&mut self, error: &std::io::Error, now: Instant) -> bool {
        let due = self
            .last_logged
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_ERROR_LOG_INTERVAL);
        if !due {
            self.suppressed += 1;
            return false;
        }
        tracing::warn!(
            error = %error,
            suppressed = self.suppressed,
            "{}", self.message
        );
        self.last_logged = Some(now);
        self.suppressed = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn accept_errors_log_once_per_interval() {
        let mut errors = AcceptErrors::new("accept failed");
        let e = std::io::Error::from_raw_os_error(24); // EMFILE
        let t0 = Instant::now();
        assert!(errors.failed(&e, t0));
        // Ten a second for nine seconds: none of them logged, all counted.
        for i in 1..90 {
            assert!(!errors.failed(&e, t0 + Duration::from_millis(100 * i)));
        }
        assert_eq!(errors.suppressed, 89);
        assert!(errors.failed(&e, t0 + ACCEPT_ERROR_LOG_INTERVAL));
        assert_eq!(errors.suppressed, 0);
    }
}
