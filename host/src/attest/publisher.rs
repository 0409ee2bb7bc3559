//! Publisher signatures in the WebAssembly tool-conventions format that
//! `wasmsign2` 0.2.8 implements: Ed25519 over the component's (or
//! module's) sections, as an embedded `signature` custom section or a
//! detached file, so signatures interoperate with that tooling both ways.
//! Key files use its raw encoding (`0x01` ‖ public key, `0x81` ‖ secret
//! key); PEM, DER and OpenSSH Ed25519 keys are read too.
//!
//! Who may reach it: operators, through `edgeward keygen|sign|verify` and
//! `edgeward run --publisher`. What a hostile publisher or file could try,
//! each refused (tested): an unsigned component, a signature by another
//! key, a component altered after signing, a truncated or garbled
//! signature, a signature file meant for another component.

use std::path::{Path, PathBuf};

pub use wasmsign2::PublicKey;

/// Why a component's signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// No signature at all.
    #[error("it is not signed (no {0}, no --signature, no embedded signature section)")]
    Unsigned(String),
    /// Signed, but by none of the trusted keys, or altered since.
    #[error(
        "its signature does not verify with any trusted publisher key ({0}): signed by another key, or altered after signing"
    )]
    Invalid(String),
    /// A key or signature file that cannot be used.
    #[error("{0}")]
    Unusable(String),
    /// A deployment signed, but not for this device, expired, or replayed.
    #[error("{0}")]
    Unbound(String),
}

/// Reads trusted publisher keys (raw, PEM, DER or OpenSSH).
///
/// # Errors
///
/// A file that is not an Ed25519 public key, naming it.
pub fn load_publishers(paths: &[PathBuf]) -> Result<Vec<PublicKey>, SignatureError> {
    paths
        .iter()
        .map(|p| {
            PublicKey::from_any_file(p).map_err(|e| {
                SignatureError::Unusable(format!("{}: not an Ed25519 public key: {e}", p.display()))
            })
        })
        .collect()
}

/// The detached signature to use for `file`: `FILE.sig` beside it, else
/// `explicit`; `None`: look for an embedded one.
///
/// # Errors
///
/// The file exists but cannot be read.
pub fn detached_for(
    file: &Path,
    explicit: Option<&Path>,
) -> Result<Option<Vec<u8>>, SignatureError> {
    let beside = sig_path(file);
    let chosen = if beside.exists() {
        Some(beside)
    } else {
        explicit.map(Path::to_owned)
    };
    chosen
        .map(|p| {
            std::fs::read(&p).map_err(|e| SignatureError::Unusable(format!("{}: {e}", p.display())))
        })
        .transpose()
}

/// `FILE.sig`.
pub fn sig_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Verifies `bytes` (the component as measured) against `publishers`,
/// with `detached` or its embedded signature; returns the key that
/// verified it (hex of its raw encoding).
///
/// # Errors
///
/// [`SignatureError`] naming why.
pub fn verify(
    bytes: &[u8],
    detached: Option<&[u8]>,
    publishers: &[PublicKey],
    file: &Path,
) -> Result<String, SignatureError> {
    let embedded = has_embedded_signature(bytes);
    if detached.is_none() && !embedded {
        return Err(SignatureError::Unsigned(
            sig_path(file).display().to_string(),
        ));
    }
    for pk in publishers {
        if pk
            .verify(&mut std::io::Cursor::new(bytes), detached)
            .is_ok()
        {
            return Ok(crate::measure::hex(&pk.to_bytes()));
        }
    }
    Err(SignatureError::Invalid(format!(
        "{} key{}",
        publishers.len(),
        if publishers.len() == 1 { "" } else { "s" }
    )))
}

/// Whether the component's first section is a signature header.
fn has_embedded_signature(bytes: &[u8]) -> bool {
    let mut reader = std::io::Cursor::new(bytes);
    let Ok(stream) = wasmsign2::Module::init_from_reader(&mut reader) else {
        return false;
    };
    let Ok(mut sections) = wasmsign2::Module::iterate(stream) else {
        return false;
    };
    matches!(
        sections.next(),
        Some(Ok(wasmsign2::Section::Custom(c))) if c.is_signature_header()
    )
}

