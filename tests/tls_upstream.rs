//! Upstreams over TLS (verified against a CA, refused on a wrong CA or name, a client
//! certificate presented, h2 by ALPN), HTTP/2 cleartext with prior knowledge on a plain
//! listener, and a gRPC-style exchange (streaming both ways, trailers) through the gateway.
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::pki::{tls_upstream, Ca, Leaf};
use common::*;
use http_body_util::BodyExt;

fn server_leaf() -> Leaf<'static> {
    Leaf {
        subject: &[("CN", "localhost")],
        dns: &["localhost"],
        ..Leaf::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_is_verified_and_presents_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("upstream CA");
    let other = Ca::new("some other CA");
    let clients = Ca::new("upstream clients CA");
    let ca_file = ca.write(d, "ca");
    let other_file = other.write(d, "other");
    let (sc, sk) = ca.issue(d, "server", &server_leaf());
    let (cc, ck) = clients.issue(
        d,
        "client",
        &Leaf {
            subject: &[("CN", "gatehouse"), ("O", "Edge")],
            client: true,
            ..Leaf::default()
        },
    );
    let plain = tls_upstream(&sc, &sk, None).await;
    let mtls = tls_upstream(&sc, &sk, Some(&clients)).await;
    let (p, m) = (plain.port(), mtls.port());
    let port = free_port();
    let mut toml = format!(
        "[upstreams.good]\npeers = [\"localhost:{p}\"]\ntls = true\nca = \"{ca_file}\"\n\
         [upstreams.h2]\npeers = [\"localhost:{p}\"]\ntls = true\nca = \"{ca_file}\"\nhttp2 = true\n\
         [upstreams.wrongca]\npeers = [\"127.0.0.1:{p}\"]\ntls = true\nsni = \"localhost\"\nca = \"{other_file}\"\n\
         [upstreams.wrongname]\npeers = [\"127.0.0.1:{p}\"]\ntls = true\nsni = \"api.internal\"\nca = \"{ca_file}\"\n\
         [upstreams.roots]\npeers = [\"localhost:{p}\"]\ntls = true\n\
         [upstreams.insecure]\npeers = [\"127.0.0.1:{p}\"]\ntls = true\ninsecure_skip_verify = true\n\
         [upstreams.mtls]\npeers = [\"localhost:{m}\"]\ntls = true\nca = \"{ca_file}\"\nclient_cert = \"{cc}\"\nclient_key = \"{ck}\"\n\
         [upstreams.nocert]\npeers = [\"localhost:{m}\"]\ntls = true\nca = \"{ca_file}\"\n\
         [gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n"
    );
    for name in [
        "good",
        "h2",
        "wrongca",
        "wrongname",
        "roots",
        "insecure",
        "mtls",
        "nocert",
    ] {
        toml.push_str(&format!(
            "[[routes]]\npath = \"/{name}\"\nupstream = \"{name}\"\n"
        ));
    }
    let g = Gatehouse::start(&toml, &[port]);
    let c = client();
    let get = |path: &'static str| {
        let c = c.clone();
        async move {
            let r = c
                .get(format!("http://127.0.0.1:{port}/{path}"))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, (), r.text().await.unwrap())
        }
    };
    let (s, _, body) = get("good").await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["client"], serde_json::Value::Null);

    let (s, _, body) = get("h2").await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], "HTTP/2.0", "ALPN chose h2");

    for refused in ["wrongca", "wrongname", "roots", "nocert"] {
        let (s, _, body) = get(refused).await;
        assert_eq!(s, 502, "{refused}: {body}");
        assert!(
            body.contains("\"request_id\""),
            "{refused}: a 502 with a request id: {body}"
        );
    }
    let (s, _, body) = get("insecure").await;
    assert_eq!(s, 200, "{body}");

    let (s, _, body) = get("mtls").await;
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["client"], "gatehouse",
        "the client certificate was presented"
    );
    let log = g.log();
    assert!(
        log.contains("certificate verify failed") || log.contains("TLS"),
        "the log says why: {log}"
    );
}

