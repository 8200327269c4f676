//! The access log: one line per request, JSON or nginx's combined format, to a file or stdout.
//!
//! A request formats its line (one `String`) and hands it to a bounded channel; one writer
//! thread per log wakes every 50 ms, drains the channel into a buffered file and flushes.
//! A full channel drops the line and counts it
//! (`gatehouse_access_log_dropped_total`): a slow disk never holds a request. SIGUSR1 bumps
//! [`REOPEN`], and each writer reopens its file before its next write (logrotate's
//! `postrotate`). A reload that keeps the same `access_log` keeps the same writer; one that
//! changes it starts a new writer, and the old one ends when its last request is done.
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, SystemTime};

/// Bumped on SIGUSR1: writers reopen their file when they see a new value.
pub static REOPEN: AtomicU64 = AtomicU64::new(0);

/// Lines waiting for the writer; beyond this many, or [`QUEUE_BYTES`], they are dropped.
const QUEUE: usize = 32 * 1024;
/// Bytes of lines waiting: the bound that holds whatever the lines' sizes.
const QUEUE_BYTES: usize = 32 << 20;
/// Longest client value written (path, user agent, referer...): a 1 MiB head must not
/// become a 4 MiB line (escaping grows it) a flood of which fills the disk.
const MAX_FIELD: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Combined,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `None`: stdout.
    pub path: Option<PathBuf>,
    pub format: Format,
}

/// What one request's line says; borrowed from the request, formatted on its thread.
pub struct Entry<'a> {
    pub time: SystemTime,
    pub request_id: &'a str,
    pub client_ip: Option<std::net::IpAddr>,
    pub method: &'a str,
    pub host: &'a str,
    /// Path and query, as routed (canonical).
    pub target: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub request_bytes: usize,
    pub response_bytes: usize,
    pub duration: Duration,
    pub upstream_time: Option<Duration>,
    pub gateway: &'a str,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub peer: Option<std::net::SocketAddr>,
    pub cache: Option<&'a str>,
    pub user_agent: &'a str,
    pub referer: &'a str,
    pub consumer: Option<&'a str>,
    pub trace_id: Option<&'a str>,
}

pub struct AccessLog {
    pub settings: Settings,
    tx: SyncSender<String>,
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl AccessLog {
    /// Opens the file now (so a path that cannot be written fails the start or the reload)
    /// and starts the writer thread.
    pub fn start(settings: Settings) -> std::io::Result<AccessLog> {
        let out = open(&settings.path)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let path = settings.path.clone();
        let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let q = queued.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, path, out, q))?;
        Ok(AccessLog {
            settings,
            tx,
            queued,
        })
    }

    pub fn log(&self, e: &Entry) {
        let line = match self.settings.format {
            Format::Json => json_line(e),
            Format::Combined => combined_line(e),
        };
        let n = line.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > QUEUE_BYTES {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            crate::metrics::METRICS.access_log_dropped.inc();
            return;
        }
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(n, Ordering::Relaxed);
                crate::metrics::METRICS.access_log_dropped.inc();
            }
        }
    }
}

fn open(path: &Option<PathBuf>) -> std::io::Result<Box<dyn std::io::Write + Send>> {
    Ok(match path {
        None => Box::new(std::io::stdout()),
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
    })
}

/// How often the writer wakes to drain the queue. It never blocks on the channel: a
/// blocked receiver makes every send a futex wake-up, and each line its own write(2)
/// (measured: a quarter of the request's CPU at 11k requests/s). Lines reach the file within
/// this interval, in one write per wake-up.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

