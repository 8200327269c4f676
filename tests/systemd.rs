//! Under systemd (`Type=notify`): READY=1, with the process's own PID as MAINPID, once the
//! listeners accept connections. The files in systemd/ beside the unit: the logrotate snippet,
//! the tmpfiles.d entry, the upgrade script.
mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn tells_systemd_when_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let port = free_port();
    let cfg = dir.path().join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstreams.u]\npeers = [\"127.0.0.1:9\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[routes]]\nupstream = \"u\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    let got = rx.recv(&mut buf);
    let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    let n = got.expect("a notification within 15 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    assert!(msg.contains(&format!("MAINPID={}\n", child.id())), "{msg}");
    assert!(listening, "ready means listening");
    assert!(start.elapsed() < Duration::from_secs(15));
}

/// The shipped unit passes `systemd-analyze verify`, and its exposure score is "OK" or better.
#[test]
fn the_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/gatehouse.service"
    ))
    .unwrap()
    .replace("/usr/local/bin/gatehouse", BIN);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatehouse.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (scripts/bootstrap.sh installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{text}"));
    let score: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{overall}"));
    // systemd's scale: up to 2.0 is "OK", below 1.1 "SAFE".
    assert!(score <= 2.0, "{overall}");
}

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(name)
}

fn text_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The logrotate snippet parses, and a forced run would rotate the access log, create the new
/// file 0640 and run the postrotate script once (`logrotate -d` does nothing but say so). Its
/// paths point at a temporary folder, and its owner at us: the gatehouse user need not exist.
#[test]
fn the_logrotate_snippet_parses() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("log");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("access.log"), "a line\n").unwrap();
    let me = std::fs::metadata(&logs).unwrap();
    let snippet = std::fs::read_to_string(shipped("gatehouse.logrotate")).unwrap();
    let owner = "create 0640 gatehouse gatehouse";
    assert!(
        snippet.contains("/var/log/gatehouse/*.log {") && snippet.contains(owner),
        "{snippet}"
    );
    let conf = dir.path().join("gatehouse.logrotate");
    std::fs::write(
        &conf,
        snippet
            .replace("/var/log/gatehouse/", &format!("{}/", logs.display()))
            .replace(owner, &format!("create 0640 {} {}", me.uid(), me.gid())),
    )
    .unwrap();
    // Debian puts it in /usr/sbin, which a user's PATH may lack.
    let logrotate = ["/usr/sbin/logrotate", "/usr/bin/logrotate"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("logrotate");
    let out = Command::new(logrotate)
        .args(["-d", "-f", "-s"])
        .arg(dir.path().join("state"))
        .arg(conf)
        .output()
        .expect("logrotate (scripts/bootstrap.sh test installs it)");
    let text = text_of(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("error:"), "{text}");
    let log = logs.join("access.log").display().to_string();
    for want in [
        "(14 rotations)".to_string(),
        format!("renaming {log} to {log}.1"),
        format!("creating new {log} mode = 0640"),
        "running postrotate script".into(),
        "systemctl kill -s USR1 --kill-who=main gatehouse.service".into(),
    ] {
        assert!(text.contains(&want), "{want:?} not in:\n{text}");
    }
}

/// The tmpfiles.d entry, applied under a temporary root whose passwd and group come from the
/// shipped sysusers file, makes /run/gatehouse and /var/log/gatehouse 0750 gatehouse:gatehouse.
/// Giving a file away takes root: as anyone else, the chown is the one error allowed.
#[test]
fn the_tmpfiles_entry_makes_the_directories() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let sysusers = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(shipped("gatehouse.sysusers"))
        .output()
        .expect("systemd-sysusers (scripts/bootstrap.sh installs systemd)");
    assert!(sysusers.status.success(), "{}", text_of(&sysusers));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let uid: u32 = passwd
        .lines()
        .find_map(|l| l.strip_prefix("gatehouse:x:"))
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no gatehouse user in:\n{passwd}"));
    let as_root = std::fs::metadata(root.path()).unwrap().uid() == 0;
    let out = Command::new("systemd-tmpfiles")
        .arg("--create")
        .arg(format!("--root={}", root.path().display()))
        .arg(shipped("gatehouse.tmpfiles"))
        .output()
        .unwrap();
    let text = text_of(&out);
    if as_root {
        assert!(out.status.success(), "{text}");
    } else {
        assert!(
            text.lines()
                .all(|l| l.starts_with("fchownat()") && l.ends_with("Operation not permitted")),
            "{text}"
        );
    }
    for dir in ["run/gatehouse", "var/log/gatehouse"] {
        let m = std::fs::metadata(root.path().join(dir)).unwrap();
        assert!(m.is_dir(), "{dir}");
        assert_eq!(m.mode() & 0o7777, 0o750, "{dir}");
        if as_root {
            assert_eq!((m.uid(), m.gid()), (uid, uid), "{dir}");
        }
    }
}

/// The upgrade script is POSIX sh that parses, installed executable (git keeps the bit).
#[test]
fn the_upgrade_script_parses_and_is_executable() {
    let path = shipped("gatehouse-upgrade");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "{} is {mode:o}", path.display());
    let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", text_of(&out));
    let out = Command::new(path).arg("-h").output().unwrap();
    assert!(out.status.success(), "{}", text_of(&out));
    assert!(text_of(&out).contains("usage: gatehouse-upgrade [-p PID]"));
}

