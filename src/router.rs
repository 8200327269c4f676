//! The compiled route table of one gateway: host map, then per-path lookups, then predicates.
//!
//! Specificity, not file order, decides: an exact host beats a wildcard host (the
//! longer suffix first), which beats routes with no host; when no route of a more specific host
//! matches, the less specific ones are tried. Within a host: exact path, then the longest
//! matching prefix (segment-wise: `/api` matches `/api` and `/api/x`, not `/apix`), then
//! regexes, then the catch-all prefix `/`. Routes on the same path are tried by `priority`,
//! then by how many predicates (methods, headers) they have, then by file order.
//!
//! Lookup allocates nothing: hash lookups by `&str`, a recursive walk of a segment trie, and
//! regexes only where configured.
use std::collections::HashMap;

use http::{HeaderMap, Method};
use regex::Regex;

use crate::config::{HostMatch, PathMatch, Route, ValueMatch};

pub type RouteId = usize;

#[derive(Default, Debug)]
struct Node {
    routes: Vec<RouteId>,
    children: HashMap<Box<str>, Node>,
}

#[derive(Default, Debug)]
struct PathTable {
    exact: HashMap<Box<str>, Vec<RouteId>>,
    /// Prefix routes; the root node holds the catch-all `/` routes.
    trie: Node,
    regex: Vec<(Regex, RouteId)>,
}

#[derive(Default, Debug)]
pub struct Router {
    exact_hosts: HashMap<Box<str>, PathTable>,
    /// Keyed by the suffix with its leading dot: `.example.com`.
    suffix_hosts: HashMap<Box<str>, PathTable>,
    any_host: PathTable,
}

/// What a route needs to be matched beyond host and path.
struct Predicates<'a> {
    methods: &'a Option<Vec<Method>>,
    headers: &'a [(http::HeaderName, crate::config::ValueMatch)],
}

impl Router {
    pub fn new(routes: &[Route]) -> Router {
        let mut r = Router::default();
        for (id, route) in routes.iter().enumerate() {
            let table = match &route.host {
                HostMatch::Any => &mut r.any_host,
                HostMatch::Exact(h) => r.exact_hosts.entry(h.as_str().into()).or_default(),
                HostMatch::Suffix(s) => r.suffix_hosts.entry(s.as_str().into()).or_default(),
            };
            match &route.path {
                PathMatch::Exact(p) => table.exact.entry(p.as_str().into()).or_default().push(id),
                PathMatch::Regex(re) => table.regex.push((re.clone(), id)),
                PathMatch::Prefix(p) => {
                    let mut node = &mut table.trie;
                    for seg in p.split('/').filter(|s| !s.is_empty()) {
                        node = node.children.entry(seg.into()).or_default();
                    }
                    node.routes.push(id);
                }
            }
        }
        let order = |ids: &mut Vec<RouteId>| {
            ids.sort_by_key(|&id| {
                let rt = &routes[id];
                let preds = usize::from(rt.methods.is_some()) + rt.headers.len();
                (std::cmp::Reverse(rt.priority), std::cmp::Reverse(preds), id)
            })
        };
        let tables = r
            .exact_hosts
            .values_mut()
            .chain(r.suffix_hosts.values_mut())
            .chain(std::iter::once(&mut r.any_host));
        for t in tables {
            t.exact.values_mut().for_each(order);
            sort_trie(&mut t.trie, &order);
            t.regex
                .sort_by_key(|(_, id)| (std::cmp::Reverse(routes[*id].priority), *id));
        }
        r
    }

    /// Finds the route for a request. `host` is the canonical authority's host
    /// (`gatehouse_plugins::authority`: lower case, no port, no trailing dot); `path` is the
    /// canonical request path (`proxy/canonical.rs`) without its query: matching is
    /// case-sensitive, as RFC 3986 paths are.
    pub fn find(
        &self,
        routes: &[Route],
        host: Option<&str>,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<RouteId> {
        let check = |id: RouteId| {
            let r = &routes[id];
            Predicates {
                methods: &r.methods,
                headers: &r.headers,
            }
            .hold(method, headers)
        };
        if let Some(host) = host {
            if let Some(t) = self.exact_hosts.get(host) {
                if let Some(id) = t.find(path, &check) {
                    return Some(id);
                }
            }
            if !self.suffix_hosts.is_empty() {
                // Longest suffix first: for a.b.example.com try .b.example.com, .example.com, .com
                for (i, _) in host.match_indices('.') {
                    if let Some(t) = self.suffix_hosts.get(&host[i..]) {
                        if let Some(id) = t.find(path, &check) {
                            return Some(id);
                        }
                    }
                }
            }
        }
        self.any_host.find(path, &check)
    }
}

fn sort_trie(node: &mut Node, order: &impl Fn(&mut Vec<RouteId>)) {
    order(&mut node.routes);
    for c in node.children.values_mut() {
        sort_trie(c, order);
    }
}

/// Whether a route's `methods` take `method`. HEAD is GET without the body (RFC 9110
/// §9.3.2), and servers answer it with their GET handler: a GET route's plugins must see it
/// too, not a less guarded route.
pub fn method_holds(methods: &[Method], method: &Method) -> bool {
    methods.contains(method) || (method == Method::HEAD && methods.contains(&Method::GET))
}

/// Whether a header matcher holds: any of the request's values of that header matches.
pub fn header_holds(headers: &HeaderMap, name: &http::HeaderName, m: &ValueMatch) -> bool {
    headers.get_all(name).iter().any(|v| m.matches(v))
}

impl Predicates<'_> {
    fn hold(&self, method: &Method, headers: &HeaderMap) -> bool {
        if self
            .methods
            .as_ref()
            .is_some_and(|ms| !method_holds(ms, method))
        {
            return false;
        }
        self.headers
            .iter()
            .all(|(name, m)| header_holds(headers, name, m))
    }
}

