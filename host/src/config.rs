//! The daemon's configuration file (TOML), parsed into raw types and then
//! validated once into the checked [`Config`] the rest of the daemon uses.
//!
//! ```toml
//! state_dir = "/var/lib/edgeward"     # optional; see `state::resolve`
//!
//! [runtime]
//! max_modules = 64                    # module instances that may run at once
//! pooling = true                      # optional: force (true) or forbid (false)
//! echo_output = true                  # echo module output on stdout (rate-limited)
//! integrity_interval = "5m"           # re-measure running modules (default 5m; "off")
//! measure = true                      # measure into the HSM register and event log
//! max_wasm_stack = "512KiB"           # wasm stack limit for every module
//! module_instances = 32               # per-module ceilings: the engine's pool
//! module_memories = 2                 # holds max_modules x each, and no
//! module_tables = 32                  # module may ask for more
//! compile_concurrency = 2             # components compiled at once (default:
//!                                     # one per core and per 512 MiB available)
//! compile_worker = true               # compile in a worker process (default)
//! compile_memory = "2GiB"             # what one compile may use (default 2GiB)
//! compile_time = "5m"                 # CPU time one compile may use (default 5m)
//!
//! [[module]]
//! name = "temperature-sensor"         # [a-z0-9][a-z0-9._-]{0,62}
//! file = "temperature-sensor.wasm"    # relative to this file's directory
//! digest = "sha256:<64 hex>"          # pinned; anything else is refused
//! args = ["--verbose"]                # argv after the program name
//! env = { INTERVAL_MS = "1000" }      # the only environment it sees
//! dirs = ["/srv/shared::/shared"]     # extra preopens (HOST or HOST::GUEST, then ::ro for read-only)
//! max_memory = "64MiB"                # linear memory, total over all its
//!                                     # memories (default 64MiB)
//! max_instances = 32                  # core instances (default 32)
//! max_memories = 2                    # linear memories (default 2)
//! max_handles = 1024                  # open files, sockets, streams (default 1024)
//! max_tables = 32                     # tables (default 32)
//! max_table_elements = 100000         # elements per table (default 100000)
//! max_hostcall_data = "16MiB"         # bytes per call into the host (default 16MiB)
//! max_disk = "256MiB"                 # its data directory's size budget (default 256MiB)
//! max_disk_entries = 10000            # files, directories, links in it (default 10000)
//! allow_outbound = ["api.example.com:443"]  # the only network it may reach
//! server_names = ["{module}.{device}.edge.example", "10.0.5.0/24"]
//!                                     # names it may get server certificates
//!                                     # for (default none); see identity::names
//! timeout = "30s"                     # wall-clock limit per start (default none)
//! restart = "on-failure"              # never | on-failure (default) | always
//! signature_policy = "require"        # require | warn | off: the stricter of
//!                                     # this and [signatures] policy applies
//! publishers = ["acme.pub"]           # keys that may sign it (files here,
//!                                     # hex of the raw key through the API);
//!                                     # each one of [signatures] publishers
//!                                     # when that names any
//!
//! [signatures]
//! policy = "require"                  # require | warn | off (default): components
//! manifests = "require"               # for deployment manifests (default: require
//!                                     # when deployment_keys names any, else off)
//! publishers = ["/etc/edgeward/acme.pub"]  # trusted component keys (raw, PEM, DER, OpenSSH)
//! deployment_keys = ["/etc/edgeward/ops.pub"]  # trusted deployment keys (a separate set)
//!
//! [agent]                             # optional: the one module linked with
//! name = "agent"                      # edgeward:host/management (default name shown)
//! file = "edge-agent.wasm"            # relative to this file's directory
//! digest = "sha256:<64 hex>"          # pinned
//! config_dir = "agent"                # watched; preopened read-only as /config
//! settings = { manifest = "deployment.toml" }
//! env = {}                            # also args, max_memory, max_hostcall_data
//! ```
//!
//! The agent is registered like a `[[module]]` of the config file (it is
//! listed among `modules`), started before the others and restarted
//! always.
//!
//! Every module also gets its own data directory, preopened as `/data`, held
//! to its disk budget (`max_disk`, `max_disk_entries`; see
//! `runtime::disk`). Directories granted with `dirs` are the operator's and
//! carry no budget.
//!
//! ```toml
//! [api]
//! socket = "/run/edgeward/management.sock"   # default: see api::socket_path
//! group = "edgeward"                  # the socket's group (0660)
//! operator_uids = [1000]              # may change modules (root and the
//! operator_groups = ["edgeops"]       # daemon's user always may)
//! reader_uids = []                    # may only read
//! reader_groups = ["monitoring"]
//!
//! [hsm]
//! backend = "soft"                    # soft (default) | tpm | pkcs11
//! tcti = "device:/dev/tpmrm0"         # tpm: TCTI (default shown)
//! pcr = 13                            # tpm: measurement register PCR (see hsm::tpm::DEFAULT_PCR)
//! boot_pcrs = [7]                     # tpm: boot PCRs new keys are bound to
//!                                     # (default: 7 if the boot measured it)
//! module = "/usr/lib/softhsm/libsofthsm2.so"   # pkcs11: the module
//! token = "edgeward"                  # pkcs11: token label
//! pin_file = "/etc/edgeward/pin"      # pkcs11: user PIN, never on the command line
//!
//! [identity]
//! trust_domain = "edgeward.local"     # SPIFFE trust domain (default shown)
//! device_id = "gateway-17"            # default: the hostname
//! svid_ttl = "1h"                     # X509-SVID lifetime (re-issued past half)
//! max_token_ttl = "5m"                # JWT-SVID lifetimes are clamped to this
//! jwt_key_rotation = "1h"             # JWT working-key rotation period
//! ca_certificate = "device-ca.pem"    # optional: certificate(s) for the HSM's
//!                                     # device-ca key, up to a self-signed root
//!
//! [cloud]                             # optional: the fleet's broker (see
//! broker = "mqtts://broker.example"   # cloud::CloudConfig and docs/fleet.md)
//! ca = "org-root.pem"
//! deployment_keys = ["deploy.pub"]
//! groups = ["line-a"]
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::hsm::HsmConfig;
use crate::identity::IdentityConfig;
use crate::runtime::engine::ModuleCeilings;
use crate::spec::{ModuleSpec, RawModuleSpec};
use crate::units::{parse_duration, parse_size};

