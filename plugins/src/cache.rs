//! Time for expiring cache entries. The caches themselves are `quick_cache`'s (bounded,
//! sharded by hash, CLOCK-Pro eviction); an entry carries its own expiry, checked on read.

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
