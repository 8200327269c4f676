//! The path sent upstream: `strip_prefix`, `rewrite`, and dot-segment normalization.
use crate::config::{PathMatch, Rewrite, Route};

/// The new path for the upstream, or `None` to send the client's path unchanged.
pub fn upstream_path(route: &Route, path: &str) -> Option<String> {
    match (&route.rewrite, &route.path) {
        (Rewrite::Keep, _) => None,
        (Rewrite::StripPrefix, PathMatch::Prefix(p)) => {
            let rest = if p == "/" {
                path
            } else {
                path.get(p.len()..).unwrap_or("")
            };
            Some(if rest.starts_with('/') {
                rest.to_string()
            } else {
                format!("/{rest}")
            })
        }
        (Rewrite::Replace(new), PathMatch::Prefix(p)) => {
            let rest = if p == "/" {
                path.strip_prefix('/').unwrap_or(path)
            } else {
                path.get(p.len()..).unwrap_or("")
            };
            let base = new.trim_end_matches('/');
            Some(match (rest.strip_prefix('/'), rest.is_empty()) {
                (_, true) => new.clone(),
                (Some(r), _) => format!("{base}/{r}"),
                (None, _) => format!("{base}/{rest}"),
            })
        }
        (Rewrite::Replace(new), _) => Some(new.clone()),
        (Rewrite::Template(t), PathMatch::Regex(re)) => {
            let out = re.replace(path, t.as_str()).into_owned();
            Some(if out.starts_with('/') {
                out
            } else {
                format!("/{out}")
            })
        }
        // Validation rules these out; keep the client's path.
        (Rewrite::StripPrefix, _) | (Rewrite::Template(_), _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostMatch;
    use regex::Regex;

    fn route(path: PathMatch, rewrite: Rewrite) -> Route {
        Route {
            name: "r".into(),
            line: 1,
            host: HostMatch::Any,
            path,
            methods: None,
            headers: vec![],
            priority: 0,
            target: crate::config::Target::Upstream(0),
            mirror: None,
            rewrite,
            preserve_host: true,
            plugins: vec![],
            compression: None,
            cache: None,
            access_log: true,
            request_buffering: 0,
        }
    }

    #[test]
    fn strip_prefix() {
        let r = route(PathMatch::Prefix("/api".into()), Rewrite::StripPrefix);
        assert_eq!(upstream_path(&r, "/api/users/1").unwrap(), "/users/1");
        assert_eq!(upstream_path(&r, "/api").unwrap(), "/");
    }

    #[test]
    fn replace_prefix_and_exact() {
        let r = route(
            PathMatch::Prefix("/api/orders".into()),
            Rewrite::Replace("/v2/orders".into()),
        );
        assert_eq!(upstream_path(&r, "/api/orders/7").unwrap(), "/v2/orders/7");
        assert_eq!(upstream_path(&r, "/api/orders").unwrap(), "/v2/orders");
        let r = route(
            PathMatch::Prefix("/old".into()),
            Rewrite::Replace("/".into()),
        );
        assert_eq!(upstream_path(&r, "/old/x").unwrap(), "/x");
        let r = route(
            PathMatch::Exact("/a".into()),
            Rewrite::Replace("/b/c".into()),
        );
        assert_eq!(upstream_path(&r, "/a").unwrap(), "/b/c");
    }

    #[test]
    fn regex_template() {
        let re = Regex::new(r"^/users/(?P<id>\d+)/profile$").unwrap();
        let r = route(
            PathMatch::Regex(re),
            Rewrite::Template("/profiles/${id}".into()),
        );
        assert_eq!(
            upstream_path(&r, "/users/42/profile").unwrap(),
            "/profiles/42"
        );
    }
}
