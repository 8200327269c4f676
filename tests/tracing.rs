//! W3C trace context through the gateway, and spans exported over OTLP/HTTP to a receiver
//! the test runs.
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// An OTLP/HTTP receiver: every span of every protobuf batch POSTed to /v1/traces.
async fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let keep = spans.clone();
    let addr = serve(move |req: hyper::Request<hyper::body::Incoming>| {
        let spans = keep.clone();
        async move {
            assert_eq!(req.uri().path(), "/v1/traces");
            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let export = ExportTraceServiceRequest::decode(body).unwrap();
            for rs in export.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .any(|a| a.key == "service.name");
                assert!(service, "resource without service.name");
                for ss in rs.scope_spans {
                    spans.lock().unwrap().extend(ss.spans);
                }
            }
            hyper::Response::new(full(""))
        }
    })
    .await;
    (addr, spans)
}

fn traceparent(v: &serde_json::Value) -> Vec<String> {
    let tp = seen(v, "traceparent");
    assert_eq!(tp.len(), 1, "one traceparent upstream: {v}");
    tp[0].split('-').map(String::from).collect()
}

async fn echo_get(url: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    let (status, _, body) = get(url, headers).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn attr(s: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    s.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(v) => Some(v.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_flows_and_spans_are_exported() {
    let up = echo("u").await;
    let (otlp, spans) = receiver().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let _g = Gatehouse::start(
        &format!(
            r#"
[server]
tracing = {{ otlp_endpoint = "http://{otlp}/v1/traces", sample = 1.0, service_name = "edge", export_interval = "200ms" }}
access_log = {{ path = "{}", format = "json" }}
[upstreams.app]
peers = ["{up}"]
[gateways.web]
listen = ["127.0.0.1:{port}"]
[[routes]]
name = "api"
path = "/api"
upstream = "app"
"#,
            log.display()
        ),
        &[port],
    );
    let url = format!("http://127.0.0.1:{port}/api/x");

    // A valid parent: same trace, the gateway's span as the new parent, state kept.
    let v = echo_get(
        &url,
        &[("traceparent", PARENT), ("tracestate", "congo=t61rcWkgMzE")],
    )
    .await;
    let tp = traceparent(&v);
    assert_eq!(
        (tp[0].as_str(), tp[1].as_str(), tp[3].as_str()),
        ("00", TRACE, "01")
    );
    assert_ne!(tp[2], "00f067aa0ba902b7", "the gateway's own span id");
    let gateway_span = tp[2].clone();
    assert_eq!(
        seen(&v, "tracestate"),
        vec!["congo=t61rcWkgMzE".to_string()]
    );

    // A client outside trusted_proxies does not decide sampling: here sample = 1.0 decides.
    let unsampled = PARENT.replace("-01", "-00");
    let v = echo_get(&url, &[("traceparent", &unsampled)]).await;
    assert_eq!(traceparent(&v)[3], "01", "the gateway's decision");

    // None: a new trace starts (sampled here: sample = 1.0).
    let v = echo_get(&url, &[]).await;
    let fresh = traceparent(&v);
    assert_eq!(fresh[1].len(), 32);
    assert_ne!(fresh[1], TRACE);
    assert_eq!(fresh[3], "01");

    // Invalid ones are replaced, their tracestate dropped; two traceparents are none.
    for bad in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "garbage",
    ] {
        let v = echo_get(&url, &[("traceparent", bad), ("tracestate", "a=b")]).await;
        let tp = traceparent(&v);
        assert_ne!(tp[1], TRACE, "{bad} believed");
        assert!(seen(&v, "tracestate").is_empty(), "{bad}: tracestate kept");
    }
    let r = client()
        .get(&url)
        .header("traceparent", PARENT)
        .header(
            "traceparent",
            "00-11111111111111111111111111111111-2222222222222222-01",
        )
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    let tp = traceparent(&v);
    assert!(tp[1] != TRACE && !tp[1].starts_with("1111"), "{tp:?}");

    // The exporter sends the spans within a few export intervals.
    let deadline = Instant::now() + Duration::from_secs(10);
    let span = loop {
        let found = spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| hex::encode(&s.trace_id) == TRACE)
            .cloned();
        if let Some(s) = found {
            break s;
        }
        assert!(Instant::now() < deadline, "no span exported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(hex::encode(&span.span_id), gateway_span);
    assert_eq!(hex::encode(&span.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(span.name, "GET api");
    assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(
        attr(&span, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(&span, "http.route").as_deref(), Some("api"));
    assert_eq!(attr(&span, "url.path").as_deref(), Some("/api/x"));
    assert_eq!(attr(&span, "gatehouse.upstream").as_deref(), Some("app"));
    assert!(span.end_time_unix_nano > span.start_time_unix_nano);

    // The access log echoes the trace id.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // Lines of different worker threads are in the order their buffers were written.
    let ids: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["trace_id"].clone())
        .collect();
    assert!(ids.iter().any(|t| t == TRACE), "{text}");
    assert!(ids.iter().any(|t| t == &fresh[1]), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tracing_ids_still_flow_and_sampling_is_kept() {
    let up = echo("u").await;
    let (port, open) = (free_port(), free_port());
    let routes = format!(
        "[upstreams.app]\npeers = [\"{up}\"]\n[gateways.web]\n[[routes]]\npath = \"/\"\nupstream = \"app\"\n"
    );
    let with_listen = |p: u16| {
        routes.replace(
            "[gateways.web]\n",
            &format!("[gateways.web]\nlisten = [\"127.0.0.1:{p}\"]\n"),
        )
    };
    // One gateway trusts the test's address (as a proxy in front), one does not.
    let _g = Gatehouse::start(
        &format!(
            "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n{}",
            with_listen(port)
        ),
        &[port],
    );
    let _h = Gatehouse::start(&with_listen(open), &[open]);
    let url = format!("http://127.0.0.1:{port}/x");
    let v = echo_get(&url, &[("traceparent", PARENT)]).await;
    let tp = traceparent(&v);
    assert_eq!(
        (tp[1].as_str(), tp[3].as_str()),
        (TRACE, "01"),
        "a trusted sampled parent stays sampled"
    );
    // From an untrusted client the flag is the gateway's call: without tracing, unsampled
    // (the trace id is kept).
    let v = echo_get(
        &format!("http://127.0.0.1:{open}/x"),
        &[("traceparent", PARENT)],
    )
    .await;
    let tp = traceparent(&v);
    assert_eq!((tp[1].as_str(), tp[3].as_str()), (TRACE, "00"));
    let unsampled = PARENT.replace("-01", "-00");
    let v = echo_get(&url, &[("traceparent", &unsampled)]).await;
    assert_eq!(traceparent(&v)[3], "00");
    let v = echo_get(&url, &[]).await;
    let tp = traceparent(&v);
    assert_eq!(tp[1].len(), 32);
    assert_eq!(
        tp[3], "00",
        "new traces are not sampled when nothing exports them"
    );
}
