//! The `pkcs11` backend, through the cryptoki crate: signing keys
//! (CKM_EC_KEY_PAIR_GEN on P-256, CKM_ECDSA), AEAD keys (CKM_AES_KEY_GEN,
//! CKM_AES_GCM) and random bytes live in a token, found by its label and
//! opened with a PIN read from a file. Keys are token objects labelled with
//! their id, non-extractable and sensitive. The token has no measurement
//! register, so extend, read-register and quote answer "not supported".

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use edgeward_hsm::aead;
pub use edgeward_hsm::pkcs11::Pkcs11Config;
use edgeward_hsm::{
    ErrorKind, Hsm, HsmError, KeyInfo, KeyKind, Op, Result, check_decrypt_input,
    check_encrypt_input, check_id,
};

const BACKEND: &str = "pkcs11";
/// DER of the prime256v1 OID: the CKA_EC_PARAMS of a P-256 key.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A PKCS#11 token.
pub struct Pkcs11Hsm {
    config: Pkcs11Config,
    session: Mutex<Session>,
    cache: Mutex<HashMap<(String, KeyKind), ObjectHandle>>,
}

impl fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn err(op: Op, key: Option<&str>, kind: ErrorKind) -> HsmError {
    HsmError::new(BACKEND, op, key, kind)
}

fn ck(op: Op, key: Option<&str>) -> impl Fn(CkError) -> HsmError + '_ {
    move |e| err(op, key, ErrorKind::Backend(e.to_string()))
}

/// The process-wide handle of a PKCS#11 module: a module is initialized once
/// per process, however many backends (or tools) use it.
///
/// # Errors
///
/// A message naming the module when it cannot be loaded or initialized.
pub fn library(path: &Path) -> std::result::Result<Pkcs11, String> {
    static LIBS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut libs = LIBS
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| "lock poisoned".to_owned())?;
    if let Some(lib) = libs.get(path) {
        return Ok(lib.clone());
    }
    let lib = Pkcs11::new(path)
        .map_err(|e| format!("cannot load PKCS#11 module {}: {e}", path.display()))?;
    match lib.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(format!(
                "cannot initialize PKCS#11 module {}: {e}",
                path.display()
            ));
        }
    }
    libs.insert(path.to_owned(), lib.clone());
    Ok(lib)
}

/// Serializes slot enumeration and token initialization in this process:
/// SoftHSM2 (among others) is not safe against a slot list being rebuilt
/// while another thread walks it.
pub fn slot_lock() -> MutexGuard<'static, ()> {
    static SLOTS: Mutex<()> = Mutex::new(());
    SLOTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a PIN file: the first line, without its line ending.
fn read_pin(path: &Path) -> std::result::Result<Zeroizing<String>, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read PIN file {}: {e}", path.display()))?,
    );
    let pin = text.lines().next().unwrap_or("").to_owned();
    if pin.is_empty() {
        return Err(format!("PIN file {} is empty", path.display()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "PIN file is readable by other users; chmod 600 it");
        }
    }
    Ok(Zeroizing::new(pin))
}

