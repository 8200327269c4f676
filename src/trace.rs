//! W3C trace context (`traceparent`, `tracestate`) and span export over OTLP/HTTP.
//!
//! Every request gets a span of the gateway's: a valid incoming `traceparent` makes it the
//! parent (same trace id, its sampled flag kept), an absent or invalid one starts a new trace
//! (an invalid one is dropped with its `tracestate`, as the W3C spec asks). The upstream
//! request carries the gateway's span as its parent, whatever the client sent. With
//! `[server] tracing`, sampled spans go to the OTLP endpoint in batches from the SDK's own
//! thread (a full queue drops spans, never blocks a request); new traces are sampled at
//! `sample`, traces with a parent follow the parent's flag. Without it, nothing is recorded
//! or sent, but ids still flow, and a sampled parent stays sampled downstream. That case
//! (the default) skips the SDK: a few random numbers and one header per request.
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

pub use opentelemetry_sdk::trace::Span;

/// A request's trace context: the SDK's span when spans are exported, else the ids alone.
pub enum TraceCtx {
    Light {
        trace_id: u128,
        span_id: u64,
        flags: u8,
        /// The client's `tracestate`, kept with a valid parent.
        state: Option<http::HeaderValue>,
    },
    /// Boxed: the request context stays small when nothing is exported.
    Sdk(Box<Span>),
}

impl TraceCtx {
    /// The trace id (for the access log, which writes it in hex).
    pub fn trace_id(&self) -> Option<[u8; 16]> {
        use opentelemetry::trace::Span as _;
        match self {
            TraceCtx::Light { trace_id, .. } => Some(trace_id.to_be_bytes()),
            TraceCtx::Sdk(s) => {
                let c = s.span_context();
                c.is_valid().then(|| c.trace_id().to_bytes())
            }
        }
    }
}

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// The client's single, well-formed `traceparent`: trace id, parent id, flags.
fn parent_of(map: &http::HeaderMap) -> Option<(u128, u64, u8)> {
    let mut all = map.get_all(TRACEPARENT).iter();
    let v = match (all.next(), all.next()) {
        (Some(v), None) => v.to_str().ok().filter(|v| valid_traceparent(v))?,
        _ => return None,
    };
    Some((
        u128::from_str_radix(&v[3..35], 16).ok()?,
        u64::from_str_radix(&v[36..52], 16).ok()?,
        u8::from_str_radix(&v[53..55], 16).ok()?,
    ))
}

fn nonzero_random() -> u64 {
    loop {
        let r = gatehouse_plugins::secure_u64();
        if r != 0 {
            return r;
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub endpoint: String,
    /// The share of new traces recorded and exported, 0 to 1.
    pub sample: f64,
    pub service_name: String,
    /// How often the batch goes out (the SDK's scheduled delay).
    pub export_interval: Duration,
}

pub struct Tracing {
    pub settings: Option<Settings>,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

/// The request's headers as the propagator reads them: `traceparent` only when it is exactly
/// one header of the W3C form, with its sampled flag re-decided for clients the gateway does
/// not trust.
struct Headers<'a> {
    map: &'a http::HeaderMap,
    traceparent: Option<String>,
}

impl<'a> Headers<'a> {
    /// `sample`: the share a client outside `trusted_proxies` is sampled at, whatever its
    /// flag says (else any client could have every request recorded and exported, and its
    /// flag would make every service behind record it too); `None` for a trusted peer.
    fn new(map: &'a http::HeaderMap, sample: Option<f64>) -> Headers<'a> {
        // Re-written from the parsed ids (as version 00): the SDK sees only what was checked.
        let traceparent = parent_of(map).map(|(trace_id, parent, flags)| {
            let flags = match sample {
                None => flags,
                Some(share) => {
                    // As the SDK's TraceIdRatioBased: the trace id's low 63 bits under it.
                    let lower = (trace_id as u64) >> 1;
                    let sampled = lower < (share.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64;
                    (flags & !1) | u8::from(sampled)
                }
            };
            format!("00-{trace_id:032x}-{parent:016x}-{flags:02x}")
        });
        Headers { map, traceparent }
    }
}

/// W3C Trace Context §3.2: `VV-{32 hex}-{16 hex}-FF`, lower-case hex, ids not all zero,
/// version `ff` invalid; version 00 exactly that long, later versions may add `-...`.
fn valid_traceparent(v: &str) -> bool {
    let b = v.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b.get(r).is_some_and(|s| {
            s.iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        })
    };
    let zeros = |r: std::ops::Range<usize>| b[r].iter().all(|c| *c == b'0');
    b.len() >= 55
        && hex(0..2)
        && &v[..2] != "ff"
        && b[2] == b'-'
        && hex(3..35)
        && b[35] == b'-'
        && hex(36..52)
        && b[52] == b'-'
        && hex(53..55)
        && !zeros(3..35)
        && !zeros(36..52)
        && (if &v[..2] == "00" {
            b.len() == 55
        } else {
            b.len() == 55 || b[55] == b'-'
        })
}

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key == "traceparent" {
            return self.traceparent.as_deref();
        }
        let mut all = self.map.get_all(key).iter();
        let first = all.next()?;
        if all.next().is_some() {
            return None;
        }
        first.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.map.keys().map(|k| k.as_str()).collect()
    }
}

struct Upstream<'a>(&'a mut pingora_http::RequestHeader);

