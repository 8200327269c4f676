//! The live snapshot: everything a request needs (route tables, pools, plugin chains), built
//! from a validated [`Config`] off the hot path and published through one `ArcSwap`, so a
//! reload swaps it atomically and requests in flight finish on the snapshot they started with.
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;
use gatehouse_plugins::{Chain, Instance};
use ipnet::IpNet;

use crate::config::{Config, ForwardedHeaders, Route};
use crate::router::{RouteId, Router};
use crate::upstream::Pool;

pub type Live = Arc<ArcSwap<Runtime>>;

pub struct GatewayRt {
    pub name: Arc<str>,
    pub listen: Vec<std::net::SocketAddr>,
    pub tls: bool,
    /// `client_auth`: `Some(required)`.
    pub client_auth: Option<bool>,
    /// `redirect_https`: every request gets a 308 to HTTPS (on this port, else 443).
    pub redirect_https: Option<Option<u16>>,
    pub hsts: Option<http::HeaderValue>,
    pub forwarded: ForwardedHeaders,
    pub routes: Vec<Route>,
    pub route_names: Vec<Arc<str>>,
    /// Mirrors in flight, per route (bounded by the route's `mirror.max_in_flight`).
    pub mirrors_in_flight: Vec<Arc<AtomicUsize>>,
    /// Per route, the headers a mirror copy goes without: credentials, and what the route's
    /// auth plugins read or set.
    pub mirror_strip: Vec<Arc<[http::HeaderName]>>,
    /// Per route, the headers that carry a credential: Authorization, Proxy-Authorization and
    /// what the route's auth plugins read or set (Cookie only when one reads a credential from
    /// it). A request with one that no plugin verified is `Identity::Unchecked`.
    pub credentials: Vec<Arc<[http::HeaderName]>>,
    /// Per route, the request headers the gateway may set, change or remove on the way
    /// upstream (forwarded headers, trace context, Host when not preserved, and what the
    /// plugins' upstream hooks say they write; `None` when a plugin does not say): an answer
    /// whose `Vary` names one cannot be matched by the client's values, and is not stored.
    pub vary_refused: Vec<Option<Arc<[http::HeaderName]>>>,
    /// One chain per route: global, gateway, route plugins.
    pub chains: Vec<Chain>,
    /// Global and gateway plugins: for requests no route matches.
    pub default_chain: Chain,
    /// Some route of the gateway has a response cache.
    pub caches: bool,
    /// Per route (and for requests no route matched), the query parameters the access log
    /// redacts: `[server] access_log.redact_query` and those the plugins read credentials
    /// from.
    pub log_redact: Vec<Arc<[Box<str>]>>,
    pub default_log_redact: Arc<[Box<str>]>,
    /// Per route, its metric handles; `unmatched` for requests no route matched (`route="-"`).
    pub metrics: Vec<crate::metrics::RouteMetrics>,
    pub unmatched: crate::metrics::RouteMetrics,
    pub router: Router,
}

/// What the gateway may write on a route's upstream request besides the client's own
/// headers: see `GatewayRt::vary_refused`.
fn gateway_writes(chain: &Chain, route: &Route) -> Option<Arc<[http::HeaderName]>> {
    use http::header::{HeaderName, FORWARDED, HOST, TE};
    let mut names: Vec<HeaderName> = [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
        "traceparent",
        "tracestate",
    ]
    .into_iter()
    .map(HeaderName::from_static)
    .collect();
    names.extend([FORWARDED, TE]);
    if !route.preserve_host {
        names.push(HOST);
    }
    for h in chain.upstream_headers()? {
        if !names.contains(&h) {
            names.push(h);
        }
    }
    Some(Arc::from(names))
}

impl GatewayRt {
    /// The plugin chain of a request: its route's, or the gateway's when no route matched.
    /// The gateway's own headers on an answer, whoever made it (upstream, cache, the gateway).
    pub fn stamp(&self, resp: &mut pingora_http::ResponseHeader) {
        if let Some(h) = &self.hsts {
            let _ = resp.insert_header(http::header::STRICT_TRANSPORT_SECURITY, h.clone());
        }
    }

