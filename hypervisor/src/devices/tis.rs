//! The TPM Interface Specification (TIS 1.2) register model of a virtual TPM,
//! with the TIS 1.3 additions that a TPM 1.2 may have: XDATA_FIFO,
//! INTERFACE_ID and FIFO accesses of up to four bytes.
//!
//! A pure state machine: [`Tis::read`] and [`Tis::write`] take an offset into
//! the 20 KiB window at [`BASE`] and an access of 1, 2, 4 (or 8) bytes; a
//! complete command goes to a [`TpmBackend`] on `tpmGo` and its answer is
//! read back through the FIFO. Nothing here touches hardware, so every
//! sequence a driver can produce is testable on the host.
//!
//! # Choices, where the specification leaves room
//!
//! - **Locality 4** belongs to the processor (TXT's locality-4 cycles). As
//!   seen from software on real hardware, that page does not answer: guest
//!   reads there give all-ones and writes are ignored. The hypervisor
//!   reaches the vTPM through the backend directly, never through this page.
//! - **One command buffer, owned by the active locality.** When the active
//!   locality changes (relinquish, hand-over, seize) the command in progress
//!   is aborted and the buffer forgotten, so one locality never reads
//!   another's response.
//! - **Reads of a locality that is not active**: STS and the FIFOs read
//!   all-ones (a driver that forgot to request the locality sees an invalid
//!   status, as on hardware); ACCESS, the interrupt registers and the
//!   identification registers read normally. Writes to anything but ACCESS
//!   from a locality that is not active are ignored.
//! - **Framing.** `Expect` stays 1 until the 10-byte header's `paramSize`
//!   bytes have arrived. A header whose `paramSize` is below 10 or above the
//!   4096-byte buffer drops `Expect` at once (a driver checking `Expect`
//!   stops sending); bytes written while `Expect` is 0 are dropped and mark
//!   the command as over-long. On `tpmGo` such a command never reaches the
//!   backend: the answer is a 10-byte `TPM_BAD_PARAM_SIZE` error, so the
//!   backend only ever sees well-framed commands of 10..=4096 bytes.
//! - **Responses** must be 10..=4096 bytes with a `paramSize` equal to their
//!   length; anything else from the backend is replaced by a `TPM_FAIL`
//!   error, so a driver never reads a truncated or inconsistent answer.
//! - **burstCount** is what can move without waiting (free buffer space
//!   while receiving, bytes left while answering), capped at 255 so that a
//!   driver reading only the low byte, or the two bytes separately, never
//!   sees 0 or an overstated count. 0 only when nothing can move.
//! - **stsValid** is always 1: `dataAvail` and `Expect` are always valid
//!   when read.
//! - **Execution**: a backend may hold a response ([`TpmBackend::submit`]
//!   returns `None`: a durable vTPM waits until its state is on disk). The
//!   command then shows as executing (stsValid, no dataAvail, burstCount 0)
//!   and the backend is asked at each access whether the response is
//!   there. commandReady during execution aborts the wait, as TIS allows:
//!   the response, when it comes, is dropped.
//! - **STS writes** act only when exactly one of commandReady, tpmGo and
//!   responseRetry is set; other combinations are ignored.
//! - **Interrupts**: an event sets its INT_STATUS bit only when
//!   INT_ENABLE has both the event and globalIntEnable set (as QEMU does);
//!   [`Tis::pending_interrupt`] reports the SIRQ number while any enabled
//!   status bit is set. INT_VECTOR 0 means no line: nothing is reported.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// The guest-physical base of the TIS window.
pub const BASE: u64 = 0xFED4_0000;
/// Five localities of 4 KiB each.
pub const SIZE: u64 = 0x5000;
/// Localities 0..=3 answer the guest; locality 4 is the processor's.
pub const GUEST_LOCALITIES: u8 = 4;
/// The locality of the hypervisor's own commands
/// ([`TpmBackend::execute_platform`]): the processor's, beyond
/// [`GUEST_LOCALITIES`], so no guest access ever carries it.
pub const PLATFORM_LOCALITY: u8 = GUEST_LOCALITIES;
/// The command/response buffer (Linux's TPM_BUFSIZE, QEMU's TIS buffer).
pub const BUFFER_SIZE: usize = 4096;
/// Largest burstCount reported (see the module documentation).
pub const MAX_BURST: u16 = 0xff;

/// DID_VID as QEMU's TIS reports it: vendor 0x1014 (IBM), device 0x0001.
/// Not Intel's 0x8086 (iTPM quirks) nor a vendor with Linux quirks.
pub const DID_VID: u32 = 0x0001_1014;
/// Revision ID.
pub const RID: u8 = 0x01;
/// INTF_CAPABILITY as QEMU reports for a TPM 1.2: interface version TIS 1.3
/// (bits 30:28 = 010), transfer sizes up to 64 bytes (bits 10:9), command
/// ready (7), low-level (4), locality change (2), stsValid (1) and
/// dataAvail (0) interrupts, dynamic burstCount (bit 8 clear).
pub const INTF_CAPABILITY: u32 = 0x2000_0697;
/// INTERFACE_ID for a TPM 1.2 behind TIS 1.3: interface type 1111b ("FIFO
/// as in TIS 1.3"), all other bits 1 (as QEMU).
pub const INTERFACE_ID: u32 = 0xffff_ffff;

/// TPM 1.2 return codes this model produces itself.
pub const TPM_FAIL: u32 = 0x09;
pub const TPM_BAD_PARAM_SIZE: u32 = 0x19;
const TPM_TAG_RSP_COMMAND: u16 = 0x00c4;
const HEADER_SIZE: usize = 10;

/// TPM_ACCESS_x bits.
pub mod access {
    /// Reads 1: no dynamic root of trust was established in this vTPM.
    pub const ESTABLISHMENT: u8 = 0x01;
    pub const REQUEST_USE: u8 = 0x02;
    pub const PENDING_REQUEST: u8 = 0x04;
    pub const SEIZE: u8 = 0x08;
    pub const BEEN_SEIZED: u8 = 0x10;
    pub const ACTIVE_LOCALITY: u8 = 0x20;
    pub const VALID: u8 = 0x80;
}

/// TPM_STS_x bits (low byte; burstCount is bits 23:8).
pub mod sts {
    pub const VALID: u8 = 0x80;
    pub const COMMAND_READY: u8 = 0x40;
    pub const GO: u8 = 0x20;
    pub const DATA_AVAIL: u8 = 0x10;
    pub const EXPECT: u8 = 0x08;
    pub const RESPONSE_RETRY: u8 = 0x02;
}

/// TPM_INT_ENABLE_x / TPM_INT_STATUS_x bits.
pub mod int {
    pub const GLOBAL_ENABLE: u32 = 1 << 31;
    pub const COMMAND_READY: u32 = 0x80;
    /// typePolarity, bits 4:3 (01 = low level, the reset value).
    pub const POLARITY_MASK: u32 = 0x18;
    pub const POLARITY_LOW_LEVEL: u32 = 0x08;
    pub const LOCALITY_CHANGE: u32 = 0x04;
    pub const STS_VALID: u32 = 0x02;
    pub const DATA_AVAIL: u32 = 0x01;
    /// The interrupt sources this model can raise.
    pub const SOURCES: u32 = COMMAND_READY | LOCALITY_CHANGE | STS_VALID | DATA_AVAIL;
}

/// What executes complete commands: the vTPM.
pub trait TpmBackend {
    /// Runs one command (10..=4096 bytes, `paramSize` equal to its length)
    /// sent from `locality` (0..=3) and returns the response at once.
    fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8>;

    /// Starts one command from the guest. `None` when the response is held
    /// (a durable vTPM waits for its store service): the TIS then shows the
    /// command executing and asks [`TpmBackend::poll`] at each access.
    fn submit(&mut self, locality: u8, command: &[u8]) -> Option<Vec<u8>> {
        Some(self.execute(locality, command))
    }

    /// The held response, once released.
    fn poll(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// The guest's store service's side of a durable vTPM.
    fn store(&mut self) -> Option<&mut dyn crate::tpm::durable::StoreChannel> {
        None
    }

    /// A durable vTPM's account of its changes and its store service.
    fn durable_report(&self) -> Option<crate::tpm::durable::DurableReport> {
        None
    }

    /// Runs one of the hypervisor's own commands from
    /// [`PLATFORM_LOCALITY`], which no page of this TIS gives the guest:
    /// Startup and the measurements into PCRs the guest may not change.
    /// They change no durable state, so a durable vTPM runs them at once,
    /// even while it holds a guest's response.
    fn execute_platform(&mut self, command: &[u8]) -> Vec<u8> {
        self.execute(PLATFORM_LOCALITY, command)
    }
}

impl<T: TpmBackend + ?Sized> TpmBackend for Box<T> {
    fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
        (**self).execute(locality, command)
    }

    fn submit(&mut self, locality: u8, command: &[u8]) -> Option<Vec<u8>> {
        (**self).submit(locality, command)
    }

    fn poll(&mut self) -> Option<Vec<u8>> {
        (**self).poll()
    }

