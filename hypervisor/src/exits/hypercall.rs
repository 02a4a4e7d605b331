//! VMCALL: decoding and validating a hypercall, then serving it.

use guest_agent::{Call, Error, Registers, ABI_VERSION};

use super::{integrity, Action, ExitContext, StopReason};
use crate::integrity::{View, ViolationKind};
use crate::vcpu::skip_instruction;

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Version,
    Shutdown { code: u32 },
    KernelRegister { layout: u64 },
    KernelLock { agent: u64 },
    ModuleRegister { info: u64 },
    ModuleLive { id: u32 },
    ModuleUnregister { id: u32 },
    ViolationsRead { buffer: u64, count: u32 },
    StackNew { base: u64 },
    EventLogRead { buffer: u64, size: u32, offset: u32 },
    VtpmStoreFetch { buffer: u64, size: u32 },
    VtpmStoreDone { version: u64 },
}

/// Largest event-log read.
pub const MAX_LOG_READ: u64 = 64 * 1024;

/// At most this many violation records per read.
pub const MAX_RECORDS_PER_READ: u32 = 1024;

/// A guest pointer to a kernel structure: in the kernel half, not wrapping.
fn kernel_pointer(addr: u64, size: u64) -> Result<u64, Error> {
    let end = addr.checked_add(size).ok_or(Error::BadAddress)?;
    if addr < 0xffff_8000_0000_0000 || end < addr {
        return Err(Error::BadAddress);
    }
    Ok(addr)
}

fn structure(regs: &Registers, size: usize) -> Result<u64, Error> {
    if regs.rcx != size as u64 {
        return Err(Error::InvalidArgument);
    }
    kernel_pointer(regs.rbx, regs.rcx)
}

/// Checks every argument; a bad call is refused with an error code and
/// changes nothing.
pub fn decode(regs: &Registers) -> Result<Request, Error> {
    use guest_agent::integrity::{KernelLayout, ModuleInfo, VIOLATION_RECORD_SIZE};
    let id = || u32::try_from(regs.rbx).map_err(|_| Error::InvalidArgument);
    match Call::from_raw(regs.rax).ok_or(Error::UnknownCall)? {
        Call::Version => Ok(Request::Version),
        Call::Shutdown => {
            let code = u32::try_from(regs.rbx).map_err(|_| Error::InvalidArgument)?;
            Ok(Request::Shutdown { code })
        }
        Call::KernelRegister => {
            Ok(Request::KernelRegister { layout: structure(regs, core::mem::size_of::<KernelLayout>())? })
        }
        Call::KernelLock => Ok(Request::KernelLock { agent: structure(regs, core::mem::size_of::<ModuleInfo>())? }),
        Call::ModuleRegister => {
            Ok(Request::ModuleRegister { info: structure(regs, core::mem::size_of::<ModuleInfo>())? })
        }
        Call::ModuleLive => Ok(Request::ModuleLive { id: id()? }),
        Call::ModuleUnregister => Ok(Request::ModuleUnregister { id: id()? }),
        Call::ViolationsRead => {
            let count = u32::try_from(regs.rcx).ok().filter(|c| (1..=MAX_RECORDS_PER_READ).contains(c));
            let count = count.ok_or(Error::InvalidArgument)?;
            let buffer = kernel_pointer(regs.rbx, u64::from(count) * VIOLATION_RECORD_SIZE as u64)?;
            Ok(Request::ViolationsRead { buffer, count })
        }
        Call::StackNew => {
            if regs.rbx & 0x3fff != 0 {
                return Err(Error::InvalidArgument);
            }
            Ok(Request::StackNew { base: kernel_pointer(regs.rbx, 0x4000)? })
        }
        Call::EventLogRead => {
            if regs.rcx > MAX_LOG_READ || regs.rdx > u64::from(u32::MAX) {
                return Err(Error::InvalidArgument);
            }
            regs.rbx.checked_add(regs.rcx).ok_or(Error::BadAddress)?;
            Ok(Request::EventLogRead { buffer: regs.rbx, size: regs.rcx as u32, offset: regs.rdx as u32 })
        }
        Call::VtpmStoreFetch => {
            let size = usize::try_from(regs.rcx).ok().filter(|&s| s <= guest_agent::vtpm_store::MAX_BLOB);
            let size = size.ok_or(Error::InvalidArgument)?;
            let buffer = kernel_pointer(regs.rbx, size as u64)?;
            Ok(Request::VtpmStoreFetch { buffer, size: size as u32 })
        }
        Call::VtpmStoreDone => Ok(Request::VtpmStoreDone { version: regs.rbx }),
    }
}

