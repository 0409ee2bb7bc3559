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

/// The JSON-SEQ records of a log, read here (not by edgeward's parser).
fn records(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .split('\u{1e}')
        .filter(|r| !r.trim().is_empty())
        .map(|r| serde_json::from_str(r).unwrap())
        .collect()
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

/// A daemon in `s` for boot `b` whose config runs the sandbox probe as
/// `m`, once `m` is loaded: (the daemon, its config).
fn started_with_m(s: &Scratch, b: &Path) -> (Daemon, String) {
    let probe = guests::SANDBOX_PROBE;
    let config = format!(
        "[[module]]\nname = \"m\"\nfile = \"{probe}\"\ndigest = \"{}\"\nargs = [\"tick\"]\n",
        sha256sum(probe)
    );
    let mut d = start(s, &config, b);
    d.wait_for("m to load", |_, err| {
        err.iter().any(|l| l.contains("module measured and loaded"))
    });
    (d, config)
}

#[test]
fn the_daemon_measures_what_it_runs_and_a_replay_matches() {
    let s = Scratch::new();
    let b = boot(&s, "11111111-2222-3333-4444-555555555555");
    let probe = guests::SANDBOX_PROBE;
    let (d, config) = started_with_m(&s, &b);
    // An operator's add and remove: a module event, then the removal.
    assert_status(&module(&s, &["add", "extra", probe, "--arg", "tick"]), 0);
    assert_status(&module(&s, &["remove", "extra"]), 0);
    let _ = d.terminate();

    let log = s
        .state()
        .join("measurements/11111111-2222-3333-4444-555555555555.log");
    let (value, kinds) = replay(&log);
    // `extra` is the same component as `m`: its code comes from the cache
    // entry `m` made, which the log records.
    assert_eq!(
        kinds,
        [
            "executable",
            "config",
            "module",
            "compiled-code",
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
    let records = records(&log);
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
    while replay(&log).1.len() < 10 {
        assert!(Instant::now() < deadline, "{:?}", replay(&log).1);
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = d.terminate();
    let (value, kinds) = replay(&log);
    assert_eq!(
        kinds[6..],
        ["executable", "config", "compiled-code", "module"]
    );
    assert_eq!(value, register(&s, &b, None));
    // ...and the evidence of the whole boot, both daemon runs, verifies
    // against a policy naming the module.
    let ev = s.path().join("restarted");
    let o = attest(&s, &b, &["--nonce", "abcd", "--out", ev.to_str().unwrap()]);
    assert_status(&o, 0);
    let policy = s.write(
        "policy.toml",
        &format!(
            "backends = [\"soft\"]\naks = [\"{}\"]\n[modules]\nm = [\"{}\"]\nextra = [\"{}\"]\n",
            ev.join("ak.pem").display(),
            sha256sum(probe),
            sha256sum(probe)
        ),
    );
    let (ok, out) = verify(
        &s,
        &ev,
        &["--nonce", "abcd", "--policy", policy.to_str().unwrap()],
    );
    assert!(ok && out.contains("10 events replay"), "{out}");
    assert!(out.contains("UNPROVEN"), "a software device: {out}");

    // A new boot: a new log, and the soft register starts from zero.
    let b2 = boot(&s, "66666666-7777-8888-9999-000000000000");
    let d = start(&s, &config, &b2);
    let log2 = s
        .state()
        .join("measurements/66666666-7777-8888-9999-000000000000.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log2.exists() || replay(&log2).1.len() < 4 {
        assert!(Instant::now() < deadline, "no log for the new boot");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = d.terminate();
    let (value, kinds) = replay(&log2);
    // (m's code comes from the cache entry of the first boot.)
    assert_eq!(
        kinds,
        ["executable", "config", "compiled-code", "module"],
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
    let (key, public) = keygen(&s, "k");
    let (_, other) = keygen(&s, "other");
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

/// `edgeward attest ARGS` in this boot.
fn attest(s: &Scratch, boot_file: &Path, args: &[&str]) -> std::process::Output {
    s.edgeward()
        .env("EDGEWARD_BOOT_ID_FILE", boot_file)
        .arg("attest")
        .args(args)
        .output()
        .unwrap()
}

/// The device id these tests' daemons run as (the default: the host
/// name): what a verifier asks for.
fn device_id() -> String {
    edgeward::identity::default_device_id()
}

/// A policy for a software device's evidence in `dir`: the soft backend
/// accepted (unproven), its AK enrolled, every module its log measures
/// allowed by the digest it has there (the tests' known-good reference),
/// and `extra` (top-level keys).
fn soft_policy(s: &Scratch, dir: &Path, extra: &str) -> PathBuf {
    let mut modules = std::collections::BTreeMap::<String, Vec<String>>::new();
    for r in records(&dir.join("event.log")) {
        if r["content"]["kind"] == "module" {
            modules
                .entry(r["content"]["name"].as_str().unwrap().to_owned())
                .or_default()
                .push(r["content"]["digest"].as_str().unwrap().to_owned());
        }
    }
    let mut text = format!(
        "backends = [\"soft\"]\naks = [\"{}\"]\n{extra}\n[modules]\n",
        dir.join("ak.pem").display()
    );
    for (name, digests) in modules {
        text.push_str(&format!("{name:?} = {digests:?}\n"));
    }
    s.write(
        &format!("policy-{}.toml", dir.file_name().unwrap().to_string_lossy()),
        &text,
    )
}

/// `edgeward attest verify DIR --device ID ARGS`: (passed, printed
/// checks).
fn verify(s: &Scratch, dir: &Path, args: &[&str]) -> (bool, String) {
    let o = s
        .edgeward()
        .args(["attest", "verify"])
        .arg(dir)
        .args(["--device", &device_id()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.code() == Some(0) || o.status.code() == Some(1),
        "attest verify: {}{}",
        stdout(&o),
        stderr(&o)
    );
    (o.status.success(), stdout(&o))
}

/// tpm2-tools' own check of a quote, with the PCR values file.
fn tpm2_checkquote(dir: &Path, nonce: &str) -> std::process::Output {
    std::process::Command::new("tpm2_checkquote")
        .arg("-u")
        .arg(dir.join("ak.pem"))
        .arg("-m")
        .arg(dir.join("quote.msg"))
        .arg("-s")
        .arg(dir.join("quote.sig"))
        .arg("-f")
        .arg(dir.join("pcrs.bin"))
        .args(["-g", "sha256", "-q", nonce])
        .output()
        .expect("tpm2_checkquote (scripts/setup installs tpm2-tools)")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn on_the_tpm_evidence_verifies_and_binds_the_ak_to_a_certified_ek() {
    let s = Scratch::new();
    let b = boot(&s, "abababab-0000-1111-2222-333333333333");
    let (tpm, ek_ca) = Swtpm::start_with_ek_certificate();
    let ca = ek_ca.to_str().unwrap();
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

    // While the daemon runs (it holds the TPM's only connection), through
    // its socket.
    let ev = s.path().join("evidence");
    let nonce = "5eed00112233445566778899aabbccdd";
    let o = attest(&s, &b, &["--nonce", nonce, "--out", ev.to_str().unwrap()]);
    assert_status(&o, 0);
    assert!(
        stdout(&o).contains("with the EK certificate"),
        "{}",
        stdout(&o)
    );
    // tpm2-tools accepts the quote, the PCR file and the nonce...
    let o = tpm2_checkquote(&ev, nonce);
    assert!(
        o.status.success(),
        "tpm2_checkquote: {}{}",
        stdout(&o),
        stderr(&o)
    );
    // ...as does attest verify, with every check (the AK enrolled).
    let policy = s.write(
        "policy.toml",
        &format!(
            "aks = [\"{}\"]\n[modules]\nm = [\"{}\"]\n",
            ev.join("ak.pem").display(),
            sha256sum(probe)
        ),
    );
    let pol = policy.to_str().unwrap();
    let (ok, out) = verify(
        &s,
        &ev,
        &[
            "--nonce",
            nonce,
            "--policy",
            policy.to_str().unwrap(),
            "--ek-ca",
            ca,
        ],
    );
    assert!(ok, "{out}");
    assert!(!out.contains("UNPROVEN"), "a TPM: {out}");
    for check in [
        "device",
        "backend",
        "pcr",
        "events",
        "signature",
        "attestation",
        "nonce",
        "pcr-digest",
        "log-replay",
        "baseline",
        "policy",
        "ek-certificate",
        "ak",
    ] {
        assert!(out.contains(&format!("pass {check:<15}")), "{check}: {out}");
    }
    // A stale or different nonce fails.
    let (ok, out) = verify(&s, &ev, &["--nonce", "5eed"]);
    assert!(!ok && out.contains("FAIL nonce"), "{out}");
    // A policy without the module's digest fails, naming it.
    let strict = s.write("strict.toml", "[modules]\nm = [\"sha256:00\"]\n");
    let (ok, out) = verify(
        &s,
        &ev,
        &["--nonce", nonce, "--policy", strict.to_str().unwrap()],
    );
    assert!(
        !ok && out.contains("FAIL policy") && out.contains("module m"),
        "{out}"
    );

    // The AK's binding: a credential for this EK and AK, activated by the
    // daemon's TPM, whose secret the quote then carries.
    let ch = s.path().join("challenge");
    let o = s
        .edgeward()
        .args(["attest", "challenge"])
        .arg(&ev)
        .args(["--ek-ca", ca, "--out", ch.to_str().unwrap()])
        .output()
        .unwrap();
    assert_status(&o, 0);
    let cred = ch.join("credential.bin");
    let ev2 = s.path().join("evidence2");
    let o = attest(
        &s,
        &b,
        &[
            "--credential",
            cred.to_str().unwrap(),
            "--out",
            ev2.to_str().unwrap(),
        ],
    );
    assert_status(&o, 0);
    let record = ch.join("challenge.json");
    let (ok, out) = verify(
        &s,
        &ev2,
        &[
            "--challenge",
            record.to_str().unwrap(),
            "--ek-ca",
            ca,
            "--policy",
            pol,
        ],
    );
    assert!(ok && out.contains("pass ak-binding"), "{out}");
    // tpm2_activatecredential's file format is ours: tpm2-tools' own
    // makecredential output (made offline, -T none) activates too.
    let name = {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
        v["ak_name"].as_str().unwrap().to_owned()
    };
    let ek_pub = s.path().join("ek.pub.pem");
    let o = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(ev.join("ek.pem"))
        .output()
        .unwrap();
    std::fs::write(&ek_pub, &o.stdout).unwrap();
    let secret_file = s.write("secret", "tpm2-tools-secret");
    let tools_cred = s.path().join("tools.cred");
    let o = std::process::Command::new("tpm2_makecredential")
        .args(["-T", "none", "-G", "rsa", "-u"])
        .arg(&ek_pub)
        .arg("-s")
        .arg(&secret_file)
        .args(["-n", &name, "-o"])
        .arg(&tools_cred)
        .output()
        .unwrap();
    assert!(o.status.success(), "tpm2_makecredential: {}", stderr(&o));
    let ev3 = s.path().join("evidence3");
    let o = attest(
        &s,
        &b,
        &[
            "--credential",
            tools_cred.to_str().unwrap(),
            "--out",
            ev3.to_str().unwrap(),
        ],
    );
    assert_status(&o, 0);
    let secret_hex: String = b"tpm2-tools-secret"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (ok, out) = verify(&s, &ev3, &["--nonce", &secret_hex, "--policy", pol]);
    assert!(
        ok,
        "the quote carries the secret tpm2-tools encrypted: {out}"
    );

    // A foreign AK: a quote over the very secret by another TPM's AK
    // (someone who learnt the secret) is refused, though that TPM's
    // evidence is otherwise sound and carries this EK's certificate.
    let (other, other_ca) = Swtpm::start_with_ek_certificate();
    let os = Scratch::new();
    let other_cfg = os.write(
        "c.toml",
        &format!("[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n", other.tcti()),
    );
    let secret = {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
        v["secret"].as_str().unwrap().to_owned()
    };
    let forged = s.path().join("forged");
    let o = attest(
        &os,
        &b,
        &[
            "--config",
            other_cfg.to_str().unwrap(),
            "--nonce",
            &secret,
            "--out",
            forged.to_str().unwrap(),
        ],
    );
    assert_status(&o, 0);
    std::fs::copy(ev.join("ek.pem"), forged.join("ek.pem")).unwrap();
    let (ok, out) = verify(
        &s,
        &forged,
        &["--challenge", record.to_str().unwrap(), "--ek-ca", ca],
    );
    assert!(
        !ok && out.contains("FAIL ak-binding") && out.contains("foreign AK"),
        "{out}"
    );
    // ...and a credential made for this EK but the other AK cannot be
    // activated by either TPM.
    let mixed = s.path().join("mixed");
    copy_dir(&ev, &mixed);
    std::fs::copy(forged.join("ak.pub"), mixed.join("ak.pub")).unwrap();
    let ch2 = s.path().join("challenge2");
    let o = s
        .edgeward()
        .args(["attest", "challenge"])
        .arg(&mixed)
        .args(["--ek-ca", ca, "--out", ch2.to_str().unwrap()])
        .output()
        .unwrap();
    assert_status(&o, 0);
    let cred2 = ch2.join("credential.bin");
    let refused = |scratch: &Scratch, config: &[&str], out: &str| {
        let mut args = config.to_vec();
        let out = s.path().join(out);
        args.extend([
            "--credential",
            cred2.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let o = attest(scratch, &b, &args);
        assert_status(&o, 1);
        assert!(stderr(&o).contains("cannot be activated"), "{}", stderr(&o));
    };
    refused(&s, &[], "x");
    refused(&os, &["--config", other_cfg.to_str().unwrap()], "y");
    // The other TPM's EK certificate does not chain to this CA.
    let (ok, out) = verify(
        &s,
        &ev,
        &["--nonce", nonce, "--ek-ca", other_ca.to_str().unwrap()],
    );
    assert!(!ok && out.contains("FAIL ek-certificate"), "{out}");
    let _ = d.terminate();
}

#[test]
fn replay_detects_removed_reordered_inserted_and_edited_entries() {
    let s = Scratch::new();
    let b = boot(&s, "cdcdcdcd-0000-1111-2222-333333333333");
    let probe = guests::SANDBOX_PROBE;
    for _ in 0..3 {
        let o = s
            .edgeward()
            .env("EDGEWARD_BOOT_ID_FILE", &b)
            .args(["run", "--measure", probe, "--", "hello"])
            .output()
            .unwrap();
        assert_status(&o, 0);
    }
    let ev = s.path().join("ev");
    let nonce = "01020304";
    assert_status(
        &attest(&s, &b, &["--nonce", nonce, "--out", ev.to_str().unwrap()]),
        0,
    );
    let policy = soft_policy(&s, &ev, "");
    let pol = policy.to_str().unwrap();
    let (ok, out) = verify(&s, &ev, &["--nonce", nonce, "--policy", pol]);
    assert!(ok && out.contains("6 events replay"), "{out}");
    assert!(out.contains("soft quote"), "{out}");

    let log = std::fs::read_to_string(ev.join("event.log")).unwrap();
    let records: Vec<String> = log
        .split('\u{1e}')
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    let renumber = |recs: &[String]| -> String {
        recs.iter()
            .enumerate()
            .map(|(i, r)| {
                let mut v: serde_json::Value = serde_json::from_str(r).unwrap();
                v["recnum"] = i.into();
                format!("\u{1e}{v}\n")
            })
            .collect()
    };
    let tampered = |name: &str, text: String| {
        let dir = s.path().join(name);
        copy_dir(&ev, &dir);
        std::fs::write(dir.join("event.log"), text).unwrap();
        let (ok, out) = verify(&s, &dir, &["--nonce", nonce, "--policy", pol]);
        assert!(!ok && out.contains("FAIL log-replay"), "{name}: {out}");
    };
    // Removed (renumbered so the numbering alone does not give it away).
    tampered(
        "removed",
        renumber(&[&records[..2], &records[3..]].concat()),
    );
    // Reordered.
    let mut swapped = records.clone();
    swapped.swap(0, 1);
    tampered("reordered", renumber(&swapped));
    // Inserted: a record whose digest is its content's, extended nowhere.
    let mut inserted = records.clone();
    let mut extra: serde_json::Value = serde_json::from_str(&records[1]).unwrap();
    extra["content"]["name"] = "implant".into();
    extra["digests"][0]["digest"] = serde_json::Value::String(edgeward::measure::hex(
        &edgeward::attest::eventlog::content_digest(&extra["content"]).unwrap(),
    ));
    inserted.insert(2, extra.to_string());
    tampered("inserted", renumber(&inserted));
    // Edited: content changed, digest kept.
    let mut edited = records.clone();
    edited[1] = edited[1].replace("\"module\"", "\"modulE\"");
    tampered("edited", renumber(&edited));

    // Events appended after the quote are reported, not refused: the log
    // is a prefix match (as keylime handles a quote lagging its log).
    let o = s
        .edgeward()
        .env("EDGEWARD_BOOT_ID_FILE", &b)
        .args(["run", "--measure", probe, "--", "hello"])
        .output()
        .unwrap();
    assert_status(&o, 0);
    let lagging = s.path().join("lagging");
    copy_dir(&ev, &lagging);
    std::fs::copy(
        s.state()
            .join("measurements/cdcdcdcd-0000-1111-2222-333333333333.log"),
        lagging.join("event.log"),
    )
    .unwrap();
    let (ok, out) = verify(&s, &lagging, &["--nonce", nonce, "--policy", pol]);
    assert!(ok && out.contains("2 appended after the quote"), "{out}");
    // A quote signed by another key, or altered, fails its signature.
    let forged = s.path().join("forged");
    copy_dir(&ev, &forged);
    let mut msg = std::fs::read(forged.join("quote.msg")).unwrap();
    let last = msg.len() - 1;
    msg[last] ^= 1;
    std::fs::write(forged.join("quote.msg"), msg).unwrap();
    let (ok, out) = verify(&s, &forged, &["--nonce", nonce, "--policy", pol]);
    assert!(!ok && out.contains("FAIL signature"), "{out}");
}

#[test]
fn pkcs11_cannot_attest_and_says_so() {
    let s = Scratch::new();
    let b = boot(&s, "efefefef-0000-1111-2222-333333333333");
    let token = edgeward_tests::fixtures::SoftHsmToken::new();
    let cfg = s.write("c.toml", &token.hsm_toml());
    let o = attest(
        &s,
        &b,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--nonce",
            "00",
            "--out",
            s.path().join("e").to_str().unwrap(),
        ],
    );
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("not supported on the pkcs11 backend"),
        "{}",
        stderr(&o)
    );
}

/// One GET on the daemon's socket: (status, body).
fn get(s: &Scratch, path: &str) -> (u16, String) {
    http(&s.socket(), "GET", path, b"")
}

/// Who may reach `GET /v1/attest`: operators and readers of the socket.
/// What a hostile caller could try: no nonce, both a nonce and a
/// credential, a nonce that is not hex or too long, a credential that is
/// not base64 or not a credential, one for another device, unknown
/// parameters; each is refused by name and the daemon keeps serving.
#[test]
fn the_attest_endpoint_refuses_bad_requests_by_name() {
    let s = Scratch::new();
    let b = boot(&s, "f0f0f0f0-0000-1111-2222-333333333333");
    let d = start(&s, "", &b);
    for (query, status, says) in [
        ("", 400, "exactly one of nonce and credential"),
        ("?nonce=00&credential=AA", 400, "exactly one"),
        ("?nonce=zz", 400, "not hex"),
        ("?nonce=0", 400, "not hex"),
        (&format!("?nonce={}", "ab".repeat(65)), 400, "65 bytes"),
        ("?credential=!!!", 400, "not base64url"),
        ("?credential=AAAA", 400, "credential"),
        ("?nonce=00&evil=1", 400, "invalid query"),
    ] {
        let (got, body) = get(&s, &format!("/v1/attest{query}"));
        assert_eq!(got, status, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    // A well-formed credential on a backend without an EK: refused.
    let cred = {
        use base64ct::Encoding as _;
        let c = edgeward::attest::evidence::CredentialFile {
            id_object: vec![0; 66],
            secret: vec![0; 256],
        };
        base64ct::Base64UrlUnpadded::encode_string(&c.to_bytes())
    };
    let (got, body) = get(&s, &format!("/v1/attest?credential={cred}"));
    assert_eq!(got, 422, "{body}");
    // And it still answers.
    let (got, body) = get(&s, "/v1/attest?nonce=00ff");
    assert_eq!(got, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["files"]["quote.msg"].is_string(), "{body}");
    let _ = d.terminate();

    // A daemon that measures nothing has nothing to attest.
    let s = Scratch::new();
    let d = start(&s, "[runtime]\nmeasure = false\n", &b);
    let (got, body) = get(&s, "/v1/attest?nonce=00");
    assert_eq!(got, 409, "{body}");
    assert!(body.contains("measure = false"), "{body}");
    let _ = d.terminate();
}

/// `edgeward keygen --out DIR/PREFIX`: (secret key, public key).
fn keygen(s: &Scratch, prefix: &str) -> (PathBuf, PathBuf) {
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
}

/// `edgeward sign --key KEY FILE ARGS`.
fn sign(s: &Scratch, key: &Path, file: &Path, args: &[&str]) {
    let o = s
        .edgeward()
        .arg("sign")
        .arg("--key")
        .arg(key)
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    assert_status(&o, 0);
}

/// Who may reach it: the config's author (trusted keys, the floor), the
/// API's operators and the agent (specs, manifests). What a hostile
/// publisher or deployer could try: an unsigned component, one signed by
/// another key, one altered after signing, a module naming a key the
/// device does not trust, an unsigned, re-signed, altered or truncated
/// manifest; each is refused by name and measured, and the signed ones
/// run with their publisher in the log.
#[test]
fn the_daemon_holds_components_and_manifests_to_the_signature_policy() {
    let s = Scratch::new();
    let b = boot(&s, "52525252-3434-5656-7878-909090909090");
    let (key, public) = keygen(&s, "acme");
    let (other_key, other_pub) = keygen(&s, "other");
    // Deployments are signed with a key of their own, not a publisher's.
    let (ops_key, ops_pub) = keygen(&s, "ops");
    let copy = |name: &str| {
        let f = s.path().join(name);
        std::fs::copy(guests::SANDBOX_PROBE, &f).unwrap();
        f
    };
    let detached = copy("detached.wasm");
    sign(&s, &key, &detached, &[]);
    let embedded = s.path().join("embedded.wasm");
    sign(
        &s,
        &key,
        &detached,
        &["--embed", "--out", embedded.to_str().unwrap()],
    );
    let unsigned = copy("unsigned.wasm");
    let foreign = copy("foreign.wasm");
    sign(&s, &other_key, &foreign, &[]);
    // Altered after signing: a custom section appended to a signed copy.
    let altered = copy("altered.wasm");
    sign(&s, &key, &altered, &[]);
    let mut bytes = std::fs::read(&altered).unwrap();
    bytes.extend_from_slice(&[0, 4, 1, b'x', 0xde, 0xad]);
    std::fs::write(&altered, bytes).unwrap();
    let untrusted = copy("untrusted.wasm");
    sign(&s, &other_key, &untrusted, &[]);

    let module = |name: &str, file: &Path, extra: &str| {
        format!(
            "[[module]]\nname = \"{name}\"\nfile = \"{}\"\ndigest = \"{}\"\nargs = [\"tick\"]\n{extra}\n",
            file.display(),
            sha256sum(file.to_str().unwrap())
        )
    };
    let config = [
        format!(
            "[signatures]\npolicy = \"require\"\npublishers = [\"{}\"]\ndeployment_keys = [\"{}\"]\n[identity]\ndevice_id = \"gw-1\"\n",
            public.display(),
            ops_pub.display()
        ),
        module("detached", &detached, ""),
        module("embedded", &embedded, ""),
        module("unsigned", &unsigned, ""),
        module("foreign", &foreign, ""),
        module("altered", &altered, ""),
        module(
            "untrusted",
            &untrusted,
            &format!("publishers = [\"{}\"]", other_pub.display()),
        ),
    ]
    .concat();
    let d = start(&s, &config, &b);
    let within = Duration::from_secs(30);
    for name in ["detached", "embedded"] {
        wait_state(&s, name, "running", within);
    }
    for (name, why) in [
        ("unsigned", "not signed"),
        ("foreign", "does not verify"),
        ("altered", "does not verify"),
        ("untrusted", "not one of the device's trusted publishers"),
    ] {
        wait_state(&s, name, "refused", within);
        let (_, reason) = state_and_reason(&s, name);
        assert!(
            reason.contains("signature refused") && reason.contains(why),
            "{name}: {reason}"
        );
    }

    // Through the API: an add whose component is unsigned is refused with
    // the reason and undone.
    let o = s
        .edgeward()
        .args(["module", "add", "api-unsigned"])
        .arg(&unsigned)
        .output()
        .unwrap();
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("signature refused") && stderr(&o).contains("not signed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(state_and_reason(&s, "api-unsigned").0, "absent");

    // Manifests: signed by the trusted key, with a signed component whose
    // detached signature travels in the spec (the CLI uploads the file; a
    // signed manifest pins its digest, and the daemon drops the path).
    let sig_b64 = {
        use base64ct::Encoding as _;
        base64ct::Base64::encode_string(&std::fs::read(s.path().join("detached.wasm.sig")).unwrap())
    };
    let manifest = s.write(
        "deploy.toml",
        &format!(
            "version = \"1\"\ntarget = \"device:gw-1\"\nexpires = \"2099-01-01T00:00:00Z\"\n[[module]]\nname = \"deployed\"\nfile = \"{}\"\ndigest = \"{}\"\nargs = [\"tick\"]\nsignature = \"{sig_b64}\"\n",
            detached.display(),
            sha256sum(detached.to_str().unwrap())
        ),
    );
    let deploy = |extra: &[&str]| {
        s.edgeward()
            .arg("deploy")
            .arg(&manifest)
            .args(extra)
            .output()
            .unwrap()
    };
    // Unsigned: refused.
    let o = deploy(&[]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("manifest is refused") && stderr(&o).contains("no signature"),
        "{}",
        stderr(&o)
    );
    // Signed by another key: refused.
    sign(&s, &other_key, &manifest, &[]);
    let o = deploy(&[]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("does not verify"), "{}", stderr(&o));
    // Signed by a component publisher's key: refused (a separate set).
    sign(&s, &key, &manifest, &[]);
    let o = deploy(&[]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("does not verify"), "{}", stderr(&o));
    // Truncated signature: refused.
    let sig = s.path().join("deploy.toml.sig");
    sign(&s, &ops_key, &manifest, &[]);
    let good_sig = std::fs::read(&sig).unwrap();
    std::fs::write(&sig, &good_sig[..40]).unwrap();
    let o = deploy(&[]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("64-byte"), "{}", stderr(&o));
    // Signed by the trusted key: applied, and the module runs.
    std::fs::write(&sig, &good_sig).unwrap();
    let o = deploy(&[]);
    assert_status(&o, 0);
    wait_state(&s, "deployed", "running", within);
    // The same signature on an altered manifest: refused (given with
    // --signature, as a signature kept elsewhere is).
    let kept = s.path().join("kept.sig");
    std::fs::rename(&sig, &kept).unwrap();
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("version = \"1\"", "version = \"2\""),
    )
    .unwrap();
    let o = deploy(&["--signature", kept.to_str().unwrap()]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("does not verify"), "{}", stderr(&o));
    // Version 2, signed: applied. Then version 1 again, with its genuine
    // signature: a replay, refused.
    sign(&s, &ops_key, &manifest, &[]);
    assert_status(&deploy(&[]), 0);
    let v2 = std::fs::read_to_string(&manifest).unwrap();
    let v2_sig = s.path().join("v2.sig");
    std::fs::rename(&sig, &v2_sig).unwrap();
    std::fs::write(&manifest, &text).unwrap();
    let o = deploy(&["--signature", kept.to_str().unwrap()]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("not newer"), "{}", stderr(&o));
    // The applied one again: the same contents, taken (the agent sends its
    // manifest again after a restart).
    std::fs::write(&manifest, &v2).unwrap();
    assert_status(&deploy(&["--signature", v2_sig.to_str().unwrap()]), 0);
    // Signed for another device, or expired: refused.
    for (from, to, why) in [
        ("device:gw-1", "device:gw-2", "not to this device"),
        ("2099-01-01", "2020-01-01", "expired"),
    ] {
        std::fs::write(
            &manifest,
            v2.replace("version = \"2\"", "version = \"3\"")
                .replace(from, to),
        )
        .unwrap();
        sign(&s, &ops_key, &manifest, &[]);
        let o = deploy(&[]);
        assert_status(&o, 1);
        assert!(stderr(&o).contains(why), "{why}: {}", stderr(&o));
    }
    // A manifest that names no target is not signed at all.
    std::fs::write(&manifest, v2.replace("target = \"device:gw-1\"\n", "")).unwrap();
    let o = s
        .edgeward()
        .arg("sign")
        .arg("--key")
        .arg(&ops_key)
        .arg(&manifest)
        .output()
        .unwrap();
    assert_status(&o, 1);
    assert!(stderr(&o).contains("names no `target`"), "{}", stderr(&o));
    let _ = d.terminate();

    // The log: the signed modules with their publisher, each refusal.
    let log = s
        .state()
        .join("measurements/52525252-3434-5656-7878-909090909090.log");
    let records = records(&log);
    let acme = {
        let raw = std::fs::read(&public).unwrap();
        edgeward::measure::hex(&raw)
    };
    for name in ["detached", "embedded", "deployed"] {
        assert!(
            records.iter().any(|r| r["content"]["kind"] == "module"
                && r["content"]["name"] == name
                && r["content"]["publisher"] == acme.as_str()),
            "{name} measured with its publisher"
        );
    }
    let refusals = records
        .iter()
        .filter(|r| r["content"]["kind"] == "signature-refused")
        .count();
    assert!(refusals >= 4 + 1 + 5 + 3, "{refusals} refusals measured");
    let ops = {
        let raw = std::fs::read(&ops_pub).unwrap();
        edgeward::measure::hex(&raw)
    };
    assert!(
        records
            .iter()
            .any(|r| r["content"]["kind"] == "deployment"
                && r["content"]["signed_by"] == ops.as_str()),
        "the deployment names its signer"
    );

    // Under warn, an unsigned component runs (and is not refused).
    let w = Scratch::new();
    let config = [
        format!(
            "[signatures]\npolicy = \"warn\"\npublishers = [\"{}\"]\n",
            public.display()
        ),
        module("unsigned", &unsigned, ""),
    ]
    .concat();
    let d = start(&w, &config, &b);
    wait_state(&w, "unsigned", "running", within);
    let _ = d.terminate();
}

/// On the TPM the compiled-cache key is wrapped by the TPM: the state dir
/// holds no clear key (a copy of it, or write access, does not give one),
/// the daemon unwraps it once and a restart loads from the cache; a clear
/// key planted in the state dir is removed, not used.
#[test]
fn on_the_tpm_the_cache_key_is_wrapped_by_the_tpm() {
    let s = Scratch::new();
    let b = boot(&s, "57575757-3434-5656-7878-909090909090");
    let tpm = Swtpm::start();
    let probe = guests::SANDBOX_PROBE;
    let config = format!(
        "[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n\n[[module]]\nname = \"m\"\nfile = \"{probe}\"\ndigest = \"{}\"\nargs = [\"tick\"]\n",
        tpm.tcti(),
        sha256sum(probe)
    );
    let loaded = |mut d: Daemon| {
        d.wait_for("m to load", |_, err| {
            err.iter().any(|l| l.contains("module measured and loaded"))
        });
        let (_, _, err) = d.terminate();
        err.into_iter()
            .find(|l| l.contains("module measured and loaded"))
            .unwrap_or_default()
    };
    assert!(loaded(start(&s, &config, &b)).contains("Compiled"));
    assert!(!s.state().join("cache.key").exists(), "no clear key");
    let sealed = std::fs::read(s.state().join("cache.key.wrapped")).unwrap();
    assert!(sealed.len() > 32, "the key is sealed");
    // A restart unwraps it: code from the cache.
    let line = loaded(start(&s, &config, &b));
    assert!(
        line.contains("Cache"),
        "a cache hit after a restart: {line}"
    );
    // A planted clear key is removed and not used.
    std::fs::write(s.state().join("cache.key"), [7u8; 32]).unwrap();
    let line = loaded(start(&s, &config, &b));
    assert!(line.contains("Cache"), "{line}");
    assert!(!s.state().join("cache.key").exists());
}

/// `edgeward check` re-measures the compiled-cache entries once, as the
/// watchdog does: authenticated ones pass; a tampered one fails the check,
/// named, and is deleted (rebuilt, never loaded).
#[test]
fn check_re_measures_the_cache_entries_once() {
    let s = Scratch::new();
    let b = boot(&s, "58585858-3434-5656-7878-909090909090");
    let probe = guests::SANDBOX_PROBE;
    let digest = sha256sum(probe);
    let text = format!(
        "[[module]]\nname = \"m\"\nfile = \"{probe}\"\ndigest = \"{digest}\"\nargs = [\"tick\"]\n"
    );
    let mut d = start(&s, &text, &b);
    d.wait_for("m to load", |_, err| {
        err.iter().any(|l| l.contains("module measured and loaded"))
    });
    let _ = d.terminate();
    let config = s.write("check.toml", &text);
    let cache = |s: &Scratch| {
        let o = s
            .edgeward()
            .args(["check", "--json", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let c = v
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "cache")
            .cloned()
            .unwrap();
        (o.status.code(), c)
    };
    let (_, c) = cache(&s);
    assert_eq!(c["verdict"], "pass", "{c}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .starts_with("1 entries authenticated"),
        "{c}"
    );
    let entry = std::fs::read_dir(s.state().join("cache"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    let mut bytes = std::fs::read(&entry).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&entry, bytes).unwrap();
    let (code, c) = cache(&s);
    assert_eq!(code, Some(1), "{c}");
    assert_eq!(c["verdict"], "fail", "{c}");
    assert!(c["detail"].as_str().unwrap().contains(&digest), "{c}");
    assert!(!entry.exists(), "the tampered entry is deleted");
}

/// Evidence forged by whoever holds a key of their own: the verifier's
/// policy, never the evidence, says which backend, register and AK are
/// acceptable and which events must be there. Each forgery the review
/// reproduced is refused, naming why; genuine evidence (the positive
/// control) verifies.
#[test]
fn forged_evidence_fails_the_verifiers_policy() {
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::EncodePublicKey as _;
    let s = Scratch::new();
    let b = boot(&s, "abababab-0000-1111-2222-333333333333");
    let probe = guests::SANDBOX_PROBE;
    let o = s
        .edgeward()
        .env("EDGEWARD_BOOT_ID_FILE", &b)
        .args(["run", "--measure", probe, "--", "hello"])
        .output()
        .unwrap();
    assert_status(&o, 0);
    let nonce = "0badc0de";
    let ev = s.path().join("genuine");
    assert_status(
        &attest(&s, &b, &["--nonce", nonce, "--out", ev.to_str().unwrap()]),
        0,
    );
    let policy = soft_policy(&s, &ev, "");
    let pol = policy.to_str().unwrap();
    let (ok, out) = verify(&s, &ev, &["--nonce", nonce, "--policy", pol]);
    assert!(ok && out.contains("UNPROVEN"), "genuine: {out}");
    // The strictest policy (none given) accepts no software device.
    let (ok, out) = verify(&s, &ev, &["--nonce", nonce]);
    assert!(
        !ok && out.contains("FAIL backend") && out.contains("FAIL ak"),
        "{out}"
    );
    // Asked for another device: refused.
    let o = s
        .edgeward()
        .args(["attest", "verify"])
        .arg(&ev)
        .args(["--device", "gw-other", "--nonce", nonce, "--policy", pol])
        .output()
        .unwrap();
    assert_status(&o, 1);
    assert!(stdout(&o).contains("FAIL device"), "{}", stdout(&o));

    // Forged with a key of the attacker's choosing: register, log and
    // register index as they please, signed and self-consistent.
    let key = p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let forge = |name: &str, pcr: u32, register: [u8; 32], log: &str| {
        let dir = s.path().join(name);
        copy_dir(&ev, &dir);
        let msg = edgeward::hsm::soft_quote_message(&register, &hex_bytes(nonce));
        let sig: p256::ecdsa::Signature = key.sign(&msg);
        std::fs::write(dir.join("quote.msg"), &msg).unwrap();
        std::fs::write(dir.join("quote.sig"), sig.to_der().as_bytes()).unwrap();
        let pem = key
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        std::fs::write(dir.join("ak.pem"), pem).unwrap();
        std::fs::write(
            dir.join("pcrs.bin"),
            edgeward::attest::evidence::pcrs_bin(pcr, &register),
        )
        .unwrap();
        std::fs::write(dir.join("event.log"), log).unwrap();
        let mut e: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("evidence.json")).unwrap())
                .unwrap();
        e["pcr"] = pcr.into();
        std::fs::write(dir.join("evidence.json"), e.to_string()).unwrap();
        dir
    };
    let fails = |dir: &Path, policy: &str, checks: &[&str]| {
        let (ok, out) = verify(&s, dir, &["--nonce", nonce, "--policy", policy]);
        assert!(!ok, "{}: {out}", dir.display());
        for c in checks {
            assert!(out.contains(&format!("FAIL {c}")), "{c}: {out}");
        }
        // Everything the attacker controls checks out by itself.
        for c in [
            "signature",
            "attestation",
            "nonce",
            "pcr-digest",
            "log-replay",
        ] {
            if !checks.contains(&c) {
                assert!(out.contains(&format!("pass {c}")), "{c}: {out}");
            }
        }
    };
    // An empty log and a zero register, on the soft register.
    let empty = forge("empty", 0, [0; 32], "");
    fails(&empty, pol, &["ak", "events"]);
    // The same on PCR 23, which software can reset.
    let resettable = forge("resettable", 23, [0; 32], "");
    fails(&resettable, pol, &["pcr", "ak", "events"]);
    // A log of one baseline record equal to the quoted value.
    let value = [0x5a; 32];
    let baseline = format!(
        "\u{1e}{}\n",
        serde_json::json!({
            "recnum": 0, "pcr": 0,
            "digests": [{"hashAlg": "sha256", "digest": edgeward::measure::hex(&value)}],
            "content_type": "edgeward", "content": {"kind": "baseline"},
        })
    );
    let baseline_only = forge("baseline-only", 0, value, &baseline);
    // Whether the replay or the baseline rule catches a forged baseline
    // record, the events rule does: the log holds nothing of edgeward's.
    let (ok, out) = verify(&s, &baseline_only, &["--nonce", nonce, "--policy", pol]);
    assert!(!ok && out.contains("FAIL ak"), "{out}");
    // Even with the forged AK enrolled and the baseline named, a
    // baseline-only log proves nothing.
    let ak =
        edgeward::attest::verify::ak_digest(&std::fs::read(baseline_only.join("ak.pem")).unwrap())
            .unwrap();
    let lenient = s.write(
        "lenient.toml",
        &format!(
            "backends = [\"soft\"]\naks = [\"{ak}\"]\nbaselines = [\"{}\"]\n",
            edgeward::measure::hex(&value)
        ),
    );
    let (ok, out) = verify(
        &s,
        &baseline_only,
        &["--nonce", nonce, "--policy", lenient.to_str().unwrap()],
    );
    assert!(!ok && out.contains("FAIL events"), "{out}");
    let (ok, out) = verify(
        &s,
        &empty,
        &["--nonce", nonce, "--policy", lenient.to_str().unwrap()],
    );
    assert!(
        !ok && out.contains("FAIL events") && out.contains("empty or baseline-only"),
        "{out}"
    );
    // A log the key daemon begins (it launched the runtime): it must
    // measure the runtime's executable before any module; without one the
    // module's runtime is unmeasured.
    let log_of = |contents: &[serde_json::Value]| -> (String, [u8; 32]) {
        use sha2::Digest as _;
        let mut log = String::new();
        for (i, c) in contents.iter().enumerate() {
            // serde_json's maps are sorted: this is the canonical form of
            // these ASCII-only contents.
            let d = sha2::Sha256::digest(c.to_string().as_bytes());
            log.push_str(&format!(
                "\u{1e}{}\n",
                serde_json::json!({
                    "recnum": i, "pcr": 0,
                    "digests": [{"hashAlg": "sha256", "digest": edgeward::measure::hex(&d)}],
                    "content_type": "edgeward", "content": c,
                })
            ));
        }
        let file = s.write("replayed.log", &log);
        let value = hex_bytes(&replay(&file).0);
        (log, value.try_into().unwrap())
    };
    let keyd =
        serde_json::json!({"kind": "key-daemon", "sha256": format!("sha256:{}", "ab".repeat(32))});
    let exe = serde_json::json!({"kind": "executable", "sha256": format!("sha256:{}", "cd".repeat(32)), "launched_by": "key-daemon"});
    let module = serde_json::json!({"kind": "module", "name": "m", "digest": format!("sha256:{}", "ef".repeat(32)), "generation": "1"});
    let (log, value) = log_of(&[keyd.clone(), module.clone()]);
    let unlaunched = forge("unlaunched", 0, value, &log);
    let (ok, out) = verify(
        &s,
        &unlaunched,
        &["--nonce", nonce, "--policy", lenient.to_str().unwrap()],
    );
    assert!(
        !ok && out.contains("FAIL events") && out.contains("before any executable"),
        "{out}"
    );
    // ...nor after the launched runtime exited, before the next start.
    let exit = serde_json::json!({"kind": "runtime-exit", "start": 1, "status": "signal 9"});
    let (log, value) = log_of(&[keyd.clone(), exe.clone(), exit, module.clone()]);
    let after_exit = forge("after-exit", 0, value, &log);
    let (ok, out) = verify(
        &s,
        &after_exit,
        &["--nonce", nonce, "--policy", lenient.to_str().unwrap()],
    );
    assert!(
        !ok && out.contains("FAIL events") && out.contains("after a runtime-exit"),
        "{out}"
    );
    let (log, value) = log_of(&[keyd, exe, module]);
    let launched = forge("launched", 0, value, &log);
    let (_, out) = verify(
        &s,
        &launched,
        &["--nonce", nonce, "--policy", lenient.to_str().unwrap()],
    );
    assert!(out.contains("pass events"), "{out}");
    // allow_baseline (the old switch) is refused, naming its successor.
    let old = s.write("old.toml", "allow_baseline = true\n");
    let o = s
        .edgeward()
        .args(["attest", "verify"])
        .arg(&ev)
        .args(["--device", &device_id(), "--nonce", nonce, "--policy"])
        .arg(&old)
        .output()
        .unwrap();
    assert_status(&o, 2);
    assert!(stderr(&o).contains("baselines"), "{}", stderr(&o));
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

/// Native code from the compiled-artifact cache shows in the evidence: the
/// second start of a module loads its cached entry and logs a
/// `compiled-code` event with the BLAKE3 of the entry's payload. Root once
/// with the state directory (here: the soft backend's cache key beside it)
/// can plant an entry for the module's digest holding other code; the
/// daemon loads it, and the evidence shows a different entry hash.
#[test]
fn a_planted_cache_entry_shows_in_the_evidence() {
    let s = Scratch::new();
    let boot_id = "61616161-3434-5656-7878-909090909090";
    let b = boot(&s, boot_id);
    let sensor = guests::TEMPERATURE_SENSOR;
    let digest = sha256sum(sensor);
    let text = format!("[[module]]\nname = \"m\"\nfile = \"{sensor}\"\ndigest = \"{digest}\"\n");
    let run_once = |s: &Scratch| {
        let mut d = start(s, &text, &b);
        d.wait_for("m to load", |_, err| {
            err.iter().any(|l| l.contains("module measured and loaded"))
        });
        let _ = d.terminate();
    };
    let log = s
        .state()
        .join("measurements")
        .join(format!("{boot_id}.log"));
    let entries = || -> Vec<String> {
        records(&log)
            .iter()
            .filter(|r| r["content"]["kind"] == "compiled-code" && r["content"]["digest"] == digest)
            .map(|r| r["content"]["entry"].as_str().unwrap().to_owned())
            .collect()
    };
    let entry_file = || {
        std::fs::read_dir(s.state().join("cache"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .unwrap()
    };
    let payload_hash = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        format!("blake3:{}", blake3::hash(&bytes[40..]).to_hex())
    };
    // Compiled (no event), then loaded from the cache (one event).
    run_once(&s);
    assert!(entries().is_empty(), "{:?}", entries());
    run_once(&s);
    let genuine = payload_hash(&entry_file());
    assert_eq!(entries(), vec![genuine.clone()]);

    // The plant: the sandbox probe's code, authenticated under the
    // sensor's digest with the device's own cache key and engine.
    let path = s.write("plant.toml", &text);
    let config = edgeward::config::Config::load(&path).unwrap();
    let rt =
        edgeward::runtime::Runtime::new(&edgeward::daemon::runtime_options(&config, &s.state()))
            .unwrap();
    std::fs::remove_file(entry_file()).unwrap();
    let bytes = std::fs::read(guests::SANDBOX_PROBE).unwrap();
    rt.load(&edgeward::measure::Measured {
        path: guests::SANDBOX_PROBE.into(),
        bytes,
        digest: digest.parse().unwrap(),
    })
    .unwrap();
    drop(rt);
    let planted = payload_hash(&entry_file());
    assert_ne!(planted, genuine);
    run_once(&s);
    assert_eq!(entries(), vec![genuine, planted.clone()]);
    // And in the evidence a verifier gets.
    let dir = s.path().join("evidence");
    let o = attest(
        &s,
        &b,
        &["--nonce", "00112233", "--out", dir.to_str().unwrap()],
    );
    assert_status(&o, 0);
    let evidence_log = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        evidence_log.contains(&planted),
        "the evidence lacks {planted}"
    );
}

/// Incremental evidence: a verifier that checked records 0..N asks only
/// for what came after (`attest --from N`), with a quote over the whole
/// log, and checks it with `--previous` (the evidence it verified); the
/// whole log it has checked is kept for the next round. Evidence that does
/// not continue what the verifier holds is refused by name.
#[test]
fn incremental_evidence_continues_what_the_verifier_checked() {
    let s = Scratch::new();
    let b = boot(&s, "72727272-3434-5656-7878-909090909090");
    let probe = guests::SANDBOX_PROBE;
    let (d, _) = started_with_m(&s, &b);
    let first = s.path().join("ev1");
    assert_status(
        &attest(&s, &b, &["--nonce", "01", "--out", first.to_str().unwrap()]),
        0,
    );
    let n = records(&first.join("event.log")).len();
    let policy = soft_policy(&s, &first, "");
    let (ok, out) = verify(
        &s,
        &first,
        &["--nonce", "01", "--policy", policy.to_str().unwrap()],
    );
    assert!(ok, "{out}");
    // From now on `extra` is expected too (it comes next); `again` is not.
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(&format!("extra = [\"{}\"]\n", sha256sum(probe)));
    let policy = s.write("policy-later.toml", &text);
    let policy = policy.to_str().unwrap();

    // More events: an operator's add and remove.
    assert_status(&module(&s, &["add", "extra", probe, "--arg", "tick"]), 0);
    assert_status(&module(&s, &["remove", "extra"]), 0);
    let second = s.path().join("ev2");
    assert_status(
        &attest(
            &s,
            &b,
            &[
                "--nonce",
                "02",
                "--from",
                &n.to_string(),
                "--out",
                second.to_str().unwrap(),
            ],
        ),
        0,
    );
    let tail = records(&second.join("event.log"));
    assert!(!tail.is_empty() && tail[0]["recnum"] == n, "{tail:?}");
    // Without what the verifier holds: refused, saying what to give.
    let (ok, out) = verify(&s, &second, &["--nonce", "02", "--policy", policy]);
    assert!(!ok && out.contains("--previous"), "{out}");
    // With it: the whole log replays to the quote.
    let prev = first.to_str().unwrap();
    let (ok, out) = verify(
        &s,
        &second,
        &["--nonce", "02", "--policy", policy, "--previous", prev],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("{} events replay", n + tail.len())),
        "{out}"
    );
    assert!(second.join("event.full.log").exists());

    // The next round continues from the whole log kept beside ev2.
    assert_status(&module(&s, &["add", "again", probe, "--arg", "tick"]), 0);
    let third = s.path().join("ev3");
    let held = n + tail.len();
    assert_status(
        &attest(
            &s,
            &b,
            &[
                "--nonce",
                "03",
                "--from",
                &held.to_string(),
                "--out",
                third.to_str().unwrap(),
            ],
        ),
        0,
    );
    let (ok, out) = verify(
        &s,
        &third,
        &[
            "--nonce",
            "03",
            "--policy",
            policy,
            "--previous",
            second.to_str().unwrap(),
        ],
    );
    // (`again` is not in the policy: the verdict fails on the policy, not
    // on the log.)
    assert!(
        !ok && out.contains("again") && !out.contains("FAIL log-replay"),
        "{out}"
    );
    // A previous that this evidence does not continue: refused by name.
    let (ok, out) = verify(
        &s,
        &third,
        &["--nonce", "03", "--policy", policy, "--previous", prev],
    );
    assert!(!ok && out.contains("continues from record"), "{out}");
    // More records than the log has: refused by the device.
    let o = attest(
        &s,
        &b,
        &[
            "--nonce",
            "04",
            "--from",
            "100000",
            "--out",
            s.path().join("ev4").to_str().unwrap(),
        ],
    );
    assert_status(&o, 1);
    assert!(stderr(&o).contains("records"), "{}", stderr(&o));
    let _ = d.terminate();
}
