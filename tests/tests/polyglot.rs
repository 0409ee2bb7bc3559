//! Modules written in Python (componentize-py) and JavaScript
//! (componentize-js), built by `tests/build.rs` against `wit/`'s
//! `edgeward:host/command` world with the toolchains `scripts/setup`
//! installs: their identities and errors through the WIT, checked as the
//! Rust probe's are, under `edgeward run` and in the daemon; hostile ones
//! contained; limits refused by name.

#![allow(clippy::unwrap_used)]

mod common;

use common::daemon::*;
use common::svid::*;
use common::*;

const PROBES: [(&str, &str); 2] = [
    ("py-probe", guests::PY_PROBE),
    ("js-probe", guests::JS_PROBE),
];

fn probe(s: &Scratch, file: &str, args: &[&str]) -> String {
    let o = s.run(file, &[], args);
    assert_status(&o, 0);
    stdout(&o)
}

#[test]
fn identities_and_errors_reach_python_and_javascript_modules() {
    for (name, file) in PROBES {
        let s = Scratch::new();
        s.precompiled(&[file]);
        let out = probe(&s, file, &["whoami"]);
        assert_eq!(line_value(&out, "module_name="), name);
        assert_eq!(line_value(&out, "digest="), sha256sum(file));
        let spiffe_id = line_value(&out, "spiffe_id=").to_owned();
        assert!(
            spiffe_id.starts_with("spiffe://edgeward.local/device/")
                && spiffe_id.ends_with(&format!("/module/{name}")),
            "{spiffe_id}"
        );

        // The X509-SVID, by openssl and the spiffe crate.
        let out = probe(&s, file, &["cert"]);
        check_svid(&s, &out, &bundle(&s, &[], "pem"), &spiffe_id);

        // A token, by jsonwebtoken and the spiffe crate; then validated back
        // through the module.
        let out = probe(&s, file, &["token", "svc-a", "svc-b", "60"]);
        let token = line_value(&out, "token ok ").to_owned();
        let claims = check_token(&token, &bundle(&s, &[], "jwks"), "svc-b", "edgeward.local");
        assert_eq!(claims["sub"], spiffe_id.as_str());
        assert_eq!(claims["digest"], sha256sum(file));
        let out = probe(&s, file, &["validate", &token, "svc-a"]);
        assert_eq!(
            line_value(&out, "validate ok "),
            format!("{spiffe_id} svc-a,svc-b {}", sha256sum(file))
        );
        let out = probe(&s, file, &["validate", &token, "svc-c"]);
        assert!(
            line_value(&out, "validate err ").starts_with("invalid-argument: "),
            "{out}"
        );

        // A signature that the certificate verifies.
        let out = probe(&s, file, &["sign", "reading-1"]);
        let sig = unhex(line_value(&out, "sign ok "));
        assert!(verifies(&pem_blocks(&out)[0], b"reading-1", &sig), "{out}");

        // Sealed data: opens with its associated data, not with another.
        let out = probe(&s, file, &["seal", "the secret", "ctx", "other"]);
        assert!(line_value(&out, "encrypt ok ").len() > 2 * 28, "{out}");
        assert_eq!(line_value(&out, "decrypt ok "), "the secret");
        assert!(
            line_value(&out, "decrypt-other err ").starts_with("invalid-argument: "),
            "{out}"
        );

        // What its registration does not allow: a WIT error naming it.
        let out = probe(
            &s,
            file,
            &["server-cert", "svc.example.com", "svc.example.com"],
        );
        let refused = line_value(&out, "server-cert err ");
        assert!(
            refused.starts_with("not-permitted: ") && refused.contains("svc.example.com"),
            "{refused}"
        );

        // Bad input: every case a WIT error, none a trap.
        let out = probe(&s, file, &["bad-input"]);
        assert_bad_input(&out, &[]);
    }
}

/// The sensor sample in each language: every reading signed and carrying
/// a token, both verified from the outside; settings win over the
/// environment; a bad one is named.
#[test]
fn sensors_in_every_language_sign_their_readings() {
    for (name, file) in [
        ("temperature-sensor", guests::TEMPERATURE_SENSOR),
        ("py-sensor", guests::PY_SENSOR),
        ("js-sensor", guests::JS_SENSOR),
    ] {
        let s = Scratch::new();
        s.precompiled(&[file]);
        let o = s.run(
            file,
            &[
                "--env",
                "COUNT=3",
                "--env",
                "INTERVAL_MS=5",
                "--env",
                "TOKEN_AUDIENCE=ingest",
                // A setting wins over the environment.
                "--env",
                "SENSOR_ID=from-env",
                "--setting",
                "sensor_id=from-settings",
            ],
            &[],
        );
        assert_status(&o, 0);
        let out = stdout(&o);
        assert_eq!(check_readings(&s, &out, name, "ingest"), 3, "{name}");
        assert!(
            out.lines()
                .all(|l| l.starts_with("{\"sensor\":\"from-settings\",")),
            "{out}"
        );
        // A bad setting is named, and the module fails.
        let o = s.run(file, &["--env", "COUNT=x"], &[]);
        assert_ne!(o.status.code(), Some(0), "{name}");
        assert!(
            stderr(&o).contains("COUNT=\"x\"") || stderr(&o).contains("COUNT='x'"),
            "{name}: {}",
            stderr(&o)
        );
    }
}

