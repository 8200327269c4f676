//! Upstream failures become 502/503/504 with a JSON body carrying the request id, quickly and
//! never as a hang; malformed or hostile requests get a 4xx.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn gateway(port: u16, upstreams: &str, routes: &str) -> Gatehouse {
    Gatehouse::start(
        &format!(
            "[server]\nthreads = 1\nplugins = [\"rid\"]\n[plugins.rid]\nkind = \"request_id\"\n\
             {upstreams}\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n{routes}"
        ),
        &[port],
    )
}

async fn expect_error(url: &str, status: u16, within: Duration) -> Value {
    let start = Instant::now();
    let r = client()
        .get(url)
        .send()
        .await
        .expect("response, not a hang");
    let took = start.elapsed();
    assert_eq!(r.status(), status);
    assert!(took < within, "{url}: took {took:?}");
    assert_eq!(r.headers()["content-type"], "application/json");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert_eq!(body["request_id"], id.as_str(), "{body}");
    body
}

#[tokio::test]
async fn refused_reset_empty_and_slow_upstreams() {
    let refused = free_port();
    // Accepts, reads the request, then closes without answering.
    let reset = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut s = s;
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                drop(s);
            }
        });
        addr
    };
    let slow = serve(|_req| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        hyper::Response::new(full("late"))
    })
    .await;
    let port = free_port();
    let _g = gateway(
        port,
        &format!(
            "[upstreams.refused]\npeers = [\"127.0.0.1:{refused}\"]\n\
             [upstreams.reset]\npeers = [\"{reset}\"]\n\
             [upstreams.empty]\npeers = []\n\
             [upstreams.slow]\npeers = [\"{slow}\"]\nread_timeout = \"300ms\"\n"
        ),
        "[[routes]]\npath = \"/refused\"\nupstream = \"refused\"\n\
         [[routes]]\npath = \"/reset\"\nupstream = \"reset\"\n\
         [[routes]]\npath = \"/empty\"\nupstream = \"empty\"\n\
         [[routes]]\npath = \"/slow\"\nupstream = \"slow\"\n",
    );
    let base = format!("http://127.0.0.1:{port}");
    let b = expect_error(&format!("{base}/refused"), 502, Duration::from_secs(2)).await;
    assert_eq!(b["error"], "upstream connection failed");
    expect_error(&format!("{base}/reset"), 502, Duration::from_secs(2)).await;
    let b = expect_error(&format!("{base}/empty"), 503, Duration::from_secs(1)).await;
    assert_eq!(b["error"], "no upstream peer available");
    let start = Instant::now();
    let b = expect_error(&format!("{base}/slow"), 504, Duration::from_secs(3)).await;
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "read_timeout honoured"
    );
    assert_eq!(b["error"], "upstream timed out");
}

#[tokio::test]
async fn connect_timeout_gives_504() {
    // A listener with a backlog of 1 that never accepts: once its queue is full the kernel
    // drops further SYNs, so a new connection can only time out.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(1).unwrap();
    let addr = l.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let port = free_port();
    let _g = gateway(
        port,
        &format!("[upstreams.u]\npeers = [\"{addr}\"]\nconnect_timeout = \"300ms\"\nread_timeout = \"10s\"\n"),
        "[[routes]]\nupstream = \"u\"\n",
    );
    let start = Instant::now();
    let r = client()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "connect_timeout honoured: {:?}",
        start.elapsed()
    );
    drop(l);
}

fn raw(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && !request.ends_with(b"\r\n\r\n\r\n") {
                    // enough for a status line; keep reading a moment for the body
                    s.set_read_timeout(Some(Duration::from_millis(300)))
                        .unwrap();
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// Multi-threaded: the raw socket reads below block, and the upstream runs on this runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_hostile_requests() {
    let up = echo("u").await;
    let port = free_port();
    let _g = gateway(
        port,
        &format!("[upstreams.u]\npeers = [\"{up}\"]\n"),
        "[[routes]]\npath = \"/public\"\nupstream = \"u\"\n[[routes]]\npath = \"= /admin\"\nupstream = \"u\"\nmethods = [\"DELETE\"]\n",
    );
    // Dot segments are resolved before routing: this is /admin, which only takes DELETE.
    let r = raw(
        port,
        b"GET /public/../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    // Half-encoded dot segments too: an upstream that decodes %2e would see /admin.
    for path in ["/public/.%2e/admin", "/public/%2E./admin"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let r = raw(port, req.as_bytes());
        assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
    }
    let r = raw(
        port,
        b"GET /public/./a/../b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("\"path\":\"/public/b\""), "{r}");
    // Garbage is a 400, and the gateway keeps serving.
    let r = raw(port, b"THIS IS NOT HTTP\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = raw(
        port,
        b"GET /public HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    );
    assert!(
        r.starts_with("HTTP/1.1 400"),
        "conflicting lengths refused: {r}"
    );
    let r = raw(
        port,
        b"GET /public HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200"), "still serving: {r}");
}
