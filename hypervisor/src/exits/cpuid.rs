//! CPUID: the host's answers, with VMX, SMX and MONITOR/MWAIT hidden, the
//! hypervisor bit set, OS-controlled bits taken from the guest's CR4, and
//! CTVM's leaves. A guest idles with HLT, which a pass-through guest runs
//! without an exit: an MWAIT waits for a write to a cache line, which one
//! CPU's guest makes to wake another (Linux's idle loop), and under Bochs
//! a vCPU in MWAIT missed it and slept on to its next timer (a 4-CPU
//! Linux stopped booting). KVM and Xen hide it by default as well.

use guest_agent::{ABI_VERSION, CPUID_LEAF_INTERFACE, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE};

use super::misc::xcr0;
use super::{Action, ExitContext};
use crate::vcpu::{skip_instruction, Field};

const LEAF1_ECX_MONITOR: u32 = 1 << 3;
const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_SMX: u32 = 1 << 6;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF7_EBX_AVX512F: u32 = 1 << 16;
/// AMX-BF16, AMX-TILE, AMX-INT8.
const LEAF7_EDX_AMX: u32 = (1 << 22) | (1 << 24) | (1 << 25);
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF7_ECX_OSPKE: u32 = 1 << 4;
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_PKE: u64 = 1 << 22;

/// The answer the guest sees for one leaf.
pub fn answer(ctx: &ExitContext<'_>, leaf: u32, subleaf: u32) -> [u32; 4] {
    let guest_cr4 = ctx.vcpu.read(Field::Cr4ReadShadow);
    match leaf {
        CPUID_LEAF_SIGNATURE => {
            let sig = |i: usize| {
                u32::from_le_bytes([
                    CPUID_SIGNATURE[i],
                    CPUID_SIGNATURE[i + 1],
                    CPUID_SIGNATURE[i + 2],
                    CPUID_SIGNATURE[i + 3],
                ])
            };
            [CPUID_LEAF_INTERFACE, sig(0), sig(4), sig(8)]
        }
        CPUID_LEAF_INTERFACE => [ABI_VERSION, ctx.guest.capabilities as u32, 0, 0],
        0x4000_0002..=0x4000_00ff => [0; 4],
        _ => {
            let mut r = ctx.host.cpuid(leaf, subleaf);
            // Extended state as far as the hypervisor switches it for guests.
            let offered = ctx.host.xcr0_offered();
            let lacks = |group: u64| offered & group != group;
            match leaf {
                1 => {
                    r[2] &= !(LEAF1_ECX_MONITOR | LEAF1_ECX_VMX | LEAF1_ECX_SMX | LEAF1_ECX_OSXSAVE);
                    r[2] |= LEAF1_ECX_HYPERVISOR;
                    if offered == 0 {
                        r[2] &= !(LEAF1_ECX_XSAVE | LEAF1_ECX_AVX);
                    } else if guest_cr4 & CR4_OSXSAVE != 0 {
                        r[2] |= LEAF1_ECX_OSXSAVE;
                    }
                    if lacks(xcr0::AVX) {
                        r[2] &= !LEAF1_ECX_AVX;
                    }
                }
                7 if subleaf == 0 => {
                    r[2] &= !LEAF7_ECX_OSPKE;
                    if guest_cr4 & CR4_PKE != 0 {
                        r[2] |= LEAF7_ECX_OSPKE;
                    }
                    if lacks(xcr0::AVX512) {
                        r[1] &= !LEAF7_EBX_AVX512F;
                    }
                    if lacks(xcr0::AMX) {
                        r[3] &= !LEAF7_EDX_AMX;
                    }
                }
                // MONITOR/MWAIT's own leaf, with the feature.
                5 => r = [0; 4],
                0xd if subleaf == 0 => {
                    r[0] &= offered as u32;
                    r[3] &= (offered >> 32) as u32;
                }
                0xd if (2..63).contains(&subleaf) && offered & (1 << subleaf) == 0 => r = [0; 4],
                _ => {}
            }
            r
        }
    }
}

pub fn handle(ctx: &mut ExitContext<'_>) -> Action {
    let regs = ctx.vcpu.regs();
    let (leaf, subleaf) = (regs.rax as u32, regs.rcx as u32);
    let [a, b, c, d] = answer(ctx, leaf, subleaf);
    let regs = ctx.vcpu.regs();
    regs.rax = u64::from(a);
    regs.rbx = u64::from(b);
    regs.rcx = u64::from(c);
    regs.rdx = u64::from(d);
    skip_instruction(ctx.vcpu, ctx.exit);
    Action::Resume
}

