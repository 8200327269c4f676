//! A small bounded cache of results keyed by a SHA-256, each valid until a unix time: verified
//! tokens and passwords. Sharded by the key's first byte so worker threads rarely meet on one
//! lock; a full shard drops its expired entries, and if still full, everything (the cost of a
//! miss is one more verification, never a wrong answer).
use std::collections::HashMap;
use std::sync::Mutex;

const SHARDS: usize = 16;

type Shard<V> = Mutex<HashMap<[u8; 32], (V, u64)>>;

pub struct ExpiringCache<V> {
    shards: Box<[Shard<V>]>,
    per_shard: usize,
}

impl<V: Clone> ExpiringCache<V> {
    pub fn new(capacity: usize) -> Self {
        ExpiringCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, key: &[u8; 32]) -> &Shard<V> {
        &self.shards[usize::from(key[0]) % SHARDS]
    }

    /// The value under `key` if it is still valid at `now`.
    pub fn get(&self, key: &[u8; 32], now: u64) -> Option<V> {
        let s = self.shard(key).lock().ok()?;
        s.get(key)
            .filter(|(_, until)| now < *until)
            .map(|(v, _)| v.clone())
    }

    pub fn insert(&self, key: [u8; 32], value: V, until: u64, now: u64) {
        let Ok(mut s) = self.shard(&key).lock() else {
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
        let c = ExpiringCache::new(32);
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
