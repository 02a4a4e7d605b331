//! One virtual CPU: its VMCS, the VM entry/exit path, and the guest's EPT.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU16, Ordering};

use x86::vmx::vmcs::{control, guest, host, ro};

use super::bitmaps::{IoBitmap, MsrBitmap};
use super::caps::{EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls};
use super::enable::Vmx;
use super::entry_check::{self, GuestStateSnapshot, Segment};
use super::ept::{eptp, EptTable};
use super::vmcs::{self, Region};
use crate::arch::x86_64::percpu;
use crate::arch::x86_64::{cpu, gdt, lapic, timer, traps};
use crate::guest::boot64::{self, EntryState};
use crate::guest::memory::HostPhys;
use crate::mm::paging::{Attrs, MapError, PageSize, Perms};
use crate::mm::phys::{self, Identity, Tables};
use crate::smp::{CpuSet, Exclusive, Round, SIGNALS};
use crate::vcpu::{ExitInfo, Field, GuestRegisters, VcpuState};

global_asm!(
    r#"
    .section .text.ctvm_vmx, "ax"
    .global ctvm_vmx_run
// u64 ctvm_vmx_run(GuestRegisters *regs, u64 launched)
// Returns 0 after a VM exit, 1 for VMfailInvalid, 2 for VMfailValid.
ctvm_vmx_run:
    push rbp
    mov rbp, rsp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, 0x6c14                 // HOST_RSP
    vmwrite rax, rsp
    mov rax, [rdi + 15 * 8]         // guest CR2
    mov cr2, rax
    cmp rsi, 0
    mov rax, [rdi + 0 * 8]
    mov rbx, [rdi + 1 * 8]
    mov rcx, [rdi + 2 * 8]
    mov rdx, [rdi + 3 * 8]
    mov rsi, [rdi + 4 * 8]
    mov rbp, [rdi + 6 * 8]
    mov r8,  [rdi + 7 * 8]
    mov r9,  [rdi + 8 * 8]
    mov r10, [rdi + 9 * 8]
    mov r11, [rdi + 10 * 8]
    mov r12, [rdi + 11 * 8]
    mov r13, [rdi + 12 * 8]
    mov r14, [rdi + 13 * 8]
    mov r15, [rdi + 14 * 8]
    mov rdi, [rdi + 5 * 8]
    jne 2f
    vmlaunch
    jmp 3f
2:
    vmresume
3:
    // Still here: the entry failed. CF=1 VMfailInvalid, ZF=1 VMfailValid.
    mov eax, 1
    jc 4f
    mov eax, 2
4:
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret

    .global ctvm_vmx_exit
ctvm_vmx_exit:
    // RSP is HOST_RSP: the saved GuestRegisters pointer is on top.
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi + 0 * 8], rax
    mov [rdi + 1 * 8], rbx
    mov [rdi + 2 * 8], rcx
    mov [rdi + 3 * 8], rdx
    mov [rdi + 4 * 8], rsi
    mov [rdi + 6 * 8], rbp
    mov [rdi + 7 * 8], r8
    mov [rdi + 8 * 8], r9
    mov [rdi + 9 * 8], r10
    mov [rdi + 10 * 8], r11
    mov [rdi + 11 * 8], r12
    mov [rdi + 12 * 8], r13
    mov [rdi + 13 * 8], r14
    mov [rdi + 14 * 8], r15
    pop rax
    mov [rdi + 5 * 8], rax
    mov rax, cr2
    mov [rdi + 15 * 8], rax
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    xor eax, eax
    ret
"#
);

extern "C" {
    fn ctvm_vmx_run(regs: *mut GuestRegisters, launched: u64) -> u64;
    fn ctvm_vmx_exit();
}

const _: () = assert!(core::mem::size_of::<GuestRegisters>() == 16 * 8);

/// A guest's EPT hierarchy, invalidated whenever a change needs it: on
/// this CPU, and on every other CPU the guest runs on (a shootdown).
pub struct Ept {
    table: EptTable,
    single_context: bool,
    /// The CPUs whose vCPUs use this hierarchy.
    cpus: CpuSet,
}

