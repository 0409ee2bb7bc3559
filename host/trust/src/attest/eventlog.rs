//! The measurement log: every event the daemon extends into the HSM's
//! measurement register, in the TCG Canonical Event Log JSON form, as
//! JSON-SEQ records (RFC 7464: `RS` before each record, `LF` after), the
//! way systemd's `tpm2-measure.log` is written:
//!
//! ```json
//! {"recnum":0,"pcr":13,"digests":[{"hashAlg":"sha256","digest":"<hex>"}],
//!  "content_type":"edgeward","content":{"kind":"executable",...}}
//! ```
//!
//! The digest extended is the SHA-256 of the RFC 8785 canonical `content`
//! ([`super::jcs`]), so a verifier recomputes it from the log alone. One
//! log per boot (`<state>/measurements/<boot id>.log`), continued across
//! daemon restarts within the boot, since a restart does not reset the
//! register. If the register is not at its reset value at the first event
//! of a boot, that value is recorded first, as a `baseline` record (its
//! digest is the value, not something extended), and replay starts there.
//!
//! The record is written before the register is extended: a crash in
//! between leaves a log one event ahead of the register, which a verifier
//! sees as a prefix of the log matching the register, never an extension
//! it cannot explain. It is not synced: a process crash keeps what was
//! written, and a power loss is a new boot, whose register starts from its
//! reset value and whose log is another file. Writers hold an exclusive lock on the log,
//! readers a shared one, so a reader always sees whole records.
//!
//! Who may reach it: the state directory's owner (0700; the log 0600). A
//! module never does. A hostile writer with those rights can rewrite the
//! log but not the register: replay against a quote exposes it.

use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::hsm::Hsm;

/// `content_type` of every record edgeward writes.
pub const CONTENT_TYPE: &str = "edgeward";
/// The record separator of JSON-SEQ.
const RS: u8 = 0x1e;

/// One digest of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogDigest {
    /// Always `sha256`.
    #[serde(rename = "hashAlg")]
    pub hash_alg: String,
    /// Lower-case hex.
    pub digest: String,
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// 0, 1, 2, ... within the boot.
    pub recnum: u64,
    /// The register (PCR index; the soft backend's register is 0).
    pub pcr: u32,
    /// The SHA-256 extended (for a `baseline`, the register's value).
    pub digests: Vec<LogDigest>,
    /// `edgeward`.
    pub content_type: String,
    /// What happened: `kind` and its fields.
    pub content: Value,
}

impl Record {
    /// The SHA-256 this record carries.
    ///
    /// # Errors
    ///
    /// None, or not 32 bytes of hex.
    pub fn sha256(&self) -> Result<[u8; 32], String> {
        let d = self
            .digests
            .iter()
            .find(|d| d.hash_alg == "sha256")
            .ok_or_else(|| format!("record {}: no sha256 digest", self.recnum))?;
        let bytes = hex_decode(&d.digest)
            .ok_or_else(|| format!("record {}: digest is not hex", self.recnum))?;
        bytes
            .try_into()
            .map_err(|_| format!("record {}: digest is not 32 bytes", self.recnum))
    }

    /// The record's `content.kind`.
    pub fn kind(&self) -> &str {
        self.content["kind"].as_str().unwrap_or("")
    }
}

/// What an event's content hashes to: SHA-256 of its canonical form.
///
/// # Errors
///
/// Content RFC 8785 cannot represent exactly (a fractional number).
pub fn content_digest(content: &Value) -> Result<[u8; 32], String> {
    Ok(Sha256::digest(super::jcs::canonical(content)?.as_bytes()).into())
}

/// The register value the records replay to: from the baseline (or zero),
/// each digest extended in order.
///
/// # Errors
///
/// A record without a usable digest, or whose digest is not its content's.
pub fn replay(records: &[Record]) -> Result<[u8; 32], String> {
    records
        .iter()
        .try_fold([0u8; 32], |value, r| replay_step(&value, r))
}