    pub fn chain(&self, route: Option<RouteId>) -> &Chain {
        match route {
            Some(id) => &self.chains[id],
            None => &self.default_chain,
        }
    }
}

/// Cheap to clone: a pool swapped alone (see `upstream/resolve.rs`) shares everything else.
#[derive(Clone)]
pub struct Runtime {
    pub gateways: Arc<[GatewayRt]>,
    pub pools: Vec<Arc<Pool>>,
    /// `[stores.NAME]`, kept across reloads while their settings do not change.
    pub stores: Vec<Arc<crate::stores::Store>>,
    /// This replica's name in the fleet.
    pub node_name: Arc<str>,
    /// The fleet (`[server] fleet_store`): registry and shared purges.
    pub fleet: Option<Arc<crate::stores::fleet::Fleet>>,
    pub purge_deadline: std::time::Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub canonical: crate::path::Options,
    pub client: crate::front::ClientLimits,
    /// Bearer token for the admin listener's purge endpoint; `None`: purge is off.
    pub admin_token: Option<Arc<str>>,
    /// `admin_auth = "all"`: the admin reads need the token too.
    pub admin_auth_all: bool,
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    pub tracing: Arc<crate::trace::Tracing>,
    /// The file this snapshot was built from: path, SHA-256, text (for /status and /config).
    pub config_path: Arc<std::path::Path>,
    pub config_source: Arc<str>,
    /// The redacted config's digest for `/status`, made on first use (the page polls it).
    pub config_digest: std::sync::OnceLock<Option<String>>,
}

impl Runtime {
    /// Builds a snapshot; pools whose definition did not change since `previous` are kept, with
    /// their health, ejections and breaker state.
    /// The (gateway, route) pairs with metric series: every route, and `-` for requests no
    /// route matched; `cached`: only those with cache series.
    pub fn route_labels(&self, cached: bool) -> std::collections::HashSet<(Arc<str>, Arc<str>)> {
        let mut out = std::collections::HashSet::new();
        for g in self.gateways.iter() {
            if !cached {
                out.insert((g.name.clone(), Arc::from("-")));
            }
            for (r, route) in g.route_names.iter().zip(&g.routes) {
                if !cached || route.cache.is_some() {
                    out.insert((g.name.clone(), r.clone()));
                }
            }
        }
        out
    }

    pub fn build(cfg: &Config, previous: Option<&Runtime>) -> Result<Runtime, String> {
        // A store whose settings did not change keeps its connections and health.
        let stores: Vec<Arc<crate::stores::Store>> = cfg
            .stores
            .iter()
            .map(|s| {
                previous
                    .and_then(|p| p.stores.iter().find(|k| k.settings == *s))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(crate::stores::Store::new(s.clone())))
            })
            .collect();
        let by_name: std::collections::HashMap<
            String,
            Arc<dyn gatehouse_plugins::store::SharedCounter>,
        > = stores
            .iter()
            .map(|s| {
                (
                    s.settings.name.clone(),
                    s.clone() as Arc<dyn gatehouse_plugins::store::SharedCounter>,
                )
            })
            .collect();
        let plugins: Vec<Instance> = cfg
            .plugins
            .iter()
            .map(|p| {
                let env = gatehouse_plugins::store::BuildEnv {
                    name: p.name.clone(),
                    stores: by_name.clone(),
                    fallbacks: p.config.store().map(|_| {
                        crate::metrics::METRICS
                            .rate_limit_fallbacks
                            .with_label_values(&[p.name.as_str()])
                    }),
                };
                let plugin = p.config.build(&env);
                let meter = crate::metrics::plugin_meter(&p.name, plugin.kind(), plugin.phases());
                Instance {
                    name: p.name.as_str().into(),
                    plugin,
                    meter: Arc::new(meter),
                }
            })
            .collect();
        let pick = |ids: &[usize]| ids.iter().map(|&i| plugins[i].clone()).collect::<Vec<_>>();
        let global = pick(&cfg.server.plugins);

