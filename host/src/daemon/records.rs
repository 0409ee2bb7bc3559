//! What the daemon records about each module: its status (state, starts,
//! reason, last exit) in the registry, rewritten on every transition, and
//! under `<state>/modules/<name>/log/` `exits.log` (one JSON line per
//! exit, bounded) and `output.log` (its stdout/stderr, bounded and
//! rotated). The management API and `edgeward module list/logs` read them.
//!
//! Statuses and exit records are written by one thread of their own (each
//! batch of statuses is one registry transaction): a slow disk, or a
//! thousand modules changing state at once, never holds up the threads
//! that run modules. Statuses are coalesced per module (the latest wins)
//! and written together; exit records are appended in order. [`flush`]
//! waits for all of it (the daemon calls it before it exits).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::registry::Registry;
use crate::runtime::Exit;
use crate::runtime::logfile::{DEFAULT_KEEP, DEFAULT_MAX_BYTES, RotatingLog, now_rfc3339};
use crate::state;

/// A status waiting to be written: the registry's file, the module.
type StatusKey = (PathBuf, String);
/// Statuses for one registry: (module, encoded status).
type Batch = Vec<(String, Vec<u8>)>;

#[derive(Default)]
struct Pending {
    statuses: HashMap<StatusKey, (Arc<Registry>, Vec<u8>)>,
    exits: Vec<(String, Arc<RotatingLog>, Vec<u8>)>,
    busy: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.statuses.is_empty() && self.exits.is_empty()
    }
}

/// The record writer: a queue and the thread that empties it.
struct Writer {
    pending: Mutex<Pending>,
    wake: Condvar,
    idle: Condvar,
}

#[cfg(test)]
static TEST_WRITE_DELAY_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Writer {
    fn run(&self) {
        loop {
            let (statuses, exits) = {
                let Ok(mut p) = self.pending.lock() else {
                    return;
                };
                while p.is_empty() {
                    p = match self.wake.wait(p) {
                        Ok(p) => p,
                        Err(_) => return,
                    };
                }
                p.busy = true;
                (
                    std::mem::take(&mut p.statuses),
                    std::mem::take(&mut p.exits),
                )
            };
            // Exits first: a status never names an exit not yet recorded.
            for (name, log, line) in exits {
                slow_disk_for_tests();
                if let Err(e) = log.append(&line) {
                    tracing::warn!(module = %name, error = %e, "cannot record module exit");
                }
            }
            // One transaction per registry for the whole batch.
            let mut by_registry: HashMap<PathBuf, (Arc<Registry>, Batch)> = HashMap::new();
            for ((path, name), (registry, bytes)) in statuses {
                by_registry
                    .entry(path)
                    .or_insert_with(|| (registry, Vec::new()))
                    .1
                    .push((name, bytes));
            }
            for (registry, batch) in by_registry.into_values() {
                slow_disk_for_tests();
                write_statuses(&registry, &batch);
            }
            if let Ok(mut p) = self.pending.lock() {
                p.busy = false;
                if p.is_empty() {
                    self.idle.notify_all();
                }
            }
        }
    }

    fn push(&self, f: impl FnOnce(&mut Pending)) {
        if let Ok(mut p) = self.pending.lock() {
            f(&mut p);
            self.wake.notify_one();
        }
    }
}

fn write_statuses(registry: &Registry, batch: &[(String, Vec<u8>)]) {
    let refs: Vec<(&str, &[u8])> = batch
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    if let Err(e) = registry.put_statuses(&refs) {
        tracing::warn!(modules = batch.len(), error = %e, "cannot write module statuses");
    }
}

fn slow_disk_for_tests() {
    #[cfg(test)]
    std::thread::sleep(Duration::from_millis(
        TEST_WRITE_DELAY_MS.load(std::sync::atomic::Ordering::Relaxed),
    ));
}

static WRITER: OnceLock<Option<Arc<Writer>>> = OnceLock::new();

/// The writer thread, started on first use (`None` if it cannot start:
/// records are then written inline).
fn writer() -> Option<&'static Arc<Writer>> {
    WRITER
        .get_or_init(|| {
            let w = Arc::new(Writer {
                pending: Mutex::default(),
                wake: Condvar::new(),
                idle: Condvar::new(),
            });
            let t = w.clone();
            match std::thread::Builder::new()
                .name("edgeward-records".into())
                .spawn(move || t.run())
            {
                Ok(_) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the record writer; writing records inline");
                    None
                }
            }
        })
        .as_ref()
}

