//! `basic_auth`: HTTP Basic authentication against an htpasswd file of bcrypt entries
//! (`htpasswd -B`).
//!
//! bcrypt is slow by design (tens of ms per check), so it runs on Tokio's blocking pool, never
//! on a proxy worker thread, and a successful check is remembered for `cache_for` under a
//! SHA-256 of user, password and stored hash (bounded; changing the file invalidates entries
//! on reload). Wrong passwords are never cached.
//!
//! bcrypt turns are few (two per core), so wrong passwords must not be able to take them all:
//! a client (by address) that failed `max_failures` times within `failure_window` is refused
//! (429) before any bcrypt until the window ends, and one turn in four is kept for users who
//! signed in recently, so a flood of guesses from many addresses still leaves them a way in.
//!
//! ```toml
//! [plugins.basic]
//! kind = "basic_auth"
//! htpasswd_file = "users.htpasswd"
//! realm = "orders"
//! max_failures = 10            # per client address and failure_window (1m)
//! ```
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora_error::Result;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::cache::unix_now;
use crate::config::Dur;
use crate::{refuse, Decision, Phases, Plugin, PluginCtx};

fn default_realm() -> String {
    "gatehouse".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub htpasswd_file: PathBuf,
    #[serde(default = "default_realm")]
    pub realm: String,
    #[serde(default = "crate::config::default_true")]
    pub hide_credentials: bool,
    pub cache_for: Option<Dur>,
    /// Failed checks a client address may make per `failure_window` before it is refused
    /// without one.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    pub failure_window: Option<Dur>,
    #[serde(skip)]
    pub users: Vec<(String, String)>,
}

fn default_max_failures() -> u32 {
    10
}

impl Config {
    pub fn prepare(&mut self, base: &Path) -> Result<(), String> {
        if self.realm.contains('"') || HeaderValue::from_str(&self.realm).is_err() {
            return Err(format!(
                "realm {:?} must be printable text without quotes",
                self.realm
            ));
        }
        let path = base.join(&self.htpasswd_file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("htpasswd_file {}: {e}", path.display()))?;
        let mut users = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("{}:{}: expected \"user:hash\"", path.display(), n + 1))?;
            if !["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p))
                || hash.parse::<bcrypt::HashParts>().is_err()
            {
                return Err(format!(
                    "{}:{}: user {user:?}: only bcrypt entries are supported (create them with \
                     `htpasswd -B`)",
                    path.display(),
                    n + 1
                ));
            }
            users.push((user.to_string(), hash.to_string()));
        }
        if users.is_empty() {
            return Err(format!("htpasswd_file {} has no users", path.display()));
        }
        if self.max_failures == 0 {
            return Err("`max_failures` must be at least 1".into());
        }
        self.users = users;
        Ok(())
    }
}

pub struct BasicAuth {
    /// User name → (the name as the consumer, its bcrypt hash).
    users: HashMap<String, (Arc<str>, Arc<str>)>,
    challenge: HeaderValue,
    hide: bool,
    cache_for: u64,
    /// Successful checks by SHA-256(user, password, hash), each valid until a unix time.
    cache: quick_cache::sync::Cache<[u8; 32], u64>,
    /// Turns for bcrypt on the blocking pool: two per core, less the reserved ones.
    bcrypt_slots: Arc<tokio::sync::Semaphore>,
    /// Turns only users who signed in recently may take.
    reserved_slots: Arc<tokio::sync::Semaphore>,
    /// (user, client) pairs with a recent success, until a unix time: a guesser who knows a
    /// user's name does not get the reserved turns by it.
    known: quick_cache::sync::Cache<(Arc<str>, Option<IpAddr>), u64>,
    /// Checks under way or failed per client (IPv6 per /64), in the current window.
    failures: quick_cache::sync::Cache<Option<IpAddr>, Arc<Failures>>,
    max_failures: u32,
    failure_window: u64,
}

impl BasicAuth {
    pub fn new(c: Config) -> Self {
        let turns = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        let reserved = (turns / 4).max(1);
        let turns = turns.max(reserved + 1);
        let challenge =
            HeaderValue::from_str(&format!("Basic realm=\"{}\", charset=\"UTF-8\"", c.realm))
                .unwrap_or(HeaderValue::from_static("Basic"));
        BasicAuth {
            users: c
                .users
                .into_iter()
                .map(|(u, h)| {
                    let name = Arc::from(u.as_str());
                    (u, (name, Arc::from(h)))
                })
                .collect(),
            challenge,
            hide: c.hide_credentials,
            cache_for: c.cache_for.map_or(300, |d| d.0.as_secs()),
            cache: quick_cache::sync::Cache::new(4096),
            bcrypt_slots: Arc::new(tokio::sync::Semaphore::new(turns - reserved)),
            reserved_slots: Arc::new(tokio::sync::Semaphore::new(reserved)),
            known: quick_cache::sync::Cache::new(4096),
            failures: quick_cache::sync::Cache::new(65_536),
            max_failures: c.max_failures,
            failure_window: c.failure_window.map_or(60, |d| d.0.as_secs().max(1)),
        }
    }

