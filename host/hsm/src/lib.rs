//! The HSM platform abstraction layer: one trait every identity and
//! measurement feature uses, with backends that each opt in to the
//! operations their hardware can do.
//!
//! | operation | `soft` | `tpm` | `pkcs11` |
//! |---|---|---|---|
//! | P-256 signing keys, sign a SHA-256 digest | yes | yes | yes |
//! | AEAD keys, encrypt/decrypt with associated data | yes | sealed key, software AES-GCM | yes (AES-GCM in the token) |
//! | random bytes | OS | TPM2_GetRandom | C_GenerateRandom |
//! | measurement register extend/read | hash chain | PCR (default 23) | not supported |
//! | quote | ES256 over register + nonce | TPM2_Quote | not supported |
//!
//! Keys are named by an id (`device-ca`, `attestation`, `master-encryption`,
//! …): `[a-z0-9][a-z0-9._-]{0,63}`. Every error names the backend, the
//! operation and the key id, and never secret material.

pub mod aead;
pub mod measure;
pub mod pkcs11;
pub mod soft;
pub mod state;
pub mod tpm;

use std::fmt;
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// Where the kernel keeps this boot's id.
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";
/// Names another file holding the boot id (tests simulate reboots with it).
pub const BOOT_ID_ENV: &str = "EDGEWARD_BOOT_ID_FILE";

/// This boot's id: the kernel's (`/proc/sys/kernel/random/boot_id`), or
/// what `$EDGEWARD_BOOT_ID_FILE` names.
///
/// # Errors
///
/// The file cannot be read, or holds no id.
pub fn boot_id() -> Result<String, String> {
    let path = std::env::var_os(BOOT_ID_ENV)
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(BOOT_ID_FILE), PathBuf::from);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the boot id from {}: {e}", path.display()))?;
    let id = text.trim();
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(format!("{}: not a boot id", path.display()));
    }
    Ok(id.to_owned())
}

/// The backends a configuration may name (the key daemon opens the TPM
/// and PKCS#11 ones: `edgeward-hsm-hw`).
pub const BACKENDS: &[&str] = &["soft", "tpm", "pkcs11"];

/// Version byte that starts every AEAD ciphertext the PAL produces.
pub const AEAD_VERSION: u8 = aead::VERSION;
/// Largest plaintext `encrypt` accepts (1 MiB).
pub const MAX_AEAD_INPUT: usize = 1 << 20;
/// Largest nonce `quote` accepts.
pub const MAX_NONCE: usize = 64;

/// An HSM operation, for errors and capability checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Create or load a P-256 signing key.
    SigningKey,
    /// Read a public key.
    PublicKey,
    /// Sign a digest.
    Sign,
    /// Create or load an AEAD key.
    AeadKey,
    /// Encrypt.
    Encrypt,
    /// Decrypt.
    Decrypt,
    /// Random bytes.
    Random,
    /// Extend the measurement register.
    Extend,
    /// Read the measurement register.
    ReadRegister,
    /// Quote the register.
    Quote,
    /// List keys.
    ListKeys,
    /// Destroy a key.
    DestroyKey,
    /// Read the endorsement key's certificate.
    EndorsementCertificate,
    /// Activate a credential made for the endorsement and attestation keys.
    ActivateCredential,
    /// Certify a key by an attestation key (TPM2_Certify).
    Certify,
}

impl Op {
    /// A short name for metrics labels (`sign`, `signing-key`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Op::SigningKey => "signing-key",
            Op::PublicKey => "public-key",
            Op::Sign => "sign",
            Op::AeadKey => "aead-key",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Random => "random",
            Op::Extend => "extend",
            Op::ReadRegister => "read-register",
            Op::Quote => "quote",
            Op::ListKeys => "list-keys",
            Op::DestroyKey => "destroy-key",
            Op::EndorsementCertificate => "endorsement-certificate",
            Op::ActivateCredential => "activate-credential",
            Op::Certify => "certify",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::SigningKey => "create-or-load signing key",
            Op::PublicKey => "read public key",
            Op::Sign => "sign",
            Op::AeadKey => "create-or-load AEAD key",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Random => "random",
            Op::Extend => "extend register",
            Op::ReadRegister => "read register",
            Op::Quote => "quote",
            Op::ListKeys => "list keys",
            Op::DestroyKey => "destroy key",
            Op::EndorsementCertificate => "read endorsement certificate",
            Op::ActivateCredential => "activate credential",
            Op::Certify => "certify key",
        })
    }
}

