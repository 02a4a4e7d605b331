//! A small TPM TIS 1.2 driver and the vTPM test: it talks to the guest's
//! virtual TPM at 0xFED40000 as a real driver would, reads the measured-launch
//! event log by hypercall, and checks the two against each other.

use core::arch::asm;

use super::{check, hypercall_raw_args, Console};
use core::fmt::Write;

const TIS: usize = 0xfed4_0000;
const ACCESS: usize = 0x00;
const STS: usize = 0x18;
const DATA_FIFO: usize = 0x24;
const DID_VID: usize = 0xf00;

const ACCESS_VALID: u8 = 0x80;
const ACCESS_ACTIVE: u8 = 0x20;
const ACCESS_REQUEST: u8 = 0x02;
const STS_VALID: u8 = 0x80;
const STS_COMMAND_READY: u8 = 0x40;
const STS_GO: u8 = 0x20;
const STS_DATA_AVAIL: u8 = 0x10;
const STS_EXPECT: u8 = 0x08;

// MMIO through explicit MOVs, as Linux's readb/writel do: a plain volatile
// access may be folded into another instruction (`test byte [r12], 0x40`),
// which the hypervisor's MMIO emulation does not take.

fn r8(off: usize) -> u8 {
    let v: u8;
    // SAFETY: a read of the vTIS window, which exits to the hypervisor.
    unsafe { asm!("mov {}, byte ptr [{}]", out(reg_byte) v, in(reg) TIS + off, options(nostack)) };
    v
}

fn w8(off: usize, v: u8) {
    // SAFETY: as above, a write.
    unsafe { asm!("mov byte ptr [{}], {}", in(reg) TIS + off, in(reg_byte) v, options(nostack)) };
}

fn r32(off: usize) -> u32 {
    let v: u32;
    // SAFETY: as above.
    unsafe { asm!("mov {:e}, dword ptr [{}]", out(reg) v, in(reg) TIS + off, options(nostack)) };
    v
}

fn w32(off: usize, v: u32) {
    // SAFETY: as above.
    unsafe { asm!("mov dword ptr [{}], {:e}", in(reg) TIS + off, in(reg) v, options(nostack)) };
}

/// Polls until `mask` is set in the low byte of STS, with a bound.
fn wait_sts(mask: u8) -> bool {
    (0..100_000).any(|_| r8(STS) & mask == mask)
}

fn burst() -> usize {
    ((r32(STS) >> 8) & 0xffff) as usize
}

/// The driver. `wide` moves four FIFO bytes per access (TIS 1.3), else one.
pub struct Tis {
    wide: bool,
}

/// Largest command or response this driver handles.
const MAX: usize = 4096;

impl Tis {
    pub fn open(wide: bool) -> Option<Tis> {
        w8(ACCESS, ACCESS_REQUEST);
        let granted = (0..1000).any(|_| r8(ACCESS) & (ACCESS_VALID | ACCESS_ACTIVE) == ACCESS_VALID | ACCESS_ACTIVE);
        granted.then_some(Tis { wide })
    }

    /// Sends one command and reads the response into `out`; returns its length.
    pub fn transact(&mut self, command: &[u8], out: &mut [u8; MAX]) -> Option<usize> {
        w8(STS, STS_COMMAND_READY);
        if !wait_sts(STS_COMMAND_READY) {
            return None;
        }
        let mut sent = 0;
        while sent < command.len() {
            let n = burst().max(1).min(command.len() - sent);
            let mut i = 0;
            while i < n {
                if self.wide && n - i >= 4 {
                    let word = u32::from_le_bytes([
                        command[sent + i],
                        command[sent + i + 1],
                        command[sent + i + 2],
                        command[sent + i + 3],
                    ]);
                    w32(DATA_FIFO, word);
                    i += 4;
                } else {
                    w8(DATA_FIFO, command[sent + i]);
                    i += 1;
                }
            }
            sent += n;
            let expect = r8(STS) & STS_EXPECT != 0;
            if expect != (sent < command.len()) {
                return None;
            }
        }
        w8(STS, STS_GO);
        if !wait_sts(STS_VALID | STS_DATA_AVAIL) {
            return None;
        }
        let mut got = 0;
        let mut total = 10;
        while got < total {
            let n = burst().max(1).min(total - got);
            let mut i = 0;
            while i < n {
                if self.wide && n - i >= 4 {
                    out[got + i..got + i + 4].copy_from_slice(&r32(DATA_FIFO).to_le_bytes());
                    i += 4;
                } else {
                    out[got + i] = r8(DATA_FIFO);
                    i += 1;
                }
            }
            got += n;
            if got >= 10 && total == 10 {
                total = u32::from_be_bytes([out[2], out[3], out[4], out[5]]) as usize;
                if !(10..=MAX).contains(&total) {
                    return None;
                }
            }
        }
        let done = r8(STS) & STS_DATA_AVAIL == 0;
        w8(STS, STS_COMMAND_READY);
        done.then_some(total)
    }
}

