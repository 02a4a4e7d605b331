#!/bin/busybox sh
# /init of the CTVM test initramfs: report what the scenario checks as
# "ctvm-init: ..." lines, then power off (or give a shell with ctvm.shell).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null

say() { echo "ctvm-init: $*"; }

say "started: Linux $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s"
say "cmdline: $(cat /proc/cmdline)"
say "memory: $(grep MemTotal /proc/meminfo | tr -s ' ')"
say "cpus: $(grep -c ^processor /proc/cpuinfo)"
if grep -qw vmx /proc/cpuinfo; then say "vmx visible: yes"; else say "vmx visible: no"; fi
if grep -qw hypervisor /proc/cpuinfo; then say "hypervisor flag: yes"; else say "hypervisor flag: no"; fi
if [ -e /sys/class/tpm/tpm0 ]; then say "tpm0: present"; else say "tpm0: absent"; fi
say "done"

# ctvm.integrity: load the CTVM agent, then attack the kernel from modules
# and check that every attack is stopped while benign modules keep working.
integrity_tests() {
    sym() { awk -v s="$1" '$3 == s { print "0x" $1; exit }' /proc/kallsyms; }
    after() { awk -v s="$1" 'found { print "0x" $1; exit } $3 == s { found = 1 }' /proc/kallsyms; }
    getpid_ok() { sh -c 'read -r pid rest < /proc/self/stat; [ "$pid" = "$$" ]'; }
    last() { dmesg | grep "ctvm-test: $1:" | tail -n 1 | sed 's/^.*ctvm-test: //'; }
    attack() {
        name=$1; shift
        insmod /lib/ctvm/$name.ko "$@" 2>/dev/null
        say "attack $(last $name)"
        if getpid_ok; then say "after $name: getpid ok"; else say "after $name: getpid WRONG"; fi
    }

    for s in _stext _etext __start_rodata __end_rodata __start_ro_after_init __end_ro_after_init sys_call_table idt_table entry_SYSCALL_64 __text_poke modules _sdata; do
        say "symbol $s $(sym $s)"
    done
    insmod /lib/ctvm/ctvm_agent.ko \
        text_start=$(sym _stext) text_end=$(sym _etext) \
        rodata_start=$(sym __start_rodata) rodata_end=$(sym __end_rodata) \
        ro_after_init_start=$(sym __start_ro_after_init) ro_after_init_end=$(sym __end_ro_after_init) \
        syscall_table=$(sym sys_call_table) idt=$(sym idt_table) syscall_entry=$(sym entry_SYSCALL_64) \
        ksymtab_start=$(sym __start___ksymtab) ksymtab_end=$(sym __stop___ksymtab) \
        ksymtab_gpl_start=$(sym __start___ksymtab_gpl) ksymtab_gpl_end=$(sym __stop___ksymtab_gpl) \
        poke_start=$(sym __text_poke) poke_end=$(after __text_poke) module_list=$(sym modules) \\
        page_table=$(sym init_top_pgt)
    if dmesg | grep -q "ctvm: agent ready"; then say "agent loaded"; else say "FAIL: agent not loaded: $(dmesg | grep 'ctvm:' | tail -n 3)"; fi

    # Benign modules, isolated: in-tree dummy and veth carrying traffic, and our caller.
    insmod /lib/ctvm/dummy.ko && ip link add d0 type dummy && ip link set d0 up \
        && ip addr add 10.8.0.1/24 dev d0 && ping -c 20 -i 0.1 -W 1 10.8.0.2 > /dev/null
    say "dummy: $(ip link show d0 | head -n 1 | grep -o '<[A-Z_,]*>'), tx packets $(cat /sys/class/net/d0/statistics/tx_packets)"
    insmod /lib/ctvm/veth.ko && ip link add v0 type veth peer name v1 \
        && ip addr add 10.9.0.1/24 dev v0 && ip addr add 10.9.0.2/24 dev v1 \
        && ip link set v0 up && ip link set v1 up
    say "veth: $(arping -c 20 -w 20 -I v0 10.9.0.2 | grep -o 'Received [0-9]* response'), rx packets $(cat /sys/class/net/v1/statistics/rx_packets)"
    insmod /lib/ctvm/calls.ko loops=2000 && say "calls: $(last calls)"

    # The kernel's own text patching keeps working: a static key and a kprobe.
    echo 1 > /proc/sys/kernel/sched_schedstats && echo 0 > /proc/sys/kernel/sched_schedstats \
        && say "static key sched_schedstats flipped: $(cat /proc/sys/kernel/sched_schedstats)"
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
    T=/sys/kernel/tracing
    echo 'p:ctvm_probe do_sys_openat2' >> $T/kprobe_events && echo 1 > $T/events/kprobes/ctvm_probe/enable
    cat /proc/version > /dev/null
    echo 0 > $T/events/kprobes/ctvm_probe/enable
    say "kprobe hits: $(grep -c ctvm_probe $T/trace)"

    # The attacks.
    attack atk_syscall table=$(sym sys_call_table)
    attack atk_idt idt=$(sym idt_table)
    attack atk_text
    attack atk_wp rodata=$(sym linux_banner)
    attack atk_call hidden=$(sym __x64_sys_getpid)
    attack atk_dkom
    attack atk_ftrace target=$(sym __x64_sys_getpid)
    attack atk_setmem rodata=$(sym linux_banner) set_memory_rw_addr=$(sym set_memory_rw)
    attack atk_agent target=$(awk '$3 == "tracked_modules" && $4 == "[ctvm_agent]" { print "0x" $1; exit }' /proc/kallsyms)

    # The agent cannot be unloaded.
    if rmmod ctvm_agent 2>/dev/null; then say "FAIL: the agent was unloaded"; else say "agent unload refused"; fi
    say "kernel still works: $(uname -r), $(ls /lib/ctvm | wc -l) files"
    say "violations recorded: $(wc -l < /proc/ctvm_violations)"
}

if grep -qw ctvm.integrity /proc/cmdline; then
    integrity_tests
fi

# ctvm.poke=ADDR: write to a physical address the guest does not own (the
# hypervisor's memory); CTVM must stop the guest before the write lands.
poke=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^ctvm.poke=//p')
if [ -n "$poke" ]; then
    say "poking $poke through /dev/mem"
    devmem "$poke" 32 0xdeadbeef
    say "FAIL: the write to $poke went through"
fi

if grep -qw ctvm.shell /proc/cmdline; then
    say "starting a shell (exit or poweroff -f to stop)"
    setsid cttyhack sh
fi
poweroff -f
