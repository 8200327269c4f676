//! Gatehouse's plugin contract: the [`Plugin`] trait, the per-route [`Chain`] and the built-in
//! plugin kinds.
//!
//! A plugin is an offload feature (auth, rate limit, header transform…) that the core runs at
//! Pingora's phases. This crate never sees routing internals: a plugin gets Pingora's `Session`,
//! its own typed config and a small [`PluginCtx`]. Chains are built once per route when the
//! config is loaded, one list per phase, so a request only calls the plugins that act in that
//! phase (calling every plugin at every phase cost µs per request, measured).
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora_error::{Error, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

pub mod authority;
pub mod basic_auth;
mod cache;
pub mod config;
pub mod cors;
pub mod forward_auth;
pub mod headers;
pub mod ip_filter;
pub mod jwt_auth;
pub mod key_auth;
pub mod mtls_auth;
pub mod rate_limit;
pub mod request_id;
pub mod request_limit;
pub mod store;
mod subrequest;
pub mod template;

pub use config::{PluginConfig, KINDS};
pub use mtls_auth::ClientCert;
pub use request_id::{random_u64, secure_u64};

/// What a plugin's request hook decided.
#[must_use]
#[derive(Debug)]
pub enum Decision {
    /// Go on with the next plugin, then the upstream.
    Continue,
    /// Answer the client with this reply; no later plugin and no upstream sees the request.
    Respond(Reply),
}

/// A response produced by the gateway itself (a policy refusal, a preflight answer…).
///
/// The core writes it, after running the chain's response hooks over its header, so that
/// request ids, CORS headers and metrics apply to it like to any proxied response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Reply {
    /// A small JSON error body in the one shape every gateway-made error uses, so clients
    /// and support staff can quote the request id.
    pub fn json_error(status: StatusCode, message: &str, request_id: &HeaderValue) -> Reply {
        let id = String::from_utf8_lossy(request_id.as_bytes());
        Reply {
            status,
            headers: vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body: Bytes::from(format!(
                "{{\"status\":{},\"error\":{},\"request_id\":{}}}\n",
                status.as_u16(),
                json_string(message),
                json_string(&id)
            )),
        }
    }
}

/// An error that ends the request with `status` (when nothing was sent to the client yet);
/// `why` goes to the log and, for 4xx, to the client's JSON body.
/// Such an error is the client's doing (a body over a limit…): it is never held against an
/// upstream's health, breaker or retry budget.
pub fn status_error(status: u16, why: &'static str) -> Box<Error> {
    let mut e = Error::explain(pingora_error::ErrorType::HTTPStatus(status), why);
    e.esource = pingora_error::ErrorSource::Downstream;
    e
}

/// A reply refusing the request: JSON error body plus extra headers.
pub fn refuse(
    status: StatusCode,
    message: &str,
    cx: &mut PluginCtx,
    headers: Vec<(HeaderName, HeaderValue)>,
) -> Decision {
    let mut r = Reply::json_error(status, message, cx.request_id());
    r.headers.extend(headers);
    Decision::Respond(r)
}

