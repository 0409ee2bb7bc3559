//! What the daemon records about each module, under
//! `<state>/modules/<name>/`: `status.json` (its current state, rewritten
//! atomically on every transition), `log/exits.log` (one JSON line per
//! exit, bounded) and `log/output.log` (its stdout/stderr, bounded and
//! rotated). `edgeward status` and `edgeward logs` read them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::Exit;
use crate::runtime::logfile::{DEFAULT_KEEP, DEFAULT_MAX_BYTES, RotatingLog, now_rfc3339};
use crate::state;

/// A module's place in supervision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// One exit, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        let (outcome, status, reason) = match exit {
            Exit::Success => ("success", None, None),
            Exit::Failure(code) => ("failure", Some(*code), None),
            Exit::Trap(why) => ("trap", None, Some(why.clone())),
            Exit::TimedOut(d) => ("timeout", None, Some(format!("deadline of {d:?} passed"))),
            Exit::SetupFailed(why) => ("setup-failed", None, Some(why.clone())),
        };
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

/// The contents of `status.json`.
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
}

/// Where one module's files live, and the writers for them.
#[derive(Debug, Clone)]
pub struct ModuleRecords {
    name: String,
    dir: PathBuf,
    output: Arc<RotatingLog>,
    exits: Arc<RotatingLog>,
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
    /// Creates the module's directories (0700).
    ///
    /// # Errors
    ///
    /// I/O errors naming the directory.
    pub fn open(state_dir: &Path, name: &str) -> std::io::Result<Self> {
        let dir = module_dir(state_dir, name);
        state::ensure_private_dir(&dir.join("log"))?;
        Ok(Self {
            name: name.to_owned(),
            output: Arc::new(output_log(state_dir, name)),
            exits: Arc::new(exits_log(state_dir, name)),
            dir,
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

    /// Writes `status.json`. Failures are logged, not fatal: supervision
    /// goes on without its bookkeeping.
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
        };
        let path = self.dir.join("status.json");
        let result = serde_json::to_vec_pretty(&status)
            .map_err(std::io::Error::other)
            .and_then(|bytes| state::write_atomic(&path, &bytes));
        if let Err(e) = result {
            tracing::warn!(module = %self.name, path = %path.display(), error = %e, "cannot write module status");
        }
    }

    /// Marks the module failed with `reason`, keeping what its last status
    /// said (starts, digest, last exit).
    pub fn mark_failed(&self, reason: String) {
        let path = self.dir.join("status.json");
        let prev: Option<Status> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let (starts, digest, last_exit) =
            prev.map_or((0, None, None), |s| (s.starts, s.digest, s.last_exit));
        self.set_status(ModuleState::Failed, starts, digest, Some(reason), last_exit);
    }

    /// Appends an exit record.
    pub fn record_exit(&self, record: &ExitRecord) {
        let mut line = serde_json::to_vec(record).unwrap_or_default();
        line.push(b'\n');
        if let Err(e) = self.exits.append(&line) {
            tracing::warn!(module = %self.name, error = %e, "cannot record module exit");
        }
    }
}

/// Reads every module's `status.json` under `state_dir`, sorted by name.
/// Unreadable or malformed files are reported as errors in the list.
pub fn read_statuses(state_dir: &Path) -> Vec<Result<Status, String>> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("modules")) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path().join("status.json"))
        .filter(|p| p.exists())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect()
}
