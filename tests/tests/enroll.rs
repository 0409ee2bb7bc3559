//! Zero-touch enrollment on real TPM simulators (swtpm with EK
//! certificates from a local manufacturer CA): a device proves its device
//! CA key lives in its TPM and the organisation's service certifies it;
//! every way of cheating is refused at its step, and nothing is issued or
//! recorded then.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use edgeward::enroll::service::{
    List, Refusal, Service, Settings, Step, audit_entries, factory_fingerprint, fingerprint,
};
use edgeward::enroll::{self, Bytes, Proof, Request};
use edgeward::hsm::Hsm;
use edgeward::hsm::soft::SoftHsm;
use edgeward_hsm_hw::tpm::TpmHsm;
use edgeward_tests::fixtures::Swtpm;

/// A device: a TPM with an EK certificate, its manufacturer's CA bundle,
/// and the HSM over it.
struct Device {
    _tpm: Swtpm,
    _state: tempfile::TempDir,
    manufacturer: std::path::PathBuf,
    hsm: Arc<dyn Hsm>,
}

impl Device {
    fn new() -> Self {
        let (tpm, manufacturer) = Swtpm::start_with_ek_certificate();
        let state = tempfile::tempdir().unwrap();
        let hsm: Arc<dyn Hsm> = Arc::new(TpmHsm::open(state.path(), tpm.config()).unwrap());
        Self {
            _tpm: tpm,
            _state: state,
            manufacturer,
            hsm,
        }
    }

    fn ek_fingerprint(&self) -> String {
        factory_fingerprint(&self.hsm.endorsement_certificate().unwrap().unwrap()).unwrap()
    }

    fn request(&self, id: &str) -> Request {
        enroll::request(&self.hsm, id, "example.org").unwrap()
    }
}

/// The organisation: its CA (openssl), a challenge key, an audit log.
struct Org {
    dir: tempfile::TempDir,
    challenge_key: [u8; 32],
}

impl Org {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("openssl")
            .current_dir(dir.path())
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key"])
            .args([
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/O=example/CN=workloads",
            ])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut challenge_key = [0u8; 32];
        getrandom::fill(&mut challenge_key).unwrap();
        Self { dir, challenge_key }
    }

    fn audit(&self) -> std::path::PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// A service trusting `manufacturers` (PEM bundles), with `list`.
    fn service(&self, manufacturers: &[&Path], list: &str, revoked: &[String]) -> Service {
        self.service_for(manufacturers, list, revoked, Duration::from_secs(300))
    }

    /// The same, its challenges lasting `ttl`.
    fn service_for(
        &self,
        manufacturers: &[&Path],
        list: &str,
        revoked: &[String],
        ttl: Duration,
    ) -> Service {
        let ca_pem = std::fs::read_to_string(self.dir.path().join("ca.pem")).unwrap();
        let mut roots = Vec::new();
        for m in manufacturers {
            roots.extend(
                edgeward::attest::verify::pem_certificates(&std::fs::read(m).unwrap(), "ca")
                    .unwrap(),
            );
        }
        let ca_der = edgeward::attest::verify::pem_certificates(ca_pem.as_bytes(), "ca")
            .unwrap()
            .remove(0);
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        Service::new(Settings {
            manufacturers: roots,
            revoked: revoked.iter().cloned().collect::<BTreeSet<_>>(),
            revoked_file: None,
            ca_not_after: u64::try_from(ca.validity().not_after.timestamp()).unwrap(),
            list: List::parse(list).unwrap(),
            ca_certificate: ca_der.clone(),
            ca_chain: ca_pem,
            ca_key: edgeward::enroll::service::CaKey::from_pem(
                &std::fs::read_to_string(self.dir.path().join("ca.key")).unwrap(),
            )
            .unwrap(),
            trust_domain: "example.org".into(),
            dns_suffix: "edge.example.org".into(),
            lifetime: Duration::from_secs(30 * 86_400),
            challenge_ttl: ttl,
            challenge_key: self.challenge_key,
            group_secrets: [("boards".to_owned(), [9u8; 32])].into(),
            audit: self.audit(),
            fleet: None,
        })
    }
}

fn individual(fp: &str, id: &str) -> String {
    format!("[[device]]\nfactory = \"{fp}\"\ndevice_id = \"{id}\"\ngroups = [\"line-a\"]\n")
}

/// The whole exchange for `request`.
fn enroll_with(
    service: &Service,
    hsm: &dyn Hsm,
    request: &Request,
) -> Result<edgeward::enroll::Issued, Refusal> {
    let challenge = service.challenge(request)?;
    let proof = enroll::prove(hsm, request, &challenge).unwrap();
    service.complete(&proof)
}

fn refused_at(r: Result<impl std::fmt::Debug, Refusal>, step: Step, says: &str) {
    let e = r.expect_err("enrolled");
    assert_eq!(e.step, step, "{e}");
    assert!(e.reason.contains(says), "{e}");
}

fn openssl_text(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_tpm_device_enrolls_and_openssl_verifies_its_device_ca() {
    let d = Device::new();
    let org = Org::new();
    let service = org.service(
        &[&d.manufacturer],
        &individual(&d.ek_fingerprint(), "dev-1"),
        &[],
    );
    let request = d.request("dev-1");
    let challenge = service.challenge(&request).unwrap();
    let proof = enroll::prove(d.hsm.as_ref(), &request, &challenge).unwrap();
    // Through the wire format and back, as the broker carries it.
    let proof: Proof = enroll::parse(&serde_json::to_vec(&proof).unwrap(), "proof").unwrap();
    let issued = service.complete(&proof).unwrap();
    assert_eq!(issued.device_id, "dev-1");
    assert_eq!(issued.groups, ["line-a"]);

    // openssl: the chain verifies to the organisation's CA, for the HSM's
    // device CA key, a CA that may issue only end-entity certificates.
    let dir = tempfile::tempdir().unwrap();
    let chain = dir.path().join("chain.pem");
    std::fs::write(&chain, &issued.chain).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(org.dir.path().join("ca.pem"))
        .arg(&chain)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = openssl_text(&chain);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(
        text.contains("URI:spiffe://example.org/device/dev-1"),
        "{text}"
    );
    assert!(text.contains("CN = dev-1"), "{text}");
    let point = d.hsm.public_key("device-ca").unwrap();
    let pub_hex: String = point.iter().map(|b| format!("{b:02x}:")).collect();
    let listed: String = text
        .split("pub:")
        .nth(1)
        .unwrap()
        .split("ASN1 OID")
        .next()
        .unwrap()
        .chars()
        .filter(|c| c.is_ascii_hexdigit() || *c == ':')
        .collect();
    assert!(pub_hex.starts_with(&listed), "{listed} vs {pub_hex}");

    assert!(text.contains("Permitted:\n                  URI:example.org\n                  DNS:dev-1.edge.example.org"), "{text}");
    // The device's identity takes the chain as its device CA.
    let state = tempfile::tempdir().unwrap();
    edgeward::identity::authority::Authority::open(
        d.hsm.clone(),
        "dev-1",
        "example.org",
        Some(&chain),
        state.path(),
    )
    .unwrap();

    // The device keeps an answer only if it leads to the root it pins:
    // another organisation (or whoever answers on the broker) certifying
    // the same key under its own root is refused.
    let pinned = edgeward::attest::verify::pem_certificates(
        &std::fs::read(org.dir.path().join("ca.pem")).unwrap(),
        "root",
    )
    .unwrap();
    enroll::check_issued(d.hsm.as_ref(), &issued, "dev-1", "example.org", &pinned).unwrap();
    let rogue = Org::new();
    let rogue_service = rogue.service(
        &[&d.manufacturer],
        &individual(&d.ek_fingerprint(), "dev-1"),
        &[],
    );
    let forged = enroll_with(&rogue_service, d.hsm.as_ref(), &d.request("dev-1")).unwrap();
    let e =
        enroll::check_issued(d.hsm.as_ref(), &forged, "dev-1", "example.org", &pinned).unwrap_err();
    assert!(
        e.contains("does not lead to the organisation's root"),
        "{e}"
    );
    let e =
        enroll::check_issued(d.hsm.as_ref(), &issued, "dev-2", "example.org", &pinned).unwrap_err();
    assert!(e.contains("not the \"dev-2\""), "{e}");
    let e =
        enroll::check_issued(d.hsm.as_ref(), &issued, "dev-1", "other.org", &pinned).unwrap_err();
    assert!(e.contains("does not name spiffe://other.org"), "{e}");

    // Recorded: who, from which factory identity.
    let audit = audit_entries(&org.audit()).unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].device_id, "dev-1");
    assert_eq!(audit[0].factory, d.ek_fingerprint());

    // The same proof again: a replay, refused, nothing more recorded.
    refused_at(service.complete(&proof), Step::Challenge, "already used");
    assert_eq!(audit_entries(&org.audit()).unwrap().len(), 1);
    // The device asks again (its answer was lost, or it was reset with
    // its keys kept): a fresh exchange, and the recorded chain again, not
    // a second certificate.
    let again = enroll_with(&service, d.hsm.as_ref(), &d.request("dev-1")).unwrap();
    assert_eq!(again.chain, issued.chain);
    assert_eq!(audit_entries(&org.audit()).unwrap().len(), 1);
    // The certificate does not outlive the organisation CA (two days),
    // though the service's lifetime is thirty.
    assert!(text.contains("Not After"), "{text}");
    let leaf_der =
        edgeward::attest::verify::pem_certificates(issued.chain.as_bytes(), "chain").unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der[0]).unwrap();
    let days =
        (leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp()) / 86_400;
    assert!(days <= 2, "{days} days");
    // A crash mid-append leaves a torn last line: skipped, and the next
    // enrollment starts a new one.
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(org.audit())
        .unwrap()
        .write_all(b"{\"time\":17")
        .unwrap();
    assert_eq!(audit_entries(&org.audit()).unwrap().len(), 1);
}

