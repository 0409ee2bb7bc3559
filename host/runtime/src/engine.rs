//! Engine construction: pooling allocator where the address space allows,
//! on-demand allocation otherwise, and epoch interruption always.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the engine's epoch advances. A running module yields to the
/// scheduler at each tick, so this bounds how long a module spinning without
/// host calls can hold a worker thread.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Which instance allocator the engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocator {
    /// Slots reserved up front: instantiation in microseconds.
    Pooling,
    /// Memory mapped per instance: slower starts, small address-space needs.
    OnDemand,
}

/// What one module may hold at most: the pool reserves this much per
/// module, so its totals are modules x ceilings. The daemon takes them from
/// `[runtime]`, `edgeward run` from its one module's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleCeilings {
    /// Core instances per module (default 32; Python components need up
    /// to 16).
    pub core_instances: u32,
    /// Linear memories per module (default 2; each pooled memory reserves
    /// its address space up front, so 5,000 modules must fit).
    pub memories: u32,
    /// Tables per module (default 32).
    pub tables: u32,
}

impl Default for ModuleCeilings {
    fn default() -> Self {
        Self {
            core_instances: 32,
            memories: 2,
            tables: 32,
        }
    }
}

/// Engine sizing.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Modules that may run at once (pooling slots).
    pub max_instances: u32,
    /// What each of them may hold.
    pub ceilings: ModuleCeilings,
    /// Largest linear memory any module may have, in bytes.
    pub max_memory: u64,
    /// `Some(false)` forbids pooling, `Some(true)` requires it, `None` probes.
    pub pooling: Option<bool>,
    /// Wasm stack limit per module, in bytes ([`DEFAULT_MAX_WASM_STACK`]).
    /// Deeper recursion traps with "call stack exhausted".
    pub max_wasm_stack: usize,
}

/// Default wasm stack limit (512 KiB, wasmtime's default).
pub const DEFAULT_MAX_WASM_STACK: usize = 512 << 10;

fn base_config(opts: &EngineOptions) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true);
    let stack = opts.max_wasm_stack.max(64 << 10);
    c.max_wasm_stack(stack);
    // The fiber a module runs on must hold its wasm stack plus host frames.
    c.async_stack_size((stack + (512 << 10)).max(2 << 20));
    c
}

fn pooling_config(opts: &EngineOptions) -> Config {
    let n = opts.max_instances.max(1);
    let c = opts.ceilings;
    let mut p = PoolingAllocationConfig::default();
    // Totals are modules x per-module ceilings: a module can always get
    // what its ceiling allows, whatever its neighbours hold.
    p.total_component_instances(n)
        .total_core_instances(n.saturating_mul(c.core_instances))
        .total_memories(n.saturating_mul(c.memories))
        .total_tables(n.saturating_mul(c.tables))
        .max_core_instances_per_component(c.core_instances)
        .max_memories_per_component(c.memories)
        .max_tables_per_component(c.tables)
        .max_memories_per_module(c.memories)
        .max_tables_per_module(c.tables)
        .total_stacks(n)
        .max_memory_size(usize::try_from(opts.max_memory).unwrap_or(usize::MAX));
    let mut c = base_config(opts);
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    c
}

/// Builds the engine. With `pooling: None`, the pooling allocator is tried
/// first; creating it reserves every slot's address space at once, so a
/// failure there is the probe that says this machine (a small ARM board, a
/// tight `ulimit -v`) cannot afford it, and the on-demand allocator is used.
///
/// # Errors
///
/// When the required allocator cannot be created.
pub fn build(opts: &EngineOptions) -> anyhow::Result<(Engine, Allocator)> {
    if opts.pooling != Some(false) {
        match Engine::new(&pooling_config(opts)) {
            Ok(e) => return Ok((e, Allocator::Pooling)),
            Err(e) if opts.pooling.is_none() => {
                tracing::info!(error = %e, "pooling allocator unavailable; using on-demand allocation");
            }
            Err(e) => {
                return Err(anyhow::Error::from(e).context("cannot create the pooling allocator"));
            }
        }
    }
    let mut c = base_config(opts);
    c.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    Ok((Engine::new(&c)?, Allocator::OnDemand))
}

/// Advances an engine's epoch every [`EPOCH_TICK`] until dropped.
#[derive(Debug)]
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    /// Starts the ticker thread for `engine`.
    ///
    /// # Errors
    ///
    /// When the thread cannot be spawned.
    pub fn start(engine: &Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (engine, flag) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("edgeward-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })?;
        Ok(Self { stop })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
