//! `jwt_auth`: bearer JSON Web Tokens (RFC 7519), verified with the `jsonwebtoken` crate.
//!
//! Keys come from `secret` (HMAC), `public_key` or `public_key_file` (PEM: RSA, EC P-256/P-384
//! or Ed25519), `jwks_file`
//! (a JWK Set or a single JWK) and/or `jwks_url` (fetched with the gateway's own HTTP client,
//! refreshed in the background every `jwks_refresh`; a token whose `kid` is unknown triggers
//! one refresh at most every `jwks_min_refresh`).
//!
//! The token's `alg` must be one of `algorithms`, and only keys of that algorithm's family are
//! tried: an HS256 token is never checked against an RSA public key used as an HMAC secret
//! (algorithm confusion), and `alg: none` is no algorithm at all. `exp`, `nbf` (with `leeway`),
//! `iss` and `aud` are checked. A bad token is 401 with `WWW-Authenticate: Bearer
//! error="invalid_token"`; a good token without the route's `required_scopes` or
//! `required_claims` is 403 with `error="insufficient_scope"`.
//!
//! Verified tokens are remembered (by the token itself) until their expiry (bounded), so a client reusing
//! its token costs a hash, not an RSA verification.
//!
//! ```toml
//! [plugins.jwt]
//! kind = "jwt_auth"
//! algorithms = ["RS256"]
//! public_key_file = "keys/pub.pem"     # or secret, jwks_file, jwks_url
//! issuer = "https://auth.example.com"
//! audience = ["orders"]
//! leeway = "30s"
//! required_scopes = ["orders:read"]    # `scope` (space-separated) or `scp` claim
//! required_claims = { role = "admin" }
//! claims_to_headers = { sub = "x-user-id" }
//! ```
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pingora_error::{ErrorType, OrErr, Result};
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::{Map, Value};

mod keys;

pub use keys::{parse_jwks, KeyEntry};
use keys::{pem_key, Remote};

use crate::cache::unix_now;
use crate::config::{Dur, HeaderNameConf};
use crate::subrequest::{Client, Target};
use crate::{refuse, Decision, Phases, Plugin, PluginCtx};

/// An algorithm name as JOSE writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Alg(pub Algorithm);

