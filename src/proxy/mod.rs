//! `impl ProxyHttp` for one gateway: the request's life, phase by phase.
//!
//! Errors become statuses in one place, [`status_for`]: 502 when the upstream refused, reset
//! or spoke garbage, 504 when it was too slow, 503 when no peer could be chosen, 400 for a
//! malformed request, 500 for our own faults. Every reply the gateway writes itself, errors and
//! plugin answers alike, goes through [`write_reply`], which runs the response hooks and puts
//! the request id in the body.

use async_trait::async_trait;
use bytes::Bytes;
use gatehouse_plugins::Reply;
use http::{header, StatusCode, Uri};
use pingora::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::runtime::Live;

pub mod balance;
mod buffering;
pub mod caching;
pub mod canonical;
pub mod ctx;
mod errors;
pub mod forwarded;
mod hop;
mod logging;
pub mod mirror;
pub mod rewrite;
mod route;
mod statics;
pub mod upgrade;

pub use ctx::RequestCtx;
use errors::message_for;
pub(crate) use errors::write_reply;
pub use errors::{client_error, status_for};

pub struct GatewayProxy {
    /// Which gateway of the snapshot this service serves.
    pub index: usize,
    pub live: Live,
}

impl GatewayProxy {
    /// A gateway-made answer from a phase that holds no borrow of the snapshot.
    async fn reply(&self, session: &mut Session, ctx: &mut RequestCtx, reply: Reply) {
        let rt = ctx.rt.clone();
        let gw = rt.as_ref().and_then(|rt| rt.gateways.get(self.index));
        write_reply(gw, session, ctx, reply).await;
    }

    /// The request header as the upstream gets it: path rewrite, Host, X-Forwarded-*, then the
    /// plugins' upstream hooks. Shared by Pingora's proxy path and the upgrade tunnel so both
    /// send the same request (hop-by-hop headers are gone by then: Pingora strips them, and
    /// the tunnel does it itself).
    async fn prepare_upstream_request(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Borrowing the fields apart spares cloning the snapshot's Arc for the plugin call.
        let RequestCtx {
            rt: Some(rt),
            route: Some(id),
            upstream: up,
            peer_idx,
            plugins,
            ..
        } = ctx
        else {
            return Ok(());
        };
        let gw = &rt.gateways[self.index];
        let route = &gw.routes[*id];

        // The path is canonical already (early_request_filter); only the route rewrites it,
        // and what a rewrite makes of it must be canonical too (a regex template can join
        // captures into `/users/../admin`).
        if let Some(p) = rewrite::upstream_path(route, upstream.uri.path()) {
            let canonical = canonical::canonical_path(p.as_bytes(), rt.canonical);
            if !canonical.is_ok_and(|c| c == p) {
                return Err(client_error(400, "the rewritten path is not canonical"));
            }
            let uri = match upstream.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            let uri = Uri::try_from(uri).or_err(
                ErrorType::InternalError,
                "rewritten path is not a valid URI",
            )?;
            upstream.set_uri(uri);
        }

        // X-Forwarded-Host is the client's Host, so it is set before a route replaces Host.
        let peer_ip = forwarded::peer_ip(session);
        let trusted = peer_ip.is_some_and(|ip| forwarded::is_trusted(&rt.trusted_proxies, ip));
        let authority = plugins.authority.as_ref();
        forwarded::set_headers(upstream, gw.forwarded, peer_ip, trusted, gw.tls, authority)?;

        // TE is hop-by-hop and Pingora drops it, but `TE: trailers` is how a gRPC client
        // says it reads trailers, and gRPC servers refuse requests without it.
        if up.is_some_and(|u| rt.pools[u].cfg.http2) && hop::te_trailers(session.req_header()) {
            upstream
                .insert_header(header::TE, "trailers")
                .or_err(ErrorType::InternalError, "te header")?;
        }
        // An HTTP/1.0 client may send no Host, but the request goes up as HTTP/1.1, which
        // needs one: the peer's name then, as nginx's default `proxy_set_header Host`.
        if !route.preserve_host || !upstream.headers.contains_key(header::HOST) {
            if let (Some(up), Some(idx)) = (*up, *peer_idx) {
                upstream
                    .insert_header(header::HOST, rt.pools[up].host(idx))
                    .or_err(ErrorType::InternalError, "host header")?;
            }
        }

        gw.chains[*id]
            .upstream_request(session, upstream, plugins)
            .await
    }
}

