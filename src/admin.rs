//! The admin listener (`[server] admin`): the status page at `/`, `/healthz` and `/readyz` for
//! load balancers and systemd, `/status` (version, config digest, last reload, gateways and
//! routes, each upstream's peers with active health, passive ejection, in-flight requests and
//! circuit breaker state), `/metrics`, `/config` (secrets redacted), and the mutating
//! `POST /cache/purge` and `POST /reload` behind the admin token. Reads need the token too
//! with `admin_auth = "all"`; otherwise keep the listener on loopback or a management network.
pub mod history;
mod redact;

use std::net::SocketAddr;

use async_trait::async_trait;
use gatehouse_plugins::authority::Authority;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use serde_json::{json, Value};

use crate::runtime::Live;

pub struct Admin {
    live: Live,
    reloads: crate::server::Reloads,
}

/// When the process started, for `uptime_seconds`.
static STARTED: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

/// Unix seconds when the process started (the fleet registry's `started`).
pub fn started_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(STARTED.elapsed().as_secs())
}

/// The status page: one self-contained file (inline CSS and JS) that reads /status and
/// /metrics from this listener.
const PAGE: &str = include_str!("admin/status.html");

pub fn service(addr: SocketAddr, live: Live, reloads: crate::server::Reloads) -> Service<Admin> {
    std::sync::LazyLock::force(&STARTED);
    let mut svc = Service::new("admin".to_string(), Admin { live, reloads });
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
            .map(|g| {
                let routes: Vec<Value> = g
                    .routes
                    .iter()
                    .map(|r| json!({ "name": r.name, "target": rt.describe_target(&r.target) }))
                    .collect();
                json!({
                    "name": &*g.name,
                    "listen": g.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "tls": g.tls,
                    "routes": routes,
                })
            })
            .collect();
        use pingora_cache::eviction::EvictionManager;
        let ev = &*crate::cache::EVICTION;
        let cache = json!({
            "entries": crate::cache::STORE.len(),
            "bytes": ev.total_size(),
            "limit": ev.weight_limit(),
            "evicted": ev.evicted_items(),
        });
        let last = self.reloads.last.lock().ok().and_then(|l| l.clone());
        let last_reload = last.map(|l| {
            let at =
                l.at.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
            match l.result {
                Ok(()) => json!({ "at": at, "result": "success" }),
                Err(e) => json!({ "at": at, "result": "failure", "errors": e }),
            }
        });
        let stores: Vec<Value> = rt
            .stores
            .iter()
            .map(|s| json!({ "name": s.name(), "kind": s.settings.target.kind(), "up": s.up() }))
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "node_name": &*rt.node_name,
            "uptime_seconds": STARTED.elapsed().as_secs(),
            "config": { "path": rt.config_path.display().to_string(), "sha256": rt.config_digest.get_or_init(|| config_digest(&rt.config_source)) },
            "gateways": gateways,
            "upstreams": upstreams,
            "cache": cache,
            "stores": stores,
            "fleet": rt.fleet.as_ref().map(|f| f.status()),
            "last_reload": last_reload,
        })
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

/// Whether `Authorization: Bearer TOKEN` carries the configured token, compared in constant
/// time (only the length can be learnt by timing, and it is not secret enough to matter).
fn authorized(session: &ServerSession, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    session
        .req_header()
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110 §11.1).
            let v = v.as_bytes();
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
        })
        .is_some_and(|got| bool::from(got.trim_ascii().ct_eq(token.as_bytes())))
}

/// The config's digest as `/status` shows it: of the redacted config (what `/config` shows),
/// so it tells which config runs without letting anyone check a guessed secret against it
/// (the raw file's digest would, offline: the shipped file with one token changed).
pub fn config_digest(source: &str) -> Option<String> {
    use sha2::Digest;
    let redacted = redact::config_json(source)?.to_string();
    Some(hex::encode(sha2::Sha256::digest(redacted.as_bytes())))
}

/// DNS rebinding: a web page whose name an attacker points at this listener's address would
/// read it with the operator's browser. A request naming an IP address or localhost cannot
/// come from such a page (its Host is the attacker's name).
fn local_host(session: &ServerSession) -> bool {
    let req = session.req_header();
    let host = req
        .headers
        .get(http::header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()));
    let Some(host) = host else {
        return true; // HTTP/1.0 without Host: not a browser
    };
    // The admin listener is plain HTTP.
    Authority::parse(host, false).is_some_and(|a| a.host() == "localhost" || a.ip().is_some())
}

fn unauthorized() -> Response<Vec<u8>> {
    let mut r = json_error(
        StatusCode::UNAUTHORIZED,
        "a valid admin bearer token is required",
    );
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    r
}

fn json_error(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    let body = json!({ "status": status.as_u16(), "error": message });
    reply(status, "application/json", format!("{body}\n"))
}

