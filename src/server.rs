//! The Pingora server: one proxy service per gateway (its listeners, its worker threads), the
//! SIGHUP reload task, and the process settings Pingora would otherwise take from its own YAML
//! and command line (pid file, upgrade socket and grace period are set
//! per instance here so parallel instances never collide and shutdown does not wait 300 s).
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::config::{self, Config};
use crate::front::Front;
use crate::proxy::GatewayProxy;
use crate::runtime::{Live, Runtime};
use crate::tls::CertStore;
use crate::upstream::health;

/// Builds the server for `cfg`; the caller may add services (the demo does) before running it.
pub fn build(cfg: &Config, upgrade: bool) -> Result<(Server, Live), String> {
    if !upgrade {
        preflight_listeners(cfg)?;
    }
    let conf = ServerConf {
        daemon: false,
        threads: cfg.server.threads,
        pid_file: cfg.server.pid_file.display().to_string(),
        upgrade_sock: cfg.server.upgrade_sock.display().to_string(),
        grace_period_seconds: Some(cfg.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(cfg.server.shutdown_timeout.as_secs().max(1)),
        upstream_keepalive_pool_size: cfg.server.upstream_keepalive_pool,
        work_stealing: cfg.server.work_stealing,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let runtime = Runtime::build(cfg, None)?;
    crate::cache::set_size(cfg.server.cache_size);
    crate::aggregate::set_pool_size(cfg.server.upstream_keepalive_pool);
    let live: Live = Arc::new(ArcSwap::from_pointee(runtime));
    let mut cert_stores = Vec::with_capacity(cfg.gateways.len());
    for (index, g) in cfg.gateways.iter().enumerate() {
        let store = g.tls.as_ref().map(|t| CertStore::new(t.certs.clone()));
        let proxy = GatewayProxy {
            index,
            live: live.clone(),
        };
        let http = pingora_proxy::http_proxy(&server.configuration, proxy);
        let handshaker = match (&g.tls, &store) {
            (Some(tls), Some(store)) => Some(
                crate::tls::Handshaker::new(&g.name, store.clone(), tls.h2, &tls.options)
                    .map_err(|e| format!("gateway \"{}\": {e}", g.name))?,
            ),
            _ => None,
        };
        let front = Front::new(
            http,
            live.clone(),
            g.name.as_str().into(),
            cfg.server.grace_period,
            g.h2c,
            handshaker,
        );
        let mut svc = Service::new(format!("gateway {}", g.name), front);
        // TLS too: the front does the handshake once the connection is admitted.
        let buffer = if g.tls.is_some() {
            L4_BUFFER
        } else {
            PLAIN_L4_BUFFER
        };
        for addr in &g.listen {
            svc.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(buffer));
        }
        server.add_service(svc);
        cert_stores.push(store);
    }
    let (ask, requests) = tokio::sync::mpsc::channel(4);
    let last = Arc::new(std::sync::Mutex::new(None));
    if let Some(addr) = cfg.server.admin {
        let reloads = Reloads {
            ask,
            last: last.clone(),
        };
        server.add_service(crate::admin::service(addr, live.clone(), reloads));
    }
    server.add_service(background_service(
        "health checks and reload",
        Reloader {
            path: cfg.path.clone(),
            upgrade_sock: cfg.server.upgrade_sock.clone(),
            live: live.clone(),
            listeners: listener_set(cfg),
            cert_stores,
            requests: std::sync::Mutex::new(Some(requests)),
            last,
        },
    ));
    Ok((server, live))
}

/// Each client connection's read buffer: a whole TLS record (16 KiB), and more than a request
/// head's first read needs. Pingora's default, 64 KiB, was zeroed for every connection (a
/// fifth of its per-connection cost in callgrind) and held by idle ones: 75 KB per silent TLS
/// client, so `max_connections` of them held 0.75 GB. Larger reads (bodies) bypass it.
const L4_BUFFER: L4BufferSettings = L4BufferSettings {
    read: Some(16 * 1024),
    write: None,
};

/// A plain connection reads straight into Pingora's own head and body buffers: a buffer
/// under them only copied each read once more, and held 16 KiB for every idle connection.
const PLAIN_L4_BUFFER: L4BufferSettings = L4BufferSettings {
    read: Some(0),
    write: None,
};

/// Pingora retries a busy address for 30 s (it expects an upgrade to free it); outside an
/// upgrade, a busy port is a mistake to report at once.
fn preflight_listeners(cfg: &Config) -> Result<(), String> {
    if let Some(addr) = cfg.server.admin {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            return Err(format!("[server] admin: cannot listen on {addr}: {e}"));
        }
    }
    for g in &cfg.gateways {
        for addr in &g.listen {
            if let Err(e) = std::net::TcpListener::bind(addr) {
                return Err(format!(
                    "gateway \"{}\": cannot listen on {addr}: {e}",
                    g.name
                ));
            }
        }
    }
    Ok(())
}

/// What a listener is made with: a change needs a restart or an upgrade (certificates do not).
type ListenerSet = Vec<(
    String,
    Vec<std::net::SocketAddr>,
    Option<(bool, crate::config::TlsOptions)>,
    crate::config::H2c,
)>;

fn listener_set(cfg: &Config) -> ListenerSet {
    cfg.gateways
        .iter()
        .map(|g| {
            let tls = g.tls.as_ref().map(|t| (t.h2, t.options.clone()));
            (g.name.clone(), g.listen.clone(), tls, g.h2c)
        })
        .collect()
}

