//! Module registrations: a generation id per registered name, and the
//! module's data key wrapped by the HSM's master AEAD key under that name and
//! generation, kept in the [`Registry`]. Deregistering deletes the record, so data sealed by the old
//! registration can never be opened again (crypto-shredding), even by a
//! module registered later under the same name.

use base64ct::{Base64, Encoding as _};
use zeroize::Zeroizing;

use super::{IdentityError, unix_now};
use crate::hsm::Hsm;
use crate::registry::{Registry, StoredRegistration};

/// The HSM AEAD key that wraps every module's data key.
pub const MASTER_KEY: &str = "master-encryption";

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

fn wrap_aad(name: &str, generation: &str) -> Vec<u8> {
    let mut a = b"edgeward module data key v1\0".to_vec();
    a.extend_from_slice(name.as_bytes());
    a.push(0);
    a.extend_from_slice(generation.as_bytes());
    a
}

fn new_registration(
    hsm: &dyn Hsm,
    name: &str,
) -> Result<(Registration, StoredRegistration), IdentityError> {
    let reg = ephemeral()?;
    hsm.aead_key(MASTER_KEY)?;
    let wrapped = hsm.encrypt(
        MASTER_KEY,
        reg.data_key.as_ref(),
        &wrap_aad(name, &reg.generation_id),
    )?;
    let record = StoredRegistration {
        generation_id: reg.generation_id.clone(),
        registered_at: reg.registered_at,
        wrapped_key: Base64::encode_string(&wrapped),
    };
    Ok((reg, record))
}

/// Loads the registration of `name`, creating it (new generation, new data
/// key) when there is none.
///
/// # Errors
///
/// HSM errors, and a record that exists but cannot be read or unwrapped
/// (tampered, or from another HSM): it is never silently replaced, since
/// that would orphan the module's data.
pub fn load_or_register(
    hsm: &dyn Hsm,
    registry: &Registry,
    name: &str,
) -> Result<Registration, IdentityError> {
    let storage = |e: crate::registry::RegistryError| IdentityError::Storage(e.to_string());
    let rec = match registry.registration(name).map_err(storage)? {
        Some(rec) => rec,
        None => {
            let (reg, rec) = new_registration(hsm, name)?;
            let stored = registry.register(name, &rec).map_err(storage)?;
            if stored == rec {
                tracing::info!(module = name, generation = %reg.generation_id, "module registered");
                return Ok(reg);
            }
            stored
        }
    };
    let bad = |what: String| {
        IdentityError::Storage(format!(
            "{}: registration of {name:?}: {what}",
            registry.path().display()
        ))
    };
    let wrapped =
        Base64::decode_vec(&rec.wrapped_key).map_err(|_| bad("malformed wrapped key".into()))?;
    let key = hsm
        .decrypt(MASTER_KEY, &wrapped, &wrap_aad(name, &rec.generation_id))
        .map_err(|e| {
            bad(format!(
                "the module's data key cannot be unwrapped ({e}); the record was tampered with or made by another HSM"
            ))
        })?;
    let data_key: [u8; 32] = key
        .as_slice()
        .try_into()
        .map_err(|_| bad("wrapped key has the wrong size".into()))?;
    Ok(Registration {
        generation_id: rec.generation_id,
        registered_at: rec.registered_at,
        data_key: Zeroizing::new(data_key),
    })
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

/// Deletes the registration of `name`. Returns whether there was one.
///
/// # Errors
///
/// The registry cannot be written.
pub fn deregister(registry: &Registry, name: &str) -> Result<bool, IdentityError> {
    registry
        .deregister(name)
        .map_err(|e| IdentityError::Storage(e.to_string()))
}
