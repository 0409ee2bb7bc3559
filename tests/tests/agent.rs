//! The agent: the one module linked with `edgeward:host/management`. The
//! sample agent reconciles a manifest from its config directory (add,
//! update keeping the registration, removal, an operator's name refused);
//! no other component may import the interface; a hostile agent's calls
//! are refused by name; a change to its directory wakes it without polling.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;

const AGENT: &str = guests::EDGE_AGENT;
const SENSOR: &str = guests::TEMPERATURE_SENSOR;

/// The scratch's agent config directory, created.
fn config_dir(s: &Scratch) -> PathBuf {
    let d = s.path().join("agent-config");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn agent_config(file: &str, dir: &Path, args: &[&str]) -> String {
    format!(
        "[agent]\nfile = \"{file}\"\ndigest = \"{}\"\nconfig_dir = \"{}\"\nargs = {args:?}\n",
        sha256sum(file),
        dir.display()
    )
}

/// Replaces `name` in `dir` as editors do: written aside, renamed over.
fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// `edgeward module ARGS` against the scratch's daemon.
fn module(s: &Scratch, args: &[&str]) -> std::process::Output {
    s.edgeward().arg("module").args(args).output().unwrap()
}

/// A daemon on `config`, once its socket answers.
fn start(s: &Scratch, config: &str) -> Daemon {
    let d = Daemon::start(s, config);
    wait_for_socket(s);
    d
}

fn modules(s: &Scratch) -> Vec<serde_json::Value> {
    let o = module(s, &["list", "--json"]);
    assert_status(&o, 0);
    serde_json::from_str::<serde_json::Value>(&stdout(&o))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// `name`'s "state/origin", or "absent".
fn state_of(s: &Scratch, name: &str) -> String {
    modules(s)
        .iter()
        .find(|m| m["name"] == name)
        .map(|m| {
            format!(
                "{}/{}",
                m["state"].as_str().unwrap(),
                m["origin"].as_str().unwrap()
            )
        })
        .unwrap_or_else(|| "absent".into())
}

#[track_caller]
fn wait_until(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn logs(s: &Scratch, name: &str) -> String {
    stdout(&module(s, &["logs", name, "--no-timestamps"]))
}

fn generation(s: &Scratch, name: &str) -> String {
    let o = module(s, &["show", name]);
    assert_status(&o, 0);
    let sock = s.socket();
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    use std::io::{Read, Write};
    write!(
        c,
        "GET /v1/identities HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .map(|i| i["generation_id"].as_str().unwrap().to_owned())
        .unwrap()
}

fn manifest(version: u32, modules: &[(&str, &str)]) -> String {
    let mut m = format!("version = \"{version}\"\n");
    for (name, id) in modules {
        m.push_str(&format!(
            "\n[[module]]\nname = \"{name}\"\nfile = \"sensor.wasm\"\nsettings = {{ sensor_id = \"{id}\", interval_ms = \"100\" }}\n"
        ));
    }
    m
}

#[test]
fn the_agent_reconciles_its_manifest() {
    let s = Scratch::new();
    let dir = config_dir(&s);
    std::fs::copy(SENSOR, dir.join("sensor.wasm")).unwrap();
    write_atomically(&dir, "deployment.toml", &manifest(1, &[("s1", "one")]));
    let d = start(&s, &agent_config(AGENT, &dir, &[]));
    wait_until("the agent and s1 to run", || {
        state_of(&s, "agent") == "running/config" && state_of(&s, "s1") == "running/agent"
    });
    wait_until("s1's first readings", || logs(&s, "s1").contains("\"one\""));
    let first = generation(&s, "s1");

    // An update (s1's settings) and an addition.
    write_atomically(
        &dir,
        "deployment.toml",
        &manifest(2, &[("s1", "uno"), ("s2", "two")]),
    );
    wait_until("s2 to run", || state_of(&s, "s2") == "running/agent");
    wait_until("s1 to read its new settings", || {
        logs(&s, "s1").contains("\"uno\"")
    });
    assert_eq!(
        generation(&s, "s1"),
        first,
        "an update keeps the registration"
    );

    // A removal.
    write_atomically(&dir, "deployment.toml", &manifest(3, &[("s2", "two")]));
    wait_until("s1 to be removed", || state_of(&s, "s1") == "absent");
    assert_eq!(state_of(&s, "s2"), "running/agent");

    // The operator's module is not the agent's to take.
    let o = module(&s, &["add", "op", SENSOR]);
    assert_status(&o, 0);
    write_atomically(
        &dir,
        "deployment.toml",
        &manifest(4, &[("s2", "two"), ("op", "mine")]),
    );
    wait_until("the agent to report the refusal", || {
        logs(&s, "agent").contains("\"version\":\"4\"")
    });
    let agent_log = logs(&s, "agent");
    let v4 = agent_log
        .lines()
        .find(|l| l.contains("\"version\":\"4\""))
        .unwrap();
    assert!(
        v4.contains("\"refused\"") && v4.contains("not permitted") && v4.contains("op"),
        "{v4}"
    );
    assert_eq!(state_of(&s, "op"), "running/operator");
    for (version, what) in [
        ("1", "\"add\":[\"s1\"]"),
        ("2", "\"update\":[\"s1\"]"),
        ("3", "\"remove\":[\"s1\"]"),
    ] {
        assert!(
            agent_log
                .lines()
                .any(|l| l.contains(&format!("\"version\":\"{version}\"")) && l.contains(what)),
            "version {version}: {what} in\n{agent_log}"
        );
    }

    // The agent cannot grant a module the metadata service, a 0.0.0.0/0
    // server name or a 1 TiB disk budget: the config file's [grants] says
    // no (here: its defaults).
    for (version, grant, ceiling) in [
        (
            5,
            "allow_outbound = [\"169.254.169.254:80\"]",
            "[grants] outbound",
        ),
        (6, "server_names = [\"0.0.0.0/0\"]", "[grants] server_names"),
        (7, "max_disk = \"1024GiB\"", "[grants] max_disk"),
    ] {
        let mut m = manifest(version, &[("s2", "two")]);
        m.push_str(grant);
        m.push('\n');
        write_atomically(&dir, "deployment.toml", &m);
        let tag = format!("\"version\":\"{version}\"");
        wait_until("the agent to report the refusal", || {
            logs(&s, "agent").contains(&tag)
        });
        let agent_log = logs(&s, "agent");
        let line = agent_log.lines().find(|l| l.contains(&tag)).unwrap();
        assert!(
            line.contains("\"refused\"") && line.contains(ceiling),
            "{line}"
        );
    }
    write_atomically(
        &dir,
        "deployment.toml",
        &manifest(4, &[("s2", "two"), ("op", "mine")]),
    );

    // The agent always runs: not the operator's to stop or remove.
    for action in ["stop", "remove"] {
        let o = module(&s, &[action, "agent"]);
        assert_status(&o, 1);
        assert!(
            stderr(&o).contains("always runs") || stderr(&o).contains("config file"),
            "{action}: {}",
            stderr(&o)
        );
    }
    let _ = d.terminate();

    // Restarted, the daemon runs what the agent deployed from the registry,
    // and the agent finds nothing to change.
    let d = start(&s, &agent_config(AGENT, &dir, &[]));
    wait_until("s2 to run again", || state_of(&s, "s2") == "running/agent");
    wait_until("the agent to reconcile again", || {
        logs(&s, "agent")
            .lines()
            .filter(|l| l.contains("\"version\":\"4\""))
            .count()
            >= 2
    });
    let _ = d.terminate();
}

#[test]
fn only_the_agent_is_linked_with_management() {
    let s = Scratch::new();
    // edgeward run: refused before it runs.
    let o = s.run(AGENT, &[], &[]);
    assert_status(&o, 3);
    assert!(
        stderr(&o).contains("imports edgeward:host/management@0.1.0, which only the agent"),
        "{}",
        stderr(&o)
    );
    // In a daemon: as a [[module]], through the API, and as an [agent]
    // whose pinned digest it does not match.
    let dir = config_dir(&s);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let config = format!(
        "[[module]]\nname = \"impostor\"\nfile = \"{AGENT}\"\ndigest = \"{}\"\n\n[agent]\nfile = \"{AGENT}\"\ndigest = \"{wrong}\"\nconfig_dir = \"{}\"\n",
        sha256sum(AGENT),
        dir.display()
    );
    let d = start(&s, &config);
    wait_until("both to be refused", || {
        state_of(&s, "impostor") == "refused/config" && state_of(&s, "agent") == "refused/config"
    });
    let list = modules(&s);
    let reason = |name: &str| {
        list.iter().find(|m| m["name"] == name).unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(
        reason("impostor").contains("only the agent"),
        "{}",
        reason("impostor")
    );
    assert!(reason("agent").contains(&wrong), "{}", reason("agent"));
    let o = module(&s, &["add", "another", AGENT]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("only the agent"), "{}", stderr(&o));
    assert_eq!(state_of(&s, "another"), "absent");
    let _ = d.terminate();
}

/// What a hostile agent tries is refused, each by name; what it may do
/// (list, wait) works.
#[test]
fn a_hostile_agents_calls_are_refused() {
    let s = Scratch::new();
    let dir = config_dir(&s);
    let probe = guests::AGENT_PROBE;
    let d = start(&s, &agent_config(probe, &dir, &["hostile", "op"]));
    wait_until("the agent to run", || state_of(&s, "agent") != "absent");
    let o = module(&s, &["add", "op", SENSOR]);
    assert_status(&o, 0);
    // The probe's first run may have raced the add; a later one, whole,
    // sees op from its start.
    let whole_run = |log: &str| -> Option<Vec<String>> {
        let run: Vec<String> = log
            .lines()
            .skip_while(|l| !l.contains("list: ok 2"))
            .map(str::to_owned)
            .collect();
        let end = run.iter().position(|l| l.contains("done"))?;
        Some(run[..end].to_vec())
    };
    wait_until("a whole run of the probe that saw op", || {
        whole_run(&logs(&s, "agent")).is_some()
    });
    let run = whole_run(&logs(&s, "agent")).unwrap();
    let said = |call: &str| {
        run.iter()
            .find(|l| l.contains(&format!("{call}: ")))
            .unwrap_or_else(|| panic!("{call} not reported in {run:?}"))
            .to_string()
    };
    for (call, want) in [
        (
            "stop-operator",
            "err not permitted: module \"op\" belongs to the operator, not the agent",
        ),
        (
            "remove-operator",
            "err not permitted: module \"op\" belongs to the operator",
        ),
        (
            "start-operator",
            "err not permitted: module \"op\" belongs to the operator",
        ),
        (
            "remove-self",
            "err not permitted: module \"agent\" belongs to the config file",
        ),
        ("stop-self", "err not permitted"),
        ("start-nobody", "err invalid argument: no module \"nobody\""),
        ("bad-name", "err invalid argument: invalid module name"),
        (
            "exits-bad-name",
            "err invalid argument: invalid module name",
        ),
        ("bad-digest", "err invalid argument: digest"),
        ("bad-json", "err invalid argument: deployment:"),
        (
            "host-path",
            "err invalid argument: file: the management API does not read host paths",
        ),
        (
            "host-dir",
            "err invalid argument: dirs: host directories are granted in the config file only",
        ),
        ("not-stored", "err invalid argument: component sha256:0000"),
        (
            "claim-operator",
            "err not permitted: the deployment names modules another origin owns: op",
        ),
        (
            "not-a-component",
            "err invalid argument: deployment \"1\": adding \"junk\"",
        ),
        ("wait-too-long", "err invalid argument: timeout-ms"),
        ("wait-briefly", "ok false"),
    ] {
        let line = said(call);
        assert!(line.contains(want), "{call}: want {want:?}, got {line:?}");
    }
    assert_eq!(state_of(&s, "op"), "running/operator");
    assert_eq!(state_of(&s, "junk"), "absent");
    let _ = d.terminate();
}

/// A change to the config directory wakes the agent's wait at once (the
/// wait is 60 s long: an answer within seconds is the watch, not a poll).
#[test]
fn a_change_wakes_the_agent() {
    let s = Scratch::new();
    let dir = config_dir(&s);
    let probe = guests::AGENT_PROBE;
    let mut d = Daemon::start(&s, &agent_config(probe, &dir, &["watch"]));
    d.wait_for("the probe to watch", |out, _| {
        out.iter().any(|l| l.contains("watching"))
    });
    let changed = |out: &[String]| out.iter().filter(|l| l.contains("changed ")).count();
    for (i, change) in ["create", "rewrite", "rename", "delete"].iter().enumerate() {
        d.pump();
        let before = changed(&d.seen_out);
        let t = Instant::now();
        match *change {
            "create" | "rewrite" => std::fs::write(dir.join("m.toml"), format!("{i}")).unwrap(),
            "rename" => write_atomically(&dir, "m.toml", "renamed"),
            _ => std::fs::remove_file(dir.join("m.toml")).unwrap(),
        }
        d.wait_for(change, |out, _| changed(out) > before);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{change}: woke after {:?}",
            t.elapsed()
        );
    }
    let _ = d.terminate();
}

/// A module of the agent's name that an operator added earlier is not the
/// agent: the configured agent is refused as a conflict, and the
/// operator's module runs unlinked.
#[test]
fn a_name_clash_does_not_make_an_operators_module_the_agent() {
    let s = Scratch::new();
    let dir = config_dir(&s);
    let d = start(&s, "");
    let o = module(
        &s,
        &["add", "agent", guests::SANDBOX_PROBE, "--arg", "tick"],
    );
    assert_status(&o, 0);
    wait_until("the operator's module to run", || {
        state_of(&s, "agent") == "running/operator"
    });
    let _ = d.terminate();
    let mut d = start(&s, &agent_config(AGENT, &dir, &[]));
    d.wait_for("the conflict", |_, err| {
        err.iter().any(|l| l.contains("configured module refused"))
    });
    wait_until("the operator's module to run again", || {
        state_of(&s, "agent") == "running/operator"
    });
    let (_, out, _) = d.terminate();
    assert!(
        !out.iter().any(|l| l.contains("\"agent\":")),
        "the agent ran: {out:?}"
    );
}

/// A device whose `[signatures] manifests` is `require`: the agent's
/// unsigned manifest is refused (and reported), the same manifest signed
/// (`deployment.toml.sig` beside it) is applied.
#[test]
fn a_device_requiring_signed_manifests_refuses_the_agents_unsigned_one() {
    let s = Scratch::new();
    let dir = config_dir(&s);
    std::fs::copy(SENSOR, dir.join("sensor.wasm")).unwrap();
    let o = s
        .edgeward()
        .args(["keygen", "--out"])
        .arg(s.path().join("ops"))
        .output()
        .unwrap();
    assert_status(&o, 0);
    let text = format!(
        "version = \"1\"\ntarget = \"fleet\"\nexpires = \"2099-01-01T00:00:00Z\"\n[[module]]\nname = \"s1\"\nfile = \"sensor.wasm\"\ndigest = \"{}\"\nsettings = {{ sensor_id = \"one\", interval_ms = \"100\" }}\n",
        sha256sum(SENSOR)
    );
    write_atomically(&dir, "deployment.toml", &text);
    let config = format!(
        "[signatures]\nmanifests = \"require\"\ndeployment_keys = [\"{}\"]\n\n{}",
        s.path().join("ops.pub").display(),
        agent_config(AGENT, &dir, &[])
    );
    let d = start(&s, &config);
    wait_until("the agent to report the refusal", || {
        logs(&s, "agent").contains("manifest is refused")
    });
    assert!(
        logs(&s, "agent").contains("no signature"),
        "{}",
        logs(&s, "agent")
    );
    assert_eq!(state_of(&s, "s1"), "absent");
    let o = s
        .edgeward()
        .arg("sign")
        .arg("--key")
        .arg(s.path().join("ops.key"))
        .arg(dir.join("deployment.toml"))
        .output()
        .unwrap();
    assert_status(&o, 0);
    wait_until("s1 to run", || state_of(&s, "s1") == "running/agent");
    let _ = d.terminate();
}
