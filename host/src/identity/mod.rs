//! Workload identity: who each module is, and credentials that prove it,
//! rooted in the device CA key in the HSM.
//!
//! - SPIFFE ID: `spiffe://<trust-domain>/device/<device-id>/module/<name>`.
//! - X509-SVIDs: a P-256 leaf key generated on the host per module, certified
//!   by the device CA (HSM) for [`IdentityConfig::svid_ttl`] and re-issued
//!   past half its lifetime (with jitter).
//! - JWT-SVIDs: ES256, signed by an in-memory working key certified by the
//!   device CA and rotated ([`jwt`]).
//! - Data sealing: AES-256-GCM under the module's data key, which the HSM's
//!   master key wraps under the module's name and generation ([`registry`]).

pub mod authority;
pub mod jwt;
pub mod registry;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::{Aead as _, KeyInit as _, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use p256::ecdsa::signature::Signer as _;
use zeroize::Zeroizing;

pub use authority::{Authority, LeafKey, Profile};
pub use jwt::{Claims, PublishedKey, TokenService};

use crate::hsm::{ErrorKind, Hsm, HsmError};

/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "edgeward.local";
/// Default X509-SVID lifetime (1 hour).
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default maximum JWT-SVID lifetime (5 minutes).
pub const DEFAULT_MAX_TOKEN_TTL: Duration = Duration::from_secs(300);
/// Default JWT working-key rotation period (1 hour).
pub const DEFAULT_JWT_KEY_ROTATION: Duration = Duration::from_secs(3600);
/// Largest input `sign` accepts (1 MiB).
pub const MAX_SIGN_INPUT: usize = 1 << 20;
/// Largest plaintext `encrypt` accepts (1 MiB).
pub const MAX_PLAINTEXT: usize = crate::hsm::MAX_AEAD_INPUT;
/// Largest associated data `encrypt`/`decrypt` accept (64 KiB).
pub const MAX_ASSOCIATED_DATA: usize = 64 << 10;
/// Most names a server certificate may carry.
pub const MAX_ALT_NAMES: usize = 16;
/// Server certificates a module may get at once (each costs an HSM
/// signature, which a TPM makes in ~20 ms for every module on the device).
pub const SERVER_CERT_BURST: f64 = 10.0;
/// Server certificates a module may get per second after the burst.
pub const SERVER_CERT_RATE: f64 = 1.0;
/// After a failed X509-SVID renewal, the next attempt waits at most this.
pub const RENEW_RETRY: Duration = Duration::from_secs(30);
/// Version byte that starts every ciphertext `encrypt` returns.
pub const CIPHERTEXT_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What went wrong, in the terms of the WIT `error` variant (plus the
/// set-up failures of the daemon).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// An argument was malformed or outside its limits.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The HSM or another backing service is not available.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Something the caller cannot fix.
    #[error("internal error: {0}")]
    Internal(String),
    /// The state directory.
    #[error("identity state: {0}")]
    Storage(String),
    /// The `[identity]` configuration.
    #[error("identity configuration: {0}")]
    Config(String),
}

impl From<HsmError> for IdentityError {
    fn from(e: HsmError) -> Self {
        match e.kind {
            ErrorKind::Unavailable(_) => IdentityError::Unavailable(e.to_string()),
            _ => IdentityError::Internal(e.to_string()),
        }
    }
}

/// The `[identity]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// SPIFFE trust domain (default `edgeward.local`).
    pub trust_domain: String,
    /// This device's id in SPIFFE IDs (default: the hostname).
    pub device_id: String,
    /// X509-SVID lifetime (default 1 h).
    pub svid_ttl: Duration,
    /// Longest JWT-SVID lifetime; requests are clamped to it (default 5 min).
    pub max_token_ttl: Duration,
    /// How long a JWT working key signs before it is replaced (default 1 h).
    pub jwt_key_rotation: Duration,
    /// A certificate for the HSM's `device-ca` key (PEM: that certificate,
    /// then its issuers up to a self-signed root). Default: a self-signed
    /// root kept in the state directory.
    pub ca_certificate: Option<PathBuf>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            device_id: default_device_id(),
            svid_ttl: DEFAULT_SVID_TTL,
            max_token_ttl: DEFAULT_MAX_TOKEN_TTL,
            jwt_key_rotation: DEFAULT_JWT_KEY_ROTATION,
            ca_certificate: None,
        }
    }
}

