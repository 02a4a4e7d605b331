//! vtpm-core against libtpms, in this process, on the same TPM 1.2 commands.
//!
//! Deterministic commands (Extend, PCRRead, GetRandom) send identical bytes
//! to both. Authorised ones (Seal, Unseal, LoadKey2, Quote, TakeOwnership)
//! send the same logical command; their bytes differ only in the HMACs over
//! each TPM's own nonces. Each authorised measurement includes the session it
//! needs (OSAP for Seal, two OIAPs for Unseal, one OIAP otherwise) and the
//! client's HMAC work, identical on both sides.
//!
//! Run: `cargo bench -p vtpm-bench` (add `-- --quick`, or
//! set VTPM_BENCH_QUICK=1, for a smoke run). The last lines printed are the
//! ratio table, read back from criterion's `target/criterion/*/new/estimates.json`.

mod libtpms;

// The TPM client of vtpm-server's tests, shared rather than copied.
#[path = "../../server/tests/support/client.rs"]
mod client;
#[path = "../../server/tests/support/tpm12.rs"]
mod tpm12;

use client::{Client, Transport};
use criterion::Criterion;
use libtpms::Libtpms;
use std::hint::black_box;
use std::time::{Duration, Instant};
use tpm12::*;

const OWNER: Digest20 = WELL_KNOWN;
const SRK: Digest20 = WELL_KNOWN;
const GROUPS: [&str; 8] =
    ["Extend", "PCRRead", "GetRandom(128)", "OSAP+Seal", "Unseal", "LoadKey2", "Quote", "TakeOwnership"];

/// A TPM under measurement.
trait Subject: Transport {
    /// Back to a manufactured, unowned TPM after Startup(ST_CLEAR).
    fn reset_unowned(&mut self);
}

// ---------------------------------------------------------------------------
// libtpms

struct Lib {
    tpm: Option<Libtpms>,
    unowned: Vec<u8>,
}

impl Lib {
    /// libtpms as swtpm_setup leaves it: started, with an EK.
    fn manufacture() -> Lib {
        let mut tpm = Libtpms::start(None);
        expect_ok(&tpm.execute(&startup_clear()), "libtpms Startup");
        let create_ek = Cmd::new(tag::RQU_COMMAND, 0x78)
            .bytes(&[0x5a; 20])
            .bytes(&rsa_key_parms(TPM_ES_RSAESOAEP_SHA1_MGF1, TPM_SS_NONE))
            .finish();
        expect_ok(&tpm.execute(&create_ek), "libtpms CreateEndorsementKeyPair");
        let unowned = tpm.permall();
        Lib { tpm: Some(tpm), unowned }
    }
}

impl Transport for Lib {
    fn name(&self) -> &str {
        "libtpms"
    }
    fn transmit(&mut self, command: &[u8]) -> Vec<u8> {
        self.tpm.as_mut().expect("libtpms running").execute(command)
    }
    fn set_locality(&mut self, locality: u8) {
        self.tpm.as_mut().expect("libtpms running").set_locality(locality)
    }
}

impl Subject for Lib {
    fn reset_unowned(&mut self) {
        drop(self.tpm.take());
        let mut tpm = Libtpms::start(Some(&self.unowned));
        expect_ok(&tpm.execute(&startup_clear()), "libtpms Startup");
        self.tpm = Some(tpm);
    }
}

// ---------------------------------------------------------------------------
// vtpm-core

mod vtpm {
    use super::*;
    use vtpm_core::{Platform, Tpm};

    /// OS entropy and a monotonic clock, as vtpm-server gives the engine.
    pub struct HostPlatform(Instant);

    impl Platform for HostPlatform {
        fn fill_random(&mut self, buf: &mut [u8]) {
            getrandom::fill(buf).expect("getrandom");
        }
        fn ticks_us(&mut self) -> u64 {
            self.0.elapsed().as_micros() as u64
        }
    }

    pub struct Vtpm {
        tpm: Tpm<HostPlatform>,
        unowned: Vec<u8>,
        locality: u8,
    }

    impl Vtpm {
        pub fn manufacture() -> Vtpm {
            let mut tpm = Tpm::manufacture(HostPlatform(Instant::now()));
            tpm.power_on();
            expect_ok(&tpm.execute(0, &startup_clear()), "vtpm-core Startup");
            let unowned = tpm.permanent_state();
            Vtpm { tpm, unowned, locality: 0 }
        }
    }

    impl Transport for Vtpm {
        fn name(&self) -> &str {
            "vtpm-core"
        }
        fn transmit(&mut self, command: &[u8]) -> Vec<u8> {
            self.tpm.execute(self.locality, command)
        }
        fn set_locality(&mut self, locality: u8) {
            self.locality = locality;
        }
    }

    impl Subject for Vtpm {
        fn reset_unowned(&mut self) {
            self.tpm = Tpm::from_permanent(&self.unowned, HostPlatform(Instant::now())).expect("restore");
            self.tpm.power_on();
            expect_ok(&self.tpm.execute(0, &startup_clear()), "vtpm-core Startup");
        }
    }
}

// ---------------------------------------------------------------------------
// The measurements

fn startup_clear() -> Vec<u8> {
    Cmd::new(tag::RQU_COMMAND, ord::STARTUP).u16(1).finish()
}

fn expect_ok(resp: &[u8], what: &str) {
    assert_eq!(header(resp).rc, rc::SUCCESS, "{what} failed: {}", hex(resp));
}

/// The objects the authorised measurements use, made once per TPM.
struct Fixture {
    ek: PubKey,
    key_auth: Digest20,
    data_auth: Digest20,
    wrapped: KeyBlob,
    loaded: u32,
    sealed: Vec<u8>,
}

