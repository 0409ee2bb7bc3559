//! The state directory: where edgeward keeps its compiled-artifact cache,
//! host secrets and per-module data.
//!
//! Resolution order: `--state-dir`, then `$EDGEWARD_STATE_DIR`, then the
//! config file's `state_dir`, then the default: `/var/lib/edgeward` for root,
//! `$XDG_STATE_HOME/edgeward` (or `~/.local/state/edgeward`) for other users.
//! The directory and everything edgeward creates in it are private to the
//! daemon's user (directories 0700, files 0600).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// The environment variable that names the state directory.
pub const STATE_DIR_ENV: &str = "EDGEWARD_STATE_DIR";

/// Picks the state directory by the documented precedence.
///
/// # Errors
///
/// When no candidate applies and neither `$XDG_STATE_HOME` nor `$HOME` is set
/// for a non-root user.
pub fn resolve(flag: Option<&Path>, config: Option<&Path>) -> io::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_owned());
    }
    if let Some(p) = std::env::var_os(STATE_DIR_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = config {
        return Ok(p.to_owned());
    }
    default_dir()
}

fn default_dir() -> io::Result<PathBuf> {
    // The effective uid without `unsafe`: /proc/self belongs to it.
    let is_root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if is_root {
        return Ok(PathBuf::from("/var/lib/edgeward"));
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("edgeward"));
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(h).join(".local/state/edgeward"));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no state directory: pass --state-dir or set EDGEWARD_STATE_DIR",
    ))
}

/// The entries of /etc/passwd, each as its fields.
fn passwd_entries() -> io::Result<Vec<Vec<String>>> {
    Ok(fs::read_to_string("/etc/passwd")?
        .lines()
        .map(|l| l.split(':').map(str::to_owned).collect())
        .collect())
}

/// The uid of user `name` in /etc/passwd (the first entry of that name
/// decides, as getpwnam's does). Names only: a number, an empty name or one
/// with `:` is no user. `None`: no such user.
///
/// # Errors
///
/// /etc/passwd cannot be read.
pub fn user_uid(name: &str) -> io::Result<Option<u32>> {
    if name.is_empty() || name.contains(':') || name.parse::<u32>().is_ok() {
        return Ok(None);
    }
    Ok(passwd_entries()?
        .iter()
        .find(|f| f.first().map(String::as_str) == Some(name))
        .and_then(|f| f.get(2)?.parse().ok()))
}

/// The primary group of `uid` in /etc/passwd. `None`: no entry.
pub fn primary_gid(uid: u32) -> Option<u32> {
    passwd_entries()
        .ok()?
        .iter()
        .filter(|f| f.len() >= 4 && f[2].parse::<u32>().ok() == Some(uid))
        .find_map(|f| f[3].parse().ok())
}

/// Whether what `meta` describes can be changed only by root or this
/// process's effective user: owned by one of them and writable by neither
/// group nor others. `Err` says why not. The one rule for what edgeward
/// runs or trusts by path (the key daemon's executable, the runtime the
/// launcher measures, the directories its sockets are made in).
///
/// # Errors
///
/// The owner or the mode, named.
pub fn only_root_or_me(meta: &fs::Metadata) -> Result<(), String> {
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "owned by uid {}, not by root or this user ({me})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Creates `dir` (and parents) if needed and makes it private (0700).
///
/// # Errors
///
/// An I/O error naming the directory when it cannot be created, is not a
/// directory, or belongs to another user.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    let named =
        |e: io::Error| io::Error::new(e.kind(), format!("state directory {}: {e}", dir.display()));
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(named)?;
    let meta = fs::symlink_metadata(dir).map_err(named)?;
    if !meta.is_dir() {
        return Err(named(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory (a symlink or file is in the way)",
        )));
    }
    let my_uid = fs::metadata("/proc/self").map(|m| m.uid()).map_err(named)?;
    if meta.uid() != my_uid {
        return Err(named(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {}, not by this process (uid {my_uid})",
                meta.uid()
            ),
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(named)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a private temporary file in the same
/// directory, fsynced, then renamed over `path`, then the directory fsynced.
/// A crash leaves either the old file or the new one, never a torn one.
///
/// # Errors
///
/// Any I/O error; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, true)
}

/// Replaces `path` with `bytes` atomically for readers (a temporary file
/// renamed over it) without syncing: for state that a power loss resets
/// anyway (the soft measurement register lives for one boot).
///
/// # Errors
///
/// Any I/O error; the temporary file is removed on failure.
pub fn replace_unsynced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, false)
}

