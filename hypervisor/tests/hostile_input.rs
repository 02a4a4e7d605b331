//! Hostile-input tests: thousands of random and mutated inputs thrown at the
//! hypervisor's host-testable surfaces, each checked against a property
//! that must hold for every input, not only for the inputs a driver or an
//! agent would send.
//!
//! The rule they enforce: what a guest controls (hypercall registers, the
//! bytes behind its pointers, its page tables, the instruction at an MMIO
//! fault, the TIS registers and TPM command bytes) and what a boot module
//! carries (command lines, kernel images) never panics the hypervisor or
//! corrupts its state. The worst outcome is the offending guest stopped,
//! or its request refused, with a clear error.
//!
//! Everything is deterministic: a small xorshift generator with a fixed seed
//! per test, so a failure names its case and reproduces. `CTVM_FUZZ_SCALE=N`
//! runs N times as many cases (the seeds stay the same).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};

use hypervisor::guest::memory::{GuestMemory, HostPhys};
use hypervisor::mm::frames::Region;
use hypervisor::vcpu::{ExitInfo, Field, GuestRegisters, VcpuState};

// ---------------------------------------------------------------------------
// Harness: a deterministic generator, fake host memory, a fake vCPU.
// ---------------------------------------------------------------------------

/// xorshift64*: small, fast, and good enough to explore input spaces.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng((seed ^ 0x5dee_ce66_d1ce_4e5b).max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn upto(&mut self, n: usize) -> usize {
        self.below(n as u64 + 1) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    /// A value from the places where arithmetic goes wrong.
    fn edgy(&mut self) -> u64 {
        match self.below(12) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => u64::MAX - self.below(0x2000),
            4 => 1 << 63,
            5 => 0xffff_8000_0000_0000 + self.below(0x1_0000),
            6 => 0x0000_7fff_ffff_f000 + self.below(0x2000),
            7 => self.below(0x1_0000),
            8 => u64::from(u32::MAX) + self.below(3),
            9 => 1 << self.below(64),
            _ => self.next(),
        }
    }
}

/// How many cases to run: `n` times `CTVM_FUZZ_SCALE` (default 1).
fn scaled(n: usize) -> usize {
    let scale = std::env::var("CTVM_FUZZ_SCALE").ok().and_then(|s| s.parse::<usize>().ok()).unwrap_or(1);
    n * scale.max(1)
}

/// A few random edits of `seed`: bit flips, replaced, inserted and deleted
/// bytes, truncation, and boundary values written over it.
fn mutate(rng: &mut Rng, seed: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() as u64 + 1) as usize;
        match rng.below(8) {
            0 if at < v.len() => v[at] ^= 1 << rng.below(8),
            1 if at < v.len() => v[at] = rng.byte(),
            2 => v.insert(at, rng.byte()),
            3 if at < v.len() => {
                v.remove(at);
            }
            4 => v.truncate(at),
            5 => v.insert(at, rng.pick(&[0x00, 0xff, 0x7f, 0x80, 0x66, 0x67, 0xf0, 0xf2, 0xf3, 0x48, 0x4f, 0x0f])),
            6 if at + 4 <= v.len() => v[at..at + 4].copy_from_slice(&(rng.edgy() as u32).to_le_bytes()),
            _ => v.push(rng.byte()),
        }
    }
    v.truncate(max_len);
    v
}

/// Host-physical memory behind one guest's RAM: a buffer at `base`. Any
/// access outside it means the hypervisor followed a guest-controlled
/// address out of the guest's own memory, and fails the test.
struct Ram {
    base: u64,
    bytes: RefCell<Vec<u8>>,
    reads: Cell<u64>,
}

impl Ram {
    fn new(base: u64, len: usize) -> Self {
        Ram { base, bytes: RefCell::new(vec![0; len]), reads: Cell::new(0) }
    }

    fn offset(&self, hpa: u64, len: usize) -> usize {
        let size = self.bytes.borrow().len() as u64;
        match hpa.checked_sub(self.base) {
            Some(off) if off.checked_add(len as u64).is_some_and(|end| end <= size) => off as usize,
            _ => panic!("the hypervisor touched host memory outside the guest: {hpa:#x}+{len:#x}"),
        }
    }
}

impl HostPhys for Ram {
    fn read(&self, hpa: u64, buf: &mut [u8]) {
        self.reads.set(self.reads.get() + 1);
        let at = self.offset(hpa, buf.len());
        buf.copy_from_slice(&self.bytes.borrow()[at..at + buf.len()]);
    }

    fn write(&self, hpa: u64, data: &[u8]) {
        let at = self.offset(hpa, data.len());
        self.bytes.borrow_mut()[at..at + data.len()].copy_from_slice(data);
    }

    fn compare_exchange_u64(&self, hpa: u64, current: u64, new: u64) -> bool {
        assert_eq!(hpa % 8, 0, "a compare-and-exchange must be aligned");
        let mut b = [0u8; 8];
        self.read(hpa, &mut b);
        let ok = u64::from_le_bytes(b) == current;
        if ok {
            self.write(hpa, &new.to_le_bytes());
        }
        ok
    }
}

/// Guest RAM at guest-physical 0, backed by a [`Ram`] at host 0x1000_0000.
struct GuestRam {
    memory: GuestMemory,
    phys: Ram,
}

const HOST_BASE: u64 = 0x1000_0000;

impl GuestRam {
    fn new(size: u64) -> Self {
        let mut memory = GuestMemory::new();
        memory.add(Region::new(0, size), HOST_BASE).unwrap();
        GuestRam { memory, phys: Ram::new(HOST_BASE, size as usize) }
    }

    fn size(&self) -> u64 {
        self.memory.size()
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        self.memory.write(&self.phys, gpa, data).unwrap();
    }

    fn u64_at(&self, gpa: u64) -> u64 {
        let mut b = [0; 8];
        self.memory.read(&self.phys, gpa, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    fn snapshot(&self) -> Vec<u8> {
        self.phys.bytes.borrow().clone()
    }
}

const PTE_PRESENT_RW: u64 = 0x3;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Builds 4-level page tables with 4 KiB pages in guest RAM, taking table
/// pages from `next` upwards.
struct Mapper {
    pml4: u64,
    next: u64,
}

impl Mapper {
    fn new(pml4: u64, next: u64) -> Self {
        Mapper { pml4, next }
    }

    fn table(&mut self, g: &GuestRam, table: u64, index: u64) -> u64 {
        let e = g.u64_at(table + index * 8);
        if e & 1 != 0 {
            return e & PTE_ADDR;
        }
        let t = self.next;
        self.next += 0x1000;
        g.write(t, &[0; 4096]);
        g.write(table + index * 8, &(t | 0x7).to_le_bytes());
        t
    }

    /// Maps the 4 KiB page at `va` to `gpa`; returns the PTE's address.
    fn map(&mut self, g: &GuestRam, va: u64, gpa: u64) -> u64 {
        let idx = |level: u32| (va >> (12 + 9 * (level - 1))) & 0x1ff;
        let pdpt = self.table(g, self.pml4, idx(4));
        let pd = self.table(g, pdpt, idx(3));
        let pt = self.table(g, pd, idx(2));
        let at = pt + idx(1) * 8;
        g.write(at, &(gpa | PTE_PRESENT_RW).to_le_bytes());
        at
    }
}

/// A vCPU over a map, comparable before and after a refused operation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Vcpu {
    regs: GuestRegisters,
    fields: BTreeMap<Field, u64>,
}

impl VcpuState for Vcpu {
    fn regs(&mut self) -> &mut GuestRegisters {
        &mut self.regs
    }
    fn read(&self, field: Field) -> u64 {
        self.fields.get(&field).copied().unwrap_or(0)
    }
    fn write(&mut self, field: Field, value: u64) {
        self.fields.insert(field, value);
    }
}

/// The bytes of an ABI structure, as the guest lays it out in memory.
fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: the ABI structures are repr(C) plain data without padding holes.
    unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), core::mem::size_of::<T>()) }.to_vec()
}

const CR0_PE_PG: u64 = 0x8000_0001;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME_LMA_NXE: u64 = (1 << 8) | (1 << 10) | (1 << 11);
/// CS access rights of 64-bit kernel code (L = 1, DPL 0).
const CS_LONG: u64 = 0xa09b;

/// A vCPU in 64-bit mode on page tables rooted at `cr3`.
fn long_mode_vcpu(cr3: u64) -> Vcpu {
    let mut v = Vcpu::default();
    v.write(Field::Cr0, CR0_PE_PG | (1 << 16));
    v.write(Field::Cr3, cr3);
    v.write(Field::Cr4, CR4_PAE);
    v.write(Field::Efer, EFER_LME_LMA_NXE);
    v.write(Field::CsAccessRights, CS_LONG);
    v.write(Field::SsAccessRights, 0x93);
    v.write(Field::Rflags, 0x2);
    v
}

fn reg_by_index(regs: &mut GuestRegisters, index: u8) -> Option<&mut u64> {
    Some(match index {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        15 => &mut regs.r15,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// MMIO: the instruction decoder.
// ---------------------------------------------------------------------------

mod mmio_decoder {
    use super::*;
    use hypervisor::mmio::decode::{decode, instruction_length, DecodeError, Extend, MmioOp, Source};

    /// Emulated and refused encodings to mutate from.
    pub const SEEDS: &[&[u8]] = &[
        &[0x8a, 0x00],
        &[0x8b, 0x01],
        &[0x48, 0x8b, 0x02],
        &[0x66, 0x44, 0x8b, 0x7f, 0x10],
        &[0x44, 0x8b, 0x44, 0x98, 0x24],
        &[0x4d, 0x8b, 0x65, 0x00],
        &[0x8a, 0x20],
        &[0x40, 0x8a, 0x30],
        &[0x0f, 0xb6, 0x47, 0x24],
        &[0x4c, 0x0f, 0xb6, 0x10],
        &[0x48, 0x0f, 0xbf, 0x10],
        &[0x48, 0x63, 0x03],
        &[0xa1, 0x00, 0x0f, 0xd4, 0xfe, 0, 0, 0, 0],
        &[0x48, 0xa3, 0x80, 0x00, 0xd4, 0xfe, 0, 0, 0, 0],
        &[0x67, 0x8b, 0x01],
        &[0x8b, 0x05, 0x00, 0x01, 0x00, 0x00],
        &[0x64, 0x8b, 0x08],
        &[0x88, 0x08],
        &[0x48, 0x89, 0x08],
        &[0x88, 0x20],
        &[0xc6, 0x40, 0x24, 0x40],
        &[0x66, 0xc7, 0x00, 0x34, 0x12],
        &[0x48, 0xc7, 0x00, 0xfe, 0xff, 0xff, 0xff],
        &[0x47, 0x89, 0x54, 0xc8, 0x18],
        &[0xc7, 0x05, 0x20, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00],
        // Refused: string, LOCK, XCHG, AVX, SSE, register-only, RMW.
        &[0xf3, 0xa5],
        &[0xf0, 0x83, 0x00, 0x01],
        &[0x87, 0x08],
        &[0xc5, 0xfe, 0x6f, 0x00],
        &[0xf3, 0x0f, 0x6f, 0x00],
        &[0x89, 0xc8],
        &[0xff, 0x40, 0xf0],
        // EVEX and XOP, which this build does not decode at all.
        &[0x62, 0xf1, 0x7c, 0x48, 0x10, 0x00],
        &[0x8f, 0xe9, 0x78, 0x01, 0xc8],
    ];

    const PREFIXES: &[u8] = &[0x66, 0x67, 0xf0, 0xf2, 0xf3, 0x2e, 0x36, 0x3e, 0x26, 0x64, 0x65, 0x40, 0x48, 0x4c, 0x41];

    /// Bytes to decode: random, mutated from a seed, or a seed behind a
    /// random run of prefixes (possibly more than 15 bytes in all).
    pub fn instruction_bytes(rng: &mut Rng) -> Vec<u8> {
        match rng.below(4) {
            0 => {
                let n = rng.upto(20);
                rng.bytes(n)
            }
            1 => {
                let mut v: Vec<u8> = (0..rng.upto(16)).map(|_| rng.pick(PREFIXES)).collect();
                v.extend_from_slice(rng.pick(SEEDS));
                v
            }
            _ => {
                let seed = rng.pick(SEEDS);
                let mut v = mutate(rng, seed, 24);
                if rng.chance(50) {
                    let n = rng.upto(8);
                    v.extend(rng.bytes(n));
                }
                v
            }
        }
    }

    fn mask(size: u8) -> u64 {
        if size >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * size)) - 1
        }
    }

    /// The decoded operation is one the emulator can carry out exactly.
    fn check_op(op: &MmioOp, what: &str) {
        let size = op.size();
        assert!(matches!(size, 1 | 2 | 4 | 8), "{what}: access size {size}");
        match *op {
            MmioOp::Load { dst, extend, .. } => {
                assert!(dst.index < 16 && matches!(dst.size, 1 | 2 | 4 | 8), "{what}: destination {dst:?}");
                assert!(!dst.high_byte || (dst.size == 1 && dst.index < 4), "{what}: high byte {dst:?}");
                match extend {
                    Extend::None => assert_eq!(dst.size, size, "{what}: MOV changes width"),
                    // MOVSXD r32/r16 extends to the same width (a 32-bit write zero-extends).
                    Extend::Zero | Extend::Sign => assert!(dst.size >= size, "{what}: extension narrows"),
                }
            }
            MmioOp::Store { src: Source::Gpr(g), .. } => {
                assert!(g.index < 16 && g.size == size, "{what}: source {g:?} for a {size}-byte store");
                assert!(!g.high_byte || (g.size == 1 && g.index < 4), "{what}: high byte {g:?}");
            }
            MmioOp::Store { src: Source::Imm(v), .. } => {
                // Immediates are the access width, except REX.W C7's sign-extended imm32.
                let fits = v & !mask(size) == 0 || (size == 8 && (v as i64) == i64::from(v as i32));
                assert!(fits, "{what}: immediate {v:#x} for a {size}-byte store");
            }
        }
    }

    #[test]
    fn decoder_never_reads_or_reports_past_the_instruction() {
        let mut rng = Rng::new(0xdec0de);
        let (mut ok, mut refused, mut truncated) = (0, 0, 0);
        for case in 0..scaled(30_000) {
            let bytes = instruction_bytes(&mut rng);
            let bitness = rng.pick(&[64, 64, 64, 32, 16]);
            let rip = rng.edgy();
            let what = format!("case {case}: {bytes:02x?} in {bitness}-bit code");
            let result = decode(&bytes, bitness, rip);
            match &result {
                Ok(d) => {
                    ok += 1;
                    let len = usize::from(d.len);
                    assert!((1..=15).contains(&len) && len <= bytes.len(), "{what}: length {len}");
                    assert_eq!(d.instruction.len(), len, "{what}");
                    check_op(&d.op, &what);
                    // Self-delimiting: the instruction's own bytes decode the same.
                    let again = decode(&bytes[..len], bitness, rip).unwrap_or_else(|e| panic!("{what}: {e:?}"));
                    assert_eq!((again.op, again.len), (d.op, d.len), "{what}");
                }
                Err(DecodeError::Unsupported { text, len, why }) => {
                    refused += 1;
                    let len = usize::from(*len);
                    assert!((1..=15).contains(&len) && len <= bytes.len(), "{what}: length {len}");
                    assert!(!text.is_empty() && !why.is_empty(), "{what}: an unnamed refusal");
                    match decode(&bytes[..len], bitness, rip) {
                        Err(DecodeError::Unsupported { text: t, len: l, .. }) => {
                            assert_eq!((&t, usize::from(l)), (text, len), "{what}")
                        }
                        other => panic!("{what}: its own bytes give {other:?}"),
                    }
                }
                // With 15 bytes at hand no instruction runs out of them.
                Err(DecodeError::Truncated) => {
                    truncated += 1;
                    assert!(bytes.len() < 15, "{what}: truncated with {} bytes", bytes.len());
                }
                Err(DecodeError::Invalid) => {}
            }
            if bitness == 64 {
                // The length used to skip a refused instruction agrees with the decoder.
                let expected = match &result {
                    Ok(d) => Some(d.len),
                    Err(DecodeError::Unsupported { len, .. }) => Some(*len),
                    Err(_) => None,
                };
                assert_eq!(instruction_length(&bytes), expected, "{what}");
            }
        }
        assert!(ok > 1_000 && refused > 1_000 && truncated > 100, "generator too narrow: {ok} {refused} {truncated}");
    }
}