/// Environment variable naming the config file when `--config` is absent.
pub const CONFIG_ENV: &str = "EDGEWARD_CONFIG";
/// The config file used when neither `--config` nor `$EDGEWARD_CONFIG` is given.
pub const DEFAULT_CONFIG: &str = "/etc/edgeward/config.toml";
/// How often running modules are re-measured unless configured.
pub const DEFAULT_INTEGRITY_INTERVAL: Duration = Duration::from_secs(300);
/// Default number of module instances that may run at once.
pub const DEFAULT_MAX_MODULES: u32 = 64;

/// A config file that could not be used. The message names the file and,
/// where it can, the module and field.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {message}")]
pub struct ConfigError {
    path: PathBuf,
    message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    #[serde(default)]
    hsm: RawHsm,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default, rename = "module")]
    modules: Vec<RawModuleSpec>,
    agent: Option<RawAgent>,
    #[serde(default)]
    signatures: RawSignatures,
    cloud: Option<crate::cloud::RawCloud>,
    provisioning: Option<crate::enroll::device::RawProvisioning>,
    #[serde(default)]
    grants: crate::grants::RawGrants,
    #[serde(default)]
    metrics: RawMetrics,
}

/// `[metrics]`: where else than the management socket the metrics are
/// served.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

impl RawMetrics {
    fn validate(self) -> Result<MetricsSettings, String> {
        let listen = self
            .listen
            .map(|l| {
                let addr: std::net::SocketAddr = l.parse().map_err(|_| {
                    format!("metrics.listen: {l:?} is not an address and port (such as \"127.0.0.1:9464\")")
                })?;
                if !addr.ip().is_loopback() {
                    return Err(format!(
                        "metrics.listen: {addr} is not a loopback address: the metrics name every module and are served without authentication, so only 127.0.0.0/8 or [::1] may listen (a remote Prometheus scrapes through a proxy or the management socket)"
                    ));
                }
                Ok(addr)
            })
            .transpose()?;
        Ok(MetricsSettings { listen })
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSettings {
    /// A loopback TCP address to serve `GET /metrics` on (besides
    /// `GET /v1/metrics` on the management socket).
    pub listen: Option<std::net::SocketAddr>,
}

/// `[signatures]`: the floor every component and manifest is held to.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignatures {
    policy: Option<String>,
    manifests: Option<String>,
    #[serde(default)]
    publishers: Vec<PathBuf>,
    #[serde(default)]
    deployment_keys: Vec<PathBuf>,
}

impl RawSignatures {
    fn validate(
        self,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<crate::attest::publisher::DeviceSignatures, String> {
        use crate::attest::publisher::{Policy, load_publishers};
        let policy: Policy = match &self.policy {
            None => Policy::Off,
            Some(p) => p.parse().map_err(|e| format!("signatures.policy: {e}"))?,
        };
        let files: Vec<PathBuf> = self.publishers.iter().map(|p| resolve(p)).collect();
        let publishers =
            load_publishers(&files).map_err(|e| format!("signatures.publishers: {e}"))?;
        let files: Vec<PathBuf> = self.deployment_keys.iter().map(|p| resolve(p)).collect();
        let deployment_keys =
            load_publishers(&files).map_err(|e| format!("signatures.deployment_keys: {e}"))?;
        let manifests = match &self.manifests {
            None if deployment_keys.is_empty() => Policy::Off,
            None => Policy::Require,
            Some(p) => p
                .parse()
                .map_err(|e| format!("signatures.manifests: {e}"))?,
        };
        if publishers.is_empty() && policy != Policy::Off {
            return Err(
                "signatures: a policy other than off needs publishers (trusted key files)".into(),
            );
        }
        if deployment_keys.is_empty() && manifests != Policy::Off {
            return Err(
                "signatures: manifests other than off needs deployment_keys (the keys deployments are signed with; a separate set from the publishers)".into(),
            );
        }
        Ok(crate::attest::publisher::DeviceSignatures {
            policy,
            manifests,
            publishers,
            deployment_keys,
        })
    }
}

/// `[agent]`: the one module linked with the management interface.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Option<String>,
    file: PathBuf,
    digest: String,
    config_dir: PathBuf,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    settings: std::collections::BTreeMap<String, String>,
    max_memory: Option<String>,
    max_hostcall_data: Option<String>,
}

/// The agent's name when `[agent] name` is not set.
pub const DEFAULT_AGENT_NAME: &str = "agent";
/// Where the agent sees its config directory.
pub const AGENT_CONFIG_GUEST: &str = "/config";

/// The agent, validated: its spec (restart always, its config directory
/// preopened read-only as `/config`) and that directory, which the daemon
/// watches for it.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// As any module's, plus the grant of `config_dir`.
    pub spec: ModuleSpec,
    /// The directory holding its manifest (absolute).
    pub config_dir: PathBuf,
}

