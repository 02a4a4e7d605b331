//! The durability protocol: no state change the vTPM acknowledged to the
//! guest is ever lost to a power cut, and no older state is ever accepted.
//!
//! # Parties
//! * The hypervisor, which runs the vTPM and drives this state machine.
//! * The guest's **store service**, a process in the guest that writes
//!   sealed blobs ([`crate::blob`]) to the guest's disk, `fsync`s them
//!   (file and directory, after a rename over the previous blob) and
//!   answers with the version it stored. It is untrusted: it can lie,
//!   lose blobs, or hand back any blob it ever saw.
//! * A **counter** that survives power cuts and that the guest cannot
//!   touch: the newest committed version. Blobs below it are refused
//!   ([`crate::blob::BlobError::Stale`]). Where it lives (platform TPM NV
//!   counter, a hypervisor-owned disk sector) is the hypervisor's choice.
//!
//! # Protocol
//! 1. A command that changes nothing durable (PCRs, sessions, GetRandom,
//!    loaded keys, ...) is answered at once.
//! 2. A command that changed the permanent state (TakeOwnership, NV writes,
//!    ChangeAuth, OwnerClear, the EK's first use, ...) has its response
//!    **held**. The state is sealed as version `counter + 1` and sent to
//!    the store service ([`Step::Store`]). No other command runs meanwhile:
//!    the TIS has one command in flight, and the next waits.
//! 3. When the store service reports that version stored, the counter is
//!    advanced to it ([`Step::AdvanceCounter`]).
//! 4. Once the counter is durable, the response is released
//!    ([`Step::Release`]).
//! 5. At boot the hypervisor opens the blob the store service hands it with
//!    `minimum = counter`, then **fences**: before the guest's first
//!    command it re-seals the loaded state as version `counter + 2` and
//!    commits it as in 2–4. At most one blob beyond the counter can exist
//!    (step 2 holds everything else back), so `counter + 2` is above every
//!    version ever written: no two different blobs ever share a version,
//!    and every blob written before the boot becomes stale.
//!
//! Why each order: writing the blob before advancing the counter means a
//! cut between the two leaves the old state acceptable, so the guest always
//! boots; advancing the counter before releasing means that once the
//! guest has seen a response, every older blob is refused. A cut after the
//! store but before the release may keep a change the guest never saw
//! acknowledged, as a real TPM may when power fails during its NV write.
//!
//! # Without a store service
//! If the guest runs no store service (none registered at boot, the common
//! case for a guest that does not care), responses are released at once
//! ([`Durability::volatile`]): the vTPM's state lives until the host
//! powers off, as the EK-only vTPM did before. The security-configuration
//! measurement records it (`vtpm=volatile` in `ctvm.config`), so a remote
//! verifier can refuse such a guest. A store service that disappears
//! mid-exchange leaves the response held: the guest's TPM driver times out
//! (TPM_TIMEOUT for long commands) and its later commands wait, fail-closed,
//! until the store service answers; the held blob is resent unchanged.
//!
//! A store service that acknowledges without writing only hurts its own
//! guest: at the next boot its blob is stale or missing, and the vTPM
//! refuses to start on older state (it never silently rolls back).

/// What the hypervisor must do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Release the held (or just computed) response to the guest.
    Release,
    /// Seal the vTPM's current state as this version and send it to the
    /// store service; hold the response.
    Store { version: u64 },
    /// Make the counter this value, durably, then call
    /// [`Durability::counter_advanced`].
    AdvanceCounter { to: u64 },
    /// Nothing to do: wait for the store service or the counter.
    Wait,
    /// The boot fence is committed: the guest may run.
    Ready,
}

/// Where the protocol is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Boot: the loaded state is not fenced yet.
    Booting,
    /// Commands run.
    Running,
    /// A blob of this version is with the store service.
    Storing { version: u64, fence: bool },
    /// The counter is being advanced to this version.
    Advancing { version: u64, fence: bool },
}

