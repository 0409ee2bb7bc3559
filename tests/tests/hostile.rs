//! The hostile-module suite: each misbehaving module runs in one daemon next
//! to a well-behaved neighbour that must keep its schedule. For every one the
//! daemon stays up, the neighbour keeps producing on time, and the recorded
//! reason is the right one.

#![allow(clippy::unwrap_used)]

mod common;

use common::daemon::*;
use common::*;

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
    // The UDP peer a module may talk to: once the module has sent to it,
    // 20 sockets it may not hear from flood its port (10,000 datagrams,
    // dropped by the policy without a lookup or a log line), then the peer
    // answers.
    let udp_peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let udp_addr = udp_peer.local_addr().expect("addr").to_string();
    let flooded = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, module) = udp_peer.recv_from(&mut buf).expect("the module's datagram");
        let mut sent = 0u32;
        for _ in 0..20 {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            for _ in 0..500 {
                if s.send_to(b"flood", module).is_ok() {
                    sent += 1;
                }
            }
        }
        // The flood can fill the module's receive buffer, where the kernel
        // drops what does not fit: answer for a while, as a peer would
        // retransmit.
        for _ in 0..100 {
            udp_peer.send_to(&buf[..n], module).expect("reply");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        sent
    });
    // DNS rebinding: `rebind.test` answers 127.0.0.1 (listed by address)
    // first and 127.0.0.2 (not listed) afterwards; the request must reach
    // the first.
    let web = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let web_port = web.local_addr().expect("addr").port();
    let rebound = std::net::TcpListener::bind(("127.0.0.2", web_port)).expect("bind 127.0.0.2");
    rebound.set_nonblocking(true).expect("nonblocking");
    let served = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut c, _) = web.accept().expect("the module's request");
        let mut buf = [0u8; 2048];
        let n = c.read(&mut buf).unwrap_or(0);
        let _ = c
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nvetted!");
        String::from_utf8_lossy(&buf[..n]).into_owned()
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
        hostile("ansi", r#"["ansi"]"#, ""),
        hostile("fd-loop", r#"["open-loop"]"#, "max_handles = 64"),
        hostile(
            "disk-filler",
            // Stops at 64 MiB if never refused (a regression fails, not
            // fills the disk).
            r#"["disk-fill", "67108864"]"#,
            "max_disk = \"4MiB\"\nmax_disk_entries = 100",
        ),
        hostile(
            "udp-flooded",
            &format!(r#"["udp-echo", "{udp_addr}"]"#),
            &format!("allow_outbound = [\"{udp_addr}\"]"),
        ),
        hostile(
            "refused-flood",
            &format!(r#"["connect-loop", "3000", "{addr}"]"#),
            &format!("allow_outbound = [\"{open_addr}\"]"),
        ),
    ] {
        config.push_str(&m);
    }
    config.push_str(&format!(
        "[[module]]\nname = \"rebinder\"\nfile = \"{http}\"\ndigest = \"{}\"\nargs = [\"rebind.test:{web_port}\", \"/rebind\"]\nrestart = \"never\"\nallow_outbound = [\"rebind.test:{web_port}\", \"127.0.0.1:{web_port}\"]\n\n",
        sha256sum(guests::HTTP_PROBE),
        http = guests::HTTP_PROBE,
    ));
    // A component with two memories growing both: the module's total
    // stays within its max_memory (run returns an error if it did not).
    let bomb = s.command_component("multi-memory.wasm", &memory_bomb(2, 256));
    config.push_str(&format!(
        "[[module]]\nname = \"multi-memory\"\nfile = \"{bomb}\"\ndigest = \"{}\"\nrestart = \"never\"\nmax_memory = \"16MiB\"\n",
        sha256sum(&bomb)
    ));
    // Pollables in a loop: resource-table entries with no host descriptor.
    let table_loop = s.component("pollables.wasm", POLLABLE_LOOP);
    config.push_str(&format!(
        "[[module]]\nname = \"table-loop\"\nfile = \"{table_loop}\"\ndigest = \"{}\"\nrestart = \"never\"\nmax_handles = 64\n",
        sha256sum(&table_loop)
    ));
    let mut d = Daemon::start_with_env(
        &s,
        &config,
        &[("EDGEWARD_TEST_RESOLVER", "rebind.test=127.0.0.1|127.0.0.2")],
    );
    d.wait_for("the spinners' deadlines", |_, err| {
        count(err, "deadline of 2s passed") >= 2
    });
    d.wait_for("the escapes and the refused connects", |out, _| {
        count(out, "ansi | ansi-done") == 1
            && count(out, "refused-flood | connect-loop: 3000 refused") == 1
    });
    // ...and the neighbour has been reading for a while next to them.
    d.wait_for("25 neighbour readings", |out, _| {
        count(out, "neighbour | ") >= 25
    });

    // Every module that ends, with its recorded outcome and reason.
    let outcomes: &[(&str, &str, Option<&str>)] = &[
        ("spinner", "timeout", Some("deadline")),
        ("spinner2", "timeout", Some("deadline")),
        ("memory-bomb", "trap", Some("out of memory")),
        ("recursion", "trap", Some("call stack exhausted")),
        ("panic", "trap", Some("unreachable")),
        // An error it handles (ENOMEM, as wasi:filesystem has no EMFILE),
        // then its own exit; not a trap.
        ("fd-loop", "failure", None),
        ("table-loop", "trap", Some("handle limit exceeded")),
        // Refused at its budget, then writes again once it freed space.
        ("disk-filler", "success", None),
        ("multi-memory", "success", None),
        ("udp-flooded", "success", None),
        ("rebinder", "success", None),
        ("escape", "failure", None),
        ("socket", "failure", None),
        ("lookup", "failure", None),
        ("binder", "failure", None),
        ("denied-next-to-allowed", "failure", None),
        ("big-arg", "failure", None),
        ("bad-exit", "failure", None),
        ("allowed", "success", None),
    ];
    let statuses = exits_recorded(&s, outcomes);
    let request = served.join().expect("join");
    assert!(request.starts_with("GET /rebind HTTP/1.1"), "{request}");
    assert!(rebound.accept().is_err(), "the rebound address was reached");
    assert_eq!(flooded.join().expect("join"), 10_000, "the flood was sent");
    assert_eq!(
        reached.join().expect("join"),
        "escaped",
        "the allowed destination was reached"
    );
    assert!(listener.accept().is_err(), "a module reached the network");
    let data = s.state().join("modules/disk-filler/data");
    let used: u64 = std::fs::read_dir(&data)
        .expect("disk-filler's data dir")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    assert!(used <= 4 << 20, "disk-filler holds {used} bytes");
    let flood = statuses
        .iter()
        .find(|v| v["name"] == "flood")
        .expect("flood");
    assert_eq!(flood["state"], "running");

    // The neighbour kept its 100 ms schedule throughout.
    neighbour_kept_its_schedule(&s, "hostile suite");

    // Guest output cannot drive the terminal or forge lines: escapes,
    // carriage returns, bidi overrides and stray bytes are shown escaped,
    // in the daemon's echo and in `edgeward logs`.
    let ansi = s.edgeward().args(["logs", "ansi"]).output().expect("spawn");
    let (status, out, err) = d.terminate();
    assert!(status.success(), "daemon exit {status}: {}", err.join("\n"));
    for (what, text) in [("echo", out.join("\n")), ("logs", stdout(&ansi))] {
        assert!(
            !text.contains('\x1b') && !text.contains('\r') && !text.contains('\u{202e}'),
            "{what}: raw control characters reached the terminal"
        );
        assert!(
            text.contains("\\x1b[2J\\x1b]0;pwned\\x07plain"),
            "{what}: {text}"
        );
        assert!(
            text.contains("\\u{202e}") && text.contains("\\xff\\xfe"),
            "{what}"
        );
    }
    let forged = out
        .iter()
        .filter(|l| l.contains("INFO forged"))
        .collect::<Vec<_>>();
    assert!(
        forged.len() == 1 && forged[0].starts_with("ansi | "),
        "a forged line stands on its own: {forged:?}"
    );
    // 3,000 refused connects: the daemon's log stays within the budget,
    // and one line counts what it held back.
    assert!(
        out.iter().any(|l| l == "rebinder | ok: 200 vetted!"),
        "the rebinding request reached the vetted address"
    );
    assert!(
        out.iter()
            .any(|l| l.starts_with("udp-flooded | ") && l.contains("\"ping\"")),
        "the flooded module heard its peer, not the flood"
    );
    assert_eq!(
        count(&err, "udp-flooded"),
        err.iter()
            .filter(|l| l.contains("udp-flooded") && !l.contains("refused"))
            .count(),
        "dropped datagrams are not logged"
    );
    // The disk filler retried its refused write 100 times: a few lines.
    let disk = err
        .iter()
        .filter(|l| l.contains("disk-filler") && l.contains("disk budget exceeded"))
        .count();
    assert!(
        (1..=edgeward::runtime::loglimit::LINES_PER_WINDOW as usize).contains(&disk),
        "{disk} disk refusal lines"
    );
    let refusals = err
        .iter()
        .filter(|l| l.contains("refused-flood") && l.contains("network access refused"))
        .count();
    assert!(
        (1..=edgeward::runtime::loglimit::LINES_PER_WINDOW as usize).contains(&refusals),
        "{refusals} refusal lines"
    );
    assert!(
        err.iter()
            .any(|l| l.contains("refused-flood") && l.contains("network refusals suppressed")),
        "no suppression summary: {}",
        err.join("\n")
    );
}

/// One daemon per state directory: a second one exits at once, naming the
/// first one's pid.
/// LAN, CGNAT, NAT64, unique-local and the metadata service, from modules
/// in the daemon beside the neighbour: refused by the policy (the log names
/// the class), the refusals stay within the log budget, the neighbour keeps
/// its schedule. The daemon runs in a network namespace of its own, so not
/// even a regression could send a packet to a real private address.
#[test]
fn lan_and_nat64_destinations_are_refused_in_the_daemon() {
    let s = Scratch::new();
    let probe = guests::SANDBOX_PROBE;
    let sensor = guests::TEMPERATURE_SENSOR;
    let pd = sha256sum(probe);
    let mut config = format!(
        "[[module]]\nname = \"neighbour\"\nfile = \"{sensor}\"\ndigest = \"{}\"\nenv = {{ INTERVAL_MS = \"100\" }}\n\n",
        sha256sum(sensor)
    );
    let dests = [
        ("lan", "10.0.5.9:502", "private-use"),
        ("router", "192.168.1.1:80", "private-use"),
        ("cgnat", "100.64.0.1:502", "shared address space"),
        ("metadata", "169.254.169.254:80", "link-local"),
        ("ula", "[fd00::1]:502", "unique-local"),
        ("nat64", "[64:ff9b::a00:509]:502", "NAT64"),
        ("nat64-local", "[64:ff9b:1::1]:502", "NAT64"),
    ];
    for (name, dest, _) in dests {
        config.push_str(&format!(
            "[[module]]\nname = \"{name}\"\nfile = \"{probe}\"\ndigest = \"{pd}\"\nargs = [\"connect\", \"{dest}\"]\nrestart = \"never\"\nallow_outbound = [\"plc.example:502\"]\n\n"
        ));
    }
    config.push_str(&format!(
        "[[module]]\nname = \"lan-flood\"\nfile = \"{probe}\"\ndigest = \"{pd}\"\nargs = [\"connect-loop\", \"3000\", \"10.0.5.9:502\"]\nrestart = \"never\"\nallow_outbound = [\"plc.example:502\"]\n"
    ));
    let mut d = Daemon::start_in_netns(&s, &config);
    d.wait_for("the refused LAN flood", |out, _| {
        count(out, "lan-flood | connect-loop: 3000 refused") == 1
    });
    d.wait_for("25 neighbour readings", |out, _| {
        count(out, "neighbour | ") >= 25
    });
    let outcomes: Vec<_> = dests
        .iter()
        .map(|(n, _, _)| (*n, "failure", None))
        .collect();
    exits_recorded(&s, &outcomes);
    neighbour_kept_its_schedule(&s, "LAN destinations");
    let (status, out, err) = d.terminate();
    assert!(status.success(), "daemon exit {status}: {}", err.join("\n"));
    for (name, dest, class) in dests {
        assert!(
            out.iter()
                .any(|l| l.starts_with(&format!("{name} | denied: connect"))),
            "{name}: {}",
            out.join("\n")
        );
        assert!(
            err.iter()
                .any(|l| l.contains(&format!("module={name} addr={dest} "))
                    && l.contains("network access refused")
                    && l.contains(class)),
            "{name} ({dest}): no refusal naming {class}: {}",
            err.join("\n")
        );
    }
    let flood = err
        .iter()
        .filter(|l| l.contains("module=lan-flood ") && l.contains("network access refused"))
        .count();
    assert!(
        (1..=edgeward::runtime::loglimit::LINES_PER_WINDOW as usize).contains(&flood),
        "{flood} refusal lines for 3,000 refused connects"
    );
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let s = Scratch::new();
    let mut d = Daemon::start(&s, "");
    d.wait_for("the first daemon", |_, err| {
        count(err, "workload identity ready") >= 1
    });
    let path = s.write("second.toml", "");
    let started = std::time::Instant::now();
    let o = s.daemon_refused(&path);
    assert_status(&o, 1);
    assert!(
        started.elapsed().as_secs() < 10,
        "the second daemon did not exit at once"
    );
    let pid = d.child.id();
    assert!(
        stderr(&o).contains(&format!("another edgeward daemon (pid {pid})")),
        "{}",
        stderr(&o)
    );
    let (status, _, _) = d.terminate();
    assert!(status.success());
}

/// The daemon's stdout broken (its reader gone: EPIPE) or never read,
/// beside a module flooding it: every module keeps running and logging, and
/// the neighbour keeps its schedule.
#[test]
fn a_broken_or_stuck_stdout_never_reaches_the_modules() {
    use std::process::Stdio;
    for broken in [true, false] {
        let s = Scratch::new();
        let probe = guests::SANDBOX_PROBE;
        let sensor = guests::TEMPERATURE_SENSOR;
        let config = format!(
            "[[module]]\nname = \"neighbour\"\nfile = \"{sensor}\"\ndigest = \"{}\"\nenv = {{ INTERVAL_MS = \"100\" }}\n\n[[module]]\nname = \"flood\"\nfile = \"{probe}\"\ndigest = \"{}\"\nargs = [\"flood\"]\n",
            sha256sum(sensor),
            sha256sum(probe)
        );
        let path = s.write("config.toml", &config);
        let err_file = std::fs::File::create(s.path().join("daemon.err")).expect("stderr file");
        let mut child = s
            .edgeward()
            .env("EDGEWARD_LOG", "info")
            .arg("daemon")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .expect("spawn daemon");
        let pipe = child.stdout.take().expect("stdout");
        if broken {
            drop(pipe); // the reader has exited: writes fail with EPIPE
        } else {
            std::mem::forget(pipe); // held open, never read: the pipe fills
        }
        let logs = |m: &str| {
            let o = s.edgeward().args(["logs", m]).output().expect("spawn");
            stdout(&o)
        };
        // From the neighbour's first reading (however long the start took
        // on a loaded machine), 4 s beside the flood.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while logs("neighbour")
            .lines()
            .filter_map(stamp_ms)
            .next()
            .is_none()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the neighbour never read"
            );
            assert!(child.try_wait().expect("wait").is_none(), "the daemon died");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_secs(4));
        assert!(child.try_wait().expect("wait").is_none(), "the daemon died");
        let neighbour: Vec<i64> = logs("neighbour").lines().filter_map(stamp_ms).collect();
        assert!(
            neighbour.len() >= 20,
            "broken={broken}: {} readings",
            neighbour.len()
        );
        let worst = neighbour.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        println!("broken={broken}: the neighbour's worst gap was {worst} ms");
        assert!(
            worst < 500,
            "broken={broken}: the neighbour stalled {worst} ms"
        );
        // The flooding module is still writing: its last line is recent.
        let now_ms = {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock");
            (d.as_millis() % 86_400_000) as i64
        };
        let last = logs("flood")
            .lines()
            .filter_map(stamp_ms)
            .next_back()
            .expect("flood output");
        // (Taken before `edgeward logs` ran: the last line may be newer.)
        assert!(
            now_ms - last < 2000,
            "broken={broken}: the flooding module stopped logging {} ms ago",
            now_ms - last
        );
        status_when(&s, "both modules running", |v| {
            v.len() == 2 && v.iter().all(|m| m["state"] == "running")
        });
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().expect("wait");
        assert!(status.success(), "broken={broken}: exit {status}");
        let err = std::fs::read_to_string(s.path().join("daemon.err")).expect("stderr");
        if broken {
            assert!(err.contains("echo of module output turned off"), "{err}");
        }
    }
}
