//! NV_DefineSpace, NV_WriteValue(Auth), NV_ReadValue(Auth), NV capabilities.

use super::*;

const NV_AUTH: [u8; 20] = [0x77; 20];

/// TPM_NV_DATA_PUBLIC with empty PCR selections, any locality.
fn nv_pub(index: u32, attrs: u32, size: u32) -> Vec<u8> {
    let short = [&[0u8, 3, 0, 0, 0, 0x1F][..], &[0; 20]].concat();
    Cmd::new(0).u16(0x18).u32(index).raw(&short).raw(&short).u16(0x17).u32(attrs).raw(&[0, 0, 0]).u32(size).body
}

fn define_noauth(t: &mut T, index: u32, attrs: u32, size: u32) -> u32 {
    rc(&t.execute(0, &Cmd::new(ORD_NV_DEFINE_SPACE).raw(&nv_pub(index, attrs, size)).raw(&NV_AUTH).bytes()))
}

fn define_owner(t: &mut T, index: u32, attrs: u32, size: u32) -> Result<Vec<u8>, u32> {
    let mut s = osap(t, ET_OWNER, KH_OWNER, &OWNER);
    let params = [&nv_pub(index, attrs, size)[..], &s.adip(&NV_AUTH)].concat();
    run_authed(t, 0, ORD_NV_DEFINE_SPACE, &[], &params, &mut [(&mut s, OWNER, false)], 0)
}

fn read(index: u32, off: u32, n: u32) -> Vec<u8> {
    Cmd::new(ORD_NV_READ_VALUE).u32(index).u32(off).u32(n).bytes()
}

fn write(index: u32, off: u32, data: &[u8]) -> Vec<u8> {
    Cmd::new(ORD_NV_WRITE_VALUE).u32(index).u32(off).sized(data).bytes()
}

fn lock(t: &mut T) {
    assert_eq!(define_noauth(t, NV_INDEX_LOCK, 0, 0), 0);
}

#[test]
fn unlocked_nv_defines_reads_and_writes_without_auth() {
    let mut t = started();
    assert_eq!(define_noauth(&mut t, 0x1000, NV_PER_OWNERWRITE, 16), 0);
    // Fresh data reads as 0xFF.
    assert_eq!(ok(&mut t, 0, &read(0x1000, 0, 4)), [0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFF]);
    ok(&mut t, 0, &write(0x1000, 2, b"abc"));
    assert_eq!(ok(&mut t, 0, &read(0x1000, 0, 6)), [0, 0, 0, 6, 0xFF, 0xFF, b'a', b'b', b'c', 0xFF]);
    err(&mut t, &write(0x1000, 15, b"abc"), TPM_NOSPACE);
    err(&mut t, &read(0x1000, 8, 16), TPM_NOSPACE);
    err(&mut t, &read(0x1000, u32::MAX, 2), TPM_NOSPACE);
    err(&mut t, &read(0x1999, 0, 1), TPM_BADINDEX);
    // Capabilities list and describe it; the free space shrinks.
    let list = ok(&mut t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_NV_LIST).sized(&[]).bytes());
    assert_eq!(list, [0, 0, 0, 4, 0, 0, 0x10, 0]);
    let idx = ok(&mut t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_NV_INDEX).sized(&0x1000u32.to_be_bytes()).bytes());
    assert_eq!(&idx[4..], &nv_pub(0x1000, NV_PER_OWNERWRITE, 16)[..]);
    err(&mut t, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_NV_INDEX).sized(&0x1999u32.to_be_bytes()).bytes(), TPM_BADINDEX);
    let free = ok(&mut t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_PROPERTY).sized(&0x123u32.to_be_bytes()).bytes());
    assert_eq!(be32(&free[4..]), 0x6FFA - 16 - 53);
    // Redefining replaces; size 0 deletes.
    assert_eq!(define_noauth(&mut t, 0x1000, NV_PER_OWNERWRITE, 8), 0);
    assert_eq!(ok(&mut t, 0, &read(0x1000, 0, 8)), [&[0u8, 0, 0, 8][..], &[0xFF; 8]].concat());
    assert_eq!(define_noauth(&mut t, 0x1000, 0, 0), 0);
    err(&mut t, &read(0x1000, 0, 1), TPM_BADINDEX);
}