#[test]
fn each_way_of_cheating_is_refused_at_its_step() {
    let a = Device::new();
    let b = Device::new();
    let org = Org::new();
    let fp_a = a.ek_fingerprint();
    let list = individual(&fp_a, "dev-a");
    let service = org.service(&[&a.manufacturer], &list, &[]);
    let request = a.request("dev-a");

    // An untrusted manufacturer; a revoked certificate or manufacturer; an
    // EK the list does not name.
    let other_root = org.service(&[&b.manufacturer], &list, &[]);
    refused_at(
        other_root.challenge(&request),
        Step::FactoryChain,
        "not issued by a trusted",
    );
    let revoked = org.service(&[&a.manufacturer], &list, std::slice::from_ref(&fp_a));
    refused_at(revoked.challenge(&request), Step::Revoked, "is revoked");
    let bundle = std::fs::read(&a.manufacturer).unwrap();
    let issuers: Vec<String> = edgeward::attest::verify::pem_certificates(&bundle, "ca")
        .unwrap()
        .iter()
        .map(|c| fingerprint(c))
        .collect();
    let revoked = org.service(&[&a.manufacturer], &list, &issuers);
    refused_at(
        revoked.challenge(&request),
        Step::Revoked,
        "a manufacturer CA of its chain",
    );
    // The same EK certificate with a byte appended (another fingerprint
    // of the certificate, the same key): refused, not a new device.
    let mut padded = request.clone();
    let enroll::Factory::Tpm { ek_certificate, .. } = &mut padded.factory else {
        panic!("a TPM's request")
    };
    ek_certificate.0.push(0);
    refused_at(service.challenge(&padded), Step::Request, "trailing bytes");
    let unlisted = org.service(
        &[&a.manufacturer],
        &individual(&b.ek_fingerprint(), "dev-a"),
        &[],
    );
    refused_at(
        unlisted.challenge(&request),
        Step::EnrollmentList,
        "nor its manufacturer CA",
    );

    // A's EK certificate with B's attestation key: the challenge is made
    // for them together, and neither TPM can open it.
    let mut mixed = request.clone();
    let (
        enroll::Factory::Tpm { ak_public, .. },
        enroll::Factory::Tpm {
            ak_public: b_ak, ..
        },
    ) = (&mut mixed.factory, &b.request("dev-a").factory)
    else {
        panic!("TPMs' requests")
    };
    *ak_public = b_ak.clone();
    let challenge = service.challenge(&mixed).unwrap();
    let e = enroll::prove(b.hsm.as_ref(), &mixed, &challenge).unwrap_err();
    assert!(e.contains("cannot open"), "{e}");
    // ...and a guessed secret with B's genuine certification is refused.
    let c = b
        .hsm
        .certify("device-ca", "attestation", &challenge.nonce.0)
        .unwrap();
    let forged = Proof {
        v: enroll::VERSION,
        request: mixed.clone(),
        challenge: challenge.clone(),
        activated: Bytes(vec![0; 32]),
        certify_message: Bytes(c.message),
        certify_signature: Bytes(c.signature),
        certified_public: Bytes(c.public),
    };
    refused_at(
        service.complete(&forged),
        Step::Activation,
        "not in the TPM",
    );

    // A CSR for a key that is not the certified one (a soft key).
    let soft_dir = tempfile::tempdir().unwrap();
    let soft: Arc<dyn Hsm> = Arc::new(SoftHsm::open(soft_dir.path()).unwrap());
    let mut other_csr = request.clone();
    other_csr.csr = edgeward::identity::authority::device_ca_csr(
        &soft,
        "dev-a",
        "spiffe://example.org/device/dev-a",
    )
    .unwrap();
    refused_at(
        enroll_with(&service, a.hsm.as_ref(), &other_csr),
        Step::Csr,
        "another key",
    );

    // Another device's id.
    refused_at(
        enroll_with(&service, a.hsm.as_ref(), &a.request("dev-b")),
        Step::DeviceId,
        "assigns \"dev-a\"",
    );

    // Challenges: forged, for another request, expired.
    let challenge = service.challenge(&request).unwrap();
    let good = enroll::prove(a.hsm.as_ref(), &request, &challenge).unwrap();
    let mut forged = good.clone();
    forged.challenge.expires += 3600;
    refused_at(
        service.complete(&forged),
        Step::Challenge,
        "not made by this service",
    );
    let mut other = good.clone();
    other.request.csr = other_csr.csr.clone();
    refused_at(service.complete(&other), Step::Challenge, "another request");
    // A challenge from an instance whose challenges last no time at all,
    // answered a second later.
    let hasty = org.service_for(&[&a.manufacturer], &list, &[], Duration::ZERO);
    let challenge = hasty.challenge(&request).unwrap();
    let late = enroll::prove(a.hsm.as_ref(), &request, &challenge).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    refused_at(hasty.complete(&late), Step::Challenge, "expired");
    // Nothing of all that was recorded.
    assert!(audit_entries(&org.audit()).unwrap().is_empty());
    // The genuine proof still enrolls.
    service.complete(&good).unwrap();

    // A second device the list (wrongly) assigns the same id: the audit
    // log knows who holds it.
    let both = format!("{list}{}", individual(&b.ek_fingerprint(), "dev-a"));
    let service = org.service(&[&a.manufacturer, &b.manufacturer], &both, &[]);
    refused_at(
        enroll_with(&service, b.hsm.as_ref(), &b.request("dev-a")),
        Step::DeviceId,
        "held by another device",
    );
    assert_eq!(audit_entries(&org.audit()).unwrap().len(), 1);
}

