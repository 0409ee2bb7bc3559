//! The daemon with its keys in the key daemon (`EDGEWARD_KEYD`): modules get
//! identities and sealed data as before, no key file is in the runtime's
//! state dir, and the key daemon going away and coming back does not stop
//! modules.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;

const PROBE: &str = guests::IDENTITY_PROBE;

/// A configuration for a TPM nothing answers for (port 1 on loopback).
const UNREACHABLE_TPM: &str = "[hsm]\nbackend = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n";

/// `edgeward-keyd` beside the binary under test (`cargo test --workspace`
/// builds it; `cargo build -p edgeward-keyd` does too).
fn keyd_binary() -> PathBuf {
    let p = Path::new(EDGEWARD).with_file_name("edgeward-keyd");
    assert!(
        p.exists(),
        "{} is missing: build it (cargo build -p edgeward-keyd)",
        p.display()
    );
    p
}

struct Keyd {
    child: Child,
    state: PathBuf,
    socket: PathBuf,
}

impl Keyd {
    fn start(dir: &Path, device: &str) -> Self {
        Self::start_with(dir, device, &[])
    }

    fn start_with(dir: &Path, device: &str, args: &[&str]) -> Self {
        let state = dir.join("keyd-state");
        // A directory of its own: the key daemon may remove its socket
        // there at stop (Landlock grants it no shared one).
        let run = dir.join("keyd-run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let socket = run.join("keyd.sock");
        let child = Command::new(keyd_binary())
            .arg("--state")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .args(["--device-id", device])
            .args(args)
            .stderr(std::fs::File::create(dir.join("keyd.log")).unwrap())
            .spawn()
            .unwrap();
        // Bound is not yet serving: it confines itself in between (a
        // connection waits in the backlog), then says it is ready.
        let log = dir.join("keyd.log");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err()
            || !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("key daemon ready"))
        {
            assert!(Instant::now() < deadline, "the key daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            state,
            socket,
        }
    }

    /// SIGTERM, as a service manager stops it: it exits 0 within 10 s,
    /// removes its socket and says it stopped (it releases the TPM's
    /// objects: a simulator has no resource manager to flush what a
    /// SIGKILLed one left).
    fn stop_cleanly(&mut self, log: &Path) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "SIGTERM did not stop the key daemon"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status:?}");
        assert!(!self.socket.exists(), "it left its socket");
        let log = std::fs::read_to_string(log).unwrap();
        assert!(log.contains("key daemon stopped"), "{log}");
    }

    /// SIGTERM, then SIGKILL if it has not ended (a failed test's
    /// clean-up).
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Keyd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The HSM a key daemon under test holds: the soft backend, a TPM
/// simulator or a SoftHSM2 token.
enum Hw {
    Soft,
    Tpm(edgeward_tests::fixtures::Swtpm),
    Pkcs11(edgeward_tests::fixtures::SoftHsmToken),
}

impl Hw {
    fn tpm() -> Self {
        Self::Tpm(edgeward_tests::fixtures::Swtpm::start())
    }

    fn pkcs11() -> Self {
        Self::Pkcs11(edgeward_tests::fixtures::SoftHsmToken::new())
    }

    /// The key daemon's arguments for it.
    fn keyd_args(&self) -> Vec<String> {
        match self {
            Self::Soft => Vec::new(),
            Self::Tpm(t) => vec!["--hsm".into(), "tpm".into(), "--tcti".into(), t.tcti()],
            Self::Pkcs11(t) => vec![
                "--hsm".into(),
                "pkcs11".into(),
                "--module".into(),
                edgeward_tests::fixtures::SOFTHSM_MODULE.into(),
                "--token".into(),
                t.label.clone(),
                "--pin-file".into(),
                t.pin_file.display().to_string(),
            ],
        }
    }

    /// The runtime's `[hsm]` section naming the same backend.
    fn toml(&self) -> String {
        match self {
            Self::Soft => String::new(),
            Self::Tpm(t) => format!("[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n", t.tcti()),
            Self::Pkcs11(t) => t.hsm_toml(),
        }
    }

    fn start_keyd(&self, dir: &Path) -> Keyd {
        let args = self.keyd_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Keyd::start_with(dir, "dev-1", &args)
    }
}

fn config(modules: &[(&str, &str, &str)]) -> String {
    let digest = sha256sum(PROBE);
    let mut c = String::from("[identity]\ndevice_id = \"dev-1\"\n");
    for (name, action, restart) in modules {
        c.push_str(&format!(
            "\n[[module]]\nname = \"{name}\"\nfile = \"{PROBE}\"\ndigest = \"{digest}\"\nargs = [\"{action}\"]\nrestart = \"{restart}\"\n"
        ));
    }
    c
}

#[test]
fn the_daemon_takes_every_key_from_the_key_daemon() {
    let s = Scratch::new();
    let mut keyd = Keyd::start(s.path(), "dev-1");
    let env = [("EDGEWARD_KEYD", keyd.socket.to_str().unwrap())];
    let cfg = config(&[("alpha", "vault", "never"), ("who", "whoami", "never")]);
    let mut d = Daemon::start_with_env(&s, &cfg, &env);
    for e in ["alpha | vault-seal ok", "who | spiffe_id="] {
        d.wait_for(e, move |out, _| out.iter().any(|l| l.contains(e)));
    }
    let (status, out, err) = d.terminate();
    assert!(status.success(), "{err:?}");
    assert!(
        out.iter()
            .any(|l| l == "who | spiffe_id=spiffe://edgeward.local/device/dev-1/module/who"),
        "{out:?}"
    );
    // The keys are the key daemon's: none in the runtime's state dir.
    assert!(
        !s.state().join("hsm").exists(),
        "the runtime made key files"
    );
    assert!(keyd.state.join("hsm").exists());

    // A restart, through the key daemon again: the registration's data key
    // unwraps and alpha opens what it sealed.
    let mut d = Daemon::start_with_env(&s, &cfg, &env);
    d.wait_for("alpha | vault-open ok", |out, _| {
        out.iter().any(|l| l.contains("alpha | vault-open ok"))
    });
    // Its metrics count the calls the key daemon answered.
    let (code, metrics) = http(&s.socket(), "GET", "/v1/metrics", b"");
    assert_eq!(code, 200, "{metrics}");
    let answered: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("edgeward_keyd_calls_total{") && l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(answered >= 2, "{metrics}");
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{err:?}");

    // Without it the daemon does not fall back to keys of its own.
    keyd.stop();
    let o = s
        .edgeward()
        .env("EDGEWARD_KEYD", &keyd.socket)
        .arg("daemon")
        .arg("--config")
        .arg(s.write("config.toml", &cfg))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("key daemon at"), "{}", stderr(&o));
    assert!(!s.state().join("hsm").exists());
}

