//! The sandbox a module runs in: what it may see (preopened directories,
//! declared environment, arguments) and how much it may use (memory).
//!
//! Deny by default. A [`SandboxSpec`] starts empty: no preopens, no
//! environment, no arguments but the program name, stdin closed, no network
//! (TCP, UDP and name lookup are all refused, and no address passes the
//! socket check), stdout/stderr discarded. Every grant is explicit.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::sockets::WasiSocketsCtxView;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::disk::{BudgetedFs, DiskBudget, DiskLimit, FsBudgets};
use super::network::{FilteredLookup, NetPolicy};
use crate::units::format_size;

/// Default linear-memory limit for a module (64 MiB).
pub const DEFAULT_MAX_MEMORY: u64 = 64 << 20;

/// Default number of linear memories a module may define.
pub const DEFAULT_MAX_MEMORIES: u32 = 2;
/// Default number of handles (resource-table entries) a module may hold.
pub const DEFAULT_MAX_HANDLES: u32 = 1024;

/// What one module instance may use. Defaults are documented per field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory in bytes, the module's total over all its memories
    /// (default 64 MiB).
    pub max_memory: u64,
    /// Core instances (default 32; a Rust command component uses a few, a
    /// Python one up to 16).
    pub max_instances: u32,
    /// Linear memories (default 2): each one reserves its address space
    /// up front in the pooling allocator.
    pub max_memories: u32,
    /// Handles the module may hold at once in its resource table (default
    /// 1,024): open files and directories, sockets, streams, pollables. Each
    /// host file descriptor it holds is one of them, so this bounds those
    /// too, well below the daemon's own descriptor limit.
    pub max_handles: u32,
    /// Tables (default 32).
    pub max_tables: u32,
    /// Elements per table (default 100,000).
    pub max_table_elements: u32,
    /// Bytes the guest may hand the host in one call (default 16 MiB).
    pub max_hostcall_data: u64,
    /// Bytes a budgeted directory (the module's data directory) may hold,
    /// apparent file sizes (default 256 MiB). See [`super::disk`].
    pub max_disk: u64,
    /// Files, directories and links a budgeted directory may hold (default
    /// 10,000).
    pub max_disk_entries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_memory: DEFAULT_MAX_MEMORY,
            max_instances: 32,
            max_memories: DEFAULT_MAX_MEMORIES,
            max_handles: DEFAULT_MAX_HANDLES,
            max_tables: 32,
            max_table_elements: 100_000,
            max_hostcall_data: 16 << 20,
            max_disk: super::disk::DEFAULT_MAX_DISK,
            max_disk_entries: super::disk::DEFAULT_MAX_DISK_ENTRIES,
        }
    }
}

/// A host directory made visible to the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    /// The directory on the host.
    pub host: PathBuf,
    /// The name the module sees it under.
    pub guest: String,
    /// Held to the module's disk budget (`max_disk`, `max_disk_entries`).
    pub budgeted: bool,
    /// Only read: nothing in it can be created, written or removed.
    pub read_only: bool,
}

impl std::fmt::Display for DirGrant {
    /// As [`DirGrant::from_str`] reads it (`HOST::GUEST[::ro]`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}::{}", self.host.display(), self.guest)?;
        if self.read_only {
            f.write_str("::ro")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for DirGrant {
    type Err = String;

    /// `HOST` (seen under the same name), `HOST::GUEST`, or either with
    /// `::ro` after it (read-only).
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, read_only) = match s.strip_suffix("::ro") {
            Some(r) => (r, true),
            None => (s, false),
        };
        let (host, guest) = match rest.split_once("::") {
            Some((h, g)) => (h, g),
            None => (rest, rest),
        };
        if host.is_empty() || guest.is_empty() || guest.contains("::") {
            return Err(format!(
                "invalid directory grant {s:?}: expected HOST or HOST::GUEST, then ::ro for read-only"
            ));
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: guest.to_owned(),
            budgeted: false,
            read_only,
        })
    }
}

