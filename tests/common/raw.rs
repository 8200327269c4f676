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
    /// Every byte of this request as it came over the wire: head, then the body with its
    /// chunk framing.
    pub wire: Vec<u8>,
    /// Which of the upstream's connections it came on, counted from 0.
    pub conn: usize,
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

    /// Bytes that did not parse as a request (what a desync leaves behind).
    pub fn is_junk(&self) -> bool {
        self.body == b"<unparseable>"
    }
}

#[derive(Clone, Default)]
pub struct Records(Arc<Mutex<Vec<Recorded>>>);

impl Records {
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// How the recording upstream answers.
#[derive(Clone, Copy)]
struct Manner {
    /// Before each answer.
    delay: Duration,
    /// The body is the request target (else `ok`), so a client can tell its own answer.
    echo_target: bool,
    /// Bytes that are not a request get `200 junk` and the connection goes on, as a lenient
    /// server would (else: recorded, and the connection closed).
    answer_junk: bool,
}

/// An upstream that records every request and answers each with `200 ok`.
pub async fn recording_upstream() -> (SocketAddr, Records) {
    let manner = Manner {
        delay: Duration::ZERO,
        echo_target: false,
        answer_junk: false,
    };
    recording(manner).await
}

/// A strict and slow HTTP/1.1 upstream: answers each request after `delay` with its target as
/// the body, and bytes that are not a request with `200 junk`, going on after them. Through
/// a shared keep-alive pool, one stray request on a connection hands every later answer on
/// it to the wrong client.
pub async fn strict_slow_upstream(delay: Duration) -> (SocketAddr, Records) {
    let manner = Manner {
        delay,
        echo_target: true,
        answer_junk: true,
    };
    recording(manner).await
}

async fn recording(manner: Manner) -> (SocketAddr, Records) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let records = Records::default();
    let rec = records.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((s, _)) = l.accept().await {
            let rec = rec.clone();
            let conn = n;
            n += 1;
            tokio::spawn(async move {
                let _ = serve_recorded(s, rec, manner, conn).await;
            });
        }
    });
    (addr, records)
}

/// The connection's unread bytes, and what was taken of them for the current request.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    wire: Vec<u8>,
}

impl Conn {
    async fn fill(&mut self) -> Option<()> {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Some(())
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let taken: Vec<u8> = self.buf.drain(..n).collect();
        self.wire.extend_from_slice(&taken);
        taken
    }

    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let mut l = self.take(i + 2);
                l.truncate(i);
                return Some(l);
            }
            self.fill().await?;
        }
    }
}

async fn serve_recorded(s: TcpStream, rec: Records, manner: Manner, conn: usize) -> Option<()> {
    let mut c = Conn {
        s,
        buf: Vec::new(),
        wire: Vec::new(),
    };
    loop {
        let end = loop {
            if let Some(i) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            c.fill().await?;
        };
        let head_bytes = c.take(end);
        let head = String::from_utf8_lossy(&head_bytes).into_owned();
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&head_bytes), Ok(httparse::Status::Complete(_))) {
            rec.0.lock().unwrap().push(Recorded {
                head,
                body: b"<unparseable>".to_vec(),
                wire: std::mem::take(&mut c.wire),
                conn,
            });
            if !manner.answer_junk {
                return None;
            }
            tokio::time::sleep(manner.delay).await;
            c.s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\njunk")
                .await
                .ok()?;
            continue;
        }
        let target = req.path.unwrap_or("").to_string();
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
        let mut body = Vec::new();
        if chunked {
            loop {
                let l = c.line().await?;
                let size_txt = String::from_utf8_lossy(&l);
                let size_txt = size_txt.split(';').next().unwrap_or("").trim().to_string();
                let size = usize::from_str_radix(&size_txt, 16).ok()?;
                if size == 0 {
                    while !c.line().await?.is_empty() {}
                    break;
                }
                while c.buf.len() < size + 2 {
                    c.fill().await?;
                }
                body.extend_from_slice(&c.take(size + 2)[..size]);
            }
        } else {
            while c.buf.len() < cl {
                c.fill().await?;
            }
            body = c.take(cl);
        }
        rec.0.lock().unwrap().push(Recorded {
            head,
            body,
            wire: std::mem::take(&mut c.wire),
            conn,
        });
        tokio::time::sleep(manner.delay).await;
        let answer = if manner.echo_target {
            target
        } else {
            "ok".to_string()
        };
        let out = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        c.s.write_all(out.as_bytes()).await.ok()?;
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
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    exchange_on(s, request, want, quiet).await
}

/// As [`exchange`], from the loopback address `from` (127.0.0.2 is another client than
/// 127.0.0.1: trusted as a proxy or not).
pub async fn exchange_from(
    from: std::net::Ipv4Addr,
    port: u16,
    request: &[u8],
    want: usize,
    quiet: Duration,
) -> Exchange {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((from, 0))).unwrap();
    let s = sock
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    exchange_on(s, request, want, quiet).await
}

async fn exchange_on(mut s: TcpStream, request: &[u8], want: usize, quiet: Duration) -> Exchange {
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
