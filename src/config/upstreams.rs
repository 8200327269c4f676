//! `[upstreams.NAME]` → [`Upstream`]: selection, hash key, health checks, passive health,
//! circuit breaker and retries, each value checked with its place in the file.
use std::ops::Range;
use std::time::Duration;

use http::HeaderName;

use super::build::Loader;
use super::file::UpstreamFile;
use super::*;

const SELECTIONS: &str = "round_robin, random, consistent_hash, least_conn";

/// `client_ip`, `header:NAME`, `cookie:NAME` or `path`.
pub(super) fn parse_hash_key(s: &str) -> Result<HashKey, String> {
    let bad = || format!("invalid key \"{s}\": write client_ip, header:NAME, cookie:NAME or path");
    Ok(match s.split_once(':') {
        None if s == "client_ip" => HashKey::ClientIp,
        None if s == "path" => HashKey::Path,
        Some(("header", name)) => {
            HashKey::Header(HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?)
        }
        Some(("cookie", name)) if !name.trim().is_empty() && !name.contains([';', '=', ' ']) => {
            HashKey::Cookie(name.trim().to_string())
        }
        _ => return Err(bad()),
    })
}

fn statuses(ld: &mut Loader, list: &[toml::Spanned<u16>], ctx: &str) -> Vec<u16> {
    let mut out = Vec::new();
    for s in list {
        if !(100..=599).contains(s.get_ref()) {
            ld.err(
                s.span(),
                ctx,
                format!("{} is not an HTTP status", s.get_ref()),
            );
        } else {
            out.push(*s.get_ref());
        }
    }
    out
}

