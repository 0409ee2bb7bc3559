//! The management API on its unix socket: the operator's lifecycle through
//! the CLI, durable across restarts; who may do what (peer credentials,
//! with other uids through `setpriv`); and malformed requests, each
//! refused with a status and a message naming the problem.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::*;
use common::*;

const PROBE: &str = guests::SANDBOX_PROBE;

/// A directory other users can traverse (the scratch dir is private), for
/// the socket.
fn socket_home() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::Builder::new()
        .prefix("edgeward-api-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = d.path().join("run").join("api.sock");
    (d, sock)
}

fn start(s: &Scratch, config: &str, sock: &Path) -> Daemon {
    let mut d = Daemon::start_with_env(s, config, &[("EDGEWARD_SOCKET", sock.to_str().unwrap())]);
    d.wait_for("the daemon to start", |_, err| {
        count(err, "edgeward daemon starting") == 1
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http(sock, "GET", "/v1/health", b"").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "no health on {sock:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

/// `edgeward module ARGS` against `sock`.
fn module(s: &Scratch, sock: &Path, args: &[&str]) -> std::process::Output {
    s.edgeward()
        .arg("module")
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

fn config_module(name: &str) -> String {
    format!(
        "[[module]]\nname = \"{name}\"\nfile = \"{PROBE}\"\ndigest = \"{}\"\nargs = [\"tick\"]\n",
        sha256sum(PROBE)
    )
}

fn state_in_list(s: &Scratch, sock: &Path, name: &str) -> String {
    let o = module(s, sock, &["list", "--json"]);
    assert_status(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .map(|m| {
            format!(
                "{}/{}",
                m["state"].as_str().unwrap(),
                m["desired"].as_str().unwrap()
            )
        })
        .unwrap_or_else(|| "absent".into())
}

/// Waits (up to 20 s) until `name` shows `want` ("state/desired") in the
/// list: a start is acknowledged before the module's first status lands.
fn wait_state(s: &Scratch, sock: &Path, name: &str, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = state_in_list(s, sock, name);
        if now == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: {now}, not {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn operators_manage_modules_and_changes_survive_a_restart() {
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    let config = config_module("configured");
    let d = start(&s, &config, &sock);
    // The socket: its directory 0750, itself 0660.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(sock.parent().unwrap()), 0o750);
    assert_eq!(mode(&sock), 0o660);

    let o = module(&s, &sock, &["add", "ticker", PROBE, "--arg", "tick"]);
    assert_status(&o, 0);
    assert!(stdout(&o).contains(&sha256sum(PROBE)), "{}", stdout(&o));
    wait_state(&s, &sock, "ticker", "running/running");
    wait_state(&s, &sock, "configured", "running/running");
    // Adding it again is a conflict.
    let o = module(&s, &sock, &["add", "ticker", PROBE]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
    // Stopped modules stay stopped, across a restart too.
    assert_status(&module(&s, &sock, &["stop", "configured"]), 0);
    wait_state(&s, &sock, "configured", "stopped/stopped");
    // The config's own module cannot be removed through the API.
    let o = module(&s, &sock, &["remove", "configured"]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("config file"), "{}", stderr(&o));
    let show = module(&s, &sock, &["show", "ticker"]);
    assert_status(&show, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&show)).unwrap();
    assert_eq!(v["origin"], "operator");
    assert_eq!(v["spec"]["args"][0], "tick");
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{}", err.join("\n"));
    assert!(!sock.exists(), "the socket is removed at exit");

    // A status a crash left stale ("running" for a module that should not
    // run) is corrected at the next start.
    {
        let registry = edgeward::registry::Registry::open(&s.state()).unwrap();
        let stale = String::from_utf8(registry.status("configured").unwrap().unwrap())
            .unwrap()
            .replace("\"stopped\"", "\"running\"");
        registry
            .put_statuses(&[("configured", stale.as_bytes())])
            .unwrap();
    }
    // Acknowledged changes are in the registry: the operator's module
    // comes back, the stopped one stays stopped.
    let d = start(&s, &config, &sock);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while state_in_list(&s, &sock, "ticker") != "running/running" {
        assert!(
            std::time::Instant::now() < deadline,
            "ticker did not come back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_state(&s, &sock, "configured", "stopped/stopped");
    assert_status(&module(&s, &sock, &["restart", "ticker"]), 0);
    assert_status(&module(&s, &sock, &["start", "configured"]), 0);
    wait_state(&s, &sock, "configured", "running/running");
    assert_status(&module(&s, &sock, &["remove", "ticker"]), 0);
    assert_eq!(state_in_list(&s, &sock, "ticker"), "absent");
    assert!(
        !s.state().join("modules/ticker").exists(),
        "its data, logs and status are deleted"
    );
    let o = module(&s, &sock, &["show", "ticker"]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("no module \"ticker\""),
        "{}",
        stderr(&o)
    );
    let _ = d.terminate();
    // The removal took its identity registration with it.
    let registry = edgeward::registry::Registry::open(&s.state()).unwrap();
    assert!(registry.registration("ticker").unwrap().is_none());
    drop(registry);

    // No daemon: what only reads comes from the registry, opened
    // read-only, the same as through the daemon; changes are refused.
    let o = module(&s, &sock, &["list", "--json"]);
    assert_status(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let configured = v
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "configured")
        .unwrap();
    assert_eq!(
        (configured["state"].as_str(), configured["origin"].as_str()),
        (Some("stopped"), Some("config"))
    );
    let o = module(&s, &sock, &["show", "configured"]);
    assert_status(&o, 0);
    assert!(stdout(&o).contains("\"spec\""), "{}", stdout(&o));
    assert_status(&module(&s, &sock, &["logs", "configured"]), 0);
    let o = module(&s, &sock, &["exits", "configured"]);
    assert_status(&o, 0);
    // The aliases read the same.
    let o = s.edgeward().args(["status", "--json"]).output().unwrap();
    assert_status(&o, 0);
    assert!(stdout(&o).contains("\"configured\""), "{}", stdout(&o));
    assert_status(
        &s.edgeward().args(["logs", "configured"]).output().unwrap(),
        0,
    );
    let o = module(&s, &sock, &["logs", "nobody"]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("no module \"nobody\""),
        "{}",
        stderr(&o)
    );
    let o = module(&s, &sock, &["stop", "configured"]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("cannot reach the daemon") && stderr(&o).contains("api.sock"),
        "{}",
        stderr(&o)
    );
}

/// Roles from the peer's kernel credentials: another uid without a role
/// gets 403, a reader may read but not write, a member of an operator
/// group (a supplementary group) may write.
#[test]
fn who_may_do_what_is_decided_by_peer_credentials() {
    let s = Scratch::new();
    let (home, sock) = socket_home();
    // Users 65534 (no role), 65533 (reader) and 65532 in group 100
    // (operators); the socket's group is nogroup (65534), so all three can
    // reach it.
    let config = format!(
        "[api]\ngroup = \"65534\"\nreader_uids = [65533]\noperator_groups = [\"100\"]\n\n{}",
        config_module("configured")
    );
    let d = start(&s, &config, &sock);
    // The other users run a copy of the binary from a directory they can
    // reach (the checkout may be in a private home).
    let exe = home.path().join("edgeward");
    std::fs::copy(common::EDGEWARD, &exe).unwrap();
    let as_user = |uid: u32, groups: &str, args: &[&str]| {
        std::process::Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg("--regid=65534")
            .arg(format!("--groups={groups}"))
            .arg(&exe)
            .arg("module")
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .env_remove("EDGEWARD_STATE_DIR")
            .output()
            .expect("setpriv (util-linux)")
    };
    let o = as_user(65534, "65534", &["list"]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("not an operator or reader"),
        "{}",
        stderr(&o)
    );
    let o = as_user(65533, "65534", &["list"]);
    assert_status(&o, 0);
    assert!(stdout(&o).contains("configured"), "{}", stdout(&o));
    let o = as_user(65533, "65534", &["stop", "configured"]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("readers may not change"),
        "{}",
        stderr(&o)
    );
    // The metrics are a read: a reader gets them, a user with no role not.
    let metrics_as = |uid: u32| {
        std::process::Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg("--regid=65534")
            .arg("--groups=65534")
            .arg(&exe)
            .args(["system", "metrics", "--socket"])
            .arg(&sock)
            .env_remove("EDGEWARD_STATE_DIR")
            .output()
            .expect("setpriv (util-linux)")
    };
    let o = metrics_as(65533);
    assert_status(&o, 0);
    assert!(
        stdout(&o).contains(r#"edgeward_module_state{module="configured",state="#),
        "{}",
        stdout(&o)
    );
    let refused_so_far = stdout(&o)
        .lines()
        .find_map(|l| l.strip_prefix("edgeward_management_refusals_total "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap();
    assert!(refused_so_far >= 2, "{}", stdout(&o));
    let o = metrics_as(65534);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("not an operator or reader"),
        "{}",
        stderr(&o)
    );
    let o = as_user(65532, "65534,100", &["stop", "configured"]);
    assert_status(&o, 0);
    wait_state(&s, &sock, "configured", "stopped/stopped");
    let (_, _, err) = d.terminate();
    assert!(
        err.iter()
            .any(|l| l.contains("management request refused") && l.contains("uid=65534")),
        "refusals are logged: {}",
        err.join("\n")
    );
}

/// Bad requests get a 4xx naming the problem, and the daemon stays up.
#[test]
fn malformed_requests_are_refused_by_name() {
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    let d = start(&s, &config_module("configured"), &sock);
    // The sensor: not in the component store until uploaded (the probe is,
    // since the configured module runs it).
    let digest = sha256sum(guests::TEMPERATURE_SENSOR);
    let spec = |extra: &str| format!(r#"{{"name":"m1","digest":"{digest}"{extra}}}"#);
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "POST",
            "/v1/modules".into(),
            b"{not json".to_vec(),
            400,
            "invalid JSON",
        ),
        (
            "POST",
            "/v1/modules".into(),
            spec(r#","bogus":1"#).into_bytes(),
            400,
            "unknown field `bogus`",
        ),
        (
            "POST",
            "/v1/modules".into(),
            spec(r#","file":"/etc/passwd""#).into_bytes(),
            422,
            "does not read host paths",
        ),
        (
            "POST",
            "/v1/modules".into(),
            spec(r#","dirs":["/etc"]"#).into_bytes(),
            422,
            "config file only",
        ),
        (
            "POST",
            "/v1/modules".into(),
            spec(r#","max_memory":"lots""#).into_bytes(),
            422,
            "max_memory",
        ),
        (
            "POST",
            "/v1/modules".into(),
            spec("").into_bytes(),
            422,
            "has not been uploaded",
        ),
        (
            "POST",
            "/v1/modules".into(),
            br#"{"name":"../x","digest":"sha256:00"}"#.to_vec(),
            400,
            "invalid module name",
        ),
        (
            "POST",
            "/v1/modules".into(),
            vec![b' '; 2 << 20],
            413,
            "over 1048576 bytes",
        ),
        (
            "GET",
            "/v1/modules/a%2Fb".into(),
            vec![],
            400,
            "invalid module name",
        ),
        (
            "GET",
            "/v1/modules/..".into(),
            vec![],
            400,
            "invalid module name",
        ),
        ("GET", "/v1/modules/nope".into(), vec![], 404, "no module"),
        (
            "POST",
            "/v1/modules/configured/explode".into(),
            vec![],
            404,
            "no such action",
        ),
        (
            "DELETE",
            "/v1/modules/configured".into(),
            vec![],
            409,
            "config file",
        ),
        (
            "PUT",
            format!("/v1/blobs/{digest}"),
            b"not the component".to_vec(),
            422,
            "hashes to",
        ),
        (
            "PUT",
            "/v1/blobs/sha256:xyz".into(),
            vec![],
            400,
            "invalid digest",
        ),
        (
            "PATCH",
            "/v1/modules".into(),
            vec![],
            405,
            "does not take that method",
        ),
        ("GET", "/v2/anything".into(), vec![], 404, "no such route"),
        (
            "PUT",
            "/v1/deployment".into(),
            br#"{"version":"v1\n2026 INFO forged","modules":[]}"#.to_vec(),
            400,
            "control characters",
        ),
        (
            "PUT",
            "/v1/deployment?dry-run=maybe".into(),
            br#"{"version":"v1"}"#.to_vec(),
            400,
            "invalid query",
        ),
        (
            "GET",
            "/v1/modules/configured/secrets".into(),
            vec![],
            404,
            "no such record",
        ),
        (
            "GET",
            "/v1/modules/configured/logs?tail=x".into(),
            vec![],
            400,
            "invalid query",
        ),
        (
            "GET",
            "/v1/modules/configured/logs?evil=1".into(),
            vec![],
            400,
            "invalid query",
        ),
    ];
    for (method, path, body, want, says) in &cases {
        let (status, text) = http(&sock, method, path, body);
        assert_eq!(status, *want, "{method} {path}: {text}");
        assert!(
            text.contains(says),
            "{method} {path}: {says:?} not in {text}"
        );
        assert!(text.starts_with("{\"error\":"), "{method} {path}: {text}");
    }
    // A body that never finishes arriving is cut off after 5 s.
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "POST /v1/modules HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{{"
    )
    .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    drop(c);
    // A request refused before its body is read (a bad query) is answered
    // at once; what the client still sends after reading the answer is
    // read, not met by a closed socket (which a client or a bridge in
    // between may see as a reset, losing the answer).
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let chunk = vec![b' '; 16 * 1024];
    write!(
        c,
        "PUT /v1/deployment?dry-run=maybe HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        chunk.len() * 16
    )
    .unwrap();
    c.write_all(&chunk).unwrap();
    let mut head = [0u8; 12];
    c.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 400", "{}", String::from_utf8_lossy(&head));
    std::thread::sleep(Duration::from_millis(300));
    for i in 1..16 {
        if let Err(e) = c.write_all(&chunk) {
            panic!("chunk {i} of the refused body after the answer: {e}");
        }
    }
    drop(c);
    // At most 10 connections per uid at once: of 11 idle ones, exactly one
    // (whichever was accepted last) is closed at once; the 10 others stay.
    // A slot the daemon is still giving back (the connection above) can
    // make it two: then the 11 are closed and opened again.
    let closed = |held: &[std::os::unix::net::UnixStream]| {
        held.iter()
            .filter(|c| {
                let mut r: &std::os::unix::net::UnixStream = c;
                matches!(r.read(&mut [0u8; 1]), Ok(0))
            })
            .count()
    };
    let mut attempts = 0;
    let held = loop {
        attempts += 1;
        let held: Vec<_> = (0..11)
            .map(|_| {
                let c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
                c.set_nonblocking(true).unwrap();
                c
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while closed(&held) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no connection was refused"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let n = closed(&held);
        if n == 1 || attempts == 20 {
            assert_eq!(n, 1, "one of 11 refused, 10 held ({attempts} attempts)");
            break held;
        }
        drop(held);
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http(&sock, "GET", "/v1/health", b"").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "slots were not given back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The upload of the real component, then the module, work.
    let bytes = std::fs::read(guests::TEMPERATURE_SENSOR).unwrap();
    assert_eq!(
        http(&sock, "PUT", &format!("/v1/blobs/{digest}"), &bytes).0,
        201
    );
    assert_eq!(
        http(&sock, "PUT", &format!("/v1/blobs/{digest}"), &bytes).0,
        200
    );
    let (status, text) = http(&sock, "POST", "/v1/modules", spec("").as_bytes());
    assert_eq!(status, 201, "{text}");
    // The OpenAPI document served is the one checked in.
    let (status, doc) = http(&sock, "GET", "/v1/openapi.json", b"");
    assert_eq!(status, 200);
    let checked_in =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json"))
            .unwrap();
    assert_eq!(doc, checked_in);
    let (status, text) = http(&sock, "GET", "/v1/system/info", b"");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["hsm_backend"], "soft");
    assert_eq!(v["modules"]["registered"], 2);
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{}", err.join("\n"));
}

/// Held connections are bounded per uid and, for every uid but root and
/// the daemon's own, together: seven uids of the socket's group holding ten
/// each (a user namespace's range would give one member thousands of uids)
/// get 64 between them, and root still gets in.
#[test]
fn many_uids_together_cannot_take_every_connection() {
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    let config = format!(
        "[api]\ngroup = \"65534\"\n\n{}",
        config_module("configured")
    );
    let d = start(&s, &config, &sock);
    // Each opens ten connections, says how many are still open a moment
    // later (the refused ones are closed by the daemon at once), and holds
    // them until killed.
    let script = r#"
import socket, sys, time
cs = []
for _ in range(10):
    c = socket.socket(socket.AF_UNIX)
    c.connect(sys.argv[1])
    cs.append(c)
time.sleep(1.5)
alive = 0
for c in cs:
    c.setblocking(False)
    try:
        alive += 0 if c.recv(1) == b'' else 1
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print(alive, flush=True)
time.sleep(60)
"#;
    let mut holders: Vec<std::process::Child> = (0..7)
        .map(|i| {
            std::process::Command::new("setpriv")
                .arg(format!("--reuid={}", 64900 + i))
                .args([
                    "--regid=65534",
                    "--groups=65534",
                    "/usr/bin/python3",
                    "-c",
                    script,
                ])
                .arg(&sock)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("setpriv and python3")
        })
        .collect();
    let mut alive = 0;
    for h in &mut holders {
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(h.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        alive += line
            .trim()
            .parse::<usize>()
            .unwrap_or_else(|_| panic!("{line:?}"));
    }
    // Root is not counted among them.
    assert_eq!(http(&sock, "GET", "/v1/health", b"").0, 200);
    for h in &mut holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    assert_eq!(alive, 64, "connections held by seven uids together");
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{}", err.join("\n"));
    assert!(
        err.iter()
            .any(|l| l.contains("64 already open for uids other than root")),
        "{}",
        err.join("\n")
    );
}

/// `path` with a custom section appended: the same program under another
/// digest (a new version, as far as measurement goes).
fn variant(s: &Scratch, path: &str, name: &str) -> String {
    let mut bytes = std::fs::read(path).unwrap();
    bytes.extend_from_slice(&[0x00, 0x05, 0x04, b'e', b'd', b'g', b'e']);
    let out = s.path().join(name);
    std::fs::write(&out, bytes).unwrap();
    out.to_str().unwrap().to_owned()
}

/// An update switches to the new digest with the module's registration and
/// data kept (it opens what it sealed before); an update that is refused
/// (not a component) leaves the running version running.
#[test]
fn updates_keep_the_registration_and_refused_ones_keep_the_old_version() {
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    let d = start(&s, "", &sock);
    let id_probe = guests::IDENTITY_PROBE;
    assert_status(
        &module(
            &s,
            &sock,
            &[
                "add",
                "vault",
                id_probe,
                "--arg",
                "vault",
                "--restart",
                "never",
            ],
        ),
        0,
    );
    // Its output and exits, through the API.
    let log = |name: &str| stdout(&module(&s, &sock, &["logs", name]));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !log("vault").contains("vault-seal ok") {
        assert!(
            std::time::Instant::now() < deadline,
            "no seal: {}",
            log("vault")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sealed = log("vault")
        .lines()
        .find_map(|l| l.split("vault-seal ok ").nth(1).map(str::to_owned))
        .unwrap();
    let v2 = variant(&s, id_probe, "vault-v2.wasm");
    let o = module(&s, &sock, &["update", "vault", &v2]);
    assert_status(&o, 0);
    let new_digest = sha256sum(&v2);
    assert!(stdout(&o).contains(&new_digest), "{}", stdout(&o));
    while !log("vault").contains("vault-open") {
        assert!(
            std::time::Instant::now() < deadline,
            "no open: {}",
            log("vault")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        log("vault").contains(&format!("vault-open ok {sealed}")),
        "{}",
        log("vault")
    );
    let show = module(&s, &sock, &["show", "vault"]);
    assert!(stdout(&show).contains(&new_digest), "{}", stdout(&show));
    let last = stdout(&module(&s, &sock, &["logs", "vault", "--tail", "1"]));
    assert_eq!(last.lines().count(), 1, "{last}");
    let exits = stdout(&module(&s, &sock, &["exits", "vault"]));
    let exits: Vec<serde_json::Value> = exits
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        !exits.is_empty() && exits.iter().all(|e| e["outcome"] == "success"),
        "{exits:?}"
    );
    // Identities: names and generations, never a key.
    let (status, ids) = http(&sock, "GET", "/v1/identities", b"");
    assert_eq!(status, 200);
    assert!(
        ids.contains("\"name\":\"vault\"") && ids.contains("generation_id"),
        "{ids}"
    );
    assert!(!ids.contains("wrapped_key"), "{ids}");

    // A running module, then an update to bytes that are not a component.
    assert_status(
        &module(&s, &sock, &["add", "ticker", PROBE, "--arg", "tick"]),
        0,
    );
    let junk = s.write("junk.wasm", "not a component");
    let o = module(&s, &sock, &["update", "ticker", junk.to_str().unwrap()]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("update refused"), "{}", stderr(&o));
    wait_state(&s, &sock, "ticker", "running/running");
    let show = module(&s, &sock, &["show", "ticker"]);
    assert!(
        stdout(&show).contains(&sha256sum(PROBE)),
        "{}",
        stdout(&show)
    );
    let _ = d.terminate();
    // The next start deletes components no module names any more (the
    // vault's first version, the junk), and keeps the rest.
    let stored = |d: &str| {
        s.state()
            .join("components")
            .join(format!("{}.wasm", d.replace(':', "-")))
            .exists()
    };
    assert!(stored(&sha256sum(id_probe)));
    let d = start(&s, "", &sock);
    assert!(!stored(&sha256sum(id_probe)), "the old version was kept");
    assert!(
        !stored(&sha256sum(junk.to_str().unwrap())),
        "the junk was kept"
    );
    assert!(stored(&new_digest) && stored(&sha256sum(PROBE)));
    let _ = d.terminate();
}

/// A module added through the API never inherits what an earlier module
/// of its name left: its identity registration (which opens that one's
/// sealed data) or its files.
#[test]
fn a_new_module_never_inherits_an_old_ones_registration_or_files() {
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    let old = format!(
        "[[module]]\nname = \"old\"\nfile = \"{PROBE}\"\ndigest = \"{}\"\nargs = [\"write\", \"/data/note\", \"plain text\"]\nrestart = \"never\"\n",
        sha256sum(PROBE)
    );
    let mut d = start(&s, &old, &sock);
    d.wait_for("old to write", |out, _| {
        out.iter().any(|l| l.starts_with("old | ok: write"))
    });
    let _ = d.terminate();
    // Dropped from the config: its registration and files are kept.
    let d = start(&s, "", &sock);
    let add = |s: &Scratch| module(s, &sock, &["add", "old", PROBE, "--arg", "tick"]);
    let o = add(&s);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("identity registration named \"old\""),
        "{}",
        stderr(&o)
    );
    let _ = d.terminate();
    assert_status(
        &s.edgeward().args(["deregister", "old"]).output().unwrap(),
        0,
    );
    let d = start(&s, "", &sock);
    let o = add(&s);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("holds files an earlier module"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(s.state().join("modules/old/data")).unwrap();
    assert_status(&add(&s), 0);
    wait_state(&s, &sock, "old", "running/running");
    // An add that is refused (not a component) leaves nothing behind.
    let junk = s.write("junk.wasm", "not a component");
    let o = module(&s, &sock, &["add", "junky", junk.to_str().unwrap()]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));
    assert_eq!(state_in_list(&s, &sock, "junky"), "absent");
    assert!(!s.state().join("modules/junky").exists());
    let _ = d.terminate();
    let registry = edgeward::registry::Registry::open(&s.state()).unwrap();
    assert!(registry.registration("junky").unwrap().is_none());
}

/// A deployment manifest reconciles the operator's modules: added, updated,
/// removed to match; a dry run only plans; names the config owns are
/// refused, naming them; the last one applied is kept.
#[test]
fn deployments_reconcile_the_operators_modules() {
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    let d = start(&s, &config_module("configured"), &sock);
    let manifest = |version: &str, modules: &[(&str, &str)]| {
        let mut m = format!("version = \"{version}\"\n");
        for (name, file) in modules {
            m.push_str(&format!(
                "[[module]]\nname = \"{name}\"\nfile = \"{file}\"\nargs = [\"tick\"]\n"
            ));
        }
        s.write(&format!("deploy-{version}.toml"), &m)
    };
    let deploy = |path: &Path, dry: bool| {
        let mut c = s.edgeward();
        c.arg("deploy").arg(path).arg("--socket").arg(&sock);
        if dry {
            c.arg("--dry-run");
        }
        c.output().unwrap()
    };
    let v1 = manifest("v1", &[("a", PROBE), ("b", PROBE)]);
    let o = deploy(&v1, true);
    assert_status(&o, 0);
    assert!(
        stdout(&o).contains("(dry run): add [a, b]"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        state_in_list(&s, &sock, "a"),
        "absent",
        "a dry run changes nothing"
    );
    let o = deploy(&v1, false);
    assert_status(&o, 0);
    assert!(stdout(&o).contains("add [a, b]"), "{}", stdout(&o));
    wait_state(&s, &sock, "a", "running/running");
    // v2: a gets another component, b goes, c comes.
    let v2 = variant(&s, PROBE, "probe-v2.wasm");
    let v2m = manifest("v2", &[("a", &v2), ("c", PROBE)]);
    let o = deploy(&v2m, false);
    assert_status(&o, 0);
    assert!(
        stdout(&o).contains("add [c], update [a], remove [b], unchanged []"),
        "{}",
        stdout(&o)
    );
    assert_eq!(state_in_list(&s, &sock, "b"), "absent");
    let show = module(&s, &sock, &["show", "a"]);
    assert!(stdout(&show).contains(&sha256sum(&v2)), "{}", stdout(&show));
    // The same again changes nothing.
    let o = deploy(&v2m, false);
    assert!(stdout(&o).contains("unchanged [a, c]"), "{}", stdout(&o));
    // The config's module cannot be claimed.
    let o = deploy(&manifest("v3", &[("configured", PROBE)]), false);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("another origin owns: configured"),
        "{}",
        stderr(&o)
    );
    let shown = s
        .edgeward()
        .args(["deployment", "show", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_status(&shown, 0);
    assert!(
        stdout(&shown).contains("\"version\": \"v2\""),
        "{}",
        stdout(&shown)
    );
    let plan = s
        .edgeward()
        .args(["deployment", "plan", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_status(&plan, 0);
    // Stopping a module makes it drift from nothing: stopped is wanted.
    assert_status(&module(&s, &sock, &["stop", "c"]), 0);
    let (status, drift) = http(&sock, "GET", "/v1/deployment/plan", b"");
    assert_eq!(status, 200);
    assert!(!drift.contains("\"c\""), "{drift}");
    // Duplicate names and bad specs in a deployment are refused whole.
    let (status, text) = http(
        &sock,
        "PUT",
        "/v1/deployment",
        format!(
            r#"{{"version":"x","modules":[{{"name":"z","digest":"{0}"}},{{"name":"z","digest":"{0}"}}]}}"#,
            sha256sum(PROBE)
        )
        .as_bytes(),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("appears twice"), "{text}");
    let _ = d.terminate();
}

/// Events: the recent ones as JSON lines, and a follower that sees a new
/// module start as it happens and is let go when the daemon stops.
#[test]
fn events_are_listed_and_followed() {
    use std::io::BufRead;
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    let mut d = start(&s, &config_module("configured"), &sock);
    d.wait_for("configured to run", |_, err| {
        err.iter().any(|l| l.contains("module measured and loaded"))
    });
    // The module's task records "running" a moment after the log line.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = http(&sock, "GET", "/v1/events", b"");
        assert_eq!(status, 200);
        let events: Vec<serde_json::Value> = text
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if events
            .iter()
            .any(|e| e["module"] == "configured" && e["kind"] == "state" && e["state"] == "running")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut follower = s
        .edgeward()
        .args(["events", "-f", "--socket"])
        .arg(&sock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_status(
        &module(&s, &sock, &["add", "late", PROBE, "--arg", "tick"]),
        0,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let l = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the follower saw the new module start");
        if l.contains("\"module\":\"late\"") && l.contains("\"state\":\"running\"") {
            break;
        }
    }
    let t = std::time::Instant::now();
    let (status, _, _) = d.terminate();
    assert!(status.success());
    let ended = follower.wait().unwrap();
    assert!(ended.success(), "{ended}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the follower held the daemon's stop"
    );
}

/// Logs: `since` and `until` select by time, `follow` streams what the
/// module writes next; bad times are refused by name.
#[test]
fn logs_can_be_selected_by_time_and_followed() {
    use std::io::BufRead;
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    // The sensor prints a reading every 100 ms.
    let config = format!(
        "[[module]]\nname = \"sensor\"\nfile = \"{}\"\ndigest = \"{}\"\nenv = {{ INTERVAL_MS = \"100\" }}\n",
        guests::TEMPERATURE_SENSOR,
        sha256sum(guests::TEMPERATURE_SENSOR)
    );
    let d = start(&s, &config, &sock);
    // At least 5 readings (the first start compiles the sensor).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let all = loop {
        let all = stdout(&module(&s, &sock, &["logs", "sensor"]));
        if all.lines().count() >= 5 {
            break all;
        }
        assert!(std::time::Instant::now() < deadline, "few readings: {all}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let lines: Vec<&str> = all.lines().collect();
    assert!(lines.len() >= 5, "{all}");
    let mid = lines[lines.len() / 2].split_whitespace().next().unwrap();
    let since = stdout(&module(&s, &sock, &["logs", "sensor", "--since", mid]));
    let until = stdout(&module(&s, &sock, &["logs", "sensor", "--until", mid]));
    assert!(
        since.lines().all(|l| l >= mid) && since.lines().count() >= 1,
        "{since}"
    );
    assert!(
        until.lines().all(|l| l < mid) && until.lines().count() >= 1,
        "{until}"
    );
    assert!(
        since.lines().count() + until.lines().count() >= lines.len(),
        "the two halves cover the log"
    );
    // Without times, each line is what the module wrote (stream first).
    let bare = stdout(&module(
        &s,
        &sock,
        &["logs", "sensor", "--tail", "2", "--no-timestamps"],
    ));
    assert_eq!(bare.lines().count(), 2, "{bare}");
    assert!(
        bare.lines()
            .all(|l| l.starts_with("out ") && l.contains("\"sensor\"")),
        "{bare}"
    );
    let o = module(&s, &sock, &["logs", "sensor", "--since", "yesterday"]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("since: not an RFC 3339 time"),
        "{}",
        stderr(&o)
    );
    // Following: lines written after the request arrive on it.
    let mut follower = s
        .edgeward()
        .args(["module", "--socket"])
        .arg(&sock)
        .args(["logs", "sensor", "--tail", "0", "-f"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(follower.stdout.take().unwrap());
    let seen: Vec<String> = out.lines().take(3).map(|l| l.unwrap()).collect();
    assert!(seen.iter().all(|l| l.contains("\"sensor\"")), "{seen:?}");
    let last_before = lines.last().unwrap().split_whitespace().next().unwrap();
    assert!(
        seen.iter().all(|l| l.as_str() > last_before),
        "followed lines are new ones: {seen:?} after {last_before}"
    );
    let _ = d.terminate();
    assert!(follower.wait().unwrap().success());
}

fn exits_of(s: &Scratch, sock: &Path, name: &str) -> usize {
    let o = module(s, sock, &["exits", name]);
    assert_status(&o, 0);
    stdout(&o)
        .lines()
        .filter(|l| l.contains("\"start\""))
        .count()
}

fn wait_exits(s: &Scratch, sock: &Path, name: &str, n: usize, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while exits_of(s, sock, name) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: fewer than {n} exits within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `reset` clears the backoff (a module waiting 4 s to start again starts
/// at once, and waits 1 s after its next failure), starts again a module
/// its policy had let exit, and leaves a stopped one stopped. The daemon
/// says who it is through `system info`, and how far it is with its
/// deployment through `deployment status`.
#[test]
fn reset_clears_backoff_and_the_daemon_reports_itself() {
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    let d = start(&s, "", &sock);
    let failing = s.command_component(
        "fail.wasm",
        r#"(func (export "run") (result i32) i32.const 1)"#,
    );
    assert_status(
        &module(
            &s,
            &sock,
            &["add", "flaky", &failing, "--restart", "always"],
        ),
        0,
    );
    assert_status(
        &module(&s, &sock, &["add", "once", &failing, "--restart", "never"]),
        0,
    );
    // flaky's backoff: 1 s, 2 s, then 4 s after its third exit.
    wait_exits(&s, &sock, "flaky", 3, Duration::from_secs(20));
    let t = std::time::Instant::now();
    assert_status(&module(&s, &sock, &["reset", "flaky"]), 0);
    wait_exits(&s, &sock, "flaky", 4, Duration::from_secs(20));
    let fourth = t.elapsed();
    wait_exits(&s, &sock, "flaky", 5, Duration::from_secs(20));
    let fifth = t.elapsed();
    assert!(
        fourth < Duration::from_millis(2500),
        "reset did not end the 4 s wait: {fourth:?}"
    );
    assert!(
        fifth - fourth < Duration::from_millis(2500),
        "the backoff was not cleared: {:?} before the fifth start",
        fifth - fourth
    );
    // once exited by its policy: reset starts it again.
    wait_state(&s, &sock, "once", "exited/running");
    assert_eq!(exits_of(&s, &sock, "once"), 1);
    assert_status(&module(&s, &sock, &["reset", "once"]), 0);
    wait_exits(&s, &sock, "once", 2, Duration::from_secs(10));
    // A stopped module stays stopped.
    assert_status(&module(&s, &sock, &["stop", "flaky"]), 0);
    let before = exits_of(&s, &sock, "flaky");
    assert_status(&module(&s, &sock, &["reset", "flaky"]), 0);
    wait_state(&s, &sock, "flaky", "stopped/stopped");
    assert_eq!(exits_of(&s, &sock, "flaky"), before);
    let o = module(&s, &sock, &["reset", "nobody"]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("no module \"nobody\""),
        "{}",
        stderr(&o)
    );

    // system info, for people and scripts.
    let o = s
        .edgeward()
        .args(["system", "info", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_status(&o, 0);
    assert!(stdout(&o).contains("2 registered"), "{}", stdout(&o));
    let o = s
        .edgeward()
        .args(["system", "info", "--json", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_status(&o, 0);
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(info["hsm_backend"], "soft");
    assert!(
        info["runtime_platform_version"]
            .as_str()
            .unwrap()
            .starts_with("wasmtime 48.")
    );
    // Deployment status: no deployment applied; flaky stopped as wanted,
    // once exited though it should run: not converged.
    let status = |s: &Scratch| {
        let o = s
            .edgeward()
            .args(["deployment", "status", "--socket"])
            .arg(&sock)
            .output()
            .unwrap();
        assert_status(&o, 0);
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()
    };
    let v = status(&s);
    assert_eq!(v["version"], serde_json::Value::Null);
    assert_eq!(v["converged"], false, "{v:#}");
    assert_eq!(v["origins"]["operator"], 2, "{v:#}");
    assert_status(&module(&s, &sock, &["stop", "once"]), 0);
    assert_eq!(status(&s)["converged"], true);
    let _ = d.terminate();
}

/// Each module reads its own settings (wasi:config/store) and no other's;
/// a spec with bad settings is refused by name.
#[test]
fn each_module_reads_only_its_own_settings() {
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    let d = start(&s, "", &sock);
    let sensor = guests::TEMPERATURE_SENSOR;
    for (name, id) in [("left", "sensor-left"), ("right", "sensor-right")] {
        let setting = format!("sensor_id={id}");
        let o = module(
            &s,
            &sock,
            &[
                "add",
                name,
                sensor,
                "--setting",
                &setting,
                "--setting",
                "interval_ms=50",
            ],
        );
        assert_status(&o, 0);
    }
    let show = module(&s, &sock, &["show", "left"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&show)).unwrap();
    assert_eq!(v["spec"]["settings"]["sensor_id"], "sensor-left");
    for (name, id, other) in [
        ("left", "sensor-left", "sensor-right"),
        ("right", "sensor-right", "sensor-left"),
    ] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let log = loop {
            let log = stdout(&module(&s, &sock, &["logs", name]));
            if log.lines().count() >= 3 {
                break log;
            }
            assert!(std::time::Instant::now() < deadline, "{name}: {log}");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            log.lines()
                .all(|l| l.contains(&format!("\"sensor\":\"{id}\"")) && !l.contains(other)),
            "{name}: {log}"
        );
    }
    let digest = sha256sum(sensor);
    let body = format!(r#"{{"name":"bad","digest":"{digest}","settings":{{"":"x"}}}}"#);
    let (status, text) = http(&sock, "POST", "/v1/modules", body.as_bytes());
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("settings: invalid key"), "{text}");
    let body = format!(r#"{{"name":"bad","digest":"{digest}","settings":{{"k":1}}}}"#);
    let (status, text) = http(&sock, "POST", "/v1/modules", body.as_bytes());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("expected a string"), "{text}");
    let _ = d.terminate();
}

/// On PKCS#11, removing a module through the API destroys its
/// registration's token key (and a daemon start keeps a live one).
#[test]
fn removal_on_pkcs11_destroys_the_token_key() {
    use edgeward::hsm::Hsm as _;
    let s = Scratch::new();
    let (_home, sock) = socket_home();
    let token = edgeward_tests::fixtures::SoftHsmToken::new();
    let config = token.hsm_toml();
    let registration_keys = || -> Vec<String> {
        let hsm = edgeward_hsm_hw::pkcs11::Pkcs11Hsm::open(token.config()).unwrap();
        hsm.keys()
            .unwrap()
            .into_iter()
            .map(|k| k.id)
            .filter(|k| k.starts_with("registration-"))
            .collect()
    };
    let d = start(&s, &config, &sock);
    assert_status(&module(&s, &sock, &["add", "m", PROBE, "--arg", "tick"]), 0);
    wait_state(&s, &sock, "m", "running/running");
    let _ = d.terminate();
    let keys = registration_keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let d = start(&s, &config, &sock);
    wait_state(&s, &sock, "m", "running/running");
    assert_status(&module(&s, &sock, &["remove", "m"]), 0);
    let _ = d.terminate();
    assert_eq!(registration_keys(), Vec::<String>::new());
}
