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
    /// Start built-in demo services and the gateway on the demo config, and print curl lines.
    Demo {
        /// The config to use; default: conf/gatehouse.toml, or the built-in copy of it.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

fn init_logging() {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,gatehouse=info"),
    )
    .format_timestamp_millis()
    .init();
}

fn load_or_report(path: &Path) -> Option<config::Config> {
    match config::load(path) {
        Ok(c) => Some(c),
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

fn serve(cfg: &config::Config, upgrade: bool, with_demo: bool) -> ExitCode {
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
                None => match config::load_str(
                    Path::new("gatehouse.toml (built in)"),
                    demo::DEMO_CONFIG,
                ) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        eprintln!("{e}");
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
