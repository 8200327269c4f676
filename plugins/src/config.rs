//! Plugin configuration: the `kind` registry and the typed values plugin configs are made of.
//!
//! A `[plugins.NAME]` table is read in two steps: the core takes `kind` out, then hands the rest
//! of the table to [`PluginConfig::deserialize_kind`] with a deserializer that keeps source
//! positions, so a bad value is reported at its own line and column. Every value is parsed
//! here, at load time; hooks never parse config.
use std::fmt;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

use crate::{headers, request_id, Plugin};

/// Every plugin kind this build knows, as written in TOML.
pub const KINDS: &[&str] = &["request_id", "headers"];

/// The typed config of one plugin instance.
#[derive(Debug, Clone)]
pub enum PluginConfig {
    RequestId(request_id::Config),
    Headers(headers::Config),
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
            _ => return Ok(None),
        }))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            PluginConfig::RequestId(_) => "request_id",
            PluginConfig::Headers(_) => "headers",
        }
    }

    /// Makes the plugin value that serves requests.
    pub fn build(&self) -> Arc<dyn Plugin> {
        match self {
            PluginConfig::RequestId(c) => Arc::new(request_id::RequestId::new(c.clone())),
            PluginConfig::Headers(c) => Arc::new(headers::Headers::new(c.clone())),
        }
    }
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

/// A header value, checked at load (visible ASCII, spaces and tabs; no CR/LF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderValueConf(pub HeaderValue);

impl<'de> Deserialize<'de> for HeaderValueConf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HeaderValue::from_str(&s)
            .map(HeaderValueConf)
            .map_err(|_| de::Error::custom(format!("invalid header value {s:?}")))
    }
}

/// A TOML table of header names to values, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderList(pub Vec<(HeaderName, HeaderValue)>);

impl<'de> Deserialize<'de> for HeaderList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HeaderList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table of header names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<HeaderList, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<HeaderNameConf, HeaderValueConf>()? {
                    v.push((k.0, val.0));
                }
                Ok(HeaderList(v))
            }
        }
        d.deserialize_map(V)
    }
}
