//! The admin listener's reads: /status, /config (redacted), `admin_auth = "all"`, and the
//! status page at `/` in a real headless browser.
mod common;

use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "admin-token-0123456789";

fn config(admin: u16, port: u16, up: std::net::SocketAddr, dead: u16, auth: &str) -> String {
    format!(
        r#"
[server]
admin = "127.0.0.1:{admin}"
admin_token = "{TOKEN}"
admin_auth = "{auth}"
[upstreams.app]
peers = ["{up}"]
health_check = {{ kind = "tcp", interval = "1s" }}
[upstreams.flaky]
peers = ["{up}", "127.0.0.1:{dead}"]
health_check = {{ kind = "tcp", interval = "1s", unhealthy_after = 1 }}
circuit_breaker = {{ failures = 5, open_for = "10s" }}
[plugins.jwt]
kind = "jwt_auth"
secret = "hmac-secret-that-must-not-leak-0123456789"
algorithms = ["HS256"]
[gateways.web]
listen = ["127.0.0.1:{port}"]
[[routes]]
name = "api"
path = "/api"
upstream = "app"
plugins = ["jwt"]
[[routes]]
name = "canary"
path = "/canary"
split = [{{ upstream = "app", weight = 9 }}, {{ upstream = "flaky", weight = 1 }}]
"#
    )
}

