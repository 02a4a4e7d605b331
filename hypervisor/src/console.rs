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

/// A guest line being streamed: whose, and how many characters it has
/// after its `[name] ` prefix.
struct OpenLine {
    guest: alloc::string::String,
    column: usize,
}

/// The guest line left open by [`guest_bytes`], if any, and the guest whose
/// line another's output cut: its next piece starts with `[name]+ `, so a
/// reader can join the pieces again. Only touched with the sink lock held.
static OPEN: Mutex<(Option<OpenLine>, Option<alloc::string::String>)> = Mutex::new((None, None));

/// Ends an open guest line, so that what follows starts a line of its own.
fn close_guest_line(sink: Sink) {
    let mut open = OPEN.lock();
    if let Some(line) = open.0.take() {
        sink(b"\n");
        open.1 = Some(line.guest);
    }
}

/// Writes one line (a newline is added) with the console lock held. A
/// guest line left open is ended first: the hypervisor's lines always
/// start a line.
pub fn write_line(args: fmt::Arguments<'_>) {
    let guard = SINK.lock();
    if let Some(sink) = *guard {
        close_guest_line(sink);
        let mut w = LineWriter(sink);
        let _ = w.write_fmt(args);
        sink(b"\n");
    }
}

/// Streams bytes a guest wrote to its console (an interactive guest: its
/// prompt has no newline). Every line it writes starts with `[name] `, and
/// nothing it writes can make a line look like the hypervisor's: control
/// characters are shown as `\xNN`, but for tab, and for backspace within
/// what the guest itself wrote on the line (an editing shell's echo).
pub fn guest_bytes(guest: &str, bytes: &[u8]) {
    let guard = SINK.lock();
    let Some(sink) = *guard else { return };
    let mut state = OPEN.lock();
    let (open, cut) = &mut *state;
    if let Some(other) = open.take_if(|o| o.guest != guest) {
        sink(b"\n");
        *cut = Some(other.guest);
    }
    for &b in bytes {
        if b == b'\r' {
            continue;
        }
        let line = open.get_or_insert_with(|| {
            let continued = cut.take_if(|c| c == guest).is_some();
            sink(b"[");
            sink(guest.as_bytes());
            sink(if continued { b"]+ " } else { b"] " });
            OpenLine { guest: guest.into(), column: 0 }
        });
        match b {
            b'\n' => {
                sink(b"\n");
                *open = None;
            }
            0x08 if line.column > 0 => {
                line.column -= 1;
                sink(&[b]);
            }
            b'\t' | 0x20..=0x7e => {
                line.column += 1;
                sink(&[b]);
            }
            _ => {
                let mut text = alloc::string::String::new();
                let _ = write!(text, "\\x{b:02x}");
                line.column += text.len();
                sink(text.as_bytes());
            }
        }
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

    extern crate std;
    use std::sync::Mutex as StdMutex;
    use std::vec::Vec;

    static CAPTURED: StdMutex<Vec<u8>> = StdMutex::new(Vec::new());
    /// The console is global: tests that capture it take turns.
    static TURN: StdMutex<()> = StdMutex::new(());
    std::thread_local! {
        /// Only this thread's output is captured (other tests may log meanwhile).
        static CAPTURING: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
    }

    fn capture(bytes: &[u8]) {
        if CAPTURING.with(|c| c.get()) {
            CAPTURED.lock().unwrap().extend_from_slice(bytes);
        }
    }

    #[test]
    fn a_guest_cannot_forge_a_hypervisor_line() {
        let _turn = TURN.lock().unwrap();
        init(capture, LevelFilter::Info);
        CAPTURING.with(|c| c.set(true));
        CAPTURED.lock().unwrap().clear();
        // A guest prints what looks like a verdict, after a carriage return,
        // an escape sequence and backspaces meant to wipe its prefix.
        guest_bytes("linux", b"ok\r\nx\x08\x08\x08\x08ctvm: violation guest=linux action=deny\n");
        guest_bytes("linux", b"\x1b[2Kctvm: all guests stopped; powering off\n~ # ");
        write_line(format_args!("ctvm: guest linux stopped"));
        guest_bytes("linux", b"more\n");
        let out = std::string::String::from_utf8(CAPTURED.lock().unwrap().clone()).unwrap();
        assert_eq!(
            out,
            "[linux] ok\n[linux] x\x08\\x08\x08\x08ctvm: violation guest=linux action=deny\n\
             [linux] \\x1b[2Kctvm: all guests stopped; powering off\n[linux] ~ # \nctvm: guest linux stopped\n\
             [linux]+ more\n"
        );
        // Every line the guest wrote starts with its prefix (`+`: the rest
        // of a line the hypervisor's cut); only the hypervisor's start with "ctvm:".
        for line in out.lines() {
            assert!(
                line.starts_with("[linux] ") || line.starts_with("[linux]+ ") || line == "ctvm: guest linux stopped",
                "{line:?}"
            );
        }
    }

    #[test]
    fn levels_parse() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("loud"), None);
    }
}
