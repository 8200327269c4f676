//! Upstream pools: a `pingora-load-balancing` balancer over the configured peers, and the peer
//! options (timeouts, TLS) every request to the pool uses.
use std::collections::BTreeSet;
use std::sync::Arc;

use futures::FutureExt;
use pingora::upstreams::peer::HttpPeer;
use pingora_load_balancing::discovery::Static;
use pingora_load_balancing::selection::{BackendIter, BackendSelection, Random, RoundRobin};
use pingora_load_balancing::{Backend, Backends, LoadBalancer};

use crate::config::{Selection, Upstream};

/// How far a selection may look past unusable peers before giving up.
const MAX_SELECT_ITERATIONS: usize = 256;

enum Selector {
    RoundRobin(LoadBalancer<RoundRobin>),
    Random(LoadBalancer<Random>),
}

pub struct Pool {
    pub name: Arc<str>,
    selector: Selector,
    peer_count: usize,
    tls: bool,
    sni: String,
    connect_timeout: std::time::Duration,
    read_timeout: std::time::Duration,
    write_timeout: std::time::Duration,
    idle_timeout: std::time::Duration,
}

fn balancer<S>(backends: BTreeSet<Backend>) -> Result<LoadBalancer<S>, String>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    let lb = LoadBalancer::<S>::from_backends(Backends::new(Static::new(backends)));
    // Static discovery answers at once; nothing here waits on I/O.
    match lb.update().now_or_never() {
        Some(Ok(())) => Ok(lb),
        Some(Err(e)) => Err(format!("building the peer set: {e}")),
        None => Err("building the peer set did not complete".into()),
    }
}

impl Pool {
    pub fn new(cfg: &Upstream) -> Result<Pool, String> {
        let backends: BTreeSet<Backend> = cfg
            .peers
            .iter()
            .map(|p| Backend {
                addr: pingora::protocols::l4::socket::SocketAddr::Inet(p.addr),
                weight: p.weight,
                ext: Default::default(),
            })
            .collect();
        let selector = match cfg.selection {
            Selection::RoundRobin => Selector::RoundRobin(balancer(backends)?),
            Selection::Random => Selector::Random(balancer(backends)?),
        };
        Ok(Pool {
            name: cfg.name.as_str().into(),
            selector,
            peer_count: cfg.peers.len(),
            tls: cfg.tls,
            sni: cfg.sni.clone(),
            connect_timeout: cfg.connect_timeout,
            read_timeout: cfg.read_timeout,
            write_timeout: cfg.write_timeout,
            idle_timeout: cfg.idle_timeout,
        })
    }

    pub fn peer_count(&self) -> usize {
        self.peer_count
    }

    pub fn tls(&self) -> bool {
        self.tls
    }

    pub fn connect_timeout(&self) -> std::time::Duration {
        self.connect_timeout
    }

    pub fn read_timeout(&self) -> std::time::Duration {
        self.read_timeout
    }

    pub fn write_timeout(&self) -> std::time::Duration {
        self.write_timeout
    }

    fn select_backend(&self, key: &[u8]) -> Option<Backend> {
        match &self.selector {
            Selector::RoundRobin(lb) => lb.select(key, MAX_SELECT_ITERATIONS),
            Selector::Random(lb) => lb.select(key, MAX_SELECT_ITERATIONS),
        }
    }

    /// Picks a peer address, for callers that connect themselves (upgrade tunnels).
    pub fn select_addr(&self, key: &[u8]) -> Option<std::net::SocketAddr> {
        self.select_backend(key)?.addr.as_inet().copied()
    }

    /// Picks a peer for one try; `None` when the pool has no usable peer.
    pub fn select(&self, key: &[u8]) -> Option<Box<HttpPeer>> {
        let backend = self.select_backend(key)?;
        let mut peer = HttpPeer::new(&backend, self.tls, self.sni.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.connect_timeout);
        o.read_timeout = Some(self.read_timeout);
        o.write_timeout = Some(self.write_timeout);
        o.idle_timeout = Some(self.idle_timeout);
        Some(Box::new(peer))
    }
}