fn write_loop(
    rx: Receiver<String>,
    path: Option<PathBuf>,
    out: Box<dyn std::io::Write + Send>,
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, out);
    let mut seen = REOPEN.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(FLUSH_EVERY);
        let now = REOPEN.load(Ordering::Relaxed);
        if now != seen && path.is_some() {
            let _ = out.flush();
            match open(&path) {
                Ok(f) => {
                    out = std::io::BufWriter::with_capacity(256 * 1024, f);
                    seen = now;
                }
                // Tried again at the next wake-up: the rotated file must not stay in use.
                Err(e) => log::error!("access log: cannot reopen {path:?}: {e}"),
            }
        }
        let (mut done, mut failed, mut gone) = (0, false, false);
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    done += line.len();
                    failed |= out.write_all(line.as_bytes()).is_err();
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    gone = true;
                    break;
                }
            }
        }
        queued.fetch_sub(done, Ordering::Relaxed);
        if done > 0 && (failed || out.flush().is_err()) {
            // A full disk: said once per wake-up; requests go on.
            log::error!("access log: write to {path:?} failed");
        }
        if gone {
            break;
        }
    }
    let _ = out.flush();
}

/// The JSON line, built by hand: core::fmt's machinery (float formatting, Display of
/// addresses and times) cost more than the rest of the line (callgrind, load-tests/profile.sh).
fn json_line(e: &Entry) -> String {
    let mut s = String::with_capacity(448);
    s.push_str("{\"time\":\"");
    push_rfc3339_millis(&mut s, e.time);
    s.push_str("\",\"request_id\":");
    json_str(&mut s, e.request_id);
    s.push_str(",\"client_ip\":");
    match e.client_ip {
        Some(ip) => {
            s.push('"');
            push_ip(&mut s, ip);
            s.push('"');
        }
        None => s.push_str("null"),
    }
    s.push_str(",\"method\":");
    json_str(&mut s, e.method);
    s.push_str(",\"host\":");
    json_str(&mut s, e.host);
    s.push_str(",\"path\":");
    json_str(&mut s, e.target);
    s.push_str(",\"protocol\":");
    json_str(&mut s, e.protocol);
    s.push_str(",\"status\":");
    push_u64(&mut s, u64::from(e.status));
    s.push_str(",\"request_bytes\":");
    push_u64(&mut s, e.request_bytes as u64);
    s.push_str(",\"response_bytes\":");
    push_u64(&mut s, e.response_bytes as u64);
    s.push_str(",\"duration_ms\":");
    push_millis(&mut s, e.duration);
    s.push_str(",\"upstream_ms\":");
    match e.upstream_time {
        Some(t) => push_millis(&mut s, t),
        None => s.push_str("null"),
    }
    s.push_str(",\"gateway\":");
    json_str(&mut s, e.gateway);
    s.push_str(",\"route\":");
    json_opt(&mut s, e.route);
    s.push_str(",\"upstream\":");
    json_opt(&mut s, e.upstream);
    s.push_str(",\"cache\":");
    json_opt(&mut s, e.cache);
    s.push_str(",\"peer\":");
    match e.peer {
        Some(p) => {
            s.push('"');
            if p.is_ipv6() {
                s.push('[');
                push_ip(&mut s, p.ip());
                s.push(']');
            } else {
                push_ip(&mut s, p.ip());
            }
            s.push(':');
            push_u64(&mut s, u64::from(p.port()));
            s.push('"');
        }
        None => s.push_str("null"),
    }
    s.push_str(",\"user_agent\":");
    json_opt(&mut s, Some(e.user_agent).filter(|v| !v.is_empty()));
    s.push_str(",\"referer\":");
    json_opt(&mut s, Some(e.referer).filter(|v| !v.is_empty()));
    s.push_str(",\"consumer\":");
    json_opt(&mut s, e.consumer);
    s.push_str(",\"trace_id\":");
    json_opt(&mut s, e.trace_id);
    s.push_str("}\n");
    s
}

fn push_u64(s: &mut String, n: u64) {
    s.push_str(itoa::Buffer::new().format(n));
}

/// Milliseconds with three decimals (microsecond resolution): `12.345`.
fn push_millis(s: &mut String, d: Duration) {
    let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
    push_u64(s, us / 1000);
    s.push('.');
    let frac = us % 1000;
    s.push(char::from(b'0' + (frac / 100) as u8));
    s.push(char::from(b'0' + (frac / 10 % 10) as u8));
    s.push(char::from(b'0' + (frac % 10) as u8));
}