#[test]
fn a_backend_other_than_the_configured_one_is_refused() {
    let s = Scratch::new();
    let keyd = Keyd::start(s.path(), "dev-1");
    let o = s
        .edgeward()
        .env("EDGEWARD_KEYD", &keyd.socket)
        .args(["hsm", "info", "--config"])
        .arg(s.write("config.toml", UNREACHABLE_TPM))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("holds the soft backend; [hsm] backend is tpm"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn modules_outlive_the_key_daemon_and_the_runtime_reconnects() {
    modules_outlive_the_key_daemon(&Hw::Soft);
}

#[test]
fn modules_outlive_the_key_daemon_on_a_tpm() {
    modules_outlive_the_key_daemon(&Hw::tpm());
}

#[test]
fn modules_outlive_the_key_daemon_on_a_pkcs11_token() {
    modules_outlive_the_key_daemon(&Hw::pkcs11());
}

/// The key daemon goes away while the runtime serves a module: the
/// module keeps its schedule and signs every reading and carries its
/// token (with what the runtime already holds); the key daemon comes back
/// and the runtime's next operation that needs it reconnects.
fn modules_outlive_the_key_daemon(hw: &Hw) {
    let s = Scratch::new();
    let mut keyd = hw.start_keyd(s.path());
    let env = [("EDGEWARD_KEYD", keyd.socket.to_str().unwrap())];
    let sensor = guests::TEMPERATURE_SENSOR;
    let cfg = format!(
        "{}[identity]\ndevice_id = \"dev-1\"\n\n[[module]]\nname = \"neighbour\"\nfile = \"{sensor}\"\ndigest = \"{}\"\nenv = {{ INTERVAL_MS = \"100\", SENSOR_ID = \"neighbour\" }}\n",
        hw.toml(),
        sha256sum(sensor)
    );
    let d = Daemon::start_with_env(&s, &cfg, &env);
    wait_for_socket(&s);
    status_when(&s, "the sensor running", |v| {
        status_of(v, "neighbour")["state"] == "running"
    });
    // Running is not yet signing: the sensor's first reading gets its
    // X509-SVID from the key daemon. Wait for a signed one (on a loaded
    // machine the first reading can come after the kill below).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = stdout(&s.edgeward().args(["logs", "neighbour"]).output().unwrap());
        if log.lines().any(|l| l.contains("\"sig\":\"")) {
            break;
        }
        assert!(Instant::now() < deadline, "no signed reading yet: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The key daemon goes away: the sensor keeps its schedule, its tokens
    // signed by the JWT working key the runtime already holds.
    // On the soft backend it crashes (SIGKILL: its socket stays behind,
    // and the next one takes the path over); on a TPM or a token it is
    // stopped as a service manager stops it.
    if matches!(hw, Hw::Soft) {
        keyd.child.kill().unwrap();
        keyd.child.wait().unwrap();
        assert!(keyd.socket.exists());
    } else {
        keyd.stop_cleanly(&s.path().join("keyd.log"));
    }
    std::thread::sleep(Duration::from_secs(3));
    neighbour_kept_its_schedule(&s, "the key daemon gone");
    // The last 2 s of readings (the key daemon gone all along) are signed
    // and carry a token.
    let log = stdout(&s.edgeward().args(["logs", "neighbour"]).output().unwrap());
    let readings: Vec<&str> = log.lines().filter(|l| l.contains("\"seq\":")).collect();
    assert!(readings.len() >= 25, "{log}");
    for r in &readings[readings.len() - 20..] {
        assert!(
            r.contains("\"sig\":\"") && r.contains("\"token\":\""),
            "unsigned with the key daemon gone: {r}"
        );
    }
    // It comes back; the next operation that needs it (a new module's
    // registration wraps its data key) reconnects.
    let keyd = hw.start_keyd(s.path());
    let o = s
        .edgeward()
        .args(["module", "add", "who", PROBE, "--arg", "whoami"])
        .output()
        .unwrap();
    assert_status(&o, 0);
    status_when(&s, "who registered", |v| {
        status_of(v, "who")["state"] != "absent" && !status_of(v, "who")["state"].is_null()
    });
    let log = s.edgeward().args(["logs", "who"]).output().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = stdout(&log);
    while !text.contains("spiffe_id=spiffe://edgeward.local/device/dev-1/module/who") {
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
        text = stdout(&s.edgeward().args(["logs", "who"]).output().unwrap());
    }
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{err:?}");
    drop(keyd);
}

/// The uid the runtime runs as in these tests (one with no passwd entry: a user of its own).
const RUNTIME_UID: u32 = 64999;

fn chown(p: &Path, uid: u32) {
    rustix::fs::chown(
        p,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(uid)),
    )
    .unwrap();
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// The runtime process `pid`: the runtime's uid and group alone, no
/// capabilities, no new privileges, a seccomp filter.
fn assert_boxed_in(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let four = format!("{RUNTIME_UID} {RUNTIME_UID} {RUNTIME_UID} {RUNTIME_UID}");
    assert_eq!(field("Uid"), four);
    assert_eq!(field("Gid"), four);
    assert_eq!(field("Groups"), "");
    assert_eq!(field("CapEff"), "0000000000000000");
    assert_eq!(field("CapPrm"), "0000000000000000");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
    // No TPM device or token library among its descriptors or mappings:
    // the key daemon holds those.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        let t = target.to_string_lossy();
        assert!(
            !t.starts_with("/dev/tpm") && !t.contains("softhsm") && !t.contains("hsm-tpm"),
            "the runtime holds {t}"
        );
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for lib in ["libtss2", "libsofthsm2", "p11-kit"] {
        assert!(!maps.contains(lib), "the runtime maps {lib}");
    }
}

#[test]
fn the_runtime_under_its_own_uid_gets_identities_and_cannot_reach_the_keys() {
    let s = Scratch::new();
    chmod(s.path(), 0o755);
    let mut keyd = Keyd::start_with(
        s.path(),
        "dev-1",
        &["--runtime-uid", &RUNTIME_UID.to_string()],
    );
    let (keyd_state, keyd_socket) = (keyd.state.clone(), keyd.socket.clone());
    // The runtime's own state and socket directory, its uid's.
    let state = s.path().join("rt-state");
    let run = s.path().join("rt-run");
    for d in [&state, &run] {
        std::fs::create_dir(d).unwrap();
        chmod(d, 0o700);
        chown(d, RUNTIME_UID);
    }
    let escape = state.join("escape");
    let cfg = s.write(
        "runtime.toml",
        &config(&[
            ("who", "whoami", "never"),
            ("c", "cert", "never"),
            ("alpha", "vault", "never"),
        ]),
    );
    chmod(&cfg, 0o644);
    let mut d = Command::new("setpriv");
    d.args(["--reuid", &RUNTIME_UID.to_string()])
        .args(["--regid", &RUNTIME_UID.to_string()])
        .args(["--clear-groups", "--inh-caps=-all", "--"])
        .arg(EDGEWARD)
        .arg("--state-dir")
        .arg(&state)
        .arg("daemon")
        .arg("--config")
        .arg(&cfg)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("EDGEWARD_LOG", "info")
        .env("EDGEWARD_SOCKET", run.join("api.sock"))
        .env("EDGEWARD_KEYD", &keyd_socket)
        .env("EDGEWARD_TEST_ESCAPE", &escape)
        .env("EDGEWARD_TEST_KEYD_STATE", &keyd_state);
    let mut d = Daemon::from_command(d);
    for e in [
        "who | spiffe_id=",
        "c | -----BEGIN CERTIFICATE-----",
        "alpha | vault-seal ok",
    ] {
        d.wait_for(e, move |out, _| out.iter().any(|l| l.contains(e)));
    }
    // Its process: its own uid, no capabilities, confined; no descriptor
    // into the key daemon's state.
    // setpriv execs the daemon: the pid is the daemon's.
    let pid = d.child.id();
    assert_boxed_in(pid);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        assert!(
            !target.starts_with(&keyd_state),
            "the runtime holds {}",
            target.display()
        );
    }
    // The certificate the module got is a leaf the key daemon let the
    // device CA sign for it.
    let (status, out, err) = d.terminate();
    assert!(status.success(), "{err:?}");
    assert!(
        out.iter()
            .any(|l| l == "who | spiffe_id=spiffe://edgeward.local/device/dev-1/module/who"),
        "{out:?}"
    );
    // The simulated escape, from inside the confined runtime: every key
    // operation beyond its own refused, the key files and the key daemon's
    // memory out of reach.
    let report = std::fs::read_to_string(&escape).unwrap();
    let r = beyond_its_own_refused(&report);
    assert_eq!(r.get("keyd-files"), Some(&"13"), "EACCES: {report}");
    assert_eq!(r.get("keyd-mem"), Some(&"13"), "EACCES: {report}");
    assert_eq!(r.get("keyd-environ"), Some(&"13"), "EACCES: {report}");
    assert!(!state.join("hsm").exists(), "the runtime made key files");
    // Its events are in the key daemon's log, extended together with the
    // register: evidence from the key daemon replays, and names what ran.
    assert!(
        !state.join("measurements").exists(),
        "the runtime wrote a log"
    );
    let ev = evidence(&s, &state, &keyd_socket, &cfg, "evidence");
    let log = std::fs::read_to_string(ev.join("event.log")).unwrap();
    for m in ["\"who\"", "\"c\"", "\"alpha\""] {
        assert!(log.contains(m), "{m} not measured: {log}");
    }
    keyd.stop();
    let log = std::fs::read_to_string(s.path().join("keyd.log")).unwrap();
    assert!(log.contains("refused"), "{log}");
}

/// The simulated escape's report (`keyd-NAME OUTCOME` lines): every key
/// operation beyond the runtime's own refused, its public material given;
/// the report by name.
fn beyond_its_own_refused(report: &str) -> std::collections::BTreeMap<&str, &str> {
    let r: std::collections::BTreeMap<&str, &str> =
        report.lines().filter_map(|l| l.split_once(' ')).collect();
    for what in [
        "keyd-ca-digest",
        "keyd-jwt-digest",
        "keyd-extend",
        "keyd-quote",
        "keyd-destroy-ca",
        "keyd-other-key",
        "keyd-ca-csr",
        "keyd-cert-ca",
        "keyd-cert-other-device",
        "keyd-cert-other-domain",
        "keyd-cert-too-long",
    ] {
        assert_eq!(r.get(what), Some(&"refused"), "{what}: {report}");
    }
    assert_eq!(r.get("keyd-public"), Some(&"ok"), "{report}");
    assert_eq!(r.get("keyd-cert-module-leaf"), Some(&"ok"), "{report}");
    r
}

/// The children of `pid`, whichever of its threads started them (from
/// /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The one child of the key daemon `keyd_pid`: the runtime it launched.
fn the_runtime(keyd_pid: u32) -> u32 {
    let kids = children_of(keyd_pid);
    assert_eq!(kids.len(), 1, "{kids:?}");
    kids[0]
}

/// The records of an event log (JSON-SEQ).
fn records(log: &str) -> Vec<serde_json::Value> {
    log.split('\x1e')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| serde_json::from_str::<serde_json::Value>(r).unwrap())
        .collect()
}

/// Evidence from the key daemon at `socket`, for the runtime state `state`.
fn evidence(s: &Scratch, state: &Path, socket: &Path, cfg: &Path, name: &str) -> PathBuf {
    let ev = s.path().join(name);
    let o = Command::new(EDGEWARD)
        .arg("--state-dir")
        .arg(state)
        .env("EDGEWARD_KEYD", socket)
        .args(["attest", "--config"])
        .arg(cfg)
        .args(["--nonce", "00112233", "--out"])
        .arg(&ev)
        .output()
        .unwrap();
    assert_status(&o, 0);
    let o = Command::new(EDGEWARD)
        .args(["attest", "verify"])
        .arg(&ev)
        .args(["--device", "dev-1", "--nonce", "00112233"])
        .output()
        .unwrap();
    let out = stdout(&o);
    for check in ["pass signature", "pass log-replay", "pass events"] {
        assert!(out.contains(check), "{out}{}", stderr(&o));
    }
    ev
}

/// Kills what is left of a launch when a test fails half-way.
struct Reap(Vec<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in &self.0 {
            for c in children_of(*pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &c.to_string()])
                    .status();
            }
        }
    }
}

