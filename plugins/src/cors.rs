//! `cors`: Cross-Origin Resource Sharing answered at the gateway.
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) never reaches the
//! upstream: an allowed origin and method get 204 with the `Access-Control-Allow-*` headers,
//! anything else 403. Other requests from an allowed origin get `Access-Control-Allow-Origin`
//! (and credentials/expose headers) on their response; from other origins they pass without
//! them, so the browser withholds the response from the page. `Vary: Origin` is always added
//! when the answer depends on the origin, so caches keep the variants apart.
//!
//! ```toml
//! [plugins.cors]
//! kind = "cors"
//! allow_origins = ["https://app.example.com", "https://*.example.org"]   # or ["*"]
//! allow_methods = ["GET", "POST"]
//! allow_headers = ["authorization", "content-type"]   # absent = echo the requested ones
//! expose_headers = ["x-request-id"]
//! allow_credentials = true
//! max_age = "10m"
//! ```
use async_trait::async_trait;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use serde::Deserialize;

use crate::config::{Dur, HeaderNameConf};
use crate::{refuse, Decision, Phases, Plugin, PluginCtx, Reply};

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        .map(String::from)
        .to_vec()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub allow_origins: Vec<String>,
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<String>,
    pub allow_headers: Option<Vec<HeaderNameConf>>,
    #[serde(default)]
    pub expose_headers: Vec<HeaderNameConf>,
    #[serde(default)]
    pub allow_credentials: bool,
    pub max_age: Option<Dur>,
}

impl Config {
    pub fn prepare(&mut self) -> Result<(), String> {
        if self.allow_origins.is_empty() {
            return Err("`allow_origins` is empty: no origin could ever be allowed".into());
        }
        for o in &self.allow_origins {
            if o == "*" {
                if self.allow_credentials {
                    return Err(
                        "`allow_origins = [\"*\"]` cannot be combined with \
                                `allow_credentials = true` (browsers refuse it); list the origins"
                            .into(),
                    );
                }
                continue;
            }
            let rest = o
                .strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"))
                .ok_or_else(|| format!("origin {o:?} must start with https:// or http://"))?;
            let wild_ok = rest.len() > 2 && rest.starts_with("*.") && !rest[2..].contains('*');
            if rest.is_empty() || rest.contains('/') || (rest.contains('*') && !wild_ok) {
                return Err(format!(
                    "origin {o:?} must be scheme://host[:port], optionally with a leading \"*.\" \
                     wildcard"
                ));
            }
        }
        for m in &self.allow_methods {
            Method::from_bytes(m.as_bytes()).map_err(|_| format!("invalid method {m:?}"))?;
        }
        Ok(())
    }
}

enum Origin {
    Any,
    Exact(String),
    /// `https://*.example.com`: scheme and the suffix `.example.com`.
    Suffix(String, String),
}

pub struct Cors {
    origins: Vec<Origin>,
    any: bool,
    methods: Vec<Method>,
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

fn join(v: impl Iterator<Item = String>) -> Option<HeaderValue> {
    let s = v.collect::<Vec<_>>().join(", ");
    (!s.is_empty())
        .then(|| HeaderValue::from_str(&s).ok())
        .flatten()
}

impl Cors {
    pub fn new(c: Config) -> Self {
        let origins: Vec<Origin> = c
            .allow_origins
            .iter()
            .map(|o| {
                if o == "*" {
                    return Origin::Any;
                }
                let (scheme, rest) = o.split_once("://").unwrap_or(("https", o));
                match rest.strip_prefix('*') {
                    Some(suffix) => Origin::Suffix(format!("{scheme}://"), suffix.to_lowercase()),
                    None => Origin::Exact(o.to_lowercase()),
                }
            })
            .collect();
        let methods: Vec<Method> = c
            .allow_methods
            .iter()
            .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
            .collect();
        Cors {
            any: origins.iter().any(|o| matches!(o, Origin::Any)),
            origins,
            allow_methods: join(methods.iter().map(|m| m.to_string()))
                .unwrap_or(HeaderValue::from_static("GET")),
            methods,
            allow_headers: c
                .allow_headers
                .as_ref()
                .and_then(|h| join(h.iter().map(|n| n.0.to_string()))),
            expose_headers: join(c.expose_headers.iter().map(|n| n.0.to_string())),
            credentials: c.allow_credentials,
            max_age: c.max_age.map(|d| HeaderValue::from(d.0.as_secs())),
        }
    }