/// Hands the store service the durable vTPM's next blob: copied into the
/// kernel's buffer as the kernel may write it. Returns the blob's size (0
/// when nothing waits) and its version; a buffer too small gets NoSpace
/// and the size it needs.
fn vtpm_store_fetch(ctx: &mut ExitContext<'_>, buffer: u64, size: u32) -> Result<(u64, u64), (Error, u64)> {
    let vtpm = ctx.guest.vtpm.as_mut().ok_or((Error::NotPermitted, 0))?;
    let channel = vtpm.tis.backend_mut().store().ok_or((Error::NotPermitted, 0))?;
    let blob = match channel.fetch() {
        Ok(Some((version, blob))) => (version, alloc::vec::Vec::from(blob)),
        Ok(None) => return Ok((0, 0)),
        Err(e) => {
            log::error!("guest {}: vTPM store: {e:?}", ctx.guest.name());
            return Err((Error::NotFound, 0));
        }
    };
    let (version, bytes) = blob;
    if bytes.len() > size as usize {
        return Err((Error::NoSpace, bytes.len() as u64));
    }
    ctx.access().write(buffer, &bytes).map_err(|_| (Error::BadAddress, 0))?;
    Ok((bytes.len() as u64, version))
}

/// The store service wrote and synced `version`: the counter moves and the
/// held response (if this blob holds it) is released.
fn vtpm_store_done(ctx: &mut ExitContext<'_>, version: u64) -> Result<u64, Error> {
    let name = alloc::string::String::from(ctx.guest.name());
    let vtpm = ctx.guest.vtpm.as_mut().ok_or(Error::NotPermitted)?;
    let channel = vtpm.tis.backend_mut().store().ok_or(Error::NotPermitted)?;
    match channel.stored(version) {
        Ok(()) => Ok(0),
        Err(crate::tpm::durable::StoreError::Counter(e)) => {
            log::error!("guest {name}: vTPM state version {version} stored but the counter did not move: {}", e.0);
            Err(Error::Locked)
        }
        Err(_) => Err(Error::InvalidArgument),
    }
}

/// Copies part of the event log into the guest's buffer, as the kernel
/// that asked may write it; returns the log's size.
fn read_event_log(ctx: &mut ExitContext<'_>, buffer: u64, size: u32, offset: u32) -> Result<u64, Error> {
    let log = ctx.guest.vtpm.as_ref().ok_or(Error::NotPermitted)?.log.as_bytes();
    let total = log.len() as u64;
    let start = (offset as usize).min(log.len());
    let end = start.saturating_add(size as usize).min(log.len());
    ctx.access().write(buffer, &log[start..end]).map_err(|_| Error::BadAddress)?;
    Ok(total)
}

