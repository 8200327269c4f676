//! A Pingora `ProxyHttp` that forwards every request to one upstream and does nothing else:
//! the ceiling Gatehouse is measured against in `load-tests/run.sh`. Same Pingora version,
//! allocator and release profile as Gatehouse, so the difference is the gateway layer.
//!
//! Usage: bare-pingora LISTEN UPSTREAM [THREADS]
use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Forward {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _s: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2).and_then(|u| u.parse().ok()))
    else {
        eprintln!("usage: bare-pingora LISTEN UPSTREAM [THREADS]");
        std::process::exit(2);
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let tmp = std::env::temp_dir();
    let id = std::process::id();
    let conf = ServerConf {
        threads,
        upstream_keepalive_pool_size: 256,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: tmp
            .join(format!("bare-pingora-{id}.pid"))
            .display()
            .to_string(),
        upgrade_sock: tmp
            .join(format!("bare-pingora-{id}.sock"))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora_proxy::http_proxy_service(&server.configuration, Forward { upstream });
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever();
}