fn push_ip(s: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                push_u64(s, u64::from(o));
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(s, "{v6}");
        }
    }
}

/// `2026-12-02T12:00:00.123Z`; the part up to the seconds is formatted once a second per
/// thread.
fn push_rfc3339_millis(s: &mut String, t: SystemTime) {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            // "2026-12-02T12:00:00Z": the seconds part, without the Z.
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            c.1 = text.trim_end_matches('Z').to_string();
            c.0 = secs;
        }
        s.push_str(&c.1);
    });
    let ms = since.subsec_millis();
    s.push('.');
    s.push(char::from(b'0' + (ms / 100) as u8));
    s.push(char::from(b'0' + (ms / 10 % 10) as u8));
    s.push(char::from(b'0' + (ms % 10) as u8));
    s.push('Z');
}

fn json_opt(s: &mut String, v: Option<&str>) {
    match v {
        Some(v) => json_str(s, v),
        None => s.push_str("null"),
    }
}

/// Appends `v` as a JSON string, cut at [`MAX_FIELD`] bytes. Client values (paths, user
/// agents) are untrusted: every control character (C0, DEL, C1 such as CSI), the Unicode line
/// separators and the bidirectional overrides are escaped, so a line can never be split,
/// forged, or made to read differently in a terminal.
fn json_str(s: &mut String, v: &str) {
    s.push('"');
    let (v, cut) = clip(v);
    // Most values are printable ASCII with nothing to escape: copied whole.
    if v.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        s.push_str(v);
        if cut {
            s.push_str("...");
        }
        s.push('"');
        return;
    }
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if needs_escape(c) => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    if cut {
        s.push_str("...");
    }
    s.push('"');
}

fn needs_escape(c: char) -> bool {
    matches!(c as u32, 0..=0x1f | 0x7f..=0x9f | 0x2028 | 0x2029 | 0x202a..=0x202e | 0x2066..=0x2069)
}

/// `v` cut at [`MAX_FIELD`] bytes (on a character boundary), and whether it was.
fn clip(v: &str) -> (&str, bool) {
    if v.len() <= MAX_FIELD {
        return (v, false);
    }
    let mut end = MAX_FIELD;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    (&v[..end], true)
}

/// nginx's `combined` format, then the fields it lacks as `key=value`:
/// `ip - user [time] "request" status bytes "referer" "agent" rid=.. rt=.. urt=.. ...`.
fn combined_line(e: &Entry) -> String {
    let mut s = String::with_capacity(384);
    match e.client_ip {
        Some(ip) => {
            let _ = write!(s, "{ip}");
        }
        None => s.push('-'),
    }
    s.push_str(" - ");
    nginx_escaped(&mut s, e.consumer.unwrap_or("-"));
    s.push_str(" [");
    clf_time(&mut s, e.time);
    s.push_str("] \"");
    nginx_escaped(&mut s, e.method);
    s.push(' ');
    nginx_escaped(&mut s, e.target);
    s.push(' ');
    s.push_str(e.protocol);
    let _ = write!(s, "\" {} {} \"", e.status, e.response_bytes);
    nginx_escaped(&mut s, if e.referer.is_empty() { "-" } else { e.referer });
    s.push_str("\" \"");
    nginx_escaped(
        &mut s,
        if e.user_agent.is_empty() {
            "-"
        } else {
            e.user_agent
        },
    );
    let _ = write!(
        s,
        "\" rid={} host=",
        if e.request_id.is_empty() {
            "-"
        } else {
            e.request_id
        }
    );
    nginx_escaped(&mut s, if e.host.is_empty() { "-" } else { e.host });
    let _ = write!(s, " rt={:.3} urt=", e.duration.as_secs_f64());
    match e.upstream_time {
        Some(t) => {
            let _ = write!(s, "{:.3}", t.as_secs_f64());
        }
        None => s.push('-'),
    }
    s.push_str(" gw=");
    nginx_escaped(&mut s, e.gateway);
    s.push_str(" route=");
    nginx_escaped(&mut s, e.route.unwrap_or("-"));
    s.push_str(" up=");
    nginx_escaped(&mut s, e.upstream.unwrap_or("-"));
    s.push_str(" peer=");
    match e.peer {
        Some(p) => {
            let _ = write!(s, "{p}");
        }
        None => s.push('-'),
    }
    let _ = writeln!(
        s,
        " cache={} req_bytes={} trace={}",
        e.cache.unwrap_or("-"),
        e.request_bytes,
        e.trace_id.unwrap_or("-")
    );
    s
}

