//! The management API: HTTP/1.1 + JSON on a unix socket (never TCP), for
//! operators and the `edgeward` CLI.
//!
//! # Who may reach it, and what a hostile caller could try
//!
//! The socket's directory is 0750 and the socket 0660, owned by the
//! daemon's user and `[api] group`: other users cannot connect at all.
//! Those who can are identified by the kernel (SO_PEERCRED, at accept
//! time) and given a role ([`peer::Role`]): root, the daemon's own user and
//! the configured operators may change modules, readers may only read,
//! anyone else gets 403 (logged, rate-limited). A caller could try, and is
//! refused (each tested): to act without a role (403) or to write as a
//! reader (403); to hold many connections (at most
//! [`peer::CONNECTIONS_PER_UID`] per uid, [`peer::CONNECTIONS_OF_OTHERS`]
//! for every uid but root and the daemon's together); to send a huge or a slow body
//! (1 MiB and 5 s for JSON: 413, 408); malformed JSON or unknown fields
//! (400, naming the problem); names with `/` or `..` (400); to hand the
//! daemon a host path to read (`file`) or grant (`dirs`) (422: components
//! are uploaded by digest; directories are granted in the config file
//! only); a component whose bytes do not match the digest it claims (422);
//! to change a module the config file owns (409).
//!
//! Reads are answered from the registry and the module records; changes go
//! to the daemon's supervisor as [`Command`]s, one at a time, and are
//! acknowledged only once the registry has committed them.

pub mod agent;
pub mod client;
pub mod linger;
pub mod peer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path as UrlPath, Request as HttpRequest, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::components::ComponentStore;
use crate::config::ApiSettings;
use crate::daemon::records::{self, Status};
use crate::measure::{Digest, MAX_COMPONENT_SIZE};
use crate::registry::{Desired, ModuleRecord, Origin, Registry};
use crate::runtime::engine::ModuleCeilings;
use crate::runtime::loglimit::LogLimiter;
use crate::spec::{ModuleSpec, RawModuleSpec, valid_module_name};
use peer::{Peer, PeerListener, Role};

/// Environment variable naming the socket when `--socket` is absent.
pub const SOCKET_ENV: &str = "EDGEWARD_SOCKET";
/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// How long a JSON request body may take to arrive.
pub const JSON_BODY_TIME: Duration = Duration::from_secs(5);
/// How long a component upload may take to arrive.
pub const BLOB_BODY_TIME: Duration = Duration::from_secs(300);

/// The socket: `--socket`, else `$EDGEWARD_SOCKET`, else `[api] socket`,
/// else `/run/edgeward/management.sock` for root and
/// `$XDG_RUNTIME_DIR/edgeward/management.sock` for anyone else.
///
/// # Errors
///
/// None of those is set for a user without `XDG_RUNTIME_DIR`.
pub fn socket_path(flag: Option<&Path>, configured: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = flag {
        return Ok(p.to_owned());
    }
    if let Some(p) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = configured {
        return Ok(p.to_owned());
    }
    if rustix::process::getuid().is_root() {
        return Ok(PathBuf::from("/run/edgeward/management.sock"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(d) => Ok(PathBuf::from(d).join("edgeward").join("management.sock")),
        None => Err(format!(
            "no management socket: give --socket, set ${SOCKET_ENV}, set [api] socket, or set $XDG_RUNTIME_DIR"
        )),
    }
}

/// Creates the directory of the socket at `path` 0750 (with `group` as its
/// group) if it is missing, and checks an existing one is ours and not
/// writable by others. [`bind`] does it too; the daemon calls it first,
/// before Landlock closes the file system around the directory.
///
/// # Errors
///
/// The directory cannot be created, or is someone else's, or writable by
/// group or others; the message names it.
pub fn prepare_dir(path: &Path, group: Option<u32>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
            .map_err(|e| anyhow::anyhow!("cannot restrict {}: {e}", dir.display()))?;
        if let Some(g) = group {
            chown_group(dir, g)?;
        }
    }
    let meta = std::fs::metadata(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    edgeward_hsm::state::only_root_or_me(&meta).map_err(|why| {
        anyhow::anyhow!(
            "{}: {why}: refusing to put the management socket there",
            dir.display()
        )
    })
}

/// Binds the socket at `path`: its directory created 0750 if missing (an
/// existing one must be ours and not writable by others), a stale socket
/// replaced only if nothing answers on it, the socket made 0660 with
/// `group` as its group.
///
/// # Errors
///
/// Another daemon answers there, or the directory or socket cannot be set
/// up; the message names the path.
pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    prepare_dir(path, group)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{}: another daemon answers on this management socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .map_err(|e| anyhow::anyhow!("cannot remove the stale {}: {e}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| anyhow::anyhow!("cannot restrict {}: {e}", path.display()))?;
    if let Some(g) = group {
        chown_group(path, g)?;
    }
    Ok(listener)
}

fn chown_group(path: &Path, gid: u32) -> anyhow::Result<()> {
    rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(|e| {
        anyhow::anyhow!(
            "cannot give {} to group {gid} ([api] group): {e}",
            path.display()
        )
    })
}

/// A change and who asks for it: an operator (the socket) or the agent
/// (its `management` interface).
#[derive(Debug)]
pub struct Request {
    /// Who asks: the operator may change any module but the config
    /// file's; the agent only its own.
    pub by: Origin,
    /// The change.
    pub command: Command,
}

/// A change for the daemon's supervisor; the reply says how it went.
#[derive(Debug)]
pub enum Command {
    /// Register and start a new module (origin: operator).
    Add(Box<ModuleSpec>, Reply),
    /// Replace a module's spec (the new component measured and compiled
    /// before the old one stops; its registration and data kept).
    Update(Box<ModuleSpec>, Reply),
    /// Start a registered module (and keep it running).
    Start(String, Reply),
    /// Stop a module (and keep it stopped).
    Stop(String, Reply),
    /// Stop and start a module.
    Restart(String, Reply),
    /// Clear a module's backoff and crash-loop state: one waiting to start
    /// again starts now, one no longer supervised (exited, failed, refused)
    /// is started again if it should run.
    Reset(String, Reply),
    /// Stop a module and delete its registration.
    Remove(String, Reply),
    /// Reconcile the asker's modules with a deployment.
    Deploy(
        Box<CheckedDeployment>,
        oneshot::Sender<Result<Plan, ApiError>>,
    ),
}

/// The registry key of the operator's last applied deployment.
pub const DEPLOYMENT_KEY: &str = "deployment.operator";

/// The registry key of the last deployment `origin` applied.
pub fn deployment_key(origin: Origin) -> &'static str {
    match origin {
        Origin::Operator => DEPLOYMENT_KEY,
        Origin::Agent => "deployment.agent",
        Origin::Cloud => "deployment.cloud",
        Origin::Config => "deployment.config",
    }
}

/// A declarative deployment: the complete set of the operator's modules.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// The deployment's version, as its author names it.
    pub version: String,
    /// Every module it wants, each naming an uploaded component.
    #[serde(default)]
    pub modules: Vec<RawModuleSpec>,
    /// The signature policy of its modules that set none (`require`,
    /// `warn`, `off`; the device's `[signatures] policy` is the floor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_policy: Option<String>,
    /// The publishers of its modules that name none (hex of raw keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publishers: Vec<String>,
    /// For whom it is: `device:<id>`, `group:<name>` or `fleet`. A signed
    /// deployment must name it (its signature covers it); see
    /// `attest::binding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// When it expires (RFC 3339 UTC). A signed deployment must name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Set by the daemon, never by a client: the key (hex) whose
    /// signature over the manifest verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
}

/// A signed deployment manifest, as `edgeward deploy` sends it: the
/// manifest's exact text (TOML, or JSON if it starts with `{`), whose
/// modules pin their digests, and its signature (base64 of the 64 bytes of
/// `edgeward sign`). What is applied is what was signed.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest, byte for byte as signed.
    pub manifest: String,
    /// Its signature, base64 (none: an unsigned manifest).
    #[serde(default)]
    pub signature: Option<String>,
}

