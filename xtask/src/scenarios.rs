//! The emulator scenarios: what each boots, and what its serial log must show.
//!
//! Pass or fail is read from the serial console. Every scenario must end
//! with the hypervisor's own clean power-off line, so a hang, a crash or a
//! missing line fails it; logs stay in `target/ctvm/runs/<scenario>/`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::emulator::{self, Devices, Emulator, RunOutput, TpmDevice};
use crate::image::{self, Binaries, Image, Loader, ModuleSpec};
use crate::linux;
use crate::util::Fail;

/// The Linux guests' kernel command line, with more words for a scenario.
/// KASLR stays on, as on real systems: the agent and the hypervisor take
/// the kernel's layout from the running kernel, never from the image.
/// RCU's grace periods are expedited: they end by IPIs rather than by
/// waiting for timer ticks, and idle guest time is dear under Bochs (on
/// several CPUs a guest's idle second lasts about a minute of the wall's).
/// Each module unloaded, or refused at its init, waits for several.
macro_rules! linux_args {
    ($($more:literal),*) => {
        concat!("console=ttyS0,115200 quiet panic=-1 tpm_tis.interrupts=0 rcupdate.rcu_expedited=1" $(, " ", $more)*)
    };
}

/// A guest booted from a module.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub name: &'static str,
    pub kind: GuestImage,
    pub mem_mib: u32,
    /// A virtual TPM for a test guest (Linux guests always have one).
    pub vtpm: bool,
    /// The guest's own command line (after `--`).
    pub args: &'static str,
    /// More of the hypervisor's options for this guest (before `--`).
    pub options: &'static str,
}

/// What a guest boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestImage {
    /// The test guest kernel (`tests/guests/testguest`).
    Test,
    /// Debian's cloud kernel with the test initramfs, on the pass-through platform.
    Linux(linux::Kernel),
    /// Not a guest: the vTPM seed, as the file module `vtpm.seed` (`args` holds its hex).
    VtpmSeed,
}

pub type Check = fn(&RunOutput) -> Result<(), String>;

/// Where a scenario runs: the emulator, the image, its loader, and (QEMU
/// TCG) the platform devices.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub emulator: Emulator,
    pub image: Image,
    pub loader: Loader,
    pub devices: Devices,
}

/// The release image under Bochs, started by GRUB: most scenarios.
pub const BOCHS: Target = Target {
    emulator: Emulator::Bochs,
    image: Image::Release,
    loader: Loader::Grub,
    devices: Devices { iommu: false, edu: false, tpm: None },
};

/// QEMU TCG (no VT-x) with no extra device.
pub const QEMU: Target = Target { emulator: Emulator::QemuTcg, ..BOCHS };

pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub hypervisor_args: &'static str,
    pub guests: Vec<GuestSpec>,
    pub target: Target,
    pub megs: u32,
    /// Processors the emulator gives the machine.
    pub cpus: u32,
    pub timeout: Duration,
    /// Lines (substrings) that must appear, in this order.
    pub expect: Vec<&'static str>,
    /// Substrings that must not appear anywhere.
    pub reject: Vec<&'static str>,
    /// Further checks on the whole output.
    pub checks: Vec<Check>,
    /// Whether the run must end with the hypervisor's clean power-off (all
    /// but the scenarios that crash the hypervisor on purpose).
    pub ends_cleanly: bool,
    /// For `cargo xtask run` only (it waits for a person at the console);
    /// `cargo xtask test` skips it unless it is named.
    pub interactive: bool,
}

impl Scenario {
    /// Its time limit: `timeout`, times `CTVM_TIMEOUT_SCALE` if set (a whole
    /// number, for machines busier or slower than the one the limits were
    /// set on; Bochs' pace follows the host CPU it gets).
    pub fn time_limit(&self) -> Duration {
        let scale = std::env::var("CTVM_TIMEOUT_SCALE").ok().and_then(|v| v.parse::<u32>().ok());
        self.timeout * scale.filter(|&n| n > 0).unwrap_or(1)
    }

    pub fn modules(&self, bins: &Binaries) -> Result<Vec<ModuleSpec>, Fail> {
        modules_for(&self.guests, bins)
    }
}

/// The multiboot modules (images and their command lines) for these guests.
pub fn modules_for(guests: &[GuestSpec], bins: &Binaries) -> Result<Vec<ModuleSpec>, Fail> {
    let mut out = Vec::new();
    for g in guests {
        match g.kind {
            GuestImage::Test => out.push(ModuleSpec {
                file: bins.testguest.clone(),
                args: format!(
                    "guest={} mem={}M{}{}{} -- {}",
                    g.name,
                    g.mem_mib,
                    if g.vtpm { " vtpm=on" } else { "" },
                    if g.options.is_empty() { "" } else { " " },
                    g.options,
                    g.args
                ),
            }),
            GuestImage::Linux(kernel) => {
                let assets = linux::assets(kernel)?;
                println!("xtask: Linux guest {}: Debian kernel {}", g.name, assets.version);
                out.push(ModuleSpec {
                    file: assets.kernel,
                    args: format!("guest={} kind=linux trust=ctvm_agent,ifb {} -- {}", g.name, g.options, g.args),
                });
                out.push(ModuleSpec { file: assets.initrd, args: format!("initrd={}", g.name) });
                out.push(ModuleSpec { file: assets.policy, args: "ctvm.policy".into() });
                out.push(ModuleSpec { file: assets.api, args: "ctvm.api".into() });
            }
            GuestImage::VtpmSeed => {
                let file = crate::util::work_dir().join(format!("vtpm-seed-{}", &g.args[..8.min(g.args.len())]));
                std::fs::write(&file, format!("{}\n", g.args))
                    .map_err(|e| Fail(format!("cannot write {}: {e}", file.display())))?;
                out.push(ModuleSpec { file, args: "vtpm.seed".into() });
            }
        }
    }
    Ok(out)
}

/// What every run must end with, and must never show.
const CLEAN_END: &str = "ctvm: all guests stopped; powering off";

/// What Linux says of its own data gone wrong: a reference count, a list.
/// The attack modules' oopses are expected in the integrity scenarios;
/// these are not, whether a module or CTVM (undoing a write, say) did it.
const KERNEL_DATA_CORRUPTED: [&str; 3] = ["refcount_t: ", "list_add corruption", "list_del corruption"];

/// How a run ends where VT-x is missing (QEMU TCG): after the platform pieces.
const NO_VMX_END: &str =
    "ctvm: VT-x is missing (*): the platform pieces ran; no guest can run on this processor; powering off";
/// QEMU's exit status for CTVM's exit codes 0 and 0x10 (no VT-x) through isa-debug-exit.
const QEMU_EXIT_NO_VMX: i32 = (0x10 << 1) | 1;
/// A CPU still in VMX at power-off is a failure wherever it happens.
const ALWAYS_REJECT: &[&str] = &["ctvm: FATAL: hypervisor panic", "Kernel panic", "did not leave VMX"];

fn guest(name: &'static str, args: &'static str) -> GuestSpec {
    GuestSpec { name, kind: GuestImage::Test, mem_mib: 16, vtpm: false, args, options: "" }
}

fn guest_with_vtpm(name: &'static str, args: &'static str) -> GuestSpec {
    GuestSpec { vtpm: true, ..guest(name, args) }
}

/// The kernel command line of the Linux scenarios.
pub const LINUX_ARGS: &str = linux_args!();

pub fn linux_guest(args: &'static str) -> GuestSpec {
    GuestSpec {
        name: "linux",
        kind: GuestImage::Linux(linux::Kernel::Default),
        mem_mib: 0,
        vtpm: true,
        args,
        options: "",
    }
}

pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "linux-shell",
            about: "what `cargo xtask run` boots: Debian's cloud kernel under CTVM, leaving a busybox shell",
            hypervisor_args: "",
            guests: vec![linux_guest(concat!("console=ttyS0,115200 quiet tpm_tis.interrupts=0", " ctvm.shell"))],
            target: BOCHS,
            megs: 1024,
            cpus: 1,
            timeout: Duration::from_secs(3600),
            expect: vec![CLEAN_END],
            reject: vec![],
            checks: vec![],
            ends_cleanly: true,
            interactive: true,
        },
        Scenario {
            name: "boot",
            about: "the hypervisor boots, reports the VT-x features it found, and powers off",
            hypervisor_args: "log=debug",
            guests: vec![],
            target: BOCHS,
            megs: 256,
            cpus: 1,
            timeout: Duration::from_secs(60),
            expect: vec![
                "ctvm: CTVM 0.1.0 starting",
                "ctvm: VT-x: VMCS revision",
                "ctvm: VT-x: EPT",
                "ctvm: VMX on",
                "ctvm: no guests configured",
                CLEAN_END,
            ],
            reject: vec![],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "smp-boot",
            about: "four CPUs: CTVM starts every AP through its real-mode trampoline into VMX, then powers off \
                    with every AP out of VMX first",
            hypervisor_args: "",
            guests: vec![],
            target: BOCHS,
            megs: 256,
            cpus: 4,
            timeout: Duration::from_secs(180),
            expect: vec![
                "ctvm: VMX on",
                "ctvm: CPU 1 (APIC 1): VMX on",
                "ctvm: CPU 2 (APIC 2): VMX on",
                "ctvm: CPU 3 (APIC 3): VMX on",
                "ctvm: 4 of 4 CPUs run under the hypervisor",
                "ctvm: no guests configured",
                CLEAN_END,
                "ctvm: 3 application processors left VMX",
            ],
            reject: vec!["is left out"],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "smp-ap-stall",
            about: "four CPUs, the third stops before VMXON without a word: it is reported and left out, the others run",
            hypervisor_args: "test.stall-ap=2",
            guests: vec![],
            target: Target { image: Image::Test, ..BOCHS },
            megs: 256,
            cpus: 4,
            timeout: Duration::from_secs(180),
            expect: vec![
                "ctvm: CPU 1 (APIC 1): VMX on",
                "ctvm: warning: CPU 2 (APIC 2) is left out: it did not turn VMX on within a second",
                "ctvm: CPU 3 (APIC 3): VMX on",
                "ctvm: 3 of 4 CPUs run under the hypervisor (APIC IDs [0, 1, 3])",
                "ctvm: no guests configured",
                CLEAN_END,
                // The stalled CPU never entered VMX: it is not waited for.
                "ctvm: 2 application processors left VMX",
            ],
            reject: vec!["CPU 2 (APIC 2): VMX on"],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "guest-basics",
            about: "a test guest prints through the vUART, queries the version, and shuts down with exit code 42",
            hypervisor_args: "",
            guests: vec![guest("alpha", "test=basics exit=42")],
            target: BOCHS,
            megs: 256,
            cpus: 1,
            timeout: Duration::from_secs(90),
            expect: vec![
                "ctvm: guest alpha: loaded",
                "[alpha] CTVM test guest alpha starting",
                "[alpha] ok: cpuid hides vmx",
                "[alpha] ok: hypervisor leaf signature CTVMCTVMCTVM",
                "[alpha] ok: hypercall version",
                "[alpha] ok: allowed msr read",
                "[alpha] ok: denied msr raises #GP",
                "[alpha] ok: unknown port reads 0xff",
                "[alpha] all checks passed",
                "ctvm: guest alpha stopped: shutdown hypercall, exit code 42",
                "ctvm: VM exits by reason",
                CLEAN_END,
            ],
            reject: vec!["[alpha] FAIL"],
            checks: vec![unknown_port_logged_once],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "containment",
            about: "a triple-faulting guest and one touching memory it does not own are stopped; the others carry on",
            hypervisor_args: "",
            guests: vec![
                guest("alpha", "test=basics exit=0"),
                guest("beta", "test=triple-fault"),
                guest("gamma", "test=wild-write"),
            ],
            target: BOCHS,
            megs: 256,
            cpus: 1,
            timeout: Duration::from_secs(90),
            expect: vec![CLEAN_END],
            reject: vec![],
            checks: vec![containment_reports],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "timeslice",
            about: "two guests share the CPU: the preemption timer interleaves their work",
            hypervisor_args: "",
            guests: vec![guest("alpha", "test=ticks count=4"), guest("beta", "test=ticks count=4")],
            target: BOCHS,
            megs: 256,
            cpus: 1,
            timeout: Duration::from_secs(120),
            expect: vec![CLEAN_END],
            reject: vec![],
            checks: vec![interleaved_ticks],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "entry-failure",
            about: "a guest whose state VM entry refuses is stopped with the failing field named",
            hypervisor_args: "test.corrupt-guest=beta",
            guests: vec![guest("alpha", "test=basics exit=3"), guest("beta", "test=basics")],
            target: Target { image: Image::Test, ..BOCHS },
            megs: 256,
            cpus: 1,
            timeout: Duration::from_secs(90),
            expect: vec![CLEAN_END],
            reject: vec![],
            checks: vec![entry_failure_named],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "vtpm",
            about: "a test guest drives its vTPM through the virtual TIS and checks the measured launch against its event log",
            hypervisor_args: "",
            guests: vec![guest_with_vtpm("alpha", "test=vtpm exit=5")],
            target: BOCHS,
            megs: 256,
            cpus: 1,
            timeout: Duration::from_secs(300),
            expect: vec![
                "ctvm: guest alpha: vTPM ready",
                "[alpha] ok: TIS DID_VID 0x00011014",
                "[alpha] ok: locality 0 granted",
                "[alpha] ok: Startup answers INVALID_POSTINIT",
                "[alpha] ok: GetCapability reports 24 PCRs",
                "[alpha] ok: event log read",
                "[alpha] ok: PCR 8 equals the event log's replay",
                "[alpha] ok: PCR 9 equals the event log's replay",
                "[alpha] ok: Extend of PCR 16 computes SHA-1(old || digest)",
                "[alpha] ok: GetRandom returns 32 varied bytes",
                "[alpha] ok: ReadPubek returns the endorsement key",
                "[alpha] all checks passed",
                "ctvm: guest alpha stopped: shutdown hypercall, exit code 5",
                CLEAN_END,
            ],
            reject: vec!["[alpha] FAIL"],
            checks: vec![pcrs_match_the_images],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "vtpm-two-guests",
            about: "two guests, two vTPMs: different launches give different PCRs, EKs and event logs",
            hypervisor_args: "",
            guests: vec![
                GuestSpec {
                    name: "seed",
                    kind: GuestImage::VtpmSeed,
                    mem_mib: 0,
                    vtpm: false,
                    args: "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e",
                    options: "",
                },
                guest_with_vtpm("alpha", "test=vtpm mode=first"),
                guest_with_vtpm("beta", "test=vtpm mode=second"),
            ],
            target: BOCHS,
            megs: 256,
            cpus: 1,
            timeout: Duration::from_secs(400),
            expect: vec![CLEAN_END],
            reject: vec!["FAIL", "no vtpm.seed", "vtpm.seed module must hold"],
            checks: vec![pcrs_match_the_images, two_vtpms_differ],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "linux-boot",
            about: "Debian's cloud kernel on two CPUs under CTVM on the pass-through platform: it starts its second CPU \
                    itself, runs work on both, and powers off; the other CPU is signalled out of the guest",
            hypervisor_args: "",
            guests: vec![linux_guest(LINUX_ARGS)],
            target: BOCHS,
            megs: 1024,
            cpus: 2,
            timeout: Duration::from_secs(600),
            expect: vec![
                "ctvm: CPU 1 (APIC 1): VMX on",
                "ctvm: 2 of 2 CPUs run under the hypervisor",
                "ctvm: guest linux: Linux boot protocol 2.15",
                "ctvm: guest linux: loaded, on CPU 0-1 (2 vCPUs)",
                "ctvm-init: started: Linux",
                "ctvm-init: cpus: 2",
                "ctvm-init: work: cpu0:ran-on-0 cpu1:ran-on-1",
                "ctvm-init: vmx visible: no",
                "ctvm-init: hypervisor flag: yes",
                "ctvm-init: done",
                "ctvm: guest linux stopped: ACPI sleep requested (SLP_TYP",
                "ctvm:   cpu 1 (APIC 1): * started 1 times",
                CLEAN_END,
                "ctvm: 1 application processor left VMX",
            ],
            reject: vec!["has not answered a cross-CPU signal"],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "linux-tpm",
            about: "Linux finds its vTPM through ACPI; PCRs 8-10 match the event log, IMA and the files on the ISO",
            hypervisor_args: "",
            guests: vec![linux_guest(linux_args!("ima_policy=tcb ctvm.tpm ctvm.ima=files"))],
            target: BOCHS,
            megs: 1024,
            cpus: 2,
            timeout: Duration::from_secs(700),
            expect: vec![
                "ctvm: guest linux: vTPM ready",
                "ctvm-init: tpm0: present",
                "ctvm-init: pcr PCR-08:",
                "ctvm-init: bios log: ",
                "ctvm-init: ima: 10 ",
                "ctvm-init: tpm random: 00c40000002e00000000",
                "ctvm-init: hwrng ctvm-tpm-rng: ",
                "ctvm: guest linux stopped: ACPI sleep requested",
                CLEAN_END,
            ],
            reject: vec!["ctvm-init: FAIL"],
            checks: vec![linux_pcrs_replay],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "linux-containment",
            about: "Linux writing to the hypervisor's memory through /dev/mem is stopped with a report",
            hypervisor_args: "",
            guests: vec![linux_guest(linux_args!("ctvm.poke=0x200000"))],
            target: BOCHS,
            megs: 1024,
            cpus: 1,
            timeout: Duration::from_secs(400),
            expect: vec![
                "ctvm-init: done",
                "ctvm-init: poking 0x200000 through /dev/mem",
                "ctvm: guest linux stopped: EPT violation: write to guest-physical 0x200000 (not guest memory)",
                CLEAN_END,
            ],
            reject: vec!["ctvm-init: FAIL"],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        linux_integrity(
            "linux-integrity",
            "two CPUs: the CTVM agent isolates modules: attacks are stopped and reported, benign modules and the kernel's own patching keep working",
            linux::Kernel::Default,
            2,
        ),
        Scenario {
            name: "linux-integrity-race",
            about: "two CPUs racing: an attack module's thread on CPU 1 hammers the syscall table, writes over and calls \
                    into (and has the kernel write) a static key's patch site that CPU 0's kernel rewrites with text_poke, and writes a benign \
                    module's data and calls into its code, while CPU 0 flips the key and loads and unloads that module in a loop; every \
                    attempt is refused and recorded, both CPUs run on",
            hypervisor_args: "",
            guests: vec![GuestSpec { options: "cpus=0-1", ..linux_guest(linux_args!("ctvm.race")) }],
            target: BOCHS,
            megs: 1024,
            cpus: 2,
            timeout: Duration::from_secs(600),
            expect: vec![
                "ctvm: guest linux: loaded, on CPU 0-1 (2 vCPUs)",
                "ctvm-init: cpus: 2",
                "ctvm: guest linux: kernel layout locked, agent pinned; protections on",
                "ctvm-init: agent loaded",
                "ctvm: violation guest=linux module=atk_race kind=write-syscall-table * cpu=1",
                // Its thread, entered before, attacks on inside its call chain.
                "ctvm: guest linux: module atk_race quarantined: the kernel may enter it only to unload it",
                "ctvm: violation guest=linux module=atk_race kind=write-kernel-text * cpu=1",
                "ctvm: violation guest=linux module=atk_race kind=call-non-entry * cpu=1",
                "ctvm: violation guest=linux module=atk_race kind=deputy-write * cpu=1",
                "ctvm: violation guest=linux module=atk_race kind=write-protected-data * cpu=1",
                "ctvm: violation guest=linux module=atk_race kind=enter-module-off-entry * cpu=1",
                "load/unload cycles of race_peer on CPU 0, the static key flipped each time",
                "ctvm-init: race race_peer: unloading on CPU 0: secret intact",
                "none went through; getpid entry unchanged; off CPU 1: 0 rounds",
                "ctvm-init: race: CPU 1 saw CPU 0's pokes and peer writes between its attempts",
                "ctvm-init: after atk_race: getpid ok",
                "attempts, 0 allowed",
                "ctvm-init: race: every attempt recorded",
                "ctvm-init: race: no records on CPU 0",
                "ctvm-init: race records lost: 0",
                "ctvm-init: race: both CPUs still run: cpu0:ran-on-0 cpu1:ran-on-1",
                "ctvm-init: race: timer interrupts moved on both CPUs",
                "ctvm: guest linux stopped: ACPI sleep requested",
                "ctvm:   cpu 1 (APIC 1): * started 1 times",
                CLEAN_END,
            ],
            reject: vec![
                "WENT THROUGH",
                "CHANGED",
                "getpid WRONG",
                "ctvm-init: FAIL",
                "ctvm: violation * action=allow",
                "ctvm: violation * cpu=0",
                "has waited long",
                "Oops",
                "BUG: ",
                "Kernel panic",
            ]
            .into_iter()
            .chain(KERNEL_DATA_CORRUPTED)
            .collect(),
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        linux_integrity(
            "linux-integrity-newer",
            "linux-integrity on one CPU and the newest 6.4+ cloud kernel apt offers (modules in mod->mem[])",
            linux::Kernel::Newer,
            1,
        ),
        Scenario {
            name: "linux-audit",
            about: "integrity=audit: a module's call to a non-exported function (set_memory_rw) is reported and let through; a flood of 1,500 violations is recorded whole, the console merges repeats, the guest powers off on time",
            hypervisor_args: "",
            guests: vec![GuestSpec {
                options: "integrity=audit",
                ..linux_guest(linux_args!("ctvm.audit"))
            }],
            target: BOCHS,
            megs: 1024,
            cpus: 2,
            timeout: Duration::from_secs(900),
            expect: vec![
                "ctvm-init: agent loaded",
                "ctvm: violation guest=linux module=atk_setmem kind=call-non-entry * action=allow",
                // Linux itself keeps its rodata read-only (static protections).
                "ctvm-init: audit atk_setmem: set_memory_rw returned 0; rodata write blocked",
                "ctvm: violation guest=linux module=atk_wx kind=call-non-entry * action=allow",
                "ctvm: violation guest=linux module=kernel kind=execute-data * action=allow",
                "ctvm-init: audit atk_wx: set_memory_x returned 0; shellcode in a kmalloc'd page, called by the kernel: it RAN",
                "ctvm: violation guest=linux module=atk_flood kind=write-protected-data * action=allow",
                "ctvm: violation guest=linux module=atk_flood kind=write-protected-data * action=allow * repeated=1000",
                "ctvm-init: audit atk_flood: flood of 1500 same-value writes done, byte unchanged",
                "ctvm-init: audit flood: every write recorded",
                "ctvm-init: audit records lost: 0",
                "ctvm: guest linux stopped: ACPI sleep requested",
                CLEAN_END,
            ],
            // The call's return into the module is no second violation.
            reject: ["ctvm: violation * action=deny", "ctvm: violation * kind=enter-module-off-entry", "ctvm-init: FAIL"]
                .into_iter()
                .chain(KERNEL_DATA_CORRUPTED)
                .collect(),
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "linux-user-attacks",
            about: "user space turns the hypervisor's emulation on the kernel: SGDT/SIDT/SLDT/STR at kernel addresses, every hypercall",
            hypervisor_args: "",
            guests: vec![linux_guest(linux_args!("ctvm.uattack"))],
            target: BOCHS,
            megs: 1024,
            cpus: 1,
            timeout: Duration::from_secs(400),
            expect: vec![
                "ctvm-init: agent loaded",
                "ctvm-uattack: sgdt at sys_call_table: Segmentation fault, kernel memory unchanged",
                "ctvm-uattack: str at idt_table: Segmentation fault, kernel memory unchanged",
                "ctvm-uattack: own memory: sgdt limit 0 base 0xfffffffffffe0000, sidt limit 0 base 0xffffffffffff0000, sldt 0, str 0",
                "ctvm-uattack: vmcall: 64 of 64 calls refused",
                "ctvm-uattack: done, 0 failures",
                "ctvm-init: kernel still works after user attacks",
                "ctvm:   refused linux: hypercall 64",
                CLEAN_END,
            ],
            reject: vec!["WENT THROUGH", "ctvm-uattack: FAIL", "ctvm-init: FAIL"],
            checks: vec![user_attacks_all_faulted],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "linux-smp-containment",
            about: "two CPUs: Linux sees the one it is given; its INIT and start-up IPIs to the other are refused and reported",
            hypervisor_args: "",
            // Without the agent, so that the APIC's own guard is what stops the
            // IPIs; given CPU 0 only (`cpus=0`), so CPU 1 is not the guest's to start.
            guests: vec![GuestSpec { options: "integrity=off cpus=0", ..linux_guest(linux_args!("ctvm.sipi")) }],
            target: BOCHS,
            megs: 1024,
            cpus: 2,
            timeout: Duration::from_secs(600),
            expect: vec![
                "ctvm-init: cpus: 1",
                "ctvm: refused guest=linux kind=start-cpu cpl=0",
                "ctvm-init: sipi atk_sipi: INIT and start-up IPIs sent to APIC 1; this CPU runs on",
                "ctvm-init: cpus after: 1, online 0",
                "ctvm: guest linux stopped: ACPI sleep requested",
                // INIT and two start-up IPIs through the xAPIC, INIT and one
                // through the x2APIC MSR; busybox's insmod runs a failed init twice.
                "ctvm:   refused linux: start-cpu 6",
                CLEAN_END,
            ],
            reject: vec!["ctvm-init: FAIL"],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "qemu-vtd",
            about: "QEMU's VT-d: edu's DMA into guest memory lands; into the hypervisor, or a page the kernel view protects, it faults, is reported, and changes nothing",
            hypervisor_args: "log=debug test.dma=edu",
            guests: vec![],
            target: Target { image: Image::Test, devices: Devices { iommu: true, edu: true, tpm: None }, ..QEMU },
            megs: 512,
            cpus: 1,
            timeout: Duration::from_secs(60),
            expect: vec![
                "ctvm: DMA contained: 1 remapping unit(s), 3-level tables, devices reach",
                "ctvm: test dma: edu at ",
                "ctvm: test dma: ok: edu DMA into guest memory",
                "ctvm: test dma: ok: no fault for guest memory",
                "ctvm: dma-violation device=* address=* access=write reason=* unit=0xfed90000",
                "ctvm: test dma: ok: edu's write into the hypervisor at",
                "ctvm: test dma: ok: hypervisor page * unchanged",
                "ctvm: dma-violation device=* address=* access=read reason=* unit=0xfed90000",
                "ctvm: test dma: ok: edu's read of the hypervisor at",
                "ctvm: test dma: ok: the device read none of the hypervisor's bytes",
                "ctvm: test dma: ok: the kernel-view change of * reached every unit",
                "ctvm: dma-violation device=* address=* access=write reason=0x5 (write to a page without write rights)",
                "ctvm: test dma: ok: edu's write into the protected page",
                "ctvm: test dma: ok: protected page * unchanged",
                "ctvm: test dma: ok: devices may still read the protected page",
                "ctvm: test dma: ok: every timed kernel-view change reached every unit",
                "ctvm: test dma: cost of one kernel-view change on the DMA tables:",
                "ctvm: test dma: ok: * writable to devices again",
                "ctvm: test dma: done",
                NO_VMX_END,
            ],
            reject: vec!["test dma: FAIL", "DMA is not contained", "DMA containment lost"],
            checks: vec![violations_name_the_attacked_pages],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "qemu-no-iommu",
            about: "without an IOMMU CTVM says that DMA is not contained, and goes on",
            hypervisor_args: "",
            guests: vec![],
            target: QEMU,
            megs: 256,
            cpus: 1,
            timeout: Duration::from_secs(60),
            expect: vec!["ctvm: warning: DMA is not contained: no IOMMU (no ACPI DMAR table)", NO_VMX_END],
            reject: vec!["ctvm: DMA contained"],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        qemu_tpm("qemu-tpm2-tis", TpmDevice::Tpm2Tis),
        qemu_tpm("qemu-tpm2-crb", TpmDevice::Tpm2Crb),
        qemu_tpm("qemu-tpm12-tis", TpmDevice::Tpm12Tis),
        Scenario {
            name: "qemu-tboot",
            about: "GRUB loads tboot 1.10.5, tboot loads CTVM's 32-bit image and its guests (no TXT here: no measured launch); CTVM parses what tboot left, then stops without VT-x",
            hypervisor_args: "log=debug",
            guests: vec![guest("alpha", "test=basics"), guest("beta", "test=ticks count=2")],
            target: Target {
                loader: Loader::Tboot,
                devices: Devices { iommu: true, edu: false, tpm: Some(TpmDevice::Tpm2Tis) },
                ..QEMU
            },
            megs: 512,
            cpus: 1,
            timeout: Duration::from_secs(60),
            expect: vec![
                "TBOOT: command line: logging=serial,memory",
                "TBOOT: This is an ELF32 file.",
                "TBOOT: transfering control to kernel @0x2000",
                "ctvm: CTVM 0.1.0 starting",
                "ctvm: image 0x200000..* 2 modules, command line \"exit=qemu log=debug\"",
                "ctvm: tboot 1.10.5: its memory log at 0x60000 (* bytes used) stays reserved",
                "ctvm: tboot: no measured launch (no TXT): no shared page was handed over",
                // Multiboot 1 gives no RSDP: CTVM finds it in the BIOS areas.
                "ctvm: DMA contained: 1 remapping unit(s)",
                "ctvm: platform TPM 2.0 via TIS:",
                NO_VMX_END,
            ],
            reject: vec!["TBOOT: Error", "ERROR", "Load floor"],
            checks: vec![crate::platform_checks::platform_tpm_replays],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "tboot-linux",
            about: "GRUB -> tboot 1.10.5 -> CTVM -> Linux under Bochs (no TXT: tboot falls through to a plain launch); linux-boot with tboot in the chain",
            hypervisor_args: "",
            guests: vec![linux_guest(LINUX_ARGS)],
            target: Target { loader: Loader::Tboot, ..BOCHS },
            megs: 1024,
            cpus: 1,
            timeout: Duration::from_secs(600),
            expect: vec![
                "TBOOT: This is an ELF32 file.",
                "TBOOT: transfering control to kernel @0x2000",
                "ctvm: CTVM 0.1.0 starting",
                "ctvm: tboot 1.10.5: its memory log at 0x60000 (* bytes used) stays reserved",
                "ctvm: tboot: no measured launch (no TXT)",
                "ctvm: VMX on",
                "ctvm: guest linux: Linux boot protocol 2.15",
                "ctvm-init: started: Linux",
                "ctvm-init: done",
                "ctvm: guest linux stopped: ACPI sleep requested",
                CLEAN_END,
            ],
            reject: vec!["TBOOT: Error", "Load floor"],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
        Scenario {
            name: "hypervisor-fault",
            about: "a fault inside the hypervisor is reported with vector, RIP, CR2 and a backtrace, then the machine stops",
            hypervisor_args: "test.fault",
            guests: vec![],
            target: Target { image: Image::Test, ..BOCHS },
            megs: 256,
            cpus: 1,
            timeout: Duration::from_secs(60),
            expect: vec![
                "ctvm: FATAL: exception 14 (#PF page fault) in the hypervisor, error code 0x0",
                "ctvm:   rip * cr2 0x0000001000000000",
                "ctvm:   backtrace: 0x",
            ],
            reject: vec![CLEAN_END],
            checks: vec![],
            ends_cleanly: false,
            interactive: false,
        },
        Scenario {
            name: "test-guests",
            about: "two test guests sharing the CPU (`cargo xtask run test-guests`)",
            hypervisor_args: "",
            guests: vec![guest("alpha", "test=basics exit=0"), guest("beta", "test=ticks count=3")],
            target: BOCHS,
            megs: 256,
            cpus: 1,
            timeout: Duration::from_secs(120),
            expect: vec!["ctvm: guest alpha stopped", CLEAN_END],
            reject: vec![],
            checks: vec![],
            ends_cleanly: true,
            interactive: false,
        },
    ]
}

/// Each reported DMA violation names the very page the test attacked: the
/// hypervisor's page (write, then read) and the protected guest page.
fn violations_name_the_attacked_pages(out: &RunOutput) -> Result<(), String> {
    let hv = out.hypervisor();
    let after = |prefix: &str| -> Option<String> {
        let rest = &hv[hv.find(prefix)? + prefix.len()..];
        Some(rest.split_whitespace().next()?.to_string())
    };
    let edu = after("ctvm: test dma: edu at ").ok_or("no edu line")?;
    let secret = after("ctvm: test dma: ok: hypervisor page ").ok_or("no hypervisor page line")?;
    let protected = after("ctvm: test dma: ok: protected page ").ok_or("no protected page line")?;
    let violations: Vec<(&str, &str)> = hv
        .lines()
        .filter(|l| l.starts_with("ctvm: dma-violation "))
        .filter_map(|l| {
            if !l.starts_with(&format!("ctvm: dma-violation device={edu} ")) {
                return Some(("another device", l));
            }
            let address = l.split(" address=").nth(1)?.split(' ').next()?;
            let access = l.split(" access=").nth(1)?.split(' ').next()?;
            Some((address, access))
        })
        .collect();
    let want = [(secret.as_str(), "write"), (secret.as_str(), "read"), (protected.as_str(), "write")];
    if violations != want {
        return Err(format!("violations {violations:?}, expected {want:?}"));
    }
    Ok(())
}

fn unknown_port_logged_once(out: &RunOutput) -> Result<(), String> {
    let n = out.serial.matches("ctvm: guest alpha: unhandled port 0x2f8").count();
    if n == 1 {
        Ok(())
    } else {
        Err(format!("the unknown port 0x2f8 was logged {n} times, expected once"))
    }
}

/// A value the guest printed as `[guest] key=hex`.
fn printed<'a>(out: &'a RunOutput, guest: &str, key: &str) -> Option<&'a str> {
    let prefix = format!("[{guest}] {key}=");
    out.serial.lines().find_map(|l| l.strip_prefix(prefix.as_str()))
}

