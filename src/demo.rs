//! `gatehouse demo`: small in-process JSON services behind the gateway, so a new user sees
//! routing, rewrites, load balancing and plugins work before writing any config.
//!
//! Every upstream of the demo config whose peers are on loopback gets a demo service on each
//! peer address; the data served depends on the upstream's name (users, orders, products;
//! anything else echoes the request). Each answer says which instance served it and the path
//! it received, so rewrites and round-robin are visible with curl.
use std::net::SocketAddr;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;

use crate::config::Config;

/// The demo config, built in so `gatehouse demo` works from any directory.
pub const DEMO_CONFIG: &str = include_str!("../conf/gatehouse.toml");
const DEMO_PAGE: &str = include_str!("../conf/www/index.html");

/// Writes the built-in config and its static site under the temp dir; returns the config's
/// path.
pub fn materialize() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("gatehouse-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/index.html"), DEMO_PAGE)?;
    let path = dir.join("gatehouse.toml");
    std::fs::write(&path, DEMO_CONFIG)?;
    Ok(path)
}

pub struct DemoApi {
    service: String,
    instance: SocketAddr,
}

const USERS: &[(u32, &str, &str)] = &[
    (1, "Ada Lovelace", "ada@example.com"),
    (2, "Alan Turing", "alan@example.com"),
    (3, "Grace Hopper", "grace@example.com"),
];
const PRODUCTS: &[(u32, &str, u32)] = &[
    (11, "Keyboard", 4900),
    (12, "Mouse", 1900),
    (13, "Monitor", 18900),
];
const ORDERS: &[(u32, u32, u32, u32)] = &[(101, 1, 11, 1), (102, 1, 12, 2), (103, 2, 13, 1)];

fn user(u: &(u32, &str, &str)) -> String {
    format!(
        "{{\"id\":{},\"name\":\"{}\",\"email\":\"{}\"}}",
        u.0, u.1, u.2
    )
}
fn product(p: &(u32, &str, u32)) -> String {
    format!(
        "{{\"id\":{},\"name\":\"{}\",\"price_cents\":{}}}",
        p.0, p.1, p.2
    )
}
fn order(o: &(u32, u32, u32, u32)) -> String {
    format!(
        "{{\"id\":{},\"user_id\":{},\"product_id\":{},\"quantity\":{}}}",
        o.0, o.1, o.2, o.3
    )
}

/// `/users`, `/users/1`: the collection or one item; `None` when the id is unknown.
fn lookup<T>(
    rest: &str,
    items: &[T],
    id: impl Fn(&T) -> u32,
    json: impl Fn(&T) -> String,
) -> Option<String> {
    let rest = rest.trim_matches('/');
    if rest.is_empty() {
        return Some(format!(
            "[{}]",
            items.iter().map(&json).collect::<Vec<_>>().join(",")
        ));
    }
    let want: u32 = rest.parse().ok()?;
    items.iter().find(|i| id(i) == want).map(json)
}

impl DemoApi {
    fn data(&self, path: &str, query: &str) -> Option<String> {
        let rest = |prefix: &str| {
            path.strip_prefix(prefix)
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        // "products-v2" serves the products data too: it is the canary of "products".
        match self.service.split('-').next().unwrap_or("") {
            "users" => lookup(rest("/users")?, USERS, |u| u.0, user),
            "products" => lookup(rest("/products")?, PRODUCTS, |p| p.0, product),
            "orders" => {
                let r = rest("/orders")?;
                // `/orders?user=1`: one user's orders.
                let user = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("user="))
                    .and_then(|u| u.parse::<u32>().ok());
                match user {
                    Some(u) if r.trim_matches('/').is_empty() => Some(format!(
                        "[{}]",
                        ORDERS
                            .iter()
                            .filter(|o| o.1 == u)
                            .map(order)
                            .collect::<Vec<_>>()
                            .join(",")
                    )),
                    _ => lookup(r, ORDERS, |o| o.0, order),
                }
            }
            _ => Some("null".into()),
        }
    }
}

