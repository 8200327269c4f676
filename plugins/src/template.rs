//! Header values with per-request variables (`${client_ip}`, `${jwt.sub}`…), parsed at load.
use std::fmt::Write;

use http::{HeaderName, HeaderValue};
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

use crate::config::HeaderNameConf;
use crate::PluginCtx;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    ClientIp,
    RequestId,
    Route,
    Gateway,
    Consumer,
    Claim(String),
    ClientSubject,
    ClientSan,
    ClientFingerprint,
}

/// A header value: fixed (checked once at load), or text and variables rendered per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Template {
    Fixed(HeaderValue),
    Parts(Vec<Part>),
}

pub const VARIABLES: &str = "client_ip, request_id, route, gateway, consumer, jwt.CLAIM, tls.client_subject, tls.client_san, tls.client_fingerprint";

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
        let check =
            |t: &str| HeaderValue::from_str(t).map_err(|_| format!("invalid header value {s:?}"));
        let mut parts = Vec::new();
        let mut rest = s;
        let mut text = String::new();
        while let Some(i) = rest.find("${") {
            text.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed variable in {s:?}"))?;
            let name = &after[..end];
            let part = match name {
                "client_ip" => Part::ClientIp,
                "request_id" => Part::RequestId,
                "route" => Part::Route,
                "gateway" => Part::Gateway,
                "consumer" => Part::Consumer,
                "tls.client_subject" => Part::ClientSubject,
                "tls.client_san" => Part::ClientSan,
                "tls.client_fingerprint" => Part::ClientFingerprint,
                _ => match name.strip_prefix("jwt.") {
                    Some(c) if !c.is_empty() => Part::Claim(c.to_string()),
                    _ => {
                        return Err(format!(
                            "unknown variable ${{{name}}} in {s:?} (known: {VARIABLES})"
                        ))
                    }
                },
            };
            if !text.is_empty() {
                check(&text)?;
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
            rest = &after[end + 1..];
        }
        text.push_str(rest);
        if parts.is_empty() {
            return check(&text).map(Template::Fixed);
        }
        if !text.is_empty() {
            check(&text)?;
            parts.push(Part::Text(text));
        }
        Ok(Template::Parts(parts))
    }

    /// Whether the value reads the client's TLS certificate (`${tls.*}`).
    pub fn reads_client_cert(&self) -> bool {
        matches!(self, Template::Parts(p) if p.iter().any(|p| matches!(
            p,
            Part::ClientSubject | Part::ClientSan | Part::ClientFingerprint
        )))
    }

    /// The value for this request; `None` when it comes out empty or not a valid value.
    pub fn render(&self, cx: &mut PluginCtx) -> Option<HeaderValue> {
        let parts = match self {
            Template::Fixed(v) => return Some(v.clone()),
            Template::Parts(p) => p,
        };
        let mut out = String::new();
        for p in parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::ClientIp => {
                    if let Some(ip) = cx.client_ip {
                        let _ = write!(out, "{ip}");
                    }
                }
                Part::RequestId => {
                    out.push_str(&String::from_utf8_lossy(cx.request_id().as_bytes()));
                }
                Part::Route => out.push_str(cx.route.as_deref().unwrap_or("")),
                Part::Gateway => out.push_str(cx.gateway.as_deref().unwrap_or("")),
                Part::Consumer => out.push_str(cx.consumer().map_or("", |c| c)),
                Part::ClientSubject => {
                    if let Some(c) = &cx.client_cert {
                        out.push_str(&c.subject);
                    }
                }
                Part::ClientSan => {
                    if let Some(c) = &cx.client_cert {
                        out.push_str(&c.sans.join(","));
                    }
                }
                Part::ClientFingerprint => {
                    if let Some(c) = &cx.client_cert {
                        out.push_str(&c.fingerprint);
                    }
                }
                Part::Claim(c) => {
                    if let Some(v) = cx.claims.as_ref().and_then(|m| m.get(c)) {
                        if let Some(h) = crate::jwt_auth::claim_value(v) {
                            out.push_str(h.to_str().unwrap_or(""));
                        }
                    }
                }
            }
        }
        if out.trim().is_empty() {
            return None;
        }
        HeaderValue::from_str(&out).ok()
    }
}

/// A TOML table of header names to value templates, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateList(pub Vec<(HeaderName, Template)>);

impl<'de> Deserialize<'de> for TemplateList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TemplateList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table of header names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<TemplateList, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<HeaderNameConf, String>()? {
                    v.push((k.0, Template::parse(&val).map_err(de::Error::custom)?));
                }
                Ok(TemplateList(v))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_variables() {
        let mut cx = PluginCtx {
            client_ip: Some("10.1.2.3".parse().unwrap()),
            ..PluginCtx::default()
        };
        cx.identify("key_auth", Some("alice".into()));
        let t = Template::parse("ip=${client_ip};who=${consumer}").unwrap();
        assert_eq!(t.render(&mut cx).unwrap(), "ip=10.1.2.3;who=alice");
        assert_eq!(
            Template::parse("plain").unwrap(),
            Template::Fixed(HeaderValue::from_static("plain"))
        );
        assert!(Template::parse("${nope}").is_err());
        assert!(Template::parse("${client_ip").is_err());
        assert!(Template::parse("${route}")
            .unwrap()
            .render(&mut cx)
            .is_none());
    }
}