/// What went wrong, without secret detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The backend cannot do this operation.
    NotSupported,
    /// No key with that id (for operations that do not create).
    KeyNotFound,
    /// The key exists but is of another kind.
    WrongKeyKind,
    /// Bad argument (id syntax, sizes).
    InvalidArgument(String),
    /// Ciphertext or stored key failed authentication.
    AuthenticationFailed,
    /// Wrong PIN, unreachable device, missing module.
    Unavailable(String),
    /// Anything else the backend reported.
    Backend(String),
}

/// An HSM error: backend, operation, key and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmError {
    /// `soft`, `tpm` or `pkcs11`.
    pub backend: &'static str,
    /// The operation.
    pub op: Op,
    /// The key involved, if any.
    pub key: Option<String>,
    /// What went wrong.
    pub kind: ErrorKind,
}

impl HsmError {
    /// A new error.
    pub fn new(backend: &'static str, op: Op, key: Option<&str>, kind: ErrorKind) -> Self {
        Self {
            backend,
            op,
            key: key.map(str::to_owned),
            kind,
        }
    }
}

impl fmt::Display for HsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hsm backend {}: {}", self.backend, self.op)?;
        if let Some(k) = &self.key {
            write!(f, " (key {k:?})")?;
        }
        match &self.kind {
            ErrorKind::NotSupported => f.write_str(": not supported by this backend"),
            ErrorKind::KeyNotFound => f.write_str(": no such key"),
            ErrorKind::WrongKeyKind => f.write_str(": the key exists with another algorithm"),
            ErrorKind::InvalidArgument(m) => write!(f, ": invalid argument: {m}"),
            ErrorKind::AuthenticationFailed => f.write_str(": authentication failed"),
            ErrorKind::Unavailable(m) => write!(f, ": unavailable: {m}"),
            ErrorKind::Backend(m) => write!(f, ": {m}"),
        }
    }
}

impl std::error::Error for HsmError {}

/// Result of an HSM operation.
pub type Result<T, E = HsmError> = std::result::Result<T, E>;

/// A key's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// ECDSA P-256 signing key.
    EcdsaP256,
    /// AES-256-GCM key.
    Aes256Gcm,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::EcdsaP256 => "ecdsa-p256",
            KeyKind::Aes256Gcm => "aes-256-gcm",
        })
    }
}

/// A key as listed by `edgeward hsm info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Its id.
    pub id: String,
    /// Its algorithm.
    pub kind: KeyKind,
    /// For signing keys, the SEC1 uncompressed public point.
    pub public_key: Option<Vec<u8>>,
}

/// A signed statement of the measurement register's value and a verifier's
/// nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// The backend that produced it, which also names the format:
    /// `soft` (ES256 over [`soft_quote_message`]) or `tpm` (TPMS_ATTEST and
    /// TPMT_SIGNATURE, as `tpm2_checkquote` reads them).
    pub backend: &'static str,
    /// The register value quoted.
    pub register: [u8; 32],
    /// The caller's nonce.
    pub nonce: Vec<u8>,
    /// The signed message.
    pub message: Vec<u8>,
    /// The signature over `message` (DER ECDSA for soft, TPMT_SIGNATURE for tpm).
    pub signature: Vec<u8>,
    /// The attestation key's SEC1 public point.
    pub public_key: Vec<u8>,
}

/// A TPM's statement that one of its keys lives in it (TPM2_Certify by an
/// attestation key): the organisation reads from it that the key cannot
/// leave the TPM, before it certifies the key for the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certification {
    /// The TPMS_ATTEST the attestation key signed (type
    /// TPM_ST_ATTEST_CERTIFY: the key's name, the caller's nonce).
    pub message: Vec<u8>,
    /// Its TPMT_SIGNATURE (ECDSA P-256, SHA-256).
    pub signature: Vec<u8>,
    /// The certified key's TPM2B_PUBLIC, whose name the message carries
    /// and whose attributes say where the key may go.
    pub public: Vec<u8>,
    /// The attestation key's TPM2B_PUBLIC.
    pub ak_public: Vec<u8>,
}

