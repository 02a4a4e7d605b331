//! A guest's virtual TPM as the hypervisor holds it: the TIS device in
//! front of a TPM engine, the measured-launch event log, and the launch
//! measurements themselves.
//!
//! The hypervisor talks to the engine with ordinary TPM commands through
//! [`TpmBackend`], as firmware would through a chip: `TPM_Startup` then one
//! `TPM_Extend` per measurement. Any backend that answers TPM 1.2 commands
//! works, and the host tests use a small fake.

pub mod anchor;
pub mod config_event;
pub mod durable;
pub mod engine;
pub mod event_log;
pub mod host;
pub mod persist;
pub mod setup;

use alloc::boxed::Box;
use alloc::vec::Vec;

use event_log::{event_type, pcr, Event, EventLog, LogFull};

use crate::devices::tis::{Tis, TpmBackend};

/// Bytes set aside for the event log (and its ACPI log area).
pub const LOG_AREA: usize = 16 * 1024;

/// The PCRs only CTVM extends in every guest's vTPM (bit n = PCR n): PCR
/// 11, the security configuration and the agent's lock. The guest may read
/// and quote them; its TPM_Extend of them is answered TPM_BAD_LOCALITY.
pub const PLATFORM_PCRS: u32 = 1 << pcr::CONFIG;

/// A guest's vTPM.
pub struct GuestTpm {
    pub tis: Tis<Box<dyn TpmBackend>>,
    pub log: EventLog,
}

/// Why a launch measurement failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeasureError {
    /// The TPM answered a command with this return code.
    Tpm {
        ordinal: u32,
        code: u32,
    },
    /// The TPM's answer was not a TPM response.
    Malformed {
        ordinal: u32,
    },
    LogFull,
}

impl From<LogFull> for MeasureError {
    fn from(_: LogFull) -> Self {
        MeasureError::LogFull
    }
}

const TAG_RQU_COMMAND: u16 = 0x00c1;
const ORD_EXTEND: u32 = 0x14;
const ORD_STARTUP: u32 = 0x99;
const ST_CLEAR: u16 = 1;
const TPM_INVALID_POSTINIT: u32 = 0x26;

fn command(ordinal: u32, params: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(10 + params.len());
    c.extend_from_slice(&TAG_RQU_COMMAND.to_be_bytes());
    c.extend_from_slice(&((10 + params.len()) as u32).to_be_bytes());
    c.extend_from_slice(&ordinal.to_be_bytes());
    c.extend_from_slice(params);
    c
}

/// Sends one command; returns the response parameters on success.
fn run(backend: &mut dyn TpmBackend, ordinal: u32, params: &[u8]) -> Result<Vec<u8>, MeasureError> {
    let response = backend.execute_platform(&command(ordinal, params));
    if response.len() < 10 {
        return Err(MeasureError::Malformed { ordinal });
    }
    let code = u32::from_be_bytes([response[6], response[7], response[8], response[9]]);
    if code != 0 {
        return Err(MeasureError::Tpm { ordinal, code });
    }
    Ok(response[10..].to_vec())
}

/// What one launch measurement covers.
pub struct Measurement<'a> {
    pub pcr: u32,
    pub description: &'a [u8],
    pub digest: [u8; 20],
}

