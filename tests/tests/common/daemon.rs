//! A running `edgeward daemon` under test: its stdout/stderr lines, and
//! SIGTERM.
#![allow(dead_code)]

use super::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Daemon {
    pub child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    pub seen_out: Vec<String>,
    pub seen_err: Vec<String>,
}

/// Takes a line from `rx` into `seen` if one comes within 20 ms; false
/// once its pipe has closed and every line is taken.
fn next_line(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>) -> bool {
    match rx.recv_timeout(Duration::from_millis(20)) {
        Ok(l) => {
            seen.push(l);
            true
        }
        Err(mpsc::RecvTimeoutError::Timeout) => true,
        Err(mpsc::RecvTimeoutError::Disconnected) => false,
    }
}

pub fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

impl Daemon {
    pub fn start(s: &Scratch, config: &str) -> Self {
        Self::start_with_env(s, config, &[])
    }

    /// [`Daemon::start`] with extra environment (the test binary's seams).
    pub fn start_with_env(s: &Scratch, config: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn(s, Some(config), s.edgeward(), env)
    }

    /// `edgeward daemon` with no config file at all.
    pub fn start_without_config(s: &Scratch) -> Self {
        let mut c = s.edgeward();
        c.env_remove("EDGEWARD_CONFIG");
        Self::spawn(s, None, c, &[])
    }

    /// [`Daemon::start`] in a network namespace of its own (`unshare -n`:
    /// only a loopback that is down), so nothing a module sends can leave
    /// it, even if the policy let it.
    pub fn start_in_netns(s: &Scratch, config: &str) -> Self {
        let mut c = Command::new("unshare");
        c.arg("-n")
            .arg(EDGEWARD)
            .arg("--state-dir")
            .arg(s.state())
            .env_remove("EDGEWARD_STATE_DIR")
            .env("EDGEWARD_SOCKET", s.socket());
        Self::spawn(s, Some(config), c, &[])
    }

    /// A daemon from a command the test made whole (another uid, another
    /// environment): `command` already names `daemon` and its config.
    pub fn from_command(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn daemon");
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        Self {
            child,
            stdout,
            stderr,
            seen_out: Vec::new(),
            seen_err: Vec::new(),
        }
    }

    fn spawn(
        s: &Scratch,
        config: Option<&str>,
        mut command: Command,
        env: &[(&str, &str)],
    ) -> Self {
        command
            .envs(env.iter().copied())
            .env("EDGEWARD_LOG", "info")
            .arg("daemon");
        if let Some(config) = config {
            command.arg("--config").arg(s.write("config.toml", config));
        }
        Self::from_command(command)
    }

    pub fn pump(&mut self) {
        self.seen_out.extend(self.stdout.try_iter());
        self.seen_err.extend(self.stderr.try_iter());
    }

    /// Waits until `pred` holds for the stdout and stderr lines seen so far.
    #[track_caller]
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&[String], &[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            self.pump();
            if pred(&self.seen_out, &self.seen_err) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "timed out waiting for {what}\n--- stdout\n{}\n--- stderr\n{}",
            self.seen_out.join("\n"),
            self.seen_err.join("\n")
        );
    }

    pub fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>, Vec<String>) {
        let pid = self.child.id().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Every line it wrote: the readers end when the pipes
                // close (a private key daemon may hold them a moment
                // longer; 5 s at most).
                let until = Instant::now() + Duration::from_secs(5);
                let (mut out_open, mut err_open) = (true, true);
                while (out_open || err_open) && Instant::now() < until {
                    out_open = out_open && next_line(&self.stdout, &mut self.seen_out);
                    err_open = err_open && next_line(&self.stderr, &mut self.seen_err);
                }
                self.pump();
                return (
                    status,
                    std::mem::take(&mut self.seen_out),
                    std::mem::take(&mut self.seen_err),
                );
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

pub fn status_json(s: &Scratch) -> Vec<serde_json::Value> {
    let o = s
        .edgeward()
        .args(["status", "--json"])
        .output()
        .expect("spawn");
    assert_status(&o, 0);
    serde_json::from_str::<serde_json::Value>(&stdout(&o))
        .expect("status JSON")
        .as_array()
        .cloned()
        .expect("array")
}

/// The statuses once `ready` holds for them: the daemon's record writer
/// writes a status a moment after the event it logs, so a test waits for
/// it rather than reading once.
#[track_caller]
pub fn status_when(
    s: &Scratch,
    what: &str,
    ready: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = status_json(s);
        if ready(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status of module `name` in `statuses` (null when absent).
pub fn status_of<'a>(statuses: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    statuses
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or(&serde_json::Value::Null)
}

/// Waits (up to 30 s) until the daemon's own socket accepts connections
/// (the CLI would otherwise read the records without it).
#[track_caller]
pub fn wait_for_socket(s: &Scratch) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(s.socket()).is_err() {
        assert!(
            Instant::now() < deadline,
            "no socket at {}",
            s.socket().display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

/// One raw HTTP/1.1 request on the socket: (status, body); (0, "") if
/// nothing answers.
pub fn http(sock: &Path, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut c) = std::os::unix::net::UnixStream::connect(sock) else {
        return (0, String::new());
    };
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The server may answer (413) and close before the body is all sent.
    let _ = write!(
        c,
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = c.write_all(body);
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// Milliseconds since the epoch of a log line's RFC 3339 timestamp.
pub fn stamp_ms(line: &str) -> Option<i64> {
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

/// Waits until every module in `outcomes` has an exit recorded, and checks
/// each one's outcome and (when given) that its reason says so. Returns the
/// statuses.
pub fn exits_recorded(
    s: &Scratch,
    outcomes: &[(&str, &str, Option<&str>)],
) -> Vec<serde_json::Value> {
    let statuses = status_when(s, "every module's exit to be recorded", |v| {
        outcomes
            .iter()
            .all(|(n, _, _)| !status_of(v, n)["last_exit"].is_null())
    });
    for (n, outcome, reason) in outcomes {
        let e = &status_of(&statuses, n)["last_exit"];
        assert_eq!(e["outcome"], *outcome, "{n}: {e}");
        if let Some(r) = reason {
            assert!(
                e["reason"].as_str().unwrap_or("").contains(r),
                "{n}: {r:?} not in {e}"
            );
        }
    }
    statuses
}

/// The neighbour (a sensor on a 100 ms schedule) never went 500 ms without
/// a reading; prints its worst gap.
pub fn neighbour_kept_its_schedule(s: &Scratch, suite: &str) {
    let log = s
        .edgeward()
        .args(["logs", "neighbour"])
        .output()
        .expect("spawn");
    let stamps: Vec<i64> = stdout(&log).lines().filter_map(stamp_ms).collect();
    assert!(stamps.len() >= 25, "only {} readings", stamps.len());
    let worst = stamps.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    println!("{suite}: the neighbour's worst gap was {worst} ms (100 ms schedule)");
    assert!(worst < 500, "the neighbour stalled for {worst} ms");
}
