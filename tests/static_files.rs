//! Static routes: files as nginx's `root` and `alias` serve them, with validators, ranges,
//! index files, a single-page-app fallback, and no way out of the root whatever the spelling.
mod common;

use std::path::Path;
use std::time::Duration;

use common::raw::exchange;
use common::*;

const SECRET: &str = "TOP-SECRET-OUTSIDE-THE-ROOT";

/// site/ (served), outside/ (must never be): files, a dotfile, a symlink out and one in.
fn make_site(dir: &Path) {
    let w = |p: &str, body: &[u8]| {
        let p = dir.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    };
    w("site/index.html", b"<h1>home</h1>");
    w(
        "site/app.js",
        "console.log('hello');\n".repeat(200).as_bytes(),
    );
    w("site/docs/index.html", b"<h1>docs</h1>");
    w("site/docs/a b.txt", b"spaced");
    w("site/caf\u{e9}.txt", b"unicode name");
    w("site/.env", SECRET.as_bytes());
    w("site/.git/config", SECRET.as_bytes());
    w("outside/secret.txt", SECRET.as_bytes());
    w("files/site/x.txt", b"root mode");
    std::fs::create_dir_all(dir.join("site/empty")).unwrap();
    std::os::unix::fs::symlink(dir.join("outside/secret.txt"), dir.join("site/link.txt")).unwrap();
    std::os::unix::fs::symlink(dir.join("outside"), dir.join("site/out")).unwrap();
    std::os::unix::fs::symlink(dir.join("site/index.html"), dir.join("site/inlink.html")).unwrap();
}

fn start(dir: &Path) -> (Gatehouse, u16) {
    let port = free_port();
    let d = dir.display();
    let toml = format!(
        r#"
[plugins.tag]
kind = "headers"
response = {{ set = {{ "x-site" = "static" }} }}
[gateways.g]
listen = ["127.0.0.1:{port}"]
[[routes]]
path = "/site"
strip_prefix = true
static = {{ root = "{d}/site" }}
compression = ["gzip"]
plugins = ["tag"]
[[routes]]
path = "/spa"
strip_prefix = true
static = {{ root = "{d}/site", fallback = "index.html" }}
[[routes]]
path = "/files"
static = {{ root = "{d}" }}
"#
    );
    (Gatehouse::start(&toml, &[port]), port)
}