impl SignedManifest {
    /// The deployment the manifest describes: `version`, `[[module]]`
    /// (or `modules`), `signature_policy`, `publishers`. A module's `file`
    /// is the sender's and is dropped; its `digest` must be pinned.
    ///
    /// # Errors
    ///
    /// Malformed, or a module without a pinned digest; named.
    pub fn deployment(&self) -> Result<Deployment, String> {
        let mut doc = self.document()?;
        let obj = doc
            .as_object_mut()
            .ok_or("manifest: expected a table with `version` and `[[module]]`")?;
        if let Some(m) = obj.remove("module") {
            obj.insert("modules".into(), m);
        }
        if obj.contains_key("signed_by") {
            return Err("manifest: signed_by is set by the daemon".into());
        }
        // `version = 7` in TOML is a number; the deployment's is text.
        if let Some(v) = obj.get_mut("version")
            && v.is_number()
        {
            *v = serde_json::Value::String(v.to_string());
        }
        if let Some(mods) = obj.get_mut("modules").and_then(|m| m.as_array_mut()) {
            for m in mods {
                let Some(m) = m.as_object_mut() else { continue };
                for key in ["file", "source"] {
                    if m.remove(key).is_some() && !m.contains_key("digest") {
                        return Err(format!(
                            "manifest: module {} names a {key} without a digest: a signed manifest pins each module's digest",
                            m.get("name").unwrap_or(&serde_json::Value::Null)
                        ));
                    }
                }
            }
        }
        serde_json::from_value(doc).map_err(|e| format!("manifest: {e}"))
    }

    /// Where the manifest says each pinned component can be fetched: its
    /// modules' `source` (`oci://…`, `https://…`, or a local path), by
    /// digest. The digest, not the source, is what is trusted.
    ///
    /// # Errors
    ///
    /// Malformed, or a `source` that is not text; named.
    pub fn sources(&self) -> Result<std::collections::BTreeMap<Digest, String>, String> {
        let doc = self.document()?;
        let mut out = std::collections::BTreeMap::new();
        let mods = doc.get("module").or_else(|| doc.get("modules"));
        for m in mods.and_then(|m| m.as_array()).into_iter().flatten() {
            let Some(source) = m.get("source") else {
                continue;
            };
            let name = m.get("name").unwrap_or(&serde_json::Value::Null);
            let source = source
                .as_str()
                .filter(|s| !s.is_empty() && s.len() <= 2048 && !s.chars().any(char::is_control))
                .ok_or_else(|| format!("manifest: module {name}: source must be text"))?;
            let digest: Digest = m
                .get("digest")
                .and_then(|d| d.as_str())
                .ok_or_else(|| format!("manifest: module {name}: a source needs a digest"))?
                .parse()
                .map_err(|e| format!("manifest: module {name}: {e}"))?;
            out.insert(digest, source.to_owned());
        }
        Ok(out)
    }

    fn document(&self) -> Result<serde_json::Value, String> {
        if self.manifest.trim_start().starts_with('{') {
            serde_json::from_str(&self.manifest).map_err(|e| format!("manifest: {e}"))
        } else {
            let v: toml::Value =
                toml::from_str(&self.manifest).map_err(|e| format!("manifest: {e}"))?;
            serde_json::to_value(v).map_err(|e| format!("manifest: {e}"))
        }
    }
}

/// `PUT /v1/deployment`'s body: a deployment, or a signed manifest.
#[derive(Debug)]
pub enum DeployBody {
    /// JSON as the API has always taken it (unsigned).
    Plain(Deployment),
    /// A manifest and its signature.
    Signed(SignedManifest),
    /// A deployment whose manifest the caller has verified already (the
    /// cloud, against its deployment keys); `signed_by` is set.
    Verified(Deployment),
}

impl DeployBody {
    /// Parses either shape: an object with `manifest` is a signed one.
    ///
    /// # Errors
    ///
    /// Neither shape; named.
    pub fn parse(v: serde_json::Value) -> Result<Self, String> {
        if v.get("manifest").is_some() {
            serde_json::from_value(v).map(Self::Signed)
        } else {
            serde_json::from_value(v).map(Self::Plain)
        }
        .map_err(|e| e.to_string())
    }
}

/// A deployment whose specs were checked.
#[derive(Debug)]
pub struct CheckedDeployment {
    /// As sent.
    pub deployment: Deployment,
    /// Its specs, validated.
    pub specs: Vec<ModuleSpec>,
}

/// What applying a deployment changes (or changed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Plan {
    /// The deployment's version.
    pub version: String,
    /// Modules it adds.
    pub add: Vec<String>,
    /// Modules whose spec it changes.
    pub update: Vec<String>,
    /// Modules of the same origin it removes (not in the deployment).
    pub remove: Vec<String>,
    /// Modules it leaves as they are.
    pub unchanged: Vec<String>,
}

impl Plan {
    /// The plan for `d`, applied by `by`, against the registry's
    /// `records`: `by`'s own modules are reconciled.
    ///
    /// # Errors
    ///
    /// A name another origin owns (409, naming them all).
    pub fn of(
        d: &CheckedDeployment,
        records: &[ModuleRecord],
        by: Origin,
    ) -> Result<Self, ApiError> {
        let mut plan = Self {
            version: d.deployment.version.clone(),
            ..Self::default()
        };
        let mut conflicts = Vec::new();
        for spec in &d.specs {
            match records.iter().find(|r| r.spec.name == spec.name) {
                Some(r) if r.origin != by => {
                    conflicts.push(format!("{} ({:?})", spec.name, r.origin));
                }
                Some(r) if r.spec == spec.to_raw() => plan.unchanged.push(spec.name.clone()),
                Some(_) => plan.update.push(spec.name.clone()),
                None => plan.add.push(spec.name.clone()),
            }
        }
        if !conflicts.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "the deployment names modules another origin owns: {}",
                    conflicts.join(", ")
                ),
            ));
        }
        plan.remove = records
            .iter()
            .filter(|r| r.origin == by && !d.specs.iter().any(|s| s.name == r.spec.name))
            .map(|r| r.spec.name.clone())
            .collect();
        Ok(plan)
    }
}

/// Where a [`Command`]'s outcome goes.
pub type Reply = oneshot::Sender<Result<(), ApiError>>;

/// An error answered to the caller: a status and a message naming what was
/// wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What was wrong.
    pub message: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// Every error's body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What was wrong.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// What the daemon tells `GET /v1/system/info`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SystemInfo {
    /// edgeward's version.
    pub version: String,
    /// The wasmtime version modules run on.
    pub runtime_platform_version: String,
    /// The HSM backend.
    pub hsm_backend: String,
    /// The device id.
    pub device_id: String,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The key daemon's socket when a key daemon of its own (not one this
    /// daemon started privately) holds the HSM; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_daemon: Option<String>,
    /// The user the key daemon runs as, when it is not root or the
    /// daemon's own (`EDGEWARD_KEYD_USER`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_daemon_user: Option<String>,
}

