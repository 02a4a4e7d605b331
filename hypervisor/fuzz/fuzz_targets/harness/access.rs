//! The `access` target: the guest-access service (`GuestAccess` and
//! `Inspector`) for a principal (CPL 0 or 3, the kernel's view or a
//! module's) through page tables the input writes (entries pointing
//! anywhere, loops, reserved bits, large pages), under paging controls it
//! chooses (CR0.WP, CR4.SMEP and SMAP, EFER.NXE, other paging modes), with
//! per-page EPT rights, over guest RAM with holes (one ending mid-page, one
//! inside a page).
//!
//! Every result is checked against an independent model (`reference`):
//! * a byte read, written or fetched is one the principal may access by the
//!   SDM's rules, its view allows, and is guest RAM, and a read or fetch
//!   returns exactly guest memory's bytes; an access every byte of which is
//!   allowed is not refused (a fetch stops exactly at the first byte it may
//!   not fetch);
//! * a refused access changes no byte of guest memory, and reports the
//!   piece that failed: the #PF the processor would raise (its error code),
//!   #GP for a non-canonical or wrapping range, or an EPT-style refusal;
//! * a successful write changes exactly the bytes written (where the tables
//!   mapped them when the call was made) and the accessed and dirty bits of
//!   the entries walked;
//! * the `Inspector` changes nothing and sees exactly guest RAM through the
//!   tables.

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::guest::access::{AccessError, GuestAccess, Inspector, Kind, Paging, Principal, MAX_INSTRUCTION_LEN};
use hypervisor::guest::memory::GuestMemory;
use hypervisor::integrity::control::GuestControl;
use hypervisor::integrity::View;
use hypervisor::mm::frames::Region;
use hypervisor::mm::paging::Perms;
use hypervisor::testing::FakeControl;

use super::fakes::{Ram, HOST_BASE};
use super::mmio::Entry;
use super::reference::{self, End};

/// Guest RAM: (guest-physical range, offset in the host buffer). The hole
/// between them starts and ends inside pages; the second ends mid-page.
const BACKINGS: [(u64, u64, u64); 2] = [(0, 0x8400, 0x6c00), (0x8c00, 0xf800, 0)];
const HOST_LEN: usize = 0xf000;
/// One backing for all of 0..64 KiB, when the input does not want holes.
const WHOLE: [(u64, u64, u64); 1] = [(0, 0x1_0000, 0)];

#[derive(Arbitrary, Debug)]
enum Addr {
    /// Through the tables the input wrote.
    Tables((u16, u16, u16, u16, u16)),
    Raw(u64),
}

impl Addr {
    fn linear(&self) -> u64 {
        match *self {
            Addr::Tables(i) => reference::linear(i),
            Addr::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum What {
    Read { len: u16 },
    Write { len: u16, fill: u8 },
    Fetch,
    Inspect { len: u16 },
    Translate,
}

#[derive(Arbitrary, Debug)]
struct Op {
    what: What,
    at: Addr,
    user: bool,
    /// In a module's view (its own rights) rather than the kernel's.
    module: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    holes: bool,
    /// (page, index, entry): entries written into guest RAM.
    entries: Vec<(u8, u16, Entry)>,
    cr3: Entry,
    /// CR0.WP, CR4.SMEP, CR4.SMAP, EFER.NXE; or any controls.
    controls: Result<u8, (u64, u64, u64)>,
    /// EPT views: none (guest RAM with every right), or rights per page
    /// for the kernel's view and module 1's (3 bits: R, W, X).
    views: Option<Vec<(bool, u8, u8)>>,
    ops: Vec<Op>,
}

struct World<'a> {
    backings: &'a [(u64, u64, u64)],
    memory: GuestMemory,
    ram: Ram,
}

impl World<'_> {
    /// The host-buffer offset of a guest-physical byte, from the layout
    /// (not from `GuestMemory`, which is under test).
    fn offset(&self, gpa: u64) -> Option<usize> {
        let &(start, _, host) = self.backings.iter().find(|&&(s, e, _)| s <= gpa && gpa < e)?;
        Some((host + gpa - start) as usize)
    }

    fn byte(&self, bytes: &[u8], gpa: u64) -> Option<u8> {
        self.offset(gpa).map(|o| bytes[o])
    }

    fn entry(&self, bytes: &[u8], gpa: u64) -> Option<u64> {
        let o = self.offset(gpa)?;
        self.offset(gpa + 7)?;
        Some(u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()))
    }
}

