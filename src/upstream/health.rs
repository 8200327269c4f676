//! Active health checks: one task per pool that has a `health_check`, running a round of
//! Pingora's checks every `interval`. A task holds its pool weakly and ends when a reload
//! drops the pool, so checks follow the live config without a restart.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Pool;

/// Starts checks for every pool of `pools` that needs them and has none running yet.
/// Must be called from within a Tokio runtime that lives as long as the server (a
/// background service).
pub fn spawn_checks<'a>(pools: impl IntoIterator<Item = &'a Arc<Pool>>) {
    for pool in pools {
        let Some(hc) = pool.cfg.health_check.clone() else {
            continue;
        };
        if pool.checking.swap(true, Ordering::AcqRel) {
            continue;
        }
        let weak = Arc::downgrade(pool);
        tokio::spawn(async move {
            loop {
                let Some(pool) = weak.upgrade() else { return };
                pool.check_health().await;
                pool.checked.store(true, Ordering::Release);
                drop(pool);
                tokio::time::sleep(hc.interval).await;
            }
        });
    }
}
