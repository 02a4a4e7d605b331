//! Violations: one console line each, and a bounded per-guest log the agent
//! reads by hypercall. Overflow drops the oldest records but counts them, so
//! nothing disappears without a trace.

use alloc::collections::VecDeque;
use core::fmt;

use guest_agent::integrity::{ViolationAction, ViolationRecord};

pub use guest_agent::integrity::ViolationKind;

/// One violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    /// The module whose view was active, or `None` for the kernel view.
    pub module: Option<u32>,
    pub rip: u64,
    /// The address written, or jumped to.
    pub target: u64,
    pub action: ViolationAction,
    /// The guest CPU (vCPU index) it happened on.
    pub cpu: u32,
}

/// Formats the console line: `ctvm: violation guest=... module=... kind=...
/// rip=... target=... action=...`.
pub struct Line<'a> {
    pub guest: &'a str,
    pub module: &'a str,
    pub violation: &'a Violation,
    /// For a refused kernel API: its name and group (` api=... group=...`).
    pub api: Option<(&'a str, &'a str)>,
    /// For a write to a protected kernel object: what it is (` object=cred`).
    pub object: Option<&'a str>,
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.violation;
        write!(
            f,
            "ctvm: violation guest={} module={} kind={} rip={:#x} target={:#x} action={} cpu={}",
            self.guest,
            self.module,
            v.kind.name(),
            v.rip,
            v.target,
            v.action.name(),
            v.cpu
        )?;
        if let Some((name, group)) = self.api {
            write!(f, " api={name} group={group}")?;
        }
        match self.object {
            Some(object) => write!(f, " object={object}"),
            None => Ok(()),
        }
    }
}

/// A bounded log of records for the agent.
#[derive(Clone, Debug)]
pub struct ViolationLog {
    records: VecDeque<ViolationRecord>,
    capacity: usize,
    next_sequence: u64,
    /// Records dropped because the agent did not read them in time.
    pub dropped: u64,
}

impl ViolationLog {
    pub fn new(capacity: usize) -> Self {
        ViolationLog { records: VecDeque::new(), capacity: capacity.max(1), next_sequence: 1, dropped: 0 }
    }

    pub fn push(&mut self, v: &Violation) {
        if self.records.len() == self.capacity {
            self.records.pop_front();
            self.dropped += 1;
        }
        let record = ViolationRecord {
            sequence: self.next_sequence,
            kind: v.kind as u32,
            module: v.module.unwrap_or(u32::MAX),
            rip: v.rip,
            target: v.target,
            action: v.action as u32,
            cpu: v.cpu,
        };
        self.next_sequence += 1;
        self.records.push_back(record);
    }

    /// Up to `max` of the oldest records, left in the log.
    pub fn peek(&self, max: usize) -> impl Iterator<Item = &ViolationRecord> + '_ {
        self.records.iter().take(max)
    }

    /// Takes up to `max` of the oldest records.
    pub fn take(&mut self, max: usize) -> impl Iterator<Item = ViolationRecord> + '_ {
        let n = max.min(self.records.len());
        self.records.drain(..n)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// What the console shows of a violation: every record goes to the log,
/// but a repeat (same kind, module and instruction) is not a new line, or
/// a looping module in audit mode would bury the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Say {
    /// The first of its kind at this instruction: the whole line.
    Line,
    /// The `n`th (10, 100, 1000, ...): one line with the count.
    Repeated(u64),
    /// Counted, not shown.
    Quiet,
}

/// Counts of violations by (kind, module, instruction), for the console.
#[derive(Clone, Debug, Default)]
pub struct Repeats {
    seen: alloc::collections::BTreeMap<(u32, u32, u64), u64>,
    /// Violations at instructions past the map's bound, by kind.
    others: alloc::collections::BTreeMap<u32, u64>,
}

/// Instructions tracked per guest; past them, repeats count per kind.
const REPEATS_TRACKED: usize = 4096;

