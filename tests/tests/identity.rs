//! Workload identity through the WIT `workload` interface, checked from the
//! outside: certificates by `openssl verify` and the `spiffe` crate, tokens
//! by `jsonwebtoken` and the `spiffe` crate with keys from
//! `edgeward bundle --format jwks`, sealed data across modules and
//! registrations, on the soft, TPM (swtpm) and PKCS#11 (SoftHSM2) backends.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use base64ct::{Base64, Base64UrlUnpadded, Encoding as _};
use common::daemon::*;
use common::svid::*;
use common::*;
use edgeward_tests::fixtures::{SoftHsmToken, Swtpm};

const PROBE: &str = guests::IDENTITY_PROBE;

fn probe(s: &Scratch, flags: &[&str], args: &[&str]) -> String {
    let o = s.run(PROBE, flags, args);
    assert_status(&o, 0);
    stdout(&o)
}

#[test]
fn whoami_names_the_file_digest_and_device() {
    let s = Scratch::new();
    let cfg = s.write(
        "c.toml",
        "[identity]\ntrust_domain = \"factory.example\"\ndevice_id = \"gw-7\"\n",
    );
    let cfg = cfg.to_str().unwrap();
    let out = probe(&s, &["--config", cfg], &["whoami"]);
    assert_eq!(line_value(&out, "module_name="), "identity-probe");
    assert_eq!(line_value(&out, "device_id="), "gw-7");
    assert_eq!(line_value(&out, "digest="), sha256sum(PROBE));
    assert_eq!(
        line_value(&out, "spiffe_id="),
        "spiffe://factory.example/device/gw-7/module/identity-probe"
    );
    let g1 = line_value(&out, "generation_id=").to_owned();
    assert_eq!(g1.len(), 32);
    // `edgeward run` registers ephemerally: a new generation every run.
    let out = probe(&s, &["--config", cfg], &["whoami"]);
    assert_ne!(line_value(&out, "generation_id="), g1);
}

#[test]
fn run_opens_the_hsm_only_when_the_module_asks() {
    let s = Scratch::new();
    let o = s.run(guests::SANDBOX_PROBE, &[], &["hello"]);
    assert_status(&o, 0);
    assert!(!s.state().join("hsm").exists(), "the soft HSM was opened");
    assert!(!s.state().join("identity").exists());
    // An unreachable TPM does not stop a module that never asks …
    let cfg = s.write(
        "tpm.toml",
        "[hsm]\nbackend = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n",
    );
    let cfg = cfg.to_str().unwrap();
    let o = s.run(guests::SANDBOX_PROBE, &["--config", cfg], &["hello"]);
    assert_status(&o, 0);
    // … and one that asks gets `unavailable`, with the reason logged.
    let o = s.run(PROBE, &["--config", cfg], &["token", "svc", "60"]);
    assert_status(&o, 0);
    assert!(
        stdout(&o).starts_with("token err unavailable: "),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("hsm backend tpm"), "{}", stderr(&o));
}

#[test]
fn x509_svid_verifies_with_openssl_and_spiffe() {
    let s = Scratch::new();
    let out = probe(&s, &[], &["cert"]);
    let expires: u64 = line_value(&out, "expires ").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 3500..=now + 3700).contains(&expires),
        "default TTL 1h"
    );
    let id = format!(
        "spiffe://edgeward.local/device/{}/module/identity-probe",
        edgeward::identity::default_device_id()
    );
    let pem = bundle(&s, &[], "pem");
    check_svid(&s, &out, &pem, &id);
    // The module's trust bundle is the CLI's.
    assert_eq!(probe(&s, &[], &["bundle"]), pem);
    // The private key handed over is the leaf's, not the CA's.
    let ca = pem_blocks(&pem);
    assert_ne!(private_key_der(&out).len(), 0);
    let root = s.write("root.pem", &ca[0]);
    let root_text = openssl_text(&root);
    assert!(root_text.contains("CA:TRUE"), "{root_text}");

    // sign() is by the leaf key: the certificate verifies it.
    let out = probe(&s, &[], &["sign", "hello edge"]);
    let sig = unhex(line_value(&out, "sign ok "));
    let certs = pem_blocks(&out);
    assert!(verifies(&certs[0], b"hello edge", &sig));
    assert!(!verifies(&certs[0], b"hello edgE", &sig));
}

#[test]
fn server_certificate_carries_the_names() {
    let s = Scratch::new();
    let out = probe(
        &s,
        &[
            "--server-name",
            "api.local",
            "--server-name",
            "*.example.com",
            "--server-name",
            "10.0.0.0/24",
        ],
        &[
            "server-cert",
            "api.local",
            "api.local",
            "gw.example.com",
            "10.0.0.7",
        ],
    );
    let certs = pem_blocks(&out);
    let leaf = s.write("server.pem", &certs[0]);
    let roots = s.write("bundle.pem", &bundle(&s, &[], "pem"));
    openssl_verify(
        &roots,
        None,
        &leaf,
        &[
            "-purpose",
            "sslserver",
            "-verify_hostname",
            "gw.example.com",
        ],
    );
    openssl_verify(&roots, None, &leaf, &["-verify_ip", "10.0.0.7"]);
    let text = openssl_text(&leaf);
    assert!(text.contains("DNS:api.local"), "{text}");
    assert!(text.contains("IP Address:10.0.0.7"), "{text}");
    assert!(
        text.contains("Subject: O = edgeward, CN = api.local"),
        "{text}"
    );
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    assert!(!text.contains("Client Authentication"), "{text}");
}

