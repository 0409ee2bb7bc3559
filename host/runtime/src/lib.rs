//! The measured path: component file -> measurement -> (cached) compilation
//! -> `InstancePre` -> a fresh, sandboxed `Store` per start.

pub mod cache;
pub mod confine;
pub mod disk;
pub mod engine;
pub mod escape;
pub mod http_client;
pub mod logfile;
pub mod loglimit;
pub mod management;
pub mod meter;
pub mod network;
pub mod output;
pub mod sandbox;
pub mod units;
pub mod worker;
pub mod workload;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::bindings::CommandPre;

pub use cache::{ArtifactCache, Lookup, Rejection};
use edgeward_hsm::measure::{Digest, Measured};
pub use engine::{Allocator, EngineOptions};
pub use network::Outbound;
pub use sandbox::{DirGrant, Limits, ModuleState, Output, SandboxSpec};

/// Runtime settings.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Engine sizing.
    pub engine: EngineOptions,
    /// Where the compiled-artifact cache lives; `None` disables it.
    pub state_dir: Option<PathBuf>,
    /// Where its key comes from (see [`cache::CacheKey`]).
    pub cache_key: cache::CacheKey,
}

/// The engine, linker and cache shared by every module of one process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<ModuleState>,
    /// `linker` and `edgeward:host/management`: the agent's only.
    agent_linker: Linker<ModuleState>,
    cache: Option<ArtifactCache>,
    allocator: Allocator,
    ceilings: engine::ModuleCeilings,
    compiles: CompileQueue,
    /// Compiles in worker processes when set (the daemon); in this
    /// process otherwise (`edgeward run`, `edgeward compile`).
    worker: Option<worker::CompileWorker>,
    _ticker: engine::EpochTicker,
}

/// Bounds how many components one process compiles at once. Compiling a
/// large component (an interpreter: a Python or JavaScript module) peaks
/// at hundreds of MB, so ten starting together could exhaust a small
/// board's memory; loads from the cache do not queue.
#[derive(Debug)]
pub struct CompileQueue {
    /// Set at the first compilation (or when asked) unless configured:
    /// working out the default reads cgroup and memory files that a run
    /// from the cache never needs.
    limit: std::sync::OnceLock<usize>,
    running: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

/// A place in the [`CompileQueue`], given back when dropped.
#[derive(Debug)]
pub struct CompilePermit<'a>(&'a CompileQueue);

impl CompileQueue {
    /// A queue that lets `limit` (at least 1) compile at once; `None`:
    /// [`default_compile_concurrency`], worked out when first needed.
    pub fn new(limit: Option<usize>) -> Self {
        let once = std::sync::OnceLock::new();
        if let Some(n) = limit {
            let _ = once.set(n.max(1));
        }
        Self {
            limit: once,
            running: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        }
    }

    /// How many may compile at once.
    pub fn limit(&self) -> usize {
        *self.limit.get_or_init(default_compile_concurrency)
    }

    /// Blocks until a place is free. Returns the permit and whether it had
    /// to wait (another compilation of the same component may then have
    /// filled the cache).
    pub fn enter(&self) -> (CompilePermit<'_>, bool) {
        let mut n = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut waited = false;
        let limit = self.limit();
        if *n >= limit {
            meter::bump(&meter::RUNTIME.compile_waiting);
        }
        while *n >= limit {
            waited = true;
            n = self
                .freed
                .wait(n)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if waited {
            meter::RUNTIME
                .compile_waiting
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        *n += 1;
        meter::bump(&meter::RUNTIME.compiling);
        (CompilePermit(self), waited)
    }
}

impl Drop for CompilePermit<'_> {
    fn drop(&mut self) {
        let mut n = self
            .0
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *n = n.saturating_sub(1);
        meter::RUNTIME
            .compiling
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.0.freed.notify_one();
    }
}

/// The default compile concurrency: one per core and per 512 MiB of the
/// memory available at start (a large component's compilation peaks near
/// that), at least one.
pub fn default_compile_concurrency() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let by_memory = mem_available().map_or(cores, |b| usize::try_from(b >> 29).unwrap_or(cores));
    cores.min(by_memory).max(1)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("allocator", &self.allocator)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// How a module's compiled code was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSource {
    /// An authenticated cache entry, with the BLAKE3 of its payload.
    Cache([u8; 32]),
    /// Compiled now (and cached, if the cache is on).
    Compiled,
    /// Compiled now because the cache entry was refused.
    Recompiled(Rejection),
}

