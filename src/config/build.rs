//! File model → validated model, collecting every error with its place in the file.
//!
//! Each top-level section (and each upstream, plugin, gateway and route in it) is deserialized
//! on its own from toml's spanned document, so one bad route does not hide the errors of the
//! next, and serde's errors keep the byte span of the value they are about.
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gatehouse_plugins::{PluginConfig, KINDS};
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::file::{GatewayFile, RouteFile, ServerFile, UpstreamFile};
use super::routes::{route, route_key, Refs};
use super::upstreams::upstream;
use super::*;

const SECTIONS: &[&str] = &[
    "server",
    "stores",
    "upstreams",
    "plugins",
    "gateways",
    "routes",
];

pub(super) struct Loader<'a> {
    src: &'a str,
    line_starts: Vec<usize>,
    pub(super) errors: Vec<ConfigError>,
    pub(super) warnings: Vec<ConfigError>,
}

impl<'a> Loader<'a> {
    fn new(src: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        Loader {
            src,
            line_starts,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Something that works but will not for long (a certificate about to expire): said by
    /// `check` and logged at start and reload, never refused.
    pub(super) fn warn(&mut self, span: Range<usize>, context: &str, message: impl Into<String>) {
        let (line, col) = self.position(span.start);
        self.warnings.push(ConfigError {
            line,
            col,
            context: context.to_string(),
            message: message.into(),
        });
    }

    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        let col = self
            .src
            .get(start..offset.min(self.src.len()))
            .map_or(1, |s| s.chars().count() + 1);
        (line, col)
    }

    pub(super) fn err(&mut self, span: Range<usize>, context: &str, message: impl Into<String>) {
        let (line, col) = self.position(span.start);
        self.errors.push(ConfigError {
            line,
            col,
            context: context.to_string(),
            message: message.into(),
        });
    }

    /// Deserializes one section; on error records it (at the value's own span when serde
    /// knows it, else at the section) and returns `None`.
    ///
    /// serde stops at a struct's first bad field. To report the others too, the bad key is
    /// dropped from the table and the rest read again, until no error is left; a "missing
    /// field" for a dropped key is not a new error.
    pub(super) fn de<T: for<'de> Deserialize<'de>>(
        &mut self,
        value: Spanned<DeValue<'a>>,
        context: &str,
    ) -> Option<T> {
        let fallback = value.span();
        let mut value = value;
        let mut dropped: Vec<String> = Vec::new();
        loop {
            let e = match T::deserialize(ValueDeserializer::from(value.clone())) {
                Ok(v) => return if dropped.is_empty() { Some(v) } else { None },
                Err(e) => e,
            };
            let msg = e.message();
            if dropped
                .iter()
                .any(|k| msg.contains(&format!("missing field `{k}`")))
            {
                return None;
            }
            let span = e.span().unwrap_or(fallback.clone());
            self.err(span.clone(), context, tidy(msg));
            // Find the top-level key the error is in, drop it and try again.
            let span_r = value.span();
            let DeValue::Table(table) = value.get_mut() else {
                return None;
            };
            let key = table
                .iter()
                .find(|(k, v)| {
                    let (ks, vs) = (k.span(), v.span());
                    (ks.start <= span.start && span.start < ks.end.max(ks.start + 1))
                        || (vs.start <= span.start && span.start < vs.end.max(vs.start + 1))
                })
                .map(|(k, _)| k.get_ref().to_string());
            let key = key?;
            table.remove(key.as_str());
            dropped.push(key);
            value = Spanned::new(span_r, value.into_inner());
        }
    }

    /// The entries of a `[section.NAME]` table, each with its name.
    fn named_tables(
        &mut self,
        value: Spanned<DeValue<'a>>,
        section: &str,
    ) -> Vec<(Spanned<String>, Spanned<DeValue<'a>>)> {
        let span = value.span();
        match value.into_inner() {
            DeValue::Table(t) => t
                .into_iter()
                .map(|(k, v)| {
                    let ks = k.span();
                    (Spanned::new(ks, k.into_inner().into_owned()), v)
                })
                .collect(),
            _ => {
                self.err(
                    span,
                    "",
                    format!("`{section}` must be a table of named entries ([{section}.NAME])"),
                );
                Vec::new()
            }
        }
    }
}

/// serde's messages name Rust types; say it in the user's terms.
fn tidy(msg: &str) -> String {
    msg.trim_end()
        .replace("invalid type: ", "wrong type: ")
        .replace("usize", "a non-negative integer")
        .replace("i32", "an integer")
}

pub(super) fn build(path: &Path, src: &str) -> Result<Config, Vec<ConfigError>> {
    let mut ld = Loader::new(src);
    let doc = match DeTable::parse(src) {
        Ok(d) => d,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            ld.err(span, "", format!("TOML syntax: {}", e.message().trim_end()));
            return Err(ld.errors);
        }
    };

