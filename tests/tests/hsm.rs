//! HSM PAL conformance: one set of test bodies, run against every backend:
//! `soft`, `tpm` on a real swtpm, `pkcs11` on a real SoftHSM2 token. Each
//! test gets its own simulator instance or token.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use edgeward::hsm::soft::SoftHsm;
use edgeward::hsm::{
    ErrorKind, Hsm, HsmError, Quote, extend_chain, soft_quote_message, verify_p256,
};
use edgeward_hsm_hw::pkcs11::Pkcs11Hsm;
use edgeward_hsm_hw::tpm::TpmHsm;
use edgeward_tests::fixtures::{SoftHsmToken, Swtpm};
use sha2::{Digest as _, Sha256};

/// A backend under test: opens (and re-opens) the same key store.
trait Fixture {
    fn open(&mut self) -> Arc<dyn Hsm>;
    /// Whether the backend has a measurement register and quotes.
    fn attests(&self) -> bool;
    /// Power-cycles the device where that means something.
    fn reset(&mut self) {}
    /// Checks a quote the way an outside verifier would.
    fn verify_quote(&self, quote: &Quote, expected_register: &[u8; 32]);
}

struct Soft(tempfile::TempDir);
struct Tpm(Swtpm, tempfile::TempDir);
struct Pkcs11(SoftHsmToken);

impl Fixture for Soft {
    fn open(&mut self) -> Arc<dyn Hsm> {
        Arc::new(SoftHsm::open(self.0.path()).expect("open soft"))
    }
    fn attests(&self) -> bool {
        true
    }
    fn verify_quote(&self, q: &Quote, expected: &[u8; 32]) {
        assert_eq!(&q.register, expected);
        assert_eq!(q.message, soft_quote_message(expected, &q.nonce));
        assert!(
            verify_p256(&q.public_key, &q.message, &q.signature),
            "soft quote signature"
        );
    }
}

impl Fixture for Tpm {
    fn open(&mut self) -> Arc<dyn Hsm> {
        Arc::new(TpmHsm::open(self.1.path(), self.0.config()).expect("open tpm"))
    }
    fn attests(&self) -> bool {
        true
    }
    fn reset(&mut self) {
        self.0.reset();
    }
    fn verify_quote(&self, q: &Quote, expected: &[u8; 32]) {
        use tss_esapi::structures::{Attest, AttestInfo};
        use tss_esapi::traits::UnMarshall;
        assert_eq!(&q.register, expected);
        // tpm2-tools checks the signature over TPMS_ATTEST and the nonce.
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).expect("write");
            p
        };
        let pem = edgeward::hsm::public_key_pem(&q.public_key).expect("pem");
        let key = write("ak.pem", pem.as_bytes());
        let msg = write("quote.msg", &q.message);
        let sig = write("quote.sig", &q.signature);
        let nonce_hex: String = q.nonce.iter().map(|b| format!("{b:02x}")).collect();
        let out = std::process::Command::new("tpm2_checkquote")
            .arg("-u")
            .arg(&key)
            .arg("-m")
            .arg(&msg)
            .arg("-s")
            .arg(&sig)
            .args(["-g", "sha256", "-q", &nonce_hex])
            .output()
            .expect("run tpm2_checkquote (install Debian's tpm2-tools)");
        assert!(
            out.status.success(),
            "tpm2_checkquote refused the quote: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // ...and the quoted PCR digest is SHA-256 of the register we were told.
        let attest = Attest::unmarshall(&q.message).expect("TPMS_ATTEST");
        let AttestInfo::Quote { info } = attest.attested() else {
            panic!("not a quote")
        };
        assert_eq!(
            info.pcr_digest().value(),
            Sha256::digest(expected).as_slice()
        );
        assert_eq!(attest.extra_data().value(), q.nonce.as_slice());
    }
}

