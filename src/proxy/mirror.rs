//! Request mirroring: a sampled copy of a route's requests (the head as sent upstream, and the
//! body up to `max_body`) goes to a shadow upstream, fire-and-forget. The client's response and
//! latency never wait on the mirror: the copy is sent from a spawned task once the client's
//! body is complete, its answer is read and dropped, and at most `max_in_flight` copies per
//! route are outstanding — counted from the moment a request is sampled, before any of its
//! body is held, so memory is bounded by `max_in_flight × max_body` (further requests are
//! skipped, not queued). A body over `max_body` is not mirrored at all: a truncated copy would
//! be a different request. A shadow service is often less guarded than the real one, so the
//! copy goes without the client's credentials (Authorization, Cookie, and the API-key,
//! consumer and claim headers of the route's auth plugins) unless `keep_credentials = true`.
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingora_http::RequestHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use http::HeaderName;

use crate::config::Mirror;
use crate::upstream::{Pool, Tried};

/// One of a route's mirror slots, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

pub struct MirrorState {
    pool: Arc<Pool>,
    slot: Option<Slot>,
    max_body: usize,
    /// Headers the copy goes without; None keeps them all.
    strip: Option<Arc<[HeaderName]>>,
    head: Option<RequestHeader>,
    body: Vec<Bytes>,
    size: usize,
    done: bool,
}

/// Whether this request is sampled for mirroring (and a slot is free); the state to fill if
/// so. `strip` lists the headers the copy goes without.
pub fn sample(
    m: &Mirror,
    pool: &Arc<Pool>,
    slots: &Arc<AtomicUsize>,
    strip: &Arc<[HeaderName]>,
) -> Option<MirrorState> {
    if m.percent <= 0.0 {
        return None;
    }
    if m.percent < 100.0 {
        let roll = (gatehouse_plugins::random_u64() % 10_000) as f64 / 100.0;
        if roll >= m.percent {
            return None;
        }
    }
    slots
        .fetch_update(Relaxed, Relaxed, |n| (n < m.max_in_flight).then_some(n + 1))
        .ok()?;
    Some(MirrorState {
        pool: pool.clone(),
        slot: Some(Slot(slots.clone())),
        max_body: m.max_body,
        strip: (!m.keep_credentials).then(|| strip.clone()),
        head: None,
        body: Vec::new(),
        size: 0,
        done: false,
    })
}

impl MirrorState {
    /// The request head as it goes to the primary upstream (first try only), less the
    /// credentials.
    pub fn set_head(&mut self, head: &RequestHeader) {
        if self.head.is_none() {
            let mut copy = head.clone();
            for h in self.strip.iter().flat_map(|s| s.iter()) {
                copy.remove_header(h);
            }
            self.head = Some(copy);
        }
    }

    /// A chunk of the client's body; at its end, sends the copy.
    pub fn on_body(&mut self, chunk: Option<&Bytes>, end: bool) {
        if self.done {
            return;
        }
        if let Some(c) = chunk {
            self.size += c.len();
            if self.size > self.max_body {
                self.done = true;
                self.body = Vec::new();
                self.slot = None;
                return;
            }
            self.body.push(c.clone());
        }
        if end {
            self.done = true;
            self.fire();
        }
    }

    fn fire(&mut self) {
        let (Some(mut head), Some(slot)) = (self.head.take(), self.slot.take()) else {
            return;
        };
        let body = std::mem::take(&mut self.body);
        let size = self.size;
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let limit = pool.connect_timeout() + pool.write_timeout() + pool.read_timeout();
            let _ = timeout(limit, send(&pool, &mut head, body, size)).await;
            drop(slot);
        });
    }
}

async fn send(pool: &Pool, head: &mut RequestHeader, body: Vec<Bytes>, size: usize) -> Option<()> {
    let idx = pool.select(b"", &Tried::default())?;
    head.remove_header(&http::header::TRANSFER_ENCODING);
    head.insert_header(http::header::CONTENT_LENGTH, size)
        .ok()?;
    head.insert_header(http::header::CONNECTION, "close").ok()?;
    let mut stream = super::upgrade::connect(pool, idx, head).await.ok()?;
    for b in body {
        timeout(pool.write_timeout(), stream.write_all(&b))
            .await
            .ok()?
            .ok()?;
    }
    // Read the answer's head so the mirror sees a normal exchange, then hang up.
    let mut buf = BytesMut::with_capacity(1024);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
        if timeout(pool.read_timeout(), stream.read_buf(&mut buf))
            .await
            .ok()?
            .ok()?
            == 0
        {
            break;
        }
    }
    Some(())
}
