//! The cloud interface: one MQTT 5 connection over mutual TLS to the
//! fleet's broker, authenticated by the device's HSM-held identity, through
//! which the device takes signed, versioned desired deployments and reports
//! what it runs.
//!
//! ```toml
//! [cloud]
//! broker = "mqtts://broker.example:8883"  # TLS only (default port 8883)
//! ca = "broker-ca.pem"                # the broker's CA, pinned (not the
//!                                     # organisation's other roots)
//! certificate = "broker-client.pem"   # the organisation's certificate for
//!                                     # the HSM's broker key (identity csr --broker)
//! deployment_keys = ["deploy.pub"]    # Ed25519 keys deployments are signed by
//! groups = ["line-a"]                 # ew/v1/g/<group>/desired is read too
//! keep_alive = "30s"
//! reconnect_min = "1s"                # backoff after a lost connection:
//! reconnect_max = "5m"                # doubling, with jitter, between these
//! max_version_step = 1000             # how far a deployment's version may jump
//!                                     # past the applied one (default 1000)
//! report_interval = "10s"             # how often module states are compared
//! fetch_timeout = "5m"                # per registry or https request
//! registry_ca = "registry-ca.pem"     # optional: roots beside the web PKI's
//! local_sources = ["/opt/components"] # directories a deployment's local
//!                                     # `source` path may be in (default none)
//!
//! [[cloud.registry]]                  # credentials for one registry (basic,
//! host = "registry.example"           # or for its token service)
//! username = "edge"
//! password_file = "/etc/edgeward/registry.pass"
//! token_hosts = ["auth.example"]      # another host its token service may be
//!                                     # on (default: the registry's own only)
//! ```
//!
//! A deployment's module names its component by digest and may say where
//! to fetch it: `source = "oci://registry/repo:tag"` (or `@sha256:…`),
//! `https://…`, or a local path beneath one of `local_sources` (the daemon
//! reads no other file for a deployment; Landlock holds it to that). Plain
//! HTTP is used for loopback registries only.
//!
//! Topics, one tree per device (see `topics`):
//!
//! | topic | who writes | who reads | what |
//! |---|---|---|---|
//! | `ew/v1/d/<id>/in/desired` | operators | the device | retained signed deployment |
//! | `ew/v1/g/<group>/desired` | operators | the group's devices | the same, for a group |
//! | `ew/v1/d/<id>/out/reported` | the device | operators | retained: version applied, modules |
//! | `ew/v1/d/<id>/out/events` | the device | operators | applied, refused |
//! | `ew/v1/d/<id>/out/state` | the device (and its will) | operators | retained online / offline |
//!
//! Who may reach it and what a hostile party could try:
//! - the broker (or anyone who can publish to the device's `in/` topics):
//!   unsigned, wrongly signed, tampered, replayed or older deployments, and
//!   garbage; each is refused and reported, never applied; a deployment
//!   naming an operator's or the agent's module is refused; a component that
//!   does not hash to its pinned digest is refused before it is compiled.
//! - another device: the broker's ACL (`pattern read ew/v1/d/%u/in/#`,
//!   `pattern write ew/v1/d/%u/out/#`, keyed on the certificate's CN) keeps
//!   it out of this device's topics.
//! - a network attacker: TLS to a broker certified by `ca`; the device's key
//!   never leaves the HSM.

pub mod desired;
pub mod oci;
pub mod outbox;
pub mod tls;
pub mod topics;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};

use crate::api::{ApiState, DeployBody};
use crate::attest::publisher::PublicKey;
use crate::identity::IdentityService;
use crate::registry::Origin;
use crate::units::parse_duration;

use desired::{Applied, Source, Verdict};
use topics::Topics;

/// The registry key of the last deployment applied from the broker.
pub const APPLIED_KEY: &str = "cloud.applied";

/// `[cloud]`, checked.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    /// Broker host (a name or an IP address).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Roots for the broker's certificate (PEM file).
    pub ca: PathBuf,
    /// Its certificates, read once when the config is.
    pub broker_roots: rustls::RootCertStore,
    /// Keys whose signed deployments the device applies.
    pub deployment_keys: Vec<PublicKey>,
    /// The key files, as configured (for the effective config).
    pub deployment_key_files: Vec<PathBuf>,
    /// Groups whose desired deployments it reads.
    pub groups: Vec<String>,
    /// How far a deployment's version may jump past the applied one.
    pub max_version_step: u64,
    /// The device's broker certificate (for the HSM's `cloud-client` key),
    /// read when the cloud interface starts and whenever it changes.
    pub certificate: PathBuf,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Reconnect backoff bounds.
    pub reconnect_min: Duration,
    /// See `reconnect_min`.
    pub reconnect_max: Duration,
    /// How often module states are compared with what was reported.
    pub report_interval: Duration,
    /// Per registry or https request.
    pub fetch_timeout: Duration,
    /// Extra roots (PEM) for registries and https sources.
    pub registry_roots: Option<Vec<u8>>,
    /// Credentials by registry host.
    pub credentials: std::collections::BTreeMap<String, oci::Credentials>,
    /// Directories a deployment's local `source` may be beneath.
    pub local_sources: Vec<PathBuf>,
}

