//! One virtual TPM as the swtpm protocol sees it: powered or stopped, the
//! locality set on the control channel, and its state kept in a directory.
//!
//! Every command that changes the permanent state or the SaveState blob is
//! followed by a durable write before its response leaves, so a client never
//! sees an acknowledged change that a crash could lose.

use crate::ctrl::{self, rc, Request};
use crate::engine::Engine;
use crate::state::{StateDir, PERMANENT_FILE, SAVESTATE_FILE};
use std::io;

/// TPM_Startup(ST_CLEAR), sent by `--flags startup-clear`.
pub const STARTUP_CLEAR: [u8; 12] = [0x00, 0xc1, 0, 0, 0, 0x0c, 0, 0, 0, 0x99, 0x00, 0x01];

/// The response swtpm gives to a TPM command while the TPM is not
/// initialised (no CMD_INIT yet, or after CMD_STOP): TPM_FAIL.
pub const NOT_RUNNING_RESPONSE: [u8; 10] = [0x00, 0xc4, 0, 0, 0, 0x0a, 0, 0, 0, 0x09];

/// What swtpm's `TPM_RETRY` means for a state blob that does not exist.
const RC_RETRY: u32 = 0x800;

/// Start-up behaviour, as swtpm's `--flags`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// Power the TPM on at start instead of waiting for CMD_INIT.
    pub not_need_init: bool,
    /// Send TPM_Startup(ST_CLEAR) right after the power-on at start.
    pub startup_clear: bool,
}

/// What the control channel should do after answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Continue,
    /// CMD_SHUTDOWN: the server stops.
    Terminate,
}

/// The identification answered by CMD_GET_INFO.
const INFO_SPEC: &str = r#""TPMSpecification":{"family":"1.2","level":2,"revision":116}"#;
const INFO_ATTRS: &str =
    r#""TPMAttributes":{"manufacturer":"id:00000000","version":"id:00000001","model":"vtpm-core"}"#;

pub struct Device<E: Engine> {
    tpm: E,
    /// `None` once the server terminated: it has let go of the directory.
    state: Option<StateDir>,
    running: bool,
    locality: u8,
    /// The SaveState blob as it is on disk, to write only on change.
    saved_on_disk: Option<Vec<u8>>,
}