impl<'de> Deserialize<'de> for Alg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<Algorithm>().map(Alg).map_err(|_| {
            de::Error::custom(format!(
                "unsupported algorithm {s:?}: use HS256/384/512, RS256/384/512, PS256/384/512, \
                 ES256/384 or EdDSA"
            ))
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub algorithms: Vec<Alg>,
    pub secret: Option<String>,
    /// A PEM public key written in the config itself.
    pub public_key: Option<String>,
    pub public_key_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    /// Allow a `jwks_url` over plain http (anyone on the path could swap the keys).
    #[serde(default)]
    pub allow_insecure_jwks: bool,
    pub jwks_refresh: Option<Dur>,
    pub jwks_min_refresh: Option<Dur>,
    pub issuer: Option<OneOrMany>,
    pub audience: Option<OneOrMany>,
    pub leeway: Option<Dur>,
    /// Require and check `exp` (on by default; off only for tokens that never expire).
    #[serde(default = "crate::config::default_true")]
    pub validate_exp: bool,
    #[serde(default)]
    pub required_scopes: Vec<String>,
    #[serde(default)]
    pub required_claims: HashMap<String, Value>,
    #[serde(default)]
    pub claims_to_headers: HashMap<String, HeaderNameConf>,
    /// Read the token from this cookie when there is no Authorization header.
    pub cookie: Option<String>,
    /// Remove the Authorization header before the upstream sees it.
    #[serde(default)]
    pub hide_credentials: bool,
    #[serde(skip)]
    pub keys: Vec<KeyEntry>,
    #[serde(skip)]
    pub jwks_target: Option<Target>,
}

impl Config {
    pub fn prepare(&mut self, base: &Path) -> std::result::Result<(), String> {
        if self.algorithms.is_empty() {
            return Err("`algorithms` is empty: list the ones your issuer signs with".into());
        }
        let mut keys = Vec::new();
        if let Some(s) = &self.secret {
            if s.len() < 32 {
                return Err("`secret` is shorter than 32 bytes: too weak for HMAC".into());
            }
            keys.push(KeyEntry {
                kid: None,
                alg: None,
                key: DecodingKey::from_secret(s.as_bytes()),
                id: 0,
            });
        }
        if let Some(pem) = &self.public_key {
            let key = pem_key(pem.as_bytes()).map_err(|e| format!("public_key: {e}"))?;
            keys.push(KeyEntry {
                kid: None,
                alg: None,
                key,
                id: 0,
            });
        }
        if let Some(f) = &self.public_key_file {
            let path = base.join(f);
            let pem = std::fs::read(&path)
                .map_err(|e| format!("public_key_file {}: {e}", path.display()))?;
            let key =
                pem_key(&pem).map_err(|e| format!("public_key_file {}: {e}", path.display()))?;
            keys.push(KeyEntry {
                kid: None,
                alg: None,
                key,
                id: 0,
            });
        }
        if let Some(f) = &self.jwks_file {
            let path = base.join(f);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("jwks_file {}: {e}", path.display()))?;
            let (k, skipped) =
                parse_jwks(&text).map_err(|e| format!("jwks_file {}: {e}", path.display()))?;
            for s in skipped {
                log::warn!("jwks_file {}: skipped {s}", path.display());
            }
            keys.extend(k);
        }
        if let Some(u) = &self.jwks_url {
            let target = Target::parse(u)?;
            if !target.tls && !self.allow_insecure_jwks {
                return Err(format!(
                    "jwks_url {u:?} is plain http: whoever is on the path could hand the gateway \
                     their own keys; use https, or set allow_insecure_jwks = true"
                ));
            }
            self.jwks_target = Some(target);
        }
        if self
            .jwks_refresh
            .is_some_and(|d| d.0 < Duration::from_secs(1))
        {
            return Err("`jwks_refresh` under 1s would hammer the key server".into());
        }
        if self
            .jwks_min_refresh
            .is_some_and(|d| d.0 < Duration::from_millis(100))
        {
            return Err("`jwks_min_refresh` under 100ms would hammer the key server".into());
        }
        if keys.is_empty() && self.jwks_target.is_none() {
            return Err(
                "no key: set `secret`, `public_key`, `public_key_file`, `jwks_file` or `jwks_url`"
                    .into(),
            );
        }
        for a in &self.algorithms {
            let fam = a.0.family();
            if self.jwks_target.is_none() && !keys.iter().any(|k| k.key.family() == fam) {
                return Err(format!(
                    "algorithm {:?} is allowed but no key of its family ({fam:?}) is configured",
                    a.0
                ));
            }
        }
        self.keys = keys;
        Ok(())
    }
}

type Claims = Arc<Map<String, Value>>;

/// A token that passed verification.
#[derive(Clone)]
struct Verified {
    claims: Claims,
    /// Unix time it stops being valid.
    until: u64,
    /// The fetched (JWKS URL) key that verified it: gone from the key set, the token is
    /// verified again. None for configured keys.
    remote_key: Option<u64>,
}

struct Inner {
    algorithms: Vec<Algorithm>,
    validations: HashMap<Algorithm, Validation>,
    keys: Vec<KeyEntry>,
    remote: Option<Remote>,
    required_scopes: Vec<String>,
    required_claims: Vec<(String, Value)>,
    claims_to_headers: Vec<(String, HeaderName)>,
    cookie: Option<String>,
    hide: bool,
    leeway: u64,
    validate_exp: bool,
    /// Verified tokens, until their expiry: bounded, evicting the least used.
    cache: quick_cache::sync::Cache<Box<str>, Verified>,
}

pub struct JwtAuth {
    inner: Arc<Inner>,
}

/// Why a token was refused, for the client (no key material, no claim values).
fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not valid yet",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "algorithm not allowed",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        ErrorKind::Json(_) | ErrorKind::Utf8(_) | ErrorKind::Base64(_) => "malformed token",
        _ => "invalid token",
    }
}

