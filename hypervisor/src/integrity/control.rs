//! What the integrity code asks of the VMX layer: switch EPT views, change a
//! page's rights in a view, single-step, and trap the registers that could
//! turn the protection off. The bare-metal VM implements it; host tests use
//! [`fake::FakeControl`].

use super::View;
use crate::mm::paging::Perms;

/// A view operation that could not be done (out of memory for tables, or
/// an unknown view).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlError;

pub trait GuestControl {
    /// Makes `view` the EPT the vCPU runs on. In a module's view every
    /// interrupt, NMI and exception exits (and the hypervisor delivers it
    /// in the kernel view): no event leaves a module unseen, and no jump
    /// into a handler passes for one. It also makes its MOV to CR3 exit.
    fn activate_view(&mut self, view: View) -> Result<(), ControlError>;
    /// An exit as soon as the guest can take an interrupt (to deliver one
    /// held back while it could not).
    fn set_interrupt_window(&mut self, on: bool);
    /// Sets a 4 KiB page's rights in a view (identity-mapped, with the
    /// kernel view's memory type); empty rights unmap it.
    fn set_perms(&mut self, view: View, page: u64, perms: Perms) -> Result<(), ControlError>;
    /// A page's rights in a view (`None`: not mapped).
    fn perms(&self, view: View, page: u64) -> Option<Perms>;
    /// A new, empty view for a module.
    fn create_view(&mut self, module: u32) -> Result<(), ControlError>;
    fn destroy_view(&mut self, module: u32);
    /// Whether the processor has the monitor trap flag (Bochs has not).
    fn has_monitor_trap(&self) -> bool;
    /// The monitor trap flag: an exit after the next instruction.
    fn set_monitor_trap(&mut self, on: bool);
    /// Whether #DB exits (the single-step fallback without the monitor trap flag).
    fn intercept_debug_exceptions(&mut self, on: bool);
    /// From now on, guest writes that change these CR0/CR4 bits exit.
    fn guard_control_registers(&mut self, cr0: u64, cr4: u64);
    /// LGDT/LIDT/SGDT/SIDT (and the LDTR/TR ones) exit.
    fn trap_descriptor_tables(&mut self);
    /// Writes to these MSRs exit (pass-through guests).
    fn trap_msr_writes(&mut self, msrs: &[u32]);
    /// No other vCPU of the guest runs from now until this one is back in
    /// the kernel view with nothing opened: a step's guard must see only
    /// this vCPU's write (the kernel on another CPU may write beside it).
    fn run_alone(&mut self);
}

#[cfg(any(test, feature = "testing"))]
pub mod fake {
    use super::*;
    use alloc::collections::{BTreeMap, BTreeSet};
    use alloc::vec::Vec;

    /// Records every request; the kernel view starts with every page RWX.
    /// Comparable, so that a test can tell whether a request changed anything.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct FakeControl {
        pub active: Option<View>,
        pub perms: BTreeMap<(View, u64), Perms>,
        pub views: BTreeSet<u32>,
        pub monitor_trap: bool,
        /// Pretend the processor lacks the monitor trap flag.
        pub no_monitor_trap: bool,
        pub debug_exits: bool,
        pub guarded: (u64, u64),
        pub descriptor_tables: bool,
        pub trapped_msrs: Vec<u32>,
        /// Events exit (a module's view is active).
        pub events_exit: bool,
        pub interrupt_window: bool,
        /// No other vCPU runs (see [`GuestControl::run_alone`]).
        pub alone: bool,
    }

    impl GuestControl for FakeControl {
        fn activate_view(&mut self, view: View) -> Result<(), ControlError> {
            if let View::Module(m) = view {
                if !self.views.contains(&m) {
                    return Err(ControlError);
                }
            }
            self.active = Some(view);
            self.events_exit = matches!(view, View::Module(_));
            Ok(())
        }
        fn set_interrupt_window(&mut self, on: bool) {
            self.interrupt_window = on;
        }
        fn set_perms(&mut self, view: View, page: u64, perms: Perms) -> Result<(), ControlError> {
            self.perms.insert((view, page), perms);
            Ok(())
        }
        fn perms(&self, view: View, page: u64) -> Option<Perms> {
            match (self.perms.get(&(view, page)), view) {
                (Some(p), _) if p.is_empty() => None,
                (Some(p), _) => Some(*p),
                (None, View::Kernel) => Some(Perms::RWX),
                (None, View::Module(_)) => None,
            }
        }
        fn create_view(&mut self, module: u32) -> Result<(), ControlError> {
            self.views.insert(module);
            Ok(())
        }
        fn destroy_view(&mut self, module: u32) {
            self.views.remove(&module);
            self.perms.retain(|(v, _), _| *v != View::Module(module));
        }
        fn has_monitor_trap(&self) -> bool {
            !self.no_monitor_trap
        }
        fn set_monitor_trap(&mut self, on: bool) {
            self.monitor_trap = on;
        }
        fn intercept_debug_exceptions(&mut self, on: bool) {
            self.debug_exits = on;
        }
        fn guard_control_registers(&mut self, cr0: u64, cr4: u64) {
            self.guarded = (cr0, cr4);
        }
        fn trap_descriptor_tables(&mut self) {
            self.descriptor_tables = true;
        }
        fn trap_msr_writes(&mut self, msrs: &[u32]) {
            self.trapped_msrs.extend_from_slice(msrs);
        }
        fn run_alone(&mut self) {
            self.alone = true;
        }
    }
}
