//! systemd's sd_notify protocol (READY=1, STATUS=, WATCHDOG=1) over $NOTIFY_SOCKET, without
//! libsystemd: a datagram to a Unix socket, abstract when the path starts with '@'.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends a notification; a no-op outside systemd (no NOTIFY_SOCKET).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(&path)
    };
    let (Ok(sock), Ok(addr)) = (UnixDatagram::unbound(), addr) else {
        return;
    };
    let _ = sock.send_to_addr(state.as_bytes(), &addr);
}

/// Half of WATCHDOG_USEC when systemd asks for keep-alives (and the watchdog is ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}
