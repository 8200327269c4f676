//! The `[server]` limits on clients.
use std::time::Duration;

/// The [server] limits on clients, as the snapshot holds them (a reload applies to new
/// connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub send_timeout: Duration,
    pub max_connections: usize,
    /// Connections one client address may hold (0: no limit).
    pub max_connections_per_ip: usize,
    pub max_requests_per_connection: u32,
    pub max_headers: usize,
    pub max_header_size: usize,
    /// HTTP/2: streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub h2_max_concurrent_streams: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_connections_per_ip: 0,
            max_requests_per_connection: 10_000,
            max_headers: 100,
            max_header_size: 64 * 1024,
            h2_max_concurrent_streams: 128,
        }
    }
}