/// The hostname, with characters a SPIFFE path segment cannot hold replaced
/// by `-` (`localhost` if it is empty).
pub fn default_device_id() -> String {
    let uname = rustix::system::uname();
    let raw = uname.nodename().to_string_lossy();
    let id: String = raw
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() || id == "." || id == ".." {
        "localhost".to_owned()
    } else {
        id
    }
}

/// A SPIFFE trust domain: 1-255 of `a-z 0-9 . - _`.
pub fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
        })
}

/// A SPIFFE path segment: 1-128 of `A-Z a-z 0-9 . - _`, not `.` or `..`.
pub fn valid_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
}

impl IdentityConfig {
    /// Checks the fields.
    ///
    /// # Errors
    ///
    /// A message naming the field.
    pub fn check(&self) -> Result<(), String> {
        if !valid_trust_domain(&self.trust_domain) {
            return Err(format!(
                "identity.trust_domain {:?}: use 1-255 of a-z 0-9 . - _",
                self.trust_domain
            ));
        }
        if !valid_path_segment(&self.device_id) {
            return Err(format!(
                "identity.device_id {:?}: use 1-128 of A-Z a-z 0-9 . - _ (not . or ..)",
                self.device_id
            ));
        }
        let check = |name: &str, d: Duration, min: u64, max: u64| {
            if (min..=max).contains(&d.as_secs()) {
                Ok(())
            } else {
                Err(format!(
                    "identity.{name}: must be between {min}s and {max}s"
                ))
            }
        };
        check("svid_ttl", self.svid_ttl, 2, 30 * 24 * 3600)?;
        check("max_token_ttl", self.max_token_ttl, 1, 24 * 3600)?;
        check("jwt_key_rotation", self.jwt_key_rotation, 1, 30 * 24 * 3600)
    }
}

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
            private_key: l.key_pem.clone(),
            expires_at: l.cert.not_after,
        }
    }
}

/// The device's identity services: CA, tokens, registrations.
#[derive(Debug)]
pub struct IdentityService {
    config: IdentityConfig,
    hsm: Arc<dyn Hsm>,
    authority: Arc<Authority>,
    tokens: TokenService,
    state_dir: PathBuf,
}

