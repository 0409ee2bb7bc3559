//! `edgeward daemon`: measure, load and supervise the modules of a
//! deployment until SIGINT/SIGTERM, then stop them.

mod commands;
pub mod events;
pub mod metrics;
pub mod records;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use edgeward_proto::notify::Notifier;
use tokio::sync::watch;

use crate::api;
use crate::config::Config;
use crate::runtime::{EngineOptions, Exit, Runtime, RuntimeOptions};
use crate::spec::{ModuleSpec, RestartPolicy};
use crate::state;
pub use supervisor::Supervisor;

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
pub async fn run(
    mut config: Config,
    state_dir: PathBuf,
    socket: PathBuf,
    notifier: Option<Notifier>,
) -> anyhow::Result<()> {
    let notifier = notifier.map(Arc::new);
    let notify = |f: &dyn Fn(&Notifier)| {
        if let Some(n) = &notifier {
            f(n);
        }
    };
    notify(&|n| n.status("starting: the registry, the engine, the HSM, the identity"));
    state::ensure_private_dir(&state_dir)?;
    let _lock = state::lock_for_daemon(&state_dir)?;
    let enrolled = adopt_enrollment(&mut config, &state_dir)?;
    // The boot events (this executable's hash, the configuration) are
    // computed from the start, while the registry, engine, HSM and
    // identity open: hashing the binary is the longest of them.
    // On a thread of its own at a lower priority: on a small board the
    // start-up's own work keeps its cores, and the hash takes what is left.
    let boot_events = config.runtime.measure.then(|| {
        let c = config.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("boot-measure".into())
            .spawn(move || {
                let me = rustix::thread::gettid();
                let _ = rustix::process::setpriority_process(Some(me), 10);
                // Launched by the key daemon, this executable was
                // measured before it ran.
                let mut events = Vec::with_capacity(2);
                if !crate::keyd::launched() {
                    events.push(crate::attest::executable_event());
                }
                events.push(crate::attest::config_event(&c));
                let _ = tx.send(events);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the boot measurement thread");
        }
        rx
    });
    let registry = Arc::new(open_registry(&state_dir).await?);
    let listener = api::bind(&socket, config.api.group)?;
    let metrics_listener = match config.metrics.listen {
        None => None,
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
                .with_context(|| format!("metrics.listen: cannot listen on {addr}"))?,
        ),
    };
    let fd_limit = raise_fd_limit();
    let rt = Arc::new(runtime(&config, &state_dir)?);
    tracing::info!(
        version = crate::VERSION,
        config = %config.path.display(),
        state_dir = %state_dir.display(),
        allocator = ?rt.allocator(),
        modules = config.modules.len(),
        fd_limit = ?fd_limit,
        socket = %socket.display(),
        "edgeward daemon starting"
    );
    // Signals are honoured from here on, compiling or not.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let identity = tokio::select! {
        r = open_identity(&config, &state_dir) => r?,
        why = stop_requested(&mut sigterm) => {
            tracing::info!("{}: stopping during start-up", why?);
            let _ = std::fs::remove_file(&socket);
            records::flush();
            tracing::info!("edgeward daemon stopped");
            return Ok(());
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let maintain = tokio::spawn(identity.clone().maintain(true, stop_rx.clone()));
    let key_daemon = crate::keyd::configured_socket();
    let info = api::SystemInfo {
        version: crate::VERSION.to_owned(),
        runtime_platform_version: format!("wasmtime {}", crate::WASMTIME_VERSION),
        hsm_backend: identity.hsm_backend().to_owned(),
        device_id: identity.config().device_id.clone(),
        trust_domain: identity.config().trust_domain.clone(),
        key_daemon: key_daemon.as_ref().map(|p| p.display().to_string()),
        key_daemon_user: key_daemon.and_then(|_| {
            std::env::var(edgeward_proto::KEYD_USER_ENV)
                .ok()
                .filter(|v| !v.is_empty())
        }),
    };
    // Measured before any module runs: this executable, then the
    // configuration in effect. The API serves meanwhile (reads answer at
    // once); what it would measure, and every change, waits for this.
    let measurer = measurer_for(&config, &identity, &state_dir);
    let (booted_tx, booted) = watch::channel(false);
    let boot_measurement = {
        let m = measurer.clone();
        tokio::spawn(async move {
            if let (Some(m), Some(events)) = (m, boot_events) {
                measure_boot(m, events).await;
            }
            let _ = booted_tx.send(true);
        })
    };
    let cache_hsm = identity.hsm();
    let cloud_identity = identity.clone();
    let renewal_identity = identity.clone();
    let mut supervisor = Supervisor::new(
        rt.clone(),
        identity,
        registry.clone(),
        &state_dir,
        config.runtime.echo_output,
    )
    .context("cannot create the component store")?;
    if let Some(m) = measurer.clone() {
        supervisor.set_measurer(m);
    }
    supervisor.set_signatures(config.signatures.clone());
    // Before the API serves: an upload cannot be collected before the
    // module that names it is added.
    supervisor.collect_garbage(&config.modules, Duration::ZERO);
    supervisor.collect_keys().await;
    let (commands, mut command_rx) = tokio::sync::mpsc::channel(64);
    let api_state = Arc::new(api::ApiState {
        registry,
        state_dir: state_dir.clone(),
        components: crate::components::ComponentStore::open(&state_dir)?,
        commands,
        settings: config.api.clone(),
        daemon_uid: rustix::process::getuid().as_raw(),
        ceilings: config.runtime.ceilings,
        grants: config.grants.clone(),
        info,
        started: std::time::Instant::now(),
        refusals: crate::runtime::loglimit::LogLimiter::new(
            "management-api",
            "refused management requests",
        ),
        uploads: tokio::sync::Semaphore::new(1),
        stop: stop_rx.clone(),
        attester: measurer,
        booted,
        signatures: Arc::new(config.signatures.clone()),
        groups: config
            .cloud
            .as_ref()
            .map(|c| c.groups.clone())
            .unwrap_or_default(),
    });
    // The broker connection starts beside the deployment: offline first, the
    // last applied deployment runs whether or not the broker answers.
    let cloud = match (config.cloud.clone(), &config.provisioning) {
        (Some(c), _) => Some(tokio::spawn(crate::cloud::run(
            c,
            api_state.clone(),
            cloud_identity,
            stop_rx.clone(),
        ))),
        // Not enrolled yet: enrolls in the background, then connects.
        (None, Some(p)) if !enrolled => Some(tokio::spawn(enroll_then_connect(
            p.clone(),
            api_state.clone(),
            cloud_identity,
            state_dir.clone(),
            stop_rx.clone(),
        ))),
        (None, _) => None,
    };
    // Enrolled: renewed past renew_threshold of each certificate's
    // lifetime.
    if let (Some(p), true) = (&config.provisioning, enrolled) {
        tokio::spawn(renewals(
            p.clone(),
            api_state.clone(),
            renewal_identity,
            state_dir.clone(),
            stop_rx.clone(),
        ));
    }
    let mut agent_refused = None;
    if let Some(agent) = &config.agent {
        match api::agent::watch_dir(&agent.config_dir, stop_rx.clone()) {
            Ok(changes) => supervisor.set_agent(
                &agent.spec,
                Arc::new(api::agent::AgentLink::new(api_state.clone(), changes)),
            ),
            Err(e) => {
                agent_refused = Some(format!(
                    "cannot watch its config_dir {}: {e}",
                    agent.config_dir.display()
                ));
            }
        }
    }
    let deployment = register_deployment(&config, &supervisor);
    let metrics_server = metrics_listener.map(|l| {
        tracing::info!(address = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics served at /metrics");
        tokio::spawn(metrics::serve_loopback(l, api_state.clone(), stop_rx.clone()))
    });
    let mut api_stop = stop_rx;
    let server = tokio::spawn(api::serve(
        api::peer::PeerListener::new(listener),
        api_state,
        async move {
            let _ = api_stop.wait_for(|s| *s).await;
        },
    ));
    // The compiled-cache key, wrapped by a TPM or PKCS#11 HSM: unwrapped
    // once, before any module loads, and held.
    if let (Some(_), crate::runtime::cache::CacheKey::Hsm) =
        (rt.cache(), crate::config::cache_key(&config.hsm))
    {
        let rt2 = rt.clone();
        let unlocked = tokio::task::spawn_blocking(move || {
            rt2.cache().map_or(Ok(()), |c| c.unlock(cache_hsm.as_ref()))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Err(e) = unlocked {
            tracing::error!(error = %e, "the compiled-artifact cache stays off: every module is compiled");
        }
    }
    notify(&|n| {
        n.status("starting the deployment's modules");
        // Compiling a deployment with a cold cache takes longer than a
        // service manager's default start timeout on a small board.
        n.extend_timeout(START_EXTENSION);
    });
    let stopped_early = tokio::select! {
        () = async {
            if let Err(e) = boot_measurement.await {
                tracing::error!(error = %e, "boot measurement task failed");
            }
            start_deployment(&config, &mut supervisor, agent_refused, deployment).await;
        } => None,
        why = stop_requested(&mut sigterm) => {
            tracing::info!("stopping during start-up");
            Some(why?)
        }
    };
    // The integrity watchdog ticks on this loop: a round re-measures on the
    // blocking pool, and a change waits for it.
    let mut integrity = config
        .runtime
        .integrity_interval
        .map(|d| tokio::time::interval_at(tokio::time::Instant::now() + d, d));
    // The service manager's watchdog is fed while this loop turns: a
    // wedged supervisor stops feeding it and is restarted. A command or an
    // integrity round holds the loop for as long as it takes (a deploy
    // compiles), up to COMMAND_GRACE.
    let live = Arc::new(Liveness::new());
    let mut watchdog = notifier
        .as_ref()
        .and_then(|n| n.watchdog_interval())
        .map(tokio::time::interval);
    // Ready before the first feed: the feeder's first tick is at once.
    if stopped_early.is_none() {
        let names = supervisor.names();
        notify(&|n| n.ready(&format!("serving {} modules", names.len())));
    }
    let feeder = notifier.as_ref().and_then(|n| {
        let every = n.watchdog_interval()?;
        let (n, live) = (n.clone(), live.clone());
        Some(tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                if live.alive(every) {
                    n.watchdog();
                }
            }
        }))
    });
    let why = match stopped_early {
        Some(why) => why,
        None => loop {
            tokio::select! {
                why = stop_requested(&mut sigterm) => break why?,
                _ = async {
                    match watchdog.as_mut() {
                        Some(t) => t.tick().await,
                        None => std::future::pending().await,
                    }
                } => {
                    stall_for_tests();
                    live.beat();
                }
                Some(cmd) = command_rx.recv() => {
                    live.busy();
                    commands::apply(cmd, &mut supervisor, &config).await;
                    live.beat();
                }
                () = supervisor.watch() => unreachable!("watch never returns"),
                _ = async {
                    match integrity.as_mut() {
                        Some(t) => t.tick().await,
                        None => std::future::pending().await,
                    }
                } => {
                    live.busy();
                    let n = supervisor.audit().await;
                    live.beat();
                    tracing::debug!(modules = n, "integrity round");
                }
            }
        },
    };
    tracing::info!("{why}: stopping");
    if let Some(f) = feeder {
        f.abort();
    }
    notify(&|n| n.stopping(&format!("{why}: stopping the modules")));
    let _ = stop_tx.send(true);
    command_rx.close();
    supervisor.stop_all().await;
    let _ = tokio::time::timeout(STOP_DEADLINE, maintain).await;
    if let Some(cloud) = cloud {
        let _ = tokio::time::timeout(STOP_DEADLINE, cloud).await;
    }
    let _ = tokio::time::timeout(STOP_DEADLINE, server).await;
    if let Some(m) = metrics_server {
        let _ = tokio::time::timeout(STOP_DEADLINE, m).await;
    }
    let _ = std::fs::remove_file(&socket);
    records::flush();
    tracing::info!("edgeward daemon stopped");
    Ok(())
}

/// How much longer a start may take than the service manager's start
/// timeout (sent as `EXTEND_TIMEOUT_USEC` while the deployment starts).
const START_EXTENSION: Duration = Duration::from_secs(600);

/// How long one command or integrity round may hold the supervisor's loop
/// before the watchdog goes hungry.
const COMMAND_GRACE: Duration = Duration::from_secs(600);

/// Whether the supervisor's loop turns: when it last did, and since when a
/// command holds it (milliseconds since `start`; 0: none).
struct Liveness {
    start: std::time::Instant,
    beat: std::sync::atomic::AtomicU64,
    busy_since: std::sync::atomic::AtomicU64,
}

impl Liveness {
    fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            beat: std::sync::atomic::AtomicU64::new(0),
            busy_since: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The loop turned.
    fn beat(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.busy_since.store(0, SeqCst);
        self.beat.store(self.now_ms(), SeqCst);
    }

    /// A command holds the loop from now.
    fn busy(&self) {
        self.busy_since
            .store(self.now_ms().max(1), std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether to feed a watchdog ticking `every`: the loop turned within
    /// three ticks, or a command has held it for less than COMMAND_GRACE.
    fn alive(&self, every: Duration) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.now_ms();
        let window = u64::try_from(every.as_millis().saturating_mul(3)).unwrap_or(u64::MAX);
        let busy = self.busy_since.load(SeqCst);
        now.saturating_sub(self.beat.load(SeqCst)) <= window
            || (busy != 0 && u128::from(now.saturating_sub(busy)) <= COMMAND_GRACE.as_millis())
    }
}

type Stall = fn();

static STALL: std::sync::OnceLock<Stall> = std::sync::OnceLock::new();

/// Test seam: `stall` runs in the supervisor's loop at every watchdog
/// tick (the tests' build registers one that wedges the loop when told
/// to; the shipped binary registers nothing).
pub fn set_stall_for_tests(stall: Stall) {
    let _ = STALL.set(stall);
}

fn stall_for_tests() {
    if let Some(s) = STALL.get() {
        s();
    }
}

/// The daemon's engine and cache for `config`: `edgeward compile` builds
/// the same, so what it compiles is what the daemon's cache holds.
pub fn runtime_options(config: &Config, state_dir: &Path) -> RuntimeOptions {
    let max_memory = config
        .modules
        .iter()
        .map(|m| m.limits.max_memory)
        .max()
        .unwrap_or(0);
    RuntimeOptions {
        engine: EngineOptions {
            max_instances: config.runtime.max_modules,
            ceilings: config.runtime.ceilings,
            max_memory: max_memory.max(crate::runtime::sandbox::DEFAULT_MAX_MEMORY),
            pooling: config.runtime.pooling,
            max_wasm_stack: config.runtime.max_wasm_stack,
        },
        state_dir: Some(state_dir.to_owned()),
        cache_key: crate::config::cache_key(&config.hsm),
    }
}

/// The daemon's runtime for `config`: [`runtime_options`], compiling as
/// many components at once as `[runtime] compile_concurrency` says, each in
/// a worker process unless `compile_worker = false`.
///
/// # Errors
///
/// When the engine, linker or cache cannot be set up.
pub fn runtime(config: &Config, state_dir: &Path) -> anyhow::Result<Runtime> {
    let opts = runtime_options(config, state_dir);
    let mut rt = Runtime::new(&opts)?;
    if let Some(n) = config.runtime.compile_concurrency {
        rt = rt.with_compile_concurrency(n as usize);
    }
    if let Some(limits) = config.runtime.compile_worker {
        let worker = crate::runtime::worker::CompileWorker::new(&opts.engine, limits)
            .map_err(|e| anyhow::anyhow!("cannot find this executable for compile workers: {e}"))?;
        rt = rt.with_compile_worker(worker);
    }
    Ok(rt)
}

/// Measures the boot events (this executable, the configuration) in
/// order; a failure is logged (the events are then missing from the log
/// and the register, which a verifier sees).
async fn measure_boot(
    m: crate::attest::Measurer,
    events: tokio::sync::oneshot::Receiver<Vec<Result<serde_json::Value, String>>>,
) {
    let events = match events.await {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "boot measurement task failed");
            return;
        }
    };
    let mut contents = Vec::new();
    for e in events {
        match e {
            Ok(e) => contents.push(e),
            Err(e) => tracing::error!(error = %e, "cannot measure a boot event"),
        }
    }
    match tokio::task::spawn_blocking(move || m.measure_all(contents)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "boot measurement failed"),
        Err(e) => tracing::error!(error = %e, "boot measurement task failed"),
    }
}

