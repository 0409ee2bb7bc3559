//! Keys the host generates and holds in memory (X509-SVID leaf keys, JWT
//! working keys), signing with `ring`: constant-time P-256 in assembly on
//! the common targets, about 8x the speed of the pure-Rust `p256` crate
//! here, and already in the build through the TLS stack. HSM keys never
//! come here.

use p256::pkcs8::EncodePrivateKey as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair as _};
use zeroize::Zeroizing;

use super::IdentityError;

/// How a [`HostKey`] encodes its signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureEncoding {
    /// DER `ECDSA-Sig-Value` (X.509, `workload.sign`).
    Der,
    /// `r || s`, 64 bytes (JWS ES256).
    Fixed,
}

/// A P-256 key in memory.
pub struct HostKey {
    pair: EcdsaKeyPair,
    point: Vec<u8>,
    pkcs8_pem: Zeroizing<String>,
    rng: SystemRandom,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey").finish_non_exhaustive()
    }
}

impl HostKey {
    /// A fresh key from the OS random source.
    ///
    /// # Errors
    ///
    /// When the random source or encoding fails.
    pub fn generate(encoding: SignatureEncoding) -> Result<Self, IdentityError> {
        let internal = |m: String| IdentityError::Internal(format!("host key: {m}"));
        let key = crate::hsm::random_signing_key().map_err(internal)?;
        let point = key
            .verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec();
        let scalar = Zeroizing::new(key.to_bytes());
        let alg: &'static EcdsaSigningAlgorithm = match encoding {
            SignatureEncoding::Der => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            SignatureEncoding::Fixed => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        };
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_private_key_and_public_key(alg, &scalar, &point, &rng)
            .map_err(|e| internal(format!("{e}")))?;
        debug_assert_eq!(pair.public_key().as_ref(), point.as_slice());
        let pem = key
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .map_err(|e| internal(format!("encode: {e}")))?;
        Ok(Self {
            pair,
            point,
            pkcs8_pem: Zeroizing::new(pem.as_str().to_owned()),
            rng,
        })
    }

    /// The SEC1 uncompressed public point.
    pub fn point(&self) -> &[u8] {
        &self.point
    }

    /// PKCS#8 PEM of the private key (for the module that owns it).
    pub fn pkcs8_pem(&self) -> &Zeroizing<String> {
        &self.pkcs8_pem
    }

    /// ECDSA P-256 / SHA-256 over `message`, encoded as the key was made for.
    ///
    /// # Errors
    ///
    /// When the random source fails.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, IdentityError> {
        self.pair
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| IdentityError::Internal("signing failed (random source)".into()))
    }
}

/// Verifies an ES256 (`r || s`) signature over `message` by a SEC1 point.
pub fn verify_fixed(point: &[u8], message: &[u8], signature: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_independently() {
        let der = HostKey::generate(SignatureEncoding::Der).unwrap();
        let sig = der.sign(b"msg").unwrap();
        assert!(crate::hsm::verify_p256(der.point(), b"msg", &sig));
        assert!(!crate::hsm::verify_p256(der.point(), b"msG", &sig));
        let fixed = HostKey::generate(SignatureEncoding::Fixed).unwrap();
        let sig = fixed.sign(b"msg").unwrap();
        assert_eq!(sig.len(), 64);
        assert!(verify_fixed(fixed.point(), b"msg", &sig));
        assert!(!verify_fixed(der.point(), b"msg", &sig));
        // The PEM is the same key (p256 reads it back to the same point).
        use p256::pkcs8::DecodePrivateKey as _;
        let back = p256::ecdsa::SigningKey::from_pkcs8_pem(fixed.pkcs8_pem()).unwrap();
        assert_eq!(
            back.verifying_key().to_encoded_point(false).as_bytes(),
            fixed.point()
        );
    }
}
