//! The key daemon against its callers: root through the HSM PAL's client,
//! the runtime's uid and a stranger through an independent client (Python,
//! speaking the documented frames), and hostile input.
//!
//! Runs as root (the test machine's user): it starts callers under other
//! uids. A machine without python3 fails these tests; it does not skip them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64ct::{Base64, Encoding as _};
use edgeward_hsm::Hsm;
use edgeward_proto::RemoteHsm;

const KEYD: &str = env!("CARGO_BIN_EXE_edgeward-keyd");
const RUNTIME_UID: u32 = 64999;
const STRANGER_UID: u32 = 64998;

/// The independent client: for each line of stdin, one connection, one
/// frame (`RAW <hex>`: those bytes as they are), and the answer's JSON (or
/// `CLOSED`) on a line of stdout.
const CLIENT: &str = r#"
import socket, struct, sys
path = sys.argv[1]
for line in sys.stdin:
    line = line.rstrip("\n")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    # A stranger is answered and closed at connect: its send may find the
    # connection gone, and the answer is still there to read.
    try:
        if line.startswith("RAW "):
            s.sendall(bytes.fromhex(line[4:]))
            s.shutdown(socket.SHUT_WR)
        else:
            body = line.encode()
            s.sendall(struct.pack(">I", len(body)) + body)
    except (BrokenPipeError, ConnectionResetError):
        pass
    head = b""
    while len(head) < 4:
        got = s.recv(4 - len(head))
        if not got:
            break
        head += got
    if len(head) < 4:
        print("CLOSED", flush=True)
        continue
    n = struct.unpack(">I", head)[0]
    body = b""
    while len(body) < n:
        got = s.recv(n - len(body))
        if not got:
            break
        body += got
    print(body.decode(), flush=True)
    s.close()
"#;

struct Keyd {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Keyd {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Reachable by the other uids (the socket itself is 0666).
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let socket = dir.path().join("keyd.sock");
        let log = std::fs::File::create(dir.path().join("keyd.log")).unwrap();
        let child = Command::new(KEYD)
            .args(["--state"])
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(&socket)
            .args(["--runtime-uid", &RUNTIME_UID.to_string()])
            .args(["--trust-domain", "example.org", "--device-id", "gw-1"])
            .args(["--max-leaf-ttl", "3600"])
            .stderr(log)
            .spawn()
            .unwrap();
        let k = Self { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&k.socket).is_err() {
            assert!(Instant::now() < deadline, "keyd did not start: {}", k.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        k
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("keyd.log")).unwrap_or_default()
    }

