//! libtpms' TPM 1.2 in this process, through its C API. Its NVRAM goes
//! through callbacks into memory, so neither side of the comparison pays for
//! disk writes (vtpm-core leaves persistence to its caller too).
//!
//! libtpms is one global TPM per process: `Libtpms` is a handle to it and
//! only one may exist at a time.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uchar, CStr};
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

type TpmResult = u32;

#[repr(C)]
struct Callbacks {
    size_of_struct: c_int,
    nvram_init: Option<extern "C" fn() -> TpmResult>,
    nvram_loaddata: Option<extern "C" fn(*mut *mut c_uchar, *mut u32, u32, *const c_char) -> TpmResult>,
    nvram_storedata: Option<extern "C" fn(*const c_uchar, u32, u32, *const c_char) -> TpmResult>,
    nvram_deletename: Option<extern "C" fn(u32, *const c_char, c_uchar) -> TpmResult>,
    io_init: Option<extern "C" fn() -> TpmResult>,
    io_getlocality: Option<extern "C" fn(*mut u32, u32) -> TpmResult>,
    io_getphysicalpresence: Option<extern "C" fn(*mut c_uchar, u32) -> TpmResult>,
}

#[link(name = "tpms")]
extern "C" {
    fn TPMLIB_ChooseTPMVersion(version: c_int) -> TpmResult;
    fn TPMLIB_RegisterCallbacks(callbacks: *mut Callbacks) -> TpmResult;
    fn TPMLIB_MainInit() -> TpmResult;
    fn TPMLIB_Terminate();
    fn TPMLIB_Process(
        resp: *mut *mut c_uchar,
        resp_size: *mut u32,
        resp_buf_size: *mut u32,
        command: *mut c_uchar,
        command_size: u32,
    ) -> TpmResult;
    fn TPM_Malloc(buffer: *mut *mut c_uchar, size: u32) -> TpmResult;
    fn TPM_Free(buffer: *mut c_uchar);
}

const TPMLIB_TPM_VERSION_1_2: c_int = 0;
const TPM_SUCCESS: TpmResult = 0;
const TPM_FAIL: TpmResult = 9;
/// What libtpms expects from `loaddata` for state that was never stored.
const TPM_RETRY: TpmResult = 0x800;

/// The locality libtpms asks for through `tpm_io_getlocality`.
static LOCALITY: AtomicU32 = AtomicU32::new(0);

extern "C" fn io_init() -> TpmResult {
    TPM_SUCCESS
}

extern "C" fn io_getlocality(locality: *mut u32, _: u32) -> TpmResult {
    // SAFETY: libtpms passes a valid out-parameter.
    unsafe { *locality = LOCALITY.load(Ordering::Relaxed) };
    TPM_SUCCESS
}

extern "C" fn io_getphysicalpresence(present: *mut c_uchar, _: u32) -> TpmResult {
    // No hardware physical presence: only TSC_PhysicalPresence asserts it.
    // SAFETY: libtpms passes a valid out-parameter.
    unsafe { *present = 0 };
    TPM_SUCCESS
}

/// The TPM's NVRAM: blob name ("permall", "savestate", "volatilestate") to bytes.
static NVRAM: Mutex<Option<HashMap<String, Vec<u8>>>> = Mutex::new(None);

fn nvram() -> std::sync::MutexGuard<'static, Option<HashMap<String, Vec<u8>>>> {
    NVRAM.lock().unwrap_or_else(|p| p.into_inner())
}

fn name(n: *const c_char) -> String {
    // SAFETY: libtpms passes a NUL-terminated blob name.
    unsafe { CStr::from_ptr(n) }.to_string_lossy().into_owned()
}

extern "C" fn nvram_init() -> TpmResult {
    nvram().get_or_insert_with(HashMap::new);
    TPM_SUCCESS
}

extern "C" fn nvram_loaddata(data: *mut *mut c_uchar, length: *mut u32, _: u32, n: *const c_char) -> TpmResult {
    let guard = nvram();
    let Some(blob) = guard.as_ref().and_then(|m| m.get(&name(n))) else {
        return TPM_RETRY;
    };
    let mut buf = ptr::null_mut();
    // SAFETY: libtpms frees this buffer with TPM_Free, so it must come from TPM_Malloc.
    if unsafe { TPM_Malloc(&mut buf, blob.len() as u32) } != TPM_SUCCESS {
        return TPM_FAIL;
    }
    // SAFETY: `buf` holds blob.len() bytes; `data` and `length` are libtpms' out-parameters.
    unsafe {
        ptr::copy_nonoverlapping(blob.as_ptr(), buf, blob.len());
        *data = buf;
        *length = blob.len() as u32;
    }
    TPM_SUCCESS
}

