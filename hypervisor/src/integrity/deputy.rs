//! Kernel functions that write where their caller points them: `memcpy`,
//! `memset`, the string copies, `copy_from_user`, the `printf` family into
//! a buffer, the `kstrto*` parsers, `kobject_del`. An isolated
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
        _ => None,
    }
}

/// The guest-virtual range a call with these registers writes; `None` for
/// a length beyond [`MAX_DESTINATION`] or a range that wraps (refused).
pub fn destination(spec: Spec, gprs: &[u64; 16]) -> Option<Range> {
    let start = gprs[spec.destination];
    let len = match spec.length {
        Length::Register(r) => gprs[r],
        Length::Fixed(n) => n,
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
        // Too long, or wrapping: refused.
        gprs[RDX] = MAX_DESTINATION + 1;
        assert_eq!(destination(memcpy, &gprs), None);
        gprs[RDI] = u64::MAX - 4;
        gprs[RDX] = 16;
        assert_eq!(destination(memcpy, &gprs), None);
    }
}