fn sha1(data: &[u8]) -> [u8; 20] {
    sha1_smol::Sha1::from(data).digest().bytes()
}

fn extend(old: [u8; 20], digest: [u8; 20]) -> [u8; 20] {
    let mut both = old.to_vec();
    both.extend_from_slice(&digest);
    sha1(&both)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// PCRs 8 and 9 as the guests read them must equal what this harness
/// computes on its own from the files it put on the ISO: the kernel image
/// into PCR 9, the command line (what follows `--`) into PCR 8.
fn pcrs_match_the_images(out: &RunOutput) -> Result<(), String> {
    let name = out.dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let iso = crate::util::work_dir().join("iso").join(format!("{name}-bochs")).join("boot");
    let cfg = std::fs::read_to_string(iso.join("grub/grub.cfg")).map_err(|e| e.to_string())?;
    let mut checked = 0;
    for line in cfg.lines().filter_map(|l| l.trim().strip_prefix("module2 /boot/")) {
        let (file, rest) = line.split_once(' ').ok_or("module2 line")?;
        // Data modules (the vTPM seed) carry no guest= and are not measured.
        let Some(guest) = rest.split_whitespace().find_map(|w| w.strip_prefix("guest=")) else {
            continue;
        };
        if !rest.contains("vtpm=on") {
            continue;
        }
        let cmdline = rest.split_once("--").map_or("", |(_, a)| a.trim());
        let image = std::fs::read(iso.join(file)).map_err(|e| e.to_string())?;
        let pcr9 = hex(&extend([0; 20], sha1(&image)));
        let pcr8 = hex(&extend([0; 20], sha1(cmdline.as_bytes())));
        for (key, want) in [("pcr8", &pcr8), ("pcr9", &pcr9)] {
            let got = printed(out, guest, key).ok_or_else(|| format!("{guest} printed no {key}"))?;
            if got != want {
                return Err(format!("{guest}: {key} is {got}, the harness computes {want}"));
            }
        }
        checked += 1;
    }
    if checked == 0 {
        return Err("no guest with a vTPM on the ISO".into());
    }
    Ok(())
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn pcr20(v: &[u8]) -> Result<[u8; 20], String> {
    v.try_into().map_err(|_| "a PCR is not 20 bytes".to_string())
}

/// Linux's view of its vTPM against the harness's own computation: PCR 8
/// and 9 from the files on the ISO, the firmware event log replaying to
/// them, IMA's list replaying to PCR 10, and TPM random bytes.
fn linux_pcrs_replay(out: &RunOutput) -> Result<(), String> {
    let guest = out.guest("linux");
    let line = |prefix: &str| guest.lines().find_map(|l| l.strip_prefix(prefix)).map(str::trim);
    let pcr = |n: &str| -> Result<[u8; 20], String> {
        pcr20(&unhex(line(&format!("ctvm-init: pcr PCR-{n}:")).ok_or(format!("no PCR-{n}"))?).ok_or("bad hex")?)
    };
    // The files and command line as the ISO holds them.
    let iso = crate::util::work_dir().join("iso").join("linux-tpm-bochs").join("boot");
    let cfg = std::fs::read_to_string(iso.join("grub/grub.cfg")).map_err(|e| e.to_string())?;
    let modules: Vec<(&str, &str)> =
        cfg.lines().filter_map(|l| l.trim().strip_prefix("module2 /boot/")).filter_map(|l| l.split_once(' ')).collect();
    let (kernel_file, kernel_args) =
        modules.iter().find(|(_, a)| a.contains("kind=linux")).ok_or("no kernel module")?;
    let (initrd_file, _) = modules.iter().find(|(_, a)| a.starts_with("initrd=")).ok_or("no initrd module")?;
    let cmdline = kernel_args.split_once("--").map_or("", |(_, a)| a.trim());
    let kernel = std::fs::read(iso.join(kernel_file)).map_err(|e| e.to_string())?;
    let initrd = std::fs::read(iso.join(initrd_file)).map_err(|e| e.to_string())?;
    let want9 = extend(extend([0; 20], sha1(&kernel)), sha1(&initrd));
    let want8 = extend([0; 20], sha1(cmdline.as_bytes()));
    if pcr("08")? != want8 || pcr("09")? != want9 {
        return Err(format!(
            "PCRs 8/9 are {}/{}, the harness computes {}/{}",
            hex(&pcr("08")?),
            hex(&pcr("09")?),
            hex(&want8),
            hex(&want9)
        ));
    }
    // The event log Linux exposes replays to the same values.
    let log = unhex(line("ctvm-init: bios log:").ok_or("no bios log")?).ok_or("bad log hex")?;
    let mut replay = [[0u8; 20]; 24];
    let mut at = 0;
    let word = |o: usize| u32::from_le_bytes([log[o], log[o + 1], log[o + 2], log[o + 3]]);
    while at + 32 <= log.len() {
        let (index, size) = (word(at) as usize, word(at + 28) as usize);
        if index < 24 {
            replay[index] = extend(replay[index], pcr20(&log[at + 8..at + 28])?);
        }
        at += 32 + size;
    }
    if replay[8] != want8 || replay[9] != want9 {
        return Err("binary_bios_measurements does not replay to PCRs 8 and 9".into());
    }
    // IMA: PCR 10 is the fold of the template hashes.
    let mut pcr10 = [0u8; 20];
    let mut entries = 0;
    for l in guest.lines().filter_map(|l| l.strip_prefix("ctvm-init: ima: ")) {
        let hash = l.split_whitespace().nth(1).ok_or("short IMA line")?;
        pcr10 = extend(pcr10, pcr20(&unhex(hash).ok_or("bad IMA hash")?)?);
        entries += 1;
    }
    if pcr("10")? != pcr10 {
        return Err(format!("PCR 10 does not replay from {entries} IMA entries"));
    }
    // The boot aggregate, then each file /init read under the measure-all policy.
    let files =
        line("ctvm-init: read ").and_then(|l| l.split(' ').next()?.parse::<usize>().ok()).ok_or("no read line")?;
    if entries < files + 2 {
        return Err(format!("{entries} IMA entries for {files} modules and busybox read: files were not measured"));
    }
    // Two reads of /dev/hwrng, served by the vTPM.
    let reads: Vec<Vec<u8>> = line("ctvm-init: hwrng ctvm-tpm-rng: ")
        .ok_or("no /dev/hwrng line")?
        .split_whitespace()
        .map(|h| unhex(h).ok_or("bad hwrng hex"))
        .collect::<Result<_, _>>()?;
    let varied = |r: &[u8]| r.len() == 32 && r.iter().any(|&b| b != r[0]);
    if reads.len() != 2 || !reads.iter().all(|r| varied(r)) || reads[0] == reads[1] {
        return Err(format!("/dev/hwrng gave {reads:02x?}"));
    }
    // 32 random bytes from the TPM, through /dev/tpm0.
    let random = unhex(line("ctvm-init: tpm random:").ok_or("no random bytes")?).ok_or("bad random hex")?;
    if random.len() != 46 || random[14..].iter().all(|&b| b == random[14]) {
        return Err(format!("GetRandom through /dev/tpm0 answered {}", hex(&random)));
    }
    Ok(())
}

/// Each of SGDT, SIDT, SLDT and STR at each kernel target faulted in user
/// space, no kernel byte changed, and the hypervisor reported the first of
/// the refused hypercalls (its line may come before the guest's output
/// about them: the guest's serial driver sends in the background).
fn user_attacks_all_faulted(out: &RunOutput) -> Result<(), String> {
    let reported = out.lines().iter().any(|l| matches(l, "ctvm: refused guest=linux kind=hypercall cpl=3"));
    if !reported {
        return Err("the hypervisor did not report the user-space hypercalls".into());
    }
    let guest = out.guest("linux");
    let runs: Vec<&str> = guest.lines().filter(|l| l.contains(" kernel memory ")).collect();
    if runs.len() != 16 {
        return Err(format!("{} of 16 instruction runs reported", runs.len()));
    }
    match runs.iter().find(|l| !l.ends_with(": Segmentation fault, kernel memory unchanged")) {
        Some(l) => Err(format!("not refused as the processor would: {l}")),
        None => Ok(()),
    }
}

fn two_vtpms_differ(out: &RunOutput) -> Result<(), String> {
    for key in ["pcr8", "ek"] {
        let a = printed(out, "alpha", key).ok_or(format!("alpha printed no {key}"))?;
        let b = printed(out, "beta", key).ok_or(format!("beta printed no {key}"))?;
        if a == b {
            return Err(format!("alpha and beta share {key}={a}"));
        }
    }
    let events = |g: &str| {
        out.serial
            .lines()
            .filter(|l| l.starts_with(&format!("[{g}] event ")))
            .map(|l| l[g.len() + 3..].to_string())
            .collect::<Vec<_>>()
    };
    if events("alpha") == events("beta") || events("alpha").is_empty() {
        return Err("the two event logs are the same".into());
    }
    Ok(())
}

/// The number that follows the first `marker` in `s`.
pub fn number_after(s: &str, marker: &str) -> Option<u64> {
    let rest = &s[s.find(marker)? + marker.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn benign_modules_work(out: &RunOutput) -> Result<(), String> {
    let s = &out.guest("linux");
    let number_after = |marker: &str| number_after(s, marker);
    // ping sends 20 packets through the dummy device, and 10 across the veth
    // pair to its far end in another namespace, whose replies cross it back.
    let tx = number_after("ctvm-init: dummy: <BROADCAST,NOARP,UP,LOWER_UP>, tx packets ").ok_or("no dummy line")?;
    if tx < 20 {
        return Err(format!("dummy sent {tx} packets, expected at least 20"));
    }
    let sent = number_after("ctvm-init: veth: tx packets ").ok_or("no veth tx count")?;
    let received = number_after("peer rx packets ").ok_or("no veth peer rx count")?;
    let replies = number_after(", replies ").ok_or("no veth reply count")?;
    if sent < 10 || received < 10 || replies < 10 {
        return Err(format!(
            "veth carried too little: {sent} sent, {received} received by the peer, {replies} replies; expected 10 each"
        ));
    }
    // The static key and the kprobe patch kernel text through text_poke.
    let pokes = out
        .hypervisor()
        .lines()
        .find_map(|l| l.split_once(" pages granted, ")?.1.split(' ').next()?.parse::<u64>().ok())
        .ok_or("no integrity summary")?;
    if pokes == 0 {
        return Err("no text_poke write was let through: the kernel's own patching did not run".into());
    }
    for need in [
        "ctvm-init: calls: calls: 2000 rounds of snprintf/kstrtoint/strlen, 0 wrong",
        "ctvm-init: refs: refs: task ok, cred ok, pid ok, mm ok",
        "ctvm-init: static key sched_schedstats flipped: 0",
    ] {
        if !s.contains(need) {
            return Err(format!("missing {need:?}"));
        }
    }
    let hits = s
        .lines()
        .find_map(|l| l.strip_prefix("ctvm-init: kprobe hits: "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .ok_or("no kprobe hit count")?;
    if hits == 0 {
        return Err("the kernel's kprobe never fired".into());
    }
    Ok(())
}

fn interleaved_ticks(out: &RunOutput) -> Result<(), String> {
    let order: Vec<&str> = out
        .serial
        .lines()
        .filter(|l| l.contains("] tick "))
        .map(|l| if l.starts_with("[alpha]") { "alpha" } else { "beta" })
        .collect();
    if order.len() != 8 {
        return Err(format!("expected 8 tick lines, saw {}", order.len()));
    }
    let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
    if switches < 2 {
        return Err(format!("the guests did not interleave: {order:?}"));
    }
    Ok(())
}

fn entry_failure_named(out: &RunOutput) -> Result<(), String> {
    let s = &out.serial;
    let line = s
        .lines()
        .find(|l| l.starts_with("ctvm: guest beta stopped: VM entry failed (reason 33"))
        .ok_or("no entry-failure report for beta")?;
    if !line.contains("GUEST_CR4") {
        return Err(format!("the report does not name GUEST_CR4: {line}"));
    }
    if !s.contains("ctvm: guest alpha stopped: shutdown hypercall, exit code 3") {
        return Err("alpha did not run to completion beside the broken guest".into());
    }
    Ok(())
}

fn containment_reports(out: &RunOutput) -> Result<(), String> {
    let s = &out.serial;
    let need = [
        "ctvm: guest beta stopped: triple fault",
        "ctvm: guest gamma stopped: EPT violation: write to guest-physical 0x40000000 (not guest memory) at rip",
        "ctvm: guest alpha stopped: shutdown hypercall, exit code 0",
        "[alpha] all checks passed",
    ];
    for n in need {
        if !s.contains(n) {
            return Err(format!("missing {n:?}"));
        }
    }
    Ok(())
}

pub fn find(name: &str) -> Result<Scenario, Fail> {
    all().into_iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<_> = all().iter().map(|s| s.name).collect();
        Fail(format!("no scenario {name:?}; scenarios: {}", names.join(", ")))
    })
}

/// Whether a console line matches a pattern. A pattern that starts with
/// `ctvm:` is a hypervisor verdict: it matches only the hypervisor's own
/// lines, from their start, with `*` standing for any text; no guest line
/// can match it. Any other pattern matches a line that contains it.
pub fn matches(line: &emulator::Line, pattern: &str) -> bool {
    if !pattern.starts_with("ctvm:") {
        return line.shown().contains(pattern);
    }
    if line.source != emulator::Source::Hypervisor {
        return false;
    }
    let mut pieces = pattern.split('*');
    let Some(rest) = pieces.next().and_then(|first| line.text.strip_prefix(first)) else {
        return false;
    };
    let mut rest = rest;
    for piece in pieces {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// Checks a run's output against the scenario.
pub fn verdict(s: &Scenario, out: &RunOutput) -> Result<(), String> {
    if out.timed_out {
        return Err(format!("timed out after {} s", s.time_limit().as_secs()));
    }
    let lines = out.lines();
    let mut at = 0;
    for e in &s.expect {
        match lines[at..].iter().position(|l| matches(l, e)) {
            Some(i) => at += i + 1,
            None if lines.iter().any(|l| matches(l, e)) => return Err(format!("{e:?} appeared out of order")),
            None => return Err(format!("missing {e:?}")),
        }
    }
    for r in s.reject.iter().chain(ALWAYS_REJECT) {
        if lines.iter().any(|l| matches(l, r)) {
            return Err(format!("unexpected {r:?}"));
        }
    }
    let hypervisor = |p: &str| lines.iter().any(|l| matches(l, p));
    let end = if s.target.emulator == Emulator::QemuTcg { NO_VMX_END } else { CLEAN_END };
    if s.ends_cleanly && (hypervisor("ctvm: FATAL") || !hypervisor(end)) {
        return Err("the hypervisor did not power off cleanly".into());
    }
    match s.target.emulator {
        Emulator::Bochs if !out.emulator_log.contains("shutdown requested") => {
            return Err("Bochs did not see the power-off on its shutdown port".into());
        }
        Emulator::QemuTcg if s.ends_cleanly && out.exit_code != Some(QEMU_EXIT_NO_VMX) => {
            return Err(format!("QEMU exited with {:?}, not through CTVM's isa-debug-exit", out.exit_code));
        }
        _ => {}
    }
    for check in &s.checks {
        check(out)?;
    }
    Ok(())
}

/// Total VM exits the hypervisor reported, from its exit table.
fn total_exits(serial: &str) -> Option<u64> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("ctvm:   total"))
        .filter_map(|rest| rest.split_whitespace().last()?.parse::<u64>().ok())
        .reduce(|a, b| a + b)
}

/// One line of the summary table: name, passed, wall time, VM exits.
type Row = (String, bool, Duration, Option<u64>);

/// What one worker runs: a scenario, or the durable series (whose boots
/// follow each other on one disk).
enum Job<'a> {
    One(&'a Scenario, PathBuf),
    Series(&'a crate::durable::Series),
}

impl Job<'_> {
    /// A guess at its length, to start the long ones first.
    fn weight(&self) -> Duration {
        match self {
            Job::One(s, _) => s.timeout,
            Job::Series(_) => Duration::MAX,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Job::One(s, _) => s.name,
            Job::Series(_) => crate::durable::NAME,
        }
    }

    /// Its rows; one failed row if it could not run at all.
    fn run(&self) -> Vec<Row> {
        self.try_run().unwrap_or_else(|Fail(why)| {
            println!("xtask: scenario {} could not run: {why}", self.name());
            vec![(self.name().to_string(), false, Duration::ZERO, None)]
        })
    }

    fn try_run(&self) -> Result<Vec<Row>, Fail> {
        match self {
            Job::One(s, iso) => {
                println!("xtask: scenario {}: {}", s.name, s.about);
                let out = emulator::boot_with(
                    s.target.emulator,
                    iso,
                    s.name,
                    (s.megs, s.cpus),
                    s.time_limit(),
                    None,
                    s.target.devices,
                )?;
                let v = verdict(s, &out);
                match &v {
                    Ok(()) => println!("xtask: scenario {} passed in {:.1} s", s.name, out.elapsed.as_secs_f64()),
                    Err(why) => report_failure(&format!("scenario {}", s.name), why, &out),
                }
                Ok(vec![(s.name.to_string(), v.is_ok(), out.elapsed, total_exits(&out.serial))])
            }
            Job::Series(series) => {
                println!("xtask: scenario {}: {}", crate::durable::NAME, crate::durable::ABOUT);
                let boots = crate::durable::run_series(series)?;
                Ok(boots
                    .into_iter()
                    .map(|b| (b.label, b.passed, b.output.elapsed, total_exits(&b.output.serial)))
                    .collect())
            }
        }
    }
}

/// A failed run's reason, its last console lines and where its logs are,
/// printed as one block (runs go on beside it).
pub fn report_failure(what: &str, why: &str, out: &RunOutput) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "xtask: {what} FAILED: {why}");
    let _ = writeln!(o, "xtask: last console lines:");
    let lines: Vec<&str> = out.serial.lines().collect();
    for l in &lines[lines.len().saturating_sub(25)..] {
        let _ = writeln!(o, "    {l}");
    }
    let _ = writeln!(o, "xtask: logs kept in {}", out.dir.display());
}

/// How many emulators run at once: `CTVM_JOBS`, or one per host core and
/// per 2 GiB of available memory (a Linux scenario's machine has 1 GiB).
/// Each emulator keeps one core busy, and a guest's clock follows its
/// instructions, not the host's, so runs side by side see what a run alone
/// sees; only the wall time changes.
fn jobs() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let kib = m.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().strip_suffix("kB")?;
        kib.trim().parse::<usize>().ok().map(|kib| (kib >> 21).max(1))
    });
    let fits = cores.min(memory.unwrap_or(cores));
    std::env::var("CTVM_JOBS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0).unwrap_or(fits)
}