/// The register value after `r`, from `value` before it.
///
/// # Errors
///
/// See [`replay`].
pub fn replay_step(value: &[u8; 32], r: &Record) -> Result<[u8; 32], String> {
    let d = r.sha256()?;
    if r.kind() == "baseline" {
        if r.recnum != 0 {
            return Err(format!(
                "record {}: a baseline after the first record",
                r.recnum
            ));
        }
        return Ok(d);
    }
    if content_digest(&r.content)? != d {
        return Err(format!(
            "record {}: its digest is not the SHA-256 of its content",
            r.recnum
        ));
    }
    Ok(crate::hsm::extend_chain(value, &d))
}

/// The log of one boot.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    pcr: u32,
    /// Where this writer left the log: appends check it instead of reading
    /// the log again, so each costs the same however long the boot.
    tail: std::sync::Mutex<Option<Tail>>,
    /// How often an append had to find the end of the log again (the
    /// first append of this process, or after another process appended):
    /// by reading its last record.
    tail_reads: std::sync::atomic::AtomicU64,
    /// How often the last record would not do (torn, or not a record) and
    /// the whole log was read.
    full_reads: std::sync::atomic::AtomicU64,
}

/// The end of the log as this writer left it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tail {
    dev: u64,
    ino: u64,
    /// The file's length.
    len: u64,
    /// The next record number.
    next: u64,
    /// Where the last record starts, and the SHA-256 of its bytes (from
    /// its separator to the end of the file).
    last_start: u64,
    last_hash: [u8; 32],
}

