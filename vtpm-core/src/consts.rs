//! Wire constants of TPM 1.2 (TPM Main Part 2, "Structures"), limited to what
//! this engine speaks.
#![allow(missing_docs)]

// Command and response tags.
pub const TAG_RQU_COMMAND: u16 = 0x00C1;
pub const TAG_RQU_AUTH1_COMMAND: u16 = 0x00C2;
pub const TAG_RQU_AUTH2_COMMAND: u16 = 0x00C3;
pub const TAG_RSP_COMMAND: u16 = 0x00C4;

// Return codes.
pub const TPM_SUCCESS: u32 = 0x00;
pub const TPM_AUTHFAIL: u32 = 0x01;
pub const TPM_BADINDEX: u32 = 0x02;
pub const TPM_BAD_PARAMETER: u32 = 0x03;
pub const TPM_CLEAR_DISABLED: u32 = 0x05;
pub const TPM_DEACTIVATED: u32 = 0x06;
pub const TPM_DISABLED: u32 = 0x07;
pub const TPM_DISABLED_CMD: u32 = 0x08;
pub const TPM_FAIL: u32 = 0x09;
pub const TPM_BAD_ORDINAL: u32 = 0x0A;
pub const TPM_INSTALL_DISABLED: u32 = 0x0B;
pub const TPM_INVALID_KEYHANDLE: u32 = 0x0C;
pub const TPM_KEYNOTFOUND: u32 = 0x0D;
pub const TPM_INAPPROPRIATE_ENC: u32 = 0x0E;
pub const TPM_INVALID_PCR_INFO: u32 = 0x10;
pub const TPM_NOSPACE: u32 = 0x11;
pub const TPM_NOSRK: u32 = 0x12;
pub const TPM_NOTSEALED_BLOB: u32 = 0x13;
pub const TPM_OWNER_SET: u32 = 0x14;
pub const TPM_RESOURCES: u32 = 0x15;
pub const TPM_SIZE: u32 = 0x17;
pub const TPM_WRONGPCRVAL: u32 = 0x18;
pub const TPM_BAD_PARAM_SIZE: u32 = 0x19;
pub const TPM_SHA_THREAD: u32 = 0x1A;
pub const TPM_FAILEDSELFTEST: u32 = 0x1C;
pub const TPM_AUTH2FAIL: u32 = 0x1D;
pub const TPM_BADTAG: u32 = 0x1E;
pub const TPM_INVALID_AUTHHANDLE: u32 = 0x22;
pub const TPM_NO_ENDORSEMENT: u32 = 0x23;
pub const TPM_INVALID_KEYUSAGE: u32 = 0x24;
pub const TPM_WRONG_ENTITYTYPE: u32 = 0x25;
pub const TPM_INVALID_POSTINIT: u32 = 0x26;
pub const TPM_BAD_KEY_PROPERTY: u32 = 0x28;
pub const TPM_BAD_MIGRATION: u32 = 0x29;
pub const TPM_BAD_SCHEME: u32 = 0x2A;
pub const TPM_BAD_DATASIZE: u32 = 0x2B;
pub const TPM_BAD_MODE: u32 = 0x2C;
pub const TPM_BAD_PRESENCE: u32 = 0x2D;
pub const TPM_BAD_VERSION: u32 = 0x2E;
pub const TPM_NOTRESETABLE: u32 = 0x32;
pub const TPM_NOTLOCAL: u32 = 0x33;
pub const TPM_BAD_TYPE: u32 = 0x34;
pub const TPM_INVALID_RESOURCE: u32 = 0x35;
pub const TPM_BAD_LOCALITY: u32 = 0x3D;
pub const TPM_READ_ONLY: u32 = 0x3E;
pub const TPM_PER_NOWRITE: u32 = 0x3F;
pub const TPM_AUTH_CONFLICT: u32 = 0x3B;
pub const TPM_AREA_LOCKED: u32 = 0x3C;
pub const TPM_MAXNVWRITES: u32 = 0x48;
pub const TPM_INVALID_STRUCTURE: u32 = 0x43;
pub const TPM_KEY_OWNER_CONTROL: u32 = 0x44;
pub const TPM_BAD_COUNTER: u32 = 0x45;
pub const TPM_NOT_FULLWRITE: u32 = 0x46;
pub const TPM_OWNER_CONTROL: u32 = 0x4F;
pub const TPM_BAD_HANDLE: u32 = 0x58;
pub const TPM_NOOPERATOR: u32 = 0x49;
pub const TPM_DECRYPT_ERROR: u32 = 0x21;
pub const TPM_INAPPROPRIATE_SIG: u32 = 0x27;
pub const TPM_NEEDS_SELFTEST: u32 = 0x801;
pub const TPM_DOING_SELFTEST: u32 = 0x802;
pub const TPM_DEFEND_LOCK_RUNNING: u32 = 0x803;

