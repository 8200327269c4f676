//! Slow and greedy clients, bounded: a trickled request head is cut at `header_timeout` while
//! everyone else is served; idle, stalled and non-reading clients are closed by their
//! timeouts; connections, requests per connection and header fields are capped.
mod common;

use std::time::{Duration, Instant};

use common::raw::exchange;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn gateway(port: u16, up: std::net::SocketAddr, server: &str) -> Gatehouse {
    Gatehouse::start(
        &format!(
            "[server]\nthreads = 2\n{server}\n[upstreams.u]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n[[routes]]\nupstream = \"u\"\n"
        ),
        &[port],
    )
}

/// Sends `req` a byte at a time, `gap` apart; how long until the gateway hung up (None if it
/// answered instead, or the whole head went out).
async fn trickle(port: u16, req: &'static [u8], gap: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let opened = Instant::now();
    let mut buf = [0u8; 64];
    for &b in req {
        if s.write_all(&[b]).await.is_err() {
            return Some(opened.elapsed());
        }
        match tokio::time::timeout(gap, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(opened.elapsed()),
            Ok(Ok(_)) => return None,
            Err(_) => {}
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_header_timeout_while_others_are_served() {
    let up = echo("u").await;
    let port = free_port();
    let _g = gateway(port, up, "header_timeout = \"2s\"");
    const REQ: &[u8] =
        b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: slowloris/1.0\r\nX-Pad: aaaaaaaaaa\r\n\r\n";
    let tasks: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(trickle(port, REQ, Duration::from_millis(300))))
        .collect();
    // While a thousand connections trickle, a normal client is answered at once.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for _ in 0..3 {
        let t = Instant::now();
        let r = client()
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    let mut cut = Vec::new();
    for t in tasks {
        cut.push(t.await.unwrap());
    }
    let times: Vec<Duration> = cut.iter().flatten().copied().collect();
    assert_eq!(times.len(), 1000, "every trickler was cut: {cut:?}");
    let (min, max) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    eprintln!("1000 trickling connections cut after {min:?} to {max:?}");
    assert!(*min >= Duration::from_millis(1900), "{min:?}");
    assert!(*max < Duration::from_secs(4), "{max:?}");
    let log = _g.log();
    assert!(
        !log.contains("ERROR"),
        "no error line per connection:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stalled_and_non_reading_clients_are_closed() {
    let up = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/big" {
            // 32 MiB: far more than the socket buffers between us and the client.
            return hyper::Response::new(full(vec![b'x'; 32 << 20]));
        }
        // Whole bodies first, as most applications read them.
        let n = http_body_util::BodyExt::collect(req.into_body())
            .await
            .map_or(0, |b| b.to_bytes().len());
        hyper::Response::new(full(n.to_string()))
    })
    .await;
    let (port, admin) = (free_port(), free_port());
    let _g = gateway(
        port,
        up,
        &format!(
            "admin = \"127.0.0.1:{admin}\"\nkeepalive_timeout = \"1s\"\nbody_timeout = \"1s\"\n\
             send_timeout = \"1s\""
        ),
    );
    // Idle keep-alive: closed after keepalive_timeout.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed");
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(3));

    // A body that stalls: 408 after body_timeout, and the connection closed.
    let t = Instant::now();
    let ex = exchange(
        port,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",
        1,
        Duration::from_millis(100),
    )
    .await;
    let statuses: Vec<u16> = ex.answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [408], "{:?}", ex.rest);
    assert!(ex.closed);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    // A client that never reads a large answer: cut after send_timeout of no progress.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut total = 0usize;
    let t = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => total += n,
        }
    }
    assert!(total < 32 << 20, "the answer was cut, {total} bytes came");
    assert!(t.elapsed() < Duration::from_secs(5));

    // None of it was the upstream's fault.
    let status = admin_status(admin).await;
    assert_eq!(status["upstreams"]["u"]["peers"][0]["ejected"], false);
    let log = _g.log();
    assert!(!log.contains("ERROR"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_requests_and_header_fields_are_capped() {
    let up = echo("u").await;
    let port = free_port();
    let _g = gateway(
        port,
        up,
        "max_connections = 5\nmax_requests_per_connection = 3\nmax_headers = 10\n\
         max_header_size = \"1KiB\"\nheader_timeout = \"10s\"",
    );
    // Five idle keep-alive connections hold every slot: each next one is admitted by closing
    // one of them (they wait for a head; their clients reconnect without a failed request).
    // Each makes one request first, so it is certainly accepted and counted before the others
    // come (a bare connect may still sit in the accept queue on a busy machine).
    let mut held = Vec::new();
    for _ in 0..5 {
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        held.push(common::raw::answered_connection(port, req).await);
    }
    // Three newcomers that stay connected: each needs a slot of its own.
    let mut newcomers = Vec::new();
    for _ in 0..3 {
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        newcomers.push(common::raw::answered_connection(port, req).await);
    }
    // Each newcomer closed one idle keep-alive connection: one of the five, or an earlier
    // newcomer, idle too once answered (idle ones are equals).
    let mut closed = 0;
    for mut s in held.into_iter().chain(newcomers) {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 3, "one idle connection closed for each newcomer");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "slots come back");
    let log = _g.log();
    assert_eq!(
        log.matches("max_connections (5) reached").count(),
        1,
        "said once:\n{log}"
    );

    // Three requests per connection: the third answer says close.
    let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n".repeat(4);
    let ex = exchange(port, get.as_bytes(), 3, Duration::from_millis(300)).await;
    assert_eq!(ex.answers.len(), 3);
    assert_eq!(ex.answers[2].header("connection"), Some("close"));
    assert!(ex.closed);

    // Header fields: too many, or too large.
    let many: String = (0..11).map(|i| format!("X-{i}: v\r\n")).collect();
    let req = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    let ex = exchange(port, req.as_bytes(), 1, Duration::from_millis(100)).await;
    assert_eq!(ex.answers[0].status, 431);
    let req = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "v".repeat(2000)
    );
    let ex = exchange(port, req.as_bytes(), 1, Duration::from_millis(100)).await;
    assert_eq!(ex.answers[0].status, 431);
    assert!(ex.closed);
}

