//! Taking every other CPU out of VMX before the machine is handed back
//! (powered off, or to tboot's shutdown entry).
//!
//! tboot's shutdown waits for every AP and then tears down the measured
//! environment: a CPU still in VMX operation blocks INIT and may still
//! run a guest. So the CPU that powers off, whichever it is, *asks*
//! first: every other CPU that entered VMX under CTVM leaves its guest at
//! its next exit (the asker nudges it with NMIs and start-up IPIs, which
//! also end a wait for SIPI), clears its VMCS, leaves VMX, *acknowledges*
//! and halts for good. The asker waits for the acknowledgements until a
//! deadline and names the CPUs that did not give one: it never waits
//! forever, and a CPU that stays in VMX is said so.
//!
//! A CPU looks at the request only at points where it holds nothing
//! another CPU may need (no lock, no guest's exclusive hold): before it
//! enters a guest, while it waits outside one, and in its idle loop. A
//! CPU that never entered VMX (one that did not start, or stalled before
//! VMXON) is not asked and not waited for. Only one CPU asks; a second
//! one to try parks like the others.
//!
//! The VMX instructions and the halting are arch code
//! (`arch::x86_64::park`).

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use super::cpuset::{CpuSet, MAX_CPUS};

const NOBODY: usize = usize::MAX;

/// Every CPU's part in a park request.
pub struct Park {
    /// The CPU that asked ([`NOBODY`] until one does).
    by: AtomicUsize,
    /// The CPUs in VMX operation under CTVM (they are asked).
    in_vmx: [AtomicBool; MAX_CPUS],
    /// The CPUs that left VMX for good.
    parked: [AtomicBool; MAX_CPUS],
}

/// How a request ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parked {
    /// The CPUs that left VMX and acknowledged.
    pub left: CpuSet,
    /// The CPUs that did not acknowledge before the deadline: still in
    /// VMX, perhaps in a guest.
    pub silent: CpuSet,
}

impl Default for Park {
    fn default() -> Self {
        Self::new()
    }
}

impl Park {
    pub const fn new() -> Self {
        Park {
            by: AtomicUsize::new(NOBODY),
            in_vmx: [const { AtomicBool::new(false) }; MAX_CPUS],
            parked: [const { AtomicBool::new(false) }; MAX_CPUS],
        }
    }

    /// `cpu` is in VMX root operation now (right after VMXON).
    pub fn entered_vmx(&self, cpu: usize) {
        if let Some(c) = self.in_vmx.get(cpu) {
            c.store(true, SeqCst);
        }
    }

    /// `this` asks every other CPU in VMX to park. Returns the CPUs asked,
    /// or the CPU that asked already (then `this` parks like the others).
    /// A CPU that enters VMX after this is asked too, but not waited for.
    pub fn ask(&self, this: usize) -> Result<CpuSet, usize> {
        self.by.compare_exchange(NOBODY, this, SeqCst, SeqCst)?;
        let mut asked = CpuSet::new();
        for (cpu, _) in self.in_vmx.iter().enumerate().filter(|(c, v)| *c != this && v.load(SeqCst)) {
            asked.insert(cpu);
        }
        Ok(asked)
    }

    /// Whether `cpu` is asked to park (a CPU asks itself nothing).
    pub fn asked(&self, cpu: usize) -> bool {
        let by = self.by.load(SeqCst);
        by != NOBODY && by != cpu
    }

    /// `cpu` has left VMX for good.
    pub fn acknowledge(&self, cpu: usize) {
        if let Some(c) = self.parked.get(cpu) {
            c.store(true, SeqCst);
        }
    }

    /// Whether `cpu` has left VMX for good (its NMIs then touch nothing).
    pub fn parked(&self, cpu: usize) -> bool {
        self.parked.get(cpu).is_some_and(|c| c.load(SeqCst))
    }

