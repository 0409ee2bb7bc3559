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
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::units::format_size;

/// Default linear-memory limit for a module (64 MiB).
pub const DEFAULT_MAX_MEMORY: u64 = 64 << 20;

/// A host directory made visible to the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    /// The directory on the host.
    pub host: PathBuf,
    /// The name the module sees it under.
    pub guest: String,
}

impl std::str::FromStr for DirGrant {
    type Err = String;

    /// `HOST` (seen under the same name) or `HOST::GUEST`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, guest) = match s.split_once("::") {
            Some((h, g)) => (h, g),
            None => (s, s),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(format!(
                "invalid directory grant {s:?}: expected HOST or HOST::GUEST"
            ));
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: guest.to_owned(),
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
    /// Preopened directories.
    pub dirs: Vec<DirGrant>,
    /// Linear-memory limit per memory, in bytes.
    pub max_memory: u64,
    /// stdout/stderr destination.
    pub output: Output,
}

impl SandboxSpec {
    /// The empty grant: only argv[0] = `program`.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            args: vec![program.into()],
            env: Vec::new(),
            dirs: Vec::new(),
            max_memory: DEFAULT_MAX_MEMORY,
            output: Output::Discard,
        }
    }

    /// Builds the WASI context for one start.
    ///
    /// # Errors
    ///
    /// When a granted directory cannot be opened; the message names it.
    pub fn build_wasi(&self) -> anyhow::Result<WasiCtx> {
        let mut b = WasiCtxBuilder::new();
        b.args(&self.args)
            .envs(&self.env)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        for d in &self.dirs {
            b.preopened_dir(&d.host, &d.guest, FsPerms::ReadWrite)
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
                ));
                b.stderr(LinePrefixed::module(
                    prefix.clone(),
                    true,
                    *echo,
                    log.clone(),
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
    pub(crate) limiter: MemoryLimiter,
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
    /// See [`SandboxSpec::build_wasi`].
    pub fn new(spec: &SandboxSpec) -> anyhow::Result<Self> {
        Ok(Self {
            wasi: spec.build_wasi()?,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(spec.max_memory),
        })
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

/// Refuses memory growth past a limit and remembers that it did, so a trap
/// that follows (Rust's allocator aborts on a failed grow) is reported as
/// "out of memory" rather than as a bare `unreachable`.
#[derive(Debug, Clone)]
pub struct MemoryLimiter {
    max_memory: usize,
    denied: Arc<Mutex<Option<String>>>,
}

impl MemoryLimiter {
    fn new(max_memory: u64) -> Self {
        Self {
            max_memory: usize::try_from(max_memory).unwrap_or(usize::MAX),
            denied: Arc::default(),
        }
    }

    /// The last refusal, if any, as a human-readable reason.
    pub fn denial(&self) -> Option<String> {
        self.denied.lock().map(|g| g.clone()).unwrap_or(None)
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let limit = maximum.map_or(self.max_memory, |m| m.min(self.max_memory));
        if desired <= limit {
            return Ok(true);
        }
        let reason = format!(
            "memory limit exceeded: growing linear memory from {} to {} would pass the {} limit",
            format_size(current as u64),
            format_size(desired as u64),
            format_size(limit as u64),
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
        // Tables hold function references; 100k entries is far beyond what
        // any real module uses and bounds a table bomb.
        Ok(desired <= 100_000)
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
    }

    #[test]
    fn limiter_refuses_and_explains() {
        let mut l = MemoryLimiter::new(1 << 20);
        assert!(l.memory_growing(0, 1 << 20, None).expect("ok"));
        assert!(!l.memory_growing(1 << 20, 2 << 20, None).expect("ok"));
        let why = l.denial().expect("recorded");
        assert!(
            why.contains("memory limit") && why.contains("1 MiB"),
            "{why}"
        );
    }
}
