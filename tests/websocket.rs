//! WebSocket upgrades pass through the gateway both ways: echo, a server that speaks first,
//! a refused handshake relayed as is, and an upstream that is down.
mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message};

/// A WebSocket upstream: echoes, after greeting when `greet`; records the path it was asked.
// tungstenite fixes the callback's error type; it is large, and never built here.
#[allow(clippy::result_large_err)]
async fn ws_upstream(greet: bool) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut path = String::new();
                let cb = |req: &tungstenite::handshake::server::Request,
                          resp: tungstenite::handshake::server::Response| {
                    path = format!(
                        "{} xff={}",
                        req.uri().path(),
                        req.headers()
                            .get("x-forwarded-for")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                    );
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, cb).await else {
                    return;
                };
                if greet
                    && ws
                        .send(Message::text(format!("welcome {path}")))
                        .await
                        .is_err()
                {
                    return;
                }
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    } else if msg.is_close() {
                        return;
                    }
                }
            });
        }
    });
    up
}

fn config(port: u16, upstreams: &str) -> String {
    format!(
        "[server]\nthreads = 2\n{upstreams}\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [[routes]]\npath = \"/ws\"\nupstream = \"ws\"\n\
         [[routes]]\npath = \"/chat\"\nrewrite = \"/room\"\nupstream = \"greeter\"\n\
         [[routes]]\npath = \"/refuse\"\nupstream = \"refuser\"\n\
         [[routes]]\npath = \"/down\"\nupstream = \"down\"\n"
    )
}

