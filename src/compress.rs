//! Response compression per route (`compression = [...]`), as a Pingora downstream module so
//! every response the client gets passes through it: proxied, served from the cache, static
//! files. The encoders are Pingora's own (gzip, brotli, zstd); this module only decides.
//!
//! Why not Pingora's `ResponseCompression` as is: it takes the client's first listed coding
//! and ignores q-values, and it has no per-route allow-list, size floor or media types.
//!
//! The cache stores the upstream's form and encodes per request (as nginx's gzip after its
//! proxy_cache): one copy in memory per response rather than one per coding, and a purge or
//! revalidation has one entry to deal with.
use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use pingora::modules::http::{HttpModule, HttpModuleBuilder, Module};
use pingora::protocols::http::compression::{Algorithm, Encode};
use pingora_error::{OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};

pub struct Builder;

impl HttpModuleBuilder for Builder {
    fn init(&self) -> Module {
        Box::<Compress>::default()
    }

    /// After other modules, as Pingora's own compression: it sees the final headers.
    fn order(&self) -> i16 {
        i16::MIN / 2
    }
}

/// Per request: the route's settings (set once the route is known) and, once the response
/// A content coding the gateway can produce, with Pingora's encoder behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Zstd,
    Br,
    Gzip,
}

impl Coding {
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    /// Levels each encoder accepts. zstd stops at 19: above it are the "ultra" levels, whose
    /// windows cost far more memory per response than a gateway should spend.
    pub(crate) fn levels(self) -> std::ops::RangeInclusive<i64> {
        match self {
            Coding::Zstd => 1..=19,
            Coding::Br => 1..=11,
            Coding::Gzip => 1..=9,
        }
    }

    /// gzip 6 is gzip's own default; br 4 and zstd 3 are what CDNs use for dynamic content
    /// (near gzip's speed, smaller output).
    pub(crate) fn default_level(self) -> u32 {
        match self {
            Coding::Zstd => 3,
            Coding::Br => 4,
            Coding::Gzip => 6,
        }
    }
}

/// A `types` entry: `text/*` (any subtype) or an exact media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeMatch {
    Prefix(String),
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    /// Allowed codings, the route's preference first (ties in the client's q-values go to it).
    pub algorithms: Vec<(Coding, u32)>,
    /// Responses whose Content-Length says they are smaller go as they are.
    pub min_size: u64,
    pub types: Vec<TypeMatch>,
}

