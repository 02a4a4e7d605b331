//! NV storage: defined indices, their attributes and data.
//!
//! Budget: at most [`MAX_INDICES`] indices and [`NV_BUDGET`] bytes in total,
//! each index costing its data size plus [`INDEX_OVERHEAD`] (the figures
//! libtpms reports through TPM_CAP_PROP_MAX_NV_AVAILABLE).

use crate::consts::*;
use crate::key::PcrInfoShort;
use crate::marshal::{Put, Reader, TpmResult};
use crate::secret::Secret;
use alloc::vec::Vec;

/// Total bytes of NV data all indices may hold.
pub const NV_BUDGET: u32 = 0x6FFA;
/// Bytes of the budget each index costs besides its data.
pub const INDEX_OVERHEAD: u32 = 53;
/// Most indices that can be defined.
pub const MAX_INDICES: usize = 64;
/// Writes allowed without an owner before the TPM refuses (TPM_MAX_NV_WRITE_NOOWNER).
pub const MAX_NV_WRITE_NOOWNER: u32 = 64;

/// TPM_NV_DATA_PUBLIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvPublic {
    pub index: u32,
    pub pcr_read: PcrInfoShort,
    pub pcr_write: PcrInfoShort,
    pub attributes: u32,
    pub read_st_clear: bool,
    pub write_st_clear: bool,
    pub write_define: bool,
    pub size: u32,
}

impl NvPublic {
    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        if r.u16()? != TAG_NV_DATA_PUBLIC {
            return Err(TPM_BADTAG);
        }
        let index = r.u32()?;
        let pcr_read = PcrInfoShort::read(r)?;
        let pcr_write = PcrInfoShort::read(r)?;
        if r.u16()? != TAG_NV_ATTRIBUTES {
            return Err(TPM_BADTAG);
        }
        Ok(NvPublic {
            index,
            pcr_read,
            pcr_write,
            attributes: r.u32()?,
            read_st_clear: r.bool()?,
            write_st_clear: r.bool()?,
            write_define: r.bool()?,
            size: r.u32()?,
        })
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.put_u16(TAG_NV_DATA_PUBLIC);
        out.put_u32(self.index);
        self.pcr_read.write(out);
        self.pcr_write.write(out);
        out.put_u16(TAG_NV_ATTRIBUTES);
        out.put_u32(self.attributes);
        out.put_u8(u8::from(self.read_st_clear));
        out.put_u8(u8::from(self.write_st_clear));
        out.put_u8(u8::from(self.write_define));
        out.put_u32(self.size);
    }

    pub fn has(&self, attr: u32) -> bool {
        self.attributes & attr != 0
    }
}

/// A defined index.
#[derive(Clone, Debug)]
pub struct NvIndex {
    pub public: NvPublic,
    pub auth: Secret,
    pub data: Vec<u8>,
}

/// All defined indices.
#[derive(Clone, Debug, Default)]
pub struct NvStore {
    pub indices: Vec<NvIndex>,
}

impl NvStore {
    pub fn used(&self) -> u32 {
        self.indices.iter().map(|i| i.public.size.saturating_add(INDEX_OVERHEAD)).fold(0u32, u32::saturating_add)
    }

    pub fn free(&self) -> u32 {
        NV_BUDGET.saturating_sub(self.used())
    }

    pub fn get(&self, index: u32) -> Option<&NvIndex> {
        self.indices.iter().find(|i| i.public.index == index)
    }

    pub fn get_mut(&mut self, index: u32) -> Option<&mut NvIndex> {
        self.indices.iter_mut().find(|i| i.public.index == index)
    }

    pub fn remove(&mut self, index: u32) {
        self.indices.retain(|i| i.public.index != index);
    }

    /// Startup(ST_CLEAR) lifts the per-boot locks.
    pub fn clear_stclear_locks(&mut self) {
        for i in &mut self.indices {
            i.public.read_st_clear = false;
            i.public.write_st_clear = false;
        }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.put_u32(self.indices.len() as u32);
        for i in &self.indices {
            i.public.write(out);
            out.put(&i.auth.0);
            out.put_sized32(&i.data);
        }
    }

    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        let n = r.u32()?;
        if n as usize > MAX_INDICES {
            return Err(TPM_FAIL);
        }
        let mut indices = Vec::new();
        for _ in 0..n {
            let public = NvPublic::read(r)?;
            let auth = Secret(r.digest()?);
            let data = r.sized32()?.to_vec();
            if data.len() != public.size as usize {
                return Err(TPM_FAIL);
            }
            indices.push(NvIndex { public, auth, data });
        }
        let store = NvStore { indices };
        if store.used() > NV_BUDGET {
            return Err(TPM_FAIL);
        }
        Ok(store)
    }
}