impl<E: Engine> Device<E> {
    /// Opens the TPM kept in `state`: restores it, or manufactures it (and
    /// so decides its EK, generated when first needed) and persists it at
    /// once on first start.
    pub fn open(state: StateDir, flags: Flags) -> io::Result<Self> {
        let invalid = |what: &str, e: String| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}/{what}: {e}", state.path().display()))
        };
        let mut tpm = match state.read(PERMANENT_FILE)? {
            Some(blob) => E::from_permanent(&blob).map_err(|e| invalid(PERMANENT_FILE, e))?,
            None => {
                let mut tpm = E::manufacture();
                state.write(PERMANENT_FILE, &tpm.permanent_state())?;
                tpm.clear_dirty();
                tpm
            }
        };
        let saved_on_disk = state.read(SAVESTATE_FILE)?;
        if let Some(blob) = &saved_on_disk {
            tpm.set_saved_state(blob).map_err(|e| invalid(SAVESTATE_FILE, e))?;
        }
        let mut dev = Device { tpm, state: Some(state), running: false, locality: 0, saved_on_disk };
        if flags.not_need_init {
            dev.init()?;
            if flags.startup_clear {
                let r = dev.process(&STARTUP_CLEAR);
                if r.get(6..10) != Some(&[0, 0, 0, 0]) {
                    eprintln!("vtpm-server: TPM_Startup(ST_CLEAR) at start was refused: {r:02x?}");
                }
            }
        }
        Ok(dev)
    }

    pub fn running(&self) -> bool {
        self.running
    }

    pub fn locality(&self) -> u8 {
        self.locality
    }

    /// TPM_Init.
    fn init(&mut self) -> io::Result<()> {
        self.tpm.power_on();
        self.running = true;
        self.persist()
    }

    /// Runs one TPM command from the command channel.
    pub fn process(&mut self, command: &[u8]) -> Vec<u8> {
        if !self.running || self.state.is_none() {
            return NOT_RUNNING_RESPONSE.to_vec();
        }
        let response = self.tpm.execute(self.locality, command);
        match self.persist() {
            Ok(()) => response,
            Err(e) => {
                // The change is not durable: the client must not rely on it.
                eprintln!("vtpm-server: could not persist TPM state: {e}");
                NOT_RUNNING_RESPONSE.to_vec()
            }
        }
    }

    /// Writes whatever changed since the last write.
    fn persist(&mut self) -> io::Result<()> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        if self.tpm.permanent_dirty() {
            state.write(PERMANENT_FILE, &self.tpm.permanent_state())?;
            self.tpm.clear_dirty();
        }
        let saved = self.tpm.saved_state();
        if saved != self.saved_on_disk {
            match &saved {
                Some(blob) => state.write(SAVESTATE_FILE, blob)?,
                None => state.remove(SAVESTATE_FILE)?,
            }
            self.saved_on_disk = saved;
        }
        Ok(())
    }

    /// Persists and lets go of the state directory (CMD_SHUTDOWN).
    pub fn terminate(&mut self) -> io::Result<()> {
        let r = self.persist();
        self.running = false;
        self.state = None;
        r
    }

    /// The capabilities this server really implements.
    pub const CAPABILITIES: u64 = ctrl::cap::INIT
        | ctrl::cap::SHUTDOWN
        | ctrl::cap::STOP
        | ctrl::cap::GET_TPMESTABLISHED
        | ctrl::cap::RESET_TPMESTABLISHED
        | ctrl::cap::SET_LOCALITY
        | ctrl::cap::HASHING
        | ctrl::cap::GET_STATEBLOB
        | ctrl::cap::SET_STATEBLOB
        | ctrl::cap::GET_CONFIG
        | ctrl::cap::SET_BUFFERSIZE
        | ctrl::cap::GET_INFO;

    /// Answers one control-channel request.
    pub fn control(&mut self, request: Request) -> (Vec<u8>, After) {
        let not_running = ctrl::result_only(rc::BAD_ORDINAL);
        let answer = match request {
            Request::GetCapability => Self::CAPABILITIES.to_be_bytes().to_vec(),
            Request::Init { flags: _ } => {
                // PTM_INIT_FLAG_DELETE_VOLATILE has nothing to act on: the
                // engine keeps no volatile-state file, only SaveState.
                match self.init() {
                    Ok(()) => ctrl::result_only(rc::SUCCESS),
                    Err(e) => {
                        eprintln!("vtpm-server: CMD_INIT: {e}");
                        self.running = false;
                        ctrl::result_only(rc::FAIL)
                    }
                }
            }
            Request::Stop => {
                let r = self.persist();
                self.running = false;
                ctrl::result_only(if r.is_ok() { rc::SUCCESS } else { rc::IOERROR })
            }
            Request::Shutdown => {
                let r = self.terminate();
                let code = if r.is_ok() { rc::SUCCESS } else { rc::IOERROR };
                return (ctrl::result_only(code), After::Terminate);
            }
            Request::GetTpmEstablished if !self.running => not_running,
            // The establishment bit is set by a DRTM sequence (CMD_HASH_START).
            Request::GetTpmEstablished => ctrl::established(rc::SUCCESS, self.tpm.tpm_established()),
            Request::ResetTpmEstablished { .. } if !self.running => not_running,
            Request::ResetTpmEstablished { locality } => {
                // libtpms resets the bit only from localities 3 and 4.
                let r = self.tpm.reset_established(locality);
                self.persisted(r)
            }
            // The DRTM sequence, at locality 4 whatever CMD_SET_LOCALITY
            // chose (as swtpm). Its errors put the TPM into failure mode.
            Request::HashStart | Request::HashData { .. } | Request::HashEnd if !self.running => not_running,
            Request::HashStart => {
                let r = self.tpm.hash_start();
                self.persisted(r)
            }
            Request::HashData { data } => {
                let r = self.tpm.hash_data(&data);
                self.persisted(r)
            }
            Request::HashEnd => {
                let r = self.tpm.hash_end();
                self.persisted(r)
            }
            Request::SetLocality { locality } if locality > 4 => ctrl::result_only(rc::BAD_LOCALITY),
            Request::SetLocality { locality } => {
                self.locality = locality;
                ctrl::result_only(rc::SUCCESS)
            }
            Request::GetStateBlob { .. } if !self.running => not_running,
            Request::GetStateBlob { blob_type, offset, .. } => self.get_blob(blob_type, offset),
            Request::SetStateBlob { .. } if self.running => not_running,
            Request::SetStateBlob { flags, blob_type, data } => {
                ctrl::result_only(self.set_blob(flags, blob_type, &data))
            }
            Request::GetConfig => {
                // No file key and no migration key: state is stored in clear.
                let mut v = ctrl::result_only(rc::SUCCESS);
                v.extend_from_slice(&0u32.to_be_bytes());
                v
            }
            Request::SetBufferSize { size } if size > 0 && self.running => not_running,
            Request::SetBufferSize { .. } => ctrl::buffer_size(ctrl::BUFFER_SIZE, ctrl::BUFFER_MIN, ctrl::BUFFER_SIZE),
            Request::GetInfo { flags, offset } => {
                let mut parts = Vec::new();
                if flags & ctrl::INFO_TPMSPECIFICATION != 0 {
                    parts.push(INFO_SPEC);
                }
                if flags & ctrl::INFO_TPMATTRIBUTES != 0 {
                    parts.push(INFO_ATTRS);
                }
                ctrl::info(&format!("{{{}}}", parts.join(",")), offset)
            }
            // A data fd can only travel over a Unix socket; over TCP there is
            // none in the message, which swtpm answers as bad input.
            Request::SetDataFd => ctrl::result_only(rc::BAD_PARAMETER),
            Request::CancelTpmCmd if !self.running => not_running,
            // Commands run to completion under the device lock: by the time
            // a cancel is read there is nothing left to cancel. swtpm gives
            // the same answer.
            Request::CancelTpmCmd => ctrl::result_only(rc::FAIL),
            // Not offered (see CAPABILITIES): the engine does not expose its
            // volatile state.
            Request::StoreVolatile | Request::Unknown(_) => ctrl::result_only(rc::BAD_ORDINAL),
        };
        (answer, After::Continue)
    }

    /// The answer to a control request that may have changed the
    /// permanent state: persisted first, as for TPM commands.
    fn persisted(&mut self, r: Result<(), u32>) -> Vec<u8> {
        if let Err(e) = self.persist() {
            eprintln!("vtpm-server: could not persist TPM state: {e}");
            return ctrl::result_only(rc::IOERROR);
        }
        ctrl::result_only(r.err().unwrap_or(rc::SUCCESS))
    }

    fn get_blob(&mut self, blob_type: u32, offset: u32) -> Vec<u8> {
        if let Err(e) = self.persist() {
            eprintln!("vtpm-server: CMD_GET_STATEBLOB: {e}");
            return ctrl::result_only(rc::IOERROR);
        }
        let blob = match blob_type {
            ctrl::blob::PERMANENT => self.tpm.permanent_state(),
            ctrl::blob::SAVESTATE => match self.tpm.saved_state() {
                Some(b) => b,
                None => return ctrl::state_blob(RC_RETRY, &[]),
            },
            _ => return ctrl::state_blob(rc::BAD_PARAMETER, &[]),
        };
        let from = (offset as usize).min(blob.len());
        ctrl::state_blob(rc::SUCCESS, &blob[from..])
    }

    fn set_blob(&mut self, flags: u32, blob_type: u32, data: &[u8]) -> u32 {
        if flags & ctrl::STATE_FLAG_ENCRYPTED != 0 {
            return rc::BAD_PARAMETER;
        }
        let Some(state) = &self.state else {
            return rc::FAIL;
        };
        let result = match blob_type {
            ctrl::blob::PERMANENT => match E::from_permanent(data) {
                Ok(mut tpm) => {
                    if let Some(saved) = &self.saved_on_disk {
                        // Keep a SaveState blob that fits the new TPM; drop one that does not.
                        let _ = tpm.set_saved_state(saved);
                    }
                    self.tpm = tpm;
                    state.write(PERMANENT_FILE, data).map(|()| self.tpm.clear_dirty())
                }
                Err(e) => {
                    eprintln!("vtpm-server: refused permanent blob: {e}");
                    return rc::BAD_PARAMETER;
                }
            },
            ctrl::blob::SAVESTATE => match self.tpm.set_saved_state(data) {
                Ok(()) => state.write(SAVESTATE_FILE, data).map(|()| self.saved_on_disk = Some(data.to_vec())),
                Err(e) => {
                    eprintln!("vtpm-server: refused savestate blob: {e}");
                    return rc::BAD_PARAMETER;
                }
            },
            _ => return rc::BAD_PARAMETER,
        };
        match result {
            Ok(()) => rc::SUCCESS,
            Err(e) => {
                eprintln!("vtpm-server: CMD_SET_STATEBLOB: {e}");
                rc::IOERROR
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateDir;
    use std::path::{Path, PathBuf};

    /// A stand-in engine that records what the device asks of it, so the
    /// device's power, locality and persistence rules can be checked without
    /// a TPM. Command byte 1 changes the permanent state, 2 stores a
    /// SaveState blob, 3 consumes it; the response echoes the locality.
    struct Recorder {
        permanent: Vec<u8>,
        dirty: bool,
        saved: Option<Vec<u8>>,
        powered: u32,
    }

    impl Engine for Recorder {
        fn manufacture() -> Self {
            Recorder { permanent: b"EK".to_vec(), dirty: true, saved: None, powered: 0 }
        }
        fn from_permanent(blob: &[u8]) -> Result<Self, String> {
            if blob.starts_with(b"EK") {
                Ok(Recorder { permanent: blob.to_vec(), dirty: false, saved: None, powered: 0 })
            } else {
                Err("not a permanent blob".into())
            }
        }
        fn permanent_state(&self) -> Vec<u8> {
            self.permanent.clone()
        }
        fn permanent_dirty(&self) -> bool {
            self.dirty
        }
        fn clear_dirty(&mut self) {
            self.dirty = false;
        }
        fn saved_state(&self) -> Option<Vec<u8>> {
            self.saved.clone()
        }
        fn set_saved_state(&mut self, blob: &[u8]) -> Result<(), String> {
            self.saved = Some(blob.to_vec());
            Ok(())
        }
        fn power_on(&mut self) {
            self.powered += 1;
        }
        fn execute(&mut self, locality: u8, command: &[u8]) -> Vec<u8> {
            match command.first() {
                Some(1) => {
                    self.permanent.push(b'+');
                    self.dirty = true;
                }
                Some(2) => self.saved = Some(b"SAVED".to_vec()),
                Some(3) => self.saved = None,
                _ => {}
            }
            vec![0xee, locality]
        }
        fn hash_start(&mut self) -> Result<(), u32> {
            self.permanent.push(b'H');
            self.dirty = true;
            Ok(())
        }
        fn hash_data(&mut self, _data: &[u8]) -> Result<(), u32> {
            Ok(())
        }
        fn hash_end(&mut self) -> Result<(), u32> {
            Err(0x1a)
        }
        fn tpm_established(&self) -> bool {
            self.permanent.contains(&b'H')
        }
        fn reset_established(&mut self, locality: u8) -> Result<(), u32> {
            if locality < 3 {
                return Err(rc::BAD_LOCALITY);
            }
            self.permanent.retain(|b| *b != b'H');
            self.dirty = true;
            Ok(())
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let mut b = [0u8; 8];
        crate::platform::OsPlatform::fill(&mut b);
        std::env::temp_dir().join(format!("vtpm-device-{tag}-{:016x}", u64::from_le_bytes(b)))
    }

    fn open(dir: &Path, flags: Flags) -> Device<Recorder> {
        Device::open(StateDir::open(dir).unwrap(), flags).unwrap()
    }

    #[test]
    fn first_start_manufactures_and_persists_at_once() {
        let d = tempdir("mfg");
        let dev = open(&d, Flags::default());
        assert_eq!(std::fs::read(d.join(PERMANENT_FILE)).unwrap(), b"EK");
        assert!(!dev.running());
        drop(dev);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn commands_wait_for_init_and_stop() {
        let d = tempdir("init");
        let mut dev = open(&d, Flags::default());
        assert_eq!(dev.process(&[0]), NOT_RUNNING_RESPONSE);
        assert_eq!(dev.control(Request::Init { flags: 0 }).0, ctrl::result_only(rc::SUCCESS));
        assert_eq!(dev.process(&[0]), vec![0xee, 0]);
        assert_eq!(dev.control(Request::Stop).0, ctrl::result_only(rc::SUCCESS));
        assert_eq!(dev.process(&[0]), NOT_RUNNING_RESPONSE);
        drop(dev);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn startup_clear_is_sent_after_power_on() {
        let d = tempdir("sc");
        let dev = open(&d, Flags { not_need_init: true, startup_clear: true });
        assert!(dev.running());
        assert_eq!(dev.tpm.powered, 1);
        drop(dev);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn locality_reaches_the_engine_and_is_bounded() {
        let d = tempdir("loc");
        let mut dev = open(&d, Flags { not_need_init: true, startup_clear: false });
        assert_eq!(dev.control(Request::SetLocality { locality: 3 }).0, ctrl::result_only(rc::SUCCESS));
        assert_eq!(dev.process(&[0]), vec![0xee, 3]);
        assert_eq!(dev.control(Request::SetLocality { locality: 5 }).0, ctrl::result_only(rc::BAD_LOCALITY));
        assert_eq!(dev.locality(), 3);
        drop(dev);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn state_changes_are_on_disk_before_the_answer_and_survive_restart() {
        let d = tempdir("persist");
        let mut dev = open(&d, Flags { not_need_init: true, startup_clear: false });
        dev.process(&[1]);
        assert_eq!(std::fs::read(d.join(PERMANENT_FILE)).unwrap(), b"EK+");
        dev.process(&[2]);
        assert_eq!(std::fs::read(d.join(SAVESTATE_FILE)).unwrap(), b"SAVED");
        drop(dev);

        let mut dev = open(&d, Flags::default());
        assert_eq!(dev.tpm.permanent, b"EK+");
        assert_eq!(dev.tpm.saved.as_deref(), Some(&b"SAVED"[..]));
        dev.control(Request::Init { flags: 0 });
        dev.process(&[3]);
        assert!(!d.join(SAVESTATE_FILE).exists());
        drop(dev);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_corrupt_permanent_blob_refuses_to_start() {
        let d = tempdir("corrupt");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(PERMANENT_FILE), b"garbage").unwrap();
        let e = Device::<Recorder>::open(StateDir::open(&d).unwrap(), Flags::default()).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains(PERMANENT_FILE), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn state_blobs_move_only_in_the_allowed_power_state() {
        let d = tempdir("blobs");
        let mut dev = open(&d, Flags { not_need_init: true, startup_clear: false });
        let set = Request::SetStateBlob { flags: 0, blob_type: ctrl::blob::PERMANENT, data: b"EKnew".to_vec() };
        assert_eq!(dev.control(set.clone()).0, ctrl::result_only(rc::BAD_ORDINAL));
        let got = dev.control(Request::GetStateBlob { flags: 0, blob_type: ctrl::blob::PERMANENT, offset: 0 }).0;
        assert_eq!(got, ctrl::state_blob(rc::SUCCESS, b"EK"));
        dev.control(Request::Stop);
        assert_eq!(dev.control(set).0, ctrl::result_only(rc::SUCCESS));
        assert_eq!(std::fs::read(d.join(PERMANENT_FILE)).unwrap(), b"EKnew");
        let bad = Request::SetStateBlob { flags: 0, blob_type: ctrl::blob::PERMANENT, data: b"junk".to_vec() };
        assert_eq!(dev.control(bad).0, ctrl::result_only(rc::BAD_PARAMETER));
        drop(dev);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn shutdown_persists_and_lets_go_of_the_directory() {
        let d = tempdir("shutdown");
        let mut dev = open(&d, Flags { not_need_init: true, startup_clear: false });
        let (answer, after) = dev.control(Request::Shutdown);
        assert_eq!((answer, after), (ctrl::result_only(rc::SUCCESS), After::Terminate));
        assert_eq!(dev.process(&[0]), NOT_RUNNING_RESPONSE);
        // The lock is released although the device value still exists.
        let again = open(&d, Flags::default());
        drop((dev, again));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn unknown_and_unoffered_codes_answer_bad_ordinal() {
        let d = tempdir("unknown");
        let mut dev = open(&d, Flags { not_need_init: true, startup_clear: false });
        for r in [Request::Unknown(0x13), Request::StoreVolatile] {
            assert_eq!(dev.control(r).0, ctrl::result_only(rc::BAD_ORDINAL));
        }
        let caps = u64::from_be_bytes(dev.control(Request::GetCapability).0.try_into().unwrap());
        assert_eq!(caps & ctrl::cap::STORE_VOLATILE, 0);
        assert_ne!(caps & ctrl::cap::SET_LOCALITY, 0);
        drop(dev);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn drtm_requests_reach_the_engine_and_persist() {
        let d = tempdir("drtm");
        let mut dev = open(&d, Flags { not_need_init: true, startup_clear: false });
        let caps = u64::from_be_bytes(dev.control(Request::GetCapability).0.try_into().unwrap());
        assert_ne!(caps & ctrl::cap::HASHING, 0);
        assert_eq!(dev.control(Request::GetTpmEstablished).0, ctrl::established(rc::SUCCESS, false));
        assert_eq!(dev.control(Request::HashStart).0, ctrl::result_only(rc::SUCCESS));
        assert_eq!(std::fs::read(d.join(PERMANENT_FILE)).unwrap(), b"EKH");
        assert_eq!(dev.control(Request::HashData { data: vec![1] }).0, ctrl::result_only(rc::SUCCESS));
        assert_eq!(dev.control(Request::HashEnd).0, ctrl::result_only(0x1a));
        assert_eq!(dev.control(Request::GetTpmEstablished).0, ctrl::established(rc::SUCCESS, true));
        let reset = |l| Request::ResetTpmEstablished { locality: l };
        assert_eq!(dev.control(reset(0)).0, ctrl::result_only(rc::BAD_LOCALITY));
        assert_eq!(dev.control(reset(4)).0, ctrl::result_only(rc::SUCCESS));
        assert_eq!(std::fs::read(d.join(PERMANENT_FILE)).unwrap(), b"EK");
        dev.control(Request::Stop);
        assert_eq!(dev.control(Request::HashStart).0, ctrl::result_only(rc::BAD_ORDINAL));
        drop(dev);
        std::fs::remove_dir_all(d).unwrap();
    }
}