/// `[[cloud.registry]]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    host: String,
    username: String,
    password_file: PathBuf,
    #[serde(default)]
    token_hosts: Vec<String>,
}

/// `[cloud]` as written.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCloud {
    broker: Option<String>,
    ca: Option<PathBuf>,
    certificate: Option<PathBuf>,
    #[serde(default)]
    deployment_keys: Vec<PathBuf>,
    #[serde(default)]
    groups: Vec<String>,
    client_cert_ttl: Option<String>,
    keep_alive: Option<String>,
    reconnect_min: Option<String>,
    reconnect_max: Option<String>,
    report_interval: Option<String>,
    max_version_step: Option<u64>,
    fetch_timeout: Option<String>,
    registry_ca: Option<PathBuf>,
    #[serde(default, rename = "registry")]
    registries: Vec<RawRegistry>,
    #[serde(default)]
    local_sources: Vec<PathBuf>,
}

/// What an enrollment assigns a device (see `crate::enroll::device`).
#[derive(Debug, Clone)]
pub struct Assigned {
    /// `mqtts://HOST[:PORT]`.
    pub broker: String,
    /// The broker's roots.
    pub ca: PathBuf,
    /// The login certificate.
    pub certificate: PathBuf,
    /// The deployment keys' files.
    pub deployment_keys: Vec<PathBuf>,
    /// The groups.
    pub groups: Vec<String>,
}

impl RawCloud {
    /// With `[provisioning]`, the enrollment assigns these: the table
    /// holds the rest (timings, registries, local sources) only.
    ///
    /// # Errors
    ///
    /// The first assigned field the table sets, named.
    pub fn check_unassigned(&self) -> Result<(), String> {
        let set = [
            ("broker", self.broker.is_some()),
            ("ca", self.ca.is_some()),
            ("certificate", self.certificate.is_some()),
            ("deployment_keys", !self.deployment_keys.is_empty()),
            ("groups", !self.groups.is_empty()),
        ];
        match set.iter().find(|(_, s)| *s) {
            Some((field, _)) => Err(format!(
                "cloud.{field}: with [provisioning], the organisation's enrollment assigns it; remove it"
            )),
            None => Ok(()),
        }
    }

    /// This table with what an enrollment assigned.
    #[must_use]
    pub fn assigned(mut self, a: Assigned) -> Self {
        self.broker = Some(a.broker);
        self.ca = Some(a.ca);
        self.certificate = Some(a.certificate);
        self.deployment_keys = a.deployment_keys;
        self.groups = a.groups;
        self
    }

