//! The PCR bank and the PC Client locality rules.
//!
//! PC Client Implementation Specification for TPM 1.2, table "PCR
//! attributes": PCR 16 (debug) and 23 (application) are resettable and
//! extendable from any locality; 17–22 are resettable and extendable only
//! from the localities listed below (the same tables as libtpms'
//! `TPM_PCRAttributes_Init`).
//!
//! The value a reset gives (PC Client table "PCR initial and reset
//! values", as libtpms' `TPM_PCR_Init` / `TPM_PCR_Reset` apply it):
//!
//! | event | 0–15 | 16, 23 | 17–22 |
//! | --- | --- | --- | --- |
//! | TPM_Init (power on), hence Startup | 00 | 00 | FF |
//! | TPM_PCR_Reset, no trusted OS (TOSPresent clear) | – | 00 | FF |
//! | TPM_PCR_Reset after TPM_HASH_START (TOSPresent set) | – | 00 | 00 |
//! | TPM_HASH_START | unchanged | unchanged | 00 |
//!
//! TOSPresent is set by TPM_HASH_START and cleared by TPM_Init and by every
//! successful TPM_Startup. PCR 17 (the locality-4 PCR) can be extended from
//! localities 2 and 3 only once it is no longer zero: while it holds its
//! DRTM reset value only locality 4 may extend it (PC Client TIS, as
//! libtpms' `TPM_ExtendCommon`).

use crate::consts::*;
use crate::crypto::sha1_parts;
use crate::marshal::{Put, Reader, TpmResult};
use alloc::vec::Vec;

/// Number of PCRs.
pub const NUM_PCRS: usize = 24;
/// Bytes of a full PCR selection bitmap.
pub const SELECT_BYTES: usize = NUM_PCRS / 8;

/// Locality bitmaps (bit n = locality n) allowed to reset each PCR.
const RESET_LOCALITIES: [u8; NUM_PCRS] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,    // 0-15: never
    0x1F, // 16: debug, any locality
    0x10, 0x10, 0x10, // 17-19: locality 4
    0x14, // 20: localities 2 and 4
    0x04, 0x04, // 21-22: locality 2
    0x1F, // 23: any locality
];

/// Locality bitmaps allowed to extend each PCR.
const EXTEND_LOCALITIES: [u8; NUM_PCRS] = [
    0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, 0x1F, // 0-16
    0x1C, // 17: localities 2-4
    0x1C, // 18
    0x0C, // 19: localities 2-3
    0x0E, // 20: localities 1-3
    0x04, 0x04, // 21-22: locality 2
    0x1F, // 23
];

/// The locality-4 PCR, which TPM_HASH_END extends.
pub const LOCALITY_4_PCR: usize = 17;

/// The PCRs TPM_HASH_START zeroes (the dynamic-launch PCRs).
const DYNAMIC: core::ops::RangeInclusive<usize> = 17..=22;

/// The value a PCR holds after TPM_Init (and so after Startup(ST_CLEAR)).
pub fn reset_value(index: usize) -> [u8; 20] {
    if (17..=22).contains(&index) {
        [0xFF; 20]
    } else {
        [0; 20]
    }
}

/// True if `index` is a PCR with the pcrReset attribute.
pub fn is_resettable(index: usize) -> bool {
    RESET_LOCALITIES.get(index).is_some_and(|m| *m != 0)
}

/// The bank of PCR values.
#[derive(Clone)]
pub struct PcrBank {
    pub values: [[u8; 20]; NUM_PCRS],
}

impl PcrBank {
    /// The bank as Startup(ST_CLEAR) leaves it.
    pub fn cleared() -> Self {
        let mut values = [[0u8; 20]; NUM_PCRS];
        for (i, v) in values.iter_mut().enumerate() {
            *v = reset_value(i);
        }
        PcrBank { values }
    }

    /// Reads a PCR.
    pub fn get(&self, index: u32) -> TpmResult<[u8; 20]> {
        usize::try_from(index).ok().and_then(|i| self.values.get(i)).copied().ok_or(TPM_BADINDEX)
    }

    /// Extends a PCR as `locality` asks: new = SHA1(old ‖ digest).
    pub fn extend(&mut self, locality: u8, index: u32, digest: &[u8; 20]) -> TpmResult<[u8; 20]> {
        let i = usize::try_from(index).map_err(|_| TPM_BADINDEX)?;
        let (Some(v), Some(allowed)) = (self.values.get_mut(i), EXTEND_LOCALITIES.get(i)) else {
            return Err(TPM_BADINDEX);
        };
        if allowed & locality_bit(locality)? == 0 {
            return Err(TPM_BAD_LOCALITY);
        }
        // At its DRTM reset value (zero) the locality-4 PCR takes extends
        // from locality 4 only.
        if i == LOCALITY_4_PCR && locality != 4 && *v == [0; 20] {
            return Err(TPM_BAD_LOCALITY);
        }
        *v = sha1_parts(&[v.as_slice(), digest]);
        Ok(*v)
    }

