//! `request_buffering`: a body up to the route's size is read and checked before anything goes
//! upstream; larger ones, and routes with it off, stream. Against an upstream on raw sockets
//! that counts every connection and byte it gets.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::h2raw::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the upstream got: connections, bytes, and the bodies of whole requests.
#[derive(Default)]
struct Got {
    conns: AtomicUsize,
    bytes: AtomicUsize,
    bodies: Mutex<Vec<Vec<u8>>>,
}

/// An HTTP/1.1 upstream that reads each request whole (Content-Length or chunked) and answers
/// 200 with the body's length.
async fn upstream(got: Arc<Got>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            got.conns.fetch_add(1, Relaxed);
            let got = got.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16384];
                loop {
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                got.bytes.fetch_add(n, Relaxed);
                                buf.extend_from_slice(&chunk[..n]);
                            }
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    buf.drain(..head_end);
                    let chunked = head.contains("transfer-encoding: chunked");
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    let body;
                    loop {
                        if chunked {
                            // Decode what is there; done at the last chunk.
                            let mut p = 0;
                            let mut out = Vec::new();
                            let mut done = None;
                            while let Some(i) = buf[p..].windows(2).position(|w| w == b"\r\n") {
                                let size = usize::from_str_radix(
                                    std::str::from_utf8(&buf[p..p + i]).unwrap().trim(),
                                    16,
                                )
                                .unwrap();
                                if size == 0 {
                                    if buf.len() >= p + i + 4 {
                                        done = Some(p + i + 4);
                                    }
                                    break;
                                }
                                if buf.len() < p + i + 2 + size + 2 {
                                    break;
                                }
                                out.extend_from_slice(&buf[p + i + 2..p + i + 2 + size]);
                                p += i + 2 + size + 2;
                            }
                            if let Some(end) = done {
                                buf.drain(..end);
                                body = out;
                                break;
                            }
                        } else if buf.len() >= length {
                            body = buf.drain(..length).collect();
                            break;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                got.bytes.fetch_add(n, Relaxed);
                                buf.extend_from_slice(&chunk[..n]);
                            }
                        }
                    }
                    let answer = format!("{}", body.len());
                    got.bodies.lock().unwrap().push(body);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn gateway(port: u16, up: std::net::SocketAddr) -> Gatehouse {
    Gatehouse::start(
        &format!(
            "[server]\nthreads = 2\n[upstreams.u]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\nh2c = true\n\
             [[routes]]\npath = \"/stream\"\nupstream = \"u\"\nrequest_buffering = \"0\"\n\
             [[routes]]\nupstream = \"u\"\n"
        ),
        &[port],
    )
}

