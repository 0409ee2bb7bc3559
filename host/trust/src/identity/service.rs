//! The device's identity service: the device CA, the token service and
//! module registrations.

use std::path::Path;
use std::sync::Arc;

use super::authority::{self, Authority};
use super::jwt::{self, PublishedKey, TokenService};
use super::module::WhoAmI;
use super::names::{ServerNamePolicy, ServerNames};
use super::registration::Registration;
use super::sealing::Sealer;
use super::{
    IdentityConfig, IdentityError, ModuleIdentity, registration, unix_now, valid_path_segment,
};
use crate::hsm::Hsm;

/// The device's identity services: CA, tokens, registrations.
#[derive(Debug)]
pub struct IdentityService {
    config: IdentityConfig,
    hsm: Arc<dyn Hsm>,
    /// Replaced once when an enrolled device adopts its organisation's
    /// chain ([`IdentityService::adopt_ca_certificate`]).
    authority: std::sync::RwLock<Arc<Authority>>,
    tokens: TokenService,
}

impl IdentityService {
    /// Opens the device CA and the token service (creating their HSM keys
    /// if needed, and a self-signed root: one HSM signature). Blocks.
    ///
    /// # Errors
    ///
    /// Configuration, HSM and storage errors.
    pub fn open(
        hsm: Arc<dyn Hsm>,
        config: IdentityConfig,
        state_dir: &Path,
    ) -> Result<Arc<Self>, IdentityError> {
        config.check().map_err(IdentityError::Config)?;
        let authority = Arc::new(Authority::open(
            hsm.clone(),
            &config.device_id,
            &config.trust_domain,
            config.ca_certificate.as_deref(),
            state_dir,
        )?);
        let tokens = TokenService::open(
            &config.trust_domain,
            hsm.clone(),
            &config.device_id,
            config.max_token_ttl,
            config.jwt_key_rotation,
            state_dir,
        )?;
        Ok(Arc::new(Self {
            config,
            hsm,
            authority: std::sync::RwLock::new(authority),
            tokens,
        }))
    }

    /// The settings.
    pub fn config(&self) -> &IdentityConfig {
        &self.config
    }

    /// The device CA.
    pub fn authority(&self) -> Arc<Authority> {
        self.authority
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Adopts the chain at `path` (the organisation's certificate for the
    /// device CA key, then its issuers) in place of the current one: the
    /// trust bundle is its root from now on, and every module's X509-SVID
    /// is issued anew under it at its next request. Blocks.
    ///
    /// # Errors
    ///
    /// What [`Authority::open`] refuses a configured chain for; the
    /// current chain stays.
    pub fn adopt_ca_certificate(&self, path: &Path) -> Result<(), IdentityError> {
        let next = Arc::new(Authority::open(
            self.hsm.clone(),
            &self.config.device_id,
            &self.config.trust_domain,
            Some(path),
            path,
        )?);
        *self
            .authority
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        Ok(())
    }

    /// The token service.
    pub fn tokens(&self) -> &TokenService {
        &self.tokens
    }

    /// The SPIFFE ID of the device itself.
    pub fn device_spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/device/{}",
            self.config.trust_domain, self.config.device_id
        )
    }

    /// The SPIFFE ID of module `name` on this device.
    pub fn spiffe_id(&self, name: &str) -> String {
        format!(
            "spiffe://{}/device/{}/module/{name}",
            self.config.trust_domain, self.config.device_id
        )
    }

