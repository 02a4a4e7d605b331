//! The guest's INIT, start-up and NMI IPIs, virtualised: each is posted to
//! the target vCPU's mailbox (never sent as a real INIT or SIPI, which
//! would take the CPU out of VMX), and the target applies them in order
//! before it next enters its guest, as the SDM describes a processor's
//! response (Vol. 3A, 9.4 and 11.6): INIT resets the processor into the
//! wait-for-SIPI state; a start-up IPI starts a processor that waits for
//! one, in real mode at `vector * 0x1000`, and is ignored by any other; an
//! NMI reaches a running processor.

use spin::Mutex;

/// An IPI for a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    Init,
    Startup(u8),
    Nmi,
}

/// Events the mailbox holds before the target takes them: more are
/// dropped (and counted), so a guest flooding its own vCPUs costs no
/// hypervisor memory.
const CAPACITY: usize = 16;

struct Queue {
    events: [Option<VcpuEvent>; CAPACITY],
    head: usize,
    len: usize,
    dropped: u64,
}

/// A vCPU's mailbox: any CPU posts, the vCPU's own CPU takes.
pub struct Mailbox(Mutex<Queue>);

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox(Mutex::new(Queue { events: [None; CAPACITY], head: 0, len: 0, dropped: 0 }))
    }
}

impl Mailbox {
    /// Queues an event; false (and counted) when the mailbox is full.
    pub fn post(&self, event: VcpuEvent) -> bool {
        let mut q = self.0.lock();
        if q.len == CAPACITY {
            q.dropped += 1;
            return false;
        }
        let at = (q.head + q.len) % CAPACITY;
        q.events[at] = Some(event);
        q.len += 1;
        true
    }

    /// Whether a start-up IPI waits to be taken (the sender repeats its
    /// doorbell until it is).
    pub fn startup_pending(&self) -> bool {
        let q = self.0.lock();
        (0..q.len).any(|i| matches!(q.events[(q.head + i) % CAPACITY], Some(VcpuEvent::Startup(_))))
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().len == 0
    }

    /// Events dropped because the mailbox was full.
    pub fn dropped(&self) -> u64 {
        self.0.lock().dropped
    }

    fn pop(&self) -> Option<VcpuEvent> {
        let mut q = self.0.lock();
        if q.len == 0 {
            return None;
        }
        let head = q.head;
        let e = q.events[head].take();
        q.head = (head + 1) % CAPACITY;
        q.len -= 1;
        e
    }
}

/// Where a vCPU is in the start-up protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// Running guest code (or halted in it).
    Running,
    /// Reset by INIT, waiting for a start-up IPI.
    WaitForSipi,
}

/// What the vCPU must do before it enters, after taking its mailbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Reset its state to the processor's INIT state.
    pub reset: bool,
    /// Start in real mode at `vector * 0x1000`.
    pub start: Option<u8>,
    /// Deliver an NMI to the guest.
    pub nmi: bool,
    /// Start-up IPIs that found the vCPU running, and were ignored.
    pub ignored_startups: u32,
}

/// Takes every event in the mailbox, in order, and says what they amount to.
/// Several INITs and start-ups in a row leave what the last of them leaves.
pub fn take(mailbox: &Mailbox, activity: &mut Activity) -> Changes {
    let mut c = Changes::default();
    while let Some(event) = mailbox.pop() {
        match event {
            VcpuEvent::Init => {
                c = Changes { reset: true, ignored_startups: c.ignored_startups, ..Changes::default() };
                *activity = Activity::WaitForSipi;
            }
            VcpuEvent::Startup(vector) if *activity == Activity::WaitForSipi => {
                c.start = Some(vector);
                *activity = Activity::Running;
            }
            VcpuEvent::Startup(_) => c.ignored_startups += 1,
            // A processor waiting for a SIPI does not take NMIs.
            VcpuEvent::Nmi => c.nmi |= *activity == Activity::Running,
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use VcpuEvent::*;

    fn run(events: &[VcpuEvent], mut activity: Activity) -> (Changes, Activity) {
        let m = Mailbox::default();
        for &e in events {
            assert!(m.post(e));
        }
        let c = take(&m, &mut activity);
        assert!(m.is_empty());
        (c, activity)
    }

    #[test]
    fn init_sipi_sipi_starts_once_at_the_first_vector() {
        let (c, a) = run(&[Init, Startup(0x9a), Startup(0x9b)], Activity::WaitForSipi);
        assert_eq!(c, Changes { reset: true, start: Some(0x9a), nmi: false, ignored_startups: 1 });
        assert_eq!(a, Activity::Running);
    }

    #[test]
    fn the_sequence_may_arrive_in_pieces() {
        let m = Mailbox::default();
        let mut a = Activity::Running;
        m.post(Init);
        assert_eq!(take(&m, &mut a), Changes { reset: true, ..Default::default() });
        assert_eq!(a, Activity::WaitForSipi);
        m.post(Startup(0x10));
        assert!(m.startup_pending());
        assert_eq!(take(&m, &mut a).start, Some(0x10));
        assert!(!m.startup_pending());
        m.post(Startup(0x10));
        assert_eq!(take(&m, &mut a), Changes { ignored_startups: 1, ..Default::default() });
    }

    #[test]
    fn a_sipi_without_init_is_ignored_and_init_after_start_resets() {
        assert_eq!(
            run(&[Startup(1)], Activity::Running),
            (Changes { ignored_startups: 1, ..Default::default() }, Activity::Running)
        );
        let (c, a) = run(&[Init, Startup(1), Init], Activity::Running);
        assert_eq!((c.reset, c.start, a), (true, None, Activity::WaitForSipi));
        let (c, a) = run(&[Init, Startup(1), Init, Startup(2)], Activity::Running);
        assert_eq!((c.reset, c.start, a), (true, Some(2), Activity::Running));
    }

    #[test]
    fn nmis_reach_running_vcpus_only() {
        assert!(run(&[Nmi], Activity::Running).0.nmi);
        assert!(!run(&[Nmi], Activity::WaitForSipi).0.nmi);
        // An NMI before an INIT is lost with the rest of the state.
        assert!(!run(&[Nmi, Init, Startup(3)], Activity::Running).0.nmi);
        assert!(run(&[Init, Startup(3), Nmi], Activity::Running).0.nmi);
    }

    #[test]
    fn a_flooded_mailbox_drops_and_counts() {
        let m = Mailbox::default();
        for _ in 0..CAPACITY {
            assert!(m.post(Nmi));
        }
        assert!(!m.post(Init));
        assert_eq!(m.dropped(), 1);
        let mut a = Activity::Running;
        assert!(take(&m, &mut a).nmi);
        assert!(m.post(Init));
    }
}
