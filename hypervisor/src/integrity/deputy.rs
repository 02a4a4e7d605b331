//! Kernel functions that write where their caller points them: `memcpy`,
//! `memset`, the string copies, `copy_from_user`, the `printf` family into
//! a buffer, the `kstrto*` parsers, `bin2hex`, the bitmap operations,
//! `kobject_del`, the `scanf` family (through the pointers its format
//! consumes), the `seq_file` writers (into the file's buffer) and the free
//! functions (`kfree`, `kmem_cache_free`, `vfree`: the allocator writes its
//! free pointer into the object, which the kernel hands out again: a module
//! that frees a credential in use has the next one built over it). An isolated
//! module may call them (they are ordinary, allowed exports), but the
//! kernel view runs them with the kernel's rights: a module that cannot
//! write `modprobe_path` itself would ask `memcpy` to. So a call to one of
//! them is judged by its destination, read from the argument registers at
//! the crossing: every page of it must be one the module could write itself.

use alloc::vec::Vec;

use super::layout::Range;

/// How many bytes a call writes at its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    /// The value of a register (by number: RDX is 2, RCX 1, ...).
    Register(usize),
    /// A fixed size (an object's, or a bound for an unbounded string copy).
    Fixed(u64),
    /// Twice a register's value (`bin2hex` writes two digits a byte).
    Twice(usize),
    /// The words of a bitmap of as many bits as a register's low 32 bits.
    Bits(usize),
    /// The words of a bitmap up to bit `start + len` (`__bitmap_set`):
    /// the registers holding `start` and `len` (a signed `int`).
    BitSpan(usize, usize),
    /// The object a free function gives back, judged by its first byte (a
    /// slab's objects share its pages' class, a stack's base is a stack);
    /// nothing for NULL or `ZERO_SIZE_PTR`, which free nothing.
    Freed,
}

/// Where a call writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spec {
    /// One range: the register holding the destination, and how much.
    Range { destination: usize, length: Length },
    /// The `scanf` family: each conversion of the format (in register
    /// `format`) stores through the next of the variable arguments; a
    /// string conversion without a width stores at most the input (in
    /// register `input`) and its NUL.
    Scan { input: usize, format: usize, args: Args },
    /// The `seq_file` writers: the `struct seq_file` (in register `file`),
    /// whose count they advance, and the buffer it names.
    Seq { file: usize },
}

/// Where a `scanf` function's variable arguments are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Args {
    /// Passed as arguments from this one on (`sscanf`: 2).
    From(usize),
    /// In a `va_list` the register points at (`vsscanf`).
    VaList(usize),
}

const RDI: usize = 7;
const RSI: usize = 6;
const RDX: usize = 2;
const RCX: usize = 1;
const R8: usize = 8;

/// What a `kstrto*` parser stores: at most a `u64`.
const PARSED: u64 = 8;

/// The most bytes one judged call may name: beyond it the call is refused
/// (every page is looked up, so the cost of a crossing stays bounded).
pub const MAX_DESTINATION: u64 = 1 << 20;

/// An unbounded string copy (`strcpy`, `strcat`) is judged on the page its
/// destination starts on and the next: strings longer than that into a
/// kernel page are not a module's business.
const STRING_BOUND: u64 = 0x1000;

/// What `kmalloc(0)` returns; freeing it (or NULL) frees nothing.
const ZERO_SIZE_PTR: u64 = 16;

/// `sizeof(struct kobject)` is 64 bytes on x86-64; a kobject call writes
/// its links, its state bits and its reference count.
const KOBJECT: u64 = 64;

