//! `edgeward daemon`: measure, load and supervise the modules of a
//! deployment until SIGINT/SIGTERM, then stop them.

pub mod records;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::runtime::{
    DirGrant, EngineOptions, Exit, LoadedModule, Output, Runtime, RuntimeOptions, SandboxSpec,
};
use crate::spec::{ModuleSpec, RestartPolicy};
use crate::state;
use records::{ExitRecord, ModuleRecords, ModuleState};

/// The guest path of every module's own data directory.
pub const DATA_DIR_GUEST: &str = "/data";
/// First restart delay; doubles per consecutive failure.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A start that lasted this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Consecutive unstable restarts after which a module is reported as
/// crash-looping (once, not per restart).
pub const CRASH_LOOP_AFTER: u32 = 5;
/// How long stopping may take before remaining tasks are aborted.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Whether `policy` restarts after `exit`.
pub fn should_restart(policy: RestartPolicy, exit: &Exit) -> bool {
    match policy {
        RestartPolicy::Never => false,
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !exit.is_success(),
    }
}

/// Capped exponential backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: BACKOFF_INITIAL,
        }
    }
}

impl Backoff {
    /// The delay before the next restart; doubles the one after, up to
    /// [`BACKOFF_MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }

    /// Back to [`BACKOFF_INITIAL`].
    pub fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }
}

fn sandbox_for(spec: &ModuleSpec, data_dir: &Path, output: Output) -> SandboxSpec {
    let mut s = SandboxSpec::new(spec.name.clone());
    s.args.extend(spec.args.iter().cloned());
    s.env = spec.env.clone();
    s.dirs.push(DirGrant {
        host: data_dir.to_owned(),
        guest: DATA_DIR_GUEST.to_owned(),
        budgeted: true,
    });
    s.dirs.extend(spec.dirs.iter().cloned());
    s.limits = spec.limits;
    s.allow_outbound = spec.allow_outbound.clone();
    s.output = output;
    s
}

/// Raises the soft open-file limit to the hard limit: every module holds a
/// descriptor for its data directory, and thousands of modules outgrow the
/// usual soft limit of 1024. Returns the new soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Runs the deployment in `config` with state under `state_dir` until
/// SIGINT or SIGTERM.
///
/// A module whose measurement does not match its pinned digest, or that
/// cannot be compiled or linked, is refused and logged; the others run.
///
/// # Errors
///
/// When the state directory or runtime cannot be set up, another daemon
/// holds the state directory, or signal handlers cannot be installed.
pub async fn run(config: Config, state_dir: PathBuf) -> anyhow::Result<()> {
    state::ensure_private_dir(&state_dir)?;
    let _lock = state::lock_for_daemon(&state_dir)?;
    let fd_limit = raise_fd_limit();
    let max_memory = config
        .modules
        .iter()
        .map(|m| m.limits.max_memory)
        .max()
        .unwrap_or(0);
    let rt = Arc::new(Runtime::new(&RuntimeOptions {
        engine: EngineOptions {
            max_instances: config.runtime.max_modules,
            ceilings: config.runtime.ceilings,
            max_memory: max_memory.max(crate::runtime::sandbox::DEFAULT_MAX_MEMORY),
            pooling: config.runtime.pooling,
            max_wasm_stack: config.runtime.max_wasm_stack,
        },
        state_dir: Some(state_dir.clone()),
    })?);
    tracing::info!(
        version = crate::VERSION,
        config = %config.path.display(),
        state_dir = %state_dir.display(),
        allocator = ?rt.allocator(),
        modules = config.modules.len(),
        fd_limit = ?fd_limit,
        "edgeward daemon starting"
    );
    // Signals are honoured from here on, compiling or not.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Tasks::default();
    let startup = start_modules(&config, &state_dir, &rt, &mut tasks, &stop_rx);
    let why = tokio::select! {
        r = startup => {
            r?;
            tokio::select! {
                why = stop_requested(&mut sigterm) => why?,
                () = tasks.watch() => unreachable!("watch never returns"),
            }
        }
        why = stop_requested(&mut sigterm) => {
            tracing::info!("stopping during start-up");
            why?
        }
    };
    tracing::info!("{why}: stopping");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(STOP_DEADLINE, tasks.drain()).await;
    if drained.is_err() {
        tracing::warn!("modules did not stop within {STOP_DEADLINE:?}; aborting them");
        tasks.set.shutdown().await;
    }
    records::flush();
    tracing::info!("edgeward daemon stopped");
    Ok(())
}

