//! `edgeward run`: the measured path and the sandbox, through the binary.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::net::TcpListener;

const PROBE: &str = guests::SANDBOX_PROBE;

#[test]
fn runs_a_module_and_passes_output_through() {
    let s = Scratch::new();
    let o = s.run(PROBE, &[], &["hello"]);
    assert_status(&o, 0);
    assert_eq!(stdout(&o), "hello from sandbox-probe\n");
    assert!(stderr(&o).contains("to stderr"), "{}", stderr(&o));
}

#[test]
fn version_is_the_runtime_version() {
    let s = Scratch::new();
    let o = s.edgeward().arg("--version").output().expect("spawn");
    assert_status(&o, 0);
    assert_eq!(stdout(&o).trim(), format!("edgeward {}", edgeward::VERSION));
}

#[test]
fn module_failure_is_the_exit_status() {
    let s = Scratch::new();
    let o = s.run(PROBE, &[], &["exit", "7"]);
    // WASI 0.2 carries only success or failure out of a guest.
    assert_status(&o, 1);
    let o = s.run(PROBE, &[], &["read", "/nowhere"]);
    assert_status(&o, 1);
    assert!(stdout(&o).starts_with("denied: read"), "{}", stdout(&o));
}

#[test]
fn a_panic_is_reported_as_a_trap() {
    let s = Scratch::new();
    let o = s.run(PROBE, &[], &["panic"]);
    assert_status(&o, 134);
    let err = stderr(&o);
    assert!(err.contains("sandbox-probe was asked to panic"), "{err}");
    assert!(err.contains("trapped"), "{err}");
    assert!(err.contains("unreachable"), "the trap is named: {err}");
    assert!(
        err.contains("wasm backtrace") && err.contains("sandbox_probe::main"),
        "{err}"
    );
}

#[test]
fn pinned_digest_is_accepted_when_it_matches() {
    let s = Scratch::new();
    let digest = sha256sum(PROBE);
    let o = s.run(PROBE, &["--digest", &digest], &["hello"]);
    assert_status(&o, 0);
    let o = s
        .edgeward()
        .arg("digest")
        .arg(PROBE)
        .output()
        .expect("spawn");
    assert_status(&o, 0);
    assert!(stdout(&o).starts_with(&digest), "{}", stdout(&o));
}

#[test]
fn wrong_digest_is_refused_before_guest_code_runs() {
    let s = Scratch::new();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let o = s.run(PROBE, &["--digest", &wrong], &["hello"]);
    assert_status(&o, 3);
    assert!(stdout(&o).is_empty(), "guest code ran: {}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains(&wrong), "expected digest named: {err}");
    assert!(
        err.contains(&sha256sum(PROBE)),
        "measured digest named: {err}"
    );
    // Refused before compiling: nothing was cached.
    let cached = std::fs::read_dir(s.state().join("cache"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(cached, 0, "a refused component was compiled and cached");
}

#[test]
fn a_flipped_byte_is_refused() {
    let s = Scratch::new();
    let digest = sha256sum(PROBE);
    let mut bytes = std::fs::read(PROBE).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let tampered = s.path().join("tampered.wasm");
    std::fs::write(&tampered, &bytes).expect("write");
    let o = s.run(
        tampered.to_str().expect("utf8"),
        &["--digest", &digest],
        &["hello"],
    );
    assert_status(&o, 3);
    assert!(stdout(&o).is_empty());
    assert!(
        stderr(&o).contains("does not match the pinned digest"),
        "{}",
        stderr(&o)
    );
}

fn cache_entries(s: &Scratch) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(s.state().join("cache"))
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect()
}

#[test]
fn tampered_cache_entries_are_never_loaded() {
    let s = Scratch::new();
    assert_status(&s.run(PROBE, &[], &["hello"]), 0);
    let entries = cache_entries(&s);
    assert_eq!(entries.len(), 1, "one entry after the first run");
    let entry = &entries[0];
    let good = std::fs::read(entry).expect("read entry");

    // A second run loads the entry silently.
    let o = s.run(PROBE, &[], &["hello"]);
    assert_status(&o, 0);
    assert!(!stderr(&o).contains("refusing"), "{}", stderr(&o));

    let flip_code = |b: &mut Vec<u8>| {
        let i = b.len() / 2;
        b[i] ^= 0x80;
    };
    let truncate = |b: &mut Vec<u8>| b.truncate(b.len() - 100);
    let bad_header = |b: &mut Vec<u8>| b[0] ^= 0xff;
    let forge_mac = |b: &mut Vec<u8>| b[12] ^= 0x01;
    type Tamper<'a> = &'a dyn Fn(&mut Vec<u8>);
    let cases: [(&str, Tamper); 4] = [
        ("flipped byte in code", &flip_code),
        ("truncated", &truncate),
        ("bad header", &bad_header),
        ("forged mac", &forge_mac),
    ];
    for (what, tamper) in cases {
        let mut bytes = good.clone();
        tamper(&mut bytes);
        std::fs::write(entry, &bytes).expect("tamper");
        let o = s.run(PROBE, &[], &["hello"]);
        assert_status(&o, 0);
        assert_eq!(stdout(&o), "hello from sandbox-probe\n", "{what}");
        assert!(
            stderr(&o).contains("refusing compiled-artifact cache entry"),
            "{what}: not reported: {}",
            stderr(&o)
        );
        // Recompiled and rewritten: authentic again.
        let again = s.run(PROBE, &[], &["hello"]);
        assert_status(&again, 0);
        assert!(
            !stderr(&again).contains("refusing"),
            "{what}: {}",
            stderr(&again)
        );
    }

    // A valid entry from another host (another state dir, another key).
    let other = Scratch::new();
    assert_status(&other.run(PROBE, &[], &["hello"]), 0);
    let foreign = std::fs::read(&cache_entries(&other)[0]).expect("read");
    std::fs::write(entry, foreign).expect("plant");
    let o = s.run(PROBE, &[], &["hello"]);
    assert_status(&o, 0);
    assert!(
        stderr(&o).contains("authentication failed"),
        "foreign: {}",
        stderr(&o)
    );
}

#[test]
fn state_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    assert_status(&s.run(PROBE, &[], &["hello"]), 0);
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&s.state()), 0o700);
    assert_eq!(mode(&s.state().join("cache")), 0o700);
    assert_eq!(mode(&s.state().join("cache.key")), 0o600);
    assert_eq!(mode(&cache_entries(&s)[0]), 0o600);
}