/// `server_names` decide what a module may get a server certificate for,
/// through a real guest: deny by default, every name named when refused.
#[test]
fn server_names_decide_what_is_certified() {
    let s = Scratch::new();
    let allowed = [
        "--server-name",
        "api.local",
        "--server-name",
        "*.svc.example",
        "--server-name",
        "10.0.0.7",
        "--server-name",
        "10.0.5.0/24",
    ];
    let roots = s.write("bundle.pem", &bundle(&s, &[], "pem"));
    let issued = |args: &[&str], check: &[&str]| {
        let mut a = vec!["server-cert"];
        a.extend_from_slice(args);
        let out = probe(&s, &allowed, &a);
        let certs = pem_blocks(&out);
        assert!(!certs.is_empty(), "{args:?}: {out}");
        let leaf = s.write("server.pem", &certs[0]);
        openssl_verify(&roots, None, &leaf, check);
    };
    // An exact name, a one-label wildcard, an IP, an address in a CIDR.
    issued(
        &["api.local", "api.local"],
        &["-purpose", "sslserver", "-verify_hostname", "api.local"],
    );
    issued(
        &["a.svc.example", "a.svc.example"],
        &["-verify_hostname", "a.svc.example"],
    );
    issued(&["api.local", "10.0.0.7"], &["-verify_ip", "10.0.0.7"]);
    issued(&["api.local", "10.0.5.9"], &["-verify_ip", "10.0.5.9"]);
    let refused = |flags: &[&str], args: &[&str], name: &str| {
        let mut a = vec!["server-cert"];
        a.extend_from_slice(args);
        let out = probe(&s, flags, &a);
        assert!(
            out.starts_with("server-cert err not-permitted: ")
                && out.contains(&format!("{name:?}"))
                && !out.contains("BEGIN CERTIFICATE"),
            "{args:?}: {out}"
        );
    };
    // A wildcard does not match two labels, nor the bare suffix.
    refused(
        &allowed,
        &["api.local", "a.b.svc.example"],
        "a.b.svc.example",
    );
    refused(&allowed, &["api.local", "svc.example"], "svc.example");
    // Outside the CIDR, another IP.
    refused(&allowed, &["api.local", "10.0.6.1"], "10.0.6.1");
    refused(&allowed, &["api.local", "10.0.0.8"], "10.0.0.8");
    // A common name outside the list, with allowed alt names.
    refused(&allowed, &["bank.example", "api.local"], "bank.example");
    // No list at all: nothing.
    refused(&[], &["api.local", "api.local"], "api.local");
    // A malformed entry is refused before the module runs.
    let o = s.run(PROBE, &["--server-name", "10.0.5.1/24"], &["whoami"]);
    assert_status(&o, 2);
    assert!(
        stderr(&o).contains("--server-name") && stderr(&o).contains("host bits"),
        "{}",
        stderr(&o)
    );
}

/// The same rules from the config file, with the `{module}` placeholder.
#[test]
fn server_names_from_the_config() {
    let s = Scratch::new();
    let digest = sha256sum(PROBE);
    let config = format!(
        "[identity]\ndevice_id = \"gw1\"\n\n[[module]]\nname = \"web\"\nfile = \"{PROBE}\"\ndigest = \"{digest}\"\nargs = [\"server-cert\", \"web.gw1.edge.example\", \"web.gw1.edge.example\"]\nrestart = \"never\"\nserver_names = [\"{{module}}.{{device}}.edge.example\"]\n\n[[module]]\nname = \"other\"\nfile = \"{PROBE}\"\ndigest = \"{digest}\"\nargs = [\"server-cert\", \"web.gw1.edge.example\", \"web.gw1.edge.example\"]\nrestart = \"never\"\nserver_names = [\"{{module}}.{{device}}.edge.example\"]\n"
    );
    let lines = run_daemon_until(
        &s,
        &config,
        &["web | -----END CERTIFICATE-----", "other | server-cert err"],
    );
    let other = lines
        .iter()
        .find(|l| l.contains("other | server-cert err"))
        .unwrap();
    assert!(
        other.contains("not-permitted") && other.contains("web.gw1.edge.example"),
        "{other}"
    );
}

#[test]
fn server_certificates_are_rate_limited() {
    let s = Scratch::new();
    let out = probe(
        &s,
        &["--server-name", "burst.local"],
        &["server-cert-burst", "14"],
    );
    let ok = out.lines().filter(|l| l.contains(" ok ")).count();
    let limited = out
        .lines()
        .filter(|l| l.contains(" err unavailable: server-certificate rate limit"))
        .count();
    assert_eq!(ok + limited, 14, "{out}");
    // A burst of 10, plus whatever refilled (1/s) while they were issued.
    assert!(ok >= 10 && limited >= 1, "{out}");
}

