//! Configuration: `gatehouse.toml → file model (file.rs) → validated model (this module)`.
//!
//! Loading never stops at the first problem: every section is read on its own, with source
//! positions kept, and every error is collected with its line, column and the route, upstream,
//! gateway or plugin it belongs to. `check`, `run` and reload all go through [`load`], so they
//! refuse a bad file the same way.
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gatehouse_plugins::PluginConfig;
use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use regex::Regex;

mod admin;
pub mod aggregate;
mod build;
mod client;
pub mod file;
pub mod offload;
mod routes;
mod stores;
mod tls;
mod upstream_tls;
mod upstreams;
pub use upstream_tls::{Loaded, UpstreamTls};
pub mod values;

/// A validated configuration: every reference resolved, every value typed.
#[derive(Debug)]
pub struct Config {
    /// `FILE:LINE:COL: warning: ...`: what `check` says and start and reload log.
    pub warnings: Vec<String>,
    pub path: PathBuf,
    /// The file's text as loaded (for `/config`, redacted, and the digest in `/status`).
    pub source: std::sync::Arc<str>,
    pub server: Server,
    /// `[stores.NAME]`: shared stores (Redis).
    pub stores: Vec<crate::stores::Settings>,
    pub upstreams: Vec<Upstream>,
    pub plugins: Vec<NamedPlugin>,
    pub gateways: Vec<Gateway>,
}

#[derive(Debug)]
pub struct Server {
    pub threads: usize,
    /// The admin listener (status, health); `None` = off.
    pub admin: Option<SocketAddr>,
    pub grace_period: Duration,
    pub shutdown_timeout: Duration,
    pub trusted_proxies: Vec<IpNet>,
    /// Indexes into [`Config::plugins`]: run for every route of every gateway.
    pub plugins: Vec<usize>,
    pub upstream_keepalive_pool: usize,
    /// Pingora's work stealing between worker threads; off runs one single-threaded runtime
    /// per thread (less cross-thread scheduling, but an unlucky thread cannot hand work off).
    pub work_stealing: bool,
    pub pid_file: PathBuf,
    pub upgrade_sock: PathBuf,
    /// Keep `%2F`/`%5C` in paths (encoded, never separators) instead of refusing them.
    pub keep_encoded_slashes: bool,
    /// Keep `;` in paths instead of refusing them.
    pub keep_path_parameters: bool,
    pub client: crate::front::ClientLimits,
    /// The response cache's memory bound, in bytes.
    pub cache_size: usize,
    /// Bearer token for the admin listener's mutating endpoints (purge); `None`: they are off.
    pub admin_token: Option<std::sync::Arc<str>>,
    /// `admin_auth = "all"`: reads (status, metrics, config) need the token too.
    pub admin_auth_all: bool,
    pub access_log: Option<crate::access_log::Settings>,
    /// `log_format = "json"`: error and info logs as JSON lines.
    pub log_json: bool,
    /// Span export; `None`: trace context still flows, nothing is exported.
    pub tracing: Option<crate::trace::Settings>,
    /// This replica's name in the fleet (`node_name`, default the host name).
    pub node_name: String,
    /// The store replicas register in and share purges through (`fleet_store`).
    pub fleet_store: Option<String>,
    /// How long a purge waits for the other replicas' acknowledgements.
    pub purge_deadline: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    RoundRobin,
    Random,
    ConsistentHash,
    LeastConn,
}

impl Selection {
    pub fn as_str(self) -> &'static str {
        match self {
            Selection::RoundRobin => "round_robin",
            Selection::Random => "random",
            Selection::ConsistentHash => "consistent_hash",
            Selection::LeastConn => "least_conn",
        }
    }
}

/// What a consistent hash (or a sticky split) is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(HeaderName),
    Cookie(String),
    Path,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub weight: usize,
    /// `HOST:PORT` as written: the Host a route with `preserve_host = false` sends, and the
    /// name `resolve_every` looks up again.
    pub name: String,
    /// The name sent as SNI and verified on its certificate: `sni`, else the peer's host
    /// name; empty for an address under `insecure_skip_verify` (no SNI).
    pub sni: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    Tcp,
    Http {
        path: String,
        host: Option<String>,
        expect: u16,
    },
}

/// Active health checks, run in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: usize,
    pub healthy_after: usize,
}

/// Passive health: a peer that fails `failures` times in a row is ejected for `eject_for`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveHealth {
    pub failures: u32,
    pub eject_for: Duration,
    /// Upstream statuses that count as failures (connect errors, resets and timeouts always do).
    pub statuses: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreaker {
    /// Consecutive failures that open it; 0 = only the error ratio does.
    pub failures: u32,
    pub error_ratio: Option<f64>,
    pub window: Duration,
    pub min_requests: u32,
    pub open_for: Duration,
    /// How long a half-open probe may go without a verdict before another request probes.
    pub probe_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Extra tries on another peer.
    pub retries: usize,
    /// Upstream statuses that are retried (connect errors always are, when `retries` > 0).
    pub on_status: Vec<u16>,
    /// Retries may add at most this percentage of the upstream's request rate.
    pub budget_percent: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub peers: Vec<Peer>,
    pub selection: Selection,
    pub hash_key: HashKey,
    pub tls: bool,
    pub sni: String,
    /// Verification, CA and client certificate of `tls = true`.
    pub tls_peer: UpstreamTls,
    /// HTTP/2 to the peers: ALPN h2 over TLS, prior knowledge (h2c) over plain TCP.
    pub http2: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    /// Look the peers' names up again this often (off: once, at load).
    pub resolve_every: Option<Duration>,
    pub health_check: Option<HealthCheck>,
    pub passive_health: Option<PassiveHealth>,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub retry: RetryPolicy,
}

