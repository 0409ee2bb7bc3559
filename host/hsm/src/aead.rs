//! One AEAD framing for everything edgeward seals (HSM key files, data keys
//! wrapped by the PAL, module data sealed through `workload.encrypt`):
//!
//! ```text
//! version (1 byte, 1) || nonce (12) || ciphertext || tag (16)
//! ```
//!
//! [`frame`] and [`parse`] are the framing alone (the PKCS#11 backend, whose
//! token does the GCM); [`SoftAead`] is AES-256-GCM in software with that
//! framing (the soft backend, the TPM backend's unsealed key, sealing), on
//! `ring` (AES-NI and carry-less multiplication where the CPU has them,
//! constant-time code otherwise).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroizing;

/// Version byte that starts every framed ciphertext.
pub const VERSION: u8 = 1;
/// Nonce length.
pub const NONCE_LEN: usize = 12;
/// Tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a framed ciphertext adds to its plaintext.
pub const OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// Why a framed ciphertext could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// No bytes at all.
    Empty,
    /// A version byte other than [`VERSION`].
    Version(u8),
    /// Shorter than a nonce and a tag.
    Truncated,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Empty => f.write_str("empty"),
            FrameError::Version(v) => write!(f, "unknown version {v} (expected {VERSION})"),
            FrameError::Truncated => f.write_str("truncated"),
        }
    }
}

/// Why [`SoftAead::open`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// The framing is wrong.
    Frame(FrameError),
    /// The tag does not verify (tampered, wrong key or associated data).
    Authentication,
}

/// `VERSION || nonce || ciphertext_and_tag`.
pub fn frame(nonce: &[u8; NONCE_LEN], ciphertext_and_tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext_and_tag.len());
    out.push(VERSION);
    out.extend_from_slice(nonce);
    out.extend_from_slice(ciphertext_and_tag);
    out
}

/// Splits a framed ciphertext into its nonce and `ciphertext || tag`.
///
/// # Errors
///
/// [`FrameError`] for an empty, unknown-version or truncated input.
pub fn parse(sealed: &[u8]) -> Result<(&[u8; NONCE_LEN], &[u8]), FrameError> {
    let Some((&version, rest)) = sealed.split_first() else {
        return Err(FrameError::Empty);
    };
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    if rest.len() < NONCE_LEN + TAG_LEN {
        return Err(FrameError::Truncated);
    }
    let (nonce, ct) = rest.split_at(NONCE_LEN);
    let nonce = nonce.try_into().map_err(|_| FrameError::Truncated)?;
    Ok((nonce, ct))
}

/// AES-256-GCM in software, with the framing above.
///
/// Nonces: a random 4-byte prefix and a 64-bit counter that starts at a
/// random value, per cipher instance (RFC 5116 section 3.2). Within one
/// instance they never repeat; two instances under the same key (two
/// processes) collide no more often than random 96-bit nonces would, and it
/// costs no system call per message.
pub struct SoftAead {
    cipher: LessSafeKey,
    prefix: [u8; 4],
    counter: AtomicU64,
}

impl fmt::Debug for SoftAead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SoftAead(..)")
    }
}

impl SoftAead {
    /// A cipher under a 32-byte key; `None` for any other length.
    pub fn new(key: &[u8]) -> Option<Self> {
        Some(Self::from_key(key.try_into().ok()?))
    }

    /// A cipher under `key`.
    pub fn from_key(key: &[u8; 32]) -> Self {
        let mut seed = [0u8; 12];
        // Without the OS random source a fixed start would risk nonce reuse
        // across processes: fall back to the clock and pid mixed by SHA-256.
        if getrandom::fill(&mut seed).is_err() {
            use sha2::Digest as _;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let h = sha2::Sha256::new()
                .chain_update(now.to_le_bytes())
                .chain_update(std::process::id().to_le_bytes())
                .finalize();
            seed.copy_from_slice(&h[..12]);
        }
        let mut prefix = [0u8; 4];
        prefix.copy_from_slice(&seed[..4]);
        let mut start = [0u8; 8];
        start.copy_from_slice(&seed[4..]);
        Self {
            cipher: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key)
                    .unwrap_or_else(|_| unreachable!("AES-256-GCM takes any 32-byte key")),
            ),
            prefix,
            counter: AtomicU64::new(u64::from_le_bytes(start)),
        }
    }

    fn next_nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        n[..4].copy_from_slice(&self.prefix);
        n[4..].copy_from_slice(&self.counter.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        n
    }

    /// Seals `plaintext` under the next nonce.
    ///
    /// # Errors
    ///
    /// When the input is too long for GCM (over 64 GiB).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, String> {
        let nonce = self.next_nonce();
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[1 + NONCE_LEN..],
            )
            .map_err(|_| "encryption failed".to_owned())?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens what [`SoftAead::seal`] (or any producer of this framing under
    /// the same key) sealed.
    ///
    /// # Errors
    ///
    /// [`OpenError`]: bad framing, or a tag that does not verify.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let (nonce, ct) = parse(sealed).map_err(OpenError::Frame)?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let len = self
            .cipher
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| OpenError::Authentication)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let a = SoftAead::new(&[7u8; 32]).unwrap();
        let b = SoftAead::new(&[8u8; 32]).unwrap();
        let sealed = a.seal(b"hello", b"aad").unwrap();
        assert_eq!(sealed.len(), 5 + OVERHEAD);
        assert_eq!(sealed[0], VERSION);
        assert_eq!(&a.open(&sealed, b"aad").unwrap()[..], b"hello");
        assert_eq!(a.open(&sealed, b"aaD"), Err(OpenError::Authentication));
        assert_eq!(b.open(&sealed, b"aad"), Err(OpenError::Authentication));
        let mut t = sealed.clone();
        *t.last_mut().unwrap() ^= 1;
        assert_eq!(a.open(&t, b"aad"), Err(OpenError::Authentication));
        assert_eq!(a.open(&[], b""), Err(OpenError::Frame(FrameError::Empty)));
        assert_eq!(
            a.open(&[2; 40], b""),
            Err(OpenError::Frame(FrameError::Version(2)))
        );
        assert_eq!(
            a.open(&sealed[..OVERHEAD - 1], b"aad"),
            Err(OpenError::Frame(FrameError::Truncated))
        );
        assert!(SoftAead::new(&[0u8; 16]).is_none());
        // Nonces never repeat within an instance.
        let n1 = parse(&a.seal(b"", b"").unwrap()).unwrap().0.to_owned();
        let n2 = parse(&a.seal(b"", b"").unwrap()).unwrap().0.to_owned();
        assert_ne!(n1, n2);
        // The framing alone agrees with the cipher's output.
        let (nonce, ct) = parse(&sealed).unwrap();
        assert_eq!(frame(nonce, ct), sealed);
    }
}
