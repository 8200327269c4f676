//! Traffic splitting (canary, sticky) and request mirroring.
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_and_sticky_split() {
    let (stable, canary) = (echo("stable").await, echo("canary").await);
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.stable]\npeers = [\"{stable}\"]\n[upstreams.canary]\npeers = [\"{canary}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/api\"\nsplit = [{{ upstream = \"canary\", weight = 10 }}, {{ upstream = \"stable\", weight = 90 }}]\n\
             [[routes]]\npath = \"/sticky\"\nsticky = \"cookie:sid\"\n\
             split = [{{ upstream = \"canary\", weight = 50 }}, {{ upstream = \"stable\", weight = 50 }}]\n"
        ),
        &[port],
    );
    let n = 2000;
    let results = hammer(&format!("http://127.0.0.1:{port}/api"), n, 8, &[]).await;
    let counts = count_by(&results);
    let share = counts["canary"] as f64 / n as f64;
    eprintln!("split 10/90 over {n}: {counts:?}");
    assert!((share - 0.10).abs() <= 0.03, "canary share {share:.3}");

    // The same client (cookie) always gets the same side; both sides get clients.
    let c = client();
    let mut sides = std::collections::HashSet::new();
    for sid in 0..40 {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let r = c
                .get(format!("http://127.0.0.1:{port}/sticky"))
                .header("cookie", format!("theme=dark; sid=s{sid}"))
                .send()
                .await
                .unwrap();
            seen.insert(r.headers()["x-upstream"].to_str().unwrap().to_string());
        }
        assert_eq!(seen.len(), 1, "sid s{sid} moved between sides: {seen:?}");
        sides.extend(seen);
    }
    assert_eq!(sides.len(), 2);
}

/// A shadow upstream that records what it receives, then answers after `delay`.
async fn shadow(delay: Duration) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let addr = serve(move |req: hyper::Request<hyper::body::Incoming>| {
        let s = s.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            s.lock().unwrap().push(format!(
                "{} {} {}",
                parts.method,
                parts.uri.path(),
                String::from_utf8_lossy(&body)
            ));
            tokio::time::sleep(delay).await;
            hyper::Response::new(full("shadow"))
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_is_fire_and_forget_and_bounded() {
    let main = echo("main").await;
    let (slow, slow_seen) = shadow(Duration::from_secs(2)).await;
    let (bounded, bounded_seen) = shadow(Duration::from_secs(2)).await;
    let down = free_port();
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.main]\npeers = [\"{main}\"]\n[upstreams.slow]\npeers = [\"{slow}\"]\n\
             [upstreams.bounded]\npeers = [\"{bounded}\"]\n[upstreams.down]\npeers = [\"127.0.0.1:{down}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/m\"\nrewrite = \"/v2\"\nupstream = \"main\"\nmirror = {{ upstream = \"slow\" }}\n\
             [[routes]]\npath = \"/down\"\nupstream = \"main\"\nmirror = {{ upstream = \"down\", percent = 100 }}\n\
             [[routes]]\npath = \"/bounded\"\nupstream = \"main\"\nmirror = {{ upstream = \"bounded\", max_in_flight = 2 }}\n"
        ),
        &[port],
    );
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    for i in 0..5 {
        let start = Instant::now();
        let r = c.get(format!("{base}/m/get{i}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = c
            .post(format!("{base}/m/post{i}"))
            .body(format!("hello-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["upstream"], "main");
        assert!(
            start.elapsed() < Duration::from_millis(800),
            "the client never waits on the 2 s mirror"
        );
    }
    // The shadow saw every request, rewritten as the primary saw it, with its body.
    let deadline = Instant::now() + Duration::from_secs(3);
    while slow_seen.lock().unwrap().len() < 10 {
        assert!(
            Instant::now() < deadline,
            "mirror got {:?}",
            slow_seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = slow_seen.lock().unwrap().clone();
    assert!(seen.contains(&"GET /v2/get0 ".to_string()), "{seen:?}");
    assert!(
        seen.contains(&"POST /v2/post3 hello-3".to_string()),
        "{seen:?}"
    );

    // A mirror that is down changes nothing for the client.
    for _ in 0..5 {
        let start = Instant::now();
        assert_eq!(
            c.get(format!("{base}/down")).send().await.unwrap().status(),
            200
        );
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    // At most max_in_flight copies are outstanding; the rest are skipped, not queued.
    for _ in 0..10 {
        assert_eq!(
            c.get(format!("{base}/bounded"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(bounded_seen.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_copies_go_without_credentials() {
    let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let shadow = serve(move |req: hyper::Request<hyper::body::Incoming>| {
        let s = s.clone();
        async move {
            let names = req
                .headers()
                .keys()
                .map(|k| k.as_str().to_string())
                .collect();
            s.lock().unwrap().push(names);
            hyper::Response::new(full("shadow"))
        }
    })
    .await;
    let main = echo("main").await;
    let port = free_port();
    let key_hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"the-key"))
    };
    let _g = Gatehouse::start(
        &format!(
            "[plugins.keys]\nkind = \"key_auth\"\nheader = \"x-api-key\"\nhide_credentials = false\n\
             keys = {{ app = \"sha256:{key_hash}\" }}\n\
             [upstreams.main]\npeers = [\"{main}\"]\n[upstreams.shadow]\npeers = [\"{shadow}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/strip\"\nupstream = \"main\"\nplugins = [\"keys\"]\n\
             mirror = {{ upstream = \"shadow\" }}\n\
             [[routes]]\npath = \"/keep\"\nupstream = \"main\"\nplugins = [\"keys\"]\n\
             mirror = {{ upstream = \"shadow\", keep_credentials = true }}\n"
        ),
        &[port],
    );
    let creds = [
        ("authorization", "Bearer secret"),
        ("cookie", "sid=1"),
        ("x-api-key", "the-key"),
    ];
    for path in ["/strip", "/keep"] {
        let (status, _, body) = get(&format!("http://127.0.0.1:{port}{path}"), &creds).await;
        assert_eq!(status, 200, "{body}");
        let deadline = Instant::now() + Duration::from_secs(3);
        while seen.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "no mirror copy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let names = seen.lock().unwrap().remove(0);
        for h in ["authorization", "cookie", "x-api-key", "x-consumer"] {
            assert_eq!(
                names.iter().any(|n| n == h),
                path == "/keep",
                "{path}: {h} in the copy: {names:?}"
            );
        }
    }
}
