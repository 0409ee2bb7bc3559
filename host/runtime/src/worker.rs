//! Compilation apart: the daemon compiles each component in a short-lived
//! worker process (the same executable, `edgeward compile-worker`), so
//! that a component which makes Cranelift exhaust memory or spin kills
//! only the worker. The module is refused naming the limit it hit, and its
//! neighbours, which run in the daemon, never notice.
//!
//! The worker inherits the daemon's confinement (`no_new_privs`, the
//! seccomp filter) and adds its own before it reads a byte: a data-segment
//! limit (`RLIMIT_DATA`: heap and private writable mappings), a CPU-time
//! limit (`RLIMIT_CPU`) and a second seccomp filter that refuses every way
//! to open a file, make a socket or execute a program. Its environment is
//! empty; its only channels are the pipes it is handed: the component on
//! stdin, the compiled artifact on stdout, an error on stderr.
//!
//! The daemon deserializes what the worker returns and stores it in its
//! authenticated cache as if it had compiled it itself. The worker only
//! ever saw the component the daemon had already measured and accepted;
//! the separation bounds what compiling it can cost, it does not make the
//! artifact more trustworthy than an in-process compile would be.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use wasmtime::Engine;
use wasmtime::component::Component;

use super::engine::{self, EngineOptions};

/// The subcommand a worker is started with.
pub const SUBCOMMAND: &str = "compile-worker";

/// Default memory a compile may use (`[runtime] compile_memory`).
pub const DEFAULT_MEMORY: u64 = 2 << 30;
/// Default CPU time a compile may use (`[runtime] compile_time`).
pub const DEFAULT_CPU: Duration = Duration::from_secs(300);
/// The most stderr kept from a worker.
const MAX_STDERR: u64 = 16 << 10;

/// What one compile may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLimits {
    /// `RLIMIT_DATA`, in bytes.
    pub memory: u64,
    /// `RLIMIT_CPU`, rounded up to whole seconds.
    pub cpu: Duration,
}

impl Default for WorkerLimits {
    fn default() -> Self {
        Self {
            memory: DEFAULT_MEMORY,
            cpu: DEFAULT_CPU,
        }
    }
}

impl WorkerLimits {
    fn cpu_secs(&self) -> u64 {
        self.cpu.as_secs() + u64::from(self.cpu.subsec_nanos() > 0)
    }

    /// How long a worker may take in wall-clock time: its CPU limit bounds
    /// a worker that computes, this one that sleeps or is starved (four
    /// times the CPU limit, at least a minute: a busy device may run
    /// several compiles and its modules on few cores).
    fn deadline(&self) -> Duration {
        Duration::from_secs(self.cpu_secs().saturating_mul(4).max(60))
    }
}

/// Starts workers for one engine's settings.
#[derive(Debug, Clone)]
pub struct CompileWorker {
    exe: PathBuf,
    limits: WorkerLimits,
    max_wasm_stack: usize,
}

/// Why a worker produced no artifact.
#[derive(Debug)]
pub enum WorkerError {
    /// The component does not compile (the worker's error text).
    Compile(String),
    /// The worker hit its memory limit.
    Memory(u64),
    /// The worker hit its CPU-time limit.
    Cpu(u64),
    /// The worker ran past its wall-clock deadline (seconds): it was
    /// stalled (asleep, or starved), not computing.
    Deadline(u64),
    /// The worker could not be run, or died otherwise.
    Worker(String),
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Compile(e) => f.write_str(e),
            Self::Memory(n) => write!(
                f,
                "compiling it exceeded the compile worker's memory limit ({}; [runtime] compile_memory)",
                crate::units::format_size(*n)
            ),
            Self::Cpu(s) => write!(
                f,
                "compiling it exceeded the compile worker's CPU time limit ({s} s; [runtime] compile_time)"
            ),
            Self::Deadline(s) => write!(
                f,
                "the compile worker ran past its deadline ({s} s of wall-clock time, 4x [runtime] compile_time and at least 60 s) and was killed"
            ),
            Self::Worker(e) => write!(f, "the compile worker failed: {e}"),
        }
    }
}

impl CompileWorker {
    /// Workers for an engine built from `opts`, running this executable.
    ///
    /// # Errors
    ///
    /// This executable's path cannot be found.
    pub fn new(opts: &EngineOptions, limits: WorkerLimits) -> std::io::Result<Self> {
        Ok(Self {
            // The running executable itself, not the path it was started
            // from: a binary replaced on disk (an upgrade) is not run as a
            // worker until the daemon restarts and measures it.
            exe: std::fs::read_link("/proc/self/exe").map(|_| PathBuf::from("/proc/self/exe"))?,
            limits,
            max_wasm_stack: opts.max_wasm_stack,
        })
    }

