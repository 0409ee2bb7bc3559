//! `edgeward fleet`: the operator's side of the cloud interface. It talks
//! to the fleet's broker as an operator (a client certificate whose CN the
//! broker's ACL lets write `in/` topics and read `out/` ones) and to an OCI
//! registry.
//!
//! Connection settings come from flags or a `fleet.toml`:
//!
//! ```toml
//! broker = "mqtts://broker.example:8883"
//! ca = "org-root.pem"        # roots for the broker's certificate
//! cert = "operator.pem"      # the operator's client certificate (chain)
//! key = "operator.key"       # and its key (PEM)
//! ```
//!
//! What each command publishes, and where:
//! - `deploy`: the signed manifest, retained, on `ew/v1/d/<id>/in/desired`
//!   or `ew/v1/g/<group>/desired`; what it replaces goes to
//!   `ew/v1/ops/d|g/<target>/previous` (retained), which `rollback` reads.
//! - `attest`: a challenge on `ew/v1/d/<id>/in/attest/challenge`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::{AsyncClient, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;

use crate::api::SignedManifest;
use crate::cloud::oci;
use crate::cloud::topics::Topics;

/// `edgeward fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// A fleet.toml with broker, ca, cert, key.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// The broker: mqtts://HOST[:PORT]. The connection flags go before
    /// the subcommand (`fleet --key OP.key deploy M --key DEPLOY.key`).
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Roots for the broker's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The operator's client certificate (PEM, chain).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// The operator's key (PEM).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: FleetCommand,
}

/// A device or a group.
#[derive(Debug, Args, Clone)]
#[group(required = true, multiple = false)]
struct Target {
    /// One device.
    #[arg(long, value_name = "ID")]
    device: Option<String>,
    /// A group of devices.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
}

impl Target {
    /// What a deployment to it is bound to.
    fn binding(&self) -> Result<crate::attest::binding::Target, String> {
        match (&self.device, &self.group) {
            (Some(d), None) => format!("device:{d}")
                .parse()
                .map_err(|_| format!("--device {d:?} is not a device id")),
            (None, Some(g)) => format!("group:{g}")
                .parse()
                .map_err(|_| format!("--group {g:?} is not a group name")),
            _ => Err("give --device or --group".into()),
        }
    }
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    /// Publish a component as a Wasm OCI artifact; print the component
    /// digest (pin it in manifests) and the manifest digest.
    Push {
        /// The component.
        file: PathBuf,
        /// oci://REGISTRY/REPOSITORY:TAG
        reference: String,
        /// Extra roots for the registry (PEM).
        #[arg(long, value_name = "FILE")]
        registry_ca: Option<PathBuf>,
        /// Registry user name.
        #[arg(long)]
        username: Option<String>,
        /// A file holding the registry password or token.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Sign a deployment manifest and publish it as the desired deployment
    /// of a device or a group.
    Deploy {
        /// The manifest (TOML or JSON; `version` a counter above the
        /// current one; modules pin digests and may name a `source`).
        manifest: PathBuf,
        /// The deployment key (Ed25519) the devices trust.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[command(flatten)]
        target: Target,
        /// Staged rollout to a group: N% of its devices first (at least
        /// one); the rest only when those report it healthy.
        #[arg(long, value_name = "N%")]
        canary: Option<String>,
        /// With --canary: go on although some online devices have not
        /// reported (their groups are unknown: they are not chosen as
        /// canaries, and get the group's deployment with the rest). By
        /// default one such device stops the rollout.
        #[arg(long, requires = "canary")]
        allow_unreported: bool,
        /// Wait until the devices report it (applied and healthy, or
        /// refused).
        #[arg(long)]
        wait: bool,
        /// How long to wait for reports.
        #[arg(long, value_name = "DURATION", default_value = "5m")]
        timeout: String,
        /// How long the devices must stay healthy once they report it
        /// (canaries before the rest; with --wait, all).
        #[arg(long, value_name = "DURATION", default_value = "30s")]
        bake: String,
        /// How long devices may apply it for (its signed `expires`).
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        expires: String,
    },
    /// Publish the previous deployment again, under a new version.
    Rollback {
        /// The deployment key.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[command(flatten)]
        target: Target,
        /// How long devices may apply it for (its signed `expires`).
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        expires: String,
    },
    /// Every device's reported state: online or offline, the version it
    /// runs, whether it is behind or failed.
    Status {
        /// Only this device.
        #[arg(long, value_name = "ID")]
        device: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Challenge a device for attestation evidence and verify it: with
    /// --ek-ca, a nonce then a credential that binds its AK to its
    /// certified EK; without, the policy must enroll its AK. The policy
    /// defaults to the digests of the deployment the device should run
    /// (a TPM, PCR 13, each of its modules measured).
    Attest {
        /// The device.
        #[arg(long, value_name = "ID")]
        device: String,
        /// A verifier policy (see `edgeward attest verify`).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// The TPM vendor's EK CA certificates (PEM).
        #[arg(long, value_name = "FILE")]
        ek_ca: Option<PathBuf>,
        /// Without --policy: the deployment public keys devices trust
        /// (repeatable). The expected modules come only from a deployment
        /// one of them signed for this device, its --group or the fleet.
        #[arg(long = "deployment-key", value_name = "FILE")]
        deployment_keys: Vec<PathBuf>,
        /// Without --policy: a group the device is in, as the fleet's ACL
        /// has it (repeatable); what a device reports of its groups is its
        /// own word and is not used.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// The device's enrolled EK (its certificate, PEM, or sha256:HEX of
        /// its public key; repeatable): with --ek-ca, the evidence must come
        /// from this TPM, not just any genuine one.
        #[arg(long = "ek", value_name = "FILE|sha256:HEX")]
        eks: Vec<String>,
        /// Keep the evidence here.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Evidence of this device and boot verified before (an earlier
        /// --out): only the records after it are asked for, and the whole
        /// log checked so far is kept in the new --out for next time.
        #[arg(long, value_name = "DIR")]
        previous: Option<PathBuf>,
        /// How long to wait for the device's answer.
        #[arg(long, value_name = "DURATION", default_value = "30s")]
        timeout: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the devices' events (JSON lines) as they come.
    Watch {
        /// Stop after this long, counted once subscribed (default: until
        /// interrupted).
        #[arg(long, value_name = "DURATION")]
        duration: Option<String>,
    },
    /// The enrollment service's records and revocations (zero-touch
    /// provisioning; docs/fleet.md).
    Enroll {
        /// The service's enroll.toml.
        #[arg(long, value_name = "FILE")]
        service: PathBuf,
        #[command(subcommand)]
        command: EnrollCommand,
    },
    /// Print the broker ACL for a fleet (Mosquitto's acl_file format).
    Acl {
        /// DEVICE=GROUP[,GROUP...]: a device's group memberships.
        #[arg(long = "member", value_name = "DEVICE=GROUPS")]
        members: Vec<String>,
        /// Operators' certificate CNs (default: operator).
        #[arg(long = "operator", value_name = "CN")]
        operators: Vec<String>,
        /// Enrollment services' certificate CNs: each may read the
        /// devices' enrollment messages and answer them, nothing else.
        #[arg(long = "enroller", value_name = "CN")]
        enrollers: Vec<String>,
        /// Print the enrollment listener's ACL instead (devices without
        /// a certificate: each writes and reads only under its client id).
        #[arg(long, conflicts_with_all = ["members", "operators", "enrollers"])]
        enrollment_listener: bool,
    },
}

#[derive(Debug, Subcommand)]
enum EnrollCommand {
    /// Serve enrollments from the broker (the fleet connection flags:
    /// an identity the ACL lets read ew/v1/enroll/req/+ and write
    /// ew/v1/enroll/resp/+). Several instances share the work through
    /// a shared subscription.
    Serve {
        /// Stop after this long (default: until the connection ends).
        #[arg(long, value_name = "DURATION")]
        duration: Option<String>,
    },
    /// Load and check the whole configuration (roots, list, revocations,
    /// CA certificate and key, challenge key); print a summary.
    Check,
    /// The enrollments recorded (the audit log).
    List {
        /// Machine-readable output (JSON lines, as recorded).
        #[arg(long)]
        json: bool,
    },
    /// Compute a device's enrollment key in a symmetric-key group (for
    /// its manufacture: the device holds only its own).
    DeriveKey {
        /// The group (its secret is in enroll.toml's [group_secrets]).
        #[arg(long, value_name = "GROUP")]
        group: String,
        /// The device's id.
        #[arg(long, value_name = "ID")]
        device_id: String,
        /// Where to write the 32-byte key (created, mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Refuse a device's factory identity from now on (its enrolled
    /// certificate stays valid until it expires: it is not renewed).
    Revoke {
        /// The device, by the id it enrolled as (its latest enrollment).
        #[arg(
            long,
            value_name = "ID",
            conflicts_with = "factory",
            required_unless_present = "factory"
        )]
        device: Option<String>,
        /// A factory or manufacturer certificate, by fingerprint.
        #[arg(long, value_name = "sha256:HEX")]
        factory: Option<String>,
    },
    /// Make the organisation CA's key in the key daemon enroll.toml names
    /// (ca_key_daemon; ca_key is its id), if it is not there, and write
    /// a CSR for it to certify, or a self-signed root of it.
    CaKey {
        /// Write a CSR (PEM) here.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "self_signed",
            required_unless_present = "self_signed"
        )]
        csr: Option<PathBuf>,
        /// Write a self-signed root certificate (PEM, ten years) here.
        #[arg(long, value_name = "FILE")]
        self_signed: Option<PathBuf>,
        /// The subject's common name.
        #[arg(long, value_name = "CN", default_value = "edgeward organisation CA")]
        name: String,
    },
}

