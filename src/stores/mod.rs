//! Shared state over Redis (or Valkey): what replicas of the gateway count together.
//!
//! A `[stores.NAME]` section names one Redis deployment: a single server (`url`), a Cluster
//! (`cluster`) or a master found through Sentinels (`sentinel`). Connections are made and
//! remade off the request path by a keeper task (in the background service's runtime), so
//! a request never waits for a connect: it finds the store usable, or it falls back at once.
//!
//! Failures are handled per store, not per request: after an error the store is left alone
//! for a back-off (100 ms doubling to 5 s) and then one request probes it; the log says it
//! once when an episode starts and once when it ends; `gatehouse_store_errors_total{store,kind}`
//! counts every error. A connection error (a refused or dropped connection, or a server
//! that is no longer a master: `READONLY`, `MASTERDOWN`…) drops the connections and the
//! keeper makes new ones, asking the Sentinels for the master again: a failover is followed
//! without a restart. A Cluster connection follows slot moves (`MOVED`/`ASK`) by itself.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use gatehouse_plugins::store::{SharedCounter, SharedVerdict, StoreUnavailable, WindowRule};
use prometheus::IntCounter;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::Notify;

mod health;
use health::{Health, BACKOFF_MIN_MS};

pub mod fleet;

/// Where the store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Single(String),
    Cluster(Vec<String>),
    /// The master named `master`, as the Sentinels at `nodes` know it; `auth`: the user
    /// and password the master wants (the Sentinels' own are in their URLs).
    Sentinel {
        master: String,
        nodes: Vec<String>,
        auth: Option<(Option<String>, String)>,
    },
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Single(_) => "single",
            Target::Cluster(_) => "cluster",
            Target::Sentinel { .. } => "sentinel",
        }
    }
}

/// A store as the config sets it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub name: String,
    pub target: Target,
    /// Connections to a single server or a Sentinel-found master (each multiplexes every
    /// request sent to it); a Cluster connection is one per node, kept by the client.
    pub pool_size: usize,
    /// The longest a request waits for the store, connection included.
    pub timeout: Duration,
    /// Put before every key, so several gateways (or other programs) can share a Redis.
    pub prefix: String,
}

impl Settings {
    /// Checks what can be checked without connecting: every URL parses.
    pub fn validate(&self) -> Result<(), String> {
        let urls: Vec<&String> = match &self.target {
            Target::Single(u) => vec![u],
            Target::Cluster(n) | Target::Sentinel { nodes: n, .. } => n.iter().collect(),
        };
        for u in urls {
            // The URL itself is not repeated: it may hold a password; the line says which.
            redis::Client::open(u.as_str()).map_err(|e| format!("invalid Redis URL: {e}"))?;
        }
        Ok(())
    }
}

/// Timeouts in a row after which the connections are made again.
const RECONNECT_AFTER_TIMEOUTS: u32 = 3;
/// Connecting gets more time than a request: it happens off the request path.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Error kinds of `gatehouse_store_errors_total`.
#[derive(Clone, Copy)]
enum Kind {
    /// The store did not answer within `timeout`.
    Timeout = 0,
    /// No connection could be made.
    Connect = 1,
    /// A connection broke, or the server is no longer the master.
    Connection = 2,
    /// The server answered with an error.
    Reply = 3,
}
const KINDS: [&str; 4] = ["timeout", "connect", "connection", "reply"];

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// One Redis deployment, shared by every plugin that names it and kept across reloads while
/// its settings do not change.
pub struct Store {
    pub settings: Settings,
    conns: ArcSwapOption<Vec<Conn>>,
    health: Health,
    /// Asks the keeper for new connections.
    wake: Arc<Notify>,
    keeper: AtomicBool,
    errors: [IntCounter; 4],
    window: redis::Script,
    /// Rotates requests over the pool's connections (no lock: a relaxed counter).
    next: AtomicU64,
    /// Tells this store's connections apart in the worker threads' own lists.
    uid: usize,
    /// Bumped when connections are found broken: the threads' own ones are made again too.
    generation: AtomicU64,
    /// Alive while the store is: a thread's connection to a store a reload dropped goes.
    token: Arc<()>,
    /// Timeouts in a row: a server that went silent (a dead VM, a partition) is not noticed
    /// by TCP for minutes; after a few, the connections are made again.
    timeouts: std::sync::atomic::AtomicU32,
    /// When an error answer was last logged (they are not outages: logged once a minute).
    reply_logged: AtomicU64,
}