    /// Its limits.
    pub fn limits(&self) -> WorkerLimits {
        self.limits
    }

    /// Compiles `bytes` in a worker and loads the artifact into `engine`.
    /// Blocks until the worker exits.
    ///
    /// # Errors
    ///
    /// See [`WorkerError`].
    pub fn compile(&self, engine: &Engine, bytes: &[u8]) -> Result<Component, WorkerError> {
        let artifact = self.run(bytes)?;
        // SAFETY: `Component::deserialize` maps its input as executable
        // code. The input is what a worker, this same executable, made
        // with `Engine::precompile_component` from the component the
        // caller measured and accepted, passed over a pipe only the two
        // processes hold: it is the code an in-process compile would have
        // made. Deserializing checks it was made for this engine's
        // settings.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize(engine, &artifact) };
        loaded.map_err(|e| {
            WorkerError::Worker(format!(
                "its artifact does not load: {:#}",
                anyhow::Error::from(e)
            ))
        })
    }

    fn run(&self, bytes: &[u8]) -> Result<Vec<u8>, WorkerError> {
        let mut child = Command::new(&self.exe)
            .arg(SUBCOMMAND)
            .arg(self.limits.memory.to_string())
            .arg(self.limits.cpu_secs().to_string())
            .arg(self.max_wasm_stack.to_string())
            .arg(std::process::id().to_string())
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                WorkerError::Worker(format!("cannot start {}: {e}", self.exe.display()))
            })?;
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(WorkerError::Worker("no pipes".into()));
        };
        // The deadline: a watcher kills the worker through a pidfd (which
        // names this process and no later one that reuses its pid) unless
        // it is told the worker is done first.
        let pid = rustix::process::Pid::from_raw(child.id() as i32);
        let pidfd = pid.and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        let (done, watch) = std::sync::mpsc::channel::<()>();
        let deadline = self.limits.deadline();
        let watcher = std::thread::spawn(move || match watch.recv_timeout(deadline) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some(fd) = &pidfd {
                    let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
                }
                true
            }
            _ => false,
        });
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.take(MAX_STDERR).read_to_string(&mut text);
            text
        });
        let artifact = std::thread::scope(|s| {
            s.spawn(move || {
                // A worker that dies early closes its end: the write fails,
                // and its exit status says why.
                let _ = stdin.write_all(bytes);
            });
            // An artifact is a few times its component at most; a worker
            // that sends more is refused, not buffered without bound.
            let cap = (bytes.len() as u64).saturating_mul(16).max(64 << 20);
            let mut out = Vec::new();
            match stdout.take(cap + 1).read_to_end(&mut out) {
                Ok(n) if n as u64 > cap => Err(std::io::Error::other(format!(
                    "it sent more than {cap} bytes"
                ))),
                Ok(_) => Ok(out),
                Err(e) => Err(e),
            }
        });
        if artifact.is_err() {
            // Over the cap, or unreadable: it may still be writing.
            let _ = child.kill();
        }
        let (status, cpu_used) = wait(&mut child)
            .map_err(|e| WorkerError::Worker(format!("cannot wait for it: {e}")))?;
        let _ = done.send(());
        let past_deadline = watcher.join().unwrap_or(false);
        let errors = errors.join().unwrap_or_default();
        let errors = errors.trim();
        // Killed above for its output: that is the reason, not the signal.
        if status.success() || artifact.is_err() {
            return artifact
                .map_err(|e| WorkerError::Worker(format!("cannot read its output: {e}")));
        }
        use std::os::unix::process::ExitStatusExt as _;
        match status.signal() {
            Some(libc::SIGKILL) if past_deadline => Err(WorkerError::Deadline(deadline.as_secs())),
            Some(libc::SIGXCPU) => Err(WorkerError::Cpu(self.limits.cpu_secs())),
            // The hard CPU limit, a second past the soft one.
            Some(libc::SIGKILL) if cpu_used.as_secs() >= self.limits.cpu_secs() => {
                Err(WorkerError::Cpu(self.limits.cpu_secs()))
            }
            Some(libc::SIGKILL) => Err(WorkerError::Worker(format!(
                "killed (SIGKILL) after {:.1} s of CPU: the kernel's out-of-memory killer, or an operator{}",
                cpu_used.as_secs_f64(),
                if errors.is_empty() {
                    String::new()
                } else {
                    format!(": {errors}")
                }
            ))),
            Some(_) if errors.contains("memory allocation of") => {
                Err(WorkerError::Memory(self.limits.memory))
            }
            Some(sig) => Err(WorkerError::Worker(format!(
                "killed by signal {sig}: {errors}"
            ))),
            None if status.code() == Some(EXIT_COMPILE) => Err(WorkerError::Compile(errors.into())),
            None => Err(WorkerError::Worker(format!("{status}: {errors}"))),
        }
    }
}