pub fn run_all(names: &[String]) -> Result<(), Fail> {
    // The multi-boot durable-vTPM scenario runs with the others.
    let series = names.is_empty() || names.iter().any(|n| n == crate::durable::NAME);
    let selected: Vec<Scenario> = if names.is_empty() {
        all().into_iter().filter(|s| !s.interactive).collect()
    } else {
        names.iter().filter(|n| *n != crate::durable::NAME).map(|n| find(n)).collect::<Result<_, _>>()?
    };
    // Everything is built first, one build at a time; then only emulators run.
    let mut work = Vec::new();
    for s in &selected {
        work.push(Job::One(s, image::iso_for_emulator(s, s.target.emulator)?));
    }
    let prepared = if series { Some(crate::durable::prepare()?) } else { None };
    work.extend(prepared.as_ref().map(Job::Series));
    let mut order: Vec<usize> = (0..work.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(work[i].weight()));

    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Vec<Row>>> = Mutex::new((0..work.len()).map(|_| Vec::new()).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs().min(work.len()) {
            scope.spawn(|| {
                while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let rows = work[i].run();
                    done.lock().unwrap_or_else(|e| e.into_inner())[i] = rows;
                }
            });
        }
    });
    let results: Vec<Row> = done.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().flatten().collect();

    println!("\n{:<22} {:<7} {:>9} {:>10}", "scenario", "result", "wall (s)", "VM exits");
    for (name, ok, t, exits) in &results {
        let exits = exits.map_or("-".to_string(), |e| e.to_string());
        println!("{name:<22} {:<7} {:>9.1} {exits:>10}", if *ok { "pass" } else { "FAIL" }, t.as_secs_f64());
    }
    let failed = results.iter().filter(|r| !r.1).count();
    if failed > 0 {
        return Err(Fail(format!("{failed} of {} scenarios failed", results.len())));
    }
    Ok(())
}

