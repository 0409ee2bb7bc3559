//! Enrollment benchmark: N real `edgeward daemon` processes (default 100;
//! soft backend, each with its own state dir and a key derived for its id
//! in a symmetric-key group) started at once with `[provisioning]`, on an
//! enrollment broker served by two `fleet enroll serve` instances on one
//! shared subscription, and a fleet broker, all Mosquitto, all on this
//! machine.
//!
//! 1. **Enrollment at first start.** From the spawn of every daemon to
//!    its `ew/v1/d/<id>/out/state` online on the fleet broker, logged in
//!    with the certificate its enrollment issued: time until all are
//!    connected, p50 and p99 per device, enrollments per minute, and the
//!    messages per second each service instance answered.
//! 2. **Baseline (same run, same devices).** The daemons stopped and
//!    started again, enrolled: time until all are connected. The ratio
//!    is what enrolling adds to a fleet's first start.
//! 3. **One device on swtpm.** `edgeward provision` of one TPM device
//!    (credential activation and TPM2_Certify through its key daemon)
//!    against the same for one soft board, alternating, medians.
//!
//! Run with `scripts/bench` (or `cargo bench -p edgeward-tests --bench
//! enroll`). `EDGEWARD_ENROLL_DEVICES=N` sets N.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edgeward_tests::bench::{DaemonProcess as Device, first_times, ms, percentile};
use edgeward_tests::fixtures::Swtpm;
use edgeward_tests::fleet::Enrolling;

const EDGEWARD: &str = env!("CARGO_BIN_EXE_edgeward-under-test");
const WAIT: Duration = Duration::from_secs(900);
const SWTPM_RUNS: usize = 5;

/// Each device's time from its spawn to online, sorted; and the time
/// from `t0` until the last one.
fn latencies(
    devices: &BTreeMap<String, Device>,
    online: &BTreeMap<String, Instant>,
    t0: Instant,
) -> (Vec<Duration>, Duration) {
    let mut v: Vec<Duration> = online
        .iter()
        .map(|(id, t)| t.saturating_duration_since(devices[id].spawned))
        .collect();
    v.sort();
    let all = online
        .values()
        .map(|t| t.saturating_duration_since(t0))
        .max()
        .unwrap_or_default();
    (v, all)
}

