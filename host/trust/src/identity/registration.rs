//! A module's registration as its identity sees it: the generation id and
//! the data key its sealed data is bound to. Where registrations are kept
//! (the registry, with the data key wrapped by the HSM) is the daemon's
//! business; an ephemeral one lives as long as the process.

use zeroize::Zeroizing;

use super::{IdentityError, unix_now};

/// A module's registration.
#[derive(Debug)]
pub struct Registration {
    /// Its generation id (32 hex digits).
    pub generation_id: String,
    /// When it was registered (unix seconds).
    pub registered_at: u64,
    /// The module's AES-256-GCM data key.
    pub data_key: Zeroizing<[u8; 32]>,
}

/// A registration that lives only in memory (for `edgeward run`): a new
/// generation and data key every time.
///
/// # Errors
///
/// Random source failures.
pub fn ephemeral() -> Result<Registration, IdentityError> {
    let mut gen_bytes = [0u8; 16];
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut gen_bytes)
        .and_then(|()| getrandom::fill(key.as_mut()))
        .map_err(|e| IdentityError::Internal(format!("random: {e}")))?;
    Ok(Registration {
        generation_id: crate::measure::hex(&gen_bytes),
        registered_at: unix_now(),
        data_key: key,
    })
}