impl Compression {
    /// Whether a response of this `Content-Type` is compressed. Streams of events or records
    /// (`text/event-stream`, `application/x-ndjson`) never are: encoders buffer, and such a
    /// stream must reach the client piece by piece.
    pub fn compresses(&self, content_type: &[u8]) -> bool {
        let media = content_type
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if media.eq_ignore_ascii_case(b"text/event-stream")
            || media.eq_ignore_ascii_case(b"application/x-ndjson")
        {
            return false;
        }
        self.types.iter().any(|t| match t {
            TypeMatch::Prefix(p) => {
                media.len() > p.len() && media[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            TypeMatch::Exact(e) => media.eq_ignore_ascii_case(e.as_bytes()),
        })
    }
}

/// head said so, the encoder.
#[derive(Default)]
pub struct Compress {
    pub route: Option<Arc<Compression>>,
    accept: Option<HeaderValue>,
    /// The request's If-None-Match, on a compressing route: which form of a 304's ETag the
    /// client holds.
    if_none_match: Option<HeaderValue>,
    head: bool,
    encoder: Option<Box<dyn Encode + Send + Sync>>,
}

#[async_trait]
impl HttpModule for Compress {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    async fn request_header_filter(&mut self, req: &mut RequestHeader) -> Result<()> {
        // A client older than HTTP/1.1 gets the identity form, as from nginx's default
        // `gzip_http_version 1.1`: an encoded body has no length to send it with, and without
        // chunks it could only end with the connection.
        let old = matches!(req.version, http::Version::HTTP_10 | http::Version::HTTP_09);
        self.accept = if old {
            None
        } else {
            req.headers.get(header::ACCEPT_ENCODING).cloned()
        };
        self.head = req.method == http::Method::HEAD;
        if self.route.is_some() {
            self.if_none_match = req.headers.get(header::IF_NONE_MATCH).cloned();
        }
        Ok(())
    }

    async fn response_header_filter(&mut self, resp: &mut ResponseHeader, end: bool) -> Result<()> {
        let Some(route) = self.route.as_ref() else {
            return Ok(());
        };
        if resp.status == http::StatusCode::NOT_MODIFIED {
            // RFC 9110 §15.4.5: a 304 carries the ETag and Vary its 200 would have. The
            // client's 200 was encoded (and its tag weakened) when it holds the weak form.
            add_vary(resp);
            if holds_weak_form(self.if_none_match.as_ref(), resp) {
                weaken_etag(resp);
            }
            return Ok(());
        }
        // A 1xx is not the answer; the real head comes later through here again.
        if resp.status.is_informational() || !compressible(route, resp) {
            return Ok(());
        }
        add_vary(resp);
        let Some((coding, level)) = negotiate(self.accept.as_ref(), &route.algorithms) else {
            return Ok(());
        };
        // A HEAD answer, or an empty body, gets the head a GET would (RFC 9110 §9.3.2) and no
        // encoder: there is nothing to encode.
        if end && !self.head {
            return Ok(());
        }
        let _ = resp.insert_header(header::CONTENT_ENCODING, coding.as_str());
        resp.remove_header(&header::CONTENT_LENGTH);
        // Byte ranges of the encoded form are not ranges of the stored one.
        resp.remove_header(&header::ACCEPT_RANGES);
        // The HTTP/1 writer frames a body of unknown length by chunks; HTTP/2 drops this.
        let _ = resp.insert_header(header::TRANSFER_ENCODING, "chunked");
        weaken_etag(resp);
        if !self.head {
            self.encoder = match coding {
                Coding::Br => Some(Box::new(Brotli::new(level))),
                other => algorithm(other).compressor(level),
            };
        }
        Ok(())
    }

    fn response_body_filter(&mut self, body: &mut Option<Bytes>, end: bool) -> Result<()> {
        let Some(enc) = self.encoder.as_mut() else {
            return Ok(());
        };
        let input = body.as_deref().unwrap_or_default();
        match enc.encode(input, end) {
            Ok(out) => *body = Some(out),
            Err(e) => {
                // The head is sent already: the body cannot go out another way.
                self.encoder = None;
                return Err(e);
            }
        }
        if end {
            self.encoder = None;
        }
        Ok(())
    }

    /// A response that ended without an end-of-stream body chunk still owes the encoder's
    /// trailer (gzip's CRC, zstd's frame end).
    fn response_done_filter(&mut self) -> Result<Option<Bytes>> {
        match self.encoder.take() {
            Some(mut enc) => enc.encode(&[], true).map(Some),
            None => Ok(None),
        }
    }
}

fn algorithm(c: Coding) -> Algorithm {
    match c {
        Coding::Zstd => Algorithm::Zstd,
        Coding::Br => Algorithm::Brotli,
        Coding::Gzip => Algorithm::Gzip,
    }
}

/// Brotli over the brotli crate. Pingora 0.9's own brotli `Compressor` only flushes at the
/// end of the body and never writes the stream's last block, so strict decoders (the brotli
/// crate's, curl's) refuse its output; this one finishes the stream.
struct Brotli {
    writer: Option<brotli::CompressorWriter<Vec<u8>>>,
    total_in: usize,
    total_out: usize,
    spent: std::time::Duration,
}

impl Brotli {
    fn new(level: u32) -> Self {
        Brotli {
            // 4 KiB buffer and a 512 KiB window (lgwin 19), as Pingora's.
            writer: Some(brotli::CompressorWriter::new(Vec::new(), 4096, level, 19)),
            total_in: 0,
            total_out: 0,
            spent: std::time::Duration::ZERO,
        }
    }
}

impl Encode for Brotli {
    fn encode(&mut self, input: &[u8], end: bool) -> Result<Bytes> {
        use std::io::Write;
        let start = std::time::Instant::now();
        let Some(w) = self.writer.as_mut() else {
            return Ok(Bytes::new());
        };
        self.total_in += input.len();
        w.write_all(input).or_err(
            pingora_error::ErrorType::InternalError,
            "while compressing brotli",
        )?;
        let out = if end {
            self.writer
                .take()
                .map(|w| w.into_inner())
                .unwrap_or_default()
        } else {
            std::mem::take(w.get_mut())
        };
        self.total_out += out.len();
        self.spent += start.elapsed();
        Ok(out.into())
    }

    fn stat(&self) -> (&'static str, usize, usize, std::time::Duration) {
        ("brotli", self.total_in, self.total_out, self.spent)
    }
}

/// Whether the route would compress this response for a client that asks: a whole 2xx
/// body (not 204/206) of a listed type, not encoded already, not marked `no-transform`
/// (RFC 9111 §5.2.2.6), and not known to be under `min_size`.
fn compressible(route: &Compression, resp: &ResponseHeader) -> bool {
    let s = resp.status.as_u16();
    if !(200..300).contains(&s) || s == 204 || s == 206 {
        return false;
    }
    let h = &resp.headers;
    // Any coding at all, in any of the fields: never encode twice.
    if h.get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
    {
        return false;
    }
    if h.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|d| d.trim_ascii().eq_ignore_ascii_case(b"no-transform"))
    }) {
        return false;
    }
    if let Some(len) = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len < route.min_size {
            return false;
        }
    }
    h.get(header::CONTENT_TYPE)
        .is_some_and(|ct| route.compresses(ct.as_bytes()))
}

