//! The device's side of enrollment: `[provisioning]`, what an enrollment
//! leaves in the state directory, and the daemon's enrollment at start.
//!
//! ```toml
//! [provisioning]
//! broker = "mqtts://enroll.example:8884"  # the enrollment listener
//! ca = "enroll-ca.pem"                # its TLS roots
//! org_roots = "org-root.pem"          # the roots the answer must chain to
//! group = "boards"                    # symmetric-key group enrollment (boards
//! enrollment_key = "/etc/edgeward/enrollment.key"  # without a TPM); else the TPM
//! retry_min = "5s"                    # backoff between attempts: doubling,
//! retry_max = "10m"                   # with jitter, between these
//! timeout = "30s"                     # for each answer of the service
//! renew_threshold = "67%"             # renew the device CA certificate this
//!                                     # far into its lifetime (1-99%)
//! ```
//!
//! The device asks for its `[identity] device_id`. Until it is enrolled,
//! the daemon runs its last deployment with its self-signed device CA and
//! enrolls in the background; then it writes the answer into
//! `<state>/identity/` (the chain, and when the organisation assigns a
//! fleet: the broker's roots, the login certificate, the deployment
//! keys; `enrollment.json` last, so a crash leaves no half enrollment),
//! measures an `enrolled` event, adopts the chain (modules get SVIDs under
//! the organisation's root from their next request) and connects to the
//! assigned broker. `[cloud]` then holds only what the enrollment does not
//! assign (timings, registries, local sources).
//!
//! Files in `<state>/identity/` (the state dir is the daemon's, 0700):
//!
//! | file | written by | what a local attacker could try |
//! |---|---|---|
//! | `enrolled.pem` | the enrollment | replace it: the device CA refuses a chain not for its HSM key, and its root is what verifiers pin, not the device |
//! | `broker-ca.pem`, `broker-client.pem`, `deploy-N.pub` | the enrollment, checked against the organisation's signature before they are written | replace them: only root or the daemon's user can, who own the device |
//! | `issued.json` | the enrollment: the organisation's signed answer | change it: refused at the next start (its chain must lead to the configured roots, its signature be the organisation CA's); the files above are written from it again at every start |
//! | `enrollment.json` | the enrollment, last | remove it: the device enrolls again (recorded by the service) |

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Issued;
use super::transport::{Credentials, Enrollee};
use crate::hsm::Hsm;
use crate::state;
use crate::units::parse_duration;

/// The state dir's identity directory.
pub const DIR: &str = "identity";
/// The record of an enrollment: written last.
pub const RECORD: &str = "enrollment.json";
/// The organisation's chain for the device CA key.
pub const CHAIN: &str = "enrolled.pem";
/// The organisation's signed answer, verbatim: what the other files are
/// written from, and checked again at every start.
pub const ANSWER: &str = "issued.json";
/// The assigned broker's roots.
pub const BROKER_CA: &str = "broker-ca.pem";
/// The broker login certificate.
pub const LOGIN: &str = "broker-client.pem";

/// `[provisioning]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvisioning {
    broker: String,
    ca: PathBuf,
    org_roots: PathBuf,
    group: Option<String>,
    enrollment_key: Option<PathBuf>,
    retry_min: Option<String>,
    retry_max: Option<String>,
    timeout: Option<String>,
    renew_threshold: Option<String>,
}

/// `[provisioning]`, checked.
#[derive(Debug, Clone)]
pub struct Provisioning {
    /// The enrollment listener's host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Its TLS roots (file).
    pub ca: PathBuf,
    /// Their PEM, read with the config.
    pub ca_pem: Vec<u8>,
    /// The organisation's roots (file).
    pub org_roots_file: PathBuf,
    /// Their DER.
    pub org_roots: Vec<Vec<u8>>,
    /// Symmetric-key group enrollment: the group and the key file (read
    /// at each attempt); `None`: the TPM.
    pub symmetric: Option<(String, PathBuf)>,
    /// Backoff bounds between attempts.
    pub retry_min: Duration,
    /// See `retry_min`.
    pub retry_max: Duration,
    /// For each answer.
    pub timeout: Duration,
    /// How far into its lifetime (percent) the device CA certificate is
    /// renewed.
    pub renew_threshold: u8,
    /// `[cloud]` without what the enrollment assigns.
    pub cloud: crate::cloud::RawCloud,
    /// The config file's directory (`[cloud]`'s relative paths).
    pub base: PathBuf,
}

