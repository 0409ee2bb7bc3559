//! The `pkcs11` backend's settings. The backend itself (cryptoki) is in
//! `edgeward-hsm-hw`, which only the key daemon links.

use std::path::PathBuf;

/// The `pkcs11` backend's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// A file holding the user PIN (never the command line).
    pub pin_file: PathBuf,
}
