//! `gatehouse check` and `gatehouse run` refuse bad files with every error, each at its line
//! and with what it belongs to; the shipped configs pass.
mod common;

use std::process::Command;

use common::*;

const BAD: &str = r#"[server]
threads = 2
trusted_proxies = ["10.0.0.0/33"]

[upstreams.orders]
peers = ["127.0.0.1:9001", { addr = "127.0.0.1", weight = 2 }]
connect_timeout = "5 parsecs"

[upstreams.users]
peers = ["127.0.0.1:9002"]
retries_typo = 1

[plugins.auth]
kind = "jwt_oops"

[plugins.hdrs]
kind = "headers"
request = { set = { "bad header" = "x" } }

[gateways.web]
listen = ["127.0.0.1:8080", "localhost"]

[[routes]]
name = "orders"
path = "/orders"
upstream = "ordrs"

[[routes]]
name = "regex"
path = "~ ^/items/(["
upstream = "users"

[[routes]]
name = "plugins"
path = "/p"
upstream = "users"
plugins = ["nope"]
gateway = "mobile"

[[routes]]
name = "dup-a"
path = "/same"
upstream = "users"

[[routes]]
name = "dup-b"
path = "/same/"
upstream = "users"
"#;

/// (line, text that must be in that line's message)
const EXPECTED: &[(usize, &str)] = &[
    (3, "[server]: invalid CIDR \"10.0.0.0/33\""),
    (6, "upstream \"orders\": invalid peer address \"127.0.0.1\""),
    (7, "upstream \"orders\": invalid duration \"5 parsecs\""),
    (11, "upstream \"users\": unknown field `retries_typo`"),
    (14, "plugin \"auth\": unknown plugin kind \"jwt_oops\""),
    (18, "plugin \"hdrs\": invalid header name \"bad header\""),
    (21, "gateway \"web\": invalid listen address \"localhost\""),
    (26, "route \"orders\": unknown upstream \"ordrs\""),
    (30, "route \"regex\": invalid path regex"),
    (37, "route \"plugins\": unknown plugin \"nope\""),
    (38, "route \"plugins\": unknown gateway \"mobile\""),
    (
        45,
        "route \"dup-b\": matches exactly the same requests as route \"dup-a\" (line 40)",
    ),
];

#[test]
fn check_reports_every_error_with_its_line() {
    let (code, out, path, _dir) = check(BAD);
    assert_eq!(code, 1, "{out}");
    let file = path.display().to_string();
    for (line, text) in EXPECTED {
        let found = out
            .lines()
            .any(|l| l.starts_with(&format!("{file}:{line}:")) && l.contains(text));
        assert!(
            found,
            "no error at line {line} containing {text:?} in:\n{out}"
        );
    }
    let errors = out.lines().filter(|l| l.contains(": error: ")).count();
    assert_eq!(errors, EXPECTED.len(), "{out}");
    assert!(out.contains(&format!("{} errors", EXPECTED.len())), "{out}");
}

#[test]
fn run_refuses_a_bad_file_the_same_way() {
    let (_, check_out, path, _dir) = check(BAD);
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in check_out.lines().filter(|l| l.contains(": error: ")) {
        assert!(stderr.contains(l), "run did not report {l:?}:\n{stderr}");
    }
}

#[test]
fn syntax_errors_and_missing_files() {
    let (code, out, path, _dir) = check("[server]\nthreads = 2\n[upstreams.a\npeers = []\n");
    assert_eq!(code, 1);
    assert!(out.contains(&format!("{}:3:", path.display())), "{out}");
    assert!(out.contains("TOML syntax"), "{out}");

    let (code, out) = check_file(std::path::Path::new("/nonexistent/gatehouse.toml"));
    assert_eq!(code, 1);
    assert!(out.contains("cannot read config file"), "{out}");
}

#[test]
fn a_route_needs_a_gateway_when_there_are_several() {
    let (code, out, _, _dir) = check(
        "[upstreams.u]\npeers = []\n[gateways.a]\nlisten = [\"127.0.0.1:1\"]\n[gateways.b]\nlisten = [\"127.0.0.1:2\"]\n\
         [[routes]]\nupstream = \"u\"\n",
    );
    assert_eq!(code, 1);
    assert!(
        out.contains(":7:1: error: route \"#1\": `gateway` is required"),
        "{out}"
    );
}

