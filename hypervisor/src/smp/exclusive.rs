//! How integrity views stay sound on several CPUs: one vCPU in a module's
//! view at a time, the others in the kernel's; one vCPU running its guest
//! alone while a page is opened.
//!
//! A guest's EPT views are shared by its vCPUs, and each vCPU's VMCS points
//! at the view it runs. The kernel view is used by all of them at once.
//! A module's view is not: its grants follow the stack it runs on (pages
//! wholly the module's frames there), and another CPU running the same
//! view on another stack would write through them. So a vCPU that enters
//! a module's view first takes the guest's *module token*: one vCPU at a
//! time runs any module's view, while the others go on in the kernel view
//! (the view, the write being stepped and the interrupts held are each
//! vCPU's own, `integrity::VcpuIntegrity`). Taking a free token is an
//! atomic exchange, with no signal to any CPU: a module's crossings cost
//! the other CPUs nothing.
//!
//! A vCPU that needs the token while another holds it waits for it to be
//! given back, outside the guest's lock (`vmm::enters_module`); it never
//! enters a module's view without it. One its APIC has an interrupt for
//! takes the interrupt in the kernel view first, and crosses after
//! (`vmm::interrupt_comes_first`), waiting or not: the interrupt would take
//! it straight out of the module's view again, token and all. A right a
//! module's view loses must then reach only the token holder's CPU: the
//! others flush on their way back into the guest, before they can enter one.
//!
//! A page opened in the kernel view for one stepped instruction must not
//! serve any other CPU (it would write through it). A vCPU that opens one
//! takes its guest *alone*. Taking publishes (see [`super::signal`]): when
//! [`Exclusive::take`] returns, every other vCPU of the guest is out of
//! guest code, and none goes back in until the holder releases, which it
//! does when it is back in the kernel view with nothing opened or held. A
//! token holder kept out so waits in its module's view, not running it.
//!
//! So at any moment at most one vCPU runs guest code in a module's view,
//! the token holder, and an opened kernel-view page serves the one vCPU
//! running alone.
//!
//! Ordering: the holder stores itself, then publishes; a vCPU marks
//! itself in the guest ([`Signals::entering`]) and then looks at the
//! holder. Either it sees the holder and stays out, or the publication
//! sees it inside and waits until it has exited.

use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use super::cpuset::CpuSet;
use super::signal::{Round, Signals};

const NONE: usize = usize::MAX;

/// Which vCPU (by index in its guest), if any, runs its guest alone, and
/// which holds the module token.
pub struct Exclusive {
    alone: AtomicUsize,
    token: AtomicUsize,
    /// The module whose view the token holder runs, plus one (0: the
    /// kernel's): a module going away must not be one another vCPU runs.
    token_view: AtomicUsize,
}

impl Default for Exclusive {
    fn default() -> Self {
        Exclusive { alone: AtomicUsize::new(NONE), token: AtomicUsize::new(NONE), token_view: AtomicUsize::new(0) }
    }
}

impl Exclusive {
    /// The vCPU holding the guest.
    pub fn holder(&self) -> Option<usize> {
        Some(self.alone.load(SeqCst)).filter(|&h| h != NONE)
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
        if self.alone.swap(vcpu, SeqCst) == vcpu {
            return None;
        }
        Some(signals.publish(cpus, this, send, spin))
    }

    /// `vcpu` takes the module token, if it is free (or its own already):
    /// then it may run a module's view while the others run the kernel's.
    /// The caller holds the guest's lock. `false`: another vCPU holds it,
    /// and `vcpu` must not enter a module's view.
    pub fn take_token(&self, vcpu: usize) -> bool {
        match self.token.compare_exchange(NONE, vcpu, SeqCst, SeqCst) {
            Ok(_) => true,
            Err(holder) => holder == vcpu,
        }
    }

    /// The vCPU holding the module token.
    pub fn token_holder(&self) -> Option<usize> {
        Some(self.token.load(SeqCst)).filter(|&h| h != NONE)
    }

