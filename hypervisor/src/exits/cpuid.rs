//! CPUID: the host's answers, with VMX and SMX hidden, the hypervisor bit
//! set, OS-controlled bits taken from the guest's CR4, and CTVM's leaves.

use guest_agent::{ABI_VERSION, CPUID_LEAF_INTERFACE, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE};

use super::{Action, ExitContext};
use crate::vcpu::{skip_instruction, Field};

const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_SMX: u32 = 1 << 6;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
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
            match leaf {
                1 => {
                    r[2] &= !(LEAF1_ECX_VMX | LEAF1_ECX_SMX | LEAF1_ECX_OSXSAVE);
                    r[2] |= LEAF1_ECX_HYPERVISOR;
                    if guest_cr4 & CR4_OSXSAVE != 0 {
                        r[2] |= LEAF1_ECX_OSXSAVE;
                    }
                }
                7 if subleaf == 0 => {
                    r[2] &= !LEAF7_ECX_OSPKE;
                    if guest_cr4 & CR4_PKE != 0 {
                        r[2] |= LEAF7_ECX_OSPKE;
                    }
                }
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

    #[test]
    fn osxsave_follows_the_guest_cr4() {
        assert_eq!(cpuid(1, 0)[2] & (1 << 27), 0);
        assert_ne!(cpuid(1, 1 << 18)[2] & (1 << 27), 0);
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
