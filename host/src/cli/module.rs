//! `edgeward module ...`: the operator's commands, through the daemon's
//! management socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{fail, optional_config, parse_env, parse_settings};
use crate::api::client::{Answer, request};
use crate::measure::{Digest, Measured};

/// `edgeward module`.
#[derive(Debug, clap::Args)]
pub(super) struct ModuleArgs {
    /// The management socket. Default: $EDGEWARD_SOCKET, then the config's
    /// [api] socket, then /run/edgeward/management.sock (root) or
    /// $XDG_RUNTIME_DIR/edgeward/management.sock.
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Config file (for its [api] socket).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: ModuleCommand,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
enum ModuleCommand {
    /// List the registered modules: name, state, origin, digest.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show one module: its state, last exit and registered spec (JSON).
    Show {
        /// The module.
        name: String,
    },
    /// Upload a component and register and start it as module NAME. Without
    /// --digest, the file's digest now is pinned (and printed).
    Add(AddArgs),
    /// Upload a new component for module NAME and switch it over (the new
    /// one is measured and compiled before the old one stops; its
    /// registration and data are kept). The rest of its spec is unchanged.
    Update {
        /// The module.
        name: String,
        /// The new component file.
        file: PathBuf,
        /// Refuse unless the file's digest is exactly this.
        #[arg(long, value_name = "sha256:HEX")]
        digest: Option<Digest>,
    },
    /// Start a registered module (and keep it running across restarts).
    Start {
        /// The module.
        name: String,
    },
    /// Stop a module (and keep it stopped across restarts).
    Stop {
        /// The module.
        name: String,
    },
    /// Stop and start a module.
    Restart {
        /// The module.
        name: String,
    },
    /// Clear a module's backoff and crash-loop state: it starts now if it
    /// was waiting to, or again if it had exited or failed.
    Reset {
        /// The module.
        name: String,
    },
    /// Print a module's recorded output (oldest first).
    Logs {
        /// The module.
        name: String,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Only lines at or after this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only lines before this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Keep printing what the module writes.
        #[arg(short, long)]
        follow: bool,
        /// Leave out the time each line starts with.
        #[arg(long)]
        no_timestamps: bool,
    },
    /// Print a module's exit records (JSON lines, oldest first).
    Exits {
        /// The module.
        name: String,
    },
    /// Stop a module and delete its registration: data it sealed can no
    /// longer be opened.
    Remove {
        /// The module.
        name: String,
    },
}

#[derive(Debug, clap::Args)]
struct AddArgs {
    /// The module's name.
    name: String,
    /// The component file (read here and uploaded: the daemon never reads a
    /// path it is handed).
    file: PathBuf,
    /// Refuse unless the file's digest is exactly this (sha256:HEX).
    #[arg(long, value_name = "sha256:HEX")]
    digest: Option<Digest>,
    /// An argument after the program name (repeatable).
    #[arg(long = "arg", value_name = "ARG")]
    args: Vec<String>,
    /// An environment variable K=V (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// A setting K=V it reads through wasi:config/store (repeatable).
    #[arg(long = "setting", value_name = "K=V")]
    settings: Vec<String>,
    /// An outbound destination HOST:PORT, IP:PORT or CIDR:PORT (repeatable).
    #[arg(long = "allow-outbound", value_name = "DEST")]
    allow_outbound: Vec<String>,
    /// A name it may get server certificates for (repeatable).
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// never, on-failure (default) or always.
    #[arg(long, value_name = "POLICY")]
    restart: Option<String>,
    /// Wall-clock limit per start (e.g. 30s).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Linear-memory limit, total over its memories (e.g. 64MiB).
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
}

/// Where a command's requests go: the daemon's socket, or, for a command
/// that only reads while no daemon answers, the records served read-only
/// by this process ([`crate::api::Offline`]).
pub(super) struct Target {
    pub(super) socket: PathBuf,
    pub(super) rt: tokio::runtime::Runtime,
    _offline: Option<crate::api::Offline>,
}

/// The socket and a runtime to talk to it, or the exit code of why not.
fn connect(socket: Option<PathBuf>, config: Option<PathBuf>) -> Result<Target, ExitCode> {
    connect_for(socket, config, None)
}

/// [`connect`]; with `reads_from` (the `--state-dir` flag, if any), a
/// daemon that does not answer is replaced by the state dir's records.
pub(super) fn connect_for(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    reads_from: Option<Option<&Path>>,
) -> Result<Target, ExitCode> {
    let cfg = optional_config(config)?;
    let configured = cfg.as_ref().and_then(|c| c.api.socket.clone());
    let socket = crate::api::socket_path(socket.as_deref(), configured.as_deref())
        .map_err(|e| fail(e, 2))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the async runtime: {e}"), 1))?;
    let offline = match reads_from {
        Some(state_flag) => offline_unless_answered(&socket, state_flag, cfg, &rt)?,
        None => None,
    };
    Ok(Target {
        socket: offline.as_ref().map_or(socket, |o| o.socket.clone()),
        rt,
        _offline: offline,
    })
}

/// `None` if a daemon answers on `socket`; else the state dir's records,
/// served read-only in-process. A daemon that is starting holds the
/// registry a moment before its socket answers: then the socket is waited
/// for (up to 10 s).
fn offline_unless_answered(
    socket: &Path,
    state_flag: Option<&Path>,
    cfg: Option<crate::config::Config>,
    rt: &tokio::runtime::Runtime,
) -> Result<Option<crate::api::Offline>, ExitCode> {
    let state_dir = crate::state::resolve(
        state_flag,
        cfg.as_ref().and_then(|c| c.state_dir.as_deref()),
    )
    .map_err(|e| fail(e, 2))?;
    let cfg = cfg.unwrap_or_else(crate::config::Config::empty);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(None);
        }
        let started = {
            let _in_runtime = rt.enter();
            crate::api::Offline::start(&state_dir, &cfg)
        };
        match started {
            Ok(offline) => return Ok(Some(offline)),
            Err(e)
                if std::time::Instant::now() < deadline
                    && matches!(
                        e.downcast_ref::<crate::registry::RegistryError>(),
                        Some(crate::registry::RegistryError::Busy(_))
                    ) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(fail(
                    format!(
                        "no daemon answers on {} and its records cannot be read: {e:#}",
                        socket.display()
                    ),
                    1,
                ));
            }
        }
    }
}

