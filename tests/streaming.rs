//! Bodies stream both ways without buffering: 200 MB up and down with the gateway's memory
//! bounded, and server-sent events arrive as sent.
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

const MB: usize = 1024 * 1024;
const TOTAL: usize = 200 * MB;
static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

fn chunks(total: usize) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::iter((0..total / CHUNK.len()).map(|_| Ok(Bytes::from_static(&CHUNK))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_with_bounded_memory() {
    let up = serve(|req: hyper::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/download" {
            let s = chunks(TOTAL).map(|c| c.map(Frame::data));
            return hyper::Response::new(BodyExt::boxed(StreamBody::new(s)));
        }
        // Upload: count what arrives, frame by frame.
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(f) = body.frame().await {
            if let Ok(d) = f.map(|f| f.into_data()) {
                n += d.map(|d| d.len()).unwrap_or(0);
            } else {
                break;
            }
        }
        hyper::Response::new(full(n.to_string()))
    })
    .await;
    let port = free_port();
    let g = Gatehouse::start(
        &format!(
            "[server]\nthreads = 2\n[upstreams.u]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n[[routes]]\nupstream = \"u\"\n"
        ),
        &[port],
    );
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    // Warm up so the baseline includes the connection pools and runtime.
    c.post(format!("{base}/upload"))
        .body("hi")
        .send()
        .await
        .unwrap();
    let rss_before = g.mem_kib("VmRSS");

    let start = Instant::now();
    let r = c
        .post(format!("{base}/upload"))
        .body(reqwest::Body::wrap_stream(chunks(TOTAL)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), TOTAL.to_string());
    let up_time = start.elapsed();

    let start = Instant::now();
    let r = c.get(format!("{base}/download")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut got = 0usize;
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        got += chunk.unwrap().len();
    }
    assert_eq!(got, TOTAL);
    let down_time = start.elapsed();

    let peak = g.mem_kib("VmHWM");
    let growth_mb = peak.saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!(
        "200 MB up in {up_time:?}, down in {down_time:?}; RSS before {} KiB, peak {peak} KiB (+{growth_mb:.1} MB)",
        rss_before
    );
    assert!(growth_mb < 20.0, "gateway memory grew by {growth_mb:.1} MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_are_not_buffered() {
    let up = serve(|_req| async move {
        let events = futures_util::stream::unfold(0u32, |i| async move {
            if i == 3 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let ev = Bytes::from(format!("id: {i}\ndata: tick {i}\n\n"));
            Some((Ok::<_, std::io::Error>(Frame::data(ev)), i + 1))
        });
        hyper::Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(BodyExt::boxed(StreamBody::new(events)))
            .unwrap()
    })
    .await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[upstreams.u]\npeers = [\"{up}\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/events\"\nupstream = \"u\"\n"
        ),
        &[port],
    );
    let start = Instant::now();
    let r = client()
        .get(format!("http://127.0.0.1:{port}/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut s = r.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        arrivals.push(start.elapsed());
    }
    assert_eq!(
        text,
        "id: 0\ndata: tick 0\n\nid: 1\ndata: tick 1\n\nid: 2\ndata: tick 2\n\n"
    );
    // The first event reaches the client long before the stream ends.
    assert!(arrivals[0] < Duration::from_millis(250), "{arrivals:?}");
    assert!(
        *arrivals.last().unwrap() >= Duration::from_millis(550),
        "{arrivals:?}"
    );
}
