//! A module's specification, checked in one place: the config file's
//! `[[module]]` tables go through [`RawModuleSpec::validate`] into the
//! [`ModuleSpec`] the daemon runs. Names, environment keys and limits are
//! checked here for `edgeward run` too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::ServerNamePolicy;
use crate::measure::Digest;
use crate::runtime::engine::ModuleCeilings;
use crate::runtime::{DirGrant, Limits, Outbound};
use crate::units::{parse_duration, parse_size};

/// The largest `max_memory` a module may ask for (4 GiB, a 32-bit memory).
pub const MAX_MODULE_MEMORY: u64 = 4 << 30;

/// A module spec as an operator writes it: a `[[module]]` table of the
/// config file (and, as JSON, what the management API will take). Checked
/// once, by [`RawModuleSpec::validate`], into a [`ModuleSpec`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RawModuleSpec {
    /// `[a-z0-9][a-z0-9._-]{0,62}`.
    pub name: String,
    /// The component file (config only: the management API takes uploaded
    /// components by digest, never a host path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub file: Option<PathBuf>,
    /// Pinned digest, `sha256:<64 hex>`.
    pub digest: String,
    /// argv after the program name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The only environment it sees.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Settings it reads through `wasi:config/store` (only its own).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
    /// Extra preopens, `HOST` or `HOST::GUEST`, `::ro` after it for
    /// read-only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<String>,
    /// Linear memory, total over all its memories (a size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<String>,
    /// Core instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    /// Linear memories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memories: Option<u32>,
    /// Handles held at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_handles: Option<u32>,
    /// Tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tables: Option<u32>,
    /// Elements per table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_table_elements: Option<u32>,
    /// Bytes per call into the host (a size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hostcall_data: Option<String>,
    /// Its data directory's byte budget (a size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disk: Option<String>,
    /// Its data directory's entry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disk_entries: Option<u32>,
    /// `HOST:PORT`, `IP:PORT` or `CIDR:PORT` destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_outbound: Vec<String>,
    /// Names it may get server certificates for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
    /// Wall-clock limit per start (a duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// `never`, `on-failure` or `always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// `require`, `warn` or `off`: the stricter of this and the device's
    /// `[signatures] policy` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_policy: Option<String>,
    /// Publisher keys that may sign its component: the hex of their raw
    /// encoding (in a config file, key files too). Each must be one of the
    /// device's trusted publishers when it names any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publishers: Vec<String>,
    /// A detached signature of its component, base64 (the API and
    /// manifests; a config file's component may have `FILE.sig` beside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// When a module that ended is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Never.
    Never,
    /// After a failure, trap or deadline; not after success.
    OnFailure,
    /// Always.
    Always,
}

impl RestartPolicy {
    /// As written in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::OnFailure => "on-failure",
            Self::Always => "always",
        }
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(Self::Never),
            "on-failure" => Ok(Self::OnFailure),
            "always" => Ok(Self::Always),
            other => Err(format!(
                "invalid restart policy {other:?}: expected never, on-failure or always"
            )),
        }
    }
}

/// One module of the deployment, validated.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    /// Unique name.
    pub name: String,
    /// Component file it was configured from (absolute), if any. The
    /// daemon reads it once, measures it and keeps the bytes in its
    /// component store; without a file, the component comes from the store
    /// by digest.
    pub file: Option<PathBuf>,
    /// Pinned digest.
    pub digest: Digest,
    /// argv after argv[0].
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Settings (`wasi:config/store`).
    pub settings: BTreeMap<String, String>,
    /// Extra preopens.
    pub dirs: Vec<DirGrant>,
    /// Resource limits.
    pub limits: Limits,
    /// Outbound destinations it may reach (empty: no network).
    pub allow_outbound: Vec<Outbound>,
    /// Names it may get server certificates for (empty: none).
    pub server_names: ServerNamePolicy,
    /// Wall-clock deadline per start.
    pub timeout: Option<Duration>,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// What its component's signature must satisfy.
    pub signing: crate::attest::publisher::Signing,
}

