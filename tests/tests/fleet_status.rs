//! `fleet status` tells the truth on a loaded machine: its snapshot is
//! complete by construction (a marker round-tripped through the broker
//! behind the retained messages), not by a quiet window, and a device
//! whose report it lacks is `unknown` (or `offline` when its will says
//! so), never `ok`.
//!
//! Its own test binary: it saturates both cores with busy loops and
//! pauses the broker again and again, which would disturb the timing of
//! other suites' tests running beside it.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use edgeward_tests::fleet::Fleet;

/// Fake devices whose state and report sit retained on the broker.
const DEVICES: usize = 60;

fn reported(version: u64) -> String {
    serde_json::json!({
        "version": version.to_string(),
        "groups": ["line-a"],
        "modules": [{"name": "sensor", "state": "running", "origin": "cloud"}],
        "daemon": {"version": "0.1.0"},
    })
    .to_string()
}

/// Publishes `jobs` (topic, payload) retained, a few clients at a time.
fn publish_all(fleet: &Fleet, jobs: Vec<(String, String)>) {
    let jobs = Arc::new(std::sync::Mutex::new(jobs));
    std::thread::scope(|s| {
        for _ in 0..6 {
            let jobs = jobs.clone();
            let operator = fleet.operator.clone();
            s.spawn(move || {
                loop {
                    let Some((t, p)) = jobs.lock().unwrap().pop() else {
                        return;
                    };
                    assert!(operator.publish(&t, p.as_bytes(), true), "publish {t}");
                }
            });
        }
    });
}

fn status(fleet: &Fleet) -> BTreeMap<String, serde_json::Value> {
    fleet.status()
}

/// Pauses the broker (SIGSTOP) for 600 to 900 ms, lets it run for 20 to
/// 300 ms, again and again until dropped, the lengths drawn at random so
/// the pauses fall anywhere in an operator's session: a broker that
/// delays what it delivers.
struct Stutter {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pid: u32,
}

impl Stutter {
    fn new(pid: u32) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).unwrap();
        let mut x = u64::from_le_bytes(seed) | 1;
        let thread = std::thread::spawn(move || {
            let signal = |s: &str| {
                let _ = std::process::Command::new("kill")
                    .args([s, &pid.to_string()])
                    .status();
            };
            let mut draw = |lo: u64, hi: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                Duration::from_millis(lo + x % (hi - lo))
            };
            while !d.load(Ordering::Relaxed) {
                signal("-STOP");
                std::thread::sleep(draw(600, 900));
                signal("-CONT");
                std::thread::sleep(draw(20, 300));
            }
        });
        Self {
            done,
            thread: Some(thread),
            pid,
        }
    }
}

impl Drop for Stutter {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.pid.to_string()])
            .status();
    }
}

/// Two busy loops per core until dropped.
struct Load {
    done: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn new() -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..2 * cores)
            .map(|_| {
                let d = done.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !d.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Self { done, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn status_is_complete_and_never_calls_the_unknown_ok_under_load() {
    let fleet = Fleet::new(Path::new(EDGEWARD), &[], "");
    let mut jobs = Vec::new();
    for i in 0..DEVICES {
        let d = format!("dev-{i:03}");
        jobs.push((
            format!("ew/v1/d/{d}/out/state"),
            r#"{"state":"online"}"#.to_owned(),
        ));
        jobs.push((format!("ew/v1/d/{d}/out/reported"), reported(7)));
    }
    // Online with no report: unknown. Offline by its will, no report:
    // offline. Neither is ok.
    jobs.push((
        "ew/v1/d/quiet/out/state".into(),
        r#"{"state":"online"}"#.into(),
    ));
    jobs.push((
        "ew/v1/d/gone/out/state".into(),
        r#"{"state":"offline"}"#.into(),
    ));
    publish_all(&fleet, jobs);
    // The group's deployment is version 7: what they all report.
    let desired = fleet.signed(
        "version = \"7\"\ntarget = \"group:line-a\"\nexpires = \"2099-01-01T00:00:00Z\"\n\n[[module]]\nname = \"sensor\"\ndigest = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nsource = \"/nonexistent\"\n",
        "group:line-a",
        None,
    );
    assert!(
        fleet
            .operator
            .publish("ew/v1/g/line-a/desired", &desired, true)
    );

    let check = |st: &BTreeMap<String, serde_json::Value>, round: usize| {
        for i in 0..DEVICES {
            let d = format!("dev-{i:03}");
            let row = &st
                .get(&d)
                .unwrap_or_else(|| panic!("round {round}: {d} missing"));
            assert_eq!(row["status"], "ok", "round {round}: {d}: {row}");
            assert_eq!(row["version"], "7", "round {round}: {d}: {row}");
            assert_eq!(row["desired"], 7, "round {round}: {d}: {row}");
            assert_eq!(row["modules"], 1, "round {round}: {d}: {row}");
        }
        assert_eq!(st["quiet"]["status"], "unknown", "round {round}: {st:?}");
        assert_eq!(st["gone"]["status"], "offline", "round {round}: {st:?}");
        assert_eq!(st.len(), DEVICES + 2, "round {round}: {st:?}");
    };
    // The positive control, on an idle machine and broker.
    check(&status(&fleet), 0);

    // Saturated cores and a broker that keeps stopping for longer than
    // the old rule's quiet window (500 ms without a message ended the
    // snapshot): that rule missed retained messages here in most runs.
    let _load = Load::new();
    let _stutter = Stutter::new(fleet.broker.pid().unwrap());
    for round in 1..=10 {
        check(&status(&fleet), round);
    }
}

/// A device without a report stops a canary rollout (its groups are
/// unknown) unless the operator says to go on without it; `fleet attest`
/// takes the expected modules only from a deployment the operator's key
/// signed for the device or a group the operator names, never from an
/// unsigned retained message or the device's own claims.
#[test]
fn the_canary_gate_and_attest_refuse_a_device_without_a_report() {
    let fleet = Fleet::new(Path::new(EDGEWARD), &[], "");
    assert!(
        fleet
            .operator
            .publish("ew/v1/d/quiet/out/state", br#"{"state":"online"}"#, true)
    );
    assert!(
        fleet
            .operator
            .publish("ew/v1/d/dev-1/out/reported", reported(1).as_bytes(), true)
    );
    let o = fleet.deploy(
        "version = \"2\"\n",
        &["--group", "line-a"],
        &["--canary", "50%", "--timeout", "1s"],
    );
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("no report from quiet"),
        "{}",
        stderr(&o)
    );
    let o = fleet.deploy(
        "version = \"2\"\n",
        &["--group", "line-a"],
        &["--canary", "50%", "--timeout", "1s", "--allow-unreported"],
    );
    assert!(
        stderr(&o).contains("quiet: not chosen as canaries"),
        "{}",
        stderr(&o)
    );
    let o = fleet.fleet(&["attest", "--device", "quiet", "--timeout", "1s"]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("give --deployment-key"),
        "{}",
        stderr(&o)
    );
    // An unsigned deployment planted on its topic is not what it should run.
    assert!(fleet.operator.publish(
        "ew/v1/d/quiet/in/desired",
        br#"{"manifest":"version = \"9\"\n"}"#,
        true
    ));
    let key = fleet.deploy_pub.to_str().unwrap().to_owned();
    let o = fleet.fleet(&[
        "attest",
        "--device",
        "quiet",
        "--deployment-key",
        &key,
        "--timeout",
        "1s",
    ]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("give --group") && stderr(&o).contains("unsigned"),
        "{}",
        stderr(&o)
    );
}
