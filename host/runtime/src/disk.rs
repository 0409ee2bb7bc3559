//! Disk budgets: a budgeted directory (every module's own data directory in
//! the daemon; `edgeward run --max-disk` for its `--dir` grants) holds at
//! most `max_disk` bytes in at most `max_disk_entries` entries. A write, a
//! file or directory creation, a link or a resize that would go past either
//! fails with `quota` (EDQUOT) in the guest, and is logged (rate-limited)
//! for the operator. The daemon's own state shares that disk: a module
//! cannot fill it.
//!
//! # How usage is counted
//!
//! Bytes are the apparent sizes of the files and symbolic links under the
//! directory, each inode once; entries are the files, directories and links
//! under it. The per-entry overhead of the filesystem (a 1-byte file takes a
//! block) is bounded by the entry budget. A sparse file counts at its full
//! apparent size: conservative, never under.
//!
//! The usage is walked once per start (before the module runs), then kept
//! exact as the module works: every call that can change it is shadowed in
//! the linker (`wasi:filesystem/types` and `preopens`), checked against the
//! budget before it runs, and settled after with what it actually did
//! (`fstat` of the file where that matters). A file the module unlinked
//! while it still holds it open (a descriptor, or a stream made from one)
//! keeps its blocks on disk: it stays counted until the last hold closes.
//! Links and renames between a budgeted directory and any other directory
//! fail with `cross-device` (EXDEV), as they would across a quota boundary.
//!
//! Who may reach this: only the module, through its WASI filesystem calls.
//! What a hostile module can try, each tested in the hostile suite and the
//! tests below: write in a loop; grow a file with `set-size` (sparse);
//! write through streams (`write-via-stream`, `append-via-stream`); create
//! empty files, directories or symbolic links in a loop (entries); unlink a
//! file it holds open and write another; hard-link or rename across the
//! boundary to launder bytes.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cap_primitives::fs::{FollowSymlinks, MetadataExt as _};
use wasmtime::component::Resource;
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemCtxView};
use wasmtime_wasi::p2::bindings::filesystem::preopens;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    self, ErrorCode, HostDescriptor, HostDirectoryEntryStream,
};
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, FsError, FsResult, InputStream, OutputStream, Pollable,
    StreamError, StreamResult,
};

use super::loglimit::LogLimiter;
use crate::units::format_size;

/// Default byte budget of a module's data directory (256 MiB).
pub const DEFAULT_MAX_DISK: u64 = 256 << 20;
/// Default entry budget of a module's data directory.
pub const DEFAULT_MAX_DISK_ENTRIES: u32 = 10_000;

/// How much a budgeted directory may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimit {
    /// Bytes (apparent file sizes).
    pub max_bytes: u64,
    /// Files, directories and links.
    pub max_entries: u32,
}

/// A file's identity on the host: (device, inode).
type Inode = (u64, u64);

#[derive(Debug, Default)]
struct Usage {
    bytes: u64,
    entries: u64,
    /// Files the module holds open under this budget.
    open: HashMap<Inode, OpenFile>,
}

#[derive(Debug)]
struct OpenFile {
    holds: u32,
    /// Unlinked while held: its size is credited when the last hold closes.
    orphan: bool,
}

/// The refusal a guest sees as `quota`; the text is for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QuotaExceeded(String);

/// One budgeted directory's usage, shared by the module's descriptors and
/// streams under it.
#[derive(Debug)]
pub struct DiskBudget {
    limit: DiskLimit,
    /// The directory as the module sees it, for messages.
    guest: Box<str>,
    module: Box<str>,
    usage: Mutex<Usage>,
    log: LogLimiter,
}

impl DiskBudget {
    /// The budget of `host` (seen as `guest`), with its current usage
    /// walked from disk. Symbolic links are never followed; the walk stops
    /// counting once past the entry budget (the answer is "over" already).
    ///
    /// # Errors
    ///
    /// When the directory cannot be read; the message names it.
    pub fn open(module: &str, host: &Path, guest: &str, limit: DiskLimit) -> anyhow::Result<Self> {
        let (bytes, entries) = walk(host, u64::from(limit.max_entries) + 1).map_err(|e| {
            anyhow::anyhow!("cannot measure the disk usage of {}: {e}", host.display())
        })?;
        Ok(Self {
            limit,
            guest: guest.into(),
            module: module.into(),
            usage: Mutex::new(Usage {
                bytes,
                entries,
                open: HashMap::new(),
            }),
            log: LogLimiter::new(module, "disk budget refusals"),
        })
    }

