//! TPM2_MakeCredential in software, as a verifier does it (keylime's
//! registrar, `tpm2_makecredential -T none`): a secret only the TPM holding
//! both the endorsement key and the key of the given name can recover
//! (TPM2_ActivateCredential), for an RSA 2048 EK (TPM 2.0 Part 1, 24:
//! "Credential Protection").
//!
//! - seed: 32 random bytes, encrypted to the EK with RSA-OAEP (SHA-256,
//!   label `IDENTITY\0`);
//! - the credential (a TPM2B_DIGEST) encrypted with AES-128-CFB (zero IV)
//!   under KDFa(seed, `STORAGE`, name), and an HMAC-SHA-256 under
//!   KDFa(seed, `INTEGRITY`) over the ciphertext and the name.
//!
//! A credential made for another EK cannot be decrypted; one made for
//! another name fails the integrity check: either way the TPM refuses it.

use aes::cipher::{BlockEncrypt as _, KeyInit as _};
use rsa::pkcs8::DecodePublicKey as _;

use super::evidence::CredentialFile;

/// KDFa (TPM 2.0 Part 1, 11.4.10.2) with HMAC-SHA-256: `bits` of key
/// material from `key`, `label` (its terminating zero is added here) and
/// the two contexts.
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let want = (bits as usize).div_ceil(8);
    let mut out = Vec::with_capacity(want + 32);
    let mut counter = 1u32;
    while out.len() < want {
        let mut ctx = ring::hmac::Context::with_key(&hmac_key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(want);
    out
}

/// AES-128 in CFB mode (full-block feedback) with a zero IV, encrypting.
fn aes128_cfb_encrypt(key: &[u8], data: &[u8]) -> Vec<u8> {
    let cipher = aes::Aes128::new(aes::cipher::generic_array::GenericArray::from_slice(key));
    let mut feedback = [0u8; 16];
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(16) {
        let mut block = aes::cipher::generic_array::GenericArray::from(feedback);
        cipher.encrypt_block(&mut block);
        let c: Vec<u8> = chunk.iter().zip(block.iter()).map(|(p, k)| p ^ k).collect();
        if c.len() == 16 {
            feedback.copy_from_slice(&c);
        }
        out.extend_from_slice(&c);
    }
    out
}

/// Makes a credential carrying `secret` (1-64 bytes) for the key named
/// `name` in the TPM whose EK is the RSA key `ek_spki_der`
/// (SubjectPublicKeyInfo DER, as in the EK certificate).
///
/// # Errors
///
/// The EK is not an RSA key, or the secret's size is out of range.
pub fn make(ek_spki_der: &[u8], name: &[u8], secret: &[u8]) -> Result<CredentialFile, String> {
    if secret.is_empty() || secret.len() > 64 {
        return Err("a credential carries 1-64 bytes".into());
    }
    let ek = rsa::RsaPublicKey::from_public_key_der(ek_spki_der)
        .map_err(|e| format!("the endorsement key is not an RSA key: {e}"))?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness: {e}"))?;
    let mut rng = rand_core_adapter::OsRng;
    let encrypted_seed = ek
        .encrypt(
            &mut rng,
            rsa::Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
            &seed,
        )
        .map_err(|e| format!("cannot encrypt to the endorsement key: {e}"))?;
    let sym = kdfa(&seed, "STORAGE", name, &[], 128);
    let mut plain = u16::try_from(secret.len())
        .unwrap_or(64)
        .to_be_bytes()
        .to_vec();
    plain.extend_from_slice(secret);
    let enc_identity = aes128_cfb_encrypt(&sym, &plain);
    let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
    let mut ctx =
        ring::hmac::Context::with_key(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &hmac_key));
    ctx.update(&enc_identity);
    ctx.update(name);
    let outer = ctx.sign();
    let mut id_object = 32u16.to_be_bytes().to_vec();
    id_object.extend_from_slice(outer.as_ref());
    id_object.extend_from_slice(&enc_identity);
    Ok(CredentialFile {
        id_object,
        secret: encrypted_seed,
    })
}

/// The OS random source in the shape `rsa` asks for.
mod rand_core_adapter {
    /// getrandom, as an RNG for RSA-OAEP's padding.
    pub struct OsRng;

    impl rsa::rand_core::RngCore for OsRng {
        fn next_u32(&mut self) -> u32 {
            let mut b = [0u8; 4];
            self.fill_bytes(&mut b);
            u32::from_le_bytes(b)
        }
        fn next_u64(&mut self) -> u64 {
            let mut b = [0u8; 8];
            self.fill_bytes(&mut b);
            u64::from_le_bytes(b)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            // The OS source does not fail once the process has started;
            // if it ever does, padding of zeros would be unsafe: stop.
            if let Err(e) = getrandom::fill(dest) {
                panic!("the OS random source failed: {e}");
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
            getrandom::fill(dest).map_err(|_| {
                rsa::rand_core::Error::from(
                    std::num::NonZeroU32::new(rsa::rand_core::Error::CUSTOM_START)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                )
            })
        }
    }

    impl rsa::rand_core::CryptoRng for OsRng {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KDFa against the TPM 2.0 reference (an independent implementation:
    /// HMAC computed here by hand from the spec's layout).
    #[test]
    fn kdfa_is_the_counter_mode_hmac_of_the_spec() {
        let k = kdfa(b"key", "STORAGE", b"u", b"v", 128);
        let mut msg = 1u32.to_be_bytes().to_vec();
        msg.extend_from_slice(b"STORAGE\0uv");
        msg.extend_from_slice(&128u32.to_be_bytes());
        let h = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"key"), &msg);
        assert_eq!(k, h.as_ref()[..16]);
        assert_eq!(kdfa(b"key", "INTEGRITY", &[], &[], 512).len(), 64);
    }

    #[test]
    fn cfb_matches_aes_of_the_feedback() {
        let key = [1u8; 16];
        let data = [0u8; 20];
        let c = aes128_cfb_encrypt(&key, &data);
        // With zero plaintext, block 1 is E(0) and block 2 is E(E(0)).
        let cipher = aes::Aes128::new(aes::cipher::generic_array::GenericArray::from_slice(&key));
        let mut b = aes::cipher::generic_array::GenericArray::from([0u8; 16]);
        cipher.encrypt_block(&mut b);
        assert_eq!(&c[..16], b.as_slice());
        cipher.encrypt_block(&mut b);
        assert_eq!(&c[16..], &b[..4]);
    }
}
