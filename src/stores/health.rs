//! A store's health: whether requests may use it, the back-off after errors and the one
//! request that probes it, and the episodes the log reports once each.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

pub(super) const BACKOFF_MIN_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 5_000;

/// Whether the store takes requests, and when to try again if not.
pub(super) struct Health {
    epoch: Instant,
    /// Milliseconds since `epoch` before which no request tries the store; 0: it is up.
    retry_at: AtomicU64,
    pub(super) backoff_ms: AtomicU64,
    /// In an episode of errors (logged once at its start, once at its end).
    pub(super) down: AtomicBool,
    episode_errors: AtomicU64,
    /// A probe is out: its failure doubles the back-off (a late failure of a request sent
    /// before the episode began does not).
    probing: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            epoch: Instant::now(),
            retry_at: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(0),
            down: AtomicBool::new(false),
            episode_errors: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }
}

impl Health {
    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether this request may use the store: it is up, or its back-off has passed and this
    /// request won the probe (the others go on falling back meanwhile).
    pub(super) fn usable(&self) -> bool {
        let at = self.retry_at.load(Relaxed);
        if at == 0 {
            return true;
        }
        let now = self.now_ms();
        let won = now >= at
            && self
                .retry_at
                .compare_exchange(at, now + self.backoff_ms.load(Relaxed), Relaxed, Relaxed)
                .is_ok();
        if won {
            self.probing.store(true, Relaxed);
        }
        won
    }

    /// Lets the next request probe at once (new connections were made).
    pub(super) fn probe_now(&self) {
        if self.retry_at.load(Relaxed) != 0 {
            self.retry_at.store(1, Relaxed);
        }
    }

    /// Returns whether this error starts an episode. The back-off starts at its minimum and
    /// doubles each time a probe fails; errors of requests already under way when the
    /// episode began leave it alone.
    pub(super) fn failed(&self) -> bool {
        self.episode_errors.fetch_add(1, Relaxed);
        let starts = !self.down.swap(true, Relaxed);
        let b = if starts {
            BACKOFF_MIN_MS
        } else if self.probing.swap(false, Relaxed) {
            (self.backoff_ms.load(Relaxed) * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS)
        } else {
            return false;
        };
        self.backoff_ms.store(b, Relaxed);
        self.retry_at.store(self.now_ms() + b, Relaxed);
        starts
    }

    /// Returns the errors of the episode this success ends, if one was going on.
    pub(super) fn succeeded(&self) -> Option<u64> {
        if self.retry_at.load(Relaxed) != 0 {
            self.retry_at.store(0, Relaxed);
        }
        self.probing.store(false, Relaxed);
        if !self.down.load(Relaxed) {
            return None;
        }
        self.backoff_ms.store(0, Relaxed);
        self.down
            .swap(false, Relaxed)
            .then(|| self.episode_errors.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_one_request_probes() {
        let h = Health::default();
        assert!(h.usable());
        assert!(h.failed(), "the first error starts an episode");
        assert!(!h.failed(), "the second does not");
        assert_eq!(
            h.backoff_ms.load(Relaxed),
            BACKOFF_MIN_MS,
            "a late error of a request sent before the episode does not double it"
        );
        assert!(!h.usable(), "backing off");
        h.retry_at.store(1, Relaxed);
        assert!(h.usable(), "back-off over: this request probes");
        assert!(!h.usable(), "and the next one waits for the probe");
        assert!(!h.failed(), "the probe failed");
        assert_eq!(h.backoff_ms.load(Relaxed), 2 * BACKOFF_MIN_MS, "doubled");
        h.retry_at.store(1, Relaxed);
        assert!(h.usable());
        assert_eq!(h.succeeded(), Some(3));
        assert!(h.usable());
        assert_eq!(h.succeeded(), None);
    }
}