/// The measurer for `config`'s HSM (see [`crate::attest::register_of`]).
fn measurer_for(
    config: &Config,
    identity: &crate::identity::IdentityService,
    state_dir: &Path,
) -> Option<crate::attest::Measurer> {
    if !config.runtime.measure {
        tracing::warn!(
            "[runtime] measure = false: nothing is measured; this device cannot be attested"
        );
        return None;
    }
    let Some(pcr) = crate::attest::register_of(&config.hsm) else {
        tracing::info!("the pkcs11 backend has no measurement register: nothing is measured");
        return None;
    };
    match crate::attest::Measurer::new(identity.hsm(), state_dir, pcr) {
        Ok(m) => {
            match m.log() {
                Some(log) => {
                    tracing::info!(log = %log.path().display(), pcr, "measuring into the HSM register");
                    // Earlier boots' logs: the last one is kept (what ran
                    // before this boot), older ones go; no verifier can
                    // quote them.
                    let pruned = log.prune_other_boots(1);
                    if pruned > 0 {
                        tracing::info!(pruned, "measurement logs of older boots deleted");
                    }
                }
                None => {
                    tracing::info!(pcr, "measuring through the key daemon, which keeps the log")
                }
            }
            Some(m)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot measure: no boot id");
            None
        }
    }
}