impl Ept {
    pub fn new(vmx: &Vmx) -> Option<Ept> {
        let f = &vmx.controls.features;
        let largest = if f.ept_1g_pages {
            PageSize::Size1G
        } else if f.ept_2m_pages {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        let table = EptTable::new(&mut Tables, largest).ok()?;
        Some(Ept { table, single_context: f.invept_single_context, cpus: CpuSet::new() })
    }

    /// The CPUs whose vCPUs use this hierarchy: a change that removes rights
    /// reaches all of them before it completes.
    pub fn set_cpus(&mut self, cpus: CpuSet) {
        self.cpus = cpus;
    }

    pub fn cpus(&self) -> CpuSet {
        self.cpus
    }

    pub fn pointer(&self) -> u64 {
        eptp(self.table.root(), false)
    }

    pub fn map(&mut self, gpa: u64, hpa: u64, len: u64, attrs: Attrs) -> Result<(), MapError> {
        let flush = self.table.map(&mut Tables, gpa, hpa, len, attrs)?;
        if flush.is_needed() {
            self.invalidate();
        }
        Ok(())
    }

    pub fn protect(&mut self, gpa: u64, len: u64, perms: Perms) -> Result<(), MapError> {
        let flush = self.table.protect(&mut Tables, gpa, len, perms)?;
        if flush.is_needed() {
            self.invalidate();
        }
        Ok(())
    }

    pub fn unmap(&mut self, gpa: u64, len: u64) -> Result<(), MapError> {
        let flush = self.table.unmap(&mut Tables, gpa, len)?;
        if flush.is_needed() {
            self.invalidate();
        }
        Ok(())
    }

    /// Where a guest-physical address goes, and with what rights.
    pub fn translate(&self, gpa: u64) -> Option<crate::mm::paging::Translation> {
        self.table.translate(&Tables, gpa)
    }

    /// INVEPT for this hierarchy (single-context, or all of them) here, and a
    /// shootdown on the other CPUs that use it.
    pub fn invalidate(&self) {
        if self.single_context {
            invept(1, self.pointer());
        } else {
            invept(2, 0);
        }
        let here = percpu::current().index;
        if self.cpus.iter().any(|c| c != here) {
            shootdown(&self.cpus);
        }
    }

    pub fn destroy(self) {
        self.invalidate();
        self.table.destroy(&mut Tables);
    }
}

fn invept(kind: u64, eptp: u64) {
    let descriptor: [u64; 2] = [eptp, 0];
    // SAFETY: INVEPT type 1 names a hierarchy the caller owns; type 2
    // flushes every hierarchy's cached translations, which is always allowed.
    unsafe { asm!("invept {}, [{}]", in(reg) kind, in(reg) &descriptor, options(nostack)) };
}

/// Flushes every EPT-derived translation this CPU caches: what a CPU does
/// when it catches up with changes other CPUs published.
pub fn invept_all_contexts() {
    invept(2, 0);
}

/// Makes a change already made in shared memory (EPT rights removed, a
/// guest stopped) reach every CPU of `cpus` before each runs guest code
/// again: those inside a guest are stopped with an NMI and flush before
/// they re-enter; the others flush on their way in. Returns the NMIs sent.
pub fn shootdown(cpus: &CpuSet) -> u32 {
    let here = percpu::current().index;
    with_nmis(|send, spin| Some(SIGNALS.publish(cpus, here, send, spin))).kicks
}

/// vCPU `vcpu` of a guest on `cpus` takes it exclusively (see
/// `smp::exclusive`): returns once no other of its vCPUs runs guest code.
pub fn take_exclusive(exclusive: &Exclusive, vcpu: usize, cpus: &CpuSet) {
    let here = percpu::current().index;
    with_nmis(|send, spin| exclusive.take(vcpu, &SIGNALS, cpus, here, send, spin));
}

/// Runs a publication with NMIs as the signal (sent again after a second
/// without an answer, and said so), and counts its cost.
fn with_nmis(publish: impl FnOnce(&dyn Fn(usize), &mut dyn FnMut(usize) -> bool) -> Option<Round>) -> Round {
    let send = |cpu: usize| {
        if let Some(p) = percpu::of(cpu) {
            lapic::send_nmi(p.apic_id);
        }
    };
    let mut deadline = timer::deadline_us(1_000_000);
    let mut spin = |cpu: usize| {
        core::hint::spin_loop();
        if !timer::passed(deadline) {
            return false;
        }
        log::warn!(
            "CPU {cpu} has not answered a cross-CPU signal for a second (signal outstanding: {}); sending it again",
            SIGNALS.kick_outstanding(cpu)
        );
        deadline = timer::deadline_us(1_000_000);
        true
    };
    let started = cpu::rdtsc();
    let Some(round) = publish(&send, &mut spin) else { return Round::default() };
    SIGNALS.costs.record(&round, cpu::rdtsc().wrapping_sub(started));
    round
}

/// Extended processor state (x87/SSE/AVX) saved while another guest runs.
#[repr(C, align(64))]
struct XsaveArea([u8; 4096]);

static NEXT_VPID: AtomicU16 = AtomicU16::new(1);

/// One virtual CPU.
pub struct Vcpu {
    vmcs: Region,
    pub regs: GuestRegisters,
    launched: bool,
    xsave: Box<XsaveArea>,
    cr_masks: (u64, u64),
}

/// A guest's I/O and MSR bitmaps, in frames the VMCS points at.
pub struct Bitmaps {
    io_a: u64,
    io_b: u64,
    msr: u64,
}

/// Where a guest's bitmaps are, for the CPUs that set up its vCPUs.
#[derive(Clone, Copy, Debug)]
pub struct BitmapFrames {
    io_a: u64,
    io_b: u64,
    msr: u64,
}

impl Bitmaps {
    pub fn new(io: &IoBitmap, msr: &MsrBitmap) -> Option<Self> {
        let page = |bytes: &[u8]| -> Option<u64> {
            let frame = phys::alloc_zeroed(4096, 4096)?;
            Identity.write(frame, bytes);
            Some(frame)
        };
        Some(Bitmaps { io_a: page(&io.0[..4096])?, io_b: page(&io.0[4096..])?, msr: page(&msr.0[..])? })
    }
}

impl Bitmaps {
    pub fn frames(&self) -> BitmapFrames {
        BitmapFrames { io_a: self.io_a, io_b: self.io_b, msr: self.msr }
    }