/// A private temporary file in `path`'s directory, renamed over it; with
/// `durable`, the file is synced before the rename and the directory
/// after.
fn replace(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes `path` readable and writable by its owner only (0600).
///
/// # Errors
///
/// When its permissions cannot be set.
pub fn restrict(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}

/// Syncs directory `dir` (best effort: what was renamed or deleted in it
/// survives a power loss).
pub fn sync_dir(dir: &Path) {
    let _ = fs::File::open(dir).and_then(|d| d.sync_all());
}

/// Creates `path` with `bytes` only if it does not exist yet, atomically:
/// the content is written and synced under a temporary name, then
/// hard-linked to `path` (which fails if `path` exists). Returns `false`
/// when another writer created `path` first; its content is then left as is.
///
/// # Errors
///
/// Any I/O error other than `path` already existing.
pub fn create_only(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let tmp = temp_path(path)?;
    write_atomic(&tmp, bytes)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| io::Error::other(format!("random: {e}")))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    Ok(path.with_file_name(format!(".{name}.{}.tmp", crate::measure::hex(&nonce))))
}

/// The lock file in a state directory that one daemon holds while it runs.
pub const DAEMON_LOCK: &str = "daemon.lock";

/// A daemon's exclusive claim on its state directory, released when dropped
/// (or when the process ends, however it ends).
#[derive(Debug)]
pub struct DaemonLock {
    _file: fs::File,
}

/// Claims `state_dir` for this daemon: one daemon per state directory. The
/// lock file holds the holder's pid, for the error a second daemon gets.
///
/// # Errors
///
/// `WouldBlock` naming the pid of the daemon that holds it; I/O errors.
pub fn lock_for_daemon(state_dir: &Path) -> io::Result<DaemonLock> {
    let path = state_dir.join(DAEMON_LOCK);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    match f.try_lock() {
        Ok(()) => {
            f.set_len(0)?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_data()?;
            Ok(DaemonLock { _file: f })
        }
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.chars().all(|c| c.is_ascii_digit()) && !holder.is_empty() {
                format!("pid {holder}")
            } else {
                "another process".to_owned()
            };
            Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "another edgeward daemon ({holder}) is running on the state directory {}; stop it first, or give this one its own --state-dir",
                    state_dir.display()
                ),
            ))
        }
        Err(fs::TryLockError::Error(e)) => Err(io::Error::new(
            e.kind(),
            format!("{}: cannot lock: {e}", path.display()),
        )),
    }
}

/// Reads a 32-byte secret; `Ok(None)` if `path` does not exist, `Err` with
/// the length found if it is not 32 bytes.
fn read_secret(path: &Path) -> io::Result<Option<Result<Zeroizing<[u8; 32]>, usize>>> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = Zeroizing::new(Vec::with_capacity(33));
    (&mut f).take(33).read_to_end(&mut buf)?;
    let mut key = Zeroizing::new([0u8; 32]);
    if buf.len() != 32 {
        return Ok(Some(Err(buf.len())));
    }
    key.copy_from_slice(&buf);
    Ok(Some(Ok(key)))
}

fn fresh_secret() -> io::Result<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(key.as_mut()).map_err(|e| io::Error::other(format!("random: {e}")))?;
    Ok(key)
}

/// Loads a 32-byte secret that protects what cannot be rebuilt (the soft
/// HSM's key-encryption key), creating it on first use. Creation is
/// exclusive (written aside, then linked into place), so when several
/// processes start at once exactly one secret wins and every process reads
/// that one. Anything unexpected fails closed: a file of the wrong length is
/// never replaced; the error says so, and how to recover (`recover`).
///
/// # Errors
///
/// I/O errors, and a secret of the wrong length, naming the file.
pub fn load_or_create_secret(path: &Path, recover: &str) -> io::Result<Zeroizing<[u8; 32]>> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("secret {}: {e}", path.display()));
    let wrong = |len: usize| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "secret {}: {len} bytes, expected 32 (damaged or tampered with). It is left as it is; {recover}",
                path.display()
            ),
        )
    };
    // Two rounds at most: read, else create; if another process created it
    // first, read theirs.
    for _ in 0..2 {
        match read_secret(path).map_err(named)? {
            Some(Ok(key)) => return Ok(key),
            Some(Err(len)) => return Err(wrong(len)),
            None => {}
        }
        let key = fresh_secret().map_err(named)?;
        if create_only(path, key.as_ref()).map_err(named)? {
            return Ok(key);
        }
    }
    match read_secret(path).map_err(named)? {
        Some(Ok(key)) => Ok(key),
        Some(Err(len)) => Err(wrong(len)),
        None => Err(named(io::Error::other(
            "created by another process and then removed",
        ))),
    }
}

