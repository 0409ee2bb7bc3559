//! Zero-touch enrollment: a device proves where its keys live and the
//! organisation certifies its CA key, with no operator in between.
//!
//! Two round trips, so that every instance of the organisation's service
//! can answer any message without shared state ([`service`]):
//!
//! 1. the device sends a [`Request`]: the id it asks for, a CSR for its
//!    device CA key (signed in the HSM) and its factory identity (on a
//!    TPM, the EK certificate and the attestation key's public area);
//! 2. the service checks the factory identity and the enrollment list and
//!    answers with a [`Challenge`]: a fresh nonce and a credential
//!    (TPM2_MakeCredential) that only the TPM holding both that EK and
//!    that AK can open, authenticated by the service's challenge key;
//! 3. the device answers with a [`Proof`]: the opened credential and
//!    TPM2_Certify of its device CA key by the AK over the nonce;
//! 4. the service checks it (the order is [`service::Step`]'s), issues the
//!    device CA certificate and records the enrollment; the device gets
//!    [`Issued`].
//!
//! Every message is JSON with unknown fields refused and a size bound
//! ([`MAX_MESSAGE`]).

pub mod device;
pub mod service;
pub mod transport;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use edgeward_proto::Bytes;

use crate::hsm::{Certification, Hsm};
use crate::identity::authority::{CA_KEY, device_ca_csr};

/// The protocol version every message carries.
pub const VERSION: u32 = 1;

/// The largest message either side reads.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The attestation key enrollment uses (the one attestation uses).
pub const AK_ID: &str = crate::attest::evidence::AK_ID;

/// A device's request to enroll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// [`VERSION`].
    pub v: u32,
    /// The device id it asks for.
    pub device_id: String,
    /// A PEM CSR for the device CA key, signed by that key.
    pub csr: String,
    /// A PEM CSR for the broker login key (`cloud-client`), signed by
    /// that key: certified when the organisation assigns a fleet broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_csr: Option<String>,
    /// Its factory identity.
    pub factory: Factory,
    /// Random bytes of the device's: the request's digest, which the
    /// signed answer names, is never one an older answer named.
    #[serde(default)]
    pub nonce: Bytes,
}

/// How a device proves where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Factory {
    /// A TPM: its endorsement key's certificate (DER, from the
    /// manufacturer) and the attestation key's TPM2B_PUBLIC.
    Tpm {
        /// The EK certificate.
        ek_certificate: Bytes,
        /// The AK's public area.
        ak_public: Bytes,
    },
    /// A board without a TPM: a per-device key derived at manufacture
    /// from its enrollment group's secret ([`device_key`]; Azure DPS's
    /// symmetric-key group enrollment). Weaker than a TPM: it proves the
    /// device was given that key, not where its device CA key lives.
    Symmetric {
        /// The enrollment group.
        group: String,
    },
}

/// A device's request to renew its device CA certificate, authenticated
/// by the one it holds ([`service::Service::renew`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Renewal {
    /// [`VERSION`].
    pub v: u32,
    /// The device CA certificate it holds (PEM, alone).
    pub certificate: String,
    /// A PEM CSR for the same key, signed by it.
    pub csr: String,
    /// A PEM CSR for the broker login key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_csr: Option<String>,
    /// Random bytes of the device's (see [`Request::nonce`]).
    #[serde(default)]
    pub nonce: Bytes,
}

/// 16 random bytes.
fn fresh_nonce() -> Result<Bytes, String> {
    let mut n = vec![0u8; 16];
    getrandom::fill(&mut n).map_err(|e| format!("random: {e}"))?;
    Ok(Bytes(n))
}

/// The SHA-256 (hex) of `r`'s JSON: what the answer to it names.
///
/// # Errors
///
/// Never in practice.
pub fn renewal_digest(r: &Renewal) -> Result<String, String> {
    use sha2::Digest as _;
    let bytes = serde_json::to_vec(r).map_err(|e| e.to_string())?;
    Ok(crate::measure::hex(&sha2::Sha256::digest(&bytes)))
}

/// The renewal of the device whose enrolled chain is `chain` (PEM; its
/// first certificate is the one renewed): CSRs signed by its device CA
/// and broker keys.
///
/// # Errors
///
/// The chain holds no certificate, or the HSM fails.
pub fn renewal(
    hsm: &Arc<dyn Hsm>,
    device_id: &str,
    trust_domain: &str,
    chain: &str,
) -> Result<Renewal, String> {
    let first =
        crate::attest::verify::pem_certificates(chain.as_bytes(), "the enrolled chain")?.remove(0);
    let (csr, broker_csr) = csrs(hsm, device_id, trust_domain)?;
    Ok(Renewal {
        v: VERSION,
        certificate: crate::identity::authority::pem_block("CERTIFICATE", &first),
        csr,
        broker_csr: Some(broker_csr),
        nonce: fresh_nonce()?,
    })
}

