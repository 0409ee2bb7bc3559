//! JWT-SVIDs: JWS compact, ES256 only, signed by an in-memory working key
//! that rotates. The TPM (or any slow HSM) signs one certificate per
//! rotation and is never on the token path.
//!
//! Working keys are certified by [`JWT_AUTHORITY_KEY`], an HSM key used for
//! nothing else (not the device CA: a module holds its own SVID leaf key,
//! which the device CA certified, and must not be able to pass it off as a
//! token key). The certificate binds the `kid` (subject CN
//! `edgeward jwt-svid signer <kid>`) and bounds the key's validity
//! (`notAfter`). Keys are published (public point, certificate) in
//! `state_dir/identity/jwt-keys.json`, so `edgeward bundle` and other
//! edgeward processes on the device can verify tokens; a published key is
//! trusted only if its certificate verifies under the JWT authority key,
//! and only until its certificate's `notAfter`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64ct::{Base64, Base64UrlUnpadded, Encoding as _};
use rcgen::{CertificateParams, Issuer, KeyIdMethod, KeyUsagePurpose};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::authority::{BACKDATE, HsmKey, PublicP256, edgeward_name, key_identifier, leaf_params};
use super::hostkey::{HostKey, SignatureEncoding, verify_fixed};
use super::{IdentityError, unix_now};
use crate::hsm::Hsm;
use crate::state;

/// The HSM key that certifies JWT-SVID working keys, and nothing else.
pub const JWT_AUTHORITY_KEY: &str = "jwt-authority";
/// A working key's certificate has this subject CN, then its `kid`.
pub const SIGNER_CN_PREFIX: &str = "edgeward jwt-svid signer ";
/// After a failed inline rotation (the HSM is down), token requests that
/// need a new key fail fast for this long, doubling per failure...
pub const INLINE_RETRY_MIN: Duration = Duration::from_secs(1);
/// ...up to this.
pub const INLINE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Largest token `validate` looks at (8 KiB).
pub const MAX_TOKEN: usize = 8 << 10;
/// Most audiences a token may carry.
pub const MAX_AUDIENCES: usize = 16;
/// Longest audience string (bytes).
pub const MAX_AUDIENCE_LEN: usize = 256;
/// Unknown `kid`s re-read the published keys at most this often.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// A key that verifies tokens: public point and until when it may be used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedKey {
    /// JWS `kid`.
    pub kid: String,
    /// SEC1 uncompressed point, base64.
    pub public_key: String,
    /// The device CA's certificate for this key (DER, base64).
    pub certificate: String,
    /// Tokens it signed are valid until at most this time (unix seconds).
    pub valid_until: u64,
}

impl PublishedKey {
    fn point(&self) -> Option<Vec<u8>> {
        Base64::decode_vec(&self.public_key).ok()
    }

    /// The JWK (RFC 7517) of this key, `use` = `jwt-svid`, as a SPIFFE
    /// bundle holds it.
    pub fn jwk(&self) -> Option<serde_json::Value> {
        let point = self.point()?;
        if point.len() != 65 || point[0] != 4 {
            return None;
        }
        Some(serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": Base64UrlUnpadded::encode_string(&point[1..33]),
            "y": Base64UrlUnpadded::encode_string(&point[33..]),
            "kid": self.kid,
            "use": "jwt-svid",
        }))
    }
}

struct WorkingKey {
    kid: String,
    key: HostKey,
    /// The background rotation replaces it from this time (unix seconds).
    retire_at: u64,
    /// Verifiers accept its tokens until then; no token it signs expires
    /// later.
    valid_until: u64,
}

/// How often the background task checks whether the working key is due.
pub fn rotation_check_period(rotation: Duration) -> Duration {
    (rotation / 10).clamp(Duration::from_millis(200), Duration::from_secs(60))
}

