//! A long-lived device, compressed: does a daemon stay flat as its history
//! grows? On the soft backend, through the management socket:
//!
//! - **churn**: add and remove one module, `EDGEWARD_SOAK_CYCLES` times
//!   (default 10,000);
//! - **deployments**: `PUT /v1/deployment`, `EDGEWARD_SOAK_DEPLOYMENTS`
//!   times (default 1,000), each changing one module's settings (an
//!   update: measured, registered, restarted);
//! - **crash loop**: a module that fails at once, restarted
//!   `EDGEWARD_SOAK_RESTARTS` times (default 10,000; each through `reset`,
//!   so its backoff does not stretch the run over days);
//! - **workload calls**: a module signing `EDGEWARD_SOAK_CALLS` times
//!   (default 1,000,000) through the workload interface.
//!
//! At 10 % and at 100 % of each phase: the p50 and p99 of an operation
//! over the last tenth, the daemon's RSS (anonymous and file-backed), its
//! open descriptors, the measurement log and the state directory by entry.
//! The baseline is the same run's own start: `p50_ratio` = p50 at the end
//! / p50 at 10 % (target <= 1.10), `rss_growth` after warm-up (target
//! < 5 %), fds flat.
//!
//! Run with `cargo bench -p edgeward-tests --bench soak` (release).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgeward_tests::bench::{digest, http, module_spec, proc_kib, start_daemon};
use edgeward_tests::guests;

const EDGEWARD: &str = env!("CARGO_BIN_EXE_edgeward-under-test");

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// What the daemon holds now.
struct Footprint {
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    fds: usize,
    log_bytes: u64,
    state: Vec<(String, u64)>,
}

