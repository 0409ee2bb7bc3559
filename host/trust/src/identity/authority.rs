//! The device CA: a P-256 key named [`CA_KEY`] in the HSM, with either a
//! self-signed root certificate edgeward keeps in the state directory or a
//! configured certificate for that key. It signs every X509-SVID, server
//! certificate and JWT working-key certificate; the HSM does each signature,
//! the key never leaves it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::hostkey::{HostKey, SignatureEncoding};
use super::{IdentityError, unix_now};
use crate::hsm::Hsm;
use crate::state;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PublicKeyData, SanType, SerialNumber, SignatureAlgorithm, SigningKey,
};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

/// The HSM key id of the device CA.
pub const CA_KEY: &str = "device-ca";
/// How long a self-signed root edgeward creates is valid (10 years).
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A self-signed root is replaced when less than this remains (30 days).
pub const ROOT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start this long before issuance, for devices whose clocks
/// disagree a little.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// A P-256 key in the HSM that rcgen can sign with (the device CA, the JWT
/// authority).
#[derive(Debug)]
pub struct HsmKey {
    pub hsm: Arc<dyn Hsm>,
    pub id: &'static str,
    pub point: Vec<u8>,
}

impl PublicKeyData for HsmKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for HsmKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.hsm.sign_certificate(self.id, msg).map_err(|e| {
            tracing::error!(key = self.id, error = %e, "HSM signature failed");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// The public half of a host-generated key, for rcgen.
#[derive(Debug)]
pub struct PublicP256(pub Vec<u8>);

impl PublicKeyData for PublicP256 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// What a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// An X509-SVID: an empty subject (so nothing can map it to a user
    /// name) and exactly the SPIFFE ID as a critical URI SAN; client and
    /// server auth.
    Svid,
    /// A server certificate: the SPIFFE ID and these names, server auth.
    Server {
        /// Subject common name.
        common_name: String,
        /// DNS names and IP addresses.
        names: Vec<SanType>,
    },
}

/// A certificate the CA issued, DER and PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// DER.
    pub der: Vec<u8>,
    /// PEM.
    pub pem: String,
    /// notAfter, unix seconds.
    pub not_after: u64,
}

/// A leaf key generated on the host together with its certificate.
pub struct LeafKey {
    /// The private key (DER signatures).
    pub key: HostKey,
    /// Its certificate.
    pub cert: Issued,
}

impl std::fmt::Debug for LeafKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafKey")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

/// The device CA.
pub struct Authority {
    hsm: Arc<dyn Hsm>,
    point: Vec<u8>,
    issuer: CertificateParams,
    not_after: u64,
    /// Certificates handed out after each leaf (the device CA certificate and
    /// intermediates, when the device CA is not itself the root).
    chain_pem: String,
    roots_der: Vec<Vec<u8>>,
    roots_pem: String,
    /// What a configured device CA's name constraints permit (none for a
    /// self-signed root, which nothing outside the device trusts).
    limits: Option<NameLimits>,
}

/// What a device CA's `nameConstraints` permit: the organisation's word on
/// which names this device may certify (RFC 5280 permitted subtrees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameLimits {
    dns: Vec<String>,
    /// (address, mask), 4 or 16 bytes each.
    ips: Vec<(Vec<u8>, Vec<u8>)>,
    uris: Vec<String>,
}