fn command(ordinal: u32, params: &[u8], buf: &mut [u8; 64]) -> usize {
    let len = 10 + params.len();
    buf[0..2].copy_from_slice(&0x00c1u16.to_be_bytes());
    buf[2..6].copy_from_slice(&(len as u32).to_be_bytes());
    buf[6..10].copy_from_slice(&ordinal.to_be_bytes());
    buf[10..len].copy_from_slice(params);
    len
}

fn code(response: &[u8]) -> u32 {
    u32::from_be_bytes([response[6], response[7], response[8], response[9]])
}

fn hex20(d: &[u8]) -> Hex<'_> {
    Hex(d)
}

pub struct Hex<'a>(&'a [u8]);

impl core::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn sha1(data: &[u8]) -> [u8; 20] {
    sha1_smol::Sha1::from(data).digest().bytes()
}

fn extend(old: [u8; 20], digest: &[u8]) -> [u8; 20] {
    let mut s = sha1_smol::Sha1::new();
    s.update(&old);
    s.update(digest);
    s.digest().bytes()
}

static mut RESPONSE: [u8; MAX] = [0; MAX];
static mut LOG: [u8; 16384] = [0; 16384];

/// The vTPM test: every check prints `ok:` or `FAIL:`; the values the
/// harness compares are printed as `key=hex` lines.
pub fn run(wide: bool) {
    let did_vid = r32(DID_VID);
    check(did_vid == 0x0001_1014, format_args!("TIS DID_VID {did_vid:#010x}"));
    let Some(mut tis) = Tis::open(wide) else {
        check(false, format_args!("locality 0 granted"));
        return;
    };
    check(true, format_args!("locality 0 granted"));
    // SAFETY: single-threaded guest; these buffers are used by this function only.
    let out = unsafe { &mut *core::ptr::addr_of_mut!(RESPONSE) };
    let mut cmd = [0u8; 64];

    // The hypervisor started the TPM before launching us (measured launch).
    let n = command(0x99, &1u16.to_be_bytes(), &mut cmd);
    let ok = tis.transact(&cmd[..n], out).is_some_and(|len| len == 10 && code(&out[..len]) == 0x26);
    check(ok, format_args!("Startup answers INVALID_POSTINIT: the launch started the TPM"));

    // GetCapability(PROPERTY, TPM_CAP_PROP_PCR): 24 PCRs.
    let mut params = [0u8; 12];
    params[0..4].copy_from_slice(&5u32.to_be_bytes());
    params[4..8].copy_from_slice(&4u32.to_be_bytes());
    params[8..12].copy_from_slice(&0x101u32.to_be_bytes());
    let n = command(0x65, &params, &mut cmd);
    let pcrs = tis
        .transact(&cmd[..n], out)
        .filter(|&l| l == 18 && code(&out[..l]) == 0)
        .map(|_| u32::from_be_bytes([out[14], out[15], out[16], out[17]]));
    check(pcrs == Some(24), format_args!("GetCapability reports 24 PCRs ({pcrs:?})"));

    // The event log, by hypercall, replayed.
    // SAFETY: as above.
    let log = unsafe { &mut *core::ptr::addr_of_mut!(LOG) };
    let total = hypercall_raw_args(0x20, [log.as_ptr() as u64, log.len() as u64, 0, 0]);
    check((1..=log.len() as i64).contains(&total), format_args!("event log read ({total} bytes)"));
    let mut replayed = [[0u8; 20]; 24];
    let mut at = 0usize;
    while total > 0 && at + 32 <= total as usize {
        let word = |o: usize| u32::from_le_bytes([log[o], log[o + 1], log[o + 2], log[o + 3]]);
        let (pcr, kind, size) = (word(at) as usize, word(at + 4), word(at + 28) as usize);
        let digest = &log[at + 8..at + 28];
        let data = &log[at + 32..(at + 32 + size).min(total as usize)];
        say!(
            "event pcr={pcr} type={kind:#x} digest={} data=\"{}\"",
            hex20(digest),
            core::str::from_utf8(data).unwrap_or("?")
        );
        if pcr < 24 {
            replayed[pcr] = extend(replayed[pcr], digest);
        }
        at += 32 + size;
    }

    for pcr in [8u32, 9] {
        let n = command(0x15, &pcr.to_be_bytes(), &mut cmd);
        let value = tis.transact(&cmd[..n], out).filter(|&l| l == 30 && code(&out[..l]) == 0).map(|_| {
            let mut v = [0u8; 20];
            v.copy_from_slice(&out[10..30]);
            v
        });
        match value {
            Some(v) => {
                say!("pcr{pcr}={}", hex20(&v));
                check(v == replayed[pcr as usize], format_args!("PCR {pcr} equals the event log's replay"));
            }
            None => check(false, format_args!("PCRRead {pcr}")),
        }
    }

    // Extend the debug PCR 16 and check the TPM's arithmetic.
    let before = {
        let n = command(0x15, &16u32.to_be_bytes(), &mut cmd);
        tis.transact(&cmd[..n], out).map(|_| {
            let mut v = [0u8; 20];
            v.copy_from_slice(&out[10..30]);
            v
        })
    };
    let mut params = [0u8; 24];
    params[0..4].copy_from_slice(&16u32.to_be_bytes());
    params[4..24].copy_from_slice(&sha1(b"ctvm test guest"));
    let n = command(0x14, &params, &mut cmd);
    let after = tis.transact(&cmd[..n], out).filter(|&l| l == 30 && code(&out[..l]) == 0).map(|_| {
        let mut v = [0u8; 20];
        v.copy_from_slice(&out[10..30]);
        v
    });
    let expected = before.map(|b| extend(b, &sha1(b"ctvm test guest")));
    check(after.is_some() && after == expected, format_args!("Extend of PCR 16 computes SHA-1(old || digest)"));

    // GetRandom(32): 32 bytes, not all equal.
    let n = command(0x46, &32u32.to_be_bytes(), &mut cmd);
    let random = tis.transact(&cmd[..n], out).filter(|&l| l == 46 && code(&out[..l]) == 0);
    let varied = random.is_some() && out[14..46].iter().any(|&b| b != out[14]);
    check(varied, format_args!("GetRandom returns 32 varied bytes"));

    // ReadPubek: the EK, summarised by the SHA-1 of the public key structure.
    let mut nonce = [0u8; 20];
    nonce[0] = 0x5a;
    let n = command(0x7c, &nonce, &mut cmd);
    match tis.transact(&cmd[..n], out).filter(|&l| l > 30 && code(&out[..l]) == 0) {
        Some(len) => {
            say!("ek={}", hex20(&sha1(&out[10..len - 20])));
            check(true, format_args!("ReadPubek returns the endorsement key"));
        }
        None => check(false, format_args!("ReadPubek returns the endorsement key")),
    }
}