/// Opens the registry. This daemon holds the state dir's lock, so another
/// holder can only be an operator command reading it while no daemon ran
/// (briefly): it is waited for, up to 10 s.
async fn open_registry(state_dir: &Path) -> anyhow::Result<crate::registry::Registry> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match crate::registry::Registry::open(state_dir) {
            Err(crate::registry::RegistryError::Busy(_))
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return Ok(r?),
        }
    }
}

/// Waits for SIGINT or SIGTERM; says which.
async fn stop_requested(sigterm: &mut tokio::signal::unix::Signal) -> anyhow::Result<&'static str> {
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("cannot wait for SIGINT")?; Ok("SIGINT") }
        _ = sigterm.recv() => Ok("SIGTERM"),
    }
}

/// With `[provisioning]` and an enrollment recorded in the state dir: the
/// device CA's chain and `[cloud]` are the enrollment's. Returns whether
/// the device is enrolled (`false` without `[provisioning]`).
///
/// # Errors
///
/// The record is unreadable, or for another device id than the
/// configured one.
fn adopt_enrollment(config: &mut Config, state_dir: &Path) -> anyhow::Result<bool> {
    use crate::enroll::device::{Enrolled, chain_path};
    let Some(p) = &config.provisioning else {
        return Ok(false);
    };
    if let Some(e) = Enrolled::load(state_dir).map_err(anyhow::Error::msg)?
        && e.device_id != config.identity.device_id
    {
        anyhow::bail!(
            "enrolled as {:?}, but [identity] device_id is {:?}: set it back, or remove {} to enroll again",
            e.device_id,
            config.identity.device_id,
            state_dir
                .join(crate::enroll::device::DIR)
                .join(crate::enroll::device::RECORD)
                .display()
        );
    }
    let verified = Enrolled::load_verified(
        state_dir,
        p,
        &config.identity.device_id,
        &config.identity.trust_domain,
    )
    // What fails its checks is not trusted: the device runs its last
    // deployment and enrolls again, rather than not start.
    .unwrap_or_else(|e| {
        tracing::error!(error = %e, "the stored enrollment is not used: enrolling again");
        None
    });
    let Some(e) = verified else {
        tracing::info!(
            broker = %format!("mqtts://{}:{}", p.host, p.port),
            "not enrolled: the last deployment runs while the device enrolls"
        );
        return Ok(false);
    };
    config.identity.ca_certificate = Some(chain_path(state_dir));
    match e.cloud_config(p, state_dir) {
        Ok(c) => config.cloud = c,
        // The device runs offline rather than not at all.
        Err(err) => {
            tracing::error!(error = %err, "the fleet assignment is unusable; running offline")
        }
    }
    tracing::info!(device = %e.device_id, groups = ?e.groups, broker = ?e.broker, "enrolled");
    Ok(true)
}

