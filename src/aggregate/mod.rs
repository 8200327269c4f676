//! Aggregate routes: one client request, several upstream calls ("parts") in parallel, one
//! JSON object back. A part starts as soon as the parts it reads values from are in, so the
//! slowest chain bounds the latency, not the sum. Each call goes through the same upstream
//! machinery as a proxied request: peer selection (health, ejection, consistent hash), the
//! circuit breaker, retries within the retry budget, the pool's timeouts, passive health and
//! the upstream metrics; connections are kept alive in a pool of their own.
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use gatehouse_plugins::{json_string, Reply};
use http::{header, HeaderValue, Method, StatusCode};
use pingora_error::Result;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use serde_json::Value;

use crate::config::aggregate::Aggregate;
use crate::proxy::RequestCtx;
use crate::runtime::{GatewayRt, Runtime};

mod call;
mod render;

pub use call::set_pool_size;
use call::{call, Call};
use render::{render, Inputs};

/// Why a part has no value.
#[derive(Debug, Clone)]
struct Failure {
    kind: &'static str,
    message: String,
    /// What the upstream answered, when it did.
    upstream_status: Option<u16>,
    /// The status this failure gives the whole answer under `on_error = "fail"`.
    status: u16,
}

fn failure(kind: &'static str, status: u16, message: impl Into<String>) -> Failure {
    Failure {
        kind,
        message: message.into(),
        upstream_status: None,
        status,
    }
}

/// What a part came back with.
type Outcome = std::result::Result<(Bytes, Option<Value>), Failure>;

/// Answers an aggregate route: runs the parts, merges their bodies, writes the reply.
pub async fn serve(
    agg: &Aggregate,
    rt: &Arc<Runtime>,
    gw: &GatewayRt,
    id: usize,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<()> {
    let start = Instant::now();
    let method = session.req_header().method.clone();
    // The client's body, for parts marked `body` on a route that takes one.
    let body =
        if agg.parts.iter().any(|p| p.body) && method != Method::GET && method != Method::HEAD {
            let mut b = BytesMut::new();
            let h2 = session.as_ref().is_http2();
            if h2 {
                crate::front::h2_body_expected(!session.as_mut().is_body_done());
            }
            while let Some(chunk) = session.read_request_body().await? {
                if h2 {
                    crate::front::h2_body_read(session.as_mut().is_body_done());
                }
                if b.len() + chunk.len() > agg.max_bytes {
                    let reply = Reply::json_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body too large",
                        ctx.plugins.request_id(),
                    );
                    crate::proxy::write_reply(Some(gw), session, ctx, reply).await;
                    return Ok(());
                }
                b.extend_from_slice(&chunk);
            }
            if h2 {
                crate::front::h2_body_read(true);
            }
            Some(b.freeze())
        } else {
            None
        };

    // What every part is sent: the chosen client headers, X-Forwarded-* (from the client
    // request behind a trusted proxy), then what the route's plugins add to an upstream
    // request (request id, identity headers, transforms) and trace context.
    let mut base = RequestHeader::build(Method::GET, b"/", None)?;
    {
        let client = session.req_header();
        for name in &agg.forward {
            for v in client.headers.get_all(name) {
                base.append_header(name.clone(), v.clone())?;
            }
        }
    }
    let peer_ip = crate::proxy::forwarded::peer_ip(session);
    let trusted =
        peer_ip.is_some_and(|ip| crate::proxy::forwarded::is_trusted(&rt.trusted_proxies, ip));
    if trusted {
        // The client request's, as a proxied request starts from; then X-Forwarded-*, then
        // the plugins (as upstream_request_filter orders them).
        crate::proxy::forwarded::copy_from_trusted(session.req_header(), &mut base)?;
    }
    crate::proxy::forwarded::set_headers(
        &mut base,
        gw.forwarded,
        peer_ip,
        trusted,
        gw.tls,
        ctx.plugins.authority.as_ref(),
    )?;
    gw.chains[id]
        .upstream_request(session, &mut base, &mut ctx.plugins)
        .await?;
    if let Some(span) = &ctx.span {
        rt.tracing.inject(span, &mut base);
    }
    // The route's time starts when the client's part is done: a slow body is not the parts'.
    let parts_start = Instant::now();
    base.remove_header(&header::HOST);

    let outcomes = {
        let client = session.req_header();
        let groups = match &gw.routes[id].path {
            crate::config::PathMatch::Regex(re) => re.captures(client.uri.path()),
            _ => None,
        };
        let inputs = Inputs {
            groups,
            query: client.uri.query().unwrap_or(""),
            headers: &client.headers,
            consumer: ctx.plugins.consumer().map(|c| &**c),
            claims: ctx.plugins.claims.as_deref(),
        };
        let get = Method::GET;
        // The client's method goes with its body only; without one (GET, HEAD) a part is a GET.
        let with_body = Call {
            method: if body.is_some() { &method } else { &get },
            base: &base,
            body: body.as_ref(),
            client,
            client_ip: ctx.plugins.client_ip,
        };
        let plain = Call {
            method: &get,
            base: &base,
            body: None,
            client,
            client_ip: ctx.plugins.client_ip,
        };
        run(
            agg,
            rt,
            &inputs,
            &with_body,
            &plain,
            parts_start + agg.timeout,
        )
        .await
    };
    let (outcomes, cause) = outcomes;
    ctx.upstream_time = Some(start.elapsed());
    let rid = String::from_utf8_lossy(ctx.plugins.request_id().as_bytes()).into_owned();
    let reply = merge(agg, outcomes, cause, &rid);
    crate::proxy::write_reply(Some(gw), session, ctx, reply).await;
    Ok(())
}