    /// Bytes and entries in use now.
    pub fn usage(&self) -> (u64, u64) {
        self.usage
            .lock()
            .map(|u| (u.bytes, u.entries))
            .unwrap_or((u64::MAX, u64::MAX))
    }

    /// Takes `bytes` and `entries` from the budget, or refuses (nothing
    /// taken) naming the limit.
    fn charge(&self, bytes: u64, entries: u64) -> Result<(), QuotaExceeded> {
        if bytes == 0 && entries == 0 {
            return Ok(());
        }
        let Ok(mut u) = self.usage.lock() else {
            return Err(QuotaExceeded("disk budget unavailable".into()));
        };
        let nb = u.bytes.saturating_add(bytes);
        let ne = u.entries.saturating_add(entries);
        let why = if nb > self.limit.max_bytes {
            format!(
                "disk budget exceeded: {} more would bring {} to {}, past its {} (max_disk)",
                format_size(bytes),
                self.guest,
                format_size(nb),
                format_size(self.limit.max_bytes)
            )
        } else if ne > u64::from(self.limit.max_entries) {
            format!(
                "disk budget exceeded: {} holds {} entries, its max_disk_entries",
                self.guest, u.entries
            )
        } else {
            u.bytes = nb;
            u.entries = ne;
            return Ok(());
        };
        drop(u);
        if self.log.allow() {
            tracing::warn!(module = %self.module, "{why}");
        }
        Err(QuotaExceeded(why))
    }

    /// Gives back `bytes` and `entries`.
    fn credit(&self, bytes: u64, entries: u64) {
        if let Ok(mut u) = self.usage.lock() {
            u.bytes = u.bytes.saturating_sub(bytes);
            u.entries = u.entries.saturating_sub(entries);
        }
    }

    /// A path was unlinked (or replaced by a rename): its entry is gone;
    /// its bytes too when that was its last link, unless the module still
    /// holds it open (then they go when the last hold closes).
    fn unlinked(&self, meta: &cap_primitives::fs::Metadata) {
        let Ok(mut u) = self.usage.lock() else {
            return;
        };
        u.entries = u.entries.saturating_sub(1);
        if meta.is_dir() || meta.nlink() > 1 {
            return;
        }
        match u.open.get_mut(&(meta.dev(), meta.ino())) {
            Some(f) => f.orphan = true,
            None => u.bytes = u.bytes.saturating_sub(meta.len()),
        }
    }

    fn hold(self: &Arc<Self>, file: &Arc<std::fs::File>) -> std::io::Result<Hold> {
        let m = file.metadata()?;
        let inode = (m.dev(), m.ino());
        if let Ok(mut u) = self.usage.lock() {
            u.open
                .entry(inode)
                .or_insert(OpenFile {
                    holds: 0,
                    orphan: false,
                })
                .holds += 1;
        }
        Ok(Hold {
            budget: self.clone(),
            inode,
            file: file.clone(),
        })
    }
}

/// Bytes (each inode once) and entries under `dir`, not following links;
/// stops descending once `stop_at` entries are counted.
fn walk(dir: &Path, stop_at: u64) -> std::io::Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut entries = 0u64;
    let mut seen: HashSet<Inode> = HashSet::new();
    let mut todo: Vec<PathBuf> = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?; // lstat: links are not followed
            entries += 1;
            if entries >= stop_at {
                return Ok((bytes, entries));
            }
            if m.is_dir() {
                todo.push(e.path());
            } else if m.nlink() <= 1 || seen.insert((m.dev(), m.ino())) {
                bytes = bytes.saturating_add(m.len());
            }
        }
    }
    Ok((bytes, entries))
}

/// A module's hold on a file under a budget: one per descriptor and per
/// stream. Closing the last hold of an unlinked file credits its size.
#[derive(Debug)]
struct Hold {
    budget: Arc<DiskBudget>,
    inode: Inode,
    file: Arc<std::fs::File>,
}

