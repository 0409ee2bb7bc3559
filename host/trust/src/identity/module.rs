//! One module's identity: who it is, its X509-SVID (issued on first use and
//! renewed past half its lifetime, with jitter), tokens, signatures and
//! sealing. What the `workload` WIT interface serves.

use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use super::authority::{LeafKey, Profile};
use super::jwt::Claims;
use super::names::ServerNames;
use super::sealing::Sealer;
use super::{
    IdentityError, IdentityService, MAX_SIGN_INPUT, RENEW_RETRY, SERVER_CERT_BURST, check_size,
    unix_now,
};

/// What `whoami` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoAmI {
    /// Registered name.
    pub module_name: String,
    /// Device id.
    pub device_id: String,
    /// Registration generation.
    pub generation_id: String,
    /// `sha256:` digest of the running component.
    pub digest: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
}

/// An X509-SVID (or server certificate) and its key.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// PEM, leaf first.
    pub certificate_chain: String,
    /// PKCS#8 PEM of the leaf key.
    pub private_key: Zeroizing<String>,
    /// Leaf notAfter, unix seconds.
    pub expires_at: u64,
}

impl From<&LeafKey> for Credentials {
    fn from(l: &LeafKey) -> Self {
        Self {
            certificate_chain: l.cert.pem.clone(),
            private_key: l.key.pkcs8_pem().clone(),
            expires_at: l.cert.not_after,
        }
    }
}

struct CurrentLeaf {
    leaf: Arc<LeafKey>,
    renew_at: u64,
    /// The CA that issued it: a leaf of a CA since replaced is renewed.
    authority: Arc<super::Authority>,
}

/// One module's identity: what the `workload` WIT interface serves.
pub struct ModuleIdentity {
    pub(super) who: WhoAmI,
    pub(super) service: Arc<IdentityService>,
    sealer: Sealer,
    /// What `server_certificate` may certify.
    pub(super) server_names: ServerNames,
    leaf: Mutex<Option<CurrentLeaf>>,
    /// Token bucket for `server_certificate`: (tokens, last refill).
    pub(super) server_certs: Mutex<(f64, std::time::Instant)>,
}

impl std::fmt::Debug for ModuleIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleIdentity")
            .field("who", &self.who)
            .finish_non_exhaustive()
    }
}

/// ECDSA P-256 / SHA-256 (DER) of `data` by `leaf`'s key.
///
/// # Errors
///
/// When the random source fails.
pub fn sign_with(leaf: &LeafKey, data: &[u8]) -> Result<Vec<u8>, IdentityError> {
    leaf.key.sign(data)
}

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    if n == 0 || getrandom::fill(&mut b).is_err() {
        return 0;
    }
    u64::from_le_bytes(b) % n
}

impl ModuleIdentity {
    pub(super) fn new(
        who: WhoAmI,
        service: Arc<IdentityService>,
        sealer: Sealer,
        server_names: ServerNames,
    ) -> Arc<Self> {
        Arc::new(Self {
            who,
            service,
            sealer,
            server_names,
            leaf: Mutex::new(None),
            server_certs: Mutex::new((SERVER_CERT_BURST, std::time::Instant::now())),
        })
    }

    /// Who the module is.
    pub fn whoami(&self) -> &WhoAmI {
        &self.who
    }

    /// The identity service.
    pub fn service(&self) -> &IdentityService {
        &self.service
    }

    /// A JWT-SVID for `audience`.
    ///
    /// # Errors
    ///
    /// See [`TokenService::issue`].
    pub fn token(&self, audience: &[String], ttl_seconds: u32) -> Result<String, IdentityError> {
        self.service
            .tokens()
            .issue(&self.who.spiffe_id, audience, ttl_seconds, &self.who.digest)
    }

    /// Validates a JWT-SVID of this trust domain for `audience`.
    ///
    /// # Errors
    ///
    /// See [`TokenService::validate`].
    pub fn validate_token(&self, token: &str, audience: &str) -> Result<Claims, IdentityError> {
        self.service.tokens().validate(token, audience)
    }

