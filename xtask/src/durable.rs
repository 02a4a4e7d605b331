//! `vtpm-durable`: a durable vTPM across four boots of one Linux guest on
//! one disk, and a remote verifier on what the real guest hands over.
//!
//! The disk (`target/ctvm/vtpm-durable/disk.img`, ext2 on the whole disk)
//! persists between the boots. GRUB reads the guest's sealed state blob
//! from it with `module2 (hd0)/ctvm/FILE vtpm.state=linux` inside an
//! `if [ -f ... ]`, as a production grub.cfg reads `/boot/ctvm/NAME.vtpm`;
//! the guest's store service writes it there. Between boots the harness
//! reads and writes the disk with `debugfs` (no mounting): what to do next
//! (`/ctvm/test/phase`), and the verifier's challenge and nonce.
//!
//! 1. `provision`, `vtpm=durable vtpm.reset`, no blob: CTVM makes a new
//!    vTPM, certifies its EK and prints its CA. The guest takes ownership,
//!    defines and writes NV, keeps a copy of the blob after that write,
//!    makes an AIK, seals data, writes NV again; the store service writes
//!    each blob. The harness checks the CA certificate against
//!    `ctvm-verify ca`, then makes an ActivateIdentity challenge for the
//!    AIK against the certified EK, and a nonce.
//! 2. `check`, the newest blob: the owner authorises, NV reads back, the
//!    AIK loads, the data unseals; the guest answers the challenge and
//!    quotes PCRs 8–11. `ctvm-verify` accepts the quote with the event log
//!    (CTVM's, with the agent's lock event, read from `/proc/ctvm_event_log`)
//!    and IMA list, and rejects a replayed nonce, another kernel, an edited
//!    event log and an IMA entry outside the allow-list.
//! 3. `rollback`, the copy from before the last NV write: without a
//!    platform TPM counter CTVM cannot tell, accepts it and says rollback
//!    goes undetected; the guest reads the older NV. The scenario shows
//!    that (the version is below boot 2's). This boot is also a root that
//!    keeps the agent from loading under `integrity=enforce`: CTVM says at
//!    power-off that the guest ran without module isolation, and
//!    `ctvm-verify` rejects its quote because PCR 11 has no lock event.
//! 4. `corrupt`, the newest blob with one bit flipped: refused, the vTPM
//!    in failure mode, no state loaded or made.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha1_smol::Sha1;
use sha2::{Digest, Sha256};

use crate::emulator::{self, Emulator, RunOutput, DISK_CYLINDER};
use crate::image::{self, DiskModule, ModuleSpec};
use crate::linux;
use crate::scenarios::{self, Scenario};
use crate::util::{cargo, root, run, work_dir, Fail};

pub const NAME: &str = "vtpm-durable";
pub const ABOUT: &str =
    "a durable vTPM over four boots on one disk: provision, check and attest, an old blob, a corrupted blob";

/// The host's platform secret in this scenario (the `vtpm.seed` module).
const SEED: &str = "d0ab1ed5d0ab1ed5d0ab1ed5d0ab1ed5d0ab1ed5d0ab1ed5d0ab1ed5d0ab1ed5";
const TRUST: [&str; 2] = ["ctvm_agent", "ifb"];
const CLEAN_END: &str = "ctvm: all guests stopped; powering off";

/// One boot of the series.
struct Boot {
    phase: &'static str,
    /// The guest's options before `--` besides its name and kind.
    options: &'static str,
    /// The file under `/ctvm/` GRUB hands over as the state blob.
    blob: &'static str,
    timeout: Duration,
    expect: Vec<&'static str>,
    reject: Vec<&'static str>,
}

