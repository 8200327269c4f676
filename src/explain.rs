//! `gatehouse explain`: what the gateway would do with one request, without sending it.
//!
//! The request goes through the same canonical form as live traffic (`proxy/canonical.rs`,
//! so `//admin` or `%2F` are explained as they would be decided) and the same compiled
//! route table (`router.rs`) picks the winner. Every other route is then held against the
//! request to say why it lost: its host, its path, a method or a header, or, when it matched
//! too, the specificity order that put the winner first.
use http::{HeaderName, HeaderValue, Method};
use pingora_http::RequestHeader;
use serde_json::{json, Value};

use gatehouse_plugins::authority::{default_port, Authority};

use crate::config::{Config, Gateway, HostMatch, PathMatch, Route, Target};

pub struct Request<'a> {
    pub method: &'a str,
    /// `http://host[:port]/path?query` (or https), or an origin-form `/path?query`.
    pub url: &'a str,
    /// `Name: value`, as curl's `-H`.
    pub headers: &'a [String],
    pub gateway: Option<&'a str>,
}

/// The explanation as JSON (`--json` prints it as is; [`human`] renders it for people).
pub fn explain(cfg: &Config, r: &Request) -> Result<Value, String> {
    let (tls, authority, target) = split_url(r.url)?;
    let gw = pick_gateway(cfg, r.gateway, authority, tls)?;
    let method = Method::from_bytes(r.method.as_bytes())
        .map_err(|_| format!("bad method {:?}", r.method))?;
    let mut req = RequestHeader::build(method.clone(), target.as_bytes(), None)
        .map_err(|e| format!("bad request target: {e}"))?;
    let mut raw = format!("{} {target} HTTP/1.1\r\n", r.method);
    let has_host = r.headers.iter().any(|h| {
        h.split_once(':')
            .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case("host"))
    });
    if let (Some(a), false) = (authority, has_host) {
        req.insert_header(http::header::HOST, a)
            .map_err(|e| format!("bad host: {e}"))?;
        raw.push_str(&format!("Host: {a}\r\n"));
    }
    for h in r.headers {
        let (n, v) = h
            .split_once(':')
            .ok_or_else(|| format!("header {h:?}: expected \"Name: value\""))?;
        let name = HeaderName::from_bytes(n.trim().as_bytes())
            .map_err(|_| format!("bad header name {n:?}"))?;
        let value =
            HeaderValue::from_str(v.trim()).map_err(|_| format!("bad header value {v:?}"))?;
        req.append_header(name, value)
            .map_err(|e| format!("header {h:?}: {e}"))?;
        raw.push_str(&format!("{}: {}\r\n", n.trim(), v.trim()));
    }
    raw.push_str("\r\n");

    let opts = crate::proxy::canonical::Options {
        keep_encoded_slashes: cfg.server.keep_encoded_slashes,
        keep_path_parameters: cfg.server.keep_path_parameters,
    };
    let canonical = match crate::proxy::canonical::canonicalize(
        &mut req,
        Some(raw.as_bytes()),
        opts,
        gw.tls.is_some(),
    ) {
        Ok(c) => c,
        Err(refusal) => {
            return Ok(json!({
                "gateway": gw.name,
                "refused": { "status": refusal.status, "reason": refusal.reason },
            }))
        }
    };
    // The authority as the gateway would decide it: the upstream's Host, and the router's
    // host without the port.
    let authority = canonical.authority;
    let host = authority.as_ref().map(|a| a.as_str().to_string());
    let path = req.uri.path().to_string();
    let query = req.uri.query().map(str::to_string);

    let router = crate::router::Router::new(&gw.routes);
    let bare_host = authority.as_ref().map(|a| a.host());
    let winner = router.find(&gw.routes, bare_host, &path, &req.method, &req.headers);
    let mut candidates = Vec::new();
    for (id, route) in gw.routes.iter().enumerate() {
        if Some(id) == winner {
            continue;
        }
        let why = lost(route, bare_host, &path, &req, winner.map(|w| &gw.routes[w]));
        candidates.push(json!({ "route": route.name, "line": route.line, "lost": why }));
    }
    let mut out = json!({
        "gateway": gw.name,
        "request": {
            "method": req.method.as_str(),
            "host": host,
            "path": path,
            "query": query,
            "as_sent": target,
        },
        "route": null,
        "candidates": candidates,
    });
    if let Some(id) = winner {
        out["route"] = winner_json(cfg, gw, &gw.routes[id], host.as_deref(), &path, &query);
    }
    Ok(out)
}