/// Takes ownership and makes the objects; an error names the command the
/// TPM refused (an engine without Tier B yet, say).
fn own_and_prepare(tpm: &mut dyn Transport) -> Result<Fixture, String> {
    let mut c = Client::new(tpm);
    c.record = false;
    let refused = |what: &'static str| move |rc: u32| format!("{what} answered {rc:#x}");
    let ek = c.read_pubek().map_err(refused("ReadPubek"))?;
    c.take_ownership(&ek, &OWNER, &SRK).map_err(refused("TakeOwnership"))?;
    let key_auth = sha1(&[b"bench key"]);
    let data_auth = sha1(&[b"bench data"]);
    let template = key_template(TPM_KEY_SIGNING, TPM_ES_NONE, TPM_SS_RSASSAPKCS1V15_SHA1);
    let wrapped = c.create_wrap_key(TPM_KH_SRK, &SRK, &key_auth, &template).map_err(refused("CreateWrapKey"))?;
    let loaded = c.load_key2(TPM_KH_SRK, &SRK, &wrapped).map_err(refused("LoadKey2"))?;
    let pcr10 = c.pcr_read(10).map_err(refused("PCRRead"))?;
    let sealed =
        c.seal(TPM_KH_SRK, &SRK, &data_auth, &pcr_info(&[10], &[pcr10]), &[0x42; 32]).map_err(refused("Seal"))?;
    Ok(Fixture { ek, key_auth, data_auth, wrapped, loaded, sealed })
}

fn bench_subject<S: Subject>(crit: &mut Criterion, s: &mut S) {
    let name = s.name().to_string();
    let extend = Cmd::new(tag::RQU_COMMAND, ord::EXTEND).u32(10).bytes(&sha1(&[b"measurement"])).finish();
    let pcr_read = Cmd::new(tag::RQU_COMMAND, ord::PCR_READ).u32(10).finish();
    let get_random = Cmd::new(tag::RQU_COMMAND, ord::GET_RANDOM).u32(128).finish();
    for (group, cmd) in [("Extend", &extend), ("PCRRead", &pcr_read), ("GetRandom(128)", &get_random)] {
        expect_ok(&s.transmit(cmd), group);
        crit.benchmark_group(group).bench_function(&name, |b| b.iter(|| black_box(s.transmit(black_box(cmd)))));
    }

    // PCR 10 went on moving above: start the authorised part from a fresh TPM.
    s.reset_unowned();
    let f = match own_and_prepare(s) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("vtpm-bench: {name}: the authorised commands cannot be measured: {e}");
            return;
        }
    };
    let mut c = Client::new(s);
    c.record = false;
    crit.benchmark_group("OSAP+Seal")
        .bench_function(&name, |b| b.iter(|| c.seal(TPM_KH_SRK, &SRK, &f.data_auth, &[], &[0x42; 32]).expect("Seal")));
    crit.benchmark_group("Unseal")
        .bench_function(&name, |b| b.iter(|| c.unseal(TPM_KH_SRK, &SRK, &f.data_auth, &f.sealed).expect("Unseal")));
    crit.benchmark_group("LoadKey2").bench_function(&name, |b| {
        b.iter(|| {
            let h = c.load_key2(TPM_KH_SRK, &SRK, &f.wrapped).expect("LoadKey2");
            assert_eq!(c.flush_key(h), rc::SUCCESS);
        })
    });
    let nonce = sha1(&[b"quote nonce"]);
    crit.benchmark_group("Quote").bench_function(&name, |b| {
        b.iter(|| c.quote(f.loaded, &f.key_auth, &nonce, &[0, 1, 2, 3, 4, 5, 6, 7, 10]).expect("Quote"))
    });
    drop(c);

    // TakeOwnership creates the SRK: every measured call needs an unowned
    // TPM, restored outside the timed region.
    crit.benchmark_group("TakeOwnership").sample_size(10).bench_function(&name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                s.reset_unowned();
                let mut c = Client::new(s);
                c.record = false;
                let t = Instant::now();
                c.take_ownership(&f.ek, &OWNER, &SRK).expect("TakeOwnership");
                total += t.elapsed();
            }
            total
        })
    });
}

fn print_ratios(since: std::time::SystemTime) {
    println!();
    println!("{:<16} {:>12} {:>12} {:>10}", "command", "vtpm-core", "libtpms", "libtpms/vtpm");
    for g in GROUPS {
        let v = vtpm_bench::mean_ns(g, "vtpm-core", since);
        let l = vtpm_bench::mean_ns(g, "libtpms", since);
        let show = |x: Option<f64>| x.map(vtpm_bench::human).unwrap_or_else(|| "n/a".into());
        let ratio = match (v, l) {
            (Some(v), Some(l)) => format!("{:.2}x", l / v),
            _ => "n/a".into(),
        };
        println!("{g:<16} {:>12} {:>12} {:>10}", show(v), show(l), ratio);
    }
    println!("(libtpms/vtpm above 1 means vtpm-core is faster)");
}

fn main() {
    // Results written before this instant belong to an earlier run.
    let started = std::time::SystemTime::now();
    let quick = std::env::var_os("VTPM_BENCH_QUICK").is_some() || std::env::args().any(|a| a == "--quick");
    let mut crit = Criterion::default();
    if quick {
        crit = crit.warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(1)).sample_size(10);
    }
    let mut crit = crit.configure_from_args();

    let mut v = vtpm::Vtpm::manufacture();
    bench_subject(&mut crit, &mut v);
    drop(v);

    let mut l = Lib::manufacture();
    bench_subject(&mut crit, &mut l);
    drop(l);

    crit.final_summary();
    print_ratios(started);
}
