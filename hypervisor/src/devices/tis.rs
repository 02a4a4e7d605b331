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
//! - **stsValid** is always 1: execution is synchronous, so `dataAvail` and
//!   `Expect` are always valid when read.
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

/// What executes complete commands: the vTPM. Synchronous: the answer is
/// there when `execute` returns.
pub trait TpmBackend {
    /// Runs one command (10..=4096 bytes, `paramSize` equal to its length)
    /// sent from `locality` (0..=3) and returns the response.
    fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8>;
}

impl<T: TpmBackend + ?Sized> TpmBackend for Box<T> {
    fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
        (**self).execute(locality, command)
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
    RegisterInfo {
        offset,
        width,
        name,
        register,
        read,
        write,
    }
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
        reg(
            0x014,
            4,
            "INTF_CAPABILITY",
            IntfCapability,
            R::Any,
            W::ReadOnly,
        ),
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

/// The command state (TIS 1.2 section 5.6.12). There is no visible
/// Execution state: the backend is synchronous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Idle,
    /// commandReady: waiting for the first byte.
    Ready,
    /// Command bytes arriving.
    Reception,
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
        let value = match info.register {
            Register::DataFifo | Register::XDataFifo => return self.fifo_read(n),
            Register::Access => u32::from(self.access_value(locality)),
            Register::IntEnable => self.int_enable[usize::from(locality)],
            Register::IntVector => u32::from(self.int_vector),
            Register::IntStatus => self.int_status[usize::from(locality)],
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
                let old = self.int_enable[l];
                self.int_enable[l] = ((old & !lanes) | (bits & lanes)) & writable;
            }
            Register::IntVector if lane == 0 => self.int_vector = piece as u8 & 0xf,
            Register::IntStatus => self.int_status[l] &= !(bits & lanes),
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
                let next = (0..GUEST_LOCALITIES)
                    .rev()
                    .find(|&l| self.requests & (1 << l) != 0);
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
        let b = self.buffer.get(2..6)?;
        if self.len < 6 {
            return None;
        }
        let size = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        usize::try_from(size).ok()
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
            State::Reception => 0,
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
            sts::GO => {
                if self.state == State::Reception && !self.expecting() {
                    self.execute(locality);
                }
            }
            sts::RESPONSE_RETRY => {
                if self.state == State::Completion {
                    self.pos = 0;
                }
            }
            _ => {}
        }
    }

    fn fifo_write(&mut self, n: u8, bytes: u32) {
        match self.state {
            State::Ready => self.reset_command(State::Reception),
            State::Reception => {}
            State::Idle | State::Completion => return,
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
            let response = self.backend.execute(locality, command);
            self.stats.commands = self.stats.commands.wrapping_add(1);
            let consistent = Self::size_acceptable(response.len())
                && response
                    .get(2..6)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes)
                    .and_then(|s| usize::try_from(s).ok())
                    == Some(response.len());
            match self.buffer.get_mut(..response.len()) {
                Some(dst) if consistent => {
                    dst.copy_from_slice(&response);
                    self.len = response.len();
                }
                _ => self.error_response(TPM_FAIL),
            }
        } else {
            self.error_response(TPM_BAD_PARAM_SIZE);
        }
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
        if let (Some(&enable), Some(status)) = (self.int_enable.get(l), self.int_status.get_mut(l))
        {
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
