//! The access log: one line per request, JSON or nginx's combined format, to a file or stdout.
//!
//! A request formats its line straight into a buffer of its worker thread's own (no allocation
//! per line, no queue shared by all workers); one writer thread per log wakes every 50 ms,
//! swaps each full buffer for an empty one and writes what it took in one write(2) each.
//! A buffer past [`SHARD_BYTES`] drops the line and counts it
//! (`gatehouse_access_log_dropped_total`): a slow disk never holds a request. SIGUSR1 bumps
//! [`REOPEN`], and each writer reopens its file before its next write (logrotate's
//! `postrotate`). A reload that keeps the same `access_log` keeps the same writer; one that
//! changes it starts a new writer, and the old one ends when its last request is done.
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

mod redact;
pub use redact::redact_query;

/// Bumped on SIGUSR1: writers reopen their file when they see a new value.
pub static REOPEN: AtomicU64 = AtomicU64::new(0);

/// Bytes one worker's buffer holds between two wake-ups of the writer (160 MB/s of lines
/// per worker); beyond it lines are dropped. The bound that holds whatever the lines' sizes.
const SHARD_BYTES: usize = 8 << 20;
/// Buffers per log: worker threads beyond this many share one (each is a mutex only its own
/// worker and, for a swap every 50 ms, the writer take).
const SHARDS: usize = 64;
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
    /// Query parameters whose values are written as `[redacted]` (besides those the routes'
    /// plugins read credentials from).
    pub redact_query: Vec<String>,
}

/// What one request's line says; borrowed from the request, formatted on its thread. Header
/// values are bytes: they need not be UTF-8, and a scanner's user agent must still be logged.
pub struct Entry<'a> {
    pub time: SystemTime,
    pub request_id: &'a str,
    pub client_ip: Option<std::net::IpAddr>,
    pub method: &'a str,
    pub host: &'a [u8],
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
    pub user_agent: &'a [u8],
    pub referer: &'a [u8],
    pub consumer: Option<&'a str>,
    pub trace_id: Option<[u8; 16]>,
}

/// One worker's lines since the writer's last wake-up; a cache line pair of its own, so two
/// workers never write to the same line of memory.
#[repr(align(128))]
struct Shard(Mutex<Vec<u8>>);

struct Shared {
    shards: Box<[Shard]>,
}

pub struct AccessLog {
    pub settings: Settings,
    shared: Arc<Shared>,
}

/// Which buffer this thread writes to: threads are numbered at their first line.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