impl NameLimits {
    /// Reads the name constraints of a device CA certificate and checks
    /// they confine it: URIs (to the trust domain, which they must permit),
    /// DNS names, and IP addresses (permitted ranges, or all excluded).
    ///
    /// # Errors
    ///
    /// No constraints, or one of the three kinds unconstrained, named.
    pub fn of_device_ca(der: &[u8], trust_domain: &str) -> Result<Self, String> {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not a certificate: {e}"))?;
        let how = "certify it with nameConstraints=critical,permitted;URI:<trust domain>,permitted;DNS:<the device's DNS suffix>,excluded;IP:0.0.0.0/0.0.0.0,excluded;IP:::/0 (or the IP ranges it may serve; docs/fleet.md)";
        let nc = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::NameConstraints(nc) => Some(nc.clone()),
                _ => None,
            })
            .ok_or_else(|| format!("the device CA certificate has no nameConstraints, so it could certify any name the organisation's root is trusted for; {how}"))?;
        let mut l = Self::default();
        // Excluded entirely: (IPv4, IPv6).
        let mut no_ips = (false, false);
        for s in nc.permitted_subtrees.iter().flatten() {
            match &s.base {
                GeneralName::DNSName(d) => l.dns.push(d.to_ascii_lowercase()),
                GeneralName::URI(u) => l.uris.push(u.to_ascii_lowercase()),
                GeneralName::IPAddress(b) if b.len() == 8 || b.len() == 32 => {
                    let (a, m) = b.split_at(b.len() / 2);
                    l.ips.push((a.to_vec(), m.to_vec()));
                }
                _ => {}
            }
        }
        for s in nc.excluded_subtrees.iter().flatten() {
            if let GeneralName::IPAddress(b) = &s.base
                && (b.len() == 8 || b.len() == 32)
                && b[b.len() / 2..].iter().all(|x| *x == 0)
            {
                if b.len() == 8 {
                    no_ips.0 = true;
                } else {
                    no_ips.1 = true;
                }
            }
        }
        if l.uris.is_empty() {
            return Err(format!(
                "the device CA's nameConstraints permit no URI subtree, so its SPIFFE IDs are unconstrained; {how}"
            ));
        }
        if !l.uris.iter().any(|u| u == trust_domain) {
            return Err(format!(
                "the device CA's nameConstraints permit URIs in {:?}, not the trust domain {trust_domain:?}: its X509-SVIDs would not verify",
                l.uris
            ));
        }
        if l.dns.is_empty() {
            return Err(format!(
                "the device CA's nameConstraints permit no DNS subtree, so server certificates could name any host; {how}"
            ));
        }
        // Permitted ranges constrain both families (an address of the
        // other family matches none); without any, both must be excluded.
        if l.ips.is_empty() && !(no_ips.0 && no_ips.1) {
            return Err(format!(
                "the device CA's nameConstraints leave IP{} addresses unconstrained, so server certificates could name any such address; {how}",
                match no_ips {
                    (true, false) => "v6",
                    (false, true) => "v4",
                    _ => "",
                }
            ));
        }
        Ok(l)
    }

    /// Whether `name` is within a permitted DNS subtree (`example.com`
    /// permits it and its subdomains; `.example.com` only subdomains).
    pub fn permits_dns(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.dns.iter().any(|d| {
            if let Some(suffix) = d.strip_prefix('.') {
                name.ends_with(&format!(".{suffix}"))
            } else {
                name == *d || name.ends_with(&format!(".{d}"))
            }
        })
    }

    /// Whether `ip` is within a permitted range.
    pub fn permits_ip(&self, ip: std::net::IpAddr) -> bool {
        let bytes = match ip.to_canonical() {
            std::net::IpAddr::V4(a) => a.octets().to_vec(),
            std::net::IpAddr::V6(a) => a.octets().to_vec(),
        };
        self.ips.iter().any(|(a, m)| {
            a.len() == bytes.len()
                && a.iter()
                    .zip(m)
                    .zip(&bytes)
                    .all(|((a, m), b)| a & m == b & m)
        })
    }
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("backend", &self.hsm.backend())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The SHA-256-based key identifier (RFC 7093 method 1) of a SEC1 point's
/// SubjectPublicKeyInfo.
pub fn key_identifier(point: &[u8]) -> Vec<u8> {
    let spki = PublicP256(point.to_vec()).subject_public_key_info();
    Sha256::digest(spki)[..20].to_vec()
}

fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| IdentityError::Internal(format!("random: {e}")))?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x40; // and exactly 16 bytes long
    Ok(SerialNumber::from_slice(&b))
}