    /// The current X509-SVID leaf, issuing one when there is none or it is
    /// past its renewal time. Blocks on the HSM when it issues.
    ///
    /// # Errors
    ///
    /// HSM errors (the current leaf is still returned while it is valid).
    pub fn current_leaf(&self) -> Result<Arc<LeafKey>, IdentityError> {
        let mut slot = self
            .leaf
            .lock()
            .map_err(|_| IdentityError::Internal("leaf lock poisoned".into()))?;
        let now = unix_now();
        let authority = self.service.authority();
        if let Some(cur) = slot.as_ref()
            && now < cur.renew_at
            && Arc::ptr_eq(&cur.authority, &authority)
        {
            return Ok(cur.leaf.clone());
        }
        let ttl = self.service.config().svid_ttl;
        match authority.issue_leaf(&Profile::Svid, &self.who.spiffe_id, ttl) {
            Ok(leaf) => {
                let life = leaf.cert.not_after.saturating_sub(now);
                let renew_at = now + life / 2 + random_below(life / 10 + 1);
                let leaf = Arc::new(leaf);
                *slot = Some(CurrentLeaf {
                    leaf: leaf.clone(),
                    renew_at,
                    authority,
                });
                tracing::debug!(module = %self.who.module_name, expires_at = leaf.cert.not_after, "X509-SVID issued");
                Ok(leaf)
            }
            Err(e) => match slot.as_mut() {
                Some(cur) if cur.leaf.cert.not_after > now => {
                    // Retry in 30 s (or at a tenth of what is left), not on
                    // every call: the HSM may be down.
                    let left = cur.leaf.cert.not_after - now;
                    cur.renew_at = now + (left / 10).clamp(1, RENEW_RETRY.as_secs());
                    tracing::warn!(module = %self.who.module_name, error = %e, "X509-SVID renewal failed; the current one is still valid");
                    Ok(cur.leaf.clone())
                }
                _ => Err(e),
            },
        }
    }

    /// The current leaf if one exists and is not due for renewal (never
    /// blocks on the HSM).
    pub fn leaf_if_current(&self) -> Option<Arc<LeafKey>> {
        let slot = self.leaf.lock().ok()?;
        let cur = slot.as_ref()?;
        (unix_now() < cur.renew_at && Arc::ptr_eq(&cur.authority, &self.service.authority()))
            .then(|| cur.leaf.clone())
    }

    /// The module's X509-SVID and key.
    ///
    /// # Errors
    ///
    /// See [`ModuleIdentity::current_leaf`].
    pub fn identity_certificate(&self) -> Result<Credentials, IdentityError> {
        Ok(Credentials::from(self.current_leaf()?.as_ref()))
    }

    /// PEM of the trust domain's roots.
    pub fn trust_bundle(&self) -> String {
        self.service.bundle_pem()
    }

    /// ECDSA P-256 / SHA-256 (DER) of `data` by the current leaf key.
    ///
    /// # Errors
    ///
    /// Oversized input; see [`ModuleIdentity::current_leaf`].
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, IdentityError> {
        check_size("data", data.len(), MAX_SIGN_INPUT)?;
        sign_with(self.current_leaf()?.as_ref(), data)
    }

    /// Seals `plaintext` to this module's registration:
    /// `version(1) || nonce(12) || ciphertext || tag(16)`.
    ///
    /// # Errors
    ///
    /// Oversized input.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, IdentityError> {
        self.sealer.encrypt(plaintext, aad)
    }

    /// Opens what [`ModuleIdentity::encrypt`] sealed for this registration.
    ///
    /// # Errors
    ///
    /// A malformed, tampered or foreign ciphertext, or a wrong `aad`.
    pub fn decrypt(&self, ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>, IdentityError> {
        self.sealer.decrypt(ciphertext, aad)
    }
}
