//! A part's path, filled from the client request and from the parts it depends on.
use serde_json::Value;

use super::{failure, Failure};
use crate::config::aggregate::{Aggregate, Piece};

/// The client's values that templates read.
pub(super) struct Inputs<'a> {
    pub(super) groups: Option<regex::Captures<'a>>,
    pub(super) query: &'a str,
    pub(super) headers: &'a http::HeaderMap,
    pub(super) consumer: Option<&'a str>,
    pub(super) claims: Option<&'a serde_json::Map<String, Value>>,
}

/// Everything a value may hold goes in percent-encoded but the unreserved characters: a
/// value can never add a query parameter or a fragment. In the path, [`render`] refuses what
/// could still change it: empty values, `.`, `..`, and slashes (an upstream that decodes
/// `%2F` would see a new segment).
const VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The first value of query parameter `name`, decoded (names compared decoded too).
fn query_value(query: &str, name: &str) -> Option<Vec<u8>> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned().into_bytes())
}

/// Part `i`'s path with this request's values in, or why it cannot be built.
pub(super) fn render(
    agg: &Aggregate,
    i: usize,
    inp: &Inputs,
    values: &[Option<Value>],
) -> std::result::Result<String, Failure> {
    let missing = |what: String| failure("missing_value", 400, format!("no value for {what}"));
    let mut out = String::new();
    for pc in &agg.parts[i].path.0 {
        let value: Vec<u8> = match pc {
            Piece::Lit(l) => {
                out.push_str(l);
                continue;
            }
            Piece::Group(g) => inp
                .groups
                .as_ref()
                .and_then(|c| c.name(g))
                // The path is matched in its canonical (percent-encoded) form.
                .map(|m| percent_encoding::percent_decode_str(m.as_str()).collect())
                .ok_or_else(|| missing(format!("{{{g}}}")))?,
            Piece::Query(q) => {
                query_value(inp.query, q).ok_or_else(|| missing(format!("query parameter {q}")))?
            }
            Piece::Header(h) => inp
                .headers
                .get(h)
                .map(|v| v.as_bytes().to_vec())
                .ok_or_else(|| missing(format!("header {h}")))?,
            Piece::Consumer => inp
                .consumer
                .map(|c| c.as_bytes().to_vec())
                .ok_or_else(|| missing("{consumer} (no authenticated consumer)".into()))?,
            Piece::Jwt(c) => inp
                .claims
                .and_then(|m| m.get(c))
                .and_then(scalar)
                .map(String::into_bytes)
                .ok_or_else(|| missing(format!("claim {c}")))?,
            Piece::Part(p, keys) => {
                let mut v = values[*p].as_ref();
                for k in keys {
                    v = v.and_then(|v| match v {
                        Value::Object(m) => m.get(k),
                        Value::Array(a) => k.parse::<usize>().ok().and_then(|n| a.get(n)),
                        _ => None,
                    });
                }
                let what = || format!("{{{}.{}}}", agg.parts[*p].name, keys.join("."));
                let v = v.ok_or_else(|| {
                    failure(
                        "missing_value",
                        502,
                        format!("no value for {} in its answer", what()),
                    )
                })?;
                scalar(v)
                    .ok_or_else(|| {
                        failure(
                            "missing_value",
                            502,
                            format!("{} is not a string, number or boolean", what()),
                        )
                    })?
                    .into_bytes()
            }
        };
        let in_path = !out.contains('?');
        if let Some(why) = unsafe_value(&value, in_path) {
            // A client's value (400) or a part's (502): never sent with a hole or a new segment.
            let status = if matches!(pc, Piece::Part(..)) {
                502
            } else {
                400
            };
            return Err(failure(
                "bad_value",
                status,
                format!("value for {}: {why}", describe(agg, pc)),
            ));
        }
        out.extend(percent_encoding::percent_encode(&value, VALUE));
    }
    Ok(out)
}

/// Why a value may not go into a part's path (or its query), if it may not.
fn unsafe_value(v: &[u8], in_path: bool) -> Option<&'static str> {
    if v.is_empty() {
        return Some("empty");
    }
    if !in_path {
        return None;
    }
    if v == b"." || v == b".." {
        return Some("a dot segment");
    }
    if v.iter()
        .any(|&b| b == b'/' || b == b'\\' || b < 0x20 || b == 0x7f)
    {
        return Some("a slash or a control character in a path segment");
    }
    None
}

fn describe(agg: &Aggregate, pc: &Piece) -> String {
    match pc {
        Piece::Lit(l) => l.clone(),
        Piece::Group(g) => format!("{{{g}}}"),
        Piece::Query(q) => format!("{{query.{q}}}"),
        Piece::Header(h) => format!("{{header.{h}}}"),
        Piece::Consumer => "{consumer}".into(),
        Piece::Jwt(c) => format!("{{jwt.{c}}}"),
        Piece::Part(p, keys) => format!("{{{}.{}}}", agg.parts[*p].name, keys.join(".")),
    }
}