// Ordinals.
pub const ORD_OIAP: u32 = 0x0A;
pub const ORD_OSAP: u32 = 0x0B;
pub const ORD_TAKE_OWNERSHIP: u32 = 0x0D;
pub const ORD_CHANGE_AUTH_OWNER: u32 = 0x10;
pub const ORD_EXTEND: u32 = 0x14;
pub const ORD_PCR_READ: u32 = 0x15;
pub const ORD_QUOTE: u32 = 0x16;
pub const ORD_SEAL: u32 = 0x17;
pub const ORD_UNSEAL: u32 = 0x18;
pub const ORD_UNBIND: u32 = 0x1E;
pub const ORD_CREATE_WRAP_KEY: u32 = 0x1F;
pub const ORD_LOAD_KEY: u32 = 0x20;
pub const ORD_GET_PUB_KEY: u32 = 0x21;
pub const ORD_EVICT_KEY: u32 = 0x22;
pub const ORD_SIGN: u32 = 0x3C;
pub const ORD_QUOTE2: u32 = 0x3E;
pub const ORD_RESET_LOCK_VALUE: u32 = 0x40;
pub const ORD_LOAD_KEY2: u32 = 0x41;
pub const ORD_GET_RANDOM: u32 = 0x46;
pub const ORD_STIR_RANDOM: u32 = 0x47;
pub const ORD_SELF_TEST_FULL: u32 = 0x50;
pub const ORD_CONTINUE_SELF_TEST: u32 = 0x53;
pub const ORD_GET_TEST_RESULT: u32 = 0x54;
pub const ORD_OWNER_CLEAR: u32 = 0x5B;
pub const ORD_FORCE_CLEAR: u32 = 0x5D;
pub const ORD_GET_CAPABILITY: u32 = 0x65;
pub const ORD_GET_CAPABILITY_OWNER: u32 = 0x66;
pub const ORD_PHYSICAL_ENABLE: u32 = 0x6F;
pub const ORD_PHYSICAL_DISABLE: u32 = 0x70;
pub const ORD_SET_OWNER_INSTALL: u32 = 0x71;
pub const ORD_PHYSICAL_SET_DEACTIVATED: u32 = 0x72;
pub const ORD_CREATE_ENDORSEMENT_KEY_PAIR: u32 = 0x78;
pub const ORD_MAKE_IDENTITY: u32 = 0x79;
pub const ORD_ACTIVATE_IDENTITY: u32 = 0x7A;
pub const ORD_READ_PUBEK: u32 = 0x7C;
pub const ORD_DISABLE_PUBEK_READ: u32 = 0x7E;
pub const ORD_OWNER_READ_INTERNAL_PUB: u32 = 0x81;
pub const ORD_TERMINATE_HANDLE: u32 = 0x96;
pub const ORD_SAVE_STATE: u32 = 0x98;
pub const ORD_STARTUP: u32 = 0x99;
pub const ORD_FLUSH_SPECIFIC: u32 = 0xBA;
pub const ORD_PCR_RESET: u32 = 0xC8;
pub const ORD_NV_DEFINE_SPACE: u32 = 0xCC;
pub const ORD_NV_WRITE_VALUE: u32 = 0xCD;
pub const ORD_NV_WRITE_VALUE_AUTH: u32 = 0xCE;
pub const ORD_NV_READ_VALUE: u32 = 0xCF;
pub const ORD_NV_READ_VALUE_AUTH: u32 = 0xD0;
pub const ORD_GET_TICKS: u32 = 0xF1;
pub const TSC_ORD_PHYSICAL_PRESENCE: u32 = 0x4000_000A;

