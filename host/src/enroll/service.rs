//! The organisation's side of enrollment (`edgeward fleet enroll serve`):
//! stateless between a device's two messages (the challenge carries what
//! the proof is checked against, under the service's MAC), so instances
//! sharing the challenge key and the audit log serve one fleet.
//!
//! It refuses, naming the [`Step`]. A proof's challenge is checked
//! first (it costs an HMAC): made by the service, for this request, not
//! expired. Then, for both messages, in this order: a malformed request;
//! a factory certificate that does not chain to a trusted manufacturer
//! CA; a revoked device (its EK, by public key) or manufacturer CA on its
//! chain (the revocation list is read again for every message); an
//! identity the enrollment list does not admit (a group entry never
//! admits an id an individual entry reserves). Then, for a proof: a
//! credential the device could not open (its AK is not in the TPM of that
//! EK); a certification that does not prove the key TPM-resident and
//! non-exportable; a CSR whose signature or key is not the certified
//! key's; a device id other than the one the list assigns, a device that
//! enrolled under another id, an id held by another device, or a used
//! nonce (the audit log, under its lock). Then it issues the device CA
//! certificate (`pathlen:0`, never outliving the organisation CA) and
//! appends the enrollment to the audit log (JSON lines, fsynced), and
//! only then answers. The same device enrolling the same key again gets
//! the recorded chain while it has more than half its lifetime left:
//! issuance is idempotent, so a device whose answer was lost retries.
//!
//! Who reaches it: any device that can publish on the enrollment topics
//! (the broker's enrollment listener admits unauthenticated devices; its
//! ACL confines them to those topics). What a hostile one can try, and
//! what stops it: a stolen EK certificate (it cannot open the credential
//! without that TPM); its own TPM's AK with another TPM's EK (the same);
//! a key made exportable, or imported (the certification's attributes);
//! another device's key in the CSR (the CSR's key must be the certified
//! one); another device's id (the list and the audit log); a replayed
//! proof (the nonce is used once); a forged or stale challenge (the MAC,
//! the expiry); huge or malformed messages ([`super::MAX_MESSAGE`], strict
//! JSON).

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, IsCa, KeyIdMethod, KeyUsagePurpose, PublicKeyData,
    SanType, SignatureAlgorithm, SigningKey,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::*;

use super::{Bytes, Challenge, Factory, Issued, Proof, Request, VERSION};
use crate::attest::{certify, credential, jcs};
use crate::identity::authority::{BACKDATE, PublicP256, edgeward_name, key_identifier};
use crate::measure::hex;

/// How long a renewal's answer is given again to the same keys.
const RENEWAL_REUSE: u64 = 600;

/// A step of the checks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The request's shape: version, id syntax, sizes.
    Request,
    /// The factory certificate chains to a trusted manufacturer root.
    FactoryChain,
    /// ...and neither it nor its issuer is revoked.
    Revoked,
    /// The enrollment list admits it.
    EnrollmentList,
    /// The challenge is the service's, current, for this request, unused.
    Challenge,
    /// The credential was opened: the AK lives in the EK's TPM.
    Activation,
    /// The device CA key is TPM-resident and non-exportable.
    Certification,
    /// The CSR is signed by the certified key.
    Csr,
    /// The device id is the one assigned, held by no other device.
    DeviceId,
    /// A renewal's current certificate: this CA's, valid now, recorded.
    Current,
    /// Issuing and recording (the service's own failures).
    Issue,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Request => "request",
            Self::FactoryChain => "factory-chain",
            Self::Revoked => "revoked",
            Self::EnrollmentList => "enrollment-list",
            Self::Challenge => "challenge",
            Self::Activation => "activation",
            Self::Certification => "certification",
            Self::Csr => "csr",
            Self::DeviceId => "device-id",
            Self::Current => "current-identity",
            Self::Issue => "issue",
        })
    }
}

/// Why a device was not enrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The step that refused.
    pub step: Step,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused at {}: {}", self.step, self.reason)
    }
}

impl std::error::Error for Refusal {}

fn at(step: Step) -> impl Fn(String) -> Refusal {
    move |reason| Refusal { step, reason }
}

/// The enrollment list: which devices may enroll, as what.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct List {
    /// Individual entries: one device by its factory certificate.
    #[serde(default)]
    pub device: Vec<DeviceEntry>,
    /// Group entries: every device whose factory certificate a
    /// manufacturer CA issued, under an id pattern.
    #[serde(default)]
    pub group: Vec<GroupEntry>,
    /// Symmetric-key groups: boards without a TPM holding a key derived
    /// from the group's secret (`[group_secrets]` in enroll.toml).
    #[serde(default)]
    pub symmetric: Vec<SymmetricEntry>,
}

/// A symmetric-key enrollment group.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymmetricEntry {
    /// Its name (what devices send).
    pub group: String,
    /// The ids its devices may take (one `*` at most).
    pub device_id: String,
    /// The groups they are in.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// One device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// `sha256:<hex>` of its factory certificate (DER).
    pub factory: String,
    /// The id it gets.
    pub device_id: String,
    /// The groups it is in.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Devices of one manufacturer CA.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    /// `sha256:<hex>` of the CA certificate (DER) that issued their
    /// factory certificates.
    pub manufacturer: String,
    /// The ids they may take: literal, or with one `*` standing for one
    /// or more id characters.
    pub device_id: String,
    /// The groups they are in.
    #[serde(default)]
    pub groups: Vec<String>,
}

impl List {
    /// Parses and checks an enrollment list (TOML).
    ///
    /// # Errors
    ///
    /// Not TOML of this shape, a bad fingerprint, id, pattern or group;
    /// named.
    pub fn parse(text: &str) -> Result<Self, String> {
        let list: Self = toml::from_str(text).map_err(|e| format!("enrollment list: {e}"))?;
        for d in &list.device {
            fingerprint_ok(&d.factory)?;
            if !crate::identity::valid_path_segment(&d.device_id) {
                return Err(format!(
                    "enrollment list: device id {:?} is not a valid id",
                    d.device_id
                ));
            }
            groups_ok(&d.groups)?;
        }
        for g in &list.symmetric {
            if !crate::cloud::topics::valid_group(&g.group) {
                return Err(format!(
                    "enrollment list: {:?} is not a valid group name",
                    g.group
                ));
            }
            pattern_ok(&g.device_id)?;
            groups_ok(&g.groups)?;
        }
        for g in &list.group {
            fingerprint_ok(&g.manufacturer)?;
            pattern_ok(&g.device_id)?;
            groups_ok(&g.groups)?;
        }
        Ok(list)
    }

    /// The symmetric-key group `group`'s entry for `requested`: the id (a
    /// group never admits an id an individual entry reserves) and groups.
    fn admits_symmetric(
        &self,
        group: &str,
        requested: &str,
    ) -> Result<(String, Vec<String>), String> {
        let entry = self
            .symmetric
            .iter()
            .find(|g| g.group == group)
            .ok_or_else(|| format!("no symmetric-key group {group:?} is on the enrollment list"))?;
        if self.device.iter().any(|d| d.device_id == requested) {
            return Err(format!(
                "{requested:?} is reserved for another device by an individual entry"
            ));
        }
        if !pattern_matches(&entry.device_id, requested) {
            return Err(format!(
                "group {group:?} does not admit the id {requested:?}"
            ));
        }
        Ok((requested.to_owned(), entry.groups.clone()))
    }

