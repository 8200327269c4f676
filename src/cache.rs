//! The response cache: Pingora's `HttpCache` (its cache lock, its size-weighted LRU
//! eviction, its cacheability predictor) over an in-memory [`Store`] of ours, with an RFC 9111
//! storability and freshness policy ([`policy`]) and purge by URL or tag.
//!
//! Why our own store: pingora-cache's `MemCache` is marked test-only (one lock over the whole
//! map, the body copied on every hit). Here entries sit in Pingora's sharded hash table, a hit
//! hands out the stored `Bytes` without copying, and two small indexes (URL → entries, tag →
//! entries) make purges exact. The indexes take a lock, but only on fills and purges, never on
//! hits.
//!
//! The key is the gateway, scheme, host, path and query (HEAD is served from the stored GET;
//! only GET and HEAD are cached), plus the values of the request headers the stored response
//! names in `Vary` (Pingora's variance key).
use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_cache::eviction::{lru, CacheEntryKey, CacheEntryKeyRef, EvictionManager};
use pingora_cache::hashtable::ConcurrentHashTable;
use pingora_cache::key::{CacheHashKey, CacheKey, CompactCacheKey};
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::predictor::Predictor;
use pingora_cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType, Storage,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheMeta, CachePhase, NoCacheReason};
use pingora_error::Result;
use pingora_http::ResponseHeader;

pub mod policy;
mod targeted;

/// Shards of the entry table: enough that two workers seldom meet on one.
const SHARDS: usize = 32;

/// The one store, eviction manager, predictor and lock of the process: pingora-cache wants
/// them `'static`. The memory bound is set from `[server] cache_size` at start and reload.
pub static STORE: LazyLock<Store> = LazyLock::new(Store::default);
pub static EVICTION: LazyLock<lru::Manager<SHARDS>> =
    LazyLock::new(|| lru::Manager::with_capacity(256 << 20, 1024));
/// Remembers URLs whose responses were not storable, so their requests skip the lookup and
/// the lock. Reasons that depend on the request (credentials) are not remembered: one
/// client's `Authorization` must not turn caching off for everyone else.
pub static PREDICTOR: LazyLock<Predictor<SHARDS>> = LazyLock::new(|| {
    Predictor::new(
        4096,
        Some(|reason| reason == policy::AUTHORIZED || reason == policy::BYPASS),
    )
});
/// A fill may hold a key this long before waiting requests stop trusting it; each route's
/// `lock_timeout` bounds how long they wait.
pub static LOCK: LazyLock<Box<CacheKeyLockImpl>> =
    LazyLock::new(|| CacheLock::new_boxed(Duration::from_secs(30)));

pub fn set_size(bytes: usize) {
    EVICTION.set_weight_limit(bytes);
}

/// What `x-cache-status` says, from the request's final cache phase.
pub fn status(phase: CachePhase) -> Option<&'static str> {
    Some(match phase {
        CachePhase::Hit => "HIT",
        CachePhase::Miss => "MISS",
        CachePhase::Expired => "EXPIRED",
        CachePhase::Stale => "STALE",
        CachePhase::StaleUpdating => "UPDATING",
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => "REVALIDATED",
        CachePhase::Bypass => "BYPASS",
        CachePhase::Disabled(NoCacheReason::NeverEnabled) => return None,
        CachePhase::Disabled(NoCacheReason::Custom(r)) if r == policy::BYPASS => "BYPASS",
        // Went upstream and stored nothing: a miss, as nginx says for an uncacheable answer.
        CachePhase::Disabled(_) => "MISS",
        CachePhase::Uninit | CachePhase::CacheKey => return None,
    })
}

/// The metadata of an entry, kept as fields rather than Pingora's serialized form, so a hit
/// rebuilds it with a header clone instead of a decompression and a parse.
struct Meta {
    fresh_until: SystemTime,
    created: SystemTime,
    /// Where age counts from: admission or the last revalidation, minus the age the
    /// response already had when it arrived (RFC 9111 §4.2.3).
    epoch: SystemTime,
    swr: u32,
    sie: u32,
    variance: Option<[u8; 16]>,
    header: ResponseHeader,
}

impl Meta {
    fn of(m: &CacheMeta) -> Meta {
        Meta {
            fresh_until: m.fresh_until(),
            created: m.created(),
            epoch: m.epoch(),
            swr: m.stale_while_revalidate_sec(),
            sie: m.stale_if_error_sec(),
            variance: m.variance(),
            header: without_case(m.response_header()),
        }
    }

    fn to_meta(&self) -> CacheMeta {
        let mut m = CacheMeta::new(
            self.fresh_until,
            self.created,
            self.swr,
            self.sie,
            self.header.clone(),
        );
        m.set_epoch_override(self.epoch);
        if let Some(v) = self.variance {
            m.set_variance(v);
        }
        m
    }
}

