//! Retry budget: retries may add at most `percent`% to an upstream's request rate, so a failing
//! upstream is not hammered by retries (as Envoy's and Finagle's budgets). Each request deposits
//! `percent`/100 of a retry; each retry withdraws one. A small reserve lets a quiet upstream
//! still retry.
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

/// Retries are counted in thousandths.
const ONE: i64 = 1000;
/// At most this many retries can be saved up.
const RESERVE: i64 = 10 * ONE;

pub struct RetryBudget {
    per_request: i64,
    tokens: AtomicI64,
}

impl RetryBudget {
    pub fn new(percent: u32) -> RetryBudget {
        RetryBudget {
            per_request: i64::from(percent) * ONE / 100,
            tokens: AtomicI64::new(RESERVE),
        }
    }

    pub fn deposit(&self) {
        if self.tokens.load(Relaxed) < RESERVE {
            self.tokens.fetch_add(self.per_request, Relaxed);
        }
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.tokens
            .fetch_update(Relaxed, Relaxed, |t| (t >= ONE).then_some(t - ONE))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_limits_retries_to_a_share_of_requests() {
        let b = RetryBudget::new(20);
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                retries += 1;
            }
        }
        // 20% of 1000 plus the reserve of 10.
        assert!((200..=211).contains(&retries), "{retries}");
    }
}
