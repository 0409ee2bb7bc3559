//! The measured launcher (`edgeward-keyd --launch EXE -- ARGS`): the key
//! daemon measures the runtime's executable (through the descriptor it then
//! executes: nothing can swap the bytes in between) and its configuration
//! file, logs and extends both, and only then starts the runtime as the
//! runtime's user with the key daemon's socket. It supervises it: a failed
//! runtime is restarted with backoff, each start and each exit measured; a
//! runtime that exits cleanly by itself (the service manager stopped it)
//! stops the key daemon too; SIGTERM or SIGINT to the key daemon stops the
//! runtime first, then the key daemon.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd as _;
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use edgeward_hsm::measure::Digest;
use serde_json::{Value, json};

use crate::server::Server;

/// Set in the runtime's environment to the key daemon's pid: the runtime
/// checks it against its parent and then leaves the measurement of its
/// executable to the launcher.
pub const LAUNCHER_ENV: &str = "EDGEWARD_KEYD_LAUNCHER";
/// Set in the runtime's environment to the key daemon's socket.
pub const SOCKET_ENV: &str = "EDGEWARD_KEYD";

/// The first wait before a restart; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait before a restart.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A run at least this long resets the backoff.
pub const STABLE: Duration = Duration::from_secs(60);
/// What a key daemon told `--no-measure` extends its register with (the
/// SHA-256 of these bytes), and logs nowhere: no log replays to the
/// register again this boot.
pub const UNMEASURED: &[u8] = b"edgeward-keyd --no-measure: this boot is not attested";

/// How long a stopping runtime has before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// What the key daemon launches.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The runtime's executable.
    pub exe: PathBuf,
    /// Its arguments (after `--`).
    pub args: Vec<String>,
    /// The user it runs as; `None`: the key daemon's own (allowed only
    /// when the key daemon is not root).
    pub uid: Option<u32>,
    /// Its group (with a uid: given, or the user's primary group).
    pub gid: Option<u32>,
    /// Its whole environment (from the key daemon's, by [`ENV_PASSED`]),
    /// besides the two variables the launcher sets.
    pub env: Vec<(String, String)>,
}

/// The variables of the key daemon's environment the runtime gets: the
/// runtime's own (`EDGEWARD_*`), the locale, time zone and path, and the
/// service manager's logging and backtrace switches. Nothing else (no
/// `LD_PRELOAD`, `LD_LIBRARY_PATH`, `GLIBC_TUNABLES`): the loader would
/// honour them, the process not being set-uid.
pub const ENV_PASSED: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "JOURNAL_STREAM",
    "INVOCATION_ID",
    "RUST_BACKTRACE",
];

/// Whether the runtime gets the variable `name` (see [`ENV_PASSED`]).
pub fn env_passed(name: &str) -> bool {
    (name.starts_with("EDGEWARD_") && !matches!(name, SOCKET_ENV | LAUNCHER_ENV))
        || ENV_PASSED.contains(&name)
}

/// The configuration file the runtime reads, as `edgeward` chooses it:
/// `--config F` or `--config=F`, then `$EDGEWARD_CONFIG`, then
/// `/etc/edgeward/config.toml` if it exists.
const DEFAULT_CONFIG: &str = "/etc/edgeward/config.toml";

impl Launch {
    /// The configuration file the runtime will read (see
    /// [`DEFAULT_CONFIG`]), if any.
    pub fn config_file(&self) -> Option<PathBuf> {
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if a == "--config" {
                return it.next().map(PathBuf::from);
            }
            if let Some(f) = a.strip_prefix("--config=") {
                return Some(PathBuf::from(f));
            }
        }
        if let Some((_, v)) = self.env.iter().find(|(k, _)| k == "EDGEWARD_CONFIG") {
            return Some(PathBuf::from(v));
        }
        Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists())
    }

    /// What the key daemon's own measurement says of the launch.
    pub fn describe(&self) -> Value {
        json!({
            "exe": self.exe.display().to_string(),
            "args": self.args,
            "uid": self.uid,
            "gid": self.gid,
            "env": self.env_lines(),
        })
    }

    /// The runtime's environment as `NAME=value` lines, as measured.
    fn env_lines(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}

