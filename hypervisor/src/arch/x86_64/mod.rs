//! x86-64 and VT-x. The modules behind `cfg(target_os = "none")` execute
//! privileged instructions; the rest are pure formats and logic.
pub mod vmx;

#[cfg(target_os = "none")]
pub mod ap;
#[cfg(target_os = "none")]
pub mod cpu;
#[cfg(target_os = "none")]
pub mod entropy;
#[cfg(target_os = "none")]
pub mod gdt;
#[cfg(target_os = "none")]
pub mod iommu;
#[cfg(target_os = "none")]
pub mod lapic;
#[cfg(target_os = "none")]
pub mod mmio;
#[cfg(target_os = "none")]
pub mod park;
#[cfg(target_os = "none")]
pub mod percpu;
#[cfg(target_os = "none")]
pub mod platform;
#[cfg(target_os = "none")]
pub mod power;
#[cfg(target_os = "none")]
pub mod serial;
#[cfg(all(target_os = "none", feature = "test-hooks"))]
pub mod testing;
#[cfg(target_os = "none")]
pub mod timer;
#[cfg(target_os = "none")]
pub mod traps;
