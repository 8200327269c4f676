//! Raw HTTP/1.1 on both sides of the gateway: a client that writes exact bytes and reads back
//! every response, and an upstream that records the exact requests it receives (parsed
//! strictly, so two requests where one was sent show up as two).
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the upstream read it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The head as received, CRLFs included.
    pub head: String,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or("")
    }

    /// The value of header `name` (case-insensitive), first one.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn count(&self, name: &str) -> usize {
        self.head
            .split("\r\n")
            .skip(1)
            .filter(|l| {
                l.split_once(':')
                    .is_some_and(|(k, _)| k.eq_ignore_ascii_case(name))
            })
            .count()
    }
}

#[derive(Clone, Default)]
pub struct Records(Arc<Mutex<Vec<Recorded>>>);

impl Records {
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// An upstream that records every request and answers each with `200 ok`.
pub async fn recording_upstream() -> (SocketAddr, Records) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let records = Records::default();
    let rec = records.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let rec = rec.clone();
            tokio::spawn(async move {
                let _ = serve_recorded(s, rec).await;
            });
        }
    });
    (addr, records)
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
        .await
        .ok()?
        .ok()?;
    if n == 0 {
        return None;
    }
    buf.extend_from_slice(&chunk[..n]);
    Some(())
}

async fn line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let l = buf[..i].to_vec();
            buf.drain(..i + 2);
            return Some(l);
        }
        fill(s, buf).await?;
    }
}

async fn serve_recorded(mut s: TcpStream, rec: Records) -> Option<()> {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            fill(&mut s, &mut buf).await?;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&buf[..end]), Ok(httparse::Status::Complete(_))) {
            rec.0.lock().unwrap().push(Recorded {
                head,
                body: b"<unparseable>".to_vec(),
            });
            return None;
        }
        let chunked = req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("transfer-encoding")
                && String::from_utf8_lossy(h.value)
                    .to_ascii_lowercase()
                    .contains("chunked")
        });
        let cl: usize = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .unwrap_or(0);
        buf.drain(..end);
        let mut body = Vec::new();
        if chunked {
            loop {
                let l = line(&mut s, &mut buf).await?;
                let size_txt = String::from_utf8_lossy(&l);
                let size_txt = size_txt.split(';').next().unwrap_or("").trim().to_string();
                let size = usize::from_str_radix(&size_txt, 16).ok()?;
                if size == 0 {
                    while !line(&mut s, &mut buf).await?.is_empty() {}
                    break;
                }
                while buf.len() < size + 2 {
                    fill(&mut s, &mut buf).await?;
                }
                body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
            }
        } else {
            while buf.len() < cl {
                fill(&mut s, &mut buf).await?;
            }
            body.extend_from_slice(&buf[..cl]);
            buf.drain(..cl);
        }
        rec.0.lock().unwrap().push(Recorded { head, body });
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .ok()?;
    }
}

/// One response as the client read it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// What came back on one connection.
#[derive(Debug)]
pub struct Exchange {
    pub answers: Vec<Answer>,
    /// The gateway closed the connection.
    pub closed: bool,
    /// Bytes after the last whole answer.
    pub rest: Vec<u8>,
}

/// Parses the whole responses at the start of `buf`.
fn parse_answers(buf: &[u8]) -> (Vec<Answer>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = resp.parse(&buf[at..]) else {
            return (out, at);
        };
        let status = resp.code.unwrap_or(0);
        let cl = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| {
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            });
        let chunked = resp.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("transfer-encoding")
                && h.value.eq_ignore_ascii_case(b"chunked")
        });
        let head = String::from_utf8_lossy(&buf[at..at + n]).into_owned();
        let mut p = at + n;
        let mut body = Vec::new();
        if chunked {
            loop {
                let Some(i) = buf[p..].windows(2).position(|w| w == b"\r\n") else {
                    return (out, at);
                };
                let size =
                    usize::from_str_radix(String::from_utf8_lossy(&buf[p..p + i]).trim(), 16)
                        .unwrap_or(0);
                p += i + 2;
                if size == 0 {
                    if buf.len() < p + 2 {
                        return (out, at);
                    }
                    p += 2;
                    break;
                }
                if buf.len() < p + size + 2 {
                    return (out, at);
                }
                body.extend_from_slice(&buf[p..p + size]);
                p += size + 2;
            }
        } else if let Some(cl) = cl.filter(|_| status >= 200 && status != 204 && status != 304) {
            if buf.len() < p + cl {
                return (out, at);
            }
            body.extend_from_slice(&buf[p..p + cl]);
            p += cl;
        }
        out.push(Answer { status, head, body });
        at = p;
    }
}

/// Writes `request` on a new connection and reads every answer: until the gateway closes,
/// or nothing more came for `quiet` after `want` whole answers, or 5 s in all.
pub async fn exchange(port: u16, request: &[u8], want: usize, quiet: Duration) -> Exchange {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = Vec::new();
    let mut closed = false;
    let mut chunk = [0u8; 16384];
    loop {
        let (answers, _) = parse_answers(&buf);
        let wait = if answers.len() >= want {
            quiet
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(wait, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let (answers, used) = parse_answers(&buf);
    Exchange {
        answers,
        closed,
        rest: buf[used..].to_vec(),
    }
}

/// A connection whose request has been answered (at least its first bytes: the gateway has
/// certainly accepted and counted it), left open for the caller.
pub async fn answered_connection(port: u16, request: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered within 5 s")
        .unwrap();
    assert!(n > 0, "the gateway closed instead of answering");
    s
}
