//! One AEAD framing for everything edgeward seals (HSM key files, data keys
//! wrapped by the PAL, module data sealed through `workload.encrypt`):
//!
//! ```text
//! version (1 byte, 1) || nonce (12) || ciphertext || tag (16)
//! ```
//!
//! [`frame`] and [`parse`] are the framing alone (the PKCS#11 backend, whose
//! token does the GCM); [`SoftAead`] is AES-256-GCM in software with that
//! framing (the soft backend, the TPM backend's unsealed key, sealing).

use std::fmt;

use aes_gcm::aead::{AeadInPlace as _, KeyInit as _};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
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

/// A fresh random nonce.
///
/// # Errors
///
/// When the OS random source fails.
pub fn random_nonce() -> Result<[u8; NONCE_LEN], String> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| format!("random: {e}"))?;
    Ok(nonce)
}

/// AES-256-GCM in software, with the framing above.
pub struct SoftAead {
    cipher: Aes256Gcm,
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
        Self {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// Seals `plaintext` under a fresh random nonce.
    ///
    /// # Errors
    ///
    /// When the OS random source fails.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, String> {
        let nonce = random_nonce()?;
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut out[1 + NONCE_LEN..])
            .map_err(|_| "encryption failed".to_owned())?;
        out.extend_from_slice(&tag);
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
        let (body, tag) = ct.split_at(ct.len() - TAG_LEN);
        let mut buf = Zeroizing::new(body.to_vec());
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                aad,
                &mut buf,
                Tag::from_slice(tag),
            )
            .map_err(|_| OpenError::Authentication)?;
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
        // The framing alone agrees with the cipher's output.
        let (nonce, ct) = parse(&sealed).unwrap();
        assert_eq!(frame(nonce, ct), sealed);
    }
}