/// A measured, verified, compiled and pre-linked module, ready to start any
/// number of times.
pub struct LoadedModule {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    /// The digest of the bytes that were compiled.
    pub digest: Digest,
    /// How the compiled code was obtained.
    pub source: CodeSource,
    /// How long compiling (or loading the cache entry) and pre-linking took.
    pub load_time: Duration,
    /// How long it waited in the compile queue (part of `load_time`).
    pub queue_time: Duration,
    /// Why the code compiled now could not be written to the cache (it
    /// compiles again at the next start).
    pub cache_error: Option<String>,
    pre: CommandPre<ModuleState>,
}

impl fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedModule")
            .field("path", &self.path)
            .field("digest", &self.digest)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// How one start of a module ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `wasi:cli/run` returned success (or the module exited with status 0).
    Success,
    /// The module reported failure; the status when it gave one.
    Failure(i32),
    /// The module trapped: the reason, with a wasm backtrace when available.
    Trap(String),
    /// The wall-clock deadline passed and the module was stopped.
    TimedOut(Duration),
    /// The module could not be started (e.g. a granted directory is missing).
    SetupFailed(String),
}

impl Exit {
    /// Whether this is [`Exit::Success`].
    pub fn is_success(&self) -> bool {
        matches!(self, Exit::Success)
    }

    /// Its kind, as exit records and metrics name it: `success`,
    /// `failure`, `trap`, `timeout` or `setup-failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::Failure(_) => "failure",
            Exit::Trap(_) => "trap",
            Exit::TimedOut(_) => "timeout",
            Exit::SetupFailed(_) => "setup-failed",
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Success => f.write_str("exited successfully"),
            Exit::Failure(code) => write!(f, "exited with failure (status {code})"),
            Exit::Trap(reason) => write!(f, "trapped: {reason}"),
            Exit::TimedOut(d) => write!(f, "stopped: deadline of {d:?} passed"),
            Exit::SetupFailed(why) => write!(f, "could not start: {why}"),
        }
    }
}

/// A WASI call's error as one the module can handle when it failed only
/// because the module's handle table is full (its `max_handles`): `code`
/// (the interface's nearest to EMFILE) instead of a trap. Other errors pass
/// unchanged.
pub(crate) fn handles_full_as<E>(
    e: wasmtime_wasi::TrappableError<E>,
    code: E,
) -> wasmtime_wasi::TrappableError<E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match e.downcast() {
        Ok(c) => c.into(),
        Err(err)
            if err
                .downcast_ref::<wasmtime::component::ResourceTableError>()
                .is_some_and(|r| matches!(r, wasmtime::component::ResourceTableError::Full)) =>
        {
            code.into()
        }
        Err(err) => wasmtime_wasi::TrappableError::trap(err),
    }
}

/// A one-line cause (the limiter's refusal when memory ran out, else the
/// trap or error), followed by the wasm backtrace when there is one.
fn trap_reason(e: wasmtime::Error, memory_denial: Option<String>, max_handles: u32) -> String {
    let e = anyhow::Error::from(e);
    let full = e.chain().any(|c| {
        c.downcast_ref::<wasmtime::component::ResourceTableError>()
            .is_some_and(|r| matches!(r, wasmtime::component::ResourceTableError::Full))
    });
    let cause = match (memory_denial, e.downcast_ref::<wasmtime::Trap>()) {
        (Some(why), _) => format!("out of memory: {why}"),
        _ if full => format!(
            "handle limit exceeded: the module holds its max_handles ({max_handles}) files, sockets, streams and pollables at once; raise max_handles"
        ),
        (None, Some(trap)) => trap.to_string(),
        (None, None) => format!("{:#}", e.root_cause()),
    };
    // One line, whatever an error's text held.
    let cause = escape::escape_str(&cause).into_owned();
    match e.downcast_ref::<wasmtime::WasmBacktrace>() {
        Some(bt) => format!("{cause}\n{}", backtrace(bt)),
        None => cause,
    }
}

