//! The key daemon's client side. With `EDGEWARD_KEYD` set to its socket (a
//! launcher sets it for the runtime it starts, as a service manager sets
//! `NOTIFY_SOCKET`), every HSM this process opens is the key daemon's
//! ([`edgeward_proto::RemoteHsm`]): no key file, TPM or PKCS#11 module is
//! opened here, and what the key daemon's principal table refuses this
//! process's uid fails as an HSM error naming the refusal.
//!
//! This executable does not link the TPM or PKCS#11 backends (no libtss2,
//! libcrypto or token module in a process that runs module code). Without
//! `EDGEWARD_KEYD`, a process configured for one of them starts a
//! **private key daemon** (`edgeward-keyd --private`, the executable next
//! to this one) as its child, before it confines itself: the daemon holds
//! the backend, serves only this user on a socket in the state dir
//! (`keyd.<pid>.sock`) and stops when this process is gone. The soft
//! backend opens in-process, as `edgeward run`'s ephemeral identity does.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hsm::{ErrorKind, Hsm, HsmConfig, HsmError, Op};

pub use edgeward_proto::RemoteHsm;

/// The environment variable naming the key daemon's socket.
pub const KEYD_ENV: &str = "EDGEWARD_KEYD";

/// Set by the key daemon's launcher to its pid (`edgeward-keyd --launch`).
pub const LAUNCHER_ENV: &str = "EDGEWARD_KEYD_LAUNCHER";

/// Whether the key daemon launched this process, having measured its
/// executable before it ran: `EDGEWARD_KEYD_LAUNCHER` names this process's
/// parent, and the process answering at `EDGEWARD_KEYD` is that parent
/// (`SO_PEERCRED`). Anyone can set the variables; only a key daemon that
/// is this process's parent passes both.
pub fn launched() -> bool {
    static LAUNCHED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LAUNCHED.get_or_init(check_launched)
}

fn check_launched() -> bool {
    let Some(sock) = socket() else {
        return false;
    };
    let parent = rustix::process::getppid().map(|p| p.as_raw_nonzero().get());
    if !launched_by(std::env::var(LAUNCHER_ENV).ok().as_deref(), parent) {
        return false;
    }
    std::os::unix::net::UnixStream::connect(&sock)
        .ok()
        .and_then(|s| rustix::net::sockopt::socket_peercred(&s).ok())
        .is_some_and(|cred| Some(cred.pid.as_raw_nonzero().get()) == parent)
}

/// Whether `claim` (the launcher variable) names `parent`.
fn launched_by(claim: Option<&str>, parent: Option<i32>) -> bool {
    match (claim.and_then(|c| c.parse::<i32>().ok()), parent) {
        (Some(c), Some(p)) => c > 1 && c == p,
        _ => false,
    }
}

/// The key daemon's socket, if this process is to use one: the one
/// `EDGEWARD_KEYD` names, else its private key daemon's.
pub fn socket() -> Option<PathBuf> {
    configured_socket().or_else(|| {
        match &*PRIVATE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            PrivateState::Running(p) => Some(p.socket.clone()),
            PrivateState::None | PrivateState::Failed(_) => None,
        }
    })
}

/// The key daemon `EDGEWARD_KEYD` names (a service of its own), if any.
pub fn configured_socket() -> Option<PathBuf> {
    std::env::var_os(KEYD_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The private key daemon this process started.
struct Private {
    socket: PathBuf,
    /// The write end of its standard input: closed when this process ends
    /// (close-on-exec: no compile worker inherits it).
    _lifeline: ChildStdin,
    /// The daemon and its standard error until [`watch_private`] starts
    /// the threads that wait for it and relay what it says: after this
    /// process confined itself (Landlock binds only the threads started
    /// after it).
    unwatched: Option<(Child, std::process::ChildStderr)>,
}

/// This process's private key daemon: none started yet, running, or one
/// that failed to start (its error is every later open's: a confined
/// process cannot start another).
enum PrivateState {
    None,
    Running(Private),
    Failed(HsmError),
}

static PRIVATE: Mutex<PrivateState> = Mutex::new(PrivateState::None);

/// How long a private key daemon may take to answer (a TPM creates its
/// storage primary at open: seconds on a slow part).
const PRIVATE_START: Duration = Duration::from_secs(30);

/// The key daemon's executable: next to this one, else where the package
/// installs it. Only a file that root or this user alone can change, in a
/// directory the same holds for, is taken: a binary another user dropped
/// beside `edgeward` (in `/tmp`, say) would run with this user's keys.
fn keyd_executable() -> Result<PathBuf, String> {
    let held = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| edgeward_hsm::state::only_root_or_me(&m).is_ok())
    };
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("edgeward-keyd")));
    let installed = PathBuf::from("/usr/libexec/edgeward/edgeward-keyd");
    beside
        .into_iter()
        .chain([installed])
        .find(|p| p.is_file() && held(p) && p.parent().is_some_and(held))
        .ok_or_else(|| {
            "no edgeward-keyd that only root or this user can change, next to this executable \
             or in /usr/libexec/edgeward"
                .into()
        })
}