impl AccessLog {
    /// Opens the file now (so a path that cannot be written fails the start or the reload)
    /// and starts the writer thread.
    pub fn start(settings: Settings) -> std::io::Result<AccessLog> {
        let out = open(&settings.path)?;
        let shared = Arc::new(Shared {
            shards: (0..SHARDS).map(|_| Shard(Mutex::new(Vec::new()))).collect(),
        });
        let path = settings.path.clone();
        let w = shared.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(w, path, out))?;
        Ok(AccessLog { settings, shared })
    }

    pub fn log(&self, e: &Entry) {
        let shard = &self.shared.shards[shard_index()];
        let mut buf = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
        let before = buf.len();
        match self.settings.format {
            Format::Json => json_line(e, &mut buf),
            Format::Combined => combined_line(e, &mut buf),
        }
        if buf.len() > SHARD_BYTES {
            buf.truncate(before);
            drop(buf);
            crate::metrics::METRICS.access_log_dropped.inc();
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

/// How often the writer wakes to take the workers' lines. It is never woken by a request: a
/// wake-up per line is a futex call per request and a write(2) per line (measured: a quarter
/// of the request's CPU at 11k requests/s). Lines reach the file within this interval.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

fn write_loop(shared: Arc<Shared>, path: Option<PathBuf>, mut out: Box<dyn std::io::Write + Send>) {
    let mut seen = REOPEN.load(Ordering::Relaxed);
    // Swapped with each non-empty buffer: capacities circulate, nothing is allocated per wake.
    let mut spare = Vec::new();
    loop {
        std::thread::sleep(FLUSH_EVERY);
        // Read before the last drain: once the log is gone, no request can add a line.
        let gone = Arc::strong_count(&shared) == 1;
        let now = REOPEN.load(Ordering::Relaxed);
        if now != seen && path.is_some() {
            let _ = out.flush();
            match open(&path) {
                Ok(f) => {
                    out = f;
                    seen = now;
                }
                // Tried again at the next wake-up: the rotated file must not stay in use.
                Err(e) => log::error!("access log: cannot reopen {path:?}: {e}"),
            }
        }
        let (mut wrote, mut failed) = (false, false);
        for shard in shared.shards.iter() {
            {
                let mut buf = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
                if buf.is_empty() {
                    continue;
                }
                std::mem::swap(&mut *buf, &mut spare);
            }
            failed |= out.write_all(&spare).is_err();
            wrote = true;
            spare.clear();
            // A burst's buffer is not kept for ever.
            if spare.capacity() > 1 << 20 {
                spare.shrink_to(64 << 10);
            }
        }
        if wrote && (failed || out.flush().is_err()) {
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
fn json_line(e: &Entry, s: &mut Vec<u8>) {
    s.extend_from_slice(b"{\"time\":\"");
    push_rfc3339_millis(s, e.time);
    s.extend_from_slice(b"\",\"request_id\":");
    json_str(s, e.request_id.as_bytes());
    s.extend_from_slice(b",\"client_ip\":");
    match e.client_ip {
        Some(ip) => {
            s.push(b'"');
            push_ip(s, ip);
            s.push(b'"');
        }
        None => s.extend_from_slice(b"null"),
    }
    s.extend_from_slice(b",\"method\":");
    json_str(s, e.method.as_bytes());
    s.extend_from_slice(b",\"host\":");
    json_str(s, e.host);
    s.extend_from_slice(b",\"path\":");
    json_str(s, e.target.as_bytes());
    s.extend_from_slice(b",\"protocol\":");
    json_str(s, e.protocol.as_bytes());
    s.extend_from_slice(b",\"status\":");
    push_u64(s, u64::from(e.status));
    s.extend_from_slice(b",\"request_bytes\":");
    push_u64(s, e.request_bytes as u64);
    s.extend_from_slice(b",\"response_bytes\":");
    push_u64(s, e.response_bytes as u64);
    s.extend_from_slice(b",\"duration_ms\":");
    push_millis(s, e.duration);
    s.extend_from_slice(b",\"upstream_ms\":");
    match e.upstream_time {
        Some(t) => push_millis(s, t),
        None => s.extend_from_slice(b"null"),
    }
    s.extend_from_slice(b",\"gateway\":");
    json_str(s, e.gateway.as_bytes());
    s.extend_from_slice(b",\"route\":");
    json_opt(s, e.route.map(str::as_bytes));
    s.extend_from_slice(b",\"upstream\":");
    json_opt(s, e.upstream.map(str::as_bytes));
    s.extend_from_slice(b",\"cache\":");
    json_opt(s, e.cache.map(str::as_bytes));
    s.extend_from_slice(b",\"peer\":");
    match e.peer {
        Some(p) => {
            s.push(b'"');
            if p.is_ipv6() {
                s.push(b'[');
                push_ip(s, p.ip());
                s.push(b']');
            } else {
                push_ip(s, p.ip());
            }
            s.push(b':');
            push_u64(s, u64::from(p.port()));
            s.push(b'"');
        }
        None => s.extend_from_slice(b"null"),
    }
    s.extend_from_slice(b",\"user_agent\":");
    json_opt(s, Some(e.user_agent).filter(|v| !v.is_empty()));
    s.extend_from_slice(b",\"referer\":");
    json_opt(s, Some(e.referer).filter(|v| !v.is_empty()));
    s.extend_from_slice(b",\"consumer\":");
    json_opt(s, e.consumer.map(str::as_bytes));
    s.extend_from_slice(b",\"trace_id\":");
    match e.trace_id {
        Some(id) => {
            s.push(b'"');
            push_hex(s, &id);
            s.push(b'"');
        }
        None => s.extend_from_slice(b"null"),
    }
    s.extend_from_slice(b"}\n");
}

fn push_u64(s: &mut Vec<u8>, n: u64) {
    s.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn push_hex(s: &mut Vec<u8>, bytes: &[u8; 16]) {
    // On the stack first: one append instead of 32 (each checks the capacity).
    let mut out = [0u8; 32];
    // 16 bytes always fit 32 digits.
    let _ = hex::encode_to_slice(bytes, &mut out);
    s.extend_from_slice(&out);
}

/// Milliseconds with three decimals (microsecond resolution): `12.345`.
fn push_millis(s: &mut Vec<u8>, d: Duration) {
    push_thousandths(s, d.as_micros());
}

/// `n / 1000` with three decimals.
fn push_thousandths(s: &mut Vec<u8>, n: u128) {
    let n = n.min(u128::from(u64::MAX)) as u64;
    push_u64(s, n / 1000);
    let frac = n % 1000;
    s.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

fn push_ip(s: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            // "255.255.255.255" at most, on the stack, then one append.
            let (mut out, mut n) = ([0u8; 15], 0);
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out[n] = b'.';
                    n += 1;
                }
                if o >= 100 {
                    out[n] = b'0' + o / 100;
                    n += 1;
                }
                if o >= 10 {
                    out[n] = b'0' + o / 10 % 10;
                    n += 1;
                }
                out[n] = b'0' + o % 10;
                n += 1;
            }
            s.extend_from_slice(&out[..n]);
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(s, "{v6}");
        }
    }
}

/// `2026-12-02T12:00:00.123Z`; the part up to the seconds is formatted once a second per
/// thread.
fn push_rfc3339_millis(s: &mut Vec<u8>, t: SystemTime) {
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
        s.extend_from_slice(c.1.as_bytes());
    });
    let ms = since.subsec_millis();
    s.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ]);
}