#[test]
fn shipped_configs_pass_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("conf/gatehouse.toml")];
    for e in std::fs::read_dir(root.join("conf/examples")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            files.push(p);
        }
    }
    assert!(files.len() >= 3);
    for f in files {
        let (code, out) = check_file(&f);
        assert_eq!(code, 0, "{}:\n{out}", f.display());
        assert!(out.contains(": ok ("), "{out}");
    }
}

#[test]
fn run_reports_a_busy_port_at_once() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstreams.u]\npeers = []\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n[[routes]]\nupstream = \"u\"\n"
        ),
    )
    .unwrap();
    let start = std::time::Instant::now();
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

const BAD_POLICIES: &str = r#"[upstreams.a]
peers = ["127.0.0.1:9001"]
selection = "fastest"

[upstreams.b]
peers = ["127.0.0.1:9002"]
hash_key = "header:x-user"
health_check = { kind = "udp" }
retry_budget = 0
circuit_breaker = { error_ratio = 1.5 }

[gateways.g]
listen = ["127.0.0.1:1"]
forwarded_headers = ["for", "port"]

[[routes]]
path = "/s"
split = [{ upstream = "a", weight = 1 }, { upstream = "nope", weight = 1 }]

[[routes]]
path = "/t"
upstream = "a"
sticky = "cookie:sid"
mirror = { upstream = "a", percent = 150 }
"#;

#[test]
fn upstream_and_route_policy_errors() {
    let (code, out, _, _dir) = check(BAD_POLICIES);
    assert_eq!(code, 1, "{out}");
    for (line, text) in [
        (3, "upstream \"a\": unknown selection \"fastest\""),
        (
            7,
            "upstream \"b\": `hash_key` only applies to selection = \"consistent_hash\"",
        ),
        (8, "upstream \"b\": unknown health check kind \"udp\""),
        (
            9,
            "upstream \"b\": `retry_budget` is a percentage from 1 to 100",
        ),
        (10, "upstream \"b\": `error_ratio` must be in (0, 1]"),
        (
            14,
            "gateway \"g\": unknown forwarded header \"port\": expected \"for\", \"proto\" or \"host\"",
        ),
        (18, "route \"#1\": unknown upstream \"nope\""),
        (23, "route \"#2\": `sticky` only applies with `split`"),
        (24, "route \"#2\": mirror `percent` must be from 0 to 100"),
    ] {
        let found = out
            .lines()
            .any(|l| l.contains(&format!(":{line}:")) && l.contains(text));
        assert!(
            found,
            "no error at line {line} containing {text:?} in:\n{out}"
        );
    }
}

const BAD_FRONT: &str = r#"[server]
header_timeout = "0s"
max_headers = 500
max_header_size = "2MiB"
max_connections = 0
[plugins.jwt]
kind = "jwt_auth"
algorithms = ["RS256"]
jwks_url = "http://127.0.0.1:9/keys"
[upstreams.u]
peers = ["127.0.0.1:9001"]
[gateways.g]
listen = ["127.0.0.1:8080"]
[[routes]]
upstream = "u"
[[routes]]
path = "/api//v1"
upstream = "u"
"#;

#[test]
fn client_limits_and_insecure_key_urls() {
    let (code, out, _, _dir) = check(BAD_FRONT);
    assert_eq!(code, 1, "{out}");
    for (line, text) in [
        (2, "[server]: `header_timeout` must be more than 0s"),
        (3, "[server]: `max_headers` must be between 1 and 256"),
        (4, "[server]: `max_header_size` must be between 1 and"),
        (5, "[server]: `max_connections` must be between 1 and"),
        (
            7,
            "plugin \"jwt\": jwks_url \"http://127.0.0.1:9/keys\" is plain http",
        ),
        (7, "could hand the gateway their own keys; use https"),
    ] {
        let found = out
            .lines()
            .any(|l| l.contains(&format!(":{line}:")) && l.contains(text));
        assert!(
            found,
            "no error at line {line} containing {text:?} in:\n{out}"
        );
    }
    let ok = BAD_FRONT
        .replace("header_timeout = \"0s\"\nmax_headers = 500\nmax_header_size = \"2MiB\"\nmax_connections = 0\n", "")
        .replace("jwks_url", "allow_insecure_jwks = true\njwks_url")
        .replace("/api//v1", "/api/v1");
    let (code, out, _, _dir) = check(&ok);
    assert_eq!(code, 0, "{out}");
}