    /// The asker waits for `asked` to acknowledge. `poll` is called while
    /// some have not, with those: it nudges them, and returns true when
    /// the deadline has passed.
    pub fn wait(&self, asked: &CpuSet, poll: &mut dyn FnMut(&CpuSet) -> bool) -> Parked {
        let look = || {
            let mut outcome = Parked::default();
            for cpu in asked.iter() {
                if self.parked(cpu) {
                    outcome.left.insert(cpu);
                } else {
                    outcome.silent.insert(cpu);
                }
            }
            outcome
        };
        loop {
            let outcome = look();
            if outcome.silent.is_empty() {
                return outcome;
            }
            if poll(&outcome.silent) {
                // One last look: an answer that came during the last poll counts.
                return look();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::sync::Arc;
    use std::vec::Vec;

    /// Where a stand-in CPU is when the request comes.
    #[derive(Clone, Copy)]
    enum Place {
        /// In a guest that exits only when nudged.
        Guest,
        /// In the idle loop, woken only by a nudge.
        Idle,
        /// Waiting outside its guest (another vCPU holds it), looking at
        /// the request on each round.
        Outside,
        /// Never answers (stuck with interrupts and NMIs blocked).
        Silent,
    }

    /// Threads stand in for CPUs `0..places.len()` (all in VMX); `asker`
    /// asks and waits until `expired` says the deadline has passed (given
    /// the CPUs still pending, and the polls so far). Returns the outcome
    /// and each CPU's state afterwards: whether it parked.
    fn run(places: &[Place], asker: usize, expired: impl Fn(&CpuSet, u32) -> bool) -> (Parked, Vec<bool>) {
        let park = Arc::new(Park::new());
        let nudged: Arc<Vec<AtomicBool>> = Arc::new(places.iter().map(|_| AtomicBool::new(false)).collect());
        for cpu in 0..places.len() {
            park.entered_vmx(cpu);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (cpu, &place) in places.iter().enumerate().filter(|&(c, _)| c != asker) {
            let (park, nudged, stop) = (park.clone(), nudged.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    match place {
                        Place::Silent => {}
                        Place::Outside => {
                            if park.asked(cpu) {
                                park.acknowledge(cpu);
                                return;
                            }
                        }
                        Place::Guest | Place::Idle => {
                            // Runs (or sleeps) until nudged, then looks.
                            if nudged[cpu].swap(false, SeqCst) && park.asked(cpu) {
                                park.acknowledge(cpu);
                                return;
                            }
                        }
                    }
                    std::thread::yield_now();
                }
            }));
        }
        // Let the others settle in their places.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let asked = park.ask(asker).expect("the first to ask");
        let mut polls = 0;
        let outcome = park.wait(&asked, &mut |pending| {
            assert!(!pending.contains(asker), "the asker waits for itself");
            for cpu in pending.iter() {
                nudged[cpu].store(true, SeqCst);
            }
            polls += 1;
            std::thread::sleep(std::time::Duration::from_millis(1));
            expired(pending, polls)
        });
        stop.store(true, SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        let parked = (0..places.len()).map(|c| park.parked(c)).collect();
        (outcome, parked)
    }

    fn set(cpus: &[usize]) -> CpuSet {
        let mut s = CpuSet::new();
        cpus.iter().for_each(|&c| s.insert(c));
        s
    }

    #[test]
    fn every_other_cpu_wherever_it_is_parks_and_acknowledges() {
        use Place::*;
        let (outcome, parked) = run(&[Guest, Guest, Idle, Outside], 0, |_, polls| polls > 10_000);
        assert_eq!(outcome, Parked { left: set(&[1, 2, 3]), silent: CpuSet::new() });
        assert_eq!(parked, [false, true, true, true]);
    }

    #[test]
    fn an_application_processor_can_be_the_one_that_powers_off() {
        use Place::*;
        let (outcome, parked) = run(&[Idle, Guest, Guest, Outside], 2, |_, polls| polls > 10_000);
        assert_eq!(outcome, Parked { left: set(&[0, 1, 3]), silent: CpuSet::new() });
        assert_eq!(parked, [true, true, false, true]);
    }

    #[test]
    fn a_cpu_that_does_not_answer_is_named_at_the_deadline() {
        use Place::*;
        // The deadline passes once the others had their chance (a loaded
        // host may take a while to run the threads).
        let silent = set(&[1, 3]);
        let (outcome, parked) =
            run(&[Guest, Silent, Idle, Silent], 0, |pending, polls| pending == &silent || polls > 10_000);
        assert_eq!(outcome, Parked { left: set(&[2]), silent: set(&[1, 3]) });
        assert_eq!(parked, [false, false, true, false]);
    }

    #[test]
    fn only_cpus_in_vmx_are_asked() {
        // CPU 2 never reached VMXON (it stalled, or did not start).
        let park = Park::new();
        for cpu in [0, 1, 3] {
            park.entered_vmx(cpu);
        }
        let asked = park.ask(0).unwrap();
        assert_eq!(asked, set(&[1, 3]));
        assert!(park.asked(1) && park.asked(3));
        assert!(!park.asked(0), "the asker is not asked");
        // Nobody answers: only the asked are named.
        let outcome = park.wait(&asked, &mut |_| true);
        assert_eq!(outcome, Parked { left: CpuSet::new(), silent: set(&[1, 3]) });
        // With nobody to ask, nothing to wait for.
        let alone = Park::new();
        alone.entered_vmx(0);
        let asked = alone.ask(0).unwrap();
        assert!(asked.is_empty());
        assert_eq!(alone.wait(&asked, &mut |_| panic!("polled for nobody")), Parked::default());
    }

    #[test]
    fn nothing_is_asked_before_a_request_and_a_second_asker_parks() {
        let park = Park::new();
        for cpu in 0..3 {
            park.entered_vmx(cpu);
        }
        assert!(!(0..3).any(|c| park.asked(c) || park.parked(c)));
        assert_eq!(park.ask(1), Ok(set(&[0, 2])));
        // CPU 0 powers off too (a fault, say): it is told who asked, and is asked itself.
        assert_eq!(park.ask(0), Err(1));
        assert!(park.asked(0));
        park.acknowledge(0);
        assert!(park.parked(0) && !park.parked(2));
    }
}