async fn admin_get(admin: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut r = client().get(format!("http://127.0.0.1:{admin}{path}"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Waits until /status shows the dead peer as unhealthy.
async fn until_down(admin: u16, token: Option<&str>, dead: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = admin_get(admin, "/status", token).await;
        let s: serde_json::Value = serde_json::from_str(&body).unwrap();
        let down = s["upstreams"]["flaky"]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["addr"] == format!("127.0.0.1:{dead}").as_str() && p["healthy"] == false);
        if down {
            return s;
        }
        assert!(Instant::now() < deadline, "peer never marked down: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_redacted_config() {
    let up = echo("u").await;
    let (admin, port, dead) = (free_port(), free_port(), free_port());
    let g = Gatehouse::start(&config(admin, port, up, dead, "mutations"), &[port, admin]);
    let s = until_down(admin, None, dead).await;
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_seconds"].as_u64().is_some());
    let file = std::fs::read(&g.config).unwrap();
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&file))
    };
    // The redacted config's digest: the raw file's would let anyone check a guessed secret.
    let shown = s["config"]["sha256"].as_str().unwrap();
    assert_eq!(shown.len(), 64);
    assert!(shown.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(shown, digest.as_str());
    assert_eq!(s["config"]["path"], g.config.display().to_string().as_str());
    let routes = &s["gateways"][0]["routes"];
    assert_eq!(routes[0]["name"], "api");
    assert_eq!(routes[0]["target"], "upstream app");
    assert_eq!(routes[1]["target"], "split app 90%, flaky 10%");
    assert_eq!(
        s["gateways"][0]["listen"][0],
        format!("127.0.0.1:{port}").as_str()
    );

    // /config needs the token whatever admin_auth says.
    assert_eq!(admin_get(admin, "/config", None).await.0, 401);
    let (status, body) = admin_get(admin, "/config", Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert!(
        !body.contains("hmac-secret-that-must-not-leak-0123456789"),
        "{body}"
    );
    assert!(!body.contains(TOKEN), "{body}");
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(c["plugins"]["jwt"]["secret"], "[redacted]");
    assert_eq!(c["routes"][1]["name"], "canary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_auth_all_guards_the_reads() {
    let up = echo("u").await;
    let (admin, port, dead) = (free_port(), free_port(), free_port());
    let _g = Gatehouse::start(&config(admin, port, up, dead, "all"), &[port, admin]);
    for path in ["/status", "/metrics", "/config"] {
        let (status, _) = admin_get(admin, path, None).await;
        assert_eq!(status, 401, "{path} without the token");
        let (status, _) = admin_get(admin, path, Some("wrong-token-0123456789")).await;
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    let (status, _) = admin_get(admin, "/status", Some(TOKEN)).await;
    assert_eq!(status, 200);
    // Probes stay open: /readyz says its status, not what is pending. Ready once the first
    // health checks ran (the token shows what is pending until then).
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin_get(admin, "/readyz", Some(TOKEN)).await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        admin_get(admin, "/readyz", None).await,
        (200, "ready\n".to_string())
    );
    // A name that is not an IP or localhost (DNS rebinding from a web page): 421.
    let r = client()
        .get(format!("http://127.0.0.1:{admin}/status"))
        .header("host", format!("evil.example:{admin}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    let r = client()
        .get(format!("http://localhost:{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The page shell and liveness stay open: the page asks for the token itself.
    assert_eq!(admin_get(admin, "/", None).await.0, 200);
    assert_eq!(admin_get(admin, "/healthz", None).await.0, 200);
    // `all` without a token is refused at check.
    let (code, err, _, _dir) = check(
        "[server]\nadmin = \"127.0.0.1:1\"\nadmin_auth = \"all\"\n[gateways.g]\nlisten = [\"127.0.0.1:1\"]\n",
    );
    assert_eq!(code, 1);
    assert!(err.contains(":3") && err.contains("admin_token"), "{err}");
}

/// The page in Debian's chromium, headless: it loads, fills itself from /status and
/// /metrics, shows every upstream and the killed peer as down, and logs nothing to the
/// console (every console message and uncaught error shows as a `CONSOLE` line on stderr).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_a_headless_browser() {
    let up = echo("u").await;
    let (admin, port, dead) = (free_port(), free_port(), free_port());
    let _g = Gatehouse::start(&config(admin, port, up, dead, "mutations"), &[port, admin]);
    until_down(admin, None, dead).await;
    for _ in 0..5 {
        client()
            .get(format!("http://127.0.0.1:{port}/canary"))
            .send()
            .await
            .unwrap();
    }
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("http://127.0.0.1:{admin}/"))
        .output()
        .await
        .expect("chromium (scripts/bootstrap.sh test installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        dom.contains("data-loaded=\"1\""),
        "page not filled:\n{dom}\n{err}"
    );
    for u in ["app", "flaky"] {
        assert!(
            dom.contains(&format!("data-upstream=\"{u}\"")),
            "{u} missing:\n{dom}"
        );
    }
    let down = format!("data-peer=\"127.0.0.1:{dead}\" data-state=\"down\"");
    let up_row = format!("data-peer=\"{up}\" data-state=\"up\"");
    assert!(dom.contains(&down), "dead peer not shown down:\n{dom}");
    assert!(dom.contains(&up_row), "live peer not shown up:\n{dom}");
    assert!(dom.contains("data-route=\"canary\""), "{dom}");
    let console: Vec<&str> = err.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
}

/// Pixels of `rgb` exactly, in a PNG file.
fn pixels_of(png_path: &std::path::Path, rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).expect("screenshot"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let step = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    buf[..info.buffer_size()]
        .chunks(step)
        .filter(|p| p[..3] == rgb)
        .count()
}

/// The page's "Last 15 minutes" charts, kept by the process: after a few seconds of traffic
/// to a route that answers and one whose upstream is gone, a screenshot in headless chromium
/// holds each series' line (its exact colour, which only the drawn lines use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_draws_the_last_fifteen_minutes() {
    let up = echo("u").await;
    let (admin, port, dead) = (free_port(), free_port(), free_port());
    let toml = format!(
        "[server]\nthreads = 1\nadmin = \"127.0.0.1:{admin}\"\n\
         [upstreams.app]\npeers = [\"{up}\"]\n[upstreams.gone]\npeers = [\"127.0.0.1:{dead}\"]\n\
         [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [[routes]]\nname = \"ok\"\npath = \"/ok\"\nupstream = \"app\"\n\
         [[routes]]\nname = \"broken\"\npath = \"/broken\"\nupstream = \"gone\"\n"
    );
    let _g = Gatehouse::start(&toml, &[port, admin]);
    let c = client();
    let history = || async {
        let h: serde_json::Value = c
            .get(format!("http://127.0.0.1:{admin}/history"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        h
    };
    let points = |h: &serde_json::Value, name: &str, field: &str| -> Vec<f64> {
        h["series"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] == name)
            .flat_map(|s| {
                s[field]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|v| v.as_f64())
            })
            .collect()
    };
    // Traffic until three points of each series show (a point every 5 s), 40 s at most.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut i = 0u32;
    loop {
        c.get(format!("http://127.0.0.1:{port}/ok"))
            .send()
            .await
            .unwrap();
        if i.is_multiple_of(4) {
            let r = c
                .get(format!("http://127.0.0.1:{port}/broken"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 502);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if i.is_multiple_of(50) {
            let h = history().await;
            if points(&h, "g/ok", "rate").len() >= 3
                && points(&h, "g/broken", "error_pct").len() >= 3
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "history: {}", history().await);
    }
    let h = history().await;
    assert!(points(&h, "g/ok", "rate").iter().all(|r| *r > 5.0), "{h}");
    assert!(
        points(&h, "g/ok", "error_pct").iter().all(|e| *e == 0.0),
        "{h}"
    );
    assert!(
        points(&h, "g/broken", "error_pct")
            .iter()
            .all(|e| *e == 100.0),
        "{h}"
    );
    assert!(!points(&h, "g/ok", "p99_ms").is_empty(), "{h}");
    assert!(
        !points(&h, "gone", "error_pct").is_empty(),
        "upstream series: {h}"
    );

    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("status.png");
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "--window-size=1280,1400",
            "--virtual-time-budget=8000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("http://127.0.0.1:{admin}/"))
        .output()
        .await
        .expect("chromium (scripts/bootstrap.sh test installs it)");
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, rgb) in [
        ("requests/s", [0x09, 0x69, 0xda]),
        ("errors %", [0xcf, 0x22, 0x2e]),
        ("p50", [0x1a, 0x7f, 0x37]),
        ("p99", [0xbc, 0x4c, 0x00]),
    ] {
        let n = pixels_of(&shot, rgb);
        // A line across most of a 180-pixel chart, 2 pixels thick, in at least one row.
        assert!(
            n >= 200,
            "{name}: {n} pixels of its colour in the screenshot"
        );
    }
}
