//! Fakes of what surrounds the generic code on bare metal (the VMX layer's
//! views, the host CPU, a vCPU, host memory) and a small guest, for the
//! fuzz harness (`fuzz/fuzz_targets/harness`) and its stable smoke test.
//! The unit tests use the same fakes from where they are defined.
//!
//! Built only with the `testing` feature (or in this crate's unit tests):
//! the bare-metal image never contains it.

pub use crate::exits::testing::FakeHost;
pub use crate::guest::memory::fake::FakePhys;
pub use crate::guest::test_guest;
pub use crate::integrity::control::fake::FakeControl;
pub use crate::mm::paging::host::HeapTables;
pub use crate::platform::vtd::model::{ModelUnit, Shared, QEMU_CAP, QEMU_ECAP};
pub use crate::vcpu::fake::FakeVcpu;