/// What a launch test runs: the key daemon launching the runtime as
/// [`RUNTIME_UID`] with its own state and socket directories and a config
/// of one module; (daemon, runtime state, key daemon socket, config).
fn launch_keyd(s: &Scratch, hw: &Hw) -> (Daemon, PathBuf, PathBuf, PathBuf) {
    launch_keyd_with(s, hw, &[], "")
}

/// [`launch_keyd`] with more arguments for the key daemon and a section
/// before the runtime's config.
fn launch_keyd_with(
    s: &Scratch,
    hw: &Hw,
    keyd_args: &[&str],
    runtime_toml: &str,
) -> (Daemon, PathBuf, PathBuf, PathBuf) {
    chmod(s.path(), 0o755);
    let state = s.path().join("rt-state");
    let run = s.path().join("rt-run");
    for d in [&state, &run] {
        std::fs::create_dir(d).unwrap();
        chmod(d, 0o700);
        chown(d, RUNTIME_UID);
    }
    let cfg = s.write(
        "runtime.toml",
        &format!(
            "{runtime_toml}{}{}",
            hw.toml(),
            config(&[("who", "whoami", "never")])
        ),
    );
    chmod(&cfg, 0o644);
    let socket = s.path().join("keyd.sock");
    let mut cmd = Command::new(keyd_binary());
    cmd.arg("--state")
        .arg(s.path().join("keyd-state"))
        .arg("--socket")
        .arg(&socket)
        .args(["--device-id", "dev-1"])
        .args(hw.keyd_args())
        .args(["--runtime-uid", &RUNTIME_UID.to_string()])
        .args(["--runtime-gid", &RUNTIME_UID.to_string()])
        .args(keyd_args)
        .arg("--launch")
        .arg(EDGEWARD)
        .arg("--")
        .arg("--state-dir")
        .arg(&state)
        .arg("daemon")
        .arg("--config")
        .arg(&cfg)
        .env("EDGEWARD_LOG", "info")
        .env("EDGEWARD_SOCKET", run.join("api.sock"))
        // Not the runtime's: it must not get it.
        .env("NOT_FOR_THE_RUNTIME", "1");
    let mut d = Daemon::from_command(cmd);
    d.wait_for("who's identity", |out, _| {
        out.iter().any(|l| l.contains("who | spiffe_id="))
    });
    (d, state, socket, cfg)
}