/// Runs the parts as their inputs come in; under `fail`, stops at the first failed part (not
/// optional) and names it.
async fn run(
    agg: &Aggregate,
    rt: &Runtime,
    inp: &Inputs<'_>,
    with_body: &Call<'_>,
    plain: &Call<'_>,
    deadline: Instant,
) -> (Vec<Option<Outcome>>, Option<usize>) {
    let n = agg.parts.len();
    let mut done: Vec<Option<Outcome>> = vec![None; n];
    let mut values: Vec<Option<Value>> = vec![None; n];
    let mut running = FuturesUnordered::new();
    let mut total = 0usize;
    // Parts whose inputs are all in (or failed), to start or to skip.
    let mut ready: Vec<usize> = (0..n).filter(|&i| agg.parts[i].deps.is_empty()).collect();
    let mut cause = None;
    'run: loop {
        while let Some(i) = ready.pop() {
            let part = &agg.parts[i];
            let failed_dep = part.deps.iter().find(|&&d| matches!(done[d], Some(Err(_))));
            let path = match failed_dep {
                Some(&d) => {
                    let cause = match &done[d] {
                        Some(Err(f)) => f.status,
                        _ => 502,
                    };
                    Err(failure(
                        "skipped",
                        cause,
                        format!("not run: part \"{}\" failed", agg.parts[d].name),
                    ))
                }
                None => render(agg, i, inp, &values),
            };
            match path {
                Ok(path) => {
                    let c = if part.body { with_body } else { plain };
                    running.push(async move { (i, call(rt, part, path, c, deadline).await) });
                }
                Err(f) => {
                    done[i] = Some(Err(f));
                    if agg.fail && !part.optional {
                        cause = Some(i);
                        break 'run;
                    }
                    ready.extend(unblocked(agg, i, &done));
                }
            }
        }
        if running.is_empty() {
            break;
        }
        // The parts' own timeouts end at the deadline; this only guards against a stuck one.
        let next = tokio::time::timeout_at(
            (deadline + Duration::from_millis(100)).into(),
            running.next(),
        )
        .await;
        let Ok(Some((i, result))) = next else { break };
        let part = &agg.parts[i];
        let mut outcome = result.and_then(|body| {
            total += body.len();
            if total > agg.max_bytes {
                return Err(failure(
                    "too_large",
                    502,
                    format!(
                        "the parts' answers together are over {} bytes",
                        agg.max_bytes
                    ),
                ));
            }
            if part.raw {
                return Ok((body, None));
            }
            if body.iter().all(u8::is_ascii_whitespace) {
                return Err(failure(
                    "empty",
                    502,
                    "empty answer where JSON was expected",
                ));
            }
            if part.parsed {
                let v: Value = serde_json::from_slice(&body)
                    .map_err(|e| failure("invalid_json", 502, format!("not JSON: {e}")))?;
                Ok((body, Some(v)))
            } else {
                serde_json::from_slice::<serde::de::IgnoredAny>(&body)
                    .map_err(|e| failure("invalid_json", 502, format!("not JSON: {e}")))?;
                Ok((body, None))
            }
        });
        if let Ok((_, v)) = &mut outcome {
            values[i] = v.take();
        }
        let stop = agg.fail && !part.optional && outcome.is_err();
        done[i] = Some(outcome);
        if stop {
            cause = Some(i);
            break;
        }
        ready.extend(unblocked(agg, i, &done));
    }
    let unfinished = match cause {
        Some(c) => failure(
            "cancelled",
            502,
            format!("stopped: part \"{}\" failed", agg.parts[c].name),
        ),
        None => failure(
            "timeout",
            504,
            format!(
                "not in before the route's timeout ({} ms)",
                agg.timeout.as_millis()
            ),
        ),
    };
    for d in done.iter_mut().filter(|d| d.is_none()) {
        *d = Some(Err(unfinished.clone()));
    }
    (done, cause)
}