/// Reaps `child` (as `Child::wait` would) and says how much CPU time it
/// used, which tells the CPU limit's `SIGKILL` from any other.
fn wait(child: &mut std::process::Child) -> std::io::Result<(std::process::ExitStatus, Duration)> {
    use std::os::unix::process::ExitStatusExt as _;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill in.
    #[allow(unsafe_code)]
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our unreaped child (`Child` never waited for
        // it); `status` and `usage` are valid for writes.
        #[allow(unsafe_code)]
        let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    Ok((
        std::process::ExitStatus::from_raw(status),
        tv(usage.ru_utime) + tv(usage.ru_stime),
    ))
}

/// The worker's exit code when the component does not compile.
const EXIT_COMPILE: i32 = 3;

/// The worker's side (`edgeward compile-worker MEMORY CPU_SECS STACK`):
/// limits and confines itself, reads a component on stdin, writes the
/// artifact on stdout. Returns the exit code.
pub fn serve(args: &[String]) -> u8 {
    let (limits, parent) = match args {
        [memory, cpu, stack] => ((memory, cpu, stack), None),
        [memory, cpu, stack, parent] => ((memory, cpu, stack), Some(parent)),
        _ => (
            (&String::new(), &String::new(), &String::new()),
            Some(&String::new()),
        ),
    };
    let parsed = limits
        .0
        .parse::<u64>()
        .ok()
        .zip(limits.1.parse::<u64>().ok())
        .zip(limits.2.parse::<usize>().ok());
    let parent = parent.map(|p| p.parse::<i32>().ok());
    let (Some(((memory, cpu), stack)), None | Some(Some(_))) = (parsed, parent) else {
        eprintln!(
            "usage: edgeward {SUBCOMMAND} MEMORY CPU_SECS MAX_WASM_STACK [PARENT_PID] (the daemon starts it)"
        );
        return 2;
    };
    let parent = parent.flatten();
    use rustix::process::{Resource, Rlimit, setrlimit};
    let limit = |n: u64| Rlimit {
        current: Some(n),
        maximum: Some(n),
    };
    let cpu_limit = Rlimit {
        current: Some(cpu),
        // SIGXCPU at the soft limit; SIGKILL a second later if ignored.
        maximum: Some(cpu + 1),
    };
    // Dies with the daemon (and says so if the daemon is already gone).
    if rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .is_err()
        || parent.is_some_and(|want| {
            rustix::process::getppid().is_none_or(|p| p.as_raw_nonzero().get() != want)
        })
    {
        eprintln!("the compile worker's parent is gone");
        return 1;
    }
    // No descriptor but its pipes, whatever a library left open.
    // SAFETY: closes descriptors 3 and up; this process holds none it
    // uses (its pipes are 0-2, and nothing has started yet).
    #[allow(unsafe_code)]
    let _ = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if let Err(e) = setrlimit(Resource::Data, limit(memory))
        .and_then(|()| setrlimit(Resource::Cpu, cpu_limit))
        .and_then(|()| setrlimit(Resource::Core, limit(0)))
    {
        eprintln!("cannot set the compile worker's limits: {e}");
        return 1;
    }
    if let Err(e) = crate::confine::apply_worker() {
        eprintln!("cannot confine the compile worker: {e}");
        return 1;
    }
    crate::confine::run_probe();
    let mut bytes = Vec::new();
    let max = edgeward_hsm::measure::MAX_COMPONENT_SIZE;
    match std::io::stdin()
        .lock()
        .take(max + 1)
        .read_to_end(&mut bytes)
    {
        Ok(n) if n as u64 > max => {
            eprintln!("the component is over {max} bytes");
            return EXIT_COMPILE as u8;
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("cannot read the component: {e}");
            return 1;
        }
    }
    let opts = EngineOptions {
        max_instances: 1,
        ceilings: engine::ModuleCeilings::default(),
        max_memory: 0,
        // Compiled code does not depend on the allocator; the worker
        // reserves no pool.
        pooling: Some(false),
        max_wasm_stack: stack,
    };
    let engine = match engine::build(&opts) {
        Ok((e, _)) => e,
        Err(e) => {
            eprintln!("cannot create the engine: {e:#}");
            return 1;
        }
    };
    match engine.precompile_component(&bytes) {
        Ok(artifact) => match std::io::stdout().lock().write_all(&artifact) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("cannot write the artifact: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("{:#}", anyhow::Error::from(e));
            EXIT_COMPILE as u8
        }
    }
}
