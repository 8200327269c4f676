//! Request mirroring: a sampled copy of a route's requests (the head as sent upstream, and the
//! body up to `max_body`) goes to a shadow upstream, fire-and-forget. The client's response and
//! latency never wait on the mirror: the copy is sent from a spawned task once the client's
//! body is complete, its answer is read and dropped, and at most `max_in_flight` copies per
//! route are outstanding (further ones are skipped, not queued). A body over `max_body` is not
//! mirrored at all: a truncated copy would be a different request.
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingora_http::RequestHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use crate::config::Mirror;
use crate::upstream::{Pool, Tried};

pub struct MirrorState {
    pool: Arc<Pool>,
    slots: Arc<AtomicUsize>,
    max_in_flight: usize,
    max_body: usize,
    head: Option<RequestHeader>,
    body: Vec<Bytes>,
    size: usize,
    done: bool,
}

/// Whether this request is sampled for mirroring; the state to fill if so.
pub fn sample(m: &Mirror, pool: &Arc<Pool>, slots: &Arc<AtomicUsize>) -> Option<MirrorState> {
    if m.percent <= 0.0 {
        return None;
    }
    if m.percent < 100.0 {
        let roll = (gatehouse_plugins::random_u64() % 10_000) as f64 / 100.0;
        if roll >= m.percent {
            return None;
        }
    }
    Some(MirrorState {
        pool: pool.clone(),
        slots: slots.clone(),
        max_in_flight: m.max_in_flight,
        max_body: m.max_body,
        head: None,
        body: Vec::new(),
        size: 0,
        done: false,
    })
}

impl MirrorState {
    /// The request head as it goes to the primary upstream (first try only).
    pub fn set_head(&mut self, head: &RequestHeader) {
        if self.head.is_none() {
            self.head = Some(head.clone());
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
                self.body.clear();
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
        let Some(mut head) = self.head.take() else {
            return;
        };
        if self
            .slots
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < self.max_in_flight).then_some(n + 1)
            })
            .is_err()
        {
            return;
        }
        let body = std::mem::take(&mut self.body);
        let size = self.size;
        let pool = self.pool.clone();
        let slots = self.slots.clone();
        tokio::spawn(async move {
            let limit = pool.connect_timeout() + pool.write_timeout() + pool.read_timeout();
            let _ = timeout(limit, send(&pool, &mut head, body, size)).await;
            slots.fetch_sub(1, Relaxed);
        });
    }
}

async fn send(pool: &Pool, head: &mut RequestHeader, body: Vec<Bytes>, size: usize) -> Option<()> {
    let idx = pool.select(b"", &Tried::default())?;
    head.remove_header(&http::header::TRANSFER_ENCODING);
    head.insert_header(http::header::CONTENT_LENGTH, size)
        .ok()?;
    head.insert_header(http::header::CONNECTION, "close").ok()?;
    let mut stream = super::upgrade::connect(pool, pool.addr(idx), head)
        .await
        .ok()?;
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