impl Pkcs11Hsm {
    /// Loads the module, finds the token by label and logs in as user.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unavailable`] when the module, token or PIN file is
    /// missing or the PIN is wrong, naming which.
    pub fn open(config: Pkcs11Config) -> Result<Self> {
        let op = Op::ListKeys;
        let unavailable = |m: String| err(op, None, ErrorKind::Unavailable(m));
        let pin = read_pin(&config.pin_file).map_err(unavailable)?;
        let lib = library(&config.module).map_err(unavailable)?;
        let guard = slot_lock();
        let slots = lib
            .get_slots_with_initialized_token()
            .map_err(ck(op, None))?;
        let slot = slots
            .into_iter()
            .find(|s| {
                lib.get_token_info(*s)
                    .map(|t| t.label().trim_end() == config.token)
                    .unwrap_or(false)
            })
            .ok_or_else(|| {
                unavailable(format!(
                    "no token labelled {:?} in {}",
                    config.token,
                    config.module.display()
                ))
            })?;
        let session = lib.open_rw_session(slot).map_err(ck(op, None))?;
        drop(guard);
        let auth = AuthPin::from(pin.as_str());
        match session.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => {
                return Err(unavailable(format!(
                    "login to token {:?} failed: {e}",
                    config.token
                )));
            }
        }
        Ok(Self {
            config,
            session: Mutex::new(session),
            cache: Mutex::default(),
        })
    }

    fn session(&self, op: Op, key: Option<&str>) -> Result<MutexGuard<'_, Session>> {
        self.session
            .lock()
            .map_err(|_| err(op, key, ErrorKind::Backend("lock poisoned".into())))
    }

    fn find(
        session: &Session,
        id: &str,
        class: ObjectClass,
    ) -> std::result::Result<Option<ObjectHandle>, CkError> {
        let found = session.find_objects(&[
            Attribute::Class(class),
            Attribute::Label(id.as_bytes().to_vec()),
        ])?;
        Ok(found.into_iter().min_by_key(|h| h.handle()))
    }

    /// The private (signing) or secret (AEAD) object for `id`, created if
    /// asked and missing.
    fn key(&self, op: Op, id: &str, kind: KeyKind, create: bool) -> Result<ObjectHandle> {
        check_id(BACKEND, op, id)?;
        if let Some(h) = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&(id.to_owned(), kind)).copied())
        {
            return Ok(h);
        }
        let session = self.session(op, Some(id))?;
        let (class, other) = match kind {
            KeyKind::EcdsaP256 => (ObjectClass::PRIVATE_KEY, ObjectClass::SECRET_KEY),
            KeyKind::Aes256Gcm => (ObjectClass::SECRET_KEY, ObjectClass::PRIVATE_KEY),
        };
        let handle = match Self::find(&session, id, class).map_err(ck(op, Some(id)))? {
            Some(h) => h,
            None if Self::find(&session, id, other)
                .map_err(ck(op, Some(id)))?
                .is_some() =>
            {
                return Err(err(op, Some(id), ErrorKind::WrongKeyKind));
            }
            None if !create => return Err(err(op, Some(id), ErrorKind::KeyNotFound)),
            None => {
                let label = Attribute::Label(id.as_bytes().to_vec());
                match kind {
                    KeyKind::EcdsaP256 => {
                        let public = [
                            Attribute::Token(true),
                            Attribute::Private(false),
                            Attribute::KeyType(KeyType::EC),
                            Attribute::Verify(true),
                            Attribute::EcParams(P256_PARAMS.to_vec()),
                            label.clone(),
                        ];
                        let private = [
                            Attribute::Token(true),
                            Attribute::Private(true),
                            Attribute::Sensitive(true),
                            Attribute::Extractable(false),
                            Attribute::Sign(true),
                            label,
                        ];
                        session
                            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
                            .map_err(ck(op, Some(id)))?
                            .1
                    }
                    KeyKind::Aes256Gcm => {
                        let template = [
                            Attribute::Token(true),
                            Attribute::Private(true),
                            Attribute::Sensitive(true),
                            Attribute::Extractable(false),
                            Attribute::ValueLen(32.into()),
                            Attribute::Encrypt(true),
                            Attribute::Decrypt(true),
                            label,
                        ];
                        session
                            .generate_key(&Mechanism::AesKeyGen, &template)
                            .map_err(ck(op, Some(id)))?
                    }
                }
            }
        };
        if let Ok(mut c) = self.cache.lock() {
            c.insert((id.to_owned(), kind), handle);
        }
        Ok(handle)
    }

    fn public_point(&self, op: Op, id: &str) -> Result<Vec<u8>> {
        check_id(BACKEND, op, id)?;
        let session = self.session(op, Some(id))?;
        let public = Self::find(&session, id, ObjectClass::PUBLIC_KEY)
            .map_err(ck(op, Some(id)))?
            .ok_or_else(|| err(op, Some(id), ErrorKind::KeyNotFound))?;
        let attrs = session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(ck(op, Some(id)))?;
        let Some(Attribute::EcPoint(der)) = attrs.into_iter().next() else {
            return Err(err(op, Some(id), ErrorKind::WrongKeyKind));
        };
        // CKA_EC_POINT is a DER OCTET STRING around the SEC1 point.
        match der.as_slice() {
            [0x04, 0x41, point @ ..] if point.len() == 65 && point[0] == 4 => Ok(point.to_vec()),
            point if point.len() == 65 && point[0] == 4 => Ok(point.to_vec()),
            _ => Err(err(
                op,
                Some(id),
                ErrorKind::Backend("unexpected CKA_EC_POINT encoding".into()),
            )),
        }
    }
}

impl Hsm for Pkcs11Hsm {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn signing_key(&self, id: &str) -> Result<Vec<u8>> {
        self.key(Op::SigningKey, id, KeyKind::EcdsaP256, true)?;
        self.public_point(Op::SigningKey, id)
    }

    fn public_key(&self, id: &str) -> Result<Vec<u8>> {
        self.public_point(Op::PublicKey, id)
    }