impl Fixture for Pkcs11 {
    fn open(&mut self) -> Arc<dyn Hsm> {
        Arc::new(Pkcs11Hsm::open(self.0.config()).expect("open pkcs11"))
    }
    fn attests(&self) -> bool {
        false
    }
    fn verify_quote(&self, _: &Quote, _: &[u8; 32]) {
        unreachable!("pkcs11 does not quote")
    }
}

fn kind(e: HsmError) -> ErrorKind {
    e.kind
}

mod bodies {
    use super::*;

    pub fn sign_and_verify(f: &mut dyn Fixture) {
        let h = f.open();
        let pk = h.signing_key("device-ca").expect("create");
        assert_eq!(pk.len(), 65);
        assert_eq!(
            h.signing_key("device-ca").expect("again"),
            pk,
            "create-or-load is idempotent"
        );
        assert_eq!(h.public_key("device-ca").expect("public"), pk);
        let msg = b"a reading worth signing";
        let sig = h
            .sign_digest("device-ca", &Sha256::digest(msg).into())
            .expect("sign");
        assert!(verify_p256(&pk, msg, &sig), "signature verifies");
        assert!(!verify_p256(&pk, b"another message", &sig));
        let other = h.signing_key("other").expect("other key");
        assert_ne!(other, pk);
        assert!(!verify_p256(&other, msg, &sig));
    }