#[async_trait]
impl ServeHttp for DemoApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let header = |n: &str| {
            req.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map_or("null".to_string(), gatehouse_plugins::json_string)
        };
        let (status, data) = if path == "/healthz" {
            (StatusCode::OK, "\"ok\"".to_string())
        } else {
            match self.data(&path, req.uri.query().unwrap_or("")) {
                Some(d) => (StatusCode::OK, d),
                None => (StatusCode::NOT_FOUND, "null".to_string()),
            }
        };
        let body = format!(
            "{{\"service\":\"{}\",\"instance\":\"{}\",\"method\":\"{}\",\"path\":{},\"request_id\":{},\"forwarded_for\":{},\"data\":{}}}\n",
            self.service,
            self.instance,
            req.method,
            gatehouse_plugins::json_string(&path),
            header("x-request-id"),
            header("x-forwarded-for"),
            data
        );
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(body.into_bytes())
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

/// One demo service per loopback peer of every upstream in `cfg`.
pub fn services(cfg: &Config) -> Vec<Service<DemoApi>> {
    let mut out = Vec::new();
    for u in &cfg.upstreams {
        for p in u.peers.iter().filter(|p| p.addr.ip().is_loopback()) {
            let mut svc = Service::new(
                format!("demo {} {}", u.name, p.addr),
                DemoApi {
                    service: u.name.clone(),
                    instance: p.addr,
                },
            );
            svc.add_tcp(&p.addr.to_string());
            svc.threads = Some(1);
            out.push(svc);
        }
    }
    out
}

/// A token for the demo's `jwt` plugin (HS256 with its demo secret), valid for a day, with
/// the scope the account route requires.
pub fn demo_token(cfg: &Config) -> Option<String> {
    use gatehouse_plugins::PluginConfig;
    let jwt = cfg.plugins.iter().find_map(|p| match &p.config {
        PluginConfig::JwtAuth(c) if p.name == "jwt" => Some(c),
        _ => None,
    })?;
    let secret = jwt.secret.as_ref()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let claims = serde_json::json!({
        "sub": "ada",
        "iss": "gatehouse-demo",
        "scope": "account:read",
        "iat": now,
        "exp": now + 86_400,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .ok()
}

/// The curl lines printed at start; each works against the shipped demo config.
pub fn curl_lines(cfg: &Config) -> Vec<String> {
    let Some(web) = cfg.gateways.first().and_then(|g| g.listen.first()) else {
        return Vec::new();
    };
    let mut lines = vec![
        format!("curl -s http://{web}/api/users"),
        format!("curl -s http://{web}/api/users/1"),
        format!("curl -s http://{web}/api/orders        # twice: two instances, round robin"),
        format!("curl -s http://{web}/api/products/12     # 90/10 canary: products or products-v2"),
        format!("curl -s -H 'x-user: ada' http://{web}/api/products/12   # sticky: same side every time"),
        format!("curl -s http://{web}/                  # a static page, served from conf/www"),
        format!("curl -si http://{web}/nowhere          # 404 with a request id"),
        format!("curl -si http://{web}/api/catalog       # twice: x-cache-status MISS, then HIT"),
        format!("for i in $(seq 12); do curl -s -o /dev/null -w '%{{http_code}} ' http://{web}/api/users; done   # 10/s + burst 5: six 200s, then 429 but one 200 per 100 ms"),
        format!("curl -si http://{web}/api/account       # 401: JWT required"),
    ];
    if let Some(token) = demo_token(cfg) {
        lines.push(format!(
            "curl -s -H 'Authorization: Bearer {token}' http://{web}/api/account"
        ));
    }
    if let Some(mobile) = cfg.gateways.get(1).and_then(|g| g.listen.first()) {
        lines.push(format!(
            "curl -si http://{mobile}/m/profile/2          # the mobile BFF: its own routes and headers"
        ));
        lines.push(format!(
            "curl -s http://{mobile}/m/home/1              # aggregation: user, their orders, products in one answer"
        ));
    }
    if let Some(admin) = cfg.server.admin {
        lines.push(format!(
            "curl -s http://{admin}/status              # admin: peer health, circuit state"
        ));
        if let Some(token) = &cfg.server.admin_token {
            lines.push(format!(
                "curl -s -X POST -H 'Authorization: Bearer {token}' 'http://{admin}/cache/purge?url=http://{web}/api/catalog'"
            ));
        }
    }
    lines
}
