//! HTTP/1.1 WebSocket upgrades, tunnelled by the gateway itself (plain and TLS upstreams).
//!
//! Why not Pingora's own path: in Pingora 0.9.1 an upgraded tunnel is torn down right after the
//! `101` whenever the upstream's answer is read before the request's empty body end
//! (cloudflare/pingora#946) — with a fast upstream and a busy CPU, a large share of WebSocket
//! handshakes. No `ProxyHttp` hook runs between the request header write and that loop, so the
//! gateway does the handshake and the byte pump here: connect, send the (rewritten) request
//! head, read the answer head, and on `101` copy bytes both ways until either side closes or
//! the tunnel is idle for the upstream's `read_timeout`. The connection is Pingora's own
//! (its transport connector), so a TLS upstream's is verified as every other request's: the
//! same CA, SNI, verified name and client certificate, always HTTP/1.1 by ALPN.
//!
//! A tunnel carries whatever the two ends say to each other, past routing and plugins, so it
//! opens only for a WebSocket handshake as RFC 6455 §4 spells it: the client's request has no
//! body and a `Sec-WebSocket-Key`; it goes upstream with exactly `Connection: Upgrade` and
//! `Upgrade: websocket` (no `h2c`, no `HTTP2-Settings`: an upstream must not switch to a protocol
//! whose requests the gateway would not route); and the `101` must say `Upgrade: websocket`
//! with the `Sec-WebSocket-Accept` that key calls for. An upstream that refuses the upgrade is
//! answered like any response, its body streamed through.
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use pingora::connectors::TransportConnector;
use pingora::protocols::Stream;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::{balance, RequestCtx};
use crate::upstream::Pool;
use pingora_proxy::ProxyHttp;

/// Largest answer head we read from an upstream.
const MAX_HEAD: usize = 64 * 1024;
/// Largest piece of a refused upgrade's body relayed at once.
const RELAY_CHUNK: usize = 16 * 1024;
/// RFC 6455 §1.3.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// An upstream connection with what has been read from it but not used yet.
struct Upstream {
    stream: Stream,
    buf: BytesMut,
    read_timeout: Duration,
}

fn up_err(t: ErrorType, why: &'static str) -> Box<Error> {
    let mut e = Error::explain(t, why);
    e.esource = pingora_error::ErrorSource::Upstream;
    e
}

/// An I/O failure on the upstream side: the upstream's, with its cause kept for the log.
fn up_io<T>(r: std::io::Result<T>, t: ErrorType, why: &'static str) -> Result<T> {
    r.map_err(|cause| {
        let mut e = Error::because(t, why, cause);
        e.esource = ErrorSource::Upstream;
        e
    })
}

impl Upstream {
    /// Reads more bytes into `buf`; `Ok(0)` at end of stream.
    async fn fill(&mut self) -> Result<usize> {
        match timeout(self.read_timeout, self.stream.read_buf(&mut self.buf)).await {
            Ok(r) => up_io(r, ErrorType::ReadError, "reading from upstream"),
            Err(_) => Err(up_err(ErrorType::ReadTimedout, "upstream read timed out")),
        }
    }

    async fn line(&mut self) -> Result<Bytes> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(i).freeze();
                self.buf.advance(2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD || self.fill().await? == 0 {
                return Err(up_err(
                    ErrorType::InvalidHTTPHeader,
                    "bad chunked body from upstream",
                ));
            }
        }
    }

    async fn exactly(&mut self, n: usize) -> Result<Bytes> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(up_err(
                    ErrorType::ConnectionClosed,
                    "upstream closed mid-body",
                ));
            }
        }
        Ok(self.buf.split_to(n).freeze())
    }
}

