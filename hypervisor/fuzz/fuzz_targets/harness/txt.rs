//! The `txt` target: what a measured launch leaves in memory for CTVM,
//! written by firmware, tboot and SINIT. The first byte picks:
//! * the TXT heap (`platform::txt::parse`): four regions with their size
//!   fields, OS-to-SINIT data (version, PMRs), SINIT-to-MLE data (version,
//!   memory descriptor records, the DMAR copy), as the input describes them,
//!   sizes, counts and offsets honest or lying; or raw bytes;
//! * tboot's shared page (`tboot::parse_shared`) at an address inside its
//!   memory or not;
//! * tboot's memory log (`tboot::parse_log`);
//! * the `tboot=` option of CTVM's command line (`tboot::shared_page_address`);
//! * the multiboot 1 information tboot passes on (`boot_info::Mb1`): the
//!   command line, modules and memory map, described by the input (each
//!   field present or not) or raw bytes, at an address inside or outside
//!   the memory given.
//!
//! Properties:
//! * an honest heap parses to exactly what it holds (PMRs, records, the
//!   DMAR copy) when its versions are ones CTVM reads, and is refused
//!   otherwise; a heap whose fields lie is refused or holds only what the
//!   heap holds: at most 64 records, no region that wraps, a DMAR copy taken
//!   from the heap's own bytes, which then goes to the DMAR parser as at boot;
//! * the shared page, the log and the command line are read exactly as
//!   tboot writes them (an independent model of each), and what is accepted
//!   holds: tboot's memory below 4 GiB holding its shutdown entry and the
//!   page itself; a log's used size within its maximum; an address that is
//!   a nonzero page below 4 GiB;
//! * multiboot 1 information reads exactly as described, and whatever the
//!   bytes: strings, tables and entries only from the memory given, at
//!   most 256 modules and memory-map entries, no region that wraps.

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::boot_info;
use hypervisor::mm::frames::Region;
use hypervisor::platform::tboot;
use hypervisor::platform::txt::{self, Heap, Mdr, MdrKind};

use super::dmar as dmar_harness;

pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    let mut u = Unstructured::new(rest);
    match which % 6 {
        0 => heap_raw(rest),
        1 => {
            if let Ok(h) = HeapInput::arbitrary_take_rest(u) {
                heap(&h)
            }
        }
        2 => {
            if let Ok(s) = SharedInput::arbitrary_take_rest(u) {
                shared(&s)
            }
        }
        3 => {
            if let Ok(l) = LogInput::arbitrary(&mut u) {
                log(&l, u.take_rest())
            }
        }
        4 => {
            if let Ok(c) = CmdlineInput::arbitrary_take_rest(u) {
                cmdline(&c)
            }
        }
        _ => {
            if let Ok(m) = Mb1Input::arbitrary_take_rest(u) {
                multiboot1(&m)
            }
        }
    }
}

/// What every accepted heap holds, and the DMAR copy through its parser.
fn heap_invariants(bytes: &[u8], parsed: &Result<Heap, txt::TxtError>) {
    let Ok(h) = parsed else { return };
    assert!((4..=7).contains(&h.os_sinit_version) && (5..=9).contains(&h.sinit_mle_version), "{h:?}");
    assert!(h.mdrs.len() <= 64, "{} records", h.mdrs.len());
    for r in h.mdrs.iter().map(|m| m.region).chain([h.pmr_low, h.pmr_high]) {
        assert!(r.start <= r.end, "a region that wraps: {r:x?}");
    }
    if let Some(d) = &h.dmar {
        assert!(!d.is_empty() && bytes.windows(d.len()).any(|w| w == d.as_slice()), "a DMAR copy not from the heap");
        dmar_harness::check(&hypervisor::platform::dmar::parse(d));
    }
}

fn heap_raw(bytes: &[u8]) {
    heap_invariants(bytes, &txt::parse(bytes));
}

/// A field that tells the truth, or lies.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Field<T> {
    Honest,
    Lie(T),
}