#[test]
fn tokens_verify_with_independent_libraries() {
    let s = Scratch::new();
    let out = probe(&s, &[], &["token", "svc-a", "svc-b", "60"]);
    let token = line_value(&out, "token ok ").to_owned();
    let jwks = bundle(&s, &[], "jwks");
    let claims = check_token(&token, &jwks, "svc-b", "edgeward.local");
    assert_eq!(claims["digest"], sha256sum(PROBE));
    assert!(claims["jti"].as_str().unwrap().len() >= 16);
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 60);
    // The JWKS is a SPIFFE bundle: the X.509 root with x5c, the JWT keys.
    let doc: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    let roots: Vec<_> = keys.iter().filter(|k| k["use"] == "x509-svid").collect();
    assert_eq!(roots.len(), 1);
    let x5c = roots[0]["x5c"][0].as_str().unwrap();
    let root_pem = pem_blocks(&bundle(&s, &[], "pem"))[0].clone();
    assert_eq!(Base64::decode_vec(x5c).unwrap(), pem_to_der(&root_pem));

    // TTL is clamped to the configured maximum.
    let cfg = s.write("c.toml", "[identity]\nmax_token_ttl = \"30s\"\n");
    let out = probe(
        &s,
        &["--config", cfg.to_str().unwrap()],
        &["token", "x", "3600"],
    );
    let claims = check_token(
        line_value(&out, "token ok "),
        &bundle(&s, &[], "jwks"),
        "x",
        "edgeward.local",
    );
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        30
    );
}

fn forge(header: &serde_json::Value, payload: &serde_json::Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        Base64UrlUnpadded::encode_string(header.to_string().as_bytes()),
        Base64UrlUnpadded::encode_string(payload.to_string().as_bytes()),
        Base64UrlUnpadded::encode_string(sig)
    )
}

fn es256(
    key: &p256::ecdsa::SigningKey,
    header: &serde_json::Value,
    payload: &serde_json::Value,
) -> String {
    use p256::ecdsa::signature::Signer as _;
    let unsigned = format!(
        "{}.{}",
        Base64UrlUnpadded::encode_string(header.to_string().as_bytes()),
        Base64UrlUnpadded::encode_string(payload.to_string().as_bytes()),
    );
    let sig: p256::ecdsa::Signature = key.sign(unsigned.as_bytes());
    format!(
        "{unsigned}.{}",
        Base64UrlUnpadded::encode_string(&sig.to_bytes())
    )
}

#[test]
fn validate_token_rejects_what_it_must() {
    let s = Scratch::new();
    let issue = |flags: &[&str], aud: &str, ttl: &str| {
        line_value(&probe(&s, flags, &["token", aud, ttl]), "token ok ").to_owned()
    };
    let validate = |token: &str, aud: &str| probe(&s, &[], &["validate", token, aud]);
    let good = issue(&[], "svc", "60");
    // Accepted in another process (the key is published in the state dir).
    let out = validate(&good, "svc");
    assert!(
        out.starts_with("validate ok sub=spiffe://edgeward.local/"),
        "{out}"
    );
    assert!(
        out.contains(&format!("digest={}", sha256sum(PROBE))),
        "{out}"
    );

    let rejected = |token: &str, aud: &str, why: &str| {
        let out = validate(token, aud);
        assert!(
            out.starts_with("validate err invalid-argument: ") && out.contains(why),
            "expected a rejection mentioning {why:?}, got {out}"
        );
    };
    rejected(&good, "other", "audience");

    let parts: Vec<&str> = good.split('.').collect();
    let header: serde_json::Value =
        serde_json::from_slice(&Base64UrlUnpadded::decode_vec(parts[0]).unwrap()).unwrap();
    let mut payload: serde_json::Value =
        serde_json::from_slice(&Base64UrlUnpadded::decode_vec(parts[1]).unwrap()).unwrap();
    let sig = Base64UrlUnpadded::decode_vec(parts[2]).unwrap();

    // alg none, with and without a signature.
    let none = serde_json::json!({ "alg": "none", "kid": header["kid"] });
    rejected(&forge(&none, &payload, &[]), "svc", "algorithm");
    rejected(&forge(&none, &payload, &sig), "svc", "algorithm");
    // HS256 keyed with the public JWK (the classic algorithm confusion).
    {
        use hmac_sha256_for_test::hs256;
        let hs = serde_json::json!({ "alg": "HS256", "kid": header["kid"], "typ": "JWT" });
        let jwks = bundle(&s, &[], "jwks");
        let forged = hs256(&hs, &payload, jwks.as_bytes());
        rejected(&forged, "svc", "algorithm");
    }
    // Tampered payload under the original signature.
    payload["sub"] = "spiffe://edgeward.local/device/x/module/admin".into();
    rejected(&forge(&header, &payload, &sig), "svc", "signature");
    // A foreign key: under the real kid (signature fails), under its own
    // kid (unknown key).
    let foreign = {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).unwrap();
        p256::ecdsa::SigningKey::from_bytes(&b.into()).unwrap()
    };
    rejected(&es256(&foreign, &header, &payload), "svc", "signature");
    let own_kid = serde_json::json!({ "alg": "ES256", "kid": "attacker", "typ": "JWT" });
    rejected(&es256(&foreign, &own_kid, &payload), "svc", "unknown");
    let no_kid = serde_json::json!({ "alg": "ES256" });
    rejected(&es256(&foreign, &no_kid, &payload), "svc", "kid");
    // A token of another trust domain signed by a key this device trusts.
    let cfg = s.write(
        "other.toml",
        "[identity]\ntrust_domain = \"other.example\"\n",
    );
    let other = issue(&["--config", cfg.to_str().unwrap()], "svc", "60");
    rejected(&other, "svc", "trust domain");
    // Expired.
    let short = issue(&[], "svc", "1");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    rejected(&short, "svc", "expired");
    // Garbage.
    rejected("a.b", "svc", "JWS");
    rejected("!!!.???.***", "svc", "malformed");
}

