//! Who may ask for what: the principal table (by the caller's uid, from
//! `SO_PEERCRED`) and, per key, what the key may be used for.
//!
//! | principal | who | may |
//! |---|---|---|
//! | root | uid 0 | every call |
//! | runtime | the uids given with `--runtime-uid` | public material, randomness, the register's value; create and read the device CA, JWT authority and broker client keys; sign digests with the broker client key only; have the device CA sign **module leaves only** (see [`check_leaf`]) and the JWT authority sign non-CA certificates; the AEAD keys of the registrations, the module data master key and the cache key; destroy registration keys; for enrollment, create the `attestation` key, open a credential for it and have it certify the device CA key |
//! | anyone else | | nothing: refused and logged (rate-limited) |
//!
//! For enrollment the runtime may also have the device CA sign a CSR for
//! its own key ([`check_own_request`]), create the attestation key (its
//! public part comes back), open a credential made for it, and have it
//! certify the device CA key (TPM2_Certify).
//!
//! Never to the runtime: a raw extend of the register, a bare quote, any
//! other attestation key, a certification of any other key, a signature
//! over a raw digest with the device CA, the JWT authority or the
//! attestation key, any other key.

use x509_parser::der_parser::Oid;
use x509_parser::oid_registry::{
    OID_X509_COMMON_NAME, OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS,
    OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
    OID_X509_EXT_SUBJECT_KEY_IDENTIFIER, OID_X509_ORGANIZATION_NAME,
};
use x509_parser::prelude::*;

/// The device CA's key.
pub const CA_KEY: &str = "device-ca";
/// The JWT authority's key.
pub const JWT_AUTHORITY_KEY: &str = "jwt-authority";
/// The broker client key (TLS to the fleet's broker).
pub const CLIENT_KEY: &str = "cloud-client";
/// The module data master key.
pub const MASTER_KEY: &str = "master-encryption";
/// The compiled-code cache's wrapping key.
pub const CACHE_KEY: &str = "cache-key";
/// The attestation key enrollment and evidence use.
pub const AK: &str = "attestation";
/// Registrations' own keys (PKCS#11).
pub const REGISTRATION_PREFIX: &str = "registration-";

/// Clock skew allowed on either side of a certificate's validity.
const SKEW: u64 = 600;

/// A caller, as the table knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// uid 0.
    Root,
    /// The runtime's uid.
    Runtime,
    /// Anyone else.
    Stranger,
}

/// What the device CA may certify and for how long.
#[derive(Debug, Clone)]
pub struct Policy {
    /// uids that are the runtime.
    pub runtime_uids: Vec<u32>,
    /// The key daemon's own user: like root, it may do everything (it can
    /// read the key files anyway), unless [`Policy::owner_is_runtime`].
    pub owner: u32,
    /// The owner (root included, when it is root) is the runtime's
    /// principal, not root's: a private key daemon of a runtime that runs
    /// module code (`--private-runtime`) serves it what a runtime may ask
    /// for, so code that escapes a module into it gets no more.
    pub owner_is_runtime: bool,
    /// The trust domain.
    pub trust_domain: String,
    /// This device's id.
    pub device_id: String,
    /// The longest leaf the device CA signs for the runtime (seconds).
    pub max_leaf_ttl: u64,
    /// The longest certificate the JWT authority signs (seconds).
    pub max_jwt_key_ttl: u64,
}

impl Policy {
    /// Who `uid` is.
    pub fn principal(&self, uid: u32) -> Principal {
        if self.owner_is_runtime && uid == self.owner {
            Principal::Runtime
        } else if uid == 0 || uid == self.owner {
            Principal::Root
        } else if self.runtime_uids.contains(&uid) {
            Principal::Runtime
        } else {
            Principal::Stranger
        }
    }

    /// The module namespace of this device's SPIFFE IDs.
    fn module_prefix(&self) -> String {
        format!(
            "spiffe://{}/device/{}/module/",
            self.trust_domain, self.device_id
        )
    }