impl RawProvisioning {
    /// Checks each field (reading the roots); `cloud` is `[cloud]`, which
    /// must leave what the enrollment assigns unset. Paths are resolved
    /// with `resolve`; `base` is the config's directory.
    ///
    /// # Errors
    ///
    /// The field and what is wrong with it.
    pub fn validate(
        self,
        cloud: Option<crate::cloud::RawCloud>,
        resolve: &dyn Fn(&Path) -> PathBuf,
        base: &Path,
    ) -> Result<Provisioning, String> {
        let (host, port) = crate::cloud::parse_broker(&self.broker)
            .map_err(|e| format!("provisioning.broker: {e}"))?;
        let ca = resolve(&self.ca);
        let ca_pem =
            std::fs::read(&ca).map_err(|e| format!("provisioning.ca {}: {e}", ca.display()))?;
        let n = crate::cloud::tls::add_pem_roots(&mut rustls::RootCertStore::empty(), &ca_pem)
            .map_err(|e| format!("provisioning.ca {}: {e}", ca.display()))?;
        if n == 0 {
            return Err(format!(
                "provisioning.ca {}: no certificate in it",
                ca.display()
            ));
        }
        let org_roots_file = resolve(&self.org_roots);
        let org_roots = crate::attest::verify::pem_certificates(
            &std::fs::read(&org_roots_file)
                .map_err(|e| format!("provisioning.org_roots {}: {e}", org_roots_file.display()))?,
            &format!("provisioning.org_roots {}", org_roots_file.display()),
        )?;
        let symmetric = match (self.group, self.enrollment_key) {
            (None, None) => None,
            (Some(g), Some(k)) => {
                if !crate::cloud::topics::valid_group(&g) {
                    return Err(format!("provisioning.group: {g:?} is not a group name"));
                }
                Some((g, resolve(&k)))
            }
            _ => {
                return Err(
                    "provisioning: group and enrollment_key go together (symmetric-key group enrollment); without both the device enrolls with its TPM".into(),
                );
            }
        };
        let dur = |field: &str, v: Option<&str>, default: Duration, max: Duration| {
            let d = v
                .map(parse_duration)
                .transpose()
                .map_err(|e| format!("provisioning.{field}: {e}"))?
                .unwrap_or(default);
            if d < Duration::from_millis(10) || d > max {
                return Err(format!(
                    "provisioning.{field}: {d:?} is outside 10ms..={max:?}"
                ));
            }
            Ok(d)
        };
        let retry_min = dur(
            "retry_min",
            self.retry_min.as_deref(),
            Duration::from_secs(5),
            Duration::from_secs(3600),
        )?;
        let retry_max = dur(
            "retry_max",
            self.retry_max.as_deref(),
            Duration::from_secs(600),
            Duration::from_secs(86_400),
        )?;
        if retry_max < retry_min {
            return Err("provisioning.retry_max is less than provisioning.retry_min".into());
        }
        let timeout = dur(
            "timeout",
            self.timeout.as_deref(),
            Duration::from_secs(30),
            Duration::from_secs(600),
        )?;
        let renew_threshold = match self.renew_threshold.as_deref() {
            None => 67,
            Some(t) => t
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<u8>().ok())
                .filter(|n| (1..=99).contains(n))
                .ok_or_else(|| {
                    format!("provisioning.renew_threshold: {t:?} is not a percentage 1%-99%")
                })?,
        };
        let cloud = cloud.unwrap_or_default();
        cloud.check_unassigned()?;
        Ok(Provisioning {
            host,
            port,
            ca,
            ca_pem,
            org_roots_file,
            org_roots,
            symmetric,
            retry_min,
            retry_max,
            timeout,
            renew_threshold,
            cloud,
            base: base.to_owned(),
        })
    }
}

/// The record of an enrollment (`<state>/identity/enrollment.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrolled {
    /// The device id assigned.
    pub device_id: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// The assigned broker, if the organisation assigned one.
    #[serde(default)]
    pub broker: Option<String>,
    /// How many deployment keys were assigned (`deploy-<i>.pub`).
    #[serde(default)]
    pub deployment_keys: usize,
    /// When (Unix seconds).
    pub time: u64,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR)
}

/// The chain's path.
pub fn chain_path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join(CHAIN)
}

fn deployment_key_path(state_dir: &Path, i: usize) -> PathBuf {
    dir(state_dir).join(format!("deploy-{i}.pub"))
}