/// Where a module's stdout and stderr go.
#[derive(Debug, Clone)]
pub enum Output {
    /// Discarded.
    Discard,
    /// Passed through to this process's stdout/stderr unchanged.
    Inherit,
    /// Each line written to this process's stdout/stderr behind `prefix`.
    Prefixed(Arc<str>),
    /// Timestamped lines into the module's bounded log, echoed behind
    /// `prefix` on this process's stdout/stderr when `echo` is set.
    Module {
        /// The module's name.
        prefix: Arc<str>,
        /// Echo to the daemon's own stdout/stderr too.
        echo: bool,
        /// The module's log.
        log: Arc<super::logfile::RotatingLog>,
    },
}

/// Everything a module instance is granted. Built per start.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// argv, including argv[0].
    pub args: Vec<String>,
    /// Declared environment.
    pub env: Vec<(String, String)>,
    /// What `wasi:config/store` answers (empty: nothing).
    pub settings: std::collections::BTreeMap<String, String>,
    /// Preopened directories.
    pub dirs: Vec<DirGrant>,
    /// Resource limits.
    pub limits: Limits,
    /// Outbound destinations (empty: no network at all).
    pub allow_outbound: Vec<super::network::Outbound>,
    /// stdout/stderr destination.
    pub output: Output,
    /// The module's workload identity (`None`: the `workload` calls
    /// return `unavailable`, `whoami` only names the program).
    pub identity: Option<Arc<edgeward_trust::identity::IdentityHandle>>,
    /// The agent's link to the management service (`None` for every other
    /// module; its calls are then refused even if it were linked).
    pub management: Option<Arc<dyn crate::management::Management>>,
    /// Where what it uses is counted (the daemon's metrics read it).
    pub meter: Arc<super::meter::ModuleMeter>,
}

impl SandboxSpec {
    /// The empty grant: only argv[0] = `program`.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            args: vec![program.into()],
            env: Vec::new(),
            settings: std::collections::BTreeMap::new(),
            dirs: Vec::new(),
            limits: Limits::default(),
            allow_outbound: Vec::new(),
            output: Output::Discard,
            identity: None,
            management: None,
            meter: Arc::default(),
        }
    }

    /// Builds the WASI context for one start.
    ///
    /// # Errors
    ///
    /// When a granted directory cannot be opened; the message names it.
    pub fn build_wasi(&self, net: &NetPolicy) -> anyhow::Result<WasiCtx> {
        let mut b = WasiCtxBuilder::new();
        let policy = net.clone();
        b.args(&self.args)
            .envs(&self.env)
            .allow_tcp(!net.is_empty())
            .allow_udp(!net.is_empty())
            .allow_ip_name_lookup(net.has_names())
            .socket_addr_check(move |addr, use_| {
                let policy = policy.clone();
                Box::pin(async move { policy.check(addr, use_).await })
            });
        for d in &self.dirs {
            let perms = if d.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            b.preopened_dir(&d.host, &d.guest, perms)
                .map_err(|e| anyhow::anyhow!("cannot grant directory {}: {e}", d.host.display()))?;
        }
        match &self.output {
            Output::Discard => {}
            Output::Inherit => {
                b.inherit_stdout().inherit_stderr();
            }
            Output::Prefixed(prefix) => {
                b.stdout(super::output::LinePrefixed::stdout(prefix.clone()));
                b.stderr(super::output::LinePrefixed::stderr(prefix.clone()));
            }
            Output::Module { prefix, echo, log } => {
                use super::output::LinePrefixed;
                b.stdout(LinePrefixed::module(
                    prefix.clone(),
                    false,
                    *echo,
                    log.clone(),
                    self.meter.clone(),
                ));
                b.stderr(LinePrefixed::module(
                    prefix.clone(),
                    true,
                    *echo,
                    log.clone(),
                    self.meter.clone(),
                ));
            }
        }
        Ok(b.build())
    }
}

/// Per-store state of a running module.
pub struct ModuleState {
    wasi: WasiCtx,
    table: ResourceTable,
    net: NetPolicy,
    http: wasmtime_wasi_http::WasiHttpCtx,
    http_hooks: super::http_client::HttpHooks,
    pub(crate) workload: super::workload::WorkloadCtx,
    pub(crate) limiter: Limiter,
    disk: FsBudgets,
    settings: wasmtime_wasi_config::WasiConfigVariables,
    pub(crate) management: crate::management::ManagementCtx,
    pub(crate) meter: Arc<super::meter::ModuleMeter>,
    /// When its handles were last counted, and how many there were.
    handles_counted: std::time::Instant,
    handles: u64,
}

