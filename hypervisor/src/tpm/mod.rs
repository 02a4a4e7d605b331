//! The trusted-boot side: the measured-launch event log (and, as it lands,
//! the per-guest vTPM glue).
pub mod event_log;
