//! Diagnosing a failed VM entry.
//!
//! When the guest state is invalid the processor reports only "invalid guest
//! state" (exit reason 33). To name the field at fault, CTVM re-runs the
//! checks of SDM Vol. 3C 27.3.1 in software on a snapshot of the VMCS guest
//! state and reports every field that fails one.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::caps::{VmxMsrs, CR0_PE, CR0_PG};

/// One segment register as the VMCS holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub access_rights: u32,
}

const AR_UNUSABLE: u32 = 1 << 16;

impl Segment {
    fn usable(&self) -> bool {
        self.access_rights & AR_UNUSABLE == 0
    }
    fn kind(&self) -> u32 {
        self.access_rights & 0xf
    }
    fn s(&self) -> bool {
        self.access_rights & (1 << 4) != 0
    }
    fn dpl(&self) -> u32 {
        (self.access_rights >> 5) & 3
    }
    fn present(&self) -> bool {
        self.access_rights & (1 << 7) != 0
    }
    fn long(&self) -> bool {
        self.access_rights & (1 << 13) != 0
    }
    fn default_big(&self) -> bool {
        self.access_rights & (1 << 14) != 0
    }
    fn granular(&self) -> bool {
        self.access_rights & (1 << 15) != 0
    }
}

/// The guest-state fields the checks read.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestStateSnapshot {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub dr7: u64,
    pub efer: u64,
    pub pat: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub tr: Segment,
    pub ldtr: Segment,
    pub gdtr_base: u64,
    pub gdtr_limit: u32,
    pub idtr_base: u64,
    pub idtr_limit: u32,
    pub activity_state: u32,
    pub interruptibility: u32,
    pub vmcs_link_pointer: u64,
    pub entry_controls: u32,
    pub unrestricted_guest: bool,
}

/// A field that fails a VM-entry check, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub field: &'static str,
    pub why: String,
}

const ENTRY_LOAD_DEBUG: u32 = 1 << 2;
const ENTRY_IA32E: u32 = 1 << 9;
const ENTRY_LOAD_PAT: u32 = 1 << 14;
const ENTRY_LOAD_EFER: u32 = 1 << 15;
const CR4_PAE: u64 = 1 << 5;
const CR4_PCIDE: u64 = 1 << 17;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn canonical(addr: u64) -> bool {
    let top = (addr as i64) >> 47;
    top == 0 || top == -1
}

