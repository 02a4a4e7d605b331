//! A guest's configuration, from its multiboot2 module's command line:
//! `guest=NAME [mem=SIZE] [kind=test] -- ARGS FOR THE GUEST`.

use alloc::string::{String, ToString};
use core::fmt;

use crate::smp::CpuSet;

pub const NAME_MAX: usize = 31;
pub const MEM_MIN: u64 = 4 << 20;
pub const MEM_MAX: u64 = 64 << 30;
pub const MEM_DEFAULT: u64 = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKind {
    /// A CTVM-native 64-bit ELF kernel (the test guests).
    Native,
    /// A Linux bzImage on the pass-through platform; its initrd is the module
    /// marked `initrd=NAME`, and `mem=` does not apply (it gets the machine's RAM).
    Linux,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestConfig {
    pub name: String,
    /// Bytes of RAM, a multiple of 2 MiB.
    pub mem_bytes: u64,
    pub kind: GuestKind,
    /// Everything after `--`, handed to the guest.
    pub args: String,
    /// Run-time integrity for a Linux guest's modules (`integrity=enforce|audit|off`).
    pub integrity: Option<crate::integrity::Mode>,
    /// Modules the policy trusts (`trust=name,name`): they run in the kernel view.
    pub trusted: alloc::vec::Vec<String>,
    /// A virtual TPM at 0xFED40000 (`vtpm=on|off|volatile|durable`; on for
    /// Linux guests).
    pub vtpm: bool,
    /// The CPUs it runs on (`cpus=0-3`), by the hypervisor's CPU index;
    /// `None`: its default (see [`GuestConfig::resolve_cpus`]).
    pub cpus: Option<CpuSet>,
    /// Its state kept by the guest's store service (`vtpm=durable`), in the
    /// blob module `vtpm.state=NAME`; otherwise volatile (`vtpm=on`, the
    /// same as `vtpm=volatile`).
    pub vtpm_durable: bool,
    /// `vtpm.reset`: a durable vTPM without an acceptable blob starts new
    /// (its first boot) instead of staying in failure mode.
    pub vtpm_reset: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    NoName,
    BadName(String),
    BadMemory(String),
    UnknownKind(String),
    UnknownOption(String),
    BadCpus(String),
    /// A native guest has one vCPU.
    NativeOneCpu,
    /// Options that do not go together.
    Conflict(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::NoName => write!(f, "no guest=NAME"),
            ConfigError::BadName(n) => {
                write!(f, "guest name {n:?} must be 1-{NAME_MAX} characters of a-z, 0-9, '-' and '_'")
            }
            ConfigError::BadMemory(m) => write!(
                f,
                "mem={m:?} must be a size such as 16M or 1G between {} MiB and {} GiB",
                MEM_MIN >> 20,
                MEM_MAX >> 30
            ),
            ConfigError::UnknownKind(k) => write!(f, "unknown guest kind {k:?}"),
            ConfigError::UnknownOption(o) => write!(f, "unknown option {o:?}"),
            ConfigError::BadCpus(c) => write!(f, "cpus={c:?} must list CPU indices and ranges, such as 0-3 or 1,3"),
            ConfigError::NativeOneCpu => write!(f, "a test guest has one vCPU: cpus= must name one CPU"),
            ConfigError::Conflict(why) => f.write_str(why),
        }
    }
}

/// The guest an initrd module belongs to (`initrd=NAME`). A guest's own
/// module is never an initrd, and what follows `--` (the guest's arguments,
/// where Linux has an `initrd=` of its own) does not count.
pub fn initrd_owner(cmdline: &str) -> Option<&str> {
    if is_guest_module(cmdline) {
        return None;
    }
    split_args(cmdline).0.split_ascii_whitespace().find_map(|w| w.strip_prefix("initrd="))
}

/// Whether a module is a guest that owns the machine's devices (a Linux
/// guest). Works without the heap: it runs before the hypervisor's memory is
/// set up. It must agree with [`parse`]: the last `kind=` before `--` counts.
pub fn is_pass_through_module(cmdline: &str) -> bool {
    let options = split_args(cmdline).0.split_ascii_whitespace();
    is_guest_module(cmdline) && options.filter_map(|w| w.strip_prefix("kind=")).next_back() == Some("linux")
}

/// The command line of the module holding the vTPM seed.
pub const SEED_MODULE: &str = "vtpm.seed";
/// The command line of the module holding the trusted-module policy.
pub const POLICY_MODULE: &str = "ctvm.policy";
/// The command line of the module holding the kernel-API policy.
pub const API_MODULE: &str = "ctvm.api";