// Startup types.
pub const ST_CLEAR: u16 = 1;
pub const ST_STATE: u16 = 2;
pub const ST_DEACTIVATED: u16 = 3;

// Structure tags.
pub const TAG_PCR_INFO_LONG: u16 = 0x0006;
pub const TAG_EK_BLOB: u16 = 0x000C;
pub const TAG_CURRENT_TICKS: u16 = 0x0014;
pub const TAG_STORED_DATA12: u16 = 0x0016;
pub const TAG_NV_ATTRIBUTES: u16 = 0x0017;
pub const TAG_NV_DATA_PUBLIC: u16 = 0x0018;
pub const TAG_PERMANENT_FLAGS: u16 = 0x001F;
pub const TAG_STCLEAR_FLAGS: u16 = 0x0020;
pub const TAG_KEY12: u16 = 0x0028;
pub const TAG_EK_BLOB_ACTIVATE: u16 = 0x002B;
pub const TAG_CAP_VERSION_INFO: u16 = 0x0030;
pub const TAG_QUOTE_INFO2: u16 = 0x0036;

// Key handles with fixed meaning.
pub const KH_SRK: u32 = 0x4000_0000;
pub const KH_OWNER: u32 = 0x4000_0001;
pub const KH_EK: u32 = 0x4000_0006;

// Entity types for OSAP.
pub const ET_KEYHANDLE: u16 = 0x0001;
pub const ET_OWNER: u16 = 0x0002;
pub const ET_SRK: u16 = 0x0004;
pub const ET_NV: u16 = 0x000B;

// Resource types for FlushSpecific.
pub const RT_KEY: u32 = 1;
pub const RT_AUTH: u32 = 2;

// Key usage, flags and schemes.
pub const KEY_SIGNING: u16 = 0x0010;
pub const KEY_STORAGE: u16 = 0x0011;
pub const KEY_IDENTITY: u16 = 0x0012;
pub const KEY_AUTHCHANGE: u16 = 0x0013;
pub const KEY_BIND: u16 = 0x0014;
pub const KEY_LEGACY: u16 = 0x0015;
pub const KEY_MIGRATE: u16 = 0x0016;
pub const KEYFLAG_REDIRECTION: u32 = 0x1;
pub const KEYFLAG_MIGRATABLE: u32 = 0x2;
pub const KEYFLAG_VOLATILE: u32 = 0x4;
pub const KEYFLAG_PCR_IGNORED_ON_READ: u32 = 0x8;
pub const KEYFLAG_MIGRATE_AUTHORITY: u32 = 0x10;
/// The defined TPM_KEY_FLAGS bits (TPM 1.2).
pub const KEY_FLAGS_MASK: u32 = 0x1F;
pub const AUTH_NEVER: u8 = 0x00;
pub const AUTH_ALWAYS: u8 = 0x01;
pub const AUTH_PRIV_USE_ONLY: u8 = 0x03;
pub const ALG_RSA: u32 = 0x0000_0001;
pub const ES_NONE: u16 = 0x0001;
pub const ES_RSAESPKCSV15: u16 = 0x0002;
pub const ES_RSAESOAEP_SHA1_MGF1: u16 = 0x0003;
pub const SS_NONE: u16 = 0x0001;
pub const SS_RSASSAPKCS1V15_SHA1: u16 = 0x0002;
pub const SS_RSASSAPKCS1V15_DER: u16 = 0x0003;
pub const SS_RSASSAPKCS1V15_INFO: u16 = 0x0004;

