//! `edgeward hsm info` through the binary, on each backend.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edgeward_tests::fixtures::{SoftHsmToken, Swtpm};

fn info_json(s: &Scratch, config: Option<&std::path::Path>) -> serde_json::Value {
    let mut c = s.edgeward();
    c.args(["hsm", "info", "--json"]);
    if let Some(p) = config {
        c.arg("--config").arg(p);
    }
    let o = c.output().expect("spawn");
    assert_status(&o, 0);
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&o)))
}

#[test]
fn soft_info_lists_keys_and_register() {
    let s = Scratch::new();
    let v = info_json(&s, None);
    assert_eq!(v["backend"], "soft");
    assert_eq!(v["keys"].as_array().map(Vec::len), Some(0));
    // Create keys through the library on the same state dir, then look again.
    let hsm = edgeward::hsm::soft::SoftHsm::open(&s.state()).expect("open");
    use edgeward::hsm::Hsm;
    let pk = hsm.signing_key("device-ca").expect("key");
    hsm.aead_key("master-encryption").expect("key");
    hsm.extend(&[7; 32]).expect("extend");
    let v = info_json(&s, None);
    let keys = v["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["id"], "device-ca");
    assert_eq!(keys[0]["algorithm"], "ecdsa-p256");
    assert_eq!(keys[0]["public_key"], edgeward::measure::hex(&pk));
    assert!(
        keys[0]["public_key_pem"]
            .as_str()
            .expect("pem")
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    assert_eq!(keys[1]["algorithm"], "aes-256-gcm");
    let expected = edgeward::hsm::extend_chain(&[0; 32], &[7; 32]);
    assert_eq!(v["register"], edgeward::measure::hex(&expected));

    let o = s.edgeward().args(["hsm", "info"]).output().expect("spawn");
    assert_status(&o, 0);
    assert!(
        stdout(&o).contains("backend:  soft") && stdout(&o).contains("device-ca"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn tpm_info_reads_the_pcr() {
    let s = Scratch::new();
    let tpm = Swtpm::start();
    let cfg = s.write(
        "config.toml",
        &format!(
            "[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\npcr = 16\n",
            tpm.tcti()
        ),
    );
    let v = info_json(&s, Some(&cfg));
    assert_eq!(v["backend"], "tpm");
    // PCR 16 (debug) starts at zero after startup.
    assert_eq!(v["register"], "0".repeat(64));
}

#[test]
fn pkcs11_info_has_no_register() {
    let s = Scratch::new();
    let token = SoftHsmToken::new();
    let cfg = s.write("config.toml", &token.hsm_toml());
    let v = info_json(&s, Some(&cfg));
    assert_eq!(v["backend"], "pkcs11");
    assert!(v["register"].is_null());
}

#[test]
fn unreachable_backend_fails_clearly() {
    let s = Scratch::new();
    let cfg = s.write(
        "config.toml",
        "[hsm]\nbackend = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n",
    );
    let o = s
        .edgeward()
        .args(["hsm", "info", "--config"])
        .arg(&cfg)
        .output()
        .expect("spawn");
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("hsm backend tpm") && stderr(&o).contains("port=1"),
        "{}",
        stderr(&o)
    );
}
