//! One vCPU of a guest running alone: how integrity views stay sound on
//! several CPUs.
//!
//! A guest's EPT views are shared by its vCPUs. The kernel view is used
//! by all of them at once; a module's view, and a page opened for one
//! single-stepped write, must not be: a second CPU would run with rights
//! meant for the first (write through the opened page, run the kernel
//! with a module's grants). The rule is the simplest that is correct: a
//! vCPU that is about to leave the kernel view, or to open a page, first
//! takes its guest *exclusively*. Taking publishes (see [`super::signal`]):
//! when [`Exclusive::take`] returns, every other vCPU of the guest is out
//! of guest code, and none goes back in until the holder releases, which
//! it does when it is back in the kernel view with nothing opened. So the
//! per-vCPU integrity state (the view, the write being let through, the
//! interrupts held for the kernel view) is only ever not the kernel
//! view's on the holder, and one copy of it per guest is enough.
//!
//! A hold lasts while one CPU runs a module's own code or one stepped
//! instruction. Module code that waits for another CPU without calling
//! the kernel (an inline spin on a flag) waits until its next interrupt:
//! interrupts taken in a module's view are delivered in the kernel view,
//! which ends the hold.
//!
//! Ordering: the holder stores itself, then publishes; a vCPU marks
//! itself in the guest ([`Signals::entering`]) and then looks at the
//! holder. Either it sees the holder and stays out, or the publication
//! sees it inside and waits until it has exited.

use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use super::cpuset::CpuSet;
use super::signal::{Round, Signals};

const NONE: usize = usize::MAX;

/// Which vCPU (by index in its guest), if any, runs its guest alone.
pub struct Exclusive(AtomicUsize);

impl Default for Exclusive {
    fn default() -> Self {
        Exclusive(AtomicUsize::new(NONE))
    }
}

impl Exclusive {
    /// The vCPU holding the guest.
    pub fn holder(&self) -> Option<usize> {
        Some(self.0.load(SeqCst)).filter(|&h| h != NONE)
    }

    /// Whether another vCPU than `vcpu` holds the guest: `vcpu` must not
    /// run guest code, nor handle an exit, until it is released.
    pub fn excludes(&self, vcpu: usize) -> bool {
        self.holder().is_some_and(|h| h != vcpu)
    }

    /// `vcpu` (running on CPU `this`) takes the guest, whose vCPUs run on
    /// `cpus`, and returns once no other of them runs guest code. The
    /// caller holds the guest's lock (so no other vCPU holds it, see
    /// [`Exclusive::excludes`]). `None` if it held it already.
    pub fn take(
        &self,
        vcpu: usize,
        signals: &Signals,
        cpus: &CpuSet,
        this: usize,
        send: &dyn Fn(usize),
        spin: &mut dyn FnMut(usize) -> bool,
    ) -> Option<Round> {
        if self.0.swap(vcpu, SeqCst) == vcpu {
            return None;
        }
        Some(signals.publish(cpus, this, send, spin))
    }

    /// `vcpu` lets the others run again (if it held the guest).
    pub fn release(&self, vcpu: usize) {
        let _ = self.0.compare_exchange(vcpu, NONE, SeqCst, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use core::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::vec::Vec;

    #[test]
    fn one_holder_at_a_time() {
        let e = Exclusive::default();
        let s = Signals::new();
        let cpus = CpuSet::first(2);
        let mut spin = |_| false;
        assert_eq!(e.holder(), None);
        assert!(!e.excludes(0) && !e.excludes(1));
        assert!(e.take(1, &s, &cpus, 1, &|_| {}, &mut spin).is_some());
        assert!(e.excludes(0) && !e.excludes(1));
        // Taking again publishes nothing more.
        assert!(e.take(1, &s, &cpus, 1, &|_| {}, &mut spin).is_none());
        // Only the holder releases.
        e.release(0);
        assert_eq!(e.holder(), Some(1));
        e.release(1);
        assert_eq!(e.holder(), None);
    }

    /// Threads stand in for the CPUs of a four-vCPU guest. Each enters
    /// (marks itself, looks at the holder), runs "guest code" until a kick
    /// or a while, and flags itself inside meanwhile. Each in turn takes
    /// the guest, checks for a while that no other is inside, and
    /// releases. Without the hold check on entry, or with the publication
    /// left out of `take`, another is seen inside.
    #[test]
    fn while_one_holds_the_guest_no_other_runs_it() {
        const CPUS: usize = 4;
        const HOLDS: usize = 400;
        let s = Arc::new(Signals::new());
        let e = Arc::new(Exclusive::default());
        let inside: Arc<Vec<AtomicBool>> = Arc::new((0..CPUS).map(|_| AtomicBool::new(false)).collect());
        let nmi: Arc<Vec<AtomicBool>> = Arc::new((0..CPUS).map(|_| AtomicBool::new(false)).collect());
        let lock = Arc::new(spin::Mutex::new(()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..CPUS)
            .map(|cpu| {
                let (s, e, inside, nmi, lock, stop) =
                    (s.clone(), e.clone(), inside.clone(), nmi.clone(), lock.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut holds = 0;
                    let mut round = 0u32;
                    while !stop.load(SeqCst) {
                        round = round.wrapping_add(1);
                        if let Some(epoch) = s.entering(cpu) {
                            s.caught_up(cpu, epoch);
                        }
                        if e.excludes(cpu) {
                            s.left(cpu);
                            std::thread::yield_now();
                            continue;
                        }
                        inside[cpu].store(true, SeqCst);
                        let mut spins = 0u32;
                        while !nmi[cpu].swap(false, SeqCst) && spins < 5000 {
                            spins += 1;
                            core::hint::spin_loop();
                        }
                        inside[cpu].store(false, SeqCst);
                        s.nmi_arrived(cpu);
                        s.left(cpu);
                        // An exit, handled under the guest's lock: now and
                        // then it takes the guest.
                        if holds < HOLDS / CPUS && round.is_multiple_of(3) {
                            let _guard = lock.lock();
                            if e.excludes(cpu) {
                                continue;
                            }
                            let send = |c: usize| nmi[c].store(true, SeqCst);
                            e.take(cpu, &s, &CpuSet::first(CPUS), cpu, &send, &mut |_| false);
                            for _ in 0..200 {
                                for other in (0..CPUS).filter(|&o| o != cpu) {
                                    assert!(!inside[other].load(SeqCst), "cpu {other} runs while {cpu} holds");
                                }
                                core::hint::spin_loop();
                            }
                            e.release(cpu);
                            holds += 1;
                        }
                    }
                    holds
                })
            })
            .collect();
        let start = std::time::Instant::now();
        while start.elapsed().as_secs() < 3 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        stop.store(true, SeqCst);
        let holds: usize = threads.into_iter().map(|t| t.join().expect("a CPU ran while another held")).sum();
        assert!(holds > 0, "no CPU ever took the guest");
    }
}
