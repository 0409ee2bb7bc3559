//! Measurement: the SHA-256 digest of exactly the bytes that will run.
//!
//! A component file is read once into memory ([`Measured`]); the digest is
//! taken over that buffer and the same buffer is later compiled, so nothing
//! can change the file between measuring and compiling.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// Largest component file edgeward will read (256 MiB). Guards against
/// pointing the daemon at a device file or a runaway download.
pub const MAX_COMPONENT_SIZE: u64 = 256 << 20;

/// A SHA-256 digest, written `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The SHA-256 of the file at `path`, read in 1 MiB pieces (the
    /// watchdog's re-measurement: nothing is kept).
    ///
    /// # Errors
    ///
    /// The file cannot be read.
    pub fn of_file(path: &Path) -> std::io::Result<Self> {
        Self::of_reader(std::fs::File::open(path)?)
    }

    /// The SHA-256 of everything `r` yields, read in 64 KiB pieces (they
    /// stay in the core's cache, and a hash never raises the process's peak
    /// memory by more).
    ///
    /// # Errors
    ///
    /// A read fails.
    pub fn of_reader(mut r: impl Read) -> std::io::Result<Self> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Self(hasher.finalize().into()))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex characters, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a digest string was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {input:?}: {reason}")]
pub struct DigestParseError {
    input: String,
    reason: &'static str,
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| DigestParseError {
            input: s.chars().take(80).collect(),
            reason,
        };
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| err("expected \"sha256:\" followed by 64 lowercase hex digits"))?;
        if hex.len() != 64 {
            return Err(err("expected exactly 64 hex digits after \"sha256:\""));
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
            let hi = nibble(pair[0])
                .ok_or_else(|| err("only lowercase hex digits 0-9a-f are allowed"))?;
            let lo = nibble(pair[1])
                .ok_or_else(|| err("only lowercase hex digits 0-9a-f are allowed"))?;
            out[i] = hi << 4 | lo;
        }
        Ok(Self(out))
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Why a component was not measured, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The file could not be opened or read.
    #[error("cannot read component {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The path is not a regular file.
    #[error("cannot read component {path}: not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file is larger than [`MAX_COMPONENT_SIZE`].
    #[error("component {path} is larger than the {max} MiB limit", max = MAX_COMPONENT_SIZE >> 20)]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The measured digest differs from the pinned one.
    #[error(
        "refusing {path}: measured digest {actual} does not match the pinned digest {expected}"
    )]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The pinned digest.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
}

/// A component's bytes, read once, and their digest.
pub struct Measured {
    /// Where the bytes came from (for messages only: never read again).
    pub path: PathBuf,
    /// The bytes that were measured and will be compiled.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`.
    pub digest: Digest,
}

impl fmt::Debug for Measured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Measured")
            .field("path", &self.path)
            .field("len", &self.bytes.len())
            .field("digest", &self.digest)
            .finish()
    }
}

impl Measured {
    /// Reads `path` once and measures it.
    ///
    /// # Errors
    ///
    /// [`MeasureError::Read`], [`MeasureError::NotAFile`] or
    /// [`MeasureError::TooLarge`].
    pub fn read(path: &Path) -> Result<Self, MeasureError> {
        let read_err = |error| MeasureError::Read {
            path: path.to_owned(),
            error,
        };
        // Non-blocking, so a FIFO cannot hold the open; the checks below
        // are on the handle, so what is read is what was checked.
        let file = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                .open(path)
                .map_err(read_err)?
        };
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(MeasureError::NotAFile {
                path: path.to_owned(),
            });
        }
        if meta.len() > MAX_COMPONENT_SIZE {
            return Err(MeasureError::TooLarge {
                path: path.to_owned(),
            });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        // `take` bounds the read even if the file grows while we read it.
        file.take(MAX_COMPONENT_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_COMPONENT_SIZE {
            return Err(MeasureError::TooLarge {
                path: path.to_owned(),
            });
        }
        let digest = Digest::of(&bytes);
        Ok(Self {
            path: path.to_owned(),
            bytes,
            digest,
        })
    }

    /// Checks the measurement against a pinned digest.
    ///
    /// # Errors
    ///
    /// [`MeasureError::Mismatch`] naming both digests.
    pub fn verify(&self, pinned: Option<&Digest>) -> Result<(), MeasureError> {
        match pinned {
            Some(expected) if *expected != self.digest => Err(MeasureError::Mismatch {
                path: self.path.clone(),
                expected: *expected,
                actual: self.digest,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read_and_a_fifo_does_not_hold_the_open() {
        let not_a_file = |p: &Path| match Measured::read(p) {
            Err(e @ MeasureError::NotAFile { .. }) => {
                assert!(e.to_string().contains("not a regular file"), "{e}");
            }
            other => panic!("{}: {other:?}", p.display()),
        };
        not_a_file(Path::new("/dev/zero"));
        not_a_file(Path::new("/"));
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        not_a_file(&fifo);
        assert!(matches!(
            Measured::read(Path::new("/nonexistent/x.wasm")),
            Err(MeasureError::Read { .. })
        ));
        let f = dir.path().join("c.wasm");
        std::fs::write(&f, b"\0asm").unwrap();
        let m = Measured::read(&f).unwrap();
        assert_eq!(m.bytes, b"\0asm");
        assert_eq!(m.digest, Digest::of(b"\0asm"));
    }

    #[test]
    fn a_file_measured_in_pieces_hashes_as_its_bytes() {
        let d = tempfile::tempdir().unwrap();
        for len in [
            0usize,
            1,
            (64 << 10) - 1,
            64 << 10,
            (64 << 10) + 1,
            1 << 20,
            (3 << 20) + 7,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let path = d.path().join(format!("f{len}"));
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(Digest::of_file(&path).unwrap(), Digest::of(&bytes), "{len}");
        }
        assert!(Digest::of_file(&d.path().join("missing")).is_err());
    }

    #[test]
    fn digest_round_trip() {
        let d = Digest::of(b"abc");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(s.parse::<Digest>(), Ok(d));
    }

    #[test]
    fn digest_rejects_malformed() {
        let good = Digest::of(b"abc").hex();
        assert!(good.parse::<Digest>().is_err(), "prefix required");
        assert!(
            format!("sha256:{}", good.to_uppercase())
                .parse::<Digest>()
                .is_err()
        );
        assert!(format!("sha256:{}", &good[..62]).parse::<Digest>().is_err());
        assert!(format!("sha256:{good}00").parse::<Digest>().is_err());
        assert!(format!("sha512:{good}").parse::<Digest>().is_err());
        let e = "sha256:zz".parse::<Digest>().unwrap_err().to_string();
        assert!(e.contains("sha256:zz"), "{e}");
    }

    #[test]
    fn verify_names_both_digests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.wasm");
        std::fs::write(&path, b"component bytes").expect("write");
        let m = Measured::read(&path).expect("measure");
        assert_eq!(m.digest, Digest::of(b"component bytes"));
        m.verify(Some(&m.digest)).expect("same digest passes");
        let other = Digest::of(b"other");
        let e = m.verify(Some(&other)).unwrap_err().to_string();
        assert!(
            e.contains(&other.to_string()) && e.contains(&m.digest.to_string()),
            "{e}"
        );
    }

    #[test]
    fn read_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Measured::read(&dir.path().join("missing.wasm")).unwrap_err();
        assert!(e.to_string().contains("missing.wasm"), "{e}");
        let e = Measured::read(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
