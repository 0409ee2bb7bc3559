//! A fleet for tests and benchmarks: an organisation's root (openssl), a
//! Mosquitto broker it certifies with the ACL `edgeward fleet acl` writes,
//! an operator, a deployment key, and devices provisioned the way
//! docs/fleet.md says (`edgeward identity csr`, certified by the root).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::fixtures::{Mosquitto, MqttUser, OrgCa};

/// Runs `edgeward` (`bin`) with `args`, outside any daemon's environment.
fn edgeward(bin: &Path, dir: &Path) -> Command {
    let mut c = Command::new(bin);
    c.arg("--state-dir")
        .arg(dir.join("state"))
        .env_remove("EDGEWARD_LOG")
        .env_remove("EDGEWARD_STATE_DIR")
        .env_remove("EDGEWARD_CONFIG")
        .env("EDGEWARD_SOCKET", dir.join("api.sock"));
    c
}

#[track_caller]
fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what} failed ({:?}): {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// An organisation: its root, a broker it certifies, an operator, and
/// the deployment key devices trust.
#[derive(Debug)]
pub struct Fleet {
    /// The organisation's root.
    pub ca: OrgCa,
    /// The broker.
    pub broker: Mosquitto,
    /// The operator's client (Mosquitto's CLI clients).
    pub operator: MqttUser,
    /// The deployment key (secret).
    pub deploy_key: PathBuf,
    /// The deployment key (public), for devices' `deployment_keys`.
    pub deploy_pub: PathBuf,
    /// The `edgeward` it runs.
    pub bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// An organisation whose broker's ACL is what `edgeward fleet acl`
    /// writes for `members` (DEVICE=GROUP,...), then `acl_extra`.
    pub fn new(bin: &Path, members: &[&str], acl_extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = OrgCa::new();
        let mut acl = edgeward(bin, dir.path());
        acl.args(["fleet", "acl"]);
        for m in members {
            acl.args(["--member", m]);
        }
        let o = ok(
            acl.output().expect("edgeward fleet acl"),
            "edgeward fleet acl",
        );
        let acl = format!("{}{acl_extra}", String::from_utf8_lossy(&o.stdout));
        let broker = Mosquitto::start(&ca, &acl);
        let (cert, key) = ca.issue_as("operators", "operator", "extendedKeyUsage=clientAuth\n");
        let operator = MqttUser {
            port: broker.port(),
            ca: ca.root(),
            cert,
            key,
        };
        ok(
            edgeward(bin, dir.path())
                .args(["keygen", "--out"])
                .arg(dir.path().join("deploy"))
                .output()
                .expect("edgeward keygen"),
            "edgeward keygen",
        );
        Self {
            deploy_key: dir.path().join("deploy.key"),
            deploy_pub: dir.path().join("deploy.pub"),
            ca,
            broker,
            operator,
            bin: bin.to_owned(),
            dir,
        }
    }

    /// A client certificate for `cn` from the organisation's devices root,
    /// as a device that keeps its key in a file.
    pub fn user(&self, cn: &str) -> MqttUser {
        let (cert, key) = self
            .ca
            .issue_as("devices", cn, "extendedKeyUsage=clientAuth\n");
        MqttUser {
            cert,
            key,
            ..self.operator.clone()
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// `edgeward fleet ARGS` as the operator (its fleet.toml).
    pub fn fleet(&self, args: &[&str]) -> Output {
        self.fleet_as(&self.operator, args)
    }

    /// `edgeward fleet ARGS` as `user`.
    pub fn fleet_as(&self, user: &MqttUser, args: &[&str]) -> Output {
        self.fleet_command(user, args)
            .output()
            .expect("edgeward fleet")
    }

    /// `edgeward fleet ARGS` as the operator, running, its stdout piped
    /// (for `fleet watch`).
    pub fn fleet_spawn(&self, args: &[&str]) -> std::process::Child {
        self.fleet_command(&self.operator, args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("edgeward fleet")
    }

    fn fleet_command(&self, user: &MqttUser, args: &[&str]) -> std::process::Command {
        let toml = self.write(
            "fleet.toml",
            &format!(
                "broker = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                self.broker.url(),
                user.ca.display(),
                user.cert.display(),
                user.key.display()
            ),
        );
        let mut cmd = edgeward(&self.bin, self.dir.path());
        cmd.arg("fleet").args(args).arg("--config").arg(toml);
        cmd
    }

    /// `fleet status --json`, by device (it must succeed).
    pub fn status(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        let o = ok(self.fleet(&["status", "--json"]), "edgeward fleet status");
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&o.stdout).expect("fleet status --json prints JSON rows");
        rows.into_iter()
            .map(|r| (r["device"].as_str().unwrap_or_default().to_owned(), r))
            .collect()
    }

    /// `fleet deploy` of `manifest` to `target` (`--device ID` or
    /// `--group G`), with `extra` flags.
    pub fn deploy(&self, manifest: &str, target: &[&str], extra: &[&str]) -> Output {
        let file = self.write("deploy.toml", manifest);
        let key = self.deploy_key.display().to_string();
        let file = file.display().to_string();
        let mut args = vec!["deploy", file.as_str(), "--key", key.as_str()];
        args.extend_from_slice(target);
        args.extend_from_slice(extra);
        self.fleet(&args)
    }

    /// The signed desired deployment of `manifest` (signed with `key`, or
    /// the fleet's deployment key), as `edgeward sign` signs a manifest;
    /// bound to `target` (`device:ID`, `group:G`, `fleet`) until 2099
    /// unless the manifest names its own target.
    pub fn signed(&self, manifest: &str, target: &str, key: Option<&Path>) -> Vec<u8> {
        use base64ct::Encoding as _;
        let manifest = if manifest.contains("\ntarget = ") || manifest.starts_with("target = ") {
            manifest.to_owned()
        } else {
            format!("target = \"{target}\"\nexpires = \"2099-01-01T00:00:00Z\"\n{manifest}")
        };
        let manifest = manifest.as_str();
        let file = self.write("manifest.toml", manifest);
        ok(
            edgeward(&self.bin, self.dir.path())
                .arg("sign")
                .arg("--key")
                .arg(key.unwrap_or(&self.deploy_key))
                .arg(&file)
                .output()
                .expect("edgeward sign"),
            "edgeward sign",
        );
        let sig = std::fs::read(self.dir.path().join("manifest.toml.sig")).expect("the signature");
        serde_json::to_vec(&serde_json::json!({
            "manifest": manifest,
            "signature": base64ct::Base64::encode_string(&sig),
        }))
        .expect("json")
    }

    /// Provisions a device in `dir` (its state in `dir/state`): writes its
    /// config (`hsm` and `extra` around the identity and cloud tables),
    /// has it write CSRs for its device CA key and its broker key, and has
    /// the organisation certify them: the device CA under the workloads
    /// root (constrained to `edgeward.local` and `<id>.edge.test`), the
    /// broker key under the devices root. Returns the config's text (also
    /// written to `dir/config.toml`).
    pub fn device(&self, dir: &Path, id: &str, hsm: &str, extra: &str) -> String {
        let config = format!(
            "{hsm}\n[identity]\ndevice_id = \"{id}\"\nca_certificate = \"chain.pem\"\n\n[cloud]\nbroker = \"{broker}\"\nca = \"{ca}\"\ncertificate = \"broker-client.pem\"\ndeployment_keys = [\"{key}\"]\ngroups = [\"line-a\"]\nreconnect_min = \"50ms\"\nreconnect_max = \"400ms\"\nreport_interval = \"200ms\"\nlocal_sources = [\"{guests}\", \"{own}\"]\n{extra}",
            broker = self.broker.url(),
            ca = self.ca.root().display(),
            key = self.deploy_pub.display(),
            guests = std::path::Path::new(crate::guests::TEMPERATURE_SENSOR)
                .parent()
                .expect("the guests' directory")
                .display(),
            own = dir.display(),
        );
        let path = dir.join("config.toml");
        std::fs::write(&path, &config).expect("write the config");
        let csr = dir.join("device-ca.csr");
        ok(
            edgeward(&self.bin, dir)
                .args(["identity", "csr", "--out"])
                .arg(&csr)
                .arg("--config")
                .arg(&path)
                .output()
                .expect("edgeward identity csr"),
            "edgeward identity csr",
        );
        self.ca.certify_device_ca(
            &csr,
            &dir.join("chain.pem"),
            "edgeward.local",
            &format!("{id}.edge.test"),
        );
        let csr = dir.join("broker.csr");
        ok(
            edgeward(&self.bin, dir)
                .args(["identity", "csr", "--broker", "--out"])
                .arg(&csr)
                .arg("--config")
                .arg(&path)
                .output()
                .expect("edgeward identity csr --broker"),
            "edgeward identity csr --broker",
        );
        self.ca
            .certify_broker_key(&csr, &dir.join("broker-client.pem"));
        config
    }
}

/// `edgeward fleet acl ARGS` (`bin`): the ACL it prints.
pub fn acl(bin: &Path, args: &[&str]) -> String {
    let o = ok(
        Command::new(bin)
            .args(["fleet", "acl"])
            .args(args)
            .output()
            .expect("edgeward fleet acl"),
        "edgeward fleet acl",
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An organisation that enrolls its devices (docs/fleet.md, "Zero-touch
/// enrollment"): a [`Fleet`], an enrollment broker of its own (client ids
/// are global to a broker, so an anonymous client on the fleet's could
/// take over an enrolled device's session), an enrollment service's
/// `enroll.toml` whose `[fleet]` assigns the fleet's broker and
/// deployment key (device CAs from the workloads root, broker logins from
/// the devices root), a symmetric-key group `boards`, and an enroller
/// login.
#[derive(Debug)]
pub struct Enrolling {
    /// The fleet devices join.
    pub fleet: Fleet,
    /// The enrollment broker.
    pub enrollment: Mosquitto,
    /// The enroller's certificate and key (operators root, CN
    /// `enroller`).
    pub enroller: (PathBuf, PathBuf),
    /// Where `enroll.toml`, the list and the audit log are.
    pub dir: tempfile::TempDir,
}

impl Enrolling {
    /// `members` as `fleet acl --member` takes them; `manufacturers` a
    /// PEM bundle of TPM makers (default: any certificate, for
    /// symmetric-key groups only); `list` the enrollment list.
    pub fn new(bin: &Path, members: &[&str], manufacturers: Option<&Path>, list: &str) -> Self {
        let fleet = Fleet::new(bin, members, "");
        let ca = &fleet.ca;
        let enrollment = Mosquitto::start_with_enrollment(
            ca,
            &acl(bin, &["--enroller", "enroller"]),
            &acl(bin, &["--enrollment-listener"]),
        );
        let enroller = ca.issue_as("operators", "enroller", "extendedKeyUsage=clientAuth\n");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("list.toml"), list).expect("write");
        std::fs::write(d.join("challenge.key"), [3u8; 32]).expect("write");
        std::fs::write(d.join("boards.secret"), [5u8; 32]).expect("write");
        std::fs::write(
            d.join("enroll.toml"),
            format!(
                "trust_domain = \"edgeward.local\"\ndns_suffix = \"edge.test\"\n\
                 manufacturers = \"{manufacturers}\"\nlist = \"list.toml\"\n\
                 ca_certificate = \"{workloads}\"\nca_key = \"{workloads_key}\"\n\
                 challenge_key = \"challenge.key\"\naudit = \"audit.jsonl\"\n\
                 revoked = \"revoked.txt\"\n\
                 [group_secrets]\nboards = \"boards.secret\"\n\
                 [fleet]\nbroker = \"{broker}\"\nbroker_ca = \"{servers}\"\n\
                 deployment_keys = [\"{deploy}\"]\n\
                 logins_certificate = \"{devices}\"\nlogins_key = \"{devices_key}\"\n",
                manufacturers = manufacturers.map_or(ca.root(), Path::to_owned).display(),
                servers = ca.root().display(),
                workloads = ca.role_root("workloads").display(),
                workloads_key = ca.role_key("workloads").display(),
                devices = ca.role_root("devices").display(),
                devices_key = ca.role_key("devices").display(),
                broker = fleet.broker.url(),
                deploy = fleet.deploy_pub.display(),
            ),
        )
        .expect("write enroll.toml");
        Self {
            fleet,
            enrollment,
            enroller,
            dir,
        }
    }

    /// The service's `enroll.toml`.
    pub fn service_toml(&self) -> PathBuf {
        self.dir.path().join("enroll.toml")
    }

    /// `fleet enroll serve` on the enrollment broker, returned once it
    /// is subscribed.
    pub fn serve(&self) -> Serving {
        use std::io::BufRead as _;
        let mut child = Command::new(&self.fleet.bin)
            .args(["fleet", "--broker", &self.enrollment.url(), "--ca"])
            .arg(self.fleet.ca.root())
            .arg("--cert")
            .arg(&self.enroller.0)
            .arg("--key")
            .arg(&self.enroller.1)
            .args(["enroll", "--service"])
            .arg(self.service_toml())
            .args(["serve", "--duration", "30m"])
            .env_remove("EDGEWARD_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("edgeward fleet enroll serve");
        let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(
            first.contains("subscribed to ew/v1/enroll/req/+ (shared)"),
            "fleet enroll serve: {first}"
        );
        // Drained so it never blocks on a full pipe; the count kept.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if let Some(n) = l
                    .strip_prefix("answered ")
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    let _ = tx.send(n);
                }
            }
        });
        Serving {
            child: Some(child),
            answered: rx,
        }
    }

    /// `fleet enroll derive-key` of the `boards` group for `id`, into
    /// `out`.
    pub fn derive_key(&self, id: &str, out: &Path) {
        derive_key(&self.fleet.bin, &self.service_toml(), id, out);
    }

    /// A device's config: `hsm` (its `[hsm]` table, or empty), then
    /// `[identity]` for `id`, `[provisioning]` with `extra` lines, and a
    /// `[cloud]` of timings and local sources only.
    pub fn device_config(&self, id: &str, hsm: &str, extra: &str) -> String {
        format!(
            "{hsm}\n[identity]\ndevice_id = \"{id}\"\n\n\
             [provisioning]\nbroker = \"{enroll}\"\nca = \"{servers}\"\norg_roots = \"{workloads}\"\n\
             retry_min = \"100ms\"\nretry_max = \"500ms\"\ntimeout = \"5s\"\n{extra}\n\
             [cloud]\nreconnect_min = \"50ms\"\nreconnect_max = \"400ms\"\nreport_interval = \"200ms\"\n\
             local_sources = [\"{guests}\"]\n",
            enroll = self.enrollment.enroll_url(),
            servers = self.fleet.ca.root().display(),
            workloads = self.fleet.ca.role_root("workloads").display(),
            guests = Path::new(crate::guests::TEMPERATURE_SENSOR)
                .parent()
                .expect("the guests' directory")
                .display(),
        )
    }
}

/// A running `fleet enroll serve`, killed when dropped.
#[derive(Debug)]
pub struct Serving {
    /// The process.
    pub child: Option<std::process::Child>,
    answered: std::sync::mpsc::Receiver<u64>,
}

impl Serving {
    /// Stops it (SIGTERM) and returns how many messages it answered.
    pub fn stop(mut self) -> u64 {
        let Some(mut c) = self.child.take() else {
            return 0;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
        self.answered
            .recv_timeout(std::time::Duration::from_secs(5))
            .unwrap_or(0)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `fleet enroll derive-key` (`bin`) of the service `enroll_toml` for `id`
/// of the `boards` group, into `out`.
pub fn derive_key(bin: &Path, enroll_toml: &Path, id: &str, out: &Path) {
    ok(
        Command::new(bin)
            .args(["fleet", "enroll", "--service"])
            .arg(enroll_toml)
            .args([
                "derive-key",
                "--group",
                "boards",
                "--device-id",
                id,
                "--out",
            ])
            .arg(out)
            .output()
            .expect("edgeward fleet enroll derive-key"),
        "edgeward fleet enroll derive-key",
    );
}