/// CTVM's measured launch into a platform TPM (swtpm behind QEMU's TIS or
/// CRB): its log replays to the PCRs libtpms holds, every digest is the
/// hash of what the ISO holds.
fn qemu_tpm(name: &'static str, tpm: TpmDevice) -> Scenario {
    let expect = match tpm {
        TpmDevice::Tpm12Tis => "ctvm: platform TPM 1.2 via TIS: started by firmware; banks sha1; 10 events measured into PCRs 12 and 13",
        TpmDevice::Tpm2Tis => "ctvm: platform TPM 2.0 via TIS: started by firmware; banks sha1 sha256 * events measured into PCRs 12 and 13",
        TpmDevice::Tpm2Crb => "ctvm: platform TPM 2.0 via CRB: started by firmware; banks sha1 sha256 * events measured into PCRs 12 and 13",
    };
    // The test image's vtpm-seal hook drives the vTPM's roots over the chip
    // (no VT-x here to run a durable guest); the 1.2 comes owned with the
    // zero secrets (`tpm12_owner`), as `tpm_takeownership -z` leaves one.
    Scenario {
        name,
        about: match tpm {
            TpmDevice::Tpm12Tis => "the platform TPM 1.2 via TIS (swtpm): CTVM's measurements land in PCRs 12 and 13; the harness replays its SHA-1 log",
            TpmDevice::Tpm2Tis => "the platform TPM 2.0 via TIS (swtpm): CTVM's measurements land in PCRs 12 and 13; the harness replays its crypto-agile log",
            TpmDevice::Tpm2Crb => "the platform TPM 2.0 via CRB (swtpm): CTVM's measurements land in PCRs 12 and 13; the harness replays its crypto-agile log",
        },
        hypervisor_args: "log=debug test.vtpm-seal",
        guests: vec![
            GuestSpec {
                name: "seed",
                kind: GuestImage::VtpmSeed,
                mem_mib: 0,
                vtpm: false,
                args: "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e",
                options: "",
            },
            guest_with_vtpm("alpha", "test=vtpm exit=5"),
            guest("beta", "test=basics"),
        ],
        target: Target { image: Image::Test, devices: Devices { iommu: false, edu: false, tpm: Some(tpm) }, ..QEMU },
        megs: 512,
        cpus: 1,
        timeout: Duration::from_secs(60),
        expect: vec![
            expect,
            "ctvm: platform TPM: the measured launch took",
            "ctvm: test vtpm-seal: ok: a state key sealed to PCRs [12] (",
            "ctvm: test vtpm-seal: ok: the platform counter * -> * (a version table's fence), and no commit of a table not handed out",
            NO_VMX_END,
        ],
        reject: vec!["ctvm: warning: platform TPM", "ctvm: warning: no platform TPM", "test vtpm-seal: FAIL"],
        checks: vec![crate::platform_checks::platform_tpm_replays, crate::platform_checks::platform_tpm12_seals_wrapped],
        ends_cleanly: true,
        interactive: false,
    }
}