/// HS256 for the algorithm-confusion case, from sha2 alone.
mod hmac_sha256_for_test {
    use base64ct::{Base64UrlUnpadded, Encoding as _};
    use sha2::{Digest as _, Sha256};

    pub fn hs256(h: &serde_json::Value, p: &serde_json::Value, key: &[u8]) -> String {
        let unsigned = format!(
            "{}.{}",
            Base64UrlUnpadded::encode_string(h.to_string().as_bytes()),
            Base64UrlUnpadded::encode_string(p.to_string().as_bytes())
        );
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
        let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
        let inner = Sha256::new()
            .chain_update(&ipad)
            .chain_update(unsigned.as_bytes())
            .finalize();
        let mac = Sha256::new()
            .chain_update(&opad)
            .chain_update(inner)
            .finalize();
        format!("{unsigned}.{}", Base64UrlUnpadded::encode_string(&mac))
    }
}

#[test]
fn bad_input_returns_errors_not_traps() {
    let s = Scratch::new();
    let out = probe(&s, &[], &["bad-input"]);
    // Beyond the cases every language's probe has: what the Rust SDK can
    // express that the others' bindings check before the call.
    assert_bad_input(
        &out,
        &[
            "encrypt-aad-oversized",
            "decrypt-version",
            "decrypt-truncated",
            "decrypt-tampered",
            "decrypt-wrong-aad",
            "validate-empty-audience",
            "validate-oversized",
            "server-cert-empty-cn",
            "server-cert-bad-name",
            "server-cert-too-many",
        ],
    );
}

#[test]
fn certificate_rotates_under_a_short_ttl() {
    let s = Scratch::new();
    let cfg = s.write("c.toml", "[identity]\nsvid_ttl = \"4s\"\n");
    let out = probe(
        &s,
        &["--config", cfg.to_str().unwrap()],
        &["certs", "5", "900"],
    );
    let mut leaves: Vec<(String, u64)> = Vec::new();
    for i in 0..5 {
        let sig = unhex(line_value(&out, &format!("certs {i} sig ")));
        let expires: u64 = line_value(&out, &format!("certs {i} expires "))
            .parse()
            .unwrap();
        let block = out.split(&format!("certs {i} expires ")).nth(1).unwrap();
        let leaf = pem_blocks(block)[0].clone();
        assert!(
            verifies(&leaf, format!("reading-{i}").as_bytes(), &sig),
            "signature {i} does not verify with the certificate of that moment"
        );
        leaves.push((leaf, expires));
    }
    leaves.dedup();
    // 5 × 0.9 s over a 4 s TTL: renewed at least once, and never before
    // half the previous leaf's lifetime had passed.
    assert!(leaves.len() >= 2, "no renewal in {out}");
    for w in leaves.windows(2) {
        assert!(
            w[1].1 >= w[0].1 + 2,
            "renewed before half-life: {} then {}",
            w[0].1,
            w[1].1
        );
    }
}

fn vault_config(modules: &[(&str, &str)]) -> String {
    let digest = sha256sum(PROBE);
    let mut c = String::from("[identity]\ndevice_id = \"dev-1\"\n");
    for (name, action) in modules {
        c.push_str(&format!(
            "\n[[module]]\nname = \"{name}\"\nfile = \"{PROBE}\"\ndigest = \"{digest}\"\nargs = [\"{action}\"]\nrestart = \"never\"\n"
        ));
    }
    c
}

fn run_daemon_until(s: &Scratch, config: &str, expect: &[&str]) -> Vec<String> {
    let mut d = Daemon::start(s, config);
    for e in expect {
        let e = e.to_string();
        d.wait_for(&e.clone(), move |out, _| out.iter().any(|l| l.contains(&e)));
    }
    let (status, out, _) = d.terminate();
    assert!(status.success());
    out
}