impl EventLog {
    /// The log of boot `boot_id` under `state_dir`, for register `pcr`.
    pub fn new(state_dir: &Path, boot_id: &str, pcr: u32) -> Self {
        Self {
            path: state_dir
                .join("measurements")
                .join(format!("{boot_id}.log")),
            pcr,
            tail: std::sync::Mutex::new(None),
            tail_reads: std::sync::atomic::AtomicU64::new(0),
            full_reads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many appends had to read the whole log (see [`EventLog::measure_all`]).
    pub fn full_reads(&self) -> u64 {
        self.full_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many appends had to read the log's last record.
    pub fn tail_reads(&self) -> u64 {
        self.tail_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The next record number, without reading the log when it is still
    /// as this writer left it: same file, same length, and its last record
    /// the bytes this writer wrote (read back: a few hundred bytes).
    /// Otherwise (the first append of this process, or another writer
    /// appended) its last record says it; only a torn or implausible end
    /// makes it read and check the whole log.
    fn next_recnum(&self, file: &mut std::fs::File) -> Result<u64, String> {
        use std::os::unix::fs::{FileExt as _, MetadataExt as _};
        let meta = file.metadata().map_err(|e| e.to_string())?;
        let cached = self.tail.lock().ok().and_then(|t| t.clone());
        if let Some(t) = cached
            && t.dev == meta.dev()
            && t.ino == meta.ino()
            && t.len == meta.len()
        {
            let mut last = vec![0u8; usize::try_from(t.len - t.last_start).unwrap_or(0)];
            if file.read_exact_at(&mut last, t.last_start).is_ok()
                && <[u8; 32]>::from(Sha256::digest(&last)) == t.last_hash
            {
                return Ok(t.next);
            }
        }
        if meta.len() == 0 {
            return Ok(0);
        }
        // The end not known (this writer's first append: a restart of a
        // long-lived device's key daemon; or another writer's): the last
        // record says it, however long the log.
        self.tail_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A record is tens of bytes at least: a number past the length is
        // not one this log's writers gave (nor is another register's).
        if let Some(last) = last_record(file, meta.len())
            && last.pcr == self.pcr
            && last.recnum < meta.len()
        {
            return Ok(last.recnum + 1);
        }
        // A torn or foreign end: the whole log, which names what is wrong.
        self.full_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let existing = read_records(file)?;
        Ok(existing.last().map_or(0, |r| r.recnum + 1))
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the logs of other boots beside this one but the `keep`
    /// newest; returns how many went. One file per boot would otherwise
    /// pile up over a device's life.
    pub fn prune_other_boots(&self, keep: usize) -> usize {
        let Some(dir) = self.path.parent() else {
            return 0;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut others: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| *p != self.path && p.extension().is_some_and(|x| x == "log"))
            .filter_map(|p| {
                let t = std::fs::metadata(&p).and_then(|m| m.modified()).ok()?;
                Some((t, p))
            })
            .collect();
        others.sort();
        others.reverse();
        others
            .into_iter()
            .skip(keep)
            .filter(|(_, p)| std::fs::remove_file(p).is_ok())
            .count()
    }

    fn open(&self, write: bool) -> std::io::Result<std::fs::File> {
        if write {
            if let Some(dir) = self.path.parent() {
                crate::state::ensure_private_dir(dir).map_err(std::io::Error::other)?;
            }
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&self.path)
        } else {
            std::fs::File::open(&self.path)
        }
    }

    /// Measures `content`: appends its record, then extends the
    /// register with its digest. The first event of a boot whose register
    /// is not at zero records that value first. Blocks on the HSM.
    ///
    /// # Errors
    ///
    /// The log cannot be read or written, the HSM refuses, or the content
    /// cannot be canonicalized; the message names which.
    pub fn measure(&self, hsm: &dyn Hsm, content: Value) -> Result<Record, String> {
        let mut records = self.measure_all(hsm, vec![content])?;
        records.pop().ok_or_else(|| "nothing measured".to_owned())
    }

    /// [`EventLog::measure`] for several events in order: their records
    /// appended together, then the digests extended.
    ///
    /// # Errors
    ///
    /// See [`EventLog::measure`].
    pub fn measure_all(&self, hsm: &dyn Hsm, contents: Vec<Value>) -> Result<Vec<Record>, String> {
        let digests = contents
            .iter()
            .map(content_digest)
            .collect::<Result<Vec<_>, _>>()?;
        let shown = self.path.display().to_string();
        let mut file = self.open(true).map_err(|e| format!("{shown}: {e}"))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("{shown}: cannot lock: {e}"))?;
        let mut next = self
            .next_recnum(&mut file)
            .map_err(|e| format!("{shown}: {e}"))?;
        let mut out = Vec::new();
        let mut last_start = 0;
        if next == 0 {
            let value = hsm
                .read_register()
                .map_err(|e| format!("cannot read the measurement register: {e}"))?;
            if value != [0u8; 32] {
                push(
                    &mut out,
                    &self.record(next, value, serde_json::json!({"kind": "baseline"})),
                )?;
                next += 1;
            }
        }
        let mut records = Vec::with_capacity(contents.len());
        for (content, digest) in contents.into_iter().zip(&digests) {
            let record = self.record(next, *digest, content);
            last_start = out.len();
            push(&mut out, &record)?;
            records.push(record);
            next += 1;
        }
        // Written before the register is extended, not synced: a process
        // crash keeps what was written (the page cache is the kernel's),
        // and a power loss is a new boot, whose PCR (or soft register)
        // starts from its reset value and whose log is another file.
        let end = file
            .seek(SeekFrom::End(0))
            .and_then(|end| file.write_all(&out).map(|()| end))
            .map_err(|e| {
                // Where the log ends is unknown now: read it next time.
                if let Ok(mut t) = self.tail.lock() {
                    *t = None;
                }
                format!("{shown}: cannot append: {e}")
            })?;
        {
            use std::os::unix::fs::MetadataExt as _;
            let meta = file.metadata().map_err(|e| format!("{shown}: {e}"))?;
            let last = &out[last_start..];
            if let Ok(mut t) = self.tail.lock() {
                *t = (!out.is_empty()).then(|| Tail {
                    dev: meta.dev(),
                    ino: meta.ino(),
                    len: end + out.len() as u64,
                    next,
                    last_start: end + last_start as u64,
                    last_hash: Sha256::digest(last).into(),
                });
            }
        }
        hsm.extend_all(&digests)
            .map_err(|e| format!("cannot extend the measurement register: {e}"))?;
        Ok(records)
    }

    fn record(&self, recnum: u64, digest: [u8; 32], content: Value) -> Record {
        Record {
            recnum,
            pcr: self.pcr,
            digests: vec![LogDigest {
                hash_alg: "sha256".into(),
                digest: crate::measure::hex(&digest),
            }],
            content_type: CONTENT_TYPE.into(),
            content,
        }
    }

    /// Every record, under a shared lock (whole records only). No log yet:
    /// none.
    ///
    /// # Errors
    ///
    /// The log cannot be read, or a record is malformed (named).
    pub fn read(&self) -> Result<Vec<Record>, String> {
        let shown = self.path.display().to_string();
        let mut file = match self.open(false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{shown}: {e}")),
        };
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockShared)
            .map_err(|e| format!("{shown}: cannot lock: {e}"))?;
        read_records(&mut file).map_err(|e| format!("{shown}: {e}"))
    }
}

impl EventLog {
    /// The register this log is for.
    pub fn pcr(&self) -> u32 {
        self.pcr
    }

    /// Runs `f` with the log's bytes (empty if there is no log yet) while
    /// holding the shared lock: no event is appended or extended
    /// meanwhile, so a quote taken in `f` matches the bytes (unless a
    /// writer crashed between appending and extending, which leaves the
    /// log ahead of the register).
    ///
    /// # Errors
    ///
    /// The log cannot be read.
    pub fn with_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
        use std::io::Read as _;
        let shown = self.path.display().to_string();
        let mut file = match self.open(false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(f(&[])),
            Err(e) => return Err(format!("{shown}: {e}")),
        };
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockShared)
            .map_err(|e| format!("{shown}: cannot lock: {e}"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("{shown}: {e}"))?;
        Ok(f(&bytes))
    }
}

fn push(out: &mut Vec<u8>, r: &Record) -> Result<(), String> {
    out.push(RS);
    out.extend_from_slice(&serde_json::to_vec(r).map_err(|e| e.to_string())?);
    out.push(b'\n');
    Ok(())
}

/// The last of the `len` bytes of `file`'s records, read backwards from
/// its end to its separator (a record holds no raw RS: JSON escapes control
/// characters), each piece searched once; `None` if it is torn (no final
/// LF), does not parse, or is longer than a key daemon frame could make one.
fn last_record(file: &std::fs::File, len: u64) -> Option<Record> {
    use std::os::unix::fs::FileExt as _;
    const CHUNK: u64 = 64 * 1024;
    const MOST: u64 = 4 * 1024 * 1024 + CHUNK;
    // The pieces read, last first.
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    let mut from = len;
    while from > 0 && len - from < MOST {
        let start = from.saturating_sub(CHUNK);
        let mut piece = vec![0u8; usize::try_from(from - start).ok()?];
        file.read_exact_at(&mut piece, start).ok()?;
        from = start;
        if let Some(at) = piece.iter().rposition(|&b| b == RS) {
            let mut record = piece.split_off(at + 1);
            for later in pieces.iter().rev() {
                record.extend_from_slice(later);
            }
            if record.last() != Some(&b'\n') {
                return None;
            }
            return serde_json::from_slice(&record).ok();
        }
        pieces.push(piece);
    }
    None
}

/// Parses a JSON-SEQ log: records in order, numbered from 0 without gaps.
fn read_records(file: &mut std::fs::File) -> Result<Vec<Record>, String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    parse(&bytes)
}