/// `GET /v1/system/info`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SystemInfoView {
    /// The static facts.
    #[serde(flatten)]
    pub info: SystemInfo,
    /// Seconds since the daemon started.
    pub uptime_seconds: u64,
    /// How many modules.
    pub modules: ModuleCounts,
}

/// Module counts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModuleCounts {
    /// Registered.
    pub registered: usize,
    /// Running now.
    pub running: usize,
}

/// `GET /v1/health`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// One identity registration (`GET /v1/identities`): never its key.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IdentityView {
    /// The module name.
    pub name: String,
    /// Its generation id.
    pub generation_id: String,
    /// When it was registered (unix seconds).
    pub registered_at: u64,
}

/// What the handlers share.
#[derive(Debug)]
pub struct ApiState {
    /// The registry (reads).
    pub registry: Arc<Registry>,
    /// The state directory (module records).
    pub state_dir: PathBuf,
    /// The component store (uploads).
    pub components: ComponentStore,
    /// Changes go here.
    pub commands: mpsc::Sender<Request>,
    /// Who may do what.
    pub settings: ApiSettings,
    /// The daemon's own uid (an operator).
    pub daemon_uid: u32,
    /// The engine's per-module ceilings (specs are checked against them).
    pub ceilings: ModuleCeilings,
    /// What the config file lets the API, the agent and deployments grant.
    pub grants: crate::grants::Grants,
    /// Static facts.
    pub info: SystemInfo,
    /// When the daemon started.
    pub started: Instant,
    /// Refused callers are logged within this budget.
    pub refusals: LogLimiter,
    /// One component upload at a time (each may hold up to 256 MiB).
    pub uploads: tokio::sync::Semaphore,
    /// Turns true when the daemon stops (ends followed streams).
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Measures and quotes (`None`: measurement is off, or the backend
    /// has no register).
    pub attester: Option<crate::attest::Measurer>,
    /// Turns true once the boot events are measured: nothing is measured
    /// or quoted before (the API serves reads meanwhile).
    pub booted: tokio::sync::watch::Receiver<bool>,
    /// `[signatures]`: manifests are held to it.
    pub signatures: Arc<crate::attest::publisher::DeviceSignatures>,
    /// The device's groups (`[cloud] groups`): a signed deployment may be
    /// addressed to one of them.
    pub groups: Vec<String>,
}

impl ApiState {
    /// Waits until the boot events are measured (at once when the daemon
    /// has started, or stops).
    pub async fn wait_booted(&self) {
        let mut b = self.booted.clone();
        let _ = b.wait_for(|v| *v).await;
    }
}

/// The API's OpenAPI document, generated from the handlers.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    info(
        title = "edgeward management API",
        version = "1",
        description = "HTTP/1.1 + JSON on the daemon's unix socket; see docs/management-api.md"
    ),
    paths(
        health,
        system_info,
        list_modules,
        add_module,
        show_module,
        update_module,
        remove_module,
        module_action,
        module_records,
        put_blob,
        identities,
        openapi,
        put_deployment,
        get_deployment,
        deployment_plan,
        deployment_status,
        events,
        attest,
        metrics
    ),
    components(schemas(
        RawModuleSpec,
        ModuleView,
        ErrorBody,
        SystemInfoView,
        ModuleCounts,
        SystemInfo,
        Health,
        IdentityView,
        records::ExitRecord,
        records::CodeReport,
        Origin,
        Desired,
        Deployment,
        Plan,
        Drift,
        DeploymentStatus,
        AttestQuery,
        EvidenceView,
        SignedManifest,
        crate::daemon::events::Event,
        records::ModuleState
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document as served and checked in (`docs/openapi.json`).
pub fn openapi_json() -> String {
    use utoipa::OpenApi as _;
    let mut text = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "system",
    responses((status = 200, description = "This document")))]
async fn openapi() -> impl IntoResponse {
    ([("content-type", "application/json")], openapi_json())
}

/// The routes under `/v1`, behind the authorization layer.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/system/info", get(system_info))
        .route("/v1/modules", get(list_modules).post(add_module))
        .route(
            "/v1/modules/{name}",
            get(show_module).put(update_module).delete(remove_module),
        )
        .route(
            "/v1/modules/{name}/{action}",
            get(module_records).post(module_action),
        )
        .route("/v1/identities", get(identities))
        .route("/v1/deployment", get(get_deployment).put(put_deployment))
        .route("/v1/deployment/plan", get(deployment_plan))
        .route("/v1/deployment/status", get(deployment_status))
        .route("/v1/events", get(events))
        .route("/v1/attest", get(attest))
        .route("/v1/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/blobs/{digest}", put(put_blob))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        // Outermost: what a refused request still sends is read, so the
        // client reads its answer (see `linger`).
        .layer(axum::middleware::from_fn(linger::linger))
        .with_state(state)
}

/// The management API without a daemon: the registry opened read-only,
/// served on a private socket of this process (a 0700 directory under the
/// temp dir, removed on drop), so that operator commands that only read
/// (`module list`, `logs`, `exits`, `show`, `deployment`) work the same
/// with or without a daemon. Changes are refused: they need the daemon.
#[derive(Debug)]
pub struct Offline {
    /// The socket to ask.
    pub socket: PathBuf,
    dir: PathBuf,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for Offline {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Offline {
    /// Serves the records of `state_dir` (with `config`'s facts) until
    /// dropped. Call within a tokio runtime.
    ///
    /// # Errors
    ///
    /// No registry there, it cannot be opened (a daemon holds it, or it is
    /// damaged), or the private socket cannot be set up.
    pub fn start(state_dir: &Path, config: &crate::config::Config) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let registry = Registry::open_read_only(state_dir)?.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no registry: no daemon has run with this state directory",
                state_dir.display()
            )
        })?;
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random: {e}"))?;
        let dir = std::env::temp_dir().join(format!(
            "edgeward-offline-{}-{}",
            std::process::id(),
            crate::measure::hex(&nonce)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let socket = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", socket.display()))?;
        // No receiver: every change is answered 503.
        let (commands, _) = mpsc::channel(1);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let state = Arc::new(ApiState {
            registry: Arc::new(registry),
            state_dir: state_dir.to_owned(),
            components: ComponentStore::open(state_dir)?,
            commands,
            settings: ApiSettings::default(),
            daemon_uid: rustix::process::getuid().as_raw(),
            ceilings: config.runtime.ceilings,
            grants: config.grants.clone(),
            info: SystemInfo {
                version: crate::VERSION.to_owned(),
                runtime_platform_version: format!("wasmtime {}", crate::WASMTIME_VERSION),
                hsm_backend: config.hsm.backend().to_owned(),
                device_id: config.identity.device_id.clone(),
                trust_domain: config.identity.trust_domain.clone(),
                key_daemon: None,
                key_daemon_user: None,
            },
            started: Instant::now(),
            refusals: LogLimiter::new("management-api", "refused management requests"),
            uploads: tokio::sync::Semaphore::new(1),
            stop: stop.clone(),
            attester: None,
            booted: tokio::sync::watch::channel(true).1,
            signatures: Arc::default(),
            groups: Vec::new(),
        });
        let mut until = stop;
        tokio::spawn(serve(PeerListener::new(listener), state, async move {
            let _ = until.wait_for(|s| *s).await;
        }));
        Ok(Self {
            socket,
            dir,
            _stop: stop_tx,
        })
    }
}

