//! The `tis` target: register traffic on the virtual TIS with a vtpm-core
//! chip behind it (started, EK generated, made once per process and cloned
//! per input): reads and writes of every width at every register of every
//! locality, locality requests, seizes and relinquishes, whole commands
//! written in bursts (FIFO or XDATA_FIFO) with honest or lying `paramSize`,
//! responses drained, accesses outside the window, resets.
//!
//! Properties, after every access:
//! * the TIS never answers outside its window: an access past it, or in
//!   locality 4's page, reads all-ones and changes nothing observable;
//! * a read returns nothing wider than its size;
//! * only well-framed commands (10..=4096 bytes, `paramSize` their length)
//!   of the active locality reach the vTPM, at most one per access, and
//!   only on `tpmGo`;
//! * the active locality is one of 0-3; STS reads all-ones for any other
//!   locality, its burstCount never exceeds 255 and `dataAvail` is set
//!   exactly when a response is waiting;
//! * an interrupt is raised only on the line INT_VECTOR names, never 0;
//! * vtpm-core answers every command with a well-framed response.

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::devices::tis::{self, access, sts, State, Tis, TpmBackend};
use vtpm_core::{Platform, Tpm};

#[derive(Clone)]
pub struct FuzzPlatform(pub u64);

impl FuzzPlatform {
    pub fn new(seed: u64) -> Self {
        FuzzPlatform(seed)
    }
}

impl Platform for FuzzPlatform {
    fn fill_random(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *b = (self.0 >> 33) as u8;
        }
    }
    fn ticks_us(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        self.0
    }
}

fn frame(tag: u16, ordinal: u32, body: &[u8]) -> Vec<u8> {
    let mut v = tag.to_be_bytes().to_vec();
    v.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    v.extend_from_slice(&ordinal.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A started chip whose EK exists (generating it costs ~40 ms: once).
fn chip() -> Tpm<FuzzPlatform> {
    static CHIP: OnceLock<Tpm<FuzzPlatform>> = OnceLock::new();
    CHIP.get_or_init(|| {
        let mut t = Tpm::manufacture(FuzzPlatform(1));
        t.execute(0, &frame(0xC1, 0x99, &[0, 1]));
        t.execute(0, &frame(0xC1, 0x7C, &[0; 20]));
        t.clear_dirty();
        t
    })
    .clone()
}

fn param_size(b: &[u8]) -> Option<usize> {
    Some(u32::from_be_bytes(b.get(2..6)?.try_into().ok()?) as usize)
}

fn well_formed(b: &[u8]) -> bool {
    (10..=tis::BUFFER_SIZE).contains(&b.len()) && param_size(b) == Some(b.len())
}

/// The vTPM, recording what reaches it and checking both directions.
struct Backend {
    tpm: Tpm<FuzzPlatform>,
    /// Localities of the commands executed, in order.
    log: Vec<u8>,
}

impl TpmBackend for Backend {
    fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
        assert!(well_formed(command), "the vTPM got a badly framed command: {command:02x?}");
        assert!(locality < 4, "the vTPM got locality {locality}");
        self.log.push(locality);
        let r = self.tpm.execute(locality, command);
        assert!(well_formed(&r), "vtpm-core answered a badly framed response: {r:02x?}");
        r
    }
}

const REGISTERS: [u16; 12] = [0x0, 0x8, 0xc, 0x10, 0x14, 0x18, 0x1a, 0x24, 0x30, 0x80, 0xf00, 0xf04];

#[derive(Arbitrary, Debug)]
enum Step {
    /// A read or write at a register (+ lane) of a locality (0-5).
    Register {
        locality: u8,
        register: u8,
        lane: u8,
        size: u8,
        write: Option<u64>,
    },
    /// ACCESS with the bits a driver uses.
    Access {
        locality: u8,
        bits: u8,
    },
    /// STS with commandReady / tpmGo / responseRetry.
    Sts {
        locality: u8,
        bits: u8,
    },
    /// A command written in pieces of `width` bytes; `lie` changes paramSize.
    Command {
        locality: u8,
        body: Vec<u8>,
        ordinal: u8,
        lie: Option<u32>,
        width: u8,
        xdata: bool,
        go: bool,
    },
    /// Reads the response in pieces of `width` bytes.
    Drain {
        locality: u8,
        width: u8,
    },
    /// Anywhere, any size.
    Anywhere {
        offset: u64,
        size: u8,
        write: Option<u64>,
    },
    Reset,
}

const ORDINALS: [u32; 12] = [0x99, 0x65, 0x15, 0x14, 0x46, 0x0A, 0x0B, 0x7C, 0xC8, 0xCF, 0xF1, 0x98];

/// What software can see without side effects: ACCESS, STS, the interrupt
/// and identification registers of every locality.
fn observable(t: &mut Tis<Backend>) -> (Vec<u64>, State, Option<u8>, Option<u8>, usize) {
    let mut regs = Vec::new();
    for l in 0..5u64 {
        for r in [0x0u64, 0x8, 0xc, 0x10, 0x14, 0x18, 0xf00] {
            regs.push(t.read(l * 0x1000 + r, 4));
        }
    }
    (regs, t.state(), t.active_locality(), t.pending_interrupt(), t.backend().log.len())
}

fn size_of(size: u8) -> u8 {
    [1, 2, 4, 8, 1, 1, 4, 3][usize::from(size % 8)]
}

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let irq = u.int_in_range(0..=15u8).unwrap_or(0);
    let mut t = Tis::new(Backend { tpm: chip(), log: Vec::new() }, irq);
    for _ in 0..256 {
        let Ok(step) = Step::arbitrary(&mut u) else { break };
        let executed = t.backend().log.len();
        let active = t.active_locality();
        match step {
            Step::Register { locality, register, lane, size, write } => {
                let offset = u64::from(locality % 6) * 0x1000
                    + u64::from(REGISTERS[usize::from(register) % REGISTERS.len()])
                    + u64::from(lane % 4);
                access_at(&mut t, offset, size_of(size), write);
            }
            Step::Access { locality, bits } => {
                let bits = bits & (access::REQUEST_USE | access::SEIZE | access::BEEN_SEIZED | access::ACTIVE_LOCALITY);
                access_at(&mut t, u64::from(locality % 5) * 0x1000, 1, Some(u64::from(bits)));
            }
            Step::Sts { locality, bits } => {
                let bits = bits & (sts::COMMAND_READY | sts::GO | sts::RESPONSE_RETRY);
                access_at(&mut t, u64::from(locality % 5) * 0x1000 + 0x18, 1, Some(u64::from(bits)));
            }
            Step::Command { locality, body, ordinal, lie, width, xdata, go } => {
                let base = u64::from(locality % 5) * 0x1000;
                let mut c = frame(0xC1, ORDINALS[usize::from(ordinal) % ORDINALS.len()], &body);
                if let Some(size) = lie {
                    c[2..6].copy_from_slice(&size.to_be_bytes());
                }
                access_at(&mut t, base + 0x18, 1, Some(u64::from(sts::COMMAND_READY)));
                let n = usize::from(size_of(width).min(4));
                for piece in c.chunks(n) {
                    let mut v = 0u64;
                    for (i, b) in piece.iter().enumerate() {
                        v |= u64::from(*b) << (8 * i);
                    }
                    access_at(&mut t, base + if xdata { 0x80 } else { 0x24 }, piece.len() as u8, Some(v));
                }
                if go {
                    let before = t.backend().log.len();
                    access_at(&mut t, base + 0x18, 1, Some(u64::from(sts::GO)));
                    if t.backend().log.len() > before {
                        assert_eq!(Some(locality % 5), t.active_locality(), "a command ran for another locality");
                    }
                }
            }
            Step::Drain { locality, width } => {
                let base = u64::from(locality % 5) * 0x1000;
                let n = size_of(width).min(4);
                for _ in 0..tis::BUFFER_SIZE {
                    // All-ones: not this locality's TPM (a driver stops too).
                    let status = access_at(&mut t, base + 0x18, 1, None);
                    if status == 0xff || status & u64::from(sts::DATA_AVAIL) == 0 {
                        break;
                    }
                    access_at(&mut t, base + 0x24, n, None);
                }
            }
            Step::Anywhere { offset, size, write } => {
                access_at(&mut t, offset, size, write);
            }
            Step::Reset => t.reset(),
        }
        let log = &t.backend().log;
        assert!(log.len() <= executed + 1, "one step ran two commands");
        if log.len() > executed {
            assert_eq!(Some(log[log.len() - 1]), active, "a command ran for a locality that was not active");
        }
        check_invariants(&mut t);
    }
}

