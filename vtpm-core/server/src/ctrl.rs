//! swtpm's control-channel protocol (`include/swtpm/tpm_ioctl.h`, the
//! "non-CUSE" variant): a big-endian u32 command code followed by the
//! request part of the matching `ptm_*` union; the answer is the response part.
//!
//! This module only frames and parses; `device.rs` decides what each command
//! does. Keeping the wire format here lets it be unit-tested byte for byte
//! against what swtpm 0.7 sends on the same requests.

/// Command codes (`enum { CMD_GET_CAPABILITY = 1, ... }` in tpm_ioctl.h).
pub mod code {
    pub const GET_CAPABILITY: u32 = 0x01;
    pub const INIT: u32 = 0x02;
    pub const SHUTDOWN: u32 = 0x03;
    pub const GET_TPMESTABLISHED: u32 = 0x04;
    pub const SET_LOCALITY: u32 = 0x05;
    pub const HASH_START: u32 = 0x06;
    pub const HASH_DATA: u32 = 0x07;
    pub const HASH_END: u32 = 0x08;
    pub const CANCEL_TPM_CMD: u32 = 0x09;
    pub const STORE_VOLATILE: u32 = 0x0a;
    pub const RESET_TPMESTABLISHED: u32 = 0x0b;
    pub const GET_STATEBLOB: u32 = 0x0c;
    pub const SET_STATEBLOB: u32 = 0x0d;
    pub const STOP: u32 = 0x0e;
    pub const GET_CONFIG: u32 = 0x0f;
    pub const SET_DATAFD: u32 = 0x10;
    pub const SET_BUFFERSIZE: u32 = 0x11;
    pub const GET_INFO: u32 = 0x12;
}

/// `PTM_CAP_*` bits answered by CMD_GET_CAPABILITY.
pub mod cap {
    pub const INIT: u64 = 1;
    pub const SHUTDOWN: u64 = 1 << 1;
    pub const GET_TPMESTABLISHED: u64 = 1 << 2;
    pub const SET_LOCALITY: u64 = 1 << 3;
    pub const HASHING: u64 = 1 << 4;
    pub const CANCEL_TPM_CMD: u64 = 1 << 5;
    pub const STORE_VOLATILE: u64 = 1 << 6;
    pub const RESET_TPMESTABLISHED: u64 = 1 << 7;
    pub const GET_STATEBLOB: u64 = 1 << 8;
    pub const SET_STATEBLOB: u64 = 1 << 9;
    pub const STOP: u64 = 1 << 10;
    pub const GET_CONFIG: u64 = 1 << 11;
    pub const SET_DATAFD: u64 = 1 << 12;
    pub const SET_BUFFERSIZE: u64 = 1 << 13;
    pub const GET_INFO: u64 = 1 << 14;
}

/// `PTM_BLOB_TYPE_*` for CMD_GET_STATEBLOB / CMD_SET_STATEBLOB.
pub mod blob {
    pub const PERMANENT: u32 = 1;
    pub const VOLATILE: u32 = 2;
    pub const SAVESTATE: u32 = 3;
}

/// `PTM_STATE_FLAG_ENCRYPTED`: the blob is encrypted with a file key. This
/// server never encrypts its state, so a blob marked encrypted is refused.
pub const STATE_FLAG_ENCRYPTED: u32 = 2;

/// TPM 1.2 result codes used on the control channel (`libtpms/tpm_error.h`).
pub mod rc {
    pub const SUCCESS: u32 = 0x00;
    pub const BAD_PARAMETER: u32 = 0x03;
    pub const FAIL: u32 = 0x09;
    pub const BAD_ORDINAL: u32 = 0x0a;
    pub const BAD_LOCALITY: u32 = 0x3d;
    pub const IOERROR: u32 = 0x1f;
}

/// The buffer sizes swtpm reports for TPM 1.2 through CMD_SET_BUFFERSIZE.
/// vtpm-core bounds commands at 4096 bytes, and swtpm 0.7 answers
/// `min 0xc00, max 0x1000` for TPM 1.2, so the numbers agree.
pub const BUFFER_SIZE: u32 = 4096;
pub const BUFFER_MIN: u32 = 3072;

/// The size of the fixed request that follows `code`, or `None` when the
/// request length is carried inside it (HASH_DATA, SET_STATEBLOB) or unknown.
/// The reader waits for exactly this many bytes, as swtpm's
/// `ctrlchannel_recv_cmd` does, so a split TCP segment is not a short request.
pub fn fixed_request_len(code: u32) -> Option<usize> {
    Some(match code {
        code::INIT => 4,
        code::SET_LOCALITY | code::RESET_TPMESTABLISHED => 1,
        code::GET_STATEBLOB => 12,
        code::SET_BUFFERSIZE => 4,
        code::GET_INFO => 16,
        code::HASH_DATA | code::SET_STATEBLOB => return None,
        _ => 0,
    })
}

