//! `aggregate` routes: the file model, its checks (templates, dependencies, limits) and the
//! runtime model the fan-out in `crate::aggregate` runs from.
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use http::HeaderName;
use serde::Deserialize;
use toml::Spanned;

use super::build::Loader;
use super::routes::Refs;
use super::values::{Dur, Size};
use super::PathMatch;

/// `[routes.aggregate]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateFile {
    pub parts: Spanned<BTreeMap<Spanned<String>, Spanned<PartFile>>>,
    pub timeout: Option<Spanned<Dur>>,
    pub on_error: Option<Spanned<String>>,
    pub partial_status: Option<Spanned<u16>>,
    pub max_part_bytes: Option<Spanned<Size>>,
    pub max_bytes: Option<Spanned<Size>>,
    pub forward_headers: Option<Vec<Spanned<String>>>,
}

/// A part: `"UPSTREAM:/path/{x}"`, or a table with the options. Read by hand (as
/// `PeerEntry`) so a typo inside the table keeps its own message.
#[derive(Debug)]
pub struct PartFile(pub PartTable);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartTable {
    pub upstream: String,
    pub path: String,
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub optional: bool,
    #[serde(default)]
    pub raw: bool,
    pub max_bytes: Option<Size>,
    #[serde(default)]
    pub body: bool,
}

impl<'de> Deserialize<'de> for PartFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PartFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"UPSTREAM:/path\" or { upstream = \"..\", path = \"/..\", .. }")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PartFile, E> {
                let (upstream, path) = s
                    .split_once(':')
                    .ok_or_else(|| E::custom(format!("\"{s}\" is not \"UPSTREAM:/path\"")))?;
                Ok(PartFile(PartTable {
                    upstream: upstream.to_string(),
                    path: path.to_string(),
                    timeout: None,
                    optional: false,
                    raw: false,
                    max_bytes: None,
                    body: false,
                }))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<PartFile, A::Error> {
                PartTable::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(PartFile)
            }
        }
        d.deserialize_any(V)
    }
}

/// An aggregate route, ready to run.
#[derive(Debug, PartialEq, Eq)]
pub struct Aggregate {
    /// In dependency order: a part comes after every part it reads from.
    pub parts: Vec<Part>,
    /// For each part, the parts that wait for it.
    pub dependents: Vec<Vec<usize>>,
    pub timeout: Duration,
    /// `on_error = "fail"`: a failed part (not optional) fails the whole answer.
    pub fail: bool,
    /// The status of a `partial` answer with a failed part.
    pub partial_status: u16,
    /// All parts' bodies together.
    pub max_bytes: usize,
    /// Client headers sent on to every part.
    pub forward: Vec<HeaderName>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub upstream: usize,
    pub path: Template,
    pub deps: Vec<usize>,
    pub timeout: Option<Duration>,
    pub optional: bool,
    pub raw: bool,
    pub max_bytes: usize,
    pub body: bool,
    /// Another part reads values from this one's JSON: it is kept parsed.
    pub parsed: bool,
}

/// A part's path: literal text and the values filled in per request.
#[derive(Debug, PartialEq, Eq)]
pub struct Template(pub Vec<Piece>);

#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Lit(String),
    /// A named group of the route's regex path.
    Group(String),
    Query(String),
    Header(HeaderName),
    Consumer,
    Jwt(String),
    /// A value from another part's JSON: the part's index and the keys (or array indices) down.
    Part(usize, Vec<String>),
}