impl ModuleSpec {
    /// The spec in the form an operator writes, with paths absolute and
    /// only the limits that differ from the defaults: validating it gives
    /// this spec back. This is what the registry stores.
    pub fn to_raw(&self) -> RawModuleSpec {
        let d = Limits::default();
        let l = &self.limits;
        let differs = |a: u64, b: u64| (a != b).then(|| a.to_string());
        let differs32 = |a: u32, b: u32| (a != b).then_some(a);
        RawModuleSpec {
            name: self.name.clone(),
            file: self.file.clone(),
            digest: self.digest.to_string(),
            args: self.args.clone(),
            env: self.env.iter().cloned().collect(),
            settings: self.settings.clone(),
            dirs: self.dirs.iter().map(ToString::to_string).collect(),
            max_memory: differs(l.max_memory, d.max_memory),
            max_instances: differs32(l.max_instances, d.max_instances),
            max_memories: differs32(l.max_memories, d.max_memories),
            max_handles: differs32(l.max_handles, d.max_handles),
            max_tables: differs32(l.max_tables, d.max_tables),
            max_table_elements: differs32(l.max_table_elements, d.max_table_elements),
            max_hostcall_data: differs(l.max_hostcall_data, d.max_hostcall_data),
            max_disk: differs(l.max_disk, d.max_disk),
            max_disk_entries: differs32(l.max_disk_entries, d.max_disk_entries),
            allow_outbound: self
                .allow_outbound
                .iter()
                .map(ToString::to_string)
                .collect(),
            server_names: self.server_names.entries().to_vec(),
            timeout: self.timeout.map(|t| format!("{}ms", t.as_millis())),
            restart: (self.restart != RestartPolicy::OnFailure)
                .then(|| self.restart.as_str().to_owned()),
            signature_policy: self.signing.policy.map(|p| p.as_str().to_owned()),
            publishers: self.signing.publishers.clone(),
            signature: self.signing.detached.as_deref().map(|d| {
                use base64ct::Encoding as _;
                base64ct::Base64::encode_string(d)
            }),
        }
    }
}

