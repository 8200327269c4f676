//! A small bounded cache of results, each valid until a unix time: verified tokens (keyed by
//! the token itself: exact, and cheaper to hash than a SHA-256 of it) and passwords (keyed by a
//! SHA-256, so no password is kept). Sharded so worker threads rarely meet on one lock; a full
//! shard drops its expired entries, and if still full, everything (the cost of a miss is one
//! more verification, never a wrong answer).
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

const SHARDS: usize = 16;

/// Picks a key's shard cheaply (the map hashes the key anyway).
pub trait ShardKey {
    fn shard(&self) -> usize;
}

impl ShardKey for [u8; 32] {
    fn shard(&self) -> usize {
        usize::from(self[0])
    }
}

impl ShardKey for str {
    /// A token's last bytes are its signature: as spread as any hash.
    fn shard(&self) -> usize {
        let b = self.as_bytes();
        b.len() ^ usize::from(b.last().copied().unwrap_or(0))
    }
}

impl ShardKey for Box<str> {
    fn shard(&self) -> usize {
        (**self).shard()
    }
}

type Shard<K, V> = Mutex<HashMap<K, (V, u64)>>;

pub struct ExpiringCache<K, V> {
    shards: Box<[Shard<K, V>]>,
    per_shard: usize,
}

impl<K: Hash + Eq + ShardKey, V: Clone> ExpiringCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        ExpiringCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    /// The value under `key` if it is still valid at `now`.
    pub fn get<Q>(&self, key: &Q, now: u64) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ShardKey + ?Sized,
    {
        let s = self.shards[key.shard() % SHARDS].lock().ok()?;
        s.get(key)
            .filter(|(_, until)| now < *until)
            .map(|(v, _)| v.clone())
    }

    pub fn insert(&self, key: K, value: V, until: u64, now: u64) {
        let Ok(mut s) = self.shards[key.shard() % SHARDS].lock() else {
            return;
        };
        if s.len() >= self.per_shard {
            s.retain(|_, (_, u)| *u > now);
            if s.len() >= self.per_shard {
                s.clear();
            }
        }
        s.insert(key, (value, until));
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_and_stays_bounded() {
        let c: ExpiringCache<[u8; 32], &str> = ExpiringCache::new(32);
        c.insert([1; 32], "a", 100, 0);
        assert_eq!(c.get(&[1; 32], 99), Some("a"));
        assert_eq!(c.get(&[1; 32], 100), None);
        for i in 0..=255u8 {
            let mut k = [i; 32];
            k[0] = 1;
            c.insert(k, "x", 1000, 0);
        }
        assert!(c.shards[1].lock().unwrap().len() <= 2);
    }
}