/// Loads a 32-byte secret whose loss costs only work (the compiled-cache
/// MAC key: entries under a lost key are recompiled), creating it if
/// missing and replacing one of the wrong length with a warning.
///
/// # Errors
///
/// I/O errors naming the file.
pub fn load_or_regenerate_secret(path: &Path) -> io::Result<Zeroizing<[u8; 32]>> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("secret {}: {e}", path.display()));
    match read_secret(path).map_err(named)? {
        Some(Ok(key)) => return Ok(key),
        Some(Err(len)) => {
            tracing::warn!(path = %path.display(), len, "secret has the wrong length; replacing it (what it protected is rebuilt)");
        }
        None => {}
    }
    let key = fresh_secret().map_err(named)?;
    write_atomic(path, key.as_ref()).map_err(named)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn users_are_looked_up_by_name_only() {
        assert_eq!(user_uid("root").unwrap(), Some(0));
        assert_eq!(user_uid("no-such-user-here").unwrap(), None);
        // A number is not a name (it would be a uid no one vouched for).
        assert_eq!(user_uid("0").unwrap(), None);
        assert_eq!(user_uid("").unwrap(), None);
        assert_eq!(user_uid("root:x").unwrap(), None);
        assert_eq!(primary_gid(0), Some(0));
        assert_eq!(primary_gid(4_000_000_000), None);
    }

    #[test]
    fn private_dir_is_0700() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path().join("a/b/state");
        ensure_private_dir(&d).expect("create");
        let mode = fs::metadata(&d).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_private_dir(&d).expect("again");
        let mode = fs::metadata(&d).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "permissions tightened");
    }

    #[test]
    fn private_dir_refuses_a_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let f = tmp.path().join("file");
        fs::write(&f, b"x").expect("write");
        let e = ensure_private_dir(&f).unwrap_err().to_string();
        assert!(e.contains("file"), "{e}");
    }

    #[test]
    fn secret_is_stable_and_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("host.key");
        let a = load_or_create_secret(&p, "restore it").expect("create");
        let b = load_or_create_secret(&p, "restore it").expect("load");
        assert_eq!(*a, *b);
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// A secret that cannot be rebuilt is never replaced: a damaged one is
    /// an error saying how to recover, and the file stays as it was.
    #[test]
    fn a_damaged_secret_fails_closed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("kek");
        load_or_create_secret(&p, "x").expect("create");
        for bad in [&b"short"[..], &[7u8; 33][..], &[][..]] {
            fs::write(&p, bad).expect("damage");
            let e = load_or_create_secret(&p, "restore it from a backup")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("{} bytes, expected 32", bad.len().min(33)))
                    && e.contains("restore it from a backup")
                    && e.contains("kek"),
                "{e}"
            );
            assert_eq!(fs::read(&p).expect("read"), bad, "left as it was");
        }
    }

    /// Processes starting at once on a fresh state directory all end up
    /// with the one secret on disk (a rename-over let each keep its own).
    #[test]
    fn racing_creators_agree_on_one_secret() {
        for round in 0..20 {
            let tmp = tempfile::tempdir().expect("tempdir");
            let p = Arc::new(tmp.path().join("kek"));
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let got: Vec<[u8; 32]> = (0..8)
                .map(|_| {
                    let (p, barrier) = (p.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        *load_or_create_secret(&p, "x").expect("secret")
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect();
            let on_disk = fs::read(&*p).expect("read");
            for g in &got {
                assert_eq!(
                    &g[..],
                    &on_disk[..],
                    "round {round}: a creator kept its own secret"
                );
            }
        }
    }

    #[test]
    fn the_cache_key_may_be_regenerated() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("cache.key");
        let a = load_or_regenerate_secret(&p).expect("create");
        assert_eq!(*a, *load_or_regenerate_secret(&p).expect("load"));
        fs::write(&p, b"short").expect("truncate");
        let c = load_or_regenerate_secret(&p).expect("replace");
        assert_ne!(*a, *c);
        assert_eq!(fs::read(&p).expect("read").len(), 32);
    }

    #[test]
    fn one_daemon_per_state_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let held = lock_for_daemon(tmp.path()).expect("first");
        let e = lock_for_daemon(tmp.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(held);
        lock_for_daemon(tmp.path()).expect("free again");
    }

    #[test]
    fn flag_wins_over_config() {
        let p = resolve(Some(Path::new("/x")), Some(Path::new("/y"))).expect("resolve");
        assert_eq!(p, PathBuf::from("/x"));
    }
}