/// Serves `router` on `listener` until `stop` resolves.
///
/// # Errors
///
/// When serving fails.
pub async fn serve(
    listener: PeerListener,
    state: Arc<ApiState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(stop)
    .await
}

/// Refuses callers without a role, and readers that would change
/// something.
async fn authorize(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: HttpRequest,
    next: Next,
) -> Response {
    let reading = matches!(*req.method(), Method::GET | Method::HEAD);
    match state.settings.role(&peer, state.daemon_uid) {
        Some(Role::Operator) => next.run(req).await,
        Some(Role::Reader) if reading => next.run(req).await,
        role => {
            crate::daemon::metrics::DAEMON
                .management_refusals
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if state.refusals.allow() {
                tracing::warn!(
                    uid = peer.uid,
                    gid = peer.gid,
                    pid = ?peer.pid,
                    method = %req.method(),
                    path = %crate::runtime::escape::escape_str(req.uri().path()),
                    "management request refused"
                );
            }
            let why = if role.is_some() {
                "readers may not change anything"
            } else {
                "this user is not an operator or reader of this daemon ([api] in its config)"
            };
            ApiError::new(StatusCode::FORBIDDEN, why).into_response()
        }
    }
}

#[utoipa::path(get, path = "/v1/metrics", tag = "system",
    responses((status = 200, description = "The daemon's and its modules' metrics in the Prometheus text format (0.0.4)", content_type = "text/plain")))]
async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let text = metrics_text(state).await?;
    Ok((
        [("content-type", crate::daemon::metrics::CONTENT_TYPE)],
        text,
    )
        .into_response())
}

/// The metrics, rendered on the blocking pool (thousands of modules take
/// milliseconds).
pub(crate) async fn metrics_text(state: Arc<ApiState>) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        crate::daemon::metrics::render(
            &state.registry,
            &state.info.version,
            state.started.elapsed(),
        )
    })
    .await
    .map_err(|e| internal(e.to_string()))?
    .map_err(internal)
}

#[utoipa::path(get, path = "/v1/health", tag = "system",
    responses((status = 200, description = "The daemon answers", body = Health)))]
async fn health() -> impl IntoResponse {
    axum::Json(Health {
        status: "ok".into(),
    })
}

#[utoipa::path(get, path = "/v1/system/info", tag = "system",
    responses((status = 200, description = "Versions, HSM backend, device, uptime, module counts", body = SystemInfoView)))]
async fn system_info(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let modules = state.registry.modules().map_err(internal)?;
    let running = modules
        .iter()
        .filter(|m| {
            records::status_of(&state.registry, &m.spec.name)
                .is_some_and(|s| s.state == records::ModuleState::Running)
        })
        .count();
    Ok(axum::Json(SystemInfoView {
        info: state.info.clone(),
        uptime_seconds: state.started.elapsed().as_secs(),
        modules: ModuleCounts {
            registered: modules.len(),
            running,
        },
    })
    .into_response())
}

/// `GET /v1/attest`'s query.
#[derive(Debug, Deserialize, utoipa::ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AttestQuery {
    /// The verifier's nonce, hex (1-64 bytes).
    #[serde(default)]
    nonce: Option<String>,
    /// A credential (`edgeward attest challenge`'s credential.bin),
    /// base64url without padding: its secret becomes the nonce.
    #[serde(default)]
    credential: Option<String>,
    /// Incremental evidence: the log from this record on (the verifier
    /// holds the earlier ones); the quote covers all.
    #[serde(default)]
    from: Option<u64>,
}

/// Evidence: each file's bytes, base64 (see `edgeward attest`).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvidenceView {
    /// File name (quote.msg, quote.sig, ak.pem, ak.pub, ek.pem, pcrs.bin,
    /// event.log, evidence.json) to its bytes, base64.
    pub files: std::collections::BTreeMap<String, String>,
}

#[utoipa::path(get, path = "/v1/attest", tag = "attestation",
    params(AttestQuery),
    responses(
        (status = 200, description = "Evidence: a quote of the measurement register over the nonce, the log, the keys", body = EvidenceView),
        (status = 400, description = "No nonce, a bad nonce or credential", body = ErrorBody),
        (status = 409, description = "Nothing is measured (measure = false, or pkcs11)", body = ErrorBody),
        (status = 422, description = "The credential is not for this device's EK and AK, or `from` is past the log's end", body = ErrorBody)))]
async fn attest(
    State(state): State<Arc<ApiState>>,
    query: Result<axum::extract::Query<AttestQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) = query.map_err(invalid_query)?;
    let (nonce, credential) = attest_input(q.nonce.as_deref(), q.credential.as_deref())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    match evidence(&state, nonce, credential, q.from.unwrap_or(0)).await {
        Ok(files) => Ok(axum::Json(EvidenceView { files }).into_response()),
        Err(Evidence::NotMeasured) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "this daemon measures nothing ([runtime] measure = false, or the pkcs11 backend): there is nothing to attest",
        )),
        Err(Evidence::Failed(e)) => {
            let status = if e.contains("credential") || e.starts_with("from:") {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            Err(ApiError::new(status, e))
        }
    }
}

/// What a verifier asks evidence for: exactly one of a nonce (hex, 1-64
/// bytes) and a credential (`edgeward attest challenge`'s, base64url
/// without padding; its secret becomes the nonce). Read the same from the
/// API and from the broker.
///
/// # Errors
///
/// Neither or both, or either malformed; named.
pub(crate) fn attest_input(
    nonce: Option<&str>,
    credential: Option<&str>,
) -> Result<(Vec<u8>, Option<crate::attest::evidence::CredentialFile>), String> {
    use base64ct::Encoding as _;
    match (nonce, credential) {
        (Some(n), None) => Ok((parse_nonce(n)?, None)),
        (None, Some(c)) => {
            let bytes = base64ct::Base64UrlUnpadded::decode_vec(c)
                .map_err(|_| "credential: not base64url without padding".to_owned())?;
            let c = crate::attest::evidence::CredentialFile::parse(&bytes)
                .map_err(|e| format!("credential: {e}"))?;
            Ok((Vec::new(), Some(c)))
        }
        _ => Err("give exactly one of nonce and credential".into()),
    }
}

/// Why there is no evidence.
#[derive(Debug)]
pub(crate) enum Evidence {
    /// Nothing is measured ([runtime] measure = false, or pkcs11).
    NotMeasured,
    /// The quote or the credential failed; named.
    Failed(String),
}

/// Evidence over `nonce` (or the credential's secret), once the boot
/// events are measured: each file's bytes, base64, by name.
pub(crate) async fn evidence(
    state: &ApiState,
    nonce: Vec<u8>,
    credential: Option<crate::attest::evidence::CredentialFile>,
    from: u64,
) -> Result<std::collections::BTreeMap<String, String>, Evidence> {
    use base64ct::Encoding as _;
    state.wait_booted().await;
    let m = state.attester.clone().ok_or(Evidence::NotMeasured)?;
    let device = state.info.device_id.clone();
    let files =
        tokio::task::spawn_blocking(move || m.attest(&device, &nonce, credential.as_ref(), from))
            .await
            .map_err(|e| Evidence::Failed(format!("the quote task failed: {e}")))?
            .map_err(Evidence::Failed)?;
    Ok(files
        .into_iter()
        .map(|(n, b)| (n.to_owned(), base64ct::Base64::encode_string(&b)))
        .collect())
}