    /// The HSM backend's name (`soft`, `tpm`, `pkcs11`).
    pub fn hsm_backend(&self) -> &'static str {
        self.hsm.backend()
    }

    /// The HSM (the daemon measures into its register).
    pub fn hsm(&self) -> Arc<dyn Hsm> {
        self.hsm.clone()
    }

    /// The identity of registered module `name` running `digest`, with the
    /// registration `load` finds or creates for it (the daemon keeps them
    /// in its registry). `load` runs only once `name` and `server_names`
    /// are known to be valid. Blocks on the HSM.
    ///
    /// # Errors
    ///
    /// An invalid name, and what `load` returns.
    pub fn register(
        self: &Arc<Self>,
        name: &str,
        digest: &str,
        server_names: &ServerNamePolicy,
        load: impl FnOnce(&dyn Hsm, &str) -> Result<Registration, IdentityError>,
    ) -> Result<Arc<ModuleIdentity>, IdentityError> {
        self.check_name(name)?;
        let names = self.server_names(name, server_names)?;
        let reg = load(self.hsm.as_ref(), name)?;
        Ok(self.module(name, digest, reg, names))
    }

    /// An identity for `name` that lives only as long as the process: a new
    /// generation (and data key) each time.
    ///
    /// # Errors
    ///
    /// An invalid name, or `server_names` that do not expand for it.
    pub fn ephemeral(
        self: &Arc<Self>,
        name: &str,
        digest: &str,
        server_names: &ServerNamePolicy,
    ) -> Result<Arc<ModuleIdentity>, IdentityError> {
        self.check_name(name)?;
        let names = self.server_names(name, server_names)?;
        Ok(self.module(name, digest, registration::ephemeral()?, names))
    }

    /// `policy` expanded for module `name` on this device.
    fn server_names(
        &self,
        name: &str,
        policy: &ServerNamePolicy,
    ) -> Result<ServerNames, IdentityError> {
        policy
            .resolve(name, &self.config.device_id)
            .map_err(|e| IdentityError::Config(format!("module {name:?}: {e}")))
    }

    fn check_name(&self, name: &str) -> Result<(), IdentityError> {
        if valid_path_segment(name) {
            Ok(())
        } else {
            Err(IdentityError::InvalidArgument(format!(
                "module name {name:?} cannot be a SPIFFE path segment"
            )))
        }
    }

    fn module(
        self: &Arc<Self>,
        name: &str,
        digest: &str,
        reg: Registration,
        server_names: ServerNames,
    ) -> Arc<ModuleIdentity> {
        let sealer = Sealer::new(&reg.data_key, name, &reg.generation_id);
        ModuleIdentity::new(
            WhoAmI {
                module_name: name.to_owned(),
                device_id: self.config.device_id.clone(),
                generation_id: reg.generation_id,
                digest: digest.to_owned(),
                spiffe_id: self.spiffe_id(name),
            },
            self.clone(),
            sealer,
            server_names,
        )
    }

    /// The trust bundle as PEM.
    pub fn bundle_pem(&self) -> String {
        self.authority().roots_pem().to_owned()
    }

    /// The trust bundle as a SPIFFE bundle (JWKS): the X.509 roots
    /// (`use: x509-svid`, with `x5c`) and the JWT-SVID keys (`use: jwt-svid`).
    ///
    /// # Errors
    ///
    /// A root whose key is not P-256.
    pub fn bundle_jwks(&self) -> Result<serde_json::Value, IdentityError> {
        use base64ct::{Base64, Base64UrlUnpadded, Encoding as _};
        let mut keys = Vec::new();
        let current = self.authority();
        for der in current.roots_der() {
            let point = authority::certificate_point(der)
                .filter(|p| p.len() == 65 && p[0] == 4)
                .ok_or_else(|| {
                    IdentityError::Internal(
                        "a root key is not P-256; JWKS needs its parameters".into(),
                    )
                })?;
            keys.push(serde_json::json!({
                "kty": "EC",
                "crv": "P-256",
                "x": Base64UrlUnpadded::encode_string(&point[1..33]),
                "y": Base64UrlUnpadded::encode_string(&point[33..]),
                "use": "x509-svid",
                "x5c": [Base64::encode_string(der)],
            }));
        }
        keys.extend(self.tokens.published().iter().filter_map(PublishedKey::jwk));
        Ok(serde_json::json!({
            "keys": keys,
            "spiffe_sequence": unix_now(),
            "spiffe_refresh_hint": self.config.jwt_key_rotation.as_secs().min(300),
        }))
    }

    /// Rotates the JWT working key whenever it is due, until `stop` turns
    /// true. HSM work runs on the blocking pool. With `eager`, makes the
    /// first working key now rather than at the first token request.
    pub async fn maintain(
        self: Arc<Self>,
        eager: bool,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        if eager {
            self.rotate_in_background(
                true,
                "cannot make the first JWT working key; retrying at the first token request",
            )
            .await;
        }
        let period = jwt::rotation_check_period(self.tokens.rotation());
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.rotate_in_background(false, "JWT working key rotation failed; retrying")
                .await;
        }
    }

    /// [`TokenService::rotate`] on the blocking pool; failures are logged
    /// with `failed`.
    async fn rotate_in_background(self: &Arc<Self>, force: bool, failed: &str) {
        let svc = self.clone();
        match tokio::task::spawn_blocking(move || svc.tokens.rotate(force)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "{failed}"),
            Err(e) => tracing::warn!(error = %e, "JWT working key task failed"),
        }
    }
}