extern "C" fn nvram_storedata(data: *const c_uchar, length: u32, _: u32, n: *const c_char) -> TpmResult {
    // SAFETY: libtpms passes `length` readable bytes at `data`.
    let blob = unsafe { std::slice::from_raw_parts(data, length as usize) }.to_vec();
    nvram().get_or_insert_with(HashMap::new).insert(name(n), blob);
    TPM_SUCCESS
}

extern "C" fn nvram_deletename(_: u32, n: *const c_char, must_exist: c_uchar) -> TpmResult {
    let existed = nvram().get_or_insert_with(HashMap::new).remove(&name(n)).is_some();
    if must_exist != 0 && !existed {
        TPM_FAIL
    } else {
        TPM_SUCCESS
    }
}

/// The process's libtpms TPM 1.2.
pub struct Libtpms {
    resp: *mut c_uchar,
    resp_buf_size: u32,
}

impl Libtpms {
    /// Starts libtpms on `permall` (None: a TPM that was never manufactured).
    pub fn start(permall: Option<&[u8]>) -> Libtpms {
        {
            let mut m = nvram();
            let m = m.get_or_insert_with(HashMap::new);
            m.clear();
            if let Some(p) = permall {
                m.insert("permall".into(), p.to_vec());
            }
        }
        let mut callbacks = Callbacks {
            size_of_struct: std::mem::size_of::<Callbacks>() as c_int,
            nvram_init: Some(nvram_init),
            nvram_loaddata: Some(nvram_loaddata),
            nvram_storedata: Some(nvram_storedata),
            nvram_deletename: Some(nvram_deletename),
            io_init: Some(io_init),
            io_getlocality: Some(io_getlocality),
            io_getphysicalpresence: Some(io_getphysicalpresence),
        };
        // SAFETY: plain library calls in the documented order; the callbacks
        // structure is copied by libtpms.
        unsafe {
            assert_eq!(TPMLIB_ChooseTPMVersion(TPMLIB_TPM_VERSION_1_2), TPM_SUCCESS, "TPMLIB_ChooseTPMVersion");
            assert_eq!(TPMLIB_RegisterCallbacks(&mut callbacks), TPM_SUCCESS, "TPMLIB_RegisterCallbacks");
            assert_eq!(TPMLIB_MainInit(), TPM_SUCCESS, "TPMLIB_MainInit");
        }
        Libtpms { resp: ptr::null_mut(), resp_buf_size: 0 }
    }

    /// The permanent state as libtpms last stored it.
    pub fn permall(&self) -> Vec<u8> {
        nvram().as_ref().and_then(|m| m.get("permall").cloned()).expect("libtpms stored its permanent state")
    }

    /// The locality of the following commands.
    pub fn set_locality(&mut self, locality: u8) {
        LOCALITY.store(u32::from(locality), Ordering::Relaxed);
    }

    pub fn execute(&mut self, command: &[u8]) -> Vec<u8> {
        let mut cmd = command.to_vec();
        let mut resp_size = 0u32;
        // SAFETY: libtpms (re)allocates `self.resp` as needed and reports its
        // size; the command buffer is ours and outlives the call.
        let rc = unsafe {
            TPMLIB_Process(&mut self.resp, &mut resp_size, &mut self.resp_buf_size, cmd.as_mut_ptr(), cmd.len() as u32)
        };
        assert_eq!(rc, TPM_SUCCESS, "TPMLIB_Process failed as a library call");
        // SAFETY: libtpms wrote `resp_size` bytes at `self.resp`.
        unsafe { std::slice::from_raw_parts(self.resp, resp_size as usize) }.to_vec()
    }
}

impl Drop for Libtpms {
    fn drop(&mut self) {
        // SAFETY: the response buffer came from libtpms' allocator; after
        // Terminate the library holds no state of ours.
        unsafe {
            TPM_Free(self.resp);
            TPMLIB_Terminate();
        }
    }
}
