//! Plugin configuration: the `kind` registry and the typed values plugin configs are made of.
//!
//! A `[plugins.NAME]` table is read in two steps: the core takes `kind` out, then hands the rest
//! of the table to [`PluginConfig::deserialize_kind`] with a deserializer that keeps source
//! positions, so a bad value is reported at its own line and column. Every value is parsed
//! here, at load time; hooks never parse config.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::de::{self, Deserialize, Deserializer};

use std::path::Path;

use crate::{
    basic_auth, cors, forward_auth, headers, ip_filter, jwt_auth, key_auth, mtls_auth, rate_limit,
    request_id, request_limit, Plugin,
};

/// Every plugin kind this build knows, as written in TOML.
pub const KINDS: &[&str] = &[
    "request_id",
    "headers",
    "ip_filter",
    "request_limit",
    "cors",
    "rate_limit",
    "key_auth",
    "basic_auth",
    "jwt_auth",
    "forward_auth",
    "mtls_auth",
];

/// The typed config of one plugin instance.
/// Secrets published with Gatehouse: its demo (`gatehouse demo`, conf/gatehouse.toml) and
/// example files. A config that uses one is open to anyone who read them.
const PUBLISHED_SECRETS: [&str; 3] = [
    "demo-admin-token-change-me",
    "example-admin-token-please-change-0123",
    "gatehouse-demo-secret-change-me-0123456789",
];
/// API keys and a password hash of the example files (conf/examples/keys).
const PUBLISHED_KEYS: [&str; 1] = ["example-key-change-me"];
const PUBLISHED_PASSWORD_HASHES: [&str; 1] =
    ["$2y$10$kPVNnWTn342zE6U0stlq2OxzvQQ2rOOonqVT1YMFD0IG/mlvylnL2"];

/// A secret someone forgot to choose: one Gatehouse publishes, or a `change-me` placeholder.
pub fn placeholder_secret(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    PUBLISHED_SECRETS.contains(&s)
        || ["change-me", "changeme", "change_me", "please-change"]
            .iter()
            .any(|p| l.contains(p))
}

fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

#[derive(Debug, Clone)]
pub enum PluginConfig {
    RequestId(request_id::Config),
    Headers(headers::Config),
    IpFilter(ip_filter::Config),
    RequestLimit(request_limit::Config),
    Cors(cors::Config),
    RateLimit(rate_limit::Config),
    KeyAuth(key_auth::Config),
    BasicAuth(basic_auth::Config),
    JwtAuth(Box<jwt_auth::Config>),
    ForwardAuth(forward_auth::Config),
    MtlsAuth(mtls_auth::Config),
}

impl PluginConfig {
    /// Reads the config of a plugin of `kind` (the table without its `kind` key).
    /// `Ok(None)` means the kind is unknown; the caller reports it with [`KINDS`].
    pub fn deserialize_kind<'de, D: Deserializer<'de>>(
        kind: &str,
        d: D,
    ) -> Result<Option<PluginConfig>, D::Error> {
        Ok(Some(match kind {
            "request_id" => PluginConfig::RequestId(request_id::Config::deserialize(d)?),
            "headers" => PluginConfig::Headers(headers::Config::deserialize(d)?),
            "ip_filter" => PluginConfig::IpFilter(ip_filter::Config::deserialize(d)?),
            "request_limit" => PluginConfig::RequestLimit(request_limit::Config::deserialize(d)?),
            "cors" => PluginConfig::Cors(cors::Config::deserialize(d)?),
            "rate_limit" => PluginConfig::RateLimit(rate_limit::Config::deserialize(d)?),
            "key_auth" => PluginConfig::KeyAuth(key_auth::Config::deserialize(d)?),
            "basic_auth" => PluginConfig::BasicAuth(basic_auth::Config::deserialize(d)?),
            "jwt_auth" => PluginConfig::JwtAuth(Box::new(jwt_auth::Config::deserialize(d)?)),
            "forward_auth" => PluginConfig::ForwardAuth(forward_auth::Config::deserialize(d)?),
            "mtls_auth" => PluginConfig::MtlsAuth(mtls_auth::Config::deserialize(d)?),
            _ => return Ok(None),
        }))
    }