    fn sign_digest(&self, id: &str, digest: &[u8; 32]) -> Result<Vec<u8>> {
        let key = self.key(Op::Sign, id, KeyKind::EcdsaP256, false)?;
        let raw = self
            .session(Op::Sign, Some(id))?
            .sign(&Mechanism::Ecdsa, key, digest)
            .map_err(ck(Op::Sign, Some(id)))?;
        let sig = p256::ecdsa::Signature::from_slice(&raw).map_err(|_| {
            err(
                Op::Sign,
                Some(id),
                ErrorKind::Backend("token returned a malformed signature".into()),
            )
        })?;
        Ok(sig.to_der().as_bytes().to_vec())
    }

    fn aead_key(&self, id: &str) -> Result<()> {
        self.key(Op::AeadKey, id, KeyKind::Aes256Gcm, true)
            .map(|_| ())
    }

    fn encrypt(&self, id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        check_encrypt_input(BACKEND, id, plaintext, aad)?;
        let key = self.key(Op::Encrypt, id, KeyKind::Aes256Gcm, false)?;
        let session = self.session(Op::Encrypt, Some(id))?;
        let mut iv = [0u8; 12];
        session
            .generate_random_slice(&mut iv)
            .map_err(ck(Op::Encrypt, Some(id)))?;
        let mut iv_param = iv;
        let params =
            GcmParams::new(&mut iv_param, aad, 128.into()).map_err(ck(Op::Encrypt, Some(id)))?;
        let ct = session
            .encrypt(&Mechanism::AesGcm(params), key, plaintext)
            .map_err(ck(Op::Encrypt, Some(id)))?;
        Ok(aead::frame(&iv, &ct))
    }

    fn decrypt(&self, id: &str, ciphertext: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        check_decrypt_input(BACKEND, id, ciphertext)?;
        let (nonce, body) = aead::parse(ciphertext)
            .map_err(|_| err(Op::Decrypt, Some(id), ErrorKind::AuthenticationFailed))?;
        let key = self.key(Op::Decrypt, id, KeyKind::Aes256Gcm, false)?;
        let mut iv = *nonce;
        let params = GcmParams::new(&mut iv, aad, 128.into()).map_err(ck(Op::Decrypt, Some(id)))?;
        self.session(Op::Decrypt, Some(id))?
            .decrypt(&Mechanism::AesGcm(params), key, body)
            .map(Zeroizing::new)
            .map_err(|e| match e {
                CkError::Pkcs11(
                    RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                    _,
                ) => err(Op::Decrypt, Some(id), ErrorKind::AuthenticationFailed),
                // SoftHSM reports a bad tag as a generic failure.
                CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _) => {
                    err(Op::Decrypt, Some(id), ErrorKind::AuthenticationFailed)
                }
                e => ck(Op::Decrypt, Some(id))(e),
            })
    }

    fn random(&self, buf: &mut [u8]) -> Result<()> {
        self.session(Op::Random, None)?
            .generate_random_slice(buf)
            .map_err(ck(Op::Random, None))
    }

    fn keys_outside_state_dir(&self) -> bool {
        true
    }

    fn destroy_key(&self, id: &str) -> Result<bool> {
        check_id(BACKEND, Op::DestroyKey, id)?;
        let session = self.session(Op::DestroyKey, Some(id))?;
        if let Ok(mut c) = self.cache.lock() {
            c.retain(|(k, _), _| k != id);
        }
        let handles = session
            .find_objects(&[Attribute::Label(id.as_bytes().to_vec())])
            .map_err(ck(Op::DestroyKey, Some(id)))?;
        let found = !handles.is_empty();
        for h in handles {
            session
                .destroy_object(h)
                .map_err(ck(Op::DestroyKey, Some(id)))?;
        }
        Ok(found)
    }

    fn keys(&self) -> Result<Vec<KeyInfo>> {
        let session = self.session(Op::ListKeys, None)?;
        let mut out = Vec::new();
        for (class, kind) in [
            (ObjectClass::PRIVATE_KEY, KeyKind::EcdsaP256),
            (ObjectClass::SECRET_KEY, KeyKind::Aes256Gcm),
        ] {
            let handles = session
                .find_objects(&[Attribute::Class(class)])
                .map_err(ck(Op::ListKeys, None))?;
            for h in handles {
                let attrs = session
                    .get_attributes(h, &[AttributeType::Label])
                    .map_err(ck(Op::ListKeys, None))?;
                let Some(Attribute::Label(label)) = attrs.into_iter().next() else {
                    continue;
                };
                let Ok(id) = String::from_utf8(label) else {
                    continue;
                };
                if !edgeward_hsm::valid_key_id(&id) || out.iter().any(|k: &KeyInfo| k.id == id) {
                    continue;
                }
                out.push(KeyInfo {
                    id,
                    kind,
                    public_key: None,
                });
            }
        }
        drop(session);
        for k in &mut out {
            if k.kind == KeyKind::EcdsaP256 {
                k.public_key = self.public_point(Op::ListKeys, &k.id).ok();
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}