    let mut server = None;
    let mut upstream_vals = Vec::new();
    let mut plugin_vals = Vec::new();
    let mut store_vals = Vec::new();
    let mut gateway_vals = Vec::new();
    let mut route_vals = Vec::new();
    for (key, value) in doc.into_inner() {
        let kspan = key.span();
        match key.get_ref().as_ref() {
            "server" => server = Some(value),
            "upstreams" => upstream_vals = ld.named_tables(value, "upstreams"),
            "plugins" => plugin_vals = ld.named_tables(value, "plugins"),
            "stores" => store_vals = ld.named_tables(value, "stores"),
            "gateways" => gateway_vals = ld.named_tables(value, "gateways"),
            "routes" => {
                let span = value.span();
                match value.into_inner() {
                    DeValue::Array(a) => route_vals = a.into_iter().collect(),
                    _ => ld.err(span, "", "`routes` must be an array of tables ([[routes]])"),
                }
            }
            other => ld.err(
                kspan,
                "",
                format!(
                    "unknown section `{other}`, expected one of: {}",
                    SECTIONS.join(", ")
                ),
            ),
        }
    }

    let server_file: ServerFile = match server {
        Some(v) => ld.de(v, "[server]").unwrap_or_default(),
        None => ServerFile::default(),
    };

    // Files named in plugin configs are relative to the config file, as nginx's includes.
    let base = path.parent().unwrap_or(Path::new("."));
    let mut stores = Vec::new();
    let mut store_names = HashMap::new();
    for (name, value) in store_vals {
        let ctx = format!("store \"{}\"", name.get_ref());
        store_names.insert(name.get_ref().clone(), true);
        let span = value.span();
        if let Some(f) = ld.de::<super::stores::StoreFile>(value, &ctx) {
            if let Some(s) = super::stores::store(&mut ld, name.get_ref(), f, span) {
                stores.push(s);
            }
        }
    }

    // Plugins first: everything else refers to them by name.
    let mut plugins = Vec::new();
    let mut plugin_names = HashMap::new();
    let mut store_refs = Vec::new();
    for (name, value) in plugin_vals {
        let ctx = format!("plugin \"{}\"", name.get_ref());
        // Known names even when broken, so references to them are not reported twice.
        plugin_names.insert(name.get_ref().clone(), None);
        if let DeValue::Table(t) = value.get_ref() {
            if let Some(r) = t.get("store") {
                if let DeValue::String(v) = r.get_ref() {
                    store_refs.push((
                        name.get_ref().clone(),
                        Spanned::new(r.span(), v.to_string()),
                    ));
                }
            }
        }
        if let Some(cfg) = plugin_config(&mut ld, value, &ctx, base) {
            plugin_names.insert(name.get_ref().clone(), Some(plugins.len()));
            plugins.push(NamedPlugin {
                name: name.into_inner(),
                config: cfg,
            });
        }
    }

    let mut upstreams = Vec::new();
    let mut upstream_names = HashMap::new();
    for (name, value) in upstream_vals {
        let ctx = format!("upstream \"{}\"", name.get_ref());
        upstream_names.insert(name.get_ref().clone(), None);
        let span = value.span();
        if let Some(u) = ld.de::<UpstreamFile>(value, &ctx) {
            if let Some(u) = upstream(&mut ld, path, name.get_ref(), u, span, &ctx) {
                upstream_names.insert(name.get_ref().clone(), Some(upstreams.len()));
                upstreams.push(u);
            }
        }
    }

