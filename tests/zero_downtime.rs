//! Hot reload and binary upgrade under load: clients on keep-alive connections and on new
//! connections never see a failed or reset request while the config is reloaded twenty times
//! (routes added and removed, some files bad) or while a second process takes the listeners
//! over from the first.
mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "reload-token-0123456789abcdef";

/// Two loops until `stop`: one client reusing its connections, one opening a new connection
/// per request. Returns (requests, failures as "status or error" strings).
fn load(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let keep = client();
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut tasks = Vec::new();
        for (c, workers) in [(keep, 2), (fresh, 1)] {
            for _ in 0..workers {
                let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let (mut n, mut bad) = (0, Vec::new());
                    // Bounded in count as well as by `stop`.
                    while !stop.load(Ordering::Relaxed) && n < 200_000 {
                        n += 1;
                        match c.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {
                                if let Err(e) = r.bytes().await {
                                    bad.push(format!("body: {e}"));
                                }
                            }
                            Ok(r) => bad.push(format!("status {}", r.status())),
                            Err(e) => bad.push(format!("error: {e:?}")),
                        }
                    }
                    (n, bad)
                }));
            }
        }
        let (mut n, mut bad) = (0, Vec::new());
        for t in tasks {
            let (a, b) = t.await.unwrap();
            n += a;
            bad.extend(b);
        }
        (n, bad)
    })
}

/// Generation `i`'s file: the stable route, plus `/gen{i}`; every fourth one is broken in a
/// way only the validation sees (an unknown upstream), and one is not TOML at all.
fn generation(head: &str, port: u16, up: std::net::SocketAddr, i: usize) -> (String, bool) {
    let good = format!(
        "{head}[upstreams.a]\npeers = [\"{up}\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [[routes]]\nname = \"stable\"\npath = \"/stable\"\nupstream = \"a\"\n\
         [[routes]]\nname = \"gen{i}\"\npath = \"/gen{i}\"\nupstream = \"a\"\n"
    );
    match i % 4 {
        3 if i == 7 => ("[[routes]\nthis is not toml".into(), false),
        3 => (
            good.replace("upstream = \"a\"\n", "upstream = \"nope\"\n"),
            false,
        ),
        _ => (good, true),
    }
}

