//! `edgeward:host/management`: the management service's face for the
//! agent, the one module linked with it.
//!
//! # Who may reach it, and what a hostile caller could try
//!
//! Only the registration configured as `[agent]` (its digest pinned) is
//! linked with this interface; a component that imports it and is not the
//! agent is refused before it runs ([`imports_management`]). Even for the
//! agent, each store carries its own [`ManagementCtx`], and a store
//! without a link answers `not-permitted`.
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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::watch;
use wasmtime::component::{HasSelf, Linker};

use super::{ApiError, ApiState, Command};
use crate::daemon::records;
use crate::measure::{Digest, MAX_COMPONENT_SIZE};
use crate::registry::Origin;
use crate::runtime::workload::bindings::edgeward::host::{management, types};

/// The WIT interface's name, as a component imports it.
pub const INTERFACE: &str = "edgeward:host/management@0.1.0";
/// The longest `wait-for-change`.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
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

/// The per-store state behind `management`.
#[derive(Debug)]
pub struct ManagementCtx {
    link: Option<(Arc<AgentLink>, watch::Receiver<u64>)>,
}

impl ManagementCtx {
    /// State for one start: linked for the agent, `None` for anyone else.
    /// Changes count from now.
    pub fn new(link: Option<Arc<AgentLink>>) -> Self {
        Self {
            link: link.map(|l| {
                let rx = l.changes.subscribe();
                (l, rx)
            }),
        }
    }

    fn state(&self) -> Result<&ApiState, types::Error> {
        self.link
            .as_ref()
            .map(|(l, _)| &*l.state)
            .ok_or_else(|| types::Error::NotPermitted("only the agent may manage modules".into()))
    }
}

/// Adds `edgeward:host/management` to `linker` (the agent's only).
///
/// # Errors
///
/// When the names are already defined.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> &mut ManagementCtx,
) -> wasmtime::Result<()> {
    management::add_to_linker::<T, HasSelf<ManagementCtx>>(linker, get)
}

/// Whether `component` imports the management interface.
pub fn imports_management(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
) -> bool {
    component
        .component_type()
        .imports(engine)
        .any(|(name, _)| name == INTERFACE)
}

/// The WIT error for an API error: what the caller got wrong is
/// `invalid-argument`, what it may not do `not-permitted`.
fn wit(e: ApiError) -> types::Error {
    match e.status {
        StatusCode::CONFLICT | StatusCode::FORBIDDEN => types::Error::NotPermitted(e.message),
        StatusCode::SERVICE_UNAVAILABLE => types::Error::Unavailable(e.message),
        s if s.is_client_error() => types::Error::InvalidArgument(e.message),
        _ => types::Error::Internal(e.message),
    }
}

fn name_of(name: &str) -> Result<(), types::Error> {
    super::checked_name(name).map_err(wit)
}

impl management::Host for ManagementCtx {
    async fn list_modules(&mut self) -> Result<Vec<management::ModuleInfo>, types::Error> {
        let views = super::all_views(self.state()?).map_err(wit)?;
        Ok(views
            .into_iter()
            .map(|v| management::ModuleInfo {
                origin: super::json_name(v.origin),
                desired: super::json_name(v.desired),
                name: v.name,
                state: v.state,
                digest: v.digest,
                starts: v.starts,
                reason: v.reason,
            })
            .collect())
    }

    async fn module_exits(
        &mut self,
        name: String,
    ) -> Result<Vec<management::ExitInfo>, types::Error> {
        let state = self.state()?;
        super::record_of(state, &name).map_err(wit)?;
        let log = records::exits_log(&state.state_dir, &name);
        let text = tokio::task::spawn_blocking(move || log.read_all())
            .await
            .map_err(|e| types::Error::Internal(e.to_string()))?;
        let exits: Vec<records::ExitRecord> = String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let from = exits.len().saturating_sub(MAX_EXITS);
        Ok(exits
            .into_iter()
            .skip(from)
            .map(|e| management::ExitInfo {
                at: e.at,
                start: e.start,
                ran_ms: e.ran_ms,
                outcome: e.outcome,
                status: e.status,
                reason: e.reason,
            })
            .collect())
    }

