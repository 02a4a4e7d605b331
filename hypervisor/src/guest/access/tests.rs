//! The service's checks, each against the attack it stops: a principal may
//! not make the hypervisor read, write or fetch what it could not itself.

use super::testing::*;
use super::*;
use crate::integrity::control::fake::FakeControl;
use crate::integrity::control::GuestControl;

const CODE: u64 = 0x30_0000;
const USER_VA: u64 = 0x0000_7000_0000_0000;
const KERNEL_VA: u64 = 0xffff_ffff_8100_0000;
const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const NX: u64 = 1 << 63;
const USER: Principal = Principal { cpl: 3, view: View::Kernel };
const KERNEL: Principal = Principal::KERNEL;

fn access<'a>(g: &'a TestGuest, who: Principal) -> GuestAccess<'a> {
    GuestAccess::new(&g.memory, &g.phys, g.paging(), who, None)
}

fn with_cr(g: &TestGuest, cr0: u64, cr4: u64) -> Paging {
    let p = g.paging();
    Paging { cr0: p.cr0 | cr0, cr4: p.cr4 | cr4, ..p }
}

/// A kernel page (supervisor, writable, not executable) and a user page.
fn two_pages() -> TestGuest {
    let mut g = TestGuest::new();
    g.map_with(KERNEL_VA, 0x20_0000, 0x1000, P | RW | NX);
    g.map_with(USER_VA, 0x21_0000, 0x1000, P | RW | US | NX);
    g
}

fn byte(g: &TestGuest, gpa: u64) -> u8 {
    let mut b = [0u8; 1];
    g.memory.read(&g.phys, gpa, &mut b).unwrap();
    b[0]
}

#[test]
fn user_space_cannot_make_the_hypervisor_write_kernel_memory() {
    // The user-mode SLDT/SIDT route: a kernel address as the operand.
    let g = two_pages();
    assert_eq!(
        access(&g, USER).write(KERNEL_VA + 8, &[0xaa; 10]),
        Err(AccessError::PageFault { address: KERNEL_VA + 8, code: pf::PROTECTION | pf::WRITE | pf::USER })
    );
    assert_eq!(byte(&g, 0x20_0008), 0, "nothing written");
    // Nor read it.
    assert_eq!(
        access(&g, USER).read_vec(KERNEL_VA, 8),
        Err(AccessError::PageFault { address: KERNEL_VA, code: pf::PROTECTION | pf::USER })
    );
    // Its own page is fine.
    access(&g, USER).write(USER_VA + 8, &[0xaa; 10]).unwrap();
    assert_eq!(byte(&g, 0x21_0008), 0xaa);
}

#[test]
fn read_only_pages_follow_cr0_wp() {
    let mut g = TestGuest::new();
    g.map_with(KERNEL_VA, 0x20_0000, 0x1000, P);
    let wp = with_cr(&g, walk::CR0_WP, 0);
    let kernel = GuestAccess::new(&g.memory, &g.phys, wp, KERNEL, None);
    assert_eq!(
        kernel.write(KERNEL_VA, b"x"),
        Err(AccessError::PageFault { address: KERNEL_VA, code: pf::PROTECTION | pf::WRITE })
    );
    // Without CR0.WP the kernel may write read-only pages, as on the processor.
    access(&g, KERNEL).write(KERNEL_VA, b"x").unwrap();
    // User space never may.
    g.map_with(USER_VA, 0x21_0000, 0x1000, P | US);
    assert!(matches!(access(&g, USER).write(USER_VA, b"x"), Err(AccessError::PageFault { .. })));
    assert_eq!(byte(&g, 0x21_0000), 0);
}

#[test]
fn smap_and_smep_hold_for_the_kernel() {
    let mut g = two_pages();
    g.map_with(USER_VA + 0x1000, CODE, 0x1000, P | US);
    let smap = with_cr(&g, 0, walk::CR4_SMAP);
    let kernel = GuestAccess::new(&g.memory, &g.phys, smap, KERNEL, None);
    assert_eq!(kernel.read_vec(USER_VA, 4), Err(AccessError::PageFault { address: USER_VA, code: pf::PROTECTION }));
    assert_eq!(
        kernel.write(USER_VA, b"x"),
        Err(AccessError::PageFault { address: USER_VA, code: pf::PROTECTION | pf::WRITE })
    );
    assert!(access(&g, KERNEL).read_vec(USER_VA, 4).is_ok(), "without SMAP the kernel reads user pages");
    let smep = with_cr(&g, 0, walk::CR4_SMEP);
    let kernel = GuestAccess::new(&g.memory, &g.phys, smep, KERNEL, None);
    let mut buf = [0; MAX_INSTRUCTION_LEN];
    assert_eq!(
        kernel.fetch_instruction(USER_VA + 0x1000, &mut buf),
        Err(AccessError::PageFault { address: USER_VA + 0x1000, code: pf::PROTECTION | pf::FETCH })
    );
    assert!(access(&g, KERNEL).fetch_instruction(USER_VA + 0x1000, &mut buf).is_ok());
}

