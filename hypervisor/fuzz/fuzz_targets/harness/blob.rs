//! The `blob` target: the vTPM state blobs that come back from the guest's
//! disk (`vtpm_trust::blob::open`, and `tpm::persist::open_state`, which
//! restores a vtpm-core chip from one). The input either seals a blob
//! itself (under one of two platform keys, for a guest, at a version, with
//! a real vtpm-core state, a corrupted one, or any payload) and then edits
//! its bytes, or hands over any bytes; the blob is then opened with a key,
//! a guest name and a minimum version of its choosing.
//!
//! Properties:
//! * only a blob sealed under the same key, for the same guest, at a
//!   version at least the minimum opens, and it opens to exactly the
//!   plaintext sealed (and that version); each other case is refused for
//!   its reason (foreign key, wrong guest, stale);
//! * any edit of a sealed blob, and any blob the input makes up, is
//!   refused (the fuzzer has no key);
//! * `open_state` on a blob of a real state gives a chip whose permanent
//!   and saved states are exactly those sealed; on an authentic payload
//!   that is not a state it refuses, or restores a chip whose state
//!   re-serialises to itself; nothing panics.

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::tpm::persist::{self, RestoreError};
use vtpm_core::Tpm;
use vtpm_trust::blob::{self, BlobError, StateKey, StatePayload, NONCE_LEN};

use super::tis::FuzzPlatform;

