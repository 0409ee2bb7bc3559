//! HSM PAL latency: sign (SHA-256 digest), encrypt (1 KiB) and quote, per
//! backend, p50 and p99, with the ratios tpm/soft and pkcs11/soft measured in
//! the same run. The TPM is a local swtpm and the token a SoftHSM2 token, so
//! the TPM figures are a lower bound for a discrete TPM on a bus.
//!
//! Run with `scripts/bench` (or `cargo bench -p edgeward-tests --bench hsm`).

use std::sync::Arc;

use edgeward::hsm::{Hsm, soft::SoftHsm};
use edgeward_hsm_hw::{pkcs11::Pkcs11Hsm, tpm::TpmHsm};
use edgeward_tests::fixtures::{SoftHsmToken, Swtpm};

mod common;
use common::{Stats, measure, us};

fn bench(h: &dyn Hsm, n: usize) -> [Option<Stats>; 3] {
    h.signing_key("device-ca").expect("signing key");
    h.aead_key("master-encryption").expect("aead key");
    let digest = [7u8; 32];
    let data = vec![0x5a; 1024];
    let sign = measure(n, || {
        h.sign_digest("device-ca", &digest).expect("sign");
    });
    let encrypt = measure(n, || {
        h.encrypt("master-encryption", &data, b"ad")
            .expect("encrypt");
    });
    let quote = h.attestation_key("attestation").ok().and_then(|_| {
        h.quote("attestation", b"nonce").ok()?;
        Some(measure(n, || {
            h.quote("attestation", b"nonce").expect("quote");
        }))
    });
    [Some(sign), Some(encrypt), quote]
}

fn main() {
    let soft_dir = tempfile::tempdir().expect("tempdir");
    let soft: Arc<dyn Hsm> = Arc::new(SoftHsm::open(soft_dir.path()).expect("soft"));
    let swtpm = Swtpm::start();
    let tpm_dir = tempfile::tempdir().expect("tempdir");
    let tpm: Arc<dyn Hsm> = Arc::new(TpmHsm::open(tpm_dir.path(), swtpm.config()).expect("tpm"));
    let token = SoftHsmToken::new();
    let pkcs11: Arc<dyn Hsm> = Arc::new(Pkcs11Hsm::open(token.config()).expect("pkcs11"));

    let results = [
        ("soft", bench(soft.as_ref(), 2000)),
        ("tpm", bench(tpm.as_ref(), 200)),
        ("pkcs11", bench(pkcs11.as_ref(), 1000)),
    ];
    let ops = ["sign", "encrypt_1k", "quote"];
    println!(
        "{:<8} {:<11} {:>12} {:>12}",
        "backend", "operation", "p50 (µs)", "p99 (µs)"
    );
    for (name, stats) in &results {
        for (op, s) in ops.iter().zip(stats) {
            match s {
                Some(s) => println!("{name:<8} {op:<11} {:>12.1} {:>12.1}", us(s.p50), us(s.p99)),
                None => println!("{name:<8} {op:<11} {:>12} {:>12}", "unsupported", "-"),
            }
        }
    }
    let soft_stats = &results[0].1;
    for (name, stats) in &results[1..] {
        for ((op, s), base) in ops.iter().zip(stats).zip(soft_stats) {
            if let (Some(s), Some(b)) = (s, base) {
                println!(
                    "hsm_{op}_{name}_vs_soft ratio={:.2}   (p99 ratio {:.2})",
                    s.p50.as_secs_f64() / b.p50.as_secs_f64(),
                    s.p99.as_secs_f64() / b.p99.as_secs_f64()
                );
            }
        }
    }
}