/// Starts the TPM as firmware does at power-on, then extends and logs
/// each measurement, in order.
fn measure_launch_into(
    backend: &mut dyn TpmBackend,
    log: &mut EventLog,
    measurements: &[Measurement<'_>],
) -> Result<(), MeasureError> {
    match run(backend, ORD_STARTUP, &ST_CLEAR.to_be_bytes()) {
        Ok(_) | Err(MeasureError::Tpm { code: TPM_INVALID_POSTINIT, .. }) => {}
        Err(e) => return Err(e),
    }
    for m in measurements {
        let event = Event { pcr: m.pcr, kind: event_type::IPL, digest: m.digest, data: m.description.to_vec() };
        measure_event_into(backend, log, &event)?;
    }
    Ok(())
}

/// Extends and logs one event.
fn measure_event_into(backend: &mut dyn TpmBackend, log: &mut EventLog, event: &Event) -> Result<(), MeasureError> {
    let mut params = Vec::with_capacity(24);
    params.extend_from_slice(&event.pcr.to_be_bytes());
    params.extend_from_slice(&event.digest);
    run(backend, ORD_EXTEND, &params)?;
    log.push(event)?;
    Ok(())
}

impl GuestTpm {
    pub fn new(backend: Box<dyn TpmBackend>) -> Self {
        // The TIS has no interrupt line wired: guests poll (tpm_tis.interrupts=0).
        GuestTpm { tis: Tis::new(backend, 0), log: EventLog::new(LOG_AREA) }
    }

    /// What a durable vTPM did with its store service; None for a volatile one.
    pub fn durable_report(&self) -> Option<durable::DurableReport> {
        self.tis.backend().durable_report()
    }

    /// Starts the TPM as firmware does at power-on, then extends and logs
    /// each measurement, in order, before the guest's first instruction.
    pub fn measure_launch(&mut self, measurements: &[Measurement<'_>]) -> Result<(), MeasureError> {
        measure_launch_into(self.tis.backend_mut().as_mut(), &mut self.log, measurements)
    }

    /// Extends and logs one event of any type (the security-configuration
    /// event of [`config_event::config_event`], the agent's lock event of
    /// [`config_event::lock_event`]), after [`GuestTpm::measure_launch`]
    /// started the TPM. From the platform's locality: PCR 11 takes it.
    pub fn measure_event(&mut self, event: &Event) -> Result<(), MeasureError> {
        measure_event_into(self.tis.backend_mut().as_mut(), &mut self.log, event)
    }

    /// The vTPM [`setup::prepare`] made, with the launch and the
    /// configuration event measured into it, behind its TIS. A vTPM whose
    /// state was refused enters failure mode after the measurements: its
    /// event log still tells what was launched, and its chip answers as a
    /// real one whose self-test failed.
    pub fn launch<P: vtpm_core::Platform + 'static>(
        prepared: setup::Prepared<P>,
        measurements: &[Measurement<'_>],
        config: &Event,
    ) -> Result<Self, MeasureError> {
        let mut log = EventLog::new(LOG_AREA);
        let mut measure = |backend: &mut dyn TpmBackend| -> Result<(), MeasureError> {
            measure_launch_into(backend, &mut log, measurements)?;
            measure_event_into(backend, &mut log, config)
        };
        // PCR 11 becomes the platform's before anything runs: configuration
        // of this launch, which no state blob carries.
        let backend: Box<dyn TpmBackend> = match prepared {
            setup::Prepared::Volatile(mut tpm) => {
                tpm.reserve_pcrs_to_platform(PLATFORM_PCRS);
                let mut e = engine::Engine(tpm);
                measure(&mut e)?;
                Box::new(e)
            }
            setup::Prepared::Durable(mut d) => {
                d.reserve_pcrs_to_platform(PLATFORM_PCRS);
                measure(d.as_mut())?;
                d
            }
            setup::Prepared::Failed(mut tpm) => {
                tpm.reserve_pcrs_to_platform(PLATFORM_PCRS);
                let mut e = engine::Engine(tpm);
                measure(&mut e)?;
                e.0.fail();
                Box::new(e)
            }
        };
        Ok(GuestTpm { tis: Tis::new(backend, 0), log })
    }
}

/// The vTPM seed: 64 hexadecimal digits (32 bytes), surrounding whitespace
/// allowed, as `openssl rand -hex 32` writes them.
pub fn parse_seed(text: &[u8]) -> Option<[u8; 32]> {
    crate::boot_info::hex32(text.trim_ascii())
}

/// The launch measurements of a guest, GRUB's way: the command line into
/// PCR 8, the kernel and the initrd into PCR 9. `sha1` hashes.
pub fn launch_measurements<'a>(
    sha1: impl Fn(&[u8]) -> [u8; 20],
    kernel: &[u8],
    cmdline: &'a [u8],
    initrd: Option<&[u8]>,
) -> Vec<Measurement<'a>> {
    let mut out = alloc::vec![
        Measurement { pcr: pcr::FILES, description: b"kernel", digest: sha1(kernel) },
        Measurement { pcr: pcr::COMMAND_LINE, description: b"kernel_cmdline", digest: sha1(cmdline) },
    ];
    if let Some(initrd) = initrd {
        out.push(Measurement { pcr: pcr::FILES, description: b"initrd", digest: sha1(initrd) });
    }
    out
}