#[test]
fn no_fetch_from_execute_disabled_pages() {
    let g = two_pages();
    let mut buf = [0; MAX_INSTRUCTION_LEN];
    assert_eq!(
        access(&g, KERNEL).fetch_instruction(KERNEL_VA, &mut buf),
        Err(AccessError::PageFault { address: KERNEL_VA, code: pf::PROTECTION | pf::FETCH })
    );
    // Not present: P clear in the error code.
    assert_eq!(
        access(&g, USER).fetch_instruction(USER_VA + 0x5000, &mut buf),
        Err(AccessError::PageFault { address: USER_VA + 0x5000, code: pf::USER | pf::FETCH })
    );
}

#[test]
fn the_views_rights_are_checked_too() {
    // The kernel's tables allow the write; the kernel view maps the page
    // read-only (the syscall table after the lock): refused, untouched.
    let g = two_pages();
    let mut views = FakeControl::default();
    views.set_perms(View::Kernel, 0x20_0000, Perms::READ).unwrap();
    let kernel = GuestAccess::new(&g.memory, &g.phys, g.paging(), KERNEL, Some(&views));
    assert_eq!(
        kernel.write(KERNEL_VA, b"x"),
        Err(AccessError::Refused { address: KERNEL_VA, gpa: 0x20_0000, kind: Kind::Write })
    );
    assert_eq!(byte(&g, 0x20_0000), 0);
    assert!(kernel.read_vec(KERNEL_VA, 1).is_ok());
    // A module's view that does not map the page at all.
    let module = Principal { cpl: 0, view: View::Module(1) };
    views.create_view(1).unwrap();
    let m = GuestAccess::new(&g.memory, &g.phys, g.paging(), module, Some(&views));
    assert!(matches!(m.read_vec(KERNEL_VA, 1), Err(AccessError::Refused { kind: Kind::Read, .. })));
}

#[test]
fn never_outside_guest_ram() {
    let mut g = TestGuest::new();
    g.map(KERNEL_VA, 0x8000_0000, 0x1000); // beyond RAM: MMIO, or the hypervisor
    assert_eq!(
        access(&g, KERNEL).write(KERNEL_VA, b"x"),
        Err(AccessError::Refused { address: KERNEL_VA, gpa: 0x8000_0000, kind: Kind::Write })
    );
    assert!(matches!(access(&g, KERNEL).read_vec(KERNEL_VA, 1), Err(AccessError::Refused { .. })));
}

#[test]
fn a_refused_page_refuses_the_whole_access() {
    // The first page is writable, the second is not: neither is written.
    let mut g = TestGuest::new();
    g.map_with(KERNEL_VA, 0x20_0000, 0x1000, P | RW);
    g.map_with(KERNEL_VA + 0x1000, 0x20_1000, 0x1000, P);
    let wp = with_cr(&g, walk::CR0_WP, 0);
    let kernel = GuestAccess::new(&g.memory, &g.phys, wp, KERNEL, None);
    assert!(kernel.write(KERNEL_VA + 0xffc, &[7u8; 8]).is_err());
    assert_eq!(byte(&g, 0x20_0ffc), 0);
    // Nor are accessed bits set by a refused access.
    let leaf = g.read_u64(g.entry_address(KERNEL_VA, 1));
    assert_eq!(leaf & walk::ACCESSED, 0);
}

#[test]
fn writes_set_accessed_and_dirty_bits_as_the_processor_would() {
    let g = two_pages();
    let (l4, l1) = (g.entry_address(USER_VA, 4), g.entry_address(USER_VA, 1));
    access(&g, USER).read_vec(USER_VA, 4).unwrap();
    assert_eq!(g.read_u64(l1) & (walk::ACCESSED | walk::DIRTY), 0, "a read leaves the tables alone");
    access(&g, USER).write(USER_VA, b"x").unwrap();
    assert_ne!(g.read_u64(l4) & walk::ACCESSED, 0);
    assert_eq!(g.read_u64(l1) & (walk::ACCESSED | walk::DIRTY), walk::ACCESSED | walk::DIRTY);
    // The hypervisor's own look changes nothing.
    let k1 = g.entry_address(KERNEL_VA, 1);
    Inspector::new(&g.memory, &g.phys, g.paging()).read_u64(KERNEL_VA).unwrap();
    assert_eq!(g.read_u64(k1) & walk::ACCESSED, 0);
}

/// Host memory whose compare-and-exchange fails a given number of times: a
/// guest CPU rewriting the entry while the hypervisor walks it.
struct Racing<'a> {
    inner: &'a dyn HostPhys,
    failures: core::cell::Cell<usize>,
}