impl Admin {
    /// Ready: every listener accepts connections and every upstream with active health
    /// checks has had its first round (so no request meets a peer whose health is unknown).
    fn readyz(&self) -> Response<Vec<u8>> {
        use std::sync::atomic::Ordering;
        let listening = crate::systemd::LISTENING.load(Ordering::Acquire);
        let rt = self.live.load();
        let pending: Vec<&str> = rt
            .pools
            .iter()
            .filter(|p| !p.checked.load(Ordering::Acquire))
            .map(|p| &*p.name)
            .collect();
        if listening && pending.is_empty() {
            return reply(StatusCode::OK, "text/plain", "ready\n".into());
        }
        let body = json!({
            "status": 503,
            "listening": listening,
            "health_checks_pending": pending,
        });
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            format!("{body}\n"),
        )
    }

    /// With `admin_auth = "all"`, the token check of the reads: `None` when the request may
    /// go on, else the 401.
    fn refuse_read(&self, session: &ServerSession) -> Option<Response<Vec<u8>>> {
        let rt = self.live.load();
        match rt.admin_token.as_deref() {
            Some(token) if rt.admin_auth_all && !authorized(session, token) => Some(unauthorized()),
            _ => None,
        }
    }

    /// The token check of the endpoints that always need it: 403 when no token is set, 401
    /// when the request does not carry it.
    fn refuse_token(&self, session: &ServerSession, what: &str) -> Option<Response<Vec<u8>>> {
        let rt = self.live.load();
        let Some(token) = rt.admin_token.as_deref() else {
            return Some(json_error(
                StatusCode::FORBIDDEN,
                &format!("{what} is off: set [server] admin_token or admin_token_file"),
            ));
        };
        if !authorized(session, token) {
            return Some(unauthorized());
        }
        None
    }

    /// The token and method checks of the mutating endpoints: `None` when the request may go
    /// on, else the refusal.
    fn refuse(&self, session: &ServerSession, what: &str) -> Option<Response<Vec<u8>>> {
        if let Some(r) = self.refuse_token(session, what) {
            return Some(r);
        }
        if session.req_header().method != http::Method::POST {
            let mut r = json_error(StatusCode::METHOD_NOT_ALLOWED, &format!("{what} with POST"));
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return Some(r);
        }
        None
    }

    /// `POST /reload`: as SIGHUP, and the answer says whether the new file took (422 with its
    /// errors when not; the running config stays).
    async fn reload(&self, session: &ServerSession) -> Response<Vec<u8>> {
        if let Some(r) = self.refuse(session, "reload") {
            return r;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.reloads.ask.send(tx).await.is_err() {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the reloader is not running",
            );
        }
        match tokio::time::timeout(std::time::Duration::from_secs(60), rx).await {
            Ok(Ok(Ok(()))) => reply(
                StatusCode::OK,
                "application/json",
                format!("{}\n", json!({ "reloaded": true })),
            ),
            Ok(Ok(Err(errors))) => {
                let body = json!({ "reloaded": false, "status": 422, "errors": errors });
                reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "application/json",
                    format!("{body}\n"),
                )
            }
            _ => json_error(
                StatusCode::GATEWAY_TIMEOUT,
                "the reload did not answer in 60 s",
            ),
        }
    }

    /// `POST /cache/purge?url=ABSOLUTE_URL` or `?tag=TAG`: drops the entries, says how many.
    async fn purge(&self, session: &ServerSession) -> Response<Vec<u8>> {
        if let Some(r) = self.refuse(session, "purge") {
            return r;
        }
        let rt = self.live.load();
        let req = session.req_header();
        let query = req.uri.query().unwrap_or("");
        let mut by_url = None;
        let mut by_tag = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "url" => by_url = Some(v.into_owned()),
                "tag" => by_tag = Some(v.into_owned()),
                _ => {}
            }
        }
        use crate::stores::fleet::Purge;
        let (what, purge) = match (by_url, by_tag) {
            (Some(u), None) => match purge_key(&u, rt.canonical) {
                Some(key) => (json!({ "url": key }), Purge::Url(key)),
                None => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "url must be absolute: http(s)://host[:port]/path[?query]",
                    )
                }
            },
            (None, Some(t)) if !t.is_empty() => (json!({ "tag": t }), Purge::Tag(t)),
            _ => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "say what to purge: ?url=ABSOLUTE_URL or ?tag=TAG (one of them)",
                )
            }
        };
        let purged = match &purge {
            Purge::Url(k) => crate::cache::STORE.purge_url(k),
            Purge::Tag(t) => crate::cache::STORE.purge_tag(t),
            Purge::All => crate::cache::STORE.purge_all(),
        };
        log::info!("cache purge {what}: {purged} entries");
        let Some(fleet) = rt.fleet.clone() else {
            let body = json!({ "purged": purged, "target": what });
            return reply(StatusCode::OK, "application/json", format!("{body}\n"));
        };
        // The other replicas: those the registry saw lately must confirm within the deadline.
        fleet.refresh().await;
        let expect = fleet.peers_up();
        let (status, replicas) = match fleet.publish(&purge).await {
            Ok(id) => {
                let acks = fleet.acks(&id, &expect, rt.purge_deadline).await;
                let missing: Vec<&String> =
                    expect.iter().filter(|n| !acks.contains_key(*n)).collect();
                // This replica first: it purged before telling the others.
                let confirmed: Vec<Value> = std::iter::once((&fleet.node, &(purged as u64)))
                    .chain(acks.iter().filter(|(n, _)| **n != fleet.node))
                    .map(|(n, p)| json!({ "node": n, "purged": p }))
                    .collect();
                if !missing.is_empty() {
                    log::warn!(
                        "cache purge {what}: no confirmation from {missing:?} within {:?}",
                        rt.purge_deadline
                    );
                }
                (
                    StatusCode::OK,
                    json!({ "id": id, "this": fleet.node, "confirmed": confirmed, "missing": missing }),
                )
            }
            Err(e) => {
                log::warn!("cache purge {what}: the other replicas were not told: {e}");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "this": fleet.node, "error": format!("the other replicas were not told: {e}"), "missing": expect }),
                )
            }
        };
        let body = json!({ "purged": purged, "target": what, "fleet": replicas });
        reply(status, "application/json", format!("{body}\n"))
    }
}