    async fn has_component(&mut self, digest: String) -> Result<bool, types::Error> {
        let digest: Digest = digest
            .parse()
            .map_err(|e| types::Error::InvalidArgument(format!("digest: {e}")))?;
        Ok(self.state()?.components.contains(&digest))
    }

    async fn put_component(&mut self, component: Vec<u8>) -> Result<String, types::Error> {
        let state = self.state()?;
        if component.len() as u64 > MAX_COMPONENT_SIZE {
            return Err(types::Error::InvalidArgument(format!(
                "component: {} bytes, over the {MAX_COMPONENT_SIZE}-byte limit",
                component.len()
            )));
        }
        let store = state.components.clone();
        let quota = state.grants.components_quota;
        let digest = tokio::task::spawn_blocking(move || {
            let digest = Digest::of(&component);
            store
                .admit(&digest, component.len() as u64, quota)
                .map_err(types::Error::NotPermitted)?;
            store
                .put_bytes(&digest, &component)
                .map(|_| digest)
                .map_err(|e| {
                    tracing::error!(error = %e, "cannot store the agent's component");
                    types::Error::Unavailable(format!("cannot store the component: {e}"))
                })
        })
        .await
        .map_err(|e| types::Error::Internal(e.to_string()))??;
        tracing::info!(%digest, "component stored by the agent");
        Ok(digest.to_string())
    }

    async fn deploy(
        &mut self,
        deployment: String,
        dry_run: bool,
    ) -> Result<management::Plan, types::Error> {
        let state = self.state()?;
        let d = serde_json::from_str(&deployment)
            .map_err(|e| e.to_string())
            .and_then(super::DeployBody::parse)
            .map_err(|e| types::Error::InvalidArgument(format!("deployment: {e}")))?;
        let plan = super::deploy_as(state, Origin::Agent, d, dry_run)
            .await
            .map_err(wit)?;
        Ok(management::Plan {
            version: plan.version,
            add: plan.add,
            update: plan.update,
            remove: plan.remove,
            unchanged: plan.unchanged,
        })
    }

    async fn start(&mut self, name: String) -> Result<(), types::Error> {
        name_of(&name)?;
        super::ask_as(self.state()?, Origin::Agent, |r| Command::Start(name, r))
            .await
            .map_err(wit)
    }

    async fn stop(&mut self, name: String) -> Result<(), types::Error> {
        name_of(&name)?;
        super::ask_as(self.state()?, Origin::Agent, |r| Command::Stop(name, r))
            .await
            .map_err(wit)
    }

    async fn remove(&mut self, name: String) -> Result<(), types::Error> {
        name_of(&name)?;
        super::ask_as(self.state()?, Origin::Agent, |r| Command::Remove(name, r))
            .await
            .map_err(wit)
    }

    async fn wait_for_change(&mut self, timeout_ms: u64) -> Result<bool, types::Error> {
        let timeout = Duration::from_millis(timeout_ms);
        if timeout > MAX_WAIT {
            return Err(types::Error::InvalidArgument(format!(
                "timeout-ms: {timeout_ms} is over {} (24 h)",
                MAX_WAIT.as_millis()
            )));
        }
        self.state()?;
        let Some((_, rx)) = self.link.as_mut() else {
            return Ok(false);
        };
        match tokio::time::timeout(timeout, rx.changed()).await {
            Ok(Ok(())) => {
                rx.borrow_and_update();
                Ok(true)
            }
            // The watcher ended (the daemon is stopping).
            Ok(Err(_)) => Err(types::Error::Unavailable(
                "the config directory is no longer watched".into(),
            )),
            Err(_) => Ok(false),
        }
    }
}

impl types::Host for ManagementCtx {}

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
