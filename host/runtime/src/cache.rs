//! The compiled-artifact cache.
//!
//! `Component::deserialize` maps whatever bytes it is given as executable
//! code, so an entry is only ever deserialized after its MAC verifies under a
//! host secret that never leaves the state directory. An entry is keyed by
//! the component's digest and the engine's compatibility hash; the MAC binds
//! both, so an entry copied under another name is refused too.
//!
//! The MAC is keyed BLAKE3 (a PRF under a 256-bit key, 128-bit security as a
//! MAC) over the domain, the digest, the engine and the payload's plain
//! BLAKE3 hash: hash-then-MAC, secure as long as BLAKE3-256 is collision
//! resistant (128 bits), and the plain hash is the one the measurement log
//! takes anyway, so an entry is hashed once per load, not twice. It runs at
//! several GB/s with SIMD, where HMAC-SHA256 alone cost more than
//! deserializing the entry (see docs/performance.md). The tag is compared
//! in constant time.
//!
//! File layout: `MAGIC (8) || keyed-BLAKE3 (32) || serialized component`.
//! The format's domain is part of the engine's compatibility hash, so the
//! entries of another format are another name: never read, and collected
//! as an older engine's.
//!
//! Loading copies the serialized component once, into a sealed memfd
//! (`F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW`, then `F_SEAL_SEAL`),
//! authenticates the sealed bytes, and has wasmtime map that memfd: the
//! code that runs is the code that was authenticated, nobody can change it
//! afterwards, and it is in memory once (reading it into a buffer that
//! wasmtime then copies held it twice: 2x the peak for a 38 MB Python
//! component). Without memfd or /proc, the entry is read into memory and
//! deserialized from there, as before.
//!
//! The key: whoever can write entries and knows the key can make the daemon
//! map their bytes as code. On the soft backend it is `cache.key` in the
//! state dir, beside the soft HSM's own keys (read+write access to the
//! state dir is already everything there). On TPM and PKCS#11 it is
//! `cache.key.wrapped`: sealed by the HSM's AEAD key `cache-key`, unwrapped
//! once by the daemon ([`ArtifactCache::unlock`]) and held in memory, so a
//! copy of the state dir, or write access to it, does not give it. Until it
//! is unlocked the cache is bypassed (everything compiles).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;
use zeroize::Zeroizing;

use edgeward_hsm::measure::{Digest, hex};
use edgeward_hsm::state;

const MAGIC: &[u8; 8] = b"EWCWASM3";
const MAC_LEN: usize = 32;
const DOMAIN: &[u8] = b"edgeward compiled-artifact cache v3\0";
/// What an entry's bytes are read through while they are hashed: small
/// enough to stay in the core's cache, allocated once per load.
const READ_CHUNK: usize = 64 * 1024;
/// A serialized component is rarely more than a few times its source; this
/// bounds what a planted file can make the daemon read.
const MAX_ENTRY_SIZE: u64 = 1 << 30;

/// Why a cache entry was not used. Every case leads to a recompile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Shorter than the header, or the wrong magic.
    Malformed,
    /// The MAC did not verify: tampered, truncated, or from another host.
    BadMac,
    /// The MAC verified but wasmtime refused the artifact.
    Deserialize,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::Malformed => "malformed header",
            Rejection::BadMac => "authentication failed (tampered, truncated or foreign)",
            Rejection::Deserialize => "authenticated but not loadable by this engine",
        })
    }
}

/// What a cache lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// An authenticated entry, deserialized, with the BLAKE3 of its
    /// payload (the native code that was authenticated and mapped): what
    /// the measurement log records for it.
    Hit(Component, [u8; 32]),
    /// No entry.
    Miss,
    /// An entry existed but was refused and removed.
    Rejected(Rejection),
    /// An authenticated entry whose component does not fit this engine's
    /// pooling-allocator limits (a run with lower ceilings than the one
    /// that compiled it): kept, since it is sound; the message names the
    /// limit.
    Unfit(String),
}

/// Whether a compile or deserialize error says the component does not fit
/// the pooling allocator's limits (core instances, memories, tables).
pub fn exceeds_pool_limits(e: &str) -> bool {
    e.contains("pooling allocator")
}

/// The compiled-artifact cache of one engine configuration.
pub struct ArtifactCache {
    dir: PathBuf,
    state_dir: PathBuf,
    key: std::sync::OnceLock<Zeroizing<[u8; 32]>>,
    compat: [u8; 32],
}

