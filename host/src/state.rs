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
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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

/// Loads a 32-byte secret from `path`, creating it from the OS random source
/// if it does not exist. A file of the wrong length (a crash before this
/// function's atomic create, or tampering) is replaced and reported with
/// `tracing::warn!`, since everything it protected will fail authentication
/// and be rebuilt.
///
/// # Errors
///
/// I/O errors naming the file.
pub fn load_or_create_secret(path: &Path) -> io::Result<Zeroizing<[u8; 32]>> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("secret {}: {e}", path.display()));
    let mut key = Zeroizing::new([0u8; 32]);
    match fs::File::open(path) {
        Ok(mut f) => {
            let mut buf = Zeroizing::new(Vec::with_capacity(33));
            (&mut f).take(33).read_to_end(&mut buf).map_err(named)?;
            if buf.len() == 32 {
                key.copy_from_slice(&buf);
                return Ok(key);
            }
            tracing::warn!(path = %path.display(), len = buf.len(), "secret has the wrong length; replacing it");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(named(e)),
    }
    getrandom::fill(key.as_mut()).map_err(|e| named(io::Error::other(format!("random: {e}"))))?;
    write_atomic(path, key.as_ref()).map_err(named)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let a = load_or_create_secret(&p).expect("create");
        let b = load_or_create_secret(&p).expect("load");
        assert_eq!(*a, *b);
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::write(&p, b"short").expect("truncate");
        let c = load_or_create_secret(&p).expect("replace");
        assert_ne!(*a, *c);
        assert_eq!(fs::read(&p).expect("read").len(), 32);
    }

    #[test]
    fn flag_wins_over_config() {
        let p = resolve(Some(Path::new("/x")), Some(Path::new("/y"))).expect("resolve");
        assert_eq!(p, PathBuf::from("/x"));
    }
}
