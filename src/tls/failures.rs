//! Failed TLS handshakes, counted by reason instead of logged as errors.
//!
//! Pingora logs every failed downstream handshake at ERROR, one line each: a port scanner, a
//! plain-HTTP request on the TLS port, a client that does not trust the certificate or one
//! whose SNI is refused all write a line, so anyone could fill the journal at the cost of a
//! TCP connection. They are the clients' doing, as nginx judges them (it logs them at info):
//! here they become a counter, `gatehouse_tls_handshake_failures_total{reason}`, and a debug
//! line (`RUST_LOG=gatehouse::tls=debug` shows them with the peer and OpenSSL's words).
use std::net::SocketAddr;
use std::sync::Mutex;

/// What failed, from OpenSSL's and Pingora's words; a fixed set, so the series are bounded.
pub fn reason(message: &str) -> &'static str {
    let has = |words: &[&str]| words.iter().any(|w| message.contains(w));
    if message.starts_with("Downstream handshake timeout") {
        "timeout"
    } else if has(&["unexpected EOF", "Connection reset", "Broken pipe"]) {
        "client_closed"
    } else if has(&[
        "http request",
        "wrong version number",
        "packet length too long",
        "record layer failure",
        "unknown protocol",
    ]) {
        "not_tls"
    } else if has(&[
        "peer did not return a certificate",
        "certificate verify failed",
        "certificate required",
    ]) {
        "client_certificate"
    } else if message.contains(" alert ") {
        // The client's alert: most often it does not accept the certificate it was sent.
        "client_alert"
    } else if has(&[
        "no suitable signature algorithm",
        "no shared signature algorithms",
        "no shared cipher",
        "unsupported protocol",
        "no suitable key share",
        "no shared group",
    ]) {
        // Nothing both sides take: a name refused by `unknown_sni = "refuse"` (no certificate,
        // so no signature), or a version, cipher, curve or key type the client lacks.
        "no_match"
    } else {
        "other"
    }
}

/// Connections the gateway made to itself to see its listeners accept (the systemd readiness
/// probe): they close without a handshake and are nobody's failure.
static OWN_PROBES: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

/// Marks `local`, the client side of a probe connection, as the gateway's own.
pub fn own_probe(local: SocketAddr) {
    if let Ok(mut p) = OWN_PROBES.lock() {
        p.push(local);
    }
}

/// Whether `message` (Pingora's line) is about a probe connection: consumed, so a client that
/// later gets the same port is counted.
fn from_own_probe(message: &str) -> bool {
    let Some(peer) = message
        .strip_prefix("Downstream handshake error from ")
        .and_then(|r| r.split(": ").next())
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        return false;
    };
    let Ok(mut p) = OWN_PROBES.lock() else {
        return false;
    };
    match p.iter().position(|&a| a == peer) {
        Some(i) => {
            p.swap_remove(i);
            true
        }
        None => false,
    }
}

/// Whether the log record is a client's failed handshake (or a client's broken HTTP/2
/// preface after ALPN, or its unclean TLS close): then it is counted and logged at debug, and
/// the caller drops the original.
pub fn client_noise(target: &str, level: log::Level, message: &str) -> bool {
    match target {
        "pingora_core::services::listening"
            if level == log::Level::Error && message.starts_with("Downstream handshake") =>
        {
            if !from_own_probe(message) {
                crate::metrics::tls_handshake_failed(reason(message));
                log::debug!(target: "gatehouse::tls", "{message}");
            }
            true
        }
        "pingora_core::apps" if message.starts_with("H2 handshake error") => {
            log::debug!(target: "gatehouse::tls", "{message}");
            true
        }
        t if t.starts_with("pingora_core::protocols::tls")
            && message.starts_with("TLS shutdown failed") =>
        {
            log::debug!(target: "gatehouse::tls", "{message}");
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_of_the_failures_seen() {
        let e = |s: &str| {
            format!("Downstream handshake error from 127.0.0.1:39412:  TLSHandshakeFailure context: TLS accept() failed: {s}")
        };
        let cases = [
            ("unexpected EOF", "client_closed"),
            ("Connection reset by peer (os error 104)", "client_closed"),
            ("error:0A00009C:SSL routines:tls_validate_record_header:http request:ssl/record/methods/tlsany_meth.c:80:", "not_tls"),
            ("error:0A00010B:SSL routines:tls_validate_record_header:wrong version number:ssl/record/methods/tlsany_meth.c:80:", "not_tls"),
            ("error:0A000418:SSL routines:ssl3_read_bytes:tlsv1 alert unknown ca:ssl/record/rec_layer_s3.c:918:SSL alert number 48", "client_alert"),
            ("error:0A0000C7:SSL routines:tls_process_client_certificate:peer did not return a certificate:ssl/statem/statem_srvr.c:3510:", "client_certificate"),
            ("error:0A000086:SSL routines:tls_post_process_client_certificate:certificate verify failed:ssl/statem/statem_srvr.c:3601:", "client_certificate"),
            ("error:0A000076:SSL routines:tls_choose_sigalg:no suitable signature algorithm:ssl/t1_lib.c:4686:", "no_match"),
            ("error:0A0000C1:SSL routines:tls_post_process_client_hello:no shared cipher:ssl/statem/statem_srvr.c:2220:", "no_match"),
            ("something new", "other"),
        ];
        for (s, want) in cases {
            assert_eq!(reason(&e(s)), want, "{s}");
        }
        assert_eq!(reason("Downstream handshake timeout"), "timeout");
    }

    #[test]
    fn a_probe_is_not_counted_and_only_once() {
        let a: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        own_probe(a);
        let m = "Downstream handshake error from 127.0.0.1:40001:  TLSHandshakeFailure context: TLS accept() failed: unexpected EOF";
        assert!(from_own_probe(m));
        assert!(!from_own_probe(m), "the next client on that port counts");
        assert!(!from_own_probe("Downstream handshake timeout"));
    }
}