    pub fn aead_round_trip(f: &mut dyn Fixture) {
        let h = f.open();
        h.aead_key("master-encryption").expect("create");
        let ct = h
            .encrypt("master-encryption", b"secret", b"module-a")
            .expect("encrypt");
        assert_eq!(ct[0], edgeward::hsm::AEAD_VERSION, "version byte first");
        let ct2 = h
            .encrypt("master-encryption", b"secret", b"module-a")
            .expect("encrypt");
        assert_ne!(ct, ct2, "fresh nonce per encryption");
        assert_eq!(
            h.decrypt("master-encryption", &ct, b"module-a")
                .expect("decrypt")
                .as_slice(),
            b"secret"
        );
        assert_eq!(
            kind(
                h.decrypt("master-encryption", &ct, b"module-b")
                    .unwrap_err()
            ),
            ErrorKind::AuthenticationFailed
        );
        let mut tampered = ct.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            kind(
                h.decrypt("master-encryption", &tampered, b"module-a")
                    .unwrap_err()
            ),
            ErrorKind::AuthenticationFailed
        );
        assert_eq!(
            kind(
                h.decrypt("master-encryption", &ct[..5], b"module-a")
                    .unwrap_err()
            ),
            ErrorKind::AuthenticationFailed
        );
        let empty = h
            .encrypt("master-encryption", b"", b"")
            .expect("empty plaintext");
        assert!(
            h.decrypt("master-encryption", &empty, b"")
                .expect("decrypt")
                .is_empty()
        );
    }

    pub fn bad_input_is_named(f: &mut dyn Fixture) {
        let h = f.open();
        let e = h.public_key("missing").unwrap_err();
        assert_eq!(e.kind, ErrorKind::KeyNotFound);
        assert!(
            e.to_string().contains("missing") && e.to_string().contains(h.backend()),
            "{e}"
        );
        assert_eq!(
            kind(h.sign_digest("missing", &[0; 32]).unwrap_err()),
            ErrorKind::KeyNotFound
        );
        assert_eq!(
            kind(h.encrypt("missing", b"x", b"").unwrap_err()),
            ErrorKind::KeyNotFound
        );
        assert!(matches!(
            kind(h.signing_key("Bad/Id").unwrap_err()),
            ErrorKind::InvalidArgument(_)
        ));
        assert!(matches!(
            kind(h.signing_key("").unwrap_err()),
            ErrorKind::InvalidArgument(_)
        ));
        h.aead_key("sym").expect("aead");
        assert_eq!(
            kind(h.signing_key("sym").unwrap_err()),
            ErrorKind::WrongKeyKind
        );
        let big = vec![0u8; edgeward::hsm::MAX_AEAD_INPUT + 1];
        assert!(matches!(
            kind(h.encrypt("sym", &big, b"").unwrap_err()),
            ErrorKind::InvalidArgument(_)
        ));
    }

    pub fn random_bytes(f: &mut dyn Fixture) {
        let h = f.open();
        let (mut a, mut b) = ([0u8; 100], [0u8; 100]);
        h.random(&mut a).expect("random");
        h.random(&mut b).expect("random");
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 100]);
    }

    pub fn register_and_quote(f: &mut dyn Fixture) {
        let h = f.open();
        if !f.attests() {
            for e in [
                h.extend(&[1; 32]).unwrap_err(),
                h.read_register().unwrap_err(),
                h.quote("attestation", b"n").unwrap_err(),
            ] {
                assert_eq!(e.kind, ErrorKind::NotSupported, "{e}");
                assert!(e.to_string().contains("not supported"), "{e}");
            }
            return;
        }
        let r0 = h.read_register().expect("read");
        let d: [u8; 32] = Sha256::digest(b"module bytes").into();
        h.extend(&d).expect("extend");
        let r1 = h.read_register().expect("read");
        assert_eq!(
            r1,
            extend_chain(&r0, &d),
            "extend is SHA-256(old || digest)"
        );
        h.attestation_key("attestation").expect("attestation key");
        let nonce = b"verifier-nonce-0123456789";
        let q = h.quote("attestation", nonce).expect("quote");
        assert_eq!(q.nonce, nonce);
        f.verify_quote(&q, &r1);
        assert!(matches!(
            kind(h.quote("attestation", &[0; 65]).unwrap_err()),
            ErrorKind::InvalidArgument(_)
        ));
    }

    pub fn keys_persist_across_reopen(f: &mut dyn Fixture) {
        let (pk, ct) = {
            let h = f.open();
            let pk = h.signing_key("device-ca").expect("create");
            h.aead_key("master-encryption").expect("create");
            (
                pk,
                h.encrypt("master-encryption", b"kept", b"ad")
                    .expect("encrypt"),
            )
        };
        let h = f.open();
        assert_eq!(h.public_key("device-ca").expect("reloaded"), pk);
        let sig = h
            .sign_digest("device-ca", &Sha256::digest(b"m").into())
            .expect("sign");
        assert!(verify_p256(&pk, b"m", &sig));
        assert_eq!(
            h.decrypt("master-encryption", &ct, b"ad")
                .expect("decrypt")
                .as_slice(),
            b"kept"
        );
        let ids: Vec<String> = h.keys().expect("list").into_iter().map(|k| k.id).collect();
        assert!(
            ids.contains(&"device-ca".to_owned()) && ids.contains(&"master-encryption".to_owned()),
            "{ids:?}"
        );
        drop(h);

        // A device reset (TPM power cycle) keeps the keys too.
        f.reset();
        let h = f.open();
        assert_eq!(h.public_key("device-ca").expect("after reset"), pk);
        assert_eq!(
            h.decrypt("master-encryption", &ct, b"ad")
                .expect("decrypt")
                .as_slice(),
            b"kept"
        );
        let sig = h
            .sign_digest("device-ca", &Sha256::digest(b"m2").into())
            .expect("sign");
        assert!(verify_p256(&pk, b"m2", &sig));
    }

    pub fn concurrent_use_is_safe(f: &mut dyn Fixture) {
        let h = f.open();
        let pk = h.signing_key("device-ca").expect("create");
        h.aead_key("master-encryption").expect("create");
        let threads: Vec<_> = (0..6)
            .map(|t| {
                let h = h.clone();
                let pk = pk.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        let msg = format!("thread {t} message {i}");
                        let sig = h
                            .sign_digest("device-ca", &Sha256::digest(msg.as_bytes()).into())
                            .expect("sign");
                        assert!(verify_p256(&pk, msg.as_bytes(), &sig));
                        let ct = h
                            .encrypt("master-encryption", msg.as_bytes(), b"")
                            .expect("encrypt");
                        assert_eq!(
                            h.decrypt("master-encryption", &ct, b"")
                                .expect("decrypt")
                                .as_slice(),
                            msg.as_bytes()
                        );
                        let mut r = [0u8; 16];
                        h.random(&mut r).expect("random");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
    }

    pub fn secrets_stay_out_of_debug(f: &mut dyn Fixture) {
        let h = f.open();
        h.aead_key("master-encryption").expect("create");
        h.signing_key("device-ca").expect("create");
        let dbg = format!("{h:?}");
        assert!(!dbg.contains("kek") || !dbg.contains('['), "{dbg}");
        assert!(
            dbg.len() < 400,
            "Debug output is a summary, not key material: {dbg}"
        );
    }
}

macro_rules! conformance {
    ($($body:ident),* $(,)?) => {
        mod soft {
            $( #[test] fn $body() { super::bodies::$body(&mut super::Soft(tempfile::tempdir().expect("tempdir"))) } )*
        }
        mod tpm {
            $( #[test] fn $body() { super::bodies::$body(&mut super::Tpm(edgeward_tests::fixtures::Swtpm::start(), tempfile::tempdir().expect("tempdir"))) } )*
        }
        mod pkcs11 {
            $( #[test] fn $body() { super::bodies::$body(&mut super::Pkcs11(edgeward_tests::fixtures::SoftHsmToken::new())) } )*
        }
    };
}

conformance!(
    sign_and_verify,
    aead_round_trip,
    bad_input_is_named,
    random_bytes,
    register_and_quote,
    keys_persist_across_reopen,
    concurrent_use_is_safe,
    secrets_stay_out_of_debug,
);

#[test]
fn soft_keys_are_sealed_and_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let h = SoftHsm::open(dir.path()).expect("open");
    h.signing_key("device-ca").expect("create");
    let hsm_dir = dir.path().join("hsm");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&hsm_dir), 0o700);
    assert_eq!(mode(&hsm_dir.join("keys")), 0o700);
    assert_eq!(mode(&hsm_dir.join("kek")), 0o600);
    let key_file = hsm_dir.join("keys/device-ca.p256");
    assert_eq!(mode(&key_file), 0o600);
    // Sealed at rest: no PKCS#8 structure visible.
    let bytes = std::fs::read(&key_file).expect("read");
    assert_eq!(bytes[0], 1);
    assert!(
        !bytes.windows(3).any(|w| w == [0x30, 0x81, 0x87]),
        "plain PKCS#8 on disk"
    );
    // A key file swapped in under another id is refused.
    drop(h);
    std::fs::copy(&key_file, hsm_dir.join("keys/impostor.p256")).expect("copy");
    let h = SoftHsm::open(dir.path()).expect("reopen");
    assert_eq!(
        h.public_key("impostor").unwrap_err().kind,
        ErrorKind::AuthenticationFailed
    );
}

#[test]
fn unreachable_tpm_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on.
    let port = edgeward_tests::fixtures::free_port();
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let e = TpmHsm::open(
        dir.path(),
        edgeward_hsm_hw::tpm::TpmConfig {
            tcti: tcti.clone(),
            pcr: edgeward_hsm_hw::tpm::DEFAULT_PCR,
            boot_pcrs: None,
        },
    )
    .unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Unavailable(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("hsm backend tpm") && msg.contains(&tcti),
        "{msg}"
    );
}

