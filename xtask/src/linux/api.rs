//! The kernel-API policy the hypervisor is given (`ctvm.api`), generated
//! from the guest kernel's own exports (`Module.symvers` of Debian's headers
//! package for that kernel): every symbol `vmlinux` exports is either
//! allowed to isolated modules or placed in a named dangerous group. The
//! hypervisor resolves the names against the kernel's `__ksymtab` and denies
//! what the policy does not allow, including any export the policy does not
//! name at all. Format and check: `hypervisor/src/integrity/api.rs`.
//!
//! The groups are classes of what a rootkit needs the kernel to do for it
//! (public rootkits such as Diamorphine, Reptile, KoviD and ftrace-hooking
//! ones use each of them), matched by name patterns so that a kernel's
//! variants of an API (`_cpuslocked`, `_multi`, `_prio`, `_nolock`, a new
//! suffix) fall in the same group.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use crate::util::Fail;

/// A dangerous group: its name, why an isolated module may not have it, and
/// the name patterns (exact, or a prefix ending in `*`).
pub struct Group {
    pub name: &'static str,
    pub why: &'static str,
    pub patterns: &'static [&'static str],
}

pub const GROUPS: &[Group] = &[
    Group {
        name: "text-patching",
        why: "rewrites kernel text through the kernel's own patching path (static keys and calls, jump labels, \
              text_poke, live patches, stop_machine), which the hypervisor lets write text",
        patterns: &[
            "static_key_enable*",
            "static_key_disable*",
            "static_key_slow_*",
            "static_key_fast_inc*",
            "__static_key_*",
            "jump_label_*",
            "__static_call_update",
            "static_call_*",
            "arch_static_call_transform",
            "arch_jump_label_*",
            "text_poke*",
            "klp_enable_patch",
            "klp_shadow_*",
            "stop_machine*",
        ],
    },
    Group {
        name: "code-permissions",
        why: "changes page permissions or maps memory executable (set_memory_x on a kmalloc'd buffer, \
              a page-table walker that edits PTEs, an executable allocation)",
        patterns: &[
            "set_memory_*",
            "set_pages_*",
            "set_direct_map_*",
            "apply_to_page_range",
            "apply_to_existing_page_range",
            "vmap_pfn",
            "__vmalloc_node_range*",
            "vmalloc_exec",
            "module_alloc",
            "execmem_*",
        ],
    },
    Group {
        name: "tracing-hooks",
        why: "puts the module's code on another function's path: ftrace (incl. direct calls and IPMODIFY hooks), \
              tracepoint probes, kprobes, fprobes, uprobes, hardware breakpoints, die and NMI notifiers",
        patterns: &[
            "register_ftrace_*",
            "unregister_ftrace_*",
            "modify_ftrace_direct*",
            "ftrace_set_*",
            "ftrace_ops_set_global_filter",
            "ftrace_free_filter",
            "tracepoint_probe_*",
            "for_each_kernel_tracepoint",
            "register_tracepoint_module_notifier",
            "unregister_tracepoint_module_notifier",
            "register_trace_event",
            "unregister_trace_event",
            "trace_event_reg",
            "register_kprobe*",
            "unregister_kprobe*",
            "register_kretprobe*",
            "unregister_kretprobe*",
            "enable_kprobe",
            "disable_kprobe",
            "kprobe_event_*",
            "__kprobe_event_*",
            "register_fprobe*",
            "unregister_fprobe*",
            "uprobe_register*",
            "uprobe_unregister*",
            "register_user_hw_breakpoint",
            "register_wide_hw_breakpoint",
            "modify_user_hw_breakpoint",
            "unregister_hw_breakpoint",
            "unregister_wide_hw_breakpoint",
            "hw_breakpoint_restore",
            "perf_event_create_kernel_counter",
            "register_die_notifier",
            "unregister_die_notifier",
            "__register_nmi_handler",
            "unregister_nmi_handler",
        ],
    },
    Group {
        name: "credentials",
        why: "gives a task other credentials (root): commit_creds(prepare_kernel_cred(0)) and the override family",
        patterns: &[
            "commit_creds",
            "prepare_kernel_cred",
            "prepare_creds",
            "override_creds",
            "revert_creds",
            "abort_creds",
            "set_security_override*",
            "set_create_files_as",
        ],
    },
    Group {
        name: "usermode-helper",
        why: "starts a user program as root from the kernel (a reverse shell, a dropper)",
        patterns: &["call_usermodehelper*", "usermodehelper_*", "fork_usermode_driver", "umd_*"],
    },
    Group {
        name: "kernel-file-access",
        why: "opens, reads or writes files and block devices with the kernel's rights, bypassing the caller's \
              (persistence, /etc/shadow, a raw disk)",
        patterns: &[
            "filp_open*",
            "file_open_root*",
            "file_open_name",
            "kernel_file_open",
            "dentry_open",
            "open_exec",
            "kernel_read*",
            "kernel_write",
            "__kernel_write*",
            "kernel_tmpfile_open",
            "backing_file_open",
            "backing_tmpfile_open",
            "kern_path*",
            "vfs_*",
            "notify_change",
            "do_truncate",
            "bdev_file_open_by_*",
            "blkdev_get_by_*",
        ],
    },
    Group {
        name: "bpf-loading",
        why: "builds and JIT-compiles a BPF program without the verifier (bpf_prog_alloc then \
              bpf_prog_select_runtime), or exposes kernel functions to BPF",
        patterns: &[
            "bpf_prog_alloc",
            "bpf_prog_create*",
            "bpf_prog_select_runtime",
            "bpf_prog_get_type_*",
            "register_btf_*",
            "register_bpf_struct_ops",
            "bpf_struct_ops_*",
            "bpf_crypto_register_type",
        ],
    },
    Group {
        name: "module-loading",
        why: "watches or loads other modules (to hide from or tamper with them, or load more code), or binds to \
              their symbols by name",
        patterns: &[
            "register_module_notifier",
            "unregister_module_notifier",
            "__request_module",
            "request_module*",
            "__symbol_get",
            "__symbol_put",
            "symbol_put_addr",
        ],
    },
    Group {
        name: "symbol-lookup",
        why: "finds any kernel symbol's address, the first step of every hook on a non-exported function",
        patterns: &["kallsyms_*", "module_kallsyms_*", "lookup_symbol_*"],
    },
    Group {
        name: "cpu-registers",
        why: "writes control registers, MSRs or descriptor tables (CR0.WP off, LSTAR hooks)",
        patterns: &[
            "native_write_cr*",
            "native_write_msr*",
            "native_load_*",
            "native_set_debugreg",
            "load_direct_gdt",
            "load_fixmap_gdt",
            "cr4_update_irqsoff",
            "cr4_set_bits*",
            "cr4_clear_bits*",
            "wrmsr*",
            "msr_set_bit",
            "msr_clear_bit",
        ],
    },
    Group {
        name: "syscall-table",
        why: "calls or reaches syscalls through their table (6.x exports none; listed for a kernel that does)",
        patterns: &["sys_call_table", "x64_sys_call", "__x64_sys_*", "__ia32_sys_*", "__se_sys_*", "__do_sys_*"],
    },
    Group {
        name: "power",
        why: "reboots, halts or powers off the machine, or replaces the kernel",
        patterns: &[
            "kernel_restart",
            "kernel_halt",
            "kernel_power_off",
            "emergency_restart",
            "orderly_poweroff",
            "orderly_reboot",
            "hw_protection_shutdown",
            "__hw_protection_shutdown",
            "machine_restart",
            "machine_halt",
            "machine_power_off",
            "kernel_kexec",
        ],
    },
    Group {
        name: "input-snooping",
        why: "sees every key pressed (a keylogger)",
        patterns: &["register_keyboard_notifier", "unregister_keyboard_notifier", "input_register_handler"],
    },
    Group {
        name: "packet-hooks",
        why: "sees or rewrites every packet (a magic-packet backdoor, hidden traffic)",
        patterns: &["nf_register_net_hook*", "nf_register_queue_handler", "dev_add_pack"],
    },
    Group {
        name: "process-memory",
        why: "reads or writes another process's memory",
        patterns: &["access_process_vm", "get_user_pages_remote*"],
    },
];