fn perms(bits: u8) -> Perms {
    let mut p = Perms::empty();
    for (bit, right) in [(1, Perms::READ), (2, Perms::WRITE), (4, Perms::EXECUTE)] {
        if bits & bit != 0 {
            p |= right;
        }
    }
    p
}

fn needs(kind: Kind) -> Perms {
    match kind {
        Kind::Read => Perms::READ,
        Kind::Write => Perms::WRITE,
        Kind::Fetch => Perms::EXECUTE,
    }
}

/// What the model says of one byte: the walk, and the guest-physical byte
/// the principal may access there (paging rights, view rights, guest RAM).
struct Verdict {
    walk: reference::Walk,
    ok: Option<u64>,
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let backings: &[(u64, u64, u64)] = if input.holes { &BACKINGS } else { &WHOLE };
    let host_len = if input.holes { HOST_LEN } else { 0x1_0000 };
    let mut memory = GuestMemory::new();
    for &(start, end, host) in backings {
        memory.add(Region::new(start, end), HOST_BASE + host).expect("disjoint backings");
    }
    let w = World { backings, memory, ram: Ram::new(HOST_BASE, host_len) };
    {
        let mut bytes = w.ram.bytes.borrow_mut();
        for (page, index, entry) in input.entries.iter().take(64) {
            let at = u64::from(page % 16) * 0x1000 + u64::from(index & 0x1ff) * 8;
            if let (Some(o), Some(_)) = (w.offset(at), w.offset(at + 7)) {
                bytes[o..o + 8].copy_from_slice(&entry.value().to_le_bytes());
            }
        }
    }
    let base = Paging::four_level(input.cr3.value() & !0xfff);
    let paging = match input.controls {
        Ok(bits) => Paging {
            cr0: base.cr0 | if bits & 1 != 0 { 1 << 16 } else { 0 },
            cr4: base.cr4 | if bits & 2 != 0 { 1 << 20 } else { 0 } | if bits & 4 != 0 { 1 << 21 } else { 0 },
            efer: if bits & 8 != 0 { base.efer } else { base.efer & !(1 << 11) },
            cr3: base.cr3,
        },
        Err((cr0, cr4, efer)) => Paging { cr0, cr4, efer, cr3: base.cr3 },
    };
    let mut control = FakeControl::default();
    let _ = control.create_view(1);
    if let Some(views) = &input.views {
        for &(module, page, bits) in views.iter().take(32) {
            let view = if module { View::Module(1) } else { View::Kernel };
            let _ = control.set_perms(view, u64::from(page % 17) << 12, perms(bits));
        }
    }
    let views: Option<&dyn GuestControl> = input.views.as_ref().map(|_| &control as &dyn GuestControl);