// ---------------------------------------------------------------------------
// MMIO: the whole emulation step, instruction fetched through page tables.
// ---------------------------------------------------------------------------

mod mmio_emulation {
    use super::*;
    use hypervisor::mmio::decode::{self, Extend, MmioOp, Source};
    use hypervisor::mmio::{emulate, MmioDevice};

    const CODE_VA: u64 = 0xffff_ffff_8100_0000;
    const CODE_GPA: u64 = 0x30_0000;
    const NEXT_GPA: u64 = 0x30_2000;
    const WINDOW: u64 = 0xfed4_0000;

    #[derive(Default)]
    struct Device {
        /// (store, offset, size, value)
        accesses: Vec<(bool, u64, u8, u64)>,
        answer: u64,
    }

    impl MmioDevice for Device {
        fn read(&mut self, offset: u64, size: u8) -> u64 {
            self.accesses.push((false, offset, size, 0));
            self.answer
        }
        fn write(&mut self, offset: u64, size: u8, value: u64) {
            self.accesses.push((true, offset, size, value));
        }
    }

    fn mask(size: u8) -> u64 {
        if size >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * size)) - 1
        }
    }

    /// `mov r, [rm]`, `mov [rm], r`, MOVZX/MOVSX and immediates with a
    /// plain register base, so that the operand can match the fault.
    fn register_form(rng: &mut Rng) -> Vec<u8> {
        let reg = rng.below(8) as u8;
        let rm = rng.pick(&[0u8, 1, 2, 3, 6, 7]);
        let modrm = (reg << 3) | rm;
        let mut v = Vec::new();
        if rng.chance(30) {
            v.push(rng.pick(&[0x66u8, 0x67, 0x64, 0x65]));
        }
        if rng.chance(40) {
            v.push(0x40 | rng.below(16) as u8);
        }
        match rng.below(6) {
            0 => v.extend([rng.pick(&[0x8au8, 0x8b, 0x88, 0x89, 0x63]), modrm]),
            1 => v.extend([0x0f, rng.pick(&[0xb6u8, 0xb7, 0xbe, 0xbf]), modrm]),
            2 => v.extend([0xc6, rm, rng.byte()]),
            3 => {
                v.extend([0xc7, rm]);
                v.extend(rng.bytes(4));
            }
            4 => v.extend([rng.pick(&[0x8bu8, 0x89]), 0x40 | (reg << 3) | rm, 0]),
            _ => v.extend(mmio_decoder::instruction_bytes(rng)),
        }
        v
    }

    #[test]
    fn refused_accesses_change_nothing_and_emulated_ones_exactly_one_register() {
        let mut rng = Rng::new(0xe1u64);
        let g = GuestRam::new(4 << 20);
        let mut mapper = Mapper::new(0x1000, 0x2000);
        mapper.map(&g, CODE_VA, CODE_GPA);
        let next_pte = mapper.map(&g, CODE_VA + 0x1000, NEXT_GPA);
        let (mut emulated, mut refused) = (0, 0);
        for case in 0..scaled(6_000) {
            // The instruction, somewhere on the code page (maybe across its end).
            let code = register_form(&mut rng);
            let offset = if rng.chance(30) { 0xff0 + rng.below(0x10) } else { rng.below(0xfe0) };
            let mut bytes = code.clone();
            bytes.extend(rng.bytes(16));
            let (first, second) = bytes.split_at(((0x1000 - offset) as usize).min(bytes.len()));
            g.write(CODE_GPA + offset, first);
            g.write(NEXT_GPA, second);
            let next_present = rng.chance(70);
            g.write(next_pte, &(NEXT_GPA | if next_present { PTE_PRESENT_RW } else { 0 }).to_le_bytes());

            let gpa = if rng.chance(5) { WINDOW - 1 - rng.below(0x1000) } else { WINDOW + rng.below(0x5000) };
            let mut vcpu = long_mode_vcpu(0x1000);
            if rng.chance(5) {
                vcpu.write(Field::CsAccessRights, rng.pick(&[0xc09b, 0x9b, 0xa09b & !(1 << 13)]));
            }
            vcpu.write(Field::Rip, CODE_VA + offset);
            vcpu.write(Field::Interruptibility, rng.below(4));
            // Registers that point at the faulting byte's page offset (or anywhere).
            let aligned = rng.chance(70);
            let value = |rng: &mut Rng| if aligned { (rng.edgy() & !0xfff) | (gpa & 0xfff) } else { rng.edgy() };
            for i in 0..16u8 {
                let v = value(&mut rng);
                match reg_by_index(&mut vcpu.regs, i) {
                    Some(r) => *r = v,
                    None => vcpu.write(Field::Rsp, v),
                }
            }
            vcpu.write(Field::FsBase, if rng.chance(50) { 0 } else { value(&mut rng) });
            vcpu.write(Field::GsBase, if rng.chance(50) { 0 } else { value(&mut rng) });
            let access = rng.pick(&[1u64, 2, 2, 1, 4, 3, 7]);
            let exit = ExitInfo {
                reason: 48,
                qualification: access | (1 << 7) | (1 << 8),
                guest_physical: gpa,
                guest_linear: rng.edgy(),
                ..Default::default()
            };
            let mut device = Device { answer: rng.next(), ..Default::default() };
            let before = vcpu.clone();
            let what = format!("case {case}: {code:02x?} at page offset {offset:#x}, gpa {gpa:#x}");
            let who = hypervisor::guest::access::Principal::current(&vcpu, hypervisor::integrity::View::Kernel);
            let access = hypervisor::guest::access::GuestAccess::new(
                &g.memory,
                &g.phys,
                hypervisor::guest::access::Paging::from_vcpu(&vcpu),
                who,
                None,
            );
            match emulate(&mut vcpu, &exit, &access, &mut device, WINDOW) {
                Err(e) => {
                    refused += 1;
                    assert_eq!(vcpu, before, "{what}: a refused access changed the vCPU ({e})");
                    assert!(device.accesses.is_empty(), "{what}: a refused access reached the device ({e})");
                    assert!(usize::from(e.len) <= 15, "{what}: {e:?}");
                    let line = e.to_string();
                    assert!(line.contains("rip") && line.contains(&format!("{gpa:#x}")), "{what}: {line}");
                }
                Ok(done) => {
                    emulated += 1;
                    let size = done.op.size();
                    assert_eq!(device.accesses.len(), 1, "{what}: {:?}", device.accesses);
                    let (store, at, width, written) = device.accesses[0];
                    assert_eq!((store, at, width), (done.op.is_store(), gpa - WINDOW, size), "{what}");
                    assert_eq!(done.offset, gpa - WINDOW, "{what}");
                    assert!((gpa & 0xfff) + u64::from(size) <= 0x1000, "{what}: the access leaves its page");
                    let decoded = decode::decode(&bytes, 64, CODE_VA + offset).expect("it was emulated");
                    assert_eq!(done.len, decoded.len, "{what}");
                    let mut expected = before.clone();
                    expected.write(Field::Rip, (CODE_VA + offset).wrapping_add(u64::from(done.len)));
                    expected.write(Field::Interruptibility, before.read(Field::Interruptibility) & !3);
                    let reg = |v: &Vcpu, index: u8| {
                        let mut regs = v.regs;
                        reg_by_index(&mut regs, index).map_or(v.read(Field::Rsp), |r| *r)
                    };
                    match done.op {
                        MmioOp::Load { size, dst, extend } => {
                            let raw = device.answer & mask(size);
                            assert_eq!(done.value, raw, "{what}");
                            let widened = match extend {
                                Extend::Sign => match size {
                                    1 => raw as i8 as i64 as u64,
                                    2 => raw as i16 as i64 as u64,
                                    4 => raw as i32 as i64 as u64,
                                    _ => raw,
                                },
                                _ => raw,
                            };
                            let old = reg(&before, dst.index);
                            let new = match (dst.size, dst.high_byte) {
                                (1, true) => (old & !0xff00) | ((widened & 0xff) << 8),
                                (1, false) => (old & !0xff) | (widened & 0xff),
                                (2, _) => (old & !0xffff) | (widened & 0xffff),
                                (4, _) => widened & 0xffff_ffff,
                                _ => widened,
                            };
                            match reg_by_index(&mut expected.regs, dst.index) {
                                Some(r) => *r = new,
                                None => expected.write(Field::Rsp, new),
                            }
                        }
                        MmioOp::Store { size, src } => {
                            let v = match src {
                                Source::Imm(imm) => imm,
                                Source::Gpr(g) if g.high_byte => reg(&before, g.index) >> 8,
                                Source::Gpr(g) => reg(&before, g.index),
                            } & mask(size);
                            assert_eq!((written, done.value), (v, v), "{what}");
                        }
                    }
                    assert_eq!(vcpu, expected, "{what}: more changed than the destination and RIP");
                }
            }
        }
        assert!(emulated > 300 && refused > 300, "generator too narrow: {emulated} emulated, {refused} refused");
    }
}

// ---------------------------------------------------------------------------
// The guest page-table walker, against a reference walk written from the SDM.
// ---------------------------------------------------------------------------

mod page_walk {
    use super::*;
    use hypervisor::guest::access::{AccessError, GuestAccess, Inspector, Kind, Paging, Principal, WalkError};
    use hypervisor::integrity::View;

    const RAM: u64 = 1 << 20;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Walk {
        Gpa(u64),
        NotCanonical,
        NotPresent(u8),
        Reserved(u8),
        Outside(u64),
        Unsupported,
    }

    /// What the reference walk found: the outcome, the rights (user,
    /// writable, executable) and the entries walked.
    struct Reference {
        walk: Walk,
        user: bool,
        writable: bool,
        executable: bool,
        entries: Vec<u64>,
    }

    /// The 4-level walk as the SDM describes it, over a byte image of RAM.
    fn reference(ram: &[u8], p: &Paging, linear: u64) -> Reference {
        let mut r =
            Reference { walk: Walk::Unsupported, user: true, writable: true, executable: true, entries: vec![] };
        if p.cr0 & (1 << 31) == 0 {
            r.walk = Walk::Gpa(linear & 0xffff_ffff);
            return r;
        }
        if p.efer & (1 << 10) == 0 || p.cr4 & CR4_PAE == 0 || p.cr4 & (1 << 12) != 0 {
            return r;
        }
        let top = (linear as i64) >> 47;
        if top != 0 && top != -1 {
            r.walk = Walk::NotCanonical;
            return r;
        }
        let nxe = p.efer & (1 << 11) != 0;
        let mut table = p.cr3 & PTE_ADDR;
        for level in (1..=4u8).rev() {
            let shift = 12 + 9 * u32::from(level - 1);
            let at = table + ((linear >> shift) & 0x1ff) * 8;
            if at + 8 > ram.len() as u64 {
                r.walk = Walk::Outside(at);
                return r;
            }
            let e = u64::from_le_bytes(ram[at as usize..at as usize + 8].try_into().unwrap());
            if e & 1 == 0 {
                r.walk = Walk::NotPresent(level);
                return r;
            }
            if !nxe && e >> 63 != 0 {
                r.walk = Walk::Reserved(level);
                return r;
            }
            r.entries.push(at);
            r.user &= e & 4 != 0;
            r.writable &= e & 2 != 0;
            r.executable &= !nxe || e >> 63 == 0;
            if e & 0x80 != 0 && level > 1 {
                if level == 4 {
                    r.walk = Walk::Reserved(level);
                    return r;
                }
                // Bits 13 up to the page's base address are reserved.
                let reserved = ((1u64 << shift) - 1) & !0x1fff;
                if e & reserved != 0 {
                    r.walk = Walk::Reserved(level);
                    return r;
                }
                let page = (1u64 << shift) - 1;
                r.walk = Walk::Gpa((e & PTE_ADDR & !page) | (linear & page));
                return r;
            }
            table = e & PTE_ADDR;
        }
        r.walk = Walk::Gpa(table | (linear & 0xfff));
        r
    }

    /// Whether the SDM lets `who` make this access, given the walk's rights
    /// (section 4.6: CR0.WP, CR4.SMEP and SMAP, XD; implicit supervisor
    /// accesses to user pages under SMAP are refused).
    fn allowed(r: &Reference, p: &Paging, cpl: u8, kind: Kind) -> bool {
        let user = cpl == 3;
        let (wp, smep, smap) = (p.cr0 & (1 << 16) != 0, p.cr4 & (1 << 20) != 0, p.cr4 & (1 << 21) != 0);
        match kind {
            Kind::Read if user => r.user,
            Kind::Read => !(r.user && smap),
            Kind::Write if user => r.user && r.writable,
            Kind::Write => !(r.user && smap) && (r.writable || !wp),
            Kind::Fetch if user => r.user && r.executable,
            Kind::Fetch => r.executable && !(r.user && smep),
        }
    }

    /// The guest-physical byte `who` may access at `linear`, per the reference.
    fn reachable(ram: &[u8], p: &Paging, cpl: u8, kind: Kind, linear: u64) -> Option<u64> {
        let r = reference(ram, p, linear);
        match r.walk {
            Walk::Gpa(gpa) if gpa < RAM && allowed(&r, p, cpl, kind) => Some(gpa),
            _ => None,
        }
    }

    fn observed(r: Result<u64, WalkError>, linear: u64) -> Walk {
        match r {
            Ok(gpa) => Walk::Gpa(gpa),
            Err(WalkError::NotCanonical { linear: l }) => {
                assert_eq!(l, linear);
                Walk::NotCanonical
            }
            Err(WalkError::NotPresent { linear: l, level }) => {
                assert_eq!(l, linear);
                Walk::NotPresent(level)
            }
            Err(WalkError::Reserved { linear: l, level, .. }) => {
                assert_eq!(l, linear);
                Walk::Reserved(level)
            }
            Err(WalkError::OutsideRam { linear: l, gpa }) => {
                assert_eq!(l, linear);
                Walk::Outside(gpa)
            }
            Err(WalkError::UnsupportedMode(_)) => Walk::Unsupported,
        }
    }

    /// A paging-structure entry a hostile guest might write: pointing into
    /// its RAM (often at another table, or back at itself), past it, at the
    /// end of the address space, with reserved or large-page bits.
    fn hostile_entry(rng: &mut Rng) -> u64 {
        let addr = match rng.below(10) {
            0..=5 => rng.below(RAM / 0x1000) << 12,
            6 => (rng.next() << 12) & PTE_ADDR,
            7 => RAM - 0x1000,
            8 => RAM,
            _ => 0,
        };
        let mut e = addr | (rng.next() & 0x7e);
        if rng.chance(88) {
            e |= 1;
        }
        if rng.chance(20) {
            e |= 0x80;
        }
        if rng.chance(10) {
            e |= 1 << 63;
        }
        if rng.chance(10) {
            e |= rng.next() & 0x3fff_e000;
        }
        if rng.chance(3) {
            e = rng.next();
        }
        e
    }

    fn hostile_world(rng: &mut Rng) -> GuestRam {
        let g = GuestRam::new(RAM);
        {
            let mut bytes = g.phys.bytes.borrow_mut();
            for e in bytes.chunks_exact_mut(8) {
                e.copy_from_slice(&hostile_entry(rng).to_le_bytes());
            }
        }
        g
    }

    /// Paging controls with the protection bits (CR0.WP, CR4.SMEP, SMAP)
    /// and the modes the walker refuses, at random.
    fn hostile_paging(rng: &mut Rng) -> Paging {
        let mut long = Paging::four_level(rng.below(RAM / 0x1000) << 12);
        long.cr0 |= rng.pick(&[0, 1 << 16]);
        long.cr4 |= rng.pick(&[0, 1 << 20, 1 << 21, 3 << 20]);
        match rng.below(20) {
            0 => Paging { cr0: rng.pick(&[0, 1]), ..long },
            1 => Paging { cr4: 0, ..long },
            2 => Paging { efer: 0, ..long },
            3 => Paging { cr4: long.cr4 | (1 << 12), ..long },
            4 => Paging { efer: long.efer & !(1 << 11), ..long },
            5 => Paging { cr3: rng.edgy(), ..long },
            _ => long,
        }
    }