impl IdentityService {
    /// Opens the device CA and the token service (two HSM signatures at
    /// most: a new root, a working-key certificate). Blocks.
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
            config.ca_certificate.as_deref(),
            state_dir,
        )?);
        let tokens = TokenService::open(
            &config.trust_domain,
            authority.clone(),
            config.max_token_ttl,
            config.jwt_key_rotation,
            state_dir,
        )?;
        Ok(Arc::new(Self {
            config,
            hsm,
            authority,
            tokens,
            state_dir: state_dir.to_owned(),
        }))
    }

    /// The settings.
    pub fn config(&self) -> &IdentityConfig {
        &self.config
    }

    /// The device CA.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The token service.
    pub fn tokens(&self) -> &TokenService {
        &self.tokens
    }

    /// The SPIFFE ID of module `name` on this device.
    pub fn spiffe_id(&self, name: &str) -> String {
        format!(
            "spiffe://{}/device/{}/module/{name}",
            self.config.trust_domain, self.config.device_id
        )
    }

    /// The identity of registered module `name` running `digest`: loads its
    /// registration or registers it. Blocks on the HSM.
    ///
    /// # Errors
    ///
    /// An invalid name, HSM and storage errors.
    pub fn register(
        self: &Arc<Self>,
        name: &str,
        digest: &str,
    ) -> Result<Arc<ModuleIdentity>, IdentityError> {
        self.check_name(name)?;
        let reg = registry::load_or_register(self.hsm.as_ref(), &self.state_dir, name)?;
        Ok(self.module(name, digest, reg))
    }

    /// An identity for `name` that lives only as long as the process: a new
    /// generation (and data key) each time.
    ///
    /// # Errors
    ///
    /// An invalid name.
    pub fn ephemeral(
        self: &Arc<Self>,
        name: &str,
        digest: &str,
    ) -> Result<Arc<ModuleIdentity>, IdentityError> {
        self.check_name(name)?;
        Ok(self.module(name, digest, registry::ephemeral()?))
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
        reg: registry::Registration,
    ) -> Arc<ModuleIdentity> {
        let aead = Aes256Gcm::new(reg.data_key.as_ref().into());
        Arc::new(ModuleIdentity {
            who: WhoAmI {
                module_name: name.to_owned(),
                device_id: self.config.device_id.clone(),
                generation_id: reg.generation_id,
                digest: digest.to_owned(),
                spiffe_id: self.spiffe_id(name),
            },
            service: self.clone(),
            aead,
            leaf: Mutex::new(None),
            server_certs: Mutex::new((SERVER_CERT_BURST, std::time::Instant::now())),
        })
    }

    /// The trust bundle as PEM.
    pub fn bundle_pem(&self) -> String {
        self.authority.roots_pem().to_owned()
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
        for der in self.authority.roots_der() {
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

/// The factory of a deferred identity.
type MakeIdentity = Box<dyn FnOnce() -> Result<Arc<ModuleIdentity>, IdentityError> + Send>;

/// A module's identity, made now (the daemon) or at its first use
/// (`edgeward run`, so a module that never asks does not open the HSM).
pub struct IdentityHandle {
    cell: std::sync::OnceLock<Result<Arc<ModuleIdentity>, IdentityError>>,
    make: Mutex<Option<MakeIdentity>>,
}

impl std::fmt::Debug for IdentityHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityHandle")
            .field("identity", &self.cell.get())
            .finish_non_exhaustive()
    }
}

impl IdentityHandle {
    /// An identity that exists already.
    pub fn ready(identity: Arc<ModuleIdentity>) -> Arc<Self> {
        Arc::new(Self {
            cell: std::sync::OnceLock::from(Ok(identity)),
            make: Mutex::new(None),
        })
    }

    /// An identity `make` creates on first use (once; its error is kept and
    /// logged once).
    pub fn deferred(
        make: impl FnOnce() -> Result<Arc<ModuleIdentity>, IdentityError> + Send + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            cell: std::sync::OnceLock::new(),
            make: Mutex::new(Some(Box::new(make))),
        })
    }

    /// The identity, creating it if deferred. May block on the HSM the
    /// first time.
    ///
    /// # Errors
    ///
    /// The creation error (every time, without retrying).
    pub fn get(&self) -> Result<Arc<ModuleIdentity>, IdentityError> {
        self.cell
            .get_or_init(|| {
                let make = self.make.lock().ok().and_then(|mut m| m.take());
                let r = match make {
                    Some(f) => f(),
                    None => Err(IdentityError::Internal(
                        "identity factory already used".into(),
                    )),
                };
                if let Err(e) = &r {
                    tracing::error!(error = %e, "cannot set up the workload identity");
                }
                r
            })
            .clone()
    }

    /// The identity if it exists already (never blocks).
    pub fn get_if_ready(&self) -> Option<&Arc<ModuleIdentity>> {
        self.cell.get().and_then(|r| r.as_ref().ok())
    }
}

struct CurrentLeaf {
    leaf: Arc<LeafKey>,
    renew_at: u64,
}

/// One module's identity: what the `workload` WIT interface serves.
pub struct ModuleIdentity {
    who: WhoAmI,
    service: Arc<IdentityService>,
    aead: Aes256Gcm,
    leaf: Mutex<Option<CurrentLeaf>>,
    /// Token bucket for `server_certificate`: (tokens, last refill).
    server_certs: Mutex<(f64, std::time::Instant)>,
}

impl std::fmt::Debug for ModuleIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleIdentity")
            .field("who", &self.who)
            .finish_non_exhaustive()
    }
}

fn invalid(m: impl Into<String>) -> IdentityError {
    IdentityError::InvalidArgument(m.into())
}

