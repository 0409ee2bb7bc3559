//! `edgeward:host/management`, linked only into the agent module.
//!
//! The runtime knows the interface, not the service behind it: the
//! daemon implements [`Management`] (its registry, supervisor and
//! component store) and hands the agent's starts an `Arc<dyn
//! Management>` in [`SandboxSpec::management`](crate::SandboxSpec). Every
//! other module's store holds none, and each call answers
//! `not-permitted`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use wasmtime::component::{HasSelf, Linker};

pub use crate::workload::bindings::edgeward::host::management::{ExitInfo, ModuleInfo, Plan};
use crate::workload::bindings::edgeward::host::{management, types};
pub use types::Error;

/// The WIT interface's name, as a component imports it.
pub const INTERFACE: &str = "edgeward:host/management@0.1.0";
/// The longest `wait-for-change`.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// What a [`Management`] call returns.
pub type Answer<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// The management service behind the agent's calls: one method per WIT
/// function (see `wit/management.wit` for what each means). Arguments are
/// the agent's, unchecked: the implementation validates them.
pub trait Management: Send + Sync + fmt::Debug + 'static {
    /// `list-modules`.
    fn list_modules(&self) -> Answer<'_, Vec<ModuleInfo>>;
    /// `module-exits`.
    fn module_exits(&self, name: String) -> Answer<'_, Vec<ExitInfo>>;
    /// `has-component`.
    fn has_component(&self, digest: String) -> Answer<'_, bool>;
    /// `put-component`.
    fn put_component(&self, component: Vec<u8>) -> Answer<'_, String>;
    /// `deploy`.
    fn deploy(&self, deployment: String, dry_run: bool) -> Answer<'_, Plan>;
    /// `start`.
    fn start(&self, name: String) -> Answer<'_, ()>;
    /// `stop`.
    fn stop(&self, name: String) -> Answer<'_, ()>;
    /// `remove`.
    fn remove(&self, name: String) -> Answer<'_, ()>;
    /// Counts the changes `wait-for-change` waits for (the agent's config
    /// directory); each start subscribes, so changes count from then.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// The per-store state behind `management`.
#[derive(Debug)]
pub struct ManagementCtx {
    link: Option<(Arc<dyn Management>, watch::Receiver<u64>)>,
}

impl ManagementCtx {
    /// State for one start: linked for the agent, `None` for anyone else.
    /// Changes count from now.
    pub fn new(link: Option<Arc<dyn Management>>) -> Self {
        Self {
            link: link.map(|l| {
                let rx = l.changes();
                (l, rx)
            }),
        }
    }

    fn service(&self) -> Result<&dyn Management, Error> {
        self.link
            .as_ref()
            .map(|(l, _)| &**l)
            .ok_or_else(|| Error::NotPermitted("only the agent may manage modules".into()))
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

impl management::Host for ManagementCtx {
    async fn list_modules(&mut self) -> Result<Vec<ModuleInfo>, Error> {
        self.service()?.list_modules().await
    }

    async fn module_exits(&mut self, name: String) -> Result<Vec<ExitInfo>, Error> {
        self.service()?.module_exits(name).await
    }

    async fn has_component(&mut self, digest: String) -> Result<bool, Error> {
        self.service()?.has_component(digest).await
    }

    async fn put_component(&mut self, component: Vec<u8>) -> Result<String, Error> {
        self.service()?.put_component(component).await
    }

    async fn deploy(&mut self, deployment: String, dry_run: bool) -> Result<Plan, Error> {
        self.service()?.deploy(deployment, dry_run).await
    }

    async fn start(&mut self, name: String) -> Result<(), Error> {
        self.service()?.start(name).await
    }

    async fn stop(&mut self, name: String) -> Result<(), Error> {
        self.service()?.stop(name).await
    }

    async fn remove(&mut self, name: String) -> Result<(), Error> {
        self.service()?.remove(name).await
    }

    async fn wait_for_change(&mut self, timeout_ms: u64) -> Result<bool, Error> {
        let timeout = Duration::from_millis(timeout_ms);
        if timeout > MAX_WAIT {
            return Err(Error::InvalidArgument(format!(
                "timeout-ms: {timeout_ms} is over {} (24 h)",
                MAX_WAIT.as_millis()
            )));
        }
        self.service()?;
        let Some((_, rx)) = self.link.as_mut() else {
            return Ok(false);
        };
        match tokio::time::timeout(timeout, rx.changed()).await {
            Ok(Ok(())) => {
                rx.borrow_and_update();
                Ok(true)
            }
            // The watcher ended (the daemon is stopping).
            Ok(Err(_)) => Err(Error::Unavailable(
                "the config directory is no longer watched".into(),
            )),
            Err(_) => Ok(false),
        }
    }
}

impl types::Host for ManagementCtx {}