async fn get(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut r = client().get(format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let s = resp.status().as_u16();
    let h = resp.headers().clone();
    (s, h, resp.bytes().await.unwrap().to_vec())
}

fn h<'a>(h: &'a reqwest::header::HeaderMap, n: &str) -> Option<&'a str> {
    h.get(n).map(|v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_validators_and_ranges() {
    let dir = tempfile::tempdir().unwrap();
    make_site(dir.path());
    let (_g, port) = start(dir.path());
    let js = std::fs::read(dir.path().join("site/app.js")).unwrap();

    let (s, hd, body) = get(port, "/site/app.js", &[]).await;
    assert_eq!(s, 200);
    assert_eq!(body, js);
    assert_eq!(
        h(&hd, "content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(h(&hd, "content-length"), Some(&*js.len().to_string()));
    assert_eq!(h(&hd, "accept-ranges"), Some("bytes"));
    assert_eq!(h(&hd, "x-site"), Some("static"), "the route's plugins ran");
    let etag = h(&hd, "etag").unwrap().to_string();
    let modified = h(&hd, "last-modified").unwrap().to_string();

    // Conditional requests.
    let (s, hd, body) = get(port, "/site/app.js", &[("if-none-match", &etag)]).await;
    assert_eq!((s, body.len()), (304, 0));
    assert_eq!(h(&hd, "etag"), Some(&*etag));
    let (s, _, _) = get(port, "/site/app.js", &[("if-none-match", "\"other\"")]).await;
    assert_eq!(s, 200);
    let (s, _, _) = get(port, "/site/app.js", &[("if-modified-since", &modified)]).await;
    assert_eq!(s, 304);
    let (s, _, _) = get(
        port,
        "/site/app.js",
        &[("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT")],
    )
    .await;
    assert_eq!(s, 200);

    // Ranges: one range is a 206, several may be the whole file, outside is a 416.
    let len = js.len();
    for (range, want) in [
        ("bytes=0-9", Some((0, 9))),
        ("bytes=10-", Some((10, len - 1))),
        ("bytes=-5", Some((len - 5, len - 1))),
        ("bytes=5-999999", Some((5, len - 1))),
    ] {
        let (s, hd, body) = get(port, "/site/app.js", &[("range", range)]).await;
        let (a, b) = want.unwrap();
        assert_eq!(s, 206, "{range}");
        assert_eq!(body, js[a..=b], "{range}");
        assert_eq!(
            h(&hd, "content-range"),
            Some(&*format!("bytes {a}-{b}/{len}"))
        );
    }
    let (s, _, body) = get(port, "/site/app.js", &[("range", "bytes=0-1,4-5")]).await;
    assert_eq!((s, body.len()), (200, len));
    let (s, hd, _) = get(port, "/site/app.js", &[("range", &format!("bytes={len}-"))]).await;
    assert_eq!(s, 416);
    assert_eq!(h(&hd, "content-range"), Some(&*format!("bytes */{len}")));
    // If-Range with another validator: the whole, current file.
    let (s, _, body) = get(
        port,
        "/site/app.js",
        &[("range", "bytes=0-9"), ("if-range", "\"old\"")],
    )
    .await;
    assert_eq!((s, body.len()), (200, len));
    let (s, _, _) = get(
        port,
        "/site/app.js",
        &[("range", "bytes=0-9"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(s, 206);

    // HEAD: the GET's head, no body (a Range on it is ignored: ranges are for GET); POST is
    // not for files.
    let r = client()
        .head(format!("http://127.0.0.1:{port}/site/app.js"))
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .head(format!("http://127.0.0.1:{port}/site/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], &*js.len().to_string());
    assert!(r.bytes().await.unwrap().is_empty());
    let r = client()
        .post(format!("http://127.0.0.1:{port}/site/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");

    // Compression applies to static routes; a range is never compressed.
    let (s, hd, body) = get(port, "/site/app.js", &[("accept-encoding", "gzip")]).await;
    assert_eq!((s, h(&hd, "content-encoding")), (200, Some("gzip")));
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut plain).unwrap();
    assert_eq!(plain, js);
    let (s, hd, _) = get(
        port,
        "/site/app.js",
        &[("accept-encoding", "gzip"), ("range", "bytes=0-9")],
    )
    .await;
    assert_eq!((s, h(&hd, "content-encoding")), (206, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_names_and_fallback() {
    let dir = tempfile::tempdir().unwrap();
    make_site(dir.path());
    let (_g, port) = start(dir.path());

    let (s, _, body) = get(port, "/site/", &[]).await;
    assert_eq!((s, &body[..]), (200, &b"<h1>home</h1>"[..]));
    let (s, hd, _) = get(port, "/site/docs?x=1", &[]).await;
    assert_eq!((s, h(&hd, "location")), (301, Some("/site/docs/?x=1")));
    let (s, _, body) = get(port, "/site/docs/", &[]).await;
    assert_eq!((s, &body[..]), (200, &b"<h1>docs</h1>"[..]));
    let (s, _, body) = get(port, "/site/docs/a%20b.txt", &[]).await;
    assert_eq!((s, &body[..]), (200, &b"spaced"[..]));
    let (s, _, body) = get(port, "/site/caf%C3%A9.txt", &[]).await;
    assert_eq!((s, &body[..]), (200, &b"unicode name"[..]));
    // A directory without an index is a 404, never a listing.
    let (s, _, _) = get(port, "/site/empty/", &[]).await;
    assert_eq!(s, 404);
    let (s, _, _) = get(port, "/site/nope.txt", &[]).await;
    assert_eq!(s, 404);
    // A file dated before 1970 is served without Last-Modified (no HTTP date for it).
    let old = dir.path().join("site/old.txt");
    std::fs::write(&old, b"old").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH - Duration::from_secs(86_400))
        .unwrap();
    let (s, hd, body) = get(port, "/site/old.txt", &[]).await;
    assert_eq!((s, &body[..]), (200, &b"old"[..]));
    assert!(h(&hd, "last-modified").is_none());
    // A name too long for the file system is missing, not a server fault.
    let (s, _, _) = get(port, &format!("/site/{}", "n".repeat(300)), &[]).await;
    assert_eq!(s, 404);
    // A symlink that stays inside the root is followed.
    let (s, _, body) = get(port, "/site/inlink.html", &[]).await;
    assert_eq!((s, &body[..]), (200, &b"<h1>home</h1>"[..]));
    // `root` mode: the whole path under the root.
    let (s, _, body) = get(port, "/files/site/x.txt", &[]).await;
    assert_eq!((s, &body[..]), (200, &b"root mode"[..]));
    // Single-page app: unknown paths get the fallback, refused ones do not.
    let (s, hd, body) = get(port, "/spa/users/42/settings", &[]).await;
    assert_eq!((s, &body[..]), (200, &b"<h1>home</h1>"[..]));
    assert_eq!(h(&hd, "content-type"), Some("text/html; charset=utf-8"));
    let (s, _, body) = get(port, "/spa/.env", &[]).await;
    assert_eq!(s, 404);
    assert!(!String::from_utf8_lossy(&body).contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_leaves_the_root() {
    let dir = tempfile::tempdir().unwrap();
    make_site(dir.path());
    let (_g, port) = start(dir.path());
    let targets = [
        "/site/../outside/secret.txt",
        "/site/..%2foutside/secret.txt",
        "/site/%2e%2e/outside/secret.txt",
        "/site/%2E%2E/%2E%2E/outside/secret.txt",
        "/site/.%2e/outside/secret.txt",
        "/site/docs/../../outside/secret.txt",
        "/site//../outside/secret.txt",
        "/site/%252e%252e/outside/secret.txt",
        "/site/..\\outside\\secret.txt",
        "/site/.env",
        "/site/%2eenv",
        "/site/.git/config",
        "/site/%2Egit/config",
        "/site/link.txt",
        "/site/out/secret.txt",
        "/site/%00/x",
        "/files/outside/secret.txt/",
        "/files/site/.env",
        "/spa/../outside/secret.txt",
        "/spa/link.txt",
    ];
    for t in targets {
        let req = format!("GET {t} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let x = exchange(port, req.as_bytes(), 1, Duration::from_millis(200)).await;
        let a = x
            .answers
            .first()
            .unwrap_or_else(|| panic!("{t}: no answer"));
        assert!(
            a.status == 404 || a.status == 400,
            "{t}: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
        assert!(!String::from_utf8_lossy(&a.body).contains(SECRET), "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_stream_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    make_site(dir.path());
    let big: Vec<u8> = (0..64 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("site/big.bin"), &big).unwrap();
    let (g, port) = start(dir.path());
    let _ = get(port, "/site/index.html", &[]).await;
    let before = g.mem_kib("VmRSS");
    let (s, hd, body) = get(port, "/site/big.bin", &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h(&hd, "content-type"), Some("application/octet-stream"));
    assert!(body == big, "64 MiB body differs");
    let grew = g.mem_kib("VmHWM").saturating_sub(before);
    assert!(
        grew < 24 * 1024,
        "the gateway grew by {grew} KiB serving 64 MiB"
    );
}

#[test]
fn bad_static_settings_are_refused_with_their_line() {
    let (code, out, _, _) = check(
        r#"
[upstreams.u]
peers = ["127.0.0.1:9"]
[gateways.g]
listen = ["127.0.0.1:1"]
[[routes]]
path = "/a"
static = { root = "/no/such/folder" }
[[routes]]
path = "/b"
upstream = "u"
static = { root = "/tmp", fallback = "../etc/passwd" }
[[routes]]
path = "/c"
static = { root = "/tmp", listing = true }
"#,
    );
    assert_ne!(code, 0);
    assert!(
        out.contains(":8:19: error: route \"#1\": static root /no/such/folder:"),
        "{out}"
    );
    assert!(
        out.contains(":11:") && out.contains("`upstream` and `static` exclude each other"),
        "{out}"
    );
    assert!(
        out.contains(":12:") && out.contains("`fallback` must name a file under the root"),
        "{out}"
    );
    assert!(
        out.contains(":15:") && out.contains("unknown field `listing`"),
        "{out}"
    );
}