/// The head without its record of how the upstream spelled each name: every hit clones the
/// head twice (here and in Pingora), and the spelling map doubled that work. Hits go out with
/// lower-case names, as HTTP/2 ones do; names are case-insensitive (RFC 9110 §5.1).
fn without_case(h: &ResponseHeader) -> ResponseHeader {
    let Ok(mut out) = ResponseHeader::build_no_case(h.status, Some(h.headers.len())) else {
        return h.clone();
    };
    for (name, value) in h.headers.iter() {
        if out.append_header(name.clone(), value.clone()).is_err() {
            return h.clone();
        }
    }
    out.set_version(h.version);
    out
}

/// What a fill is indexed by for purges, put in the meta's extensions when a response is
/// found storable (so hits never build it): its URL (`scheme://host/path?query`) and the
/// tags of the route's tag header.
#[derive(Clone, Debug, Default)]
pub struct Tags {
    pub url: Box<str>,
    pub tags: Vec<Box<str>>,
}

struct Entry {
    meta: Meta,
    body: Bytes,
    key: CompactCacheKey,
    url: Box<str>,
    tags: Vec<Box<str>>,
    /// What the LRU was told the entry weighs.
    weight: usize,
}

#[derive(Default)]
struct Index {
    by_url: HashMap<Box<str>, HashSet<u128>>,
    by_tag: HashMap<Box<str>, HashSet<u128>>,
}

#[derive(Default)]
pub struct Store {
    entries: ConcurrentHashTable<Arc<Entry>, SHARDS>,
    /// Taken before an entry shard on every insert and removal, so the two never disagree;
    /// hits take only their shard's read lock.
    index: Mutex<Index>,
    /// Purges so far: a fill that began before one is not stored (it may hold what was just
    /// purged).
    purges: AtomicU64,
    /// Bytes held by fills in flight, all routes together; bounded by the cache size.
    filling: AtomicUsize,
}

fn id(bin: [u8; 16]) -> u128 {
    u128::from_be_bytes(bin)
}

impl Store {
    fn insert(&self, entry: Entry) {
        let key = id(entry.key.combined_bin());
        let entry = Arc::new(entry);
        let mut ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.entries.write(key).insert(key, entry.clone());
        if let Some(old) = old {
            unindex(&mut ix, key, &old);
        }
        ix.by_url.entry(entry.url.clone()).or_default().insert(key);
        for t in &entry.tags {
            ix.by_tag.entry(t.clone()).or_default().insert(key);
        }
    }

    fn remove(&self, key: u128) -> Option<Arc<Entry>> {
        let mut ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.entries.write(key).remove(&key)?;
        unindex(&mut ix, key, &old);
        Some(old)
    }

    /// Drops every entry of `url` (the `scheme://host/path?query` the key was made from),
    /// all variants, in every gateway; returns how many.
    pub fn purge_url(&self, url: &str) -> usize {
        let keys: Vec<u128> = {
            let ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
            ix.by_url
                .get(url)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default()
        };
        self.drop_all(&keys)
    }

    /// Drops every entry whose response carried `tag`; returns how many.
    pub fn purge_tag(&self, tag: &str) -> usize {
        let keys: Vec<u128> = {
            let ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
            ix.by_tag
                .get(tag)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default()
        };
        self.drop_all(&keys)
    }

    /// Drops every entry (a replica that may have missed a purge); returns how many.
    pub fn purge_all(&self) -> usize {
        let keys: Vec<u128> = {
            let ix = self.index.lock().unwrap_or_else(|p| p.into_inner());
            ix.by_url.values().flat_map(|s| s.iter().copied()).collect()
        };
        self.drop_all(&keys)
    }

    fn drop_all(&self, keys: &[u128]) -> usize {
        self.purges.fetch_add(1, Ordering::SeqCst);
        let mut n = 0;
        for k in keys {
            if let Some(e) = self.remove(*k) {
                EVICTION.remove(CacheEntryKeyRef::KeyOnly(&e.key));
                n += 1;
            }
        }
        n
    }

