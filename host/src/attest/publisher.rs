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