/// Enrolls (retrying until it succeeds or the daemon stops), writes the
/// answer into the state dir, measures the `enrolled` event after the
/// boot's, adopts the organisation's chain, then runs the cloud interface
/// with the assigned broker, if any.
async fn enroll_then_connect(
    p: crate::enroll::device::Provisioning,
    api: Arc<api::ApiState>,
    identity: Arc<crate::identity::IdentityService>,
    state_dir: PathBuf,
    stop: watch::Receiver<bool>,
) {
    use crate::enroll::device::{Enrolled, chain_path, enroll_until_done, event};
    let config = identity.config().clone();
    let Some(issued) = enroll_until_done(
        &p,
        identity.hsm(),
        &config.device_id,
        &config.trust_domain,
        stop.clone(),
    )
    .await
    else {
        return;
    };
    let dir = state_dir.clone();
    let i = issued.clone();
    let stored = match tokio::task::spawn_blocking(move || Enrolled::store(&dir, &i)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "enrolled, but the answer could not be stored; enrolling again at the next start");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "the enrollment store task failed");
            return;
        }
    };
    if let Some(m) = api.attester.clone() {
        let mut booted = api.booted.clone();
        let _ = booted.wait_for(|b| *b).await;
        let measured = match event(&issued) {
            Ok(ev) => tokio::task::spawn_blocking(move || m.measure_all(vec![ev]))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r),
            Err(e) => Err(e),
        };
        if let Err(e) = measured {
            tracing::error!(error = %e, "the enrollment could not be measured");
        }
    }
    let id = identity.clone();
    let chain = chain_path(&state_dir);
    match tokio::task::spawn_blocking(move || id.adopt_ca_certificate(&chain)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the enrolled chain could not be adopted; it is used from the next start")
        }
        Err(e) => tracing::error!(error = %e, "the chain adoption task failed"),
    }
    tracing::info!(device = %stored.device_id, groups = ?stored.groups, broker = ?stored.broker, "enrolled");
    tokio::spawn(renewals(
        p.clone(),
        api.clone(),
        identity.clone(),
        state_dir.clone(),
        stop.clone(),
    ));
    match stored.cloud_config(&p, &state_dir) {
        Ok(Some(c)) => crate::cloud::run(c, api, identity, stop).await,
        Ok(None) => tracing::info!("the organisation assigned no fleet broker: staying offline"),
        Err(e) => tracing::error!(error = %e, "the fleet assignment is unusable; running offline"),
    }
}

