//! Physical memory and page tables.
pub mod frames;
pub mod paging;
#[cfg(target_os = "none")]
pub mod phys;
