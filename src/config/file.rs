//! The file model: what users write, one struct per TOML table, every one
//! `deny_unknown_fields` so a typo is an error at its line. `build.rs` turns it into the
//! validated runtime model; nothing else reads these structs.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::values::{Cidr, Dur, ListenAddr, PeerAddr, Size};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub threads: Option<Spanned<usize>>,
    pub admin: Option<Spanned<ListenAddr>>,
    pub grace_period: Option<Dur>,
    pub shutdown_timeout: Option<Dur>,
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    #[serde(default)]
    pub plugins: Vec<Spanned<String>>,
    pub upstream_keepalive_pool: Option<usize>,
    pub work_stealing: Option<bool>,
    pub pid_file: Option<PathBuf>,
    pub upgrade_sock: Option<PathBuf>,
    #[serde(default)]
    pub keep_encoded_slashes: bool,
    #[serde(default)]
    pub keep_path_parameters: bool,
    pub header_timeout: Option<Spanned<Dur>>,
    pub body_timeout: Option<Spanned<Dur>>,
    pub keepalive_timeout: Option<Spanned<Dur>>,
    pub send_timeout: Option<Spanned<Dur>>,
    pub max_connections: Option<Spanned<usize>>,
    pub max_connections_per_ip: Option<Spanned<usize>>,
    pub h2_max_concurrent_streams: Option<Spanned<u32>>,
    pub max_requests_per_connection: Option<Spanned<u32>>,
    pub max_headers: Option<Spanned<usize>>,
    pub max_header_size: Option<Spanned<Size>>,
    pub cache_size: Option<Spanned<Size>>,
    pub admin_token: Option<Spanned<String>>,
    pub admin_token_file: Option<Spanned<PathBuf>>,
    pub admin_auth: Option<Spanned<String>>,
    pub access_log: Option<Spanned<AccessLogFile>>,
    pub log_format: Option<Spanned<String>>,
    pub tracing: Option<Spanned<TracingFile>>,
    pub max_aggregate_parts: Option<Spanned<usize>>,
    pub node_name: Option<Spanned<String>>,
    pub fleet_store: Option<Spanned<String>>,
    pub purge_deadline: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingFile {
    pub otlp_endpoint: Spanned<String>,
    pub sample: Option<Spanned<f64>>,
    pub service_name: Option<String>,
    pub export_interval: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFile {
    pub path: PathBuf,
    pub format: Option<Spanned<String>>,
    #[serde(default)]
    pub redact_query: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedPeer {
    pub addr: PeerAddr,
    #[serde(default = "one")]
    pub weight: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub peers: Vec<Spanned<PeerEntry>>,
    pub selection: Option<Spanned<String>>,
    pub hash_key: Option<Spanned<String>>,
    #[serde(default)]
    pub tls: bool,
    pub sni: Option<Spanned<String>>,
    pub ca: Option<Spanned<PathBuf>>,
    pub verify_hostname: Option<Spanned<bool>>,
    pub insecure_skip_verify: Option<Spanned<bool>>,
    pub client_cert: Option<Spanned<PathBuf>>,
    pub client_key: Option<Spanned<PathBuf>>,
    pub http2: Option<Spanned<bool>>,
    pub connect_timeout: Option<Dur>,
    pub read_timeout: Option<Dur>,
    pub write_timeout: Option<Dur>,
    pub idle_timeout: Option<Dur>,
    pub resolve_every: Option<Spanned<Dur>>,
    pub retries: Option<Spanned<usize>>,
    #[serde(default)]
    pub retry_on_status: Vec<Spanned<u16>>,
    pub retry_budget: Option<Spanned<u32>>,
    pub health_check: Option<Spanned<HealthCheckFile>>,
    pub passive_health: Option<Spanned<PassiveHealthFile>>,
    pub circuit_breaker: Option<Spanned<CircuitBreakerFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    pub kind: Spanned<String>,
    pub path: Option<Spanned<String>>,
    pub host: Option<String>,
    pub expect: Option<Spanned<u16>>,
    pub interval: Option<Dur>,
    pub timeout: Option<Dur>,
    pub unhealthy_after: Option<Spanned<usize>>,
    pub healthy_after: Option<Spanned<usize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthFile {
    pub failures: Option<Spanned<u32>>,
    pub eject_for: Option<Dur>,
    pub statuses: Option<Vec<Spanned<u16>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerFile {
    pub failures: Option<u32>,
    pub error_ratio: Option<Spanned<f64>>,
    pub window: Option<Dur>,
    pub min_requests: Option<u32>,
    pub open_for: Option<Dur>,
    pub probe_timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitArmFile {
    pub upstream: Spanned<String>,
    pub weight: Spanned<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorFile {
    pub upstream: Spanned<String>,
    pub percent: Option<Spanned<f64>>,
    pub max_body: Option<Size>,
    pub max_in_flight: Option<Spanned<usize>>,
    #[serde(default)]
    pub keep_credentials: bool,
}

/// A peer as written: `"HOST:PORT"` or `{ addr = "HOST:PORT", weight = 3 }`.
///
/// Read by hand rather than with `#[serde(untagged)]`, which would hide the real reason
/// ("missing port", "unknown field") behind "did not match any variant".
#[derive(Debug)]
pub struct PeerEntry {
    pub addr: PeerAddr,
    pub weight: usize,
}

impl<'de> Deserialize<'de> for PeerEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PeerEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"HOST:PORT\" or { addr = \"HOST:PORT\", weight = N }")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PeerEntry, E> {
                let addr = super::values::parse_peer(s).map_err(E::custom)?;
                Ok(PeerEntry {
                    addr: PeerAddr(addr, s.to_string()),
                    weight: 1,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<PeerEntry, A::Error> {
                let w = WeightedPeer::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(PeerEntry {
                    addr: w.addr,
                    weight: w.weight,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub listen: Spanned<Vec<Spanned<ListenAddr>>>,
    pub tls: Option<Spanned<TlsFile>>,
    pub certs: Option<Spanned<Vec<Spanned<super::tls::CertFile>>>>,
    pub unknown_sni: Option<Spanned<String>>,
    /// `true` or a port number.
    pub redirect_https: Option<Spanned<toml::Value>>,
    /// Strict-Transport-Security on every answer of a TLS gateway.
    pub hsts: Option<Spanned<String>>,
    /// HTTP/2 with prior knowledge beside HTTP/1 on a plain listener.
    pub h2c: Option<Spanned<H2cFile>>,
    /// Client certificates (mTLS) on a TLS gateway.
    pub client_auth: Option<Spanned<super::tls::ClientAuthFile>>,
    #[serde(default)]
    pub plugins: Vec<Spanned<String>>,
    pub forwarded_headers: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// With `key`: the one pair for every name. Without: `certs` holds the certificates and
    /// this table only the options.
    pub cert: Option<Spanned<PathBuf>>,
    pub key: Option<Spanned<PathBuf>>,
    /// A DER OCSP response for `cert`, stapled to handshakes that ask for one.
    pub ocsp: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub h2: Option<bool>,
    pub min_version: Option<Spanned<String>>,
    /// OpenSSL cipher list for TLS 1.2.
    pub ciphers: Option<Spanned<String>>,
    /// TLS 1.3 cipher suites.
    pub ciphersuites: Option<Spanned<String>>,
    /// Key exchange groups, preferred first: "X25519:P-256".
    pub curves: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: Option<String>,
    pub gateway: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub headers: BTreeMap<Spanned<String>, Spanned<String>>,
    pub priority: Option<i32>,
    pub upstream: Option<Spanned<String>>,
    pub split: Option<Spanned<Vec<SplitArmFile>>>,
    pub sticky: Option<Spanned<String>>,
    pub mirror: Option<Spanned<MirrorFile>>,
    pub strip_prefix: Option<Spanned<bool>>,
    pub rewrite: Option<Spanned<String>>,
    #[serde(default = "yes")]
    pub preserve_host: bool,
    #[serde(default)]
    pub plugins: Vec<Spanned<String>>,
    pub compression: Option<Spanned<CompressionFile>>,
    #[serde(rename = "static")]
    pub static_files: Option<Spanned<StaticFile>>,
    pub cache: Option<Spanned<CacheFile>>,
    #[serde(default = "yes")]
    pub access_log: bool,
    pub aggregate: Option<Spanned<super::aggregate::AggregateFile>>,
    pub request_buffering: Option<Spanned<Size>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    pub ttl: Option<Dur>,
    pub max_size: Option<Spanned<Size>>,
    pub lock_timeout: Option<Spanned<Dur>>,
    pub stale_while_revalidate: Option<Dur>,
    pub stale_if_error: Option<Dur>,
    pub tag_header: Option<Spanned<String>>,
    #[serde(default)]
    pub expose_tags: bool,
    pub status_header: Option<Spanned<String>>,
    pub targeted_cache_control: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticFile {
    pub root: Spanned<PathBuf>,
    pub index: Option<Spanned<String>>,
    pub fallback: Option<Spanned<String>>,
    #[serde(default)]
    pub dotfiles: bool,
}

/// `compression = ["zstd", "br", "gzip"]` or a table with `algorithms`, `min_size`, `level`,
/// `types`. Read by hand (as [`PeerEntry`]) so a typo inside the table keeps its own message.
#[derive(Debug, Default)]
pub struct CompressionFile {
    pub algorithms: Option<Vec<Spanned<String>>>,
    pub min_size: Option<Size>,
    pub level: Option<Spanned<LevelFile>>,
    pub types: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompressionTable {
    algorithms: Option<Vec<Spanned<String>>>,
    min_size: Option<Size>,
    level: Option<Spanned<LevelFile>>,
    types: Option<Vec<Spanned<String>>>,
}

impl<'de> Deserialize<'de> for CompressionFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = CompressionFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of encodings, e.g. [\"zstd\", \"br\", \"gzip\"], or a table")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                s: A,
            ) -> Result<Self::Value, A::Error> {
                let list = Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(s))?;
                Ok(CompressionFile {
                    algorithms: Some(list),
                    ..Default::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                let t =
                    CompressionTable::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(CompressionFile {
                    algorithms: t.algorithms,
                    min_size: t.min_size,
                    level: t.level,
                    types: t.types,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `level = 5` for every encoding, or `level = { gzip = 6, br = 4, zstd = 3 }`.
#[derive(Debug, Default)]
pub struct LevelFile {
    pub all: Option<i64>,
    pub gzip: Option<i64>,
    pub br: Option<i64>,
    pub zstd: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelTable {
    gzip: Option<i64>,
    br: Option<i64>,
    zstd: Option<i64>,
}

impl<'de> Deserialize<'de> for LevelFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = LevelFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number, or a table such as { gzip = 6, br = 4, zstd = 3 }")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                Ok(LevelFile {
                    all: Some(n),
                    ..Default::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                let t = LevelTable::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(LevelFile {
                    all: None,
                    gzip: t.gzip,
                    br: t.br,
                    zstd: t.zstd,
                })
            }
        }
        d.deserialize_any(V)
    }
}

fn yes() -> bool {
    true
}

/// `h2c = true | false | "only"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum H2cFile {
    Flag(bool),
    Word(String),
}