impl Repeats {
    pub fn note(&mut self, v: &Violation) -> Say {
        let key = (v.kind as u32, v.module.unwrap_or(u32::MAX), v.rip);
        let n = if let Some(n) = self.seen.get_mut(&key) {
            *n += 1;
            *n
        } else if self.seen.len() < REPEATS_TRACKED {
            self.seen.insert(key, 1);
            1
        } else {
            let n = self.others.entry(key.0).or_insert(0);
            *n += 1;
            // Past the bound, the first of each kind was shown already.
            return if Self::milestone(*n) { Say::Repeated(*n) } else { Say::Quiet };
        };
        match n {
            1 => Say::Line,
            n if Self::milestone(n) => Say::Repeated(n),
            _ => Say::Quiet,
        }
    }

    /// 10, 100, 1000, ...
    fn milestone(mut n: u64) -> bool {
        if n < 10 {
            return false;
        }
        while n.is_multiple_of(10) {
            n /= 10;
        }
        n == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec::Vec;

    fn v(kind: ViolationKind) -> Violation {
        Violation {
            kind,
            module: Some(3),
            rip: 0xffff_ffff_c000_1234,
            target: 0xffff_ffff_8230_0008,
            action: ViolationAction::Denied,
            cpu: 2,
        }
    }

    #[test]
    fn the_console_line_has_every_field() {
        let violation = v(ViolationKind::WriteSyscallTable);
        let line =
            format!("{}", Line { guest: "linux", module: "evil", violation: &violation, api: None, object: None });
        assert_eq!(
            line,
            "ctvm: violation guest=linux module=evil kind=write-syscall-table rip=0xffffffffc0001234 \
             target=0xffffffff82300008 action=deny cpu=2"
        );
        // A refused kernel API says which, and its group.
        let violation = v(ViolationKind::CallDeniedApi);
        let api = Some(("call_usermodehelper_exec", "usermode-helper"));
        let line = format!("{}", Line { guest: "linux", module: "evil", violation: &violation, api, object: None });
        assert!(line.ends_with("action=deny cpu=2 api=call_usermodehelper_exec group=usermode-helper"), "{line}");
    }

    #[test]
    fn the_log_is_bounded_and_counts_what_it_drops() {
        let mut log = ViolationLog::new(2);
        for _ in 0..3 {
            log.push(&v(ViolationKind::WriteIdt));
        }
        assert_eq!(log.dropped, 1);
        let got: Vec<_> = log.take(10).collect();
        assert_eq!(got.iter().map(|r| r.sequence).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(got[0].kind, ViolationKind::WriteIdt as u32);
        assert_eq!(got[0].module, 3);
        assert!(log.is_empty());
    }

    #[test]
    fn repeats_are_counted_not_printed() {
        let mut r = Repeats::default();
        let says: Vec<Say> = (0..1000).map(|_| r.note(&v(ViolationKind::WriteIdt))).collect();
        assert_eq!(says[0], Say::Line);
        let shown: Vec<(usize, Say)> = says.iter().copied().enumerate().filter(|(_, s)| *s != Say::Quiet).collect();
        assert_eq!(
            shown,
            [(0, Say::Line), (9, Say::Repeated(10)), (99, Say::Repeated(100)), (999, Say::Repeated(1000))]
        );
        // Another instruction, module or kind is a line of its own.
        let mut other = v(ViolationKind::WriteIdt);
        other.rip += 1;
        assert_eq!(r.note(&other), Say::Line);
        other.module = None;
        assert_eq!(r.note(&other), Say::Line);
        // A flood of distinct instructions stays bounded, counted by kind.
        let mut r = Repeats::default();
        let lines = (0..100_000u64)
            .filter(|&i| {
                let mut x = v(ViolationKind::ExecuteData);
                x.rip = i;
                r.note(&x) != Say::Quiet
            })
            .count();
        assert_eq!(lines, REPEATS_TRACKED + 4, "4096 lines, then 10, 100, 1000 and 10000 more, counted");
    }
}