/// A hello to the key daemon at `socket` from a process of `uid`; the
/// answer.
fn hello_as(uid: u32, socket: &Path) -> String {
    use std::os::unix::process::CommandExt as _;
    let o = Command::new("python3")
        .args([
            "-c",
            "import socket, struct, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nb = b'{\"v\":1,\"call\":{\"op\":\"hello\"}}'\ntry:\n    s.sendall(struct.pack('>I', len(b)) + b)\nexcept OSError:\n    pass\nn = struct.unpack('>I', s.recv(4))[0]\nprint(s.recv(n).decode())",
        ])
        .arg(socket)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
}

/// The measured launcher: the key daemon measures itself, then the
/// runtime's executable and configuration, before it starts the runtime as
/// the runtime's user; the runtime killed is restarted, each start and
/// exit measured; SIGTERM to the key daemon stops both.
#[test]
fn the_key_daemon_launches_the_runtime_measured_and_restarts_it() {
    launches_the_runtime_and_restarts_it(&Hw::Soft);
}

#[test]
fn the_key_daemon_on_a_tpm_launches_the_runtime_measured_and_restarts_it() {
    launches_the_runtime_and_restarts_it(&Hw::tpm());
}

/// A PKCS#11 token has no measurement register: the launcher says so and
/// launches and restarts the runtime all the same.
#[test]
fn the_key_daemon_on_a_pkcs11_token_launches_the_runtime_and_restarts_it() {
    launches_the_runtime_and_restarts_it(&Hw::pkcs11());
}

