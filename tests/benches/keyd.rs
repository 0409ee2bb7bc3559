//! The key daemon's cost: SVID issuance and a signature through
//! `edgeward-keyd` (a unix socket round trip, the TBSCertificate read and
//! held to the leaf policy) against the same in process, on the soft
//! backend, p50 and p99, with the ratio measured in the same run.
//!
//! Run with `scripts/bench` (it builds `edgeward-keyd` in release first).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeward::hsm::{Hsm, soft::SoftHsm};
use edgeward::identity::{IdentityConfig, IdentityService, Profile};

mod common;
use common::{Stats, measure, us};

/// (SVID issuance, a digest signature) p50/p99 with `hsm`.
fn bench(hsm: Arc<dyn Hsm>, state: &Path, n: usize) -> [Stats; 2] {
    let config = IdentityConfig {
        device_id: "gw-1".into(),
        ..IdentityConfig::default()
    };
    let id = IdentityService::open(hsm.clone(), config, state).expect("identity");
    let spiffe = id.spiffe_id("sensor");
    let ttl = Duration::from_secs(3600);
    let issue = measure(n, || {
        id.authority()
            .issue_leaf(&Profile::Svid, &spiffe, ttl)
            .expect("issue");
    });
    hsm.signing_key("cloud-client").expect("key");
    let sign = measure(n, || {
        hsm.sign_digest("cloud-client", &[7; 32]).expect("sign");
    });
    [issue, sign]
}

fn main() {
    let keyd = Path::new(env!("CARGO_BIN_EXE_edgeward-under-test")).with_file_name("edgeward-keyd");
    assert!(
        keyd.exists(),
        "{} is missing: cargo build --profile bench -p edgeward-keyd",
        keyd.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let local_state = dir.path().join("local");
    std::fs::create_dir_all(&local_state).expect("dir");
    let local: Arc<dyn Hsm> = Arc::new(SoftHsm::open(&local_state).expect("soft"));
    let socket = dir.path().join("keyd.sock");
    let mut child = std::process::Command::new(&keyd)
        .arg("--state")
        .arg(dir.path().join("keyd"))
        .arg("--socket")
        .arg(&socket)
        .args(["--device-id", "gw-1"])
        .env("EDGEWARD_LOG", "warn")
        .spawn()
        .expect("start edgeward-keyd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "edgeward-keyd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let remote: Arc<dyn Hsm> =
        Arc::new(edgeward::keyd::RemoteHsm::connect(&socket).expect("connect"));
    let remote_state = dir.path().join("remote");
    std::fs::create_dir_all(&remote_state).expect("dir");
    let n = 1000;
    let a = bench(local, &local_state, n);
    let b = bench(remote, &remote_state, n);
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "{:<14} {:>14} {:>14} {:>14} {:>14}",
        "operation", "in-process p50", "keyd p50", "in-process p99", "keyd p99"
    );
    for (i, op) in ["svid_issue", "sign_digest"].iter().enumerate() {
        println!(
            "{op:<14} {:>11.1} µs {:>11.1} µs {:>11.1} µs {:>11.1} µs",
            us(a[i].p50),
            us(b[i].p50),
            us(a[i].p99),
            us(b[i].p99)
        );
    }
    for (i, op) in ["svid_issue", "sign_digest"].iter().enumerate() {
        println!(
            "keyd_{op} ratio={:.2} (p50 through the key daemon / in process)",
            us(b[i].p50) / us(a[i].p50)
        );
    }
    self_measurement(&keyd, dir.path());
    hash_against_openssl(&keyd);
    hash_against_openssl(Path::new(env!("CARGO_BIN_EXE_edgeward-under-test")));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The key daemon's hash of its own executable at start (its log's
/// `hash_ms`), median of 15 starts.
fn self_measurement(keyd: &Path, dir: &Path) {
    use std::io::BufRead as _;
    let mut ms = Vec::new();
    for i in 0..15 {
        let socket = dir.join(format!("self-{i}.sock"));
        let mut child = std::process::Command::new(keyd)
            .arg("--state")
            .arg(dir.join("self"))
            .arg("--socket")
            .arg(&socket)
            .args(["--device-id", "gw-1"])
            .env("EDGEWARD_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start edgeward-keyd");
        let err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        let line = err
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("measured itself"))
            .expect("the key daemon's self-measurement line");
        let v = line
            .split("hash_ms=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|r| r.parse::<f64>().ok())
            .expect("hash_ms");
        ms.push(v);
        let _ = child.kill();
        let _ = child.wait();
    }
    let bytes = std::fs::metadata(keyd).map_or(0, |m| m.len());
    println!(
        "keyd_self_hash median={:.2} ms ({bytes} bytes; target <= 2 ms)",
        median(ms)
    );
}

/// `Digest::of_file` (what the launcher hashes the runtime with) against a
/// whole `openssl dgst -sha256` process on the same file, medians of 15.
fn hash_against_openssl(file: &Path) {
    let ours = median(
        (0..15)
            .map(|_| {
                let t = Instant::now();
                edgeward::measure::Digest::of_file(file).expect("hash");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let theirs = median(
        (0..15)
            .map(|_| {
                let t = Instant::now();
                let o = std::process::Command::new("openssl")
                    .args(["dgst", "-sha256"])
                    .arg(file)
                    .output()
                    .expect("openssl");
                assert!(o.status.success());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let bytes = std::fs::metadata(file).map_or(0, |m| m.len());
    println!(
        "hash {} ({bytes} bytes): ours {ours:.2} ms, openssl dgst {theirs:.2} ms (a process); speed ratio={:.2} (target >= 0.9)",
        file.display(),
        theirs / ours
    );
}
