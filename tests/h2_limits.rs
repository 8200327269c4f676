//! HTTP/2 from clients, bounded as HTTP/1 is: each limit and each known flood, driven by a
//! client that writes raw frames (tests/common/h2raw.rs) or by the h2 crate's client, against
//! a real gateway (h2c, and TLS where it differs) and real upstreams.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::h2raw::*;
use common::*;

/// A gateway with `h2c = true` (or `h2c_mode`) on `port`, admin on `admin`, in front of `up`.
fn gateway(port: u16, admin: u16, up: std::net::SocketAddr, server: &str, h2c: &str) -> Gatehouse {
    Gatehouse::start(
        &format!(
            "[server]\nthreads = 2\nadmin = \"127.0.0.1:{admin}\"\n{server}\n\
             [upstreams.u]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\nh2c = {h2c}\n\
             [[routes]]\nupstream = \"u\"\n"
        ),
        &[port, admin],
    )
}

/// The value of `gatehouse_client_cuts_total{gateway="g",reason}`.
async fn cuts(admin: u16, reason: &str) -> u64 {
    let text = metrics_text(admin).await;
    let want = format!("gatehouse_client_cuts_total{{gateway=\"g\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn h2_client(port: u16) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driver)
}

async fn get(
    send: &mut h2::client::SendRequest<Bytes>,
    headers: &[(&str, String)],
) -> Result<u16, h2::Error> {
    let mut req = http::Request::builder().uri("http://localhost/");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let mut ready = send.clone().ready().await?;
    let (resp, _) = ready.send_request(req.body(()).unwrap(), true)?;
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_must_be_complete_within_header_timeout() {
    let up = echo("u").await;
    let (port, admin) = (free_port(), free_port());
    let g = gateway(port, admin, up, "header_timeout = \"1s\"", "true");
    let head = request("GET", "/");
    // A HEADERS frame whose payload comes a byte every 100 ms.
    let slow_frame = tokio::spawn(async move {
        let mut c = Raw::connect(port, &[]).await;
        c.answer = false;
        let f = frame(HEADERS, END_STREAM | END_HEADERS, 1, &head);
        c.send(&f[..9]).await;
        for b in &f[9..] {
            if !c.send(&[*b]).await || c.read_for(Duration::from_millis(100)).await {
                break;
            }
        }
        c.read_for(Duration::from_secs(3)).await;
        c.seen
    });
    // HEADERS without END_HEADERS, then a CONTINUATION every 400 ms, never the last (h2
    // allows a few CONTINUATIONs per block: the slow ones must be cut by the clock first).
    let head = request("GET", "/");
    let continuations = tokio::spawn(async move {
        let mut c = Raw::connect(port, &[]).await;
        c.send(&frame(HEADERS, END_STREAM, 3, &head)).await;
        let pad = block(&[("x-pad", "a")]);
        c.answer = false;
        for _ in 0..10 {
            if !c.send(&frame(CONTINUATION, 0, 3, &pad)).await
                || c.read_for(Duration::from_millis(400)).await
            {
                break;
            }
        }
        c.read_for(Duration::from_secs(3)).await;
        c.seen
    });
    // Meanwhile, a normal client is served at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut send, _d) = h2_client(port).await;
    let t = Instant::now();
    assert_eq!(get(&mut send, &[]).await.unwrap(), 200);
    assert!(t.elapsed() < Duration::from_millis(500));
    for seen in [slow_frame.await.unwrap(), continuations.await.unwrap()] {
        let after = seen
            .closed_after
            .expect("the gateway closed the connection");
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
            "closed after {after:?}: {}",
            g.log()
        );
        assert!(seen.answered.is_empty(), "{seen:?}");
        assert_eq!(seen.goaway, Some(NO_ERROR), "{seen:?}");
    }
    assert_eq!(cuts(admin, "header_timeout").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_reset_at_body_timeout() {
    // Answers once it has the whole body.
    let up = serve(|req: http::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let got = req.into_body().collect().await.map(|b| b.to_bytes().len());
        http::Response::new(full(format!("{got:?}")))
    })
    .await;
    let (port, admin) = (free_port(), free_port());
    let _g = gateway(port, admin, up, "body_timeout = \"1s\"", "true");
    let (mut send, _d) = h2_client(port).await;
    let req = http::Request::builder()
        .method("POST")
        .uri("http://localhost/upload")
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, mut body) = ready.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"first piece"), false)
        .unwrap();
    // ... and nothing more.
    let t = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("the stream ended")
        .expect_err("the stream was reset");
    assert!(
        t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_millis(3000),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(err.reason(), Some(h2::Reason::CANCEL), "{err}");
    // The connection itself goes on.
    assert_eq!(get(&mut send, &[]).await.unwrap(), 200);
    // A body that keeps moving, however slowly, is not cut.
    let req = http::Request::builder()
        .method("POST")
        .uri("http://localhost/upload")
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, mut body) = ready.send_request(req, false).unwrap();
    for _ in 0..4 {
        body.send_data(Bytes::from_static(b"piece"), false).unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    body.send_data(Bytes::from_static(b"end"), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    assert_eq!(cuts(admin, "body_timeout").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_size_request_count_and_stream_limits_hold() {
    let up = echo("u").await;
    let (port, admin) = (free_port(), free_port());
    let _g = gateway(
        port,
        admin,
        up,
        "max_header_size = \"4KiB\"\nmax_requests_per_connection = 5\nh2_max_concurrent_streams = 4",
        "true",
    );
    // The decoded header list: 2 KiB passes, 8 KiB gets h2's 431.
    let (mut send, _d) = h2_client(port).await;
    assert_eq!(
        get(&mut send, &[("x-big", "a".repeat(2048))])
            .await
            .unwrap(),
        200
    );
    assert_eq!(
        get(&mut send, &[("x-big", "a".repeat(8192))])
            .await
            .unwrap(),
        431
    );
    // Five requests on a connection, then GOAWAY: the sixth and later are refused and the
    // connection ends.
    let (mut send, driver) = h2_client(port).await;
    let mut ok = 0;
    for _ in 0..8 {
        match get(&mut send, &[]).await {
            Ok(200) => ok += 1,
            Ok(s) => panic!("status {s}"),
            Err(_) => break,
        }
    }
    assert_eq!(ok, 5);
    tokio::time::timeout(Duration::from_secs(3), driver)
        .await
        .expect("the connection ended")
        .unwrap();
    // The stream limit is announced, and a fifth open stream is refused.
    let mut c = Raw::connect(port, &[]).await;
    for id in [1u32, 3, 5, 7, 9] {
        c.send(&frame(HEADERS, END_HEADERS, id, &request("POST", "/")))
            .await;
    }
    assert!(
        c.read_until(Duration::from_secs(3), |s| !s.resets.is_empty())
            .await
    );
    assert!(c.seen.settings.contains(&(3, 4)), "{:?}", c.seen.settings);
    assert_eq!(c.seen.resets, vec![(9, REFUSED_STREAM)]);
}

/// Sends `rounds` of `make(stream id)`, reading what comes back between rounds; stops at the
/// gateway's close. What the client saw.
async fn flood(port: u16, rounds: u32, make: impl Fn(u32) -> Vec<u8>) -> (Seen, u32) {
    let mut c = Raw::connect(port, &[]).await;
    // The server's SETTINGS answered first: nothing of ours goes between the flood's frames.
    assert!(
        c.read_until(Duration::from_secs(2), |s| !s.settings.is_empty())
            .await
    );
    c.answer = false;
    let mut sent = 0;
    for i in 0..rounds {
        if !c.send(&make(2 * i + 1)).await {
            break;
        }
        sent += 1;
        if i % 50 == 0 && c.read_for(Duration::from_millis(1)).await {
            break;
        }
    }
    c.read_for(Duration::from_secs(2)).await;
    (c.seen, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_end_in_goaway_at_a_bounded_cost() {
    let hits = Arc::new(AtomicUsize::new(0));
    let up = counting("u", None, hits.clone()).await;
    let (port, admin) = (free_port(), free_port());
    let _g = gateway(port, admin, up.addr, "", "true");
    let calm = |seen: &Seen| seen.goaway == Some(ENHANCE_YOUR_CALM) && seen.closed_after.is_some();

    // Rapid reset (CVE-2023-44487): a request and its reset, over and over.
    let (seen, sent) = flood(port, 5000, |id| {
        let mut b = frame(HEADERS, END_STREAM | END_HEADERS, id, &request("GET", "/"));
        b.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        b
    })
    .await;
    assert!(calm(&seen), "rapid reset: {seen:?}");
    let reached = hits.swap(0, Relaxed);
    eprintln!("rapid reset: {sent} sent, {reached} reached the upstream");
    assert!(
        sent < 5000 && reached <= 150,
        "{sent} sent, {reached} reached"
    );

    // MadeYouReset (CVE-2025-8671): a request, then a frame that makes the server reset it
    // (a WINDOW_UPDATE that overflows the stream's window).
    let (seen, sent) = flood(port, 5000, |id| {
        let mut b = frame(HEADERS, END_STREAM | END_HEADERS, id, &request("GET", "/"));
        b.extend(frame(WINDOW_UPDATE, 0, id, &0x7fff_ffffu32.to_be_bytes()));
        b
    })
    .await;
    assert!(calm(&seen), "MadeYouReset: {seen:?}");
    let reached = hits.swap(0, Relaxed);
    eprintln!("MadeYouReset: {sent} sent, {reached} reached the upstream");
    assert!(
        sent < 5000 && reached <= 200,
        "{sent} sent, {reached} reached"
    );

    // CONTINUATION flood (CVE-2024-27316 and kin): a header block that never ends.
    let (seen, sent) = flood(port, 100_000, |id| {
        if id == 1 {
            frame(HEADERS, 0, 1, &request("GET", "/"))
        } else {
            frame(CONTINUATION, 0, 1, &block(&[("x-a", "b")]))
        }
    })
    .await;
    assert!(
        seen.goaway.is_some() && seen.closed_after.is_some(),
        "CONTINUATION: {seen:?}"
    );
    assert!(sent < 100_000, "CONTINUATION: {sent} frames sent");
    eprintln!("CONTINUATION flood: closed after {sent} frames");

    // SETTINGS, PING and empty DATA floods.
    for (what, make) in [
        (
            "SETTINGS",
            Box::new(|_| frame(SETTINGS, 0, 0, &[])) as Box<dyn Fn(u32) -> Vec<u8>>,
        ),
        ("PING", Box::new(|_| frame(PING, 0, 0, &[0; 8]))),
        (
            "empty DATA",
            Box::new(|id| {
                if id == 1 {
                    frame(HEADERS, END_HEADERS, 1, &request("POST", "/"))
                } else {
                    frame(DATA, 0, 1, &[])
                }
            }),
        ),
    ] {
        let t = Instant::now();
        let (seen, sent) = flood(port, 100_000, make).await;
        eprintln!(
            "{what} flood: closed after {sent} frames, {:?}",
            t.elapsed()
        );
        assert!(calm(&seen), "{what}: {seen:?}");
        assert!(sent < 100_000, "{what}: {sent} frames sent");
    }
    let floods = cuts(admin, "h2_flood").await;
    assert!(floods >= 3, "{floods}\n{}", metrics_text(admin).await);
    // Through all of it, others are served.
    let (mut send, _d) = h2_client(port).await;
    assert_eq!(get(&mut send, &[]).await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_reader_is_let_go_at_send_timeout() {
    let big = Bytes::from(vec![b'x'; 1 << 20]);
    let up = serve(move |_req| {
        let big = big.clone();
        async move { http::Response::new(full(big)) }
    })
    .await;
    let (port, admin) = (free_port(), free_port());
    let _g = gateway(port, admin, up, "send_timeout = \"1s\"", "true");
    // SETTINGS_INITIAL_WINDOW_SIZE = 0, and never a WINDOW_UPDATE.
    let mut c = Raw::connect(port, &[(4, 0)]).await;
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &request("GET", "/big"),
    ))
    .await;
    let t = Instant::now();
    assert!(
        c.read_until(Duration::from_secs(5), |s| !s.resets.is_empty()
            || s.closed_after.is_some())
            .await,
        "{:?}",
        c.seen
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(c.seen.answered, vec![1]);
    assert_eq!(c.seen.data, 0);
    let _ = admin;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_only_listener_answers_http1_with_goaway() {
    let up = echo("u").await;
    let (port, admin) = (free_port(), free_port());
    let _g = gateway(port, admin, up, "", "\"only\"");
    let (mut send, _d) = h2_client(port).await;
    assert_eq!(get(&mut send, &[]).await.unwrap(), 200);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut answer))
        .await
        .expect("the gateway closed")
        .unwrap();
    // GOAWAY, last stream 0, PROTOCOL_ERROR; nothing else.
    assert_eq!(answer, [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    // A value other than true, false or "only" is refused with its line.
    let (code, out, _, _dir) = check(
        "[upstreams.u]\npeers = [\"127.0.0.1:1\"]\n[gateways.g]\nlisten = [\"127.0.0.1:1\"]\n\
         h2c = \"yes\"\n[[routes]]\nupstream = \"u\"\n",
    );
    assert_ne!(code, 0);
    assert!(
        out.contains(":5:") && out.contains("`h2c` is true, false or \"only\""),
        "{out}"
    );
}