/// The SHA-256 of everything `r` yields.
fn digest_of(r: impl Read) -> std::io::Result<Digest> {
    Digest::of_reader(r)
}

/// The key daemon's own executable, hashed: read through
/// `/proc/self/exe`, the file that is running.
#[derive(Debug)]
pub struct SelfHash {
    path: PathBuf,
    digest: Digest,
    /// How long the hash took.
    pub took: Duration,
}

impl SelfHash {
    /// Hashes the running executable.
    ///
    /// # Errors
    ///
    /// Its executable cannot be read.
    pub fn new() -> Result<Self, String> {
        let t = Instant::now();
        let path = std::fs::read_link("/proc/self/exe")
            .map_err(|e| format!("cannot find the key daemon's executable: {e}"))?;
        let f = File::open("/proc/self/exe")
            .map_err(|e| format!("cannot read the key daemon's executable: {e}"))?;
        let digest =
            digest_of(f).map_err(|e| format!("cannot read the key daemon's executable: {e}"))?;
        Ok(Self {
            path,
            digest,
            took: t.elapsed(),
        })
    }

    /// The key daemon's own measurement event: this hash and its effective
    /// configuration.
    pub fn event(&self, config: Value) -> Value {
        json!({
            "kind": "key-daemon",
            "path": self.path.display().to_string(),
            "version": env!("CARGO_PKG_VERSION"),
            "sha256": self.digest.to_string(),
            "config": config,
        })
    }
}

/// The hashing a key daemon does at start, on one thread of its own while
/// the main thread opens the HSM (a TPM's primary key and loads take far
/// longer than a hash, and wait on the device): its own executable first,
/// then the runtime's first start. One thread, not two: hashes on two
/// threads contend for the same cores and caches. The log still takes the
/// events in order.
#[derive(Debug)]
pub struct Hashing {
    own: Option<std::sync::mpsc::Receiver<Result<SelfHash, String>>>,
    thread: Option<std::thread::JoinHandle<Option<Result<Measured, String>>>>,
}

impl Hashing {
    /// Starts hashing: itself if `own`, then what `launch` starts first
    /// (hashed if `hash_runtime`, see [`measure`]).
    pub fn start(own: bool, launch: Option<&Launch>, hash_runtime: bool) -> Self {
        if !own && launch.is_none() {
            return Self {
                own: None,
                thread: None,
            };
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let launch = launch.cloned();
        let thread = std::thread::Builder::new()
            .name("keyd-hash".into())
            .spawn(move || {
                if own {
                    let _ = tx.send(SelfHash::new());
                }
                drop(tx);
                launch.map(|l| measure(&l, 1, hash_runtime))
            })
            .ok();
        Self {
            own: (own && thread.is_some()).then_some(rx),
            thread,
        }
    }

    /// The key daemon's own hash: from the thread, or, if it could not
    /// start, done now.
    ///
    /// # Errors
    ///
    /// Its executable cannot be read.
    pub fn own(&mut self) -> Result<SelfHash, String> {
        match self.own.take().map(|rx| rx.recv()) {
            Some(Ok(hashed)) => hashed,
            _ => SelfHash::new(),
        }
    }

    /// Waits for the thread to end (the key daemon does before it drops
    /// its capabilities: they are a thread's own); the runtime's first
    /// start measured, for [`Supervisor::new`], if it could be.
    pub fn finish(self) -> Option<Result<Measured, String>> {
        self.thread?
            .join()
            .unwrap_or_else(|_| Some(Err("the hashing thread failed".into())))
    }
}

/// A file the key daemon launches or measures for the runtime must be one
/// nobody but root and the key daemon's user can change.
fn check_owner(path: &Path, meta: &std::fs::Metadata, what: &str) -> Result<(), String> {
    if !meta.is_file() {
        return Err(format!("{what} {}: not a regular file", path.display()));
    }
    edgeward_hsm::state::only_root_or_me(meta)
        .map_err(|why| format!("{what} {}: {why}", path.display()))
}

/// The runtime's executable, opened and measured: the descriptor is what
/// is executed.
#[derive(Debug)]
pub struct Measured {
    file: File,
    events: Vec<Value>,
    /// How long the executable's hash took.
    took: Duration,
    /// Its size and change time when it was opened: a write since (by
    /// its owner) changes them.
    stamp: (u64, i64, i64),
}

/// What [`Measured::stamp`] compares.
fn stamp(meta: &std::fs::Metadata) -> (u64, i64, i64) {
    use std::os::unix::fs::MetadataExt as _;
    (meta.len(), meta.ctime(), meta.ctime_nsec())
}

impl Measured {
    /// Whether the file is as it was when it was measured.
    fn unchanged(&self) -> bool {
        self.file.metadata().is_ok_and(|m| stamp(&m) == self.stamp)
    }
}

/// Opens `path` for reading without blocking on a FIFO or taking a
/// terminal; the caller checks it is a regular file.
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32)
        .open(path)
}