/// As nginx escapes variables in its logs: `"`, `\`, controls and non-ASCII bytes as `\xHH`;
/// cut at [`MAX_FIELD`] bytes.
fn nginx_escaped(s: &mut String, v: &str) {
    let (v, cut) = clip(v);
    if cut {
        nginx_escaped(s, v);
        s.push_str("...");
        return;
    }
    for b in v.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(s, "\\x{b:02X}");
        } else {
            s.push(b as char);
        }
    }
}

/// `02/Dec/2026:12:00:00 +0000` (UTC), from httpdate's fixed-width IMF-fixdate.
fn clf_time(s: &mut String, t: SystemTime) {
    // "Wed, 02 Dec 2026 12:00:00 GMT": day 5..7, month 8..11, year 12..16, time 17..25.
    let d = httpdate::fmt_http_date(t);
    match (d.get(5..7), d.get(8..11), d.get(12..16), d.get(17..25)) {
        (Some(day), Some(mon), Some(year), Some(hms)) => {
            let _ = write!(s, "{day}/{mon}/{year}:{hms} +0000");
        }
        _ => s.push_str(&d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>() -> Entry<'a> {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_212_800),
            request_id: "abc",
            client_ip: Some("10.0.0.1".parse().unwrap_or(std::net::IpAddr::from([0; 4]))),
            method: "GET",
            host: "api.example.com",
            target: "/a\"b\n?x=1",
            protocol: "HTTP/1.1",
            status: 200,
            request_bytes: 0,
            response_bytes: 12,
            duration: Duration::from_micros(1500),
            upstream_time: Some(Duration::from_micros(900)),
            gateway: "web",
            route: Some("orders"),
            upstream: Some("orders"),
            peer: None,
            cache: None,
            user_agent: "curl/8 \u{1}",
            referer: "",
            consumer: Some("alice"),
            trace_id: None,
        }
    }

    #[test]
    fn json_lines_are_one_line_of_valid_json() {
        let l = json_line(&entry());
        assert!(l.ends_with('\n') && l.matches('\n').count() == 1, "{l}");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
        assert_eq!(v["path"], "/a\"b\n?x=1");
        assert_eq!(v["user_agent"], "curl/8 \u{1}");
        assert_eq!(v["consumer"], "alice");
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["time"], "2026-12-02T12:00:00.000Z");
    }

    #[test]
    fn hostile_values_are_escaped_and_cut() {
        let long = "a".repeat(100_000);
        let mut e = entry();
        e.user_agent = "x\u{2028}y\u{9b}z\u{202e}";
        e.target = &long;
        let l = json_line(&e);
        assert!(l.contains(r"x\u2028y\u009bz\u202e"), "{l}");
        assert!(l.len() < 6000, "{}", l.len());
        assert!(combined_line(&e).len() < 6000);
    }

    #[test]
    fn combined_lines_escape_like_nginx() {
        let l = combined_line(&entry());
        assert!(
            l.starts_with(
                "10.0.0.1 - alice [02/Dec/2026:12:00:00 +0000] \"GET /a\\x22b\\x0A?x=1 HTTP/1.1\" 200 12 \"-\" \"curl/8 \\x01\" rid=abc"
            ),
            "{l}"
        );
        assert_eq!(l.matches('\n').count(), 1);
    }
}