struct Fixture {
    keys: [StateKey; 2],
    /// A chip's permanent state (EK deferred), and its state after
    /// Startup, an Extend and SaveState.
    permanent: Vec<u8>,
    saved: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut t = Tpm::manufacture(FuzzPlatform(9));
        t.execute(0, &[0, 0xc1, 0, 0, 0, 12, 0, 0, 0, 0x99, 0, 1]);
        let extend = [&[0, 0xc1, 0, 0, 0, 34, 0, 0, 0, 0x14, 0, 0, 0, 10][..], &[0xab; 20]].concat();
        t.execute(0, &extend);
        t.execute(0, &[0, 0xc1, 0, 0, 0, 10, 0, 0, 0, 0x98]);
        Fixture {
            keys: [StateKey::derive(&[1; 32]), StateKey::derive(&[2; 32])],
            permanent: t.permanent_state(),
            saved: t.saved_state().expect("SaveState made a saved state"),
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Name {
    Alpha,
    Beta,
    Any(String),
}

impl Name {
    fn text(&self) -> &str {
        match self {
            Name::Alpha => "alpha",
            Name::Beta => "beta",
            Name::Any(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Payload {
    /// The real state, with its saved state or not, a few bytes changed.
    Real {
        saved: bool,
        edits: Vec<(u16, u8)>,
    },
    Parts {
        permanent: Vec<u8>,
        saved: Option<Vec<u8>>,
    },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Flip {
        at: u16,
        bit: u8,
    },
    Set {
        at: u16,
        value: u8,
    },
    Cut(u16),
    Append(Vec<u8>),
    Insert {
        at: u16,
        bytes: Vec<u8>,
    },
    /// Over a header field: the version (28), the name length (36), ...
    Word {
        at: u8,
        value: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Sealing {
    key: bool,
    guest: Name,
    version: u64,
    nonce: [u8; NONCE_LEN],
    payload: Payload,
    edits: Vec<Edit>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    blob: Result<Sealing, Vec<u8>>,
    key: bool,
    guest: Name,
    /// The minimum: near the sealed version, or any.
    minimum: Result<i8, u64>,
    restore: bool,
}

fn edit(b: &mut Vec<u8>, e: &Edit) {
    let at = |i: u16, len: usize| usize::from(i) % (len + 1);
    match e {
        Edit::Flip { at: i, bit } if !b.is_empty() => {
            let i = usize::from(*i) % b.len();
            b[i] ^= 1 << (bit % 8);
        }
        Edit::Set { at: i, value } if !b.is_empty() => {
            let i = usize::from(*i) % b.len();
            b[i] = *value;
        }
        Edit::Cut(n) => b.truncate(at(*n, b.len())),
        Edit::Append(bytes) => b.extend_from_slice(bytes),
        Edit::Insert { at: i, bytes } => {
            let i = at(*i, b.len());
            b.splice(i..i, bytes.iter().copied());
        }
        Edit::Word { at: i, value } => {
            let i = usize::from(*i) % 64;
            for (k, v) in value.to_be_bytes().iter().enumerate() {
                if let Some(x) = b.get_mut(i + k) {
                    *x = *v;
                }
            }
        }
        _ => {}
    }
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let f = fixture();
    let key = &f.keys[usize::from(input.key)];
    let guest = input.guest.text();
    let _ = blob::guest_of(match &input.blob {
        Ok(_) => &[],
        Err(raw) => raw,
    });
    let Ok(s) = &input.blob else {
        let Err(raw) = &input.blob else { unreachable!() };
        let minimum = match input.minimum {
            Ok(d) => i64::from(d) as u64,
            Err(m) => m,
        };
        assert!(blob::open(key, guest, minimum, raw).is_err(), "a made-up blob opened");
        return;
    };
    // The plaintext; whether it is the real chip's state untouched.
    let (plaintext, pristine) = match &s.payload {
        Payload::Real { saved, edits } => {
            let mut p = StatePayload { permanent: f.permanent.clone(), saved: saved.then(|| f.saved.clone()) };
            for &(at, value) in edits.iter().take(4) {
                let target = match p.saved.as_mut() {
                    Some(saved) if at & 1 == 1 => saved,
                    _ => &mut p.permanent,
                };
                let i = usize::from(at >> 1) % target.len();
                target[i] = value;
            }
            (p.encode().to_vec(), edits.is_empty())
        }
        Payload::Parts { permanent, saved } => {
            (StatePayload { permanent: permanent.clone(), saved: saved.clone() }.encode().to_vec(), false)
        }
        Payload::Raw(bytes) => (bytes.clone(), false),
    };
    let state = StatePayload::decode(&plaintext).ok().map(|p| (p, pristine));
    let sealer = &f.keys[usize::from(s.key)];
    let name = s.guest.text();
    let sealed = match blob::seal(sealer, name, s.version, &plaintext, s.nonce) {
        Ok(b) => b,
        Err(e) => {
            assert!(name.is_empty() || name.len() > blob::MAX_NAME, "sealing refused: {e:?}");
            return;
        }
    };
    assert_eq!(blob::guest_of(&sealed).as_deref(), Some(name));
    let mut b = sealed.clone();
    for e in s.edits.iter().take(4) {
        edit(&mut b, e);
    }
    let minimum = match input.minimum {
        Ok(d) => s.version.wrapping_add_signed(i64::from(d)),
        Err(m) => m,
    };
    let opened = blob::open(key, guest, minimum, &b);
    let same_key = s.key == input.key;
    if b != sealed {
        assert!(opened.is_err(), "an edited blob opened");
        if input.restore {
            let r = persist::open_state(key, guest, minimum, &b, FuzzPlatform(3));
            assert!(matches!(r, Err(RestoreError::Blob(_))), "an edited blob restored");
        }
        return;
    }
    let expected = if !same_key {
        Err(BlobError::ForeignKey)
    } else if guest != name {
        Err(BlobError::WrongGuest)
    } else if s.version < minimum {
        Err(BlobError::Stale { version: s.version, minimum })
    } else {
        Ok(s.version)
    };
    match (&opened, expected) {
        (Ok(o), Ok(version)) => {
            assert_eq!(o.version, version);
            assert!(*o.plaintext == plaintext, "opened to another plaintext");
        }
        (Err(got), Err(want)) => assert_eq!(*got, want),
        (got, want) => panic!("opened as {got:?}, expected {want:?}"),
    }
    if !input.restore {
        return;
    }
    let restored = persist::open_state(key, guest, minimum, &b, FuzzPlatform(3));
    match (restored, &opened, state) {
        (Err(RestoreError::Blob(e)), Err(o), _) => assert_eq!(e, *o),
        (Err(e), Ok(_), state) => {
            assert!(!state.is_some_and(|(_, pristine)| pristine), "the sealed chip did not restore: {e:?}");
        }
        (Ok((tpm, version)), Ok(o), Some((p, pristine))) => {
            assert_eq!(version, o.version);
            let permanent = tpm.permanent_state();
            if pristine {
                assert!(permanent == p.permanent, "the restored permanent state is not the one sealed");
                assert!(tpm.saved_state() == p.saved, "the restored saved state is not the one sealed");
            } else {
                let again = Tpm::from_permanent(&permanent, FuzzPlatform(4)).expect("a restored state reloads");
                assert!(again.permanent_state() == permanent, "a restored state does not re-serialise to itself");
            }
        }
        (Ok(_), Ok(_), None) => panic!("a payload that is no state restored a chip"),
        (r, o, _) => panic!("open_state {:?} but open {o:?}", r.map(|(_, v)| v)),
    }
}
