//! Failed TLS handshakes, counted by reason instead of logged as errors.
//!
//! A port scanner, a plain-HTTP request on the TLS port, a client that does not trust the
//! certificate or one whose SNI is refused: a failed handshake is the client's doing, as nginx
//! judges it (it logs them at info), and a line each would let anyone fill the journal at the
//! cost of a TCP connection. They are counted instead,
//! `gatehouse_tls_handshake_failures_total{gateway,reason}`, with a debug line each
//! (`RUST_LOG=gatehouse::tls=debug` shows the peer and OpenSSL's words).

/// The reasons, in the order of a gateway's counters; `timeout` is the gateway's own finding.
pub const REASONS: [&str; 7] = [
    "client_closed",
    "not_tls",
    "client_certificate",
    "client_alert",
    "no_match",
    "timeout",
    "other",
];

/// What failed, from OpenSSL's and Pingora's words (one of [`REASONS`]).
pub fn reason(message: &str) -> &'static str {
    let has = |words: &[&str]| words.iter().any(|w| message.contains(w));
    if has(&["unexpected EOF", "Connection reset", "Broken pipe"]) {
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

/// Whether the log record is noise a client makes in Pingora's code (a broken HTTP/2 preface
/// after ALPN h2, an unclean TLS close), which Pingora logs at ERROR or WARN: then it goes
/// to debug and the caller drops the original.
pub fn client_noise(target: &str, message: &str) -> bool {
    let noise = (target == "pingora_core::apps" && message.starts_with("H2 handshake error"))
        || (target.starts_with("pingora_core::protocols::tls")
            && message.starts_with("TLS shutdown failed"));
    if noise {
        log::debug!(target: "gatehouse::tls", "{message}");
    }
    noise
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_of_the_failures_seen() {
        let e = |s: &str| format!(" TLSHandshakeFailure context: TLS accept() failed: {s}");
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
    }
}
