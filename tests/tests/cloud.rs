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

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::Daemon;
use common::*;
use edgeward_tests::fixtures::{Mosquitto, MqttUser, OrgCa, Swtpm};

const WAIT: Duration = Duration::from_secs(60);

/// An organisation: its root, a broker it certifies, an operator, and
/// the deployment key devices trust.
struct Fleet {
    ca: OrgCa,
    broker: Mosquitto,
    operator: MqttUser,
    deploy_key: PathBuf,
    deploy_pub: PathBuf,
    dir: Scratch,
}

impl Fleet {
    fn new(acl_extra: &str) -> Self {
        let ca = OrgCa::new();
        let broker = Mosquitto::start(&ca, acl_extra);
        let (cert, key) = ca.issue("operator", "extendedKeyUsage=clientAuth\n");
        let operator = MqttUser {
            port: broker.port(),
            ca: ca.root(),
            cert,
            key,
        };
        let dir = Scratch::new();
        let o = dir
            .edgeward()
            .args(["keygen", "--out"])
            .arg(dir.path().join("deploy"))
            .output()
            .unwrap();
        assert_status(&o, 0);
        Self {
            deploy_key: dir.path().join("deploy.key"),
            deploy_pub: dir.path().join("deploy.pub"),
            ca,
            broker,
            operator,
            dir,
        }
    }

    /// A client certificate for `cn` from the organisation's root, as a
    /// device or operator that keeps its key in a file.
    fn user(&self, cn: &str) -> MqttUser {
        let (cert, key) = self.ca.issue(cn, "extendedKeyUsage=clientAuth\n");
        MqttUser {
            cert,
            key,
            ..self.operator.clone()
        }
    }

    /// The signed desired deployment of `manifest` (signed with `key`, or
    /// the fleet's deployment key).
    fn signed(&self, manifest: &str, key: Option<&Path>) -> Vec<u8> {
        use base64ct::Encoding as _;
        let file = self.dir.write("manifest.toml", manifest);
        let o = self
            .dir
            .edgeward()
            .arg("sign")
            .arg("--key")
            .arg(key.unwrap_or(&self.deploy_key))
            .arg(&file)
            .output()
            .unwrap();
        assert_status(&o, 0);
        let sig = std::fs::read(self.dir.path().join("manifest.toml.sig")).unwrap();
        serde_json::to_vec(&serde_json::json!({
            "manifest": manifest,
            "signature": base64ct::Base64::encode_string(&sig),
        }))
        .unwrap()
    }
}