impl Injector for Upstream<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes an empty `tracestate` for a trace with no state.
        if !value.is_empty() {
            let _ = self.0.insert_header(key.to_string(), value);
        }
    }
}

/// The SDK's span and trace ids from the same CSPRNG as the gateway's own (the SDK's default
/// generator is a fast PRNG whose outputs predict the next ones).
#[derive(Debug)]
struct SecureIds;

impl opentelemetry_sdk::trace::IdGenerator for SecureIds {
    fn new_trace_id(&self) -> opentelemetry::trace::TraceId {
        let hi = u128::from(nonzero_random()) << 64;
        opentelemetry::trace::TraceId::from(hi | u128::from(gatehouse_plugins::secure_u64()))
    }

    fn new_span_id(&self) -> opentelemetry::trace::SpanId {
        opentelemetry::trace::SpanId::from(nonzero_random())
    }
}

impl Tracing {
    pub fn new(settings: Option<Settings>) -> Result<Tracing, String> {
        let mut b = SdkTracerProvider::builder().with_id_generator(SecureIds);
        match &settings {
            Some(s) => {
                use opentelemetry_otlp::{Protocol, WithExportConfig};
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(s.endpoint.clone())
                    .with_timeout(Duration::from_secs(10))
                    .build()
                    .map_err(|e| format!("tracing: {e}"))?;
                let batch = opentelemetry_sdk::trace::BatchConfigBuilder::default()
                    .with_scheduled_delay(s.export_interval)
                    .with_max_queue_size(8192)
                    .build();
                let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build();
                b = b
                    .with_span_processor(processor)
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                        s.sample,
                    ))))
                    .with_resource(
                        opentelemetry_sdk::Resource::builder_empty()
                            .with_service_name(s.service_name.clone())
                            .build(),
                    );
            }
            None => b = b.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff))),
        }
        let provider = b.build();
        let tracer = provider.tracer("gatehouse");
        Ok(Tracing {
            settings,
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// The request's trace context, child of the client's when it is valid. `trusted`: the
    /// peer is one of `trusted_proxies`, whose sampled flag is followed.
    pub fn start(&self, headers: &http::HeaderMap, method: &str, trusted: bool) -> TraceCtx {
        let Some(settings) = &self.settings else {
            // Nothing records: the ids, and the flag (kept from a trusted peer, else off).
            return match parent_of(headers) {
                Some((trace_id, _, flags)) => {
                    let mut states = headers.get_all(TRACESTATE).iter();
                    let state = match (states.next(), states.next()) {
                        (Some(v), None) => Some(v.clone()),
                        _ => None,
                    };
                    TraceCtx::Light {
                        trace_id,
                        span_id: nonzero_random(),
                        flags: if trusted { flags } else { flags & !1 },
                        state,
                    }
                }
                None => TraceCtx::Light {
                    trace_id: (u128::from(nonzero_random()) << 64)
                        | u128::from(gatehouse_plugins::secure_u64()),
                    span_id: nonzero_random(),
                    flags: 0,
                    state: None,
                },
            };
        };
        let sample = (!trusted).then_some(settings.sample);
        let parent = self.propagator.extract(&Headers::new(headers, sample));
        TraceCtx::Sdk(Box::new(
            self.tracer
                .span_builder(method.to_string())
                .with_kind(SpanKind::Server)
                .start_with_context(&self.tracer, &parent),
        ))
    }

    /// Replaces the client's `traceparent`/`tracestate` on the upstream request with the
    /// gateway's span (its state kept from a valid parent).
    pub fn inject(&self, t: &TraceCtx, req: &mut pingora_http::RequestHeader) {
        req.remove_header(&TRACEPARENT);
        req.remove_header(&TRACESTATE);
        match t {
            TraceCtx::Light {
                trace_id,
                span_id,
                flags,
                state,
            } => {
                let mut v = [0u8; 55];
                v[..3].copy_from_slice(b"00-");
                hex_into(&mut v[3..35], &trace_id.to_be_bytes());
                v[35] = b'-';
                hex_into(&mut v[36..52], &span_id.to_be_bytes());
                v[52] = b'-';
                hex_into(&mut v[53..55], &[*flags]);
                if let Ok(h) = http::HeaderValue::from_bytes(&v) {
                    let _ = req.insert_header(TRACEPARENT, h);
                }
                if let Some(s) = state {
                    let _ = req.insert_header(TRACESTATE, s.clone());
                }
            }
            TraceCtx::Sdk(span) => {
                let cx = Context::new().with_remote_span_context(span.span_context().clone());
                self.propagator.inject_context(&cx, &mut Upstream(req));
            }
        }
    }

    /// Whether spans are exported (so attributes are worth setting).
    pub fn exporting(&self) -> bool {
        self.settings.is_some()
    }
}

/// What the finished request adds to its span before it ends.
pub struct Outcome<'a> {
    pub method: &'a str,
    pub route: Option<&'a str>,
    pub path: &'a str,
    pub host: &'a str,
    pub status: u16,
    pub gateway: &'a str,
    pub upstream: Option<&'a str>,
    pub peer: Option<std::net::SocketAddr>,
    pub client_ip: Option<std::net::IpAddr>,
    pub request_id: &'a str,
}