    /// The entry that admits a device whose factory identity is
    /// `factory`, issued through the manufacturer certificates `path`
    /// (fingerprints), and the id it assigns for `requested`. An
    /// individual entry wins; a group entry never admits an id an
    /// individual entry names (it is reserved for that device).
    fn admits(
        &self,
        factory: &str,
        path: &[String],
        requested: &str,
    ) -> Result<(String, Vec<String>), String> {
        if let Some(d) = self.device.iter().find(|d| d.factory == factory) {
            return Ok((d.device_id.clone(), d.groups.clone()));
        }
        let groups: Vec<&GroupEntry> = self
            .group
            .iter()
            .filter(|g| path.contains(&g.manufacturer))
            .collect();
        if groups.is_empty() {
            return Err(format!(
                "neither the device ({factory}) nor its manufacturer CA is on the enrollment list"
            ));
        }
        if self.device.iter().any(|d| d.device_id == requested) {
            return Err(format!(
                "{requested:?} is reserved for another device by an individual entry"
            ));
        }
        groups
            .iter()
            .find(|g| pattern_matches(&g.device_id, requested))
            .map(|g| (requested.to_owned(), g.groups.clone()))
            .ok_or_else(|| format!("the manufacturer's entries do not admit the id {requested:?}"))
    }
}

fn fingerprint_ok(f: &str) -> Result<(), String> {
    match f.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "enrollment list: {f:?} is not sha256:<64 lowercase hex digits>"
        )),
    }
}

fn pattern_ok(pattern: &str) -> Result<(), String> {
    if crate::identity::valid_path_segment(&pattern.replacen('*', "x", 1)) {
        Ok(())
    } else {
        Err(format!(
            "enrollment list: id pattern {pattern:?} is not an id with at most one '*'"
        ))
    }
}

fn groups_ok(groups: &[String]) -> Result<(), String> {
    match groups
        .iter()
        .find(|g| !crate::cloud::topics::valid_group(g))
    {
        Some(g) => Err(format!("enrollment list: {g:?} is not a valid group name")),
        None => Ok(()),
    }
}

/// Whether `id` matches `pattern` (literal, or one `*` for one or more
/// characters).
fn pattern_matches(pattern: &str, id: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == id,
        Some((head, tail)) => {
            id.len() > head.len() + tail.len() && id.starts_with(head) && id.ends_with(tail)
        }
    }
}

/// `sha256:<hex>` of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(der)))
}

/// A device's factory identity: `sha256:<hex>` of its EK certificate's
/// SubjectPublicKeyInfo (DER), as `fleet attest --ek` names it. The key,
/// not the certificate's bytes: an encoding of the same certificate
/// with other bytes (trailing data, a re-encoded signature) is the same
/// device.
///
/// # Errors
///
/// `der` is not exactly one X.509 certificate.
pub fn factory_fingerprint(der: &[u8]) -> Result<String, String> {
    match X509Certificate::from_der(der) {
        Ok(([], c)) => Ok(fingerprint(c.public_key().raw)),
        Ok(_) => Err("the EK certificate has trailing bytes".into()),
        Err(e) => Err(format!("the EK certificate is not DER X.509: {e}")),
    }
}

/// The organisation CA's key (P-256) as rcgen signs with it: from a PEM
/// file, or held by a key daemon (`edgeward-keyd --hsm pkcs11`: the key
/// in a token, never in this process).
pub struct CaKey {
    key: CaSigner,
    point: Vec<u8>,
}

enum CaSigner {
    File(p256::ecdsa::SigningKey),
    Daemon {
        hsm: std::sync::Arc<dyn crate::hsm::Hsm>,
        id: String,
    },
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaKey")
            .field("point", &hex(&self.point))
            .finish_non_exhaustive()
    }
}

impl CaKey {
    /// Reads a PKCS#8 or SEC1 PEM P-256 private key.
    ///
    /// # Errors
    ///
    /// Not such a key; named.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        use p256::pkcs8::DecodePrivateKey as _;
        let secret = p256::SecretKey::from_pkcs8_pem(pem)
            .or_else(|_| p256::SecretKey::from_sec1_pem(pem))
            .map_err(|_| "the CA key is not a PEM P-256 private key (PKCS#8 or SEC1)".to_owned())?;
        let key = p256::ecdsa::SigningKey::from(secret);
        let point = key
            .verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec();
        Ok(Self {
            key: CaSigner::File(key),
            point,
        })
    }

    /// The key `id` of the key daemon at `socket` (it must exist: made
    /// there, with `edgeward hsm` or the token's own tools).
    ///
    /// # Errors
    ///
    /// The key daemon cannot be reached, or has no such key; named.
    pub fn from_key_daemon(socket: &Path, id: &str) -> Result<Self, String> {
        let hsm = edgeward_proto::RemoteHsm::connect(socket)
            .map_err(|e| format!("the key daemon at {}: {e}", socket.display()))?;
        let point = crate::hsm::Hsm::public_key(&hsm, id)
            .map_err(|e| format!("key {id:?} of the key daemon at {}: {e}", socket.display()))?;
        Ok(Self {
            key: CaSigner::Daemon {
                hsm: std::sync::Arc::new(hsm),
                id: id.to_owned(),
            },
            point,
        })
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        use p256::ecdsa::signature::Signer as _;
        match &self.key {
            CaSigner::File(key) => {
                let sig: p256::ecdsa::Signature = key.sign(msg);
                Ok(sig.to_der().as_bytes().to_vec())
            }
            CaSigner::Daemon { hsm, id } => hsm.sign_certificate(id, msg).map_err(|e| {
                tracing::error!(key = %id, error = %e, "the organisation CA key could not sign");
                rcgen::Error::RemoteKeyError
            }),
        }
    }
}

/// What the service runs with.
pub struct Settings {
    /// The manufacturer certificates (roots and intermediates, each
    /// trusted) a factory certificate must chain to (DER).
    pub manufacturers: Vec<Vec<u8>>,
    /// Revoked factory identities and manufacturer certificates, by
    /// fingerprint.
    pub revoked: BTreeSet<String>,
    /// A revocation list read again for every message (so `fleet enroll
    /// revoke` reaches a running service).
    pub revoked_file: Option<PathBuf>,
    /// The enrollment list.
    pub list: List,
    /// The organisation CA's certificate (DER), which issues.
    pub ca_certificate: Vec<u8>,
    /// When it expires (Unix seconds): no device CA outlives it.
    pub ca_not_after: u64,
    /// What follows the device CA certificate in the chain (PEM: the
    /// organisation CA's certificate and its issuers).
    pub ca_chain: String,
    /// Its key.
    pub ca_key: CaKey,
    /// The trust domain of the devices' SPIFFE IDs.
    pub trust_domain: String,
    /// The DNS suffix of the devices' names: a device CA may certify
    /// `<device id>.<suffix>` and names under it, no IP address.
    pub dns_suffix: String,
    /// How long a device CA certificate is valid.
    pub lifetime: Duration,
    /// How long a challenge is.
    pub challenge_ttl: Duration,
    /// The key challenges are authenticated with (shared by instances).
    pub challenge_key: [u8; 32],
    /// The symmetric-key groups' secrets, by group.
    pub group_secrets: std::collections::BTreeMap<String, [u8; 32]>,
    /// The audit log (JSON lines; shared by instances on one host).
    pub audit: PathBuf,
    /// The fleet enrolled devices are assigned to, if any.
    pub fleet: Option<FleetSettings>,
}