#[cfg(test)]
mod tests {
    use crate::exits::reason;
    use crate::exits::testing::run;
    use crate::guest::test_guest;
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::{ExitInfo, Field, VcpuState};

    fn cpuid(leaf: u32, cr4: u64) -> [u32; 4] {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        v.regs.rax = u64::from(leaf);
        v.write(Field::Cr4ReadShadow, cr4);
        let exit = ExitInfo { reason: reason::CPUID, instruction_len: 2, ..Default::default() };
        assert_eq!(run(&mut g, &mut v, exit), crate::exits::Action::Resume);
        assert_eq!(v.read(Field::Rip), 0x10_0002);
        [v.regs.rax as u32, v.regs.rbx as u32, v.regs.rcx as u32, v.regs.rdx as u32]
    }

    #[test]
    fn vmx_and_smx_are_hidden_and_the_hypervisor_bit_set() {
        let [_, _, ecx, _] = cpuid(1, 0);
        assert_eq!(ecx & (1 << 5), 0);
        assert_eq!(ecx & (1 << 6), 0);
        assert_ne!(ecx & (1 << 31), 0);
    }

    /// The guest idles with HLT: MONITOR/MWAIT are not announced, their
    /// leaf is empty, and the instructions raise #UD.
    #[test]
    fn monitor_and_mwait_are_hidden_and_refused() {
        assert_eq!(cpuid(1, 0)[2] & (1 << 3), 0, "the host has MONITOR; the guest does not see it");
        assert_eq!(cpuid(5, 0), [0; 4]);
        for r in [reason::MWAIT, reason::MONITOR] {
            let (mut g, mut v) = (test_guest(), FakeVcpu::new());
            let exit = ExitInfo { reason: r, instruction_len: 3, ..Default::default() };
            assert_eq!(run(&mut g, &mut v, exit), crate::exits::Action::Resume);
            assert_eq!(v.read(Field::EntryInterruptionInfo) & 0x8000_07ff, 0x8000_0306, "#UD, a hardware exception");
            assert_eq!(v.read(Field::Rip), 0x10_0000, "not skipped");
        }
    }

    #[test]
    fn osxsave_follows_the_guest_cr4() {
        assert_eq!(cpuid(1, 0)[2] & (1 << 27), 0);
        assert_ne!(cpuid(1, 1 << 18)[2] & (1 << 27), 0);
    }

    #[test]
    fn extended_state_is_announced_only_as_far_as_it_is_switched() {
        // The fake host's XSAVE leaf lists x87, SSE and AVX; it offers x87 and SSE only.
        let host = crate::exits::testing::FakeHost { xcr0_offered: Some(0x3), ..Default::default() };
        let ask = |leaf: u32, subleaf: u32| {
            let mut g = test_guest();
            let mut v = FakeVcpu::new();
            v.write(Field::Cr4ReadShadow, 1 << 18);
            v.regs.rax = u64::from(leaf);
            v.regs.rcx = u64::from(subleaf);
            let exit = ExitInfo { reason: reason::CPUID, instruction_len: 2, ..Default::default() };
            let phys = crate::guest::memory::fake::FakePhys::new(0, 0);
            let mut ctx = crate::exits::ExitContext {
                guest: &mut g,
                vcpu: &mut v,
                exit: &exit,
                host: &host,
                phys: &phys,
                control: None,
            };
            crate::exits::dispatch(&mut ctx);
            [v.regs.rax as u32, v.regs.rbx as u32, v.regs.rcx as u32, v.regs.rdx as u32]
        };
        assert_eq!(ask(0xd, 0)[0], 0x3, "AVX's state is not offered");
        assert_eq!(ask(1, 0)[2] & (1 << 28), 0, "nor is AVX");
    }

    #[test]
    fn hypervisor_leaves_carry_the_signature_and_version() {
        let [max, b, c, d] = cpuid(0x4000_0000, 0);
        assert_eq!(max, 0x4000_0001);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&b.to_le_bytes());
        sig[4..8].copy_from_slice(&c.to_le_bytes());
        sig[8..].copy_from_slice(&d.to_le_bytes());
        assert_eq!(&sig, b"CTVMCTVMCTVM");
        assert_eq!(cpuid(0x4000_0001, 0)[0], guest_agent::ABI_VERSION);
        assert_eq!(cpuid(0x4000_0042, 0), [0; 4]);
    }
}
