//! `request_buffering`: a request body up to the route's size is read, and so checked, before
//! any byte of the request goes upstream. A chunked body that turns out malformed, or an
//! HTTP/2 body whose DATA disagrees with its `content-length`, is refused with the upstream
//! never having seen its head (streamed, the head and the first pieces would be there
//! already, and the upstream left with half a request); and a body held whole can be sent
//! again, so such a POST is retried on a new connection like a GET when a pooled connection
//! turns out dead.
//!
//! The body is read into Pingora's own retry buffer (64 KiB), which Pingora then sends as the
//! body of the first try, and of any retry. A read that would overflow it loses the body, so
//! no read may: a body with a `Content-Length` is read only if it fits; a chunked HTTP/1 one
//! is read while the next read cannot overflow (the front caps each socket read at what is
//! left, and after a head over 16 KiB, whose read buffer may hold more of the body than that,
//! it streams). Whatever is not read whole streams as before, after what was read.
//!
//! Never read ahead: a body the client sends only once told to go on (`Expect:
//! 100-continue`: the upstream says so), and an HTTP/2 body without `content-length`, which
//! may be one direction of a stream both ways (gRPC).
use pingora::protocols::http::ServerSession;
use pingora_error::Result;
use pingora_proxy::Session;

use crate::config::REQUEST_BUFFERING_MAX;

/// SETTINGS_MAX_FRAME_SIZE the gateway announces (h2's default): the most one HTTP/2 read gives.
const H2_FRAME: usize = 16 * 1024;
/// The largest HTTP/1 head whose leftover body bytes are sure to fit the buffer.
const H1_HEAD: usize = 16 * 1024;

/// Reads the request body into Pingora's retry buffer, up to `limit` bytes, as described
/// above. `Ok(true)`: the whole body is held (it can be sent again).
pub(super) async fn read_ahead(session: &mut Session, limit: usize) -> Result<bool> {
    let limit = limit.min(REQUEST_BUFFERING_MAX);
    let down: &mut ServerSession = session.as_mut();
    if limit == 0 || down.is_body_empty() || down.is_body_done() {
        return Ok(false);
    }
    let h2 = down.is_http2();
    let req = down.req_header();
    // A client that asked to be told to go on (Expect: 100-continue) sends its body only
    // after the upstream said so.
    if req.headers.contains_key(http::header::EXPECT) {
        return Ok(false);
    }
    let length = content_length(req);
    match (h2, length) {
        (_, Some(n)) if n > limit as u64 => return Ok(false),
        (_, Some(_)) => {}
        // HTTP/2 without a length may be a stream both ways (gRPC: the client sends its next
        // message once it has the answer to the last): it streams.
        (true, None) => return Ok(false),
        (false, None) => {
            // Reads can be capped only on the gateway's own client streams.
            let capped = down.as_http1().is_some_and(|h1| {
                h1.get_headers_raw_bytes().len() <= H1_HEAD
                    && crate::front::Timed::clock_of(h1.stream()).is_some()
            });
            if !capped {
                return Ok(false);
            }
        }
    }
    down.enable_retry_buffering();
    if h2 {
        crate::front::h2_body_expected(true);
    }
    let mut total = 0usize;
    let result = loop {
        if length.is_none() {
            let room = REQUEST_BUFFERING_MAX - total;
            if total >= limit || (h2 && room < H2_FRAME) {
                break Ok(false);
            }
            if !h2 {
                cap_reads(down, room);
            }
        }
        match down.read_request_body().await {
            Ok(Some(piece)) => {
                total += piece.len();
                if h2 {
                    crate::front::h2_body_read(down.is_body_done());
                }
            }
            Ok(None) => {
                if h2 {
                    crate::front::h2_body_read(true);
                }
                break Ok(true);
            }
            Err(mut e) => {
                // The client's: a malformed body is its 400, a stalled one its 408.
                e.as_down();
                break Err(e);
            }
        }
        if down.is_body_done() {
            break Ok(true);
        }
    };
    if length.is_none() && !h2 {
        cap_reads(down, 0);
    }
    result.map(|whole| whole && !down.retry_buffer_truncated())
}

/// Caps the HTTP/1 client connection's socket reads (0: uncapped).
fn cap_reads(down: &ServerSession, cap: usize) {
    if let Some(clock) = down
        .as_http1()
        .and_then(|h1| crate::front::Timed::clock_of(h1.stream()))
    {
        clock.cap_reads(cap);
    }
}

/// The request's `Content-Length` (already canonical: one value, digits only).
fn content_length(req: &pingora_http::RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