#[cfg(test)]
pub mod fake {
    //! A TPM that answers Startup and Extend well enough to test the glue.
    use super::*;

    #[derive(Default)]
    pub struct FakeTpm {
        pub started: bool,
        pub pcrs: [[u8; 20]; 24],
        pub commands: Vec<Vec<u8>>,
    }

    fn reply(code: u32, params: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&0x00c4u16.to_be_bytes());
        r.extend_from_slice(&((10 + params.len()) as u32).to_be_bytes());
        r.extend_from_slice(&code.to_be_bytes());
        r.extend_from_slice(params);
        r
    }

    impl TpmBackend for FakeTpm {
        fn execute(&mut self, _locality: u8, command: &[u8]) -> Vec<u8> {
            self.commands.push(command.to_vec());
            let ordinal = u32::from_be_bytes([command[6], command[7], command[8], command[9]]);
            match ordinal {
                ORD_STARTUP if self.started => reply(TPM_INVALID_POSTINIT, &[]),
                ORD_STARTUP => {
                    self.started = true;
                    reply(0, &[])
                }
                ORD_EXTEND if self.started => {
                    let index = u32::from_be_bytes([command[10], command[11], command[12], command[13]]) as usize;
                    // Not SHA-1: order-dependent mixing is enough for the glue.
                    for (i, b) in command[14..34].iter().enumerate() {
                        self.pcrs[index][i] = self.pcrs[index][i].wrapping_mul(3).wrapping_add(*b);
                    }
                    reply(0, &self.pcrs[index].clone())
                }
                _ => reply(0x26, &[]),
            }
        }
    }

    /// A durable backend's store channel alone: hands over version 9 and
    /// records the reports it takes, shared with the test that boxed it.
    #[derive(Default)]
    pub struct FakeStore {
        pub reports: alloc::rc::Rc<core::cell::RefCell<Vec<u64>>>,
    }

    impl TpmBackend for FakeStore {
        fn execute(&mut self, _locality: u8, _command: &[u8]) -> Vec<u8> {
            reply(0, &[])
        }

        fn store(&mut self) -> Option<&mut dyn durable::StoreChannel> {
            Some(self)
        }
    }

    impl durable::StoreChannel for FakeStore {
        fn fetch(&mut self) -> Result<Option<(u64, &[u8])>, durable::StoreError> {
            Ok(Some((9, b"sealed state")))
        }

        fn stored(&mut self, version: u64) -> Result<(), durable::StoreError> {
            self.reports.borrow_mut().push(version);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_are_64_hex_digits() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let seed = super::parse_seed(alloc::format!("{hex}\n").as_bytes()).unwrap();
        assert_eq!((seed[0], seed[1], seed[31]), (0x00, 0x11, 0xff));
        assert_eq!(super::parse_seed(&hex.as_bytes()[..62]), None);
        assert_eq!(super::parse_seed(hex.replace('0', "g").as_bytes()), None);
        assert_eq!(super::parse_seed(b"+1122334455667788990011223344556677889900112233445566778899001122"), None);
        // A sign inside a pair is no hexadecimal digit either.
        assert_eq!(super::parse_seed(b"+f22334455667788990011223344556677889900112233445566778899001122"), None);
    }

    use super::fake::FakeTpm;
    use super::*;

    fn digest_of(data: &[u8]) -> [u8; 20] {
        let mut d = [0u8; 20];
        for (i, b) in data.iter().enumerate() {
            d[i % 20] ^= *b;
        }
        d
    }

    /// Shares the fake with the test, to look at what it was sent.
    struct Shared(alloc::rc::Rc<core::cell::RefCell<FakeTpm>>);

    impl TpmBackend for Shared {
        fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
            self.0.borrow_mut().execute(locality, command)
        }
    }

    #[test]
    fn launch_starts_the_tpm_extends_in_order_and_logs() {
        let fake = alloc::rc::Rc::new(core::cell::RefCell::new(FakeTpm::default()));
        let mut tpm = GuestTpm::new(Box::new(Shared(fake.clone())));
        let m = launch_measurements(digest_of, b"KERNEL", b"console=ttyS0", Some(b"INITRD"));
        tpm.measure_launch(&m).unwrap();
        let events = event_log::parse(tpm.log.as_bytes()).unwrap();
        assert_eq!(
            events.iter().map(|e| (e.pcr, e.data.as_slice())).collect::<Vec<_>>(),
            [(9, &b"kernel"[..]), (8, &b"kernel_cmdline"[..]), (9, &b"initrd"[..])]
        );
        assert_eq!(events[1].digest, digest_of(b"console=ttyS0"));
        // Startup first, then one Extend per measurement, with the logged digests.
        let sent = &fake.borrow().commands;
        assert_eq!(sent.len(), 4);
        assert_eq!(&sent[0][6..12], &[0, 0, 0, 0x99, 0, 1]);
        for (cmd, event) in sent[1..].iter().zip(&events) {
            assert_eq!(&cmd[6..10], &ORD_EXTEND.to_be_bytes());
            assert_eq!(&cmd[10..14], &event.pcr.to_be_bytes());
            assert_eq!(&cmd[14..34], &event.digest);
        }
    }

    #[test]
    fn the_configuration_event_is_extended_into_pcr_11_and_logged() {
        let fake = alloc::rc::Rc::new(core::cell::RefCell::new(FakeTpm::default()));
        let mut tpm = GuestTpm::new(Box::new(Shared(fake.clone())));
        tpm.measure_launch(&launch_measurements(digest_of, b"K", b"C", None)).unwrap();
        let cfg = config_event::SecurityConfig {
            hypervisor: [1; 32],
            integrity: config_event::IntegrityMode::Enforce,
            trust: &["ifb"],
            policy: None,
            api: None,
            vtpm_durable: false,
        };
        let event = config_event::config_event(digest_of, &cfg);
        tpm.measure_event(&event).unwrap();
        let events = event_log::parse(tpm.log.as_bytes()).unwrap();
        assert_eq!(events.last(), Some(&event));
        let sent = fake.borrow().commands.last().unwrap().clone();
        assert_eq!(&sent[10..14], &11u32.to_be_bytes());
        assert_eq!(&sent[14..34], &event.digest);
    }

    #[test]
    fn a_tpm_error_stops_the_launch() {
        struct Refuses;
        impl TpmBackend for Refuses {
            fn execute(&mut self, _: u8, _: &[u8]) -> Vec<u8> {
                alloc::vec![0, 0xc4, 0, 0, 0, 10, 0, 0, 0, 9]
            }
        }
        let mut tpm = GuestTpm::new(Box::new(Refuses));
        let m = launch_measurements(digest_of, b"K", b"C", None);
        assert_eq!(tpm.measure_launch(&m), Err(MeasureError::Tpm { ordinal: ORD_STARTUP, code: 9 }));
        assert!(tpm.log.as_bytes().is_empty(), "nothing is logged that was not extended");
    }
}
