//! Logs under journald. A service's standard error is a journal stream
//! when `JOURNAL_STREAM` names its device and inode (`systemd.exec(5)`):
//! then each line starts with its syslog priority (`<3>` error, `<4>`
//! warning, `<6>` info, `<7>` debug), which journald strips and records,
//! and carries no timestamp of its own (the journal has one). Fields stay
//! `key=value` in the message; the journal's native protocol, which would
//! index them, is not spoken yet.

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

#[cfg(test)]
mod tests {
    use super::*;

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