#[test]
fn group_entries_admit_a_manufacturers_devices_by_id_pattern() {
    let d = Device::new();
    let org = Org::new();
    let bundle = std::fs::read(&d.manufacturer).unwrap();
    // The bundle is the issuing CA, then its root: the entry names the
    // issuer.
    let issuer =
        fingerprint(&edgeward::attest::verify::pem_certificates(&bundle, "ca").unwrap()[0]);
    let list = format!(
        "[[group]]\nmanufacturer = \"{issuer}\"\ndevice_id = \"sensor-*\"\ngroups = [\"sensors\"]\n"
    );
    // An individual entry reserves sensor-9 for another device.
    let list = format!(
        "{list}{}",
        individual(&format!("sha256:{}", "ab".repeat(32)), "sensor-9")
    );
    let service = org.service(&[&d.manufacturer], &list, &[]);
    refused_at(
        service.challenge(&d.request("pump-1")),
        Step::EnrollmentList,
        "do not admit",
    );
    refused_at(
        service.challenge(&d.request("sensor-")),
        Step::EnrollmentList,
        "do not admit",
    );
    refused_at(
        service.challenge(&d.request("sensor-9")),
        Step::EnrollmentList,
        "reserved for another device",
    );
    let issued = enroll_with(&service, d.hsm.as_ref(), &d.request("sensor-17")).unwrap();
    assert_eq!(issued.device_id, "sensor-17");
    assert_eq!(issued.groups, ["sensors"]);
    // One TPM, one id: the pattern does not let it collect more.
    refused_at(
        enroll_with(&service, d.hsm.as_ref(), &d.request("sensor-18")),
        Step::DeviceId,
        "one device, one id",
    );
    // A group entry naming the manufacturer's root matches too: every
    // certificate of the chain is the manufacturer's.
    let root = fingerprint(&edgeward::attest::verify::pem_certificates(&bundle, "ca").unwrap()[1]);
    let by_root = format!("[[group]]\nmanufacturer = \"{root}\"\ndevice_id = \"sensor-*\"\n");
    let service = org.service(&[&d.manufacturer], &by_root, &[]);
    service.challenge(&d.request("sensor-17")).unwrap();
}

#[test]
fn malformed_messages_and_lists_are_named() {
    let e = enroll::parse::<Request>(b"{\"v\":1,\"device_id\":\"d\",\"csr\":\"\",\"factory\":{\"kind\":\"tpm\",\"ek_certificate\":\"\",\"ak_public\":\"\"},\"extra\":1}", "request").unwrap_err();
    assert!(e.contains("unknown field"), "{e}");
    let e = enroll::parse::<Request>(&vec![b' '; enroll::MAX_MESSAGE + 1], "request").unwrap_err();
    assert!(e.contains("more than"), "{e}");
    let e = enroll::parse::<Request>(
        b"{\"v\":1,\"device_id\":\"d\",\"csr\":\"\",\"factory\":{\"kind\":\"psk\"}}",
        "request",
    )
    .unwrap_err();
    assert!(e.contains("psk"), "{e}");
    for (list, says) in [
        (
            "[[device]]\nfactory = \"md5:00\"\ndevice_id = \"d\"\n",
            "sha256:<64",
        ),
        (
            &format!(
                "[[device]]\nfactory = \"sha256:{}\"\ndevice_id = \"../x\"\n",
                "0".repeat(64)
            ) as &str,
            "not a valid id",
        ),
        (
            &format!(
                "[[group]]\nmanufacturer = \"sha256:{}\"\ndevice_id = \"a*b*\"\n",
                "0".repeat(64)
            ),
            "at most one",
        ),
        ("[[device]]\nfactory = 1\n", "enrollment list"),
        ("[[robot]]\n", "unknown field"),
    ] {
        let e = List::parse(list).unwrap_err();
        assert!(e.contains(says), "{list}: {e}");
    }
}