#[test]
fn sealed_data_is_bound_to_module_and_registration() {
    let s = Scratch::new();
    let modules = s.state().join("modules");
    // First start: alpha seals a secret in its data dir; whoami shows its
    // registration.
    let out = run_daemon_until(
        &s,
        &vault_config(&[("alpha", "vault"), ("who", "whoami")]),
        &["alpha | vault-seal ok", "who | spiffe_id="],
    );
    let who = |out: &[String], key: &str| {
        out.iter()
            .find_map(|l| l.strip_prefix(&format!("who | {key}=")))
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        who(&out, "spiffe_id"),
        "spiffe://edgeward.local/device/dev-1/module/who"
    );
    assert_eq!(who(&out, "digest"), sha256sum(PROBE));
    let who_generation = who(&out, "generation_id");
    let secret = std::fs::read(modules.join("alpha/data/secret")).unwrap();
    assert_eq!(secret[0], 1, "ciphertext starts with its version byte");

    // Second start: alpha opens it; beta, handed alpha's ciphertext, cannot;
    // the registrations (generations) survived the restart.
    std::fs::create_dir_all(modules.join("beta/data")).unwrap();
    std::fs::write(modules.join("beta/data/secret"), &secret).unwrap();
    let out = run_daemon_until(
        &s,
        &vault_config(&[("alpha", "vault"), ("beta", "vault"), ("who", "whoami")]),
        &[
            "alpha | vault-open",
            "beta | vault-open",
            "who | generation_id=",
        ],
    );
    let alpha = out
        .iter()
        .find(|l| l.contains("alpha | vault-open"))
        .unwrap();
    assert!(alpha.contains("vault-open ok secret-of-"), "{alpha}");
    let beta = out
        .iter()
        .find(|l| l.contains("beta | vault-open"))
        .unwrap();
    assert!(
        beta.contains("vault-open err invalid-argument: ciphertext: authentication failed"),
        "{beta}"
    );
    assert_eq!(who(&out, "generation_id"), who_generation);

    // Not while a daemon holds the registry: the command says so.
    let mut d = Daemon::start(&s, &vault_config(&[]));
    d.wait_for("the daemon to start", |_, err| {
        count(err, "edgeward daemon starting") == 1
    });
    let o = s.edgeward().args(["deregister", "alpha"]).output().unwrap();
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("registry.redb") && stderr(&o).contains("in use by another process"),
        "{}",
        stderr(&o)
    );
    let _ = d.terminate();
    // Re-registered under the same name: the old data is gone for good.
    let o = s.edgeward().args(["deregister", "alpha"]).output().unwrap();
    assert_status(&o, 0);
    let o = s.edgeward().args(["deregister", "alpha"]).output().unwrap();
    assert_status(&o, 1);
    assert!(stderr(&o).contains("not registered"), "{}", stderr(&o));
    let out = run_daemon_until(
        &s,
        &vault_config(&[("alpha", "vault")]),
        &["alpha | vault-open"],
    );
    let alpha = out
        .iter()
        .find(|l| l.contains("alpha | vault-open"))
        .unwrap();
    assert!(alpha.contains("err invalid-argument"), "{alpha}");
}

#[test]
fn ephemeral_runs_cannot_open_each_others_data() {
    let s = Scratch::new();
    let out = probe(&s, &[], &["encrypt", "hello", "ctx"]);
    let ct = line_value(&out, "encrypt ok ").to_owned();
    assert!(ct.starts_with("01"), "version byte");
    let out = probe(&s, &[], &["decrypt", &ct, "ctx"]);
    assert!(out.starts_with("decrypt err invalid-argument"), "{out}");
}

/// The name constraints an organisation puts on a device CA: the trust
/// domain's URIs, DNS names under edge.test, no IP address.
const CONSTRAINED: &str = "nameConstraints=critical,permitted;URI:edgeward.local,permitted;DNS:edge.test,excluded;IP:0.0.0.0/0.0.0.0,excluded;IP:0:0:0:0:0:0:0:0/0:0:0:0:0:0:0:0\n";