#[async_trait]
impl ProxyHttp for GatewayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    /// Our compression in place of Pingora's default (disabled) one: see `compress.rs`.
    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        modules.add_module(Box::new(crate::compress::Builder));
    }

    /// Snapshot, client address, the canonical request (see `canonical.rs`) and its route,
    /// before any module or plugin runs: everything after sees this one request.
    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.start = Some(std::time::Instant::now());
        hop::quiet_interim(session);
        let rt = self.live.load_full();
        // The head is in: from here reads are the body's (the front read the head with no
        // per-read timeout, under its own clock).
        session.set_read_timeout(Some(rt.client.body_timeout));
        let Some(gw) = rt.gateways.get(self.index) else {
            return Error::e_explain(ErrorType::InternalError, "gateway missing from snapshot");
        };
        ctx.plugins.client_ip = forwarded::peer_ip(session)
            .and_then(|ip| forwarded::client_ip(&rt.trusted_proxies, ip, session.req_header()));
        ctx.plugins.gateway = Some(gw.name.clone());
        let mut missing_cert = false;
        if let Some(required) = gw.client_auth {
            ctx.plugins.client_cert = crate::tls::client_of(session.digest());
            if ctx.plugins.client_cert.is_some() {
                // A verified certificate is a credential, whether or not a plugin reads it.
                ctx.plugins.identify("client_certificate", None);
            }
            // The handshake refuses clients without one, but a session resumed from before
            // `required` (or from a CA since removed) comes without an identity.
            missing_cert = required && ctx.plugins.client_cert.is_none();
        }

        let h1 = session.as_ref().as_http1();
        let clock = h1.and_then(|h| crate::front::Timed::clock_of(h.stream()));
        let method = session.req_header().method.as_str();
        let extra_space = clock.is_some_and(|c| {
            c.head_done();
            c.extra_space(method)
        });
        let raw_head = h1.map(|h1| h1.get_headers_raw_bytes());
        let limits = &rt.client;
        let head_size = raw_head.as_ref().map_or(0, |h| h.len());
        let verdict = if extra_space {
            Err(canonical::bad("whitespace in the request target"))
        } else if session.req_header().headers.len() > limits.max_headers {
            Err(canonical::Refusal {
                status: 431,
                reason: "too many header fields",
            })
        } else if head_size > limits.max_header_size {
            Err(canonical::Refusal {
                status: 431,
                reason: "request header too large",
            })
        } else {
            canonical::canonicalize(
                session.req_header_mut(),
                raw_head.as_deref(),
                rt.canonical,
                gw.tls,
            )
        };
        let verdict = match verdict {
            Ok(_) if missing_cert => Err(canonical::Refusal {
                status: 403,
                reason: "a client certificate is required",
            }),
            v => v,
        };
        let canonical = match verdict {
            Ok(c) => c,
            Err(refusal) => {
                ctx.rt = Some(rt);
                return Err(client_error(refusal.status, refusal.reason));
            }
        };
        // Idle HTTP/1 connections are ended by the connection loop (front.rs), at
        // keepalive_timeout; here only "no keep-alive at all" is said.
        if limits.keepalive_timeout.is_zero() {
            session.set_keepalive(None);
        }
        if session.as_ref().is_http2() {
            // The HTTP/1 loop bounds writes itself (front.rs); an h2 stream gets Pingora's.
            session.set_write_timeout(Some(limits.send_timeout));
        }
        // Pipelined requests are answered in order, one at a time (RFC 9112 §9.3.2).
        session.set_pipelining_enabled(true);
        if canonical.upgrade {
            match upgrade::only_websocket(session.req_header_mut()) {
                Ok(accept) => ctx.ws_accept = accept,
                Err(e) => {
                    ctx.rt = Some(rt);
                    return Err(e);
                }
            }
        }

        let trusted = forwarded::peer_ip(session)
            .is_some_and(|ip| rt.trusted_proxies.iter().any(|n| n.contains(&ip)));
        let req = session.req_header();
        ctx.span = Some(rt.tracing.start(&req.headers, req.method.as_str(), trusted));
        let host = canonical.authority.as_ref().map(|a| a.host());
        ctx.route = gw
            .router
            .find(&gw.routes, host, req.uri.path(), &req.method, &req.headers);
        ctx.plugins.authority = canonical.authority;
        if let Some(id) = ctx.route {
            ctx.plugins.route = Some(gw.route_names[id].clone());
            if let Some(c) = &gw.routes[id].compression {
                if let Some(m) = session
                    .downstream_modules_ctx
                    .get_mut::<crate::compress::Compress>()
                {
                    m.route = Some(c.clone());
                }
            }
        }
        ctx.rt = Some(rt);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Taken and put back rather than cloned (an atomic pair per hook per request).
        let Some(rt) = ctx.rt.take() else {
            return Ok(false);
        };
        let done = self.route_request(&rt, session, ctx).await;
        ctx.rt = Some(rt);
        done
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let (Some(rt), Some(up)) = (ctx.rt.take(), ctx.upstream) else {
            return Error::e_explain(ErrorType::InternalError, "no upstream at peer selection");
        };
        // Taken and put back rather than cloned: select_peer needs the ctx mutably.
        let peer = balance::select_peer(&rt, up, session, ctx);
        ctx.body_try = 0;
        ctx.rt = Some(rt);
        peer
    }

    /// A failed connect never reached the peer: safe to retry elsewhere, whatever the method.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        balance::after_connect_failure(session, ctx, e)
    }

    /// Errors after the connection was made: `balance::after_proxy_failure`.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        balance::after_proxy_failure(peer, session, e, ctx, client_reused)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.prepare_upstream_request(session, upstream, ctx)
            .await?;
        if session.as_ref().is_http2() {
            // Connected: from here the proxy reads the body, and an HTTP/2 stream's reads are
            // timed by its connection loop (front/h2.rs) from now (not from the head: the
            // plugins and the connect were not the client's wait).
            crate::front::h2_body_expected(!session.as_mut().is_body_done());
        }
        if let (Some(rt), Some(span)) = (&ctx.rt, &ctx.span) {
            rt.tracing.inject(span, upstream);
        }
        if let Some(m) = ctx.mirror.as_mut() {
            m.set_head(upstream);
        }
        ctx.upstream_sent = Some(std::time::Instant::now());
        Ok(())
    }

    /// Passive health and breaker accounting by status, and retries on the statuses
    /// configured for them (idempotent requests, before anything reached the client).
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let upgrade = resp.status == StatusCode::SWITCHING_PROTOCOLS;
        if resp.status.is_informational() && !upgrade {
            // 100 Continue, 103 Early Hints: not the answer, so no verdict on the peer yet.
            return Ok(());
        }
        if upgrade {
            // Pingora's path would open a tunnel on any 101 (upgrades take ours; kept in case
            // one ever reaches it): it must be the one asked for.
            upgrade::completes(resp, ctx.ws_accept.as_deref().unwrap_or(""))?;
        }
        for h in hop::hop_by_hop(&resp.headers, upgrade, true) {
            resp.remove_header(&h);
        }
        // After the hop-by-hop fields are gone: a 304's fields replace stored ones.
        caching::note_revalidation(session, resp, ctx);
        let status = resp.status.as_u16();
        ctx.upstream_failed = balance::breaker_failure(status);
        let (Some(up), Some(idx)) = (ctx.upstream, ctx.peer_idx) else {
            return Ok(());
        };
        let Some(rt) = ctx.rt.take() else {
            return Ok(());
        };
        let pool = &rt.pools[up];
        if let Some(t) = ctx.upstream_sent.take() {
            let took = t.elapsed();
            pool.upstream_time.observe(took.as_secs_f64());
            ctx.upstream_time = Some(took);
        }
        if status >= 500 {
            pool.answered_5xx.inc();
        }
        pool.report(idx, !pool.is_failure_status(status));
        if let (Some(b), Some(probe), false) = (&pool.breaker, ctx.probe, ctx.recorded) {
            // A probe's verdict is its response head: a WebSocket or an event stream must not
            // hold the circuit half-open for as long as it lives.
            b.record(!ctx.upstream_failed, Some(probe));
            ctx.recorded = true;
        }
        // Upgrades run in our own tunnel, outside Pingora's retry loop: their answer is
        // relayed as is.
        let retry = pool.cfg.retry.on_status.contains(&status)
            && !session.is_upgrade_req()
            && balance::may_retry(pool, session, ctx, balance::idempotent(session));
        ctx.rt = Some(rt);
        if retry {
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                format!("upstream answered {status}, retrying"),
            );
            e.esource = ErrorSource::Upstream;
            e.set_retry(true);
            ctx.status_retry = true;
            return Err(e);
        }
        Ok(())
    }

    /// Feeds the mirror copy and the plugins' body hooks (size limits).
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // An HTTP/2 body of unknown length may end in an empty DATA frame with END_STREAM (curl
        // -T -, Go's net/http). Passed on as a piece, Pingora writes it to an HTTP/1.1 upstream
        // as a chunk of size 0, which is the last-chunk marker, and then the marker again when
        // the body ends: the upstream reads the second one as another request, and every
        // answer on that pooled connection goes to the wrong client after it. The end of a
        // body is said once, by `end_of_stream`, never by an empty piece.
        if end_of_stream && body.as_ref().is_some_and(Bytes::is_empty) {
            *body = None;
        }
        if session.as_ref().is_http2() {
            crate::front::h2_body_read(end_of_stream);
        }
        // A retry sends the body again from its start: hooks and mirror see each byte once
        // (a replayed body counted twice against request_limit made a retried PUT a 413).
        let len = body.as_ref().map_or(0, |b| b.len() as u64);
        let start = ctx.body_try;
        ctx.body_try += len;
        if len > 0 && ctx.body_try <= ctx.body_seen {
            return Ok(());
        }
        let mut fresh = match body.as_ref() {
            Some(b) if start < ctx.body_seen => {
                Some(b.slice(usize::try_from(ctx.body_seen - start).unwrap_or(b.len())..))
            }
            _ => None,
        };
        ctx.body_seen = ctx.body_seen.max(ctx.body_try);
        let body = if fresh.is_some() { &mut fresh } else { body };
        if let Some(m) = ctx.mirror.as_mut() {
            m.on_body(body.as_ref(), end_of_stream);
        }
        let RequestCtx {
            rt: Some(rt),
            route,
            plugins,
            ..
        } = ctx
        else {
            return Ok(());
        };
        let chain = rt.gateways[self.index].chain(*route);
        if chain.has_request_body() {
            // Request-body plugins observe (limits, counts); a replayed piece is shown to them
            // cut to its new part.
            chain
                .request_body(session, body, end_of_stream, plugins)
                .await?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = caching::status(session, ctx);
        ctx.plugins.cache_status = status;
        if let Some(rt) = &ctx.rt {
            rt.gateways[self.index].stamp(resp);
        }
        let RequestCtx {
            rt: Some(rt),
            route: Some(id),
            plugins,
            ..
        } = ctx
        else {
            hop::frame_for_old_client(session, resp);
            return Ok(());
        };
        let gw = &rt.gateways[self.index];
        if let Some(cfg) = &gw.routes[*id].cache {
            caching::on_response(cfg, resp, status);
        }
        // On every route of a gateway that caches: a POST route beside a cached GET route
        // changes what that one stored (the stored URLs are the gateway's, whichever route
        // stored them). A gateway without a cache takes no purge lock for its writes.
        if gw.caches {
            caching::invalidate_after(session, resp, gw.tls, plugins.authority.as_ref());
        }
        gw.chains[*id].response(session, resp, plugins).await?;
        // Last: on the head the plugins left.
        hop::frame_for_old_client(session, resp);
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if let (Some(rt), Some(id)) = (ctx.rt.as_ref(), ctx.route) {
            let chain = &rt.gateways[self.index].chains[id];
            if chain.has_response_body() {
                chain.response_body(session, body, end_of_stream, &mut ctx.plugins)?;
            }
        }
        Ok(None)
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        caching::enable(session, ctx, self.index);
        Ok(())
    }

    fn cache_key_callback(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<pingora_cache::CacheKey> {
        match caching::key_for(ctx, self.index, session) {
            Some(key) => Ok(key),
            None => Error::e_explain(ErrorType::InternalError, "no route for the cache key"),
        }
    }

    async fn cache_hit_filter(
        &self,
        session: &mut Session,
        meta: &pingora_cache::CacheMeta,
        _hit: &mut pingora_cache::HitHandler,
        is_fresh: bool,
        _ctx: &mut RequestCtx,
    ) -> Result<Option<pingora_cache::ForcedFreshness>> {
        Ok(caching::hit_freshness(session.req_header(), meta, is_fresh))
    }

    /// A miss for a client that said `only-if-cached`: 504, and no upstream request.
    async fn proxy_upstream_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        if !session.cache.enabled() || !caching::only_if_cached(session.req_header()) {
            return Ok(true);
        }
        let reply = Reply::json_error(
            StatusCode::GATEWAY_TIMEOUT,
            "not in the cache, and the request said only-if-cached",
            ctx.plugins.request_id(),
        );
        self.reply(session, ctx, reply).await;
        Ok(false)
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<pingora_cache::RespCacheable> {
        Ok(caching::decide(ctx, self.index, session.req_header(), resp))
    }

    fn cache_vary_filter(
        &self,
        meta: &pingora_cache::CacheMeta,
        _ctx: &mut RequestCtx,
        req: &RequestHeader,
    ) -> Option<[u8; 16]> {
        caching::variance(meta, req)
    }

    /// Stale may stand in while a background refresh runs (the entry's own
    /// stale-while-revalidate window, checked by Pingora) or when the upstream failed
    /// (stale-if-error); never for a client's own fault.
    fn should_serve_stale(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        error: Option<&Error>,
    ) -> bool {
        error.is_none_or(|e| e.esource() == &ErrorSource::Upstream)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = status_for(e);
        // Safe only when nothing was read from an upstream and the request was whole; a
        // refused request is not read any further, so its connection ends with this answer
        // (and says so).
        let reuse = code == 503 || code == 404;
        if !reuse {
            session.set_keepalive(None);
        }
        // Once a response has started, all we can do is cut the connection.
        if code > 0 && !ctx.replied && session.response_written().is_none() {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reply =
                Reply::json_error(status, message_for(Some(e), code), ctx.plugins.request_id());
            self.reply(session, ctx, reply).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: reuse,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // Taken and put back rather than cloned, as in request_filter.
        if let Some(rt) = ctx.rt.take() {
            if let Some(gw) = rt.gateways.get(self.index) {
                logging::metrics(gw, session, ctx);
                logging::finish(&rt, gw, session, ctx);
            }
            ctx.rt = Some(rt);
        }
        logging::breaker_verdict(e, ctx);
        if let RequestCtx {
            rt: Some(rt),
            route,
            plugins,
            ..
        } = ctx
        {
            let chain = rt.gateways[self.index].chain(*route);
            chain.logging(session, e, plugins).await;
        }
    }

    /// Retries are the retry policy doing its job; ejections and breaker changes are logged
    /// where they happen.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        _error: &Error,
        context: pingora_proxy::ProxyWarnLogContext,
    ) -> bool {
        matches!(context, pingora_proxy::ProxyWarnLogContext::UpstreamRetry)
    }

    /// A client that goes away, or sends what we refuse, is routine, not an error worth a log
    /// line per request (a flood of bad requests would drown the log).
    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        let client = status_for(e) == 0 || e.esource() == &ErrorSource::Downstream;
        if client && log::log_enabled!(log::Level::Debug) {
            log::debug!("client error: {e}, {}", self.request_summary(session, ctx));
        }
        client
    }

    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let id = ctx
            .plugins
            .request_id
            .as_ref()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        format!("{} request_id={id}", session.as_ref().request_summary())
    }
}
