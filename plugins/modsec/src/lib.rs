//! libmodsecurity 3, the ModSecurity engine (what nginx's and Apache's ModSecurity modules run
//! the OWASP Core Rule Set with), behind a safe interface: one [`Engine`] and one [`Rules`]
//! set shared by every worker thread, one [`Transaction`] per request.
//!
//! All of the crate's `unsafe` is here, against the library's C interface
//! (`modsecurity/modsecurity.h`, `rules_set.h`, `transaction.h`, `intervention.h` of 3.0.9).
//! What the library allocates for us (error texts, an intervention's log and URL) it
//! allocated with C's malloc: it is freed with C's free, never by Rust's allocator (which is
//! mimalloc in the gateway).
//!
//! Loading rules is not thread-safe in libmodsecurity 3 (a parse shares state: crashes were
//! reported with rule sets loaded at once), so every load holds one process-wide lock;
//! evaluating requests against loaded rules is, and takes none.
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::Mutex;

#[repr(C)]
struct RawIntervention {
    status: c_int,
    pause: c_int,
    url: *mut c_char,
    log: *mut c_char,
    disruptive: c_int,
}

enum ModSecurity {}
enum RulesSet {}
enum RawTransaction {}

type LogCb = extern "C" fn(*mut c_void, *const c_void);

extern "C" {
    fn msc_init() -> *mut ModSecurity;
    fn msc_set_connector_info(msc: *mut ModSecurity, connector: *const c_char);
    fn msc_set_log_cb(msc: *mut ModSecurity, cb: LogCb);
    fn msc_cleanup(msc: *mut ModSecurity);
    fn msc_create_rules_set() -> *mut RulesSet;
    fn msc_rules_add(
        rules: *mut RulesSet,
        plain: *const c_char,
        error: *mut *const c_char,
    ) -> c_int;
    fn msc_rules_cleanup(rules: *mut RulesSet) -> c_int;
    fn msc_new_transaction(
        msc: *mut ModSecurity,
        rules: *mut RulesSet,
        log_cb_data: *mut c_void,
    ) -> *mut RawTransaction;
    fn msc_process_connection(
        t: *mut RawTransaction,
        client: *const c_char,
        client_port: c_int,
        server: *const c_char,
        server_port: c_int,
    ) -> c_int;
    fn msc_process_uri(
        t: *mut RawTransaction,
        uri: *const c_char,
        protocol: *const c_char,
        http_version: *const c_char,
    ) -> c_int;
    fn msc_add_n_request_header(
        t: *mut RawTransaction,
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> c_int;
    fn msc_process_request_headers(t: *mut RawTransaction) -> c_int;
    fn msc_append_request_body(t: *mut RawTransaction, body: *const u8, len: usize) -> c_int;
    fn msc_process_request_body(t: *mut RawTransaction) -> c_int;
    fn msc_intervention(t: *mut RawTransaction, it: *mut RawIntervention) -> c_int;
    fn msc_process_logging(t: *mut RawTransaction) -> c_int;
    fn msc_transaction_cleanup(t: *mut RawTransaction);
}

/// Serializes rule loading (see the crate's doc).
static LOADING: Mutex<()> = Mutex::new(());

/// The engine: one per process.
pub struct Engine(NonNull<ModSecurity>);

// SAFETY: libmodsecurity's ModSecurity object is made to be shared by the threads of a server
// (nginx's workers share one per process); after set-up it is only read.
unsafe impl Send for Engine {}
unsafe impl Sync for Engine {}

impl Engine {
    pub fn new() -> Engine {
        // SAFETY: msc_init has no preconditions; a null return (out of memory) is refused.
        let msc = NonNull::new(unsafe { msc_init() }).expect("libmodsecurity: msc_init failed");
        let name = CString::new("gatehouse").unwrap_or_default();
        // SAFETY: both pointers are valid for the call; the library copies the text.
        unsafe {
            msc_set_connector_info(msc.as_ptr(), name.as_ptr());
            msc_set_log_cb(msc.as_ptr(), log_cb);
        }
        Engine(msc)
    }
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: the pointer came from msc_init and is dropped once.
        unsafe { msc_cleanup(self.0.as_ptr()) }
    }
}

/// A set of rules (SecLang text: directives, `Include`s).
pub struct Rules(NonNull<RulesSet>);

// SAFETY: a loaded rule set is read-only during evaluation, which libmodsecurity does from
// many threads at once (nginx's workers); loads are serialized by LOADING.
unsafe impl Send for Rules {}
unsafe impl Sync for Rules {}