#[test]
fn check_warns_about_skipped_verification_and_wants_a_name() {
    let (code, out, _, _d) = check(
        "[upstreams.a]\npeers = [\"127.0.0.1:9443\"]\ntls = true\ninsecure_skip_verify = true\n\
         [gateways.web]\nlisten = [\"127.0.0.1:8080\"]\n[[routes]]\nupstream = \"a\"\n",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("bad.toml:4:")
            && out.contains("warning: ")
            && out.contains("insecure_skip_verify"),
        "{out}"
    );
    let (code, out, _, _d) = check(
        "[upstreams.a]\npeers = [\"127.0.0.1:9443\"]\ntls = true\n\
         [upstreams.b]\npeers = [\"127.0.0.1:9444\"]\nca = \"ca.pem\"\nclient_cert = \"c.pem\"\n\
         [gateways.web]\nlisten = [\"127.0.0.1:8080\"]\n[[routes]]\nupstream = \"a\"\n\
         [[routes]]\npath = \"/b\"\nupstream = \"b\"\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("peer 127.0.0.1:9443 is an address: set `sni`"),
        "{out}"
    );
    assert!(
        out.contains("bad.toml:6:") && out.contains("`ca` needs `tls = true`"),
        "{out}"
    );
    assert!(out.contains("`client_cert` needs `tls = true`"), "{out}");
}

/// A gRPC-style upstream over h2c: echoes each request data frame as soon as it arrives,
/// then ends with `grpc-status` trailers; it refuses requests without `te: trailers`.
async fn h2c_upstream() -> std::net::SocketAddr {
    use hyper::body::Frame;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let te = req
                            .headers()
                            .get("te")
                            .map(|v| v.to_str().unwrap().to_string());
                        let version = format!("{:?}", req.version());
                        let (tx, rx) =
                            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(8);
                        let mut body = req.into_body();
                        tokio::spawn(async move {
                            if te.as_deref() != Some("trailers") {
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", "3".parse().unwrap());
                                t.insert("grpc-message", "no te: trailers".parse().unwrap());
                                let _ = tx.send(Ok(Frame::trailers(t))).await;
                                return;
                            }
                            let _ = tx
                                .send(Ok(Frame::data(Bytes::from(format!("{version};")))))
                                .await;
                            let mut n = 0;
                            while let Some(Ok(f)) = body.frame().await {
                                // (An empty frame may end the stream.)
                                if let Ok(d) = f.into_data().map_err(drop).and_then(|d| {
                                    if d.is_empty() {
                                        Err(())
                                    } else {
                                        Ok(d)
                                    }
                                }) {
                                    n += 1;
                                    let _ = tx.send(Ok(Frame::data(d))).await;
                                }
                            }
                            let mut t = http::HeaderMap::new();
                            t.insert("grpc-status", "0".parse().unwrap());
                            t.insert("grpc-message", format!("echoed {n}").parse().unwrap());
                            let _ = tx.send(Ok(Frame::trailers(t))).await;
                        });
                        let stream =
                            Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
                                rx.recv().await.map(|f| (f, rx))
                            }));
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(http_body_util::StreamBody::new(stream))
                                .unwrap(),
                        )
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_and_a_grpc_style_stream_with_trailers() {
    use hyper::body::Frame;
    let up = h2c_upstream().await;
    let web = echo("web").await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.grpc]\npeers = [\"{up}\"]\nhttp2 = true\n\
             [upstreams.web]\npeers = [\"{web}\"]\n\
             [gateways.internal]\nlisten = [\"127.0.0.1:{port}\"]\nh2c = true\n\
             [[routes]]\npath = \"/echo.Echo/\"\nupstream = \"grpc\"\n\
             [[routes]]\nupstream = \"web\"\n"
        ),
        &[port],
    );
    // HTTP/1.1 and HTTP/2 with prior knowledge on the same listener.
    let r = client()
        .get(format!("http://127.0.0.1:{port}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_11)
    );
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(format!("http://127.0.0.1:{port}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );

    // A request shorter than the preface is still HTTP/1 (no wait for 24 bytes).
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(b"GET /x HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer))
        .await
        .expect("answered at once")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A stream: each message goes out only after the previous one came back.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let stream = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (f, rx))
    }));
    let req = hyper::Request::post(format!("http://127.0.0.1:{port}/echo.Echo/Stream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(stream))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = next(&mut body).await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(
        &first[..],
        b"HTTP/2.0;",
        "the upstream got HTTP/2 with te: trailers"
    );
    for i in 0..3 {
        let msg = Bytes::from(format!("message {i}"));
        tx.send(Ok(Frame::data(msg.clone()))).await.unwrap();
        let back = next(&mut body).await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(back, msg, "echoed while the request is still open");
    }
    drop(tx);
    let trailers = loop {
        let f = next(&mut body).await.expect("trailers").unwrap();
        if let Ok(t) = f.into_trailers() {
            break t;
        }
    };
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "echoed 3");
}