/// Quotes `s` as a JSON string (serde_json's escaping).
pub fn json_string(s: &str) -> String {
    // A &str always serialises.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Per-request state the core shares with plugins.
#[derive(Default)]
pub struct PluginCtx {
    /// The request's id: set by the `request_id` plugin, or by the core when it needs one.
    pub request_id: Option<HeaderValue>,
    /// The client's address, resolved through `trusted_proxies`; an IPv4 client of a
    /// dual-stack listener is its IPv4 address. `None` when unknown (see ip_filter).
    pub client_ip: Option<IpAddr>,
    /// Name of the matched route, if any.
    pub route: Option<Arc<str>>,
    /// Name of the gateway that took the request.
    pub gateway: Option<Arc<str>>,
    /// The request's authority in its one spelling, decided with the canonical request
    /// (the Host header says the same); `None` only for an HTTP/1.0 request without one.
    pub authority: Option<authority::Authority>,
    /// Who the chain says the client is; set through [`PluginCtx::identify`].
    identity: Identity,
    /// The name the request authenticated as (API key consumer, basic-auth user, JWT `sub`,
    /// certificate CN); set through [`PluginCtx::identify`].
    consumer: Option<Arc<str>>,
    /// The verified JWT claims, for claim headers and `${jwt.NAME}` variables.
    pub claims: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
    /// The client certificate the TLS handshake verified (gateways with `client_auth`).
    pub client_cert: Option<Arc<ClientCert>>,
    /// Request body bytes seen so far (kept by the chain for body limits).
    pub body_bytes: u64,
    /// What the response cache did (`HIT`, `MISS`, `EXPIRED`, `STALE`, `REVALIDATED`,
    /// `UPDATING`, `BYPASS`); `None` on routes without a cache. Set before the response hooks.
    pub cache_status: Option<&'static str>,
    /// Per-plugin state kept until the request ends (a concurrency slot, headers to send
    /// later), tagged with the plugin instance that kept it; dropped with the ctx.
    hold: Vec<(usize, Box<dyn std::any::Any + Send + Sync>)>,
}

impl std::fmt::Debug for PluginCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginCtx")
            .field("request_id", &self.request_id)
            .field("client_ip", &self.client_ip)
            .field("route", &self.route)
            .field("identity", &self.identity)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

/// The chain's verdict on who the client is: one value that the response cache, the logs and
/// templates read, whichever plugin reached it. The cache shares an answer to a request that
/// is not [`Identity::Anonymous`] only when the answer says it may (`public`, `s-maxage`,
/// `must-revalidate`: RFC 9111 §3.5), so an auth plugin that calls [`PluginCtx::identify`]
/// keeps its users' answers apart without telling the cache anything else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Identity {
    /// No credential was checked, and none was carried.
    #[default]
    Anonymous,
    /// The request carried a credential (Authorization, Proxy-Authorization, or a header or
    /// cookie one of the route's plugins reads one from) that no plugin checked: the upstream
    /// may still answer by it.
    Unchecked,
    /// Verified: by the named plugin kind, or by the TLS handshake (`client_certificate`).
    Verified(&'static str),
}

/// A plugin instance's identity for [`PluginCtx::keep`]: two instances of one kind (two
/// rate limits on a route) keep their state apart.
fn owner<P: ?Sized>(plugin: &P) -> usize {
    plugin as *const P as *const () as usize
}

impl PluginCtx {
    /// Keeps `value` for `plugin` until the request ends.
    pub fn keep<P: ?Sized, T: std::any::Any + Send + Sync>(&mut self, plugin: &P, value: T) {
        self.hold.push((owner(plugin), Box::new(value)));
    }

    /// What `plugin` kept of type `T`, if anything.
    pub fn kept<P: ?Sized, T: std::any::Any>(&self, plugin: &P) -> Option<&T> {
        let me = owner(plugin);
        self.hold
            .iter()
            .filter(|(o, _)| *o == me)
            .find_map(|(_, v)| v.downcast_ref::<T>())
    }

    /// A plugin (`by`, its kind) verified who the client is: the request counts as
    /// identified from here on, and `consumer`, when given, names it unless an earlier
    /// plugin named it already (a token's `sub`, a certificate's CN).
    pub fn identify(&mut self, by: &'static str, consumer: Option<Arc<str>>) {
        if !matches!(self.identity, Identity::Verified(_)) {
            self.identity = Identity::Verified(by);
        }
        if self.consumer.is_none() {
            self.consumer = consumer;
        }
    }

    /// As [`PluginCtx::identify`], for a credential that names its consumer itself (an API
    /// key, a password): that name is the consumer, whatever an earlier plugin said (a
    /// client certificate's CN must not stand in for the key's owner).
    pub fn identify_consumer(&mut self, by: &'static str, consumer: Arc<str>) {
        self.identify(by, None);
        self.consumer = Some(consumer);
    }

    /// The request carried a credential nobody checked (the core says so after the chain).
    pub fn carried_unchecked_credential(&mut self) {
        if self.identity == Identity::Anonymous {
            self.identity = Identity::Unchecked;
        }
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// Who the request authenticated as, when a plugin named someone.
    pub fn consumer(&self) -> Option<&Arc<str>> {
        self.consumer.as_ref()
    }

    /// The request id, generated on first use when no plugin set one.
    pub fn request_id(&mut self) -> &HeaderValue {
        self.request_id.get_or_insert_with(request_id::generate)
    }
}

/// The phases a plugin acts in; the chain calls a plugin only in these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Phases(u8);

impl Phases {
    pub const REQUEST: Phases = Phases(1);
    pub const UPSTREAM_REQUEST: Phases = Phases(1 << 1);
    pub const RESPONSE: Phases = Phases(1 << 2);
    pub const RESPONSE_BODY: Phases = Phases(1 << 3);
    pub const LOGGING: Phases = Phases(1 << 4);
    pub const REQUEST_BODY: Phases = Phases(1 << 5);
    pub const ALL: Phases = Phases(0x3f);
    /// Each phase's metric label, in bit order.
    pub const NAMES: [&'static str; 6] = [
        "request",
        "upstream_request",
        "response",
        "response_body",
        "logging",
        "request_body",
    ];

    pub const fn union(self, other: Phases) -> Phases {
        Phases(self.0 | other.0)
    }

    /// The phase of bit `i` (the order of [`Phases::NAMES`]).
    pub const fn bit(i: usize) -> Phases {
        Phases(1 << i)
    }

    pub const fn contains(self, other: Phases) -> bool {
        self.0 & other.0 == other.0
    }
}

/// An offload feature run by the core at Pingora's phases. Every hook defaults to a no-op;
/// a plugin overrides the ones it needs and lists them in [`Plugin::phases`].
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// The TOML `kind`; also the metrics label.
    fn kind(&self) -> &'static str;

    /// The phases this plugin acts in. Hooks of other phases are never called.
    fn phases(&self) -> Phases;

    /// Runs after routing, before the upstream is chosen. `Respond` ends the request here.
    async fn request(&self, _s: &mut Session, _cx: &mut PluginCtx) -> Result<Decision> {
        Ok(Decision::Continue)
    }

    /// Runs on each request body chunk on its way upstream; `cx.body_bytes` already counts it.
    /// An error ends the request (its status, e.g. 413, when nothing was sent to the client).
    async fn request_body(
        &self,
        _s: &mut Session,
        _body: &mut Option<Bytes>,
        _eos: bool,
        _cx: &mut PluginCtx,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs on the header about to be sent upstream, after the core's path rewrite and
    /// X-Forwarded-* headers.
    async fn upstream_request(
        &self,
        _s: &mut Session,
        _req: &mut RequestHeader,
        _cx: &mut PluginCtx,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs on every response header sent to the client, proxied or made by the gateway.
    async fn response(
        &self,
        _s: &mut Session,
        _resp: &mut ResponseHeader,
        _cx: &mut PluginCtx,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs on each response body chunk; keep it cheap, it is synchronous.
    fn response_body(
        &self,
        _s: &mut Session,
        _body: &mut Option<Bytes>,
        _eos: bool,
        _cx: &mut PluginCtx,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs once when the request is done, whatever its outcome.
    async fn logging(&self, _s: &mut Session, _e: Option<&Error>, _cx: &mut PluginCtx) {}

    /// Headers this plugin reads credentials from or sets an identity in (an API key header,
    /// a consumer or claim header): a mirror's copy of the request goes without them.
    fn credential_headers(&self) -> Vec<HeaderName> {
        Vec::new()
    }

    /// Query parameters that carry a credential (an API key): the access log writes them as
    /// `[redacted]`.
    fn credential_query(&self) -> Vec<String> {
        Vec::new()
    }

    /// The request headers this plugin's `upstream_request` may set, change or remove. A
    /// stored answer is matched to later requests by the client's values of the headers its
    /// `Vary` names (the cache looks up before the upstream request exists), so an answer
    /// that varies on a header the gateway writes is not stored. `None`, the default for a
    /// plugin with an upstream hook: it may write any header, and no answer with `Vary` is
    /// stored on its routes.
    fn upstream_headers(&self) -> Option<Vec<HeaderName>> {
        None
    }
}

/// The plugins of one route (global, then gateway, then route, in file order), split per phase
/// at load time.
///
/// Request-side hooks run in chain order; response-side hooks run in reverse, so the plugin
/// nearest the upstream sees the response first and the outermost one has the last word,
/// as in Envoy's filter chains.
#[derive(Default, Clone)]
pub struct Chain {
    request: Box<[Instance]>,
    request_body: Box<[Instance]>,
    upstream_request: Box<[Instance]>,
    response: Box<[Instance]>,
    response_body: Box<[Instance]>,
    logging: Box<[Instance]>,
}

/// A plugin as a chain holds it: the plugin and its metric handles.
#[derive(Clone)]
pub struct Instance {
    /// The instance's name in the config (`[plugins.NAME]`).
    pub name: Arc<str>,
    pub plugin: Arc<dyn Plugin>,
    pub meter: Arc<Meter>,
}

impl Instance {
    /// An instance whose calls are not measured (tests, tools).
    pub fn unmetered(name: &str, plugin: Arc<dyn Plugin>) -> Instance {
        Instance {
            name: name.into(),
            plugin,
            meter: Arc::default(),
        }
    }
}

/// One plugin instance's metric handles, resolved when the config is loaded, so that timing
/// a call or counting a refusal is an atomic add, never a label lookup on the request path.
#[derive(Default)]
pub struct Meter {
    /// Seconds per call, one histogram per phase (indexed as [`Phases::NAMES`]); `None` for
    /// phases the plugin does not act in, and in tests.
    pub duration: [Option<prometheus::Histogram>; 6],
    /// Refusals for the statuses plugins answer with, resolved at load.
    pub refusals: Vec<(u16, prometheus::IntCounter)>,
    /// Any other status: looked up when it happens (rare by construction).
    pub other: Option<Box<dyn Fn(u16) + Send + Sync>>,
}

impl Meter {
    fn time(&self, phase: usize, since: Option<std::time::Instant>) {
        if let (Some(h), Some(t)) = (&self.duration[phase], since) {
            h.observe(t.elapsed().as_secs_f64());
        }
    }

    fn start(&self, phase: usize) -> Option<std::time::Instant> {
        self.duration[phase]
            .as_ref()
            .map(|_| std::time::Instant::now())
    }

    /// The plugin ended the request with `status` (a reply, or an error carrying a status).
    pub fn refused(&self, status: u16) {
        match self.refusals.iter().find(|(s, _)| *s == status) {
            Some((_, c)) => c.inc(),
            None => {
                if let Some(f) = &self.other {
                    f(status)
                }
            }
        }
    }

    fn refused_by(&self, e: &Error) {
        if let pingora_error::ErrorType::HTTPStatus(s) = e.etype() {
            self.refused(*s);
        }
    }
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds = |v: &[Instance]| v.iter().map(|p| p.plugin.kind()).collect::<Vec<_>>();
        f.debug_struct("Chain")
            .field("request", &kinds(&self.request))
            .field("upstream_request", &kinds(&self.upstream_request))
            .field("response", &kinds(&self.response))
            .finish()
    }
}

impl Chain {
    /// Builds the per-phase lists from plugins in request order.
    pub fn new(plugins: &[Instance]) -> Chain {
        let pick = |phase: Phases, reverse: bool| -> Box<[Instance]> {
            let mut v: Vec<_> = plugins
                .iter()
                .filter(|p| p.plugin.phases().contains(phase))
                .cloned()
                .collect();
            if reverse {
                v.reverse();
            }
            v.into_boxed_slice()
        };
        Chain {
            request: pick(Phases::REQUEST, false),
            request_body: pick(Phases::REQUEST_BODY, false),
            upstream_request: pick(Phases::UPSTREAM_REQUEST, false),
            response: pick(Phases::RESPONSE, true),
            response_body: pick(Phases::RESPONSE_BODY, true),
            logging: pick(Phases::LOGGING, false),
        }
    }

    /// What the upstream hooks may write ([`Plugin::upstream_headers`]): `None` when one of
    /// them does not say.
    pub fn upstream_headers(&self) -> Option<Vec<HeaderName>> {
        let mut all: Vec<HeaderName> = Vec::new();
        for p in &self.upstream_request {
            for h in p.plugin.upstream_headers()? {
                if !all.contains(&h) {
                    all.push(h);
                }
            }
        }
        Some(all)
    }

    /// Every request plugin's [`Plugin::credential_query`], in one list.
    pub fn credential_query(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        for p in &self.request {
            for q in p.plugin.credential_query() {
                if !all.contains(&q) {
                    all.push(q);
                }
            }
        }
        all
    }

    /// Every plugin's [`Plugin::credential_headers`], in one list.
    pub fn credential_headers(&self) -> Vec<HeaderName> {
        let mut seen: Vec<HeaderName> = Vec::new();
        let all = self
            .request
            .iter()
            .chain(self.upstream_request.iter())
            .flat_map(|p| p.plugin.credential_headers());
        for h in all {
            if !seen.contains(&h) {
                seen.push(h);
            }
        }
        seen
    }

    pub fn is_empty(&self) -> bool {
        self.request.is_empty()
            && self.request_body.is_empty()
            && self.upstream_request.is_empty()
            && self.response.is_empty()
            && self.response_body.is_empty()
            && self.logging.is_empty()
    }

    /// The instances each phase calls, in the order it calls them (for `explain`).
    pub fn phases(&self) -> [(&'static str, &[Instance]); 6] {
        [
            ("request", &self.request),
            ("request_body", &self.request_body),
            ("upstream_request", &self.upstream_request),
            ("response", &self.response),
            ("response_body", &self.response_body),
            ("logging", &self.logging),
        ]
    }

    pub async fn request(&self, s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        for p in self.request.iter() {
            let t = p.meter.start(0);
            let d = p.plugin.request(s, cx).await;
            p.meter.time(0, t);
            match d {
                Ok(Decision::Continue) => {}
                Ok(Decision::Respond(r)) => {
                    p.meter.refused(r.status.as_u16());
                    return Ok(Decision::Respond(r));
                }
                Err(e) => {
                    p.meter.refused_by(&e);
                    return Err(e);
                }
            }
        }
        Ok(Decision::Continue)
    }

    pub fn has_request_body(&self) -> bool {
        !self.request_body.is_empty()
    }

    pub async fn request_body(
        &self,
        s: &mut Session,
        body: &mut Option<Bytes>,
        eos: bool,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        cx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        for p in self.request_body.iter() {
            let t = p.meter.start(5);
            let r = p.plugin.request_body(s, body, eos, cx).await;
            p.meter.time(5, t);
            if let Err(e) = r {
                p.meter.refused_by(&e);
                return Err(e);
            }
        }
        Ok(())
    }

    pub async fn upstream_request(
        &self,
        s: &mut Session,
        req: &mut RequestHeader,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        for p in self.upstream_request.iter() {
            let t = p.meter.start(1);
            let r = p.plugin.upstream_request(s, req, cx).await;
            p.meter.time(1, t);
            r?;
        }
        Ok(())
    }

    pub async fn response(
        &self,
        s: &mut Session,
        resp: &mut ResponseHeader,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        for p in self.response.iter() {
            let t = p.meter.start(2);
            let r = p.plugin.response(s, resp, cx).await;
            p.meter.time(2, t);
            r?;
        }
        Ok(())
    }

    pub fn has_response_body(&self) -> bool {
        !self.response_body.is_empty()
    }

    pub fn response_body(
        &self,
        s: &mut Session,
        body: &mut Option<Bytes>,
        eos: bool,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        for p in self.response_body.iter() {
            let t = p.meter.start(3);
            let r = p.plugin.response_body(s, body, eos, cx);
            p.meter.time(3, t);
            r?;
        }
        Ok(())
    }

    pub async fn logging(&self, s: &mut Session, e: Option<&Error>, cx: &mut PluginCtx) {
        for p in self.logging.iter() {
            let t = p.meter.start(4);
            p.plugin.logging(s, e, cx).await;
            p.meter.time(4, t);
        }
    }
}

#[cfg(test)]
mod tests {

    /// A key or a password names its own consumer; a token's subject or a certificate's CN
    /// only names one nobody named yet. Either way the request counts as identified.
    #[test]
    fn who_names_the_consumer() {
        let mut cx = PluginCtx::default();
        assert_eq!(cx.identity(), Identity::Anonymous);
        cx.identify("mtls_auth", Some("alice-cn".into()));
        cx.identify_consumer("key_auth", "bob".into());
        assert_eq!(cx.consumer().map(|c| &**c), Some("bob"));
        cx.identify("jwt_auth", Some("carol".into()));
        assert_eq!(cx.consumer().map(|c| &**c), Some("bob"));
        assert_eq!(cx.identity(), Identity::Verified("mtls_auth"));
        let mut anon = PluginCtx::default();
        anon.carried_unchecked_credential();
        assert_eq!(anon.identity(), Identity::Unchecked);
        anon.identify("jwt_auth", None);
        assert_eq!(anon.identity(), Identity::Verified("jwt_auth"));
    }

    use super::*;

    #[test]
    fn json_string_escapes() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), r#""a\"b\\c\n\u0001""#);
    }

    #[test]
    fn phases_contain() {
        let p = Phases::REQUEST.union(Phases::RESPONSE);
        assert!(p.contains(Phases::REQUEST));
        assert!(!p.contains(Phases::LOGGING));
        assert!(Phases::ALL.contains(p));
    }
}
