//! The management API fuzzed from its OpenAPI document: schemathesis
//! (installed by scripts/setup from PyPI) through a socat bridge from
//! loopback TCP to the daemon's unix socket. Every generated request is
//! answered without a 5xx and the daemon stays up. Missing tools fail the
//! test (run scripts/setup), never skip it.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;

fn schemathesis() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools/schemathesis/bin/schemathesis");
    assert!(p.exists(), "{} is missing: run scripts/setup", p.display());
    p
}

#[test]
fn the_api_survives_schemathesis_without_a_server_error() {
    let tool = schemathesis();
    let s = Scratch::new();
    let probe = guests::SANDBOX_PROBE;
    // A module, so generated requests can meet a real one.
    let config = format!(
        "[[module]]\nname = \"configured\"\nfile = \"{probe}\"\ndigest = \"{}\"\nargs = [\"tick\"]\n",
        sha256sum(probe)
    );
    let mut d = Daemon::start(&s, &config);
    d.wait_for("the daemon to start", |_, err| {
        count(err, "edgeward daemon starting") == 1
    });
    let port = edgeward_tests::fixtures::free_port();
    let mut bridge = Command::new("socat")
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
        .arg(format!("UNIX-CONNECT:{}", s.socket().display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("socat (scripts/setup installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the socat bridge did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    // Its example database and caches go to the scratch dir, not the tree.
    let out = Command::new(&tool)
        .current_dir(s.path())
        .arg("run")
        .arg(&doc)
        .arg("--url")
        .arg(format!("http://127.0.0.1:{port}"))
        .args(["--checks", "not_a_server_error"])
        // A followed event stream does not end, by design (its own test
        // covers it): every other operation is fuzzed.
        .args(["--exclude-path", "/v1/events"])
        .args(["--max-examples", "60", "--seed", "20261129"])
        .args(["--request-timeout", "20"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let _ = bridge.kill();
    let _ = bridge.wait();
    let report = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("generated") || l.contains("passed") || l.contains("failed"))
        .collect();
    println!("schemathesis: {}", summary.join(" | "));
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}"
    );
    assert!(report.contains("passed"), "{report}");
    // Still up, and its own log holds no panic.
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{}", err.join("\n"));
    assert!(
        !err.iter().any(|l| l.contains("panicked")),
        "{}",
        err.join("\n")
    );
}
