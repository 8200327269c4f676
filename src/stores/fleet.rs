//! The fleet: replicas that share a store (`[server] fleet_store`) know of each other and
//! apply each other's cache purges.
//!
//! - **Registry.** Every 2 s each replica writes itself into one hash (`PREFIX{fleet}:nodes`,
//!   a field per node: version, config digest, last reload, time) and reads the others. A
//!   replica not seen for 10 s is down; one not seen for 10 minutes is forgotten.
//! - **Purges.** A purge on any replica's admin listener is appended to a stream
//!   (`PREFIX{fleet}:purges`, trimmed to about 10,000 entries). Each replica reads the stream
//!   on a connection of its own (`XREAD BLOCK`), applies what the others appended and
//!   acknowledges in `PREFIX{fleet}:ack:ID` (node → entries dropped, kept a minute), which the
//!   replica that purged reads until its deadline.
//! - **Disconnects.** A stream, not pub/sub: a replica that reconnects reads on from the last
//!   entry it applied. When it cannot prove it missed nothing — its entry was trimmed away,
//!   or the store lost its data (the epoch key it remembered changed: a restart without
//!   persistence, a failover to a replica that had not caught up) — it empties its cache,
//!   logs it and says so on `/status`.
//!
//! All keys carry the hash tag `{fleet}`: one Cluster slot, so one node holds the stream, the
//! registry and the epoch, and loses or keeps them together.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::Value;
use serde_json::json;

use super::Store;

/// What a purge drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// Every entry of an absolute URL (as the cache keys it).
    Url(String),
    /// Every entry whose response carried the tag.
    Tag(String),
    /// Everything: what a replica does when it cannot prove it missed no purge.
    All,
}

/// Applies a purge to this process's cache; returns how many entries it dropped.
pub type Apply = Arc<dyn Fn(&Purge) -> usize + Send + Sync>;

/// What a replica says of itself in the registry.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub version: String,
    /// SHA-256 of the redacted config (what `/status` shows).
    pub config: Option<String>,
    /// Unix seconds of the last reload, if any.
    pub last_reload: Option<u64>,
    /// Unix seconds when the process started.
    pub started: u64,
}

/// How this replica follows the purge stream.
#[derive(Debug, Clone, Default)]
struct Following {
    connected: bool,
    /// The last entry read (applied, or this replica's own).
    last: Option<String>,
    /// Unix ms when the cache was last emptied for want of proof, and why.
    emptied: Option<(u64, String)>,
    applied: u64,
}

const HEARTBEAT: Duration = Duration::from_secs(2);
const DOWN_AFTER_MS: u64 = 10_000;
const FORGET_AFTER_MS: u64 = 600_000;
const STREAM_MAX: u64 = 10_000;
/// The registry in one step: KEYS[1] the hash; ARGV: this node ('' to only read), its JSON,
/// how long a silent entry stays (ms). Returns Redis' time (ms), then node, "SEEN_MS JSON"...
const REGISTRY_LUA: &str = "
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local forget = tonumber(ARGV[3])
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', now) .. ' ' .. ARGV[2])
  redis.call('PEXPIRE', KEYS[1], forget)
end
local all = redis.call('HGETALL', KEYS[1])
local out = {string.format('%.0f', now)}
for i = 1, #all, 2 do
  local seen = tonumber(string.match(all[i + 1], '^(%d+) ')) or 0
  if now - seen > forget then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
";

/// Fleet operations happen off the request path: they may wait longer than a rate limit.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The registry as last read: node → (its JSON, its age then in ms), and when it was read.
type Members = (BTreeMap<String, (serde_json::Value, u64)>, Instant);

pub struct Fleet {
    pub store: Arc<Store>,
    pub node: String,
    nodes_key: String,
    stream_key: String,
    epoch_key: String,
    ack_prefix: String,
    info: Mutex<NodeInfo>,
    following: Mutex<Following>,
    /// The registry as last read.
    members: Mutex<Members>,
    apply: Apply,
    started: AtomicBool,
    /// Where the reader is (epoch, last entry read): carried over to the fleet a reload
    /// makes in its place, so a reload loses no purge.
    position: Mutex<(Option<String>, Option<String>)>,
}

