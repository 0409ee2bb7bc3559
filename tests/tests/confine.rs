//! The runtime confines itself (`no_new_privs`, the seccomp filter) before
//! it reads any module, in `edgeward daemon` and in `edgeward run`, and
//! native code that escaped a module into its process cannot make the
//! system calls the filter denies (a simulated escape: the test build runs
//! each one inside the confined process).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::daemon::*;
use common::*;

const EPERM: i32 = 1;
const ENOSYS: i32 = 38;
const EACCES: i32 = 13;

/// `NAME VALUE` lines of an escape report.
fn report(path: &std::path::Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no escape report at {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Every denied call, the namespace-creating clone and clone3 were refused
/// by the filter, threads still start, and the status says so.
fn assert_confined(r: &BTreeMap<String, String>) {
    for d in edgeward::confine::DENIED {
        assert_eq!(
            r.get(d.name).map(String::as_str),
            Some(EPERM.to_string().as_str()),
            "{} was not refused with EPERM: {r:?}",
            d.name
        );
    }
    assert_eq!(r["clone-newuser"], EPERM.to_string(), "{r:?}");
    assert_eq!(r["clone3"], ENOSYS.to_string(), "{r:?}");
    assert_eq!(r["thread"], "7", "a thread no longer starts: {r:?}");
    // The x32 ABI's numbers do not slip past the filter.
    assert_eq!(r["x32"], EPERM.to_string(), "{r:?}");
    assert_eq!(r["dumpable"], "0", "still dumpable: {r:?}");
}

fn status_lines(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("status "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn unconfined_none_of_the_attempts_gets_eperm() {
    // The baseline that makes the other tests mean something: the same
    // calls with the same arguments, before any filter.
    let s = Scratch::new();
    let out = s.path().join("baseline");
    let o = std::process::Command::new(EDGEWARD)
        .env("EDGEWARD_TEST_ESCAPE_UNCONFINED", &out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let st = status_lines(&out);
    assert!(
        st.contains("status Seccomp: 0"),
        "the test itself runs under seccomp: {st}"
    );
    let r = report(&out);
    for d in edgeward::confine::DENIED {
        assert_ne!(
            r.get(d.name).map(String::as_str),
            Some(EPERM.to_string().as_str()),
            "{} fails with EPERM even unconfined: the escape test could not tell",
            d.name
        );
    }
    assert_ne!(r["clone-newuser"], EPERM.to_string());
    assert_ne!(r["clone3"], ENOSYS.to_string());
    for what in ["open", "create", "socket", "exec", "kill", "prlimit"] {
        assert_eq!(r[what], "0", "{what} fails unconfined: {r:?}");
    }
    for what in ["fork", "sigqueue", "x32"] {
        assert_ne!(r[what], EPERM.to_string(), "{what}: {r:?}");
    }
    assert_eq!(r["dumpable"], "1", "{r:?}");
}

#[test]
fn the_daemon_confines_itself_before_modules_and_an_escape_is_refused() {
    let s = Scratch::new();
    // In the state dir: Landlock lets the daemon write nowhere else.
    let out = s.state().join("escape");
    let sensor = guests::TEMPERATURE_SENSOR;
    let config = format!(
        r#"
[[module]]
name = "sensor"
file = "{sensor}"
digest = "{}"
env = {{ INTERVAL_MS = "20", SENSOR_ID = "confined" }}
"#,
        sha256sum(sensor)
    );
    let out_s = out.to_str().unwrap().to_owned();
    let mut d = Daemon::start_with_env(&s, &config, &[("EDGEWARD_TEST_ESCAPE", &out_s)]);
    wait_for_socket(&s);
    // The module runs under the filter.
    status_when(&s, "the sensor running", |st| {
        status_of(st, "sensor")["state"] == "running"
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let st = status_lines(&out);
    assert!(st.contains("status NoNewPrivs: 1"), "{st}");
    assert!(st.contains("status Seccomp: 2"), "{st}");
    let r = report(&out);
    assert_confined(&r);
    // Landlock: a file outside what the daemon needs neither opens nor
    // is created, root or not; sockets are still made.
    assert_eq!(r["open"], EACCES.to_string(), "{r:?}");
    assert_eq!(r["create"], EACCES.to_string(), "{r:?}");
    assert_eq!(r["socket"], "0", "{r:?}");
    // The worker's own rules are the worker's: the daemon's threads start.
    assert_ne!(r["fork"], EPERM.to_string(), "{r:?}");
    assert_eq!(r["prlimit"], "0", "{r:?}");
    d.pump();
    let (exit, _, err) = d.terminate();
    assert!(exit.success(), "{err:?}");
    assert!(
        !err.iter().any(|l| l.contains("WITHOUT the seccomp filter")),
        "{err:?}"
    );
}

#[test]
fn the_compile_worker_opens_no_file_makes_no_socket_runs_nothing() {
    // The worker as the daemon starts it (limits, stack), with the test
    // build's escape attempts after its own confinement, reported on stderr.
    let component = std::fs::File::open(guests::TEMPERATURE_SENSOR).unwrap();
    let o = std::process::Command::new(EDGEWARD)
        .args(["compile-worker", "1073741824", "60", "524288"])
        .env("EDGEWARD_TEST_ESCAPE", "-")
        .stdin(component)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.len() > 1000, "no artifact");
    let r: BTreeMap<String, String> = stderr(&o)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_confined(&r);
    for what in [
        "open", "create", "socket", "exec", "kill", "fork", "prlimit", "sigqueue",
    ] {
        assert_eq!(r[what], EPERM.to_string(), "the worker could {what}: {r:?}");
    }
    // Not even its own /proc/self/status opens.
    assert!(!stderr(&o).contains("status "), "{}", stderr(&o));
}

#[test]
fn edgeward_run_is_confined_too() {
    let s = Scratch::new();
    let out = s.path().join("escape");
    let o = s
        .edgeward()
        .env("EDGEWARD_TEST_ESCAPE", &out)
        .args(["run", guests::SANDBOX_PROBE, "--", "hello"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let st = status_lines(&out);
    assert!(st.contains("status Seccomp: 2"), "{st}");
    assert_confined(&report(&out));
}

/// A daemon whose compile worker has `runtime` limits, with a neighbour on
/// a 100 ms schedule and the Python interpreter component (18 MB of code,
/// seconds of Cranelift) to compile.
fn interpreter_against_limits(runtime: &str) -> (Scratch, Daemon) {
    let s = Scratch::new();
    let sensor = guests::TEMPERATURE_SENSOR;
    let python = guests::PY_SENSOR;
    let config = format!(
        r#"
[runtime]
{runtime}

[[module]]
name = "neighbour"
file = "{sensor}"
digest = "{}"
env = {{ INTERVAL_MS = "100", SENSOR_ID = "neighbour" }}

[[module]]
name = "interpreter"
file = "{python}"
digest = "{}"
restart = "never"
"#,
        sha256sum(sensor),
        sha256sum(python)
    );
    let d = Daemon::start(&s, &config);
    wait_for_socket(&s);
    (s, d)
}

fn refused_reason(s: &Scratch) -> String {
    let st = status_when(s, "the interpreter refused", |v| {
        status_of(v, "interpreter")["state"] == "refused"
            && status_of(v, "neighbour")["state"] == "running"
    });
    status_of(&st, "interpreter")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_compile_over_its_memory_limit_kills_only_the_worker() {
    let (s, d) = interpreter_against_limits("compile_memory = \"64MiB\"");
    let reason = refused_reason(&s);
    assert!(
        reason.contains("compile worker's memory limit (64 MiB; [runtime] compile_memory)"),
        "{reason}"
    );
    // The daemon and the neighbour go on: 3 s of its readings.
    std::thread::sleep(std::time::Duration::from_secs(3));
    neighbour_kept_its_schedule(&s, "compile over its memory");
    let (exit, _, err) = d.terminate();
    assert!(exit.success(), "{err:?}");
}

#[test]
fn a_worker_killed_from_outside_is_not_called_over_its_limit() {
    // The kernel's OOM killer or an operator: SIGKILL well inside the CPU
    // limit is reported as what it is.
    let (s, d) = interpreter_against_limits("");
    // The neighbour's own (quick) compile is done: the worker left is the
    // interpreter's.
    status_when(&s, "the neighbour running", |v| {
        status_of(v, "neighbour")["state"] == "running"
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let worker = loop {
        let o = std::process::Command::new("pgrep")
            .args(["-f", "-P", &d.child.id().to_string(), "compile-worker"])
            .output()
            .unwrap();
        if let Some(pid) = stdout(&o).split_whitespace().next() {
            break pid.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no compile worker");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Found right after its exec it may not have confined itself yet (it
    // does before it reads the component): give it the moment.
    let confined = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let st = loop {
        let st = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap_or_default();
        if st.contains("Seccomp:\t2") || std::time::Instant::now() > confined {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(st.contains("Seccomp:\t2"), "{st}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let o = std::process::Command::new("kill")
        .args(["-KILL", &worker])
        .output()
        .unwrap();
    assert_status(&o, 0);
    let reason = refused_reason(&s);
    assert!(reason.contains("killed (SIGKILL) after"), "{reason}");
    assert!(!reason.contains("CPU time limit"), "{reason}");
    std::thread::sleep(std::time::Duration::from_secs(3));
    neighbour_kept_its_schedule(&s, "a worker killed from outside");
    let (exit, _, err) = d.terminate();
    assert!(exit.success(), "{err:?}");
}

#[test]
fn a_compile_over_its_cpu_time_kills_only_the_worker() {
    let (s, d) = interpreter_against_limits("compile_time = \"1s\"");
    let reason = refused_reason(&s);
    assert!(
        reason.contains("compile worker's CPU time limit (1 s; [runtime] compile_time)"),
        "{reason}"
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    neighbour_kept_its_schedule(&s, "compile over its CPU time");
    let (exit, _, err) = d.terminate();
    assert!(exit.success(), "{err:?}");
}