    /// Checks each field; paths are resolved with `resolve`.
    ///
    /// # Errors
    ///
    /// The field and what is wrong with it.
    pub fn validate(self, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<CloudConfig, String> {
        let broker = self.broker.as_deref().ok_or(
            "cloud.broker: name the fleet's broker (mqtts://HOST[:PORT]), or enroll with [provisioning]",
        )?;
        let (host, port) = parse_broker(broker).map_err(|e| format!("cloud.broker: {e}"))?;
        let dur =
            |field: &str, v: &Option<String>, default: Duration, min: Duration, max: Duration| {
                let d = match v {
                    None => default,
                    Some(s) => parse_duration(s).map_err(|e| format!("cloud.{field}: {e}"))?,
                };
                if d < min || d > max {
                    return Err(format!("cloud.{field}: {d:?} is outside {min:?}..={max:?}"));
                }
                Ok(d)
            };
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        if self.client_cert_ttl.is_some() {
            return Err("cloud.client_cert_ttl is gone: the device no longer certifies its own broker login; the organisation's device CA certifies the broker key (edgeward identity csr --broker) and cloud.certificate names that certificate (docs/fleet.md)".into());
        }
        let certificate = resolve(self.certificate.as_deref().ok_or(
            "cloud.certificate: name the file with the organisation's certificate for this device's broker key (edgeward identity csr --broker writes its CSR; docs/fleet.md)",
        )?);
        let keep_alive = dur("keep_alive", &self.keep_alive, s(30), s(5), s(3600))?;
        let reconnect_min = dur("reconnect_min", &self.reconnect_min, s(1), ms(10), s(3600))?;
        let reconnect_max = dur(
            "reconnect_max",
            &self.reconnect_max,
            s(300),
            ms(10),
            s(86_400),
        )?;
        if reconnect_max < reconnect_min {
            return Err("cloud.reconnect_max is less than cloud.reconnect_min".into());
        }
        let report_interval = dur(
            "report_interval",
            &self.report_interval,
            s(10),
            ms(100),
            s(3600),
        )?;
        let fetch_timeout = dur("fetch_timeout", &self.fetch_timeout, s(300), s(1), s(3600))?;
        let registry_roots = match &self.registry_ca {
            None => None,
            Some(p) => {
                let p = resolve(p);
                let pem = std::fs::read(&p)
                    .map_err(|e| format!("cloud.registry_ca {}: {e}", p.display()))?;
                let n = tls::add_pem_roots(&mut rustls::RootCertStore::empty(), &pem)
                    .map_err(|e| format!("cloud.registry_ca {}: {e}", p.display()))?;
                if n == 0 {
                    return Err(format!(
                        "cloud.registry_ca {}: no certificate in it",
                        p.display()
                    ));
                }
                Some(pem)
            }
        };
        let mut credentials = std::collections::BTreeMap::new();
        for r in self.registries {
            let mut creds = oci::Credentials::from_file(&r.username, &resolve(&r.password_file))
                .map_err(|e| format!("cloud.registry {}: password_file {e}", r.host))?;
            for h in &r.token_hosts {
                crate::addrclass::check_dns_name(h)
                    .or_else(|e| h.parse::<std::net::IpAddr>().map(|_| ()).map_err(|_| e))
                    .map_err(|e| format!("cloud.registry {}: token_hosts {h:?}: {e}", r.host))?;
            }
            creds.token_hosts = r.token_hosts;
            if r.host.is_empty() || r.host.contains('/') {
                return Err(format!("cloud.registry: host {:?}: HOST[:PORT]", r.host));
            }
            if credentials.insert(r.host.clone(), creds).is_some() {
                return Err(format!("cloud.registry: {} appears twice", r.host));
            }
        }
        if self.deployment_keys.is_empty() {
            return Err(
                "cloud.deployment_keys: name at least one key file (deployments from the broker are applied only when one of them signed it)".into(),
            );
        }
        let files: Vec<PathBuf> = self.deployment_keys.iter().map(|p| resolve(p)).collect();
        let deployment_keys = crate::attest::publisher::load_publishers(&files)
            .map_err(|e| format!("cloud.deployment_keys: {e}"))?;
        for g in &self.groups {
            if !topics::valid_group(g) {
                return Err(format!(
                    "cloud.groups: {g:?}: use 1-63 of a-z 0-9 . _ - starting with a letter or digit"
                ));
            }
        }
        let mut local_sources = Vec::with_capacity(self.local_sources.len());
        for d in &self.local_sources {
            let d = resolve(d);
            if d.components().any(|c| c == std::path::Component::ParentDir) || d == Path::new("/") {
                return Err(format!(
                    "cloud.local_sources: {}: name a directory of components, without `..` and not /",
                    d.display()
                ));
            }
            local_sources.push(d);
        }
        let ca = resolve(self.ca.as_deref().ok_or(
            "cloud.ca: name the file with the broker's CA certificate, or enroll with [provisioning]",
        )?);
        let pem = std::fs::read(&ca).map_err(|e| format!("cloud.ca {}: {e}", ca.display()))?;
        let mut broker_roots = rustls::RootCertStore::empty();
        let n = tls::add_pem_roots(&mut broker_roots, &pem)
            .map_err(|e| format!("cloud.ca {}: {e}", ca.display()))?;
        if n == 0 {
            return Err(format!("cloud.ca {}: no certificate in it", ca.display()));
        }
        Ok(CloudConfig {
            host,
            port,
            ca,
            broker_roots,
            deployment_keys,
            deployment_key_files: files,
            groups: self.groups,
            max_version_step: match self.max_version_step {
                None => 1000,
                Some(0) => {
                    return Err("cloud.max_version_step: at least 1".into());
                }
                Some(n) => n,
            },
            certificate,
            keep_alive,
            reconnect_min,
            reconnect_max,
            report_interval,
            fetch_timeout,
            registry_roots,
            credentials,
            local_sources,
        })
    }
}

/// `mqtts://host[:port]`, host a name, an IPv4 address or `[IPv6]`.
///
/// # Errors
///
/// Another scheme, a bad host or port; named.
pub fn parse_broker(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("mqtts://").ok_or_else(|| {
        format!("{url:?}: use mqtts://HOST[:PORT] (the broker is reached over TLS only)")
    })?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = split_host_port(rest, 8883).map_err(|e| format!("{url:?}: {e}"))?;
    if host.is_empty()
        || host
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':')))
    {
        return Err(format!("{url:?}: not a host name or address"));
    }
    if port == 0 {
        return Err(format!("{url:?}: port 0 is not 1-65535"));
    }
    Ok((host, port))
}

/// Splits `host[:port]` (an IPv6 address in brackets), `default` when no
/// port is given.
///
/// # Errors
///
/// No closing bracket, or a port that is not a number up to 65535.
pub(crate) fn split_host_port(authority: &str, default: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or("an IPv6 address needs its closing ]")?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => default,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("port {p:?} is not 1-65535"))?,
    };
    Ok((host.to_owned(), port))
}

fn client_config(
    config: &CloudConfig,
    identity: Arc<tls::ClientIdentity>,
) -> Result<rustls::ClientConfig, String> {
    Ok(tls::client_builder(config.broker_roots.clone())?.with_client_cert_resolver(identity))
}