    super::stores::check_refs(&mut ld, &store_refs, &store_names);
    let server_plugins = plugin_refs(&mut ld, &server_file.plugins, &plugin_names, "[server]");
    let mut gateways = Vec::new();
    let mut gateway_names = HashMap::new();
    let mut listens: HashMap<std::net::SocketAddr, String> = HashMap::new();
    let mut cert_readers = Vec::new();
    for (name, value) in gateway_vals {
        let ctx = format!("gateway \"{}\"", name.get_ref());
        gateway_names.insert(name.get_ref().clone(), None);
        let Some(g) = ld.de::<GatewayFile>(value, &ctx) else {
            continue;
        };
        if g.listen.get_ref().is_empty() {
            ld.err(g.listen.span(), &ctx, "`listen` needs at least one address");
        }
        for a in g.listen.get_ref() {
            let addr = a.get_ref().0;
            if let Some(other) = listens.insert(addr, name.get_ref().clone()) {
                ld.err(
                    a.span(),
                    &ctx,
                    format!("listen address {addr} is already used by gateway \"{other}\""),
                );
            }
        }
        let tls = super::tls::gateway_tls(&mut ld, &g, path, &ctx);
        let plugins = plugin_refs(&mut ld, &g.plugins, &plugin_names, &ctx);
        let mut forwarded = ForwardedHeaders::default();
        if let Some(list) = &g.forwarded_headers {
            forwarded = ForwardedHeaders {
                for_: false,
                proto: false,
                host: false,
            };
            for h in list {
                match h.get_ref().as_str() {
                    "for" => forwarded.for_ = true,
                    "proto" => forwarded.proto = true,
                    "host" => forwarded.host = true,
                    other => ld.err(
                        h.span(),
                        &ctx,
                        format!(
                            "unknown forwarded header \"{other}\": expected \"for\", \"proto\" or \"host\""
                        ),
                    ),
                }
            }
        }
        gateway_names.insert(name.get_ref().clone(), Some(gateways.len()));
        // A client_auth that failed to load is an error already; a redirecting gateway runs
        // no plugin.
        let asks = g.client_auth.is_some() || g.redirect_https.is_some();
        cert_readers.push((g.plugins.clone(), asks));
        let redirect_https = super::tls::redirect_https(&mut ld, &g, tls.is_some(), &ctx);
        let hsts = super::tls::hsts(&mut ld, &g, tls.is_some(), &ctx);
        let h2c = super::tls::h2c(&mut ld, &g, tls.is_some(), &ctx);
        gateways.push(Gateway {
            redirect_https,
            hsts,
            h2c,
            name: name.into_inner(),
            listen: g
                .listen
                .into_inner()
                .into_iter()
                .map(|a| a.into_inner().0)
                .collect(),
            tls,
            forwarded,
            plugins,
            routes: Vec::new(),
        });
    }
    if gateways.is_empty() && gateway_names.is_empty() {
        ld.err(
            0..0,
            "",
            "no gateway: add a [gateways.NAME] table with `listen`",
        );
    }

    let max_parts = super::aggregate::max_parts(&mut ld, &server_file);
    let refs = Refs {
        max_parts,
        upstreams: &upstream_names,
        plugins: &plugin_names,
        gateways: &gateway_names,
        config: path,
    };
    let mut seen: HashMap<String, (String, usize)> = HashMap::new();
    for (i, value) in route_vals.into_iter().enumerate() {
        let span = value.span();
        let fallback_ctx = format!("route #{}", i + 1);
        let Some(r) = ld.de::<RouteFile>(value, &fallback_ctx) else {
            continue;
        };
        let name = r.name.clone().unwrap_or_else(|| format!("#{}", i + 1));
        let ctx = format!("route \"{name}\"");
        let line = ld.position(span.start).0;
        let Some((gw_name, gw, route)) = route(&mut ld, r, name, line, span.clone(), &refs, &ctx)
        else {
            continue;
        };
        let key = format!("{gw_name}\u{0}{}", route_key(&route));
        if let Some((other, other_line)) = seen.get(&key) {
            ld.err(
                span,
                &ctx,
                format!(
                    "matches exactly the same requests as route \"{other}\" (line {other_line}); \
                     change a matcher or set a different `priority`"
                ),
            );
            continue;
        }
        seen.insert(key, (route.name.clone(), line));
        if let Some(g) = gw.and_then(|gw| gateways.get_mut(gw)) {
            g.routes.push(route);
        }
    }

