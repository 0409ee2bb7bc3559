//! Lifecycle events: every status change and exit a module goes through,
//! as JSON lines for `GET /v1/events` (the last [`BACKLOG`] kept, and a
//! live feed for followers). In memory only: the records on disk are the
//! durable history.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;
use tokio::sync::broadcast;

use super::records::{ExitRecord, ModuleState};

/// Events kept for a request that does not follow.
pub const BACKLOG: usize = 256;

/// One event.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Event {
    /// When (RFC 3339, UTC).
    pub at: String,
    /// The module.
    pub module: String,
    /// `state` (a status change) or `exit`.
    pub kind: &'static str,
    /// The new state, for `state`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<ModuleState>,
    /// Why, for refusals and failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The exit, for `exit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitRecord>,
}

struct Bus {
    backlog: Mutex<VecDeque<Event>>,
    live: broadcast::Sender<Event>,
}

fn bus() -> &'static Bus {
    static BUS: OnceLock<Bus> = OnceLock::new();
    BUS.get_or_init(|| Bus {
        backlog: Mutex::new(VecDeque::with_capacity(BACKLOG)),
        live: broadcast::channel(1024).0,
    })
}

/// Publishes `e`.
pub fn publish(e: Event) {
    let b = bus();
    if let Ok(mut q) = b.backlog.lock() {
        if q.len() == BACKLOG {
            q.pop_front();
        }
        q.push_back(e.clone());
    }
    // No follower: nothing to do.
    let _ = b.live.send(e);
}

/// The backlog, oldest first, and a subscription to what follows it.
pub fn subscribe() -> (Vec<Event>, broadcast::Receiver<Event>) {
    let b = bus();
    // Subscribe under the backlog's lock: no event falls between the two.
    let q = b.backlog.lock();
    let rx = b.live.subscribe();
    let backlog = q.map(|q| q.iter().cloned().collect()).unwrap_or_default();
    (backlog, rx)
}