/// Runs the cloud interface until `stop` turns true. Never fails: what
/// goes wrong is logged and retried with backoff, and the daemon runs its
/// last applied deployment meanwhile.
pub async fn run(
    config: CloudConfig,
    api: Arc<ApiState>,
    identity: Arc<IdentityService>,
    mut stop: watch::Receiver<bool>,
) {
    let topics = Topics::new(&identity.config().device_id, &config.groups);
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    // The broker identity: the HSM key and the organisation's certificate
    // for it.
    let client_id = loop {
        let hsm = identity.hsm();
        let path = config.certificate.clone();
        let r = tokio::task::spawn_blocking(move || {
            let c = tls::ClientIdentity::new(hsm, path)?;
            c.refresh()?;
            Ok::<_, String>(c)
        })
        .await;
        match r {
            Ok(Ok(c)) => break c,
            Ok(Err(e)) => tracing::error!(error = %e, "cloud: no broker identity; retrying"),
            Err(e) => tracing::error!(error = %e, "cloud: identity task failed; retrying"),
        }
        if sleep_or_stop(backoff.next(), &mut stop).await {
            return;
        }
    };
    tracing::info!(not_after = client_id.not_after(), path = %config.certificate.display(), "cloud: broker certificate loaded");
    let tls = match client_config(&config, client_id.clone()) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            tracing::error!(error = %e, "cloud: cannot set up TLS to the broker; the cloud interface is off");
            return;
        }
    };
    let mut options = MqttOptions::new(&identity.config().device_id, &config.host, config.port);
    options
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
        .set_keep_alive(config.keep_alive)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(7 * 86_400))
        .set_max_packet_size(Some(
            u32::try_from(desired::MAX_DESIRED * 2).unwrap_or(u32::MAX),
        ))
        // rumqttc sizes its in-flight table by this up front: left at
        // u16::MAX it holds 13 MiB per daemon. A device has few reports
        // in flight; the broker may lower it further.
        .set_outgoing_inflight_upper_limit(32)
        .set_last_will(LastWill::new(
            topics.state(),
            state_payload(false, &api, 0),
            QoS::AtLeastOnce,
            true,
            None,
        ));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let (work_tx, work_rx) = mpsc::channel::<Work>(256);
    let online = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counters = &crate::daemon::metrics::DAEMON;
    counters
        .cloud_configured
        .store(1, std::sync::atomic::Ordering::Relaxed);
    let worker = tokio::spawn(worker(
        config.clone(),
        api.clone(),
        client.clone(),
        topics.clone(),
        work_rx,
        online.clone(),
        stop.clone(),
    ));
    let mut review = tokio::time::interval(Duration::from_secs(3600));
    review.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down_since: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            _ = review.tick() => {
                // A renewed file is picked up here too (not only at the
                // next handshake), and an expiry is announced ahead.
                let cid = client_id.clone();
                let r = tokio::task::spawn_blocking(move || cid.refresh()).await;
                match r {
                    Ok(Ok(true)) => tracing::info!(not_after = client_id.not_after(), "cloud: broker certificate reloaded (used from the next connection)"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "cloud: the broker certificate file was not reloaded"),
                    Err(e) => tracing::error!(error = %e, "cloud: certificate review failed"),
                }
                let left = client_id.not_after().saturating_sub(crate::identity::unix_now());
                if left < 14 * 86_400 {
                    tracing::warn!(days_left = left / 86_400, path = %config.certificate.display(), "cloud: the broker certificate expires soon; have the organisation renew it (edgeward identity csr --broker)");
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    online.store(true, std::sync::atomic::Ordering::SeqCst);
                    counters.cloud_connected.store(1, std::sync::atomic::Ordering::Relaxed);
                    match down_since.take() {
                        Some(t) => tracing::info!(offline_ms = t.elapsed().as_millis() as u64, session_present = ack.session_present, "cloud: connected to the broker again"),
                        None => tracing::info!(host = %config.host, port = config.port, "cloud: connected to the broker"),
                    }
                    queue(&work_tx, Work::Connected);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(w) = incoming(&topics, p) {
                        queue(&work_tx, w);
                    }
                }
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    tracing::warn!(reason = ?d.reason_code, "cloud: the broker disconnected the device");
                }
                Ok(_) => {}
                Err(e) => {
                    let wait = backoff.next();
                    if down_since.is_none() {
                        down_since = Some(std::time::Instant::now());
                        online.store(false, std::sync::atomic::Ordering::SeqCst);
                        counters.cloud_connected.store(0, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, "cloud: broker connection lost; reports wait until it is back");
                    } else {
                        tracing::debug!(error = %e, retry_ms = wait.as_millis() as u64, "cloud: broker still unreachable");
                    }
                    if sleep_or_stop(wait, &mut stop).await {
                        break;
                    }
                }
            }
        }
    }
    // A clean goodbye: offline, retained, then disconnect.
    let _ = client
        .publish(
            topics.state(),
            QoS::AtLeastOnce,
            true,
            state_payload(false, &api, 0),
        )
        .await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    worker.abort();
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = stopped(stop) => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// Doubling backoff between `min` and `max`, each wait drawn from the
/// upper half of the current step (jitter that never waits less than half).
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }

    fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next wait: uniformly in `[current/2, current]`, then doubled.
    fn next(&mut self) -> Duration {
        let cur = self.current;
        self.current = (cur * 2).min(self.max);
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        let frac = (u64::from_le_bytes(b) % 1000) as u32;
        let half = cur / 2;
        (half + (cur - half) * frac / 1000).max(self.min.min(cur))
    }
}