impl Fleet {
    /// `resume`: the position of the fleet this one replaces (a reload changed its store's
    /// settings), if any.
    pub fn new(
        store: Arc<Store>,
        node: String,
        apply: Apply,
        resume: Option<(Option<String>, Option<String>)>,
    ) -> Arc<Fleet> {
        let p = store.settings.prefix.clone();
        Arc::new(Fleet {
            nodes_key: format!("{p}{{fleet}}:nodes"),
            stream_key: format!("{p}{{fleet}}:purges"),
            epoch_key: format!("{p}{{fleet}}:epoch"),
            ack_prefix: format!("{p}{{fleet}}:ack:"),
            store,
            node,
            info: Mutex::new(NodeInfo::default()),
            following: Mutex::new(Following::default()),
            members: Mutex::new((BTreeMap::new(), Instant::now())),
            apply,
            started: AtomicBool::new(false),
            position: Mutex::new(resume.unwrap_or_default()),
        })
    }

    /// Where the reader is: (epoch, last entry read).
    pub fn position(&self) -> (Option<String>, Option<String>) {
        self.position.lock().map(|p| p.clone()).unwrap_or_default()
    }

    pub fn set_info(&self, info: NodeInfo) {
        if let Ok(mut i) = self.info.lock() {
            *i = info;
        }
    }