#[test]
fn define_space_error_codes_match_libtpms() {
    let mut t = started();
    assert_eq!(define_noauth(&mut t, 0x1001, 0, 16), TPM_PER_NOWRITE);
    assert_eq!(define_noauth(&mut t, 0x1002, NV_PER_OWNERWRITE | NV_PER_AUTHWRITE, 16), TPM_AUTH_CONFLICT);
    assert_eq!(
        define_noauth(&mut t, 0x1002, NV_PER_OWNERREAD | NV_PER_AUTHREAD | NV_PER_PPWRITE, 16),
        TPM_AUTH_CONFLICT
    );
    assert_eq!(define_noauth(&mut t, 0, NV_PER_AUTHWRITE, 16), TPM_BADINDEX);
    assert_eq!(define_noauth(&mut t, 0x1003, NV_PER_AUTHWRITE, 0), TPM_BAD_PARAM_SIZE);
    assert_eq!(define_noauth(&mut t, 0x1005, NV_PER_AUTHWRITE, 0x7000), TPM_NOSPACE);
    // A size libtpms cannot even allocate (above TPM_ALLOC_MAX) is TPM_SIZE.
    assert_eq!(define_noauth(&mut t, 0x1005, NV_PER_AUTHWRITE, 0x0010_0000), TPM_SIZE);
    // A redefinition that fails leaves the old index (libtpms rolls back).
    assert_eq!(define_noauth(&mut t, 0x1006, NV_PER_PPWRITE, 8), 0);
    assert_eq!(define_noauth(&mut t, 0x1006, NV_PER_PPWRITE, 0x0010_0000), TPM_SIZE);
    assert_eq!(define_noauth(&mut t, 0x1006, NV_PER_PPWRITE, 0x7000), TPM_NOSPACE);
    assert!(t.perm.nv.get(0x1006).is_some_and(|i| i.data.len() == 8));
    assert_eq!(define_noauth(&mut t, 0x1006, NV_PER_PPWRITE, 0), 0);
    let mut p = nv_pub(0x1004, NV_PER_AUTHWRITE, 16);
    p[11] = 0; // pcrInfoRead.localityAtRelease
    assert_eq!(rc(&t.execute(0, &Cmd::new(ORD_NV_DEFINE_SPACE).raw(&p).raw(&NV_AUTH).bytes())), TPM_INVALID_STRUCTURE);
    p[0] = 9;
    assert_eq!(rc(&t.execute(0, &Cmd::new(ORD_NV_DEFINE_SPACE).raw(&p).raw(&NV_AUTH).bytes())), TPM_BADTAG);
    // Index count is bounded.
    for i in 0..crate::nv::MAX_INDICES as u32 {
        assert_eq!(define_noauth(&mut t, 0x2000 + i, NV_PER_PPWRITE, 1), 0);
    }
    assert_eq!(define_noauth(&mut t, 0x3000, NV_PER_PPWRITE, 1), TPM_NOSPACE);
}

#[test]
fn auth_attributes_conflict_with_the_wrong_command() {
    // Without an owner the ...Auth commands answer TPM_NOSRK (libtpms).
    let mut t = started();
    assert_eq!(define_noauth(&mut t, 0x1000, NV_PER_AUTHWRITE, 16), 0);
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).u32(0x1000).u32(0).sized(b"hi").body;
    let r = run_authed(&mut t, 0, ORD_NV_WRITE_VALUE_AUTH, &[], &params, &mut [(&mut s, NV_AUTH, true)], 0);
    assert_eq!(r, Err(TPM_NOSRK));
    let mut t = owned();
    assert_eq!(define_noauth(&mut t, 0x1000, NV_PER_AUTHREAD | NV_PER_AUTHWRITE, 16), 0);
    err(&mut t, &read(0x1000, 0, 1), TPM_AUTH_CONFLICT);
    err(&mut t, &write(0x1000, 0, b"x"), TPM_AUTH_CONFLICT);
    // With the index secret it works.
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).u32(0x1000).u32(0).sized(b"hi").body;
    run_authed(&mut t, 0, ORD_NV_WRITE_VALUE_AUTH, &[], &params, &mut [(&mut s, NV_AUTH, true)], 0).unwrap();
    let params = Cmd::new(0).u32(0x1000).u32(0).u32(2).body;
    let out = run_authed(&mut t, 0, ORD_NV_READ_VALUE_AUTH, &[], &params, &mut [(&mut s, NV_AUTH, true)], 0).unwrap();
    assert_eq!(out, [0, 0, 0, 2, b'h', b'i']);
    assert_eq!(
        run_authed(&mut t, 0, ORD_NV_READ_VALUE_AUTH, &[], &params, &mut [(&mut s, [0; 20], true)], 0),
        Err(TPM_AUTHFAIL)
    );
    // ...Auth commands on an index without AUTH attributes conflict.
    assert_eq!(define_noauth(&mut t, 0x1001, NV_PER_PPWRITE, 4), 0);
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).u32(0x1001).u32(0).u32(1).body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_NV_READ_VALUE_AUTH, &[], &params, &mut [(&mut s, NV_AUTH, true)], 0),
        Err(TPM_AUTH_CONFLICT)
    );
}