/// Components that need more core instances than allowed are refused
/// before they run, naming the limit and the setting that raises it; the
/// defaults fit every toolchain.
#[test]
fn instance_limits_are_refused_by_name() {
    for (name, file, fits) in [
        ("py-probe", guests::PY_PROBE, "16"),
        ("js-probe", guests::JS_PROBE, "4"),
    ] {
        let s = Scratch::new();
        s.precompiled(&[file]);
        let o = s.run(file, &["--max-instances", "2"], &["whoami"]);
        assert_status(&o, 3);
        let err = stderr(&o);
        assert!(
            err.contains("max_instances") && err.contains("--max-instances"),
            "{name}: {err}"
        );
        // The entry compiled under the defaults is kept, not thrown away.
        assert!(probe(&s, file, &["whoami"]).contains(&format!("module_name={name}")));
        let o = s.run(file, &["--max-instances", fits], &["whoami"]);
        assert_status(&o, 0);
    }
}

/// A Python module that overflows its memory traps with the limit named,
/// the interpreter's own traceback, and the guest's frames named in the
/// backtrace (componentize-py keeps the name section).
#[test]
fn python_traps_name_the_limit_and_the_guests_frames() {
    let s = Scratch::new();
    s.precompiled(&[guests::PY_PROBE]);
    let o = s.run(guests::PY_PROBE, &["--max-memory", "48MiB"], &["bomb"]);
    assert_status(&o, 134);
    let err = stderr(&o);
    assert!(
        err.contains("memory limit exceeded") && err.contains("max_memory"),
        "{err}"
    );
    assert!(err.contains("MemoryError"), "{err}");
    assert!(err.contains("probe.py\", line"), "{err}");
    assert!(err.contains("componentize_py_runtime.wasm!"), "{err}");
    assert!(err.contains("wasi:cli/run@0.2.12#run"), "{err}");
    let o = s.run(guests::PY_PROBE, &[], &["recurse"]);
    assert_status(&o, 134);
    let err = stderr(&o);
    assert!(err.contains("libpython3."), "{err}");
    assert!(err.contains("!_Py"), "{err}");
}

/// In the daemon, beside a Rust neighbour on a 100 ms schedule: the Python
/// and JavaScript sensors' readings verify; bad input gets WIT errors;
/// memory bombs and spinners in both languages end with the right outcome;
/// a Python module held to 8 core instances fails to start, naming the
/// setting; the neighbour keeps its schedule.
#[test]
fn python_and_javascript_modules_in_the_daemon() {
    let s = Scratch::new();
    let (py, js) = (guests::PY_PROBE, guests::JS_PROBE);
    s.precompiled(&[py, js, guests::PY_SENSOR, guests::JS_SENSOR]);
    let module = |name: &str, file: &str, extra: &str| {
        format!(
            "[[module]]\nname = \"{name}\"\nfile = \"{file}\"\ndigest = \"{}\"\nrestart = \"never\"\n{extra}\n",
            sha256sum(file)
        )
    };
    let sensor_env = "env = { COUNT = \"3\", INTERVAL_MS = \"50\", TOKEN_AUDIENCE = \"ingest\" }";
    let mut config = format!(
        "[[module]]\nname = \"neighbour\"\nfile = \"{sensor}\"\ndigest = \"{}\"\nenv = {{ INTERVAL_MS = \"100\" }}\n\n",
        sha256sum(guests::TEMPERATURE_SENSOR),
        sensor = guests::TEMPERATURE_SENSOR,
    );
    for m in [
        module("py-sensor", guests::PY_SENSOR, sensor_env),
        module("js-sensor", guests::JS_SENSOR, sensor_env),
        module("py-bomb", py, "args = [\"bomb\"]"),
        module("js-bomb", js, "args = [\"bomb\"]"),
        module("py-spinner", py, "args = [\"spin\"]\ntimeout = \"2s\""),
        module("js-spinner", js, "args = [\"spin\"]\ntimeout = \"2s\""),
        module("py-small", py, "args = [\"whoami\"]\nmax_instances = 8"),
        module("py-errors", py, "args = [\"bad-input\"]"),
        module("js-errors", js, "args = [\"bad-input\"]"),
    ] {
        config.push_str(&m);
    }
    let mut d = Daemon::start(&s, &config);
    d.wait_for("the spinners' deadlines", |_, err| {
        count(err, "deadline of 2s passed") >= 2
    });
    d.wait_for("25 neighbour readings", |out, _| {
        count(out, "neighbour | ") >= 25
    });
    exits_recorded(
        &s,
        &[
            ("py-sensor", "success", None),
            ("js-sensor", "success", None),
            ("py-bomb", "trap", Some("out of memory")),
            ("js-bomb", "failure", None),
            ("py-spinner", "timeout", Some("deadline")),
            ("js-spinner", "timeout", Some("deadline")),
            ("py-errors", "success", None),
            ("js-errors", "success", None),
            ("py-small", "setup-failed", Some("max_instances")),
        ],
    );
    let statuses = status_json(&s);
    let small = &status_of(&statuses, "py-small")["last_exit"];
    assert_eq!(small["outcome"], "setup-failed", "{small}");
    let reason = small["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("more core instances than its max_instances (8)")
            && reason.contains("module_instances"),
        "{small}"
    );
    neighbour_kept_its_schedule(&s, "polyglot suite");
    let (status, out, err) = d.terminate();
    assert!(status.success(), "daemon exit {status}: {}", err.join("\n"));
    let output = |name: &str| -> String {
        let prefix = format!("{name} | ");
        out.iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    for name in ["py-sensor", "js-sensor"] {
        assert_eq!(
            check_readings(&s, &output(name), name, "ingest"),
            3,
            "{name}"
        );
    }
    // Bad input in the daemon: WIT errors, as under `edgeward run`.
    for name in ["py-errors", "js-errors"] {
        assert_bad_input(&output(name), &[]);
    }
}