/// Clients that leave, idle or in the middle of a request head, are routine: no error line per
/// connection, and the gateway serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_are_not_errors() {
    let up = echo("u").await;
    let port = free_port();
    let _g = gateway(port, up, "");
    for payload in [&b""[..], b"GET / HT", b"GET / HTTP/1.1\r\nHost: a\r\n"] {
        for reset in [false, true] {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.write_all(payload).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            if reset {
                // A zero linger resets the connection on drop; it never blocks.
                #[allow(deprecated)]
                s.set_linger(Some(Duration::ZERO)).unwrap();
            }
            drop(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = client()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let log = _g.log();
    assert!(!log.contains("ERROR"), "{log}");
}

/// A TLS gateway admits a connection before its handshake and gives the handshake
/// `header_timeout` from the connection's start: clients that connect and send nothing, or
/// the first bytes of a ClientHello only, hold a slot and no more than that time, and past
/// `max_connections` the next connection is closed at once (Pingora's own TLS listener let
/// them in beyond the limit, for 60 s each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_count_against_the_limits() {
    let up = echo("u").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = common::pki::Ca::new("test CA");
    let leaf = common::pki::Leaf {
        subject: &[("CN", "localhost")],
        dns: &["localhost"],
        ..Default::default()
    };
    let (cert, key) = ca.issue(dir.path(), "server", &leaf);
    let (port, admin) = (free_port(), free_port());
    let g = Gatehouse::start(
        &format!(
            "[server]\nadmin = \"127.0.0.1:{admin}\"\nmax_connections = 4\n\
             header_timeout = \"2s\"\n[upstreams.u]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             tls = {{ cert = \"{cert}\", key = \"{key}\" }}\n[[routes]]\nupstream = \"u\"\n"
        ),
        &[port, admin],
    );
    let opened = Instant::now();
    let mut held = Vec::new();
    for first in [&b""[..], b"", b"\x16", b"\x16\x03\x01\x02"] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(first).await.unwrap();
        held.push(s);
    }
    // Admitted in order: the fifth finds every slot taken, and is admitted by closing one of
    // the four still in their handshakes (none has sent a head).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fifth = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = fifth.write_all(b"\x16\x03\x01").await;
    let mut closed_early = 0;
    for s in held.iter_mut() {
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), s.read(&mut [0u8; 8])).await
        {
            assert_eq!(r.unwrap_or(0), 0);
            closed_early += 1;
        }
    }
    assert_eq!(closed_early, 1, "one closed to make room");
    held.push(fifth);
    for mut s in held {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut [0u8; 8]))
            .await
            .expect("closed by header_timeout")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Slots back: a real client is served.
    let c = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca.pem()).unwrap())
        .build()
        .unwrap();
    let r = c
        .get(format!("https://localhost:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = metrics_text(admin).await;
    assert!(
        m.contains("gatehouse_tls_handshake_failures_total{gateway=\"g\",reason=\"timeout\"} 4"),
        "{m}"
    );
    let log = g.log();
    assert!(!log.contains("ERROR"), "{log}");
    assert!(log.contains("max_connections (4) reached"), "{log}");
}

/// Gaps in a request head are the head clock's business (header_timeout for the whole head),
/// not body_timeout's: a head that arrives a line every 1.5 s with `body_timeout = "1s"` is
/// served if it completes within header_timeout, and cut quietly (no ERROR line: any client
/// could flood the log) when it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_in_a_head_are_timed_by_header_timeout_not_body_timeout() {
    let up = echo("u").await;
    let port = free_port();
    let g = gateway(port, up, "header_timeout = \"5s\"\nbody_timeout = \"1s\"");
    let lines: [&[u8]; 3] = [b"GET / HTTP/1.1\r\n", b"Host: a\r\n", b"\r\n"];
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for l in lines {
        s.write_all(l).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(
        &buf[..n.min(12)],
        b"HTTP/1.1 200",
        "served after 4.5 s of a slow head"
    );

    // Twenty heads that never end: cut at header_timeout, and no line each in the log.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(trickle(
                port,
                b"GET / HTTP/1.1\r\nHost: a\r\nX-1: a\r\nX-2: b\r\nX-3: c\r\nX-4: d\r\n\r\n",
                Duration::from_millis(1500),
            ))
        })
        .collect();
    for t in tasks {
        let cut = t.await.unwrap().expect("cut before the head ended");
        assert!(
            cut >= Duration::from_millis(4500),
            "{cut:?}: cut before header_timeout"
        );
        assert!(cut < Duration::from_secs(8), "{cut:?}");
    }
    let log = g.log();
    assert!(
        !log.contains("ERROR"),
        "no error line per cut client:\n{log}"
    );
}

