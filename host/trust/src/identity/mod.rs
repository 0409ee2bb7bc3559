//! Workload identity: who each module is, and credentials that prove it,
//! rooted in the device CA key in the HSM.
//!
//! - SPIFFE ID: `spiffe://<trust-domain>/device/<device-id>/module/<name>`.
//! - X509-SVIDs: a P-256 leaf key generated on the host per module, certified
//!   by the device CA (HSM) for [`IdentityConfig::svid_ttl`] and re-issued
//!   past half its lifetime (with jitter).
//! - JWT-SVIDs: ES256, signed by an in-memory working key that rotates and
//!   that the HSM's `jwt-authority` key (used for nothing else) certifies
//!   ([`jwt`]).
//! - Server certificates: only for the names the registration allows
//!   ([`names`]).
//! - Data sealing: AES-256-GCM under the module's data key, which the HSM's
//!   master key wraps under the module's name and generation ([`registration`]; the
//!   daemon keeps the wrapped key in its registry).

pub mod authority;
mod config;
mod handle;
pub mod hostkey;
pub mod jwt;
mod module;
pub mod names;
pub mod registration;
mod sealing;
mod server;
mod service;

pub use authority::{Authority, LeafKey, Profile};
pub use config::{
    DEFAULT_JWT_KEY_ROTATION, DEFAULT_MAX_TOKEN_TTL, DEFAULT_SVID_TTL, DEFAULT_TRUST_DOMAIN,
    IdentityConfig, default_device_id, valid_path_segment, valid_trust_domain,
};
pub use handle::IdentityHandle;
pub use jwt::{Claims, PublishedKey, TokenService};
pub use module::{Credentials, ModuleIdentity, WhoAmI, sign_with};
pub use names::{ServerName, ServerNamePolicy, ServerNames};
pub use service::IdentityService;

use std::time::Duration;

use crate::hsm::{ErrorKind, HsmError};

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
pub const CIPHERTEXT_VERSION: u8 = crate::hsm::aead::VERSION;

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
    /// The module's registration does not allow this.
    #[error("not permitted: {0}")]
    NotPermitted(String),
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

fn invalid(m: impl Into<String>) -> IdentityError {
    IdentityError::InvalidArgument(m.into())
}

/// Refuses an argument of `len` bytes above `max`, naming it.
pub fn check_size(what: &str, len: usize, max: usize) -> Result<(), IdentityError> {
    if len > max {
        return Err(invalid(format!("{what}: {len} bytes; the limit is {max}")));
    }
    Ok(())
}
