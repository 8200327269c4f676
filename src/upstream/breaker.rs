//! Circuit breaker per upstream: closed → open after `failures` consecutive failures or an
//! error ratio over a window; open answers 503 without calling the upstream for `open_for`;
//! then half-open lets one probe through, whose outcome closes or re-opens it.
//!
//! Only outcomes that say something about the upstream are recorded (the proxy classifies them
//! first): a client that sent too much or went away gives no verdict, and a probe that ends
//! without one is [`Breaker::abandon`]ed so the next request probes instead. A probe's verdict
//! is taken from its response head (a WebSocket's 101, an event stream's 200), and a probe
//! that has not given one within `probe_timeout` is replaced by the next request's: a stream
//! cannot hold the circuit half-open for its whole life. Probes are numbered so that a late
//! verdict of a replaced probe changes nothing.
//!
//! Lock-free: a few atomics, touched once per request.
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::*};

use crate::config::CircuitBreaker;

use super::now_ms;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The one request allowed through a half-open breaker; report its outcome with this
    /// number.
    Probe(u64),
    No,
}

pub struct Breaker {
    cfg: CircuitBreaker,
    state: AtomicU8,
    consecutive: AtomicU32,
    opened_at: AtomicU64,
    /// When the current probe was let through (ms, never 0), 0 while the slot is free: one
    /// atomic is the slot, so taking it and stamping it cannot be split by another thread.
    probe_at: AtomicU64,
    probe_seq: AtomicU64,
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
            probe_at: AtomicU64::new(0),
            probe_seq: AtomicU64::new(0),
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
                // Whoever moves it to half-open logs it; the probe goes to whoever takes the
                // slot first (one slot, so never two probes).
                if self
                    .state
                    .compare_exchange(OPEN, HALF_OPEN, AcqRel, Relaxed)
                    .is_ok()
                {
                    log::info!("circuit half-open: sending a probe");
                }
                self.take_probe()
            }
            _ => self.take_probe(),
        }
    }

    /// The probe slot when it is free, or when its holder is past `probe_timeout`.
    fn take_probe(&self) -> Admit {
        if self.state.load(Acquire) != HALF_OPEN {
            return Admit::No;
        }
        let now = now_ms().max(1);
        let at = self.probe_at.load(Acquire);
        let overdue =
            at != 0 && now.saturating_sub(at) >= self.cfg.probe_timeout.as_millis() as u64;
        if (at == 0 || overdue)
            && self
                .probe_at
                .compare_exchange(at, now, AcqRel, Relaxed)
                .is_ok()
        {
            if overdue {
                log::info!("circuit half-open: the probe gave no verdict in time, sending another");
            }
            return Admit::Probe(self.probe_seq.fetch_add(1, AcqRel) + 1);
        }
        Admit::No
    }

    fn current_probe(&self, probe: u64) -> bool {
        self.state.load(Acquire) == HALF_OPEN && self.probe_seq.load(Acquire) == probe
    }

    /// A probe that ended without a verdict (the client left, or was refused): the next
    /// request probes.
    pub fn abandon(&self, probe: u64) {
        if self.current_probe(probe) {
            self.probe_at.store(0, Release);
        }
    }

    fn open(&self) {
        self.opened_at.store(now_ms(), Relaxed);
        self.consecutive.store(0, Relaxed);
        // The slot is freed before the state says open, so the next half-open finds it free.
        self.probe_at.store(0, Release);
        self.state.store(OPEN, Release);
    }

    /// Reports a request's outcome. `probe` is the number [`admit`] gave the half-open probe.
    pub fn record(&self, ok: bool, probe: Option<u64>) {
        if let Some(probe) = probe {
            if !self.current_probe(probe) {
                return;
            }
            if ok {
                self.consecutive.store(0, Relaxed);
                self.window_total.store(0, Relaxed);
                self.window_failed.store(0, Relaxed);
                self.window_start.store(now_ms(), Relaxed);
                self.state.store(CLOSED, Release);
                self.probe_at.store(0, Release);
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
            probe_timeout: Duration::from_millis(50),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes() {
        let b = breaker(3, None, 30);
        for _ in 0..2 {
            assert_eq!(b.admit(), Admit::Yes);
            b.record(false, None);
        }
        b.record(true, None); // a success resets the count
        for _ in 0..3 {
            b.record(false, None);
        }
        assert_eq!(b.state_name(), "open");
        assert_eq!(b.admit(), Admit::No);
        std::thread::sleep(Duration::from_millis(40));
        let Admit::Probe(p) = b.admit() else {
            panic!("a probe after open_for")
        };
        assert_eq!(b.admit(), Admit::No, "one probe at a time");
        b.record(false, Some(p));
        assert_eq!(b.state_name(), "open");
        std::thread::sleep(Duration::from_millis(40));
        let Admit::Probe(p) = b.admit() else {
            panic!("a probe after open_for")
        };
        b.record(true, Some(p));
        assert_eq!(b.state_name(), "closed");
        assert_eq!(b.admit(), Admit::Yes);
    }

    #[test]
    fn a_probe_without_verdict_is_replaced() {
        let b = breaker(1, None, 10);
        b.record(false, None);
        std::thread::sleep(Duration::from_millis(20));
        let Admit::Probe(first) = b.admit() else {
            panic!("probe")
        };
        // Abandoned (the client left): the next request probes at once.
        b.abandon(first);
        let Admit::Probe(second) = b.admit() else {
            panic!("probe after abandon")
        };
        assert_eq!(b.admit(), Admit::No);
        // A probe that holds on (a stream) is replaced after probe_timeout...
        std::thread::sleep(Duration::from_millis(60));
        let Admit::Probe(third) = b.admit() else {
            panic!("probe after probe_timeout")
        };
        // ...and a late verdict of the replaced one changes nothing.
        b.record(false, Some(second));
        assert_eq!(b.state_name(), "half_open");
        b.record(true, Some(third));
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn opens_on_error_ratio() {
        let b = breaker(0, Some(0.5), 1000);
        for i in 0..9 {
            b.record(i % 2 == 0, None);
        }
        assert_eq!(b.state_name(), "closed", "below min_requests");
        b.record(false, None);
        assert_eq!(b.state_name(), "open");
    }
}
