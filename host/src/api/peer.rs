//! Who is on the other end of the management socket: the kernel's
//! credentials for the peer (SO_PEERCRED: uid, gid, pid; SO_PEERGROUPS:
//! its supplementary groups; both as of `connect`), and the role they give
//! it. Connections are
//! counted per uid at accept time, and those of every uid but root and the
//! daemon's own together: a member of the socket's group who owns a range
//! of subordinate uids (a user namespace) could otherwise hold
//! [`CONNECTIONS_PER_UID`] for each of them.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};

use crate::config::ApiSettings;
use crate::runtime::loglimit::LogLimiter;

/// Connections one uid may hold open at once.
pub const CONNECTIONS_PER_UID: usize = 10;
/// Connections all uids but root and the daemon's own may hold open at
/// once, together (root and the daemon's uid always find a slot).
pub const CONNECTIONS_OF_OTHERS: usize = 64;

/// Open connections: per uid, and of the uids that share
/// [`CONNECTIONS_OF_OTHERS`].
#[derive(Debug, Default)]
struct Open {
    per_uid: HashMap<u32, usize>,
    others: usize,
}

/// The peer of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// Its process id, if the kernel gave one.
    pub pid: Option<i32>,
    /// Its supplementary groups (see [`peer_groups`]).
    pub groups: Vec<u32>,
}

/// What a peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read and change everything.
    Operator,
    /// Read only.
    Reader,
}

impl ApiSettings {
    /// The role `peer` has: root and `daemon_uid` are operators; then the
    /// configured operator and reader users and groups (primary or
    /// supplementary). `None`: no access.
    pub fn role(&self, peer: &Peer, daemon_uid: u32) -> Option<Role> {
        let in_any =
            |gids: &[u32]| gids.contains(&peer.gid) || peer.groups.iter().any(|g| gids.contains(g));
        if peer.uid == 0
            || peer.uid == daemon_uid
            || self.operator_uids.contains(&peer.uid)
            || in_any(&self.operator_gids)
        {
            Some(Role::Operator)
        } else if self.reader_uids.contains(&peer.uid) || in_any(&self.reader_gids) {
            Some(Role::Reader)
        } else {
            None
        }
    }
}

/// A group's id: a number, or a name in `/etc/group`.
pub fn group_id(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let (n, _, gid) = (f.next()?, f.next()?, f.next()?);
        (n == name).then(|| gid.parse().ok()).flatten()
    })
}

/// The peer's supplementary groups as the kernel recorded them when it
/// connected (`SO_PEERGROUPS`, as `SO_PEERCRED` records its uid): nothing
/// is looked up after `accept`, so a peer that exits and whose pid is
/// reused cannot lend its groups to another process. An error yields no
/// groups (fewer rights, never more).
///
/// # Errors
///
/// The `getsockopt` error.
#[allow(unsafe_code)]
pub fn peer_groups(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut buf: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(buf.len() * GID).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `buf` is valid for writes of `len` bytes, and the kernel
        // writes at most `len` bytes and stores the length it wrote (or,
        // with ERANGE, the length it needs) in `len`.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let len = usize::try_from(len).unwrap_or(0);
        if r == 0 {
            buf.truncate(len / GID);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        // NGROUPS_MAX is 65536: a larger answer is not a group list.
        if e.raw_os_error() == Some(libc::ERANGE) && len / GID > buf.len() && len / GID <= 65_536 {
            buf.resize(len / GID, 0);
            continue;
        }
        return Err(e);
    }
}

/// The management socket's listener: reads each peer's credentials at
/// accept time and refuses (closes) a connection past
/// [`CONNECTIONS_PER_UID`] for its uid, or past [`CONNECTIONS_OF_OTHERS`]
/// for a uid other than root and the daemon's.
#[derive(Debug)]
pub struct PeerListener {
    inner: UnixListener,
    open: Arc<Mutex<Open>>,
    own_uid: u32,
    log: Arc<LogLimiter>,
}

