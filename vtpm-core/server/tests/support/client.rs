//! A TPM 1.2 client that records every exchange, so that two TPMs driven
//! through the same calls can be compared step by step afterwards.

#![allow(dead_code)]

use super::tpm12::*;

/// Something that runs TPM 1.2 commands.
pub trait Transport {
    fn name(&self) -> &str;
    fn transmit(&mut self, command: &[u8]) -> Vec<u8>;
    /// The locality of the following commands (swtpm's CMD_SET_LOCALITY).
    fn set_locality(&mut self, locality: u8);
}

/// How a step's responses from two TPMs must relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Deterministic: byte for byte.
    Exact,
    /// Carries nonces, keys or signatures: same tag, return code and length.
    Shape,
    /// Vendor-defined output of any length (GetTestResult): same tag and
    /// return code.
    Status,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub label: String,
    pub kind: Kind,
    pub command: Vec<u8>,
    pub response: Vec<u8>,
}

pub struct Client<'t> {
    pub tpm: &'t mut dyn Transport,
    pub nonces: Nonces,
    pub log: Vec<Step>,
    /// Keep the transcript (off for benchmarks, where it would only grow).
    pub record: bool,
}

/// The outcome of a command: its output parameters, or its return code.
pub type Out = Result<Vec<u8>, u32>;

impl<'t> Client<'t> {
    pub fn new(tpm: &'t mut dyn Transport) -> Self {
        Client { tpm, nonces: Nonces::new(0x5eed), log: Vec::new(), record: true }
    }

    pub fn name(&self) -> String {
        self.tpm.name().to_string()
    }

    /// Sends raw bytes and records the exchange.
    pub fn raw(&mut self, label: &str, kind: Kind, command: Vec<u8>) -> Vec<u8> {
        let response = self.tpm.transmit(&command);
        header(&response);
        if self.record {
            self.log.push(Step { label: label.into(), kind, command, response: response.clone() });
        }
        response
    }

    pub fn set_locality(&mut self, locality: u8) {
        self.tpm.set_locality(locality);
    }

    /// An unauthorised command: output parameters or the return code.
    pub fn plain(&mut self, label: &str, kind: Kind, cmd: Cmd) -> Out {
        let r = self.raw(label, kind, cmd.finish());
        let h = header(&r);
        if h.rc != rc::SUCCESS {
            return Err(h.rc);
        }
        assert_eq!(h.tag, tag::RSP_COMMAND, "{}: {label}: wrong response tag", self.name());
        Ok(r[10..].to_vec())
    }

    /// An authorised command: appends one trailer per session, sends, and
    /// verifies each session's resAuth on success.
    pub fn authorised(&mut self, label: &str, kind: Kind, cmd: Cmd, sessions: &mut [&mut Session], cont: bool) -> Out {
        let ordinal = cmd.ordinal();
        let digest = cmd.param_digest();
        let mut buf = cmd.finish();
        let sent: Vec<Sent> =
            sessions.iter().map(|s| authorize(&digest, s, self.nonces.next(), cont, &mut buf)).collect();
        let n = buf.len() as u32;
        buf[2..6].copy_from_slice(&n.to_be_bytes());
        let r = self.raw(label, kind, buf);
        let h = header(&r);
        if h.rc != rc::SUCCESS {
            return Err(h.rc);
        }
        let want = if sessions.len() == 2 { tag::RSP_AUTH2 } else { tag::RSP_AUTH1 };
        assert_eq!(h.tag, want, "{}: {label}: wrong response tag", self.name());
        Ok(verify_response(ordinal, &r, sessions, &sent).to_vec())
    }

    // ---- Tier A -------------------------------------------------------

    pub fn startup(&mut self, st: u16) -> u32 {
        let r =
            self.raw(&format!("Startup({st})"), Kind::Exact, Cmd::new(tag::RQU_COMMAND, ord::STARTUP).u16(st).finish());
        header(&r).rc
    }