/// One access; for an access entirely outside the window or in locality 4's
/// page, checks that it answers all-ones and changes nothing.
fn access_at(t: &mut Tis<Backend>, offset: u64, size: u8, write: Option<u64>) -> u64 {
    let outside = offset >= tis::SIZE || (offset >= 0x4000 && offset.saturating_add(u64::from(size)) <= tis::SIZE);
    let before = outside.then(|| observable(t));
    let executed = t.backend().log.len();
    let value = match write {
        Some(v) => {
            t.write(offset, size, v);
            0
        }
        None => t.read(offset, size),
    };
    let width = size.min(8);
    if write.is_none() && width < 8 {
        assert_eq!(value >> (8 * u32::from(width)), 0, "read {offset:#x}/{size}: {value:#x} is wider than the read");
    }
    if let Some(before) = before {
        if write.is_none() {
            let ones = if width >= 8 { u64::MAX } else { (1u64 << (8 * u32::from(width))) - 1 };
            assert_eq!(value, ones, "read outside the window at {offset:#x}/{size} answered {value:#x}");
        }
        assert_eq!(observable(t), before, "an access outside the window at {offset:#x}/{size} changed the TIS");
    }
    if write.is_none() {
        assert_eq!(t.backend().log.len(), executed, "a read ran a command");
    }
    value
}

fn check_invariants(t: &mut Tis<Backend>) {
    let active = t.active_locality();
    assert!(active.is_none_or(|l| l < 4), "active locality {active:?}");
    let vector = t.read(0xc, 1) as u8;
    assert!(t.pending_interrupt().is_none_or(|v| v == vector && v != 0), "interrupt off its line");
    for l in 0..5u8 {
        let status = t.read(u64::from(l) * 0x1000 + 0x18, 4);
        if active != Some(l) {
            assert_eq!(status, 0xffff_ffff, "locality {l} (not active) sees STS {status:#x}");
            continue;
        }
        let burst = (status >> 8) & 0xffff;
        assert!(burst <= u64::from(tis::MAX_BURST), "burstCount {burst}");
        assert_ne!(status & u64::from(sts::VALID), 0);
        let avail = status & u64::from(sts::DATA_AVAIL) != 0;
        assert_eq!(avail, t.state() == State::Completion && burst > 0, "STS {status:#x} in {:?}", t.state());
    }
}
