//! An independent model of 4-level paging and its access rights (SDM Vol.
//! 3A, 4.5 and 4.6), over a function that reads guest-physical memory: the
//! oracle the `access` and `hypercall` targets hold the guest-access
//! service to. Written from the SDM, not from the walker under test.

use hypervisor::guest::access::{Kind, Paging};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
const XD: u64 = 1 << 63;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// Where a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The byte's guest-physical address.
    Gpa(u64),
    /// Bits 63:47 are not a sign extension of bit 47.
    NotCanonical,
    /// An entry with P = 0: a page fault without the protection bit.
    NotPresent,
    /// A reserved bit: a page fault with P and RSVD.
    Reserved,
    /// A paging structure outside guest RAM (the EPT violation of the walk).
    TableOutside(u64),
    /// 32-bit, PAE or 5-level paging, which the service does not implement.
    Unsupported,
}

/// One walk: where it ended, the rights of the translation (U/S, R/W and
/// executability, each the conjunction over the levels), and the
/// guest-physical addresses of the entries used, PML4E first.
#[derive(Clone, Debug)]
pub struct Walk {
    pub end: End,
    pub user: bool,
    pub writable: bool,
    pub executable: bool,
    pub entries: Vec<u64>,
}

/// Walks `linear` under `p`; `read` gives the 8 bytes at a guest-physical
/// address, or `None` outside guest RAM.
pub fn walk(read: &dyn Fn(u64) -> Option<u64>, p: &Paging, linear: u64) -> Walk {
    let mut w = Walk { end: End::Unsupported, user: true, writable: true, executable: true, entries: Vec::new() };
    if p.cr0 & (1 << 31) == 0 {
        // No paging: linear addresses are 32-bit physical ones.
        w.end = End::Gpa(linear & 0xffff_ffff);
        return w;
    }
    // IA-32e paging needs CR4.PAE and EFER.LMA; CR4.LA57 makes it 5-level.
    if p.cr4 & (1 << 5) == 0 || p.efer & (1 << 10) == 0 || p.cr4 & (1 << 12) != 0 {
        return w;
    }
    let top = (linear as i64) >> 47;
    if top != 0 && top != -1 {
        w.end = End::NotCanonical;
        return w;
    }
    let nxe = p.efer & (1 << 11) != 0;
    let mut table = p.cr3 & ADDRESS;
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let at = table + ((linear >> shift) & 0x1ff) * 8;
        let Some(e) = read(at) else {
            w.end = End::TableOutside(at);
            return w;
        };
        if e & PRESENT == 0 {
            w.end = End::NotPresent;
            return w;
        }
        // XD is a reserved bit unless EFER.NXE.
        if !nxe && e & XD != 0 {
            w.end = End::Reserved;
            return w;
        }
        w.entries.push(at);
        w.user &= e & USER != 0;
        w.writable &= e & WRITABLE != 0;
        w.executable &= !nxe || e & XD == 0;
        if e & LARGE != 0 && level > 1 {
            // PS in a PML4E is reserved; a 1 GiB or 2 MiB page's base is
            // aligned, bits 13 up to it (above the PAT bit) reserved.
            let page = (1u64 << shift) - 1;
            if level == 4 || e & page & !0x1fff != 0 {
                w.end = End::Reserved;
                return w;
            }
            w.end = End::Gpa((e & ADDRESS & !page) | (linear & page));
            return w;
        }
        table = e & ADDRESS;
    }
    w.end = End::Gpa(table | (linear & 0xfff));
    w
}

/// Whether the SDM lets a principal at `cpl` make this access through the
/// walk's rights (4.6: CR0.WP, CR4.SMEP and CR4.SMAP, XD). The hypervisor's
/// accesses for the kernel count as implicit supervisor accesses: SMAP
/// refuses them user pages whatever RFLAGS.AC says.
pub fn allowed(w: &Walk, p: &Paging, cpl: u8, kind: Kind) -> bool {
    let user = cpl == 3;
    let (wp, smep, smap) = (p.cr0 & (1 << 16) != 0, p.cr4 & (1 << 20) != 0, p.cr4 & (1 << 21) != 0);
    match kind {
        Kind::Read if user => w.user,
        Kind::Read => !(w.user && smap),
        Kind::Write if user => w.user && w.writable,
        Kind::Write => !(w.user && smap) && (w.writable || !wp),
        Kind::Fetch if user => w.user && w.executable,
        Kind::Fetch => w.executable && !(w.user && smep),
    }
}

/// The page-fault error code the processor would give for this walk and
/// access, or `None` when it would not fault (SDM 4.7).
pub fn fault_code(w: &Walk, p: &Paging, cpl: u8, kind: Kind) -> Option<u32> {
    let protection = match w.end {
        End::NotPresent => 0,
        End::Reserved => 1 | 1 << 3,
        End::Gpa(_) if !allowed(w, p, cpl, kind) => 1,
        _ => return None,
    };
    let mut code = protection;
    if kind == Kind::Write {
        code |= 1 << 1;
    }
    if cpl == 3 {
        code |= 1 << 2;
    }
    let nxe = p.efer & (1 << 11) != 0;
    if kind == Kind::Fetch && (nxe || p.cr4 & (1 << 20) != 0) {
        code |= 1 << 4;
    }
    Some(code)
}

/// A linear address from four table indices and an offset, sign-extended
/// from bit 47: how the targets aim at the tables their inputs wrote.
pub fn linear(indices: (u16, u16, u16, u16, u16)) -> u64 {
    let (a, b, c, d, off) = indices;
    let l = (u64::from(a & 0x1ff) << 39)
        | (u64::from(b & 0x1ff) << 30)
        | (u64::from(c & 0x1ff) << 21)
        | (u64::from(d & 0x1ff) << 12)
        | u64::from(off & 0xfff);
    ((l << 16) as i64 >> 16) as u64
}