/// A nonce in hex: 1-64 bytes.
///
/// # Errors
///
/// Not hex, or out of range; named.
pub fn parse_nonce(hex: &str) -> Result<Vec<u8>, String> {
    let b = crate::attest::eventlog::hex_decode(hex)
        .ok_or_else(|| "nonce: not hex (two digits per byte)".to_owned())?;
    if b.is_empty() || b.len() > crate::hsm::MAX_NONCE {
        return Err(format!(
            "nonce: {} bytes; 1-{} are accepted",
            b.len(),
            crate::hsm::MAX_NONCE
        ));
    }
    Ok(b)
}

fn invalid_query(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, format!("invalid query: {e}"))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "management request failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// A module as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModuleView {
    name: String,
    origin: Origin,
    desired: Desired,
    /// `running`, `stopped`, `refused`, ..., or `registered` before its
    /// first start.
    state: String,
    digest: String,
    starts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_exit: Option<records::ExitRecord>,
    /// Where its code came from (`cache`, `compiled`, `recompiled`) and how
    /// long reading, loading and instantiating took.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<records::CodeReport>,
    /// The registered spec (`GET /v1/modules/{name}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<RawModuleSpec>,
}

impl ModuleView {
    /// Whether its state is not what the registry wants.
    fn drifts(&self) -> bool {
        match self.desired {
            Desired::Running => self.state != "running",
            Desired::Stopped => self.state == "running",
        }
    }
}

/// Every registered module, as the API shows it.
pub(crate) fn all_views(state: &ApiState) -> Result<Vec<ModuleView>, ApiError> {
    Ok(state
        .registry
        .modules()
        .map_err(internal)?
        .iter()
        .map(|m| {
            view(
                m,
                records::status_of(&state.registry, &m.spec.name).as_ref(),
            )
        })
        .collect())
}

/// A unit enum (`state`, `origin`, `desired`) by its JSON name.
pub(crate) fn json_name(v: impl Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn view(record: &ModuleRecord, status: Option<&Status>) -> ModuleView {
    ModuleView {
        name: record.spec.name.clone(),
        origin: record.origin,
        desired: record.desired,
        state: status.map_or_else(|| "registered".to_owned(), |s| json_name(s.state)),
        digest: record.spec.digest.clone(),
        starts: status.map_or(0, |s| s.starts),
        reason: status.and_then(|s| s.reason.clone()),
        last_exit: status.and_then(|s| s.last_exit.clone()),
        code: status.and_then(|s| s.code.clone()),
        spec: None,
    }
}

#[utoipa::path(get, path = "/v1/modules", tag = "modules",
    responses((status = 200, description = "Every registered module", body = [ModuleView])))]
async fn list_modules(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    Ok(axum::Json(all_views(&state)?).into_response())
}

fn checked_name(name: &str) -> Result<(), ApiError> {
    if valid_module_name(name) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid module name {:?}: use 1-63 of a-z 0-9 . _ - starting with a letter or digit",
                crate::runtime::escape::escape_str(&name.chars().take(80).collect::<String>())
            ),
        ))
    }
}

fn record_of(state: &ApiState, name: &str) -> Result<ModuleRecord, ApiError> {
    checked_name(name)?;
    state
        .registry
        .module(name)
        .map_err(internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no module {name:?}")))
}

#[utoipa::path(get, path = "/v1/modules/{name}", tag = "modules",
    params(("name" = String, Path, description = "Module name")),
    responses(
        (status = 200, description = "The module, with its registered spec", body = ModuleView),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such module", body = ErrorBody)))]
async fn show_module(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, ApiError> {
    let record = record_of(&state, &name)?;
    let mut v = view(&record, records::status_of(&state.registry, &name).as_ref());
    v.spec = Some(record.spec);
    Ok(axum::Json(v).into_response())
}

/// Reads a JSON body within [`MAX_JSON_BODY`] and [`JSON_BODY_TIME`].
async fn json_body<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = tokio::time::timeout(JSON_BODY_TIME, axum::body::to_bytes(body, MAX_JSON_BODY))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {JSON_BODY_TIME:?}"),
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_JSON_BODY} bytes or unreadable: {e}"),
            )
        })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// Sends `command` as `by` and waits for its outcome.
pub(crate) async fn ask_as<T>(
    state: &ApiState,
    by: Origin,
    command: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Command,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    let stopping = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no daemon runs (or it is stopping): changes need a running daemon",
        )
    };
    state
        .commands
        .send(Request {
            by,
            command: command(tx),
        })
        .await
        .map_err(|_| stopping())?;
    rx.await.map_err(|_| stopping())?
}

/// Sends `command` as the operator.
async fn ask(state: &ApiState, command: impl FnOnce(Reply) -> Command) -> Result<(), ApiError> {
    ask_as(state, Origin::Operator, command).await
}

/// A spec from a request body, checked as the API requires: no host paths,
/// valid against the engine's ceilings, its component uploaded.
async fn api_spec(state: &ApiState, body: Body) -> Result<ModuleSpec, ApiError> {
    check_raw(state, json_body(body).await?)
}

fn check_raw(state: &ApiState, raw: RawModuleSpec) -> Result<ModuleSpec, ApiError> {
    checked_name(&raw.name)?;
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    if raw.file.is_some() {
        return Err(unprocessable(
            "file: the management API does not read host paths; upload the component with PUT /v1/blobs/{digest} and name its digest".into(),
        ));
    }
    if !raw.dirs.is_empty() {
        return Err(unprocessable(
            "dirs: host directories are granted in the config file only".into(),
        ));
    }
    let spec = raw
        .validate(&|p: &Path| p.to_owned(), &state.ceilings)
        .map_err(|e| unprocessable(e.to_string()))?;
    state
        .grants
        .check(&spec)
        .map_err(|e| unprocessable(format!("module {:?}: {e}", spec.name)))?;
    if !state.components.contains(&spec.digest) {
        return Err(unprocessable(format!(
            "component {} has not been uploaded (PUT /v1/blobs/{})",
            spec.digest, spec.digest
        )));
    }
    Ok(spec)
}

fn current_view(state: &ApiState, name: &str) -> Result<ModuleView, ApiError> {
    let record = record_of(state, name)?;
    Ok(view(
        &record,
        records::status_of(&state.registry, name).as_ref(),
    ))
}

#[utoipa::path(post, path = "/v1/modules", tag = "modules",
    request_body(content = RawModuleSpec, description = "The spec; `digest` names an uploaded component; no `file` or `dirs`"),
    responses(
        (status = 201, description = "Started and registered", body = ModuleView),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 409, description = "A module of that name exists", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "Invalid spec, component not uploaded, or refused", body = ErrorBody)))]
async fn add_module(State(state): State<Arc<ApiState>>, body: Body) -> Result<Response, ApiError> {
    let spec = api_spec(&state, body).await?;
    let name = spec.name.clone();
    ask(&state, |r| Command::Add(Box::new(spec), r)).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(current_view(&state, &name)?),
    )
        .into_response())
}

#[utoipa::path(put, path = "/v1/modules/{name}", tag = "modules",
    params(("name" = String, Path, description = "Module name")),
    request_body(content = RawModuleSpec, description = "The new spec"),
    responses(
        (status = 200, description = "Updated", body = ModuleView),
        (status = 400, description = "Malformed body or name", body = ErrorBody),
        (status = 404, description = "No such module", body = ErrorBody),
        (status = 409, description = "Owned by the config file", body = ErrorBody),
        (status = 422, description = "Invalid spec or refused (the old version keeps running)", body = ErrorBody)))]
