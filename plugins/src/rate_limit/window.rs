//! The local limiter's windows: counts per key in pingora-limits' count-min sketches.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pingora_limits::estimator::Estimator;

/// Columns per sketch row: 4 × 8192 counters (256 KiB) per window slot. Keys share counters
/// only when they collide in all four rows, so with tens of thousands of active keys a few
/// are limited early; a flood of fresh keys cannot saturate the sketch and limit everyone
/// (with 1024 columns, ~1000 × the limit requests per window could).
const SKETCH_SLOTS: usize = 8192;

/// Counts per key over aligned windows of `interval`, the current and the previous one.
///
/// Like pingora-limits' `Rate`, but its windows are aligned to a fixed epoch and rotated by
/// compare-and-swap on the window number, so sub-second windows are safe under concurrency
/// (`Rate` asserts on a reset race within its first second, which would abort the process).
pub(super) struct Window {
    slots: [Estimator; 2],
    /// The window number each slot holds counts for.
    holds: [AtomicU64; 2],
    epoch: Instant,
    interval_ms: u64,
}

impl Window {
    pub(super) fn new(interval: Duration) -> Window {
        Window {
            slots: [
                Estimator::new(4, SKETCH_SLOTS),
                Estimator::new(4, SKETCH_SLOTS),
            ],
            holds: [AtomicU64::new(0), AtomicU64::new(u64::MAX)],
            epoch: Instant::now(),
            interval_ms: (interval.as_millis() as u64).max(1),
        }
    }

    /// The current window number, its slot made current, and how far into it we are (0..1).
    fn current(&self) -> (u64, usize, f64) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let w = now / self.interval_ms;
        let i = (w % 2) as usize;
        let held = self.holds[i].load(Ordering::Acquire);
        // Only forwards: a thread that slept across windows must not rewind a slot.
        if (held == u64::MAX || held < w)
            && self.holds[i]
                .compare_exchange(held, w, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // Counts of a request racing this reset may be lost: the estimate stays approximate.
            self.slots[i].reset();
        }
        let f = (now % self.interval_ms) as f64 / self.interval_ms as f64;
        (w, i, f)
    }

    /// The sliding estimate for `key`, the seconds left in the current window, and the
    /// current slot (for [`Window::add`], so one request reads the clock once per window).
    pub(super) fn estimate(&self, key: u64) -> (f64, f64, usize) {
        let (w, i, f) = self.current();
        let j = 1 - i;
        let prev = if w > 0 && self.holds[j].load(Ordering::Acquire) == w - 1 {
            self.slots[j].get(key) as f64
        } else {
            0.0
        };
        let curr = self.slots[i].get(key) as f64;
        (
            prev * (1.0 - f) + curr,
            (1.0 - f) * self.interval_ms as f64 / 1000.0,
            i,
        )
    }

    pub(super) fn add(&self, slot: usize, key: u64) {
        self.slots[slot].incr(key, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_per_key() {
        let w = Window::new(Duration::from_secs(3600));
        let slot = w.estimate(1).2;
        w.add(slot, 1);
        w.add(slot, 1);
        w.add(slot, 2);
        assert_eq!(w.estimate(1).0, 2.0);
        assert_eq!(w.estimate(2).0, 1.0);
        assert_eq!(w.estimate(3).0, 0.0);
    }
}