/// A connection from `src` (any 127.x address) to the gateway.
async fn connect_from(src: &str, port: u16) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}

/// Whether the gateway closes `s` without a word within `within`.
async fn closed_at_once(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// `max_connections_per_ip`: one address holds at most that many connections; others are
/// served all along; a connection given back is one the address may open again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_max_connections_per_ip() {
    let up = echo("u").await;
    let (port, admin) = (free_port(), free_port());
    let g = Gatehouse::start(
        &format!(
            "[server]\nthreads = 2\nadmin = \"127.0.0.1:{admin}\"\nmax_connections_per_ip = 3\n\
             [upstreams.u]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n[[routes]]\nupstream = \"u\"\n"
        ),
        &[port, admin],
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.2", port).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = connect_from("127.0.0.2", port).await;
    assert!(
        closed_at_once(&mut fourth, Duration::from_secs(2)).await,
        "a fourth connection from one address is closed"
    );
    // Another address is served meanwhile.
    let mut other = connect_from("127.0.0.3", port).await;
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    other.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    // One given back: the address may open one again, and it is served.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from("127.0.0.2", port).await;
    again
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    again.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");

    let m = metrics_text(admin).await;
    assert!(
        m.contains("gatehouse_connections_refused_total{gateway=\"g\",reason=\"max_connections_per_ip\"} 1"),
        "{m}"
    );
    let log = g.log();
    assert_eq!(
        log.matches("max_connections_per_ip (3)").count(),
        1,
        "said once:\n{log}"
    );
}

/// At `max_connections`, a slowloris crowd does not lock others out: each newcomer is admitted
/// by closing the connection that has waited longest for its head, so a normal client is
/// answered within a second throughout, and no client timeout writes an ERROR line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_the_slowest_make_room() {
    let up = echo("u").await;
    let (port, admin) = (free_port(), free_port());
    let g = gateway(
        port,
        up,
        &format!("admin = \"127.0.0.1:{admin}\"\nmax_connections = 100\nheader_timeout = \"30s\""),
    );
    const REQ: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: slowloris/1.0\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    // 300 trickling clients, far more than the 100 slots, arriving over 1.5 s and staying.
    let attack: Vec<_> = (0..300)
        .map(|i| {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(5 * i)).await;
                trickle(port, REQ, Duration::from_millis(500)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..10 {
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            client().get(format!("http://127.0.0.1:{port}/")).send(),
        )
        .await
        .expect("answered within a second")
        .unwrap();
        assert_eq!(r.status(), 200);
        assert!(t.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = metrics_text(admin).await;
    let cut: u64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("gatehouse_client_cuts_total{gateway=\"g\",reason=\"overload\"} ")
        })
        .map_or(0, |v| v.trim().parse().unwrap());
    assert!(cut >= 150, "{cut} closed to make room\n{m}");
    for a in attack {
        a.abort();
    }
    let log = g.log();
    assert!(!log.contains("ERROR"), "{log}");
}

/// The front reads a connection's first head itself: whatever Pingora would answer at once is
/// still answered at once (a head ending in a bare-LF blank line, blank lines before the
/// request line, a first line that is no request line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_heads_are_handed_on_at_once() {
    let up = echo("u").await;
    let port = free_port();
    let _g = gateway(port, up, "header_timeout = \"10s\"");
    for (req, want) in [
        (&b"GET / HTTP/1.1\nHost: a\n\r\n"[..], 400),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        (b"garbage here\r\n", 400),
    ] {
        let t = Instant::now();
        let ex = exchange(port, req, 1, Duration::from_millis(100)).await;
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{:?}",
            String::from_utf8_lossy(req)
        );
        let statuses: Vec<u16> = ex.answers.iter().map(|a| a.status).collect();
        assert_eq!(statuses, [want], "{:?}", String::from_utf8_lossy(req));
    }
}