/// The call's spec, by the export's name; `None` for the functions that do
/// not write through a pointer argument.
pub fn spec(name: &[u8]) -> Option<Spec> {
    let arg = |destination, length| Some(Spec::Range { destination, length });
    match name {
        b"sscanf" => Some(Spec::Scan { input: RDI, format: RSI, args: Args::From(2) }),
        b"vsscanf" => Some(Spec::Scan { input: RDI, format: RSI, args: Args::VaList(RDX) }),
        b"seq_printf"
        | b"seq_vprintf"
        | b"seq_bprintf"
        | b"seq_puts"
        | b"seq_putc"
        | b"seq_write"
        | b"seq_pad"
        | b"seq_put_decimal_ull"
        | b"seq_put_decimal_ull_width"
        | b"seq_put_decimal_ll"
        | b"seq_put_hex_ll"
        | b"seq_escape_mem"
        | b"seq_hex_dump"
        | b"seq_path"
        | b"seq_path_root"
        | b"seq_file_path"
        | b"seq_dentry" => Some(Spec::Seq { file: RDI }),
        b"mangle_path" => arg(RDI, Length::Fixed(STRING_BOUND)),
        b"memcpy"
        | b"__memcpy"
        | b"memmove"
        | b"__memmove"
        | b"memset"
        | b"__memset"
        | b"memcpy_fromio"
        | b"strncpy"
        | b"strscpy"
        | b"sized_strscpy"
        | b"strscpy_pad"
        | b"strlcpy"
        | b"strlcat"
        | b"strncat"
        | b"_copy_from_user"
        | b"copy_from_kernel_nofault"
        | b"strncpy_from_user"
        | b"memcpy_and_pad" => arg(RDI, Length::Register(RDX)),
        b"strcpy" | b"strcat" | b"sprintf" | b"vsprintf" | b"strreplace" | b"strim" => {
            arg(RDI, Length::Fixed(STRING_BOUND))
        }
        // Bounded by their second argument.
        b"snprintf" | b"vsnprintf" | b"scnprintf" | b"vscnprintf" | b"memzero_explicit" => {
            arg(RDI, Length::Register(RSI))
        }
        b"hex2bin" | b"match_strlcpy" => arg(RDI, Length::Register(RDX)),
        b"string_unescape" => arg(RSI, Length::Register(RDX)),
        // The parsers store their result through their last argument.
        b"kstrtobool" => arg(RSI, Length::Fixed(PARSED)),
        b"kstrtoint" | b"kstrtouint" | b"kstrtol" | b"kstrtoul" | b"kstrtoll" | b"kstrtoull" | b"_kstrtol"
        | b"_kstrtoul" | b"kstrtos8" | b"kstrtou8" | b"kstrtos16" | b"kstrtou16" => arg(RDX, Length::Fixed(PARSED)),
        b"kstrtobool_from_user" => arg(RDX, Length::Fixed(PARSED)),
        b"kstrtoint_from_user"
        | b"kstrtouint_from_user"
        | b"kstrtol_from_user"
        | b"kstrtoul_from_user"
        | b"kstrtoll_from_user"
        | b"kstrtoull_from_user"
        | b"kstrtos8_from_user"
        | b"kstrtou8_from_user"
        | b"kstrtos16_from_user"
        | b"kstrtou16_from_user" => arg(RCX, Length::Fixed(PARSED)),
        b"kobject_del" | b"kobject_put" | b"kobject_rename" | b"kobject_move" => arg(RDI, Length::Fixed(KOBJECT)),
        b"bin2hex" => arg(RDI, Length::Twice(RDX)),
        b"kfree" | b"kfree_sensitive" | b"kvfree" | b"kvfree_sensitive" | b"kfree_const" | b"vfree" | b"free_pages" => {
            arg(RDI, Length::Freed)
        }
        b"kmem_cache_free" => arg(RSI, Length::Freed),
        // Bitmaps, by their bit count.
        b"__bitmap_set" | b"__bitmap_clear" => arg(RDI, Length::BitSpan(RSI, RDX)),
        b"__bitmap_complement" | b"bitmap_from_arr32" | b"bitmap_to_arr32" => arg(RDI, Length::Bits(RDX)),
        b"__bitmap_and"
        | b"__bitmap_or"
        | b"__bitmap_xor"
        | b"__bitmap_andnot"
        | b"__bitmap_shift_right"
        | b"__bitmap_shift_left" => arg(RDI, Length::Bits(RCX)),
        b"__bitmap_replace" | b"bitmap_cut" => arg(RDI, Length::Bits(R8)),
        b"bitmap_find_free_region" => arg(RDI, Length::Bits(RSI)),
        b"bitmap_parse" | b"bitmap_parse_user" | b"bitmap_parselist_user" => arg(RDX, Length::Bits(RCX)),
        b"bitmap_parselist" => arg(RSI, Length::Bits(RDX)),
        // Into a buffer: at most a page, or their count.
        b"bitmap_print_to_pagebuf" => arg(RSI, Length::Fixed(STRING_BOUND)),
        b"bitmap_print_bitmask_to_buf" | b"bitmap_print_list_to_buf" => arg(RDI, Length::Register(R8)),
        _ => None,
    }
}

