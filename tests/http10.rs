//! HTTP/1.0 clients: answers framed as they can read them (no chunks, no interim answers, no
//! encoding without a length; a body of unknown length ends with the connection), and their
//! requests sent upstream as HTTP/1.1, with a Host when they had none, on pooled connections.
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream saw: connections accepted and the head of each request.
#[derive(Clone, Default)]
struct Seen {
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

const LEN: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
const CHUNKED: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
const EARLY: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
/// 3 KB of JSON, long enough for the compressing route.
fn json() -> Vec<u8> {
    let body = format!("[{}0]", "1234567890,".repeat(300));
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// An upstream speaking raw HTTP/1.x: keeps a connection for as long as the requests on it
/// are HTTP/1.1 and ask for nothing else; `/close` answers HTTP/1.0-style, without a length,
/// and ends the connection.
async fn upstream(seen: Seen) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            seen.connections.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < end + len {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[end..end + len]).into_owned();
                    buf.drain(..end + len);
                    seen.heads.lock().unwrap().push(format!("{head}{body}"));
                    let path = head.split(' ').nth(1).unwrap_or("");
                    let mut answer: Vec<u8> = match path {
                        "/chunked" => CHUNKED.to_vec(),
                        "/early" => EARLY.to_vec(),
                        "/z/json" => json(),
                        "/close" => {
                            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil the end").await;
                            return;
                        }
                        _ => LEN.to_vec(),
                    };
                    if head.starts_with("HEAD ") {
                        let end = answer
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .unwrap_or(0);
                        answer.truncate(end + 4);
                    }
                    if s.write_all(&answer).await.is_err() || !head.contains(" HTTP/1.1\r\n") {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn config(up: SocketAddr, port: u16) -> String {
    format!(
        r#"
[upstreams.u]
peers = ["{up}"]
[gateways.g]
listen = ["127.0.0.1:{port}"]
[[routes]]
path = "/z"
upstream = "u"
compression = {{ algorithms = ["gzip"], min_size = "10", types = ["application/json"] }}
[[routes]]
upstream = "u"
"#
    )
}

/// Writes `req` on a new connection and reads until the gateway closes it (or 3 s pass,
/// reported as `closed == false`).
async fn read_all(port: u16, req: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[tokio::test]
async fn http10_clients_get_answers_they_can_read() {
    let seen = Seen::default();
    let up = upstream(seen.clone()).await;
    let port = free_port();
    let _gw = Gatehouse::start(&config(up, port), &[port]);

    // A chunked answer, to a client asking to keep the connection: no chunks reach it, and
    // the body ends with the connection, which the answer says.
    let (a, closed) = read_all(
        port,
        b"GET /chunked HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    assert!(closed, "the connection must end the body: {a:?}");
    assert_eq!(header(&a, "transfer-encoding"), None, "{a:?}");
    assert_eq!(header(&a, "connection"), Some("close"), "{a:?}");
    assert_eq!(body(&a), "hello world");

    // An HTTP/1.0-style upstream answer without a length: not turned into chunks either.
    let (a, closed) = read_all(port, b"GET /close HTTP/1.0\r\nHost: a.test\r\n\r\n").await;
    assert!(closed);
    assert_eq!(header(&a, "transfer-encoding"), None, "{a:?}");
    assert_eq!(body(&a), "until the end");

    // A HEAD of a chunked answer: no Transfer-Encoding in the head either.
    let (a, _) = read_all(port, b"HEAD /chunked HTTP/1.0\r\nHost: a.test\r\n\r\n").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a:?}");
    assert_eq!(header(&a, "transfer-encoding"), None, "{a:?}");
    assert_eq!(body(&a), "");

    // 103 Early Hints is not relayed: the client reads one answer, the final one.
    let (a, _) = read_all(port, b"GET /early HTTP/1.0\r\nHost: a.test\r\n\r\n").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a:?}");
    assert!(!a.contains("103"), "{a:?}");
    assert_eq!(body(&a), "ok");

    // A compressing route answers an HTTP/1.0 client in the identity form, with its length.
    let (a, _) = read_all(
        port,
        b"GET /z/json HTTP/1.0\r\nHost: a.test\r\nAccept-Encoding: gzip\r\n\r\n",
    )
    .await;
    assert_eq!(header(&a, "content-encoding"), None, "{a:?}");
    assert_eq!(header(&a, "transfer-encoding"), None, "{a:?}");
    let len: usize = header(&a, "content-length").unwrap().parse().unwrap();
    assert_eq!(body(&a).len(), len);
    // ...while an HTTP/1.1 client still gets gzip.
    let (a, _) = read_all(
        port,
        b"GET /z/json HTTP/1.1\r\nHost: a.test\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(header(&a, "content-encoding"), Some("gzip"), "{a:?}");

    // HTTP/1.1 clients still get the upstream's chunks, on a connection kept open.
    let (a, closed) = read_all(port, b"GET /chunked HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert!(!closed, "an HTTP/1.1 connection stays open: {a:?}");
    assert_eq!(header(&a, "transfer-encoding"), Some("chunked"), "{a:?}");
}

#[tokio::test]
async fn http10_requests_reuse_upstream_connections() {
    let seen = Seen::default();
    let up = upstream(seen.clone()).await;
    let port = free_port();
    let _gw = Gatehouse::start(&config(up, port), &[port]);

    // Five HTTP/1.0 clients one after another, each on its own connection.
    for i in 0..5 {
        let (a, closed) = read_all(port, b"GET /len HTTP/1.0\r\nHost: a.test\r\n\r\n").await;
        assert!(
            closed,
            "HTTP/1.0 without keep-alive: closed after the answer"
        );
        assert!(a.starts_with("HTTP/1.1 200"), "{i}: {a:?}");
        assert_eq!(header(&a, "content-length"), Some("5"));
        assert_eq!(body(&a), "hello");
    }
    // A keep-alive HTTP/1.0 client with a length-framed answer keeps its connection.
    let (a, closed) = read_all(
        port,
        b"GET /len HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    assert!(!closed, "{a:?}");
    assert_eq!(header(&a, "connection"), Some("keep-alive"), "{a:?}");
    // No Host at all (HTTP/1.0 allows it): the upstream, asked in HTTP/1.1, gets the peer's
    // name, as from nginx.
    let (a, _) = read_all(port, b"GET /len HTTP/1.0\r\n\r\n").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a:?}");
    assert_eq!(body(&a), "hello");
    // A body with its length goes up too.
    let (a, _) = read_all(
        port,
        b"POST /len HTTP/1.0\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nping",
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a:?}");

    let heads = seen.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 8, "{heads:?}");
    for h in &heads {
        assert!(
            h.contains(" HTTP/1.1\r\n"),
            "sent upstream as HTTP/1.1: {h:?}"
        );
        assert!(h.to_ascii_lowercase().contains("\r\nhost: "), "{h:?}");
        assert!(!h.to_ascii_lowercase().contains("keep-alive"), "{h:?}");
    }
    assert!(
        heads[6]
            .to_ascii_lowercase()
            .contains(&format!("\r\nhost: {up}\r\n")),
        "{:?}",
        heads[6]
    );
    assert!(heads[7].ends_with("\r\n\r\nping"), "{:?}", heads[7]);
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "one pooled upstream connection for all of them"
    );
}