// Payload types inside encrypted blobs.
pub const PT_ASYM: u8 = 0x01;
pub const PT_BIND: u8 = 0x02;
pub const PT_SEAL: u8 = 0x05;

// Protocol ids.
/// TPM_PID_ADCP: the protocol of TPM_ChangeAuthOwner.
pub const PID_ADCP: u16 = 0x0004;
pub const PID_OWNER: u16 = 0x0005;

// Physical presence bits (TSC_PhysicalPresence).
pub const PP_HW_DISABLE: u16 = 0x0200;
pub const PP_CMD_DISABLE: u16 = 0x0100;
pub const PP_LIFETIME_LOCK: u16 = 0x0080;
pub const PP_HW_ENABLE: u16 = 0x0040;
pub const PP_CMD_ENABLE: u16 = 0x0020;
pub const PP_NOTPRESENT: u16 = 0x0010;
pub const PP_PRESENT: u16 = 0x0008;
pub const PP_LOCK: u16 = 0x0004;

// NV.
pub const NV_INDEX_LOCK: u32 = 0xFFFF_FFFF;
pub const NV_INDEX0: u32 = 0x0000_0000;
pub const NV_INDEX_DIR: u32 = 0x1000_0001;
pub const NV_D_BIT: u32 = 0x1000_0000;
pub const NV_PER_PPWRITE: u32 = 0x0000_0001;
pub const NV_PER_OWNERWRITE: u32 = 0x0000_0002;
pub const NV_PER_AUTHWRITE: u32 = 0x0000_0004;
pub const NV_PER_WRITEALL: u32 = 0x0000_1000;
pub const NV_PER_WRITEDEFINE: u32 = 0x0000_2000;
pub const NV_PER_WRITE_STCLEAR: u32 = 0x0000_4000;
pub const NV_PER_GLOBALLOCK: u32 = 0x0000_8000;
pub const NV_PER_PPREAD: u32 = 0x0001_0000;
pub const NV_PER_OWNERREAD: u32 = 0x0002_0000;
pub const NV_PER_AUTHREAD: u32 = 0x0004_0000;
pub const NV_PER_READ_STCLEAR: u32 = 0x8000_0000;

// Capability areas.
pub const CAP_ORD: u32 = 0x01;
pub const CAP_ALG: u32 = 0x02;
pub const CAP_PID: u32 = 0x03;
pub const CAP_FLAG: u32 = 0x04;
pub const CAP_PROPERTY: u32 = 0x05;
pub const CAP_VERSION: u32 = 0x06;
pub const CAP_KEY_HANDLE: u32 = 0x07;
pub const CAP_CHECK_LOADED: u32 = 0x08;
pub const CAP_SYM_MODE: u32 = 0x09;
pub const CAP_KEY_STATUS: u32 = 0x0C;
pub const CAP_NV_LIST: u32 = 0x0D;
pub const CAP_MFR: u32 = 0x10;
pub const CAP_NV_INDEX: u32 = 0x11;
pub const CAP_TRANS_ALG: u32 = 0x12;
pub const CAP_HANDLE: u32 = 0x14;
pub const CAP_TRANS_ES: u32 = 0x15;
pub const CAP_AUTH_ENCRYPT: u32 = 0x17;
pub const CAP_SELECT_SIZE: u32 = 0x18;
pub const CAP_DA_LOGIC: u32 = 0x19;
pub const CAP_VERSION_VAL: u32 = 0x1A;
pub const CAP_FLAG_PERMANENT: u32 = 0x108;
pub const CAP_FLAG_VOLATILE: u32 = 0x109;
