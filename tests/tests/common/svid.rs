//! Checks of workload identities from the outside, shared by the tests
//! of every language's modules: certificates by `openssl verify` and the
//! `spiffe` crate, tokens by `jsonwebtoken` and the `spiffe` crate with keys
//! from `edgeward bundle --format jwks`, signed sensor readings.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use base64ct::{Base64, Encoding as _};

use super::*;

/// The `CERTIFICATE` blocks of a PEM text, each as its own PEM string.
pub fn pem_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if line == "-----BEGIN CERTIFICATE-----" {
            cur = Some(String::new());
        }
        if let Some(c) = cur.as_mut() {
            c.push_str(line);
            c.push('\n');
        }
        if line == "-----END CERTIFICATE-----" {
            out.extend(cur.take());
        }
    }
    out
}

pub fn pem_to_der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    Base64::decode_vec(&b64).unwrap()
}

pub fn private_key_der(text: &str) -> Vec<u8> {
    let start = text
        .find("-----BEGIN PRIVATE KEY-----")
        .expect("a PKCS#8 key");
    let end = text.find("-----END PRIVATE KEY-----").unwrap();
    pem_to_der(&text[start..end])
}

/// `openssl verify` of `leaf` against the roots in `bundle`, with `chain` as
/// untrusted intermediates.
pub fn openssl_verify(bundle: &Path, chain: Option<&Path>, leaf: &Path, extra: &[&str]) -> String {
    let mut c = Command::new("openssl");
    c.arg("verify").arg("-CAfile").arg(bundle);
    if let Some(u) = chain {
        c.arg("-untrusted").arg(u);
    }
    let o = c.args(extra).arg(leaf).output().expect("openssl");
    let out = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "openssl verify failed: {out}");
    out
}

pub fn openssl_text(cert: &Path) -> String {
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(cert)
        .output()
        .expect("openssl");
    assert!(o.status.success());
    stdout(&o)
}

pub fn bundle(s: &Scratch, flags: &[&str], format: &str) -> String {
    let o = s
        .edgeward()
        .arg("bundle")
        .args(flags)
        .args(["--format", format])
        .output()
        .unwrap();
    assert_status(&o, 0);
    stdout(&o)
}

/// ECDSA P-256 / SHA-256 verification of `sig` over `msg` by `cert_pem`'s key.
pub fn verifies(cert_pem: &str, msg: &[u8], sig_der: &[u8]) -> bool {
    use p256::ecdsa::signature::Verifier as _;
    let der = pem_to_der(cert_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&cert.public_key().subject_public_key.data)
        .unwrap();
    let sig = p256::ecdsa::Signature::from_der(sig_der).unwrap();
    vk.verify(msg, &sig).is_ok()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub fn line_value<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in\n{out}"))
}