async fn update_module(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    body: Body,
) -> Result<Response, ApiError> {
    checked_name(&name)?;
    let spec = api_spec(&state, body).await?;
    if spec.name != name {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the spec names {:?}, the path {name:?}", spec.name),
        ));
    }
    ask(&state, |r| Command::Update(Box::new(spec), r)).await?;
    Ok(axum::Json(current_view(&state, &name)?).into_response())
}

#[utoipa::path(post, path = "/v1/modules/{name}/{action}", tag = "modules",
    params(("name" = String, Path, description = "Module name"),
           ("action" = String, Path, description = "start, stop, restart, or reset (clears backoff and a crash loop)")),
    responses(
        (status = 200, description = "Done", body = ModuleView),
        (status = 404, description = "No such module or action", body = ErrorBody),
        (status = 422, description = "Refused", body = ErrorBody)))]
async fn module_action(
    State(state): State<Arc<ApiState>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    checked_name(&name)?;
    let n = name.clone();
    match action.as_str() {
        "start" => ask(&state, |r| Command::Start(n, r)).await?,
        "stop" => ask(&state, |r| Command::Stop(n, r)).await?,
        "restart" => ask(&state, |r| Command::Restart(n, r)).await?,
        "reset" => ask(&state, |r| Command::Reset(n, r)).await?,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no such action: start, stop, restart or reset",
            ));
        }
    }
    Ok(axum::Json(current_view(&state, &name)?).into_response())
}

/// `?dry-run=true` for a deployment.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployQuery {
    #[serde(rename = "dry-run", default)]
    dry_run: bool,
}

#[utoipa::path(put, path = "/v1/deployment", tag = "deployment",
    params(("dry-run" = Option<bool>, Query, description = "Only return the plan")),
    request_body(content = Deployment, description = "The complete set of the operator's modules; or a SignedManifest (`manifest`, `signature`)"),
    responses(
        (status = 200, description = "The plan (applied unless dry-run)", body = Plan),
        (status = 400, description = "Malformed body, query or duplicate names", body = ErrorBody),
        (status = 409, description = "Names another origin owns", body = ErrorBody),
        (status = 422, description = "An invalid spec, a component not uploaded, or a change refused", body = ErrorBody)))]
async fn put_deployment(
    State(state): State<Arc<ApiState>>,
    query: Result<axum::extract::Query<DeployQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let query = query.map_err(invalid_query)?;
    let body: serde_json::Value = json_body(body).await?;
    let body = DeployBody::parse(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?;
    let plan = deploy_as(&state, Origin::Operator, body, query.dry_run).await?;
    Ok(axum::Json(plan).into_response())
}

/// Checks `deployment`'s specs and, unless `dry_run`, has the daemon
/// reconcile `by`'s modules with it; returns the plan.
pub(crate) async fn deploy_as(
    state: &ApiState,
    by: Origin,
    body: DeployBody,
    dry_run: bool,
) -> Result<Plan, ApiError> {
    let mut deployment = manifest_checked(state, by, body).await?;
    let v = &deployment.version;
    if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "version: 1 to 128 characters, none of them control characters",
        ));
    }
    // The deployment's signature defaults, for modules that set none.
    for m in &mut deployment.modules {
        if m.signature_policy.is_none() {
            m.signature_policy.clone_from(&deployment.signature_policy);
        }
        if m.publishers.is_empty() {
            m.publishers.clone_from(&deployment.publishers);
        }
    }
    let mut specs = Vec::with_capacity(deployment.modules.len());
    for raw in deployment.modules.iter().cloned() {
        if specs.iter().any(|s: &ModuleSpec| s.name == raw.name) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("module {:?} appears twice", raw.name),
            ));
        }
        specs.push(check_raw(state, raw)?);
    }
    let checked = CheckedDeployment { deployment, specs };
    if dry_run {
        let records = state.registry.modules().map_err(internal)?;
        return Plan::of(&checked, &records, by);
    }
    ask_as(state, by, |r| Command::Deploy(Box::new(checked), r)).await
}

/// The deployment a body carries, held to `[signatures] manifests`: a
/// signed manifest whose signature verifies says who signed it; an
/// unsigned or badly signed one is refused under `require` (the refusal
/// measured), logged under `warn`.
async fn manifest_checked(
    state: &ApiState,
    by: Origin,
    body: DeployBody,
) -> Result<Deployment, ApiError> {
    use crate::attest::publisher::{self, Policy};
    let policy = state.signatures.manifests;
    let (mut deployment, verdict, digest) = match body {
        DeployBody::Plain(d) => (
            d,
            Err(publisher::SignatureError::Unsigned(
                "no signature came with it (send the manifest signed: edgeward deploy MANIFEST with MANIFEST.sig or --signature)".into(),
            )),
            None,
        ),
        DeployBody::Verified(d) => return Ok(d),
        DeployBody::Signed(m) => {
            let d = m
                .deployment()
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
            let sig = match &m.signature {
                None => None,
                Some(b64) => {
                    use base64ct::Encoding as _;
                    Some(base64ct::Base64::decode_vec(b64.trim()).map_err(|_| {
                        ApiError::new(StatusCode::BAD_REQUEST, "signature: not base64")
                    })?)
                }
            };
            let verdict = publisher::verify_manifest(
                m.manifest.as_bytes(),
                sig.as_deref(),
                &state.signatures.deployment_keys,
            )
            .and_then(|key| {
                bound_here(state, by, &d)
                    .map(|()| key)
                    .map_err(publisher::SignatureError::Unbound)
            });
            (d, verdict, Some(Digest::of(m.manifest.as_bytes())))
        }
    };
    deployment.signed_by = None;
    match verdict {
        Ok(key) => deployment.signed_by = Some(key),
        Err(e) if policy == Policy::Require => {
            let reason = format!("the deployment manifest is refused: {e}");
            state.wait_booted().await;
            if let Some(m) = &state.attester {
                m.record(serde_json::json!({
                    "kind": "signature-refused",
                    "manifest": digest.map(|d| d.to_string()),
                    "origin": by,
                    "version": deployment.version,
                    "reason": e.to_string(),
                }))
                .await;
            }
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, reason));
        }
        Err(e) if policy == Policy::Warn => {
            tracing::warn!(by = ?by, reason = %e, "deployment manifest not verified (policy warn): applying it");
        }
        Err(_) => {}
    }
    Ok(deployment)
}

/// A signed deployment through the API is bound as one from the broker
/// is: addressed to this device (or a group of it, or the fleet),
/// unexpired, and no replay: its version a counter above the last signed
/// deployment `by` applied (the same version only with the same contents,
/// as the agent sends its manifest again).
fn bound_here(state: &ApiState, by: Origin, d: &Deployment) -> Result<(), String> {
    use crate::attest::binding;
    binding::check(
        d,
        binding::Audience {
            device_id: &state.info.device_id,
            groups: &state.groups,
        },
        binding::Via::Local,
        binding::now(),
    )?;
    let version = crate::cloud::desired::parse_version(&d.version).ok_or_else(|| {
        format!(
            "version {:?}: a signed deployment's version is a decimal counter (1 to 18446744073709551615), raised with each deployment",
            d.version
        )
    })?;
    let last = state
        .registry
        .meta(deployment_key(by))
        .map_err(|e| format!("the last deployment cannot be read: {e}"))?
        .and_then(|b| serde_json::from_slice::<Deployment>(&b).ok())
        .filter(|l| l.signed_by.is_some());
    if let Some(last) = last
        && let Some(lv) = crate::cloud::desired::parse_version(&last.version)
    {
        let same = || {
            let mut a = last.clone();
            a.signed_by = None;
            serde_json::to_value(&a).ok() == serde_json::to_value(d).ok()
        };
        if version < lv || (version == lv && !same()) {
            return Err(format!(
                "version {version} is not newer than the signed deployment {lv} applied before (an older or replayed deployment)"
            ));
        }
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/deployment", tag = "deployment",
    responses(
        (status = 200, description = "The last deployment applied", body = Deployment),
        (status = 404, description = "None applied", body = ErrorBody)))]