    /// `vcpu`, holding the token, now runs module `module`'s view (`None`:
    /// the kernel's). The caller holds the guest's lock.
    pub fn token_runs(&self, vcpu: usize, module: Option<u32>) {
        if self.token_holder() == Some(vcpu) {
            self.token_view.store(module.map_or(0, |m| m as usize + 1), SeqCst);
        }
    }

    /// Whether a vCPU other than `vcpu` runs module `module`'s view (it
    /// holds the token: no other vCPU runs a module's view).
    pub fn other_runs(&self, vcpu: usize, module: u32) -> bool {
        self.token_holder().is_some_and(|h| h != vcpu) && self.token_view.load(SeqCst) == module as usize + 1
    }

    /// `vcpu`, back in the kernel view with nothing opened or held, lets
    /// the others run again and gives the module token back (what it held).
    pub fn release(&self, vcpu: usize) {
        let _ = self.alone.compare_exchange(vcpu, NONE, SeqCst, SeqCst);
        if self.token_holder() == Some(vcpu) {
            self.token_view.store(0, SeqCst);
            self.token.store(NONE, SeqCst);
        }
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

    #[test]
    fn one_token_holder_at_a_time_and_it_excludes_no_one() {
        let e = Exclusive::default();
        assert!(e.take_token(1));
        e.token_runs(1, Some(7));
        e.token_runs(0, Some(8));
        assert!(e.other_runs(0, 7) && !e.other_runs(1, 7) && !e.other_runs(0, 8), "only the holder's view counts");
        assert!(e.take_token(1), "its own already");
        assert!(!e.take_token(0), "held by another: vCPU 0 must run alone instead");
        assert!(!e.excludes(0) && !e.excludes(1), "the token keeps no vCPU out of the kernel view");
        assert_eq!(e.token_holder(), Some(1));
        e.release(0);
        assert_eq!(e.token_holder(), Some(1), "only the holder gives it back");
        e.release(1);
        assert_eq!(e.token_holder(), None);
        assert!(!e.other_runs(0, 7), "given back with the view");
        assert!(e.take_token(0));
    }

    /// A thread standing in for a CPU enters its guest, as `vmm::run_slot`
    /// does: marks itself inside, catches up, and stays out (unmarked)
    /// while another vCPU runs the guest alone.
    fn enter(s: &Signals, e: &Exclusive, cpu: usize) -> bool {
        if let Some(epoch) = s.entering(cpu) {
            s.caught_up(cpu, epoch);
        }
        if e.excludes(cpu) {
            s.left(cpu);
            std::thread::yield_now();
            return false;
        }
        true
    }

    /// What the threads standing in for CPUs share: per CPU, whether it
    /// runs guest code, a module's view, and a kick on its way.
    struct Machine {
        s: Signals,
        e: Exclusive,
        inside: Vec<AtomicBool>,
        in_module: Vec<AtomicBool>,
        nmi: Vec<AtomicBool>,
        lock: spin::Mutex<()>,
        stop: AtomicBool,
    }

    fn machine(cpus: usize) -> Arc<Machine> {
        let flags = || (0..cpus).map(|_| AtomicBool::new(false)).collect();
        Arc::new(Machine {
            s: Signals::new(),
            e: Exclusive::default(),
            inside: flags(),
            in_module: flags(),
            nmi: flags(),
            lock: spin::Mutex::new(()),
            stop: AtomicBool::new(false),
        })
    }

    /// Runs `cpu` on a thread per CPU of a [`machine`] for three seconds,
    /// then stops them; what each returned. `panicked` says what a thread's
    /// panic (a failed assertion) meant.
    fn on_each_cpu<T: Send + 'static>(
        cpus: usize,
        panicked: &str,
        cpu: impl Fn(usize, &Machine) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let (m, cpu) = (machine(cpus), Arc::new(cpu));
        let threads: Vec<_> = (0..cpus)
            .map(|c| {
                let (m, cpu) = (m.clone(), cpu.clone());
                std::thread::spawn(move || cpu(c, &m))
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_secs(3));
        m.stop.store(true, SeqCst);
        threads.into_iter().map(|t| t.join().expect(panicked)).collect()
    }

    /// "Guest code": runs until a kick (the NMI) or a while.
    fn guest_code(kick: &AtomicBool, spins: u32) {
        for _ in 0..spins {
            if kick.swap(false, SeqCst) {
                return;
            }
            core::hint::spin_loop();
        }
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
        let holds: usize = on_each_cpu(CPUS, "a CPU ran while another held", |cpu, m| {
            let (s, e, inside, nmi, lock, stop) = (&m.s, &m.e, &m.inside, &m.nmi, &m.lock, &m.stop);
            let mut holds = 0;
            let mut round = 0u32;
            while !stop.load(SeqCst) {
                round = round.wrapping_add(1);
                if !enter(s, e, cpu) {
                    continue;
                }
                inside[cpu].store(true, SeqCst);
                guest_code(&nmi[cpu], 5000);
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
                    e.take(cpu, s, &CpuSet::first(CPUS), cpu, &send, &mut |_| false);
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
        .into_iter()
        .sum();
        assert!(holds > 0, "no CPU ever took the guest");
    }

    /// Threads stand in for four vCPUs, as `vmm::dispatch` uses the token:
    /// each runs "guest code" in the kernel view or, holding the token, in
    /// a module's view; at an exit (under the lock) it wants a module's
    /// view now and then, and waits outside the lock while another holds
    /// the token; back in the kernel view it releases. Now and then one
    /// runs the guest alone. At no time do two run a module's view, nor
    /// does any run while one runs alone; and every vCPU gets the token.
    #[test]
    fn one_vcpu_runs_a_modules_view_while_the_others_run_the_kernels() {
        const CPUS: usize = 4;
        let tokens = on_each_cpu(CPUS, "two vCPUs ran module views at once", |cpu, m| {
            let (s, e, inside, nmi, lock, stop) = (&m.s, &m.e, &m.inside, &m.nmi, &m.lock, &m.stop);
            let in_module = &m.in_module;
            let (mut module, mut tokens, mut round) = (false, 0u32, 0u32);
            while !stop.load(SeqCst) {
                round = round.wrapping_add(1);
                if !enter(s, e, cpu) {
                    continue;
                }
                // Guest code, in the view this vCPU is in.
                inside[cpu].store(true, SeqCst);
                if module {
                    assert!(!in_module[cpu].swap(true, SeqCst));
                    for other in (0..CPUS).filter(|&o| o != cpu) {
                        assert!(!in_module[other].load(SeqCst), "{other} runs a module's view with {cpu}");
                    }
                }
                guest_code(&nmi[cpu], 200);
                in_module[cpu].store(false, SeqCst);
                inside[cpu].store(false, SeqCst);
                s.nmi_arrived(cpu);
                s.left(cpu);
                // The exit.
                let wants_module = !module && round.is_multiple_of(2);
                let guard = lock.lock();
                if e.excludes(cpu) || (wants_module && e.token_holder().is_some_and(|h| h != cpu)) {
                    drop(guard);
                    std::thread::yield_now();
                    continue;
                }
                if wants_module {
                    assert!(e.take_token(cpu), "free under the lock");
                    module = true;
                    tokens += 1;
                } else if module && round.is_multiple_of(3) {
                    module = false;
                }
                if round.is_multiple_of(97) {
                    let send = |c: usize| nmi[c].store(true, SeqCst);
                    e.take(cpu, s, &CpuSet::first(CPUS), cpu, &send, &mut |_| false);
                    for other in (0..CPUS).filter(|&o| o != cpu) {
                        assert!(!inside[other].load(SeqCst), "{other} runs while {cpu} runs alone");
                    }
                }
                if !module {
                    e.release(cpu);
                } else if e.holder() == Some(cpu) {
                    // Alone only for this exit: give back the rest.
                    e.alone.store(NONE, SeqCst);
                }
                drop(guard);
            }
            tokens
        });
        assert!(tokens.iter().all(|&t| t > 0), "a vCPU never got the token: {tokens:?}");
    }
}