/// A device's config: its identity certified by the organisation (`edgeward
/// identity csr`, then the org root signs it), the broker, the deployment
/// key; `extra` is appended (more tables, `[[module]]`s).
fn device(fleet: &Fleet, s: &Scratch, id: &str, hsm: &str, extra: &str) -> String {
    let config = format!(
        "{hsm}\n[identity]\ndevice_id = \"{id}\"\nca_certificate = \"chain.pem\"\n\n[cloud]\nbroker = \"{broker}\"\nca = \"{ca}\"\ndeployment_keys = [\"{key}\"]\ngroups = [\"line-a\"]\nreconnect_min = \"50ms\"\nreconnect_max = \"400ms\"\nreport_interval = \"200ms\"\n{extra}",
        broker = fleet.broker.url(),
        ca = fleet.ca.root().display(),
        key = fleet.deploy_pub.display(),
    );
    let path = s.write("config.toml", &config);
    let csr = s.path().join("device-ca.csr");
    let o = s
        .edgeward()
        .args(["identity", "csr", "--out"])
        .arg(&csr)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_status(&o, 0);
    fleet
        .ca
        .certify_device_ca(&csr, &s.path().join("chain.pem"));
    config
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
    // Group rights as `edgeward fleet acl` writes them.
    let fleet = Fleet::new("\nuser gw-1\ntopic read ew/v1/g/line-a/desired\n");
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
            .publish(desired, &fleet.signed(&v1, None), true)
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
        fleet.signed(&v2, Some(&s.path().join("stranger.key"))),
        "signature",
    );
    let mut tampered: serde_json::Value = serde_json::from_slice(&fleet.signed(&v2, None)).unwrap();
    tampered["manifest"] = v2.replace("sensor2", "sensor3").into();
    refused(
        &mut out,
        serde_json::to_vec(&tampered).unwrap(),
        "signature",
    );
    // Replayed: the applied version with other contents; and an older one.
    let replay = sensor_manifest("1", "sensor9", guests::TEMPERATURE_SENSOR);
    refused(&mut out, fleet.signed(&replay, None), "not newer");
    refused(
        &mut out,
        b"{\"manifest\": 7}".to_vec(),
        "not a signed manifest",
    );
    refused(&mut out, b"\xff\xfe".to_vec(), "not a signed manifest");
    // A module the config file owns.
    let clash = sensor_manifest("3", "local", guests::TEMPERATURE_SENSOR);
    refused(&mut out, fleet.signed(&clash, None), "another origin owns");
    // A source that gives another component than the pinned one: refused
    // before it is stored or compiled.
    let swapped = pinned_manifest(
        "4",
        "sensor4",
        &sha256sum(guests::IDENTITY_PROBE),
        guests::TEMPERATURE_SENSOR,
    );
    refused(&mut out, fleet.signed(&swapped, None), "not the pinned");
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
    assert!(
        fleet
            .operator
            .publish("ew/v1/g/line-a/desired", &fleet.signed(&v5, None), true)
    );
    let ev = out.wait(events, WAIT, |v| {
        v["kind"] == "deployment-applied" && v["version"] == "5"
    });
    assert_eq!(ev["source"], "group line-a");
    assert_eq!(ev["plan"]["remove"], serde_json::json!(["sensor"]));
    out.wait(reported, WAIT, |v| {
        running(v, "5", &["group-sensor", "local"])
    });
    let v4 = sensor_manifest("4", "sensor", guests::TEMPERATURE_SENSOR);
    refused(&mut out, fleet.signed(&v4, None), "not newer");

    // A clean stop says offline (retained).
    let (status, _, _) = d.terminate();
    assert!(status.success());
    out.wait(state, WAIT, |v| v["state"] == "offline");
}

#[test]
fn the_broker_confines_each_device_to_its_own_topics() {
    let fleet = Fleet::new("");
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

#[test]
fn on_the_tpm_the_device_connects_with_a_key_the_tpm_holds() {
    let fleet = Fleet::new("");
    let tpm = Swtpm::start();
    let s = Scratch::new();
    let hsm = format!("[hsm]\nbackend = \"tpm\"\ntcti = \"{}\"\n", tpm.tcti());
    let config = device(&fleet, &s, "gw-tpm", &hsm, "");
    let mut out = fleet.operator.subscribe("ew/v1/d/gw-tpm/out/#");
    let d = Daemon::start(&s, &config);
    out.wait("ew/v1/d/gw-tpm/out/state", WAIT, |v| v["state"] == "online");
    let r = out.wait("ew/v1/d/gw-tpm/out/reported", WAIT, |v| {
        v["device"] == "gw-tpm"
    });
    assert_eq!(r["daemon"]["hsm"], "tpm");
    // The key is the TPM's: the soft key store holds no broker key.
    let o = s
        .edgeward()
        .args(["hsm", "info", "--json", "--config"])
        .arg(s.path().join("config.toml"))
        .output()
        .unwrap();
    let (status, _, _) = d.terminate();
    assert!(status.success());
    assert_status(&o, 0);
    assert!(stdout(&o).contains("cloud-client"), "{}", stdout(&o));
}

#[test]
fn a_device_runs_its_last_deployment_without_the_broker_and_reports_when_it_returns() {
    let mut fleet = Fleet::new("");
    let s = Scratch::new();
    let config = device(&fleet, &s, "gw-1", "", "");
    let mut out = fleet.operator.subscribe("ew/v1/d/gw-1/out/#");
    let d = Daemon::start(&s, &config);
    let m = sensor_manifest("1", "sensor", guests::TEMPERATURE_SENSOR);
    assert!(
        fleet
            .operator
            .publish("ew/v1/d/gw-1/in/desired", &fleet.signed(&m, None), true)
    );
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
