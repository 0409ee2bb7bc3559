//! Module output for the daemon: each line a module writes is appended,
//! timestamped, to the module's bounded log file and (optionally) echoed on
//! the daemon's stdout or stderr behind the module's name, so the output of
//! many modules stays readable when interleaved.
//!
//! Lines are escaped first ([`super::escape`]): a module cannot forge log
//! lines or drive a terminal. Echo goes through a bounded queue to one
//! writer thread: when the daemon's stdout is a pipe nobody reads, lines
//! past the queue are held back (they are in the module's log), and when it
//! breaks (EPIPE) echo turns itself off with one log line. Neither reaches
//! the module, and no module waits on the operator's terminal.

use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

use super::escape::escape_bytes;
use super::logfile::{RotatingLog, now_rfc3339};

/// Batches of echoed lines waiting for the writer thread.
pub const ECHO_QUEUE: usize = 256;

/// The one thread that writes echoed lines to the daemon's stdout/stderr.
struct Echo {
    tx: SyncSender<(Target, Vec<u8>)>,
    off: Arc<AtomicBool>,
}

static ECHO: OnceLock<Option<Echo>> = OnceLock::new();

fn echo_writer() -> Option<&'static Echo> {
    ECHO.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Target, Vec<u8>)>(ECHO_QUEUE);
        let off = Arc::new(AtomicBool::new(false));
        let flag = off.clone();
        let spawned = std::thread::Builder::new()
            .name("edgeward-echo".into())
            .spawn(move || {
                for (target, bytes) in rx {
                    if flag.load(Ordering::Relaxed) {
                        continue;
                    }
                    let r = match target {
                        Target::Stdout => std::io::stdout().lock().write_all(&bytes),
                        Target::Stderr => std::io::stderr().lock().write_all(&bytes),
                    };
                    if let Err(e) = r {
                        flag.store(true, Ordering::Relaxed);
                        tracing::warn!(error = %e, "echo of module output turned off (the daemon's output is gone); each module's output is still in its log");
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Echo { tx, off }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the echo thread; module output goes to the module logs only");
                None
            }
        }
    })
    .as_ref()
}

/// Longest partial line kept while waiting for its newline; a longer one is
/// written out as it is, so a module cannot grow the daemon's memory by never
/// ending a line.
const MAX_PENDING: usize = 16 * 1024;
/// Lines per second a module may echo on the daemon's own stdout/stderr;
/// past that they only go to its log, and a note says how many were held back.
pub const ECHO_LINES_PER_SECOND: u32 = 200;

#[derive(Debug, Clone, Copy)]
enum Target {
    Stdout,
    Stderr,
}

/// A [`StdoutStream`] that prefixes every line with a module's name.
#[derive(Debug, Clone)]
pub struct LinePrefixed {
    inner: Arc<Mutex<Lines>>,
}

#[derive(Debug)]
struct Lines {
    prefix: Arc<str>,
    target: Target,
    echo: bool,
    log: Option<Arc<RotatingLog>>,
    meter: Option<Arc<super::meter::ModuleMeter>>,
    pending: Vec<u8>,
    window: Instant,
    echoed: u32,
    held_back: u64,
}

impl LinePrefixed {
    /// Lines to this process's stdout behind `prefix`.
    pub fn stdout(prefix: Arc<str>) -> Self {
        Self::new(prefix, Target::Stdout, true, None, None)
    }

    /// Lines to this process's stderr behind `prefix`.
    pub fn stderr(prefix: Arc<str>) -> Self {
        Self::new(prefix, Target::Stderr, true, None, None)
    }

    /// A module's stdout (`err == false`) or stderr: timestamped lines into
    /// `log`, echoed behind `prefix` when `echo` is set, counted by `meter`.
    pub fn module(
        prefix: Arc<str>,
        err: bool,
        echo: bool,
        log: Arc<RotatingLog>,
        meter: Arc<super::meter::ModuleMeter>,
    ) -> Self {
        let target = if err { Target::Stderr } else { Target::Stdout };
        Self::new(prefix, target, echo, Some(log), Some(meter))
    }