    for op in input.ops.iter().take(6) {
        let who = Principal {
            cpl: if op.user { 3 } else { 0 },
            view: if op.module { View::Module(1) } else { View::Kernel },
        };
        let before = w.ram.bytes.borrow().clone();
        let read = |gpa: u64| w.entry(&before, gpa);
        let verdict = |linear: u64, kind: Kind| -> Verdict {
            let walk = reference::walk(&read, &paging, linear);
            let ok = match walk.end {
                End::Gpa(gpa) if reference::allowed(&walk, &paging, who.cpl, kind) => {
                    let view_allows =
                        views.is_none_or(|v| v.perms(who.view, gpa & !0xfff).is_some_and(|p| p.contains(needs(kind))));
                    (view_allows && w.offset(gpa).is_some()).then_some(gpa)
                }
                _ => None,
            };
            Verdict { walk, ok }
        };
        let gva = op.at.linear();
        let access = GuestAccess::new(&w.memory, &w.ram, paging, who, views);
        let what = format!("{op:?} at {gva:#x} as {who:?} under {paging:x?}");
        let unchanged = |why: &str| assert!(*w.ram.bytes.borrow() == before, "{what}: {why} changed guest memory");
        match op.what {
            What::Read { len } | What::Write { len, .. } => {
                let len = usize::from(len % 0x2100);
                let kind = if matches!(op.what, What::Read { .. }) { Kind::Read } else { Kind::Write };
                let fill = match op.what {
                    What::Write { fill, .. } => fill,
                    _ => 0,
                };
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                let mut buf = vec![0u8; len];
                let result = if kind == Kind::Read { access.read(gva, &mut buf) } else { access.write(gva, &data) };
                let wraps = gva.checked_add(len as u64).is_none();
                let first_bad =
                    (!wraps).then(|| (0..len).find(|&k| verdict(gva + k as u64, kind).ok.is_none())).flatten();
                match result {
                    Ok(()) => {
                        assert!(!wraps && first_bad.is_none(), "{what}: allowed, but byte {first_bad:?} may not be");
                        if kind == Kind::Read {
                            unchanged("a read");
                            for (k, b) in buf.iter().enumerate() {
                                let gpa = verdict(gva + k as u64, kind).ok.unwrap();
                                assert_eq!(Some(*b), w.byte(&before, gpa), "{what}: byte {k} read wrong");
                            }
                        } else {
                            let expected = written(&w, &before, &paging, gva, &data, &read);
                            let after = w.ram.bytes.borrow();
                            if let Some(o) = (0..after.len()).find(|&o| after[o] != expected[o]) {
                                panic!("{what}: host byte {o:#x} is {:#x}, not {:#x}", after[o], expected[o]);
                            }
                        }
                    }
                    Err(e) => {
                        unchanged("a refused access");
                        let expected = if wraps {
                            AccessError::NotCanonical { address: gva }
                        } else {
                            let k = first_bad
                                .unwrap_or_else(|| panic!("{what}: refused ({e:?}) though every byte is allowed"));
                            // The piece (within one page) holding the first byte refused.
                            let piece = gva.max((gva + k as u64) & !0xfff);
                            refusal(&verdict(piece, kind), &paging, who.cpl, kind, piece, &e)
                        };
                        assert_eq!(e, expected, "{what}");
                    }
                }
            }
            What::Fetch => {
                let mut buf = [0u8; MAX_INSTRUCTION_LEN];
                let at = |k: usize| gva.wrapping_add(k as u64);
                match access.fetch_instruction(gva, &mut buf) {
                    Ok(n) => {
                        assert!((1..=MAX_INSTRUCTION_LEN).contains(&n), "{what}: {n} bytes");
                        for (k, b) in buf.iter().enumerate().take(n) {
                            let gpa = verdict(at(k), Kind::Fetch).ok;
                            let gpa = gpa.unwrap_or_else(|| panic!("{what}: byte {k} fetched but not executable"));
                            assert_eq!(Some(*b), w.byte(&before, gpa), "{what}: byte {k}");
                        }
                        if n < MAX_INSTRUCTION_LEN {
                            assert!(verdict(at(n), Kind::Fetch).ok.is_none(), "{what}: stopped at {n}, before the end");
                        }
                    }
                    Err(e) => {
                        let v = verdict(gva, Kind::Fetch);
                        assert!(v.ok.is_none(), "{what}: the first byte was executable, but {e:?}");
                        assert_eq!(e, refusal(&v, &paging, who.cpl, Kind::Fetch, gva, &e), "{what}");
                    }
                }
                unchanged("a fetch");
            }
            What::Inspect { len } => {
                let len = usize::from(len % 0x2100);
                let inspector = Inspector::new(&w.memory, &w.ram, paging);
                let mut buf = vec![0u8; len];
                let in_ram = |linear: u64| match reference::walk(&read, &paging, linear).end {
                    End::Gpa(gpa) => w.offset(gpa).map(|_| gpa),
                    _ => None,
                };
                let all = gva.checked_add(len as u64).is_some() && (0..len).all(|k| in_ram(gva + k as u64).is_some());
                match inspector.read(gva, &mut buf) {
                    Ok(()) => {
                        assert!(all, "{what}: inspected what is not guest RAM");
                        for (k, b) in buf.iter().enumerate() {
                            assert_eq!(Some(*b), w.byte(&before, in_ram(gva + k as u64).unwrap()), "{what}: byte {k}");
                        }
                    }
                    Err(e) => assert!(!all, "{what}: all guest RAM, but {e:?}"),
                }
                unchanged("the inspector");
            }
            What::Translate => {
                let got = Inspector::new(&w.memory, &w.ram, paging).translate(gva).ok();
                let want = match reference::walk(&read, &paging, gva).end {
                    End::Gpa(gpa) => w.offset(gpa).map(|_| gpa),
                    _ => None,
                };
                assert_eq!(got, want, "{what}");
                unchanged("a translation");
            }
        }
    }
}