impl ModuleCommand {
    /// Whether it only reads (and so works without a daemon).
    fn reads_only(&self) -> bool {
        matches!(
            self,
            Self::List { .. } | Self::Show { .. } | Self::Logs { .. } | Self::Exits { .. }
        )
    }
}

/// Runs `edgeward module ...`; `state_flag` is `--state-dir`, for reading
/// the records when no daemon runs.
pub(super) fn command(args: ModuleArgs, state_flag: Option<&Path>) -> ExitCode {
    let reads = args.command.reads_only().then_some(state_flag);
    match connect_for(args.socket, args.config, reads) {
        Ok(t) => t.rt.block_on(run(&t.socket, args.command)),
        Err(code) => code,
    }
}

/// `edgeward status`: `edgeward module list`.
pub(super) fn status(config: Option<PathBuf>, json: bool, state_flag: Option<&Path>) -> ExitCode {
    command(
        ModuleArgs {
            socket: None,
            config,
            command: ModuleCommand::List { json },
        },
        state_flag,
    )
}

/// `edgeward logs`: `edgeward module logs` (or `exits`).
pub(super) fn logs_alias(
    config: Option<PathBuf>,
    name: String,
    exits: bool,
    state_flag: Option<&Path>,
) -> ExitCode {
    let command = if exits {
        ModuleCommand::Exits { name }
    } else {
        ModuleCommand::Logs {
            name,
            tail: None,
            since: None,
            until: None,
            follow: false,
            no_timestamps: false,
        }
    };
    command_with(config, command, state_flag)
}

fn command_with(
    config: Option<PathBuf>,
    command: ModuleCommand,
    state_flag: Option<&Path>,
) -> ExitCode {
    self::command(
        ModuleArgs {
            socket: None,
            config,
            command,
        },
        state_flag,
    )
}