    fn hostile_linear(rng: &mut Rng) -> u64 {
        match rng.below(4) {
            0 => rng.edgy(),
            1 => 0xffff_8000_0000_0000 | (rng.next() & 0x7fff_ffff_ffff),
            2 => rng.next() & 0x7fff_ffff_ffff,
            _ => rng.next(),
        }
    }

    fn principal(rng: &mut Rng) -> Principal {
        Principal { cpl: rng.pick(&[0, 3]) as u8, view: View::Kernel }
    }

    #[test]
    fn walks_of_hostile_tables_agree_with_the_sdm_and_stay_bounded() {
        let mut rng = Rng::new(0x3a1c);
        let mut seen = BTreeSet::new();
        for world in 0..scaled(12) {
            let g = hostile_world(&mut rng);
            let ram = g.snapshot();
            for case in 0..2_000 {
                let p = hostile_paging(&mut rng);
                let linear = hostile_linear(&mut rng);
                let reads = g.phys.reads.get();
                let got = observed(Inspector::new(&g.memory, &g.phys, p).translate(linear), linear);
                // Cycles (an entry pointing back at its own table) cannot extend the walk.
                assert!(g.phys.reads.get() - reads <= 4, "world {world} case {case}: more than 4 table reads");
                // The hypervisor's own look goes nowhere but guest RAM.
                let want = match reference(&ram, &p, linear).walk {
                    Walk::Gpa(gpa) if gpa >= RAM => Walk::Outside(gpa),
                    w => w,
                };
                assert_eq!(got, want, "world {world} case {case}: {p:x?} linear {linear:#x}");
                assert_eq!(g.snapshot(), ram, "world {world} case {case}: inspecting changed guest memory");
                seen.insert(format!("{want:?}").split('(').next().unwrap().to_string());
            }
        }
        assert_eq!(seen.len(), 6, "every walk outcome was reached");
    }

    #[test]
    fn instruction_fetch_returns_exactly_the_bytes_the_principal_may_execute() {
        let mut rng = Rng::new(0xfe7c);
        let (mut fetched, mut refused) = (0, 0);
        for world in 0..scaled(8) {
            let g = hostile_world(&mut rng);
            for case in 0..1_500 {
                let ram = g.snapshot();
                let p = hostile_paging(&mut rng);
                let who = principal(&mut rng);
                let rip = if rng.chance(50) { hostile_linear(&mut rng) | 0xff0 } else { hostile_linear(&mut rng) };
                let byte_at = |linear: u64| reachable(&ram, &p, who.cpl, Kind::Fetch, linear).map(|g| ram[g as usize]);
                let mut buf = [0u8; 15];
                let what = format!("world {world} case {case}: rip {rip:#x} {who:?} {p:x?}");
                match GuestAccess::new(&g.memory, &g.phys, p, who, None).fetch_instruction(rip, &mut buf) {
                    Ok(n) => {
                        fetched += 1;
                        assert!((1..=15).contains(&n), "{what}: {n} bytes");
                        for (k, b) in buf.iter().enumerate().take(n) {
                            assert_eq!(Some(*b), byte_at(rip.wrapping_add(k as u64)), "{what}: byte {k}");
                        }
                        if n < 15 {
                            assert_eq!(byte_at(rip.wrapping_add(n as u64)), None, "{what}: stopped early at {n}");
                        }
                    }
                    Err(_) => {
                        refused += 1;
                        assert_eq!(byte_at(rip), None, "{what}: the first byte was fetchable");
                        assert_eq!(g.snapshot(), ram, "{what}: a refused fetch changed guest memory");
                    }
                }
            }
        }
        assert!(fetched > 100 && refused > 100, "generator too narrow: {fetched} fetched, {refused} refused");
    }

    /// The guest memory a write leaves before its data lands: the accessed
    /// bit set in every entry walked and the dirty bit in the leaf, as the
    /// processor sets them.
    fn marked(mut ram: Vec<u8>, p: &Paging, gva: u64, len: usize) -> Vec<u8> {
        let before = ram.clone();
        for k in 0..len {
            let r = reference(&before, p, gva.wrapping_add(k as u64));
            for (i, &at) in r.entries.iter().enumerate() {
                let bits = 0x20 | if i + 1 == r.entries.len() { 0x40 } else { 0 };
                let e = u64::from_le_bytes(ram[at as usize..at as usize + 8].try_into().unwrap()) | bits;
                ram[at as usize..at as usize + 8].copy_from_slice(&e.to_le_bytes());
            }
        }
        ram
    }

    /// Guest RAM with a hole inside one page (two backings, the first
    /// ending and the second starting mid-page): a write whose piece in
    /// that page starts and ends in RAM but spans the hole is refused
    /// before any byte of it, or of the pieces before it, is written. The
    /// fuzz target `access` found it writing the first pieces, then failing.
    #[test]
    fn a_write_across_a_hole_inside_a_page_writes_nothing() {
        let mut memory = GuestMemory::new();
        memory.add(Region::new(0, 0x8400), HOST_BASE + 0x7400).unwrap();
        memory.add(Region::new(0x8c00, 0x1_0000), HOST_BASE).unwrap();
        let phys = Ram::new(HOST_BASE, 0xf800);
        let unpaged = Paging { cr0: 1, ..Paging::default() };
        for (gva, len) in [(0x7800u64, 0x1800usize), (0x8000, 0x1000), (0x8100, 0xe00), (0x8300, 0xa00)] {
            let before = phys.bytes.borrow().clone();
            let r = GuestAccess::new(&memory, &phys, unpaged, Principal::KERNEL, None).write(gva, &vec![0xa5; len]);
            assert!(matches!(r, Err(AccessError::Refused { .. })), "{len:#x} bytes at {gva:#x}: {r:?}");
            assert!(*phys.bytes.borrow() == before, "{len:#x} bytes at {gva:#x}: a refused write changed guest memory");
        }
        // Either side of the hole is fine.
        GuestAccess::new(&memory, &phys, unpaged, Principal::KERNEL, None).write(0x8000, &[1; 0x400]).unwrap();
        GuestAccess::new(&memory, &phys, unpaged, Principal::KERNEL, None).write(0x8c00, &[2; 0x400]).unwrap();
    }

    #[test]
    fn copies_through_hostile_tables_are_checked_and_all_or_nothing() {
        let mut rng = Rng::new(0xc097);
        let (mut written, mut refused) = (0, 0);
        for world in 0..scaled(6) {
            let g = hostile_world(&mut rng);
            for case in 0..150 {
                // Half the cases as a kernel without CR0.WP or SMAP, which
                // the tables' rights do not stop: how the copy lands.
                let (p, who) = if rng.chance(50) {
                    let p = hostile_paging(&mut rng);
                    (Paging { cr0: p.cr0 & !(1 << 16), cr4: p.cr4 & !(1 << 21), ..p }, Principal::KERNEL)
                } else {
                    (hostile_paging(&mut rng), principal(&mut rng))
                };
                let gva = if rng.chance(50) { hostile_linear(&mut rng) } else { hostile_linear(&mut rng) | 0xff8 };
                let len = if rng.chance(70) { 1 + rng.upto(63) } else { 1 + rng.upto(3 * 4096 - 1) };
                let data = rng.bytes(len);
                let before = g.snapshot();
                let what = format!("world {world} case {case}: {len} bytes at {gva:#x} as {who:?}");
                let access = GuestAccess::new(&g.memory, &g.phys, p, who, None);
                let may = gva.checked_add(len as u64).is_some()
                    && (0..len).all(|k| reachable(&before, &p, who.cpl, Kind::Write, gva + k as u64).is_some());
                match access.write(gva, &data) {
                    Err(e) => {
                        refused += 1;
                        assert!(!may || matches!(e, AccessError::Refused { gpa: 0, .. }), "{what}: refused {e:?}");
                        assert!(g.snapshot() == before, "{what}: a refused write changed guest memory");
                    }
                    Ok(()) => {
                        written += 1;
                        assert!(may, "{what}: written where the principal may not write");
                        // Byte k lands where the tables mapped it when the call
                        // was made (even if the data rewrites those tables);
                        // aliases see the last byte written.
                        let mut expected = marked(before.clone(), &p, gva, len);
                        for (k, b) in data.iter().enumerate() {
                            match reference(&before, &p, gva.wrapping_add(k as u64)).walk {
                                Walk::Gpa(gpa) if gpa < RAM => expected[gpa as usize] = *b,
                                other => panic!("{what}: byte {k} written through {other:?}"),
                            }
                        }
                        assert!(g.snapshot() == expected, "{what}: guest memory is not the data written");
                    }
                }
                let ram = g.snapshot();
                let may = gva.checked_add(len as u64).is_some()
                    && (0..len).all(|k| reachable(&ram, &p, who.cpl, Kind::Read, gva + k as u64).is_some());
                match access.read_vec(gva, len) {
                    Ok(out) => {
                        assert!(may, "{what}: read what the principal may not read");
                        for (k, b) in out.iter().enumerate() {
                            let gpa = reachable(&ram, &p, who.cpl, Kind::Read, gva.wrapping_add(k as u64)).unwrap();
                            assert_eq!(*b, ram[gpa as usize], "{what}: byte {k}");
                        }
                        assert!(g.snapshot() == ram, "{what}: a read changed guest memory");
                    }
                    Err(_) => {
                        assert!(!may, "{what}: a permitted read was refused");
                        assert!(g.snapshot() == ram, "{what}: a refused read changed guest memory");
                    }
                }
            }
        }
        assert!(written >= 10 && refused > 20, "generator too narrow: {written} written, {refused} refused");
    }
}

// ---------------------------------------------------------------------------
// The TIS register file, driven by a hostile guest driver.
// ---------------------------------------------------------------------------

mod tpm_tis {
    use super::*;
    use hypervisor::devices::tis::{self, access, sts, State, Tis, TpmBackend};

    fn param_size(b: &[u8]) -> Option<usize> {
        Some(u32::from_be_bytes(b.get(2..6)?.try_into().ok()?) as usize)
    }

    fn well_formed(b: &[u8]) -> bool {
        (10..=tis::BUFFER_SIZE).contains(&b.len()) && param_size(b) == Some(b.len())
    }

    /// A backend that answers anything: well-formed responses, responses too
    /// short or too long, with a lying `paramSize`, or nothing.
    struct Chaos {
        rng: Rng,
        /// (locality, command, response)
        log: Vec<(u8, Vec<u8>, Vec<u8>)>,
    }