impl RawAgent {
    fn validate(
        self,
        resolve: &dyn Fn(&Path) -> PathBuf,
        ceilings: &ModuleCeilings,
    ) -> Result<AgentSpec, String> {
        let config_dir = resolve(&self.config_dir);
        // As written: the spec's validation resolves it (once).
        let grant = crate::runtime::DirGrant {
            host: self.config_dir.clone(),
            guest: AGENT_CONFIG_GUEST.to_owned(),
            budgeted: false,
            read_only: true,
        };
        let raw = RawModuleSpec {
            name: self.name.unwrap_or_else(|| DEFAULT_AGENT_NAME.to_owned()),
            file: Some(self.file),
            digest: self.digest,
            args: self.args,
            env: self.env,
            settings: self.settings,
            dirs: vec![grant.to_string()],
            max_memory: self.max_memory,
            max_hostcall_data: self.max_hostcall_data,
            restart: Some("always".to_owned()),
            ..RawModuleSpec::default()
        };
        let spec = raw
            .validate(resolve, ceilings)
            .map_err(|e| format!("agent: {e}"))?;
        Ok(AgentSpec { spec, config_dir })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    backend: Option<String>,
    tcti: Option<String>,
    pcr: Option<u8>,
    boot_pcrs: Option<Vec<u8>>,
    module: Option<PathBuf>,
    token: Option<String>,
    pin_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    trust_domain: Option<String>,
    device_id: Option<String>,
    svid_ttl: Option<String>,
    max_token_ttl: Option<String>,
    jwt_key_rotation: Option<String>,
    ca_certificate: Option<PathBuf>,
}

impl RawIdentity {
    fn validate(self, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<IdentityConfig, String> {
        let d = IdentityConfig::default();
        let dur = |name: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => parse_duration(&s).map_err(|e| format!("identity.{name}: {e}")),
        };
        let c = IdentityConfig {
            trust_domain: self.trust_domain.unwrap_or(d.trust_domain),
            device_id: self.device_id.unwrap_or(d.device_id),
            svid_ttl: dur("svid_ttl", self.svid_ttl, d.svid_ttl)?,
            max_token_ttl: dur("max_token_ttl", self.max_token_ttl, d.max_token_ttl)?,
            jwt_key_rotation: dur(
                "jwt_key_rotation",
                self.jwt_key_rotation,
                d.jwt_key_rotation,
            )?,
            ca_certificate: self.ca_certificate.map(|p| resolve(&p)),
        };
        c.check()?;
        Ok(c)
    }
}

/// The TCTI used when `[hsm] backend = "tpm"` names none.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

impl RawHsm {
    fn validate(self, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<HsmConfig, String> {
        let backend = self.backend.as_deref().unwrap_or("soft");
        let tpm_fields = self.tcti.is_some() || self.pcr.is_some() || self.boot_pcrs.is_some();
        let pkcs11_fields =
            self.module.is_some() || self.token.is_some() || self.pin_file.is_some();
        match backend {
            "soft" if tpm_fields || pkcs11_fields => {
                Err("hsm: tcti/pcr/module/token/pin_file do not apply to backend \"soft\"".into())
            }
            "soft" => Ok(HsmConfig::Soft),
            "tpm" => {
                if pkcs11_fields {
                    return Err("hsm: module/token/pin_file do not apply to backend \"tpm\"".into());
                }
                let pcr = self.pcr.unwrap_or(crate::hsm::tpm::DEFAULT_PCR);
                if pcr > 23 {
                    return Err(format!("hsm.pcr = {pcr}: must be 0..=23"));
                }
                if let Some(b) = &self.boot_pcrs {
                    crate::hsm::tpm::check_boot_pcrs(b, pcr)?;
                }
                Ok(HsmConfig::Tpm(crate::hsm::tpm::TpmConfig {
                    tcti: self.tcti.unwrap_or_else(|| DEFAULT_TCTI.to_owned()),
                    pcr,
                    boot_pcrs: self.boot_pcrs,
                }))
            }
            "pkcs11" => {
                if tpm_fields {
                    return Err("hsm: tcti/pcr do not apply to backend \"pkcs11\"".into());
                }
                let need = |v: Option<PathBuf>, f: &str| {
                    v.ok_or_else(|| format!("hsm: backend \"pkcs11\" needs {f}"))
                };
                Ok(HsmConfig::Pkcs11(crate::hsm::pkcs11::Pkcs11Config {
                    module: resolve(&need(self.module, "module")?),
                    token: self.token.ok_or("hsm: backend \"pkcs11\" needs token")?,
                    pin_file: resolve(&need(self.pin_file, "pin_file")?),
                }))
            }
            other => Err(format!(
                "hsm.backend = {other:?}: expected \"soft\", \"tpm\" or \"pkcs11\" (built with: {})",
                crate::hsm::BACKENDS.join(", ")
            )),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<PathBuf>,
    group: Option<String>,
    #[serde(default)]
    operator_uids: Vec<u32>,
    #[serde(default)]
    operator_groups: Vec<String>,
    #[serde(default)]
    reader_uids: Vec<u32>,
    #[serde(default)]
    reader_groups: Vec<String>,
}

impl RawApi {
    fn validate(self, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<ApiSettings, String> {
        let groups = |names: Vec<String>, field: &str| {
            names
                .into_iter()
                .map(|g| {
                    crate::api::peer::group_id(&g).ok_or_else(|| {
                        format!("api.{field}: no group {g:?} (a name in /etc/group or a number)")
                    })
                })
                .collect::<Result<Vec<u32>, String>>()
        };
        Ok(ApiSettings {
            socket: self.socket.map(|p| resolve(&p)),
            group: self
                .group
                .map(|g| groups(vec![g], "group").map(|v| v[0]))
                .transpose()?,
            operator_uids: self.operator_uids,
            operator_gids: groups(self.operator_groups, "operator_groups")?,
            reader_uids: self.reader_uids,
            reader_gids: groups(self.reader_groups, "reader_groups")?,
        })
    }
}

/// `[api]`: where the management socket is and who may use it. Root and
/// the daemon's own user are always operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiSettings {
    /// The socket (default: see [`crate::api::socket_path`]).
    pub socket: Option<PathBuf>,
    /// The socket's group (it is 0660), so its members can reach it at all.
    pub group: Option<u32>,
    /// Users who may change modules.
    pub operator_uids: Vec<u32>,
    /// Groups whose members may change modules.
    pub operator_gids: Vec<u32>,
    /// Users who may only read.
    pub reader_uids: Vec<u32>,
    /// Groups whose members may only read.
    pub reader_gids: Vec<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    max_modules: Option<u32>,
    pooling: Option<bool>,
    echo_output: Option<bool>,
    max_wasm_stack: Option<String>,
    integrity_interval: Option<String>,
    measure: Option<bool>,
    module_instances: Option<u32>,
    module_memories: Option<u32>,
    module_tables: Option<u32>,
    compile_concurrency: Option<u32>,
    compile_worker: Option<bool>,
    compile_memory: Option<String>,
    compile_time: Option<String>,
}

/// Runtime-wide settings.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Module instances that may run at once.
    pub max_modules: u32,
    /// Force or forbid the pooling allocator; `None` probes.
    pub pooling: Option<bool>,
    /// Echo module output on the daemon's stdout/stderr (rate-limited), in
    /// addition to each module's log. Default true.
    pub echo_output: bool,
    /// How often the watchdog re-measures running modules (`None`: off).
    pub integrity_interval: Option<Duration>,
    /// Measure into the HSM's register and the event log (see `attest`).
    pub measure: bool,
    /// Wasm stack limit for every module.
    pub max_wasm_stack: usize,
    /// What one module may hold at most (the pool's share per module).
    pub ceilings: ModuleCeilings,
    /// Components compiled at once; `None`: from the cores and the memory
    /// available at start (`runtime::default_compile_concurrency`).
    pub compile_concurrency: Option<u32>,
    /// Compile in worker processes with these limits (`None`: in the
    /// daemon's process, `compile_worker = false`).
    pub compile_worker: Option<crate::runtime::worker::WorkerLimits>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// `state_dir`, if set (relative paths resolved against the file's dir).
    pub state_dir: Option<PathBuf>,
    /// The HSM backend.
    pub hsm: HsmConfig,
    /// Runtime settings.
    pub runtime: RuntimeSettings,
    /// Workload identity settings.
    pub identity: IdentityConfig,
    /// The management API.
    pub api: ApiSettings,
    /// The deployment.
    pub modules: Vec<ModuleSpec>,
    /// The agent, if one is configured.
    pub agent: Option<AgentSpec>,
    /// `[signatures]`.
    pub signatures: crate::attest::publisher::DeviceSignatures,
    /// `[cloud]`: the fleet's broker, if one is configured (with
    /// `[provisioning]`, set once the device is enrolled).
    pub cloud: Option<crate::cloud::CloudConfig>,
    /// `[provisioning]`: the device enrolls itself.
    pub provisioning: Option<crate::enroll::device::Provisioning>,
    /// `[grants]`: what the API, the agent and deployments may grant.
    pub grants: crate::grants::Grants,
    /// `[metrics]`.
    pub metrics: MetricsSettings,
}

/// Where the compiled-artifact cache's MAC key lives with the HSM backend
/// `hsm`: in the state dir beside the soft keys, or wrapped by the HSM.
pub fn cache_key(hsm: &HsmConfig) -> crate::runtime::cache::CacheKey {
    match hsm {
        HsmConfig::Soft => crate::runtime::cache::CacheKey::StateDir,
        #[allow(unreachable_patterns)]
        _ => crate::runtime::cache::CacheKey::Hsm,
    }
}

impl Config {
    /// The configuration in effect (defaults applied, paths resolved), as
    /// JSON: what the daemon measures at start (see `attest`). Durations
    /// are in milliseconds; the `[agent]` shows among `modules` and by name.
    pub fn effective(&self) -> serde_json::Value {
        use serde_json::json;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let path = |p: &Path| p.display().to_string();
        let hsm = match &self.hsm {
            crate::hsm::HsmConfig::Soft => json!({"backend": "soft"}),
            crate::hsm::HsmConfig::Tpm(c) => {
                json!({"backend": "tpm", "tcti": c.tcti, "pcr": c.pcr, "boot_pcrs": c.boot_pcrs})
            }
            crate::hsm::HsmConfig::Pkcs11(c) => json!({
                "backend": "pkcs11",
                "module": path(&c.module),
                "token": c.token,
                "pin_file": path(&c.pin_file),
            }),
        };
        let i = &self.identity;
        let a = &self.api;
        let r = &self.runtime;
        json!({
            "state_dir": self.state_dir.as_deref().map(path),
            "hsm": hsm,
            "identity": {
                "trust_domain": i.trust_domain,
                "device_id": i.device_id,
                "svid_ttl_ms": ms(i.svid_ttl),
                "max_token_ttl_ms": ms(i.max_token_ttl),
                "jwt_key_rotation_ms": ms(i.jwt_key_rotation),
                "ca_certificate": i.ca_certificate.as_deref().map(path),
            },
            "metrics": {
                "listen": self.metrics.listen.map(|a| a.to_string()),
            },
            "api": {
                "socket": a.socket.as_deref().map(path),
                "group": a.group,
                "operator_uids": a.operator_uids,
                "operator_gids": a.operator_gids,
                "reader_uids": a.reader_uids,
                "reader_gids": a.reader_gids,
            },
            "runtime": {
                "max_modules": r.max_modules,
                "pooling": r.pooling,
                "echo_output": r.echo_output,
                "integrity_interval_ms": r.integrity_interval.map(ms),
                "measure": r.measure,
                "max_wasm_stack": r.max_wasm_stack,
                "module_instances": r.ceilings.core_instances,
                "module_memories": r.ceilings.memories,
                "module_tables": r.ceilings.tables,
                "compile_concurrency": r.compile_concurrency,
                "compile_worker": r.compile_worker.is_some(),
                "compile_memory": r.compile_worker.map(|w| w.memory),
                "compile_time_ms": r.compile_worker.map(|w| ms(w.cpu)),
            },
            "modules": self.modules.iter().map(|m| m.to_raw()).collect::<Vec<_>>(),
            "signatures": {
                "policy": self.signatures.policy.as_str(),
                "manifests": self.signatures.manifests.as_str(),
                "publishers": self.signatures.publishers.iter()
                    .map(|k| crate::measure::hex(&k.to_bytes())).collect::<Vec<_>>(),
                "deployment_keys": self.signatures.deployment_keys.iter()
                    .map(|k| crate::measure::hex(&k.to_bytes())).collect::<Vec<_>>(),
            },
            "agent": self.agent.as_ref().map(|a| json!({
                "name": a.spec.name,
                "config_dir": path(&a.config_dir),
            })),
            "cloud": self.cloud.as_ref().map(|c| json!({
                "broker": format!("mqtts://{}:{}", c.host, c.port),
                "ca": path(&c.ca),
                "deployment_keys": c.deployment_keys.iter()
                    .map(|k| crate::measure::hex(&k.to_bytes())).collect::<Vec<_>>(),
                "groups": c.groups,
                "certificate": path(&c.certificate),
                "keep_alive_ms": ms(c.keep_alive),
                "reconnect_min_ms": ms(c.reconnect_min),
                "reconnect_max_ms": ms(c.reconnect_max),
                "report_interval_ms": ms(c.report_interval),
                "fetch_timeout_ms": ms(c.fetch_timeout),
                "registry_roots": c.registry_roots.as_ref().map(|r| crate::measure::Digest::of(r).to_string()),
                "registries": c.credentials.keys().collect::<Vec<_>>(),
                "local_sources": c.local_sources.iter().map(|p| path(p)).collect::<Vec<_>>(),
            })),
            "provisioning": self.provisioning.as_ref().map(|p| json!({
                "broker": format!("mqtts://{}:{}", p.host, p.port),
                "ca": crate::measure::Digest::of(&p.ca_pem).to_string(),
                "org_roots": p.org_roots.iter()
                    .map(|r| crate::measure::Digest::of(r).to_string()).collect::<Vec<_>>(),
                "group": p.symmetric.as_ref().map(|(g, _)| g),
                "enrollment_key": p.symmetric.as_ref().map(|(_, k)| path(k)),
                "retry_min_ms": ms(p.retry_min),
                "retry_max_ms": ms(p.retry_max),
                "timeout_ms": ms(p.timeout),
                "renew_threshold_percent": p.renew_threshold,
            })),
        })
    }

    /// No config file: the defaults and no modules (an empty deployment;
    /// modules are added later through the management API).
    pub fn empty() -> Self {
        // The empty text is a valid config: only defaults.
        #[allow(clippy::expect_used)]
        Self::parse(Path::new("(no config file)"), "").expect("the empty config is valid")
    }

    /// Reads and validates `path`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file and what is wrong.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (relative paths resolve
    /// against `path`'s directory).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file and what is wrong.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError {
            path: path.to_owned(),
            message,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_owned()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };

        let hsm = raw.hsm.validate(&resolve).map_err(err)?;
        let identity = raw.identity.validate(&resolve).map_err(err)?;
        let api = raw.api.validate(&resolve).map_err(err)?;
        let metrics = raw.metrics.validate().map_err(err)?;
        let signatures = raw.signatures.validate(&resolve).map_err(err)?;
        let (cloud, provisioning) = match raw.provisioning {
            None => (
                raw.cloud
                    .map(|c| c.validate(&resolve))
                    .transpose()
                    .map_err(err)?,
                None,
            ),
            Some(p) => {
                if identity.ca_certificate.is_some() {
                    return Err(err(
                        "identity.ca_certificate: with [provisioning], the device CA's chain is the one the enrollment writes; remove it".into(),
                    ));
                }
                (
                    None,
                    Some(p.validate(raw.cloud, &resolve, base).map_err(err)?),
                )
            }
        };
        if let (Some(c), Some(chain)) = (&cloud, &identity.ca_certificate) {
            pinned_apart(&c.ca, chain).map_err(err)?;
        }
        let grants = raw.grants.validate(&identity.device_id).map_err(err)?;
        let max_wasm_stack = match &raw.runtime.max_wasm_stack {
            None => crate::runtime::engine::DEFAULT_MAX_WASM_STACK,
            Some(s) => {
                let n = parse_size(s).map_err(|e| err(format!("runtime.max_wasm_stack: {e}")))?;
                if !(64 << 10..=64 << 20).contains(&n) {
                    return Err(err(
                        "runtime.max_wasm_stack: must be between 64KiB and 64MiB".into(),
                    ));
                }
                usize::try_from(n).unwrap_or(usize::MAX)
            }
        };
        let integrity_interval = match raw.runtime.integrity_interval.as_deref() {
            None => Some(DEFAULT_INTEGRITY_INTERVAL),
            Some("off") => None,
            Some(s) => {
                let d = parse_duration(s)
                    .map_err(|e| err(format!("runtime.integrity_interval: {e}")))?;
                if d < Duration::from_secs(1) {
                    return Err(err(
                        "runtime.integrity_interval: at least 1s (or \"off\")".into()
                    ));
                }
                Some(d)
            }
        };
        let max_modules = raw.runtime.max_modules.unwrap_or(DEFAULT_MAX_MODULES);
        if !(1..=100_000).contains(&max_modules) {
            return Err(err(format!(
                "runtime.max_modules = {max_modules}: must be 1..=100000"
            )));
        }
        let dc = ModuleCeilings::default();
        let ceilings = ModuleCeilings {
            core_instances: raw.runtime.module_instances.unwrap_or(dc.core_instances),
            memories: raw.runtime.module_memories.unwrap_or(dc.memories),
            tables: raw.runtime.module_tables.unwrap_or(dc.tables),
        };
        for (field, v, max) in [
            ("module_instances", ceilings.core_instances, 10_000),
            ("module_memories", ceilings.memories, 64),
            ("module_tables", ceilings.tables, 10_000),
        ] {
            if !(1..=max).contains(&v) {
                return Err(err(format!("runtime.{field} = {v}: must be 1..={max}")));
            }
        }
        if let Some(n) = raw.runtime.compile_concurrency
            && !(1..=64).contains(&n)
        {
            return Err(err(format!(
                "runtime.compile_concurrency = {n}: must be 1..=64"
            )));
        }
        let compile_worker = {
            let d = crate::runtime::worker::WorkerLimits::default();
            let memory = match &raw.runtime.compile_memory {
                None => d.memory,
                Some(s) => {
                    parse_size(s).map_err(|e| err(format!("runtime.compile_memory: {e}")))?
                }
            };
            if !(16 << 20..=1 << 40).contains(&memory) {
                return Err(err(format!(
                    "runtime.compile_memory = {memory} bytes: must be 16MiB..=1TiB"
                )));
            }
            let cpu = match &raw.runtime.compile_time {
                None => d.cpu,
                Some(s) => {
                    parse_duration(s).map_err(|e| err(format!("runtime.compile_time: {e}")))?
                }
            };
            if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&cpu) {
                return Err(err(format!(
                    "runtime.compile_time = {cpu:?}: must be 1s..=1h"
                )));
            }
            raw.runtime
                .compile_worker
                .unwrap_or(true)
                .then_some(crate::runtime::worker::WorkerLimits { memory, cpu })
        };
        let mut names = HashSet::new();
        let mut modules = Vec::with_capacity(raw.modules.len());
        for m in raw.modules {
            let spec = m
                .validate(&resolve, &ceilings)
                .map_err(|e| err(e.to_string()))?;
            if !names.insert(spec.name.clone()) {
                return Err(err(format!("module {:?} is defined twice", spec.name)));
            }
            modules.push(spec);
        }
        let agent = match raw.agent {
            None => None,
            Some(a) => {
                let a = a.validate(&resolve, &ceilings).map_err(err)?;
                if !names.insert(a.spec.name.clone()) {
                    return Err(err(format!(
                        "agent: the name {:?} is also a [[module]]'s",
                        a.spec.name
                    )));
                }
                modules.push(a.spec.clone());
                Some(a)
            }
        };
        if modules.len() > max_modules as usize {
            return Err(err(format!(
                "{} modules configured but runtime.max_modules is {max_modules}",
                modules.len()
            )));
        }
        Ok(Self {
            path: path.to_owned(),
            state_dir: raw.state_dir.map(|p| resolve(&p)),
            hsm,
            runtime: RuntimeSettings {
                max_modules,
                pooling: raw.runtime.pooling,
                echo_output: raw.runtime.echo_output.unwrap_or(true),
                integrity_interval,
                measure: raw.runtime.measure.unwrap_or(true),
                max_wasm_stack,
                ceilings,
                compile_concurrency: raw.runtime.compile_concurrency,
                compile_worker,
            },
            identity,
            api,
            modules,
            agent,
            signatures,
            cloud,
            provisioning,
            grants,
            metrics,
        })
    }
}

