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