    /// PCR_Reset of the PCRs in `sel` from `locality`: all or none.
    /// `tos_present` is TPM_STANY_FLAGS.TOSPresent: with it, 17–22 reset to
    /// zero; without it, to all-FF. 16 and 23 always reset to zero.
    pub fn reset(&mut self, locality: u8, sel: &PcrSelection, tos_present: bool) -> TpmResult<()> {
        if sel.is_empty() {
            return Err(TPM_INVALID_PCR_INFO);
        }
        let bit = locality_bit(locality)?;
        for i in sel.indices() {
            let mask = RESET_LOCALITIES.get(i).copied().unwrap_or(0);
            if mask == 0 {
                return Err(TPM_NOTRESETABLE);
            }
            if mask & bit == 0 {
                return Err(TPM_NOTLOCAL);
            }
        }
        for i in sel.indices() {
            if let Some(v) = self.values.get_mut(i) {
                *v = if DYNAMIC.contains(&i) && !tos_present { [0xFF; 20] } else { [0; 20] };
            }
        }
        Ok(())
    }

    /// TPM_HASH_START: the dynamic-launch PCRs 17–22 become zero.
    pub fn hash_start(&mut self) {
        for i in DYNAMIC {
            if let Some(v) = self.values.get_mut(i) {
                *v = [0; 20];
            }
        }
    }

    /// TPM_HASH_END: PCR 17 = SHA1(zero ‖ `digest`), whatever it held
    /// (libtpms extends from the reset value, not from the current one).
    pub fn hash_end(&mut self, digest: &[u8; 20]) {
        if let Some(v) = self.values.get_mut(LOCALITY_4_PCR) {
            *v = sha1_parts(&[&[0; 20], digest]);
        }
    }

    /// TPM_PCR_COMPOSITE of the selected PCRs.
    pub fn composite(&self, sel: &PcrSelection) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + SELECT_BYTES + 4 + 20 * NUM_PCRS);
        sel.write(&mut out);
        let count = sel.indices().count();
        out.put_u32((count as u32).saturating_mul(20));
        for i in sel.indices() {
            if let Some(v) = self.values.get(i) {
                out.put(v);
            }
        }
        out
    }

    /// SHA-1 of the TPM_PCR_COMPOSITE: what PCR_INFO structures hold.
    pub fn composite_hash(&self, sel: &PcrSelection) -> [u8; 20] {
        crate::crypto::sha1(&self.composite(sel))
    }
}

/// The one-hot bit of a locality, refusing localities above 4.
pub fn locality_bit(locality: u8) -> TpmResult<u8> {
    if locality > 4 {
        return Err(TPM_BAD_LOCALITY);
    }
    Ok(1 << locality)
}

/// A TPM_PCR_SELECTION.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PcrSelection {
    /// sizeOfSelect as it arrived (0..=3), kept so structures re-serialise
    /// byte for byte.
    pub size: u16,
    pub bits: [u8; SELECT_BYTES],
}

impl PcrSelection {
    /// Parses a selection; libtpms refuses more than 3 select bytes.
    pub fn read(r: &mut Reader<'_>) -> TpmResult<Self> {
        let size = r.u16()?;
        if usize::from(size) > SELECT_BYTES {
            return Err(TPM_INVALID_PCR_INFO);
        }
        let b = r.bytes(usize::from(size))?;
        let mut bits = [0u8; SELECT_BYTES];
        bits.iter_mut().zip(b).for_each(|(d, s)| *d = *s);
        Ok(PcrSelection { size, bits })
    }