/// Runs the active health checks, and reloads the file on SIGHUP: a complete new snapshot,
/// swapped in at once; a bad file, or one that changes listeners (which need a restart or
/// upgrade), leaves the running one.
struct Reloader {
    path: PathBuf,
    /// Pingora's, as set at start (a reload does not move it).
    upgrade_sock: PathBuf,
    live: Live,
    listeners: ListenerSet,
    /// Per gateway, the certificate its TLS handshakes use.
    cert_stores: Vec<Option<Arc<CertStore>>>,
    /// Reload requests from the admin listener (`POST /reload`), each with its answer.
    requests: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<ReloadRequest>>>,
    last: Arc<std::sync::Mutex<Option<LastReload>>>,
}

/// A reload asked over the admin API; the answer says whether it took.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The last reload, for `/status`.
#[derive(Clone, Debug)]
pub struct LastReload {
    pub at: std::time::SystemTime,
    pub result: Result<(), String>,
}

/// What the admin listener needs of the reloader.
#[derive(Clone)]
pub struct Reloads {
    pub ask: tokio::sync::mpsc::Sender<ReloadRequest>,
    pub last: Arc<std::sync::Mutex<Option<LastReload>>>,
}

impl Reloader {
    /// Reads, resolves and builds off the async runtime (file reads, DNS lookups, key parsing
    /// and regex builds block), then swaps the snapshot and the certificates together.
    async fn reload(&self) -> Result<(), String> {
        let result = self.try_reload().await;
        crate::metrics::reloaded(result.is_ok());
        if let Ok(mut last) = self.last.lock() {
            *last = Some(LastReload {
                at: std::time::SystemTime::now(),
                result: result.clone(),
            });
        }
        result
    }

    async fn try_reload(&self) -> Result<(), String> {
        let path = self.path.clone();
        let current = self.live.load_full();
        let built = tokio::task::spawn_blocking(move || {
            let cfg = config::load(&path).map_err(|e| format!("\n{e}"))?;
            let rt = Runtime::build(&cfg, Some(&current)).map_err(|e| format!(" {e}"))?;
            Ok::<_, String>((cfg, rt))
        })
        .await;
        let (cfg, rt) = match built {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                log::error!("reload refused, keeping the running config:{e}");
                return Err(e.trim_start().to_string());
            }
            Err(e) => {
                log::error!("reload refused, keeping the running config: {e}");
                return Err(e.to_string());
            }
        };
        for w in &cfg.warnings {
            log::warn!("{w}");
        }
        if listener_set(&cfg) != self.listeners {
            let why = format!(
                "gateways, listeners, h2c or TLS options (h2, min_version, ciphers, curves) changed; restart or upgrade to apply ({})",
                self.path.display()
            );
            log::error!("reload refused: {why}");
            return Err(why);
        }
        let rt = Arc::new(rt);
        let old = self.live.swap(rt.clone());
        // Routes the new file no longer has: their series go from /metrics.
        for (g, r) in old.route_labels(false).difference(&rt.route_labels(false)) {
            crate::metrics::RouteMetrics::forget(g, r);
        }
        for (g, r) in old.route_labels(true).difference(&rt.route_labels(true)) {
            crate::metrics::RouteMetrics::forget_cache(g, r);
        }
        crate::cache::set_size(cfg.server.cache_size);
        for (g, store) in cfg.gateways.iter().zip(&self.cert_stores) {
            if let (Some(tls), Some(store)) = (&g.tls, store) {
                store.replace(tls.certs.clone());
            }
        }
        health::spawn_checks(&rt.pools);
        crate::stores::start(&rt.stores);
        start_fleet(
            &rt,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
        );
        crate::systemd::notify("STATUS=reloaded");
        log::info!("reloaded {}", self.path.display());
        Ok(())
    }
}

/// Says who this replica is in the fleet registry (version, config digest, last reload) and
/// starts the fleet's tasks if they are not running.
fn start_fleet(rt: &crate::runtime::Runtime, last_reload: Option<u64>) {
    let Some(f) = &rt.fleet else { return };
    let config = rt
        .config_digest
        .get_or_init(|| crate::admin::config_digest(&rt.config_source))
        .clone();
    f.set_info(crate::stores::fleet::NodeInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        config,
        last_reload,
        started: crate::admin::started_unix(),
    });
    f.start();
}

/// SIGUSR1 reopens the access log (logrotate's `postrotate`, as nginx's USR1).
async fn reopen_logs_on_usr1() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = match signal(SignalKind::user_defined1()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot watch SIGUSR1, log reopening disabled: {e}");
            return;
        }
    };
    while usr1.recv().await.is_some() {
        crate::access_log::REOPEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        log::info!("SIGUSR1: reopening the access log");
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        // Health-check tasks live in this service's runtime, for as long as the server runs.
        health::spawn_checks(&self.live.load().pools);
        crate::stores::start(&self.live.load().stores);
        start_fleet(&self.live.load(), None);
        tokio::spawn(crate::upstream::resolve::run(self.live.clone()));
        let addrs = self
            .listeners
            .iter()
            .flat_map(|(_, a, _, _)| a.iter().copied())
            .collect();
        tokio::spawn(crate::systemd::ready_when_listening(addrs));
        tokio::spawn(reopen_logs_on_usr1());
        tokio::spawn(crate::admin::history::run());
        tokio::spawn(crate::upgrade::on_usr2(
            self.path.clone(),
            self.upgrade_sock.clone(),
        ));
        let Some(mut requests) = self.requests.lock().ok().and_then(|mut r| r.take()) else {
            log::error!("reload service started twice");
            return;
        };
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot watch SIGHUP, reload disabled: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let _ = self.reload().await;
                }
                Some(reply) = requests.recv() => {
                    let _ = reply.send(self.reload().await);
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