/// The arguments that give a key daemon `config`'s backend.
fn backend_args(config: &HsmConfig) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec!["--hsm".into(), config.backend().into()];
    match config {
        HsmConfig::Soft => {}
        HsmConfig::Tpm(t) => {
            a.extend(["--tcti".into(), t.tcti.clone().into()]);
            a.extend(["--pcr".into(), t.pcr.to_string().into()]);
            if let Some(b) = &t.boot_pcrs {
                let list: Vec<String> = b.iter().map(u8::to_string).collect();
                a.extend(["--boot-pcrs".into(), list.join(",").into()]);
            }
        }
        HsmConfig::Pkcs11(p) => {
            a.extend(["--module".into(), p.module.clone().into_os_string()]);
            a.extend(["--token".into(), p.token.clone().into()]);
            a.extend(["--pin-file".into(), p.pin_file.clone().into_os_string()]);
        }
    }
    a
}

/// Who a private key daemon serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivateFor {
    /// A runtime that runs module code (`edgeward daemon`, `edgeward
    /// run`): the runtime's operations only (`--private-runtime`), so code
    /// that escapes a module into this process gets no more than the
    /// runtime may ask for (no raw CA signature, extend or bare quote).
    Runtime,
    /// An operator's command (`hsm`, `attest`, `identity`, `check`): every
    /// operation, as its user has over its own key files.
    Operator,
}

/// Starts the private key daemon that holds `config`'s backend for this
/// process, unless it needs none (the soft backend, `EDGEWARD_KEYD` set)
/// or has one. The daemon calls it before it confines itself: the key
/// daemon is not held to the runtime's Landlock ruleset (it opens the TPM
/// device or the token's files). It serves this process alone (by pid),
/// as `who` says.
///
/// # Errors
///
/// No `edgeward-keyd` executable; it could not start, or exited, or did not
/// answer within 30 s (its own error is on standard error).
pub fn start_private(
    config: &HsmConfig,
    state_dir: &Path,
    identity: &crate::identity::IdentityConfig,
    who: PrivateFor,
) -> Result<(), HsmError> {
    let mut private = PRIVATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match &*private {
        PrivateState::Running(_) => return Ok(()),
        PrivateState::Failed(e) => return Err(e.clone()),
        PrivateState::None => {}
    }
    if matches!(config, HsmConfig::Soft)
        || std::env::var_os(KEYD_ENV).is_some_and(|v| !v.is_empty())
    {
        return Ok(());
    }
    match spawn_private(config, state_dir, identity, who) {
        Ok(p) => {
            *private = PrivateState::Running(p);
            Ok(())
        }
        Err(why) => {
            let e = HsmError::new(
                config.backend(),
                Op::ListKeys,
                None,
                ErrorKind::Unavailable(format!("the private key daemon: {why}")),
            );
            *private = PrivateState::Failed(e.clone());
            Err(e)
        }
    }
}

