//! The access log (JSON and combined, SIGUSR1 reopening, per-route opt-out) and the plugin
//! metrics (refusals and time per plugin and phase), from the outside.
mod common;

use std::time::{Duration, Instant};

use common::*;

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Waits until `path` holds at least `n` lines (the writer flushes when its queue is dry).
async fn lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let l: Vec<String> = text.lines().map(str::to_string).collect();
        if l.len() >= n || Instant::now() > deadline {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn gateway(up: std::net::SocketAddr, port: u16, admin: u16, log: &str, format: &str) -> Gatehouse {
    Gatehouse::start(
        &format!(
            r#"
[server]
admin = "127.0.0.1:{admin}"
access_log = {{ path = "{log}", format = "{format}" }}
[upstreams.app]
peers = ["{up}"]
[plugins.keys]
kind = "key_auth"
header = "x-api-key"
keys = {{ "alice" = "sha256:{}" }}
[plugins.rid]
kind = "request_id"
[gateways.web]
listen = ["127.0.0.1:{port}"]
plugins = ["rid"]
[[routes]]
name = "api"
path = "/api"
upstream = "app"
plugins = ["keys"]
[[routes]]
name = "health"
path = "/healthz"
upstream = "app"
access_log = false
"#,
            sha256_hex("alice-key-123")
        ),
        &[port, admin],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_say_what_happened() {
    let up = echo("u").await;
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let _g = gateway(up, port, admin, &log.display().to_string(), "json");
    let base = format!("http://127.0.0.1:{port}");
    let c = client();
    let ok = c
        .get(format!("{base}/api/items?x=1"))
        .header("x-api-key", "alice-key-123")
        .header("user-agent", "tester/1\t\"quoted\"")
        .header("referer", "http://example.com/")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let rid = ok.headers()["x-request-id"].to_str().unwrap().to_string();
    let refused = c.get(format!("{base}/api/items")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    c.get(format!("{base}/healthz")).send().await.unwrap();
    // A spelling trick is logged as routed: one canonical path.
    c.get(format!("{base}/nowhere/../api/x"))
        .header("x-api-key", "alice-key-123")
        .send()
        .await
        .unwrap();

    let l = lines(&log, 3).await;
    assert_eq!(l.len(), 3, "health route not logged: {l:?}");
    let v: Vec<serde_json::Value> = l.iter().map(|x| serde_json::from_str(x).unwrap()).collect();
    // Lines of different worker threads are in the order their buffers were written.
    let find = |f: &dyn Fn(&serde_json::Value) -> bool| {
        let i = v
            .iter()
            .position(f)
            .unwrap_or_else(|| panic!("no such line in {l:?}"));
        (&v[i], &l[i])
    };
    let (a, a_line) = find(&|x| x["status"] == 200 && x["path"] == "/api/items?x=1");
    assert_eq!(a["request_id"], rid.as_str());
    assert_eq!(a["method"], "GET");
    assert_eq!(a["host"], format!("127.0.0.1:{port}").as_str());
    assert_eq!(a["path"], "/api/items?x=1");
    assert_eq!(a["status"], 200);
    assert_eq!(a["route"], "api");
    assert_eq!(a["gateway"], "web");
    assert_eq!(a["upstream"], "app");
    assert_eq!(a["peer"], up.to_string().as_str());
    assert_eq!(a["consumer"], "alice");
    assert_eq!(a["client_ip"], "127.0.0.1");
    assert_eq!(a["referer"], "http://example.com/");
    assert_eq!(a["user_agent"], "tester/1\t\"quoted\"");
    assert!(a_line.contains(r#""user_agent":"tester/1\u0009\"quoted\"""#));
    assert!(a["response_bytes"].as_u64().unwrap() > 0);
    assert!(a["duration_ms"].as_f64().unwrap() >= a["upstream_ms"].as_f64().unwrap());
    assert!(a["time"].as_str().unwrap().ends_with('Z'));
    let (b, _) = find(&|x| x["status"] == 401);
    assert_eq!(b["status"], 401);
    assert_eq!(b["consumer"], serde_json::Value::Null);
    assert_eq!(b["upstream"], serde_json::Value::Null);
    let (c, _) = find(&|x| x["path"] == "/api/x");
    assert_eq!(c["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_lines_and_sigusr1_reopens() {
    let up = echo("u").await;
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let g = gateway(up, port, admin, &log.display().to_string(), "combined");
    let base = format!("http://127.0.0.1:{port}");
    let (s, _, _) = get(
        &format!("{base}/api/a"),
        &[("x-api-key", "alice-key-123"), ("user-agent", "curl/8")],
    )
    .await;
    assert_eq!(s, 200);
    let l = lines(&log, 1).await;
    assert_eq!(l.len(), 1);
    let line = &l[0];
    assert!(line.starts_with("127.0.0.1 - alice ["), "{line}");
    assert!(line.contains("] \"GET /api/a HTTP/1.1\" 200 "), "{line}");
    assert!(line.contains(" \"-\" \"curl/8\" rid="), "{line}");
    assert!(line.contains(" route=api up=app "), "{line}");

    // logrotate: move the file away, SIGUSR1, the next lines go to a new file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-USR1", &g.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    // The writer reopens before its next write; give the signal a moment to arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    get(&format!("{base}/api/b"), &[("x-api-key", "alice-key-123")]).await;
    let l = lines(&log, 1).await;
    assert_eq!(l.len(), 1, "a new file after SIGUSR1");
    assert!(l[0].contains("GET /api/b "));
    assert_eq!(
        lines(&rotated, 1).await.len(),
        1,
        "the rotated file keeps its line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_metrics_count_refusals_and_time_each_phase() {
    let up = echo("u").await;
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let _g = gateway(up, port, admin, &log.display().to_string(), "json");
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..3 {
        get(&format!("{base}/api/a"), &[]).await;
    }
    get(&format!("{base}/api/a"), &[("x-api-key", "wrong")]).await;
    get(&format!("{base}/api/a"), &[("x-api-key", "alice-key-123")]).await;
    let m = metrics_text(admin).await;
    let value = |series: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{m}"))
    };
    assert_eq!(
        value("gatehouse_plugin_refusals_total{kind=\"key_auth\",plugin=\"keys\",status=\"401\"}"),
        4.0
    );
    assert_eq!(
        value("gatehouse_plugin_duration_seconds_count{kind=\"key_auth\",phase=\"request\",plugin=\"keys\"}"),
        5.0
    );
    // request_id runs on the request and on every response, on all five.
    assert_eq!(
        value("gatehouse_plugin_duration_seconds_count{kind=\"request_id\",phase=\"response\",plugin=\"rid\"}"),
        5.0
    );
    assert!(
        !m.contains("phase=\"response\",plugin=\"keys\""),
        "no series for phases a plugin does not act in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_each_get_one_whole_line() {
    let up = echo("u").await;
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let _g = gateway(up, port, admin, &log.display().to_string(), "json");
    let base = format!("http://127.0.0.1:{port}");
    // Sixteen clients, fifty requests each: spread over the gateway's worker threads.
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let base = base.clone();
            tokio::spawn(async move {
                let c = client();
                for i in 0..50 {
                    let r = c
                        .get(format!("{base}/api/{t}/{i}"))
                        .header("x-api-key", "alice-key-123")
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let l = lines(&log, 800).await;
    assert_eq!(l.len(), 800);
    let mut paths: Vec<String> = l
        .iter()
        .map(|x| {
            let v: serde_json::Value =
                serde_json::from_str(x).unwrap_or_else(|e| panic!("{e}: {x}"));
            v["path"].as_str().unwrap().to_string()
        })
        .collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 800, "each request once");
    let m = metrics_text(admin).await;
    assert!(m.contains("gatehouse_access_log_dropped_total 0"), "{m}");
}

/// Credentials in the query never reach the log: key_auth's parameter (found by its decoded
/// name) and those `redact_query` lists; the other parameters are logged as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_query_parameters_are_redacted() {
    let up = echo("app").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let _g = Gatehouse::start(
        &format!(
            "[server]\naccess_log = {{ path = \"{}\", redact_query = [\"token\"] }}\n\
             [upstreams.app]\npeers = [\"{up}\"]\n\
             [plugins.keys]\nkind = \"key_auth\"\nquery = \"api_key\"\n\
             keys = {{ \"alice\" = \"sha256:{}\" }}\n\
             [gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/api\"\nupstream = \"app\"\nplugins = [\"keys\"]\n\
             [[routes]]\npath = \"/open\"\nupstream = \"app\"\n",
            log.display(),
            sha256_hex("alice-key-123")
        ),
        &[port],
    );
    for target in [
        "/api/x?api_key=alice-key-123&token=t0p-s3cret&x=1",
        "/api/x?api%5Fkey=alice-key-123",
        "/open/y?token=t0p-s3cret&api_key=elsewhere",
        "/typo?api_key=alice-key-123",
    ] {
        let r = client()
            .get(format!("http://127.0.0.1:{port}{target}"))
            .send()
            .await
            .unwrap();
        let want = if target.starts_with("/typo") {
            404
        } else {
            200
        };
        assert_eq!(r.status(), want, "{target}");
    }
    let lines = lines(&log, 4).await;
    let all = lines.join("\n");
    assert_eq!(lines.len(), 4, "{all}");
    // No route took it: every credential name of the gateway is redacted.
    assert!(all.contains("/typo?api_key=[redacted]"), "{all}");
    assert!(!all.contains("alice-key-123"), "{all}");
    assert!(!all.contains("t0p-s3cret"), "{all}");
    assert!(
        all.contains("/api/x?api_key=[redacted]&token=[redacted]&x=1"),
        "{all}"
    );
    assert!(all.contains("/api/x?api%5Fkey=[redacted]"), "{all}");
    // Not a key_auth route: its parameter is nobody's credential there.
    assert!(
        all.contains("/open/y?token=[redacted]&api_key=elsewhere"),
        "{all}"
    );
}