/// Only `GET` with `Upgrade: websocket` is an upgrade here (RFC 6455 §4.1). Any other
/// `Upgrade` (curl's `h2c`, a POST asking for `x`) is dropped from the request, which is then
/// proxied as a normal one: left in place, Pingora would treat the exchange as a protocol
/// switch and wait for the client's side of a tunnel that never comes. A WebSocket request is
/// checked (no body, a valid key) and asks for exactly `websocket`, with no `HTTP2-Settings`,
/// before it goes to the tunnel; the
/// `Sec-WebSocket-Accept` its `101` must carry is returned.
pub fn only_websocket(req: &mut RequestHeader) -> Result<Option<String>> {
    let Some(up) = req.headers.get(http::header::UPGRADE) else {
        return Ok(None);
    };
    let websocket = req.method == http::Method::GET
        && up
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"));
    if !websocket {
        req.remove_header(&http::header::UPGRADE);
        return Ok(None);
    }
    let h = &req.headers;
    let has_body = h.contains_key(http::header::TRANSFER_ENCODING)
        || h.get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(super::client_error(
            400,
            "a WebSocket handshake has no body",
        ));
    }
    let key = h
        .get(http::header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().trim_ascii())
        .filter(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k)
                .is_ok_and(|raw| raw.len() == 16)
        })
        .ok_or_else(|| {
            super::client_error(400, "a WebSocket handshake needs a valid Sec-WebSocket-Key")
        })?;
    let accept = accept_for(key);
    req.remove_header("http2-settings");
    req.insert_header(http::header::UPGRADE, "websocket")?;
    Ok(Some(accept))
}