/// A module spec that cannot be used: which module, which field, what is
/// wrong.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The name itself.
    #[error(
        "module name {0:?} is invalid: use 1-63 of a-z 0-9 . _ - starting with a letter or digit"
    )]
    Name(String),
    /// One field.
    #[error("module {module:?}: {field}: {message}")]
    Field {
        /// The module's name.
        module: String,
        /// The field, as written in the config.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl RawModuleSpec {
    /// Checks every field; relative paths (the component file, granted
    /// directories) resolve through `resolve`, and the limits must fit
    /// `ceilings` (the engine's per-module share).
    ///
    /// # Errors
    ///
    /// [`SpecError`] naming the first field that is wrong.
    pub fn validate(
        self,
        resolve: &dyn Fn(&Path) -> PathBuf,
        ceilings: &ModuleCeilings,
    ) -> Result<ModuleSpec, SpecError> {
        let m = self;
        let ctx = |field: &'static str, message: String| SpecError::Field {
            module: m.name.clone(),
            field,
            message,
        };
        if !valid_module_name(&m.name) {
            return Err(SpecError::Name(m.name));
        }
        let digest: Digest = m
            .digest
            .parse()
            .map_err(|e| ctx("digest", format!("{e}")))?;
        for k in m.env.keys() {
            if !valid_env_key(k) {
                return Err(ctx("env", format!("invalid variable name {k:?}")));
            }
        }
        check_settings(&m.settings).map_err(|e| ctx("settings", e))?;
        let dirs = m
            .dirs
            .iter()
            .map(|d| {
                let mut g: DirGrant = d.parse().map_err(|e| ctx("dirs", e))?;
                g.host = resolve(&g.host);
                Ok(g)
            })
            .collect::<Result<Vec<_>, SpecError>>()?;
        let limits = module_limits(&m).map_err(|(field, msg)| ctx(field, msg))?;
        for (field, asked, ceiling, setting) in [
            (
                "max_instances",
                limits.max_instances,
                ceilings.core_instances,
                "module_instances",
            ),
            (
                "max_memories",
                limits.max_memories,
                ceilings.memories,
                "module_memories",
            ),
            (
                "max_tables",
                limits.max_tables,
                ceilings.tables,
                "module_tables",
            ),
        ] {
            if asked > ceiling {
                return Err(ctx(
                    field,
                    format!(
                        "{asked} is over the per-module ceiling runtime.{setting} = {ceiling}; raise that"
                    ),
                ));
            }
        }
        let allow_outbound = m
            .allow_outbound
            .iter()
            .map(|o| o.parse::<Outbound>().map_err(|e| ctx("allow_outbound", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let server_names =
            ServerNamePolicy::parse(&m.server_names).map_err(|e| ctx("server_names", e))?;
        let timeout = match &m.timeout {
            None => None,
            Some(s) => Some(parse_duration(s).map_err(|e| ctx("timeout", e))?),
        };
        if timeout == Some(Duration::ZERO) {
            return Err(ctx("timeout", "must be greater than zero".into()));
        }
        let restart = match &m.restart {
            None => RestartPolicy::OnFailure,
            Some(s) => s.parse().map_err(|e| ctx("restart", e))?,
        };
        let signing = signing_of(&m, resolve).map_err(|(field, msg)| ctx(field, msg))?;
        Ok(ModuleSpec {
            signing,
            file: m.file.as_deref().map(resolve),
            name: m.name,
            digest,
            args: m.args,
            env: m.env.into_iter().collect(),
            settings: m.settings,
            dirs,
            limits,
            allow_outbound,
            server_names,
            timeout,
            restart,
        })
    }
}

/// The largest detached signature accepted (a wasmsign2 signature of a
/// component is about 100 bytes per signer and section set).
pub const MAX_SIGNATURE: usize = 64 << 10;

/// A spec's signature fields, checked: the policy, the publishers (hex;
/// in a config file, a key file is read and turned into hex), the
/// detached signature (base64).
fn signing_of(
    m: &RawModuleSpec,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<crate::attest::publisher::Signing, (&'static str, String)> {
    use crate::attest::publisher;
    let policy = match &m.signature_policy {
        None => None,
        Some(p) => Some(p.parse().map_err(|e| ("signature_policy", e))?),
    };
    if m.publishers.len() > 64 {
        return Err(("publishers", "at most 64 keys".into()));
    }
    let mut publishers = Vec::with_capacity(m.publishers.len());
    for p in &m.publishers {
        if publisher::key_from_hex(p).is_ok() {
            publishers.push(p.to_ascii_lowercase());
        } else if m.file.is_some() {
            // A config file's module: a key file beside the config.
            let keys = publisher::load_publishers(&[resolve(Path::new(p))])
                .map_err(|e| ("publishers", e.to_string()))?;
            publishers.extend(keys.iter().map(|k| crate::measure::hex(&k.to_bytes())));
        } else {
            return Err((
                "publishers",
                format!(
                    "{p:?} is not the hex of a raw publisher key (01 then 32 bytes): \
                     the daemon never reads a path it is handed"
                ),
            ));
        }
    }
    let detached = match &m.signature {
        None => None,
        Some(b64) => {
            use base64ct::Encoding as _;
            let d = base64ct::Base64::decode_vec(b64.trim())
                .map_err(|_| ("signature", "not base64".to_owned()))?;
            if d.is_empty() || d.len() > MAX_SIGNATURE {
                return Err(("signature", format!("1 to {MAX_SIGNATURE} bytes")));
            }
            Some(d)
        }
    };
    Ok(publisher::Signing {
        policy,
        publishers,
        detached,
    })
}

/// Most settings one module may have.
pub const MAX_SETTINGS: usize = 1024;
/// Longest setting key, in bytes.
pub const MAX_SETTING_KEY: usize = 256;
/// Most bytes of keys and values together.
pub const MAX_SETTINGS_SIZE: usize = 256 << 10;

/// Checks settings: at most [`MAX_SETTINGS`], keys of 1 to
/// [`MAX_SETTING_KEY`] bytes without control characters, all of them
/// within [`MAX_SETTINGS_SIZE`] bytes.
///
/// # Errors
///
/// What is wrong, naming the key.
pub fn check_settings(settings: &BTreeMap<String, String>) -> Result<(), String> {
    if settings.len() > MAX_SETTINGS {
        return Err(format!(
            "{} settings: at most {MAX_SETTINGS}",
            settings.len()
        ));
    }
    let mut size = 0usize;
    for (k, v) in settings {
        if k.is_empty() || k.len() > MAX_SETTING_KEY || k.chars().any(char::is_control) {
            return Err(format!(
                "invalid key {:?}: 1 to {MAX_SETTING_KEY} bytes, no control characters",
                k.chars().take(64).collect::<String>()
            ));
        }
        size += k.len() + v.len();
    }
    if size > MAX_SETTINGS_SIZE {
        return Err(format!(
            "{size} bytes of keys and values: at most {MAX_SETTINGS_SIZE}"
        ));
    }
    Ok(())
}

/// Whether `name` is a valid module name: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn valid_module_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

/// Checks one environment entry's key.
pub fn valid_env_key(key: &str) -> bool {
    !key.is_empty() && !key.contains('=') && !key.contains('\0')
}

/// Checks limits shared by the config and `edgeward run`.
///
/// # Errors
///
/// `(field, message)` for the first limit out of range.
pub fn check_limits(l: &Limits) -> Result<(), (&'static str, String)> {
    if !(64 << 10..=MAX_MODULE_MEMORY).contains(&l.max_memory) {
        return Err(("max_memory", "must be between 64KiB and 4GiB".into()));
    }
    if !(1..=10_000).contains(&l.max_instances) {
        return Err(("max_instances", "must be 1..=10000".into()));
    }
    if !(1..=10_000).contains(&l.max_tables) {
        return Err(("max_tables", "must be 1..=10000".into()));
    }
    if !(1..=64).contains(&l.max_memories) {
        return Err(("max_memories", "must be 1..=64".into()));
    }
    if !(16..=65_536).contains(&l.max_handles) {
        return Err(("max_handles", "must be 16..=65536".into()));
    }
    if !(1..=10_000_000).contains(&l.max_table_elements) {
        return Err(("max_table_elements", "must be 1..=10000000".into()));
    }
    if !(4 << 10..=1 << 30).contains(&l.max_hostcall_data) {
        return Err(("max_hostcall_data", "must be between 4KiB and 1GiB".into()));
    }
    if !(4 << 10..=1 << 40).contains(&l.max_disk) {
        return Err(("max_disk", "must be between 4KiB and 1TiB".into()));
    }
    if !(1..=10_000_000).contains(&l.max_disk_entries) {
        return Err(("max_disk_entries", "must be 1..=10000000".into()));
    }
    Ok(())
}

fn module_limits(m: &RawModuleSpec) -> Result<Limits, (&'static str, String)> {
    let d = Limits::default();
    let size = |v: &Option<String>, field: &'static str, default: u64| match v {
        None => Ok(default),
        Some(s) => parse_size(s).map_err(|e| (field, e)),
    };
    let l = Limits {
        max_memory: size(&m.max_memory, "max_memory", d.max_memory)?,
        max_instances: m.max_instances.unwrap_or(d.max_instances),
        max_memories: m.max_memories.unwrap_or(d.max_memories),
        max_handles: m.max_handles.unwrap_or(d.max_handles),
        max_tables: m.max_tables.unwrap_or(d.max_tables),
        max_table_elements: m.max_table_elements.unwrap_or(d.max_table_elements),
        max_hostcall_data: size(
            &m.max_hostcall_data,
            "max_hostcall_data",
            d.max_hostcall_data,
        )?,
        max_disk: size(&m.max_disk, "max_disk", d.max_disk)?,
        max_disk_entries: m.max_disk_entries.unwrap_or(d.max_disk_entries),
    };
    check_limits(&l)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the registry stores validates back to the same spec.
    #[test]
    fn to_raw_round_trips() {
        let raw: RawModuleSpec = toml::from_str(
            r#"
            name = "plc-bridge"
            file = "/srv/m.wasm"
            digest = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            args = ["--x"]
            env = { K = "v" }
            dirs = ["/srv/shared::/shared", "/srv/b"]
            max_memory = "16MiB"
            max_handles = 64
            max_disk = "1MiB"
            allow_outbound = ["api.example.com:443", "10.0.5.0/24:502", "[fd00::/8]:502", "[::1]:80"]
            server_names = ["{module}.{device}.example", "10.0.5.0/24"]
            timeout = "1500ms"
            restart = "always"
            "#,
        )
        .unwrap();
        let ceilings = ModuleCeilings::default();
        let id = |p: &Path| p.to_owned();
        let spec = raw.validate(&id, &ceilings).unwrap();
        let stored = spec.to_raw();
        assert_eq!(stored.max_instances, None, "defaults are not written");
        let json = serde_json::to_string(&stored).unwrap();
        let back: RawModuleSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, stored);
        let again = back.validate(&id, &ceilings).unwrap();
        assert_eq!(format!("{again:?}"), format!("{spec:?}"));
    }

    #[test]
    fn module_names() {
        assert!(valid_module_name("temperature-sensor"));
        assert!(valid_module_name("a.b_c-1"));
        assert!(!valid_module_name(""));
        assert!(!valid_module_name("-a"));
        assert!(!valid_module_name("A"));
        assert!(!valid_module_name("a/b"));
        assert!(!valid_module_name(&"a".repeat(64)));
    }
}
