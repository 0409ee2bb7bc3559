//! JWT-SVIDs: JWS compact, ES256 only, signed by an in-memory working key
//! that the device CA certifies and that rotates. The TPM (or any slow HSM)
//! signs one certificate per rotation and is never on the token path.
//!
//! Working keys are published (public point, certificate) in
//! `state_dir/identity/jwt-keys.json`, so `edgeward bundle` and other
//! edgeward processes on the device can verify tokens. A published key is
//! only trusted if its certificate verifies under the device CA key.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64ct::{Base64, Base64UrlUnpadded, Encoding as _};
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::authority::{Authority, Profile, certificate_point, signed_by};
use super::{IdentityError, unix_now};
use crate::state;

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
    key: p256::ecdsa::SigningKey,
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

/// Issues and validates JWT-SVIDs for one trust domain.
pub struct TokenService {
    trust_domain: String,
    authority: Arc<Authority>,
    max_ttl: Duration,
    rotation: Duration,
    current: RwLock<Option<Arc<WorkingKey>>>,
    known: RwLock<HashMap<String, PublishedKey>>,
    keys_file: PathBuf,
    last_reload: Mutex<Option<Instant>>,
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
    /// Starts the service and loads the published keys. The first working
    /// key is made by [`TokenService::rotate`] (the daemon does so at start)
    /// or by the first token request.
    ///
    /// # Errors
    ///
    /// None today; kept fallible for storage checks.
    pub fn open(
        trust_domain: &str,
        authority: Arc<Authority>,
        max_ttl: Duration,
        rotation: Duration,
        state_dir: &std::path::Path,
    ) -> Result<Self, IdentityError> {
        let keys_file = state_dir.join("identity").join("jwt-keys.json");
        let svc = Self {
            trust_domain: trust_domain.to_owned(),
            authority,
            max_ttl,
            rotation,
            current: RwLock::new(None),
            known: RwLock::new(HashMap::new()),
            keys_file,
            last_reload: Mutex::new(None),
        };
        // Published keys are read (and their certificates checked) when
        // first needed, not on every start.
        Ok(svc)
    }

    fn new_working_key(
        authority: &Authority,
        rotation: Duration,
        max_ttl: Duration,
    ) -> Result<(WorkingKey, PublishedKey), IdentityError> {
        let (key, point) = super::authority::host_key()?;
        let kid = kid_of(&point);
        let retire_at = unix_now() + rotation.as_secs();
        // A key signs until the background task replaces it (up to one check
        // period after `retire_at`, or until the inline fallback at half a
        // maximum TTL later); its tokens must stay verifiable for their whole
        // life after that.
        let slack = max_ttl.as_secs() / 2 + rotation_check_period(rotation).as_secs() + 1;
        let valid_until = retire_at + slack + max_ttl.as_secs();
        let cert = authority.issue(
            &Profile::JwtSigner { kid: kid.clone() },
            "",
            &format!("edgeward jwt-svid signer {kid}"),
            &point,
            Duration::from_secs(valid_until.saturating_sub(unix_now())),
        )?;
        let published = PublishedKey {
            kid: kid.clone(),
            public_key: Base64::encode_string(&point),
            certificate: Base64::encode_string(&cert.der),
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

    /// Verifies a published key against the device CA.
    fn certified(&self, k: &PublishedKey) -> bool {
        let (Some(point), Ok(cert)) = (k.point(), Base64::decode_vec(&k.certificate)) else {
            return false;
        };
        kid_of(&point) == k.kid
            && certificate_point(&cert).as_deref() == Some(point.as_slice())
            && signed_by(&cert, self.authority.public_key())
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

    /// Merges the file's certified, unexpired keys into the known set.
    fn reload(&self) {
        let now = unix_now();
        let loaded: Vec<PublishedKey> = self
            .read_file()
            .into_iter()
            .filter(|k| k.valid_until > now)
            .filter(|k| {
                let ok = self.certified(k);
                if !ok {
                    tracing::warn!(kid = %k.kid, "published JWT key is not certified by the device CA; ignored");
                }
                ok
            })
            .collect();
        if let Ok(mut known) = self.known.write() {
            known.retain(|_, k| k.valid_until > now);
            for k in loaded {
                known.insert(k.kid.clone(), k);
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
            known.insert(key.kid.clone(), key);
            let mut v: Vec<_> = known.values().cloned().collect();
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
    /// one signature; call from a blocking context.
    ///
    /// # Errors
    ///
    /// HSM or storage failures; the current key stays in use.
    pub fn rotate(&self, force: bool) -> Result<bool, IdentityError> {
        let due = self
            .current
            .read()
            .map(|k| k.as_ref().is_some_and(|k| unix_now() >= k.retire_at))
            .unwrap_or(true);
        if !(due || force) {
            return Ok(false);
        }
        let (key, published) = Self::new_working_key(&self.authority, self.rotation, self.max_ttl)?;
        self.publish(published)?;
        let kid = key.kid.clone();
        if let Ok(mut cur) = self.current.write() {
            *cur = Some(Arc::new(key));
        }
        tracing::info!(kid = %kid, "JWT-SVID working key rotated");
        Ok(true)
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
                    .cloned()
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
        let now = unix_now();
        matches!(self.current_key(), Ok(Some(k))
            if now < k.retire_at + self.max_ttl.as_secs() / 2 && now + ttl <= k.valid_until)
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
            Some(k)
                if now < k.retire_at + self.max_ttl.as_secs() / 2 && now + ttl <= k.valid_until =>
            {
                k
            }
            _ => {
                self.rotate(true)?;
                self.current_key()?.ok_or_else(|| {
                    IdentityError::Internal("no working key after rotation".into())
                })?
            }
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
        let sig: p256::ecdsa::Signature = key.key.sign(out.as_bytes());
        out.push('.');
        out.push_str(&Base64UrlUnpadded::encode_string(&sig.to_bytes()));
        Ok(out)
    }

    fn current_key(&self) -> Result<Option<Arc<WorkingKey>>, IdentityError> {
        self.current
            .read()
            .map(|k| k.clone())
            .map_err(|_| IdentityError::Internal("working key lock poisoned".into()))
    }

    fn key_for(&self, kid: &str) -> Option<PublishedKey> {
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
        let point = key
            .point()
            .ok_or_else(|| invalid("token: unusable signing key"))?;
        let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
            .map_err(|_| invalid("token: unusable signing key"))?;
        let sig = Base64UrlUnpadded::decode_vec(s64)
            .ok()
            .and_then(|b| p256::ecdsa::Signature::from_slice(&b).ok())
            .ok_or_else(|| invalid("token: malformed signature"))?;
        let signed = &token[..h64.len() + 1 + p64.len()];
        vk.verify(signed.as_bytes(), &sig)
            .map_err(|_| invalid("token: signature does not verify"))?;
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
    use super::*;

    /// A key past its retirement may still sign (until the background task
    /// replaces it), so its published validity must cover those tokens.
    #[test]
    fn tokens_never_outlive_their_published_key() {
        let dir = tempfile::tempdir().unwrap();
        let hsm = crate::hsm::open(&Default::default(), dir.path()).unwrap();
        let authority = Arc::new(Authority::open(hsm, "dev", None, dir.path()).unwrap());
        let svc = TokenService::open(
            "td",
            authority,
            Duration::from_secs(300),
            Duration::from_secs(1),
            dir.path(),
        )
        .unwrap();
        let mut kids = Vec::new();
        for _ in 0..2 {
            let t = svc
                .issue(
                    "spiffe://td/device/d/module/m",
                    &["a".into()],
                    300,
                    "sha256:x",
                )
                .unwrap();
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
}