/// The verified claims of a JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`: the SPIFFE ID.
    pub subject: String,
    /// `aud`.
    pub audience: Vec<String>,
    /// `iat`.
    pub issued_at: u64,
    /// `exp`.
    pub expires_at: u64,
    /// `digest`: the module's measurement.
    pub digest: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Payload {
    sub: String,
    aud: Audience,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    digest: Option<String>,
}

/// A published key that passed [`TokenService::certified`].
#[derive(Debug)]
struct TrustedKey {
    published: PublishedKey,
    point: Vec<u8>,
    /// `min(published valid_until, certificate notAfter)`.
    valid_until: u64,
}

/// Inline rotations that failed, for the backoff.
#[derive(Debug, Default)]
struct InlineRetry {
    failures: u32,
    next_attempt: Option<Instant>,
}

/// Issues and validates JWT-SVIDs for one trust domain.
pub struct TokenService {
    trust_domain: String,
    hsm: Arc<dyn Hsm>,
    /// The JWT authority's public point and its issuer name.
    authority_point: Vec<u8>,
    issuer: CertificateParams,
    max_ttl: Duration,
    rotation: Duration,
    current: RwLock<Option<Arc<WorkingKey>>>,
    known: RwLock<HashMap<String, Arc<TrustedKey>>>,
    keys_file: PathBuf,
    last_reload: Mutex<Option<Instant>>,
    /// Held while a working key is made: one HSM signature at a time.
    rotating: Mutex<()>,
    /// Held by token requests that must rotate inline: one attempt at a
    /// time, then a backoff while the HSM keeps failing.
    inline: Mutex<InlineRetry>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("trust_domain", &self.trust_domain)
            .field("max_ttl", &self.max_ttl)
            .field("rotation", &self.rotation)
            .finish_non_exhaustive()
    }
}

/// A `kid`: base64url of the first 16 bytes of SHA-256 over the point.
fn kid_of(point: &[u8]) -> String {
    Base64UrlUnpadded::encode_string(&Sha256::digest(point)[..16])
}

fn invalid(m: impl Into<String>) -> IdentityError {
    IdentityError::InvalidArgument(m.into())
}