/// `[fleet]` of `enroll.toml`: where enrolled devices connect, and the
/// CA that certifies their broker logins.
pub struct FleetSettings {
    /// `mqtts://HOST[:PORT]`.
    pub broker: String,
    /// The broker's roots (PEM), as devices pin them.
    pub broker_ca: String,
    /// The deployment keys' files' bytes.
    pub deployment_keys: Vec<Vec<u8>>,
    /// The logins CA's certificate (DER), which issues.
    pub logins_certificate: Vec<u8>,
    /// What follows a login certificate (PEM: the logins CA's
    /// certificates).
    pub logins_chain: String,
    /// When the logins CA expires (Unix seconds).
    pub logins_not_after: u64,
    /// Its key.
    pub logins_key: CaKey,
}

impl fmt::Debug for FleetSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetSettings")
            .field("broker", &self.broker)
            .field("deployment_keys", &self.deployment_keys.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Settings {
    // Never the challenge key: with it anyone computes the credential's
    // secret and the EK-AK binding is gone.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("manufacturers", &self.manufacturers.len())
            .field("revoked", &self.revoked.len())
            .field("revoked_file", &self.revoked_file)
            .field("trust_domain", &self.trust_domain)
            .field("dns_suffix", &self.dns_suffix)
            .field("lifetime", &self.lifetime)
            .field("challenge_ttl", &self.challenge_ttl)
            .field(
                "group_secrets",
                &self.group_secrets.keys().collect::<Vec<_>>(),
            )
            .field("audit", &self.audit)
            .field("fleet", &self.fleet)
            .finish_non_exhaustive()
    }
}

/// The service's configuration file (`enroll.toml`); relative paths are
/// the file's directory's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsToml {
    trust_domain: String,
    dns_suffix: String,
    #[serde(default = "default_lifetime")]
    lifetime: String,
    #[serde(default = "default_challenge_ttl")]
    challenge_ttl: String,
    manufacturers: PathBuf,
    list: PathBuf,
    #[serde(default)]
    revoked: Option<PathBuf>,
    ca_certificate: PathBuf,
    /// A PEM file, or with `ca_key_daemon`, the key's id there.
    ca_key: PathBuf,
    /// A key daemon's socket holding `ca_key` (a PKCS#11 token's).
    #[serde(default)]
    ca_key_daemon: Option<PathBuf>,
    challenge_key: PathBuf,
    audit: PathBuf,
    /// Symmetric-key groups' secrets: group = "path" (32 bytes each).
    #[serde(default)]
    group_secrets: std::collections::BTreeMap<String, PathBuf>,
    #[serde(default)]
    fleet: Option<FleetToml>,
}

/// `[fleet]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetToml {
    broker: String,
    broker_ca: PathBuf,
    deployment_keys: Vec<PathBuf>,
    logins_certificate: PathBuf,
    logins_key: PathBuf,
}

fn default_lifetime() -> String {
    "90d".into()
}

fn default_challenge_ttl() -> String {
    "5m".into()
}

/// The paths an `enroll.toml` names, resolved.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The revocation list (one `sha256:<hex>` per line, `#` comments).
    pub revoked: Option<PathBuf>,
    /// The audit log.
    pub audit: PathBuf,
}

impl Paths {
    /// The paths of the service configured by `path`, without loading
    /// the rest (keys stay unread).
    ///
    /// # Errors
    ///
    /// The file is unreadable or not an `enroll.toml`; named.
    pub fn load(path: &Path) -> Result<Self, String> {
        let (t, base) = read_settings(path)?;
        Ok(Self {
            revoked: t.revoked.map(|p| base.join(p)),
            audit: base.join(t.audit),
        })
    }
}

fn read_settings(path: &Path) -> Result<(SettingsToml, PathBuf), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t: SettingsToml = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((t, path.parent().map(Path::to_owned).unwrap_or_default()))
}

/// Reads a revocation list: `sha256:<hex>` fingerprints, one per line;
/// blank lines and `#` comments skipped; a missing file is empty.
///
/// # Errors
///
/// Unreadable, or a line that is not a fingerprint (named by number).
pub fn read_revoked(path: &Path) -> Result<BTreeSet<String>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        fingerprint_ok(line).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
        out.insert(line.to_owned());
    }
    Ok(out)
}

/// Appends `fingerprint` to the revocation list (fsynced), unless it is
/// there. Returns whether it was added.
///
/// # Errors
///
/// A bad fingerprint, or the file cannot be read or written.
pub fn revoke(path: &Path, fingerprint: &str, comment: &str) -> Result<bool, String> {
    fingerprint_ok(fingerprint)?;
    if read_revoked(path)?.contains(fingerprint) {
        return Ok(false);
    }
    let comment: String = comment.chars().filter(|c| !c.is_control()).collect();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(format!("{fingerprint} # {comment}\n").as_bytes())
        .and_then(|()| f.sync_data())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(true)
}

/// For the organisation CA key held by the key daemon `enroll.toml` (at
/// `path`) names in `ca_key_daemon` (its id is `ca_key`): makes the key
/// there if it is missing, and returns a CSR for it (PEM), or with
/// `self_signed` a root certificate of it (CA, ten years), named `cn`.
///
/// # Errors
///
/// No `ca_key_daemon`, the key daemon unreachable or refusing.
pub fn ca_key_certificate(path: &Path, cn: &str, self_signed: bool) -> Result<String, String> {
    let (t, base) = read_settings(path)?;
    let socket = base.join(t.ca_key_daemon.ok_or_else(|| {
        format!(
            "{}: ca_key_daemon: name the key daemon that holds the CA key",
            path.display()
        )
    })?);
    let id = t.ca_key.to_str().ok_or("ca_key: not UTF-8")?;
    let hsm = edgeward_proto::RemoteHsm::connect(&socket)
        .map_err(|e| format!("the key daemon at {}: {e}", socket.display()))?;
    crate::hsm::Hsm::signing_key(&hsm, id)
        .map_err(|e| format!("key {id:?} of the key daemon at {}: {e}", socket.display()))?;
    drop(hsm);
    let key = CaKey::from_key_daemon(&socket, id)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = edgeward_name(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if self_signed {
        let now = unix_now();
        let time = |t: u64| {
            ::time::OffsetDateTime::from_unix_timestamp(i64::try_from(t).unwrap_or(i64::MAX))
                .map_err(|e| e.to_string())
        };
        p.not_before = time(now.saturating_sub(BACKDATE.as_secs()))?;
        p.not_after = time(now + 10 * 365 * 86_400)?;
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| format!("random: {e}"))?;
        serial[0] = (serial[0] & 0x7f) | 0x40;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        p.self_signed(&key)
            .map(|c| c.pem())
            .map_err(|e| format!("signing the root: {e}"))
    } else {
        p.serialize_request(&key)
            .map_err(|e| format!("signing the CSR: {e}"))?
            .pem()
            .map_err(|e| e.to_string())
    }
}