/// The operator's side through the binary: `fleet enroll check` loads the
/// whole configuration and names what is wrong with it; `list` shows the
/// audit log; `revoke --device` refuses that factory identity from then on.
#[test]
fn the_operator_checks_lists_and_revokes_through_the_cli() {
    use edgeward::enroll::service::Settings;
    let d = Device::new();
    let org = Org::new();
    let dir = org.dir.path();
    std::fs::write(
        dir.join("list.toml"),
        individual(&d.ek_fingerprint(), "dev-1"),
    )
    .unwrap();
    std::fs::write(dir.join("challenge.key"), [7u8; 32]).unwrap();
    let toml = format!(
        "trust_domain = \"example.org\"\ndns_suffix = \"edge.example.org\"\nlifetime = \"30d\"\n\
         manufacturers = \"{}\"\nlist = \"list.toml\"\nrevoked = \"revoked.txt\"\n\
         ca_certificate = \"ca.pem\"\nca_key = \"ca.key\"\nchallenge_key = \"challenge.key\"\n\
         audit = \"audit.jsonl\"\n",
        d.manufacturer.display()
    );
    let conf = dir.join("enroll.toml");
    std::fs::write(&conf, &toml).unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(common::EDGEWARD)
            .args(["fleet", "enroll", "--service"])
            .arg(&conf)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = cli(&["check"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("1 individual and 0 group entries, 0 revoked"),
        "{out}"
    );

    let service = Service::new(Settings::load(&conf).unwrap());
    enroll_with(&service, d.hsm.as_ref(), &d.request("dev-1")).unwrap();
    let (ok, out) = cli(&["list"]);
    assert!(
        ok && out.contains("dev-1") && out.contains(&d.ek_fingerprint()),
        "{out}"
    );
    assert!(!out.contains("REVOKED"), "{out}");
    let (ok, out) = cli(&["list", "--json"]);
    assert!(ok, "{out}");
    let entry: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(entry["device_id"], "dev-1");

    let running = Service::new(Settings::load(&conf).unwrap());
    running.challenge(&d.request("dev-1")).unwrap();
    let (ok, out) = cli(&["revoke", "--device", "dev-1"]);
    assert!(ok && out.contains("revoked"), "{out}");
    // A running service reads the list again for every message.
    refused_at(
        running.challenge(&d.request("dev-1")),
        Step::Revoked,
        "is revoked",
    );
    let (ok, out) = cli(&["revoke", "--device", "dev-1"]);
    assert!(ok && out.contains("already revoked"), "{out}");
    let (ok, out) = cli(&["revoke", "--device", "nobody"]);
    assert!(!ok && out.contains("no enrollment of \"nobody\""), "{out}");
    let (ok, out) = cli(&["revoke", "--factory", "sha256:beef"]);
    assert!(!ok && out.contains("sha256:<64"), "{out}");
    let (ok, out) = cli(&["list"]);
    assert!(ok && out.contains("REVOKED"), "{out}");
    // The service, loaded again, refuses that TPM.
    let service = Service::new(Settings::load(&conf).unwrap());
    refused_at(
        service.challenge(&d.request("dev-1")),
        Step::Revoked,
        "is revoked",
    );

    // What is wrong with a configuration is named.
    for (file, bytes, says) in [
        ("challenge.key", &b"short"[..], "exactly 32"),
        ("ca.key", b"not a key", "ca_key"),
        ("list.toml", b"[[robot]]", "unknown field"),
        ("revoked.txt", b"sha256:xyz\n", "revoked.txt line 1"),
    ] {
        let kept = std::fs::read(dir.join(file)).unwrap();
        std::fs::write(dir.join(file), bytes).unwrap();
        let (ok, out) = cli(&["check"]);
        assert!(!ok && out.contains(says), "{file}: {out}");
        std::fs::write(dir.join(file), kept).unwrap();
    }
    // The CA's key kept in the certificate file would go to every device.
    let kept = std::fs::read(dir.join("ca.pem")).unwrap();
    let mut with_key = kept.clone();
    with_key.extend(std::fs::read(dir.join("ca.key")).unwrap());
    std::fs::write(dir.join("ca.pem"), with_key).unwrap();
    let (ok, out) = cli(&["check"]);
    assert!(!ok && out.contains("holds a private key"), "{out}");
    std::fs::write(dir.join("ca.pem"), kept).unwrap();
    // A CA key that is not the certificate's.
    let kept = std::fs::read(dir.join("ca.key")).unwrap();
    let other = Org::new();
    std::fs::copy(other.dir.path().join("ca.key"), dir.join("ca.key")).unwrap();
    let (ok, out) = cli(&["check"]);
    assert!(
        !ok && out.contains("not the key of ca_certificate"),
        "{out}"
    );
    std::fs::write(dir.join("ca.key"), kept).unwrap();
    let (ok, out) = cli(&["check"]);
    assert!(ok, "{out}");
}

/// Zero-touch over a real Mosquitto: two service instances share the
/// enrollment topics (an MQTT 5 shared subscription, with the ACL `fleet
/// acl` writes); devices with nothing but their TPM and the broker's root
/// run `edgeward provision` against the enrollment listener and get their
/// device CA chains. One instance is killed between devices: the other
/// serves the rest. A device the list does not name is refused with the
/// step, and an eavesdropper on the enrollment listener sees nothing.
#[test]
fn devices_enroll_through_the_broker_with_two_service_instances() {
    use edgeward_tests::fixtures::{Mosquitto, OrgCa};
    let devices = [Device::new(), Device::new(), Device::new()];
    let org = Org::new();
    let dir = org.dir.path();
    let ca = OrgCa::new();
    let (enroller_cert, enroller_key) =
        ca.issue_as("operators", "enroller", "extendedKeyUsage=clientAuth\n");
    let acl = |args: &[&str]| edgeward_tests::fleet::acl(Path::new(common::EDGEWARD), args);
    let main_acl = acl(&["--enroller", "enroller"]);
    let enroll_acl = acl(&["--enrollment-listener"]);
    assert!(
        enroll_acl.contains("pattern write ew/v1/enroll/req/%c"),
        "{enroll_acl}"
    );
    let broker = Mosquitto::start_with_enrollment(&ca, &main_acl, &enroll_acl);
    // The fingerprints read, the test lets go of the TPMs: the devices'
    // own key daemons use them (a simulator holds three objects).
    let fingerprints: Vec<String> = devices.iter().map(Device::ek_fingerprint).collect();
    // (And the unlisted device's request, for the flood below.)
    let unlisted = serde_json::to_string(&edgeward::enroll::transport::Message::Request {
        request: devices[2].request("dev-2"),
    })
    .unwrap();
    for d in &devices {
        d.hsm.close();
    }

    // The organisation lists the first two devices; every TPM here has
    // its own manufacturer CA, all trusted.
    let mut manufacturers = Vec::new();
    for d in &devices {
        manufacturers.extend(std::fs::read(&d.manufacturer).unwrap());
    }
    std::fs::write(dir.join("manufacturers.pem"), manufacturers).unwrap();
    std::fs::write(
        dir.join("list.toml"),
        format!(
            "{}{}",
            individual(&fingerprints[0], "dev-0"),
            individual(&fingerprints[1], "dev-1")
                + "[[symmetric]]\ngroup = \"boards\"\ndevice_id = \"board-*\"\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("challenge.key"), org.challenge_key).unwrap();
    std::fs::write(
        dir.join("enroll.toml"),
        "trust_domain = \"example.org\"\ndns_suffix = \"edge.example.org\"\n\
         manufacturers = \"manufacturers.pem\"\nlist = \"list.toml\"\n\
         ca_certificate = \"ca.pem\"\nca_key = \"ca.key\"\nchallenge_key = \"challenge.key\"\n\
         audit = \"audit.jsonl\"\n[group_secrets]\nboards = \"boards.secret\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("boards.secret"), [5u8; 32]).unwrap();

    // Two instances of the service, each waited for until subscribed.
    let serve = || {
        serve_enrollments(
            &broker.url(),
            &ca.root(),
            (&enroller_cert, &enroller_key),
            &dir.join("enroll.toml"),
        )
    };
    let mut first = serve();
    let second = serve();

    let provision = |i: usize, id: &str| {
        let state = tempfile::tempdir().unwrap();
        let cfg = state.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n\n[identity]\ndevice_id = \"{id}\"\ntrust_domain = \"example.org\"\n",
                devices[i]._tpm.tcti()
            ),
        )
        .unwrap();
        let out = Command::new(common::EDGEWARD)
            .arg("--state-dir")
            .arg(state.path().join("state"))
            .args(["provision", "--broker", &broker.enroll_url(), "--ca"])
            .arg(ca.root())
            .arg("--org-root")
            .arg(dir.join("ca.pem"))
            .arg("--config")
            .arg(&cfg)
            .args(["--timeout", "30s"])
            .env_remove("EDGEWARD_KEYD")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text, state)
    };

    // An eavesdropper on the enrollment listener, subscribed to everything
    // there, for the whole exchange.
    let spy = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-V", "mqttv5", "-p"])
        .arg(broker.enroll_url().rsplit(':').next().unwrap())
        .arg("--cafile")
        .arg(ca.root())
        .args(["-t", "ew/v1/enroll/#", "-t", "#", "-v", "-W", "20"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // And an anonymous client that joins the shared subscription under
    // the name a reader of the code would guess: Mosquitto would hand it
    // its share of the requests and drop them. The service's group name
    // is derived from its challenge key, so it joins nothing.
    let thief = Killed(
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-V", "mqttv5", "-p"])
            .arg(broker.enroll_url().rsplit(':').next().unwrap())
            .arg("--cafile")
            .arg(ca.root())
            .args(["-t", "$share/edgeward-enroll/ew/v1/enroll/req/+"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));

    let (ok, out, state0) = provision(0, "dev-0");
    assert!(ok, "{out}");
    assert!(out.contains("enrolled as dev-0 (groups: line-a)"), "{out}");
    assert!(out.contains("challenge received"), "{out}");
    let chain = state0.path().join("state/identity/enrolled.pem");
    let verified = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("ca.pem"))
        .arg(&chain)
        .output()
        .unwrap();
    assert!(verified.status.success(), "{verified:?}");
    // The transition is measured: the device's log names it, with the
    // certificate's digest.
    let measured = Command::new("grep")
        .args(["-rl", "\"kind\":\"enrolled\""])
        .arg(state0.path().join("state"))
        .output()
        .unwrap();
    assert!(
        !measured.stdout.is_empty(),
        "no enrollment event in the measurement log"
    );

    // One instance goes away: the broker gives the other all the work,
    // while a flooder on the enrollment listener sends 3,000 requests
    // (malformed, and well-formed ones for an unlisted TPM) as fast as
    // it can. The device still enrolls; the flood costs only time.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let mut flood = String::new();
    for i in 0..3000 {
        flood.push_str(if i % 2 == 0 {
            "{\"type\":\"request\"}"
        } else {
            &unlisted
        });
        flood.push('\n');
    }
    let mut flooder = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-i",
            "flooder",
            "-p",
        ])
        .arg(broker.enroll_url().rsplit(':').next().unwrap())
        .arg("--cafile")
        .arg(ca.root())
        .args(["-t", "ew/v1/enroll/req/flooder", "-l"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = flooder.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = stdin.write_all(flood.as_bytes());
        });
    }
    let started = std::time::Instant::now();
    let (ok, out, _) = provision(1, "dev-1");
    assert!(ok, "{out}");
    assert!(out.contains("enrolled as dev-1"), "{out}");
    eprintln!("enrolled during the flood in {:?}", started.elapsed());
    let _ = flooder.wait();

    // A board without a TPM: the organisation derives its key for the
    // factory, and it enrolls with that and its soft keys.
    let board = tempfile::tempdir().unwrap();
    let key = board.path().join("enrollment.key");
    let board_cfg = board.path().join("config.toml");
    std::fs::write(
        &board_cfg,
        "[identity]\ndevice_id = \"board-7\"\ntrust_domain = \"example.org\"\n",
    )
    .unwrap();
    edgeward_tests::fleet::derive_key(
        Path::new(common::EDGEWARD),
        &dir.join("enroll.toml"),
        "board-7",
        &key,
    );
    let out = Command::new(common::EDGEWARD)
        .arg("--state-dir")
        .arg(board.path().join("state"))
        .args(["provision", "--broker", &broker.enroll_url(), "--ca"])
        .arg(ca.root())
        .arg("--org-root")
        .arg(dir.join("ca.pem"))
        .arg("--config")
        .arg(&board_cfg)
        .args([
            "--device-id",
            "board-7",
            "--group",
            "boards",
            "--enrollment-key",
        ])
        .arg(&key)
        .env_remove("EDGEWARD_KEYD")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("enrolled as board-7"),
        "{text}"
    );
    assert!(board.path().join("state/identity/enrolled.pem").exists());

    // Not on the list: refused, the step named, nothing recorded.
    let (ok, out, state2) = provision(2, "dev-2");
    assert!(!ok, "{out}");
    assert!(out.contains("refused at enrollment-list"), "{out}");
    assert!(!state2.path().join("state/identity/enrolled.pem").exists());

    let audit = audit_entries(&dir.join("audit.jsonl")).unwrap();
    let ids: Vec<&str> = audit.iter().map(|e| e.device_id.as_str()).collect();
    assert_eq!(ids, ["dev-0", "dev-1", "board-7"]);

    let spied = spy.wait_with_output().unwrap();
    assert!(
        spied.stdout.is_empty(),
        "the eavesdropper read: {}",
        String::from_utf8_lossy(&spied.stdout)
    );
    drop(second);
    drop(thief);
}

