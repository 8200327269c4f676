//! SIGUSR2: a binary upgrade started from inside the running process, as nginx's USR2.
//!
//! Under systemd a new `gatehouse run --upgrade` must be a descendant of the running process:
//! systemd follows a new MAINPID only from inside the unit's cgroup, and the unit's sandbox
//! (seccomp filters, namespaces, capabilities) passes only from parent to child. So the running
//! process checks the config with the binary now at its path, starts that binary with
//! `run --upgrade` (which waits on `upgrade_sock`), and once it waits, sends itself SIGQUIT:
//! Pingora hands the listening sockets over, the new process announces itself as MAINPID, and
//! this one drains within `grace_period` and exits. Any failure before the SIGQUIT leaves this
//! process serving, with the reason in the log.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub async fn on_usr2(config: PathBuf, upgrade_sock: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr2 = match signal(SignalKind::user_defined2()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot watch SIGUSR2, binary upgrades by signal disabled: {e}");
            return;
        }
    };
    while usr2.recv().await.is_some() {
        log::info!("SIGUSR2: upgrading to the binary at this process's path");
        match upgrade(&config, &upgrade_sock).await {
            Ok(pid) => {
                log::info!("upgrade: process {pid} took the listeners; draining");
                return;
            }
            Err(e) => log::error!("upgrade refused, still serving: {e}"),
        }
    }
}

/// The binary this process was started from, as it is now on disk (replaced in place, the
/// old inode's link reads "... (deleted)").
fn binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let s = exe.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(p) => PathBuf::from(p),
        None => exe,
    })
}

async fn upgrade(config: &Path, sock: &Path) -> Result<u32, String> {
    use tokio::process::Command;
    let exe = binary()?;
    let check = Command::new(&exe)
        .args(["check", "-c"])
        .arg(config)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    if !check.status.success() {
        return Err(format!(
            "{} check refuses {}: {}",
            exe.display(),
            config.display(),
            String::from_utf8_lossy(&check.stderr).trim()
        ));
    }
    // A socket file left by an earlier upgrade would look like the new process waiting.
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(&exe)
        .args(["run", "--upgrade", "-c"])
        .arg(config)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pid = child.id().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the new process exited first ({status})"));
        }
        if Instant::now() > deadline {
            let _ = child.kill().await;
            return Err(format!(
                "the new process never waited on {}",
                sock.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Bound is not yet listening: give it a moment (Pingora's sender retries as well).
    tokio::time::sleep(Duration::from_millis(100)).await;
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGQUIT)
        .map_err(|e| format!("cannot signal myself: {e}"))?;
    Ok(pid)
}
