//! VT-d in-memory formats (Intel VT-d specification, chapter 9): the
//! second-level paging entries (one more [`EntryFormat`] for the generic
//! page tables, beside EPT's), root and context entries, invalidation
//! descriptors, interrupt-remapping table entries, and fault records.

use crate::mm::paging::{Attrs, EntryFormat, MemType, PageTable, Perms};

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
/// PS: a 2 MiB or 1 GiB leaf.
const LARGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Second-level paging entries, legacy mode (VT-d 9.8). Only R, W, PS and
/// the address are set: execute, memory type, snoop and transient-mapping
/// bits are reserved or ignored in legacy mode, and a unit faults on
/// reserved bits. An entry with neither R nor W is not present.
pub enum VtdFormat {}

impl EntryFormat for VtdFormat {
    fn is_present(entry: u64) -> bool {
        entry & (READ | WRITE) != 0
    }

    fn is_large(entry: u64) -> bool {
        entry & LARGE != 0
    }

    fn address(entry: u64) -> u64 {
        entry & ADDRESS_MASK
    }

    fn table(address: u64) -> u64 {
        (address & ADDRESS_MASK) | READ | WRITE
    }

    fn leaf(address: u64, attrs: Attrs, level: u8) -> u64 {
        let mut entry = address & ADDRESS_MASK;
        if attrs.perms.contains(Perms::READ) {
            entry |= READ;
        }
        if attrs.perms.contains(Perms::WRITE) {
            entry |= WRITE;
        }
        if level > 0 {
            entry |= LARGE;
        }
        entry
    }

    fn attrs(entry: u64) -> Attrs {
        let mut perms = Perms::empty();
        perms.set(Perms::READ, entry & READ != 0);
        perms.set(Perms::WRITE, entry & WRITE != 0);
        // Devices' accesses snoop the caches: there is no memory type to keep.
        Attrs::new(perms, MemType::WriteBack)
    }
}

/// A hierarchy of second-level tables: what devices see.
pub type SlTable = PageTable<VtdFormat>;

/// A present root entry (low quadword) pointing to a context table.
pub const fn root_entry(context_table: u64) -> u64 {
    (context_table & ADDRESS_MASK) | 1
}

/// A legacy context entry: (low, high) quadwords. Translation type 00:
/// untranslated requests go through the second-level tables, requests that
/// claim to be translated (ATS) are blocked. `levels` is 3 or 4.
pub const fn context_entry(sl_root: u64, levels: u8, domain: u16) -> (u64, u64) {
    let low = (sl_root & ADDRESS_MASK) | 1;
    let aw = (levels as u64).saturating_sub(2);
    (low, aw | ((domain as u64) << 8))
}

/// Invalidation-queue descriptors (VT-d 6.5.2), each (low, high).
pub mod descriptor {
    const CONTEXT: u64 = 0x1;
    const IOTLB: u64 = 0x2;
    const INTERRUPT_ENTRY: u64 = 0x4;
    const WAIT: u64 = 0x5;
    const GLOBAL: u64 = 1 << 4;
    const DOMAIN: u64 = 2 << 4;
    const PAGE: u64 = 3 << 4;
    /// Drain reads and writes before the invalidation completes.
    const DRAIN: u64 = (1 << 7) | (1 << 6);

    pub const fn context_global() -> (u64, u64) {
        (CONTEXT | GLOBAL, 0)
    }

    pub const fn iotlb_global() -> (u64, u64) {
        (IOTLB | GLOBAL | DRAIN, 0)
    }

    pub const fn iotlb_domain(domain: u16) -> (u64, u64) {
        (IOTLB | DOMAIN | DRAIN | ((domain as u64) << 16), 0)
    }

    /// One 4 KiB page (address mask 0) of one domain.
    pub const fn iotlb_page(domain: u16, address: u64) -> (u64, u64) {
        (IOTLB | PAGE | DRAIN | ((domain as u64) << 16), address & !0xfff)
    }

    pub const fn interrupt_entries_global() -> (u64, u64) {
        (INTERRUPT_ENTRY, 0)
    }

    /// Completes after every earlier descriptor (fence), writing `data`
    /// to the 4-byte-aligned `status` address.
    pub const fn wait(status: u64, data: u32) -> (u64, u64) {
        (WAIT | (1 << 5) | (1 << 6) | ((data as u64) << 32), status & !3)
    }
}

