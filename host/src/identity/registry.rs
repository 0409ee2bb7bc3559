//! Module registrations: a generation id per registered name, and the
//! module's data key wrapped by an HSM AEAD key under that name and
//! generation, kept in the [`Registry`]. Deregistering deletes the record,
//! so data sealed by the old registration can never be opened again from
//! this state dir (crypto-shredding), even by a module registered later
//! under the same name.
//!
//! Where the HSM's keys live outside the state dir (a PKCS#11 token), each
//! registration's data key is wrapped by a token key of its own
//! (`registration-<generation>`), destroyed when the registration is
//! removed: then not even a copy of the state dir taken before the removal
//! opens the data. Elsewhere (soft, TPM) the master key wraps every data
//! key, and its wrapped form is in the state dir: a copy keeps it.

use base64ct::{Base64, Encoding as _};
use zeroize::Zeroizing;

pub use edgeward_trust::identity::registration::{Registration, ephemeral};

use crate::hsm::Hsm;
use crate::identity::IdentityError;
use crate::registry::{Registry, StoredRegistration};

/// The HSM AEAD key that wraps every module's data key (unless the
/// registration has its own).
pub const MASTER_KEY: &str = "master-encryption";
/// The prefix of a registration's own wrapping key.
pub const REGISTRATION_KEY_PREFIX: &str = "registration-";

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
    let own = hsm
        .keys_outside_state_dir()
        .then(|| format!("{REGISTRATION_KEY_PREFIX}{}", reg.generation_id));
    let key = own.as_deref().unwrap_or(MASTER_KEY);
    hsm.aead_key(key)?;
    let wrapped = hsm.encrypt(
        key,
        reg.data_key.as_ref(),
        &wrap_aad(name, &reg.generation_id),
    )?;
    let record = StoredRegistration {
        generation_id: reg.generation_id.clone(),
        registered_at: reg.registered_at,
        wrapped_key: Base64::encode_string(&wrapped),
        wrapping_key: own,
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
            // Another registered it first: its key wraps the data key.
            forget(hsm, &rec);
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
    let unwrap_with = rec.wrapping_key.as_deref().unwrap_or(MASTER_KEY);
    let key = hsm
        .decrypt(unwrap_with, &wrapped, &wrap_aad(name, &rec.generation_id))
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

/// Deletes the registration of `name`, then destroys its own wrapping
/// key if it has one (with `hsm`; without, the next daemon start does).
/// Returns whether there was one.
///
/// # Errors
///
/// The registry cannot be written.
pub fn deregister(
    hsm: Option<&dyn Hsm>,
    registry: &Registry,
    name: &str,
) -> Result<bool, IdentityError> {
    let storage = |e: crate::registry::RegistryError| IdentityError::Storage(e.to_string());
    let rec = registry.registration(name).map_err(storage)?;
    let removed = registry.deregister(name).map_err(storage)?;
    if let (Some(hsm), Some(rec)) = (hsm, rec) {
        forget(hsm, &rec);
    }
    Ok(removed)
}

/// Destroys `rec`'s own wrapping key, if it has one, once the registration
/// is gone from the registry (committed first: a crash in between leaves
/// a key no registration names, which [`collect_keys`] destroys, never a
/// registration whose key is gone). A failure is logged; the next
/// collection retries.
pub fn forget(hsm: &dyn Hsm, rec: &StoredRegistration) {
    let Some(key) = &rec.wrapping_key else {
        return;
    };
    match hsm.destroy_key(key) {
        Ok(_) => {
            tracing::info!(key = %key, "registration key destroyed: its sealed data is unrecoverable")
        }
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "cannot destroy the registration key yet; the next daemon start retries")
        }
    }
}

/// Destroys the registration keys (`registration-*`) no registration in
/// `registry` names: left by a crash between a removal and [`forget`], or
/// by a failed destruction. Returns how many. Only for HSMs whose keys
/// live outside the state dir.
///
/// # Errors
///
/// The registry or the HSM's key list cannot be read.
pub fn collect_keys(hsm: &dyn Hsm, registry: &Registry) -> Result<usize, IdentityError> {
    if !hsm.keys_outside_state_dir() {
        return Ok(0);
    }
    let storage = |e: crate::registry::RegistryError| IdentityError::Storage(e.to_string());
    let mut named = std::collections::HashSet::new();
    for name in registry.names().map_err(storage)? {
        if let Some(k) = registry
            .registration(&name)
            .map_err(storage)?
            .and_then(|r| r.wrapping_key)
        {
            named.insert(k);
        }
    }
    let mut destroyed = 0;
    for k in hsm.keys()? {
        if k.id.starts_with(REGISTRATION_KEY_PREFIX)
            && !named.contains(&k.id)
            && hsm.destroy_key(&k.id)?
        {
            destroyed += 1;
        }
    }
    Ok(destroyed)
}