/// Writes a new key pair: `PREFIX.key` (0600) and `PREFIX.pub`, in the raw
/// encoding. Returns their paths.
///
/// # Errors
///
/// A file exists already, or cannot be written.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (key, public) = (suffixed(prefix, ".key"), suffixed(prefix, ".pub"));
    for p in [&key, &public] {
        if p.exists() {
            return Err(format!("{} exists: not replacing a key", p.display()));
        }
    }
    let kp = wasmsign2::KeyPair::generate();
    let secret = zeroize::Zeroizing::new(kp.sk.to_bytes());
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .and_then(|mut f| f.write_all(&secret).and_then(|()| f.sync_all()))
        .map_err(|e| format!("{}: {e}", key.display()))?;
    std::fs::write(&public, kp.pk.to_bytes()).map_err(|e| format!("{}: {e}", public.display()))?;
    Ok((key, public))
}

fn suffixed(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Signs the component `file` with the secret key in `key_file`: a
/// detached signature written to `out` (default `FILE.sig`), or with
/// `embed` a signed copy written to `out` (required). Returns what was
/// written.
///
/// # Errors
///
/// The key or component cannot be read, or the output written.
pub fn sign(
    key_file: &Path,
    file: &Path,
    out: Option<&Path>,
    embed: bool,
) -> Result<PathBuf, String> {
    let sk = wasmsign2::SecretKey::from_any_file(key_file)
        .map_err(|e| format!("{}: not an Ed25519 secret key: {e}", key_file.display()))?;
    let module = wasmsign2::Module::deserialize_from_file(file).map_err(|e| {
        format!(
            "{}: not a WebAssembly component or module: {e}",
            file.display()
        )
    })?;
    if embed {
        let out = out.ok_or("--embed writes a signed copy: name it with --out")?;
        let (signed, _) = sk
            .sign_multi(module, None, false, false)
            .map_err(|e| format!("cannot sign {}: {e}", file.display()))?;
        signed
            .serialize_to_file(out)
            .map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(out.to_owned())
    } else {
        let (_, detached) = sk
            .sign_multi(module, None, true, false)
            .map_err(|e| format!("cannot sign {}: {e}", file.display()))?;
        let out = out.map_or_else(|| sig_path(file), Path::to_owned);
        std::fs::write(&out, detached).map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(out)
    }
}

/// How strictly signatures are asked for, weakest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Policy {
    /// Not checked (a signature that verifies is still recorded).
    #[default]
    Off,
    /// Checked; a missing or bad signature is logged and the module runs.
    Warn,
    /// Checked; a missing or bad signature refuses the module (manifest).
    Require,
}

impl Policy {
    /// As written.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Warn => "warn",
            Self::Require => "require",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "warn" => Ok(Self::Warn),
            "require" => Ok(Self::Require),
            other => Err(format!(
                "invalid signature policy {other:?}: expected require, warn or off"
            )),
        }
    }
}

/// The device's `[signatures]`: the floor every module and manifest is
/// held to, and the publishers it trusts.
#[derive(Debug, Clone, Default)]
pub struct DeviceSignatures {
    /// For components.
    pub policy: Policy,
    /// For deployment manifests (default: `require` when deployment keys
    /// are named, else `off`).
    pub manifests: Policy,
    /// Trusted publisher keys: components.
    pub publishers: Vec<PublicKey>,
    /// Trusted deployment keys: manifests deployed through the API (the
    /// CLI, the agent). A separate set from the publishers.
    pub deployment_keys: Vec<PublicKey>,
}

