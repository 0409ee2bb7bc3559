//! The supervisor: owns the table name → running module and applies one
//! change at a time (start, stop, restart, remove) without touching the
//! modules it does not name. Each module runs in a task of its own
//! ([`supervise`]: start, exit, restart policy, backoff) with a stop signal
//! of its own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::records::{self, ExitRecord, ModuleRecords, ModuleState};
use super::{
    BACKOFF_MAX, Backoff, CRASH_LOOP_AFTER, DATA_DIR_GUEST, STABLE_AFTER, STOP_DEADLINE,
    should_restart,
};
use crate::components::ComponentStore;
use crate::identity::IdentityService;
use crate::measure::Measured;
use crate::registry::Registry;
use crate::runtime::management::Management;
use crate::runtime::{DirGrant, LoadedModule, Output, Runtime, SandboxSpec};
use crate::spec::ModuleSpec;
use crate::state;

/// A module the supervisor started, until it is stopped or removed.
#[derive(Debug)]
struct Running {
    spec: ModuleSpec,
    /// Turns true to stop it.
    stop: watch::Sender<bool>,
    /// Closes when its task ends (returns or panics).
    ended: watch::Receiver<()>,
    /// Clears its backoff and crash-loop count (and ends a wait between
    /// starts).
    reset: Arc<tokio::sync::Notify>,
}

