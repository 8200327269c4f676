//! A client's fault is never the upstream's: bodies over a limit, refused requests and clients
//! that leave do not eject a peer, trip the breaker or spend the retry budget; and a half-open
//! breaker's probe is decided by its response head, or replaced when it gives no verdict.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw_status(port: u16, request: &[u8]) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(request).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_faults_do_not_eject_trip_or_retry() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    // Reads whole bodies slowly enough that a client can leave mid-request.
    let up = serve(move |req: hyper::Request<hyper::body::Incoming>| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Relaxed);
            let _ = req.into_body().collect().await;
            if h.load(Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            hyper::Response::new(full("ok"))
        }
    })
    .await;
    let (port, admin) = (free_port(), free_port());
    let _g = Gatehouse::start(
        &format!(
            "[server]\nthreads = 2\nadmin = \"127.0.0.1:{admin}\"\n\
             [plugins.limit]\nkind = \"request_limit\"\nmax_body = \"16\"\n\
             [upstreams.pool]\npeers = [\"{up}\"]\nretries = 1\n\
             passive_health = {{ failures = 2, eject_for = \"30s\" }}\n\
             circuit_breaker = {{ failures = 2, open_for = \"30s\" }}\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\nupstream = \"pool\"\nplugins = [\"limit\"]\n"
        ),
        &[port, admin],
    );
    // Chunked bodies over max_body: cut at the limit, 413, five times over.
    let big = format!(
        "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n{}\r\n0\r\n\r\n",
        "x".repeat(64)
    );
    for _ in 0..5 {
        assert_eq!(raw_status(port, big.as_bytes()).await, Some(413));
    }
    // Declared too large: refused before the upstream.
    let declared = "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n";
    for _ in 0..3 {
        assert_eq!(raw_status(port, declared.as_bytes()).await, Some(413));
    }
    // Malformed requests.
    for _ in 0..3 {
        assert_eq!(
            raw_status(port, b"GET /a%2fb HTTP/1.1\r\nHost: a\r\n\r\n").await,
            Some(400)
        );
    }
    // Clients that leave mid-body, and mid-response.
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let status = admin_status(admin).await;
    let pool = &status["upstreams"]["pool"];
    assert_eq!(pool["circuit"], "closed", "{status}");
    assert_eq!(pool["peers"][0]["ejected"], false, "{status}");
    let r = client()
        .get(format!("http://127.0.0.1:{port}/after"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the upstream still serves everyone");
    let log = _g.log();
    assert!(!log.contains("ejected"), "{log}");
    assert!(!log.contains("circuit opened"), "{log}");
    assert!(
        !log.contains("ERROR"),
        "client faults are not error-level log lines:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_is_decided_by_its_head_or_replaced() {
    let up = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        match req.uri().path() {
            "/fail" => hyper::Response::builder()
                .status(503)
                .body(full("down"))
                .unwrap(),
            "/stream" => {
                // An event stream that stays open far longer than the test.
                let events = futures_util::stream::unfold(0u32, |i| async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    let ev = Bytes::from(format!("data: {i}\n\n"));
                    Some((Ok::<_, std::io::Error>(Frame::data(ev)), i + 1))
                });
                hyper::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(BodyExt::boxed(StreamBody::new(events)))
                    .unwrap()
            }
            "/hang" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                hyper::Response::new(full("late"))
            }
            _ => hyper::Response::new(full("ok")),
        }
    })
    .await;
    let (port, admin) = (free_port(), free_port());
    let _g = Gatehouse::start(
        &format!(
            "[server]\nthreads = 2\nadmin = \"127.0.0.1:{admin}\"\n\
             [upstreams.pool]\npeers = [\"{up}\"]\n\
             circuit_breaker = {{ failures = 1, open_for = \"300ms\", probe_timeout = \"600ms\" }}\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n[[routes]]\nupstream = \"pool\"\n"
        ),
        &[port, admin],
    );
    let base = format!("http://127.0.0.1:{port}");
    let circuit = || async { admin_status(admin).await["upstreams"]["pool"]["circuit"].clone() };
    let c = client();
    assert_eq!(
        c.get(format!("{base}/fail")).send().await.unwrap().status(),
        503
    );
    assert_eq!(circuit().await, "open");

    // The probe is an event stream: its 200 head closes the circuit while it still streams.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let stream = c.get(format!("{base}/stream")).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(circuit().await, "closed");
    assert_eq!(
        c.get(format!("{base}/ok")).send().await.unwrap().status(),
        200
    );
    drop(stream);

    // A probe that never answers holds the slot only for probe_timeout.
    assert_eq!(
        c.get(format!("{base}/fail")).send().await.unwrap().status(),
        503
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let hang = tokio::spawn({
        let (c, base) = (c.clone(), base.clone());
        async move { c.get(format!("{base}/hang")).send().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = c.get(format!("{base}/ok")).send().await.unwrap();
    assert_eq!(r.status(), 503, "one probe at a time");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        c.get(format!("{base}/ok")).send().await.unwrap().status(),
        200
    );
    assert_eq!(circuit().await, "closed");
    hang.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_an_upstream_timeout_and_errors_name_no_peer() {
    let up = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        let n = req
            .into_body()
            .collect()
            .await
            .map_or(0, |b| b.to_bytes().len());
        hyper::Response::new(full(n.to_string()))
    })
    .await;
    let (port, admin) = (free_port(), free_port());
    let _g = Gatehouse::start(
        &format!(
            "[server]\nthreads = 1\nadmin = \"127.0.0.1:{admin}\"\nbody_timeout = \"5s\"\n\
             [plugins.limit]\nkind = \"request_limit\"\nmax_body = \"16\"\n\
             [upstreams.pool]\npeers = [\"{up}\"]\nread_timeout = \"300ms\"\n\
             passive_health = {{ failures = 1, eject_for = \"30s\" }}\n\
             circuit_breaker = {{ failures = 1, open_for = \"30s\" }}\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/limited\"\nupstream = \"pool\"\nplugins = [\"limit\"]\n\
             [[routes]]\nupstream = \"pool\"\n"
        ),
        &[port, admin],
    );
    // The upstream waits for a body the client sends slowly, past its read_timeout.
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let _ = s.write_all(b"def").await;
        let mut buf = vec![0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
    }
    let status = admin_status(admin).await;
    let pool = &status["upstreams"]["pool"];
    assert_eq!(pool["circuit"], "closed", "{status}");
    assert_eq!(pool["peers"][0]["ejected"], false, "{status}");

    // A chunked body cut at the limit: the client's error names no upstream address.
    let big = format!(
        "POST /limited HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n{}\r\n0\r\n\r\n",
        "x".repeat(64)
    );
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(big.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        !text.contains("Peer") && !text.contains(&up.to_string()),
        "{text}"
    );
}
