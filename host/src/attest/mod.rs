//! Measured bootstrap and the measurement log: what the daemon runs,
//! extended into the HSM's measurement register (a TPM PCR software cannot
//! reset, or the soft backend's per-boot register) and recorded in an
//! event log a verifier replays ([`eventlog`]).
//!
//! Before any module runs, the daemon measures, in order: its own
//! executable (the bytes of the running binary), its effective
//! configuration (RFC 8785 canonical JSON, [`jcs`]), then every module it
//! loads (name, generation, digest). Later events: a deployment applied,
//! a registration added or removed.

pub mod binding;
pub mod certify;
pub mod credential;
pub mod publisher;
pub mod verify;

// The log, its encoding and the evidence live in the trust core.
pub use edgeward_trust::attest::{eventlog, evidence, jcs, wire};

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::hsm::Hsm;
use eventlog::EventLog;

pub use crate::hsm::{BOOT_ID_ENV, BOOT_ID_FILE, boot_id};

/// The register `hsm` measures into: the TPM's configured PCR, the soft
/// backend's register (0); none on PKCS#11, which has no register.
pub fn register_of(hsm: &crate::hsm::HsmConfig) -> Option<u32> {
    match hsm {
        crate::hsm::HsmConfig::Soft => Some(0),
        crate::hsm::HsmConfig::Tpm(c) => Some(u32::from(c.pcr)),
        crate::hsm::HsmConfig::Pkcs11(_) => None,
    }
}

/// The daemon's measurer: the log of this boot and the HSM it extends, or
/// the key daemon, which keeps both (`EDGEWARD_KEYD`).
#[derive(Debug, Clone)]
pub struct Measurer {
    log: Arc<EventLog>,
    hsm: Arc<dyn Hsm>,
    boot_id: String,
    keyd: Option<Arc<crate::keyd::RemoteHsm>>,
}

impl Measurer {
    /// Measures into `hsm`'s register, logging under `state_dir` for this
    /// boot.
    ///
    /// # Errors
    ///
    /// The boot id cannot be read.
    pub fn new(hsm: Arc<dyn Hsm>, state_dir: &Path, pcr: u32) -> Result<Self, String> {
        let boot_id = boot_id()?;
        let keyd = crate::keyd::socket()
            .map(|s| crate::keyd::RemoteHsm::connect(&s).map(Arc::new))
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            log: Arc::new(EventLog::new(state_dir, &boot_id, pcr)),
            hsm,
            boot_id,
            keyd,
        })
    }

    /// The log this process writes; `None` when the key daemon keeps it.
    pub fn log(&self) -> Option<&EventLog> {
        self.keyd.is_none().then_some(self.log.as_ref())
    }

    /// The HSM it extends (and that quotes).
    pub fn hsm(&self) -> &dyn Hsm {
        self.hsm.as_ref()
    }

    /// Evidence over `nonce` (or a credential's secret), for `device`
    /// (blocking). See [`evidence::gather`].
    ///
    /// # Errors
    ///
    /// See [`evidence::gather`].
    pub fn attest(
        &self,
        device: &str,
        nonce: &[u8],
        credential: Option<&evidence::CredentialFile>,
        from: u64,
    ) -> Result<evidence::Files, String> {
        if let Some(k) = &self.keyd {
            // The key daemon names the device and the boot itself.
            let _ = device;
            let files = k
                .evidence(
                    nonce,
                    credential.map(|c| (c.id_object.as_slice(), c.secret.as_slice())),
                    from,
                )
                .map_err(|e| e.to_string())?;
            return files
                .into_iter()
                .map(|(name, data)| {
                    evidence::FILES
                        .iter()
                        .find(|f| **f == name)
                        .map(|f| (*f, data))
                        .ok_or_else(|| format!("the key daemon sent an unknown file {name:?}"))
                })
                .collect();
        }
        evidence::gather(
            self.hsm.as_ref(),
            &self.log,
            &evidence::Device {
                id: device,
                boot_id: &self.boot_id,
            },
            nonce,
            credential,
            from,
        )
    }

    /// Measures `content` (blocking: call from the blocking pool in async
    /// code).
    ///
    /// # Errors
    ///
    /// See [`EventLog::measure`].
    pub fn measure(&self, content: Value) -> Result<(), String> {
        self.measure_all(vec![content])
    }

    /// Measures `contents` in order, appended and synced together
    /// (blocking).
    ///
    /// # Errors
    ///
    /// See [`EventLog::measure_all`].
    pub fn measure_all(&self, contents: Vec<Value>) -> Result<(), String> {
        if let Some(k) = &self.keyd {
            return k.measure(contents).map_err(|e| e.to_string());
        }
        self.log
            .measure_all(self.hsm.as_ref(), contents)
            .map(|_| ())
    }

    /// [`Measurer::measure`] on the blocking pool; a failure is logged
    /// (the event is then missing from the log and the register, which a
    /// verifier sees).
    pub async fn record(&self, content: Value) {
        let m = self.clone();
        let kind = content["kind"].as_str().unwrap_or("?").to_owned();
        match tokio::task::spawn_blocking(move || m.measure(content)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(event = %kind, error = %e, "measurement failed"),
            Err(e) => tracing::error!(event = %kind, error = %e, "measurement task failed"),
        }
    }
}

/// The running executable's measurement event: the SHA-256 of its bytes.
///
/// # Errors
///
/// It cannot be read.
pub fn executable_event() -> Result<Value, String> {
    let path = std::fs::read_link("/proc/self/exe")
        .map_err(|e| format!("cannot find the running executable: {e}"))?;
    // Read in pieces, as the watchdog does: nothing of it is kept.
    let digest = crate::measure::Digest::of_file(Path::new("/proc/self/exe"))
        .map_err(|e| format!("cannot read the running executable: {e}"))?;
    Ok(json!({
        "kind": "executable",
        "path": path.display().to_string(),
        "version": crate::VERSION,
        "sha256": digest.to_string(),
    }))
}

/// The effective configuration's measurement event: the SHA-256 of its
/// canonical JSON (which the event carries too, so a verifier can read
/// what it attests).
///
/// # Errors
///
/// It cannot be canonicalized.
pub fn config_event(config: &crate::config::Config) -> Result<Value, String> {
    let effective = config.effective();
    let canonical = jcs::canonical(&effective)?;
    Ok(json!({
        "kind": "config",
        "path": config.path.display().to_string(),
        "sha256": crate::measure::Digest::of(canonical.as_bytes()).to_string(),
        "config": effective,
    }))
}

/// The event of native code loaded from the compiled-artifact cache (not
/// compiled by this process): the component's digest and the BLAKE3 of
/// the authenticated entry payload, so code planted in the cache shows in
/// the evidence.
pub fn compiled_code_event(digest: &crate::measure::Digest, entry: &[u8; 32]) -> Value {
    json!({
        "kind": "compiled-code",
        "digest": digest.to_string(),
        "entry": format!("blake3:{}", crate::measure::hex(entry)),
    })
}

/// A module loaded: its name, registration generation and digest.
pub fn module_event(name: &str, generation: &str, digest: &str) -> Value {
    json!({"kind": "module", "name": name, "generation": generation, "digest": digest})
}

/// [`module_event`] for a component whose signature verified with the
/// publisher key `publisher` (hex of its raw encoding).
pub fn signed_module_event(name: &str, generation: &str, digest: &str, publisher: &str) -> Value {
    let mut e = module_event(name, generation, digest);
    e["publisher"] = json!(publisher);
    e
}