    /// Whether `who` may make `call`; `Err` says why not. `ca_point`
    /// reads the device CA's public point (for its own root).
    ///
    /// # Errors
    ///
    /// The refusal, naming the operation, the key and the rule.
    pub fn authorize(
        &self,
        who: Principal,
        call: &edgeward_proto::Call,
        now: u64,
        ca_point: &dyn Fn() -> Option<Vec<u8>>,
    ) -> Result<(), String> {
        use edgeward_proto::Call as C;
        match who {
            Principal::Root => return Ok(()),
            Principal::Stranger => {
                return Err("this uid is not in the key daemon's principal table".into());
            }
            Principal::Runtime => {}
        }
        let named = |keys: &[&str], id: &str| keys.contains(&id);
        let aead = |id: &str| {
            id == MASTER_KEY
                || id == CACHE_KEY
                || id
                    .strip_prefix(REGISTRATION_PREFIX)
                    .is_some_and(|g| !g.is_empty())
        };
        let refuse = |why: &str| {
            Err(format!(
                "{} {}: {why}",
                call.name(),
                call.key().map(|k| format!("{k:?}")).unwrap_or_default()
            ))
        };
        match call {
            // Events are logged and extended together: the runtime adds to
            // the device's history, it cannot rewrite it. Evidence is the
            // quote with the log it covers, over a verifier's nonce.
            C::Measure { .. } | C::Evidence { .. } => Ok(()),
            C::Hello {}
            | C::Random { .. }
            | C::ReadRegister {}
            | C::Keys {}
            | C::EndorsementCertificate {}
            | C::AttestationPublic { .. } => Ok(()),
            C::SigningKey { id } | C::PublicKey { id }
                if named(&[CA_KEY, JWT_AUTHORITY_KEY, CLIENT_KEY], id) =>
            {
                Ok(())
            }
            C::SignDigest { id, .. } if id == CLIENT_KEY => Ok(()),
            // Its CSR (enrollment): no more than the digests it may sign.
            C::SignCertificate { id, .. } if id == CLIENT_KEY => Ok(()),
            C::SignCertificate { id, tbs } if id == CA_KEY => check_leaf(self, &tbs.0, now)
                .or_else(|leaf| match ca_point() {
                    Some(p)
                        if check_own_root(&tbs.0, &p, now).is_ok()
                            || check_own_request(&tbs.0, &p).is_ok() =>
                    {
                        Ok(())
                    }
                    _ => Err(leaf),
                })
                .or_else(|e| refuse(&e)),
            C::SignCertificate { id, tbs } if id == JWT_AUTHORITY_KEY => {
                check_not_ca(&tbs.0, now, self.max_jwt_key_ttl).or_else(|e| refuse(&e))
            }
            C::AeadKey { id } | C::Encrypt { id, .. } | C::Decrypt { id, .. } if aead(id) => Ok(()),
            C::DestroyKey { id }
                if id
                    .strip_prefix(REGISTRATION_PREFIX)
                    .is_some_and(|g| !g.is_empty()) =>
            {
                Ok(())
            }
            C::Extend { .. } => refuse("the runtime's events go through the log; no raw extend"),
            // Enrollment at the daemon's start: the attestation key made
            // (its public part only comes back), its credential opened,
            // and the device CA key certified by it. Each says
            // only what is true of this TPM's own keys; a bare quote
            // stays root's.
            C::AttestationKey { id } | C::ActivateCredential { id, .. } if id == AK => Ok(()),
            // The device CA key only: a certification cannot tell it
            // from the broker key (one template), and the runtime signs
            // any digest with that one.
            C::Certify { key, ak, .. } if ak == AK && key == CA_KEY => Ok(()),
            C::Quote { .. }
            | C::AttestationKey { .. }
            | C::ActivateCredential { .. }
            | C::Certify { .. } => refuse("root only"),
            _ => refuse("not a key or use the runtime is allowed"),
        }
    }
}

/// A `TBSCertificate` as the key daemon reads it.
fn parse(tbs: &[u8]) -> Result<TbsCertificate<'_>, String> {
    match TbsCertificate::from_der(tbs) {
        Ok(([], t)) => Ok(t),
        Ok(_) => Err("trailing bytes after the TBSCertificate".into()),
        Err(e) => Err(format!("not a DER TBSCertificate: {e}")),
    }
}

