//! Shared stores: counting that several replicas of the gateway do together.
//!
//! The engine is outside this crate (the core talks to Redis); a plugin sees only
//! [`SharedCounter`], so it does not care whether the store is one Redis, a Sentinel set or a
//! Cluster, nor how connections are kept. A store that cannot answer within its timeout says
//! so at once ([`StoreUnavailable`]) and the plugin applies its own `on_store_error` policy:
//! the request path never waits on a store longer than the store's timeout.
use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

/// One sliding-window rule, the same the local limiter applies: at most `limit` in any
/// `period_ms`, and at most `slice_limit` (thousandths) in any `slice_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRule {
    pub period_ms: u64,
    pub limit: u64,
    pub slice_ms: u64,
    /// In thousandths: a slice's allowance is `rate / slices + burst`, not always whole.
    pub slice_limit_milli: u64,
}

/// What the store decided for one hit (or for a batch of hits, in approximate mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedVerdict {
    /// The hits were counted: room was left.
    pub ok: bool,
    /// What is left of the period's allowance after these hits (0 when refused).
    pub remaining: u64,
    /// Refused: milliseconds until the key has room again. Counted: until the period's
    /// window moves (what `RateLimit-Reset` reports).
    pub retry_ms: u64,
    /// The key's count over the period as the store sees it now (sliding estimate).
    pub count: u64,
    /// The same over the slice.
    pub slice_count: u64,
}

/// The store did not answer in time, or is known to be down (then no I/O was tried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreUnavailable;

/// A counting engine several replicas share.
#[async_trait]
pub trait SharedCounter: Send + Sync {
    /// The store's name in the config (`[stores.NAME]`).
    fn name(&self) -> &str;

    /// Counts `hits` against `key` if the rule leaves room for them (`force`: counts them
    /// anyway: hits a replica already let through in approximate mode). Atomic on the store's
    /// side; one round trip at most.
    async fn hit(
        &self,
        key: &[u8],
        rule: &WindowRule,
        hits: u64,
        force: bool,
    ) -> Result<SharedVerdict, StoreUnavailable>;
}

/// What building a plugin may need besides its own config.
#[derive(Default, Clone)]
pub struct BuildEnv {
    /// The plugin's name in the config: shared keys are made of it, so every replica with
    /// the same config counts under the same names.
    pub name: String,
    /// The configured stores, by name (`[stores.NAME]`).
    pub stores: HashMap<String, Arc<dyn SharedCounter>>,
    /// `gatehouse_rate_limit_fallbacks_total{plugin}` for this plugin.
    pub fallbacks: Option<prometheus::IntCounter>,
}