#[derive(Arbitrary, Debug)]
struct HeapInput {
    bios: Vec<u8>,
    os_mle: Vec<u8>,
    os_sinit_version: u8,
    pmr_low: (u64, u64),
    pmr_high: (u64, u64),
    /// Bytes of OS-to-SINIT data past the PMRs.
    os_sinit_extra: u8,
    sinit_version: u8,
    mdrs: Vec<(u64, u64, u8)>,
    mdr_count: Field<u32>,
    mdr_offset: Field<u32>,
    dmar: Vec<u8>,
    dmar_size: Field<u32>,
    dmar_offset: Field<u32>,
    /// A region's size field: (region, value).
    size: Option<(u8, u64)>,
    /// Bytes after the fourth region.
    tail: Vec<u8>,
}

fn with_size(data: &[u8]) -> Vec<u8> {
    let mut r = ((data.len() + 8) as u64).to_le_bytes().to_vec();
    r.extend_from_slice(data);
    r
}

fn put(b: &mut Vec<u8>, at: usize, v: &[u8]) {
    if b.len() < at + v.len() {
        b.resize(at + v.len(), 0);
    }
    b[at..at + v.len()].copy_from_slice(v);
}

fn heap(h: &HeapInput) {
    let os_sinit_version = u32::from(h.os_sinit_version % 10);
    let sinit_version = u32::from(h.sinit_version % 12);
    let mut os_sinit = vec![0u8; 64 + usize::from(h.os_sinit_extra % 64)];
    put(&mut os_sinit, 0, &os_sinit_version.to_le_bytes());
    put(&mut os_sinit, 32, &h.pmr_low.0.to_le_bytes());
    put(&mut os_sinit, 40, &h.pmr_low.1.to_le_bytes());
    put(&mut os_sinit, 48, &h.pmr_high.0.to_le_bytes());
    put(&mut os_sinit, 56, &h.pmr_high.1.to_le_bytes());
    // SINIT-to-MLE data: the fields, then the records, then the DMAR copy
    // (offsets count from the region's start, its size field included).
    let mdrs = &h.mdrs[..h.mdrs.len().min(80)];
    let dmar = &h.dmar[..h.dmar.len().min(512)];
    let mut sinit = vec![0u8; 144];
    put(&mut sinit, 0, &sinit_version.to_le_bytes());
    let mdr_offset = 8 + sinit.len();
    for (i, &(base, len, kind)) in mdrs.iter().enumerate() {
        let at = mdr_offset - 8 + 24 * i;
        put(&mut sinit, at, &base.to_le_bytes());
        put(&mut sinit, at + 8, &len.to_le_bytes());
        put(&mut sinit, at + 16, &[kind]);
        put(&mut sinit, at + 17, &[0; 7]);
    }
    let dmar_offset = 8 + sinit.len();
    sinit.extend_from_slice(dmar);
    let field = |f: Field<u32>, honest: usize| match f {
        Field::Honest => honest as u32,
        Field::Lie(v) => v,
    };
    let honest = |f: Field<u32>| matches!(f, Field::Honest);
    put(&mut sinit, 128, &field(h.mdr_count, mdrs.len()).to_le_bytes());
    put(&mut sinit, 132, &field(h.mdr_offset, mdr_offset).to_le_bytes());
    put(&mut sinit, 136, &field(h.dmar_size, dmar.len()).to_le_bytes());
    put(&mut sinit, 140, &field(h.dmar_offset, dmar_offset).to_le_bytes());
    let mut regions = [
        with_size(&h.bios[..h.bios.len().min(256)]),
        with_size(&h.os_mle[..h.os_mle.len().min(256)]),
        with_size(&os_sinit),
        with_size(&sinit),
    ];
    let mut sizes_honest = true;
    if let Some((r, v)) = h.size {
        let r = usize::from(r % 4);
        if v != regions[r].len() as u64 {
            sizes_honest = false;
            regions[r][..8].copy_from_slice(&v.to_le_bytes());
        }
    }
    let mut bytes: Vec<u8> = regions.concat();
    bytes.extend_from_slice(&h.tail[..h.tail.len().min(256)]);
    let got = txt::parse(&bytes);
    heap_invariants(&bytes, &got);
    let all_honest = sizes_honest && [h.mdr_count, h.mdr_offset, h.dmar_size, h.dmar_offset].into_iter().all(honest);
    if !all_honest {
        return;
    }
    let expected = if !(4..=7).contains(&os_sinit_version) {
        Err(txt::TxtError::OsSinitVersion(os_sinit_version))
    } else if !(5..=9).contains(&sinit_version) {
        Err(txt::TxtError::SinitMleVersion(sinit_version))
    } else if mdrs.len() > 64 {
        Err(txt::TxtError::Table)
    } else {
        let region = |(base, size): (u64, u64)| Region::new(base, base.saturating_add(size));
        Ok(Heap {
            os_sinit_version,
            pmr_low: region(h.pmr_low),
            pmr_high: region(h.pmr_high),
            sinit_mle_version: sinit_version,
            mdrs: mdrs
                .iter()
                .map(|&(base, len, kind)| Mdr {
                    region: region((base, len)),
                    kind: match kind {
                        0 => MdrKind::Good,
                        1 => MdrKind::SmmOverlay,
                        2 => MdrKind::SmmNonOverlay,
                        3 => MdrKind::PcieConfig,
                        4 => MdrKind::Protected,
                        k => MdrKind::Other(k),
                    },
                })
                .collect(),
            dmar: (!dmar.is_empty()).then(|| dmar.to_vec()),
        })
    };
    assert_eq!(got, expected, "an honest heap {h:?}");
}