impl Settings {
    /// Loads the service's settings from `enroll.toml` at `path`: the
    /// manufacturer roots, the list, the revocation list, the CA's
    /// certificate chain and key, the challenge key (exactly 32 bytes).
    ///
    /// # Errors
    ///
    /// Any file missing or malformed; named.
    pub fn load(path: &Path) -> Result<Self, String> {
        let (t, base) = read_settings(path)?;
        let file = |p: &Path| -> Result<Vec<u8>, String> {
            let p = base.join(p);
            std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
        };
        let text = |p: &Path| -> Result<String, String> {
            String::from_utf8(file(p)?).map_err(|_| format!("{}: not text", base.join(p).display()))
        };
        let named = |what: &str| {
            let path = path.display().to_string();
            let what = what.to_owned();
            move |e: String| format!("{path}: {what}: {e}")
        };
        let lifetime = crate::units::parse_duration(&t.lifetime).map_err(named("lifetime"))?;
        let challenge_ttl =
            crate::units::parse_duration(&t.challenge_ttl).map_err(named("challenge_ttl"))?;
        if !crate::identity::valid_path_segment(&t.trust_domain) || !t.trust_domain.contains('.') {
            return Err(named("trust_domain")(format!(
                "{:?} is not a domain",
                t.trust_domain
            )));
        }
        let manufacturers = crate::attest::verify::pem_certificates(
            &file(&t.manufacturers)?,
            &t.manufacturers.display().to_string(),
        )?;
        let key = match &t.ca_key_daemon {
            None => CaKey::from_pem(&text(&t.ca_key)?),
            Some(socket) => CaKey::from_key_daemon(
                &base.join(socket),
                t.ca_key.to_str().ok_or("ca_key: not UTF-8")?,
            ),
        }
        .map_err(named("ca_key"))?;
        let ca = load_ca(
            &text(&t.ca_certificate)?,
            key,
            (&t.ca_certificate.display().to_string(), "ca_certificate"),
        )
        .map_err(|(field, e)| named(if field { "ca_certificate" } else { "ca_key" })(e))?;
        let challenge_key: [u8; 32] = file(&t.challenge_key)?.try_into().map_err(|_| {
            named("challenge_key")("the file must hold exactly 32 random bytes".into())
        })?;
        let list = List::parse(&text(&t.list)?).map_err(named("list"))?;
        let mut group_secrets = std::collections::BTreeMap::new();
        for (group, p) in &t.group_secrets {
            let secret: [u8; 32] = file(p)?.try_into().map_err(|_| {
                named("group_secrets")(format!(
                    "{group}: the file must hold exactly 32 random bytes"
                ))
            })?;
            group_secrets.insert(group.clone(), secret);
        }
        if let Some(g) = list
            .symmetric
            .iter()
            .find(|g| !group_secrets.contains_key(&g.group))
        {
            return Err(named("group_secrets")(format!(
                "the list's symmetric-key group {:?} has no secret",
                g.group
            )));
        }
        let revoked_file = t.revoked.map(|p| base.join(p));
        let revoked = match &revoked_file {
            Some(p) => read_revoked(p)?,
            None => BTreeSet::new(),
        };
        if t.dns_suffix.is_empty()
            || !t
                .dns_suffix
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(named("dns_suffix")(format!(
                "{:?} is not a DNS name",
                t.dns_suffix
            )));
        }
        let fleet = match t.fleet {
            None => None,
            Some(f) => {
                crate::cloud::parse_broker(&f.broker).map_err(named("fleet.broker"))?;
                let broker_ca = text(&f.broker_ca)?;
                crate::attest::verify::pem_certificates(
                    broker_ca.as_bytes(),
                    &f.broker_ca.display().to_string(),
                )?;
                if f.deployment_keys.is_empty() {
                    return Err(named("fleet.deployment_keys")(
                        "name at least one key file".into(),
                    ));
                }
                let mut deployment_keys = Vec::new();
                for k in &f.deployment_keys {
                    let bytes = file(k)?;
                    crate::attest::publisher::PublicKey::from_any(&bytes).map_err(|e| {
                        named("fleet.deployment_keys")(format!(
                            "{}: not an Ed25519 public key: {e}",
                            k.display()
                        ))
                    })?;
                    deployment_keys.push(bytes);
                }
                let logins = load_ca(
                    &text(&f.logins_certificate)?,
                    CaKey::from_pem(&text(&f.logins_key)?).map_err(named("fleet.logins_key"))?,
                    (
                        &f.logins_certificate.display().to_string(),
                        "fleet.logins_certificate",
                    ),
                )
                .map_err(|(field, e)| {
                    named(if field {
                        "fleet.logins_certificate"
                    } else {
                        "fleet.logins_key"
                    })(e)
                })?;
                if logins.key.point == ca.key.point {
                    return Err(named("fleet.logins_certificate")(
                        "it is the CA that certifies device CAs: a module's certificate would log in to the broker; use a CA of its own"
                            .into(),
                    ));
                }
                Some(FleetSettings {
                    broker: f.broker,
                    broker_ca,
                    deployment_keys,
                    logins_certificate: logins.certificate,
                    logins_chain: logins.chain,
                    logins_not_after: logins.not_after,
                    logins_key: logins.key,
                })
            }
        };
        Ok(Self {
            manufacturers,
            revoked,
            revoked_file,
            ca_not_after: ca.not_after,
            list,
            ca_certificate: ca.certificate,
            ca_chain: ca.chain,
            ca_key: ca.key,
            trust_domain: t.trust_domain,
            dns_suffix: t.dns_suffix,
            lifetime,
            challenge_ttl,
            challenge_key,
            group_secrets,
            audit: base.join(t.audit),
            fleet,
        })
    }
}

/// A CA the service issues with, as loaded.
struct LoadedCa {
    certificate: Vec<u8>,
    chain: String,
    not_after: u64,
    key: CaKey,
}

/// Loads a CA from its certificates' PEM (`what` names the file) and its
/// key: the key is the first certificate's, which is a CA valid now.
/// `field` names the certificate's setting. The chain handed out is
/// rebuilt from the certificates alone. On error,
/// whether the certificate (`true`) or the key (`false`) is at fault.
fn load_ca(
    cert_text: &str,
    key: CaKey,
    (what, field): (&str, &str),
) -> Result<LoadedCa, (bool, String)> {
    if cert_text.contains("PRIVATE KEY") {
        return Err((
            true,
            "the file holds a private key, which would go to every device with the chain; \
             keep the key in its own file only"
                .into(),
        ));
    }
    let certs = crate::attest::verify::pem_certificates(cert_text.as_bytes(), what)
        .map_err(|e| (true, e))?;
    let chain: String = certs
        .iter()
        .map(|der| crate::identity::authority::pem_block("CERTIFICATE", der))
        .collect();
    let (_, ca) = X509Certificate::from_der(&certs[0]).map_err(|e| (true, e.to_string()))?;
    if ca.public_key().subject_public_key.data.as_ref() != key.point.as_slice() {
        return Err((false, format!("it is not the key of {field}")));
    }
    let is_ca = ca
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca);
    if !is_ca
        || !ca
            .validity()
            .is_valid_at(x509_parser::time::ASN1Time::now())
    {
        return Err((true, "it is not a CA certificate valid now".into()));
    }
    let not_after = u64::try_from(ca.validity().not_after.timestamp()).unwrap_or(0);
    Ok(LoadedCa {
        certificate: certs[0].clone(),
        chain,
        not_after,
        key,
    })
}

/// The service.
#[derive(Debug)]
pub struct Service {
    s: Settings,
}

/// Whom [`Service::finish`] issues to.
struct Holder<'a> {
    device_id: String,
    groups: Vec<String>,
    admitted_by: AdmittedBy,
    /// The factory identity's fingerprint.
    factory: String,
    /// The device CA key's point.
    point: Vec<u8>,
    broker_csr: Option<&'a str>,
}

/// What a request's factory certificate says, once checked.
struct Admitted {
    /// Its factory identity's fingerprint.
    fingerprint: String,
    /// The id and groups the list assigns.
    device_id: String,
    groups: Vec<String>,
    /// What the list admitted it by (recorded, and checked again at
    /// renewal).
    admitted_by: AdmittedBy,
    /// How it proves itself.
    proof: Admission,
}