/// Renews the enrolled device CA certificate past `renew_threshold` of
/// its lifetime, authenticated by it (retrying with `[provisioning]`'s
/// backoff), then stores the answer, measures a `renewed` event and
/// adopts the new chain; until `stop`. The broker login certificate is
/// rewritten with it, and the cloud connection reads it at its next
/// handshake.
async fn renewals(
    p: crate::enroll::device::Provisioning,
    api: Arc<api::ApiState>,
    identity: Arc<crate::identity::IdentityService>,
    state_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    use crate::enroll::device::{Enrolled, chain_path, event, renewal_due};
    let config = identity.config().clone();
    // Whether the chain read below is one this loop just renewed.
    let mut renewed = false;
    loop {
        let chain = match std::fs::read_to_string(chain_path(&state_dir)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the enrolled chain is unreadable: not renewed");
                return;
            }
        };
        let due = match renewal_due(&chain, p.renew_threshold) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "the enrolled chain is unusable: not renewed");
                return;
            }
        };
        if !due.is_zero() {
            renewed = false;
        }
        let nap = if due.is_zero() && renewed {
            // Due again at once after a renewal (the organisation CA
            // expires before a full lifetime, say): not at once again.
            tracing::warn!(retry_in = ?p.retry_max, "the renewed certificate is due already (does the organisation CA expire soon?)");
            p.retry_max
        } else {
            // Woken at least hourly and the wall clock read again: a
            // suspended board, or a clock set after boot, renews on time.
            due.min(Duration::from_secs(3600))
        };
        tracing::debug!(
            in_s = nap.as_secs(),
            "device CA certificate renewal scheduled"
        );
        tokio::select! {
            () = tokio::time::sleep(nap) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if due > nap && !(due.is_zero() && renewed) {
            continue;
        }
        let mut delay = p.retry_min;
        let issued = loop {
            let attempt = async {
                let tls = crate::enroll::transport::tls(&p.ca_pem, None)?;
                crate::enroll::transport::renew(
                    identity.hsm(),
                    &chain,
                    crate::enroll::transport::Enrollee {
                        device_id: &config.device_id,
                        trust_domain: &config.trust_domain,
                        org_roots: &p.org_roots,
                    },
                    (&p.host, p.port, tls),
                    p.timeout,
                )
                .await
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match result {
                Ok(i) => break i,
                Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "renewal failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            delay = (delay * 2).min(p.retry_max);
        };
        let (dir, i) = (state_dir.clone(), issued.clone());
        match tokio::task::spawn_blocking(move || Enrolled::store(&dir, &i)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, retry_in = ?p.retry_max, "renewed, but the answer could not be stored");
                tokio::select! {
                    () = tokio::time::sleep(p.retry_max) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the renewal store task failed");
                continue;
            }
        }
        if let Some(m) = api.attester.clone()
            && let Ok(mut ev) = event(&issued)
        {
            ev["kind"] = "renewed".into();
            let measured = tokio::task::spawn_blocking(move || m.measure_all(vec![ev])).await;
            if !matches!(measured, Ok(Ok(()))) {
                tracing::error!("the renewal could not be measured");
            }
        }
        let (id, path) = (identity.clone(), chain_path(&state_dir));
        match tokio::task::spawn_blocking(move || id.adopt_ca_certificate(&path)).await {
            Ok(Ok(())) => {
                renewed = true;
                tracing::info!("device CA certificate renewed");
            }
            Ok(Err(e)) => tracing::error!(error = %e, "the renewed chain could not be adopted"),
            Err(e) => tracing::error!(error = %e, "the chain adoption task failed"),
        }
    }
}