impl Hold {
    fn size(&self) -> std::io::Result<u64> {
        self.file.metadata().map(|m| m.len())
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let Ok(mut u) = self.budget.usage.lock() else {
            return;
        };
        let Some(f) = u.open.get_mut(&self.inode) else {
            return;
        };
        f.holds -= 1;
        if f.holds > 0 {
            return;
        }
        let orphan = f.orphan;
        u.open.remove(&self.inode);
        if orphan {
            let size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
            u.bytes = u.bytes.saturating_sub(size);
        }
    }
}

/// What the module's descriptors are under.
#[derive(Debug)]
struct Tracked {
    budget: Arc<DiskBudget>,
    /// Set for files.
    _hold: Option<Hold>,
}

/// The budgets of one module instance: one per budgeted preopen (in
/// preopen order), and which of its descriptors are under which.
#[derive(Debug, Default)]
pub struct FsBudgets {
    preopens: Vec<Option<Arc<DiskBudget>>>,
    descriptors: HashMap<u32, Tracked>,
}

impl FsBudgets {
    /// Budgets for preopens in order (`None`: not budgeted).
    pub fn new(preopens: Vec<Option<Arc<DiskBudget>>>) -> Self {
        Self {
            preopens,
            descriptors: HashMap::new(),
        }
    }

    /// The budget a descriptor is under, if any.
    fn budget_of(&self, rep: u32) -> Option<&Arc<DiskBudget>> {
        self.descriptors.get(&rep).map(|t| &t.budget)
    }
}

/// The `wasi:filesystem` a module sees: wasmtime-wasi's, with every call
/// that can grow a budgeted directory checked first.
#[allow(missing_debug_implementations)]
pub struct BudgetedFs<'a> {
    /// wasmtime-wasi's own implementation.
    pub fs: WasiFilesystemCtxView<'a>,
    /// The module's budgets.
    pub budgets: &'a mut FsBudgets,
}

/// [`wasmtime::component::HasData`] marker for [`BudgetedFs`].
#[derive(Debug)]
pub struct HasBudgetedFs;

impl wasmtime::component::HasData for HasBudgetedFs {
    type Data<'a> = BudgetedFs<'a>;
}

/// The guest sees `quota`; the reason went to the log.
fn quota(_: QuotaExceeded) -> FsError {
    ErrorCode::Quota.into()
}

fn io(e: &std::io::Error) -> FsError {
    ErrorCode::from(e).into()
}

fn borrow<T: 'static>(r: &Resource<T>) -> Resource<T> {
    Resource::new_borrow(r.rep())
}

impl BudgetedFs<'_> {
    /// The host file behind a descriptor, when it is a file.
    fn file_of(&self, fd: &Resource<types::Descriptor>) -> FsResult<Option<Arc<std::fs::File>>> {
        Ok(match self.fs.table.get(fd)? {
            Descriptor::File(f) => Some(f.file.clone()),
            Descriptor::Dir(_) => None,
        })
    }

    /// The budget and host file behind a descriptor, when it is a file
    /// under a budget.
    fn budgeted_file(
        &self,
        fd: &Resource<types::Descriptor>,
    ) -> FsResult<Option<(Arc<DiskBudget>, Arc<std::fs::File>)>> {
        let Some(budget) = self.budgets.budget_of(fd.rep()).cloned() else {
            return Ok(None);
        };
        Ok(self.file_of(fd)?.map(|file| (budget, file)))
    }

    /// The host directory behind a descriptor, when it is one.
    fn dir_of(&self, fd: &Resource<types::Descriptor>) -> FsResult<Arc<std::fs::File>> {
        match self.fs.table.get(fd)? {
            Descriptor::Dir(d) => Ok(d.dir.clone()),
            Descriptor::File(_) => Err(ErrorCode::NotDirectory.into()),
        }
    }

    /// `lstat` (or `stat`) of `path` under a budgeted directory, resolved
    /// inside it the way wasmtime-wasi resolves it. `None`: nothing there.
    fn stat_under(
        &self,
        dir: &Resource<types::Descriptor>,
        path: &str,
        follow: bool,
    ) -> FsResult<Option<cap_primitives::fs::Metadata>> {
        let d = self.dir_of(dir)?;
        let follow = if follow {
            FollowSymlinks::Yes
        } else {
            FollowSymlinks::No
        };
        match cap_primitives::fs::stat(&d, Path::new(path), follow) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&e)),
        }
    }

    /// Both directories under the same budget, or neither under one.
    fn same_budget(
        &self,
        a: &Resource<types::Descriptor>,
        b: &Resource<types::Descriptor>,
    ) -> FsResult<Option<Arc<DiskBudget>>> {
        match (
            self.budgets.budget_of(a.rep()),
            self.budgets.budget_of(b.rep()),
        ) {
            (None, None) => Ok(None),
            (Some(x), Some(y)) if Arc::ptr_eq(x, y) => Ok(Some(x.clone())),
            _ => Err(ErrorCode::CrossDevice.into()),
        }
    }
}