    /// Makes guest writes to an MSR exit from now on.
    pub fn trap_msr_write(&self, msr: u32) {
        let mut page = MsrBitmap::pass_all();
        Identity.read(self.msr, &mut page.0[..]);
        page.trap(msr, super::bitmaps::MsrAccess::Write);
        Identity.write(self.msr, &page.0[..]);
    }
}

impl Drop for Bitmaps {
    fn drop(&mut self) {
        for frame in [self.io_a, self.io_b, self.msr] {
            phys::free(frame, 4096);
        }
    }
}

/// How a vCPU starts.
#[derive(Clone, Debug)]
pub enum Start {
    /// In 64-bit mode at the loader's entry (the guest's boot vCPU).
    Entry(EntryState),
    /// In the processor's INIT state, waiting for a start-up IPI (the
    /// guest's other vCPUs: its own INIT-SIPI-SIPI starts them).
    WaitForSipi,
}

/// How to set up a vCPU.
pub struct VcpuSetup<'a> {
    pub start: &'a Start,
    pub eptp: u64,
    pub bitmaps: BitmapFrames,
    /// TSC ticks between preemption-timer exits, when time slicing.
    pub timeslice: Option<u32>,
    /// The guest owns the machine's interrupts and may halt the CPU: no
    /// exits on external interrupts or HLT.
    pub pass_through: bool,
}

/// Access rights for the VMCS segment fields.
const AR_CODE64: u64 = 0xa09b;
const AR_DATA: u64 = 0xc093;
const AR_TSS_BUSY: u64 = 0x8b;
const AR_UNUSABLE: u64 = 1 << 16;

const CR0_PE: u64 = 1;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR4_PAE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;