/// The service's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    /// [`VERSION`].
    pub v: u32,
    /// The SHA-256 of the request's canonical JSON (hex): the challenge
    /// answers that request only.
    pub request: String,
    /// A fresh nonce: the certification must be over it.
    pub nonce: Bytes,
    /// Until when (Unix seconds) the proof is taken.
    pub expires: u64,
    /// TPM2_MakeCredential's TPM2B_ID_OBJECT contents.
    pub id_object: Bytes,
    /// ...and TPM2B_ENCRYPTED_SECRET contents.
    pub secret: Bytes,
    /// The service's MAC over the above: any instance recognises it.
    pub mac: Bytes,
}

/// A device's answer to a [`Challenge`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    /// [`VERSION`].
    pub v: u32,
    /// The request, again (the service keeps nothing between the two).
    pub request: Request,
    /// The challenge, as received.
    pub challenge: Challenge,
    /// The credential's secret, as the TPM released it.
    pub activated: Bytes,
    /// TPM2_Certify of the device CA key by the AK: the TPMS_ATTEST.
    pub certify_message: Bytes,
    /// Its TPMT_SIGNATURE.
    pub certify_signature: Bytes,
    /// The device CA key's TPM2B_PUBLIC.
    pub certified_public: Bytes,
}

impl Proof {
    /// The certification it carries, with the request's AK (a TPM's).
    pub fn certification(&self) -> Option<Certification> {
        match &self.request.factory {
            Factory::Tpm { ak_public, .. } => Some(Certification {
                message: self.certify_message.0.clone(),
                signature: self.certify_signature.0.clone(),
                public: self.certified_public.0.clone(),
                ak_public: ak_public.0.clone(),
            }),
            Factory::Symmetric { .. } => None,
        }
    }
}

/// A device's enrollment key in a symmetric-key group: HMAC-SHA256 of its
/// id under the group's secret. The organisation computes it for the
/// factory (`fleet enroll derive-key`); the device holds only its own.
pub fn device_key(group_secret: &[u8; 32], device_id: &str) -> [u8; 32] {
    service::hmac(
        group_secret,
        &[b"edgeward enroll device key v1", device_id.as_bytes()],
    )
}

/// What a symmetric-key device answers a challenge with: its key's MAC
/// over the request and the nonce.
pub fn symmetric_answer(device_key: &[u8; 32], challenge: &Challenge) -> [u8; 32] {
    service::hmac(
        device_key,
        &[
            b"edgeward enroll symmetric v1",
            challenge.request.as_bytes(),
            &challenge.nonce.0,
        ],
    )
}

/// A symmetric-key device's request (any HSM backend: the CSR is signed
/// by its device CA key, created if missing).
///
/// # Errors
///
/// The HSM fails.
pub fn symmetric_request(
    hsm: &Arc<dyn Hsm>,
    device_id: &str,
    trust_domain: &str,
    group: &str,
) -> Result<Request, String> {
    signed_request(
        hsm,
        device_id,
        trust_domain,
        Factory::Symmetric {
            group: group.to_owned(),
        },
    )
}

/// A symmetric-key device's answer to `challenge`.
///
/// # Errors
///
/// The challenge is for another request.
pub fn symmetric_prove(
    device_key: &[u8; 32],
    request: &Request,
    challenge: &Challenge,
) -> Result<Proof, String> {
    if challenge.request != service::request_digest(request)? {
        return Err("the challenge answers another request".into());
    }
    Ok(Proof {
        v: VERSION,
        request: request.clone(),
        challenge: challenge.clone(),
        activated: Bytes(symmetric_answer(device_key, challenge).to_vec()),
        certify_message: Bytes::default(),
        certify_signature: Bytes::default(),
        certified_public: Bytes::default(),
    })
}

