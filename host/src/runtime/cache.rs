//! The compiled-artifact cache.
//!
//! `Component::deserialize` maps whatever bytes it is given as executable
//! code, so an entry is only ever deserialized after its MAC verifies under a
//! host secret that never leaves the state directory. An entry is keyed by
//! the component's digest and the engine's compatibility hash; the MAC binds
//! both, so an entry copied under another name is refused too.
//!
//! The MAC is keyed BLAKE3 (a PRF under a 256-bit key, 128-bit security as a
//! MAC): it runs at several GB/s with SIMD, where HMAC-SHA256 alone cost more
//! than deserializing the entry (see docs/performance.md). The tag is
//! compared in constant time.
//!
//! File layout: `MAGIC (8) || keyed-BLAKE3 (32) || serialized component`.
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

use crate::measure::{Digest, hex};
use crate::state;

const MAGIC: &[u8; 8] = b"EWCWASM2";
const MAC_LEN: usize = 32;
const DOMAIN: &[u8] = b"edgeward compiled-artifact cache v2\0";
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
    /// An authenticated entry, deserialized.
    Hit(Component),
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
    pub fn unlock(&self, hsm: &dyn crate::hsm::Hsm) -> Result<(), String> {
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
                | Err(crate::hsm::HsmError {
                    kind: crate::hsm::ErrorKind::AuthenticationFailed,
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

    fn mac(&self, digest: &Digest, payload: &[u8]) -> blake3::Hash {
        // Only called once `unlocked()`; a locked cache never gets here.
        let zero = Zeroizing::new([0u8; 32]);
        let key = self.key.get().unwrap_or(&zero);
        let mut mac = blake3::Hasher::new_keyed(key);
        mac.update(DOMAIN);
        mac.update(digest.as_bytes());
        mac.update(&self.compat);
        mac.update(payload);
        mac.finalize()
    }

    /// Looks up `digest`. An entry that fails authentication or loading is
    /// deleted (and logged) so it is rebuilt, never loaded.
    pub fn load(&self, engine: &Engine, digest: &Digest) -> Lookup {
        if !self.unlocked() {
            return Lookup::Miss;
        }
        let path = self.entry_path(digest);
        let bytes = match read_bounded(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read cache entry; recompiling");
                return Lookup::Miss;
            }
        };
        match self.authenticate(digest, &bytes) {
            Err(why) => self.reject(&path, why),
            Ok(payload) => {
                // SAFETY: `Component::deserialize` trusts its input to be a
                // wasmtime artifact. `payload` is exactly the buffer whose
                // MAC under our private host key just verified, and only this
                // process's `store` (fed by wasmtime's own serializer) ever
                // produces such a MAC, so these are bytes we compiled
                // ourselves, for this engine configuration and digest. The
                // buffer is not re-read from disk after verification.
                #[allow(unsafe_code)]
                match unsafe { Component::deserialize(engine, payload) } {
                    Ok(c) => Lookup::Hit(c),
                    Err(e) if exceeds_pool_limits(&format!("{e:#}")) => {
                        Lookup::Unfit(format!("{e:#}"))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "authenticated cache entry failed to deserialize");
                        self.reject(&path, Rejection::Deserialize)
                    }
                }
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

    fn authenticate<'a>(&self, digest: &Digest, bytes: &'a [u8]) -> Result<&'a [u8], Rejection> {
        if bytes.len() < MAGIC.len() + MAC_LEN || &bytes[..MAGIC.len()] != MAGIC {
            return Err(Rejection::Malformed);
        }
        let (tag, payload) = bytes[MAGIC.len()..].split_at(MAC_LEN);
        let tag: [u8; MAC_LEN] = tag.try_into().map_err(|_| Rejection::Malformed)?;
        // `blake3::Hash` equality is constant-time.
        if self.mac(digest, payload) != blake3::Hash::from_bytes(tag) {
            return Err(Rejection::BadMac);
        }
        Ok(payload)
    }

    fn reject(&self, path: &Path, why: Rejection) -> Lookup {
        tracing::warn!(path = %path.display(), reason = %why, "refusing compiled-artifact cache entry; it will be recompiled");
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove refused cache entry");
        }
        Lookup::Rejected(why)
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
        let tag = self.mac(digest, &payload);
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