/// The daemon's tasks. Each module's supervisor is tied to its records, so
/// one that panics is recorded as failed rather than left "running".
#[derive(Default)]
struct Tasks {
    set: JoinSet<()>,
    owners: std::collections::HashMap<tokio::task::Id, ModuleRecords>,
}

impl Tasks {
    fn spawn(&mut self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.set.spawn(f);
    }

    fn spawn_module(
        &mut self,
        records: ModuleRecords,
        f: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.set.spawn(f);
        self.owners.insert(handle.id(), records);
    }

    fn ended(&mut self, r: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (id, failure) = match r {
            Ok((id, ())) => (id, None),
            Err(e) => {
                let id = e.id();
                let why = if e.is_panic() {
                    let payload = e.into_panic();
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_owned());
                    format!("its supervisor panicked: {msg}")
                } else {
                    "its supervisor was cancelled".to_owned()
                };
                (id, Some(why))
            }
        };
        if let (Some(records), Some(why)) = (self.owners.remove(&id), failure) {
            tracing::error!(module = %records.name(), "{why}");
            records.mark_failed(why);
        }
    }

    /// Records tasks as they end; returns only when there are none left.
    async fn drain(&mut self) {
        while let Some(r) = self.set.join_next_with_id().await {
            self.ended(r);
        }
    }

    /// Records tasks as they end, forever.
    async fn watch(&mut self) {
        self.drain().await;
        std::future::pending::<()>().await;
    }
}

/// Waits for SIGINT or SIGTERM; says which.
async fn stop_requested(sigterm: &mut tokio::signal::unix::Signal) -> anyhow::Result<&'static str> {
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("cannot wait for SIGINT")?; Ok("SIGINT") }
        _ = sigterm.recv() => Ok("SIGTERM"),
    }
}

/// Sets up the workload identity, then measures, loads and starts every
/// module of `config` into `tasks`. Compilation runs on the blocking pool,
/// so a signal stops the daemon while it compiles.
async fn start_modules(
    config: &Config,
    state_dir: &Path,
    rt: &Arc<Runtime>,
    tasks: &mut Tasks,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let state_dir = state_dir.to_owned();
    let identity = {
        let (hsm_config, identity_config, dir) = (
            config.hsm.clone(),
            config.identity.clone(),
            state_dir.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let hsm = crate::hsm::open(&hsm_config, &dir)?;
            crate::identity::IdentityService::open(hsm, identity_config, &dir)
                .map_err(anyhow::Error::from)
        })
        .await
        .context("identity set-up task failed")?
        .context("cannot set up workload identity")?
    };
    tracing::info!(
        trust_domain = %identity.config().trust_domain,
        device_id = %identity.config().device_id,
        "workload identity ready"
    );
    let configured: std::collections::HashSet<&str> =
        config.modules.iter().map(|m| m.name.as_str()).collect();
    for name in crate::identity::registry::registered(&state_dir) {
        if !configured.contains(name.as_str()) {
            tracing::info!(module = %name, "registered module is not configured; its registration is kept (`edgeward deregister {name}` deletes it)");
        }
    }
    tasks.spawn(identity.clone().maintain(true, stop_rx.clone()));
    for spec in config.modules.iter().cloned() {
        let data_dir = records::module_dir(&state_dir, &spec.name).join("data");
        let records = match ModuleRecords::open(&state_dir, &spec.name) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(module = %spec.name, error = %e, "module refused: cannot create its state");
                continue;
            }
        };
        let loaded = match state::ensure_private_dir(&data_dir) {
            Err(e) => Err(anyhow::Error::from(e)),
            Ok(()) => {
                let (rt2, file, digest) = (rt.clone(), spec.file.clone(), spec.digest);
                tokio::task::spawn_blocking(move || rt2.load_file(&file, Some(&digest)))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("compile task failed: {e}")))
            }
        };
        let loaded = match loaded {
            Ok(module) => {
                let (svc, name, digest, names) = (
                    identity.clone(),
                    spec.name.clone(),
                    module.digest.to_string(),
                    spec.server_names.clone(),
                );
                match tokio::task::spawn_blocking(move || svc.register(&name, &digest, &names))
                    .await
                {
                    Ok(Ok(id)) => Ok((module, id)),
                    Ok(Err(e)) => {
                        Err(anyhow::Error::from(e).context("cannot register its identity"))
                    }
                    Err(e) => Err(anyhow::anyhow!("registration task failed: {e}")),
                }
            }
            Err(e) => Err(e),
        };
        match loaded {
            Ok((module, module_identity)) => {
                tracing::info!(module = %spec.name, digest = %module.digest, code = ?module.source, "module measured and loaded");
                let output = Output::Module {
                    prefix: Arc::from(spec.name.as_str()),
                    echo: config.runtime.echo_output,
                    log: records.output(),
                };
                let mut sandbox = sandbox_for(&spec, &data_dir, output);
                sandbox.identity = Some(crate::identity::IdentityHandle::ready(module_identity));
                tasks.spawn_module(
                    records.clone(),
                    supervise(rt.clone(), spec, module, sandbox, records, stop_rx.clone()),
                );
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(module = %spec.name, error = reason, "module refused");
                records.set_status(ModuleState::Refused, 0, None, Some(reason), None);
            }
        }
    }

    Ok(())
}

