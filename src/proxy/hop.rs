//! Hop-by-hop headers (RFC 9110 §7.6.1): the ones that describe one connection, not the
//! request or response, and never cross the gateway.
use http::header;

/// Request headers that describe one hop, not the request (RFC 9110 §7.6.1). Connection and
/// Upgrade stay on upgrade requests: WebSocket needs them.
const HOP_BY_HOP: &[header::HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

static KEEP_ALIVE: header::HeaderName = header::HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: header::HeaderName = header::HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers present in `headers`; empty (no allocation) in the common case.
/// One pass over the names present, compared by value (standard names compare as enums),
/// rather than a hash lookup per candidate. `keep_connection` leaves Connection itself in
/// place (the headers it names still go): on responses Pingora rewrites it anyway.
pub(super) fn hop_by_hop(
    headers: &http::HeaderMap,
    upgrade: bool,
    keep_connection: bool,
) -> Vec<header::HeaderName> {
    let mut out = Vec::new();
    for name in headers.keys() {
        let hop = if name == header::CONNECTION {
            // Headers named in Connection are hop-by-hop too. Bytes, not text: a value with
            // one odd byte must not hide the names beside it.
            for v in headers
                .get_all(header::CONNECTION)
                .iter()
                .map(|v| v.as_bytes())
            {
                // The usual value names no header: skip the token walk.
                if v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close") {
                    continue;
                }
                for t in v.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    let skip = t.is_empty()
                        || t.eq_ignore_ascii_case(b"close")
                        || t.eq_ignore_ascii_case(b"keep-alive")
                        || t.eq_ignore_ascii_case(b"upgrade");
                    if skip {
                        continue;
                    }
                    if let Ok(n) = header::HeaderName::from_bytes(t) {
                        out.push(n);
                    }
                }
            }
            !upgrade && !keep_connection
        } else {
            *name == KEEP_ALIVE
                || *name == PROXY_CONNECTION
                || (!upgrade && HOP_BY_HOP.contains(name))
        };
        if hop {
            out.push(name.clone());
        }
    }
    out
}

/// Whether the client's TE names `trailers` (the one TE value HTTP/2 allows).
pub(super) fn te_trailers(req: &pingora_http::RequestHeader) -> bool {
    req.headers.get_all(header::TE).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|t| {
            t.split(|&b| b == b';')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
        })
    })
}

/// A client older than HTTP/1.1 (RFC 9112 §6.1, RFC 9110 §15.2): it reads no chunks and no
/// interim answer. (Its request still goes upstream as HTTP/1.1, as Pingora sends every
/// request, so the upstream connection stays open for the pool.)
pub(super) fn old_client(req: &pingora_http::RequestHeader) -> bool {
    matches!(req.version, http::Version::HTTP_10 | http::Version::HTTP_09)
}

/// Interim answers (100 to a request that did not expect one, 103) are not relayed to a
/// client older than HTTP/1.1.
pub(super) fn quiet_interim(session: &mut pingora_proxy::Session) {
    if old_client(session.req_header()) {
        if let pingora::protocols::http::ServerSession::H1(h1) = session.as_downstream_mut() {
            h1.set_ignore_info_resp(true);
        }
    }
}

/// An old client's response framed for it: never chunked (the upstream's chunks, or the
/// ones Pingora adds to a body of unknown length, are taken off the writer by dropping
/// Transfer-Encoding), and a body without a length ends with the connection, so the
/// connection says `close` and is not kept.
pub(super) fn frame_for_old_client(
    session: &mut pingora_proxy::Session,
    resp: &mut pingora_http::ResponseHeader,
) {
    if !old_client(session.req_header()) || resp.status.is_informational() {
        return;
    }
    if resp.headers.contains_key(header::TRANSFER_ENCODING) {
        resp.remove_header(&header::TRANSFER_ENCODING);
        // A length beside Transfer-Encoding is not the body's (RFC 9112 §6.3).
        resp.remove_header(&header::CONTENT_LENGTH);
    }
    let no_body = session.req_header().method == http::Method::HEAD
        || matches!(resp.status.as_u16(), 204 | 304);
    if !no_body && !resp.headers.contains_key(header::CONTENT_LENGTH) {
        session.set_keepalive(None);
    }
}
