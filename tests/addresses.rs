//! Client addresses: IPv4 clients of a dual-stack listener are their IPv4 selves for
//! trusted_proxies, ip_filter, rate limits and X-Forwarded-For; an X-Forwarded-For entry that
//! is no address never leaves a trusted proxy standing as the client.
mod common;

use common::*;

/// A free port on the IPv6 wildcard, or None where the host has no IPv6.
fn dual_stack_port() -> Option<u16> {
    let l = std::net::TcpListener::bind("[::]:0").ok()?;
    Some(l.local_addr().ok()?.port())
}

#[tokio::test]
async fn dual_stack_clients_are_unmapped_everywhere() {
    let Some(port) = dual_stack_port() else {
        eprintln!("no IPv6 on this host: skipped");
        return;
    };
    let up = echo("u").await;
    let _g = Gatehouse::start(
        &format!(
            "[server]\nthreads = 1\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
             [plugins.lb-only]\nkind = \"ip_filter\"\nallow = [\"192.0.2.0/24\"]\n\
             [plugins.local]\nkind = \"ip_filter\"\nallow = [\"127.0.0.0/8\"]\n\
             [plugins.one]\nkind = \"rate_limit\"\nrate = \"1/m\"\n\
             [upstreams.u]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"[::]:{port}\"]\n\
             [[routes]]\npath = \"/office\"\nupstream = \"u\"\nplugins = [\"lb-only\"]\n\
             [[routes]]\npath = \"/local\"\nupstream = \"u\"\nplugins = [\"local\", \"one\"]\n"
        ),
        &[port],
    );
    // The IPv4 client 127.0.0.1 arrives as ::ffff:127.0.0.1: it is still the trusted proxy, so
    // its X-Forwarded-For names the client.
    let url = format!("http://127.0.0.1:{port}");
    let (status, _, body) = get(
        &format!("{url}/office"),
        &[("x-forwarded-for", "192.0.2.7")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen(&echo, "x-forwarded-for"), ["192.0.2.7, 127.0.0.1"]);
    let (status, _, _) = get(&format!("{url}/office"), &[]).await;
    assert_eq!(status, 403, "the proxy itself is not in the allow list");
    // Without X-Forwarded-For the client is 127.0.0.1, as an IPv4 rule names it; the rate
    // limit counts it under that one key.
    let (status, _, body) = get(&format!("{url}/local"), &[]).await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen(&echo, "x-forwarded-for"), ["127.0.0.1"]);
    let (status, _, _) = get(&format!("{url}/local"), &[]).await;
    assert_eq!(status, 429);
}

#[tokio::test]
async fn garbage_in_x_forwarded_for_never_leaves_a_trusted_client() {
    let up = echo("u").await;
    let port = free_port();
    let _g = Gatehouse::start(
        &format!(
            "[server]\nthreads = 1\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
             [plugins.internal]\nkind = \"ip_filter\"\nallow = [\"127.0.0.0/8\"]\n\
             [upstreams.u]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\nupstream = \"u\"\nplugins = [\"internal\"]\n"
        ),
        &[port],
    );
    let url = format!("http://127.0.0.1:{port}/");
    // A chain of trusted hops only: the first of them is the client.
    let (status, _, _) = get(&url, &[("x-forwarded-for", "127.0.0.9")]).await;
    assert_eq!(status, 200);
    // Garbage behind trusted hops: the client is unknown, not 127.0.0.9.
    for xff in ["junk, 127.0.0.9", "127.0.0.9, junk", "unknown"] {
        let (status, _, body) = get(&url, &[("x-forwarded-for", xff)]).await;
        assert_eq!(status, 403, "{xff}: {body}");
    }
    // An untrusted address right of the garbage is the client.
    let (status, _, _) = get(&url, &[("x-forwarded-for", "junk, 192.0.2.1")]).await;
    assert_eq!(status, 403);
}