/// Why a call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// A command arrived while a store is in flight or before the fence.
    Busy,
    /// A store report or counter value that is not the one expected (a
    /// lying or confused store service): ignored.
    Unexpected,
}

/// The hypervisor's side of the protocol for one vTPM.
#[derive(Clone, Debug)]
pub struct Durability {
    counter: u64,
    phase: Phase,
    volatile: bool,
}

impl Durability {
    /// A boot with a store service. `counter` is the committed version;
    /// the state the vTPM starts from (the blob opened with
    /// `minimum = counter`, or a new chip when there is none) must be
    /// fenced: the returned step stores it as `counter + 2`.
    pub fn boot(counter: u64) -> (Self, Step) {
        let mut d = Durability { counter, phase: Phase::Booting, volatile: false };
        let version = counter.saturating_add(2);
        d.phase = Phase::Storing { version, fence: true };
        (d, Step::Store { version })
    }

    /// A boot without a store service: nothing is persisted, every
    /// response is released at once.
    pub fn volatile() -> Self {
        Durability { counter: 0, phase: Phase::Running, volatile: true }
    }

    /// True when the vTPM has no store service.
    pub fn is_volatile(&self) -> bool {
        self.volatile
    }

    /// The committed version as this side knows it.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// True when the vTPM may execute the guest's next command.
    pub fn may_execute(&self) -> bool {
        self.phase == Phase::Running
    }

    /// A command ran; `changed` says whether it changed the permanent
    /// state (vtpm-core's `permanent_dirty`).
    pub fn command_done(&mut self, changed: bool) -> Result<Step, ProtocolError> {
        if self.phase != Phase::Running {
            return Err(ProtocolError::Busy);
        }
        if !changed || self.volatile {
            return Ok(Step::Release);
        }
        let version = self.counter.saturating_add(1);
        self.phase = Phase::Storing { version, fence: false };
        Ok(Step::Store { version })
    }

    /// The store service reports `version` written and synced.
    pub fn stored(&mut self, version: u64) -> Result<Step, ProtocolError> {
        match self.phase {
            Phase::Storing { version: v, fence } if v == version => {
                self.phase = Phase::Advancing { version, fence };
                Ok(Step::AdvanceCounter { to: version })
            }
            _ => Err(ProtocolError::Unexpected),
        }
    }

    /// The counter now durably holds `to`.
    pub fn counter_advanced(&mut self, to: u64) -> Result<Step, ProtocolError> {
        match self.phase {
            Phase::Advancing { version, fence } if version == to => {
                self.counter = to;
                self.phase = Phase::Running;
                Ok(if fence { Step::Ready } else { Step::Release })
            }
            _ => Err(ProtocolError::Unexpected),
        }
    }