    /// Secrets of this plugin that are placeholders or published with Gatehouse (its demo
    /// and example files), said as a warning each: anyone who read them can use them.
    pub fn published_secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self {
            PluginConfig::JwtAuth(c) if c.secret.as_deref().is_some_and(placeholder_secret) => {
                out.push("the JWT `secret` is a published or placeholder value".into());
            }
            PluginConfig::KeyAuth(c) => {
                for (consumer, hash) in &c.entries {
                    if PUBLISHED_KEYS.iter().any(|k| sha256(k.as_bytes()) == *hash) {
                        out.push(format!("consumer \"{consumer}\" has a published API key"));
                    }
                }
            }
            PluginConfig::BasicAuth(c) => {
                for (user, hash) in &c.users {
                    if PUBLISHED_PASSWORD_HASHES.contains(&hash.as_str()) {
                        out.push(format!("user \"{user}\" has a published password"));
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// Checks what the types alone cannot (keys present, lists not empty) and reads the files
    /// a plugin refers to, relative to `base` (the config file's directory). Done at load, so
    /// `check` and reload refuse a bad file before anything serves with it.
    pub fn prepare(&mut self, base: &Path) -> Result<(), String> {
        match self {
            PluginConfig::RequestId(_) | PluginConfig::Headers(_) => Ok(()),
            PluginConfig::IpFilter(c) => c.prepare(),
            PluginConfig::RequestLimit(c) => c.prepare(),
            PluginConfig::Cors(c) => c.prepare(),
            PluginConfig::RateLimit(c) => c.prepare(),
            PluginConfig::KeyAuth(c) => c.prepare(base),
            PluginConfig::BasicAuth(c) => c.prepare(base),
            PluginConfig::JwtAuth(c) => c.prepare(base),
            PluginConfig::ForwardAuth(c) => c.prepare(),
            PluginConfig::MtlsAuth(c) => c.prepare(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            PluginConfig::RequestId(_) => "request_id",
            PluginConfig::Headers(_) => "headers",
            PluginConfig::IpFilter(_) => "ip_filter",
            PluginConfig::RequestLimit(_) => "request_limit",
            PluginConfig::Cors(_) => "cors",
            PluginConfig::RateLimit(_) => "rate_limit",
            PluginConfig::KeyAuth(_) => "key_auth",
            PluginConfig::BasicAuth(_) => "basic_auth",
            PluginConfig::JwtAuth(_) => "jwt_auth",
            PluginConfig::ForwardAuth(_) => "forward_auth",
            PluginConfig::MtlsAuth(_) => "mtls_auth",
        }
    }

    /// What the plugin does where no client certificate is ever asked for (a gateway without
    /// `client_auth`), when it reads one: said by `check` as a warning.
    pub fn without_client_cert(&self) -> Option<&'static str> {
        match self {
            PluginConfig::MtlsAuth(_) => Some("refuses every request (403)"),
            PluginConfig::Headers(c)
                if [&c.request, &c.response]
                    .iter()
                    .flat_map(|o| o.set.0.iter().chain(o.add.0.iter()))
                    .any(|(_, t)| t.reads_client_cert()) =>
            {
                Some("gets empty ${tls.*} values")
            }
            _ => None,
        }
    }

    /// The `[stores.NAME]` this plugin counts in, if any (the core checks that it exists).
    pub fn store(&self) -> Option<&str> {
        match self {
            PluginConfig::RateLimit(c) => c.store.as_deref(),
            _ => None,
        }
    }

    /// Makes the plugin value that serves requests (after [`PluginConfig::prepare`]).
    pub fn build(&self, env: &crate::store::BuildEnv) -> Arc<dyn Plugin> {
        match self {
            PluginConfig::RequestId(c) => Arc::new(request_id::RequestId::new(c.clone())),
            PluginConfig::Headers(c) => Arc::new(headers::Headers::new(c.clone())),
            PluginConfig::IpFilter(c) => Arc::new(ip_filter::IpFilter::new(c.clone())),
            PluginConfig::RequestLimit(c) => Arc::new(request_limit::RequestLimit::new(c.clone())),
            PluginConfig::Cors(c) => Arc::new(cors::Cors::new(c.clone())),
            PluginConfig::RateLimit(c) => Arc::new(rate_limit::RateLimit::new(c.clone(), env)),
            PluginConfig::KeyAuth(c) => Arc::new(key_auth::KeyAuth::new(c.clone())),
            PluginConfig::BasicAuth(c) => Arc::new(basic_auth::BasicAuth::new(c.clone())),
            PluginConfig::JwtAuth(c) => Arc::new(jwt_auth::JwtAuth::new((**c).clone())),
            PluginConfig::ForwardAuth(c) => Arc::new(forward_auth::ForwardAuth::new(c.clone())),
            PluginConfig::MtlsAuth(c) => Arc::new(mtls_auth::MtlsAuth::new(c.clone())),
        }
    }
}

/// `#[serde(default = "crate::config::default_true")]`: for switches that are on unless
/// turned off.
pub(crate) fn default_true() -> bool {
    true
}

/// A header name, checked and lower-cased at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderNameConf(pub HeaderName);

impl<'de> Deserialize<'de> for HeaderNameConf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HeaderName::from_bytes(s.as_bytes())
            .map(HeaderNameConf)
            .map_err(|_| de::Error::custom(format!("invalid header name {s:?}")))
    }
}

/// A humantime duration: `"250ms"`, `"5s"`, `"1m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration {s:?}: {e} (write e.g. \"250ms\", \"5s\", \"1m\")"
            ))
        })
    }
}

/// A size in bytes: `"64KiB"`, `"10MB"`, `"1GiB"`, `"512"` (bytes). KB/MB/GB are powers of 1000,
/// KiB/MiB/GiB of 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (write e.g. \"64KiB\", \"10MB\")"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit (B, KB, KiB, MB, MiB, GB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_size(&s).map(Size).map_err(de::Error::custom)
    }
}

/// A CIDR block (`"10.0.0.0/8"`, `"::1/128"`) or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| Cidr(IpNet::from(ip)))
            .map_err(|_| {
                de::Error::custom(format!(
                    "invalid CIDR {s:?} (write e.g. \"10.0.0.0/8\" or \"2001:db8::/32\")"
                ))
            })
    }
}