/// A wasm backtrace, one frame a line, with the names the guest chose
/// (module and function names from its name section) escaped: they cannot
/// break the lines or drive a terminal.
fn backtrace(bt: &wasmtime::WasmBacktrace) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("wasm backtrace:");
    for (i, f) in bt.frames().iter().enumerate() {
        let module = f.module().name().map(escape::escape_str);
        let func = f.func_name().map_or_else(
            || format!("<wasm function {}>", f.func_index()),
            |n| escape::escape_str(&rustc_demangle::demangle(n).to_string()).into_owned(),
        );
        let _ = write!(
            out,
            "\n  {i:>3}: {:#8x} - {}!{func}",
            f.module_offset().unwrap_or(0),
            module.as_deref().unwrap_or("<unknown>")
        );
    }
    out
}

impl Runtime {
    /// Creates the engine (see [`engine::build`]), the linker with WASI
    /// preview 2, the epoch ticker and, with a state dir, the cache.
    ///
    /// # Errors
    ///
    /// When the engine, linker or cache cannot be set up.
    pub fn new(opts: &RuntimeOptions) -> anyhow::Result<Self> {
        let (engine, allocator) = engine::build(&opts.engine)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // Name lookups go through the module's allow-list.
        linker.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::add_to_linker::<
            ModuleState,
            network::HasFilteredLookup,
        >(&mut linker, ModuleState::lookup)?;
        // Socket creation: a full handle table is an error code, not a trap.
        wasmtime_wasi::p2::bindings::sockets::tcp_create_socket::add_to_linker::<
            ModuleState,
            network::HasFilteredLookup,
        >(&mut linker, ModuleState::lookup)?;
        wasmtime_wasi::p2::bindings::sockets::udp_create_socket::add_to_linker::<
            ModuleState,
            network::HasFilteredLookup,
        >(&mut linker, ModuleState::lookup)?;
        // The filesystem holds budgeted directories to their disk budget.
        wasmtime_wasi::p2::bindings::filesystem::types::add_to_linker::<
            ModuleState,
            disk::HasBudgetedFs,
        >(&mut linker, ModuleState::filesystem)?;
        wasmtime_wasi::p2::bindings::filesystem::preopens::add_to_linker::<
            ModuleState,
            disk::HasBudgetedFs,
        >(&mut linker, ModuleState::filesystem)?;
        linker.allow_shadowing(false);
        // wasi:http (outgoing requests, allow-listed) for modules that import it.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        // Workload identity, for every module.
        workload::add_to_linker(&mut linker, |s: &mut ModuleState| &mut s.workload)?;
        // Its own settings (wasi:config/store), for every module.
        wasmtime_wasi_config::add_to_linker(&mut linker, ModuleState::settings)?;
        // Management: only in the agent's linker.
        let mut agent_linker = linker.clone();
        crate::management::add_to_linker(&mut agent_linker, |s: &mut ModuleState| {
            &mut s.management
        })?;
        let cache = match &opts.state_dir {
            Some(dir) => Some(
                ArtifactCache::open(dir, &engine, opts.cache_key)
                    .context("cannot open the compiled-artifact cache")?,
            ),
            None => None,
        };
        let ticker = engine::EpochTicker::start(&engine)?;
        Ok(Self {
            engine,
            linker,
            agent_linker,
            cache,
            allocator,
            ceilings: opts.engine.ceilings,
            compiles: CompileQueue::new(None),
            worker: None,
            _ticker: ticker,
        })
    }