/// Where the cache's MAC key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKey {
    /// `cache.key` in the state dir (the soft backend).
    StateDir,
    /// Wrapped by the HSM (TPM, PKCS#11): [`ArtifactCache::unlock`].
    Hsm,
}

/// The HSM's AEAD key that wraps the cache key.
pub const WRAPPING_KEY: &str = "cache-key";
const WRAP_AAD: &[u8] = b"edgeward compiled-artifact cache key v1";

impl fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactCache")
            .field("dir", &self.dir)
            .field("compat", &hex(&self.compat[..8]))
            .finish_non_exhaustive()
    }
}

/// Feeds `Hash` output into SHA-256 so the engine's compatibility hash is a
/// stable 32-byte value.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        let d = self.0.clone().finalize();
        u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl ArtifactCache {
    /// Opens (creating if needed) the cache under `state_dir/cache`, with its
    /// MAC key at `state_dir/cache.key`.
    ///
    /// # Errors
    ///
    /// I/O errors naming the path.
    pub fn open(state_dir: &Path, engine: &Engine, source: CacheKey) -> io::Result<Self> {
        let dir = state_dir.join("cache");
        state::ensure_private_dir(&dir)?;
        let key = std::sync::OnceLock::new();
        if source == CacheKey::StateDir {
            let _ = key.set(state::load_or_regenerate_secret(
                &state_dir.join("cache.key"),
            )?);
        }
        let mut h = ShaHasher(Sha256::new());
        h.0.update(DOMAIN);
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(Self {
            dir,
            state_dir: state_dir.to_owned(),
            key,
            compat: h.0.finalize().into(),
        })
    }

    /// Unwraps the key with `hsm` (blocking), making one on first use; a
    /// wrapped key this HSM cannot open (another device's, or altered) is
    /// replaced, so entries made under it are rebuilt. A clear `cache.key`
    /// left from before is deleted: whoever read it could forge entries.
    ///
    /// # Errors
    ///
    /// The HSM cannot create its wrapping key or wrap a new key, or the
    /// file cannot be written; the cache then stays bypassed.
    pub fn unlock(&self, hsm: &dyn edgeward_hsm::Hsm) -> Result<(), String> {
        if self.key.get().is_some() {
            return Ok(());
        }
        let wrapped = self.state_dir.join("cache.key.wrapped");
        hsm.aead_key(WRAPPING_KEY)
            .map_err(|e| format!("cannot create the cache's wrapping key: {e}"))?;
        let existing = match std::fs::read(&wrapped) {
            Ok(ct) => match hsm.decrypt(WRAPPING_KEY, &ct, WRAP_AAD) {
                Ok(k) if k.len() == 32 => {
                    let mut key = Zeroizing::new([0u8; 32]);
                    key.copy_from_slice(&k);
                    Some(key)
                }
                Ok(_)
                | Err(edgeward_hsm::HsmError {
                    kind: edgeward_hsm::ErrorKind::AuthenticationFailed,
                    ..
                }) => {
                    tracing::warn!(path = %wrapped.display(), "the compiled-cache key does not unwrap with this HSM (another device's, or altered): a new one is made and cached code is rebuilt");
                    None
                }
                Err(e) => return Err(format!("cannot unwrap the compiled-cache key: {e}")),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", wrapped.display())),
        };
        let key = match existing {
            Some(k) => k,
            None => {
                let mut key = Zeroizing::new([0u8; 32]);
                getrandom::fill(key.as_mut()).map_err(|e| format!("no randomness: {e}"))?;
                let ct = hsm
                    .encrypt(WRAPPING_KEY, key.as_ref(), WRAP_AAD)
                    .map_err(|e| format!("cannot wrap the compiled-cache key: {e}"))?;
                state::write_atomic(&wrapped, &ct)
                    .map_err(|e| format!("{}: {e}", wrapped.display()))?;
                key
            }
        };
        let clear = self.state_dir.join("cache.key");
        match std::fs::remove_file(&clear) {
            Ok(()) => {
                tracing::info!(path = %clear.display(), "removed the clear compiled-cache key: the key is now wrapped by the HSM")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %clear.display(), error = %e, "cannot remove the clear compiled-cache key")
            }
        }
        let _ = self.key.set(key);
        Ok(())
    }

    /// Whether the key is at hand (else lookups miss and nothing is stored).
    pub fn unlocked(&self) -> bool {
        self.key.get().is_some()
    }

    /// Where the entry for `digest` lives.
    pub fn entry_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}.cwasm", digest.hex(), hex(&self.compat[..8])))
    }

    /// The tag of an entry for `digest` whose payload's plain BLAKE3 hash
    /// is `plain`: keyed over the domain, the digest, the engine and it.
    fn mac(&self, digest: &Digest, plain: &blake3::Hash) -> blake3::Hash {
        // Only called once `unlocked()`; a locked cache never gets here.
        let zero = Zeroizing::new([0u8; 32]);
        let key = self.key.get().unwrap_or(&zero);
        let mut mac = blake3::Hasher::new_keyed(key);
        mac.update(DOMAIN);
        mac.update(digest.as_bytes());
        mac.update(&self.compat);
        mac.update(plain.as_bytes());
        mac.finalize()
    }

    /// Looks up `digest`. An entry that fails authentication or loading is
    /// deleted (and logged) so it is rebuilt, never loaded.
    pub fn load(&self, engine: &Engine, digest: &Digest) -> Lookup {
        if !self.unlocked() {
            return Lookup::Miss;
        }
        let path = self.entry_path(digest);
        match self.load_sealed(engine, digest, &path) {
            Some(lookup) => lookup,
            None => self.load_in_memory(engine, digest, &path),
        }
    }

    /// The sealed-memfd path (see the module docs); `None` when this system
    /// has no memfd or no /proc, so the caller reads the entry into memory.
    fn load_sealed(&self, engine: &Engine, digest: &Digest, path: &Path) -> Option<Lookup> {
        use rustix::fs::{MemfdFlags, SealFlags};
        use std::os::fd::AsRawFd as _;
        let proc_fd = Path::new("/proc/self/fd");
        if !proc_fd.is_dir() {
            return None;
        }
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Some(Lookup::Miss),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read cache entry; recompiling");
                return Some(Lookup::Miss);
            }
        };
        let memfd = rustix::fs::memfd_create(
            c"edgeward-cwasm",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .ok()?;
        let mut memfd = std::fs::File::from(memfd);
        let mut head = [0u8; MAGIC.len() + MAC_LEN];
        match file.read_exact(&mut head) {
            Ok(()) if head[..MAGIC.len()] == MAGIC[..] => {}
            Ok(()) => return Some(self.reject(path, Rejection::Malformed)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Some(self.reject(path, Rejection::Malformed));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read cache entry; recompiling");
                return Some(Lookup::Miss);
            }
        }
        let copied = io::copy(&mut (&mut file).take(MAX_ENTRY_SIZE + 1), &mut memfd);
        match copied {
            Ok(n) if n > MAX_ENTRY_SIZE => return Some(self.reject(path, Rejection::Malformed)),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot copy cache entry; recompiling");
                return Some(Lookup::Miss);
            }
        }
        drop(file);
        let seals = SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL;
        if let Err(e) = rustix::fs::fcntl_add_seals(&memfd, seals) {
            tracing::debug!(error = %e, "cannot seal a memfd; reading the cache entry into memory");
            return None;
        }
        // Authenticate the sealed bytes: what wasmtime maps below. Their
        // plain hash is the measurement log's, and what the tag covers.
        let mut plain = blake3::Hasher::new();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut offset = 0u64;
        loop {
            match rustix::io::pread(&memfd, &mut buf[..], offset) {
                Ok(0) => break,
                Ok(n) => {
                    plain.update(&buf[..n]);
                    offset += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a sealed cache entry back; recompiling");
                    return Some(Lookup::Miss);
                }
            }
        }
        let tag: [u8; MAC_LEN] = head[MAGIC.len()..].try_into().ok()?;
        let plain = plain.finalize();
        if let Err(why) = self.check_tag(digest, &plain, tag) {
            return Some(self.reject(path, why));
        }
        let sealed = proc_fd.join(memfd.as_raw_fd().to_string());
        // SAFETY: `Component::deserialize_file` maps the file as executable
        // code and trusts it to be a wasmtime artifact. The memfd holds
        // exactly the bytes whose MAC under our private host key just
        // verified, and only this process's `store` (fed by wasmtime's own
        // serializer) produces such a MAC: bytes we compiled ourselves, for
        // this engine and digest. It was sealed against writes, shrinking
        // and growing before it was authenticated, and lives only in this
        // process's descriptor table, so the mapping cannot change.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine, &sealed) };
        Some(self.deserialized(path, loaded, *plain.as_bytes()))
    }

    /// The entry read into memory, authenticated there, and deserialized
    /// from that buffer.
    fn load_in_memory(&self, engine: &Engine, digest: &Digest, path: &Path) -> Lookup {
        let bytes = match read_bounded(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read cache entry; recompiling");
                return Lookup::Miss;
            }
        };
        match self.authenticate(digest, &bytes) {
            Err(why) => self.reject(path, why),
            Ok((payload, plain)) => {
                // SAFETY: `Component::deserialize` trusts its input to be a
                // wasmtime artifact. `payload` is exactly the buffer whose
                // MAC under our private host key just verified, and only this
                // process's `store` (fed by wasmtime's own serializer) ever
                // produces such a MAC, so these are bytes we compiled
                // ourselves, for this engine configuration and digest. The
                // buffer is not re-read from disk after verification.
                #[allow(unsafe_code)]
                let loaded = unsafe { Component::deserialize(engine, payload) };
                self.deserialized(path, loaded, *plain.as_bytes())
            }
        }
    }

    /// A deserialized entry, or why not: one that does not fit this
    /// engine's pool is kept, any other failure refused (and removed).
    fn deserialized(
        &self,
        path: &Path,
        loaded: wasmtime::Result<Component>,
        plain: [u8; 32],
    ) -> Lookup {
        match loaded {
            Ok(c) => Lookup::Hit(c, plain),
            Err(e) if exceeds_pool_limits(&format!("{e:#}")) => Lookup::Unfit(format!("{e:#}")),
            Err(e) => {
                tracing::warn!(error = %e, "authenticated cache entry failed to deserialize");
                self.reject(path, Rejection::Deserialize)
            }
        }
    }

    /// Re-measures the entry for `digest` without loading it: `Ok(false)`
    /// if there is none (it is rebuilt when needed), an error if it fails
    /// authentication (it is then deleted, so it is rebuilt, never loaded).
    ///
    /// # Errors
    ///
    /// The entry is malformed or fails authentication.
    pub fn verify(&self, digest: &Digest) -> Result<bool, Rejection> {
        if !self.unlocked() {
            return Ok(false);
        }
        let path = self.entry_path(digest);
        let bytes = match read_bounded(&path) {
            Ok(b) => b,
            Err(_) => return Ok(false),
        };
        match self.authenticate(digest, &bytes) {
            Ok(_) => Ok(true),
            Err(why) => {
                self.reject(&path, why);
                Err(why)
            }
        }
    }

    /// The payload of an entry's `bytes` and its plain hash, if its tag
    /// verifies.
    fn authenticate<'a>(
        &self,
        digest: &Digest,
        bytes: &'a [u8],
    ) -> Result<(&'a [u8], blake3::Hash), Rejection> {
        if bytes.len() < MAGIC.len() + MAC_LEN || &bytes[..MAGIC.len()] != MAGIC {
            return Err(Rejection::Malformed);
        }
        let (tag, payload) = bytes[MAGIC.len()..].split_at(MAC_LEN);
        let tag: [u8; MAC_LEN] = tag.try_into().map_err(|_| Rejection::Malformed)?;
        let plain = blake3::hash(payload);
        self.check_tag(digest, &plain, tag)?;
        Ok((payload, plain))
    }

    /// Whether `tag` is this cache's for `digest` and a payload hashing to
    /// `plain` (compared in constant time: `blake3::Hash` equality is).
    fn check_tag(
        &self,
        digest: &Digest,
        plain: &blake3::Hash,
        tag: [u8; MAC_LEN],
    ) -> Result<(), Rejection> {
        if self.mac(digest, plain) == blake3::Hash::from_bytes(tag) {
            Ok(())
        } else {
            Err(Rejection::BadMac)
        }
    }

    fn reject(&self, path: &Path, why: Rejection) -> Lookup {
        tracing::warn!(path = %path.display(), reason = %why, "refusing compiled-artifact cache entry; it will be recompiled");
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove refused cache entry");
        }
        Lookup::Rejected(why)
    }

    /// Deletes entries at least `grace` old that no digest in `keep` names,
    /// or that an engine other than this one made (an older edgeward's),
    /// and temporary files a crash left; returns how many.
    pub fn retain(
        &self,
        keep: &std::collections::HashSet<Digest>,
        grace: std::time::Duration,
    ) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let keep_names: std::collections::HashSet<PathBuf> =
            keep.iter().map(|d| self.entry_path(d)).collect();
        dir.flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let ours =
                    name.ends_with(".cwasm") || (name.starts_with('.') && name.ends_with(".tmp"));
                let old = std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= grace);
                ours && old && !keep_names.contains(p) && std::fs::remove_file(p).is_ok()
            })
            .count()
    }

    /// Serializes `component` and writes it, authenticated, for `digest`.
    ///
    /// # Errors
    ///
    /// Serialization or I/O errors; a failed write leaves no partial entry.
    pub fn store(&self, digest: &Digest, component: &Component) -> anyhow::Result<()> {
        if !self.unlocked() {
            return Ok(());
        }
        let payload = component.serialize()?;
        let tag = self.mac(digest, &blake3::hash(&payload));
        let mut file = Vec::with_capacity(MAGIC.len() + MAC_LEN + payload.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(tag.as_bytes());
        file.extend_from_slice(&payload);
        state::write_atomic(&self.entry_path(digest), &file)?;
        Ok(())
    }
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len().min(MAX_ENTRY_SIZE);
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(MAX_ENTRY_SIZE).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(component)`: the smallest component there is.
    const EMPTY: &[u8] = b"\0asm\x0d\x00\x01\x00";

    fn stored(dir: &Path) -> (Engine, ArtifactCache, Digest) {
        let engine = Engine::default();
        let cache = ArtifactCache::open(dir, &engine, CacheKey::StateDir).expect("open");
        let digest = Digest::of(EMPTY);
        let c = Component::new(&engine, EMPTY).expect("compile");
        cache.store(&digest, &c).expect("store");
        (engine, cache, digest)
    }

    /// Entries no kept digest names, and an older engine's, are swept.
    #[test]
    fn unreferenced_and_stale_entries_are_swept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_engine, cache, digest) = stored(tmp.path());
        let path = cache.entry_path(&digest);
        let stale = cache
            .dir
            .join(format!("{}-0000000000000000.cwasm", digest.hex()));
        std::fs::copy(&path, &stale).expect("copy");
        let keep: std::collections::HashSet<Digest> = [digest].into();
        assert_eq!(cache.retain(&keep, std::time::Duration::ZERO), 1);
        assert!(path.exists() && !stale.exists());
        assert_eq!(
            cache.retain(&std::collections::HashSet::new(), std::time::Duration::ZERO),
            1
        );
        assert!(!path.exists());
    }

    /// Both ways of loading (the sealed memfd, and the buffer it falls back
    /// to without /proc) load a good entry and refuse and remove a tampered
    /// one.
    #[test]
    fn sealed_and_in_memory_loads_agree() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (engine, cache, digest) = stored(tmp.path());
        let path = cache.entry_path(&digest);
        let good = std::fs::read(&path).expect("entry");
        // Each gives the payload's plain hash (the measurement log's).
        let plain = *blake3::hash(&good[MAGIC.len() + MAC_LEN..]).as_bytes();
        assert!(matches!(
            cache.load_sealed(&engine, &digest, &path),
            Some(Lookup::Hit(_, p)) if p == plain
        ));
        assert!(matches!(
            cache.load_in_memory(&engine, &digest, &path),
            Lookup::Hit(_, p) if p == plain
        ));
        // The tag is bound to the digest it was stored under.
        let other = Digest::of(b"another component");
        std::fs::copy(&path, cache.entry_path(&other)).expect("copy");
        assert!(matches!(
            cache.load(&engine, &other),
            Lookup::Rejected(Rejection::BadMac)
        ));
        for (at, why) in [
            (0, Rejection::Malformed),
            (MAGIC.len() + 3, Rejection::BadMac),
            (good.len() - 1, Rejection::BadMac),
        ] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            std::fs::write(&path, &bad).expect("tamper");
            match cache.load_sealed(&engine, &digest, &path) {
                Some(Lookup::Rejected(w)) => assert_eq!(w, why, "sealed, byte {at}"),
                _ => panic!("sealed: byte {at} flipped was not refused"),
            }
            assert!(!path.exists(), "a refused entry is removed");
            std::fs::write(&path, &bad).expect("tamper");
            match cache.load_in_memory(&engine, &digest, &path) {
                Lookup::Rejected(w) => assert_eq!(w, why, "in memory, byte {at}"),
                _ => panic!("in memory: byte {at} flipped was not refused"),
            }
            assert!(!path.exists(), "a refused entry is removed");
        }
        // Truncated to its header, or to less.
        for len in [MAGIC.len() + MAC_LEN, 5] {
            std::fs::write(&path, &good[..len]).expect("truncate");
            assert!(matches!(cache.load(&engine, &digest), Lookup::Rejected(_)));
        }
        assert!(matches!(cache.load(&engine, &digest), Lookup::Miss));
    }
}