/// What the list admitted a device by: a symmetric-key group, or its
/// manufacturer path (fingerprints, issuer first).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmittedBy {
    /// The symmetric-key group (empty for a TPM).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// The manufacturer certificates of its chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<String>,
}

/// What a device's proof is checked against.
enum Admission {
    /// A TPM: its EK's SubjectPublicKeyInfo (DER), its AK's name and point.
    Tpm {
        ek_spki: Vec<u8>,
        ak_name: Vec<u8>,
        ak_point: Vec<u8>,
    },
    /// A symmetric-key group's device: its derived key.
    Symmetric { device_key: [u8; 32] },
}

/// The SHA-256 (hex) of `request`'s canonical JSON: what a challenge
/// answers.
///
/// # Errors
///
/// It cannot be serialized.
pub fn request_digest(request: &Request) -> Result<String, String> {
    let value = serde_json::to_value(request).map_err(|e| e.to_string())?;
    Ok(hex(&Sha256::digest(jcs::canonical(&value)?.as_bytes())))
}

pub(crate) fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx =
        ring::hmac::Context::with_key(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key));
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// Equal, in time that does not depend on where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use p256::elliptic_curve::subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Service {
    /// A service with `settings`.
    pub fn new(settings: Settings) -> Self {
        Self { s: settings }
    }

    /// The first answer: checks the request and makes its challenge.
    ///
    /// # Errors
    ///
    /// The first step that refuses.
    pub fn challenge(&self, request: &Request) -> Result<Challenge, Refusal> {
        let f = self.check_request(request)?;
        let digest = request_digest(request).map_err(at(Step::Request))?;
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).map_err(|e| at(Step::Issue)(format!("random: {e}")))?;
        let expires = unix_now() + self.s.challenge_ttl.as_secs();
        let c = match &f.proof {
            Admission::Tpm {
                ek_spki, ak_name, ..
            } => credential::make(ek_spki, ak_name, &self.secret(&digest, &nonce))
                .map_err(at(Step::FactoryChain))?,
            // Its key answers the nonce itself.
            Admission::Symmetric { .. } => crate::attest::evidence::CredentialFile {
                id_object: Vec::new(),
                secret: Vec::new(),
            },
        };
        let mut challenge = Challenge {
            v: VERSION,
            request: digest,
            nonce: Bytes(nonce.to_vec()),
            expires,
            id_object: Bytes(c.id_object),
            secret: Bytes(c.secret),
            mac: Bytes(Vec::new()),
        };
        challenge.mac = Bytes(self.mac(&challenge).to_vec());
        Ok(challenge)
    }

    /// A name every instance derives alike and no device can (see
    /// [`super::transport::share_group`]).
    pub fn share_group(&self) -> String {
        hex(&hmac(
            &self.s.challenge_key,
            &[b"edgeward enroll share group v1"],
        ))
    }

    fn secret(&self, digest: &str, nonce: &[u8]) -> [u8; 32] {
        hmac(
            &self.s.challenge_key,
            &[b"edgeward enroll credential v1", digest.as_bytes(), nonce],
        )
    }

    fn mac(&self, c: &Challenge) -> [u8; 32] {
        hmac(
            &self.s.challenge_key,
            &[
                b"edgeward enroll challenge v1",
                c.request.as_bytes(),
                &c.nonce.0,
                &c.expires.to_be_bytes(),
                &c.id_object.0,
                &c.secret.0,
            ],
        )
    }

    /// The second answer: checks the proof, issues and records.
    ///
    /// # Errors
    ///
    /// The first step that refuses; nothing is issued or recorded then.
    pub fn complete(&self, proof: &Proof) -> Result<Issued, Refusal> {
        if proof.v != VERSION || proof.challenge.v != VERSION {
            return Err(at(Step::Request)(format!(
                "protocol version {} (this service speaks {VERSION})",
                proof.v
            )));
        }
        // First what costs nothing: the challenge is ours (a hash and an
        // HMAC), current, and for this request.
        let c = &proof.challenge;
        let challenge = at(Step::Challenge);
        if !ct_eq(&self.mac(c), &c.mac.0) {
            return Err(challenge(
                "the challenge was not made by this service (its MAC does not verify)".into(),
            ));
        }
        if c.request != request_digest(&proof.request).map_err(at(Step::Request))? {
            return Err(challenge(
                "the challenge was made for another request".into(),
            ));
        }
        if unix_now() > c.expires {
            return Err(challenge("the challenge has expired: start again".into()));
        }
        let f = self.check_request(&proof.request)?;
        let point = match &f.proof {
            Admission::Tpm { ak_point, .. } => {
                // The credential opened: only the TPM with this EK and this
                // AK can.
                let secret = self.secret(&c.request, &c.nonce.0);
                if !ct_eq(&secret, &proof.activated.0) {
                    return Err(at(Step::Activation)(
                        "the credential's secret is wrong: the attestation key is not in the TPM \
                         of that endorsement key"
                            .into(),
                    ));
                }
                // The device CA key is in that TPM, fixed to it.
                let certification = proof.certification().ok_or_else(|| {
                    at(Step::Certification)("no certification with a TPM's proof".into())
                })?;
                let certified = certify::verify(&certification, &c.nonce.0, Some(ak_point))
                    .map_err(at(Step::Certification))?;
                // The CSR is that key's.
                let csr = csr_key(&proof.request.csr).map_err(at(Step::Csr))?;
                if csr != certified.point {
                    return Err(at(Step::Csr)(
                        "the CSR carries another key than the certified device CA key".into(),
                    ));
                }
                certified.point
            }
            Admission::Symmetric { device_key } => {
                if !ct_eq(&super::symmetric_answer(device_key, c), &proof.activated.0) {
                    return Err(at(Step::Activation)(
                        "the answer is not made with this device's enrollment key".into(),
                    ));
                }
                // No TPM vouches for the key: the CSR's, signed by it.
                csr_key(&proof.request.csr).map_err(at(Step::Csr))?
            }
        };
        if proof.request.device_id != f.device_id {
            return Err(at(Step::DeviceId)(format!(
                "the device asks for {:?}; the enrollment list assigns {:?}",
                proof.request.device_id, f.device_id
            )));
        }
        self.finish(
            Holder {
                device_id: f.device_id,
                groups: f.groups,
                admitted_by: f.admitted_by,
                factory: f.fingerprint,
                point,
                broker_csr: proof.request.broker_csr.as_deref(),
            },
            "enrolled",
            (&hex(&c.nonce.0), &c.request),
        )
    }

    /// A device renews its device CA certificate with the one it holds
    /// (and a CSR for the same key, signed by it: the key is the
    /// device's, now): a certificate this service issued, valid now, for
    /// an enrollment the audit log records, from a factory identity not
    /// revoked. A new certificate (and broker login) is issued and
    /// recorded as `renewed`; the same request again within a minute
    /// gets the same answer.
    ///
    /// # Errors
    ///
    /// The first check that refuses.
    pub fn renew(&self, r: &super::Renewal) -> Result<Issued, Refusal> {
        let current = at(Step::Current);
        if r.v != VERSION {
            return Err(at(Step::Request)(format!(
                "protocol version {} (this service speaks {VERSION})",
                r.v
            )));
        }
        let der = crate::attest::verify::pem_certificates(
            r.certificate.as_bytes(),
            "the current certificate",
        )
        .map_err(&current)?;
        if der.len() != 1 {
            return Err(current("send the device CA certificate alone".into()));
        }
        let (rest, cert) = X509Certificate::from_der(&der[0])
            .map_err(|e| current(format!("the current certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(current("the current certificate has trailing bytes".into()));
        }
        let (_, ca) = X509Certificate::from_der(&self.s.ca_certificate)
            .map_err(|e| at(Step::Issue)(format!("the organisation CA certificate: {e}")))?;
        if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
            return Err(current(
                "the current certificate is not one this organisation CA issued".into(),
            ));
        }
        if !cert
            .validity()
            .is_valid_at(x509_parser::time::ASN1Time::now())
        {
            return Err(current(
                "the current certificate is not valid now: enroll again with the factory identity"
                    .into(),
            ));
        }
        let prefix = format!("spiffe://{}/device/", self.s.trust_domain);
        let device_id = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(&prefix),
                    _ => None,
                })
            })
            .filter(|id| crate::identity::valid_path_segment(id))
            .ok_or_else(|| current(format!("the current certificate names no {prefix}<id>")))?
            .to_owned();
        let point = cert.public_key().subject_public_key.data.to_vec();
        // The holder signs with the key (a CSR that may be old: hence the
        // broker key is held to the one on record, below).
        if csr_key(&r.csr).map_err(at(Step::Csr))? != point {
            return Err(at(Step::Csr)(
                "the CSR carries another key than the current certificate's".into(),
            ));
        }
        let key = hex(&Sha256::digest(&point));
        let entries = audit_entries(&self.s.audit).map_err(at(Step::Issue))?;
        // The device's latest keys only: keys it had before a reset
        // renew nothing.
        let enrolled = entries
            .iter()
            .rev()
            .find(|e| e.device_id == device_id)
            .filter(|e| e.key == key)
            .ok_or_else(|| {
                current(format!(
                    "this key is not {device_id:?}'s latest recorded one"
                ))
            })?;
        // A renewal proves the device CA key with a CSR that may be old
        // (it carries no challenge): it renews the keys on record, never
        // certifies a new broker key.
        if let (Some(_), Some(csr)) = (&self.s.fleet, &r.broker_csr) {
            let broker = csr_key(csr).map_err(|e| at(Step::Csr)(format!("broker CSR: {e}")))?;
            if enrolled.broker_key.is_empty()
                || hex(&Sha256::digest(&broker)) != enrolled.broker_key
            {
                return Err(at(Step::Csr)(
                    "a renewal keeps the broker key on record; a new one takes an enrollment with the factory identity"
                        .into(),
                ));
            }
        }
        let mut revoked = self.s.revoked.clone();
        if let Some(file) = &self.s.revoked_file {
            revoked.extend(read_revoked(file).map_err(at(Step::Issue))?);
        }
        if revoked.contains(&enrolled.factory) {
            return Err(at(Step::Revoked)(format!(
                "the device ({}) is revoked",
                enrolled.factory
            )));
        }
        let by = &enrolled.admitted_by;
        if let Some(fp) = by.path.iter().find(|fp| revoked.contains(*fp)) {
            return Err(at(Step::Revoked)(format!(
                "a manufacturer CA of its chain ({fp}) is revoked"
            )));
        }
        // The list as it is now: a device taken off it renews no more,
        // and its groups are the list's.
        let (listed, groups) = if by.group.is_empty() {
            self.s.list.admits(&enrolled.factory, &by.path, &device_id)
        } else {
            self.s.list.admits_symmetric(&by.group, &device_id)
        }
        .map_err(at(Step::EnrollmentList))?;
        if listed != device_id {
            return Err(at(Step::DeviceId)(format!(
                "the enrollment list now assigns {listed:?}, not {device_id:?}: enroll again"
            )));
        }
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| at(Step::Issue)(format!("random: {e}")))?;
        let answers = super::renewal_digest(r).map_err(at(Step::Request))?;
        self.finish(
            Holder {
                device_id,
                groups,
                admitted_by: enrolled.admitted_by.clone(),
                factory: enrolled.factory.clone(),
                point,
                broker_csr: r.broker_csr.as_deref(),
            },
            "renewed",
            (&hex(&nonce), &answers),
        )
    }

    /// Issues `holder` its device CA certificate (and broker login, with
    /// a fleet) under the audit log's lock, records it as `event`, and
    /// signs the answer.
    fn finish(
        &self,
        holder: Holder<'_>,
        event: &str,
        (nonce, answers): (&str, &str),
    ) -> Result<Issued, Refusal> {
        let Holder {
            device_id,
            groups,
            admitted_by,
            factory,
            point,
            broker_csr,
        } = holder;
        // The broker login key: its CSR's (signed by it, and bound to the
        // proof with the rest of the request); never the device CA key.
        let broker_point = match (&self.s.fleet, broker_csr) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(at(Step::Csr)(
                    "the organisation assigns a fleet broker and the request has no broker CSR"
                        .into(),
                ));
            }
            (Some(_), Some(csr)) => {
                let p = csr_key(csr).map_err(|e| at(Step::Csr)(format!("broker CSR: {e}")))?;
                if p == point {
                    return Err(at(Step::Csr)(
                        "the broker CSR carries the device CA key: a login key of its own is needed"
                            .into(),
                    ));
                }
                Some(p)
            }
        };
        // Issued under the audit log's lock and recorded before it is
        // answered: an enrollment the device holds is one the
        // organisation knows.
        let now = unix_now();
        let not_after = (now + self.s.lifetime.as_secs()).min(self.s.ca_not_after);
        let entry = AuditEntry {
            time: now,
            event: event.into(),
            device_id: device_id.clone(),
            factory,
            key: hex(&Sha256::digest(&point)),
            nonce: nonce.to_owned(),
            groups: groups.clone(),
            not_after,
            chain: String::new(),
            broker_key: broker_point
                .as_deref()
                .map(|p| hex(&Sha256::digest(p)))
                .unwrap_or_default(),
            broker_certificate: String::new(),
            admitted_by,
        };
        // A recorded certificate (from this CA) is answered again while it
        // has more than half the lifetime a new one would have; a
        // renewal's, for ten minutes (retries, and a bound on how fast
        // one device grows the log).
        let reuse = |e: &AuditEntry| {
            e.chain.ends_with(&self.s.ca_chain)
                && if event == "renewed" {
                    e.event == "renewed" && e.time + RENEWAL_REUSE > now
                } else {
                    e.not_after > now + not_after.saturating_sub(now) / 2
                }
        };
        let (chain, login) = record(&self.s.audit, entry, reuse, || {
            let chain = self.issue(&device_id, &point, not_after)?;
            let login = match (&self.s.fleet, &broker_point) {
                (Some(fleet), Some(p)) => self.issue_login(fleet, &device_id, p, not_after)?,
                _ => String::new(),
            };
            Ok((chain, login))
        })?;
        let fleet = self.s.fleet.as_ref().map(|fleet| super::Assignment {
            broker: fleet.broker.clone(),
            broker_ca: fleet.broker_ca.clone(),
            certificate: login,
            deployment_keys: fleet
                .deployment_keys
                .iter()
                .map(|k| Bytes(k.clone()))
                .collect(),
        });
        let mut issued = Issued {
            v: VERSION,
            device_id,
            groups,
            chain,
            fleet,
            answers: answers.to_owned(),
            signature: Bytes::default(),
        };
        let bytes = issued.signed_bytes().map_err(at(Step::Issue))?;
        issued.signature = Bytes(
            SigningKey::sign(&self.s.ca_key, &bytes)
                .map_err(|e| at(Step::Issue)(format!("signing the answer: {e}")))?,
        );
        Ok(issued)
    }

    /// The checks both messages pass: shape, factory chain, revocation,
    /// the list.
    fn check_request(&self, r: &Request) -> Result<Admitted, Refusal> {
        let bad = at(Step::Request);
        if r.v != VERSION {
            return Err(bad(format!(
                "protocol version {} (this service speaks {VERSION})",
                r.v
            )));
        }
        if !crate::identity::valid_path_segment(&r.device_id) {
            return Err(bad(format!(
                "device id {:?} is not a valid id",
                r.device_id
            )));
        }
        let mut revoked = self.s.revoked.clone();
        if let Some(file) = &self.s.revoked_file {
            revoked.extend(read_revoked(file).map_err(at(Step::Issue))?);
        }
        let is_revoked = |fingerprint: &str| {
            if revoked.contains(fingerprint) {
                Err(at(Step::Revoked)(format!(
                    "the device ({fingerprint}) is revoked"
                )))
            } else {
                Ok(())
            }
        };
        let (ek_certificate, ak_public) = match &r.factory {
            Factory::Tpm {
                ek_certificate,
                ak_public,
            } => (ek_certificate, ak_public),
            Factory::Symmetric { group } => {
                if !crate::cloud::topics::valid_group(group) {
                    return Err(bad(format!("{group:?} is not a group name")));
                }
                let fingerprint =
                    self::fingerprint(format!("symmetric\0{group}\0{}", r.device_id).as_bytes());
                is_revoked(&fingerprint)?;
                let (device_id, groups) = self
                    .s
                    .list
                    .admits_symmetric(group, &r.device_id)
                    .map_err(at(Step::EnrollmentList))?;
                let secret = self.s.group_secrets.get(group).ok_or_else(|| {
                    at(Step::EnrollmentList)(format!("group {group:?} has no secret"))
                })?;
                return Ok(Admitted {
                    fingerprint,
                    device_id: device_id.clone(),
                    groups,
                    admitted_by: AdmittedBy {
                        group: group.clone(),
                        path: Vec::new(),
                    },
                    proof: Admission::Symmetric {
                        device_key: super::device_key(secret, &device_id),
                    },
                });
            }
        };
        let ak = crate::attest::wire::parse_ecc_public_as(&ak_public.0, "the attestation key")
            .map_err(&bad)?;
        let fingerprint = factory_fingerprint(&ek_certificate.0).map_err(&bad)?;
        let (_, ek) = X509Certificate::from_der(&ek_certificate.0)
            .map_err(|e| bad(format!("the EK certificate is not DER X.509: {e}")))?;
        let path: Vec<String> = self
            .chain(&ek)
            .map_err(at(Step::FactoryChain))?
            .into_iter()
            .map(|i| self::fingerprint(&self.s.manufacturers[i]))
            .collect();
        is_revoked(&fingerprint)?;
        if let Some(fp) = path.iter().find(|fp| revoked.contains(*fp)) {
            return Err(at(Step::Revoked)(format!(
                "a manufacturer CA of its chain ({fp}) is revoked"
            )));
        }
        let (device_id, groups) = self
            .s
            .list
            .admits(&fingerprint, &path, &r.device_id)
            .map_err(at(Step::EnrollmentList))?;
        Ok(Admitted {
            fingerprint,
            device_id,
            groups,
            admitted_by: AdmittedBy {
                group: String::new(),
                path,
            },
            proof: Admission::Tpm {
                ek_spki: ek.public_key().raw.to_vec(),
                ak_name: ak.name,
                ak_point: ak.point,
            },
        })
    }

    /// The manufacturer certificates from the one that issued `ek` up
    /// (indices, issuer first): each a CA valid now whose signature
    /// verifies, up to a self-signed root or the last one the bundle
    /// holds (every certificate in it is trusted).
    fn chain(&self, ek: &X509Certificate<'_>) -> Result<Vec<usize>, String> {
        let now = x509_parser::time::ASN1Time::now();
        if !ek.validity().is_valid_at(now) {
            return Err(format!(
                "the factory certificate ({}) is outside its validity period",
                ek.subject()
            ));
        }
        let parsed: Vec<Option<X509Certificate<'_>>> = self
            .s
            .manufacturers
            .iter()
            .map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
            .collect();
        let usable = |c: &X509Certificate<'_>| {
            c.basic_constraints()
                .ok()
                .flatten()
                .is_some_and(|b| b.value.ca)
                && c.validity().is_valid_at(now)
        };
        let mut path: Vec<usize> = Vec::new();
        let mut current = ek;
        // A bound on the depth: a bundle cannot make this loop.
        for _ in 0..8 {
            let issuer = parsed.iter().enumerate().find_map(|(i, c)| {
                let c = c.as_ref()?;
                (c.subject() == current.issuer()
                    && !path.contains(&i)
                    && usable(c)
                    && current.verify_signature(Some(c.public_key())).is_ok())
                .then_some(i)
            });
            let Some(i) = issuer else { break };
            path.push(i);
            let Some(c) = parsed[i].as_ref() else { break };
            if c.subject() == c.issuer() {
                break;
            }
            current = c;
        }
        if path.is_empty() {
            return Err(format!(
                "the factory certificate ({}) is not issued by a trusted manufacturer CA valid now (its issuer: {})",
                ek.subject(),
                ek.issuer()
            ));
        }
        Ok(path)
    }

    /// A certificate naming `device_id`: `O=edgeward, CN=<id>` and its
    /// SPIFFE ID.
    fn device_params(&self, device_id: &str) -> Result<CertificateParams, String> {
        let mut p = CertificateParams::default();
        p.distinguished_name = edgeward_name(device_id);
        let spiffe = format!("spiffe://{}/device/{device_id}", self.s.trust_domain);
        p.subject_alt_names = vec![SanType::URI(
            spiffe
                .clone()
                .try_into()
                .map_err(|e| format!("{spiffe} as a SAN: {e}"))?,
        )];
        Ok(p)
    }

    /// The device CA certificate for `point`, then the organisation's chain.
    fn issue(&self, device_id: &str, point: &[u8], not_after: u64) -> Result<String, String> {
        let mut p = self.device_params(device_id)?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let dns = format!("{device_id}.{}", self.s.dns_suffix);
        let mut constraints = rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 30],
            name_constraints(&self.s.trust_domain, &dns),
        );
        constraints.set_criticality(true);
        p.custom_extensions = vec![constraints];
        let cert = sign(
            p,
            point,
            not_after,
            (&self.s.ca_certificate, &self.s.ca_key),
        )
        .map_err(|e| format!("the device CA certificate: {e}"))?;
        Ok(format!("{cert}{}", self.s.ca_chain))
    }

    /// The broker login certificate for `point` (`CN = <device id>`, the
    /// device's SPIFFE ID, client authentication only), then the logins
    /// CA's chain.
    fn issue_login(
        &self,
        fleet: &FleetSettings,
        device_id: &str,
        point: &[u8],
        not_after: u64,
    ) -> Result<String, String> {
        let mut p = self.device_params(device_id)?;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = sign(
            p,
            point,
            not_after.min(fleet.logins_not_after),
            (&fleet.logins_certificate, &fleet.logins_key),
        )
        .map_err(|e| format!("the broker login certificate: {e}"))?;
        Ok(format!("{cert}{}", fleet.logins_chain))
    }
}

