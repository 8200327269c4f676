//! Credentials in the query are not written to the access log: the parameters the routes'
//! plugins read a credential from (key_auth's `query`) and those `access_log.redact_query`
//! lists go out as `name=[redacted]`.

/// `target` with the value of each query parameter named in `names` (by its decoded name,
/// as plugins read it) replaced by `[redacted]`; borrowed when nothing is.
pub fn redact_query<'a>(target: &'a str, names: &[Box<str>]) -> std::borrow::Cow<'a, str> {
    let Some((path, query)) = target.split_once('?').filter(|_| !names.is_empty()) else {
        return target.into();
    };
    let secret = |pair: &str| {
        form_urlencoded::parse(pair.as_bytes())
            .next()
            .is_some_and(|(k, _)| names.iter().any(|n| **n == *k))
    };
    if !query.split('&').any(secret) {
        return target.into();
    }
    let mut out = String::with_capacity(target.len());
    out.push_str(path);
    for (i, pair) in query.split('&').enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        if secret(pair) {
            out.push_str(pair.split_once('=').map_or(pair, |(k, _)| k));
            out.push_str("=[redacted]");
        } else {
            out.push_str(pair);
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::redact_query;

    #[test]
    fn credential_parameters_are_redacted_by_their_decoded_name() {
        let names: Vec<Box<str>> = vec!["api_key".into(), "token".into()];
        for (target, want) in [
            ("/a", "/a"),
            ("/a?x=1", "/a?x=1"),
            ("/a?api_key=s3cret&x=1", "/a?api_key=[redacted]&x=1"),
            (
                "/a?x=1&token=t&token=u",
                "/a?x=1&token=[redacted]&token=[redacted]",
            ),
            ("/a?api%5Fkey=s3cret", "/a?api%5Fkey=[redacted]"),
            ("/a?token", "/a?token=[redacted]"),
            ("/a?tokens=1", "/a?tokens=1"),
        ] {
            assert_eq!(redact_query(target, &names), want, "{target}");
        }
        assert_eq!(redact_query("/a?token=x", &[]), "/a?token=x");
    }
}