/// Length of the header that carries the variable length of HASH_DATA and
/// SET_STATEBLOB requests, and where in it the big-endian length sits.
pub fn variable_request_header(code: u32) -> Option<(usize, usize)> {
    match code {
        // struct { u32 length; u8 data[]; }
        code::HASH_DATA => Some((4, 0)),
        // struct { u32 state_flags; u32 type; u32 length; u8 data[]; }
        code::SET_STATEBLOB => Some((12, 8)),
        _ => None,
    }
}

/// A control request, decoded from its code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    GetCapability,
    Init {
        flags: u32,
    },
    Shutdown,
    Stop,
    GetTpmEstablished,
    ResetTpmEstablished {
        locality: u8,
    },
    SetLocality {
        locality: u8,
    },
    HashStart,
    HashData {
        data: Vec<u8>,
    },
    HashEnd,
    CancelTpmCmd,
    StoreVolatile,
    GetStateBlob {
        flags: u32,
        blob_type: u32,
        offset: u32,
    },
    SetStateBlob {
        flags: u32,
        blob_type: u32,
        data: Vec<u8>,
    },
    GetConfig,
    SetDataFd,
    SetBufferSize {
        size: u32,
    },
    GetInfo {
        flags: u64,
        offset: u32,
    },
    /// A code this protocol does not define: answered with TPM_BAD_ORDINAL.
    Unknown(u32),
}

/// Why a request could not be decoded: swtpm answers TPM_BAD_PARAMETER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadInput;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Request {
    /// Decodes a request body. Commands that take no input refuse trailing
    /// bytes, as swtpm does (`if (n != 0) goto err_bad_input`).
    pub fn parse(code: u32, body: &[u8]) -> Result<Request, BadInput> {
        let exact = |n: usize| {
            if body.len() == n {
                Ok(())
            } else {
                Err(BadInput)
            }
        };
        let at_least = |n: usize| {
            if body.len() >= n {
                Ok(())
            } else {
                Err(BadInput)
            }
        };
        Ok(match code {
            code::GET_CAPABILITY => Request::GetCapability,
            code::INIT => {
                exact(4)?;
                Request::Init { flags: be32(body) }
            }
            code::SHUTDOWN => {
                exact(0)?;
                Request::Shutdown
            }
            code::STOP => {
                exact(0)?;
                Request::Stop
            }
            code::GET_TPMESTABLISHED => {
                exact(0)?;
                Request::GetTpmEstablished
            }
            code::RESET_TPMESTABLISHED => {
                at_least(1)?;
                Request::ResetTpmEstablished { locality: body[0] }
            }
            code::SET_LOCALITY => {
                at_least(1)?;
                Request::SetLocality { locality: body[0] }
            }
            code::HASH_START => Request::HashStart,
            code::HASH_DATA => {
                at_least(4)?;
                let len = be32(body) as usize;
                if body.len() - 4 != len {
                    return Err(BadInput);
                }
                Request::HashData { data: body[4..].to_vec() }
            }
            code::HASH_END => Request::HashEnd,
            code::CANCEL_TPM_CMD => {
                exact(0)?;
                Request::CancelTpmCmd
            }
            code::STORE_VOLATILE => {
                exact(0)?;
                Request::StoreVolatile
            }
            code::GET_STATEBLOB => {
                at_least(12)?;
                Request::GetStateBlob { flags: be32(&body[0..]), blob_type: be32(&body[4..]), offset: be32(&body[8..]) }
            }
            code::SET_STATEBLOB => {
                at_least(12)?;
                let len = be32(&body[8..]) as usize;
                if body.len() - 12 != len {
                    return Err(BadInput);
                }
                Request::SetStateBlob {
                    flags: be32(&body[0..]),
                    blob_type: be32(&body[4..]),
                    data: body[12..].to_vec(),
                }
            }
            code::GET_CONFIG => {
                exact(0)?;
                Request::GetConfig
            }
            code::SET_DATAFD => Request::SetDataFd,
            code::SET_BUFFERSIZE => {
                at_least(4)?;
                Request::SetBufferSize { size: be32(body) }
            }
            code::GET_INFO => {
                at_least(16)?;
                let mut f = [0u8; 8];
                f.copy_from_slice(&body[..8]);
                Request::GetInfo { flags: u64::from_be_bytes(f), offset: be32(&body[8..]) }
            }
            other => Request::Unknown(other),
        })
    }
}

/// Encodes the common answer: a bare `ptm_res`.
pub fn result_only(rc: u32) -> Vec<u8> {
    rc.to_be_bytes().to_vec()
}

