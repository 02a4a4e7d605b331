#!/bin/busybox sh
# /init of the CTVM test initramfs: report what the scenario checks as
# "ctvm-init: ..." lines, then power off (or give a shell with ctvm.shell).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null

say() { echo "ctvm-init: $*"; }
# Guest time in nanoseconds (Bochs' guest time counts emulated instructions).
now_ns() {
    awk '/^now at/ { print $3; exit }' /proc/timer_list 2>/dev/null || awk '{ printf "%d", $1 * 1e9 }' /proc/uptime
}

say "started: Linux $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s"
say "cmdline: $(cat /proc/cmdline)"
say "memory: $(grep MemTotal /proc/meminfo | tr -s ' ')"
say "cpus: $(grep -c ^processor /proc/cpuinfo)"
# Work on each CPU: a loop pinned to it, which says where it ran (the
# 39th field of /proc/self/stat), and the kernel's per-CPU interrupt counts.
work=""
c=0
while [ $c -lt "$(nproc)" ]; do
    ran=$(taskset "$(printf '%x' $((1 << c)))" sh -c 'i=0; while [ $i -lt 300 ]; do i=$((i+1)); done; cut -d" " -f39 /proc/self/stat')
    work="$work cpu$c:ran-on-$ran"
    c=$((c + 1))
done
say "work:$work"
# Cross-CPU wakeups: a process on the last CPU answers one on the first
# through two FIFOs, each waiting asleep for the other (the bench compares
# this with Linux alone).
if [ "$(nproc)" -gt 1 ]; then
    mkfifo /tmp/ping /tmp/pong
    taskset "$(printf '%x' $((1 << ($(nproc) - 1))))" sh -c 'while read -r l < /tmp/ping && [ "$l" != end ]; do echo "$l" > /tmp/pong; done' &
    t0=$(now_ns)
    taskset 1 sh -c 'i=0; while [ $i -lt 50 ]; do echo $i > /tmp/ping; read -r l < /tmp/pong; i=$((i + 1)); done; echo end > /tmp/ping'
    wait
    say "cross-CPU wakeups: 50 round trips in $((($(now_ns) - t0) / 1000)) us of guest time"
fi
say "interrupts: $(grep -E '^ *(LOC|RES|CAL|TLB):' /proc/interrupts | tr -s ' ' | tr '\n' ';')"
if grep -qw vmx /proc/cpuinfo; then say "vmx visible: yes"; else say "vmx visible: no"; fi
if grep -qw hypervisor /proc/cpuinfo; then say "hypervisor flag: yes"; else say "hypervisor flag: no"; fi
if [ -e /sys/class/tpm/tpm0 ]; then say "tpm0: present"; else say "tpm0: absent"; fi
say "done"

# The variables holding the kernel's protected slab caches, in the agent's
# slot order (xtask fills them in from the agent's table; "-" is the pid
# cache, which the agent finds itself).
CACHES="@PROTECTED_CACHES@"
# Kernel symbols from one pass over /proc/kallsyms (each pass takes seconds
# under Bochs); "after:NAME" is the symbol that follows NAME.
SYMBOLS="$CACHES _stext _etext __start_rodata __end_rodata __start_ro_after_init __end_ro_after_init sys_call_table
    idt_table entry_SYSCALL_64 __text_poke modules _sdata __start___ksymtab __stop___ksymtab __start___ksymtab_gpl
    __stop___ksymtab_gpl init_top_pgt retbleed_return_thunk srso_return_thunk srso_alias_return_thunk
    its_return_thunk linux_banner __x64_sys_getpid set_memory_rw sched_schedstats __tracepoint_sched_process_exec __tracepoint_task_newtask
    _edata __bss_start __bss_stop proc_root kallsyms_lookup_name modprobe_path core_pattern init_task pgd_list asm_exc_int3 set_memory_x
    __start___ex_table __stop___ex_table __get_user_1 __get_user_2 cpu_current_top_of_stack
    __per_cpu_start __per_cpu_end irq_stack_backing_store exception_stacks hardirq_stack_ptr"