impl Vcpu {
    /// Creates the VMCS and fills every control, host and guest field for a
    /// guest that starts in 64-bit mode at `setup.entry`.
    pub fn new(vmx: &Vmx, setup: &VcpuSetup<'_>) -> Result<Vcpu, String> {
        let bitmaps = setup.bitmaps;
        let region = Region::new(vmx.msrs.revision()).ok_or("no memory for a VMCS")?;
        // SAFETY: the region is a fresh, revision-stamped VMCS.
        unsafe { x86::bits64::vmx::vmclear(region.phys) }.map_err(|_| "VMCLEAR failed")?;
        // SAFETY: as above; it becomes the current VMCS for the writes below.
        unsafe { x86::bits64::vmx::vmptrld(region.phys) }.map_err(|_| "VMPTRLD failed")?;

        let c = &vmx.controls;
        let m = &vmx.msrs;
        let mut pin = c.pinbased;
        let mut proc = c.procbased;
        let mut exit_ctls = c.exit;
        if setup.pass_through {
            pin = c
                .pinbased_with(m, PinbasedControls::EXTERNAL_INTERRUPT_EXITING, false)
                .ok_or("external-interrupt exiting cannot be turned off")?;
            // Interrupts that exit from a module's view are acknowledged on
            // exit, so the hypervisor can deliver them in the kernel view.
            exit_ctls = c
                .exit_with(m, ExitControls::ACK_INTERRUPT_ON_EXIT, true)
                .ok_or("interrupts cannot be acknowledged on exit")?;
            proc =
                c.procbased_with(m, PrimaryControls::HLT_EXITING, false).ok_or("HLT exiting cannot be turned off")?;
        }
        if let Some(ticks) = setup.timeslice {
            if c.features.preemption_timer {
                pin |= PinbasedControls::VMX_PREEMPTION_TIMER.bits();
                vmcs::write(guest::VMX_PREEMPTION_TIMER_VALUE, u64::from(ticks));
            }
        }
        let long_mode = matches!(setup.start, Start::Entry(_));
        let entry_ctls =
            c.entry_with(m, EntryControls::IA32E_MODE_GUEST, long_mode).ok_or("IA-32e mode guests not allowed")?;
        let mut proc2 = c.procbased2;
        if c.features.vpid {
            let vpid = NEXT_VPID.fetch_add(1, Ordering::Relaxed);
            vmcs::write(control::VPID, u64::from(vpid));
        } else {
            proc2 &= !SecondaryControls::ENABLE_VPID.bits();
        }
        vmcs::write(control::PINBASED_EXEC_CONTROLS, u64::from(pin));
        vmcs::write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, u64::from(proc));
        vmcs::write(control::SECONDARY_PROCBASED_EXEC_CONTROLS, u64::from(proc2));
        vmcs::write(control::VMEXIT_CONTROLS, u64::from(exit_ctls));
        vmcs::write(control::VMENTRY_CONTROLS, u64::from(entry_ctls));
        vmcs::write(control::EXCEPTION_BITMAP, 0);
        vmcs::write(control::IO_BITMAP_A_ADDR_FULL, bitmaps.io_a);
        vmcs::write(control::IO_BITMAP_B_ADDR_FULL, bitmaps.io_b);
        vmcs::write(control::MSR_BITMAPS_ADDR_FULL, bitmaps.msr);
        vmcs::write(control::EPTP_FULL, setup.eptp);
        vmcs::write(control::CR3_TARGET_COUNT, 0);
        vmcs::write(control::VMEXIT_MSR_STORE_COUNT, 0);
        vmcs::write(control::VMEXIT_MSR_LOAD_COUNT, 0);
        vmcs::write(control::VMENTRY_MSR_LOAD_COUNT, 0);
        vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);

        // CR0.NE/PE/PG and CR4.VMXE are owned by the hypervisor: the guest
        // sees the read shadows and its writes to them exit.
        let cr0_mask = CR0_NE | CR0_PE | CR0_PG;
        let cr4_mask = CR4_VMXE;
        vmcs::write(control::CR0_GUEST_HOST_MASK, cr0_mask);
        vmcs::write(control::CR4_GUEST_HOST_MASK, cr4_mask);

        write_host_state();
        vmcs::write(guest::LINK_PTR_FULL, u64::MAX);
        vmcs::write(guest::IA32_PAT_FULL, DEFAULT_PAT);
        if vmx.controls.features.perf_global_ctrl {
            // No counter counts until the guest enables one, and none in the hypervisor.
            vmcs::write(guest::IA32_PERF_GLOBAL_CTRL_FULL, 0);
            vmcs::write(host::IA32_PERF_GLOBAL_CTRL_FULL, 0);
        }
        let regs = match setup.start {
            Start::Entry(entry) => {
                write_entry_state(vmx, entry);
                GuestRegisters { rdi: entry.rdi, rsi: entry.rsi, ..Default::default() }
            }
            Start::WaitForSipi => {
                if !c.features.unrestricted_guest || !c.features.wait_for_sipi_activity_state {
                    return Err("starting a vCPU needs unrestricted guests and the wait-for-SIPI state".into());
                }
                write_init_state(vmx);
                GuestRegisters::default()
            }
        };
        Ok(Vcpu {
            vmcs: region,
            regs,
            launched: false,
            xsave: Box::new(XsaveArea([0; 4096])),
            cr_masks: (cr0_mask, cr4_mask),
        })
    }

    /// Makes this vCPU's VMCS the current one.
    pub fn load(&self) {
        // SAFETY: the VMCS was cleared and initialised by `new_native`.
        if unsafe { x86::bits64::vmx::vmptrld(self.vmcs.phys) }.is_err() {
            log::error!("VMPTRLD of {:#x} failed", self.vmcs.phys);
        }
    }

    /// Enters the guest and returns at its next VM exit. A failed entry is
    /// turned into an exit with the entry-failure bit set and a detail string.
    pub fn run(&mut self, vmx: &Vmx) -> (ExitInfo, Option<String>) {
        // SAFETY: this vCPU's VMCS is current (the caller loaded it) and its
        // host state points at ctvm_vmx_exit; the registers are ours.
        let status = unsafe { ctvm_vmx_run(&mut self.regs, u64::from(self.launched)) };
        if status != 0 {
            let detail = if status == 2 {
                let e = vmcs::instruction_error();
                format!(
                    "VM-instruction error {e}: {} (entry event {:#x}, error code {:#x}, length {}; controls pin {:#x} proc {:#x} proc2 {:#x})",
                    vmcs::instruction_error_name(e),
                    vmcs::read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
                    vmcs::read(control::VMENTRY_EXCEPTION_ERR_CODE),
                    vmcs::read(control::VMENTRY_INSTRUCTION_LEN),
                    vmcs::read(control::PINBASED_EXEC_CONTROLS),
                    vmcs::read(control::PRIMARY_PROCBASED_EXEC_CONTROLS),
                    vmcs::read(control::SECONDARY_PROCBASED_EXEC_CONTROLS)
                )
            } else {
                String::from("VMfailInvalid: no current VMCS")
            };
            let exit = ExitInfo { reason: u16::MAX, entry_failed: true, ..Default::default() };
            return (exit, Some(detail));
        }
        self.launched = true;
        // VM exits that end outside SMM save blocking by SMI as 0 (SDM Vol.
        // 3C, 28.3.1.5); Bochs 2.7 saves the blocking a wait for a start-up
        // IPI left, which the next entry would refuse.
        let interruptibility = vmcs::read(guest::INTERRUPTIBILITY_STATE);
        if interruptibility & BLOCKING_BY_SMI != 0 {
            vmcs::write(guest::INTERRUPTIBILITY_STATE, interruptibility & !BLOCKING_BY_SMI);
        }
        let raw_reason = vmcs::read(ro::EXIT_REASON);
        let interruption_info = vmcs::read(ro::VMEXIT_INTERRUPTION_INFO) as u32;
        // An NMI's exit leaves NMIs blocked here, and a start-up IPI's does
        // in Bochs: the next cross-CPU signal must get through.
        let nmi = raw_reason & 0xffff == 0 && (interruption_info >> 8) & 7 == 2;
        if nmi || raw_reason & 0xffff == EXIT_SIPI {
            cpu::end_nmi_blocking();
        }
        let exit = ExitInfo {
            reason: raw_reason as u16,
            entry_failed: raw_reason & (1 << 31) != 0,
            qualification: vmcs::read(ro::EXIT_QUALIFICATION),
            instruction_len: vmcs::read(ro::VMEXIT_INSTRUCTION_LEN),
            instruction_info: vmcs::read(ro::VMEXIT_INSTRUCTION_INFO),
            guest_physical: vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL),
            guest_linear: vmcs::read(ro::GUEST_LINEAR_ADDR),
            interruption_info,
            interruption_error: vmcs::read(ro::VMEXIT_INTERRUPTION_ERR_CODE) as u32,
            idt_vectoring_info: vmcs::read(ro::IDT_VECTORING_INFO) as u32,
            idt_vectoring_error: vmcs::read(ro::IDT_VECTORING_ERR_CODE) as u32,
        };
        let detail = exit.entry_failed.then(|| self.diagnose_guest_state(vmx));
        (exit, detail)
    }

    /// Names the guest-state fields that fail the VM-entry checks.
    fn diagnose_guest_state(&self, vmx: &Vmx) -> String {
        let seg = |sel: u32, base: u32, limit: u32, ar: u32| Segment {
            selector: vmcs::read(sel) as u16,
            base: vmcs::read(base),
            limit: vmcs::read(limit) as u32,
            access_rights: vmcs::read(ar) as u32,
        };
        let snapshot = GuestStateSnapshot {
            cr0: vmcs::read(guest::CR0),
            cr3: vmcs::read(guest::CR3),
            cr4: vmcs::read(guest::CR4),
            dr7: vmcs::read(guest::DR7),
            efer: vmcs::read(guest::IA32_EFER_FULL),
            pat: vmcs::read(guest::IA32_PAT_FULL),
            rip: vmcs::read(guest::RIP),
            rflags: vmcs::read(guest::RFLAGS),
            cs: seg(guest::CS_SELECTOR, guest::CS_BASE, guest::CS_LIMIT, guest::CS_ACCESS_RIGHTS),
            ss: seg(guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS),
            ds: seg(guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS),
            es: seg(guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS),
            fs: seg(guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS),
            gs: seg(guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS),
            tr: seg(guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS),
            ldtr: seg(guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS),
            gdtr_base: vmcs::read(guest::GDTR_BASE),
            gdtr_limit: vmcs::read(guest::GDTR_LIMIT) as u32,
            idtr_base: vmcs::read(guest::IDTR_BASE),
            idtr_limit: vmcs::read(guest::IDTR_LIMIT) as u32,
            activity_state: vmcs::read(guest::ACTIVITY_STATE) as u32,
            interruptibility: vmcs::read(guest::INTERRUPTIBILITY_STATE) as u32,
            vmcs_link_pointer: vmcs::read(guest::LINK_PTR_FULL),
            entry_controls: vmcs::read(control::VMENTRY_CONTROLS) as u32,
            unrestricted_guest: vmcs::read(control::SECONDARY_PROCBASED_EXEC_CONTROLS)
                & u64::from(SecondaryControls::UNRESTRICTED_GUEST.bits())
                != 0,
        };
        let problems = entry_check::check(&snapshot, &vmx.msrs);
        if problems.is_empty() {
            return String::from("invalid guest state, but no field fails CTVM's checks");
        }
        let mut s = String::from("invalid guest state:");
        for p in problems {
            s.push_str(&format!(" {} ({});", p.field, p.why));
        }
        s
    }

    /// Saves this guest's extended state before another guest runs.
    pub fn save_extended_state(&mut self, vmx: &Vmx) {
        if vmx.xcr0_offered != 0 {
            // SAFETY: the area is 64-byte aligned and large enough for every
            // component the processor supports (checked against CPUID.0xD at start-up).
            unsafe {
                asm!("xsave64 [{}]", in(reg) self.xsave.0.as_mut_ptr(), in("eax") u32::MAX, in("edx") u32::MAX, options(nostack))
            };
        }
    }

    /// Restores this guest's extended state and XCR0 before it runs.
    pub fn restore_extended_state(&mut self, vmx: &Vmx, xcr0: u64) {
        if vmx.xcr0_offered != 0 {
            // SAFETY: XCR0 holds a value XSETBV validated (or the x87-only reset
            // value), and the area holds state saved under it or zeroes (init state).
            unsafe {
                asm!("xsetbv", in("ecx") 0, in("eax") xcr0 as u32, in("edx") (xcr0 >> 32) as u32, options(nostack));
                asm!("xrstor64 [{}]", in(reg) self.xsave.0.as_ptr(), in("eax") u32::MAX, in("edx") u32::MAX, options(nostack));
            }
        }
    }

    /// INIT: the processor's INIT state, waiting for a start-up IPI. The
    /// real APIC and the MSRs outside the VMCS keep their values, as INIT
    /// leaves the APIC's registers and most MSRs to the software that
    /// starts the CPU (which Linux re-initialises).
    pub fn reset(&mut self, vmx: &Vmx) {
        self.regs = GuestRegisters::default();
        write_init_state(vmx);
    }

    /// A start-up IPI: leaves wait-for-SIPI for real mode at `vector * 0x1000`.
    /// The blocking the wait recorded (of SMIs, NMIs) ends with it.
    pub fn start_at(&mut self, vector: u8) {
        vmcs::write(guest::CS_SELECTOR, u64::from(vector) << 8);
        vmcs::write(guest::CS_BASE, u64::from(vector) << 12);
        vmcs::write(guest::RIP, 0);
        vmcs::write(guest::INTERRUPTIBILITY_STATE, 0);
        vmcs::write(guest::PENDING_DBG_EXCEPTIONS, 0);
        vmcs::write(guest::ACTIVITY_STATE, ACTIVITY_ACTIVE);
    }

    /// Queues an NMI for the guest if it can take one now (nothing else
    /// being injected, no virtual-NMI or MOV SS blocking); otherwise asks
    /// for an NMI-window exit. Returns whether it was queued.
    pub fn offer_nmi(&mut self) -> bool {
        let busy = vmcs::read(control::VMENTRY_INTERRUPTION_INFO_FIELD) & (1 << 31) != 0;
        let blocked = vmcs::read(guest::INTERRUPTIBILITY_STATE) & (BLOCKING_BY_NMI | BLOCKING_BY_MOV_SS) != 0;
        let ready = !busy && !blocked;
        if ready {
            // Type 2 (NMI), vector 2, valid.
            vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, (1 << 31) | (2 << 8) | 2);
        }
        current::set_primary_control(PrimaryControls::NMI_WINDOW_EXITING, !ready);
        ready
    }

    /// Whether the vCPU waits for a start-up IPI.
    pub fn waits_for_sipi(&self) -> bool {
        vmcs::read(guest::ACTIVITY_STATE) == ACTIVITY_WAIT_FOR_SIPI
    }

    /// For the entry-failure scenario (test image only): clears CR4.VMXE in
    /// the guest state, which VM entry must refuse and CTVM must diagnose.
    #[cfg(feature = "test-hooks")]
    pub fn test_corrupt_guest_cr4(&mut self) {
        self.load();
        let cr4 = vmcs::read(guest::CR4);
        vmcs::write(guest::CR4, cr4 & !CR4_VMXE);
    }

    pub fn cr_masks(&self) -> (u64, u64) {
        self.cr_masks
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // SAFETY: the region is this vCPU's VMCS; clearing it makes it inactive
        // before its frame returns to the pool.
        let _ = unsafe { x86::bits64::vmx::vmclear(self.vmcs.phys) };
    }
}

