//! The daemon's metrics in the Prometheus text exposition format (0.0.4),
//! served at `GET /v1/metrics` on the management socket (readers and
//! operators) and, when configured, on a loopback TCP listener
//! (`[metrics] listen`) for a local Prometheus.
//!
//! Per module (label `module`, a validated name): its state, starts, exits
//! by kind, CPU time, linear memory, handles, disk used, output, workload
//! calls by operation. Per daemon: the compile queue, the compiled-code
//! cache, the cloud link and its outbox, calls to the key daemon by
//! operation and result, integrity checks and failures, refused management
//! requests. Never a key, a token, a digest or a path: what a scrape shows
//! is counts and names.
//!
//! Written by hand: the format is a few lines of text, and a client
//! library would add a dependency to the trusted base for it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::registry::Registry;
use crate::runtime::meter::{self, EXIT_KINDS, ModuleMeter, WORKLOAD_CALLS};

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The daemon's own counters.
#[derive(Debug)]
pub struct DaemonCounters {
    /// Integrity checks of running modules (one per module per round).
    pub integrity_checks: AtomicU64,
    /// Modules stopped because their code no longer matched.
    pub integrity_failures: AtomicU64,
    /// 1 while the cloud link is connected to the broker.
    pub cloud_connected: AtomicU64,
    /// 1 when a cloud link is configured.
    pub cloud_configured: AtomicU64,
    /// Events waiting in the outbox for the broker.
    pub outbox_depth: AtomicU64,
    /// Management requests refused (no role, or a reader changing).
    pub management_refusals: AtomicU64,
}

/// This process's [`DaemonCounters`].
pub static DAEMON: DaemonCounters = DaemonCounters {
    integrity_checks: AtomicU64::new(0),
    integrity_failures: AtomicU64::new(0),
    cloud_connected: AtomicU64::new(0),
    cloud_configured: AtomicU64::new(0),
    outbox_depth: AtomicU64::new(0),
    management_refusals: AtomicU64::new(0),
};

static METERS: OnceLock<Mutex<HashMap<String, Arc<ModuleMeter>>>> = OnceLock::new();

/// The meters by module name. Held only to look up or copy out handles:
/// nothing is read or rendered under it.
fn meters() -> std::sync::MutexGuard<'static, HashMap<String, Arc<ModuleMeter>>> {
    METERS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Module `name`'s meter (made on first use; kept across its restarts and
/// updates, until it is removed).
pub fn meter(name: &str) -> Arc<ModuleMeter> {
    meters().entry(name.to_owned()).or_default().clone()
}

/// Module `name` was removed: its series go (an instance still ending
/// counts into its own meter, no longer listed; one added again under the
/// name starts from zero).
pub fn forget(name: &str) {
    meters().remove(name);
}