impl JwtAuth {
    pub fn new(c: Config) -> Self {
        let leeway = c.leeway.map_or(0, |d| d.0.as_secs());
        let issuers = c.issuer.as_ref().map(OneOrMany::list);
        let audiences = c.audience.as_ref().map(OneOrMany::list);
        let validations = c
            .algorithms
            .iter()
            .map(|a| {
                let mut v = Validation::new(a.0);
                v.leeway = leeway;
                v.validate_exp = c.validate_exp;
                v.validate_nbf = true;
                v.required_spec_claims.clear();
                if c.validate_exp {
                    v.required_spec_claims.insert("exp".into());
                }
                if let Some(i) = &issuers {
                    v.set_issuer(i);
                    v.required_spec_claims.insert("iss".into());
                }
                match &audiences {
                    Some(a) => {
                        v.set_audience(a);
                        v.required_spec_claims.insert("aud".into());
                    }
                    None => v.validate_aud = false,
                }
                (a.0, v)
            })
            .collect();
        let remote = c.jwks_target.map(|target| Remote {
            target,
            client: Client::default(),
            keys: ArcSwap::from_pointee(Vec::new()),
            fetched: AtomicU64::new(0),
            attempted: AtomicU64::new(0),
            refreshing: AtomicBool::new(false),
            refresh: c.jwks_refresh.map_or(Duration::from_secs(300), |d| d.0),
            min_refresh: c.jwks_min_refresh.map_or(Duration::from_secs(10), |d| d.0),
            epoch: Instant::now(),
            fetch_lock: tokio::sync::Mutex::new(()),
        });
        JwtAuth {
            inner: Arc::new(Inner {
                algorithms: c.algorithms.iter().map(|a| a.0).collect(),
                validations,
                keys: c.keys,
                remote,
                required_scopes: c.required_scopes,
                required_claims: c.required_claims.into_iter().collect(),
                claims_to_headers: c
                    .claims_to_headers
                    .into_iter()
                    .map(|(k, h)| (k, h.0))
                    .collect(),
                cookie: c.cookie,
                hide: c.hide_credentials,
                leeway,
                validate_exp: c.validate_exp,
                cache: quick_cache::sync::Cache::new(8_192),
            }),
        }
    }
}