async fn next(
    b: &mut hyper::body::Incoming,
) -> Option<Result<hyper::body::Frame<Bytes>, hyper::Error>> {
    tokio::time::timeout(Duration::from_secs(10), b.frame())
        .await
        .expect("a frame within 10 s")
}

/// On an h2c listener, a client that sends the preface and nothing more (no SETTINGS) holds
/// its connection no longer than header_timeout from its start; one that sends part of the
/// preface and stops, likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_silent_clients_are_let_go_at_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = echo("up").await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[server]\nheader_timeout = \"1s\"\n[upstreams.up]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\nh2c = true\n[[routes]]\nupstream = \"up\"\n"
        ),
        &[port],
    );
    for sent in [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &b"PRI * HTTP/2"[..],
    ] {
        let start = std::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(sent).await.unwrap();
        let mut buf = vec![0u8; 4096];
        // The gateway may send its SETTINGS first; what matters is that it hangs up.
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{sent:?}: still open after 5 s");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
            "{sent:?}: closed after {took:?}"
        );
    }
}

/// Active health checks over TLS check each peer under its own name (SNI, verified name,
/// Host), as its requests are: a peer whose certificate is not for its name is unhealthy and
/// gets no traffic. Before, every peer was checked under the first peer's name with the name
/// check off, so such a peer passed its checks and failed its requests. Needs a second name
/// for loopback: the machine's host name when it resolves to 127.0.0.1 (else skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_verify_each_peer_under_its_own_name() {
    use std::net::ToSocketAddrs;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim().to_string();
    let loopback = (host.as_str(), 0)
        .to_socket_addrs()
        .is_ok_and(|mut a| a.all(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST));
    if host.is_empty() || host == "localhost" || !loopback {
        eprintln!("skipped: host name {host:?} does not resolve to 127.0.0.1 only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("upstream CA");
    let ca_file = ca.write(d, "ca");
    let leaf = |name: &'static str| Leaf {
        subject: &[],
        dns: Box::leak(Box::new([name])),
        ..Leaf::default()
    };
    let (ac, ak) = ca.issue(d, "a", &leaf("localhost"));
    let own: &'static str = Box::leak(host.clone().into_boxed_str());
    let (bc, bk) = ca.issue(d, "b", &leaf(own));
    let (wc, wk) = ca.issue(d, "w", &leaf("wrong.test"));
    let a = tls_upstream(&ac, &ak, None).await.port();
    let b = tls_upstream(&bc, &bk, None).await.port();
    let w = tls_upstream(&wc, &wk, None).await.port();
    let (port, admin) = (free_port(), free_port());
    let _g = Gatehouse::start(
        &format!(
            "[server]\nadmin = \"127.0.0.1:{admin}\"\n\
             [upstreams.pool]\npeers = [\"localhost:{a}\", \"{host}:{b}\", \"{host}:{w}\"]\n\
             tls = true\nca = \"{ca_file}\"\nretries = 0\n\
             health_check = {{ kind = \"http\", path = \"/\", interval = \"200ms\", \
             timeout = \"500ms\", unhealthy_after = 1, healthy_after = 1 }}\n\
             [gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n[[routes]]\nupstream = \"pool\"\n"
        ),
        &[port, admin],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let healthy = loop {
        let s = admin_status(admin).await;
        let h: Vec<_> = (0..3)
            .map(|i| s["upstreams"]["pool"]["peers"][i]["healthy"].clone())
            .collect();
        if h.iter().all(|v| v.is_boolean()) && h[2] == false || std::time::Instant::now() > deadline
        {
            break h;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        healthy,
        [true, true, false],
        "a and b under their names, w not"
    );
    for _ in 0..6 {
        let (status, _, body) = get(&format!("http://127.0.0.1:{port}/x"), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
}
