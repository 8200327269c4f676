//! `GET /config`: the running snapshot's config file as JSON, secrets replaced.
//!
//! The text is the one the running snapshot was built from (not the file on disk now, which
//! may hold an edit that failed to load). What is a secret is decided by key name, wherever
//! it sits (plugin tables, header transforms, upstream options), and by shape: a URL's
//! password (`redis://:pw@host`) is cut out of any string.
use serde_json::Value;

const REDACTED: &str = "[redacted]";

/// Key names (lower-cased) whose values are secret, or hold secrets below them: HMAC secrets,
/// tokens, API-key and password hashes, credential headers a transform sets.
fn secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    const WORDS: [&str; 9] = [
        "secret",
        "password",
        "passwd",
        "token",
        "authorization",
        "cookie",
        "api-key",
        "api_key",
        "credential",
    ];
    WORDS.iter().any(|w| k.contains(w))
        // key_auth's consumer -> key hash map, basic_auth's users, private keys inline.
        || k == "keys"
        || k == "users"
        || k == "private_key"
}

/// The TOML text as JSON, redacted. `None` when it does not parse (it always does: it is
/// the text a snapshot was built from).
pub fn config_json(source: &str) -> Option<Value> {
    let v: toml::Value = toml::from_str(source).ok()?;
    let mut j = serde_json::to_value(v).ok()?;
    redact(&mut j);
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

/// `scheme://user:password@host...` with the password replaced; `None` when there is none.
fn without_url_password(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    let userinfo = &rest[..at];
    let user = userinfo.split_once(':').map(|(u, _)| u)?;
    Some(format!("{scheme}://{user}:{REDACTED}{}", &rest[at..]))
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
redis = "redis://:pw0rd@127.0.0.1:6379/0"
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
            "redis://:[redacted]@127.0.0.1:6379/0"
        );
    }
}
