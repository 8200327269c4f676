//! The front door, tried as an attacker would: exact bytes on a raw socket, against an upstream
//! that records the exact requests it receives. Every case is either refused with the right
//! status (and the connection closed where RFC 9112 says), answered by the route's plugins, or
//! forwarded in exactly one unambiguous form; none becomes two requests.
mod common;

use std::time::Duration;

use common::raw::{exchange, recording_upstream, Recorded, Records};
use common::*;

/// What a case must come to.
enum Want {
    /// Refused with this status, the connection closed, nothing sent upstream.
    Refused(u16),
    /// Answered by the gateway with this status (a route's plugin), nothing sent upstream.
    Denied(u16),
    /// Forwarded exactly once: the upstream's request line, headers that must have a value
    /// (`Some`) or be absent (`None`), and the body.
    Once {
        line: &'static str,
        headers: &'static [(&'static str, Option<&'static str>)],
        body: &'static [u8],
    },
    /// Answered with these statuses in order, the upstream getting these request lines.
    Each(&'static [u16], &'static [&'static str]),
    /// Never reaches the upstream whole: the client gets a 4xx or a closed connection.
    Cut,
}

use Want::*;

const fn once(line: &'static str) -> Want {
    Once {
        line,
        headers: &[],
        body: b"",
    }
}

fn cases() -> Vec<(&'static str, Vec<u8>, Want)> {
    let c = |name, req: &str, want| (name, req.as_bytes().to_vec(), want);
    vec![
        // Host and authority (RFC 9112 §3.2).
        c("no Host", "GET / HTTP/1.1\r\n\r\n", Refused(400)),
        c("two equal Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", Refused(400)),
        c("two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: internal.example.com\r\n\r\n", Refused(400)),
        c("Host with a space", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", Refused(400)),
        c("Host with userinfo", "GET / HTTP/1.1\r\nHost: u@internal.example.com\r\n\r\n", Refused(400)),
        c("Host with a bad port", "GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n", Refused(400)),
        c("Host with a path", "GET / HTTP/1.1\r\nHost: a/admin\r\n\r\n", Refused(400)),
        c("absolute-form without Host", "GET http://internal.example.com/ HTTP/1.1\r\n\r\n", Refused(400)),
        c(
            "absolute-form, HTTP/1.0, no Host: routed on its authority",
            "GET http://internal.example.com/x HTTP/1.0\r\n\r\n",
            Once {
                line: "GET /x HTTP/1.1",
                headers: &[("host", Some("internal.example.com")), ("x-route", Some("internal"))],
                body: b"",
            },
        ),
        c(
            "absolute-form with its Host",
            "GET http://internal.example.com//x?q=1 HTTP/1.1\r\nHost: internal.example.com\r\n\r\n",
            Once {
                line: "GET /x?q=1 HTTP/1.1",
                headers: &[("host", Some("internal.example.com")), ("x-route", Some("internal"))],
                body: b"",
            },
        ),
        c(
            "absolute-form with another Host",
            "GET http://internal.example.com/ HTTP/1.1\r\nHost: a\r\n\r\n",
            Refused(400),
        ),
        c("absolute-form, ftp", "GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("absolute-form with userinfo", "GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("asterisk-form", "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        // Framing (RFC 9112 §6).
        c(
            "two equal Content-Lengths",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
            Refused(400),
        ),
        c(
            "two Content-Lengths",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 30\r\n\r\nhi",
            Refused(400),
        ),
        c("Content-Length list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\nhi", Refused(400)),
        c("signed Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\nhi", Refused(400)),
        c("hex Content-Length", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x2\r\n\r\nhi", Refused(400)),
        c(
            "Content-Length with leading zeros: forwarded as the number",
            "POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 005\r\n\r\nhello",
            Once {
                line: "POST /p HTTP/1.1",
                headers: &[("content-length", Some("5"))],
                body: b"hello",
            },
        ),
        c(
            "Content-Length and chunked: chunked wins, once",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            Once {
                line: "POST / HTTP/1.1",
                headers: &[("content-length", None)],
                body: b"hi",
            },
        ),
        c(
            "gzip, chunked",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            Refused(501),
        ),
        c(
            "two Transfer-Encodings",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Refused(400),
        ),
        c(
            "chunked not last",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            Refused(400),
        ),
        c("xchunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", Refused(400)),
        c(
            "HTTP/1.0 chunked",
            "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Refused(400),
        ),
        c(
            "chunk extension",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"x\"\r\nhello\r\n0\r\n\r\n",
            Once {
                line: "POST / HTTP/1.1",
                headers: &[],
                body: b"hello",
            },
        ),
        c(
            "chunk size overflow",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n",
            Cut,
        ),
        c(
            "chunk size not hex",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5x\r\nhello\r\n0\r\n\r\n",
            Cut,
        ),
        c(
            "chunk longer than its size",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
            Cut,
        ),
        c(
            "chunked then a request for /admin: two requests, each routed",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
            Each(&[200, 403], &["POST / HTTP/1.1"]),
        ),
        // Header syntax.
        c("obs-fold", "GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n", Refused(400)),
        c("space in a name", "GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n", Refused(400)),
        c("space before the colon", "GET / HTTP/1.1\r\nHost : a\r\n\r\n", Refused(400)),
        c("NUL in a value", "GET / HTTP/1.1\r\nHost: a\r\nX-A: a\0b\r\n\r\n", Refused(400)),
        c("CR in a value", "GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n", Refused(400)),
        c("NUL in a name", "GET / HTTP/1.1\r\nHost: a\r\nX\0A: b\r\n\r\n", Refused(400)),
        c(
            "head ended by a bare LF, then a second request",
            "GET / HTTP/1.1\r\nHost: a\r\n\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
            Refused(400),
        ),
        c("a bare LF inside the head", "GET / HTTP/1.1\nHost: a\r\n\r\n", Refused(400)),
        // The request line.
        c("two spaces", "GET  / HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("tab in the target", "GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("space in the target", "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("a second request line", "GET /x HTTP/1.1 GET /admin HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("control byte in the target", "GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("HTTP/2.0 on an HTTP/1 connection", "GET / HTTP/2.0\r\nHost: a\r\n\r\n", Refused(400)),
        c("HTTP/0.9", "GET /\r\n\r\n", Cut),
        c("fragment", "GET /x#frag HTTP/1.1\r\nHost: a\r\n\r\n", once("GET /x HTTP/1.1")),
        // Paths: one canonical path, routed and sent.
        c("//admin", "GET //admin HTTP/1.1\r\nHost: a\r\n\r\n", Denied(403)),
        c("/%61dmin", "GET /%61dmin HTTP/1.1\r\nHost: a\r\n\r\n", Denied(403)),
        c("/x/%2e%2e/admin", "GET /x/%2e%2e/admin HTTP/1.1\r\nHost: a\r\n\r\n", Denied(403)),
        c("/x/.%2E/admin", "GET /x/.%2E/admin HTTP/1.1\r\nHost: a\r\n\r\n", Denied(403)),
        c("/./admin/", "GET /./admin/ HTTP/1.1\r\nHost: a\r\n\r\n", Denied(403)),
        c("encoded slash", "GET /admin%2fx HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("encoded backslash", "GET /x%5c..%5cadmin HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("raw backslash", "GET /x\\..\\admin HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("encoded NUL", "GET /admin%00.png HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("encoded CRLF", "GET /a%0d%0aX-Injected:%201 HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("broken escape", "GET /a%zz HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("..; segment", "GET /x/..;/admin HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("path parameter", "GET /admin;x/users HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("lower-case method", "get /admin HTTP/1.1\r\nHost: a\r\n\r\n", Refused(400)),
        c("Connection naming Host", "GET / HTTP/1.1\r\nHost: a\r\nConnection: close, Host\r\n\r\n", Refused(400)),
        c("Host with an empty label", "GET / HTTP/1.1\r\nHost: internal..example.com\r\n\r\n", Refused(400)),
        c("Host starting with a dot", "GET / HTTP/1.1\r\nHost: .example.com\r\n\r\n", Refused(400)),
        c(
            "non-ASCII query bytes are encoded",
            "GET /q?x=caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n",
            once("GET /q?x=caf%C3%A9 HTTP/1.1"),
        ),
        c(
            "double-encoded stays encoded",
            "GET /%2561dmin HTTP/1.1\r\nHost: a\r\n\r\n",
            once("GET /%2561dmin HTTP/1.1"),
        ),
        c(
            "escapes upper-cased, merged slashes, query kept",
            "GET /a//b/%7e/%3a?x=%2f&y=1 HTTP/1.1\r\nHost: a\r\n\r\n",
            once("GET /a/b/~/%3A?x=%2f&y=1 HTTP/1.1"),
        ),
        c("path case kept", "GET /ADMIN HTTP/1.1\r\nHost: a\r\n\r\n", once("GET /ADMIN HTTP/1.1")),
        c(
            "a canonical escape survives a rewrite",
            "GET /files/My%20Doc.pdf HTTP/1.1\r\nHost: a\r\n\r\n",
            once("GET /My%20Doc.pdf HTTP/1.1"),
        ),
        c(
            "a dot-led segment survives a rewrite",
            "GET /files/.well-known/x HTTP/1.1\r\nHost: a\r\n\r\n",
            once("GET /.well-known/x HTTP/1.1"),
        ),
        c("a dot-led route matches", "GET /.well-known/acme-challenge/t HTTP/1.1\r\nHost: a\r\n\r\n", Denied(403)),
        // Pipelining (RFC 9112 §9.3.2): answered in order.
        c(
            "two pipelined GETs",
            "GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
            Each(&[200, 200], &["GET /1 HTTP/1.1", "GET /2 HTTP/1.1"]),
        ),
        c(
            "a pipelined POST then GET",
            "POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
            Each(&[200, 200], &["POST /1 HTTP/1.1", "GET /2 HTTP/1.1"]),
        ),
        // Upgrades other than WebSocket are normal requests.
        c(
            "Upgrade: h2c",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
            Once {
                line: "GET / HTTP/1.1",
                headers: &[("upgrade", None), ("http2-settings", None)],
                body: b"",
            },
        ),
        c(
            "WebSocket asking for h2c too: only websocket goes upstream",
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, x\u{e9}\r\nUpgrade: websocket, h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            Once {
                line: "GET /ws HTTP/1.1",
                headers: &[
                    ("upgrade", Some("websocket")),
                    ("connection", Some("Upgrade")),
                    ("http2-settings", None),
                ],
                body: b"",
            },
        ),
        c(
            "WebSocket without a key",
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            Refused(400),
        ),
        c(
            "WebSocket with a body",
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 5\r\n\r\nhello",
            Refused(400),
        ),
        c(
            "POST with Upgrade",
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x\r\nContent-Length: 2\r\n\r\nhi",
            Once {
                line: "POST / HTTP/1.1",
                headers: &[("upgrade", None)],
                body: b"hi",
            },
        ),
    ]
}

fn config(port: u16, rec: std::net::SocketAddr) -> String {
    format!(
        r#"
[server]
threads = 1
plugins = ["rid"]
[plugins.rid]
kind = "request_id"
[plugins.deny]
kind = "ip_filter"
deny = ["0.0.0.0/0", "::/0"]
[plugins.internal]
kind = "headers"
request = {{ set = {{ "x-route" = "internal" }} }}
[upstreams.rec]
peers = ["{rec}"]
[gateways.g]
listen = ["127.0.0.1:{port}"]
[[routes]]
name = "catch-all"
upstream = "rec"
[[routes]]
name = "admin"
path = "/admin"
upstream = "rec"
plugins = ["deny"]
[[routes]]
name = "internal"
host = "internal.example.com"
upstream = "rec"
plugins = ["internal"]
[[routes]]
name = "files"
path = "/files"
strip_prefix = true
upstream = "rec"
[[routes]]
name = "acme"
path = "/.well-known/acme-challenge"
upstream = "rec"
plugins = ["deny"]
"#
    )
}

fn check(
    name: &str,
    want: &Want,
    ex: &common::raw::Exchange,
    got: &[Recorded],
) -> Result<(), String> {
    let statuses: Vec<u16> = ex.answers.iter().map(|a| a.status).collect();
    let lines: Vec<&str> = got.iter().map(|r| r.line()).collect();
    let say = |what: &str| {
        Err(format!(
            "{name}: {what}; answers {statuses:?}, closed {}, upstream got {lines:?}",
            ex.closed
        ))
    };
    match want {
        Refused(status) => {
            if statuses != [*status] || !ex.closed || !got.is_empty() {
                return say(&format!("want one {status} and a close, nothing upstream"));
            }
            let a = &ex.answers[0];
            if a.header("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("keep-alive"))
            {
                return say("a refusal that closes must not say keep-alive");
            }
        }
        Denied(status) => {
            if statuses != [*status] || !got.is_empty() {
                return say(&format!("want one {status}, nothing upstream"));
            }
        }
        Once {
            line,
            headers,
            body,
        } => {
            if statuses != [200] || got.len() != 1 {
                return say("want one request forwarded and one 200");
            }
            let r = &got[0];
            if r.line() != *line {
                return say(&format!("want request line {line:?}"));
            }
            for (h, v) in headers.iter() {
                match v {
                    Some(v) if r.header(h) != Some(*v) || r.count(h) != 1 => {
                        return say(&format!("want one {h}: {v}, head {:?}", r.head))
                    }
                    None if r.header(h).is_some() => {
                        return say(&format!("{h} must not be sent, head {:?}", r.head))
                    }
                    _ => {}
                }
            }
            if r.body != *body {
                return say(&format!("body {:?}", String::from_utf8_lossy(&r.body)));
            }
        }
        Each(want_statuses, want_lines) => {
            if statuses != *want_statuses || lines != *want_lines {
                return say(&format!("want {want_lines:?} answered {want_statuses:?}"));
            }
        }
        Cut => {
            let ok_status = statuses.iter().all(|s| (400..500).contains(s));
            if !got.is_empty() || !ok_status || (statuses.is_empty() && !ex.closed) {
                return say("want nothing whole upstream, a 4xx or a close");
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn raw_requests_are_refused_or_forwarded_in_one_form() {
    let (rec, records): (_, Records) = recording_upstream().await;
    let port = free_port();
    let _g = Gatehouse::start(&config(port, rec), &[port]);
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (name, req, want) in &cases {
        let n = match want {
            Each(s, _) => s.len(),
            _ => 1,
        };
        let ex = exchange(port, req, n, Duration::from_millis(150)).await;
        // Let an upstream that got something finish recording it.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let got = records.take();
        if let Err(e) = check(name, want, &ex, &got) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An upstream speaking raw HTTP/1.1 for the tunnel checks: `/fake` answers a `101` to h2c
/// (not the WebSocket asked for) and then records whatever comes through; `/big` refuses the
/// upgrade with a 3 MiB chunked answer.
async fn tricky_upstream(
    after_101: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let after_101 = after_101.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if buf.starts_with(b"GET /fake") {
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                        .await;
                    while let Ok(n) = s.read(&mut chunk).await {
                        if n == 0 {
                            break;
                        }
                        after_101.lock().unwrap().extend_from_slice(&chunk[..n]);
                    }
                } else {
                    let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                    for _ in 0..48 {
                        out.extend_from_slice(b"10000\r\n");
                        out.extend_from_slice(&[b'x'; 0x10000]);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b"0\r\n\r\n");
                    let _ = s.write_all(&out).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_tunnel_opens_only_on_a_real_websocket_101() {
    let after_101 = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let up = tricky_upstream(after_101.clone()).await;
    let (port, admin) = (free_port(), free_port());
    let _g = Gatehouse::start(
        &format!(
            "[server]\nthreads = 1\nadmin = \"127.0.0.1:{admin}\"\n\
             [upstreams.u]\npeers = [\"{up}\"]\ncircuit_breaker = {{ failures = 2, open_for = \"30s\" }}\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n[[routes]]\nupstream = \"u\"\n"
        ),
        &[port, admin],
    );
    let ws = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    // A 101 to another protocol: 502, and what the client sends next never reaches it.
    for _ in 0..3 {
        let mut req = ws("/fake").into_bytes();
        req.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let ex = exchange(port, &req, 1, Duration::from_millis(200)).await;
        assert_eq!(ex.answers.len(), 1, "{ex:?}");
        assert_eq!(ex.answers[0].status, 502);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(after_101.lock().unwrap().is_empty(), "nothing tunnelled");
    // A refused upgrade with a large answer: streamed whole, not cut at a buffer.
    for _ in 0..3 {
        let ex = exchange(port, ws("/big").as_bytes(), 1, Duration::from_millis(200)).await;
        assert_eq!(ex.answers[0].status, 200);
        assert_eq!(ex.answers[0].body.len(), 48 * 0x10000);
    }
    // Neither was the upstream failing.
    let status = admin_status(admin).await;
    assert_eq!(status["upstreams"]["u"]["circuit"], "closed", "{status}");
}

/// A pipelined head that arrives in two reads, the second beginning mid-header with spaces
/// in it, is one valid request (the request-line check looks only at lines read from their
/// start).
#[tokio::test]
async fn a_pipelined_head_split_across_reads_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (rec, records): (_, Records) = recording_upstream().await;
    let port = free_port();
    let _g = Gatehouse::start(&config(port, rec), &[port]);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nUser-Agent: x")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b" (X11; Linux x86_64) y\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.windows(12).filter(|w| *w == b"HTTP/1.1 200").count() < 2 {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    let got = records.take();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].header("user-agent"), Some("x (X11; Linux x86_64) y"));
}