/// Opens the HSM and the workload identity service (on the blocking pool).
async fn open_identity(
    config: &Config,
    state_dir: &Path,
) -> anyhow::Result<Arc<crate::identity::IdentityService>> {
    let (hsm_config, identity_config, dir) = (
        config.hsm.clone(),
        config.identity.clone(),
        state_dir.to_owned(),
    );
    let identity = tokio::task::spawn_blocking(move || {
        let hsm = crate::keyd::open(&hsm_config, &dir, &identity_config)?;
        crate::identity::IdentityService::open(hsm, identity_config, &dir)
            .map_err(anyhow::Error::from)
    })
    .await
    .context("identity set-up task failed")?
    .context("cannot set up workload identity")?;
    tracing::info!(
        trust_domain = %identity.config().trust_domain,
        device_id = %identity.config().device_id,
        "workload identity ready"
    );
    Ok(identity)
}

/// Brings the registry in line with the config's modules, then starts
/// every registered module that should run: the agent first, then the
/// others in name order. One that is refused is recorded and logged; the
/// others run.
/// Registers the config's modules (the registry's desired state) and
/// returns every record to start, so the API lists them from its first
/// answer; `None` if the registry cannot be read.
fn register_deployment(
    config: &Config,
    supervisor: &Supervisor,
) -> Option<Vec<crate::registry::ModuleRecord>> {
    let configured: Vec<_> = config.modules.iter().map(ModuleSpec::to_raw).collect();
    let records = supervisor
        .registry()
        .reconcile_config(&configured)
        .and_then(|conflicts| Ok((conflicts, supervisor.registry().modules()?)));
    let (conflicts, records) = match records {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the registry: no module started");
            return None;
        }
    };
    for name in conflicts {
        let why = format!(
            "the config names module {name:?}, which the management API added: remove one of them"
        );
        tracing::error!(module = %name, "configured module refused: {why}");
    }
    let modules: std::collections::HashSet<&str> =
        records.iter().map(|r| r.spec.name.as_str()).collect();
    let registered = supervisor.registry().names().unwrap_or_default();
    for name in registered.iter().filter(|n| !modules.contains(n.as_str())) {
        tracing::info!(module = %name, "registered module is not configured; its registration is kept (`edgeward deregister {name}` deletes it)");
    }
    Some(records)
}

