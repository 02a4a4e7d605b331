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
