//! Passive health with retries, retries on statuses within a budget, and the circuit breaker.
mod common;

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn gateway(port: u16, upstreams: &str, server: &str) -> Gatehouse {
    Gatehouse::start(
        &format!(
            "[server]\nthreads = 2\n{server}\n{upstreams}\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\nupstream = \"pool\"\n"
        ),
        &[port],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_peer_under_load_costs_no_errors() {
    let hits: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let a = counting("a", None, hits[0].clone()).await;
    let b = counting("b", None, hits[1].clone()).await;
    let c = counting("c", None, hits[2].clone()).await;
    let port = free_port();
    let _g = gateway(
        port,
        &format!(
            "[upstreams.pool]\npeers = [\"{}\", \"{}\", \"{}\"]\nretries = 2\n\
             passive_health = {{ failures = 1, eject_for = \"30s\" }}\n",
            a.addr, b.addr, c.addr
        ),
        "",
    );
    let url = format!("http://127.0.0.1:{port}/");
    let load = tokio::spawn({
        let url = url.clone();
        async move {
            let mut all = Vec::new();
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(1500) {
                all.extend(hammer(&url, 40, 4, &[]).await);
            }
            all
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.kill();
    // Requests b had already read when it died are counted there; the dead peer must get
    // nothing after that.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b_at_kill = hits[1].load(Relaxed);
    let results = load.await.unwrap();
    let errors = results.iter().filter(|(s, _)| *s != 200).count();
    let after_kill = hits[1].load(Relaxed) - b_at_kill;
    eprintln!(
        "{} requests, {errors} errors, {after_kill} reached b later than 200 ms after its death: {:?}",
        results.len(),
        count_by(&results)
    );
    assert!(results.len() > 200);
    // Requests in flight on b when it died were retried on a or c.
    assert_eq!(errors, 0, "{results:?}");
    assert_eq!(after_kill, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_statuses_for_idempotent_requests_only() {
    let bad_hits = Arc::new(AtomicUsize::new(0));
    let h = bad_hits.clone();
    let bad = serve(move |_req| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Relaxed);
            hyper::Response::builder()
                .status(503)
                .header("x-upstream", "bad")
                .body(full("bad"))
                .unwrap()
        }
    })
    .await;
    let good_hits = Arc::new(AtomicUsize::new(0));
    let good = counting("good", None, good_hits.clone()).await;
    let port = free_port();
    let _g = gateway(
        port,
        &format!(
            "[upstreams.pool]\npeers = [\"{bad}\", \"{}\"]\nretries = 1\nretry_on_status = [503]\nretry_budget = 100\n",
            good.addr
        ),
        "",
    );
    let url = format!("http://127.0.0.1:{port}/");
    let results = hammer(&url, 40, 2, &[]).await;
    if results.iter().any(|(s, _)| *s != 200) {
        eprintln!("GATEWAY LOG:\n{}", _g.log());
    }
    assert!(
        results.iter().all(|(s, up)| *s == 200 && up == "good"),
        "{results:?}"
    );
    assert!(bad_hits.load(Relaxed) > 0, "the bad peer was tried");

    // POST is not idempotent: whoever answers first is the answer.
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(
            c.post(&url)
                .body("x")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_extra_load() {
    let hits = Arc::new(AtomicUsize::new(0));
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let h = hits.clone();
        addrs.push(
            serve(move |_req| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Relaxed);
                    hyper::Response::builder()
                        .status(503)
                        .body(full("down"))
                        .unwrap()
                }
            })
            .await,
        );
    }
    let port = free_port();
    let _g = gateway(
        port,
        &format!(
            "[upstreams.pool]\npeers = [\"{}\", \"{}\"]\nretries = 1\nretry_on_status = [503]\nretry_budget = 10\n",
            addrs[0], addrs[1]
        ),
        "",
    );
    let n = 300;
    let results = hammer(&format!("http://127.0.0.1:{port}/"), n, 3, &[]).await;
    assert!(results.iter().all(|(s, _)| *s == 503));
    let total = hits.load(Relaxed);
    eprintln!("{n} requests with a 10% budget reached the upstream {total} times");
    // 10% of 300 plus the reserve of 10 retries.
    assert!(total <= n + n / 10 + 10 + 2, "{total}");
    assert!(total > n, "some retries happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_opens_then_probes_and_closes() {
    let status = Arc::new(AtomicU16::new(503));
    let hits = Arc::new(AtomicUsize::new(0));
    let (s, h) = (status.clone(), hits.clone());
    let up = serve(move |_req| {
        let (s, h) = (s.clone(), h.clone());
        async move {
            h.fetch_add(1, Relaxed);
            hyper::Response::builder()
                .status(s.load(Relaxed))
                .body(full("up"))
                .unwrap()
        }
    })
    .await;
    let (port, admin) = (free_port(), free_port());
    let _g = gateway(
        port,
        &format!(
            "[upstreams.pool]\npeers = [\"{up}\"]\ncircuit_breaker = {{ failures = 3, open_for = \"1s\" }}\n"
        ),
        &format!("admin = \"127.0.0.1:{admin}\""),
    );
    let url = format!("http://127.0.0.1:{port}/");
    let c = client();
    for _ in 0..3 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 503);
    }
    assert_eq!(hits.load(Relaxed), 3);
    assert_eq!(
        admin_status(admin).await["upstreams"]["pool"]["circuit"],
        "open"
    );

    // Open: 503 at once, the upstream is not called.
    let start = Instant::now();
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(start.elapsed() < Duration::from_millis(200));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream circuit open");
    assert_eq!(hits.load(Relaxed), 3);

    // After open_for, one probe goes through; its success closes the circuit.
    status.store(200, Relaxed);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(hits.load(Relaxed), 4);
    assert_eq!(
        admin_status(admin).await["upstreams"]["pool"]["circuit"],
        "closed"
    );
    for _ in 0..5 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    }
}

