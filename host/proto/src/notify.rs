//! The service manager's readiness protocol (`sd_notify(3)`): datagrams of
//! `KEY=value` lines to the socket `$NOTIFY_SOCKET` names (a path, or an
//! abstract name after `@`). Written here rather than taken from a crate:
//! it is one `send` per state.
//!
//! Who may reach it: the process that was given `$NOTIFY_SOCKET` (the
//! service manager checks the sender's pid against the unit's main pid,
//! `NotifyAccess=main`). What a hostile value could try: a `STATUS=` with a
//! newline to smuggle `READY=1` or `MAINPID=`; [`Notifier::status`] turns
//! control characters into spaces and caps the length.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The variable that names the socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog interval the service manager expects, in microseconds.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The pid the watchdog is meant for (when set).
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// The longest `STATUS=` text sent.
const MAX_STATUS: usize = 200;

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names, connected now (call it before
    /// the process confines itself: Landlock's scope then refuses an
    /// abstract socket it has not reached yet), or `None` when the variable
    /// is unset or empty (not started by a service manager that listens).
    /// The variables are removed from the environment, so no child (a
    /// compile worker, a launched runtime) speaks for this process.
    ///
    /// # Errors
    ///
    /// The variable names a socket that cannot be reached: the service
    /// manager would wait for a readiness that never comes.
    pub fn from_env() -> io::Result<Option<Self>> {
        let Some(path) = std::env::var_os(NOTIFY_SOCKET).filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let watchdog = watchdog_from(
            std::env::var(WATCHDOG_USEC).ok().as_deref(),
            std::env::var(WATCHDOG_PID).ok().as_deref(),
            std::process::id(),
        );
        // The process is still single-threaded when it reads its
        // environment at start.
        clear_env();
        let socket = UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.connect_addr(&addr)?;
        } else {
            socket.connect(&path)?;
        }
        // A full socket drops the state rather than stall the caller (the
        // supervisor's loop).
        socket.set_nonblocking(true)?;
        Ok(Some(Self { socket, watchdog }))
    }

    /// How often to feed the watchdog: half the interval the service
    /// manager set, if it set one for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&self, message: &str) {
        // Best effort: a service manager that went away is not a reason to
        // stop serving.
        let _ = self.socket.send(message.as_bytes());
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", clean(status)));
    }

    /// A status line.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", clean(status)));
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", clean(status)));
    }

    /// `WATCHDOG=1`: still alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// `EXTEND_TIMEOUT_USEC`: the start (or stop) takes up to `by` more.
    pub fn extend_timeout(&self, by: Duration) {
        self.send(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
    }
}

#[allow(unsafe_code)]
fn clear_env() {
    for v in [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID] {
        // SAFETY: called while the process is single-threaded (at start,
        // before any thread is spawned), as `remove_var` requires.
        unsafe { std::env::remove_var(v) };
    }
}

/// Half of `usec` if it is a positive number of microseconds and `pid`
/// (when given) is `me`.
fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|u| *u > 0)?;
    // Never a zero period (a timer of none spins or panics).
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// `status` on one line: control characters as spaces, at most
/// [`MAX_STATUS`] bytes (at a character boundary).
fn clean(status: &str) -> String {
    let mut s: String = status
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > MAX_STATUS {
        let mut end = MAX_STATUS;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_cannot_smuggle_a_state() {
        assert_eq!(clean("ok\nREADY=1\rMAINPID=1"), "ok READY=1 MAINPID=1");
        let long = "é".repeat(300);
        let c = clean(&long);
        assert!(c.len() <= MAX_STATUS && c.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn the_watchdog_is_fed_at_half_its_interval_for_this_pid_only() {
        assert_eq!(
            watchdog_from(Some("4000000"), None, 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_from(Some("4000000"), Some("7"), 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_from(Some("4000000"), Some("8"), 7), None);
        assert_eq!(
            watchdog_from(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
        for bad in ["0", "-1", "x", ""] {
            assert_eq!(watchdog_from(Some(bad), None, 7), None, "{bad}");
        }
        assert_eq!(watchdog_from(None, None, 7), None);
    }

    #[test]
    fn states_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let socket = UnixDatagram::unbound().unwrap();
        socket.connect(&path).unwrap();
        let n = Notifier {
            socket,
            watchdog: None,
        };
        n.ready("3 modules\nrunning");
        n.watchdog();
        n.stopping("SIGTERM");
        let mut buf = [0u8; 512];
        let mut got = Vec::new();
        for _ in 0..3 {
            let len = server.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert_eq!(
            got,
            [
                "READY=1\nSTATUS=3 modules running",
                "WATCHDOG=1",
                "STOPPING=1\nSTATUS=SIGTERM"
            ]
        );
    }
}