/// Whether a `101` completes the WebSocket handshake whose accept key is `accept`: it must
/// switch to `websocket` and carry that key. Any other opens no tunnel.
pub fn completes(resp: &ResponseHeader, accept: &str) -> Result<()> {
    let h = &resp.headers;
    let upgrade_ok = h
        .get(http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    let accept_ok = h
        .get(http::header::SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|v| v.as_bytes().trim_ascii() == accept.as_bytes());
    if upgrade_ok && accept_ok {
        return Ok(());
    }
    let mut e = Error::explain(
        ErrorType::HTTPStatus(502),
        "the upstream's 101 does not complete the WebSocket handshake",
    );
    // The upstream did answer; whether its answer was the client's doing is unknown.
    e.esource = ErrorSource::Internal;
    Err(e)
}

/// The `Sec-WebSocket-Accept` an upstream must answer to `key` (RFC 6455 §4.2.2).
fn accept_for(key: &[u8]) -> String {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    h.update(key);
    h.update(WS_GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Makes `req` (checked by [`only_websocket`]) the handshake the tunnel sends: every
/// hop-by-hop header dropped, then exactly `Connection: Upgrade` and `Upgrade: websocket`.
pub fn handshake_request(req: &mut RequestHeader) -> Result<()> {
    for name in super::hop::hop_by_hop(&req.headers, false, false) {
        req.remove_header(&name);
    }
    req.insert_header(http::header::CONNECTION, "Upgrade")?;
    req.insert_header(http::header::UPGRADE, "websocket")?;
    Ok(())
}

/// Tunnels connect here: Pingora's connector without its pool (a tunnel is never reused).
fn connector() -> &'static TransportConnector {
    static C: OnceLock<TransportConnector> = OnceLock::new();
    C.get_or_init(|| TransportConnector::new(None))
}

/// Connects to peer `idx` (TLS as the upstream says) and sends the request head.
pub async fn connect(pool: &Pool, idx: usize, req: &RequestHeader) -> Result<Stream> {
    let mut peer = pool.peer(idx);
    // A WebSocket handshake is HTTP/1.1 (an `http2` upstream is asked for it by ALPN).
    peer.options.alpn = pingora::protocols::ALPN::H1;
    let mut stream = connector().new_stream(&*peer).await.map_err(|mut e| {
        e.esource = ErrorSource::Upstream;
        e
    })?;
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(req.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(
        req.uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers.iter() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    match timeout(pool.write_timeout(), stream.write_all(&head)).await {
        Ok(r) => up_io(r, ErrorType::WriteError, "writing request head upstream")?,
        Err(_) => return Err(up_err(ErrorType::WriteTimedout, "upstream write timed out")),
    }
    Ok(stream)
}

/// Reads the upstream's answer head (skipping `100 Continue`s).
async fn read_head(up: &mut Upstream) -> Result<ResponseHeader> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed.parse(&up.buf) {
            Ok(httparse::Status::Complete(len)) => {
                let code = parsed.code.unwrap_or(502);
                // Interim answers (100 Continue, 103 Early Hints) are not the answer.
                if (100..200).contains(&code) && code != 101 {
                    up.buf.advance(len);
                    continue;
                }
                let mut resp = ResponseHeader::build(code, Some(parsed.headers.len()))?;
                for h in parsed.headers.iter() {
                    let v = http::HeaderValue::from_bytes(h.value).map_err(|_| {
                        up_err(ErrorType::InvalidHTTPHeader, "upstream header value")
                    })?;
                    resp.append_header(h.name.to_string(), v)?;
                }
                up.buf.advance(len);
                return Ok(resp);
            }
            Ok(httparse::Status::Partial) => {
                if up.buf.len() > MAX_HEAD {
                    return Err(up_err(
                        ErrorType::InvalidHTTPHeader,
                        "upstream head too large",
                    ));
                }
                if up.fill().await? == 0 {
                    return Err(up_err(
                        ErrorType::ConnectionClosed,
                        "upstream closed before answering",
                    ));
                }
            }
            Err(_) => {
                return Err(up_err(
                    ErrorType::InvalidHTTPHeader,
                    "malformed upstream answer",
                ))
            }
        }
    }
}

/// What the upstream answered to the handshake; the caller runs its response filters over the
/// header before [`finish`] writes it.
pub struct Handshake {
    up: Upstream,
    pub resp: ResponseHeader,
    idle: Duration,
    write_timeout: Duration,
}

pub async fn handshake(pool: &Pool, stream: Stream) -> Result<Handshake> {
    let mut up = Upstream {
        stream,
        buf: BytesMut::with_capacity(4096),
        read_timeout: pool.read_timeout(),
    };
    let resp = read_head(&mut up).await?;
    Ok(Handshake {
        up,
        resp,
        idle: pool.read_timeout(),
        write_timeout: pool.write_timeout(),
    })
}

impl Handshake {
    /// Whether the answer, if a `101`, completes this WebSocket handshake (see [`completes`]).
    pub fn check_switch(&self, accept: &str) -> Result<()> {
        if self.resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
            return Ok(());
        }
        completes(&self.resp, accept)
    }
}

/// Writes the answer to the client; on `101`, pumps bytes both ways until one side closes.
/// Errors after the answer's head came are nobody's verdict on the upstream (it answered):
/// they are marked internal, and end the connection.
pub async fn finish(session: &mut Session, hs: Handshake) -> Result<()> {
    relay_or_pump(session, hs).await.map_err(|mut e| {
        if e.esource == ErrorSource::Upstream {
            e.esource = ErrorSource::Internal;
        }
        e
    })
}

async fn relay_or_pump(session: &mut Session, hs: Handshake) -> Result<()> {
    let Handshake {
        mut up,
        mut resp,
        idle,
        write_timeout,
    } = hs;
    if resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
        let head_req = session.req_header().method == http::Method::HEAD;
        let status = resp.status.as_u16();
        let no_body = head_req || status == 204 || status == 304;
        let chunked = resp
            .headers
            .get(http::header::TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let length = match resp.headers.get(http::header::CONTENT_LENGTH) {
            Some(v) if !chunked => Some(
                std::str::from_utf8(v.as_bytes())
                    .ok()
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| up_err(ErrorType::InvalidHTTPHeader, "bad content-length"))?,
            ),
            _ => None,
        };
        if no_body || length == Some(0) {
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(());
        }
        if length.is_none() && !chunked {
            // Read until the upstream closes: the client learns the end the same way (a
            // transfer coding we do not decode is relayed as it is, not framed again).
            resp.remove_header(&http::header::TRANSFER_ENCODING);
            resp.insert_header(http::header::CONNECTION, "close")?;
            session.set_keepalive(None);
        }
        session.write_response_header(Box::new(resp), false).await?;
        if chunked {
            relay_chunked(session, &mut up).await?;
        } else {
            relay_length(session, &mut up, length).await?;
        }
        return session.write_response_body(None, true).await;
    }

    session.write_response_header(Box::new(resp), false).await?;
    if !up.buf.is_empty() {
        let early = up.buf.split().freeze();
        session.write_response_body(Some(early), false).await?;
    }
    let Upstream { stream, .. } = up;
    let (mut ur, mut uw) = tokio::io::split(stream);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut client_open = true;
    loop {
        tokio::select! {
            data = session.read_request_body(), if client_open => match data? {
                Some(b) => match timeout(write_timeout, uw.write_all(&b)).await {
                    Ok(r) => up_io(r, ErrorType::WriteError, "writing to upstream tunnel")?,
                    Err(_) => return Err(up_err(ErrorType::WriteTimedout, "upstream tunnel write timed out")),
                },
                None => {
                    // The client is done sending; let the upstream finish its side.
                    client_open = false;
                    let _ = uw.shutdown().await;
                }
            },
            n = ur.read(&mut chunk) => {
                let n = up_io(n, ErrorType::ReadError, "reading from upstream tunnel")?;
                if n == 0 {
                    break;
                }
                session
                    .write_response_body(Some(Bytes::copy_from_slice(&chunk[..n])), false)
                    .await?;
            },
            _ = tokio::time::sleep(idle) => break,
        }
    }
    session.write_response_body(None, true).await
}

