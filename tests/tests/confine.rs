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
}

#[test]
fn the_daemon_confines_itself_before_modules_and_an_escape_is_refused() {
    let s = Scratch::new();
    let out = s.path().join("escape");
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
    assert_confined(&report(&out));
    d.pump();
    let (exit, _, err) = d.terminate();
    assert!(exit.success(), "{err:?}");
    assert!(
        !err.iter().any(|l| l.contains("WITHOUT the seccomp filter")),
        "{err:?}"
    );
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
