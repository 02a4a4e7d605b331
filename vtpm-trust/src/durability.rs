//! The durability protocol: no state change the vTPM acknowledged to the
//! guest is ever lost to a power cut, and no older state is accepted once
//! a newer one was acknowledged (where a counter exists to tell).
//!
//! # Parties
//! * The hypervisor, which runs the vTPM and drives this state machine.
//! * The guest's **store service**, a process in the guest that asks the
//!   hypervisor for sealed blobs ([`crate::blob`]), writes each to the
//!   guest's disk, `fsync`s it (file and directory, after a rename over
//!   the previous blob) and reports the version it stored. It is
//!   untrusted: it can lie, lose blobs, or hand back any blob it ever saw.
//! * A **counter** that survives power cuts and that the guest cannot
//!   touch: the newest committed version. Blobs below it are refused
//!   ([`crate::blob::BlobError::Stale`]). A platform TPM's monotonic
//!   counter is one; without one, the hypervisor keeps the counter in
//!   memory only and rollback across reboots goes undetected (it says so).
//!
//! # Protocol
//! 1. A command that changes nothing durable (PCRs, sessions, GetRandom,
//!    loaded keys, reads) is answered at once ([`Step::Release`]).
//! 2. A command that changed the durable state (TakeOwnership, NV writes,
//!    ChangeAuth, OwnerClear, SaveState, ...) has its response **held**
//!    ([`Step::Hold`]). No other command runs meanwhile: the TIS has one
//!    command in flight, and the next is answered TPM_RETRY.
//! 3. The store service asks for work ([`Durability::next_store`]); the
//!    hypervisor seals the current state as the version given, hands the
//!    blob over, and keeps it to hand over again unchanged if asked again
//!    before a report ([`Store::Resend`]).
//! 4. The store service reports that version stored ([`Durability::stored`]);
//!    the hypervisor makes the counter that version, durably
//!    ([`Step::AdvanceCounter`]), then calls [`Durability::counter_advanced`].
//! 5. Once a blob that holds the change is committed, the response is
//!    released ([`Step::Release`]).
//!
//! # The fence
//! At boot the hypervisor opens the blob GRUB handed it with
//! `minimum = counter`. The first blob stored in a boot is the **fence**,
//! version `counter + 2`: at most one blob beyond the counter can exist
//! (step 2 holds everything back until its commit), so `counter + 2` is
//! above every version the previous boot left behind, and committing it
//! makes every blob written before this boot stale. A change is released
//! only after a commit that follows the fence (version `counter + 3` or
//! later), never by the fence itself: another boot cut short may have left
//! a different fence of the same version, and only what comes after it
//! cannot collide with anything.
//!
//! Commands that change nothing run before the fence is committed, so the
//! guest's kernel can probe and measure into its vTPM before its store
//! service starts. Until then the loaded state is not pinned: a power cut
//! before the fence's commit may bring back an older blob at the next boot,
//! which lacks only changes the previous boot never acknowledged.
//!
//! Why each order: writing the blob before advancing the counter means a
//! cut between the two leaves the old state acceptable, so the guest always
//! boots; advancing the counter before releasing means that once the
//! guest has seen a response, every older blob is refused. A cut after the
//! store but before the release may keep a change the guest never saw
//! acknowledged, as a real TPM may when power fails during its NV write.
//!
//! # Without a store service
//! A guest configured volatile gets [`Durability::volatile`]: responses
//! are released at once and the state lives until the host powers off.
//! The security-configuration measurement records it (`vtpm=volatile` in
//! `ctvm.config`), so a remote verifier can refuse such a guest. A durable
//! guest whose store service never runs, or disappears mid-exchange,
//! keeps its response held: its TPM driver times out and later commands
//! are answered TPM_RETRY, fail-closed, until the store service answers;
//! the held blob is resent unchanged.
//!
//! A store service that acknowledges without writing only hurts its own
//! guest: at the next boot its blob is stale or missing, and the vTPM
//! refuses to start on older state (it never silently rolls back).

/// What the hypervisor must do with the response of the command that just
/// ran, or after a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Release the held (or just computed) response to the guest.
    Release,
    /// Hold the response until a later step releases it.
    Hold,
    /// Make the counter this value, durably, then call
    /// [`Durability::counter_advanced`].
    AdvanceCounter { to: u64 },
    /// Nothing to do: wait for the store service.
    Wait,
}