async fn get_deployment(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let bytes = state
        .registry
        .meta(DEPLOYMENT_KEY)
        .map_err(internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no deployment has been applied"))?;
    let d: Deployment = serde_json::from_slice(&bytes).map_err(internal)?;
    Ok(axum::Json(d).into_response())
}

/// One module whose state is not what the registry wants.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Drift {
    /// The module.
    pub name: String,
    /// What the registry wants.
    pub desired: Desired,
    /// What it is.
    pub state: String,
}

#[utoipa::path(get, path = "/v1/deployment/plan", tag = "deployment",
    responses((status = 200, description = "Modules whose state differs from what the registry wants", body = [Drift])))]
async fn deployment_plan(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let drift: Vec<Drift> = all_views(&state)?
        .into_iter()
        .filter(ModuleView::drifts)
        .map(|v| Drift {
            name: v.name,
            desired: v.desired,
            state: v.state,
        })
        .collect();
    Ok(axum::Json(drift).into_response())
}

/// `GET /v1/deployment/status`: the operator's deployment and how far the
/// device has got with it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeploymentStatus {
    /// The version of the last deployment applied (none: never).
    pub version: Option<String>,
    /// True when every registered module is in the state the registry
    /// wants (running or stopped).
    pub converged: bool,
    /// Modules by origin: `config`, `operator`, `agent`.
    pub origins: std::collections::BTreeMap<String, usize>,
    /// Every registered module.
    pub modules: Vec<ModuleView>,
}

#[utoipa::path(get, path = "/v1/deployment/status", tag = "deployment",
    responses((status = 200, description = "The last deployment's version, whether the device has converged on it, and every module", body = DeploymentStatus)))]
async fn deployment_status(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let version = match state.registry.meta(DEPLOYMENT_KEY).map_err(internal)? {
        Some(bytes) => Some(
            serde_json::from_slice::<Deployment>(&bytes)
                .map_err(internal)?
                .version,
        ),
        None => None,
    };
    let modules = all_views(&state)?;
    let mut origins = std::collections::BTreeMap::new();
    for m in &modules {
        *origins.entry(json_name(m.origin)).or_insert(0) += 1;
    }
    Ok(axum::Json(DeploymentStatus {
        version,
        converged: !modules.iter().any(ModuleView::drifts),
        origins,
        modules,
    })
    .into_response())
}

/// `?follow=true` for events.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    follow: bool,
}

/// A response body fed from a channel: each item one chunk.
struct ChannelBody(mpsc::Receiver<axum::body::Bytes>);

impl http_body::Body for ChannelBody {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
    }
}

fn event_line(e: &crate::daemon::events::Event) -> axum::body::Bytes {
    let mut line = serde_json::to_vec(e).unwrap_or_default();
    line.push(b'\n');
    line.into()
}

#[utoipa::path(get, path = "/v1/events", tag = "system",
    params(("follow" = Option<bool>, Query, description = "Keep the response open and stream what follows")),
    responses(
        (status = 200, description = "JSON lines, oldest first: the last 256 events (state changes, exits), then, with follow, each new one", body = [crate::daemon::events::Event]),
        (status = 400, description = "Invalid query", body = ErrorBody)))]
async fn events(
    State(state): State<Arc<ApiState>>,
    query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let mut stop = state.stop.clone();
    let query = query.map_err(invalid_query)?;
    let (backlog, mut live) = crate::daemon::events::subscribe();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        for e in &backlog {
            if tx.send(event_line(e)).await.is_err() {
                return;
            }
        }
        if !query.follow {
            return;
        }
        loop {
            let next = tokio::select! {
                next = live.recv() => next,
                _ = stop.wait_for(|s| *s) => return,
            };
            let line = match next {
                Ok(e) => event_line(&e),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    format!("{{\"kind\":\"lagged\",\"missed\":{n}}}\n").into()
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            // The follower went away (or stopped reading for good).
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    Ok((
        [("content-type", "application/x-ndjson")],
        Body::new(ChannelBody(rx)),
    )
        .into_response())
}

/// `?tail=N` for logs.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    tail: Option<usize>,
    since: Option<String>,
    until: Option<String>,
    #[serde(default)]
    follow: bool,
    /// Each line with the time it was written (the default).
    timestamps: Option<bool>,
}

/// An RFC 3339 time as the logs write it (UTC, milliseconds), so lines
/// compare with it as text.
fn log_time(v: &str, field: &str) -> Result<String, ApiError> {
    let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{field}: not an RFC 3339 time: {e}"),
            )
        })?;
    let since_epoch = u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map(std::time::Duration::from_millis)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("{field}: before 1970")))?;
    Ok(crate::runtime::logfile::rfc3339(since_epoch))
}

/// A log line without the time it starts with.
fn without_time(line: &str) -> &str {
    line.split_once(' ').map_or(line, |(_, rest)| rest)
}

/// `GET /v1/modules/{name}/exits` (JSON records, oldest first) and
/// `GET /v1/modules/{name}/logs?tail=N` (its output, escaped when written).
#[utoipa::path(get, path = "/v1/modules/{name}/{record}", tag = "modules",
    params(("name" = String, Path, description = "Module name"),
           ("record" = String, Path, description = "logs or exits"),
           ("tail" = Option<usize>, Query, description = "logs: only the last N lines"),
           ("since" = Option<String>, Query, description = "logs: lines at or after this RFC 3339 time"),
           ("until" = Option<String>, Query, description = "logs: lines before this RFC 3339 time"),
           ("follow" = Option<bool>, Query, description = "logs: keep the response open and stream what is appended"),
           ("timestamps" = Option<bool>, Query, description = "logs: each line starts with its RFC 3339 time (default true)")),
    responses(
        (status = 200, description = "logs: text/plain; exits: the exit records", body = [records::ExitRecord]),
        (status = 400, description = "Invalid name or query", body = ErrorBody),
        (status = 404, description = "No such module or record", body = ErrorBody)))]