/// What the device gets when it is enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Issued {
    /// [`VERSION`].
    pub v: u32,
    /// The device id assigned.
    pub device_id: String,
    /// The groups it is in.
    pub groups: Vec<String>,
    /// The device CA certificate, then the organisation's chain (PEM):
    /// what `[identity] ca_certificate` takes.
    pub chain: String,
    /// Where the device connects once enrolled, when the organisation
    /// assigns it (its `[fleet]`).
    #[serde(default)]
    pub fleet: Option<Assignment>,
    /// The digest of what it answers (the request a challenge was made
    /// for, or the renewal): an old answer replayed is not this one.
    #[serde(default)]
    pub answers: String,
    /// The organisation CA's signature (ECDSA P-256 with SHA-256, DER)
    /// over [`Issued::signed_bytes`]: the broker, its roots and the
    /// deployment keys are trust the device takes, so whoever relays the
    /// answer (the broker, another client) cannot choose them.
    pub signature: Bytes,
}

/// The fleet a device is assigned to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// The fleet broker, `mqtts://HOST[:PORT]`.
    pub broker: String,
    /// Its roots (PEM): what `[cloud] ca` takes.
    pub broker_ca: String,
    /// The login certificate for the device's broker key, then its
    /// issuers (PEM): what `[cloud] certificate` takes.
    pub certificate: String,
    /// The keys deployments are signed by (each a key file's bytes).
    pub deployment_keys: Vec<Bytes>,
}