/// `p` for `point`, from now (backdated a little) until `not_after`, with
/// a random serial and key identifiers, signed by `issuer` (its
/// certificate's DER and key): the certificate's PEM.
fn sign(
    mut p: CertificateParams,
    point: &[u8],
    not_after: u64,
    (issuer_der, issuer_key): (&[u8], &CaKey),
) -> Result<String, String> {
    let now = unix_now();
    let time = |t: u64| {
        ::time::OffsetDateTime::from_unix_timestamp(i64::try_from(t).unwrap_or(i64::MAX))
            .map_err(|e| e.to_string())
    };
    p.not_before = time(now.saturating_sub(BACKDATE.as_secs()))?;
    p.not_after = time(not_after)?;
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(|e| format!("random: {e}"))?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::PreSpecified(key_identifier(point));
    let issuer = rcgen::Issuer::from_ca_cert_der(&issuer_der.to_vec().into(), issuer_key)
        .map_err(|e| format!("the issuing CA certificate: {e}"))?;
    let cert = p
        .signed_by(&PublicP256(point.to_vec()), &issuer)
        .map_err(|e| format!("signing: {e}"))?;
    Ok(cert.pem())
}

/// The nameConstraints a device CA gets (RFC 5280 4.2.1.10, DER; rcgen
/// has no URI subtrees): URIs of the trust domain, DNS names under the
/// device's, no IPv4 or IPv6 address (what the device's identity
/// requires of its CA certificate).
fn name_constraints(trust_domain: &str, dns: &str) -> Vec<u8> {
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        match content.len() {
            n @ 0..=127 => v.push(n as u8),
            n @ 128..=255 => v.extend([0x81, n as u8]),
            n => v.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        v.extend_from_slice(content);
        v
    }
    let subtree = |tag: u8, name: &[u8]| der(0x30, &der(tag, name));
    let permitted = [
        subtree(0x86, trust_domain.as_bytes()),
        subtree(0x82, dns.as_bytes()),
    ]
    .concat();
    let excluded = [subtree(0x87, &[0; 8]), subtree(0x87, &[0; 32])].concat();
    der(
        0x30,
        &[der(0xa0, &permitted), der(0xa1, &excluded)].concat(),
    )
}

