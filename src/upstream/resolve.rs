//! `resolve_every`: peers named by host name are looked up again in the background. A pool
//! whose addresses changed is rebuilt and swapped into the live snapshot alone; routes,
//! plugins and the other pools (with their health and breaker state) stay as they are. A name
//! that does not resolve keeps its last address.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::runtime::{Live, Runtime};

use super::Pool;

/// The snapshot with the pools that are due and whose names now resolve elsewhere rebuilt;
/// None when nothing changed. `due` holds when each pool is looked at next.
pub fn refreshed(
    rt: &Runtime,
    due: &mut HashMap<Arc<str>, Instant>,
    now: Instant,
    resolve: &dyn Fn(&str) -> Option<SocketAddr>,
) -> Option<Runtime> {
    let mut pools = rt.pools.clone();
    let mut changed = false;
    for (i, pool) in rt.pools.iter().enumerate() {
        let Some(every) = pool.cfg.resolve_every else {
            continue;
        };
        let next = due.entry(pool.name.clone()).or_insert(now + every);
        if now < *next {
            continue;
        }
        *next = now + every;
        let mut cfg = pool.cfg.clone();
        let mut moved = false;
        for p in &mut cfg.peers {
            if let Some(addr) = resolve(&p.name).filter(|a| *a != p.addr) {
                log::info!(
                    "upstream \"{}\": peer {} now resolves to {addr} (was {})",
                    pool.name,
                    p.name,
                    p.addr
                );
                p.addr = addr;
                moved = true;
            }
        }
        if !moved {
            continue;
        }
        match Pool::new(&cfg) {
            Ok(p) => {
                pools[i] = Arc::new(p);
                changed = true;
            }
            Err(e) => log::warn!("upstream \"{}\": keeping its peers: {e}", pool.name),
        }
    }
    changed.then(|| Runtime {
        pools,
        ..rt.clone()
    })
}

/// Looks names up, off the async runtime, once a second for the pools that are due; swaps in
/// a changed snapshot unless a reload replaced the snapshot meanwhile (the reload resolved
/// anew anyway).
pub async fn run(live: Live) {
    let mut due = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rt = live.load_full();
        if !rt.pools.iter().any(|p| p.cfg.resolve_every.is_some()) {
            continue;
        }
        let snapshot = rt.clone();
        let work = tokio::task::spawn_blocking(move || {
            let lookup = |name: &str| crate::config::values::resolve_first(name).ok().flatten();
            let new = refreshed(&snapshot, &mut due, Instant::now(), &lookup);
            (new, due)
        })
        .await;
        let Ok((new, back)) = work else {
            return;
        };
        due = back;
        if let Some(new) = new {
            let new = Arc::new(new);
            let prev = live.compare_and_swap(&rt, new.clone());
            if Arc::ptr_eq(&prev, &rt) {
                super::health::spawn_checks(&new.pools);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_moved_name_rebuilds_its_pool_alone() {
        let src = r#"
[upstreams.named]
peers = ["localhost:9001"]
resolve_every = "5s"
[upstreams.fixed]
peers = ["127.0.0.1:9002"]
[gateways.g]
listen = ["127.0.0.1:1"]
[[routes]]
upstream = "named"
"#;
        let cfg = crate::config::load_str(Path::new("t.toml"), src).unwrap();
        let rt = Runtime::build(&cfg, None).unwrap();
        let mut due = HashMap::new();
        let t0 = Instant::now();
        let moved: SocketAddr = "127.0.0.2:9001".parse().unwrap();
        let lookup = |_: &str| Some(moved);
        assert!(
            refreshed(&rt, &mut due, t0, &lookup).is_none(),
            "not due yet"
        );
        let new = refreshed(&rt, &mut due, t0 + Duration::from_secs(5), &lookup).unwrap();
        assert_eq!(new.pools[0].addr(0), moved);
        assert!(
            Arc::ptr_eq(&new.pools[1], &rt.pools[1]),
            "the other pool is kept"
        );
        assert_eq!(
            new.pools[0].host(0),
            "localhost:9001",
            "Host stays the name"
        );
        let same = |_: &str| Some(moved);
        let later = t0 + Duration::from_secs(10);
        assert!(
            refreshed(&new, &mut due, later, &same).is_none(),
            "unchanged"
        );
    }
}
