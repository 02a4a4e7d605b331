//! The security-configuration measurement: what CTVM itself enforces for a
//! guest, measured into the guest's vTPM so that a remote verifier can
//! check it in a quote.
//!
//! One event per launch, in [`pcr::CONFIG`] (PCR 11) and nowhere else,
//! logged as `EV_EVENT_TAG` (0x06) with a `TCG_PCClientTaggedEvent`
//! whose taggedEventID is [`CONFIG_TAG`] ("CTVM") and whose data is the
//! canonical text, e.g.
//!
//! ```text
//! ctvm.config v1 hypervisor=<sha256 hex> integrity=enforce trust=ctvm_agent,ifb policy=<sha256 hex> api=<sha256 hex> vtpm=durable
//! ```
//!
//! Fields come in that order, separated by one space; `trust` lists the
//! trusted module names sorted and deduplicated (`-` for none); `policy` is
//! the SHA-256 of the `ctvm.policy` module (`none` without one); `api` the
//! SHA-256 of the `ctvm.api` module, the kernel-API allow-list isolated
//! modules are held to (`none` without one); `vtpm` is
//! `durable` when a store service keeps the vTPM's state, `volatile`
//! otherwise (see `vtpm_trust::durability`). The extended digest is the
//! SHA-1 of the text alone, so a verifier recomputes it from the log.
//!
//! A guest with run-time integrity (`integrity=enforce` or `audit`) gets a
//! second event there when its agent locks the kernel layout (the moment
//! module isolation starts), same tag, over the text
//!
//! ```text
//! ctvm.lock v1 agent=<sha256 hex> mode=enforce
//! ```
//!
//! where `agent` is the digest `ctvm.policy` pins `ctvm_agent` by (its
//! `sha256=`, which the lock just checked the agent's code against) and
//! `mode` the guest's integrity mode. Nothing in it depends on where the
//! kernel was loaded, so a verifier recomputes it from the policy file.
//!
//! PCR 11 is the hypervisor's: the guest's vTPM refuses TPM_Extend of it
//! from every locality the TIS gives a guest (`vtpm_core::Tpm::
//! reserve_pcrs_to_platform`, [`super::PLATFORM_PCRS`]), and CTVM extends
//! at locality 4. A guest that never locked therefore cannot add the lock
//! event, and a verifier accepts PCR 11 only as exactly [configuration]
//! (integrity off) or [configuration, lock] (enforce, audit).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use super::event_log::{event_type, pcr, Event};

/// taggedEventID of the configuration event: "CTVM".
pub const CONFIG_TAG: u32 = 0x4354_564D;
/// The text's first word and version.
pub const CONFIG_PREFIX: &str = "ctvm.config v1";

/// The run-time integrity mode on the guest's line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntegrityMode {
    Enforce,
    Audit,
    Off,
}

impl IntegrityMode {
    /// The mode a guest's configuration asks for (`None`: off).
    pub fn of(mode: Option<crate::integrity::Mode>) -> Self {
        match mode {
            Some(crate::integrity::Mode::Enforce) => IntegrityMode::Enforce,
            Some(crate::integrity::Mode::Audit) => IntegrityMode::Audit,
            None => IntegrityMode::Off,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IntegrityMode::Enforce => "enforce",
            IntegrityMode::Audit => "audit",
            IntegrityMode::Off => "off",
        }
    }
}

/// What the configuration event records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityConfig<'a> {
    /// SHA-256 of the hypervisor image (the multiboot2 ELF GRUB loaded).
    pub hypervisor: [u8; 32],
    pub integrity: IntegrityMode,
    /// Module names from `trust=`.
    pub trust: &'a [&'a str],
    /// SHA-256 of the `ctvm.policy` module, if there is one.
    pub policy: Option<[u8; 32]>,
    /// SHA-256 of the `ctvm.api` module, if there is one.
    pub api: Option<[u8; 32]>,
    /// True when a store service keeps the vTPM's state across reboots.
    pub vtpm_durable: bool,
}

fn hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

/// Lower-case hexadecimal, as the configuration text and the console
/// write digests.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    hex(&mut s, bytes);
    s
}

/// The canonical text.
pub fn config_text(c: &SecurityConfig<'_>) -> String {
    let mut s = String::with_capacity(200);
    s.push_str(CONFIG_PREFIX);
    s.push_str(" hypervisor=");
    hex(&mut s, &c.hypervisor);
    s.push_str(" integrity=");
    s.push_str(c.integrity.as_str());
    s.push_str(" trust=");
    let mut names: Vec<&str> = c.trust.iter().copied().filter(|n| !n.is_empty()).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        s.push('-');
    } else {
        s.push_str(&names.join(","));
    }
    for (key, digest) in [(" policy=", &c.policy), (" api=", &c.api)] {
        s.push_str(key);
        match digest {
            Some(d) => hex(&mut s, d),
            None => s.push_str("none"),
        }
    }
    s.push_str(" vtpm=");
    s.push_str(if c.vtpm_durable { "durable" } else { "volatile" });
    s
}