/// Part names that would read as the request's own values in a template.
const RESERVED: [&str; 5] = ["query", "header", "jwt", "consumer", "errors"];
/// Headers of one hop or of the client's own message framing: never copied to a part.
const NOT_FORWARDED: [&str; 11] = [
    "host",
    "content-length",
    "expect",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_FORWARD: [&str; 3] = ["authorization", "accept-language", "x-request-id"];

pub(super) fn aggregate(
    ld: &mut Loader,
    a: &Spanned<AggregateFile>,
    path: &PathMatch,
    refs: &Refs,
    ctx: &str,
) -> Option<Aggregate> {
    let errors_before = ld.errors.len();
    let f = a.get_ref();
    let entries: Vec<(&Spanned<String>, &Spanned<PartFile>)> = f.parts.get_ref().iter().collect();
    if entries.is_empty() {
        ld.err(f.parts.span(), ctx, "`aggregate` needs at least one part");
    }
    if entries.len() > refs.max_parts {
        ld.err(
            f.parts.span(),
            ctx,
            format!(
                "{} parts: at most {} ([server] max_aggregate_parts)",
                entries.len(),
                refs.max_parts
            ),
        );
    }
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.get_ref().as_str()).collect();
    let groups: Vec<String> = match path {
        PathMatch::Regex(re) => re.capture_names().flatten().map(str::to_string).collect(),
        _ => Vec::new(),
    };
    for (n, _) in &entries {
        let name = n.get_ref();
        if RESERVED.contains(&name.as_str()) || groups.contains(name) {
            ld.err(
                n.span(),
                ctx,
                format!("part name \"{name}\" reads as a request value in templates: rename it"),
            );
        }
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            ld.err(
                n.span(),
                ctx,
                format!("part name \"{name}\": use letters, digits, '_' and '-'"),
            );
        }
    }
    let default_max = f
        .max_part_bytes
        .as_ref()
        .map_or(1 << 20, |s| s.get_ref().0 as usize);
    let mut parts = Vec::new();
    for (n, p) in &entries {
        let t = &p.get_ref().0;
        let pctx = format!("{ctx}, part \"{}\"", n.get_ref());
        let upstream = match refs.upstreams.get(&t.upstream) {
            Some(Some(i)) => *i,
            Some(None) => usize::MAX,
            None => {
                ld.err(
                    p.span(),
                    &pctx,
                    format!("unknown upstream \"{}\"", t.upstream),
                );
                usize::MAX
            }
        };
        let template = match parse_template(&t.path, &groups, &names) {
            Ok(t) => t,
            Err(e) => {
                ld.err(p.span(), &pctx, e);
                Template(Vec::new())
            }
        };
        let mut deps: Vec<usize> = template
            .0
            .iter()
            .filter_map(|pc| match pc {
                Piece::Part(i, _) => Some(*i),
                _ => None,
            })
            .collect();
        deps.sort_unstable();
        deps.dedup();
        if t.timeout
            .as_ref()
            .is_some_and(|d| d.0.is_zero() || d.0 > MAX_TIMEOUT)
        {
            ld.err(
                p.span(),
                &pctx,
                "`timeout` must be more than 0 and at most 1h",
            );
        }
        parts.push(Part {
            name: n.get_ref().clone(),
            upstream,
            path: template,
            deps,
            timeout: t.timeout.as_ref().map(|d| d.0),
            optional: t.optional,
            raw: t.raw,
            max_bytes: t.max_bytes.as_ref().map_or(default_max, |s| s.0 as usize),
            body: t.body,
            parsed: false,
        });
    }
    // Dependencies must form a DAG: Kahn's order, and what is left over is in a cycle.
    let order = match topo_order(&parts) {
        Ok(o) => o,
        Err(cycle) => {
            let (_, p) = entries[cycle[0]];
            let path: Vec<&str> = cycle.iter().map(|&i| names[i]).collect();
            ld.err(
                p.span(),
                ctx,
                format!(
                    "parts depend on each other in a cycle: {}",
                    path.join(" -> ")
                ),
            );
            (0..parts.len()).collect()
        }
    };
    for i in 0..parts.len() {
        for d in parts[i].deps.clone() {
            if parts[d].raw {
                let (_, p) = entries[i];
                ld.err(
                    p.span(),
                    ctx,
                    format!(
                        "part \"{}\" reads from \"{}\", which is `raw`",
                        names[i], names[d]
                    ),
                );
            }
            if parts[d].optional && !parts[i].optional {
                let (_, p) = entries[i];
                ld.err(
                    p.span(),
                    ctx,
                    format!(
                        "part \"{}\" reads from \"{}\", which is `optional`: mark it `optional` too (it is skipped when that part fails)",
                        names[i], names[d]
                    ),
                );
            }
            parts[d].parsed = true;
        }
    }
    // Renumber in dependency order (the merged answer keeps the names, not the order).
    let mut at = vec![0; parts.len()];
    for (new, &old) in order.iter().enumerate() {
        at[old] = new;
    }
    let mut slots: Vec<Option<Part>> = parts.into_iter().map(Some).collect();
    let mut parts: Vec<Part> = order.iter().filter_map(|&old| slots[old].take()).collect();
    for p in &mut parts {
        for d in &mut p.deps {
            *d = at[*d];
        }
        for pc in &mut p.path.0 {
            if let Piece::Part(i, _) = pc {
                *i = at[*i];
            }
        }
    }
    let mut dependents = vec![Vec::new(); parts.len()];
    for (i, p) in parts.iter().enumerate() {
        for &d in &p.deps {
            dependents[d].push(i);
        }
    }

    let fail = match f.on_error.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("partial") => false,
        Some("fail") => true,
        Some(other) => {
            let s = f.on_error.as_ref().map_or(a.span(), Spanned::span);
            ld.err(
                s,
                ctx,
                format!("on_error \"{other}\": use \"fail\" or \"partial\""),
            );
            false
        }
    };
    let partial_status = f.partial_status.as_ref().map_or(200, |s| *s.get_ref());
    if !(200..300).contains(&partial_status) || partial_status == 204 || partial_status == 205 {
        let s = f.partial_status.as_ref().map_or(a.span(), Spanned::span);
        ld.err(
            s,
            ctx,
            "`partial_status` must be a 2xx status with a body (200, 206, 207...)",
        );
    }
    let timeout = f
        .timeout
        .as_ref()
        .map_or(Duration::from_secs(10), |d| d.get_ref().0);
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        let s = f.timeout.as_ref().map_or(a.span(), Spanned::span);
        ld.err(s, ctx, "`timeout` must be more than 0 and at most 1h");
    }
    let mut forward: Vec<HeaderName> = match &f.forward_headers {
        None => DEFAULT_FORWARD
            .iter()
            .map(|h| HeaderName::from_static(h))
            .collect(),
        Some(list) => list
            .iter()
            .filter_map(|h| match HeaderName::try_from(h.get_ref().as_str()) {
                Ok(n) if NOT_FORWARDED.contains(&n.as_str()) => {
                    ld.err(
                        h.span(),
                        ctx,
                        format!("`{n}` is the gateway's to set, not forwarded"),
                    );
                    None
                }
                Ok(n) => Some(n),
                Err(_) => {
                    ld.err(
                        h.span(),
                        ctx,
                        format!("invalid header name \"{}\"", h.get_ref()),
                    );
                    None
                }
            })
            .collect(),
    };
    forward.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    forward.dedup();
    let max_bytes = f
        .max_bytes
        .as_ref()
        .map_or(8 << 20, |s| s.get_ref().0 as usize);
    (ld.errors.len() == errors_before).then_some(Aggregate {
        parts,
        dependents,
        timeout,
        fail,
        partial_status,
        max_bytes,
        forward,
    })
}

