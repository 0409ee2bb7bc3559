//! Logs under journald. A service's standard error is a journal stream
//! when `JOURNAL_STREAM` names its device and inode (`systemd.exec(5)`).
//! Then each event goes to the journal's native socket as one datagram of
//! fields (`systemd-journald.service(8)`, "native protocol"): `PRIORITY`,
//! `SYSLOG_IDENTIFIER`, `MESSAGE` (the line as a terminal shows it, without
//! a timestamp: the journal has one), `EVENT` (the message alone), `TARGET`,
//! and each of the event's fields by its upper-cased name (`MODULE`,
//! `DIGEST`, `ERROR`, ...), so `journalctl MODULE=sensor` finds a module's
//! events. Without the native socket (or when a datagram cannot be sent)
//! the line goes to standard error with its syslog priority in front
//! (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), which journald
//! strips and records.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Whether standard error is the journal stream `JOURNAL_STREAM` names
/// (not merely inherited by a process whose stderr went elsewhere).
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    named(&v, st.st_dev, st.st_ino)
}

/// Whether `value` (`DEVICE:INODE`) names `dev` and `ino`.
fn named(value: &str, dev: u64, ino: u64) -> bool {
    let mut it = value.trim().splitn(2, ':');
    let parse = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok());
    parse(it.next()) == Some(dev) && parse(it.next()) == Some(ino)
}

/// The syslog priority of a `tracing` level.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// An event format that puts the syslog priority before what `F` writes.
#[derive(Debug, Clone, Copy)]
pub struct Prioritized<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The journal's native socket.
pub const SOCKET: &str = "/run/systemd/journal/socket";
/// Names another native socket (a container's journal; the tests).
pub const SOCKET_ENV: &str = "EDGEWARD_JOURNAL_SOCKET";

/// Set to `1` by a process whose standard error is the journal for a
/// helper it starts with a pipe as standard error (a private key daemon,
/// whose start-up errors the parent reads): the helper's events go to the
/// journal as fields all the same.
pub const NATIVE_ENV: &str = "EDGEWARD_JOURNAL_NATIVE";

/// The journal's native socket, connected, when standard error is the
/// journal stream (or [`NATIVE_ENV`] says the parent's is) and the socket
/// answers. Connected before the process confines itself (sending on it
/// needs no path afterwards).
pub fn native(identifier: &'static str) -> Option<Native> {
    if !stderr_is_journal() && std::env::var_os(NATIVE_ENV).is_none_or(|v| v != "1") {
        return None;
    }
    let path = std::env::var_os(SOCKET_ENV)
        .filter(|p| !p.is_empty())
        .map_or_else(|| std::path::PathBuf::from(SOCKET), Into::into);
    // Another socket only if root or this user made it: a process started
    // with someone else's environment does not send them its events.
    if path != std::path::Path::new(SOCKET) {
        use std::os::unix::fs::MetadataExt as _;
        let owner = std::fs::symlink_metadata(&path).ok()?.uid();
        if owner != 0 && owner != rustix::process::geteuid().as_raw() {
            return None;
        }
    }
    let sock = std::os::unix::net::UnixDatagram::unbound().ok()?;
    sock.connect(&path).ok()?;
    Some(Native { sock, identifier })
}

/// Sends each event to the journal as fields ([`native`]).
#[derive(Debug)]
pub struct Native {
    sock: std::os::unix::net::UnixDatagram,
    identifier: &'static str,
}

/// Journal fields an event's own fields may not set (the journal's or
/// systemd's meaning): such a field is sent as `EDGEWARD_<NAME>`.
const RESERVED: [&str; 15] = [
    "DOCUMENTATION",
    "TID",
    "USER_INVOCATION_ID",
    "MESSAGE",
    "MESSAGE_ID",
    "PRIORITY",
    "SYSLOG_IDENTIFIER",
    "SYSLOG_FACILITY",
    "SYSLOG_PID",
    "EVENT",
    "TARGET",
    "UNIT",
    "USER_UNIT",
    "INVOCATION_ID",
    "ERRNO",
];

/// Prefixes of fields the journal gives a meaning (`OBJECT_*` from a
/// root sender names another process).
const RESERVED_PREFIXES: [&str; 4] = ["CODE_", "SYSLOG_", "OBJECT_", "COREDUMP_"];

/// A journal field name for a `tracing` field: upper case, `[A-Z0-9_]`,
/// not starting with `_` or a digit, at most 64 bytes.
fn field_name(name: &str) -> String {
    let mut n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if n.is_empty()
        || n.starts_with('_')
        || n.starts_with(|c: char| c.is_ascii_digit())
        || RESERVED.contains(&n.as_str())
        || RESERVED_PREFIXES.iter().any(|p| n.starts_with(p))
    {
        n = format!("EDGEWARD_{n}");
    }
    n.truncate(64);
    n
}