/// Hands `w` to the worker without waiting: this loop also keeps the
/// connection alive (pings), so it must not block on a worker busy with a
/// long deployment. When the queue is full (a flood while it is busy), a
/// challenge or receipt is dropped (the verifier asks again; the event is
/// sent again), and a deployment is dropped with an error: the broker
/// delivers it again on the next connection (it is retained).
fn queue(work: &mpsc::Sender<Work>, w: Work) {
    if let Err(mpsc::error::TrySendError::Full(w)) = work.try_send(w) {
        match w {
            // Subscribing and the outbox depend on it: it waits its turn.
            Work::Connected => {
                let work = work.clone();
                tokio::spawn(async move { work.send(Work::Connected).await });
            }
            Work::Desired { source, .. } => {
                tracing::error!(%source, "cloud: too many messages waiting; a desired deployment was dropped (it is taken again at the next connection)")
            }
            Work::Challenge(_) => tracing::warn!(
                "cloud: too many messages waiting; an attestation challenge was dropped"
            ),
            Work::Delivered(_) => {
                tracing::debug!("cloud: too many messages waiting; a delivery receipt was dropped")
            }
        }
    }
}

/// What the worker does, in order.
#[derive(Debug)]
enum Work {
    Connected,
    /// Our own event read back: the broker has every event up to it.
    Delivered(u64),
    Challenge(bytes::Bytes),
    Desired {
        source: Source,
        payload: bytes::Bytes,
        retained: bool,
    },
}

fn incoming(topics: &Topics, p: Publish) -> Option<Work> {
    let topic = std::str::from_utf8(&p.topic).ok()?;
    if topic == topics.challenge() {
        return Some(Work::Challenge(p.payload));
    }
    if topic == topics.events() {
        let v: serde_json::Value = serde_json::from_slice(&p.payload).ok()?;
        return v["seq"].as_u64().map(Work::Delivered);
    }
    let source = topics.source_of(topic)?;
    Some(Work::Desired {
        source,
        payload: p.payload,
        retained: p.retain,
    })
}

/// `out/state`'s payload.
/// `connections` counts this process's connections (so a reconnection
/// shows, though the retained state was "online" already).
fn state_payload(online: bool, api: &ApiState, connections: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "state": if online { "online" } else { "offline" },
        "daemon": api.info.version,
        "instance": instance(),
        "connections": connections,
    }))
    .unwrap_or_default()
}

/// Applies desired deployments one at a time and keeps `out/reported`
/// current.
async fn worker(
    config: CloudConfig,
    api: Arc<ApiState>,
    client: AsyncClient,
    topics: Topics,
    mut work: mpsc::Receiver<Work>,
    online: Arc<std::sync::atomic::AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_reported: Option<serde_json::Value> = None;
    let mut last_refused: Option<serde_json::Value> = None;
    let mut attest_gate = tokio::time::Instant::now();
    let mut connections = 0u64;
    let outbox = match outbox::Outbox::open(api.registry.clone()) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "cloud: the outbox cannot be read; the cloud interface is off");
            return;
        }
    };
    let mut tick = tokio::time::interval(config.report_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return,
            w = work.recv() => match w {
                None => return,
                Some(Work::Connected) => {
                    connections += 1;
                    let subs = topics.subscriptions();
                    for t in subs {
                        if let Err(e) = client.subscribe(t.clone(), QoS::AtLeastOnce).await {
                            tracing::error!(topic = %t, error = %e, "cloud: cannot subscribe");
                        }
                    }
                    let _ = client
                        .publish(topics.state(), QoS::AtLeastOnce, true, state_payload(true, &api, connections))
                        .await;
                    // Retained, so a fresh report on each connection.
                    last_reported = None;
                    let pending = outbox.pending();
                    if !pending.is_empty() {
                        tracing::info!(events = pending.len(), "cloud: sending the events kept while offline");
                    }
                    for ev in &pending {
                        publish_event(&client, &topics, ev).await;
                    }
                }
                Some(Work::Delivered(seq)) => match outbox.delivered(seq) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(events = n, up_to = seq, "cloud: events delivered"),
                    Err(e) => tracing::error!(error = %e, "cloud: the outbox was not updated"),
                },
                Some(Work::Challenge(payload)) => {
                    let wait = attest_gate.saturating_duration_since(tokio::time::Instant::now());
                    let answer = if wait > Duration::ZERO {
                        challenge_error(&payload, "rate limited: one quote a second")
                    } else {
                        attest_gate = tokio::time::Instant::now() + Duration::from_secs(1);
                        answer_challenge(&api, &payload).await
                    };
                    // A challenge only arrives over a connection; if that
                    // is gone, the verifier asks again.
                    if online.load(std::sync::atomic::Ordering::SeqCst)
                        && let Err(e) = client
                            .publish(topics.evidence(), QoS::AtLeastOnce, false, answer)
                            .await
                    {
                        tracing::warn!(error = %e, "cloud: evidence not queued");
                    }
                }
                Some(Work::Desired { source, payload, retained }) => {
                    let link = Link {
                        config: &config,
                        api: &api,
                        client: &client,
                        topics: &topics,
                        outbox: &outbox,
                        connected: online.load(std::sync::atomic::Ordering::SeqCst),
                    };
                    handle_desired(&link, source, &payload, retained, &mut last_refused).await;
                }
            },
            _ = tick.tick() => {}
        }
        if !online.load(std::sync::atomic::Ordering::SeqCst) {
            // Retained and sent afresh on connecting: nothing to queue.
            continue;
        }
        match reported(&api, &config, last_refused.as_ref()) {
            Ok(r) if last_reported.as_ref() != Some(&r) => {
                let bytes = serde_json::to_vec(&r).unwrap_or_default();
                if client
                    .publish(topics.reported(), QoS::AtLeastOnce, true, bytes)
                    .await
                    .is_ok()
                {
                    last_reported = Some(r);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cloud: cannot read the module states to report"),
        }
    }
}

