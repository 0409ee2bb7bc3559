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
        let socket = dir.join("keyd.sock");
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
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the key daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            state,
            socket,
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Keyd {
    fn drop(&mut self) {
        self.stop();
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
        .arg(s.write(
            "config.toml",
            "[hsm]\nbackend = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n",
        ))
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
    let s = Scratch::new();
    let mut keyd = Keyd::start(s.path(), "dev-1");
    let env = [("EDGEWARD_KEYD", keyd.socket.to_str().unwrap())];
    let sensor = guests::TEMPERATURE_SENSOR;
    let cfg = format!(
        "[identity]\ndevice_id = \"dev-1\"\n\n[[module]]\nname = \"neighbour\"\nfile = \"{sensor}\"\ndigest = \"{}\"\nenv = {{ INTERVAL_MS = \"100\", SENSOR_ID = \"neighbour\" }}\n",
        sha256sum(sensor)
    );
    let d = Daemon::start_with_env(&s, &cfg, &env);
    wait_for_socket(&s);
    status_when(&s, "the sensor running", |v| {
        status_of(v, "neighbour")["state"] == "running"
    });
    // The key daemon goes away: the sensor keeps its schedule, its tokens
    // signed by the JWT working key the runtime already holds.
    keyd.stop();
    std::thread::sleep(Duration::from_secs(3));
    neighbour_kept_its_schedule(&s, "the key daemon gone");
    // It comes back; the next operation that needs it (a new module's
    // registration wraps its data key) reconnects.
    let keyd = Keyd::start(s.path(), "dev-1");
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

/// The uid the runtime runs as in these tests (`nobody`).
const RUNTIME_UID: u32 = 65534;

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
    let pid = d.child.id();
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
    // setpriv execs the daemon: the pid is the daemon's.
    assert_eq!(
        field("Uid"),
        format!("{RUNTIME_UID} {RUNTIME_UID} {RUNTIME_UID} {RUNTIME_UID}")
    );
    assert_eq!(field("CapEff"), "0000000000000000");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
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
    ] {
        assert_eq!(r.get(what), Some(&"refused"), "{what}: {report}");
    }
    assert_eq!(r.get("keyd-public"), Some(&"ok"), "{report}");
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
    let ev = s.path().join("evidence");
    let o = Command::new(EDGEWARD)
        .arg("--state-dir")
        .arg(&state)
        .env("EDGEWARD_KEYD", &keyd_socket)
        .args(["attest", "--config"])
        .arg(&cfg)
        .args(["--nonce", "00112233", "--out"])
        .arg(&ev)
        .output()
        .unwrap();
    assert_status(&o, 0);
    let log = std::fs::read_to_string(ev.join("event.log")).unwrap();
    for m in ["\"who\"", "\"c\"", "\"alpha\""] {
        assert!(log.contains(m), "{m} not measured: {log}");
    }
    let o = Command::new(EDGEWARD)
        .args(["attest", "verify"])
        .arg(&ev)
        .args(["--device", "dev-1", "--nonce", "00112233"])
        .output()
        .unwrap();
    let out = stdout(&o);
    for check in ["pass signature", "pass log-replay"] {
        assert!(out.contains(check), "{out}{}", stderr(&o));
    }
    keyd.stop();
    let log = std::fs::read_to_string(s.path().join("keyd.log")).unwrap();
    assert!(log.contains("refused"), "{log}");
}