    impl TpmBackend for Chaos {
        fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
            let rng = &mut self.rng;
            let len = match rng.below(8) {
                0 => rng.upto(9),
                1 => 4097 + rng.upto(2000),
                2 => tis::BUFFER_SIZE,
                _ => 10 + rng.upto(300),
            };
            let mut r = rng.bytes(len);
            if len >= 6 {
                let claimed = if rng.chance(80) { len as u32 } else { rng.edgy() as u32 };
                r[2..6].copy_from_slice(&claimed.to_be_bytes());
            }
            self.log.push((locality, command.to_vec(), r.clone()));
            r
        }
    }

    fn chaos(seed: u64) -> Tis<Chaos> {
        Tis::new(Chaos { rng: Rng::new(seed), log: Vec::new() }, (seed % 17) as u8)
    }

    const REGISTERS: &[u64] =
        &[0x0, 0x8, 0xc, 0x10, 0x14, 0x18, 0x19, 0x1a, 0x1b, 0x24, 0x25, 0x30, 0x80, 0xf00, 0xf04];

    /// One access anywhere in (and past) the window, of any size, with values
    /// that matter to the register hit.
    fn random_access(rng: &mut Rng, tis: &mut Tis<Chaos>) -> (u64, u8, Option<u64>) {
        let locality = rng.pick(&[0u64, 1, 2, 3, 0, 1, 4, 5, 0x10]);
        let offset = match rng.below(10) {
            0 => rng.edgy(),
            1 => locality * 0x1000 + rng.below(0x1000),
            _ => locality * 0x1000 + rng.pick(REGISTERS) + if rng.chance(10) { rng.below(4) } else { 0 },
        };
        let size = rng.pick(&[1u8, 1, 1, 2, 4, 4, 8, 0, 3, 5, 16, 255]);
        let value = match offset & 0xfff {
            0x0 => {
                let any = rng.byte();
                u64::from(rng.pick(&[
                    access::REQUEST_USE,
                    access::ACTIVE_LOCALITY,
                    access::SEIZE,
                    access::BEEN_SEIZED,
                    any,
                ]))
            }
            0x18 => {
                let any = rng.byte();
                u64::from(rng.pick(&[sts::COMMAND_READY, sts::GO, sts::RESPONSE_RETRY, any]))
            }
            _ => rng.next(),
        };
        if rng.chance(45) {
            tis.write(offset, size, value);
            (offset, size, Some(value))
        } else {
            (offset, size, None)
        }
    }

    #[test]
    fn random_register_traffic_keeps_the_tis_consistent() {
        let mut rng = Rng::new(0x715);
        let mut commands = 0;
        for run in 0..scaled(150) {
            let mut tis = chaos(run as u64);
            for step in 0..400 {
                // Now and then a driver's well-formed command amid the noise,
                // from a locality that may or may not hold the TPM.
                let scripted = rng.chance(5).then(|| rng.below(4));
                if let Some(l) = scripted {
                    tis.write(l * 0x1000, 1, u64::from(access::REQUEST_USE));
                    tis.write(l * 0x1000 + 0x18, 1, u64::from(sts::COMMAND_READY));
                    let n = 10 + rng.upto(30);
                    let mut c = rng.bytes(n);
                    let len = c.len() as u32;
                    c[2..6].copy_from_slice(&len.to_be_bytes());
                    send(&mut rng, &mut tis, l, &c);
                }
                let executed = tis.backend().log.len();
                let active_before = tis.active_locality();
                let (offset, size, wrote) = match scripted {
                    Some(l) => {
                        tis.write(l * 0x1000 + 0x18, 1, u64::from(sts::GO));
                        (l * 0x1000 + 0x18, 1, Some(u64::from(sts::GO)))
                    }
                    None => random_access(&mut rng, &mut tis),
                };
                let what = format!("run {run} step {step}: {offset:#x}/{size} {wrote:x?}");
                if wrote.is_none() {
                    let v = tis.read(offset, size);
                    if size < 8 {
                        assert_eq!(v >> (8 * u32::from(size)), 0, "{what}: {v:#x} is wider than the read");
                    }
                }
                // Only well-framed commands of the active locality reach the TPM.
                let log = &tis.backend().log;
                assert!(log.len() <= executed + 1, "{what}: one access ran two commands");
                if log.len() > executed {
                    commands += 1;
                    let (locality, command, _) = log.last().unwrap();
                    assert!(well_formed(command), "{what}: the backend got {} bytes: {command:02x?}", command.len());
                    assert_eq!(Some(*locality), active_before, "{what}");
                    assert_eq!(tis.state(), State::Completion, "{what}");
                }
                assert!(tis.active_locality().is_none_or(|l| l < 4), "{what}: {:?}", tis.active_locality());
                // Reported only on the line INT_VECTOR names, never line 0.
                let vector = tis.read(0xc, 1) as u8;
                assert!(tis.pending_interrupt().is_none_or(|v| v == vector && v != 0), "{what}");
                // STS as each locality sees it.
                for l in 0..6u64 {
                    let status = tis.read(l * 0x1000 + 0x18, 4);
                    let mine = tis.active_locality() == Some(l as u8);
                    if !mine {
                        assert_eq!(status, 0xffff_ffff, "{what}: locality {l} sees STS {status:#x}");
                        continue;
                    }
                    let burst = (status >> 8) & 0xffff;
                    assert!(burst <= u64::from(tis::MAX_BURST), "{what}: burstCount {burst}");
                    assert_ne!(status & u64::from(sts::VALID), 0, "{what}");
                    let avail = status & u64::from(sts::DATA_AVAIL) != 0;
                    assert_eq!(avail, tis.state() == State::Completion && burst > 0, "{what}: {status:#x}");
                }
            }
        }
        assert!(commands > 50, "only {commands} commands executed");
    }

    /// Writes `bytes` through the FIFO (or XDATA_FIFO) of `locality` in
    /// pieces of 1, 2 or 4 bytes.
    fn send(rng: &mut Rng, tis: &mut Tis<impl TpmBackend>, locality: u64, bytes: &[u8]) {
        let base = locality * 0x1000;
        let mut at = 0;
        while at < bytes.len() {
            let n = rng.pick(&[1usize, 2, 4, 4]).min(bytes.len() - at);
            let mut v = 0u64;
            for (i, b) in bytes[at..at + n].iter().enumerate() {
                v |= u64::from(*b) << (8 * i);
            }
            let fifo = if rng.chance(20) { 0x80 } else { 0x24 };
            tis.write(base + fifo, n as u8, v);
            at += n;
        }
    }

    /// Reads the response while dataAvail is set; returns it.
    fn drain(rng: &mut Rng, tis: &mut Tis<impl TpmBackend>, locality: u64) -> Vec<u8> {
        let base = locality * 0x1000;
        let mut out = Vec::new();
        for _ in 0..2 * tis::BUFFER_SIZE {
            if tis.read(base + 0x18, 1) & u64::from(sts::DATA_AVAIL) == 0 {
                break;
            }
            let n = rng.pick(&[1u8, 2, 4]);
            let burst = ((tis.read(base + 0x18, 4) >> 8) & 0xffff) as u8;
            let n = n.min(burst.max(1));
            let v = tis.read(base + 0x24, n);
            out.extend_from_slice(&v.to_le_bytes()[..usize::from(n)]);
        }
        out
    }

    /// A command a driver might send: well framed, or with a `paramSize`
    /// that is too small, too large, or not the bytes sent.
    fn command_bytes(rng: &mut Rng) -> Vec<u8> {
        let len = match rng.below(10) {
            0 => rng.upto(9),
            1 => 4090 + rng.upto(20),
            _ => 10 + rng.upto(200),
        };
        let mut c = rng.bytes(len);
        if len >= 6 {
            let claimed = match rng.below(6) {
                0 => rng.edgy() as u32,
                1 => (len as u32).wrapping_add(rng.pick(&[1u32, 2, 0xffff_ffff, 0xffff_fffe])),
                _ => len as u32,
            };
            c[2..6].copy_from_slice(&claimed.to_be_bytes());
        }
        c
    }

    #[test]
    fn framing_reaches_the_backend_only_for_well_framed_commands_and_responses_are_never_overread() {
        let mut rng = Rng::new(0xf1f0);
        let mut tis = chaos(7);
        let (mut executed, mut refused) = (0, 0);
        for case in 0..scaled(2_500) {
            let locality = rng.below(4);
            let base = locality * 0x1000;
            if tis.active_locality() != Some(locality as u8) {
                // Relinquish whoever holds it, then ask.
                if let Some(a) = tis.active_locality() {
                    tis.write(u64::from(a) * 0x1000, 1, u64::from(access::ACTIVE_LOCALITY));
                }
                tis.write(base, 1, u64::from(access::REQUEST_USE));
            }
            assert_eq!(tis.active_locality(), Some(locality as u8), "case {case}");
            tis.write(base + 0x18, 1, u64::from(sts::COMMAND_READY));
            let command = command_bytes(&mut rng);
            let what = format!("case {case}: {} bytes, paramSize {:?}", command.len(), param_size(&command));
            send(&mut rng, &mut tis, locality, &command);
            let before = tis.backend().log.len();
            let out_before = tis.stats.bytes_out;
            tis.write(base + 0x18, 1, u64::from(sts::GO));
            let ran = tis.backend().log.len() > before;

            // The framing rules of the module documentation, as a model.
            let p = param_size(&command);
            let acceptable = p.is_some_and(|p| (10..=tis::BUFFER_SIZE).contains(&p));
            let expected_go = match p {
                None => false,                                       // Expect still 1: tpmGo ignored
                Some(p) if acceptable && command.len() < p => false, // still expecting
                _ => true,                                           // executes or is refused
            };
            assert_eq!(ran, well_formed(&command), "{what}: backend reached = {ran}");
            if !expected_go {
                let waiting = if command.is_empty() { State::Ready } else { State::Reception };
                assert_eq!(tis.state(), waiting, "{what}");
                continue;
            }
            assert_eq!(tis.state(), State::Completion, "{what}");
            let response = drain(&mut rng, &mut tis, locality);
            assert!(well_formed(&response), "{what}: served {} bytes: {response:02x?}", response.len());
            assert_eq!(tis.stats.bytes_out - out_before, response.len() as u64, "{what}");
            if ran {
                executed += 1;
                let (_, seen, answer) = tis.backend().log.last().unwrap().clone();
                assert_eq!(seen, command, "{what}: the backend saw other bytes");
                if well_formed(&answer) {
                    assert_eq!(response, answer, "{what}");
                } else {
                    assert_eq!(response[6..10], tis::TPM_FAIL.to_be_bytes(), "{what}: {answer:02x?}");
                }
            } else {
                refused += 1;
                assert_eq!(response[6..10], tis::TPM_BAD_PARAM_SIZE.to_be_bytes(), "{what}");
            }
            // Past the end: all-ones, nothing more counted, dataAvail clear.
            for _ in 0..rng.upto(8) {
                assert_eq!(tis.read(base + 0x24, 4), 0xffff_ffff, "{what}: read past the response");
            }
            assert_eq!(tis.stats.bytes_out - out_before, response.len() as u64, "{what}");
            assert_eq!(tis.read(base + 0x18, 1) & u64::from(sts::DATA_AVAIL), 0, "{what}");
            // Another locality never reads it.
            let other = (locality + 1 + rng.below(3)) % 4;
            assert_eq!(tis.read(other * 0x1000 + 0x24, 4), 0xffff_ffff, "{what}");
            // responseRetry serves the same bytes again.
            if rng.chance(20) {
                tis.write(base + 0x18, 1, u64::from(sts::RESPONSE_RETRY));
                assert_eq!(drain(&mut rng, &mut tis, locality), response, "{what}: retry");
            }
        }
        assert!(executed > 500 && refused > 200, "{executed} executed, {refused} refused");
    }

    /// Entropy and time for a vtpm-core chip in a test.
    struct Fixed(Rng);

    impl vtpm_core::Platform for Fixed {
        fn fill_random(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.0.byte();
            }
        }
        fn ticks_us(&mut self) -> u64 {
            0
        }
    }

    /// TPM 1.2 commands that need no keys: Startup, SelfTestFull,
    /// ContinueSelfTest, GetTestResult, GetRandom, PcrRead, Extend,
    /// GetCapability, OIAP, ReadPubek, PCR_Reset, Startup(STATE), SaveState.
    const TPM_SEEDS: &[&[u8]] = &[
        &[0, 0xc1, 0, 0, 0, 12, 0, 0, 0, 0x99, 0, 1],
        &[0, 0xc1, 0, 0, 0, 10, 0, 0, 0, 0x50],
        &[0, 0xc1, 0, 0, 0, 10, 0, 0, 0, 0x53],
        &[0, 0xc1, 0, 0, 0, 10, 0, 0, 0, 0x54],
        &[0, 0xc1, 0, 0, 0, 14, 0, 0, 0, 0x46, 0, 0, 0, 0x40],
        &[0, 0xc1, 0, 0, 0, 14, 0, 0, 0, 0x15, 0, 0, 0, 8],
        &[
            0, 0xc1, 0, 0, 0, 34, 0, 0, 0, 0x14, 0, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
            18, 19, 20,
        ],
        &[0, 0xc1, 0, 0, 0, 18, 0, 0, 0, 0x65, 0, 0, 0, 5, 0, 0, 0, 4, 0, 0, 1, 1],
        &[0, 0xc1, 0, 0, 0, 22, 0, 0, 0, 0x65, 0, 0, 0, 6, 0, 0, 0, 4, 0, 0, 1, 8],
        &[0, 0xc1, 0, 0, 0, 10, 0, 0, 0, 0x0a],
        &[0, 0xc1, 0, 0, 0, 30, 0, 0, 0, 0x7c, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
        &[0, 0xc1, 0, 0, 0, 15, 0, 0, 0, 0xc8, 0, 3, 0, 0, 0x80],
        &[0, 0xc1, 0, 0, 0, 12, 0, 0, 0, 0x99, 0, 2],
        &[0, 0xc1, 0, 0, 0, 10, 0, 0, 0, 0x98],
    ];

    #[test]
    fn the_vtpm_answers_mutated_commands_with_well_formed_responses() {
        let mut rng = Rng::new(0x7b3);
        let tpm = vtpm_core::Tpm::manufacture_without_ek(Fixed(Rng::new(1)));
        let mut tis = Tis::new(hypervisor::tpm::engine::Engine(tpm), 0);
        tis.backend_mut().0.power_on();
        let mut answered = 0;
        for case in 0..scaled(1_500) {
            let locality = rng.below(4);
            let base = locality * 0x1000;
            if tis.active_locality() != Some(locality as u8) {
                if let Some(a) = tis.active_locality() {
                    tis.write(u64::from(a) * 0x1000, 1, u64::from(access::ACTIVE_LOCALITY));
                }
                tis.write(base, 1, u64::from(access::REQUEST_USE));
            }
            tis.write(base + 0x18, 1, u64::from(sts::COMMAND_READY));
            let seed = rng.pick(TPM_SEEDS);
            let mut command = mutate(&mut rng, seed, 64);
            if command.len() >= 6 && rng.chance(80) {
                let len = command.len() as u32;
                command[2..6].copy_from_slice(&len.to_be_bytes());
            }
            send(&mut rng, &mut tis, locality, &command);
            tis.write(base + 0x18, 1, u64::from(sts::GO));
            if tis.state() != State::Completion {
                continue;
            }
            let response = drain(&mut rng, &mut tis, locality);
            assert!(well_formed(&response), "case {case}: {command:02x?} gave {response:02x?}");
            answered += 1;
        }
        assert!(answered > 1_000, "only {answered} answered");
    }
}

// ---------------------------------------------------------------------------
// Boot modules: guest command lines, bzImages, ELF images, memory maps.
// ---------------------------------------------------------------------------

mod boot_inputs {
    use super::*;
    use hypervisor::guest::config::{self, GuestKind};
    use hypervisor::guest::linux::{self, e820, BootLayout, BzImage, E820Entry, LoadPlan};
    use hypervisor::guest::loader;

    const WORDS: &[&str] = &[
        "guest=a",
        "guest=web-1",
        "guest=",
        "guest=UPPER",
        "guest=abcdefghijklmnopqrstuvwxyz0123456789",
        "guest==",
        "guest=é",
        "mem=16M",
        "mem=4M",
        "mem=3M",
        "mem=64G",
        "mem=65G",
        "mem=4097K",
        "mem=18446744073709551615G",
        "mem=99999999999999999999",
        "mem=",
        "mem=M",
        "mem=-1M",
        "mem=1e3",
        "mem=16MM",
        "kind=linux",
        "kind=test",
        "kind=native",
        "kind=",
        "integrity=enforce",
        "integrity=audit",
        "integrity=off",
        "integrity=on",
        "vtpm=on",
        "vtpm=off",
        "vtpm=1",
        "trust=a,b,,c",
        "trust=",
        "trust=,,,",
        "initrd=x",
        "initrd=a",
        "--",
        "--",
        "--x",
        "=",
        "==",
        "-",
        "\u{0}",
        "\u{feff}guest=x",
    ];

    const VALID: &[&str] = &[
        "mem=16M",
        "mem=6m",
        "kind=linux",
        "kind=test",
        "integrity=audit",
        "integrity=off",
        "vtpm=on",
        "vtpm=off",
        "trust=a,b",
        "-- x",
        "-- initrd=y",
    ];

