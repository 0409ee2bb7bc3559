//! Module registrations: a generation id per registered name, and the
//! module's data key wrapped by the HSM's master AEAD key under that name and
//! generation. Deregistering deletes the record, so data sealed by the old
//! registration can never be opened again (crypto-shredding), even by a
//! module registered later under the same name.

use std::path::{Path, PathBuf};

use base64ct::{Base64, Encoding as _};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{IdentityError, unix_now};
use crate::hsm::Hsm;
use crate::state;

/// The HSM AEAD key that wraps every module's data key.
pub const MASTER_KEY: &str = "master-encryption";

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    generation_id: String,
    registered_at: u64,
    wrapped_key: String,
}

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

fn new_registration(hsm: &dyn Hsm, name: &str) -> Result<(Registration, Record), IdentityError> {
    let reg = ephemeral()?;
    hsm.aead_key(MASTER_KEY)?;
    let wrapped = hsm.encrypt(
        MASTER_KEY,
        reg.data_key.as_ref(),
        &wrap_aad(name, &reg.generation_id),
    )?;
    let record = Record {
        generation_id: reg.generation_id.clone(),
        registered_at: reg.registered_at,
        wrapped_key: Base64::encode_string(&wrapped),
    };
    Ok((reg, record))
}

fn record_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir
        .join("identity")
        .join("modules")
        .join(format!("{name}.json"))
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
    state_dir: &Path,
    name: &str,
) -> Result<Registration, IdentityError> {
    let path = record_path(state_dir, name);
    let storage = |e: std::io::Error| IdentityError::Storage(format!("{}: {e}", path.display()));
    match std::fs::read(&path) {
        Ok(bytes) => {
            let rec: Record = serde_json::from_slice(&bytes).map_err(|e| {
                IdentityError::Storage(format!("{}: malformed registration: {e}", path.display()))
            })?;
            let wrapped = Base64::decode_vec(&rec.wrapped_key).map_err(|_| {
                IdentityError::Storage(format!("{}: malformed wrapped key", path.display()))
            })?;
            let key = hsm
                .decrypt(MASTER_KEY, &wrapped, &wrap_aad(name, &rec.generation_id))
                .map_err(|e| {
                    IdentityError::Storage(format!(
                        "{}: the module's data key cannot be unwrapped ({e}); the record was tampered with or made by another HSM",
                        path.display()
                    ))
                })?;
            let data_key: [u8; 32] = key.as_slice().try_into().map_err(|_| {
                IdentityError::Storage(format!(
                    "{}: wrapped key has the wrong size",
                    path.display()
                ))
            })?;
            Ok(Registration {
                generation_id: rec.generation_id,
                registered_at: rec.registered_at,
                data_key: Zeroizing::new(data_key),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                state::ensure_private_dir(dir).map_err(storage)?;
            }
            let (reg, rec) = new_registration(hsm, name)?;
            let json = serde_json::to_vec_pretty(&rec)
                .map_err(|e| IdentityError::Internal(format!("encode registration: {e}")))?;
            if state::create_only(&path, &json).map_err(storage)? {
                tracing::info!(module = name, generation = %reg.generation_id, "module registered");
                Ok(reg)
            } else {
                // Another process registered it first: use that record.
                load_or_register(hsm, state_dir, name)
            }
        }
        Err(e) => Err(storage(e)),
    }
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
/// I/O errors other than the record not existing.
pub fn deregister(state_dir: &Path, name: &str) -> Result<bool, IdentityError> {
    let path = record_path(state_dir, name);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(IdentityError::Storage(format!("{}: {e}", path.display()))),
    }
}

/// The names with a registration record.
pub fn registered(state_dir: &Path) -> Vec<String> {
    let dir = state_dir.join("identity").join("modules");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".json"))
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