    /// Compiles at most `n` components at once (see [`CompileQueue`];
    /// default [`default_compile_concurrency`]).
    #[must_use]
    pub fn with_compile_concurrency(mut self, n: usize) -> Self {
        self.compiles = CompileQueue::new(Some(n));
        self
    }

    /// Compiles each component in a worker process with `worker`'s limits
    /// (see [`worker`]).
    #[must_use]
    pub fn with_compile_worker(mut self, worker: worker::CompileWorker) -> Self {
        self.worker = Some(worker);
        self
    }

    /// The compile worker's limits, when components are compiled apart.
    pub fn compile_worker(&self) -> Option<worker::WorkerLimits> {
        self.worker.as_ref().map(worker::CompileWorker::limits)
    }

    /// Compiles `bytes`: in a worker when one is set, here otherwise.
    fn compile(&self, path: &Path, bytes: &[u8]) -> anyhow::Result<Component> {
        let (msg, invalid) = match &self.worker {
            Some(w) => match w.compile(&self.engine, bytes) {
                Ok(c) => return Ok(c),
                Err(e @ worker::WorkerError::Compile(_)) => (e.to_string(), true),
                Err(e @ worker::WorkerError::Worker(_)) => (e.to_string(), false),
                Err(e) => anyhow::bail!("cannot compile {}: {e}", path.display()),
            },
            None => match Component::new(&self.engine, bytes) {
                Ok(c) => return Ok(c),
                Err(e) => (format!("{:#}", anyhow::Error::from(e)), true),
            },
        };
        if cache::exceeds_pool_limits(&msg) {
            anyhow::bail!(
                "{} does not fit the per-module ceilings ({}): {msg}",
                path.display(),
                self.ceiling_hint()
            )
        } else if invalid {
            anyhow::bail!(
                "{} is not a valid WebAssembly component: {msg}",
                path.display()
            )
        } else {
            anyhow::bail!("cannot compile {}: {msg}", path.display())
        }
    }

