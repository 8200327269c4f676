//! Several replicas that behave as one: rate limits shared over a real Redis (single, Cluster
//! and Sentinel), and what each `on_store_error` policy does when Redis is slow or gone.
mod common;

use std::time::{Duration, Instant};

use common::redis::{Cluster, Redis, Sentinels};
use common::{free_port, Gatehouse};

/// A gateway whose routes `/<plugin>` each run that plugin, all on the store `store_toml`.
fn replica(
    store_toml: &str,
    plugins: &str,
    routes: &[&str],
    up: std::net::SocketAddr,
) -> (u16, u16, Gatehouse) {
    let (port, admin) = (free_port(), free_port());
    let mut toml = format!(
        "[server]\nthreads = 1\nadmin = \"127.0.0.1:{admin}\"\n\
         [stores.shared]\n{store_toml}\n{plugins}\n\
         [upstreams.up]\npeers = [\"{up}\"]\n\
         [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n"
    );
    for r in routes {
        toml.push_str(&format!(
            "[[routes]]\npath = \"/{r}\"\nupstream = \"up\"\nplugins = [\"{r}\"]\n"
        ));
    }
    let g = Gatehouse::start(&toml, &[port, admin]);
    (port, admin, g)
}

/// A store-backed limit of `rate` per API key (`x-api-key`), as a quota (`spread = false`).
fn limit(name: &str, rate: &str, extra: &str) -> String {
    format!(
        "[plugins.{name}]\nkind = \"rate_limit\"\nkey = \"header:x-api-key\"\nrate = \"{rate}\"\n\
         spread = false\nstore = \"shared\"\n{extra}\n"
    )
}