    pub fn get_capability(&mut self, kind: Kind, area: u32, sub: &[u8]) -> Out {
        let label = format!("GetCapability({area:#x}, {})", hex(sub));
        let out = self.plain(&label, kind, Cmd::new(tag::RQU_COMMAND, ord::GET_CAPABILITY).u32(area).sized(sub))?;
        let mut r = Reader::new(&out);
        let data = r.sized().to_vec();
        assert_eq!(r.remaining(), 0, "{}: {label}: trailing bytes", self.name());
        Ok(data)
    }

    pub fn property(&mut self, kind: Kind, prop: u32) -> Out {
        self.get_capability(kind, cap::PROPERTY, &prop.to_be_bytes())
    }

    pub fn pcr_read(&mut self, pcr: u32) -> Result<Digest20, u32> {
        let out =
            self.plain(&format!("PCRRead({pcr})"), Kind::Exact, Cmd::new(tag::RQU_COMMAND, ord::PCR_READ).u32(pcr))?;
        Ok(out[..].try_into().expect("PCRRead returns 20 bytes"))
    }

    pub fn extend(&mut self, pcr: u32, digest: &Digest20) -> Result<Digest20, u32> {
        let out = self.plain(
            &format!("Extend({pcr})"),
            Kind::Exact,
            Cmd::new(tag::RQU_COMMAND, ord::EXTEND).u32(pcr).bytes(digest),
        )?;
        Ok(out[..].try_into().expect("Extend returns 20 bytes"))
    }

    pub fn pcr_reset(&mut self, pcrs: &[u32]) -> u32 {
        let cmd = Cmd::new(tag::RQU_COMMAND, ord::PCR_RESET).bytes(&pcr_selection(pcrs));
        match self.plain(&format!("PCR_Reset({pcrs:?})"), Kind::Exact, cmd) {
            Ok(_) => rc::SUCCESS,
            Err(rc) => rc,
        }
    }

    pub fn get_random(&mut self, n: u32) -> Result<Vec<u8>, u32> {
        let out =
            self.plain(&format!("GetRandom({n})"), Kind::Shape, Cmd::new(tag::RQU_COMMAND, ord::GET_RANDOM).u32(n))?;
        Ok(Reader::new(&out).sized().to_vec())
    }

    /// ReadPubek, with its checksum SHA1(pubkey ‖ antiReplay) verified.
    pub fn read_pubek(&mut self) -> Result<PubKey, u32> {
        let anti_replay = self.nonces.next();
        let out =
            self.plain("ReadPubek", Kind::Shape, Cmd::new(tag::RQU_COMMAND, ord::READ_PUBEK).bytes(&anti_replay))?;
        let mut r = Reader::new(&out);
        let key = parse_pubkey(&mut r);
        let checksum = r.digest();
        assert_eq!(checksum, sha1(&[&key.raw, &anti_replay]), "{}: ReadPubek checksum", self.name());
        Ok(key)
    }

    // ---- Sessions -----------------------------------------------------

    pub fn oiap(&mut self, secret: &Digest20) -> Session {
        let out = self.plain("OIAP", Kind::Shape, Cmd::new(tag::RQU_COMMAND, ord::OIAP)).expect("OIAP");
        let mut r = Reader::new(&out);
        Session { handle: r.u32(), nonce_even: r.digest(), key: *secret, shared: None }
    }

    /// OSAP: sharedSecret = HMAC(entityAuth, nonceEvenOSAP ‖ nonceOddOSAP).
    pub fn osap(&mut self, entity_type: u16, entity: u32, secret: &Digest20) -> Session {
        let odd_osap = self.nonces.next();
        let cmd = Cmd::new(tag::RQU_COMMAND, ord::OSAP).u16(entity_type).u32(entity).bytes(&odd_osap);
        let out = self.plain("OSAP", Kind::Shape, cmd).expect("OSAP");
        let mut r = Reader::new(&out);
        let handle = r.u32();
        let nonce_even = r.digest();
        let even_osap = r.digest();
        let shared = hmac_sha1(secret, &[&even_osap, &odd_osap]);
        Session { handle, nonce_even, key: shared, shared: Some(shared) }
    }