#[test]
fn writes_without_an_owner_are_limited() {
    let mut t = started();
    assert_eq!(define_noauth(&mut t, 0x1000, NV_PER_PPWRITE, 4), 0);
    for _ in 0..crate::nv::MAX_NV_WRITE_NOOWNER {
        ok(&mut t, 0, &write(0x1000, 0, b"x"));
    }
    err(&mut t, &write(0x1000, 0, b"x"), TPM_MAXNVWRITES);
}

#[test]
fn locked_nv_enforces_owner_presence_and_locks() {
    let mut t = owned();
    lock(&mut t);
    // Without auth a locked TPM needs physical presence to define.
    assert_eq!(define_noauth(&mut t, 0x1000, NV_PER_OWNERWRITE, 4), TPM_BAD_PRESENCE);
    define_owner(&mut t, 0x1000, NV_PER_OWNERWRITE | NV_PER_OWNERREAD, 8).unwrap();
    define_owner(&mut t, 0x1001, NV_PER_PPWRITE | NV_PER_WRITEDEFINE, 4).unwrap();
    define_owner(&mut t, 0x1002, NV_PER_AUTHWRITE | NV_PER_WRITEALL | NV_PER_READ_STCLEAR, 4).unwrap();
    define_owner(&mut t, 0x1003, NV_PER_AUTHWRITE | NV_PER_GLOBALLOCK | NV_PER_WRITE_STCLEAR, 4).unwrap();
    // Owner-protected index: no session → conflict; owner session → fine.
    err(&mut t, &write(0x1000, 0, b"x"), TPM_AUTH_CONFLICT);
    err(&mut t, &read(0x1000, 0, 1), TPM_AUTH_CONFLICT);
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).u32(0x1000).u32(0).sized(b"owner").body;
    run_authed(&mut t, 0, ORD_NV_WRITE_VALUE, &[], &params, &mut [(&mut s, OWNER, true)], 0).unwrap();
    let params = Cmd::new(0).u32(0x1000).u32(0).u32(5).body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_NV_READ_VALUE, &[], &params, &mut [(&mut s, OWNER, true)], 0).unwrap(),
        [&[0u8, 0, 0, 5][..], b"owner"].concat()
    );
    assert_eq!(
        run_authed(&mut t, 0, ORD_NV_READ_VALUE, &[], &params, &mut [(&mut s, [1; 20], true)], 0),
        Err(TPM_AUTHFAIL)
    );
    // PPWRITE needs presence; WRITEDEFINE locks after a zero-length write.
    err(&mut t, &write(0x1001, 0, b"x"), TPM_BAD_PRESENCE);
    ok(&mut t, 0, &Cmd::new(TSC_ORD_PHYSICAL_PRESENCE).u16(PP_PRESENT).bytes());
    ok(&mut t, 0, &write(0x1001, 0, b"x"));
    ok(&mut t, 0, &write(0x1001, 0, b""));
    err(&mut t, &write(0x1001, 0, b"y"), TPM_AREA_LOCKED);
    // WRITEALL requires the whole index.
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).u32(0x1002).u32(0).sized(b"ab").body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_NV_WRITE_VALUE_AUTH, &[], &params, &mut [(&mut s, NV_AUTH, true)], 0),
        Err(TPM_NOT_FULLWRITE)
    );
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).u32(0x1002).u32(0).sized(b"abcd").body;
    run_authed(&mut t, 0, ORD_NV_WRITE_VALUE_AUTH, &[], &params, &mut [(&mut s, NV_AUTH, true)], 0).unwrap();
    // READ_STCLEAR: a zero-length read locks reading until Startup(ST_CLEAR).
    ok(&mut t, 0, &read(0x1002, 0, 0));
    err(&mut t, &read(0x1002, 0, 4), TPM_DISABLED_CMD);
    // GLOBALLOCK: a zero-length write to index 0 locks it for the boot.
    ok(&mut t, 0, &write(NV_INDEX0, 0, b""));
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).u32(0x1003).u32(0).sized(b"z").body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_NV_WRITE_VALUE_AUTH, &[], &params, &mut [(&mut s, NV_AUTH, true)], 0),
        Err(TPM_AREA_LOCKED)
    );
    t.power_on();
    ok(&mut t, 0, &startup(ST_CLEAR));
    assert_eq!(ok(&mut t, 0, &read(0x1002, 0, 4)), [&[0u8, 0, 0, 4][..], b"abcd"].concat());
    let mut s = oiap(&mut t);
    run_authed(&mut t, 0, ORD_NV_WRITE_VALUE_AUTH, &[], &params, &mut [(&mut s, NV_AUTH, true)], 0).unwrap();
    // WRITEDEFINE persists across boots.
    ok(&mut t, 0, &Cmd::new(TSC_ORD_PHYSICAL_PRESENCE).u16(PP_PRESENT).bytes());
    err(&mut t, &write(0x1001, 0, b"y"), TPM_AREA_LOCKED);
    // The owner deletes an index; the lock index needs no owner.
    define_owner(&mut t, 0x1000, 0, 0).unwrap();
    err(&mut t, &read(0x1000, 0, 1), TPM_BADINDEX);
    assert_eq!(define_owner(&mut t, NV_INDEX_LOCK, 0, 0), Err(TPM_BADINDEX));
}