sym() {
    [ -s /tmp/symbols ] || awk -v want="$SYMBOLS" '
        BEGIN { n = split(want, w, /[ \n]+/); for (i = 1; i <= n; i++) wanted[w[i]] = 1 }
        follow != "" { print "after:" follow " 0x" $1; follow = "" }
        ($3 in wanted) && !($3 in seen) { print $3 " 0x" $1; seen[$3] = 1; follow = $3 }' /proc/kallsyms > /tmp/symbols
    awk -v s="$1" '$1 == s { print $2; exit }' /tmp/symbols
}
after() { sym "after:$1"; }
caches() {
    list=$(for c in $CACHES; do v=$(sym $c); echo "${v:-0}"; done | tr '\n' ',' | sed 's/,$//')
    echo "caches=$list"
}
# The return thunks this kernel has (which one modules use depends on the CPU).
return_thunks() {
    list=$(for t in retbleed_return_thunk srso_return_thunk srso_alias_return_thunk its_return_thunk; do sym $t; done \
        | tr '\n' ',' | sed 's/,$//')
    [ -n "$list" ] && echo "return_thunks=$list"
}
# The per-CPU area and its stacks, as far as kallsyms shows them (the agent
# refuses to lock without the area).
percpu() {
    for p in percpu_start:__per_cpu_start percpu_end:__per_cpu_end irq_stacks:irq_stack_backing_store \
        exception_stacks:exception_stacks irq_stack_top:hardirq_stack_ptr; do
        v=$(sym "${p#*:}")
        [ -n "$v" ] && echo "${p%%:*}=$v"
    done
}
cmdline_value() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p"; }

# The CTVM agent, given the kernel's layout from kallsyms while the kernel is
# still the measured one.
load_agent() {
    insmod /lib/ctvm/ctvm_agent.ko \
        text_start=$(sym _stext) text_end=$(sym _etext) \
        rodata_start=$(sym __start_rodata) rodata_end=$(sym __end_rodata) \
        ro_after_init_start=$(sym __start_ro_after_init) ro_after_init_end=$(sym __end_ro_after_init) \
        syscall_table=$(sym sys_call_table) idt=$(sym idt_table) syscall_entry=$(sym entry_SYSCALL_64) \
        ksymtab_start=$(sym __start___ksymtab) ksymtab_end=$(sym __stop___ksymtab) \
        ksymtab_gpl_start=$(sym __start___ksymtab_gpl) ksymtab_gpl_end=$(sym __stop___ksymtab_gpl) \
        poke_start=$(sym __text_poke) poke_end=$(after __text_poke) module_list=$(sym modules) \
        page_table=$(sym init_top_pgt) pgd_list=$(sym pgd_list) $(return_thunks) \
        data_start=$(sym _sdata) data_end=$(sym _edata) bss_start=$(sym __bss_start) bss_end=$(sym __bss_stop) \
        $(percpu) $(caches)
    if dmesg | grep -q "ctvm: agent ready"; then say "agent loaded"; else say "FAIL: agent not loaded: $(dmesg | grep 'ctvm:' | tail -n 3)"; fi
    dmesg | sed -n 's/^.*ctvm: \(.* given back after boot.*\)$/\1/p' | while read -r l; do say "agent: $l"; done
}