#[test]
fn tpm_refuses_a_different_primary() {
    let state = tempfile::tempdir().expect("tempdir");
    let tpm_a = Swtpm::start();
    TpmHsm::open(state.path(), tpm_a.config())
        .expect("first TPM")
        .signing_key("k")
        .expect("key");
    drop(tpm_a);
    // Another TPM (another owner seed) cannot load keys made under the first.
    let tpm_b = Swtpm::start();
    let e = TpmHsm::open(state.path(), tpm_b.config()).unwrap_err();
    assert!(e.to_string().contains("storage primary"), "{e}");
}

/// Extends PCR `pcr` of `tpm` (SHA-256 bank) as boot firmware would.
fn extend_boot_pcr(tpm: &Swtpm, pcr: u32) {
    use std::str::FromStr as _;
    use tss_esapi::structures::{Digest, DigestValues};
    let mut ctx =
        tss_esapi::Context::new(tss_esapi::TctiNameConf::from_str(&tpm.tcti()).unwrap()).unwrap();
    let mut values = DigestValues::new();
    values.set(
        tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256,
        Digest::try_from(vec![0x5a; 32]).unwrap(),
    );
    let handle = tss_esapi::handles::PcrHandle::try_from(pcr).unwrap();
    ctx.execute_with_nullauth_session(|c| c.pcr_extend(handle, values))
        .unwrap();
}