/// What a judgement reads of the guest: `len` bytes at a guest-virtual
/// address, `None` where unreadable.
pub type Read<'a> = &'a dyn Fn(u64, usize) -> Option<Vec<u8>>;

/// What a call was judged by: the guest-virtual ranges it would write,
/// and the guest-virtual bytes the judgement read to tell them (a format,
/// an input, pointers on the stack, a `va_list`, a `seq_file`'s buffer and
/// size). The kernel reads those bytes again as the call runs: they must
/// not change until it returns (see `returns::InFlight`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub writes: Ranges,
    pub inputs: Vec<Range>,
}

/// What a call with these registers (RSP is 4) would write, and what that
/// was read from; `None` when it cannot be told (a length beyond
/// [`MAX_DESTINATION`], a range that wraps, a format or structure that
/// cannot be read or understood): the call is then refused.
pub fn destinations(spec: Spec, gprs: &[u64; 16], read: Read<'_>) -> Option<Judgement> {
    let mut inputs = Vec::new();
    let writes = match spec {
        Spec::Range { destination: register, length } => {
            Ranges::Fixed([Some(destination(register, length, gprs)?), None])
        }
        Spec::Scan { input, format, args } => {
            let text = read_string(gprs[input], STRING_BOUND as usize, read, &mut inputs)?;
            let sizes = scan_sizes(&read_string(gprs[format], MAX_FORMAT, read, &mut inputs)?, &text)?;
            let va = match args {
                Args::From(_) => None,
                Args::VaList(r) => Some(VaList::read(gprs[r], read, &mut inputs)?),
            };
            let mut out = Vec::with_capacity(sizes.len());
            for (i, size) in sizes.into_iter().enumerate() {
                let pointer = match (args, &va) {
                    (_, Some(va)) => va.arg(i, read, &mut inputs)?,
                    (Args::From(first), None) => argument(first + i, gprs, read, &mut inputs)?,
                    (Args::VaList(_), None) => return None,
                };
                out.push(Range::new(pointer, pointer.checked_add(size)?));
            }
            Ranges::Scanned(out)
        }
        Spec::Seq { file } => {
            let m = gprs[file];
            let fields = read_recorded(m, 16, read, &mut inputs)?;
            let buf = u64::from_le_bytes(fields[..8].try_into().ok()?);
            let size = u64::from_le_bytes(fields[8..].try_into().ok()?);
            if size > MAX_DESTINATION {
                return None;
            }
            let file = Range::new(m, m.checked_add(SEQ_FILE_COUNTS)?);
            Ranges::Fixed([Some(file), Some(Range::new(buf, buf.checked_add(size)?))])
        }
    };
    Some(Judgement { writes, inputs })
}

/// Reads `len` bytes at `at` and notes them among a judgement's inputs.
fn read_recorded(at: u64, len: usize, read: Read<'_>, inputs: &mut Vec<Range>) -> Option<Vec<u8>> {
    let bytes = read(at, len)?;
    inputs.push(Range::new(at, at.checked_add(len as u64)?));
    Some(bytes)
}

/// The ranges a call writes: one or two without an allocation (a deputy
/// call is judged at every crossing), or as many as a format names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ranges {
    Fixed([Option<Range>; 2]),
    Scanned(Vec<Range>),
}

impl Ranges {
    pub fn iter(&self) -> impl Iterator<Item = Range> + '_ {
        let (fixed, scanned): (&[Option<Range>], &[Range]) = match self {
            Ranges::Fixed(f) => (f, &[]),
            Ranges::Scanned(v) => (&[], v),
        };
        fixed.iter().flatten().chain(scanned).copied()
    }
}

/// The longest `scanf` format judged (a longer one is refused).
const MAX_FORMAT: usize = 256;
/// The most conversions one judged `scanf` format may store.
const MAX_CONVERSIONS: usize = 32;
/// The fields of a `struct seq_file` its writers change: `buf`, `size`,
/// `from`, `count`, `pad_until` (6.1 and 6.12 alike).
const SEQ_FILE_COUNTS: u64 = 40;