impl Rules {
    /// Parses `text` (SecLang; `Include` paths are read here). The error is the library's
    /// message, with the file and line it names.
    pub fn parse(text: &str) -> Result<Rules, String> {
        let text = CString::new(text).map_err(|_| "rules contain a NUL byte".to_string())?;
        let _lock = LOADING.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: no preconditions; null (out of memory) is refused.
        let set = NonNull::new(unsafe { msc_create_rules_set() })
            .ok_or_else(|| "libmodsecurity: cannot create a rule set".to_string())?;
        let rules = Rules(set);
        let mut error: *const c_char = std::ptr::null();
        // SAFETY: `set` is valid, `text` is NUL-terminated and outlives the call, and `error`
        // is a valid out-pointer.
        let n = unsafe { msc_rules_add(set.as_ptr(), text.as_ptr(), &mut error) };
        if n < 0 {
            return Err(take_c_string(error).unwrap_or_else(|| "rules refused".into()));
        }
        Ok(rules)
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        // SAFETY: the pointer came from msc_create_rules_set and is dropped once.
        unsafe {
            msc_rules_cleanup(self.0.as_ptr());
        }
    }
}

/// Takes a string the library allocated with malloc: copied, then freed with C's free.
fn take_c_string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated (the library's), and freed once right after the copy.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    unsafe { libc::free(p as *mut c_void) };
    Some(s)
}

/// What the rules decided for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intervention {
    /// The status to answer (403 for the Core Rule Set's blocks).
    pub status: u16,
    /// The library's log line for it.
    pub log: Option<String>,
}

/// One request's evaluation. The rules' messages (a line per matched rule, with its id) are
/// collected as they come.
pub struct Transaction<'a> {
    raw: NonNull<RawTransaction>,
    /// Boxed so its address, handed to the library for the log callback, does not move when
    /// the transaction does (the Vec's own header would).
    #[allow(clippy::box_collection)]
    messages: Box<Vec<String>>,
    _engine: std::marker::PhantomData<(&'a Engine, &'a Rules)>,
}

extern "C" fn log_cb(data: *mut c_void, msg: *const c_void) {
    if data.is_null() || msg.is_null() {
        return;
    }
    // SAFETY: `data` is the `messages` box of the live transaction that logs (set at its
    // creation, which outlives every call); `msg` is a NUL-terminated text (TextLogProperty,
    // the default).
    let messages = unsafe { &mut *(data as *mut Vec<String>) };
    let text = unsafe { CStr::from_ptr(msg as *const c_char) };
    messages.push(text.to_string_lossy().into_owned());
}