fn size_of(p: &Path) -> u64 {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|d| d.flatten().map(|e| size_of(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

fn footprint(pid: u32, state: &Path) -> Footprint {
    let pid = pid.to_string();
    let log_bytes = std::fs::read_dir(state.join("measurements"))
        .map(|d| d.flatten().map(|e| size_of(&e.path())).sum())
        .unwrap_or(0);
    let mut entries: Vec<(String, u64)> = std::fs::read_dir(state)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        size_of(&e.path()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    Footprint {
        rss_kib: proc_kib(&pid, "status", "VmRSS:"),
        anon_kib: proc_kib(&pid, "status", "RssAnon:"),
        file_kib: proc_kib(&pid, "status", "RssFile:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
        log_bytes,
        state: entries,
    }
}

fn report(phase: &str, at: &str, times: &[f64], f: &Footprint) {
    let window = &times[times.len() - (times.len() / 10).max(1)..];
    println!(
        "soak_{phase}_{at} p50_ms={:.2} p99_ms={:.2} rss_kib={} anon_kib={} file_kib={} fds={} log_bytes={} state={}",
        percentile(window, 0.5),
        percentile(window, 0.99),
        f.rss_kib,
        f.anon_kib,
        f.file_kib,
        f.fds,
        f.log_bytes,
        f.state
            .iter()
            .map(|(n, s)| format!("{n}:{s}"))
            .collect::<Vec<_>>()
            .join(",")
    );
}

/// Runs `n` operations of a phase, reporting at 10 % and 100 % and the
/// ratios between them.
fn phase(name: &str, n: usize, pid: u32, state: &Path, mut op: impl FnMut(usize) -> f64) {
    let mut times = Vec::with_capacity(n);
    let tenth = (n / 10).max(1);
    let mut early: Option<(f64, Footprint)> = None;
    for i in 0..n {
        times.push(op(i));
        if i + 1 == tenth {
            let f = footprint(pid, state);
            report(name, "10pct", &times, &f);
            let window = &times[times.len() - (times.len() / 10).max(1)..];
            early = Some((percentile(window, 0.5), f));
        }
    }
    let f = footprint(pid, state);
    report(name, "100pct", &times, &f);
    if let Some((p50, e)) = early {
        let window = &times[times.len() - (times.len() / 10).max(1)..];
        println!(
            "soak_{name} p50_ratio={:.2} rss_growth={:+.1}% anon_growth={:+.1}% fds={}->{}   (end / 10 %; targets: p50 <= 1.10, RSS < +5 %, fds flat)",
            percentile(window, 0.5) / p50,
            (f.rss_kib as f64 / e.rss_kib.max(1) as f64 - 1.0) * 100.0,
            (f.anon_kib as f64 / e.anon_kib.max(1) as f64 - 1.0) * 100.0,
            e.fds,
            f.fds
        );
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("tmp");
    let state: PathBuf = dir.path().join("state");
    let sock = dir.path().join("api.sock");
    let probe = guests::SANDBOX_PROBE;
    let probe_digest = digest(EDGEWARD, probe);
    let identity = guests::IDENTITY_PROBE;
    let identity_digest = digest(EDGEWARD, identity);
    let daemon = start_daemon(EDGEWARD, &state, &sock, None);
    let pid = daemon.0.id();
    for (file, d) in [(probe, &probe_digest), (identity, &identity_digest)] {
        let (status, _) = http(
            &sock,
            "PUT",
            &format!("/v1/blobs/{d}"),
            &std::fs::read(file).expect("component"),
        );
        assert!(matches!(status, 200 | 201));
    }

    // Churn: add and remove one module.
    let cycles = count("EDGEWARD_SOAK_CYCLES", 10_000);
    phase("churn", cycles, pid, &state, |i| {
        let name = format!("c{}", i % 7);
        let t = Instant::now();
        let (s1, b) = http(
            &sock,
            "POST",
            "/v1/modules",
            &module_spec(&name, &probe_digest, r#""tick""#),
        );
        let (s2, _) = http(&sock, "DELETE", &format!("/v1/modules/{name}"), b"");
        assert_eq!((s1, s2), (201, 204), "{}", String::from_utf8_lossy(&b));
        t.elapsed().as_secs_f64() * 1e3
    });

    // Deployments: each one updates a module's settings.
    let deployments = count("EDGEWARD_SOAK_DEPLOYMENTS", 1_000);
    phase("deploy", deployments, pid, &state, |i| {
        let body = format!(
            r#"{{"version":"{i}","modules":[{{"name":"d","digest":"{probe_digest}","args":["tick"],"settings":{{"round":"{i}"}}}}]}}"#
        );
        let t = Instant::now();
        let (s, b) = http(&sock, "PUT", "/v1/deployment", body.as_bytes());
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        t.elapsed().as_secs_f64() * 1e3
    });

    // A crash loop: a module that exits with a failure at once, restarted
    // (reset clears its backoff) until it has started that many times.
    let restarts = count("EDGEWARD_SOAK_RESTARTS", 10_000);
    let (s, b) = http(
        &sock,
        "POST",
        "/v1/modules",
        format!(
            r#"{{"name":"crasher","digest":"{probe_digest}","args":["exit","3"],"restart":"on-failure"}}"#
        )
        .as_bytes(),
    );
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
    let starts = || {
        let (_, body) = http(&sock, "GET", "/v1/modules/crasher", b"");
        serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default()["starts"]
            .as_u64()
            .unwrap_or(0)
    };
    phase("crashloop", restarts, pid, &state, |_| {
        let before = starts();
        let t = Instant::now();
        let (s, b) = http(&sock, "POST", "/v1/modules/crasher/reset", b"");
        assert!(
            matches!(s, 200 | 204),
            "{s}: {}",
            String::from_utf8_lossy(&b)
        );
        while starts() == before {
            assert!(t.elapsed() < Duration::from_secs(30), "no restart");
        }
        t.elapsed().as_secs_f64() * 1e3
    });

    // Workload calls: one module signing in a loop, sampled by the daemon's
    // footprint while it runs (its time per call is the module's).
    let calls = count("EDGEWARD_SOAK_CALLS", 1_000_000);
    let before = footprint(pid, &state);
    let t = Instant::now();
    let (s, b) = http(
        &sock,
        "POST",
        "/v1/modules",
        &module_spec(
            "signer",
            &identity_digest,
            &format!(r#""sign-loop","{calls}""#),
        ),
    );
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
    loop {
        let (_, body) = http(&sock, "GET", "/v1/modules/signer", b"");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if v["state"] == "exited" || v["state"] == "failed" {
            assert_eq!(v["state"], "exited", "{v}");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = t.elapsed().as_secs_f64();
    let after = footprint(pid, &state);
    println!(
        "soak_workload calls={calls} us_per_call={:.2} rss_kib={}->{} anon_kib={}->{} fds={}->{}",
        wall * 1e6 / calls as f64,
        before.rss_kib,
        after.rss_kib,
        before.anon_kib,
        after.anon_kib,
        before.fds,
        after.fds
    );
}