impl PeerListener {
    /// Listens on `inner`.
    pub fn new(inner: UnixListener) -> Self {
        Self {
            inner,
            open: Arc::default(),
            own_uid: rustix::process::geteuid().as_raw(),
            log: Arc::new(LogLimiter::new("management-api", "refused connections")),
        }
    }

    fn admit(&self, stream: UnixStream) -> Option<(Conn, Peer)> {
        let cred = stream.peer_cred().ok()?;
        let uid = cred.uid();
        let other = uid != 0 && uid != self.own_uid;
        let mut open = self.open.lock().ok()?;
        if other && open.others >= CONNECTIONS_OF_OTHERS {
            if self.log.allow() {
                tracing::warn!(
                    uid,
                    "management connection refused: {CONNECTIONS_OF_OTHERS} already open for uids other than root and the daemon's"
                );
            }
            return None;
        }
        let n = open.per_uid.entry(uid).or_insert(0);
        if *n >= CONNECTIONS_PER_UID {
            if self.log.allow() {
                tracing::warn!(
                    uid,
                    "management connection refused: {CONNECTIONS_PER_UID} already open for this uid"
                );
            }
            return None;
        }
        *n += 1;
        if other {
            open.others += 1;
        }
        drop(open);
        let groups = {
            use std::os::fd::AsFd as _;
            peer_groups(stream.as_fd()).unwrap_or_else(|e| {
                tracing::warn!(uid, error = %e, "the peer's groups could not be read (SO_PEERGROUPS); it is judged by its uid and primary group");
                Vec::new()
            })
        };
        let peer = Peer {
            uid,
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
        };
        Some((
            Conn {
                inner: stream,
                uid,
                other,
                open: self.open.clone(),
            },
            peer,
        ))
    }
}

impl axum::serve::Listener for PeerListener {
    type Io = Conn;
    type Addr = Peer;

    async fn accept(&mut self) -> (Conn, Peer) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _)) => {
                    if let Some(admitted) = self.admit(stream) {
                        return admitted;
                    }
                }
                Err(e) => {
                    if self.log.allow() {
                        tracing::warn!(error = %e, "management socket accept failed");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        Ok(Peer {
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            pid: None,
            groups: Vec::new(),
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, PeerListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, PeerListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// One admitted connection; gives its uid's slot back when closed.
#[derive(Debug)]
pub struct Conn {
    inner: UnixStream,
    uid: u32,
    /// Counted among [`CONNECTIONS_OF_OTHERS`].
    other: bool,
    open: Arc<Mutex<Open>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            if self.other {
                open.others = open.others.saturating_sub(1);
            }
            if let Some(n) = open.per_uid.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    open.per_uid.remove(&self.uid);
                }
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn roles() {
        let s = ApiSettings {
            operator_uids: vec![1000],
            operator_gids: vec![50],
            reader_uids: vec![2000],
            reader_gids: vec![60],
            ..ApiSettings::default()
        };
        let d = 999;
        assert_eq!(s.role(&peer(0, 0, &[]), d), Some(Role::Operator));
        assert_eq!(s.role(&peer(999, 1, &[]), d), Some(Role::Operator));
        assert_eq!(s.role(&peer(1000, 1, &[]), d), Some(Role::Operator));
        assert_eq!(s.role(&peer(3000, 50, &[]), d), Some(Role::Operator));
        assert_eq!(s.role(&peer(3000, 1, &[7, 50]), d), Some(Role::Operator));
        assert_eq!(s.role(&peer(2000, 1, &[]), d), Some(Role::Reader));
        assert_eq!(s.role(&peer(3000, 1, &[60]), d), Some(Role::Reader));
        assert_eq!(s.role(&peer(3000, 1, &[7]), d), None);
    }

    #[test]
    fn groups_of_this_process() {
        use std::os::fd::AsFd as _;
        // The kernel's record for a socket this process connected: its own
        // supplementary groups.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut got = peer_groups(a.as_fd()).unwrap();
        let mut want: Vec<u32> = rustix::process::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(group_id("0"), Some(0));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-here"), None);
    }
}