/// Changes to the current VMCS (the vCPU being handled).
pub mod current {
    use super::*;

    /// Adds bits to the CR0/CR4 guest/host masks: guest writes changing them
    /// exit from now on. The read shadows take the bits' current values first.
    pub fn guard_control_registers(cr0: u64, cr4: u64) {
        for (mask_field, shadow_field, actual_field, bits) in [
            (control::CR0_GUEST_HOST_MASK, control::CR0_READ_SHADOW, guest::CR0, cr0),
            (control::CR4_GUEST_HOST_MASK, control::CR4_READ_SHADOW, guest::CR4, cr4),
        ] {
            let mask = vmcs::read(mask_field);
            let new = bits & !mask;
            let shadow = (vmcs::read(shadow_field) & !new) | (vmcs::read(actual_field) & new);
            vmcs::write(shadow_field, shadow);
            vmcs::write(mask_field, mask | bits);
        }
    }

    /// Sets or clears a primary processor-based control (the monitor trap flag).
    pub fn set_primary_control(bits: PrimaryControls, on: bool) {
        let value = vmcs::read(control::PRIMARY_PROCBASED_EXEC_CONTROLS);
        let value = if on { value | u64::from(bits.bits()) } else { value & !u64::from(bits.bits()) };
        vmcs::write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, value);
    }

    /// Sets a secondary control if the processor allows it.
    pub fn enable_secondary_control(vmx: &Vmx, bits: SecondaryControls) -> bool {
        if vmx.controls.procbased2_with(&vmx.msrs, bits, true).is_none() {
            return false;
        }
        let value = vmcs::read(control::SECONDARY_PROCBASED_EXEC_CONTROLS) | u64::from(bits.bits());
        vmcs::write(control::SECONDARY_PROCBASED_EXEC_CONTROLS, value);
        true
    }

    /// Sets or clears one vector in the exception bitmap.
    pub fn set_exception_bitmap_bit(vector: u8, on: bool) {
        let bitmap = vmcs::read(control::EXCEPTION_BITMAP);
        let bit = 1u64 << (vector & 31);
        vmcs::write(control::EXCEPTION_BITMAP, if on { bitmap | bit } else { bitmap & !bit });
    }

    /// Every interrupt and exception exits (a module's view), or none but
    /// #DB while single-stepping (the kernel's). NMIs always exit.
    pub fn set_event_exiting(on: bool) {
        let events = PinbasedControls::EXTERNAL_INTERRUPT_EXITING.bits();
        let pin = vmcs::read(control::PINBASED_EXEC_CONTROLS);
        vmcs::write(
            control::PINBASED_EXEC_CONTROLS,
            if on { pin | u64::from(events) } else { pin & !u64::from(events) },
        );
        let bitmap = vmcs::read(control::EXCEPTION_BITMAP);
        vmcs::write(control::EXCEPTION_BITMAP, if on { u64::from(u32::MAX) } else { bitmap & (1 << 1) });
    }

    /// Points the vCPU at another EPT hierarchy.
    pub fn set_eptp(eptp: u64) {
        vmcs::write(control::EPTP_FULL, eptp);
    }

    /// Points the vCPU at other I/O and MSR bitmaps (a view's).
    pub fn set_bitmaps(bitmaps: &Bitmaps) {
        vmcs::write(control::IO_BITMAP_A_ADDR_FULL, bitmaps.io_a);
        vmcs::write(control::IO_BITMAP_B_ADDR_FULL, bitmaps.io_b);
        vmcs::write(control::MSR_BITMAPS_ADDR_FULL, bitmaps.msr);
    }
}