/// The message a soft quote signs: a fixed label, the register and the
/// length-prefixed nonce.
pub fn soft_quote_message(register: &[u8; 32], nonce: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + 32 + 2 + nonce.len());
    m.extend_from_slice(b"edgeward soft quote v1\0");
    m.extend_from_slice(register);
    m.extend_from_slice(&u16::try_from(nonce.len()).unwrap_or(u16::MAX).to_be_bytes());
    m.extend_from_slice(nonce);
    m
}

/// The next register value after extending `current` with `digest`:
/// SHA-256(current || digest), as a TPM PCR extend does.
pub fn extend_chain(current: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(current);
    h.update(digest);
    h.finalize().into()
}

/// Whether `id` is a valid key id.
pub fn valid_key_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

/// The HSM PAL. Every method defaults to "not supported"; a backend
/// overrides the operations it can do. Methods block (hardware is slow):
/// call them from `spawn_blocking` in async code. Implementations are safe
/// to share between threads.
pub trait Hsm: Send + Sync + fmt::Debug {
    /// `soft`, `tpm` or `pkcs11`.
    fn backend(&self) -> &'static str;

    /// A "not supported" error for `op`.
    fn unsupported(&self, op: Op, key: Option<&str>) -> HsmError {
        HsmError::new(self.backend(), op, key, ErrorKind::NotSupported)
    }

    /// Creates the P-256 signing key `id` if it does not exist; returns its
    /// SEC1 uncompressed public point.
    fn signing_key(&self, id: &str) -> Result<Vec<u8>> {
        Err(self.unsupported(Op::SigningKey, Some(id)))
    }

    /// Creates the attestation key `id` if it does not exist (for
    /// [`Hsm::quote`]); returns its public point. Backends with restricted
    /// keys (TPM) make it one; elsewhere it is an ordinary signing key.
    fn attestation_key(&self, id: &str) -> Result<Vec<u8>> {
        self.signing_key(id)
    }

    /// The public point of the existing signing key `id`.
    fn public_key(&self, id: &str) -> Result<Vec<u8>> {
        Err(self.unsupported(Op::PublicKey, Some(id)))
    }

    /// ECDSA P-256 signature (DER) of a SHA-256 digest by key `id`.
    fn sign_digest(&self, id: &str, digest: &[u8; 32]) -> Result<Vec<u8>> {
        let _ = digest;
        Err(self.unsupported(Op::Sign, Some(id)))
    }

    /// An ECDSA P-256 signature (DER) by key `id` over a certificate's DER
    /// `TBSCertificate` (or a CSR's `CertificationRequestInfo`): the
    /// signature of its SHA-256. A backend that is a client of the key
    /// daemon sends the structure itself, so that the daemon can hold it to
    /// the key's policy (the device CA signs module leaves only).
    fn sign_certificate(&self, id: &str, tbs: &[u8]) -> Result<Vec<u8>> {
        use sha2::Digest as _;
        let digest: [u8; 32] = sha2::Sha256::digest(tbs).into();
        self.sign_digest(id, &digest)
    }

    /// Creates the AEAD key `id` if it does not exist.
    fn aead_key(&self, id: &str) -> Result<()> {
        Err(self.unsupported(Op::AeadKey, Some(id)))
    }

    /// Encrypts under AEAD key `id`; the output starts with [`AEAD_VERSION`].
    fn encrypt(&self, id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let _ = (plaintext, aad);
        Err(self.unsupported(Op::Encrypt, Some(id)))
    }

    /// Reverses [`Hsm::encrypt`].
    fn decrypt(&self, id: &str, ciphertext: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let _ = (ciphertext, aad);
        Err(self.unsupported(Op::Decrypt, Some(id)))
    }

