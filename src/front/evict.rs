//! Overload without refusing good clients: at `max_connections`, a new connection is admitted
//! by closing one that is waiting for a request head, not by refusing the newcomer. Refusing
//! it (the old way) let 10,000 slowloris connections lock everyone else out until their
//! `header_timeout` ran out, eight seconds in a measured run; a client that comes to send a
//! request now always gets in, and the slowest of the waiting pay for it.
//!
//! Which one: of about 32 connections sampled at random (a full scan of 10,000 for every new
//! connection of an attack would cost more than the attack), the one that has waited longest
//! without sending a complete head (see `rank`). A connection with a request under way is
//! never chosen.
//!
//! The HTTP/1 connections are registered once each (not per request) in 64 small lists, each
//! behind its own lock, picked at random: a registration meets another on a lock only when
//! both picked the same list, for the few instructions of a push or a swap_remove.
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use super::{HeadClock, STARTED};
use crate::upstream::now_ms;

const SHARDS: usize = 64;
/// Connections looked at per eviction, and at most in each list.
const SAMPLE: usize = 32;
const SAMPLE_PER_SHARD: usize = 8;

pub struct Registry {
    shards: [Mutex<Vec<Arc<HeadClock>>>; SHARDS],
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: std::array::from_fn(|_| Mutex::new(Vec::new())),
        }
    }
}

/// A connection's place in the registry; it leaves when this is dropped.
pub struct Registered<'a> {
    of: &'a Registry,
    shard: usize,
    clock: Arc<HeadClock>,
}

impl Registry {
    pub fn register(&self, clock: &Arc<HeadClock>) -> Registered<'_> {
        let shard = gatehouse_plugins::random_u64() as usize % SHARDS;
        let mut list = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        clock.reg_slot.store(list.len(), Relaxed);
        list.push(clock.clone());
        Registered {
            of: self,
            shard,
            clock: clock.clone(),
        }
    }

    /// Asks the connection that waited longest for a head, among a sample, to close. Whether
    /// one was asked.
    pub fn evict_one(&self) -> bool {
        let now = now_ms();
        let mut best: Option<((u8, u64), Arc<HeadClock>)> = None;
        let first = gatehouse_plugins::random_u64() as usize;
        let mut seen = 0;
        // Lists from a random one on, until a sample's worth was looked at (or all, when the
        // connections are few).
        for i in 0..SHARDS {
            if seen >= SAMPLE {
                break;
            }
            let list = self.shards[first.wrapping_add(i) % SHARDS]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if list.is_empty() {
                continue;
            }
            let start = gatehouse_plugins::random_u64() as usize;
            let n = SAMPLE_PER_SHARD.min(list.len());
            seen += n;
            for j in 0..n {
                let c = &list[start.wrapping_add(j) % list.len()];
                let Some(rank) = rank(c, now) else { continue };
                if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                    best = Some((rank, c.clone()));
                }
            }
        }
        match best {
            Some((_, c)) => {
                c.evict.store(true, Relaxed);
                c.evict_waker.wake();
                true
            }
            None => false,
        }
    }
}

impl Registry {
    /// Asks every connection waiting for a head to close (the process is about to exit).
    pub fn evict_all(&self) {
        for shard in &self.shards {
            let list = shard.lock().unwrap_or_else(|p| p.into_inner());
            for c in list.iter() {
                if c.waiting.load(Relaxed) && !c.evict.load(Relaxed) {
                    c.evict.store(true, Relaxed);
                    c.evict_waker.wake();
                }
            }
        }
    }
}

/// How much a connection deserves to go (lower: sooner), `None` for one with a request under
/// way or already asked to go. A head is waited for since the connection opened (its first)
/// or since its first byte (a later one): one waited for a second or more goes first, the
/// longest waited first; then an idle keep-alive connection (its client reconnects without
/// a failed request); last, a head begun within the second, which may be a good client's
/// request on its way.
fn rank(c: &HeadClock, now: u64) -> Option<(u8, u64)> {
    if !c.waiting.load(Relaxed) || c.evict.load(Relaxed) {
        return None;
    }
    let since = match c.started.load(Relaxed) {
        _ if !c.had_request.load(Relaxed) => c.opened.load(Relaxed),
        0 => return Some((1, 0)),
        STARTED => now,
        t => t,
    };
    Some((
        if now.saturating_sub(since) >= 1000 {
            0
        } else {
            2
        },
        since,
    ))
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut list = self.of.shards[self.shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let at = self.clock.reg_slot.load(Relaxed);
        if at < list.len() && Arc::ptr_eq(&list[at], &self.clock) {
            list.swap_remove(at);
            if let Some(moved) = list.get(at) {
                moved.reg_slot.store(at, Relaxed);
            }
        }
    }
}