impl HostPhys for Racing<'_> {
    fn read(&self, hpa: u64, buf: &mut [u8]) {
        self.inner.read(hpa, buf)
    }
    fn write(&self, hpa: u64, data: &[u8]) {
        self.inner.write(hpa, data)
    }
    fn compare_exchange_u64(&self, hpa: u64, current: u64, new: u64) -> bool {
        if self.failures.get() > 0 {
            self.failures.set(self.failures.get() - 1);
            return false;
        }
        self.inner.compare_exchange_u64(hpa, current, new)
    }
}

#[test]
fn an_entry_changed_under_the_walk_is_walked_again_never_overwritten() {
    let g = two_pages();
    let racing = Racing { inner: &g.phys, failures: core::cell::Cell::new(1) };
    let a = GuestAccess::new(&g.memory, &racing, g.paging(), USER, None);
    a.write(USER_VA, b"y").unwrap();
    assert_eq!(byte(&g, 0x21_0000), b'y');
    // A guest that keeps changing it: refused, nothing written.
    let g = two_pages();
    let racing = Racing { inner: &g.phys, failures: core::cell::Cell::new(usize::MAX) };
    let a = GuestAccess::new(&g.memory, &racing, g.paging(), USER, None);
    assert!(matches!(a.write(USER_VA, b"z"), Err(AccessError::Refused { .. })));
    assert_eq!(byte(&g, 0x21_0000), 0);
}

#[test]
fn errors_are_delivered_as_the_processor_would() {
    use crate::vcpu::fake::FakeVcpu;
    let mut v = FakeVcpu::new();
    assert!(AccessError::PageFault { address: 0x1234, code: 7 }.deliver(&mut v));
    assert_eq!((v.injected(), v.regs.cr2), (Some((14, Some(7))), 0x1234));
    let mut v = FakeVcpu::new();
    assert!(AccessError::NotCanonical { address: 1 << 50 }.deliver(&mut v));
    assert_eq!(v.injected(), Some((13, Some(0))));
    let mut v = FakeVcpu::new();
    assert!(!AccessError::Refused { address: 0, gpa: 0, kind: Kind::Read }.deliver(&mut v));
    assert_eq!(v.injected(), None);
}

#[test]
fn fetch_crosses_a_page_boundary_through_separate_translations() {
    let mut g = TestGuest::new();
    // Two linear pages that are far apart physically, in reverse order.
    let va = 0xffff_ffff_8000_0000u64;
    g.map(va, CODE + 0x5000, 0x1000);
    g.map(va + 0x1000, CODE, 0x1000);
    let code: [u8; 15] = core::array::from_fn(|i| 0xa0 + i as u8);
    g.write(CODE + 0x5000 + 0xff9, &code[..7]);
    g.write(CODE, &code[7..]);
    let mut buf = [0; 15];
    let n = access(&g, KERNEL).fetch_instruction(va + 0xff9, &mut buf).unwrap();
    assert_eq!(n, 15);
    assert_eq!(buf, code);
}

#[test]
fn fetch_stops_at_the_end_of_mapped_memory() {
    let mut g = TestGuest::new();
    let va = 0x7000_0000u64;
    g.map(va, CODE, 0x1000);
    g.write(CODE + 0xffc, &[1, 2, 3, 4]);
    let mut buf = [0; 15];
    // The next page is not mapped: 4 bytes.
    assert_eq!(access(&g, KERNEL).fetch_instruction(va + 0xffc, &mut buf), Ok(4));
    assert_eq!(&buf[..4], &[1, 2, 3, 4]);
    // The next page maps outside guest RAM: still 4 bytes.
    g.map(va + 0x1000, 0x8000_0000, 0x1000);
    assert_eq!(access(&g, KERNEL).fetch_instruction(va + 0xffc, &mut buf), Ok(4));
    // The first byte unmapped or outside RAM: an error.
    assert_eq!(
        access(&g, KERNEL).fetch_instruction(va + 0x1000, &mut buf),
        Err(AccessError::Refused { address: va + 0x1000, gpa: 0x8000_0000, kind: Kind::Fetch })
    );
    assert_eq!(
        access(&g, KERNEL).fetch_instruction(va + 0x2000, &mut buf),
        Err(AccessError::PageFault { address: va + 0x2000, code: pf::FETCH })
    );
    // RAM that ends inside the fetch window (unpaged: linear = physical).
    let unpaged = Paging { cr0: 1, ..Paging::default() };
    g.write(RAM - 3, &[7, 8, 9]);
    let a = GuestAccess::new(&g.memory, &g.phys, unpaged, KERNEL, None);
    assert_eq!(a.fetch_instruction(RAM - 3, &mut buf), Ok(3));
    assert_eq!(&buf[..3], &[7, 8, 9]);
}
