//! Errors become statuses in one place: who is at fault (the upstream, the client, or the
//! gateway), the status and message the client sees, and the gateway-made reply that carries
//! them with the request id.
use gatehouse_plugins::Reply;
use http::header;
use pingora_error::{Error, ErrorSource, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::{balance, RequestCtx};
use crate::runtime::GatewayRt;

/// What a finished request says about its upstream: `Some(true)` it served, `Some(false)` it
/// failed (a transport error of its own, or a 502–504 it answered), `None` nothing — the
/// client went away or was refused, or the gateway itself failed. Only verdicts reach the
/// breaker; passive health and retries are fed the same way, per try.
pub(super) fn upstream_verdict(e: Option<&Error>, upstream_failed: bool) -> Option<bool> {
    match e {
        _ if upstream_failed => Some(false),
        None => Some(true),
        Some(e) if e.esource() == &ErrorSource::Upstream => Some(false),
        Some(_) => None,
    }
}

/// Maps an error to the status the client sees; 0 means the client is gone.
pub fn status_for(e: &Error) -> u16 {
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (_, HTTPStatus(code)) => *code,
        (_, Custom(balance::CIRCUIT_OPEN | balance::NO_PEER)) => 503,
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => 0,
        (ErrorSource::Downstream, ReadTimedout | WriteTimedout) => 408,
        (ErrorSource::Downstream, _) => 400,
        (_, ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout) => 504,
        (ErrorSource::Upstream, _) => 502,
        (
            _,
            ConnectRefused | ConnectError | ConnectNoRoute | ConnectionClosed | TLSHandshakeFailure,
        ) => 502,
        _ => 500,
    }
}

/// An error for what the client did: answered with `status`, never held against an upstream,
/// and `why` is told to the client.
pub fn client_error(status: u16, why: &'static str) -> Box<Error> {
    let mut e = Error::explain(ErrorType::HTTPStatus(status), why);
    e.esource = ErrorSource::Downstream;
    e
}

pub(super) fn message_for(e: Option<&Error>, status: u16) -> &str {
    if let Some(e) = e {
        if e.etype() == &ErrorType::Custom(balance::CIRCUIT_OPEN) {
            return "upstream circuit open";
        }
        // Refusals of a client's request (ours and the plugins') say why.
        if matches!(e.etype(), ErrorType::HTTPStatus(_)) && e.esource() == &ErrorSource::Downstream
        {
            if let Some(c) = &e.context {
                return c.as_str();
            }
        }
    }
    match status {
        400 => "bad request",
        404 => "no route matches this request",
        408 => "request timed out",
        413 => "request body too large",
        431 => "request header too large",
        502 => "upstream connection failed",
        503 => "no upstream peer available",
        504 => "upstream timed out",
        _ => "internal error",
    }
}

/// Writes a gateway-made reply: response hooks of the request's chain first, then header and
/// body. Errors writing mean the client is gone; there is nobody left to tell.
pub(crate) async fn write_reply(
    gw: Option<&GatewayRt>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    reply: Reply,
) {
    let mut resp = match ResponseHeader::build(reply.status, Some(reply.headers.len() + 3)) {
        Ok(r) => r,
        Err(_) => return,
    };
    for (name, value) in reply.headers {
        let _ = resp.append_header(name, value);
    }
    // A 204 or 304 has no body and must not say it has one (RFC 9110 §8.6).
    if !matches!(reply.status.as_u16(), 204 | 304) {
        let _ = resp.insert_header(header::CONTENT_LENGTH, reply.body.len());
    }
    if let Some(gw) = gw {
        gw.stamp(&mut resp);
        let chain = gw.chain(ctx.route);
        if let Err(e) = chain.response(session, &mut resp, &mut ctx.plugins).await {
            log::warn!("response plugin failed on a gateway reply: {e}");
        }
    }
    ctx.replied = true;
    let head_only = session.req_header().method == http::Method::HEAD;
    if session
        .write_response_header(Box::new(resp), head_only)
        .await
        .is_ok()
        && !head_only
    {
        let _ = session.write_response_body(Some(reply.body), true).await;
    }
}