/// A module measured, compiled and registered, ready to launch.
/// Why a module was not loaded.
enum Refusal {
    /// Its signature (measured as `signature-refused`).
    Signature(String),
    /// Reading, measuring or compiling it.
    Load(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Refusal {
    fn from(e: E) -> Self {
        Self::Load(e.into())
    }
}

struct Loaded {
    module: LoadedModule,
    /// Reading, measuring and checking its signature.
    read_time: Duration,
    identity: Arc<crate::identity::ModuleIdentity>,
    data_dir: PathBuf,
    /// The agent's link to the management service.
    management: Option<Arc<dyn Management>>,
}

/// The configured agent: the one registration linked with management.
#[derive(Debug, Clone)]
struct Agent {
    name: String,
    digest: crate::measure::Digest,
    link: Arc<dyn Management>,
}

/// Runs the modules of one daemon. See the module docs.
#[derive(Debug)]
pub struct Supervisor {
    rt: Arc<Runtime>,
    identity: Arc<IdentityService>,
    registry: Arc<Registry>,
    components: ComponentStore,
    state_dir: PathBuf,
    echo: bool,
    running: HashMap<String, Running>,
    tasks: Tasks,
    agent: Option<Agent>,
    measurer: Option<crate::attest::Measurer>,
    /// `[signatures]`: the floor components are held to.
    signatures: Arc<crate::attest::publisher::DeviceSignatures>,
    /// Cache entries (component, entry hash) already in the measurement
    /// log from this process.
    cache_entries_logged: CacheEntriesLogged,
}

type CacheEntriesLogged =
    Arc<std::sync::Mutex<std::collections::HashSet<(crate::measure::Digest, [u8; 32])>>>;

impl Supervisor {
    /// A supervisor with nothing running. `echo`: module output is echoed
    /// on the daemon's stdout/stderr as well as logged.
    ///
    /// # Errors
    ///
    /// When the component store cannot be created.
    pub fn new(
        rt: Arc<Runtime>,
        identity: Arc<IdentityService>,
        registry: Arc<Registry>,
        state_dir: &Path,
        echo: bool,
    ) -> std::io::Result<Self> {
        Ok(Self {
            rt,
            identity,
            registry,
            components: ComponentStore::open(state_dir)?,
            state_dir: state_dir.to_owned(),
            echo,
            running: HashMap::new(),
            tasks: Tasks::default(),
            agent: None,
            measurer: None,
            signatures: Arc::default(),
            cache_entries_logged: Arc::default(),
        })
    }

    /// Measures what it loads (and what [`Supervisor::measure`] is given)
    /// with `m`.
    pub fn set_measurer(&mut self, m: crate::attest::Measurer) {
        self.measurer = Some(m);
    }

    /// Holds components to `[signatures]` (see
    /// [`crate::attest::publisher::check_component`]).
    pub fn set_signatures(&mut self, s: crate::attest::publisher::DeviceSignatures) {
        self.signatures = Arc::new(s);
    }

    /// Measures `event`, if measuring (see [`crate::attest`]).
    pub async fn measure(&self, event: serde_json::Value) {
        if let Some(m) = &self.measurer {
            m.record(event).await;
        }
    }

    /// Makes `spec` the agent: the one registration (this name and this
    /// pinned digest) linked with the management interface, through
    /// `link`.
    pub fn set_agent(&mut self, spec: &ModuleSpec, link: Arc<dyn Management>) {
        self.agent = Some(Agent {
            name: spec.name.clone(),
            digest: spec.digest,
            link,
        });
    }

    /// Whether `name` is the agent's.
    pub fn is_agent(&self, name: &str) -> bool {
        self.agent.as_ref().is_some_and(|a| a.name == name)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The registry it registers modules in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry, to hand to a blocking task.
    pub fn shared_registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Destroys a removed registration's own key (PKCS#11), on the
    /// blocking pool.
    pub async fn forget(&self, rec: crate::registry::StoredRegistration) {
        let identity = self.identity.clone();
        let _ = tokio::task::spawn_blocking(move || {
            crate::identity::registry::forget(identity.hsm().as_ref(), &rec);
        })
        .await;
    }

    /// Destroys registration keys no registration names (a crash between a
    /// removal and [`Supervisor::forget`]). The daemon runs it at start.
    pub async fn collect_keys(&self) {
        let (identity, registry) = (self.identity.clone(), self.registry.clone());
        match tokio::task::spawn_blocking(move || {
            crate::identity::registry::collect_keys(identity.hsm().as_ref(), &registry)
        })
        .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                destroyed = n,
                "registration keys no registration names destroyed"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot collect registration keys"),
            Err(e) => tracing::warn!(error = %e, "registration key collection failed"),
        }
    }

    /// Names of the modules it runs (started and not stopped), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.running.keys().cloned().collect();
        v.sort();
        v
    }

    /// The spec a running module was started with.
    pub fn spec(&self, name: &str) -> Option<&ModuleSpec> {
        self.running.get(name).map(|r| &r.spec)
    }

    /// Measures, loads (compiling on the blocking pool), registers and
    /// starts `spec`. A module that is refused is recorded as refused, with
    /// the reason, which is also returned.
    ///
    /// # Errors
    ///
    /// A module of that name already runs, or it was refused.
    pub async fn start(&mut self, spec: ModuleSpec) -> anyhow::Result<()> {
        if self.running.contains_key(&spec.name) {
            anyhow::bail!("module {:?} is already running", spec.name);
        }
        let loaded = self.load(&spec).await;
        self.start_loaded(spec, loaded)
    }

    /// [`Supervisor::start`] for many modules: measured and loaded side by
    /// side, as many at a time as the runtime compiles at once (`[runtime]
    /// compile_concurrency`), each started as soon as it is loaded (a slow
    /// compilation holds back no other module). Refusals are recorded as
    /// `start` records them.
    pub async fn start_all(&mut self, specs: Vec<ModuleSpec>) {
        let width = self.rt.compile_concurrency();
        let mut queue: std::collections::VecDeque<ModuleSpec> = specs
            .into_iter()
            .filter(|s| {
                let running = self.running.contains_key(&s.name);
                if running {
                    tracing::warn!(module = %s.name, "already running; not started again");
                }
                !running
            })
            .collect();
        let mut loads = JoinSet::new();
        let mut names = HashMap::new();
        loop {
            while loads.len() < width
                && let Some(spec) = queue.pop_front()
            {
                let loader = self.loader();
                let name = spec.name.clone();
                let task = loads.spawn(async move {
                    let loaded = loader.load(&spec).await;
                    (spec, loaded)
                });
                names.insert(task.id(), name);
            }
            match loads.join_next_with_id().await {
                Some(Ok((id, (spec, loaded)))) => {
                    names.remove(&id);
                    let _ = self.start_loaded(spec, loaded);
                }
                Some(Err(e)) => {
                    let name = names.remove(&e.id()).unwrap_or_default();
                    self.refuse(&name, &format!("its load task failed: {e}"));
                }
                None => break,
            }
        }
    }

    fn start_loaded(
        &mut self,
        spec: ModuleSpec,
        loaded: anyhow::Result<Loaded>,
    ) -> anyhow::Result<()> {
        let records = self.records(&spec.name)?;
        match loaded {
            Ok(loaded) => {
                self.launch(spec, records, loaded);
                Ok(())
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(module = %spec.name, error = reason, "module refused");
                records.set_status(ModuleState::Refused, 0, None, Some(reason), None);
                Err(e)
            }
        }
    }

    /// Replaces running module `spec.name` with `spec`: the new component is
    /// measured and compiled first, and only then is the old one stopped and
    /// the new one started (same registration: generation and sealed data
    /// kept). A new version that is refused leaves the old one running.
    ///
    /// # Errors
    ///
    /// The new version was refused.
    pub async fn replace(&mut self, spec: ModuleSpec) -> anyhow::Result<()> {
        let records = self.records(&spec.name)?;
        let loaded = self.load(&spec).await.inspect_err(|e| {
            tracing::warn!(module = %spec.name, error = %format!("{e:#}"), "update refused; the running version is kept");
        })?;
        self.stop(&spec.name).await;
        self.launch(spec, records, loaded);
        Ok(())
    }

    fn records(&self, name: &str) -> anyhow::Result<ModuleRecords> {
        ModuleRecords::open(&self.registry, &self.state_dir, name).map_err(|e| {
            tracing::error!(module = name, error = %e, "module refused: cannot create its state");
            anyhow::anyhow!("cannot create its state: {e}")
        })
    }

    /// Runs a loaded module under its own supervision task.
    fn launch(&mut self, spec: ModuleSpec, records: ModuleRecords, loaded: Loaded) {
        let Loaded {
            module,
            identity,
            data_dir,
            management,
            read_time,
        } = loaded;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let source = match &module.source {
            crate::runtime::CodeSource::Cache(_) => "cache",
            crate::runtime::CodeSource::Compiled => "compiled",
            crate::runtime::CodeSource::Recompiled(_) => "recompiled",
        };
        tracing::info!(module = %spec.name, digest = %module.digest, code = ?module.source, read_ms = ms(read_time), load_ms = ms(module.load_time), queued_ms = ms(module.queue_time), "module measured and loaded");
        records.set_code(records::CodeReport {
            source: source.to_owned(),
            read_ms: ms(read_time),
            load_ms: ms(module.load_time),
            queued_ms: ms(module.queue_time),
            instantiate_ms: None,
        });
        let output = Output::Module {
            prefix: Arc::from(spec.name.as_str()),
            echo: self.echo,
            log: records.output(),
        };
        let mut sandbox = sandbox_for(&spec, &data_dir, output);
        sandbox.identity = Some(crate::identity::IdentityHandle::ready(identity));
        sandbox.management = management;
        let (stop, stop_rx) = watch::channel(false);
        let (ended_tx, ended) = watch::channel(());
        let reset = Arc::new(tokio::sync::Notify::new());
        let task = supervise(
            self.rt.clone(),
            spec.clone(),
            module,
            sandbox,
            records.clone(),
            Signals {
                stop: stop_rx,
                reset: reset.clone(),
            },
        );
        self.tasks.spawn_module(records, async move {
            let _ended = ended_tx;
            task.await;
        });
        self.running.insert(
            spec.name.clone(),
            Running {
                spec,
                stop,
                ended,
                reset,
            },
        );
    }

    /// Clears module `name`'s backoff and crash-loop count: one waiting to
    /// start again starts now. Returns false if it is not under supervision
    /// any more (never started, stopped, exited by its policy, or failed).
    pub fn reset(&self, name: &str) -> bool {
        match self.running.get(name) {
            Some(r) if r.ended.has_changed().is_ok() => {
                r.reset.notify_one();
                true
            }
            _ => false,
        }
    }

    /// Deletes stored components and compiled-cache entries no registered
    /// module names (left by removals, updates and deployments), cache
    /// entries an older engine made, and temporary files a crash left;
    /// only files at least `grace` old (a younger one may be an upload
    /// whose module is on its way). The daemon runs it at start (no grace,
    /// before the management API serves) and after each removal, update
    /// and deployment, so neither store grows with history.
    /// `config` names modules of the config file that may not be registered
    /// yet (their compiled code may be waiting, from `edgeward compile`).
    pub fn collect_garbage(&self, config: &[ModuleSpec], grace: Duration) {
        let Ok(modules) = self.registry.modules() else {
            return;
        };
        let keep: std::collections::HashSet<crate::measure::Digest> = modules
            .iter()
            .filter_map(|m| m.spec.digest.parse().ok())
            .chain(config.iter().map(|m| m.digest))
            .collect();
        let removed = self.components.retain_older(&keep, grace);
        let cached = self.rt.cache().map_or(0, |c| c.retain(&keep, grace));
        if removed + cached > 0 {
            tracing::info!(
                components = removed,
                cache_entries = cached,
                "unreferenced components and compiled code deleted"
            );
        }
    }

    /// Records a registered module that should not run as stopped (its
    /// status may still say what an earlier daemon last saw, even
    /// `running` after a crash).
    pub fn mark_stopped(&self, name: &str) {
        if records::status_of(&self.registry, name).is_some_and(|s| s.state == ModuleState::Stopped)
        {
            return;
        }
        if let Ok(r) = ModuleRecords::open(&self.registry, &self.state_dir, name) {
            r.mark(ModuleState::Stopped, None);
        }
    }

    /// The watchdog's round: re-measures every running module's stored
    /// component and compiled-cache entry (each digest once, on the
    /// blocking pool). A module whose component no longer hashes to its
    /// digest, or whose compiled code fails authentication, is stopped,
    /// recorded as `integrity-failed` with the reason, and measured; it is
    /// not restarted until it is updated or added again (the altered file
    /// is deleted, so it is uploaded or read afresh). Returns how many
    /// modules it checked.
    pub async fn audit(&mut self) -> usize {
        let targets: Vec<(String, crate::measure::Digest)> = self
            .running
            .iter()
            .filter(|(_, r)| r.ended.has_changed().is_ok())
            .map(|(n, r)| (n.clone(), r.spec.digest))
            .collect();
        let checked = targets.len();
        let (store, rt) = (self.components.clone(), self.rt.clone());
        let failures = tokio::task::spawn_blocking(move || {
            let mut verdicts: HashMap<crate::measure::Digest, Option<String>> = HashMap::new();
            let mut out = Vec::new();
            for (name, digest) in targets {
                let verdict = verdicts
                    .entry(digest)
                    .or_insert_with(|| integrity_of(&store, rt.cache(), &digest))
                    .clone();
                if let Some(why) = verdict {
                    out.push((name, digest, why));
                }
            }
            out
        })
        .await
        .unwrap_or_default();
        let counters = &super::metrics::DAEMON;
        counters
            .integrity_checks
            .fetch_add(checked as u64, std::sync::atomic::Ordering::Relaxed);
        counters
            .integrity_failures
            .fetch_add(failures.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for (name, digest, why) in failures {
            tracing::error!(module = %name, reason = %why, "integrity failure: stopped, and not restarted until it is updated or added again");
            self.stop(&name).await;
            // Its last status (stopped, just now) carries its digest.
            if let Ok(r) = self.records(&name) {
                r.mark(ModuleState::IntegrityFailed, Some(why.clone()));
            }
            self.measure(serde_json::json!({
                "kind": "integrity-failure",
                "name": name,
                "digest": digest.to_string(),
                "reason": why,
            }))
            .await;
        }
        checked
    }

    /// Records module `name` as refused for `reason` (a registered spec that
    /// no longer validates, say), and logs it.
    pub fn refuse(&self, name: &str, reason: &str) {
        tracing::error!(module = name, error = reason, "module refused");
        if let Ok(records) = ModuleRecords::open(&self.registry, &self.state_dir, name) {
            records.set_status(ModuleState::Refused, 0, None, Some(reason.to_owned()), None);
        }
    }

    /// Measures and compiles `spec`'s component, then registers its
    /// identity.
    async fn load(&self, spec: &ModuleSpec) -> anyhow::Result<Loaded> {
        self.loader().load(spec).await
    }

    /// What a load needs, as handles a task of its own can hold.
    fn loader(&self) -> Loader {
        Loader {
            rt: self.rt.clone(),
            identity: self.identity.clone(),
            registry: self.registry.clone(),
            components: self.components.clone(),
            state_dir: self.state_dir.clone(),
            agent: self.agent.clone(),
            measurer: self.measurer.clone(),
            signatures: self.signatures.clone(),
            cache_entries_logged: self.cache_entries_logged.clone(),
        }
    }

    /// Stops module `name` and waits (up to [`STOP_DEADLINE`]) for its task
    /// to end; its status reads stopped. Returns whether it was running.
    pub async fn stop(&mut self, name: &str) -> bool {
        let Some(mut r) = self.running.remove(name) else {
            return false;
        };
        let _ = r.stop.send(true);
        // Record tasks as they end while waiting for this one.
        let wait = async {
            tokio::select! {
                _ = r.ended.changed() => {}
                () = self.tasks.watch() => {}
            }
        };
        if tokio::time::timeout(STOP_DEADLINE, wait).await.is_err() {
            tracing::warn!(module = name, "did not stop within {STOP_DEADLINE:?}");
        }
        true
    }

    /// Stops every module, waiting up to [`STOP_DEADLINE`] in all; aborts
    /// what is left after that.
    pub async fn stop_all(&mut self) {
        for r in self.running.values() {
            let _ = r.stop.send(true);
        }
        self.running.clear();
        let drained = tokio::time::timeout(STOP_DEADLINE, self.tasks.drain()).await;
        if drained.is_err() {
            tracing::warn!("modules did not stop within {STOP_DEADLINE:?}; aborting them");
            self.tasks.set.shutdown().await;
        }
    }

    /// Records module tasks as they end, forever (a supervisor that panics
    /// leaves its module failed). Cancel-safe: call it in a `select!`.
    pub async fn watch(&mut self) {
        self.tasks.watch().await;
    }
}

/// Why the component `digest` (stored) or its compiled code (cached) no
/// longer matches, if either does not. An altered stored component is
/// deleted (a cache entry that fails is deleted by the cache).
fn integrity_of(
    store: &ComponentStore,
    cache: Option<&crate::runtime::ArtifactCache>,
    digest: &crate::measure::Digest,
) -> Option<String> {
    if let Err(e) = store.verify(digest) {
        let path = store.path(digest);
        let _ = std::fs::remove_file(&path);
        return Some(format!(
            "its component {} no longer matches {digest}: {e}",
            path.display()
        ));
    }
    if let Some(cache) = cache
        && let Err(why) = cache.verify(digest)
    {
        return Some(format!(
            "its compiled code {} failed authentication: {why}",
            cache.entry_path(digest).display()
        ));
    }
    None
}

/// The sandbox a module of the deployment runs in: its spec's grants, plus
/// its own data directory as `/data`, held to its disk budget.
fn sandbox_for(spec: &ModuleSpec, data_dir: &Path, output: Output) -> SandboxSpec {
    let mut s = SandboxSpec::new(spec.name.clone());
    s.args.extend(spec.args.iter().cloned());
    s.env = spec.env.clone();
    s.settings = spec.settings.clone();
    s.dirs.push(DirGrant {
        host: data_dir.to_owned(),
        guest: DATA_DIR_GUEST.to_owned(),
        budgeted: true,
        read_only: false,
    });
    s.dirs.extend(spec.dirs.iter().cloned());
    s.limits = spec.limits;
    s.allow_outbound = spec.allow_outbound.clone();
    s.output = output;
    s.meter = super::metrics::meter(&spec.name);
    s
}

/// The module tasks. Each one is tied to its records, so one that panics
/// is recorded as failed rather than left "running".
#[derive(Default, Debug)]
pub(crate) struct Tasks {
    set: JoinSet<()>,
    owners: HashMap<tokio::task::Id, ModuleRecords>,
}

impl Tasks {
    pub(crate) fn spawn_module(
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
        let owner = self.owners.remove(&id);
        if let (Some(records), Some(why)) = (owner, failure) {
            tracing::error!(module = %records.name(), "{why}");
            records.mark_failed(why);
        }
    }

    /// Records tasks as they end; returns only when there are none left.
    pub(crate) async fn drain(&mut self) {
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

/// What the supervisor tells one module's task.
struct Signals {
    /// Turns true to stop it.
    stop: watch::Receiver<bool>,
    /// Clears its backoff.
    reset: Arc<tokio::sync::Notify>,
}

/// One module's life: start, wait for its exit, record it, and start it
/// again as its restart policy and backoff say, until `stop` turns true.
async fn supervise(
    rt: Arc<Runtime>,
    spec: ModuleSpec,
    module: LoadedModule,
    sandbox: SandboxSpec,
    records: ModuleRecords,
    signals: Signals,
) {
    let Signals { mut stop, reset } = signals;
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
        let instantiating = Instant::now();
        // Shown while it runs: the status is written again with the time.
        let instantiated = {
            let (records, digest, last_exit) = (records.clone(), digest.clone(), last_exit.clone());
            move || {
                let ms = u64::try_from(instantiating.elapsed().as_millis()).unwrap_or(u64::MAX);
                records.set_instantiate_ms(ms);
                records.set_status(ModuleState::Running, starts, digest, None, last_exit);
            }
        };
        let exit = tokio::select! {
            exit = rt.start_with(&module, &sandbox, spec.timeout, instantiated) => exit,
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
            () = reset.notified() => {
                tracing::info!(module = name, "backoff reset: starting now");
                backoff.reset();
                unstable = 0;
            }
            _ = stop.wait_for(|s| *s) => {
                tracing::info!(module = name, "stopped");
                records.set_status(ModuleState::Stopped, starts, digest, None, last_exit);
                return;
            }
        }
    }
}

/// What loading a module needs: shared handles, so that loads can run as
/// tasks of their own while the supervisor starts what is loaded.
#[derive(Debug, Clone)]
struct Loader {
    rt: Arc<Runtime>,
    identity: Arc<IdentityService>,
    registry: Arc<Registry>,
    components: ComponentStore,
    state_dir: PathBuf,
    agent: Option<Agent>,
    measurer: Option<crate::attest::Measurer>,
    signatures: Arc<crate::attest::publisher::DeviceSignatures>,
    cache_entries_logged: CacheEntriesLogged,
}

impl Loader {
    async fn measure(&self, event: serde_json::Value) {
        if let Some(m) = &self.measurer {
            m.record(event).await;
        }
    }

    /// Measures and compiles `spec`'s component, then registers its
    /// identity.
    async fn load(&self, spec: &ModuleSpec) -> anyhow::Result<Loaded> {
        let data_dir = records::module_dir(&self.state_dir, &spec.name).join("data");
        state::ensure_private_dir(&data_dir)?;
        // Linked with management only if it is the agent: its name, its
        // pinned digest (which the measurement below must match), and
        // registered from the config file (not a module of that name an
        // operator or the agent added).
        let from_config = || {
            self.registry
                .module(&spec.name)
                .ok()
                .flatten()
                .is_some_and(|r| r.origin == crate::registry::Origin::Config)
        };
        let management = self
            .agent
            .as_ref()
            .filter(|a| a.name == spec.name && a.digest == spec.digest && from_config())
            .map(|a| a.link.clone());
        let (rt, store, file, digest, agent) = (
            self.rt.clone(),
            self.components.clone(),
            spec.file.clone(),
            spec.digest,
            management.is_some(),
        );
        let (signatures, signing, name) = (
            self.signatures.clone(),
            spec.signing.clone(),
            spec.name.clone(),
        );
        let checked = tokio::task::spawn_blocking(move || {
            let began = Instant::now();
            // A configured file is read and measured once, and its bytes
            // kept by digest; without one, they come from the store.
            let measured = match &file {
                Some(path) => {
                    let m = Measured::read(path)?;
                    m.verify(Some(&digest))?;
                    store.put(&m).map_err(|e| {
                        anyhow::anyhow!(
                            "cannot store the component in {}: {e}",
                            store.path(&digest).display()
                        )
                    })?;
                    m
                }
                None => store.get(&digest)?,
            };
            // Its signature, before anything is compiled.
            let publisher = crate::attest::publisher::check_component(
                &signatures,
                &signing,
                &measured.bytes,
                file.as_deref(),
                &name,
            )
            .map_err(|e| Refusal::Signature(e.to_string()))?;
            let read = began.elapsed();
            let module = if agent {
                rt.load_agent(&measured)
            } else {
                rt.load(&measured)
            };
            Ok::<_, Refusal>((module.map_err(Refusal::Load)?, publisher, read))
        })
        .await
        .map_err(|e| anyhow::anyhow!("compile task failed: {e}"))?;
        let (module, publisher, read_time) = match checked {
            Ok(m) => m,
            Err(Refusal::Load(e)) => return Err(e),
            Err(Refusal::Signature(reason)) => {
                self.measure(serde_json::json!({
                    "kind": "signature-refused",
                    "name": spec.name,
                    "digest": spec.digest.to_string(),
                    "reason": reason,
                }))
                .await;
                anyhow::bail!("signature refused: {reason}");
            }
        };
        let (svc, registry, name, digest, names) = (
            self.identity.clone(),
            self.registry.clone(),
            spec.name.clone(),
            module.digest.to_string(),
            spec.server_names.clone(),
        );
        let identity = match tokio::task::spawn_blocking(move || {
            svc.register(&name, &digest, &names, |hsm, name| {
                crate::identity::registry::load_or_register(hsm, &registry, name)
            })
        })
        .await
        {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                return Err(anyhow::Error::from(e).context("cannot register its identity"));
            }
            Err(e) => anyhow::bail!("registration task failed: {e}"),
        };
        match &module.source {
            crate::runtime::CodeSource::Recompiled(why) => {
                self.measure(serde_json::json!({
                    "kind": "cache-rejected",
                    "digest": module.digest.to_string(),
                    "reason": why.to_string(),
                }))
                .await;
            }
            // Native code from the state directory, not compiled by this
            // process: the evidence shows which, once per entry and process.
            crate::runtime::CodeSource::Cache(entry) => {
                let first = self
                    .cache_entries_logged
                    .lock()
                    .is_ok_and(|mut s| s.insert((module.digest, *entry)));
                if first {
                    self.measure(crate::attest::compiled_code_event(&module.digest, entry))
                        .await;
                }
            }
            crate::runtime::CodeSource::Compiled => {}
        }
        let (generation, digest) = (&identity.whoami().generation_id, module.digest.to_string());
        self.measure(match &publisher {
            Some(key) => crate::attest::signed_module_event(&spec.name, generation, &digest, key),
            None => crate::attest::module_event(&spec.name, generation, &digest),
        })
        .await;
        Ok(Loaded {
            module,
            identity,
            data_dir,
            management,
            read_time,
        })
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
        let registry = Arc::new(Registry::open(dir.path()).unwrap());
        let records = ModuleRecords::open(&registry, dir.path(), "m").unwrap();
        records.set_status(ModuleState::Running, 3, Some("sha256:x".into()), None, None);
        let mut tasks = Tasks::default();
        tasks.spawn_module(records, async { panic!("supervision bug") });
        tasks.drain().await;
        records::flush();
        let s = records::read_statuses(&registry).pop().unwrap().unwrap();
        assert_eq!(s.state, ModuleState::Failed);
        assert!(s.reason.unwrap().contains("supervision bug"));
        assert_eq!((s.starts, s.digest.as_deref()), (3, Some("sha256:x")));
    }
}
