//! SIGHUP reloads the file: a good one takes effect without dropping the listener, a bad one
//! is refused and the running config stays.
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn config(port: u16, a: std::net::SocketAddr, rewrite: &str) -> String {
    format!(
        "[upstreams.a]\npeers = [\"{a}\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [[routes]]\npath = \"/x\"\nrewrite = \"{rewrite}\"\nupstream = \"a\"\n"
    )
}

async fn upstream_path(url: &str) -> String {
    let body: Value = client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["path"].as_str().unwrap_or_default().to_string()
}

fn hup(pid: u32) {
    let ok = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_good_files_and_refuses_bad_ones() {
    let a = echo("a").await;
    let port = free_port();
    let g = Gatehouse::start(&config(port, a, "/one"), &[port]);
    let url = format!("http://127.0.0.1:{port}/x");
    assert_eq!(upstream_path(&url).await, "/one");

    std::fs::write(&g.config, config(port, a, "/two")).unwrap();
    hup(g.pid());
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream_path(&url).await != "/two" {
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            g.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    std::fs::write(
        &g.config,
        config(port, a, "/three").replace("upstream = \"a\"", "upstream = \"nope\""),
    )
    .unwrap();
    hup(g.pid());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !g.log().contains("reload refused") {
        assert!(Instant::now() < deadline, "no refusal logged:\n{}", g.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(g.log().contains("unknown upstream \"nope\""), "{}", g.log());
    assert_eq!(
        upstream_path(&url).await,
        "/two",
        "the running config stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_answers_whether_the_file_took() {
    let a = echo("a").await;
    let (port, admin) = (free_port(), free_port());
    let token = "reload-token-0123456789abcdef";
    let head = format!("[server]\nadmin = \"127.0.0.1:{admin}\"\nadmin_token = \"{token}\"\n");
    let g = Gatehouse::start(&(head.clone() + &config(port, a, "/one")), &[port, admin]);
    let url = format!("http://127.0.0.1:{port}/x");
    assert_eq!(upstream_path(&url).await, "/one");
    let post = |t: Option<&str>| {
        let mut r = client().post(format!("http://127.0.0.1:{admin}/reload"));
        if let Some(t) = t {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    // The token is required, and POST.
    assert_eq!(post(None).await.unwrap().status(), 401);
    let r = client()
        .get(format!("http://127.0.0.1:{admin}/reload"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);

    // A good file: 200, and it took.
    std::fs::write(&g.config, head.clone() + &config(port, a, "/two")).unwrap();
    let r = post(Some(token)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(upstream_path(&url).await, "/two");

    // A bad file: 422 with the error and its line; the running config stays, /status says so.
    std::fs::write(&g.config, head.clone() + &config(port, a, "no-slash")).unwrap();
    let r = post(Some(token)).await.unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    let errors = body["errors"].as_str().unwrap();
    assert!(
        errors.contains(":10:11: error") && errors.contains("`rewrite` must be a path"),
        "{errors}"
    );
    assert_eq!(upstream_path(&url).await, "/two");
    let status = admin_status(admin).await;
    assert_eq!(status["last_reload"]["result"], "failure", "{status}");
    assert!(status["last_reload"]["errors"]
        .as_str()
        .unwrap()
        .contains("rewrite"));
}
