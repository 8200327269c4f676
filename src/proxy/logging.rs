//! The end of a request: the breaker's verdict on its upstream, its span and its access log
//! line, from what the request saw: its
//! canonical head (the host and path routing decided on, not the client's spelling), the
//! route and peer it went to, and what the plugins learnt (consumer, request id).
use pingora_proxy::Session;

use pingora_error::Error;

use super::ctx::RequestCtx;
use crate::access_log::{AccessLog, Entry};
use crate::runtime::{GatewayRt, Runtime};

/// The circuit breaker hears how the request it admitted went (unless a probe's verdict came
/// with its response head); a client's fault is no verdict at all.
pub(super) fn breaker_verdict(e: Option<&Error>, ctx: &RequestCtx) {
    let (Some(rt), Some(up), true, false) =
        (ctx.rt.as_ref(), ctx.upstream, ctx.admitted, ctx.recorded)
    else {
        return;
    };
    if let Some(b) = &rt.pools[up].breaker {
        match super::errors::upstream_verdict(e, ctx.upstream_failed) {
            Some(ok) => b.record(ok, ctx.probe),
            None => {
                if let Some(p) = ctx.probe {
                    b.abandon(p);
                }
            }
        }
    }
}

/// The request id as text ("" when there is none).
fn request_id(ctx: &RequestCtx) -> &str {
    ctx.plugins
        .request_id
        .as_ref()
        .map_or("", |v| std::str::from_utf8(v.as_bytes()).unwrap_or(""))
}

pub(super) fn finish(rt: &Runtime, gw: &GatewayRt, session: &Session, ctx: &mut RequestCtx) {
    // A background cache refresh is the gateway's own request.
    if session.subrequest_ctx.is_some() {
        return;
    }
    // The id only when someone reads it.
    let trace_id = ctx
        .span
        .as_ref()
        .filter(|_| rt.access_log.is_some())
        .and_then(|t| t.trace_id());
    if let Some(span) = ctx.span.take().filter(|_| rt.tracing.exporting()) {
        let req = session.req_header();
        crate::trace::finish(
            span,
            &crate::trace::Outcome {
                method: req.method.as_str(),
                route: ctx.route.map(|id| &*gw.route_names[id]),
                path: req.uri.path(),
                host: req
                    .headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
                status: session.response_written().map_or(0, |r| r.status.as_u16()),
                gateway: &gw.name,
                upstream: ctx.upstream.map(|u| &*rt.pools[u].name),
                peer: ctx.peer,
                client_ip: ctx.plugins.client_ip,
                request_id: request_id(ctx),
            },
        );
    }
    if let Some(log) = &rt.access_log {
        if ctx.route.is_none_or(|id| gw.routes[id].access_log) {
            access(log, rt, gw, session, ctx, trace_id);
        }
    }
}

fn access(
    log: &AccessLog,
    rt: &Runtime,
    gw: &GatewayRt,
    session: &Session,
    ctx: &RequestCtx,
    trace_id: Option<[u8; 16]>,
) {
    let Some(start) = ctx.start else { return };
    let req = session.req_header();
    // One pass over the headers: cheaper than three hashed lookups.
    let (mut host, mut user_agent, mut referer) = (&b""[..], &b""[..], &b""[..]);
    for (name, value) in &req.headers {
        if *name == http::header::HOST {
            host = value.as_bytes();
        } else if *name == http::header::USER_AGENT {
            user_agent = value.as_bytes();
        } else if *name == http::header::REFERER {
            referer = value.as_bytes();
        }
    }
    let request_id = request_id(ctx);
    let target = req
        .uri
        .path_and_query()
        .map_or_else(|| req.uri.path(), |p| p.as_str());
    let redact = ctx
        .route
        .map_or(&gw.default_log_redact, |id| &gw.log_redact[id]);
    let target = crate::access_log::redact_query(target, redact);
    let protocol = if session.as_ref().is_http2() {
        "HTTP/2.0"
    } else if req.version == http::Version::HTTP_10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    log.log(&Entry {
        time: std::time::SystemTime::now(),
        request_id,
        client_ip: ctx.plugins.client_ip,
        method: req.method.as_str(),
        host,
        target: &target,
        protocol,
        status: session.response_written().map_or(0, |r| r.status.as_u16()),
        request_bytes: session.body_bytes_read(),
        response_bytes: session.body_bytes_sent(),
        duration: start.elapsed(),
        upstream_time: ctx.upstream_time,
        gateway: &gw.name,
        route: ctx.route.map(|id| &*gw.route_names[id]),
        upstream: ctx.upstream.map(|u| &*rt.pools[u].name),
        peer: ctx.peer,
        cache: ctx.plugins.cache_status,
        user_agent,
        referer,
        consumer: ctx.plugins.consumer().map(|c| &**c),
        trace_id,
    });
}

/// One finished request on its route's metric handles (or the gateway's unmatched ones). A
/// background refresh is the cache's own request, not a client's: not counted.
pub(super) fn metrics(gw: &GatewayRt, session: &Session, ctx: &RequestCtx) {
    let Some(start) = ctx.start else { return };
    if session.subrequest_ctx.is_some() {
        return;
    }
    let m = ctx.route.map_or(&gw.unmatched, |id| &gw.metrics[id]);
    m.record(
        &session.req_header().method,
        session.response_written().map_or(0, |r| r.status.as_u16()),
        start.elapsed().as_secs_f64(),
        session.body_bytes_read(),
        session.body_bytes_sent(),
        ctx.plugins.cache_status,
    );
}