/// A sandbox dir with a file inside, and a secret beside it.
fn sandbox_dirs(s: &Scratch) -> (String, String) {
    let inside = s.path().join("box");
    std::fs::create_dir(&inside).expect("mkdir");
    std::fs::write(inside.join("inside.txt"), "inside").expect("write");
    let secret = s.path().join("secret.txt");
    std::fs::write(&secret, "secret").expect("write");
    (
        inside.to_str().expect("utf8").to_owned(),
        secret.to_str().expect("utf8").to_owned(),
    )
}

#[test]
fn only_preopened_directories_are_visible() {
    let s = Scratch::new();
    let (inside, secret) = sandbox_dirs(&s);
    let grant = format!("{inside}::/box");

    // Positive control: the grant works.
    let o = s.run(PROBE, &["--dir", &grant], &["read", "/box/inside.txt"]);
    assert_status(&o, 0);
    assert!(stdout(&o).contains("\"inside\""), "{}", stdout(&o));
    let o = s.run(
        PROBE,
        &["--dir", &grant],
        &["write", "/box/new.txt", "written"],
    );
    assert_status(&o, 0);
    assert_eq!(
        std::fs::read_to_string(format!("{inside}/new.txt")).expect("read"),
        "written"
    );

    // Escapes.
    for path in [
        "/box/../secret.txt",
        "/box/../../../../etc/passwd",
        &secret,
        "/etc/passwd",
        "secret.txt",
    ] {
        let o = s.run(PROBE, &["--dir", &grant], &["read", path]);
        assert_status(&o, 1);
        assert!(
            stdout(&o).starts_with("denied: read"),
            "{path}: {}",
            stdout(&o)
        );
    }
    // Symlinks the module plants in its own dir.
    for (target, link) in [
        (secret.as_str(), "/box/abs-link"),
        ("../secret.txt", "/box/rel-link"),
    ] {
        let o = s.run(PROBE, &["--dir", &grant], &["symlink-read", target, link]);
        assert_status(&o, 1);
        assert!(
            !stdout(&o).contains("\"secret\""),
            "escaped via symlink {target}: {}",
            stdout(&o)
        );
    }
    // No grant, nothing visible.
    let o = s.run(PROBE, &[], &["list", "/"]);
    assert_status(&o, 1);
}