/// What one module asks of its component's signature (its spec's
/// `signature_policy`, `publishers`, `signature`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signing {
    /// Its policy (the stricter of this and the device's applies).
    pub policy: Option<Policy>,
    /// Keys (hex of their raw encoding) that may sign it; each must be
    /// one of the device's when the device names any.
    pub publishers: Vec<String>,
    /// A detached signature handed in with the spec (API, manifests).
    pub detached: Option<Vec<u8>>,
}

/// A key from the hex of its raw encoding (`0x01` ‖ 32 bytes).
///
/// # Errors
///
/// Not such hex.
pub fn key_from_hex(hex: &str) -> Result<PublicKey, String> {
    let bytes = super::eventlog::hex_decode(hex)
        .filter(|b| b.len() == 33 && b[0] == 0x01)
        .ok_or_else(|| {
            format!(
                "{hex:?} is not a publisher key: the hex of its raw encoding (01 then 32 bytes)"
            )
        })?;
    PublicKey::from_bytes(&bytes).map_err(|e| format!("{hex:?}: {e}"))
}

/// Checks a component's signature against the device's floor and the
/// module's own asks. Returns the verifying key (hex), if one did.
///
/// # Errors
///
/// Under `require`: unsigned, signed by a key not trusted, altered after
/// signing, or a publisher the device does not trust; named. Under `warn`
/// these are logged and `Ok(None)` returned.
pub fn check_component(
    device: &DeviceSignatures,
    signing: &Signing,
    bytes: &[u8],
    file: Option<&Path>,
    module: &str,
) -> Result<Option<String>, SignatureError> {
    let policy = device.policy.max(signing.policy.unwrap_or_default());
    let device_keys: Vec<String> = device
        .publishers
        .iter()
        .map(|k| crate::measure::hex(&k.to_bytes()))
        .collect();
    let keys = if signing.publishers.is_empty() {
        device.publishers.clone()
    } else {
        let mut keys = Vec::new();
        for hex in &signing.publishers {
            if !device_keys.is_empty() && !device_keys.contains(&hex.to_ascii_lowercase()) {
                return Err(SignatureError::Unusable(format!(
                    "publisher {hex} is not one of the device's trusted publishers ([signatures] publishers)"
                )));
            }
            keys.push(key_from_hex(hex).map_err(SignatureError::Unusable)?);
        }
        keys
    };
    let shown = file.map_or_else(|| PathBuf::from(module), Path::to_owned);
    let detached = match (&signing.detached, file) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(f)) => detached_for(f, None)?,
        (None, None) => None,
    };
    if keys.is_empty() {
        return match policy {
            Policy::Off => Ok(None),
            _ => Err(SignatureError::Unusable(
                "signatures are required but no publisher key is trusted: set [signatures] publishers or the module's publishers".into(),
            )),
        }
        .or_else(|e| warn_or(policy, module, e));
    }
    match verify(bytes, detached.as_deref(), &keys, &shown) {
        Ok(key) => Ok(Some(key)),
        Err(_) if policy == Policy::Off => Ok(None),
        Err(e) => warn_or(policy, module, e),
    }
}

fn warn_or(
    policy: Policy,
    module: &str,
    e: SignatureError,
) -> Result<Option<String>, SignatureError> {
    if policy == Policy::Warn {
        tracing::warn!(module, reason = %e, "signature not verified (policy warn): running it");
        Ok(None)
    } else {
        Err(e)
    }
}

/// Signs a deployment manifest: Ed25519 over
/// [`DEPLOYMENT_DOMAIN`](super::binding::DEPLOYMENT_DOMAIN) followed by the
/// SHA-256 of its bytes, written raw (64 bytes) to `out` (default
/// `MANIFEST.sig`). The manifest must name its `target` and `expires`,
/// which the signature then covers.
///
/// # Errors
///
/// The key or manifest cannot be read, the manifest names no well-formed
/// target or expiry, or the signature cannot be written.
pub fn sign_manifest(key_file: &Path, file: &Path, out: Option<&Path>) -> Result<PathBuf, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let text = String::from_utf8(bytes.clone())
        .map_err(|_| format!("{}: a manifest is UTF-8 text", file.display()))?;
    bound_manifest(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let sig = sign_manifest_bytes(key_file, &bytes)?;
    let out = out.map_or_else(|| sig_path(file), Path::to_owned);
    std::fs::write(&out, sig).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(out)
}