/// The broker's CA (`[cloud] ca`) must not be the root that certifies this
/// device's modules: a module's server certificate would then pass as the
/// broker's.
fn pinned_apart(broker_ca: &Path, device_chain: &Path) -> Result<(), String> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| crate::identity::authority::parse_pem_certificates(&t).ok())
            .unwrap_or_default()
    };
    let broker = read(broker_ca);
    if read(device_chain).iter().any(|c| broker.contains(c)) {
        return Err(format!(
            "cloud.ca {} holds a certificate of the device CA's chain ({}): pin the broker's own CA, not the root that certifies modules, or a module's server certificate passes as the broker",
            broker_ca.display(),
            device_chain.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::RestartPolicy;

    const D: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/edgeward/config.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn provisioning_is_checked_and_leaves_the_assigned_fields_to_the_enrollment() {
        let dir = tempfile::tempdir().unwrap();
        let made = std::process::Command::new("openssl")
            .current_dir(dir.path())
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args([
                "-nodes", "-keyout", "root.key", "-out", "root.pem", "-days", "1",
            ])
            .args(["-subj", "/CN=root"])
            .output()
            .expect("openssl (scripts/setup installs it)");
        assert!(made.status.success(), "{made:?}");
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let base = "[provisioning]\nbroker = \"mqtts://enroll.example:8884\"\nca = \"root.pem\"\norg_roots = \"root.pem\"\n";
        let parse = |text: &str| {
            Config::parse(&dir.path().join("config.toml"), text).map_err(|e| e.to_string())
        };
        let c = parse(base).unwrap();
        let p = c.provisioning.as_ref().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("enroll.example", 8884));
        assert!(p.symmetric.is_none());
        assert!(c.cloud.is_none());
        assert_eq!(
            c.effective()["provisioning"]["broker"],
            "mqtts://enroll.example:8884"
        );
        // Timings may be tuned in [cloud]; what the enrollment assigns may
        // not be set there.
        parse(&format!("{base}[cloud]\nreport_interval = \"1s\"\n")).unwrap();
        for (extra, says) in [
            (
                "[cloud]\nbroker = \"mqtts://b.example\"\n",
                "cloud.broker: with [provisioning]",
            ),
            (
                "[cloud]\ngroups = [\"a\"]\n",
                "cloud.groups: with [provisioning]",
            ),
            (
                "[identity]\nca_certificate = \"root.pem\"\n",
                "identity.ca_certificate: with [provisioning]",
            ),
            (
                "group = \"boards\"\n",
                "group and enrollment_key go together",
            ),
            (
                "retry_min = \"1h\"\nretry_max = \"1m\"\n",
                "retry_max is less",
            ),
            ("timeout = \"0s\"\n", "provisioning.timeout"),
            (
                "renew_threshold = \"100%\"\n",
                "provisioning.renew_threshold",
            ),
            ("renew_threshold = \"67\"\n", "provisioning.renew_threshold"),
        ] {
            let text = format!("{base}{extra}");
            let e = parse(&text).unwrap_err();
            assert!(e.contains(says), "{extra}: {e}");
        }
        for (broker, ca, roots, says) in [
            (
                "http://enroll.example",
                "root.pem",
                "root.pem",
                "provisioning.broker",
            ),
            (
                "mqtts://e.example",
                "missing.pem",
                "root.pem",
                "provisioning.ca",
            ),
            (
                "mqtts://e.example",
                "empty.pem",
                "root.pem",
                "no certificate",
            ),
            (
                "mqtts://e.example",
                "root.pem",
                "missing.pem",
                "provisioning.org_roots",
            ),
        ] {
            let e = parse(&format!(
                "[provisioning]\nbroker = \"{broker}\"\nca = \"{ca}\"\norg_roots = \"{roots}\"\n"
            ))
            .unwrap_err();
            assert!(e.contains(says), "{says}: {e}");
        }
        // Without [provisioning], [cloud] needs its broker.
        let e = parse("[cloud]\nca = \"root.pem\"\n").unwrap_err();
        assert!(e.contains("cloud.broker: name the fleet's broker"), "{e}");
    }

    #[test]
    fn no_config_file_is_an_empty_deployment() {
        let c = Config::empty();
        assert!(c.modules.is_empty());
        assert_eq!(c.runtime.max_modules, DEFAULT_MAX_MODULES);
    }

    #[test]
    fn full_module() {
        let c = parse(&format!(
            r#"
            state_dir = "state"
            [runtime]
            max_modules = 8
            [[module]]
            name = "temp-1"
            file = "m.wasm"
            digest = "{D}"
            args = ["a"]
            env = {{ K = "v" }}
            dirs = ["/srv::/srv"]
            max_memory = "8MiB"
            timeout = "5s"
            restart = "always"
            "#
        ))
        .expect("valid");
        assert_eq!(c.state_dir, Some(PathBuf::from("/etc/edgeward/state")));
        let m = &c.modules[0];
        assert_eq!(m.file, Some(PathBuf::from("/etc/edgeward/m.wasm")));
        assert_eq!(m.limits.max_memory, 8 << 20);
        assert_eq!(m.timeout, Some(Duration::from_secs(5)));
        assert_eq!(m.restart, RestartPolicy::Always);
        assert_eq!(m.env, vec![("K".into(), "v".into())]);
    }

    #[test]
    fn the_agent_is_a_config_module_that_always_runs() {
        let c = Config::parse(
            Path::new("/etc/edgeward/config.toml"),
            &format!(
                "[agent]\nfile = \"agent.wasm\"\ndigest = \"{D}\"\nconfig_dir = \"agent\"\nsettings = {{ manifest = \"m.toml\" }}"
            ),
        )
        .expect("valid");
        let a = c.agent.as_ref().expect("agent");
        assert_eq!(a.spec.name, DEFAULT_AGENT_NAME);
        assert_eq!(a.config_dir, PathBuf::from("/etc/edgeward/agent"));
        // The grant is the same directory, resolved once.
        assert_eq!(a.spec.dirs[0].host, a.config_dir);
        assert_eq!(a.spec.restart, RestartPolicy::Always);
        assert_eq!(a.spec.dirs.len(), 1);
        assert!(a.spec.dirs[0].read_only && a.spec.dirs[0].guest == AGENT_CONFIG_GUEST);
        assert_eq!(a.spec.settings["manifest"], "m.toml");
        // Registered as a config module.
        assert_eq!(c.modules.len(), 1);
        assert_eq!(c.modules[0].name, DEFAULT_AGENT_NAME);
        // A config file named by a relative path (the demo's) resolves the
        // directory against its own directory, once.
        let c = Config::parse(
            Path::new("target/demo/deployment.toml"),
            &format!("[agent]\nfile = \"a.wasm\"\ndigest = \"{D}\"\nconfig_dir = \"agent\""),
        )
        .expect("valid");
        let a = c.agent.as_ref().expect("agent");
        assert_eq!(a.config_dir, PathBuf::from("target/demo/agent"));
        assert_eq!(a.spec.dirs[0].host, PathBuf::from("target/demo/agent"));
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                format!("[[module]]\nname = \"Bad Name\"\nfile = \"x\"\ndigest = \"{D}\""),
                "Bad Name",
            ),
            (
                "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"sha256:00\"".to_owned(),
                "digest",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nrestart = \"sometimes\""
                ),
                "restart",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nmax_memory = \"lots\""
                ),
                "max_memory",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\ntimeout = \"0s\""
                ),
                "timeout",
            ),
            (
                format!("[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nflavour = 1"),
                "flavour",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\n[[module]]\nname = \"a\"\nfile = \"y\"\ndigest = \"{D}\""
                ),
                "twice",
            ),
            (
                "[[module]]\nname = \"a\"\nfile = \"x\"".to_owned(),
                "digest",
            ),
            ("[runtime]\nmax_modules = 0".to_owned(), "max_modules"),
            (
                format!("[agent]\nfile = \"a.wasm\"\ndigest = \"{D}\""),
                "config_dir",
            ),
            (
                format!(
                    "[agent]\nfile = \"a.wasm\"\ndigest = \"{D}\"\nconfig_dir = \"c\"\nrestart = \"never\""
                ),
                "restart",
            ),
            (
                format!(
                    "[[module]]\nname = \"agent\"\nfile = \"x\"\ndigest = \"{D}\"\n[agent]\nfile = \"a.wasm\"\ndigest = \"{D}\"\nconfig_dir = \"c\""
                ),
                "also a [[module]]",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nallow_outbound = [\"nowhere\"]"
                ),
                "allow_outbound",
            ),
            (
                format!("[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nmax_tables = 0"),
                "max_tables",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nallow_outbound = [\"10.0.5.1/24:502\"]"
                ),
                "allow_outbound",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nserver_names = [\"*.com\"]"
                ),
                "server_names",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nmax_memories = 0"
                ),
                "max_memories",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nmax_handles = 1"
                ),
                "max_handles",
            ),
            (
                "[runtime]\nmodule_memories = 0".to_owned(),
                "runtime.module_memories",
            ),
            (
                "[runtime]\ncompile_concurrency = 0".to_owned(),
                "runtime.compile_concurrency = 0: must be 1..=64",
            ),
            (
                "[runtime]\ncompile_concurrency = -1".to_owned(),
                "compile_concurrency",
            ),
            (
                "[runtime]\ncompile_memory = \"1MiB\"".to_owned(),
                "runtime.compile_memory = 1048576 bytes: must be 16MiB..=1TiB",
            ),
            (
                "[runtime]\ncompile_memory = \"lots\"".to_owned(),
                "runtime.compile_memory: ",
            ),
            (
                "[runtime]\ncompile_time = \"0s\"".to_owned(),
                "runtime.compile_time = 0ns: must be 1s..=1h",
            ),
            (
                "[runtime]\ncompile_worker = \"yes\"".to_owned(),
                "compile_worker",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nmax_instances = 64"
                ),
                "over the per-module ceiling runtime.module_instances = 32",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nmax_hostcall_data = \"1B\""
                ),
                "max_hostcall_data",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nmax_disk = \"lots\""
                ),
                "max_disk",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nmax_disk = \"2TiB\""
                ),
                "max_disk",
            ),
            (
                format!(
                    "[[module]]\nname = \"a\"\nfile = \"x\"\ndigest = \"{D}\"\nmax_disk_entries = 0"
                ),
                "max_disk_entries",
            ),
            ("this is not toml".to_owned(), "config.toml"),
            ("[hsm]\nbackend = \"vault\"".to_owned(), "vault"),
            ("[hsm]\nbackend = \"soft\"\ntcti = \"x\"".to_owned(), "tcti"),
            (
                "[hsm]\nbackend = \"pkcs11\"\nmodule = \"m.so\"".to_owned(),
                "token",
            ),
            ("[hsm]\nbackend = \"tpm\"\npcr = 24".to_owned(), "pcr"),
            (
                "[hsm]\nbackend = \"tpm\"\nboot_pcrs = [13]".to_owned(),
                "measurement register",
            ),
            (
                "[hsm]\nbackend = \"tpm\"\nboot_pcrs = [23]".to_owned(),
                "reset by software",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(&text).expect_err(&text);
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
            assert!(e.contains("/etc/edgeward/config.toml"), "{e}");
        }
    }

    #[test]
    fn identity_settings() {
        let c = parse("").expect("empty");
        assert_eq!(c.identity.trust_domain, "edgeward.local");
        assert_eq!(c.identity.max_token_ttl, Duration::from_secs(300));
        let c = parse(
            "[identity]\ntrust_domain = \"factory.example\"\ndevice_id = \"gw-1\"\nsvid_ttl = \"10m\"\nca_certificate = \"ca.pem\"",
        )
        .expect("identity");
        assert_eq!(c.identity.device_id, "gw-1");
        assert_eq!(c.identity.svid_ttl, Duration::from_secs(600));
        assert_eq!(
            c.identity.ca_certificate.as_deref(),
            Some(Path::new("/etc/edgeward/ca.pem"))
        );
        for (text, needle) in [
            ("trust_domain = \"Bad/Domain\"", "identity.trust_domain"),
            ("device_id = \"..\"", "identity.device_id"),
            ("svid_ttl = \"1s\"", "identity.svid_ttl"),
            ("max_token_ttl = \"2d\"", "identity.max_token_ttl"),
            ("jwt_key_rotation = \"0s\"", "identity.jwt_key_rotation"),
            ("issuer = \"x\"", "unknown field `issuer`"),
        ] {
            let e = parse(&format!("[identity]\n{text}")).expect_err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn hsm_backends() {
        assert_eq!(parse("").expect("empty").hsm, HsmConfig::Soft);
        let c = parse("[hsm]\nbackend = \"tpm\"").expect("tpm");
        assert_eq!(
            c.hsm,
            HsmConfig::Tpm(crate::hsm::tpm::TpmConfig {
                tcti: DEFAULT_TCTI.into(),
                pcr: 13,
                boot_pcrs: None,
            })
        );
        let c = parse(
            "[hsm]\nbackend = \"pkcs11\"\nmodule = \"/m.so\"\ntoken = \"t\"\npin_file = \"pin\"",
        )
        .expect("pkcs11");
        assert_eq!(
            c.hsm,
            HsmConfig::Pkcs11(crate::hsm::pkcs11::Pkcs11Config {
                module: "/m.so".into(),
                token: "t".into(),
                pin_file: "/etc/edgeward/pin".into(),
            })
        );
    }
}
