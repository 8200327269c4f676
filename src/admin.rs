//! The admin listener (`[server] admin`): `/healthz` for load balancers and systemd, `/status`
//! with each upstream's peers (active health, passive ejection, in-flight requests) and circuit
//! breaker state. Keep it on loopback or a management network: it has no authentication.
use std::net::SocketAddr;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use serde_json::{json, Value};

use crate::runtime::Live;

pub struct Admin {
    live: Live,
}

pub fn service(addr: SocketAddr, live: Live) -> Service<Admin> {
    let mut svc = Service::new("admin".to_string(), Admin { live });
    svc.add_tcp(&addr.to_string());
    svc.threads = Some(1);
    svc
}

impl Admin {
    fn status(&self) -> Value {
        let rt = self.live.load();
        let mut upstreams = serde_json::Map::new();
        for pool in &rt.pools {
            let peers: Vec<Value> = pool
                .peers()
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    json!({
                        "addr": p.addr.to_string(),
                        "weight": p.weight,
                        "healthy": pool.healthy(i),
                        "ejected": pool.ejected(i),
                        "in_flight": pool.inflight(i),
                    })
                })
                .collect();
            upstreams.insert(
                pool.name.to_string(),
                json!({
                    "selection": pool.cfg.selection.as_str(),
                    "circuit": pool.breaker.as_ref().map(|b| b.state_name()),
                    "peers": peers,
                }),
            );
        }
        let gateways: Vec<Value> = rt
            .gateways
            .iter()
            .map(|g| json!({ "name": &*g.name, "routes": g.routes.len() }))
            .collect();
        json!({ "gateways": gateways, "upstreams": upstreams })
    }
}

fn reply(status: StatusCode, ctype: &str, body: String) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body.into_bytes())
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/status" => reply(
                StatusCode::OK,
                "application/json",
                format!("{}\n", self.status()),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                "{\"status\":404,\"error\":\"try /status or /healthz\"}\n".into(),
            ),
        }
    }
}