    // Mirrors are sent by the gateway itself as HTTP/1.1 (see proxy/mirror.rs), over TLS
    // when the upstream says so.
    for g in &gateways {
        for r in &g.routes {
            if let Some(u) = r.mirror.as_ref().and_then(|m| upstreams.get(m.upstream)) {
                if u.http2 {
                    ld.errors.push(ConfigError {
                        line: r.line,
                        col: 1,
                        context: format!("route \"{}\"", r.name),
                        message: format!(
                            "mirror upstream \"{}\" uses http2; mirrors are sent as HTTP/1.1",
                            u.name
                        ),
                    });
                }
            }
        }
    }
    let readers: Vec<_> = cert_readers.iter().map(|(r, a)| (&r[..], *a)).collect();
    super::tls::client_cert_readers(
        &mut ld,
        &server_file.plugins,
        &readers,
        &plugin_names,
        &plugins,
        &gateways,
    );
    if let Some(admin) = &server_file.admin {
        if let Some(g) = listens.get(&admin.get_ref().0) {
            let msg = format!(
                "admin address {} is also a listener of gateway \"{g}\"",
                admin.get_ref().0
            );
            ld.err(admin.span(), "[server]", msg);
        }
    }

    let threads = match &server_file.threads {
        Some(t) if *t.get_ref() == 0 => {
            ld.err(t.span(), "[server]", "`threads` must be at least 1");
            1
        }
        Some(t) => *t.get_ref(),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // Per-file defaults, so two instances on two files never share a pid file or an upgrade
    // socket, while an upgrade of the same file finds the running one.
    let tag = {
        let mut h = DefaultHasher::new();
        std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .hash(&mut h);
        format!("{:08x}", h.finish() as u32)
    };
    let tmp = std::env::temp_dir();

    let client = super::client::client_limits(&mut ld, &server_file);
    let cache_size = match &server_file.cache_size {
        None => 256 << 20,
        Some(s) if s.get_ref().0 < 1 << 20 => {
            ld.err(s.span(), "[server]", "`cache_size` must be at least 1MiB");
            0
        }
        Some(s) => usize::try_from(s.get_ref().0).unwrap_or(usize::MAX),
    };
    let admin_token = super::admin::admin_token(&mut ld, &server_file, path);
    let admin_auth_all = super::admin::admin_auth_all(&mut ld, &server_file, admin_token.is_some());
    let access_log = super::admin::access_log(&mut ld, &server_file, path);
    let log_json = super::admin::log_json(&mut ld, &server_file);
    let tracing = super::admin::tracing(&mut ld, &server_file);
    let node_name = super::stores::node_name(&mut ld, &server_file);
    let (fleet_store, purge_deadline) = super::stores::fleet(&mut ld, &server_file, &store_names);

    if !ld.errors.is_empty() {
        ld.errors.sort_by_key(|e| (e.line, e.col));
        return Err(ld.errors);
    }
    let warnings = ld
        .warnings
        .iter()
        .map(|w| {
            let place = if w.line > 0 {
                format!(":{}:{}", w.line, w.col)
            } else {
                String::new()
            };
            let ctx = if w.context.is_empty() {
                String::new()
            } else {
                format!("{}: ", w.context)
            };
            format!("{}{place}: warning: {ctx}{}", path.display(), w.message)
        })
        .collect();
    Ok(Config {
        warnings,
        path: path.to_path_buf(),
        source: src.into(),
        server: Server {
            threads,
            admin: server_file.admin.as_ref().map(|a| a.get_ref().0),
            grace_period: server_file
                .grace_period
                .map_or(Duration::from_secs(10), |d| d.0),
            shutdown_timeout: server_file
                .shutdown_timeout
                .map_or(Duration::from_secs(5), |d| d.0),
            trusted_proxies: server_file.trusted_proxies.iter().map(|c| c.0).collect(),
            plugins: server_plugins,
            upstream_keepalive_pool: server_file.upstream_keepalive_pool.unwrap_or(256),
            // One thread has no one to steal from: a single-threaded runtime skips the
            // stealing bookkeeping (callgrind: ~900 instructions per request).
            work_stealing: server_file.work_stealing.unwrap_or(threads > 1),
            pid_file: server_file
                .pid_file
                .unwrap_or_else(|| tmp.join(format!("gatehouse-{tag}.pid"))),
            upgrade_sock: server_file
                .upgrade_sock
                .unwrap_or_else(|| tmp.join(format!("gatehouse-{tag}.sock"))),
            keep_encoded_slashes: server_file.keep_encoded_slashes,
            keep_path_parameters: server_file.keep_path_parameters,
            client,
            cache_size,
            admin_token,
            admin_auth_all,
            access_log,
            log_json,
            tracing,
            node_name,
            fleet_store,
            purge_deadline,
        },
        stores,
        upstreams,
        plugins,
        gateways,
    })
}

pub(super) fn relative_to(config: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    config
        .parent()
        .map_or_else(|| p.to_path_buf(), |d| d.join(p))
}

fn plugin_config<'a>(
    ld: &mut Loader<'a>,
    value: Spanned<DeValue<'a>>,
    ctx: &str,
    base: &Path,
) -> Option<PluginConfig> {
    let span = value.span();
    let DeValue::Table(mut table) = value.into_inner() else {
        ld.err(span, ctx, "a plugin must be a table with a `kind`");
        return None;
    };
    let Some(kind) = table.remove("kind") else {
        ld.err(
            span,
            ctx,
            format!("missing `kind` (one of: {})", KINDS.join(", ")),
        );
        return None;
    };
    let kspan = kind.span();
    let DeValue::String(kind) = kind.into_inner() else {
        ld.err(kspan, ctx, "`kind` must be a string");
        return None;
    };
    let rest: Spanned<DeValue<'a>> = Spanned::new(span.clone(), DeValue::Table(table));
    match PluginConfig::deserialize_kind(&kind, ValueDeserializer::from(rest)) {
        Ok(Some(mut c)) => match c.prepare(base) {
            Ok(()) => {
                for w in c.published_secrets() {
                    ld.warn(kspan.clone(), ctx, w);
                }
                Some(c)
            }
            Err(e) => {
                ld.err(kspan, ctx, e);
                None
            }
        },
        Ok(None) => {
            ld.err(
                kspan,
                ctx,
                format!(
                    "unknown plugin kind \"{kind}\", expected one of: {}",
                    KINDS.join(", ")
                ),
            );
            None
        }
        Err(e) => {
            ld.err(e.span().unwrap_or(span), ctx, tidy(e.message()));
            None
        }
    }
}