/// Waits until every status and exit record handed over so far is on disk.
pub fn flush() {
    let Some(w) = writer() else {
        return;
    };
    let Ok(mut p) = w.pending.lock() else {
        return;
    };
    while !p.is_empty() || p.busy {
        p = match w.idle.wait(p) {
            Ok(p) => p,
            Err(_) => return,
        };
    }
}

/// A module's place in supervision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleState {
    /// Running now.
    Running,
    /// Waiting out a restart delay.
    BackingOff,
    /// Failing again and again; restarts continue at the capped delay.
    CrashLooping,
    /// Ended and its policy does not restart it.
    Exited,
    /// Stopped because the daemon stopped.
    Stopped,
    /// Not started: its measurement did not match, or it failed to load.
    Refused,
    /// Its supervisor failed (a host bug, logged): not running, not
    /// restarted until the daemon restarts.
    Failed,
    /// Stopped because its component or compiled code no longer matched
    /// its measurement: not restarted until it is updated or added again.
    IntegrityFailed,
}

/// One exit, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExitRecord {
    /// When it ended (RFC 3339, UTC).
    pub at: String,
    /// Which start (1-based) ended.
    pub start: u64,
    /// How long it ran, in milliseconds.
    pub ran_ms: u64,
    /// `success`, `failure`, `trap`, `timeout` or `setup-failed`.
    pub outcome: String,
    /// The exit status, for `failure`.
    pub status: Option<i32>,
    /// The reason, for traps, timeouts and setup failures.
    pub reason: Option<String>,
}

impl ExitRecord {
    /// The record of `exit` after `ran`.
    pub fn new(start: u64, ran: Duration, exit: &Exit) -> Self {
        let (status, reason) = match exit {
            Exit::Success => (None, None),
            Exit::Failure(code) => (Some(*code), None),
            Exit::Trap(why) | Exit::SetupFailed(why) => (None, Some(why.clone())),
            Exit::TimedOut(d) => (None, Some(format!("deadline of {d:?} passed"))),
        };
        let outcome = exit.kind();
        Self {
            at: now_rfc3339(),
            start,
            ran_ms: u64::try_from(ran.as_millis()).unwrap_or(u64::MAX),
            outcome: outcome.to_owned(),
            status,
            reason,
        }
    }
}

/// A module's status, as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The module.
    pub module: String,
    /// Its state.
    pub state: ModuleState,
    /// Starts so far in this daemon run.
    pub starts: u64,
    /// When the state was last written.
    pub updated: String,
    /// The measured digest of what runs (absent when refused before measuring).
    pub digest: Option<String>,
    /// Why it was refused, for [`ModuleState::Refused`].
    pub reason: Option<String>,
    /// The latest exit.
    pub last_exit: Option<ExitRecord>,
    /// The last [`RECENT_EXITS`] exits, oldest first (the exits log keeps
    /// a longer history).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_exits: Vec<ExitRecord>,
    /// Where its code came from and how long each phase of its start took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<CodeReport>,
}

/// Where a module's code came from, and how long each phase took.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CodeReport {
    /// `cache` (an authenticated cache entry), `compiled`, or
    /// `recompiled` (the cache entry was refused).
    pub source: String,
    /// Reading and measuring the component (and checking its signature).
    pub read_ms: u64,
    /// Compiling it, or loading the cache entry, and pre-linking.
    pub load_ms: u64,
    /// Of `load_ms`, waiting in the compile queue for another
    /// compilation to end.
    #[serde(default)]
    pub queued_ms: u64,
    /// Instantiating it, at its latest start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instantiate_ms: Option<u64>,
}

/// How many exits a module's status keeps.
pub const RECENT_EXITS: usize = 10;

/// Where one module's records go, and the writers for them.
#[derive(Debug, Clone)]
pub struct ModuleRecords {
    name: String,
    registry: Arc<Registry>,
    output: Arc<RotatingLog>,
    exits: Arc<RotatingLog>,
    /// The last exits, carried into every status.
    recent: Arc<Mutex<std::collections::VecDeque<ExitRecord>>>,
    code: Arc<Mutex<Option<CodeReport>>>,
}

/// `<state>/modules/<name>`.
pub fn module_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("modules").join(name)
}

