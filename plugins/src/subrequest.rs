//! HTTP calls a plugin makes on its own (forward auth, JWKS): Pingora's connector, so they get
//! its keep-alive pool and TLS like proxied requests, bounded in time and body size. The target
//! is resolved at load; a call that cannot connect looks the name up again (the service may
//! have moved) and, if it now resolves elsewhere, tries the new address at once.
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::authority::Authority;

use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, OrErr, Result};
use pingora_http::{RequestHeader, ResponseHeader};

/// Where a plugin's calls go: parsed and resolved at load, looked up again on failure.
#[derive(Debug, Clone)]
pub struct Target {
    addr: Arc<ArcSwap<SocketAddr>>,
    /// `host:port`, for looking the name up again.
    authority: String,
    pub tls: bool,
    /// The Host header: the canonical authority (`gatehouse_plugins::authority`).
    pub host: String,
    /// The TLS server name and the name the certificate is verified against: the host, an
    /// address included (never empty: Pingora verifies nothing without one).
    sni: String,
    pub path: String,
}

impl Target {
    /// `http://host[:port]/path` or `https://…`; the host is resolved now (at config load).
    pub fn parse(url: &str) -> std::result::Result<Target, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("URL {url:?} must start with http:// or https://"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() {
            return Err(format!("URL {url:?} has no host"));
        }
        let a = Authority::parse(authority.as_bytes(), tls)
            .ok_or_else(|| format!("URL {url:?}: {authority:?} is not a valid host[:port]"))?;
        // `[::1]:80` and `name:443` resolve as they are.
        let with_port = format!("{}:{}", a.host(), a.port_or_default(tls));
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("URL {url:?}: cannot resolve {authority:?}: {e}"))?
            .min()
            .ok_or_else(|| format!("URL {url:?}: {authority:?} resolves to no address"))?;
        Ok(Target {
            addr: Arc::new(ArcSwap::from_pointee(addr)),
            authority: with_port,
            tls,
            // The name the certificate is checked against: an address too (an empty one
            // would turn Pingora's verification off).
            sni: a
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            host: a.as_str().to_string(),
            path,
        })
    }

    /// A plain-http target at a fixed address.
    pub fn fixed(addr: SocketAddr, path: &str) -> Target {
        Target {
            addr: Arc::new(ArcSwap::from_pointee(addr)),
            authority: addr.to_string(),
            tls: false,
            sni: String::new(),
            host: addr.to_string(),
            path: path.to_string(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        **self.addr.load()
    }

    /// Looks the name up again; whether it now resolves elsewhere.
    async fn moved(&self) -> bool {
        let Ok(found) = tokio::net::lookup_host(self.authority.as_str()).await else {
            return false;
        };
        match found.min() {
            Some(a) if a != self.addr() => {
                log::info!("{} now resolves to {a}", self.authority);
                self.addr.store(Arc::new(a));
                true
            }
            _ => false,
        }
    }

    pub fn peer(&self, timeout: Duration) -> HttpPeer {
        let mut p = HttpPeer::new(self.addr(), self.tls, self.sni.clone());
        p.options.connection_timeout = Some(timeout);
        p.options.read_timeout = Some(timeout);
        p.options.write_timeout = Some(timeout);
        p
    }
}

pub struct Response {
    pub header: ResponseHeader,
    pub body: Bytes,
}

pub struct Client {
    connector: Connector,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            connector: Connector::new(None),
        }
    }
}

impl Client {
    /// Sends `req` (its Host set from the target) and reads the answer, all within `timeout`;
    /// a body over `max_body` bytes is an error.
    pub async fn send(
        &self,
        target: &Target,
        mut req: RequestHeader,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Response> {
        req.insert_header(http::header::HOST, target.host.as_str())
            .or_err(ErrorType::InternalError, "subrequest host")?;
        let first = self.try_send(target, req.clone(), timeout, max_body).await;
        let unreachable = first.as_ref().err().is_some_and(|e| {
            matches!(
                e.etype(),
                ErrorType::ConnectRefused
                    | ErrorType::ConnectError
                    | ErrorType::ConnectTimedout
                    | ErrorType::ConnectNoRoute
            )
        });
        if unreachable && target.moved().await {
            return self.try_send(target, req, timeout, max_body).await;
        }
        first
    }

    async fn try_send(
        &self,
        target: &Target,
        req: RequestHeader,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Response> {
        let peer = target.peer(timeout);
        let call = async {
            let (mut session, _reused) = self.connector.get_http_session(&peer).await?;
            session.write_request_header(Box::new(req)).await?;
            session.finish_request_body().await?;
            session.read_response_header().await?;
            let header = session.response_header().cloned().ok_or_else(|| {
                Error::explain(ErrorType::InvalidHTTPHeader, "no response header")
            })?;
            let mut body = BytesMut::new();
            while let Some(chunk) = session.read_response_body().await? {
                if body.len() + chunk.len() > max_body {
                    return Error::e_explain(
                        ErrorType::InvalidHTTPHeader,
                        "subrequest body too large",
                    );
                }
                body.extend_from_slice(&chunk);
            }
            self.connector
                .release_http_session(session, &peer, Some(Duration::from_secs(60)))
                .await;
            Ok(Response {
                header,
                body: body.freeze(),
            })
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Error::e_explain(ErrorType::ReadTimedout, "subrequest timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("http://127.0.0.1:9000/auth?x=1").unwrap();
        assert_eq!(t.addr().to_string(), "127.0.0.1:9000");
        assert_eq!(t.path, "/auth?x=1");
        assert_eq!(t.host, "127.0.0.1:9000");
        assert!(!t.tls);
        let t = Target::parse("https://127.0.0.1/keys").unwrap();
        assert_eq!(t.addr().port(), 443);
        assert_eq!(t.host, "127.0.0.1");
        let t = Target::parse("http://[::1]:443/").unwrap();
        assert_eq!((t.host.as_str(), t.addr().port()), ("[::1]:443", 443));
        let t = Target::parse("https://LocalHost.:443").unwrap();
        assert_eq!(
            (t.host.as_str(), t.sni.as_str()),
            ("localhost", "localhost")
        );
        let t = Target::parse("https://10.0.0.5:8443/auth").unwrap();
        assert_eq!(t.sni, "10.0.0.5", "an address is verified too");
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("http:///x").is_err());
    }
}