/// The handle-making calls with the budget's bookkeeping; their trait
/// methods turn a full handle table into an error code.
impl BudgetedFs<'_> {
    async fn open_at_budgeted(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<types::Descriptor>> {
        let Some(budget) = self.budgets.budget_of(fd.rep()).cloned() else {
            let opened =
                HostDescriptor::open_at(&mut self.fs, fd, path_flags, path, oflags, flags).await?;
            // Its handle number is its own now, whatever held it before.
            self.budgets.descriptors.remove(&opened.rep());
            return Ok(opened);
        };
        let creating = oflags.contains(types::OpenFlags::CREATE);
        let truncating = oflags.contains(types::OpenFlags::TRUNCATE);
        // What is there now: a creation takes an entry, a truncation frees
        // the file's bytes.
        let before = if creating || truncating {
            let follow = path_flags.contains(types::PathFlags::SYMLINK_FOLLOW);
            // Cannot tell (an error): count a creation, as if there were
            // nothing (over, never under).
            self.stat_under(&fd, &path, follow).unwrap_or_default()
        } else {
            None
        };
        let new_entry = creating && before.is_none();
        if new_entry {
            budget.charge(0, 1).map_err(quota)?;
        }
        let opened =
            HostDescriptor::open_at(&mut self.fs, borrow(&fd), path_flags, path, oflags, flags)
                .await;
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                if new_entry {
                    budget.credit(0, 1);
                }
                return Err(e);
            }
        };
        if truncating && let Some(m) = &before {
            budget.credit(m.len(), 0);
        }
        let hold = match self.file_of(&opened)? {
            Some(file) => match budget.hold(&file) {
                Ok(h) => Some(h),
                Err(e) => {
                    let _ = HostDescriptor::drop(&mut self.fs, opened);
                    return Err(io(&e));
                }
            },
            None => None,
        };
        self.budgets.descriptors.insert(
            opened.rep(),
            Tracked {
                budget,
                _hold: hold,
            },
        );
        Ok(opened)
    }

    fn read_via_stream_budgeted(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynInputStream>> {
        let budgeted = self.budgeted_file(&fd)?;
        let stream = HostDescriptor::read_via_stream(&mut self.fs, fd, offset)?;
        let Some((budget, file)) = budgeted else {
            return Ok(stream);
        };
        let inner = self.fs.table.delete(stream)?;
        let hold = budget.hold(&file).map_err(|e| io(&e))?;
        Ok(self
            .fs
            .table
            .push(HeldInput { inner, _hold: hold }.boxed())?)
    }
}

impl BudgetedFs<'_> {
    /// Whether the handle table has room for one more entry (it is this
    /// store's alone, so the room stays until the caller takes it).
    fn reserve_handle(&mut self) -> FsResult<()> {
        match self.fs.table.push(()) {
            Ok(probe) => {
                self.fs.table.delete(probe)?;
                Ok(())
            }
            Err(e) => Err(handles_full(FsError::trap(e))),
        }
    }
}

/// A full handle table (`max_handles`) as `insufficient-memory` (ENOMEM):
/// wasi:filesystem has no EMFILE, and the table is host memory the module
/// may hold. The module can close something and retry; it does not trap.
fn handles_full(e: FsError) -> FsError {
    super::handles_full_as(e, ErrorCode::InsufficientMemory)
}