/// `<state>/modules/<name>/log/output.log`: a module's output log.
pub fn output_log(state_dir: &Path, name: &str) -> RotatingLog {
    RotatingLog::new(
        module_dir(state_dir, name).join("log/output.log"),
        DEFAULT_MAX_BYTES,
        DEFAULT_KEEP,
    )
}

/// `<state>/modules/<name>/log/exits.log`: a module's exit records.
pub fn exits_log(state_dir: &Path, name: &str) -> RotatingLog {
    RotatingLog::new(
        module_dir(state_dir, name).join("log/exits.log"),
        256 << 10,
        1,
    )
}

impl ModuleRecords {
    /// Creates the module's log directory (0700); its status goes to
    /// `registry`.
    ///
    /// # Errors
    ///
    /// I/O errors naming the directory.
    pub fn open(registry: &Arc<Registry>, state_dir: &Path, name: &str) -> std::io::Result<Self> {
        state::ensure_private_dir(&module_dir(state_dir, name).join("log"))?;
        let recent = status_of(registry, name).map_or_else(Vec::new, |s| s.recent_exits);
        Ok(Self {
            name: name.to_owned(),
            recent: Arc::new(Mutex::new(recent.into())),
            code: Arc::new(Mutex::new(None)),
            registry: registry.clone(),
            output: Arc::new(output_log(state_dir, name)),
            exits: Arc::new(exits_log(state_dir, name)),
        })
    }

    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The output log the module's stdout/stderr go to.
    pub fn output(&self) -> Arc<RotatingLog> {
        self.output.clone()
    }

    /// Records the module's status (in the registry, off this thread).
    /// Failures are logged, not fatal: supervision goes on without its
    /// bookkeeping.
    pub fn set_status(
        &self,
        state: ModuleState,
        starts: u64,
        digest: Option<String>,
        reason: Option<String>,
        last_exit: Option<ExitRecord>,
    ) {
        let status = Status {
            module: self.name.clone(),
            state,
            starts,
            updated: now_rfc3339(),
            digest,
            reason,
            last_exit,
            recent_exits: self
                .recent
                .lock()
                .map(|r| r.iter().cloned().collect())
                .unwrap_or_default(),
            code: self.code.lock().ok().and_then(|c| c.clone()),
        };
        let key = (self.registry.path().to_owned(), self.name.clone());
        remember(&key, &status);
        super::events::publish(super::events::Event {
            at: status.updated.clone(),
            module: self.name.clone(),
            kind: "state",
            state: Some(state),
            reason: status.reason.clone(),
            exit: None,
        });
        let bytes = match serde_json::to_vec_pretty(&status) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(module = %self.name, error = %e, "cannot encode module status");
                return;
            }
        };
        match writer() {
            Some(w) => w.push(|p| {
                p.statuses.insert(key, (self.registry.clone(), bytes));
            }),
            None => write_statuses(&self.registry, &[(self.name.clone(), bytes)]),
        }
    }

    /// Marks the module failed with `reason`, keeping what its last status
    /// said (starts, digest, last exit).
    pub fn mark_failed(&self, reason: String) {
        flush();
        self.mark(ModuleState::Failed, Some(reason));
    }

    /// Records `state` (and `reason`), keeping what the last status said:
    /// starts, digest, last exit.
    pub fn mark(&self, state: ModuleState, reason: Option<String>) {
        let prev = status_of(&self.registry, &self.name);
        let (starts, digest, last_exit) =
            prev.map_or((0, None, None), |s| (s.starts, s.digest, s.last_exit));
        self.set_status(state, starts, digest, reason, last_exit);
    }

    /// Where its code came from and how long loading took; shown with
    /// every status written from now on.
    pub fn set_code(&self, report: CodeReport) {
        if let Ok(mut c) = self.code.lock() {
            *c = Some(report);
        }
    }

    /// How long its latest instantiation took (shown with the next status).
    pub fn set_instantiate_ms(&self, ms: u64) {
        if let Ok(mut c) = self.code.lock()
            && let Some(c) = c.as_mut()
        {
            c.instantiate_ms = Some(ms);
        }
    }

    /// Appends an exit record (on the record writer's thread).
    pub fn record_exit(&self, record: &ExitRecord) {
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == RECENT_EXITS {
                r.pop_front();
            }
            r.push_back(record.clone());
        }
        super::events::publish(super::events::Event {
            at: record.at.clone(),
            module: self.name.clone(),
            kind: "exit",
            state: None,
            reason: None,
            exit: Some(record.clone()),
        });
        let mut line = serde_json::to_vec(record).unwrap_or_default();
        line.push(b'\n');
        match writer() {
            Some(w) => w.push(|p| p.exits.push((self.name.clone(), self.exits.clone(), line))),
            None => {
                if let Err(e) = self.exits.append(&line) {
                    tracing::warn!(module = %self.name, error = %e, "cannot record module exit");
                }
            }
        }
    }
}

