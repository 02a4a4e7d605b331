//! Fakes that check the properties as they are used: host memory that fails
//! on any access outside what the guest owns, and a comparable vCPU.

use std::cell::{Cell, RefCell};

use hypervisor::guest::memory::{GuestMemory, HostPhys};
use hypervisor::mm::frames::Region;
use hypervisor::vcpu::{Field, GuestRegisters, VcpuState};

/// Host-physical memory: one buffer at `base`. An access outside it means
/// the hypervisor followed a guest-controlled address out of what the guest
/// owns: it panics, which the fuzzer reports.
pub struct Ram {
    pub base: u64,
    pub bytes: RefCell<Vec<u8>>,
    /// Writes seen, to tell a refused request that wrote anything.
    pub writes: Cell<u64>,
    /// Every write since the last [`Ram::take_log`], to check where it went.
    pub log: RefCell<Vec<Write>>,
}

/// One write to host memory.
#[derive(Clone, Debug)]
pub struct Write {
    pub hpa: u64,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
    /// By compare-and-exchange (the accessed and dirty bits of an entry).
    pub exchange: bool,
}

impl Ram {
    pub fn new(base: u64, len: usize) -> Self {
        Ram { base, bytes: RefCell::new(vec![0; len]), writes: Cell::new(0), log: RefCell::new(Vec::new()) }
    }

    /// Host memory at `base` holding `bytes`.
    pub fn with_bytes(base: u64, bytes: Vec<u8>) -> Self {
        Ram { base, bytes: RefCell::new(bytes), writes: Cell::new(0), log: RefCell::new(Vec::new()) }
    }

    pub fn take_log(&self) -> Vec<Write> {
        self.log.take()
    }

    fn put(&self, hpa: u64, data: &[u8], exchange: bool) {
        let at = self.offset(hpa, data.len());
        self.writes.set(self.writes.get() + 1);
        let mut bytes = self.bytes.borrow_mut();
        let old = bytes[at..at + data.len()].to_vec();
        self.log.borrow_mut().push(Write { hpa, old, new: data.to_vec(), exchange });
        bytes[at..at + data.len()].copy_from_slice(data);
    }

    fn offset(&self, hpa: u64, len: usize) -> usize {
        let size = self.bytes.borrow().len() as u64;
        match hpa.checked_sub(self.base) {
            Some(off) if off.checked_add(len as u64).is_some_and(|end| end <= size) => off as usize,
            _ => panic!("host memory touched outside what the guest owns: {hpa:#x}+{len:#x}"),
        }
    }
}

impl HostPhys for Ram {
    fn read(&self, hpa: u64, buf: &mut [u8]) {
        let at = self.offset(hpa, buf.len());
        buf.copy_from_slice(&self.bytes.borrow()[at..at + buf.len()]);
    }

    fn write(&self, hpa: u64, data: &[u8]) {
        self.put(hpa, data, false);
    }

    fn compare_exchange_u64(&self, hpa: u64, current: u64, new: u64) -> bool {
        assert_eq!(hpa % 8, 0, "an unaligned compare-and-exchange at {hpa:#x}");
        let mut b = [0u8; 8];
        self.read(hpa, &mut b);
        let same = u64::from_le_bytes(b) == current;
        if same {
            self.put(hpa, &new.to_le_bytes(), true);
        }
        same
    }
}

/// Host base of [`GuestRam`]'s buffer: far from guest-physical 0, so that
/// a guest-physical address used as a host one is caught.
pub const HOST_BASE: u64 = 0x1000_0000;

/// Guest RAM at guest-physical 0, backed by a [`Ram`] at [`HOST_BASE`].
pub struct GuestRam {
    pub memory: GuestMemory,
    pub phys: Ram,
}

impl GuestRam {
    pub fn new(size: u64) -> Self {
        let mut memory = GuestMemory::new();
        memory.add(Region::new(0, size), HOST_BASE).expect("one region");
        GuestRam { memory, phys: Ram::new(HOST_BASE, size as usize) }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.memory.write(&self.phys, gpa, data).expect("inside guest RAM");
    }
}

/// A vCPU as plain data, comparable before and after a refused operation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vcpu {
    pub regs: GuestRegisters,
    pub fields: [u64; 32],
}

impl VcpuState for Vcpu {
    fn regs(&mut self) -> &mut GuestRegisters {
        &mut self.regs
    }
    fn read(&self, field: Field) -> u64 {
        self.fields[field as usize]
    }
    fn write(&mut self, field: Field, value: u64) {
        self.fields[field as usize] = value;
    }
}

impl Vcpu {
    /// A general register by its encoding (4 is RSP, in the VMCS).
    pub fn gpr(&self, index: u8) -> u64 {
        self.regs.get(index, self.read(Field::Rsp))
    }

    pub fn set_gpr(&mut self, index: u8, value: u64) {
        let r = &mut self.regs;
        let slot = match index & 15 {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            4 => return self.write(Field::Rsp, value),
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            8 => &mut r.r8,
            9 => &mut r.r9,
            10 => &mut r.r10,
            11 => &mut r.r11,
            12 => &mut r.r12,
            13 => &mut r.r13,
            14 => &mut r.r14,
            _ => &mut r.r15,
        };
        *slot = value;
    }
}