async fn supervise(
    rt: Arc<Runtime>,
    spec: ModuleSpec,
    module: LoadedModule,
    sandbox: SandboxSpec,
    records: ModuleRecords,
    mut stop: watch::Receiver<bool>,
) {
    let name = spec.name.as_str();
    let digest = Some(module.digest.to_string());
    let mut backoff = Backoff::default();
    let mut unstable = 0u32;
    let mut starts = 0u64;
    let mut last_exit: Option<ExitRecord> = None;
    loop {
        starts += 1;
        let started = Instant::now();
        tracing::debug!(module = name, start = starts, "starting");
        records.set_status(
            ModuleState::Running,
            starts,
            digest.clone(),
            None,
            last_exit.clone(),
        );
        let exit = tokio::select! {
            exit = rt.start(&module, &sandbox, spec.timeout) => exit,
            _ = stop.wait_for(|s| *s) => {
                tracing::info!(module = name, "stopped");
                records.set_status(ModuleState::Stopped, starts, digest, None, last_exit);
                return;
            }
        };
        let ran = started.elapsed();
        let record = ExitRecord::new(starts, ran, &exit);
        records.record_exit(&record);
        last_exit = Some(record);
        // Trap messages and backtraces carry guest-chosen names.
        let said = exit.to_string();
        let said = crate::runtime::escape::escape_str(&said);
        if exit.is_success() {
            tracing::info!(module = name, ran = ?ran, "{said}");
        } else {
            tracing::warn!(module = name, ran = ?ran, "{said}");
        }
        if !should_restart(spec.restart, &exit) {
            tracing::info!(module = name, policy = ?spec.restart, "not restarting");
            records.set_status(ModuleState::Exited, starts, digest, None, last_exit);
            return;
        }
        if ran >= STABLE_AFTER {
            backoff.reset();
            unstable = 0;
        } else {
            unstable = unstable.saturating_add(1);
            if unstable == CRASH_LOOP_AFTER {
                tracing::error!(
                    module = name,
                    restarts = unstable,
                    "crash-looping: backing off up to {BACKOFF_MAX:?} between starts"
                );
            }
        }
        let state = if unstable >= CRASH_LOOP_AFTER {
            ModuleState::CrashLooping
        } else {
            ModuleState::BackingOff
        };
        records.set_status(state, starts, digest.clone(), None, last_exit.clone());
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => {
                tracing::info!(module = name, "stopped");
                records.set_status(ModuleState::Stopped, starts, digest, None, last_exit);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervisor that panics leaves its module failed, with the reason,
    /// not "running".
    #[tokio::test]
    async fn a_panicking_supervisor_is_recorded_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let records = ModuleRecords::open(dir.path(), "m").unwrap();
        records.set_status(ModuleState::Running, 3, Some("sha256:x".into()), None, None);
        let mut tasks = Tasks::default();
        tasks.spawn_module(records, async { panic!("supervision bug") });
        tasks.drain().await;
        records::flush();
        let s = records::read_statuses(dir.path()).pop().unwrap().unwrap();
        assert_eq!(s.state, ModuleState::Failed);
        assert!(s.reason.unwrap().contains("supervision bug"));
        assert_eq!((s.starts, s.digest.as_deref()), (3, Some("sha256:x")));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::default();
        let seq: Vec<u64> = (0..9).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(seq, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_INITIAL);
    }

    #[test]
    fn policies() {
        let fail = Exit::Failure(1);
        assert!(!should_restart(RestartPolicy::Never, &fail));
        assert!(should_restart(RestartPolicy::OnFailure, &fail));
        assert!(!should_restart(RestartPolicy::OnFailure, &Exit::Success));
        assert!(should_restart(
            RestartPolicy::OnFailure,
            &Exit::Trap("x".into())
        ));
        assert!(should_restart(RestartPolicy::Always, &Exit::Success));
    }
}