#[test]
fn no_network_at_all() {
    let s = Scratch::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr").to_string();

    let o = s.run(PROBE, &[], &["connect", &addr]);
    assert_status(&o, 1);
    assert!(stdout(&o).starts_with("denied: connect"), "{}", stdout(&o));
    assert!(
        listener.accept().is_err(),
        "the module reached the listener"
    );

    for (action, arg) in [
        ("bind", "127.0.0.1:0"),
        ("udp", addr.as_str()),
        ("lookup", "localhost"),
    ] {
        let o = s.run(PROBE, &[], &[action, arg]);
        assert_status(&o, 1);
        assert!(
            stdout(&o).starts_with(&format!("denied: {action}")),
            "{action}: {}",
            stdout(&o)
        );
    }
}

#[test]
fn only_declared_environment_and_no_stdin() {
    let s = Scratch::new();
    let o = s
        .edgeward()
        .env("EDGEWARD_TEST_PASSTHROUGH", "yes")
        .env("EDGEWARD_TEST_HIDDEN", "no")
        .args([
            "run",
            "--env",
            "A=1",
            "--env",
            "EDGEWARD_TEST_PASSTHROUGH",
            PROBE,
            "--",
            "env",
        ])
        .output()
        .expect("spawn");
    assert_status(&o, 0);
    let mut lines: Vec<_> = stdout(&o).lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(lines, ["A=1", "EDGEWARD_TEST_PASSTHROUGH=yes"]);

    let o = s.run(PROBE, &[], &["args", "x", "--y"]);
    assert_status(&o, 0);
    assert_eq!(stdout(&o).trim(), r#"args: ["args", "x", "--y"]"#);

    let o = s.run(PROBE, &[], &["stdin"]);
    assert_status(&o, 0);
    assert_eq!(stdout(&o).trim(), r#"ok: stdin: """#);
}

#[test]
fn deadline_stops_a_spinning_module() {
    let s = Scratch::new();
    let t = std::time::Instant::now();
    let o = s.run(PROBE, &["--timeout", "300ms"], &["spin"]);
    assert_status(&o, 124);
    assert!(stderr(&o).contains("deadline"), "{}", stderr(&o));
    assert!(t.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn memory_limit_is_enforced_and_named() {
    let s = Scratch::new();
    let o = s.run(PROBE, &["--max-memory", "16MiB"], &["alloc", "64"]);
    assert_status(&o, 134);
    assert!(stderr(&o).contains("memory limit"), "{}", stderr(&o));
    let o = s.run(PROBE, &["--max-memory", "16MiB"], &["alloc", "4"]);
    assert_status(&o, 0);
}

#[test]
fn bad_flags_and_files_get_clear_errors() {
    let s = Scratch::new();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["run"], 2, "FILE"),
        (&["run", "--max-memory", "lots", PROBE], 2, "invalid size"),
        (&["run", "--max-memory", "1KiB", PROBE], 2, "--max-memory"),
        (&["run", "--timeout", "soon", PROBE], 2, "invalid duration"),
        (&["run", "--digest", "md5:abc", PROBE], 2, "invalid digest"),
        (&["run", "--dir", "::x", PROBE], 2, "HOST::GUEST"),
        (&["run", "--env", "=x", PROBE], 2, "--env"),
        (
            &["run", "--env", "EDGEWARD_SURELY_UNSET", PROBE],
            2,
            "not set",
        ),
        (&["run", "/no/such/file.wasm"], 3, "/no/such/file.wasm"),
        (&["run", "/tmp"], 3, "not a regular file"),
        (
            &["run", "--dir", "/no/such/dir::/x", PROBE],
            3,
            "/no/such/dir",
        ),
        (&["frobnicate"], 2, "frobnicate"),
    ];
    for (args, code, needle) in cases {
        let o = s.edgeward().args(*args).output().expect("spawn");
        assert_status(&o, *code);
        assert!(
            stderr(&o).contains(needle),
            "{args:?}: {needle:?} not in {}",
            stderr(&o)
        );
    }

    let junk = s.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm at all").expect("write");
    let o = s.run(junk.to_str().expect("utf8"), &[], &[]);
    assert_status(&o, 3);
    assert!(
        stderr(&o).contains("is not a valid WebAssembly component"),
        "{}",
        stderr(&o)
    );

    // A core module, not a component.
    let core = s.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let o = s.run(core.to_str().expect("utf8"), &[], &[]);
    assert_status(&o, 3);
    assert!(
        stderr(&o).contains("is not a valid WebAssembly component"),
        "{}",
        stderr(&o)
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let unreadable = s.path().join("unreadable.wasm");
        std::fs::copy(PROBE, &unreadable).expect("copy");
        std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o000))
            .expect("chmod");
        // root reads anything; the check only means something for others.
        if std::fs::read(&unreadable).is_err() {
            let o = s.run(unreadable.to_str().expect("utf8"), &[], &[]);
            assert_status(&o, 3);
            assert!(stderr(&o).contains("unreadable.wasm"), "{}", stderr(&o));
        }
    }
}

