//! The hypervisor console: the `log` backend and the guests' prefixed lines.
//!
//! Output goes to one byte sink (COM1 on bare metal, a buffer in tests). Each
//! line is written whole under a lock, so lines never interleave.

use core::fmt::{self, Write};
use log::{Level, LevelFilter, Log, Metadata, Record};
use spin::Mutex;

/// Where console bytes go.
pub type Sink = fn(&[u8]);

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

struct Logger;

static LOGGER: Logger = Logger;

/// Installs the sink and the `log` backend. Safe to call more than once (the
/// last sink wins; the logger is installed once).
pub fn init(sink: Sink, level: LevelFilter) {
    *SINK.lock() = Some(sink);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Parses a `log=` value from the command line.
pub fn parse_level(value: &str) -> Option<LevelFilter> {
    Some(match value {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

struct LineWriter(Sink);

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        (self.0)(s.as_bytes());
        Ok(())
    }
}

/// Writes one line (a newline is added) with the console lock held.
pub fn write_line(args: fmt::Arguments<'_>) {
    let guard = SINK.lock();
    if let Some(sink) = *guard {
        let mut w = LineWriter(sink);
        let _ = w.write_fmt(args);
        sink(b"\n");
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let tag = match record.level() {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            Level::Info => "",
            Level::Debug => "debug: ",
            Level::Trace => "trace: ",
        };
        write_line(format_args!("ctvm: {tag}{}", record.args()));
    }

    fn flush(&self) {}
}

/// Prints one line a guest wrote to its console, prefixed with its name.
/// Control characters are shown as `\xNN` so a guest cannot forge hypervisor
/// lines or drive the terminal.
pub fn guest_line(guest: &str, line: &[u8]) {
    write_line(format_args!("[{guest}] {}", Escaped(line)));
}

/// Bytes shown as text, with anything but printable ASCII escaped.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if (0x20..0x7f).contains(&b) {
                f.write_char(b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Releases the console lock on the way to stopping the machine, in case the
/// code that faulted held it.
pub fn force_unlock() {
    if SINK.is_locked() {
        // SAFETY: only called on the way to stopping the machine, on the one
        // CPU that runs hypervisor code, so no other holder can still run.
        unsafe { SINK.force_unlock() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_hides_control_characters() {
        let s = alloc::format!("{}", Escaped(b"ok\x1b[2J\r\xff"));
        assert_eq!(s, "ok\\x1b[2J\\x0d\\xff");
    }

    #[test]
    fn levels_parse() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("loud"), None);
    }
}
