//! `headers`: adds, sets and removes request headers (towards the upstream) and response
//! headers (towards the client).
//!
//! `set` replaces any value already there, `add` appends one more value, `remove` deletes
//! every value of the name. Within one direction: remove, then set, then add, so a config can
//! remove a header and add a fresh value of it.
//!
//! Values may use variables, filled per request: `${client_ip}`, `${request_id}`,
//! `${route}`, `${gateway}`, `${consumer}` (set by key_auth, basic_auth or jwt_auth) and
//! `${jwt.CLAIM}`, and on gateways with `client_auth` the verified client certificate's
//! `${tls.client_subject}` (RFC 2253), `${tls.client_san}` (its names, comma-separated) and
//! `${tls.client_fingerprint}` (SHA-256, hex). A `set` whose value comes out empty (say, no consumer) removes the header,
//! so what the client sent under that name never passes; an `add` is skipped.
//!
//! ```toml
//! [plugins.hdrs]
//! kind = "headers"
//! request = { set = { "x-env" = "prod", "x-client" = "${client_ip}" }, remove = ["x-debug"] }
//! response = { add = { "x-served-by" = "gatehouse" } }
//! ```
use async_trait::async_trait;
use http::{HeaderMap, HeaderName};
use pingora_error::{ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use serde::Deserialize;

use crate::config::HeaderNameConf;
use crate::template::TemplateList;
use crate::{Phases, Plugin, PluginCtx};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ops {
    #[serde(default)]
    pub set: TemplateList,
    #[serde(default)]
    pub add: TemplateList,
    #[serde(default)]
    pub remove: Vec<HeaderNameConf>,
}

impl Ops {
    fn is_empty(&self) -> bool {
        self.set.0.is_empty() && self.add.0.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub request: Ops,
    #[serde(default)]
    pub response: Ops,
}

pub struct Headers {
    request: Ops,
    response: Ops,
}

impl Headers {
    pub fn new(c: Config) -> Self {
        Headers {
            request: c.request,
            response: c.response,
        }
    }
}

/// The header operations, written once for both header types.
trait HeaderTarget {
    fn headers(&self) -> &HeaderMap;
    fn remove(&mut self, name: &HeaderName);
    fn insert(&mut self, name: HeaderName, value: http::HeaderValue) -> Result<()>;
    fn append(&mut self, name: HeaderName, value: http::HeaderValue) -> Result<()>;
}

macro_rules! header_target {
    ($t:ty) => {
        impl HeaderTarget for $t {
            fn headers(&self) -> &HeaderMap {
                &self.headers
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
            fn insert(&mut self, name: HeaderName, value: http::HeaderValue) -> Result<()> {
                self.insert_header(name, value)
                    .or_err(ErrorType::InternalError, "setting header")
            }
            fn append(&mut self, name: HeaderName, value: http::HeaderValue) -> Result<()> {
                self.append_header(name, value)
                    .map(|_| ())
                    .or_err(ErrorType::InternalError, "adding header")
            }
        }
    };
}
header_target!(RequestHeader);
header_target!(ResponseHeader);

fn apply(ops: &Ops, h: &mut impl HeaderTarget, cx: &mut PluginCtx) -> Result<()> {
    for name in &ops.remove {
        if h.headers().contains_key(&name.0) {
            h.remove(&name.0);
        }
    }
    for (name, value) in &ops.set.0 {
        match value.render(cx) {
            Some(v) => h.insert(name.clone(), v)?,
            // Nothing to say (no consumer, no such claim): the header is removed rather than
            // left as the client sent it, so `set` never passes a forged value on.
            None => {
                if h.headers().contains_key(name) {
                    h.remove(name);
                }
            }
        }
    }
    for (name, value) in &ops.add.0 {
        if let Some(v) = value.render(cx) {
            h.append(name.clone(), v)?;
        }
    }
    Ok(())
}

#[async_trait]
impl Plugin for Headers {
    fn kind(&self) -> &'static str {
        "headers"
    }

    fn phases(&self) -> Phases {
        let mut p = Phases::default();
        if !self.request.is_empty() {
            p = p.union(Phases::UPSTREAM_REQUEST);
        }
        if !self.response.is_empty() {
            p = p.union(Phases::RESPONSE);
        }
        p
    }

    async fn upstream_request(
        &self,
        _s: &mut Session,
        req: &mut RequestHeader,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        apply(&self.request, req, cx)
    }

    fn upstream_headers(&self) -> Option<Vec<HeaderName>> {
        let r = &self.request;
        let set = r.set.0.iter().chain(&r.add.0).map(|(n, _)| n.clone());
        Some(set.chain(r.remove.iter().map(|n| n.0.clone())).collect())
    }

    async fn response(
        &self,
        _s: &mut Session,
        resp: &mut ResponseHeader,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        apply(&self.response, resp, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::Template;

    fn ops(
        set: &[(&'static str, &'static str)],
        add: &[(&'static str, &'static str)],
        remove: &[&'static str],
    ) -> Ops {
        let list = |v: &[(&'static str, &'static str)]| {
            TemplateList(
                v.iter()
                    .map(|(n, v)| (HeaderName::from_static(n), Template::parse(v).unwrap()))
                    .collect(),
            )
        };
        Ops {
            set: list(set),
            add: list(add),
            remove: remove
                .iter()
                .map(|n| HeaderNameConf(HeaderName::from_static(n)))
                .collect(),
        }
    }

    #[test]
    fn remove_then_set_then_add() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-debug", "1").unwrap();
        req.insert_header("x-env", "dev").unwrap();
        req.insert_header("x-tag", "a").unwrap();
        let o = ops(
            &[("x-env", "prod")],
            &[("x-tag", "b"), ("x-debug", "fresh")],
            &["x-debug"],
        );
        apply(&o, &mut req, &mut PluginCtx::default()).unwrap();
        assert_eq!(req.headers.get("x-env").unwrap(), "prod");
        let tags: Vec<_> = req.headers.get_all("x-tag").iter().collect();
        assert_eq!(tags, vec!["a", "b"]);
        let dbg: Vec<_> = req.headers.get_all("x-debug").iter().collect();
        assert_eq!(dbg, vec!["fresh"]);
    }

    #[test]
    fn phases_follow_config() {
        let h = Headers::new(Config {
            request: Ops::default(),
            response: ops(&[("x-a", "1")], &[], &[]),
        });
        assert!(h.phases().contains(Phases::RESPONSE));
        assert!(!h.phases().contains(Phases::UPSTREAM_REQUEST));
    }
}