    pub fn len(&self) -> usize {
        let mut n = 0;
        self.entries.for_each(|_, _| n += 1);
        n
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn unindex(ix: &mut Index, key: u128, e: &Entry) {
    if let Some(set) = ix.by_url.get_mut(&e.url) {
        set.remove(&key);
        if set.is_empty() {
            ix.by_url.remove(&e.url);
        }
    }
    for t in &e.tags {
        if let Some(set) = ix.by_tag.get_mut(t) {
            set.remove(&key);
            if set.is_empty() {
                ix.by_tag.remove(t);
            }
        }
    }
}

/// A hit: the stored body, or the part of it a range asked for, in one piece.
struct Hit {
    body: Bytes,
    start: usize,
    end: usize,
    done: bool,
    weight: usize,
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        // The whole body: handed over as is (one reference count less per hit).
        if self.start == 0 && self.end == self.body.len() {
            return Ok(Some(std::mem::take(&mut self.body)));
        }
        Ok(Some(self.body.slice(self.start..self.end)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        // After a whole read the body is gone; Pingora seeks before reading, never after.
        if start >= self.body.len() {
            return pingora_error::Error::e_explain(
                pingora_error::ErrorType::InternalError,
                "seek past the end of a cached body",
            );
        }
        self.start = start;
        self.end = end.map_or(self.body.len(), |e| e.min(self.body.len()));
        self.done = false;
        Ok(())
    }

    /// The admitted weight: a hit that (re)admits its key to the LRU counts what was stored.
    fn get_eviction_weight(&self) -> usize {
        self.weight
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// A fill: the body gathers here and the entry appears whole at `finish`, so a lookup never
/// sees half a response (waiting requests are held by the cache lock meanwhile).
struct Fill {
    store: &'static Store,
    key: CompactCacheKey,
    meta: Option<Meta>,
    url: Box<str>,
    tags: Vec<Box<str>>,
    body: BytesMut,
    /// `Store::purges` when the fill began.
    purges: u64,
}

impl Drop for Fill {
    fn drop(&mut self) {
        self.store
            .filling
            .fetch_sub(self.body.len(), Ordering::Relaxed);
    }
}

#[async_trait]
impl HandleMiss for Fill {
    /// Fills in flight hold their bodies outside the cache's bound until they finish; past
    /// that bound in all, a fill gives up (the client still gets its answer, uncached).
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        let held = self.store.filling.fetch_add(data.len(), Ordering::Relaxed) + data.len();
        if held > EVICTION.weight_limit() {
            self.store.filling.fetch_sub(data.len(), Ordering::Relaxed);
            return pingora_error::Error::e_explain(
                pingora_error::ErrorType::InternalError,
                "responses being cached hold more than cache_size: not caching this one",
            );
        }
        self.body.extend_from_slice(&data);
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        let Some(meta) = self.meta.take() else {
            return pingora_error::Error::e_explain(
                pingora_error::ErrorType::InternalError,
                "cache fill finished twice",
            );
        };
        // The weight counts the head, the URL (kept in the key, the purge index and the LRU)
        // and the tags too: many small answers must not slip under the bound.
        let head: usize = meta
            .header
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        let tags: usize = self.tags.iter().map(|t| 2 * t.len() + 64).sum();
        let body = std::mem::take(&mut self.body);
        self.store.filling.fetch_sub(body.len(), Ordering::Relaxed);
        let body = body.freeze();
        let size = body.len() + head + 2 * self.url.len() + tags + 512;
        if self.store.purges.load(Ordering::SeqCst) != self.purges {
            // A purge ran while this was fetched: what it holds may be what was purged.
            return Ok(MissFinishType::Created(0));
        }
        self.store.insert(Entry {
            meta,
            body,
            key: self.key.clone(),
            url: std::mem::take(&mut self.url),
            tags: std::mem::take(&mut self.tags),
            weight: size,
        });
        Ok(MissFinishType::Created(size))
    }
}

#[async_trait]
impl Storage for Store {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let k = id(key.combined_bin());
        let Some(e) = self.entries.read(k).get(&k).cloned() else {
            return Ok(None);
        };
        let hit = Hit {
            body: e.body.clone(),
            start: 0,
            end: e.body.len(),
            done: false,
            weight: e.weight,
        };
        Ok(Some((e.meta.to_meta(), Box::new(hit))))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let Tags { url, tags } = meta.extensions().get::<Tags>().cloned().unwrap_or_default();
        // Preallocated when the length is known, bounded by what the cache could hold.
        let capacity = meta
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(1 << 20);
        Ok(Box::new(Fill {
            store: self,
            key: key.to_compact(),
            meta: Some(Meta::of(meta)),
            url,
            tags,
            body: BytesMut::with_capacity(capacity),
            purges: self.purges.load(Ordering::SeqCst),
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _kind: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let key = match target {
            PurgeTarget::Active(k) => k,
            PurgeTarget::Exact(CacheEntryKey::KeyOnly(k)) => k,
            // This store never names entries by id: an identified entry is not one of ours.
            PurgeTarget::Exact(CacheEntryKey::Identified { .. }) => {
                return Ok(PurgeOutcome::NotFound)
            }
        };
        Ok(match self.remove(id(key.combined_bin())) {
            Some(_) => PurgeOutcome::Purged(None),
            None => PurgeOutcome::NotFound,
        })
    }

    /// A 304 refreshed the entry: same body, new head and freshness. Gone meanwhile (evicted,
    /// purged) is not an error.
    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let k = id(key.combined_bin());
        let mut shard = self.entries.write(k);
        let Some(old) = shard.get(&k).cloned() else {
            return Ok(false);
        };
        // The 304 refreshed the head of the entry that was looked up (Pingora gives the new
        // meta that entry's creation time); if another fill replaced it meanwhile, that head
        // is not this body's. And §4.3.4: a 304 whose ETag is not the stored one's updates
        // no stored response (it validated another representation).
        let etag = |h: &http::HeaderMap| h.get(http::header::ETAG).cloned();
        if meta.created() != old.meta.created
            || etag(meta.headers()) != etag(&old.meta.header.headers)
        {
            return Ok(false);
        }
        if meta
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != old.body.len().to_string().as_bytes())
        {
            return Ok(false);
        }
        let fresh = Arc::new(Entry {
            meta: Meta::of(meta),
            body: old.body.clone(),
            key: old.key.clone(),
            url: old.url.clone(),
            tags: old.tags.clone(),
            weight: old.weight,
        });
        shard.insert(k, fresh);
        Ok(true)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}
