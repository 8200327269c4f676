//! An HTTP/2 client that writes frames as it is told, protocol errors and floods included,
//! and reports what the gateway sent back (GOAWAY, resets, answers, the close).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

pub const NO_ERROR: u32 = 0;
pub const PROTOCOL_ERROR: u32 = 1;
pub const REFUSED_STREAM: u32 = 7;
pub const CANCEL: u32 = 8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One frame as written on the wire.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut n: usize) {
    let max = (1usize << prefix_bits) - 1;
    if n < max {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// A header block of literal fields (no indexing, no Huffman): any decoder reads it.
pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The header block of a request for `path` with `method`.
pub fn request(method: &str, path: &str) -> Vec<u8> {
    block(&[
        (":method", method),
        (":scheme", "http"),
        (":authority", "localhost"),
        (":path", path),
    ])
}

/// What the gateway sent.
#[derive(Debug, Default)]
pub struct Seen {
    /// The error code of the last GOAWAY.
    pub goaway: Option<u32>,
    /// (stream, error code) of each RST_STREAM.
    pub resets: Vec<(u32, u32)>,
    /// Streams that got a HEADERS frame (an answer).
    pub answered: Vec<u32>,
    /// The server's SETTINGS (id, value), from its first SETTINGS frame.
    pub settings: Vec<(u16, u32)>,
    /// The connection was closed, this long after `Raw::connect`.
    pub closed_after: Option<Duration>,
    /// DATA bytes received.
    pub data: usize,
}

pub struct Raw {
    pub s: TcpStream,
    opened: Instant,
    buf: Vec<u8>,
    pub seen: Seen,
    /// Answer SETTINGS and PING (off while a frame is being written a byte at a time).
    pub answer: bool,
}

impl Raw {
    /// Connects and sends the preface and `settings` (id, value).
    pub async fn connect(port: u16, settings: &[(u16, u32)]) -> Raw {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut payload = Vec::new();
        for (id, v) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&v.to_be_bytes());
        }
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &payload));
        s.write_all(&hello).await.unwrap();
        Raw {
            s,
            opened: Instant::now(),
            buf: Vec::new(),
            seen: Seen::default(),
            answer: true,
        }
    }

    /// Writes bytes; false once the gateway has closed.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).await.is_ok()
    }

    /// Reads what the gateway sends for up to `within` (SETTINGS and PINGs answered), or until
    /// it closes. Returns whether it closed.
    pub async fn read_for(&mut self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        let mut chunk = [0u8; 16384];
        loop {
            match tokio::time::timeout_at(until, self.s.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.seen.closed_after = Some(self.opened.elapsed());
                    self.parse().await;
                    return true;
                }
                Ok(Ok(n)) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.parse().await;
                }
            }
        }
    }

    /// Reads until `done` says so, the connection closes, or `within` passes.
    pub async fn read_until(&mut self, within: Duration, done: impl Fn(&Seen) -> bool) -> bool {
        let until = Instant::now() + within;
        while !done(&self.seen) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if self.read_for(left.min(Duration::from_millis(50))).await {
                return done(&self.seen);
            }
        }
        true
    }

    async fn parse(&mut self) {
        loop {
            if self.buf.len() < 9 {
                return;
            }
            let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
            if self.buf.len() < 9 + len {
                return;
            }
            let kind = self.buf[3];
            let flags = self.buf[4];
            let stream = u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                & 0x7fff_ffff;
            let payload: Vec<u8> = self.buf[9..9 + len].to_vec();
            self.buf.drain(..9 + len);
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    if self.seen.settings.is_empty() {
                        for s in payload.chunks(6).filter(|c| c.len() == 6) {
                            let id = u16::from_be_bytes([s[0], s[1]]);
                            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                            self.seen.settings.push((id, v));
                        }
                    }
                    if self.answer {
                        let _ = self.s.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
                    }
                }
                PING if flags & ACK == 0 && self.answer => {
                    let _ = self.s.write_all(&frame(PING, ACK, 0, &payload)).await;
                }
                GOAWAY if payload.len() >= 8 => {
                    self.seen.goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
                RST_STREAM if payload.len() == 4 => {
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    self.seen.resets.push((stream, code));
                }
                HEADERS => self.seen.answered.push(stream),
                DATA => self.seen.data += len,
                _ => {}
            }
        }
    }
}
