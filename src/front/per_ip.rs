//! `max_connections_per_ip`: how many connections one client address may hold on a gateway.
//!
//! Counted where connections are admitted (not per request): one counter per address in one
//! of 64 small maps picked by the address's hash, so two connections meet on a lock only when
//! their addresses share a shard, for the few instructions of a map update. IPv6 clients are
//! counted per /64 (a host usually has the whole /64), IPv4 ones one by one. Behind a load
//! balancer every connection comes from the balancer: leave it off there (the counted address
//! is the connection's peer, never a header's).
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;

/// The address a connection counts under: the rate limiter's (IPv6 per /64).
use gatehouse_plugins::rate_limit::per_site;

const SHARDS: usize = 64;

pub struct PerIp {
    shards: [Mutex<HashMap<IpAddr, u32>>; SHARDS],
}

impl Default for PerIp {
    fn default() -> Self {
        PerIp {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

impl PerIp {
    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ip.hash(&mut h);
        &self.shards[h.finish() as usize % SHARDS]
    }

    /// Takes one of `ip`'s `max` connections, or `None` when it holds them all.
    pub fn admit(&self, ip: IpAddr, max: usize) -> Option<IpSlot<'_>> {
        let ip = per_site(ip);
        let mut m = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n as usize >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot { of: self, ip })
    }

    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> u32 {
        let ip = per_site(ip);
        let m = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        m.get(&ip).copied().unwrap_or(0)
    }
}

/// One connection of an address; given back when dropped (an address with none is removed,
/// so the maps hold only the addresses connected now).
pub struct IpSlot<'a> {
    of: &'a PerIp,
    ip: IpAddr,
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let mut m = self
            .of
            .shard(&self.ip)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_address_and_per_64() {
        let p = PerIp::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = p.admit(a, 2).unwrap();
        let _s2 = p.admit(a, 2).unwrap();
        assert!(p.admit(a, 2).is_none(), "a third from the same address");
        assert!(p.admit(b, 2).is_some(), "another address has its own");
        drop(s1);
        assert!(p.admit(a, 2).is_some(), "one given back");
        let x: IpAddr = "2001:db8::1".parse().unwrap();
        let y: IpAddr = "2001:db8::ffff".parse().unwrap();
        let _x = p.admit(x, 1).unwrap();
        assert!(p.admit(y, 1).is_none(), "one /64");
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        let _m = p.admit(mapped, 1).unwrap();
        assert!(
            p.admit("10.0.0.9".parse().unwrap(), 1).is_none(),
            "mapped is IPv4"
        );
        drop(_m);
        assert_eq!(p.held("10.0.0.9".parse().unwrap()), 0);
    }
}
