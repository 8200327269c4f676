//! HTTP/1.1 upgrades (WebSocket) to plain-HTTP upstreams, tunnelled by the gateway itself.
//!
//! Why not Pingora's own path: in Pingora 0.9.1 an upgraded tunnel is torn down right after the
//! `101` whenever the upstream's answer is read before the request's empty body end
//! (cloudflare/pingora#946) — with a fast upstream and a busy CPU, a large share of WebSocket
//! handshakes. No `ProxyHttp` hook runs between the request header write and that loop, so the
//! gateway does the handshake and the byte pump here: connect, send the (rewritten) request
//! head, read the answer head, and on `101` copy bytes both ways until either side closes or
//! the tunnel is idle for the upstream's `read_timeout`. An upstream that refuses the upgrade is
//! answered like any response (bounded body). TLS upstreams still go through Pingora.
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use pingora_error::{Error, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::upstream::Pool;

/// Largest answer head we read from an upstream.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body of a refused upgrade that we relay.
const MAX_REFUSAL_BODY: usize = 1024 * 1024;

/// An upstream connection with what has been read from it but not used yet.
struct Upstream {
    stream: TcpStream,
    buf: BytesMut,
    read_timeout: Duration,
}

fn up_err(t: ErrorType, why: &'static str) -> Box<Error> {
    let mut e = Error::explain(t, why);
    e.esource = pingora_error::ErrorSource::Upstream;
    e
}

impl Upstream {
    /// Reads more bytes into `buf`; `Ok(0)` at end of stream.
    async fn fill(&mut self) -> Result<usize> {
        match timeout(self.read_timeout, self.stream.read_buf(&mut self.buf)).await {
            Ok(r) => r.or_err(ErrorType::ReadError, "reading from upstream"),
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

    /// Reads the whole body of a refused upgrade, by its framing, up to a bound.
    async fn body(&mut self, resp: &ResponseHeader, head_request: bool) -> Result<Bytes> {
        let status = resp.status.as_u16();
        if head_request || status == 204 || status == 304 || resp.status.is_informational() {
            return Ok(Bytes::new());
        }
        let te = resp.headers.get(http::header::TRANSFER_ENCODING);
        if te.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked")) {
            let mut out = BytesMut::new();
            loop {
                let line = self.line().await?;
                let size = match httparse::parse_chunk_size(&[&line[..], b"\r\n"].concat()) {
                    Ok(httparse::Status::Complete((_, size))) => size as usize,
                    _ => return Err(up_err(ErrorType::InvalidHTTPHeader, "bad chunk size")),
                };
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !self.line().await?.is_empty() {}
                    return Ok(out.freeze());
                }
                if out.len() + size > MAX_REFUSAL_BODY {
                    return Err(up_err(
                        ErrorType::InvalidHTTPHeader,
                        "refusal body too large",
                    ));
                }
                out.extend_from_slice(&self.exactly(size).await?);
                self.exactly(2).await?;
            }
        }
        let cl = resp.headers.get(http::header::CONTENT_LENGTH);
        if let Some(cl) = cl {
            let n: usize = std::str::from_utf8(cl.as_bytes())
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| up_err(ErrorType::InvalidHTTPHeader, "bad content-length"))?;
            if n > MAX_REFUSAL_BODY {
                return Err(up_err(
                    ErrorType::InvalidHTTPHeader,
                    "refusal body too large",
                ));
            }
            return self.exactly(n).await;
        }
        while self.fill().await? > 0 {
            if self.buf.len() > MAX_REFUSAL_BODY {
                return Err(up_err(
                    ErrorType::InvalidHTTPHeader,
                    "refusal body too large",
                ));
            }
        }
        Ok(self.buf.split().freeze())
    }
}

/// Only `GET` with `Upgrade: websocket` is an upgrade here (RFC 6455 §4.1). Any other
/// `Upgrade` (curl's `h2c`, a POST asking for `x`) is dropped from the request, which is then
/// proxied as a normal one: left in place, Pingora would treat the exchange as a protocol
/// switch and wait for the client's side of a tunnel that never comes.
pub fn only_websocket(req: &mut RequestHeader) {
    let Some(up) = req.headers.get(http::header::UPGRADE) else {
        return;
    };
    let websocket = req.method == http::Method::GET
        && up
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"));
    if !websocket {
        req.remove_header(&http::header::UPGRADE);
    }
}

/// Connects to `addr` and sends the request head.
pub async fn connect(pool: &Pool, addr: SocketAddr, req: &RequestHeader) -> Result<TcpStream> {
    let mut stream = match timeout(pool.connect_timeout(), TcpStream::connect(addr)).await {
        Err(_) => return Err(up_err(ErrorType::ConnectTimedout, "connect timed out")),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(up_err(ErrorType::ConnectRefused, "connection refused"))
        }
        Ok(Err(_)) => return Err(up_err(ErrorType::ConnectError, "connect failed")),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
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
        Ok(r) => r.or_err(ErrorType::WriteError, "writing request head upstream")?,
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
                if code == 100 {
                    up.buf.advance(len);
                    continue;
                }
                let mut resp = ResponseHeader::build(code, Some(parsed.headers.len()))?;
                for h in parsed.headers.iter() {
                    let v = http::HeaderValue::from_bytes(h.value)
                        .or_err(ErrorType::InvalidHTTPHeader, "upstream header value")?;
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

pub async fn handshake(pool: &Pool, stream: TcpStream) -> Result<Handshake> {
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

/// Writes the answer to the client; on `101`, pumps bytes both ways until one side closes.
pub async fn finish(session: &mut Session, hs: Handshake) -> Result<()> {
    let Handshake {
        mut up,
        mut resp,
        idle,
        write_timeout,
    } = hs;
    if resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
        let head_req = session.req_header().method == http::Method::HEAD;
        let body = up.body(&resp, head_req).await?;
        resp.remove_header(&http::header::TRANSFER_ENCODING);
        resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        session
            .write_response_header(Box::new(resp), body.is_empty())
            .await?;
        if !body.is_empty() {
            session.write_response_body(Some(body), true).await?;
        }
        return Ok(());
    }

    session.write_response_header(Box::new(resp), false).await?;
    if !up.buf.is_empty() {
        let early = up.buf.split().freeze();
        session.write_response_body(Some(early), false).await?;
    }
    let Upstream { stream, .. } = up;
    let (mut ur, mut uw) = stream.into_split();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut client_open = true;
    loop {
        tokio::select! {
            data = session.read_request_body(), if client_open => match data? {
                Some(b) => match timeout(write_timeout, uw.write_all(&b)).await {
                    Ok(r) => r.or_err(ErrorType::WriteError, "writing to upstream tunnel")?,
                    Err(_) => return Err(up_err(ErrorType::WriteTimedout, "upstream tunnel write timed out")),
                },
                None => {
                    // The client is done sending; let the upstream finish its side.
                    client_open = false;
                    let _ = uw.shutdown().await;
                }
            },
            n = ur.read(&mut chunk) => {
                let n = n.or_err(ErrorType::ReadError, "reading from upstream tunnel")?;
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