/// Names and annotates a recorded span (OpenTelemetry's HTTP server conventions), then ends
/// it; the batch processor takes it from there.
pub fn finish(t: TraceCtx, o: &Outcome) {
    let TraceCtx::Sdk(mut span) = t else { return };
    let span = &mut *span;
    if span.is_recording() {
        if let Some(r) = o.route {
            span.update_name(format!("{} {r}", o.method));
        }
        let mut attrs = vec![
            KeyValue::new("http.request.method", o.method.to_string()),
            KeyValue::new("url.path", clip(o.path, 1024)),
            KeyValue::new("server.address", clip(o.host, 256)),
            KeyValue::new("http.response.status_code", i64::from(o.status)),
            KeyValue::new("gatehouse.gateway", o.gateway.to_string()),
        ];
        if let Some(r) = o.route {
            attrs.push(KeyValue::new("http.route", r.to_string()));
        }
        if let Some(u) = o.upstream {
            attrs.push(KeyValue::new("gatehouse.upstream", u.to_string()));
        }
        if let Some(p) = o.peer {
            attrs.push(KeyValue::new("network.peer.address", p.ip().to_string()));
            attrs.push(KeyValue::new("network.peer.port", i64::from(p.port())));
        }
        if let Some(ip) = o.client_ip {
            attrs.push(KeyValue::new("client.address", ip.to_string()));
        }
        if !o.request_id.is_empty() {
            attrs.push(KeyValue::new(
                "gatehouse.request_id",
                o.request_id.to_string(),
            ));
        }
        span.set_attributes(attrs);
        if o.status >= 500 || o.status == 0 {
            span.set_status(opentelemetry::trace::Status::error(format!(
                "status {}",
                o.status
            )));
        }
    }
    span.end();
}

/// Lower-case hex of `bytes` into `out` (twice as long: the callers' slices are).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    let _ = hex::encode_to_slice(bytes, out);
}

/// At most `max` bytes of a client value (a span carries at most a few KiB).
fn clip(v: &str, max: usize) -> String {
    let mut end = v.len().min(max);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v[..end].to_string()
}

impl Drop for Tracing {
    /// The provider's shutdown exports what is queued, a blocking HTTP call: never on the
    /// worker thread that happens to drop the last snapshot holding it.
    fn drop(&mut self) {
        if self.settings.is_some() {
            let p = self.provider.clone();
            let _ = std::thread::Builder::new()
                .name("trace-shutdown".into())
                .spawn(move || {
                    let _ = p.shutdown_with_timeout(Duration::from_secs(5));
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_form() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(ok));
        assert!(valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        ));
        for bad in [
            "00-1-1-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn untrusted_flags_are_decided_here() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        let never = Headers::new(&h, Some(0.0));
        assert!(never
            .traceparent
            .as_deref()
            .is_some_and(|v| v.ends_with("-00")));
        let always = Headers::new(&h, Some(1.0));
        assert!(always
            .traceparent
            .as_deref()
            .is_some_and(|v| v.ends_with("-01")));
        let trusted = Headers::new(&h, None);
        assert!(trusted
            .traceparent
            .as_deref()
            .is_some_and(|v| v.ends_with("-01")));
    }
}