/// The latest status of each module this process wrote or read, by
/// registry and name (the management API answers from here).
static LATEST: OnceLock<Mutex<HashMap<StatusKey, Status>>> = OnceLock::new();

fn latest() -> &'static Mutex<HashMap<StatusKey, Status>> {
    LATEST.get_or_init(Mutex::default)
}

fn remember(key: &StatusKey, status: &Status) {
    if let Ok(mut m) = latest().lock() {
        m.insert(key.clone(), status.clone());
    }
}

/// Module `name`'s latest status: as this process last set it, else as the
/// registry has it (then remembered). `None`: it has none.
pub fn status_of(registry: &Registry, name: &str) -> Option<Status> {
    let key = (registry.path().to_owned(), name.to_owned());
    if let Some(s) = latest().lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Some(s);
    }
    let s: Status = serde_json::from_slice(&registry.status(name).ok()??).ok()?;
    remember(&key, &s);
    Some(s)
}

/// Deletes module `name`'s files (logs, data) and forgets its status here:
/// waits for pending writes first, so none lands after. The registry's
/// status goes with its record ([`Registry::remove_module`]).
///
/// # Errors
///
/// When the directory cannot be deleted.
pub fn delete(registry: &Registry, state_dir: &Path, name: &str) -> std::io::Result<()> {
    flush();
    if let Ok(mut m) = latest().lock() {
        m.remove(&(registry.path().to_owned(), name.to_owned()));
    }
    super::metrics::forget(name);
    let dir = module_dir(state_dir, name);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => {
            state::sync_dir(&state_dir.join("modules"));
            Ok(())
        }
    }
}

/// Every module's status in `registry`, sorted by name. Undecodable ones
/// are reported as errors in the list.
pub fn read_statuses(registry: &Registry) -> Vec<Result<Status, String>> {
    let all = match registry.statuses() {
        Ok(all) => all,
        Err(e) => return vec![Err(e.to_string())],
    };
    all.into_iter()
        .map(|(name, bytes)| {
            serde_json::from_slice(&bytes).map_err(|e| format!("status of {name:?}: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a disk that takes 50 ms a write, recording 100 state changes
    /// returns at once; the latest status and every exit arrive.
    #[test]
    fn records_are_written_off_the_callers_thread() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::open(dir.path()).unwrap());
        let records = ModuleRecords::open(&registry, dir.path(), "m").unwrap();
        TEST_WRITE_DELAY_MS.store(50, std::sync::atomic::Ordering::Relaxed);
        let t = std::time::Instant::now();
        for i in 0..100 {
            records.record_exit(&ExitRecord::new(i, Duration::ZERO, &Exit::Failure(1)));
            records.set_status(ModuleState::BackingOff, i, None, None, None);
        }
        let took = t.elapsed();
        TEST_WRITE_DELAY_MS.store(0, std::sync::atomic::Ordering::Relaxed);
        assert!(
            took < Duration::from_millis(50),
            "recording blocked for {took:?}"
        );
        flush();
        let s = read_statuses(&registry).pop().unwrap().unwrap();
        assert_eq!((s.state, s.starts), (ModuleState::BackingOff, 99));
        // The registry keeps the last ten exits; a new writer carries them on.
        let starts: Vec<u64> = s.recent_exits.iter().map(|e| e.start).collect();
        assert_eq!(starts, (90..100).collect::<Vec<_>>());
        let exits = std::fs::read_to_string(exits_log(dir.path(), "m").path()).unwrap();
        assert_eq!(exits.lines().count(), 100);
        let again = ModuleRecords::open(&registry, dir.path(), "m").unwrap();
        again.record_exit(&ExitRecord::new(100, Duration::ZERO, &Exit::Success));
        again.set_status(ModuleState::Exited, 1, None, None, None);
        flush();
        let s = read_statuses(&registry).pop().unwrap().unwrap();
        let starts: Vec<u64> = s.recent_exits.iter().map(|e| e.start).collect();
        assert_eq!(starts, (91..=100).collect::<Vec<_>>());
    }
}
