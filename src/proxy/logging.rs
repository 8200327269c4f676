//! The access log line of a finished request, from what the request saw: its canonical head
//! (the host and path routing decided on, not the client's spelling), the route and peer it
//! went to, and what the plugins learnt (consumer, request id).
use pingora_proxy::Session;

use super::ctx::RequestCtx;
use crate::access_log::{AccessLog, Entry};
use crate::runtime::{GatewayRt, Runtime};

pub(super) fn access(
    log: &AccessLog,
    rt: &Runtime,
    gw: &GatewayRt,
    session: &Session,
    ctx: &RequestCtx,
) {
    let Some(start) = ctx.start else { return };
    // A background cache refresh is the gateway's own request.
    if session.subrequest_ctx.is_some() {
        return;
    }
    if ctx.route.is_some_and(|id| !gw.routes[id].access_log) {
        return;
    }
    let req = session.req_header();
    let header = |name: http::HeaderName| {
        req.headers
            .get(name)
            .map_or("", |v| std::str::from_utf8(v.as_bytes()).unwrap_or(""))
    };
    let request_id = ctx
        .plugins
        .request_id
        .as_ref()
        .map_or("", |v| std::str::from_utf8(v.as_bytes()).unwrap_or(""));
    let target = req
        .uri
        .path_and_query()
        .map_or_else(|| req.uri.path(), |p| p.as_str());
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
        host: header(http::header::HOST),
        target,
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
        user_agent: header(http::header::USER_AGENT),
        referer: header(http::header::REFERER),
        consumer: ctx.plugins.consumer.as_deref(),
        trace_id: None,
    });
}
