//! The registry: one crash-safe store in the state directory
//! (`registry.redb`, redb: ACID, copy-on-write B-trees, every commit
//! durable when it returns) holding what the daemon knows about each
//! registered module: its identity registration (generation id and
//! wrapped data key), its record (spec, origin, desired state), its status
//! (state, starts, reason, last exit), and the deployments applied. Every
//! change is one transaction: after `kill -9` or a power loss it is there
//! whole or not at all.
//!
//! One process holds the store at a time (redb locks the file): the daemon
//! while it runs, else an operator command; operator commands that only
//! read open it read-only ([`Registry::open_read_only`]). A store that cannot be read is
//! an error that names it and says what to do; it is never reset, since
//! that would orphan every module's sealed data.
//!
//! A state directory from before the registry (registrations as
//! `identity/modules/<name>.json`) is migrated once, in one transaction,
//! the first time the store is opened; the old files are then deleted (so a
//! deregistration really removes the wrapped key from the state dir).
//!
//! Who may reach it: only processes with the state directory's owner's
//! rights (it is 0700, the store 0600). A module never does; it reaches its
//! registration only through its own identity.

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

/// The store's file name in the state directory.
pub const FILE: &str = "registry.redb";

const REGISTRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("registrations");
const MODULES: TableDefinition<&str, &[u8]> = TableDefinition::new("modules");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const STATUS: TableDefinition<&str, &[u8]> = TableDefinition::new("status");
/// The layout this code writes.
const SCHEMA: &[u8] = b"1";

/// A module's identity registration as stored: its generation id and its
/// data key wrapped by the HSM (see [`crate::identity::registry`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRegistration {
    /// Generation id (32 hex digits).
    pub generation_id: String,
    /// When it was registered (unix seconds).
    pub registered_at: u64,
    /// The data key wrapped by the HSM's master key (base64), or by
    /// `wrapping_key`.
    pub wrapped_key: String,
    /// The HSM key that wraps it, when it is this registration's own (a
    /// PKCS#11 token key, destroyed when the registration is removed);
    /// none: the master key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapping_key: Option<String>,
}

/// Who added a module, and so who may change it: a deployment reconciles
/// only what it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The config file read at start.
    Config,
    /// An operator, through the management API.
    Operator,
    /// The agent module.
    Agent,
    /// The fleet's cloud, through a signed desired deployment on the broker.
    Cloud,
}

/// Whether a module should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// Started by the daemon and kept running per its restart policy.
    Running,
    /// Registered, not started.
    Stopped,
}

/// A module the daemon runs (or holds stopped): its spec as registered
/// (see [`crate::spec::ModuleSpec::to_raw`]), who owns it, and whether it
/// should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleRecord {
    /// The spec, validated again whenever it is used.
    pub spec: crate::spec::RawModuleSpec,
    /// Who added it.
    pub origin: Origin,
    /// Whether it should run.
    pub desired: Desired,
    /// When the record last changed (unix seconds).
    pub updated_at: u64,
}

/// What went wrong with the store. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Another process has it open.
    #[error(
        "{0}: the registry is in use by another process (a running daemon?); stop it first, or ask it through its management API"
    )]
    Busy(PathBuf),
    /// It cannot be read.
    #[error(
        "{path}: the registry cannot be read ({detail}); it is never reset: restore it from a backup, or move it aside to start over (every registration, and the data modules sealed, is then lost)"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What redb or the decoder said.
        detail: String,
    },
    /// Opened read-only, asked to write.
    #[error("{0}: opened read-only")]
    ReadOnly(PathBuf),
    /// A migration input or an I/O error.
    #[error("{path}: {detail}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        detail: String,
    },
}

/// The open store. See the module docs.
#[derive(Debug)]
pub struct Registry {
    db: Db,
    path: PathBuf,
}

enum Db {
    ReadWrite(redb::Database),
    ReadOnly(redb::ReadOnlyDatabase),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ReadWrite(_) => "read-write",
            Self::ReadOnly(_) => "read-only",
        })
    }
}

