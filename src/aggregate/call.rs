//! One part's call: peer selection, circuit breaker, retries within the budget, timeouts,
//! passive health and metrics, over a keep-alive pool of the parts' own.
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{header, Method};
use pingora::connectors::http::Connector;
use pingora::upstreams::peer::HttpPeer;
use pingora_error::ErrorType;
use pingora_http::RequestHeader;

use super::{failure, Failure};
use crate::config::aggregate::Part;
use crate::runtime::Runtime;
use crate::upstream::breaker::{Admit, Breaker};
use crate::upstream::{Pool, Tried};

/// The parts' keep-alive pool (Pingora's proxy keeps its own, which is private to it), as large
/// as the proxy's: `[server] upstream_keepalive_pool`.
static CONNECTOR: LazyLock<Connector> = LazyLock::new(|| {
    let size = POOL_SIZE.get().copied().unwrap_or(256);
    Connector::new(Some(pingora::connectors::ConnectorOptions::new(size)))
});
static POOL_SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Called once at start, before any request.
pub fn set_pool_size(n: usize) {
    let _ = POOL_SIZE.set(n);
}

/// A circuit breaker's probe is answered whatever happens to the call: recorded, or given
/// back when the call is dropped (the whole answer failed early, or its deadline passed).
struct Verdict<'a> {
    breaker: Option<&'a Breaker>,
    probe: Option<u64>,
    done: bool,
}

impl Verdict<'_> {
    fn record(&mut self, ok: bool) {
        if let Some(b) = self.breaker {
            b.record(ok, self.probe);
        }
        self.done = true;
    }
}

impl Drop for Verdict<'_> {
    fn drop(&mut self) {
        if let (false, Some(b), Some(p)) = (self.done, self.breaker, self.probe) {
            b.abandon(p);
        }
    }
}

enum Exchange {
    Pingora(Box<pingora_error::Error>),
    TooLarge(usize),
}

impl From<Box<pingora_error::Error>> for Exchange {
    fn from(e: Box<pingora_error::Error>) -> Self {
        Exchange::Pingora(e)
    }
}

/// One request to one peer: status and body (at most `max` bytes).
async fn exchange(
    peer: &HttpPeer,
    req: &RequestHeader,
    body: Option<&Bytes>,
    max: usize,
) -> std::result::Result<(u16, Bytes), Exchange> {
    // A pooled connection the peer has closed meanwhile fails at once: one more try on
    // another (or a new) connection is no retry of the request.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (mut s, reused) = CONNECTOR.get_http_session(peer).await?;
        s.set_read_timeout(peer.options.read_timeout);
        s.set_write_timeout(peer.options.write_timeout);
        let sent = async {
            s.write_request_header(Box::new(req.clone())).await?;
            if let Some(b) = body {
                s.write_request_body(b.clone(), true).await?;
            }
            s.finish_request_body().await?;
            loop {
                s.read_response_header().await?;
                match s.response_header().map(|h| h.status.as_u16()) {
                    Some(100..=199) => continue,
                    Some(st) => return Ok(st),
                    None => {
                        return Err(pingora_error::Error::explain(
                            ErrorType::InvalidHTTPHeader,
                            "no response header",
                        ))
                    }
                }
            }
        }
        .await;
        let status = match sent {
            Ok(st) => st,
            // Not with a body: the peer may have acted on it before the connection closed.
            Err(e)
                if reused
                    && body.is_none()
                    && attempts < 3
                    && !matches!(
                        e.etype(),
                        ErrorType::ReadTimedout | ErrorType::WriteTimedout
                    ) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        let declared = s
            .response_header()
            .and_then(|h| h.headers.get(header::CONTENT_LENGTH))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(Exchange::TooLarge(max));
        }
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
        while let Some(chunk) = s.read_response_body().await? {
            if buf.len() + chunk.len() > max {
                return Err(Exchange::TooLarge(max));
            }
            buf.extend_from_slice(&chunk);
        }
        CONNECTOR
            .release_http_session(s, peer, peer.options.idle_timeout)
            .await;
        return Ok((status, buf.freeze()));
    }
}

/// What the part is sent, besides its path.
pub(super) struct Call<'a> {
    pub(super) method: &'a Method,
    pub(super) base: &'a RequestHeader,
    pub(super) body: Option<&'a Bytes>,
    pub(super) client: &'a RequestHeader,
    pub(super) client_ip: Option<std::net::IpAddr>,
}