fn boots() -> Vec<Boot> {
    let fail = vec!["ctvm-tpm: FAIL", "ctvm-init: FAIL", "ctvm: error: guest linux: vTPM store"];
    vec![
        Boot {
            phase: "provision",
            options: "vtpm=durable vtpm.reset",
            blob: "linux.vtpm",
            timeout: Duration::from_secs(1500),
            expect: vec![
                "ctvm: warning: guest linux: new vTPM (vtpm.reset, there is no state blob); EK certificate issued into NV 0x1000f000",
                "ctvm: warning: guest linux: the vTPM CA is derived from vtpm.seed, not bound to a measured launch: whoever reads the seed module can issue EK certificates under it",
                "ctvm: warning: guest linux: rollback of the vTPM state cannot be detected: no platform TPM counter",
                "ctvm: vTPM CA certificate (DER SHA-256 *), for the verifier:",
                "ctvm: guest linux: vTPM ready; * configuration (vtpm=durable) into PCR 11",
                "ctvm-init: durable phase provision; tpm0 present",
                "ctvm-init: agent loaded",
                "ctvm-tpm: EK certificate read from NV 0x1000f000",
                "ctvm-tpm: TakeOwnership done",
                "ctvm-tpm: NV 0x11000 defined and written: first write",
                "ctvm-tpm: kept the state blob of version ",
                "ctvm-tpm: AIK made (MakeIdentity)",
                "ctvm-tpm: data sealed to PCRs 8 and 9",
                "ctvm-tpm: NV 0x11000 written again: second write, the last",
                "ctvm-tpm: provision done",
                "ctvm: guest linux stopped: ACPI sleep requested",
                CLEAN_END,
            ],
            reject: fail.clone(),
        },
        Boot {
            phase: "check",
            options: "vtpm=durable",
            blob: "linux.vtpm",
            timeout: Duration::from_secs(900),
            expect: vec![
                "ctvm: guest linux: vTPM state blob version * opened (sealed under vtpm.seed)",
                "ctvm: warning: guest linux: rollback of the vTPM state cannot be detected",
                "ctvm-init: durable phase check; tpm0 present",
                "ctvm: guest linux: lock measured into PCR 11 (ctvm.lock v1, mode=enforce)",
                "ctvm-tpm: the owner authorises (OwnerReadInternalPub): the EK certified at the first boot",
                "ctvm-tpm: NV 0x11000 reads back: second write, the last",
                "ctvm-tpm: the AIK loads (LoadKey2 under the SRK)",
                "ctvm-tpm: Unseal: sealed to PCRs 8 and 9 at boot 1",
                "ctvm-tpm: ActivateIdentity answered the verifier's challenge",
                "ctvm-tpm: Quote2 over PCRs 8-11 with the verifier's nonce",
                "ctvm-tpm: check done",
                "ctvm-init: corrupted copy: 1 byte differs",
                "ctvm: guest linux stopped: ACPI sleep requested",
                CLEAN_END,
            ],
            reject: [fail.as_slice(), &["ctvm: warning: guest linux: new vTPM"]].concat(),
        },
        Boot {
            phase: "rollback",
            options: "vtpm=durable",
            blob: "linux.vtpm.before-last-write",
            timeout: Duration::from_secs(900),
            expect: vec![
                "ctvm: guest linux: vTPM state blob version * opened (sealed under vtpm.seed)",
                // No platform TPM in Bochs: both weaknesses said plainly.
                "ctvm: warning: guest linux: the state key is derived from vtpm.seed, not sealed to a platform TPM: whoever reads the seed module can open and forge this guest's blobs",
                "ctvm: warning: guest linux: rollback of the vTPM state cannot be detected: no platform TPM counter (an older blob of this guest would be accepted)",
                "ctvm-init: durable phase rollback; tpm0 present",
                "ctvm-init: agent kept from loading",
                "ctvm-tpm: NV 0x11000 holds: first write",
                "ctvm-tpm: Quote2 over PCRs 8-11 with the verifier's nonce",
                "ctvm: guest linux stopped: ACPI sleep requested",
                "ctvm: warning: guest linux: ran without module isolation: integrity=enforce, but its agent never locked the kernel layout",
                CLEAN_END,
            ],
            reject: [fail.as_slice(), &["lock measured into PCR 11"]].concat(),
        },
        Boot {
            phase: "corrupt",
            options: "vtpm=durable",
            blob: "linux.vtpm.corrupt",
            timeout: Duration::from_secs(900),
            expect: vec![
                "ctvm: error: guest linux: vTPM in failure mode: state blob refused: state blob failed authentication; no state was loaded or made (vtpm.reset makes a new vTPM)",
                "ctvm: guest linux: vTPM in failure mode after its launch was measured;",
                "ctvm-init: durable phase corrupt; tpm0 ",
                "ctvm-tpm: NV_ReadValue answers rc 0x1c TPM_FAILEDSELFTEST",
                "ctvm: guest linux stopped: ACPI sleep requested",
                CLEAN_END,
            ],
            reject: [fail.as_slice(), &["ctvm-tpm: NV 0x11000 holds", "ctvm: warning: guest linux: new vTPM"]]
                .concat(),
        },
    ]
}

