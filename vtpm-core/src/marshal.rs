//! Big-endian reading and writing of TPM wire data.
//!
//! Every read is bounds-checked and fails with `TPM_BAD_PARAM_SIZE`, which
//! is what libtpms answers when a command's parameters run out early. Nothing
//! here can panic on guest data.

use crate::consts::TPM_BAD_PARAM_SIZE;
use alloc::vec::Vec;

/// Largest sized buffer libtpms will allocate (TPM_ALLOC_MAX).
pub const ALLOC_MAX: u32 = 0x20000;

/// A TPM return code.
pub type Rc = u32;
/// Result of a command step: a value or the TPM return code that ends it.
pub type TpmResult<T> = Result<T, Rc>;

/// A cursor over command bytes.
#[derive(Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The unread bytes, without consuming them.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// Takes `n` bytes.
    pub fn bytes(&mut self, n: usize) -> TpmResult<&'a [u8]> {
        if n > self.buf.len() {
            return Err(TPM_BAD_PARAM_SIZE);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> TpmResult<[u8; N]> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub fn u8(&mut self) -> TpmResult<u8> {
        Ok(self.array::<1>()?[0])
    }

    /// A TPM_BOOL: libtpms refuses values other than 0 and 1.
    pub fn bool(&mut self) -> TpmResult<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(crate::consts::TPM_BAD_PARAMETER),
        }
    }

    pub fn u16(&mut self) -> TpmResult<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> TpmResult<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> TpmResult<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A 20-byte digest or nonce.
    pub fn digest(&mut self) -> TpmResult<[u8; 20]> {
        self.array()
    }

    /// A buffer preceded by its u32 size. Like libtpms, a size above
    /// [`ALLOC_MAX`] is `TPM_SIZE`, one beyond the command `TPM_BAD_PARAM_SIZE`.
    pub fn sized32(&mut self) -> TpmResult<&'a [u8]> {
        let n = self.u32()?;
        if n > ALLOC_MAX {
            return Err(crate::consts::TPM_SIZE);
        }
        self.bytes(usize::try_from(n).map_err(|_| TPM_BAD_PARAM_SIZE)?)
    }

    /// A buffer preceded by its u16 size.
    pub fn sized16(&mut self) -> TpmResult<&'a [u8]> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }

    /// Fails unless everything was read.
    pub fn finish(&self) -> TpmResult<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(TPM_BAD_PARAM_SIZE)
        }
    }
}

/// Big-endian appends to a byte vector.
pub trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put(&mut self, b: &[u8]);
    /// A buffer preceded by its u32 size.
    fn put_sized32(&mut self, b: &[u8]);
    /// A buffer preceded by its u16 size.
    fn put_sized16(&mut self, b: &[u8]);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
    fn put_sized32(&mut self, b: &[u8]) {
        // Sizes written here are of TPM-made structures, all far below 4 GiB.
        self.put_u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.extend_from_slice(b);
    }
    fn put_sized16(&mut self, b: &[u8]) {
        self.put_u16(u16::try_from(b.len()).unwrap_or(u16::MAX));
        self.extend_from_slice(b);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn reads_big_endian_and_refuses_short_input() {
        let mut r = Reader::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.u32(), Ok(2));
        assert_eq!(r.u32(), Err(TPM_BAD_PARAM_SIZE));
        assert_eq!(r.u8(), Ok(9));
        assert!(r.finish().is_ok());
    }

    #[test]
    fn sized_buffer_cannot_lie_about_its_length() {
        let mut r = Reader::new(&[0xFF, 0xFF, 0xFF, 0xFF, 1]);
        assert_eq!(r.sized32(), Err(crate::consts::TPM_SIZE));
        let mut r = Reader::new(&[0, 2, 0, 0, 1]);
        assert_eq!(r.sized32(), Err(TPM_BAD_PARAM_SIZE));
        let mut r = Reader::new(&[0, 0, 0, 1, 7]);
        assert_eq!(r.sized32(), Ok(&[7u8][..]));
    }

    #[test]
    fn bool_refuses_values_above_one() {
        assert_eq!(Reader::new(&[2]).bool(), Err(crate::consts::TPM_BAD_PARAMETER));
        assert_eq!(Reader::new(&[1]).bool(), Ok(true));
    }

    #[test]
    fn writer_emits_big_endian() {
        let mut v = Vec::new();
        v.put_u16(0x0102);
        v.put_u32(0x0304_0506);
        v.put_sized16(&[7]);
        assert_eq!(v, [1, 2, 3, 4, 5, 6, 0, 1, 7]);
    }
}