    // ---- Ownership ----------------------------------------------------

    /// TakeOwnership with the owner and SRK secrets OAEP-encrypted to the EK.
    pub fn take_ownership(&mut self, ek: &PubKey, owner: &Digest20, srk: &Digest20) -> Result<KeyBlob, u32> {
        let ek = rsa_key(&ek.modulus, &ek.exponent);
        let enc_owner = oaep_tcpa(&ek, owner);
        let enc_srk = oaep_tcpa(&ek, srk);
        let srk_params = key_template(TPM_KEY_STORAGE, TPM_ES_RSAESOAEP_SHA1_MGF1, TPM_SS_NONE);
        let mut s = self.oiap(owner);
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::TAKE_OWNERSHIP)
            .u16(TPM_PID_OWNER)
            .sized(&enc_owner)
            .sized(&enc_srk)
            .bytes(&srk_params);
        let out = self.authorised("TakeOwnership", Kind::Shape, cmd, &mut [&mut s], false)?;
        let key = parse_key(&mut Reader::new(&out));
        assert_eq!(key.usage, TPM_KEY_STORAGE, "{}: SRK usage", self.name());
        Ok(key)
    }

    pub fn owner_clear(&mut self, owner: &Digest20) -> u32 {
        let mut s = self.oiap(owner);
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::OWNER_CLEAR);
        match self.authorised("OwnerClear", Kind::Shape, cmd, &mut [&mut s], false) {
            Ok(_) => rc::SUCCESS,
            Err(rc) => rc,
        }
    }

    // ---- Keys ---------------------------------------------------------

    /// CreateWrapKey under `parent` (an OSAP session on it carries the new
    /// usage secret; the migration secret is encrypted with nonceOdd).
    pub fn create_wrap_key(
        &mut self,
        parent: u32,
        parent_auth: &Digest20,
        usage_auth: &Digest20,
        template: &[u8],
    ) -> Result<KeyBlob, u32> {
        let mut s = self.osap(TPM_ET_KEYHANDLE, parent, parent_auth);
        let shared = s.shared.unwrap();
        // ADIP: the migration secret is encrypted with this command's nonceOdd.
        let nonce_odd = self.nonces.peek();
        let enc_usage = xor_encrypt(usage_auth, &shared, &s.nonce_even);
        let enc_migration = xor_encrypt(usage_auth, &shared, &nonce_odd);
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::CREATE_WRAP_KEY)
            .handle(parent)
            .bytes(&enc_usage)
            .bytes(&enc_migration)
            .bytes(template);
        let out = self.authorised("CreateWrapKey", Kind::Shape, cmd, &mut [&mut s], false)?;
        Ok(parse_key(&mut Reader::new(&out)))
    }

    pub fn load_key2(&mut self, parent: u32, parent_auth: &Digest20, key: &KeyBlob) -> Result<u32, u32> {
        let mut s = self.oiap(parent_auth);
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::LOAD_KEY2).handle(parent).bytes(&key.raw);
        let out = self.authorised("LoadKey2", Kind::Shape, cmd, &mut [&mut s], false)?;
        Ok(Reader::new(&out).u32())
    }

    pub fn sign(&mut self, key: u32, key_auth: &Digest20, digest: &Digest20) -> Result<Vec<u8>, u32> {
        let mut s = self.oiap(key_auth);
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::SIGN).handle(key).sized(digest);
        let out = self.authorised("Sign", Kind::Shape, cmd, &mut [&mut s], false)?;
        Ok(Reader::new(&out).sized().to_vec())
    }

    pub fn flush_key(&mut self, handle: u32) -> u32 {
        let cmd = Cmd::new(tag::RQU_COMMAND, ord::FLUSH_SPECIFIC).u32(handle).u32(1);
        match self.plain("FlushSpecific", Kind::Shape, cmd) {
            Ok(_) => rc::SUCCESS,
            Err(rc) => rc,
        }
    }

    // ---- Sealing ------------------------------------------------------

    pub fn seal(
        &mut self,
        key: u32,
        key_auth: &Digest20,
        data_auth: &Digest20,
        pcr_info: &[u8],
        data: &[u8],
    ) -> Result<Vec<u8>, u32> {
        let mut s = self.osap(TPM_ET_KEYHANDLE, key, key_auth);
        let enc = xor_encrypt(data_auth, &s.shared.unwrap(), &s.nonce_even);
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::SEAL).handle(key).bytes(&enc).sized(pcr_info).sized(data);
        self.authorised("Seal", Kind::Shape, cmd, &mut [&mut s], false)
    }

    /// Unseal with two sessions: the key's, then the sealed data's.
    pub fn unseal(
        &mut self,
        key: u32,
        key_auth: &Digest20,
        data_auth: &Digest20,
        sealed: &[u8],
    ) -> Result<Vec<u8>, u32> {
        let mut sk = self.oiap(key_auth);
        let mut sd = self.oiap(data_auth);
        let cmd = Cmd::new(tag::RQU_AUTH2, ord::UNSEAL).handle(key).bytes(sealed);
        let out = self.authorised("Unseal", Kind::Shape, cmd, &mut [&mut sk, &mut sd], false)?;
        Ok(Reader::new(&out).sized().to_vec())
    }

    // ---- Attestation --------------------------------------------------

    /// Quote: returns the PCR composite and the signature.
    pub fn quote(
        &mut self,
        key: u32,
        key_auth: &Digest20,
        external: &Digest20,
        pcrs: &[u32],
    ) -> Result<(Vec<u8>, Vec<u8>), u32> {
        let mut s = self.oiap(key_auth);
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::QUOTE).handle(key).bytes(external).bytes(&pcr_selection(pcrs));
        let out = self.authorised("Quote", Kind::Shape, cmd, &mut [&mut s], false)?;
        let mut r = Reader::new(&out);
        let sel_size = r.u16() as usize;
        r.bytes(sel_size);
        let values = r.sized();
        let composite_len = 2 + sel_size + 4 + values.len();
        let composite = out[..composite_len].to_vec();
        let sig = r.sized().to_vec();
        Ok((composite, sig))
    }

    /// MakeIdentity: SRK session first, then an OSAP owner session that
    /// carries the identity secret. Returns the AIK blob and identityBinding.
    pub fn make_identity(
        &mut self,
        owner: &Digest20,
        srk: &Digest20,
        aik_auth: &Digest20,
        label_digest: &Digest20,
    ) -> Result<(KeyBlob, Vec<u8>), u32> {
        let mut ss = self.oiap(srk);
        let mut so = self.osap(TPM_ET_OWNER, TPM_KH_OWNER, owner);
        let enc = xor_encrypt(aik_auth, &so.shared.unwrap(), &so.nonce_even);
        let template = key_template(TPM_KEY_IDENTITY, TPM_ES_NONE, TPM_SS_RSASSAPKCS1V15_SHA1);
        let cmd = Cmd::new(tag::RQU_AUTH2, ord::MAKE_IDENTITY).bytes(&enc).bytes(label_digest).bytes(&template);
        let out = self.authorised("MakeIdentity", Kind::Shape, cmd, &mut [&mut ss, &mut so], false)?;
        let mut r = Reader::new(&out);
        let key = parse_key(&mut r);
        let binding = r.sized().to_vec();
        Ok((key, binding))
    }

    // ---- NV -----------------------------------------------------------

    /// NV_DefineSpace authorised by the owner (size 0 releases the index).
    pub fn nv_define(&mut self, owner: &Digest20, index: u32, permissions: u32, size: u32) -> u32 {
        self.nv_define_with_auth(owner, index, permissions, size, &WELL_KNOWN)
    }

    /// NV_DefineSpace with the area's own secret (for AUTHREAD/AUTHWRITE).
    pub fn nv_define_with_auth(
        &mut self,
        owner: &Digest20,
        index: u32,
        permissions: u32,
        size: u32,
        area_auth: &Digest20,
    ) -> u32 {
        let mut s = self.osap(TPM_ET_OWNER, TPM_KH_OWNER, owner);
        let enc = xor_encrypt(area_auth, &s.shared.unwrap(), &s.nonce_even);
        let short = {
            let mut v = pcr_selection(&[]);
            v.push(0x1f); // localityAtRelease: any
            v.extend_from_slice(&[0; 20]);
            v
        };
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::NV_DEFINE_SPACE)
            .u16(0x0018)
            .u32(index)
            .bytes(&short)
            .bytes(&short)
            .u16(0x0017)
            .u32(permissions)
            .u8(0)
            .u8(0)
            .u8(0)
            .u32(size)
            .bytes(&enc);
        match self.authorised(&format!("NV_DefineSpace({index:#x}, {size})"), Kind::Shape, cmd, &mut [&mut s], false) {
            Ok(_) => rc::SUCCESS,
            Err(rc) => rc,
        }
    }

    pub fn nv_write(&mut self, owner: &Digest20, index: u32, offset: u32, data: &[u8]) -> u32 {
        let mut s = self.oiap(owner);
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::NV_WRITE_VALUE).u32(index).u32(offset).sized(data);
        match self.authorised("NV_WriteValue", Kind::Shape, cmd, &mut [&mut s], false) {
            Ok(_) => rc::SUCCESS,
            Err(rc) => rc,
        }
    }

    pub fn nv_read(&mut self, owner: &Digest20, index: u32, offset: u32, len: u32) -> Result<Vec<u8>, u32> {
        let mut s = self.oiap(owner);
        let cmd = Cmd::new(tag::RQU_AUTH1, ord::NV_READ_VALUE).u32(index).u32(offset).u32(len);
        let out = self.authorised("NV_ReadValue", Kind::Shape, cmd, &mut [&mut s], false)?;
        Ok(Reader::new(&out).sized().to_vec())
    }
}