impl Inner {
    fn token<'a>(&self, req: &'a RequestHeader) -> Option<&'a str> {
        if let Some(v) = req.headers.get(http::header::AUTHORIZATION) {
            let v = v.to_str().ok()?;
            let (scheme, t) = v.trim().split_once(' ')?;
            return scheme.eq_ignore_ascii_case("bearer").then(|| t.trim());
        }
        let name = self.cookie.as_deref()?;
        req.headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then_some(v)
            })
    }

    /// The keys a token of `alg` with `kid` may be checked against, each with whether it was
    /// fetched from the JWKS URL.
    fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Vec<(KeyEntry, bool)> {
        let fits = |k: &&KeyEntry| {
            k.key.family() == alg.family()
                && k.alg.is_none_or(|a| a == alg)
                && match (kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        };
        let mut out: Vec<(KeyEntry, bool)> = self
            .keys
            .iter()
            .filter(fits)
            .map(|k| (k.clone(), false))
            .collect();
        if let Some(r) = &self.remote {
            out.extend(r.keys.load().iter().filter(fits).map(|k| (k.clone(), true)));
        }
        out
    }

    /// Whether a fetched key is still in the key set.
    fn remote_key_present(&self, id: u64) -> bool {
        self.remote
            .as_ref()
            .is_some_and(|r| r.keys.load().iter().any(|k| k.id == id))
    }

    fn remote_has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
            || self
                .remote
                .as_ref()
                .is_some_and(|r| r.keys.load().iter().any(|k| k.kid.as_deref() == Some(kid)))
    }

    /// Verifies `token`; the claims and the fetched key that verified them, or why not.
    async fn verify(
        self: &Arc<Self>,
        token: &str,
    ) -> std::result::Result<(Map<String, Value>, Option<u64>), &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::Json(_) => {
                "algorithm not allowed or malformed header"
            }
            _ => "malformed token",
        })?;
        if !self.algorithms.contains(&header.alg) {
            return Err("algorithm not allowed");
        }
        if let Some(r) = &self.remote {
            let now = r.now_ms();
            let fetched = r.fetched.load(Ordering::Relaxed);
            let attempted = r.attempted.load(Ordering::Relaxed);
            // However many requests arrive, the key server is asked at most once per
            // `jwks_min_refresh`, also while it fails (no storm against a struggling IdP).
            let may_fetch =
                attempted == 0 || now.saturating_sub(attempted) > r.min_refresh.as_millis() as u64;
            if fetched == 0 {
                if may_fetch {
                    r.fetch(attempted).await;
                }
            } else if may_fetch
                && now.saturating_sub(fetched) > r.refresh.as_millis() as u64
                && !r.refreshing.swap(true, Ordering::AcqRel)
            {
                let me = self.clone();
                tokio::spawn(async move {
                    if let Some(r) = &me.remote {
                        r.fetch(r.attempted.load(Ordering::Relaxed)).await;
                        r.refreshing.store(false, Ordering::Release);
                    }
                });
            }
            if let Some(kid) = header.kid.as_deref() {
                let attempted = r.attempted.load(Ordering::Relaxed);
                if !self.remote_has_kid(kid)
                    && r.now_ms().saturating_sub(attempted) > r.min_refresh.as_millis() as u64
                {
                    r.fetch(attempted).await;
                }
            }
        }
        let keys = self.candidates(header.alg, header.kid.as_deref());
        if keys.is_empty() {
            return Err(if header.kid.is_some() {
                "unknown key id"
            } else {
                "no key for this algorithm"
            });
        }
        let Some(validation) = self.validations.get(&header.alg) else {
            return Err("algorithm not allowed");
        };
        let mut why = "bad signature";
        for (k, remote) in &keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, validation) {
                Ok(data) => return Ok((data.claims, remote.then_some(k.id))),
                Err(e) => {
                    let d = describe(e.kind());
                    // A key that verified the signature but refused the claims says more than
                    // one that did not match at all.
                    if d != "bad signature" {
                        why = d;
                    }
                }
            }
        }
        Err(why)
    }

    /// What this route needs that the token lacks: the scopes, or the name of a claim.
    fn missing(&self, claims: &Map<String, Value>) -> Option<Lacking> {
        let scopes: Vec<&str> = match (claims.get("scope"), claims.get("scp")) {
            (Some(Value::String(s)), _) => s.split_whitespace().collect(),
            (_, Some(Value::Array(a))) => a.iter().filter_map(Value::as_str).collect(),
            (_, Some(Value::String(s))) => s.split_whitespace().collect(),
            _ => Vec::new(),
        };
        let lacking: Vec<&str> = self
            .required_scopes
            .iter()
            .map(String::as_str)
            .filter(|s| !scopes.contains(s))
            .collect();
        if !lacking.is_empty() {
            return Some(Lacking::Scopes(lacking.join(" ")));
        }
        for (name, want) in &self.required_claims {
            let ok = match claims.get(name) {
                Some(Value::Array(have)) => match want {
                    Value::Array(w) => w.iter().all(|x| have.contains(x)),
                    w => have.contains(w),
                },
                Some(have) => have == want,
                None => false,
            };
            if !ok {
                return Some(Lacking::Claim(name.clone()));
            }
        }
        None
    }

    /// Remembers a verified token until it expires (a minute for tokens without `exp`).
    fn remember(&self, token: &str, claims: Claims, remote_key: Option<u64>, now: u64) {
        let until = match claims.get("exp").and_then(Value::as_u64) {
            Some(exp) => exp.saturating_add(self.leeway),
            None if !self.validate_exp => now + 60,
            None => return,
        };
        self.cache.insert(
            token.into(),
            Verified {
                claims,
                until,
                remote_key,
            },
        );
    }

    /// A remembered token, while it is valid and its key is still in the key set.
    fn remembered(&self, token: &str, now: u64) -> Option<Claims> {
        let v = self.cache.get(token)?;
        if now >= v.until || v.remote_key.is_some_and(|id| !self.remote_key_present(id)) {
            self.cache.remove(token);
            return None;
        }
        Some(v.claims)
    }
}

enum Lacking {
    Scopes(String),
    Claim(String),
}