/// The command-line word of a guest's vTPM state blob module.
pub const STATE_MODULE: &str = "vtpm.state";

/// The guest whose sealed vTPM state a module holds (`vtpm.state=NAME`,
/// the whole command line).
pub fn state_owner(cmdline: &str) -> Option<&str> {
    cmdline.trim().strip_prefix(STATE_MODULE)?.strip_prefix('=').filter(|n| !n.is_empty() && !n.contains(' '))
}

/// Whether a module is data for the hypervisor itself: the vTPM seed, the
/// trusted-module policy, the kernel-API policy or a vTPM state blob.
pub fn is_data_module(cmdline: &str) -> bool {
    matches!(cmdline.trim(), SEED_MODULE | POLICY_MODULE | API_MODULE) || state_owner(cmdline).is_some()
}

/// Whether a module's command line describes a guest at all.
pub fn is_guest_module(cmdline: &str) -> bool {
    split_args(cmdline).0.split_ascii_whitespace().any(|w| w.starts_with("guest="))
}

/// The options, and the guest's arguments after the first word `--`.
pub fn split_args(cmdline: &str) -> (&str, &str) {
    let mut at = 0;
    while let Some(start) = cmdline[at..].find(|c: char| !c.is_ascii_whitespace()).map(|i| at + i) {
        let end = cmdline[start..].find(|c: char| c.is_ascii_whitespace()).map_or(cmdline.len(), |i| start + i);
        if &cmdline[start..end] == "--" {
            return (&cmdline[..start], &cmdline[end..]);
        }
        at = end;
    }
    (cmdline, "")
}

pub fn parse(cmdline: &str) -> Result<GuestConfig, ConfigError> {
    let (options, args) = split_args(cmdline);
    let args = args.trim();
    let mut name = None;
    let mut mem_bytes = MEM_DEFAULT;
    let mut kind = GuestKind::Native;
    let mut integrity = None;
    let mut integrity_set = false;
    let mut trusted = alloc::vec::Vec::new();
    let mut vtpm = None;
    let mut cpus = None;
    let mut vtpm_durable = false;
    let mut vtpm_reset = false;
    for word in options.split_ascii_whitespace() {
        if word == "vtpm.reset" {
            vtpm_reset = true;
            continue;
        }
        match word.split_once('=') {
            Some(("guest", n)) => {
                let valid = !n.is_empty()
                    && n.len() <= NAME_MAX
                    && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
                if !valid {
                    return Err(ConfigError::BadName(n.to_string()));
                }
                name = Some(n.to_string());
            }
            Some(("mem", m)) => {
                mem_bytes = parse_size(m)
                    .filter(|&b| (MEM_MIN..=MEM_MAX).contains(&b))
                    .ok_or_else(|| ConfigError::BadMemory(m.to_string()))?;
                mem_bytes = mem_bytes.next_multiple_of(2 << 20);
            }
            Some(("kind", "test" | "native")) => kind = GuestKind::Native,
            Some(("kind", "linux")) => kind = GuestKind::Linux,
            Some(("kind", k)) => return Err(ConfigError::UnknownKind(k.to_string())),
            Some(("integrity", m)) => {
                integrity_set = true;
                integrity = match m {
                    "enforce" => Some(crate::integrity::Mode::Enforce),
                    "audit" => Some(crate::integrity::Mode::Audit),
                    "off" => None,
                    _ => return Err(ConfigError::UnknownOption(word.to_string())),
                };
            }
            Some(("vtpm", "on" | "volatile")) => {
                vtpm = Some(true);
                vtpm_durable = false;
            }
            Some(("vtpm", "durable")) => {
                vtpm = Some(true);
                vtpm_durable = true;
            }
            Some(("vtpm", "off")) => {
                vtpm = Some(false);
                vtpm_durable = false;
            }
            Some(("trust", names)) => trusted.extend(names.split(',').filter(|n| !n.is_empty()).map(String::from)),
            Some(("cpus", list)) => cpus = Some(CpuSet::parse(list).ok_or_else(|| ConfigError::BadCpus(list.into()))?),
            _ => return Err(ConfigError::UnknownOption(word.to_string())),
        }
    }
    let name = name.ok_or(ConfigError::NoName)?;
    // Linux guests get integrity views in enforce mode unless told otherwise;
    // they only act once the guest's agent locks the kernel's layout.
    if !integrity_set && kind == GuestKind::Linux {
        integrity = Some(crate::integrity::Mode::Enforce);
    }
    let vtpm = vtpm.unwrap_or(kind == GuestKind::Linux);
    let many = cpus.is_some_and(|c: CpuSet| c.len() > 1);
    if many && kind == GuestKind::Native {
        return Err(ConfigError::NativeOneCpu);
    }
    if vtpm_reset && !vtpm_durable {
        return Err(ConfigError::Conflict("vtpm.reset applies to vtpm=durable only"));
    }
    Ok(GuestConfig {
        name,
        mem_bytes,
        kind,
        args: args.to_string(),
        integrity,
        trusted,
        vtpm,
        vtpm_durable,
        vtpm_reset,
        cpus,
    })
}

