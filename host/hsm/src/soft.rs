//! The `soft` backend: keys in files under `<state>/hsm` (directory 0700,
//! files 0600), each sealed with AES-256-GCM under a key-encryption key
//! (`<state>/hsm/kek`) and bound by associated data to its id and kind, so a
//! key file renamed or swapped for another is refused. The measurement
//! register is a SHA-256 hash chain persisted in `<state>/hsm/register`
//! with the id of the boot it belongs to: like a PCR, it reads zero again
//! after a reboot (a value from another boot, or from before registers
//! were kept per boot, counts as reset). Quotes are ES256 signatures over
//! [`super::soft_quote_message`].
//!
//! This is the development and default backend. It protects keys at rest
//! against copying of single files, not against an attacker who can read
//! the whole state directory: use `tpm` or `pkcs11` for that.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use p256::ecdsa::{DerSignature, SigningKey, signature::hazmat::PrehashSigner};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use zeroize::Zeroizing;

use super::aead::{OpenError, SoftAead};
use super::{
    ErrorKind, Hsm, HsmError, KeyInfo, KeyKind, Op, Quote, Result, check_decrypt_input,
    check_encrypt_input, check_id, check_nonce, extend_chain, soft_quote_message,
};
use crate::state;

const BACKEND: &str = "soft";
/// What to do when the key-encryption key is damaged.
const KEK_RECOVERY: &str = "every soft HSM key is sealed under it. Restore hsm/kek from a backup of the state directory; or, to start over and lose every soft key (the device CA, the JWT authority, the master key and with it all sealed module data), remove the state directory's hsm/ and identity/ directories";

/// Software keys in the state directory.
pub struct SoftHsm {
    dir: PathBuf,
    kek: SoftAead,
    signing: Mutex<HashMap<String, Arc<SigningKey>>>,
    aead: Mutex<HashMap<String, Arc<SoftAead>>>,
    register: Mutex<()>,
}

impl fmt::Debug for SoftHsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftHsm")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn err(op: Op, key: Option<&str>, kind: ErrorKind) -> HsmError {
    HsmError::new(BACKEND, op, key, kind)
}

fn io_err(op: Op, key: Option<&str>, path: &Path, e: &io::Error) -> HsmError {
    err(
        op,
        key,
        ErrorKind::Backend(format!("{}: {e}", path.display())),
    )
}

fn ext(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::EcdsaP256 => "p256",
        KeyKind::Aes256Gcm => "aead",
    }
}