impl preopens::Host for BudgetedFs<'_> {
    fn get_directories(&mut self) -> wasmtime::Result<Vec<(Resource<Descriptor>, String)>> {
        let dirs = preopens::Host::get_directories(&mut self.fs)?;
        for (i, (fd, _)) in dirs.iter().enumerate() {
            match self.budgets.preopens.get(i) {
                Some(Some(b)) => {
                    self.budgets.descriptors.insert(
                        fd.rep(),
                        Tracked {
                            budget: b.clone(),
                            _hold: None,
                        },
                    );
                }
                _ => {
                    self.budgets.descriptors.remove(&fd.rep());
                }
            }
        }
        Ok(dirs)
    }
}

impl types::Host for BudgetedFs<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<ErrorCode> {
        types::Host::convert_error_code(&mut self.fs, err)
    }

    fn filesystem_error_code(
        &mut self,
        err: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        if self.fs.table.get(&err)?.is::<QuotaExceeded>() {
            return Ok(Some(ErrorCode::Quota));
        }
        types::Host::filesystem_error_code(&mut self.fs, err)
    }
}

impl HostDescriptor for BudgetedFs<'_> {
    async fn advise(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
        len: types::Filesize,
        advice: types::Advice,
    ) -> FsResult<()> {
        HostDescriptor::advise(&mut self.fs, fd, offset, len, advice).await
    }

    async fn sync_data(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        HostDescriptor::sync_data(&mut self.fs, fd).await
    }

    async fn get_flags(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorFlags> {
        HostDescriptor::get_flags(&mut self.fs, fd).await
    }

    async fn get_type(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorType> {
        HostDescriptor::get_type(&mut self.fs, fd).await
    }

    async fn set_size(
        &mut self,
        fd: Resource<types::Descriptor>,
        size: types::Filesize,
    ) -> FsResult<()> {
        let Some((budget, file)) = self.budgeted_file(&fd)? else {
            return HostDescriptor::set_size(&mut self.fs, fd, size).await;
        };
        let before = file.metadata().map_err(|e| io(&e))?.len();
        budget
            .charge(size.saturating_sub(before), 0)
            .map_err(quota)?;
        let r = HostDescriptor::set_size(&mut self.fs, fd, size).await;
        let after = file.metadata().map_or(before, |m| m.len());
        settle(&budget, before, size.max(before), after);
        r
    }

    async fn set_times(
        &mut self,
        fd: Resource<types::Descriptor>,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        HostDescriptor::set_times(&mut self.fs, fd, atim, mtim).await
    }

    async fn read(
        &mut self,
        fd: Resource<types::Descriptor>,
        len: types::Filesize,
        offset: types::Filesize,
    ) -> FsResult<(Vec<u8>, bool)> {
        HostDescriptor::read(&mut self.fs, fd, len, offset).await
    }

    async fn write(
        &mut self,
        fd: Resource<types::Descriptor>,
        buf: Vec<u8>,
        offset: types::Filesize,
    ) -> FsResult<types::Filesize> {
        let Some((budget, file)) = self.budgeted_file(&fd)? else {
            return HostDescriptor::write(&mut self.fs, fd, buf, offset).await;
        };
        let before = file.metadata().map_err(|e| io(&e))?.len();
        let end = offset.saturating_add(buf.len() as u64);
        budget
            .charge(end.saturating_sub(before), 0)
            .map_err(quota)?;
        let r = HostDescriptor::write(&mut self.fs, fd, buf, offset).await;
        let after = file.metadata().map_or(before, |m| m.len());
        settle(&budget, before, end.max(before), after);
        r
    }

    async fn read_directory(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<types::DirectoryEntryStream>> {
        HostDescriptor::read_directory(&mut self.fs, fd)
            .await
            .map_err(handles_full)
    }

    async fn sync(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        HostDescriptor::sync(&mut self.fs, fd).await
    }

    async fn create_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        let Some(budget) = self.budgets.budget_of(fd.rep()).cloned() else {
            return HostDescriptor::create_directory_at(&mut self.fs, fd, path).await;
        };
        budget.charge(0, 1).map_err(quota)?;
        let r = HostDescriptor::create_directory_at(&mut self.fs, fd, path).await;
        if r.is_err() {
            budget.credit(0, 1);
        }
        r
    }

    async fn stat(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorStat> {
        HostDescriptor::stat(&mut self.fs, fd).await
    }

    async fn stat_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::DescriptorStat> {
        HostDescriptor::stat_at(&mut self.fs, fd, path_flags, path).await
    }

    async fn set_times_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        HostDescriptor::set_times_at(&mut self.fs, fd, path_flags, path, atim, mtim).await
    }

    async fn link_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path_flags: types::PathFlags,
        old_path: String,
        new_descriptor: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        let Some(budget) = self.same_budget(&fd, &new_descriptor)? else {
            return HostDescriptor::link_at(
                &mut self.fs,
                fd,
                old_path_flags,
                old_path,
                new_descriptor,
                new_path,
            )
            .await;
        };
        budget.charge(0, 1).map_err(quota)?;
        let r = HostDescriptor::link_at(
            &mut self.fs,
            fd,
            old_path_flags,
            old_path,
            new_descriptor,
            new_path,
        )
        .await;
        if r.is_err() {
            budget.credit(0, 1);
        }
        r
    }

    async fn open_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<types::Descriptor>> {
        // A free handle first: wasmtime creates the file before it takes
        // a handle for it, so a full table found afterwards would leave a
        // file behind per call, counted by no budget.
        self.reserve_handle()?;
        self.open_at_budgeted(fd, path_flags, path, oflags, flags)
            .await
            .map_err(handles_full)
    }

    fn drop(&mut self, fd: Resource<types::Descriptor>) -> wasmtime::Result<()> {
        let tracked = self.budgets.descriptors.remove(&fd.rep());
        let r = HostDescriptor::drop(&mut self.fs, fd);
        drop(tracked);
        r
    }

    async fn readlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<String> {
        HostDescriptor::readlink_at(&mut self.fs, fd, path).await
    }

    async fn remove_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        let budget = self.budgets.budget_of(fd.rep()).cloned();
        HostDescriptor::remove_directory_at(&mut self.fs, fd, path).await?;
        if let Some(b) = budget {
            b.credit(0, 1);
        }
        Ok(())
    }

    async fn rename_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path: String,
        new_fd: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        let Some(budget) = self.same_budget(&fd, &new_fd)? else {
            return HostDescriptor::rename_at(&mut self.fs, fd, old_path, new_fd, new_path).await;
        };
        // A rename over an existing entry removes that entry.
        let replaced = self.stat_under(&new_fd, &new_path, false)?;
        let source = self.stat_under(&fd, &old_path, false)?;
        HostDescriptor::rename_at(&mut self.fs, fd, old_path, new_fd, new_path).await?;
        if let (Some(r), Some(s)) = (&replaced, &source)
            && (r.dev(), r.ino()) != (s.dev(), s.ino())
        {
            budget.unlinked(r);
        }
        Ok(())
    }

    async fn symlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        src_path: String,
        dest_path: String,
    ) -> FsResult<()> {
        let Some(budget) = self.budgets.budget_of(fd.rep()).cloned() else {
            return HostDescriptor::symlink_at(&mut self.fs, fd, src_path, dest_path).await;
        };
        // A link's size is its target's length.
        let size = src_path.len() as u64;
        budget.charge(size, 1).map_err(quota)?;
        let r = HostDescriptor::symlink_at(&mut self.fs, fd, src_path, dest_path).await;
        if r.is_err() {
            budget.credit(size, 1);
        }
        r
    }

    async fn unlink_file_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        let Some(budget) = self.budgets.budget_of(fd.rep()).cloned() else {
            return HostDescriptor::unlink_file_at(&mut self.fs, fd, path).await;
        };
        let before = self.stat_under(&fd, &path, false)?;
        HostDescriptor::unlink_file_at(&mut self.fs, fd, path).await?;
        if let Some(m) = &before {
            budget.unlinked(m);
        }
        Ok(())
    }

    fn read_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynInputStream>> {
        self.read_via_stream_budgeted(fd, offset)
            .map_err(handles_full)
    }

    fn write_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynOutputStream>> {
        self.budgeted_output(fd, Some(offset)).map_err(handles_full)
    }

    fn append_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<DynOutputStream>> {
        self.budgeted_output(fd, None).map_err(handles_full)
    }

    async fn is_same_object(
        &mut self,
        a: Resource<types::Descriptor>,
        b: Resource<types::Descriptor>,
    ) -> wasmtime::Result<bool> {
        HostDescriptor::is_same_object(&mut self.fs, a, b).await
    }

    async fn metadata_hash(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::MetadataHashValue> {
        HostDescriptor::metadata_hash(&mut self.fs, fd).await
    }

    async fn metadata_hash_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::MetadataHashValue> {
        HostDescriptor::metadata_hash_at(&mut self.fs, fd, path_flags, path).await
    }
}