fn applied(api: &ApiState) -> Result<Option<Applied>, String> {
    api.registry
        .meta(APPLIED_KEY)
        .map_err(|e| e.to_string())?
        .map(|b| serde_json::from_slice(&b).map_err(|e| format!("{APPLIED_KEY}: {e}")))
        .transpose()
}

/// `out/reported`: what the device runs.
fn reported(
    api: &ApiState,
    config: &CloudConfig,
    last_refused: Option<&serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let views = crate::api::all_views(api).map_err(|e| e.message)?;
    let modules: Vec<serde_json::Value> = views
        .iter()
        .filter_map(|v| serde_json::to_value(v).ok())
        .map(|v| {
            serde_json::json!({
                "name": v["name"],
                "origin": v["origin"],
                "state": v["state"],
                "digest": v["digest"],
                "starts": v["starts"],
                "reason": v.get("reason"),
            })
        })
        .collect();
    let applied = applied(api)?;
    Ok(serde_json::json!({
        "device": api.info.device_id,
        "version": applied.as_ref().map(|a| a.version.to_string()),
        "manifest": applied.as_ref().map(|a| a.manifest.clone()),
        "source": applied.as_ref().map(|a| a.source.to_string()),
        "groups": config.groups,
        "refused": last_refused,
        "modules": modules,
        "runtime": {
            "platform": { "version": api.info.runtime_platform_version },
        },
        "daemon": {
            "version": api.info.version,
            "hsm": api.info.hsm_backend,
            "instance": instance(),
        },
    }))
}

/// A random id for this daemon process: a report from a restarted daemon
/// is told from the retained one of its previous run.
fn instance() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        crate::measure::hex(&b)
    })
}

/// Reports `ev` on `out/events`: kept in the outbox first, sent now if
/// the broker is there (else when it is back).
async fn event(link: &Link<'_>, ev: serde_json::Value) {
    let mut ev = ev;
    ev["at"] = crate::identity::unix_now().into();
    let ev = match link.outbox.push(ev) {
        Ok(ev) => ev,
        Err((ev, e)) => {
            tracing::error!(error = %e, "cloud: event not kept; sending it anyway");
            ev
        }
    };
    if link.connected {
        publish_event(link.client, link.topics, &ev).await;
    }
}

async fn publish_event(client: &AsyncClient, topics: &Topics, ev: &serde_json::Value) {
    let bytes = serde_json::to_vec(ev).unwrap_or_default();
    if let Err(e) = client
        .publish(topics.events(), QoS::AtLeastOnce, false, bytes)
        .await
    {
        tracing::warn!(error = %e, "cloud: event not queued (kept in the outbox)");
    }
}

/// A challenge on `in/attest/challenge`: `{"id", "nonce"}` (hex, 1-64
/// bytes) or `{"id", "credential"}` (base64url: `edgeward attest
/// challenge`'s credential, which binds the AK to the EK).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Challenge {
    id: String,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    credential: Option<String>,
    /// Incremental evidence: the log from this record on.
    #[serde(default)]
    from: Option<u64>,
}

/// The largest challenge read.
const MAX_CHALLENGE: usize = 8 << 10;

fn challenge_id(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()?
        .get("id")?
        .as_str()
        .filter(|id| valid_challenge_id(id))
        .map(str::to_owned)
}

fn valid_challenge_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn challenge_error(payload: &[u8], error: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "id": challenge_id(payload), "error": error }))
        .unwrap_or_default()
}

/// Evidence for a challenge (`out/attest/evidence`): the files of
/// `edgeward attest`, base64, or an error naming what was wrong.
async fn answer_challenge(api: &ApiState, payload: &[u8]) -> Vec<u8> {
    if payload.len() > MAX_CHALLENGE {
        return challenge_error(payload, "the challenge is larger than 8 KiB");
    }
    let c: Challenge = match serde_json::from_slice(payload) {
        Ok(c) => c,
        Err(e) => {
            return challenge_error(
                payload,
                &format!("not a challenge ({{\"id\", \"nonce\" or \"credential\"}}): {e}"),
            );
        }
    };
    if !valid_challenge_id(&c.id) {
        return challenge_error(payload, "id: 1-64 of A-Z a-z 0-9 - _ .");
    }
    let (nonce, credential) =
        match crate::api::attest_input(c.nonce.as_deref(), c.credential.as_deref()) {
            Ok(x) => x,
            Err(e) => return challenge_error(payload, &e),
        };
    match crate::api::evidence(api, nonce, credential, c.from.unwrap_or(0)).await {
        Ok(files) => {
            tracing::info!(id = %c.id, "cloud: attestation evidence sent");
            serde_json::to_vec(&serde_json::json!({ "id": c.id, "files": files }))
                .unwrap_or_default()
        }
        Err(crate::api::Evidence::NotMeasured) => challenge_error(
            payload,
            "this device measures nothing ([runtime] measure = false, or the pkcs11 backend)",
        ),
        Err(crate::api::Evidence::Failed(e)) => challenge_error(payload, &e),
    }
}