/// Appends field `name` = `value` in the native protocol: `NAME=value\n`,
/// or, for a value with a newline, `NAME\n`, its length (u64 LE), the
/// value and `\n`.
fn put(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, String)>,
    /// A `log` record's target.
    log_target: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field.name(), value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.put(field.name(), format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, name: &'static str, value: String) {
        match name {
            "message" => self.message = value,
            // A `log` crate record (a dependency's): its own target stands
            // for the bridge's `log`; where in the source it was is noise.
            "log.target" => self.log_target = Some(value),
            "log.module_path" | "log.file" | "log.line" => {}
            _ => self.fields.push((name, value)),
        }
    }
}

impl Fields {
    /// The event as a terminal line shows it, without a timestamp.
    fn line(&self, level: Level) -> String {
        let mut line = format!("{} {}", level, self.message);
        for (k, v) in &self.fields {
            line.push_str(&format!(" {k}={v}"));
        }
        line
    }
}

impl Native {
    /// The datagram for one event.
    fn datagram(&self, level: Level, target: &str, f: &Fields) -> Vec<u8> {
        let line = f.line(level);
        let mut buf = Vec::with_capacity(256);
        put(&mut buf, "PRIORITY", &priority(level).to_string());
        put(&mut buf, "SYSLOG_IDENTIFIER", self.identifier);
        put(&mut buf, "MESSAGE", &line);
        put(&mut buf, "EVENT", &f.message);
        put(
            &mut buf,
            "TARGET",
            f.log_target.as_deref().unwrap_or(target),
        );
        for (k, v) in &f.fields {
            put(&mut buf, &field_name(k), v);
        }
        buf
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Native {
    fn on_event(&self, event: &Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let level = *event.metadata().level();
        let buf = self.datagram(level, event.metadata().target(), &f);
        if self.sock.send(&buf).is_err() {
            // Too large for a datagram, or the journal went away: the
            // stream still takes the line.
            use std::io::Write as _;
            let line = f.line(level);
            // One line: a newline in a value would start another entry,
            // with a priority of its choosing.
            let mut line = format!(
                "<{}>{}",
                priority(level),
                line.replace('\\', "\\\\")
                    .replace('\n', "\\n")
                    .replace('\r', "\\r")
            );
            line.push('\n');
            let _ = crate::QuietStderr.write_all(line.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_named_as_the_journal_takes_them() {
        assert_eq!(field_name("module"), "MODULE");
        assert_eq!(field_name("read_ms"), "READ_MS");
        assert_eq!(field_name("message"), "EDGEWARD_MESSAGE");
        assert_eq!(field_name("unit"), "EDGEWARD_UNIT");
        assert_eq!(field_name("_x"), "EDGEWARD__X");
        assert_eq!(field_name("9lives"), "EDGEWARD_9LIVES");
        assert_eq!(field_name("code.file"), "EDGEWARD_CODE_FILE");
        assert_eq!(field_name("object_pid"), "EDGEWARD_OBJECT_PID");
        assert_eq!(field_name("tid"), "EDGEWARD_TID");
        assert_eq!(field_name(&"a".repeat(100)).len(), 64);
    }

    #[test]
    fn a_log_records_target_is_its_own() {
        let n = Native {
            sock: std::os::unix::net::UnixDatagram::unbound().unwrap(),
            identifier: "t",
        };
        let mut f = Fields::default();
        f.put("message", "connected".into());
        f.put("log.target", "rumqttc::state".into());
        f.put("log.module_path", "rumqttc::state".into());
        f.put("log.file", "src/state.rs".into());
        f.put("log.line", "42".into());
        f.put("module", "m".into());
        let d = String::from_utf8(n.datagram(Level::INFO, "log", &f)).unwrap();
        assert!(d.contains("TARGET=rumqttc::state\n"), "{d}");
        assert!(d.contains("MODULE=m\n"), "{d}");
        assert!(!d.contains("\nLOG_") && !d.contains("src/state.rs"), "{d}");
        assert!(d.contains("MESSAGE=INFO connected module=m\n"), "{d}");
    }

    #[test]
    fn values_with_newlines_are_length_prefixed() {
        let mut b = Vec::new();
        put(&mut b, "A", "x=y");
        put(&mut b, "B", "1\n2");
        let mut want = b"A=x=y\nB\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"1\n2\n");
        assert_eq!(b, want);
    }

    #[test]
    fn the_stream_is_named_by_device_and_inode() {
        assert!(named("2049:1234", 2049, 1234));
        assert!(!named("2049:1235", 2049, 1234));
        assert!(!named("2049", 2049, 1234));
        assert!(!named("x:y", 2049, 1234));
        assert!(!named("", 2049, 1234));
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
        assert_eq!(priority(Level::TRACE), 7);
    }
}