    /// A multiboot2 information structure: the given tags (type, payload),
    /// each padded to 8 bytes, then the end tag, in 8-aligned memory.
    fn raw_multiboot_info(tags: &[(u32, &[u8])]) -> Vec<u64> {
        let mut b = vec![0u8; 8];
        for &(typ, payload) in tags.iter().chain(&[(0, &[][..])]) {
            b.extend_from_slice(&typ.to_le_bytes());
            b.extend_from_slice(&(8 + payload.len() as u32).to_le_bytes());
            b.extend_from_slice(payload);
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&len.to_le_bytes());
        b.chunks(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect()
    }

    /// A memory map tag's payload: entry size and version, then the entries.
    fn memory_map_payload(entry_size: u32, areas: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut m = vec![];
        m.extend_from_slice(&entry_size.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        for &(base, len, kind) in areas {
            m.extend_from_slice(&base.to_le_bytes());
            m.extend_from_slice(&len.to_le_bytes());
            m.extend_from_slice(&kind.to_le_bytes());
            m.extend_from_slice(&0u32.to_le_bytes());
        }
        m
    }

    /// The given tags after a memory map of one available region.
    fn multiboot_info(tags: &[(u32, &[u8])]) -> Vec<u64> {
        let mmap = memory_map_payload(24, &[(0, 64 << 20, 1)]);
        let mut all = vec![(6, &mmap[..])];
        all.extend_from_slice(tags);
        raw_multiboot_info(&all)
    }

    fn boot_info_of(words: &[u64]) -> Option<hypervisor::boot_info::BootInfo> {
        use multiboot2::{BootInformation, BootInformationHeader};
        // SAFETY: `words` is the whole structure its header describes, 8-aligned.
        let mb = unsafe { BootInformation::load(words.as_ptr().cast::<BootInformationHeader>()) }.ok()?;
        hypervisor::boot_info::BootInfo::parse(&mb).ok()
    }

    /// Module and memory-map tags too short for their fixed fields, or a
    /// memory map whose entries are not whole 24-byte entries: the
    /// multiboot2 crate's getters assert on them (a panic at boot). The
    /// structure is refused instead, by `check`, `BootInfo::parse`, and the
    /// allocator's views of it (which then list nothing).
    #[test]
    fn malformed_module_and_memory_map_tags_are_refused_not_a_panic() {
        use hypervisor::boot_info::{self, BootInfoError};
        use multiboot2::{BootInformation, BootInformationHeader};
        let good = memory_map_payload(24, &[(0, 64 << 20, 1)]);
        let mut odd = good.clone();
        odd.push(0);
        let wide = memory_map_payload(32, &[(0, 64 << 20, 1)]);
        let module = [0u8; 12];
        let cases: [&[(u32, &[u8])]; 8] = [
            &[(6, &good[..4])],
            &[(6, &[])],
            &[(6, &odd)],
            &[(6, &wide)],
            &[(6, &good), (3, &module[..7])],
            &[(6, &good), (3, &[])],
            &[(3, &module[..4]), (6, &good)],
            &[(6, &good), (6, &good[..7])],
        ];
        for (i, tags) in cases.iter().enumerate() {
            let words = raw_multiboot_info(tags);
            let outcome = std::panic::catch_unwind(|| {
                // SAFETY: `words` is the whole structure its header describes, 8-aligned.
                let mb = unsafe { BootInformation::load(words.as_ptr().cast::<BootInformationHeader>()) }.unwrap();
                let checked = boot_info::check(&mb);
                let parsed = boot_info::BootInfo::parse(&mb).err();
                (checked, parsed, boot_info::memory_map(&mb).count(), boot_info::boot_ranges(&mb).count())
            });
            let (checked, parsed, areas, ranges) = outcome.unwrap_or_else(|_| panic!("case {i} panicked"));
            assert!(matches!(checked, Err(BootInfoError::MalformedTag { .. })), "case {i}: {checked:?}");
            assert_eq!(parsed, checked.err(), "case {i}");
            // The first MiB and the structure itself stay excluded; no module, no memory.
            assert_eq!((areas, ranges), (0, 2), "case {i}");
        }
        let words = multiboot_info(&[(3, &module), (1, b"x\0")]);
        // SAFETY: as above.
        let mb = unsafe { BootInformation::load(words.as_ptr().cast::<BootInformationHeader>()) }.unwrap();
        assert_eq!(boot_info::check(&mb), Ok(()));
        assert_eq!((boot_info::memory_map(&mb).count(), boot_info::boot_ranges(&mb).count()), (1, 3));
    }

    /// GRUB's RSDP tags copy the firmware's RSDP (20 bytes for ACPI 1.0, 36
    /// for 2.0) after their header. A tag whose size leaves less than that
    /// is not an RSDP: it is ignored (the other kind is used if present),
    /// never read past, and never panics the boot.
    #[test]
    fn rsdp_tags_shorter_than_an_rsdp_are_ignored() {
        let mut v1 = [0u8; 20];
        v1[..8].copy_from_slice(b"RSD PTR ");
        let mut v2 = [0u8; 36];
        v2[..8].copy_from_slice(b"RSD PTR ");
        v2[15] = 2;
        type Tags<'a> = &'a [(u32, &'a [u8])];
        let cases: [(Tags, Option<&[u8]>); 7] = [
            (&[(14, &v1)], Some(&v1)),
            (&[(15, &v2)], Some(&v2)),
            (&[(14, &v1[..12])], None),
            (&[(14, &[])], None),
            (&[(15, &v2[..20])], None),
            (&[(15, &v2[..35]), (14, &v1)], Some(&v1)),
            (&[(14, &v1[..19]), (15, &v2[..1])], None),
        ];
        for (i, (tags, want)) in cases.iter().enumerate() {
            let words = multiboot_info(tags);
            let info = std::panic::catch_unwind(|| boot_info_of(&words))
                .unwrap_or_else(|_| panic!("case {i}: parsing the boot information panicked"))
                .expect("a memory map");
            assert_eq!(info.rsdp.as_deref(), *want, "case {i}");
        }
    }

    fn command_line(rng: &mut Rng) -> String {
        let mut s = String::new();
        if rng.chance(50) {
            s.push_str(rng.pick(&["guest=a", "guest=linux", "guest=x_1"]));
            for _ in 0..rng.upto(4) {
                s.push(' ');
                s.push_str(rng.pick(VALID));
            }
        }
        for _ in 0..rng.upto(if s.is_empty() { 8 } else { 2 }) {
            s.push_str(rng.pick(&[" ", "  ", "\t", "\n", "\x0c", "\r", "\u{a0}", ""]));
            s.push_str(rng.pick(WORDS));
        }
        if rng.chance(30) {
            let bytes = mutate(rng, s.as_bytes(), 200);
            s = String::from_utf8_lossy(&bytes).into_owned();
        }
        s
    }

    #[test]
    fn guest_command_lines_parse_to_valid_configs_or_refuse() {
        let mut rng = Rng::new(0xc0f1);
        let mut accepted = 0;
        for case in 0..scaled(20_000) {
            let line = command_line(&mut rng);
            let what = format!("case {case}: {line:?}");
            // An initrd is named before `--`, by a module that is not a guest.
            if let Some(owner) = config::initrd_owner(&line) {
                assert!(!config::is_guest_module(&line), "{what}");
                let options = line.split_ascii_whitespace().take_while(|w| *w != "--");
                assert!(options.clone().any(|w| w == format!("initrd={owner}")), "{what}: owner {owner:?}");
            }
            let _ = hypervisor::boot_info::options(&line).count();
            match config::parse(&line) {
                Ok(c) => {
                    accepted += 1;
                    assert!((1..=config::NAME_MAX).contains(&c.name.len()), "{what}: name {:?}", c.name);
                    assert!(
                        c.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'),
                        "{what}: name {:?}",
                        c.name
                    );
                    assert!((config::MEM_MIN..=config::MEM_MAX).contains(&c.mem_bytes), "{what}: {}", c.mem_bytes);
                    assert_eq!(c.mem_bytes % (2 << 20), 0, "{what}");
                    assert!(c.trusted.iter().all(|t| !t.is_empty()), "{what}");
                    assert!(config::is_guest_module(&line), "{what}: parsed but not a guest module");
                    assert_eq!(c.kind == GuestKind::Linux, config::is_pass_through_module(&line), "{what}");
                    // The arguments are the words after the first word `--`.
                    let after: Vec<&str> = line.split_ascii_whitespace().skip_while(|w| *w != "--").skip(1).collect();
                    let after = after.join(" ");
                    let words: Vec<&str> = c.args.split_whitespace().collect();
                    assert_eq!(words, after.split_whitespace().collect::<Vec<_>>(), "{what}");
                    assert_eq!(config::initrd_owner(&line), None, "{what}: a guest taken for an initrd");
                    // The start record truncates, never overflows.
                    let info = guest_agent::start_info::StartInfo::new(&c.name, c.mem_bytes, &c.args);
                    assert!(info.cmdline_len as usize <= guest_agent::start_info::CMDLINE_MAX, "{what}");
                    let _ = info.to_bytes();
                }
                Err(e) => assert!(!e.to_string().is_empty(), "{what}"),
            }
        }
        assert!(accepted > 1_000, "only {accepted} accepted");
        for s in ["", "K", "0", "18446744073709551615", "18446744073709551615K", "17179869184G", "16m", "١٦M"] {
            let n = config::parse_size(s);
            if let Some(n) = n {
                assert!(s.trim_end_matches(['K', 'k', 'M', 'm', 'G', 'g']).parse::<u64>().is_ok(), "{s}: {n}");
            }
        }
    }

    /// A bzImage header as the boot protocol lays it out, protocol 2.15.
    fn bzimage(rng: &mut Rng) -> Vec<u8> {
        let setup_sects = 1 + rng.below(8) as usize;
        let kernel_offset = (setup_sects + 1) * 512;
        let payload = 0x201 + rng.upto(0x3000);
        let mut b = rng.bytes(kernel_offset + payload);
        b[..kernel_offset].fill(0);
        b[0x1f1] = setup_sects as u8;
        b[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        b[0x200] = 0xeb;
        b[0x201] = 0x6a;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x211] = 1;
        b[0x230..0x234].copy_from_slice(&(0x20_0000u32).to_le_bytes());
        b[0x234] = 1;
        b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        let init = payload as u32 + rng.below(0x40_0000) as u32;
        b[0x260..0x264].copy_from_slice(&init.to_le_bytes());
        b
    }

    /// Header fields rewritten with boundary values.
    fn hostile_bzimage(rng: &mut Rng) -> Vec<u8> {
        let mut b = bzimage(rng);
        for _ in 0..rng.below(4) {
            let (at, width) = rng.pick(&[
                (0x1f1usize, 1usize),
                (0x201, 1),
                (0x206, 2),
                (0x230, 4),
                (0x234, 1),
                (0x236, 2),
                (0x238, 4),
                (0x258, 8),
                (0x260, 4),
            ]);
            let v = rng.edgy().to_le_bytes();
            b[at..at + width].copy_from_slice(&v[..width]);
        }
        if rng.chance(30) {
            b = mutate(rng, &b, b.len() + 16);
        }
        if rng.chance(10) {
            let n = rng.upto(b.len());
            b.truncate(n);
        }
        b
    }

    #[test]
    fn bzimages_parse_load_and_describe_themselves_within_bounds() {
        let mut rng = Rng::new(0xb2);
        let g = GuestRam::new(48 << 20);
        let mut loaded = 0;
        for case in 0..scaled(1_500) {
            let bytes = hostile_bzimage(&mut rng);
            let what = format!("case {case}: {} bytes", bytes.len());
            let Ok(image) = BzImage::parse(&bytes) else { continue };
            assert!(image.kernel_offset < bytes.len(), "{what}");
            assert_eq!(image.kernel(), &bytes[image.kernel_offset..], "{what}");
            assert!(image.init_size >= image.kernel().len() as u64, "{what}");
            assert!(image.kernel_alignment.is_power_of_two() && image.kernel_alignment >= 0x1000, "{what}");
            // Where it goes: inside RAM, clear of what must be avoided, below the limit.
            let ram = [Region::new(0x10_0000, 0x9f_0000 + rng.below(4) * 0x40_0000), Region::new(0x100_0000, 48 << 20)];
            let avoid =
                [Region::new(0x7_0000, 0x8_0000), Region::new(0x100_0000 + rng.below(0x80) * 0x1000, 0x180_0000)];
            let limit = rng.pick(&[4u64 << 30, 48 << 20, 0x200_0000]);
            let Ok(at) = image.load_address(&ram, &avoid, limit) else { continue };
            let end = at + image.init_size;
            assert!(end <= limit, "{what}: {at:#x}");
            assert!(ram.iter().any(|r| r.start <= at && end <= r.end), "{what}: {at:#x} not in RAM");
            assert!(!avoid.iter().any(|a| a.overlaps(&Region::new(at, end))), "{what}: {at:#x} overlaps");
            assert!(at == image.pref_address || (image.relocatable && at % image.kernel_alignment == 0), "{what}");
            // boot_params and the load itself.
            let e820: Vec<E820Entry> = (0..rng.upto(130))
                .map(|i| E820Entry { region: Region::new(i as u64, i as u64 + 1), kind: 1 })
                .collect();
            let layout = BootLayout {
                cmdline_addr: rng.edgy(),
                cmdline_len: rng.upto(5000),
                initrd: rng.chance(50).then(|| Region::new(rng.edgy(), rng.edgy())),
                rsdp: rng.chance(50).then(|| rng.edgy()),
            };
            match linux::boot_params(&image, &e820, &layout) {
                Ok(bp) => {
                    assert!(e820.len() <= e820::MAX_ENTRIES && layout.cmdline_len <= image.cmdline_max, "{what}");
                    assert_eq!(usize::from(bp[0x1e8]), e820.len(), "{what}");
                }
                Err(e) => assert!(!e.to_string().is_empty(), "{what}"),
            }
            if end <= g.size() {
                let cmdline: String = (0..rng.upto(300)).map(|_| rng.pick(&['a', ' ', '=', 'é'])).collect();
                let plan = LoadPlan {
                    image: &image,
                    load_address: at,
                    e820: &e820[..e820.len().min(128)],
                    cmdline: &cmdline,
                    initrd: None,
                    rsdp: None,
                };
                if let Ok(entry) = linux::load(&g.memory, &g.phys, &plan) {
                    loaded += 1;
                    assert_eq!(entry.rip, at + 0x200, "{what}");
                }
            }
        }
        assert!(loaded > 50, "only {loaded} loaded");
    }

    /// An ELF64 x86-64 executable with `n` program headers.
    fn elf(rng: &mut Rng) -> Vec<u8> {
        let n = 1 + rng.below(3) as usize;
        let mut b = vec![0u8; 64 + 56 * n + 0x2000];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(n as u16).to_le_bytes());
        for i in 0..n {
            let ph = 64 + 56 * i;
            b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
            b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
            b[ph + 8..ph + 16].copy_from_slice(&(0x1000u64).to_le_bytes());
            b[ph + 24..ph + 32].copy_from_slice(&(0x10_0000u64 + 0x10_0000 * i as u64).to_le_bytes());
            b[ph + 32..ph + 40].copy_from_slice(&0x800u64.to_le_bytes());
            b[ph + 40..ph + 48].copy_from_slice(&0x3000u64.to_le_bytes());
        }
        b
    }

    #[test]
    fn elf_images_with_hostile_headers_are_refused_or_load_inside_guest_ram() {
        let mut rng = Rng::new(0xe1f);
        let g = GuestRam::new(4 << 20);
        let mut loaded = 0;
        for case in 0..scaled(4_000) {
            let mut b = elf(&mut rng);
            for _ in 0..rng.below(4) {
                let ph = 64 + 56 * rng.below(3) as usize;
                let (at, width) = rng.pick(&[
                    (24usize, 8usize),
                    (32, 8),
                    (54, 2),
                    (56, 2),
                    (ph + 8, 8),
                    (ph + 24, 8),
                    (ph + 32, 8),
                    (ph + 40, 8),
                ]);
                if at + width <= b.len() {
                    let v = rng.edgy().to_le_bytes();
                    b[at..at + width].copy_from_slice(&v[..width]);
                }
            }
            if rng.chance(20) {
                b = mutate(&mut rng, &b, b.len());
            }
            let what = format!("case {case}");
            let mem = rng.pick(&[4u64 << 20, 2 << 20, u64::MAX]);
            if let Ok((segments, entry)) = loader::parse_elf(&b, mem) {
                for s in &segments {
                    assert!(s.file_offset.checked_add(s.file_size).is_some_and(|e| e <= b.len()), "{what}: {s:?}");
                    assert!(s.file_size as u64 <= s.mem_size, "{what}: {s:?}");
                    assert!(s.paddr >= loader::layout::IMAGE_MIN, "{what}: {s:?}");
                    assert!(s.paddr.checked_add(s.mem_size).is_some_and(|e| e <= mem), "{what}: {s:?}");
                }
                assert!(segments.iter().any(|s| s.executable && (s.paddr..s.paddr + s.mem_size).contains(&entry)));
            }
            match loader::load_native(&g.memory, &g.phys, &b, "fuzz", "console=x") {
                Ok(state) => {
                    loaded += 1;
                    assert!(state.rip >= loader::layout::IMAGE_MIN && state.rip < g.size(), "{what}");
                }
                Err(e) => assert!(!e.to_string().is_empty(), "{what}"),
            }
        }
        assert!(loaded > 100, "only {loaded} loaded");
    }

    fn rank(kind: u32) -> u8 {
        match kind {
            e820::RAM => 0,
            e820::ACPI => 1,
            e820::NVS => 2,
            e820::UNUSABLE => 3,
            _ => 4,
        }
    }

    fn entries(rng: &mut Rng, n: usize) -> Vec<E820Entry> {
        (0..n)
            .map(|_| {
                let start = if rng.chance(20) { rng.edgy() } else { rng.below(64) << 20 | rng.below(4) << 12 };
                let end = match rng.below(5) {
                    0 => rng.edgy(),
                    1 => start,
                    _ => start.saturating_add(rng.below(32) << 20 | rng.below(4) << 12),
                };
                E820Entry { region: Region::new(start, end), kind: rng.pick(&[1, 1, 1, 2, 3, 4, 5, 0, 12, u32::MAX]) }
            })
            .collect()
    }

    #[test]
    fn memory_maps_merge_into_a_sorted_disjoint_map_that_honours_ranks() {
        let mut rng = Rng::new(0xe820);
        let mut built = 0;
        for case in 0..scaled(3_000) {
            let n = rng.upto(40);
            let firmware = entries(&mut rng, n);
            let n = rng.upto(8);
            let overlays = entries(&mut rng, n);
            let what = format!("case {case}");
            let Ok(map) = linux::build_e820(&firmware, &overlays) else { continue };
            built += 1;
            assert!(map.len() <= e820::MAX_ENTRIES, "{what}");
            for w in map.windows(2) {
                assert!(w[0].region.end <= w[1].region.start, "{what}: {w:?} overlap or are unsorted");
                assert!(!(w[0].region.end == w[1].region.start && w[0].kind == w[1].kind), "{what}: unmerged {w:?}");
            }
            // At every boundary the answer is the overlay's, or else the firmware's, by rank.
            let points: BTreeSet<u64> = firmware
                .iter()
                .chain(&overlays)
                .flat_map(|e| [e.region.start, e.region.end.saturating_sub(1), e.region.start.saturating_add(1)])
                .collect();
            for p in points {
                let best = |list: &[E820Entry]| {
                    list.iter().filter(|e| e.region.contains(p)).map(|e| e.kind).max_by_key(|&k| rank(k))
                };
                let expected = best(&overlays).or_else(|| best(&firmware));
                let got = map.iter().find(|e| e.region.contains(p)).map(|e| e.kind);
                match (expected, got) {
                    (Some(k), Some(g)) => {
                        assert_eq!(rank(k), rank(g), "{what}: at {p:#x}\n{firmware:x?}\n{overlays:x?}\n{map:x?}")
                    }
                    (e, g) => assert_eq!(e, g, "{what}: at {p:#x}\n{firmware:?}\n{overlays:?}\n{map:?}"),
                }
            }
        }
        assert!(built > 1_000, "only {built} maps built");
    }

    #[test]
    fn event_logs_parse_without_reading_past_their_bytes() {
        use hypervisor::tpm::event_log::{parse, Event, EventLog};
        let mut rng = Rng::new(0x10c);
        for case in 0..scaled(3_000) {
            let mut log = EventLog::new(rng.upto(4096));
            let mut pushed = Vec::new();
            for _ in 0..rng.upto(20) {
                let n = rng.upto(300);
                let e = Event {
                    pcr: rng.below(30) as u32,
                    kind: rng.edgy() as u32,
                    digest: [rng.byte(); 20],
                    data: rng.bytes(n),
                };
                if log.push(&e).is_ok() {
                    pushed.push(e);
                }
            }
            // Room is always left for the all-zero terminator a reader looks for.
            assert!(log.as_bytes().len() + 32 <= log.capacity() || pushed.is_empty(), "case {case}");
            let mut area = log.as_bytes().to_vec();
            area.resize(log.capacity().max(area.len()), 0);
            if pushed.iter().all(|e| !(e.pcr == 0 && e.kind == 0 && e.data.is_empty())) {
                assert_eq!(parse(&area), Ok(pushed), "case {case}");
            }
            // Arbitrary bytes: parsed or refused with the offset of the bad record.
            let junk = mutate(&mut rng, &area, 5000);
            if let Err(at) = parse(&junk) {
                assert!(at <= junk.len(), "case {case}: error offset {at}");
            }
        }
    }

    #[test]
    fn uart_lines_are_bounded_and_printed_escaped() {
        use hypervisor::console::Escaped;
        use hypervisor::devices::uart::{Uart, BASE};
        let mut rng = Rng::new(0x16550);
        let mut uart = Uart::default();
        let mut lines = 0;
        for _ in 0..scaled(200_000) {
            let port = match rng.below(10) {
                0 => BASE + rng.below(8) as u16,
                1 => rng.next() as u16,
                _ => BASE,
            };
            let value = if rng.chance(3) { b'\n' } else { rng.byte() };
            if let Some(line) = uart.write(port, value) {
                lines += 1;
                assert!(line.len() <= 512, "a line of {} bytes", line.len());
                let shown = Escaped(&line).to_string();
                assert!(shown.bytes().all(|b| (0x20..0x7f).contains(&b)), "{shown:?}");
            }
            let _ = uart.read(rng.next() as u16);
        }
        assert!(lines > 100, "{lines}");
    }
}

// ---------------------------------------------------------------------------
// The agent's ABI: hypercall registers and the structures behind them.
// ---------------------------------------------------------------------------

mod agent_abi {
    use super::*;
    use guest_agent::integrity as abi;
    use guest_agent::{Call, Error, Registers};
    use hypervisor::exits::hypercall::{decode, Request, MAX_LOG_READ, MAX_RECORDS_PER_READ};
    use hypervisor::integrity::layout::Range;
    use hypervisor::integrity::wire;

    const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

    #[test]
    fn hypercall_arguments_are_decoded_only_when_every_check_holds() {
        let mut rng = Rng::new(0x4ca11);
        let numbers = [0u64, 1, 2, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x1f, 0x20, 0x21, 0x30, 0x31, 0x32];
        let max_blob = guest_agent::vtpm_store::MAX_BLOB as u64;
        let layout_size = core::mem::size_of::<abi::KernelLayout>() as u64;
        let info_size = core::mem::size_of::<abi::ModuleInfo>() as u64;
        let mut decoded = 0;
        for case in 0..scaled(100_000) {
            let arg = |rng: &mut Rng| match rng.below(4) {
                0 => rng.pick(&[layout_size, info_size, 1, 1024, 1025, MAX_LOG_READ, MAX_LOG_READ + 1, max_blob + 1]),
                _ => rng.edgy(),
            };
            let regs = Registers {
                rax: if rng.chance(90) { rng.pick(&numbers) } else { rng.edgy() },
                rbx: arg(&mut rng),
                rcx: arg(&mut rng),
                rdx: arg(&mut rng),
                rsi: arg(&mut rng),
            };
            let what = format!("case {case}: {regs:x?}");
            let kernel_range = |addr: u64, size: u64| addr >= KERNEL_HALF && addr.checked_add(size).is_some();
            match decode(&regs) {
                Ok(request) => {
                    decoded += 1;
                    match request {
                        Request::Version => assert_eq!(regs.rax, 0, "{what}"),
                        Request::Shutdown { code } => assert_eq!(u64::from(code), regs.rbx, "{what}"),
                        Request::KernelRegister { layout } => {
                            assert_eq!((layout, regs.rcx), (regs.rbx, layout_size), "{what}");
                            assert!(kernel_range(layout, layout_size), "{what}");
                        }
                        Request::ModuleRegister { info: module } | Request::KernelLock { agent: module } => {
                            assert_eq!((module, regs.rcx), (regs.rbx, info_size), "{what}");
                            assert!(kernel_range(module, info_size), "{what}");
                        }
                        Request::ModuleLive { id } | Request::ModuleUnregister { id } => {
                            assert_eq!(u64::from(id), regs.rbx, "{what}")
                        }
                        Request::ViolationsRead { buffer, count } => {
                            assert!(
                                (1..=MAX_RECORDS_PER_READ).contains(&count) && u64::from(count) == regs.rcx,
                                "{what}"
                            );
                            let bytes = u64::from(count) * abi::VIOLATION_RECORD_SIZE as u64;
                            assert!(buffer == regs.rbx && kernel_range(buffer, bytes), "{what}");
                        }
                        Request::EventLogRead { buffer, size, offset } => {
                            assert!(u64::from(size) <= MAX_LOG_READ && u64::from(size) == regs.rcx, "{what}");
                            assert_eq!((buffer, u64::from(offset)), (regs.rbx, regs.rdx), "{what}");
                            assert!(buffer.checked_add(u64::from(size)).is_some(), "{what}");
                        }
                        Request::VtpmStoreFetch { buffer, size } => {
                            assert!(u64::from(size) <= max_blob && u64::from(size) == regs.rcx, "{what}");
                            assert!(buffer == regs.rbx && kernel_range(buffer, u64::from(size)), "{what}");
                        }
                        Request::VtpmStoreDone { version } => assert_eq!(version, regs.rbx, "{what}"),
                        Request::StackNew { base } => {
                            assert!(base == regs.rbx && base & 0x3fff == 0 && kernel_range(base, 0x4000), "{what}")
                        }
                    }
                }
                Err(e) => {
                    assert!(e.code() < 0, "{what}");
                    assert_eq!(e == Error::UnknownCall, Call::from_raw(regs.rax).is_none(), "{what}: {e:?}");
                }
            }
        }
        assert!(decoded > 10_000, "{decoded}");
    }

    #[test]
    fn agent_structures_decode_to_well_formed_values_or_are_refused() {
        let mut rng = Rng::new(0x317e);
        let layout_size = core::mem::size_of::<abi::KernelLayout>();
        // Ranges mostly in order, anywhere (up to the end of the address space).
        let range = |rng: &mut Rng| {
            let start = rng.edgy();
            let end = if rng.chance(97) { start.saturating_add(rng.below(0x10_0000)) } else { rng.edgy() };
            abi::WireRange { start, end }
        };
        let tamper = |rng: &mut Rng, mut b: Vec<u8>| {
            if rng.chance(10) {
                b = mutate(rng, &b, b.len() + 8);
            }
            b
        };
        let (mut layouts, mut modules) = (0, 0);
        for case in 0..scaled(20_000) {
            let mut l =
                abi::KernelLayout { version: abi::STRUCT_VERSION, size: layout_size as u32, ..Default::default() };
            for r in [&mut l.text, &mut l.rodata, &mut l.ro_after_init, &mut l.syscall_table, &mut l.idt]
                .into_iter()
                .chain([&mut l.ksymtab, &mut l.ksymtab_gpl])
                .chain(&mut l.poke_routines)
                .chain(&mut l.sensitive)
            {
                *r = range(&mut rng);
            }
            l.entry_syscall = rng.edgy();
            l.kernel_page_table = rng.edgy();
            for t in l.indirect_thunks.iter_mut().chain(&mut l.return_thunks) {
                *t = if rng.chance(50) { 0 } else { rng.edgy() };
            }
            let b = tamper(&mut rng, bytes_of(&l));
            if let Ok(m) = wire::kernel_layout(&b) {
                layouts += 1;
                let l = &m.layout;
                for r in [l.text, l.rodata, l.ro_after_init, l.syscall_table, l.idt, m.ksymtab, m.ksymtab_gpl] {
                    assert!(r.start <= r.end, "case {case}: {r:x?}");
                }
                assert!(l.poke_routines.iter().chain(&l.sensitive).all(|r| !r.is_empty()), "case {case}");
                assert!(l.return_thunks.windows(2).all(|w| w[0] < w[1]) && !l.return_thunks.contains(&0));
                let _ = l.validate(rng.edgy());
            }
            let mut i = abi::ModuleInfo::default();
            for c in &mut i.name {
                *c = if rng.chance(10) { 0 } else { rng.byte() };
            }
            for r in i.code.iter_mut().chain(&mut i.data).chain(&mut i.init) {
                *r = range(&mut rng);
            }
            (i.entries, i.fixups) = (rng.edgy(), rng.edgy());
            i.entry_count = if rng.chance(80) { rng.below(4097) as u32 } else { rng.edgy() as u32 };
            i.fixup_count = if rng.chance(80) { rng.below(4097) as u32 } else { rng.edgy() as u32 };
            i.module_size = if rng.chance(80) { abi::MODULE_STRUCT_MIN } else { rng.edgy() as u32 };
            let b = tamper(&mut rng, bytes_of(&i));
            if let Ok(m) = wire::module_info(&b) {
                modules += 1;
                assert!(m.entry_count <= abi::MODULE_ENTRIES_MAX && m.fixup_count <= abi::MODULE_FIXUPS_MAX);
                assert!(m.info.name.len() <= abi::MODULE_NAME_MAX, "case {case}");
                assert!(m.info.name.chars().all(|c| c.is_ascii_graphic()), "case {case}: {:?}", m.info.name);
                let i = &m.info;
                assert!(i.code.iter().chain(&i.data).chain(&i.init).all(|r| !r.is_empty()), "case {case}");
                let n = rng.upto(200);
                let raw = rng.bytes(n);
                for (insn, fixup) in wire::fixups(&raw, &i.code) {
                    assert!(i.code.iter().any(|r| r.contains(insn)) && i.code.iter().any(|r| r.contains(fixup)));
                }
            }
            // Symbol tables anywhere, up to the very end of the address space.
            let entries = rng.upto(8) as u64;
            let start = if rng.chance(50) { u64::MAX - entries * 12 - rng.below(4) } else { rng.edgy() };
            if let Some(end) = start.checked_add(entries * 12) {
                let raw = rng.bytes(entries as usize * 12);
                assert_eq!(wire::ksymtab(Range::new(start, end), &raw).len() as u64, entries, "case {case}");
            }
        }
        assert!(layouts > 100 && modules > 1_000, "{layouts} {modules}");
    }

    /// A symbol table whose start the guest put in the last bytes of the
    /// address space: entry addresses must not wrap (nor overflow, which
    /// panics a debug build) while their PREL32 fields are resolved.
    #[test]
    fn a_ksymtab_at_the_top_of_the_address_space_does_not_overflow() {
        let raw = [0u8; 3 * wire::KERNEL_SYMBOL_SIZE as usize];
        for start in [u64::MAX, u64::MAX - 3, u64::MAX - 11, u64::MAX - 12, u64::MAX - 30] {
            let table = Range::new(start, u64::MAX);
            let symbols = std::panic::catch_unwind(|| wire::ksymtab(table, &raw))
                .unwrap_or_else(|_| panic!("ksymtab at {start:#x} panicked"));
            // Only entries whose three fields have addresses are decoded.
            let whole = (u64::MAX - start + 1) / wire::KERNEL_SYMBOL_SIZE;
            assert_eq!(symbols.len() as u64, whole.min(3), "table at {start:#x}");
            for (i, &(value, name)) in symbols.iter().enumerate() {
                let base = start + i as u64 * wire::KERNEL_SYMBOL_SIZE;
                assert_eq!((value, name), (base, base + 4), "entry {i} of the table at {start:#x}");
            }
        }
    }

    #[test]
    fn ranges_list_exactly_the_pages_they_touch_even_at_the_top_of_the_address_space() {
        let mut rng = Rng::new(0x9a9e);
        for case in 0..scaled(20_000) {
            let start = rng.edgy();
            let end = match rng.below(4) {
                0 => u64::MAX - rng.below(0x3000),
                1 => start.saturating_add(rng.below(0x5000)),
                2 => rng.edgy(),
                _ => start.wrapping_sub(rng.below(0x3000)),
            };
            let r = Range::new(start, end);
            let expected = if r.is_empty() { 0 } else { ((end - 1) >> 12) - (start >> 12) + 1 };
            let pages: Vec<u64> = r.pages().take(expected.min(512) as usize + 2).collect();
            let what = format!("case {case}: {start:#x}..{end:#x}");
            assert_eq!(pages.len() as u64, expected.min(512 + 2), "{what}");
            assert!(pages.iter().all(|p| p & 0xfff == 0 && *p < end), "{what}: {pages:x?}");
            assert!(pages.windows(2).all(|w| w[1] == w[0] + 0x1000), "{what}");
            if let Some(first) = pages.first() {
                assert_eq!(*first, start & !0xfff, "{what}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The integrity views under a hostile agent and hostile modules: a
// pass-through guest with its agent, on a fake VMX layer.
// ---------------------------------------------------------------------------

mod integrity_views {
    use super::*;
    use guest_agent::integrity as abi;
    use guest_agent::Error;
    use hypervisor::exits::{dispatch, Action, ExitContext, HostCpu, StopReason};
    use hypervisor::guest::{config, CrLimits, Guest, Platform};
    use hypervisor::integrity::control::{ControlError, GuestControl};
    use hypervisor::integrity::engine::PageClass;
    use hypervisor::integrity::layout::{KernelLayout, Range};
    use hypervisor::integrity::{GuestIntegrity, Mode, View, ViolationKind};
    use hypervisor::mm::paging::Perms;

    /// Kernel virtual K + x maps guest-physical x (4 KiB pages, 16 MiB).
    const K: u64 = 0xffff_ffff_8000_0000;
    const RAM: u64 = 16 << 20;
    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PTS: u64 = 0x4000;
    const LAYOUT: u64 = 0x10_0000;
    const KSYMTAB: u64 = 0x11_0000;
    const NAMES: u64 = 0x11_1000;
    const INFO: u64 = 0x13_0000;
    const ENTRIES: u64 = 0x14_0000;
    const FIXUPS: u64 = 0x18_0000;
    const BUFFER: u64 = 0x20_0000;
    const TEXT: u64 = 0x40_0000;
    const TEXT_END: u64 = 0x50_0000;
    const PRINTK: u64 = TEXT + 0x1000;
    const SET_MEMORY_RW: u64 = TEXT + 0x2000;
    const ENTRY_SYSCALL: u64 = TEXT + 0x3000;
    const HANDLER: u64 = TEXT + 0x4000;
    const POKE: u64 = TEXT + 0x5000;
    /// The agent: its code page (a VMCALL at its start), its data page
    /// (its `struct module` at the start), its registration.
    const AGENT: u64 = 0x64_0000;
    const AGENT_DATA: u64 = 0x64_1000;
    const AGENT_INFO: u64 = 0x65_0000;
    const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
    const RODATA: u64 = 0x60_0000;
    const RO_AFTER_INIT: u64 = 0x60_4000;
    const SYSCALL_TABLE: u64 = 0x61_0000;
    const IDT: u64 = 0x62_0000;
    const SENSITIVE: u64 = 0x63_0000;
    const STACK: u64 = 0x70_0000;
    const MODULES: u64 = 0x80_0000;
    const MODULE_PAGES: u64 = 0x400;
    /// Device memory: not RAM, but the kernel view maps it (pass-through).
    const MMIO: u64 = 0xfe00_0000;
    /// The hypervisor's own memory and the vTPM's window: the guest's EPT
    /// never maps them.
    const HYPERVISOR: u64 = 0x1_0000_0000;
    const TIS: u64 = 0xfed4_0000;
    const LSTAR: u32 = 0xc000_0082;

    /// What the guest's EPT maps before integrity changes anything.
    fn owned(page: u64) -> bool {
        page < RAM || (MMIO..MMIO + 0x10_0000).contains(&page)
    }

    /// Page rights that differ from the initial mapping, and the module views.
    type ViewState = (BTreeMap<(View, u64), Option<Perms>>, BTreeSet<u32>);

    /// A module as the engine shows it: id, name, init ranges, trusted.
    type ModuleState = (u32, Option<String>, Option<Vec<Range>>, bool);

    /// The VMX layer's views, with the kernel view's initial mapping modelled
    /// and allocation failures injected on request (where a real EPT would
    /// need a new table).
    struct Control {
        explicit: BTreeMap<(View, u64), Perms>,
        views: BTreeSet<u32>,
        fail_percent: u64,
        rng: Rng,
        /// Pages mapped that the guest does not own.
        escapes: Vec<(View, u64, Perms)>,
        monitor_trap: bool,
    }

    impl Control {
        fn new() -> Self {
            Control {
                explicit: BTreeMap::new(),
                views: BTreeSet::new(),
                fail_percent: 0,
                rng: Rng::new(0xc7),
                escapes: Vec::new(),
                monitor_trap: false,
            }
        }

        fn default_perms(view: View, page: u64) -> Option<Perms> {
            (view == View::Kernel && owned(page)).then_some(Perms::RWX)
        }

        /// The mappings that differ from the initial ones, and the views.
        fn state(&self) -> ViewState {
            let changed = self
                .explicit
                .keys()
                .map(|&(v, p)| ((v, p), self.perms(v, p)))
                .filter(|&((v, p), now)| now != Self::default_perms(v, p))
                .collect();
            (changed, self.views.clone())
        }

        fn fails(&mut self) -> bool {
            self.fail_percent > 0 && self.rng.chance(self.fail_percent)
        }
    }

    impl GuestControl for Control {
        fn activate_view(&mut self, view: View) -> Result<(), ControlError> {
            match view {
                View::Module(m) if !self.views.contains(&m) => Err(ControlError),
                _ => Ok(()),
            }
        }
        fn set_interrupt_window(&mut self, _: bool) {}
        fn set_perms(&mut self, view: View, page: u64, perms: Perms) -> Result<(), ControlError> {
            assert_eq!(page & 0xfff, 0, "set_perms on an unaligned page {page:#x}");
            if let View::Module(m) = view {
                if !self.views.contains(&m) {
                    return Err(ControlError);
                }
            }
            // Tables are allocated when a view first gets its own entry for a
            // page (a new leaf, or a large page split): only then can it fail.
            if !self.explicit.contains_key(&(view, page)) && self.fails() {
                return Err(ControlError);
            }
            if !perms.is_empty() && !owned(page) {
                self.escapes.push((view, page, perms));
            }
            self.explicit.insert((view, page), perms);
            Ok(())
        }
        fn perms(&self, view: View, page: u64) -> Option<Perms> {
            match self.explicit.get(&(view, page)) {
                Some(p) if p.is_empty() => None,
                Some(p) => Some(*p),
                None => Self::default_perms(view, page),
            }
        }
        fn create_view(&mut self, module: u32) -> Result<(), ControlError> {
            if self.fails() {
                return Err(ControlError);
            }
            self.explicit.retain(|(v, _), _| *v != View::Module(module));
            self.views.insert(module);
            Ok(())
        }
        fn destroy_view(&mut self, module: u32) {
            self.views.remove(&module);
            self.explicit.retain(|(v, _), _| *v != View::Module(module));
        }
        fn has_monitor_trap(&self) -> bool {
            true
        }
        fn set_monitor_trap(&mut self, on: bool) {
            self.monitor_trap = on;
        }
        fn intercept_debug_exceptions(&mut self, _: bool) {}
        fn guard_control_registers(&mut self, _: u64, _: u64) {}
        fn trap_descriptor_tables(&mut self) {}
        fn trap_msr_writes(&mut self, _: &[u32]) {}
        fn run_alone(&mut self) {}
    }

    struct Host;

    impl HostCpu for Host {
        fn cpuid(&self, leaf: u32, _: u32) -> [u32; 4] {
            [leaf, 0, 0, 0]
        }
        fn rdtsc(&self) -> u64 {
            1
        }
        fn read_msr(&self, msr: u32) -> u64 {
            if msr == LSTAR {
                K + ENTRY_SYSCALL
            } else {
                u64::from(msr) << 8
            }
        }
        fn write_msr(&self, _: u32, _: u64) {}
        fn set_xcr0(&self, _: u64) {}
        fn port_read(&self, _: u16, _: u8) -> u32 {
            0xffff_ffff
        }
        fn port_write(&self, _: u16, _: u8, _: u32) {}
        fn lapic_read(&self, _: u64) -> u32 {
            0
        }
        fn lapic_write(&self, _: u64, _: u32) {}
        fn xcr0_offered(&self) -> u64 {
            0x7
        }
    }

    /// The engine as far as it can be observed from outside.
    #[derive(Debug, PartialEq)]
    struct EngineState {
        locked: bool,
        layout: Option<KernelLayout>,
        pages: Vec<(u64, PageClass)>,
        modules: Vec<ModuleState>,
        violations: usize,
        dropped: u64,
        view: View,
    }

    struct World {
        guest: Guest,
        vcpu: Vcpu,
        ram: GuestRam,
        control: Control,
        rng: Rng,
        /// Guest-physical pages of text, rodata, the syscall table, the IDT.
        protected: Vec<u64>,
        /// Guest-physical pages of the kernel's upper page-table levels.
        tables: Vec<u64>,
        ids: Vec<u32>,
        /// Registrations that succeeded (some modules go again).
        registrations: usize,
    }

    fn pte(gpa: u64) -> u64 {
        PTS + (gpa >> 12) * 8
    }

    impl World {
        /// Kernel registered and locked.
        fn new(seed: u64, mode: Mode) -> World {
            let mut w = World::unlocked(seed, mode);
            assert_eq!(w.lock().1, 1, "kernel locked; the agent is module 1");
            w
        }

        /// The agent locks the layout, offering its own registration.
        fn lock(&mut self) -> (Action, i64) {
            self.call(0x11, K + AGENT_INFO, core::mem::size_of::<abi::ModuleInfo>() as u64, 0)
        }

        /// Kernel registered, not locked yet.
        fn unlocked(seed: u64, mode: Mode) -> World {
            let ram = GuestRam::new(RAM);
            ram.write(PML4 + 511 * 8, &(PDPT | 3).to_le_bytes());
            ram.write(PDPT + 510 * 8, &(PD | 3).to_le_bytes());
            for i in 0..RAM >> 21 {
                ram.write(PD + i * 8, &((PTS + i * 0x1000) | 3).to_le_bytes());
            }
            for page in (0..RAM).step_by(0x1000) {
                ram.write(pte(page), &(page | 3).to_le_bytes());
            }
            let mut l = abi::KernelLayout {
                version: abi::STRUCT_VERSION,
                size: core::mem::size_of::<abi::KernelLayout>() as u32,
                text: abi::WireRange { start: K + TEXT, end: K + TEXT_END },
                rodata: abi::WireRange { start: K + RODATA, end: K + RODATA + 0x4000 },
                ro_after_init: abi::WireRange { start: K + RO_AFTER_INIT, end: K + RO_AFTER_INIT + 0x1000 },
                syscall_table: abi::WireRange { start: K + SYSCALL_TABLE, end: K + SYSCALL_TABLE + 0x1000 },
                idt: abi::WireRange { start: K + IDT, end: K + IDT + 0x1000 },
                entry_syscall: K + ENTRY_SYSCALL,
                ksymtab: abi::WireRange { start: K + KSYMTAB, end: K + KSYMTAB + 24 },
                kernel_page_table: K + PML4,
                ..Default::default()
            };
            l.poke_routines[0] = abi::WireRange { start: K + POKE, end: K + POKE + 0x100 };
            l.sensitive[0] = abi::WireRange { start: K + SENSITIVE, end: K + SENSITIVE + 0x1000 };
            ram.write(LAYOUT, &bytes_of(&l));
            for (i, (value, name, text)) in
                [(PRINTK, NAMES, &b"printk\0"[..]), (SET_MEMORY_RW, NAMES + 0x10, &b"set_memory_rw\0"[..])]
                    .into_iter()
                    .enumerate()
            {
                let at = KSYMTAB + i as u64 * 12;
                ram.write(at, &((value as i64 - at as i64) as i32).to_le_bytes());
                ram.write(at + 4, &((name as i64 - (at + 4) as i64) as i32).to_le_bytes());
                ram.write(name, text);
            }
            let h = K + HANDLER;
            let mut gate = [0u8; 16];
            gate[0..2].copy_from_slice(&(h as u16).to_le_bytes());
            gate[5] = 0x8e;
            gate[6..8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
            gate[8..12].copy_from_slice(&((h >> 32) as u32).to_le_bytes());
            ram.write(IDT + 14 * 16, &gate);

            let config = config::parse("guest=fuzz").unwrap();
            let limits = CrLimits {
                cr0_fixed0: 0x8000_0021,
                cr0_fixed1: 0xffff_ffff,
                cr4_fixed0: 0x2000,
                cr4_fixed1: 0x0037_67ff,
                unrestricted: true,
            };
            let mut guest = Guest::new(
                config,
                Platform::PassThrough { pm1a_control: None, lapic: None },
                ram.memory.clone(),
                limits,
            );
            // "trusted" is pinned to one page of zeros: hostile modules of
            // that name are trusted or refused by their code.
            let pinned = hypervisor::integrity::policy::Entry {
                name: "trusted".into(),
                text_len: 0x1000,
                sha256: <sha2::Sha256 as sha2::Digest>::digest([0u8; 0x1000]).into(),
                masks: vec![],
                ..Default::default()
            };
            let mut agent_code = vec![0u8; 0x1000];
            agent_code[..3].copy_from_slice(&VMCALL);
            ram.write(AGENT, &agent_code);
            ram.write(AGENT_DATA, &abi::module_state::COMING.to_le_bytes());
            let mut a = abi::ModuleInfo { module: K + AGENT_DATA, module_size: 0x100, ..Default::default() };
            a.name[..abi::AGENT_NAME.len()].copy_from_slice(abi::AGENT_NAME.as_bytes());
            a.code[0] = abi::WireRange { start: K + AGENT, end: K + AGENT + 0x1000 };
            a.data[0] = abi::WireRange { start: K + AGENT_DATA, end: K + AGENT_DATA + 0x1000 };
            ram.write(AGENT_INFO, &bytes_of(&a));
            let agent = hypervisor::integrity::policy::Entry {
                name: abi::AGENT_NAME.into(),
                text_len: 0x1000,
                sha256: <sha2::Sha256 as sha2::Digest>::digest(&agent_code).into(),
                masks: vec![],
                ..Default::default()
            };
            guest.integrity = Some(GuestIntegrity::new(mode, vec![pinned, agent]));
            let mut vcpu = long_mode_vcpu(PML4);
            vcpu.write(Field::IdtrBase, K + IDT);
            let protected = (TEXT..TEXT_END)
                .step_by(0x1000)
                .chain((RODATA..RO_AFTER_INIT + 0x1000).step_by(0x1000))
                .chain([SYSCALL_TABLE, IDT])
                .collect();
            let mut w = World {
                guest,
                vcpu,
                ram,
                control: Control::new(),
                rng: Rng::new(seed),
                protected,
                tables: vec![PML4, PDPT, PD],
                ids: Vec::new(),
                registrations: 0,
            };
            let layout_size = core::mem::size_of::<abi::KernelLayout>() as u64;
            assert_eq!(w.call(0x10, K + LAYOUT, layout_size, 0).1, 0, "kernel registered");
            w
        }

        fn exit(&mut self, exit: ExitInfo) -> Action {
            let mut ctx = ExitContext {
                guest: &mut self.guest,
                vcpu: &mut self.vcpu,
                exit: &exit,
                host: &Host,
                phys: &self.ram.phys,
                control: Some(&mut self.control),
            };
            dispatch(&mut ctx)
        }

        /// One VMCALL from the agent at CPL 0; (action, RAX as a status).
        fn call(&mut self, rax: u64, rbx: u64, rcx: u64, rdx: u64) -> (Action, i64) {
            let regs = &mut self.vcpu.regs;
            (regs.rax, regs.rbx, regs.rcx, regs.rdx) = (rax, rbx, rcx, rdx);
            self.vcpu.write(Field::Rip, K + AGENT);
            self.vcpu.write(Field::Rsp, K + STACK + 0x800);
            let action = self.exit(ExitInfo { reason: 18, instruction_len: 3, ..Default::default() });
            if action == Action::Resume {
                assert_eq!(self.vcpu.read(Field::Rip), K + AGENT + 3, "a hypercall did not return past VMCALL");
            }
            (action, self.vcpu.regs.rax as i64)
        }

        fn integrity(&self) -> &GuestIntegrity {
            self.guest.integrity.as_ref().unwrap()
        }

        fn engine_state(&self) -> EngineState {
            let i = self.integrity();
            let e = &i.engine;
            EngineState {
                locked: e.is_locked(),
                layout: e.layout().cloned(),
                pages: e.pages().collect(),
                modules: (1..=300)
                    .map(|id| (id, e.module_name(id).map(String::from), e.module_init(id), e.is_trusted(id)))
                    .filter(|m| m.1.is_some())
                    .collect(),
                violations: e.violations.len(),
                dropped: e.violations.dropped,
                view: i.local.view,
            }
        }

        /// A range a hostile agent might report for a module.
        fn hostile_range(&mut self) -> abi::WireRange {
            let rng = &mut self.rng;
            let module_page = |rng: &mut Rng| K + MODULES + rng.below(MODULE_PAGES) * 0x1000;
            let (start, end) = match rng.below(16) {
                0..=5 => {
                    let s = module_page(rng) + if rng.chance(20) { rng.below(0x1000) } else { 0 };
                    (s, s + 1 + rng.below(8 * 0x1000))
                }
                6 => {
                    let s = K + TEXT + rng.below(TEXT_END - TEXT);
                    (s, s + 1 + rng.below(0x4000))
                }
                7 => {
                    let s = K + rng.pick(&[RODATA, RO_AFTER_INIT, SYSCALL_TABLE, IDT, SENSITIVE, PML4, PDPT, PD]);
                    (s, s + 0x1000)
                }
                8 => {
                    let s = module_page(rng);
                    (s, s.saturating_add(1 << (30 + rng.below(17))))
                }
                9 => {
                    let s = module_page(rng);
                    (s, s - 1 - rng.below(0x1000))
                }
                10 => (u64::MAX - rng.below(0x3000), u64::MAX),
                11 => (0, 0),
                12 => (0x1000 + rng.below(0x1000_0000), 0x1000_0000 + rng.below(0x1000_0000)),
                13 => {
                    let s = K + RAM + rng.below(0x100_0000);
                    (s, s + 0x2000)
                }
                14 => {
                    // Aliases: a module-area page whose PTE the agent pointed elsewhere.
                    let s = module_page(rng);
                    (s, s + 0x1000)
                }
                _ => (rng.edgy(), rng.edgy()),
            };
            abi::WireRange { start, end }
        }

        fn hostile_module(&mut self) -> abi::ModuleInfo {
            let mut m = abi::ModuleInfo::default();
            let name: &[u8] = match self.rng.below(5) {
                0 => b"trusted",
                1 => b"evil",
                2 => b"trusted\0junk",
                _ => &[0xff, b'\n', 0x1b, b'[', b'2', b'J', b'x'],
            };
            m.name[..name.len()].copy_from_slice(name);
            // Code and data mostly where a module would be (so that many
            // registrations succeed), init ranges anywhere: they are only
            // translated when the module goes live.
            for r in m.code.iter_mut().chain(&mut m.data) {
                *r = match self.rng.below(8) {
                    0..=3 => {
                        let s = K + MODULES + self.rng.below(MODULE_PAGES) * 0x1000;
                        abi::WireRange { start: s, end: s + 1 + self.rng.below(4 * 0x1000) }
                    }
                    4 | 5 => abi::WireRange::default(),
                    _ => self.hostile_range(),
                };
            }
            for r in &mut m.init {
                *r = match self.rng.below(4) {
                    0 => m.code[0],
                    1 => m.data[0],
                    2 => abi::WireRange::default(),
                    _ => self.hostile_range(),
                };
            }
            // Entry points and fixups: inside its code, elsewhere, or not readable.
            let code = m.code[0];
            let count = self.rng.pick(&[0u32, 1, 3, 8, 4096, 4097, u32::MAX]);
            let entries: Vec<u8> = (0..count.min(4096))
                .flat_map(|_| {
                    let a = if self.rng.chance(70) {
                        code.start.wrapping_add(self.rng.below(0x100))
                    } else {
                        self.rng.edgy()
                    };
                    a.to_le_bytes()
                })
                .collect();
            self.ram.write(ENTRIES, &entries);
            m.entries = if self.rng.chance(90) { K + ENTRIES } else { self.rng.edgy() };
            m.entry_count = count;
            let fixups = self.rng.pick(&[0u32, 2, 4096, 4097]);
            let bytes: Vec<u8> = (0..fixups.min(4096) * 2)
                .flat_map(|_| code.start.wrapping_add(self.rng.below(0x2000)).to_le_bytes())
                .collect();
            self.ram.write(FIXUPS, &bytes);
            m.fixups = if self.rng.chance(90) { K + FIXUPS } else { self.rng.edgy() };
            m.fixup_count = fixups;
            // Its struct module, at the start of its data (the kernel's
            // COMING), or anywhere.
            m.module = if self.rng.chance(90) { m.data[0].start } else { self.rng.edgy() };
            let fits = m.data[0].end.saturating_sub(m.data[0].start).clamp(64, 0x400) as u32;
            m.module_size = if self.rng.chance(97) { fits } else { self.rng.edgy() as u32 };
            if let Ok(gpa) = self.translate(m.module) {
                self.ram.write(gpa, &abi::module_state::COMING.to_le_bytes());
            }
            if self.rng.chance(5) {
                m.version ^= 1 << self.rng.below(32);
            }
            m
        }

        /// Sets the kernel's state of registered module `id`, mostly.
        fn kernel_state(&mut self, id: u32, state: u32) {
            let Some(at) = self.integrity().engine.module_struct(id) else { return };
            let state = if self.rng.chance(90) { state } else { self.rng.below(4) as u32 };
            if let Ok(gpa) = self.translate(at) {
                self.ram.write(gpa, &state.to_le_bytes());
            }
        }

        /// Where the guest's page tables map `va` (4 KiB pages, as built).
        fn translate(&self, va: u64) -> Result<u64, ()> {
            let off = va.checked_sub(K).ok_or(())?;
            if off >= RAM {
                return Err(());
            }
            let e = self.ram.u64_at(pte(off & !0xfff));
            if e & 1 == 0 || (e & PTE_ADDR) >= RAM {
                return Err(());
            }
            Ok((e & PTE_ADDR) | (off & 0xfff))
        }

        /// Points a module-area PTE somewhere a hostile kernel might.
        fn remap(&mut self) {
            let page = MODULES + self.rng.below(MODULE_PAGES) * 0x1000;
            let rng = &mut self.rng;
            let target = match rng.below(9) {
                0 => page,
                1 => (TEXT + rng.below(TEXT_END - TEXT)) & !0xfff,
                2 => rng.pick(&[RODATA, SYSCALL_TABLE, IDT, SENSITIVE, PML4, PDPT, PD, PTS]),
                3 => HYPERVISOR + rng.below(0x100) * 0x1000,
                4 => TIS + rng.below(5) * 0x1000,
                5 => MMIO + rng.below(0x100) * 0x1000,
                6 => rng.below(RAM >> 12) << 12,
                7 => (rng.next() << 12) & PTE_ADDR,
                _ => MODULES + rng.below(MODULE_PAGES) * 0x1000,
            };
            let present = if rng.chance(90) { 3 } else { 0 };
            self.ram.write(pte(page), &(target | present).to_le_bytes());
        }

        /// A hypercall with hostile arguments; checks that a refused one
        /// changed nothing.
        fn hostile_call(&mut self) {
            let info_size = core::mem::size_of::<abi::ModuleInfo>() as u64;
            let layout_size = core::mem::size_of::<abi::KernelLayout>() as u64;
            let pick_id = |w: &mut World| {
                if !w.ids.is_empty() && w.rng.chance(80) {
                    w.rng.pick(&w.ids)
                } else {
                    w.rng.edgy() as u32
                }
            };
            let (rax, rbx, rcx, rdx) = match self.rng.below(12) {
                0..=4 => {
                    let m = self.hostile_module();
                    self.ram.write(INFO, &bytes_of(&m));
                    (0x12, K + INFO, info_size, 0)
                }
                5 | 6 => {
                    let id = if self.rng.chance(50) { self.ids.last().copied() } else { None };
                    let id = id.unwrap_or_else(|| pick_id(self));
                    self.kernel_state(id, abi::module_state::LIVE);
                    (0x13, u64::from(id), 0, 0)
                }
                7 => {
                    let id = pick_id(self);
                    self.kernel_state(id, abi::module_state::GOING);
                    (0x14, u64::from(id), 0, 0)
                }
                8 => {
                    let buffer = match self.rng.below(4) {
                        0 => K + BUFFER,
                        1 => K + BUFFER + 0x9000,
                        2 => K + RAM - 0x100,
                        _ => self.rng.edgy(),
                    };
                    (0x15, buffer, self.rng.pick(&[1, 16, 1024, 1025, 0]), 0)
                }
                9 => (0x10, K + LAYOUT, layout_size, 0),
                10 => (0x11, K + AGENT_INFO, info_size, 0),
                _ => (self.rng.pick(&[0x20, 0x16, 0x1f, 0]), self.rng.edgy(), self.rng.edgy(), self.rng.edgy()),
            };
            let user = self.rng.chance(3);
            self.vcpu.write(Field::SsAccessRights, if user { 0x93 | (3 << 5) } else { 0x93 });
            let before = (self.engine_state(), self.control.state());
            let (action, status) = self.call(rax, rbx, rcx, rdx);
            self.vcpu.write(Field::SsAccessRights, 0x93);
            assert_eq!(action, Action::Resume, "call {rax:#x}");
            if user {
                assert_eq!(status, Error::NotPermitted.code(), "a user-mode hypercall");
            }
            if status < 0 {
                let (mut after, control) = (self.engine_state(), self.control.state());
                // An isolated module's hypercall is refused and recorded: one
                // `hypercall` violation, and nothing else changes.
                if matches!(before.0.view, View::Module(_)) && !user {
                    assert_eq!(status, Error::NotPermitted.code(), "a module's hypercall");
                    let last = self.integrity().engine.violations.peek(usize::MAX).last().copied();
                    assert_eq!(last.map(|r| r.kind), Some(ViolationKind::Hypercall as u32), "recorded");
                    after.violations -= 1;
                } else if rax == 0x12 && !user && before.0.locked {
                    // A module that cannot be isolated is reported, and the
                    // agent vetoes its load: one `registration-refused`.
                    let last = self.integrity().engine.violations.peek(usize::MAX).last().copied();
                    assert_eq!(last.map(|r| r.kind), Some(ViolationKind::RegistrationRefused as u32), "recorded");
                    after.violations -= 1;
                }
                let after = (after, control);
                assert!(
                    after == before,
                    "refused call {rax:#x} ({rbx:#x}, {rcx:#x}) -> {status} changed state:\nbefore {before:#x?}\nafter {after:#x?}"
                );
            } else if rax == 0x12 {
                self.ids.push(status as u32);
                self.registrations += 1;
            }
        }

        /// An EPT violation in the current view, at a page a hostile module
        /// (or kernel) might touch.
        fn hostile_fault(&mut self) -> Action {
            let views: Vec<u32> = self.control.views.iter().copied().collect();
            let view = if views.is_empty() || self.rng.chance(40) {
                View::Kernel
            } else {
                View::Module(self.rng.pick(&views))
            };
            self.guest.integrity.as_mut().unwrap().local.view = view;
            let rng = &mut self.rng;
            let page = match rng.below(10) {
                0 => rng.pick(&self.protected),
                1 => rng.pick(&self.tables),
                2..=4 => MODULES + rng.below(MODULE_PAGES) * 0x1000,
                5 => rng.below(RAM >> 12) << 12,
                6 => MMIO + rng.below(0x100) * 0x1000,
                7 => HYPERVISOR + rng.below(0x100) * 0x1000,
                8 => TIS + rng.below(5) * 0x1000,
                _ => rng.edgy() & PTE_ADDR,
            };
            let gpa = page | rng.below(0x1000);
            let code = |rng: &mut Rng| match rng.below(4) {
                0 => K + TEXT + rng.below(TEXT_END - TEXT),
                1 => K + POKE + rng.below(0x100),
                2 => K + MODULES + rng.below(MODULE_PAGES * 0x1000),
                _ => rng.edgy(),
            };
            let rip = code(rng);
            let words = [code(rng), code(rng)];
            let gva = if rng.chance(50) { K.wrapping_add(gpa) } else { rng.edgy() };
            let access = rng.pick(&[1u64, 2, 4, 2, 1]);
            let linear = if rng.chance(80) { 1 << 7 } else { 0 };
            self.ram.write(STACK + 0x800, &words[0].to_le_bytes());
            self.ram.write(STACK + 0x808, &words[1].to_le_bytes());
            self.vcpu.write(Field::Rip, rip);
            self.vcpu.write(Field::Rsp, K + STACK + 0x800);
            for i in [0u8, 1, 2, 3, 6, 7, 8, 9] {
                *reg_by_index(&mut self.vcpu.regs, i).unwrap() = code(&mut self.rng);
            }
            let action = self.exit(ExitInfo {
                reason: 48,
                qualification: access | linear | (1 << 8),
                guest_physical: gpa,
                guest_linear: gva,
                instruction_len: 3,
                ..Default::default()
            });
            if self.integrity().local.stepping.is_some() {
                // The single step ends: the page closes again.
                assert_eq!(self.exit(ExitInfo { reason: 37, ..Default::default() }), Action::Resume);
                assert!(self.integrity().local.stepping.is_none());
            }
            action
        }

        /// The views match the policy: nothing the guest does not own is
        /// mapped, protected kernel pages are never writable, and a module
        /// view writes only its data or untracked pages and executes only
        /// its code.
        fn check_views(&self, what: &str) {
            assert!(
                self.control.escapes.is_empty(),
                "{what}: mapped memory the guest does not own: {:x?}",
                self.control.escapes
            );
            let engine = &self.integrity().engine;
            // Protections are on from the lock.
            for &p in self.protected.iter().filter(|_| engine.is_locked()) {
                let k = self.control.perms(View::Kernel, p).unwrap_or(Perms::empty());
                assert!(!k.contains(Perms::WRITE), "{what}: kernel view may write protected page {p:#x} ({k:?})");
            }
            for (&(view, page), &perms) in &self.control.explicit {
                let class = engine.class_of(page);
                match view {
                    View::Module(m) => {
                        if perms.contains(Perms::WRITE) {
                            assert!(
                                class.is_none() || class == Some(PageClass::ModuleData(m)),
                                "{what}: module {m} may write {page:#x}, a {class:?} page"
                            );
                        }
                        if perms.contains(Perms::EXECUTE) {
                            assert_eq!(
                                class,
                                Some(PageClass::ModuleCode(m)),
                                "{what}: module {m} may execute {page:#x}"
                            );
                        }
                    }
                    View::Kernel if engine.is_locked() => {
                        let read_only = matches!(
                            class,
                            Some(
                                PageClass::KernelText
                                    | PageClass::KernelReadOnly
                                    | PageClass::SyscallTable
                                    | PageClass::Idt
                                    | PageClass::ModuleCode(_)
                            )
                        );
                        assert!(
                            !(read_only && perms.contains(Perms::WRITE)),
                            "{what}: kernel view may write {page:#x}, a {class:?} page"
                        );
                    }
                    View::Kernel => {}
                }
            }
        }
    }

    #[test]
    fn a_hostile_agent_and_hostile_modules_never_break_the_views() {
        let mut registered = 0;
        for run in 0..scaled(8) {
            let mode = if run % 2 == 0 { Mode::Enforce } else { Mode::Audit };
            let mut w = World::new(run as u64, mode);
            w.check_views("after the lock");
            if run % 3 == 2 {
                w.control.fail_percent = 5;
            }
            for step in 0..700 {
                let what = format!("run {run} step {step}");
                match w.rng.below(10) {
                    0..=3 => w.hostile_call(),
                    4 => w.remap(),
                    _ => {
                        let action = w.hostile_fault();
                        assert!(
                            !matches!(action, Action::Stop(StopReason::HypervisorError(_)))
                                || w.control.fail_percent > 0,
                            "{what}: {action:?}"
                        );
                    }
                }
                w.check_views(&what);
            }
            registered += w.registrations;
        }
        assert!(registered > 20, "only {registered} modules registered");
    }

    #[test]
    fn the_lock_protects_only_guest_ram_and_is_all_or_nothing() {
        let (mut locked, mut refused) = (0, 0);
        for case in 0..scaled(60) {
            let mut w = World::unlocked(case as u64, Mode::Enforce);
            // The kernel half of the top-level table, and the PDPT, point anywhere.
            for _ in 0..1 + w.rng.below(6) {
                let rng = &mut w.rng;
                let target = match rng.below(6) {
                    0 => HYPERVISOR + rng.below(0x100) * 0x1000,
                    1 => TIS,
                    2 => MMIO + rng.below(0x100) * 0x1000,
                    3 => rng.pick(&[PTS, TEXT, IDT, PML4]),
                    4 => rng.below(RAM >> 12) << 12,
                    _ => (rng.next() << 12) & PTE_ADDR,
                };
                let (table, index) = if rng.chance(60) { (PML4, 256 + rng.below(255)) } else { (PDPT, rng.below(510)) };
                w.ram.write(table + index * 8, &(target | 3).to_le_bytes());
            }
            w.control.fail_percent = if case % 2 == 0 { 0 } else { 1 + w.rng.below(20) };
            let before = (w.engine_state(), w.control.state());
            let (_, status) = w.lock();
            let what = format!("case {case}: lock -> {status}");
            if status < 0 {
                refused += 1;
                // Out of table memory, or tables found over the agent's own
                // pages (the walk follows every level): refused either way.
                assert!([Error::NoSpace.code(), Error::InvalidArgument.code()].contains(&status), "{what}");
                assert!((w.engine_state(), w.control.state()) == before, "{what}: a refused lock changed state");
            } else {
                locked += 1;
                assert!(w.integrity().engine.is_locked(), "{what}");
                for t in [PML4, PDPT, PD] {
                    assert_eq!(w.integrity().engine.class_of(t), Some(PageClass::PageTable), "{what}: {t:#x}");
                }
            }
            w.check_views(&what);
        }
        assert!(locked > 10 && refused > 5, "{locked} locked, {refused} refused");
    }

    #[test]
    fn registration_work_is_bounded_whatever_the_ranges_claim() {
        let mut w = World::new(3, Mode::Enforce);
        // 512 GiB of kernel addresses, every 2 MiB of them mapping the same
        // 2 MiB of RAM (the module area).
        const PDPT_ALIAS: u64 = 0xc000;
        const PD_ALIAS: u64 = 0xd000;
        w.ram.write(PML4 + 256 * 8, &(PDPT_ALIAS | 3).to_le_bytes());
        for i in 0..512 {
            w.ram.write(PDPT_ALIAS + i * 8, &(PD_ALIAS | 3).to_le_bytes());
            w.ram.write(PD_ALIAS + i * 8, &(MODULES | 0x83).to_le_bytes());
        }
        let info_size = core::mem::size_of::<abi::ModuleInfo>() as u64;
        let base = 0xffff_8000_0000_0000u64;
        // 16 MiB registers; one page more than 64 MiB, 1 GiB and all 512 GiB do not.
        for (len, accepted) in [(16 << 20, true), ((64 << 20) + 0x1000, false), (1 << 30, false), (1 << 39, false)] {
            let mut m = abi::ModuleInfo::default();
            m.name[..3].copy_from_slice(b"big");
            m.code[0] = abi::WireRange { start: base + (1 << 30), end: base + (1 << 30) + len };
            m.data[0] = abi::WireRange { start: K + STACK - 0x1000, end: K + STACK };
            m.module = m.data[0].start;
            m.module_size = 0x100;
            w.ram.write(STACK - 0x1000, &abi::module_state::COMING.to_le_bytes());
            w.ram.write(INFO, &bytes_of(&m));
            let reads = w.ram.phys.reads.get();
            let (_, status) = w.call(0x12, K + INFO, info_size, 0);
            let reads = w.ram.phys.reads.get() - reads;
            assert_eq!(status >= 0, accepted, "{len:#x} bytes: {status}");
            assert!(reads <= 4 * (16 << 20) / 0x1000 + 100, "{len:#x} bytes: {reads} reads of guest memory");
            if accepted {
                w.ram.write(STACK - 0x1000, &abi::module_state::GOING.to_le_bytes());
                assert_eq!(w.call(0x14, status as u64, 0, 0).1, 0);
            }
        }
        w.check_views("after the big modules");
    }
}