    fn execute_platform(&mut self, command: &[u8]) -> Vec<u8> {
        (**self).execute_platform(command)
    }

    fn store(&mut self) -> Option<&mut dyn crate::tpm::durable::StoreChannel> {
        (**self).store()
    }

    fn durable_report(&self) -> Option<crate::tpm::durable::DurableReport> {
        (**self).durable_report()
    }
}

/// The registers of one locality's page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    Access,
    IntEnable,
    IntVector,
    IntStatus,
    IntfCapability,
    Sts,
    DataFifo,
    InterfaceId,
    XDataFifo,
    DidVid,
    Rid,
}

/// Who may read a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadRule {
    /// Any guest locality, active or not.
    Any,
    /// Only the active locality; others read all-ones.
    Active,
}

/// Who may write a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteRule {
    ReadOnly,
    /// Any guest locality (requests, relinquish, seize).
    Any,
    /// Only the active locality; other writes are ignored.
    Active,
}

/// One row of the register table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterInfo {
    /// Offset inside each locality's 4 KiB page; always 4-byte aligned.
    pub offset: u16,
    /// Width in bytes; bytes past it (up to the next dword) read 0.
    pub width: u8,
    pub name: &'static str,
    pub register: Register,
    pub read: ReadRule,
    pub write: WriteRule,
}

const fn reg(
    offset: u16,
    width: u8,
    name: &'static str,
    register: Register,
    read: ReadRule,
    write: WriteRule,
) -> RegisterInfo {
    RegisterInfo { offset, width, name, register, read, write }
}

/// The registers present in localities 0..=3 (TIS 1.2 table 6, plus TIS
/// 1.3's INTERFACE_ID and XDATA_FIFO). Everything else reads 0 and ignores
/// writes.
pub const REGISTERS: [RegisterInfo; 11] = {
    use ReadRule as R;
    use Register::*;
    use WriteRule as W;
    [
        reg(0x000, 1, "ACCESS", Access, R::Any, W::Any),
        reg(0x008, 4, "INT_ENABLE", IntEnable, R::Any, W::Active),
        reg(0x00c, 1, "INT_VECTOR", IntVector, R::Any, W::Active),
        reg(0x010, 4, "INT_STATUS", IntStatus, R::Any, W::Active),
        reg(0x014, 4, "INTF_CAPABILITY", IntfCapability, R::Any, W::ReadOnly),
        reg(0x018, 4, "STS", Sts, R::Active, W::Active),
        reg(0x024, 4, "DATA_FIFO", DataFifo, R::Active, W::Active),
        reg(0x030, 4, "INTERFACE_ID", InterfaceId, R::Any, W::ReadOnly),
        reg(0x080, 4, "XDATA_FIFO", XDataFifo, R::Active, W::Active),
        reg(0xf00, 4, "DID_VID", DidVid, R::Any, W::ReadOnly),
        reg(0xf04, 1, "RID", Rid, R::Any, W::ReadOnly),
    ]
};

/// The register whose dword holds `offset` (offset inside a locality page).
pub fn register_at(offset: u16) -> Option<&'static RegisterInfo> {
    REGISTERS.iter().find(|r| r.offset == offset & !3)
}

/// The command state (TIS 1.2 section 5.6.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Idle,
    /// commandReady: waiting for the first byte.
    Ready,
    /// Command bytes arriving.
    Reception,
    /// The backend holds the response (a durable vTPM waiting for its
    /// store service): stsValid without dataAvail, burstCount 0.
    Execution,
    /// A response is there to read.
    Completion,
}

/// Counters for the cost of the byte-wide interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TisStats {
    /// Register accesses (one per trapped guest instruction).
    pub accesses: u64,
    /// Commands executed by the backend.
    pub commands: u64,
    /// Commands answered with an error by this model (bad framing, bad response).
    pub refused: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The TIS device of one guest.
pub struct Tis<B> {
    backend: B,
    active: Option<u8>,
    /// Bit n: locality n has requestUse pending.
    requests: u8,
    /// Bit n: locality n lost the TPM to a seize (until it writes beenSeized).
    seized: u8,
    int_enable: [u32; GUEST_LOCALITIES as usize],
    int_status: [u32; GUEST_LOCALITIES as usize],
    int_vector: u8,
    state: State,
    buffer: Box<[u8]>,
    /// Command bytes received (Reception) or response length (Completion).
    len: usize,
    /// Next response byte to read.
    pos: usize,
    /// Bytes were written while Expect was 0.
    overrun: bool,
    pub stats: TisStats,
}

impl<B: TpmBackend> Tis<B> {
    /// A TIS after reset. `irq` is the SIRQ number shown in INT_VECTOR
    /// (0: no interrupt line).
    pub fn new(backend: B, irq: u8) -> Self {
        Tis {
            backend,
            active: None,
            requests: 0,
            seized: 0,
            int_enable: [int::POLARITY_LOW_LEVEL; GUEST_LOCALITIES as usize],
            int_status: [0; GUEST_LOCALITIES as usize],
            int_vector: irq & 0xf,
            state: State::Idle,
            buffer: alloc::vec![0; BUFFER_SIZE].into_boxed_slice(),
            len: 0,
            pos: 0,
            overrun: false,
            stats: TisStats::default(),
        }
    }

