//! Circuit breaker per upstream: closed → open after `failures` consecutive failures or an
//! error ratio over a window; open answers 503 without calling the upstream for `open_for`;
//! then half-open lets one probe through, whose outcome closes or re-opens it.
//!
//! Lock-free: a few atomics, touched once per request.
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::*};

use crate::config::CircuitBreaker;

use super::now_ms;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The one request allowed through a half-open breaker; report its outcome with `probe`.
    Probe,
    No,
}

pub struct Breaker {
    cfg: CircuitBreaker,
    state: AtomicU8,
    consecutive: AtomicU32,
    opened_at: AtomicU64,
    probing: AtomicBool,
    window_start: AtomicU64,
    window_total: AtomicU32,
    window_failed: AtomicU32,
}

impl Breaker {
    pub fn new(cfg: CircuitBreaker) -> Breaker {
        Breaker {
            cfg,
            state: AtomicU8::new(CLOSED),
            consecutive: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            window_start: AtomicU64::new(now_ms()),
            window_total: AtomicU32::new(0),
            window_failed: AtomicU32::new(0),
        }
    }

    pub fn state_name(&self) -> &'static str {
        match self.state.load(Relaxed) {
            OPEN => "open",
            HALF_OPEN => "half_open",
            _ => "closed",
        }
    }

    /// May a request go to the upstream now?
    pub fn admit(&self) -> Admit {
        match self.state.load(Acquire) {
            CLOSED => Admit::Yes,
            OPEN => {
                let since = now_ms().saturating_sub(self.opened_at.load(Relaxed));
                if since < self.cfg.open_for.as_millis() as u64 {
                    return Admit::No;
                }
                // Whoever moves it to half-open also takes the probe.
                if self
                    .state
                    .compare_exchange(OPEN, HALF_OPEN, AcqRel, Relaxed)
                    .is_ok()
                {
                    self.probing.store(true, Release);
                    log::info!("circuit half-open: sending a probe");
                    return Admit::Probe;
                }
                self.take_probe()
            }
            _ => self.take_probe(),
        }
    }

    fn take_probe(&self) -> Admit {
        if self
            .probing
            .compare_exchange(false, true, AcqRel, Relaxed)
            .is_ok()
        {
            Admit::Probe
        } else {
            Admit::No
        }
    }

    fn open(&self) {
        self.opened_at.store(now_ms(), Relaxed);
        self.state.store(OPEN, Release);
        self.consecutive.store(0, Relaxed);
        self.probing.store(false, Release);
    }

    /// Reports a request's outcome. `probe` is true for the request [`admit`] let through as
    /// the half-open probe.
    pub fn record(&self, ok: bool, probe: bool) {
        if probe {
            if ok {
                self.consecutive.store(0, Relaxed);
                self.window_total.store(0, Relaxed);
                self.window_failed.store(0, Relaxed);
                self.window_start.store(now_ms(), Relaxed);
                self.state.store(CLOSED, Release);
                self.probing.store(false, Release);
                log::info!("circuit closed: the probe succeeded");
            } else {
                self.open();
                log::warn!("circuit re-opened: the probe failed");
            }
            return;
        }
        if self.state.load(Relaxed) != CLOSED {
            return;
        }
        let consecutive = if ok {
            if self.consecutive.load(Relaxed) != 0 {
                self.consecutive.store(0, Relaxed);
            }
            0
        } else {
            self.consecutive.fetch_add(1, Relaxed) + 1
        };
        let mut trip = !ok && self.cfg.failures > 0 && consecutive >= self.cfg.failures;
        if let Some(ratio) = self.cfg.error_ratio {
            let now = now_ms();
            let start = self.window_start.load(Relaxed);
            if now.saturating_sub(start) > self.cfg.window.as_millis() as u64
                && self
                    .window_start
                    .compare_exchange(start, now, Relaxed, Relaxed)
                    .is_ok()
            {
                self.window_total.store(0, Relaxed);
                self.window_failed.store(0, Relaxed);
            }
            let total = self.window_total.fetch_add(1, Relaxed) + 1;
            let failed = if ok {
                self.window_failed.load(Relaxed)
            } else {
                self.window_failed.fetch_add(1, Relaxed) + 1
            };
            trip |= !ok
                && total >= self.cfg.min_requests
                && f64::from(failed) >= ratio * f64::from(total);
        }
        if trip
            && self
                .state
                .compare_exchange(CLOSED, OPEN, AcqRel, Relaxed)
                .is_ok()
        {
            self.open();
            log::warn!("circuit opened after repeated upstream failures");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn breaker(failures: u32, ratio: Option<f64>, open_for_ms: u64) -> Breaker {
        Breaker::new(CircuitBreaker {
            failures,
            error_ratio: ratio,
            window: Duration::from_secs(10),
            min_requests: 10,
            open_for: Duration::from_millis(open_for_ms),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes() {
        let b = breaker(3, None, 30);
        for _ in 0..2 {
            assert_eq!(b.admit(), Admit::Yes);
            b.record(false, false);
        }
        b.record(true, false); // a success resets the count
        for _ in 0..3 {
            b.record(false, false);
        }
        assert_eq!(b.state_name(), "open");
        assert_eq!(b.admit(), Admit::No);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Admit::Probe);
        assert_eq!(b.admit(), Admit::No, "one probe at a time");
        b.record(false, true);
        assert_eq!(b.state_name(), "open");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Admit::Probe);
        b.record(true, true);
        assert_eq!(b.state_name(), "closed");
        assert_eq!(b.admit(), Admit::Yes);
    }

    #[test]
    fn opens_on_error_ratio() {
        let b = breaker(0, Some(0.5), 1000);
        for i in 0..9 {
            b.record(i % 2 == 0, false);
        }
        assert_eq!(b.state_name(), "closed", "below min_requests");
        b.record(false, false);
        assert_eq!(b.state_name(), "open");
    }
}