impl PathTable {
    fn find(&self, path: &str, check: &impl Fn(RouteId) -> bool) -> Option<RouteId> {
        if let Some(ids) = self.exact.get(path) {
            if let Some(id) = ids.iter().copied().find(|&id| check(id)) {
                return Some(id);
            }
        }
        let rest = path.strip_prefix('/').unwrap_or(path);
        if let Some(id) = walk_children(&self.trie, rest, check) {
            return Some(id);
        }
        if let Some(id) = self
            .regex
            .iter()
            .find(|(re, id)| re.is_match(path) && check(*id))
            .map(|(_, id)| *id)
        {
            return Some(id);
        }
        self.trie.routes.iter().copied().find(|&id| check(id))
    }
}

/// Deepest matching prefix first: try the child for the next segment, then this node's own
/// routes. Depth is bounded by the configured prefixes, not by the request.
fn walk_children(node: &Node, rest: &str, check: &impl Fn(RouteId) -> bool) -> Option<RouteId> {
    if rest.is_empty() || node.children.is_empty() {
        return None;
    }
    let (seg, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let child = node.children.get(seg)?;
    walk_children(child, tail, check).or_else(|| child.routes.iter().copied().find(|&id| check(id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::path::Path;

    fn routes(routes_toml: &str) -> Vec<Route> {
        let src = format!(
            "[upstreams.u]\npeers = [\"127.0.0.1:1\"]\n[gateways.g]\nlisten = [\"127.0.0.1:1\"]\n{routes_toml}"
        );
        let c = config::load_str(Path::new("t.toml"), &src).unwrap_or_else(|e| panic!("{e}"));
        c.gateways.into_iter().next().unwrap().routes
    }

    fn find(
        rs: &[Route],
        r: &Router,
        host: &str,
        path: &str,
        method: &str,
        hdrs: &[(&str, &str)],
    ) -> Option<String> {
        let mut h = HeaderMap::new();
        for (k, v) in hdrs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        r.find(rs, Some(host), path, &m, &h)
            .map(|id| rs[id].name.clone())
    }

    #[test]
    fn specificity() {
        let rs = routes(
            r#"
[[routes]]
name = "root"
upstream = "u"
[[routes]]
name = "api"
path = "/api"
upstream = "u"
[[routes]]
name = "api-v1"
path = "/api/v1/"
upstream = "u"
[[routes]]
name = "exact"
path = "= /api/v1/health"
upstream = "u"
[[routes]]
name = "re"
path = "~ ^/items/[0-9]+$"
upstream = "u"
[[routes]]
name = "host"
host = "Admin.Example.com"
path = "/api"
upstream = "u"
[[routes]]
name = "wild"
host = "*.example.com"
upstream = "u"
[[routes]]
name = "post"
path = "/api"
methods = ["POST"]
upstream = "u"
[[routes]]
name = "mobile"
path = "/api"
headers = { "x-client" = "mobile" }
upstream = "u"
"#,
        );
        let r = Router::new(&rs);
        let f = |host, path, method, h: &[(&str, &str)]| find(&rs, &r, host, path, method, h);
        assert_eq!(f("x", "/", "GET", &[]).as_deref(), Some("root"));
        assert_eq!(f("x", "/apix", "GET", &[]).as_deref(), Some("root"));
        assert_eq!(f("x", "/api", "GET", &[]).as_deref(), Some("api"));
        assert_eq!(f("x", "/api/orders", "GET", &[]).as_deref(), Some("api"));
        assert_eq!(f("x", "/api/v1", "GET", &[]).as_deref(), Some("api-v1"));
        assert_eq!(
            f("x", "/api/v1/health", "GET", &[]).as_deref(),
            Some("exact")
        );
        assert_eq!(
            f("x", "/api/v1/health/x", "GET", &[]).as_deref(),
            Some("api-v1")
        );
        assert_eq!(f("x", "/items/12", "GET", &[]).as_deref(), Some("re"));
        assert_eq!(f("x", "/items/x", "GET", &[]).as_deref(), Some("root"));
        assert_eq!(
            f("admin.example.com", "/api/1", "GET", &[]).as_deref(),
            Some("host")
        );
        // more specific host has no match for this path: the wildcard takes it
        assert_eq!(
            f("admin.example.com", "/other", "GET", &[]).as_deref(),
            Some("wild")
        );
        assert_eq!(
            f("a.b.example.com", "/api", "GET", &[]).as_deref(),
            Some("wild")
        );
        assert_eq!(f("example.com", "/api", "GET", &[]).as_deref(), Some("api"));
        assert_eq!(f("x", "/api", "POST", &[]).as_deref(), Some("post"));
        assert_eq!(
            f("x", "/api/1", "GET", &[("x-client", "mobile")]).as_deref(),
            Some("mobile")
        );
    }

    #[test]
    fn no_match_without_catch_all() {
        let rs = routes("[[routes]]\npath = \"/a\"\nmethods = [\"GET\"]\nupstream = \"u\"\n");
        let r = Router::new(&rs);
        assert!(find(&rs, &r, "h", "/b", "GET", &[]).is_none());
        assert!(find(&rs, &r, "h", "/a", "PUT", &[]).is_none());
        assert!(
            find(&rs, &r, "h", "/a", "HEAD", &[]).is_some(),
            "HEAD takes GET routes"
        );
    }
}
