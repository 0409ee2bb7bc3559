//! The `tpm` backend: TPM 2.0 through tss-esapi (ESAPI from Debian's
//! libtss2).
//!
//! - A storage primary (ECC P-256, restricted decryption) is derived in the
//!   owner hierarchy at open. Its name is recorded next to the key blobs and
//!   checked at every open: a cleared or replaced TPM is reported, not
//!   silently used with keys that cannot load.
//! - Keys are created under the primary and their public/private blobs
//!   (never saved contexts) are kept in `<state>/hsm-tpm/keys`, so they
//!   survive TPM resets and daemon restarts. Each operation loads the key,
//!   uses it and flushes it: no resource manager is assumed.
//! - The measurement register is a PCR (default 23), quoted with TPM2_Quote
//!   by a restricted attestation key; the TPMS_ATTEST and TPMT_SIGNATURE are
//!   returned as `tpm2_checkquote` reads them.
//! - AEAD keys are 32 random bytes sealed in a TPM keyed-hash object,
//!   unsealed on first use and used in software (AES-256-GCM).
//! - Commands that carry secrets or key blobs (create, load, unseal, sign)
//!   run in an HMAC session salted with the storage primary, with parameter
//!   encryption both ways: the salt crosses the bus encrypted to the
//!   primary's key, so someone listening on the bus (an SPI/I2C probe, a
//!   relay between the TCTI and the TPM) cannot derive the session key and
//!   read the sealed AEAD key or a key blob. (An unsalted, unbound session,
//!   as `execute_with_nullauth_session` starts, encrypts under a key anyone
//!   who sees the nonces can derive.)

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Data, Digest, DigestValues, EccPoint, EccScheme, HashScheme, HashcheckTicket, KeyedHashScheme,
    PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, Signature,
    SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, TctiNameConf};
use zeroize::Zeroizing;

use edgeward_hsm::aead::SoftAead;
use edgeward_hsm::state;
pub use edgeward_hsm::tpm::{DEFAULT_PCR, TpmConfig, check_boot_pcrs};
use edgeward_hsm::{
    Certification, ErrorKind, Hsm, HsmError, KeyInfo, KeyKind, Op, Quote, Result,
    check_decrypt_input, check_encrypt_input, check_id, check_nonce,
};

const BACKEND: &str = "tpm";
/// What a key blob file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blob {
    Signing,
    Attestation,
    Sealed,
}

impl Blob {
    fn ext(self) -> &'static str {
        match self {
            Blob::Signing => "p256",
            Blob::Attestation => "ak",
            Blob::Sealed => "aead",
        }
    }
}

struct Inner {
    ctx: Context,
    primary: KeyHandle,
    /// HMAC session salted with `primary`, encrypting parameters both ways.
    salted: AuthSession,
    /// Whether the session and primary were flushed ([`Hsm::close`]).
    released: bool,
}

impl Inner {
    /// Runs `f` with the salted session as the authorization session.
    fn salted<T>(
        &mut self,
        f: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    ) -> tss_esapi::Result<T> {
        let s = self.salted;
        self.ctx.execute_with_session(Some(s), f)
    }
}

impl Inner {
    /// Runs `f` in a policy session (salted with the primary, parameters
    /// encrypted both ways) that has satisfied the boot policy over `pcrs`
    /// and PolicyAuthValue: the object's auth value enters the HMAC.
    fn with_boot_policy<T>(
        &mut self,
        pcrs: &[u8],
        f: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    ) -> tss_esapi::Result<T> {
        use tss_esapi::interface_types::session_handles::PolicySession;
        let selection = sha256_selection(pcrs)?;
        let session = start_session(&mut self.ctx, Some(self.primary), SessionType::Policy)?;
        let out = (|| {
            let (attributes, mask) = SessionAttributesBuilder::new()
                .with_decrypt(true)
                .with_encrypt(true)
                .build();
            self.ctx.tr_sess_set_attributes(session, attributes, mask)?;
            let policy = PolicySession::try_from(session)?;
            self.ctx.policy_pcr(policy, Digest::default(), selection)?;
            self.ctx.policy_auth_value(policy)?;
            self.ctx.execute_with_session(Some(session), f)
        })();
        let _ = self.ctx.flush_context(SessionHandle::from(session).into());
        out
    }
}

/// A TPM error, with the boot policy named when that is what failed.
fn policy_error(op: Op, id: &str, pcrs: &[u8], e: tss_esapi::Error) -> HsmError {
    use tss_esapi::constants::response_code::Tss2ResponseCodeKind as Kind;
    match &e {
        tss_esapi::Error::Tss2Error(rc)
            if !pcrs.is_empty() && matches!(rc.kind(), Some(Kind::PolicyFail)) =>
        {
            err(
                op,
                Some(id),
                ErrorKind::Backend(format!(
                    "the TPM refuses the key: the boot state (PCR {pcrs:?}) is not the one it was bound to (firmware, boot loader or Secure Boot configuration changed since it was made)"
                )),
            )
        }
        tss_esapi::Error::Tss2Error(rc) if matches!(rc.kind(), Some(Kind::AuthFail)) => err(
            op,
            Some(id),
            ErrorKind::Backend(
                "the TPM refuses the key's auth value (hsm-tpm/auth.secret replaced or lost?)"
                    .into(),
            ),
        ),
        _ => tss(op, Some(id))(e),
    }
}