    /// Counts a check for `client` before it runs (so a burst of concurrent guesses is
    /// counted, not let through while the first ones are still checking); the seconds until
    /// it may try again when it is over `max_failures`. A success gives its count back.
    fn attempt(&self, client: Option<IpAddr>, now: u64) -> Result<Arc<Failures>, u64> {
        let f = self
            .failures
            .get_or_insert_with(&client, || {
                Ok::<_, std::convert::Infallible>(Arc::new(Failures {
                    count: AtomicU32::new(0),
                    start: AtomicU64::new(now),
                }))
            })
            .unwrap_or_else(|e| match e {});
        let start = f.start.load(Relaxed);
        if now >= start + self.failure_window
            && f.start
                .compare_exchange(start, now, Relaxed, Relaxed)
                .is_ok()
        {
            f.count.store(0, Relaxed);
        }
        if f.count.fetch_add(1, Relaxed) >= self.max_failures {
            f.count.fetch_sub(1, Relaxed);
            let ends = f.start.load(Relaxed) + self.failure_window;
            return Err(ends.saturating_sub(now).max(1));
        }
        Ok(f)
    }

    /// A bcrypt turn: the shared ones, or for a known user also a reserved one; within a
    /// second, or none.
    async fn turn(&self, known: bool) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let wait = Duration::from_secs(1);
        let shared = self.bcrypt_slots.clone().acquire_owned();
        if !known {
            return tokio::time::timeout(wait, shared).await.ok()?.ok();
        }
        let reserved = self.reserved_slots.clone().acquire_owned();
        tokio::time::timeout(wait, async {
            tokio::select! {
                p = shared => p.ok(),
                p = reserved => p.ok(),
            }
        })
        .await
        .ok()
        .flatten()
    }

    async fn verify(&self, user: &str, pass: &str, client: Option<IpAddr>) -> Check {
        // An unknown user costs a bcrypt like a known one (against some user's hash, result
        // ignored), so response times do not tell which user names exist.
        let (name, hash) = match self.users.get(user) {
            Some((n, h)) => (Some(n.clone()), h.clone()),
            None => match self.users.values().next() {
                Some((_, h)) => (None, h.clone()),
                None => return Check::Bad,
            },
        };
        let mut h = Sha256::new();
        for part in [
            user.as_bytes(),
            b"\0",
            pass.as_bytes(),
            b"\0",
            hash.as_bytes(),
        ] {
            h.update(part);
        }
        let fp: [u8; 32] = h.finalize().into();
        let now = unix_now();
        if let (Some(n), Some(until)) = (&name, self.cache.get(&fp)) {
            if now < until {
                return Check::Ok(n.clone());
            }
        }
        let client = client.map(per_site);
        let tries = match self.attempt(client, now) {
            Ok(f) => f,
            Err(wait) => return Check::LockedOut(wait),
        };
        // bcrypt is CPU-bound by design: a bounded number run at once, and a request that
        // cannot get a turn within a second is told to come back rather than queued forever.
        let known = name
            .as_ref()
            .and_then(|n| self.known.get(&(n.clone(), client)))
            .is_some_and(|until| now < until);
        let Some(permit) = self.turn(known).await else {
            tries.count.fetch_sub(1, Relaxed);
            return Check::Busy;
        };
        let pass = pass.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(pass, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        match name {
            Some(n) if ok => {
                tries.count.fetch_sub(1, Relaxed);
                self.cache.insert(fp, now + self.cache_for);
                // "Recently" is a day, or cache_for if longer.
                self.known
                    .insert((n.clone(), client), now + self.cache_for.max(86_400));
                Check::Ok(n)
            }
            _ => Check::Bad,
        }
    }
}

/// A client's checks in the current window.
struct Failures {
    count: AtomicU32,
    start: AtomicU64,
}

/// IPv6 clients by their /64: rotating addresses within one must not reset the count.
fn per_site(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

enum Check {
    /// The user, as the request's consumer.
    Ok(Arc<str>),
    Bad,
    /// Too many password checks running: try again shortly.
    Busy,
    /// This client failed too often: try again in this many seconds.
    LockedOut(u64),
}

/// `Authorization: Basic base64(user:pass)` → (user, pass).
fn credentials(req: &RequestHeader) -> Option<(String, String)> {
    let v = req
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, b64) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

#[async_trait]
impl Plugin for BasicAuth {
    fn kind(&self) -> &'static str {
        "basic_auth"
    }

    fn phases(&self) -> Phases {
        if self.hide {
            Phases::REQUEST.union(Phases::UPSTREAM_REQUEST)
        } else {
            Phases::REQUEST
        }
    }

    async fn request(&self, s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        let challenge = || vec![(http::header::WWW_AUTHENTICATE, self.challenge.clone())];
        let Some((user, pass)) = credentials(s.req_header()) else {
            return Ok(refuse(
                StatusCode::UNAUTHORIZED,
                "credentials required",
                cx,
                challenge(),
            ));
        };
        match self.verify(&user, &pass, cx.client_ip).await {
            Check::Ok(name) => cx.identify_consumer("basic_auth", name),
            Check::Bad => {
                return Ok(refuse(
                    StatusCode::UNAUTHORIZED,
                    "invalid credentials",
                    cx,
                    challenge(),
                ))
            }
            Check::Busy => {
                return Ok(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many password checks at once; retry shortly",
                    cx,
                    vec![(http::header::RETRY_AFTER, HeaderValue::from_static("1"))],
                ))
            }
            Check::LockedOut(secs) => {
                return Ok(refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many failed sign-ins; retry later",
                    cx,
                    vec![(http::header::RETRY_AFTER, HeaderValue::from(secs))],
                ))
            }
        }
        Ok(Decision::Continue)
    }

    fn upstream_headers(&self) -> Option<Vec<HeaderName>> {
        Some(vec![http::header::AUTHORIZATION])
    }

    async fn upstream_request(
        &self,
        _s: &mut Session,
        req: &mut RequestHeader,
        _cx: &mut PluginCtx,
    ) -> Result<()> {
        if self.hide {
            req.remove_header(&http::header::AUTHORIZATION);
        }
        Ok(())
    }
}
