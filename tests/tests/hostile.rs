//! The hostile-module suite: each misbehaving module runs in one daemon next
//! to a well-behaved neighbour that must keep its schedule. For every one the
//! daemon stays up, the neighbour keeps producing on time, and the recorded
//! reason is the right one.

#![allow(clippy::unwrap_used)]

mod common;

use common::daemon::*;
use common::*;

/// Milliseconds since the epoch of a log line's RFC 3339 timestamp.
fn stamp_ms(line: &str) -> Option<i64> {
    let t = line.split(' ').next()?;
    let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, ms) = time.split_once('.')?;
    let h: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // Same day is enough for gaps within one test run (midnight aside).
    let _ = d;
    Some(((h[0] * 60 + h[1]) * 60 + h[2]) * 1000 + ms.parse::<i64>().ok()?)
}

#[test]
fn hostile_modules_cannot_hurt_the_daemon_or_their_neighbour() {
    let s = Scratch::new();
    let probe = guests::SANDBOX_PROBE;
    let sensor = guests::TEMPERATURE_SENSOR;
    let pd = sha256sum(probe);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr").to_string();
    // The one destination a module may reach.
    let open = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let open_addr = open.local_addr().expect("addr").to_string();
    let reached = std::thread::spawn(move || {
        use std::io::Read;
        let (mut conn, _) = open.accept().expect("accept");
        let mut got = String::new();
        conn.read_to_string(&mut got).expect("read");
        got
    });
    let hostile = |name: &str, args: &str, extra: &str| {
        format!(
            "[[module]]\nname = \"{name}\"\nfile = \"{probe}\"\ndigest = \"{pd}\"\nargs = {args}\nrestart = \"never\"\n{extra}\n"
        )
    };
    let mut config = format!(
        "[[module]]\nname = \"neighbour\"\nfile = \"{sensor}\"\ndigest = \"{}\"\nenv = {{ INTERVAL_MS = \"100\" }}\n\n",
        sha256sum(sensor)
    );
    for m in [
        hostile("spinner", r#"["spin"]"#, "timeout = \"2s\""),
        hostile("spinner2", r#"["spin"]"#, "timeout = \"2s\""),
        hostile(
            "memory-bomb",
            r#"["alloc", "1000"]"#,
            "max_memory = \"16MiB\"",
        ),
        hostile("recursion", r#"["recurse"]"#, ""),
        hostile("flood", r#"["flood"]"#, ""),
        hostile("escape", r#"["read", "/data/../../../../etc/passwd"]"#, ""),
        hostile("socket", &format!(r#"["connect", "{addr}"]"#), ""),
        hostile("lookup", r#"["lookup", "example.com"]"#, ""),
        hostile(
            "binder",
            r#"["bind", "0.0.0.0:0"]"#,
            &format!("allow_outbound = [\"{open_addr}\"]"),
        ),
        hostile(
            "allowed",
            &format!(r#"["connect", "{open_addr}"]"#),
            &format!("allow_outbound = [\"{open_addr}\"]"),
        ),
        hostile(
            "denied-next-to-allowed",
            &format!(r#"["connect", "{addr}"]"#),
            &format!("allow_outbound = [\"{open_addr}\"]"),
        ),
        hostile("big-arg", r#"["big-path", "20"]"#, ""),
        hostile("bad-exit", r#"["exit", "3"]"#, ""),
        hostile("panic", r#"["panic"]"#, ""),
    ] {
        config.push_str(&m);
    }
    let mut d = Daemon::start(&s, &config);
    d.wait_for("the spinners' deadlines", |_, err| {
        count(err, "deadline of 2s passed") >= 2
    });
    // ...and the neighbour has been reading for a while next to them.
    d.wait_for("25 neighbour readings", |out, _| {
        count(out, "neighbour | ") >= 25
    });

    let statuses = status_json(&s);
    let exit_of = |n: &str| {
        statuses
            .iter()
            .find(|v| v["module"] == n)
            .unwrap_or_else(|| panic!("no status for {n}"))["last_exit"]
            .clone()
    };
    let expect = |n: &str, outcome: &str, reason: Option<&str>| {
        let e = exit_of(n);
        assert_eq!(e["outcome"], outcome, "{n}: {e}");
        if let Some(r) = reason {
            assert!(
                e["reason"].as_str().unwrap_or("").contains(r),
                "{n}: {r:?} not in {e}"
            );
        }
    };
    expect("spinner", "timeout", Some("deadline"));
    expect("spinner2", "timeout", Some("deadline"));
    expect("memory-bomb", "trap", Some("out of memory"));
    expect("recursion", "trap", Some("call stack exhausted"));
    expect("panic", "trap", Some("unreachable"));
    for n in [
        "escape",
        "socket",
        "lookup",
        "binder",
        "denied-next-to-allowed",
        "big-arg",
        "bad-exit",
    ] {
        expect(n, "failure", None);
    }
    expect("allowed", "success", None);
    assert_eq!(
        reached.join().expect("join"),
        "escaped",
        "the allowed destination was reached"
    );
    assert!(listener.accept().is_err(), "a module reached the network");
    let flood = statuses
        .iter()
        .find(|v| v["module"] == "flood")
        .expect("flood");
    assert_eq!(flood["state"], "running");

    // The neighbour kept its 100 ms schedule throughout.
    let log = s
        .edgeward()
        .args(["logs", "neighbour"])
        .output()
        .expect("spawn");
    let stamps: Vec<i64> = stdout(&log).lines().filter_map(stamp_ms).collect();
    assert!(stamps.len() >= 25, "only {} readings", stamps.len());
    let worst = stamps.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(worst < 1000, "the neighbour stalled for {worst} ms");

    let (status, _, err) = d.terminate();
    assert!(status.success(), "daemon exit {status}: {}", err.join("\n"));
}
