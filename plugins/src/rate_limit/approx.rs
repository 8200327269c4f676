//! Approximate mode (`sync_every`): counted here, told to the store every interval.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::{SharedCounter, WindowRule};

use super::Key;

/// Approximate mode: each key counts here on top of what the store said at the last sync;
/// a task sends the counts every `every` and takes the fleet's totals back.
pub(super) struct Approx {
    store: Arc<dyn SharedCounter>,
    rule: WindowRule,
    pub(super) every: Duration,
    /// `replicas`: between syncs, each replica assumes the others let through as many as it.
    share: u64,
    keys: quick_cache::sync::Cache<u64, Arc<Counted>>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last sync the store answered.
    synced: AtomicU64,
    running: std::sync::atomic::AtomicBool,
}

/// One key in approximate mode.
struct Counted {
    store_key: Vec<u8>,
    /// Let through here since the last sync.
    pending: AtomicU64,
    /// The fleet's counts at the last sync: the period's, the slice's.
    period: AtomicU64,
    slice: AtomicU64,
    /// Asked about since the last sync: its totals are worth fetching again.
    touched: std::sync::atomic::AtomicBool,
}

impl Approx {
    pub(super) fn new(
        store: Arc<dyn SharedCounter>,
        rule: WindowRule,
        every: Duration,
        share: u64,
        capacity: usize,
    ) -> Approx {
        Approx {
            store,
            rule,
            every,
            share,
            keys: quick_cache::sync::Cache::new(capacity),
            epoch: Instant::now(),
            synced: AtomicU64::new(0),
            running: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the last sync is recent enough to decide on (else the store counts as down).
    fn fresh(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        now.saturating_sub(self.synced.load(Ordering::Relaxed))
            <= 3 * self.every.as_millis() as u64 + self.rule.period_ms.min(1000)
    }

    pub(super) fn decide(
        self: &Arc<Self>,
        key: &Key<'_>,
        hash: u64,
        prefix: &[u8],
    ) -> Option<(bool, u64)> {
        if !self.running.swap(true, Ordering::Relaxed) {
            let weak = Arc::downgrade(self);
            tokio::spawn(sync_loop(weak));
        }
        if !self.fresh() {
            return None;
        }
        let c = self
            .keys
            .get_or_insert_with(&hash, || {
                Ok::<_, ()>(Arc::new(Counted {
                    store_key: key.store_key(prefix),
                    pending: AtomicU64::new(0),
                    period: AtomicU64::new(0),
                    slice: AtomicU64::new(0),
                    touched: std::sync::atomic::AtomicBool::new(false),
                }))
            })
            .ok()?;
        if !c.touched.load(Ordering::Relaxed) {
            c.touched.store(true, Ordering::Relaxed);
        }
        let (known, known_slice) = (
            c.period.load(Ordering::Relaxed),
            c.slice.load(Ordering::Relaxed),
        );
        let room = |pending: u64| {
            let p = pending * self.share;
            known + p < self.rule.limit && (known_slice + p) * 1000 < self.rule.slice_limit_milli
        };
        // Checked and counted in one step: concurrent requests cannot both take the last room.
        let counted = c
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                room(p).then_some(p + 1)
            });
        let pending = match counted {
            Ok(p) | Err(p) => p * self.share,
        };
        Some((
            counted.is_ok(),
            self.rule.limit.saturating_sub(known + pending + 1),
        ))
    }

    /// One sync: every key with counts to send or asked about since the last, 32 at a time.
    async fn sync(&self) {
        let keys: Vec<Arc<Counted>> = self
            .keys
            .iter()
            .map(|(_, c)| c)
            // Keys with counts to send, or asked about since (a refused key learns when its
            // window has moved); others cost nothing.
            .filter(|c| {
                c.touched.swap(false, Ordering::Relaxed) || c.pending.load(Ordering::Relaxed) > 0
            })
            .collect();
        let mut answered = keys.is_empty();
        for chunk in keys.chunks(32) {
            let calls = chunk.iter().map(|c| async move {
                let n = c.pending.swap(0, Ordering::Relaxed);
                match self.store.hit(&c.store_key, &self.rule, n, true).await {
                    Ok(v) => {
                        c.period.store(v.count, Ordering::Relaxed);
                        c.slice.store(v.slice_count, Ordering::Relaxed);
                        true
                    }
                    Err(_) => {
                        // Sent again next time.
                        c.pending.fetch_add(n, Ordering::Relaxed);
                        false
                    }
                }
            });
            for ok in futures::future::join_all(calls).await {
                answered |= ok;
            }
        }
        if answered {
            self.synced
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
}

async fn sync_loop(weak: std::sync::Weak<Approx>) {
    loop {
        let Some(a) = weak.upgrade() else { return };
        let every = a.every;
        a.sync().await;
        drop(a);
        tokio::time::sleep(every).await;
    }
}