/// Sends `pieces` `gap` apart on one connection; the status of the answer (0: none, closed).
async fn send_pieces(port: u16, pieces: &[&[u8]], gap: Duration) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for p in pieces {
        if s.write_all(p).await.is_err() {
            break;
        }
        tokio::time::sleep(gap).await;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_body_never_reaches_the_upstream_not_even_its_head() {
    let got = Arc::new(Got::default());
    let up = upstream(got.clone()).await;
    let port = free_port();
    let _g = gateway(port, up);
    let head: &[u8] = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    // In one piece, and in pieces 200 ms apart (the head alone first).
    for gap in [Duration::ZERO, Duration::from_millis(200)] {
        for bad in [
            &b"5\r\nhello\r\n5x\r\nhello\r\n0\r\n\r\n"[..],
            b"2\r\nhello\r\n0\r\n\r\n",
        ] {
            let status = send_pieces(port, &[head, &bad[..4], &bad[4..]], gap).await;
            assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(bad));
        }
    }
    // HTTP/2: DATA that disagrees with content-length.
    let mut c = Raw::connect(port, &[]).await;
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "localhost"),
        (":path", "/upload"),
        ("content-length", "10"),
    ];
    c.send(&frame(HEADERS, END_HEADERS, 1, &block(&fields)))
        .await;
    c.send(&frame(DATA, END_STREAM, 1, b"hello")).await;
    fields[4].1 = "2";
    c.send(&frame(HEADERS, END_HEADERS, 3, &block(&fields)))
        .await;
    c.send(&frame(DATA, 0, 3, b"he")).await;
    c.send(&frame(DATA, END_STREAM, 3, b"llo")).await;
    c.read_until(Duration::from_secs(3), |s| {
        [1, 3]
            .iter()
            .all(|id| s.resets.iter().any(|r| r.0 == *id) || s.answered.contains(id))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(got.conns.load(Relaxed), 0, "the upstream was connected to");
    assert_eq!(got.bytes.load(Relaxed), 0);
    // Streamed (`request_buffering = "0"`), the head is upstream before the body is bad.
    let status = send_pieces(
        port,
        &[
            b"POST /stream HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"5x\r\nhello\r\n0\r\n\r\n",
        ],
        Duration::from_millis(200),
    )
    .await;
    assert!(status == 400 || status == 0, "{status}");
    assert!(got.bytes.load(Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_any_size_arrive_whole() {
    let got = Arc::new(Got::default());
    let up = upstream(got.clone()).await;
    let port = free_port();
    let _g = gateway(port, up);
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    // Chunked in pieces of 1 KiB, 7 KiB and 40 KiB, up to and past the buffer; with a
    // Content-Length under and over it; on the buffered route and the streaming one.
    for path in ["/upload", "/stream"] {
        for size in [100, 60_000, 65_536, 70_000, 200_000] {
            for piece in [1024, 7 * 1024, 40 * 1024] {
                let head = format!(
                    "POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                );
                let wire = chunked(&body[..size], piece);
                let parts: Vec<&[u8]> = std::iter::once(head.as_bytes())
                    .chain(wire.chunks(8 * 1024))
                    .collect();
                let status = send_pieces(port, &parts, Duration::from_millis(2)).await;
                assert_eq!(status, 200, "{path} chunked {size} in {piece}");
                let last = got.bodies.lock().unwrap().pop().unwrap();
                assert!(
                    last == body[..size],
                    "{path} chunked {size} in {piece}: {}",
                    last.len()
                );
            }
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
            );
            let status = send_pieces(port, &[head.as_bytes(), &body[..size]], Duration::ZERO).await;
            assert_eq!(status, 200, "{path} length {size}");
            let last = got.bodies.lock().unwrap().pop().unwrap();
            assert!(last == body[..size], "{path} length {size}");
        }
    }
    // HTTP/2, with and without content-length.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    for size in [100, 40_000, 65_536, 200_000] {
        for with_length in [true, false] {
            let mut req = http::Request::builder()
                .method("POST")
                .uri("http://localhost/upload");
            if with_length {
                req = req.header("content-length", size.to_string());
            }
            let mut ready = send.clone().ready().await.unwrap();
            let (resp, mut out) = ready.send_request(req.body(()).unwrap(), false).unwrap();
            let data = bytes::Bytes::copy_from_slice(&body[..size]);
            tokio::spawn(async move {
                let mut rest = data;
                while !rest.is_empty() {
                    out.reserve_capacity(rest.len());
                    let Some(Ok(n)) =
                        futures_util::future::poll_fn(|cx| out.poll_capacity(cx)).await
                    else {
                        return;
                    };
                    let piece = rest.split_to(n.min(rest.len()));
                    out.send_data(piece, rest.is_empty()).unwrap();
                }
            });
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 200, "h2 {size} {with_length}");
            let last = got.bodies.lock().unwrap().pop().unwrap();
            assert!(
                last == body[..size],
                "h2 {size} {with_length}: {}",
                last.len()
            );
        }
    }
}

#[test]
fn check_refuses_more_than_the_retry_buffer() {
    let (code, out, _, _dir) = check(
        "[upstreams.u]\npeers = [\"127.0.0.1:1\"]\n[gateways.g]\nlisten = [\"127.0.0.1:1\"]\n\
         [[routes]]\nupstream = \"u\"\nrequest_buffering = \"1MiB\"\n",
    );
    assert_ne!(code, 0);
    assert!(
        out.contains(":7:") && out.contains("`request_buffering` is at most \"64KiB\""),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_expects_100_continue_is_not_held() {
    let got = Arc::new(Got::default());
    let up = upstream(got.clone()).await;
    let port = free_port();
    let _g = gateway(port, up);
    // The head goes upstream at once: the upstream decides whether the body comes.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(got.bytes.load(Relaxed) > 0, "the head is upstream");
    s.write_all(b"hello").await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
}