impl Aggregate {
    /// Part `i`'s path template as written (for `explain` and `/status`).
    pub fn path_text(&self, i: usize) -> String {
        let mut s = String::new();
        for pc in &self.parts[i].path.0 {
            match pc {
                Piece::Lit(l) => s.push_str(l),
                Piece::Group(g) => s.push_str(&format!("{{{g}}}")),
                Piece::Query(q) => s.push_str(&format!("{{query.{q}}}")),
                Piece::Header(h) => s.push_str(&format!("{{header.{h}}}")),
                Piece::Consumer => s.push_str("{consumer}"),
                Piece::Jwt(c) => s.push_str(&format!("{{jwt.{c}}}")),
                Piece::Part(p, keys) => {
                    s.push_str(&format!("{{{}.{}}}", self.parts[*p].name, keys.join(".")))
                }
            }
        }
        s
    }
}

/// `[server] max_aggregate_parts`: the most parts one client request may fan out to.
pub(super) fn max_parts(ld: &mut Loader, f: &super::file::ServerFile) -> usize {
    match &f.max_aggregate_parts {
        Some(n) if *n.get_ref() == 0 => {
            ld.err(
                n.span(),
                "[server]",
                "`max_aggregate_parts` must be at least 1",
            );
            16
        }
        Some(n) => *n.get_ref(),
        None => 16,
    }
}

/// The parts in an order where each comes after its dependencies, or a cycle.
fn topo_order(parts: &[Part]) -> Result<Vec<usize>, Vec<usize>> {
    let mut waiting: Vec<usize> = parts.iter().map(|p| p.deps.len()).collect();
    let mut ready: Vec<usize> = (0..parts.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::new();
    while let Some(i) = ready.pop() {
        order.push(i);
        for (j, p) in parts.iter().enumerate() {
            if p.deps.contains(&i) {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.push(j);
                }
            }
        }
    }
    if order.len() == parts.len() {
        return Ok(order);
    }
    // Walk from a part left over along its unfinished dependencies until one repeats.
    let mut path = vec![(0..parts.len()).find(|&i| waiting[i] > 0).unwrap_or(0)];
    loop {
        let last = path[path.len() - 1];
        let Some(&next) = parts[last].deps.iter().find(|&&d| waiting[d] > 0) else {
            return Err(path);
        };
        if let Some(at) = path.iter().position(|&p| p == next) {
            let mut cycle = path.split_off(at);
            cycle.push(next);
            return Err(cycle);
        }
        path.push(next);
    }
}

