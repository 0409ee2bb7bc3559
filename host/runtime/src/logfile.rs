//! Bounded, rotated log files: a module that prints without end can neither
//! grow the daemon's memory nor fill the disk. At most `max_bytes` live in
//! the current file and `keep` rotated files beside it (`NAME.1` newest).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Default size of one log file (1 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: u32 = 2;

#[derive(Debug)]
struct Current {
    file: File,
    size: u64,
}

/// An append-only log file with size-based rotation.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    current: Mutex<Option<Current>>,
}

fn open_append(path: &Path) -> io::Result<Current> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok(Current { file, size })
}

impl RotatingLog {
    /// A log at `path` (created on first write).
    pub fn new(path: PathBuf, max_bytes: u64, keep: u32) -> Self {
        Self {
            path,
            max_bytes: max_bytes.max(1024),
            keep,
            current: Mutex::new(None),
        }
    }

    /// The current file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files of this log, oldest first, that exist.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = (1..=self.keep).rev().map(|i| self.rotated(i)).collect();
        out.push(self.path.clone());
        out.retain(|p| p.exists());
        out
    }

    /// Everything the log holds, oldest first (a file that cannot be read
    /// is left out). Blocks on the disk.
    pub fn read_all(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for f in self.files() {
            if let Ok(bytes) = std::fs::read(&f) {
                all.extend_from_slice(&bytes);
            }
        }
        all
    }

    fn rotated(&self, i: u32) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{i}"));
        self.path.with_file_name(name)
    }

    fn rotate(&self) -> io::Result<()> {
        if self.keep == 0 {
            return std::fs::remove_file(&self.path).or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            });
        }
        for i in (1..self.keep).rev() {
            let from = self.rotated(i);
            if from.exists() {
                std::fs::rename(&from, self.rotated(i + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))
    }

    /// Appends `bytes` (whole lines), rotating first if they would not fit.
    ///
    /// # Errors
    ///
    /// I/O errors from the file system.
    pub fn append(&self, bytes: &[u8]) -> io::Result<()> {
        let mut guard = self
            .current
            .lock()
            .map_err(|_| io::Error::other("log lock poisoned"))?;
        if guard.is_none() {
            *guard = Some(open_append(&self.path)?);
        }
        let needs_rotation = guard
            .as_ref()
            .is_some_and(|c| c.size > 0 && c.size + bytes.len() as u64 > self.max_bytes);
        if needs_rotation {
            *guard = None;
            self.rotate()?;
            *guard = Some(open_append(&self.path)?);
        }
        let cur = guard
            .as_mut()
            .ok_or_else(|| io::Error::other("log not open"))?;
        // A single oversized write is cut to the file size limit.
        let take = bytes
            .len()
            .min(usize::try_from(self.max_bytes).unwrap_or(usize::MAX));
        cur.file.write_all(&bytes[..take])?;
        cur.size += take as u64;
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a time since the Unix epoch.
pub fn rfc3339(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// The current time as [`rfc3339`].
pub fn now_rfc3339() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Duration::from_millis(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(1_795_996_799)),
            "2026-11-29T23:59:59.000Z"
        );
    }

    #[test]
    fn rotation_bounds_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = RotatingLog::new(dir.path().join("out.log"), 1024, 2);
        let line = [b'x'; 99]
            .iter()
            .copied()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        for _ in 0..1000 {
            log.append(&line).expect("append");
        }
        let files = log.files();
        assert_eq!(files.len(), 3, "{files:?}");
        let total: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).expect("meta").len())
            .sum();
        assert!(total <= 3 * 1024, "{total}");
        assert!(files[0].ends_with("out.log.2") && files[2].ends_with("out.log"));
        log.append(&vec![b'y'; 10_000]).expect("oversized write");
        assert!(std::fs::metadata(log.path()).expect("meta").len() <= 1024);
    }
}