impl Enrolled {
    /// The enrollment recorded in `state_dir`, if any.
    ///
    /// # Errors
    ///
    /// The record is unreadable or malformed (named).
    pub fn load(state_dir: &Path) -> Result<Option<Self>, String> {
        let path = dir(state_dir).join(RECORD);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes a checked answer into `state_dir` (each file atomically,
    /// the record last).
    ///
    /// # Errors
    ///
    /// A file cannot be written (named).
    pub fn store(state_dir: &Path, issued: &Issued) -> Result<Self, String> {
        let d = dir(state_dir);
        state::ensure_private_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        let answer = serde_json::to_vec(issued).map_err(|e| e.to_string())?;
        state::write_atomic(&d.join(ANSWER), &answer)
            .map_err(|e| format!("{}: {e}", d.join(ANSWER).display()))?;
        write_files(state_dir, issued)?;
        let record = Self {
            device_id: issued.device_id.clone(),
            groups: issued.groups.clone(),
            broker: issued.fleet.as_ref().map(|f| f.broker.clone()),
            deployment_keys: issued.fleet.as_ref().map_or(0, |f| f.deployment_keys.len()),
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
        state::write_atomic(&d.join(RECORD), &json)
            .map_err(|e| format!("{}: {e}", d.join(RECORD).display()))?;
        Ok(record)
    }

    /// The enrollment recorded in `state_dir`, its signed answer checked
    /// again (the chain to `p`'s organisation roots, the organisation's
    /// signature, the assignment) and the files written from it anew, so
    /// that what the daemon's own user could change in the state dir is
    /// not what the device trusts. `None` when not enrolled, or when the
    /// certificate has expired (the device enrolls again).
    ///
    /// # Errors
    ///
    /// The record or the answer is unreadable, or the answer fails its
    /// checks (named).
    pub fn load_verified(
        state_dir: &Path,
        p: &Provisioning,
        device_id: &str,
        trust_domain: &str,
    ) -> Result<Option<Self>, String> {
        let Some(record) = Self::load(state_dir)? else {
            return Ok(None);
        };
        let path = dir(state_dir).join(ANSWER);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let issued: Issued = super::parse(&bytes, "stored answer")
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let der = crate::attest::verify::pem_certificates(issued.chain.as_bytes(), "the chain")?;
        let expired = x509_parser::parse_x509_certificate(&der[0])
            .is_ok_and(|(_, c)| !c.validity().is_valid_at(x509_parser::time::ASN1Time::now()));
        if expired {
            tracing::warn!(
                "the enrolled device CA certificate has expired: enrolling again with the factory identity"
            );
            return Ok(None);
        }
        super::check_answer(&issued, device_id, trust_domain, &p.org_roots, None)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        write_files(state_dir, &issued)?;
        Ok(Some(Self {
            device_id: issued.device_id.clone(),
            groups: issued.groups.clone(),
            broker: issued.fleet.as_ref().map(|f| f.broker.clone()),
            deployment_keys: issued.fleet.as_ref().map_or(0, |f| f.deployment_keys.len()),
            time: record.time,
        }))
    }

    /// The `[cloud]` this enrollment makes of `p`'s table, if a broker was
    /// assigned.
    ///
    /// # Errors
    ///
    /// What `[cloud]`'s checks refuse, named.
    pub fn cloud_config(
        &self,
        p: &Provisioning,
        state_dir: &Path,
    ) -> Result<Option<crate::cloud::CloudConfig>, String> {
        let Some(broker) = &self.broker else {
            return Ok(None);
        };
        let d = dir(state_dir);
        let raw = p.cloud.clone().assigned(crate::cloud::Assigned {
            broker: broker.clone(),
            ca: d.join(BROKER_CA),
            certificate: d.join(LOGIN),
            deployment_keys: (0..self.deployment_keys)
                .map(|i| deployment_key_path(state_dir, i))
                .collect(),
            groups: self.groups.clone(),
        });
        let base = p.base.clone();
        raw.validate(&move |q: &Path| {
            if q.is_absolute() {
                q.to_owned()
            } else {
                base.join(q)
            }
        })
        .map(Some)
        .map_err(|e| format!("the enrolled fleet assignment: {e}"))
    }
}

/// How long until the first certificate of `chain` (PEM) is due for
/// renewal: `threshold` percent into its validity (zero when past that).
///
/// # Errors
///
/// No certificate, or one that cannot be read.
pub fn renewal_due(chain: &str, threshold: u8) -> Result<Duration, String> {
    let der = crate::attest::verify::pem_certificates(chain.as_bytes(), "the enrolled chain")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der[0])
        .map_err(|e| format!("the enrolled certificate: {e}"))?;
    let from = cert.validity().not_before.timestamp();
    let to = cert.validity().not_after.timestamp();
    let due = from + (to - from) * i64::from(threshold) / 100;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
    .unwrap_or(i64::MAX);
    Ok(Duration::from_secs(
        u64::try_from(due.saturating_sub(now)).unwrap_or(0),
    ))
}

/// Whether `state_dir` holds an enrollment whose device CA certificate is
/// valid now (then the factory key is not needed again).
pub fn enrolled_and_current(state_dir: &Path) -> bool {
    Enrolled::load(state_dir).is_ok_and(|e| e.is_some())
        && std::fs::read(chain_path(state_dir)).is_ok_and(|pem| {
            crate::attest::verify::pem_certificates(&pem, "the chain").is_ok_and(|der| {
                x509_parser::parse_x509_certificate(&der[0]).is_ok_and(|(_, c)| {
                    c.validity().is_valid_at(x509_parser::time::ASN1Time::now())
                })
            })
        })
}

/// Writes the chain and the assignment's files of `issued` into
/// `state_dir` (each atomically).
fn write_files(state_dir: &Path, issued: &Issued) -> Result<(), String> {
    let d = dir(state_dir);
    let write = |path: PathBuf, bytes: &[u8]| {
        state::write_atomic(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(chain_path(state_dir), issued.chain.as_bytes())?;
    if let Some(f) = &issued.fleet {
        write(d.join(BROKER_CA), f.broker_ca.as_bytes())?;
        write(d.join(LOGIN), f.certificate.as_bytes())?;
        for (i, k) in f.deployment_keys.iter().enumerate() {
            write(deployment_key_path(state_dir, i), &k.0)?;
        }
    }
    Ok(())
}

/// The measurement event of an enrollment: the id, the groups, the
/// digests of the device CA certificate and of the chain.
///
/// # Errors
///
/// The chain holds no certificate.
pub fn event(issued: &Issued) -> Result<serde_json::Value, String> {
    let der =
        crate::attest::verify::pem_certificates(issued.chain.as_bytes(), "the chain")?.remove(0);
    Ok(serde_json::json!({
        "kind": "enrolled",
        "device_id": issued.device_id,
        "groups": issued.groups,
        "ca_certificate": crate::measure::Digest::of(&der).to_string(),
        "chain": crate::measure::Digest::of(issued.chain.as_bytes()).to_string(),
        "broker": issued.fleet.as_ref().map(|f| f.broker.clone()),
    }))
}

/// How the device proves itself, per `p` (the key file read now).
///
/// # Errors
///
/// The key file is unreadable or not 32 bytes.
pub fn credentials(symmetric: Option<&(String, PathBuf)>) -> Result<Credentials, String> {
    let Some((group, path)) = symmetric else {
        return Ok(Credentials::Tpm);
    };
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("{}: an enrollment key is 32 bytes", path.display()))?;
    Ok(Credentials::Symmetric {
        group: group.clone(),
        key: zeroize::Zeroizing::new(key),
    })
}

/// Enrolls until it succeeds or `stop` turns true (then `None`): each
/// attempt through [`super::transport::provision`], a failure logged and
/// retried after a doubling, jittered delay. A refusal is retried too:
/// the organisation may list the device later.
pub async fn enroll_until_done(
    p: &Provisioning,
    hsm: Arc<dyn Hsm>,
    device_id: &str,
    trust_domain: &str,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Option<Issued> {
    let mut delay = p.retry_min;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = async {
            let credentials = credentials(p.symmetric.as_ref())?;
            let tls = super::transport::tls(&p.ca_pem, None)?;
            super::transport::provision(
                hsm.clone(),
                credentials,
                Enrollee {
                    device_id,
                    trust_domain,
                    org_roots: &p.org_roots,
                },
                (&p.host, p.port, tls),
                p.timeout,
                &|step| tracing::debug!(step, "enrollment"),
            )
            .await
        };
        let result = tokio::select! {
            r = result => r,
            _ = stop.wait_for(|s| *s) => return None,
        };
        match result {
            Ok(issued) => return Some(issued),
            Err(e) => {
                tracing::warn!(attempt, error = %e, retry_in = ?delay, "enrollment failed; the last deployment runs meanwhile");
            }
        }
        let jitter = delay.mul_f64(rand_fraction() * 0.2);
        tokio::select! {
            () = tokio::time::sleep(delay + jitter) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        delay = (delay * 2).min(p.retry_max);
    }
}

/// A number in [0, 1) from the OS's randomness (0 if it fails).
fn rand_fraction() -> f64 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        return 0.0;
    }
    f64::from(u32::from_be_bytes(b)) / f64::from(u32::MAX)
}