impl BudgetedFs<'_> {
    /// `write-via-stream` (`offset`) or `append-via-stream` (`None`): the
    /// stream wasmtime-wasi makes, behind one that charges each write.
    fn budgeted_output(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: Option<u64>,
    ) -> FsResult<Resource<DynOutputStream>> {
        let budgeted = self.budgeted_file(&fd)?;
        let stream = match offset {
            Some(o) => HostDescriptor::write_via_stream(&mut self.fs, fd, o)?,
            None => HostDescriptor::append_via_stream(&mut self.fs, fd)?,
        };
        let Some((budget, file)) = budgeted else {
            return Ok(stream);
        };
        let inner = self.fs.table.delete(stream)?;
        let hold = budget.hold(&file).map_err(|e| io(&e))?;
        let out: DynOutputStream = Box::new(BudgetedOutput {
            inner,
            position: offset,
            hold,
        });
        Ok(self.fs.table.push(out)?)
    }
}

/// After an operation that was charged for growing a file from `before`
/// to `charged_end`, gives back what it did not grow (it failed, or wrote
/// less) and frees what it shrank.
fn settle(budget: &DiskBudget, before: u64, charged_end: u64, after: u64) {
    let charged = charged_end - before;
    let grown = after.saturating_sub(before);
    if grown < charged {
        budget.credit(charged - grown, 0);
    }
    if after < before {
        budget.credit(before - after, 0);
    }
}