#[derive(Debug)]
pub struct NamedPlugin {
    pub name: String,
    pub config: PluginConfig,
}

#[derive(Debug)]
pub struct Tls {
    pub h2: bool,
    /// The certificates by name, read and checked at load.
    pub certs: std::sync::Arc<crate::tls::CertSet>,
    /// Protocol versions, ciphers and curves: the listener's, set when it opens.
    pub options: TlsOptions,
}

pub use crate::tls::TlsOptions;

/// Which X-Forwarded-* headers a gateway adds (`forwarded_headers`). One left out is still
/// removed from requests of untrusted peers: off means "not sent", never "client's value".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardedHeaders {
    pub for_: bool,
    pub proto: bool,
    pub host: bool,
}

impl Default for ForwardedHeaders {
    fn default() -> Self {
        ForwardedHeaders {
            for_: true,
            proto: true,
            host: true,
        }
    }
}

#[derive(Debug)]
pub struct Gateway {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub tls: Option<Tls>,
    /// `redirect_https = true` (443) or a port: a plain gateway that sends clients to HTTPS.
    pub redirect_https: Option<Option<u16>>,
    /// `hsts = "max-age=63072000; includeSubDomains"`: sent on every answer (TLS only).
    pub hsts: Option<http::HeaderValue>,
    /// `h2c`: whether a plain listener speaks HTTP/2 with prior knowledge.
    pub h2c: H2c,
    pub forwarded: ForwardedHeaders,
    pub plugins: Vec<usize>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lower-case host name, no port.
    Exact(String),
    /// `*.example.com` is kept as `.example.com`: matches any name below it, not itself.
    Suffix(String),
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Segment-wise prefix without a trailing slash; `"/"` matches everything.
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(HeaderValue),
    Regex(Regex),
}

impl ValueMatch {
    pub fn matches(&self, v: &HeaderValue) -> bool {
        match self {
            ValueMatch::Exact(want) => want == v,
            ValueMatch::Regex(re) => v.to_str().is_ok_and(|s| re.is_match(s)),
        }
    }
}

/// How the path sent upstream is made from the client's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    Keep,
    /// Drop the matched prefix (`/api/orders/1` on `/api` → `/orders/1`).
    StripPrefix,
    /// Replace the matched prefix, or the whole path of an exact route.
    Replace(String),
    /// Regex routes: a replacement template with `$1`, `${name}`.
    Template(String),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub line: usize,
    pub host: HostMatch,
    pub path: PathMatch,
    pub methods: Option<Vec<Method>>,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub priority: i32,
    pub target: Target,
    pub mirror: Option<Mirror>,
    pub rewrite: Rewrite,
    pub preserve_host: bool,
    pub plugins: Vec<usize>,
    pub compression: Option<std::sync::Arc<crate::compress::Compression>>,
    pub cache: Option<std::sync::Arc<crate::cache::policy::CacheRoute>>,
    /// `access_log = false`: this route's requests are not written to the access log.
    pub access_log: bool,
    /// `request_buffering`: a request body up to this size is read whole before anything
    /// goes upstream (0: bodies stream).
    pub request_buffering: usize,
}

/// The default and the most of `request_buffering`: what Pingora keeps of a body to send it
/// again (its retry buffer).
pub const REQUEST_BUFFERING_MAX: usize = 64 * 1024;

/// Where a route's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Upstream(usize),
    /// Weighted split across upstreams (canary); sticky per client when `sticky` is set.
    Split {
        arms: Vec<(usize, u32)>,
        sticky: Option<HashKey>,
    },
    /// Files under a folder, answered by the gateway itself.
    Static(std::sync::Arc<offload::StaticSite>),
    /// Several upstream calls, answered as one JSON object by the gateway itself.
    Aggregate(std::sync::Arc<aggregate::Aggregate>),
}

/// A shadow copy of each sampled request, sent fire-and-forget.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub upstream: usize,
    pub percent: f64,
    pub max_body: usize,
    pub max_in_flight: usize,
    /// Send the copy with the client's credentials (Authorization, Cookie, API keys, the
    /// consumer and claim headers auth plugins set); off, they are removed.
    pub keep_credentials: bool,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based; 0 when the problem has no place in the file (it cannot be read).
    pub line: usize,
    pub col: usize,
    /// What the error belongs to: `route "orders"`, `upstream "users"`…; may be empty.
    pub context: String,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file.display())?;
            if e.line > 0 {
                write!(f, ":{}:{}", e.line, e.col)?;
            }
            write!(f, ": error: ")?;
            if !e.context.is_empty() {
                write!(f, "{}: ", e.context)?;
            }
            write!(f, "{}", e.message)?;
        }
        Ok(())
    }
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let src = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: path.to_path_buf(),
        errors: vec![ConfigError {
            line: 0,
            col: 0,
            context: String::new(),
            message: format!("cannot read config file: {e}"),
        }],
    })?;
    load_str(path, &src)
}

/// Validates `src` as if read from `path` (relative paths in it are taken from `path`'s folder).
pub fn load_str(path: &Path, src: &str) -> Result<Config, ConfigErrors> {
    build::build(path, src).map_err(|errors| ConfigErrors {
        file: path.to_path_buf(),
        errors,
    })
}

/// HTTP/2 with prior knowledge on a plain listener (gRPC and other internal clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum H2c {
    /// HTTP/1 only (`h2c = false`, the default).
    #[default]
    Off,
    /// `h2c = true`: a connection that opens with the HTTP/2 preface speaks HTTP/2, any
    /// other HTTP/1.
    Also,
    /// `h2c = "only"`: HTTP/2 only; bytes that are not the preface get a GOAWAY.
    Only,
}