async fn status_of(url: &str) -> u16 {
    client().get(url).send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_drop_nothing() {
    let up = echo("a").await;
    let (port, admin) = (free_port(), free_port());
    let head = format!("[server]\nadmin = \"127.0.0.1:{admin}\"\nadmin_token = \"{TOKEN}\"\n");
    let g = Gatehouse::start(&generation(&head, port, up, 0).0, &[port, admin]);
    let base = format!("http://127.0.0.1:{port}");

    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(format!("{base}/stable"), stop.clone());
    let mut last_good = 0;
    let reloads = AtomicUsize::new(0);
    for i in 1..=20 {
        let (text, good) = generation(&head, port, up, i);
        std::fs::write(&g.config, text).unwrap();
        if i % 2 == 0 {
            // POST /reload answers when the reload is done.
            let r = client()
                .post(format!("http://127.0.0.1:{admin}/reload"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), if good { 200 } else { 422 }, "reload {i}");
        } else {
            let ok = Command::new("kill")
                .args(["-HUP", &g.pid().to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        reloads.fetch_add(1, Ordering::Relaxed);
        // Each good file takes effect (its route appears, the previous one goes); after a bad
        // one the last good generation keeps serving.
        let expect = if good { i } else { last_good };
        let deadline = Instant::now() + Duration::from_secs(5);
        while status_of(&format!("{base}/gen{expect}")).await != 200 {
            assert!(
                Instant::now() < deadline,
                "reload {i} not applied:\n{}",
                g.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !good {
            // Give a SIGHUP'd bad file the time to be refused, then check nothing changed.
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(status_of(&format!("{base}/gen{expect}")).await, 200);
        } else if last_good > 0 {
            assert_eq!(status_of(&format!("{base}/gen{last_good}")).await, 404);
        }
        if good {
            last_good = i;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (n, bad) = loader.await.unwrap();
    assert!(
        bad.is_empty(),
        "{} of {n} requests failed: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
    assert!(n > 200, "the load ran: {n} requests");
    let s = admin_status(admin).await;
    assert_eq!(s["last_reload"]["result"], "success", "{s}");
    let m = metrics_text(admin).await;
    // 15 good, 5 bad.
    assert!(
        m.contains("gatehouse_config_reloads_total{result=\"success\"} 15"),
        "{m}"
    );
    assert!(
        m.contains("gatehouse_config_reloads_total{result=\"failure\"} 5"),
        "{m}"
    );
    assert!(
        g.log().contains("unknown upstream \"nope\""),
        "bad files are logged"
    );
    eprintln!("{n} requests over 20 reloads, none failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_on_the_snapshot_it_started_on() {
    let slow = serve(|_req| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        hyper::Response::new(full("slow answer"))
    })
    .await;
    let (port, admin) = (free_port(), free_port());
    let head = format!("[server]\nadmin = \"127.0.0.1:{admin}\"\nadmin_token = \"{TOKEN}\"\n");
    let cfg = |route: &str| {
        format!(
            "{head}[upstreams.s]\npeers = [\"{slow}\"]\nread_timeout = \"5s\"\n[gateways.g]\n\
             listen = [\"127.0.0.1:{port}\"]\n[[routes]]\npath = \"{route}\"\nupstream = \"s\"\n"
        )
    };
    let g = Gatehouse::start(&cfg("/old"), &[port, admin]);
    let url = format!("http://127.0.0.1:{port}/old");
    let inflight = tokio::spawn(async move {
        let r = client().get(url).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&g.config, cfg("/new")).unwrap();
    let r = client()
        .post(format!("http://127.0.0.1:{admin}/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        status_of(&format!("http://127.0.0.1:{port}/old")).await,
        404,
        "the route is gone for new requests"
    );
    assert_eq!(inflight.await.unwrap(), (200, "slow answer".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_drops_nothing_and_the_old_process_drains() {
    let up = echo("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\ngrace_period = \"2s\"\nshutdown_timeout = \"1s\"\n\
         pid_file = \"{0}/g.pid\"\nupgrade_sock = \"{0}/upgrade.sock\"\n\
         [upstreams.a]\npeers = [\"{up}\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [[routes]]\npath = \"/\"\nupstream = \"a\"\n",
        dir.path().display()
    );
    let old = Gatehouse::start(&toml, &[port]);
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(format!("http://127.0.0.1:{port}/x"), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The new process waits on the upgrade socket; SIGQUIT makes the old one hand its
    // listening sockets over, stop accepting, and drain.
    let new_log = dir.path().join("new.log");
    let mut new = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["run", "--upgrade", "-c"])
        .arg(&old.config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&new_log).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quit_at = Instant::now();
    let ok = Command::new("kill")
        .args(["-QUIT", &old.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());

    // The old process is gone within Pingora's 5 s of accepting beside the new one, then
    // grace_period and shutdown_timeout (and a margin).
    let old_pid = old.pid();
    let gone = loop {
        let alive = std::fs::read_to_string(format!("/proc/{old_pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        if !alive {
            break quit_at.elapsed();
        }
        assert!(
            quit_at.elapsed() < Duration::from_secs(12),
            "old process still running:\n{}",
            old.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (n, bad) = loader.await.unwrap();
    let new_text = std::fs::read_to_string(&new_log).unwrap_or_default();
    let _ = new.kill();
    let _ = new.wait();
    assert!(
        bad.is_empty(),
        "{} of {n} requests failed: {:?}\nold:\n{}\nnew:\n{new_text}",
        bad.len(),
        &bad[..bad.len().min(10)],
        old.log()
    );
    assert!(n > 100, "the load ran: {n}");
    assert!(
        gone >= Duration::from_millis(1500),
        "it drained, not died: {gone:?}"
    );
    eprintln!("{n} requests across the upgrade, none failed; old process gone after {gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_then_exits() {
    let slow = serve(|_req| async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        hyper::Response::new(full("slow answer"))
    })
    .await;
    let port = free_port();
    let g = Gatehouse::start(
        &format!(
            "[server]\ngrace_period = \"3s\"\nshutdown_timeout = \"1s\"\n[upstreams.s]\n\
             peers = [\"{slow}\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\npath = \"/\"\nupstream = \"s\"\n"
        ),
        &[port],
    );
    let url = format!("http://127.0.0.1:{port}/x");
    let inflight = tokio::spawn(async move {
        let r = client().get(url).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term_at = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &g.pid().to_string()])
        .status()
        .unwrap()
        .success());
    let (status, body) = inflight.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "slow answer"));
    // No new connections once draining.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let pid = g.pid();
    loop {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        if !alive {
            break;
        }
        assert!(term_at.elapsed() < Duration::from_secs(8), "still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("SIGTERM: exited after {:?}", term_at.elapsed());
}

/// SIGUSR2: the running process starts its successor itself (as under systemd, where only a
/// child keeps the unit's cgroup and sandbox), which announces itself as MAINPID; no request
/// fails across it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_from_inside_and_the_successor_announces_itself() {
    use std::os::unix::net::UnixDatagram;
    let up = echo("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let cfg = dir.path().join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\ngrace_period = \"1s\"\nshutdown_timeout = \"1s\"\n\
             upgrade_sock = \"{}/upgrade.sock\"\n[upstreams.a]\npeers = [\"{up}\"]\n\
             [gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n[[routes]]\nupstream = \"a\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut old = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let main_pid = |rx: &UnixDatagram| -> u32 {
        let mut buf = [0u8; 256];
        loop {
            let n = rx.recv(&mut buf).expect("a notification");
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            if let Some(p) = msg.lines().find_map(|l| l.strip_prefix("MAINPID=")) {
                return p.parse().unwrap();
            }
        }
    };
    assert_eq!(main_pid(&rx), old.id());
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(format!("http://127.0.0.1:{port}/x"), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Command::new("kill")
        .args(["-USR2", &old.id().to_string()])
        .status()
        .unwrap()
        .success());
    let new_pid = main_pid(&rx);
    // Whatever happens below, the successor does not outlive the test.
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(self.0.to_string()).status();
        }
    }
    let _reap = Reap(new_pid);
    assert_ne!(new_pid, old.id(), "a new process announced itself");
    let deadline = Instant::now() + Duration::from_secs(12);
    while old.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the old process did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (n, bad) = loader.await.unwrap();
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    assert!(
        bad.is_empty(),
        "{} of {n} failed: {:?}\n{log}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    // The successor serves.
    let r = client()
        .get(format!("http://127.0.0.1:{port}/y"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(std::fs::read_to_string(format!("/proc/{new_pid}/cmdline")).is_ok());

    // A successor that cannot start (the file no longer checks) is refused; the process stays.
    std::fs::write(&cfg, "not toml [").unwrap();
    assert!(Command::new("kill")
        .args(["-USR2", &new_pid.to_string()])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = client()
        .get(format!("http://127.0.0.1:{port}/z"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still serving after a refused upgrade");
}
