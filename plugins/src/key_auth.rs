//! `key_auth`: API keys from a header or a query parameter.
//!
//! Keys are stored only as SHA-256 hashes (`sha256:HEX`), inline or in a file, each under the
//! name of its consumer: a leaked config does not leak keys. The presented key is hashed and
//! compared with every stored hash in constant time, so response timing says nothing about how
//! close a guess was. The consumer's name goes upstream in `consumer_header`; with
//! `hide_credentials` (the default) the key itself does not.
//!
//! ```toml
//! [plugins.keys]
//! kind = "key_auth"
//! header = "x-api-key"                  # or query = "api_key"
//! keys = { "mobile-app" = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae" }
//! keys_file = "keys.txt"                # lines "CONSUMER sha256:HEX"; # comments
//! ```
//! Make a hash with `printf %s "$KEY" | sha256sum`.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora_error::{ErrorType, OrErr, Result};
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::HeaderNameConf;
use crate::{refuse, Decision, Phases, Plugin, PluginCtx};

fn default_consumer_header() -> HeaderNameConf {
    HeaderNameConf(HeaderName::from_static("x-consumer"))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub header: Option<HeaderNameConf>,
    pub query: Option<String>,
    #[serde(default)]
    pub keys: indexmap_like::Keys,
    pub keys_file: Option<PathBuf>,
    #[serde(default = "default_consumer_header")]
    pub consumer_header: HeaderNameConf,
    #[serde(default = "crate::config::default_true")]
    pub hide_credentials: bool,
    /// Filled by `prepare`: every consumer with its key hash.
    #[serde(skip)]
    pub entries: Vec<(String, [u8; 32])>,
}

/// Inline keys as written: consumer name → "sha256:HEX", in file order.
pub mod indexmap_like {
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde::Deserialize;

    /// Consumer names with their key hashes, checked as they are read (so a bad hash is
    /// reported at its own line).
    #[derive(Debug, Clone, Default)]
    pub struct Keys(pub Vec<(String, [u8; 32])>);

    impl<'de> Deserialize<'de> for Keys {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a table of consumer names to \"sha256:HEX\" key hashes")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                    let mut v = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        let h: String = m.next_value()?;
                        let h = super::parse_hash(&h)
                            .map_err(|e| serde::de::Error::custom(format!("keys.{k}: {e}")))?;
                        v.push((k, h));
                    }
                    Ok(Keys(v))
                }
            }
            d.deserialize_map(V)
        }
    }
}

/// `sha256:HEX` → the 32 bytes.
pub fn parse_hash(s: &str) -> Result<[u8; 32], String> {
    let hex_part = s.strip_prefix("sha256:").ok_or_else(|| {
        // The value is not echoed: a raw key pasted here would reach logs and /status.
        "a key hash must be \"sha256:\" and 64 hex digits (printf %s KEY | sha256sum)".to_string()
    })?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part.trim(), &mut out)
        .map_err(|_| "a key hash must be \"sha256:\" and 64 hex digits".to_string())?;
    Ok(out)
}

impl Config {
    pub fn prepare(&mut self, base: &Path) -> Result<(), String> {
        if self.header.is_some() == self.query.is_some() {
            return Err(
                "set exactly one of `header` or `query` (where clients put the key)".into(),
            );
        }
        let mut entries = Vec::new();
        entries.extend(self.keys.0.iter().cloned());
        if let Some(file) = &self.keys_file {
            let path = base.join(file);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("keys_file {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (consumer, hash) = line.split_once(char::is_whitespace).ok_or_else(|| {
                    format!(
                        "{}:{}: expected \"CONSUMER sha256:HEX\"",
                        path.display(),
                        n + 1
                    )
                })?;
                let h = parse_hash(hash.trim())
                    .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
                entries.push((consumer.to_string(), h));
            }
        }
        if entries.is_empty() {
            return Err("no keys: set `keys` or `keys_file`".into());
        }
        if let Some((bad, _)) = entries
            .iter()
            .find(|(c, _)| HeaderValue::from_str(c).is_err())
        {
            return Err(format!(
                "consumer name {bad:?} cannot be sent in a header (printable ASCII only)"
            ));
        }
        self.entries = entries;
        Ok(())
    }
}

pub struct KeyAuth {
    header: Option<HeaderName>,
    query: Option<String>,
    entries: Vec<(Arc<str>, [u8; 32])>,
    consumer_header: HeaderName,
    hide: bool,
}

impl KeyAuth {
    pub fn new(c: Config) -> Self {
        KeyAuth {
            header: c.header.map(|h| h.0),
            query: c.query,
            entries: c
                .entries
                .into_iter()
                .map(|(n, h)| (Arc::from(n), h))
                .collect(),
            consumer_header: c.consumer_header.0,
            hide: c.hide_credentials,
        }
    }

