//! `[server]` limits on what one client may take (timeouts, connections, requests per
//! connection, header fields), each checked against what it can be.
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::build::Loader;
use super::file::ServerFile;

/// The [server] limits on clients, each checked against what it can be.
pub(super) fn client_limits(ld: &mut Loader, f: &ServerFile) -> crate::front::ClientLimits {
    use crate::front::ClientLimits;
    let d = ClientLimits::default();
    let mut dur = |v: &Option<Spanned<super::values::Dur>>, key: &str, default: Duration| {
        let Some(v) = v else { return default };
        if v.get_ref().0.is_zero() {
            ld.err(
                v.span(),
                "[server]",
                format!("`{key}` must be more than 0s"),
            );
        }
        v.get_ref().0
    };
    let header_timeout = dur(&f.header_timeout, "header_timeout", d.header_timeout);
    let body_timeout = dur(&f.body_timeout, "body_timeout", d.body_timeout);
    let send_timeout = dur(&f.send_timeout, "send_timeout", d.send_timeout);
    // 0s is allowed here: no keep-alive, one request per connection.
    let keepalive_timeout = f
        .keepalive_timeout
        .as_ref()
        .map_or(d.keepalive_timeout, |v| v.get_ref().0);
    let mut count = |v: Option<(usize, Range<usize>)>, key: &str, max: usize, default: usize| {
        let Some((n, span)) = v else { return default };
        if n == 0 || n > max {
            ld.err(
                span,
                "[server]",
                format!("`{key}` must be between 1 and {max}"),
            );
        }
        n
    };
    let spanned = |v: &Option<Spanned<usize>>| v.as_ref().map(|v| (*v.get_ref(), v.span()));
    let max_connections = count(
        spanned(&f.max_connections),
        "max_connections",
        10_000_000,
        d.max_connections,
    );
    let max_requests = f
        .max_requests_per_connection
        .as_ref()
        .map(|v| (*v.get_ref() as usize, v.span()));
    let max_requests_per_connection = count(
        max_requests,
        "max_requests_per_connection",
        u32::MAX as usize,
        d.max_requests_per_connection as usize,
    ) as u32;
    // Pingora's HTTP/1 parser stops at 256 header fields and 1 MiB of head (a plain 400).
    let max_headers = count(spanned(&f.max_headers), "max_headers", 256, d.max_headers);
    let size = f
        .max_header_size
        .as_ref()
        .map(|v| (v.get_ref().0 as usize, v.span()));
    let max_header_size = count(size, "max_header_size", (1 << 20) - 1, d.max_header_size);
    // h2's own bound on what it tracks per connection is far above any useful value.
    let streams = f
        .h2_max_concurrent_streams
        .as_ref()
        .map(|v| (*v.get_ref() as usize, v.span()));
    let h2_max_concurrent_streams = count(
        streams,
        "h2_max_concurrent_streams",
        10_000,
        d.h2_max_concurrent_streams as usize,
    ) as u32;
    // 0 is allowed here: no limit per address (the default).
    let max_connections_per_ip = match &f.max_connections_per_ip {
        Some(v) if *v.get_ref() > max_connections => {
            ld.err(
                v.span(),
                "[server]",
                "`max_connections_per_ip` must not be more than `max_connections`",
            );
            0
        }
        Some(v) => *v.get_ref(),
        None => d.max_connections_per_ip,
    };
    ClientLimits {
        h2_max_concurrent_streams,
        header_timeout,
        body_timeout,
        keepalive_timeout,
        send_timeout,
        max_connections,
        max_connections_per_ip,
        max_requests_per_connection,
        max_headers,
        max_header_size,
    }
}