impl Drop for ModuleState {
    /// The instance is gone: its share of the module's gauges goes too.
    fn drop(&mut self) {
        self.meter
            .add_memory(-i64::try_from(self.limiter.used).unwrap_or(i64::MAX));
        self.meter
            .add_handles(-i64::try_from(self.handles).unwrap_or(i64::MAX));
    }
}

impl std::fmt::Debug for ModuleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleState").finish_non_exhaustive()
    }
}

impl ModuleState {
    /// State for one start under `spec`.
    ///
    /// # Errors
    ///
    /// See [`SandboxSpec::build_wasi`]; or a budgeted directory's usage
    /// cannot be measured.
    pub fn new(spec: &SandboxSpec) -> anyhow::Result<Self> {
        let program = spec.args.first().map(String::as_str).unwrap_or("module");
        let net = NetPolicy::new(program, &spec.allow_outbound);
        let limit = DiskLimit {
            max_bytes: spec.limits.max_disk,
            max_entries: spec.limits.max_disk_entries,
        };
        let budgets = spec
            .dirs
            .iter()
            .map(|d| {
                d.budgeted
                    .then(|| DiskBudget::open(program, &d.host, &d.guest, limit).map(Arc::new))
                    .transpose()
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        spec.meter
            .set_disks(budgets.iter().flatten().cloned().collect());
        Ok(Self {
            disk: FsBudgets::new(budgets),
            wasi: spec.build_wasi(&net)?,
            table: {
                let mut t = ResourceTable::new();
                t.set_max_capacity(spec.limits.max_handles as usize);
                t
            },
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_hooks: super::http_client::HttpHooks {
                policy: net.clone(),
            },
            net,
            workload: super::workload::WorkloadCtx::new(
                spec.identity.clone(),
                program,
                spec.meter.clone(),
            ),
            limiter: Limiter::new(&spec.limits, spec.meter.clone()),
            settings: spec.settings.iter().collect(),
            management: crate::management::ManagementCtx::new(spec.management.clone()),
            meter: spec.meter.clone(),
            handles_counted: std::time::Instant::now(),
            handles: 0,
        })
    }

    /// Counts its handles for the meter, at most once a second (called at
    /// each epoch tick while its code runs).
    pub(crate) fn count_handles(&mut self) {
        if self.handles_counted.elapsed() >= std::time::Duration::from_secs(1) {
            self.handles_counted = std::time::Instant::now();
            let n = self.table.iter_mut().count() as u64;
            let delta = i128::from(n) - i128::from(self.handles);
            self.meter
                .add_handles(i64::try_from(delta).unwrap_or_default());
            self.handles = n;
        }
    }

    /// This module's settings, as `wasi:config/store` answers them.
    pub fn settings(&mut self) -> wasmtime_wasi_config::WasiConfig<'_> {
        wasmtime_wasi_config::WasiConfig::from(&self.settings)
    }

    /// The filesystem, with its budgeted directories held to their budget.
    pub fn filesystem(&mut self) -> BudgetedFs<'_> {
        BudgetedFs {
            fs: wasmtime_wasi::filesystem::WasiFilesystemCtxView {
                ctx: self.wasi.filesystem(),
                table: &mut self.table,
            },
            budgets: &mut self.disk,
        }
    }

    /// The filtered name lookup over this module's sockets context.
    pub fn lookup(&mut self) -> FilteredLookup<'_> {
        FilteredLookup {
            sockets: WasiSocketsCtxView {
                ctx: self.wasi.sockets(),
                table: &mut self.table,
            },
            policy: &self.net,
        }
    }
}

impl wasmtime_wasi_http::WasiHttpView for ModuleState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            hooks: &mut self.http_hooks,
            table: &mut self.table,
            ctx: &mut self.http,
        }
    }
}

impl WasiView for ModuleState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Enforces [`Limits`]. Linear memory is counted over all of a module's
/// memories (a component with several cannot take that many times the
/// limit). Refuses growth past the limit and remembers that it did, so a
/// trap that follows (Rust's allocator aborts on a failed grow) is reported
/// as "out of memory" rather than as a bare `unreachable`.
#[derive(Debug, Clone)]
pub struct Limiter {
    max_memory: usize,
    /// Bytes of linear memory the module's memories hold together.
    used: usize,
    limits: Limits,
    denied: Arc<Mutex<Option<String>>>,
    meter: Arc<super::meter::ModuleMeter>,
}

