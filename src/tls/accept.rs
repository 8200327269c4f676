//! A TLS gateway's handshakes, run by the gateway itself after a connection is admitted.
//!
//! Pingora's TLS listener does the handshake before the application sees the connection,
//! under a fixed 60 s timeout and outside any connection limit: 9,000 clients that connect
//! and send nothing held 1 GB for a minute, past `max_connections`, and the memory stayed
//! with the allocator afterwards. So TLS gateways listen on plain TCP and the front
//! (`crate::front`) admits a connection against `max_connections` first, then runs the
//! handshake here within `header_timeout` of the connection's start, as nginx's
//! `client_header_timeout` covers its handshake. The handshake itself is Pingora's
//! (`handshake_with_callback`: certificates by SNI, the client certificate in the digest).
use std::sync::Arc;

use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::server::handshake_with_callback;
use pingora::protocols::{GetSocketDigest, Peek, Stream};
use pingora::tls::ssl::{select_next_proto, AlpnError, SslAcceptor, SslAcceptorBuilder, SslMethod};
use prometheus::IntCounter;

use super::failures::{reason, REASONS};
use super::{CertStore, Certificates};

/// ALPN, wire format, in order of preference.
const H2_H1: &[u8] = b"\x02h2\x08http/1.1";

/// One TLS gateway's acceptor and its failure counters.
pub struct Handshaker {
    acceptor: SslAcceptor,
    certificates: Certificates,
    /// `gatehouse_tls_handshake_failures_total{gateway}`, by `REASONS`.
    failures: Vec<IntCounter>,
}

impl Handshaker {
    /// Mozilla's intermediate settings, then the gateway's: ALPN h2 when `h2`, OCSP stapling,
    /// `min_version`, ciphers and curves (`crate::tls::apply_options`).
    pub fn new(
        gateway: &str,
        store: Arc<CertStore>,
        h2: bool,
        options: &super::TlsOptions,
    ) -> Result<Handshaker, String> {
        let mut b: SslAcceptorBuilder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())
            .map_err(|e| format!("TLS: {e}"))?;
        if h2 {
            b.set_alpn_select_callback(|_, offered| {
                select_next_proto(H2_H1, offered).ok_or(AlpnError::NOACK)
            });
        }
        // OpenSSL refuses to resume a session made with a client certificate unless the
        // context names itself (`client_auth`); a gateway's name does.
        let sid = &gateway.as_bytes()[..gateway.len().min(32)];
        b.set_session_id_context(sid)
            .map_err(|e| format!("TLS: {e}"))?;
        super::staple_ocsp(&mut b, store.clone())?;
        super::apply_options(&mut b, options).map_err(|e| format!("TLS: {e}"))?;
        Ok(Handshaker {
            acceptor: b.build(),
            certificates: Certificates(store),
            failures: crate::metrics::tls_handshake_failures(gateway),
        })
    }

    /// The TLS stream, or `None` when the client closed before sending anything (a TCP
    /// probe, not a failure) or the handshake failed (counted, logged at debug). The caller
    /// bounds the time.
    pub async fn accept(&self, stream: Stream) -> Option<Stream> {
        let Ok(mut l4) = stream.into_any().downcast::<L4Stream>() else {
            // Listeners are plain TCP (server.rs): were that to change, say so loudly rather
            // than drop every connection without a trace.
            log::error!("TLS gateway: a connection that is not plain TCP; closed");
            return None;
        };
        // A byte first: a connection closed before any is a health check or a port probe.
        l4.try_peek(&mut [0u8; 1]).await.ok()?;
        let peer = l4.get_socket_digest().and_then(|d| d.peer_addr().cloned());
        match handshake_with_callback(&self.acceptor, *l4, &self.certificates).await {
            Ok(tls) => Some(Box::new(tls)),
            Err(e) => {
                self.failed(reason(&e.to_string()));
                log::debug!(target: "gatehouse::tls", "handshake from {peer:?} failed: {e}");
                None
            }
        }
    }

    /// Counts a failure; `why` is one of `REASONS`.
    pub fn failed(&self, why: &str) {
        if let Some(i) = REASONS.iter().position(|r| *r == why) {
            self.failures[i].inc();
        }
    }
}