fn json_opt(s: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        Some(v) => json_str(s, v),
        None => s.extend_from_slice(b"null"),
    }
}

/// True when `v` is printable ASCII without `"` or `\`: copied into a JSON string as it is.
/// Tested 16 bytes at a time without an early exit inside, which the compiler turns into
/// vector compares; the tail too, padded (a byte at a time was a quarter of the line's cost).
fn plain(v: &[u8]) -> bool {
    // Outside 0x20..0x7f in one compare: below 0x20 wraps around to 0xe0 and above.
    let bad = |b: u8| (b.wrapping_sub(0x20) >= 0x5f) | (b == b'"') | (b == b'\\');
    let any_bad = |c: &[u8]| c.iter().fold(false, |acc, &b| acc | bad(b));
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        if any_bad(c) {
            return false;
        }
    }
    let rest = chunks.remainder();
    let mut tail = [b'a'; 16];
    tail[..rest.len()].copy_from_slice(rest);
    !any_bad(&tail)
}

/// Appends `v` as a JSON string, cut at [`MAX_FIELD`] bytes. Client values (paths, user
/// agents) are untrusted: every control character (C0, DEL, C1 such as CSI), the Unicode line
/// separators and the bidirectional overrides are escaped, so a line can never be split,
/// forged, or made to read differently in a terminal. Bytes that are not UTF-8 become U+FFFD.
fn json_str(s: &mut Vec<u8>, v: &[u8]) {
    s.push(b'"');
    let (v, cut) = clip(v);
    if plain(v) {
        s.extend_from_slice(v);
    } else {
        for c in String::from_utf8_lossy(v).chars() {
            match c {
                '"' => s.extend_from_slice(b"\\\""),
                '\\' => s.extend_from_slice(b"\\\\"),
                c if needs_escape(c) => {
                    let _ = write!(s, "\\u{:04x}", c as u32);
                }
                c => s.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
    }
    if cut {
        s.extend_from_slice(b"...");
    }
    s.push(b'"');
}

fn needs_escape(c: char) -> bool {
    matches!(c as u32, 0..=0x1f | 0x7f..=0x9f | 0x2028 | 0x2029 | 0x202a..=0x202e | 0x2066..=0x2069)
}

/// `v` cut at [`MAX_FIELD`] bytes, and whether it was. The cut may split a UTF-8 sequence:
/// its bytes then become U+FFFD (JSON) or `\xHH` (combined), never invalid output.
fn clip(v: &[u8]) -> (&[u8], bool) {
    if v.len() <= MAX_FIELD {
        (v, false)
    } else {
        (&v[..MAX_FIELD], true)
    }
}

/// nginx's `combined` format, then the fields it lacks as `key=value`:
/// `ip - user [time] "request" status bytes "referer" "agent" rid=.. rt=.. urt=.. ...`.
fn combined_line(e: &Entry, s: &mut Vec<u8>) {
    match e.client_ip {
        Some(ip) => push_ip(s, ip),
        None => s.push(b'-'),
    }
    s.extend_from_slice(b" - ");
    nginx_escaped(s, e.consumer.unwrap_or("-").as_bytes());
    s.extend_from_slice(b" [");
    clf_time(s, e.time);
    s.extend_from_slice(b"] \"");
    nginx_escaped(s, e.method.as_bytes());
    s.push(b' ');
    nginx_escaped(s, e.target.as_bytes());
    s.push(b' ');
    s.extend_from_slice(e.protocol.as_bytes());
    s.extend_from_slice(b"\" ");
    push_u64(s, u64::from(e.status));
    s.push(b' ');
    push_u64(s, e.response_bytes as u64);
    s.extend_from_slice(b" \"");
    nginx_escaped(s, or_dash(e.referer));
    s.extend_from_slice(b"\" \"");
    nginx_escaped(s, or_dash(e.user_agent));
    s.extend_from_slice(b"\" rid=");
    nginx_escaped(s, or_dash(e.request_id.as_bytes()));
    s.extend_from_slice(b" host=");
    nginx_escaped(s, or_dash(e.host));
    s.extend_from_slice(b" rt=");
    push_seconds(s, e.duration);
    s.extend_from_slice(b" urt=");
    match e.upstream_time {
        Some(t) => push_seconds(s, t),
        None => s.push(b'-'),
    }
    s.extend_from_slice(b" gw=");
    nginx_escaped(s, e.gateway.as_bytes());
    s.extend_from_slice(b" route=");
    nginx_escaped(s, e.route.unwrap_or("-").as_bytes());
    s.extend_from_slice(b" up=");
    nginx_escaped(s, e.upstream.unwrap_or("-").as_bytes());
    s.extend_from_slice(b" peer=");
    match e.peer {
        Some(p) => {
            let _ = write!(s, "{p}");
        }
        None => s.push(b'-'),
    }
    s.extend_from_slice(b" cache=");
    s.extend_from_slice(e.cache.unwrap_or("-").as_bytes());
    s.extend_from_slice(b" req_bytes=");
    push_u64(s, e.request_bytes as u64);
    s.extend_from_slice(b" trace=");
    match e.trace_id {
        Some(id) => push_hex(s, &id),
        None => s.push(b'-'),
    }
    s.push(b'\n');
}

fn or_dash(v: &[u8]) -> &[u8] {
    if v.is_empty() {
        b"-"
    } else {
        v
    }
}

/// Seconds with three decimals, as nginx's `$request_time`: `0.012`.
fn push_seconds(s: &mut Vec<u8>, d: Duration) {
    push_thousandths(s, d.as_millis());
}

/// As nginx escapes variables in its logs: `"`, `\`, controls and non-ASCII bytes as `\xHH`;
/// cut at [`MAX_FIELD`] bytes.
fn nginx_escaped(s: &mut Vec<u8>, v: &[u8]) {
    let (v, cut) = clip(v);
    if plain(v) {
        s.extend_from_slice(v);
    } else {
        for &b in v {
            if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
                // `\xHH`, nginx's escape: the digits of the `%HH` form.
                s.extend_from_slice(b"\\x");
                s.extend_from_slice(&percent_encoding::percent_encode_byte(b).as_bytes()[1..]);
            } else {
                s.push(b);
            }
        }
    }
    if cut {
        s.extend_from_slice(b"...");
    }
}

/// `02/Dec/2026:12:00:00 +0000` (UTC), from httpdate's fixed-width IMF-fixdate.
fn clf_time(s: &mut Vec<u8>, t: SystemTime) {
    // "Wed, 02 Dec 2026 12:00:00 GMT": day 5..7, month 8..11, year 12..16, time 17..25.
    let d = httpdate::fmt_http_date(t);
    match (d.get(5..7), d.get(8..11), d.get(12..16), d.get(17..25)) {
        (Some(day), Some(mon), Some(year), Some(hms)) => {
            let _ = write!(s, "{day}/{mon}/{year}:{hms} +0000");
        }
        _ => s.extend_from_slice(d.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_line(e: &Entry) -> String {
        let mut s = Vec::new();
        super::json_line(e, &mut s);
        String::from_utf8(s).unwrap_or_default()
    }

    fn combined_line(e: &Entry) -> String {
        let mut s = Vec::new();
        super::combined_line(e, &mut s);
        String::from_utf8(s).unwrap_or_default()
    }

    fn entry<'a>() -> Entry<'a> {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_212_800),
            request_id: "abc",
            client_ip: Some("10.0.0.1".parse().unwrap_or(std::net::IpAddr::from([0; 4]))),
            method: "GET",
            host: b"api.example.com",
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
            user_agent: "curl/8 \u{1}".as_bytes(),
            referer: b"",
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
        e.user_agent = "x\u{2028}y\u{9b}z\u{202e}".as_bytes();
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

    #[test]
    fn plain_agrees_with_a_byte_at_a_time() {
        let naive = |v: &[u8]| {
            v.iter()
                .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        };
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 100] {
            let base = vec![b'a'; len];
            assert!(plain(&base));
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut v = base.clone();
                    v[at] = b;
                    assert_eq!(plain(&v), naive(&v), "len {len} at {at} byte {b}");
                }
            }
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_logged_not_lost() {
        let mut e = entry();
        e.user_agent = b"sqlmap\xff\xfe/1";
        e.trace_id = Some([0xab; 16]);
        let v: serde_json::Value = serde_json::from_str(&json_line(&e)).unwrap_or_default();
        assert_eq!(v["user_agent"], "sqlmap\u{fffd}\u{fffd}/1");
        assert_eq!(v["trace_id"], "ab".repeat(16));
        let l = combined_line(&e);
        assert!(l.contains("\"sqlmap\\xFF\\xFE/1\""), "{l}");
        assert!(l.contains(&format!(" trace={}\n", "ab".repeat(16))), "{l}");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "10.0.100.255",
            "255.255.255.255",
            "1.22.203.9",
            "::1",
            "fe80::1:2",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap_or(std::net::IpAddr::from([1; 4]));
            let mut s = Vec::new();
            push_ip(&mut s, ip);
            assert_eq!(String::from_utf8_lossy(&s), ip.to_string());
        }
    }
}
