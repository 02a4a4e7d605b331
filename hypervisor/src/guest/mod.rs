//! A guest as the generic code sees it: configuration, memory, devices,
//! emulated registers and counters. The VMX side (VMCS, EPT, run loop)
//! wraps it in the bare-metal binary.

pub mod boot64;
pub mod config;
pub mod linux;
pub mod loader;
pub mod memory;

use alloc::boxed::Box;

use crate::devices::uart::Uart;
use crate::exits::{ExitStats, StopReason};
use config::GuestConfig;
use memory::GuestMemory;

/// Guest values of the MSRs that live in hardware registers (not in the
/// VMCS) and that the hypervisor itself never uses. Written through to the
/// hardware when the guest runs; kept here for switching guests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsrShadow {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub tsc_aux: u64,
}

/// What the guest's CR0/CR4 must and may hold on this processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrLimits {
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub unrestricted: bool,
}

/// Ports logged once per guest: 64 Ki bits.
pub struct PortLog(Box<[u64; 1024]>);

impl Default for PortLog {
    fn default() -> Self {
        PortLog(Box::new([0; 1024]))
    }
}

impl PortLog {
    /// True the first time a port is seen.
    pub fn first_time(&mut self, port: u16) -> bool {
        let (word, bit) = (usize::from(port) / 64, port % 64);
        let fresh = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        fresh
    }
}

/// Which devices a guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// Emulated devices only: every port and MSR access exits.
    Emulated,
    /// The machine's own devices, memory identity-mapped: only the ports and
    /// MSRs the hypervisor must guard exit. `pm1a_control` is the ACPI port
    /// whose sleep-enable bit powers the machine off.
    PassThrough { pm1a_control: Option<u16> },
}

impl Platform {
    pub fn is_pass_through(self) -> bool {
        matches!(self, Platform::PassThrough { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Runnable,
    Stopped(StopReason),
}

pub struct Guest {
    pub config: GuestConfig,
    pub platform: Platform,
    pub memory: GuestMemory,
    pub uart: Uart,
    pub ports_logged: PortLog,
    pub msrs: MsrShadow,
    pub xcr0: u64,
    pub cr_limits: CrLimits,
    pub capabilities: u64,
    pub exits: ExitStats,
    pub state: RunState,
}

impl Guest {
    pub fn new(config: GuestConfig, platform: Platform, memory: GuestMemory, cr_limits: CrLimits) -> Self {
        Guest {
            config,
            platform,
            memory,
            uart: Uart::default(),
            ports_logged: PortLog::default(),
            msrs: MsrShadow::default(),
            xcr0: 1,
            cr_limits,
            capabilities: guest_agent::Capabilities::SHUTDOWN,
            exits: ExitStats::default(),
            state: RunState::Runnable,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn is_running(&self) -> bool {
        self.state == RunState::Runnable
    }
}

/// A guest for the exit handlers' host tests.
#[cfg(test)]
pub fn test_guest() -> Guest {
    let config = config::parse("guest=t mem=16M").unwrap();
    let mut memory = GuestMemory::new();
    memory.add(crate::mm::frames::Region::new(0, 16 << 20), 0x1000_0000).unwrap();
    let limits = CrLimits {
        cr0_fixed0: 0x8000_0021,
        cr0_fixed1: 0xffff_ffff,
        cr4_fixed0: 0x2000,
        cr4_fixed1: 0x0037_67ff,
        unrestricted: true,
    };
    Guest::new(config, Platform::Emulated, memory, limits)
}