impl Inner {
    /// Flushes the session and the primary (once).
    fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let _ = self
            .ctx
            .flush_context(SessionHandle::from(self.salted).into());
        let _ = self.ctx.flush_context(self.primary.into());
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.release();
    }
}

/// Starts an HMAC session salted with `primary` (ECDH to its public key),
/// with parameter encryption (AES-128-CFB) for commands and responses.
fn start_salted_session(ctx: &mut Context, primary: KeyHandle) -> tss_esapi::Result<AuthSession> {
    let session = start_session(ctx, Some(primary), SessionType::Hmac)?;
    let (attributes, mask) = SessionAttributesBuilder::new()
        .with_decrypt(true)
        .with_encrypt(true)
        .with_continue_session(true)
        .build();
    ctx.tr_sess_set_attributes(session, attributes, mask)?;
    Ok(session)
}

/// Starts a session of `kind` (AES-128-CFB, SHA-256), salted with
/// `salt_key` if given.
fn start_session(
    ctx: &mut Context,
    salt_key: Option<KeyHandle>,
    kind: SessionType,
) -> tss_esapi::Result<AuthSession> {
    ctx.start_auth_session(
        salt_key,
        None,
        None,
        kind,
        SymmetricDefinition::AES_128_CFB,
        HashingAlgorithm::Sha256,
    )?
    .ok_or(tss_esapi::Error::WrapperError(
        tss_esapi::WrapperErrorKind::WrongValueFromTpm,
    ))
}

/// TPM 2.0 keys.
pub struct TpmHsm {
    dir: PathBuf,
    config: TpmConfig,
    /// The secret the keys' auth values derive from ([`object_auth`]).
    auth_secret: Zeroizing<[u8; 32]>,
    inner: Mutex<Inner>,
    aead: Mutex<HashMap<String, Arc<SoftAead>>>,
}

impl fmt::Debug for TpmHsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmHsm")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn err(op: Op, key: Option<&str>, kind: ErrorKind) -> HsmError {
    HsmError::new(BACKEND, op, key, kind)
}

fn tss(op: Op, key: Option<&str>) -> impl Fn(tss_esapi::Error) -> HsmError + '_ {
    move |e| err(op, key, ErrorKind::Backend(format!("TPM: {e}")))
}

/// The storage primary's template (ECC P-256, restricted decryption, in
/// the owner hierarchy): the same TPM always derives the same primary.
///
/// # Errors
///
/// tss-esapi builder errors.
pub fn primary_template() -> tss_esapi::Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_decrypt(true)
        .with_restricted(true)
        .with_no_da(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A key bound to a policy (`Some`) is used only through it: its user role
/// needs the policy session (userWithAuth clear); its admin role (the AK's
/// ActivateCredential) still takes the auth value by HMAC.
fn signing_template(restricted: bool, policy: Option<&Digest>) -> tss_esapi::Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(policy.is_none())
        .with_sign_encrypt(true)
        .with_restricted(restricted)
        .with_no_da(true)
        .build()?;
    let scheme = EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256));
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_auth_policy(policy.cloned().unwrap_or_default())
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(scheme, EccCurve::NistP256)
                .with_restricted(restricted)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

fn sealed_template(policy: Option<&Digest>) -> tss_esapi::Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(policy.is_none())
        .with_no_da(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_auth_policy(policy.cloned().unwrap_or_default())
        .with_object_attributes(attrs)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

/// SEC1 uncompressed point of an ECC `Public`.
fn sec1(public: &Public) -> Option<Vec<u8>> {
    match public {
        Public::Ecc { unique, .. } => {
            let (x, y) = (unique.x().value(), unique.y().value());
            if x.len() > 32 || y.len() > 32 {
                return None;
            }
            let mut out = vec![4u8; 65];
            out[1 + 32 - x.len()..33].copy_from_slice(x);
            out[33 + 32 - y.len()..].copy_from_slice(y);
            Some(out)
        }
        _ => None,
    }
}

/// DER ECDSA signature from a TPM signature.
fn der_signature(sig: &Signature) -> Option<Vec<u8>> {
    let Signature::EcDsa(ecc) = sig else {
        return None;
    };
    let pad = |v: &[u8]| -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        let v = v.get(v.len().saturating_sub(32)..)?;
        out[32 - v.len()..].copy_from_slice(v);
        Some(out)
    };
    let r = pad(ecc.signature_r().value())?;
    let s = pad(ecc.signature_s().value())?;
    let sig = p256::ecdsa::Signature::from_scalars(r, s).ok()?;
    Some(sig.to_der().as_bytes().to_vec())
}

/// How a key object is protected: by an auth value (derived from the
/// state directory's secret and the key id), and by a policy on boot PCRs.
/// Keys made before auth values existed have neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protection {
    /// The object has an auth value.
    pub auth: bool,
    /// The boot PCRs (SHA-256 bank) its use is bound to.
    pub pcrs: Vec<u8>,
}

/// A key blob: public and private areas, and how the object is protected.
#[derive(Debug, Clone)]
struct KeyBlob {
    public: Public,
    private: Private,
    protection: Protection,
}

/// The header of a key blob with a [`Protection`]: `EWK2`, the auth flag,
/// the PCR count and PCRs, then the unprotected layout. (An unprotected
/// blob starts with the public area's length, which is far below the
/// `EW` this reads as.)
const BLOB_V2: &[u8; 4] = b"EWK2";