    /// Appends a purge for the other replicas; returns its id (the stream entry's).
    pub async fn publish(&self, p: &Purge) -> Result<String, String> {
        let (kind, value) = match p {
            Purge::Url(u) => ("url", u.as_str()),
            Purge::Tag(t) => ("tag", t.as_str()),
            Purge::All => ("all", ""),
        };
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream_key)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_MAX)
            .arg("*")
            .arg("from")
            .arg(&self.node)
            .arg("kind")
            .arg(kind)
            .arg("value")
            .arg(value);
        let id: String = self
            .store
            .query(cmd, OP_TIMEOUT)
            .await
            .map_err(|_| format!("store \"{}\" unavailable", self.store.name()))?;
        Ok(id)
    }

    /// The replicas that acknowledged purge `id` (node → entries dropped), waiting until all
    /// of `expect` did or `deadline` passed.
    pub async fn acks(
        &self,
        id: &str,
        expect: &[String],
        deadline: Duration,
    ) -> BTreeMap<String, u64> {
        let key = format!("{}{id}", self.ack_prefix);
        let end = tokio::time::Instant::now() + deadline;
        let mut got = BTreeMap::new();
        loop {
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(&key);
            // Never past the deadline (a slow store makes the answer say who is missing).
            let left = end
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(10));
            if let Ok(m) = self.store.query::<BTreeMap<String, u64>>(cmd, left).await {
                got = m;
            }
            if expect.iter().all(|n| got.contains_key(n)) || tokio::time::Instant::now() >= end {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The other replicas seen lately (up): those a purge expects to confirm.
    pub fn peers_up(&self) -> Vec<String> {
        self.members
            .lock()
            .map(|m| {
                let since = m.1.elapsed().as_millis() as u64;
                m.0.iter()
                    .filter(|(n, (_, age))| **n != self.node && age + since < DOWN_AFTER_MS)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `/status`'s `fleet`: every replica the registry knows, this one compared with each.
    pub fn status(&self) -> serde_json::Value {
        let me = self.info.lock().map(|i| i.clone()).unwrap_or_default();
        let nodes: Vec<serde_json::Value> = self
            .members
            .lock()
            .map(|m| {
                let since = m.1.elapsed().as_millis() as u64;
                m.0.iter()
                    .map(|(n, (v, age))| {
                        let age = age + since;
                        json!({
                            "node": n,
                            "this": *n == self.node,
                            "up": age < DOWN_AFTER_MS,
                            "seen_ms_ago": age,
                            "version": v["version"],
                            "config": v["config"],
                            "last_reload": v["last_reload"],
                            "started": v["started"],
                            "same_version": v["version"].as_str() == Some(me.version.as_str()),
                            "same_config": v["config"].as_str().is_some() && v["config"].as_str() == me.config.as_deref(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let f = self.following.lock().map(|f| f.clone()).unwrap_or_default();
        json!({
            "store": self.store.name(),
            "node": self.node,
            "nodes": nodes,
            "purges": {
                "following": f.connected,
                "last": f.last,
                "applied": f.applied,
                "emptied_at_ms": f.emptied.as_ref().map(|e| e.0),
                "emptied_because": f.emptied.as_ref().map(|e| e.1.clone()),
            },
        })
    }

    /// Starts the heartbeat and the purge reader, once, on the current runtime (the
    /// background service's). Both hold the fleet weakly and end when it is dropped.
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(f) = weak.upgrade() else { return };
                let registered = f.heartbeat().await;
                drop(f);
                // Until the store takes it (it is still connecting at start), try again soon.
                let wait = if registered {
                    HEARTBEAT
                } else {
                    Duration::from_millis(200)
                };
                tokio::time::sleep(wait).await;
            }
        });
        let weak = Arc::downgrade(self);
        let (epoch, last) = self.position();
        tokio::spawn(async move {
            let mut r = Reader {
                conn: None,
                epoch,
                last,
            };
            loop {
                let Some(f) = weak.upgrade() else { return };
                if let Err(e) = f.read(&mut r).await {
                    r.conn = None;
                    let was = f
                        .following
                        .lock()
                        .map(|mut s| std::mem::replace(&mut s.connected, false))
                        .unwrap_or(false);
                    if was {
                        log::warn!(
                            "fleet: lost the purge stream on store \"{}\" ({e}); reading on from where it stopped once back",
                            f.store.name()
                        );
                    }
                    drop(f);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
    }

    /// Writes this replica into the registry and reads the others; whether the store took it.
    async fn heartbeat(&self) -> bool {
        let info = self.info.lock().map(|i| i.clone()).unwrap_or_default();
        let me = json!({
            "version": info.version,
            "config": info.config,
            "last_reload": info.last_reload,
            "started": info.started,
        });
        self.registry(Some(me.to_string())).await
    }

    /// Reads the registry (a purge does, so it expects every replica registered by now).
    pub async fn refresh(&self) {
        self.registry(None).await;
    }

    /// One script: this replica's entry written (with Redis' clock, so replicas whose clocks
    /// disagree still agree on who is up), entries silent for 10 minutes dropped, the rest
    /// read with their ages.
    async fn registry(&self, me: Option<String>) -> bool {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(REGISTRY_LUA)
            .arg(1)
            .arg(&self.nodes_key)
            .arg(if me.is_some() { self.node.as_str() } else { "" })
            .arg(me.unwrap_or_default())
            .arg(FORGET_AFTER_MS);
        let Ok(v) = self.store.query::<Vec<String>>(cmd, OP_TIMEOUT).await else {
            return false;
        };
        let read_at = Instant::now();
        let now: u64 = v.first().and_then(|n| n.parse().ok()).unwrap_or(0);
        let mut members = BTreeMap::new();
        for pair in v.get(1..).unwrap_or_default().chunks(2) {
            let [node, entry] = pair else { continue };
            let (seen, json) = entry.split_once(' ').unwrap_or(("0", "{}"));
            let age = now.saturating_sub(seen.parse().unwrap_or(0));
            let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
            members.insert(node.clone(), (v, age));
        }
        if let Ok(mut m) = self.members.lock() {
            *m = (members, read_at);
        }
        true
    }

    /// One step of following the stream: connect (and check what was missed) if needed,
    /// then one blocking read and what it brought.
    async fn read(&self, r: &mut Reader) -> Result<(), String> {
        if r.conn.is_none() {
            let mut conn = self.store.dedicated().await.map_err(|e| e.to_string())?;
            // The store's epoch: made once, lost with the store's data.
            let epoch: String = redis::Script::new(
                "redis.call('SET', KEYS[1], ARGV[1], 'NX') return redis.call('GET', KEYS[1])",
            )
            .key(&self.epoch_key)
            .arg(format!("{:016x}", gatehouse_plugins::secure_u64()))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
            let (newest, deleted) = self.stream_info(&mut conn).await?;
            // A stream that does not exist yet gets a first entry, so that the position a
            // reader keeps is always an entry's id, which only trimming removes.
            let newest = match newest {
                Some(n) => n,
                None => {
                    let mut add = redis::cmd("XADD");
                    add.arg(&self.stream_key)
                        .arg("*")
                        .arg("from")
                        .arg(&self.node)
                        .arg("kind")
                        .arg("start");
                    tokio::time::timeout(OP_TIMEOUT, add.query_async::<String>(&mut conn))
                        .await
                        .map_err(|_| "no answer".to_string())?
                        .map_err(|e| e.to_string())?
                }
            };
            let first = self.stream_edge(&mut conn, "XRANGE", "-", "+").await?;
            let lost = match (&r.epoch, r.last.as_deref()) {
                // A new reader: this process's cache is no older than the stream's end.
                (None, _) | (_, None) => None,
                (Some(e), _) if *e != epoch => Some("the store lost its data (new epoch)"),
                (Some(_), Some(last)) if id_lt(&newest, last) => Some(
                    "the stream ends before what this replica had read (a failover lost entries)",
                ),
                (Some(_), Some(last))
                    if first
                        .as_deref()
                        .map_or(id_lt(last, &newest), |f| id_lt(last, f))
                        || deleted.as_deref().is_some_and(|d| id_lt(last, d)) =>
                {
                    Some("purges it missed were trimmed from the stream")
                }
                _ => None,
            };
            if let Some(why) = lost {
                let n = (self.apply)(&Purge::All);
                log::warn!(
                    "fleet: emptied the cache ({n} entries): {why}, so purges made while this replica was away cannot be known"
                );
                if let Ok(mut f) = self.following.lock() {
                    f.emptied = Some((now_ms(), why.to_string()));
                }
                r.last = Some(newest);
            } else if r.epoch.is_none() {
                r.last = Some(newest);
            }
            let resumed = r.epoch.is_some();
            r.epoch = Some(epoch);
            r.conn = Some(conn);
            if let Ok(mut f) = self.following.lock() {
                f.connected = true;
                f.last = r.last.clone();
            }
            if resumed {
                log::warn!("fleet: following the purge stream again");
            }
        }
        let Some(conn) = r.conn.as_mut() else {
            return Ok(());
        };
        let from = r.last.clone().unwrap_or_else(|| "0-0".into());

        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&self.stream_key)
            .arg(&from);
        let v: Value = tokio::time::timeout(Duration::from_secs(5), cmd.query_async(conn))
            .await
            .map_err(|_| "no answer within 5 s".to_string())?
            .map_err(|e| e.to_string())?;
        for (id, fields) in stream_entries(&v) {
            let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
            let from = get("from").unwrap_or_default();
            if from != self.node {
                let p = match (get("kind").as_deref(), get("value")) {
                    (Some("url"), Some(u)) => Some(Purge::Url(u)),
                    (Some("tag"), Some(t)) => Some(Purge::Tag(t)),
                    (Some("all"), _) => Some(Purge::All),
                    _ => None,
                };
                if let Some(p) = p {
                    let n = (self.apply)(&p);
                    log::info!("fleet: purge {p:?} from {from}: {n} entries");
                    // The acknowledgement and its expiry in one step: an ack key never stays.
                    let mut cmd = redis::cmd("EVAL");
                    cmd.arg(
                        "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) \
                         return redis.call('PEXPIRE', KEYS[1], 60000)",
                    )
                    .arg(1)
                    .arg(format!("{}{id}", self.ack_prefix))
                    .arg(&self.node)
                    .arg(n);
                    let _ = self.store.query::<i64>(cmd, OP_TIMEOUT).await;
                    if let Ok(mut f) = self.following.lock() {
                        f.applied += 1;
                    }
                }
            }
            r.last = Some(id);
        }
        if let Ok(mut f) = self.following.lock() {
            f.last = r.last.clone();
        }
        if let Ok(mut p) = self.position.lock() {
            *p = (r.epoch.clone(), r.last.clone());
        }
        Ok(())
    }

    /// The id of the stream's oldest (`XRANGE - +`) or newest (`XREVRANGE + -`) entry.
    async fn stream_edge(
        &self,
        conn: &mut super::Conn,
        cmd: &str,
        a: &str,
        b: &str,
    ) -> Result<Option<String>, String> {
        let mut c = redis::cmd(cmd);
        c.arg(&self.stream_key).arg(a).arg(b).arg("COUNT").arg(1);
        let v: Value = tokio::time::timeout(OP_TIMEOUT, c.query_async(conn))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(entries(&v).into_iter().next().map(|(id, _)| id))
    }

    /// The stream's last generated id and the largest id it ever deleted (trimmed), or
    /// `None` when there is no stream.
    async fn stream_info(
        &self,
        conn: &mut super::Conn,
    ) -> Result<(Option<String>, Option<String>), String> {
        let mut c = redis::cmd("XINFO");
        c.arg("STREAM").arg(&self.stream_key);
        let v: Result<Value, redis::RedisError> =
            tokio::time::timeout(OP_TIMEOUT, c.query_async(conn))
                .await
                .map_err(|_| "no answer".to_string())?;
        let v = match v {
            Ok(v) => v,
            Err(e) if e.to_string().contains("no such key") => return Ok((None, None)),
            Err(e) => return Err(e.to_string()),
        };
        let field = |name: &str| -> Option<String> {
            match &v {
                Value::Array(kv) => kv
                    .chunks(2)
                    .find(|c| c.first().and_then(text).as_deref() == Some(name))
                    .and_then(|c| c.get(1).and_then(text)),
                Value::Map(m) => m
                    .iter()
                    .find(|(k, _)| text(k).as_deref() == Some(name))
                    .and_then(|(_, v)| text(v)),
                _ => None,
            }
        };
        Ok((field("last-generated-id"), field("max-deleted-entry-id")))
    }
}

/// The purge reader's own state, kept across reconnects.
struct Reader {
    conn: Option<super::Conn>,
    epoch: Option<String>,
    last: Option<String>,
}

/// Stream ids compare as (milliseconds, sequence).
fn id_lt(a: &str, b: &str) -> bool {
    let parse = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    parse(a) < parse(b)
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `[[id, [field, value, ...]], ...]`, as XRANGE answers.
fn entries(v: &Value) -> Vec<(String, Vec<(String, String)>)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|e| {
            let Value::Array(pair) = e else { return None };
            let id = text(pair.first()?)?;
            let Value::Array(kv) = pair.get(1)? else {
                return Some((id, Vec::new()));
            };
            let fields = kv
                .chunks(2)
                .filter_map(|c| Some((text(c.first()?)?, text(c.get(1)?)?)))
                .collect();
            Some((id, fields))
        })
        .collect()
}

/// XREAD's answer: `[[stream, entries]]` (RESP2), or nil when the block timed out.
fn stream_entries(v: &Value) -> Vec<(String, Vec<(String, String)>)> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(pair) => pair.get(1).map(entries).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(m) => m.iter().flat_map(|(_, e)| entries(e)).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_by_time_then_sequence() {
        assert!(id_lt("1-0", "2-0"));
        assert!(id_lt("5-1", "5-2"));
        assert!(!id_lt("10-0", "9-9"));
        assert!(!id_lt("7-3", "7-3"));
    }

    #[test]
    fn xread_answers_parse() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let v = Value::Array(vec![Value::Array(vec![
            b("k"),
            Value::Array(vec![Value::Array(vec![
                b("1-1"),
                Value::Array(vec![b("from"), b("gw-a"), b("kind"), b("tag")]),
            ])]),
        ])]);
        let e = stream_entries(&v);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, "1-1");
        assert_eq!(e[0].1[0], ("from".into(), "gw-a".into()));
        assert!(stream_entries(&Value::Nil).is_empty());
    }
}
