//! The device's broker identity: a client certificate issued by the device
//! CA (`CN = <device-id>`, the device's SPIFFE ID as its URI SAN) over a
//! P-256 key that lives in the HSM and signs there. The rustls client asks
//! the resolver for the certificate at each handshake, so a renewal swaps
//! it in for the next connection and never drops the session it serves.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use sha2::{Digest as _, Sha256};

use crate::hsm::Hsm;
use crate::identity::IdentityService;
use crate::identity::authority::Profile;

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

/// The client certificate in use, swapped on renewal.
#[derive(Debug)]
pub struct ClientIdentity {
    current: RwLock<Arc<CertifiedKey>>,
    not_after: RwLock<u64>,
    key: Arc<HsmTlsKey>,
}

impl ClientIdentity {
    /// Creates (or finds) the HSM key and issues its first certificate.
    ///
    /// # Errors
    ///
    /// HSM and certificate errors, named.
    pub fn new(identity: &IdentityService, ttl: Duration) -> Result<Arc<Self>, String> {
        let hsm = identity.hsm();
        hsm.signing_key(CLIENT_KEY)
            .map_err(|e| format!("the broker client key: {e}"))?;
        let key = Arc::new(HsmTlsKey { hsm });
        let (certified, not_after) = issue(identity, &key, ttl)?;
        Ok(Arc::new(Self {
            current: RwLock::new(certified),
            not_after: RwLock::new(not_after),
            key,
        }))
    }

    /// Issues a new certificate; the next handshake presents it.
    ///
    /// # Errors
    ///
    /// As [`ClientIdentity::new`]; the old certificate stays in use.
    pub fn renew(&self, identity: &IdentityService, ttl: Duration) -> Result<(), String> {
        let (certified, not_after) = issue(identity, &self.key, ttl)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = certified;
        *self.not_after.write().unwrap_or_else(|e| e.into_inner()) = not_after;
        Ok(())
    }

    /// When the current certificate expires (unix seconds).
    pub fn not_after(&self) -> u64 {
        *self.not_after.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The current chain, leaf first (DER).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .cert
            .clone()
    }
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        sigschemes
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| {
                self.current
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn issue(
    identity: &IdentityService,
    key: &Arc<HsmTlsKey>,
    ttl: Duration,
) -> Result<(Arc<CertifiedKey>, u64), String> {
    let point = key
        .hsm
        .public_key(CLIENT_KEY)
        .map_err(|e| format!("the broker client key: {e}"))?;
    let device = &identity.config().device_id;
    let issued = identity
        .authority()
        .issue(
            &Profile::Client,
            &identity.device_spiffe_id(),
            device,
            &point,
            ttl,
        )
        .map_err(|e| format!("the broker client certificate: {e}"))?;
    let mut chain = vec![CertificateDer::from(issued.der)];
    for c in CertificateDer::pem_slice_iter(identity.authority().chain_pem().as_bytes()) {
        chain.push(c.map_err(|e| format!("the device CA chain: {e}"))?);
    }
    let signer: Arc<dyn SigningKey> = key.clone();
    Ok((Arc::new(CertifiedKey::new(chain, signer)), issued.not_after))
}