/// The key a CSR (PEM) carries, once its signature verifies with it.
fn csr_key(pem: &str) -> Result<Vec<u8>, String> {
    use x509_parser::certification_request::X509CertificationRequest;
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("the CSR is not PEM: {e}"))?;
    if block.label != "CERTIFICATE REQUEST" {
        return Err(format!(
            "the CSR is a PEM {:?}, not a CERTIFICATE REQUEST",
            block.label
        ));
    }
    let (_, csr) = X509CertificationRequest::from_der(&block.contents)
        .map_err(|e| format!("the CSR is not a DER PKCS#10 request: {e}"))?;
    csr.verify_signature()
        .map_err(|e| format!("the CSR's signature does not verify: {e}"))?;
    let point = csr
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    if point.len() != 65 || point[0] != 4 {
        return Err("the CSR's key is not an uncompressed P-256 point".into());
    }
    Ok(point)
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix seconds.
    pub time: u64,
    /// `enrolled`, `re-enrolled` (the same factory identity with new
    /// keys: a reset) or `renewed`.
    pub event: String,
    /// The device id.
    pub device_id: String,
    /// Its factory certificate's fingerprint.
    pub factory: String,
    /// The SHA-256 of the certified device CA key's point (hex).
    pub key: String,
    /// The challenge nonce used (hex): used once.
    pub nonce: String,
    /// The groups assigned.
    pub groups: Vec<String>,
    /// When the certificate issued expires (Unix seconds).
    pub not_after: u64,
    /// The chain issued, answered again (not issued anew) while it has
    /// more than half its lifetime left.
    pub chain: String,
    /// The SHA-256 of the broker login key's point (hex), if one was
    /// certified.
    #[serde(default)]
    pub broker_key: String,
    /// The broker login certificate issued with it (PEM), if any.
    #[serde(default)]
    pub broker_certificate: String,
    /// What the list admitted it by.
    #[serde(default, flatten)]
    pub admitted_by: AdmittedBy,
}