    /// Whether `origin` may read responses; compared without case and without allocating
    /// (patterns are lower-cased at load).
    fn allowed(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        let o = origin.as_bytes();
        self.origins.iter().any(|p| match p {
            Origin::Any => true,
            Origin::Exact(e) => o.eq_ignore_ascii_case(e.as_bytes()),
            Origin::Suffix(scheme, suffix) => {
                let (s, x) = (scheme.as_bytes(), suffix.as_bytes());
                o.len() > s.len() + x.len()
                    && o[..s.len()].eq_ignore_ascii_case(s)
                    && o[o.len() - x.len()..].eq_ignore_ascii_case(x)
            }
        })
    }

    /// The Access-Control-Allow-Origin value: `*` when any origin may read without
    /// credentials, else the origin itself.
    fn allow_origin(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any && !self.credentials {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }
}

#[async_trait]
impl Plugin for Cors {
    fn kind(&self) -> &'static str {
        "cors"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST.union(Phases::RESPONSE)
    }

    async fn request(&self, s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        let req = s.req_header();
        if req.method != Method::OPTIONS {
            return Ok(Decision::Continue);
        }
        let (Some(origin), Some(want)) = (
            req.headers.get(header::ORIGIN),
            req.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD),
        ) else {
            // A plain OPTIONS request, not a preflight: the upstream answers it.
            return Ok(Decision::Continue);
        };
        let method_ok =
            Method::from_bytes(want.as_bytes()).is_ok_and(|m| self.methods.contains(&m));
        if !origin.to_str().is_ok_and(|o| self.allowed(o)) || !method_ok {
            return Ok(refuse(
                StatusCode::FORBIDDEN,
                "CORS preflight refused: origin or method not allowed",
                cx,
                vec![(header::VARY, HeaderValue::from_static("Origin"))],
            ));
        }
        let mut headers = vec![
            (
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                self.allow_origin(origin),
            ),
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                self.allow_methods.clone(),
            ),
            (
                header::VARY,
                HeaderValue::from_static(
                    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
                ),
            ),
        ];
        let allow_headers = match &self.allow_headers {
            Some(h) => Some(h.clone()),
            None => req
                .headers
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned(),
        };
        if let Some(h) = allow_headers {
            headers.push((header::ACCESS_CONTROL_ALLOW_HEADERS, h));
        }
        if self.credentials {
            headers.push((
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            ));
        }
        if let Some(m) = &self.max_age {
            headers.push((header::ACCESS_CONTROL_MAX_AGE, m.clone()));
        }
        Ok(Decision::Respond(Reply {
            status: StatusCode::NO_CONTENT,
            headers,
            body: bytes::Bytes::new(),
        }))
    }

    async fn response(
        &self,
        s: &mut Session,
        resp: &mut ResponseHeader,
        _cx: &mut PluginCtx,
    ) -> Result<()> {
        if resp
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        {
            // A preflight answered above, or an upstream doing CORS itself.
            return Ok(());
        }
        let e = |_| pingora_error::Error::explain(pingora_error::ErrorType::InternalError, "cors");
        // The answer depends on Origin whenever it is not a plain `*`: say so on every
        // response, with or without an Origin, or a shared cache may serve one origin's
        // answer to another.
        if !self.any || self.credentials {
            resp.append_header(header::VARY, HeaderValue::from_static("Origin"))
                .map_err(e)?;
        }
        let Some(origin) = s.req_header().headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let ok = origin.to_str().is_ok_and(|o| self.allowed(o));
        let set = |r: &mut ResponseHeader, n: header::HeaderName, v: HeaderValue| {
            r.insert_header(n, v).map(|_| ())
        };
        if !ok {
            return Ok(());
        }
        set(
            resp,
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin(origin),
        )
        .map_err(e)?;
        if self.credentials {
            set(
                resp,
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            )
            .map_err(e)?;
        }
        if let Some(x) = &self.expose_headers {
            set(resp, header::ACCESS_CONTROL_EXPOSE_HEADERS, x.clone()).map_err(e)?;
        }
        Ok(())
    }
}
