//! WebSocket upgrades pass through the gateway both ways.
//!
//! Kept in its own test binary so it does not run beside the 200 MB streaming test: Pingora
//! 0.9.1 can drop an upgraded tunnel when the upstream's 101 is read before the request's empty
//! body end (cloudflare/pingora#946, fixes proposed in #947/#1016), which CPU contention makes
//! likely. See README "Known issues".
mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_gateway() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
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
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.ws]\npeers = [\"{up}\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/ws\"\nupstream = \"ws\"\n"
        ),
        &[port],
    );
    for round in 0..10 {
        let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
            .await
            .expect("upgrade through the gateway");
        assert_eq!(resp.status(), 101);
        echo_round(&mut ws, round).await;
    }
}

async fn echo_round<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, round: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for i in 0..5 {
        ws.send(Message::text(format!("hello {round}.{i}")))
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
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