/// Opens and measures what start number `start` launches; without `hash`
/// (nothing keeps a log: a PKCS#11 token, `--no-measure`) it is only
/// opened and checked, and there are no events.
fn measure(launch: &Launch, start: u64, hash: bool) -> Result<Measured, String> {
    let file = open_nonblocking(&launch.exe).map_err(|e| {
        format!(
            "cannot open the runtime's executable {}: {e}",
            launch.exe.display()
        )
    })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", launch.exe.display()))?;
    check_owner(&launch.exe, &meta, "the runtime's executable")?;
    if !hash {
        return Ok(Measured {
            file,
            events: Vec::new(),
            took: Duration::ZERO,
            stamp: stamp(&meta),
        });
    }
    let t = Instant::now();
    let digest = digest_of(&file).map_err(|e| format!("{}: {e}", launch.exe.display()))?;
    let took = t.elapsed();
    let mut events = vec![json!({
        "kind": "executable",
        "path": launch.exe.display().to_string(),
        "sha256": digest.to_string(),
        "launched_by": "key-daemon",
        "start": start,
        "uid": launch.uid,
        "gid": launch.gid,
        "env": launch.env_lines(),
    })];
    if let Some(cfg) = launch.config_file() {
        let f = open_nonblocking(&cfg).map_err(|e| {
            format!(
                "cannot read the runtime's configuration {}: {e}",
                cfg.display()
            )
        })?;
        let meta = f
            .metadata()
            .map_err(|e| format!("{}: {e}", cfg.display()))?;
        check_owner(&cfg, &meta, "the runtime's configuration")?;
        let d = digest_of(f).map_err(|e| format!("{}: {e}", cfg.display()))?;
        events.push(json!({
            "kind": "runtime-config",
            "path": cfg.display().to_string(),
            "sha256": d.to_string(),
            "start": start,
        }));
    }
    Ok(Measured {
        file,
        events,
        took,
        stamp: stamp(&meta),
    })
}