fn c(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

impl<'a> Transaction<'a> {
    pub fn new(engine: &'a Engine, rules: &'a Rules) -> Transaction<'a> {
        let mut messages = Box::<Vec<String>>::default();
        let data = &mut *messages as *mut Vec<String> as *mut c_void;
        // SAFETY: engine and rules are valid for 'a, which the transaction does not outlive;
        // `data` stays valid as long as the box, which the transaction owns.
        let raw = unsafe { msc_new_transaction(engine.0.as_ptr(), rules.0.as_ptr(), data) };
        Transaction {
            raw: NonNull::new(raw).expect("libmodsecurity: msc_new_transaction failed"),
            messages,
            _engine: std::marker::PhantomData,
        }
    }

    pub fn connection(&mut self, client: &str, client_port: u16, server: &str, server_port: u16) {
        let (client, server) = (c(client), c(server));
        // SAFETY: valid transaction; the texts are copied by the library during the call.
        unsafe {
            msc_process_connection(
                self.raw.as_ptr(),
                client.as_ptr(),
                client_port.into(),
                server.as_ptr(),
                server_port.into(),
            );
        }
    }

    /// The request line: `uri` as sent (path and query), `method`, `version` ("1.1", "2.0").
    pub fn uri(&mut self, uri: &str, method: &str, version: &str) {
        let (uri, method, version) = (c(uri), c(method), c(version));
        // SAFETY: as above.
        unsafe {
            msc_process_uri(
                self.raw.as_ptr(),
                uri.as_ptr(),
                method.as_ptr(),
                version.as_ptr(),
            );
        }
    }

    pub fn header(&mut self, name: &[u8], value: &[u8]) {
        // SAFETY: the slices are valid for their lengths during the call; the library copies.
        unsafe {
            msc_add_n_request_header(
                self.raw.as_ptr(),
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            );
        }
    }

    /// Runs phase 1 (request headers).
    pub fn process_headers(&mut self) {
        // SAFETY: valid transaction.
        unsafe {
            msc_process_request_headers(self.raw.as_ptr());
        }
    }

    pub fn append_body(&mut self, piece: &[u8]) {
        // SAFETY: the slice is valid for its length during the call; the library copies.
        unsafe {
            msc_append_request_body(self.raw.as_ptr(), piece.as_ptr(), piece.len());
        }
    }

    /// Runs phase 2 (request body).
    pub fn process_body(&mut self) {
        // SAFETY: valid transaction.
        unsafe {
            msc_process_request_body(self.raw.as_ptr());
        }
    }

    /// What the rules decided so far: `Some` when they stop the request.
    pub fn intervention(&mut self) -> Option<Intervention> {
        let mut it = RawIntervention {
            status: 200,
            pause: 0,
            url: std::ptr::null_mut(),
            log: std::ptr::null_mut(),
            disruptive: 0,
        };
        // SAFETY: valid transaction and a valid out-struct; the strings it may fill are
        // malloc'd by the library and taken (freed) below.
        let hit = unsafe { msc_intervention(self.raw.as_ptr(), &mut it) };
        let log = take_c_string(it.log);
        let _ = take_c_string(it.url);
        (hit != 0 && it.disruptive != 0).then(|| Intervention {
            status: u16::try_from(it.status).unwrap_or(403),
            log,
        })
    }

    /// The matched rules' messages, as the library logged them.
    pub fn messages(&self) -> &[String] {
        &self.messages
    }

    /// The ids of the matched rules, from their messages (`[id "942100"]`).
    pub fn rule_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .messages
            .iter()
            .filter_map(|m| {
                let at = m.find("[id \"")? + 5;
                let end = m[at..].find('"')? + at;
                m[at..end].parse().ok()
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Runs the logging phase (the anomaly score's final rules).
    pub fn finish(&mut self) {
        // SAFETY: valid transaction.
        unsafe {
            msc_process_logging(self.raw.as_ptr());
        }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        // SAFETY: created by msc_new_transaction, cleaned up once; the messages box outlives
        // the cleanup (fields drop after this body).
        unsafe { msc_transaction_cleanup(self.raw.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRS: &str = "SecRuleEngine On\n\
        SecRequestBodyAccess On\n\
        Include /etc/modsecurity/crs/crs-setup.conf\n\
        Include /usr/share/modsecurity-crs/rules/*.conf\n";

    fn crs() -> Option<(Engine, Rules)> {
        if !std::path::Path::new("/usr/share/modsecurity-crs/rules").exists() {
            eprintln!("the modsecurity-crs package is not installed: skipped");
            return None;
        }
        let engine = Engine::new();
        let rules = Rules::parse(CRS).expect("the packaged CRS loads");
        Some((engine, rules))
    }

    fn evaluate(engine: &Engine, rules: &Rules, uri: &str) -> (Option<Intervention>, Vec<u32>) {
        let mut t = Transaction::new(engine, rules);
        t.connection("127.0.0.1", 40000, "127.0.0.1", 8080);
        t.uri(uri, "GET", "1.1");
        t.header(b"Host", b"api.example.com");
        t.header(b"User-Agent", b"curl/8.0");
        t.header(b"Accept", b"*/*");
        t.process_headers();
        t.process_body();
        let it = t.intervention();
        t.finish();
        (it, t.rule_ids())
    }

    #[test]
    fn the_core_rule_set_blocks_an_injection_and_passes_a_plain_request() {
        let Some((engine, rules)) = crs() else { return };
        let (it, ids) = evaluate(&engine, &rules, "/search?q=1%27%20OR%20%271%27=%271");
        assert_eq!(it.as_ref().map(|i| i.status), Some(403), "{it:?} {ids:?}");
        // The block itself is the anomaly score's rule, said in the intervention's log.
        let log = it.and_then(|i| i.log).unwrap_or_default();
        assert!(log.contains("949110"), "{log}");
        assert!(
            ids.iter().any(|id| (942000..943000).contains(id)),
            "an SQLi rule: {ids:?}"
        );
        let (it, ids) = evaluate(&engine, &rules, "/search?q=blue+shoes");
        assert_eq!(it, None, "{ids:?}");
    }

    #[test]
    fn a_rule_that_does_not_parse_is_refused_with_its_line() {
        let err = Rules::parse("SecRuleEngine On\nSecRule ARGS \"@rx x\" \"id:1,phase:2,nope\"\n")
            .err()
            .expect("refused");
        assert!(err.contains("nope") || err.contains("line"), "{err}");
    }
}