    /// How many components it compiles at once.
    pub fn compile_concurrency(&self) -> usize {
        self.compiles.limit()
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The linker every module is linked with.
    pub fn linker(&self) -> &Linker<ModuleState> {
        &self.linker
    }

    /// Which allocator the engine ended up with.
    pub fn allocator(&self) -> Allocator {
        self.allocator
    }

    /// The cache, when enabled.
    pub fn cache(&self) -> Option<&ArtifactCache> {
        self.cache.as_ref()
    }

    /// Reads `path` once, measures it, refuses it unless it matches
    /// `pinned` (before any compilation), then compiles it from the same
    /// buffer (or loads the authenticated cache entry) and pre-links it.
    ///
    /// # Errors
    ///
    /// A measurement error ([`edgeward_hsm::measure::MeasureError`], including the
    /// digest mismatch naming both digests), or a compile/link error naming
    /// the file.
    pub fn load_file(&self, path: &Path, pinned: Option<&Digest>) -> anyhow::Result<LoadedModule> {
        let measured = Measured::read(path)?;
        measured.verify(pinned)?;
        self.load(&measured)
    }

    /// Compiles (or loads from cache) and pre-links an already measured and
    /// verified component, as an ordinary module: one that imports
    /// `edgeward:host/management` is refused.
    ///
    /// # Errors
    ///
    /// Compile or link errors naming the file.
    pub fn load(&self, measured: &Measured) -> anyhow::Result<LoadedModule> {
        self.load_as(measured, false)
    }

    /// [`Runtime::load`] for the agent: linked with the management
    /// interface too. The caller has checked that this is the configured
    /// agent (name and pinned digest).
    ///
    /// # Errors
    ///
    /// Compile or link errors naming the file.
    pub fn load_agent(&self, measured: &Measured) -> anyhow::Result<LoadedModule> {
        self.load_as(measured, true)
    }

    fn load_as(&self, measured: &Measured, agent: bool) -> anyhow::Result<LoadedModule> {
        let began = std::time::Instant::now();
        let mut queue_time = Duration::ZERO;
        let mut cache_error = None;
        let path = &measured.path;
        let (component, source) = match self
            .cache
            .as_ref()
            .map(|c| c.load(&self.engine, &measured.digest))
        {
            Some(Lookup::Hit(c, entry)) => {
                meter::bump(&meter::RUNTIME.cache_hits);
                (c, CodeSource::Cache(entry))
            }
            Some(Lookup::Unfit(e)) => anyhow::bail!(
                "{} does not fit the per-module ceilings ({}): {e}",
                path.display(),
                self.ceiling_hint()
            ),
            lookup => {
                let queued = std::time::Instant::now();
                let (permit, waited) = self.compiles.enter();
                queue_time = queued.elapsed();
                // Another start of the same component may have compiled it
                // while this one waited.
                let again = match (waited, &self.cache) {
                    (true, Some(cache)) => cache.load(&self.engine, &measured.digest),
                    _ => Lookup::Miss,
                };
                if let Lookup::Hit(c, entry) = again {
                    drop(permit);
                    meter::bump(&meter::RUNTIME.cache_hits);
                    (c, CodeSource::Cache(entry))
                } else {
                    if self.cache.is_some() {
                        meter::bump(&meter::RUNTIME.cache_misses);
                    }
                    if matches!(lookup, Some(Lookup::Rejected(_))) {
                        meter::bump(&meter::RUNTIME.cache_rejected);
                    }
                    meter::bump(&meter::RUNTIME.compiles);
                    let c = self.compile(path, &measured.bytes)?;
                    if let Some(cache) = &self.cache
                        && let Err(e) = cache.store(&measured.digest, &c)
                    {
                        tracing::warn!(error = %e, "cannot write compiled-artifact cache entry");
                        cache_error = Some(format!("{e:#}"));
                    }
                    drop(permit);
                    let source = match lookup {
                        Some(Lookup::Rejected(why)) => CodeSource::Recompiled(why),
                        _ => CodeSource::Compiled,
                    };
                    (c, source)
                }
            }
        };
        if !agent && crate::management::imports_management(&self.engine, &component) {
            anyhow::bail!(
                "{} imports {}, which only the agent ([agent] in the daemon's config, its digest pinned) is linked with",
                path.display(),
                crate::management::INTERFACE
            );
        }
        let linker = if agent {
            &self.agent_linker
        } else {
            &self.linker
        };
        let pre = linker.instantiate_pre(&component).map_err(|e| {
            anyhow::anyhow!(
                "cannot link {}: {:#}",
                path.display(),
                anyhow::Error::from(e)
            )
        })?;
        let pre = CommandPre::new(pre).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a command component (it must export wasi:cli/run): {:#}",
                path.display(),
                anyhow::Error::from(e)
            )
        })?;
        Ok(LoadedModule {
            path: path.clone(),
            digest: measured.digest,
            source,
            load_time: began.elapsed(),
            queue_time,
            cache_error,
            pre,
        })
    }

    /// The ceilings and the settings that raise them, for errors.
    fn ceiling_hint(&self) -> String {
        let c = self.ceilings;
        format!(
            "{} core instances, {} memories, {} tables per module; raise max_instances, max_memories or max_tables (edgeward run --max-instances, --max-memories, --max-tables; for the daemon also [runtime] module_instances, module_memories, module_tables)",
            c.core_instances, c.memories, c.tables
        )
    }

    /// Why a module could not be instantiated, naming the limit and the
    /// setting that raises it.
    fn instantiation_refused(e: &wasmtime::Error, limits: &sandbox::Limits) -> String {
        let msg = format!("{e:#}");
        let hint = if msg.contains("memories") || msg.contains("memory count") {
            format!(
                "it defines more linear memories than its max_memories ({}); raise max_memories (edgeward run --max-memories; the daemon's [runtime] module_memories bounds it)",
                limits.max_memories
            )
        } else if msg.contains("instance") {
            format!(
                "it needs more core instances than its max_instances ({}); raise max_instances (edgeward run --max-instances; the daemon's [runtime] module_instances bounds it)",
                limits.max_instances
            )
        } else if msg.contains("table") {
            format!(
                "it needs more tables than its max_tables ({}); raise max_tables (edgeward run --max-tables; the daemon's [runtime] module_tables bounds it)",
                limits.max_tables
            )
        } else if msg.contains("memory") {
            format!(
                "its initial memory does not fit its max_memory ({}); raise max_memory",
                crate::units::format_size(limits.max_memory)
            )
        } else {
            "it cannot be instantiated".to_owned()
        };
        format!("module refused: {hint}: {msg}")
    }

    /// Starts `module` once in a fresh `Store` sandboxed by `spec`, and runs
    /// it to completion or until `deadline` passes. The store is dropped
    /// afterwards, trapped or not: nothing of one start survives into the
    /// next.
    pub async fn start(
        &self,
        module: &LoadedModule,
        spec: &SandboxSpec,
        deadline: Option<Duration>,
    ) -> Exit {
        self.start_with(module, spec, deadline, || {}).await
    }

    /// [`Runtime::start`], calling `instantiated` once the instance exists
    /// and before `wasi:cli/run` is entered (supervisors and benchmarks use
    /// it to tell start-up from running).
    pub async fn start_with(
        &self,
        module: &LoadedModule,
        spec: &SandboxSpec,
        deadline: Option<Duration>,
        instantiated: impl FnOnce() + Send,
    ) -> Exit {
        spec.meter.started();
        let exit = self.run_once(module, spec, deadline, instantiated).await;
        spec.meter.exited(exit.kind());
        exit
    }

    async fn run_once(
        &self,
        module: &LoadedModule,
        spec: &SandboxSpec,
        deadline: Option<Duration>,
        instantiated: impl FnOnce() + Send,
    ) -> Exit {
        let state = match ModuleState::new(spec) {
            Ok(s) => s,
            Err(e) => return Exit::SetupFailed(format!("{e:#}")),
        };
        let limiter = state.limiter.clone();
        let usage = state.meter.clone();
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_hostcall_fuel(
            usize::try_from(spec.limits.max_hostcall_data).unwrap_or(usize::MAX),
        );
        // Yield to the scheduler at every epoch tick: a module spinning
        // without host calls still lets other tasks (and deadlines) run.
        // Its handles are counted there too (at most once a second).
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut cx| {
            cx.data_mut().count_handles();
            Ok(UpdateDeadline::Yield(1))
        });
        let limits = spec.limits;
        let run = async {
            let cmd = match module.pre.instantiate_async(&mut store).await {
                Ok(cmd) => cmd,
                // Not a trap of the module's: it does not fit its limits.
                Err(e) => return Err(Err(Self::instantiation_refused(&e, &limits))),
            };
            instantiated();
            cmd.wasi_cli_run().call_run(&mut store).await.map_err(Ok)
        };
        // Its CPU time: this thread's, across each poll of its code.
        let mut run = std::pin::pin!(run);
        let run = std::future::poll_fn(|cx| {
            let before = meter::thread_cpu();
            let r = run.as_mut().poll(cx);
            usage.add_cpu(meter::thread_cpu().saturating_sub(before));
            r
        });
        let result = match deadline {
            None => run.await,
            Some(d) => match tokio::time::timeout(d, run).await {
                Ok(r) => r,
                Err(_) => return Exit::TimedOut(d),
            },
        };
        let result = match result {
            Err(Err(refused)) => return Exit::SetupFailed(refused),
            Err(Ok(e)) => Err(e),
            Ok(r) => Ok(r),
        };
        match result {
            Ok(Ok(())) => Exit::Success,
            Ok(Err(())) => Exit::Failure(1),
            Err(e) => {
                if let Some(I32Exit(code)) = e.downcast_ref::<I32Exit>() {
                    return if *code == 0 {
                        Exit::Success
                    } else {
                        Exit::Failure(*code)
                    };
                }
                Exit::Trap(trap_reason(e, limiter.denial(), limits.max_handles))
            }
        }
    }
}
