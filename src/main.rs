//! The `gatehouse` command line: run, check, demo. Nothing else lives here.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatehouse::{config, demo, server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gatehouse: an API gateway and edge proxy built on Pingora.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gateways of a config file (foreground; logs to stderr; SIGHUP reloads it).
    Run {
        /// The config file.
        #[arg(short, long, default_value = "/etc/gatehouse/gatehouse.toml")]
        config: PathBuf,
        /// Take over the listeners of a running instance (zero-downtime upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file: exit 0, or print every error with its line and exit 1.
    Check {
        #[arg(short, long, default_value = "/etc/gatehouse/gatehouse.toml")]
        config: PathBuf,
    },
    /// Say which route a request would take and why, where it would go, and which plugins
    /// would run, without sending it.
    Explain {
        #[arg(short, long, default_value = "/etc/gatehouse/gatehouse.toml")]
        config: PathBuf,
        /// A request header, as curl's: -H 'Name: value' (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// The gateway, when the URL's port does not say.
        #[arg(long)]
        gateway: Option<String>,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
        /// GET, POST...
        method: String,
        /// http://host[:port]/path?query, or /path.
        url: String,
    },
    /// Start built-in demo services and the gateway on the demo config, and print curl lines.
    Demo {
        /// The config to use; default: conf/gatehouse.toml, or the built-in copy of it.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

/// mimalloc returns memory to the system only when the thread that owns it allocates or
/// frees again: after a flood of slow clients, idle worker threads kept 800 MB (1,500 clients
/// of a 1 MB answer) until traffic resumed. So a worker thread whose connection ends collects
/// its heap, at most every 100 ms; one that ends sooner has a collect run 150 ms later (most
/// often on the same thread), so the last connections of a flood are collected too. Purging
/// on every free instead (MIMALLOC_PURGE_DELAY=0) cost 0.8 page faults per request.
fn release_memory() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
        /// Until when a trailing collect is scheduled from this thread (it may run on
        /// another: with work stealing a task moves, so this is a time, not a flag it clears).
        static PENDING: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    if LAST
        .get()
        .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
    {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if PENDING.get().is_none_or(|t| now >= t) {
            PENDING.set(Some(now + Duration::from_millis(150)));
            rt.spawn(async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                collect();
            });
        }
        return;
    }
    LAST.set(Some(now));
    collect();
}

fn collect() {
    // SAFETY: mi_collect works on the calling thread's own heap (and, forced, returns what
    // was freed to the shared arenas); it has no preconditions.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

fn start_memory_release() {
    let _ = gatehouse::front::CONNECTION_ENDED.set(release_memory);
}

fn init_logging() {
    let inner = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,gatehouse=info"),
    )
    .format_timestamp_millis()
    .build();
    let level = inner.filter();
    let redis_verbose = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("redis"));
    if log::set_boxed_logger(Box::new(Quiet(inner, redis_verbose))).is_ok() {
        log::set_max_level(level);
    }
}

/// Set from `[server] log_format = "json"` once the config is read.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One JSON object per line on stderr, for log shippers that parse JSON.
fn json_log(r: &log::Record) {
    use std::io::Write;
    let line = serde_json::json!({
        "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "level": r.level().as_str(),
        "target": r.target(),
        "message": r.args().to_string(),
    });
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Drops the lines Pingora logs at ERROR, unconditionally, for what clients do: a client that
/// goes away while a cache hit is sent to it ("Fail to serve cache: Downstream ..."), a
/// broken HTTP/2 preface or TLS close (`gatehouse::tls::failures`). A client leaving is
/// routine (the proxy path keeps such lines at debug), and a load of them would drown the log.
/// The Redis client's warnings (one per reconnect attempt) are dropped too, unless RUST_LOG
/// names `redis`: `gatehouse::stores` says each episode once.
struct Quiet(env_logger::Logger, bool);

impl log::Log for Quiet {
    fn enabled(&self, m: &log::Metadata) -> bool {
        self.0.enabled(m)
    }

    fn log(&self, r: &log::Record) {
        if !self.1 && r.level() > log::Level::Error && r.target().starts_with("redis") {
            return;
        }
        // Both kinds of noise are at WARN or above: lower records are not formatted here.
        if r.level() <= log::Level::Warn
            && r.target().starts_with("pingora_core")
            && gatehouse::tls::failures::client_noise(r.target(), &r.args().to_string())
        {
            return;
        }
        if r.target() == "pingora_proxy::proxy_cache" && r.level() == log::Level::Error {
            let line = r.args().to_string();
            if line.starts_with("Fail to serve cache: Downstream") {
                log::debug!(target: "gatehouse::cache", "client left during a hit: {line}");
                return;
            }
        }
        if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
            if self.0.matches(r) {
                json_log(r);
            }
            return;
        }
        self.0.log(r)
    }

    fn flush(&self) {
        self.0.flush()
    }
}