/// The refusal the service owes for the piece at `at` (whose first byte
/// `v` describes): the processor's #PF or #GP, or an EPT-style refusal.
fn refusal(v: &Verdict, p: &Paging, cpl: u8, kind: Kind, at: u64, got: &AccessError) -> AccessError {
    if let Some(code) = reference::fault_code(&v.walk, p, cpl, kind) {
        return AccessError::PageFault { address: at, code };
    }
    match v.walk.end {
        End::NotCanonical => AccessError::NotCanonical { address: at },
        End::Unsupported => match got {
            AccessError::Unsupported(mode) => AccessError::Unsupported(mode),
            _ => AccessError::Unsupported("a paging mode the service does not implement"),
        },
        End::TableOutside(gpa) => AccessError::Refused { address: at, gpa, kind },
        End::Gpa(gpa) => AccessError::Refused { address: at, gpa, kind },
        End::NotPresent | End::Reserved => unreachable!("faults have a code"),
    }
}

/// Guest memory after a successful write of `data` at `gva`: the accessed
/// bit set in every entry each byte's walk used and the dirty bit in its
/// leaf, then each byte where the tables mapped it before the call (the
/// data may rewrite the tables themselves; aliases keep the last byte).
fn written(
    w: &World<'_>,
    before: &[u8],
    p: &Paging,
    gva: u64,
    data: &[u8],
    read: &dyn Fn(u64) -> Option<u64>,
) -> Vec<u8> {
    let mut out = before.to_vec();
    let mut targets = Vec::with_capacity(data.len());
    for k in 0..data.len() {
        let walk = reference::walk(read, p, gva + k as u64);
        let levels = walk.entries.len();
        for (i, &at) in walk.entries.iter().enumerate() {
            let bits = 0x20 | if i + 1 == levels { 0x40 } else { 0 };
            let o = w.offset(at).expect("an entry walked is in RAM");
            let e = u64::from_le_bytes(out[o..o + 8].try_into().unwrap()) | bits;
            out[o..o + 8].copy_from_slice(&e.to_le_bytes());
        }
        match walk.end {
            End::Gpa(gpa) => targets.push(w.offset(gpa).expect("a byte written is in RAM")),
            other => panic!("byte {k} written through {other:?}"),
        }
    }
    for (o, b) in targets.into_iter().zip(data) {
        out[o] = *b;
    }
    out
}