#[test]
fn temperature_sensor_reports_readings() {
    let s = Scratch::new();
    let o = s.run(
        guests::TEMPERATURE_SENSOR,
        &[
            "--env",
            "COUNT=3",
            "--env",
            "INTERVAL_MS=5",
            "--env",
            "SENSOR_ID=t1",
        ],
        &[],
    );
    assert_status(&o, 0);
    let out = stdout(&o);
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (i, l) in lines.iter().enumerate() {
        assert!(
            l.starts_with(&format!("{{\"sensor\":\"t1\",\"seq\":{}", i + 1)),
            "{l}"
        );
        assert!(l.contains("\"celsius\":"), "{l}");
    }
    let o = s.run(
        guests::TEMPERATURE_SENSOR,
        &["--env", "INTERVAL_MS=fast"],
        &[],
    );
    assert_status(&o, 1);
    assert!(stderr(&o).contains("INTERVAL_MS"), "{}", stderr(&o));
}

/// Settings reach the module through wasi:config/store, ahead of the
/// environment; bad ones are refused by name before anything runs.
#[test]
fn settings_reach_the_module_through_wasi_config() {
    let s = Scratch::new();
    let o = s.run(
        guests::TEMPERATURE_SENSOR,
        &[
            "--setting",
            "count=2",
            "--setting",
            "interval_ms=5",
            "--setting",
            "sensor_id=from-settings",
            "--env",
            "SENSOR_ID=from-env",
            "--env",
            "COUNT=9",
        ],
        &[],
    );
    assert_status(&o, 0);
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 2, "settings win over env: {out}");
    assert!(
        out.lines()
            .all(|l| l.starts_with("{\"sensor\":\"from-settings\"")),
        "{out}"
    );
    // A bad value is the module's to report, naming the setting.
    let o = s.run(
        guests::TEMPERATURE_SENSOR,
        &["--setting", "interval_ms=fast"],
        &[],
    );
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("interval_ms=\"fast\""),
        "{}",
        stderr(&o)
    );
    // Malformed flags are edgeward's to refuse.
    for (flag, says) in [
        ("novalue", "expected KEY=VALUE"),
        ("=v", "invalid key"),
        ("a\u{7}b=v", "invalid key"),
    ] {
        let o = s.run(guests::TEMPERATURE_SENSOR, &["--setting", flag], &[]);
        assert_status(&o, 2);
        assert!(stderr(&o).contains(says), "{flag}: {}", stderr(&o));
    }
    // Three of 100 KiB (one argument may hold at most 128 KiB).
    let big: Vec<String> = (0..3)
        .flat_map(|i| {
            [
                "--setting".to_owned(),
                format!("k{i}={}", "v".repeat(100 << 10)),
            ]
        })
        .collect();
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    let o = s.run(guests::TEMPERATURE_SENSOR, &big, &[]);
    assert_status(&o, 2);
    assert!(
        stderr(&o).contains("bytes of keys and values"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn outbound_allow_list_is_exact() {
    let s = Scratch::new();
    let allowed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let other = TcpListener::bind("127.0.0.1:0").expect("bind");
    other.set_nonblocking(true).expect("nonblocking");
    let allowed_addr = allowed.local_addr().expect("addr").to_string();
    let other_addr = other.local_addr().expect("addr").to_string();
    let accept = std::thread::spawn(move || {
        use std::io::Read;
        let (mut conn, _) = allowed.accept().expect("accept");
        let mut got = String::new();
        conn.read_to_string(&mut got).expect("read");
        got
    });
    let flag = ["--allow-outbound", allowed_addr.as_str()];
    let o = s.run(PROBE, &flag, &["connect", &allowed_addr]);
    assert_status(&o, 0);
    assert_eq!(
        accept.join().expect("join"),
        "escaped",
        "the allowed peer got the bytes"
    );

    let o = s.run(PROBE, &flag, &["connect", &other_addr]);
    assert_status(&o, 1);
    assert!(stdout(&o).starts_with("denied: connect"), "{}", stdout(&o));
    assert!(other.accept().is_err(), "an unlisted peer was reached");
    assert!(
        stderr(&o).contains("network access refused"),
        "refusals are logged: {}",
        stderr(&o)
    );

    // No listening, even with a non-empty allow-list.
    for addr in ["0.0.0.0:0", "127.0.0.1:0"] {
        let o = s.run(PROBE, &flag, &["bind", addr]);
        assert_status(&o, 1);
    }
}

#[test]
fn names_are_looked_up_only_when_listed_and_cannot_smuggle_loopback() {
    let s = Scratch::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let by_name = format!("localhost:{port}");
    let flag = ["--allow-outbound", by_name.as_str()];
    // The listed name resolves...
    let o = s.run(PROBE, &flag, &["lookup", "localhost"]);
    assert_status(&o, 0);
    // ...but its loopback address is not reachable through the name.
    let o = s.run(PROBE, &flag, &["connect", &by_name]);
    assert_status(&o, 1);
    assert!(listener.accept().is_err(), "a name smuggled in loopback");
    // Unlisted names are refused before any query leaves the host.
    let o = s.run(PROBE, &flag, &["lookup", "example.com"]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("name lookup refused"), "{}", stderr(&o));
}

/// LAN, CGNAT, ULA, NAT64, the metadata service and IPv4-compatible forms
/// are refused by the policy unless an entry names their address or block.
/// The guest runs in a network namespace of the test's own (`unshare -n`:
/// only a loopback that is down), so even an allowed connect cannot leave
/// the machine; the log tells a policy refusal from a failed connect.
#[test]
fn lan_and_nat64_are_refused_by_the_policy() {
    let s = Scratch::new();
    let in_netns = |flags: &[&str], dest: &str| {
        let o = std::process::Command::new("unshare")
            .arg("-n")
            .arg(common::EDGEWARD)
            .arg("--state-dir")
            .arg(s.state())
            .arg("run")
            .args(flags)
            .arg(PROBE)
            .args(["--", "connect", dest])
            .env_remove("EDGEWARD_LOG")
            .output()
            .expect("unshare -n (util-linux) and edgeward");
        assert_status(&o, 1);
        assert!(
            stdout(&o).starts_with("denied: connect"),
            "{dest}: {}",
            stdout(&o)
        );
        stderr(&o)
    };
    let named = ["--allow-outbound", "plc.example:502"];
    for (dest, class) in [
        ("10.0.5.9:502", "private-use"),
        ("192.168.1.1:502", "private-use"),
        ("172.16.0.1:502", "private-use"),
        ("100.64.0.1:502", "shared address space"),
        ("0.0.0.1:502", "this network"),
        ("169.254.169.254:502", "link-local"),
        ("[fd00::1]:502", "unique-local"),
        ("[fec0::1]:502", "site-local"),
        ("[64:ff9b::a00:509]:502", "NAT64"),
        ("[64:ff9b:1::1]:502", "NAT64"),
    ] {
        let err = in_netns(&named, dest);
        assert!(
            err.contains("network access refused") && err.contains(class),
            "{dest}: {err}"
        );
    }
    // wasmtime-wasi refuses IPv4-compatible and -mapped destinations on
    // sockets before the policy is asked (the policy classifies them as
    // their IPv4 address for DNS answers and HTTP; see the unit tests).
    for dest in ["[::10.0.5.9]:502", "[::ffff:10.0.5.9]:502"] {
        in_netns(&named, dest);
    }
    // Named by its block, the address passes the policy: the connect is
    // attempted and fails inside the empty namespace, without a refusal.
    for (flag, dest) in [
        ("10.0.5.0/24:502", "10.0.5.9:502"),
        ("[fd00::/8]:502", "[fd00::1]:502"),
    ] {
        let err = in_netns(&["--allow-outbound", flag], dest);
        assert!(!err.contains("network access refused"), "{dest}: {err}");
    }
}

/// `max_memory` is the module's total over all its memories: a component
/// with two cannot take twice the limit.
#[test]
fn memory_is_limited_in_total_over_all_memories() {
    let s = Scratch::new();
    let bomb = s.command_component("bomb2.wasm", &memory_bomb(2, 256));
    let o = s.run(&bomb, &["--max-memory", "16MiB"], &[]);
    assert_status(&o, 0);
}

/// More memories than `max_memories` (default 2) is refused before it runs,
/// with the limit and the setting named; raising it lets the module run.
#[test]
fn memories_per_module_are_capped() {
    let s = Scratch::new();
    let bomb = s.command_component("bomb3.wasm", &memory_bomb(3, 1024));
    let o = s.run(&bomb, &["--max-memory", "16MiB"], &[]);
    assert_status(&o, 3);
    let err = stderr(&o);
    assert!(
        err.contains("memor") && err.contains("max_memories"),
        "{err}"
    );
    let o = s.run(
        &bomb,
        &["--max-memory", "16MiB", "--max-memories", "3"],
        &[],
    );
    assert_status(&o, 0);
}

/// A module opening files in a loop hits its handle limit (max_handles:
/// resource-table entries, so host descriptors too) as an error it can
/// handle (ENOMEM: wasi:filesystem has no EMFILE), not a trap; it never
/// reaches the daemon's descriptor limit. Sockets get `new-socket-limit`.
#[test]
fn handles_are_bounded_per_module() {
    let s = Scratch::new();
    let (data, grant) = data_dir(&s);
    let o = s.run(
        PROBE,
        &["--dir", &grant, "--max-handles", "64"],
        &["open-loop"],
    );
    assert_status(&o, 1);
    let out = stdout(&o);
    assert!(
        out.contains("denied: open-loop after") && out.contains("memory"),
        "{out}{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("trap"), "{}", stderr(&o));
    assert!(out.contains("100 more refused"), "{out}");
    // Exactly the files it holds: a create refused for want of a handle
    // leaves nothing on disk (wasmtime creates before it takes a handle).
    let held: usize = out
        .split("open-loop after ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    let opened = std::fs::read_dir(&data).expect("read").count();
    assert!(opened <= 64, "{opened} files held open");
    assert_eq!(opened, held, "refused creates left files behind");
    let o = s.run(
        PROBE,
        &["--max-handles", "16", "--allow-outbound", "127.0.0.1:9"],
        &["socket-loop"],
    );
    assert_status(&o, 1);
    let out = stdout(&o);
    assert!(
        out.contains("denied: socket-loop after") && out.contains("new-socket-limit"),
        "{out}{}",
        stderr(&o)
    );
}

/// Handles without a host descriptor behind them (pollables) are bounded
/// by the same resource-table limit.
#[test]
fn pollables_are_bounded_per_module() {
    let s = Scratch::new();
    let looped = s.component("pollables.wasm", POLLABLE_LOOP);
    let o = s.run(&looped, &["--max-handles", "64"], &[]);
    assert_status(&o, 134);
    let err = stderr(&o);
    assert!(
        err.contains("handle limit exceeded") && err.contains("max_handles (64)"),
        "{err}"
    );
}

/// Names a module chose for its functions (its name section) reach trap
/// messages escaped: no terminal escapes, no line of their own.
#[test]
fn trap_backtraces_escape_guest_names() {
    let s = Scratch::new();
    let path = s.command_component(
        "evil.wasm",
        r#"(func $evil (@name "evil\1b[2J\0a2026-11-29T00:00:00Z INFO forged line") unreachable)
    (func (export "run") (result i32) (call $evil) (i32.const 0))"#,
    );
    let o = s.run(&path, &[], &[]);
    assert_status(&o, 134);
    let err = stderr(&o);
    assert!(
        !err.contains('\x1b'),
        "a raw escape reached the terminal: {err:?}"
    );
    assert!(err.contains("evil\\x1b[2J\\n2026"), "{err}");
    assert!(
        err.lines()
            .all(|l| !l.starts_with("2026-11-29T00:00:00Z INFO forged")),
        "a forged line: {err}"
    );
}

#[test]
fn udp_reaches_only_listed_peers() {
    let s = Scratch::new();
    let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = server.local_addr().expect("addr").to_string();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, from) = server.recv_from(&mut buf).expect("recv");
        server.send_to(&buf[..n], from).expect("reply");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let o = s.run(
        PROBE,
        &["--allow-outbound", &addr, "--timeout", "20s"],
        &["udp-echo", &addr],
    );
    assert_status(&o, 0);
    assert!(stdout(&o).contains("\"ping\""), "{}", stdout(&o));
    assert_eq!(echo.join().expect("join"), "ping");

    let o = s.run(PROBE, &["--allow-outbound", "127.0.0.1:9"], &["udp", &addr]);
    assert_status(&o, 1);
}

#[test]
fn recursion_and_oversized_host_calls_are_bounded() {
    let s = Scratch::new();
    let o = s.run(PROBE, &["--max-stack", "128KiB"], &["recurse"]);
    assert_status(&o, 134);
    assert!(
        stderr(&o).contains("call stack exhausted"),
        "{}",
        stderr(&o)
    );

    // A 20 MiB argument to one host call: the host copies at most what the
    // module's own memory holds, and the module gets an error back.
    let o = s.run(PROBE, &["--max-hostcall-data", "1MiB"], &["big-path", "20"]);
    assert_status(&o, 1);
    let o = s.run(PROBE, &["--max-hostcall-data", "16MiB"], &["big-path", "1"]);
    assert_status(&o, 1);
    assert!(
        stdout(&o).starts_with("denied: big-path"),
        "an ordinary error, not a trap: {}",
        stdout(&o)
    );
}

/// A one-shot HTTP server on loopback; returns its address and the request
/// it saw (None if nobody came within the wait).
fn http_server() -> (String, std::thread::JoinHandle<Option<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    listener.set_nonblocking(true).expect("nonblocking");
    let handle = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false).expect("blocking");
                    let mut buf = [0u8; 4096];
                    let n = conn.read(&mut buf).unwrap_or(0);
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                    );
                    return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(_) => return None,
            }
        }
    });
    (addr, handle)
}

