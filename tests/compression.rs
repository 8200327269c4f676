//! Per-route response compression: each coding decoded by a real decoder and compared byte
//! for byte, q-value negotiation, and the responses that must pass untouched.
mod common;

use std::io::Read;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

/// 100 KB of JSON that compresses as real API output does (repetitive keys, varying values).
fn json_body() -> Vec<u8> {
    let mut s = String::from("[");
    let mut i = 0u64;
    while s.len() < 100_000 {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            "{{\"id\":{i},\"name\":\"user {}\",\"score\":{}}}",
            i * 7919 % 10007,
            i * i % 1013
        ));
        i += 1;
    }
    s.push(']');
    s.into_bytes()
}

async fn upstream() -> std::net::SocketAddr {
    serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        let b = hyper::Response::builder();
        let json = "application/json";
        match req.uri().path() {
            // As nginx does: a weak comparison, so the client's W/"v1" or "v1" both match.
            "/json" | "/gz/json"
                if req
                    .headers()
                    .get("if-none-match")
                    .is_some_and(|v| v.to_str().unwrap().contains("\"v1\"")) =>
            {
                b.status(304).header("etag", "\"v1\"").body(full(""))
            }
            "/json" | "/gz/json" => b
                .header("content-type", json)
                .header("etag", "\"v1\"")
                .header("accept-ranges", "bytes")
                .body(full(json_body())),
            "/small" => b.header("content-type", json).body(full("{\"ok\":true}")),
            "/png" => b
                .header("content-type", "image/png")
                .body(full(vec![7u8; 5000])),
            "/encoded" => b
                .header("content-type", json)
                .header("content-encoding", "gzip")
                .body(full(vec![1u8; 3000])),
            "/no-transform" => b
                .header("content-type", json)
                .header("cache-control", "public, no-transform")
                .body(full(json_body())),
            "/events" => b
                .header("content-type", "text/event-stream")
                .body(full("data: x\n\n".repeat(200))),
            "/stream" => {
                // No Content-Length: chunks as they come.
                let body = json_body();
                let parts: Vec<Bytes> = body.chunks(7000).map(Bytes::copy_from_slice).collect();
                let s = futures_util::stream::iter(parts)
                    .map(|c| Ok::<_, std::io::Error>(Frame::data(c)));
                b.header("content-type", "text/plain; charset=utf-8")
                    .body(BodyExt::boxed(StreamBody::new(s)))
            }
            _ => b.status(404).body(full("")),
        }
        .unwrap()
    })
    .await
}

fn config(up: std::net::SocketAddr, port: u16) -> String {
    format!(
        r#"
[upstreams.u]
peers = ["{up}"]
[gateways.g]
listen = ["127.0.0.1:{port}"]
[[routes]]
path = "/gz"
upstream = "u"
compression = {{ algorithms = ["gzip"], min_size = "10", level = 9, types = ["application/json"] }}
[[routes]]
path = "/"
upstream = "u"
compression = ["zstd", "br", "gzip"]
[[routes]]
path = "/plain"
strip_prefix = true
upstream = "u"
"#
    )
}

async fn fetch(
    port: u16,
    method: reqwest::Method,
    path: &str,
    accept: Option<&str>,
) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let mut r = client().request(method, format!("http://127.0.0.1:{port}{path}"));
    if let Some(a) = accept {
        r = r.header("accept-encoding", a);
    }
    let resp = r.send().await.expect("response");
    assert_eq!(resp.status(), 200, "{path}");
    let h = resp.headers().clone();
    (h, resp.bytes().await.expect("body").to_vec())
}