/// Every extension understood and one of `allowed`: an extension the
/// parser cannot read (which some of its accessors would report as absent)
/// or does not know is refused, never skipped.
fn only_extensions(t: &TbsCertificate<'_>, allowed: &[&Oid<'static>]) -> Result<(), String> {
    for ext in t.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::ParseError { error } => {
                return Err(format!("extension {}: unreadable ({error})", ext.oid));
            }
            ParsedExtension::UnsupportedExtension { .. } => {
                return Err(format!(
                    "extension {}: not one the key daemon reads",
                    ext.oid
                ));
            }
            _ => {}
        }
        if !allowed.contains(&&ext.oid) {
            return Err(format!("extension {}: not allowed here", ext.oid));
        }
    }
    Ok(())
}

/// What a leaf may carry.
const LEAF_EXTENSIONS: &[&Oid<'static>] = &[
    &OID_X509_EXT_BASIC_CONSTRAINTS,
    &OID_X509_EXT_KEY_USAGE,
    &OID_X509_EXT_EXTENDED_KEY_USAGE,
    &OID_X509_EXT_SUBJECT_ALT_NAME,
    &OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
    &OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
];

/// A leaf: only [`LEAF_EXTENSIONS`], all readable; basicConstraints
/// present with cA=false; a key usage of digital signatures at most; an
/// extended key usage of TLS server and client at most; a subject of at
/// most an organisation and a common name; valid from now for at most
/// `max` seconds.
fn check_leaf_shape(t: &TbsCertificate<'_>, now: u64, max: u64) -> Result<(), String> {
    only_extensions(t, LEAF_EXTENSIONS)?;
    match t.basic_constraints() {
        Ok(Some(b)) if !b.value.ca => {}
        Ok(Some(_)) => {
            return Err(
                "a CA certificate (basicConstraints cA=true): this key signs leaves only".into(),
            );
        }
        Ok(None) => return Err("no basicConstraints: a leaf says cA=false".into()),
        Err(e) => return Err(format!("basicConstraints: {e}")),
    }
    if let Some(k) = t.key_usage().map_err(|e| format!("keyUsage: {e}"))? {
        let k = k.value;
        if k.key_cert_sign()
            || k.crl_sign()
            || k.key_agreement()
            || k.key_encipherment()
            || k.data_encipherment()
            || k.encipher_only()
            || k.decipher_only()
            || k.non_repudiation()
        {
            return Err("keyUsage beyond digitalSignature".into());
        }
    }
    if let Some(e) = t
        .extended_key_usage()
        .map_err(|e| format!("extendedKeyUsage: {e}"))?
    {
        let e = e.value;
        if e.any
            || e.code_signing
            || e.email_protection
            || e.time_stamping
            || e.ocsp_signing
            || !e.other.is_empty()
        {
            return Err("extendedKeyUsage beyond TLS server and client".into());
        }
    }
    for attr in t.subject().iter_attributes() {
        let oid = attr.attr_type();
        if *oid != OID_X509_COMMON_NAME && *oid != OID_X509_ORGANIZATION_NAME {
            return Err(format!(
                "subject attribute {oid}: a leaf's subject is at most O and CN"
            ));
        }
    }
    lifetime_within(t, now, max)
}

fn lifetime_within(t: &TbsCertificate<'_>, now: u64, max: u64) -> Result<(), String> {
    let nb = t.validity().not_before.timestamp();
    let na = t.validity().not_after.timestamp();
    let now = i64::try_from(now).map_err(|_| "clock out of range".to_owned())?;
    let skew = SKEW as i64;
    if nb < now - skew || nb > now + skew {
        return Err(format!("notBefore {nb} is not now ({now} +/- {SKEW} s)"));
    }
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    if na < nb || na - now > max.saturating_add(skew) {
        return Err(format!(
            "valid until {na}: longer than the {max} s this key certifies for"
        ));
    }
    Ok(())
}

/// A module name as the runtime accepts one: `[a-z0-9][a-z0-9._-]{0,62}`
/// (so never `.` or `..`).
fn module_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

/// A certificate that is a leaf (see [`check_leaf_shape`]) for at most
/// `max` seconds from now: what the JWT authority certifies.
///
/// # Errors
///
/// What breaks the rule.
pub fn check_not_ca(tbs: &[u8], now: u64, max: u64) -> Result<(), String> {
    let t = parse(tbs)?;
    check_leaf_shape(&t, now, max)
}

