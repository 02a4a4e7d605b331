//! A guest as the generic code sees it: configuration, memory, devices,
//! emulated registers and counters. The VMX side (VMCS, EPT, run loop)
//! wraps it in the bare-metal binary.

pub mod access;
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

/// What each vCPU keeps of its own among the state the exit handlers use.
/// A guest's exits are handled one at a time (under its lock); the vCPU
/// whose exit it is swaps its own in for the time of the handling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuLocal {
    pub msrs: MsrShadow,
    pub xcr0: u64,
    pub integrity: crate::integrity::VcpuIntegrity,
}

impl Default for VcpuLocal {
    fn default() -> Self {
        // XCR0 after reset: x87 only.
        VcpuLocal { msrs: MsrShadow::default(), xcr0: 1, integrity: Default::default() }
    }
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

/// A set of I/O ports (or of MSR numbers' low 16 bits): 64 Ki bits.
#[derive(Clone)]
pub struct PortSet(Box<[u64; 1024]>);

impl Default for PortSet {
    fn default() -> Self {
        PortSet(Box::new([0; 1024]))
    }
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    pub fn insert(&mut self, port: u16) {
        self.0[usize::from(port) / 64] |= 1 << (port % 64);
    }

    /// True the first time a port is seen.
    pub fn first_time(&mut self, port: u16) -> bool {
        let fresh = !self.contains(port);
        self.insert(port);
        fresh
    }
}

/// MSRs logged once per guest.
#[derive(Default)]
pub struct MsrLog(alloc::collections::BTreeSet<u32>);

impl MsrLog {
    /// True the first time an MSR is seen (at most 1024 are remembered:
    /// past that, nothing more is logged).
    pub fn first_time(&mut self, msr: u32) -> bool {
        self.0.len() < 1024 && self.0.insert(msr)
    }
}

/// Attempts refused outside the integrity log (user space's, or a guest's
/// without integrity views), counted per kind.
#[derive(Clone, Debug, Default)]
pub struct Refusals {
    counts: alloc::collections::BTreeMap<u32, u64>,
}

impl Refusals {
    /// Counts one; returns how many of this kind there have been.
    pub fn count(&mut self, kind: crate::integrity::ViolationKind) -> u64 {
        let n = self.counts.entry(kind as u32).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// (kind, count) for every kind seen.
    pub fn seen(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        use crate::integrity::ViolationKind;
        self.counts.iter().filter_map(|(&k, &n)| {
            let kind = ViolationKind::ALL.get((k as usize).checked_sub(1)?)?;
            Some((kind.name(), n))
        })
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
    PassThrough {
        pm1a_control: Option<u16>,
        /// The page of the local APIC (xAPIC mode), mapped read-only: its
        /// writes are emulated, so that no INIT or start-up IPI leaves.
        lapic: Option<u64>,
    },
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
    /// COM1 of a pass-through guest: the real chip's receiver, the
    /// hypervisor's transmitter.
    pub serial: crate::devices::uart::SerialFront,
    /// The ports a pass-through guest reaches (the allow-list of
    /// [`crate::exits::io::LEGACY_PASS`], ACPI's and PCI's).
    pub ports_passed: PortSet,
    pub ports_logged: PortSet,
    pub msrs_logged: MsrLog,
    pub msrs: MsrShadow,
    pub xcr0: u64,
    pub cr_limits: CrLimits,
    /// IA32_PERF_GLOBAL_CTRL is the VMCS's (loaded on entry, 0 on exit):
    /// the guest may enable counters. Without it, it may not.
    pub perf_switched: bool,
    pub capabilities: u64,
    pub exits: ExitStats,
    /// Attempts refused outside the integrity log.
    pub refusals: Refusals,
    pub state: RunState,
    /// The guest's virtual TPM, if it has one.
    pub vtpm: Option<crate::tpm::GuestTpm>,
    /// Run-time kernel integrity, for guests whose agent reports to us.
    pub integrity: Option<crate::integrity::GuestIntegrity>,
    /// Its CPUs as its IPIs address them, and the IPIs for them.
    pub cpus: crate::exits::apic::GuestCpus,
}

impl Guest {
    pub fn new(config: GuestConfig, platform: Platform, memory: GuestMemory, cr_limits: CrLimits) -> Self {
        Guest {
            config,
            platform,
            memory,
            uart: Uart::default(),
            serial: Default::default(),
            ports_passed: PortSet::default(),
            ports_logged: PortSet::default(),
            msrs_logged: MsrLog::default(),
            msrs: MsrShadow::default(),
            xcr0: 1,
            cr_limits,
            perf_switched: false,
            capabilities: guest_agent::Capabilities::SHUTDOWN,
            exits: ExitStats::default(),
            refusals: Refusals::default(),
            state: RunState::Runnable,
            vtpm: None,
            integrity: None,
            cpus: crate::exits::apic::GuestCpus::new(alloc::vec![0], false),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn is_running(&self) -> bool {
        self.state == RunState::Runnable
    }

    /// Swaps a vCPU's own state in (before its exit is handled) or back out.
    pub fn swap_local(&mut self, local: &mut VcpuLocal) {
        core::mem::swap(&mut self.msrs, &mut local.msrs);
        core::mem::swap(&mut self.xcr0, &mut local.xcr0);
        if let Some(integrity) = self.integrity.as_mut() {
            integrity.swap_local(&mut local.integrity);
        }
    }
}

/// A guest for the exit handlers' host tests.
#[cfg(any(test, feature = "testing"))]
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