/// What handling a desired deployment needs.
struct Link<'a> {
    config: &'a CloudConfig,
    api: &'a ApiState,
    client: &'a AsyncClient,
    topics: &'a Topics,
    outbox: &'a outbox::Outbox,
    /// Whether the broker is there now.
    connected: bool,
}

/// Logs and reports a refused deployment.
async fn refuse(
    link: &Link<'_>,
    source: &Source,
    message: &str,
    version: Option<String>,
    reason: String,
    last_refused: &mut Option<serde_json::Value>,
) {
    tracing::warn!(%source, ?version, %reason, "cloud: desired deployment refused");
    let ev = serde_json::json!({
        "kind": "deployment-refused", "source": source.to_string(),
        "version": version, "reason": reason, "message": message,
    });
    *last_refused = Some(ev.clone());
    event(link, ev).await;
}

async fn handle_desired(
    link: &Link<'_>,
    source: Source,
    payload: &[u8],
    retained: bool,
    last_refused: &mut Option<serde_json::Value>,
) {
    let Link { config, api, .. } = *link;
    if payload.is_empty() {
        // A cleared retained message: nothing is desired from there.
        return;
    }
    let last = match applied(api) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cloud: cannot read the applied version; deployment not applied");
            return;
        }
    };
    // The message refused last, delivered again (QoS 1 redelivers on a
    // resumed session; a retained one comes with each subscription): it was
    // reported once, not at every delivery.
    let digest = crate::measure::Digest::of(payload).to_string();
    let again = last_refused
        .as_ref()
        .is_some_and(|r| r["message"] == digest.as_str());
    let cx = desired::Context {
        keys: &config.deployment_keys,
        audience: crate::attest::binding::Audience {
            device_id: link.topics.device(),
            groups: &config.groups,
        },
        source: &source,
        applied: last.as_ref(),
        max_step: config.max_version_step,
        now: crate::attest::binding::now(),
    };
    let accepted = match desired::check(payload, &cx) {
        Verdict::Current => return,
        // A retained deployment older than the one applied (the group's,
        // when the device's own is newer) is history, not an attack.
        Verdict::Older { version, .. } if retained => {
            tracing::debug!(%source, %version, "cloud: retained deployment older than the applied one");
            return;
        }
        Verdict::Older { .. } | Verdict::Refused { .. } if again => {
            tracing::debug!(%source, "cloud: a refused deployment delivered again");
            return;
        }
        Verdict::Older { version, reason } => {
            refuse(link, &source, &digest, Some(version), reason, last_refused).await;
            return;
        }
        Verdict::Refused { version, reason } => {
            refuse(link, &source, &digest, version, reason, last_refused).await;
            return;
        }
        Verdict::Apply(a) => a,
    };
    let version = accepted.version;
    if let Err(reason) =
        fetch_components(config, api, &accepted.sources, &accepted.deployment).await
    {
        refuse(
            link,
            &source,
            &digest,
            Some(version.to_string()),
            reason,
            last_refused,
        )
        .await;
        return;
    }
    let signed_by = accepted.deployment.signed_by.clone().unwrap_or_default();
    match crate::api::deploy_as(
        api,
        Origin::Cloud,
        DeployBody::Verified(accepted.deployment),
        false,
    )
    .await
    {
        Ok(plan) => {
            let record = Applied {
                version,
                content: accepted.content.clone(),
                manifest: accepted.manifest.to_string(),
                source: source.clone(),
                signed_by,
            };
            let bytes = serde_json::to_vec(&record).unwrap_or_default();
            if let Err(e) = api.registry.put_meta(APPLIED_KEY, &bytes) {
                tracing::error!(error = %e, "cloud: the applied version was not recorded");
            }
            *last_refused = None;
            tracing::info!(%source, version, add = ?plan.add, update = ?plan.update, remove = ?plan.remove, "cloud: deployment applied");
            event(
                link,
                serde_json::json!({
                    "kind": "deployment-applied", "source": source.to_string(),
                    "version": version.to_string(), "plan": plan,
                }),
            )
            .await;
        }
        Err(e) => {
            refuse(
                link,
                &source,
                &digest,
                Some(version.to_string()),
                e.message,
                last_refused,
            )
            .await
        }
    }
}