/// A retried request's body is sent again, but the body hooks count it once: a PUT of 12 bytes
/// under a 16-byte limit is not a 413 because a retry replayed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_does_not_count_the_body_twice() {
    let bad = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
        hyper::Response::builder()
            .status(503)
            .body(full("bad"))
            .unwrap()
    })
    .await;
    let good = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        let n = http_body_util::BodyExt::collect(req.into_body())
            .await
            .map_or(0, |b| b.to_bytes().len());
        hyper::Response::new(full(n.to_string()))
    })
    .await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[server]\nthreads = 1\n[plugins.limit]\nkind = \"request_limit\"\nmax_body = \"16\"\n\
             [upstreams.pool]\npeers = [\"{bad}\", \"{good}\"]\nselection = \"round_robin\"\n\
             retries = 1\nretry_on_status = [503]\nretry_budget = 100\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\nupstream = \"pool\"\nplugins = [\"limit\"]\n"
        ),
        &[port],
    );
    let c = client();
    for _ in 0..4 {
        let r = c
            .put(format!("http://127.0.0.1:{port}/doc"))
            .body("twelve bytes")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "12");
    }
}

/// An HTTP/1.1 upstream on raw sockets that keeps connections alive, answering each GET after
/// `delay`, until `closing` is set: from then on it reads a request and closes the connection
/// without a byte of answer. Counts connections and requests read.
async fn closing_upstream(
    closing: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    delay: Duration,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            conns.fetch_add(1, Relaxed);
            let (closing, requests) = (closing.clone(), requests.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    requests.fetch_add(1, Relaxed);
                    if closing.load(Relaxed) {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pooled_connection_is_retried_once_on_a_new_one() {
    let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let up = closing_upstream(
        closing.clone(),
        conns.clone(),
        requests.clone(),
        Duration::from_millis(50),
    )
    .await;
    let port = free_port();
    let _g = gateway(
        port,
        &format!("[upstreams.pool]\npeers = [\"{up}\"]\nretries = 0\n"),
        "",
    );
    // A warm-up that leaves about a hundred idle connections in the gateway's pool.
    let results = hammer(&format!("http://127.0.0.1:{port}/"), 100, 100, &[]).await;
    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    let pooled = conns.load(Relaxed);
    assert!(pooled >= 50, "{pooled} connections after the warm-up");
    // Now the upstream closes every connection on the request it reads, answering nothing.
    closing.store(true, Relaxed);
    requests.store(0, Relaxed);
    let (status, _, _) = common::get(&format!("http://127.0.0.1:{port}/once"), &[]).await;
    assert_eq!(status, 502);
    // One pooled connection found dead, then one try on a new connection: never the pool's
    // next ones.
    assert_eq!(requests.swap(0, Relaxed), 2);
    assert_eq!(conns.load(Relaxed), pooled + 1);
    // The idle connections pooled with the dead one are not used again: the next GET goes
    // to a new connection at once.
    let (status, _, _) = common::get(&format!("http://127.0.0.1:{port}/again"), &[]).await;
    assert_eq!(status, 502);
    assert_eq!(requests.swap(0, Relaxed), 1);
    assert_eq!(conns.load(Relaxed), pooled + 2);
    // A POST whose body was read whole before it went out (request_buffering) is retried
    // the same way: once, on a new connection.
    closing.store(false, Relaxed);
    let results = hammer(&format!("http://127.0.0.1:{port}/"), 20, 20, &[]).await;
    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    closing.store(true, Relaxed);
    requests.store(0, Relaxed);
    let status = client()
        .post(format!("http://127.0.0.1:{port}/post"))
        .body("a small body")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 502);
    assert_eq!(requests.swap(0, Relaxed), 2);
}