/// `fleet enroll serve` of `enroll_toml` on the broker at `url` (its
/// roots `ca`) as the enroller (`login`: certificate, key), for up to two
/// minutes; returned once it is subscribed.
fn serve_enrollments(
    url: &str,
    ca: &Path,
    (cert, key): (&Path, &Path),
    enroll_toml: &Path,
) -> Killed {
    use std::io::BufRead as _;
    let mut child = Command::new(common::EDGEWARD)
        .args(["fleet", "--broker", url, "--ca"])
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(["enroll", "--service"])
        .arg(enroll_toml)
        .args(["serve", "--duration", "120s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.contains("subscribed to ew/v1/enroll/req/+ (shared)"),
        "{first}"
    );
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Killed(child)
}

/// A child process killed when dropped (a failing test leaves none).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A board without a TPM (the soft backend) enrolls with a key derived
/// from its group's secret at manufacture: the right key for its id
/// enrolls; another board's key, an unknown group or an id outside the
/// group's pattern is refused at its step.
#[test]
fn a_board_without_a_tpm_enrolls_with_a_group_derived_key() {
    let org = Org::new();
    let list = "[[symmetric]]\ngroup = \"boards\"\ndevice_id = \"board-*\"\ngroups = [\"lab\"]\n";
    let service = org.service(&[], list, &[]);
    let dir = tempfile::tempdir().unwrap();
    let soft: Arc<dyn Hsm> = Arc::new(SoftHsm::open(dir.path()).unwrap());
    let board =
        |id: &str, group: &str| enroll::symmetric_request(&soft, id, "example.org", group).unwrap();
    let attempt = |request: &Request, key: [u8; 32]| {
        let challenge = service.challenge(request)?;
        service.complete(&enroll::symmetric_prove(&key, request, &challenge).unwrap())
    };
    let key = enroll::device_key(&[9; 32], "board-1");
    // Another board's key, and a key from another group's secret.
    refused_at(
        attempt(
            &board("board-1", "boards"),
            enroll::device_key(&[9; 32], "board-2"),
        ),
        Step::Activation,
        "enrollment key",
    );
    refused_at(
        attempt(
            &board("board-1", "boards"),
            enroll::device_key(&[8; 32], "board-1"),
        ),
        Step::Activation,
        "enrollment key",
    );
    refused_at(
        attempt(&board("board-1", "other"), key),
        Step::EnrollmentList,
        "no symmetric-key group",
    );
    refused_at(
        attempt(
            &board("pump-1", "boards"),
            enroll::device_key(&[9; 32], "pump-1"),
        ),
        Step::EnrollmentList,
        "does not admit",
    );
    let issued = attempt(&board("board-1", "boards"), key).unwrap();
    assert_eq!(issued.groups, ["lab"]);
    let root = std::fs::read(org.dir.path().join("ca.pem")).unwrap();
    let roots = edgeward::attest::verify::pem_certificates(&root, "root").unwrap();
    enroll::check_issued(soft.as_ref(), &issued, "board-1", "example.org", &roots).unwrap();
    // The organisation signed the answer: whoever relays it cannot change
    // a word of it, nor strip the signature.
    let mut forged = issued.clone();
    forged.groups = vec!["admins".into()];
    let e =
        enroll::check_issued(soft.as_ref(), &forged, "board-1", "example.org", &roots).unwrap_err();
    assert!(e.contains("not signed by the organisation CA"), "{e}");
    let mut unsigned = issued.clone();
    unsigned.signature = Bytes::default();
    let e = enroll::check_issued(soft.as_ref(), &unsigned, "board-1", "example.org", &roots)
        .unwrap_err();
    assert!(e.contains("signature"), "{e}");
    // Another board, enrolled, holds its device CA key in software: it
    // certifies board-1's key as a CA under its own and signs an answer
    // with it. Its certificate (pathlen:0) cannot certify a CA.
    let dir2 = tempfile::tempdir().unwrap();
    let soft2: Arc<dyn Hsm> = Arc::new(SoftHsm::open(dir2.path()).unwrap());
    let request2 = enroll::symmetric_request(&soft2, "board-2", "example.org", "boards").unwrap();
    let challenge2 = service.challenge(&request2).unwrap();
    let issued2 = service
        .complete(
            &enroll::symmetric_prove(
                &enroll::device_key(&[9; 32], "board-2"),
                &request2,
                &challenge2,
            )
            .unwrap(),
        )
        .unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.serial_number = Some(rcgen::SerialNumber::from(vec![1, 2, 3]));
    p.distinguished_name = edgeward::identity::authority::edgeward_name("board-1");
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/device/board-1".try_into().unwrap(),
    )];
    let key2 = edgeward::identity::authority::HsmKey {
        hsm: soft2.clone(),
        id: "device-ca",
        point: soft2.public_key("device-ca").unwrap(),
    };
    let der2 = edgeward::attest::verify::pem_certificates(issued2.chain.as_bytes(), "chain")
        .unwrap()
        .remove(0);
    let issuer = rcgen::Issuer::from_ca_cert_der(&der2.into(), &key2).unwrap();
    let under_board2 = p
        .signed_by(
            &edgeward::identity::authority::PublicP256(soft.public_key("device-ca").unwrap()),
            &issuer,
        )
        .unwrap();
    let mut rogue = issued.clone();
    rogue.chain = format!("{}{}", under_board2.pem(), issued2.chain);
    rogue.signature = Bytes(
        soft2
            .sign_certificate("device-ca", &rogue.signed_bytes().unwrap())
            .unwrap(),
    );
    let e =
        enroll::check_issued(soft.as_ref(), &rogue, "board-1", "example.org", &roots).unwrap_err();
    assert!(e.contains("not a CA path"), "{e}");
    let chain = dir.path().join("chain.pem");
    std::fs::write(&chain, &issued.chain).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(org.dir.path().join("ca.pem"))
        .arg(&chain)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(openssl_text(&chain).contains("URI:spiffe://example.org/device/board-1"));
}