    /// Each line through the independent client as `uid`; the answers.
    fn as_uid(&self, uid: u32, lines: &[String]) -> Vec<String> {
        use std::os::unix::process::CommandExt as _;
        let mut c = Command::new("python3")
            .args(["-c", CLIENT])
            .arg(&self.socket)
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 (scripts/setup installs it)");
        let mut input = lines.join("\n");
        input.push('\n');
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Keyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn req(call: &str) -> String {
    format!(r#"{{"v":1,"call":{call}}}"#)
}

/// A `sign-certificate` request for `tbs` by key `id`.
fn sign_cert(id: &str, tbs: &[u8]) -> String {
    req(&format!(
        r#"{{"op":"sign-certificate","id":"{id}","tbs":"{}"}}"#,
        b64(tbs)
    ))
}

fn b64(b: &[u8]) -> String {
    Base64::encode_string(b)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A P-256 public point (SEC1, uncompressed) from a fixed scalar.
fn point(seed: u8) -> Vec<u8> {
    let sk = p256::SecretKey::from_slice(&[seed; 32]).unwrap();
    p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&sk.public_key(), false)
        .as_bytes()
        .to_vec()
}

/// Keeps what rcgen asks the issuer to sign: the TBSCertificate.
struct Capture {
    point: Vec<u8>,
    tbs: Mutex<Vec<u8>>,
}

impl rcgen::PublicKeyData for Capture {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for Capture {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        *self.tbs.lock().unwrap() = msg.to_vec();
        // A syntactically valid ECDSA signature; nobody verifies it.
        Ok(vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01])
    }
}

struct Subject(Vec<u8>);

impl rcgen::PublicKeyData for Subject {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// The TBSCertificate of a certificate for `uris` (and `ca`), valid for
/// `ttl` seconds from now, issued by `issuer_point`.
fn tbs(issuer_point: &[u8], uris: &[&str], ca: bool, ttl: u64) -> Vec<u8> {
    tbs_with(issuer_point, uris, ca, ttl, |_| {})
}

/// [`tbs`], with `f` changing the certificate first.
fn tbs_with(
    issuer_point: &[u8],
    uris: &[&str],
    ca: bool,
    ttl: u64,
    f: impl FnOnce(&mut rcgen::CertificateParams),
) -> Vec<u8> {
    let mut p = rcgen::CertificateParams::default();
    let t = |s: u64| time::OffsetDateTime::from_unix_timestamp(s as i64).unwrap();
    p.serial_number = Some(rcgen::SerialNumber::from(vec![1, 2, 3]));
    p.not_before = t(now() - 60);
    p.not_after = t(now() + ttl);
    p.is_ca = if ca {
        rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    } else {
        rcgen::IsCa::ExplicitNoCa
    };
    p.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
        .collect();
    f(&mut p);
    let key = Capture {
        point: issuer_point.to_vec(),
        tbs: Mutex::default(),
    };
    let issuer_params = rcgen::CertificateParams::default();
    let issuer = rcgen::Issuer::from_params(&issuer_params, &key);
    p.signed_by(&Subject(point(9)), &issuer).unwrap();
    drop(issuer);
    key.tbs.into_inner().unwrap()
}

/// The CertificationRequestInfo of a CSR for `point` with subject `cn`
/// (and an organisational unit with `ou`).
fn request_info(point: &[u8], cn: &str, ou: bool) -> Vec<u8> {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    if ou {
        p.distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, "admins");
    }
    let key = Capture {
        point: point.to_vec(),
        tbs: Mutex::default(),
    };
    p.serialize_request(&key).unwrap();
    key.tbs.into_inner().unwrap()
}

/// The TBSCertificate of a self-signed root of `point` (the CA's own
/// key), with `path_len` (`None`: unconstrained).
fn own_root(point: &[u8], path_len: Option<u8>) -> Vec<u8> {
    let mut p = rcgen::CertificateParams::default();
    let t = |s: u64| time::OffsetDateTime::from_unix_timestamp(s as i64).unwrap();
    p.serial_number = Some(rcgen::SerialNumber::from(vec![4, 5, 6]));
    p.not_before = t(now() - 60);
    p.not_after = t(now() + 365 * 86_400);
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "edgeward device CA gw-1");
    p.is_ca = rcgen::IsCa::Ca(match path_len {
        Some(n) => rcgen::BasicConstraints::Constrained(n),
        None => rcgen::BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = Capture {
        point: point.to_vec(),
        tbs: Mutex::default(),
    };
    let issuer = rcgen::Issuer::from_params(&p, &key);
    p.signed_by(&Subject(point.to_vec()), &issuer).unwrap();
    drop(issuer);
    key.tbs.into_inner().unwrap()
}

fn refused(answer: &str) -> bool {
    answer.contains(r#""code":"refused""#)
}

fn ok(answer: &str) -> bool {
    answer.starts_with(r#"{"ok":"#)
}

#[test]
fn root_uses_every_key_through_the_pal_client() {
    let k = Keyd::start();
    let hsm = RemoteHsm::connect(&k.socket).unwrap();
    assert_eq!(hsm.backend(), "soft");
    let p = hsm.signing_key("device-ca").unwrap();
    let digest = [5u8; 32];
    let sig = hsm.sign_digest("device-ca", &digest).unwrap();
    {
        use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
        let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&p).unwrap();
        let s = p256::ecdsa::Signature::from_der(&sig).unwrap();
        vk.verify_prehash(&digest, &s).unwrap();
    }
    hsm.aead_key("master-encryption").unwrap();
    let ct = hsm
        .encrypt("master-encryption", b"data key", b"aad")
        .unwrap();
    assert_eq!(
        hsm.decrypt("master-encryption", &ct, b"aad")
            .unwrap()
            .as_slice(),
        b"data key"
    );
    assert!(hsm.decrypt("master-encryption", &ct, b"other").is_err());
    let mut r = [0u8; 2000];
    hsm.random(&mut r).unwrap();
    assert!(r.iter().any(|b| *b != 0));
    // Root may extend and quote; the register moves as the PAL says.
    let before = hsm.read_register().unwrap();
    hsm.extend(&[1u8; 32]).unwrap();
    assert_eq!(
        hsm.read_register().unwrap(),
        edgeward_hsm::extend_chain(&before, &[1u8; 32])
    );
    hsm.attestation_key("attestation").unwrap();
    let q = hsm.quote("attestation", b"nonce").unwrap();
    assert_eq!(q.nonce, b"nonce");
    assert!(hsm.keys().unwrap().iter().any(|k| k.id == "device-ca"));
    // The key daemon's errors arrive as the PAL's.
    let e = hsm.public_key("no-such-key").unwrap_err();
    assert_eq!(e.kind, edgeward_hsm::ErrorKind::KeyNotFound, "{e}");
}

#[test]
fn the_runtime_uid_gets_its_operations_and_nothing_else() {
    let k = Keyd::start();
    let root = RemoteHsm::connect(&k.socket).unwrap();
    let ca = root.signing_key("device-ca").unwrap();
    root.attestation_key("attestation").unwrap();
    let ns = "spiffe://example.org/device/gw-1/module/";
    let leaf = tbs(&ca, &[&format!("{ns}sensor")], false, 600);
    let cases: Vec<(String, bool)> = vec![
        (req(r#"{"op":"hello"}"#), true),
        (req(r#"{"op":"signing-key","id":"device-ca"}"#), true),
        (req(r#"{"op":"signing-key","id":"cloud-client"}"#), true),
        (
            req(&format!(
                r#"{{"op":"sign-digest","id":"cloud-client","digest":"{}"}}"#,
                b64(&[1; 32])
            )),
            true,
        ),
        (req(r#"{"op":"aead-key","id":"master-encryption"}"#), true),
        (sign_cert("device-ca", &leaf), true),
        (req(r#"{"op":"read-register"}"#), true),
        // The self-signed root of the CA's own key, pathLen:0.
        (sign_cert("device-ca", &own_root(&ca, Some(0))), true),
        // A CSR for the CA's own key (enrollment), never another's, nor
        // one naming more than O and CN.
        (
            sign_cert("device-ca", &request_info(&ca, "gw-1", false)),
            true,
        ),
        (
            sign_cert("device-ca", &request_info(&point(7), "gw-1", false)),
            false,
        ),
        (
            sign_cert("device-ca", &request_info(&ca, "gw-1", true)),
            false,
        ),
        (
            sign_cert("cloud-client", &request_info(&point(7), "gw-1", false)),
            true,
        ),
        (
            sign_cert("jwt-authority", &request_info(&point(7), "gw-1", false)),
            false,
        ),
        // ...but not one that could certify CAs.
        (sign_cert("device-ca", &own_root(&ca, None)), false),
        (sign_cert("device-ca", &own_root(&ca, Some(1))), false),
        // cA=TRUE with a pathLen the parser cannot hold (2^32): read as
        // "no basicConstraints" by a lenient reader, a CA to OpenSSL.
        (
            sign_cert(
                "device-ca",
                &tbs_with(&ca, &[&format!("{ns}sensor")], false, 600, |p| {
                    p.is_ca = rcgen::IsCa::NoCa;
                    let mut bc = rcgen::CustomExtension::from_oid_content(
                        &[2, 5, 29, 19],
                        vec![0x30, 0x0a, 0x01, 0x01, 0xff, 0x02, 0x05, 0x01, 0, 0, 0, 0],
                    );
                    bc.set_criticality(true);
                    p.custom_extensions.push(bc);
                }),
            ),
            false,
        ),
        // No basicConstraints at all; code signing; an e-mail name; an
        // extension the key daemon does not read; a subject beyond O and CN.
        (
            sign_cert(
                "device-ca",
                &tbs_with(&ca, &[&format!("{ns}sensor")], false, 600, |p| {
                    p.is_ca = rcgen::IsCa::NoCa;
                }),
            ),
            false,
        ),
        (
            sign_cert(
                "device-ca",
                &tbs_with(&ca, &[&format!("{ns}sensor")], false, 600, |p| {
                    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
                }),
            ),
            false,
        ),
        (
            sign_cert(
                "device-ca",
                &tbs_with(&ca, &[&format!("{ns}sensor")], false, 600, |p| {
                    p.subject_alt_names.push(rcgen::SanType::Rfc822Name(
                        "ceo@example.org".try_into().unwrap(),
                    ));
                }),
            ),
            false,
        ),
        (
            sign_cert(
                "device-ca",
                &tbs_with(&ca, &[&format!("{ns}sensor")], false, 600, |p| {
                    p.custom_extensions
                        .push(rcgen::CustomExtension::from_oid_content(
                            &[1, 3, 6, 1, 4, 1, 99999, 1],
                            vec![0x05, 0x00],
                        ));
                }),
            ),
            false,
        ),
        (
            sign_cert(
                "device-ca",
                &tbs_with(&ca, &[&format!("{ns}sensor")], false, 600, |p| {
                    p.distinguished_name
                        .push(rcgen::DnType::OrganizationalUnitName, "admins");
                }),
            ),
            false,
        ),
        (
            sign_cert("device-ca", &tbs(&ca, &[&format!("{ns}..")], false, 600)),
            false,
        ),
        (
            req(r#"{"op":"measure","events":[{"kind":"module","name":"sensor"}]}"#),
            true,
        ),
        // The launcher's own events and the baseline are the key daemon's:
        // the runtime cannot pose as its launcher in the log.
        (
            req(r#"{"op":"measure","events":[{"kind":"key-daemon","sha256":"x"}]}"#),
            false,
        ),
        (
            req(r#"{"op":"measure","events":[{"kind":"baseline"}]}"#),
            false,
        ),
        (
            req(r#"{"op":"measure","events":[{"kind":"runtime-exit"}]}"#),
            false,
        ),
        (
            req(
                r#"{"op":"measure","events":[{"kind":"module"},{"kind":"executable","launched_by":"key-daemon"}]}"#,
            ),
            false,
        ),
        (
            req(&format!(
                r#"{{"op":"evidence","nonce":"{}"}}"#,
                b64(b"nonce")
            )),
            true,
        ),
        // A raw signature with the device CA would certify anything.
        (
            req(&format!(
                r#"{{"op":"sign-digest","id":"device-ca","digest":"{}"}}"#,
                b64(&[1; 32])
            )),
            false,
        ),
        (
            req(&format!(
                r#"{{"op":"sign-digest","id":"attestation","digest":"{}"}}"#,
                b64(&[1; 32])
            )),
            false,
        ),
        // A CA certificate, a SPIFFE ID outside this device's modules, a
        // module of another device, no SPIFFE ID, a lifetime past the cap,
        // garbage instead of a TBSCertificate.
        (
            sign_cert("device-ca", &tbs(&ca, &[&format!("{ns}sensor")], true, 600)),
            false,
        ),
        (
            sign_cert(
                "device-ca",
                &tbs(&ca, &["spiffe://example.org/device/gw-1"], false, 600),
            ),
            false,
        ),
        (
            sign_cert(
                "device-ca",
                &tbs(
                    &ca,
                    &["spiffe://example.org/device/gw-2/module/sensor"],
                    false,
                    600,
                ),
            ),
            false,
        ),
        (
            sign_cert(
                "device-ca",
                &tbs(&ca, &[&format!("{ns}a/../../x")], false, 600),
            ),
            false,
        ),
        (sign_cert("device-ca", &tbs(&ca, &[], false, 600)), false),
        (
            sign_cert(
                "device-ca",
                &tbs(&ca, &[&format!("{ns}sensor")], false, 30 * 86_400),
            ),
            false,
        ),
        (sign_cert("device-ca", b"not a certificate"), false),
        (sign_cert("jwt-authority", &tbs(&ca, &[], true, 600)), false),
        (
            req(&format!(
                r#"{{"op":"extend","digests":["{}"]}}"#,
                b64(&[2; 32])
            )),
            false,
        ),
        (
            req(&format!(
                r#"{{"op":"quote","key":"attestation","nonce":"{}"}}"#,
                b64(b"n")
            )),
            false,
        ),
        // Enrollment's TPM calls are for the attestation key and the
        // device CA and broker keys only.
        (req(r#"{"op":"attestation-key","id":"other"}"#), false),
        (
            req(&format!(
                r#"{{"op":"certify","key":"jwt-authority","ak":"attestation","nonce":"{}"}}"#,
                b64(b"n")
            )),
            false,
        ),
        // Not the broker key: one template with the device CA key, so a
        // certification of it could pass for the device CA's.
        (
            req(&format!(
                r#"{{"op":"certify","key":"cloud-client","ak":"attestation","nonce":"{}"}}"#,
                b64(b"n")
            )),
            false,
        ),
        (
            req(&format!(
                r#"{{"op":"certify","key":"device-ca","ak":"other","nonce":"{}"}}"#,
                b64(b"n")
            )),
            false,
        ),
        (
            req(&format!(
                r#"{{"op":"activate-credential","id":"other","id_object":"{0}","secret":"{0}"}}"#,
                b64(b"x")
            )),
            false,
        ),
        (req(r#"{"op":"destroy-key","id":"device-ca"}"#), false),
        (req(r#"{"op":"signing-key","id":"other"}"#), false),
        (req(r#"{"op":"aead-key","id":"someone-elses"}"#), false),
    ];
    // ...which pass the table (this key daemon's soft backend then
    // answers that it has no TPM: not a refusal).
    let enrollment = [
        req(r#"{"op":"attestation-key","id":"attestation"}"#),
        req(&format!(
            r#"{{"op":"certify","key":"device-ca","ak":"attestation","nonce":"{}"}}"#,
            b64(b"n")
        )),
        req(&format!(
            r#"{{"op":"activate-credential","id":"attestation","id_object":"{0}","secret":"{0}"}}"#,
            b64(b"x")
        )),
    ];
    for (line, answer) in enrollment.iter().zip(k.as_uid(RUNTIME_UID, &enrollment)) {
        assert!(!refused(&answer), "{line}\n-> {answer}");
    }
    let lines: Vec<String> = cases.iter().map(|(l, _)| l.clone()).collect();
    let answers = k.as_uid(RUNTIME_UID, &lines);
    assert_eq!(answers.len(), cases.len(), "{answers:?}");
    for ((line, allowed), answer) in cases.iter().zip(&answers) {
        if *allowed {
            assert!(ok(answer), "{line}\n-> {answer}");
        } else {
            assert!(refused(answer), "{line}\n-> {answer}");
        }
    }
    // The register did not move for the refused extend.
    let before = root.read_register().unwrap();
    k.as_uid(
        RUNTIME_UID,
        &[req(&format!(
            r#"{{"op":"extend","digests":["{}"]}}"#,
            b64(&[3; 32])
        ))],
    );
    assert_eq!(root.read_register().unwrap(), before);
    // A stranger: nothing, not even hello.
    let answers = k.as_uid(STRANGER_UID, &[req(r#"{"op":"hello"}"#)]);
    assert!(refused(&answers[0]), "{answers:?}");
    assert!(answers[0].contains("principal table"), "{answers:?}");
}

#[test]
fn bad_frames_are_refused_and_the_daemon_keeps_serving() {
    let k = Keyd::start();
    let huge = format!("RAW {:08x}", edgeward_proto::MAX_FRAME + 1);
    let truncated = format!("RAW {:08x}7b2276223a", 100);
    let lines = vec![
        huge,
        truncated,
        "RAW 00".to_owned(),
        "not json".to_owned(),
        req(r#"{"op":"format-disk"}"#),
        r#"{"v":2,"call":{"op":"hello"}}"#.to_owned(),
        req(r#"{"op":"hello","extra":1}"#),
        req(r#"{"op":"sign-digest","id":"cloud-client","digest":"%%%"}"#),
        req(&format!(
            r#"{{"op":"sign-digest","id":"cloud-client","digest":"{}"}}"#,
            b64(&[1; 31])
        )),
        req(r#"{"op":"random","len":4294967295}"#),
        req(r#"{"op":"measure","events":[1]}"#),
        req(r#"{"op":"measure","events":[]}"#),
        req(r#"{"op":"signing-key","id":"../../etc/passwd"}"#),
    ];
    let answers = k.as_uid(RUNTIME_UID, &lines);
    assert_eq!(answers.len(), lines.len(), "{answers:?}");
    let expect = [
        "over the",
        "inside a frame",
        "inside a frame",
        "malformed frame",
        "unknown variant",
        "protocol version 2",
        "unknown field",
        "base64",
        "31 bytes",
        "at most 1024",
        "an object with a `kind`",
        "0 events",
        "refused",
    ];
    for ((line, answer), want) in lines.iter().zip(&answers).zip(expect) {
        assert!(
            answer.contains(want),
            "{line}\n-> {answer}\n(want {want:?})"
        );
    }
    // Still serving.
    let answers = k.as_uid(RUNTIME_UID, &[req(r#"{"op":"hello"}"#)]);
    assert!(ok(&answers[0]), "{answers:?}");
}

#[test]
fn a_flood_of_refusals_is_logged_briefly_and_escaped() {
    let k = Keyd::start();
    // A key id made to forge a log line.
    let forged = req(r#"{"op":"signing-key","id":"x\nINFO key daemon ready forged"}"#);
    let mut lines = vec![forged];
    lines.extend(std::iter::repeat_n(
        req(r#"{"op":"extend","digests":[]}"#),
        300,
    ));
    let started = Instant::now();
    let answers = k.as_uid(RUNTIME_UID, &lines);
    let took = started.elapsed();
    assert_eq!(answers.len(), lines.len());
    assert!(answers.iter().all(|a| refused(a)), "{:?}", &answers[..3]);
    println!("300 refusals in {took:?}");
    let answers = k.as_uid(RUNTIME_UID, &[req(r#"{"op":"hello"}"#)]);
    assert!(ok(&answers[0]), "{answers:?}");
    let log = k.log();
    let refusals = log.lines().filter(|l| l.contains("refused")).count();
    assert!(
        (1..=20).contains(&refusals),
        "{refusals} refusal lines logged"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("INFO key daemon ready forged")),
        "{log}"
    );
    assert!(!log.contains("\nINFO key daemon ready forged"), "{log}");
}

#[test]
fn bad_arguments_are_named() {
    // Each case: the arguments after a valid state, socket and device.
    let base = [
        "--state",
        "/tmp/x",
        "--socket",
        "/tmp/y",
        "--device-id",
        "gw",
    ];
    let with =
        |rest: &[&'static str]| -> Vec<&'static str> { base.iter().chain(rest).copied().collect() };
    for (args, want) in [
        (vec!["--socket", "/tmp/x"], "--state is required"),
        (with(&["--runtime-uid", "0"]), "root is a principal"),
        (with(&["--hsm", "floppy"]), "soft, tpm or pkcs11"),
        (with(&["--device-id", "a/b"]), "--device-id"),
        (vec!["--frobnicate"], "unknown argument"),
        (with(&["--runtime-uid", "65534"]), "overflow (nobody)"),
        (
            with(&["--", "daemon"]),
            "arguments after -- are for --launch",
        ),
        (
            with(&["--runtime-gid", "5"]),
            "it needs --launch and --runtime-uid",
        ),
        (with(&["--runtime-gid", "0"]), "no root group"),
        (
            with(&["--launch", "/usr/bin/edgeward"]),
            "the runtime never runs as root",
        ),
        (
            with(&["--runtime-uid", "64999", "--launch", "/usr/bin/edgeward"]),
            "give --runtime-gid",
        ),
    ] {
        let o = Command::new(KEYD).args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// Run as a user of its own, the key daemon's user may do what root may
/// (it can read the key files anyway); the runtime's uid and strangers
/// still may not.
#[test]
fn the_key_daemons_own_user_may_do_everything() {
    use std::os::unix::process::CommandExt as _;
    const OWNER: u32 = 64997;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    rustix::fs::chown(
        dir.path(),
        Some(rustix::fs::Uid::from_raw(OWNER)),
        Some(rustix::fs::Gid::from_raw(OWNER)),
    )
    .unwrap();
    let socket = dir.path().join("keyd.sock");
    let log = std::fs::File::create(dir.path().join("keyd.log")).unwrap();
    let child = Command::new(KEYD)
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&socket)
        .args(["--runtime-uid", &RUNTIME_UID.to_string()])
        .args(["--device-id", "gw-1"])
        .uid(OWNER)
        .gid(OWNER)
        .stderr(log)
        .spawn()
        .unwrap();
    let k = Keyd { child, dir, socket };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&k.socket).is_err() {
        assert!(Instant::now() < deadline, "keyd did not start: {}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let ask = [req(r#"{"op":"attestation-key","id":"operator-ak"}"#)];
    let a = k.as_uid(OWNER, &ask);
    assert!(ok(&a[0]), "{a:?}");
    for uid in [RUNTIME_UID, STRANGER_UID] {
        let a = k.as_uid(uid, &ask);
        assert!(refused(&a[0]), "{uid}: {a:?}");
    }
}

#[test]
fn a_socket_answered_by_another_user_is_not_the_key_daemon() {
    // What a compromised runtime could put at the path, over a directory
    // it can write: root's client refuses to talk to it.
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let socket = dir.path().join("keyd.sock");
    let mut fake = Command::new("python3")
        .args([
            "-c",
            "import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen()\ntime.sleep(30)",
        ])
        .arg(&socket)
        .uid(RUNTIME_UID)
        .gid(RUNTIME_UID)
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the fake did not bind");
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = RemoteHsm::connect(&socket).unwrap_err();
    assert!(
        e.to_string().contains(&format!(
            "answered by uid {RUNTIME_UID}, neither root nor this user"
        )),
        "{e}"
    );
    let _ = fake.kill();
    let _ = fake.wait();
    // And the key daemon itself will not put its socket in such a
    // directory.
    let o = Command::new(KEYD)
        .args(["--state"])
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("other.sock"))
        .args(["--device-id", "gw-1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("writable by no one else"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A flood of connections from the runtime's uid: at most
/// `MAX_CONNECTIONS` are served at once (one more is closed unanswered),
/// root is still served meanwhile, connections that send nothing are
/// closed after the idle deadline, and the daemon serves again after.
#[test]
fn a_connection_flood_is_capped_idle_ones_are_closed_and_root_is_served() {
    use std::io::{BufRead as _, BufReader};
    use std::os::unix::process::CommandExt as _;
    const FLOOD: &str = r#"
import socket, struct, sys, time
path, n = sys.argv[1], int(sys.argv[2])
held = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    held.append(s)
time.sleep(0.5)
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(path)
body = b'{"v":1,"call":{"op":"hello"}}'
try:
    s.sendall(struct.pack(">I", len(body)) + body)
except OSError:
    pass
try:
    got = s.recv(4)
except OSError:
    got = b""
print("EXTRA", "CLOSED" if not got else "ANSWERED", flush=True)
sys.stdin.readline()
t = time.time()
closed = 0
for h in held:
    h.settimeout(30)
    try:
        r = h.recv(4)
    except OSError:
        r = b""
    closed += r == b""
print("IDLE-CLOSED", closed, round(time.time() - t, 1), flush=True)
"#;
    let k = Keyd::start();
    let max = edgeward_keyd::server::MAX_CONNECTIONS;
    let mut flood = Command::new("python3")
        .args(["-c", FLOOD])
        .arg(&k.socket)
        .arg(max.to_string())
        .uid(RUNTIME_UID)
        .gid(RUNTIME_UID)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(flood.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "EXTRA CLOSED", "one over the cap was served");
    // Root does not wait behind them.
    let t = Instant::now();
    let root = RemoteHsm::connect(&k.socket).expect("root connects");
    root.signing_key("device-ca").expect("root is served");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // The idle ones are closed by the deadline.
    flood.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f[..2], ["IDLE-CLOSED", &max.to_string()], "{line}");
    let waited: f64 = f[2].parse().unwrap();
    assert!(
        waited <= edgeward_keyd::server::IDLE.as_secs_f64() + 2.0,
        "{line}"
    );
    assert!(flood.wait().unwrap().success());
    // And it serves the runtime again.
    let answers = k.as_uid(RUNTIME_UID, &[req(r#"{"op":"hello"}"#)]);
    assert!(ok(&answers[0]), "{answers:?}");
    assert!(k.log().contains("too many connections"), "{}", k.log());
}
