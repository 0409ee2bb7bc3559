//! The cloud interface against a real broker: Mosquitto (Debian's package)
//! with a TLS listener, client certificates from an organisation's root
//! (made with the openssl CLI) and the fleet ACL, on a free loopback port.
//! Operators are Mosquitto's own command-line clients.
//!
//! Who may reach the device through it and what they could try: whoever
//! can publish on its `in/` topics or its groups' (unsigned, wrongly
//! signed, replayed, older or tampered deployments, garbage, a component
//! that is not the pinned one, a module another origin owns), another
//! device (the ACL: not its topics), and the broker going away (the device
//! runs on and reports when it is back). Each has a test here.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::*;
use edgeward_tests::fixtures::{Registry, SoftHsmToken, Swtpm};
use edgeward_tests::fleet::Fleet;

const WAIT: Duration = Duration::from_secs(60);

/// The organisation of `edgeward_tests::fleet`, run with the binary under
/// test.
fn new_fleet(members: &[&str]) -> Fleet {
    Fleet::new(Path::new(EDGEWARD), members, "")
}

/// A daemon started on `config`, once it has connected to the broker.
fn connected(s: &Scratch, config: &str) -> Daemon {
    let mut d = Daemon::start(s, config);
    d.wait_for("the broker", |_, err| {
        err.iter().any(|l| l.contains("connected to the broker"))
    });
    d
}

/// A device's config, provisioned in `s` (see `Fleet::device`).
fn device(fleet: &Fleet, s: &Scratch, id: &str, hsm: &str, extra: &str) -> String {
    fleet.device(s.path(), id, hsm, extra)
}

fn sensor_manifest(version: &str, name: &str, source: &str) -> String {
    pinned_manifest(
        version,
        name,
        &sha256sum(guests::TEMPERATURE_SENSOR),
        source,
    )
}

fn pinned_manifest(version: &str, name: &str, digest: &str, source: &str) -> String {
    format!(
        "version = \"{version}\"\n\n[[module]]\nname = \"{name}\"\ndigest = \"{digest}\"\nsource = \"{source}\"\nenv = {{ INTERVAL_MS = \"100\" }}\n"
    )
}

fn running(reported: &serde_json::Value, version: &str, names: &[&str]) -> bool {
    reported["version"] == version && running_named(reported, names)
}

fn running_named(reported: &serde_json::Value, names: &[&str]) -> bool {
    names.iter().all(|n| {
        reported["modules"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["name"] == *n && m["state"] == "running"))
    })
}