/// Refuses an argument of `len` bytes above `max`, naming it.
pub(crate) fn check_size(what: &str, len: usize, max: usize) -> Result<(), IdentityError> {
    if len > max {
        return Err(invalid(format!("{what}: {len} bytes; the limit is {max}")));
    }
    Ok(())
}

/// ECDSA P-256 / SHA-256 (DER) of `data` by `leaf`'s key.
pub fn sign_with(leaf: &LeafKey, data: &[u8]) -> Vec<u8> {
    let sig: p256::ecdsa::DerSignature = leaf.key.sign(data);
    sig.as_bytes().to_vec()
}

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    if n == 0 || getrandom::fill(&mut b).is_err() {
        return 0;
    }
    u64::from_le_bytes(b) % n
}

/// Checks a DNS name for a server certificate: LDH labels, no wildcard.
fn check_dns_name(name: &str) -> Result<(), IdentityError> {
    let bad = |why: &str| invalid(format!("alt-names: {name:?} {why}"));
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1-253 bytes"));
    }
    if name.starts_with("*.") {
        return Err(bad("is a wildcard; name each host"));
    }
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("has an empty or over-long label"));
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(bad("is not a DNS name or IP address"));
        }
    }
    Ok(())
}

impl ModuleIdentity {
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
            .tokens
            .issue(&self.who.spiffe_id, audience, ttl_seconds, &self.who.digest)
    }

    /// Validates a JWT-SVID of this trust domain for `audience`.
    ///
    /// # Errors
    ///
    /// See [`TokenService::validate`].
    pub fn validate_token(&self, token: &str, audience: &str) -> Result<Claims, IdentityError> {
        self.service.tokens.validate(token, audience)
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
        if let Some(cur) = slot.as_ref()
            && now < cur.renew_at
        {
            return Ok(cur.leaf.clone());
        }
        let ttl = self.service.config.svid_ttl;
        match self.service.authority.issue_leaf(
            &Profile::Svid,
            &self.who.spiffe_id,
            &self.who.module_name,
            ttl,
        ) {
            Ok(leaf) => {
                let life = leaf.cert.not_after.saturating_sub(now);
                let renew_at = now + life / 2 + random_below(life / 10 + 1);
                let leaf = Arc::new(leaf);
                *slot = Some(CurrentLeaf {
                    leaf: leaf.clone(),
                    renew_at,
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
        (unix_now() < cur.renew_at).then(|| cur.leaf.clone())
    }

    /// The module's X509-SVID and key.
    ///
    /// # Errors
    ///
    /// See [`ModuleIdentity::current_leaf`].
    pub fn identity_certificate(&self) -> Result<Credentials, IdentityError> {
        Ok(Credentials::from(self.current_leaf()?.as_ref()))
    }

    /// A server certificate for `common_name` and `alt_names` (DNS names or
    /// IP addresses), with a fresh key. Blocks on the HSM.
    ///
    /// # Errors
    ///
    /// Invalid names, HSM errors.
    pub fn server_certificate(
        &self,
        common_name: &str,
        alt_names: &[String],
    ) -> Result<Credentials, IdentityError> {
        if common_name.is_empty()
            || common_name.len() > 64
            || common_name.chars().any(char::is_control)
        {
            return Err(invalid(
                "common-name: must be 1-64 bytes without control characters",
            ));
        }
        if alt_names.len() > MAX_ALT_NAMES {
            return Err(invalid(format!(
                "alt-names: {} names; the limit is {MAX_ALT_NAMES}",
                alt_names.len()
            )));
        }
        let mut names = Vec::with_capacity(alt_names.len());
        for n in alt_names {
            if let Ok(ip) = n.parse::<IpAddr>() {
                names.push(rcgen::SanType::IpAddress(ip));
            } else {
                check_dns_name(n)?;
                names.push(rcgen::SanType::DnsName(n.as_str().try_into().map_err(
                    |_| invalid(format!("alt-names: {n:?} is not a DNS name")),
                )?));
            }
        }
        self.take_server_cert_token()?;
        let leaf = self.service.authority.issue_leaf(
            &Profile::Server {
                common_name: common_name.to_owned(),
                names,
            },
            &self.who.spiffe_id,
            common_name,
            self.service.config.svid_ttl,
        )?;
        Ok(Credentials::from(&leaf))
    }

    fn take_server_cert_token(&self) -> Result<(), IdentityError> {
        let mut b = self
            .server_certs
            .lock()
            .map_err(|_| IdentityError::Internal("rate limiter lock poisoned".into()))?;
        let now = std::time::Instant::now();
        let refill = now.duration_since(b.1).as_secs_f64() * SERVER_CERT_RATE;
        *b = ((b.0 + refill).min(SERVER_CERT_BURST), now);
        if b.0 < 1.0 {
            return Err(IdentityError::Unavailable(format!(
                "server-certificate rate limit: {SERVER_CERT_BURST} at once, then {SERVER_CERT_RATE} per second; retry later"
            )));
        }
        b.0 -= 1.0;
        Ok(())
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
        Ok(sign_with(self.current_leaf()?.as_ref(), data))
    }

    fn aad(&self, user: &[u8]) -> Vec<u8> {
        let mut a = Vec::with_capacity(64 + user.len());
        a.extend_from_slice(b"edgeward workload aead v1\0");
        a.extend_from_slice(self.who.module_name.as_bytes());
        a.push(0);
        a.extend_from_slice(self.who.generation_id.as_bytes());
        a.push(0);
        a.extend_from_slice(user);
        a
    }

    /// Seals `plaintext` to this module's registration:
    /// `version(1) || nonce(12) || ciphertext || tag(16)`.
    ///
    /// # Errors
    ///
    /// Oversized input.
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, IdentityError> {
        check_size("plaintext", plaintext.len(), MAX_PLAINTEXT)?;
        check_size("associated-data", aad.len(), MAX_ASSOCIATED_DATA)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| IdentityError::Internal(format!("random: {e}")))?;
        let ct = self
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &self.aad(aad),
                },
            )
            .map_err(|_| IdentityError::Internal("encryption failed".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(CIPHERTEXT_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens what [`ModuleIdentity::encrypt`] sealed for this registration.
    ///
    /// # Errors
    ///
    /// A malformed, tampered or foreign ciphertext, or a wrong `aad`.
    pub fn decrypt(&self, ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>, IdentityError> {
        check_size("associated-data", aad.len(), MAX_ASSOCIATED_DATA)?;
        if ciphertext.len() > MAX_PLAINTEXT + 1 + NONCE_LEN + TAG_LEN {
            return Err(invalid("ciphertext: longer than encrypt can produce"));
        }
        let Some((&version, rest)) = ciphertext.split_first() else {
            return Err(invalid("ciphertext: empty"));
        };
        if version != CIPHERTEXT_VERSION {
            return Err(invalid(format!(
                "ciphertext: unknown version {version} (expected {CIPHERTEXT_VERSION})"
            )));
        }
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(invalid("ciphertext: truncated"));
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        self.aead
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: &self.aad(aad),
                },
            )
            .map_err(|_| {
                invalid("ciphertext: authentication failed (tampered, wrong associated data, or sealed by another module or registration)")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_trust_domain("edgeward.local"));
        assert!(!valid_trust_domain("Edgeward.local"));
        assert!(!valid_trust_domain(""));
        assert!(valid_path_segment("Sensor-1.a_b"));
        assert!(!valid_path_segment(".."));
        assert!(!valid_path_segment("a/b"));
        assert!(valid_path_segment(&default_device_id()));
        assert!(check_dns_name("api.example.com").is_ok());
        assert!(check_dns_name("*.example.com").is_err());
        assert!(check_dns_name("-a.example").is_err());
        assert!(check_dns_name("a..b").is_err());
    }

    #[test]
    fn config_limits() {
        let mut c = IdentityConfig::default();
        assert!(c.check().is_ok());
        c.svid_ttl = Duration::from_secs(1);
        assert!(c.check().unwrap_err().contains("svid_ttl"));
    }
}