const ACTIVITY_ACTIVE: u64 = 0;
const ACTIVITY_WAIT_FOR_SIPI: u64 = 3;
const BLOCKING_BY_MOV_SS: u64 = 1 << 1;
const BLOCKING_BY_SMI: u64 = 1 << 2;
/// Basic exit reason of a start-up IPI.
const EXIT_SIPI: u64 = 4;
const BLOCKING_BY_NMI: u64 = 1 << 3;
/// Access rights of real-mode segments after INIT: present, accessed,
/// read/write data or execute/read code.
const AR_REAL_DATA: u64 = 0x93;
const AR_REAL_CODE: u64 = 0x9b;

/// The guest state of a boot vCPU: 64-bit mode at the loader's entry,
/// with the loader's GDT and page tables.
fn write_entry_state(vmx: &Vmx, entry: &EntryState) {
    let m = &vmx.msrs;
    let guest_cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    let guest_cr4 = CR4_PAE;
    vmcs::write(control::CR0_READ_SHADOW, guest_cr0);
    vmcs::write(control::CR4_READ_SHADOW, guest_cr4);

    let unrestricted = vmx.controls.features.unrestricted_guest;
    vmcs::write(guest::CR0, m.fix_cr0(guest_cr0, unrestricted));
    vmcs::write(guest::CR3, entry.cr3);
    vmcs::write(guest::CR4, m.fix_cr4(guest_cr4));
    vmcs::write(guest::RSP, entry.rsp);
    vmcs::write(guest::RIP, entry.rip);
    let data = u64::from(entry.selectors.data);
    for segment in DATA_SEGMENTS {
        write_segment(segment, data, 0, 0xffff_ffff, AR_DATA);
    }
    write_segment(CS, u64::from(entry.selectors.code), 0, 0xffff_ffff, AR_CODE64);
    write_segment(TR, u64::from(entry.selectors.tss), entry.tss_base, u64::from(boot64::TSS_LIMIT), AR_TSS_BUSY);
    write_segment(LDTR, 0, 0, 0, AR_UNUSABLE);
    vmcs::write(guest::GDTR_BASE, entry.gdt_base);
    vmcs::write(guest::GDTR_LIMIT, u64::from(entry.gdt_limit));
    vmcs::write(guest::IDTR_BASE, 0);
    vmcs::write(guest::IDTR_LIMIT, 0);
    vmcs::write(guest::IA32_EFER_FULL, EFER_LME | EFER_LMA | EFER_NXE);
    write_reset_state();
    vmcs::write(guest::ACTIVITY_STATE, ACTIVITY_ACTIVE);
}