    /// Back to the power-on state (platform reset); the backend and the
    /// statistics are kept, INT_VECTOR too (it is wiring, not state).
    pub fn reset(&mut self) {
        self.active = None;
        self.requests = 0;
        self.seized = 0;
        self.int_enable = [int::POLARITY_LOW_LEVEL; GUEST_LOCALITIES as usize];
        self.int_status = [0; GUEST_LOCALITIES as usize];
        self.buffer.fill(0);
        self.reset_command(State::Idle);
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    pub fn active_locality(&self) -> Option<u8> {
        self.active
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The SIRQ line to assert, while an enabled interrupt is pending in
    /// any locality. Level-triggered: it stays pending until the guest
    /// clears INT_STATUS.
    pub fn pending_interrupt(&self) -> Option<u8> {
        if self.int_vector == 0 {
            return None;
        }
        let pending = self
            .int_enable
            .iter()
            .zip(self.int_status.iter())
            .any(|(&en, &st)| en & int::GLOBAL_ENABLE != 0 && st & en & int::SOURCES != 0);
        pending.then_some(self.int_vector)
    }

    /// A read of `size` bytes (1, 2, 4 or 8) at `offset` from [`BASE`].
    /// Accesses are split at dword boundaries; each piece reaches the
    /// register of its dword.
    pub fn read(&mut self, offset: u64, size: u8) -> u64 {
        self.stats.accesses = self.stats.accesses.wrapping_add(1);
        self.poll_backend();
        let size = size.min(8);
        let mut value = 0u64;
        let mut done = 0u8;
        while done < size {
            let at = offset.saturating_add(u64::from(done));
            let lane = (at & 3) as u8;
            let n = (4 - lane).min(size - done);
            value |= self.read_piece(at & !3, lane, n) << (8 * u32::from(done));
            done += n;
        }
        value
    }

    /// A write of `size` bytes (1, 2, 4 or 8) at `offset` from [`BASE`].
    pub fn write(&mut self, offset: u64, size: u8, value: u64) {
        self.stats.accesses = self.stats.accesses.wrapping_add(1);
        self.poll_backend();
        let size = size.min(8);
        let mut done = 0u8;
        while done < size {
            let at = offset.saturating_add(u64::from(done));
            let lane = (at & 3) as u8;
            let n = (4 - lane).min(size - done);
            let piece = (value >> (8 * u32::from(done))) as u32 & lane_mask(n);
            self.write_piece(at & !3, lane, n, piece);
            done += n;
        }
    }

    /// `n` bytes (lanes `lane..lane+n`) of the dword at `dword`.
    fn read_piece(&mut self, dword: u64, lane: u8, n: u8) -> u64 {
        let ones = u64::from(lane_mask(n));
        let Some((locality, info)) = decode_offset(dword) else {
            return ones;
        };
        let Some(info) = info else {
            return 0;
        };
        if info.read == ReadRule::Active && self.active != Some(locality) {
            return ones;
        }
        let l = usize::from(locality);
        let value = match info.register {
            Register::DataFifo | Register::XDataFifo => return self.fifo_read(n),
            Register::Access => u32::from(self.access_value(locality)),
            Register::IntEnable => self.int_enable.get(l).copied().unwrap_or(0),
            Register::IntVector => u32::from(self.int_vector),
            Register::IntStatus => self.int_status.get(l).copied().unwrap_or(0),
            Register::IntfCapability => INTF_CAPABILITY,
            Register::Sts => self.sts_value(),
            Register::InterfaceId => INTERFACE_ID,
            Register::DidVid => DID_VID,
            Register::Rid => u32::from(RID),
        };
        let value = value & lane_mask(info.width);
        u64::from(value >> (8 * u32::from(lane))) & ones
    }

    fn write_piece(&mut self, dword: u64, lane: u8, n: u8, piece: u32) {
        let Some((locality, Some(info))) = decode_offset(dword) else {
            return;
        };
        match info.write {
            WriteRule::ReadOnly => return,
            WriteRule::Active if self.active != Some(locality) => return,
            _ => {}
        }
        let shift = 8 * u32::from(lane);
        let lanes = lane_mask(n) << shift;
        let bits = piece << shift;
        let l = usize::from(locality);
        match info.register {
            Register::Access if lane == 0 => self.access_write(locality, piece as u8),
            Register::IntEnable => {
                let writable = int::GLOBAL_ENABLE | int::POLARITY_MASK | int::SOURCES;
                if let Some(enable) = self.int_enable.get_mut(l) {
                    *enable = ((*enable & !lanes) | (bits & lanes)) & writable;
                }
            }
            Register::IntVector if lane == 0 => self.int_vector = piece as u8 & 0xf,
            Register::IntStatus => {
                if let Some(status) = self.int_status.get_mut(l) {
                    *status &= !(bits & lanes);
                }
            }
            // Lanes 1..=3 hold burstCount (read-only) and TIS 1.3's
            // commandCancel/resetEstablishment, which are TPM 2.0 only.
            Register::Sts if lane == 0 => self.sts_write(piece as u8),
            Register::DataFifo | Register::XDataFifo => self.fifo_write(n, piece),
            _ => {}
        }
    }

    fn access_value(&self, locality: u8) -> u8 {
        let bit = 1u8 << locality;
        let mut v = access::VALID | access::ESTABLISHMENT;
        if self.active == Some(locality) {
            v |= access::ACTIVE_LOCALITY;
        }
        if self.seized & bit != 0 {
            v |= access::BEEN_SEIZED;
        }
        if self.requests & bit != 0 {
            v |= access::REQUEST_USE;
        }
        if self.requests & !bit != 0 {
            v |= access::PENDING_REQUEST;
        }
        v
    }

    fn access_write(&mut self, locality: u8, value: u8) {
        let bit = 1u8 << locality;
        if value & access::BEEN_SEIZED != 0 {
            self.seized &= !bit;
        }
        if value & access::SEIZE != 0 {
            // Honoured only from a locality above the active one (or when
            // none is active); it wins over the other bits of the write.
            if self.active.is_none_or(|a| locality > a) {
                if let Some(old) = self.active {
                    self.seized |= 1 << old;
                }
                self.requests &= !bit;
                self.set_active(Some(locality));
            }
            return;
        }
        if value & access::ACTIVE_LOCALITY != 0 {
            if self.active == Some(locality) {
                // Relinquish: hand over to the highest locality waiting.
                let next = (0..GUEST_LOCALITIES).rev().find(|&l| self.requests & (1 << l) != 0);
                if let Some(n) = next {
                    self.requests &= !(1 << n);
                }
                self.set_active(next);
            } else {
                // Withdraw a pending request.
                self.requests &= !bit;
            }
        }
        if value & access::REQUEST_USE != 0 {
            match self.active {
                None => self.set_active(Some(locality)),
                Some(a) if a == locality => {}
                Some(_) => self.requests |= bit,
            }
        }
    }

    /// Changes the active locality; the command in progress is aborted.
    fn set_active(&mut self, locality: Option<u8>) {
        if self.active == locality {
            return;
        }
        self.active = locality;
        self.reset_command(State::Idle);
        // Nothing of the previous owner's command or response stays behind.
        self.buffer.fill(0);
        if let Some(l) = locality {
            self.raise(l, int::LOCALITY_CHANGE);
        }
    }

    fn reset_command(&mut self, state: State) {
        self.state = state;
        self.len = 0;
        self.pos = 0;
        self.overrun = false;
    }

    /// `paramSize` from the header, once its bytes are there.
    fn param_size(&self) -> Option<usize> {
        if self.len < 6 {
            return None;
        }
        let b = <[u8; 4]>::try_from(self.buffer.get(2..6)?).ok()?;
        usize::try_from(u32::from_be_bytes(b)).ok()
    }

    fn size_acceptable(size: usize) -> bool {
        (HEADER_SIZE..=BUFFER_SIZE).contains(&size)
    }

    /// Whether more command bytes are wanted (the Expect bit).
    fn expecting(&self) -> bool {
        if self.state != State::Reception || self.overrun {
            return false;
        }
        match self.param_size() {
            None => true,
            Some(size) => Self::size_acceptable(size) && self.len < size,
        }
    }

    fn sts_value(&self) -> u32 {
        let mut status = sts::VALID;
        let burst = match self.state {
            State::Idle => 0,
            State::Ready => {
                status |= sts::COMMAND_READY;
                BUFFER_SIZE
            }
            State::Reception if self.expecting() => {
                status |= sts::EXPECT;
                BUFFER_SIZE.saturating_sub(self.len)
            }
            State::Reception | State::Execution => 0,
            State::Completion => {
                let left = self.len.saturating_sub(self.pos);
                if left > 0 {
                    status |= sts::DATA_AVAIL;
                }
                left
            }
        };
        let burst = burst.min(usize::from(MAX_BURST)) as u32;
        u32::from(status) | (burst << 8)
    }

    fn sts_write(&mut self, value: u8) {
        let Some(locality) = self.active else {
            return;
        };
        match value & (sts::COMMAND_READY | sts::GO | sts::RESPONSE_RETRY) {
            sts::COMMAND_READY => {
                let was = self.state;
                self.reset_command(State::Ready);
                if was != State::Ready {
                    self.raise(locality, int::COMMAND_READY);
                }
            }
            // Ignored while Expect is 1 or outside reception.
            sts::GO if self.state == State::Reception && !self.expecting() => self.execute(locality),
            sts::RESPONSE_RETRY if self.state == State::Completion => self.pos = 0,
            _ => {}
        }
    }

    fn fifo_write(&mut self, n: u8, bytes: u32) {
        match self.state {
            State::Ready => self.reset_command(State::Reception),
            State::Reception => {}
            State::Idle | State::Execution | State::Completion => return,
        }
        let was_expecting = self.expecting();
        for byte in bytes.to_le_bytes().into_iter().take(usize::from(n)) {
            if !self.expecting() {
                self.overrun = true;
                break;
            }
            match self.buffer.get_mut(self.len) {
                Some(slot) => {
                    *slot = byte;
                    self.len += 1;
                    self.stats.bytes_in = self.stats.bytes_in.wrapping_add(1);
                }
                None => {
                    self.overrun = true;
                    break;
                }
            }
        }
        if was_expecting && !self.expecting() {
            if let Some(l) = self.active {
                self.raise(l, int::STS_VALID);
            }
        }
    }

    fn fifo_read(&mut self, n: u8) -> u64 {
        let mut value = 0u64;
        for i in 0..u32::from(n) {
            let byte = match (self.state, self.buffer.get(self.pos)) {
                (State::Completion, Some(&b)) if self.pos < self.len => {
                    self.pos += 1;
                    self.stats.bytes_out = self.stats.bytes_out.wrapping_add(1);
                    if self.pos == self.len {
                        if let Some(l) = self.active {
                            self.raise(l, int::STS_VALID);
                        }
                    }
                    b
                }
                _ => 0xff,
            };
            value |= u64::from(byte) << (8 * i);
        }
        value
    }

    fn execute(&mut self, locality: u8) {
        let framed = !self.overrun && self.param_size() == Some(self.len);
        if framed && Self::size_acceptable(self.len) {
            let command = self.buffer.get(..self.len).unwrap_or(&[]);
            let submitted = self.backend.submit(locality, command);
            self.stats.commands = self.stats.commands.wrapping_add(1);
            match submitted {
                Some(response) => self.complete(locality, &response),
                None => {
                    // Held: nothing of the command stays readable meanwhile.
                    self.buffer.fill(0);
                    self.state = State::Execution;
                    self.len = 0;
                    self.pos = 0;
                    self.overrun = false;
                }
            }
        } else {
            self.error_response(TPM_BAD_PARAM_SIZE);
            self.finish(locality);
        }
    }

    /// Takes a held response the backend released.
    fn poll_backend(&mut self) {
        if self.state != State::Execution {
            return;
        }
        if let (Some(response), Some(locality)) = (self.backend.poll(), self.active) {
            self.complete(locality, &response);
        }
    }

    /// The backend's answer, checked, as the response to read.
    fn complete(&mut self, locality: u8, response: &[u8]) {
        let consistent = Self::size_acceptable(response.len())
            && response
                .get(2..6)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .and_then(|s| usize::try_from(s).ok())
                == Some(response.len());
        match self.buffer.get_mut(..response.len()) {
            Some(dst) if consistent => {
                dst.copy_from_slice(response);
                self.len = response.len();
            }
            _ => self.error_response(TPM_FAIL),
        }
        self.finish(locality);
    }

    fn finish(&mut self, locality: u8) {
        self.state = State::Completion;
        self.pos = 0;
        self.overrun = false;
        self.raise(locality, int::DATA_AVAIL | int::STS_VALID);
    }

    fn error_response(&mut self, code: u32) {
        self.stats.refused = self.stats.refused.wrapping_add(1);
        let mut rsp = [0u8; HEADER_SIZE];
        rsp[..2].copy_from_slice(&TPM_TAG_RSP_COMMAND.to_be_bytes());
        rsp[2..6].copy_from_slice(&(HEADER_SIZE as u32).to_be_bytes());
        rsp[6..].copy_from_slice(&code.to_be_bytes());
        if let Some(dst) = self.buffer.get_mut(..HEADER_SIZE) {
            dst.copy_from_slice(&rsp);
        }
        self.len = HEADER_SIZE;
    }

    fn raise(&mut self, locality: u8, events: u32) {
        let l = usize::from(locality);
        if let (Some(&enable), Some(status)) = (self.int_enable.get(l), self.int_status.get_mut(l)) {
            if enable & int::GLOBAL_ENABLE != 0 {
                *status |= events & enable & int::SOURCES;
            }
        }
    }
}

impl<B: TpmBackend> crate::mmio::MmioDevice for Tis<B> {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        Tis::read(self, offset, size)
    }

    fn write(&mut self, offset: u64, size: u8, value: u64) {
        Tis::write(self, offset, size, value)
    }
}

/// All-ones in the low `n` bytes (n <= 4).
const fn lane_mask(n: u8) -> u32 {
    match n {
        0 => 0,
        1 => 0xff,
        2 => 0xffff,
        3 => 0xff_ffff,
        _ => 0xffff_ffff,
    }
}

/// The guest locality and register of a dword offset in the window; `None`
/// outside the window or in locality 4 (all-ones, writes ignored), `Some((l,
/// None))` for an offset with no register (reads 0, writes ignored).
fn decode_offset(dword: u64) -> Option<(u8, Option<&'static RegisterInfo>)> {
    if dword >= SIZE {
        return None;
    }
    let locality = (dword >> 12) as u8;
    if locality >= GUEST_LOCALITIES {
        return None;
    }
    Some((locality, register_at((dword & 0xfff) as u16)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::VecDeque;
    use alloc::vec;

    // Register offsets inside a locality page.
    const ACCESS: u64 = 0x00;
    const INT_ENABLE: u64 = 0x08;
    const INT_VECTOR: u64 = 0x0c;
    const INT_STATUS: u64 = 0x10;
    const INTF_CAPS: u64 = 0x14;
    const STS: u64 = 0x18;
    const FIFO: u64 = 0x24;
    const IFACE_ID: u64 = 0x30;
    const XFIFO: u64 = 0x80;
    const DIDVID: u64 = 0xf00;
    const RIDREG: u64 = 0xf04;

    /// A backend that records what it got and answers from a queue.
    #[derive(Default)]
    struct Recorder {
        commands: Vec<(u8, Vec<u8>)>,
        answers: VecDeque<Vec<u8>>,
    }

    impl TpmBackend for Recorder {
        fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
            self.commands.push((locality, command.to_vec()));
            self.answers.pop_front().unwrap_or_else(|| vec![0, 0xc4, 0, 0, 0, 10, 0, 0, 0, 0])
        }
    }

    fn tis() -> Tis<Recorder> {
        Tis::new(Recorder::default(), 0)
    }

    fn answer(t: &mut Tis<Recorder>, rsp: &[u8]) {
        t.backend_mut().answers.push_back(rsp.to_vec());
    }

    fn at(l: u8, reg: u64) -> u64 {
        (u64::from(l) << 12) | reg
    }
    fn r8(t: &mut Tis<Recorder>, l: u8, reg: u64) -> u8 {
        t.read(at(l, reg), 1) as u8
    }
    fn r16(t: &mut Tis<Recorder>, l: u8, reg: u64) -> u16 {
        t.read(at(l, reg), 2) as u16
    }
    fn r32(t: &mut Tis<Recorder>, l: u8, reg: u64) -> u32 {
        t.read(at(l, reg), 4) as u32
    }
    fn w8(t: &mut Tis<Recorder>, l: u8, reg: u64, v: u8) {
        t.write(at(l, reg), 1, u64::from(v))
    }
    fn w32(t: &mut Tis<Recorder>, l: u8, reg: u64, v: u32) {
        t.write(at(l, reg), 4, u64::from(v))
    }

    /// A command of `len` bytes with a correct header.
    fn command(len: usize, ordinal: u32) -> Vec<u8> {
        let mut c = vec![0u8; len];
        c[0..2].copy_from_slice(&[0x00, 0xc1]);
        c[2..6].copy_from_slice(&(len as u32).to_be_bytes());
        c[6..10].copy_from_slice(&ordinal.to_be_bytes());
        for (i, b) in c.iter_mut().enumerate().skip(10) {
            *b = i as u8;
        }
        c
    }

    fn response(len: usize) -> Vec<u8> {
        let mut r = command(len, 0);
        r[1] = 0xc4;
        r
    }

    /// The TPM2_GetCapability(TPM_PT_TOTAL_COMMANDS) that tpm2_probe sends.
    const TPM2_PROBE: [u8; 22] = [
        0x80, 0x01, 0x00, 0x00, 0x00, 0x16, 0x00, 0x00, 0x01, 0x7a, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x01, 0x29,
        0x00, 0x00, 0x00, 0x01,
    ];
    /// libtpms' TPM 1.2 answer to it: TPM_BAD_ORDINAL.
    const BAD_ORDINAL: [u8; 10] = [0x00, 0xc4, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x0a];
    /// TPM_GetCapability(TPM_CAP_PROPERTY, TPM_CAP_PROP_TIS_TIMEOUT).
    const GETCAP_TIMEOUTS: [u8; 22] = [
        0x00, 0xc1, 0x00, 0x00, 0x00, 0x16, 0x00, 0x00, 0x00, 0x65, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x04,
        0x00, 0x00, 0x01, 0x15,
    ];
    const TIMEOUTS_ANSWER: [u8; 30] = [
        0x00, 0xc4, 0x00, 0x00, 0x00, 0x1e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x0b, 0x71, 0xb0,
        0x00, 0x1e, 0x84, 0x80, 0x00, 0x0b, 0x71, 0xb0, 0x00, 0x0b, 0x71, 0xb0,
    ];

    /// Linux's tpm_tis_core.c, step by step, against the model. Polling
    /// loops are bounded: a state that never comes is an error.
    struct Linux<'a> {
        t: &'a mut Tis<Recorder>,
        l: u8,
        /// burstCount values get_burstcount() returned, in order.
        bursts: Vec<usize>,
        /// Chunk sizes written to / read from the FIFO.
        chunks: Vec<usize>,
    }

    const POLLS: usize = 50;
    const VALID: u8 = sts::VALID;
    const EXPECT: u8 = sts::EXPECT;
    const DATA_AVAIL: u8 = sts::DATA_AVAIL;
    const READY: u8 = sts::COMMAND_READY;

    impl<'a> Linux<'a> {
        fn new(t: &'a mut Tis<Recorder>) -> Self {
            Linux { t, l: 0, bursts: Vec::new(), chunks: Vec::new() }
        }

        fn check_locality(&mut self) -> bool {
            r8(self.t, self.l, ACCESS) & 0xa2 == 0xa0
        }

        fn request_locality(&mut self) -> Result<(), &'static str> {
            if self.check_locality() {
                return Ok(());
            }
            w8(self.t, self.l, ACCESS, access::REQUEST_USE);
            for _ in 0..POLLS {
                if self.check_locality() {
                    return Ok(());
                }
            }
            Err("request_locality timed out")
        }

        fn relinquish(&mut self) {
            w8(self.t, self.l, ACCESS, access::ACTIVE_LOCALITY);
        }

        /// tpm_tis_status(): an invalid status (0x23 bits set) reads as 0.
        fn status(&mut self) -> u8 {
            let s = r8(self.t, self.l, STS);
            if s & 0x23 != 0 {
                0
            } else {
                s
            }
        }

        fn ready(&mut self) {
            w8(self.t, self.l, STS, READY);
        }

        fn wait_for_stat(&mut self, mask: u8) -> Result<(), &'static str> {
            for _ in 0..POLLS {
                if self.status() & mask == mask {
                    return Ok(());
                }
            }
            Err("wait_for_tpm_stat: -ETIME")
        }

