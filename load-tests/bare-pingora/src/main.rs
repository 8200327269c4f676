//! A Pingora `ProxyHttp` that forwards every request to one upstream and does nothing else:
//! the ceiling Gatehouse is measured against in `load-tests/run.sh`. Same Pingora version,
//! allocator and release profile as Gatehouse, so the difference is the gateway layer.
//!
//! Usage: bare-pingora LISTEN UPSTREAM [THREADS] [--gateway-work]
//!
//! `--gateway-work` adds what any gateway on Pingora must do per request and costs through
//! Pingora's API alone: Host set to the peer, X-Forwarded-For/-Proto/-Host inserted, connect,
//! read, write and idle timeouts on the peer. Against it, the difference to Gatehouse is the
//! gateway layer itself (routing, selection, plugins chain, context), not header or timer cost.
use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Forward {
    upstream: SocketAddr,
    gateway_work: bool,
    host: http::HeaderValue,
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
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        if self.gateway_work {
            let o = &mut peer.options;
            o.connection_timeout = Some(Duration::from_secs(5));
            o.read_timeout = Some(Duration::from_secs(60));
            o.write_timeout = Some(Duration::from_secs(60));
            o.idle_timeout = Some(Duration::from_secs(60));
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        _ctx: &mut (),
    ) -> pingora::Result<()> {
        if !self.gateway_work {
            return Ok(());
        }
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let host = req.headers.get(http::header::HOST).cloned();
        req.insert_header(http::header::HOST, self.host.clone())?;
        req.insert_header("X-Forwarded-For", client)?;
        req.insert_header("X-Forwarded-Proto", "http")?;
        if let Some(h) = host {
            req.insert_header("X-Forwarded-Host", h)?;
        }
        Ok(())
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
    let gateway_work = args.iter().any(|a| a == "--gateway-work");
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
    let mut svc = pingora_proxy::http_proxy_service(
        &server.configuration,
        Forward {
            upstream,
            gateway_work,
            host: http::HeaderValue::from_str(&upstream.to_string())
                .unwrap_or(http::HeaderValue::from_static("")),
        },
    );
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever();
}