/// The PIDs of the `gatehouse run` processes on `config`.
fn running_on(config: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let config = config.display().to_string();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<_> = args.split(|&b| b == 0).collect();
            args.contains(&b"run".as_slice()) && args.contains(&config.as_bytes())
        })
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            !stat.contains(") Z ")
        })
        .collect()
}

/// The script, end to end outside systemd: a bad config stops it with the running process
/// untouched; then it starts `run --upgrade`, SIGQUITs the old process once the new one waits
/// on the upgrade socket, and returns when the old one has drained and exited; the port
/// serves all along and afterwards, from the new process.
#[test]
fn the_upgrade_script_hands_the_listeners_over() {
    let port = free_port();
    let run = tempfile::tempdir().unwrap();
    let toml = format!(
        "[server]\ngrace_period = \"1s\"\nshutdown_timeout = \"1s\"\n\
         upgrade_sock = \"{}/upgrade.sock\"\n\
         [upstreams.u]\npeers = [\"127.0.0.1:9\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [[routes]]\nupstream = \"u\"\n",
        run.path().display()
    );
    let old = Gatehouse::start(&toml, &[port]);
    // Whatever happens below, no process of this test outlives it.
    struct Reap(PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            for pid in running_on(&self.0) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
    let _reap = Reap(old.config.clone());
    let script = shipped("gatehouse-upgrade");
    let upgrade = |args: &[&str]| {
        Command::new(script.as_path())
            .args(["-p", &old.pid().to_string()])
            .args(args)
            .env("GATEHOUSE_BIN", BIN)
            .env("GATEHOUSE_DRAIN_TIMEOUT", "30")
            .output()
            .unwrap()
    };

    let bad = old.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        toml.replace("upstream = \"u\"", "upstream = \"nope\""),
    )
    .unwrap();
    let out = upgrade(&["-c", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text_of(&out).contains("nothing changed"),
        "{}",
        text_of(&out)
    );
    assert_eq!(running_on(&old.config), vec![old.pid()]);

    let out = upgrade(&[]);
    let text = text_of(&out);
    assert!(out.status.success(), "{text}\nlog:\n{}", old.log());
    assert!(
        text.contains(&format!("done: PID {} drained and exited", old.pid())),
        "{text}"
    );
    let now = running_on(&old.config);
    assert_eq!(now.len(), 1, "{now:?}\n{text}");
    assert_ne!(now[0], old.pid());
    let args = std::fs::read(format!("/proc/{}/cmdline", now[0])).unwrap();
    assert!(
        args.ends_with(b"--upgrade\0"),
        "{}",
        String::from_utf8_lossy(&args)
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(!run.path().join("upgrade.sock").exists());
    assert!(!run.path().join("upgrade.sock.lock").exists());
}

/// The instance's user owns its log directory, so it may plant a link there: run as root,
/// the script must never create, append to or hand over what such a link names (it used to
/// create the target as root and chown it to the user: `/etc/ld.so.preload`, say). It refuses
/// a link, and creates a missing log as that user. Needs root (to run an instance as nobody).
#[test]
fn the_upgrade_script_opens_the_log_as_the_instances_user_only() {
    let root = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&root.stdout).trim() != "0" {
        eprintln!("skipped: needs root");
        return;
    }
    let nobody = 65534;
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let logs = base.path().join("log");
    let etc = base.path().join("etc");
    std::fs::create_dir(&logs).unwrap();
    std::fs::create_dir(&etc).unwrap();
    std::os::unix::fs::chown(&logs, Some(nobody), Some(nobody)).unwrap();
    let victim = etc.join("ld.so.preload");
    let planted = logs.join("gatehouse.log");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();

    let port = free_port();
    let config = base.path().join("gatehouse.toml");
    let toml = format!(
        "[server]\nupgrade_sock = \"{}/upgrade.sock\"\n\
         [upstreams.u]\npeers = [\"127.0.0.1:9\"]\n[gateways.g]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [[routes]]\nupstream = \"u\"\n",
        logs.display()
    );
    std::fs::write(&config, &toml).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut instance = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(BIN)
        .args(["run", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = instance.id();
    let _kill = Kill(&mut instance);
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the instance did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let upgrade = |log: &Path, config: &Path| {
        Command::new(shipped("gatehouse-upgrade"))
            .args(["-p", &pid.to_string(), "-c"])
            .arg(config)
            .env("GATEHOUSE_BIN", BIN)
            .env("GATEHOUSE_LOG", log)
            .output()
            .unwrap()
    };

    // A planted link: refused, its target never made, the instance untouched.
    let out = upgrade(&planted, &config);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text_of(&out).contains("is a symbolic link"),
        "{}",
        text_of(&out)
    );
    assert!(!victim.exists(), "root created the link's target");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    // A missing log is made by the instance's user (a bad config then stops the upgrade).
    let bad = base.path().join("bad.toml");
    std::fs::write(
        &bad,
        toml.replace("upstream = \"u\"", "upstream = \"nope\""),
    )
    .unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
    let fresh = logs.join("fresh.log");
    let out = upgrade(&fresh, &bad);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text_of(&out).contains("nothing changed"),
        "{}",
        text_of(&out)
    );
    let m = std::fs::metadata(&fresh).expect("the log was made");
    assert_eq!(
        (m.uid(), m.gid()),
        (nobody, nobody),
        "made by the instance's user"
    );
    // And a log the user cannot write there is refused, not forced as root.
    let rooted = etc.join("gatehouse.log");
    let out = upgrade(&rooted, &config);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        !rooted.exists(),
        "root made a log in a directory the user cannot write"
    );
}