        fn get_burstcount(&mut self) -> Result<usize, &'static str> {
            for _ in 0..POLLS {
                let v = r32(self.t, self.l, STS);
                let burst = ((v >> 8) & 0xffff) as usize;
                if burst != 0 {
                    self.bursts.push(burst);
                    return Ok(burst);
                }
            }
            Err("get_burstcount: -EBUSY")
        }

        fn send_data(&mut self, buf: &[u8]) -> Result<(), &'static str> {
            let status = self.status();
            if status & READY == 0 {
                self.ready();
                self.wait_for_stat(READY)?;
            }
            let len = buf.len();
            let mut count = 0;
            while count < len - 1 {
                let burst = self.get_burstcount()?.min(len - count - 1);
                for &b in &buf[count..count + burst] {
                    w8(self.t, self.l, FIFO, b);
                }
                self.chunks.push(burst);
                count += burst;
                self.wait_for_stat(VALID)?;
                if self.status() & EXPECT == 0 {
                    self.ready();
                    return Err("TPM_STS_DATA_EXPECT should be set");
                }
            }
            w8(self.t, self.l, FIFO, buf[count]);
            self.wait_for_stat(VALID)?;
            if self.status() & EXPECT != 0 {
                self.ready();
                return Err("TPM_STS_DATA_EXPECT should be unset");
            }
            Ok(())
        }

        fn recv_data(&mut self, out: &mut Vec<u8>, count: usize) -> Result<(), &'static str> {
            let mut size = 0;
            while size < count {
                self.wait_for_stat(DATA_AVAIL | VALID)?;
                let burst = self.get_burstcount()?.min(count - size);
                for _ in 0..burst {
                    out.push(r8(self.t, self.l, FIFO));
                }
                self.chunks.push(burst);
                size += burst;
            }
            Ok(())
        }

        fn try_recv(&mut self) -> Result<Vec<u8>, &'static str> {
            let mut buf = Vec::new();
            self.recv_data(&mut buf, HEADER_SIZE)?;
            let expected = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
            if !(HEADER_SIZE..=BUFFER_SIZE).contains(&expected) {
                return Err("-EIO");
            }
            self.recv_data(&mut buf, expected - HEADER_SIZE)?;
            self.wait_for_stat(VALID)?;
            if self.status() & DATA_AVAIL != 0 {
                return Err("Error left over data");
            }
            Ok(buf)
        }

        fn recv(&mut self) -> Result<Vec<u8>, &'static str> {
            let rc = self.try_recv();
            self.ready();
            rc
        }

        /// tpm_tis_send_main() then tpm_try_transmit()'s polling, then recv.
        fn transmit(&mut self, cmd: &[u8]) -> Result<Vec<u8>, &'static str> {
            self.send_data(cmd)?;
            w8(self.t, self.l, STS, sts::GO);
            for _ in 0..POLLS {
                let status = self.status();
                if status & (DATA_AVAIL | VALID) == DATA_AVAIL | VALID {
                    return self.recv();
                }
                if status == READY {
                    return Err("-ECANCELED");
                }
            }
            Err("tpm_try_transmit: -ETIME")
        }

        /// tpm_chip_start / command / tpm_chip_stop.
        fn command(&mut self, cmd: &[u8]) -> Result<Vec<u8>, &'static str> {
            self.request_locality()?;
            let rc = self.transmit(cmd);
            self.relinquish();
            rc
        }
    }

    #[test]
    fn register_table_is_sorted_aligned_and_in_the_page() {
        for pair in REGISTERS.windows(2) {
            assert!(pair[0].offset < pair[1].offset);
        }
        for r in REGISTERS {
            assert_eq!(r.offset % 4, 0, "{}", r.name);
            assert!(matches!(r.width, 1 | 4), "{}", r.name);
            assert!(u64::from(r.offset) + u64::from(r.width) <= 0x1000);
            assert_eq!(register_at(r.offset + 3).map(|x| x.name), Some(r.name));
        }
        assert_eq!(register_at(0x04), None);
        assert_eq!(register_at(0x28), None);
    }

    #[test]
    fn linux_probe_sequence() {
        let mut t = tis();
        let mut linux = Linux::new(&mut t);
        // tpm_tis_core_init()
        assert_eq!(r32(linux.t, 0, DIDVID), 0x0001_1014);
        assert_eq!(r8(linux.t, 0, ACCESS), access::VALID | access::ESTABLISHMENT);
        let mut intmask = r32(linux.t, 0, INT_ENABLE);
        assert_eq!(intmask, int::POLARITY_LOW_LEVEL);
        let caps = r32(linux.t, 0, INTF_CAPS);
        assert_eq!(caps, 0x2000_0697);
        for bit in [0x80, 0x04, 0x02, 0x01] {
            if caps & bit != 0 {
                intmask |= bit;
            }
        }
        intmask &= !int::GLOBAL_ENABLE;
        linux.request_locality().unwrap();
        assert_eq!(r8(linux.t, 0, ACCESS), access::VALID | access::ACTIVE_LOCALITY | access::ESTABLISHMENT);
        w32(linux.t, 0, INT_ENABLE, intmask);
        assert_eq!(r32(linux.t, 0, INT_ENABLE), 0x8f);
        linux.relinquish();
        assert_eq!(linux.t.active_locality(), None);
        // tpm_chip_start(); tpm2_probe(); tpm_chip_stop()
        linux.t.backend_mut().answers.push_back(BAD_ORDINAL.to_vec());
        let rsp = linux.command(&TPM2_PROBE).unwrap();
        assert_eq!(rsp, BAD_ORDINAL);
        assert_ne!(u16::from_be_bytes([rsp[0], rsp[1]]), 0x8001, "a TPM 1.2");
        assert_eq!(linux.t.backend().commands, vec![(0, TPM2_PROBE.to_vec())]);
        // 22 bytes: one chunk of 21 after a burst of 255, then the last byte.
        assert_eq!(linux.bursts, [255, 10]);
        assert_eq!(linux.chunks, [21, 10]);
        assert_eq!(r8(linux.t, 0, RIDREG), RID);
        // probe_itpm(): not Intel, so no iTPM probing.
        assert_eq!(r16(linux.t, 0, DIDVID), 0x1014);
        assert_eq!(r8(linux.t, 0, ACCESS), access::VALID | access::ESTABLISHMENT);
        assert_eq!(r32(linux.t, 0, IFACE_ID), 0xffff_ffff);
    }

    #[test]
    fn linux_send_and_receive_byte_by_byte() {
        let mut t = tis();
        answer(&mut t, &TIMEOUTS_ANSWER);
        let before = t.stats;
        let mut linux = Linux::new(&mut t);
        let rsp = linux.command(&GETCAP_TIMEOUTS).unwrap();
        assert_eq!(rsp, TIMEOUTS_ANSWER);
        assert_eq!(linux.bursts, [255, 30, 20]);
        assert_eq!(linux.chunks, [21, 10, 20]);
        assert_eq!(linux.t.backend().commands, vec![(0, GETCAP_TIMEOUTS.to_vec())]);
        // After the driver's final commandReady and relinquish: idle, no locality.
        assert_eq!(linux.t.state(), State::Idle);
        let stats = linux.t.stats;
        assert_eq!(stats.commands - before.commands, 1);
        assert_eq!(stats.bytes_in, 22);
        assert_eq!(stats.bytes_out, 30);
        // Register accesses (= VM exits) for this 22-byte command and its
        // 30-byte answer: one per FIFO byte plus 21 for the locality, the
        // status polling and the control writes.
        assert_eq!(stats.accesses - before.accesses, 22 + 30 + 21);
    }

    #[test]
    fn expect_and_burst_step_by_step() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        assert_eq!(r8(&mut t, 0, STS), VALID);
        assert_eq!(r32(&mut t, 0, STS) >> 8, 0, "idle: nothing can move");
        w8(&mut t, 0, STS, READY);
        assert_eq!(r32(&mut t, 0, STS), 0xff00 | u32::from(VALID | READY));
        let cmd = command(12, 0x99);
        for (i, &b) in cmd.iter().enumerate() {
            w8(&mut t, 0, FIFO, b);
            let sts = r32(&mut t, 0, STS);
            if i + 1 < cmd.len() {
                assert_eq!(sts & 0xff, u32::from(VALID | EXPECT), "after byte {i}");
                assert_eq!(sts >> 8, 255, "after byte {i}");
            } else {
                assert_eq!(sts, u32::from(VALID), "complete: Expect 0, burst 0");
            }
        }
        w8(&mut t, 0, STS, sts::GO);
        assert_eq!(t.backend().commands[0].1, cmd);
        assert_eq!(r32(&mut t, 0, STS), (10 << 8) | u32::from(VALID | DATA_AVAIL));
        for left in (1..=10u32).rev() {
            assert_eq!(r32(&mut t, 0, STS) >> 8, left);
            r8(&mut t, 0, FIFO);
        }
        assert_eq!(r32(&mut t, 0, STS), u32::from(VALID), "dataAvail 0 after the last byte");
    }

    #[test]
    fn a_4096_byte_command_and_answer() {
        let mut t = tis();
        let cmd = command(BUFFER_SIZE, 0xcd);
        answer(&mut t, &response(BUFFER_SIZE));
        let mut linux = Linux::new(&mut t);
        let rsp = linux.command(&cmd).unwrap();
        assert_eq!(rsp, response(BUFFER_SIZE));
        assert_eq!(linux.t.backend().commands[0].1, cmd);
        // Sending: 16 chunks of 255, then 15 (burst 16 = free space), then the last byte.
        let mut sent = vec![255; 16];
        sent.push(15);
        assert_eq!(&linux.chunks[..17], &sent[..]);
        assert_eq!(linux.bursts[16], 16);
        // Receiving: the 10-byte header, then the rest in chunks of at most 255.
        assert_eq!(linux.chunks[17], 10);
        assert_eq!(linux.chunks[18..].iter().sum::<usize>(), BUFFER_SIZE - 10);
        assert!(linux.chunks[18..].iter().all(|&c| c <= 255));
    }

    #[test]
    fn inactive_localities_cannot_write_and_read_ones() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, STS, READY);
        // Locality 1 is not active: all its writes but ACCESS are ignored.
        w8(&mut t, 1, STS, READY);
        w8(&mut t, 1, FIFO, 0x00);
        w32(&mut t, 1, INT_ENABLE, 0x8000_008f);
        w8(&mut t, 1, INT_VECTOR, 5);
        assert_eq!(r8(&mut t, 1, STS), 0xff);
        assert_eq!(r32(&mut t, 1, STS), 0xffff_ffff);
        assert_eq!(r8(&mut t, 1, FIFO), 0xff);
        assert_eq!(r32(&mut t, 1, XFIFO), 0xffff_ffff);
        assert_eq!(r32(&mut t, 1, INT_ENABLE), int::POLARITY_LOW_LEVEL);
        assert_eq!(r8(&mut t, 1, INT_VECTOR), 0);
        // Locality 0 is untouched: still ready, nothing received.
        assert_eq!(t.state(), State::Ready);
        assert_eq!(r8(&mut t, 0, STS), VALID | READY);
        // Identification reads the same from every guest locality.
        for l in 0..4 {
            assert_eq!(r32(&mut t, l, DIDVID), DID_VID);
            assert_eq!(r32(&mut t, l, INTF_CAPS), INTF_CAPABILITY);
        }
        // A whole command from locality 1 never reaches the backend.
        for b in command(10, 1) {
            w8(&mut t, 1, FIFO, b);
        }
        w8(&mut t, 1, STS, sts::GO);
        assert!(t.backend().commands.is_empty());
        assert_eq!(t.stats.bytes_in, 0);
    }

    #[test]
    fn writes_with_no_locality_active_are_ignored() {
        let mut t = tis();
        w8(&mut t, 0, STS, READY);
        w8(&mut t, 0, FIFO, 1);
        w32(&mut t, 0, INT_ENABLE, 0x8000_0001);
        assert_eq!(t.state(), State::Idle);
        assert_eq!(r32(&mut t, 0, INT_ENABLE), int::POLARITY_LOW_LEVEL);
        assert_eq!(r8(&mut t, 0, STS), 0xff);
    }

    /// Sends `bytes` through the FIFO of locality 0 (already ready).
    fn feed(t: &mut Tis<Recorder>, bytes: &[u8]) {
        for &b in bytes {
            w8(t, 0, FIFO, b);
        }
    }

    fn read_all(t: &mut Tis<Recorder>) -> Vec<u8> {
        let mut out = Vec::new();
        while r8(t, 0, STS) & DATA_AVAIL != 0 {
            out.push(r8(t, 0, FIFO));
        }
        out
    }

    const BAD_PARAM_SIZE: [u8; 10] = [0, 0xc4, 0, 0, 0, 10, 0, 0, 0, 0x19];

    #[test]
    fn a_param_size_beyond_the_buffer_is_refused() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, STS, READY);
        let cmd = command(BUFFER_SIZE + 1, 0x14);
        feed(&mut t, &cmd[..5]);
        assert_eq!(r8(&mut t, 0, STS), VALID | EXPECT, "size not known yet");
        feed(&mut t, &cmd[5..6]);
        assert_eq!(r8(&mut t, 0, STS), VALID, "Expect drops with the bad size");
        // Linux would stop here (Expect 0 mid-command); a driver that goes on
        // has its bytes dropped, and never overflows anything.
        feed(&mut t, &cmd[6..]);
        assert_eq!(t.stats.bytes_in, 6);
        w8(&mut t, 0, STS, sts::GO);
        assert!(t.backend().commands.is_empty(), "never reaches the backend");
        assert_eq!(read_all(&mut t), BAD_PARAM_SIZE);
        assert_eq!(t.stats.refused, 1);
        // And the Linux driver fails cleanly with -EIO on such a command.
        let mut t = tis();
        let mut linux = Linux::new(&mut t);
        linux.request_locality().unwrap();
        assert_eq!(linux.send_data(&command(5000, 0x14)), Err("TPM_STS_DATA_EXPECT should be set"));
        assert_eq!(linux.t.state(), State::Ready, "the driver aborted with commandReady");
    }

    #[test]
    fn a_param_size_below_the_header_is_refused() {
        for size in [0u32, 6, 9] {
            let mut t = tis();
            w8(&mut t, 0, ACCESS, access::REQUEST_USE);
            w8(&mut t, 0, STS, READY);
            let mut cmd = command(10, 0x65);
            cmd[2..6].copy_from_slice(&size.to_be_bytes());
            feed(&mut t, &cmd[..6]);
            assert_eq!(r8(&mut t, 0, STS), VALID, "size {size}");
            w8(&mut t, 0, STS, sts::GO);
            assert!(t.backend().commands.is_empty());
            assert_eq!(read_all(&mut t), BAD_PARAM_SIZE);
        }
    }

    #[test]
    fn bytes_beyond_param_size_refuse_the_command() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, STS, READY);
        let cmd = command(14, 0x46);
        feed(&mut t, &cmd);
        assert_eq!(r8(&mut t, 0, STS), VALID);
        feed(&mut t, &[0xaa, 0xbb]);
        assert_eq!(t.stats.bytes_in, 14, "the extra bytes are dropped");
        assert_eq!(r8(&mut t, 0, STS), VALID);
        w8(&mut t, 0, STS, sts::GO);
        assert!(t.backend().commands.is_empty());
        assert_eq!(read_all(&mut t), BAD_PARAM_SIZE);
        // A fresh command after commandReady goes through.
        w8(&mut t, 0, STS, READY);
        feed(&mut t, &cmd);
        w8(&mut t, 0, STS, sts::GO);
        assert_eq!(t.backend().commands, vec![(0, cmd)]);
    }

    #[test]
    fn go_before_the_command_is_complete_is_ignored() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, STS, sts::GO);
        assert_eq!(t.state(), State::Idle);
        w8(&mut t, 0, STS, READY);
        let cmd = command(20, 0x15);
        feed(&mut t, &cmd[..19]);
        w8(&mut t, 0, STS, sts::GO);
        assert!(t.backend().commands.is_empty());
        assert_eq!(r8(&mut t, 0, STS), VALID | EXPECT);
        // Several control bits at once are ignored too.
        w8(&mut t, 0, STS, READY | sts::GO);
        assert_eq!(t.state(), State::Reception);
        feed(&mut t, &cmd[19..]);
        w8(&mut t, 0, STS, sts::GO | sts::RESPONSE_RETRY);
        assert!(t.backend().commands.is_empty());
        w8(&mut t, 0, STS, sts::GO);
        assert_eq!(t.backend().commands, vec![(0, cmd)]);
    }

    #[test]
    fn fifo_reads_without_a_response_give_ff() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        assert_eq!(r8(&mut t, 0, FIFO), 0xff, "idle");
        w8(&mut t, 0, STS, READY);
        assert_eq!(r8(&mut t, 0, FIFO), 0xff, "ready");
        assert_eq!(r32(&mut t, 0, XFIFO), 0xffff_ffff, "ready, 4 bytes");
        feed(&mut t, &command(10, 0x99)[..4]);
        assert_eq!(r8(&mut t, 0, FIFO), 0xff, "reception");
        feed(&mut t, &command(10, 0x99)[4..]);
        assert_eq!(t.state(), State::Reception);
        w8(&mut t, 0, STS, sts::GO);
        assert_eq!(read_all(&mut t).len(), 10);
        assert_eq!(r8(&mut t, 0, FIFO), 0xff, "all read");
        assert_eq!(r16(&mut t, 0, FIFO), 0xffff);
        // Reading in the middle of reception did not disturb the command.
        assert_eq!(t.backend().commands[0].1, command(10, 0x99));
    }

    #[test]
    fn response_retry_rewinds_the_read_pointer() {
        let mut t = tis();
        answer(&mut t, &response(16));
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, STS, READY);
        feed(&mut t, &command(10, 0x46));
        w8(&mut t, 0, STS, sts::GO);
        let first: Vec<u8> = (0..12).map(|_| r8(&mut t, 0, FIFO)).collect();
        assert_eq!(first, response(16)[..12]);
        w8(&mut t, 0, STS, sts::RESPONSE_RETRY);
        assert_eq!(r32(&mut t, 0, STS), (16 << 8) | u32::from(VALID | DATA_AVAIL));
        assert_eq!(read_all(&mut t), response(16));
        w8(&mut t, 0, STS, sts::RESPONSE_RETRY);
        assert_eq!(read_all(&mut t), response(16), "again after a full read");
        // Outside completion, responseRetry does nothing.
        w8(&mut t, 0, STS, READY);
        w8(&mut t, 0, STS, sts::RESPONSE_RETRY);
        assert_eq!(r8(&mut t, 0, STS), VALID | READY);
        assert_eq!(r8(&mut t, 0, FIFO), 0xff);
    }

    #[test]
    fn command_ready_aborts_reception_and_discards_a_response() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, STS, READY);
        feed(&mut t, &command(30, 0x15)[..20]);
        w8(&mut t, 0, STS, READY);
        assert_eq!(r8(&mut t, 0, STS), VALID | READY);
        let cmd = command(10, 0x99);
        feed(&mut t, &cmd);
        w8(&mut t, 0, STS, sts::GO);
        assert_eq!(t.backend().commands, vec![(0, cmd)], "the aborted bytes are gone");
        w8(&mut t, 0, STS, READY);
        assert_eq!(r8(&mut t, 0, STS), VALID | READY);
        assert_eq!(r8(&mut t, 0, FIFO), 0xff, "the response is gone");
    }

    #[test]
    fn seize_by_a_higher_locality() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, STS, READY);
        feed(&mut t, &command(30, 0x15)[..12]);
        // A lower or equal locality cannot seize.
        w8(&mut t, 0, ACCESS, access::SEIZE);
        assert_eq!(t.active_locality(), Some(0));
        w8(&mut t, 2, ACCESS, access::SEIZE);
        assert_eq!(t.active_locality(), Some(2));
        assert_eq!(r8(&mut t, 0, ACCESS), access::VALID | access::BEEN_SEIZED | access::ESTABLISHMENT);
        assert_eq!(r8(&mut t, 2, ACCESS), access::VALID | access::ACTIVE_LOCALITY | access::ESTABLISHMENT);
        // Locality 0's command is gone, and its registers are closed to it.
        assert_eq!(t.state(), State::Idle);
        assert_eq!(r8(&mut t, 0, STS), 0xff);
        feed(&mut t, &[1, 2, 3]);
        assert_eq!(r8(&mut t, 2, STS), VALID);
        // Locality 1 (lower than 2) cannot take it back by seizing.
        w8(&mut t, 1, ACCESS, access::SEIZE);
        assert_eq!(t.active_locality(), Some(2));
        // beenSeized is cleared by writing it.
        w8(&mut t, 0, ACCESS, access::BEEN_SEIZED);
        assert_eq!(r8(&mut t, 0, ACCESS), access::VALID | access::ESTABLISHMENT);
        // Locality 3 seizes from 2.
        w8(&mut t, 3, ACCESS, access::SEIZE | access::REQUEST_USE);
        assert_eq!(t.active_locality(), Some(3));
        assert_eq!(r8(&mut t, 2, ACCESS) & access::BEEN_SEIZED, access::BEEN_SEIZED);
        // The seizing locality's command goes to the backend as its own.
        w8(&mut t, 3, STS, READY);
        for b in command(10, 0x99) {
            w8(&mut t, 3, FIFO, b);
        }
        w8(&mut t, 3, STS, sts::GO);
        assert_eq!(t.backend().commands, vec![(3, command(10, 0x99))]);
    }

    #[test]
    fn relinquish_hands_over_to_the_highest_waiting_locality() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 1, ACCESS, access::REQUEST_USE);
        w8(&mut t, 2, ACCESS, access::REQUEST_USE);
        assert_eq!(t.active_locality(), Some(0));
        assert_eq!(
            r8(&mut t, 0, ACCESS),
            access::VALID | access::PENDING_REQUEST | access::ACTIVE_LOCALITY | access::ESTABLISHMENT
        );
        assert_eq!(
            r8(&mut t, 1, ACCESS),
            access::VALID | access::PENDING_REQUEST | access::REQUEST_USE | access::ESTABLISHMENT
        );
        // Locality 0 had a response waiting: relinquishing discards it.
        w8(&mut t, 0, STS, READY);
        feed(&mut t, &command(10, 0x99));
        w8(&mut t, 0, STS, sts::GO);
        w8(&mut t, 0, ACCESS, access::ACTIVE_LOCALITY);
        assert_eq!(t.active_locality(), Some(2));
        assert_eq!(t.state(), State::Idle);
        assert_eq!(r8(&mut t, 2, FIFO), 0xff);
        // Locality 1 withdraws its request by writing activeLocality.
        w8(&mut t, 1, ACCESS, access::ACTIVE_LOCALITY);
        assert_eq!(r8(&mut t, 1, ACCESS), access::VALID | access::ESTABLISHMENT);
        assert_eq!(r8(&mut t, 2, ACCESS) & access::PENDING_REQUEST, 0);
        w8(&mut t, 2, ACCESS, access::ACTIVE_LOCALITY);
        assert_eq!(t.active_locality(), None);
        // Relinquishing a locality one does not hold does nothing.
        w8(&mut t, 3, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, ACCESS, access::ACTIVE_LOCALITY);
        assert_eq!(t.active_locality(), Some(3));
    }

    #[test]
    fn bad_backend_answers_become_tpm_fail() {
        const TPM_FAIL_RSP: [u8; 10] = [0, 0xc4, 0, 0, 0, 10, 0, 0, 0, 9];
        let mut wrong_size = response(20);
        wrong_size[5] = 21;
        for (what, rsp) in [
            ("empty", vec![]),
            ("short", vec![0, 0xc4, 0, 0, 0, 6]),
            ("too long", response(BUFFER_SIZE + 1)),
            ("paramSize != length", wrong_size),
        ] {
            let mut t = tis();
            answer(&mut t, &rsp);
            w8(&mut t, 0, ACCESS, access::REQUEST_USE);
            w8(&mut t, 0, STS, READY);
            feed(&mut t, &command(10, 0x99));
            w8(&mut t, 0, STS, sts::GO);
            assert_eq!(t.backend().commands.len(), 1, "{what}");
            assert_eq!(read_all(&mut t), TPM_FAIL_RSP, "{what}");
        }
    }

    #[test]
    fn four_byte_fifo_accesses_move_four_bytes() {
        for fifo in [FIFO, XFIFO] {
            let mut t = tis();
            let cmd = command(22, 0x65);
            answer(&mut t, &response(30));
            w8(&mut t, 0, ACCESS, access::REQUEST_USE);
            w8(&mut t, 0, STS, READY);
            let before = t.stats.accesses;
            for chunk in cmd.chunks(4) {
                let mut word = [0u8; 4];
                word[..chunk.len()].copy_from_slice(chunk);
                t.write(at(0, fifo), chunk.len() as u8, u64::from(u32::from_le_bytes(word)));
            }
            assert_eq!(t.stats.accesses - before, 6);
            assert_eq!(r8(&mut t, 0, STS), VALID);
            w8(&mut t, 0, STS, sts::GO);
            assert_eq!(t.backend().commands, vec![(0, cmd)]);
            let mut out = Vec::new();
            for _ in 0..8 {
                out.extend_from_slice(&r32(&mut t, 0, fifo).to_le_bytes());
            }
            // 30 bytes, then 0xff for the two asked beyond the response.
            assert_eq!(&out[..30], &response(30)[..]);
            assert_eq!(&out[30..], &[0xff, 0xff]);
            assert_eq!(r8(&mut t, 0, STS), VALID);
        }
    }

    #[test]
    fn a_four_byte_write_past_param_size_marks_the_overrun() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, STS, READY);
        let cmd = command(10, 0x99);
        feed(&mut t, &cmd[..8]);
        // 4 bytes when 2 are expected.
        t.write(at(0, XFIFO), 4, 0xdddd_0000 | u64::from(u16::from_le_bytes([cmd[8], cmd[9]])));
        w8(&mut t, 0, STS, sts::GO);
        assert!(t.backend().commands.is_empty());
        assert_eq!(read_all(&mut t), BAD_PARAM_SIZE);
    }

    #[test]
    fn byte_lanes_of_wider_registers() {
        let mut t = tis();
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, STS, READY);
        // DID_VID byte by byte, and as two words.
        let bytes: Vec<u8> = (0..4).map(|i| r8(&mut t, 0, DIDVID + i)).collect();
        assert_eq!(bytes, 0x0001_1014u32.to_le_bytes());
        assert_eq!(r16(&mut t, 0, DIDVID + 2), 0x0001);
        // burstCount alone, as the 16-bit field at 0x19.
        assert_eq!(r16(&mut t, 0, STS + 1), 255);
        assert_eq!(r8(&mut t, 0, STS + 3), 0);
        // Registers narrower than their dword: the rest reads 0.
        assert_eq!(r32(&mut t, 0, ACCESS) >> 8, 0);
        assert_eq!(r32(&mut t, 0, RIDREG), u32::from(RID));
        // No register: reads 0, writes ignored.
        for off in [0x04, 0x1c, 0x28, 0x34, 0x84, 0x800, 0xf08, 0xffc] {
            assert_eq!(r32(&mut t, 0, off), 0, "{off:#x}");
            w32(&mut t, 0, off, 0xffff_ffff);
        }
        assert_eq!(t.state(), State::Ready);
        // An 8-byte read at DID_VID covers RID too.
        assert_eq!(t.read(at(0, DIDVID), 8), 0x0000_0001_0001_1014);
        // INT_ENABLE written one byte at a time (byte 3 = globalIntEnable).
        t.write(at(0, INT_ENABLE + 3), 1, 0x80);
        t.write(at(0, INT_ENABLE), 1, 0x01);
        assert_eq!(r32(&mut t, 0, INT_ENABLE), 0x8000_0001);
        // Reserved bits of INT_ENABLE do not stick.
        w32(&mut t, 0, INT_ENABLE, 0x7fff_ff60);
        assert_eq!(r32(&mut t, 0, INT_ENABLE), 0);
    }

    #[test]
    fn locality_4_and_beyond_read_ones_and_ignore_writes() {
        let mut t = tis();
        for reg in [ACCESS, STS, FIFO, DIDVID, INTF_CAPS] {
            assert_eq!(r32(&mut t, 4, reg), 0xffff_ffff);
        }
        w8(&mut t, 4, ACCESS, access::REQUEST_USE);
        w8(&mut t, 4, ACCESS, access::SEIZE);
        assert_eq!(t.active_locality(), None);
        assert_eq!(t.read(SIZE, 4), 0xffff_ffff);
        assert_eq!(t.read(u64::MAX, 8), u64::MAX);
        t.write(u64::MAX - 2, 8, 0);
        // An access straddling localities 3 and 4: each part by its own rule.
        assert_eq!(t.read(at(3, 0xffe), 4), 0xffff_0000);
        assert_eq!(t.read(SIZE - 2, 4), 0xffff_ffff);
    }

    #[test]
    fn interrupts_when_enabled() {
        let mut t = Tis::new(Recorder::default(), 7);
        assert_eq!(r8(&mut t, 0, INT_VECTOR), 7);
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        // Events while disabled leave no status.
        w8(&mut t, 0, STS, READY);
        assert_eq!(r32(&mut t, 0, INT_STATUS), 0);
        assert_eq!(t.pending_interrupt(), None);
        // Enable everything but globalIntEnable: still nothing.
        w32(&mut t, 0, INT_ENABLE, 0x8f);
        w8(&mut t, 0, STS, READY);
        feed(&mut t, &command(10, 0x99));
        w8(&mut t, 0, STS, sts::GO);
        assert_eq!(t.pending_interrupt(), None);
        w8(&mut t, 0, STS, READY);
        // Now with globalIntEnable.
        w32(&mut t, 0, INT_ENABLE, int::GLOBAL_ENABLE | 0x8f);
        feed(&mut t, &command(10, 0x99));
        assert_eq!(r32(&mut t, 0, INT_STATUS), int::STS_VALID, "Expect fell");
        w32(&mut t, 0, INT_STATUS, int::STS_VALID);
        assert_eq!(t.pending_interrupt(), None);
        w8(&mut t, 0, STS, sts::GO);
        assert_eq!(r32(&mut t, 0, INT_STATUS), int::DATA_AVAIL | int::STS_VALID);
        assert_eq!(t.pending_interrupt(), Some(7));
        // Write-1-to-clear, one bit at a time; other bits stay.
        w32(&mut t, 0, INT_STATUS, int::DATA_AVAIL);
        assert_eq!(r32(&mut t, 0, INT_STATUS), int::STS_VALID);
        assert_eq!(t.pending_interrupt(), Some(7));
        w32(&mut t, 0, INT_STATUS, 0xffff_ffff);
        assert_eq!(r32(&mut t, 0, INT_STATUS), 0);
        assert_eq!(t.pending_interrupt(), None);
        // commandReady from completion raises commandReady.
        w8(&mut t, 0, STS, READY);
        assert_eq!(r32(&mut t, 0, INT_STATUS), int::COMMAND_READY);
        w32(&mut t, 0, INT_STATUS, int::COMMAND_READY);
        // Only the enabled sources: disable dataAvail, complete a command.
        w32(&mut t, 0, INT_ENABLE, int::GLOBAL_ENABLE | int::COMMAND_READY);
        feed(&mut t, &command(10, 0x99));
        w8(&mut t, 0, STS, sts::GO);
        assert_eq!(r32(&mut t, 0, INT_STATUS), 0);
        // Locality change, on the locality that gains the TPM.
        w32(&mut t, 1, INT_ENABLE, int::GLOBAL_ENABLE | int::LOCALITY_CHANGE);
        assert_eq!(r32(&mut t, 1, INT_ENABLE), int::POLARITY_LOW_LEVEL, "not active: ignored");
        w8(&mut t, 0, ACCESS, access::ACTIVE_LOCALITY);
        w8(&mut t, 1, ACCESS, access::REQUEST_USE);
        w32(&mut t, 1, INT_ENABLE, int::GLOBAL_ENABLE | int::LOCALITY_CHANGE);
        w8(&mut t, 1, ACCESS, access::ACTIVE_LOCALITY);
        w8(&mut t, 1, ACCESS, access::REQUEST_USE);
        assert_eq!(r32(&mut t, 1, INT_STATUS), int::LOCALITY_CHANGE);
        assert_eq!(t.pending_interrupt(), Some(7));
        // INT_VECTOR 0: no line to report.
        w8(&mut t, 1, INT_VECTOR, 0);
        assert_eq!(t.pending_interrupt(), None);
    }

    #[test]
    fn reset_returns_to_power_on_state() {
        let mut t = Tis::new(Recorder::default(), 5);
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 1, ACCESS, access::REQUEST_USE);
        w32(&mut t, 0, INT_ENABLE, int::GLOBAL_ENABLE | int::DATA_AVAIL);
        w8(&mut t, 0, STS, READY);
        feed(&mut t, &command(10, 0x99));
        w8(&mut t, 0, STS, sts::GO);
        assert_eq!(t.pending_interrupt(), Some(5));
        t.reset();
        assert_eq!(t.active_locality(), None);
        assert_eq!(t.state(), State::Idle);
        assert_eq!(t.pending_interrupt(), None);
        for l in 0..4 {
            assert_eq!(r8(&mut t, l, ACCESS), access::VALID | access::ESTABLISHMENT);
            assert_eq!(r32(&mut t, l, INT_ENABLE), int::POLARITY_LOW_LEVEL);
            assert_eq!(r32(&mut t, l, INT_STATUS), 0);
        }
        assert!(t.buffer.iter().all(|&b| b == 0));
        assert_eq!(r8(&mut t, 0, INT_VECTOR), 5);
        assert_eq!(t.backend().commands.len(), 1, "the backend is kept");
    }

    #[test]
    fn a_locality_change_wipes_the_buffer() {
        let mut t = tis();
        answer(&mut t, &response(40));
        w8(&mut t, 0, ACCESS, access::REQUEST_USE);
        w8(&mut t, 0, STS, READY);
        feed(&mut t, &command(30, 0x99));
        w8(&mut t, 0, STS, sts::GO);
        assert!(t.buffer.iter().any(|&b| b != 0));
        w8(&mut t, 0, ACCESS, access::ACTIVE_LOCALITY);
        assert!(t.buffer.iter().all(|&b| b == 0));
    }

    #[test]
    fn hostile_access_sequences_never_break_the_model() {
        // A deterministic pseudo-random walk over offsets, sizes and values,
        // biased toward the interesting registers.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let hot = [ACCESS, STS, STS + 1, FIFO, XFIFO, INT_ENABLE, INT_STATUS, 0x26, 0x82];
        let mut t = tis();
        for i in 0..200_000 {
            let r = next();
            let locality = (r % 6) as u8;
            let reg = if r & 0x100 != 0 { hot[((r >> 9) % hot.len() as u64) as usize] } else { (r >> 9) & 0xfff };
            let size = [1u8, 2, 4, 8, 3, 0, 9][((r >> 24) % 7) as usize];
            let value = next();
            let offset = (u64::from(locality) << 12) | reg;
            if r & 0x200 != 0 {
                t.write(offset, size, value);
            } else {
                let v = t.read(offset, size);
                if size < 8 {
                    assert_eq!(v >> (8 * u32::from(size)), 0, "step {i}");
                }
            }
            // Occasionally a plausible command, so that execution happens.
            if i % 1000 == 0 {
                if let Some(l) = t.active_locality() {
                    w8(&mut t, l, STS, READY);
                    for b in command(10 + (r % 50) as usize, 0x99) {
                        w8(&mut t, l, FIFO, b);
                    }
                    w8(&mut t, l, STS, sts::GO);
                }
            }
            assert!(t.pos <= t.len && t.len <= BUFFER_SIZE, "step {i}");
            let burst = (r32(&mut t, 0, STS) >> 8) & 0xffff;
            assert!(burst <= u32::from(MAX_BURST) || burst == 0xffff);
        }
        assert!(t.backend().commands.len() > 10);
        for (l, c) in &t.backend().commands {
            assert!(*l < 4);
            assert!((HEADER_SIZE..=BUFFER_SIZE).contains(&c.len()));
            assert_eq!(u32::from_be_bytes([c[2], c[3], c[4], c[5]]) as usize, c.len());
        }
    }
}
