//! Physical memory and page tables.
pub mod frames;
pub mod paging;