/// Unix seconds as RFC 3339 UTC.
fn utc(t: u64) -> String {
    i64::try_from(t)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

fn enroll(service: &Path, command: &EnrollCommand) -> Result<ExitCode, String> {
    use crate::enroll::service::{Paths, Settings, audit_entries, read_revoked, revoke};
    let paths = Paths::load(service)?;
    match command {
        EnrollCommand::Check => {
            let s = Settings::load(service)?;
            println!(
                "{}: trust domain {}, {} manufacturer certificate(s), {} individual and {} group entries, {} revoked, device CAs valid {}s",
                service.display(),
                s.trust_domain,
                s.manufacturers.len(),
                s.list.device.len(),
                s.list.group.len(),
                s.revoked.len(),
                s.lifetime.as_secs()
            );
            Ok(ExitCode::SUCCESS)
        }
        EnrollCommand::List { json } => {
            let entries = audit_entries(&paths.audit)?;
            let revoked = match &paths.revoked {
                Some(p) => read_revoked(p)?,
                None => Default::default(),
            };
            for e in &entries {
                if *json {
                    println!("{}", serde_json::to_string(e).map_err(|e| e.to_string())?);
                } else {
                    println!(
                        "{:<24} {:<22} {} {}{}",
                        e.device_id,
                        utc(e.time),
                        e.factory,
                        e.groups.join(","),
                        if revoked.contains(&e.factory) {
                            " REVOKED"
                        } else {
                            ""
                        }
                    );
                }
            }
            if !*json && entries.is_empty() {
                eprintln!("no enrollments recorded in {}", paths.audit.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        EnrollCommand::Serve { .. } => Err("serve runs from fleet's async entry".into()),
        EnrollCommand::CaKey {
            csr,
            self_signed,
            name,
        } => {
            let (pem, out, what) = match (csr, self_signed) {
                (Some(out), _) => (
                    crate::enroll::service::ca_key_certificate(service, name, false)?,
                    out,
                    "a CSR",
                ),
                (None, Some(out)) => (
                    crate::enroll::service::ca_key_certificate(service, name, true)?,
                    out,
                    "a self-signed root",
                ),
                (None, None) => return Err("give --csr or --self-signed".into()),
            };
            std::fs::write(out, pem).map_err(|e| format!("{}: {e}", out.display()))?;
            eprintln!(
                "wrote {}: {what} for the organisation CA key held by the key daemon",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        EnrollCommand::DeriveKey {
            group,
            device_id,
            out,
        } => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            if !crate::identity::valid_path_segment(device_id) {
                return Err(format!("--device-id {device_id:?} is not a valid id"));
            }
            let s = Settings::load(service)?;
            let secret = s
                .group_secrets
                .get(group)
                .ok_or_else(|| format!("{}: no secret for group {group:?}", service.display()))?;
            let key = zeroize::Zeroizing::new(crate::enroll::device_key(secret, device_id));
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .and_then(|mut f| f.write_all(key.as_slice()).and_then(|()| f.sync_all()))
                .map_err(|e| format!("{}: {e}", out.display()))?;
            eprintln!(
                "wrote {}: the enrollment key of {device_id} in {group}",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        EnrollCommand::Revoke { device, factory } => {
            let path = paths.revoked.ok_or_else(|| {
                format!(
                    "{}: name a `revoked` file to revoke into",
                    service.display()
                )
            })?;
            let (fingerprint, who) = match (device, factory) {
                (Some(d), _) => {
                    let e = audit_entries(&paths.audit)?
                        .into_iter()
                        .rev()
                        .find(|e| e.device_id == *d)
                        .ok_or_else(|| format!("no enrollment of {d:?} is recorded"))?;
                    (e.factory, format!("device {d}"))
                }
                (None, Some(f)) => (f.clone(), "by fingerprint".to_owned()),
                (None, None) => return Err("give --device or --factory".into()),
            };
            if revoke(&path, &fingerprint, &who)? {
                eprintln!("revoked {fingerprint} ({who}) in {}", path.display());
            } else {
                eprintln!("{fingerprint} was already revoked");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs `edgeward fleet`.
pub fn command(args: FleetArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::fail(e, 1),
    };
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => super::fail(e, 1),
    }
}

async fn run(args: FleetArgs) -> Result<ExitCode, String> {
    match &args.command {
        FleetCommand::Push {
            file,
            reference,
            registry_ca,
            username,
            password_file,
        } => {
            push(
                file,
                reference,
                registry_ca.as_deref(),
                username.as_deref(),
                password_file.as_deref(),
            )
            .await
        }
        FleetCommand::Acl {
            enrollment_listener: true,
            ..
        } => {
            print!("{}", crate::enroll::transport::LISTENER_ACL);
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Acl {
            members,
            operators,
            enrollers,
            ..
        } => acl(members, operators, enrollers),
        FleetCommand::Enroll {
            service,
            command: EnrollCommand::Serve { duration },
        } => {
            let duration = duration
                .as_deref()
                .map(crate::units::parse_duration)
                .transpose()
                .map_err(|e| format!("--duration: {e}"))?;
            let enrollment = crate::enroll::service::Settings::load(service)?;
            let s = settings(&args)?;
            let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
            let tls = crate::enroll::transport::tls(
                &read(&s.ca)?,
                Some((&read(&s.cert)?, &read(&s.key)?)),
            )?;
            let service = Arc::new(crate::enroll::service::Service::new(enrollment));
            let ready = |what: &str| eprintln!("fleet enroll serve: {what}");
            // Until --duration has passed, or SIGTERM or SIGINT: then the
            // count of what it answered.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .map_err(|e| format!("cannot install the SIGTERM handler: {e}"))?;
            let until = async move {
                let timer = async {
                    match duration {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = timer => {}
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            };
            let n = crate::enroll::transport::serve(service, &s.host, s.port, tls, until, &ready)
                .await?;
            eprintln!("answered {n} enrollment messages");
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Enroll { service, command } => enroll(service, command),
        FleetCommand::Deploy {
            manifest,
            key,
            target,
            canary,
            allow_unreported,
            wait,
            timeout,
            bake,
            expires,
        } => {
            let ttl =
                crate::units::parse_duration(expires).map_err(|e| format!("--expires: {e}"))?;
            let timeout =
                crate::units::parse_duration(timeout).map_err(|e| format!("--timeout: {e}"))?;
            let bake = crate::units::parse_duration(bake).map_err(|e| format!("--bake: {e}"))?;
            let text = std::fs::read_to_string(manifest)
                .map_err(|e| format!("{}: {e}", manifest.display()))?;
            let mut s = Session::connect(&settings(&args)?).await?;
            let code = deploy(
                &mut s,
                &text,
                key,
                target,
                &Rollout {
                    canary: canary.as_deref(),
                    allow_unreported: *allow_unreported,
                    wait: *wait,
                    timeout,
                    bake,
                    ttl,
                },
            )
            .await;
            s.close().await;
            code
        }
        FleetCommand::Rollback {
            key,
            target,
            expires,
        } => {
            let ttl =
                crate::units::parse_duration(expires).map_err(|e| format!("--expires: {e}"))?;
            let mut s = Session::connect(&settings(&args)?).await?;
            let code = rollback(&mut s, key, target, ttl).await;
            s.close().await;
            code
        }
        FleetCommand::Status { device, json } => {
            let mut s = Session::connect(&settings(&args)?).await?;
            let fleet = snapshot(&mut s).await?;
            s.close().await;
            status(&fleet, device.as_deref(), *json)
        }
        FleetCommand::Attest {
            device,
            policy,
            ek_ca,
            deployment_keys,
            groups,
            eks,
            out,
            previous,
            timeout,
            json,
        } => {
            let timeout =
                crate::units::parse_duration(timeout).map_err(|e| format!("--timeout: {e}"))?;
            let mut s = Session::connect(&settings(&args)?).await?;
            let expected = Expected {
                keys: deployment_keys,
                groups,
                eks,
                previous: previous.as_deref(),
            };
            let r = attest(
                &mut s,
                device,
                policy.as_deref(),
                &expected,
                ek_ca.as_deref(),
                out.as_deref(),
                timeout,
                *json,
            )
            .await;
            s.close().await;
            r
        }
        FleetCommand::Watch { duration } => {
            let duration = duration
                .as_deref()
                .map(crate::units::parse_duration)
                .transpose()
                .map_err(|e| format!("--duration: {e}"))?;
            let mut s = Session::connect(&settings(&args)?).await?;
            s.subscribe(&["ew/v1/d/+/out/events", "ew/v1/d/+/out/state"])
                .await?;
            // Watched for that long once subscribed (a slow connection
            // does not eat into it).
            let until = duration.map(|d| Instant::now() + d);
            loop {
                let left = until.map(|u| u.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    break;
                }
                let m = match left {
                    Some(l) => match tokio::time::timeout(l, s.next()).await {
                        Ok(m) => m,
                        Err(_) => break,
                    },
                    None => s.next().await,
                };
                let Some(m) = m else { break };
                let device = device_of(&m.topic).unwrap_or_default();
                let payload: serde_json::Value =
                    serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null);
                let kind = if m.topic.ends_with("/out/state") {
                    "state"
                } else {
                    "event"
                };
                println!(
                    "{}",
                    serde_json::json!({ "device": device, "type": kind, "message": payload })
                );
            }
            s.close().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Broker connection settings.
#[derive(Debug, Clone)]
pub struct Settings {
    host: String,
    port: u16,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetToml {
    broker: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

fn settings(args: &FleetArgs) -> Result<Settings, String> {
    let (file, base) = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let t: FleetToml =
                toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
            (t, p.parent().map(Path::to_owned).unwrap_or_default())
        }
        None => (FleetToml::default(), PathBuf::new()),
    };
    let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let need = |flag: &Option<PathBuf>, file: Option<PathBuf>, name: &str| {
        flag.clone()
            .or(file.map(rel))
            .ok_or_else(|| format!("--{name} (or {name} in --config fleet.toml) is needed"))
    };
    let broker = args
        .broker
        .clone()
        .or(file.broker)
        .ok_or("--broker (or broker in --config fleet.toml) is needed")?;
    let (host, port) = crate::cloud::parse_broker(&broker).map_err(|e| format!("broker: {e}"))?;
    Ok(Settings {
        host,
        port,
        ca: need(&args.ca, file.ca, "ca")?,
        cert: need(&args.cert, file.cert, "cert")?,
        key: need(&args.key, file.key, "key")?,
    })
}

/// How long a snapshot may take before it is a failure.
const SNAPSHOT_BOUND: Duration = Duration::from_secs(30);

/// An operator's MQTT session.
struct Session {
    client: AsyncClient,
    /// This session's own topic for snapshot markers (`ew/v1/ops/sync/<client id>`).
    sync_topic: String,
    messages: mpsc::Receiver<Publish>,
    acks: mpsc::Receiver<Result<(), String>>,
    /// One per SUBSCRIBE (one filter each), in order: whether the broker
    /// granted it.
    subacks: mpsc::Receiver<Result<(), String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Session {
    async fn connect(s: &Settings) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut roots = rustls::RootCertStore::empty();
        crate::cloud::tls::add_pem_roots(&mut roots, &read(&s.ca)?)
            .map_err(|e| format!("{}: {e}", s.ca.display()))?;
        let chain = CertificateDer::pem_slice_iter(&read(&s.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", s.cert.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&read(&s.key)?)
            .map_err(|e| format!("{}: {e}", s.key.display()))?;
        let tls = crate::cloud::tls::client_builder(roots)?
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("the operator certificate and key: {e}"))?;
        let mut id = [0u8; 6];
        getrandom::fill(&mut id).map_err(|e| format!("no randomness: {e}"))?;
        let client_id = format!("edgeward-fleet-{}", crate::measure::hex(&id));
        let sync_topic = format!("ew/v1/ops/sync/{client_id}");
        let mut o = MqttOptions::new(client_id, &s.host, s.port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )))
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_max_packet_size(Some(4 << 20))
        .set_outgoing_inflight_upper_limit(32);
        let (client, eventloop) = AsyncClient::new(o, 64);
        let (msg_tx, messages) = mpsc::channel(1024);
        let (ack_tx, acks) = mpsc::channel(64);
        let (suback_tx, subacks) = mpsc::channel(64);
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(crate::enroll::transport::drive(
            eventloop, up_tx, msg_tx, ack_tx, suback_tx, false,
        ));
        match tokio::time::timeout(Duration::from_secs(15), up_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => return Err("the broker connection ended".into()),
            Err(_) => {
                return Err(format!(
                    "no answer from the broker at {}:{} within 15s",
                    s.host, s.port
                ));
            }
        }
        Ok(Self {
            client,
            sync_topic,
            messages,
            acks,
            subacks,
            task,
        })
    }

    /// Subscribes to each filter (one SUBSCRIBE each) and waits until the
    /// broker has granted every one: a refused filter is an error naming
    /// it, never a silently smaller view. For filters that bring few
    /// retained messages; [`Session::retained`] counts its grants itself.
    async fn subscribe(&mut self, filters: &[&str]) -> Result<(), String> {
        self.send_subscribes(filters).await?;
        for f in filters {
            match tokio::time::timeout(Duration::from_secs(15), self.subacks.recv()).await {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(e))) => return Err(format!("{f}: {e}")),
                Ok(None) => return Err(format!("{f}: the broker connection ended")),
                Err(_) => return Err(format!("{f}: the subscription was not granted within 15s")),
            }
        }
        Ok(())
    }

    async fn send_subscribes(&mut self, filters: &[&str]) -> Result<(), String> {
        for f in filters {
            self.client
                .subscribe(*f, QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn next(&mut self) -> Option<Message> {
        self.messages.recv().await.map(|p| Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload.to_vec(),
        })
    }

    /// Every retained message on `filters` (and whatever arrives meanwhile),
    /// complete by construction: after subscribing, a marker goes out on
    /// this session's own topic, which the session also subscribes to. The
    /// broker handles a client's packets in order and queues a
    /// subscription's retained messages when it takes the SUBSCRIBE, so
    /// the marker comes back behind all of them. Time bounds only a failure:
    /// a snapshot without its marker is an error, never a shorter answer.
    async fn retained(&mut self, filters: &[&str]) -> Result<Vec<Message>, String> {
        let sync = self.sync_topic.clone();
        // The grants are counted in the loop below: waiting for them here
        // could hold the retained messages back behind a full channel.
        self.send_subscribes(&[sync.as_str()]).await?;
        self.send_subscribes(filters).await?;
        let mut granted = 0;
        let mut token = [0u8; 16];
        getrandom::fill(&mut token).map_err(|e| format!("no randomness: {e}"))?;
        let token = crate::measure::hex(&token).into_bytes();
        // Not `publish`: its wait for the acknowledgement would hold the
        // retained messages back behind a full channel.
        self.client
            .publish(sync.as_str(), QoS::AtLeastOnce, false, token.clone())
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + SNAPSHOT_BOUND;
        let mut out = Vec::new();
        let mut acked = false;
        let mut marked = false;
        while !(acked && marked && granted == filters.len() + 1) {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                m = self.messages.recv() => {
                    let Some(p) = m else {
                        return Err("the broker connection ended during the snapshot".into());
                    };
                    let m = Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                    };
                    if m.topic == sync {
                        marked |= m.payload == token;
                    } else if !marked {
                        out.push(m);
                    }
                }
                g = self.subacks.recv(), if granted <= filters.len() => match g {
                    Some(Ok(())) => granted += 1,
                    Some(Err(e)) => {
                        let which = [sync.as_str()].into_iter().chain(filters.iter().copied()).nth(granted).unwrap_or("?");
                        return Err(format!("{which}: {e}; the snapshot would be incomplete"));
                    }
                    None => return Err("the broker connection ended during the snapshot".into()),
                },
                a = self.acks.recv(), if !acked => match a {
                    Some(Ok(())) => acked = true,
                    Some(Err(e)) => return Err(format!("{sync}: {e}")),
                    None => return Err("the broker connection ended during the snapshot".into()),
                },
                () = tokio::time::sleep(left) => {
                    return Err(format!(
                        "the broker did not return this session's snapshot marker on {sync} within {SNAPSHOT_BOUND:?}: the snapshot would be incomplete, so nothing is concluded from it (is the broker overloaded, does its max_queued_messages leave room for every retained message at once (docs/fleet.md), or does the ACL deny this operator {sync}?)"
                    ));
                }
            }
        }
        for f in filters.iter().chain([&sync.as_str()]) {
            let _ = self.client.unsubscribe(*f).await;
        }
        Ok(out)
    }

    /// Publishes (QoS 1) and waits for the broker's acknowledgement.
    async fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(15), self.acks.recv()).await {
            Ok(Some(r)) => r.map_err(|e| format!("{topic}: {e}")),
            Ok(None) => Err(format!("{topic}: the broker connection ended")),
            Err(_) => Err(format!("{topic}: not acknowledged within 15s")),
        }
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

#[derive(Debug, Clone)]
struct Message {
    topic: String,
    payload: Vec<u8>,
}

fn device_of(topic: &str) -> Option<String> {
    topic
        .strip_prefix("ew/v1/d/")
        .and_then(|r| r.split('/').next())
        .map(str::to_owned)
}

/// What the broker holds about the fleet.
#[derive(Debug, Default)]
struct Snapshot {
    state: BTreeMap<String, serde_json::Value>,
    reported: BTreeMap<String, serde_json::Value>,
    /// The desired deployment published for each device.
    device_desired: BTreeMap<String, Published>,
    /// The desired deployment published for each group.
    group_desired: BTreeMap<String, Published>,
}

/// A desired deployment as published.
#[derive(Debug)]
struct Published {
    version: u64,
    deployment: crate::api::Deployment,
}

fn published(payload: &[u8]) -> Option<Published> {
    let m: SignedManifest = serde_json::from_slice(payload).ok()?;
    let deployment = m.deployment().ok()?;
    Some(Published {
        version: crate::cloud::desired::parse_version(&deployment.version)?,
        deployment,
    })
}

/// The deployment in `payload` if one of `keys` signed it and it is
/// addressed to one of `bindings` (`device:ID`, `group:G`, `fleet`): what
/// the broker holds is only a candidate until then.
///
/// # Errors
///
/// Unsigned, a signature none of `keys` made, or another target; named.
fn verified(
    payload: &[u8],
    keys: &[crate::attest::publisher::PublicKey],
    bindings: &[String],
) -> Result<Published, String> {
    use base64ct::Encoding as _;
    let m: SignedManifest =
        serde_json::from_slice(payload).map_err(|e| format!("not a signed deployment: {e}"))?;
    let sig = m.signature.as_deref().ok_or("unsigned").and_then(|b| {
        base64ct::Base64::decode_vec(b.trim()).map_err(|_| "signature: not base64")
    })?;
    crate::attest::publisher::verify_manifest(m.manifest.as_bytes(), Some(&sig), keys)
        .map_err(|e| e.to_string())?;
    let deployment = m.deployment()?;
    let target = deployment.target.clone().unwrap_or_default();
    if !bindings.contains(&target) {
        return Err(format!(
            "signed for {target:?}, not for {}",
            bindings.join(" or ")
        ));
    }
    Ok(Published {
        version: crate::cloud::desired::parse_version(&deployment.version)
            .ok_or("its version is not a decimal counter")?,
        deployment,
    })
}

/// The bindings a deployment published for `t` may carry: its own, or the
/// fleet's on a group topic.
fn bindings_for(t: &Target) -> Result<Vec<String>, String> {
    let own = t.binding()?.to_string();
    Ok(if t.group.is_some() {
        vec![own, "fleet".to_owned()]
    } else {
        vec![own]
    })
}

impl Snapshot {
    /// The groups `device` reports it is in.
    fn groups_of(&self, device: &str) -> Vec<&str> {
        self.reported
            .get(device)
            .and_then(|r| r["groups"].as_array())
            .map(|g| g.iter().filter_map(|g| g.as_str()).collect())
            .unwrap_or_default()
    }

    /// The devices whose state the broker holds, not offline, with no
    /// report: their groups are unknown.
    fn unreported(&self) -> Vec<String> {
        self.state
            .iter()
            .filter(|(d, s)| !self.reported.contains_key(*d) && s["state"] != "offline")
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// The devices that report being in `group`.
    fn members(&self, group: &str) -> Vec<String> {
        self.reported
            .keys()
            .filter(|d| self.groups_of(d).contains(&group))
            .cloned()
            .collect()
    }

    /// What `device` should run: its own desired deployment or its
    /// groups', the highest version (the order the device applies).
    fn desired_for(&self, device: &str) -> Option<&Published> {
        self.groups_of(device)
            .into_iter()
            .filter_map(|g| self.group_desired.get(g))
            .chain(self.device_desired.get(device))
            .max_by_key(|p| p.version)
    }
}

async fn snapshot(s: &mut Session) -> Result<Snapshot, String> {
    let msgs = s
        .retained(&[
            "ew/v1/d/+/out/state",
            "ew/v1/d/+/out/reported",
            "ew/v1/d/+/in/desired",
            "ew/v1/g/+/desired",
        ])
        .await?;
    let mut snap = Snapshot::default();
    for m in msgs {
        if let Some(g) = m
            .topic
            .strip_prefix("ew/v1/g/")
            .and_then(|r| r.strip_suffix("/desired"))
        {
            if let Some(p) = published(&m.payload) {
                snap.group_desired.insert(g.to_owned(), p);
            }
            continue;
        }
        let Some(device) = device_of(&m.topic) else {
            continue;
        };
        if m.topic.ends_with("/in/desired") {
            if let Some(p) = published(&m.payload) {
                snap.device_desired.insert(device, p);
            }
            continue;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
            continue;
        };
        if m.topic.ends_with("/out/state") {
            snap.state.insert(device, v);
        } else if m.topic.ends_with("/out/reported") {
            snap.reported.insert(device, v);
        }
    }
    Ok(snap)
}

/// What a device's row says.
#[derive(Debug, serde::Serialize)]
struct Row {
    device: String,
    online: bool,
    /// The version it runs.
    version: Option<String>,
    /// The version it should run (its own or its groups', the highest).
    desired: Option<u64>,
    /// ok, behind, failed, offline, or unknown (no report).
    status: &'static str,
    /// Modules not running, and the last refusal.
    problems: Vec<String>,
    daemon: Option<String>,
    modules: usize,
}

/// What is wrong with a reported module (`NAME STATE: REASON`), if its
/// state means it failed.
fn failure(m: &serde_json::Value) -> Option<String> {
    let state = m["state"].as_str().unwrap_or("");
    failed_state(state).then(|| {
        format!(
            "{} {state}{}",
            m["name"].as_str().unwrap_or("?"),
            m["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )
    })
}

/// A module state that means it failed.
fn failed_state(s: &str) -> bool {
    matches!(
        s,
        "backing-off" | "crash-looping" | "refused" | "failed" | "integrity-failed"
    )
}

fn rows(fleet: &Snapshot) -> Vec<Row> {
    let mut devices: Vec<&String> = fleet.state.keys().chain(fleet.reported.keys()).collect();
    devices.extend(fleet.device_desired.keys());
    devices.sort();
    devices.dedup();
    devices
        .into_iter()
        .map(|d| {
            let r = fleet.reported.get(d);
            let online = fleet.state.get(d).is_some_and(|s| s["state"] == "online");
            let version = r.and_then(|r| r["version"].as_str()).map(str::to_owned);
            let desired = fleet.desired_for(d).map(|p| p.version);
            let mut problems = Vec::new();
            let mut modules = 0;
            for m in r
                .and_then(|r| r["modules"].as_array())
                .into_iter()
                .flatten()
            {
                modules += 1;
                problems.extend(failure(m));
            }
            if let Some(refused) = r.and_then(|r| r.get("refused")).filter(|v| !v.is_null()) {
                problems.push(format!(
                    "refused version {}: {}",
                    refused["version"].as_str().unwrap_or("?"),
                    refused["reason"].as_str().unwrap_or("?")
                ));
            }
            let applied: Option<u64> = version.as_deref().and_then(|v| v.parse().ok());
            let status = if r.is_none() {
                // No report in a complete snapshot: nothing is known of what
                // it runs. Its will says offline, or it is unknown; never ok.
                if fleet.state.get(d).is_some_and(|s| s["state"] == "offline") {
                    "offline"
                } else {
                    "unknown"
                }
            } else if !problems.is_empty() {
                "failed"
            } else if desired.is_some_and(|want| applied.is_none_or(|a| a < want)) {
                "behind"
            } else if !online {
                "offline"
            } else {
                "ok"
            };
            Row {
                device: d.clone(),
                online,
                version,
                desired,
                status,
                problems,
                daemon: r
                    .and_then(|r| r["daemon"]["version"].as_str())
                    .map(str::to_owned),
                modules,
            }
        })
        .collect()
}

fn status(fleet: &Snapshot, device: Option<&str>, json: bool) -> Result<ExitCode, String> {
    let rows: Vec<Row> = rows(fleet)
        .into_iter()
        .filter(|r| device.is_none_or(|d| r.device == d))
        .collect();
    if let Some(d) = device
        && rows.is_empty()
    {
        return Err(format!("no device {d:?} has reported to this broker"));
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<8} {:<8} {:<8} {:<8} PROBLEMS",
        "DEVICE", "STATE", "VERSION", "DESIRED", "STATUS"
    );
    for r in &rows {
        println!(
            "{:<24} {:<8} {:<8} {:<8} {:<8} {}",
            r.device,
            if r.online { "online" } else { "offline" },
            r.version.as_deref().unwrap_or("-"),
            r.desired.map_or_else(|| "-".to_owned(), |v| v.to_string()),
            r.status,
            r.problems.join("; ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The desired topic and the previous-deployment topic of a target.
fn target_topics(t: &Target) -> Result<(String, String, String), String> {
    match (&t.device, &t.group) {
        (Some(d), None) => {
            if !crate::identity::valid_path_segment(d) {
                return Err(format!("--device {d:?} is not a device id"));
            }
            Ok((
                Topics::new(d, &[]).desired(),
                format!("ew/v1/ops/d/{d}/previous"),
                format!("device {d}"),
            ))
        }
        (None, Some(g)) => {
            if !crate::cloud::topics::valid_group(g) {
                return Err(format!("--group {g:?} is not a group name"));
            }
            Ok((
                Topics::group_desired(g),
                format!("ew/v1/ops/g/{g}/previous"),
                format!("group {g}"),
            ))
        }
        _ => Err("give --device or --group".into()),
    }
}

/// The manifest checked as a device will check it; its version.
fn checked_version(text: &str) -> Result<u64, String> {
    let m = SignedManifest {
        manifest: text.to_owned(),
        signature: None,
    };
    let d = m.deployment()?;
    m.sources()?;
    crate::cloud::desired::parse_version(&d.version).ok_or_else(|| {
        format!(
            "version {:?}: a fleet deployment's version is a decimal counter from 1",
            d.version
        )
    })
}

fn signed_payload(text: &str, key: &Path) -> Result<Vec<u8>, String> {
    use base64ct::Encoding as _;
    let sig = crate::attest::publisher::sign_manifest_bytes(key, text.as_bytes())?;
    serde_json::to_vec(&serde_json::json!({
        "manifest": text,
        "signature": base64ct::Base64::encode_string(&sig),
    }))
    .map_err(|e| e.to_string())
}

/// The retained message on `topic` (if any).
async fn retained_one(s: &mut Session, topic: &str) -> Result<Option<Vec<u8>>, String> {
    let msgs = s.retained(&[topic]).await?;
    Ok(msgs
        .into_iter()
        .rfind(|m| m.topic == topic)
        .map(|m| m.payload))
}

/// Publishes `payload` as `target`'s desired deployment, keeping what it
/// replaces as the previous one.
/// Publishes `payload` (version `version`) for `target`, keeping what it
/// replaces as the previous deployment. Only a current deployment `keys`
/// signed for this target counts: anything else retained there (planted
/// by whoever can write the broker, with a huge version, say) neither
/// blocks the new version nor becomes the previous one.
async fn publish_desired(
    s: &mut Session,
    target: &Target,
    payload: Vec<u8>,
    version: u64,
    keys: &[crate::attest::publisher::PublicKey],
) -> Result<(), String> {
    let (desired, previous, what) = target_topics(target)?;
    if let Some(current) = retained_one(s, &desired).await? {
        match verified(&current, keys, &bindings_for(target)?) {
            Ok(cur) if cur.version >= version => {
                return Err(format!(
                    "{what} has version {} published; this one ({version}) must be newer: raise `version` in the manifest",
                    cur.version
                ));
            }
            Ok(_) => s.publish(&previous, current, true).await?,
            Err(e) => eprintln!(
                "warning: {desired} holds a message this deployment key did not sign for {what} ({e}); it is replaced, not kept as the previous deployment"
            ),
        }
    }
    s.publish(&desired, payload, true).await
}

/// Whether device `d` reports `version` applied with every module
/// healthy: Some(Ok) healthy, Some(Err) failed (refused or a module
/// failed), None not yet.
fn health(fleet: &Snapshot, d: &str, version: u64) -> Option<Result<(), String>> {
    let r = fleet.reported.get(d)?;
    if let Some(refused) = r.get("refused").filter(|v| !v.is_null())
        && refused["version"].as_str() == Some(version.to_string().as_str())
    {
        return Some(Err(format!(
            "refused: {}",
            refused["reason"].as_str().unwrap_or("?")
        )));
    }
    if r["version"].as_str() != Some(version.to_string().as_str()) {
        return None;
    }
    let mut waiting = false;
    for m in r["modules"].as_array().into_iter().flatten() {
        if let Some(f) = failure(m) {
            return Some(Err(format!("module {f}")));
        }
        let state = m["state"].as_str().unwrap_or("");
        if m["origin"] == "cloud" && !matches!(state, "running" | "exited") {
            waiting = true;
        }
    }
    (!waiting).then_some(Ok(()))
}

/// Waits until every device in `devices` reports `version` healthy and
/// stays so for `bake` (Ok), or one fails (Err naming it), or `timeout`.
async fn await_health(
    s: &mut Session,
    devices: &[String],
    version: u64,
    timeout: Duration,
    bake: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut healthy_since: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let fleet = snapshot(s).await?;
        let mut pending = Vec::new();
        for d in devices {
            match health(&fleet, d, version) {
                Some(Ok(())) => {
                    let since = *healthy_since.entry(d.clone()).or_insert_with(|| {
                        eprintln!("{d}: version {version} applied and healthy");
                        Instant::now()
                    });
                    if since.elapsed() < bake {
                        pending.push(d.clone());
                    }
                }
                Some(Err(e)) => return Err(format!("{d}: {e}")),
                None => {
                    healthy_since.remove(d);
                    pending.push(d.clone());
                }
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not reported healthy for {bake:?} within {timeout:?}: {}",
                pending.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// How a deployment rolls out.
#[derive(Debug)]
struct Rollout<'a> {
    canary: Option<&'a str>,
    allow_unreported: bool,
    wait: bool,
    timeout: Duration,
    bake: Duration,
    /// How long devices may apply it for.
    ttl: Duration,
}

async fn deploy(
    s: &mut Session,
    text: &str,
    key: &Path,
    target: &Target,
    rollout: &Rollout<'_>,
) -> Result<ExitCode, String> {
    let Rollout {
        canary,
        allow_unreported,
        wait,
        timeout,
        bake,
        ttl,
    } = *rollout;
    let version = checked_version(text)?;
    let payload = signed_payload(&bound(text, target, ttl)?, key)?;
    let keys = [crate::attest::publisher::public_of(key)?];
    let (_, _, what) = target_topics(target)?;
    // The devices the rollout is waited for (with --wait), if known.
    let mut devices = target.device.iter().cloned().collect::<Vec<_>>();
    match (canary, &target.group) {
        (Some(_), None) => return Err("--canary is for a --group".into()),
        (Some(pct), Some(group)) => {
            let pct: u32 = pct
                .trim_end_matches('%')
                .parse()
                .ok()
                .filter(|p| (1..=100).contains(p))
                .ok_or_else(|| format!("--canary {pct:?}: 1% to 100%"))?;
            let fleet = snapshot(s).await?;
            let unknown = fleet.unreported();
            if !unknown.is_empty() && !allow_unreported {
                return Err(format!(
                    "the broker holds no report from {}: their groups are unknown, so the canaries of group {group} cannot be chosen; wait for their reports (fleet status), deploy to them by --device, or pass --allow-unreported to go on without them as canaries",
                    unknown.join(", ")
                ));
            }
            if !unknown.is_empty() {
                eprintln!(
                    "warning: no report from {}: not chosen as canaries (--allow-unreported)",
                    unknown.join(", ")
                );
            }
            devices = fleet.members(group);
            if devices.is_empty() {
                return Err(format!(
                    "no device of group {group} has reported: nothing to roll out to"
                ));
            }
            let n = (devices.len() * pct as usize).div_ceil(100).max(1);
            let canaries = &devices[..n];
            eprintln!(
                "canary: version {version} to {} of {} devices of group {group}: {}",
                n,
                devices.len(),
                canaries.join(", ")
            );
            // Each canary gets the deployment signed for it alone: a
            // device applies only what is addressed to it.
            let unbound = with_fields(text, &[], &["target"])?;
            for d in canaries {
                let t = Target {
                    device: Some(d.clone()),
                    group: None,
                };
                let own = signed_payload(&bound(&unbound, &t, ttl)?, key)?;
                publish_desired(s, &t, own, version, &keys).await?;
            }
            if let Err(e) = await_health(s, canaries, version, timeout, bake).await {
                eprintln!(
                    "canary failed, rollout stopped (the rest of group {group} keeps what it runs): {e}"
                );
                eprintln!(
                    "undo on the canaries with: edgeward fleet rollback --device ID --key KEY"
                );
                return Ok(ExitCode::from(3));
            }
            publish_desired(s, target, payload, version, &keys).await?;
            eprintln!("canaries healthy: version {version} published to group {group}");
        }
        (None, group) => {
            publish_desired(s, target, payload, version, &keys).await?;
            eprintln!("version {version} published to {what}");
            if let (true, Some(g)) = (wait, group) {
                devices = snapshot(s).await?.members(g);
            }
        }
    }
    if wait && let Err(e) = await_health(s, &devices, version, timeout, bake).await {
        eprintln!("{e}");
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

/// `manifest` (TOML or JSON) with top-level text `fields` set and the
/// keys in `remove` taken out.
fn with_fields(
    manifest: &str,
    fields: &[(&str, String)],
    remove: &[&str],
) -> Result<String, String> {
    if manifest.trim_start().starts_with('{') {
        let mut v: serde_json::Value = serde_json::from_str(manifest).map_err(|e| e.to_string())?;
        let o = v
            .as_object_mut()
            .ok_or("the manifest is not a JSON object")?;
        for k in remove {
            o.remove(*k);
        }
        for (k, val) in fields {
            o.insert((*k).into(), val.clone().into());
        }
        serde_json::to_string_pretty(&v).map_err(|e| e.to_string())
    } else {
        let mut t: toml::Table = toml::from_str(manifest).map_err(|e| e.to_string())?;
        for k in remove {
            t.remove(*k);
        }
        for (k, val) in fields {
            t.insert((*k).into(), toml::Value::String(val.clone()));
        }
        toml::to_string(&t).map_err(|e| e.to_string())
    }
}

/// `manifest` bound to `target` until `ttl` from now: the deployment a
/// device applies only if it is addressed to it (see
/// `attest::binding`). A `target` the manifest names must be `target`.
fn bound(manifest: &str, target: &Target, ttl: Duration) -> Result<String, String> {
    let want = target.binding()?;
    let m = SignedManifest {
        manifest: manifest.to_owned(),
        signature: None,
    };
    if let Some(t) = m.deployment()?.target
        && t != want.to_string()
    {
        return Err(format!(
            "the manifest's target is {t}, but it is being deployed to {want}"
        ));
    }
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        + ttl;
    with_fields(
        manifest,
        &[
            ("target", want.to_string()),
            (
                "expires",
                crate::runtime::logfile::rfc3339(Duration::from_secs(expires.as_secs()))
                    .replace(".000Z", "Z"),
            ),
        ],
        &[],
    )
}

async fn rollback(
    s: &mut Session,
    key: &Path,
    target: &Target,
    ttl: Duration,
) -> Result<ExitCode, String> {
    let (desired, previous, what) = target_topics(target)?;
    let prev = retained_one(s, &previous)
        .await?
        .ok_or_else(|| format!("{what} has no previous deployment to roll back to"))?;
    // Whatever sits on the broker is only a candidate: republished (and
    // signed again) only if this deployment key signed it for this target,
    // and only before it expired (an old deployment someone kept, planted
    // back, is not revived; deploy it anew if that is meant).
    let keys = [crate::attest::publisher::public_of(key)?];
    let own = [target.binding()?.to_string()];
    let checked = verified(&prev, &keys, &own).map_err(|e| {
        format!("{previous}: {e}: not rolled back to (was it planted by someone who can write the broker?)")
    })?;
    let prev: SignedManifest =
        serde_json::from_slice(&prev).map_err(|e| format!("{previous}: {e}"))?;
    let expires = checked.deployment.expires.clone().unwrap_or_default();
    match crate::attest::binding::parse_utc(&expires) {
        Some(t) if t > crate::attest::binding::now() => {}
        _ => {
            return Err(format!(
                "{previous}: version {} expired at {expires:?}: not revived by a rollback; deploy it anew if it is meant",
                checked.version
            ));
        }
    }
    let current = match retained_one(s, &desired).await? {
        Some(c) => verified(&c, &keys, &bindings_for(target)?)
            .map(|p| p.version)
            .unwrap_or(0),
        None => 0,
    };
    // The retained version is the broker's word, not a signed one: a
    // planted u64::MAX must not wrap (or panic) into a version.
    let version = current.checked_add(1).ok_or_else(|| {
        format!("{desired} holds version {current}, the last there can be: clear that retained message (it is not one this fleet can have signed)")
    })?;
    let text = with_fields(&prev.manifest, &[("version", version.to_string())], &[])?;
    let text = bound(&text, target, ttl)?;
    let payload = signed_payload(&text, key)?;
    publish_desired(s, target, payload, version, &keys).await?;
    eprintln!(
        "{what}: the previous deployment ({}) published again as version {version}",
        prev.deployment().map(|d| d.version).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

async fn push(
    file: &Path,
    reference: &str,
    registry_ca: Option<&Path>,
    username: Option<&str>,
    password_file: Option<&Path>,
) -> Result<ExitCode, String> {
    let r: oci::Reference = reference.parse()?;
    let roots = registry_ca
        .map(|p| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display())))
        .transpose()?;
    let credentials = match (username, password_file) {
        (Some(u), Some(p)) => Some(oci::Credentials::from_file(u, p)?),
        (None, None) => None,
        _ => return Err("--username and --password-file go together".into()),
    };
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    if !crate::attest::publisher::is_wasm(&bytes) {
        return Err(format!("{}: not WebAssembly", file.display()));
    }
    let client = oci::Client::new(roots.as_deref(), credentials)?;
    let (component, manifest) = client.push(&r, &bytes).await?;
    println!("component {component}");
    println!("manifest  {manifest}");
    println!(
        "pin it:    digest = \"{component}\"\n           source = \"oci://{}/{}@{manifest}\"",
        r.registry, r.repository
    );
    Ok(ExitCode::SUCCESS)
}

fn acl(members: &[String], operators: &[String], enrollers: &[String]) -> Result<ExitCode, String> {
    let mut out = String::from(
        "# The fleet ACL (Mosquitto acl_file). Generated by edgeward fleet acl.\n# The user is the client certificate's CN (use_identity_as_username true),\n# so the broker's cafile must hold only the organisation's devices and\n# operators CAs: never the root of devices' own CAs, whose certificates\n# modules hold (docs/fleet.md).\n\n# Each device: read its own in/ topics, write its own out/ topics.\npattern read ew/v1/d/%u/in/#\npattern write ew/v1/d/%u/out/#\n# And read its own events back: the outbox's proof of delivery.\npattern read ew/v1/d/%u/out/events\n",
    );
    for m in members {
        let (device, groups) = m
            .split_once('=')
            .ok_or_else(|| format!("--member {m:?}: DEVICE=GROUP[,GROUP...]"))?;
        if !crate::identity::valid_path_segment(device) {
            return Err(format!("--member {m:?}: {device:?} is not a device id"));
        }
        out.push_str(&format!("\nuser {device}\n"));
        for g in groups.split(',') {
            if !crate::cloud::topics::valid_group(g) {
                return Err(format!("--member {m:?}: {g:?} is not a group name"));
            }
            out.push_str(&format!("topic read ew/v1/g/{g}/desired\n"));
        }
    }
    let ops: Vec<&str> = if operators.is_empty() {
        vec!["operator"]
    } else {
        operators.iter().map(String::as_str).collect()
    };
    for m in members {
        let device = m.split_once('=').map_or(m.as_str(), |(d, _)| d);
        if ops.contains(&device) {
            return Err(format!(
                "--member {m:?}: {device:?} is also an operator's name; a device certificate with that CN would be the operator"
            ));
        }
    }
    for e in enrollers {
        if e.is_empty() || e.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "--enroller {e:?} is not a certificate CN this ACL can name"
            ));
        }
        if members
            .iter()
            .any(|m| m.split_once('=').map_or(m.as_str(), |(d, _)| d) == e)
        {
            return Err(format!("--enroller {e:?} is also a device's name"));
        }
        out.push_str(&format!(
            "\n# Enrollment service {e}: read the devices' enrollment messages, answer them.\nuser {e}\ntopic read {req}/+\ntopic write {resp}/+\n",
            req = crate::enroll::transport::REQUESTS,
            resp = crate::enroll::transport::ANSWERS,
        ));
    }
    for o in ops {
        if o.is_empty() || o.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "--operator {o:?} is not a certificate CN this ACL can name"
            ));
        }
        out.push_str(&format!(
            "\n# Operator {o}: publish desired deployments and challenges, read reports.\nuser {o}\ntopic readwrite ew/v1/#\n"
        ));
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// Sends a challenge to `device` and returns its evidence, written to
/// `dir` (only the files evidence may hold).
async fn challenge_device(
    s: &mut Session,
    device: &str,
    challenge: serde_json::Value,
    dir: &Path,
    timeout: Duration,
) -> Result<(), String> {
    use base64ct::Encoding as _;
    let id = challenge["id"].as_str().unwrap_or_default().to_owned();
    let topics = Topics::new(device, &[]);
    s.subscribe(&[&topics.evidence()]).await?;
    s.publish(
        &topics.challenge(),
        serde_json::to_vec(&challenge).map_err(|e| e.to_string())?,
        false,
    )
    .await?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = match tokio::time::timeout(left, s.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => return Err("the broker connection ended".into()),
            Err(_) => {
                return Err(format!(
                    "{device} did not answer within {timeout:?} (offline? see fleet status)"
                ));
            }
        };
        if m.topic != topics.evidence() {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
            continue;
        };
        if v["id"] != id.as_str() {
            continue;
        }
        if let Some(e) = v["error"].as_str() {
            return Err(format!("{device} refused the challenge: {e}"));
        }
        let files = v["files"].as_object().ok_or("the evidence has no files")?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for name in crate::attest::evidence::FILES {
            let _ = std::fs::remove_file(dir.join(name));
        }
        for (name, b64) in files {
            if !crate::attest::evidence::FILES.contains(&name.as_str()) {
                return Err(format!("the evidence holds an unexpected file {name:?}"));
            }
            let bytes = base64ct::Base64::decode_vec(b64.as_str().unwrap_or_default())
                .map_err(|_| format!("{name}: not base64"))?;
            std::fs::write(dir.join(name), bytes).map_err(|e| format!("{name}: {e}"))?;
        }
        return Ok(());
    }
}

/// The policy a device is held to by default: the module digests of the
/// deployment it should run (its own desired deployment or its groups',
/// the highest version).
/// What `fleet attest` without a policy expects a device to run: the
/// newest deployment one of `keys` signed for it, for one of `groups`
/// (the operator's word), or for the fleet.
struct Expected<'a> {
    keys: &'a [PathBuf],
    groups: &'a [String],
    /// Enrolled EKs, added to whichever policy applies.
    eks: &'a [String],
    /// Evidence verified before: ask only for what came after.
    previous: Option<&'a Path>,
}

async fn default_policy(
    s: &mut Session,
    device: &str,
    expected: &Expected<'_>,
) -> Result<crate::attest::verify::Policy, String> {
    if expected.keys.is_empty() {
        return Err(
            "give --deployment-key (the public keys devices trust: the expected modules come only from a deployment one of them signed) or --policy".into(),
        );
    }
    let keys = crate::attest::publisher::load_publishers(expected.keys)
        .map_err(|e| format!("--deployment-key: {e}"))?;
    let mut candidates = vec![(
        Topics::new(device, &[]).desired(),
        vec![format!("device:{device}")],
    )];
    for g in expected.groups {
        if !crate::cloud::topics::valid_group(g) {
            return Err(format!("--group {g:?} is not a group name"));
        }
        candidates.push((
            Topics::group_desired(g),
            vec![format!("group:{g}"), "fleet".to_owned()],
        ));
    }
    let mut best: Option<Published> = None;
    let mut refused = Vec::new();
    for (topic, bindings) in candidates {
        let Some(payload) = retained_one(s, &topic).await? else {
            continue;
        };
        let now = crate::attest::binding::now();
        match verified(&payload, &keys, &bindings) {
            // An expired deployment is no longer what a device should run
            // (a replayed old one is not the expectation).
            Ok(p)
                if p.deployment
                    .expires
                    .as_deref()
                    .and_then(crate::attest::binding::parse_utc)
                    .is_none_or(|t| t <= now) =>
            {
                refused.push(format!("{topic}: version {} has expired", p.version));
            }
            Ok(p) if best.as_ref().is_none_or(|b| p.version > b.version) => best = Some(p),
            Ok(_) => {}
            Err(e) => refused.push(format!("{topic}: {e}")),
        }
    }
    let best = best.ok_or_else(|| {
        format!(
            "no deployment signed by --deployment-key is published for {device}{}{}: give --group (its groups, as the fleet ACL has them) or --policy",
            if expected.groups.is_empty() {
                String::new()
            } else {
                format!(" or its groups {}", expected.groups.join(", "))
            },
            if refused.is_empty() {
                String::new()
            } else {
                format!(" (not used: {})", refused.join("; "))
            }
        )
    })?;
    let mut policy = crate::attest::verify::Policy::default();
    for m in &best.deployment.modules {
        policy
            .modules
            .entry(m.name.clone())
            .or_default()
            .push(m.digest.to_ascii_lowercase());
    }
    Ok(policy)
}

#[allow(clippy::too_many_arguments)]
async fn attest(
    s: &mut Session,
    device: &str,
    policy: Option<&Path>,
    expected: &Expected<'_>,
    ek_ca: Option<&Path>,
    out: Option<&Path>,
    timeout: Duration,
    json: bool,
) -> Result<ExitCode, String> {
    use crate::attest::verify;
    if !crate::identity::valid_path_segment(device) {
        return Err(format!("--device {device:?} is not a device id"));
    }
    let mut policy = match policy {
        Some(p) => verify::Policy::load(p)?,
        None => default_policy(s, device, expected).await?,
    };
    for e in expected.eks {
        policy
            .eks
            .push(verify::ek_digest(e, Path::new(".")).map_err(|m| format!("--ek: {m}"))?);
    }
    if ek_ca.is_none() && policy.aks.is_empty() {
        return Err(format!(
            "give --ek-ca (the TPM vendor's EK CA: the device's AK is then bound to its certified EK) or a --policy that enrolls {device}'s AK (aks): without either, any key could have signed its evidence"
        ));
    }
    let from = match expected.previous {
        Some(p) => verify::records_held(p).map_err(|e| format!("--previous: {e}"))?,
        None => 0,
    };
    let mut expect = verify::Expect {
        device: Some(device.to_owned()),
        policy: Some(policy),
        previous: expected.previous.map(Path::to_owned),
        ..verify::Expect::default()
    };
    let scratch;
    let dir = match out {
        Some(o) => o.to_owned(),
        None => {
            scratch = Scratch::new()?;
            scratch.0.join("evidence")
        }
    };
    let random = |n: usize| -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; n];
        getrandom::fill(&mut b).map_err(|e| format!("no randomness: {e}"))?;
        Ok(b)
    };
    let nonce = random(32)?;
    let id = crate::measure::hex(&random(8)?);
    challenge_device(
        s,
        device,
        with_from(
            serde_json::json!({ "id": id, "nonce": crate::measure::hex(&nonce) }),
            from,
        ),
        &dir,
        timeout,
    )
    .await?;
    expect.nonce = Some(nonce);
    if let Some(ca) = ek_ca {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let cas = verify::pem_certificates(&pem, "--ek-ca")?;
        let (credential, record) = verify::challenge(&dir, &cas)?;
        // The device answers one challenge a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        use base64ct::Encoding as _;
        let id = crate::measure::hex(&random(8)?);
        challenge_device(
            s,
            device,
            with_from(
                serde_json::json!({
                    "id": id,
                    "credential": base64ct::Base64UrlUnpadded::encode_string(&credential.to_bytes()),
                }),
                from,
            ),
            &dir,
            timeout,
        )
        .await?;
        expect.nonce = None;
        expect.challenge = Some(record);
        expect.ek_ca = Some(cas);
    }
    Ok(super::attest::print_verdict(
        &verify::verify(&dir, &expect),
        json,
        Some(device),
    ))
}

/// A challenge asking for the log from record `from` on: the field only
/// when it is not 0, so a device from before incremental evidence (which
/// refuses unknown fields) still answers a whole-log challenge.
fn with_from(mut challenge: serde_json::Value, from: u64) -> serde_json::Value {
    if from > 0 {
        challenge["from"] = from.into();
    }
    challenge
}

/// A private scratch directory for evidence, removed when dropped
/// (whichever way `attest` returns).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self, String> {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| format!("no randomness: {e}"))?;
        let dir = std::env::temp_dir().join(format!("edgeward-fleet-{}", crate::measure::hex(&b)));
        crate::state::ensure_private_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enroll::transport::suback_result;
    use rumqttc::v5::mqttbytes::v5::{SubAck, SubscribeReasonCode};

    #[test]
    fn a_refused_filter_in_a_suback_is_an_error() {
        let ack = |codes: Vec<SubscribeReasonCode>| SubAck {
            pkid: 1,
            return_codes: codes,
            properties: None,
        };
        assert!(suback_result(&ack(vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)])).is_ok());
        let e = suback_result(&ack(vec![SubscribeReasonCode::NotAuthorized])).unwrap_err();
        assert!(
            e.contains("refused the subscription") && e.contains("NotAuthorized"),
            "{e}"
        );
        assert!(suback_result(&ack(vec![SubscribeReasonCode::QuotaExceeded])).is_err());
    }
}