fn launches_the_runtime_and_restarts_it(hw: &Hw) {
    let s = Scratch::new();
    let (mut d, state, socket, cfg) = launch_keyd(&s, hw);
    let measured = !matches!(hw, Hw::Pkcs11(_));
    // The launcher has the seccomp filter and no_new_privs, not Landlock
    // (the runtime would inherit its ruleset), and says so.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
    assert!(
        status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"),
        "{status}"
    );
    // Of root's capabilities it keeps what starting the runtime as its
    // user and stopping it take: CAP_KILL, CAP_SETGID, CAP_SETUID.
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert!(
            status.contains(&format!("{set}:\t00000000000000e0")),
            "{set}: {status}"
        );
    }
    assert!(
        d.seen_err
            .iter()
            .any(|l| l.contains("landlock=\"not applied\"")),
        "{}",
        d.seen_err.join("\n")
    );
    let keyd_pid = d.child.id();
    let _reap = Reap(vec![keyd_pid]);
    // The runtime is the key daemon's child, under its own uid, with no
    // capabilities, confined.
    let runtime = the_runtime(keyd_pid);
    assert_boxed_in(runtime);
    // Executed through a descriptor, it names itself.
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{runtime}/comm")).unwrap(),
        "edgeward\n"
    );
    // Its environment is the runtime's variables and the launcher's two;
    // its input is not the key daemon's; it leads a session of its own.
    let environ = std::fs::read(format!("/proc/{runtime}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("EDGEWARD_LOG=info"), "{environ}");
    assert!(!environ.contains("NOT_FOR_THE_RUNTIME"), "{environ}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{runtime}/fd/0")).unwrap(),
        Path::new("/dev/null")
    );
    let stat = std::fs::read_to_string(format!("/proc/{runtime}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_eq!(fields[3], runtime.to_string(), "session id: {stat}");
    // Another process of the runtime's uid is not the runtime.
    let a = hello_as(RUNTIME_UID, &socket);
    assert!(a.contains("refused"), "{a}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{runtime}/exe")).unwrap(),
        std::fs::canonicalize(EDGEWARD).unwrap()
    );

    if measured {
        the_log_begins_with_the_launch(&s, &state, &socket, &cfg);
    } else {
        assert!(
            d.seen_err
                .iter()
                .any(|l| l.contains("the backend has no measurement register")),
            "{}",
            d.seen_err.join("\n")
        );
    }

    // Killed, the runtime is restarted, measured again.
    Command::new("kill")
        .args(["-KILL", &runtime.to_string()])
        .status()
        .unwrap();
    d.wait_for("the runtime restarted", |out, _| {
        count(out, "who | spiffe_id=") >= 2
    });
    let restarted = the_runtime(keyd_pid);
    assert_ne!(restarted, runtime);
    assert_boxed_in(restarted);
    if measured {
        the_log_records_the_restart(&s, &state, &socket, &cfg);
    }

    // SIGTERM to the key daemon: the runtime stops first, then it.
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{}", err.join("\n"));
    assert!(
        !Path::new(&format!("/proc/{restarted}")).exists()
            || std::fs::read_to_string(format!("/proc/{restarted}/stat"))
                .unwrap_or_default()
                .contains(") Z"),
        "the runtime outlived its stop"
    );
    assert!(
        err.iter().any(|l| l.contains("runtime stopped")),
        "{}",
        err.join("\n")
    );
}

/// Told `--no-measure` (a device that is not attested, its runtime with
/// `[runtime] measure = false`), the key daemon says so, keeps no log,
/// still launches the runtime from a checked descriptor and serves it, and
/// a quote is refused naming why.
#[test]
fn the_key_daemon_told_not_to_measure_launches_the_runtime_unmeasured() {
    let s = Scratch::new();
    let (d, state, socket, cfg) = launch_keyd_with(
        &s,
        &Hw::Soft,
        &["--no-measure"],
        "[runtime]\nmeasure = false\n\n",
    );
    assert!(
        d.seen_err.iter().any(|l| l
            .contains("--no-measure: the key daemon and the runtime it launches are not measured")),
        "{}",
        d.seen_err.join("\n")
    );
    assert!(
        !d.seen_err
            .iter()
            .any(|l| l.contains("measured itself") || l.contains("executable measured")),
        "{}",
        d.seen_err.join("\n")
    );
    assert!(!s.path().join("keyd-state/measurements").exists());
    // Its register took a mark no log explains: a measured start later in
    // this boot cannot hide this one.
    let o = Command::new(EDGEWARD)
        .arg("--state-dir")
        .arg(s.path().join("cli-state"))
        .args(["hsm", "info", "--json", "--config"])
        .arg(&cfg)
        .env("EDGEWARD_KEYD", &socket)
        .output()
        .unwrap();
    assert_status(&o, 0);
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let mark = {
        use sha2::Digest as _;
        let m = sha2::Sha256::digest(b"edgeward-keyd --no-measure: this boot is not attested");
        let mut h = sha2::Sha256::new();
        h.update([0u8; 32]);
        h.update(m);
        edgeward::measure::hex(&h.finalize())
    };
    assert_eq!(info["register"], mark.as_str(), "{info}");
    let runtime = the_runtime(d.child.id());
    let _reap = Reap(vec![d.child.id()]);
    assert_boxed_in(runtime);
    let o = Command::new(EDGEWARD)
        .arg("--state-dir")
        .arg(&state)
        .args([
            "attest",
            "--nonce",
            "00112233445566778899aabbccddeeff",
            "--out",
        ])
        .arg(s.path().join("evidence"))
        .arg("--config")
        .arg(&cfg)
        .env("EDGEWARD_KEYD", &socket)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("keeps no measurement log (started with --no-measure)"),
        "{}",
        stderr(&o)
    );
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{}", err.join("\n"));
}