impl GuestConfig {
    /// The CPUs the guest runs on, of those the hypervisor runs (`online`):
    /// what `cpus=` names, or by default the boot CPU for a test guest (it
    /// has one vCPU) and every CPU for a Linux guest, with integrity views
    /// or without (each vCPU runs its own view: see `smp::exclusive`).
    pub fn resolve_cpus(&self, online: &CpuSet) -> Result<CpuSet, String> {
        match (self.cpus, self.kind) {
            (Some(c), _) if !c.is_subset(online) => {
                Err(alloc::format!("cpus={c}: the hypervisor runs on CPUs {online} only"))
            }
            (Some(c), _) => Ok(c),
            (None, GuestKind::Native) => Ok(CpuSet::single(online.lowest().unwrap_or(0))),
            (None, GuestKind::Linux) => Ok(*online),
        }
    }
}

/// `16M`, `1G`, `4096K` or plain bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_memory_and_args() {
        let c = parse("guest=alpha mem=32M -- test=basics exit=42").unwrap();
        assert_eq!(c.name, "alpha");
        assert_eq!(c.mem_bytes, 32 << 20);
        assert_eq!(c.args, "test=basics exit=42");
        let c = parse("guest=b").unwrap();
        assert_eq!((c.mem_bytes, c.args.as_str()), (MEM_DEFAULT, ""));
        // Odd sizes round up to 2 MiB.
        assert_eq!(parse("guest=c mem=5M").unwrap().mem_bytes, 6 << 20);
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert_eq!(parse("mem=16M"), Err(ConfigError::NoName));
        assert_eq!(parse("guest=Alpha"), Err(ConfigError::BadName("Alpha".into())));
        assert_eq!(parse("guest="), Err(ConfigError::BadName("".into())));
        assert!(matches!(parse("guest=a mem=1M"), Err(ConfigError::BadMemory(_))));
        assert!(matches!(parse("guest=a mem=99999999999999999999G"), Err(ConfigError::BadMemory(_))));
        assert!(matches!(parse("guest=a mem=lots"), Err(ConfigError::BadMemory(_))));
        assert_eq!(parse("guest=a kind=windows"), Err(ConfigError::UnknownKind("windows".into())));
        assert_eq!(parse("guest=a colour=red"), Err(ConfigError::UnknownOption("colour=red".into())));
        assert!(parse(&alloc::format!("guest={}", "x".repeat(32))).is_err());
    }

    #[test]
    fn linux_guests_and_their_initrd() {
        let c = parse("guest=linux kind=linux -- console=ttyS0 quiet").unwrap();
        assert_eq!((c.kind, c.args.as_str()), (GuestKind::Linux, "console=ttyS0 quiet"));
        assert_eq!(initrd_owner("initrd=linux"), Some("linux"));
        assert_eq!(c.integrity, Some(crate::integrity::Mode::Enforce));
        let c = parse("guest=linux kind=linux integrity=audit trust=dummy,ext4 --").unwrap();
        assert_eq!(c.integrity, Some(crate::integrity::Mode::Audit));
        assert_eq!(c.trusted, ["dummy", "ext4"]);
        assert_eq!(parse("guest=a kind=linux integrity=off").unwrap().integrity, None);
        assert!(parse("guest=a kind=linux").unwrap().vtpm);
        assert!(!parse("guest=a").unwrap().vtpm);
        assert!(parse("guest=a vtpm=on").unwrap().vtpm);
        assert!(!parse("guest=a kind=linux vtpm=off").unwrap().vtpm);
        assert!(parse("guest=a integrity=maybe").is_err());
        assert_eq!(initrd_owner("guest=linux"), None);
        assert!(is_pass_through_module("guest=linux kind=linux -- x"));
        assert!(!is_pass_through_module("guest=a -- kind=linux"));
        // The early check and the parse agree on which kind= counts and where `--` is.
        assert!(!is_pass_through_module("guest=a kind=linux kind=test"));
        assert_eq!(parse("guest=a kind=linux kind=test").unwrap().kind, GuestKind::Native);
        assert_eq!(parse("guest=a kind=linux--"), Err(ConfigError::UnknownKind("linux--".into())));
        assert!(!is_pass_through_module("guest=a kind=linux--"));
        // A guest's arguments may hold Linux's own initrd=: that is not an initrd module.
        assert_eq!(initrd_owner("guest=l kind=linux -- console=ttyS0 initrd=/boot/initrd.img"), None);
        assert_eq!(initrd_owner("guest=a initrd=l"), None);
        assert_eq!(initrd_owner("other -- initrd=l"), None);
    }

    #[test]
    fn cpu_sets() {
        let online = CpuSet::first(4);
        let c = parse("guest=l kind=linux integrity=off cpus=0-2").unwrap();
        assert_eq!(c.resolve_cpus(&online).unwrap(), CpuSet::parse("0-2").unwrap());
        // By default: every CPU for Linux, with integrity views or without,
        // and the boot CPU for a test guest.
        let c = parse("guest=l kind=linux integrity=off").unwrap();
        assert_eq!(c.resolve_cpus(&online).unwrap(), online);
        let c = parse("guest=l kind=linux").unwrap();
        assert_eq!(c.resolve_cpus(&online).unwrap(), online);
        assert_eq!(c.resolve_cpus(&CpuSet::single(0)).unwrap(), CpuSet::single(0));
        assert_eq!(parse("guest=a").unwrap().resolve_cpus(&online).unwrap(), CpuSet::single(0));
        assert_eq!(parse("guest=a cpus=3").unwrap().resolve_cpus(&online).unwrap(), CpuSet::single(3));
        // CPUs the hypervisor does not run: refused when the guest is placed.
        assert!(parse("guest=a cpus=7").unwrap().resolve_cpus(&online).is_err());
        // Refused when parsed.
        assert_eq!(parse("guest=a cpus=0-1"), Err(ConfigError::NativeOneCpu));
        // A subset, when asked for.
        let c = parse("guest=l kind=linux integrity=audit cpus=2-3").unwrap();
        assert_eq!(c.resolve_cpus(&online).unwrap(), CpuSet::parse("2-3").unwrap());
        assert!(parse("guest=l kind=linux cpus=1").is_ok());
        assert_eq!(parse("guest=l kind=linux integrity=off cpus=3-1"), Err(ConfigError::BadCpus("3-1".into())));
    }

    #[test]
    fn vtpm_modes_and_state_modules() {
        let c = parse("guest=a kind=linux -- x").unwrap();
        assert!(c.vtpm && !c.vtpm_durable && !c.vtpm_reset, "volatile by default");
        let c = parse("guest=a vtpm=durable vtpm.reset -- x").unwrap();
        assert!(c.vtpm && c.vtpm_durable && c.vtpm_reset);
        assert!(!parse("guest=a vtpm=durable vtpm=volatile").unwrap().vtpm_durable, "the last vtpm= counts");
        assert!(!parse("guest=a vtpm=durable vtpm=off").unwrap().vtpm);
        assert!(matches!(parse("guest=a vtpm.reset"), Err(ConfigError::Conflict(_))));
        assert!(matches!(parse("guest=a vtpm=maybe"), Err(ConfigError::UnknownOption(_))));
        // After `--`, vtpm.reset is the guest's own word.
        assert!(!parse("guest=a vtpm=durable -- vtpm.reset").unwrap().vtpm_reset);
        assert_eq!(state_owner("vtpm.state=linux"), Some("linux"));
        assert_eq!(state_owner(" vtpm.state=linux "), Some("linux"));
        assert_eq!(state_owner("vtpm.state="), None);
        assert_eq!(state_owner("vtpm.state=a b"), None);
        assert_eq!(state_owner("vtpm.statex=a"), None);
        assert_eq!(state_owner("guest=a -- vtpm.state=a"), None);
        assert!(is_data_module("vtpm.state=linux") && is_data_module("vtpm.seed"));
    }

    #[test]
    fn guest_modules_are_recognised() {
        assert!(is_guest_module("guest=a -- x"));
        assert!(!is_guest_module("initrd -- guest=a"));
        assert!(!is_guest_module(""));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096K"), Some(4 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
    }
}