    /// The consumer whose key hashes to `digest`. Every entry is compared, in constant time,
    /// whatever matched earlier.
    fn consumer(&self, key: &[u8]) -> Option<Arc<str>> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let mut found = None;
        for (name, h) in &self.entries {
            if bool::from(h.ct_eq(&digest)) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found
    }
}

/// The value of query parameter `name`, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<Vec<u8>> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned().into_bytes())
}

/// `query` without parameter `name`, the other pairs as sent. A pair is the parameter when
/// its decoded name is (as [`query_param`] finds it): `api%5Fkey=...` is not left behind.
fn strip_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|p| {
            form_urlencoded::parse(p.as_bytes())
                .next()
                .is_none_or(|(k, _)| k != name)
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[async_trait]
impl Plugin for KeyAuth {
    fn credential_headers(&self) -> Vec<HeaderName> {
        let mut v = vec![self.consumer_header.clone()];
        v.extend(self.header.clone());
        v
    }

    fn credential_query(&self) -> Vec<String> {
        self.query.iter().cloned().collect()
    }

    /// The consumer header, and the key header it hides.
    fn upstream_headers(&self) -> Option<Vec<HeaderName>> {
        Some(self.credential_headers())
    }

    fn kind(&self) -> &'static str {
        "key_auth"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST.union(Phases::UPSTREAM_REQUEST)
    }

    async fn request(&self, s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        let req = s.req_header();
        let key: Option<std::borrow::Cow<[u8]>> = match (&self.header, &self.query) {
            (Some(h), _) => req.headers.get(h).map(|v| v.as_bytes().into()),
            (None, Some(q)) => req
                .uri
                .query()
                .and_then(|qs| query_param(qs, q))
                .map(Into::into),
            _ => None,
        };
        let challenge = || {
            vec![(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("ApiKey realm=\"gatehouse\""),
            )]
        };
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Ok(refuse(
                StatusCode::UNAUTHORIZED,
                "API key missing",
                cx,
                challenge(),
            ));
        };
        match self.consumer(&key) {
            Some(c) => {
                cx.identify_consumer("key_auth", c);
                Ok(Decision::Continue)
            }
            None => Ok(refuse(
                StatusCode::UNAUTHORIZED,
                "invalid API key",
                cx,
                challenge(),
            )),
        }
    }

    async fn upstream_request(
        &self,
        _s: &mut Session,
        req: &mut RequestHeader,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        if let Some(c) = cx.consumer() {
            let v = HeaderValue::from_str(c).or_err(ErrorType::InternalError, "consumer")?;
            req.insert_header(self.consumer_header.clone(), v)
                .or_err(ErrorType::InternalError, "consumer header")?;
        }
        if !self.hide {
            return Ok(());
        }
        match (&self.header, &self.query) {
            (Some(h), _) => {
                req.remove_header(h);
            }
            (None, Some(q)) => {
                if let Some(qs) = req.uri.query() {
                    let rest = strip_param(qs, q);
                    let path = req.uri.path();
                    let uri = if rest.is_empty() {
                        path.to_string()
                    } else {
                        format!("{path}?{rest}")
                    };
                    let uri = http::Uri::try_from(uri)
                        .or_err(ErrorType::InternalError, "uri without key")?;
                    req.set_uri(uri);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_helpers() {
        assert_eq!(
            query_param("a=1&api_key=s%2Bx+y&b", "api_key").unwrap(),
            b"s+x y"
        );
        assert_eq!(query_param("api_key", "api_key").unwrap(), b"");
        assert!(query_param("a=1", "api_key").is_none());
        assert_eq!(strip_param("a=1&api_key=x&b=2", "api_key"), "a=1&b=2");
        assert_eq!(query_param("k=%zz%4", "k").unwrap(), b"%zz%4");
        // A sign is no hex digit (a hand-made decoder took `%+5` for 0x05); `+` is a space.
        assert_eq!(query_param("k=%+5", "k").unwrap(), b"% 5");
        // The name as decoded: a spelled-out `_` is the same parameter, found and stripped.
        assert_eq!(query_param("api%5Fkey=s", "api_key").unwrap(), b"s");
        assert_eq!(strip_param("a=1&api%5Fkey=x&b=2", "api_key"), "a=1&b=2");
    }

    #[test]
    fn hashes() {
        assert!(parse_hash(
            "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        )
        .is_ok());
        assert!(parse_hash("md5:abc").is_err());
        assert!(parse_hash("sha256:abc").is_err());
    }
}
