//! Helpers the benchmarks share.

use std::process::Command;
use std::time::{Duration, Instant};

/// Wall time and peak RSS (KiB) of `cmd`, run under GNU time; panics if
/// it fails.
pub fn measure_process(cmd: &[&str]) -> (Duration, u64) {
    let t = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%e %M"])
        .args(cmd)
        .output()
        .expect("run /usr/bin/time");
    let wall = t.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().expect("time output");
    let mut parts = last.split_whitespace();
    let _coarse_secs = parts.next();
    let kib: u64 = parts.next().and_then(|s| s.parse().ok()).expect("rss");
    (wall, kib)
}

/// The median wall time and the median peak RSS of `runs`.
pub fn medians(runs: &mut [(Duration, u64)]) -> (Duration, u64) {
    let n = runs.len();
    runs.sort_by_key(|x| x.0);
    let t = runs[n / 2].0;
    runs.sort_by_key(|x| x.1);
    (t, runs[n / 2].1)
}

/// Medians (wall, peak RSS) of `n` runs each of `a` and `b`, alternating so
/// that drift in the machine's speed hits both alike.
pub fn alternating(n: usize, a: &[&str], b: &[&str]) -> ((Duration, u64), (Duration, u64)) {
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    for _ in 0..n {
        va.push(measure_process(a));
        vb.push(measure_process(b));
    }
    (medians(&mut va), medians(&mut vb))
}

/// The first `name` on PATH.
pub fn which(name: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
}

/// A field of `/proc/<pid>/<file>` that is given in kB (`VmRSS:` of
/// `status`, `Anonymous:` of `smaps_rollup`, ...); `pid` may be `self`.
/// 0 when it cannot be read.
pub fn proc_kib(pid: &str, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of process `pid` (or `self`), in clock ticks
/// (1/100 s on Linux).
pub fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command: utime is 14th, stime 15th overall.
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// One HTTP/1.1 request on a new connection to the unix socket `sock`:
/// (status, body).
pub fn http(sock: &std::path::Path, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read as _, Write as _};
    let mut c = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .expect("write");
    let _ = c.write_all(body);
    let mut out = Vec::new();
    c.read_to_end(&mut out).expect("read");
    let head_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    let status = std::str::from_utf8(&out[..head_end])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, out[head_end..].to_vec())
}

/// `sha256:HEX` of `path`, as `bin digest` prints it.
pub fn digest(bin: &str, path: &str) -> String {
    let out = Command::new(bin)
        .args(["digest", path])
        .output()
        .expect("digest");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}

/// A module spec for `POST /v1/modules`: `name` running `digest` with
/// `args` (JSON strings, comma-separated), never restarted.
pub fn module_spec(name: &str, digest: &str, args: &str) -> Vec<u8> {
    format!(r#"{{"name":"{name}","digest":"{digest}","args":[{args}],"restart":"never"}}"#)
        .into_bytes()
}

/// A daemon a benchmark started; stopped (SIGTERM, then waited for) when
/// dropped.
#[derive(Debug)]
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// `bin daemon` on `state` (and `config`, if any), serving `sock`, once
/// the socket answers.
pub fn start_daemon(
    bin: &str,
    state: &std::path::Path,
    sock: &std::path::Path,
    config: Option<&std::path::Path>,
) -> Daemon {
    let mut cmd = Command::new(bin);
    cmd.arg("--state-dir").arg(state).arg("daemon");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let child = cmd
        .env("EDGEWARD_SOCKET", sock)
        .env("EDGEWARD_LOG", "warn")
        .env_remove("EDGEWARD_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

/// An `edgeward daemon` a fleet benchmark runs: `bin` on `dir/config.toml`
/// with its state in `dir/state`, its log in `dir/daemon.log`; killed when
/// dropped.
#[derive(Debug)]
pub struct DaemonProcess {
    /// The device's id.
    pub id: String,
    /// Its directory.
    pub dir: tempfile::TempDir,
    /// When it was last started.
    pub spawned: Instant,
    bin: String,
    child: Option<std::process::Child>,
}

impl DaemonProcess {
    /// A device `id` of `bin` in `dir`, not started.
    pub fn new(bin: &str, id: &str, dir: tempfile::TempDir) -> Self {
        Self {
            id: id.to_owned(),
            dir,
            spawned: Instant::now(),
            bin: bin.to_owned(),
            child: None,
        }
    }

    /// Starts it.
    pub fn start(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("daemon.log")).expect("log");
        self.spawned = Instant::now();
        let child = Command::new(&self.bin)
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("daemon")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .env("EDGEWARD_SOCKET", self.dir.path().join("api.sock"))
            .env("EDGEWARD_LOG", "warn")
            .env_remove("EDGEWARD_CONFIG")
            .env_remove("EDGEWARD_STATE_DIR")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the daemon");
        self.child = Some(child);
    }

    /// Stops it (SIGTERM) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Its process id (0 when not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `p` quantile (nearest rank) of `sorted`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until `done(device, payload)` holds for every device on `topic`
/// (`ew/v1/d/<id>/<topic>`); returns when each first did.
pub fn first_times(
    within: Duration,
    sub: &mut crate::fixtures::Subscription,
    suffix: &str,
    n: usize,
    done: impl Fn(&serde_json::Value) -> bool,
) -> std::collections::BTreeMap<String, Instant> {
    let deadline = Instant::now() + within;
    let mut at = std::collections::BTreeMap::new();
    let mut checked = 0;
    while at.len() < n {
        sub.pump();
        for i in checked..sub.seen.len() {
            let (t, p) = &sub.seen[i];
            let Some(dev) = t
                .strip_prefix("ew/v1/d/")
                .and_then(|r| r.strip_suffix(suffix))
            else {
                continue;
            };
            if at.contains_key(dev) {
                continue;
            }
            if serde_json::from_str::<serde_json::Value>(p).is_ok_and(|v| done(&v)) {
                at.insert(dev.to_owned(), sub.arrived[i]);
            }
        }
        checked = sub.seen.len();
        assert!(
            Instant::now() < deadline,
            "only {} of {n} devices within {within:?}",
            at.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    at
}
