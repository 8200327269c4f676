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
