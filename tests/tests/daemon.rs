//! `edgeward daemon`: a deployment runs, refused modules stay refused, and
//! SIGTERM stops everything cleanly.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;

#[test]
fn runs_a_deployment_and_stops_on_sigterm() {
    let s = Scratch::new();
    let sensor = guests::TEMPERATURE_SENSOR;
    let probe = guests::SANDBOX_PROBE;
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let config = format!(
        r#"
[[module]]
name = "sensor"
file = "{sensor}"
digest = "{}"
env = {{ INTERVAL_MS = "20", SENSOR_ID = "demo" }}

[[module]]
name = "writer"
file = "{probe}"
digest = "{}"
args = ["write", "/data/hello.txt", "persisted"]
restart = "never"

[[module]]
name = "impostor"
file = "{probe}"
digest = "{wrong}"
args = ["hello"]
"#,
        sha256sum(sensor),
        sha256sum(probe),
    );
    let mut d = Daemon::start(&s, &config);
    d.wait_for("three sensor readings", |out, _| {
        count(out, "sensor | {\"sensor\":\"demo\"") >= 3
    });
    d.wait_for("the writer to finish", |_, err| {
        count(err, "not restarting") >= 1
    });
    d.wait_for("the impostor to be refused", |_, err| {
        count(err, "module refused") >= 1
    });

    // The writer's data landed in its own private data dir.
    let data = s.state().join("modules/writer/data");
    assert_eq!(
        std::fs::read_to_string(data.join("hello.txt")).expect("data"),
        "persisted"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // What the daemon recorded, through the binary.
    let statuses = status_when(&s, "the writer's exit and the refusal", |v| {
        status_of(v, "writer")["state"] == "exited"
            && status_of(v, "impostor")["state"] == "refused"
    });
    let by_name = |n: &str| {
        statuses
            .iter()
            .find(|v| v["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no status for {n}: {statuses:?}"))
    };
    assert_eq!(by_name("sensor")["state"], "running");
    assert_eq!(by_name("sensor")["digest"], sha256sum(sensor));
    assert_eq!(by_name("writer")["state"], "exited");
    assert_eq!(by_name("writer")["last_exit"]["outcome"], "success");
    assert_eq!(by_name("impostor")["state"], "refused");
    assert!(
        by_name("impostor")["reason"]
            .as_str()
            .unwrap_or("")
            .contains(&wrong)
    );
    let logs = s
        .edgeward()
        .args(["logs", "sensor"])
        .output()
        .expect("spawn");
    assert_status(&logs, 0);
    let first = stdout(&logs).lines().next().unwrap_or("").to_owned();
    assert!(
        first.contains("Z out {\"sensor\":\"demo\",\"seq\":1,"),
        "timestamped log line: {first}"
    );
    let table = s.edgeward().arg("status").output().expect("spawn");
    assert!(
        stdout(&table).contains("impostor") && stdout(&table).contains("refused"),
        "{}",
        stdout(&table)
    );

    let (status, out, err) = d.terminate();
    let sensor_state = status_json(&s)
        .iter()
        .find(|v| v["name"] == "sensor")
        .expect("sensor")["state"]
        .clone();
    assert_eq!(sensor_state, "stopped");
    assert!(
        status.success(),
        "daemon exit: {status}\n{}",
        err.join("\n")
    );
    let err = err.join("\n");
    assert!(
        err.contains(&wrong),
        "refusal names the pinned digest: {err}"
    );
    assert!(
        err.contains(&sha256sum(probe)),
        "refusal names the measured digest: {err}"
    );
    assert!(err.contains("SIGTERM"), "{err}");
    assert!(err.contains("edgeward daemon stopped"), "{err}");
    assert_eq!(count(&out, "impostor |"), 0, "the impostor ran");
}

#[test]
fn restarts_a_failing_module_with_backoff() {
    let s = Scratch::new();
    let probe = guests::SANDBOX_PROBE;
    let config = format!(
        r#"
[[module]]
name = "flaky"
file = "{probe}"
digest = "{}"
args = ["read", "/data/missing"]
restart = "on-failure"
"#,
        sha256sum(probe),
    );
    let mut d = Daemon::start(&s, &config);
    // Starts at t=0, 1s, 3s: three failures within a few seconds, no more.
    d.wait_for("three failures", |out, _| {
        count(out, "flaky | denied: read") >= 3
    });
    let (status, out, _) = d.terminate();
    assert!(status.success());
    assert!(
        count(&out, "flaky | denied: read") <= 4,
        "no backoff: {}",
        out.join("\n")
    );
    let exits = s
        .edgeward()
        .args(["logs", "--exits", "flaky"])
        .output()
        .expect("spawn");
    let records: Vec<serde_json::Value> = stdout(&exits)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(records.len() >= 3, "{records:?}");
    assert!(
        records
            .iter()
            .all(|r| r["outcome"] == "failure" && r["status"] == 1),
        "{records:?}"
    );
    assert_eq!(records[1]["start"], 2);
}

#[test]
fn endless_output_is_bounded_on_disk_and_on_screen() {
    let s = Scratch::new();
    let probe = guests::SANDBOX_PROBE;
    let config = format!(
        r#"
[[module]]
name = "flood"
file = "{probe}"
digest = "{d}"
args = ["flood"]

[[module]]
name = "endless"
file = "{probe}"
digest = "{d}"
args = ["endless-line"]
"#,
        d = sha256sum(probe),
    );
    let mut d = Daemon::start(&s, &config);
    let log_dir = s.state().join("modules/flood/log");
    d.wait_for("the flood log to rotate twice", |_, _| {
        log_dir.join("output.log.2").exists()
    });
    d.wait_for("echo suppression", |out, _| {
        count(out, "lines not echoed") >= 1
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let total = |dir: &std::path::Path| -> u64 {
        std::fs::read_dir(dir)
            .expect("log dir")
            .map(|e| e.expect("entry").metadata().expect("meta").len())
            .sum()
    };
    let flood = total(&log_dir);
    assert!(
        flood <= 3 * (1 << 20) + (256 << 10),
        "flood logs grew to {flood} bytes"
    );
    let endless = total(&s.state().join("modules/endless/log"));
    assert!(
        endless <= 3 * (1 << 20) + (256 << 10),
        "endless-line logs grew to {endless} bytes"
    );
    let (status, out, _) = d.terminate();
    assert!(status.success());
    // Echo is rate-limited: a few hundred lines a second, not the flood.
    assert!(
        count(&out, "flood | ") < 10_000,
        "{} echoed lines",
        count(&out, "flood | ")
    );
}

/// No config file at all: an empty deployment that starts and stops.
#[test]
fn starts_with_no_config_file() {
    let s = Scratch::new();
    let mut d = Daemon::start_without_config(&s);
    d.wait_for("the daemon to start", |_, err| {
        err.iter()
            .any(|l| l.contains("edgeward daemon starting") && l.contains("modules=0"))
    });
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{}", err.join("\n"));
}

/// The config's modules are kept in the registry: a module dropped from
/// the config is no longer started; one added is.
#[test]
fn the_registry_follows_the_config() {
    let s = Scratch::new();
    let probe = guests::SANDBOX_PROBE;
    let module = |name: &str| {
        format!(
            "[[module]]\nname = \"{name}\"\nfile = \"{probe}\"\ndigest = \"{}\"\nargs = [\"hello\"]\nrestart = \"never\"\n",
            sha256sum(probe)
        )
    };
    for (config, expect, absent) in [
        (module("one") + &module("two"), ["one |", "two |"], None),
        (
            module("two") + &module("three"),
            ["two |", "three |"],
            Some("one |"),
        ),
    ] {
        let mut d = Daemon::start(&s, &config);
        for e in expect {
            d.wait_for(e, |out, _| out.iter().any(|l| l.starts_with(e)));
        }
        let (status, out, err) = d.terminate();
        assert!(status.success(), "{}", err.join("\n"));
        if let Some(a) = absent {
            assert!(!out.iter().any(|l| l.starts_with(a)), "{a} ran: {out:?}");
        }
    }
    let registry = edgeward::registry::Registry::open(&s.state()).unwrap();
    let names: Vec<String> = registry
        .modules()
        .unwrap()
        .into_iter()
        .map(|m| m.spec.name)
        .collect();
    assert_eq!(names, ["three", "two"]);
    // "one" keeps its identity registration until it is deregistered.
    assert!(registry.registration("one").unwrap().is_some());
}

#[test]
fn bad_config_is_rejected_with_a_clear_error() {
    let s = Scratch::new();
    let path = s.write(
        "config.toml",
        "[[module]]\nname = \"x\"\nfile = \"x.wasm\"\ndigest = \"sha256:1234\"\n",
    );
    let o = s.daemon_refused(&path);
    assert_status(&o, 2);
    let err = stderr(&o);
    assert!(
        err.contains("config.toml") && err.contains("digest"),
        "{err}"
    );
    let o = s
        .edgeward()
        .args(["daemon", "--config", "/no/such/config.toml"])
        .output()
        .expect("spawn");
    assert_status(&o, 2);
    assert!(
        stderr(&o).contains("/no/such/config.toml"),
        "{}",
        stderr(&o)
    );
}

/// A command component with `n` small functions: seconds of compilation for
/// a debug build of the host, nothing to run.
fn slow_to_compile(s: &Scratch, name: &str, n: usize, salt: u32) -> String {
    let funcs: String = (0..n)
        .map(|i| {
            format!(
                "(func (param i32) (result i32) (i32.add (i32.mul (local.get 0) (i32.const {i})) (i32.xor (local.get 0) (i32.const {salt}))))\n"
            )
        })
        .collect();
    s.command_component(
        name,
        &format!("{funcs}(func (export \"run\") (result i32) (i32.const 0))"),
    )
}

/// SIGTERM while the daemon is still compiling its modules at start-up
/// stops it at once, not after every compile.
#[test]
fn sigterm_is_honoured_while_compiling() {
    let s = Scratch::new();
    let files: Vec<String> = (0..3)
        .map(|i| slow_to_compile(&s, &format!("big{i}.wasm"), 30_000, i))
        .collect();
    // What one compile costs here.
    let t = std::time::Instant::now();
    let o = s.run(&files[0], &["--no-cache"], &[]);
    assert_status(&o, 0);
    let one = t.elapsed();
    assert!(
        one > std::time::Duration::from_millis(800),
        "compiling took only {one:?}: make the test component bigger"
    );
    let config: String = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            format!(
                "[[module]]\nname = \"big{i}\"\nfile = \"{f}\"\ndigest = \"{}\"\nrestart = \"never\"\n\n",
                sha256sum(f)
            )
        })
        .collect();
    let mut d = Daemon::start(&s, &config);
    d.wait_for("the first compile to begin", |_, err| {
        count(err, "workload identity ready") >= 1
    });
    let asked = std::time::Instant::now();
    let (status, _, err) = d.terminate();
    let took = asked.elapsed();
    assert!(status.success(), "{}", err.join("\n"));
    assert!(
        took < one,
        "stopping took {took:?}; one compile takes {one:?} and three were due"
    );
    assert!(
        count(&err, "module measured and loaded") < 3,
        "every module was compiled before the signal was seen:\n{}",
        err.join("\n")
    );
    assert!(count(&err, "SIGTERM: stopping") == 1, "{}", err.join("\n"));
}

/// `edgeward check`, with and without a daemon, and what makes it fail.
#[test]
fn check_names_each_verdict_and_fails_only_on_a_failure() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let check = || {
        let o = s.edgeward().args(["check", "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let verdict = |name: &str| {
            v.as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .map(|c| format!("{} {}", c["verdict"].as_str().unwrap(), c["detail"]))
                .unwrap()
        };
        (
            o.status.code(),
            verdict("socket"),
            verdict("registry"),
            verdict("components"),
            verdict("state-dir"),
        )
    };
    std::fs::create_dir_all(s.state()).unwrap();
    std::fs::set_permissions(s.state(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, socket, ..) = check();
    assert_eq!(code, Some(0));
    assert!(
        socket.starts_with("warn") && socket.contains("no daemon"),
        "{socket}"
    );

    let probe = guests::SANDBOX_PROBE;
    let config = format!(
        "[[module]]\nname = \"m\"\nfile = \"{probe}\"\ndigest = \"{}\"\nargs = [\"tick\"]\n",
        sha256sum(probe)
    );
    let mut d = Daemon::start(&s, &config);
    d.wait_for("m to run", |_, err| {
        err.iter().any(|l| l.contains("module measured and loaded"))
    });
    let (code, socket, registry, components, _) = check();
    assert_eq!(code, Some(0));
    assert!(
        socket.starts_with("pass") && socket.contains("answers"),
        "{socket}"
    );
    assert!(
        registry.starts_with("pass") && registry.contains("held by the running daemon"),
        "{registry}"
    );
    assert!(
        components.starts_with("pass") && components.contains("1 stored"),
        "{components}"
    );
    let _ = d.terminate();

    let (code, _, registry, ..) = check();
    assert_eq!(code, Some(0));
    assert!(
        registry.starts_with("pass") && registry.contains("intact, 1 modules"),
        "{registry}"
    );
    // A stored component altered, and a state dir others can read: failures.
    let stored = std::fs::read_dir(s.state().join("components"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&stored, b"altered").unwrap();
    std::fs::set_permissions(s.state(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, _, _, components, state_dir) = check();
    assert_eq!(code, Some(1));
    assert!(
        components.starts_with("fail") && components.contains("do not match"),
        "{components}"
    );
    assert!(
        state_dir.starts_with("fail") && state_dir.contains("755"),
        "{state_dir}"
    );
    // Published JWT keys: none valid now is a warning, unreadable a failure.
    let jwt = |s: &Scratch| {
        let o = s.edgeward().args(["check", "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "jwt-keys")
            .map(|c| format!("{} {}", c["verdict"].as_str().unwrap(), c["detail"]))
            .unwrap()
    };
    let keys = s.state().join("identity/jwt-keys.json");
    std::fs::create_dir_all(keys.parent().unwrap()).unwrap();
    std::fs::write(
        &keys,
        r#"[{"kid":"k","public_key":"","certificate":"","valid_until":1}]"#,
    )
    .unwrap();
    let v = jwt(&s);
    assert!(
        v.starts_with("warn") && v.contains("no published key is valid now"),
        "{v}"
    );
    std::fs::write(&keys, "garbage").unwrap();
    let v = jwt(&s);
    assert!(v.starts_with("fail") && v.contains("not a list"), "{v}");
}

/// What answers on the management socket is believed only from root, this
/// user or the state dir's owner: a process of another uid there (at a
/// path it could bind while the daemon was down) neither passes as the
/// daemon nor names a key daemon for the HSM line; and whatever a detail
/// carries reaches the terminal escaped.
#[test]
fn check_believes_only_the_daemon_on_its_socket() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    std::fs::create_dir_all(s.state()).unwrap();
    std::fs::set_permissions(s.state(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A directory of another uid, its name carrying a terminal's escape.
    let dir = s.path().join("fake\x1b[2Jdir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stranger = rustix::fs::Uid::from_raw(64997);
    rustix::fs::chown(&dir, Some(stranger), Some(rustix::fs::Gid::from_raw(64997))).unwrap();
    let answer = s.path().join("answer");
    std::fs::write(
        &answer,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n\
         {\"status\":\"ok\",\"key_daemon\":\"/tmp/fake-keyd.sock\",\"key_daemon_user\":\"root\"}",
    )
    .unwrap();
    std::fs::set_permissions(&answer, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sock = dir.join("api.sock");
    // socat's address syntax does not take the escape: it binds through a
    // plain name for the same directory.
    let plain = s.path().join("plain");
    std::os::unix::fs::symlink(&dir, &plain).unwrap();
    let mut fake = std::process::Command::new("setpriv")
        .args(["--reuid=64997", "--regid=64997", "--clear-groups", "socat"])
        .arg(format!(
            "UNIX-LISTEN:{},fork,mode=660",
            plain.join("api.sock").display()
        ))
        .arg(format!("SYSTEM:cat {}", answer.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("setpriv and socat");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the stranger's socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = s
        .edgeward()
        .args(["check", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let _ = fake.kill();
    let _ = fake.wait();
    let text = stdout(&o);
    let line = |name: &str| {
        text.lines()
            .find(|l| {
                l.get(6..)
                    .is_some_and(|r| r.starts_with(&format!("{name} ")))
            })
            .unwrap_or_else(|| panic!("no {name} line: {text}"))
            .to_owned()
    };
    let socket = line("socket");
    assert!(
        socket.starts_with("WARN") && socket.contains("nothing answers"),
        "{text}"
    );
    assert!(!line("hsm").contains("key daemon"), "{text}");
    // The directory's escape is shown, not obeyed.
    assert!(socket.contains("fake\\x1b[2Jdir"), "{text}");
    assert!(!text.contains('\x1b'), "{text}");
}

/// `edgeward compile` fills the daemon's cache ahead of a start: the
/// daemon's first load is code from the cache, not the compiler. A file
/// that is not a component is refused by name.
#[test]
fn compile_fills_the_daemons_cache_ahead_of_a_start() {
    let s = Scratch::new();
    let probe = guests::SANDBOX_PROBE;
    let text = format!(
        "[[module]]\nname = \"m\"\nfile = \"{probe}\"\ndigest = \"{}\"\nargs = [\"tick\"]\n",
        sha256sum(probe)
    );
    let config = s.write("compile.toml", &text);
    let compile = |file: &str| {
        s.edgeward()
            .arg("compile")
            .arg("--config")
            .arg(&config)
            .arg(file)
            .output()
            .unwrap()
    };
    let o = compile(probe);
    assert_status(&o, 0);
    assert!(stdout(&o).contains("compiled and cached"), "{}", stdout(&o));
    let o = compile(probe);
    assert_status(&o, 0);
    assert!(stdout(&o).contains("already cached"), "{}", stdout(&o));
    let junk = s.write("junk.wasm", "not a component");
    let o = compile(junk.to_str().unwrap());
    assert_status(&o, 1);
    assert!(stderr(&o).contains("junk.wasm"), "{}", stderr(&o));
    // An entry that cannot be written (a directory in its place) is a
    // failure of compile, whose job it is, not a silent success.
    let entry = std::fs::read_dir(s.state().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .expect("the entry");
    std::fs::remove_file(&entry).unwrap();
    std::fs::create_dir(&entry).unwrap();
    let o = compile(probe);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("compiled, but not cached"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir(&entry).unwrap();
    assert_status(&compile(probe), 0);

    let mut d = Daemon::start(&s, &text);
    d.wait_for("m to load", |_, err| {
        err.iter().any(|l| l.contains("module measured and loaded"))
    });
    // Its status says where its code came from and how long each phase
    // took (instantiation once it has run).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let code = loop {
        let o = s
            .edgeward()
            .args(["module", "list", "--json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap_or_default();
        let code = v
            .as_array()
            .and_then(|a| a.iter().find(|m| m["name"] == "m"))
            .map(|m| m["code"].clone())
            .unwrap_or_default();
        if code["instantiate_ms"].is_u64() {
            break code;
        }
        assert!(std::time::Instant::now() < deadline, "no code report: {v}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(code["source"], "cache", "{code}");
    assert!(
        code["read_ms"].is_u64() && code["load_ms"].is_u64(),
        "{code}"
    );
    let (_, _, err) = d.terminate();
    let line = err
        .iter()
        .find(|l| l.contains("module measured and loaded"))
        .cloned()
        .unwrap_or_default();
    assert!(line.contains("Cache"), "code from the cache: {line}");
}

/// Milliseconds into the day of a daemon log line's RFC 3339 timestamp
/// (`2026-01-02T03:04:05.678901Z ...`).
fn log_ms(line: &str) -> Option<i64> {
    let t = line
        .split(' ')
        .next()?
        .strip_suffix('Z')?
        .split_once('T')?
        .1;
    let (hms, frac) = t.split_once('.')?;
    let h: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    Some(((h[0] * 60 + h[1]) * 60 + h[2]) * 1000 + frac.get(..3)?.parse::<i64>().ok()?)
}

/// The compile queue: with `[runtime] compile_concurrency = 1` the daemon
/// compiles its deployment's cold components one after another (no two
/// compilations overlap in time, so no two compilers' memory peaks add
/// up); with 3, side by side.
#[test]
fn the_compile_queue_bounds_compilations_at_once() {
    let files = [
        guests::SANDBOX_PROBE,
        guests::IDENTITY_PROBE,
        guests::HTTP_PROBE,
    ];
    let compilations = |width: u32| -> Vec<(i64, i64)> {
        let s = Scratch::new();
        let mut text = format!("[runtime]\ncompile_concurrency = {width}\n\n");
        for (i, f) in files.iter().enumerate() {
            text.push_str(&format!(
                "[[module]]\nname = \"m{i}\"\nfile = \"{f}\"\ndigest = \"{}\"\nrestart = \"never\"\n\n",
                sha256sum(f)
            ));
        }
        let mut d = Daemon::start(&s, &text);
        d.wait_for("the three to load", |_, err| {
            count(err, "module measured and loaded") == 3
        });
        let (_, _, err) = d.terminate();
        err.iter()
            .filter(|l| l.contains("module measured and loaded"))
            .map(|l| {
                assert!(l.contains("code=Compiled"), "a cold start compiles: {l}");
                let end = log_ms(l).unwrap_or_else(|| panic!("no timestamp: {l}"));
                let took: i64 = l
                    .split(' ')
                    .find_map(|w| w.strip_prefix("load_ms="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no load_ms: {l}"));
                // The line is written once the module is registered, after
                // its compilation ended: the interval ends no earlier.
                (end - took, end)
            })
            .collect()
    };
    let overlapping = |c: &[(i64, i64)]| {
        c.iter()
            .enumerate()
            .any(|(i, a)| c[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1))
    };
    let one = compilations(1);
    assert!(!overlapping(&one), "one at a time: {one:?}");
    let three = compilations(3);
    assert!(overlapping(&three), "side by side: {three:?}");
}

/// The demo's view of the readings (`scripts/readings`, as `scripts/demo`
/// pipes the daemon through it): one short line per reading naming its
/// signer, verified with the openssl CLI against the device's trust
/// bundle; the full records kept in the file it names, each checkable by
/// `--verify`; a reading altered after signing shows as not verified.
#[test]
fn the_demo_shows_each_reading_verified_in_one_line() {
    let s = Scratch::new();
    let sensor = guests::TEMPERATURE_SENSOR;
    let config = format!(
        "[identity]\ndevice_id = \"demo-gateway\"\n\n[[module]]\nname = \"greenhouse-sensor\"\nfile = \"{sensor}\"\ndigest = \"{}\"\nenv = {{ INTERVAL_MS = \"20\", SENSOR_ID = \"greenhouse\" }}\n",
        sha256sum(sensor),
    );
    let mut d = Daemon::start(&s, &config);
    d.wait_for("three sensor readings", |out, _| {
        count(out, "greenhouse-sensor | {\"sensor\":\"greenhouse\"") >= 3
    });
    let (_, out, _) = d.terminate();
    let mut input: Vec<String> = out
        .iter()
        .filter(|l| l.starts_with("greenhouse-sensor | "))
        .take(3)
        .cloned()
        .collect();
    // The second reading, its temperature altered after it was signed.
    let altered = input[1].replacen("\"celsius\":", "\"celsius\":1", 1);
    input.push(altered);
    input.push("not a reading: passed through".into());
    let records = s.path().join("readings.jsonl");
    let bundle_cmd = format!("{EDGEWARD} --state-dir {} bundle", s.state().display());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/readings");
    let mut child = std::process::Command::new(script)
        .arg("--records")
        .arg(&records)
        .args(["--bundle-cmd", &bundle_cmd])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("scripts/readings (python3)");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all((input.join("\n") + "\n").as_bytes())
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert_status(&o, 0);
    let shown = stdout(&o);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 5, "{shown}");
    for l in &lines[..3] {
        assert!(
            l.starts_with("greenhouse ")
                && l.contains(" °C ")
                && l.contains(
                    "signed by spiffe://edgeward.local/device/demo-gateway/module/greenhouse-sensor, verified"
                ),
            "{shown}"
        );
        assert!(l.len() < 160, "one short line: {l}");
    }
    assert!(lines[3].contains("NOT VERIFIED"), "{shown}");
    assert_eq!(lines[4], "not a reading: passed through");
    // Each record is checkable on its own; the altered one is refused.
    let verify = |n: &str| {
        std::process::Command::new(script)
            .args(["--verify"])
            .arg(&records)
            .arg(n)
            .args(["--bundle-cmd", &bundle_cmd])
            .output()
            .unwrap()
    };
    let o = verify("1");
    assert_status(&o, 0);
    assert!(stdout(&o).contains("Verified OK"), "{}", stdout(&o));
    let o = verify("4");
    assert_status(&o, 1);
    assert!(stderr(&o).contains("NOT VERIFIED"), "{}", stderr(&o));
}

/// The service manager's notifications at `NOTIFY_SOCKET`: a status while
/// it starts, `READY=1` only once the deployment's modules run, then
/// `WATCHDOG=1` at half `WATCHDOG_USEC` from the supervisor's loop, and
/// `STOPPING=1` on SIGTERM.
#[test]
fn readiness_and_the_watchdog_reach_the_service_manager() {
    let s = Scratch::new();
    let (mut d, notify) = start_notified(&s, "400000", None);
    let mut before = Vec::new();
    let ready = loop {
        let m = recv(&notify, Duration::from_secs(60)).expect("no READY=1 within 60 s");
        if m.starts_with("READY=1") {
            break m;
        }
        assert!(!m.contains("WATCHDOG=1"), "fed before ready: {m}");
        before.push(m);
    };
    // Ready only once the sensor runs.
    let st = status_json(&s);
    assert_eq!(status_of(&st, "sensor")["state"], "running", "{st:?}");
    assert_eq!(ready, "READY=1\nSTATUS=serving 1 modules");
    assert!(
        before.iter().any(|m| m.starts_with("STATUS=starting")),
        "{before:?}"
    );
    // Fed at about 200 ms.
    let t = Instant::now();
    for _ in 0..4 {
        let m = recv(&notify, Duration::from_secs(2)).expect("the watchdog went hungry");
        assert_eq!(m, "WATCHDOG=1");
    }
    let per = t.elapsed() / 4;
    assert!(per < Duration::from_millis(400), "fed every {per:?}");
    d.pump();
    let (status, _, err) = d.terminate();
    assert!(status.success(), "{err:?}");
    let stopping = std::iter::from_fn(|| recv(&notify, Duration::from_secs(5)))
        .find(|m| m.starts_with("STOPPING=1"));
    assert_eq!(
        stopping.as_deref(),
        Some("STOPPING=1\nSTATUS=SIGTERM: stopping the modules")
    );
}

/// A supervisor whose loop is wedged (the tests' build stalls it at the
/// third tick) feeds the watchdog no more (within three ticks), so the
/// service manager restarts it; its modules' own tasks are not what feeds
/// it.
#[test]
fn a_stalled_supervisor_stops_feeding_the_watchdog() {
    let s = Scratch::new();
    let (mut d, notify) = start_notified(&s, "200000", Some("3"));
    while !recv(&notify, Duration::from_secs(60))
        .expect("no READY=1")
        .starts_with("READY=1")
    {}
    let mut fed = 0;
    while let Some(m) = recv(&notify, Duration::from_secs(2)) {
        assert_eq!(m, "WATCHDOG=1");
        fed += 1;
        assert!(fed < 10, "still fed after the stall");
    }
    assert!(fed >= 2, "fed {fed} times before the stall");
    d.child.kill().unwrap();
    d.child.wait().unwrap();
}

/// The daemon with one sensor, `NOTIFY_SOCKET` a datagram socket standing
/// for the service manager's, `WATCHDOG_USEC` set, and the supervisor
/// stalled at tick `stall_after` if given.
fn start_notified(
    s: &Scratch,
    watchdog_usec: &str,
    stall_after: Option<&str>,
) -> (Daemon, std::os::unix::net::UnixDatagram) {
    let path = s.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let sensor = guests::TEMPERATURE_SENSOR;
    let config = format!(
        "[[module]]\nname = \"sensor\"\nfile = \"{sensor}\"\ndigest = \"{}\"\nenv = {{ INTERVAL_MS = \"100\", SENSOR_ID = \"s\" }}\n",
        sha256sum(sensor)
    );
    let mut env = vec![
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", watchdog_usec),
    ];
    if let Some(n) = stall_after {
        env.push(("EDGEWARD_TEST_STALL_AFTER", n));
    }
    (Daemon::start_with_env(s, &config, &env), sock)
}

/// The next notification within `wait`.
fn recv(sock: &std::os::unix::net::UnixDatagram, wait: Duration) -> Option<String> {
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Under journald (`JOURNAL_STREAM` names standard error) each log line
/// starts with its syslog priority and carries no timestamp of its own; a
/// `JOURNAL_STREAM` that names another stream (inherited by a process
/// whose standard error went elsewhere) changes nothing.
#[test]
fn under_journald_lines_carry_a_priority_and_no_timestamp() {
    use std::io::Read as _;
    for journal in [true, false] {
        let s = Scratch::new();
        let cfg = s.write("config.toml", "");
        let (mut reader, writer) = std::io::pipe().unwrap();
        let st = rustix::fs::fstat(&writer).unwrap();
        let ino = if journal { st.st_ino } else { st.st_ino + 1 };
        let mut child = s
            .edgeward()
            .arg("daemon")
            .arg("--config")
            .arg(&cfg)
            .env("EDGEWARD_LOG", "info")
            .env("JOURNAL_STREAM", format!("{}:{ino}", st.st_dev))
            // No native socket there (a machine's own journal is not this
            // test's): the stream takes the lines.
            .env("EDGEWARD_JOURNAL_SOCKET", s.path().join("no-journal.sock"))
            .stdout(std::process::Stdio::null())
            .stderr(writer)
            .spawn()
            .unwrap();
        wait_for_socket(&s);
        // Serving: the log holds more than start-up's first lines.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !s
            .edgeward()
            .arg("status")
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(std::time::Instant::now() < deadline, "never served");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(child.wait().unwrap().success());
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        let stopped = text
            .lines()
            .find(|l| l.contains("edgeward daemon stopped"))
            .unwrap_or_else(|| panic!("{text}"));
        if journal {
            assert!(stopped.starts_with("<6> INFO "), "{stopped}");
            for line in text.lines() {
                let rest = line
                    .strip_prefix('<')
                    .and_then(|l| l.split_once('>'))
                    .filter(|(p, _)| matches!(*p, "3" | "4" | "6" | "7"))
                    .unwrap_or_else(|| panic!("no priority: {line}"))
                    .1;
                assert!(!rest.trim_start().starts_with("20"), "a timestamp: {line}");
            }
        } else {
            assert!(stopped.starts_with("20"), "{stopped}");
            assert!(!text.contains("<6>"), "{text}");
        }
    }
}

/// `edgeward support-bundle`: what an operator sends when asking for help,
/// from a running daemon: versions, the config with module environments
/// redacted, check, modules, events, metrics, each module's output, the
/// measurement log; never a key, and no secret of a module's environment.
#[test]
fn a_support_bundle_holds_what_helps_and_no_secret() {
    let s = Scratch::new();
    let sensor = guests::TEMPERATURE_SENSOR;
    let config = format!(
        r#"
[[module]]
name = "sensor"
file = "{sensor}"
digest = "{}"
env = {{ INTERVAL_MS = "20", SENSOR_ID = "demo", API_TOKEN = "hunter2-do-not-leak" }}
args = ["--password", "hunter2-arg-do-not-leak"]
"#,
        sha256sum(sensor),
    );
    let cfg = s.write("config.toml", &config);
    let mut d = Daemon::start(&s, &config);
    d.wait_for("sensor readings", |out, _| {
        count(out, "sensor | {\"sensor\":\"demo\"") >= 3
    });
    let out = s.path().join("bundle");
    let o = s
        .edgeward()
        .args(["support-bundle", "--out"])
        .arg(&out)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_status(&o, 0);
    let read = |name: &str| {
        std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| {
            panic!(
                "{name}: {e}; INDEX.txt: {}",
                std::fs::read_to_string(out.join("INDEX.txt")).unwrap_or_default()
            )
        })
    };
    assert!(read("versions.txt").starts_with("edgeward "));
    let config_json = read("config.json");
    assert!(config_json.contains("API_TOKEN"), "{config_json}");
    assert!(config_json.contains("<redacted>"), "{config_json}");
    assert!(read("check.txt").contains("pass  config"));
    assert!(read("modules.json").contains("\"sensor\""));
    assert!(read("metrics.txt").contains("edgeward_module_state{module=\"sensor\""));
    assert!(read("modules/sensor/output.log").contains("\"sensor\":\"demo\""));
    assert!(read("events.jsonl").contains("sensor"));
    assert!(read("measurements.json").contains("files"));
    assert!(read("system.json").contains("device_id"));
    assert!(read("identities.json").contains("sensor"));
    assert!(read("deployment-status.json").starts_with('{'));
    assert!(read("modules/sensor/exits.json").starts_with('['));
    // Everything asked for came: nothing left out.
    let index = read("INDEX.txt");
    assert!(!index.contains("not included"), "{index}");
    // Its directories are private too.
    for d in [out.clone(), out.join("modules"), out.join("modules/sensor")] {
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&d).unwrap().permissions());
        assert_eq!(mode & 0o077, 0, "{} is reachable by others", d.display());
    }
    // Nothing secret anywhere: no module secret, no key, no state file.
    let key_files: Vec<Vec<u8>> = walk(&s.state())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/hsm/"))
        .filter_map(|p| std::fs::read(p).ok())
        .filter(|b| b.len() >= 16)
        .collect();
    assert!(!key_files.is_empty(), "the soft keys are in the state dir");
    for f in walk(&out) {
        let bytes = std::fs::read(&f).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("hunter2"), "{}", f.display());
        assert!(!text.contains("PRIVATE KEY"), "{}", f.display());
        for k in &key_files {
            assert!(
                !bytes.windows(k.len()).any(|w| w == k.as_slice()),
                "{} holds a key file's bytes",
                f.display()
            );
        }
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&f).unwrap().permissions());
        assert_eq!(mode & 0o077, 0, "{} is readable by others", f.display());
    }
    // An existing directory is not written into.
    let o = s
        .edgeward()
        .args(["support-bundle", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_status(&o, 2);
    assert!(stderr(&o).contains("does not exist yet"), "{}", stderr(&o));
    let (status, _, _) = d.terminate();
    assert!(status.success());

    // Without a daemon: the records, read-only.
    let offline = s.path().join("offline");
    let o = s
        .edgeward()
        .args(["support-bundle", "--out"])
        .arg(&offline)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_status(&o, 0);
    assert!(
        std::fs::read_to_string(offline.join("modules.json"))
            .unwrap()
            .contains("\"sensor\"")
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The journal's native fields of one datagram.
fn journal_fields(d: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    let mut rest = d;
    while !rest.is_empty() {
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            break;
        };
        let line = &rest[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            m.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            rest = &rest[nl + 1..];
        } else {
            // NAME\n, a u64 LE length, the value, \n.
            let name = String::from_utf8_lossy(line).into_owned();
            let after = &rest[nl + 1..];
            let len = u64::from_le_bytes(after[..8].try_into().unwrap()) as usize;
            m.insert(
                name,
                String::from_utf8_lossy(&after[8..8 + len]).into_owned(),
            );
            rest = &after[8 + len + 1..];
        }
    }
    m
}

/// `edgeward daemon --config cfg` as journald starts a unit's process: its
/// standard error the journal stream (a pipe here, named by
/// `JOURNAL_STREAM`), the native socket the returned one (30 s per read).
fn daemon_under_journald(
    s: &Scratch,
    cfg: &std::path::Path,
) -> (
    std::os::unix::net::UnixDatagram,
    std::io::PipeReader,
    std::process::Child,
) {
    let journal_path = s.path().join("journal.sock");
    let journal = std::os::unix::net::UnixDatagram::bind(&journal_path).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    let st = rustix::fs::fstat(&writer).unwrap();
    let child = s
        .edgeward()
        .arg("daemon")
        .arg("--config")
        .arg(cfg)
        .env("EDGEWARD_LOG", "info")
        .env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino))
        .env("EDGEWARD_JOURNAL_SOCKET", &journal_path)
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .spawn()
        .unwrap();
    (journal, reader, child)
}

/// The private key daemon `edgeward daemon` starts for a token: under
/// journald its events reach the journal as fields of their own (its
/// identifier), though its standard error is a pipe the runtime reads.
#[test]
fn under_journald_the_private_key_daemons_events_carry_their_fields() {
    let s = Scratch::new();
    let token = edgeward_tests::fixtures::SoftHsmToken::new();
    let cfg = s.write("config.toml", &token.hsm_toml());
    let (journal, mut reader, mut child) = daemon_under_journald(&s, &cfg);
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(60);
    // The key daemon's readiness, then the runtime's identity through it
    // (by then the runtime honours SIGTERM: stopped below, it exits 0).
    let mut ready = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "no event from the private key daemon: {ready:?}"
        );
        let n = journal.recv(&mut buf).unwrap();
        let f = journal_fields(&buf[..n]);
        let event = f.get("EVENT").cloned().unwrap_or_default();
        if f["SYSLOG_IDENTIFIER"] == "edgeward-keyd" && event == "key daemon ready" {
            ready = Some(f);
        } else if f["SYSLOG_IDENTIFIER"] == "edgeward" && event == "workload identity ready" {
            break;
        }
    }
    let ready = ready.expect("the key daemon's readiness before the runtime's identity");
    assert_eq!(ready["PRIORITY"], "6", "{ready:?}");
    assert_eq!(ready["BACKEND"], "pkcs11", "{ready:?}");
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut reader, &mut text).unwrap();
    assert!(status.success(), "{status}: {text}");
}

/// Under journald with its native socket, each event is a datagram of
/// fields: priority, identifier, the message, and the event's own fields
/// by name (`MODULE`, `DIGEST`), so `journalctl MODULE=sensor` finds a
/// module's events; nothing is left on standard error.
#[test]
fn under_journald_events_carry_their_fields() {
    let s = Scratch::new();
    let sensor = guests::TEMPERATURE_SENSOR;
    let digest = sha256sum(sensor);
    let cfg = s.write(
        "config.toml",
        &format!(
            "[[module]]\nname = \"sensor\"\nfile = \"{sensor}\"\ndigest = \"{digest}\"\nenv = {{ INTERVAL_MS = \"20\", SENSOR_ID = \"demo\" }}\n"
        ),
    );
    let (journal, mut reader, mut child) = daemon_under_journald(&s, &cfg);
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(60);
    let loaded = loop {
        assert!(Instant::now() < deadline, "no event for the sensor's load");
        let n = journal.recv(&mut buf).unwrap();
        let f = journal_fields(&buf[..n]);
        assert_eq!(f["SYSLOG_IDENTIFIER"], "edgeward", "{f:?}");
        assert!(
            f.contains_key("PRIORITY") && f.contains_key("MESSAGE"),
            "{f:?}"
        );
        if f.get("EVENT").map(String::as_str) == Some("module measured and loaded") {
            break f;
        }
    };
    assert_eq!(loaded["MODULE"], "sensor", "{loaded:?}");
    assert_eq!(loaded["DIGEST"], digest, "{loaded:?}");
    assert_eq!(loaded["PRIORITY"], "6");
    assert!(loaded["MESSAGE"].contains("module=sensor"), "{loaded:?}");
    assert!(
        !loaded["MESSAGE"].starts_with("20"),
        "no timestamp: {loaded:?}"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let mut text = String::new();
    std::io::Read::read_to_string(&mut reader, &mut text).unwrap();
    assert!(
        !text.contains("INFO"),
        "the events went to the journal, not the stream: {text}"
    );
}