/// Reads the audit log.
///
/// # Errors
///
/// It cannot be read, or a line is not an entry (named by number).
pub fn audit_entries(path: &Path) -> Result<Vec<AuditEntry>, String> {
    match std::fs::read(path) {
        Ok(bytes) => parse_audit(&bytes).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The entries of an audit log's bytes. A last line without its newline
/// (a write cut short by a crash, never synced nor answered) is skipped.
fn parse_audit(bytes: &[u8]) -> Result<Vec<AuditEntry>, String> {
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(i) => &bytes[..=i],
        None => &[][..],
    };
    let mut out = Vec::new();
    for (i, line) in complete.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.push(serde_json::from_slice(line).map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    Ok(out)
}

/// Under an exclusive lock on the audit log (read through the locked
/// handle): checks `entry` against what the log holds, written by any
/// instance (the nonce unused; the device enrolled under no other id; the
/// id held by no other device); answers the recorded chain again when the
/// same device enrolled the same keys in an entry `reuse` takes; else
/// issues, appends `entry` and syncs it.
fn record(
    path: &Path,
    mut entry: AuditEntry,
    reuse: impl Fn(&AuditEntry) -> bool,
    issue_certificates: impl FnOnce() -> Result<(String, String), String>,
) -> Result<(String, String), Refusal> {
    use std::io::{Read as _, Seek as _};
    let issue = at(Step::Issue);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(|e| issue(format!("audit log {}: {e}", path.display())))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| issue(format!("locking the audit log: {e}")))?;
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| issue(format!("reading the audit log: {e}")))?;
    let entries =
        parse_audit(&bytes).map_err(|e| issue(format!("audit log {}: {e}", path.display())))?;
    if entries.iter().any(|e| e.nonce == entry.nonce) {
        return Err(at(Step::Challenge)(
            "the challenge was already used: a replayed proof".into(),
        ));
    }
    if let Some(other) = entries
        .iter()
        .rev()
        .find(|e| e.factory == entry.factory && e.device_id != entry.device_id)
    {
        return Err(at(Step::DeviceId)(format!(
            "this device enrolled as {:?}; one device, one id",
            other.device_id
        )));
    }
    if entries
        .iter()
        .any(|e| e.device_id == entry.device_id && e.factory != entry.factory)
    {
        return Err(at(Step::DeviceId)(format!(
            "{:?} is held by another device",
            entry.device_id
        )));
    }
    if let Some(same) = entries.iter().rev().find(|e| {
        e.factory == entry.factory
            && e.key == entry.key
            && e.broker_key == entry.broker_key
            && reuse(e)
    }) {
        return Ok((same.chain.clone(), same.broker_certificate.clone()));
    }
    // The same device with new keys: reset, or its state lost.
    if entry.event == "enrolled"
        && entries
            .iter()
            .any(|e| e.factory == entry.factory && e.key != entry.key)
    {
        entry.event = "re-enrolled".into();
    }
    (entry.chain, entry.broker_certificate) = issue_certificates().map_err(&issue)?;
    let mut line = serde_json::to_string(&entry).map_err(|e| issue(e.to_string()))?;
    line.push('\n');
    if bytes.last().is_some_and(|b| *b != b'\n') {
        // After a torn line: start a new one.
        line.insert(0, '\n');
    }
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(|e| issue(format!("writing the audit log: {e}")))?;
    Ok((entry.chain, entry.broker_certificate))
}