/// DNS rebinding through `wasi:http`: the name is resolved once, its
/// address vetted, and the connection goes there even though the resolver
/// answers differently on the next lookup (scripted with the test binary's
/// resolver seam). Everything stays on loopback: 127.0.0.1 is listed as a
/// literal, 127.0.0.2 (the rebound answer) is not.
#[test]
fn wasi_http_connects_to_the_address_it_vetted() {
    let s = Scratch::new();
    let (addr, server) = http_server();
    let port = addr.rsplit(':').next().expect("port").to_owned();
    let evil = TcpListener::bind(format!("127.0.0.2:{port}")).expect("bind 127.0.0.2");
    evil.set_nonblocking(true).expect("nonblocking");
    let by_name = format!("rebind.test:{port}");
    let o = s
        .edgeward()
        .env("EDGEWARD_TEST_RESOLVER", "rebind.test=127.0.0.1|127.0.0.2")
        .arg("run")
        .args(["--allow-outbound", &by_name, "--allow-outbound", &addr])
        .arg(guests::HTTP_PROBE)
        .args(["--", &by_name, "/rebind"])
        .output()
        .expect("spawn edgeward");
    assert_status(&o, 0);
    assert_eq!(stdout(&o).trim(), "ok: 200 hello");
    let seen = server.join().expect("join").expect("request");
    assert!(seen.starts_with("GET /rebind HTTP/1.1"), "{seen}");
    assert!(
        seen.to_ascii_lowercase()
            .contains(&format!("host: {by_name}")),
        "the Host header keeps the name: {seen}"
    );
    assert!(evil.accept().is_err(), "the rebound address was reached");
}