pub fn handle(ctx: &mut ExitContext<'_>) -> Action {
    let who = ctx.principal();
    let regs = ctx.vcpu.regs();
    let call = Registers { rax: regs.rax, rbx: regs.rbx, rcx: regs.rcx, rdx: regs.rdx, rsi: regs.rsi };
    // An isolated module may make no hypercall at all, not even one that
    // only reads: refused before anything is decoded, and reported. User
    // space may make none either.
    let result = match who.view {
        View::Module(_) => {
            integrity::refusal(ctx, ViolationKind::Hypercall, call.rax);
            Err(Error::NotPermitted)
        }
        View::Kernel if who.cpl != 0 => {
            integrity::refusal(ctx, ViolationKind::Hypercall, call.rax);
            Err(Error::NotPermitted)
        }
        View::Kernel => decode(&call),
    };
    let action = match result {
        Ok(Request::Version) => {
            let caps = ctx.guest.capabilities;
            let regs = ctx.vcpu.regs();
            regs.rax = 0;
            regs.rbx = u64::from(ABI_VERSION);
            regs.rcx = caps;
            Action::Resume
        }
        Ok(Request::Shutdown { code }) => return Action::Stop(StopReason::Shutdown { code }),
        Ok(Request::EventLogRead { buffer, size, offset }) => {
            let status = match read_event_log(ctx, buffer, size, offset) {
                Ok(total) => total,
                Err(e) => e.code() as u64,
            };
            ctx.vcpu.regs().rax = status;
            Action::Resume
        }
        // The store channel answers the kernel, and once the layout is
        // locked only the pinned agent (the store service's device lives in
        // it): a module loaded later cannot confirm a store that never
        // happened and so release a held response.
        Ok(Request::VtpmStoreFetch { .. } | Request::VtpmStoreDone { .. })
            if ctx.guest.integrity.is_some() && !integrity::from_agent(ctx) =>
        {
            integrity::refusal(ctx, ViolationKind::Hypercall, call.rax);
            ctx.vcpu.regs().rax = Error::NotPermitted.code() as u64;
            Action::Resume
        }
        Ok(Request::VtpmStoreFetch { buffer, size }) => {
            let (rax, rbx) = match vtpm_store_fetch(ctx, buffer, size) {
                Ok(r) => r,
                Err((e, needed)) => (e.code() as u64, needed),
            };
            let regs = ctx.vcpu.regs();
            regs.rax = rax;
            regs.rbx = rbx;
            Action::Resume
        }
        Ok(Request::VtpmStoreDone { version }) => {
            ctx.vcpu.regs().rax = vtpm_store_done(ctx, version).unwrap_or_else(|e| e.code() as u64);
            Action::Resume
        }
        // Once the layout is locked, only the pinned agent's code drives
        // the views and reads the violation log: a call from anywhere else
        // in the kernel is refused and reported.
        Ok(_) if !integrity::from_agent(ctx) => {
            integrity::refusal(ctx, ViolationKind::Hypercall, call.rax);
            ctx.vcpu.regs().rax = Error::NotPermitted.code() as u64;
            Action::Resume
        }
        Ok(Request::KernelLock { agent }) => match integrity::lock(ctx, agent) {
            Ok(status) => {
                ctx.vcpu.regs().rax = status;
                Action::Resume
            }
            Err(integrity::LockRefused::Call(e)) => {
                ctx.vcpu.regs().rax = e.code() as u64;
                Action::Resume
            }
            // Enforcement was asked for and cannot start: the guest stops
            // rather than run with modules nothing isolates.
            Err(integrity::LockRefused::Agent(why)) => {
                return Action::Stop(StopReason::IntegrityRefused(alloc::format!("the agent cannot be pinned: {why}")))
            }
        },
        Ok(request) => {
            let result = match request {
                Request::KernelRegister { layout } => integrity::register_kernel(ctx, layout),
                Request::ModuleRegister { info } => integrity::register_module(ctx, info),
                Request::ModuleLive { id } => integrity::module_live(ctx, id),
                Request::ModuleUnregister { id } => integrity::unregister_module(ctx, id),
                Request::ViolationsRead { buffer, count } => integrity::read_violations(ctx, buffer, count),
                Request::StackNew { base } => integrity::new_stack(ctx, base),
                Request::Version
                | Request::Shutdown { .. }
                | Request::EventLogRead { .. }
                | Request::VtpmStoreFetch { .. }
                | Request::VtpmStoreDone { .. }
                | Request::KernelLock { .. } => Err(Error::UnknownCall),
            };
            ctx.vcpu.regs().rax = result.unwrap_or_else(|e| e.code() as u64);
            Action::Resume
        }
        Err(e) => {
            ctx.vcpu.regs().rax = e.code() as u64;
            Action::Resume
        }
    };
    skip_instruction(ctx.vcpu, ctx.exit);
    action
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::reason;
    use crate::exits::testing::run;
    use crate::guest::test_guest;
    use crate::vcpu::fake::FakeVcpu;
    use crate::vcpu::{ExitInfo, Field, VcpuState};

    fn regs(rax: u64, rbx: u64) -> Registers {
        Registers { rax, rbx, ..Default::default() }
    }

    #[test]
    fn arguments_are_validated() {
        assert_eq!(decode(&regs(0, 0)), Ok(Request::Version));
        assert_eq!(decode(&regs(1, 42)), Ok(Request::Shutdown { code: 42 }));
        assert_eq!(decode(&regs(1, u64::from(u32::MAX))), Ok(Request::Shutdown { code: u32::MAX }));
        assert_eq!(decode(&regs(1, 1 << 32)), Err(Error::InvalidArgument));
        assert_eq!(decode(&regs(2, 0)), Err(Error::UnknownCall));
        // Structures: the size must match and the pointer be a kernel address.
        let size = core::mem::size_of::<guest_agent::integrity::KernelLayout>() as u64;
        let k = 0xffff_8880_0010_0000;
        let call = |rax, rbx, rcx| Registers { rax, rbx, rcx, ..Default::default() };
        assert_eq!(decode(&call(0x10, k, size)), Ok(Request::KernelRegister { layout: k }));
        assert_eq!(decode(&call(0x10, k, size - 1)), Err(Error::InvalidArgument));
        assert_eq!(decode(&call(0x10, 0x1000, size)), Err(Error::BadAddress));
        assert_eq!(decode(&call(0x10, u64::MAX - 8, size)), Err(Error::BadAddress));
        // A new task's stack: 16 KiB-aligned, in the kernel's half.
        assert_eq!(
            decode(&call(0x16, 0xffff_c900_0000_4000, 0)),
            Ok(Request::StackNew { base: 0xffff_c900_0000_4000 })
        );
        assert_eq!(decode(&call(0x16, 0xffff_c900_0000_5000, 0)), Err(Error::InvalidArgument));
        assert_eq!(decode(&call(0x16, 0x7fff_ffff_c000, 0)), Err(Error::BadAddress));
        assert_eq!(decode(&call(0x16, 0xffff_ffff_ffff_c000, 0)), Err(Error::BadAddress));
        assert_eq!(decode(&call(0x13, 7, 0)), Ok(Request::ModuleLive { id: 7 }));
        assert_eq!(decode(&call(0x14, 1 << 33, 0)), Err(Error::InvalidArgument));
        assert_eq!(decode(&call(0x15, k, 16)), Ok(Request::ViolationsRead { buffer: k, count: 16 }));
        assert_eq!(decode(&call(0x15, k, 0)), Err(Error::InvalidArgument));
        assert_eq!(decode(&call(0x15, k, 5000)), Err(Error::InvalidArgument));
        assert_eq!(decode(&regs(u64::MAX, 0)), Err(Error::UnknownCall));
    }

    fn call(rax: u64, rbx: u64, ss_dpl: u64) -> (Action, FakeVcpu) {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        v.regs.rax = rax;
        v.regs.rbx = rbx;
        v.write(Field::SsAccessRights, 0x93 | (ss_dpl << 5));
        let exit = ExitInfo { reason: reason::VMCALL, instruction_len: 3, ..Default::default() };
        let a = run(&mut g, &mut v, exit);
        (a, v)
    }

    #[test]
    fn version_returns_abi_and_capabilities() {
        let (a, v) = call(0, 0, 0);
        assert_eq!(a, Action::Resume);
        assert_eq!((v.regs.rax, v.regs.rbx), (0, u64::from(ABI_VERSION)));
        assert_ne!(v.regs.rcx & guest_agent::Capabilities::SHUTDOWN, 0);
        assert_eq!(v.read(Field::Rip), 0x10_0003);
    }

    #[test]
    fn shutdown_stops_with_the_exit_code() {
        assert_eq!(call(1, 7, 0).0, Action::Stop(StopReason::Shutdown { code: 7 }));
    }

    #[test]
    fn errors_come_back_in_rax_and_change_nothing_else() {
        let (a, v) = call(1, 1 << 40, 0);
        assert_eq!(a, Action::Resume);
        assert_eq!(v.regs.rax as i64, Error::InvalidArgument.code());
        assert_eq!(v.regs.rbx, 1 << 40);
        let (_, v) = call(77, 0, 0);
        assert_eq!(v.regs.rax as i64, Error::UnknownCall.code());
    }

    #[test]
    fn the_event_log_needs_a_vtpm_and_a_valid_buffer() {
        let mut g = test_guest();
        let mut v = FakeVcpu::new();
        v.regs.rax = 0x20;
        v.regs.rbx = 0x8000;
        v.regs.rcx = 64;
        let exit = ExitInfo { reason: reason::VMCALL, instruction_len: 3, ..Default::default() };
        run(&mut g, &mut v, exit);
        assert_eq!(v.regs.rax as i64, Error::NotPermitted.code());
        // With a vTPM but no guest page tables, the buffer does not translate.
        let mut vtpm = crate::tpm::GuestTpm::new(alloc::boxed::Box::new(crate::tpm::fake::FakeTpm::default()));
        let event = crate::tpm::event_log::Event { pcr: 9, kind: 0xd, digest: [1; 20], data: alloc::vec![b'k'] };
        vtpm.log.push(&event).unwrap();
        g.vtpm = Some(vtpm);
        v.regs.rax = 0x20;
        v.write(Field::Cr0, 0x8000_0031);
        v.write(Field::Efer, 0x500);
        run(&mut g, &mut v, exit);
        assert_eq!(v.regs.rax as i64, Error::BadAddress.code());
        assert_eq!(decode(&Registers { rax: 0x20, rcx: 1 << 20, ..Default::default() }), Err(Error::InvalidArgument));
    }

    /// The store channel on a durable vTPM, through VMCALLs from a kernel
    /// whose page tables map K + x to guest-physical x.
    #[test]
    fn the_store_channel_hands_over_blobs_and_takes_only_true_reports() {
        use crate::exits::testing::FakeHost;
        use crate::guest::memory::fake::FakePhys;
        use crate::guest::memory::HostPhys;
        use crate::tpm::anchor::NoCounter;
        use crate::tpm::durable::DurableTpm;
        use vtpm_trust::blob::{self, StateKey};
        const K: u64 = 0xffff_ffff_8000_0000;
        const BUFFER: u64 = 0x20_0000;
        struct Counter(u8);
        impl vtpm_core::Platform for Counter {
            fn fill_random(&mut self, buf: &mut [u8]) {
                for b in buf {
                    self.0 = self.0.wrapping_add(7);
                    *b = self.0;
                }
            }
            fn ticks_us(&mut self) -> u64 {
                0
            }
        }
        let phys = FakePhys::new(0x1000_0000, 16 << 20);
        phys.write(0x1000_0000 + 0x1000 + 511 * 8, &(0x2000u64 | 3).to_le_bytes());
        phys.write(0x1000_0000 + 0x2000 + 510 * 8, &(0x3000u64 | 3).to_le_bytes());
        for i in 0..8u64 {
            phys.write(0x1000_0000 + 0x3000 + i * 8, &((i << 21) | 0x83).to_le_bytes());
        }
        let mut g = test_guest();
        let mut tpm = vtpm_core::Tpm::manufacture_without_ek(Counter(1));
        tpm.power_on();
        let key = StateKey::derive(&[4; 32]);
        let durable = DurableTpm::new(
            tpm,
            "t",
            key,
            alloc::boxed::Box::new(NoCounter),
            7,
            alloc::boxed::Box::new(|b: &mut [u8]| b.fill(9)),
        );
        g.vtpm = Some(crate::tpm::GuestTpm::new(alloc::boxed::Box::new(durable)));
        let mut v = FakeVcpu::new();
        v.write(Field::Cr0, 0x8000_0031);
        v.write(Field::Cr3, 0x1000);
        v.write(Field::Cr4, 0x20);
        v.write(Field::Efer, 0x500);
        v.write(Field::CsAccessRights, 0xa09b);
        let host = FakeHost::default();
        let call = |g: &mut crate::guest::Guest, v: &mut FakeVcpu, rax: u64, rbx: u64, rcx: u64| {
            v.regs.rax = rax;
            v.regs.rbx = rbx;
            v.regs.rcx = rcx;
            let exit = ExitInfo { reason: reason::VMCALL, instruction_len: 3, ..Default::default() };
            let mut ctx = ExitContext { guest: g, vcpu: v, exit: &exit, host: &host, phys: &phys, control: None };
            assert_eq!(crate::exits::dispatch(&mut ctx), Action::Resume);
            (v.regs.rax as i64, v.regs.rbx)
        };
        // A guest whose vTPM is not durable has no store channel.
        let durable = g.vtpm.take();
        g.vtpm = Some(crate::tpm::GuestTpm::new(alloc::boxed::Box::new(crate::tpm::fake::FakeTpm::default())));
        assert_eq!(call(&mut g, &mut v, 0x30, K + BUFFER, 4096).0, Error::NotPermitted.code());
        assert_eq!(call(&mut g, &mut v, 0x31, 9, 0).0, Error::NotPermitted.code());
        g.vtpm = durable;
        // A buffer the guest's page tables do not map: refused, nothing lost.
        assert_eq!(call(&mut g, &mut v, 0x30, 0xffff_8000_0000_0000, 4096).0, Error::BadAddress.code());
        // Too small: the size needed comes back.
        let (rax, needed) = call(&mut g, &mut v, 0x30, K + BUFFER, 16);
        assert_eq!(rax, Error::NoSpace.code());
        // The fence, above the counter, sealed for this guest.
        let (size, version) = call(&mut g, &mut v, 0x30, K + BUFFER, 4096);
        assert_eq!((size as u64, version), (needed, 9));
        let mut sealed = alloc::vec![0u8; size as usize];
        phys.read(0x1000_0000 + BUFFER, &mut sealed);
        assert_eq!(blob::open(&key_again(), "t", 9, &sealed).map(|o| o.version), Ok(9));
        // Reports of other versions are refused; the true one is taken once.
        for wrong in [0, 8, 10, u64::MAX] {
            assert_eq!(call(&mut g, &mut v, 0x31, wrong, 0).0, Error::InvalidArgument.code());
        }
        assert_eq!(call(&mut g, &mut v, 0x31, 9, 0).0, 0);
        assert_eq!(call(&mut g, &mut v, 0x31, 9, 0).0, Error::InvalidArgument.code());
        assert_eq!(call(&mut g, &mut v, 0x30, K + BUFFER, 4096), (0, 0), "nothing more to store");
        // From user space, nothing at all.
        v.write(Field::SsAccessRights, 0x93 | (3 << 5));
        assert_eq!(call(&mut g, &mut v, 0x30, K + BUFFER, 4096).0, Error::NotPermitted.code());
        fn key_again() -> StateKey {
            StateKey::derive(&[4; 32])
        }
    }

    #[test]
    fn user_mode_may_not_call() {
        let (a, v) = call(1, 0, 3);
        assert_eq!(a, Action::Resume);
        assert_eq!(v.regs.rax as i64, Error::NotPermitted.code());
    }
}
