//! systemd's notify protocol, by hand (a datagram to `$NOTIFY_SOCKET`; the `sd-notify` crate
//! would add nothing): `READY=1` with this `MAINPID` once every listener accepts connections,
//! a `STATUS=` line after reloads, and `WATCHDOG=1` pings at half of `$WATCHDOG_USEC` when
//! the unit sets `WatchdogSec`. Outside systemd (no `$NOTIFY_SOCKET`) nothing is sent.
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Every listener accepts connections (set once, by [`ready_when_listening`]).
pub static LISTENING: AtomicBool = AtomicBool::new(false);

/// Sends `state` (newline-separated `KEY=value` lines); false when not under systemd or the
/// socket refused it.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket: '@' stands for the leading NUL.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    sent.is_ok()
}

/// Waits until every address accepts a connection (Pingora binds listeners as its services
/// start), then says READY, then pings the watchdog for as long as the process runs.
pub async fn ready_when_listening(addrs: Vec<SocketAddr>) {
    for a in &addrs {
        let mut wait = Duration::from_millis(5);
        while tokio::net::TcpStream::connect(a).await.is_err() {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }
    LISTENING.store(true, Ordering::Release);
    // MAINPID: after `run --upgrade` the new process is the one systemd must watch (with
    // NotifyAccess=all in the unit); on a first start it is the main PID already.
    let status = format!(
        "READY=1\nMAINPID={}\nSTATUS=serving on {} listener(s)",
        std::process::id(),
        addrs.len()
    );
    if notify(&status) {
        log::info!("told systemd we are ready");
    }
    let Some(every) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&us| us > 0)
        .map(|us| Duration::from_micros(us / 2))
    else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        notify("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speaks_to_the_notify_socket() {
        let dir = tempfile_dir();
        let path = dir.join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        // SAFETY-free: tests in this binary that read NOTIFY_SOCKET run only here.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1"));
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify("READY=1"));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("gh-notify-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