/// A board out of the box (soft backend, a group-derived enrollment key,
/// `[provisioning]` and no `[cloud]` broker): the daemon starts before
/// the organisation's service is up and runs its own module meanwhile,
/// enrolls in the background once the service answers, writes the
/// answer, connects to the assigned broker with the login certificate it
/// was issued and applies a deployment signed by the assigned key. Started
/// again, it is enrolled: it connects at once, and the service records
/// one enrollment.
#[test]
fn a_board_enrolls_at_start_connects_to_its_fleet_and_takes_a_signed_deployment() {
    use common::daemon::Daemon;
    let org = edgeward_tests::fleet::Enrolling::new(
        Path::new(common::EDGEWARD),
        &["board-7=line-a"],
        None,
        "[[symmetric]]\ngroup = \"boards\"\ndevice_id = \"board-*\"\ngroups = [\"line-a\"]\n",
    );
    let (fleet, ca, dir) = (&org.fleet, &org.fleet.ca, org.dir.path());
    let check = || {
        Command::new(common::EDGEWARD)
            .args(["fleet", "enroll", "--service"])
            .arg(dir.join("enroll.toml"))
            .arg("check")
            .output()
            .unwrap()
    };
    // Broker logins certified by the CA of device CAs would let a
    // module's certificate log in: refused, named.
    let good = std::fs::read_to_string(dir.join("enroll.toml")).unwrap();
    let devices = ca.role_root("devices").display().to_string();
    let workloads = ca.role_root("workloads").display().to_string();
    std::fs::write(
        dir.join("enroll.toml"),
        good.replace(&devices, &workloads).replace(
            &ca.role_key("devices").display().to_string(),
            &ca.role_key("workloads").display().to_string(),
        ),
    )
    .unwrap();
    let refused = check();
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("fleet.logins_certificate"),
        "{refused:?}"
    );
    // Certificates of an hour, renewed 2% in (73 s after their backdated
    // start: 13 s after they are issued).
    std::fs::write(
        dir.join("enroll.toml"),
        format!("lifetime = \"1h\"\n{good}"),
    )
    .unwrap();
    let checked = check();
    assert!(checked.status.success(), "{checked:?}");
    let s = common::Scratch::new();
    let key = s.path().join("enrollment.key");
    org.derive_key("board-7", &key);
    let config = format!(
        "{}\n[[module]]\nname = \"local\"\nfile = \"{sensor}\"\ndigest = \"{digest}\"\n\
         env = {{ INTERVAL_MS = \"1000\" }}\n",
        org.device_config(
            "board-7",
            "",
            &format!(
                "group = \"boards\"\nenrollment_key = \"{}\"\nrenew_threshold = \"2%\"\n",
                key.display()
            )
        ),
        sensor = edgeward_tests::guests::TEMPERATURE_SENSOR,
        digest = common::sha256sum(edgeward_tests::guests::TEMPERATURE_SENSOR),
    );
    let mut out = fleet.operator.subscribe("ew/v1/d/board-7/out/#");
    let mut d = Daemon::start(&s, &config);
    // No service yet: the attempts fail and are retried; the device's own
    // module runs meanwhile.
    d.wait_for("a failed enrollment attempt, and the module", |_, err| {
        err.iter().any(|l| l.contains("enrollment failed"))
            && err
                .iter()
                .any(|l| l.contains("local") && l.contains("module measured and loaded"))
    });
    assert!(!s.state().join("identity/enrollment.json").exists());

    let serve = org.serve();
    let wait = Duration::from_secs(60);
    out.wait("ew/v1/d/board-7/out/state", wait, |v| {
        v["state"] == "online"
    });
    d.wait_for("the enrollment", |_, err| {
        err.iter()
            .any(|l| l.contains("enrolled") && l.contains("board-7"))
    });
    // What it was given: the organisation's chain for its device CA key,
    // and a broker login the devices root certifies.
    let identity = s.state().join("identity");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(identity.join("enrollment.json")).unwrap()).unwrap();
    assert_eq!(record["device_id"], "board-7");
    assert_eq!(record["groups"], serde_json::json!(["line-a"]));
    assert_eq!(record["broker"], fleet.broker.url());
    for (file, root) in [
        ("enrolled.pem", ca.role_root("workloads")),
        ("broker-client.pem", ca.role_root("devices")),
    ] {
        let v = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&root)
            .arg(identity.join(file))
            .output()
            .unwrap();
        assert!(v.status.success(), "{file}: {v:?}");
    }
    let login = openssl_text(&identity.join("broker-client.pem"));
    assert!(
        login.contains("CN=board-7") || login.contains("CN = board-7"),
        "{login}"
    );
    assert!(login.contains("TLS Web Client Authentication"), "{login}");
    assert!(!login.contains("CA:TRUE"), "{login}");

    // A deployment signed by the assigned key is applied.
    let manifest = format!(
        "version = \"1\"\n\n[[module]]\nname = \"sensor\"\ndigest = \"{}\"\nsource = \"{}\"\nenv = {{ INTERVAL_MS = \"100\" }}\n",
        common::sha256sum(edgeward_tests::guests::TEMPERATURE_SENSOR),
        edgeward_tests::guests::TEMPERATURE_SENSOR
    );
    assert!(fleet.operator.publish(
        "ew/v1/d/board-7/in/desired",
        &fleet.signed(&manifest, "device:board-7", None),
        true
    ));
    out.wait("ew/v1/d/board-7/out/reported", wait, |v| {
        v["version"] == "1"
            && ["sensor", "local"].iter().all(|n| {
                v["modules"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["name"] == *n && m["state"] == "running"))
            })
    });
    let (status, _, _) = d.terminate();
    assert!(status.success());

    // What the daemon's own user could change in the state dir is written
    // again from the signed answer at the next start.
    let deploy_key = identity.join("deploy-0.pub");
    let assigned = std::fs::read(&deploy_key).unwrap();
    std::fs::write(&deploy_key, b"an attacker's key").unwrap();

    // Started again, it is enrolled: no attempt, straight to the broker.
    let mut again = fleet.operator.subscribe("ew/v1/d/board-7/out/state");
    let mut d = Daemon::start(&s, &config);
    again.wait("ew/v1/d/board-7/out/state", wait, |v| {
        v["state"] == "online"
    });
    d.pump();
    assert!(
        !d.seen_err.iter().any(|l| l.contains("enrollment failed")),
        "{}",
        d.seen_err.join("\n")
    );
    assert_eq!(std::fs::read(&deploy_key).unwrap(), assigned);
    // Renewed with its current identity once due, the new chain adopted
    // (the renewal may have come in the first run already).
    let renewed_before = audit_entries(&dir.join("audit.jsonl"))
        .unwrap()
        .iter()
        .any(|e| e.event == "renewed");
    if !renewed_before {
        d.wait_for("the renewal", |_, err| {
            err.iter()
                .any(|l| l.contains("device CA certificate renewed"))
        });
    }
    let (status, _, _) = d.terminate();
    assert!(status.success());
    let audit = audit_entries(&dir.join("audit.jsonl")).unwrap();
    let events: Vec<&str> = audit.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events[0], "enrolled", "{events:?}");
    assert!(
        events[1..].iter().all(|e| *e == "renewed") && events.len() >= 2,
        "{events:?}"
    );
    assert!(audit[0].broker_certificate.contains("BEGIN CERTIFICATE"));
    assert!(audit.iter().all(|e| e.key == audit[0].key));
    let chain = std::fs::read_to_string(identity.join("enrolled.pem")).unwrap();
    assert_eq!(
        chain,
        audit.last().unwrap().chain,
        "the renewed chain is the device's"
    );

    // The signed answer itself changed (another group): the daemon does
    // not take it (naming the file), runs, and enrolls again.
    let answer = identity.join("issued.json");
    let mut stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&answer).unwrap()).unwrap();
    stored["groups"] = serde_json::json!(["admins"]);
    std::fs::write(&answer, serde_json::to_vec(&stored).unwrap()).unwrap();
    let mut d = Daemon::start(&s, &config);
    d.wait_for("the changed answer refused", |_, err| {
        err.iter().any(|l| {
            l.contains("issued.json")
                && l.contains("not signed by the organisation CA")
                && l.contains("enrolling again")
        })
    });
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon runs on");
    let (status, _, _) = d.terminate();
    assert!(status.success());
    drop(serve);
}