async fn module_records(
    State(state): State<Arc<ApiState>>,
    UrlPath((name, what)): UrlPath<(String, String)>,
    query: Result<axum::extract::Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query.map_err(invalid_query)?;
    record_of(&state, &name)?;
    let log = match what.as_str() {
        "exits" => records::exits_log(&state.state_dir, &name),
        "logs" => records::output_log(&state.state_dir, &name),
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no such record: exits or logs",
            ));
        }
    };
    let text = tokio::task::spawn_blocking(move || log.read_all())
        .await
        .map_err(internal)?;
    let text = String::from_utf8_lossy(&text);
    if what == "exits" {
        let exits: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        return Ok(axum::Json(exits).into_response());
    }
    let since = query
        .since
        .as_deref()
        .map(|v| log_time(v, "since"))
        .transpose()?;
    let until = query
        .until
        .as_deref()
        .map(|v| log_time(v, "until"))
        .transpose()?;
    if query.follow && until.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "until and follow do not go together",
        ));
    }
    // Each line starts with its time: `since` and `until` compare as text.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| since.as_deref().is_none_or(|s| *l >= s))
        .filter(|l| until.as_deref().is_none_or(|u| *l < u))
        .collect();
    let from = query.tail.map_or(0, |n| lines.len().saturating_sub(n));
    let times = query.timestamps.unwrap_or(true);
    let mut out = String::new();
    for l in &lines[from..] {
        out.push_str(if times { l } else { without_time(l) });
        out.push('\n');
    }
    if !query.follow {
        return Ok(([("content-type", "text/plain; charset=utf-8")], out).into_response());
    }
    // Then what is appended: the current file is read from where it ended,
    // every 200 ms (from its start again when it was rotated).
    let path = records::output_log(&state.state_dir, &name)
        .path()
        .to_owned();
    let mut offset = std::fs::metadata(&path).map_or(0, |m| m.len());
    let (tx, rx) = mpsc::channel(64);
    let mut stop = state.stop.clone();
    tokio::spawn(async move {
        if tx.send(out.into()).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let len = std::fs::metadata(&path).map_or(0, |m| m.len());
            if len < offset {
                offset = 0;
            }
            if len == offset {
                if tx.is_closed() {
                    return;
                }
                continue;
            }
            let chunk = {
                use std::io::{Read as _, Seek as _};
                let mut buf = Vec::new();
                let read = std::fs::File::open(&path).and_then(|mut f| {
                    f.seek(std::io::SeekFrom::Start(offset))?;
                    f.take(1 << 20).read_to_end(&mut buf)
                });
                // Whole lines only: the rest is read again next time.
                match read {
                    Ok(_) => {
                        let whole = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                        buf.truncate(whole);
                        offset += whole as u64;
                        if times {
                            buf
                        } else {
                            let mut out = Vec::with_capacity(buf.len());
                            for l in buf.split_inclusive(|&b| b == b'\n') {
                                let cut = l.iter().position(|&b| b == b' ').map_or(0, |i| i + 1);
                                out.extend_from_slice(&l[cut..]);
                            }
                            out
                        }
                    }
                    Err(_) => continue,
                }
            };
            if chunk.is_empty() {
                continue;
            }
            if tx.send(chunk.into()).await.is_err() {
                return;
            }
        }
    });
    Ok((
        [("content-type", "text/plain; charset=utf-8")],
        Body::new(ChannelBody(rx)),
    )
        .into_response())
}

/// `GET /v1/identities`: every identity registration (name, generation,
/// when), never a key.
#[utoipa::path(get, path = "/v1/identities", tag = "identities",
    responses((status = 200, description = "Every identity registration", body = [IdentityView])))]
async fn identities(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let mut out = Vec::new();
    for name in state.registry.names().map_err(internal)? {
        if let Some(r) = state.registry.registration(&name).map_err(internal)? {
            out.push(IdentityView {
                name,
                generation_id: r.generation_id,
                registered_at: r.registered_at,
            });
        }
    }
    Ok(axum::Json(out).into_response())
}

#[utoipa::path(delete, path = "/v1/modules/{name}", tag = "modules",
    params(("name" = String, Path, description = "Module name")),
    responses(
        (status = 204, description = "Stopped and deleted with its identity registration"),
        (status = 404, description = "No such module", body = ErrorBody),
        (status = 409, description = "Owned by the config file", body = ErrorBody)))]
async fn remove_module(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, ApiError> {
    checked_name(&name)?;
    ask(&state, |r| Command::Remove(name, r)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /v1/blobs/{digest}`: a component, read within its size and time
/// limits, hashed, and stored only if it hashes to `digest`.
#[utoipa::path(put, path = "/v1/blobs/{digest}", tag = "components",
    params(("digest" = String, Path, description = "sha256:<64 hex>")),
    request_body(content = String, content_type = "application/octet-stream", description = "The component's bytes (at most 256 MiB)"),
    responses(
        (status = 200, description = "Already stored"),
        (status = 201, description = "Stored"),
        (status = 400, description = "Invalid digest", body = ErrorBody),
        (status = 413, description = "Over 256 MiB", body = ErrorBody),
        (status = 422, description = "The bytes hash to another digest", body = ErrorBody)))]
async fn put_blob(
    State(state): State<Arc<ApiState>>,
    UrlPath(digest): UrlPath<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let digest: Digest = digest
        .parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid digest: {e}")))?;
    if state.components.contains(&digest) {
        return Ok(StatusCode::OK.into_response());
    }
    let _one_at_a_time = state.uploads.acquire().await.map_err(internal)?;
    let bytes = tokio::time::timeout(
        BLOB_BODY_TIME,
        axum::body::to_bytes(
            body,
            usize::try_from(MAX_COMPONENT_SIZE).unwrap_or(usize::MAX),
        ),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the component did not arrive within {BLOB_BODY_TIME:?}"),
        )
    })?
    .map_err(|e| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "component over the {} MiB limit or unreadable: {e}",
                MAX_COMPONENT_SIZE >> 20
            ),
        )
    })?;
    let actual = Digest::of(&bytes);
    if actual != digest {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the upload hashes to {actual}, not {digest}"),
        ));
    }
    let store = state.components.clone();
    let quota = state.grants.components_quota;
    tokio::task::spawn_blocking(move || {
        store
            .admit(&digest, bytes.len() as u64, quota)
            .map_err(|e| ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e))?;
        store.put_bytes(&digest, &bytes).map_err(internal)
    })
    .await
    .map_err(internal)??;
    Ok(StatusCode::CREATED.into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_signed_manifest_is_read_as_signed() {
        let d = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let m = super::SignedManifest {
            manifest: format!(
                "version = 7\nsignature_policy = \"require\"\n[[module]]\nname = \"a\"\nfile = \"a.wasm\"\ndigest = \"{d}\"\n"
            ),
            signature: None,
        };
        let dep = m.deployment().unwrap();
        assert_eq!(dep.version, "7", "a TOML number is the version's text");
        assert_eq!(dep.modules[0].file, None, "the sender's path is dropped");
        assert_eq!(dep.modules[0].digest, d);
        assert_eq!(dep.signature_policy.as_deref(), Some("require"));
        // Unpinned, self-signed or malformed: refused by name.
        for (text, says) in [
            (
                "version = \"1\"\n[[module]]\nname = \"a\"\nfile = \"a.wasm\"\n",
                "without a digest",
            ),
            ("version = \"1\"\nsigned_by = \"00\"\n", "set by the daemon"),
            ("version = ", "manifest:"),
            ("[1, 2]", "manifest:"),
        ] {
            let m = super::SignedManifest {
                manifest: text.into(),
                signature: None,
            };
            let e = m.deployment().unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    /// The checked-in document is the one the code generates. Regenerate it
    /// with `EDGEWARD_UPDATE_OPENAPI=1 cargo test -p edgeward --lib openapi`.
    #[test]
    fn the_checked_in_openapi_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let generated = super::openapi_json();
        if std::env::var_os("EDGEWARD_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/openapi.json is out of date: EDGEWARD_UPDATE_OPENAPI=1 cargo test -p edgeward --lib openapi"
        );
        let v: serde_json::Value = serde_json::from_str(&generated).unwrap();
        for route in [
            "/v1/health",
            "/v1/system/info",
            "/v1/modules",
            "/v1/modules/{name}",
            "/v1/modules/{name}/{action}",
            "/v1/blobs/{digest}",
            "/v1/identities",
            "/v1/deployment",
            "/v1/deployment/plan",
            "/v1/openapi.json",
            "/v1/events",
        ] {
            assert!(v["paths"][route].is_object(), "{route} missing");
        }
    }
}