    /// The version being stored, to resend the same blob when the store
    /// service comes back.
    pub fn in_flight(&self) -> Option<u64> {
        match self.phase {
            Phase::Storing { version, .. } => Some(version),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    //! A model of the whole system (hypervisor, vTPM, store service, disk,
    //! counter, an adversarial guest) in which power is cut at every step
    //! of every exchange, and the machine rebooted with every blob the
    //! guest could hand back.

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

    /// One running boot.
    struct Machine {
        d: Durability,
        state: State,
        held: Option<u32>,
        in_flight: Option<Vec<u8>>,
    }

    const KEY: [u8; 32] = [3; 32];

    /// The events of a run, one per call to `step`; power can be cut
    /// before any of them.
    #[derive(Clone, Copy, Debug)]
    enum Event {
        /// The guest sends a command; `Some(id)` if it changes durable state.
        Command(Option<u32>),
    }

    /// Boots from what the world holds, as the hypervisor would with the
    /// blob `pick` chooses. Returns None if the vTPM refuses to start (a
    /// stale or forged blob): fail-closed, never a rollback.
    fn boot(world: &World, blob: Option<&Vec<u8>>) -> Option<(Machine, Vec<Action>)> {
        let key = StateKey::derive(&KEY);
        let state = match blob {
            Some(b) => match blob::open(&key, "guest", world.counter, b) {
                Ok(o) => decode(&o.plaintext),
                Err(BlobError::Stale { .. }) => return None,
                Err(e) => panic!("unexpected refusal {e:?}"),
            },
            // No blob: only right on a fresh machine (counter 0).
            None if world.counter == 0 => State::new(),
            None => return None,
        };
        let (d, step) = Durability::boot(world.counter);
        let mut m = Machine { d, state, held: None, in_flight: None };
        let actions = m.follow(step);
        Some((m, actions))
    }

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

    impl Machine {
        fn follow(&mut self, step: Step) -> Vec<Action> {
            match step {
                Step::Store { version } => {
                    let key = StateKey::derive(&KEY);
                    let nonce = [version as u8; 12];
                    self.in_flight = Some(blob::seal(&key, "guest", version, &encode(&self.state), nonce).unwrap());
                    alloc::vec![Action::StoreAndReport(version)]
                }
                Step::AdvanceCounter { to } => alloc::vec![Action::WriteCounter(to)],
                Step::Release => alloc::vec![Action::Deliver],
                Step::Wait | Step::Ready => Vec::new(),
            }
        }

        /// Performs one action against the world; returns the next ones.
        fn perform(&mut self, a: &Action, w: &mut World) -> Vec<Action> {
            match *a {
                Action::StoreAndReport(v) => {
                    let b = self.in_flight.take().expect("a blob in flight");
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
            assert!(self.d.may_execute(), "a command ran before the previous one was committed");
            let Event::Command(change) = e;
            if let Some(id) = change {
                self.state.push(id);
            }
            // Every command's response is held until Release.
            self.held = change;
            let step = self.d.command_done(change.is_some()).unwrap();
            self.follow(step)
        }
    }

    /// Boots with the blob the store service hands over (`Some(None)`: the
    /// honest newest one), runs `events`, cutting power after `cut` steps
    /// (or never). Returns the world as the cut left it, and whether it
    /// was cut; None when the vTPM refused that blob.
    fn run(world: &World, handed: Option<&Vec<u8>>, events: &[Event], cut: usize) -> Option<(World, bool)> {
        let mut w = world.clone();
        let (mut m, mut pending) = boot(&w, handed)?;
        let mut done = 0usize;
        let mut events = events.iter();
        loop {
            if let Some(a) = pending.first().cloned() {
                if done == cut {
                    return Some((w, true));
                }
                pending.remove(0);
                let more = m.perform(&a, &mut w);
                pending.extend(more);
                done += 1;
                continue;
            }
            match events.next() {
                Some(e) => {
                    if done == cut {
                        return Some((w, true));
                    }
                    pending = m.command(*e);
                    done += 1;
                }
                None => return Some((w, false)),
            }
        }
    }

    /// After a cut: every blob the guest could hand back either is refused
    /// (stale) or holds every acknowledged change; the newest synced blob
    /// always boots.
    fn check_reboot(w: &World) {
        let key = StateKey::derive(&KEY);
        // A version names one state: no two synced blobs share a version
        // with different contents (else the older could stand in for the
        // newer once the counter reaches that version).
        let mut seen = alloc::collections::BTreeMap::new();
        for b in &w.synced {
            let o = blob::open(&key, "guest", 0, b).unwrap();
            let prev = seen.insert(o.version, decode(&o.plaintext));
            assert!(prev.is_none_or(|p| p == decode(&o.plaintext)), "two states under version {}", o.version);
        }
        for b in &w.synced {
            match blob::open(&key, "guest", w.counter, b) {
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
            assert!(blob::open(&key, "guest", w.counter, latest).is_ok(), "the newest blob must boot");
        }
    }

    fn script(first_id: u32) -> Vec<Event> {
        alloc::vec![
            Event::Command(Some(first_id)),
            Event::Command(None),
            Event::Command(Some(first_id + 1)),
            Event::Command(Some(first_id + 2)),
            Event::Command(None),
        ]
    }

    /// The blobs a reboot may be handed: the honest newest one and every
    /// other synced blob the vTPM accepts (the adversary's choices).
    fn choices(w: &World) -> Vec<Vec<u8>> {
        let key = StateKey::derive(&KEY);
        let mut v: Vec<Vec<u8>> = w.latest.iter().cloned().collect();
        v.extend(w.synced.iter().filter(|b| blob::open(&key, "guest", w.counter, b).is_ok()).cloned());
        v
    }

    #[test]
    fn no_acknowledged_change_is_lost_to_a_cut_at_any_step() {
        // Every cut point of a first boot's run; after each, a reboot on
        // every blob the guest could hand back, every cut point of that
        // second run, and the adversary's choice checked after each cut.
        let (_, full) = run(&World::default(), None, &script(1), usize::MAX).unwrap();
        assert!(!full);
        let (mut first_cuts, mut second_runs) = (0, 0);
        for cut1 in 0.. {
            let (w1, cut) = run(&World::default(), None, &script(1), cut1).unwrap();
            check_reboot(&w1);
            let handed = choices(&w1);
            if w1.latest.is_none() {
                // Cut before the first fence reached the disk: a new chip.
                assert!(run(&w1, None, &script(100), usize::MAX).is_some(), "a new machine boots");
            }
            for b in &handed {
                for cut2 in 0.. {
                    let (w2, cut_again) = run(&w1, Some(b), &script(100), cut2).expect("an accepted blob must boot");
                    check_reboot(&w2);
                    second_runs += 1;
                    if !cut_again {
                        assert!([100, 101, 102].iter().all(|c| w2.acknowledged.contains(c)));
                        break;
                    }
                }
            }
            first_cuts += 1;
            if !cut {
                break;
            }
        }
        assert!(first_cuts > 10 && second_runs > 100, "{first_cuts} cuts, {second_runs} second runs");
    }

    #[test]
    fn an_older_blob_is_refused_once_a_change_was_acknowledged() {
        let (w, _) = run(&World::default(), None, &script(1), usize::MAX).unwrap();
        let key = StateKey::derive(&KEY);
        let stale = w.synced.iter().filter(|b| blob::open(&key, "guest", w.counter, b).is_err()).count();
        assert_eq!(stale, w.synced.len() - 1, "only the newest blob opens");
    }

    #[test]
    fn versions_are_never_reused_across_reboots() {
        // Cut right after a store reached the disk but before the counter
        // moved; the adversary boots the older blob; the fence must put the
        // next version above the unacknowledged one.
        let (w, _) = run(&World::default(), None, &script(1), usize::MAX).unwrap();
        let counter = w.counter;
        let (d, step) = Durability::boot(counter);
        assert_eq!(step, Step::Store { version: counter + 2 });
        let mut d = d;
        assert_eq!(d.command_done(true), Err(ProtocolError::Busy), "no command before the fence");
        assert_eq!(d.stored(counter + 1), Err(ProtocolError::Unexpected), "a store report for another version");
        assert_eq!(d.stored(counter + 2), Ok(Step::AdvanceCounter { to: counter + 2 }));
        assert_eq!(d.counter_advanced(counter + 2), Ok(Step::Ready));
        assert_eq!(d.command_done(true), Ok(Step::Store { version: counter + 3 }));
        assert_eq!(d.in_flight(), Some(counter + 3));
    }

    #[test]
    fn without_a_store_service_responses_are_released_at_once() {
        let mut d = Durability::volatile();
        assert!(d.is_volatile());
        assert_eq!(d.command_done(true), Ok(Step::Release));
        assert_eq!(d.command_done(false), Ok(Step::Release));
        assert_eq!(d.stored(1), Err(ProtocolError::Unexpected));
    }
}