pub(super) fn upstream(
    ld: &mut Loader,
    config: &std::path::Path,
    name: &str,
    u: UpstreamFile,
    span: Range<usize>,
    ctx: &str,
) -> Option<Upstream> {
    let errors_before = ld.errors.len();
    let selection = match u.selection.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("round_robin") => Selection::RoundRobin,
        Some("random") => Selection::Random,
        Some("consistent_hash") => Selection::ConsistentHash,
        Some("least_conn") => Selection::LeastConn,
        Some(other) => {
            let s = u.selection.as_ref().map_or(span.clone(), |s| s.span());
            ld.err(
                s,
                ctx,
                format!("unknown selection \"{other}\", expected one of: {SELECTIONS}"),
            );
            Selection::RoundRobin
        }
    };
    let hash_key = match &u.hash_key {
        None => HashKey::ClientIp,
        Some(k) => {
            if selection != Selection::ConsistentHash {
                ld.err(
                    k.span(),
                    ctx,
                    "`hash_key` only applies to selection = \"consistent_hash\"",
                );
            }
            parse_hash_key(k.get_ref()).unwrap_or_else(|e| {
                ld.err(k.span(), ctx, e);
                HashKey::ClientIp
            })
        }
    };
    let mut peers = Vec::new();
    for p in &u.peers {
        // Pingora's weighted selection repeats a peer `weight` times in a table.
        if !(1..=1000).contains(&p.get_ref().weight) {
            ld.err(p.span(), ctx, "peer weight must be between 1 and 1000");
        }
        if peers.iter().any(|q: &Peer| q.addr == p.get_ref().addr.0) {
            ld.err(
                p.span(),
                ctx,
                format!("peer {} is listed twice", p.get_ref().addr.0),
            );
        }
        peers.push(Peer {
            addr: p.get_ref().addr.0,
            weight: p.get_ref().weight,
            name: p.get_ref().addr.1.clone(),
            sni: String::new(),
        });
    }
    let (tls_peer, http2) =
        super::upstream_tls::upstream_tls(ld, config, &u, &mut peers, span.clone(), ctx);

    let health_check = u.health_check.as_ref().map(|h| {
        let hspan = h.span();
        let h = h.get_ref();
        let kind = match h.kind.get_ref().as_str() {
            "tcp" => {
                if let Some(p) = &h.path {
                    ld.err(
                        p.span(),
                        ctx,
                        "`path` only applies to kind = \"http\" health checks",
                    );
                }
                HealthKind::Tcp
            }
            "http" => {
                let path = h
                    .path
                    .as_ref()
                    .map_or("/".to_string(), |p| p.get_ref().clone());
                if !path.starts_with('/') {
                    let s = h.path.as_ref().map_or(hspan.clone(), |p| p.span());
                    ld.err(s, ctx, "health check `path` must start with '/'");
                }
                let expect = h.expect.as_ref().map_or(200, |e| *e.get_ref());
                if !(100..=599).contains(&expect) {
                    let s = h.expect.as_ref().map_or(hspan.clone(), |e| e.span());
                    ld.err(s, ctx, format!("{expect} is not an HTTP status"));
                }
                HealthKind::Http {
                    path,
                    host: h.host.clone(),
                    expect,
                }
            }
            other => {
                ld.err(
                    h.kind.span(),
                    ctx,
                    format!("unknown health check kind \"{other}\", expected tcp or http"),
                );
                HealthKind::Tcp
            }
        };
        let count = |ld: &mut Loader, v: &Option<toml::Spanned<usize>>, key: &str| match v {
            Some(n) if *n.get_ref() == 0 => {
                ld.err(n.span(), ctx, format!("`{key}` must be at least 1"));
                1
            }
            Some(n) => *n.get_ref(),
            None => 2,
        };
        let interval = h.interval.map_or(Duration::from_secs(5), |d| d.0);
        HealthCheck {
            kind,
            interval: interval.max(Duration::from_millis(10)),
            timeout: h.timeout.map_or(Duration::from_secs(2), |d| d.0),
            unhealthy_after: count(ld, &h.unhealthy_after, "unhealthy_after"),
            healthy_after: count(ld, &h.healthy_after, "healthy_after"),
        }
    });

    let passive_health = u.passive_health.as_ref().map(|p| {
        let p = p.get_ref();
        let failures = match &p.failures {
            Some(f) if *f.get_ref() == 0 => {
                ld.err(f.span(), ctx, "`failures` must be at least 1");
                1
            }
            Some(f) => *f.get_ref(),
            None => 3,
        };
        PassiveHealth {
            failures,
            eject_for: p.eject_for.map_or(Duration::from_secs(10), |d| d.0),
            statuses: p
                .statuses
                .as_ref()
                .map_or_else(|| vec![502, 503, 504], |s| statuses(ld, s, ctx)),
        }
    });

    let circuit_breaker = u.circuit_breaker.as_ref().map(|c| {
        let cspan = c.span();
        let c = c.get_ref();
        let error_ratio = c.error_ratio.as_ref().map(|r| {
            if !(r.get_ref() > &0.0 && r.get_ref() <= &1.0) {
                ld.err(r.span(), ctx, "`error_ratio` must be in (0, 1], e.g. 0.5");
            }
            *r.get_ref()
        });
        let failures = c
            .failures
            .unwrap_or(if error_ratio.is_some() { 0 } else { 5 });
        if failures == 0 && error_ratio.is_none() {
            ld.err(
                cspan,
                ctx,
                "a circuit breaker needs `failures` or `error_ratio`",
            );
        }
        CircuitBreaker {
            failures,
            error_ratio,
            window: c.window.map_or(Duration::from_secs(10), |d| d.0),
            min_requests: c.min_requests.unwrap_or(20),
            open_for: c.open_for.map_or(Duration::from_secs(10), |d| d.0),
            probe_timeout: c.probe_timeout.map_or(Duration::from_secs(10), |d| d.0),
        }
    });

    let retries = u.retries.as_ref().map_or(0, |r| *r.get_ref());
    if retries > 10 {
        if let Some(r) = &u.retries {
            ld.err(
                r.span(),
                ctx,
                "`retries` above 10 is never useful; at most 10",
            );
        }
    }
    let budget_percent = match &u.retry_budget {
        Some(b) if !(1..=100).contains(b.get_ref()) => {
            ld.err(
                b.span(),
                ctx,
                "`retry_budget` is a percentage from 1 to 100",
            );
            20
        }
        Some(b) => *b.get_ref(),
        None => 20,
    };
    let on_status = statuses(ld, &u.retry_on_status, ctx);

    if ld.errors.len() > errors_before {
        return None;
    }
    let resolve_every = u.resolve_every.as_ref().map(|d| {
        if d.get_ref().0 < Duration::from_secs(1) {
            ld.err(d.span(), ctx, "`resolve_every` must be at least 1s");
        }
        d.get_ref().0
    });
    let sni = u.sni.map(|s| s.into_inner()).unwrap_or_default();
    Some(Upstream {
        name: name.to_string(),
        peers,
        selection,
        hash_key,
        tls: u.tls,
        sni,
        tls_peer,
        http2,
        connect_timeout: u.connect_timeout.map_or(Duration::from_secs(5), |d| d.0),
        read_timeout: u.read_timeout.map_or(Duration::from_secs(60), |d| d.0),
        write_timeout: u.write_timeout.map_or(Duration::from_secs(60), |d| d.0),
        idle_timeout: u.idle_timeout.map_or(Duration::from_secs(60), |d| d.0),
        resolve_every,
        health_check,
        passive_health,
        circuit_breaker,
        retry: RetryPolicy {
            retries,
            on_status,
            budget_percent,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_keys() {
        assert_eq!(parse_hash_key("client_ip").unwrap(), HashKey::ClientIp);
        assert_eq!(parse_hash_key("path").unwrap(), HashKey::Path);
        assert_eq!(
            parse_hash_key("header:X-User").unwrap(),
            HashKey::Header(HeaderName::from_static("x-user"))
        );
        assert_eq!(
            parse_hash_key("cookie:sid").unwrap(),
            HashKey::Cookie("sid".into())
        );
        assert!(parse_hash_key("cookie:").is_err());
        assert!(parse_hash_key("header:bad name").is_err());
        assert!(parse_hash_key("ip").is_err());
    }
}