impl Limiter {
    fn new(limits: &Limits, meter: Arc<super::meter::ModuleMeter>) -> Self {
        Self {
            max_memory: usize::try_from(limits.max_memory).unwrap_or(usize::MAX),
            used: 0,
            limits: *limits,
            denied: Arc::default(),
            meter,
        }
    }

    /// The last refusal, if any, as a human-readable reason.
    pub fn denial(&self) -> Option<String> {
        self.denied.lock().map(|g| g.clone()).unwrap_or(None)
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current);
        let total = self.used.saturating_add(growth);
        let within_own = maximum.is_none_or(|m| desired <= m);
        if within_own && total <= self.max_memory {
            self.used = total;
            self.meter
                .add_memory(i64::try_from(growth).unwrap_or(i64::MAX));
            return Ok(true);
        }
        let reason = format!(
            "memory limit exceeded: growing linear memory from {} to {} would bring the module's memories to {}, past its {} limit (max_memory, a total over all its memories)",
            format_size(current as u64),
            format_size(desired as u64),
            format_size(total as u64),
            format_size(self.max_memory as u64),
        );
        if let Ok(mut g) = self.denied.lock() {
            *g = Some(reason);
        }
        Ok(false)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.limits.max_table_elements as usize)
    }

    fn instances(&self) -> usize {
        self.limits.max_instances as usize
    }

    fn tables(&self) -> usize {
        self.limits.max_tables as usize
    }

    fn memories(&self) -> usize {
        self.limits.max_memories as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_grant_syntax() {
        let g: DirGrant = "/srv/data::/data".parse().expect("parse");
        assert_eq!(g.host, PathBuf::from("/srv/data"));
        assert_eq!(g.guest, "/data");
        let g: DirGrant = "data".parse().expect("parse");
        assert_eq!(g.guest, "data");
        assert!("::/x".parse::<DirGrant>().is_err());
        assert!("/x::".parse::<DirGrant>().is_err());
        // Read-only, and back to text.
        let g: DirGrant = "/etc/agent::/config::ro".parse().expect("parse");
        assert!(g.read_only && g.guest == "/config");
        assert_eq!(g.to_string(), "/etc/agent::/config::ro");
        let g: DirGrant = "/srv/data::/data".parse().expect("parse");
        assert!(!g.read_only);
        assert_eq!(g.to_string(), "/srv/data::/data");
        assert!("/x::/y::rw".parse::<DirGrant>().is_err());
        assert!(
            "/x::ro"
                .parse::<DirGrant>()
                .is_ok_and(|g| g.read_only && g.guest == "/x")
        );
    }

    #[test]
    fn limiter_refuses_and_explains() {
        let mut l = Limiter::new(
            &Limits {
                max_memory: 1 << 20,
                ..Limits::default()
            },
            Arc::default(),
        );
        assert!(l.memory_growing(0, 1 << 20, None).expect("ok"));
        assert!(!l.memory_growing(1 << 20, 2 << 20, None).expect("ok"));
        let why = l.denial().expect("recorded");
        assert!(
            why.contains("memory limit") && why.contains("1 MiB"),
            "{why}"
        );
    }

    /// The limit is a total: two memories share it.
    #[test]
    fn memory_is_limited_over_all_memories() {
        let mut l = Limiter::new(
            &Limits {
                max_memory: 4 << 20,
                ..Limits::default()
            },
            Arc::default(),
        );
        // Instantiation: two memories of 1 MiB each.
        assert!(l.memory_growing(0, 1 << 20, None).expect("ok"));
        assert!(l.memory_growing(0, 1 << 20, None).expect("ok"));
        // The first grows to 3 MiB: 4 MiB in all.
        assert!(l.memory_growing(1 << 20, 3 << 20, None).expect("ok"));
        // The second may not grow at all now.
        assert!(
            !l.memory_growing(1 << 20, (1 << 20) + 65536, None)
                .expect("ok")
        );
        assert!(l.denial().expect("recorded").contains("total"));
        assert_eq!(l.memories(), DEFAULT_MAX_MEMORIES as usize);
    }
}