impl SoftHsm {
    /// Opens (creating if needed) the soft HSM under `state_dir/hsm`.
    ///
    /// # Errors
    ///
    /// When the directory or key-encryption key cannot be created or read.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("hsm");
        let keys = dir.join("keys");
        state::ensure_private_dir(&keys).map_err(|e| io_err(Op::ListKeys, None, &keys, &e))?;
        let kek_path = dir.join("kek");
        let kek = state::load_or_create_secret(&kek_path, KEK_RECOVERY)
            .map_err(|e| io_err(Op::ListKeys, None, &kek_path, &e))?;
        Ok(Self {
            kek: SoftAead::new(kek.as_ref())
                .ok_or_else(|| err(Op::ListKeys, None, ErrorKind::Backend("bad KEK".into())))?,
            dir,
            signing: Mutex::default(),
            aead: Mutex::default(),
            register: Mutex::new(()),
        })
    }

    fn key_path(&self, id: &str, kind: KeyKind) -> PathBuf {
        self.dir.join("keys").join(format!("{id}.{}", ext(kind)))
    }

    fn key_aad(id: &str, kind: KeyKind) -> Vec<u8> {
        format!("edgeward soft key v1\0{kind}\0{id}").into_bytes()
    }

    /// Reads and unseals a key file; `Ok(None)` if absent.
    fn read_key(&self, op: Op, id: &str, kind: KeyKind) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let other = match kind {
            KeyKind::EcdsaP256 => KeyKind::Aes256Gcm,
            KeyKind::Aes256Gcm => KeyKind::EcdsaP256,
        };
        let path = self.key_path(id, kind);
        match std::fs::read(&path) {
            Ok(sealed) => self
                .kek
                .open(&sealed, &Self::key_aad(id, kind))
                .map(Some)
                .map_err(|_: OpenError| err(op, Some(id), ErrorKind::AuthenticationFailed)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.key_path(id, other).exists() {
                    Err(err(op, Some(id), ErrorKind::WrongKeyKind))
                } else {
                    Ok(None)
                }
            }
            Err(e) => Err(io_err(op, Some(id), &path, &e)),
        }
    }

    /// Seals and writes a new key file unless one appeared meanwhile (another
    /// process won the race): then the existing one is returned.
    fn create_key(
        &self,
        op: Op,
        id: &str,
        kind: KeyKind,
        secret: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let sealed = self
            .kek
            .seal(secret, &Self::key_aad(id, kind))
            .map_err(|m| err(op, Some(id), ErrorKind::Backend(m)))?;
        let path = self.key_path(id, kind);
        if state::create_only(&path, &sealed).map_err(|e| io_err(op, Some(id), &path, &e))? {
            return Ok(Zeroizing::new(secret.to_vec()));
        }
        self.read_key(op, id, kind)?.ok_or_else(|| {
            err(
                op,
                Some(id),
                ErrorKind::Backend("key vanished while being created".into()),
            )
        })
    }

    fn load_signing(&self, op: Op, id: &str, create: bool) -> Result<Arc<SigningKey>> {
        check_id(BACKEND, op, id)?;
        let mut cache = self
            .signing
            .lock()
            .map_err(|_| err(op, Some(id), ErrorKind::Backend("lock poisoned".into())))?;
        if let Some(k) = cache.get(id) {
            return Ok(k.clone());
        }
        let der = match self.read_key(op, id, KeyKind::EcdsaP256)? {
            Some(der) => der,
            None if create => {
                let key = super::random_signing_key()
                    .map_err(|m| err(op, Some(id), ErrorKind::Backend(m)))?;
                let der = key
                    .to_pkcs8_der()
                    .map_err(|e| err(op, Some(id), ErrorKind::Backend(format!("encode: {e}"))))?;
                self.create_key(op, id, KeyKind::EcdsaP256, der.as_bytes())?
            }
            None => return Err(err(op, Some(id), ErrorKind::KeyNotFound)),
        };
        let key = SigningKey::from_pkcs8_der(&der)
            .map_err(|_| err(op, Some(id), ErrorKind::AuthenticationFailed))?;
        let key = Arc::new(key);
        cache.insert(id.to_owned(), key.clone());
        Ok(key)
    }

    fn load_aead(&self, op: Op, id: &str, create: bool) -> Result<Arc<SoftAead>> {
        check_id(BACKEND, op, id)?;
        let mut cache = self
            .aead
            .lock()
            .map_err(|_| err(op, Some(id), ErrorKind::Backend("lock poisoned".into())))?;
        if let Some(k) = cache.get(id) {
            return Ok(k.clone());
        }
        let raw = match self.read_key(op, id, KeyKind::Aes256Gcm)? {
            Some(raw) => raw,
            None if create => {
                let mut fresh = Zeroizing::new([0u8; 32]);
                getrandom::fill(fresh.as_mut())
                    .map_err(|e| err(op, Some(id), ErrorKind::Backend(format!("random: {e}"))))?;
                self.create_key(op, id, KeyKind::Aes256Gcm, fresh.as_ref())?
            }
            None => return Err(err(op, Some(id), ErrorKind::KeyNotFound)),
        };
        let cipher = SoftAead::new(&raw)
            .ok_or_else(|| err(op, Some(id), ErrorKind::AuthenticationFailed))?;
        let cipher = Arc::new(cipher);
        cache.insert(id.to_owned(), cipher.clone());
        Ok(cipher)
    }

    fn register_path(&self) -> PathBuf {
        self.dir.join("register")
    }

    /// The register: its value if it was extended during this boot, else
    /// zero. The file holds the 32-byte value, then the boot id.
    fn read_register_file(&self) -> Result<[u8; 32]> {
        let path = self.register_path();
        let boot =
            crate::boot_id().map_err(|e| err(Op::ReadRegister, None, ErrorKind::Unavailable(e)))?;
        match std::fs::read(&path) {
            Ok(b) if b.len() > 32 && b[32..] == *boot.as_bytes() => {
                let mut v = [0u8; 32];
                v.copy_from_slice(&b[..32]);
                Ok(v)
            }
            // Another boot's (or from before boots were recorded, or cut
            // short by a power loss, which is a new boot): reset.
            Ok(_) => Ok([0u8; 32]),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok([0u8; 32]),
            Err(e) => Err(io_err(Op::ReadRegister, None, &path, &e)),
        }
    }
}

fn sec1(key: &SigningKey) -> Vec<u8> {
    key.verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec()
}

impl Hsm for SoftHsm {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn signing_key(&self, id: &str) -> Result<Vec<u8>> {
        Ok(sec1(self.load_signing(Op::SigningKey, id, true)?.as_ref()))
    }

    fn public_key(&self, id: &str) -> Result<Vec<u8>> {
        Ok(sec1(self.load_signing(Op::PublicKey, id, false)?.as_ref()))
    }

    fn sign_digest(&self, id: &str, digest: &[u8; 32]) -> Result<Vec<u8>> {
        let key = self.load_signing(Op::Sign, id, false)?;
        let sig: p256::ecdsa::Signature = key
            .sign_prehash(digest)
            .map_err(|e| err(Op::Sign, Some(id), ErrorKind::Backend(e.to_string())))?;
        let der: DerSignature = sig.to_der();
        Ok(der.as_bytes().to_vec())
    }

    fn aead_key(&self, id: &str) -> Result<()> {
        self.load_aead(Op::AeadKey, id, true).map(|_| ())
    }