/// Sends `total` requests for `key`, `conc` at a time, spread over `ports` in turn: how many
/// each port served with 200, and the statuses seen.
async fn spread(
    ports: &[u16],
    path: &str,
    key: &str,
    total: usize,
    conc: usize,
) -> (Vec<usize>, Vec<u16>) {
    let client = common::client();
    let mut served = vec![0; ports.len()];
    let mut statuses = Vec::new();
    let mut i = 0;
    while i < total {
        let batch: Vec<_> = (i..(i + conc).min(total))
            .map(|n| {
                let which = n % ports.len();
                let url = format!("http://127.0.0.1:{}{path}", ports[which]);
                let req = client.get(url).header("x-api-key", key).send();
                async move { (which, req.await.expect("response").status().as_u16()) }
            })
            .collect();
        for (which, status) in futures_util::future::join_all(batch).await {
            if status == 200 {
                served[which] += 1;
            }
            statuses.push(status);
        }
        i += conc;
    }
    (served, statuses)
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_and_four_replicas_serve_one_limit_together() {
    let redis = Redis::start();
    let up = common::echo("up").await;
    let store = format!("url = \"{}\"", redis.url());
    let plugins = limit("quota", "60/m", "");
    let replicas: Vec<_> = (0..4)
        .map(|_| replica(&store, &plugins, &["quota"], up))
        .collect();
    let ports: Vec<u16> = replicas.iter().map(|r| r.0).collect();

    for (n, key) in [(2, "key-two"), (4, "key-four")] {
        let (served, statuses) = spread(&ports[..n], "/quota", key, 40 * n + 40, 8).await;
        let total: usize = served.iter().sum();
        assert!(
            (57..=63).contains(&total),
            "{n} replicas served {total} of a 60/m limit together ({served:?})"
        );
        assert!(
            served.iter().all(|&s| s >= 60 / n - 8),
            "every replica takes its turn: {served:?}"
        );
        assert!(
            statuses.iter().all(|&s| s == 200 || s == 429),
            "{statuses:?}"
        );
    }

    // The refusals are the local limiter's: 429 with the RateLimit headers and Retry-After.
    let (status, h, body) = common::get(
        &format!("http://127.0.0.1:{}/quota", ports[3]),
        &[("x-api-key", "key-four")],
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(h["ratelimit-limit"], "60");
    assert_eq!(h["ratelimit-remaining"], "0");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert!(body.contains("rate limit exceeded"), "{body}");

    // One key in the store per API key, under the plugin's name, expiring by itself.
    let ttl: i64 = redis
        .cli(&["pttl", "gatehouse:rl:quota:k:key-four"])
        .parse()
        .unwrap();
    assert!(ttl > 0 && ttl <= 120_000, "pttl {ttl}");
    // /status names the replica and says the store is up.
    let st = common::admin_status(replicas[0].1).await;
    assert_eq!(st["stores"][0]["name"], "shared", "{st}");
    assert_eq!(st["stores"][0]["kind"], "single", "{st}");
    assert_eq!(st["stores"][0]["up"], true, "{st}");
    assert!(
        st["node_name"].as_str().is_some_and(|n| !n.is_empty()),
        "{st}"
    );
    // And a replica counted nothing locally while the store answered.
    let m = common::metrics_text(replicas[0].1).await;
    assert_eq!(
        metric(&m, "gatehouse_rate_limit_fallbacks_total"),
        0.0,
        "{m}"
    );
    assert_eq!(metric(&m, "gatehouse_store_errors_total"), 0.0, "{m}");
}

/// Requests until `ok`, every 100 ms, for at most `secs`.
async fn until(secs: u64, mut ok: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if ok().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// GET `path` with an API key: status and how long it took.
async fn timed(port: u16, path: &str, key: &str) -> (u16, Duration) {
    let t = Instant::now();
    let r = common::client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .header("x-api-key", key)
        .send()
        .await
        .expect("response");
    (r.status().as_u16(), t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_dead_store_follows_each_policy_and_comes_back() {
    let mut redis = Redis::start();
    let up = common::echo("up").await;
    let store = format!("url = \"{}\"\ntimeout = \"50ms\"", redis.url());
    let plugins = [
        limit("local", "4/m", "on_store_error = \"local\"\nreplicas = 2"),
        limit("allow", "4/m", "on_store_error = \"allow\""),
        limit("deny", "4/m", "on_store_error = \"deny\""),
    ]
    .concat();
    let (port, admin, gw) = replica(&store, &plugins, &["local", "allow", "deny"], up);

    // Up: the store counts (4 per minute, then 429).
    for i in 0..6 {
        let (s, _) = timed(port, "/deny", "up-key").await;
        assert_eq!(s, if i < 4 { 200 } else { 429 }, "request {i}");
    }

    // Paused: no request waits much longer than the store's 50 ms timeout, and each plugin
    // follows its policy.
    redis.pause();
    let mut slowest = Duration::ZERO;
    let mut local = Vec::new();
    for _ in 0..5 {
        let (s, t) = timed(port, "/local", "paused-key").await;
        slowest = slowest.max(t);
        local.push(s);
    }
    // replicas = 2: this replica's share of 4/m is 2.
    assert_eq!(
        local,
        [200, 200, 429, 429, 429],
        "local fallback at limit / replicas"
    );
    for _ in 0..8 {
        let (s, t) = timed(port, "/allow", "paused-key").await;
        slowest = slowest.max(t);
        assert_eq!(s, 200, "allow lets everything through");
    }
    for _ in 0..3 {
        let (s, t) = timed(port, "/deny", "paused-key").await;
        slowest = slowest.max(t);
        assert_eq!(s, 503, "deny refuses while the store cannot answer");
    }
    assert!(
        slowest < Duration::from_millis(400),
        "a request waited {slowest:?} on a paused store (timeout 50 ms)"
    );
    redis.resume();
    assert!(
        until(10, async || timed(port, "/deny", "resumed-key").await.0
            == 200)
        .await,
        "the store is used again after it resumes"
    );

    // Killed: connections fail at once; the policies hold; a new server on the same port is
    // found without a restart.
    redis.kill();
    assert_eq!(timed(port, "/deny", "dead-key").await.0, 503);
    assert_eq!(timed(port, "/allow", "dead-key").await.0, 200);
    let t = Instant::now();
    for _ in 0..50 {
        assert_eq!(timed(port, "/deny", "dead-key").await.0, 503);
    }
    let per_request = t.elapsed() / 50;
    assert!(
        per_request < Duration::from_millis(100),
        "{per_request:?} per request while down"
    );
    redis.restart();
    assert!(
        until(15, async || timed(port, "/deny", "back-key").await.0 == 200).await,
        "the gateway reconnects to the restarted store"
    );
    for i in 1..6 {
        let (s, _) = timed(port, "/deny", "back-key").await;
        assert_eq!(
            s,
            if i < 4 { 200 } else { 429 },
            "counted in the store again: request {i}"
        );
    }

    let m = common::metrics_text(admin).await;
    assert!(
        metric(&m, "gatehouse_store_errors_total{kind=\"timeout\"") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "gatehouse_store_errors_total{kind=\"connection\"")
            + metric(&m, "gatehouse_store_errors_total{kind=\"connect\"")
            >= 1.0,
        "{m}"
    );
    for p in ["local", "allow", "deny"] {
        let n = metric(
            &m,
            &format!("gatehouse_rate_limit_fallbacks_total{{plugin=\"{p}\"}}"),
        );
        assert!(n >= 1.0, "fallbacks of {p}: {n}\n{m}");
    }
    // Once per episode in the log, not once per request (two outages, ~70 fallbacks).
    let log = gw.log();
    let starts = log
        .matches("plugins apply their on_store_error policy")
        .count();
    assert!(
        (2..=4).contains(&starts),
        "{starts} episode starts logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_is_followed() {
    let mut cluster = Cluster::start();
    let up = common::echo("up").await;
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let store = format!("cluster = [{}]\ntimeout = \"100ms\"", nodes.join(", "));
    let plugins = limit("deny", "5/m", "on_store_error = \"deny\"");
    let (port, _admin, gw) = replica(&store, &plugins, &["deny"], up);

    for i in 0..3 {
        assert_eq!(
            timed(port, "/deny", "cluster-key").await.0,
            200,
            "request {i}"
        );
    }
    // Kill the master that holds the key; its replica takes over.
    let key = "gatehouse:rl:deny:k:cluster-key";
    assert_eq!(
        cluster.nodes[cluster.master_of(key)].cli(&["exists", key]),
        "1"
    );
    let dead = cluster.master_of(key);
    cluster.nodes[dead].kill();
    // Under the policy meanwhile (deny: 503), then counted again on the new master, without
    // a restart: the count went on from where the replica had it (3, or less if the last
    // write had not reached it yet).
    assert!(
        until(20, async || timed(port, "/deny", "cluster-key").await.0
            == 200)
        .await,
        "the gateway follows the failover:\n{}",
        gw.log()
    );
    assert_ne!(cluster.master_of(key), dead);
    let mut ok = 1;
    while ok < 10 && timed(port, "/deny", "cluster-key").await.0 == 200 {
        ok += 1;
    }
    assert!(
        ok <= 3,
        "{ok} more requests served after the failover: the count was lost"
    );
    cluster.wait_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed() {
    let mut s = Sentinels::start();
    let up = common::echo("up").await;
    let nodes: Vec<String> = s
        .sentinel_urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect();
    let store = format!(
        "sentinel = {{ master = \"{}\", nodes = [{}] }}\ntimeout = \"100ms\"",
        Sentinels::NAME,
        nodes.join(", ")
    );
    let plugins = limit("local", "5/m", "on_store_error = \"local\"");
    let (port, admin, _gw) = replica(&store, &plugins, &["local"], up);

    let first = s.master.port;
    assert_eq!(s.master_port(), first);
    for i in 0..3 {
        assert_eq!(
            timed(port, "/local", "sentinel-key").await.0,
            200,
            "request {i}"
        );
    }
    assert_eq!(
        s.master
            .cli(&["exists", "gatehouse:rl:local:k:sentinel-key"]),
        "1"
    );
    s.master.kill();
    // The Sentinels promote the replica; the gateway asks them again and counts there.
    assert!(
        until(30, async || s.master_port() == s.replica.port).await,
        "the sentinels did not fail over"
    );
    assert!(
        until(20, async || {
            timed(port, "/local", "sentinel-key-2").await;
            s.replica
                .cli(&["exists", "gatehouse:rl:local:k:sentinel-key-2"])
                == "1"
        })
        .await,
        "the gateway counts on the promoted master"
    );
    let m = common::metrics_text(admin).await;
    assert!(metric(&m, "gatehouse_store_errors_total") >= 1.0, "{m}");
}