/// What the device CA signs for the runtime: a module's leaf (the shape
/// of [`check_leaf_shape`]; names: at least one URI, every URI a SPIFFE ID
/// of one module of this device, DNS names and IP addresses for a
/// module's server certificate, nothing else; at most `max_leaf_ttl` from
/// now).
///
/// # Errors
///
/// What breaks the rule.
pub fn check_leaf(policy: &Policy, tbs: &[u8], now: u64) -> Result<(), String> {
    let t = parse(tbs)?;
    check_leaf_shape(&t, now, policy.max_leaf_ttl)?;
    let prefix = policy.module_prefix();
    let mut uris = 0;
    if let Some(san) = t
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName: {e}"))?
    {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => {
                    uris += 1;
                    let module = u.strip_prefix(&prefix).ok_or_else(|| {
                        format!("the URI name {u:?} is not a module of this device ({prefix}…)")
                    })?;
                    if !module_name(module) {
                        return Err(format!("the URI name {u:?} does not name one module"));
                    }
                }
                GeneralName::DNSName(_) | GeneralName::IPAddress(_) => {}
                other => {
                    return Err(format!(
                        "a subjectAltName of another kind ({other:?}): a module's leaf names URIs, DNS names and addresses only"
                    ));
                }
            }
        }
    }
    if uris == 0 {
        return Err("no SPIFFE ID (a URI subjectAltName) in this device's module namespace".into());
    }
    Ok(())
}

/// A PKCS#10 CertificationRequestInfo for the device CA's own key
/// (`point`): the CSR enrollment sends, signed by the key it names. It
/// proves possession of that key to the organisation, which builds the
/// certificate itself; it certifies nothing. Its DER cannot be read as a
/// TBSCertificate (the subject `Name` stands where a certificate's
/// algorithm identifier would), so the signature is no certificate's.
/// Version 1, a subject of O and CN at most, nothing after it.
///
/// # Errors
///
/// Anything else.
pub fn check_own_request(cri: &[u8], point: &[u8]) -> Result<(), String> {
    use x509_parser::certification_request::X509CertificationRequestInfo;
    let (rest, r) = X509CertificationRequestInfo::from_der(cri)
        .map_err(|e| format!("not a DER CertificationRequestInfo: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the CertificationRequestInfo".into());
    }
    if r.version.0 != 0 {
        return Err("a CertificationRequestInfo is version 1".into());
    }
    if r.subject_pki.subject_public_key.data.as_ref() != point {
        return Err("a request for another key than the device CA's own".into());
    }
    for attr in r.subject.iter_attributes() {
        let oid = attr.attr_type();
        if *oid != OID_X509_COMMON_NAME && *oid != OID_X509_ORGANIZATION_NAME {
            return Err(format!(
                "subject attribute {oid}: a request's subject is at most O and CN"
            ));
        }
    }
    Ok(())
}

/// The longest-lived self-signed root of its own key the device CA signs
/// for the runtime (ten years, and a day of slack).
const MAX_ROOT_LIFETIME: u64 = (10 * 365 + 1) * 24 * 3600;

/// The self-signed root of the device CA's own key (`point`), the one CA
/// certificate the runtime may have the device CA sign (it makes it when
/// the organisation has not certified the device CA): self-issued, for
/// that key, `pathLen:0` (it can certify leaves only, and leaves are held
/// to [`check_leaf`]), no extension but basicConstraints, keyUsage and the
/// key identifiers, from now for at most ten years.
///
/// # Errors
///
/// Anything else.
pub fn check_own_root(tbs: &[u8], point: &[u8], now: u64) -> Result<(), String> {
    let t = parse(tbs)?;
    if t.subject_pki.subject_public_key.data.as_ref() != point {
        return Err("not for the device CA's own key".into());
    }
    if t.issuer().as_raw() != t.subject().as_raw() {
        return Err("not self-issued".into());
    }
    only_extensions(
        &t,
        &[
            &OID_X509_EXT_BASIC_CONSTRAINTS,
            &OID_X509_EXT_KEY_USAGE,
            &OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
            &OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
        ],
    )?;
    match t.basic_constraints() {
        Ok(Some(b)) if b.value.ca && b.value.path_len_constraint == Some(0) => {}
        _ => return Err("a root of the device CA's key is cA=true with pathLen:0".into()),
    }
    lifetime_within(&t, now, MAX_ROOT_LIFETIME)
}