    fn encrypt(&self, id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        check_encrypt_input(BACKEND, id, plaintext, aad)?;
        let cipher = self.load_aead(Op::Encrypt, id, false)?;
        cipher
            .seal(plaintext, aad)
            .map_err(|m| err(Op::Encrypt, Some(id), ErrorKind::Backend(m)))
    }

    fn decrypt(&self, id: &str, ciphertext: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        check_decrypt_input(BACKEND, id, ciphertext)?;
        let cipher = self.load_aead(Op::Decrypt, id, false)?;
        cipher
            .open(ciphertext, aad)
            .map_err(|_| err(Op::Decrypt, Some(id), ErrorKind::AuthenticationFailed))
    }

    fn random(&self, buf: &mut [u8]) -> Result<()> {
        getrandom::fill(buf).map_err(|e| err(Op::Random, None, ErrorKind::Backend(e.to_string())))
    }

    fn extend(&self, digest: &[u8; 32]) -> Result<()> {
        self.extend_all(std::slice::from_ref(digest))
    }

    /// One write for all of them. Not synced: the register lives for one
    /// boot, and a power loss is a new boot (the register then reads zero
    /// whatever the file holds), as a PCR is reset.
    fn extend_all(&self, digests: &[[u8; 32]]) -> Result<()> {
        let _guard = self
            .register
            .lock()
            .map_err(|_| err(Op::Extend, None, ErrorKind::Backend("lock poisoned".into())))?;
        let next = digests
            .iter()
            .fold(self.read_register_file()?, |v, d| extend_chain(&v, d));
        let boot =
            crate::boot_id().map_err(|e| err(Op::Extend, None, ErrorKind::Unavailable(e)))?;
        let mut bytes = next.to_vec();
        bytes.extend_from_slice(boot.as_bytes());
        let path = self.register_path();
        state::replace_unsynced(&path, &bytes).map_err(|e| io_err(Op::Extend, None, &path, &e))
    }

    fn read_register(&self) -> Result<[u8; 32]> {
        let _guard = self.register.lock().map_err(|_| {
            err(
                Op::ReadRegister,
                None,
                ErrorKind::Backend("lock poisoned".into()),
            )
        })?;
        self.read_register_file()
    }

    fn quote(&self, key: &str, nonce: &[u8]) -> Result<Quote> {
        check_nonce(BACKEND, key, nonce)?;
        let signer = self.load_signing(Op::Quote, key, false)?;
        let register = self.read_register()?;
        let message = soft_quote_message(&register, nonce);
        let sig: p256::ecdsa::Signature =
            p256::ecdsa::signature::Signer::sign(signer.as_ref(), &message);
        Ok(Quote {
            backend: BACKEND,
            register,
            nonce: nonce.to_vec(),
            message,
            signature: sig.to_der().as_bytes().to_vec(),
            public_key: sec1(&signer),
        })
    }

    fn keys(&self) -> Result<Vec<KeyInfo>> {
        let dir = self.dir.join("keys");
        let entries = std::fs::read_dir(&dir).map_err(|e| io_err(Op::ListKeys, None, &dir, &e))?;
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let (id, kind) = match name.rsplit_once('.') {
                Some((id, "p256")) => (id.to_owned(), KeyKind::EcdsaP256),
                Some((id, "aead")) => (id.to_owned(), KeyKind::Aes256Gcm),
                _ => continue,
            };
            if !super::valid_key_id(&id) {
                continue;
            }
            let public_key = match kind {
                KeyKind::EcdsaP256 => Some(self.public_key(&id)?),
                KeyKind::Aes256Gcm => None,
            };
            out.push(KeyInfo {
                id,
                kind,
                public_key,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    /// A daemon and `edgeward bundle` starting at once on a fresh state
    /// directory: every process can use the keys any of them created (with
    /// a rename-over KEK, keys sealed under the losing KEK were lost).
    #[test]
    fn processes_starting_at_once_share_one_kek() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let barrier = Arc::new(Barrier::new(6));
            let points: Vec<Vec<u8>> = (0..6)
                .map(|_| {
                    let (dir, barrier) = (dir.path().to_owned(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let hsm = SoftHsm::open(&dir).unwrap();
                        hsm.signing_key("device-ca").unwrap()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            assert!(points.windows(2).all(|w| w[0] == w[1]));
            // A process started later reads and uses the same key.
            let hsm = SoftHsm::open(dir.path()).unwrap();
            assert_eq!(hsm.public_key("device-ca").unwrap(), points[0]);
            let sig = hsm.sign_digest("device-ca", &[1u8; 32]).unwrap();
            assert!(!sig.is_empty());
        }
    }

    #[test]
    fn a_damaged_kek_is_refused_with_how_to_recover() {
        let dir = tempfile::tempdir().unwrap();
        SoftHsm::open(dir.path()).unwrap().signing_key("k").unwrap();
        std::fs::write(dir.path().join("hsm/kek"), [0u8; 31]).unwrap();
        let e = SoftHsm::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("31 bytes") && e.contains("Restore hsm/kek"),
            "{e}"
        );
        assert_eq!(std::fs::read(dir.path().join("hsm/kek")).unwrap().len(), 31);
    }
}