    fn new(
        prefix: Arc<str>,
        target: Target,
        echo: bool,
        log: Option<Arc<RotatingLog>>,
        meter: Option<Arc<super::meter::ModuleMeter>>,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Lines {
                prefix,
                target,
                echo,
                log,
                meter,
                pending: Vec::new(),
                window: Instant::now(),
                echoed: 0,
                held_back: 0,
            })),
        }
    }
}

impl Lines {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        let mut lines: Vec<Vec<u8>> = Vec::new();
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.pending);
            line.extend_from_slice(&buf[..nl]);
            lines.push(line);
            buf = &buf[nl + 1..];
        }
        let room = MAX_PENDING.saturating_sub(self.pending.len());
        self.pending.extend_from_slice(&buf[..buf.len().min(room)]);
        if self.pending.len() >= MAX_PENDING {
            lines.push(std::mem::take(&mut self.pending));
            // The rest of an endless line starts a new one.
            let rest = &buf[buf.len().min(room)..];
            if !rest.is_empty() {
                return self.flush_lines(lines).and_then(|()| self.write(rest));
            }
        }
        self.flush_lines(lines)
    }

    fn flush_lines(&mut self, lines: Vec<Vec<u8>>) -> std::io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        if let Some(m) = &self.meter {
            m.add_output(0, lines.len() as u64);
        }
        // Escaped once, for the log and the echo alike.
        let lines: Vec<_> = lines.iter().map(|l| escape_bytes(l)).collect();
        if let Some(log) = &self.log {
            let stamp = now_rfc3339();
            let stream = match self.target {
                Target::Stdout => "out",
                Target::Stderr => "err",
            };
            let mut out = Vec::new();
            for l in &lines {
                out.extend_from_slice(format!("{stamp} {stream} ").as_bytes());
                out.extend_from_slice(l);
                out.push(b'\n');
            }
            // A full disk must not take the module down with it.
            if let Err(e) = log.append(&out) {
                tracing::warn!(log = %log.path().display(), error = %e, "cannot write module log");
            }
        }
        if !self.echo {
            return Ok(());
        }
        let Some(echo) = echo_writer().filter(|e| !e.off.load(Ordering::Relaxed)) else {
            return Ok(());
        };
        let mut out = Vec::new();
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            if self.held_back > 0 {
                out.extend_from_slice(
                    format!(
                        "{} | [edgeward: {} lines not echoed (over {ECHO_LINES_PER_SECOND}/s); `edgeward logs {}` has them]\n",
                        self.prefix, self.held_back, self.prefix
                    )
                    .as_bytes(),
                );
                self.held_back = 0;
            }
            self.window = now;
            self.echoed = 0;
        }
        let mut batch = 0u64;
        for l in &lines {
            if self.echoed >= ECHO_LINES_PER_SECOND {
                self.held_back += 1;
                continue;
            }
            self.echoed += 1;
            batch += 1;
            out.extend_from_slice(self.prefix.as_bytes());
            out.extend_from_slice(b" | ");
            out.extend_from_slice(l);
            out.push(b'\n');
        }
        if out.is_empty() {
            return Ok(());
        }
        // Never block, never fail the module: a full queue holds the lines
        // back (they are in the log), a gone writer turns echo off.
        match echo.tx.try_send((self.target, out)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.held_back += batch,
            Err(TrySendError::Disconnected(_)) => echo.off.store(true, Ordering::Relaxed),
        }
        Ok(())
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let _ = self.write(b"\n");
        }
    }
}

impl IsTerminal for LinePrefixed {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LinePrefixed {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for LinePrefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = match self.inner.lock() {
            Ok(mut l) => {
                if let Some(m) = &l.meter {
                    m.add_output(buf.len() as u64, 0);
                }
                l.write(buf).map(|()| buf.len())
            }
            Err(_) => Err(std::io::Error::other("output lock poisoned")),
        };
        Poll::Ready(r)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
