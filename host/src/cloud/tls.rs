//! The device's broker identity: a client certificate the organisation's
//! device CA issued (`CN = <device-id>`, the device's SPIFFE ID as its URI
//! SAN) over a P-256 key that lives in the HSM and signs there. It is not
//! the device's own CA that certifies it: what that CA issues (module
//! SVIDs, server certificates) chains to a root the broker never accepts
//! as a client. The rustls client asks the resolver for the certificate at
//! each handshake, so a renewed file is used from the next connection and
//! never drops the session it serves.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use sha2::{Digest as _, Sha256};

use crate::hsm::Hsm;

/// Adds the certificates of `pem` to `store`; returns how many.
///
/// # Errors
///
/// Not PEM certificates, or one rustls cannot use as a root.
pub fn add_pem_roots(store: &mut rustls::RootCertStore, pem: &[u8]) -> Result<usize, String> {
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(pem) {
        store
            .add(c.map_err(|e| format!("not PEM certificates: {e}"))?)
            .map_err(|e| format!("not a usable root: {e}"))?;
        n += 1;
    }
    Ok(n)
}

/// The one way edgeward makes a TLS client: the ring provider the daemon
/// already links, the safe default protocol versions, `roots` trusted.
///
/// # Errors
///
/// The provider refuses the versions (it does not).
pub fn client_builder(
    roots: rustls::RootCertStore,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots))
}

/// The HSM key the device's broker certificate is for.
pub const CLIENT_KEY: &str = "cloud-client";

/// A TLS signing key held in the HSM: ECDSA P-256 with SHA-256, the one
/// scheme every backend (soft, TPM, PKCS#11) signs.
#[derive(Debug)]
struct HsmTlsKey {
    hsm: Arc<dyn Hsm>,
}

impl SigningKey for HsmTlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| {
                Box::new(HsmTlsSigner {
                    hsm: self.hsm.clone(),
                }) as Box<dyn Signer>
            })
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct HsmTlsSigner {
    hsm: Arc<dyn Hsm>,
}

impl Signer for HsmTlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(message).into();
        // DER, as TLS carries ECDSA signatures. A TPM takes milliseconds:
        // on the daemon's multi-threaded runtime the worker hands its other
        // tasks on while this one waits for the device.
        let sign = || self.hsm.sign_digest(CLIENT_KEY, &digest);
        let signed = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(sign)
            }
            _ => sign(),
        };
        signed.map_err(|e| {
            tracing::error!(error = %e, "the HSM did not sign the broker handshake");
            rustls::Error::General(format!("HSM signature: {e}"))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// What the device presents to the broker: the organisation's certificate
/// for the HSM's [`CLIENT_KEY`] (from `edgeward identity csr --broker`),
/// read from `[cloud] certificate`. The file is read again when it changes
/// (at the next handshake, and hourly), so a renewed certificate needs no
/// restart and never drops the session it serves.
#[derive(Debug)]
pub struct ClientIdentity {
    path: PathBuf,
    point: Vec<u8>,
    key: Arc<HsmTlsKey>,
    current: RwLock<Option<Loaded>>,
}

#[derive(Debug)]
struct Loaded {
    certified: Arc<CertifiedKey>,
    not_after: u64,
    /// (modified, length) of the file it came from.
    stamp: (Option<std::time::SystemTime>, u64),
}

/// A certificate file for the broker key, checked.
struct Checked {
    chain: Vec<CertificateDer<'static>>,
    not_after: u64,
}

/// Checks `pem` as the broker certificate for the key `point`: the first
/// certificate is for that key, is an end entity with clientAuth (or no
/// EKU), and is within its validity period.
fn check_certificate(pem: &[u8], point: &[u8], now: u64) -> Result<Checked, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    let first = chain.first().ok_or("no certificate in it")?;
    let (_, cert) = x509_parser::parse_x509_certificate(first)
        .map_err(|e| format!("the first certificate does not parse: {e}"))?;
    if cert.public_key().subject_public_key.data.as_ref() != point {
        return Err(format!(
            "the first certificate is not for this device's {CLIENT_KEY:?} key (certify the CSR of `edgeward identity csr --broker`)"
        ));
    }
    if cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca)
    {
        return Err("the first certificate is a CA, not the device's own".into());
    }
    if let Ok(Some(eku)) = cert.extended_key_usage()
        && !(eku.value.client_auth || eku.value.any)
    {
        return Err("the certificate's extendedKeyUsage lacks clientAuth".into());
    }
    let v = cert.validity();
    let now_i = i64::try_from(now).unwrap_or(i64::MAX);
    if v.not_before.timestamp() > now_i + 300 {
        return Err(format!(
            "the certificate is not valid before {}",
            v.not_before
        ));
    }
    if v.not_after.timestamp() <= now_i {
        return Err(format!("the certificate expired at {}", v.not_after));
    }
    Ok(Checked {
        not_after: u64::try_from(v.not_after.timestamp()).unwrap_or(0),
        chain,
    })
}