/// `edgeward deploy` and `edgeward deployment`.
#[derive(Debug, clap::Args)]
pub(super) struct DeployArgs {
    /// The manifest: TOML (or .json) with `version` and `[[module]]`
    /// tables as in the config file; each `file` (relative to the
    /// manifest) is read here, measured (against its `digest` if given)
    /// and uploaded.
    manifest: PathBuf,
    /// Print the plan only.
    #[arg(long)]
    dry_run: bool,
    /// The manifest's signature (`edgeward sign --key K MANIFEST`), when
    /// there is no MANIFEST.sig beside it. A signed manifest is sent as
    /// signed: its modules must pin their digests.
    #[arg(long, value_name = "SIG")]
    signature: Option<PathBuf>,
    /// The management socket (see `edgeward module --help`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Config file (for its [api] socket).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// `edgeward deployment`.
#[derive(Debug, clap::Args)]
pub(super) struct DeploymentArgs {
    #[command(subcommand)]
    what: DeploymentCommand,
    /// The management socket (see `edgeward module --help`).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Config file (for its [api] socket).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum DeploymentCommand {
    /// The last deployment applied (JSON).
    Show,
    /// Modules whose state differs from what the registry wants.
    Plan,
    /// The last deployment's version, whether every module is in the
    /// state the registry wants, and each module (JSON).
    Status,
}

/// Runs `edgeward deploy MANIFEST`.
pub(super) fn deploy(args: DeployArgs) -> ExitCode {
    match connect(args.socket, args.config) {
        Ok(t) => {
            t.rt.block_on(deploy_manifest(
                &t.socket,
                &args.manifest,
                args.signature.as_deref(),
                args.dry_run,
            ))
            .unwrap_or_else(|c| c)
        }
        Err(code) => code,
    }
}

/// Runs `edgeward deployment show|status|plan` (with or without a daemon).
pub(super) fn deployment(args: DeploymentArgs, state_flag: Option<&Path>) -> ExitCode {
    let path = match args.what {
        DeploymentCommand::Show => "/v1/deployment",
        DeploymentCommand::Plan => "/v1/deployment/plan",
        DeploymentCommand::Status => "/v1/deployment/status",
    };
    match connect_for(args.socket, args.config, Some(state_flag)) {
        Ok(t) => {
            t.rt.block_on(async {
                get(&t.socket, path, true).await?;
                Ok(ExitCode::SUCCESS)
            })
            .unwrap_or_else(|c| c)
        }
        Err(code) => code,
    }
}

async fn deploy_manifest(
    socket: &Path,
    manifest: &Path,
    signature: Option<&Path>,
    dry_run: bool,
) -> Result<ExitCode, ExitCode> {
    let signature = crate::attest::publisher::detached_for(manifest, signature)
        .map_err(|e| fail(e.to_string(), 2))?;
    let text = std::fs::read_to_string(manifest)
        .map_err(|e| fail(format!("{}: {e}", manifest.display()), 2))?;
    let bad = |e: String| fail(format!("{}: {e}", manifest.display()), 2);
    let mut doc: serde_json::Value = if manifest.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
    } else {
        let v: toml::Value = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        serde_json::to_value(v).map_err(|e| bad(e.to_string()))?
    };
    let Some(obj) = doc.as_object_mut() else {
        return Err(bad(
            "expected a table with `version` and `[[module]]`".into()
        ));
    };
    let modules = obj
        .remove("module")
        .unwrap_or_else(|| serde_json::json!([]));
    let base = manifest.parent().unwrap_or(Path::new("."));
    let mut specs = Vec::new();
    for mut m in modules.as_array().cloned().unwrap_or_default() {
        let Some(file) = m.get("file").and_then(|f| f.as_str()).map(PathBuf::from) else {
            specs.push(m);
            continue;
        };
        let file = if file.is_absolute() {
            file
        } else {
            base.join(file)
        };
        let pinned = match m.get("digest").and_then(|d| d.as_str()) {
            Some(d) => Some(
                d.parse::<Digest>()
                    .map_err(|e| bad(format!("digest: {e}")))?,
            ),
            None => None,
        };
        let digest = upload(socket, &file, pinned.as_ref()).await?;
        if let Some(o) = m.as_object_mut() {
            o.remove("file");
            o.insert("digest".into(), digest.to_string().into());
        }
        specs.push(m);
    }
    obj.insert("modules".into(), specs.into());
    // Signed: the manifest as signed (the components are uploaded above);
    // the daemon applies what the signature covers.
    let body = match signature {
        Some(sig) => {
            use base64ct::Encoding as _;
            serde_json::to_vec(&serde_json::json!({
                "manifest": text,
                "signature": base64ct::Base64::encode_string(&sig),
            }))
        }
        None => serde_json::to_vec(&doc),
    }
    .map_err(|e| bad(e.to_string()))?;
    let path = if dry_run {
        "/v1/deployment?dry-run=true"
    } else {
        "/v1/deployment"
    };
    let a = call(socket, "PUT", path, Some((body, "application/json"))).await?;
    if a.status != 200 {
        return Ok(refused(&a));
    }
    let plan = a.json();
    let list = |k: &str| {
        plan[k]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    println!(
        "deployment {}{}: add [{}], update [{}], remove [{}], unchanged [{}]",
        plan["version"].as_str().unwrap_or("?"),
        if dry_run { " (dry run)" } else { "" },
        list("add"),
        list("update"),
        list("remove"),
        list("unchanged")
    );
    Ok(ExitCode::SUCCESS)
}

fn refused(a: &Answer) -> ExitCode {
    fail(a.error(), 1)
}

async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<(Vec<u8>, &str)>,
) -> Result<Answer, ExitCode> {
    request(socket, method, path, body)
        .await
        .map_err(|e| fail(format!("{e:#}"), 1))
}