fn encode_blob(
    public: &Public,
    private: &Private,
    protection: &Protection,
) -> tss_esapi::Result<Vec<u8>> {
    let public = public.marshall()?;
    let mut out = Vec::with_capacity(8 + 2 + public.len() + private.value().len());
    out.extend_from_slice(BLOB_V2);
    out.push(u8::from(protection.auth));
    out.push(u8::try_from(protection.pcrs.len()).unwrap_or(0));
    out.extend_from_slice(&protection.pcrs);
    out.extend_from_slice(
        &u16::try_from(public.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&public);
    out.extend_from_slice(private.value());
    Ok(out)
}

/// Splits a key blob file (optionally the [`Protection`] header, then `u16`
/// public length, marshalled public, private) into its parts.
pub fn decode_blob(bytes: &[u8]) -> Option<(Public, Private)> {
    decode_protected(bytes).map(|(public, private, _)| (public, private))
}

/// [`decode_blob`] with the object's [`Protection`].
pub fn decode_protected(bytes: &[u8]) -> Option<(Public, Private, Protection)> {
    let (protection, bytes) = match bytes.strip_prefix(BLOB_V2) {
        Some(rest) => {
            let auth = match rest.first()? {
                0 => false,
                1 => true,
                _ => return None,
            };
            let n = usize::from(*rest.get(1)?);
            let pcrs = rest.get(2..2 + n)?.to_vec();
            if pcrs.iter().any(|p| *p >= 24) {
                return None;
            }
            (Protection { auth, pcrs }, rest.get(2 + n..)?)
        }
        None => (Protection::default(), bytes),
    };
    let len = usize::from(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]));
    let public = Public::unmarshall(bytes.get(2..2 + len)?).ok()?;
    let private = Private::try_from(bytes.get(2 + len..)?.to_vec()).ok()?;
    Some((public, private, protection))
}

/// The auth value of key `id`: SHA-256 over a domain tag, the state
/// directory's TPM secret (`hsm-tpm/auth.secret`, 0600) and the id. Who
/// can use the TPM but cannot read the state directory cannot use the key.
pub fn object_auth(secret: &[u8; 32], id: &str) -> Zeroizing<Vec<u8>> {
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut h, b"edgeward tpm object auth v1\0");
    sha2::Digest::update(&mut h, secret);
    sha2::Digest::update(&mut h, id.as_bytes());
    Zeroizing::new(sha2::Digest::finalize(h).to_vec())
}

/// The policy digest of "these PCRs hold their current values, and the
/// caller knows the auth value" (PolicyPCR, then PolicyAuthValue), from a
/// trial session.
fn boot_policy(ctx: &mut Context, selection: PcrSelectionList) -> tss_esapi::Result<Digest> {
    use tss_esapi::interface_types::session_handles::PolicySession;
    let session = start_session(ctx, None, SessionType::Trial)?;
    let digest = (|| {
        let policy = PolicySession::try_from(session)?;
        ctx.policy_pcr(policy, Digest::default(), selection)?;
        ctx.policy_auth_value(policy)?;
        ctx.policy_get_digest(policy)
    })();
    let _ = ctx.flush_context(SessionHandle::from(session).into());
    digest
}

/// `pcrs` in the SHA-256 bank.
fn sha256_selection(pcrs: &[u8]) -> tss_esapi::Result<PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|p| PcrSlot::try_from(1u32 << p))
        .collect::<tss_esapi::Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
}

