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
    /// Per-thread generator state for sampling and peer choice: no lock and no syscall.
    /// Never for ids a client sees: two outputs of xorshift give away its state.
    static STATE: Cell<(u64, u64)> = Cell::new(seed());
}

fn seed() -> (u64, u64) {
    let s = RandomState::new();
    let a = s.hash_one(0x5eed_u64) | 1;
    let b = s.hash_one(std::thread::current().id()) | 1;
    (a, b)
}

/// A fast per-thread pseudo-random number, predictable from its outputs: sampling, splits,
/// peer choice. Ids use [`secure_u64`].
pub fn random_u64() -> u64 {
    next_u64()
}

/// A random number from a CSPRNG (rand's ThreadRng: ChaCha12, per thread, reseeded from the
/// OS): for ids that clients and upstreams see, so the ids one client observes say nothing
/// of another's (a request id or trace id is a handle into logs and traces).
pub fn secure_u64() -> u64 {
    rand::RngCore::next_u64(&mut rand::thread_rng())
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

/// A new random id: 32 lower-case hex digits (128 bits from the CSPRNG).
pub fn generate() -> HeaderValue {
    let mut bits = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bits);
    let mut out = [0u8; 32];
    // 16 bytes always fit 32 digits.
    let _ = hex::encode_to_slice(bits, &mut out);
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

    /// Ids do not come from the fast generator: the ids one client sees must not give away
    /// what the next client's will be (two xorshift outputs give away its whole state).
    #[test]
    fn ids_are_not_the_predictable_stream() {
        for _ in 0..1000 {
            let (s1, s0) = STATE.with(|st| st.get());
            let predicted = s0.wrapping_add(s1);
            let id = generate();
            let first = u64::from_str_radix(&id.to_str().unwrap()[..16], 16).unwrap();
            assert_ne!(first, predicted);
            assert_eq!(
                STATE.with(|st| st.get()),
                (s1, s0),
                "the fast state is untouched"
            );
        }
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 10_000);
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