fn add_vary(resp: &mut ResponseHeader) {
    let present = resp.headers.get_all(header::VARY).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|t| {
            let t = t.trim_ascii();
            t == b"*" || t.eq_ignore_ascii_case(b"accept-encoding")
        })
    });
    if !present {
        let _ = resp.append_header(header::VARY, "Accept-Encoding");
    }
}

/// The representation changed, so a strong validator would now lie (RFC 9110 §8.8.1); a weak
/// one still lets clients revalidate. An ETag that is not a quoted string is dropped.
/// Whether `if_none_match` names the weak form of the response's strong ETag.
fn holds_weak_form(if_none_match: Option<&HeaderValue>, resp: &ResponseHeader) -> bool {
    let (Some(inm), Some(etag)) = (if_none_match, resp.headers.get(header::ETAG)) else {
        return false;
    };
    let tag = etag.as_bytes();
    !tag.starts_with(b"W/")
        && inm.as_bytes().split(|&b| b == b',').any(|t| {
            t.trim_ascii()
                .strip_prefix(b"W/")
                .is_some_and(|weak| weak == tag)
        })
}

fn weaken_etag(resp: &mut ResponseHeader) {
    let Some(etag) = resp.headers.get(header::ETAG) else {
        return;
    };
    let b = etag.as_bytes();
    if b.starts_with(b"W/") {
        return;
    }
    if b.starts_with(b"\"") {
        let mut weak = Vec::with_capacity(b.len() + 2);
        weak.extend_from_slice(b"W/");
        weak.extend_from_slice(b);
        if let Ok(v) = HeaderValue::from_bytes(&weak) {
            let _ = resp.insert_header(header::ETAG, v);
            return;
        }
    }
    resp.remove_header(&header::ETAG);
}