pub(super) fn plugin_refs(
    ld: &mut Loader,
    names: &[Spanned<String>],
    known: &HashMap<String, Option<usize>>,
    ctx: &str,
) -> Vec<usize> {
    let mut out = Vec::new();
    for n in names {
        match known.get(n.get_ref()) {
            Some(Some(i)) => out.push(*i),
            Some(None) => {} // the plugin itself is broken and already reported
            None => ld.err(
                n.span(),
                ctx,
                format!(
                    "unknown plugin \"{}\" (define it as [plugins.{}])",
                    n.get_ref(),
                    n.get_ref()
                ),
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<ConfigError> {
        build(Path::new("t.toml"), src).err().unwrap_or_default()
    }

    const BASE: &str = r#"
[upstreams.u]
peers = ["127.0.0.1:9001"]

[gateways.web]
listen = ["127.0.0.1:18080"]
"#;

    #[test]
    fn minimal_config_loads() {
        let src = format!("{BASE}\n[[routes]]\nupstream = \"u\"\n");
        let c = build(Path::new("t.toml"), &src).unwrap();
        assert_eq!(c.gateways[0].routes.len(), 1);
        assert_eq!(c.upstreams[0].peers[0].weight, 1);
    }

    #[test]
    fn reports_all_errors_with_lines() {
        let src = format!(
            "{BASE}\n[[routes]]\nupstream = \"nope\"\n\n[[routes]]\nupstream = \"u\"\npath = \"~ (\"\nbogus = 1\n"
        );
        let errs = errors(&src);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].line, 9);
        assert!(errs[0].message.contains("unknown upstream \"nope\""));
        assert_eq!(errs[1].line, 14);
        assert!(
            errs[1].message.contains("unknown field `bogus`"),
            "{errs:?}"
        );
    }

    #[test]
    fn unknown_kind_and_bad_duration() {
        let src = format!(
            "{BASE}\n[plugins.x]\nkind = \"jwt_oops\"\n\n[upstreams.v]\npeers = []\nconnect_timeout = \"5 parsecs\"\n"
        );
        let errs = errors(&src);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs
            .iter()
            .any(|e| e.line == 9 && e.message.contains("unknown plugin kind")));
        assert!(errs
            .iter()
            .any(|e| e.line == 13 && e.message.contains("invalid duration")));
    }

    #[test]
    fn duplicate_routes_are_refused() {
        let src = format!(
            "{BASE}\n[[routes]]\nname = \"a\"\npath = \"/x/\"\nupstream = \"u\"\n[[routes]]\nname = \"b\"\npath = \"/x\"\nupstream = \"u\"\n"
        );
        let errs = errors(&src);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].message.contains("same requests as route \"a\""));
    }
}
