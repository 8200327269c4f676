//! request_filter's work once the request is canonical: the HTTPS redirect, the plugin chain,
//! 404, the target (terminal routes answer here), mirror sampling, upgrades.
use std::sync::Arc;

use gatehouse_plugins::authority::default_port;
use gatehouse_plugins::{Decision, Identity, Reply};
use http::{header, HeaderValue, StatusCode};
use pingora_error::Result;
use pingora_proxy::Session;

use super::errors::{message_for, write_reply};
use super::{balance, mirror, statics, GatewayProxy, RequestCtx};
use crate::runtime::Runtime;

impl GatewayProxy {
    /// request_filter's work: plugins, 404, upstream choice, mirror sampling, upgrades.
    pub(super) async fn route_request(
        &self,
        rt: &Arc<Runtime>,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        let gw = &rt.gateways[self.index];
        // A plain listener that only sends clients to HTTPS: before any plugin, as nginx's
        // `return 308` in a server block.
        if let Some(port) = gw.redirect_https {
            let reply = https_redirect(session.req_header(), port, ctx);
            write_reply(Some(gw), session, ctx, reply).await;
            return Ok(true);
        }
        let chain = gw.chain(ctx.route);
        // A background refresh (stale-while-revalidate) runs the chain too: auth plugins set
        // the identity headers the upstream answers by (a refresh without them could store an
        // anonymous answer for everyone). A rate limit counts the refresh once more.
        if let Decision::Respond(reply) = chain.request(session, &mut ctx.plugins).await? {
            write_reply(Some(gw), session, ctx, reply).await;
            return Ok(true);
        }
        if let (Identity::Anonymous, Some(id)) = (ctx.plugins.identity(), ctx.route) {
            // What no plugin verified may still be what the upstream answers by.
            // One pass over the request's few names (standard ones compare as integers):
            // cheaper than a hashed lookup per credential name.
            let creds = &gw.credentials[id];
            if session
                .req_header()
                .headers
                .keys()
                .any(|k| creds.contains(k))
            {
                ctx.plugins.carried_unchecked_credential();
            }
        }
        let Some(id) = ctx.route else {
            let reply = Reply::json_error(
                StatusCode::NOT_FOUND,
                message_for(None, 404),
                ctx.plugins.request_id(),
            );
            write_reply(Some(gw), session, ctx, reply).await;
            return Ok(true);
        };
        let route = &gw.routes[id];
        let Some(up) = balance::choose_upstream(&route.target, session, ctx) else {
            match &route.target {
                crate::config::Target::Static(site) => {
                    statics::serve(site, route, gw, session, ctx).await?;
                }
                crate::config::Target::Aggregate(agg) => {
                    crate::aggregate::serve(agg, rt, gw, id, session, ctx).await?;
                }
                _ => {}
            }
            return Ok(true);
        };
        ctx.upstream = Some(up);
        // A WebSocket is no request to mirror (nor to hold a mirror slot for its life).
        if let (Some(m), false) = (&route.mirror, session.is_upgrade_req()) {
            ctx.mirror = mirror::sample(
                m,
                &rt.pools[m.upstream],
                &gw.mirrors_in_flight[id],
                &gw.mirror_strip[id],
            );
        }
        if session.is_upgrade_req() {
            // The tunnel runs the later hooks itself, and they read the snapshot from ctx.
            ctx.rt = Some(rt.clone());
            self.tunnel(session, ctx, up).await?;
            return Ok(true);
        }
        if route.request_buffering > 0 && !session.as_mut().is_body_done() {
            ctx.body_held = super::buffering::read_ahead(session, route.request_buffering).await?;
        }
        Ok(false)
    }
}

/// 308 to the same host, path and query over HTTPS (on `port`, else 443); 400 without a Host.
fn https_redirect(
    req: &pingora_http::RequestHeader,
    port: Option<u16>,
    ctx: &mut RequestCtx,
) -> Reply {
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let location = ctx.plugins.authority.as_ref().and_then(|a| {
        let port = port
            .filter(|&p| p != default_port(true))
            .map_or(String::new(), |p| format!(":{p}"));
        HeaderValue::from_str(&format!("https://{}{port}{target}", a.host())).ok()
    });
    match location {
        Some(l) => Reply {
            status: StatusCode::PERMANENT_REDIRECT,
            headers: vec![(header::LOCATION, l)],
            body: bytes::Bytes::new(),
        },
        None => Reply::json_error(
            StatusCode::BAD_REQUEST,
            "no Host to redirect to",
            ctx.plugins.request_id(),
        ),
    }
}