/// One part: peer selection, breaker, retries, its timeout; the body when the answer is 2xx.
pub(super) async fn call(
    rt: &Runtime,
    part: &Part,
    path: String,
    c: &Call<'_>,
    deadline: Instant,
) -> std::result::Result<Bytes, Failure> {
    let pool: &Arc<Pool> = &rt.pools[part.upstream];
    let name = &pool.name;
    if deadline <= Instant::now() {
        return Err(failure(
            "timeout",
            504,
            "not started: the route's timeout had passed",
        ));
    }
    let mut verdict = Verdict {
        breaker: pool.breaker.as_ref(),
        probe: None,
        done: true,
    };
    if let Some(b) = &pool.breaker {
        match b.admit() {
            Admit::No => {
                return Err(failure(
                    "circuit_open",
                    503,
                    format!("upstream \"{name}\": circuit open"),
                ))
            }
            Admit::Probe(n) => verdict.probe = Some(n),
            Admit::Yes => {}
        }
        verdict.done = false;
    }
    let retries = pool.cfg.retry.retries;
    if retries > 0 {
        pool.budget.deposit();
    }
    let mut buf = [0u8; 16];
    let key = if pool.cfg.selection == crate::config::Selection::ConsistentHash {
        crate::upstream::key::hash_input(&pool.cfg.hash_key, c.client, c.client_ip, &mut buf)
    } else {
        &[]
    };
    // The part's own timeout, when it ends before the route's deadline: only then is running
    // out of time the upstream's slowness. A part cut by the route's deadline may have had
    // little time left (a slow parent part, a slow client body): no verdict on its upstream.
    let own = part
        .timeout
        .map(|t| Instant::now() + t)
        .filter(|&u| u <= deadline);
    let until = own.unwrap_or(deadline);
    let replayable = c.body.is_none();
    let (mut tried, mut tries) = (Tried::default(), 0);
    loop {
        let Some(idx) = pool.select(key, &tried) else {
            verdict.record(false);
            return Err(failure(
                "no_peer",
                503,
                format!("upstream \"{name}\" has no available peer"),
            ));
        };
        tried.insert(idx);
        let _in_flight = pool.start(idx);
        let peer = pool.peer(idx);
        let mut req = RequestHeader::build(
            c.method.clone(),
            path.as_bytes(),
            Some(c.base.headers.len() + 2),
        )
        .map_err(|e| failure("bad_path", 502, format!("path {path}: {e}")))?;
        for (n, v) in &c.base.headers {
            req.append_header(n.clone(), v.clone())
                .map_err(|e| failure("bad_header", 502, e.to_string()))?;
        }
        let _ = req.insert_header(header::HOST, pool.host(idx));
        if let Some(b) = c.body {
            let _ = req.insert_header(header::CONTENT_LENGTH, b.len());
        }
        let may_retry = |tries: &mut usize, tried: &Tried| {
            let ok = *tries < retries && pool.has_untried(tried) && pool.budget.withdraw();
            if ok {
                *tries += 1;
                pool.retries.inc();
            }
            ok
        };
        let started = Instant::now();
        let left = until.saturating_duration_since(started);
        match tokio::time::timeout(left, exchange(&peer, &req, c.body, part.max_bytes)).await {
            Err(_) => {
                if own.is_some() {
                    pool.report(idx, false);
                    verdict.record(false);
                }
                return Err(failure(
                    "timeout",
                    504,
                    format!("upstream \"{name}\" did not answer in time"),
                ));
            }
            Ok(Ok((status, body))) => {
                pool.upstream_time.observe(started.elapsed().as_secs_f64());
                pool.report(idx, !pool.is_failure_status(status));
                if replayable
                    && pool.cfg.retry.on_status.contains(&status)
                    && may_retry(&mut tries, &tried)
                {
                    continue;
                }
                verdict.record(!crate::proxy::balance::breaker_failure(status));
                if !(200..300).contains(&status) {
                    return Err(Failure {
                        kind: "status",
                        message: format!("upstream \"{name}\" answered {status}"),
                        upstream_status: Some(status),
                        status: 502,
                    });
                }
                return Ok(body);
            }
            Ok(Err(Exchange::TooLarge(max))) => {
                // The peer answered; the limit is ours.
                pool.report(idx, true);
                verdict.record(true);
                return Err(failure(
                    "too_large",
                    502,
                    format!("the answer of upstream \"{name}\" is over {max} bytes"),
                ));
            }
            Ok(Err(Exchange::Pingora(e))) => {
                pool.report(idx, false);
                let connect = matches!(
                    e.etype(),
                    ErrorType::ConnectRefused
                        | ErrorType::ConnectError
                        | ErrorType::ConnectNoRoute
                        | ErrorType::ConnectTimedout
                );
                if (connect || replayable) && may_retry(&mut tries, &tried) {
                    continue;
                }
                verdict.record(false);
                let (kind, status) = match e.etype() {
                    ErrorType::ConnectTimedout
                    | ErrorType::ReadTimedout
                    | ErrorType::WriteTimedout => ("timeout", 504),
                    _ if connect => ("connect", 502),
                    _ => ("upstream", 502),
                };
                return Err(failure(
                    kind,
                    status,
                    format!("upstream \"{name}\": {}", e.etype().as_str()),
                ));
            }
        }
    }
}