/// A string, up to its NUL or `limit` bytes, a page at a time: a string
/// near the end of its mapping is read, not refused. Its bytes up to the
/// NUL are noted among the inputs (what lies beyond it judged nothing).
fn read_string(at: u64, limit: usize, read: Read<'_>, inputs: &mut Vec<Range>) -> Option<Vec<u8>> {
    let mut text = Vec::new();
    let mut next = at;
    while text.len() < limit && !text.contains(&0) {
        let chunk = (limit - text.len()).min(0x1000 - (next & 0xfff) as usize);
        text.extend(read(next, chunk)?);
        next = next.checked_add(chunk as u64)?;
    }
    let used = text.iter().position(|&b| b == 0).map_or(text.len(), |n| n + 1);
    inputs.push(Range::new(at, at.checked_add(used as u64)?));
    Some(text)
}

/// Argument `i` of a call (System V: six in registers, then the stack
/// above the return address).
fn argument(i: usize, gprs: &[u64; 16], read: Read<'_>, inputs: &mut Vec<Range>) -> Option<u64> {
    const REGISTERS: [usize; 6] = [RDI, RSI, RDX, RCX, R8, 9];
    match REGISTERS.get(i) {
        Some(&r) => Some(gprs[r]),
        None => {
            let at = gprs[4].checked_add(8 * (i - REGISTERS.len() + 1) as u64)?;
            word(at, read, inputs)
        }
    }
}

/// The word at `at`, noted among the inputs.
fn word(at: u64, read: Read<'_>, inputs: &mut Vec<Range>) -> Option<u64> {
    Some(u64::from_le_bytes(read_recorded(at, 8, read, inputs)?.try_into().ok()?))
}

/// A System V `va_list`: how far into the saved registers the next
/// integer argument is, and where the rest are.
struct VaList {
    gp_offset: u64,
    overflow: u64,
    saved: u64,
}

impl VaList {
    fn read(at: u64, read: Read<'_>, inputs: &mut Vec<Range>) -> Option<Self> {
        let b = read_recorded(at, 24, read, inputs)?;
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let gp_offset = u64::from(u32::from_le_bytes(b[..4].try_into().ok()?));
        if gp_offset > 48 || gp_offset % 8 != 0 {
            return None;
        }
        Some(VaList { gp_offset, overflow: word(8), saved: word(16) })
    }

    /// The `i`th integer argument still to come.
    fn arg(&self, i: usize, read: Read<'_>, inputs: &mut Vec<Range>) -> Option<u64> {
        let in_registers = (48 - self.gp_offset) / 8;
        let i = i as u64;
        let at = if i < in_registers {
            self.saved.checked_add(self.gp_offset + 8 * i)?
        } else {
            self.overflow.checked_add(8 * (i - in_registers))?
        };
        word(at, read, inputs)
    }
}

/// The size each stored conversion of a Linux `vsscanf` format writes, in
/// order, parsing `input`; `None` for a format without its NUL within
/// [`MAX_FORMAT`] bytes, with more than [`MAX_CONVERSIONS`] conversions,
/// with a conversion the kernel's `vsscanf` does not take (refused rather
/// than guessed), or with a string conversion without a width when the
/// input has no NUL within a page (the kernel would copy as far as it).
pub fn scan_sizes(format: &[u8], input: &[u8]) -> Option<Vec<u64>> {
    let end = format.iter().position(|&b| b == 0)?;
    let f = &format[..end];
    // A token is no longer than the input it comes from, plus its NUL.
    let unbounded = input.iter().position(|&b| b == 0).map(|n| n as u64 + 1);
    let mut sizes = Vec::new();
    let mut i = 0;
    while i < f.len() {
        if f[i] != b'%' {
            i += 1;
            continue;
        }
        i += 1;
        if f.get(i) == Some(&b'%') {
            i += 1;
            continue;
        }
        let store = f.get(i) != Some(&b'*');
        if !store {
            i += 1;
        }
        let mut width: Option<u64> = None;
        while let Some(d) = f.get(i).filter(|c| c.is_ascii_digit()) {
            width = Some(width.unwrap_or(0).saturating_mul(10).saturating_add(u64::from(d - b'0')));
            i += 1;
        }
        let (integer, qualifier) = match (f.get(i), f.get(i + 1)) {
            (Some(b'h'), Some(b'h')) => (1, 2),
            (Some(b'h'), _) => (2, 1),
            (Some(b'l' | b'L' | b'z' | b'Z'), Some(b'l' | b'L')) => (8, 2),
            (Some(b'l' | b'L' | b'z' | b'Z'), _) => (8, 1),
            _ => (4, 0),
        };
        i += qualifier;
        let string = match width {
            Some(w) => Some(w.saturating_add(1)),
            None => unbounded,
        };
        let size = match f.get(i)? {
            b'd' | b'i' | b'u' | b'o' | b'x' | b'X' | b'n' => Some(integer),
            b'c' => Some(width.unwrap_or(1)),
            b's' => string,
            b'[' => {
                // The set ends at the next ']', which may come first (or after '^').
                let mut j = i + 1;
                if f.get(j) == Some(&b'^') {
                    j += 1;
                }
                j += 1;
                while f.get(j).is_some_and(|&c| c != b']') {
                    j += 1;
                }
                f.get(j)?;
                i = j;
                string
            }
            _ => return None,
        };
        i += 1;
        if store {
            if sizes.len() == MAX_CONVERSIONS {
                return None;
            }
            sizes.push(size?);
        }
    }
    Some(sizes)
}