/// What to hand the store service when it asks for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// Seal the vTPM's current state as this version, keep the blob, and
    /// hand it over.
    Seal(u64),
    /// Hand over the blob of this version sealed before, unchanged.
    Resend(u64),
}

/// Where the exchange with the store service is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No blob outstanding.
    Idle,
    /// A blob of this version is with the store service.
    Storing(u64),
    /// The counter is being advanced to this version.
    Advancing(u64),
}

/// Why a call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// A command arrived while a response is held.
    Busy,
    /// A store report or counter value that is not the one expected (a
    /// lying or confused store service): ignored.
    Unexpected,
}

/// The hypervisor's side of the protocol for one vTPM.
#[derive(Clone, Debug)]
pub struct Durability {
    /// The newest committed version.
    counter: u64,
    /// The version the fence is stored as; None once it is committed.
    fence: Option<u64>,
    phase: Phase,
    /// A response is held.
    held: bool,
    /// The state changed since the last blob was sealed, or a held change
    /// still needs a store after the fence.
    dirty: bool,
    volatile: bool,
}

impl Durability {
    /// A boot with a store service. `counter` is the committed version:
    /// the state the vTPM starts from is the blob opened with
    /// `minimum = counter`, or a new chip. The first store is the fence,
    /// at `counter + 2`.
    pub fn boot(counter: u64) -> Self {
        Durability {
            counter,
            fence: Some(counter.saturating_add(2)),
            phase: Phase::Idle,
            held: false,
            dirty: false,
            volatile: false,
        }
    }

    /// A boot without a store service: nothing is persisted, every
    /// response is released at once.
    pub fn volatile() -> Self {
        Durability { counter: 0, fence: None, phase: Phase::Idle, held: false, dirty: false, volatile: true }
    }

    /// True when the vTPM has no store service.
    pub fn is_volatile(&self) -> bool {
        self.volatile
    }

    /// The committed version as this side knows it.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// True once the boot's fence is committed: the loaded state is pinned.
    pub fn fenced(&self) -> bool {
        self.fence.is_none()
    }

    /// True while a response is held.
    pub fn holding(&self) -> bool {
        self.held
    }

    /// True when the vTPM may execute the guest's next command: no
    /// response is held.
    pub fn may_execute(&self) -> bool {
        !self.held
    }

    /// A command ran; `changed` says whether it changed the durable state
    /// (vtpm-core's `permanent_dirty`, or a new saved state).
    pub fn command_done(&mut self, changed: bool) -> Result<Step, ProtocolError> {
        if self.held {
            return Err(ProtocolError::Busy);
        }
        if !changed || self.volatile {
            return Ok(Step::Release);
        }
        self.held = true;
        self.dirty = true;
        Ok(Step::Hold)
    }

    /// What [`Durability::next_store`] would answer now, without taking it.
    pub fn peek_store(&self) -> Option<Store> {
        if self.volatile {
            return None;
        }
        match self.phase {
            Phase::Storing(v) => Some(Store::Resend(v)),
            Phase::Advancing(_) => None,
            Phase::Idle => match self.fence {
                Some(fence) => Some(Store::Seal(fence)),
                None if self.dirty => Some(Store::Seal(self.counter.saturating_add(1))),
                None => None,
            },
        }
    }

    /// The store service asks for work: what to hand it, or None when
    /// there is nothing to store.
    pub fn next_store(&mut self) -> Option<Store> {
        if self.volatile {
            return None;
        }
        match self.phase {
            Phase::Storing(v) => return Some(Store::Resend(v)),
            Phase::Advancing(_) => return None,
            Phase::Idle => {}
        }
        let version = match self.fence {
            Some(fence) => fence,
            None if self.dirty => self.counter.saturating_add(1),
            None => return None,
        };
        self.dirty = false;
        self.phase = Phase::Storing(version);
        Some(Store::Seal(version))
    }

    /// The store service reports `version` written and synced. Repeating
    /// the report while the counter is being advanced asks for the same
    /// advance again (a counter write that failed is retried).
    pub fn stored(&mut self, version: u64) -> Result<Step, ProtocolError> {
        match self.phase {
            Phase::Storing(v) | Phase::Advancing(v) if v == version => {
                self.phase = Phase::Advancing(version);
                Ok(Step::AdvanceCounter { to: version })
            }
            _ => Err(ProtocolError::Unexpected),
        }
    }