/// The log begins with the key daemon, then what it launched, measured
/// before it ran; the runtime did not measure its executable itself.
fn the_log_begins_with_the_launch(s: &Scratch, state: &Path, socket: &Path, cfg: &Path) {
    let ev = evidence(s, state, socket, cfg, "evidence-1");
    let recs = records(&std::fs::read_to_string(ev.join("event.log")).unwrap());
    let kinds: Vec<&str> = recs
        .iter()
        .map(|r| r["content"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        &kinds[..3],
        ["key-daemon", "executable", "runtime-config"],
        "{kinds:?}"
    );
    let keyd_exe = std::fs::canonicalize(keyd_binary()).unwrap();
    assert_eq!(
        recs[0]["content"]["sha256"],
        sha256sum(keyd_exe.to_str().unwrap())
    );
    assert_eq!(recs[0]["content"]["config"]["runtime_uids"][0], RUNTIME_UID);
    assert_eq!(recs[1]["content"]["sha256"], sha256sum(EDGEWARD));
    assert_eq!(recs[1]["content"]["launched_by"], "key-daemon");
    assert_eq!(recs[1]["content"]["start"], 1);
    assert_eq!(
        recs[2]["content"]["sha256"],
        sha256sum(cfg.to_str().unwrap())
    );
    assert_eq!(count_kind(&kinds, "executable"), 1, "{kinds:?}");
    assert!(kinds.contains(&"module"), "{kinds:?}");
}

/// The runtime's exit (SIGKILL) and its second start are in the log, in
/// that order.
fn the_log_records_the_restart(s: &Scratch, state: &Path, socket: &Path, cfg: &Path) {
    let ev = evidence(s, state, socket, cfg, "evidence-2");
    let recs = records(&std::fs::read_to_string(ev.join("event.log")).unwrap());
    let exit = recs
        .iter()
        .find(|r| r["content"]["kind"] == "runtime-exit")
        .unwrap();
    assert_eq!(exit["content"]["status"], "signal 9");
    assert_eq!(exit["content"]["start"], 1);
    let second = recs
        .iter()
        .filter(|r| r["content"]["kind"] == "executable")
        .nth(1)
        .unwrap();
    assert_eq!(second["content"]["start"], 2);
    assert!(second["recnum"].as_u64() > exit["recnum"].as_u64());
}

/// A runtime stopped cleanly from outside (as a service manager stops
/// every process of the service) stops its key daemon too; a key daemon
/// that dies takes its runtime with it (the next one launches and
/// measures a new one).
#[test]
fn a_runtime_that_stops_cleanly_stops_the_key_daemon_and_dies_with_it() {
    let s = Scratch::new();
    let (mut d, _, socket, _) = launch_keyd(&s, &Hw::Soft);
    let keyd_pid = d.child.id();
    let _reap = Reap(vec![keyd_pid]);
    let runtime = the_runtime(keyd_pid);
    Command::new("kill")
        .args(["-TERM", &runtime.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the key daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    d.pump();
    let err = std::mem::take(&mut d.seen_err);
    assert!(
        err.iter().any(|l| l.contains("exited cleanly by itself")),
        "{}",
        err.join("\n")
    );
    assert!(!socket.exists(), "the key daemon left its socket");

    // Again, and the key daemon is killed: its runtime stops.
    let s = Scratch::new();
    let (mut d, _, _, _) = launch_keyd(&s, &Hw::Soft);
    let keyd_pid = d.child.id();
    let _reap = Reap(vec![keyd_pid]);
    let runtime = the_runtime(keyd_pid);
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{runtime}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the runtime outlived its key daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count_kind(kinds: &[&str], kind: &str) -> usize {
    kinds.iter().filter(|k| **k == kind).count()
}

/// What the launcher refuses to start: a runtime others could rewrite
/// between its measurement and its start.
#[test]
fn the_key_daemon_does_not_launch_what_others_can_change() {
    let s = Scratch::new();
    let exe = s.path().join("edgeward");
    std::fs::copy(EDGEWARD, &exe).unwrap();
    chmod(&exe, 0o777);
    let mut keyd = Keyd::start_with(
        s.path(),
        "dev-1",
        &[
            "--runtime-uid",
            &RUNTIME_UID.to_string(),
            "--runtime-gid",
            &RUNTIME_UID.to_string(),
            "--launch",
            exe.to_str().unwrap(),
            "--",
            "daemon",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = s.path().join("keyd.log");
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("writable by group or others") {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(children_of(keyd.child.id()).is_empty());
    // It keeps serving meanwhile.
    assert!(std::os::unix::net::UnixStream::connect(&keyd.socket).is_ok());
    keyd.stop();
}

/// Whether `pid` is running (not gone, not a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// The runtime links no TPM stack. Configured for the TPM, the daemon
/// starts a private key daemon (`edgeward-keyd --private`, its child)
/// before it confines itself: the key daemon maps libtss2 and holds the
/// TPM, the runtime maps no libtss2 and its modules' keys come through the
/// key daemon. Killed, the runtime takes its key daemon with it (socket
/// removed), and the next start opens the TPM again.
#[test]
fn the_runtime_maps_no_tpm_stack_its_private_key_daemon_holds_the_tpm() {
    let needed = |p: &Path| {
        let o = Command::new("readelf").arg("-d").arg(p).output().unwrap();
        assert!(o.status.success(), "readelf -d {}", p.display());
        stdout(&o)
    };
    assert!(!needed(Path::new(EDGEWARD)).contains("libtss2"));
    assert!(needed(&keyd_binary()).contains("libtss2-esys"));

    let tpm = edgeward_tests::fixtures::Swtpm::start();
    let s = Scratch::new();
    // Lifetimes past the key daemon's defaults (24 h leaves, 7-day JWT
    // keys): the runtime's private key daemon certifies what this
    // configuration issues.
    let cfg = format!(
        "[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n{}",
        tpm.tcti(),
        config(&[("alpha", "vault", "never"), ("who", "whoami", "never")]).replace(
            "device_id = \"dev-1\"\n",
            "device_id = \"dev-1\"\nsvid_ttl = \"2d\"\njwt_key_rotation = \"10d\"\n"
        )
    );
    // In the state dir: the only place the confined runtime writes.
    let escape = s.state().join("escape");
    // Under a service manager: the daemon speaks for itself, its key
    // daemon (which it started) does not.
    let notify_path = s.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut d = Daemon::start_with_env(
        &s,
        &cfg,
        &[
            ("EDGEWARD_TEST_ESCAPE", escape.to_str().unwrap()),
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
        ],
    );
    for e in ["alpha | vault-seal ok", "who | spiffe_id="] {
        d.wait_for(e, move |out, _| out.iter().any(|l| l.contains(e)));
    }
    let mut buf = [0u8; 4096];
    let ready = std::iter::from_fn(|| {
        let n = notify.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .find(|m| m.starts_with("READY=1"));
    assert_eq!(ready.as_deref(), Some("READY=1\nSTATUS=serving 2 modules"));
    let runtime = d.child.id();
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let keyd: Vec<u32> = children_of(runtime)
        .into_iter()
        .filter(|p| comm(*p).trim() == "edgeward-keyd")
        .collect();
    assert_eq!(keyd.len(), 1, "{:?}", children_of(runtime));
    let keyd = keyd[0];
    let _reap = Reap(vec![keyd]);
    let maps = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        !maps(runtime).contains("libtss2"),
        "the runtime maps libtss2"
    );
    assert!(maps(keyd).contains("libtss2-esys"));
    let cmdline = std::fs::read(format!("/proc/{keyd}/cmdline")).unwrap();
    let environ = std::fs::read(format!("/proc/{keyd}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"),
        "the key daemon was given the service manager's socket"
    );
    notify
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while let Ok(n) = notify.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]);
        assert!(!m.contains("backend"), "the key daemon spoke: {m}");
    }
    // Its socket is in the state dir, the runtime's user's alone.
    let socket = s.state().join(format!("keyd.{runtime}.sock"));
    assert!(socket.exists(), "{}", socket.display());
    // No key file in the runtime's state dir: the TPM holds the keys.
    assert!(!s.state().join("hsm").exists());
    // Another local user cannot reach it (the state dir is the runtime's
    // user's alone; the key daemon's principals are its own user and root).
    {
        use std::os::unix::process::CommandExt as _;
        let o = Command::new("python3")
            .args([
                "-c",
                "import socket, sys\nsocket.socket(socket.AF_UNIX).connect(sys.argv[1])",
            ])
            .arg(&socket)
            .uid(4242)
            .gid(4242)
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(stderr(&o).contains("Permission denied"), "{}", stderr(&o));
    }

    // The simulated escape, from inside the confined runtime: its private
    // key daemon serves it the runtime's operations only, though they
    // share a user (`--private-runtime`).
    let report = std::fs::read_to_string(&escape).unwrap();
    beyond_its_own_refused(&report);
    assert!(
        cmdline
            .split(|b| *b == 0)
            .any(|a| a == b"--private-runtime"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    // Another process of its user (root here) is not its parent: refused
    // whatever it asks.
    let a = hello_as(0, &socket);
    assert!(a.contains("refused"), "{a}");

    // Killed (no clean stop): the key daemon sees its parent gone.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while running(keyd) {
        assert!(
            Instant::now() < deadline,
            "the private key daemon outlived its runtime"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!socket.exists(), "the private key daemon left its socket");

    // The TPM was released: the next daemon opens it and alpha's sealed
    // data opens with the TPM-held keys.
    let mut d = Daemon::start(&s, &cfg);
    d.wait_for("alpha | vault-open ok", |out, _| {
        out.iter().any(|l| l.contains("alpha | vault-open ok"))
    });
    // A service manager stops every process of the unit at once: the key
    // daemon waits for its runtime, which stops its modules cleanly.
    let runtime = d.child.id();
    let keyd: Vec<u32> = children_of(runtime)
        .into_iter()
        .filter(|p| comm(*p).trim() == "edgeward-keyd")
        .collect();
    assert_eq!(keyd.len(), 1);
    let _reap = Reap(vec![keyd[0]]);
    Command::new("kill")
        .args(["-TERM", &keyd[0].to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        running(keyd[0]),
        "the key daemon stopped before its runtime"
    );
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{err:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while running(keyd[0]) {
        assert!(
            Instant::now() < deadline,
            "the key daemon outlived its runtime"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Starting the key daemon started no thread before Landlock (it binds
    // only the threads started after it): the daemon is held in full.
    assert!(
        !err.iter().any(|l| l.contains("WITHOUT Landlock")),
        "{}",
        err.join("\n")
    );
}

/// A private key daemon that cannot start stops the daemon with its
/// reason: the daemon does not fall back to keys of its own.
#[test]
fn a_private_key_daemon_that_cannot_start_stops_the_daemon_with_its_reason() {
    let s = Scratch::new();
    let cfg = format!(
        "{UNREACHABLE_TPM}{}",
        config(&[("alpha", "vault", "never")])
    );
    let o = s
        .edgeward()
        .arg("daemon")
        .arg("--config")
        .arg(s.write("config.toml", &cfg))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("hsm backend tpm") && err.contains("the private key daemon"),
        "{err}"
    );
    // Its own words (the TPM's error) are in the reason.
    assert!(err.contains("edgeward-keyd exited"), "{err}");
    assert!(
        err.contains("exited (exit status: 1): ")
            && err.contains("edgeward-keyd: cannot open the HSM"),
        "{err}"
    );
    assert!(!s.state().join("hsm").exists());
}

/// A key daemon executable that another user could have put beside
/// `edgeward` (a directory others can write) is not started.
#[test]
fn a_key_daemon_others_could_have_placed_is_not_started() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = Scratch::new();
    let dir = s.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(EDGEWARD, dir.join("edgeward")).unwrap();
    std::fs::copy(keyd_binary(), dir.join("edgeward-keyd")).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let cfg = s.write("config.toml", UNREACHABLE_TPM);
    let o = Command::new(dir.join("edgeward"))
        .args(["hsm", "info", "--state-dir"])
        .arg(s.state())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no edgeward-keyd that only root or this user can change"),
        "{}",
        stderr(&o)
    );
}

/// A private key daemon stops when its parent ends even while a process
/// the parent forked keeps its end of the lifeline pipe open (what an
/// escaped module that forks could try, to keep the key daemon serving
/// after the runtime is gone). The parent here starts the key daemon,
/// waits until it serves and exits; this test holds the pipe.
#[test]
fn a_private_key_daemon_stops_with_its_parent_though_a_fork_holds_its_lifeline() {
    let s = Scratch::new();
    let state = s.path().join("private");
    std::fs::create_dir(&state).unwrap();
    let socket = state.join("keyd.sock");
    let (reader, writer) = std::io::pipe().unwrap();
    let o = Command::new("python3")
        .args([
            "-c",
            "import subprocess, sys, os, time
p = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(400):
    if os.path.exists(sys.argv[1]): break
    time.sleep(0.05)
else:
    sys.exit('the key daemon did not start')
print(p.pid)",
        ])
        .arg(&socket)
        .arg(keyd_binary())
        .arg("--state")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .args(["--device-id", "d", "--private"])
        .stdin(reader)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let keyd: u32 = stdout(&o).trim().parse().unwrap();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
    let _kill = Kill(keyd);
    assert!(running(keyd));
    // This process holds the pipe's other end all along.
    let _held = writer;
    let deadline = Instant::now() + Duration::from_secs(20);
    while running(keyd) {
        assert!(
            Instant::now() < deadline,
            "the private key daemon outlived its parent while the pipe stayed open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!socket.exists(), "the private key daemon left its socket");
}

/// The key daemon confines itself before it serves: `no_new_privs`, the
/// seccomp filter the runtime has, and Landlock on the soft backend and
/// the TPM (its state dir, its socket's directory, `/proc` to read); on a
/// PKCS#11 token it says why Landlock is not applied (the module's files
/// are the vendor's to place), and it still serves.
#[test]
fn the_key_daemon_confines_itself_before_it_serves() {
    for hw in [Hw::Soft, Hw::tpm(), Hw::pkcs11()] {
        let s = Scratch::new();
        let mut keyd = hw.start_keyd(s.path());
        let status = std::fs::read_to_string(format!("/proc/{}/status", keyd.child.id())).unwrap();
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        assert!(status.contains("Seccomp:\t2"), "{status}");
        // Root, without a capability left to regain (the disk through a
        // device node, another uid's files).
        for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
            assert!(
                status.contains(&format!("{set}:\t0000000000000000")),
                "{set}: {status}"
            );
        }
        // Confined, it still does its work: a module identity for a
        // runtime that asks.
        let env = [("EDGEWARD_KEYD", keyd.socket.to_str().unwrap())];
        let cfg = format!("{}{}", hw.toml(), config(&[("who", "whoami", "never")]));
        let mut d = Daemon::start_with_env(&s, &cfg, &env);
        d.wait_for("who's identity", |out, _| {
            out.iter().any(|l| l.contains("who | spiffe_id="))
        });
        let (status, _, err) = d.terminate();
        assert!(status.success(), "{err:?}");
        keyd.stop_cleanly(&s.path().join("keyd.log"));
        let log = std::fs::read_to_string(s.path().join("keyd.log")).unwrap();
        let want = match hw {
            Hw::Pkcs11(_) => "landlock=\"not applied\"",
            _ => "landlock=\"fully\"",
        };
        assert!(
            log.contains(&format!("key daemon confined {want}")),
            "{log}"
        );
        assert!(!log.contains("WITHOUT"), "{log}");
        if matches!(hw, Hw::Pkcs11(_)) {
            assert!(
                log.contains("a PKCS#11 module reads and writes where its vendor put it"),
                "{log}"
            );
        }
    }
}

/// Under a service manager the key daemon says READY=1 once its HSM is
/// open and its socket answers, and STOPPING=1 on SIGTERM.
#[test]
fn the_key_daemon_tells_the_service_manager_when_it_is_ready() {
    let s = Scratch::new();
    let path = s.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let run = s.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let socket = run.join("keyd.sock");
    let mut child = Command::new(keyd_binary())
        .arg("--state")
        .arg(s.path().join("keyd-state"))
        .arg("--socket")
        .arg(&socket)
        .args(["--device-id", "dev-1"])
        .env("NOTIFY_SOCKET", &path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = notify.recv(&mut buf).expect("no READY=1");
    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        m.starts_with("READY=1\nSTATUS=serving the soft backend on "),
        "{m}"
    );
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let n = notify.recv(&mut buf).expect("no STOPPING=1");
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        "STOPPING=1\nSTATUS=stopping"
    );
    assert!(child.wait().unwrap().success());
}

/// `EDGEWARD_KEYD_USER` (the packaged units': the key daemon under a user
/// of its own) widens the trusted answerers of the key daemon's socket by
/// that one user, named: a socket another uid answers is still refused,
/// and a number, an unknown name or the overflow id is refused outright.
#[test]
fn the_key_daemons_user_is_trusted_by_name_and_no_one_else() {
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::Builder::new()
        .prefix("edgeward-keyd-user-")
        .tempdir_in("/tmp")
        .unwrap();
    chmod(dir.path(), 0o777);
    let socket = dir.path().join("keyd.sock");
    // A stand-in answered by uid 1 (daemon): it accepts and hangs up.
    let mut fake = Command::new("python3")
        .args([
            "-c",
            "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen()\nwhile True:\n    c, _ = s.accept()\n    c.close()",
        ])
        .arg(&socket)
        .uid(1)
        .gid(1)
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the stand-in did not bind");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = Scratch::new();
    let info = |user: Option<&str>| {
        let mut c = s.edgeward();
        c.args(["hsm", "info"]).env("EDGEWARD_KEYD", &socket);
        match user {
            Some(u) => c.env("EDGEWARD_KEYD_USER", u),
            None => c.env_remove("EDGEWARD_KEYD_USER"),
        };
        let o = c.output().unwrap();
        assert!(!o.status.success(), "the stand-in is no key daemon");
        stderr(&o)
    };
    let e = info(None);
    assert!(
        e.contains("answered by uid 1, neither root nor this user"),
        "{e}"
    );
    let e = info(Some("bin"));
    assert!(
        e.contains("answered by uid 1, neither root nor this user nor the key daemon's (EDGEWARD_KEYD_USER: uid 2)"),
        "{e}"
    );
    // Its own user: past the check (and then it hangs up).
    let e = info(Some("daemon"));
    assert!(!e.contains("neither root"), "{e}");
    assert!(e.contains("key daemon at"), "{e}");
    for (user, says) in [
        ("1", "a name, not a number"),
        ("no-such-user-here", "no such user"),
        ("nobody", "the overflow id"),
    ] {
        let e = info(Some(user));
        assert!(e.contains(says), "{user}: {e}");
    }
    let _ = fake.kill();
    let _ = fake.wait();
}
