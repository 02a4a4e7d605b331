//! Kernel functions that write where their caller points them: `memcpy`,
//! `memset`, the string copies, `copy_from_user`, the `printf` family into
//! a buffer, the `kstrto*` parsers, `bin2hex`, the bitmap operations,
//! `kobject_del`. An isolated
//! module may call them (they are ordinary, allowed exports), but the
//! kernel view runs them with the kernel's rights: a module that cannot
//! write `modprobe_path` itself would ask `memcpy` to. So a call to one of
//! them is judged by its destination, read from the argument registers at
//! the crossing: every page of it must be one the module could write itself.

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
}

/// Where a call writes: the register holding the destination, and how much.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub destination: usize,
    pub length: Length,
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

/// `sizeof(struct kobject)` is 64 bytes on x86-64; a kobject call writes
/// its links, its state bits and its reference count.
const KOBJECT: u64 = 64;

/// The call's spec, by the export's name; `None` for the functions that do
/// not write through a pointer argument.
pub fn spec(name: &[u8]) -> Option<Spec> {
    let arg = |destination, length| Some(Spec { destination, length });
    match name {
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

/// The guest-virtual range a call with these registers writes; `None` for
/// a length beyond [`MAX_DESTINATION`] or a range that wraps (refused).
pub fn destination(spec: Spec, gprs: &[u64; 16]) -> Option<Range> {
    let start = gprs[spec.destination];
    let words = |bits: u64| bits.div_ceil(64) * 8;
    let len = match spec.length {
        Length::Register(r) => gprs[r],
        Length::Fixed(n) => n,
        Length::Twice(r) => gprs[r].checked_mul(2)?,
        Length::Bits(r) => words(u64::from(gprs[r] as u32)),
        // A length below one still touches the word holding `start`.
        Length::BitSpan(start, len) => words(u64::from(gprs[start] as u32) + (gprs[len] as i32).max(1) as u64),
    };
    if len > MAX_DESTINATION {
        return None;
    }
    Some(Range::new(start, start.checked_add(len)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_through_functions_are_judged_by_their_destination() {
        let mut gprs = [0u64; 16];
        gprs[RDI] = 0xffff_ffff_8290_0040;
        gprs[RDX] = 16;
        let memcpy = spec(b"memcpy").unwrap();
        assert_eq!(destination(memcpy, &gprs), Some(Range::new(0xffff_ffff_8290_0040, 0xffff_ffff_8290_0050)));
        let kobject = spec(b"kobject_del").unwrap();
        assert_eq!(destination(kobject, &gprs).map(|r| r.len()), Some(64));
        assert_eq!(destination(spec(b"strcpy").unwrap(), &gprs).map(|r| r.len()), Some(0x1000));
        for name in [&b"printk"[..], b"kmalloc", b"memcmp", b"strlen"] {
            assert_eq!(spec(name), None);
        }
        // The printf family by its size argument, the parsers by their result.
        gprs[RSI] = 256;
        assert_eq!(destination(spec(b"snprintf").unwrap(), &gprs).map(|r| r.len()), Some(256));
        gprs[RDX] = 0xffff_8880_0000_1000;
        assert_eq!(
            destination(spec(b"kstrtouint").unwrap(), &gprs),
            Some(Range::new(0xffff_8880_0000_1000, 0xffff_8880_0000_1008))
        );
        gprs[RCX] = 0xffff_8880_0000_2000;
        assert_eq!(
            destination(spec(b"kstrtoint_from_user").unwrap(), &gprs).map(|r| r.start),
            Some(0xffff_8880_0000_2000)
        );
        assert_eq!(destination(spec(b"kstrtobool").unwrap(), &gprs).map(|r| r.start), Some(256));
        gprs[RDX] = 16;
        // bin2hex writes two digits a byte; bitmaps whole words, by their bit count.
        gprs[RDI] = 0xffff_8880_0000_3000;
        assert_eq!(destination(spec(b"bin2hex").unwrap(), &gprs).map(|r| r.len()), Some(32));
        gprs[RDX] = 0xdead_0000_0000_0041; // an unsigned int: the upper half is not the caller's
        assert_eq!(destination(spec(b"__bitmap_complement").unwrap(), &gprs).map(|r| r.len()), Some(16));
        for (start, len, bytes) in [(0u64, 8u64, 8u64), (60, 8, 16), (130, 0, 24), (0, u64::from(u32::MAX), 8)] {
            (gprs[RSI], gprs[RDX]) = (start, len);
            let got = destination(spec(b"__bitmap_set").unwrap(), &gprs);
            assert_eq!(got, Some(Range::new(gprs[RDI], gprs[RDI] + bytes)), "{start} {len}");
        }
        gprs[R8] = 100;
        assert_eq!(destination(spec(b"__bitmap_replace").unwrap(), &gprs).map(|r| r.len()), Some(16));
        gprs[RDX] = u64::MAX;
        assert_eq!(destination(spec(b"bin2hex").unwrap(), &gprs), None, "overflowing");
        gprs[RDX] = 16;
        // Too long, or wrapping: refused.
        gprs[RDX] = MAX_DESTINATION + 1;
        assert_eq!(destination(memcpy, &gprs), None);
        gprs[RDI] = u64::MAX - 4;
        gprs[RDX] = 16;
        assert_eq!(destination(memcpy, &gprs), None);
    }
}