/// An absolute URL as the cache keys it: the scheme lower-cased, the authority canonical (so
/// `http://Shop.example.com.:80/` names what `Host: shop.example.com` stored), the path made
/// canonical the way requests are (so `/a//b` names the entry `/a/b` was stored under).
fn purge_key(u: &str, opts: crate::path::Options) -> Option<String> {
    let (scheme, rest) = u.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (host, pq) = rest.split_at(split);
    let authority = Authority::parse(host.as_bytes(), scheme == "https")?;
    let (path, query) = match pq.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (pq, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    let path = crate::path::canonical_path(path.as_bytes(), opts).ok()?;
    let mut key = format!("{scheme}://{authority}{path}");
    if let Some(q) = query {
        key.push('?');
        key.push_str(q);
    }
    Some(key)
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        if !local_host(session) {
            return json_error(
                StatusCode::MISDIRECTED_REQUEST,
                "the admin listener answers requests to an IP address or localhost only",
            );
        }
        // The page shell holds no data (it asks for a token when its reads get 401), and
        // probes must be answered (/readyz without the token says only its status); /config
        // always needs the token (below).
        let open = matches!(
            path,
            "/" | "/healthz" | "/readyz" | "/cache/purge" | "/reload" | "/config"
        );
        if !open {
            if let Some(r) = self.refuse_read(session) {
                return r;
            }
        }
        match path {
            "/" => {
                let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into());
                // Everything is inline: nothing else may load or run.
                r.headers_mut().insert(
                    http::header::CONTENT_SECURITY_POLICY,
                    http::HeaderValue::from_static(
                        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
                    ),
                );
                r
            }
            "/config" => {
                // The whole config, redacted by key names: still not for anyone who can
                // reach the port, whatever admin_auth says.
                if let Some(r) = self.refuse_token(session, "/config") {
                    return r;
                }
                let rt = self.live.load();
                match redact::config_json(&rt.config_source) {
                    Some(v) => reply(StatusCode::OK, "application/json", format!("{v}\n")),
                    None => json_error(StatusCode::INTERNAL_SERVER_ERROR, "config not readable"),
                }
            }
            "/cache/purge" => self.purge(session).await,
            "/reload" => self.reload(session).await,
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::render(&self.live.load()),
            ),
            "/history" => reply(
                StatusCode::OK,
                "application/json",
                format!("{}\n", history::HISTORY.json()),
            ),
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                let r = self.readyz();
                if r.status() != StatusCode::OK && self.refuse_read(session).is_some() {
                    // No token: the status alone, not which upstreams are pending.
                    return reply(r.status(), "text/plain", "not ready\n".into());
                }
                r
            }
            "/status" => reply(
                StatusCode::OK,
                "application/json",
                format!("{}\n", self.status()),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                "{\"status\":404,\"error\":\"try /, /status, /metrics, /config, /healthz or /readyz\"}\n".into(),
            ),
        }
    }
}

#[cfg(test)]
mod digest {
    use super::config_digest;

    #[test]
    fn secrets_do_not_change_the_digest_and_the_rest_does() {
        let file = |token: &str, secret: &str, path: &str| {
            format!(
                "[server]\nadmin_token = \"{token}\"\n[plugins.j]\nkind = \"jwt_auth\"\n\
                 secret = \"{secret}\"\n[[routes]]\npath = \"{path}\"\nupstream = \"u\"\n"
            )
        };
        let a = config_digest(&file("token-one-0123456789", "secret-one", "/a")).unwrap();
        let b = config_digest(&file("token-two-0123456789", "secret-two", "/a")).unwrap();
        let c = config_digest(&file("token-one-0123456789", "secret-one", "/b")).unwrap();
        assert_eq!(a, b, "a guessed secret cannot be checked against it");
        assert_ne!(a, c, "it still tells configs apart");
    }
}
