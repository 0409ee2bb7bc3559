//! A module's identity made now (the daemon) or at its first use
//! (`edgeward run`).

use std::sync::{Arc, Mutex};

use super::{IdentityError, ModuleIdentity};

/// The factory of a deferred identity.
type MakeIdentity = Box<dyn FnOnce() -> Result<Arc<ModuleIdentity>, IdentityError> + Send>;

/// A module's identity, made now (the daemon) or at its first use
/// (`edgeward run`, so a module that never asks does not open the HSM).
pub struct IdentityHandle {
    cell: std::sync::OnceLock<Result<Arc<ModuleIdentity>, IdentityError>>,
    make: Mutex<Option<MakeIdentity>>,
}

impl std::fmt::Debug for IdentityHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityHandle")
            .field("identity", &self.cell.get())
            .finish_non_exhaustive()
    }
}

impl IdentityHandle {
    /// An identity that exists already.
    pub fn ready(identity: Arc<ModuleIdentity>) -> Arc<Self> {
        Arc::new(Self {
            cell: std::sync::OnceLock::from(Ok(identity)),
            make: Mutex::new(None),
        })
    }

    /// An identity `make` creates on first use (once; its error is kept and
    /// logged once).
    pub fn deferred(
        make: impl FnOnce() -> Result<Arc<ModuleIdentity>, IdentityError> + Send + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            cell: std::sync::OnceLock::new(),
            make: Mutex::new(Some(Box::new(make))),
        })
    }

    /// The identity, creating it if deferred. May block on the HSM the
    /// first time.
    ///
    /// # Errors
    ///
    /// The creation error (every time, without retrying).
    pub fn get(&self) -> Result<Arc<ModuleIdentity>, IdentityError> {
        self.cell
            .get_or_init(|| {
                let make = self.make.lock().ok().and_then(|mut m| m.take());
                let r = match make {
                    Some(f) => f(),
                    None => Err(IdentityError::Internal(
                        "identity factory already used".into(),
                    )),
                };
                if let Err(e) = &r {
                    tracing::error!(error = %e, "cannot set up the workload identity");
                }
                r
            })
            .clone()
    }

    /// The identity if it exists already (never blocks).
    pub fn get_if_ready(&self) -> Option<&Arc<ModuleIdentity>> {
        self.cell.get().and_then(|r| r.as_ref().ok())
    }
}