impl Issued {
    /// What the signature covers: a domain tag, then the JSON of every
    /// other field.
    ///
    /// # Errors
    ///
    /// Never in practice (serde_json on plain data).
    pub fn signed_bytes(&self) -> Result<Vec<u8>, String> {
        let mut out = b"edgeward enroll issued v1\0".to_vec();
        serde_json::to_writer(
            &mut out,
            &(
                self.v,
                &self.device_id,
                &self.groups,
                &self.chain,
                &self.fleet,
                &self.answers,
            ),
        )
        .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// Parses a message of type `T`, bounded and strict.
///
/// # Errors
///
/// Too large, not JSON, or not a `T`; named with `what`.
pub fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    if bytes.len() > MAX_MESSAGE {
        return Err(format!(
            "the {what} is {} bytes, more than {MAX_MESSAGE}",
            bytes.len()
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("the {what} is malformed: {e}"))
}

/// The device's request, from its HSM: creates the attestation key and
/// the device CA key if they are missing.
///
/// # Errors
///
/// The HSM is not a TPM with an EK certificate, or fails; named.
pub fn request(hsm: &Arc<dyn Hsm>, device_id: &str, trust_domain: &str) -> Result<Request, String> {
    let ek = hsm
        .endorsement_certificate()
        .map_err(|e| e.to_string())?
        .ok_or("this device's TPM carries no EK certificate to enroll with")?;
    hsm.attestation_key(AK_ID).map_err(|e| e.to_string())?;
    let ak_public = hsm
        .attestation_public(AK_ID)
        .map_err(|e| e.to_string())?
        .ok_or("the HSM has no attestation key public area (not a TPM)")?;
    signed_request(
        hsm,
        device_id,
        trust_domain,
        Factory::Tpm {
            ek_certificate: Bytes(ek),
            ak_public: Bytes(ak_public),
        },
    )
}

/// A request for `device_id` with a CSR signed by the HSM's device CA key
/// (created if missing) and `factory`.
fn signed_request(
    hsm: &Arc<dyn Hsm>,
    device_id: &str,
    trust_domain: &str,
    factory: Factory,
) -> Result<Request, String> {
    let (csr, broker_csr) = csrs(hsm, device_id, trust_domain)?;
    Ok(Request {
        v: VERSION,
        device_id: device_id.to_owned(),
        csr,
        broker_csr: Some(broker_csr),
        factory,
        nonce: fresh_nonce()?,
    })
}

/// CSRs for the device CA key and the broker key (each created if
/// missing, each signing its own).
fn csrs(
    hsm: &Arc<dyn Hsm>,
    device_id: &str,
    trust_domain: &str,
) -> Result<(String, String), String> {
    let spiffe = format!("spiffe://{trust_domain}/device/{device_id}");
    let csr = device_ca_csr(hsm, device_id, &spiffe).map_err(|e| e.to_string())?;
    let broker_csr = crate::cloud::tls::broker_csr(hsm, device_id, &spiffe)?;
    Ok((csr, broker_csr))
}

/// The device's answer to `challenge`: the TPM opens the credential (only
/// it can) and certifies the device CA key by the AK over the nonce.
///
/// # Errors
///
/// The challenge is for another request, or the TPM refuses; named.
pub fn prove(hsm: &dyn Hsm, request: &Request, challenge: &Challenge) -> Result<Proof, String> {
    if challenge.request != service::request_digest(request)? {
        return Err("the challenge answers another request".into());
    }
    let activated = hsm
        .activate_credential(AK_ID, &challenge.id_object.0, &challenge.secret.0)
        .map_err(|e| format!("the TPM cannot open the enrollment credential: {e}"))?;
    let c = hsm
        .certify(CA_KEY, AK_ID, &challenge.nonce.0)
        .map_err(|e| e.to_string())?;
    Ok(Proof {
        v: VERSION,
        request: request.clone(),
        challenge: challenge.clone(),
        activated: Bytes(activated.to_vec()),
        certify_message: Bytes(c.message),
        certify_signature: Bytes(c.signature),
        certified_public: Bytes(c.public),
    })
}

/// What a device checks of the answer before it keeps it: its id; a
/// first certificate for its own device CA key, a CA that may certify
/// only end entities (`pathlen:0`), valid now, naming the device's SPIFFE
/// ID; each certificate signed by the next; and the last one one of
/// `roots` (the organisation's, pinned at manufacture) or signed by one.
/// Whoever answers (any service, any broker) cannot make the device trust
/// a root of their own.
///
/// # Errors
///
/// The first check that fails, named.
pub fn check_issued(
    hsm: &dyn Hsm,
    issued: &Issued,
    device_id: &str,
    trust_domain: &str,
    roots: &[Vec<u8>],
) -> Result<(), String> {
    let keys = DeviceKeys {
        ca: hsm.public_key(CA_KEY).map_err(|e| e.to_string())?,
        login: if issued.fleet.is_some() {
            hsm.public_key(crate::cloud::tls::CLIENT_KEY)
                .map_err(|e| e.to_string())?
        } else {
            Vec::new()
        },
    };
    check_answer(issued, device_id, trust_domain, roots, Some(&keys))
}

/// The public points of a device's device CA and broker login keys.
#[derive(Debug, Clone)]
pub struct DeviceKeys {
    /// The device CA key's.
    pub ca: Vec<u8>,
    /// The broker login key's (empty when no fleet is assigned).
    pub login: Vec<u8>,
}

/// [`check_issued`] without the HSM: with `keys`, the certificates must
/// be for them; without, the rest is checked (a stored answer, read again
/// at start: the device CA refuses a chain for another key itself).
///
/// # Errors
///
/// The first check that fails, named.
pub fn check_answer(
    issued: &Issued,
    device_id: &str,
    trust_domain: &str,
    roots: &[Vec<u8>],
    keys: Option<&DeviceKeys>,
) -> Result<(), String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::*;
    if issued.device_id != device_id {
        return Err(format!(
            "the service assigned the id {:?}, not the {device_id:?} asked for",
            issued.device_id
        ));
    }
    let ders = crate::attest::verify::pem_certificates(issued.chain.as_bytes(), "the chain")?;
    let certs = ders
        .iter()
        .map(|d| match X509Certificate::from_der(d) {
            Ok(([], c)) => Ok(c),
            Ok(_) => Err("a certificate of the chain has trailing bytes".to_owned()),
            Err(e) => Err(format!("a certificate of the chain: {e}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let first = &certs[0];
    if keys.is_some_and(|k| first.public_key().subject_public_key.data.as_ref() != k.ca.as_slice())
    {
        return Err("the certificate issued is for another key than this device's CA key".into());
    }
    if let Some(c) = certs
        .iter()
        .find(|c| !c.validity().is_valid_at(ASN1Time::now()))
    {
        return Err(format!("{} of the chain is not valid now", c.subject()));
    }
    let constraints = first.basic_constraints().ok().flatten().map(|b| b.value);
    if !constraints.is_some_and(|b| b.ca && b.path_len_constraint == Some(0)) {
        return Err(
            "the certificate issued is not a CA limited to end entities (pathlen:0)".into(),
        );
    }
    if !first.validity().is_valid_at(ASN1Time::now()) {
        return Err("the certificate issued is not valid now".into());
    }
    let spiffe = format!("spiffe://{trust_domain}/device/{device_id}");
    let names = first
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| s.value.general_names.clone())
        .unwrap_or_default();
    if !names
        .iter()
        .any(|n| matches!(n, GeneralName::URI(u) if *u == spiffe))
    {
        return Err(format!("the certificate issued does not name {spiffe}"));
    }
    // Every issuer a CA that may certify the CAs below it: a device CA
    // (pathlen:0) of another device cannot pose as the organisation's
    // and sign this answer.
    for (i, c) in certs.iter().enumerate().skip(1) {
        let b = c.basic_constraints().ok().flatten().map(|b| b.value);
        let fits = b.is_some_and(|b| {
            b.ca && b
                .path_len_constraint
                .is_none_or(|n| usize::try_from(n).is_ok_and(|n| n >= i))
        });
        let signs = c
            .key_usage()
            .ok()
            .flatten()
            .is_none_or(|k| k.value.key_cert_sign());
        if !fits || !signs {
            return Err(format!(
                "the chain is not a CA path: {} may not certify the CA below it",
                c.subject()
            ));
        }
    }
    for pair in certs.windows(2) {
        if pair[0].issuer() != pair[1].subject()
            || pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .is_err()
        {
            return Err(format!(
                "the chain is broken: {} is not signed by the certificate after it",
                pair[0].subject()
            ));
        }
    }
    let last = certs.len() - 1;
    let anchored = roots.iter().any(|r| {
        *r == ders[last]
            || X509Certificate::from_der(r).is_ok_and(|(_, root)| {
                certs[last].issuer() == root.subject()
                    && certs[last]
                        .verify_signature(Some(root.public_key()))
                        .is_ok()
            })
    });
    if !anchored {
        return Err(
            "the chain does not lead to the organisation's root this device trusts (--org-root)"
                .into(),
        );
    }
    // The organisation CA (the device CA's issuer, anchored above) signed
    // the whole answer.
    let org_ca = certs
        .get(1)
        .map(|c| c.public_key().subject_public_key.data.to_vec())
        .or_else(|| {
            roots.iter().find_map(|r| {
                let (_, root) = X509Certificate::from_der(r).ok()?;
                (first.issuer() == root.subject())
                    .then(|| root.public_key().subject_public_key.data.to_vec())
            })
        })
        .ok_or("the chain names no organisation CA to check the answer's signature with")?;
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&org_ca)
        .map_err(|_| "the organisation CA's key is not P-256".to_owned())?;
    let signature = p256::ecdsa::Signature::from_der(&issued.signature.0)
        .map_err(|_| "the answer's signature is not a DER ECDSA signature".to_owned())?;
    p256::ecdsa::signature::Verifier::verify(&key, &issued.signed_bytes()?, &signature)
        .map_err(|_| "the answer is not signed by the organisation CA that issued the chain: its broker and keys are not taken".to_owned())?;
    if let Some(fleet) = &issued.fleet {
        check_assignment(fleet, device_id, &ders, keys)?;
    }
    for g in &issued.groups {
        if !crate::cloud::topics::valid_group(g) {
            return Err(format!("the assigned group {g:?} is not a group name"));
        }
    }
    Ok(())
}

/// The fleet assignment is usable: a broker URL, roots, a login
/// certificate for this device's broker key, valid now, and deployment
/// keys.
fn check_assignment(
    fleet: &Assignment,
    device_id: &str,
    chain: &[Vec<u8>],
    keys: Option<&DeviceKeys>,
) -> Result<(), String> {
    use x509_parser::prelude::*;
    crate::cloud::parse_broker(&fleet.broker).map_err(|e| format!("the assigned broker: {e}"))?;
    let broker_roots =
        crate::attest::verify::pem_certificates(fleet.broker_ca.as_bytes(), "the broker's roots")?;
    // A module's server certificate would pass as the broker's.
    if broker_roots.iter().any(|r| chain.contains(r)) {
        return Err("the assigned broker roots hold a certificate of the device CA's chain".into());
    }
    let login = crate::attest::verify::pem_certificates(fleet.certificate.as_bytes(), "the login")?;
    let (_, cert) = X509Certificate::from_der(&login[0])
        .map_err(|e| format!("the broker login certificate: {e}"))?;
    if keys
        .is_some_and(|k| cert.public_key().subject_public_key.data.as_ref() != k.login.as_slice())
    {
        return Err("the broker login certificate is for another key than this device's".into());
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok());
    if cn != Some(device_id) {
        return Err(format!(
            "the broker login certificate names {cn:?}, not {device_id:?}"
        ));
    }
    if !cert.validity().is_valid_at(ASN1Time::now()) {
        return Err("the broker login certificate is not valid now".into());
    }
    if fleet.deployment_keys.is_empty() {
        return Err("the assignment names no deployment key".into());
    }
    for (i, k) in fleet.deployment_keys.iter().enumerate() {
        crate::attest::publisher::PublicKey::from_any(&k.0)
            .map_err(|e| format!("assigned deployment key {i}: not an Ed25519 public key: {e}"))?;
    }
    Ok(())
}