/// Runs the checks; an empty list means the snapshot passes all of them.
pub fn check(s: &GuestStateSnapshot, m: &VmxMsrs) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut fail = |field: &'static str, why: String| out.push(Problem { field, why });
    let ia32e = s.entry_controls & ENTRY_IA32E != 0;

    let mut cr0_must = m.cr0_fixed0;
    if s.unrestricted_guest {
        cr0_must &= !(CR0_PE | CR0_PG);
    }
    if s.cr0 & cr0_must != cr0_must || s.cr0 & !m.cr0_fixed1 != 0 {
        fail(
            "GUEST_CR0",
            format!("{:#x} violates the fixed bits (must set {cr0_must:#x}, may set {:#x})", s.cr0, m.cr0_fixed1),
        );
    }
    if s.cr0 & CR0_PG != 0 && s.cr0 & CR0_PE == 0 {
        fail("GUEST_CR0", "PG set without PE".into());
    }
    if s.cr4 & m.cr4_fixed0 != m.cr4_fixed0 || s.cr4 & !m.cr4_fixed1 != 0 {
        fail(
            "GUEST_CR4",
            format!("{:#x} violates the fixed bits (must set {:#x}, may set {:#x})", s.cr4, m.cr4_fixed0, m.cr4_fixed1),
        );
    }
    if ia32e && (s.cr0 & CR0_PG == 0 || s.cr4 & CR4_PAE == 0) {
        fail("GUEST_CR0/CR4", "IA-32e mode guest needs CR0.PG and CR4.PAE".into());
    }
    if !ia32e && s.cr4 & CR4_PCIDE != 0 {
        fail("GUEST_CR4", "PCIDE set outside IA-32e mode".into());
    }
    if s.cr3 >> 52 != 0 {
        fail("GUEST_CR3", format!("{:#x} sets bits beyond the physical-address width", s.cr3));
    }
    if s.entry_controls & ENTRY_LOAD_DEBUG != 0 && s.dr7 >> 32 != 0 {
        fail("GUEST_DR7", format!("{:#x} sets bits 63:32", s.dr7));
    }
    if s.entry_controls & ENTRY_LOAD_EFER != 0 {
        if s.efer & !(1 | EFER_LME | EFER_LMA | (1 << 11)) != 0 {
            fail("GUEST_IA32_EFER", format!("{:#x} sets reserved bits", s.efer));
        }
        if (s.efer & EFER_LMA != 0) != ia32e {
            fail("GUEST_IA32_EFER", "LMA differs from the IA-32e mode guest entry control".into());
        }
        if s.cr0 & CR0_PG != 0 && (s.efer & EFER_LMA != 0) != (s.efer & EFER_LME != 0) {
            fail("GUEST_IA32_EFER", "LME differs from LMA while paging is on".into());
        }
    }
    if s.entry_controls & ENTRY_LOAD_PAT != 0
        && !(0..8).all(|i| matches!((s.pat >> (8 * i)) & 0xff, 0 | 1 | 4 | 5 | 6 | 7))
    {
        fail("GUEST_IA32_PAT", format!("{:#x} holds a reserved memory type", s.pat));
    }

    // Segments.
    let cs = s.cs;
    if !cs.usable() || !cs.present() || !cs.s() {
        fail("GUEST_CS_ACCESS_RIGHTS", format!("{:#x}: CS must be a usable, present code segment", cs.access_rights));
    } else {
        let ok_types: &[u32] = if s.unrestricted_guest { &[3, 9, 11, 13, 15] } else { &[9, 11, 13, 15] };
        if !ok_types.contains(&cs.kind()) {
            fail("GUEST_CS_ACCESS_RIGHTS", format!("type {} is not an accessed code segment", cs.kind()));
        }
        if ia32e && cs.long() && cs.default_big() {
            fail("GUEST_CS_ACCESS_RIGHTS", "L and D both set".into());
        }
    }
    if s.ss.usable() {
        if !matches!(s.ss.kind(), 3 | 7) || !s.ss.s() || !s.ss.present() {
            fail("GUEST_SS_ACCESS_RIGHTS", format!("{:#x}: not a writable data segment", s.ss.access_rights));
        }
        if !s.unrestricted_guest && s.ss.dpl() != u32::from(s.ss.selector & 3) {
            fail("GUEST_SS_ACCESS_RIGHTS", "DPL differs from the selector's RPL".into());
        }
    }
    for (name, seg) in [
        ("GUEST_DS_ACCESS_RIGHTS", s.ds),
        ("GUEST_ES_ACCESS_RIGHTS", s.es),
        ("GUEST_FS_ACCESS_RIGHTS", s.fs),
        ("GUEST_GS_ACCESS_RIGHTS", s.gs),
    ] {
        if seg.usable()
            && (seg.kind() & 1 == 0 || !seg.s() || !seg.present() || (seg.kind() & 8 != 0 && seg.kind() & 2 == 0))
        {
            fail(name, format!("{:#x}: must be an accessed, present, readable segment", seg.access_rights));
        }
    }
    if s.tr.access_rights & AR_UNUSABLE != 0 || s.tr.s() || !s.tr.present() || s.tr.selector & 4 != 0 {
        fail(
            "GUEST_TR_ACCESS_RIGHTS",
            format!("{:#x}: TR must be a usable, present system segment in the GDT", s.tr.access_rights),
        );
    } else if (ia32e && s.tr.kind() != 11) || (!ia32e && !matches!(s.tr.kind(), 3 | 11)) {
        fail("GUEST_TR_ACCESS_RIGHTS", format!("type {} is not a busy TSS", s.tr.kind()));
    }
    if s.ldtr.usable() && (s.ldtr.kind() != 2 || s.ldtr.s() || !s.ldtr.present() || s.ldtr.selector & 4 != 0) {
        fail("GUEST_LDTR_ACCESS_RIGHTS", format!("{:#x}: not an LDT in the GDT", s.ldtr.access_rights));
    }
    for (name, seg) in [
        ("GUEST_CS", s.cs),
        ("GUEST_SS", s.ss),
        ("GUEST_DS", s.ds),
        ("GUEST_ES", s.es),
        ("GUEST_FS", s.fs),
        ("GUEST_GS", s.gs),
        ("GUEST_TR", s.tr),
        ("GUEST_LDTR", s.ldtr),
    ] {
        if !seg.usable() && name != "GUEST_TR" {
            continue;
        }
        if seg.access_rights & 0xfffe_0f00 != 0 {
            fail(name, format!("access rights {:#x} set reserved bits", seg.access_rights));
        }
        if (seg.limit & 0xfff != 0xfff && seg.granular()) || (seg.limit >> 20 != 0 && !seg.granular()) {
            fail(name, format!("limit {:#x} does not agree with the granularity bit", seg.limit));
        }
        if matches!(name, "GUEST_FS" | "GUEST_GS" | "GUEST_TR" | "GUEST_LDTR") && !canonical(seg.base) {
            fail(name, format!("base {:#x} is not canonical", seg.base));
        }
    }
    for (name, base, limit) in [("GUEST_GDTR", s.gdtr_base, s.gdtr_limit), ("GUEST_IDTR", s.idtr_base, s.idtr_limit)] {
        if !canonical(base) || limit > 0xffff {
            fail(name, format!("base {base:#x} / limit {limit:#x} out of range"));
        }
    }
    if ia32e && cs.long() {
        if !canonical(s.rip) {
            fail("GUEST_RIP", format!("{:#x} is not canonical", s.rip));
        }
    } else if s.rip >> 32 != 0 {
        fail("GUEST_RIP", format!("{:#x} exceeds 32 bits outside 64-bit mode", s.rip));
    }
    let rflags_reserved = !0u64 << 22 | 1 << 15 | 1 << 5 | 1 << 3;
    if s.rflags & rflags_reserved != 0 || s.rflags & 2 == 0 {
        fail("GUEST_RFLAGS", format!("{:#x}: reserved bits wrong", s.rflags));
    }
    if ia32e && s.rflags & (1 << 17) != 0 {
        fail("GUEST_RFLAGS", "VM set in IA-32e mode".into());
    }
    if s.activity_state > 3 {
        fail("GUEST_ACTIVITY_STATE", format!("{} is not an activity state", s.activity_state));
    }
    if s.interruptibility >> 5 != 0 || s.interruptibility & 3 == 3 {
        fail("GUEST_INTERRUPTIBILITY_INFO", format!("{:#x} is invalid", s.interruptibility));
    }
    // The hypervisor never runs in SMM: SMI blocking cannot be entered with.
    if s.interruptibility & (1 << 2) != 0 {
        fail("GUEST_INTERRUPTIBILITY_INFO", "blocking by SMI outside SMM".into());
    }
    if s.vmcs_link_pointer != u64::MAX {
        fail("VMCS_LINK_POINTER", format!("{:#x} must be all ones without VMCS shadowing", s.vmcs_link_pointer));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msrs() -> VmxMsrs {
        VmxMsrs {
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x0037_67ff,
            ..Default::default()
        }
    }

    /// The state CTVM gives a native 64-bit guest at its first instruction.
    fn good() -> GuestStateSnapshot {
        let data = Segment { selector: 0x10, base: 0, limit: 0xffff_ffff, access_rights: 0xc093 };
        GuestStateSnapshot {
            cr0: 0x8000_0031,
            cr3: 0x1000,
            cr4: 0x2020,
            dr7: 0x400,
            efer: 0x500,
            pat: 0x0007_0406_0007_0406,
            rip: 0x10_0000,
            rflags: 2,
            cs: Segment { selector: 8, base: 0, limit: 0xffff_ffff, access_rights: 0xa09b },
            ss: data,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            tr: Segment { selector: 0x18, base: 0x7100, limit: 0x67, access_rights: 0x8b },
            ldtr: Segment { access_rights: AR_UNUSABLE, ..Default::default() },
            gdtr_base: 0x7000,
            gdtr_limit: 0x27,
            idtr_base: 0,
            idtr_limit: 0,
            activity_state: 0,
            interruptibility: 0,
            vmcs_link_pointer: u64::MAX,
            entry_controls: ENTRY_IA32E | ENTRY_LOAD_EFER | ENTRY_LOAD_PAT | ENTRY_LOAD_DEBUG,
            unrestricted_guest: true,
        }
    }

    #[test]
    fn the_native_start_state_passes() {
        assert_eq!(check(&good(), &msrs()), vec![]);
    }

    /// Each broken field is named.
    #[test]
    fn each_broken_field_is_named() {
        type Breakage = (&'static str, fn(&mut GuestStateSnapshot));
        let cases: Vec<Breakage> = vec![
            ("GUEST_CR0", |s| s.cr0 &= !0x20),
            ("GUEST_CR4", |s| s.cr4 &= !0x2000),
            ("GUEST_CR0/CR4", |s| s.cr4 &= !0x20),
            ("GUEST_IA32_EFER", |s| s.efer &= !0x400),
            ("GUEST_IA32_PAT", |s| s.pat = 2),
            ("GUEST_CS_ACCESS_RIGHTS", |s| s.cs.access_rights = 0xe09b),
            ("GUEST_SS_ACCESS_RIGHTS", |s| s.ss.access_rights = 0xc091),
            ("GUEST_DS_ACCESS_RIGHTS", |s| s.ds.access_rights = 0xc092),
            ("GUEST_TR_ACCESS_RIGHTS", |s| s.tr.access_rights = 0x89),
            ("GUEST_TR", |s| s.tr.base = 0x8000_0000_0000),
            ("GUEST_GDTR", |s| s.gdtr_limit = 0x10000),
            ("GUEST_RIP", |s| s.rip = 0x8000_0000_0000),
            ("GUEST_RFLAGS", |s| s.rflags = 0),
            ("GUEST_INTERRUPTIBILITY_INFO", |s| s.interruptibility = 3),
            ("GUEST_INTERRUPTIBILITY_INFO", |s| s.interruptibility = 4),
            ("VMCS_LINK_POINTER", |s| s.vmcs_link_pointer = 0),
            ("GUEST_CS", |s| s.cs.limit = 0x1000),
        ];
        for (field, breakit) in cases {
            let mut s = good();
            breakit(&mut s);
            let problems = check(&s, &msrs());
            assert!(problems.iter().any(|p| p.field == field), "{field}: got {problems:?}");
        }
    }
}