#[test]
fn wasi_http_requests_follow_the_allow_list() {
    let s = Scratch::new();
    let http = guests::HTTP_PROBE;
    let (addr, server) = http_server();
    let o = s.run(http, &["--allow-outbound", &addr], &[&addr, "/reading"]);
    assert_status(&o, 0);
    assert_eq!(stdout(&o).trim(), "ok: 200 hello");
    let seen = server.join().expect("join").expect("request");
    assert!(seen.starts_with("GET /reading HTTP/1.1"), "{seen}");

    // Not listed: refused before any connection.
    let (addr, server) = http_server();
    let o = s.run(
        http,
        &["--allow-outbound", "127.0.0.1:9", "--timeout", "30s"],
        &[&addr, "/"],
    );
    assert_status(&o, 1);
    assert!(stdout(&o).contains("HttpRequestDenied"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("HTTP request refused"),
        "{}",
        stderr(&o)
    );
    // Listed by a name that resolves to loopback: refused too.
    let port = addr.rsplit(':').next().expect("port");
    let by_name = format!("localhost:{port}");
    let o = s.run(http, &["--allow-outbound", &by_name], &[&by_name, "/"]);
    assert_status(&o, 1);
    assert!(stdout(&o).contains("HttpRequestDenied"), "{}", stdout(&o));
    drop(server);
}

/// An empty `data` directory in the scratch dir, and its grant as `/data`.
fn data_dir(s: &Scratch) -> (std::path::PathBuf, String) {
    let data = s.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let grant = format!("{}::/data", data.display());
    (data, grant)
}

/// Apparent bytes and entries under `dir`, as the budget counts them.
fn du(dir: &std::path::Path) -> (u64, u64) {
    let (mut bytes, mut entries) = (0, 0);
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("entry");
        let m = e.metadata().expect("lstat");
        entries += 1;
        if m.is_dir() {
            let (b, n) = du(&e.path());
            bytes += b;
            entries += n;
        } else {
            bytes += m.len();
        }
    }
    (bytes, entries)
}

