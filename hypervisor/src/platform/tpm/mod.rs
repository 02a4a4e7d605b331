//! The platform TPM: the chip on the machine, which CTVM keeps for itself.
//!
//! - [`tis`] and [`crb`]: the two register interfaces (TIS/FIFO, for TPM
//!   1.2 and 2.0, and the Command Response Buffer of TPM 2.0), each a
//!   [`Transport`] over [`super::Mmio`].
//! - [`tpm2`] and [`tpm12`]: command marshalling and the operations CTVM
//!   needs (start-up, extend, PCR reads, sealing, monotonic counters).
//! - [`agile`]: the TCG crypto-agile event log (TPM 2.0); TPM 1.2 uses the
//!   SHA-1 log of [`crate::tpm::event_log`].
//! - [`launch`]: what CTVM measures at launch, and the measured launch itself.
//! - [`seal`]: the vTPM state key sealed to the launch PCRs, and a monotonic counter.
//!
//! Guests never reach the chip: its ACPI tables are hidden from them and
//! its registers sit under their vTIS, at the same address.

pub mod agile;
pub mod crb;
pub mod launch;
pub mod seal;
pub mod tis;
pub mod tpm12;
pub mod tpm2;

use alloc::vec::Vec;

use super::Reader;

/// The chip's registers, as every PC Client TPM has them.
pub const TPM_BASE: u64 = 0xfed4_0000;
/// Five localities, 4 KiB each.
pub const TPM_WINDOW: u64 = 0x5000;

/// Sends one command and returns the chip's response.
pub trait Transport {
    /// Requests the locality first if it was given up.
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError>;
    /// Gives the locality up, so that another (tboot at shutdown) can have it.
    fn relinquish(&mut self) {}
}

impl<T: Transport + ?Sized> Transport for alloc::boxed::Box<T> {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        (**self).transmit(command)
    }
    fn relinquish(&mut self) {
        (**self).relinquish()
    }
}

/// Why the interface failed (not the command: that is the response code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportError {
    /// The chip did not reach the state waited for.
    Timeout(&'static str),
    /// A response that does not fit the interface (size below 10, above the buffer).
    Protocol(&'static str),
    /// A command larger than the interface takes.
    TooLong,
}

impl core::fmt::Display for TransportError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Timeout(what) => write!(f, "timeout waiting for {what}"),
            Self::Protocol(what) => write!(f, "interface error: {what}"),
            Self::TooLong => write!(f, "command too long for the interface"),
        }
    }
}

/// TPM 1.2 or 2.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V12,
    V2,
}

/// How the chip is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    /// TIS 1.2 or the PTP FIFO interface, at [`TPM_BASE`].
    Tis,
    /// The Command Response Buffer interface; its locality-0 page.
    Crb { base: u64 },
}

/// What ACPI says about the platform TPM: a TPM2 table (2.0, with its
/// start method) or a TCPA table (1.2, TIS). A TPM2 table with a start
/// method CTVM cannot drive (ACPI start, an SMC call) is reported as such.
pub fn from_acpi(tpm2: Option<&[u8]>, tcpa: Option<&[u8]>) -> Result<(Family, Interface), AcpiTpmError> {
    if let Some(t) = tpm2 {
        let r = Reader(t);
        let start = r.u32(48).ok_or(AcpiTpmError::Malformed)?;
        let control = r.u64(40).ok_or(AcpiTpmError::Malformed)?;
        return match start {
            6 => Ok((Family::V2, Interface::Tis)),
            7 => {
                // The control area lives at +0x40 in the locality-0 page.
                let base = control & !0xfff;
                if base != TPM_BASE {
                    return Err(AcpiTpmError::Address(control));
                }
                Ok((Family::V2, Interface::Crb { base }))
            }
            other => Err(AcpiTpmError::StartMethod(other)),
        };
    }
    if tcpa.is_some() {
        return Ok((Family::V12, Interface::Tis));
    }
    Err(AcpiTpmError::None)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiTpmError {
    /// No TPM2 or TCPA table.
    None,
    Malformed,
    /// A start method other than TIS (6) or CRB (7).
    StartMethod(u32),
    /// A CRB control area away from the standard address.
    Address(u64),
}

impl core::fmt::Display for AcpiTpmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::None => write!(f, "no TPM2 or TCPA ACPI table"),
            Self::Malformed => write!(f, "the TPM2 table is malformed"),
            Self::StartMethod(m) => write!(f, "start method {m} is not supported (TIS 6 and CRB 7 are)"),
            Self::Address(a) => write!(f, "CRB control area at {a:#x}, not in the TPM's standard page"),
        }
    }
}

/// Big-endian writer for command bodies.
#[derive(Default)]
pub(crate) struct Out(pub Vec<u8>);

impl Out {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A TPM2B: u16 size, then the bytes.
    pub fn sized(&mut self, v: &[u8]) -> &mut Self {
        self.u16(v.len() as u16).bytes(v)
    }
}

/// Big-endian reader for responses: every read is bounds-checked.
pub(crate) struct In<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> In<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        In { bytes, at: 0 }
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    /// A TPM2B: u16 size, then that many bytes.
    pub fn sized(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
    pub fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at.min(self.bytes.len())..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tpm2_table(start: u32, control: u64) -> Vec<u8> {
        let mut t = alloc::vec![0u8; 76];
        t[..4].copy_from_slice(b"TPM2");
        t[40..48].copy_from_slice(&control.to_le_bytes());
        t[48..52].copy_from_slice(&start.to_le_bytes());
        t
    }

    #[test]
    fn acpi_names_the_family_and_interface() {
        assert_eq!(from_acpi(Some(&tpm2_table(6, 0)), None), Ok((Family::V2, Interface::Tis)));
        assert_eq!(
            from_acpi(Some(&tpm2_table(7, 0xfed4_0040)), None),
            Ok((Family::V2, Interface::Crb { base: TPM_BASE }))
        );
        assert_eq!(from_acpi(None, Some(b"TCPA")), Ok((Family::V12, Interface::Tis)));
        assert_eq!(from_acpi(None, None), Err(AcpiTpmError::None));
        assert_eq!(from_acpi(Some(&tpm2_table(2, 0)), None), Err(AcpiTpmError::StartMethod(2)));
        // A CRB elsewhere is refused rather than mapped for the hypervisor.
        assert_eq!(from_acpi(Some(&tpm2_table(7, 0x1000_0040)), None), Err(AcpiTpmError::Address(0x1000_0040)));
        assert_eq!(from_acpi(Some(&tpm2_table(7, 0)[..44]), None), Err(AcpiTpmError::Malformed));
    }
}