/// Streams `length` bytes (or up to the upstream's close) in bounded pieces.
async fn relay_length(session: &mut Session, up: &mut Upstream, length: Option<u64>) -> Result<()> {
    let mut left = length.unwrap_or(u64::MAX);
    while left > 0 {
        if up.buf.is_empty() && up.fill().await? == 0 {
            if length.is_some() {
                return Err(up_err(
                    ErrorType::ConnectionClosed,
                    "upstream closed mid-body",
                ));
            }
            return Ok(());
        }
        let n = up
            .buf
            .len()
            .min(RELAY_CHUNK)
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let piece = up.buf.split_to(n).freeze();
        left -= n as u64;
        session.write_response_body(Some(piece), false).await?;
    }
    Ok(())
}

/// Streams a chunked body: its data, chunk by chunk in bounded pieces; Pingora frames it
/// again for the client.
async fn relay_chunked(session: &mut Session, up: &mut Upstream) -> Result<()> {
    loop {
        let line = up.line().await?;
        let size = match httparse::parse_chunk_size(&[&line[..], b"\r\n"].concat()) {
            Ok(httparse::Status::Complete((_, size))) => size,
            _ => return Err(up_err(ErrorType::InvalidHTTPHeader, "bad chunk size")),
        };
        if size == 0 {
            // Trailers, up to the empty line.
            while !up.line().await?.is_empty() {}
            return Ok(());
        }
        relay_length(session, up, Some(size)).await?;
        if up.exactly(2).await?.as_ref() != b"\r\n" {
            return Err(up_err(ErrorType::InvalidHTTPHeader, "bad chunk end"));
        }
    }
}

/// The tunnel itself, as a proxy phase: it runs the same upstream request hooks and response
/// hooks as Pingora's path does.
impl super::GatewayProxy {
    /// WebSocket upgrades to plain-HTTP upstreams (see `upgrade.rs`).
    pub(super) async fn tunnel(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        up: usize,
    ) -> Result<()> {
        let (Some(rt), Some(id)) = (ctx.rt.clone(), ctx.route) else {
            return Error::e_explain(ErrorType::InternalError, "no route for upgrade");
        };
        let gw = &rt.gateways[self.index];
        // Pingora strips hop-by-hop request headers before upstream_request_filter; this
        // request does not go through Pingora, so the handshake is made here.
        let mut req = session.req_header().clone();
        handshake_request(&mut req)?;
        let accept = ctx.ws_accept.clone().unwrap_or_default();
        balance::select_peer(&rt, up, session, ctx)?;
        let pool = &rt.pools[up];
        let Some(idx) = ctx.peer_idx else {
            return Error::e_explain(ErrorType::InternalError, "no peer for upgrade");
        };
        self.prepare_upstream_request(session, &mut req, ctx)
            .await?;
        // As upstream_request_filter does for proxied requests: the trace goes on (a client's
        // own traceparent, when not trusted, unsampled), and the upstream's time is measured.
        if let Some(span) = &ctx.span {
            rt.tracing.inject(span, &mut req);
        }
        ctx.upstream_sent = Some(std::time::Instant::now());
        let result = async {
            let stream = connect(pool, idx, &req).await?;
            handshake(pool, stream).await
        }
        .await;
        let mut hs = match result {
            Ok(hs) => hs,
            Err(e) => {
                ctx.upstream_failed = true;
                if let Some(idx) = ctx.peer_idx {
                    pool.no_answer(idx);
                }
                return Err(e);
            }
        };
        hs.check_switch(&accept)?;
        self.upstream_response_filter(session, &mut hs.resp, ctx)
            .await?;
        // The gateway's own headers (HSTS) on the 101 and on an upstream's refusal alike:
        // response_filter, which stamps proxied answers, does not run for the tunnel.
        gw.stamp(&mut hs.resp);
        gw.chains[id]
            .response(session, &mut hs.resp, &mut ctx.plugins)
            .await?;
        finish(session, hs).await
    }
}