/// Keys bound to the boot state (`boot_pcrs`): usable while the boot PCR
/// holds what it held when they were made; once it changes (another boot
/// loader, Secure Boot turned off) the TPM refuses them, and the error
/// says why. A power cycle back to the same boot state brings them back.
/// Never bound to the runtime register.
#[test]
fn tpm_keys_bound_to_the_boot_state_stop_working_when_it_changes() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut tpm = Swtpm::start();
    let mut config = tpm.config();
    config.boot_pcrs = Some(vec![7]);
    {
        let hsm = TpmHsm::open(state.path(), config.clone()).unwrap();
        hsm.signing_key("device-ca").unwrap();
        hsm.sign_digest("device-ca", &[1; 32]).unwrap();
        hsm.aead_key("master").unwrap();
        let ct = hsm.encrypt("master", b"sealed", b"").unwrap();
        std::fs::write(state.path().join("ct"), ct).unwrap();
        // The runtime register moves with every event: keys never depend
        // on it.
        hsm.extend(&[9; 32]).unwrap();
        hsm.sign_digest("device-ca", &[2; 32]).unwrap();
    }
    extend_boot_pcr(&tpm, 7);
    let hsm = TpmHsm::open(state.path(), config.clone()).unwrap();
    let e = hsm.sign_digest("device-ca", &[3; 32]).unwrap_err();
    assert!(e.to_string().contains("boot state"), "{e}");
    let ct = std::fs::read(state.path().join("ct")).unwrap();
    let e = hsm.decrypt("master", &ct, b"").unwrap_err();
    assert!(e.to_string().contains("boot state"), "{e}");
    drop(hsm);
    // The same boot state again (a power cycle with the same firmware).
    tpm.reset();
    let hsm = TpmHsm::open(state.path(), config).unwrap();
    hsm.sign_digest("device-ca", &[4; 32]).unwrap();
    assert_eq!(&hsm.decrypt("master", &ct, b"").unwrap()[..], b"sealed");

    // By default a key binds to PCR 7 when the platform measured its boot
    // there, and to nothing when it did not (a fresh swtpm).
    let auto = tempfile::tempdir().expect("tempdir");
    let hsm = TpmHsm::open(auto.path(), tpm.config()).unwrap();
    hsm.signing_key("unbound").unwrap();
    extend_boot_pcr(&tpm, 7);
    hsm.signing_key("bound").unwrap();
    hsm.sign_digest("unbound", &[5; 32]).unwrap();
    hsm.sign_digest("bound", &[5; 32]).unwrap();
    extend_boot_pcr(&tpm, 7);
    hsm.sign_digest("unbound", &[6; 32]).unwrap();
    let e = hsm.sign_digest("bound", &[6; 32]).unwrap_err();
    assert!(e.to_string().contains("boot state"), "{e}");
}