/// A guest segment register's selector, base, limit and access-rights fields.
type SegmentFields = [u32; 4];
const CS: SegmentFields = [guest::CS_SELECTOR, guest::CS_BASE, guest::CS_LIMIT, guest::CS_ACCESS_RIGHTS];
const TR: SegmentFields = [guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS];
const LDTR: SegmentFields = [guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS];
const DATA_SEGMENTS: [SegmentFields; 5] = [
    [guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS],
    [guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS],
    [guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS],
    [guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS],
    [guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS],
];

fn write_segment(fields: SegmentFields, selector: u64, base: u64, limit: u64, access_rights: u64) {
    for (field, value) in fields.into_iter().zip([selector, base, limit, access_rights]) {
        vmcs::write(field, value);
    }
}

/// The state both a boot vCPU and a reset one start with: no debug
/// registers armed, flags reset, SYSENTER clear, no blocking or pending
/// debug exception.
fn write_reset_state() {
    vmcs::write(guest::DR7, 0x400);
    vmcs::write(guest::RFLAGS, 0x2);
    vmcs::write(guest::IA32_DEBUGCTL_FULL, 0);
    vmcs::write(guest::IA32_SYSENTER_CS, 0);
    vmcs::write(guest::IA32_SYSENTER_ESP, 0);
    vmcs::write(guest::IA32_SYSENTER_EIP, 0);
    vmcs::write(guest::INTERRUPTIBILITY_STATE, 0);
    vmcs::write(guest::PENDING_DBG_EXCEPTIONS, 0);
}

/// The guest state after INIT (SDM Vol. 3A, Table 10-1), with the activity
/// state wait-for-SIPI. CR0's read shadow shows INIT's value; the real
/// CR0 keeps what VMX requires (NE). Nothing waits to be injected.
fn write_init_state(vmx: &Vmx) {
    let m = &vmx.msrs;
    let cr0 = CR0_CD | CR0_NW | CR0_ET;
    vmcs::write(control::CR0_READ_SHADOW, cr0);
    vmcs::write(control::CR4_READ_SHADOW, 0);
    vmcs::write(guest::CR0, m.fix_cr0(cr0, true));
    vmcs::write(guest::CR3, 0);
    vmcs::write(guest::CR4, m.fix_cr4(0));
    vmcs::write(guest::RSP, 0);
    vmcs::write(guest::RIP, 0xfff0);
    for segment in DATA_SEGMENTS {
        write_segment(segment, 0, 0, 0xffff, AR_REAL_DATA);
    }
    write_segment(CS, 0xf000, 0xffff_0000, 0xffff, AR_REAL_CODE);
    write_segment(TR, 0, 0, 0xffff, AR_TSS_BUSY);
    write_segment(LDTR, 0, 0, 0xffff, AR_UNUSABLE);
    vmcs::write(guest::GDTR_BASE, 0);
    vmcs::write(guest::GDTR_LIMIT, 0xffff);
    vmcs::write(guest::IDTR_BASE, 0);
    vmcs::write(guest::IDTR_LIMIT, 0xffff);
    vmcs::write(guest::IA32_EFER_FULL, 0);
    write_reset_state();
    let entry = vmcs::read(control::VMENTRY_CONTROLS) & !u64::from(EntryControls::IA32E_MODE_GUEST.bits());
    vmcs::write(control::VMENTRY_CONTROLS, entry);
    vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    vmcs::write(guest::ACTIVITY_STATE, ACTIVITY_WAIT_FOR_SIPI);
    current::set_primary_control(PrimaryControls::NMI_WINDOW_EXITING, false);
}