/// The state directory's TPM secret: read, or made (32 random bytes,
/// written once, 0600) when missing.
fn load_auth_secret(path: &Path) -> std::result::Result<Zeroizing<[u8; 32]>, String> {
    let read = |path: &Path| -> std::result::Result<Option<Zeroizing<[u8; 32]>>, String> {
        match std::fs::read(path) {
            Ok(b) => {
                let b = Zeroizing::new(b);
                <[u8; 32]>::try_from(b.as_slice())
                    .map(|a| Some(Zeroizing::new(a)))
                    .map_err(|_| format!("{}: not 32 bytes", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    };
    if let Some(s) = read(path)? {
        return Ok(s);
    }
    let mut fresh = Zeroizing::new([0u8; 32]);
    getrandom::fill(fresh.as_mut()).map_err(|e| format!("random: {e}"))?;
    // Another process may make it first (false): theirs is the secret.
    state::create_only(path, fresh.as_ref()).map_err(|e| format!("{}: {e}", path.display()))?;
    read(path)?.ok_or_else(|| format!("{}: vanished", path.display()))
}

impl TpmHsm {
    /// Connects to the TPM, derives the storage primary and checks its name
    /// against the one recorded in `state_dir/hsm-tpm`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Unavailable`] naming the TCTI when the TPM cannot be
    /// reached; a backend error when the primary changed.
    pub fn open(state_dir: &Path, config: TpmConfig) -> Result<Self> {
        let op = Op::ListKeys;
        if config.pcr > 23 {
            return Err(err(
                op,
                None,
                ErrorKind::InvalidArgument(format!("pcr {} is not 0..=23", config.pcr)),
            ));
        }
        let dir = state_dir.join("hsm-tpm");
        let keys = dir.join("keys");
        state::ensure_private_dir(&keys).map_err(|e| {
            err(
                op,
                None,
                ErrorKind::Backend(format!("{}: {e}", keys.display())),
            )
        })?;
        if let Some(pcrs) = &config.boot_pcrs {
            check_boot_pcrs(pcrs, config.pcr)
                .map_err(|m| err(op, None, ErrorKind::InvalidArgument(m)))?;
        }
        let tcti = TctiNameConf::from_str(&config.tcti).map_err(|e| {
            err(
                op,
                None,
                ErrorKind::InvalidArgument(format!("TCTI {:?}: {e}", config.tcti)),
            )
        })?;
        let mut ctx = Context::new(tcti).map_err(|e| {
            err(
                op,
                None,
                ErrorKind::Unavailable(format!("cannot reach the TPM at {:?}: {e}", config.tcti)),
            )
        })?;
        let template = primary_template().map_err(tss(op, None))?;
        let primary = ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(|e| {
                err(
                    op,
                    None,
                    ErrorKind::Unavailable(format!(
                        "cannot create the storage primary at {:?}: {e}",
                        config.tcti
                    )),
                )
            })?
            .key_handle;
        let salted = start_salted_session(&mut ctx, primary).map_err(|e| {
            err(
                op,
                None,
                ErrorKind::Unavailable(format!(
                    "cannot start a salted session at {:?}: {e}",
                    config.tcti
                )),
            )
        })?;
        let inner = Inner {
            ctx,
            primary,
            salted,
            released: false,
        };
        let auth_secret = load_auth_secret(&dir.join("auth.secret"))
            .map_err(|m| err(op, None, ErrorKind::Backend(m)))?;
        let this = Self {
            dir,
            config,
            auth_secret,
            inner: Mutex::new(inner),
            aead: Mutex::default(),
        };
        this.check_primary_name()?;
        Ok(this)
    }

    fn lock(&self, op: Op, key: Option<&str>) -> Result<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| err(op, key, ErrorKind::Backend("lock poisoned".into())))
    }

    fn check_primary_name(&self) -> Result<()> {
        let op = Op::ListKeys;
        let mut inner = self.lock(op, None)?;
        let primary = inner.primary;
        let name = inner
            .ctx
            .tr_get_name(primary.into())
            .map_err(tss(op, None))?;
        let name = name.value().to_vec();
        let path = self.dir.join("primary.name");
        match std::fs::read(&path) {
            Ok(recorded) if recorded == name => Ok(()),
            Ok(_) => Err(err(
                op,
                None,
                ErrorKind::Backend(format!(
                    "the TPM's storage primary is not the one the keys in {} were created under (TPM cleared or replaced?)",
                    self.dir.display()
                )),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                state::create_only(&path, &name).map_err(|e| {
                    err(
                        op,
                        None,
                        ErrorKind::Backend(format!("{}: {e}", path.display())),
                    )
                })?;
                Ok(())
            }
            Err(e) => Err(err(
                op,
                None,
                ErrorKind::Backend(format!("{}: {e}", path.display())),
            )),
        }
    }

    fn blob_path(&self, id: &str, blob: Blob) -> PathBuf {
        self.dir.join("keys").join(format!("{id}.{}", blob.ext()))
    }

    fn read_blob(&self, op: Op, id: &str, blob: Blob) -> Result<Option<KeyBlob>> {
        let path = self.blob_path(id, blob);
        match std::fs::read(&path) {
            Ok(bytes) => decode_protected(&bytes)
                .map(|(public, private, protection)| {
                    Some(KeyBlob {
                        public,
                        private,
                        protection,
                    })
                })
                .ok_or_else(|| {
                    err(
                        op,
                        Some(id),
                        ErrorKind::Backend(format!("{}: malformed key blob", path.display())),
                    )
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let others = [Blob::Signing, Blob::Attestation, Blob::Sealed];
                if others
                    .iter()
                    .any(|b| *b != blob && self.blob_path(id, *b).exists())
                {
                    Err(err(op, Some(id), ErrorKind::WrongKeyKind))
                } else {
                    Ok(None)
                }
            }
            Err(e) => Err(err(
                op,
                Some(id),
                ErrorKind::Backend(format!("{}: {e}", path.display())),
            )),
        }
    }

    /// The boot PCRs a new key is bound to: the configured ones, or PCR 7
    /// if the platform measured its boot there.
    fn boot_pcrs(&self, inner: &mut Inner) -> tss_esapi::Result<Vec<u8>> {
        if let Some(p) = &self.config.boot_pcrs {
            return Ok(p.clone());
        }
        let (_, _, digests) = inner.ctx.pcr_read(sha256_selection(&[7])?)?;
        let Some(pcr7) = digests.value().first() else {
            tracing::warn!(
                "the TPM has no SHA-256 bank for PCR 7: new keys are not bound to the boot state (set [hsm] boot_pcrs = [] to say so, or allocate the SHA-256 bank)"
            );
            return Ok(Vec::new());
        };
        let measured = pcr7.value().iter().any(|b| *b != 0);
        Ok(if measured { vec![7] } else { Vec::new() })
    }

    fn auth_of(&self, op: Op, id: &str) -> Result<tss_esapi::structures::Auth> {
        tss_esapi::structures::Auth::try_from(object_auth(&self.auth_secret, id).to_vec())
            .map_err(tss(op, Some(id)))
    }

    /// Loads (creating first if asked) the blob `id`. A new key gets an
    /// auth value and, on a platform that measures its boot, a policy on
    /// the boot PCRs.
    fn ensure_blob(&self, op: Op, id: &str, blob: Blob, create: bool) -> Result<KeyBlob> {
        check_id(BACKEND, op, id)?;
        if let Some(b) = self.read_blob(op, id, blob)? {
            return Ok(b);
        }
        if !create {
            return Err(err(op, Some(id), ErrorKind::KeyNotFound));
        }
        let auth = self.auth_of(op, id)?;
        let mut sensitive = None;
        if blob == Blob::Sealed {
            let mut secret = Zeroizing::new(vec![0u8; 32]);
            getrandom::fill(&mut secret)
                .map_err(|e| err(op, Some(id), ErrorKind::Backend(format!("random: {e}"))))?;
            sensitive = Some(SensitiveData::try_from(secret.to_vec()).map_err(tss(op, Some(id)))?);
        }
        let (created, pcrs) = {
            let mut inner = self.lock(op, Some(id))?;
            let primary = inner.primary;
            let pcrs = self.boot_pcrs(&mut inner).map_err(tss(op, Some(id)))?;
            let policy = if pcrs.is_empty() {
                None
            } else {
                let selection = sha256_selection(&pcrs).map_err(tss(op, Some(id)))?;
                Some(boot_policy(&mut inner.ctx, selection).map_err(tss(op, Some(id)))?)
            };
            let template = match blob {
                Blob::Signing => signing_template(false, policy.as_ref()),
                Blob::Attestation => signing_template(true, policy.as_ref()),
                Blob::Sealed => sealed_template(policy.as_ref()),
            }
            .map_err(tss(op, Some(id)))?;
            let created = inner
                .salted(|ctx| ctx.create(primary, template, Some(auth), sensitive, None, None))
                .map_err(tss(op, Some(id)))?;
            (created, pcrs)
        };
        if !pcrs.is_empty() {
            tracing::info!(key = id, ?pcrs, "TPM key bound to the boot state");
        }
        let protection = Protection { auth: true, pcrs };
        let bytes = encode_blob(&created.out_public, &created.out_private, &protection)
            .map_err(tss(op, Some(id)))?;
        let path = self.blob_path(id, blob);
        state::create_only(&path, &bytes).map_err(|e| {
            err(
                op,
                Some(id),
                ErrorKind::Backend(format!("{}: {e}", path.display())),
            )
        })?;
        // Whoever won a creation race, the file is the key.
        self.read_blob(op, id, blob)?.ok_or_else(|| {
            err(
                op,
                Some(id),
                ErrorKind::Backend("key vanished while being created".into()),
            )
        })
    }

    /// Loads a blob into the TPM, runs `f` with its handle (authorized by
    /// its auth value, through its boot policy if it has one), flushes it.
    fn with_loaded<T>(
        &self,
        op: Op,
        id: &str,
        blob: KeyBlob,
        f: impl FnOnce(&mut Context, KeyHandle) -> tss_esapi::Result<T>,
    ) -> Result<T> {
        let auth = if blob.protection.auth {
            Some(self.auth_of(op, id)?)
        } else {
            None
        };
        let mut inner = self.lock(op, Some(id))?;
        let primary = inner.primary;
        let handle = inner
            .salted(|ctx| ctx.load(primary, blob.private, blob.public))
            .map_err(tss(op, Some(id)))?;
        let result = match auth {
            Some(a) => inner.ctx.tr_set_auth(handle.into(), a),
            None => Ok(()),
        }
        .and_then(|()| {
            if blob.protection.pcrs.is_empty() {
                inner.salted(|ctx| f(ctx, handle))
            } else {
                inner.with_boot_policy(&blob.protection.pcrs, |ctx| f(ctx, handle))
            }
        });
        let flushed = inner.ctx.flush_context(ObjectHandle::from(handle));
        let value = result.map_err(|e| policy_error(op, id, &blob.protection.pcrs, e))?;
        flushed.map_err(tss(op, Some(id)))?;
        Ok(value)
    }

    /// TPM2_Certify of signing key `key` by attestation key `ak`. Both are
    /// loaded at once: the key's admin role takes its auth value by HMAC
    /// in the salted session (adminWithPolicy is clear); the AK's user role
    /// needs a second session, an HMAC one salted with the primary or,
    /// where the AK is bound to the boot state, its boot policy.
    fn certify_loaded(
        &self,
        (key, key_blob): (&str, KeyBlob),
        (ak, ak_blob): (&str, KeyBlob),
        data: Data,
    ) -> Result<(tss_esapi::structures::Attest, Signature)> {
        let op = Op::Certify;
        let auth = |id: &str, blob: &KeyBlob| {
            blob.protection
                .auth
                .then(|| self.auth_of(op, id))
                .transpose()
        };
        let key_auth = auth(key, &key_blob)?;
        let ak_auth = auth(ak, &ak_blob)?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        let mut inner = self.lock(op, Some(key))?;
        let primary = inner.primary;
        let object = inner
            .salted(|ctx| ctx.load(primary, key_blob.private, key_blob.public))
            .map_err(tss(op, Some(key)))?;
        let signer = match inner.salted(|ctx| ctx.load(primary, ak_blob.private, ak_blob.public)) {
            Ok(h) => h,
            Err(e) => {
                let _ = inner.ctx.flush_context(object.into());
                return Err(tss(op, Some(ak))(e));
            }
        };
        let salted = inner.salted;
        let result = (|| {
            if let Some(a) = key_auth {
                inner.ctx.tr_set_auth(object.into(), a)?;
            }
            if let Some(a) = ak_auth {
                inner.ctx.tr_set_auth(signer.into(), a)?;
            }
            let pcrs = &ak_blob.protection.pcrs;
            let second = if pcrs.is_empty() {
                start_session(&mut inner.ctx, Some(primary), SessionType::Hmac)?
            } else {
                use tss_esapi::interface_types::session_handles::PolicySession;
                let selection = sha256_selection(pcrs)?;
                let s = start_session(&mut inner.ctx, Some(primary), SessionType::Policy)?;
                let satisfied = PolicySession::try_from(s).and_then(|policy| {
                    inner
                        .ctx
                        .policy_pcr(policy, Digest::default(), selection)
                        .and_then(|()| inner.ctx.policy_auth_value(policy))
                });
                if let Err(e) = satisfied {
                    let _ = inner.ctx.flush_context(SessionHandle::from(s).into());
                    return Err(e);
                }
                s
            };
            let out = inner
                .ctx
                .execute_with_sessions((Some(salted), Some(second), None), |ctx| {
                    ctx.certify(object.into(), signer, data, scheme)
                });
            let _ = inner.ctx.flush_context(SessionHandle::from(second).into());
            out
        })();
        let _ = inner.ctx.flush_context(object.into());
        let _ = inner.ctx.flush_context(signer.into());
        result.map_err(|e| policy_error(op, ak, &ak_blob.protection.pcrs, e))
    }

    fn aead_cipher(&self, op: Op, id: &str, create: bool) -> Result<Arc<SoftAead>> {
        check_id(BACKEND, op, id)?;
        if let Some(c) = self.aead.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(c);
        }
        let blob = self.ensure_blob(op, id, Blob::Sealed, create)?;
        let secret = self.with_loaded(op, id, blob, |ctx, h| ctx.unseal(h.into()))?;
        let secret = Zeroizing::new(secret.value().to_vec());
        let cipher = Arc::new(
            SoftAead::new(&secret)
                .ok_or_else(|| err(op, Some(id), ErrorKind::AuthenticationFailed))?,
        );
        if let Ok(mut m) = self.aead.lock() {
            m.insert(id.to_owned(), cipher.clone());
        }
        Ok(cipher)
    }

    fn pcr_selection(&self) -> tss_esapi::Result<tss_esapi::structures::PcrSelectionList> {
        let slot = PcrSlot::try_from(1u32 << self.config.pcr)?;
        PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &[slot])
            .build()
    }

    fn pcr_handle(&self) -> Result<PcrHandle> {
        PcrHandle::try_from(u32::from(self.config.pcr)).map_err(|_| {
            err(
                Op::Extend,
                None,
                ErrorKind::InvalidArgument(format!("pcr {}", self.config.pcr)),
            )
        })
    }
}

/// A key's TPM2B_PUBLIC: the TPMT_PUBLIC with its size in front, as
/// `tpm2_create -u` writes it.
fn tpm2b_public(op: Op, id: &str, public: &Public) -> Result<Vec<u8>> {
    let area = public.marshall().map_err(tss(op, Some(id)))?;
    let len = u16::try_from(area.len()).map_err(|_| {
        err(
            op,
            Some(id),
            ErrorKind::Backend("public area too large".into()),
        )
    })?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&area);
    Ok(out)
}

fn null_ticket() -> tss_esapi::Result<HashcheckTicket> {
    HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
}

impl Hsm for TpmHsm {
    fn close(&self) {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .release();
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn signing_key(&self, id: &str) -> Result<Vec<u8>> {
        let KeyBlob { public, .. } = self.ensure_blob(Op::SigningKey, id, Blob::Signing, true)?;
        sec1(&public).ok_or_else(|| err(Op::SigningKey, Some(id), ErrorKind::WrongKeyKind))
    }

    fn attestation_key(&self, id: &str) -> Result<Vec<u8>> {
        let KeyBlob { public, .. } =
            self.ensure_blob(Op::SigningKey, id, Blob::Attestation, true)?;
        sec1(&public).ok_or_else(|| err(Op::SigningKey, Some(id), ErrorKind::WrongKeyKind))
    }

    fn public_key(&self, id: &str) -> Result<Vec<u8>> {
        check_id(BACKEND, Op::PublicKey, id)?;
        let blob = match self.read_blob(Op::PublicKey, id, Blob::Signing) {
            Err(HsmError {
                kind: ErrorKind::WrongKeyKind,
                ..
            }) => self.read_blob(Op::PublicKey, id, Blob::Attestation)?,
            other => other?,
        };
        let KeyBlob { public, .. } =
            blob.ok_or_else(|| err(Op::PublicKey, Some(id), ErrorKind::KeyNotFound))?;
        sec1(&public).ok_or_else(|| err(Op::PublicKey, Some(id), ErrorKind::WrongKeyKind))
    }

    fn sign_digest(&self, id: &str, digest: &[u8; 32]) -> Result<Vec<u8>> {
        let blob = self.ensure_blob(Op::Sign, id, Blob::Signing, false)?;
        let digest = Digest::try_from(digest.to_vec()).map_err(tss(Op::Sign, Some(id)))?;
        let ticket = null_ticket().map_err(tss(Op::Sign, Some(id)))?;
        let sig = self.with_loaded(Op::Sign, id, blob, |ctx, h| {
            ctx.sign(h, digest, SignatureScheme::Null, ticket)
        })?;
        der_signature(&sig).ok_or_else(|| {
            err(
                Op::Sign,
                Some(id),
                ErrorKind::Backend("unexpected signature type".into()),
            )
        })
    }

    fn aead_key(&self, id: &str) -> Result<()> {
        self.aead_cipher(Op::AeadKey, id, true).map(|_| ())
    }

    fn encrypt(&self, id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        check_encrypt_input(BACKEND, id, plaintext, aad)?;
        let cipher = self.aead_cipher(Op::Encrypt, id, false)?;
        cipher
            .seal(plaintext, aad)
            .map_err(|m| err(Op::Encrypt, Some(id), ErrorKind::Backend(m)))
    }

    fn decrypt(&self, id: &str, ciphertext: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        check_decrypt_input(BACKEND, id, ciphertext)?;
        let cipher = self.aead_cipher(Op::Decrypt, id, false)?;
        cipher
            .open(ciphertext, aad)
            .map_err(|_| err(Op::Decrypt, Some(id), ErrorKind::AuthenticationFailed))
    }

    fn random(&self, buf: &mut [u8]) -> Result<()> {
        let mut inner = self.lock(Op::Random, None)?;
        let mut filled = 0;
        while filled < buf.len() {
            let want = (buf.len() - filled).min(32);
            let got = inner.ctx.get_random(want).map_err(tss(Op::Random, None))?;
            let got = got.value();
            if got.is_empty() {
                return Err(err(
                    Op::Random,
                    None,
                    ErrorKind::Backend("TPM returned no random bytes".into()),
                ));
            }
            let n = got.len().min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&got[..n]);
            filled += n;
        }
        Ok(())
    }

    fn extend(&self, digest: &[u8; 32]) -> Result<()> {
        let handle = self.pcr_handle()?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(tss(Op::Extend, None))?,
        );
        let mut inner = self.lock(Op::Extend, None)?;
        inner
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
            .map_err(tss(Op::Extend, None))
    }

    fn read_register(&self) -> Result<[u8; 32]> {
        let selection = self.pcr_selection().map_err(tss(Op::ReadRegister, None))?;
        let mut inner = self.lock(Op::ReadRegister, None)?;
        let (_, _, digests) = inner
            .ctx
            .pcr_read(selection)
            .map_err(tss(Op::ReadRegister, None))?;
        digests
            .value()
            .first()
            .and_then(|d| <[u8; 32]>::try_from(d.value()).ok())
            .ok_or_else(|| {
                err(
                    Op::ReadRegister,
                    None,
                    ErrorKind::Backend("the TPM has no SHA-256 bank for this PCR".into()),
                )
            })
    }

    fn quote(&self, key: &str, nonce: &[u8]) -> Result<Quote> {
        check_nonce(BACKEND, key, nonce)?;
        let blob = self.ensure_blob(Op::Quote, key, Blob::Attestation, false)?;
        let public_key =
            sec1(&blob.public).ok_or_else(|| err(Op::Quote, Some(key), ErrorKind::WrongKeyKind))?;
        let selection = self.pcr_selection().map_err(tss(Op::Quote, Some(key)))?;
        let data = Data::try_from(nonce.to_vec()).map_err(tss(Op::Quote, Some(key)))?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        // The register is read after the quote; an extend in between is
        // seen (the quoted digest is not the register's) and quoted again.
        let (attest, signature, register) = {
            let mut tries = 0;
            loop {
                let (attest, signature) =
                    self.with_loaded(Op::Quote, key, blob.clone(), |ctx, h| {
                        ctx.quote(h, data.clone(), scheme, selection.clone())
                    })?;
                let register = self.read_register()?;
                let quoted = match attest.attested() {
                    tss_esapi::structures::AttestInfo::Quote { info } => {
                        info.pcr_digest().value().to_vec()
                    }
                    _ => Vec::new(),
                };
                tries += 1;
                if quoted == <sha2::Sha256 as sha2::Digest>::digest(register).as_slice()
                    || tries == 5
                {
                    break (attest, signature, register);
                }
            }
        };
        Ok(Quote {
            backend: BACKEND,
            register,
            nonce: nonce.to_vec(),
            message: attest.marshall().map_err(tss(Op::Quote, Some(key)))?,
            signature: signature.marshall().map_err(tss(Op::Quote, Some(key)))?,
            public_key,
        })
    }

    fn attestation_public(&self, id: &str) -> Result<Option<Vec<u8>>> {
        check_id(BACKEND, Op::PublicKey, id)?;
        let KeyBlob { public, .. } = self
            .read_blob(Op::PublicKey, id, Blob::Attestation)?
            .ok_or_else(|| err(Op::PublicKey, Some(id), ErrorKind::KeyNotFound))?;
        tpm2b_public(Op::PublicKey, id, &public).map(Some)
    }

    fn endorsement_certificate(&self) -> Result<Option<Vec<u8>>> {
        use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
        use tss_esapi::interface_types::key_bits::RsaKeyBits;
        let op = Op::EndorsementCertificate;
        let mut inner = self.lock(op, None)?;
        match tss_esapi::abstraction::ek::retrieve_ek_pubcert(
            &mut inner.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        ) {
            Ok(der) => Ok(Some(der)),
            // No such NV index: this TPM carries no EK certificate.
            Err(tss_esapi::Error::Tss2Error(rc))
                if rc.kind()
                    == Some(tss_esapi::constants::response_code::Tss2ResponseCodeKind::Handle) =>
            {
                Ok(None)
            }
            Err(e) => Err(tss(op, None)(e)),
        }
    }

    fn activate_credential(
        &self,
        id: &str,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        use tss_esapi::abstraction::AsymmetricAlgorithmSelection;
        use tss_esapi::constants::response_code::Tss2ResponseCodeKind as Kind;
        use tss_esapi::handles::AuthHandle;
        use tss_esapi::interface_types::key_bits::RsaKeyBits;
        use tss_esapi::interface_types::session_handles::PolicySession;
        use tss_esapi::structures::{EncryptedSecret, IdObject};
        let op = Op::ActivateCredential;
        let bad = |what: &str| {
            err(
                op,
                Some(id),
                ErrorKind::InvalidArgument(format!("the credential's {what} is malformed")),
            )
        };
        let credential = IdObject::try_from(id_object.to_vec()).map_err(|_| bad("id object"))?;
        let secret =
            EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(|_| bad("secret"))?;
        let blob = self.ensure_blob(op, id, Blob::Attestation, false)?;
        let auth = if blob.protection.auth {
            Some(self.auth_of(op, id)?)
        } else {
            None
        };
        let mut inner = self.lock(op, Some(id))?;
        let primary = inner.primary;
        let ak = inner
            .salted(|ctx| ctx.load(primary, blob.private, blob.public))
            .map_err(tss(op, Some(id)))?;
        // The AK's admin role (ActivateCredential) takes its auth value by
        // HMAC in the salted session (adminWithPolicy is clear).
        if let Some(a) = auth
            && let Err(e) = inner.ctx.tr_set_auth(ak.into(), a)
        {
            let _ = inner.ctx.flush_context(ak.into());
            return Err(tss(op, Some(id))(e));
        }
        // The EK, derived from the endorsement seed with the default
        // template (the key its certificate certifies); its policy asks
        // for the endorsement hierarchy's authorization (PolicySecret).
        let ek = tss_esapi::abstraction::ek::create_ek_object_2(
            &mut inner.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            None,
        );
        let ek = match ek {
            Ok(ek) => ek,
            Err(e) => {
                let _ = inner.ctx.flush_context(ak.into());
                return Err(tss(op, Some(id))(e));
            }
        };
        let salted = inner.salted;
        let result = (|| {
            let session = start_session(&mut inner.ctx, None, SessionType::Policy)?;
            let out = (|| {
                let policy = PolicySession::try_from(session)?;
                inner.ctx.execute_with_nullauth_session(|ctx| {
                    ctx.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })?;
                inner
                    .ctx
                    .execute_with_sessions((Some(salted), Some(session), None), |ctx| {
                        ctx.activate_credential(ak, ek, credential, secret)
                    })
            })();
            let _ = inner.ctx.flush_context(SessionHandle::from(session).into());
            out
        })();
        let _ = inner.ctx.flush_context(ak.into());
        let _ = inner.ctx.flush_context(ek.into());
        let digest = result.map_err(|e| match e {
            // The TPM refuses a credential made for another EK or AK
            // (integrity check of the id object fails, or the seed does
            // not decrypt).
            tss_esapi::Error::Tss2Error(rc)
                if matches!(
                    rc.kind(),
                    Some(Kind::Integrity | Kind::Value | Kind::Size | Kind::Insufficient)
                ) =>
            {
                err(op, Some(id), ErrorKind::AuthenticationFailed)
            }
            e => tss(op, Some(id))(e),
        })?;
        Ok(Zeroizing::new(digest.value().to_vec()))
    }

    fn certify(&self, key: &str, ak: &str, nonce: &[u8]) -> Result<Certification> {
        let op = Op::Certify;
        check_nonce(BACKEND, key, nonce)?;
        let key_blob = self.ensure_blob(op, key, Blob::Signing, false)?;
        let ak_blob = self.ensure_blob(op, ak, Blob::Attestation, false)?;
        let data = Data::try_from(nonce.to_vec()).map_err(tss(op, Some(key)))?;
        let public = tpm2b_public(op, key, &key_blob.public)?;
        let ak_public = tpm2b_public(op, ak, &ak_blob.public)?;
        let (attest, signature) = self.certify_loaded((key, key_blob), (ak, ak_blob), data)?;
        Ok(Certification {
            message: attest.marshall().map_err(tss(op, Some(key)))?,
            signature: signature.marshall().map_err(tss(op, Some(key)))?,
            public,
            ak_public,
        })
    }

    fn keys(&self) -> Result<Vec<KeyInfo>> {
        let dir = self.dir.join("keys");
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            err(
                Op::ListKeys,
                None,
                ErrorKind::Backend(format!("{}: {e}", dir.display())),
            )
        })?;
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((id, ext)) = name.rsplit_once('.') else {
                continue;
            };
            let (kind, blob) = match ext {
                "p256" => (KeyKind::EcdsaP256, Blob::Signing),
                "ak" => (KeyKind::EcdsaP256, Blob::Attestation),
                "aead" => (KeyKind::Aes256Gcm, Blob::Sealed),
                _ => continue,
            };
            if !edgeward_hsm::valid_key_id(id) {
                continue;
            }
            let public_key = match blob {
                Blob::Sealed => None,
                _ => self
                    .read_blob(Op::ListKeys, id, blob)?
                    .and_then(|b| sec1(&b.public)),
            };
            out.push(KeyInfo {
                id: id.to_owned(),
                kind,
                public_key,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}
