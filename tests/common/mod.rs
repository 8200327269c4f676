//! Test harness: the real `gatehouse` binary on free loopback ports, real upstream HTTP
//! servers (hyper) in the test process, and a real HTTP client.
#![allow(dead_code)]

pub mod cache_kit;
pub mod h2raw;
pub mod pki;
pub mod raw;
pub mod redis;

use std::convert::Infallible;
use std::future::Future;
use std::io::Read;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// A port nobody listens on right now, for a gateway the test starts (a child process binds
/// it, so the test cannot hand it a bound socket). Taken below the kernel's ephemeral range:
/// a port from `bind(":0")` is free only until someone else takes it, and the connections
/// every test opens get theirs from that range, so a gateway would now and then find its port
/// taken ("Address already in use"). Each test process walks its own sequence from a start
/// its pid picks; a port something listens on is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (first, span) = (10_000u32, low.saturating_sub(10_000).max(1000));
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(first + (start + n) % span).expect("port");
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {low}");
}

/// A running gateway; killed when dropped.
pub struct Gatehouse {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    log: PathBuf,
}

impl Gatehouse {
    /// Writes `toml` to a fresh folder, starts `gatehouse run` on it and waits until every
    /// port in `ports` accepts connections.
    pub fn start(toml: &str, ports: &[u16]) -> Gatehouse {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("gatehouse.toml");
        std::fs::write(&config, toml).expect("write config");
        let log = dir.path().join("gatehouse.log");
        let child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("GH_LOG").unwrap_or("warn,gatehouse=info".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn gatehouse");
        let mut g = Gatehouse {
            child,
            dir,
            config,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        for &p in ports {
            while TcpStream::connect(("127.0.0.1", p)).is_err() {
                if let Ok(Some(status)) = g.child.try_wait() {
                    panic!("gatehouse exited with {status}:\n{}", g.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "gatehouse did not listen on {p}:\n{}",
                    g.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        g
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
    pub fn mem_kib(&self, field: &str) -> u64 {
        let s =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        s.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("status field")
    }
}

impl Drop for Gatehouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `gatehouse check` on `toml`: exit code and stderr.
pub fn check(toml: &str) -> (i32, String, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, toml).expect("write config");
    let out = check_file(&config);
    (out.0, out.1, config, dir)
}

pub fn check_file(path: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(path)
        .output()
        .expect("run check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// Starts a hyper HTTP/1.1 server on a free loopback port, answering with `handler`.
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let h = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// An upstream that answers every request with a JSON echo of it, tagged with `name`.
pub async fn echo(name: &'static str) -> SocketAddr {
    serve(move |req: Request<Incoming>| async move {
        let mut headers = serde_json::Map::new();
        for (k, v) in req.headers() {
            let entry = headers
                .entry(k.as_str().to_string())
                .or_insert_with(|| serde_json::Value::Array(vec![]));
            if let serde_json::Value::Array(a) = entry {
                a.push(serde_json::Value::String(
                    v.to_str().unwrap_or("").to_string(),
                ));
            }
        }
        let body = serde_json::json!({
            "upstream": name,
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "query": req.uri().query(),
            "headers": headers,
        });
        Response::builder()
            .header("content-type", "application/json")
            .header("x-upstream", name)
            .body(full(body.to_string()))
            .unwrap()
    })
    .await
}

/// A client that does not pool connections across tests and never follows redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// The header values the echo upstream saw for `name`.
pub fn seen(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// An upstream that can be killed (listener and every open connection closed at once) and
/// started again on the same address.
pub struct Ctl {
    pub addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Ctl {
    pub fn kill(&self) {
        let _ = self.stop.send(true);
    }
}

/// Like [`serve`], on `addr` (or a free port), killable.
pub async fn serve_ctl<F, Fut>(addr: Option<SocketAddr>, handler: F) -> Ctl
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let bind = addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
    let listener = TcpListener::bind(bind).await.expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        let mut rx_accept = rx.clone();
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r { Ok(s) => s, Err(_) => return },
                _ = rx_accept.changed() => return,
            };
            let h = handler.clone();
            let mut rx_conn = rx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = rx_conn.changed() => {}
                }
            });
        }
    });
    Ctl { addr, stop }
}

/// A killable upstream that answers `name` (header `x-upstream` and body) and counts hits.
pub async fn counting(
    name: &'static str,
    addr: Option<SocketAddr>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
) -> Ctl {
    serve_ctl(addr, move |req: Request<Incoming>| {
        let hits = hits.clone();
        async move {
            if req.uri().path() != "/healthz" {
                hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Response::builder()
                .header("x-upstream", name)
                .body(full(name))
                .unwrap()
        }
    })
    .await
}

/// GET `url` `n` times from `workers` concurrent tasks; (status, x-upstream) of each.
pub async fn hammer(
    url: &str,
    n: usize,
    workers: usize,
    headers: &[(&str, &str)],
) -> Vec<(u16, String)> {
    let c = client();
    let per = n / workers;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let c = c.clone();
        let url = url.to_string();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..per {
                let mut rb = c.get(&url);
                for (k, v) in &headers {
                    rb = rb.header(k, v);
                }
                match rb.send().await {
                    Ok(r) => {
                        let up = r
                            .headers()
                            .get("x-upstream")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        out.push((r.status().as_u16(), up));
                    }
                    Err(_) => out.push((0, String::new())),
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

pub fn count_by(results: &[(u16, String)]) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::new();
    for (_, up) in results {
        *m.entry(up.clone()).or_insert(0) += 1;
    }
    m
}

/// The admin `/status` document.
pub async fn admin_status(admin: u16) -> serde_json::Value {
    client()
        .get(format!("http://127.0.0.1:{admin}/status"))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("status json")
}

/// The admin `/metrics` text.
pub async fn metrics_text(admin: u16) -> String {
    client()
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await
        .expect("admin")
        .text()
        .await
        .expect("metrics text")
}

/// Writes `text` to `name` in `dir` and returns its path as TOML wants it.
pub fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p.display().to_string()
}

/// A gateway for plugin tests: `plugins` tables, one route per (path, plugin list), all to
/// `up`; 127.0.0.1 is a trusted proxy (tests may send X-Forwarded-For).
pub fn plugin_gateway(
    port: u16,
    up: SocketAddr,
    plugins: &str,
    routes: &[(&str, &str)],
) -> Gatehouse {
    let mut toml = format!(
        "[server]\nthreads = 2\ntrusted_proxies = [\"127.0.0.1\"]\n[upstreams.up]\n\
         peers = [\"{up}\"]\n{plugins}\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n"
    );
    for (path, list) in routes {
        toml.push_str(&format!(
            "[[routes]]\npath = \"{path}\"\nupstream = \"up\"\nplugins = [{list}]\n"
        ));
    }
    Gatehouse::start(&toml, &[port])
}

/// GET with extra headers: status, headers, body.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, String) {
    let mut r = client().get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.expect("response");
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    (status, h, resp.text().await.expect("body"))
}

/// The admin status page at `admin` as headless chromium renders it (the DOM once its
/// scripts ran), with no console message allowed.
pub async fn browser_dom(admin: u16) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("http://127.0.0.1:{admin}/"))
        .output()
        .await
        .expect("chromium (scripts/bootstrap.sh test installs it)");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        dom.contains("data-loaded=\"1\""),
        "page not filled:\n{dom}\n{err}"
    );
    let console: Vec<&str> = err.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    dom
}