fn decode(coding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .expect("gzip");
        }
        "br" => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .expect("br");
        }
        "zstd" => out = zstd::stream::decode_all(body).expect("zstd"),
        other => panic!("unexpected coding {other}"),
    }
    out
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_coding_decodes_to_the_original() {
    let up = upstream().await;
    let port = free_port();
    let _g = Gatehouse::start(&config(up, port), &[port]);
    let original = json_body();
    for coding in ["zstd", "br", "gzip"] {
        let (h, body) = fetch(port, reqwest::Method::GET, "/json", Some(coding)).await;
        assert_eq!(header(&h, "content-encoding"), Some(coding));
        assert_eq!(header(&h, "content-length"), None, "{coding}");
        assert_eq!(header(&h, "accept-ranges"), None, "{coding}");
        assert_eq!(header(&h, "vary"), Some("Accept-Encoding"));
        assert_eq!(header(&h, "etag"), Some("W/\"v1\""), "the body changed");
        assert!(
            body.len() < original.len() / 3,
            "{coding}: {} bytes",
            body.len()
        );
        assert_eq!(decode(coding, &body), original, "{coding}");
    }
    // A body that arrives in chunks, without a length, is compressed as it streams.
    let (h, body) = fetch(port, reqwest::Method::GET, "/stream", Some("gzip")).await;
    assert_eq!(header(&h, "content-encoding"), Some("gzip"));
    assert_eq!(decode("gzip", &body), original);
    // The table form: gzip at level 9, its own size floor and types.
    let (h, body) = fetch(port, reqwest::Method::GET, "/gz/json", Some("br, gzip")).await;
    assert_eq!(header(&h, "content-encoding"), Some("gzip"));
    assert_eq!(decode("gzip", &body), original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_chooses_by_q_value_and_the_route_breaks_ties() {
    let up = upstream().await;
    let port = free_port();
    let _g = Gatehouse::start(&config(up, port), &[port]);
    for (accept, want) in [
        ("gzip, deflate, br, zstd", Some("zstd")),
        ("gzip;q=1.0, br;q=0.5", Some("gzip")),
        ("br;q=0.9, zstd;q=0.1", Some("br")),
        ("*;q=0.3, zstd;q=0", Some("br")),
        ("identity", None),
        ("gzip;q=0", None),
    ] {
        let (h, body) = fetch(port, reqwest::Method::GET, "/json", Some(accept)).await;
        assert_eq!(header(&h, "content-encoding"), want, "{accept}");
        assert_eq!(header(&h, "vary"), Some("Accept-Encoding"), "{accept}");
        if want.is_none() {
            assert_eq!(body, json_body(), "{accept}");
            assert_eq!(
                header(&h, "etag"),
                Some("\"v1\""),
                "untouched body, strong ETag"
            );
        }
    }
    // No Accept-Encoding: the body as the upstream sent it, with its length.
    let (h, body) = fetch(port, reqwest::Method::GET, "/json", None).await;
    assert_eq!(header(&h, "content-encoding"), None);
    assert_eq!(body, json_body());
    assert_eq!(header(&h, "content-length"), Some(&*body.len().to_string()));
    // HEAD gets the head a GET would get, and no body.
    let (h, body) = fetch(port, reqwest::Method::HEAD, "/json", Some("br")).await;
    assert_eq!(header(&h, "content-encoding"), Some("br"));
    assert!(body.is_empty());
    // The connection is still usable after the HEAD (no body was owed).
    let (h, _) = fetch(port, reqwest::Method::GET, "/json", Some("br")).await;
    assert_eq!(header(&h, "content-encoding"), Some("br"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn some_responses_pass_untouched() {
    let up = upstream().await;
    let port = free_port();
    let _g = Gatehouse::start(&config(up, port), &[port]);
    let all = Some("gzip, br, zstd");
    // Under min_size (1 KiB by default), not a listed type, already encoded, no-transform,
    // an event stream, a route without compression.
    for path in [
        "/small",
        "/png",
        "/encoded",
        "/no-transform",
        "/events",
        "/plain/json",
    ] {
        let (h, body) = fetch(port, reqwest::Method::GET, path, all).await;
        let ce = header(&h, "content-encoding");
        if path == "/encoded" {
            assert_eq!(ce, Some("gzip"), "never recompressed");
            assert_eq!(body, vec![1u8; 3000]);
        } else {
            assert_eq!(ce, None, "{path}");
        }
        assert_eq!(
            header(&h, "content-length").map(str::to_string),
            Some(body.len().to_string()),
            "{path}"
        );
    }
    // Only a response that could have been compressed says it varies by Accept-Encoding.
    let (h, _) = fetch(port, reqwest::Method::GET, "/png", all).await;
    assert_eq!(header(&h, "vary"), None);
}

#[test]
fn bad_compression_settings_are_refused_with_their_line() {
    let (code, out, _, _) = check(
        r#"
[upstreams.u]
peers = ["127.0.0.1:9"]
[gateways.g]
listen = ["127.0.0.1:1"]
[[routes]]
upstream = "u"
compression = ["gzip", "deflate"]
[[routes]]
path = "/b"
upstream = "u"
compression = { algorithms = ["br"], level = 12, types = ["json"] }
[[routes]]
path = "/c"
upstream = "u"
compression = { algorithm = ["br"] }
"#,
    );
    assert_ne!(code, 0);
    assert!(
        out.contains(":8:24: error: route \"#1\": unknown encoding \"deflate\""),
        "{out}"
    );
    assert!(
        out.contains(":12:") && out.contains("br level 12 is out of range (1 to 11)"),
        "{out}"
    );
    assert!(out.contains("invalid media type \"json\""), "{out}");
    assert!(
        out.contains(":16:") && out.contains("unknown field `algorithm`"),
        "{out}"
    );
}

/// RFC 9110 §15.4.5: a 304 carries the ETag and Vary its 200 would have. A client that got
/// the encoded answer (weak tag) revalidates with the weak form and gets the weak form back;
/// one that got the identity answer gets the strong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_carries_the_etag_and_vary_of_its_200() {
    let up = upstream().await;
    let port = free_port();
    let _g = Gatehouse::start(&config(up, port), &[port]);
    let (h, _) = fetch(port, reqwest::Method::GET, "/json", Some("gzip")).await;
    assert_eq!(header(&h, "etag"), Some("W/\"v1\""));
    for (held, want) in [("W/\"v1\"", "W/\"v1\""), ("\"v1\"", "\"v1\"")] {
        let r = client()
            .get(format!("http://127.0.0.1:{port}/json"))
            .header("accept-encoding", "gzip")
            .header("if-none-match", held)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{held}");
        assert_eq!(header(r.headers(), "etag"), Some(want), "{held}");
        assert_eq!(
            header(r.headers(), "vary"),
            Some("Accept-Encoding"),
            "{held}"
        );
    }
}