/// Compares two transcripts of the same calls: every step must agree as its
/// kind requires. Panics listing every disagreement (the first 40), each with
/// its command and both responses, so one run shows the whole picture.
pub fn compare(reference: &[Step], subject: &[Step], subject_name: &str) {
    let mut report = Vec::new();
    let mut count = 0;
    for (i, (a, b)) in reference.iter().zip(subject).enumerate() {
        assert_eq!(a.label, b.label, "step {i}: the scenarios diverged");
        // Exact steps may also be control-channel answers, which have no
        // TPM response header.
        let same = match a.kind {
            Kind::Exact => a.response == b.response,
            Kind::Shape => header(&a.response) == header(&b.response) && a.response.len() == b.response.len(),
            Kind::Status => {
                let (ha, hb) = (header(&a.response), header(&b.response));
                ha.tag == hb.tag && ha.rc == hb.rc
            }
        };
        if !same {
            count += 1;
            if report.len() < 40 {
                report.push(format!(
                    "step {i} `{}` ({:?})\n command:      {}\n libtpms:      {}\n {subject_name:<13} {}",
                    a.label,
                    a.kind,
                    hex(&a.command),
                    hex(&a.response),
                    hex(&b.response)
                ));
            }
        }
    }
    assert!(report.is_empty(), "{count} of {} steps differ:\n{}", reference.len(), report.join("\n"));
    assert_eq!(reference.len(), subject.len(), "{subject_name} ran a different number of steps");
}