/// The event to extend into PCR 11 and log, before the guest runs.
/// `sha1` is the workspace's SHA-1 (`vtpm_core::sha1`).
pub fn config_event(sha1: impl Fn(&[u8]) -> [u8; 20], c: &SecurityConfig<'_>) -> Event {
    tagged_event(sha1, &config_text(c))
}

/// The lock event's first word and version.
pub const LOCK_PREFIX: &str = "ctvm.lock v1";

/// The canonical text of the lock event: the agent's pinned digest and
/// the guest's integrity mode.
pub fn lock_text(agent: &[u8; 32], mode: IntegrityMode) -> String {
    let mut s = String::with_capacity(100);
    s.push_str(LOCK_PREFIX);
    s.push_str(" agent=");
    hex(&mut s, agent);
    s.push_str(" mode=");
    s.push_str(mode.as_str());
    s
}

/// The event to extend into PCR 11 and log when the agent locks.
pub fn lock_event(sha1: impl Fn(&[u8]) -> [u8; 20], agent: &[u8; 32], mode: IntegrityMode) -> Event {
    tagged_event(sha1, &lock_text(agent, mode))
}

fn tagged_event(sha1: impl Fn(&[u8]) -> [u8; 20], text: &str) -> Event {
    let mut data = Vec::with_capacity(8 + text.len());
    data.extend_from_slice(&CONFIG_TAG.to_le_bytes());
    data.extend_from_slice(&(text.len() as u32).to_le_bytes());
    data.extend_from_slice(text.as_bytes());
    Event { pcr: pcr::CONFIG, kind: event_type::EVENT_TAG, digest: sha1(text.as_bytes()), data }
}

/// The text of a CTVM tagged event (configuration or lock), if `e` is one
/// (for tests and for guests' own checks).
pub fn parse_config_event(e: &Event) -> Option<&str> {
    if e.kind != event_type::EVENT_TAG {
        return None;
    }
    let tag = u32::from_le_bytes(e.data.get(..4)?.try_into().ok()?);
    let len = u32::from_le_bytes(e.data.get(4..8)?.try_into().ok()?) as usize;
    if tag != CONFIG_TAG || e.data.len() != 8usize.checked_add(len)? {
        return None;
    }
    core::str::from_utf8(e.data.get(8..)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sha1(d: &[u8]) -> [u8; 20] {
        let mut o = [0u8; 20];
        for (i, b) in d.iter().enumerate() {
            o[i % 20] = o[i % 20].wrapping_mul(31).wrapping_add(*b);
        }
        o
    }

    fn cfg<'a>(trust: &'a [&'a str]) -> SecurityConfig<'a> {
        SecurityConfig {
            hypervisor: [0xab; 32],
            integrity: IntegrityMode::Enforce,
            trust,
            policy: Some([0x01; 32]),
            api: Some([0x02; 32]),
            vtpm_durable: true,
        }
    }

    #[test]
    fn the_text_is_canonical() {
        let t = config_text(&cfg(&["ifb", "ctvm_agent", "ifb", ""]));
        let want = alloc::format!(
            "ctvm.config v1 hypervisor={} integrity=enforce trust=ctvm_agent,ifb policy={} api={} vtpm=durable",
            "ab".repeat(32),
            "01".repeat(32),
            "02".repeat(32)
        );
        assert_eq!(t, want);
        // The same set in another order gives the same text.
        assert_eq!(config_text(&cfg(&["ctvm_agent", "ifb"])), t);
        let off =
            SecurityConfig { integrity: IntegrityMode::Off, policy: None, api: None, vtpm_durable: false, ..cfg(&[]) };
        assert!(config_text(&off).ends_with("integrity=off trust=- policy=none api=none vtpm=volatile"));
        // Another kernel-API policy is another configuration.
        assert_ne!(
            config_text(&SecurityConfig { api: Some([0x03; 32]), ..cfg(&["ifb"]) }),
            config_text(&cfg(&["ifb"]))
        );
    }

    #[test]
    fn the_event_is_a_tagged_event_in_pcr_11_over_the_text() {
        let c = cfg(&["ifb"]);
        let e = config_event(fake_sha1, &c);
        assert_eq!((e.pcr, e.kind), (11, 0x06));
        assert_eq!(&e.data[..4], &0x4354_564Du32.to_le_bytes());
        assert_eq!(parse_config_event(&e), Some(config_text(&c).as_str()));
        assert_eq!(e.digest, fake_sha1(config_text(&c).as_bytes()));
        let mut other = e.clone();
        other.data[0] ^= 1;
        assert_eq!(parse_config_event(&other), None, "another tag is not a configuration event");
    }

    #[test]
    fn the_lock_event_names_the_pinned_agent_and_the_mode() {
        let e = lock_event(fake_sha1, &[0xa5; 32], IntegrityMode::Audit);
        let want = alloc::format!("ctvm.lock v1 agent={} mode=audit", "a5".repeat(32));
        assert_eq!((e.pcr, e.kind), (11, 0x06));
        assert_eq!(parse_config_event(&e), Some(want.as_str()));
        assert_eq!(e.digest, fake_sha1(want.as_bytes()));
        assert_eq!(lock_text(&[0xa5; 32], IntegrityMode::Enforce), want.replace("audit", "enforce"));
    }
}
