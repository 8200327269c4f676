//! `request_limit`: bounds on what a client may send, enforced before the upstream pays for it.
//!
//! - `max_header`: the request line plus all header names and values (431 when over);
//! - `max_body`: refused at once by `Content-Length` (413), and counted while streaming, so a
//!   chunked upload is cut at the limit (413 when the client has not been answered yet).
//!
//! ```toml
//! [plugins.limits]
//! kind = "request_limit"
//! max_header = "16KiB"
//! max_body = "1MB"
//! ```
use async_trait::async_trait;
use bytes::Bytes;
use http::StatusCode;
use pingora_error::Result;
use pingora_proxy::Session;
use serde::Deserialize;

use crate::config::Size;
use crate::{refuse, status_error, Decision, Phases, Plugin, PluginCtx};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub max_header: Option<Size>,
    pub max_body: Option<Size>,
}

impl Config {
    pub fn prepare(&mut self) -> Result<(), String> {
        if self.max_header.is_none() && self.max_body.is_none() {
            return Err("set `max_header` and/or `max_body` (sizes such as \"16KiB\")".into());
        }
        Ok(())
    }
}

pub struct RequestLimit {
    max_header: Option<u64>,
    max_body: Option<u64>,
}

impl RequestLimit {
    pub fn new(c: Config) -> Self {
        RequestLimit {
            max_header: c.max_header.map(|s| s.0),
            max_body: c.max_body.map(|s| s.0),
        }
    }
}

/// The size of a request head as a client sent it, close enough: request line and
/// `name: value\r\n` per header.
fn head_size(req: &pingora_http::RequestHeader) -> u64 {
    let line = req.method.as_str().len() + req.raw_path().len() + 12;
    let headers: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    (line + headers) as u64
}

#[async_trait]
impl Plugin for RequestLimit {
    fn kind(&self) -> &'static str {
        "request_limit"
    }

    fn phases(&self) -> Phases {
        let mut p = Phases::REQUEST;
        if self.max_body.is_some() {
            p = p.union(Phases::REQUEST_BODY);
        }
        p
    }

    async fn request(&self, s: &mut Session, cx: &mut PluginCtx) -> Result<Decision> {
        let req = s.req_header();
        if let Some(max) = self.max_header {
            if head_size(req) > max {
                return Ok(refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request header too large",
                    cx,
                    Vec::new(),
                ));
            }
        }
        if let Some(max) = self.max_body {
            let declared = req
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return Ok(refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large",
                    cx,
                    Vec::new(),
                ));
            }
        }
        Ok(Decision::Continue)
    }

    async fn request_body(
        &self,
        _s: &mut Session,
        _body: &mut Option<Bytes>,
        _eos: bool,
        cx: &mut PluginCtx,
    ) -> Result<()> {
        match self.max_body {
            Some(max) if cx.body_bytes > max => Err(status_error(413, "request body too large")),
            _ => Ok(()),
        }
    }
}
