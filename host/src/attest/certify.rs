//! Checking a certification (TPM2_Certify, [`crate::hsm::Certification`]):
//! the organisation's proof, before it certifies a device's CA key, that
//! the key was made inside the device's TPM and can never leave it. Read
//! with nothing of the device's TPM stack, from the wire bytes.
//!
//! In order, each refusal naming the step:
//!
//! 1. the attestation key is a restricted signing key created in and fixed
//!    to its TPM (and, when the caller knows which AK to expect, that one);
//! 2. the AK signed the attestation (ECDSA P-256 over SHA-256);
//! 3. the TPM generated it (TPM_GENERATED_VALUE) and it is a certification,
//!    not a quote or any other statement the AK signs;
//! 4. it is over the caller's nonce (not replayed from another request);
//! 5. the name it certifies is that of the public area presented;
//! 6. that key cannot leave the TPM (fixedTPM), cannot be duplicated
//!    (fixedParent), was generated inside it (sensitiveDataOrigin: a key
//!    imported with fixedTPM set may have a copy outside), and is an
//!    unrestricted signing key (what a CA key must be), not a decryption
//!    key.
//!
//! Whether the AK lives in the TPM whose EK certificate the device
//! presents is a separate step (credential activation,
//! [`super::credential`]); whether the key is the one a CSR carries is the
//! caller's comparison of [`Certified::point`].

use p256::ecdsa::signature::Verifier as _;

use super::verify::{check_ak_attributes, tpm_signature};
use super::wire;
use crate::hsm::Certification;

/// What a verified certification proves about the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certified {
    /// The key's TPM name (SHA-256 name algorithm).
    pub name: Vec<u8>,
    /// Its SEC1 uncompressed P-256 point.
    pub point: Vec<u8>,
    /// The AK's TPM name (what a credential is made for).
    pub ak_name: Vec<u8>,
    /// The AK's SEC1 point.
    pub ak_point: Vec<u8>,
}

/// Verifies `c` over `nonce`, by the AK whose SEC1 point is `ak` when the
/// caller already knows it. See the module documentation for the order.
///
/// # Errors
///
/// The first step that fails, named.
pub fn verify(c: &Certification, nonce: &[u8], ak: Option<&[u8]>) -> Result<Certified, String> {
    let ak_public = wire::parse_ecc_public_as(&c.ak_public, "the attestation key")?;
    check_ak_attributes(ak_public.attributes)?;
    if ak.is_some_and(|p| p != ak_public.point) {
        return Err("the certification is signed by another attestation key".into());
    }
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&ak_public.point)
        .map_err(|_| "the attestation key is not a usable P-256 key")?;
    let signature = tpm_signature(&c.signature, "the certification")?;
    key.verify(&c.message, &signature).map_err(|_| {
        "the certification's signature does not verify with the attestation key: \
         forged, altered, or signed by another key"
            .to_owned()
    })?;
    let info = wire::parse_certify(&c.message)?;
    if info.extra_data != nonce {
        return Err(
            "the certification is over another nonce: replayed, or made for another request".into(),
        );
    }
    let certified = wire::parse_ecc_public_as(&c.public, "the certified key")?;
    if certified.name != info.name {
        return Err(
            "the certification names another key than the public area presented with it".into(),
        );
    }
    check_key_attributes(certified.attributes)?;
    Ok(Certified {
        name: certified.name,
        point: certified.point,
        ak_name: ak_public.name,
        ak_point: ak_public.point,
    })
}

