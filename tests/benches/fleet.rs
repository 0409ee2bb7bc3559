//! Fleet benchmark: N real `edgeward daemon` processes (default 100; each
//! its own state dir, soft HSM and broker identity) on one Mosquitto broker
//! and one docker-registry, all on this machine.
//!
//! 1. **Cloud path.** One signed deployment is published to the group.
//!    For every device, the bench times from the publish to the device's
//!    `reported` showing it applied with its module running. The component
//!    comes from the registry by digest.
//! 2. **Local path (baseline, same run, same devices).** N `edgeward deploy`
//!    calls, one per device through its management socket, all started
//!    together. The component is the same code with a different digest,
//!    so each device compiles again, as it did for the cloud path.
//! 3. **Broker messages per deployment.** From Mosquitto's `$SYS`
//!    counters.
//! 4. **Reconnect storm.** The broker is restarted; the bench times how
//!    long it takes until every device has connected again.
//! 5. **Idle cost of the cloud connection.** RSS and CPU of K daemons with
//!    `[cloud]`, then of the same K restarted without it.
//!
//! Run with `scripts/bench` (or `cargo bench -p edgeward-tests --bench
//! fleet`). `EDGEWARD_FLEET_DEVICES=N` sets N.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edgeward_tests::bench::{
    DaemonProcess as Device, cpu_ticks, first_times, ms, percentile, proc_kib,
};
use edgeward_tests::fixtures::Registry;
use edgeward_tests::fleet::Fleet;
use edgeward_tests::guests;

const EDGEWARD: &str = env!("CARGO_BIN_EXE_edgeward-under-test");
const WAIT: Duration = Duration::from_secs(600);
const IDLE_SAMPLE: usize = 10;
const IDLE_WINDOW: Duration = Duration::from_secs(10);

fn sorted_since(t0: Instant, at: &BTreeMap<String, Instant>) -> Vec<Duration> {
    let mut v: Vec<Duration> = at
        .values()
        .map(|t| t.saturating_duration_since(t0))
        .collect();
    v.sort();
    v
}

fn rss_kib(pid: u32) -> u64 {
    proc_kib(&pid.to_string(), "status", "VmRSS:")
}

/// Anonymous (heap, stacks) KiB of `pid`: the rest of its RSS is mapped
/// files (the binary, libraries) shared with every other daemon.
fn anon_kib(pid: u32) -> u64 {
    proc_kib(&pid.to_string(), "smaps_rollup", "Anonymous:")
}

/// Mean RSS and anonymous memory (MiB) and CPU (% of one core) of `pids`
/// over `IDLE_WINDOW`.
fn idle_cost(pids: &[u32]) -> (f64, f64, f64) {
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(&p.to_string())).collect();
    std::thread::sleep(IDLE_WINDOW);
    let ticks: u64 = pids
        .iter()
        .zip(&before)
        .map(|(p, b)| cpu_ticks(&p.to_string()).saturating_sub(*b))
        .sum();
    let rss: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    let anon: u64 = pids.iter().map(|p| anon_kib(*p)).sum();
    let n = pids.len().max(1) as f64;
    // Linux reports CPU time in clock ticks of 1/100 s.
    let cpu_pct = ticks as f64 / 100.0 / IDLE_WINDOW.as_secs_f64() / n * 100.0;
    (rss as f64 / 1024.0 / n, anon as f64 / 1024.0 / n, cpu_pct)
}

/// A copy of `component` with a custom section appended: the same code
/// under another digest, so it is compiled again.
fn recolored(component: &Path, out: &Path) -> String {
    let mut bytes = std::fs::read(component).expect("component");
    let name = b"edgeward-bench";
    let payload = b"local path";
    let body_len = 1 + name.len() + payload.len();
    bytes.push(0); // custom section id
    bytes.push(u8::try_from(body_len).expect("short"));
    bytes.push(u8::try_from(name.len()).expect("short"));
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(payload);
    std::fs::write(out, &bytes).expect("write");
    edgeward::measure::Digest::of(&bytes).to_string()
}

