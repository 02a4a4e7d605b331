//! How one CPU makes the others see a change before they run guest code
//! again: the hypervisor's cross-CPU signal and the shootdown protocol.
//!
//! A change (an EPT right removed, a guest stopped) is made in shared
//! memory first, then *published*: a global epoch moves on, and the
//! publisher waits until every target CPU either runs no guest code or has
//! caught up with the new epoch. A CPU catches up on its way into a guest
//! (it flushes its EPT-derived translations with INVEPT, and applies what
//! else the epoch stands for). The publisher nudges a CPU that is inside a
//! guest with an NMI, which exits to the hypervisor; a CPU in the
//! hypervisor needs no nudge and is not waited for, so a publisher never
//! waits for a CPU that could be waiting for it (no deadlock), and a CPU
//! parked in the guest's wait-for-SIPI state (where NMIs are blocked) runs
//! no guest code and counts as outside.
//!
//! Ordering: the target marks itself in the guest and then reads the epoch;
//! the publisher moves the epoch and then reads the mark (both sequentially
//! consistent). Either the publisher sees the mark and waits for the
//! target, or the target sees the new epoch and catches up before it
//! enters: no CPU can enter with a stale view unseen.
//!
//! NMIs are shared with the guest, so each CPU keeps a `kick` flag: set
//! (before the NMI is sent) when the hypervisor sends one, and at most one
//! is outstanding per CPU. The NMI that finds the flag set is the
//! hypervisor's; one that finds it clear is the guest's (a performance
//! counter, a watchdog) and is delivered to it. Two NMIs that arrive
//! together merge into one in the processor, as on any machine: a guest
//! NMI merged with a hypervisor kick is lost, never duplicated. The
//! guest's own NMI IPIs never travel as real NMIs (see `exits::apic`), so
//! only its local NMI sources share this fate.

use core::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::SeqCst};

use super::cpuset::{CpuSet, MAX_CPUS};
use super::startup::{Mailbox, VcpuEvent};

/// One CPU's side of the protocol.
pub struct CpuSignal {
    /// A hypervisor NMI is on its way to this CPU and not yet accounted for.
    kick: AtomicBool,
    /// The CPU runs guest code, or is about to.
    in_guest: AtomicBool,
    /// The last epoch the CPU caught up with.
    seen: AtomicU64,
    /// An NMI for the guest arrived while the hypervisor ran.
    guest_nmi: AtomicBool,
}

impl CpuSignal {
    const fn new() -> Self {
        CpuSignal {
            kick: AtomicBool::new(false),
            in_guest: AtomicBool::new(false),
            seen: AtomicU64::new(0),
            guest_nmi: AtomicBool::new(false),
        }
    }
}

/// Every CPU's signals and the epoch.
pub struct Signals {
    cpus: [CpuSignal; MAX_CPUS],
    epoch: AtomicU64,
    /// What the publications cost, for the report.
    pub costs: Costs,
}

/// Publications, the NMIs they sent, and the time they took (in the
/// caller's unit: TSC ticks).
#[derive(Default)]
pub struct Costs {
    rounds: AtomicU64,
    kicks: AtomicU64,
    ticks: AtomicU64,
    most: AtomicU64,
}

/// A snapshot of [`Costs`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CostSummary {
    pub rounds: u64,
    pub kicks: u64,
    pub mean_ticks: u64,
    pub most_ticks: u64,
}

impl Costs {
    const fn new() -> Self {
        Costs { rounds: AtomicU64::new(0), kicks: AtomicU64::new(0), ticks: AtomicU64::new(0), most: AtomicU64::new(0) }
    }

    pub fn record(&self, round: &Round, ticks: u64) {
        self.rounds.fetch_add(1, SeqCst);
        self.kicks.fetch_add(u64::from(round.kicks + round.resent), SeqCst);
        self.ticks.fetch_add(ticks, SeqCst);
        self.most.fetch_max(ticks, SeqCst);
    }