fn write_host_state() {
    let sel = gdt::selectors();
    vmcs::write(host::CR0, cpu::read_cr0());
    vmcs::write(host::CR3, cpu::read_cr3());
    vmcs::write(host::CR4, cpu::read_cr4());
    vmcs::write(host::CS_SELECTOR, u64::from(sel.code.0));
    for field in [host::SS_SELECTOR, host::DS_SELECTOR, host::ES_SELECTOR] {
        vmcs::write(field, u64::from(sel.data.0));
    }
    vmcs::write(host::FS_SELECTOR, 0);
    vmcs::write(host::GS_SELECTOR, 0);
    vmcs::write(host::TR_SELECTOR, u64::from(sel.tss.0));
    vmcs::write(host::FS_BASE, 0);
    // This CPU's per-CPU data: the VMCS belongs to this CPU for good.
    vmcs::write(host::GS_BASE, percpu::gs_base());
    vmcs::write(host::TR_BASE, gdt::tss_base());
    vmcs::write(host::GDTR_BASE, gdt::gdt_base());
    vmcs::write(host::IDTR_BASE, traps::idt_base());
    vmcs::write(host::IA32_SYSENTER_CS, 0);
    vmcs::write(host::IA32_SYSENTER_ESP, 0);
    vmcs::write(host::IA32_SYSENTER_EIP, 0);
    // SAFETY: EFER and PAT exist on every x86-64 processor.
    unsafe {
        vmcs::write(host::IA32_EFER_FULL, cpu::rdmsr(0xc000_0080));
        vmcs::write(host::IA32_PAT_FULL, cpu::rdmsr(0x277));
    }
    vmcs::write(host::RIP, ctvm_vmx_exit as *const () as u64);
}

fn field_encoding(field: Field) -> u32 {
    match field {
        Field::Rip => guest::RIP,
        Field::Rsp => guest::RSP,
        Field::Rflags => guest::RFLAGS,
        Field::Cr0 => guest::CR0,
        Field::Cr3 => guest::CR3,
        Field::Cr4 => guest::CR4,
        Field::Cr0ReadShadow => control::CR0_READ_SHADOW,
        Field::Cr4ReadShadow => control::CR4_READ_SHADOW,
        Field::Efer => guest::IA32_EFER_FULL,
        Field::Pat => guest::IA32_PAT_FULL,
        Field::PerfGlobalCtrl => guest::IA32_PERF_GLOBAL_CTRL_FULL,
        Field::FsBase => guest::FS_BASE,
        Field::GsBase => guest::GS_BASE,
        Field::SysenterCs => guest::IA32_SYSENTER_CS,
        Field::SysenterEsp => guest::IA32_SYSENTER_ESP,
        Field::SysenterEip => guest::IA32_SYSENTER_EIP,
        Field::CsSelector => guest::CS_SELECTOR,
        Field::GdtrBase => guest::GDTR_BASE,
        Field::GdtrLimit => guest::GDTR_LIMIT,
        Field::IdtrBase => guest::IDTR_BASE,
        Field::IdtrLimit => guest::IDTR_LIMIT,
        Field::LdtrSelector => guest::LDTR_SELECTOR,
        Field::TrSelector => guest::TR_SELECTOR,
        Field::CsAccessRights => guest::CS_ACCESS_RIGHTS,
        Field::SsAccessRights => guest::SS_ACCESS_RIGHTS,
        Field::Interruptibility => guest::INTERRUPTIBILITY_STATE,
        Field::ActivityState => guest::ACTIVITY_STATE,
        Field::PendingDebugExceptions => guest::PENDING_DBG_EXCEPTIONS,
        Field::EntryControls => control::VMENTRY_CONTROLS,
        Field::EntryInterruptionInfo => control::VMENTRY_INTERRUPTION_INFO_FIELD,
        Field::EntryExceptionErrorCode => control::VMENTRY_EXCEPTION_ERR_CODE,
        Field::EntryInstructionLength => control::VMENTRY_INSTRUCTION_LEN,
    }
}

impl VcpuState for Vcpu {
    fn regs(&mut self) -> &mut GuestRegisters {
        &mut self.regs
    }

    fn read(&self, field: Field) -> u64 {
        vmcs::read(field_encoding(field))
    }

    fn write(&mut self, field: Field, value: u64) {
        vmcs::write(field_encoding(field), value);
    }
}