/// The signature of [`sign_manifest`] over `bytes` (64 bytes).
///
/// # Errors
///
/// The key cannot be read.
pub fn sign_manifest_bytes(key_file: &Path, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let sk = wasmsign2::SecretKey::from_any_file(key_file)
        .map_err(|e| format!("{}: not an Ed25519 secret key: {e}", key_file.display()))?;
    Ok(sk.sk.sign(deployment_message(bytes), None).to_vec())
}

/// The public half of the secret key in `key_file`.
///
/// # Errors
///
/// The key cannot be read.
pub fn public_of(key_file: &Path) -> Result<PublicKey, String> {
    let sk = wasmsign2::SecretKey::from_any_file(key_file)
        .map_err(|e| format!("{}: not an Ed25519 secret key: {e}", key_file.display()))?;
    let mut raw = vec![1];
    raw.extend_from_slice(sk.sk.public_key().as_ref());
    PublicKey::from_bytes(&raw).map_err(|e| format!("{}: {e}", key_file.display()))
}

/// What a deployment key signs for a manifest's `bytes`.
fn deployment_message(bytes: &[u8]) -> Vec<u8> {
    let mut m = super::binding::DEPLOYMENT_DOMAIN.to_vec();
    m.extend_from_slice(crate::measure::Digest::of(bytes).as_bytes());
    m
}

/// Checks that manifest `text` names a well-formed target and expiry, as
/// every signed deployment must.
///
/// # Errors
///
/// Not a manifest, or no (or a malformed) `target` or `expires`; named.
pub fn bound_manifest(text: &str) -> Result<(), String> {
    let d = crate::api::SignedManifest {
        manifest: text.to_owned(),
        signature: None,
    }
    .deployment()?;
    let target = d.target.as_deref().ok_or(
        "the manifest names no `target` (device:<id>, group:<name> or fleet): a signature covers for whom a deployment is",
    )?;
    target.parse::<super::binding::Target>()?;
    let expires = d.expires.as_deref().ok_or(
        "the manifest names no `expires` (RFC 3339 UTC, e.g. 2027-01-31T00:00:00Z): a signature covers until when a deployment may be applied",
    )?;
    super::binding::parse_utc(expires).ok_or_else(|| {
        format!("expires {expires:?}: expected RFC 3339 UTC, e.g. 2027-01-31T00:00:00Z")
    })?;
    Ok(())
}

/// Verifies a manifest's signature ([`sign_manifest`]) against `keys`;
/// returns the key (hex) that verified it.
///
/// # Errors
///
/// Unsigned, malformed, or by none of the keys; named.
pub fn verify_manifest(
    bytes: &[u8],
    signature: Option<&[u8]>,
    keys: &[PublicKey],
) -> Result<String, SignatureError> {
    let sig = signature.ok_or_else(|| {
        SignatureError::Unsigned(
            "no signature came with the manifest (MANIFEST.sig, --signature)".into(),
        )
    })?;
    let sig = ed25519_compact::Signature::from_slice(sig).map_err(|_| {
        SignatureError::Unusable(format!(
            "the manifest's signature is {} bytes, not a 64-byte Ed25519 signature",
            sig.len()
        ))
    })?;
    let message = deployment_message(bytes);
    keys.iter()
        .find(|k| k.pk.verify(&message, &sig).is_ok())
        .map(|k| crate::measure::hex(&k.to_bytes()))
        .ok_or_else(|| {
            SignatureError::Invalid(format!(
                "{} key{}",
                keys.len(),
                if keys.len() == 1 { "" } else { "s" }
            ))
        })
}

/// Whether `bytes` are WebAssembly (a component or module), not a
/// manifest.
pub fn is_wasm(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\0asm")
}
