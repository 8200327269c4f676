//! `forward_auth`: asks an external service whether a request may pass (Traefik's ForwardAuth,
//! nginx's auth_request).
//!
//! The gateway sends `GET url` with the chosen request headers plus `X-Forwarded-Method`,
//! `X-Forwarded-Uri` (the path as routed, dot segments resolved), `X-Forwarded-Host`,
//! `X-Forwarded-For` and the request id. A 2xx lets the request on, copying
//! `upstream_headers` from the auth answer to the upstream request (say, `x-user-id`); any
//! other answer is returned to the client as is (status, headers, body up to 64 KiB), so the
//! auth service decides between 401, 403 and redirects. No answer within `timeout` fails
//! closed: 503, the request does not pass.
//!
//! ```toml
//! [plugins.sso]
//! kind = "forward_auth"
//! url = "http://127.0.0.1:9200/verify"
//! timeout = "2s"
//! request_headers = ["authorization", "cookie"]
//! upstream_headers = ["x-user-id"]
//! ```
use std::time::Duration;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora_error::{ErrorType, OrErr, Result};
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use serde::Deserialize;

use crate::config::{Dur, HeaderNameConf};
use crate::subrequest::{Client, Target};
use crate::{refuse, Decision, Phases, Plugin, PluginCtx, Reply};

fn default_request_headers() -> Vec<HeaderNameConf> {
    vec![
        HeaderNameConf(http::header::AUTHORIZATION),
        HeaderNameConf(http::header::COOKIE),
    ]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub url: String,
    pub timeout: Option<Dur>,
    #[serde(default = "default_request_headers")]
    pub request_headers: Vec<HeaderNameConf>,
    #[serde(default)]
    pub upstream_headers: Vec<HeaderNameConf>,
    #[serde(skip)]
    pub target: Option<Target>,
}

impl Config {
    pub fn prepare(&mut self) -> Result<(), String> {
        self.target = Some(Target::parse(&self.url)?);
        Ok(())
    }
}

const MAX_BODY: usize = 64 * 1024;

pub struct ForwardAuth {
    target: Target,
    timeout: Duration,
    request_headers: Vec<HeaderName>,
    upstream_headers: Vec<HeaderName>,
    client: Client,
}

impl ForwardAuth {
    pub fn new(c: Config) -> Self {
        ForwardAuth {
            // prepare() always sets the target; this placeholder is never called.
            target: c
                .target
                .unwrap_or_else(|| Target::fixed(([127, 0, 0, 1], 9).into(), "/")),
            timeout: c.timeout.map_or(Duration::from_secs(5), |d| d.0),
            request_headers: c.request_headers.into_iter().map(|h| h.0).collect(),
            upstream_headers: c.upstream_headers.into_iter().map(|h| h.0).collect(),
            client: Client::default(),
        }
    }

    fn auth_request(&self, req: &RequestHeader, cx: &mut PluginCtx) -> Result<RequestHeader> {
        let mut a = RequestHeader::build("GET", self.target.path.as_bytes(), Some(8))?;
        for name in &self.request_headers {
            for v in req.headers.get_all(name) {
                a.append_header(name.clone(), v.clone())
                    .or_err(ErrorType::InternalError, "auth header")?;
            }
        }
        // The core made the request canonical before routing: this is the path as routed
        // and sent upstream (`/public/%2e%2e/admin` is checked as `/admin`).
        let mut uri = req.uri.path().to_string();
        if let Some(q) = req.uri.query() {
            uri.push('?');
            uri.push_str(q);
        }
        let uri = HeaderValue::from_bytes(uri.as_bytes())
            .map_err(|_| crate::status_error(400, "request path not sendable to auth"))?;
        a.insert_header("x-forwarded-uri", uri)
            .or_err(ErrorType::InternalError, "auth header")?;
        a.insert_header("x-forwarded-method", req.method.as_str())
            .or_err(ErrorType::InternalError, "auth header")?;
        let host = req.headers.get(http::header::HOST).cloned().or_else(|| {
            req.uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        if let Some(host) = host {
            a.insert_header("x-forwarded-host", host)
                .or_err(ErrorType::InternalError, "auth header")?;
        }
        if let Some(ip) = cx.client_ip {
            a.insert_header("x-forwarded-for", ip.to_string())
                .or_err(ErrorType::InternalError, "auth header")?;
        }
        let id = cx.request_id().clone();
        a.insert_header("x-request-id", id)
            .or_err(ErrorType::InternalError, "auth header")?;
        Ok(a)
    }
}

/// What the auth service said yes with, for the upstream request.
struct Granted(Vec<(HeaderName, HeaderValue)>);

#[async_trait]
impl Plugin for ForwardAuth {
    fn upstream_headers(&self) -> Option<Vec<HeaderName>> {
        Some(self.upstream_headers.clone())
    }

    fn credential_headers(&self) -> Vec<HeaderName> {
        let mut v = self.upstream_headers.clone();
        v.extend(self.request_headers.iter().cloned());
        v
    }

    fn kind(&self) -> &'static str {
        "forward_auth"
    }

    fn phases(&self) -> Phases {
        if self.upstream_headers.is_empty() {
            Phases::REQUEST
        } else {
            Phases::REQUEST.union(Phases::UPSTREAM_REQUEST)
        }
    }

    async fn request(&self, s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        let areq = self.auth_request(s.req_header(), cx)?;
        let resp = match self
            .client
            .send(&self.target, areq, self.timeout, MAX_BODY)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                log::warn!("forward_auth {}: {e}", self.target.host);
                return Ok(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "authorization service unavailable",
                    cx,
                    Vec::new(),
                ));
            }
        };
        if resp.header.status.is_success() {
            // The auth service let this request through on what it carried: its answer may
            // be this client's alone.
            cx.identify("forward_auth", None);
            let granted: Vec<_> = self
                .upstream_headers
                .iter()
                .filter_map(|n| resp.header.headers.get(n).map(|v| (n.clone(), v.clone())))
                .collect();
            if !granted.is_empty() {
                cx.keep(self, Granted(granted));
            }
            return Ok(Decision::Continue);
        }
        // The auth service's refusal goes to the client unchanged, hop-by-hop headers aside.
        let headers = resp
            .header
            .headers
            .iter()
            .filter(|(n, _)| {
                !matches!(
                    n.as_str(),
                    "connection"
                        | "keep-alive"
                        | "transfer-encoding"
                        | "content-length"
                        | "te"
                        | "trailer"
                        | "upgrade"
                )
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        Ok(Decision::Respond(Reply {
            status: resp.header.status,
            headers,
            body: resp.body,
        }))
    }

    async fn upstream_request(
        &self,
        _s: &mut Session,
        req: &mut RequestHeader,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        // Headers the client sent under these names are not believed: only the auth
        // service's answer sets them.
        for n in &self.upstream_headers {
            req.remove_header(n);
        }
        if let Some(g) = cx.kept::<_, Granted>(self) {
            for (n, v) in &g.0 {
                req.append_header(n.clone(), v.clone())
                    .or_err(ErrorType::InternalError, "granted header")?;
            }
        }
        Ok(())
    }
}