fn main() {
    let n: usize = std::env::var("EDGEWARD_FLEET_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    edgeward::daemon::raise_fd_limit();
    let ids: Vec<String> = (0..n).map(|i| format!("dev-{i:03}")).collect();
    let members: Vec<String> = ids.iter().map(|d| format!("{d}=line-a")).collect();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let mut fleet = Fleet::new(Path::new(EDGEWARD), &members, "topic read $SYS/#\n");
    let registry = Registry::start();
    println!("fleet benchmark: {n} daemons, one Mosquitto, one docker-registry");

    // Provision and start every device.
    let t = Instant::now();
    let mut devices: Vec<Device> = ids
        .iter()
        .map(|id| {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = fleet.device(
                dir.path(),
                id,
                "",
                "\n[runtime]\nmax_modules = 4\necho_output = false\n",
            );
            // Backoff as a fleet would have it, not a test's.
            let config = config
                .replace("reconnect_min = \"50ms\"", "reconnect_min = \"500ms\"")
                .replace("reconnect_max = \"400ms\"", "reconnect_max = \"10s\"")
                .replace("report_interval = \"200ms\"", "report_interval = \"1s\"");
            std::fs::write(dir.path().join("config.toml"), config).expect("config");
            Device::new(EDGEWARD, id, dir)
        })
        .collect();
    println!(
        "  provisioned {n} devices in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut states = fleet.operator.subscribe("ew/v1/d/+/out/state");
    let t = Instant::now();
    for d in &mut devices {
        d.start();
    }
    first_times(WAIT, &mut states, "/out/state", n, |v| {
        v["state"] == "online"
    });
    println!("  all {n} online in {:.1} s", t.elapsed().as_secs_f64());
    drop(states);

    // 1. The cloud path.
    let push = fleet.fleet(&[
        "push",
        guests::TEMPERATURE_SENSOR,
        &format!("oci://{}/edge/sensor:1", registry.host()),
    ]);
    assert!(push.status.success(), "push: {push:?}");
    let digest = edgeward::measure::Digest::of(
        &std::fs::read(guests::TEMPERATURE_SENSOR).expect("the sensor"),
    )
    .to_string();
    let manifest = format!(
        "version = \"1\"\n\n[[module]]\nname = \"sensor\"\ndigest = \"{digest}\"\nsource = \"oci://{}/edge/sensor:1\"\nenv = {{ INTERVAL_MS = \"1000\" }}\n",
        registry.host()
    );
    let payload = fleet.signed(&manifest, "group:line-a", None);
    let mut reported = fleet.operator.subscribe("ew/v1/d/+/out/reported");
    // Everything on the tree, to count what the deployment costs the broker.
    let mut tree = fleet.operator.subscribe("ew/v1/#");
    std::thread::sleep(Duration::from_millis(500));
    tree.pump();
    let before = tree.seen.len();
    let t0 = Instant::now();
    assert!(
        fleet
            .operator
            .publish("ew/v1/g/line-a/desired", &payload, true)
    );
    let applied = first_times(WAIT, &mut reported, "/out/reported", n, |v| {
        v["version"] == "1"
            && v["modules"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["name"] == "sensor" && m["state"] == "running")
            })
    });
    let cloud = sorted_since(t0, &applied);
    drop(reported);
    std::thread::sleep(Duration::from_secs(3));
    tree.pump();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for (t, _) in &tree.seen[before..] {
        let kind = t
            .strip_prefix("ew/v1/d/")
            .and_then(|r| r.split_once('/'))
            .map_or(t.as_str(), |x| x.1);
        *by_kind.entry(kind.to_owned()).or_default() += 1;
    }
    drop(tree);

    // 2. The local path: the same code under another digest.
    let local_dir = tempfile::tempdir().expect("tempdir");
    let local_file = local_dir.path().join("sensor-local.wasm");
    let local_digest = recolored(Path::new(guests::TEMPERATURE_SENSOR), &local_file);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n + 1));
    let handles: Vec<_> = devices
        .iter()
        .map(|d| {
            let dir = d.dir.path().to_owned();
            let manifest = dir.join("local.toml");
            std::fs::write(
                &manifest,
                format!(
                    "version = \"1\"\n\n[[module]]\nname = \"sensor-local\"\nfile = \"{}\"\ndigest = \"{local_digest}\"\nenv = {{ INTERVAL_MS = \"1000\" }}\n",
                    local_file.display()
                ),
            )
            .expect("manifest");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let out = Command::new(EDGEWARD)
                    .arg("deploy")
                    .arg(&manifest)
                    .env("EDGEWARD_SOCKET", dir.join("api.sock"))
                    .env_remove("EDGEWARD_CONFIG")
                    .output()
                    .expect("edgeward deploy");
                assert!(out.status.success(), "deploy: {out:?}");
                Instant::now()
            })
        })
        .collect();
    barrier.wait();
    let t1 = Instant::now();
    let mut local: Vec<Duration> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .expect("deploy thread")
                .saturating_duration_since(t1)
        })
        .collect();
    local.sort();
    let local_all = *local.last().unwrap_or(&Duration::ZERO);

    println!(
        "\n1-2. one deployment to {n} devices: publish -> reported applied, against {n} local deploys started together"
    );
    for (name, p) in [("p50", 0.50), ("p99", 0.99), ("all", 1.0)] {
        let (c, l) = (percentile(&cloud, p), percentile(&local, p));
        println!(
            "  {name}: cloud {:>8.0} ms   local {:>8.0} ms   ratio {:.2}x",
            ms(c),
            ms(l),
            ms(c) / ms(l).max(0.001)
        );
    }
    println!(
        "  (local 'all' is when the last deploy call returned: {:.0} ms)",
        ms(local_all)
    );

    let from_devices: usize = by_kind
        .iter()
        .filter(|(k, _)| k.starts_with("out/"))
        .map(|(_, v)| v)
        .sum();
    let events = by_kind.get("out/events").copied().unwrap_or(0);
    println!(
        "\n3. messages for the deployment: 1 publish to the group, delivered to {n} devices; the devices published {from_devices} ({:.1} each: {by_kind:?}); the broker delivered {events} events back to their senders (the outbox receipts)",
        from_devices as f64 / n as f64
    );

    // 4. Reconnect storm.
    fleet.broker.shut_down();
    let t2 = Instant::now();
    fleet.broker.restart();
    let mut states = fleet.operator.subscribe("ew/v1/d/+/out/state");
    let back = first_times(WAIT, &mut states, "/out/state", n, |v| {
        v["state"] == "online" && v["connections"].as_u64().is_some_and(|c| c >= 2)
    });
    let storm = sorted_since(t2, &back);
    drop(states);
    println!(
        "\n4. reconnect storm (broker restarted): p50 {:.0} ms, p99 {:.0} ms, all {n} back in {:.0} ms (backoff 500 ms to 10 s with jitter)",
        ms(percentile(&storm, 0.5)),
        ms(percentile(&storm, 0.99)),
        ms(percentile(&storm, 1.0))
    );

    // 5. Idle cost of the cloud connection: K daemons restarted with it
    // (fresh processes, code from the cache), then restarted without.
    let k = IDLE_SAMPLE.min(n);
    let mut states = fleet.operator.subscribe("ew/v1/d/+/out/state");
    for d in &mut devices[..k] {
        d.stop();
        d.start();
    }
    first_times(WAIT, &mut states, "/out/state", k, |v| {
        v["state"] == "online" && v["connections"] == 1
    });
    drop(states);
    for d in &devices[..k] {
        wait_running(d, &["sensor", "sensor-local"]);
    }
    std::thread::sleep(Duration::from_secs(3));
    let pids: Vec<u32> = devices[..k].iter().map(Device::pid).collect();
    let (rss_on, anon_on, cpu_on) = idle_cost(&pids);
    for d in &mut devices[..k] {
        d.stop();
        let path = d.dir.path().join("config.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        let (head, tail) = text.split_once("[cloud]").expect("a [cloud] table");
        // The cloud table runs to the next table.
        let rest = tail.find("\n[").map_or("", |i| &tail[i..]);
        std::fs::write(&path, format!("{head}{rest}")).expect("config");
        d.start();
    }
    for d in &devices[..k] {
        wait_running(d, &["sensor", "sensor-local"]);
    }
    std::thread::sleep(Duration::from_secs(3));
    let pids: Vec<u32> = devices[..k].iter().map(Device::pid).collect();
    let (rss_off, anon_off, cpu_off) = idle_cost(&pids);
    println!(
        "\n5. idle, {k} daemons each running the two sensors (one reading a second):\n  cloud on:  {rss_on:.1} MiB RSS ({anon_on:.1} anonymous), {cpu_on:.2}% of a core\n  cloud off: {rss_off:.1} MiB RSS ({anon_off:.1} anonymous), {cpu_off:.2}% of a core\n  ratio {:.2}x RSS, {:.2}x CPU",
        rss_on / rss_off.max(0.001),
        cpu_on / cpu_off.max(0.0001)
    );
}

/// Waits until `names` all run on `d` (its management socket).
fn wait_running(d: &Device, names: &[&str]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = Command::new(EDGEWARD)
            .args(["module", "list", "--json"])
            .env("EDGEWARD_SOCKET", d.dir.path().join("api.sock"))
            .env_remove("EDGEWARD_CONFIG")
            .output()
            .expect("edgeward module list");
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && names.iter().all(|n| {
                v.as_array()
                    .is_some_and(|m| m.iter().any(|m| m["name"] == *n && m["state"] == "running"))
            })
        {
            return;
        }
        assert!(Instant::now() < deadline, "{} did not come back", d.id);
        std::thread::sleep(Duration::from_millis(100));
    }
}
