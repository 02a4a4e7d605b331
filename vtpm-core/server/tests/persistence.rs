//! State written before the answer: a TPM server killed with SIGKILL right
//! after acknowledging a change must come back with that change. Run on
//! swtpm (which proves the test) and on the vtpm-server binary.

mod support;

use support::backend::{Program, ServerProcess, Start, TempDir};
use support::client::Client;
use support::tpm12::*;

const OWNER: Digest20 = WELL_KNOWN;
const NV_INDEX: u32 = 0x0001_5000;

fn owned(c: &mut Client<'_>) -> bool {
    let v = c.property(support::client::Kind::Exact, cap::PROP_OWNER).expect("GetCapability(PROP_OWNER)");
    v == [1]
}

fn survives_sigkill(program: Program) {
    let dir = TempDir::new("sigkill");
    let state = dir.path().join("state");
    let name = program.name();

    // Take ownership, and kill the server the moment the answer is in.
    let mut tpm = ServerProcess::start_in_dir(program, &state, Start::StartupClear);
    let ek = {
        let mut c = Client::new(&mut tpm.tpm);
        let ek = c.read_pubek().expect("ReadPubek");
        c.take_ownership(&ek, &OWNER, &OWNER).expect("TakeOwnership");
        ek
    };
    tpm.kill();

    let mut tpm = ServerProcess::start_in_dir(program, &state, Start::StartupClear);
    {
        let mut c = Client::new(&mut tpm.tpm);
        assert!(owned(&mut c), "{name}: ownership lost to SIGKILL");
        let perms = TPM_NV_PER_OWNERWRITE | TPM_NV_PER_OWNERREAD;
        assert_eq!(c.nv_define(&OWNER, NV_INDEX, perms, 16), rc::SUCCESS, "{name}: NV_DefineSpace");
        assert_eq!(c.nv_write(&OWNER, NV_INDEX, 0, b"before the kill"), rc::SUCCESS, "{name}: NV_WriteValue");
    }
    tpm.kill();

    let mut tpm = ServerProcess::start_in_dir(program, &state, Start::StartupClear);
    {
        let mut c = Client::new(&mut tpm.tpm);
        assert_eq!(
            c.nv_read(&OWNER, NV_INDEX, 0, 15),
            Ok(b"before the kill".to_vec()),
            "{name}: NV data lost to SIGKILL"
        );
        // The owner secret still works: the EK read through it is the same.
        let mut s = c.oiap(&OWNER);
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::OWNER_READ_INTERNAL_PUB).u32(TPM_KH_EK);
        let out = c.authorised("OwnerReadInternalPub", support::client::Kind::Shape, cmd, &mut [&mut s], false);
        let ek_now = parse_pubkey(&mut Reader::new(&out.expect("OwnerReadInternalPub after two kills")));
        assert_eq!(ek_now.modulus, ek.modulus, "{name}: the EK changed");
    }
    tpm.stop();
}

#[test]
fn swtpm_state_survives_sigkill() {
    survives_sigkill(Program::Swtpm);
}

#[test]
fn vtpm_server_state_survives_sigkill() {
    survives_sigkill(Program::VtpmServer);
}