#[test]
fn a_device_applies_signed_deployments_from_the_broker_and_refuses_the_rest() {
    let fleet = new_fleet(&["gw-1=line-a"]);
    let s = Scratch::new();
    let config = device(
        &fleet,
        &s,
        "gw-1",
        "",
        &format!(
            "\n[[module]]\nname = \"local\"\nfile = \"{f}\"\ndigest = \"{d}\"\nenv = {{ INTERVAL_MS = \"1000\" }}\n",
            f = guests::TEMPERATURE_SENSOR,
            d = sha256sum(guests::TEMPERATURE_SENSOR)
        ),
    );
    let mut out = fleet.operator.subscribe("ew/v1/d/gw-1/out/#");
    let d = Daemon::start(&s, &config);
    let (state, reported, events) = (
        "ew/v1/d/gw-1/out/state",
        "ew/v1/d/gw-1/out/reported",
        "ew/v1/d/gw-1/out/events",
    );
    out.wait(state, WAIT, |v| v["state"] == "online");
    out.wait(reported, WAIT, |v| {
        v["version"].is_null() && running_named(v, &["local"])
    });

    // A signed deployment, its component fetched by the pinned digest.
    let desired = "ew/v1/d/gw-1/in/desired";
    let v1 = sensor_manifest("1", "sensor", guests::TEMPERATURE_SENSOR);
    assert!(
        fleet
            .operator
            .publish(desired, &fleet.signed(&v1, "device:gw-1", None), true)
    );
    let ev = out.wait(events, WAIT, |v| v["kind"] == "deployment-applied");
    assert_eq!(ev["version"], "1");
    assert_eq!(ev["plan"]["add"], serde_json::json!(["sensor"]));
    let r = out.wait(reported, WAIT, |v| running(v, "1", &["sensor", "local"]));
    assert_eq!(
        r["modules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "sensor")
            .unwrap()["origin"],
        "cloud"
    );
    assert!(
        r["runtime"]["platform"]["version"]
            .as_str()
            .unwrap()
            .starts_with("wasmtime ")
    );

    // The cloud's module is the cloud's on every route: an operator can
    // neither replace, remove nor stop it (it would keep the cloud's
    // identity and sealed data).
    let sensor_file = guests::TEMPERATURE_SENSOR;
    for args in [
        vec!["module", "update", "sensor", sensor_file],
        vec!["module", "remove", "sensor"],
        vec!["module", "stop", "sensor"],
    ] {
        let o = s.edgeward().args(&args).output().unwrap();
        assert_status(&o, 1);
        assert!(
            stderr(&o).contains("belongs to the cloud, not the operator"),
            "{args:?}: {}",
            stderr(&o)
        );
    }

    // Each of these is refused, reported, and changes nothing.
    let refused =
        |out: &mut edgeward_tests::fixtures::Subscription, payload: Vec<u8>, want: &str| {
            assert!(fleet.operator.publish(desired, &payload, false));
            let ev = out.wait(events, WAIT, |v| {
                v["kind"] == "deployment-refused"
                    && v["reason"].as_str().is_some_and(|r| r.contains(want))
            });
            eprintln!("refused as expected: {}", ev["reason"]);
        };
    let v2 = sensor_manifest("2", "sensor2", guests::TEMPERATURE_SENSOR);
    let unsigned = serde_json::to_vec(&serde_json::json!({ "manifest": v2 })).unwrap();
    refused(&mut out, unsigned, "unsigned");
    let stranger = s.path().join("stranger");
    assert_status(
        &s.edgeward()
            .args(["keygen", "--out"])
            .arg(&stranger)
            .output()
            .unwrap(),
        0,
    );
    refused(
        &mut out,
        fleet.signed(&v2, "device:gw-1", Some(&s.path().join("stranger.key"))),
        "signature",
    );
    let mut tampered: serde_json::Value =
        serde_json::from_slice(&fleet.signed(&v2, "device:gw-1", None)).unwrap();
    tampered["manifest"] = v2.replace("sensor2", "sensor3").into();
    refused(
        &mut out,
        serde_json::to_vec(&tampered).unwrap(),
        "signature",
    );
    // Replayed: the applied version with other contents; and an older one.
    let replay = sensor_manifest("1", "sensor9", guests::TEMPERATURE_SENSOR);
    refused(
        &mut out,
        fleet.signed(&replay, "device:gw-1", None),
        "not newer",
    );
    refused(
        &mut out,
        b"{\"manifest\": 7}".to_vec(),
        "not a signed manifest",
    );
    refused(&mut out, b"\xff\xfe".to_vec(), "not a signed manifest");
    // Signed by the deployment key, but for another device, for a group
    // (on the device's own topic), or expired: refused.
    let theirs = sensor_manifest("2", "sensor2", guests::TEMPERATURE_SENSOR);
    refused(
        &mut out,
        fleet.signed(&theirs, "device:gw-2", None),
        "addressed to device:gw-2",
    );
    refused(
        &mut out,
        fleet.signed(&theirs, "group:line-a", None),
        "addressed to group:line-a, not to this device",
    );
    let expired = format!("target = \"device:gw-1\"\nexpires = \"2020-01-01T00:00:00Z\"\n{theirs}");
    refused(
        &mut out,
        fleet.signed(&expired, "device:gw-1", None),
        "expired",
    );
    // A version far past the applied one would hold back every later
    // deployment: refused.
    let frozen = sensor_manifest("9223372036854775807", "sensor2", guests::TEMPERATURE_SENSOR);
    refused(
        &mut out,
        fleet.signed(&frozen, "device:gw-1", None),
        "max_version_step",
    );
    // A module the config file owns.
    let clash = sensor_manifest("3", "local", guests::TEMPERATURE_SENSOR);
    refused(
        &mut out,
        fleet.signed(&clash, "device:gw-1", None),
        "another origin owns",
    );
    // A source that gives another component than the pinned one: refused
    // before it is stored or compiled.
    let swapped = pinned_manifest(
        "4",
        "sensor4",
        &sha256sum(guests::IDENTITY_PROBE),
        guests::TEMPERATURE_SENSOR,
    );
    refused(
        &mut out,
        fleet.signed(&swapped, "device:gw-1", None),
        "not the pinned",
    );
    let r = out.wait(reported, WAIT, |v| running(v, "1", &["sensor", "local"]));
    let names: Vec<&str> = r["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let stored: Vec<_> = std::fs::read_dir(s.state().join("components"))
        .unwrap()
        .collect();
    assert_eq!(stored.len(), 1, "only the sensor is stored: {stored:?}");

    // The group's deployment, newer, applies; the device's older one then
    // does not.
    let v5 = sensor_manifest("5", "group-sensor", guests::TEMPERATURE_SENSOR);
    assert!(fleet.operator.publish(
        "ew/v1/g/line-a/desired",
        &fleet.signed(&v5, "group:line-a", None),
        true
    ));
    let ev = out.wait(events, WAIT, |v| {
        v["kind"] == "deployment-applied" && v["version"] == "5"
    });
    assert_eq!(ev["source"], "group line-a");
    assert_eq!(ev["plan"]["remove"], serde_json::json!(["sensor"]));
    out.wait(reported, WAIT, |v| {
        running(v, "5", &["group-sensor", "local"])
    });
    let v4 = sensor_manifest("4", "sensor", guests::TEMPERATURE_SENSOR);
    refused(
        &mut out,
        fleet.signed(&v4, "device:gw-1", None),
        "not newer",
    );
    // Another group's deployment, replayed on this device's group topic.
    let v6 = sensor_manifest("6", "sensor6", guests::TEMPERATURE_SENSOR);
    assert!(fleet.operator.publish(
        "ew/v1/g/line-a/desired",
        &fleet.signed(&v6, "group:line-b", None),
        false
    ));
    out.wait(events, WAIT, |v| {
        v["kind"] == "deployment-refused"
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("addressed to group:line-b"))
    });

    // A clean stop says offline (retained).
    let (status, _, _) = d.terminate();
    assert!(status.success());
    out.wait(state, WAIT, |v| v["state"] == "offline");
}

#[test]
fn the_broker_confines_each_device_to_its_own_topics() {
    let fleet = new_fleet(&[]);
    let gw2 = fleet.user("gw-2");
    let mut everything = fleet.operator.subscribe("ew/v1/#");
    let mut spy = gw2.subscribe("ew/v1/d/gw-1/#");
    let mut own = gw2.subscribe("ew/v1/d/gw-2/in/#");
    assert!(
        fleet
            .operator
            .publish("ew/v1/d/gw-1/in/desired", b"{\"for\":\"gw-1\"}", true)
    );
    // gw-2 writes into gw-1's tree and into its own in/: both dropped.
    gw2.publish("ew/v1/d/gw-1/in/desired", b"{\"forged\":1}", true);
    gw2.publish("ew/v1/d/gw-1/out/state", b"{\"forged\":2}", true);
    gw2.publish("ew/v1/d/gw-2/in/desired", b"{\"forged\":3}", true);
    // What it may do, it can: write its own out/, read its own in/.
    assert!(gw2.publish("ew/v1/d/gw-2/out/state", b"{\"state\":\"online\"}", true));
    everything.wait("ew/v1/d/gw-2/out/state", WAIT, |v| v["state"] == "online");
    assert!(
        fleet
            .operator
            .publish("ew/v1/d/gw-2/in/desired", b"{\"ok\":1}", false)
    );
    own.wait("ew/v1/d/gw-2/in/desired", WAIT, |v| v["ok"] == 1);
    everything.wait("ew/v1/d/gw-1/in/desired", WAIT, |v| v["for"] == "gw-1");
    // A later message on each confirms nothing earlier is still in flight.
    assert!(
        fleet
            .operator
            .publish("ew/v1/d/gw-1/out/events", b"{\"last\":1}", false)
    );
    everything.wait("ew/v1/d/gw-1/out/events", WAIT, |v| v["last"] == 1);
    assert!(
        spy.drain(Duration::from_millis(300)).is_empty(),
        "gw-2 read gw-1's topics: {:?}",
        spy.seen
    );
    assert!(
        !everything
            .seen
            .iter()
            .chain(&own.seen)
            .any(|(_, p)| p.contains("forged")),
        "a forged message got through: {:?}",
        everything.seen
    );
}

/// Connects a device whose HSM is `hsm` and checks the broker took it, and
/// that the broker key is that HSM's.
fn connects_with_its_hsm_key(hsm: &str, backend: &str) {
    let fleet = new_fleet(&[]);
    let s = Scratch::new();
    let id = format!("gw-{backend}");
    let config = device(&fleet, &s, &id, hsm, "");
    let mut out = fleet.operator.subscribe(&format!("ew/v1/d/{id}/out/#"));
    let d = Daemon::start(&s, &config);
    out.wait(&format!("ew/v1/d/{id}/out/state"), WAIT, |v| {
        v["state"] == "online"
    });
    let r = out.wait(&format!("ew/v1/d/{id}/out/reported"), WAIT, |v| {
        v["device"] == id.as_str()
    });
    assert_eq!(r["daemon"]["hsm"], backend);
    let (status, _, _) = d.terminate();
    assert!(status.success());
    // The backend holds the broker key.
    let o = s
        .edgeward()
        .args(["hsm", "info", "--json", "--config"])
        .arg(s.path().join("config.toml"))
        .output()
        .unwrap();
    assert_status(&o, 0);
    assert!(stdout(&o).contains("cloud-client"), "{}", stdout(&o));
}

#[test]
fn on_the_tpm_the_device_connects_with_a_key_the_tpm_holds() {
    let tpm = Swtpm::start();
    connects_with_its_hsm_key(
        &format!("[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n", tpm.tcti()),
        "tpm",
    );
}

#[test]
fn on_pkcs11_the_device_connects_with_a_key_the_token_holds() {
    let token = SoftHsmToken::new();
    connects_with_its_hsm_key(&token.hsm_toml(), "pkcs11");
}

#[test]
fn a_device_runs_its_last_deployment_without_the_broker_and_reports_when_it_returns() {
    let mut fleet = new_fleet(&[]);
    let s = Scratch::new();
    let config = device(&fleet, &s, "gw-1", "", "");
    let mut out = fleet.operator.subscribe("ew/v1/d/gw-1/out/#");
    let d = Daemon::start(&s, &config);
    let m = sensor_manifest("1", "sensor", guests::TEMPERATURE_SENSOR);
    assert!(fleet.operator.publish(
        "ew/v1/d/gw-1/in/desired",
        &fleet.signed(&m, "device:gw-1", None),
        true
    ));
    let first = out.wait("ew/v1/d/gw-1/out/reported", WAIT, |v| {
        running(v, "1", &["sensor"])
    });
    let (status, _, _) = d.terminate();
    assert!(status.success());
    out.wait("ew/v1/d/gw-1/out/state", WAIT, |v| v["state"] == "offline");
    drop(out);

    // The broker is down when the device boots: the deployment runs.
    fleet.broker.stop();
    let mut d = Daemon::start(&s, &config);
    d.wait_for("the broker to be missed", |_, err| {
        err.iter().any(|l| l.contains("broker connection lost"))
    });
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let o = s
            .edgeward()
            .args(["module", "list", "--json"])
            .output()
            .unwrap();
        if o.status.success() && stdout(&o).contains("\"running\"") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sensor did not start offline: {}",
            stdout(&o)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // It comes back: the device reconnects on its own and reports.
    fleet.broker.restart();
    let mut out = fleet.operator.subscribe("ew/v1/d/gw-1/out/#");
    out.wait("ew/v1/d/gw-1/out/state", WAIT, |v| v["state"] == "online");
    let again = out.wait("ew/v1/d/gw-1/out/reported", WAIT, |v| {
        v["daemon"]["instance"] != first["daemon"]["instance"] && running(v, "1", &["sensor"])
    });
    assert_eq!(again["manifest"], first["manifest"]);
    let (status, _, _) = d.terminate();
    assert!(status.success());
}

/// `fleet status --json`, by device.
fn status(fleet: &Fleet) -> std::collections::BTreeMap<String, serde_json::Value> {
    fleet.status()
}

/// `fleet push FILE oci://…`: (component digest, manifest digest).
fn push(fleet: &Fleet, file: &str, reference: &str) -> (String, String) {
    let o = fleet.fleet(&["push", file, reference]);
    assert_status(&o, 0);
    let out = stdout(&o);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    (field("component"), field("manifest"))
}

#[test]
fn components_come_from_an_oci_registry_by_pinned_digest_and_deployments_roll_back() {
    let fleet = new_fleet(&[]);
    let registry = Registry::start();
    let s = Scratch::new();
    let config = device(&fleet, &s, "gw-1", "", "");
    let d = Daemon::start(&s, &config);
    let (component, manifest) = push(
        &fleet,
        guests::TEMPERATURE_SENSOR,
        &format!("oci://{}/edge/sensor:1.0", registry.host()),
    );
    assert_eq!(component, sha256sum(guests::TEMPERATURE_SENSOR));
    assert!(manifest.starts_with("sha256:") && manifest != component);
    let (other, _) = push(
        &fleet,
        guests::IDENTITY_PROBE,
        &format!("oci://{}/edge/probe:1.0", registry.host()),
    );

    // By tag and by manifest digest: the same component, fetched once.
    let v1 = format!(
        "version = \"1\"\n\n[[module]]\nname = \"sensor\"\ndigest = \"{component}\"\nsource = \"oci://{r}/edge/sensor:1.0\"\nenv = {{ INTERVAL_MS = \"100\" }}\n\n[[module]]\nname = \"sensor-b\"\ndigest = \"{component}\"\nsource = \"oci://{r}/edge/sensor@{manifest}\"\nenv = {{ INTERVAL_MS = \"100\" }}\n",
        r = registry.host()
    );
    let o = fleet.deploy(
        &v1,
        &["--device", "gw-1"],
        &["--wait", "--bake", "500ms", "--timeout", "60s"],
    );
    assert_status(&o, 0);
    let st = status(&fleet);
    assert_eq!(st["gw-1"]["status"], "ok", "{st:?}");
    assert_eq!(st["gw-1"]["version"], "1");
    assert_eq!(st["gw-1"]["online"], true);

    // Remote attestation of a soft device. With neither an EK CA nor an
    // enrolled AK it is refused before any challenge: any key could have
    // signed software evidence.
    let deployment_key = fleet.deploy_pub.to_str().unwrap().to_owned();
    let o = fleet.fleet(&[
        "attest",
        "--device",
        "gw-1",
        "--deployment-key",
        &deployment_key,
        "--json",
    ]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("give --ek-ca"), "{}", stderr(&o));
    // Its AK enrolled (read on the device when it was provisioned), a
    // policy that accepts software devices and version 1's two modules: a
    // nonce, verified, and reported unproven.
    let local = s.path().join("provisioned");
    assert_status(
        &s.edgeward()
            .args(["attest", "--nonce", "00", "--out"])
            .arg(&local)
            .arg("--config")
            .arg(s.path().join("config.toml"))
            .output()
            .unwrap(),
        0,
    );
    let policy = s.write(
        "policy.toml",
        &format!(
            "backends = [\"soft\"]\naks = [\"{}\"]\n[modules]\nsensor = [\"{component}\"]\nsensor-b = [\"{component}\"]\n",
            local.join("ak.pem").display()
        ),
    );
    let o = fleet.fleet(&[
        "attest",
        "--device",
        "gw-1",
        "--policy",
        policy.to_str().unwrap(),
        "--json",
    ]);
    assert_status(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["proven"], false, "a software device: {v:#}");

    // A pin the registry's layer does not match: refused before
    // downloading, reported, and `deploy --wait` says so.
    let wrong = format!(
        "version = \"2\"\n\n[[module]]\nname = \"probe\"\ndigest = \"sha256:{}\"\nsource = \"oci://{}/edge/probe:1.0\"\n",
        "0".repeat(64),
        registry.host()
    );
    // `fleet watch` sees the refusal as it happens. It is subscribed once
    // it prints the device's retained state; the refusal (an event, not
    // retained) comes after.
    let mut watch = fleet.fleet_spawn(&["watch", "--duration", "120s"]);
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let reader = {
        let out = watch.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufRead::lines(std::io::BufReader::new(out)) {
                let Ok(l) = l else { break };
                if lines_tx.send(l).is_err() {
                    break;
                }
            }
        })
    };
    let mut seen = Vec::new();
    let first = lines
        .recv_timeout(Duration::from_secs(60))
        .expect("fleet watch printed no retained state");
    seen.push(first);
    let o = fleet.deploy(
        &wrong,
        &["--device", "gw-1"],
        &["--wait", "--timeout", "60s"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let refusal = loop {
        if let Some(v) = seen
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"]["kind"] == "deployment-refused")
        {
            break v;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("fleet watch saw no refusal: {seen:?}"),
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = reader.join();
    assert_eq!(refusal["device"], "gw-1");
    assert_eq!(refusal["message"]["version"], "2");
    assert_status(&o, 3);
    assert!(
        stderr(&o).contains("refused before downloading"),
        "{}",
        stderr(&o)
    );
    let st = status(&fleet);
    assert_eq!(st["gw-1"]["status"], "failed", "{st:?}");
    assert_eq!(st["gw-1"]["desired"], 2);
    let stored: Vec<String> = std::fs::read_dir(s.state().join("components"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        stored,
        [format!("{}.wasm", component.replace(':', "-"))],
        "only the sensor is stored, once; not {other}"
    );
    // An older version is refused by the CLI before it is published.
    let o = fleet.deploy(&v1, &["--device", "gw-1"], &[]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("must be newer"), "{}", stderr(&o));

    // Rollback takes only what this deployment key signed for this
    // target: a deployment planted under ops/…/previous by someone who can
    // write the broker (signed by another key, or the key's own deployment
    // for another device) is not signed again.
    let previous = "ew/v1/ops/d/gw-1/previous";
    let genuine = {
        let sub = fleet.operator.subscribe(previous);
        let mut sub = sub;
        sub.wait(previous, WAIT, |v| v["manifest"].is_string())
    };
    let stranger = s.path().join("stranger");
    assert_status(
        &s.edgeward()
            .args(["keygen", "--out"])
            .arg(&stranger)
            .output()
            .unwrap(),
        0,
    );
    let rollback = || {
        fleet.fleet(&[
            "rollback",
            "--device",
            "gw-1",
            "--key",
            fleet.deploy_key.to_str().unwrap(),
        ])
    };
    let planted = format!(
        "version = \"1\"\n\n[[module]]\nname = \"probe\"\ndigest = \"{other}\"\nsource = \"oci://{}/edge/probe:1.0\"\n",
        registry.host()
    );
    for (payload, why) in [
        (
            fleet.signed(
                &planted,
                "device:gw-1",
                Some(&s.path().join("stranger.key")),
            ),
            "does not verify",
        ),
        (
            fleet.signed(&planted, "device:gw-2", None),
            "not for device:gw-1",
        ),
        // This key's own deployment for gw-1, kept from long ago: expired,
        // not revived.
        (
            fleet.signed(
                &format!("target = \"device:gw-1\"\nexpires = \"2020-01-01T00:00:00Z\"\n{planted}"),
                "device:gw-1",
                None,
            ),
            "expired",
        ),
    ] {
        assert!(fleet.operator.publish(previous, &payload, true));
        let o = rollback();
        assert_status(&o, 1);
        assert!(
            stderr(&o).contains(why)
                && (stderr(&o).contains("not rolled back") || stderr(&o).contains("not revived")),
            "{why}: {}",
            stderr(&o)
        );
    }
    assert!(fleet.operator.publish(
        previous,
        serde_json::to_string(&genuine).unwrap().as_bytes(),
        true
    ));

    // Rollback: the previous deployment (1) again, as version 3.
    let o = fleet.fleet(&[
        "rollback",
        "--device",
        "gw-1",
        "--key",
        fleet.deploy_key.to_str().unwrap(),
    ]);
    assert_status(&o, 0);
    assert!(stderr(&o).contains("as version 3"), "{}", stderr(&o));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let st = status(&fleet);
        if st["gw-1"]["version"] == "3" && st["gw-1"]["status"] == "ok" {
            assert_eq!(st["gw-1"]["modules"], 2);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rollback not reported: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // An unsigned deployment with the largest version, planted on the
    // device's topic by someone who can write the broker, does not freeze
    // the fleet: the next signed version is published over it (and it is
    // not kept as the previous deployment).
    let huge = serde_json::json!({
        "manifest": format!("version = \"{}\"\n", u64::MAX),
    });
    assert!(
        fleet
            .operator
            .publish("ew/v1/d/gw-1/in/desired", huge.to_string().as_bytes(), true)
    );
    let v4 = v1.replace("version = \"1\"", "version = \"4\"");
    let o = fleet.deploy(
        &v4,
        &["--device", "gw-1"],
        &["--wait", "--bake", "200ms", "--timeout", "60s"],
    );
    assert_status(&o, 0);
    assert!(stderr(&o).contains("did not sign"), "{}", stderr(&o));
    let (status, _, _) = d.terminate();
    assert!(status.success());
}

#[test]
fn a_canary_rollout_stops_when_the_canary_fails_and_continues_when_it_is_healthy() {
    let fleet = new_fleet(&["gw-a=line-a", "gw-b=line-a", "gw-c=line-a"]);
    let devices: Vec<(Scratch, Daemon)> = ["gw-a", "gw-b", "gw-c"]
        .iter()
        .map(|id| {
            let s = Scratch::new();
            let config = device(&fleet, &s, id, "", "");
            let d = Daemon::start(&s, &config);
            (s, d)
        })
        .collect();
    let deadline = std::time::Instant::now() + WAIT;
    while status(&fleet)
        .values()
        .filter(|r| r["online"] == true)
        .count()
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the devices did not come online"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A component that traps at once: the canary backs off and fails.
    let crasher = devices[0].0.command_component(
        "crasher.wasm",
        r#"(func (export "run") (result i32) unreachable)"#,
    );
    let bad = pinned_manifest("1", "crasher", &sha256sum(&crasher), &crasher);
    let o = fleet.deploy(
        &bad,
        &["--group", "line-a"],
        &["--canary", "30%", "--bake", "3s", "--timeout", "60s"],
    );
    assert_status(&o, 3);
    assert!(
        stderr(&o).contains("canary failed, rollout stopped"),
        "{}",
        stderr(&o)
    );
    let st = status(&fleet);
    assert_eq!(st["gw-a"]["status"], "failed", "{st:?}");
    for d in ["gw-b", "gw-c"] {
        assert!(
            st[d]["version"].is_null(),
            "{d} got the failed rollout: {st:?}"
        );
    }

    // A healthy one goes to the canary, then to the whole group.
    let good = sensor_manifest("2", "sensor", guests::TEMPERATURE_SENSOR);
    let o = fleet.deploy(
        &good,
        &["--group", "line-a"],
        &[
            "--canary",
            "30%",
            "--bake",
            "1s",
            "--timeout",
            "60s",
            "--wait",
        ],
    );
    assert_status(&o, 0);
    assert!(
        stderr(&o).contains("published to group line-a"),
        "{}",
        stderr(&o)
    );
    let st = status(&fleet);
    for d in ["gw-a", "gw-b", "gw-c"] {
        assert_eq!(st[d]["version"], "2", "{st:?}");
        assert_eq!(st[d]["status"], "ok", "{st:?}");
    }
    for (_, d) in devices {
        let (status, _, _) = d.terminate();
        assert!(status.success());
    }
}

#[test]
fn on_the_tpm_remote_attestation_verifies_and_fails_once_a_module_is_swapped_on_disk() {
    let fleet = new_fleet(&[]);
    let (tpm, ek_ca) = Swtpm::start_with_ek_certificate();
    let s = Scratch::new();
    let hsm = format!(
        "[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n\n[runtime]\nintegrity_interval = \"1s\"\n",
        tpm.tcti()
    );
    let config = device(&fleet, &s, "gw-1", &hsm, "");
    let d = Daemon::start(&s, &config);
    let m = sensor_manifest("1", "sensor", guests::TEMPERATURE_SENSOR);
    let o = fleet.deploy(
        &m,
        &["--device", "gw-1"],
        &["--wait", "--bake", "200ms", "--timeout", "60s"],
    );
    assert_status(&o, 0);

    // The AK bound to the certified EK by a credential, the quote over its
    // secret, the log replayed against the PCR, the policy met.
    let evidence = s.path().join("evidence");
    let ek_ca = ek_ca.to_str().unwrap();
    let deployment_key = fleet.deploy_pub.to_str().unwrap().to_owned();
    let attest = |extra: &[&str]| {
        let mut args = vec![
            "attest",
            "--device",
            "gw-1",
            "--ek-ca",
            ek_ca,
            "--deployment-key",
            &deployment_key,
        ];
        args.extend_from_slice(extra);
        fleet.fleet(&args)
    };
    let o = attest(&["--out", evidence.to_str().unwrap()]);
    assert_status(&o, 0);
    assert!(stdout(&o).contains("evidence verified"), "{}", stdout(&o));
    // What arrived is what tpm2-tools reads.
    for f in [
        "quote.msg",
        "quote.sig",
        "ak.pem",
        "pcrs.bin",
        "event.log",
        "ek.pem",
    ] {
        assert!(evidence.join(f).exists(), "{f}");
    }
    // With the device's EK enrolled the evidence must come from that TPM:
    // its own passes, another EK (any other genuine TPM) does not.
    // (The device answers one challenge a second.)
    let own_ek = evidence.join("ek.pem").display().to_string();
    std::thread::sleep(Duration::from_millis(1100));
    assert_status(&attest(&["--ek", &own_ek]), 0);
    std::thread::sleep(Duration::from_millis(1100));
    let o = attest(&["--ek", &format!("sha256:{}", "ab".repeat(32))]);
    assert_status(&o, 1);
    assert!(
        stdout(&o).contains("not the one enrolled"),
        "{}",
        stdout(&o)
    );
    // Incremental: only the records after what was verified cross the
    // broker, and the whole log checked so far is kept for next time.
    std::thread::sleep(Duration::from_millis(1100));
    let next = s.path().join("evidence-next");
    let o = attest(&[
        "--previous",
        evidence.to_str().unwrap(),
        "--out",
        next.to_str().unwrap(),
    ]);
    assert_status(&o, 0);
    let full = std::fs::read(evidence.join("event.log")).unwrap();
    let tail = std::fs::read(next.join("event.log")).unwrap();
    assert!(tail.len() < full.len(), "the whole log was sent again");
    assert!(next.join("event.full.log").exists());

    // The sensor's component is swapped on disk: the watchdog records it,
    // and the evidence no longer meets the policy.
    let stored = s.state().join("components").join(format!(
        "{}.wasm",
        sha256sum(guests::TEMPERATURE_SENSOR).replace(':', "-")
    ));
    std::fs::write(&stored, std::fs::read(guests::IDENTITY_PROBE).unwrap()).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while status(&fleet)["gw-1"]["status"] != "failed" {
        assert!(
            std::time::Instant::now() < deadline,
            "the swap was not reported"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1100));
    let o = attest(&[]);
    assert_status(&o, 1);
    assert!(stdout(&o).contains("evidence REFUSED"), "{}", stdout(&o));
    assert!(stdout(&o).contains("FAIL"), "{}", stdout(&o));
    eprintln!("{}", stdout(&o));
    let (status, _, _) = d.terminate();
    assert!(status.success());
}

/// Serves `body` once over HTTP on loopback, holding the answer until
/// told: (URL, "the request came", "answer now").
fn held_http(
    body: Vec<u8>,
) -> (
    String,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/sensor.wasm", listener.local_addr().unwrap());
    let (asked_tx, asked) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf);
        let _ = asked_tx.send(());
        let _ = release_rx.recv();
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(&body);
    });
    (url, asked, release)
}

#[test]
fn events_made_offline_survive_a_daemon_restart_and_arrive_once_the_broker_is_back() {
    let mut fleet = new_fleet(&[]);
    let s = Scratch::new();
    let config = device(&fleet, &s, "gw-1", "", "");
    let mut d = connected(&s, &config);

    // The component comes slowly; the broker goes away meanwhile.
    let (url, asked, release) = held_http(std::fs::read(guests::TEMPERATURE_SENSOR).unwrap());
    let m = sensor_manifest("1", "sensor", &url);
    assert!(fleet.operator.publish(
        "ew/v1/d/gw-1/in/desired",
        &fleet.signed(&m, "device:gw-1", None),
        true
    ));
    asked
        .recv_timeout(WAIT)
        .expect("the device fetches the component");
    fleet.broker.shut_down();
    release.send(()).unwrap();
    d.wait_for("the deployment applied offline", |_, err| {
        err.iter().any(|l| l.contains("deployment applied"))
    });
    // The daemon stops before the broker is back: the event is on disk only.
    let (status, _, _) = d.terminate();
    assert!(status.success());

    fleet.broker.restart();
    let mut events = fleet.operator.subscribe("ew/v1/d/gw-1/out/events");
    std::thread::sleep(Duration::from_millis(300));
    let mut d = Daemon::start(&s, &config);
    let ev = events.wait("ew/v1/d/gw-1/out/events", WAIT, |v| {
        v["kind"] == "deployment-applied"
    });
    assert_eq!(ev["version"], "1");
    assert_eq!(ev["seq"], 0);
    d.wait_for("the outbox emptied", |_, err| {
        err.iter()
            .any(|l| l.contains("sending the events kept while offline"))
            && err.iter().any(|l| l.contains("events delivered"))
    });
    let (status, _, _) = d.terminate();
    assert!(status.success());

    // Delivered once: a later start sends nothing again.
    let seen = events.seen.len();
    let d = connected(&s, &config);
    let after = events.drain(Duration::from_millis(1500));
    assert!(
        !after[seen..]
            .iter()
            .any(|(_, p)| p.contains("deployment-applied")),
        "sent again: {after:?}"
    );
    let (status, _, _) = d.terminate();
    assert!(status.success());
}

#[test]
fn the_broker_certificate_file_is_checked_and_a_renewed_one_is_used_without_a_restart() {
    let fleet = new_fleet(&[]);
    let s = Scratch::new();
    let config = device(&fleet, &s, "gw-1", "", "");
    let good = s.path().join("broker-client.pem");
    let saved = std::fs::read(&good).unwrap();
    // A certificate for another key (the operator's) in its place: the
    // device says what is wrong and stays off the broker.
    std::fs::copy(&fleet.operator.cert, &good).unwrap();
    let mut d = Daemon::start(&s, &config);
    d.wait_for("the refusal", |_, err| {
        err.iter()
            .any(|l| l.contains("not for this device's \"cloud-client\" key"))
    });
    // The organisation's certificate arrives: used without a restart.
    let tmp = s.path().join("broker-client.pem.new");
    std::fs::write(&tmp, &saved).unwrap();
    std::fs::rename(&tmp, &good).unwrap();
    d.wait_for("a connection", |_, err| {
        err.iter()
            .any(|l| l.contains("cloud: connected to the broker"))
    });
    let (status, _, _) = d.terminate();
    assert!(status.success());
}

#[test]
fn a_registry_behind_tls_and_basic_auth_serves_devices_with_credentials() {
    let fleet = new_fleet(&[]);
    let registry = Registry::start_secure(&fleet.ca, "edge", "s3cret-pass");
    let s = Scratch::new();
    let password = s.write("registry.pass", "s3cret-pass\n");
    let root = fleet.ca.root().display().to_string();
    let reference = format!("oci://{}/edge/sensor:1", registry.host());
    let push = |credentials: &[&str]| {
        let mut args = vec![
            "push",
            guests::TEMPERATURE_SENSOR,
            &reference,
            "--registry-ca",
            &root,
        ];
        args.extend_from_slice(credentials);
        fleet.fleet(&args)
    };
    // Without credentials the registry's challenge is named.
    let o = push(&[]);
    assert_status(&o, 1);
    assert!(stderr(&o).contains("credentials"), "{}", stderr(&o));
    let o = push(&[
        "--username",
        "edge",
        "--password-file",
        password.to_str().unwrap(),
    ]);
    assert_status(&o, 0);

    deploys_through(&fleet, &s, &registry, &password, &reference);
}

/// A device with `[cloud] registry_ca` (the organisation's root) and
/// credentials for `registry` deploys the sensor from `reference`.
fn deploys_through(
    fleet: &Fleet,
    s: &Scratch,
    registry: &Registry,
    password: &Path,
    reference: &str,
) {
    let root = fleet.ca.root().display().to_string();
    let config = device(
        fleet,
        s,
        "gw-1",
        "",
        &format!(
            "registry_ca = \"{root}\"\n\n[[cloud.registry]]\nhost = \"{}\"\nusername = \"edge\"\npassword_file = \"{}\"\n",
            registry.host(),
            password.display()
        ),
    );
    let d = Daemon::start(s, &config);
    let m = sensor_manifest("1", "sensor", reference);
    let o = fleet.deploy(
        &m,
        &["--device", "gw-1"],
        &["--wait", "--bake", "200ms", "--timeout", "60s"],
    );
    assert_status(&o, 0);
    let (status, _, _) = d.terminate();
    assert!(status.success());
}

/// `edgeward check`'s cloud line for the config in `s`.
fn cloud_check(s: &Scratch) -> serde_json::Value {
    let o = s
        .edgeward()
        .args(["check", "--json", "--config"])
        .arg(s.path().join("config.toml"))
        .output()
        .unwrap();
    let checks: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&o), stderr(&o)));
    checks.into_iter().find(|c| c["name"] == "cloud").unwrap()
}