/// Starts the registered modules ([`register_deployment`]): the agent
/// first.
async fn start_deployment(
    config: &Config,
    supervisor: &mut Supervisor,
    agent_refused: Option<String>,
    records: Option<Vec<crate::registry::ModuleRecord>>,
) {
    let Some(mut records) = records else {
        return;
    };
    let resolve = |p: &Path| p.to_owned();
    let agent = config.agent.as_ref().map(|a| a.spec.name.as_str());
    records.sort_by_key(|r| Some(r.spec.name.as_str()) != agent);
    let mut specs = Vec::with_capacity(records.len());
    for record in records {
        // (A module of that name the API added is not the agent: the
        // config's agent is refused as a conflict above.)
        if Some(record.spec.name.as_str()) == agent
            && record.origin == crate::registry::Origin::Config
        {
            // The agent always runs, from the config's spec.
            match (&agent_refused, &config.agent) {
                (Some(why), _) => supervisor.refuse(&record.spec.name, why),
                (None, Some(a)) => {
                    let _ = supervisor.start(a.spec.clone()).await;
                }
                (None, None) => {}
            }
            continue;
        }
        if record.desired != crate::registry::Desired::Running {
            supervisor.mark_stopped(&record.spec.name);
            continue;
        }
        let name = record.spec.name.clone();
        let origin = record.origin;
        match record.spec.validate(&resolve, &config.runtime.ceilings) {
            // What the API, the agent or the cloud registered is held to
            // today's ceilings: a config that lowered them wins.
            Ok(spec) if origin != crate::registry::Origin::Config => {
                match config.grants.check(&spec) {
                    Ok(()) => specs.push(spec),
                    Err(e) => supervisor.refuse(&name, &e),
                }
            }
            Ok(spec) => specs.push(spec),
            Err(e) => supervisor.refuse(&name, &e.to_string()),
        }
    }
    // Loaded in groups as wide as the compile queue; a refusal is recorded
    // and logged by the supervisor.
    supervisor.start_all(specs).await;
}