/// A worker thread's own connection to a store.
struct Local {
    uid: usize,
    alive: std::sync::Weak<()>,
    generation: u64,
    state: LocalState,
}

enum LocalState {
    Ready(Conn),
    /// Being made by a task on this thread's runtime.
    Pending(tokio::sync::oneshot::Receiver<Conn>),
    /// Could not be made: not tried again before then.
    Failed(Instant),
}

thread_local! {
    /// Connections each worker thread made itself, by store. A connection's I/O runs as a task
    /// on the runtime that made it: one made here is served by this thread, with no hand-off
    /// to another thread and back per request (which cost a third of the requests per second
    /// of a Redis-counted limit, measured with load-tests/run.sh fleet).
    static LOCAL: std::cell::RefCell<Vec<Local>> = const { std::cell::RefCell::new(Vec::new()) };
}

static NEXT_UID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Store {
    pub fn new(settings: Settings) -> Store {
        let errors = KINDS.map(|k| {
            crate::metrics::METRICS
                .store_errors
                .with_label_values(&[&settings.name, k])
        });
        Store {
            settings,
            conns: ArcSwapOption::empty(),
            health: Health::default(),
            wake: Arc::new(Notify::new()),
            keeper: AtomicBool::new(false),
            errors,
            window: redis::Script::new(include_str!("window.lua")),
            next: AtomicU64::new(0),
            uid: NEXT_UID.fetch_add(1, Relaxed),
            generation: AtomicU64::new(0),
            token: Arc::new(()),
            timeouts: std::sync::atomic::AtomicU32::new(0),
            reply_logged: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// Whether the store answers now (connected and not in an episode of errors).
    pub fn up(&self) -> bool {
        self.conns.load().is_some() && !self.health.down.load(Relaxed)
    }

    /// A connection to send one request on, or `None`: not connected, or backing off.
    fn conn(&self) -> Option<(Conn, u64)> {
        let generation = self.generation.load(Relaxed);
        let conns = self.conns.load();
        let conns = conns.as_ref()?;
        if conns.is_empty() || !self.health.usable() {
            return None;
        }
        if let Some(c) = self.local(generation) {
            return Some((c, generation));
        }
        let i = self.next.fetch_add(1, Relaxed) as usize % conns.len();
        Some((conns[i].clone(), generation))
    }

    /// This thread's own connection, once made; asks for one (made by a task of this
    /// thread's runtime) when there is none. Meanwhile the shared pool serves.
    fn local(&self, generation: u64) -> Option<Conn> {
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            l.retain(|x| x.alive.strong_count() > 0);
            let at = l.iter().position(|x| x.uid == self.uid);
            if let Some(x) = at.map(|i| &mut l[i]) {
                if x.generation == generation {
                    match &mut x.state {
                        LocalState::Ready(c) => return Some(c.clone()),
                        LocalState::Pending(rx) => match rx.try_recv() {
                            Ok(c) => {
                                x.state = LocalState::Ready(c.clone());
                                return Some(c);
                            }
                            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return None,
                            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                                x.state = LocalState::Failed(Instant::now());
                                return None;
                            }
                        },
                        LocalState::Failed(at) if at.elapsed() < Duration::from_secs(5) => {
                            return None
                        }
                        LocalState::Failed(_) => {}
                    }
                }
            }
            let handle = tokio::runtime::Handle::try_current().ok()?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut settings = self.settings.clone();
            settings.pool_size = 1;
            handle.spawn(async move {
                let made =
                    tokio::time::timeout(CONNECT_TIMEOUT, connect(&settings, &mut None)).await;
                if let Ok(Ok(mut c)) = made {
                    if let Some(c) = c.pop() {
                        let _ = tx.send(c);
                    }
                }
            });
            let fresh = Local {
                uid: self.uid,
                alive: Arc::downgrade(&self.token),
                generation,
                state: LocalState::Pending(rx),
            };
            match at {
                Some(i) => l[i] = fresh,
                None => l.push(fresh),
            }
            None
        })
    }

    /// An error on a connection of `generation`.
    fn fault(&self, kind: Kind, what: &dyn std::fmt::Display, generation: u64) {
        self.errors[kind as usize].inc();
        if let Kind::Reply = kind {
            // An error answer (a key of another type, a missing permission) is no outage:
            // this request falls back, the store stays in use.
            let now = self.health.now_ms();
            let last = self.reply_logged.load(Relaxed);
            if (last == 0 || now.saturating_sub(last) >= 60_000)
                && self
                    .reply_logged
                    .compare_exchange(last, now, Relaxed, Relaxed)
                    .is_ok()
            {
                log::warn!(
                    "store \"{}\": error answer: {what} (said once a minute)",
                    self.settings.name
                );
            }
            return;
        }
        if self.health.failed() {
            log::warn!(
                "store \"{}\": {}: {what}; plugins apply their on_store_error policy until it answers",
                self.settings.name,
                KINDS[kind as usize]
            );
        }
        let silent = matches!(kind, Kind::Timeout)
            && self.timeouts.fetch_add(1, Relaxed) + 1 >= RECONNECT_AFTER_TIMEOUTS;
        // Only the connections that failed are remade: a late error from the pool before
        // leaves the new one alone.
        if (silent || matches!(kind, Kind::Connection | Kind::Connect))
            && self
                .generation
                .compare_exchange(generation, generation + 1, Relaxed, Relaxed)
                .is_ok()
        {
            self.timeouts.store(0, Relaxed);
            self.conns.store(None);
            self.wake.notify_one();
        }
    }

    fn recovered(&self) {
        if self.timeouts.load(Relaxed) != 0 {
            self.timeouts.store(0, Relaxed);
        }
        if let Some(n) = self.health.succeeded() {
            log::warn!(
                "store \"{}\": answering again (after {n} error(s))",
                self.settings.name
            );
        }
    }

    /// Runs `f` on a connection, within `timeout`; errors are counted, logged once per
    /// episode and turn into [`StoreUnavailable`].
    async fn run<T, F, Fut>(&self, timeout: Duration, f: F) -> Result<T, StoreUnavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let (conn, generation) = self.conn().ok_or(StoreUnavailable)?;
        match pingora_timeout::timeout(timeout, f(conn)).await {
            Ok(Ok(v)) => {
                self.recovered();
                Ok(v)
            }
            Ok(Err(e)) => {
                self.fault(classify(&e), &e, generation);
                Err(StoreUnavailable)
            }
            Err(_) => {
                self.fault(
                    Kind::Timeout,
                    &format_args!("no answer within {timeout:?}"),
                    generation,
                );
                Err(StoreUnavailable)
            }
        }
    }

    /// One command off the request path (fleet work), on the shared connections. It may
    /// wait: while the store backs off or reconnects it is tried again every 50 ms, until
    /// `timeout`.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: Cmd,
        timeout: Duration,
    ) -> Result<T, StoreUnavailable> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let generation = self.generation.load(Relaxed);
            let conn = self.conns.load().as_ref().and_then(|c| c.first().cloned());
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Some(mut c) = conn {
                match tokio::time::timeout(left, cmd.query_async(&mut c)).await {
                    Ok(Ok(v)) => {
                        self.recovered();
                        return Ok(v);
                    }
                    Ok(Err(e)) => {
                        let kind = classify(&e);
                        self.fault(kind, &e, generation);
                        if let Kind::Reply = kind {
                            // Asking again would get the same answer.
                            return Err(StoreUnavailable);
                        }
                    }
                    Err(_) => self.fault(
                        Kind::Timeout,
                        &format_args!("no answer within {timeout:?}"),
                        generation,
                    ),
                }
            }
            if tokio::time::Instant::now() + Duration::from_millis(50) >= deadline {
                return Err(StoreUnavailable);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A connection of its own, for a reader that blocks (`XREAD BLOCK` would hold up every
    /// request multiplexed on a shared one).
    async fn dedicated(&self) -> Result<Conn, RedisError> {
        let mut s = self.settings.clone();
        s.pool_size = 1;
        let made = tokio::time::timeout(CONNECT_TIMEOUT, connect(&s, &mut None)).await;
        match made {
            Ok(Ok(mut c)) => c
                .pop()
                .ok_or_else(|| RedisError::from((redis::ErrorKind::Io, "no connection made"))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RedisError::from((
                redis::ErrorKind::Io,
                "no connection within the connect timeout",
            ))),
        }
    }

    /// Starts the keeper task on the current runtime, once. It holds the store weakly and
    /// ends when a reload drops the store.
    pub fn start(self: &Arc<Self>) {
        if self.keeper.swap(true, Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        tokio::spawn(async move {
            let mut sentinel = None;
            loop {
                let Some(store) = weak.upgrade() else { return };
                if store.conns.load().is_none() {
                    let made = tokio::time::timeout(
                        CONNECT_TIMEOUT,
                        connect(&store.settings, &mut sentinel),
                    )
                    .await;
                    match made {
                        Ok(Ok(conns)) => {
                            store.conns.store(Some(Arc::new(conns)));
                            if store.health.down.load(Relaxed) {
                                // The next request probes at once; the episode ends when
                                // one is answered (a connection alone proves little: a
                                // Cluster may still route the key to a dead master).
                                store.health.probe_now();
                            } else {
                                log::info!("store \"{}\": connected", store.settings.name);
                            }
                        }
                        Ok(Err(e)) => {
                            store.fault(Kind::Connect, &e, store.generation.load(Relaxed))
                        }
                        Err(_) => store.fault(
                            Kind::Connect,
                            &format_args!("no connection within {CONNECT_TIMEOUT:?}"),
                            store.generation.load(Relaxed),
                        ),
                    }
                }
                let connected = store.conns.load().is_some();
                let backoff = Duration::from_millis(
                    store.health.backoff_ms.load(Relaxed).max(BACKOFF_MIN_MS),
                );
                drop(store);
                if connected {
                    // Woken for a reconnect, or now and then to notice a dropped store.
                    let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
                } else {
                    tokio::time::sleep(backoff).await;
                }
            }
        });
    }
}

/// Errors that mean "this connection cannot serve": make new ones (and ask the Sentinels
/// again). Other error replies leave the connections alone.
fn classify(e: &RedisError) -> Kind {
    if e.is_timeout() {
        return Kind::Timeout;
    }
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        return Kind::Connection;
    }
    match e.code() {
        Some("READONLY" | "MASTERDOWN" | "LOADING" | "CLUSTERDOWN" | "TRYAGAIN" | "NOREPLICAS") => {
            Kind::Connection
        }
        _ => Kind::Reply,
    }
}

async fn connect(
    s: &Settings,
    sentinel: &mut Option<redis::sentinel::SentinelClient>,
) -> Result<Vec<Conn>, RedisError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None);
    let client = match &s.target {
        Target::Cluster(nodes) => {
            let c = redis::cluster::ClusterClient::builder(nodes.clone())
                .connection_timeout(CONNECT_TIMEOUT)
                .retries(1)
                .build()?;
            let conn = c.get_async_connection().await?;
            return Ok(vec![Conn::Cluster(conn)]);
        }
        Target::Single(url) => redis::Client::open(url.as_str())?,
        Target::Sentinel {
            master,
            nodes,
            auth,
        } => {
            let info = auth.as_ref().map(|(user, password)| {
                let mut r = redis::RedisConnectionInfo::default().set_password(password);
                if let Some(u) = user {
                    r = r.set_username(u);
                }
                redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(r)
            });
            let sc = match sentinel {
                Some(sc) => sc,
                None => sentinel.insert(redis::sentinel::SentinelClient::build(
                    nodes.clone(),
                    master.clone(),
                    info,
                    redis::sentinel::SentinelServerType::Master,
                )?),
            };
            sc.async_get_client().await?
        }
    };
    let mut conns = Vec::with_capacity(s.pool_size);
    for _ in 0..s.pool_size.max(1) {
        let c = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        conns.push(Conn::Single(c));
    }
    // A Sentinel may still name a master that has just been demoted: make sure it writes.
    if matches!(s.target, Target::Sentinel { .. }) {
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conns[0]).await?;
        if !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") {
            return Err(RedisError::from((
                redis::ErrorKind::Io,
                "the server the Sentinels name is not a master (yet)",
            )));
        }
    }
    Ok(conns)
}

#[async_trait]
impl SharedCounter for Store {
    fn name(&self) -> &str {
        &self.settings.name
    }

    async fn hit(
        &self,
        key: &[u8],
        rule: &WindowRule,
        hits: u64,
        force: bool,
    ) -> Result<SharedVerdict, StoreUnavailable> {
        let mut full = Vec::with_capacity(self.settings.prefix.len() + key.len());
        full.extend_from_slice(self.settings.prefix.as_bytes());
        full.extend_from_slice(key);
        let r: (u64, u64, u64, u64, u64) = self
            .run(self.settings.timeout, |mut c| async move {
                self.window
                    .key(full)
                    .arg(rule.period_ms)
                    .arg(rule.limit)
                    .arg(rule.slice_ms)
                    .arg(rule.slice_limit_milli)
                    .arg(hits)
                    .arg(u8::from(force))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(SharedVerdict {
            ok: r.0 == 1,
            remaining: r.1,
            retry_ms: r.2,
            count: r.3,
            slice_count: r.4,
        })
    }
}

/// Starts the keeper of every store that has none yet (from a runtime that lives as long as
/// the server: the background service's).
pub fn start(stores: &[Arc<Store>]) {
    for s in stores {
        s.start();
    }
}