/// `edgeward provision` with `args` in `dir`, timed; panics if it fails.
fn provision(dir: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new(EDGEWARD)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("provision")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .args(args)
        .env_remove("EDGEWARD_KEYD")
        .env_remove("EDGEWARD_LOG")
        .output()
        .expect("edgeward provision");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "edgeward provision: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn main() {
    let n: usize = std::env::var("EDGEWARD_ENROLL_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    edgeward::daemon::raise_fd_limit();
    let ids: Vec<String> = (0..n).map(|i| format!("board-{i:03}")).collect();
    let members: Vec<String> = ids.iter().map(|d| format!("{d}=line-a")).collect();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let org = Enrolling::new(
        Path::new(EDGEWARD),
        &members,
        None,
        "[[symmetric]]\ngroup = \"boards\"\ndevice_id = \"board-*\"\ngroups = [\"line-a\"]\n",
    );
    println!(
        "enrollment benchmark: {n} daemons, two service instances, one enrollment and one fleet broker (Mosquitto)"
    );
    let mut devices: BTreeMap<String, Device> = ids
        .iter()
        .map(|id| {
            let dir = tempfile::tempdir().expect("tempdir");
            let key = dir.path().join("enrollment.key");
            org.derive_key(id, &key);
            // Backoff and timeouts as a fleet would have them.
            let config = org
                .device_config(
                    id,
                    "",
                    &format!(
                        "group = \"boards\"\nenrollment_key = \"{}\"\n",
                        key.display()
                    ),
                )
                .replace("retry_min = \"100ms\"", "retry_min = \"1s\"")
                .replace("retry_max = \"500ms\"", "retry_max = \"10s\"")
                .replace("timeout = \"5s\"", "timeout = \"30s\"")
                .replace("reconnect_min = \"50ms\"", "reconnect_min = \"500ms\"")
                .replace("reconnect_max = \"400ms\"", "reconnect_max = \"10s\"")
                .replace("report_interval = \"200ms\"", "report_interval = \"1s\"")
                + "\n[runtime]\nmax_modules = 4\necho_output = false\n";
            std::fs::write(dir.path().join("config.toml"), config).expect("config");
            (id.clone(), Device::new(EDGEWARD, id, dir))
        })
        .collect();

    // 1. Every device starts at once, not enrolled.
    let first = org.serve();
    let second = org.serve();
    let mut sub = org.fleet.operator.subscribe("ew/v1/d/+/out/state");
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    for d in devices.values_mut() {
        d.start();
    }
    let online = first_times(WAIT, &mut sub, "/out/state", n, |v| v["state"] == "online");
    let (enroll_lat, enroll_all) = latencies(&devices, &online, t0);
    let (a, b) = (first.stop(), second.stop());
    let audit = std::fs::read_to_string(org.dir.path().join("audit.jsonl")).expect("audit log");
    let recorded = audit.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(recorded, n, "every device enrolled once");
    for d in devices.values() {
        assert!(
            d.dir.path().join("state/identity/enrollment.json").exists(),
            "a device without its enrollment"
        );
    }
    let secs = enroll_all.as_secs_f64();
    println!(
        "enroll_first_start devices={n} all_connected_ms={:.0} p50_ms={:.0} p99_ms={:.0} enrollments_per_min={:.0}",
        ms(enroll_all),
        ms(percentile(&enroll_lat, 0.5)),
        ms(percentile(&enroll_lat, 0.99)),
        n as f64 / secs * 60.0
    );
    println!(
        "enroll_service instance_a_messages={a} instance_b_messages={b} a_per_s={:.1} b_per_s={:.1} messages_per_enrollment={:.2}",
        a as f64 / secs,
        b as f64 / secs,
        (a + b) as f64 / n as f64
    );
    println!(
        "enroll_vs_dps registrations_per_min={:.0} dps_unit_per_min=1000 ratio={:.2}",
        n as f64 / secs * 60.0,
        n as f64 / secs * 60.0 / 1000.0
    );

    // 2. Baseline: the same devices, enrolled, started again.
    for d in devices.values_mut() {
        d.stop();
    }
    let mut sub = org.fleet.operator.subscribe("ew/v1/d/+/out/state");
    std::thread::sleep(Duration::from_millis(300));
    let t1 = Instant::now();
    for d in devices.values_mut() {
        d.start();
    }
    let online = first_times(WAIT, &mut sub, "/out/state", n, |v| v["state"] == "online");
    let (base_lat, base_all) = latencies(&devices, &online, t1);
    println!(
        "enrolled_restart devices={n} all_connected_ms={:.0} p50_ms={:.0} p99_ms={:.0}",
        ms(base_all),
        ms(percentile(&base_lat, 0.5)),
        ms(percentile(&base_lat, 0.99)),
    );
    println!(
        "enroll_first_start_vs_enrolled_restart ratio={:.2} p50_ratio={:.2}",
        enroll_all.as_secs_f64() / base_all.as_secs_f64().max(1e-9),
        percentile(&enroll_lat, 0.5).as_secs_f64()
            / percentile(&base_lat, 0.5).as_secs_f64().max(1e-9)
    );
    for d in devices.values_mut() {
        d.stop();
    }
    drop(devices);

    // 3. One device on swtpm against one soft board, alternating.
    let (tpm, manufacturer) = Swtpm::start_with_ek_certificate();
    let factory = {
        let state = tempfile::tempdir().expect("tempdir");
        let hsm = edgeward_hsm_hw::tpm::TpmHsm::open(state.path(), tpm.config()).expect("tpm");
        let ek = edgeward::hsm::Hsm::endorsement_certificate(&hsm)
            .expect("EK certificate")
            .expect("an EK certificate");
        edgeward::hsm::Hsm::close(&hsm);
        edgeward::enroll::service::factory_fingerprint(&ek).expect("fingerprint")
    };
    let tpm_org = Enrolling::new(
        Path::new(EDGEWARD),
        &[],
        Some(&manufacturer),
        &format!(
            "[[device]]\nfactory = \"{factory}\"\ndevice_id = \"gw-1\"\ngroups = [\"line-a\"]\n\
             [[symmetric]]\ngroup = \"boards\"\ndevice_id = \"board-*\"\n"
        ),
    );
    let serving = tpm_org.serve();
    let tpm_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tpm_dir.path().join("config.toml"),
        tpm_org.device_config(
            "gw-1",
            &format!("[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n", tpm.tcti()),
            "",
        ),
    )
    .expect("config");
    let soft_dir = tempfile::tempdir().expect("tempdir");
    let key = soft_dir.path().join("enrollment.key");
    tpm_org.derive_key("board-1", &key);
    std::fs::write(
        soft_dir.path().join("config.toml"),
        tpm_org.device_config(
            "board-1",
            "",
            &format!(
                "group = \"boards\"\nenrollment_key = \"{}\"\n",
                key.display()
            ),
        ),
    )
    .expect("config");
    let (mut on_tpm, mut on_soft) = (Vec::new(), Vec::new());
    for _ in 0..SWTPM_RUNS {
        on_tpm.push(provision(tpm_dir.path(), &[]));
        on_soft.push(provision(soft_dir.path(), &[]));
    }
    on_tpm.sort();
    on_soft.sort();
    let (t, s) = (on_tpm[SWTPM_RUNS / 2], on_soft[SWTPM_RUNS / 2]);
    println!(
        "enroll_one_device swtpm_ms={:.0} soft_ms={:.0} ratio={:.2} (edgeward provision, whole process, median of {SWTPM_RUNS})",
        ms(t),
        ms(s),
        t.as_secs_f64() / s.as_secs_f64().max(1e-9)
    );
    drop(serving);
}
