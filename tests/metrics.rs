//! `GET /metrics` on the admin listener: Prometheus text, with the counts a user's traffic
//! makes, bounded labels, and the state of peers, circuits and reloads.
mod common;

use std::time::Duration;

use common::*;

/// The value of the sample `name{labels}` (labels as Prometheus prints them, sorted).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape(admin: u16) -> String {
    let r = client()
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_shows_in_the_metrics() {
    let up = echo("u").await;
    let dead = free_port();
    let (port, admin) = (free_port(), free_port());
    let g = Gatehouse::start(
        &format!(
            r#"
[server]
admin = "127.0.0.1:{admin}"
[upstreams.app]
peers = ["{up}"]
[upstreams.gone]
peers = ["127.0.0.1:{dead}"]
retries = 0
circuit_breaker = {{ failures = 2, open_for = "30s" }}
[gateways.web]
listen = ["127.0.0.1:{port}"]
[[routes]]
name = "api"
path = "/api"
upstream = "app"
cache = {{ ttl = "60s" }}
[[routes]]
name = "broken"
path = "/broken"
upstream = "gone"
"#
        ),
        &[port, admin],
    );
    let base = format!("http://127.0.0.1:{port}");
    let c = client();
    for _ in 0..3 {
        c.get(format!("{base}/api/x")).send().await.unwrap();
    }
    c.post(format!("{base}/api/x"))
        .body("12345")
        .send()
        .await
        .unwrap();
    // Methods outside the list count as OTHER; paths no route takes as route "-".
    c.request(
        reqwest::Method::from_bytes(b"PROPFIND").unwrap(),
        format!("{base}/api/x"),
    )
    .send()
    .await
    .unwrap();
    for i in 0..3 {
        c.get(format!("{base}/nowhere/{i}")).send().await.unwrap();
    }
    for _ in 0..3 {
        c.get(format!("{base}/broken")).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = scrape(admin).await;
    let get = |s: &str| sample(&m, s).unwrap_or_else(|| panic!("no {s} in:\n{m}"));

    let req = |route: &str, method: &str, status: &str| {
        format!(
            "gatehouse_requests_total{{gateway=\"web\",method=\"{method}\",route=\"{route}\",status=\"{status}\"}}"
        )
    };
    assert_eq!(get(&req("api", "GET", "2xx")), 3.0);
    assert_eq!(get(&req("api", "POST", "2xx")), 1.0);
    assert_eq!(get(&req("api", "OTHER", "2xx")), 1.0);
    assert_eq!(get(&req("-", "GET", "4xx")), 3.0);
    assert_eq!(get(&req("broken", "GET", "5xx")), 3.0);
    assert_eq!(
        get("gatehouse_request_duration_seconds_count{gateway=\"web\",route=\"api\"}"),
        5.0
    );
    assert_eq!(
        get("gatehouse_request_bytes_total{gateway=\"web\",route=\"api\"}"),
        5.0,
        "the POST's body"
    );
    assert!(get("gatehouse_response_bytes_total{gateway=\"web\",route=\"api\"}") > 0.0);
    // Upstream time: the requests that reached the upstream (one GET, two were cache hits;
    // the POST; the PROPFIND).
    assert_eq!(
        get("gatehouse_upstream_duration_seconds_count{upstream=\"app\"}"),
        3.0
    );
    assert_eq!(
        get("gatehouse_cache_requests_total{gateway=\"web\",route=\"api\",status=\"MISS\"}"),
        1.0
    );
    assert_eq!(
        get("gatehouse_cache_requests_total{gateway=\"web\",route=\"api\",status=\"HIT\"}"),
        2.0
    );
    // State: peers, the breaker that the dead upstream opened, the build.
    assert_eq!(
        get(&format!(
            "gatehouse_upstream_peer_healthy{{peer=\"{up}\",upstream=\"app\"}}"
        )),
        1.0
    );
    assert_eq!(
        get("gatehouse_upstream_circuit_open{upstream=\"gone\"}"),
        1.0
    );
    assert!(m.contains("gatehouse_build_info{version=\""));
    // Connections: two held open, idle after a request each, are counted.
    let mut held = Vec::new();
    for _ in 0..2 {
        let req = b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n";
        held.push(common::raw::answered_connection(port, req).await);
    }
    let active = sample(
        &scrape(admin).await,
        "gatehouse_connections_active{gateway=\"web\"}",
    );
    assert!(active.is_some_and(|n| n >= 2.0), "{active:?}");
    drop(held);
    // No series carries a raw path.
    assert!(!m.contains("nowhere"));

    // Reloads: one good, one bad.
    let cfg = std::fs::read_to_string(&g.config).unwrap();
    std::fs::write(
        &g.config,
        cfg.replace("name = \"broken\"", "name = \"broken2\""),
    )
    .unwrap();
    signal(g.pid(), "HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(&g.config, "this is not toml [").unwrap();
    signal(g.pid(), "HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = scrape(admin).await;
    assert_eq!(
        sample(&m, "gatehouse_config_reloads_total{result=\"success\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "gatehouse_config_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_listeners_and_the_first_health_checks() {
    // A peer that takes connections and never answers: its first check lasts its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = silent.local_addr().unwrap();
    let (port, admin) = (free_port(), free_port());
    let _g = Gatehouse::start(
        &format!(
            r#"
[server]
admin = "127.0.0.1:{admin}"
[upstreams.slow]
peers = ["{peer}"]
health_check = {{ kind = "http", path = "/", interval = "1s", timeout = "3s" }}
[gateways.web]
listen = ["127.0.0.1:{port}"]
[[routes]]
upstream = "slow"
"#
        ),
        &[port, admin],
    );
    let readyz = || async {
        let r = client()
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("\"health_checks_pending\":[\"slow\"]"),
        "{body}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = readyz().await;
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(silent);
}

/// Cache series name their gateway (two gateways may each have a route `api`), only cached
/// routes have them, and a reload that removes a route removes its series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_follow_the_routes_of_the_running_config() {
    let up = echo("app").await;
    let (a, b, admin) = (free_port(), free_port(), free_port());
    let token = "metrics-token-0123456789abcdef";
    let config = |with_old: bool| {
        // Before the reload: gateway one's route is cached, and gateway two has `old`.
        let cache = if with_old {
            "cache = { ttl = \"60s\" }\n"
        } else {
            ""
        };
        let mut t = format!(
            "[server]\nadmin = \"127.0.0.1:{admin}\"\nadmin_token = \"{token}\"\n\
             [upstreams.app]\npeers = [\"{up}\"]\n\
             [gateways.one]\nlisten = [\"127.0.0.1:{a}\"]\n\
             [gateways.two]\nlisten = [\"127.0.0.1:{b}\"]\n\
             [[routes]]\ngateway = \"one\"\nname = \"api\"\npath = \"/\"\nupstream = \"app\"\n{cache}\
             [[routes]]\ngateway = \"two\"\nname = \"api\"\npath = \"/\"\nupstream = \"app\"\n"
        );
        if with_old {
            t.push_str(
                "[[routes]]\ngateway = \"two\"\nname = \"old\"\npath = \"/old\"\nupstream = \"app\"\n",
            );
        }
        t
    };
    let g = Gatehouse::start(&config(true), &[a, b, admin]);
    for url in [
        format!("http://127.0.0.1:{a}/x"),
        format!("http://127.0.0.1:{b}/x"),
        format!("http://127.0.0.1:{b}/old"),
    ] {
        assert_eq!(client().get(url).send().await.unwrap().status(), 200);
    }
    let m = scrape(admin).await;
    assert_eq!(
        sample(
            &m,
            "gatehouse_cache_requests_total{gateway=\"one\",route=\"api\",status=\"MISS\"}"
        ),
        Some(1.0)
    );
    assert!(
        !m.contains("gatehouse_cache_requests_total{gateway=\"two\""),
        "an uncached route has no cache series"
    );
    assert!(m.contains("route=\"old\""));
    std::fs::write(&g.config, config(false)).unwrap();
    let r = client()
        .post(format!("http://127.0.0.1:{admin}/reload"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = scrape(admin).await;
    assert!(!m.contains("route=\"old\""), "{m}");
    assert!(
        !m.contains("gatehouse_cache_requests_total{"),
        "the route has no cache any more: {m}"
    );
    assert!(m.contains("gatehouse_requests_total{gateway=\"two\",method=\"GET\",route=\"api\""));
}