/// How an interrupt-remapping entry delivers (VT-d 9.10, DLM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Fixed,
    LowestPriority,
}

/// Why an interrupt-remapping entry was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrteError {
    /// Vectors 0-31 are the processor's exceptions (and the hypervisor's
    /// own handlers): a device must never raise them.
    ExceptionVector(u8),
}

/// A present, remapped-format interrupt-remapping table entry: `vector`
/// to the xAPIC `destination`, physical destination mode, edge-triggered,
/// and only for requests from `source_id` (SVT 01, all 16 bits compared).
/// There is no way to build an NMI, SMI, INIT or ExtINT entry, nor one with
/// an exception vector.
pub fn irte(vector: u8, destination: u8, delivery: Delivery, source_id: u16) -> Result<(u64, u64), IrteError> {
    if vector < 32 {
        return Err(IrteError::ExceptionVector(vector));
    }
    let dlm: u64 = match delivery {
        Delivery::Fixed => 0,
        Delivery::LowestPriority => 1,
    };
    let low = 1 | (dlm << 5) | (u64::from(vector) << 16) | (u64::from(destination) << 40);
    let high = u64::from(source_id) | (1 << 18);
    Ok((low, high))
}

/// One primary fault record (VT-d 10.4.14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Requester: bus << 8 | device << 3 | function.
    pub source_id: u16,
    /// The page the request addressed (DMA) or the interrupt index << 48.
    pub address: u64,
    pub reason: u8,
    pub access: FaultAccess,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAccess {
    Read,
    Write,
    /// An interrupt request (fault reasons 0x20 and above).
    Interrupt,
}

impl Fault {
    /// Decodes a record's two quadwords; `None` when its F bit is clear.
    pub fn decode(low: u64, high: u64) -> Option<Fault> {
        if high & (1 << 63) == 0 {
            return None;
        }
        let reason = (high >> 32) as u8;
        let access = if reason >= 0x20 {
            FaultAccess::Interrupt
        } else if high & (1 << 62) != 0 {
            FaultAccess::Read
        } else {
            FaultAccess::Write
        };
        Some(Fault { source_id: high as u16, address: low & !0xfff, reason, access })
    }

    /// bus:device.function of the requester.
    pub fn device(&self) -> (u8, u8, u8) {
        ((self.source_id >> 8) as u8, ((self.source_id >> 3) & 31) as u8, (self.source_id & 7) as u8)
    }