    /// Fills `buf` with random bytes from the device.
    fn random(&self, buf: &mut [u8]) -> Result<()> {
        let _ = buf;
        Err(self.unsupported(Op::Random, None))
    }

    /// Extends the measurement register with `digest`.
    fn extend(&self, digest: &[u8; 32]) -> Result<()> {
        let _ = digest;
        Err(self.unsupported(Op::Extend, None))
    }

    /// Extends the register with each digest in order (a backend may do
    /// it in one step).
    fn extend_all(&self, digests: &[[u8; 32]]) -> Result<()> {
        digests.iter().try_for_each(|d| self.extend(d))
    }

    /// The measurement register's value.
    fn read_register(&self) -> Result<[u8; 32]> {
        Err(self.unsupported(Op::ReadRegister, None))
    }

    /// Signs the register together with `nonce` by attestation key `key`.
    fn quote(&self, key: &str, nonce: &[u8]) -> Result<Quote> {
        let _ = nonce;
        Err(self.unsupported(Op::Quote, Some(key)))
    }

    /// The attestation key `id`'s public area as the device names it
    /// (TPM2B_PUBLIC, whose name a credential is made for); `None` where
    /// keys have no such area (soft).
    fn attestation_public(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let _ = id;
        Ok(None)
    }

    /// The endorsement key's certificate (DER), where the device holds one
    /// (a TPM's RSA 2048 EK certificate, NV index 0x01c00002).
    fn endorsement_certificate(&self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Decrypts a credential made (TPM2_MakeCredential) for the
    /// endorsement key and the attestation key `id`: only a device holding
    /// both can (TPM2_ActivateCredential). `id_object` and
    /// `encrypted_secret` are the TPM2B buffers' contents.
    fn activate_credential(
        &self,
        id: &str,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let _ = (id_object, encrypted_secret);
        Err(self.unsupported(Op::ActivateCredential, Some(id)))
    }

    /// Has attestation key `ak` certify signing key `key` over `nonce`
    /// (TPM2_Certify): proof, for whoever trusts the AK, that `key` lives
    /// in the same TPM and what its attributes are. Only a TPM can.
    fn certify(&self, key: &str, ak: &str, nonce: &[u8]) -> Result<Certification> {
        let _ = (ak, nonce);
        Err(self.unsupported(Op::Certify, Some(key)))
    }

    /// The keys the backend holds.
    fn keys(&self) -> Result<Vec<KeyInfo>> {
        Err(self.unsupported(Op::ListKeys, None))
    }

    /// Whether its keys live only in the device, so that destroying one
    /// makes what it wrapped unrecoverable even from a copy of the state
    /// dir (PKCS#11 tokens). Soft and TPM keys are (wrapped) files in the
    /// state dir: a copy keeps them.
    fn keys_outside_state_dir(&self) -> bool {
        false
    }

    /// Releases what the backend holds in its device before the process
    /// exits (a TPM's loaded storage primary and session: without a
    /// resource manager they would stay loaded and fill the TPM's slots).
    /// Waits for an operation in flight; later calls may fail. For a
    /// process that exits while other threads still hold the backend.
    fn close(&self) {}

    /// Destroys key `id` (every object of that id); returns whether there
    /// was one.
    fn destroy_key(&self, id: &str) -> Result<bool> {
        Err(self.unsupported(Op::DestroyKey, Some(id)))
    }
}

/// Checks a key id, as every backend does first.
pub fn check_id(backend: &'static str, op: Op, id: &str) -> Result<()> {
    if valid_key_id(id) {
        Ok(())
    } else {
        Err(HsmError::new(
            backend,
            op,
            Some(id),
            ErrorKind::InvalidArgument(
                "key ids are 1-64 of a-z 0-9 . _ - starting with a letter or digit".into(),
            ),
        ))
    }
}

/// Checks AEAD and quote input sizes.
pub fn check_len(
    backend: &'static str,
    op: Op,
    id: Option<&str>,
    what: &str,
    len: usize,
    max: usize,
) -> Result<()> {
    if len <= max {
        Ok(())
    } else {
        Err(HsmError::new(
            backend,
            op,
            id,
            ErrorKind::InvalidArgument(format!("{what} is {len} bytes; the limit is {max}")),
        ))
    }
}

/// Checks a quote nonce against [`MAX_NONCE`].
pub fn check_nonce(backend: &'static str, key: &str, nonce: &[u8]) -> Result<()> {
    check_len(
        backend,
        Op::Quote,
        Some(key),
        "nonce",
        nonce.len(),
        MAX_NONCE,
    )
}

/// Checks `encrypt`'s inputs against [`MAX_AEAD_INPUT`].
pub fn check_encrypt_input(
    backend: &'static str,
    id: &str,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<()> {
    check_len(
        backend,
        Op::Encrypt,
        Some(id),
        "plaintext",
        plaintext.len(),
        MAX_AEAD_INPUT,
    )?;
    check_len(
        backend,
        Op::Encrypt,
        Some(id),
        "associated data",
        aad.len(),
        MAX_AEAD_INPUT,
    )
}

/// Checks `decrypt`'s input: at most what `encrypt` can produce.
pub fn check_decrypt_input(backend: &'static str, id: &str, ciphertext: &[u8]) -> Result<()> {
    check_len(
        backend,
        Op::Decrypt,
        Some(id),
        "ciphertext",
        ciphertext.len(),
        MAX_AEAD_INPUT + aead::OVERHEAD,
    )
}

/// Verifies a DER ECDSA P-256 signature over `message` (SHA-256) against a
/// SEC1 public point.
pub fn verify_p256(public_key: &[u8], message: &[u8], der_signature: &[u8]) -> bool {
    use p256::ecdsa::signature::Verifier as _;
    let Ok(vk) = p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key) else {
        return false;
    };
    let Ok(sig) = p256::ecdsa::Signature::from_der(der_signature) else {
        return false;
    };
    vk.verify(message, &sig).is_ok()
}

/// A fresh P-256 signing key from the OS random source.
pub fn random_signing_key() -> std::result::Result<p256::ecdsa::SigningKey, String> {
    loop {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut()).map_err(|e| format!("random: {e}"))?;
        // Out-of-range scalars (probability ~2^-32) are simply redrawn.
        if let Ok(k) = p256::ecdsa::SigningKey::from_bytes(bytes.as_ref().into()) {
            return Ok(k);
        }
    }
}