#[test]
fn check_reaches_the_broker_and_names_what_keeps_a_device_out() {
    let fleet = new_fleet(&[]);
    let s = Scratch::new();
    let config = device(&fleet, &s, "gw-1", "", "");
    let c = cloud_check(&s);
    assert_eq!(c["verdict"], "pass", "{c}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .contains("certificate verifies"),
        "{c}"
    );

    // A broker certified by another root.
    let other = edgeward_tests::fixtures::OrgCa::new();
    let text = config.replace(
        &fleet.ca.root().display().to_string(),
        &other.root().display().to_string(),
    );
    std::fs::write(s.path().join("config.toml"), &text).unwrap();
    let c = cloud_check(&s);
    assert_eq!(c["verdict"], "fail", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("TLS"), "{c}");

    // A broker key the organisation has not certified yet.
    std::fs::write(s.path().join("config.toml"), &config).unwrap();
    std::fs::remove_file(s.path().join("broker-client.pem")).unwrap();
    let c = cloud_check(&s);
    assert_eq!(c["verdict"], "fail", "{c}");
    assert!(
        c["hint"]
            .as_str()
            .unwrap()
            .contains("identity csr --broker"),
        "{c}"
    );
}

/// A registry token service on loopback, as docker-registry's `auth:
/// token` expects one: checks basic credentials, answers `{"token"}`, a JWT
/// (ES256, its signing certificate in `x5c`, chained to the registry's
/// trusted root) granting what the scope asks. Returns its URL and how
/// many tokens it gave.
fn token_service(
    signer_cert: &Path,
    signer_key: &Path,
    service: &'static str,
    user: &'static str,
    password: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use base64ct::Encoding as _;
    use std::io::{BufRead as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let pem = std::fs::read_to_string(signer_cert).unwrap();
    let der = edgeward::identity::authority::parse_pem_certificates(&pem).unwrap();
    let x5c: Vec<String> = der
        .iter()
        .map(|d| base64ct::Base64::encode_string(d))
        .collect();
    // The PKCS#8 key openssl wrote, as DER.
    let key_pem = std::fs::read_to_string(signer_key).unwrap();
    let b64: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let key = jsonwebtoken::EncodingKey::from_ec_der(&base64ct::Base64::decode_vec(&b64).unwrap());
    let given = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = given.clone();
    let expected = format!(
        "Basic {}",
        base64ct::Base64::encode_string(format!("{user}:{password}").as_bytes())
    );
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            let mut authorized = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("authorization")
                    && v.trim() == expected
                {
                    authorized = true;
                }
            }
            if !authorized {
                let _ = conn.write_all(
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            // scope=repository:NAME:ACTIONS (percent-encoded).
            let query = request
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .split_once('?')
                .map_or("", |q| q.1)
                .to_owned();
            let mut access = Vec::new();
            for pair in query.split('&') {
                if let Some(v) = pair.strip_prefix("scope=") {
                    let v = v
                        .replace("%3A", ":")
                        .replace("%2F", "/")
                        .replace("%2C", ",");
                    let parts: Vec<&str> = v.splitn(3, ':').collect();
                    if let [kind, name, actions] = parts.as_slice() {
                        access.push(serde_json::json!({
                            "type": kind, "name": name,
                            "actions": actions.split(',').collect::<Vec<_>>(),
                        }));
                    }
                }
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            header.x5c = Some(x5c.clone());
            let claims = serde_json::json!({
                "iss": "edgeward-tests", "sub": user, "aud": service,
                "exp": now + 300, "nbf": now - 10, "iat": now,
                "jti": format!("{now}-{}", counter.load(std::sync::atomic::Ordering::SeqCst)),
                "access": access,
            });
            let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = serde_json::json!({ "token": token }).to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, given)
}

#[test]
fn a_registry_with_a_token_service_serves_devices_with_credentials() {
    let fleet = new_fleet(&[]);
    let (signer_cert, signer_key) = fleet
        .ca
        .issue("token-signer", "keyUsage=critical,digitalSignature\n");
    let (realm, given) = token_service(
        &signer_cert,
        &signer_key,
        "edgeward-registry",
        "edge",
        "t0ken-pass",
    );
    let registry = Registry::start_with_auth(
        &fleet.ca,
        &format!(
            "  token:\n    realm: {realm}\n    service: edgeward-registry\n    issuer: edgeward-tests\n    rootcertbundle: {}\n",
            fleet.ca.root().display()
        ),
    );
    let s = Scratch::new();
    let password = s.write("registry.pass", "t0ken-pass");
    let root = fleet.ca.root().display().to_string();
    let reference = format!("oci://{}/edge/sensor:1", registry.host());
    let o = fleet.fleet(&[
        "push",
        guests::TEMPERATURE_SENSOR,
        &reference,
        "--registry-ca",
        &root,
        "--username",
        "edge",
        "--password-file",
        password.to_str().unwrap(),
    ]);
    assert_status(&o, 0);
    let pushed = given.load(std::sync::atomic::Ordering::SeqCst);
    assert!(pushed > 0, "no token was asked for");

    deploys_through(&fleet, &s, &registry, &password, &reference);
    assert!(
        given.load(std::sync::atomic::Ordering::SeqCst) > pushed,
        "the device asked for no token"
    );
}

#[test]
fn a_retained_deployment_once_refused_is_reported_once_not_at_every_connection() {
    let mut fleet = new_fleet(&[]);
    let s = Scratch::new();
    let config = device(&fleet, &s, "gw-1", "", "");
    let mut d = connected(&s, &config);
    let m = sensor_manifest("1", "sensor", guests::TEMPERATURE_SENSOR);
    let unsigned = serde_json::to_vec(&serde_json::json!({ "manifest": m })).unwrap();
    assert!(
        fleet
            .operator
            .publish("ew/v1/d/gw-1/in/desired", &unsigned, true)
    );
    d.wait_for("the refusal", |_, err| {
        err.iter().any(|l| l.contains("desired deployment refused"))
    });
    fleet.broker.shut_down();
    fleet.broker.restart();
    d.wait_for("the reconnection", |_, err| {
        err.iter()
            .any(|l| l.contains("connected to the broker again"))
    });
    // The retained message came again with the session; give it time.
    std::thread::sleep(Duration::from_millis(1000));
    let (status, _, err) = d.terminate();
    assert!(status.success());
    let refusals = err
        .iter()
        .filter(|l| l.contains("desired deployment refused"))
        .count();
    assert_eq!(refusals, 1, "{err:#?}");
}

#[test]
fn a_device_that_dies_is_reported_offline_by_its_will_and_flags_reach_the_broker_too() {
    let fleet = new_fleet(&[]);
    let s = Scratch::new();
    let config = device(&fleet, &s, "gw-1", "", "");
    let mut out = fleet.operator.subscribe("ew/v1/d/gw-1/out/state");
    let mut d = connected(&s, &config);
    out.wait("ew/v1/d/gw-1/out/state", WAIT, |v| v["state"] == "online");
    // kill -9: no goodbye; the broker publishes the device's last will.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    out.wait("ew/v1/d/gw-1/out/state", WAIT, |v| v["state"] == "offline");

    // The connection settings as flags, before the subcommand.
    let o = s
        .edgeward()
        .arg("fleet")
        .args(["--broker", &fleet.broker.url(), "--ca"])
        .arg(&fleet.operator.ca)
        .arg("--cert")
        .arg(&fleet.operator.cert)
        .arg("--key")
        .arg(&fleet.operator.key)
        .args(["status", "--json", "--device", "gw-1"])
        .output()
        .unwrap();
    assert_status(&o, 0);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(rows[0]["online"], false, "{rows:?}");
    assert_eq!(rows[0]["status"], "offline", "{rows:?}");
    // And without them, what is missing is named.
    let o = s.edgeward().args(["fleet", "status"]).output().unwrap();
    assert_status(&o, 1);
    assert!(stderr(&o).contains("--broker"), "{}", stderr(&o));
}

/// A module's X509-SVID is no broker login, whatever the module is called:
/// a module named `operator` (or after another device) on a provisioned
/// device takes its SVID and key through the workload interface and
/// presents them to the real Mosquitto with the ACL `fleet acl` writes. The
/// broker refuses the handshake: module SVIDs chain to the workloads root,
/// which its cafile does not hold, and carry no CN. The device's own login
/// and the operator's still work (the positive controls).
#[test]
fn a_module_named_operator_or_after_a_device_is_no_broker_login() {
    use edgeward_tests::fixtures::MqttUser;
    let fleet = new_fleet(&["gw-1=line-a", "gw-2=line-a"]);
    let s = Scratch::new();
    device(&fleet, &s, "gw-1", "", "");
    let config = s.path().join("config.toml");
    for name in ["operator", "gw-2"] {
        let file = s.path().join(format!("{name}.wasm"));
        std::fs::copy(guests::IDENTITY_PROBE, &file).unwrap();
        let o = s.run(
            file.to_str().unwrap(),
            &["--config", config.to_str().unwrap()],
            &["cert"],
        );
        assert_status(&o, 0);
        let out = stdout(&o);
        let certs = svid::pem_blocks(&out);
        assert!(certs.len() >= 2, "the SVID and the device CA: {out}");
        let cert = s.write(&format!("{name}-svid.pem"), &certs.concat());
        let key_start = out.find("-----BEGIN PRIVATE KEY-----").unwrap();
        let key_end = out.find("-----END PRIVATE KEY-----").unwrap() + 25;
        let key = s.write(&format!("{name}-svid.key"), &out[key_start..key_end]);
        // It is a genuine SVID of the organisation's workloads root...
        svid::openssl_verify(
            &fleet.ca.role_root("workloads"),
            Some(&s.write("ca.pem", &certs[1..].concat())),
            &s.write("leaf.pem", &certs[0]),
            &["-purpose", "sslclient"],
        );
        let text = svid::openssl_text(&s.path().join("leaf.pem"));
        assert!(
            text.contains("Subject: \n"),
            "an SVID names no user: {text}"
        );
        // ...and no login.
        let module = MqttUser {
            cert,
            key,
            ..fleet.operator.clone()
        };
        assert!(
            !module.publish("ew/v1/d/gw-1/in/desired", b"{}", false),
            "the broker accepted module {name}'s SVID"
        );
    }
    // The positive controls: the operator publishes, and the device's own
    // login (its HSM key, certified by the devices root) connects.
    assert!(
        fleet
            .operator
            .publish("ew/v1/d/gw-9/in/attest/challenge", b"{}", false)
    );
    let d = connected(&s, &std::fs::read_to_string(&config).unwrap());
    let (status, _, _) = d.terminate();
    assert!(status.success());
}

/// What a device may grant is the config file's: the agent, an operator
/// and the cloud cannot give a module the metadata service, the LAN,
/// `0.0.0.0/0` server names or a 1 TiB disk budget unless `[grants]` says
/// so; each refusal names the ceiling.
#[test]
fn an_operator_cannot_grant_beyond_the_config_files_ceilings() {
    let fleet = new_fleet(&["gw-1=line-a"]);
    let s = Scratch::new();
    let config = device(&fleet, &s, "gw-1", "", "");
    let d = connected(&s, &config);
    let digest = sha256sum(guests::TEMPERATURE_SENSOR);
    for (flags, ceiling) in [
        (
            ["--allow-outbound", "169.254.169.254:80"],
            "[grants] outbound",
        ),
        (["--allow-outbound", "0.0.0.0/0:443"], "[grants] outbound"),
        (["--allow-outbound", "10.0.0.5:502"], "[grants] outbound"),
        (["--server-name", "0.0.0.0/0"], "[grants] server_names"),
    ] {
        let o = s
            .edgeward()
            .args(["module", "add", "m", guests::TEMPERATURE_SENSOR])
            .args(flags)
            .output()
            .unwrap();
        assert_status(&o, 1);
        assert!(stderr(&o).contains(ceiling), "{flags:?}: {}", stderr(&o));
    }
    // A local deployment (an operator's) with a 1 TiB disk budget.
    let m = s.write(
        "local.toml",
        &format!(
            "version = \"1\"\n[[module]]\nname = \"big\"\nfile = \"{}\"\nmax_disk = \"1024GiB\"\n",
            guests::TEMPERATURE_SENSOR
        ),
    );
    let o = s.edgeward().arg("deploy").arg(&m).output().unwrap();
    assert_status(&o, 1);
    assert!(stderr(&o).contains("[grants] max_disk"), "{}", stderr(&o));
    // Within the ceilings, the same add works (the positive control).
    let o = s
        .edgeward()
        .args(["module", "add", "m", guests::TEMPERATURE_SENSOR])
        .args(["--allow-outbound", "example.com:443"])
        .output()
        .unwrap();
    assert_status(&o, 0);
    // A cloud deployment is held to them too.
    let m = format!(
        "version = \"1\"\n\n[[module]]\nname = \"s\"\ndigest = \"{digest}\"\nsource = \"{}\"\nallow_outbound = [\"169.254.169.254:80\"]\n",
        guests::TEMPERATURE_SENSOR
    );
    let o = fleet.deploy(&m, &["--device", "gw-1"], &["--wait", "--timeout", "30s"]);
    assert_status(&o, 3);
    assert!(stderr(&o).contains("[grants] outbound"), "{}", stderr(&o));
    let (status, _, _) = d.terminate();
    assert!(status.success());
}