/// The integrity scenario on one kernel and `cpus` CPUs, all the guest's
/// (its `atk_syscall` runs on the first, its `atk_wp` on the last).
fn linux_integrity(name: &'static str, about: &'static str, kernel: linux::Kernel, cpus: u32) -> Scenario {
    let mut scenario = linux_integrity_lines(name, about, kernel, cpus);
    // Changing a call's format after its check needs a second CPU.
    let toctou: &[&'static str] = if cpus == 1 {
        &["ctvm-init: attack atk_toctou: one CPU: no race to run"]
    } else {
        &[
            "ctvm: violation guest=linux module=atk_toctou kind=deputy-input",
            "ctvm-init: attack atk_toctou: sscanf format changed after its check blocked",
        ]
    };
    let at = scenario.expect.iter().position(|l| *l == "ctvm-init: after atk_toctou: getpid ok");
    let at = at.expect("atk_toctou's place among the lines");
    scenario.expect.splice(at..at, toctou.iter().copied());
    scenario
}

fn linux_integrity_lines(name: &'static str, about: &'static str, kernel: linux::Kernel, cpus: u32) -> Scenario {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let last = cpus - 1;
    Scenario {
        name,
        about,
        hypervisor_args: "",
        guests: vec![GuestSpec { kind: GuestImage::Linux(kernel), ..linux_guest(linux_args!("ctvm.integrity")) }],
        target: BOCHS,
        megs: 1024,
        cpus,
        // (Bochs emulates every CPU on one host thread.)
        timeout: Duration::from_secs(if cpus == 1 { 600 } else { 900 }),
        expect: vec![
            leak(format!("ctvm: guest linux: loaded, on CPU {}", if cpus == 1 { "0 (1 vCPU)".into() } else { format!("0-{last} ({cpus} vCPUs)") })),
            leak(format!("ctvm-init: cpus: {cpus}")),
            // The per-CPU area less its interrupt and exception stacks'
            // stores; the stacks themselves (interrupt, double fault, NMI,
            // debug, machine check) at their own addresses.
            leak(format!(
                "ctvm: guest linux: kernel data kept from modules: * with the per-CPU areas of {cpus} CPUs less 2 stacks each ({} interrupt and exception stacks, known at their own addresses);",
                5 * cpus
            )),
            "ctvm: guest linux: module ctvm_agent registered as trusted",
            "ctvm: guest linux: kernel layout locked, agent pinned; protections on (* kernel page tables, * of processes)",
            "ctvm-init: agent loaded",
            // .bss's unused decrypted part, freed at boot, is heap: a task's
            // stack there is no kernel data (a module run on it must work).
            // (The agent says so only when it left some out.)
            "pages of the kernel's .data and .bss given back after boot: heap, not image",
            "ctvm: violation guest=linux module=ifb kind=code-digest",
            "ctvm: violation guest=linux module=ifb kind=write-syscall-table",
            "ctvm-init: twin ifb: syscall table write blocked",
            "ctvm-init: after twin ifb: getpid ok",
            "ctvm: violation guest=linux module=ifb kind=code-digest",
            "ctvm: guest linux: module ifb registered as untrusted, isolated",
            "ctvm-init: lookalike ifb: loaded",
            "ctvm-init: lookalike ifb removed: 0 left",
            "ctvm: guest linux: module ifb registered as trusted",
            "ctvm-init: ifb up: yes",
            "ctvm: violation guest=linux module=kernel kind=registration-refused",
            "ctvm-init: atk_huge refused: module atk_huge not loaded: CTVM could not isolate it",
            "ctvm: violation guest=linux module=atk_msrio kind=module-msr",
            "ctvm: violation guest=linux module=atk_msrio kind=module-port-io",
            "ctvm: violation guest=linux module=atk_msrio kind=hypercall",
            "ctvm-init: attack atk_msrio: LSTAR kept, GS_BASE kept, EFER.NXE kept; machine up after the reset write, 0xcf8 read 0xffffffff; vmcall returned -4",
            "ctvm-init: after atk_msrio: getpid ok",
            "ctvm: violation guest=linux module=atk_syscall kind=write-syscall-table * cpu=0",
            "ctvm-init: attack atk_syscall: syscall table write blocked",
            "ctvm-init: after atk_syscall: getpid ok",
            "ctvm: violation guest=linux module=atk_idt kind=write-idt",
            "ctvm-init: attack atk_idt: IDT write blocked",
            "ctvm: violation guest=linux module=atk_text kind=write-kernel-text",
            "ctvm-init: attack atk_text: kernel text write blocked",
            // (CR0.WP's guard reaches a CPU that did not lock.)
            leak(format!("ctvm: violation guest=linux module=atk_wp kind=control-register * cpu={last}")),
            "ctvm-init: attack atk_wp: CR0.WP stayed set; rodata write blocked",
            "ctvm: violation guest=linux module=atk_call kind=call-non-entry",
            "ctvm-init: attack atk_call: non-exported call returned 0; mid-function call returned 0",
            "ctvm: violation guest=linux module=atk_dkom kind=write-protected-data",
            "ctvm-init: attack atk_dkom: module list unlink blocked",
            "ctvm: violation guest=linux module=atk_hide kind=write-protected-data",
            "ctvm-init: attack atk_hide: module list unlink blocked: neighbours kept, own entry kept",
            "ctvm-init: atk_hide: 1 in /proc/modules",
            "ctvm-init: atk_hide removed: 0 left",
            "ctvm: violation guest=linux module=atk_ftrace kind=call-denied-api",
            "ctvm-init: attack atk_ftrace: ftrace hook blocked",
            "ctvm: violation guest=linux module=atk_setmem kind=call-non-entry",
            "ctvm-init: attack atk_setmem: set_memory_rw returned 0; rodata write blocked",
            "ctvm: violation guest=linux module=atk_agent kind=write-protected-data",
            "ctvm-init: attack atk_agent: agent data write blocked",
            "ctvm: violation guest=linux module=atk_agentcall kind=call-non-entry",
            "ctvm-init: attack atk_agentcall: agent call blocked",
            "ctvm: violation guest=linux module=atk_umh kind=call-denied-api * api=call_usermodehelper_setup group=usermode-helper",
            "ctvm: violation guest=linux module=atk_umh kind=call-denied-api * api=call_usermodehelper_exec group=usermode-helper",
            "ctvm-init: attack atk_umh: usermode helper exec returned -1: blocked",
            "ctvm-init: after atk_umh: getpid ok",
            "ctvm-init: atk_umh: no user program ran",
            "ctvm: violation guest=linux module=atk_skey kind=call-denied-api * api=static_key_enable group=text-patching",
            "ctvm-init: attack atk_skey: static_key_enable on a kernel key: count 0 -> 0, blocked",
            "ctvm: violation guest=linux module=atk_ftdirect kind=call-denied-api * group=tracing-hooks",
            "ctvm-init: attack atk_ftdirect: ftrace direct hook blocked",
            "ctvm: violation guest=linux module=atk_tp kind=call-denied-api * api=tracepoint_probe_register group=tracing-hooks",
            "ctvm-init: attack atk_tp: tracepoint probe blocked",
            "ctvm: violation guest=linux module=atk_file kind=call-denied-api * api=filp_open group=kernel-file-access",
            "ctvm: violation guest=linux module=atk_file kind=call-denied-api * api=kernel_write group=kernel-file-access",
            "ctvm-init: attack atk_file: filp_open blocked (-1); kernel_write blocked (-1)",
            "ctvm-init: atk_file: no file created",
            "ctvm: violation guest=linux module=atk_bpf kind=call-denied-api * api=bpf_prog_create group=bpf-loading",
            "ctvm-init: attack atk_bpf: bpf_prog_create blocked (-1)",
            "ctvm-init: after atk_bpf: getpid ok",
            "ctvm: violation guest=linux module=atk_kdata kind=write-protected-data",
            "ctvm-init: attack atk_kdata: modprobe_path write blocked, core_pattern write blocked",
            "ctvm-init: modprobe path now: /sbin/modprobe, core pattern: core",
            "ctvm: violation guest=linux module=atk_probes kind=write-protected-data * object=probe-list",
            "ctvm: violation guest=linux module=atk_probes kind=deputy-write",
            "ctvm-init: attack atk_probes: 1 probes; probe data write blocked; probe priority write blocked; ending entry write blocked; memcpy onto the list blocked",
            "ctvm-init: after atk_probes: getpid ok",
            "ctvm: violation guest=linux module=atk_percpu kind=write-protected-data",
            "ctvm-init: attack atk_percpu: syscall entry stack pointer write blocked, double-fault stack pointer write blocked",
            "ctvm-init: after atk_percpu: getpid ok",
            "ctvm: violation guest=linux module=atk_cred kind=write-kernel-object * object=cred",
            "ctvm: violation guest=linux module=atk_cred kind=write-kernel-object * object=task",
            "ctvm: violation guest=linux module=atk_cred kind=write-kernel-object * object=kmem-cache",
            "ctvm-init: attack atk_cred: cred uid write blocked, task write blocked, kmem_cache write blocked",
            "ctvm-init: after atk_cred: getpid ok",
            "ctvm: violation guest=linux module=atk_tasks kind=write-*",
            "ctvm-init: attack atk_tasks: task list unlink blocked",
            "ctvm-init: after atk_tasks: getpid ok",
            "ctvm: violation guest=linux module=atk_procfs kind=write-kernel-object * object=proc-entry",
            "ctvm: violation guest=linux module=atk_procfs kind=write-kernel-object * object=proc-inode",
            "ctvm-init: attack atk_procfs: /proc/modules entry seq_ops swap blocked, proc inode i_fop swap blocked",
            "ctvm-init: after atk_procfs: getpid ok",
            "ctvm: violation guest=linux module=atk_sysfs kind=write-kernel-object * object=kernfs-node",
            "ctvm-init: attack atk_sysfs: /sys/module entry renamed blocked, hidden blocked",
            "ctvm-init: after atk_sysfs: getpid ok",
            "ctvm: violation guest=linux module=atk_mount kind=write-kernel-object * object=mount",
            "ctvm-init: attack atk_mount: root mount's flags write blocked",
            "ctvm-init: after atk_mount: getpid ok",
            "ctvm: violation guest=linux module=atk_ns kind=write-kernel-object * object=user-ns",
            "ctvm: violation guest=linux module=atk_ns kind=write-kernel-object * object=nsproxy",
            "ctvm-init: attack atk_ns: user namespace uid 0 mapped to the host's blocked, nsproxy moved to the host's network blocked",
            "ctvm-init: after atk_ns: getpid ok",
            "ctvm: violation guest=linux module=atk_free kind=deputy-write",
            "ctvm-init: attack atk_free: kfree of a credential blocked",
            "ctvm-init: after atk_free: getpid ok",
            // (atk_toctou's lines, by the number of CPUs: see below.)
            "ctvm-init: after atk_toctou: getpid ok",
            "ctvm: violation guest=linux module=atk_deputy kind=deputy-write",
            "ctvm-init: attack atk_deputy: memcpy onto the module list blocked, memset on modprobe_path blocked, snprintf on modprobe_path blocked, kstrtouint into modprobe_path blocked, bin2hex on modprobe_path blocked, __bitmap_set on modprobe_path blocked, sscanf into modprobe_path blocked, seq_printf on modprobe_path blocked, kobject_del of its own kobject blocked",
            "ctvm-init: after atk_deputy: getpid ok",
            "ctvm-init: after atk_deputy: modprobe path /sbin/modprobe",
            "ctvm: violation guest=linux module=atk_lookup kind=call-denied-api * api=__symbol_get group=module-loading",
            "ctvm: violation guest=linux module=atk_lookup kind=call-non-entry *",
            "ctvm-init: attack atk_lookup: symbol lookup refused: NULL, kallsyms_lookup_name refused: 0",
            "ctvm-init: after atk_lookup: getpid ok",
            "ctvm: violation guest=linux module=atk_trap kind=call-non-entry *",
            "ctvm-init: attack atk_trap: call under the trap flag blocked (0)",
            "ctvm-init: after atk_trap: getpid ok",
            "ctvm: violation guest=linux module=atk_stack kind=write-kernel-stack",
            "ctvm: violation guest=linux module=atk_stack kind=write-kernel-stack",
            "ctvm: violation guest=linux module=atk_stack kind=write-kernel-stack",
            "ctvm: violation guest=linux module=atk_stack kind=write-kernel-stack",
            "ctvm-init: attack atk_stack: caller's return address write blocked (direct map blocked), sleeping parent's stack write blocked (direct map blocked)",
            "ctvm-init: after atk_stack: getpid ok",
            "ctvm: violation guest=linux module=atk_young kind=write-kernel-stack",
            "ctvm-init: attack atk_young: new tasks' resume address writes through the direct map blocked",
            "ctvm-init: after atk_young: getpid ok",
            "ctvm: violation guest=linux module=atk_irqstack kind=write-kernel-stack",
            "ctvm-init: attack atk_irqstack: interrupt stack write blocked, through the direct map blocked; NMI stack write blocked, through the direct map blocked",
            "ctvm-init: after atk_irqstack: getpid ok",
            "ctvm: violation guest=linux module=atk_pgtable kind=write-page-table",
            "ctvm: violation guest=linux module=atk_pgtable kind=control-register",
            "ctvm: violation guest=linux module=atk_pgtable kind=write-page-table * object=page-table",
            "ctvm-init: attack atk_pgtable: kernel text mapping write blocked; process top-level table write blocked; user PTE write blocked; CR3 load blocked; new PTE write blocked; new PUD write blocked; new kernel table write blocked",
            "ctvm-init: after atk_pgtable: getpid ok",
            "ctvm: violation guest=linux module=atk_newpgd kind=write-page-table",
            "ctvm-init: attack atk_newpgd: new process's top-level table write blocked",
            "ctvm: violation guest=linux module=atk_iret kind=call-non-entry",
            "ctvm-init: attack atk_iret: forged interrupt frame: the attacking thread was stopped",
            "ctvm-init: after atk_iret: getpid ok",
            "ctvm: violation guest=linux module=atk_extable kind=call-non-entry",
            "ctvm-init: attack atk_extable: jump to an instruction with an exception-table fixup: the kernel's view ran nothing for it",
            "ctvm-init: after atk_extable: getpid ok",
            "ctvm: violation guest=linux module=atk_wx kind=call-non-entry",
            "ctvm-init: attack atk_wx: set_memory_x returned 0; shellcode in a kmalloc'd page, called by the kernel: did not run",
            "ctvm-init: after atk_wx: getpid ok",
            "ctvm: violation guest=linux module=atk_quar kind=write-syscall-table",
            "ctvm: guest linux: module atk_quar quarantined: the kernel may enter it only to unload it",
            "ctvm-init: attack atk_quar: syscall table write blocked",
            "ctvm-init: after atk_quar: getpid ok",
            "ctvm: violation guest=linux module=kernel kind=enter-quarantined",
            "ctvm-init: atk_quar: callback refused",
            "ctvm-init: atk_quar removed: 0 left, 0 proc file, exit ran",
            "ctvm: violation guest=linux module=atk_burst kind=write-syscall-table",
            "ctvm: violation guest=linux module=atk_burst kind=write-syscall-table * repeated=1000",
            "ctvm-init: attack atk_burst: burst of 1500 syscall table writes: all blocked",
            "ctvm-init: burst: every refused write recorded",
            "ctvm-init: agent unload refused",
            "ctvm-init: kernel still works",
            "ctvm-init: violations recorded: # records=",
            "ctvm-init: violation records lost: 0",
            "ctvm: guest linux stopped: ACPI sleep requested",
            CLEAN_END,
        ],
        reject: vec![
            "WENT THROUGH",
            "has waited long",
            "getpid WRONG",
            "ctvm-init: FAIL",
            "ctvm: violation * action=allow",
            "POISONED",
            "CHANGED",
            "callback RAN",
            "ctvm: violation guest=linux module=refs ",
            // atk_extable's jump, fixed up by the kernel in its own view.
            "General protection fault in user access",
        ]
        .into_iter()
        .chain(KERNEL_DATA_CORRUPTED)
        .collect(),
        checks: vec![benign_modules_work],
        ends_cleanly: true,
        interactive: false,
    }
}