#[test]
fn pkcs11_wrong_pin_and_missing_token_are_clear_errors() {
    let token = SoftHsmToken::new();
    let mut config = token.config();
    let bad_pin = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(bad_pin.path(), "0000\n").expect("write");
    config.pin_file = bad_pin.path().to_owned();
    let e = Pkcs11Hsm::open(config.clone()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e.kind, ErrorKind::Unavailable(_)), "{msg}");
    assert!(
        msg.contains("hsm backend pkcs11") && msg.contains("login") && msg.contains("PIN"),
        "{msg}"
    );
    assert!(
        !msg.contains("0000"),
        "the PIN leaked into the error: {msg}"
    );

    let mut missing = token.config();
    missing.token = "no-such-token".into();
    let msg = Pkcs11Hsm::open(missing).unwrap_err().to_string();
    assert!(msg.contains("no-such-token"), "{msg}");

    let mut no_pin = token.config();
    no_pin.pin_file = "/no/such/pin".into();
    let msg = Pkcs11Hsm::open(no_pin).unwrap_err().to_string();
    assert!(msg.contains("/no/such/pin"), "{msg}");
}

/// Removal, honestly: on PKCS#11 each registration's data key is wrapped
/// by a token key of its own, destroyed with the registration, so not even
/// a copy of the state dir taken before the removal opens it again; on the
/// soft backend (keys in the state dir) such a copy does, as the README
/// says. A key a crash left behind is collected.
#[test]
fn removal_destroys_the_registrations_token_key() {
    use edgeward::identity::registry::{collect_keys, deregister, load_or_register};
    use edgeward::registry::Registry;
    let token = SoftHsmToken::new();
    let hsm = Pkcs11Hsm::open(token.config()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (state, backup) = (dir.path().join("state"), dir.path().join("backup"));
    std::fs::create_dir_all(&state).unwrap();
    let registry = Registry::open(&state).unwrap();
    let first = load_or_register(&hsm, &registry, "m").unwrap();
    let rec = registry.registration("m").unwrap().unwrap();
    let key = rec.wrapping_key.clone().expect("a key of its own");
    assert_eq!(key, format!("registration-{}", first.generation_id));
    let on_token = |hsm: &Pkcs11Hsm| -> Vec<String> {
        hsm.keys().unwrap().into_iter().map(|k| k.id).collect()
    };
    assert!(on_token(&hsm).contains(&key));
    // Loaded again, the same data key.
    let again = load_or_register(&hsm, &registry, "m").unwrap();
    assert_eq!(*again.data_key, *first.data_key);

    // The backup, taken before the removal.
    drop(registry);
    std::fs::create_dir_all(&backup).unwrap();
    std::fs::copy(state.join("registry.redb"), backup.join("registry.redb")).unwrap();
    let registry = Registry::open(&state).unwrap();
    assert!(deregister(Some(&hsm), &registry, "m").unwrap());
    assert!(!on_token(&hsm).contains(&key), "the token key is destroyed");
    let restored = Registry::open(&backup).unwrap();
    let e = load_or_register(&hsm, &restored, "m")
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot be unwrapped"), "{e}");

    // A key no registration names (a crash between commit and destroy).
    load_or_register(&hsm, &registry, "n").unwrap();
    let orphan = registry
        .registration("n")
        .unwrap()
        .unwrap()
        .wrapping_key
        .unwrap();
    assert!(registry.deregister("n").unwrap());
    load_or_register(&hsm, &registry, "kept").unwrap();
    let kept = registry
        .registration("kept")
        .unwrap()
        .unwrap()
        .wrapping_key
        .unwrap();
    assert_eq!(collect_keys(&hsm, &registry).unwrap(), 1);
    let now = on_token(&hsm);
    assert!(!now.contains(&orphan) && now.contains(&kept), "{now:?}");

    // Soft: the master key wraps every data key, and a copy of the state
    // dir keeps both.
    let soft_dir = dir.path().join("soft");
    std::fs::create_dir_all(&soft_dir).unwrap();
    let soft = SoftHsm::open(&soft_dir).unwrap();
    let registry = Registry::open(&soft_dir).unwrap();
    let sealed = load_or_register(&soft, &registry, "m").unwrap();
    assert!(
        registry
            .registration("m")
            .unwrap()
            .unwrap()
            .wrapping_key
            .is_none()
    );
    drop(registry);
    let soft_backup = dir.path().join("soft-backup");
    std::process::Command::new("cp")
        .args(["-a"])
        .arg(&soft_dir)
        .arg(&soft_backup)
        .status()
        .unwrap();
    let registry = Registry::open(&soft_dir).unwrap();
    assert!(deregister(Some(&soft), &registry, "m").unwrap());
    let soft_restored = SoftHsm::open(&soft_backup).unwrap();
    let reopened =
        load_or_register(&soft_restored, &Registry::open(&soft_backup).unwrap(), "m").unwrap();
    assert_eq!(*reopened.data_key, *sealed.data_key);
}

/// TPM2_Certify, the enrollment's proof that the device CA key lives in
/// the TPM: the TPM certifies it by the attestation key; the organisation's
/// verifier (no TPM stack) accepts it, and so do the TPM's own structures
/// read by tss-esapi and the signature checked by openssl. It works when
/// the AK is bound to the boot state, stops when that changes, and the
/// other backends refuse it plainly.
#[test]
fn tpm_certifies_that_the_device_ca_key_cannot_leave_it() {
    use edgeward::attest::certify;
    use tss_esapi::structures::{Attest, AttestInfo, Public};
    use tss_esapi::traits::UnMarshall;
    let state = tempfile::tempdir().expect("tempdir");
    let tpm = Swtpm::start();
    // Keys bound to the boot state (the AK's user role then needs the
    // boot policy session besides the key's HMAC session).
    extend_boot_pcr(&tpm, 7);
    let mut config = tpm.config();
    config.boot_pcrs = Some(vec![7]);
    let hsm = TpmHsm::open(state.path(), config).unwrap();
    let ca = hsm.signing_key("device-ca").unwrap();
    let ak = hsm.attestation_key("attestation").unwrap();
    let nonce = [0x42u8; 32];
    let c = hsm.certify("device-ca", "attestation", &nonce).unwrap();
    let ok = certify::verify(&c, &nonce, Some(&ak)).unwrap();
    assert_eq!(ok.point, ca, "the certified key is the device CA key");

    // The TPM's own reading of what it signed.
    let attest = Attest::unmarshall(&c.message).unwrap();
    let AttestInfo::Certify { info } = attest.attested() else {
        panic!("not a certification")
    };
    assert_eq!(attest.extra_data().value(), nonce);
    let public = Public::unmarshall(&c.public[2..]).unwrap();
    let attributes = public.object_attributes();
    assert!(attributes.fixed_tpm() && attributes.fixed_parent());
    assert!(attributes.sensitive_data_origin() && attributes.sign_encrypt());
    assert_eq!(info.name().value(), ok.name.as_slice());
    // openssl checks the AK's signature over the TPMS_ATTEST.
    let dir = tempfile::tempdir().unwrap();
    let (hash, r, s) = edgeward::attest::wire::parse_ecdsa_signature(&c.signature).unwrap();
    assert_eq!(hash, edgeward::attest::wire::ALG_SHA256);
    let der = p256::ecdsa::Signature::from_scalars(
        <[u8; 32]>::try_from(r.as_slice()).unwrap(),
        <[u8; 32]>::try_from(s.as_slice()).unwrap(),
    )
    .unwrap()
    .to_der();
    std::fs::write(dir.path().join("certify.msg"), &c.message).unwrap();
    std::fs::write(dir.path().join("certify.sig"), der.as_bytes()).unwrap();
    std::fs::write(
        dir.path().join("ak.pem"),
        edgeward::hsm::public_key_pem(&ak).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args(["dgst", "-sha256", "-verify", "ak.pem", "-signature"])
        .args(["certify.sig", "certify.msg"])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Over another nonce it proves nothing for this one.
    let e = certify::verify(&c, &[0x43; 32], Some(&ak)).unwrap_err();
    assert!(e.contains("another nonce"), "{e}");
    // Wrong kinds, missing keys and oversized nonces are named.
    for (key, signer, nonce, want) in [
        (
            "attestation",
            "attestation",
            &b"n"[..],
            ErrorKind::WrongKeyKind,
        ),
        ("device-ca", "device-ca", b"n", ErrorKind::WrongKeyKind),
        ("absent", "attestation", b"n", ErrorKind::KeyNotFound),
        ("device-ca", "absent", b"n", ErrorKind::KeyNotFound),
    ] {
        let e = hsm.certify(key, signer, nonce).unwrap_err();
        assert_eq!(e.kind, want, "{key} by {signer}: {e}");
    }
    let e = hsm
        .certify("device-ca", "attestation", &[0; 65])
        .unwrap_err();
    assert!(matches!(e.kind, ErrorKind::InvalidArgument(_)), "{e}");

    // Another boot state: the AK no longer signs, and the error says why.
    extend_boot_pcr(&tpm, 7);
    let e = hsm.certify("device-ca", "attestation", &nonce).unwrap_err();
    assert!(e.to_string().contains("boot state"), "{e}");

    // Only a TPM can certify.
    let soft_dir = tempfile::tempdir().unwrap();
    let soft = SoftHsm::open(soft_dir.path()).unwrap();
    soft.signing_key("device-ca").unwrap();
    let e = soft.certify("device-ca", "attestation", b"n").unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotSupported, "{e}");
}

/// A key made exportable (fixedTPM and fixedParent clear), certified by a
/// genuine AK of a real TPM: the certification is authentic, and the
/// organisation's verifier still refuses the key, naming why.
#[test]
fn a_certified_key_that_can_leave_the_tpm_is_refused() {
    use std::str::FromStr as _;
    use tss_esapi::attributes::ObjectAttributesBuilder;
    use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
    use tss_esapi::interface_types::ecc::EccCurve;
    use tss_esapi::interface_types::resource_handles::Hierarchy;
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::structures::{
        Data, EccPoint, EccScheme, HashScheme, PublicBuilder, PublicEccParametersBuilder,
        SignatureScheme,
    };
    use tss_esapi::traits::Marshall;
    let tpm = Swtpm::start();
    let mut ctx =
        tss_esapi::Context::new(tss_esapi::TctiNameConf::from_str(&tpm.tcti()).unwrap()).unwrap();
    ctx.set_sessions((Some(AuthSession::Password), None, None));
    let primary = ctx
        .create_primary(
            Hierarchy::Owner,
            edgeward_hsm_hw::tpm::primary_template().unwrap(),
            None,
            None,
            None,
            None,
        )
        .unwrap()
        .key_handle;
    let template = |restricted: bool, fixed: bool| {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(fixed)
            .with_fixed_parent(fixed)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
            .with_restricted(restricted)
            .build()
            .unwrap();
        let scheme = EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256));
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new_unrestricted_signing_key(
                    scheme,
                    EccCurve::NistP256,
                )
                .with_restricted(restricted)
                .build()
                .unwrap(),
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .unwrap()
    };
    let mut load = |t| {
        let created = ctx.create(primary, t, None, None, None, None).unwrap();
        let h = ctx
            .load(primary, created.out_private, created.out_public.clone())
            .unwrap();
        let area = created.out_public.marshall().unwrap();
        let mut tpm2b = u16::try_from(area.len()).unwrap().to_be_bytes().to_vec();
        tpm2b.extend_from_slice(&area);
        (h, tpm2b)
    };
    let (ak, ak_public) = load(template(true, true));
    let (key, public) = load(template(false, false));
    let nonce = b"enrollment nonce";
    ctx.set_sessions((
        Some(AuthSession::Password),
        Some(AuthSession::Password),
        None,
    ));
    let (attest, signature) = ctx
        .certify(
            key.into(),
            ak,
            Data::try_from(nonce.to_vec()).unwrap(),
            SignatureScheme::EcDsa {
                hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
            },
        )
        .unwrap();
    let c = edgeward::hsm::Certification {
        message: attest.marshall().unwrap(),
        signature: signature.marshall().unwrap(),
        public,
        ak_public,
    };
    let e = edgeward::attest::certify::verify(&c, nonce, None).unwrap_err();
    assert!(e.contains("can leave its TPM"), "{e}");
}