fn spawn_private(
    config: &HsmConfig,
    state_dir: &Path,
    identity: &crate::identity::IdentityConfig,
    who: PrivateFor,
) -> Result<Private, String> {
    use std::io::{Read as _, Write as _};
    /// At most this much of what it says is held while it starts.
    const HELD: usize = 16 * 1024;
    let exe = keyd_executable()?;
    let socket = state_dir.join(format!("keyd.{}.sock", std::process::id()));
    let mut cmd = Command::new(&exe);
    cmd.arg(match who {
        PrivateFor::Runtime => "--private-runtime",
        PrivateFor::Operator => "--private",
    })
    .arg("--state")
    .arg(state_dir)
    .arg("--socket")
    .arg(&socket)
    .arg("--device-id")
    .arg(&identity.device_id)
    .arg("--trust-domain")
    .arg(&identity.trust_domain)
    // What this configuration issues, and no longer: a module leaf
    // lives `svid_ttl`; a JWT working key's certificate its rotation
    // period, then its last tokens' lifetime and the rotation check
    // (at most 1.5 token lifetimes and 61 s more).
    .arg("--max-leaf-ttl")
    .arg(identity.svid_ttl.as_secs().to_string())
    .arg("--max-jwt-key-ttl")
    .arg(
        (identity.jwt_key_rotation.as_secs() + 2 * identity.max_token_ttl.as_secs() + 120)
            .to_string(),
    )
    .args(backend_args(config))
    .env_remove(KEYD_ENV)
    .env_remove(LAUNCHER_ENV)
    // The service manager's: this process speaks for itself.
    .env_remove(edgeward_proto::notify::NOTIFY_SOCKET)
    .env_remove(edgeward_proto::notify::WATCHDOG_USEC)
    .env_remove(edgeward_proto::notify::WATCHDOG_PID)
    .env_remove(edgeward_proto::journal::NATIVE_ENV)
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // Under journald its events go to the journal as fields, as this
    // process's do (its standard error is a pipe this process reads).
    if edgeward_proto::journal::stderr_is_journal() {
        cmd.env(edgeward_proto::journal::NATIVE_ENV, "1");
    }
    // Its own process group: a terminal's Ctrl-C stops this process,
    // which stops it in order.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let lifeline = child.stdin.take().ok_or("no standard input")?;
    let mut stderr = child.stderr.take().ok_or("no standard error")?;
    // Read here, not by a thread: no thread may exist before this process
    // confines itself.
    rustix::io::ioctl_fionbio(&stderr, true).map_err(|e| format!("its standard error: {e}"))?;
    let mut held = Vec::new();
    let mut drain = |held: &mut Vec<u8>| {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            let room = HELD.saturating_sub(held.len()).min(n);
            held.extend_from_slice(&buf[..room]);
        }
    };
    let reason = |held: &[u8]| -> String {
        let text = String::from_utf8_lossy(held);
        let text = text.trim();
        if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        }
    };
    let started = Instant::now();
    loop {
        drain(&mut held);
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Exited: its last words are in the pipe, whose write end is
            // closed (it starts nothing that could hold it).
            drain(&mut held);
            return Err(format!(
                "{} exited ({status}){}",
                exe.display(),
                reason(&held)
            ));
        }
        if started.elapsed() > PRIVATE_START {
            let _ = child.kill();
            let _ = child.wait();
            drain(&mut held);
            return Err(format!(
                "{} did not answer within {} s{}",
                exe.display(),
                PRIVATE_START.as_secs(),
                reason(&held)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Started: what it said goes out now; what it says next, once
    // watch_private relays it.
    let _ = std::io::stderr().write_all(&held);
    rustix::io::ioctl_fionbio(&stderr, false).map_err(|e| format!("its standard error: {e}"))?;
    tracing::info!(
        pid = child.id(),
        socket = %socket.display(),
        backend = config.backend(),
        "private key daemon started: the backend is outside this process"
    );
    Ok(Private {
        socket,
        _lifeline: lifeline,
        unwatched: Some((child, stderr)),
    })
}

/// Starts the threads that relay the private key daemon's standard error
/// and stop this process if it dies, once: call it after this process has
/// confined itself (it is also called by [`open`]). Until then the daemon
/// writes into its pipe (its start-up lines were relayed already).
pub fn watch_private() {
    let unwatched = match &mut *PRIVATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        PrivateState::Running(p) => p.unwatched.take(),
        PrivateState::None | PrivateState::Failed(_) => None,
    };
    let Some((mut child, stderr)) = unwatched else {
        return;
    };
    let relay = std::thread::Builder::new()
        .name("keyd-stderr".into())
        .spawn(move || {
            use std::io::{BufRead as _, Write as _};
            let mut lines = std::io::BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match lines.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let _ = std::io::stderr().write_all(&line);
                    }
                }
            }
        });
    if let Err(e) = relay {
        tracing::warn!(error = %e, "cannot relay the private key daemon's log");
    }
    // A process whose key daemon died cannot sign, seal or measure: it
    // stops, for its service manager to start it again, rather than serve
    // without its keys.
    let watch = std::thread::Builder::new()
        .name("keyd-watch".into())
        .spawn(move || {
            let status = child.wait();
            tracing::error!(
                status = ?status,
                "the private key daemon exited: this process has no HSM; stopping"
            );
            std::process::exit(70);
        });
    if let Err(e) = watch {
        tracing::warn!(error = %e, "cannot watch the private key daemon");
    }
}

/// The HSM `config` names: the key daemon's when `EDGEWARD_KEYD` is set
/// (its backend must be the configured one), else the soft backend with its
/// files under `state_dir`, or a private key daemon holding the TPM or
/// PKCS#11 backend for `identity`'s device (see [`start_private`]).
///
/// # Errors
///
/// The backend's open error; the key daemon unreachable, refusing, or
/// holding another backend than the configuration names.
pub fn open(
    config: &HsmConfig,
    state_dir: &Path,
    identity: &crate::identity::IdentityConfig,
) -> Result<Arc<dyn Hsm>, HsmError> {
    // (A runtime started its own before: this one then is that one.)
    start_private(config, state_dir, identity, PrivateFor::Operator)?;
    watch_private();
    let Some(sock) = socket() else {
        return crate::hsm::open(config, state_dir);
    };
    let remote = edgeward_proto::RemoteHsm::connect(&sock)?;
    if remote.backend() != config.backend() {
        return Err(HsmError::new(
            remote.backend(),
            Op::ListKeys,
            None,
            ErrorKind::Unavailable(format!(
                "the key daemon at {} holds the {} backend; [hsm] backend is {}",
                sock.display(),
                remote.backend(),
                config.backend()
            )),
        ));
    }
    Ok(Arc::new(remote))
}

#[cfg(test)]
mod tests {
    use super::launched_by;

    #[test]
    fn only_the_parent_named_is_the_launcher() {
        assert!(launched_by(Some("4242"), Some(4242)));
        // Another pid, init (an orphan's parent), garbage, nothing.
        assert!(!launched_by(Some("4243"), Some(4242)));
        assert!(!launched_by(Some("1"), Some(1)));
        assert!(!launched_by(Some("4242x"), Some(4242)));
        assert!(!launched_by(Some("-4242"), Some(-4242)));
        assert!(!launched_by(None, Some(4242)));
        assert!(!launched_by(Some("4242"), None));
    }
}
