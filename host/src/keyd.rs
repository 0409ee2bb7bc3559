//! The key daemon's client side. With `EDGEWARD_KEYD` set to its socket (a
//! launcher sets it for the runtime it starts, as a service manager sets
//! `NOTIFY_SOCKET`), every HSM this process opens is the key daemon's
//! ([`edgeward_proto::RemoteHsm`]): no key file, TPM or PKCS#11 module is
//! opened here, and what the key daemon's principal table refuses this
//! process's uid fails as an HSM error naming the refusal.

use std::path::Path;
use std::sync::Arc;

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

/// The key daemon's socket, if this process is to use one.
pub fn socket() -> Option<std::path::PathBuf> {
    std::env::var_os(KEYD_ENV)
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
}

/// The HSM `config` names: the key daemon's when `EDGEWARD_KEYD` is set
/// (its backend must be the configured one), else the backend itself with
/// its files under `state_dir`.
///
/// # Errors
///
/// The backend's open error; the key daemon unreachable, refusing, or
/// holding another backend than the configuration names.
pub fn open(config: &HsmConfig, state_dir: &Path) -> Result<Arc<dyn Hsm>, HsmError> {
    let Some(sock) = socket() else {
        return edgeward_hsm_hw::open(config, state_dir);
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