async fn setup() -> (Gatehouse, u16) {
    let ws = ws_upstream(false).await;
    let greeter = ws_upstream(true).await;
    let refuser = serve(|_req| async {
        hyper::Response::builder()
            .status(403)
            .header("x-why", "no")
            .body(full("not for you"))
            .unwrap()
    })
    .await;
    let down = free_port();
    let port = free_port();
    let g = Gatehouse::start(
        &config(
            port,
            &format!(
                "[upstreams.ws]\npeers = [\"{ws}\"]\n[upstreams.greeter]\npeers = [\"{greeter}\"]\n\
                 [upstreams.refuser]\npeers = [\"{refuser}\"]\n[upstreams.down]\npeers = [\"127.0.0.1:{down}\"]\n"
            ),
        ),
        &[port],
    );
    (g, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_gateway() {
    let (_g, port) = setup().await;
    for round in 0..20 {
        let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
            .await
            .expect("upgrade through the gateway");
        assert_eq!(resp.status(), 101);
        for i in 0..5 {
            ws.send(Message::text(format!("hello {round}.{i}")))
                .await
                .unwrap();
            let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("echo in time")
                .expect("a message")
                .expect("not an error");
            assert_eq!(
                m.into_text().unwrap().as_str(),
                format!("hello {round}.{i}")
            );
        }
        ws.send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.into_data().as_ref(), &[0u8, 1, 2, 255]);
        ws.close(None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_and_path_is_rewritten() {
    let (_g, port) = setup().await;
    for _ in 0..10 {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/chat/42"))
                .await
                .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            m.into_text().unwrap().as_str(),
            "welcome /room/42 xff=127.0.0.1"
        );
        ws.close(None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_failed_upgrades() {
    let (_g, port) = setup().await;
    match tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/refuse")).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            assert_eq!(resp.headers()["x-why"], "no");
            assert_eq!(resp.body().as_deref(), Some(&b"not for you"[..]));
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    match tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/down")).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 502);
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["status"], 502);
            assert!(body["request_id"].as_str().is_some());
        }
        other => panic!("expected a 502, got {other:?}"),
    }
}

/// A WebSocket echo upstream over TLS (the certificate files given).
async fn wss_upstream(cert: &str, key: &str) -> std::net::SocketAddr {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    b.set_certificate_chain_file(cert).unwrap();
    b.set_private_key_file(key, SslFiletype::PEM).unwrap();
    let acceptor = std::sync::Arc::new(b.build());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let ssl = openssl::ssl::Ssl::new(acceptor.context()).unwrap();
                let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
                if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                    return;
                }
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_to_a_tls_upstream_is_verified_and_tunnelled() {
    use common::pki::{Ca, Leaf};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ws CA");
    let ca_file = ca.write(dir.path(), "ca");
    let other = Ca::new("other").write(dir.path(), "other");
    let (c, k) = ca.issue(
        dir.path(),
        "ws",
        &Leaf {
            subject: &[("CN", "localhost")],
            dns: &["localhost"],
            ..Leaf::default()
        },
    );
    let up = wss_upstream(&c, &k).await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.wss]\npeers = [\"localhost:{p}\"]\ntls = true\nca = \"{ca_file}\"\n\
             [upstreams.wrong]\npeers = [\"localhost:{p}\"]\ntls = true\nca = \"{other}\"\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/wss\"\nupstream = \"wss\"\n\
             [[routes]]\npath = \"/wrong\"\nupstream = \"wrong\"\n",
            p = up.port()
        ),
        &[port],
    );
    for round in 0..5 {
        let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/wss"))
            .await
            .expect("upgrade through the gateway to a TLS upstream");
        assert_eq!(resp.status(), 101);
        for i in 0..3 {
            let text = format!("over tls {round}.{i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("echo in time")
                .unwrap()
                .unwrap();
            assert_eq!(m.into_text().unwrap().as_str(), text);
        }
        ws.close(None).await.unwrap();
    }
    match tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/wrong")).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 502),
        other => panic!("an upstream of another CA: {other:?}"),
    }
}

/// The tunnel is a proxied request like the others: the trace goes on (a client's own
/// traceparent, from an untrusted peer, unsampled and with the gateway's span as parent),
/// and a TLS gateway's HSTS is on the 101 and on an upstream's refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_carries_trace_context_and_hsts() {
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws = listener.local_addr().unwrap();
    let keep = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)]
                let cb = |req: &tungstenite::handshake::server::Request,
                          resp: tungstenite::handshake::server::Response| {
                    *keep.lock().unwrap() = req
                        .headers()
                        .get("traceparent")
                        .map(|v| v.to_str().unwrap().to_string());
                    Ok(resp)
                };
                if let Ok(mut s) = tokio_tungstenite::accept_hdr_async(stream, cb).await {
                    while let Some(Ok(m)) = s.next().await {
                        if m.is_close() || s.send(m).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let refuser = serve(|_req| async {
        hyper::Response::builder()
            .status(403)
            .body(full("not for you"))
            .unwrap()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = common::pki::Ca::new("ws CA");
    let (cert, key) = ca.issue(
        dir.path(),
        "server",
        &common::pki::Leaf {
            subject: &[("CN", "localhost")],
            dns: &["localhost"],
            ..Default::default()
        },
    );
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.ws]\npeers = [\"{ws}\"]\n[upstreams.refuser]\npeers = [\"{refuser}\"]\n\
             [gateways.web]\nlisten = [\"127.0.0.1:{port}\"]\n\
             tls = {{ cert = \"{cert}\", key = \"{key}\" }}\nhsts = \"max-age=600\"\n\
             [[routes]]\npath = \"/ws\"\nupstream = \"ws\"\n\
             [[routes]]\npath = \"/refuse\"\nupstream = \"refuser\"\n"
        ),
        &[port],
    );
    let tls = || common::pki::tls_connect(port, b"\x08http/1.1");
    let request = |path: &str| {
        let mut r = tungstenite::client::IntoClientRequest::into_client_request(format!(
            "wss://localhost:{port}{path}"
        ))
        .unwrap();
        r.headers_mut()
            .insert("traceparent", PARENT.parse().unwrap());
        r
    };
    let (mut s, resp) = tokio_tungstenite::client_async(request("/ws"), tls().await)
        .await
        .unwrap();
    assert_eq!(resp.headers()["strict-transport-security"], "max-age=600");
    s.send(Message::text("hi")).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        Message::text("hi")
    );
    let up = seen
        .lock()
        .unwrap()
        .clone()
        .expect("a traceparent upstream");
    let parts: Vec<&str> = up.split('-').collect();
    assert_eq!(parts.len(), 4, "{up}");
    assert_eq!(
        parts[1], "4bf92f3577b34da6a3ce929d0e0e4736",
        "the same trace"
    );
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the gateway's span is the parent"
    );
    assert_eq!(
        parts[3], "00",
        "an untrusted client's sampling is not believed"
    );

    match tokio_tungstenite::client_async(request("/refuse"), tls().await).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            assert_eq!(resp.headers()["strict-transport-security"], "max-age=600");
        }
        other => panic!("expected a 403, got {other:?}"),
    }
}
