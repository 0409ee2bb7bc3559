//! `edgeward:host/management`: the management service's face for the
//! agent, the one module linked with it.
//!
//! # Who may reach it, and what a hostile caller could try
//!
//! Only the registration configured as `[agent]` (its digest pinned) is
//! linked with this interface; a component that imports it and is not the
//! agent is refused before it runs
//! ([`crate::runtime::management::imports_management`]). Even for the
//! agent, each store carries its own `ManagementCtx`, and a store without
//! a link answers `not-permitted`.
//!
//! The agent's calls go through the same service as the socket API
//! ([`super::deploy_as`], [`super::ask_as`]), as origin `agent`. A caller
//! could try, and is refused (each tested): to change a module it does not
//! own (the operator's, the config file's, its own registration:
//! `not-permitted`); to deploy a spec with host paths (`file`, `dirs`) or
//! a component it has not stored (`invalid-argument`); malformed JSON or
//! names (`invalid-argument`, naming the problem); to store a component
//! over the size limit (its `max_hostcall_data`, and 256 MiB at most); to
//! wait for ever (`timeout-ms` over 24 h is `invalid-argument`).
//!
//! [`AgentLink`] is the daemon's side: it implements the runtime's
//! [`Management`] over the management service.

use std::path::Path;
use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::watch;

use super::{ApiError, ApiState, Command};
use crate::daemon::records;
use crate::measure::{Digest, MAX_COMPONENT_SIZE};
use crate::registry::Origin;
use crate::runtime::management::{Answer, Error, ExitInfo, Management, ModuleInfo, Plan};
pub use crate::runtime::management::{INTERFACE, MAX_WAIT};

/// The most exit records `module-exits` returns.
pub const MAX_EXITS: usize = 100;

/// What ties the agent's stores to the daemon: the management service and
/// the changes seen in the agent's config directory.
#[derive(Debug)]
pub struct AgentLink {
    state: Arc<ApiState>,
    changes: watch::Sender<u64>,
}

impl AgentLink {
    /// A link to `state`, with `changes` counting what happens in the
    /// agent's config directory (see [`watch_dir`]).
    pub fn new(state: Arc<ApiState>, changes: watch::Sender<u64>) -> Self {
        Self { state, changes }
    }
}

impl AgentLink {
    /// Asks the supervisor, as the agent, for `command` on module `name`
    /// (checked first).
    fn ask(&self, name: String, command: fn(String, super::Reply) -> Command) -> Answer<'_, ()> {
        Box::pin(async move {
            name_of(&name)?;
            super::ask_as(&self.state, Origin::Agent, |r| command(name, r))
                .await
                .map_err(wit)
        })
    }
}

/// The WIT error for an API error: what the caller got wrong is
/// `invalid-argument`, what it may not do `not-permitted`.
fn wit(e: ApiError) -> Error {
    match e.status {
        StatusCode::CONFLICT | StatusCode::FORBIDDEN => Error::NotPermitted(e.message),
        StatusCode::SERVICE_UNAVAILABLE => Error::Unavailable(e.message),
        s if s.is_client_error() => Error::InvalidArgument(e.message),
        _ => Error::Internal(e.message),
    }
}

fn name_of(name: &str) -> Result<(), Error> {
    super::checked_name(name).map_err(wit)
}