        let mut gateways = Vec::with_capacity(cfg.gateways.len());
        for g in &cfg.gateways {
            let mut base = global.clone();
            base.extend(pick(&g.plugins));
            let chains: Vec<Chain> = g
                .routes
                .iter()
                .map(|r| {
                    let mut all = base.clone();
                    all.extend(pick(&r.plugins));
                    Chain::new(&all)
                })
                .collect();
            let mirror_strip = chains
                .iter()
                .map(|c| {
                    let mut h = vec![
                        http::header::AUTHORIZATION,
                        http::header::PROXY_AUTHORIZATION,
                        http::header::COOKIE,
                    ];
                    h.extend(c.credential_headers());
                    Arc::from(h)
                })
                .collect();
            let server_redact: &[String] = cfg
                .server
                .access_log
                .as_ref()
                .map_or(&[], |a| &a.redact_query);
            let redact = |c: &Chain| -> Arc<[Box<str>]> {
                let mut names: Vec<Box<str>> =
                    server_redact.iter().map(|n| n.as_str().into()).collect();
                for q in c.credential_query() {
                    if !names.iter().any(|n| **n == *q) {
                        names.push(q.into());
                    }
                }
                Arc::from(names)
            };
            let default_chain = Chain::new(&base);
            let log_redact: Vec<Arc<[Box<str>]>> = chains.iter().map(redact).collect();
            // A request no route took (a 404, a refusal) may still carry a route's key:
            // every name of the gateway is redacted there.
            let mut every: Vec<Box<str>> = redact(&default_chain).to_vec();
            for n in log_redact.iter().flat_map(|l| l.iter()) {
                if !every.contains(n) {
                    every.push(n.clone());
                }
            }
            let default_log_redact: Arc<[Box<str>]> = Arc::from(every);
            let credentials: Vec<Arc<[http::HeaderName]>> = chains
                .iter()
                .map(|c| {
                    let mut h = vec![
                        http::header::AUTHORIZATION,
                        http::header::PROXY_AUTHORIZATION,
                    ];
                    for x in c.credential_headers() {
                        if !h.contains(&x) {
                            h.push(x);
                        }
                    }
                    Arc::from(h)
                })
                .collect();
            gateways.push(GatewayRt {
                name: g.name.as_str().into(),
                listen: g.listen.clone(),
                tls: g.tls.is_some(),
                client_auth: g
                    .tls
                    .as_ref()
                    .and_then(|t| t.certs.client_auth.as_ref())
                    .map(|a| a.required),
                redirect_https: g.redirect_https,
                hsts: g.hsts.clone(),
                forwarded: g.forwarded,
                router: Router::new(&g.routes),
                route_names: g
                    .routes
                    .iter()
                    .map(|r| Arc::from(r.name.as_str()))
                    .collect(),
                mirrors_in_flight: g.routes.iter().map(|_| Arc::default()).collect(),
                mirror_strip,
                vary_refused: chains
                    .iter()
                    .zip(&g.routes)
                    .map(|(c, r)| gateway_writes(c, r))
                    .collect(),
                credentials,
                routes: g.routes.clone(),
                chains,
                default_chain,
                caches: g.routes.iter().any(|r| r.cache.is_some()),
                log_redact,
                default_log_redact,
                metrics: g
                    .routes
                    .iter()
                    .map(|r| crate::metrics::RouteMetrics::new(&g.name, &r.name, r.cache.is_some()))
                    .collect(),
                unmatched: crate::metrics::RouteMetrics::new(&g.name, "-", false),
            });
        }
        let pools = cfg
            .upstreams
            .iter()
            .map(|u| {
                let kept = previous.and_then(|p| p.pools.iter().find(|p| p.cfg == *u));
                match kept {
                    Some(p) => Ok(p.clone()),
                    None => Pool::new(u)
                        .map(Arc::new)
                        .map_err(|e| format!("upstream \"{}\": {e}", u.name)),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Runtime {
            gateways: gateways.into(),
            pools,
            fleet: fleet(cfg, &stores, previous),
            purge_deadline: cfg.server.purge_deadline,
            stores,
            node_name: cfg.server.node_name.as_str().into(),
            trusted_proxies: cfg.server.trusted_proxies.clone(),
            canonical: crate::path::Options {
                keep_encoded_slashes: cfg.server.keep_encoded_slashes,
                keep_path_parameters: cfg.server.keep_path_parameters,
            },
            client: cfg.server.client,
            admin_token: cfg.server.admin_token.clone(),
            admin_auth_all: cfg.server.admin_auth_all,
            access_log: access_log(cfg, previous)?,
            tracing: match previous {
                Some(p) if p.tracing.settings == cfg.server.tracing => p.tracing.clone(),
                _ => Arc::new(crate::trace::Tracing::new(cfg.server.tracing.clone())?),
            },
            config_path: cfg.path.as_path().into(),
            config_source: cfg.source.clone(),
            config_digest: std::sync::OnceLock::new(),
        })
    }
}

impl Runtime {
    /// Where a route's requests go, for people: `upstream orders`, `split a 90%, b 10%`,
    /// `static /srv/www`.
    pub fn describe_target(&self, t: &crate::config::Target) -> String {
        use crate::config::Target;
        match t {
            Target::Upstream(u) => format!("upstream {}", self.pools[*u].name),
            Target::Split { arms, sticky } => {
                let total: u32 = arms.iter().map(|(_, w)| w).sum::<u32>().max(1);
                let arms: Vec<String> = arms
                    .iter()
                    .map(|(u, w)| {
                        format!(
                            "{} {}%",
                            self.pools[*u].name,
                            f64::from(*w) * 100.0 / f64::from(total)
                        )
                    })
                    .collect();
                let sticky = if sticky.is_some() { " (sticky)" } else { "" };
                format!("split {}{sticky}", arms.join(", "))
            }
            Target::Static(s) => format!("static {}", s.root.display()),
            Target::Aggregate(a) => {
                let parts: Vec<String> = a
                    .parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        format!(
                            "{} {}{}",
                            p.name,
                            self.pools[p.upstream].name,
                            a.path_text(i)
                        )
                    })
                    .collect();
                format!("aggregate {}", parts.join(", "))
            }
        }
    }
}

