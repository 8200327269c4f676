//! `request_id`: gives every request an id, sends it upstream and back to the client.
//!
//! An id the client (or a proxy in front) sent is kept when it looks like an id, so one id
//! follows a request across hops; otherwise a new random one is made. The core puts the same
//! id in every error body it writes.
//!
//! ```toml
//! [plugins.rid]
//! kind = "request_id"
//! header = "x-request-id"   # default
//! trust_incoming = true     # keep a well-formed incoming id (default)
//! echo = true               # also return it to the client (default)
//! ```
use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use pingora_error::{ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use serde::Deserialize;

use crate::config::HeaderNameConf;
use crate::{Decision, Phases, Plugin, PluginCtx};

/// Longest incoming id we keep; longer ones are replaced, so logs stay bounded.
const MAX_INCOMING_LEN: usize = 128;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_header")]
    pub header: HeaderNameConf,
    #[serde(default = "crate::config::default_true")]
    pub trust_incoming: bool,
    #[serde(default = "crate::config::default_true")]
    pub echo: bool,
}

fn default_header() -> HeaderNameConf {
    HeaderNameConf(HeaderName::from_static("x-request-id"))
}

pub struct RequestId {
    header: HeaderName,
    /// The header name as sent, built once: inserting by `HeaderName` would make Pingora
    /// title-case it into a new buffer on every request.
    cased: bytes::Bytes,
    trust_incoming: bool,
    echo: bool,
}

impl RequestId {
    pub fn new(c: Config) -> Self {
        RequestId {
            cased: bytes::Bytes::copy_from_slice(c.header.0.as_str().as_bytes()),
            header: c.header.0,
            trust_incoming: c.trust_incoming,
            echo: c.echo,
        }
    }
}

fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_INCOMING_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':' | b'/'))
}

#[async_trait]
impl Plugin for RequestId {
    fn kind(&self) -> &'static str {
        "request_id"
    }

    fn phases(&self) -> Phases {
        let p = Phases::REQUEST.union(Phases::UPSTREAM_REQUEST);
        if self.echo {
            p.union(Phases::RESPONSE)
        } else {
            p
        }
    }

    async fn request(&self, s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        let incoming = s
            .req_header()
            .headers
            .get(&self.header)
            .filter(|v| self.trust_incoming && acceptable(v));
        cx.request_id = Some(match incoming {
            Some(v) => v.clone(),
            None => generate(),
        });
        Ok(Decision::Continue)
    }

    fn upstream_headers(&self) -> Option<Vec<HeaderName>> {
        Some(vec![self.header.clone()])
    }

    async fn upstream_request(
        &self,
        _s: &mut Session,
        req: &mut RequestHeader,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        let id = cx.request_id().clone();
        req.insert_header(self.cased.clone(), id)
            .or_err(ErrorType::InternalError, "setting request id")
    }

    async fn response(
        &self,
        _s: &mut Session,
        resp: &mut ResponseHeader,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        let id = cx.request_id().clone();
        resp.insert_header(self.cased.clone(), id)
            .or_err(ErrorType::InternalError, "setting request id")
    }
}

thread_local! {
    /// Per-thread generator state: no lock and no syscall per id. Ids need to be unique, not
    /// secret, so a seeded xorshift is enough.
    static STATE: Cell<(u64, u64)> = Cell::new(seed());
}

fn seed() -> (u64, u64) {
    let s = RandomState::new();
    let a = s.hash_one(0x5eed_u64) | 1;
    let b = s.hash_one(std::thread::current().id()) | 1;
    (a, b)
}

/// A fast per-thread pseudo-random number (not for secrets): sampling, splits, ids.
pub fn random_u64() -> u64 {
    next_u64()
}

fn next_u64() -> u64 {
    STATE.with(|st| {
        // xorshift128+
        let (mut s1, s0) = st.get();
        let result = s0.wrapping_add(s1);
        s1 ^= s1 << 23;
        s1 ^= s1 >> 17;
        s1 ^= s0 ^ (s0 >> 26);
        st.set((s0, s1));
        result
    })
}

/// A new random id: 32 lower-case hex digits (128 bits).
pub fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    let (a, b) = (next_u64(), next_u64());
    for (i, byte) in a
        .to_be_bytes()
        .iter()
        .chain(b.to_be_bytes().iter())
        .enumerate()
    {
        out[2 * i] = HEX[(byte >> 4) as usize];
        out[2 * i + 1] = HEX[(byte & 0xf) as usize];
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(&out))
        .unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_distinct() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn incoming_ids_are_filtered() {
        assert!(acceptable(&HeaderValue::from_static("abc-123_x.y:z")));
        assert!(!acceptable(&HeaderValue::from_static("")));
        assert!(!acceptable(&HeaderValue::from_static("a b")));
        assert!(!acceptable(
            &HeaderValue::from_str(&"a".repeat(129)).unwrap()
        ));
    }
}
