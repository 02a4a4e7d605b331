//! CTVM, a type-1 micro-hypervisor for Intel VT-x.
//!
//! The library holds everything that can be reasoned about and tested on the
//! host: memory bookkeeping, the generic page tables, VMX capability logic,
//! guest configuration and loading, exit handling and device models. The
//! code that executes privileged instructions lives in [`arch`] behind
//! `cfg(target_os = "none")`, and the bare-metal entry point in `main.rs`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod arch;
pub mod boot_info;
pub mod console;
pub mod devices;
pub mod exits;
pub mod guest;
pub mod integrity;
pub mod mm;
pub mod mmio;
pub mod pci;
pub mod platform;
pub mod smp;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tpm;
pub mod vcpu;
#[cfg(target_os = "none")]
pub mod vmm;