/// The disk, read and written without mounting it.
struct Disk {
    image: PathBuf,
    scratch: PathBuf,
}

impl Disk {
    /// A fresh ext2 filesystem on the whole disk, with `/ctvm/test`.
    fn create(dir: &Path) -> Result<Disk, Fail> {
        let staging = dir.join("staging");
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(staging.join("ctvm/test"))?;
        let image = dir.join("disk.img");
        let _ = fs::remove_file(&image);
        let file = fs::File::create(&image)?;
        file.set_len(40 * DISK_CYLINDER)?;
        drop(file);
        run(Command::new("mke2fs").args(["-q", "-F", "-t", "ext2", "-L", "ctvm", "-d"]).arg(&staging).arg(&image))?;
        Ok(Disk { image, scratch: dir.join("scratch") })
    }

    fn debugfs(&self, write: bool, request: &str) -> Result<String, Fail> {
        let mut cmd = Command::new("debugfs");
        if write {
            cmd.arg("-w");
        }
        let out = cmd
            .arg("-R")
            .arg(request)
            .arg(&self.image)
            .output()
            .map_err(|e| Fail(format!("cannot run debugfs: {e}")))?;
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// A file of the disk's filesystem, or None.
    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, Fail> {
        let _ = fs::remove_file(&self.scratch);
        self.debugfs(false, &format!("dump -p {path} {}", self.scratch.display()))?;
        Ok(fs::read(&self.scratch).ok())
    }

    fn need(&self, path: &str) -> Result<Vec<u8>, Fail> {
        self.get(path)?.ok_or_else(|| Fail(format!("{path} is not on the scenario's disk")))
    }

    /// Writes a file, replacing what was there.
    fn put(&self, path: &str, data: &[u8]) -> Result<(), Fail> {
        self.debugfs(true, &format!("rm {path}"))?;
        fs::write(&self.scratch, data)?;
        let err = self.debugfs(true, &format!("write {} {path}", self.scratch.display()))?;
        if self.get(path)?.as_deref() != Some(data) {
            return Err(Fail(format!("debugfs could not write {path}: {err}")));
        }
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha1(data: &[u8]) -> [u8; 20] {
    Sha1::from(data).digest().bytes()
}

/// SHA-256 over the ELF file's read-only PT_LOAD segments, in address
/// order: what CTVM measures of itself into PCR 11 (its code and read-only
/// data as loaded).
pub fn hypervisor_digest(elf_path: &Path) -> Result<[u8; 32], Fail> {
    use elf::abi::{PF_W, PT_LOAD};
    use elf::endian::LittleEndian;
    let bytes = fs::read(elf_path)?;
    let file = elf::ElfBytes::<LittleEndian>::minimal_parse(&bytes).map_err(|e| Fail(format!("not ELF: {e}")))?;
    let mut segments: Vec<_> = file
        .segments()
        .ok_or_else(|| Fail::new("no program headers"))?
        .iter()
        .filter(|p| p.p_type == PT_LOAD && p.p_flags & PF_W == 0)
        .collect();
    segments.sort_by_key(|p| p.p_vaddr);
    let mut h = Sha256::new();
    for p in segments {
        let range = p.p_offset as usize..(p.p_offset + p.p_filesz) as usize;
        h.update(bytes.get(range).ok_or_else(|| Fail::new("a segment beyond the file"))?);
    }
    Ok(h.finalize().into())
}

/// The `ctvm-verify` command line, built for the host.
fn verifier() -> Result<PathBuf, Fail> {
    run(cargo().args(["build", "-q", "-p", "ctvm-verify"]))?;
    Ok(root().join("target").join("debug").join("ctvm-verify"))
}

/// What the harness keeps between boots, as the files `ctvm-verify` reads.
struct Verifier {
    bin: PathBuf,
    dir: PathBuf,
}

impl Verifier {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs `ctvm-verify` with these words (file names without spaces).
    fn cli(&self, args: &str) -> Result<(i32, String), Fail> {
        let out = Command::new(&self.bin)
            .current_dir(&self.dir)
            .args(args.split_whitespace())
            .output()
            .map_err(|e| Fail(format!("cannot run ctvm-verify: {e}")))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok((out.status.code().unwrap_or(-1), text.trim().to_string()))
    }

    fn need(&self, args: &str) -> Result<String, Fail> {
        match self.cli(args)? {
            (0, text) => Ok(text),
            (code, text) => Err(Fail(format!("ctvm-verify {args} exited {code}: {text}"))),
        }
    }

    /// `ctvm-verify quote` on the evidence in the directory; returns its
    /// verdict line and whether it accepted.
    fn quote(&self, nonce: &str, manifest: &str, log: &str) -> Result<(bool, String), Fail> {
        let args = format!("quote --ca ca.der --ek-cert ekcert.der --aik aik.blob --secret-in key --returned answer --nonce {nonce} --pcrvals pcrvals --quote quote --event-log {log} --ima ima --manifest {manifest} --json verdict.json");
        match self.cli(&args)? {
            (0, text) => Ok((true, text)),
            (1, text) => Ok((false, text)),
            (code, text) => Err(Fail(format!("ctvm-verify quote exited {code}: {text}"))),
        }
    }
}

/// The reference manifest, as a verifier's owner writes it from the files
/// the guest boots (the ISO's) and the IMA allow-list.
#[derive(Clone)]
struct Manifest {
    kernel_sha1: String,
    initrd_sha1: String,
    cmdline: String,
    hypervisor_sha256: String,
    policy_sha256: String,
    api_sha256: String,
    /// What `ctvm.policy` pins the agent by: the lock event names it.
    agent_sha256: String,
    ima_allow: Vec<String>,
}

impl Manifest {
    fn json(&self) -> String {
        let list = |v: &[String]| v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
        let trust: Vec<String> = TRUST.iter().map(|s| s.to_string()).collect();
        format!(
            "{{\n  \"kernel_sha1\": \"{}\",\n  \"initrd_sha1\": \"{}\",\n  \"cmdline\": \"{}\",\n  \"hypervisor_sha256\": \"{}\",\n  \"trust\": [{}],\n  \"policy_sha256\": \"{}\",\n  \"api_sha256\": \"{}\",\n  \"agent_sha256\": \"{}\",\n  \"vtpm\": \"durable\",\n  \"ima_allow\": [{}]\n}}\n",
            self.kernel_sha1,
            self.initrd_sha1,
            self.cmdline,
            self.hypervisor_sha256,
            list(&trust),
            self.policy_sha256,
            self.api_sha256,
            self.agent_sha256,
            list(&self.ima_allow)
        )
    }
}

/// The version CTVM reported opening (`vTPM state blob version N opened`).
fn opened_version(out: &RunOutput) -> Option<u64> {
    out.hypervisor().lines().find_map(|l| l.split_once("vTPM state blob version ")?.1.split(' ').next()?.parse().ok())
}

/// One boot: its ISO (the disk module from `blob`), the run, the verdict.
fn boot(
    n: usize,
    b: &Boot,
    disk: &Disk,
    hypervisor: &Path,
    modules: &[ModuleSpec],
    args: &str,
) -> Result<(RunOutput, Result<(), String>), Fail> {
    disk.put("/ctvm/test/phase", format!("{}\n", b.phase).as_bytes())?;
    let mut mods = modules.to_vec();
    mods[0].args = format!("guest=linux kind=linux trust={} {} -- {args}", TRUST.join(","), b.options);
    let disk_module = DiskModule { path: format!("/ctvm/{}", b.blob), args: "vtpm.state=linux".into() };
    let name = format!("{NAME}-{n}");
    let iso = image::make_iso_with_disk(&format!("{name}-bochs"), hypervisor, "exit=bochs", &mods, &[disk_module])?;
    println!("xtask: {NAME} boot {n} ({}): GRUB hands over /ctvm/{} if the disk has it", b.phase, b.blob);
    let out = emulator::boot_with_disk(Emulator::Bochs, &iso, &name, (1024, 1), b.timeout, None, Some(&disk.image))?;
    let s = Scenario {
        name: NAME,
        about: ABOUT,
        hypervisor_args: "",
        guests: vec![],
        target: scenarios::BOCHS,
        megs: 1024,
        cpus: 1,
        timeout: b.timeout,
        expect: b.expect.clone(),
        reject: b.reject.clone(),
        checks: vec![],
        ends_cleanly: true,
        interactive: false,
    };
    let verdict = scenarios::verdict(&s, &out);
    Ok((out, verdict))
}

/// The result of one boot, for the summary table.
pub struct BootResult {
    pub label: String,
    pub passed: bool,
    pub output: RunOutput,
}

/// The series, built and ready to boot: everything that runs `cargo` is
/// done here, so the boots can run beside other scenarios.
pub struct Series {
    hypervisor: PathBuf,
    modules: Vec<ModuleSpec>,
    args: String,
    seed: PathBuf,
    disk: Disk,
    verifier: Verifier,
    manifest: Manifest,
}

/// Builds what the four boots need and makes a fresh disk.
pub fn prepare() -> Result<Series, Fail> {
    let bins = image::build_all()?;
    let assets = linux::assets(linux::Kernel::Default)?;
    let initrd = linux::durable_initrd(linux::Kernel::Default, &assets)?;
    let dir = work_dir().join(NAME);
    fs::create_dir_all(&dir)?;
    let seed = dir.join("vtpm.seed");
    fs::write(&seed, format!("{SEED}\n"))?;
    let args = format!("{} ima_policy=tcb ctvm.durable", scenarios::LINUX_ARGS);
    let modules = vec![
        ModuleSpec { file: assets.kernel.clone(), args: String::new() },
        ModuleSpec { file: initrd.clone(), args: "initrd=linux".into() },
        ModuleSpec { file: assets.policy.clone(), args: "ctvm.policy".into() },
        ModuleSpec { file: assets.api.clone(), args: "ctvm.api".into() },
        ModuleSpec { file: seed.clone(), args: "vtpm.seed".into() },
    ];
    let disk = Disk::create(&dir)?;
    let evidence = dir.join("evidence");
    let _ = fs::remove_dir_all(&evidence);
    fs::create_dir_all(&evidence)?;
    let v = Verifier { bin: verifier()?, dir: evidence };
    let manifest = Manifest {
        kernel_sha1: hex(&sha1(&fs::read(&assets.kernel)?)),
        initrd_sha1: hex(&sha1(&fs::read(&initrd)?)),
        cmdline: args.clone(),
        hypervisor_sha256: hex(&hypervisor_digest(&bins.hypervisor)?),
        policy_sha256: hex(&Sha256::digest(fs::read(&assets.policy)?)),
        api_sha256: hex(&Sha256::digest(fs::read(&assets.api)?)),
        agent_sha256: agent_digest(&fs::read_to_string(&assets.policy)?)?,
        ima_allow: Vec::new(),
    };
    Ok(Series { hypervisor: bins.hypervisor, modules, args, seed, disk, verifier: v, manifest })
}

/// Runs the four boots and the verifier; stops at the first failure.
pub fn run_series(series: &Series) -> Result<Vec<BootResult>, Fail> {
    let Series { hypervisor, modules, args, seed, disk, verifier: v, manifest } = series;
    let mut results = Vec::new();
    let mut versions = Vec::new();
    for (i, b) in boots().iter().enumerate() {
        let n = i + 1;
        let (out, verdict) = boot(n, b, disk, hypervisor, modules, args)?;
        let after = verdict.and_then(|()| match b.phase {
            "provision" => after_provision(&out, disk, v, seed, manifest),
            "check" => after_check(disk, v, manifest),
            "rollback" => after_rollback(disk, v, manifest),
            _ => Ok(()),
        });
        versions.push(opened_version(&out));
        let after = after.and_then(|()| {
            // Boot 3 ran on an older state than boot 2, and CTVM took it.
            if b.phase == "rollback" && !matches!((versions[1], versions[2]), (Some(v2), Some(v3)) if v3 < v2) {
                return Err(format!(
                    "boot 3 opened version {:?}, boot 2 {:?}: not an older blob",
                    versions[2], versions[1]
                ));
            }
            Ok(())
        });
        let passed = after.is_ok();
        match &after {
            Ok(()) => println!("xtask: {NAME} boot {n} ({}) passed in {:.1} s", b.phase, out.elapsed.as_secs_f64()),
            Err(why) => {
                scenarios::report_failure(&format!("{NAME} boot {n} ({})", b.phase), why, &out);
            }
        }
        results.push(BootResult { label: format!("{NAME}:{n}"), passed, output: out });
        if !passed {
            break;
        }
    }
    Ok(results)
}

/// After boot 1: the CA certificate CTVM printed (`ctvm-verify ca
/// --console`) is the one `ctvm-verify ca --secret` derives from the seed; CTVM's measurement of itself is the ELF's;
/// the verifier's challenge for the AIK against the certified EK, and a
/// nonce, go to the disk for boot 2.
fn after_provision(out: &RunOutput, disk: &Disk, v: &Verifier, seed: &Path, m: &Manifest) -> Result<(), String> {
    let err = |e: Fail| e.0;
    // What CTVM printed, as a verifier takes it from the console (the only
    // way with a platform TPM), and what the seed gives (without one).
    fs::write(v.path("console.log"), out.hypervisor()).map_err(|e| e.to_string())?;
    v.need("ca --console console.log --out printed.der").map_err(err)?;
    let printed = fs::read(v.path("printed.der")).map_err(|e| e.to_string())?;
    fs::copy(seed, v.path("vtpm.seed")).map_err(|e| e.to_string())?;
    v.need("ca --secret vtpm.seed --out ca.der").map_err(err)?;
    if fs::read(v.path("ca.der")).map_err(|e| e.to_string())? != printed {
        return Err("the CA certificate CTVM printed is not the one ctvm-verify derives from the seed".into());
    }
    let measured = format!("hypervisor image: code and read-only data SHA-256 {}", m.hypervisor_sha256);
    if !out.hypervisor().contains(&measured) {
        return Err("CTVM's measurement of itself is not the ELF's read-only segments' digest".into());
    }
    let stored = out.guest("linux").matches("ctvm-vtpm-store: stored linux version ").count();
    if stored < 5 {
        return Err(format!(
            "the store service stored {stored} blobs; the fence, ownership, the NV index and its two writes need 5"
        ));
    }
    for f in ["ekcert.der", "aik.blob"] {
        fs::write(v.path(f), disk.need(&format!("/ctvm/test/{f}")).map_err(err)?).map_err(|e| e.to_string())?;
    }
    v.need("challenge --ca ca.der --ek-cert ekcert.der --aik aik.blob --blob-out challenge --secret-out key")
        .map_err(err)?;
    new_nonce(disk, v, "nonce")?;
    let challenge = fs::read(v.path("challenge")).map_err(|e| e.to_string())?;
    disk.put("/ctvm/test/challenge", &challenge).map_err(err)
}

fn new_nonce(disk: &Disk, v: &Verifier, name: &str) -> Result<(), String> {
    v.need(&format!("nonce --out {name}")).map_err(|e| e.0)?;
    let nonce = fs::read(v.path(name)).map_err(|e| e.to_string())?;
    disk.put("/ctvm/test/nonce", &nonce).map_err(|e| e.0)
}

/// Copies the guest's evidence from the disk.
fn collect(disk: &Disk, v: &Verifier) -> Result<(), String> {
    for f in ["answer", "quote", "pcrvals", "log", "ima"] {
        let data = disk.need(&format!("/ctvm/test/{f}")).map_err(|e| e.0)?;
        fs::write(v.path(f), data).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What `ctvm-verify quote` must say for this evidence and manifest.
fn expect_verdict(v: &Verifier, nonce: &str, m: &Manifest, log: &str, want: Option<&str>) -> Result<(), String> {
    let file = format!("manifest-{}.json", want.unwrap_or("accept"));
    fs::write(v.path(&file), m.json()).map_err(|e| e.to_string())?;
    let (accepted, text) = v.quote(nonce, &file, log).map_err(|e| e.0)?;
    println!("xtask:   ctvm-verify: {}", text.lines().next().unwrap_or(""));
    match want {
        None if accepted && text.starts_with("ACCEPT guest=linux") => Ok(()),
        Some(check) if !accepted && text.starts_with(&format!("REJECT [{check}]")) => Ok(()),
        _ => Err(format!(
            "ctvm-verify said {text:?}, expected {}",
            want.map_or("ACCEPT".into(), |c| format!("REJECT [{c}]"))
        )),
    }
}

/// The IMA allow-list: the file digests (SHA-1 and SHA-256) of what the
/// guest read from the disk before its quote, as the disk holds them.
fn allow_list(disk: &Disk, files: &[&str]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for f in files {
        let data = disk.need(&format!("/ctvm/test/{f}")).map_err(|e| e.0)?;
        out.push(format!("sha1:{}", hex(&sha1(&data))));
        out.push(format!("sha256:{}", hex(&Sha256::digest(&data))));
    }
    Ok(out)
}

const READ_BEFORE_QUOTE: [&str; 6] = ["phase", "ekcert.der", "aik.blob", "sealed.blob", "challenge", "nonce"];

/// After boot 2: the real guest's quote is accepted; a replayed nonce,
/// another kernel, an edited event log and an IMA entry outside the
/// allow-list are each rejected by the right check. A new nonce for boot 3.
fn after_check(disk: &Disk, v: &Verifier, m: &Manifest) -> Result<(), String> {
    collect(disk, v)?;
    let allow = allow_list(disk, &READ_BEFORE_QUOTE)?;
    let good = Manifest { ima_allow: allow.clone(), ..m.clone() };
    expect_verdict(v, "nonce", &good, "log", None)?;
    // A replayed quote: checked against another nonce than the one it carries.
    v.need("nonce --out other-nonce").map_err(|e| e.0)?;
    expect_verdict(v, "other-nonce", &good, "log", Some("quote"))?;
    let other_kernel = Manifest { kernel_sha1: hex(&sha1(b"another kernel")), ..good.clone() };
    expect_verdict(v, "nonce", &other_kernel, "log", Some("kernel"))?;
    let mut log = fs::read(v.path("log")).map_err(|e| e.to_string())?;
    log[8] ^= 1; // the first event's digest
    fs::write(v.path("edited-log"), log).map_err(|e| e.to_string())?;
    expect_verdict(v, "nonce", &good, "edited-log", Some("event_log"))?;
    let without_aik = allow_list(disk, &["phase", "ekcert.der", "sealed.blob", "challenge", "nonce"])?;
    let narrow = Manifest { ima_allow: without_aik, ..good.clone() };
    expect_verdict(v, "nonce", &narrow, "log", Some("ima_allow_list"))?;
    new_nonce(disk, v, "nonce3")
}

/// After boot 3 (the agent kept from loading): its quote is rejected,
/// the lock event missing from PCR 11.
fn after_rollback(disk: &Disk, v: &Verifier, m: &Manifest) -> Result<(), String> {
    collect(disk, v)?;
    let good = Manifest { ima_allow: allow_list(disk, &READ_BEFORE_QUOTE)?, ..m.clone() };
    expect_verdict(v, "nonce3", &good, "log", Some("lock"))
}

/// The `sha256=` `ctvm.policy` pins `ctvm_agent` by, as a verifier's owner
/// reads it from the policy file.
fn agent_digest(policy: &str) -> Result<String, Fail> {
    policy
        .lines()
        .filter(|l| l.starts_with("module ctvm_agent "))
        .find_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("sha256=")))
        .map(str::to_string)
        .ok_or_else(|| Fail("ctvm.policy has no ctvm_agent entry".into()))
}