fn split_url(url: &str) -> Result<(bool, Option<&str>, &str), String> {
    if url.starts_with('/') {
        return Ok((false, None, url));
    }
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?}: give an http(s)://host/path URL or a /path"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        other => return Err(format!("scheme {other:?}: http or https")),
    };
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(cut);
    let target = if target.is_empty() { "/" } else { target };
    if authority.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok((tls, Some(authority), target))
}

/// The gateway named, or the one listening on the URL's port, or the only one.
fn pick_gateway<'a>(
    cfg: &'a Config,
    name: Option<&str>,
    authority: Option<&str>,
    tls: bool,
) -> Result<&'a Gateway, String> {
    if let Some(n) = name {
        return cfg
            .gateways
            .iter()
            .find(|g| g.name == n)
            .ok_or_else(|| format!("no gateway {n:?}"));
    }
    if cfg.gateways.len() == 1 {
        return Ok(&cfg.gateways[0]);
    }
    let port = authority
        .and_then(|a| Authority::parse(a.as_bytes(), tls))
        .map_or(default_port(tls), |a| a.port_or_default(tls));
    let on_port: Vec<&Gateway> = cfg
        .gateways
        .iter()
        .filter(|g| g.listen.iter().any(|a| a.port() == port))
        .collect();
    match on_port.as_slice() {
        [g] => Ok(g),
        _ => Err(format!(
            "{} gateways and none (or several) listen on port {port}: name one with --gateway",
            cfg.gateways.len()
        )),
    }
}

fn host_rule(h: &HostMatch) -> String {
    match h {
        HostMatch::Any => "any host".into(),
        HostMatch::Exact(e) => format!("host {e}"),
        HostMatch::Suffix(s) => format!("host *{s}"),
    }
}

fn path_rule(p: &PathMatch) -> String {
    match p {
        PathMatch::Prefix(p) if p == "/" => "any path (catch-all /)".into(),
        PathMatch::Prefix(p) => format!("path prefix {p}"),
        PathMatch::Exact(p) => format!("exact path {p}"),
        PathMatch::Regex(re) => format!("path regex {}", re.as_str()),
    }
}

fn host_holds(h: &HostMatch, host: Option<&str>) -> bool {
    match (h, host) {
        (HostMatch::Any, _) => true,
        (HostMatch::Exact(e), Some(h)) => e == h,
        (HostMatch::Suffix(s), Some(h)) => h.ends_with(s.as_str()),
        _ => false,
    }
}

