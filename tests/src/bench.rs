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