/// The guest-virtual range a call with these registers writes at
/// `register`; `None` for a length beyond [`MAX_DESTINATION`] or a range
/// that wraps (refused).
fn destination(register: usize, length: Length, gprs: &[u64; 16]) -> Option<Range> {
    let start = gprs[register];
    let words = |bits: u64| bits.div_ceil(64) * 8;
    let len = match length {
        Length::Register(r) => gprs[r],
        Length::Fixed(n) => n,
        Length::Twice(r) => gprs[r].checked_mul(2)?,
        Length::Bits(r) => words(u64::from(gprs[r] as u32)),
        // A length below one still touches the word holding `start`.
        Length::BitSpan(start, len) => words(u64::from(gprs[start] as u32) + (gprs[len] as i32).max(1) as u64),
        Length::Freed => u64::from(start > ZERO_SIZE_PTR),
    };
    if len > MAX_DESTINATION {
        return None;
    }
    Some(Range::new(start, start.checked_add(len)?))
}

#[cfg(test)]
mod tests {
    use alloc::collections::BTreeMap;

    /// The single range of a one-range call, reading nothing.
    fn one(spec: Spec, gprs: &[u64; 16]) -> Option<Range> {
        let ranges = all(spec, gprs, &|_, _| None)?;
        assert_eq!(ranges.len(), 1);
        Some(ranges[0])
    }

    fn all(spec: Spec, gprs: &[u64; 16], read: Read<'_>) -> Option<Vec<Range>> {
        destinations(spec, gprs, read).map(|j| j.writes.iter().collect())
    }

    /// Where the tests' `scanf` input lies.
    const INPUT: u64 = 0xffff_ffff_c000_5000;

    /// Guest memory for a judgement: bytes at addresses.
    fn memory(parts: &[(u64, &[u8])]) -> BTreeMap<u64, u8> {
        let mut m = BTreeMap::new();
        for &(at, bytes) in parts {
            for (i, &b) in bytes.iter().enumerate() {
                m.insert(at + i as u64, b);
            }
        }
        m
    }