/// Costs through the vTIS, in TSC ticks (on Bochs, emulated instructions,
/// the hypervisor's included): one STS read, and a 34-byte Extend (10-byte
/// response) with byte-wide and 4-byte FIFO access.
pub fn cost(rdtsc: fn() -> u64, per_k: u64) {
    const READS: u64 = 1000;
    const EXTENDS: u64 = 50;
    let start = rdtsc();
    for _ in 0..READS {
        core::hint::black_box(r8(STS));
    }
    let per_read = (rdtsc() - start) / READS;
    say_cost("vTIS STS read", per_read, per_k);
    // SAFETY: single-threaded guest; the buffer is used by this function only.
    let out = unsafe { &mut *core::ptr::addr_of_mut!(RESPONSE) };
    let mut cmd = [0u8; 64];
    let mut params = [0u8; 24];
    params[0..4].copy_from_slice(&16u32.to_be_bytes());
    let n = command(0x14, &params, &mut cmd);
    for (wide, name) in [(false, "Extend, byte FIFO"), (true, "Extend, 4-byte FIFO")] {
        let Some(mut tis) = Tis::open(wide) else {
            check(false, format_args!("locality 0 granted"));
            return;
        };
        let start = rdtsc();
        let ok = (0..EXTENDS).all(|_| tis.transact(&cmd[..n], out).is_some_and(|l| l == 30 && code(&out[..l]) == 0));
        check(ok, format_args!("{EXTENDS} Extends of PCR 16 ({name})"));
        say_cost(name, (rdtsc() - start) / EXTENDS, per_k);
    }
}

/// One cost line: TSC ticks, and instructions at `per_k` ticks per 1000.
pub fn say_cost(what: &str, ticks: u64, per_k: u64) {
    let mut c = Console;
    let _ = writeln!(c, "cost {what}: {ticks} ticks, about {} instructions", ticks * 1000 / per_k);
}
