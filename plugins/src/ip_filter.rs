//! `ip_filter`: allows or refuses a request by its client address (as resolved through the
//! server's `trusted_proxies`, so a proxy in front does not hide the real client).
//!
//! `deny` wins over `allow`; with an `allow` list, any address outside it is refused. 403.
//!
//! ```toml
//! [plugins.office-only]
//! kind = "ip_filter"
//! allow = ["10.0.0.0/8", "2001:db8::/32"]
//! deny = ["10.6.6.0/24"]
//! ```
use async_trait::async_trait;
use http::StatusCode;
use ipnet::IpNet;
use pingora_error::Result;
use pingora_proxy::Session;
use serde::Deserialize;

use crate::config::Cidr;
use crate::{refuse, Decision, Phases, Plugin, PluginCtx};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub allow: Vec<Cidr>,
    #[serde(default)]
    pub deny: Vec<Cidr>,
}

impl Config {
    pub fn prepare(&mut self) -> Result<(), String> {
        if self.allow.is_empty() && self.deny.is_empty() {
            return Err("set `allow` or `deny` (a list of CIDRs)".into());
        }
        Ok(())
    }
}

pub struct IpFilter {
    allow: Box<[IpNet]>,
    deny: Box<[IpNet]>,
}

impl IpFilter {
    pub fn new(c: Config) -> Self {
        IpFilter {
            allow: c.allow.iter().map(|c| c.0).collect(),
            deny: c.deny.iter().map(|c| c.0).collect(),
        }
    }

    /// Whether `ip` may pass. Lists are scanned in order: fine for the tens of entries access
    /// lists have; a prefix trie would pay off only for thousands.
    pub fn allows(&self, ip: Option<std::net::IpAddr>) -> bool {
        // The core gives IPv4 clients of dual-stack listeners as IPv4 (never ::ffff:a.b.c.d).
        let Some(ip) = ip else {
            // No address (a Unix socket client, or an X-Forwarded-For entry behind trusted
            // proxies that is no address): only a filter without an allow list passes it.
            return self.allow.is_empty();
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

#[async_trait]
impl Plugin for IpFilter {
    fn kind(&self) -> &'static str {
        "ip_filter"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    async fn request(&self, _s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        if self.allows(cx.client_ip) {
            return Ok(Decision::Continue);
        }
        Ok(refuse(
            StatusCode::FORBIDDEN,
            "client address not allowed",
            cx,
            Vec::new(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(allow: &[&str], deny: &[&str]) -> IpFilter {
        let c = |v: &[&str]| v.iter().map(|s| Cidr(s.parse().unwrap())).collect();
        IpFilter::new(Config {
            allow: c(allow),
            deny: c(deny),
        })
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let f = filter(&["10.0.0.0/8", "2001:db8::/32"], &["10.6.6.0/24"]);
        assert!(f.allows(Some("10.1.2.3".parse().unwrap())));
        assert!(!f.allows(Some("10.6.6.7".parse().unwrap())));
        assert!(!f.allows(Some("192.168.1.1".parse().unwrap())));
        assert!(f.allows(Some("2001:db8::1".parse().unwrap())));
        assert!(!f.allows(Some("2001:db9::1".parse().unwrap())));
        assert!(!f.allows(None));
        let d = filter(&[], &["127.0.0.0/8"]);
        assert!(!d.allows(Some("127.0.0.1".parse().unwrap())));
        assert!(d.allows(Some("10.0.0.1".parse().unwrap())));
    }
}