impl HostDirectoryEntryStream for BudgetedFs<'_> {
    async fn read_directory_entry(
        &mut self,
        stream: Resource<types::DirectoryEntryStream>,
    ) -> FsResult<Option<types::DirectoryEntry>> {
        HostDirectoryEntryStream::read_directory_entry(&mut self.fs, stream).await
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        HostDirectoryEntryStream::drop(&mut self.fs, stream)
    }
}

/// A read stream of a budgeted file: keeps the file counted while open.
struct HeldInput {
    inner: DynInputStream,
    _hold: Hold,
}

impl HeldInput {
    fn boxed(self) -> DynInputStream {
        Box::new(self)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for HeldInput {
    async fn ready(&mut self) {
        self.inner.ready().await;
    }
}

#[wasmtime_wasi::async_trait]
impl InputStream for HeldInput {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        self.inner.read(size)
    }

    async fn blocking_read(&mut self, size: usize) -> StreamResult<Bytes> {
        self.inner.blocking_read(size).await
    }

    fn skip(&mut self, nelem: usize) -> StreamResult<usize> {
        self.inner.skip(nelem)
    }

    async fn blocking_skip(&mut self, nelem: usize) -> StreamResult<usize> {
        self.inner.blocking_skip(nelem).await
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }
}

/// A write stream of a budgeted file: each write is charged for the bytes
/// it adds past the file's end before it is handed on.
struct BudgetedOutput {
    inner: DynOutputStream,
    /// Where the next write lands (`None`: appending, at the end).
    position: Option<u64>,
    hold: Hold,
}

impl BudgetedOutput {
    /// Charges a write of `len` bytes; returns the size before and the end
    /// it may reach.
    fn charge(&self, len: u64) -> StreamResult<(u64, u64)> {
        let before = self
            .hold
            .size()
            .map_err(|e| StreamError::LastOperationFailed(e.into()))?;
        let end = match self.position {
            Some(p) => p.saturating_add(len).max(before),
            None => before.saturating_add(len),
        };
        self.hold
            .budget
            .charge(end - before, 0)
            .map_err(|e| StreamError::LastOperationFailed(e.into()))?;
        Ok((before, end))
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for BudgetedOutput {
    async fn ready(&mut self) {
        self.inner.ready().await;
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for BudgetedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let len = bytes.len() as u64;
        let (before, end) = self.charge(len)?;
        match self.inner.write(bytes) {
            Ok(()) => {
                // The write completes in the background; what it was
                // charged stays charged (a failed one over-counts, never
                // under).
                if let Some(p) = &mut self.position {
                    *p = p.saturating_add(len);
                }
                Ok(())
            }
            Err(e) => {
                self.hold.budget.credit(end - before, 0);
                Err(e)
            }
        }
    }

    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        // Wait for an earlier background write first, so the size read
        // below includes it.
        self.inner.ready().await;
        let len = bytes.len() as u64;
        let (before, end) = self.charge(len)?;
        let r = self.inner.blocking_write_and_flush(bytes).await;
        let after = self.hold.size().unwrap_or(end);
        settle(&self.hold.budget, before, end, after.max(before));
        if r.is_ok()
            && let Some(p) = &mut self.position
        {
            *p = p.saturating_add(len);
        }
        r
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner.check_write()
    }

    fn write_zeroes(&mut self, nelem: usize) -> StreamResult<()> {
        let n = self.check_write()?;
        if nelem > n {
            return Err(StreamError::trap(
                "cannot write more zeroes than `check_write` allows",
            ));
        }
        self.write(Bytes::from(vec![0; nelem]))
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(bytes: u64, entries: u32) -> DiskLimit {
        DiskLimit {
            max_bytes: bytes,
            max_entries: entries,
        }
    }

    #[test]
    fn walk_counts_bytes_once_per_inode_and_never_follows_links() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::write(d.path().join("a"), vec![0u8; 1000]).expect("a");
        std::fs::create_dir(d.path().join("sub")).expect("sub");
        std::fs::write(d.path().join("sub/b"), vec![0u8; 24]).expect("b");
        std::fs::hard_link(d.path().join("a"), d.path().join("sub/a2")).expect("link");
        // A link out of the directory counts as a link, not as its target.
        std::os::unix::fs::symlink("/usr", d.path().join("usr")).expect("symlink");
        let b = DiskBudget::open("m", d.path(), "/data", limit(1 << 20, 100)).expect("open");
        assert_eq!(b.usage(), (1000 + 24 + "/usr".len() as u64, 5));
    }

    #[test]
    fn charge_refuses_past_either_limit_and_takes_nothing() {
        let d = tempfile::tempdir().expect("tmp");
        let b = DiskBudget::open("m", d.path(), "/data", limit(100, 2)).expect("open");
        b.charge(60, 1).expect("fits");
        let e = b.charge(41, 0).expect_err("over bytes");
        assert!(e.0.contains("max_disk") && e.0.contains("/data"), "{e}");
        b.charge(40, 1).expect("exactly full");
        let e = b.charge(0, 1).expect_err("over entries");
        assert!(e.0.contains("max_disk_entries"), "{e}");
        assert_eq!(b.usage(), (100, 2));
        b.credit(100, 2);
        assert_eq!(b.usage(), (0, 0));
    }

    /// A file unlinked while held stays counted until its last hold closes.
    #[test]
    fn unlinked_file_counts_until_closed() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("f");
        std::fs::write(&p, vec![0u8; 500]).expect("write");
        let b = Arc::new(DiskBudget::open("m", d.path(), "/data", limit(1000, 10)).expect("open"));
        let file = Arc::new(std::fs::File::open(&p).expect("open file"));
        let h1 = b.hold(&file).expect("hold");
        let h2 = b.hold(&file).expect("hold");
        let dir = std::fs::File::open(d.path()).expect("dir");
        let meta =
            cap_primitives::fs::stat(&dir, Path::new("f"), FollowSymlinks::No).expect("stat");
        std::fs::remove_file(&p).expect("unlink");
        b.unlinked(&meta);
        assert_eq!(b.usage(), (500, 0));
        drop(h1);
        assert_eq!(b.usage(), (500, 0));
        drop(h2);
        assert_eq!(b.usage(), (0, 0));
    }

    #[test]
    fn settle_gives_back_what_was_not_written() {
        let d = tempfile::tempdir().expect("tmp");
        let b = DiskBudget::open("m", d.path(), "/data", limit(1000, 10)).expect("open");
        b.charge(300, 0).expect("charge");
        // Charged 100 → 400, wrote only to 250.
        settle(&b, 100, 400, 250);
        assert_eq!(b.usage().0, 150);
        // A shrink frees.
        settle(&b, 150, 150, 50);
        assert_eq!(b.usage().0, 50);
    }
}
