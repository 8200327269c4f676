//! `gatehouse explain`: its verdict is the live gateway's (each request is explained, then
//! sent to a running gateway whose routes each go to an upstream named after them), and it
//! says why the others lost, what the upstream would receive, and the plugin order.
mod common;

use std::process::Command;

use common::*;

/// Method, path, headers.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

fn explain(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("explain")
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(config: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (code, out, err) = explain(config, &a);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_the_gateway_and_says_why() {
    let names = [
        "catch", "api", "users", "exact", "regex", "canary", "admin", "host", "wild",
    ];
    let mut ups = String::new();
    for n in names {
        let addr = echo(Box::leak(n.to_string().into_boxed_str())).await;
        ups.push_str(&format!("[upstreams.{n}]\npeers = [\"{addr}\"]\n"));
    }
    let port = free_port();
    let toml = format!(
        r#"
[server]
plugins = ["rid"]
{ups}
[plugins.rid]
kind = "request_id"
[plugins.hdr]
kind = "headers"
response = {{ set = {{ "x-served-by" = "gw" }} }}
[plugins.limit]
kind = "rate_limit"
key = "client_ip"
rate = "100/s"
[gateways.web]
listen = ["127.0.0.1:{port}"]
plugins = ["hdr"]
[[routes]]
name = "catch"
upstream = "catch"
[[routes]]
name = "api"
path = "/api"
upstream = "api"
strip_prefix = true
[[routes]]
name = "users"
path = "/api/users"
upstream = "users"
rewrite = "/v2/users"
plugins = ["limit"]
[[routes]]
name = "exact"
path = "= /api/users/me"
upstream = "exact"
[[routes]]
name = "regex"
path = "~ ^/items/[0-9]+$"
upstream = "regex"
[[routes]]
name = "canary"
path = "/api"
headers = {{ x-canary = "1" }}
upstream = "canary"
[[routes]]
name = "admin"
path = "/admin"
methods = ["POST"]
upstream = "admin"
[[routes]]
name = "host"
host = "shop.example.com"
path = "/api"
upstream = "host"
[[routes]]
name = "wild"
host = "*.example.com"
upstream = "wild"
"#
    );
    let g = Gatehouse::start(&toml, &[port]);
    let base = format!("http://127.0.0.1:{port}");
    let cases: &[Case] = &[
        ("GET", "/", &[]),
        ("GET", "/api/orders", &[]),
        ("GET", "/api/users/7", &[]),
        ("GET", "/api/users/me", &[]),
        ("GET", "/items/42", &[]),
        ("GET", "/items/x", &[]),
        ("GET", "/api/x", &[("x-canary", "1")]),
        ("GET", "/admin/x", &[]),
        ("POST", "/admin/x", &[]),
        ("GET", "/api/x", &[("host", "shop.example.com")]),
        ("GET", "/other", &[("host", "a.b.example.com")]),
        ("GET", "/API/users", &[]),
    ];
    for (method, path, headers) in cases {
        let mut args: Vec<String> = Vec::new();
        for (k, v) in *headers {
            args.push("-H".into());
            args.push(format!("{k}: {v}"));
        }
        args.push(method.to_string());
        args.push(format!("{base}{path}"));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = json(&g.config, &a);
        let mut rb = client().request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{base}{path}"),
        );
        for (k, val) in *headers {
            rb = rb.header(*k, *val);
        }
        let live = rb.send().await.unwrap();
        let served_by = live
            .headers()
            .get("x-upstream")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(
            v["route"]["name"].as_str().map(str::to_string),
            served_by,
            "{method} {path} {headers:?}: explain said {v:#}"
        );
        if let Some(body) = served_by.as_ref().map(|_| live) {
            // What the upstream received is what explain said it would.
            let echo: serde_json::Value = body.json().await.unwrap();
            let said = v["route"]["upstream_request"]["path"].as_str().unwrap();
            assert_eq!(echo["path"].as_str().unwrap(), said, "{method} {path}");
        }
    }

    // Why the others lost, and the phase order.
    let v = json(&g.config, &["GET", &format!("{base}/api/users/7")]);
    let lost = |name: &str| -> String {
        v["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["route"] == name)
            .map(|c| c["lost"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert!(
        lost("api").contains("wins: its path prefix /api/users goes before path prefix /api"),
        "{}",
        lost("api")
    );
    assert!(
        lost("exact").contains("exact path /api/users/me does not match"),
        "{}",
        lost("exact")
    );
    assert!(
        lost("canary").contains("header x-canary missing"),
        "{}",
        lost("canary")
    );
    assert!(
        lost("host").contains("host shop.example.com does not match"),
        "{}",
        lost("host")
    );
    assert_eq!(v["route"]["upstream_request"]["path"], "/v2/users/7");
    let phases = &v["route"]["phases"];
    assert_eq!(phases[0]["phase"], "request");
    assert_eq!(
        phases[0]["plugins"],
        serde_json::json!(["rid (request_id)", "limit (rate_limit)"])
    );
    let response = phases
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == "response")
        .unwrap();
    assert_eq!(
        response["plugins"],
        serde_json::json!(["hdr (headers)", "rid (request_id)"]),
        "responses run the chain backwards"
    );
    let v = json(
        &g.config,
        &["POST", "-H", "x-canary: 1", &format!("{base}/admin/x")],
    );
    assert_eq!(v["route"]["name"], "admin");
    let v = json(&g.config, &["GET", &format!("{base}/admin/x")]);
    let lost_admin = v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["route"] == "admin")
        .unwrap()["lost"]
        .clone();
    assert_eq!(lost_admin, "method GET not in [POST]");

    // Spelling tricks are decided before routing, as live.
    let v = json(&g.config, &["GET", &format!("{base}/api/..%2fadmin")]);
    assert_eq!(v["refused"]["status"], 400);
    let v = json(&g.config, &["GET", &format!("{base}//api//users/./7")]);
    assert_eq!(v["route"]["name"], "users");
    assert_eq!(v["request"]["path"], "/api/users/7");

    // For people, and errors.
    let (code, text, _) = explain(&g.config, &["GET", &format!("{base}/api/users/7")]);
    assert_eq!(code, 0);
    assert!(text.contains("route     users (line"), "{text}");
    assert!(
        text.contains("  sends   /v2/users/7 (Host: 127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains("  request           rid (request_id) -> limit (rate_limit)"),
        "{text}"
    );
    let (code, _, err) = explain(&g.config, &["GET", "ftp://x/"]);
    assert_eq!(code, 2);
    assert!(err.contains("scheme"), "{err}");
}

/// `explain` holds the losing routes against the router's own predicates: HEAD takes a GET
/// route, and a header given twice matches when any of its values does.
#[test]
fn losers_are_judged_as_the_router_judges() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("g.toml");
    std::fs::write(
        &config,
        "[upstreams.u]\npeers = [\"127.0.0.1:9\"]\n[gateways.g]\nlisten = [\"127.0.0.1:8080\"]\n\
         [[routes]]\nname = \"get\"\npath = \"/a\"\nmethods = [\"GET\"]\nupstream = \"u\"\n\
         [[routes]]\nname = \"tagged\"\npath = \"/a\"\nheaders = { \"x-tag\" = \"b\" }\nupstream = \"u\"\n\
         [[routes]]\nname = \"first\"\npath = \"/a\"\npriority = 10\nupstream = \"u\"\n",
    )
    .unwrap();
    let v = json(
        &config,
        &["-H", "x-tag: a", "-H", "x-tag: b", "HEAD", "http://h/a"],
    );
    assert_eq!(v["route"]["name"], "first", "{v}");
    let lost = |name: &str| -> String {
        v["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["route"] == name)
            .map(|c| c["lost"].as_str().unwrap().to_string())
            .unwrap()
    };
    for name in ["get", "tagged"] {
        assert!(lost(name).contains("wins"), "{name}: {}", lost(name));
    }
}
