//! Per-request state carried through Pingora's phases.
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use gatehouse_plugins::PluginCtx;

use crate::router::RouteId;
use crate::runtime::Runtime;

#[derive(Default)]
pub struct RequestCtx {
    /// The snapshot this request started on; kept to its end, whatever reloads happen.
    pub rt: Option<Arc<Runtime>>,
    pub route: Option<RouteId>,
    pub plugins: PluginCtx,
    /// The request path with dot segments resolved, when that changed it.
    pub normalized_path: Option<String>,
    /// The peer chosen for the current try (for `preserve_host = false`).
    pub peer: Option<SocketAddr>,
    /// Set once a reply has been written by the gateway itself.
    pub replied: bool,
}

impl RequestCtx {
    pub fn path<'a>(&'a self, original: &'a str) -> Cow<'a, str> {
        match &self.normalized_path {
            Some(p) => Cow::Borrowed(p.as_str()),
            None => Cow::Borrowed(original),
        }
    }
}