impl ClientIdentity {
    /// Creates (or finds) the HSM key; the certificate is read by
    /// [`ClientIdentity::refresh`].
    ///
    /// # Errors
    ///
    /// HSM errors, named.
    pub fn new(hsm: Arc<dyn Hsm>, path: PathBuf) -> Result<Arc<Self>, String> {
        let point = hsm
            .signing_key(CLIENT_KEY)
            .map_err(|e| format!("the broker client key: {e}"))?;
        Ok(Arc::new(Self {
            path,
            point,
            key: Arc::new(HsmTlsKey { hsm }),
            current: RwLock::new(None),
        }))
    }

    /// Reads the certificate file again if it changed since it was last
    /// read. `Ok(true)` when a new certificate is now in use.
    ///
    /// # Errors
    ///
    /// The file unreadable, or its certificate wrong for the key, expired,
    /// or not yet valid; the one in use (if any) stays.
    pub fn refresh(&self) -> Result<bool, String> {
        let bad = |m: String| format!("cloud.certificate {}: {m}", self.path.display());
        let meta = std::fs::metadata(&self.path).map_err(|e| bad(e.to_string()))?;
        let stamp = (meta.modified().ok(), meta.len());
        let now = crate::identity::unix_now();
        if let Some(l) = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            && l.stamp == stamp
            && l.not_after > now
        {
            return Ok(false);
        }
        let pem = std::fs::read(&self.path).map_err(|e| bad(e.to_string()))?;
        let checked = check_certificate(&pem, &self.point, now).map_err(bad)?;
        let signer: Arc<dyn SigningKey> = self.key.clone();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Loaded {
            certified: Arc::new(CertifiedKey::new(checked.chain, signer)),
            not_after: checked.not_after,
            stamp,
        });
        Ok(true)
    }

    /// When the certificate in use expires (unix seconds); 0 with none.
    pub fn not_after(&self) -> u64 {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |l| l.not_after)
    }

    /// The chain in use, leaf first (DER); empty with none.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.certified.cert.clone())
            .unwrap_or_default()
    }
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        match self.refresh() {
            Ok(true) => {
                tracing::info!(not_after = self.not_after(), path = %self.path.display(), "cloud: broker certificate (re)loaded");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "cloud: the broker certificate file was not loaded")
            }
        }
        if !sigschemes.contains(&SignatureScheme::ECDSA_NISTP256_SHA256) {
            return None;
        }
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A certificate signing request for the HSM's broker key: `CN =
/// <device-id>` (the broker's user name for the device) and the device's
/// SPIFFE ID as URI SAN, signed in the HSM. Creates the key if missing.
///
/// # Errors
///
/// HSM failures; the SPIFFE ID as a SAN.
pub fn broker_csr(hsm: &Arc<dyn Hsm>, device_id: &str, spiffe_id: &str) -> Result<String, String> {
    use crate::identity::authority::{HsmKey, edgeward_name};
    let point = hsm
        .signing_key(CLIENT_KEY)
        .map_err(|e| format!("the broker client key: {e}"))?;
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = edgeward_name(device_id);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe_id
            .try_into()
            .map_err(|e| format!("spiffe id as SAN: {e}"))?,
    )];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = HsmKey {
        hsm: hsm.clone(),
        id: CLIENT_KEY,
        point,
    };
    p.serialize_request(&key)
        .map_err(|e| format!("the broker key could not sign its CSR: {e}"))?
        .pem()
        .map_err(|e| format!("CSR as PEM: {e}"))
}
