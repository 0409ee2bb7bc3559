//! Events the device has to report, kept on disk (in the registry, one
//! durable write each) until the broker has them: an event leaves the
//! outbox when the device reads it back from its own `out/events` topic,
//! the proof that the broker accepted and routed it. So a report survives
//! the broker being away, the broker restarting, and the daemon restarting
//! in between. Delivery is at least once; each event carries `seq`, which
//! increases by one per event, so a reader drops repeats and sees gaps.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::registry::Registry;

/// The registry key of the outbox.
pub const KEY: &str = "cloud.outbox";
/// Events kept at most; the oldest are dropped beyond it (and counted).
pub const MAX_EVENTS: usize = 1000;

/// The outbox's depth, for the metrics.
fn depth(s: &Stored) {
    crate::daemon::metrics::DAEMON
        .outbox_depth
        .store(s.events.len() as u64, std::sync::atomic::Ordering::Relaxed);
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    next_seq: u64,
    dropped: u64,
    events: VecDeque<serde_json::Value>,
}

/// The outbox.
#[derive(Debug)]
pub struct Outbox {
    registry: Arc<Registry>,
    state: Mutex<Stored>,
}

impl Outbox {
    /// Loads the outbox (empty if none). A damaged one is reported and
    /// started afresh: its events are lost, counted as dropped.
    ///
    /// # Errors
    ///
    /// The registry cannot be read.
    pub fn open(registry: Arc<Registry>) -> Result<Self, String> {
        let stored = match registry.meta(KEY).map_err(|e| e.to_string())? {
            None => Stored::default(),
            Some(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!(error = %e, "cloud: the outbox is damaged; its events are dropped");
                Stored {
                    dropped: 1,
                    ..Stored::default()
                }
            }),
        };
        depth(&stored);
        Ok(Self {
            registry,
            state: Mutex::new(stored),
        })
    }

    fn save(&self, s: &Stored) -> Result<(), String> {
        depth(s);
        let bytes = serde_json::to_vec(s).map_err(|e| e.to_string())?;
        self.registry
            .put_meta(KEY, &bytes)
            .map_err(|e| format!("the outbox cannot be written: {e}"))
    }

    /// Adds `event` (an object) with the next `seq`, durably; returns it as
    /// stored. When older undelivered events had to go to make room for it
    /// (or a damaged outbox was dropped), it says how many (`dropped`).
    ///
    /// # Errors
    ///
    /// It cannot be written (the event is still returned in the error's
    /// place by the caller's choice: it can be sent, just not kept).
    pub fn push(
        &self,
        mut event: serde_json::Value,
    ) -> Result<serde_json::Value, (serde_json::Value, String)> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        event["seq"] = s.next_seq.into();
        s.next_seq += 1;
        // Room for it: the oldest undelivered events go, and it says so.
        while s.events.len() >= MAX_EVENTS {
            s.events.pop_front();
            s.dropped += 1;
        }
        if s.dropped > 0 {
            event["dropped"] = s.dropped.into();
            s.dropped = 0;
        }
        s.events.push_back(event.clone());
        match self.save(&s) {
            Ok(()) => Ok(event),
            Err(e) => Err((event, e)),
        }
    }

    /// What is still to be delivered, oldest first.
    pub fn pending(&self) -> Vec<serde_json::Value> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.events.iter().cloned().collect()
    }

    /// The broker has every event up to `seq` (topics are ordered): they
    /// leave the outbox.
    ///
    /// # Errors
    ///
    /// It cannot be written.
    pub fn delivered(&self, seq: u64) -> Result<usize, String> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = s.events.len();
        s.events
            .retain(|e| e["seq"].as_u64().is_none_or(|x| x > seq));
        let n = before - s.events.len();
        if n > 0 {
            self.save(&s)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn events_are_kept_across_reopening_until_delivered_and_drops_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::open(dir.path()).unwrap());
        let o = Outbox::open(registry.clone()).unwrap();
        for i in 0..3 {
            let e = o.push(serde_json::json!({ "kind": "k", "i": i })).unwrap();
            assert_eq!(e["seq"], i);
        }
        assert_eq!(o.delivered(0).unwrap(), 1);
        drop(o);
        let o = Outbox::open(registry.clone()).unwrap();
        let p = o.pending();
        assert_eq!(
            p.iter()
                .map(|e| e["seq"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(o.push(serde_json::json!({})).unwrap()["seq"], 3);
        assert_eq!(o.delivered(3).unwrap(), 3);
        assert!(o.pending().is_empty());
        // Beyond the bound the oldest go, and the next event says how many.
        let dropped: u64 = (0..MAX_EVENTS + 5)
            .map(|_| {
                o.push(serde_json::json!({})).unwrap()["dropped"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum();
        assert_eq!(dropped, 5);
        assert_eq!(o.pending().len(), MAX_EVENTS);
        assert_eq!(o.pending()[0]["seq"], 4 + 5);
        // A damaged outbox starts afresh and says so.
        registry.put_meta(KEY, b"{").unwrap();
        let o = Outbox::open(registry).unwrap();
        assert!(o.pending().is_empty());
        assert_eq!(o.push(serde_json::json!({})).unwrap()["dropped"], 1);
    }
}