impl Management for AgentLink {
    fn list_modules(&self) -> Answer<'_, Vec<ModuleInfo>> {
        Box::pin(async move {
            let views = super::all_views(&self.state).map_err(wit)?;
            Ok(views
                .into_iter()
                .map(|v| ModuleInfo {
                    origin: super::json_name(v.origin),
                    desired: super::json_name(v.desired),
                    name: v.name,
                    state: v.state,
                    digest: v.digest,
                    starts: v.starts,
                    reason: v.reason,
                })
                .collect())
        })
    }

    fn module_exits(&self, name: String) -> Answer<'_, Vec<ExitInfo>> {
        Box::pin(async move {
            let state = &self.state;
            super::record_of(state, &name).map_err(wit)?;
            let log = records::exits_log(&state.state_dir, &name);
            let text = tokio::task::spawn_blocking(move || log.read_all())
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
            let exits: Vec<records::ExitRecord> = String::from_utf8_lossy(&text)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let from = exits.len().saturating_sub(MAX_EXITS);
            Ok(exits
                .into_iter()
                .skip(from)
                .map(|e| ExitInfo {
                    at: e.at,
                    start: e.start,
                    ran_ms: e.ran_ms,
                    outcome: e.outcome,
                    status: e.status,
                    reason: e.reason,
                })
                .collect())
        })
    }

    fn has_component(&self, digest: String) -> Answer<'_, bool> {
        Box::pin(async move {
            let digest: Digest = digest
                .parse()
                .map_err(|e| Error::InvalidArgument(format!("digest: {e}")))?;
            Ok(self.state.components.contains(&digest))
        })
    }

    fn put_component(&self, component: Vec<u8>) -> Answer<'_, String> {
        Box::pin(async move {
            if component.len() as u64 > MAX_COMPONENT_SIZE {
                return Err(Error::InvalidArgument(format!(
                    "component: {} bytes, over the {MAX_COMPONENT_SIZE}-byte limit",
                    component.len()
                )));
            }
            let store = self.state.components.clone();
            let quota = self.state.grants.components_quota;
            let digest = tokio::task::spawn_blocking(move || {
                let digest = Digest::of(&component);
                store
                    .admit(&digest, component.len() as u64, quota)
                    .map_err(Error::NotPermitted)?;
                store
                    .put_bytes(&digest, &component)
                    .map(|_| digest)
                    .map_err(|e| {
                        tracing::error!(error = %e, "cannot store the agent's component");
                        Error::Unavailable(format!("cannot store the component: {e}"))
                    })
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            tracing::info!(%digest, "component stored by the agent");
            Ok(digest.to_string())
        })
    }

    fn deploy(&self, deployment: String, dry_run: bool) -> Answer<'_, Plan> {
        Box::pin(async move {
            let d = serde_json::from_str(&deployment)
                .map_err(|e| e.to_string())
                .and_then(super::DeployBody::parse)
                .map_err(|e| Error::InvalidArgument(format!("deployment: {e}")))?;
            let plan = super::deploy_as(&self.state, Origin::Agent, d, dry_run)
                .await
                .map_err(wit)?;
            Ok(Plan {
                version: plan.version,
                add: plan.add,
                update: plan.update,
                remove: plan.remove,
                unchanged: plan.unchanged,
            })
        })
    }

    fn start(&self, name: String) -> Answer<'_, ()> {
        self.ask(name, Command::Start)
    }

    fn stop(&self, name: String) -> Answer<'_, ()> {
        self.ask(name, Command::Stop)
    }

    fn remove(&self, name: String) -> Answer<'_, ()> {
        self.ask(name, Command::Remove)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Watches `dir` (inotify: files created, written, moved, deleted, their
/// attributes) and counts what happens there into the returned channel,
/// until `stop` turns true.
///
/// # Errors
///
/// `dir` cannot be watched (missing, not a directory, no permission).
pub fn watch_dir(
    dir: &Path,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<watch::Sender<u64>> {
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    use tokio::io::unix::AsyncFd;
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{}: not a directory", dir.display()),
        ));
    }
    let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
    inotify::add_watch(
        &fd,
        dir,
        WatchFlags::CLOSE_WRITE
            | WatchFlags::MOVED_TO
            | WatchFlags::MOVED_FROM
            | WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::ATTRIB
            | WatchFlags::MODIFY
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF,
    )?;
    // `new` is deprecated because a borrowed descriptor could be closed
    // under it; this one is an `OwnedFd` the AsyncFd owns until it drops,
    // which is what `register`'s safety contract asks (and this crate
    // allows no unsafe code).
    #[allow(deprecated)]
    let fd = AsyncFd::new(fd)?;
    let (tx, _) = watch::channel(0u64);
    let changes = tx.clone();
    let shown = dir.display().to_string();
    tokio::spawn(async move {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        loop {
            let ready = tokio::select! {
                r = fd.readable() => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok(mut guard) = ready else { return };
            // Drain what is there: one change however many events.
            let mut any = false;
            let mut reader = inotify::Reader::new(fd.get_ref(), &mut buf);
            loop {
                match reader.next() {
                    Ok(_) => any = true,
                    Err(rustix::io::Errno::AGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) => {
                        tracing::error!(dir = %shown, error = %e, "cannot read the agent's config directory watch; changes are no longer seen");
                        return;
                    }
                }
            }
            if any {
                changes.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    });
    Ok(tx)
}