async fn run(socket: &Path, command: ModuleCommand) -> ExitCode {
    let name = match &command {
        ModuleCommand::List { .. } => None,
        ModuleCommand::Add(a) => Some(&a.name),
        ModuleCommand::Update { name, .. } => Some(name),
        ModuleCommand::Show { name }
        | ModuleCommand::Start { name }
        | ModuleCommand::Stop { name }
        | ModuleCommand::Restart { name }
        | ModuleCommand::Reset { name }
        | ModuleCommand::Remove { name }
        | ModuleCommand::Logs { name, .. }
        | ModuleCommand::Exits { name } => Some(name),
    };
    if let Some(n) = name
        && !crate::spec::valid_module_name(n)
    {
        return fail(format!("{n:?} is not a valid module name"), 2);
    }
    let result = match command {
        ModuleCommand::List { json } => list(socket, json).await,
        ModuleCommand::Show { name } => show(socket, &name).await,
        ModuleCommand::Add(a) => add(socket, a).await,
        ModuleCommand::Update { name, file, digest } => {
            update(socket, &name, &file, digest.as_ref()).await
        }
        ModuleCommand::Start { name } => action(socket, &name, "start").await,
        ModuleCommand::Stop { name } => action(socket, &name, "stop").await,
        ModuleCommand::Restart { name } => action(socket, &name, "restart").await,
        ModuleCommand::Reset { name } => action(socket, &name, "reset").await,
        ModuleCommand::Remove { name } => remove(socket, &name).await,
        ModuleCommand::Logs {
            name,
            tail,
            since,
            until,
            follow,
            no_timestamps,
        } => {
            let mut q = Vec::new();
            if let Some(n) = tail {
                q.push(format!("tail={n}"));
            }
            for (k, v) in [("since", since), ("until", until)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", v.replace('+', "%2B").replace(':', "%3A")));
                }
            }
            if follow {
                q.push("follow=true".into());
            }
            if no_timestamps {
                q.push("timestamps=false".into());
            }
            logs(socket, &name, &q.join("&")).await
        }
        ModuleCommand::Exits { name } => exits(socket, &name).await,
    };
    result.unwrap_or_else(|code| code)
}

/// GETs `path`: with `json`, prints the answer and returns `None`;
/// otherwise returns it for the caller to print.
async fn get(socket: &Path, path: &str, json: bool) -> Result<Option<serde_json::Value>, ExitCode> {
    let a = call(socket, "GET", path, None).await?;
    if a.status != 200 {
        return Err(refused(&a));
    }
    let v = a.json();
    if json {
        println!("{v:#}");
        return Ok(None);
    }
    Ok(Some(v))
}