#[derive(Arbitrary, Debug)]
struct SharedInput {
    uuid: bool,
    version: u32,
    log: u32,
    entry: u32,
    base: u32,
    size: u32,
    waiting: u32,
    /// The page's own address: an offset into tboot's memory, or anything.
    address: Field<u64>,
    address_offset: u32,
    noise: Vec<(u16, u8)>,
}

fn shared(s: &SharedInput) {
    let mut page = [0u8; 4096];
    for &(at, v) in s.noise.iter().take(64) {
        page[usize::from(at) % 4096] = v;
    }
    if s.uuid {
        page[..16].copy_from_slice(&tboot::SHARED_UUID);
    }
    for (at, v) in [(16, s.version), (20, s.log), (24, s.entry), (104, s.base), (108, s.size), (564, s.waiting)] {
        page[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    let address = match s.address {
        Field::Honest => (u64::from(s.base) + u64::from(s.address_offset) % u64::from(s.size).max(1)) & !0xfff,
        Field::Lie(a) => a,
    };
    let got = tboot::parse_shared(address, &page);
    let uuid = page[..16] == tboot::SHARED_UUID;
    let (base, end) = (u64::from(s.base), u64::from(s.base) + u64::from(s.size));
    let version = u32::from_le_bytes(page[16..20].try_into().unwrap());
    let expected = if !uuid {
        Err(tboot::TbootError::Uuid)
    } else if version < 5 {
        Err(tboot::TbootError::Version(version))
    } else if s.size == 0
        || end > 4 << 30
        || !(base..end).contains(&u64::from(s.entry))
        || !(base..end).contains(&address)
    {
        Err(tboot::TbootError::Layout)
    } else {
        Ok(tboot::Shared {
            address,
            version,
            log: u64::from(s.log),
            shutdown_entry: u64::from(s.entry),
            tboot: Region::new(base, end),
            waiting_cpus: s.waiting,
        })
    };
    assert_eq!(got, expected, "{s:?}");
}

#[derive(Arbitrary, Debug)]
struct LogInput {
    uuid: bool,
    max: u16,
    position: u16,
    /// Bytes of the area (at least the 61 of its header when long enough).
    length: u16,
}

fn log(l: &LogInput, text: &[u8]) {
    let len = usize::from(l.length) % 0x8000;
    let mut area = vec![0u8; len];
    if len >= 20 {
        if l.uuid {
            area[..16].copy_from_slice(&tboot::LOG_UUID);
        }
        area[16..18].copy_from_slice(&l.max.to_le_bytes());
        area[18..20].copy_from_slice(&l.position.to_le_bytes());
    }
    if len > 61 {
        let n = text.len().min(len - 61);
        area[61..61 + n].copy_from_slice(&text[..n]);
    }
    let got = tboot::parse_log(&area);
    let expected_used = (l.uuid && len >= 61).then(|| usize::from(l.position.min(l.max)));
    assert_eq!(got.as_ref().map(|g| g.used), expected_used, "{l:?}");
    if let Some(g) = got {
        if let Some(v) = &g.version {
            let shown = &area[61..61 + g.used.min(len - 61)];
            assert!(!v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'), "version {v:?}");
            assert!(shown.windows(6).any(|w| w == b"TBOOT:"), "a version without a banner");
        }
    }
}

#[derive(Arbitrary, Debug)]
struct CmdlineInput {
    before: Vec<String>,
    address: u64,
    form: u8,
    after: Vec<String>,
}

fn cmdline(c: &CmdlineInput) {
    let words = |v: &[String]| {
        v.iter()
            .take(8)
            .map(|w| w.replace(char::is_whitespace, ""))
            .filter(|w| !w.starts_with("tboot=") && !w.is_empty() && w != "tboot")
            .collect::<Vec<_>>()
    };
    let before = words(&c.before);
    let option = match c.form % 4 {
        0 => format!("tboot={:#x}", c.address),
        1 => format!("tboot={:#X}", c.address).replace("0X", "0x"),
        2 => format!("tboot={}", c.address),
        _ => String::new(),
    };
    let line = [before, vec![option.clone()], words(&c.after)].concat().join(" ");
    let got = tboot::shared_page_address(&line);
    let a = c.address;
    let expected = match c.form % 4 {
        0 | 1 if !a.is_multiple_of(4096) || a == 0 || a >= 4 << 30 => Err(tboot::TbootError::Address(a)),
        0 | 1 => Ok(a),
        _ => Err(tboot::TbootError::NotLaunched),
    };
    assert_eq!(got, expected, "{line:?}");
}

#[derive(Arbitrary, Debug)]
enum Mb1Input {
    /// Memory as the input's bytes, the structure at an offset into it.
    Raw { at: u16, bytes: Vec<u8> },
    Described {
        cmdline: Option<String>,
        modules: Option<Vec<(u32, u32, String)>>,
        mmap: Option<Vec<(u64, u64, u32)>>,
        /// Where the structure is, from the memory's start (0: its place).
        at: u16,
    },
}

/// Guest-physical base of the memory the information lies in.
const MB1_BASE: u64 = 0x1_0000;
const MB1_MODULES: usize = 0x200;
const MB1_STRINGS: usize = 0x800;
const MB1_CMDLINE: usize = 0x1100;
const MB1_MMAP: usize = 0x3000;
const MB1_SIZE: usize = 0x4000;

/// Whether `s` lies inside `mem`'s bytes.
fn inside(mem: &[u8], s: &str) -> bool {
    let (start, end) = (mem.as_ptr() as usize, mem.as_ptr() as usize + mem.len());
    s.is_empty() || (start..=end).contains(&(s.as_ptr() as usize)) && s.as_ptr() as usize + s.len() <= end
}

fn mb1_invariants(mem: &[u8], mb: &boot_info::Mb1<'_>) {
    assert!(inside(mem, mb.cmdline()) && mb.cmdline().len() <= 4096);
    assert!(mb.modules().count() <= 256 && mb.memory_map().count() <= 256);
    for (r, line) in mb.modules() {
        assert!(r.start <= r.end && inside(mem, line) && line.len() <= 4096, "{r:x?}");
    }
    for (r, _) in mb.memory_map() {
        assert!(r.start <= r.end, "{r:x?}");
    }
    let loader = boot_info::Loader::V1(*mb);
    assert!(loader.boot_ranges().all(|r| r.start <= r.end));
    assert!(loader.boot_ranges().any(|r| r.start == 0 && r.end >= 1 << 20), "the first MiB kept");
}

fn multiboot1(m: &Mb1Input) {
    match m {
        Mb1Input::Raw { at, bytes } => {
            let mem = boot_info::Memory { base: MB1_BASE, bytes };
            if let Some(mb) = boot_info::Mb1::new(mem, MB1_BASE + u64::from(*at)) {
                assert!(usize::from(*at) + 88 <= bytes.len());
                mb1_invariants(bytes, &mb);
            } else {
                assert!(usize::from(*at) + 88 > bytes.len());
            }
        }
        Mb1Input::Described { cmdline, modules, mmap, at } => {
            let mut b = vec![0u8; MB1_SIZE];
            let info = usize::from(*at) % 0x100;
            let addr = |off: usize| (MB1_BASE + off as u64) as u32;
            let mut flags = 0u32;
            let c_string = |b: &mut Vec<u8>, off: usize, text: &str| {
                let text = &text.as_bytes()[..text.len().min(120)];
                b[off..off + text.len()].copy_from_slice(text);
                b[off + text.len()] = 0;
            };
            if let Some(c) = cmdline {
                flags |= 1 << 2;
                c_string(&mut b, MB1_CMDLINE + info, c);
                b[info + 16..info + 20].copy_from_slice(&addr(MB1_CMDLINE + info).to_le_bytes());
            }
            let listed = modules.is_some();
            let modules: &[(u32, u32, String)] = modules.as_deref().map_or(&[], |m| &m[..m.len().min(16)]);
            if listed {
                flags |= 1 << 3;
                b[info + 20..info + 24].copy_from_slice(&(modules.len() as u32).to_le_bytes());
                b[info + 24..info + 28].copy_from_slice(&addr(MB1_MODULES).to_le_bytes());
                for (i, (start, end, line)) in modules.iter().enumerate() {
                    let at = MB1_MODULES + 16 * i;
                    let string = MB1_STRINGS + 128 * i;
                    c_string(&mut b, string, line);
                    for (k, v) in [*start, *end, addr(string), 0].into_iter().enumerate() {
                        b[at + 4 * k..at + 4 * k + 4].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
            let entries: &[(u64, u64, u32)] = mmap.as_deref().map_or(&[], |e| &e[..e.len().min(40)]);
            if mmap.is_some() {
                flags |= 1 << 6;
                b[info + 44..info + 48].copy_from_slice(&((24 * entries.len()) as u32).to_le_bytes());
                b[info + 48..info + 52].copy_from_slice(&addr(MB1_MMAP).to_le_bytes());
                for (i, (base, len, kind)) in entries.iter().enumerate() {
                    let at = MB1_MMAP + 24 * i;
                    b[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
                    b[at + 4..at + 12].copy_from_slice(&base.to_le_bytes());
                    b[at + 12..at + 20].copy_from_slice(&len.to_le_bytes());
                    b[at + 20..at + 24].copy_from_slice(&kind.to_le_bytes());
                }
            }
            b[info..info + 4].copy_from_slice(&flags.to_le_bytes());
            let mem = boot_info::Memory { base: MB1_BASE, bytes: &b };
            let mb = boot_info::Mb1::new(mem, MB1_BASE + info as u64).expect("the structure is in memory");
            mb1_invariants(&b, &mb);
            // As described: strings up to their first NUL.
            let text = |t: &str| {
                let t = &t.as_bytes()[..t.len().min(120)];
                let t = t.split(|&c| c == 0).next().unwrap_or_default();
                core::str::from_utf8(t).unwrap_or("").to_string()
            };
            assert_eq!(mb.cmdline(), cmdline.as_deref().map(text).unwrap_or_default());
            let want: Vec<(Region, String)> = modules
                .iter()
                .map(|(s, e, l)| (Region::new(u64::from(*s), u64::from((*e).max(*s))), text(l)))
                .collect();
            let got: Vec<(Region, String)> = mb.modules().map(|(r, l)| (r, l.to_string())).collect();
            assert_eq!(got, want);
            let want: Vec<(Region, u32)> =
                entries.iter().map(|&(base, len, k)| (Region::new(base, base.saturating_add(len)), k)).collect();
            assert_eq!(mb.memory_map().collect::<Vec<_>>(), want);
        }
    }
}
