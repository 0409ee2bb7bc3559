//! Measured bootstrap: the daemon measures its executable, its effective
//! configuration and every module into the HSM's register and this boot's
//! event log (TCG CEL-JSON as JSON-SEQ); an independent replay (Python's
//! `json` and `hashlib`, not edgeward's code) recomputes every digest from
//! its content and the register from the digests. The log continues across
//! daemon restarts within a boot and starts anew (with the soft register)
//! at a new boot; `edgeward run` measures only with `--measure`. On the TPM
//! the register is PCR 13, which software cannot reset.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;
use edgeward_tests::fixtures::Swtpm;

/// Replays a JSON-SEQ CEL log with Python: checks each record's digest is
/// the SHA-256 of its canonical content (sorted keys, no whitespace, as
/// RFC 8785 for these contents) and prints the register value, then each
/// record's kind.
const REPLAY: &str = r#"
import hashlib, json, sys
data = open(sys.argv[1], 'rb').read()
value = bytes(32)
kinds = []
for i, chunk in enumerate(c for c in data.split(b'\x1e') if c.strip()):
    r = json.loads(chunk)
    assert r['recnum'] == i, ('recnum', i, r['recnum'])
    assert r['content_type'] == 'edgeward'
    d = bytes.fromhex(r['digests'][0]['digest'])
    assert r['digests'][0]['hashAlg'] == 'sha256'
    kind = r['content']['kind']
    kinds.append(kind)
    if kind == 'baseline':
        value = d
        continue
    canon = json.dumps(r['content'], sort_keys=True, separators=(',', ':'), ensure_ascii=False)
    assert hashlib.sha256(canon.encode()).digest() == d, ('digest', i)
    value = hashlib.sha256(value + d).digest()
print(value.hex())
print(' '.join(kinds))
"#;

/// (register value, kinds in order) replayed from `log`.
fn replay(log: &Path) -> (String, Vec<String>) {
    let o = std::process::Command::new("python3")
        .args(["-c", REPLAY])
        .arg(log)
        .output()
        .expect("python3 (scripts/setup installs it)");
    assert!(o.status.success(), "replay failed: {}", stderr(&o));
    let out = stdout(&o);
    let mut lines = out.lines();
    let value = lines.next().unwrap().to_owned();
    let kinds = lines
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    (value, kinds)
}

fn boot(s: &Scratch, id: &str) -> PathBuf {
    s.write("boot_id", id)
}