/// Step 6: where the key may go and what it may do.
fn check_key_attributes(a: u32) -> Result<(), String> {
    use wire::attr::*;
    if a & FIXED_TPM == 0 {
        return Err(format!(
            "the certified key can leave its TPM (fixedTPM is clear, attributes {a:#010x}): \
             it was created exportable"
        ));
    }
    if a & FIXED_PARENT == 0 {
        return Err(format!(
            "the certified key can be duplicated to another parent (fixedParent is clear, \
             attributes {a:#010x})"
        ));
    }
    if a & SENSITIVE_DATA_ORIGIN == 0 {
        return Err(format!(
            "the certified key's private part was supplied from outside the TPM \
             (sensitiveDataOrigin is clear, attributes {a:#010x}): a copy may exist"
        ));
    }
    if a & SIGN == 0 || a & RESTRICTED != 0 || a & DECRYPT != 0 {
        return Err(format!(
            "the certified key is not an unrestricted signing key (attributes {a:#010x}): \
             it cannot be a certificate authority's key"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The checks against certifications made here in software, signed by
    //! a P-256 key standing in for the AK (the real TPM's are in
    //! `tests/tests/hsm.rs`, on swtpm).

    use p256::ecdsa::signature::Signer as _;
    use sha2::{Digest as _, Sha256};

    use super::*;
    use wire::attr::*;

    const AK_ATTRS: u32 = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN;
    const CA_ATTRS: u32 = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | SIGN;

    /// An ECC P-256 TPM2B_PUBLIC (SHA-256 names, ECDSA scheme).
    fn public(point: &[u8], attributes: u32) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&wire::ALG_ECC.to_be_bytes());
        t.extend_from_slice(&wire::ALG_SHA256.to_be_bytes());
        t.extend_from_slice(&attributes.to_be_bytes());
        t.extend_from_slice(&[0, 0]); // authPolicy
        t.extend_from_slice(&wire::ALG_NULL.to_be_bytes()); // symmetric
        t.extend_from_slice(&wire::ALG_ECDSA.to_be_bytes());
        t.extend_from_slice(&wire::ALG_SHA256.to_be_bytes());
        t.extend_from_slice(&wire::ECC_NIST_P256.to_be_bytes());
        t.extend_from_slice(&wire::ALG_NULL.to_be_bytes()); // kdf
        t.extend_from_slice(&[0, 32]);
        t.extend_from_slice(&point[1..33]);
        t.extend_from_slice(&[0, 32]);
        t.extend_from_slice(&point[33..65]);
        let mut out = u16::try_from(t.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(&t);
        out
    }

    fn name(tpm2b_public: &[u8]) -> Vec<u8> {
        let mut n = wire::ALG_SHA256.to_be_bytes().to_vec();
        n.extend_from_slice(&Sha256::digest(&tpm2b_public[2..]));
        n
    }

    fn attest(kind: u16, nonce: &[u8], certified: &[u8]) -> Vec<u8> {
        let mut m = wire::TPM_GENERATED.to_be_bytes().to_vec();
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&u16::try_from(nonce.len()).unwrap().to_be_bytes());
        m.extend_from_slice(nonce);
        m.extend_from_slice(&[0; 17 + 8]);
        let n = name(certified);
        m.extend_from_slice(&u16::try_from(n.len()).unwrap().to_be_bytes());
        m.extend_from_slice(&n);
        m.extend_from_slice(&[0, 0]);
        m
    }

    fn sign(ak: &p256::ecdsa::SigningKey, message: &[u8]) -> Vec<u8> {
        let sig: p256::ecdsa::Signature = ak.sign(message);
        let (r, s) = sig.split_bytes();
        let mut t = wire::ALG_ECDSA.to_be_bytes().to_vec();
        t.extend_from_slice(&wire::ALG_SHA256.to_be_bytes());
        for v in [r, s] {
            t.extend_from_slice(&[0, 32]);
            t.extend_from_slice(&v);
        }
        t
    }

    fn point(k: &p256::ecdsa::SigningKey) -> Vec<u8> {
        k.verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    struct Case {
        ak: p256::ecdsa::SigningKey,
        key: p256::ecdsa::SigningKey,
    }

    impl Case {
        fn new() -> Self {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).unwrap();
            seed[0] = 1;
            let ak = p256::ecdsa::SigningKey::from_slice(&seed).unwrap();
            seed[1] ^= 0x55;
            let key = p256::ecdsa::SigningKey::from_slice(&seed).unwrap();
            Self { ak, key }
        }

        fn make(&self, key_attrs: u32, ak_attrs: u32, nonce: &[u8]) -> Certification {
            let public = public(&point(&self.key), key_attrs);
            let message = attest(wire::ST_ATTEST_CERTIFY, nonce, &public);
            Certification {
                signature: sign(&self.ak, &message),
                message,
                public,
                ak_public: super::tests::public(&point(&self.ak), ak_attrs),
            }
        }
    }

    #[test]
    fn a_tpm_resident_signing_key_is_certified() {
        let case = Case::new();
        let c = case.make(CA_ATTRS, AK_ATTRS, b"nonce");
        let ok = verify(&c, b"nonce", Some(&point(&case.ak))).unwrap();
        assert_eq!(ok.point, point(&case.key));
        assert_eq!(ok.name, name(&c.public));
        assert_eq!(ok.ak_name, name(&c.ak_public));
    }

    #[test]
    fn each_step_refuses_naming_itself() {
        let case = Case::new();
        let refused =
            |c: &Certification, nonce: &[u8], ak: Option<&[u8]>| verify(c, nonce, ak).unwrap_err();
        let good = case.make(CA_ATTRS, AK_ATTRS, b"n");
        // 1: an AK that is not restricted, or another AK than expected.
        let e = refused(
            &case.make(CA_ATTRS, AK_ATTRS & !RESTRICTED, b"n"),
            b"n",
            None,
        );
        assert!(e.contains("restricted signing key"), "{e}");
        let e = refused(&good, b"n", Some(&point(&case.key)));
        assert!(e.contains("another attestation key"), "{e}");
        // 2: altered after signing.
        let mut altered = good.clone();
        let last = altered.message.len() - 1;
        altered.message[last] ^= 1;
        let e = refused(&altered, b"n", None);
        assert!(e.contains("does not verify"), "{e}");
        // 3: a quote (or anything else) the AK signed.
        let mut quote = good.clone();
        quote.message = attest(wire::ST_ATTEST_QUOTE, b"n", &good.public);
        quote.signature = sign(&case.ak, &quote.message);
        let e = refused(&quote, b"n", None);
        assert!(e.contains("not a certification"), "{e}");
        // 4: replayed for another request.
        let e = refused(&good, b"other", None);
        assert!(e.contains("another nonce"), "{e}");
        // 5: another key's public area presented with the certification.
        let mut swapped = good.clone();
        swapped.public = public(&point(&case.ak), CA_ATTRS);
        let e = refused(&swapped, b"n", None);
        assert!(e.contains("names another key"), "{e}");
        // 6: exportable, duplicable, imported, or not a signing key.
        for (attrs, says) in [
            (CA_ATTRS & !FIXED_TPM, "can leave its TPM"),
            (CA_ATTRS & !FIXED_PARENT, "duplicated"),
            (CA_ATTRS & !SENSITIVE_DATA_ORIGIN, "supplied from outside"),
            (CA_ATTRS | RESTRICTED, "not an unrestricted signing key"),
            (CA_ATTRS | DECRYPT, "not an unrestricted signing key"),
            (CA_ATTRS & !SIGN, "not an unrestricted signing key"),
        ] {
            let e = refused(&case.make(attrs, AK_ATTRS, b"n"), b"n", None);
            assert!(e.contains(says), "{attrs:#x}: {e}");
        }
    }

    #[test]
    fn truncated_input_is_refused_not_panicked_on() {
        let case = Case::new();
        let good = case.make(CA_ATTRS, AK_ATTRS, b"n");
        for field in 0..4 {
            let len = [
                &good.message,
                &good.signature,
                &good.public,
                &good.ak_public,
            ][field]
                .len();
            for n in [len - 1, len / 2, 1, 0] {
                let mut c = good.clone();
                let v = match field {
                    0 => &mut c.message,
                    1 => &mut c.signature,
                    2 => &mut c.public,
                    _ => &mut c.ak_public,
                };
                v.truncate(n);
                assert!(verify(&c, b"n", None).is_err(), "field {field}, {n} bytes");
            }
        }
    }
}
