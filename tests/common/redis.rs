//! Real Redis servers for the tests: Debian's `redis-server`, started on free loopback ports
//! in a temporary folder and killed when dropped. A single server, a Cluster made with
//! `redis-cli --cluster create`, or a master, a replica and three Sentinels.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// One `redis-server` process (a server or a Sentinel).
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// `requirepass`: the CLI calls give it.
    password: Option<String>,
    args: Vec<String>,
    dir: std::path::PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// `redis-cli -p PORT ARGS...`: its output, trimmed.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (apt-get install redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wait_ping(r: &Redis) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let port = r.port;
    while r.cli(&["ping"]) != "PONG" {
        assert!(Instant::now() < deadline, "redis on {port} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Redis {
    /// A plain server with nothing saved to disk.
    pub fn start() -> Redis {
        Redis::with(&[])
    }

    /// A server with extra `--name value` settings.
    pub fn with(extra: &[&str]) -> Redis {
        Redis::with_password(extra, None)
    }

    /// A server that wants `password` (and gives it to its master: `masterauth`).
    pub fn with_password(extra: &[&str], password: Option<&str>) -> Redis {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let port = free_port();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        if let Some(p) = password {
            args.extend(["--requirepass", p, "--masterauth", p].map(String::from));
        }
        let mut r = Redis {
            child: None,
            port,
            password: password.map(String::from),
            args,
            dir,
            _tmp: Some(tmp),
        };
        r.spawn(None);
        r
    }

    fn spawn(&mut self, conf: Option<&std::path::Path>) {
        let mut c = Command::new("redis-server");
        if let Some(conf) = conf {
            c.arg(conf);
        }
        let child = c
            .args(&self.args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        wait_ping(self);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        match &self.password {
            Some(p) => {
                let mut all = vec!["--no-auth-warning", "-a", p.as_str()];
                all.extend_from_slice(args);
                cli(self.port, &all)
            }
            None => cli(self.port, args),
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// SIGSTOP: the server holds its connections and answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL: connections reset, the port refuses.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty: nothing was saved).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(None);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// Six servers in a Cluster: three masters, each with a replica that takes over within
/// about a second of its master's death.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let nodes: Vec<Redis> = (0..6)
            .map(|_| {
                Redis::with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    // A replica may take over however long it has been out of touch.
                    "--cluster-replica-validity-factor",
                    "0",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = Cluster { nodes };
        c.wait_ok();
        c
    }

    /// Until every node says `cluster_state:ok` and every replica is in sync with its master.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            while !n.cli(&["cluster", "info"]).contains("cluster_state:ok")
                || (n.cli(&["role"]).starts_with("slave")
                    && !n
                        .cli(&["info", "replication"])
                        .contains("master_link_status:up"))
            {
                assert!(Instant::now() < deadline, "cluster not ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    /// The index of the master serving `key` now (the others answer MOVED).
    pub fn master_of(&self, key: &str) -> usize {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_none() || !n.cli(&["role"]).starts_with("master") {
                continue;
            }
            let r = n.cli(&["exists", key]);
            if !r.contains("MOVED") && !r.contains("CLUSTERDOWN") {
                return i;
            }
        }
        panic!("no master serves {key}");
    }
}

impl Cluster {
    /// Moves the slot of `key` (and its keys) from its master to another master, as
    /// `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE, then NODE everywhere.
    /// Returns (from, to) as indexes.
    pub fn move_slot_of(&self, key: &str) -> (usize, usize) {
        let from = self.master_of(key);
        let to = (0..self.nodes.len())
            .find(|&i| {
                i != from
                    && self.nodes[i].child.is_some()
                    && self.nodes[i].cli(&["role"]).starts_with("master")
            })
            .expect("another master");
        let (a, b) = (&self.nodes[from], &self.nodes[to]);
        let slot = a.cli(&["cluster", "keyslot", key]);
        let (id_a, id_b) = (a.cli(&["cluster", "myid"]), b.cli(&["cluster", "myid"]));
        assert_eq!(
            b.cli(&["cluster", "setslot", &slot, "importing", &id_a]),
            "OK"
        );
        assert_eq!(
            a.cli(&["cluster", "setslot", &slot, "migrating", &id_b]),
            "OK"
        );
        let keys = a.cli(&["cluster", "getkeysinslot", &slot, "100"]);
        for k in keys.lines().filter(|k| !k.is_empty()) {
            let r = a.cli(&["migrate", "127.0.0.1", &b.port.to_string(), k, "0", "5000"]);
            assert_eq!(r, "OK", "migrate {k}");
        }
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            if n.cli(&["role"]).starts_with("master") {
                n.cli(&["cluster", "setslot", &slot, "node", &id_b]);
            }
        }
        (from, to)
    }
}

/// A master, its replica and three Sentinels that watch them (quorum 2), with a failover
/// after one second of silence.
pub struct Sentinels {
    pub master: Redis,
    pub replica: Redis,
    pub sentinels: Vec<Redis>,
}

impl Sentinels {
    pub const NAME: &'static str = "gh-master";

    /// With `password`: the master and the replica want it (the Sentinels do not).
    pub fn start(password: Option<&str>) -> Sentinels {
        let master = Redis::with_password(&[], password);
        let replica = Redis::with_password(
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
            password,
        );
        let auth = password.map_or(String::new(), |p| {
            format!("sentinel auth-pass {} {p}\n", Self::NAME)
        });
        let sentinels = (0..3)
            .map(|_| {
                let tmp = tempfile::tempdir().expect("tempdir");
                let port = free_port();
                let conf = tmp.path().join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                         sentinel monitor {name} 127.0.0.1 {mport} 2\n\
                         sentinel down-after-milliseconds {name} 1000\n\
                         sentinel failover-timeout {name} 5000\n\
                         sentinel parallel-syncs {name} 1\n{auth}",
                        dir = tmp.path().display(),
                        name = Self::NAME,
                        mport = master.port
                    ),
                )
                .expect("sentinel.conf");
                let mut r = Redis {
                    child: None,
                    port,
                    password: None,
                    args: vec!["--sentinel".into()],
                    dir: tmp.path().to_path_buf(),
                    _tmp: Some(tmp),
                };
                r.spawn(Some(&conf));
                r
            })
            .collect();
        Sentinels {
            master,
            replica,
            sentinels,
        }
    }

    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(Redis::url).collect()
    }

    /// The port the Sentinels name as master now.
    pub fn master_port(&self) -> u16 {
        let out = self.sentinels[0].cli(&["sentinel", "get-master-addr-by-name", Self::NAME]);
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0)
    }
}