/// The coding to send: the highest client q-value among the route's codings, ties to the
/// route's order; none when the client sent no Accept-Encoding, or refuses them all. `*`
/// stands for codings not named; `x-gzip` is gzip (RFC 9110 §8.4.1.3).
pub fn negotiate(accept: Option<&HeaderValue>, allowed: &[(Coding, u32)]) -> Option<(Coding, u32)> {
    let accept = accept?.as_bytes();
    let mut named = [None::<u16>; 3];
    let mut star = None::<u16>;
    for item in accept.split(|&b| b == b',') {
        let mut parts = item.split(|&b| b == b';');
        let token = parts.next().unwrap_or_default().trim_ascii();
        let mut q = Some(1000);
        for p in parts {
            let p = p.trim_ascii();
            if let Some(v) = p.strip_prefix(b"q=").or_else(|| p.strip_prefix(b"Q=")) {
                q = qvalue(v);
            }
        }
        // An unreadable q-value leaves the item out rather than guessing.
        let Some(q) = q else { continue };
        let slot = if token.eq_ignore_ascii_case(b"zstd") {
            Some(0)
        } else if token.eq_ignore_ascii_case(b"br") {
            Some(1)
        } else if token.eq_ignore_ascii_case(b"gzip") || token.eq_ignore_ascii_case(b"x-gzip") {
            Some(2)
        } else {
            if token == b"*" {
                star = Some(q);
            }
            None
        };
        if let Some(i) = slot {
            named[i] = Some(q);
        }
    }
    let mut best: Option<((Coding, u32), u16)> = None;
    for &(coding, level) in allowed {
        let i = match coding {
            Coding::Zstd => 0,
            Coding::Br => 1,
            Coding::Gzip => 2,
        };
        let q = named[i].or(star).unwrap_or(0);
        if q > 0 && best.is_none_or(|(_, b)| q > b) {
            best = Some(((coding, level), q));
        }
    }
    best.map(|(c, _)| c)
}

/// `1`, `0.5`, `0.001` → thousandths (RFC 9110 §12.4.2); `None` when malformed.
fn qvalue(v: &[u8]) -> Option<u16> {
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &b""[..]),
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths: u16 = 0;
    for i in 0..3 {
        thousandths = thousandths * 10 + frac.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    match int {
        b"0" => Some(thousandths),
        b"1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[(Coding, u32)] = &[(Coding::Zstd, 3), (Coding::Br, 4), (Coding::Gzip, 6)];

    fn pick(accept: &str, allowed: &[(Coding, u32)]) -> Option<Coding> {
        negotiate(Some(&HeaderValue::from_str(accept).unwrap()), allowed).map(|(c, _)| c)
    }

    #[test]
    fn q_values_and_preference() {
        assert_eq!(negotiate(None, ALL), None);
        // Browsers list all at q=1: the route's order decides.
        assert_eq!(pick("gzip, deflate, br, zstd", ALL), Some(Coding::Zstd));
        assert_eq!(pick("gzip;q=1.0, br;q=0.8", ALL), Some(Coding::Gzip));
        assert_eq!(pick("br;q=0.9, gzip;q=0.9", ALL), Some(Coding::Br));
        assert_eq!(pick("zstd;q=0, gzip;q=0.1", ALL), Some(Coding::Gzip));
        assert_eq!(pick("*;q=0.5, br;q=0", ALL), Some(Coding::Zstd));
        assert_eq!(pick("*", &[(Coding::Gzip, 6)]), Some(Coding::Gzip));
        assert_eq!(pick("identity", ALL), None);
        assert_eq!(pick("gzip;q=0", ALL), None);
        assert_eq!(pick("x-gzip", ALL), Some(Coding::Gzip));
        assert_eq!(pick("br", &[(Coding::Gzip, 6)]), None);
        // Malformed q-values drop their item.
        assert_eq!(pick("br;q=2, gzip", ALL), Some(Coding::Gzip));
        assert_eq!(pick("br;q=0.0001", ALL), None);
        assert_eq!(pick("GZIP;Q=0.5", ALL), Some(Coding::Gzip));
    }

    #[test]
    fn etags() {
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.insert_header("etag", "\"abc\"").unwrap();
        weaken_etag(&mut r);
        assert_eq!(r.headers["etag"], "W/\"abc\"");
        weaken_etag(&mut r);
        assert_eq!(r.headers["etag"], "W/\"abc\"");
        r.insert_header("etag", "abc").unwrap();
        weaken_etag(&mut r);
        assert!(r.headers.get("etag").is_none());
    }
}