    /// The counter now durably holds `to`.
    pub fn counter_advanced(&mut self, to: u64) -> Result<Step, ProtocolError> {
        match self.phase {
            Phase::Advancing(v) if v == to => {
                self.counter = to;
                self.phase = Phase::Idle;
                if self.fence == Some(to) {
                    self.fence = None;
                    // A change held across the fence is released only by a
                    // later commit (see the module documentation).
                    if self.held {
                        self.dirty = true;
                    }
                }
                if self.held && !self.dirty {
                    self.held = false;
                    Ok(Step::Release)
                } else {
                    Ok(Step::Wait)
                }
            }
            _ => Err(ProtocolError::Unexpected),
        }
    }

    /// The version being stored, if a blob is with the store service.
    pub fn in_flight(&self) -> Option<u64> {
        match self.phase {
            Phase::Storing(v) => Some(v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    //! A model of the whole system (hypervisor, vTPM, store service, disk,
    //! counter, an adversarial guest) in which power is cut at every step
    //! of every exchange, over three boots, each rebooted with every blob
    //! the guest could hand back.

    use super::*;
    use crate::blob::{self, BlobError, StateKey};
    use alloc::collections::BTreeSet;
    use alloc::vec::Vec;

    /// The vTPM's durable state in the model: the ids of the changes
    /// applied, in order.
    type State = Vec<u32>;

    fn encode(s: &State) -> Vec<u8> {
        s.iter().flat_map(|c| c.to_be_bytes()).collect()
    }

    fn decode(b: &[u8]) -> State {
        b.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect()
    }

    fn key() -> StateKey {
        StateKey::derive(&[3; 32])
    }

    /// Everything that survives a power cut, plus what the guest saw.
    #[derive(Clone, Debug, Default)]
    struct World {
        /// Every blob that was ever fsync'd: the adversarial store service
        /// may hand back any of them.
        synced: Vec<Vec<u8>>,
        /// The newest fsync'd blob: what an honest store service returns.
        latest: Option<Vec<u8>>,
        counter: u64,
        /// Changes whose responses the guest received.
        acknowledged: BTreeSet<u32>,
    }

    impl World {
        /// Nothing was ever acknowledged: a first boot may make a new chip.
        fn fresh(&self) -> bool {
            self.counter == 0 && self.acknowledged.is_empty()
        }
    }

    /// One running boot.
    struct Machine {
        d: Durability,
        state: State,
        /// The change whose response is held (None: a held read never
        /// happens, reads are released at once).
        held: Option<u32>,
        /// The blob with the store service, kept for a resend.
        outbox: Option<(u64, Vec<u8>)>,
    }

    /// A guest command; `Some(id)` if it changes durable state.
    type Event = Option<u32>;

    /// The protocol's side effects, performed one at a time so that power
    /// can be cut between any two.
    #[derive(Clone, Debug)]
    enum Action {
        /// The store service writes and fsyncs the blob, then reports.
        StoreAndReport(u64),
        /// The counter is written, then the hypervisor is told.
        WriteCounter(u64),
        /// The guest receives the held response.
        Deliver,
    }

    /// Boots on the blob the guest hands over. None when the vTPM refuses
    /// to start (a stale blob, or none on a machine that had a vTPM):
    /// fail-closed, never a rollback.
    fn boot(world: &World, blob: Option<&Vec<u8>>) -> Option<Machine> {
        let state = match blob {
            Some(b) => match blob::open(&key(), "guest", world.counter, b) {
                Ok(o) => decode(&o.plaintext),
                Err(BlobError::Stale { .. }) => return None,
                Err(e) => panic!("unexpected refusal {e:?}"),
            },
            None if world.fresh() => State::new(),
            None => return None,
        };
        Some(Machine { d: Durability::boot(world.counter), state, held: None, outbox: None })
    }

    impl Machine {
        fn follow(&mut self, step: Step) -> Vec<Action> {
            match step {
                Step::AdvanceCounter { to } => alloc::vec![Action::WriteCounter(to)],
                Step::Release => alloc::vec![Action::Deliver],
                Step::Hold | Step::Wait => Vec::new(),
            }
        }

        /// The store service asks for work; returns its action, if any.
        fn poll(&mut self) -> Option<Action> {
            // What a caller peeks first (an anchor's record) is what it gets.
            let peeked = self.d.peek_store();
            assert_eq!(peeked, self.d.clone().next_store());
            let v = match self.d.next_store()? {
                Store::Seal(v) => {
                    let nonce = [(v as u8) ^ (self.state.len() as u8); 12];
                    let b = blob::seal(&key(), "guest", v, &encode(&self.state), nonce).unwrap();
                    self.outbox = Some((v, b));
                    v
                }
                Store::Resend(v) => {
                    assert_eq!(self.outbox.as_ref().map(|o| o.0), Some(v), "a resend is the kept blob");
                    v
                }
            };
            Some(Action::StoreAndReport(v))
        }

        fn perform(&mut self, a: &Action, w: &mut World) -> Vec<Action> {
            match *a {
                Action::StoreAndReport(v) => {
                    let (_, b) = self.outbox.clone().expect("a blob in flight");
                    w.synced.push(b.clone());
                    w.latest = Some(b);
                    let step = self.d.stored(v).unwrap();
                    self.follow(step)
                }
                Action::WriteCounter(v) => {
                    w.counter = v;
                    let step = self.d.counter_advanced(v).unwrap();
                    self.follow(step)
                }
                Action::Deliver => {
                    if let Some(id) = self.held.take() {
                        w.acknowledged.insert(id);
                    }
                    Vec::new()
                }
            }
        }

        fn command(&mut self, e: Event) -> Vec<Action> {
            assert!(self.d.may_execute(), "a command ran while a response was held");
            if let Some(id) = e {
                self.state.push(id);
            }
            let step = self.d.command_done(e.is_some()).unwrap();
            if step == Step::Hold {
                self.held = e;
            }
            self.follow(step)
        }
    }

    /// Boots on `handed`, runs `events` with the store service starting
    /// after `service_from` of them (or when a held response would wait
    /// for it forever), cutting power after `cut` steps. Returns the world
    /// the cut left and whether it was cut; None when the vTPM refused.
    fn run(
        world: &World,
        handed: Option<&Vec<u8>>,
        events: &[Event],
        service_from: usize,
        cut: usize,
    ) -> Option<(World, bool)> {
        let mut w = world.clone();
        let mut m = boot(&w, handed)?;
        let mut pending: Vec<Action> = Vec::new();
        let (mut done, mut next) = (0usize, 0usize);
        loop {
            let service = next >= service_from || !m.d.may_execute();
            let action = if !pending.is_empty() {
                Some(pending.remove(0))
            } else if service {
                m.poll()
            } else {
                None
            };
            if done == cut && (action.is_some() || next < events.len()) {
                return Some((w, true));
            }
            match action {
                Some(a) => pending.extend(m.perform(&a, &mut w)),
                None if next < events.len() => {
                    pending = m.command(events[next]);
                    next += 1;
                }
                None => {
                    assert!(m.d.may_execute(), "a response held with nothing left to do");
                    return Some((w, false));
                }
            }
            done += 1;
        }
    }

    /// After a cut: every blob the guest could hand back either is refused
    /// (stale) or holds every acknowledged change; the newest synced blob
    /// always boots.
    fn check_reboot(w: &World) {
        for b in &w.synced {
            match blob::open(&key(), "guest", w.counter, b) {
                Ok(o) => {
                    let state: BTreeSet<u32> = decode(&o.plaintext).into_iter().collect();
                    assert!(
                        w.acknowledged.is_subset(&state),
                        "blob v{} accepted without acknowledged changes {:?} (has {:?}), counter {}",
                        o.version,
                        w.acknowledged,
                        state,
                        w.counter
                    );
                }
                Err(BlobError::Stale { .. }) => {}
                Err(e) => panic!("unexpected refusal {e:?}"),
            }
        }
        if let Some(latest) = &w.latest {
            assert!(blob::open(&key(), "guest", w.counter, latest).is_ok(), "the newest blob must boot");
        }
    }

    /// A reading command, two changes, a read, a change.
    fn script(first_id: u32) -> Vec<Event> {
        alloc::vec![None, Some(first_id), None, Some(first_id + 1), Some(first_id + 2), None]
    }

    /// The blobs a reboot may be handed: every synced blob the vTPM
    /// accepts (the adversary's choices, the honest newest one among them),
    /// and none at all on a fresh machine.
    fn choices(w: &World) -> Vec<Option<Vec<u8>>> {
        let mut v: Vec<Option<Vec<u8>>> =
            w.synced.iter().filter(|b| blob::open(&key(), "guest", w.counter, b).is_ok()).cloned().map(Some).collect();
        v.dedup();
        if w.fresh() {
            v.push(None);
        }
        v
    }

    /// Every cut point of one boot from `w` on `handed`; calls `then` with
    /// the world after each (checked) cut, and once with the uncut end.
    fn every_cut(
        w: &World,
        handed: Option<&Vec<u8>>,
        events: &[Event],
        service_from: usize,
        then: &mut dyn FnMut(&World, bool),
    ) -> usize {
        let mut runs = 0;
        for cut in 0.. {
            let (after, was_cut) = run(w, handed, events, service_from, cut).expect("an accepted blob must boot");
            check_reboot(&after);
            then(&after, was_cut);
            runs += 1;
            if !was_cut {
                for id in events.iter().flatten() {
                    assert!(after.acknowledged.contains(id), "change {id} was never acknowledged");
                }
                return runs;
            }
        }
        unreachable!()
    }

    #[test]
    fn no_acknowledged_change_is_lost_to_a_cut_at_any_step_of_three_boots() {
        let mut runs = 0;
        for service_from in [0, 3] {
            runs += every_cut(&World::default(), None, &script(1), service_from, &mut |w1, _| {
                for b1 in choices(w1) {
                    runs += every_cut(w1, b1.as_ref(), &script(100), service_from, &mut |w2, _| {
                        for b2 in choices(w2) {
                            runs += every_cut(w2, b2.as_ref(), &[Some(200), None], 0, &mut |_, _| {});
                        }
                    });
                }
            });
        }
        assert!(runs > 10_000, "{runs} runs");
    }

    #[test]
    fn an_older_blob_is_refused_once_a_change_was_acknowledged() {
        let (w, cut) = run(&World::default(), None, &script(1), 0, usize::MAX).unwrap();
        assert!(!cut);
        let accepted = w.synced.iter().filter(|b| blob::open(&key(), "guest", w.counter, b).is_ok()).count();
        assert_eq!(accepted, 1, "only the newest blob opens");
    }

    #[test]
    fn the_fence_comes_first_and_a_held_change_waits_for_the_store_after_it() {
        let mut d = Durability::boot(10);
        assert!(!d.fenced());
        // Reads run before the store service ever asks.
        assert_eq!(d.command_done(false), Ok(Step::Release));
        // A change before the fence is held, and blocks the next command.
        assert_eq!(d.command_done(true), Ok(Step::Hold));
        assert_eq!(d.command_done(false), Err(ProtocolError::Busy));
        assert_eq!(d.next_store(), Some(Store::Seal(12)), "the fence, above any blob of the last boot");
        assert_eq!(d.next_store(), Some(Store::Resend(12)), "asked again: the same blob");
        assert_eq!(d.stored(11), Err(ProtocolError::Unexpected), "a report for another version");
        assert_eq!(d.stored(12), Ok(Step::AdvanceCounter { to: 12 }));
        assert_eq!(d.stored(12), Ok(Step::AdvanceCounter { to: 12 }), "a repeated report retries the counter");
        assert_eq!(d.next_store(), None, "nothing while the counter moves");
        assert_eq!(d.counter_advanced(11), Err(ProtocolError::Unexpected));
        assert_eq!(d.counter_advanced(12), Ok(Step::Wait), "the fence alone releases nothing");
        assert!(d.fenced() && d.holding());
        assert_eq!(d.next_store(), Some(Store::Seal(13)));
        assert_eq!(d.stored(13), Ok(Step::AdvanceCounter { to: 13 }));
        assert_eq!(d.counter_advanced(13), Ok(Step::Release));
        assert!(!d.holding() && d.may_execute());
        assert_eq!(d.next_store(), None, "nothing changed since");
        assert_eq!(d.command_done(true), Ok(Step::Hold));
        assert_eq!(d.next_store(), Some(Store::Seal(14)));
        assert_eq!(d.in_flight(), Some(14));
    }

    #[test]
    fn without_a_store_service_responses_are_released_at_once() {
        let mut d = Durability::volatile();
        assert!(d.is_volatile());
        assert_eq!(d.command_done(true), Ok(Step::Release));
        assert_eq!(d.command_done(false), Ok(Step::Release));
        assert_eq!(d.next_store(), None);
        assert_eq!(d.stored(1), Err(ProtocolError::Unexpected));
    }
}