/// A certificate for the HSM's device CA key, made by an organisation root
/// with openssl: the chain the module gets includes it, the bundle is the
/// organisation root.
#[test]
fn configured_ca_certificate_chains_to_an_external_root() {
    let s = Scratch::new();
    let info = s
        .edgeward()
        .args(["hsm", "info", "--json"])
        .output()
        .unwrap();
    assert_status(&info, 0);
    // The device CA key exists once identity has been used.
    probe(&s, &[], &["whoami"]);
    let o = s.edgeward().args(["bundle"]).output().unwrap();
    assert_status(&o, 0);
    let info = s
        .edgeward()
        .args(["hsm", "info", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout(&info)).unwrap();
    let pubkey = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == "device-ca")
        .unwrap()["public_key_pem"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = s.path();
    let sh = |script: &str| {
        let o = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    };
    std::fs::write(dir.join("device-ca.pub"), pubkey).unwrap();
    std::fs::write(
        dir.join("ext.cnf"),
        format!("basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n{CONSTRAINED}"),
    )
    .unwrap();
    std::fs::write(
        dir.join("open.cnf"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("v4only.cnf"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nnameConstraints=critical,permitted;URI:edgeward.local,permitted;DNS:edge.test,excluded;IP:0.0.0.0/0.0.0.0\n",
    )
    .unwrap();
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout org.key -out org.pem -days 30 -subj '/O=Org/CN=Org Root' 2>/dev/null
        openssl x509 -new -force_pubkey device-ca.pub -subj '/O=Org/CN=gateway device CA' -CA org.pem -CAkey org.key -days 30 -extfile ext.cnf -out device-ca.pem
        cat device-ca.pem org.pem > ca-chain.pem");
    let cfg = s.write("c.toml", "[identity]\nca_certificate = \"ca-chain.pem\"\n");
    let cfg = cfg.to_str().unwrap();
    let out = probe(&s, &["--config", cfg], &["cert"]);
    let certs = pem_blocks(&out);
    assert_eq!(certs.len(), 2, "leaf then the device CA certificate");
    assert_eq!(
        pem_to_der(&certs[1]),
        pem_to_der(&std::fs::read_to_string(dir.join("device-ca.pem")).unwrap())
    );
    let pem = bundle(&s, &["--config", cfg], "pem");
    assert_eq!(
        pem_to_der(&pem),
        pem_to_der(&std::fs::read_to_string(dir.join("org.pem")).unwrap())
    );
    let id = format!(
        "spiffe://edgeward.local/device/{}/module/identity-probe",
        edgeward::identity::default_device_id()
    );
    check_svid(&s, &out, &pem, &id);

    // Every link is signature-checked: a root of the same name with another
    // key does not sign the device CA certificate.
    let refused = |chain: &str, why: &str| {
        let cfg = s.write(
            "bad.toml",
            &format!("[identity]\nca_certificate = \"{chain}\"\n"),
        );
        let o = s.run(
            PROBE,
            &["--config", cfg.to_str().unwrap()],
            &["token", "svc", "60"],
        );
        assert!(
            stdout(&o).starts_with("token err internal: "),
            "{}",
            stdout(&o)
        );
        assert!(
            stderr(&o).contains("ca_certificate") && stderr(&o).contains(why),
            "{chain}: {}",
            stderr(&o)
        );
    };
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout twin.key -out twin.pem -days 30 -subj '/O=Org/CN=Org Root' 2>/dev/null
        cat device-ca.pem twin.pem > twin-chain.pem");
    refused("twin-chain.pem", "signature does not verify");
    // A device CA the organisation did not name-constrain could certify
    // any name its root is trusted for: refused, naming the extension.
    sh("openssl x509 -new -force_pubkey device-ca.pub -subj '/O=Org/CN=gateway device CA' -CA org.pem -CAkey org.key -days 30 -extfile open.cnf -out dev-open.pem
        cat dev-open.pem org.pem > open-chain.pem");
    refused("open-chain.pem", "no nameConstraints");
    // IPv4 excluded but IPv6 left open is not constrained either.
    sh("openssl x509 -new -force_pubkey device-ca.pub -subj '/O=Org/CN=gateway device CA' -CA org.pem -CAkey org.key -days 30 -extfile v4only.cnf -out dev-v4.pem
        cat dev-v4.pem org.pem > v4-chain.pem");
    refused("v4-chain.pem", "IPv6 addresses unconstrained");
    // And every link's validity: a root that expired (made with `openssl
    // ca`, which takes explicit dates).
    sh("mkdir -p db && : > db/index.txt && echo 01 > db/serial
        printf '[ca]\ndefault_ca=d\n[d]\ndatabase=db/index.txt\nserial=db/serial\nnew_certs_dir=db\ndefault_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n' > ca.cnf
        printf 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n' > root.cnf
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout old.key -out old.csr -subj '/CN=Old Root' 2>/dev/null
        openssl ca -batch -config ca.cnf -selfsign -keyfile old.key -in old.csr -startdate 20200101000000Z -enddate 20200201000000Z -extfile root.cnf -out old.pem 2>/dev/null
        openssl x509 -new -force_pubkey device-ca.pub -subj '/O=Org/CN=gateway device CA' -CA old.pem -CAkey old.key -days 30 -extfile ext.cnf -out dev-old.pem
        cat dev-old.pem old.pem > old-chain.pem");
    refused("old-chain.pem", "expired");
    // An RSA organisation root is fine (signatures are checked with ring).
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout rsa.key -out rsa.pem -days 30 -subj '/O=Org/CN=RSA Root' 2>/dev/null
        openssl x509 -new -force_pubkey device-ca.pub -subj '/O=Org/CN=gateway device CA' -CA rsa.pem -CAkey rsa.key -days 30 -extfile ext.cnf -out dev-rsa.pem
        cat dev-rsa.pem rsa.pem > rsa-chain.pem");
    let cfg = s.write(
        "rsa.toml",
        "[identity]\nca_certificate = \"rsa-chain.pem\"\n",
    );
    let out = probe(&s, &["--config", cfg.to_str().unwrap()], &["cert"]);
    check_svid(
        &s,
        &out,
        &bundle(&s, &["--config", cfg.to_str().unwrap()], "pem"),
        &id,
    );

    // A certificate for some other key is refused with a clear error.
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout x.key -out wrong.pem -days 30 -subj '/CN=wrong' 2>/dev/null",
    );
    let cfg = s.write("w.toml", "[identity]\nca_certificate = \"wrong.pem\"\n");
    // `edgeward run` sets identity up at the first workload call: the module
    // runs, its call fails, and the reason is logged.
    let o = s.run(
        PROBE,
        &["--config", cfg.to_str().unwrap()],
        &["token", "svc", "60"],
    );
    assert_status(&o, 0);
    assert!(
        stdout(&o).starts_with("token err internal: "),
        "{}",
        stdout(&o)
    );
    assert!(
        stderr(&o).contains("ca_certificate")
            && stderr(&o).contains("not for the HSM's \"device-ca\" key"),
        "{}",
        stderr(&o)
    );
    // A module looping on the failing call cannot flood the host log: 20
    // lines per 10 s, then one that counts the rest.
    let o = s.run(
        PROBE,
        &["--config", cfg.to_str().unwrap()],
        &["tokens", "100", "0", "svc"],
    );
    assert_status(&o, 0);
    assert_eq!(
        stdout(&o).matches("err internal").count(),
        100,
        "{}",
        stdout(&o)
    );
    let logged = stderr(&o).matches("workload call failed").count();
    assert!(
        logged <= edgeward::runtime::loglimit::LINES_PER_WINDOW as usize,
        "{logged} log lines for 100 failing calls"
    );
    assert!(
        stderr(&o).contains("workload errors suppressed"),
        "{}",
        stderr(&o)
    );
    // The daemon refuses to start on it.
    let config = format!(
        "[identity]\nca_certificate = \"{}\"\n",
        dir.join("wrong.pem").display()
    );
    let path = s.write("daemon.toml", &config);
    let o = s.daemon_refused(&path);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("cannot set up workload identity")
            && stderr(&o).contains("ca_certificate"),
        "{}",
        stderr(&o)
    );
}

fn backend_round_trip(s: &Scratch, hsm_table: &str) {
    let cfg = s.write("hsm.toml", hsm_table);
    let cfg = cfg.to_str().unwrap();
    let flags = ["--config", cfg];
    let out = probe(s, &flags, &["cert"]);
    let id = format!(
        "spiffe://edgeward.local/device/{}/module/identity-probe",
        edgeward::identity::default_device_id()
    );
    let pem = bundle(s, &flags, "pem");
    check_svid(s, &out, &pem, &id);
    let out = probe(s, &flags, &["token", "svc", "60"]);
    let token = line_value(&out, "token ok ").to_owned();
    check_token(&token, &bundle(s, &flags, "jwks"), "svc", "edgeward.local");
    let out = probe(s, &flags, &["validate", &token, "svc"]);
    assert!(out.starts_with("validate ok "), "{out}");
}

#[test]
fn identity_on_the_tpm_backend() {
    let s = Scratch::new();
    let tpm = Swtpm::start();
    backend_round_trip(
        &s,
        &format!("[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n", tpm.tcti()),
    );
}

#[test]
fn identity_on_the_pkcs11_backend() {
    let s = Scratch::new();
    let token = SoftHsmToken::new();
    backend_round_trip(&s, &token.hsm_toml());
}

#[test]
fn jwt_working_key_rotates_and_old_tokens_stay_valid() {
    let s = Scratch::new();
    let cfg = s.write(
        "c.toml",
        "[identity]\njwt_key_rotation = \"2s\"\nmax_token_ttl = \"60s\"\n",
    );
    let out = probe(
        &s,
        &["--config", cfg.to_str().unwrap()],
        &["tokens", "4", "1000", "svc"],
    );
    let tokens: Vec<String> = (0..4)
        .map(|i| line_value(&out, &format!("tokens {i} ok ")).to_owned())
        .collect();
    let jwks = bundle(&s, &[], "jwks");
    let mut kids: Vec<String> = tokens
        .iter()
        .map(|t| jsonwebtoken::decode_header(t).unwrap().kid.unwrap())
        .collect();
    for t in &tokens {
        check_token(t, &jwks, "svc", "edgeward.local");
        let out = probe(&s, &[], &["validate", t, "svc"]);
        assert!(out.starts_with("validate ok "), "{out}");
    }
    kids.dedup();
    assert!(kids.len() >= 2, "the working key did not rotate: {kids:?}");
}

/// The keys in `identity/jwt-keys.json`.
fn published_keys(s: &Scratch) -> Vec<serde_json::Value> {
    let path = s.state().join("identity/jwt-keys.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// What an attacker with write access to the state directory does: appends
/// a key (SEC1 `point`, base64 DER `certificate`) to the published JWT keys,
/// valid far into the future. Returns its `kid`.
fn publish_jwt_key(s: &Scratch, point: &[u8], certificate: &str) -> String {
    use sha2::Digest as _;
    let kid = Base64UrlUnpadded::encode_string(&sha2::Sha256::digest(point)[..16]);
    let mut keys = published_keys(s);
    keys.push(serde_json::json!({
        "kid": kid,
        "public_key": Base64::encode_string(point),
        "certificate": certificate,
        "valid_until": 4_000_000_000u64,
    }));
    std::fs::write(
        s.state().join("identity/jwt-keys.json"),
        serde_json::to_vec(&keys).unwrap(),
    )
    .unwrap();
    kid
}

#[test]
fn an_injected_jwt_key_is_not_trusted() {
    let s = Scratch::new();
    let good = line_value(&probe(&s, &[], &["token", "svc", "60"]), "token ok ").to_owned();
    // An attacker with write access to the state directory publishes their
    // own key, passing off a genuine key's certificate as its own, and
    // forges a token under it.
    let foreign = {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).unwrap();
        p256::ecdsa::SigningKey::from_bytes(&b.into()).unwrap()
    };
    let point = foreign.verifying_key().to_encoded_point(false);
    let real_cert = published_keys(&s)[0]["certificate"]
        .as_str()
        .unwrap()
        .to_owned();
    let kid = publish_jwt_key(&s, point.as_bytes(), &real_cert);
    let parts: Vec<&str> = good.split('.').collect();
    let payload: serde_json::Value =
        serde_json::from_slice(&Base64UrlUnpadded::decode_vec(parts[1]).unwrap()).unwrap();
    let header = serde_json::json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
    let forged = es256(&foreign, &header, &payload);
    let out = probe(&s, &[], &["validate", &forged, "svc"]);
    assert!(
        out.contains("err invalid-argument: token: unknown"),
        "{out}"
    );
    // Nor does it reach the bundle.
    assert!(!bundle(&s, &[], "jwks").contains(&kid));
    // The genuine token still validates.
    let out = probe(&s, &[], &["validate", &good, "svc"]);
    assert!(out.starts_with("validate ok "), "{out}");
}

/// A module holds its own X509-SVID key, which the device CA certified. With
/// write access to the state directory it must still not be able to pass
/// that key off as a JWT working key and forge tokens for other modules.
#[test]
fn a_modules_own_svid_key_cannot_sign_tokens() {
    use p256::pkcs8::DecodePrivateKey as _;
    let s = Scratch::new();
    // The published-keys file exists once a token was issued.
    let good = line_value(&probe(&s, &[], &["token", "svc", "60"]), "token ok ").to_owned();
    let out = probe(&s, &[], &["cert"]);
    let leaf = pem_to_der(&pem_blocks(&out)[0]);
    let key = p256::ecdsa::SigningKey::from_pkcs8_der(&private_key_der(&out)).unwrap();
    let point = key.verifying_key().to_encoded_point(false);
    let kid = publish_jwt_key(&s, point.as_bytes(), &Base64::encode_string(&leaf));
    // A token for another module of the trust domain, signed by that key.
    let parts: Vec<&str> = good.split('.').collect();
    let mut payload: serde_json::Value =
        serde_json::from_slice(&Base64UrlUnpadded::decode_vec(parts[1]).unwrap()).unwrap();
    payload["sub"] = format!(
        "spiffe://edgeward.local/device/{}/module/victim",
        edgeward::identity::default_device_id()
    )
    .into();
    let header = serde_json::json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
    let forged = es256(&key, &header, &payload);
    let out = probe(&s, &[], &["validate", &forged, "svc"]);
    assert!(
        out.contains("err invalid-argument: token: unknown"),
        "{out}"
    );
    // It never reaches the bundle, and the genuine token still validates.
    let jwks = bundle(&s, &[], "jwks");
    assert!(!jwks.contains(&kid), "{jwks}");
    check_token(&good, &jwks, "svc", "edgeward.local");
    let out = probe(&s, &[], &["validate", &good, "svc"]);
    assert!(out.starts_with("validate ok "), "{out}");
}

#[test]
fn a_tampered_registration_is_refused_by_name() {
    let s = Scratch::new();
    run_daemon_until(
        &s,
        &vault_config(&[("alpha", "vault")]),
        &["alpha | vault-seal ok"],
    );
    // Tamper with alpha's registration in the store (the daemon is stopped).
    let registry = edgeward::registry::Registry::open(&s.state()).unwrap();
    let mut rec = registry.registration("alpha").unwrap().unwrap();
    rec.generation_id = "00000000000000000000000000000000".into();
    assert!(registry.deregister("alpha").unwrap());
    registry.register("alpha", &rec).unwrap();
    drop(registry);
    let mut d = Daemon::start(&s, &vault_config(&[("alpha", "vault"), ("beta", "vault")]));
    d.wait_for("beta to run", |out, _| {
        count(out, "beta | vault-seal ok") >= 1
    });
    d.wait_for("alpha to be refused", |_, err| {
        count(err, "module refused") >= 1
    });
    let (_, out, err) = d.terminate();
    let line = err.iter().find(|l| l.contains("module refused")).unwrap();
    assert!(
        line.contains("alpha")
            && line.contains("registry.redb: registration of")
            && line.contains("cannot be unwrapped"),
        "{line}"
    );
    assert_eq!(count(&out, "alpha |"), 0);
    // The record is left as it was (never silently replaced, which would
    // orphan the module's sealed data).
    let registry = edgeward::registry::Registry::open(&s.state()).unwrap();
    assert_eq!(registry.registration("alpha").unwrap(), Some(rec));
}

/// A state directory from before the registry (registrations as
/// `identity/modules/<name>.json`) is migrated once: the module keeps its
/// generation and opens what it sealed before; the old records are gone.
#[test]
fn a_state_dir_from_before_the_registry_is_migrated() {
    let s = Scratch::new();
    let out = run_daemon_until(
        &s,
        &vault_config(&[("alpha", "vault")]),
        &["alpha | vault-seal ok"],
    );
    let sealed = out
        .iter()
        .find_map(|l| l.split("alpha | vault-seal ok ").nth(1))
        .unwrap()
        .to_owned();
    // Turn the state dir into one from before: the registration as a file
    // of the old layout, no store.
    let registry = edgeward::registry::Registry::open(&s.state()).unwrap();
    let rec = registry.registration("alpha").unwrap().unwrap();
    drop(registry);
    std::fs::remove_file(s.state().join(edgeward::registry::FILE)).unwrap();
    let legacy = s.state().join("identity/modules");
    std::fs::create_dir_all(&legacy).unwrap();
    std::fs::write(
        legacy.join("alpha.json"),
        serde_json::to_string_pretty(&rec).unwrap(),
    )
    .unwrap();

    let out = run_daemon_until(
        &s,
        &vault_config(&[("alpha", "vault")]),
        &["alpha | vault-open"],
    );
    let opened = out
        .iter()
        .find(|l| l.contains("alpha | vault-open"))
        .unwrap();
    assert!(
        opened.ends_with(&format!("vault-open ok {sealed}")),
        "{opened}"
    );
    assert!(!legacy.exists(), "the old records were deleted");
    let registry = edgeward::registry::Registry::open(&s.state()).unwrap();
    assert_eq!(registry.registration("alpha").unwrap(), Some(rec));
}

#[test]
fn concurrent_processes_keep_each_others_jwt_keys() {
    let s = Scratch::new();
    // Make the state (HSM, CA) first so the runs race only on publishing.
    probe(&s, &[], &["whoami"]);
    let children: Vec<_> = (0..6)
        .map(|_| {
            s.edgeward()
                .arg("run")
                .arg(PROBE)
                .args(["--", "token", "svc", "60"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let tokens: Vec<String> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            assert_status(&o, 0);
            line_value(&stdout(&o), "token ok ").to_owned()
        })
        .collect();
    let jwks = bundle(&s, &[], "jwks");
    for t in &tokens {
        check_token(t, &jwks, "svc", "edgeward.local");
    }
}
