//! The daemon's metrics: `GET /v1/metrics` on the management socket and
//! `GET /metrics` on the `[metrics] listen` loopback port, in the Prometheus
//! text format as `promtool check metrics` (Debian's prometheus package)
//! reads it, counting what the modules really did, and scraped by a real
//! Prometheus server whose query API returns the series.
//!
//! Who may reach them: readers and operators of the socket (the roles test
//! in api.rs refuses a user with no role); anyone who can reach the
//! loopback port (no keys, tokens, digests or paths are in them; a
//! non-loopback address is refused at start). A hostile scraper: other
//! paths and methods get 404/405, an endless request head is cut off at
//! 8 KiB, a silent connection is closed at the deadline.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request over TCP: (status, body).
fn tcp_request(port: u16, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn get(port: u16, path: &str) -> (u16, String) {
    tcp_request(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    )
}

/// The value of the sample `series` (name and labels, exactly as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn config(port: u16) -> String {
    let sensor = guests::TEMPERATURE_SENSOR;
    let probe = guests::SANDBOX_PROBE;
    format!(
        r#"
[metrics]
listen = "127.0.0.1:{port}"

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
"#,
        sha256sum(sensor),
        sha256sum(probe),
    )
}

fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/setup installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn metrics_count_what_the_modules_did_and_pass_promtool() {
    let s = Scratch::new();
    let port = free_port();
    let mut d = Daemon::start(&s, &config(port));
    d.wait_for("sensor readings", |out, _| {
        count(out, "sensor | {\"sensor\":\"demo\"") >= 5
    });
    d.wait_for("the writer to finish", |_, err| {
        count(err, "not restarting") >= 1
    });
    // Counters move as the sensor works: read until they show its work.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (code, text) = http(&s.socket(), "GET", "/v1/metrics", b"");
        assert_eq!(code, 200, "{text}");
        let done = sample(
            &text,
            r#"edgeward_module_workload_calls_total{module="sensor",operation="sign"}"#,
        )
        .is_some_and(|n| n >= 3.0)
            && sample(
                &text,
                r#"edgeward_module_exits_total{module="writer",kind="success"}"#,
            ) == Some(1.0)
            && sample(
                &text,
                r#"edgeward_module_state{module="writer",state="exited"}"#,
            ) == Some(1.0)
            && sample(&text, r#"edgeward_module_memory_bytes{module="writer"}"#) == Some(0.0);
        if done {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_check(&text);
    let v = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert_eq!(
        v(r#"edgeward_module_state{module="sensor",state="running"}"#),
        1.0
    );
    assert_eq!(
        v(r#"edgeward_module_state{module="writer",state="exited"}"#),
        1.0
    );
    assert_eq!(v(r#"edgeward_module_starts_total{module="sensor"}"#), 1.0);
    assert_eq!(v("edgeward_modules"), 2.0);
    // The sensor has run code, holds memory now, and has written lines.
    assert!(v(r#"edgeward_module_cpu_seconds_total{module="sensor"}"#) > 0.0);
    assert!(v(r#"edgeward_module_memory_bytes{module="sensor"}"#) >= 65536.0);
    assert!(v(r#"edgeward_module_output_lines_total{module="sensor"}"#) >= 5.0);
    assert!(
        v(r#"edgeward_module_output_bytes_total{module="sensor"}"#)
            > v(r#"edgeward_module_output_lines_total{module="sensor"}"#)
    );
    // The writer ended: no memory, no handles; its file is on its budget.
    assert_eq!(v(r#"edgeward_module_memory_bytes{module="writer"}"#), 0.0);
    assert_eq!(v(r#"edgeward_module_handles{module="writer"}"#), 0.0);
    assert_eq!(
        v(r#"edgeward_module_disk_bytes{module="writer"}"#),
        "persisted".len() as f64
    );
    // Soft keys are in this process: no key daemon calls (keyd.rs counts
    // them through one).
    assert!(text.contains("# TYPE edgeward_keyd_calls_total counter"));
    assert!(!text.contains("edgeward_keyd_calls_total{"), "{text}");
    assert!(v("edgeward_compiles_total") >= 1.0);
    assert!(!text.contains("sha256:"), "no digests in the metrics");

    // The loopback listener serves the same families; nothing else.
    let (code, tcp) = get(port, "/metrics");
    assert_eq!(code, 200, "{tcp}");
    promtool_check(&tcp);
    assert!(
        tcp.contains(r#"edgeward_module_state{module="sensor",state="running"} 1"#),
        "{tcp}"
    );
    assert_eq!(get(port, "/metrics?x=1").0, 200);
    assert_eq!(get(port, "/v1/modules").0, 404);
    assert_eq!(get(port, "/").0, 404);
    assert_eq!(
        tcp_request(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").0,
        405
    );
    // An endless head is cut off.
    let (code, _) = tcp_request(
        port,
        &format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(20_000)),
    );
    assert_eq!(code, 431);
    // A page that rebinds its own name to 127.0.0.1 sends that name.
    assert_eq!(
        tcp_request(
            port,
            "GET /metrics HTTP/1.1\r\nHost: attacker.example:9464\r\n\r\n"
        )
        .0,
        421
    );
    assert_eq!(
        tcp_request(port, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").0,
        200
    );
    // Silent connections, past the scrapers' places, hold nothing for long:
    // each has 2 s to send its request, the one past the places is closed
    // at once, and a scrape gets through meanwhile.
    let silent: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let began = Instant::now();
    let mut served = false;
    while began.elapsed() < Duration::from_secs(5) && !served {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            let mut text = String::new();
            let _ = c.read_to_string(&mut text);
            served = text.starts_with("HTTP/1.1 200");
        }
    }
    assert!(served, "a scrape within 5 s despite 20 silent connections");
    drop(silent);

    // Stopped, the sensor holds no memory and no handles; its starts and
    // CPU time stay.
    let o = s
        .edgeward()
        .args(["module", "stop", "sensor"])
        .output()
        .unwrap();
    assert_status(&o, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    // (Stopped first; its instance's share goes when its store is dropped.)
    let stopped = loop {
        let (_, text) = http(&s.socket(), "GET", "/v1/metrics", b"");
        if sample(
            &text,
            r#"edgeward_module_state{module="sensor",state="stopped"}"#,
        ) == Some(1.0)
            && sample(&text, r#"edgeward_module_memory_bytes{module="sensor"}"#) == Some(0.0)
            && sample(&text, r#"edgeward_module_handles{module="sensor"}"#) == Some(0.0)
        {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let after = |series: &str| sample(&stopped, series).unwrap_or_else(|| panic!("{series}"));
    assert_eq!(
        after(r#"edgeward_module_memory_bytes{module="sensor"}"#),
        0.0
    );
    assert_eq!(after(r#"edgeward_module_handles{module="sensor"}"#), 0.0);
    assert_eq!(
        after(r#"edgeward_module_starts_total{module="sensor"}"#),
        1.0
    );
    assert!(
        after(r#"edgeward_module_cpu_seconds_total{module="sensor"}"#)
            >= v(r#"edgeward_module_cpu_seconds_total{module="sensor"}"#)
    );
    let o = s
        .edgeward()
        .args(["module", "start", "sensor"])
        .output()
        .unwrap();
    assert_status(&o, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = http(&s.socket(), "GET", "/v1/metrics", b"");
        if sample(&text, r#"edgeward_module_starts_total{module="sensor"}"#) == Some(2.0)
            && sample(&text, r#"edgeward_module_memory_bytes{module="sensor"}"#)
                .is_some_and(|m| m > 0.0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let (status, _, _) = d.terminate();
    assert!(status.success());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the listener closes with the daemon"
    );
}

#[test]
fn a_metrics_listener_off_loopback_is_refused() {
    let s = Scratch::new();
    for (listen, says) in [
        ("0.0.0.0:9464", "not a loopback address"),
        ("192.0.2.1:9464", "not a loopback address"),
        ("localhost", "not an address and port"),
    ] {
        let cfg = s.write(
            "config.toml",
            &format!("[metrics]\nlisten = \"{listen}\"\n"),
        );
        let o = s.daemon_refused(&cfg);
        assert!(stderr(&o).contains("metrics.listen"), "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
    }
    // A port already taken: the daemon says so and does not start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = s.write(
        "config.toml",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let o = s.daemon_refused(&cfg);
    assert!(
        stderr(&o).contains(&format!(
            "metrics.listen: cannot listen on 127.0.0.1:{port}"
        )),
        "{}",
        stderr(&o)
    );
}

/// Debian's Prometheus, on loopback, scrapes the daemon every second; its
/// query API returns the modules' series.
#[test]
fn a_real_prometheus_scrapes_the_daemon() {
    let s = Scratch::new();
    let port = free_port();
    let mut d = Daemon::start(&s, &config(port));
    d.wait_for("sensor readings", |out, _| {
        count(out, "sensor | {\"sensor\":\"demo\"") >= 2
    });
    let web = free_port();
    let prom_config = s.write(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: edgeward\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    );
    let tsdb = s.path().join("tsdb");
    let mut prom = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", prom_config.display()))
        .arg(format!("--storage.tsdb.path={}", tsdb.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus (Debian's package; scripts/setup installs it)");
    let deadline = Instant::now() + Duration::from_secs(90);
    let query = |q: &str| {
        TcpStream::connect(("127.0.0.1", web))
            .ok()
            .map(|_| get(web, &format!("/api/v1/query?query={q}")))
    };
    let answer = loop {
        if let Some((200, body)) = query("edgeward_module_workload_calls_total")
            && body.contains(r#""module":"sensor""#)
        {
            break body;
        }
        assert!(Instant::now() < deadline, "prometheus never had the series");
        std::thread::sleep(Duration::from_millis(250));
    };
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["status"], "success", "{answer}");
    let result = v["data"]["result"].as_array().unwrap();
    assert!(
        result.iter().any(|r| r["metric"]["module"] == "sensor"
            && r["metric"]["operation"] == "sign"
            && r["metric"]["job"] == "edgeward"),
        "{answer}"
    );
    // Up over the last half minute (one scrape slowed past its 1 s
    // timeout on a loaded machine would make the latest sample 0).
    let (_, up) = query("max_over_time(up%5B30s%5D)").unwrap();
    assert!(up.contains(r#""job":"edgeward""#), "{up}");
    assert!(up.contains(r#","1"]"#), "the target is up: {up}");
    let _ = prom.kill();
    let _ = prom.wait();
    let (status, _, _) = d.terminate();
    assert!(status.success());
}
