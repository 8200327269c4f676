//! `GET /config`: the running snapshot's config file as JSON, secrets replaced.
//!
//! The text is the one the running snapshot was built from (not the file on disk now, which
//! may hold an edit that failed to load). What is a secret is decided by key name, wherever
//! it sits (plugin tables, header transforms, upstream options), and by shape: a URL's
//! password (`redis://:pw@host`) is cut out of any string.
use serde_json::Value;

const REDACTED: &str = "[redacted]";

/// Key names (lower-cased) whose values are secret, or hold secrets below them: HMAC secrets,
/// tokens, API-key and password hashes, credential headers a transform sets or a route
/// matches on (`x-internal-key`, `apikey`).
fn secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    const WORDS: [&str; 10] = [
        "secret",
        "password",
        "passwd",
        "token",
        "auth",
        "cookie",
        "api-key",
        "api_key",
        "credential",
        "private",
    ];
    // Keys that name things, not secrets: a rate limit's key, hash keys, files of keys.
    const NAMES: [&str; 6] = [
        "key",
        "hash_key",
        "keys_file",
        "client_key",
        "key_file",
        "admin_auth",
    ];
    if NAMES.contains(&k.as_str()) {
        return false;
    }
    WORDS.iter().any(|w| k.contains(w))
        || k.ends_with("key")
        // key_auth's consumer -> key hash map, basic_auth's users.
        || k == "keys"
        || k == "users"
}

/// The TOML text as JSON, redacted. `None` when it does not parse (it always does: it is
/// the text a snapshot was built from).
pub fn config_json(source: &str) -> Option<Value> {
    let v: toml::Value = toml::from_str(source).ok()?;
    let mut j = serde_json::to_value(v).ok()?;
    if let Value::Object(top) = &mut j {
        for (k, x) in top.iter_mut() {
            match (k.as_str(), x) {
                // Tables of named things: the names are the user's (a plugin called
                // "api-auth"), not secrets; what is inside each is judged as usual.
                ("plugins" | "upstreams" | "gateways" | "stores", Value::Object(named)) => {
                    named.values_mut().for_each(redact)
                }
                (_, x) => redact(x),
            }
        }
    }
    Some(j)
}

fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if secret_key(k) {
                    blank(x);
                } else {
                    redact(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        Value::String(s) => {
            if let Some(clean) = without_url_password(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

/// Every string below `v` becomes `[redacted]`; names (object keys) stay, so a reader still
/// sees which consumers or users exist.
fn blank(v: &mut Value) {
    match v {
        Value::Object(m) => m.values_mut().for_each(blank),
        Value::Array(a) => a.iter_mut().for_each(blank),
        Value::Null | Value::Bool(_) => {}
        other => *other = Value::String(REDACTED.into()),
    }
}

/// A URL with its user info and its query values replaced (`https://TOKEN@host`,
/// `?access_token=...`); `None` when it has neither.
fn without_url_password(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => &authority[at..],
        None => authority,
    };
    let (path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (tail, None),
    };
    if host.len() == authority.len() && query.is_none() {
        return None;
    }
    let mut out = format!("{scheme}://");
    if host.len() != authority.len() {
        out.push_str(REDACTED);
    }
    out.push_str(host);
    out.push_str(path);
    if let Some(q) = query {
        let (q, frag) = q.split_once('#').map_or((q, None), |(a, b)| (a, Some(b)));
        let pairs: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) => format!("{k}={REDACTED}"),
                None => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
        if let Some(f) = frag {
            out.push('#');
            out.push_str(f);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_gone_and_names_stay() {
        let src = r#"
[server]
admin_token = "0123456789abcdef0123"
threads = 2
[plugins.jwt]
kind = "jwt_auth"
secret = "hmac-secret-value"
[plugins.keys]
kind = "key_auth"
keys = { "mobile" = "sha256:abcd" }
[plugins.h]
kind = "headers"
request = { set = { Authorization = "Bearer xyz", "x-trace" = "1" } }
[plugins.rl]
kind = "rate_limit"
key = "client_ip"
redis = "redis://:pw0rd@127.0.0.1:6379/0"
[plugins.api-auth]
kind = "forward_auth"
url = "https://ghp_abc123@auth.internal/check?access_token=tok999&x=1"
[[routes]]
headers = { "x-internal-key" = "hdrsecret", "x-tenant" = "acme" }
"#;
        let j = config_json(src).unwrap_or_default();
        let text = j.to_string();
        for s in [
            "0123456789abcdef0123",
            "hmac-secret-value",
            "abcd",
            "xyz",
            "pw0rd",
        ] {
            assert!(!text.contains(s), "{s} leaked: {text}");
        }
        assert_eq!(j["server"]["threads"], 2);
        assert_eq!(j["plugins"]["keys"]["keys"]["mobile"], REDACTED);
        assert_eq!(j["plugins"]["h"]["request"]["set"]["x-trace"], "1");
        assert_eq!(
            j["plugins"]["rl"]["redis"],
            "redis://[redacted]@127.0.0.1:6379/0"
        );
        assert_eq!(j["plugins"]["rl"]["key"], "client_ip");
        assert_eq!(j["plugins"]["api-auth"]["kind"], "forward_auth");
        assert_eq!(j["routes"][0]["headers"]["x-tenant"], "acme");
        assert_eq!(
            j["plugins"]["api-auth"]["url"],
            "https://[redacted]@auth.internal/check?access_token=[redacted]&x=[redacted]"
        );
    }
}