/// Which backend to open, validated from the config's `[hsm]` table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HsmConfig {
    /// Software keys in the state directory (the default).
    #[default]
    Soft,
    /// TPM 2.0.
    Tpm(tpm::TpmConfig),
    /// A PKCS#11 token.
    Pkcs11(pkcs11::Pkcs11Config),
}

impl HsmConfig {
    /// `soft`, `tpm` or `pkcs11`, as [`Hsm::backend`] names it.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Soft => "soft",
            Self::Tpm(_) => "tpm",
            Self::Pkcs11(_) => "pkcs11",
        }
    }
}

/// Opens the `soft` backend with its files under `state_dir`. The TPM and
/// PKCS#11 backends are `edgeward-hsm-hw`'s (`edgeward_hsm_hw::open`): a
/// process that does not link them gets an error naming the backend.
///
/// # Errors
///
/// The backend's open error, naming the backend and what is unavailable.
pub fn open(config: &HsmConfig, state_dir: &std::path::Path) -> Result<std::sync::Arc<dyn Hsm>> {
    match config {
        HsmConfig::Soft => Ok(std::sync::Arc::new(soft::SoftHsm::open(state_dir)?)),
        other => Err(HsmError::new(
            other.backend(),
            Op::ListKeys,
            None,
            ErrorKind::Unavailable(
                "this process does not link the backend: the key daemon opens it".into(),
            ),
        )),
    }
}

/// A SEC1 public point as a PEM SubjectPublicKeyInfo.
pub fn public_key_pem(sec1: &[u8]) -> Option<String> {
    use p256::pkcs8::EncodePublicKey as _;
    let pk = p256::PublicKey::from_sec1_bytes(sec1).ok()?;
    pk.to_public_key_pem(p256::pkcs8::LineEnding::LF).ok()
}