/// Names a group's patterns match that stay allowed: they only read.
const READ_ONLY_EXCEPTIONS: &[&str] = &["static_key_count", "static_key_initialized"];

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// The dangerous group an export belongs to, if any.
pub fn group_of(name: &str) -> Option<&'static Group> {
    if READ_ONLY_EXCEPTIONS.contains(&name) {
        return None;
    }
    GROUPS.iter().find(|g| g.patterns.iter().any(|p| matches(p, name)))
}

/// The symbols `vmlinux` exports, from a `Module.symvers`
/// (`CRC<TAB>NAME<TAB>MODULE<TAB>EXPORT_TYPE<TAB>NAMESPACE`).
pub fn vmlinux_exports(symvers: &str) -> BTreeSet<String> {
    symvers
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (_crc, name, module) = (f.next()?, f.next()?, f.next()?);
            (module == "vmlinux" && !name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// The policy text for a kernel release and its exports.
pub fn policy(kernel: &str, exports: &BTreeSet<String>) -> String {
    let mut out = String::from("# CTVM kernel-API policy for isolated modules, written by cargo xtask from this\n");
    out.push_str("# kernel's Module.symvers: exports not allowed here are denied (call-denied-api).\n");
    let _ = writeln!(out, "ctvm.api v1 kernel={kernel}");
    for g in GROUPS {
        let _ = writeln!(out, "# {}: {}", g.name, g.why.split_whitespace().collect::<Vec<_>>().join(" "));
        let _ = writeln!(out, "group {}", g.name);
    }
    for name in exports {
        match group_of(name) {
            Some(g) => {
                let _ = writeln!(out, "deny {} {name}", g.name);
            }
            None => {
                let _ = writeln!(out, "allow {name}");
            }
        }
    }
    out
}

/// Writes `ctvm.api` for the kernel whose headers are at `headers`.
pub fn write(kernel: &str, headers: &Path, out: &Path) -> Result<(), Fail> {
    let symvers = headers.join("Module.symvers");
    let text = std::fs::read_to_string(&symvers).map_err(|e| Fail(format!("{}: {e}", symvers.display())))?;
    let exports = vmlinux_exports(&text);
    if exports.is_empty() {
        return Err(Fail(format!("{}: no vmlinux exports", symvers.display())));
    }
    let denied = exports.iter().filter(|n| group_of(n).is_some()).count();
    println!(
        "xtask: api policy: kernel {kernel}: {} exports allowed, {denied} in {} dangerous groups",
        exports.len() - denied,
        GROUPS.len()
    );
    std::fs::write(out, policy(kernel, &exports))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routes_rootkits_take_are_in_groups() {
        for (name, group) in [
            ("call_usermodehelper_setup", "usermode-helper"),
            ("call_usermodehelper_exec", "usermode-helper"),
            ("static_key_enable", "text-patching"),
            ("static_key_enable_cpuslocked", "text-patching"),
            ("__static_call_update", "text-patching"),
            ("register_ftrace_direct", "tracing-hooks"),
            ("register_ftrace_direct_multi", "tracing-hooks"),
            ("tracepoint_probe_register_prio_may_exist", "tracing-hooks"),
            ("register_kprobe", "tracing-hooks"),
            ("filp_open", "kernel-file-access"),
            ("kernel_write", "kernel-file-access"),
            ("vfs_unlink", "kernel-file-access"),
            ("bpf_prog_create", "bpf-loading"),
            ("bpf_prog_alloc", "bpf-loading"),
            ("commit_creds", "credentials"),
            ("prepare_kernel_cred", "credentials"),
            ("register_module_notifier", "module-loading"),
            ("__request_module", "module-loading"),
            ("kallsyms_lookup_name", "symbol-lookup"),
            ("native_write_cr0", "cpu-registers"),
            ("wrmsrl_on_cpu", "cpu-registers"),
            ("kernel_restart", "power"),
            ("register_keyboard_notifier", "input-snooping"),
            ("nf_register_net_hooks", "packet-hooks"),
            ("set_memory_x", "code-permissions"),
        ] {
            assert_eq!(group_of(name).map(|g| g.name), Some(group), "{name}");
        }
    }

    #[test]
    fn what_benign_modules_import_stays_allowed() {
        // Measured with `nm -u` on Debian's dummy, veth and ifb and our calls module.
        for name in [
            "_printk",
            "snprintf",
            "kstrtoint",
            "register_netdevice",
            "rtnl_link_register",
            "bpf_prog_put",
            "bpf_dispatcher_xdp_func",
            "bpf_warn_invalid_xdp_action",
            "xdp_do_redirect",
            "__SCT__cond_resched",
            "static_key_count",
            "vmalloc",
            "vmap",
            "filp_close",
            "capable",
        ] {
            assert!(group_of(name).is_none(), "{name} is in {:?}", group_of(name).map(|g| g.name));
        }
    }

    #[test]
    fn the_policy_lists_every_vmlinux_export_once() {
        let symvers = "0x1\t_printk\tvmlinux\tEXPORT_SYMBOL\t\n\
                       0x2\tcommit_creds\tvmlinux\tEXPORT_SYMBOL\t\n\
                       0x3\tveth_helper\tdrivers/net/veth\tEXPORT_SYMBOL_GPL\t\n\
                       torn line\n";
        let exports = vmlinux_exports(symvers);
        assert_eq!(exports.iter().map(String::as_str).collect::<Vec<_>>(), ["_printk", "commit_creds"]);
        let text = policy("6.1.0-test", &exports);
        assert!(text.contains("\nctvm.api v1 kernel=6.1.0-test\n"));
        assert!(text.contains("\nallow _printk\n"));
        assert!(text.contains("\ndeny credentials commit_creds\n"));
        assert!(!text.contains("veth_helper"));
        assert_eq!(text.lines().filter(|l| l.starts_with("group ")).count(), GROUPS.len());
    }
}
