//! Sealing for modules: AES-256-GCM under the registration's data key,
//! with the module's name and generation bound into the associated data,
//! in the PAL's one AEAD framing ([`crate::hsm::aead`]).

use crate::hsm::aead::{self, FrameError, OpenError, SoftAead};

use super::{IdentityError, MAX_ASSOCIATED_DATA, MAX_PLAINTEXT, check_size, invalid};

/// The data key of one registration, with its associated-data prefix.
pub(super) struct Sealer {
    aead: SoftAead,
    aad_prefix: Vec<u8>,
}

impl Sealer {
    pub(super) fn new(data_key: &[u8; 32], name: &str, generation: &str) -> Self {
        let mut p = Vec::with_capacity(64);
        p.extend_from_slice(b"edgeward workload aead v1\0");
        p.extend_from_slice(name.as_bytes());
        p.push(0);
        p.extend_from_slice(generation.as_bytes());
        p.push(0);
        Self {
            aead: SoftAead::from_key(data_key),
            aad_prefix: p,
        }
    }

    fn aad(&self, user: &[u8]) -> Vec<u8> {
        let mut a = Vec::with_capacity(self.aad_prefix.len() + user.len());
        a.extend_from_slice(&self.aad_prefix);
        a.extend_from_slice(user);
        a
    }

    pub(super) fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, IdentityError> {
        check_size("plaintext", plaintext.len(), MAX_PLAINTEXT)?;
        check_size("associated-data", aad.len(), MAX_ASSOCIATED_DATA)?;
        self.aead
            .seal(plaintext, &self.aad(aad))
            .map_err(IdentityError::Internal)
    }

    pub(super) fn decrypt(&self, ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>, IdentityError> {
        check_size("associated-data", aad.len(), MAX_ASSOCIATED_DATA)?;
        if ciphertext.len() > MAX_PLAINTEXT + aead::OVERHEAD {
            return Err(invalid("ciphertext: longer than encrypt can produce"));
        }
        match self.aead.open(ciphertext, &self.aad(aad)) {
            Ok(p) => Ok(p.to_vec()),
            Err(OpenError::Frame(FrameError::Empty)) => Err(invalid("ciphertext: empty")),
            Err(OpenError::Frame(e)) => Err(invalid(format!("ciphertext: {e}"))),
            Err(OpenError::Authentication) => Err(invalid(
                "ciphertext: authentication failed (tampered, wrong associated data, or sealed by another module or registration)",
            )),
        }
    }
}