/// The `WWW-Authenticate` challenge (RFC 6750 §3): none, an invalid token, or what is lacking.
fn challenge(error: Option<(&str, &str)>) -> Vec<(HeaderName, HeaderValue)> {
    let v = match error {
        None => "Bearer realm=\"gatehouse\"".to_string(),
        Some(("scope", scope)) => {
            format!("Bearer realm=\"gatehouse\", error=\"insufficient_scope\", scope=\"{scope}\"")
        }
        Some(("claim", name)) => format!(
            "Bearer realm=\"gatehouse\", error=\"insufficient_scope\", \
             error_description=\"claim {name} missing or not allowed\""
        ),
        Some((e, d)) => {
            format!("Bearer realm=\"gatehouse\", error=\"{e}\", error_description=\"{d}\"")
        }
    };
    HeaderValue::from_str(&v)
        .map(|v| vec![(http::header::WWW_AUTHENTICATE, v)])
        .unwrap_or_default()
}

/// A claim as a header value: strings as they are, numbers and booleans as JSON, arrays of
/// those joined with commas; objects are not forwarded.
pub fn claim_value(v: &Value) -> Option<HeaderValue> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(_) | Value::Bool(_) => v.to_string(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| match x {
                Value::String(s) => Some(s.clone()),
                Value::Number(_) | Value::Bool(_) => Some(x.to_string()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(","),
        _ => return None,
    };
    HeaderValue::from_str(&s).ok()
}

#[async_trait]
impl Plugin for JwtAuth {
    fn kind(&self) -> &'static str {
        "jwt_auth"
    }

    /// The claim headers, and Authorization, which it may hide.
    fn upstream_headers(&self) -> Option<Vec<HeaderName>> {
        let mut v: Vec<HeaderName> = (self.inner.claims_to_headers.iter())
            .map(|(_, h)| h.clone())
            .collect();
        v.push(http::header::AUTHORIZATION);
        Some(v)
    }

    fn credential_headers(&self) -> Vec<HeaderName> {
        let mut v: Vec<HeaderName> = self
            .inner
            .claims_to_headers
            .iter()
            .map(|(_, h)| h.clone())
            .collect();
        // A token read from a cookie makes the cookie a credential (the response cache must
        // not share what it was sent with).
        if self.inner.cookie.is_some() {
            v.push(http::header::COOKIE);
        }
        v
    }

    fn phases(&self) -> Phases {
        if self.inner.claims_to_headers.is_empty() && !self.inner.hide {
            Phases::REQUEST
        } else {
            Phases::REQUEST.union(Phases::UPSTREAM_REQUEST)
        }
    }

    async fn request(&self, s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        let inner = &self.inner;
        let Some(token) = inner.token(s.req_header()) else {
            return Ok(refuse(
                StatusCode::UNAUTHORIZED,
                "bearer token required",
                cx,
                challenge(None),
            ));
        };
        let now = unix_now();
        let claims = match inner.remembered(token, now) {
            Some(c) => c,
            None => {
                let token = token.to_string();
                match inner.verify(&token).await {
                    Ok((c, remote_key)) => {
                        let c = Arc::new(c);
                        inner.remember(&token, c.clone(), remote_key, now);
                        c
                    }
                    Err(why) => {
                        return Ok(refuse(
                            StatusCode::UNAUTHORIZED,
                            why,
                            cx,
                            challenge(Some(("invalid_token", why))),
                        ))
                    }
                }
            }
        };
        if let Some(lacking) = inner.missing(&claims) {
            let chal = match &lacking {
                Lacking::Scopes(s) => challenge(Some(("scope", s))),
                Lacking::Claim(c) => challenge(Some(("claim", c))),
            };
            return Ok(refuse(
                StatusCode::FORBIDDEN,
                "token lacks a required scope or claim",
                cx,
                chal,
            ));
        }
        cx.identify(
            "jwt_auth",
            claims.get("sub").and_then(Value::as_str).map(Arc::from),
        );
        cx.claims = Some(claims);
        Ok(Decision::Continue)
    }

    async fn upstream_request(
        &self,
        _s: &mut Session,
        req: &mut RequestHeader,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        let inner = &self.inner;
        for (claim, header) in &inner.claims_to_headers {
            // A client's own header under this name is never passed on as if it were a claim.
            req.remove_header(header);
            if let Some(v) = cx
                .claims
                .as_ref()
                .and_then(|c| c.get(claim))
                .and_then(claim_value)
            {
                req.insert_header(header.clone(), v)
                    .or_err(ErrorType::InternalError, "claim header")?;
            }
        }
        if inner.hide {
            req.remove_header(&http::header::AUTHORIZATION);
        }
        Ok(())
    }
}
