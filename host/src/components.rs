//! Components, content-addressed in the state directory
//! (`components/sha256-<hex>.wasm`, 0600): a module's registration names a
//! digest, not a path that could change under it, and a component used by
//! many modules is stored once. What is stored was measured on the way in;
//! it is measured again on every read, so a stored file that was altered is
//! refused (never run), naming it.
//!
//! Who may reach it: processes with the state directory owner's rights (it
//! is 0700). Modules never see it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::measure::{Digest, MeasureError, Measured};
use crate::state;

/// The store's directory in the state directory.
pub const DIR: &str = "components";

/// The component store of one state directory.
#[derive(Debug, Clone)]
pub struct ComponentStore {
    dir: PathBuf,
}

impl ComponentStore {
    /// The store of `state_dir` (created, private, if missing).
    ///
    /// # Errors
    ///
    /// When the directory cannot be created or made private.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join(DIR);
        state::ensure_private_dir(&dir)?;
        Ok(Self { dir })
    }

    /// Where the component with `digest` is (or would be) stored.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}.wasm", digest.to_string().replace(':', "-")))
    }

    /// Whether a component with `digest` is stored.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Whether `digest`, `size` bytes, may be added under `quota` (bytes the
    /// whole store may hold). One already stored always may.
    ///
    /// # Errors
    ///
    /// The store would pass the quota; the message names
    /// `[grants] components_quota`.
    pub fn admit(&self, digest: &Digest, size: u64, quota: u64) -> Result<(), String> {
        if self.contains(digest) {
            return Ok(());
        }
        let held: u64 = self
            .entries()
            .iter()
            .filter_map(|(p, _)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        if held.saturating_add(size) > quota {
            return Err(format!(
                "the component store holds {}; {} more would pass the device's [grants] components_quota = {}",
                crate::units::format_size(held),
                crate::units::format_size(size),
                crate::units::format_size(quota)
            ));
        }
        Ok(())
    }

    /// Stores measured bytes (once: an existing copy is kept). Returns the
    /// stored path.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn put(&self, m: &Measured) -> std::io::Result<PathBuf> {
        let path = self.path(&m.digest);
        if !path.is_file() {
            state::create_only(&path, &m.bytes)?;
        }
        Ok(path)
    }

    /// Stores `bytes`, which the caller has hashed to `digest` (an upload).
    ///
    /// # Errors
    ///
    /// I/O errors, or bytes that do not hash to `digest`.
    pub fn put_bytes(&self, digest: &Digest, bytes: &[u8]) -> std::io::Result<PathBuf> {
        if Digest::of(bytes) != *digest {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the bytes do not hash to {digest}"),
            ));
        }
        let path = self.path(digest);
        if !path.is_file() {
            state::create_only(&path, bytes)?;
        }
        Ok(path)
    }

    /// Measures the stored component with `digest` again without keeping
    /// its bytes (the watchdog).
    ///
    /// # Errors
    ///
    /// Not stored, unreadable, or it no longer hashes to `digest`; the
    /// message says which.
    pub fn verify(&self, digest: &Digest) -> Result<(), String> {
        match Digest::of_file(&self.path(digest)) {
            Ok(d) if d == *digest => Ok(()),
            Ok(d) => Err(format!("it hashes to {d}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The stored component with `digest`, measured again.
    ///
    /// # Errors
    ///
    /// Not stored, unreadable, or its bytes no longer hash to `digest`.
    pub fn get(&self, digest: &Digest) -> Result<Measured, MeasureError> {
        let m = Measured::read(&self.path(digest))?;
        m.verify(Some(digest))?;
        Ok(m)
    }

    /// Deletes every stored component whose digest is not in `keep`;
    /// returns how many.
    pub fn retain(&self, keep: &HashSet<Digest>) -> usize {
        self.retain_older(keep, std::time::Duration::ZERO)
    }

    /// [`ComponentStore::retain`] for files at least `grace` old (younger
    /// ones may be an upload whose module is not added yet), and removes
    /// temporary files a crash left (`.NAME.NONCE.tmp`) as old.
    pub fn retain_older(&self, keep: &HashSet<Digest>, grace: std::time::Duration) -> usize {
        let old = |path: &Path| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= grace)
        };
        self.entries()
            .into_iter()
            .filter(|(path, digest)| {
                let unused = match digest {
                    Some(d) => !keep.contains(d),
                    None => path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp")),
                };
                unused && old(path) && std::fs::remove_file(path).is_ok()
            })
            .count()
    }

    /// Every file in the store, with the digest its name claims (`None`
    /// for a name that is not one [`ComponentStore::path`] makes).
    pub fn entries(&self) -> Vec<(PathBuf, Option<Digest>)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| {
                let digest = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".wasm"))
                    .and_then(|n| n.replacen('-', ":", 1).parse::<Digest>().ok());
                (e.path(), digest)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(bytes: &[u8]) -> Measured {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.wasm");
        std::fs::write(&p, bytes).unwrap();
        Measured::read(&p).unwrap()
    }

    #[test]
    fn stored_once_read_back_measured() {
        let d = tempfile::tempdir().unwrap();
        let store = ComponentStore::open(d.path()).unwrap();
        let m = measured(b"component bytes");
        let p1 = store.put(&m).unwrap();
        let p2 = store.put(&m).unwrap();
        assert_eq!(p1, p2);
        assert!(p1.ends_with(format!("{}.wasm", m.digest.to_string().replace(':', "-"))));
        assert!(store.contains(&m.digest));
        assert_eq!(store.get(&m.digest).unwrap().bytes, m.bytes);
        // Altered on disk: refused, naming the file.
        std::fs::write(&p1, b"other bytes").unwrap();
        let e = store.get(&m.digest).unwrap_err().to_string();
        assert!(e.contains("does not match") && e.contains("sha256-"), "{e}");
    }

    /// A sweep after a change spares what is younger than its grace (an
    /// upload whose module is on its way) and removes what a crash left.
    #[test]
    fn a_sweep_spares_fresh_uploads_and_removes_crash_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let store = ComponentStore::open(d.path()).unwrap();
        let kept = measured(b"kept");
        let fresh = measured(b"fresh");
        store.put(&kept).unwrap();
        store.put(&fresh).unwrap();
        let tmp = d.path().join(DIR).join(".x.wasm.1234.tmp");
        std::fs::write(&tmp, b"half").unwrap();
        let keep: HashSet<Digest> = [kept.digest].into();
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(store.retain_older(&keep, hour), 0);
        assert!(store.contains(&fresh.digest) && tmp.exists());
        let old = std::time::SystemTime::now() - 2 * hour;
        for p in [store.path(&fresh.digest), tmp.clone()] {
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        assert_eq!(store.retain_older(&keep, hour), 2);
        assert!(!store.contains(&fresh.digest) && !tmp.exists());
        assert!(store.contains(&kept.digest));
    }

    #[test]
    fn retain_deletes_what_is_not_kept() {
        let d = tempfile::tempdir().unwrap();
        let store = ComponentStore::open(d.path()).unwrap();
        let (a, b) = (measured(b"a"), measured(b"b"));
        store.put(&a).unwrap();
        store.put(&b).unwrap();
        assert_eq!(store.retain(&HashSet::from([a.digest])), 1);
        assert!(store.contains(&a.digest) && !store.contains(&b.digest));
    }
}