/// Parses JSON-SEQ bytes into records, numbered from 0 without gaps.
///
/// # Errors
///
/// A malformed record, or a gap in the numbering (named).
pub fn parse(bytes: &[u8]) -> Result<Vec<Record>, String> {
    parse_from(bytes, 0)
}

/// The bytes of the log from record `from` on (incremental evidence):
/// `None` if it has fewer records than that.
pub fn tail_from(bytes: &[u8], from: u64) -> Option<&[u8]> {
    if from == 0 {
        return Some(bytes);
    }
    let mut seen = 0u64;
    for (i, b) in bytes.iter().enumerate() {
        if *b == RS {
            if seen == from {
                return Some(&bytes[i..]);
            }
            seen += 1;
        }
    }
    (seen == from).then_some(&bytes[bytes.len()..])
}

/// [`parse`] for a log's tail whose first record is numbered `start`.
///
/// # Errors
///
/// As [`parse`].
pub fn parse_from(bytes: &[u8], start: u64) -> Result<Vec<Record>, String> {
    let mut out: Vec<Record> = Vec::new();
    for (i, chunk) in bytes.split(|&b| b == RS).enumerate() {
        if i == 0 {
            if chunk.iter().any(|b| !b.is_ascii_whitespace()) {
                return Err("does not start with a record separator".into());
            }
            continue;
        }
        let at = start + out.len() as u64;
        let r: Record = serde_json::from_slice(chunk).map_err(|e| format!("record {at}: {e}"))?;
        if r.recnum != at {
            return Err(format!(
                "record {at} is numbered {}: records are missing, added or out of order",
                r.recnum
            ));
        }
        out.push(r);
    }
    Ok(out)
}

pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Logs of older boots do not pile up: all but the newest other one go.
    #[test]
    fn older_boots_logs_are_pruned() {
        let d = tempfile::tempdir().unwrap();
        let hsm = crate::hsm::soft::SoftHsm::open(d.path()).unwrap();
        let base = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for i in 0..4u64 {
            let log = EventLog::new(d.path(), &format!("boot-{i}"), 0);
            log.measure(&hsm, json!({"kind": "executable"})).unwrap();
            std::fs::File::options()
                .write(true)
                .open(log.path())
                .unwrap()
                .set_modified(base + std::time::Duration::from_secs(i * 60))
                .unwrap();
        }
        let now = EventLog::new(d.path(), "boot-9", 0);
        now.measure(&hsm, json!({"kind": "executable"})).unwrap();
        assert_eq!(now.prune_other_boots(1), 3);
        let mut left: Vec<String> = std::fs::read_dir(d.path().join("measurements"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["boot-3.log", "boot-9.log"]);
    }

    /// Appends cost the same however long the log: a writer never reads
    /// the whole log, only its last record when it does not know the end
    /// (its first append, as after a restart; another writer's appends; a
    /// log changed under it), and the numbering stays right. Only a torn
    /// end makes it read everything, which names what is wrong.
    #[test]
    fn appends_do_not_read_the_log_again() {
        let d = tempfile::tempdir().unwrap();
        let hsm = crate::hsm::soft::SoftHsm::open(d.path()).unwrap();
        let log = EventLog::new(d.path(), "boot-1", 0);
        for i in 0..2000 {
            log.measure(&hsm, json!({"kind": "module", "name": format!("m{i}")}))
                .unwrap();
        }
        // An empty log is not read at all.
        assert_eq!((log.tail_reads(), log.full_reads()), (0, 0));
        let records = log.read().unwrap();
        assert_eq!(records.len(), 2000);
        assert_eq!(replay(&records).unwrap(), hsm.read_register().unwrap());

        // A second writer (another process, or this one restarted)
        // appends in between: its last record, not the log.
        let other = EventLog::new(d.path(), "boot-1", 0);
        other.measure(&hsm, json!({"kind": "x"})).unwrap();
        assert_eq!((other.tail_reads(), other.full_reads()), (1, 0));
        log.measure(&hsm, json!({"kind": "y"})).unwrap();
        assert_eq!((log.tail_reads(), log.full_reads()), (1, 0));
        let records = log.read().unwrap();
        assert_eq!(records.len(), 2002);
        assert_eq!(records[2001].kind(), "y");
        assert_eq!(replay(&records).unwrap(), hsm.read_register().unwrap());

        // The last record rewritten in place (same length): noticed.
        let mut bytes = std::fs::read(log.path()).unwrap();
        let at = bytes.len() - 5;
        bytes[at] = if bytes[at] == b'a' { b'b' } else { b'a' };
        std::fs::write(log.path(), &bytes).unwrap();
        // (Still a record: the append goes on, numbered after it.)
        log.measure(&hsm, json!({"kind": "z"})).unwrap();
        assert_eq!((log.tail_reads(), log.full_reads()), (2, 0));
        assert_eq!(log.read().unwrap()[2002].kind(), "z");

        // A last record numbered past what the log could hold (a writer
        // of the log, not of edgeward's): the whole log is read, and the
        // append refused naming the gap.
        let mut bytes = std::fs::read(log.path()).unwrap();
        let last = bytes[..bytes.len() - 1]
            .iter()
            .rposition(|&b| b == RS)
            .unwrap();
        let mut forged: Record = serde_json::from_slice(&bytes[last + 1..]).unwrap();
        forged.recnum = u64::MAX;
        bytes.truncate(last);
        push(&mut bytes, &forged).unwrap();
        std::fs::write(log.path(), &bytes).unwrap();
        let e = log.measure(&hsm, json!({"kind": "v"})).unwrap_err();
        assert!(e.contains("numbered 18446744073709551615"), "{e}");
        assert_eq!((log.tail_reads(), log.full_reads()), (3, 1));
        bytes.truncate(last);
        let mut put_back = forged;
        put_back.recnum = 2002;
        push(&mut bytes, &put_back).unwrap();
        std::fs::write(log.path(), &bytes).unwrap();

        // A torn end (a partial record, as no writer of edgeward leaves
        // one): the whole log is read, and the append refused naming it.
        let mut torn = std::fs::read(log.path()).unwrap();
        torn.extend_from_slice(b"\x1e{\"recnum\":2003,\"pc");
        std::fs::write(log.path(), &torn).unwrap();
        let e = log.measure(&hsm, json!({"kind": "w"})).unwrap_err();
        assert!(e.contains("record 2003"), "{e}");
        assert_eq!((log.tail_reads(), log.full_reads()), (4, 2));
    }

    #[test]
    fn measured_events_replay_to_the_register() {
        let d = tempfile::tempdir().unwrap();
        let hsm = crate::hsm::soft::SoftHsm::open(d.path()).unwrap();
        let log = EventLog::new(d.path(), "boot-1", 0);
        log.measure(&hsm, json!({"kind": "executable", "sha256": "ab"}))
            .unwrap();
        log.measure(&hsm, json!({"kind": "module", "name": "m", "digest": "x"}))
            .unwrap();
        let records = log.read().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(replay(&records).unwrap(), hsm.read_register().unwrap());
        // The file is JSON-SEQ.
        let bytes = std::fs::read(log.path()).unwrap();
        assert_eq!(bytes[0], RS);
        assert_eq!(bytes.iter().filter(|&&b| b == RS).count(), 2);

        // A new boot's log over a register already in use starts with a
        // baseline, and still replays.
        let next = EventLog::new(d.path(), "boot-2", 0);
        next.measure(&hsm, json!({"kind": "executable", "sha256": "cd"}))
            .unwrap();
        let records = next.read().unwrap();
        assert_eq!(records[0].kind(), "baseline");
        assert_eq!(replay(&records).unwrap(), hsm.read_register().unwrap());

        // Edited, removed or reordered records do not replay (or parse).
        let mut edited = records.clone();
        edited[1].content["sha256"] = json!("ce");
        assert!(replay(&edited).unwrap_err().contains("not the SHA-256"));
        let text = String::from_utf8(std::fs::read(log.path()).unwrap()).unwrap();
        let recs: Vec<&str> = text.split('\u{1e}').filter(|r| !r.is_empty()).collect();
        let swapped = format!("\u{1e}{}\u{1e}{}", recs[1], recs[0]);
        assert!(
            parse(swapped.as_bytes())
                .unwrap_err()
                .contains("out of order")
        );
        let dropped = format!("\u{1e}{}", recs[1]);
        assert!(parse(dropped.as_bytes()).is_err());
    }
}