    pub fn summary(&self) -> CostSummary {
        let rounds = self.rounds.load(SeqCst);
        CostSummary {
            rounds,
            kicks: self.kicks.load(SeqCst),
            mean_ticks: self.ticks.load(SeqCst).checked_div(rounds).unwrap_or(0),
            most_ticks: self.most.load(SeqCst),
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

/// What a publication cost: the epoch it reached and the NMIs it sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub epoch: u64,
    pub kicks: u32,
    /// NMIs sent again after a long wait.
    pub resent: u32,
}

impl Signals {
    pub const fn new() -> Self {
        Signals { cpus: [const { CpuSignal::new() }; MAX_CPUS], epoch: AtomicU64::new(0), costs: Costs::new() }
    }

    fn cpu(&self, cpu: usize) -> &CpuSignal {
        &self.cpus[cpu % MAX_CPUS]
    }

    /// On `cpu`, right before a VM entry that runs guest code. Returns the
    /// epoch to catch up with if changes were published since the CPU last
    /// did: the caller flushes (INVEPT) and applies them, then calls
    /// [`Signals::caught_up`] before it enters.
    pub fn entering(&self, cpu: usize) -> Option<u64> {
        let c = self.cpu(cpu);
        c.in_guest.store(true, SeqCst);
        // What is read next (the epoch, the vCPU's mailbox) is read after
        // the mark is visible: see [`Signals::post`].
        fence(SeqCst);
        let epoch = self.epoch.load(SeqCst);
        (c.seen.load(SeqCst) != epoch).then_some(epoch)
    }

    pub fn caught_up(&self, cpu: usize, epoch: u64) {
        self.cpu(cpu).seen.store(epoch, SeqCst);
    }

    /// On `cpu`, after a VM exit, or instead of [`Signals::entering`] before
    /// an entry that runs no guest code (wait-for-SIPI).
    pub fn left(&self, cpu: usize) {
        self.cpu(cpu).in_guest.store(false, SeqCst);
    }

    /// Starts a publication: the change is already in shared memory.
    pub fn begin(&self) -> u64 {
        self.epoch.fetch_add(1, SeqCst) + 1
    }

    /// Whether `cpu` may still run guest code from before `epoch`.
    pub fn lags(&self, cpu: usize, epoch: u64) -> bool {
        let c = self.cpu(cpu);
        c.in_guest.load(SeqCst) && c.seen.load(SeqCst) < epoch
    }

    /// Nudges `cpu` out of its guest with `send` (an NMI), unless a nudge
    /// is already on its way. Returns whether one was sent.
    pub fn kick(&self, cpu: usize, send: &dyn Fn(usize)) -> bool {
        if self.cpu(cpu).kick.swap(true, SeqCst) {
            return false;
        }
        send(cpu);
        true
    }

    /// Publishes a change made in shared memory and returns once no CPU of
    /// `targets` but `this` can run guest code without having caught up.
    /// `send` delivers the NMI; `spin` is called while waiting, with the
    /// CPU waited for, and returns true when it has waited too long: the
    /// NMI is then sent again (one lost on its way, for instance to a CPU
    /// whose guest parked it, would otherwise stall every later signal).
    pub fn publish(
        &self,
        targets: &CpuSet,
        this: usize,
        send: &dyn Fn(usize),
        spin: &mut dyn FnMut(usize) -> bool,
    ) -> Round {
        let epoch = self.begin();
        let mut round = Round { epoch, kicks: 0, resent: 0 };
        for cpu in targets.iter().filter(|&c| c != this) {
            while self.lags(cpu, epoch) {
                if self.kick(cpu, send) {
                    round.kicks += 1;
                }
                if spin(cpu) {
                    self.cpu(cpu).kick.store(false, SeqCst);
                    round.resent += 1;
                }
            }
        }
        round
    }

    /// Posts `event` to a vCPU of `cpu`, and rings that CPU if it is inside
    /// its guest. One outside takes its mailbox before it next enters: it
    /// marks itself inside first ([`Signals::entering`]), and each side
    /// fences between its write and its read, so either the CPU sees the
    /// event or this sees it inside and kicks it. False when the mailbox
    /// is full (the event is dropped and counted).
    pub fn post(&self, cpu: usize, mailbox: &Mailbox, event: VcpuEvent, send: &dyn Fn(usize)) -> bool {
        if !mailbox.post(event) {
            return false;
        }
        fence(SeqCst);
        if self.cpu(cpu).in_guest.load(SeqCst) {
            self.kick(cpu, send);
        }
        true
    }

    /// Whether a kick is on its way to `cpu` (for diagnostics).
    pub fn kick_outstanding(&self, cpu: usize) -> bool {
        self.cpu(cpu).kick.load(SeqCst)
    }

    /// An NMI arrived on `cpu` (as a VM exit, or in the hypervisor): true
    /// if it was the hypervisor's kick, now accounted for; false if it
    /// belongs to the guest.
    pub fn nmi_arrived(&self, cpu: usize) -> bool {
        self.cpu(cpu).kick.swap(false, SeqCst)
    }

    /// A guest's NMI arrived while the hypervisor ran on `cpu`: it is
    /// delivered at the next entry.
    pub fn hold_guest_nmi(&self, cpu: usize) {
        self.cpu(cpu).guest_nmi.store(true, SeqCst);
    }

    /// The guest NMI held for `cpu`, if one is.
    pub fn take_guest_nmi(&self, cpu: usize) -> bool {
        self.cpu(cpu).guest_nmi.swap(false, SeqCst)
    }

    /// For the host NMI handler: sorts an NMI taken in the hypervisor.
    pub fn nmi_in_hypervisor(&self, cpu: usize) {
        if !self.nmi_arrived(cpu) {
            self.hold_guest_nmi(cpu);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use core::sync::atomic::{AtomicU32, AtomicUsize};
    use std::sync::Arc;
    use std::vec::Vec;

    #[test]
    fn a_cpu_inside_is_kicked_and_waited_for_one_outside_is_not() {
        let s = Signals::new();
        let sent = core::cell::RefCell::new(Vec::new());
        let send = |c: usize| sent.borrow_mut().push(c);
        // CPU 1 in a guest, caught up; CPU 2 in the hypervisor; CPU 3 parked.
        assert_eq!(s.entering(1), None);
        s.left(3);
        let e = s.begin();
        assert!(s.lags(1, e) && !s.lags(2, e) && !s.lags(3, e));
        assert!(s.kick(1, &send));
        // A second publisher does not send a second NMI while one is on its way.
        assert!(!s.kick(1, &send));
        assert_eq!(*sent.borrow(), [1]);
        // The NMI exits CPU 1: it was the hypervisor's, and CPU 1 is out.
        assert!(s.nmi_arrived(1));
        s.left(1);
        assert!(!s.lags(1, e));
        // Its next entry catches up first.
        assert_eq!(s.entering(1), Some(e));
        s.caught_up(1, e);
        assert!(!s.lags(1, e));
        assert_eq!(s.entering(1), None);
    }

    #[test]
    fn an_entry_racing_a_publication_catches_up_or_is_waited_for() {
        // Target marks itself in, then the publisher moves the epoch: the
        // publisher sees it inside and behind.
        let s = Signals::new();
        s.cpu(1).in_guest.store(true, SeqCst);
        let e = s.begin();
        assert!(s.lags(1, e));
        // Publisher moved first: the target's entry sees the new epoch.
        let s = Signals::new();
        let e = s.begin();
        assert!(!s.lags(1, e));
        assert_eq!(s.entering(1), Some(e));
        // Until it has caught up, it still counts as lagging.
        assert!(s.lags(1, e));
        s.caught_up(1, e);
        assert!(!s.lags(1, e));
    }

    #[test]
    fn costs_add_up() {
        let s = Signals::new();
        assert_eq!(s.costs.summary(), CostSummary::default());
        s.costs.record(&Round { epoch: 1, kicks: 1, resent: 0 }, 100);
        s.costs.record(&Round { epoch: 2, kicks: 2, resent: 1 }, 300);
        assert_eq!(s.costs.summary(), CostSummary { rounds: 2, kicks: 4, mean_ticks: 200, most_ticks: 300 });
    }

    #[test]
    fn nmis_are_told_apart() {
        let s = Signals::new();
        // Nobody kicked: the guest's.
        assert!(!s.nmi_arrived(0));
        // A kick, then its NMI: the hypervisor's, once.
        assert!(s.kick(0, &|_| {}));
        assert!(s.nmi_arrived(0));
        assert!(!s.nmi_arrived(0));
        // A guest NMI taken in the hypervisor is held for the guest; a kick is not.
        s.nmi_in_hypervisor(0);
        assert!(s.take_guest_nmi(0));
        assert!(!s.take_guest_nmi(0));
        s.kick(0, &|_| {});
        s.nmi_in_hypervisor(0);
        assert!(!s.take_guest_nmi(0));
    }

    /// A thread stands in for a CPU whose guest never exits on its own (it
    /// leaves only on a kick), and takes its mailbox on each way in; at
    /// times it dawdles between its mark and its mailbox. Another posts
    /// events one at a time and waits for each to be taken: an event that
    /// is neither seen nor rung for leaves it waiting, and the test fails.
    #[test]
    fn a_posted_event_is_seen_on_entry_or_rung_for() {
        use super::super::startup::{take, Activity};
        const EVENTS: u32 = 3000;
        let s: Arc<Signals> = Arc::new(Signals::new());
        let mailbox = Arc::new(Mailbox::default());
        let nmi = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let target = {
            let (s, mailbox, nmi, taken, stop) = (s.clone(), mailbox.clone(), nmi.clone(), taken.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut activity = Activity::Running;
                let mut round = 0u32;
                while !stop.load(SeqCst) {
                    s.entering(1);
                    round = round.wrapping_add(1);
                    if round.is_multiple_of(7) {
                        std::thread::yield_now();
                    }
                    taken.fetch_add(take(&mailbox, &mut activity).ignored_startups, SeqCst);
                    // Guest code, until a kick (or the end of the test).
                    while !nmi.swap(false, SeqCst) && !stop.load(SeqCst) {
                        core::hint::spin_loop();
                    }
                    s.nmi_arrived(1);
                    s.left(1);
                }
            })
        };
        let send = |_: usize| nmi.store(true, SeqCst);
        for i in 1..=EVENTS {
            assert!(s.post(1, &mailbox, VcpuEvent::Startup(1), &send));
            let start = std::time::Instant::now();
            while taken.load(SeqCst) < i {
                assert!(start.elapsed().as_secs() < 20, "event {i} was neither seen nor rung for");
                std::thread::yield_now();
            }
        }
        stop.store(true, SeqCst);
        target.join().unwrap();
    }

    /// Threads stand in for CPUs. Each caches the version of a shared right
    /// when it catches up (its INVEPT) and keeps using that cached version,
    /// as a TLB does, until it catches up again; it runs "guest code" until
    /// an NMI (a flag) exits it. Invariant, checked by the CPUs themselves
    /// while they run: no CPU runs with a version older than the last
    /// completed shootdown.
    #[test]
    fn no_cpu_runs_on_a_removed_right_after_a_shootdown() {
        const CPUS: usize = 4;
        const ROUNDS: u64 = 2000;
        let s: Arc<Signals> = Arc::new(Signals::new());
        let version = Arc::new(AtomicU64::new(1));
        let completed = Arc::new(AtomicU64::new(1));
        let nmi: Arc<Vec<AtomicBool>> = Arc::new((0..CPUS).map(|_| AtomicBool::new(false)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let exits = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for cpu in 1..CPUS {
            let (s, version, completed, nmi, stop, exits) =
                (s.clone(), version.clone(), completed.clone(), nmi.clone(), stop.clone(), exits.clone());
            threads.push(std::thread::spawn(move || {
                let mut spins = 0u32;
                let mut cached = version.load(SeqCst);
                while !stop.load(SeqCst) {
                    if let Some(e) = s.entering(cpu) {
                        cached = version.load(SeqCst);
                        s.caught_up(cpu, e);
                    }
                    // Guest code runs until an NMI arrives (or it exits on its own).
                    loop {
                        let done = completed.load(SeqCst);
                        assert!(cached >= done, "cpu {cpu} runs with version {cached} after shootdown {done}");
                        spins = spins.wrapping_add(1);
                        if nmi[cpu].swap(false, SeqCst) {
                            assert!(s.nmi_arrived(cpu));
                            break;
                        }
                        if spins.is_multiple_of(20_011) || stop.load(SeqCst) {
                            break;
                        }
                        core::hint::spin_loop();
                    }
                    s.left(cpu);
                    exits.fetch_add(1, SeqCst);
                    // Sometimes the hypervisor takes its time before the next entry.
                    if spins.is_multiple_of(5) {
                        std::thread::yield_now();
                    }
                }
            }));
        }
        let targets = CpuSet::first(CPUS);
        let kicks = AtomicU32::new(0);
        // Rounds until CPUs were caught inside often enough (the threads
        // share the host's cores with other tests), within a time bound.
        let start = std::time::Instant::now();
        let mut round = 0;
        while round < ROUNDS || (kicks.load(SeqCst) < 100 && start.elapsed().as_secs() < 30) {
            round += 1;
            // Remove the right: every version up to `round` is stale.
            version.store(round + 1, SeqCst);
            let send = |c: usize| {
                kicks.fetch_add(1, SeqCst);
                nmi[c].store(true, SeqCst);
            };
            s.publish(&targets, 0, &send, &mut |_| {
                core::hint::spin_loop();
                false
            });
            completed.store(round + 1, SeqCst);
        }
        stop.store(true, SeqCst);
        for t in threads {
            t.join().expect("a CPU saw a removed right");
        }
        assert!(kicks.load(SeqCst) > 0, "no CPU was ever caught inside a guest");
        assert!(exits.load(SeqCst) >= kicks.load(SeqCst) as usize);
    }
}