#[test]
fn a_disk_filling_module_is_refused_at_its_budget() {
    let s = Scratch::new();
    let (data, grant) = data_dir(&s);
    let o = s.run(
        PROBE,
        &["--dir", &grant, "--max-disk", "1MiB"],
        &["disk-fill", "16777216"],
    );
    assert_status(&o, 0);
    let out = stdout(&o);
    // 16 chunks of 64 KiB fit exactly; the 17th is refused (through a
    // stream, which wasi-libc reports as EIO), and the operator is told why.
    assert!(out.contains("refused after 1048576 bytes"), "{out}");
    let err = stderr(&o);
    assert!(
        err.contains("disk budget exceeded") && err.contains("max_disk") && err.contains("/data"),
        "{err}"
    );
    assert!(out.contains("after freeing: Ok(())"), "{out}");
    assert!(du(&data).0 <= 1 << 20);

    // Without --max-disk, `edgeward run` sets no budget on its grants.
    let o = s.run(PROBE, &["--dir", &grant], &["disk-fill", "2097152"]);
    assert!(
        stdout(&o).contains("wrote 2097152 bytes, never refused"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn the_budget_counts_what_is_already_there() {
    let s = Scratch::new();
    let (data, grant) = data_dir(&s);
    std::fs::write(data.join("old"), vec![0u8; 2 << 20]).expect("old data");
    let o = s.run(
        PROBE,
        &["--dir", &grant, "--max-disk", "1MiB"],
        &["write", "/data/new", "x"],
    );
    assert_status(&o, 1);
    assert!(
        stdout(&o).to_lowercase().contains("quota"),
        "{}",
        stdout(&o)
    );
    // Entries too: 3 there, 3 allowed.
    for i in 0..2 {
        std::fs::write(data.join(format!("e{i}")), "").expect("entry");
    }
    std::fs::remove_file(data.join("old")).expect("rm");
    std::fs::write(data.join("e2"), "").expect("entry");
    let o = s.run(
        PROBE,
        &["--dir", &grant, "--max-disk-entries", "3"],
        &["write", "/data/new", "x"],
    );
    assert_status(&o, 1);
    assert!(
        stdout(&o).to_lowercase().contains("quota"),
        "{}",
        stdout(&o)
    );
    // Overwriting an existing file takes no new entry.
    let o = s.run(
        PROBE,
        &["--dir", &grant, "--max-disk-entries", "3"],
        &["write", "/data/e0", "x"],
    );
    assert_status(&o, 0);
}

/// Each way around the budget a module could try (see runtime::disk).
#[test]
fn disk_budget_tricks_are_refused() {
    let s = Scratch::new();
    let (data, grant) = data_dir(&s);
    let other = s.path().join("other");
    std::fs::create_dir(&other).expect("other dir");
    let o = s.run(
        PROBE,
        &[
            "--dir",
            &grant,
            "--dir",
            &format!("{}::/other", other.display()),
            "--max-disk",
            "1MiB",
            "--max-disk-entries",
            "40",
        ],
        &["disk-tricks", &(1u64 << 20).to_string()],
    );
    assert_status(&o, 0);
    let out = stdout(&o);
    let trick = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("trick {name}:")))
            .unwrap_or_else(|| panic!("no line for {name}: {out}"))
            .to_owned()
    };
    // Calls that return a filesystem error code say EDQUOT.
    for refused in [
        "sparse-set-size",
        "pwrite-far",
        "mkdir-loop",
        "symlink-loop",
    ] {
        assert!(
            trick(refused).contains("refused (quota)"),
            "{}",
            trick(refused)
        );
    }
    // Writes through a stream: refused (EIO through wasi-libc).
    for refused in ["write-while-unlinked-held", "append"] {
        assert!(
            trick(refused).contains("refused (stream)"),
            "{}",
            trick(refused)
        );
    }
    for across in ["rename-across", "hard-link-across"] {
        assert!(
            trick(across).contains("CrossesDevices"),
            "{}",
            trick(across)
        );
    }
    for ok in ["write-after-close", "hard-link-within", "rename-within"] {
        assert!(trick(ok).contains(": ok"), "{}", trick(ok));
    }
    // 40 entries: the directories took them all (then links had none).
    assert!(
        out.contains("trick entries: 40 directories, then 0 links"),
        "{out}"
    );
    let (bytes, entries) = du(&data);
    assert!(
        bytes <= 1 << 20 && entries <= 40,
        "{bytes} bytes, {entries} entries"
    );
    assert_eq!(du(&other), (0, 0), "nothing crossed into /other");
}