/// A TPM device enrolls at the daemon's start: its runtime asks its key
/// daemon for the attestation key, the credential's activation and the
/// certification of its device CA key (what the key daemon's table allows
/// a runtime for enrollment), and connects to its fleet with the login
/// it was issued; the enrollment is measured into its TPM's log.
#[test]
fn a_tpm_device_enrolls_at_daemon_start_through_its_key_daemon() {
    use common::daemon::Daemon;
    let device = Device::new();
    let factory = device.ek_fingerprint();
    device.hsm.close();
    let org = edgeward_tests::fleet::Enrolling::new(
        Path::new(common::EDGEWARD),
        &["gw-9=line-a"],
        Some(&device.manufacturer),
        &individual(&factory, "gw-9"),
    );
    let _serve = org.serve();
    let s = common::Scratch::new();
    let config = org.device_config(
        "gw-9",
        &format!(
            "[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n",
            device._tpm.tcti()
        ),
        "",
    );
    let mut out = org.fleet.operator.subscribe("ew/v1/d/gw-9/out/state");
    let mut d = Daemon::start(&s, &config);
    d.wait_for("the broker", |_, err| {
        err.iter().any(|l| l.contains("connected to the broker"))
    });
    out.wait("ew/v1/d/gw-9/out/state", Duration::from_secs(90), |v| {
        v["state"] == "online"
    });
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{}", err.join("\n"));
    let audit = audit_entries(&org.dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(
        (audit[0].device_id.as_str(), audit[0].factory.as_str()),
        ("gw-9", factory.as_str())
    );
    let measured = Command::new("grep")
        .args(["-rl", "\"kind\":\"enrolled\""])
        .arg(s.state())
        .output()
        .unwrap();
    assert!(
        !measured.stdout.is_empty(),
        "no enrollment event in the measurement log"
    );
}

/// A board renews its device CA certificate with the one it holds
/// (`edgeward provision --renew`): the same keys, a new certificate, a
/// `renewed` line in the audit log. A renewal with a certificate another
/// CA issued, or with a CSR for another key, is refused at its step. After
/// a reset (its state gone, new keys), it enrolls again with its factory
/// key, recorded as `re-enrolled`; once revoked, it can neither renew nor
/// enroll.
#[test]
fn a_device_renews_with_its_current_identity_and_re_enrolls_after_a_reset() {
    let org = edgeward_tests::fleet::Enrolling::new(
        Path::new(common::EDGEWARD),
        &["board-3=line-a"],
        None,
        "[[symmetric]]\ngroup = \"boards\"\ndevice_id = \"board-*\"\ngroups = [\"line-a\"]\n",
    );
    let _serve = org.serve();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("enrollment.key");
    org.derive_key("board-3", &key);
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        org.device_config(
            "board-3",
            "",
            &format!(
                "group = \"boards\"\nenrollment_key = \"{}\"\n",
                key.display()
            ),
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let provision = |args: &[&str]| {
        let out = Command::new(common::EDGEWARD)
            .arg("--state-dir")
            .arg(&state)
            .arg("provision")
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env_remove("EDGEWARD_KEYD")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let chain = || std::fs::read_to_string(state.join("identity/enrolled.pem")).unwrap();
    let events = || {
        audit_entries(&org.dir.path().join("audit.jsonl"))
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect::<Vec<_>>()
    };
    let (ok, out) = provision(&[]);
    assert!(ok && out.contains("enrolled as board-3"), "{out}");
    let first = chain();
    let (ok, out) = provision(&["--renew"]);
    assert!(ok && out.contains("renewed as board-3"), "{out}");
    let second = chain();
    assert_ne!(first, second, "a new certificate");
    let key_of = |pem: &str| {
        let der = edgeward::attest::verify::pem_certificates(pem.as_bytes(), "chain")
            .unwrap()
            .remove(0);
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        c.public_key().raw.to_vec()
    };
    assert_eq!(key_of(&first), key_of(&second), "for the same key");
    assert_eq!(events(), ["enrolled", "renewed"]);

    // Forged renewals, straight to the service.
    let service = Service::new(Settings::load(&org.service_toml()).unwrap());
    let soft: Arc<dyn Hsm> = Arc::new(SoftHsm::open(&state).unwrap());
    let good = enroll::renewal(&soft, "board-3", "edgeward.local", &second).unwrap();
    let (other_cert, _) =
        org.fleet
            .ca
            .issue_as("servers", "board-3", "extendedKeyUsage=clientAuth\n");
    let mut forged = good.clone();
    forged.certificate = std::fs::read_to_string(other_cert).unwrap();
    refused_at(
        service.renew(&forged),
        Step::Current,
        "not one this organisation CA issued",
    );
    let other_dir = tempfile::tempdir().unwrap();
    let other: Arc<dyn Hsm> = Arc::new(SoftHsm::open(other_dir.path()).unwrap());
    let mut foreign = enroll::renewal(&other, "board-3", "edgeward.local", &second).unwrap();
    foreign.certificate = good.certificate.clone();
    refused_at(service.renew(&foreign), Step::Csr, "another key");
    // An old CSR of the device's (a renewal carries no challenge) cannot
    // bring a new broker key: only the one on record is renewed.
    let mut new_login = good.clone();
    new_login.broker_csr = foreign.broker_csr.clone();
    refused_at(
        service.renew(&new_login),
        Step::Csr,
        "keeps the broker key on record",
    );
    assert_eq!(events(), ["enrolled", "renewed"], "nothing recorded");

    // A reset: the state is gone, and with it the keys.
    std::fs::remove_dir_all(&state).unwrap();
    let (ok, out) = provision(&[]);
    assert!(ok && out.contains("enrolled as board-3"), "{out}");
    assert_ne!(key_of(&chain()), key_of(&second));
    assert_eq!(events(), ["enrolled", "renewed", "re-enrolled"]);
    // The keys it had before the reset renew nothing, though their
    // certificate is still valid.
    refused_at(service.renew(&good), Step::Current, "latest");
    // Taken off the list, it renews no more.
    let now: Arc<dyn Hsm> = Arc::new(SoftHsm::open(&state).unwrap());
    let current = enroll::renewal(&now, "board-3", "edgeward.local", &chain()).unwrap();
    let list = org.dir.path().join("list.toml");
    let listed = std::fs::read_to_string(&list).unwrap();
    std::fs::write(&list, listed.replace("board-*", "pump-*")).unwrap();
    let unlisted = Service::new(Settings::load(&org.service_toml()).unwrap());
    refused_at(
        unlisted.renew(&current),
        Step::EnrollmentList,
        "does not admit",
    );
    std::fs::write(&list, listed).unwrap();

    // Revoked: no renewal, no enrollment.
    let out = Command::new(common::EDGEWARD)
        .args(["fleet", "enroll", "--service"])
        .arg(org.service_toml())
        .args(["revoke", "--device", "board-3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (ok, out) = provision(&["--renew"]);
    assert!(!ok && out.contains("refused at revoked"), "{out}");
    std::fs::remove_dir_all(&state).unwrap();
    let (ok, out) = provision(&[]);
    assert!(!ok && out.contains("refused at revoked"), "{out}");
    assert_eq!(events(), ["enrolled", "renewed", "re-enrolled"]);
}

/// The organisation CA's key can sit in a PKCS#11 token (SoftHSM2),
/// behind a key daemon of the operator's (`edgeward-keyd --hsm pkcs11`):
/// the service signs through it, never holding the key; the device's
/// chain verifies with openssl. A key daemon that is not there, or a key
/// the token does not hold, is named by `check`.
#[test]
fn the_organisation_ca_key_can_sit_in_a_pkcs11_token_behind_a_key_daemon() {
    use edgeward_tests::fixtures::SoftHsmToken;
    let token = SoftHsmToken::new();
    let org = tempfile::tempdir().unwrap();
    let dir = org.path();
    let socket = dir.join("org-keyd.sock");
    let keyd_bin = Path::new(common::EDGEWARD).with_file_name("edgeward-keyd");
    assert!(
        keyd_bin.exists(),
        "{} is missing: build it (cargo build -p edgeward-keyd)",
        keyd_bin.display()
    );
    let cfg = token.config();
    let _keyd = Killed(
        Command::new(&keyd_bin)
            .arg("--state")
            .arg(dir.join("keyd-state"))
            .arg("--socket")
            .arg(&socket)
            .args(["--hsm", "pkcs11", "--module"])
            .arg(&cfg.module)
            .args(["--token", &cfg.token, "--pin-file"])
            .arg(&cfg.pin_file)
            .arg("--no-measure")
            .stderr(std::fs::File::create(dir.join("keyd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(dir.join("keyd.log"))
        .is_ok_and(|l| l.contains("key daemon ready"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the key daemon did not start: {}",
            std::fs::read_to_string(dir.join("keyd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(
        dir.join("list.toml"),
        "[[symmetric]]\ngroup = \"boards\"\ndevice_id = \"board-*\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("challenge.key"), [4u8; 32]).unwrap();
    std::fs::write(dir.join("boards.secret"), [9u8; 32]).unwrap();
    let toml = |key: &str, socket: &str| {
        format!(
            "trust_domain = \"example.org\"\ndns_suffix = \"edge.example.org\"\n\
             manufacturers = \"ca.pem\"\nlist = \"list.toml\"\n\
             ca_certificate = \"ca.pem\"\nca_key = \"{key}\"\nca_key_daemon = \"{socket}\"\n\
             challenge_key = \"challenge.key\"\naudit = \"audit.jsonl\"\n\
             [group_secrets]\nboards = \"boards.secret\"\n"
        )
    };
    let check = |text: &str| {
        std::fs::write(dir.join("enroll.toml"), text).unwrap();
        let o = Command::new(common::EDGEWARD)
            .args(["fleet", "enroll", "--service"])
            .arg(dir.join("enroll.toml"))
            .arg("check")
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    // The operator makes the key in the token and a root of it (here,
    // self-signed: the organisation's root).
    std::fs::write(dir.join("enroll.toml"), toml("org-ca", "org-keyd.sock")).unwrap();
    let made = Command::new(common::EDGEWARD)
        .args(["fleet", "enroll", "--service"])
        .arg(dir.join("enroll.toml"))
        .args(["ca-key", "--self-signed"])
        .arg(dir.join("ca.pem"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let csr = Command::new(common::EDGEWARD)
        .args(["fleet", "enroll", "--service"])
        .arg(dir.join("enroll.toml"))
        .args(["ca-key", "--csr"])
        .arg(dir.join("ca.csr"))
        .output()
        .unwrap();
    assert!(csr.status.success(), "{csr:?}");
    let verified = Command::new("openssl")
        .args(["req", "-verify", "-noout", "-in"])
        .arg(dir.join("ca.csr"))
        .output()
        .unwrap();
    assert!(verified.status.success(), "{verified:?}");
    let root_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let (ok, out) = check(&toml("org-ca", "missing.sock"));
    assert!(
        !ok && out.contains("ca_key") && out.contains("missing.sock"),
        "{out}"
    );
    let (ok, out) = check(&toml("no-such-key", "org-keyd.sock"));
    assert!(!ok && out.contains("no-such-key"), "{out}");
    let (ok, out) = check(&toml("org-ca", "org-keyd.sock"));
    assert!(ok, "{out}");

    // A board enrolls; its device CA is signed in the token.
    let service = Service::new(Settings::load(&dir.join("enroll.toml")).unwrap());
    let board_dir = tempfile::tempdir().unwrap();
    let board: Arc<dyn Hsm> = Arc::new(SoftHsm::open(board_dir.path()).unwrap());
    let request = enroll::symmetric_request(&board, "board-1", "example.org", "boards").unwrap();
    let challenge = service.challenge(&request).unwrap();
    let issued = service
        .complete(
            &enroll::symmetric_prove(
                &enroll::device_key(&[9; 32], "board-1"),
                &request,
                &challenge,
            )
            .unwrap(),
        )
        .unwrap();
    let roots = edgeward::attest::verify::pem_certificates(root_pem.as_bytes(), "root").unwrap();
    enroll::check_issued(board.as_ref(), &issued, "board-1", "example.org", &roots).unwrap();
    let chain = board_dir.path().join("chain.pem");
    std::fs::write(&chain, &issued.chain).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("ca.pem"))
        .arg(&chain)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