/// The access log writer: the previous snapshot's when the settings did not change (one
/// writer, one open file, across reloads), else a new one.
fn access_log(
    cfg: &Config,
    previous: Option<&Runtime>,
) -> Result<Option<Arc<crate::access_log::AccessLog>>, String> {
    let Some(s) = &cfg.server.access_log else {
        return Ok(None);
    };
    if let Some(a) = previous.and_then(|p| p.access_log.as_ref()) {
        if a.settings == *s {
            return Ok(Some(a.clone()));
        }
    }
    crate::access_log::AccessLog::start(s.clone())
        .map(|a| Some(Arc::new(a)))
        .map_err(|e| {
            let path = s.path.as_deref().unwrap_or(std::path::Path::new("-"));
            format!("access_log {}: {e}", path.display())
        })
}

/// The fleet of `[server] fleet_store`: kept across a reload while its store and this node's
/// name stay (its reader goes on from where it is).
fn fleet(
    cfg: &Config,
    stores: &[Arc<crate::stores::Store>],
    previous: Option<&Runtime>,
) -> Option<Arc<crate::stores::fleet::Fleet>> {
    use crate::stores::fleet::{Fleet, Purge};
    let name = cfg.server.fleet_store.as_deref()?;
    let store = stores.iter().find(|s| s.settings.name == name)?;
    let before = previous.and_then(|p| p.fleet.as_ref());
    if let Some(f) = before {
        if Arc::ptr_eq(&f.store, store) && f.node == cfg.server.node_name {
            return Some(f.clone());
        }
    }
    let apply = Arc::new(|p: &Purge| match p {
        Purge::Url(u) => crate::cache::STORE.purge_url(u),
        Purge::Tag(t) => crate::cache::STORE.purge_tag(t),
        Purge::All => crate::cache::STORE.purge_all(),
    });
    // A new fleet reads on from where the one it replaces was (another Redis has another
    // epoch: then the cache is emptied, as it must be).
    Some(Fleet::new(
        store.clone(),
        cfg.server.node_name.clone(),
        apply,
        before.map(|f| f.position()),
    ))
}