fn register(s: &Scratch, boot_file: &Path, config: Option<&Path>) -> String {
    let mut c = s.edgeward();
    c.env("EDGEWARD_BOOT_ID_FILE", boot_file)
        .args(["hsm", "info", "--json"]);
    if let Some(config) = config {
        c.arg("--config").arg(config);
    }
    let o = c.output().unwrap();
    assert_status(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    v["register"].as_str().unwrap().to_owned()
}

fn start(s: &Scratch, config: &str, boot_file: &Path) -> Daemon {
    let d = Daemon::start_with_env(
        s,
        config,
        &[("EDGEWARD_BOOT_ID_FILE", boot_file.to_str().unwrap())],
    );
    wait_for_socket(s);
    d
}

fn module(s: &Scratch, args: &[&str]) -> std::process::Output {
    s.edgeward().arg("module").args(args).output().unwrap()
}

#[test]
fn the_daemon_measures_what_it_runs_and_a_replay_matches() {
    let s = Scratch::new();
    let b = boot(&s, "11111111-2222-3333-4444-555555555555");
    let probe = guests::SANDBOX_PROBE;
    let config = format!(
        "[[module]]\nname = \"m\"\nfile = \"{probe}\"\ndigest = \"{}\"\nargs = [\"tick\"]\n",
        sha256sum(probe)
    );
    let mut d = start(&s, &config, &b);
    d.wait_for("m to load", |_, err| {
        err.iter().any(|l| l.contains("module measured and loaded"))
    });
    // An operator's add and remove: a module event, then the removal.
    assert_status(&module(&s, &["add", "extra", probe, "--arg", "tick"]), 0);
    assert_status(&module(&s, &["remove", "extra"]), 0);
    let _ = d.terminate();

    let log = s
        .state()
        .join("measurements/11111111-2222-3333-4444-555555555555.log");
    let (value, kinds) = replay(&log);
    assert_eq!(
        kinds,
        [
            "executable",
            "config",
            "module",
            "module",
            "registration-removed"
        ]
    );
    assert_eq!(
        value,
        register(&s, &b, None),
        "the log replays to the register"
    );
    // What the records say: this binary, the module's digest.
    let text = std::fs::read_to_string(&log).unwrap();
    let records: Vec<serde_json::Value> = text
        .split('\u{1e}')
        .filter(|r| !r.trim().is_empty())
        .map(|r| serde_json::from_str(r).unwrap())
        .collect();
    assert_eq!(
        records[0]["content"]["sha256"],
        sha256sum(EDGEWARD),
        "the executable's own bytes"
    );
    assert_eq!(records[2]["content"]["name"], "m");
    assert_eq!(records[2]["content"]["digest"], sha256sum(probe));
    assert_eq!(records[1]["content"]["config"]["modules"][0]["name"], "m");

    // A restart within the boot continues the log and the register.
    let d = start(&s, &config, &b);
    std::thread::sleep(Duration::from_millis(10));
    let deadline = Instant::now() + Duration::from_secs(20);
    while replay(&log).1.len() < 8 {
        assert!(Instant::now() < deadline, "{:?}", replay(&log).1);
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = d.terminate();
    let (value, kinds) = replay(&log);
    assert_eq!(kinds[5..], ["executable", "config", "module"]);
    assert_eq!(value, register(&s, &b, None));

    // A new boot: a new log, and the soft register starts from zero.
    let b2 = boot(&s, "66666666-7777-8888-9999-000000000000");
    let d = start(&s, &config, &b2);
    let log2 = s
        .state()
        .join("measurements/66666666-7777-8888-9999-000000000000.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log2.exists() || replay(&log2).1.len() < 3 {
        assert!(Instant::now() < deadline, "no log for the new boot");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = d.terminate();
    let (value, kinds) = replay(&log2);
    assert_eq!(
        kinds,
        ["executable", "config", "module"],
        "no baseline: reset"
    );
    assert_eq!(value, register(&s, &b2, None));

    // A tampered record no longer replays.
    let edited = text.replacen("\"name\":\"m\"", "\"name\":\"n\"", 1);
    let tampered = s.write("tampered.log", &edited);
    let o = std::process::Command::new("python3")
        .args(["-c", REPLAY])
        .arg(&tampered)
        .output()
        .unwrap();
    assert!(!o.status.success(), "an edited record must not replay");
}

#[test]
fn run_measures_only_when_asked() {
    let s = Scratch::new();
    let b = boot(&s, "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee");
    let probe = guests::SANDBOX_PROBE;
    let run = |flags: &[&str]| {
        let mut c = s.edgeward();
        c.env("EDGEWARD_BOOT_ID_FILE", &b)
            .arg("run")
            .args(flags)
            .arg(probe)
            .args(["--", "hello"]);
        c.output().unwrap()
    };
    assert_status(&run(&[]), 0);
    let log = s
        .state()
        .join("measurements/aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee.log");
    assert!(!log.exists(), "no log without --measure");
    assert!(
        !s.state().join("hsm").exists(),
        "no HSM opened without --measure"
    );
    assert_status(&run(&["--measure"]), 0);
    let (value, kinds) = replay(&log);
    assert_eq!(kinds, ["executable", "module"]);
    assert_eq!(value, register(&s, &b, None));
}

#[test]
fn on_the_tpm_the_register_is_a_pcr_software_cannot_reset() {
    let s = Scratch::new();
    let b = boot(&s, "12121212-3434-5656-7878-909090909090");
    let tpm = Swtpm::start();
    let hsm = format!("[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n", tpm.tcti());
    let probe = guests::SANDBOX_PROBE;
    let config = format!(
        "{hsm}\n[[module]]\nname = \"m\"\nfile = \"{probe}\"\ndigest = \"{}\"\nargs = [\"tick\"]\n",
        sha256sum(probe)
    );
    let mut d = start(&s, &config, &b);
    d.wait_for("m to load", |_, err| {
        err.iter().any(|l| l.contains("module measured and loaded"))
    });
    let _ = d.terminate();
    let log = s
        .state()
        .join("measurements/12121212-3434-5656-7878-909090909090.log");
    let (value, kinds) = replay(&log);
    assert_eq!(kinds, ["executable", "config", "module"]);
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("\"pcr\":13"),
        "records name PCR 13"
    );
    // Read by tpm2-tools, not by edgeward.
    let pcrread = || {
        let o = std::process::Command::new("tpm2_pcrread")
            .args(["-T", &tpm.tcti(), "sha256:13"])
            .output()
            .expect("tpm2_pcrread (scripts/setup installs tpm2-tools)");
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
            .lines()
            .find_map(|l| l.trim().strip_prefix("13: 0x"))
            .unwrap()
            .trim()
            .to_lowercase()
    };
    assert_eq!(pcrread(), value);
    // Software cannot reset it.
    let o = std::process::Command::new("tpm2_pcrreset")
        .args(["-T", &tpm.tcti(), "13"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "PCR 13 was reset: {}", stdout(&o));
    assert_eq!(pcrread(), value, "and it kept its value");
}

/// `name`'s state and reason in `module list`.
fn state_and_reason(s: &Scratch, name: &str) -> (String, String) {
    let o = module(s, &["list", "--json"]);
    assert_status(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let m = v
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .cloned()
        .unwrap_or_default();
    (
        m["state"].as_str().unwrap_or("absent").to_owned(),
        m["reason"].as_str().unwrap_or("").to_owned(),
    )
}

fn wait_state(s: &Scratch, name: &str, want: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (state, reason) = state_and_reason(s, name);
        if state == want {
            return reason;
        }
        assert!(Instant::now() < deadline, "{name}: {state}, not {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The watchdog: a stored component altered while its module runs, or its
/// compiled code, stops the module within an interval, with the reason, as
/// a measured event; it is not restarted.
#[test]
fn the_watchdog_stops_a_module_whose_code_changed_under_it() {
    let s = Scratch::new();
    let b = boot(&s, "31313131-3434-5656-7878-909090909090");
    let config = "[runtime]\nintegrity_interval = \"1s\"\n";
    let d = start(&s, config, &b);
    let probe = guests::SANDBOX_PROBE;
    let sensor = guests::TEMPERATURE_SENSOR;
    assert_status(&module(&s, &["add", "a", probe, "--arg", "tick"]), 0);
    assert_status(
        &module(&s, &["add", "b", sensor, "--setting", "interval_ms=1000"]),
        0,
    );
    wait_state(&s, "a", "running", Duration::from_secs(20));
    wait_state(&s, "b", "running", Duration::from_secs(20));
    // a: its stored component; b: its compiled code.
    let stored = s.state().join(format!(
        "components/{}.wasm",
        sha256sum(probe).replace(':', "-")
    ));
    assert!(stored.exists(), "{}", stored.display());
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&stored, &bytes).unwrap();
    let hex = sha256sum(sensor).trim_start_matches("sha256:").to_owned();
    let cached = std::fs::read_dir(s.state().join("cache"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&hex))
        .expect("b's cache entry");
    let mut bytes = std::fs::read(&cached).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&cached, &bytes).unwrap();

    let t = Instant::now();
    let why_a = wait_state(&s, "a", "integrity-failed", Duration::from_secs(10));
    let why_b = wait_state(&s, "b", "integrity-failed", Duration::from_secs(10));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "not within one interval: {:?}",
        t.elapsed()
    );
    assert!(why_a.contains("no longer matches"), "{why_a}");
    assert!(
        why_b.contains("compiled code") && why_b.contains("authentication"),
        "{why_b}"
    );
    // Not restarted.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(state_and_reason(&s, "a").0, "integrity-failed");
    assert_eq!(state_and_reason(&s, "b").0, "integrity-failed");
    let _ = d.terminate();
    let log = s
        .state()
        .join("measurements/31313131-3434-5656-7878-909090909090.log");
    let (value, kinds) = replay(&log);
    assert_eq!(
        kinds.iter().filter(|k| *k == "integrity-failure").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(value, register(&s, &b, None));
}

/// `[runtime] measure = false`: no log, the register untouched (and the
/// daemon says the device cannot be attested).
#[test]
fn a_daemon_told_not_to_measure_measures_nothing() {
    let s = Scratch::new();
    let b = boot(&s, "41414141-3434-5656-7878-909090909090");
    let mut d = start(&s, "[runtime]\nmeasure = false\n", &b);
    d.wait_for("the warning", |_, err| {
        err.iter().any(|l| l.contains("cannot be attested"))
    });
    let _ = d.terminate();
    assert!(!s.state().join("measurements").exists());
    assert_eq!(register(&s, &b, None), "0".repeat(64));
}

/// The wasmsign2 CLI `scripts/setup` installs (the test fails without it).
fn wasmsign2() -> std::process::Command {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/wasmsign2/bin/wasmsign2");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup",
        bin.display()
    );
    std::process::Command::new(bin)
}

/// Publisher signatures: unsigned, another key, altered after signing and
/// a truncated signature are refused before compiling (exit 3, the reason
/// named); detached and embedded signatures by the right key run; both
/// interoperate with the wasmsign2 CLI, both ways; with --measure the
/// module's event names its publisher, and a refusal is measured.
#[test]
fn publisher_signatures_are_required_and_interoperate_with_wasmsign2() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = Scratch::new();
    let b = boot(&s, "51515151-3434-5656-7878-909090909090");
    let keygen = |prefix: &str| {
        let o = s
            .edgeward()
            .args(["keygen", "--out"])
            .arg(s.path().join(prefix))
            .output()
            .unwrap();
        assert_status(&o, 0);
        (
            s.path().join(format!("{prefix}.key")),
            s.path().join(format!("{prefix}.pub")),
        )
    };
    let (key, public) = keygen("k");
    let (_, other) = keygen("other");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let file = s.path().join("c.wasm");
    std::fs::copy(guests::SANDBOX_PROBE, &file).unwrap();
    let run = |file: &Path, publisher: &Path, extra: &[&str]| {
        s.edgeward()
            .env("EDGEWARD_BOOT_ID_FILE", &b)
            .arg("run")
            .arg("--publisher")
            .arg(publisher)
            .arg("--require-signature")
            .args(extra)
            .arg(file)
            .args(["--", "hello"])
            .output()
            .unwrap()
    };
    let refused = |o: &std::process::Output, why: &str| {
        assert_status(o, 3);
        assert!(stderr(o).contains(why), "{why}: {}", stderr(o));
        assert!(!stdout(o).contains("hello"), "it ran");
    };
    refused(&run(&file, &public, &[]), "is not signed");
    // Detached, by the right key.
    let o = s
        .edgeward()
        .arg("sign")
        .arg("--key")
        .arg(&key)
        .arg(&file)
        .output()
        .unwrap();
    assert_status(&o, 0);
    let sig = s.path().join("c.wasm.sig");
    assert!(sig.exists());
    let o = run(&file, &public, &["--measure"]);
    assert_status(&o, 0);
    assert!(stdout(&o).contains("hello"), "{}", stdout(&o));
    refused(&run(&file, &other, &[]), "does not verify");
    // Altered after signing (the signature beside it).
    let altered = s.path().join("altered.wasm");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&altered, &bytes).unwrap();
    std::fs::copy(&sig, s.path().join("altered.wasm.sig")).unwrap();
    refused(&run(&altered, &public, &["--measure"]), "does not verify");
    // A truncated signature.
    let truncated = s.path().join("t.wasm");
    std::fs::copy(&file, &truncated).unwrap();
    let full = std::fs::read(&sig).unwrap();
    std::fs::write(s.path().join("t.wasm.sig"), &full[..full.len() / 2]).unwrap();
    refused(&run(&truncated, &public, &[]), "does not verify");
    // Embedded, by edgeward: verified by wasmsign2, and run.
    let embedded = s.path().join("embedded.wasm");
    let o = s
        .edgeward()
        .args(["sign", "--embed", "--key"])
        .arg(&key)
        .arg("--out")
        .arg(&embedded)
        .arg(&file)
        .output()
        .unwrap();
    assert_status(&o, 0);
    assert_status(&run(&embedded, &public, &[]), 0);
    let o = wasmsign2()
        .args(["verify", "-K"])
        .arg(&public)
        .arg("-i")
        .arg(&embedded)
        .output()
        .unwrap();
    assert!(o.status.success(), "wasmsign2: {}", stderr(&o));
    let o = wasmsign2()
        .args(["verify", "-K"])
        .arg(&public)
        .arg("-i")
        .arg(&file)
        .arg("-S")
        .arg(&sig)
        .output()
        .unwrap();
    assert!(o.status.success(), "wasmsign2 detached: {}", stderr(&o));
    // Signed by wasmsign2, with its own keys: verified and run by edgeward.
    let (ws_sk, ws_pk) = (s.path().join("ws.sk"), s.path().join("ws.pk"));
    let o = wasmsign2()
        .args(["keygen", "-k"])
        .arg(&ws_sk)
        .arg("-K")
        .arg(&ws_pk)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ws_signed = s.path().join("ws-signed.wasm");
    let o = wasmsign2()
        .args(["sign", "-k"])
        .arg(&ws_sk)
        .arg("-i")
        .arg(&file)
        .arg("-o")
        .arg(&ws_signed)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_status(&run(&ws_signed, &ws_pk, &[]), 0);
    refused(&run(&ws_signed, &public, &[]), "does not verify");
    let o = s
        .edgeward()
        .arg("verify")
        .arg("--publisher")
        .arg(&ws_pk)
        .arg(&ws_signed)
        .output()
        .unwrap();
    assert_status(&o, 0);
    assert!(
        stdout(&o).contains("signed by publisher key"),
        "{}",
        stdout(&o)
    );
    // Measured: the signed module names its publisher; the refusal too.
    let log = s
        .state()
        .join("measurements/51515151-3434-5656-7878-909090909090.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let pk_hex: String = std::fs::read(&public)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        text.contains(&format!("\"publisher\":\"{pk_hex}\"")),
        "{text}"
    );
    let (value, kinds) = replay(&log);
    assert_eq!(
        kinds,
        ["executable", "module", "executable", "signature-refused"]
    );
    assert_eq!(value, register(&s, &b, None));
}
