//! Peer selection (weighted round robin and random, consistent hashing, least connections) and
//! active health checks, end to end through the real gateway.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn gateway(port: u16, upstream: &str, extra_server: &str) -> Gatehouse {
    Gatehouse::start(
        &format!(
            "[server]\nthreads = 2\n{extra_server}\n{upstream}\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\nupstream = \"pool\"\n"
        ),
        &[port],
    )
}

async fn peers(names: &[&'static str]) -> (Vec<Ctl>, Vec<Arc<AtomicUsize>>) {
    let mut ctls = Vec::new();
    let mut hits = Vec::new();
    for n in names {
        let h = Arc::new(AtomicUsize::new(0));
        ctls.push(counting(n, None, h.clone()).await);
        hits.push(h);
    }
    (ctls, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_hold_within_five_percent() {
    for selection in ["round_robin", "random"] {
        let (ups, _) = peers(&["a", "b"]).await;
        let port = free_port();
        let _g = gateway(
            port,
            &format!(
                "[upstreams.pool]\nselection = \"{selection}\"\npeers = [\"{}\", {{ addr = \"{}\", weight = 3 }}]\n",
                ups[0].addr, ups[1].addr
            ),
            "",
        );
        let results = hammer(&format!("http://127.0.0.1:{port}/"), 4000, 8, &[]).await;
        assert!(results.iter().all(|(s, _)| *s == 200));
        let counts = count_by(&results);
        let share_b = counts["b"] as f64 / 4000.0;
        eprintln!("{selection}: {counts:?}");
        assert!(
            (share_b - 0.75).abs() <= 0.05,
            "{selection}: b got {share_b:.3}, want 0.75 ± 0.05"
        );
    }
}

/// Which peer serves each of `users` keys, through the gateway on `port`.
async fn mapping(port: u16, users: usize) -> Vec<String> {
    let c = client();
    let mut out = Vec::new();
    for u in 0..users {
        let r = c
            .get(format!("http://127.0.0.1:{port}/"))
            .header("x-user", format!("user-{u}"))
            .send()
            .await
            .unwrap();
        out.push(r.headers()["x-upstream"].to_str().unwrap().to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_is_stable_and_moves_little() {
    let (ups, _) = peers(&["a", "b", "c", "d"]).await;
    let addrs: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    let hashed = |list: &[String]| {
        format!(
            "[upstreams.pool]\nselection = \"consistent_hash\"\nhash_key = \"header:x-user\"\npeers = [{}]\n",
            list.join(", ")
        )
    };
    let (p4, p3) = (free_port(), free_port());
    let _g4 = gateway(p4, &hashed(&addrs), "");
    let _g3 = gateway(p3, &hashed(&addrs[..3]), "");
    let users = 400;
    let first = mapping(p4, users).await;
    let again = mapping(p4, users).await;
    assert_eq!(first, again, "a key always lands on the same peer");
    let used: std::collections::HashSet<_> = first.iter().collect();
    assert_eq!(used.len(), 4, "keys spread over all peers");

    // Without peer d: keys on a, b, c stay where they were; only d's keys move.
    let after = mapping(p3, users).await;
    let moved = first.iter().zip(&after).filter(|(x, y)| x != y).count();
    let moved_from_kept = first
        .iter()
        .zip(&after)
        .filter(|(x, y)| *x != "d" && x != y)
        .count();
    eprintln!("removing 1 of 4 peers moved {moved}/{users} keys ({moved_from_kept} not on d)");
    assert_eq!(moved_from_kept, 0);
    assert!(moved as f64 / users as f64 <= 0.25 + 0.10, "moved {moved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_conn_prefers_the_idle_peer() {
    let slow_hits = Arc::new(AtomicUsize::new(0));
    let h = slow_hits.clone();
    let slow = serve(move |_req| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            hyper::Response::builder()
                .header("x-upstream", "slow")
                .body(full("slow"))
                .unwrap()
        }
    })
    .await;
    let (fast, _) = peers(&["fast"]).await;
    let port = free_port();
    let _g = gateway(
        port,
        &format!(
            "[upstreams.pool]\nselection = \"least_conn\"\npeers = [\"{slow}\", \"{}\"]\n",
            fast[0].addr
        ),
        "",
    );
    let results = hammer(&format!("http://127.0.0.1:{port}/"), 80, 8, &[]).await;
    let counts = count_by(&results);
    eprintln!("least_conn: {counts:?}");
    assert!(counts["fast"] >= 60, "{counts:?}");
}

fn health_config(ups: &[Ctl], kind: &str) -> String {
    let list: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    let check = if kind == "http" {
        "{ kind = \"http\", path = \"/healthz\", interval = \"200ms\", timeout = \"200ms\", unhealthy_after = 1, healthy_after = 1 }"
    } else {
        "{ kind = \"tcp\", interval = \"200ms\", timeout = \"200ms\", unhealthy_after = 1, healthy_after = 1 }"
    };
    format!(
        "[upstreams.pool]\npeers = [{}]\nhealth_check = {check}\n",
        list.join(", ")
    )
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_peers_out_and_back() {
    for kind in ["http", "tcp"] {
        let (ups, hits) = peers(&["a", "b", "c"]).await;
        let (port, admin) = (free_port(), free_port());
        let _g = gateway(
            port,
            &health_config(&ups, kind),
            &format!("admin = \"127.0.0.1:{admin}\""),
        );
        let url = format!("http://127.0.0.1:{port}/");

        // c fails: within an interval or two it gets no traffic, and nobody sees an error.
        ups[2].kill();
        let killed_at = Instant::now();
        wait_for("c unhealthy", Duration::from_secs(3), async || {
            admin_status(admin).await["upstreams"]["pool"]["peers"][2]["healthy"] == false
        })
        .await;
        eprintln!(
            "{kind}: c marked unhealthy {:?} after it died",
            killed_at.elapsed()
        );
        let before = hits[2].load(Relaxed);
        let results = hammer(&url, 60, 4, &[]).await;
        assert!(
            results.iter().all(|(s, _)| *s == 200),
            "{kind}: {results:?}"
        );
        assert_eq!(
            hits[2].load(Relaxed),
            before,
            "{kind}: no traffic to the dead peer"
        );

        // c recovers: it is checked healthy and served again.
        let c = counting("c", Some(ups[2].addr), hits[2].clone()).await;
        wait_for("c healthy", Duration::from_secs(3), async || {
            admin_status(admin).await["upstreams"]["pool"]["peers"][2]["healthy"] == true
        })
        .await;
        let results = hammer(&url, 30, 3, &[]).await;
        assert!(
            count_by(&results).get("c").copied().unwrap_or(0) > 0,
            "{kind}: c serves again"
        );

        // Every peer down: 503 at once, with a request id.
        ups[0].kill();
        ups[1].kill();
        c.kill();
        wait_for("all unhealthy", Duration::from_secs(3), async || {
            let s = admin_status(admin).await;
            (0..3).all(|i| s["upstreams"]["pool"]["peers"][i]["healthy"] == false)
        })
        .await;
        let start = Instant::now();
        let r = client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    }
}

/// `preserve_host = false` sends the peer's name as configured, not the address it resolved to.
#[tokio::test]
async fn the_peer_host_is_its_configured_name() {
    let up = echo("named").await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.u]\npeers = [\"localhost:{}\"]\nresolve_every = \"1s\"\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\nupstream = \"u\"\npreserve_host = false\n",
            up.port()
        ),
        &[port],
    );
    let (status, _, body) = get(
        &format!("http://127.0.0.1:{port}/x"),
        &[("host", "client.example")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen(&echo, "host"), [format!("localhost:{}", up.port())]);
    assert_eq!(seen(&echo, "x-forwarded-host"), ["client.example"]);
}