    /// What the fault reason means (VT-d appendix A), in a few words.
    pub fn reason_text(&self) -> &'static str {
        match self.reason {
            0x1 => "root entry not present",
            0x2 => "context entry not present",
            0x3 => "invalid context entry",
            0x4 => "address beyond the address width",
            0x5 => "write to a page without write rights",
            0x6 => "read of a page without read rights",
            0x7 => "paging entry not present",
            0x8 => "root table unreadable",
            0x9 => "context table unreadable",
            0xa..=0xb => "reserved bits in a root or context entry",
            0xc => "reserved bits in a paging entry",
            0xd => "translated request blocked",
            0x20 => "interrupt index beyond the table",
            0x21 => "interrupt entry not present",
            0x22 => "interrupt table unreadable",
            0x23 => "reserved bits in an interrupt entry",
            0x25 => "compatibility-format interrupt blocked",
            0x26 => "interrupt from an unexpected source",
            _ => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::paging::host::HeapTables;
    use crate::mm::paging::{PageSize, Translation};

    #[test]
    fn entries_follow_the_specification() {
        let rw = Attrs::new(Perms::RWX, MemType::Uncacheable);
        // Execute and the memory type are not encoded: reserved bits stay clear.
        assert_eq!(VtdFormat::leaf(0x1234_5000, rw, 0), 0x1234_5003);
        assert_eq!(VtdFormat::leaf(0x4000_0000, Attrs::new(Perms::READ, MemType::WriteBack), 1), 0x4000_0081);
        assert_eq!(VtdFormat::table(0x9000), 0x9003);
        assert_eq!(VtdFormat::attrs(0x1003).perms, Perms::RW);
        assert!(!VtdFormat::is_present(0x5000 | LARGE));
        assert_eq!(root_entry(0x7000), 0x7001);
        assert_eq!(context_entry(0x8000, 3, 1), (0x8001, 1 | (1 << 8)));
        assert_eq!(context_entry(0x8000, 4, 0x1234), (0x8001, 2 | (0x1234 << 8)));
    }

    #[test]
    fn descriptors_follow_the_specification() {
        assert_eq!(descriptor::context_global(), (0x11, 0));
        assert_eq!(descriptor::iotlb_global(), (0xd2, 0));
        assert_eq!(descriptor::iotlb_page(1, 0x1234_5678), (0xf2 | (1 << 16), 0x1234_5000));
        assert_eq!(descriptor::wait(0x9004, 7), (0x65 | (7 << 32), 0x9004));
        assert_eq!(descriptor::interrupt_entries_global(), (0x4, 0));
    }

    #[test]
    fn interrupt_entries_cannot_raise_exception_vectors_or_special_deliveries() {
        for v in 0..32 {
            assert_eq!(irte(v, 0, Delivery::Fixed, 0x18), Err(IrteError::ExceptionVector(v)));
        }
        let (low, high) = irte(0x40, 3, Delivery::Fixed, 0x18).unwrap();
        assert_eq!(low & 1, 1, "present");
        assert_eq!((low >> 5) & 7, 0, "fixed delivery");
        assert_eq!((low >> 16) & 0xff, 0x40);
        assert_eq!((low >> 40) & 0xff, 3);
        assert_eq!(low & (1 << 15), 0, "remapped, not posted");
        assert_eq!(high, 0x18 | (1 << 18), "source validated");
        // Only fixed (000) and lowest priority (001) can be encoded.
        let (low, _) = irte(0xff, 0, Delivery::LowestPriority, 0).unwrap();
        assert_eq!((low >> 5) & 7, 1);
    }

    #[test]
    fn fault_records_decode() {
        // A write by 00:03.0 to 0x200000, reason 5.
        let f = Fault::decode(0x20_0123, (1 << 63) | (5 << 32) | 0x18).unwrap();
        assert_eq!((f.source_id, f.address, f.reason, f.access), (0x18, 0x20_0000, 5, FaultAccess::Write));
        assert_eq!(f.device(), (0, 3, 0));
        let f = Fault::decode(0x1000, (1 << 63) | (1 << 62) | (6 << 32) | 0x0108).unwrap();
        assert_eq!((f.access, f.device()), (FaultAccess::Read, (1, 1, 0)));
        assert_eq!(Fault::decode(0x1000, 5 << 32), None, "F clear: no fault");
        let f = Fault::decode(0, (1 << 63) | (0x25 << 32)).unwrap();
        assert_eq!(f.access, FaultAccess::Interrupt);
    }

    /// The same generic code builds device tables: 3 and 4 levels, large
    /// pages, protect and unmap.
    #[test]
    fn second_level_tables_are_built_by_the_generic_page_tables() {
        for levels in [3, 4] {
            let mut mem = HeapTables::default();
            let mut t = SlTable::with_levels(&mut mem, PageSize::Size2M, levels).unwrap();
            let _ = t.map(&mut mem, 0, 0, 4 << 20, Attrs::new(Perms::RW, MemType::WriteBack)).unwrap();
            let _ = t.protect(&mut mem, 0x20_1000, 0x1000, Perms::READ).unwrap();
            let _ = t.unmap(&mut mem, 0x30_0000, 0x1000).unwrap();
            let at = |a| t.translate(&mem, a);
            assert_eq!(at(0x20_1000).map(|t: Translation| t.attrs.perms), Some(Perms::READ));
            assert_eq!(at(0x20_2000).map(|t| t.attrs.perms), Some(Perms::RW));
            assert_eq!(at(0x30_0000), None);
            assert_eq!(at(0x20_0000).unwrap().size, PageSize::Size4K);
            assert_eq!(at(0x0).unwrap().size, PageSize::Size2M);
            assert_eq!(t.levels(), levels);
            if levels == 3 {
                // 39 bits: an address at 512 GiB is outside.
                assert!(t.map(&mut mem, 1 << 39, 0, 0x1000, Attrs::new(Perms::RW, MemType::WriteBack)).is_err());
            }
            t.destroy(&mut mem);
            assert_eq!(mem.live(), 0);
        }
    }
}
