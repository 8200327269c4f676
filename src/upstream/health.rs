//! Active health checks: one task per pool that has a `health_check`, running a round of
//! Pingora's checks every `interval`. A task holds its pool weakly and ends when a reload
//! drops the pool, so checks follow the live config without a restart. Peers of different
//! names get one check each ([`ByPeer`]).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck};
use pingora_load_balancing::Backend;

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

/// HTTP checks of peers with different names, one per peer, each with its own SNI, verified
/// name and Host (Pingora's check sends every peer the first one's).
pub struct ByPeer {
    checks: HashMap<SocketAddr, HttpHealthCheck>,
    healthy_after: usize,
    unhealthy_after: usize,
}

impl ByPeer {
    pub fn new(
        checks: HashMap<SocketAddr, HttpHealthCheck>,
        healthy_after: usize,
        unhealthy_after: usize,
    ) -> ByPeer {
        ByPeer {
            checks,
            healthy_after,
            unhealthy_after,
        }
    }
}

#[async_trait]
impl HealthCheck for ByPeer {
    async fn check(&self, target: &Backend) -> pingora_error::Result<()> {
        match target.addr.as_inet().and_then(|a| self.checks.get(a)) {
            Some(c) => c.check(target).await,
            // Backends are the pool's peers: none is missing, unless the set changed under us.
            None => pingora_error::Error::e_explain(
                pingora_error::ErrorType::InternalError,
                "health check: not a peer of this pool",
            ),
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        if success {
            self.healthy_after
        } else {
            self.unhealthy_after
        }
    }
}