/// Checks an X509-SVID printed by the probe: openssl verifies it against the
/// bundle for client and server auth, it has exactly the SPIFFE ID as URI
/// SAN, and the `spiffe` crate accepts it with its key.
pub fn check_svid(s: &Scratch, out: &str, bundle_pem: &str, spiffe_id: &str) {
    let certs = pem_blocks(out);
    assert!(!certs.is_empty(), "no certificate in\n{out}");
    let leaf = s.write("leaf.pem", &certs[0]);
    let roots = s.write("bundle.pem", bundle_pem);
    let chain = s.write("chain.pem", &certs[1..].concat());
    let untrusted = (certs.len() > 1).then_some(chain.as_path());
    openssl_verify(&roots, untrusted, &leaf, &["-purpose", "sslclient"]);
    openssl_verify(&roots, untrusted, &leaf, &["-purpose", "sslserver"]);
    let text = openssl_text(&leaf);
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(text.contains(&format!("URI:{spiffe_id}")), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    // No subject: nothing (a broker's use_identity_as_username, say) can
    // map an SVID to a user name; the SAN is then critical.
    assert!(
        text.contains("Subject: \n") || text.contains("Subject:\n"),
        "{text}"
    );
    assert!(
        text.contains("Subject Alternative Name: critical"),
        "{text}"
    );
    assert!(
        text.contains("Key Usage: critical\n                Digital Signature\n"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    // The independent SPIFFE implementation.
    let chain_der: Vec<u8> = certs.iter().flat_map(|c| pem_to_der(c)).collect();
    let svid = spiffe::X509Svid::parse_from_der(&chain_der, &private_key_der(out))
        .expect("the spiffe crate accepts the X509-SVID");
    assert_eq!(svid.spiffe_id().to_string(), spiffe_id);
}

/// Verifies a token with jsonwebtoken (key from the JWKS by `kid`) and with
/// the spiffe crate's JWT-SVID validation.
pub fn check_token(
    token: &str,
    jwks: &str,
    audience: &str,
    trust_domain: &str,
) -> serde_json::Value {
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(jwks).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let kid = header.kid.expect("kid");
    let jwk = set.find(&kid).expect("the token's kid is in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "sub", "aud"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .expect("jsonwebtoken verifies the JWT-SVID");

    let doc: serde_json::Value = serde_json::from_str(jwks).unwrap();
    let jwt_keys: Vec<_> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .cloned()
        .collect();
    let td = spiffe::TrustDomain::new(trust_domain).unwrap();
    let b = spiffe::JwtBundle::from_jwt_authorities(
        td,
        serde_json::json!({ "keys": jwt_keys })
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let set: spiffe::JwtBundleSet = std::iter::once(b).collect();
    let svid = spiffe::JwtSvid::parse_and_validate(token, &set, &[audience])
        .expect("the spiffe crate validates the JWT-SVID");
    assert_eq!(
        svid.spiffe_id().to_string(),
        data.claims["sub"].as_str().unwrap()
    );
    data.claims
}

/// Checks every reading a sensor sample printed (`output`, one JSON line
/// each): the signature verifies with the certificate the first reading
/// carries, the certificate with `openssl verify` against the bundle, the
/// token with two JWT implementations for `audience`, issued to `module`.
/// Returns how many readings there were.
pub fn check_readings(s: &Scratch, output: &str, module: &str, audience: &str) -> usize {
    let jwks = bundle(s, &[], "jwks");
    let roots = s.write("bundle.pem", &bundle(s, &[], "pem"));
    let mut cert: Option<String> = None;
    let mut n = 0;
    for line in output.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(c) = v["cert"].as_str() {
            cert = Some(c.to_owned());
        }
        let cert = cert
            .as_deref()
            .expect("the first reading carries the certificate");
        let reading = &line[..line.find(",\"sig\"").unwrap()];
        let sig = unhex(v["sig"].as_str().unwrap());
        assert!(
            verifies(
                &pem_blocks(cert)[0],
                format!("{reading}}}").as_bytes(),
                &sig
            ),
            "{line}"
        );
        let leaf = s.write("sensor.pem", &pem_blocks(cert)[0]);
        openssl_verify(&roots, None, &leaf, &[]);
        let claims = check_token(
            v["token"].as_str().unwrap(),
            &jwks,
            audience,
            "edgeward.local",
        );
        assert!(
            claims["sub"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/module/{module}")),
            "{claims}"
        );
        n += 1;
    }
    n
}

/// Checks a probe's `bad-input` output: the cases every language's probe
/// has, then `extra`, each a WIT `invalid-argument` error (never a trap),
/// and the closing line.
pub fn assert_bad_input(out: &str, extra: &[&str]) {
    let common = [
        "empty-audience",
        "empty-audience-string",
        "ttl-zero",
        "too-many-audiences",
        "long-audience",
        "sign-oversized",
        "encrypt-oversized",
        "decrypt-empty",
        "validate-garbage",
        "server-cert-wildcard",
    ];
    for c in common.iter().chain(extra) {
        let line = line_value(out, &format!("{c} "));
        assert!(line.starts_with("err invalid-argument: "), "{c}: {line}");
    }
    assert!(out.contains("bad-input done"), "{out}");
}