/// `/users/{id}?lang={query.lang}&x={user.account.id}`: `{` and `}` only around placeholders.
pub fn parse_template(s: &str, groups: &[String], parts: &[&str]) -> Result<Template, String> {
    if !s.starts_with('/') {
        return Err(format!("part path \"{s}\" must start with '/'"));
    }
    let mut pieces = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(format!("'}}' without '{{' in \"{s}\""));
        }
        if open > 0 {
            pieces.push(Piece::Lit(rest[..open].to_string()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("'{{' without '}}' in \"{s}\""));
        };
        let name = &rest[open + 1..open + close];
        pieces.push(placeholder(name, groups, parts)?);
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest.to_string()));
    }
    for p in &pieces {
        if let Piece::Lit(l) = p {
            if l.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'#') {
                return Err(format!(
                    "part path \"{s}\": spaces, controls and '#' are not allowed"
                ));
            }
        }
    }
    Ok(Template(pieces))
}

fn placeholder(name: &str, groups: &[String], parts: &[&str]) -> Result<Piece, String> {
    let bad = |why: &str| Err(format!("{{{name}}}: {why}"));
    if name == "consumer" {
        return Ok(Piece::Consumer);
    }
    if let Some(q) = name.strip_prefix("query.") {
        return if q.is_empty() {
            bad("needs a parameter name")
        } else {
            Ok(Piece::Query(q.to_string()))
        };
    }
    if let Some(h) = name.strip_prefix("header.") {
        return match HeaderName::try_from(h) {
            Ok(h) => Ok(Piece::Header(h)),
            Err(_) => bad("not a header name"),
        };
    }
    if let Some(c) = name.strip_prefix("jwt.") {
        return if c.is_empty() {
            bad("needs a claim name")
        } else {
            Ok(Piece::Jwt(c.to_string()))
        };
    }
    if groups.iter().any(|g| g == name) {
        return Ok(Piece::Group(name.to_string()));
    }
    // `part.a.b` (dotted) or `part/a/b` (a JSON pointer after the part's name).
    let (part, keys) = match name.find(['.', '/']) {
        Some(i) if name.as_bytes()[i] == b'/' => (
            &name[..i],
            name[i + 1..]
                .split('/')
                .map(|k| k.replace("~1", "/").replace("~0", "~"))
                .collect::<Vec<_>>(),
        ),
        Some(i) => (
            &name[..i],
            name[i + 1..].split('.').map(str::to_string).collect(),
        ),
        None => (name, Vec::new()),
    };
    match parts.iter().position(|p| *p == part) {
        Some(_) if keys.is_empty() || keys.iter().any(String::is_empty) => {
            bad("name the value inside the part: {part.field} or {part/json/pointer}")
        }
        Some(i) => Ok(Piece::Part(i, keys)),
        None if groups.is_empty() => bad(
            "not a part, nor query., header., jwt., consumer (named groups need a regex path: path = \"~ ^/x/(?P<id>[0-9]+)$\")",
        ),
        None => bad(&format!(
            "not a part, a named group ({}), nor query., header., jwt., consumer",
            groups.join(", ")
        )),
    }
}

/// Where `r`'s target conflicts with `aggregate`.
pub(super) fn exclusions(ld: &mut Loader, r: &super::file::RouteFile, ctx: &str) {
    let clash: [(&str, Option<Range<usize>>); 7] = [
        ("upstream", r.upstream.as_ref().map(Spanned::span)),
        ("split", r.split.as_ref().map(Spanned::span)),
        ("static", r.static_files.as_ref().map(Spanned::span)),
        ("mirror", r.mirror.as_ref().map(Spanned::span)),
        ("rewrite", r.rewrite.as_ref().map(Spanned::span)),
        ("strip_prefix", r.strip_prefix.as_ref().map(Spanned::span)),
        ("cache", r.cache.as_ref().map(Spanned::span)),
    ];
    for (key, span) in clash {
        if let Some(s) = span {
            ld.err(s, ctx, format!("`{key}` does not apply to an `aggregate` route (each part names its upstream and path)"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_their_values() {
        let g = vec!["id".to_string()];
        let t = parse_template(
            "/u/{id}/o?l={query.lang}&a={user.account.id}&p={user/a~1b/0}",
            &g,
            &["user"],
        );
        let t = t.unwrap_or(Template(Vec::new()));
        assert_eq!(
            t.0,
            vec![
                Piece::Lit("/u/".into()),
                Piece::Group("id".into()),
                Piece::Lit("/o?l=".into()),
                Piece::Query("lang".into()),
                Piece::Lit("&a=".into()),
                Piece::Part(0, vec!["account".into(), "id".into()]),
                Piece::Lit("&p=".into()),
                Piece::Part(0, vec!["a/b".into(), "0".into()]),
            ]
        );
        for bad in [
            "u/{id}",
            "/{nope}",
            "/{id",
            "/x}",
            "/{user}",
            "/{query.}",
            "/a b",
        ] {
            assert!(parse_template(bad, &g, &["user"]).is_err(), "{bad}");
        }
    }
}