/// How a run ended, as the log says it.
fn describe_exit(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

/// The supervisor of one launched runtime.
pub struct Supervisor {
    launch: Launch,
    socket: PathBuf,
    server: Arc<Server>,
    stopping: AtomicBool,
    /// The running runtime (a pidfd: a signal never reaches another
    /// process that reused its pid).
    running: Mutex<Option<OwnedFd>>,
    wake: (Mutex<()>, Condvar),
    /// The first start, measured while the key daemon started.
    first: Mutex<Option<Result<Measured, String>>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("launch", &self.launch)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor launching `launch` with `socket`, measuring through
    /// `server`'s log; `first`: its first start as [`Hashing::finish`] on
    /// the same launch measured it, taken instead of measuring then.
    pub fn new(
        launch: Launch,
        socket: PathBuf,
        server: Arc<Server>,
        first: Option<Result<Measured, String>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            launch,
            socket,
            server,
            stopping: AtomicBool::new(false),
            running: Mutex::new(None),
            wake: (Mutex::new(()), Condvar::new()),
            first: Mutex::new(first),
        })
    }

    fn record(&self, events: Vec<Value>) -> Result<(), String> {
        self.server.measure(events)
    }

    fn spawn(&self, start: u64) -> Result<std::process::Child, String> {
        let ahead = if start == 1 {
            self.first.lock().ok().and_then(|mut f| f.take())
        } else {
            None
        };
        let m = match ahead {
            // Measured while the key daemon started: taken if the file has
            // not been written since (its owner could have).
            Some(Ok(m)) if m.unchanged() => m,
            Some(Err(e)) => return Err(e),
            changed => {
                if changed.is_some() {
                    tracing::warn!(
                        start,
                        "the runtime's executable changed since it was hashed at start; measured again"
                    );
                }
                measure(&self.launch, start, self.server.measures())?
            }
        };
        if m.events.is_empty() {
            tracing::debug!(start, "the runtime's executable opened, not measured");
        } else {
            tracing::info!(
                start,
                bytes = m.stamp.0,
                hash_ms = m.took.as_secs_f64() * 1000.0,
                "the runtime's executable measured"
            );
        }
        // Logged and extended before the runtime's first instruction: a
        // runtime that cannot be measured is not started.
        self.record(m.events)
            .map_err(|e| format!("cannot measure the runtime: {e}"))?;
        let mut cmd = Command::new(format!("/proc/self/fd/{}", m.file.as_raw_fd()));
        let me = std::process::id();
        // For kernels before 5.11 (no CLOSE_RANGE_CLOEXEC): the descriptors
        // to mark one by one, counted before the fork.
        let max_fd = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map_or(1024, |n| n.min(65_536)) as i32;
        cmd.arg0(&self.launch.exe)
            .args(&self.launch.args)
            .env_clear()
            .envs(self.launch.env.iter().map(|(k, v)| (k, v)))
            .env(SOCKET_ENV, &self.socket)
            .env(LAUNCHER_ENV, me.to_string())
            // Its input is not the key daemon's terminal.
            .stdin(std::process::Stdio::null());
        // In the child, after its change of user and before the exec:
        // - no signal blocked (the key daemon blocks SIGTERM, SIGINT,
        //   SIGHUP and SIGQUIT for its sigwait; a child inherits the mask);
        // - every descriptor but 0-2 closed at the exec (the TPM's device,
        //   which tpm2-tss opens without O_CLOEXEC, a PKCS#11 module's),
        //   the one executed included: the kernel has opened it by then;
        // - not dumpable (the change of user reset it: until the exec this
        //   is a copy of the key daemon's memory);
        // - SIGKILL when the key daemon dies (a runtime is measured by the
        //   key daemon that launched it, and cannot ignore this; the change
        //   of user cleared any earlier setting), and no start at all if
        //   it already has;
        // - a session of its own: no controlling terminal.
        // SAFETY: only async-signal-safe system calls run between fork and
        // exec, on a signal set initialised by sigemptyset.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                if rc != 0 {
                    return Err(std::io::Error::from_raw_os_error(rc));
                }
                if libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) != 0
                {
                    for fd in 3..max_fd {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        if flags >= 0 {
                            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                        }
                    }
                }
                if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if u32::try_from(libc::getppid()).ok() != Some(me) {
                    // No allocation in the child: an errno.
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(uid) = self.launch.uid {
            // std drops the supplementary groups when root changes user;
            // the change of uid clears every capability.
            let gid = self
                .launch
                .gid
                .ok_or("a runtime user with no group (main resolves it)")?;
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().map_err(|e| {
            // Measured, not started: the log says so (a verifier takes no
            // module until the next start).
            let exit = json!({"kind": "runtime-exit", "start": start, "status": format!("not started: {e}")});
            if let Err(m) = self.record(vec![exit]) {
                tracing::error!(error = %m, "cannot measure the failed start");
            }
            format!(
                "cannot start the runtime {}: {e}",
                self.launch.exe.display()
            )
        })?;
        drop(m.file);
        Ok(child)
    }

    /// Starts the runtime and restarts it until [`Supervisor::stop`];
    /// returns when it is stopped, or when the runtime exited cleanly by
    /// itself (then `self_stop` is called).
    pub fn run(&self, self_stop: &dyn Fn()) {
        let mut backoff = BACKOFF_MIN;
        let mut start = 0u64;
        while !self.stopping.load(Ordering::SeqCst) {
            start += 1;
            match self.spawn(start) {
                Ok(mut child) => {
                    let pid = child.id();
                    // Not reaped yet: the pid is the child's.
                    let fd = rustix::process::Pid::from_raw(pid.cast_signed()).and_then(|p| {
                        rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
                    });
                    if fd.is_none() {
                        // Without one, a stop could not reach it safely:
                        // not run at all (it dies with us: PDEATHSIG).
                        tracing::error!(
                            pid,
                            restart_in_s = backoff.as_secs(),
                            "no pidfd for the runtime: killed, not supervised"
                        );
                        let _ = child.kill();
                        let _ = child.wait();
                        self.sleep(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                    if let Ok(mut r) = self.running.lock() {
                        *r = fd;
                    }

                    // A stop asked while it was being spawned.
                    if self.stopping.load(Ordering::SeqCst) {
                        self.signal(rustix::process::Signal::TERM);
                    }
                    tracing::info!(pid, start, exe = %self.launch.exe.display(), uid = ?self.launch.uid, "runtime started");
                    let began = Instant::now();
                    let status = child.wait();
                    if let Ok(mut r) = self.running.lock() {
                        *r = None;
                    }
                    let ran = began.elapsed();
                    let how = match &status {
                        Ok(s) => describe_exit(s),
                        Err(e) => format!("wait failed: {e}"),
                    };
                    let exit = json!({"kind": "runtime-exit", "start": start, "status": how, "ran_s": ran.as_secs()});
                    if let Err(e) = self.record(vec![exit]) {
                        tracing::error!(error = %e, "cannot measure the runtime's exit");
                    }
                    if self.stopping.load(Ordering::SeqCst) {
                        tracing::info!(status = %how, "runtime stopped");
                        return;
                    }
                    if status.as_ref().is_ok_and(ExitStatus::success) {
                        tracing::info!(
                            "the runtime exited cleanly by itself; the key daemon stops too"
                        );
                        self.stopping.store(true, Ordering::SeqCst);
                        self_stop();
                        return;
                    }
                    if ran >= STABLE {
                        backoff = BACKOFF_MIN;
                    }
                    tracing::warn!(status = %how, ran_s = ran.as_secs(), restart_in_s = backoff.as_secs(), "the runtime failed; restarting it");
                }
                Err(e) => {
                    tracing::error!(error = %e, restart_in_s = backoff.as_secs(), "cannot launch the runtime");
                }
            }
            self.sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Waits `d`, or less if a stop is asked.
    fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let Ok(mut g) = self.wake.0.lock() else {
            return;
        };
        while !self.stopping.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.wake.1.wait_timeout(g, left) {
                Ok((next, _)) => g = next,
                Err(_) => return,
            }
        }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        if let Ok(r) = self.running.lock()
            && let Some(fd) = r.as_ref()
        {
            let _ = rustix::process::pidfd_send_signal(fd, sig);
        }
    }

    /// Asks the runtime to stop (SIGTERM) and stops restarting it.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.signal(rustix::process::Signal::TERM);
        let _g = self.wake.0.lock();
        self.wake.1.notify_all();
    }

    /// Kills the runtime (after [`STOP_GRACE`]).
    pub fn kill(&self) {
        self.signal(rustix::process::Signal::KILL);
    }
}

/// The signals that stop the key daemon, its runtime first.
const STOP_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// The set of [`STOP_SIGNALS`].
fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before
    // sigaddset adds valid signal numbers.
    #[allow(unsafe_code)]
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks [`STOP_SIGNALS`] in this thread and every thread it starts
/// afterwards, so that [`wait_for_stop`] receives them.
///
/// # Errors
///
/// The mask cannot be set.
pub fn block_stop_signals() -> Result<(), String> {
    let set = stop_set();
    // SAFETY: pthread_sigmask reads an initialised set and changes only
    // this thread's mask.
    #[allow(unsafe_code)]
    unsafe {
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(format!("cannot block the stop signals: error {rc}"));
        }
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT (blocked by [`block_stop_signals`]);
/// returns which.
pub fn wait_for_stop() -> i32 {
    let set = stop_set();
    // SAFETY: sigwait reads an initialised set and writes the signal
    // number.
    #[allow(unsafe_code)]
    unsafe {
        let mut sig = 0;
        loop {
            if libc::sigwait(&set, &mut sig) == 0 {
                return sig;
            }
        }
    }
}

/// Sends this process SIGTERM (the supervisor's way to end
/// [`wait_for_stop`] when the runtime stopped by itself).
pub fn stop_self() {
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(args: &[&str]) -> Launch {
        Launch {
            exe: "/bin/true".into(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            uid: None,
            gid: None,
            env: Vec::new(),
        }
    }

    #[test]
    fn the_configuration_is_found_in_either_spelling() {
        assert_eq!(
            launch(&["daemon", "--config", "/etc/e.toml"]).config_file(),
            Some(PathBuf::from("/etc/e.toml"))
        );
        assert_eq!(
            launch(&["daemon", "--config=/etc/e.toml"]).config_file(),
            Some(PathBuf::from("/etc/e.toml"))
        );
        assert_eq!(launch(&["daemon"]).config_file(), None);
        assert_eq!(launch(&["daemon", "--config"]).config_file(), None);
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("rt");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &f,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o755),
            0,
        )
        .unwrap();
        let l = Launch {
            exe: f,
            ..launch(&[])
        };
        let e = measure(&l, 1, true).err().unwrap();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn only_the_runtimes_variables_pass() {
        for ok in ["EDGEWARD_LOG", "EDGEWARD_CONFIG", "PATH", "TZ"] {
            assert!(env_passed(ok), "{ok}");
        }
        for no in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "GLIBC_TUNABLES",
            "HOME",
            "EDGEWARD_KEYD",
            "EDGEWARD_KEYD_LAUNCHER",
        ] {
            assert!(!env_passed(no), "{no}");
        }
    }

    #[test]
    fn a_file_others_can_change_is_not_launched() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("rt");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o757)).unwrap();
        let l = Launch {
            exe: f.clone(),
            ..launch(&[])
        };
        let e = measure(&l, 1, true).err().unwrap();
        assert!(e.contains("writable by group or others"), "{e}");
        // Not hashed (nothing keeps a log), it is checked all the same.
        let e = measure(&l, 1, false).err().unwrap();
        assert!(e.contains("writable by group or others"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(measure(&l, 1, false).unwrap().events.is_empty());
        let m = measure(&l, 1, true).unwrap();
        assert_eq!(m.events[0]["kind"], "executable");
        assert_eq!(
            m.events[0]["sha256"],
            Digest::of(b"#!/bin/sh\n").to_string()
        );
        assert_eq!(m.events[0]["start"], 1);
    }

    #[test]
    fn the_key_daemon_measures_itself() {
        // Hashed ahead, on a thread of its own, or then: the same event.
        let mut hashing = Hashing::start(true, None, true);
        let ahead = hashing.own().unwrap();
        assert!(hashing.finish().is_none());
        let now = SelfHash::new().unwrap();
        let e = ahead.event(json!({"backend": "soft"}));
        assert_eq!(e["kind"], "key-daemon");
        let exe = std::fs::read("/proc/self/exe").unwrap();
        assert_eq!(e["sha256"], Digest::of(&exe).to_string());
        assert_eq!(e, now.event(json!({"backend": "soft"})));
        assert!(ahead.took < Duration::from_secs(10));
    }

    /// Measured ahead, the first start is measured as [`measure`] does it,
    /// failures included.
    #[test]
    fn the_first_start_measured_ahead_is_what_runs() {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("rt");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        let l = Launch { exe, ..launch(&[]) };
        let mut hashing = Hashing::start(true, Some(&l), true);
        assert!(hashing.own().is_ok());
        let m = hashing.finish().unwrap().unwrap();
        assert!(m.unchanged());
        assert_eq!(m.events[0]["start"], 1);
        assert_eq!(
            m.events[0]["sha256"],
            Digest::of(b"#!/bin/sh\n").to_string()
        );
        // Written in place since (by its owner): noticed, so it is measured
        // again before it runs.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&l.exe)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"# more\n"))
            .unwrap();
        assert!(!m.unchanged());
        let gone = Launch {
            exe: d.path().join("missing"),
            ..launch(&[])
        };
        let e = Hashing::start(false, Some(&gone), true)
            .finish()
            .unwrap()
            .unwrap_err();
        assert!(e.contains("cannot open the runtime's executable"), "{e}");
    }
}