/// One metric family being written.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    fn new<'a>(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    /// A sample with `labels` (names are ours; values are escaped).
    fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label(self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines
/// escaped.
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Seconds as the text format writes a float.
fn secs(d: std::time::Duration) -> String {
    format!("{:.6}", d.as_secs_f64())
}

/// The registered modules, their states, and their meters.
struct ModuleRow {
    name: String,
    state: String,
    reading: meter::Reading,
}

/// Everything, rendered. `registry` lists the modules (a module that never
/// started reads `registered` and zeros).
///
/// # Errors
///
/// The registry cannot be read.
pub fn render(
    registry: &Registry,
    version: &str,
    uptime: std::time::Duration,
) -> Result<String, crate::registry::RegistryError> {
    let names = registry.module_names()?;
    Ok(render_named(names, version, uptime, |name| {
        super::records::status_of(registry, name).map(|s| crate::api::json_name(s.state))
    }))
}

/// [`render`] for the modules `names`, each one's state from `status`
/// (`None`: never started).
pub fn render_named(
    names: Vec<String>,
    version: &str,
    uptime: std::time::Duration,
    status: impl Fn(&str) -> Option<String>,
) -> String {
    let held: Vec<Option<Arc<ModuleMeter>>> = {
        let m = meters();
        names.iter().map(|n| m.get(n).cloned()).collect()
    };
    let rows: Vec<ModuleRow> = names
        .into_iter()
        .zip(held)
        .map(|(name, meter)| ModuleRow {
            state: status(&name).unwrap_or_else(|| "registered".into()),
            reading: meter.map(|m| m.read()).unwrap_or_default(),
            name,
        })
        .collect();
    let mut out = String::with_capacity(1024 + rows.len() * 900);
    write_daemon(&mut out, version, uptime, rows.len());
    write_modules(&mut out, &rows);
    out
}

fn write_daemon(out: &mut String, version: &str, uptime: std::time::Duration, modules: usize) {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let rt = &meter::RUNTIME;
    let d = &DAEMON;
    Family::new(
        out,
        "edgeward_build_info",
        "gauge",
        "The daemon's version (value 1).",
    )
    .sample(
        &[("version", version), ("wasmtime", crate::WASMTIME_VERSION)],
        1,
    );
    Family::new(
        out,
        "edgeward_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    )
    .sample(&[], secs(uptime));
    Family::new(out, "edgeward_modules", "gauge", "Registered modules.").sample(&[], modules);
    let families: [(&'static str, &str, &str, u64); 12] = [
        (
            "edgeward_compile_running",
            "gauge",
            "Compilations running now.",
            load(&rt.compiling),
        ),
        (
            "edgeward_compile_waiting",
            "gauge",
            "Loads waiting for a place in the compile queue.",
            load(&rt.compile_waiting),
        ),
        (
            "edgeward_cloud_configured",
            "gauge",
            "1 when a cloud link is configured.",
            load(&d.cloud_configured),
        ),
        (
            "edgeward_cloud_connected",
            "gauge",
            "1 while the cloud link is connected to its broker.",
            load(&d.cloud_connected),
        ),
        (
            "edgeward_outbox_events",
            "gauge",
            "Events kept for the broker, not yet delivered.",
            load(&d.outbox_depth),
        ),
        (
            "edgeward_compiles_total",
            "counter",
            "Compilations started.",
            load(&rt.compiles),
        ),
        (
            "edgeward_cache_hits_total",
            "counter",
            "Loads answered by the compiled-code cache.",
            load(&rt.cache_hits),
        ),
        (
            "edgeward_cache_misses_total",
            "counter",
            "Loads the compiled-code cache could not answer.",
            load(&rt.cache_misses),
        ),
        (
            "edgeward_cache_rejected_total",
            "counter",
            "Compiled-code cache entries refused (failed authentication).",
            load(&rt.cache_rejected),
        ),
        (
            "edgeward_integrity_checks_total",
            "counter",
            "Running modules re-measured by the integrity watchdog.",
            load(&d.integrity_checks),
        ),
        (
            "edgeward_integrity_failures_total",
            "counter",
            "Modules stopped because their code no longer matched its measurement.",
            load(&d.integrity_failures),
        ),
        (
            "edgeward_management_refusals_total",
            "counter",
            "Management requests refused.",
            load(&d.management_refusals),
        ),
    ];
    for (name, kind, help, v) in families {
        Family::new(out, name, kind, help).sample(&[], v);
    }
    let mut f = Family::new(
        out,
        "edgeward_keyd_calls_total",
        "counter",
        "Calls to the key daemon, by operation and result (ok, refused, unavailable, error).",
    );
    for (op, result, n) in edgeward_proto::call_counts() {
        f.sample(&[("operation", op), ("result", result)], n);
    }
}

fn write_modules(out: &mut String, rows: &[ModuleRow]) {
    let mut f = Family::new(
        out,
        "edgeward_module_state",
        "gauge",
        "1 for each module's current state.",
    );
    for r in rows {
        f.sample(&[("module", &r.name), ("state", &r.state)], 1);
    }
    let mut f = Family::new(
        out,
        "edgeward_module_starts_total",
        "counter",
        "Starts since the daemon started (or the module was added).",
    );
    for r in rows {
        f.sample(&[("module", &r.name)], r.reading.starts);
    }
    let mut f = Family::new(
        out,
        "edgeward_module_exits_total",
        "counter",
        "Exits by kind (success, failure, trap, timeout, setup-failed).",
    );
    for r in rows {
        for (kind, n) in EXIT_KINDS.iter().zip(r.reading.exits) {
            if n > 0 {
                f.sample(&[("module", &r.name), ("kind", kind)], n);
            }
        }
    }
    let mut f = Family::new(
        out,
        "edgeward_module_cpu_seconds_total",
        "counter",
        "CPU time its code and the host calls answered inline took on the daemon's threads (work handed to the blocking pool, such as file I/O, is not counted).",
    );
    for r in rows {
        f.sample(&[("module", &r.name)], secs(r.reading.cpu));
    }
    type Field = fn(&meter::Reading) -> u64;
    let plain: [(&'static str, &str, &str, Field); 5] = [
        (
            "edgeward_module_memory_bytes",
            "gauge",
            "Linear memory its running instance holds.",
            |r| r.memory,
        ),
        (
            "edgeward_module_handles",
            "gauge",
            "Handles its running instance held when last counted (each second it runs).",
            |r| r.handles,
        ),
        (
            "edgeward_module_disk_bytes",
            "gauge",
            "Bytes its budgeted directories hold.",
            |r| r.disk,
        ),
        (
            "edgeward_module_output_bytes_total",
            "counter",
            "Bytes it wrote to stdout and stderr.",
            |r| r.output_bytes,
        ),
        (
            "edgeward_module_output_lines_total",
            "counter",
            "Lines it wrote to stdout and stderr.",
            |r| r.output_lines,
        ),
    ];
    for (name, kind, help, get) in plain {
        let mut f = Family::new(out, name, kind, help);
        for r in rows {
            f.sample(&[("module", &r.name)], get(&r.reading));
        }
    }
    let mut f = Family::new(
        out,
        "edgeward_module_workload_calls_total",
        "counter",
        "Workload identity calls by operation.",
    );
    for r in rows {
        for (op, n) in WORKLOAD_CALLS.iter().zip(r.reading.calls) {
            if n > 0 {
                f.sample(&[("module", &r.name), ("operation", op)], n);
            }
        }
    }
}

/// Connections the loopback listener serves at once; one more is closed
/// unanswered (a scraper retries at its next interval).
pub const MAX_SCRAPERS: usize = 16;
/// How long a scraper has to send its request head: Prometheus sends it
/// at once, so a silent connection gives its place back quickly.
pub const HEAD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a scrape connection may take, request and answer.
pub const SCRAPE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Serves `GET /metrics` on `listener` (`[metrics] listen`, loopback) until
/// `stop` turns true: one request per connection, `Connection: close`; no
/// other path, no other method, no body read, and only for a `Host` that
/// names loopback (a web page that rebinds a name to 127.0.0.1 sends its
/// own name). Whoever can reach a loopback port can read the metrics: they
/// hold counts and module names only.
pub async fn serve_loopback(
    listener: tokio::net::TcpListener,
    state: Arc<crate::api::ApiState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::debug!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // Every place taken: this one is closed, the loop keeps accepting.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(SCRAPE_DEADLINE, answer(stream, state)).await;
        });
    }
}

/// Whether a `Host` header value names loopback: `localhost`, an address
/// in 127.0.0.0/8 or `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The request head's first line and its `Host` (if any).
fn parse_head(head: &[u8]) -> (&[u8], Option<String>) {
    let mut lines = head.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    let host = lines.find_map(|l| {
        let text = String::from_utf8_lossy(l);
        let (k, v) = text.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("host")
            .then(|| v.trim().to_owned())
    });
    (first, host)
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    state: Arc<crate::api::ApiState>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read_head = async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(false);
            }
            // Only the new bytes (and the three before them) can end it.
            let from = head.len().saturating_sub(3);
            head.extend_from_slice(&chunk[..n]);
            if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_REQUEST {
                return Ok(true);
            }
        }
    };
    match tokio::time::timeout(HEAD_DEADLINE, read_head).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) | Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
    }
    if head.len() > MAX_REQUEST {
        reply(
            &mut stream,
            "431 Request Header Fields Too Large",
            "request too large\n",
        )
        .await?;
        // Read (a bounded while) what is still coming, so that closing
        // with it unread does not reset the connection before the client
        // has read the answer.
        let drain = async {
            let mut left = 64 * 1024usize;
            while left > 0 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
        return Ok(());
    }
    let (line, host) = parse_head(&head);
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if host.as_deref().is_some_and(|h| !loopback_host(h)) {
        return reply(
            &mut stream,
            "421 Misdirected Request",
            "this port answers for loopback only\n",
        )
        .await;
    }
    if path != b"/metrics" {
        return reply(
            &mut stream,
            "404 Not Found",
            "only /metrics is served here\n",
        )
        .await;
    }
    if method != b"GET" {
        return reply(&mut stream, "405 Method Not Allowed", "only GET\n").await;
    }
    let Ok(body) = crate::api::metrics_text(state).await else {
        return reply(
            &mut stream,
            "500 Internal Server Error",
            "cannot render the metrics\n",
        )
        .await;
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {CONTENT_TYPE}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn reply(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    body: &str,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let text = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(text.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_answered() {
        for ok in [
            "127.0.0.1:9464",
            "127.1.2.3",
            "localhost:9464",
            "LOCALHOST",
            "[::1]:9464",
            "[::1]",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for no in [
            "attacker.example:9464",
            "10.0.0.1:9464",
            "[::ffff:7f00:1]:80",
            "localhost.attacker.example",
            "",
        ] {
            assert!(!loopback_host(no), "{no}");
        }
    }

    #[test]
    fn the_head_gives_its_line_and_host() {
        let (line, host) = parse_head(b"GET /metrics HTTP/1.1\r\nhOsT: 127.0.0.1:1\r\n\r\n");
        assert_eq!(line, b"GET /metrics HTTP/1.1");
        assert_eq!(host.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(parse_head(b"GET / HTTP/1.0\r\n\r\n").1, None);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = String::new();
        escape_label(&mut s, "a\"b\\c\nd");
        assert_eq!(s, r#"a\"b\\c\nd"#);
    }

    #[test]
    fn a_family_has_help_type_and_samples() {
        let mut s = String::new();
        let mut f = Family::new(&mut s, "x_total", "counter", "Xs.");
        f.sample(&[("module", "m1"), ("kind", "trap")], 3);
        f.sample(&[], 4);
        assert_eq!(
            s,
            "# HELP x_total Xs.\n# TYPE x_total counter\nx_total{module=\"m1\",kind=\"trap\"} 3\nx_total 4\n"
        );
    }
}