async fn list(socket: &Path, json: bool) -> Result<ExitCode, ExitCode> {
    let Some(v) = get(socket, "/v1/modules", json).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    println!(
        "{:<24} {:<14} {:<9} {:<8} DIGEST",
        "NAME", "STATE", "ORIGIN", "DESIRED"
    );
    for m in v.as_array().into_iter().flatten() {
        let s = |k: &str| m[k].as_str().unwrap_or("-").to_owned();
        println!(
            "{:<24} {:<14} {:<9} {:<8} {}",
            s("name"),
            s("state"),
            s("origin"),
            s("desired"),
            s("digest")
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(socket: &Path, name: &str) -> Result<ExitCode, ExitCode> {
    get(socket, &format!("/v1/modules/{name}"), true).await?;
    Ok(ExitCode::SUCCESS)
}

/// Measures `file` (pinned to `digest` if given) and uploads it; returns
/// its digest.
async fn upload(socket: &Path, file: &Path, digest: Option<&Digest>) -> Result<Digest, ExitCode> {
    let measured = Measured::read(file).map_err(|e| fail(e, 1))?;
    measured.verify(digest).map_err(|e| fail(e, 1))?;
    let digest = measured.digest;
    let up = call(
        socket,
        "PUT",
        &format!("/v1/blobs/{digest}"),
        Some((measured.bytes, "application/octet-stream")),
    )
    .await?;
    if !matches!(up.status, 200 | 201) {
        return Err(refused(&up));
    }
    Ok(digest)
}

async fn update(
    socket: &Path,
    name: &str,
    file: &Path,
    digest: Option<&Digest>,
) -> Result<ExitCode, ExitCode> {
    let current = call(socket, "GET", &format!("/v1/modules/{name}"), None).await?;
    if current.status != 200 {
        return Ok(refused(&current));
    }
    let mut spec = current.json()["spec"].clone();
    let digest = upload(socket, file, digest).await?;
    spec["digest"] = digest.to_string().into();
    let body = serde_json::to_vec(&spec).map_err(|e| fail(e, 1))?;
    let r = call(
        socket,
        "PUT",
        &format!("/v1/modules/{name}"),
        Some((body, "application/json")),
    )
    .await?;
    if r.status != 200 {
        return Ok(refused(&r));
    }
    println!("{name}: updated to {digest}");
    Ok(ExitCode::SUCCESS)
}

async fn add(socket: &Path, a: AddArgs) -> Result<ExitCode, ExitCode> {
    let env = parse_env(&a.env).map_err(|e| fail(e, 2))?;
    let settings = parse_settings(&a.settings).map_err(|e| fail(e, 2))?;
    let digest = upload(socket, &a.file, a.digest.as_ref()).await?;
    let spec = crate::spec::RawModuleSpec {
        name: a.name.clone(),
        digest: digest.to_string(),
        args: a.args,
        env: env.into_iter().collect(),
        settings,
        allow_outbound: a.allow_outbound,
        server_names: a.server_names,
        restart: a.restart,
        timeout: a.timeout,
        max_memory: a.max_memory,
        ..Default::default()
    };
    let body = serde_json::to_vec(&spec).map_err(|e| fail(e, 1))?;
    let r = call(
        socket,
        "POST",
        "/v1/modules",
        Some((body, "application/json")),
    )
    .await?;
    if r.status != 201 {
        return Ok(refused(&r));
    }
    println!("{}: added, pinned to {digest}", a.name);
    Ok(ExitCode::SUCCESS)
}

async fn action(socket: &Path, name: &str, what: &str) -> Result<ExitCode, ExitCode> {
    let a = call(socket, "POST", &format!("/v1/modules/{name}/{what}"), None).await?;
    if a.status != 200 {
        return Ok(refused(&a));
    }
    println!("{name}: {}", a.json()["state"].as_str().unwrap_or("-"));
    Ok(ExitCode::SUCCESS)
}

async fn remove(socket: &Path, name: &str) -> Result<ExitCode, ExitCode> {
    let a = call(socket, "DELETE", &format!("/v1/modules/{name}"), None).await?;
    if a.status != 204 {
        return Ok(refused(&a));
    }
    println!("{name}: removed");
    Ok(ExitCode::SUCCESS)
}

async fn logs(socket: &Path, name: &str, query: &str) -> Result<ExitCode, ExitCode> {
    let path = if query.is_empty() {
        format!("/v1/modules/{name}/logs")
    } else {
        format!("/v1/modules/{name}/logs?{query}")
    };
    // Escaped when written; escaped again for the terminal. Chunks as they
    // arrive (a followed log does not end).
    let mut body = Vec::new();
    let status = crate::api::client::stream(socket, &path, |status, chunk| {
        use std::io::Write as _;
        if status != 200 {
            body.extend_from_slice(chunk);
            return;
        }
        let shown = crate::runtime::escape::for_terminal(chunk);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&shown);
        let _ = out.flush();
    })
    .await
    .map_err(|e| fail(format!("{e:#}"), 1))?;
    if status != 200 {
        let a = Answer {
            status,
            body: body.into(),
        };
        return Ok(refused(&a));
    }
    Ok(ExitCode::SUCCESS)
}

async fn exits(socket: &Path, name: &str) -> Result<ExitCode, ExitCode> {
    let a = call(socket, "GET", &format!("/v1/modules/{name}/exits"), None).await?;
    if a.status != 200 {
        return Ok(refused(&a));
    }
    for e in a.json().as_array().into_iter().flatten() {
        println!("{e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `edgeward events`.
#[derive(Debug, clap::Args)]
pub(super) struct EventsArgs {
    /// Keep printing events as they happen.
    #[arg(short, long)]
    follow: bool,
    /// The management socket (see `edgeward module --help`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Config file (for its [api] socket).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Runs `edgeward events [-f]`: JSON lines, as the daemon sends them.
pub(super) fn events(args: EventsArgs) -> ExitCode {
    let (socket, rt) = match connect(args.socket, args.config) {
        Ok(t) => (t.socket, t.rt),
        Err(code) => return code,
    };
    let path = if args.follow {
        "/v1/events?follow=true"
    } else {
        "/v1/events"
    };
    let result = rt.block_on(crate::api::client::stream(&socket, path, |_, chunk| {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(chunk);
        let _ = out.flush();
    }));
    match result {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => fail(format!("HTTP {status}"), 1),
        Err(e) => fail(format!("{e:#}"), 1),
    }
}

/// `edgeward system`.
#[derive(Debug, clap::Args)]
pub(super) struct SystemArgs {
    #[command(subcommand)]
    what: SystemCommand,
    /// The management socket (see `edgeward module --help`).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Config file (for its [api] socket).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum SystemCommand {
    /// Versions, HSM backend, device id, trust domain, uptime, module counts.
    Info {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The daemon's and its modules' metrics, in the Prometheus text
    /// format (as `GET /v1/metrics` serves them).
    Metrics,
}

/// Runs `edgeward system info` and `system metrics`.
pub(super) fn system(args: SystemArgs) -> ExitCode {
    let json = match args.what {
        SystemCommand::Info { json } => json,
        SystemCommand::Metrics => {
            return match connect(args.socket, args.config) {
                Ok(t) => t.rt.block_on(async {
                    match call(&t.socket, "GET", "/v1/metrics", None).await {
                        Ok(a) if a.status == 200 => {
                            use std::io::Write as _;
                            let mut out = std::io::stdout().lock();
                            match out.write_all(&a.body).and_then(|()| out.flush()) {
                                Ok(()) => ExitCode::SUCCESS,
                                Err(e) => fail(format!("cannot write the metrics: {e}"), 1),
                            }
                        }
                        Ok(a) => refused(&a),
                        Err(code) => code,
                    }
                }),
                Err(code) => code,
            };
        }
    };
    match connect(args.socket, args.config) {
        Ok(t) => {
            t.rt.block_on(async {
                let Some(v) = get(&t.socket, "/v1/system/info", json).await? else {
                    return Ok(ExitCode::SUCCESS);
                };
                let s = |k: &str| match &v[k] {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                for (label, key) in [
                    ("version", "version"),
                    ("runtime platform", "runtime_platform_version"),
                    ("HSM backend", "hsm_backend"),
                    ("device id", "device_id"),
                    ("trust domain", "trust_domain"),
                    ("uptime (s)", "uptime_seconds"),
                ] {
                    println!("{label:<18} {}", s(key));
                }
                println!(
                    "{:<18} {} registered, {} running",
                    "modules", v["modules"]["registered"], v["modules"]["running"]
                );
                Ok(ExitCode::SUCCESS)
            })
            .unwrap_or_else(|c| c)
        }
        Err(code) => code,
    }
}
