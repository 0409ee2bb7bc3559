//! Module output for the daemon: each line a module writes appears on the
//! daemon's stdout (or stderr) behind the module's name, so the output of
//! many modules stays readable when interleaved.

use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Longest partial line kept while waiting for its newline; a longer one is
/// written out as it is, so a module cannot grow the daemon's memory by never
/// ending a line.
const MAX_PENDING: usize = 16 * 1024;

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
    pending: Vec<u8>,
}

impl LinePrefixed {
    /// Lines to this process's stdout behind `prefix`.
    pub fn stdout(prefix: Arc<str>) -> Self {
        Self::new(prefix, Target::Stdout)
    }

    /// Lines to this process's stderr behind `prefix`.
    pub fn stderr(prefix: Arc<str>) -> Self {
        Self::new(prefix, Target::Stderr)
    }

    fn new(prefix: Arc<str>, target: Target) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Lines {
                prefix,
                target,
                pending: Vec::new(),
            })),
        }
    }
}

impl Lines {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        let mut out: Vec<u8> = Vec::new();
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            self.emit(&mut out, &buf[..nl]);
            buf = &buf[nl + 1..];
        }
        self.pending.extend_from_slice(buf);
        if self.pending.len() >= MAX_PENDING {
            let pending = std::mem::take(&mut self.pending);
            self.emit(&mut out, &pending);
        }
        if out.is_empty() {
            return Ok(());
        }
        match self.target {
            Target::Stdout => std::io::stdout().lock().write_all(&out),
            Target::Stderr => std::io::stderr().lock().write_all(&out),
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, tail: &[u8]) {
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(b" | ");
        out.extend_from_slice(&self.pending);
        out.extend_from_slice(tail);
        out.push(b'\n');
        self.pending.clear();
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
            Ok(mut l) => l.write(buf).map(|()| buf.len()),
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