    /// Serialises.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.put_u16(self.size);
        out.put(self.bits.get(..usize::from(self.size)).unwrap_or(&[]));
    }

    /// True if no PCR is selected.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|b| *b == 0)
    }

    /// Selected PCR indices, ascending.
    pub fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        (0..NUM_PCRS).filter(|i| self.bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn sel(bits: [u8; 3]) -> PcrSelection {
        PcrSelection { size: 3, bits }
    }

    #[test]
    fn resettable_pcrs_start_all_ff_and_others_zero() {
        let b = PcrBank::cleared();
        assert_eq!(b.get(16), Ok([0; 20]));
        for i in 17..=22 {
            assert_eq!(b.get(i), Ok([0xFF; 20]));
        }
        assert_eq!(b.get(23), Ok([0; 20]));
        assert_eq!(b.get(24), Err(TPM_BADINDEX));
    }

    #[test]
    fn extend_follows_locality_table() {
        let mut b = PcrBank::cleared();
        assert_eq!(b.extend(0, 17, &[1; 20]), Err(TPM_BAD_LOCALITY));
        assert!(b.extend(4, 17, &[1; 20]).is_ok());
        assert_eq!(b.extend(4, 19, &[1; 20]), Err(TPM_BAD_LOCALITY));
        assert!(b.extend(3, 19, &[1; 20]).is_ok());
        assert_eq!(b.extend(5, 0, &[1; 20]), Err(TPM_BAD_LOCALITY));
        let v = b.extend(0, 10, &[1; 20]).unwrap();
        assert_eq!(v, sha1_parts(&[&[0; 20], &[1; 20]]));
    }

    #[test]
    fn reset_follows_locality_table_and_is_all_or_nothing() {
        let mut b = PcrBank::cleared();
        b.extend(0, 16, &[1; 20]).unwrap();
        assert_eq!(b.reset(0, &sel([0, 0, 0x02]), false), Err(TPM_NOTLOCAL)); // 17
        assert_eq!(b.reset(0, &sel([0, 0x04, 0]), false), Err(TPM_NOTRESETABLE)); // 10
        assert_eq!(b.reset(0, &sel([0, 0, 0x03]), false), Err(TPM_NOTLOCAL));
        assert_ne!(b.get(16).unwrap(), [0; 20]);
        assert_eq!(b.reset(0, &sel([0; 3]), false), Err(TPM_INVALID_PCR_INFO));
        b.reset(0, &sel([0, 0, 0x01]), false).unwrap();
        assert_eq!(b.get(16).unwrap(), [0; 20]);
        b.extend(4, 17, &[1; 20]).unwrap();
        b.reset(4, &sel([0, 0, 0x02]), false).unwrap();
        assert_eq!(b.get(17).unwrap(), [0xFF; 20]);
        b.reset(2, &sel([0, 0, 0x20]), false).unwrap();
        assert_eq!(b.get(21).unwrap(), [0xFF; 20]);
    }

    #[test]
    fn reset_value_depends_on_tos_present() {
        let mut b = PcrBank::cleared();
        b.extend(2, 20, &[1; 20]).unwrap();
        b.extend(0, 23, &[1; 20]).unwrap();
        b.reset(2, &sel([0, 0, 0x10]), false).unwrap();
        assert_eq!(b.get(20).unwrap(), [0xFF; 20]);
        b.reset(2, &sel([0, 0, 0x10]), true).unwrap();
        assert_eq!(b.get(20).unwrap(), [0; 20]);
        b.reset(0, &sel([0, 0, 0x80]), false).unwrap();
        assert_eq!(b.get(23).unwrap(), [0; 20]);
    }

    #[test]
    fn drtm_sequence_and_the_locality_4_pcr() {
        let mut b = PcrBank::cleared();
        b.extend(0, 10, &[1; 20]).unwrap();
        let pcr10 = b.get(10).unwrap();
        b.hash_start();
        for i in 17..=22 {
            assert_eq!(b.get(i).unwrap(), [0; 20]);
        }
        assert_eq!(b.get(10).unwrap(), pcr10);
        // At zero, PCR 17 takes extends from locality 4 only.
        assert_eq!(b.extend(3, 17, &[1; 20]), Err(TPM_BAD_LOCALITY));
        b.hash_end(&[2; 20]);
        assert_eq!(b.get(17).unwrap(), sha1_parts(&[&[0; 20], &[2; 20]]));
        assert!(b.extend(3, 17, &[1; 20]).is_ok());
        // After a reset with TOSPresent it is zero again.
        b.reset(4, &sel([0, 0, 0x02]), true).unwrap();
        assert_eq!(b.extend(2, 17, &[1; 20]), Err(TPM_BAD_LOCALITY));
        assert!(b.extend(4, 17, &[1; 20]).is_ok());
    }

    #[test]
    fn selection_refuses_more_than_three_bytes() {
        assert_eq!(PcrSelection::read(&mut Reader::new(&[0, 4, 0, 0, 0, 0])), Err(TPM_INVALID_PCR_INFO));
        let s = PcrSelection::read(&mut Reader::new(&[0, 2, 0x81, 0x00])).unwrap();
        assert_eq!(s.indices().collect::<Vec<_>>(), [0, 7]);
        let mut out = Vec::new();
        s.write(&mut out);
        assert_eq!(out, [0, 2, 0x81, 0]);
    }

    #[test]
    fn composite_layout() {
        let b = PcrBank::cleared();
        let c = b.composite(&sel([0x01, 0, 0]));
        assert_eq!(c.len(), 2 + 3 + 4 + 20);
        assert_eq!(&c[..9], &[0, 3, 1, 0, 0, 0, 0, 0, 20]);
    }
}