/// What the daemon's Landlock ruleset allows (see [`crate::confine`]):
/// its state dir, what its configuration names, system code, and the
/// files name resolution and the kernel interfaces need. Nothing of a TPM
/// or PKCS#11 backend: the key daemon opens the device, or the token's
/// module and its files (see [`crate::keyd`]), so every backend is held.
pub fn fs_policy(config: &Config, state_dir: &Path, socket: &Path) -> crate::confine::FsPolicy {
    let mut p = crate::confine::FsPolicy::default();
    p.read_write.push(state_dir.to_owned());
    if let Some(dir) = socket.parent() {
        p.sockets.push(dir.to_owned());
    }
    // System code (libraries the TCTI loader and NSS open late), and this
    // executable: the boot measurement reads it, compile workers run it.
    p.execute
        .extend(["/usr", "/lib", "/lib64", "/lib32"].map(PathBuf::from));
    if let Ok(exe) = std::env::current_exe() {
        p.execute.push(exe);
    }
    p.read_only.extend(
        [
            "/proc",
            "/sys",
            "/dev/urandom",
            "/dev/random",
            "/etc/resolv.conf",
            "/etc/hosts",
            "/etc/host.conf",
            "/etc/nsswitch.conf",
            "/etc/gai.conf",
            "/etc/services",
            "/etc/protocols",
            "/etc/localtime",
            "/etc/ld.so.cache",
        ]
        .map(PathBuf::from),
    );
    p.devices.push(PathBuf::from("/dev/null"));
    if let Some(f) = std::env::var_os(crate::attest::BOOT_ID_ENV).filter(|f| !f.is_empty()) {
        p.read_only.push(PathBuf::from(f));
    }
    p.read_only.push(config.path.clone());
    let modules = config
        .modules
        .iter()
        .chain(config.agent.as_ref().map(|a| &a.spec));
    for m in modules {
        if let Some(file) = &m.file {
            p.read_only.push(file.clone());
            // A detached signature beside it, read as it is loaded.
            p.read_only.push(crate::attest::publisher::sig_path(file));
        }
        for d in &m.dirs {
            if d.read_only {
                p.read_only.push(d.host.clone());
            } else {
                p.read_write.push(d.host.clone());
            }
        }
    }
    if let Some(a) = &config.agent {
        p.read_only.push(a.config_dir.clone());
    }
    p.read_only.extend(config.identity.ca_certificate.clone());
    // Read at each enrollment attempt, and only while the device is not
    // enrolled: afterwards the runtime cannot read it at all.
    if let Some((_, key)) = config
        .provisioning
        .as_ref()
        .and_then(|p| p.symmetric.as_ref())
        && !crate::enroll::device::enrolled_and_current(state_dir)
    {
        p.read_only.push(key.clone());
    }
    if let Some(c) = &config.cloud {
        p.read_only.push(c.ca.clone());
        p.read_only.extend(c.deployment_key_files.iter().cloned());
        // Re-read whenever it changes, and replaced by a new file then:
        // its directory.
        if let Some(dir) = c.certificate.parent() {
            p.read_only.push(dir.to_owned());
        }
        p.read_only.extend(c.local_sources.iter().cloned());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

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
