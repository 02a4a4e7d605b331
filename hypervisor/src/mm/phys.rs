//! Physical memory on bare metal: the frame allocator shared by the whole
//! hypervisor, and access to frames through the identity mapping.

use spin::Mutex;

use super::frames::{FrameAllocator, PAGE_SIZE};
use super::paging::TableMemory;
use crate::guest::memory::HostPhys;

/// Regions the allocator can track; the boot memory map is far smaller.
pub const REGIONS: usize = 128;

static FRAMES: Mutex<Option<FrameAllocator<REGIONS>>> = Mutex::new(None);

pub fn install(allocator: FrameAllocator<REGIONS>) {
    *FRAMES.lock() = Some(allocator);
}

/// Allocates zeroed, identity-mapped frames.
pub fn alloc_zeroed(bytes: u64, align: u64) -> Option<u64> {
    let addr = FRAMES.lock().as_mut()?.allocate(bytes, align)?;
    let len = bytes.next_multiple_of(PAGE_SIZE);
    // SAFETY: the frames were just taken from the free pool, so nothing else
    // uses them, and all RAM the allocator hands out is identity mapped.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len as usize) };
    Some(addr)
}

pub fn free(addr: u64, bytes: u64) {
    if let Some(frames) = FRAMES.lock().as_mut() {
        if frames.deallocate(addr, bytes).is_err() {
            log::warn!("frame pool too fragmented: {bytes:#x} bytes at {addr:#x} are not reused");
        }
    }
}

/// (free, total) bytes.
pub fn usage() -> (u64, u64) {
    FRAMES.lock().as_ref().map_or((0, 0), |f| (f.free_bytes(), f.total_bytes()))
}

/// Host-physical memory through the identity mapping.
pub struct Identity;

impl HostPhys for Identity {
    fn read(&self, hpa: u64, buf: &mut [u8]) {
        // SAFETY: callers only pass ranges of guest RAM or hypervisor frames,
        // which the hypervisor owns and maps one to one.
        unsafe { core::ptr::copy_nonoverlapping(hpa as *const u8, buf.as_mut_ptr(), buf.len()) };
    }

    fn write(&self, hpa: u64, data: &[u8]) {
        // SAFETY: as above.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), hpa as *mut u8, data.len()) };
    }

    fn compare_exchange_u64(&self, hpa: u64, current: u64, new: u64) -> bool {
        if !hpa.is_multiple_of(8) {
            return false;
        }
        // SAFETY: an aligned u64 of guest RAM, identity mapped (as above);
        // the guest may change it concurrently, hence the atomic access.
        let word = unsafe { core::sync::atomic::AtomicU64::from_ptr(hpa as *mut u64) };
        word.compare_exchange(current, new, core::sync::atomic::Ordering::SeqCst, core::sync::atomic::Ordering::SeqCst)
            .is_ok()
    }
}

/// Page-table frames from the shared allocator.
pub struct Tables;

impl TableMemory for Tables {
    fn alloc_table(&mut self) -> Option<u64> {
        alloc_zeroed(PAGE_SIZE, PAGE_SIZE)
    }

    fn free_table(&mut self, table: u64) {
        free(table, PAGE_SIZE);
    }

    fn read(&self, table: u64, index: usize) -> u64 {
        // SAFETY: `table` is a page-table frame this allocator handed out, and index < 512.
        unsafe { core::ptr::read_volatile((table as *const u64).add(index & 511)) }
    }

    fn write(&mut self, table: u64, index: usize, entry: u64) {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile((table as *mut u64).add(index & 511), entry) };
    }
}