/// Brings every component the deployment pins into the component store,
/// each checked against its digest before it is stored: nothing that does
/// not hash to its pin is kept, let alone compiled.
async fn fetch_components(
    config: &CloudConfig,
    api: &ApiState,
    sources: &std::collections::BTreeMap<crate::measure::Digest, String>,
    deployment: &crate::api::Deployment,
) -> Result<(), String> {
    for m in &deployment.modules {
        let digest: crate::measure::Digest = m
            .digest
            .parse()
            .map_err(|e| format!("module {}: {e}", m.name))?;
        if api.components.contains(&digest) {
            continue;
        }
        let Some(source) = sources.get(&digest) else {
            return Err(format!(
                "module {}: component {digest} is not on the device and the deployment names no source for it",
                m.name
            ));
        };
        let bytes = fetch(config, source, &digest)
            .await
            .map_err(|e| format!("module {}: {source}: {e}", m.name))?;
        let got = crate::measure::Digest::of(&bytes);
        if got != digest {
            return Err(format!(
                "module {}: {source} gave a component that hashes to {got}, not the pinned {digest}; refused before compiling",
                m.name
            ));
        }
        // Measured just now: stored without hashing it again.
        let measured = crate::measure::Measured {
            path: PathBuf::from(source),
            bytes,
            digest,
        };
        api.components
            .admit(
                &measured.digest,
                measured.bytes.len() as u64,
                api.grants.components_quota,
            )
            .map_err(|e| format!("module {}: {e}", m.name))?;
        api.components
            .put(&measured)
            .map_err(|e| format!("module {}: cannot store the component: {e}", m.name))?;
    }
    Ok(())
}

/// `path` (a deployment's local source) as it resolves, if that is beneath
/// one of `dirs` (each as it resolves): a deployment names components
/// there and nowhere else, whatever links lead elsewhere.
fn local_source(dirs: &[PathBuf], path: &Path) -> Result<PathBuf, String> {
    let outside = || {
        format!(
            "{}: a local source must be beneath one of cloud.local_sources ({})",
            path.display(),
            if dirs.is_empty() {
                "none configured".to_owned()
            } else {
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )
    };
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(outside());
    }
    let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    dirs.iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .any(|d| real.starts_with(d))
        .then_some(real)
        .ok_or_else(outside)
}

/// The component at `source` that should hash to `pin`.
async fn fetch(
    config: &CloudConfig,
    source: &str,
    pin: &crate::measure::Digest,
) -> Result<Vec<u8>, String> {
    if source.starts_with("oci://") {
        let r: oci::Reference = source.parse()?;
        let mut c = oci::Client::new(
            config.registry_roots.as_deref(),
            config.credentials.get(&r.registry).cloned(),
        )?;
        c.timeout = config.fetch_timeout;
        return c.pull(&r, pin, crate::measure::MAX_COMPONENT_SIZE).await;
    }
    if source.starts_with("https://") || source.starts_with("http://") {
        let mut c = oci::Client::new(config.registry_roots.as_deref(), None)?;
        c.timeout = config.fetch_timeout;
        return c.get(source, crate::measure::MAX_COMPONENT_SIZE).await;
    }
    let path = source.strip_prefix("file://").unwrap_or(source);
    if !path.starts_with('/') {
        return Err("a source is oci://…, https://… or an absolute local path".into());
    }
    let path = local_source(&config.local_sources, Path::new(path))?;
    // As a configured module's file is read: a regular file, bounded.
    tokio::task::spawn_blocking(move || crate::measure::Measured::read(&path))
        .await
        .map_err(|e| e.to_string())?
        .map(|m| m.bytes)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_local_source_must_be_beneath_a_configured_directory() {
        let t = tempfile::tempdir().unwrap();
        let allowed = t.path().join("components");
        let other = t.path().join("elsewhere");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(allowed.join("a.wasm"), b"a").unwrap();
        std::fs::write(other.join("b.wasm"), b"b").unwrap();
        std::os::unix::fs::symlink(other.join("b.wasm"), allowed.join("link.wasm")).unwrap();
        let dirs = [allowed.clone()];
        assert!(local_source(&dirs, &allowed.join("a.wasm")).is_ok());
        for (path, why) in [
            (other.join("b.wasm"), "beneath one of cloud.local_sources"),
            (
                allowed.join("link.wasm"),
                "beneath one of cloud.local_sources",
            ),
            (
                allowed.join("../elsewhere/b.wasm"),
                "beneath one of cloud.local_sources",
            ),
            (allowed.join("missing.wasm"), "No such file"),
        ] {
            let e = local_source(&dirs, &path).unwrap_err();
            assert!(e.contains(why), "{}: {e}", path.display());
        }
        let e = local_source(&[], &allowed.join("a.wasm")).unwrap_err();
        assert!(e.contains("none configured"), "{e}");
    }

    #[test]
    fn broker_urls_are_checked() {
        assert_eq!(
            parse_broker("mqtts://b.example").unwrap(),
            ("b.example".into(), 8883)
        );
        assert_eq!(
            parse_broker("mqtts://127.0.0.1:18883").unwrap(),
            ("127.0.0.1".into(), 18883)
        );
        assert_eq!(parse_broker("mqtts://[::1]:1/").unwrap(), ("::1".into(), 1));
        for bad in [
            "mqtt://b:1883",
            "b:8883",
            "mqtts://",
            "mqtts://b:0",
            "mqtts://b:x",
            "mqtts://a b",
            "mqtts://[::1",
        ] {
            assert!(parse_broker(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_within_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut b = Backoff::new(min, max);
        let waits: Vec<Duration> = (0..8).map(|_| b.next()).collect();
        for w in &waits {
            assert!(*w >= Duration::from_millis(50) && *w <= max, "{w:?}");
        }
        assert!(waits[6] >= Duration::from_millis(500), "{waits:?}");
        b.reset();
        assert!(b.next() <= min);
    }
}