impl TokenService {
    /// Starts the service: creates the JWT authority key in the HSM if
    /// needed. The first working key is made by [`TokenService::rotate`]
    /// (the daemon does so at start) or by the first token request.
    ///
    /// # Errors
    ///
    /// HSM errors (making or reading the JWT authority key).
    pub fn open(
        trust_domain: &str,
        hsm: Arc<dyn Hsm>,
        device_id: &str,
        max_ttl: Duration,
        rotation: Duration,
        state_dir: &std::path::Path,
    ) -> Result<Self, IdentityError> {
        let authority_point = hsm.signing_key(JWT_AUTHORITY_KEY)?;
        let mut issuer = CertificateParams::default();
        issuer.distinguished_name =
            edgeward_name(format!("edgeward jwt-svid authority {device_id}"));
        issuer.key_identifier_method = KeyIdMethod::PreSpecified(key_identifier(&authority_point));
        issuer.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let keys_file = state_dir.join("identity").join("jwt-keys.json");
        // Published keys are read (and their certificates checked) when
        // first needed, not on every start.
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            hsm,
            authority_point,
            issuer,
            max_ttl,
            rotation,
            current: RwLock::new(None),
            known: RwLock::new(HashMap::new()),
            keys_file,
            last_reload: Mutex::new(None),
            rotating: Mutex::new(()),
            inline: Mutex::new(InlineRetry::default()),
        })
    }

    /// The certificate of working key `kid` (`point`) until `not_after`,
    /// signed by the JWT authority key. Blocks on the HSM.
    fn certify(&self, kid: &str, point: &[u8], not_after: u64) -> Result<Vec<u8>, IdentityError> {
        let mut p = leaf_params(point, not_after)?;
        p.distinguished_name = edgeward_name(format!("{SIGNER_CN_PREFIX}{kid}"));
        let signer = HsmKey {
            hsm: self.hsm.clone(),
            id: JWT_AUTHORITY_KEY,
            point: self.authority_point.clone(),
        };
        let cert = p
            .signed_by(
                &PublicP256(point.to_vec()),
                &Issuer::from_params(&self.issuer, signer),
            )
            .map_err(|e| match e {
                rcgen::Error::RemoteKeyError => IdentityError::Unavailable(format!(
                    "the {JWT_AUTHORITY_KEY} key in the {} HSM could not sign",
                    self.hsm.backend()
                )),
                other => IdentityError::Internal(format!("certificate encoding: {other}")),
            })?;
        Ok(cert.der().to_vec())
    }

    fn new_working_key(&self) -> Result<(WorkingKey, PublishedKey), IdentityError> {
        let key = HostKey::generate(SignatureEncoding::Fixed)?;
        let kid = kid_of(key.point());
        let retire_at = unix_now() + self.rotation.as_secs();
        // A key signs until the background task replaces it (up to one check
        // period after `retire_at`, or until the inline fallback at half a
        // maximum TTL later); its tokens must stay verifiable for their whole
        // life after that.
        let slack = self.max_ttl.as_secs() / 2 + rotation_check_period(self.rotation).as_secs() + 1;
        let valid_until = retire_at + slack + self.max_ttl.as_secs();
        let cert = self.certify(&kid, key.point(), valid_until)?;
        let published = PublishedKey {
            kid: kid.clone(),
            public_key: Base64::encode_string(key.point()),
            certificate: Base64::encode_string(&cert),
            valid_until,
        };
        Ok((
            WorkingKey {
                kid,
                key,
                retire_at,
                valid_until,
            },
            published,
        ))
    }

    /// Checks a published key: its `kid` is its point's, and its
    /// certificate is for that point, names that `kid`, is signed by the JWT
    /// authority key and has begun. Returns it with its validity cut at the
    /// certificate's `notAfter`.
    fn certified(&self, k: &PublishedKey) -> Option<TrustedKey> {
        let point = k.point()?;
        if kid_of(&point) != k.kid {
            return None;
        }
        let der = Base64::decode_vec(&k.certificate).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
        if cert.public_key().subject_public_key.data.as_ref() != point.as_slice() {
            return None;
        }
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
        if cn.strip_prefix(SIGNER_CN_PREFIX) != Some(k.kid.as_str()) {
            return None;
        }
        if !crate::hsm::verify_p256(
            &self.authority_point,
            cert.tbs_certificate.as_ref(),
            &cert.signature_value.data,
        ) {
            return None;
        }
        let not_before = u64::try_from(cert.validity().not_before.timestamp()).ok()?;
        let not_after = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
        if not_before > unix_now() + BACKDATE.as_secs() {
            return None;
        }
        Some(TrustedKey {
            published: k.clone(),
            point,
            valid_until: k.valid_until.min(not_after),
        })
    }

    fn read_file(&self) -> Vec<PublishedKey> {
        match std::fs::read(&self.keys_file) {
            Ok(bytes) => match serde_json::from_slice::<Vec<PublishedKey>>(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(path = %self.keys_file.display(), error = %e, "ignoring malformed published JWT keys");
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(path = %self.keys_file.display(), error = %e, "cannot read published JWT keys");
                Vec::new()
            }
        }
    }

    /// Merges the file's certified, unexpired keys into the known set
    /// (keys already known with the same certificate are not checked again).
    fn reload(&self) {
        let now = unix_now();
        let file = self.read_file();
        let mut fresh = Vec::new();
        for k in file {
            let known = self
                .known
                .read()
                .ok()
                .and_then(|m| m.get(&k.kid).map(|t| t.published == k));
            if known == Some(true) {
                continue;
            }
            match self.certified(&k) {
                Some(t) if t.valid_until > now => fresh.push(t),
                Some(_) => {}
                None => tracing::warn!(
                    kid = %k.kid,
                    "published JWT key is not certified by the {JWT_AUTHORITY_KEY} key; ignored"
                ),
            }
        }
        if let Ok(mut known) = self.known.write() {
            known.retain(|_, k| k.valid_until > now);
            for t in fresh {
                known.insert(t.published.kid.clone(), Arc::new(t));
            }
        }
    }

    /// Adds `key` to the known set and the published file (merging with
    /// what other processes published, dropping expired keys). The merge
    /// holds an exclusive lock on `jwt-keys.lock`, so two edgeward processes
    /// publishing at once cannot drop each other's key.
    fn publish(&self, key: PublishedKey) -> Result<(), IdentityError> {
        let storage = |e: std::io::Error| {
            IdentityError::Storage(format!("{}: {e}", self.keys_file.display()))
        };
        if let Some(dir) = self.keys_file.parent() {
            state::ensure_private_dir(dir).map_err(storage)?;
        }
        let trusted = self.certified(&key).ok_or_else(|| {
            IdentityError::Internal("a new working key failed its own certificate check".into())
        })?;
        use std::os::unix::fs::OpenOptionsExt as _;
        let lock = std::fs::OpenOptions::new()
            .mode(0o600)
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.keys_file.with_extension("lock"))
            .map_err(storage)?;
        lock.lock().map_err(storage)?;
        self.reload();
        let all: Vec<PublishedKey> = {
            let mut known = self
                .known
                .write()
                .map_err(|_| IdentityError::Internal("key set lock poisoned".into()))?;
            known.insert(key.kid.clone(), Arc::new(trusted));
            let mut v: Vec<_> = known.values().map(|t| t.published.clone()).collect();
            v.sort_by(|a, b| a.valid_until.cmp(&b.valid_until).then(a.kid.cmp(&b.kid)));
            v
        };
        let json = serde_json::to_vec_pretty(&all)
            .map_err(|e| IdentityError::Internal(format!("encode keys: {e}")))?;
        state::write_atomic(&self.keys_file, &json).map_err(storage)
        // `lock` is released when dropped.
    }

    /// Replaces the working key if there is one and it is due, or always
    /// with `force` (which also makes the first one). Blocks on the HSM for
    /// one signature; call from a blocking context. One rotation runs at a
    /// time.
    ///
    /// # Errors
    ///
    /// HSM or storage failures; the current key stays in use.
    pub fn rotate(&self, force: bool) -> Result<bool, IdentityError> {
        let _one = self
            .rotating
            .lock()
            .map_err(|_| IdentityError::Internal("rotation lock poisoned".into()))?;
        let due = self
            .current
            .read()
            .map(|k| k.as_ref().is_some_and(|k| unix_now() >= k.retire_at))
            .unwrap_or(true);
        if !(due || force) {
            return Ok(false);
        }
        let (key, published) = self.new_working_key()?;
        self.publish(published)?;
        let kid = key.kid.clone();
        if let Ok(mut cur) = self.current.write() {
            *cur = Some(Arc::new(key));
        }
        tracing::info!(kid = %kid, "JWT-SVID working key rotated");
        Ok(true)
    }

    /// A key for a token of `ttl` seconds when the current one will not do:
    /// rotates inline, one caller at a time. While the HSM keeps failing,
    /// callers get `unavailable` at once (backing off from
    /// [`INLINE_RETRY_MIN`] to [`INLINE_RETRY_MAX`]) instead of each calling
    /// it, and the old key keeps signing while its validity covers the token.
    fn rotate_inline(&self, ttl: u64) -> Result<Arc<WorkingKey>, IdentityError> {
        let mut retry = self
            .inline
            .lock()
            .map_err(|_| IdentityError::Internal("rotation lock poisoned".into()))?;
        let now = unix_now();
        let current = self.current_key()?;
        // Another caller may have rotated while this one waited.
        if let Some(k) = &current
            && self.fresh(k, now, ttl)
        {
            return Ok(k.clone());
        }
        let still_valid = current.filter(|k| now + ttl <= k.valid_until);
        if let Some(at) = retry.next_attempt
            && Instant::now() < at
        {
            return still_valid.ok_or_else(|| {
                IdentityError::Unavailable(format!(
                    "no JWT signing key: the HSM failed {} time(s); next attempt in {} ms",
                    retry.failures,
                    at.saturating_duration_since(Instant::now()).as_millis()
                ))
            });
        }
        match self.rotate(true) {
            Ok(_) => {
                *retry = InlineRetry::default();
                self.current_key()?
                    .ok_or_else(|| IdentityError::Internal("no working key after rotation".into()))
            }
            Err(e) => {
                retry.failures = retry.failures.saturating_add(1);
                let wait = INLINE_RETRY_MIN
                    .saturating_mul(1 << retry.failures.saturating_sub(1).min(16))
                    .min(INLINE_RETRY_MAX);
                retry.next_attempt = Some(Instant::now() + wait);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis(), "JWT working key rotation failed");
                still_valid.ok_or(e)
            }
        }
    }

    /// Whether `k` may sign a token of `ttl` seconds now without rotating.
    fn fresh(&self, k: &WorkingKey, now: u64, ttl: u64) -> bool {
        now < k.retire_at + self.max_ttl.as_secs() / 2 && now + ttl <= k.valid_until
    }

    /// How often the working key rotates.
    pub fn rotation(&self) -> Duration {
        self.rotation
    }

    /// The longest token lifetime.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// The keys a verifier needs now (unexpired, certified).
    pub fn published(&self) -> Vec<PublishedKey> {
        self.reload();
        let now = unix_now();
        let mut v: Vec<_> = self
            .known
            .read()
            .map(|k| {
                k.values()
                    .filter(|k| k.valid_until > now)
                    .map(|k| PublishedKey {
                        valid_until: k.valid_until,
                        ..k.published.clone()
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.kid.cmp(&b.kid));
        v
    }

    /// Checks token-request arguments: 1..=16 audiences of 1..=256 bytes,
    /// ttl > 0. Returns the clamped ttl.
    ///
    /// # Errors
    ///
    /// [`IdentityError::InvalidArgument`] naming the argument.
    pub fn check_request(
        &self,
        audience: &[String],
        ttl_seconds: u32,
    ) -> Result<u64, IdentityError> {
        if audience.is_empty() {
            return Err(invalid("audience: at least one audience is required"));
        }
        if audience.len() > MAX_AUDIENCES {
            return Err(invalid(format!(
                "audience: {} audiences; the limit is {MAX_AUDIENCES}",
                audience.len()
            )));
        }
        for a in audience {
            if a.is_empty() || a.len() > MAX_AUDIENCE_LEN {
                return Err(invalid(format!(
                    "audience: each must be 1-{MAX_AUDIENCE_LEN} bytes (got {})",
                    a.len()
                )));
            }
        }
        if ttl_seconds == 0 {
            return Err(invalid("ttl-seconds: must be greater than zero"));
        }
        Ok(u64::from(ttl_seconds).min(self.max_ttl.as_secs()))
    }

    /// Whether [`TokenService::issue`] for `ttl_seconds` can use the current
    /// working key, i.e. will not block on the HSM to rotate it.
    pub fn can_issue_now(&self, ttl_seconds: u32) -> bool {
        let ttl = u64::from(ttl_seconds).min(self.max_ttl.as_secs());
        matches!(self.current_key(), Ok(Some(k)) if self.fresh(&k, unix_now(), ttl))
    }

    /// Whether [`TokenService::validate`] can decide on `token` from the keys
    /// in memory (malformed tokens count: they are refused without I/O);
    /// `false` means it may read the published keys from disk.
    pub fn can_validate_now(&self, token: &str) -> bool {
        let kid = token
            .split('.')
            .next()
            .and_then(|h| Base64UrlUnpadded::decode_vec(h).ok())
            .and_then(|b| serde_json::from_slice::<Header>(&b).ok())
            .and_then(|h| h.kid);
        match kid {
            None => true,
            Some(kid) => self.known.read().is_ok_and(|k| k.contains_key(&kid)),
        }
    }

    /// Issues a JWT-SVID for `subject` (a SPIFFE ID of this trust domain).
    ///
    /// # Errors
    ///
    /// Invalid arguments (see [`TokenService::check_request`]); HSM errors
    /// only when the working key is overdue and must rotate inline.
    pub fn issue(
        &self,
        subject: &str,
        audience: &[String],
        ttl_seconds: u32,
        digest: &str,
    ) -> Result<String, IdentityError> {
        let ttl = self.check_request(audience, ttl_seconds)?;
        let now = unix_now();
        // The daemon makes the first key at start and rotates in the
        // background; without that (or far past retirement) it happens here.
        let key = match self.current_key()? {
            Some(k) if self.fresh(&k, now, ttl) => k,
            _ => self.rotate_inline(ttl)?,
        };
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti).map_err(|e| IdentityError::Internal(format!("random: {e}")))?;
        let header = serde_json::json!({ "alg": "ES256", "kid": key.kid, "typ": "JWT" });
        let payload = serde_json::json!({
            "sub": subject,
            "aud": audience,
            "iat": now,
            "exp": now + ttl,
            "jti": crate::measure::hex(&jti),
            "digest": digest,
        });
        let mut out = Base64UrlUnpadded::encode_string(header.to_string().as_bytes());
        out.push('.');
        out.push_str(&Base64UrlUnpadded::encode_string(
            payload.to_string().as_bytes(),
        ));
        let sig = key.key.sign(out.as_bytes())?;
        out.push('.');
        out.push_str(&Base64UrlUnpadded::encode_string(&sig));
        Ok(out)
    }

    fn current_key(&self) -> Result<Option<Arc<WorkingKey>>, IdentityError> {
        self.current
            .read()
            .map(|k| k.clone())
            .map_err(|_| IdentityError::Internal("working key lock poisoned".into()))
    }

    fn key_for(&self, kid: &str) -> Option<Arc<TrustedKey>> {
        let now = unix_now();
        let find = || {
            self.known
                .read()
                .ok()
                .and_then(|k| k.get(kid).cloned())
                .filter(|k| k.valid_until > now)
        };
        if let Some(k) = find() {
            return Some(k);
        }
        // Another edgeward process may have published it; look, rarely.
        let reload = self.last_reload.lock().ok().is_some_and(|mut last| {
            let due = last.is_none_or(|t| t.elapsed() >= RELOAD_INTERVAL);
            if due {
                *last = Some(Instant::now());
            }
            due
        });
        if reload {
            self.reload();
            return find();
        }
        None
    }

    /// Validates a JWT-SVID: ES256 only, a known certified `kid`, an intact
    /// signature, a subject in this trust domain, unexpired, and `audience`
    /// among its audiences.
    ///
    /// # Errors
    ///
    /// [`IdentityError::InvalidArgument`] naming the first check that failed.
    pub fn validate(&self, token: &str, audience: &str) -> Result<Claims, IdentityError> {
        if audience.is_empty() || audience.len() > MAX_AUDIENCE_LEN {
            return Err(invalid(format!(
                "audience: must be 1-{MAX_AUDIENCE_LEN} bytes"
            )));
        }
        super::check_size("token", token.len(), MAX_TOKEN)?;
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "token: not a JWS compact serialization (header.payload.signature)",
            ));
        };
        let header: Header = Base64UrlUnpadded::decode_vec(h64)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| invalid("token: malformed header"))?;
        if header.alg != "ES256" {
            return Err(invalid(format!(
                "token: algorithm {:?} is not accepted (only ES256)",
                header.alg
            )));
        }
        if header.crit.is_some() {
            return Err(invalid(
                "token: critical header extensions are not supported",
            ));
        }
        if let Some(t) = &header.typ
            && t != "JWT"
            && t != "JOSE"
        {
            return Err(invalid(format!("token: type {t:?} is not a JWT")));
        }
        let kid = header
            .kid
            .ok_or_else(|| invalid("token: no key id (kid)"))?;
        let key = self
            .key_for(&kid)
            .ok_or_else(|| invalid(format!("token: unknown or expired signing key {kid:?}")))?;
        let mut sig = [0u8; 64];
        match Base64UrlUnpadded::decode(s64, &mut sig) {
            Ok(s) if s.len() == 64 => {}
            _ => return Err(invalid("token: malformed signature")),
        }
        let signed = &token[..h64.len() + 1 + p64.len()];
        if !verify_fixed(&key.point, signed.as_bytes(), &sig) {
            return Err(invalid("token: signature does not verify"));
        }
        let payload: Payload = Base64UrlUnpadded::decode_vec(p64)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| invalid("token: malformed claims"))?;
        let prefix = format!("spiffe://{}/", self.trust_domain);
        if !payload.sub.starts_with(&prefix) {
            return Err(invalid(format!(
                "token: subject {:?} is not in trust domain {}",
                payload.sub, self.trust_domain
            )));
        }
        let now = unix_now();
        if payload.exp <= now {
            return Err(invalid("token: expired"));
        }
        if payload
            .nbf
            .is_some_and(|nbf| nbf > now + super::authority::BACKDATE.as_secs())
        {
            return Err(invalid("token: not yet valid"));
        }
        let aud = match payload.aud {
            Audience::One(a) => vec![a],
            Audience::Many(v) => v,
        };
        if !aud.iter().any(|a| a == audience) {
            return Err(invalid(format!(
                "token: not issued for audience {audience:?}"
            )));
        }
        Ok(Claims {
            subject: payload.sub,
            audience: aud,
            issued_at: payload.iat.unwrap_or(0),
            expires_at: payload.exp,
            digest: payload.digest.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::hsm::{ErrorKind, HsmError, Op};

    /// The soft HSM, with signatures that fail on demand and are counted.
    #[derive(Debug)]
    struct Flaky {
        inner: Arc<dyn Hsm>,
        down: AtomicBool,
        signs: AtomicUsize,
    }

    impl Hsm for Flaky {
        fn backend(&self) -> &'static str {
            "flaky"
        }
        fn signing_key(&self, id: &str) -> crate::hsm::Result<Vec<u8>> {
            self.inner.signing_key(id)
        }
        fn sign_digest(&self, id: &str, digest: &[u8; 32]) -> crate::hsm::Result<Vec<u8>> {
            self.signs.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                // A TPM that does not answer takes a while to say so.
                std::thread::sleep(Duration::from_millis(20));
                return Err(HsmError::new(
                    "flaky",
                    Op::Sign,
                    Some(id),
                    ErrorKind::Unavailable("device gone".into()),
                ));
            }
            self.inner.sign_digest(id, digest)
        }
    }

    fn service(dir: &std::path::Path, hsm: Arc<dyn Hsm>, rotation: u64) -> TokenService {
        TokenService::open(
            "td",
            hsm,
            "dev",
            Duration::from_secs(300),
            Duration::from_secs(rotation),
            dir,
        )
        .unwrap()
    }

    const SUB: &str = "spiffe://td/device/d/module/m";

    /// A key past its retirement may still sign (until the background task
    /// replaces it), so its published validity must cover those tokens.
    #[test]
    fn tokens_never_outlive_their_published_key() {
        let dir = tempfile::tempdir().unwrap();
        let hsm = crate::hsm::open(&Default::default(), dir.path()).unwrap();
        let svc = service(dir.path(), hsm, 1);
        let mut kids = Vec::new();
        for _ in 0..2 {
            let t = svc.issue(SUB, &["a".into()], 300, "sha256:x").unwrap();
            let claims = svc.validate(&t, "a").unwrap();
            let header: Header = serde_json::from_slice(
                &Base64UrlUnpadded::decode_vec(t.split('.').next().unwrap()).unwrap(),
            )
            .unwrap();
            let kid = header.kid.unwrap();
            kids.push(kid.clone());
            let key = svc.published().into_iter().find(|k| k.kid == kid).unwrap();
            assert!(
                claims.expires_at <= key.valid_until,
                "token expires at {} but its key is published until {}",
                claims.expires_at,
                key.valid_until
            );
            std::thread::sleep(Duration::from_millis(2100));
        }
        // Past its retirement the key still signed: no HSM signature on the
        // token path while the background rotation has not run.
        assert_eq!(kids[0], kids[1]);
    }

    /// With the HSM down, token requests that need a new working key make
    /// one HSM attempt between them, not one each, and fail fast.
    #[test]
    fn hsm_down_rotation_is_single_flight_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky {
            inner: crate::hsm::open(&Default::default(), dir.path()).unwrap(),
            down: AtomicBool::new(true),
            signs: AtomicUsize::new(0),
        });
        let svc = Arc::new(service(dir.path(), flaky.clone(), 3600));
        let started = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let svc = svc.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|_| svc.issue(SUB, &["a".into()], 60, "sha256:x"))
                        .filter(|r| matches!(r, Err(IdentityError::Unavailable(_))))
                        .count()
                })
            })
            .collect();
        let refused: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let elapsed = started.elapsed();
        assert_eq!(refused, 200, "every request is refused as unavailable");
        let attempts = flaky.signs.load(Ordering::SeqCst);
        // One attempt, plus one per backoff period that expired meanwhile.
        let allowed = 1 + (elapsed.as_millis() / INLINE_RETRY_MIN.as_millis()) as usize;
        assert!(
            attempts <= allowed,
            "{attempts} HSM attempts for 200 token requests in {elapsed:?}"
        );
        // The HSM is back: after the backoff the next request rotates.
        flaky.down.store(false, Ordering::SeqCst);
        std::thread::sleep(INLINE_RETRY_MIN * 2 + Duration::from_millis(100));
        let t = svc.issue(SUB, &["a".into()], 60, "sha256:x").unwrap();
        assert!(svc.validate(&t, "a").is_ok());
    }

    /// A published key is trusted only if the JWT authority key certified
    /// it for that `kid`; its validity is the certificate's.
    #[test]
    fn only_the_jwt_authority_certifies_working_keys() {
        let dir = tempfile::tempdir().unwrap();
        let hsm = crate::hsm::open(&Default::default(), dir.path()).unwrap();
        let svc = service(dir.path(), hsm.clone(), 3600);
        svc.issue(SUB, &["a".into()], 60, "sha256:x").unwrap();
        let good = svc.published().pop().unwrap();
        assert!(svc.certified(&good).is_some());
        // A later valid_until than the certificate's notAfter is cut to it.
        let longer = PublishedKey {
            valid_until: good.valid_until + 1_000_000,
            ..good.clone()
        };
        assert_eq!(
            svc.certified(&longer).unwrap().valid_until,
            good.valid_until
        );
        // The same certificate under another kid: refused.
        let other = HostKey::generate(SignatureEncoding::Fixed).unwrap();
        let renamed = PublishedKey {
            kid: kid_of(other.point()),
            public_key: Base64::encode_string(other.point()),
            ..good.clone()
        };
        assert!(svc.certified(&renamed).is_none());
        // A working key certified by another HSM key (the device CA, say):
        // refused.
        let ca =
            super::super::Authority::open(hsm, "dev", "edgeward.local", None, dir.path()).unwrap();
        let leaf = ca
            .issue_leaf(&super::super::Profile::Svid, SUB, Duration::from_secs(600))
            .unwrap();
        let injected = PublishedKey {
            kid: kid_of(leaf.key.point()),
            public_key: Base64::encode_string(leaf.key.point()),
            certificate: Base64::encode_string(&leaf.cert.der),
            valid_until: unix_now() + 600,
        };
        assert!(svc.certified(&injected).is_none());
    }
}