fn path_holds(p: &PathMatch, path: &str) -> bool {
    match p {
        PathMatch::Prefix(p) if p == "/" => true,
        PathMatch::Prefix(p) => path
            .strip_prefix(p.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        PathMatch::Exact(e) => e == path,
        PathMatch::Regex(re) => re.is_match(path),
    }
}

/// Why `route` did not take the request.
fn lost(
    route: &Route,
    host: Option<&str>,
    path: &str,
    req: &RequestHeader,
    winner: Option<&Route>,
) -> String {
    if !host_holds(&route.host, host) {
        return format!(
            "{} does not match {}",
            host_rule(&route.host),
            host.unwrap_or("(no host)")
        );
    }
    if !path_holds(&route.path, path) {
        return format!("{} does not match {path}", path_rule(&route.path));
    }
    // The router's own predicates, so the two never disagree (HEAD takes GET routes).
    if let Some(m) = &route.methods {
        if !crate::router::method_holds(m, &req.method) {
            let list: Vec<&str> = m.iter().map(|m| m.as_str()).collect();
            return format!("method {} not in [{}]", req.method, list.join(", "));
        }
    }
    for (name, want) in &route.headers {
        if !req.headers.contains_key(name) {
            return format!("header {name} missing");
        }
        if !crate::router::header_holds(&req.headers, name, want) {
            return format!("header {name} does not match");
        }
    }
    match winner {
        Some(w) => format!(
            "matches too, but \"{}\" wins: {}",
            w.name,
            precedence(w, route)
        ),
        None => "matches, but another table was searched first".into(),
    }
}

/// Why `w` goes before `r` when both match, in the router's order of specificity.
fn precedence(w: &Route, r: &Route) -> String {
    let host_rank = |h: &HostMatch| match h {
        HostMatch::Exact(_) => 0,
        HostMatch::Suffix(s) => 1_000 - s.len().min(999),
        HostMatch::Any => 10_000,
    };
    let (hw, hr) = (host_rank(&w.host), host_rank(&r.host));
    if hw != hr {
        return format!(
            "its {} is more specific than {}",
            host_rule(&w.host),
            host_rule(&r.host)
        );
    }
    let path_rank = |p: &PathMatch| match p {
        PathMatch::Exact(_) => (0, 0),
        PathMatch::Prefix(p) if p == "/" => (3, 0),
        PathMatch::Prefix(p) => (
            1,
            usize::MAX - p.split('/').filter(|s| !s.is_empty()).count(),
        ),
        PathMatch::Regex(_) => (2, 0),
    };
    if path_rank(&w.path) != path_rank(&r.path) {
        return format!(
            "its {} goes before {} (exact, then the longest prefix, then regexes, then the catch-all)",
            path_rule(&w.path),
            path_rule(&r.path)
        );
    }
    if w.priority != r.priority {
        return format!("priority {} over {}", w.priority, r.priority);
    }
    let preds = |x: &Route| usize::from(x.methods.is_some()) + x.headers.len();
    if preds(w) != preds(r) {
        return format!("more predicates ({} against {})", preds(w), preds(r));
    }
    format!(
        "same rules, earlier in the file (line {} before {})",
        w.line, r.line
    )
}

fn winner_json(
    cfg: &Config,
    gw: &Gateway,
    r: &Route,
    host: Option<&str>,
    path: &str,
    query: &Option<String>,
) -> Value {
    let mut why = vec![host_rule(&r.host), path_rule(&r.path)];
    if let Some(m) = &r.methods {
        let list: Vec<&str> = m.iter().map(|m| m.as_str()).collect();
        why.push(format!("methods [{}]", list.join(", ")));
    }
    for (name, _) in &r.headers {
        why.push(format!("header {name}"));
    }
    if r.priority != 0 {
        why.push(format!("priority {}", r.priority));
    }
    let name = |u: &usize| cfg.upstreams[*u].name.clone();
    let target = match &r.target {
        Target::Upstream(u) => json!({ "upstream": name(u) }),
        Target::Split { arms, sticky } => json!({
            "split": arms.iter().map(|(u, w)| json!({ "upstream": name(u), "weight": w })).collect::<Vec<_>>(),
            "sticky": sticky.is_some(),
        }),
        Target::Static(s) => json!({ "static": s.root.display().to_string() }),
        Target::Aggregate(a) => json!({
            "aggregate": a.parts.iter().enumerate().map(|(i, p)| json!({
                "part": p.name,
                "upstream": name(&p.upstream),
                "path": a.path_text(i),
                "after": p.deps.iter().map(|d| a.parts[*d].name.clone()).collect::<Vec<_>>(),
                "optional": p.optional,
            })).collect::<Vec<_>>(),
            "on_error": if a.fail { "fail" } else { "partial" },
            "timeout_ms": a.timeout.as_millis() as u64,
        }),
    };
    let upstream_path =
        crate::proxy::rewrite::upstream_path(r, path).unwrap_or_else(|| path.to_string());
    let upstream_target = match query {
        Some(q) => format!("{upstream_path}?{q}"),
        None => upstream_path,
    };
    let upstream_host = if r.preserve_host {
        host.map_or_else(|| "(none)".to_string(), str::to_string)
    } else {
        "the peer's address as configured".into()
    };
    // The chain in the order each phase runs it (responses run it backwards).
    let mut ids: Vec<usize> = cfg.server.plugins.clone();
    ids.extend(&gw.plugins);
    ids.extend(&r.plugins);
    let instances: Vec<gatehouse_plugins::Instance> = ids
        .iter()
        .map(|&i| {
            let p = &cfg.plugins[i];
            gatehouse_plugins::Instance::unmetered(
                &p.name,
                p.config
                    .build(&gatehouse_plugins::store::BuildEnv::default()),
            )
        })
        .collect();
    let chain = gatehouse_plugins::Chain::new(&instances);
    let phases: Vec<Value> = chain
        .phases()
        .iter()
        .filter(|(_, list)| !list.is_empty())
        .map(|(phase, list)| {
            let names: Vec<String> = list
                .iter()
                .map(|i| format!("{} ({})", i.name, i.plugin.kind()))
                .collect();
            json!({ "phase": phase, "plugins": names })
        })
        .collect();
    let origin = |i: usize| {
        if cfg.server.plugins.contains(&i) {
            "server"
        } else if gw.plugins.contains(&i) {
            "gateway"
        } else {
            "route"
        }
    };
    let plugins: Vec<Value> = ids
        .iter()
        .map(|&i| json!({ "name": cfg.plugins[i].name, "kind": cfg.plugins[i].config.kind(), "from": origin(i) }))
        .collect();
    json!({
        "name": r.name,
        "line": r.line,
        "matched_by": why,
        "target": target,
        "upstream_request": if matches!(r.target, Target::Static(_) | Target::Aggregate(_)) {
            Value::Null
        } else {
            json!({ "path": upstream_target, "host": upstream_host })
        },
        "cache": r.cache.is_some(),
        "compression": r.compression.is_some(),
        "access_log": r.access_log,
        "plugins": plugins,
        "phases": phases,
    })
}

/// The explanation for people.
pub fn human(v: &Value) -> String {
    let mut s = String::new();
    let str_of = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    s.push_str(&format!("gateway   {}\n", str_of(&v["gateway"])));
    if let Some(r) = v.get("refused") {
        s.push_str(&format!(
            "refused   {} before routing: {}\n",
            r["status"],
            str_of(&r["reason"])
        ));
        return s;
    }
    let q = &v["request"];
    s.push_str(&format!(
        "request   {} {}{}  (host {})\n",
        str_of(&q["method"]),
        str_of(&q["path"]),
        q["query"]
            .as_str()
            .map_or(String::new(), |q| format!("?{q}")),
        q["host"].as_str().unwrap_or("none")
    ));
    let routed = format!(
        "{}{}",
        str_of(&q["path"]),
        q["query"]
            .as_str()
            .map_or(String::new(), |q| format!("?{q}"))
    );
    if q["as_sent"].as_str() != Some(routed.as_str()) {
        s.push_str(&format!(
            "          (sent as {}; routed in its canonical form)\n",
            str_of(&q["as_sent"])
        ));
    }
    let r = &v["route"];
    if r.is_null() {
        s.push_str("route     none: 404 from the gateway\n");
    } else {
        s.push_str(&format!(
            "route     {} (line {})\n",
            str_of(&r["name"]),
            r["line"]
        ));
        let why: Vec<String> = r["matched_by"]
            .as_array()
            .into_iter()
            .flatten()
            .map(str_of)
            .collect();
        s.push_str(&format!("  by      {}\n", why.join(", ")));
        let t = &r["target"];
        let target = if let Some(u) = t.get("upstream") {
            format!("upstream {}", str_of(u))
        } else if let Some(arms) = t["split"].as_array() {
            let a: Vec<String> = arms
                .iter()
                .map(|a| format!("{} (weight {})", str_of(&a["upstream"]), a["weight"]))
                .collect();
            format!(
                "split {}{}",
                a.join(", "),
                if t["sticky"] == true { ", sticky" } else { "" }
            )
        } else if let Some(parts) = t["aggregate"].as_array() {
            let p: Vec<String> = parts
                .iter()
                .map(|p| {
                    let after: Vec<String> = p["after"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(str_of)
                        .collect();
                    format!(
                        "\n            {}: {} {}{}{}",
                        str_of(&p["part"]),
                        str_of(&p["upstream"]),
                        str_of(&p["path"]),
                        if after.is_empty() {
                            String::new()
                        } else {
                            format!(" (after {})", after.join(", "))
                        },
                        if p["optional"] == true {
                            ", optional"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            format!(
                "aggregate of {} parts, on_error {}, timeout {} ms:{}",
                parts.len(),
                str_of(&t["on_error"]),
                t["timeout_ms"],
                p.concat()
            )
        } else {
            format!("static files under {}", str_of(&t["static"]))
        };
        s.push_str(&format!("  to      {target}\n"));
        if let Some(u) = r["upstream_request"].as_object() {
            s.push_str(&format!(
                "  sends   {} (Host: {})\n",
                str_of(&u["path"]),
                str_of(&u["host"])
            ));
        }
        let mut extras = Vec::new();
        for k in ["cache", "compression"] {
            if r[k] == true {
                extras.push(k);
            }
        }
        if r["access_log"] == false {
            extras.push("no access log");
        }
        if !extras.is_empty() {
            s.push_str(&format!("  with    {}\n", extras.join(", ")));
        }
        let plugins = r["plugins"].as_array().cloned().unwrap_or_default();
        if plugins.is_empty() {
            s.push_str("plugins   none\n");
        } else {
            s.push_str("plugins   in request order:\n");
            for p in &plugins {
                s.push_str(&format!(
                    "  {} ({}, from the {})\n",
                    str_of(&p["name"]),
                    str_of(&p["kind"]),
                    str_of(&p["from"])
                ));
            }
            s.push_str("phases\n");
            for p in r["phases"].as_array().into_iter().flatten() {
                let l: Vec<String> = p["plugins"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(str_of)
                    .collect();
                s.push_str(&format!(
                    "  {:<17} {}\n",
                    str_of(&p["phase"]),
                    l.join(" -> ")
                ));
            }
        }
    }
    let c = v["candidates"].as_array().cloned().unwrap_or_default();
    if !c.is_empty() {
        s.push_str("other routes\n");
        for x in &c {
            s.push_str(&format!(
                "  {} (line {}): {}\n",
                str_of(&x["route"]),
                x["line"],
                str_of(&x["lost"])
            ));
        }
    }
    s
}