#[test]
fn nv_data_survives_a_restore_and_owner_clear_removes_it() {
    let mut t = owned();
    assert_eq!(define_noauth(&mut t, 0x1000, NV_PER_PPWRITE, 4), 0);
    ok(&mut t, 0, &write(0x1000, 0, b"keep"));
    let blob = t.permanent_state();
    let mut r = Tpm::from_permanent(&blob, TestPlatform::new(8)).unwrap();
    ok(&mut r, 0, &startup(ST_CLEAR));
    assert_eq!(ok(&mut r, 0, &read(0x1000, 0, 4)), [&[0u8, 0, 0, 4][..], b"keep"].concat());
    let mut s = oiap(&mut r);
    run_authed(&mut r, 0, ORD_OWNER_CLEAR, &[], &[], &mut [(&mut s, OWNER, false)], 0).unwrap();
    ok(&mut r, 0, &Cmd::new(TSC_ORD_PHYSICAL_PRESENCE).u16(PP_PRESENT).bytes());
    ok(&mut r, 0, &Cmd::new(ORD_PHYSICAL_ENABLE).bytes());
    err(&mut r, &read(0x1000, 0, 4), TPM_BADINDEX);
}

/// The manufacturer's EK-certificate index: readable by anyone once the
/// chip is locked and owned, writable only by the owner and in full, kept
/// across OwnerClear, in the capability list with the attributes given.
#[test]
fn provisioned_ek_certificate_index_reads_without_authorisation() {
    const EK_CERT: u32 = 0x1000_f000;
    let attrs = NV_PER_OWNERWRITE | NV_PER_WRITEALL;
    let cert = [0x10, 0x01, 0x00, 0x00, 0x05, 0x10, 0x02, 0x30, 0x01, 0x00];
    let mut t = owned();
    lock(&mut t);
    t.clear_dirty();
    t.provision_nv(EK_CERT, attrs, &cert).unwrap();
    assert!(t.permanent_dirty(), "provisioning is persisted");
    let r = ok(&mut t, 0, &read(EK_CERT, 0, cert.len() as u32));
    assert_eq!(&r[4..], &cert, "NV_ReadValue without authorisation");
    let cap = ok(&mut t, 0, &Cmd::new(ORD_GET_CAPABILITY).u32(CAP_NV_INDEX).sized(&EK_CERT.to_be_bytes()).bytes());
    assert_eq!(be32(&cap[4 + 2 + 4 + 26 + 26 + 2..]), attrs);
    // Writes: not without the owner, not in part.
    err(&mut t, &write(EK_CERT, 0, &[0; 10]), TPM_AUTH_CONFLICT);
    let mut s = oiap(&mut t);
    let params = Cmd::new(0).u32(EK_CERT).u32(0).sized(&[1; 4]).body;
    assert_eq!(
        run_authed(&mut t, 0, ORD_NV_WRITE_VALUE, &[], &params, &mut [(&mut s, OWNER, false)], 0),
        Err(TPM_NOT_FULLWRITE)
    );
    // It survives OwnerClear (D bit) and stays readable.
    let mut s = oiap(&mut t);
    run_authed(&mut t, 0, ORD_OWNER_CLEAR, &[], &[], &mut [(&mut s, OWNER, false)], 0).unwrap();
    let mut back = Tpm::from_permanent(&t.permanent_state(), TestPlatform::new(4)).unwrap();
    back.power_on();
    ok(&mut back, 0, &startup(ST_CLEAR));
    assert!(back.permanent_state() == t.permanent_state());
    assert_eq!(back.provision_nv(NV_INDEX_LOCK, attrs, &cert), Err(TPM_BADINDEX));
    assert_eq!(back.provision_nv(EK_CERT, 0, &cert), Err(TPM_PER_NOWRITE), "DefineSpace's attribute rules");
    assert_eq!(back.provision_nv(EK_CERT, attrs, &alloc::vec![0; 0x7000]), Err(TPM_NOSPACE));
}