/// The dependents of `i` whose inputs are all in now.
fn unblocked(agg: &Aggregate, i: usize, done: &[Option<Outcome>]) -> Vec<usize> {
    agg.dependents[i]
        .iter()
        .copied()
        .filter(|&j| agg.parts[j].deps.iter().all(|&d| done[d].is_some()))
        .collect()
}

/// One JSON object keyed by part name; `errors` says why each missing part is missing.
fn merge(
    agg: &Aggregate,
    outcomes: Vec<Option<Outcome>>,
    cause: Option<usize>,
    request_id: &str,
) -> Reply {
    let mut order: Vec<usize> = (0..agg.parts.len()).collect();
    order.sort_by(|&a, &b| agg.parts[a].name.cmp(&agg.parts[b].name));
    let caused = cause.and_then(|i| match &outcomes[i] {
        Some(Err(f)) => Some((i, f)),
        _ => None,
    });
    // The part that stopped the others, else the first failed required part (a part skipped
    // for another's failure only when there is nothing else to name).
    let failed = |skips: bool| {
        order.iter().find_map(|&i| match &outcomes[i] {
            Some(Err(f)) if !agg.parts[i].optional && (skips || f.kind != "skipped") => {
                Some((i, f))
            }
            _ => None,
        })
    };
    let first_failure = caused.or_else(|| failed(false)).or_else(|| failed(true));
    if let (true, Some((i, f))) = (agg.fail, first_failure) {
        let body = format!(
            "{{\"status\":{},\"error\":{},\"part\":{},\"request_id\":{}}}",
            f.status,
            json_string(&format!(
                "part \"{}\" failed: {}",
                agg.parts[i].name, f.message
            )),
            json_string(&agg.parts[i].name),
            json_string(request_id)
        );
        return json_reply(f.status, body.into_bytes());
    }
    let size: usize = outcomes
        .iter()
        .flatten()
        .map(|o| o.as_ref().map_or(8, |(b, _)| b.len() + 2))
        .sum();
    let mut out = Vec::with_capacity(size + 32 * order.len() + 2);
    out.push(b'{');
    let mut errors = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        let p = &agg.parts[i];
        out.extend_from_slice(json_string(&p.name).as_bytes());
        out.push(b':');
        match &outcomes[i] {
            Some(Ok((body, _))) if p.raw => {
                out.extend_from_slice(json_string(&String::from_utf8_lossy(body)).as_bytes())
            }
            Some(Ok((body, _))) => out.extend_from_slice(body.trim_ascii()),
            Some(Err(f)) => {
                out.extend_from_slice(b"null");
                errors.push((i, f));
            }
            None => out.extend_from_slice(b"null"),
        }
    }
    if !errors.is_empty() {
        out.extend_from_slice(b",\"errors\":{");
        for (k, (i, f)) in errors.iter().enumerate() {
            if k > 0 {
                out.push(b',');
            }
            let status = f
                .upstream_status
                .map_or(String::new(), |s| format!(",\"upstream_status\":{s}"));
            out.extend_from_slice(
                format!(
                    "{}:{{\"error\":{},\"message\":{}{status}}}",
                    json_string(&agg.parts[*i].name),
                    json_string(f.kind),
                    json_string(&f.message)
                )
                .as_bytes(),
            );
        }
        out.push(b'}');
    }
    out.push(b'}');
    let all_failed = outcomes.iter().all(|o| matches!(o, Some(Err(_))));
    let status = match first_failure {
        Some((_, f)) if all_failed => f.status,
        Some(_) => agg.partial_status,
        None => 200,
    };
    json_reply(status, out)
}

fn json_reply(status: u16, body: Vec<u8>) -> Reply {
    Reply {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        headers: vec![
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body: Bytes::from(body),
    }
}
