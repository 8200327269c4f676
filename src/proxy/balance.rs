//! Upstream choice for one request: split (canary) arm, circuit breaker, peer selection,
//! and the retry policy (which failures, how many, within the budget).
use std::sync::Arc;

use pingora::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result, RetryType};
use pingora_proxy::Session;

use crate::config::{Selection, Target};
use crate::runtime::Runtime;
use crate::upstream::breaker::Admit;
use crate::upstream::key::{hash_input, stable_hash};
use crate::upstream::Pool;

use super::RequestCtx;

/// The error for an open circuit: a 503 without calling the upstream.
pub const CIRCUIT_OPEN: &str = "circuit open";
/// The error for an upstream with no usable peer: a 503.
pub const NO_PEER: &str = "no peer";

/// Statuses the circuit breaker counts as failures, with transport errors: the gateway-ish
/// ones, not an application's own 500.
pub fn breaker_failure(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// The upstream of a route: its own, or a split arm (sticky by key when configured); `None`
/// for routes the gateway answers itself.
pub fn choose_upstream(target: &Target, session: &Session, ctx: &RequestCtx) -> Option<usize> {
    let up = match target {
        Target::Static(_) | Target::Aggregate(_) => return None,
        Target::Upstream(u) => *u,
        Target::Split { arms, sticky } => {
            let total: u64 = arms.iter().map(|(_, w)| u64::from(*w)).sum();
            let mut buf = [0u8; 16];
            let input = sticky
                .as_ref()
                .map(|k| hash_input(k, session.req_header(), ctx.plugins.client_ip, &mut buf))
                .filter(|i| !i.is_empty());
            let mut point = match input {
                Some(i) => stable_hash(i),
                None => gatehouse_plugins::random_u64(),
            } % total.max(1);
            for (u, w) in arms {
                if point < u64::from(*w) {
                    return Some(*u);
                }
                point -= u64::from(*w);
            }
            arms.last().map_or(usize::MAX, |(u, _)| *u)
        }
    };
    Some(up)
}

fn err(kind: &'static str, why: String) -> Box<Error> {
    let mut e = Error::explain(ErrorType::Custom(kind), why);
    e.esource = ErrorSource::Upstream;
    e
}

/// Picks the peer for the next try of this request.
pub fn select_peer(
    rt: &Runtime,
    up: usize,
    session: &Session,
    ctx: &mut RequestCtx,
) -> Result<Box<HttpPeer>> {
    let pool: &Arc<Pool> = &rt.pools[up];
    if ctx.peer_idx.is_none() {
        if let Some(b) = &pool.breaker {
            match b.admit() {
                Admit::No => {
                    return Err(err(
                        CIRCUIT_OPEN,
                        format!("upstream \"{}\": circuit open", pool.name),
                    ))
                }
                Admit::Probe(n) => ctx.probe = Some(n),
                Admit::Yes => {}
            }
            ctx.admitted = true;
        }
        if pool.cfg.retry.retries > 0 {
            pool.budget.deposit();
        }
    }
    let mut buf = [0u8; 16];
    let key = if pool.cfg.selection == Selection::ConsistentHash {
        hash_input(
            &pool.cfg.hash_key,
            session.req_header(),
            ctx.plugins.client_ip,
            &mut buf,
        )
    } else {
        &[]
    };
    let Some(idx) = pool.select(key, &ctx.tried) else {
        ctx.upstream_failed = true;
        return Err(err(
            NO_PEER,
            format!("upstream \"{}\" has no available peer", pool.name),
        ));
    };
    ctx.tried.insert(idx);
    ctx.peer_idx = Some(idx);
    ctx.peer = Some(pool.addr(idx));
    ctx.inflight = pool.start(idx);
    Ok(pool.peer(idx))
}

/// Whether the failed try may be retried on another peer: retries left, the request safe to
/// send again (`replayable`), nothing sent to the client yet, a peer left to try, and the
/// budget not spent. Counts the retry when it says yes.
pub fn may_retry(pool: &Pool, session: &Session, ctx: &mut RequestCtx, replayable: bool) -> bool {
    let ok = replayable
        && ctx.retries < pool.cfg.retry.retries
        && session.response_written().is_none()
        && pool.has_untried(&ctx.tried)
        && pool.budget.withdraw();
    if ok {
        ctx.retries += 1;
        pool.retries.inc();
    }
    ok
}

/// Idempotent, with its body still replayable: safe to send again after it reached a peer.
pub fn idempotent(session: &Session) -> bool {
    session.req_header().method.is_idempotent() && !session.as_ref().retry_buffer_truncated()
}

/// A failed connect never reached the peer: safe to retry elsewhere, whatever the method.
pub fn after_connect_failure(
    session: &Session,
    ctx: &mut RequestCtx,
    mut e: Box<Error>,
) -> Box<Error> {
    let retry = match (ctx.rt.clone(), ctx.upstream, ctx.peer_idx) {
        (Some(rt), Some(up), Some(idx)) => {
            let pool = &rt.pools[up];
            pool.no_answer(idx);
            ctx.upstream_failed = true;
            may_retry(pool, session, ctx, true)
        }
        _ => false,
    };
    e.set_retry(retry);
    e
}

/// Errors after the connection was made. A reused keep-alive connection that the peer had
/// closed is retried once on a fresh one, without counting against the peer; other
/// failures count, and are retried only for idempotent requests.
pub fn after_proxy_failure(
    peer: &HttpPeer,
    session: &mut Session,
    e: Box<Error>,
    ctx: &mut RequestCtx,
    client_reused: bool,
) -> Box<Error> {
    let mut e = e;
    if std::mem::take(&mut ctx.status_retry) {
        // Raised by upstream_response_filter, already decided and counted.
        return e;
    }
    let replayable = idempotent(session);
    // A held body can be sent again, but a request that is not idempotent only when the
    // peer closed before a byte of its answer (Pingora says how many it had read): after
    // that the peer may have acted on it (RFC 9110 §9.2.2).
    let unanswered = || {
        e.context
            .as_ref()
            .is_some_and(|c| c.as_str().ends_with("bytes already read: 0"))
    };
    if client_reused
        && (replayable || (ctx.body_held && unanswered()))
        && matches!(e.retry, RetryType::ReusedOnly)
        && !std::mem::replace(&mut ctx.fresh_retry, true)
    {
        // A pooled connection the peer had closed before answering: tried again once, on
        // a new connection (the peer's other idle ones are dropped with it: Pingora would
        // take the next pooled one, and the next, 16 times over for one GET when an
        // upstream closes them all). The same peer may serve it; nothing is counted.
        if let (Some(rt), Some(up), Some(idx)) = (&ctx.rt, ctx.upstream, ctx.peer_idx) {
            rt.pools[up].drop_idle(idx);
            ctx.tried.remove(idx);
        }
        e.set_retry(true);
        return e;
    }
    e.set_retry(false);
    // An upstream that times out waiting while the client is still sending its body may
    // be waiting for that body: nobody's verdict (a slow upload must not eject a peer).
    if e.esource() == &ErrorSource::Upstream
        && e.etype() == &ErrorType::ReadTimedout
        && !session.is_body_done()
    {
        e.esource = ErrorSource::Internal;
    }
    // Only the upstream's own failures count against it and are retried: not the
    // client's (a body over a limit, a disconnect), not ours. The peer is named in the
    // log for those alone: a client's error reply must not show upstream addresses.
    if e.esource() != &ErrorSource::Upstream {
        return e;
    }
    let mut e = e.more_context(format!("Peer: {peer}"));
    if let (Some(rt), Some(up), Some(idx)) = (ctx.rt.clone(), ctx.upstream, ctx.peer_idx) {
        let pool = &rt.pools[up];
        pool.no_answer(idx);
        ctx.upstream_failed = true;
        let retry = may_retry(pool, session, ctx, replayable);
        e.set_retry(retry);
    }
    e
}