    /// Reads as the guest's memory does: all of a range, or nothing. Bytes
    /// not set read as zero within the page of a set one.
    fn reader(m: &BTreeMap<u64, u8>) -> impl Fn(u64, usize) -> Option<Vec<u8>> + '_ {
        |at, len| {
            let mapped = |a: u64| m.range(a & !0xfff..(a & !0xfff) + 0x1000).next().is_some();
            (at..at + len as u64).map(|a| mapped(a).then(|| m.get(&a).copied().unwrap_or(0))).collect()
        }
    }

    #[test]
    fn scanf_formats_are_read_conversion_by_conversion() {
        let input = b"12 /tmp/x\0";
        assert_eq!(scan_sizes(b"%d %s\0", input), Some(alloc::vec![4, 10]));
        assert_eq!(
            scan_sizes(b"%hhx:%hd %lu %llx %zu %5s %3c %*d %% %n\0", input),
            Some(alloc::vec![1, 2, 8, 8, 8, 6, 3, 4])
        );
        assert_eq!(scan_sizes(b"%[^]a]%10[a-z]\0", input), Some(alloc::vec![10, 11]));
        // A string without a width, from an input with no NUL within a page:
        // the kernel would copy as far as the input goes. Refused; with a
        // width, or suppressed, it is bounded.
        let long = [b'a'; STRING_BOUND as usize];
        assert_eq!(scan_sizes(b"%s\0", &long), None);
        assert_eq!(scan_sizes(b"%[a]\0", &long), None);
        assert_eq!(scan_sizes(b"%7s%*s\0", &long), Some(alloc::vec![8]));
        // No NUL, an unknown conversion, an open set, too many: refused.
        assert_eq!(scan_sizes(b"%d", input), None);
        assert_eq!(scan_sizes(b"%p\0", input), None);
        assert_eq!(scan_sizes(b"%f\0", input), None);
        assert_eq!(scan_sizes(b"%[abc\0", input), None);
        assert_eq!(scan_sizes(b"%d%\0", input), None);
        let many = [&b"%d"[..]; MAX_CONVERSIONS + 1].concat();
        assert_eq!(scan_sizes(&[&many[..], b"\0"].concat(), input), None);
    }

    #[test]
    fn sscanf_is_judged_by_every_pointer_its_format_consumes() {
        const FMT: u64 = 0xffff_ffff_c000_1000;
        const RSP: u64 = 0xffff_c900_0000_3f00;
        let mut gprs = [0u64; 16];
        gprs[RDI] = INPUT;
        gprs[RSI] = FMT;
        gprs[4] = RSP;
        (gprs[RDX], gprs[RCX], gprs[R8], gprs[9]) = (0x1000, 0x2000, 0x3000, 0x4000);
        // The fifth and sixth pointers are on the stack, above the return address.
        let m = memory(&[
            (INPUT, b"1 2 3 4 5 6\0"),
            (FMT, b"%d %d %d %d %8s %hhu\0"),
            (RSP + 8, &0x5000u64.to_le_bytes()),
            (RSP + 16, &0xffff_ffff_8290_0000u64.to_le_bytes()),
        ]);
        let got = all(spec(b"sscanf").unwrap(), &gprs, &reader(&m)).unwrap();
        let starts: Vec<(u64, u64)> = got.iter().map(|r| (r.start, r.len())).collect();
        assert_eq!(
            starts,
            [(0x1000, 4), (0x2000, 4), (0x3000, 4), (0x4000, 4), (0x5000, 9), (0xffff_ffff_8290_0000, 1)]
        );
        // A format that ends just before an unmapped page is read all the same.
        let end = FMT + 0x1000 - 4;
        gprs[RSI] = end;
        let m = memory(&[(INPUT, b"1 2 3 4 5 6\0"), (end, b"%d\0")]);
        assert_eq!(all(spec(b"sscanf").unwrap(), &gprs, &reader(&m)), Some(alloc::vec![Range::new(0x1000, 0x1004)]));
        gprs[RSI] = FMT;
        // A pointer beyond the mapped stack: refused.
        gprs[4] = 0xffff_c900_0000_3ff0;
        let m = memory(&[
            (INPUT, b"1 2 3 4 5 6\0"),
            (FMT, b"%d %d %d %d %d %d\0"),
            (gprs[4] + 8, &0x5000u64.to_le_bytes()),
        ]);
        assert_eq!(all(spec(b"sscanf").unwrap(), &gprs, &reader(&m)), None);
    }

    #[test]
    fn vsscanf_reads_its_pointers_from_the_va_list() {
        const FMT: u64 = 0xffff_ffff_c000_1000;
        const VA: u64 = 0xffff_c900_0000_3e00;
        const SAVED: u64 = 0xffff_c900_0000_3d00;
        const OVERFLOW: u64 = 0xffff_c900_0000_3f10;
        let mut gprs = [0u64; 16];
        gprs[RDI] = INPUT;
        (gprs[RSI], gprs[RDX]) = (FMT, VA);
        // Two integer registers were used for fixed arguments (gp_offset 16).
        let mut va = Vec::new();
        va.extend_from_slice(&16u32.to_le_bytes());
        va.extend_from_slice(&48u32.to_le_bytes());
        va.extend_from_slice(&OVERFLOW.to_le_bytes());
        va.extend_from_slice(&SAVED.to_le_bytes());
        let saved: Vec<u8> = (0..6u64).flat_map(|i| (0x1000 * i).to_le_bytes()).collect();
        let m = memory(&[
            (INPUT, b"1 2 3 4 5 6\0"),
            (FMT, b"%d %d %d %d %d\0"),
            (VA, &va),
            (SAVED, &saved),
            (OVERFLOW, &0x9000u64.to_le_bytes()),
        ]);
        let got = all(spec(b"vsscanf").unwrap(), &gprs, &reader(&m)).unwrap();
        let starts: Vec<u64> = got.iter().map(|r| r.start).collect();
        assert_eq!(starts, [0x2000, 0x3000, 0x4000, 0x5000, 0x9000]);
        // A va_list that does not look like one: refused.
        let mut bad = va.clone();
        bad[0] = 52;
        let m = memory(&[(INPUT, b"1 2 3 4 5 6\0"), (FMT, b"%d\0"), (VA, &bad)]);
        assert_eq!(all(spec(b"vsscanf").unwrap(), &gprs, &reader(&m)), None);
    }

    #[test]
    fn seq_file_writers_are_judged_by_the_file_and_its_buffer() {
        const FILE: u64 = 0xffff_c900_0000_3f00;
        let mut gprs = [0u64; 16];
        gprs[RDI] = FILE;
        let mut fields = 0xffff_ffff_8290_0040u64.to_le_bytes().to_vec();
        fields.extend_from_slice(&256u64.to_le_bytes());
        let m = memory(&[(FILE, &fields)]);
        let got = all(spec(b"seq_printf").unwrap(), &gprs, &reader(&m)).unwrap();
        assert_eq!(
            got,
            [Range::new(FILE, FILE + SEQ_FILE_COUNTS), Range::new(0xffff_ffff_8290_0040, 0xffff_ffff_8290_0140)]
        );
        // A buffer too big to judge, or a file that cannot be read: refused.
        fields[8..].copy_from_slice(&(MAX_DESTINATION + 1).to_le_bytes());
        let m = memory(&[(FILE, &fields)]);
        assert_eq!(all(spec(b"seq_puts").unwrap(), &gprs, &reader(&m)), None);
        assert_eq!(all(spec(b"seq_putc").unwrap(), &gprs, &|_, _| None), None);
    }

    /// A free is judged by the object it gives back (the allocator writes
    /// into it, and hands it out again): a credential freed by a module
    /// would have the next one built over it while its task still uses it.
    #[test]
    fn the_free_functions_are_judged_by_the_object_they_give_back() {
        const CRED: u64 = 0xffff_8880_0123_4540;
        let mut gprs = [0u64; 16];
        for name in [&b"kfree"[..], b"kfree_sensitive", b"kvfree", b"kfree_const", b"vfree", b"free_pages"] {
            gprs[RDI] = CRED;
            assert_eq!(one(spec(name).unwrap(), &gprs), Some(Range::new(CRED, CRED + 1)), "{name:?}");
            // NULL and ZERO_SIZE_PTR free nothing.
            for nothing in [0, ZERO_SIZE_PTR] {
                gprs[RDI] = nothing;
                assert_eq!(one(spec(name).unwrap(), &gprs), Some(Range::new(nothing, nothing)));
            }
        }
        (gprs[RDI], gprs[RSI]) = (0xffff_8880_0100_0000, CRED);
        assert_eq!(one(spec(b"kmem_cache_free").unwrap(), &gprs), Some(Range::new(CRED, CRED + 1)));
    }

    /// Everything a verdict was read from is named, to be held until the
    /// call returns; bytes past a string's NUL judged nothing.
    #[test]
    fn a_judgement_names_what_it_read() {
        const FMT: u64 = 0xffff_ffff_c000_1000;
        const RSP: u64 = 0xffff_c900_0000_3f00;
        let inputs =
            |spec: Spec, gprs: &[u64; 16], m: &BTreeMap<u64, u8>| destinations(spec, gprs, &reader(m)).unwrap().inputs;
        let mut gprs = [0u64; 16];
        (gprs[RDI], gprs[RSI], gprs[4]) = (INPUT, FMT, RSP);
        let m =
            memory(&[(INPUT, b"1 2 3 4 5 6\0tail"), (FMT, b"%d %d %d %d %d\0%d"), (RSP + 8, &0x5000u64.to_le_bytes())]);
        assert_eq!(
            inputs(spec(b"sscanf").unwrap(), &gprs, &m),
            [Range::new(INPUT, INPUT + 12), Range::new(FMT, FMT + 15), Range::new(RSP + 8, RSP + 16)]
        );
        // The seq_file's buffer and size; a plain copy reads nothing.
        let mut fields = 0xffff_ffff_8290_0040u64.to_le_bytes().to_vec();
        fields.extend_from_slice(&256u64.to_le_bytes());
        gprs[RDI] = RSP;
        let m = memory(&[(RSP, &fields)]);
        assert_eq!(inputs(spec(b"seq_puts").unwrap(), &gprs, &m), [Range::new(RSP, RSP + 16)]);
        assert!(inputs(spec(b"memcpy").unwrap(), &gprs, &m).is_empty());
    }

    use super::*;

    #[test]
    fn write_through_functions_are_judged_by_their_one() {
        let mut gprs = [0u64; 16];
        gprs[RDI] = 0xffff_ffff_8290_0040;
        gprs[RDX] = 16;
        let memcpy = spec(b"memcpy").unwrap();
        assert_eq!(one(memcpy, &gprs), Some(Range::new(0xffff_ffff_8290_0040, 0xffff_ffff_8290_0050)));
        let kobject = spec(b"kobject_del").unwrap();
        assert_eq!(one(kobject, &gprs).map(|r| r.len()), Some(64));
        assert_eq!(one(spec(b"strcpy").unwrap(), &gprs).map(|r| r.len()), Some(0x1000));
        for name in [&b"printk"[..], b"kmalloc", b"memcmp", b"strlen"] {
            assert_eq!(spec(name), None);
        }
        // The printf family by its size argument, the parsers by their result.
        gprs[RSI] = 256;
        assert_eq!(one(spec(b"snprintf").unwrap(), &gprs).map(|r| r.len()), Some(256));
        gprs[RDX] = 0xffff_8880_0000_1000;
        assert_eq!(
            one(spec(b"kstrtouint").unwrap(), &gprs),
            Some(Range::new(0xffff_8880_0000_1000, 0xffff_8880_0000_1008))
        );
        gprs[RCX] = 0xffff_8880_0000_2000;
        assert_eq!(one(spec(b"kstrtoint_from_user").unwrap(), &gprs).map(|r| r.start), Some(0xffff_8880_0000_2000));
        assert_eq!(one(spec(b"kstrtobool").unwrap(), &gprs).map(|r| r.start), Some(256));
        gprs[RDX] = 16;
        // bin2hex writes two digits a byte; bitmaps whole words, by their bit count.
        gprs[RDI] = 0xffff_8880_0000_3000;
        assert_eq!(one(spec(b"bin2hex").unwrap(), &gprs).map(|r| r.len()), Some(32));
        gprs[RDX] = 0xdead_0000_0000_0041; // an unsigned int: the upper half is not the caller's
        assert_eq!(one(spec(b"__bitmap_complement").unwrap(), &gprs).map(|r| r.len()), Some(16));
        for (start, len, bytes) in [(0u64, 8u64, 8u64), (60, 8, 16), (130, 0, 24), (0, u64::from(u32::MAX), 8)] {
            (gprs[RSI], gprs[RDX]) = (start, len);
            let got = one(spec(b"__bitmap_set").unwrap(), &gprs);
            assert_eq!(got, Some(Range::new(gprs[RDI], gprs[RDI] + bytes)), "{start} {len}");
        }
        gprs[R8] = 100;
        assert_eq!(one(spec(b"__bitmap_replace").unwrap(), &gprs).map(|r| r.len()), Some(16));
        gprs[RDX] = u64::MAX;
        assert_eq!(one(spec(b"bin2hex").unwrap(), &gprs), None, "overflowing");
        gprs[RDX] = 16;
        // Too long, or wrapping: refused.
        gprs[RDX] = MAX_DESTINATION + 1;
        assert_eq!(one(memcpy, &gprs), None);
        gprs[RDI] = u64::MAX - 4;
        gprs[RDX] = 16;
        assert_eq!(one(memcpy, &gprs), None);
    }
}