impl Registry {
    /// Opens (creating it if there is none) the registry of `state_dir`,
    /// migrating a state directory from before it.
    ///
    /// # Errors
    ///
    /// [`RegistryError`]: in use, damaged, or a legacy record that cannot be
    /// migrated (nothing is migrated then).
    pub fn open(state_dir: &Path) -> Result<Self, RegistryError> {
        let path = state_dir.join(FILE);
        let db = match redb::Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(RegistryError::Busy(path));
            }
            Err(e) => {
                return Err(RegistryError::Damaged {
                    path,
                    detail: e.to_string(),
                });
            }
        };
        crate::state::restrict(&path).map_err(|e| RegistryError::Io {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let registry = Self {
            db: Db::ReadWrite(db),
            path,
        };
        registry.migrate(state_dir)?;
        registry.migrate_statuses(state_dir)?;
        Ok(registry)
    }

    /// Imports each `modules/<name>/status.json` (where statuses were kept
    /// before they moved into the store) that has no stored status, in one
    /// transaction, then deletes them.
    fn migrate_statuses(&self, state_dir: &Path) -> Result<(), RegistryError> {
        let Ok(dirs) = std::fs::read_dir(state_dir.join("modules")) else {
            return Ok(());
        };
        let files: Vec<(String, PathBuf)> = dirs
            .flatten()
            .filter_map(|d| {
                let name = d.file_name().into_string().ok()?;
                let file = d.path().join("status.json");
                file.is_file().then_some((name, file))
            })
            .collect();
        if files.is_empty() {
            return Ok(());
        }
        let tx = self.rw()?.begin_write().map_err(|e| self.damaged(e))?;
        {
            let mut table = tx.open_table(STATUS).map_err(|e| self.damaged(e))?;
            for (name, file) in &files {
                if table
                    .get(name.as_str())
                    .map_err(|e| self.damaged(e))?
                    .is_some()
                {
                    continue;
                }
                // A status is bookkeeping: an unreadable one is dropped, not
                // a reason to refuse the store.
                if let Ok(bytes) = std::fs::read(file)
                    && serde_json::from_slice::<serde_json::Value>(&bytes).is_ok()
                {
                    table
                        .insert(name.as_str(), bytes.as_slice())
                        .map_err(|e| self.damaged(e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.damaged(e))?;
        for (_, file) in &files {
            let _ = std::fs::remove_file(file);
        }
        tracing::info!(
            statuses = files.len(),
            "module statuses moved into {}",
            self.path.display()
        );
        Ok(())
    }

    /// Opens the registry of `state_dir` to read only (an operator command
    /// while no daemon holds it). `None`: there is none yet.
    ///
    /// # Errors
    ///
    /// In use by a daemon, or damaged.
    pub fn open_read_only(state_dir: &Path) -> Result<Option<Self>, RegistryError> {
        let path = state_dir.join(FILE);
        if !path.exists() {
            return Ok(None);
        }
        match redb::ReadOnlyDatabase::open(&path) {
            Ok(db) => Ok(Some(Self {
                db: Db::ReadOnly(db),
                path,
            })),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(RegistryError::Busy(path)),
            Err(e) => Err(RegistryError::Damaged {
                path,
                detail: e.to_string(),
            }),
        }
    }

    fn rw(&self) -> Result<&redb::Database, RegistryError> {
        match &self.db {
            Db::ReadWrite(db) => Ok(db),
            Db::ReadOnly(_) => Err(RegistryError::ReadOnly(self.path.clone())),
        }
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, RegistryError> {
        match &self.db {
            Db::ReadWrite(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
        .map_err(|e| self.damaged(e))
    }

    /// Checks every page of the store (redb's integrity check); `false`
    /// when it had to repair something.
    ///
    /// # Errors
    ///
    /// The store is damaged beyond repair.
    pub fn check_integrity(&mut self) -> Result<bool, RegistryError> {
        let path = self.path.clone();
        let Db::ReadWrite(db) = &mut self.db else {
            return Err(RegistryError::ReadOnly(path));
        };
        db.check_integrity().map_err(|e| RegistryError::Damaged {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn damaged(&self, e: impl std::fmt::Display) -> RegistryError {
        RegistryError::Damaged {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    /// Imports `identity/modules/*.json` once (one transaction), then
    /// deletes them.
    fn migrate(&self, state_dir: &Path) -> Result<(), RegistryError> {
        let legacy = state_dir.join("identity").join("modules");
        let tx = self.rw()?.begin_write().map_err(|e| self.damaged(e))?;
        let migrated = {
            let meta = tx.open_table(META).map_err(|e| self.damaged(e))?;
            meta.get("schema").map_err(|e| self.damaged(e))?.is_some()
        };
        if !migrated {
            let mut imported = 0usize;
            {
                let mut regs = tx.open_table(REGISTRATIONS).map_err(|e| self.damaged(e))?;
                for (name, rec) in read_legacy(&legacy)? {
                    let bytes = serde_json::to_vec(&rec).map_err(|e| self.damaged(e))?;
                    if regs
                        .get(name.as_str())
                        .map_err(|e| self.damaged(e))?
                        .is_none()
                    {
                        regs.insert(name.as_str(), bytes.as_slice())
                            .map_err(|e| self.damaged(e))?;
                        imported += 1;
                    }
                }
                let mut meta = tx.open_table(META).map_err(|e| self.damaged(e))?;
                meta.insert("schema", SCHEMA).map_err(|e| self.damaged(e))?;
            }
            tx.commit().map_err(|e| self.damaged(e))?;
            if imported > 0 {
                tracing::info!(
                    registrations = imported,
                    "state directory migrated into {}",
                    self.path.display()
                );
            }
        } else {
            tx.abort().map_err(|e| self.damaged(e))?;
        }
        // Imported (now or by an earlier open that stopped before this).
        if legacy.exists() {
            std::fs::remove_dir_all(&legacy).map_err(|e| RegistryError::Io {
                path: legacy.clone(),
                detail: format!("migrated, but cannot delete the old records: {e}"),
            })?;
            crate::state::sync_dir(legacy.parent().unwrap_or(state_dir));
        }
        Ok(())
    }

    /// The registration of `name`, if any.
    ///
    /// # Errors
    ///
    /// The store or the record cannot be read.
    pub fn registration(&self, name: &str) -> Result<Option<StoredRegistration>, RegistryError> {
        self.get_json(REGISTRATIONS, name, "registration of")
    }

    /// Runs `f` on `table` in a read transaction; `empty` when the table
    /// was never written.
    fn read<T>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        empty: T,
        f: impl FnOnce(&redb::ReadOnlyTable<&str, &[u8]>) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let tx = self.begin_read()?;
        match tx.open_table(table) {
            Ok(t) => f(&t),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(empty),
            Err(e) => Err(self.damaged(e)),
        }
    }

    /// The value `key` of `table`, if any.
    fn bytes(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        self.read(table, None, |t| {
            Ok(t.get(key)
                .map_err(|e| self.damaged(e))?
                .map(|v| v.value().to_vec()))
        })
    }

    /// The JSON record `key` of `table`, decoded; `what` names it in errors.
    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        what: &str,
    ) -> Result<Option<T>, RegistryError> {
        let Some(bytes) = self.bytes(table, key)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| self.damaged(format!("{what} {key:?}: {e}")))
    }

    /// Stores `rec` as `name`'s registration unless it has one; returns
    /// the one stored (`rec`, or the one that was there).
    ///
    /// # Errors
    ///
    /// The store cannot be written.
    pub fn register(
        &self,
        name: &str,
        rec: &StoredRegistration,
    ) -> Result<StoredRegistration, RegistryError> {
        let tx = self.rw()?.begin_write().map_err(|e| self.damaged(e))?;
        {
            let mut table = tx.open_table(REGISTRATIONS).map_err(|e| self.damaged(e))?;
            if let Some(v) = table.get(name).map_err(|e| self.damaged(e))? {
                let existing = serde_json::from_slice(v.value())
                    .map_err(|e| self.damaged(format!("registration of {name:?}: {e}")))?;
                return Ok(existing);
            }
            let bytes = serde_json::to_vec(rec).map_err(|e| self.damaged(e))?;
            table
                .insert(name, bytes.as_slice())
                .map_err(|e| self.damaged(e))?;
        }
        tx.commit().map_err(|e| self.damaged(e))?;
        Ok(rec.clone())
    }

    /// Stores module statuses (encoded by the caller), in one transaction.
    ///
    /// # Errors
    ///
    /// The store cannot be written.
    pub fn put_statuses(&self, statuses: &[(&str, &[u8])]) -> Result<(), RegistryError> {
        let tx = self.rw()?.begin_write().map_err(|e| self.damaged(e))?;
        {
            let mut table = tx.open_table(STATUS).map_err(|e| self.damaged(e))?;
            for (name, bytes) in statuses {
                table.insert(*name, *bytes).map_err(|e| self.damaged(e))?;
            }
        }
        tx.commit().map_err(|e| self.damaged(e))
    }

    /// Module `name`'s status as stored, if any.
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub fn status(&self, name: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        self.bytes(STATUS, name)
    }

    /// Every stored status, by name.
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub fn statuses(&self) -> Result<Vec<(String, Vec<u8>)>, RegistryError> {
        self.read(STATUS, Vec::new(), |t| {
            let mut out = Vec::new();
            for entry in t.iter().map_err(|e| self.damaged(e))? {
                let (k, v) = entry.map_err(|e| self.damaged(e))?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Deletes `name`'s registration. Returns whether there was one.
    ///
    /// # Errors
    ///
    /// The store cannot be written.
    pub fn deregister(&self, name: &str) -> Result<bool, RegistryError> {
        let tx = self.rw()?.begin_write().map_err(|e| self.damaged(e))?;
        let removed = {
            let mut table = tx.open_table(REGISTRATIONS).map_err(|e| self.damaged(e))?;
            table.remove(name).map_err(|e| self.damaged(e))?.is_some()
        };
        tx.commit().map_err(|e| self.damaged(e))?;
        Ok(removed)
    }

    /// The registered names, sorted.
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub fn names(&self) -> Result<Vec<String>, RegistryError> {
        self.keys(REGISTRATIONS)
    }

    /// The keys of `table`, sorted.
    fn keys(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<String>, RegistryError> {
        self.read(table, Vec::new(), |t| {
            let mut names = Vec::new();
            for entry in t.iter().map_err(|e| self.damaged(e))? {
                let (k, _) = entry.map_err(|e| self.damaged(e))?;
                names.push(k.value().to_owned());
            }
            Ok(names)
        })
    }
}

impl Registry {
    /// A value of the registry's own (the last applied deployment, ...).
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        self.bytes(META, key)
    }

    /// Sets a value of the registry's own.
    ///
    /// # Errors
    ///
    /// The store cannot be written.
    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), RegistryError> {
        let tx = self.rw()?.begin_write().map_err(|e| self.damaged(e))?;
        {
            let mut table = tx.open_table(META).map_err(|e| self.damaged(e))?;
            table.insert(key, value).map_err(|e| self.damaged(e))?;
        }
        tx.commit().map_err(|e| self.damaged(e))
    }

    /// Every module record, sorted by name.
    ///
    /// # Errors
    ///
    /// The store or a record cannot be read.
    pub fn modules(&self) -> Result<Vec<ModuleRecord>, RegistryError> {
        self.read(MODULES, Vec::new(), |t| {
            let mut out = Vec::new();
            for entry in t.iter().map_err(|e| self.damaged(e))? {
                let (k, v) = entry.map_err(|e| self.damaged(e))?;
                out.push(
                    serde_json::from_slice(v.value())
                        .map_err(|e| self.damaged(format!("module {:?}: {e}", k.value())))?,
                );
            }
            Ok(out)
        })
    }

    /// The names of the registered modules, sorted (their records unread).
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub fn module_names(&self) -> Result<Vec<String>, RegistryError> {
        self.keys(MODULES)
    }

    /// The record of module `name`, if any.
    ///
    /// # Errors
    ///
    /// The store or the record cannot be read.
    pub fn module(&self, name: &str) -> Result<Option<ModuleRecord>, RegistryError> {
        self.get_json(MODULES, name, "module")
    }

    /// Adds or replaces the record of module `record.spec.name`.
    ///
    /// # Errors
    ///
    /// The store cannot be written.
    pub fn put_module(&self, record: &ModuleRecord) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(record).map_err(|e| self.damaged(e))?;
        let tx = self.rw()?.begin_write().map_err(|e| self.damaged(e))?;
        {
            let mut table = tx.open_table(MODULES).map_err(|e| self.damaged(e))?;
            table
                .insert(record.spec.name.as_str(), bytes.as_slice())
                .map_err(|e| self.damaged(e))?;
        }
        tx.commit().map_err(|e| self.damaged(e))
    }

    /// Removes module `name` and its identity registration together (one
    /// transaction): what it sealed can no longer be opened from this state
    /// directory. Returns whether there was a module record.
    ///
    /// # Errors
    ///
    /// The store cannot be written.
    pub fn remove_module(&self, name: &str) -> Result<bool, RegistryError> {
        let tx = self.rw()?.begin_write().map_err(|e| self.damaged(e))?;
        let removed = {
            let mut modules = tx.open_table(MODULES).map_err(|e| self.damaged(e))?;
            let mut regs = tx.open_table(REGISTRATIONS).map_err(|e| self.damaged(e))?;
            let mut status = tx.open_table(STATUS).map_err(|e| self.damaged(e))?;
            regs.remove(name).map_err(|e| self.damaged(e))?;
            status.remove(name).map_err(|e| self.damaged(e))?;
            modules.remove(name).map_err(|e| self.damaged(e))?.is_some()
        };
        tx.commit().map_err(|e| self.damaged(e))?;
        Ok(removed)
    }

    /// Brings the records the config owns in line with `specs` (the config
    /// file's modules), in one transaction: new ones are added to run,
    /// changed ones replaced (keeping whether they should run), ones no
    /// longer configured removed (their identity registrations are kept).
    /// A configured name another origin owns is left alone and returned.
    ///
    /// # Errors
    ///
    /// The store cannot be read or written.
    pub fn reconcile_config(
        &self,
        specs: &[crate::spec::RawModuleSpec],
    ) -> Result<Vec<String>, RegistryError> {
        let now = crate::identity::unix_now();
        let tx = self.rw()?.begin_write().map_err(|e| self.damaged(e))?;
        let mut conflicts = Vec::new();
        {
            let mut table = tx.open_table(MODULES).map_err(|e| self.damaged(e))?;
            let mut existing: std::collections::HashMap<String, ModuleRecord> =
                std::collections::HashMap::new();
            for entry in table.iter().map_err(|e| self.damaged(e))? {
                let (k, v) = entry.map_err(|e| self.damaged(e))?;
                let rec: ModuleRecord = serde_json::from_slice(v.value())
                    .map_err(|e| self.damaged(format!("module {:?}: {e}", k.value())))?;
                existing.insert(k.value().to_owned(), rec);
            }
            for spec in specs {
                let record = match existing.get(&spec.name) {
                    Some(r) if r.origin != Origin::Config => {
                        conflicts.push(spec.name.clone());
                        continue;
                    }
                    Some(r) if r.spec == *spec => continue,
                    Some(r) => ModuleRecord {
                        spec: spec.clone(),
                        origin: Origin::Config,
                        desired: r.desired,
                        updated_at: now,
                    },
                    None => ModuleRecord {
                        spec: spec.clone(),
                        origin: Origin::Config,
                        desired: Desired::Running,
                        updated_at: now,
                    },
                };
                let bytes = serde_json::to_vec(&record).map_err(|e| self.damaged(e))?;
                table
                    .insert(spec.name.as_str(), bytes.as_slice())
                    .map_err(|e| self.damaged(e))?;
            }
            for (name, rec) in &existing {
                if rec.origin == Origin::Config && !specs.iter().any(|s| &s.name == name) {
                    table.remove(name.as_str()).map_err(|e| self.damaged(e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.damaged(e))?;
        Ok(conflicts)
    }
}

/// The records of a state directory from before the registry.
fn read_legacy(dir: &Path) -> Result<Vec<(String, StoredRegistration)>, RegistryError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(RegistryError::Io {
                path: dir.to_owned(),
                detail: e.to_string(),
            });
        }
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| RegistryError::Io {
            path: dir.to_owned(),
            detail: e.to_string(),
        })?;
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let io = |detail: String| RegistryError::Io {
            path: path.clone(),
            detail,
        };
        let bytes = std::fs::read(&path).map_err(|e| io(e.to_string()))?;
        let rec: StoredRegistration = serde_json::from_slice(&bytes)
            .map_err(|e| io(format!("cannot migrate this registration: {e}")))?;
        out.push((name.to_owned(), rec));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(g: &str) -> StoredRegistration {
        StoredRegistration {
            wrapping_key: None,
            generation_id: g.into(),
            registered_at: 1,
            wrapped_key: "a2V5".into(),
        }
    }

    #[test]
    fn register_keeps_the_first_and_deregister_removes() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        assert_eq!(r.register("m", &rec("g1")).unwrap(), rec("g1"));
        assert_eq!(r.register("m", &rec("g2")).unwrap(), rec("g1"));
        assert_eq!(r.names().unwrap(), ["m"]);
        drop(r);
        let r = Registry::open(d.path()).unwrap();
        assert_eq!(r.registration("m").unwrap(), Some(rec("g1")));
        assert!(r.deregister("m").unwrap());
        assert!(!r.deregister("m").unwrap());
        assert_eq!(r.registration("m").unwrap(), None);
    }

    fn spec(name: &str, digest_byte: char) -> crate::spec::RawModuleSpec {
        crate::spec::RawModuleSpec {
            name: name.into(),
            digest: format!("sha256:{}", digest_byte.to_string().repeat(64)),
            ..Default::default()
        }
    }

    #[test]
    fn config_reconciles_only_what_it_owns() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        r.put_module(&ModuleRecord {
            spec: spec("ops", 'a'),
            origin: Origin::Operator,
            desired: Desired::Running,
            updated_at: 1,
        })
        .unwrap();
        assert!(
            r.reconcile_config(&[spec("a", 'a'), spec("b", 'b')])
                .unwrap()
                .is_empty()
        );
        let names = |r: &Registry| {
            r.modules()
                .unwrap()
                .into_iter()
                .map(|m| m.spec.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&r), ["a", "b", "ops"]);
        // An operator stopped "a"; the config changes it and drops "b", and
        // names "ops", which it does not own.
        let mut a = r.module("a").unwrap().unwrap();
        a.desired = Desired::Stopped;
        r.put_module(&a).unwrap();
        let conflicts = r
            .reconcile_config(&[spec("a", 'c'), spec("ops", 'c')])
            .unwrap();
        assert_eq!(conflicts, ["ops"]);
        assert_eq!(names(&r), ["a", "ops"]);
        let a = r.module("a").unwrap().unwrap();
        assert_eq!((a.spec, a.desired), (spec("a", 'c'), Desired::Stopped));
        assert_eq!(r.module("ops").unwrap().unwrap().spec, spec("ops", 'a'));
        // Removal takes the identity registration with it.
        r.register("a", &rec("g")).unwrap();
        assert!(r.remove_module("a").unwrap());
        assert_eq!(r.registration("a").unwrap(), None);
    }

    #[test]
    fn one_process_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let _r = Registry::open(d.path()).unwrap();
        let e = Registry::open(d.path()).unwrap_err();
        assert!(e.to_string().contains("in use by another process"), "{e}");
    }

    /// A damaged store is an error naming it, and is left as it was.
    #[test]
    fn readers_open_it_read_only_when_no_daemon_holds_it() {
        let d = tempfile::tempdir().unwrap();
        assert!(Registry::open_read_only(d.path()).unwrap().is_none());
        let r = Registry::open(d.path()).unwrap();
        r.put_statuses(&[("a", br#"{"state":"running"}"#)]).unwrap();
        assert!(matches!(
            Registry::open_read_only(d.path()),
            Err(RegistryError::Busy(_))
        ));
        drop(r);
        let ro = Registry::open_read_only(d.path()).unwrap().unwrap();
        assert_eq!(ro.status("a").unwrap().unwrap(), br#"{"state":"running"}"#);
        assert!(matches!(
            ro.put_statuses(&[("a", b"{}")]),
            Err(RegistryError::ReadOnly(_))
        ));
    }

    #[test]
    fn status_files_move_into_the_store_once() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("modules/a");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("status.json"),
            br#"{"module":"a","state":"exited"}"#,
        )
        .unwrap();
        let bad = d.path().join("modules/b");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("status.json"), b"not json").unwrap();
        let r = Registry::open(d.path()).unwrap();
        assert_eq!(
            r.status("a").unwrap().unwrap(),
            br#"{"module":"a","state":"exited"}"#
        );
        assert!(
            r.status("b").unwrap().is_none(),
            "an unreadable one is dropped"
        );
        assert!(!dir.join("status.json").exists() && !bad.join("status.json").exists());
        // A stored status is not replaced by a file found later.
        r.put_statuses(&[("a", br#"{"state":"running"}"#)]).unwrap();
        drop(r);
        std::fs::write(dir.join("status.json"), br#"{"state":"old"}"#).unwrap();
        let r = Registry::open(d.path()).unwrap();
        assert_eq!(r.status("a").unwrap().unwrap(), br#"{"state":"running"}"#);
        // Removing the module removes its status.
        r.remove_module("a").unwrap();
        assert!(r.status("a").unwrap().is_none());
    }

    #[test]
    fn a_damaged_store_is_refused_and_kept() {
        let d = tempfile::tempdir().unwrap();
        drop(Registry::open(d.path()).unwrap());
        let path = d.path().join(FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        for b in bytes.iter_mut().take(512) {
            *b ^= 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = Registry::open(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("registry.redb") && e.contains("never reset"),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "left untouched");
    }

    /// Writes `name`'s record as a state dir from before the registry held
    /// it; returns that directory.
    fn write_legacy(state: &Path, name: &str, r: &StoredRegistration) -> PathBuf {
        let legacy = state.join("identity/modules");
        std::fs::create_dir_all(&legacy).unwrap();
        std::fs::write(
            legacy.join(format!("{name}.json")),
            serde_json::to_vec(r).unwrap(),
        )
        .unwrap();
        legacy
    }

    #[test]
    fn legacy_records_are_migrated_once_then_deleted() {
        let d = tempfile::tempdir().unwrap();
        let legacy = write_legacy(d.path(), "a", &rec("ga"));
        let r = Registry::open(d.path()).unwrap();
        assert_eq!(r.registration("a").unwrap(), Some(rec("ga")));
        assert!(!legacy.exists());
        // A record that reappears later is not imported again.
        assert!(r.deregister("a").unwrap());
        drop(r);
        write_legacy(d.path(), "a", &rec("ga"));
        let r = Registry::open(d.path()).unwrap();
        assert_eq!(r.registration("a").unwrap(), None);
        assert!(!legacy.exists());
    }

    /// A legacy record that cannot be read stops the migration whole.
    #[test]
    fn a_bad_legacy_record_migrates_nothing() {
        let d = tempfile::tempdir().unwrap();
        let legacy = write_legacy(d.path(), "a", &rec("ga"));
        std::fs::write(legacy.join("b.json"), b"{not json").unwrap();
        let e = Registry::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("b.json") && e.contains("cannot migrate"), "{e}");
        assert!(legacy.join("a.json").exists());
    }
}