/// Encodes `ptm_est.resp`: result, the bit, and three bytes of padding,
/// which swtpm sends because it writes `sizeof(te->u.resp)`.
pub fn established(rc: u32, bit: bool) -> Vec<u8> {
    let mut v = rc.to_be_bytes().to_vec();
    v.extend_from_slice(&[bit as u8, 0, 0, 0]);
    v
}

/// Encodes `ptm_getstate.resp` without the data buffer's unused tail.
pub fn state_blob(rc: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&rc.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes()); // never encrypted
    v.extend_from_slice(&(data.len() as u32).to_be_bytes()); // totlength
    v.extend_from_slice(&(data.len() as u32).to_be_bytes()); // length
    v.extend_from_slice(data);
    v
}

/// Encodes `ptm_setbuffersize.resp`.
pub fn buffer_size(size: u32, min: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    for x in [rc::SUCCESS, size, min, max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// Encodes `ptm_getinfo.resp` for a NUL-terminated JSON string, from
/// `offset` on, the way swtpm does (totlength counts the NUL).
pub fn info(text: &str, offset: u32) -> Vec<u8> {
    let mut s = text.as_bytes().to_vec();
    s.push(0);
    let offset = offset as usize;
    if offset >= text.len() {
        return result_only(rc::BAD_PARAMETER);
    }
    let part = &s[offset..];
    let mut v = Vec::with_capacity(12 + part.len());
    v.extend_from_slice(&rc::SUCCESS.to_be_bytes());
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(&(part.len() as u32).to_be_bytes());
    v.extend_from_slice(part);
    v
}

/// `TPMLIB_INFO_TPMSPECIFICATION` and `TPMLIB_INFO_TPMATTRIBUTES`.
pub const INFO_TPMSPECIFICATION: u64 = 1;
pub const INFO_TPMATTRIBUTES: u64 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_needs_exactly_its_flags() {
        assert_eq!(Request::parse(code::INIT, &[0, 0, 0, 1]), Ok(Request::Init { flags: 1 }));
        assert_eq!(Request::parse(code::INIT, &[0, 0, 1]), Err(BadInput));
        assert_eq!(Request::parse(code::INIT, &[0; 5]), Err(BadInput));
    }

    #[test]
    fn input_less_commands_refuse_trailing_bytes() {
        assert_eq!(Request::parse(code::SHUTDOWN, &[]), Ok(Request::Shutdown));
        assert_eq!(Request::parse(code::SHUTDOWN, &[0]), Err(BadInput));
        assert_eq!(Request::parse(code::STOP, &[1, 2]), Err(BadInput));
    }

    #[test]
    fn unknown_codes_are_kept_for_bad_ordinal() {
        assert_eq!(Request::parse(0x13, &[]), Ok(Request::Unknown(0x13)));
        assert_eq!(Request::parse(0xffff_ffff, &[1]), Ok(Request::Unknown(0xffff_ffff)));
    }

    #[test]
    fn set_stateblob_length_must_match_its_data() {
        let mut body = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3];
        body.extend_from_slice(&[7, 8, 9]);
        assert_eq!(
            Request::parse(code::SET_STATEBLOB, &body),
            Ok(Request::SetStateBlob { flags: 0, blob_type: 1, data: vec![7, 8, 9] })
        );
        body.push(10);
        assert_eq!(Request::parse(code::SET_STATEBLOB, &body), Err(BadInput));
    }

    #[test]
    fn hash_data_length_must_match_its_data() {
        assert_eq!(Request::parse(code::HASH_DATA, &[0, 0, 0, 2, 7, 8]), Ok(Request::HashData { data: vec![7, 8] }));
        assert_eq!(Request::parse(code::HASH_DATA, &[0, 0, 0, 0]), Ok(Request::HashData { data: vec![] }));
        assert_eq!(Request::parse(code::HASH_DATA, &[0, 0, 0, 3, 7, 8]), Err(BadInput));
        assert_eq!(Request::parse(code::HASH_DATA, &[0, 0]), Err(BadInput));
    }

    #[test]
    fn responses_have_swtpm_layout() {
        // Bytes captured from swtpm 0.7.1 on the same requests.
        assert_eq!(established(0, false), hex("0000000000000000"));
        assert_eq!(buffer_size(4096, 3072, 4096), hex("00000000000010000000 0c0000001000"));
        let spec = r#"{"TPMSpecification":{"family":"1.2","level":2,"revision":116}}"#;
        let got = info(spec, 0);
        assert_eq!(&got[..12], &hex("000000000000003f0000003f")[..]);
        assert_eq!(got.last(), Some(&0));
        assert_eq!(info(spec, 200), result_only(rc::BAD_PARAMETER));
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }
}