fn load_or_report(path: &Path) -> Option<config::Config> {
    match config::load(path) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("{w}");
            }
            Some(c)
        }
        Err(e) => {
            eprintln!("{e}");
            let n = e.errors.len();
            eprintln!(
                "{}: {n} error{}",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
            None
        }
    }
}

/// SIGHUP, SIGUSR1 and SIGUSR2 terminate a process by default, and their listeners start
/// with the background service, after the config is loaded and (on --upgrade) the sockets
/// have come: logrotate's SIGUSR1 in that window would kill a starting gateway. Registering
/// them here replaces the default action at once; the service's listeners get them later.
fn hold_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        rt.block_on(async {
            for k in [
                SignalKind::hangup(),
                SignalKind::user_defined1(),
                SignalKind::user_defined2(),
            ] {
                let _ = signal(k);
            }
        });
    }
}

fn serve(cfg: &config::Config, upgrade: bool, with_demo: bool) -> ExitCode {
    hold_signals();
    start_memory_release();
    JSON_LOGS.store(cfg.server.log_json, std::sync::atomic::Ordering::Relaxed);
    let (mut srv, _live) = match server::build(cfg, upgrade) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", cfg.path.display());
            return ExitCode::FAILURE;
        }
    };
    if with_demo {
        for svc in demo::services(cfg) {
            srv.add_service(svc);
        }
        println!("Gatehouse demo is up. Try:\n");
        for l in demo::curl_lines(cfg) {
            println!("  {l}");
        }
        println!("\nCtrl-C stops it.");
    }
    for g in &cfg.gateways {
        let addrs: Vec<_> = g.listen.iter().map(|a| a.to_string()).collect();
        log::info!(
            "gateway \"{}\" on {} ({} routes)",
            g.name,
            addrs.join(", "),
            g.routes.len()
        );
    }
    srv.run_forever()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Check { config } => match load_or_report(&config) {
            Some(c) => {
                let routes: usize = c.gateways.iter().map(|g| g.routes.len()).sum();
                println!(
                    "{}: ok ({} gateways, {routes} routes, {} upstreams, {} plugins)",
                    config.display(),
                    c.gateways.len(),
                    c.upstreams.len(),
                    c.plugins.len()
                );
                ExitCode::SUCCESS
            }
            None => ExitCode::FAILURE,
        },
        Command::Explain {
            config,
            headers,
            gateway,
            json,
            method,
            url,
        } => {
            let Some(c) = load_or_report(&config) else {
                return ExitCode::FAILURE;
            };
            let req = gatehouse::explain::Request {
                method: &method,
                url: &url,
                headers: &headers,
                gateway: gateway.as_deref(),
            };
            match gatehouse::explain::explain(&c, &req) {
                Ok(v) => {
                    use std::io::Write;
                    let text = if json {
                        format!("{v:#}\n")
                    } else {
                        gatehouse::explain::human(&v)
                    };
                    // A closed pipe (`| head`) is the reader's choice, not an error.
                    let _ = std::io::stdout().lock().write_all(text.as_bytes());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("explain: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run { config, upgrade } => match load_or_report(&config) {
            Some(c) => serve(&c, upgrade, false),
            None => ExitCode::FAILURE,
        },
        Command::Demo { config } => {
            let cfg = match config {
                Some(p) => load_or_report(&p),
                None if Path::new("conf/gatehouse.toml").is_file() => {
                    load_or_report(Path::new("conf/gatehouse.toml"))
                }
                // Outside the source tree: the built-in copy, with its static site, written to
                // a folder of its own so the relative paths in it hold.
                None => match demo::materialize() {
                    Ok(path) => load_or_report(&path),
                    Err(e) => {
                        eprintln!("cannot write the demo config: {e}");
                        None
                    }
                },
            };
            match cfg {
                Some(c) => serve(&c, false, true),
                None => ExitCode::FAILURE,
            }
        }
    }
}