/// The secrets Gatehouse publishes (its demo and example files) and `change-me` placeholders
/// are warned of, each with its line; a config with its own secrets gets no warning.
#[test]
fn check_warns_of_published_and_placeholder_secrets() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, out) = check_file(&root.join("conf/gatehouse.toml"));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("gatehouse.toml:52:") && out.contains("the admin token is a published"),
        "{out}"
    );
    assert!(out.contains("the JWT `secret` is a published"), "{out}");
    let (code, out) = check_file(&root.join("conf/examples/auth.toml"));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("consumer \"partner-acme\" has a published API key"),
        "{out}"
    );
    assert!(
        out.contains("user \"ops\" has a published password"),
        "{out}"
    );

    let own = |token: &str, secret: &str| {
        format!(
            "[server]\nadmin = \"127.0.0.1:9180\"\nadmin_token = \"{token}\"\n\
             [upstreams.u]\npeers = [\"127.0.0.1:9\"]\n\
             [plugins.j]\nkind = \"jwt_auth\"\nalgorithms = [\"HS256\"]\nsecret = \"{secret}\"\n\
             [gateways.g]\nlisten = [\"127.0.0.1:8080\"]\n[[routes]]\nupstream = \"u\"\n"
        )
    };
    let (code, out, _, _d) = check(&own(
        "Zq3v9LrT0pW2yXk8mN4bHc",
        "s9R2kL7qW3eT8yU1iO4pA6sDf5Gh0Jk2",
    ));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    let (code, out, _, _d) = check(&own(
        "our-token-CHANGE-ME-later",
        "please-change-this-secret-0123456789",
    ));
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("warning").count(), 2, "{out}");
}

#[test]
fn stores_and_their_references_are_checked() {
    let (code, out, _, _dir) = check(
        r#"[server]
node_name = "has space"
[stores.a]
url = "redis://127.0.0.1:6379"
cluster = ["redis://127.0.0.1:7000"]
[stores.b]
url = "http://nope"
[stores.c]
sentinel = { master = "m", nodes = [] }
[stores.d]
url = "redis://127.0.0.1:6379"
timeout = "0s"
[plugins.rl]
kind = "rate_limit"
rate = "5/s"
store = "missing"
[plugins.conc]
kind = "rate_limit"
concurrency = 5
store = "d"
[plugins.rep]
kind = "rate_limit"
rate = "5/s"
replicas = 3
[upstreams.up]
peers = ["127.0.0.1:1"]
[gateways.g]
listen = ["127.0.0.1:19999"]
[[routes]]
path = "/"
upstream = "up"
plugins = ["rl"]
"#,
    );
    assert_eq!(code, 1, "{out}");
    for (line, text) in [
        (
            2,
            "[server]: `node_name` must be 1 to 64 printable characters",
        ),
        (
            3,
            "store \"a\": set only one of `url`, `cluster` and `sentinel`",
        ),
        (7, "store \"b\": invalid Redis URL: "),
        (9, "store \"c\": `sentinel` needs `master`"),
        (12, "store \"d\": `timeout` must be more than 0"),
        (
            16,
            "plugin \"rl\": unknown store \"missing\" (stores: a, b, c, d)",
        ),
        (18, "plugin \"conc\": `store` applies to `rate` only"),
        (22, "plugin \"rep\": `replicas` applies with a `store` only"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!(":{line}:")) && l.contains(text)),
            "line {line}: {text}\n{out}"
        );
    }
    assert!(out.contains(": 8 errors"), "{out}");
}