# The violation records the agent has drained into /proc/ctvm_violations.
recorded() { grep -c '^seq=' /proc/ctvm_violations; }
# drained N: waits (5 s at most) until N are recorded: the agent drains the
# hypervisor's log every second.
drained() {
    n=0
    while [ "$(recorded)" -lt "$1" ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
}

# ctvm.integrity: load the CTVM agent, then attack the kernel from modules
# and check that every attack is stopped while benign modules keep working.
getpid_ok() { sh -c 'read -r pid rest < /proc/self/stat; [ "$pid" = "$$" ]'; }
last() { dmesg | grep "ctvm-test: $1:" | tail -n 1 | sed 's/^.*ctvm-test: //'; }
# attack NAME ARGS...: loads an attack module (on the CPUs of $cpus, a
# taskset mask, if set) and says what it reports and whether getpid works.
attack() {
    name=$1; shift
    taskset "${cpus:-ff}" insmod /lib/ctvm/$name.ko "$@" 2>/dev/null
    say "attack $(last $name)"
    if getpid_ok; then say "after $name: getpid ok"; else say "after $name: getpid WRONG"; fi
}
twin_ifb() {
    # Trust follows code, not names: a twin of the trusted ifb driver built
    # from attack code is isolated and stopped.
    insmod /lib/ctvm/twin/ifb.ko table=$(sym sys_call_table) 2>/dev/null
    say "twin $(last ifb)"
    if getpid_ok; then say "after twin ifb: getpid ok"; else say "after twin ifb: getpid WRONG"; fi
}
lookalike_ifb() {
    # Trust follows what the code calls too: ifb's own text with one call
    # relocated to another function is isolated, then removed.
    insmod /lib/ctvm/lookalike/ifb.ko numifbs=0 2>/dev/null
    say "lookalike ifb: $(grep -q '^ifb ' /proc/modules && echo loaded || echo not loaded)"
    rmmod ifb 2>/dev/null
    say "lookalike ifb removed: $(grep -c '^ifb ' /proc/modules) left"
}

# ctvm.race: a race between the CPUs. atk_race's thread on CPU 1 hammers
# the syscall table, writes over, calls into, and has the kernel write
# (through an export), a static key's patch site that CPU 0's kernel
# rewrites with text_poke, and writes race_peer's data (pages granted to
# race_peer's view) and calls into its code; meanwhile CPU 0 flips the
# key and loads and unloads race_peer in a loop. Nothing may go through,
# both CPUs run on. (A module's view runs on one CPU at a time: the
# attempts interleave with CPU 0's work, as the counts of what the thread
# saw change show.)
cpu_ran() { taskset "$1" sh -c 'i=0; while [ $i -lt 300 ]; do i=$((i+1)); done; cut -d" " -f39 /proc/self/stat'; }
timer_counts() { awk '/^ *LOC:/ { print $2, $3; exit }' /proc/interrupts; }
race_tests() {
    load_agent
    # This shell, and what it starts, on CPU 0.
    taskset -p 1 $$ > /dev/null
    records() { grep -c "^seq=.* cpu=$1\$" /proc/ctvm_violations; }
    before=$(records 1)
    before0=$(records 0)
    timers_before=$(timer_counts)
    insmod /lib/ctvm/atk_race.ko table=$(sym sys_call_table) key=$(sym sched_schedstats) rounds=600 \
        || say "FAIL: atk_race did not load"
    say "race $(last atk_race)"
    bait=$(cat /sys/module/atk_race/parameters/bait)
    cycles=0
    while [ "$(cat /sys/module/atk_race/parameters/done)" = 0 ] && [ $cycles -lt 12 ]; do
        echo 1 > /proc/sys/kernel/sched_schedstats
        insmod /lib/ctvm/race_peer.ko page="$bait" || say "FAIL: race_peer did not load"
        # (CPU 1's thread gets rounds while race_peer is in, and between
        # the key's flips.)
        usleep 100000
        rmmod race_peer || say "FAIL: race_peer did not unload"
        echo 0 > /proc/sys/kernel/sched_schedstats
        usleep 50000
        cycles=$((cycles + 1))
    done
    say "race: $cycles load/unload cycles of race_peer on CPU 0, the static key flipped each time"
    say "race $(last race_peer)"
    if dmesg | grep -q 'race_peer: unloading.*CHANGED'; then say "FAIL: race: race_peer's data CHANGED"; fi
    # module_exit stops the thread (if its rounds are not done yet).
    rmmod atk_race || say "FAIL: atk_race did not unload"
    report=$(last atk_race)
    say "race $report"
    pokes=$(echo "$report" | sed -n 's/.* saw \([0-9]*\) pokes and \([0-9]*\) peer writes.*/\1/p')
    peer=$(echo "$report" | sed -n 's/.* saw \([0-9]*\) pokes and \([0-9]*\) peer writes.*/\2/p')
    attempts=$(echo "$report" | sed -n 's/.* \([0-9]*\) total;.*/\1/p')
    if [ "${pokes:-0}" -gt 0 ] && [ "${peer:-0}" -gt 0 ]; then
        say "race: CPU 1 saw CPU 0's pokes and peer writes between its attempts"
    else
        say "FAIL: race: no overlap seen (pokes ${pokes:-?}, peer writes ${peer:-?})"
    fi
    if getpid_ok; then say "after atk_race: getpid ok"; else say "after atk_race: getpid WRONG"; fi
    after=$(records 1)
    say "race records: $((after - before)) on CPU 1 for ${attempts:-?} attempts, $(grep -c 'action=allow' /proc/ctvm_violations) allowed"
    if [ -n "$attempts" ] && [ "$attempts" -gt 0 ] && [ $((after - before)) -ge "$attempts" ]; then
        say "race: every attempt recorded"
    else
        say "FAIL: race: $((after - before)) records for ${attempts:-?} attempts"
    fi
    # Only the thread on CPU 1 attacks: a record on CPU 0 is one too many.
    after0=$(records 0)
    if [ "$after0" = "$before0" ]; then say "race: no records on CPU 0"; else say "FAIL: race: $((after0 - before0)) records on CPU 0"; fi
    say "race records lost: $(head -n 1 /proc/ctvm_violations | sed 's/.*lost=//')"
    say "race: both CPUs still run: cpu0:ran-on-$(cpu_ran 1) cpu1:ran-on-$(cpu_ran 2)"
    timers_after=$(timer_counts)
    say "race: timer interrupts per CPU: $timers_before before, $timers_after after"
    set -- $timers_before $timers_after
    if [ "$3" -gt "$1" ] && [ "$4" -gt "$2" ]; then
        say "race: timer interrupts moved on both CPUs"
    else
        say "FAIL: race: timer interrupts did not move on both CPUs"
    fi
}

integrity_tests() {

    say "spectre_v2: $(cat /sys/devices/system/cpu/vulnerabilities/spectre_v2); retbleed: $(cat /sys/devices/system/cpu/vulnerabilities/retbleed)"
    for s in _stext _etext __start_rodata __end_rodata __start_ro_after_init __end_ro_after_init sys_call_table idt_table entry_SYSCALL_64 __text_poke modules _sdata; do
        say "symbol $s $(sym $s)"
    done
    load_agent

    # The twin and the look-alike are isolated; the real ifb then runs trusted.
    twin_ifb
    lookalike_ifb
    insmod /lib/ctvm/ifb.ko && ip link add i0 type ifb && ip link set i0 up
    say "ifb up: $(ip link show i0 | grep -q ',UP' && echo yes || echo no)"

    # Benign modules, isolated: in-tree dummy and veth carrying traffic, and our caller.
    # (busybox insmod retries a failed init with init_module: attacks load twice.)
    # (Short intervals, and no wait for the replies dummy never gets: an
    # idle guest's time runs some 60 times slower than the wall's on two
    # CPUs under Bochs.)
    tx() { cat /sys/class/net/d0/statistics/tx_packets; }
    if insmod /lib/ctvm/dummy.ko && ip link add d0 type dummy && ip link set d0 up && ip addr add 10.8.0.1/24 dev d0; then
        ping -c 20 -i 0.002 10.8.0.2 > /dev/null &
        n=0
        while [ "$(tx)" -lt 20 ] && [ $n -lt 100 ]; do usleep 10000; n=$((n + 1)); done
        kill $! 2>/dev/null
    fi
    say "dummy: $(ip link show d0 | head -n 1 | grep -o '<[A-Z_,]*>'), tx packets $(tx)"
    # The pair's far end (busybox ip cannot name it: the kernel calls it
    # veth0) in a network namespace of its own: pings cross the pair, and
    # their replies cross it back.
    insmod /lib/ctvm/veth.ko && ip link add v0 type veth
    unshare -n sleep 600 &
    peer=$!
    while [ "$(readlink /proc/$peer/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do usleep 1000; done
    ip link set veth0 netns $peer && nsenter -t $peer -n sh -c 'ip addr add 10.9.0.2/24 dev veth0 && ip link set veth0 up' \
        && ip addr add 10.9.0.1/24 dev v0 && ip link set v0 up
    replies=$(ping -c 10 -i 0.002 -W 2 10.9.0.2 | sed -n 's/^.* \([0-9]*\) packets received.*$/\1/p')
    say "veth: tx packets $(cat /sys/class/net/v0/statistics/tx_packets), peer rx packets $(nsenter -t $peer -n cat /proc/net/dev | sed -n 's/^ *veth0: *//p' | awk '{ print $2 }'), replies ${replies:-0}"
    kill $peer
    insmod /lib/ctvm/calls.ko loops=2000 && say "calls: $(last calls)"
    # References to the kernel's objects, taken by inline helpers in its own code.
    insmod /lib/ctvm/refs.ko && say "refs: $(last refs)"

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
    if insmod /lib/ctvm/atk_huge.ko 2>/dev/null; then say "FAIL: atk_huge loaded"; else say "atk_huge refused: $(dmesg | grep 'ctvm: module atk_huge not loaded' | tail -n 1 | sed 's/^.*ctvm: //')"; fi
    attack atk_msrio
    # One attack on the first CPU, one on the last (CR0.WP's guard must
    # reach a CPU other than the one that locked).
    cpus=1 attack atk_syscall table=$(sym sys_call_table)
    attack atk_idt idt=$(sym idt_table)
    attack atk_text
    cpus=$(printf '%x' $((1 << ($(nproc) - 1)))) attack atk_wp rodata=$(sym linux_banner)
    attack atk_call hidden=$(sym __x64_sys_getpid)
    attack atk_dkom
    # Hiding as rootkits do, and staying loaded: the list must stay whole.
    attack atk_hide
    say "atk_hide: $(grep -c '^atk_hide ' /proc/modules) in /proc/modules"
    rmmod atk_hide && say "atk_hide removed: $(grep -c '^atk_hide ' /proc/modules) left"
    attack atk_ftrace target=$(sym __x64_sys_getpid)
    attack atk_setmem rodata=$(sym linux_banner) set_memory_rw_addr=$(sym set_memory_rw)
    # The agent's own symbols, from one more pass over kallsyms.
    awk '$4 == "[ctvm_agent]" { print $3 " 0x" $1 }' /proc/kallsyms > /tmp/agent_symbols
    attack atk_agent target=$(awk '$1 == "tracked_modules" { print $2; exit }' /tmp/agent_symbols)
    attack atk_agentcall ctvm_call=$(awk '$1 ~ /^ctvm_call/ { print $2; exit }' /tmp/agent_symbols)
    # Kernel APIs outside the allow-list (ctvm.api), one dangerous group each.
    attack atk_umh
    if [ -e /tmp/ctvm_umh_ran ]; then say "FAIL: atk_umh: a root user program ran"; else say "atk_umh: no user program ran"; fi
    attack atk_skey key=$(sym sched_schedstats)
    attack atk_ftdirect target=$(sym __x64_sys_getpid)
    attack atk_tp tp=$(sym __tracepoint_sched_process_exec)
    attack atk_file
    if [ -e /tmp/ctvm_file_written ]; then say "FAIL: atk_file: the file was created"; else say "atk_file: no file created"; fi
    attack atk_bpf
    # Data-only attacks on the kernel's own data and objects.
    attack atk_kdata modprobe=$(sym modprobe_path) core=$(sym core_pattern)
    say "modprobe path now: $(cat /proc/sys/kernel/modprobe), core pattern: $(cat /proc/sys/kernel/core_pattern)"
    # The agent's own hook: the probe list the kernel calls it through at
    # every fork lies in the heap.
    attack atk_probes tp=$(sym __tracepoint_task_newtask)
    # Per-CPU control data: the syscall entry's stack pointer, the TSS's
    # interrupt stack pointers (6.1 keeps the first in a per-CPU variable
    # of its own; 6.2+ in pcpu_hot, which the module finds itself).
    top=$(sym cpu_current_top_of_stack)
    attack atk_percpu top=${top:-0}
    attack atk_cred jar=$(sym cred_jar)
    attack atk_tasks
    attack atk_procfs root=$(sym proc_root) 3</proc/modules
    attack atk_sysfs
    attack atk_mount
    # A process in a user and network namespace of its own, unmapped.
    unshare -U -n sleep 600 &
    jail=$!
    while [ "$(readlink /proc/$jail/ns/user)" = "$(readlink /proc/self/ns/user)" ]; do usleep 1000; done
    attack atk_ns pid=$jail
    kill $jail
    attack atk_free jar=$(sym cred_jar)
    say "processes listed: $(ls -d /proc/[0-9]* | wc -l)"
    # The same, racing the check: a thread on the other CPU changes the
    # format sscanf was judged by while the kernel runs it (from CPU 0).
    cpus=1 attack atk_toctou modprobe=$(sym modprobe_path)
    attack atk_deputy modprobe=$(sym modprobe_path)
    say "after atk_deputy: modprobe path $(cat /proc/sys/kernel/modprobe), $(ls -d /sys/module/ifb 2>/dev/null | wc -l) ifb in /sys/module"
    attack atk_lookup kln=$(sym kallsyms_lookup_name)
    # A call carried past its judgement by the trap flag's single-step trap.
    attack atk_trap kln=$(sym kallsyms_lookup_name)
    # Kernel frames on the stacks: its caller's, a sleeping task's.
    attack atk_stack text_lo=$(sym _stext) text_hi=$(sym _etext)
    # A task younger than the hypervisor's last walk: its resume address.
    attack atk_young
    # The interrupt and exception stacks, which no task owns (6.1 keeps the
    # interrupt stack's pointer in a per-CPU variable of its own; 6.2+ in
    # pcpu_hot, which the module finds itself).
    irq_ptr=$(sym hardirq_stack_ptr)
    attack atk_irqstack irq_ptr=${irq_ptr:-0}
    # Page tables: the kernel's, this process's, and a CR3 of its own.
    attack atk_pgtable
    # A process forked after the last walk: its top-level table, listed but
    # untyped, written by a module that waited for it on pgd_list.
    # (The processes outlive the module's wait, so that none reuses the
    # table page of one the module saw at its start.)
    insmod /lib/ctvm/atk_newpgd.ko list=$(sym pgd_list) 2>/dev/null &
    loading=$!
    while kill -0 $loading 2>/dev/null; do sh -c 'sleep 3' & usleep 100000; done
    say "attack $(last atk_newpgd)"
    rmmod atk_newpgd
    # A forged interrupt frame, and shellcode the kernel is handed to call.
    attack atk_iret hidden=$(sym __x64_sys_getpid) handler=$(sym asm_exc_int3)
    # A jump to a kernel instruction with an exception-table fixup: the
    # refusal's #GP must be the module's, not the kernel's to fix up.
    attack atk_extable table_start=$(sym __start___ex_table) table_end=$(sym __stop___ex_table) fn=$(sym __get_user_1) fn_end=$(sym __get_user_2)
    attack atk_wx set_memory_x_addr=$(sym set_memory_x)
    # A module that attacked is quarantined: the callback it handed the
    # kernel is refused from then on, and rmmod still unloads it.
    attack atk_quar table=$(sym sys_call_table)
    if out=$(cat /proc/ctvm_quar 2>&1); then say "atk_quar: callback read gave: $out"; else say "atk_quar: callback refused ($out)"; fi
    rmmod atk_quar && say "atk_quar removed: $(grep -c '^atk_quar ' /proc/modules) left, $(ls /proc/ctvm_quar 2>/dev/null | wc -l) proc file, exit $(dmesg | grep -q 'atk_quar: exit ran' && echo ran || echo 'did not run')"

    # A burst of refused writes: every one is a record, none lost.
    before=$(recorded)
    attack atk_burst table=$(sym sys_call_table) count=1500
    drained $((before + 1500))
    after=$(recorded)
    if [ $((after - before)) -ge 1500 ]; then say "burst: every refused write recorded"; else say "FAIL: burst: $((after - before)) records for 1500 writes"; fi

    # The agent cannot be unloaded.
    if rmmod ctvm_agent 2>/dev/null; then say "FAIL: the agent was unloaded"; else say "agent unload refused"; fi
    say "kernel still works: $(uname -r), $(ls /lib/ctvm | wc -l) files"
    say "violations recorded: $(head -n 1 /proc/ctvm_violations)"
    say "violation records lost: $(head -n 1 /proc/ctvm_violations | sed 's/.*lost=//')"
}

# ctvm.tpm: print what the harness checks about the vTPM: the PCRs, the
# firmware event log (hex), IMA's measurement list, and random bytes from
# the TPM through /dev/tpm0.
tpm_tests() {
    T=/sys/class/tpm/tpm0
    [ -e $T ] || { say "FAIL: no /sys/class/tpm/tpm0"; return; }
    say "tpm: $(cat $T/device/description 2>/dev/null) $(grep -h 'TCG version' $T/device/caps 2>/dev/null)"
    # ctvm.ima=files: measure every file root reads (the built-in policies skip
    # the initramfs' filesystem), then read some: each is an Extend of PCR 10.
    if [ "$(cmdline_value ctvm.ima)" = files ]; then
        # (Not proc, sysfs or securityfs: reading the PCRs and the lists
        # below must not extend PCR 10 behind the test's back.)
        printf '%s\n' "dont_measure fsmagic=0x9fa0" "dont_measure fsmagic=0x62656572" \
            "dont_measure fsmagic=0x73636673" "measure func=FILE_CHECK mask=MAY_READ uid=0" \
            > /sys/kernel/security/ima/policy || say "FAIL: IMA policy refused"
    fi
    t0=$(now_ns); cat /lib/ctvm/*.ko /bin/busybox > /dev/null; t1=$(now_ns)
    say "read $(ls /lib/ctvm/*.ko | wc -l) modules and busybox in $(( (t1 - t0) / 1000 )) us"
    grep -E '^PCR-(08|09|10):' $T/device/pcrs | while read -r line; do say "pcr $line"; done
    say "bios log: $(hexdump -v -e '1/1 "%02x"' /sys/kernel/security/tpm0/binary_bios_measurements)"
    while read -r line; do say "ima: $line"; done < /sys/kernel/security/ima/ascii_runtime_measurements
    exec 3<>/dev/tpm0
    printf '\000\301\000\000\000\016\000\000\000\106\000\000\000\040' >&3
    say "tpm random: $(dd bs=4096 count=1 <&3 2>/dev/null | hexdump -v -e '1/1 "%02x"')"
    exec 3>&-
    # /dev/hwrng from the vTPM: this kernel lacks CONFIG_HW_RANDOM_TPM, so
    # CTVM's ctvm_tpm_rng module registers the same glue. Two reads of 32 bytes.
    insmod /lib/ctvm/ctvm_tpm_rng.ko
    if [ "$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)" = ctvm-tpm-rng ]; then
        say "hwrng ctvm-tpm-rng: $(head -c 32 /dev/hwrng | hexdump -v -e '1/1 "%02x"') $(head -c 32 /dev/hwrng | hexdump -v -e '1/1 "%02x"')"
    else
        say "FAIL: hwrng is $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null) of $(cat /sys/class/misc/hw_random/rng_available 2>/dev/null)"
    fi
    rmmod ctvm_tpm_rng
    say "tpm tests done: $(wc -l < /sys/kernel/security/ima/ascii_runtime_measurements) IMA measurements, uptime $(cut -d' ' -f1 /proc/uptime) s"
}

# ctvm.durable: the durable-vTPM scenario, four boots on one disk
# (/dev/sda, mounted at /boot) that keeps the vTPM's sealed state between
# them. What to do comes from the disk (/boot/ctvm/test/phase, written by
# the harness between boots), so the kernel's command line, and PCR 8,
# stay the same. The store service writes the state blob to
# /boot/ctvm/linux.vtpm, where GRUB finds it at the next boot.
durable_tests() {
    for m in scsi_common scsi_mod libata ata_piix sd_mod; do
        insmod /lib/ctvm/disk/$m.ko || say "FAIL: insmod $m"
    done
    n=0
    while [ ! -b /dev/sda ] && [ $n -lt 30 ]; do sleep 1; n=$((n + 1)); done
    mkdir -p /boot
    mount -t ext4 /dev/sda /boot || { say "FAIL: the disk does not mount"; return; }
    T=/boot/ctvm/test
    phase=$(cat $T/phase)
    if [ -e /dev/tpm0 ]; then tpm=present; else tpm="absent ($(dmesg | grep -i 'tpm' | tail -n 2 | tr '\n' ' '))"; fi
    say "durable phase $phase; tpm0 $tpm"
    # The rollback boot is also the attack of a root that keeps the agent
    # from loading (integrity=enforce, no module isolation): its quote
    # must be rejected for that.
    if [ "$phase" = rollback ]; then say "agent kept from loading"; else load_agent; fi
    # Evidence for the verifier, right after the quote (before any other
    # file is read, which IMA would measure into PCR 10). The event log as
    # CTVM keeps it, through the agent (binary_bios_measurements is Linux's
    # copy from its TPM driver's probe, before the lock event); without the
    # agent, Linux's copy.
    evidence() {
        cp /proc/ctvm_event_log $T/log 2>/dev/null || cp /sys/kernel/security/tpm0/binary_bios_measurements $T/log
        cp /sys/kernel/security/ima/ascii_runtime_measurements $T/ima
    }
    case $phase in
    provision | check)
        /bin/ctvm-vtpm-store -d /boot/ctvm &
        store=$!
        if [ "$phase" = provision ]; then
            /bin/ctvm-tpm provision $T /boot/ctvm/linux.vtpm /boot/ctvm/linux.vtpm.before-last-write \
                || say "FAIL: ctvm-tpm provision"
        else
            /bin/ctvm-tpm check $T || say "FAIL: ctvm-tpm check"
            evidence
            # A corrupted copy of the newest blob, for the last boot: one bit
            # flipped in its ciphertext.
            cp /boot/ctvm/linux.vtpm /boot/ctvm/linux.vtpm.corrupt
            b=$(dd if=/boot/ctvm/linux.vtpm.corrupt bs=1 skip=100 count=1 2>/dev/null | hexdump -v -e '1/1 "%u"')
            printf "\\$(printf %o $((b ^ 4)))" | dd of=/boot/ctvm/linux.vtpm.corrupt bs=1 seek=100 conv=notrunc 2>/dev/null
            say "corrupted copy: $(cmp -l /boot/ctvm/linux.vtpm /boot/ctvm/linux.vtpm.corrupt | wc -l) byte differs"
        fi
        kill $store
        ;;
    rollback)
        /bin/ctvm-tpm nv
        /bin/ctvm-tpm quote $T || say "FAIL: ctvm-tpm quote"
        evidence
        ;;
    corrupt)
        /bin/ctvm-tpm nv
        ;;
    esac
    ls /boot/ctvm | while read -r f; do say "disk: $f $(wc -c < /boot/ctvm/$f 2>/dev/null)"; done
    sync
    umount /boot
}

if grep -qw ctvm.durable /proc/cmdline; then
    durable_tests
fi

if grep -qw ctvm.tpm /proc/cmdline; then
    tpm_tests
fi

if grep -qw ctvm.integrity /proc/cmdline; then
    integrity_tests
fi

if grep -qw ctvm.race /proc/cmdline; then
    race_tests
fi

# ctvm.audit (with integrity=audit for the guest): a module's call to a
# non-exported kernel function is reported and let through.
if grep -qw ctvm.audit /proc/cmdline; then
    load_agent
    insmod /lib/ctvm/atk_setmem.ko rodata=$(sym linux_banner) set_memory_rw_addr=$(sym set_memory_rw) 2>/dev/null
    say "audit $(dmesg | grep 'ctvm-test: atk_setmem:' | tail -n 1 | sed 's/^.*ctvm-test: //')"
    # Shellcode the kernel is handed, once the guest's NX is lifted: CTVM's
    # W^X across views reports the kernel's fetch (and audit lets it run).
    insmod /lib/ctvm/atk_wx.ko set_memory_x_addr=$(sym set_memory_x) 2>/dev/null
    say "audit $(last atk_wx)"
    # A flood of violations audit lets through: every one a record, the
    # console readable (repeats merged), the guest on time.
    before=$(recorded)
    insmod /lib/ctvm/atk_flood.ko target=$(sym modprobe_path) count=1500 2>/dev/null
    say "audit $(last atk_flood)"
    drained $((before + 1500))
    after=$(recorded)
    if [ $((after - before)) -ge 1500 ]; then say "audit flood: every write recorded"; else say "FAIL: audit flood: $((after - before)) records for 1500 writes"; fi
    say "audit records lost: $(head -n 1 /proc/ctvm_violations | sed 's/.*lost=//')"
fi

# ctvm.bench=agent|bare ctvm.loops=N: the cost of isolation on a module
# that calls into the kernel in a loop, with the agent (isolated) or without.
bench=$(cmdline_value ctvm.bench)
if [ -n "$bench" ]; then
    [ "$bench" = agent ] && load_agent
    insmod /lib/ctvm/calls.ko loops="$(cmdline_value ctvm.loops)"
    say "bench $bench: $(dmesg | grep 'ctvm-test: calls:' | tail -n 1 | sed 's/^.*ctvm-test: calls: //')"
    # Work that touches no isolated module, timed in guest nanoseconds
    # (Bochs' guest time counts emulated instructions: 200 M per second).
    measure() {
        t0=$(now_ns); sh -c "$2"; t1=$(now_ns)
        say "bench $bench workload $1: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", (b - a) / 1000 }') us"
    }
    measure pipe-64MiB 'dd if=/dev/zero bs=65536 count=1024 2>/dev/null | cat > /dev/null'
    measure pipe-switches-20000 'dd if=/dev/zero bs=1 count=20000 2>/dev/null | dd of=/dev/null bs=1 2>/dev/null'
    measure syscalls-100000 'dd if=/dev/zero of=/dev/null bs=1 count=50000 2>/dev/null'
fi

# ctvm.uattack: user space attacks the hypervisor's emulation once the
# agent has locked the layout (descriptor-table instructions then exit).
if grep -qw ctvm.uattack /proc/cmdline; then
    load_agent
    /bin/ctvm-uattack
    if uname -r > /dev/null && grep -q . /proc/version; then say "kernel still works after user attacks"; fi
fi

# ctvm.sipi: start the CPU the guest was not given, with INIT and start-up
# IPIs in both of the APIC's forms; this CPU must run on.
if grep -qw ctvm.sipi /proc/cmdline; then
    insmod /lib/ctvm/atk_sipi.ko target=1 2>/dev/null
    say "sipi $(dmesg | grep 'ctvm-test: atk_sipi:' | tail -n 1 | sed 's/^.*ctvm-test: //')"
    say "cpus after: $(grep -c ^processor /proc/cpuinfo), online $(cat /sys/devices/system/cpu/online)"
fi

# ctvm.poke=ADDR: write to a physical address the guest does not own (the
# hypervisor's memory); CTVM must stop the guest before the write lands.
poke=$(cmdline_value ctvm.poke)
if [ -n "$poke" ]; then
    say "poking $poke through /dev/mem"
    devmem "$poke" 32 0xdeadbeef
    say "FAIL: the write to $poke went through"
fi

if grep -qw ctvm.shell /proc/cmdline; then
    load_agent
    cat <<'EOT'

  CTVM: this Linux runs under the hypervisor with run-time integrity in
  enforce mode (the agent is loaded) and its own vTPM. Things to try:

    insmod /lib/ctvm/atk_syscall.ko table=0x$(awk '$3=="sys_call_table"{print $1}' /proc/kallsyms)
        an untrusted module hooks the syscall table: refused, reported
    ls /lib/ctvm                   more attack modules (atk_*.ko) and benign ones
    cat /proc/ctvm_violations      what the hypervisor refused, as the agent reads it
    cat /sys/class/tpm/tpm0/device/pcrs
                                   the vTPM's PCRs: 8 and 9 hold the measured launch
    hexdump -C /sys/kernel/security/tpm0/binary_bios_measurements | head
                                   the event log those PCRs replay from
    /bin/ctvm-uattack              user space attacking the hypervisor's emulation

  Lines starting with "ctvm:" are the hypervisor's; the guest's start with "[linux]".
  poweroff -f stops the machine.

EOT
    setsid cttyhack sh
fi
# The console is the hypervisor's: everything printed is out before power-off.
poweroff -f