fn to_time(unix: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(i64::try_from(unix).unwrap_or(i64::MAX))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn pem_encode(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// PEM armour for DER bytes under `label`.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    use base64ct::{Base64, Encoding as _};
    let b64 = Base64::encode_string(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Splits a PEM file into its `CERTIFICATE` blocks (DER).
///
/// # Errors
///
/// When a block is malformed or there are none.
pub fn parse_pem_certificates(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
        let p = p.map_err(|e| format!("malformed PEM: {e}"))?;
        if p.label == "CERTIFICATE" {
            out.push(p.contents);
        }
    }
    if out.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    Ok(out)
}

/// The SEC1 point of a certificate's P-256 key, if it has one.
pub fn certificate_point(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// Verifies that `der` was signed (ECDSA P-256/SHA-256) by `issuer_point`.
pub fn signed_by(der: &[u8], issuer_point: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    crate::hsm::verify_p256(
        issuer_point,
        cert.tbs_certificate.as_ref(),
        &cert.signature_value.data,
    )
}

/// Checks a configured chain, leaf (the device CA) first: every link is
/// within its validity period, names its issuer, and is signed by the next
/// certificate's key, which is a CA; the last is a self-signed root whose
/// own signature verifies. SHA-1 signatures are refused. Returns the
/// earliest `notAfter` of the chain (unix seconds): nothing issued under it
/// may outlive that.
///
/// # Errors
///
/// The first link that fails, named by position and subject.
pub fn check_chain(certs: &[Vec<u8>], now: u64) -> Result<u64, String> {
    use x509_parser::oid_registry::{OID_PKCS1_SHA1WITHRSA, OID_SHA1_WITH_RSA};
    let parsed = certs
        .iter()
        .enumerate()
        .map(|(i, der)| {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, c)| c)
                .map_err(|e| format!("certificate {} is not a certificate: {e}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.is_empty() {
        return Err("no certificates".into());
    }
    let now_i = i64::try_from(now).unwrap_or(i64::MAX);
    let mut earliest = u64::MAX;
    for (i, cert) in parsed.iter().enumerate() {
        let name = format!("certificate {} ({})", i + 1, cert.subject());
        let validity = cert.validity();
        if validity.not_before.timestamp() > now_i + BACKDATE.as_secs() as i64 {
            return Err(format!(
                "{name} is not valid before {}",
                validity.not_before
            ));
        }
        if validity.not_after.timestamp() <= now_i {
            return Err(format!("{name} expired at {}", validity.not_after));
        }
        earliest = earliest.min(u64::try_from(validity.not_after.timestamp()).unwrap_or(0));
        let last = i + 1 == parsed.len();
        let issuer = if last { cert } else { &parsed[i + 1] };
        if cert.issuer() != issuer.subject() {
            return Err(if last {
                format!(
                    "{name} is the last certificate but not a self-signed root (issuer {})",
                    cert.issuer()
                )
            } else {
                format!(
                    "{name} is issued by {}, but the next certificate is {}",
                    cert.issuer(),
                    issuer.subject()
                )
            });
        }
        let issuer_is_ca = issuer
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if !issuer_is_ca {
            return Err(format!(
                "{} ({}) signs {name} but is not a CA (basicConstraints cA=true)",
                if last {
                    "the root".to_owned()
                } else {
                    format!("certificate {}", i + 2)
                },
                issuer.subject()
            ));
        }
        let alg = &cert.signature_algorithm.algorithm;
        if *alg == OID_PKCS1_SHA1WITHRSA || *alg == OID_SHA1_WITH_RSA {
            return Err(format!("{name} is signed with SHA-1, which is refused"));
        }
        cert.verify_signature(Some(issuer.public_key()))
            .map_err(|e| {
                format!(
                    "{name}: its signature does not verify under the key of {} ({e})",
                    issuer.subject()
                )
            })?;
    }
    Ok(earliest)
}

struct ParsedCa {
    not_after: u64,
    is_ca: bool,
}

fn inspect(der: &[u8]) -> Result<ParsedCa, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    Ok(ParsedCa { not_after, is_ca })
}

impl Authority {
    /// Opens the device CA: creates the HSM key if needed, then either
    /// loads `configured` (a PEM file: the certificate for the device CA
    /// key first, then its issuers up to a self-signed root) or uses the
    /// self-signed root kept under `state_dir/identity/ca.pem`, creating or
    /// renewing it when missing, expiring, or made for another key.
    ///
    /// # Errors
    ///
    /// HSM errors, and a configured certificate that is unreadable, not a CA,
    /// not for the HSM's key, or not chained to a self-signed root.
    pub fn open(
        hsm: Arc<dyn Hsm>,
        device_id: &str,
        trust_domain: &str,
        configured: Option<&Path>,
        state_dir: &Path,
    ) -> Result<Self, IdentityError> {
        let point = hsm.signing_key(CA_KEY)?;
        match configured {
            Some(path) => Self::from_configured(hsm, point, path, trust_domain),
            None => Self::self_signed(hsm, point, device_id, state_dir),
        }
    }

    fn from_configured(
        hsm: Arc<dyn Hsm>,
        point: Vec<u8>,
        path: &Path,
        trust_domain: &str,
    ) -> Result<Self, IdentityError> {
        let bad =
            |m: String| IdentityError::Config(format!("ca_certificate {}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let certs = parse_pem_certificates(&text).map_err(bad)?;
        let first = inspect(&certs[0]).map_err(bad)?;
        if certificate_point(&certs[0]).as_deref() != Some(point.as_slice()) {
            return Err(bad(format!(
                "the first certificate is not for the HSM's {CA_KEY:?} key (export its public key with `edgeward hsm info` and certify that)"
            )));
        }
        if !first.is_ca {
            return Err(bad(
                "the first certificate is not a CA (basicConstraints cA=true)".into(),
            ));
        }
        let not_after = check_chain(&certs, unix_now()).map_err(bad)?;
        let limits = NameLimits::of_device_ca(&certs[0], trust_domain).map_err(bad)?;
        let issuer = ca_issuer(&point, &certs[0]).map_err(bad)?;
        let n = certs.len();
        let chain: String = certs[..n.saturating_sub(1)]
            .iter()
            .map(|c| pem_encode(c))
            .collect();
        let roots_der = vec![certs[n - 1].clone()];
        Ok(Self {
            hsm,
            point,
            issuer,
            not_after,
            chain_pem: chain,
            roots_pem: pem_encode(&roots_der[0]),
            roots_der,
            limits: Some(limits),
        })
    }

    fn self_signed(
        hsm: Arc<dyn Hsm>,
        point: Vec<u8>,
        device_id: &str,
        state_dir: &Path,
    ) -> Result<Self, IdentityError> {
        let dir = state_dir.join("identity");
        state::ensure_private_dir(&dir)
            .map_err(|e| IdentityError::Storage(format!("{}: {e}", dir.display())))?;
        let path: PathBuf = dir.join("ca.pem");
        let now = unix_now();
        let existing = std::fs::read_to_string(&path).ok().and_then(|text| {
            let der = parse_pem_certificates(&text).ok()?.into_iter().next()?;
            let p = inspect(&der).ok()?;
            let ours = certificate_point(&der).as_deref() == Some(point.as_slice())
                && signed_by(&der, &point);
            if !ours {
                tracing::warn!(path = %path.display(), "device CA root is not for the HSM's {CA_KEY} key; issuing a new one");
                return None;
            }
            if p.not_after < now + ROOT_RENEW_BEFORE.as_secs() {
                tracing::info!(path = %path.display(), "device CA root expires soon; renewing it");
                return None;
            }
            Some((der, p.not_after))
        });
        let params = root_params(&point, device_id);
        let (der, not_after) = match existing {
            Some(x) => x,
            None => {
                let mut p = params.clone();
                p.not_before = to_time(now.saturating_sub(BACKDATE.as_secs()));
                let not_after = now + ROOT_VALIDITY.as_secs();
                p.not_after = to_time(not_after);
                p.serial_number = Some(random_serial()?);
                let key = HsmKey {
                    hsm: hsm.clone(),
                    id: CA_KEY,
                    point: point.clone(),
                };
                let cert = p.self_signed(&key).map_err(|e| ca_error(&hsm, e))?;
                let der = cert.der().to_vec();
                state::write_atomic(&path, pem_encode(&der).as_bytes())
                    .map_err(|e| IdentityError::Storage(format!("{}: {e}", path.display())))?;
                tracing::info!(path = %path.display(), "device CA root certificate issued");
                (der, not_after)
            }
        };
        let issuer = ca_issuer(&point, &der)
            .map_err(|m| IdentityError::Internal(format!("{}: {m}", path.display())))?;
        Ok(Self {
            hsm,
            point,
            issuer,
            not_after,
            chain_pem: String::new(),
            roots_pem: pem_encode(&der),
            roots_der: vec![der],
            limits: None,
        })
    }

    /// The device CA's SEC1 public point.
    pub fn public_key(&self) -> &[u8] {
        &self.point
    }

    /// PEM of the certificates between what the CA issues and the root:
    /// the device CA's own certificate and its issuers below the root
    /// (empty when the device CA is its own root).
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// PEM of the trust domain's root certificate(s).
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
    }

    /// DER of the root certificate(s).
    pub fn roots_der(&self) -> &[Vec<u8>] {
        &self.roots_der
    }

    /// What the organisation permits this CA to certify (`None`: a
    /// self-signed root, trusted by nothing outside the device).
    pub fn limits(&self) -> Option<&NameLimits> {
        self.limits.as_ref()
    }

    /// When the device CA certificate expires (unix seconds).
    pub fn not_after(&self) -> u64 {
        self.not_after
    }

    /// Issues a certificate of `profile` for `spiffe_id` over `public_point`, valid from now for `ttl`
    /// (cut at the CA's own expiry). Blocks on the HSM.
    ///
    /// # Errors
    ///
    /// HSM failures ([`IdentityError::Unavailable`] when the device is
    /// unreachable) and encoding errors.
    pub fn issue(
        &self,
        profile: &Profile,
        spiffe_id: &str,
        public_point: &[u8],
        ttl: Duration,
    ) -> Result<Issued, IdentityError> {
        let not_after = (unix_now() + ttl.as_secs()).min(self.not_after);
        let mut p = leaf_params(public_point, not_after)?;
        let uri = || -> Result<SanType, IdentityError> {
            Ok(SanType::URI(spiffe_id.try_into().map_err(|e| {
                IdentityError::Internal(format!("spiffe id as SAN: {e}"))
            })?))
        };
        match profile {
            Profile::Svid => {
                p.subject_alt_names = vec![uri()?];
                p.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            Profile::Server { common_name, names } => {
                p.distinguished_name = edgeward_name(common_name.as_str());
                p.subject_alt_names = names.clone();
                p.subject_alt_names.push(uri()?);
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
        }
        let cert = p
            .signed_by(
                &PublicP256(public_point.to_vec()),
                &Issuer::from_params(
                    &self.issuer,
                    HsmKey {
                        hsm: self.hsm.clone(),
                        id: CA_KEY,
                        point: self.point.clone(),
                    },
                ),
            )
            .map_err(|e| ca_error(&self.hsm, e))?;
        let der = cert.der().to_vec();
        Ok(Issued {
            pem: pem_encode(&der),
            der,
            not_after,
        })
    }

    /// Generates a P-256 key on the host and issues its certificate.
    ///
    /// # Errors
    ///
    /// See [`Authority::issue`].
    pub fn issue_leaf(
        &self,
        profile: &Profile,
        spiffe_id: &str,
        ttl: Duration,
    ) -> Result<LeafKey, IdentityError> {
        let key = HostKey::generate(SignatureEncoding::Der)?;
        let mut cert = self.issue(profile, spiffe_id, key.point(), ttl)?;
        cert.pem.push_str(&self.chain_pem);
        Ok(LeafKey { key, cert })
    }
}

/// A certificate signing request for the HSM's device CA key (`CN =
/// <device-id>`, the device's SPIFFE ID as URI SAN), signed by that key, so
/// the organisation's CA can certify it; the result goes in `[identity]
/// ca_certificate` (that certificate, then its issuers up to the root).
/// Creates the key if it is missing.
///
/// # Errors
///
/// HSM failures; the SPIFFE ID as a SAN.
pub fn device_ca_csr(
    hsm: &Arc<dyn Hsm>,
    device_id: &str,
    device_spiffe_id: &str,
) -> Result<String, IdentityError> {
    let point = hsm.signing_key(CA_KEY)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = edgeward_name(device_id);
    p.subject_alt_names =
        vec![SanType::URI(device_spiffe_id.try_into().map_err(|e| {
            IdentityError::Internal(format!("spiffe id as SAN: {e}"))
        })?)];
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = HsmKey {
        hsm: hsm.clone(),
        id: CA_KEY,
        point,
    };
    let csr = p.serialize_request(&key).map_err(|e| ca_error(hsm, e))?;
    csr.pem()
        .map_err(|e| IdentityError::Internal(format!("CSR as PEM: {e}")))
}

/// `O=edgeward, CN=<cn>`: the names edgeward gives what it certifies.
pub fn edgeward_name(cn: impl Into<DnValue>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "edgeward");
    dn.push(DnType::CommonName, cn);
    dn
}

/// An end-entity certificate for `point` with an empty subject (name it
/// after), from now (backdated a little) until `not_after`: a random
/// serial, `CA:FALSE`, key usage digitalSignature, subject and authority
/// key identifiers.
///
/// # Errors
///
/// When the random source fails.
pub fn leaf_params(point: &[u8], not_after: u64) -> Result<CertificateParams, IdentityError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.not_before = to_time(unix_now().saturating_sub(BACKDATE.as_secs()));
    p.not_after = to_time(not_after);
    p.serial_number = Some(random_serial()?);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::PreSpecified(key_identifier(point));
    Ok(p)
}

/// The distinguished name of a self-signed root: stable for a device, so a
/// stored root and the issuer of new leaves always agree.
fn root_params(point: &[u8], device_id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = edgeward_name(format!("edgeward device CA {device_id}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::PreSpecified(key_identifier(point));
    p
}

/// The issuer parameters (subject name, key identifier) of a CA
/// certificate for the device CA key.
fn ca_issuer(point: &[u8], der: &[u8]) -> Result<CertificateParams, String> {
    use x509_parser::der_parser::asn1_rs::Tag;
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
    let mut dn = DistinguishedName::new();
    for rdn in cert.subject().iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("multi-valued or empty RDNs in the subject are not supported".into());
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or("subject attribute type is not an OID")?
            .collect();
        let data = attr.attr_value().data;
        let text =
            || std::str::from_utf8(data).map_err(|_| "subject attribute is not text".to_owned());
        let value = match attr.attr_value().header.tag() {
            Tag::PrintableString => {
                DnValue::PrintableString(text()?.try_into().map_err(|e| format!("subject: {e}"))?)
            }
            Tag::Ia5String => {
                DnValue::Ia5String(text()?.try_into().map_err(|e| format!("subject: {e}"))?)
            }
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            other => {
                return Err(format!(
                    "subject attribute of type {other} is not supported"
                ));
            }
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    let ski = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
    let mut p = CertificateParams::default();
    p.distinguished_name = dn;
    p.key_identifier_method =
        KeyIdMethod::PreSpecified(ski.unwrap_or_else(|| key_identifier(point)));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    Ok(p)
}

fn ca_error(hsm: &Arc<dyn Hsm>, e: rcgen::Error) -> IdentityError {
    match e {
        rcgen::Error::RemoteKeyError => IdentityError::Unavailable(format!(
            "the device CA key in the {} HSM could not sign",
            hsm.backend()
        )),
        other => IdentityError::Internal(format!("certificate encoding: {other}")),
    }
}
