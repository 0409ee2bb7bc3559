//! edgeward's hardware HSM backends: TPM 2.0 through tss-esapi (Debian's
//! libtss2, which pulls in libcrypto) and PKCS#11 through cryptoki (the
//! token's module, loaded at run time). The key daemon is the only process
//! that links this crate: the runtime, which runs module code, never has
//! the TPM stack or a PKCS#11 module in its address space (see
//! `edgeward_hsm::open`).

use std::path::Path;
use std::sync::Arc;

use edgeward_hsm::{Hsm, HsmConfig, Result};

#[cfg(feature = "pkcs11")]
pub mod pkcs11;
#[cfg(feature = "tpm")]
pub mod tpm;

/// The backends this build includes.
pub const BACKENDS: &[&str] = &[
    "soft",
    #[cfg(feature = "tpm")]
    "tpm",
    #[cfg(feature = "pkcs11")]
    "pkcs11",
];

/// Opens the configured backend with its files under `state_dir`.
///
/// # Errors
///
/// The backend's open error, naming the backend and what is unavailable;
/// a backend this build leaves out.
pub fn open(config: &HsmConfig, state_dir: &Path) -> Result<Arc<dyn Hsm>> {
    Ok(match config {
        #[cfg(feature = "tpm")]
        HsmConfig::Tpm(c) => Arc::new(tpm::TpmHsm::open(state_dir, c.clone())?),
        #[cfg(feature = "pkcs11")]
        HsmConfig::Pkcs11(c) => Arc::new(pkcs11::Pkcs11Hsm::open(c.clone())?),
        other => return edgeward_hsm::open(other, state_dir),
    })
}
