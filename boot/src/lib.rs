//! The first instructions of CTVM.
//!
//! GRUB loads the hypervisor image as a multiboot2 kernel (or tboot loads
//! it as a multiboot 1 kernel) and jumps to [`ctvm_entry32`] in 32-bit
//! protected mode with paging off. This crate
//! carries everything that has to happen before Rust code can run: the
//! multiboot2 header, a check that the CPU has long mode, page tables that
//! identity-map the first 4 GiB with 2 MiB pages, the switch to long mode, and
//! the call into the hypervisor's `ctvm_main(magic, info)`.
//!
//! The image is linked at 2 MiB by `linker.ld`, physical = virtual. The
//! hypervisor later replaces these tables with its own.
#![no_std]

/// The multiboot2 magic GRUB leaves in EAX.
pub const MULTIBOOT2_BOOTLOADER_MAGIC: u32 = 0x36d7_6289;
/// The multiboot 1 magic (GRUB's `multiboot`, and tboot after it).
pub const MULTIBOOT1_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;

/// Size of the boot stack the hypervisor starts on.
pub const BOOT_STACK_SIZE: usize = 128 * 1024;

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .set MB2_MAGIC, 0xE85250D6
    .set MB2_ARCH_I386, 0

    .section .multiboot2_header, "a"
    .balign 8
mb2_header_start:
    .long MB2_MAGIC
    .long MB2_ARCH_I386
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - MB2_MAGIC - MB2_ARCH_I386 - (mb2_header_end - mb2_header_start)

    // Information we cannot boot without: command line, modules, memory map.
    .balign 8
    .short 1, 0
    .long 8 + 4 * 3
    .long 1, 3, 6

    // Information we use when the firmware has it: the ACPI RSDP (old, new).
    .balign 8
    .short 1, 1
    .long 8 + 4 * 2
    .long 14, 15

    // Page-aligned modules, so guest images can be mapped in place.
    .balign 8
    .short 6, 0
    .long 8

    .balign 8
    .short 0, 0
    .long 8
mb2_header_end:

    // Multiboot 1 as well, for tboot: GRUB loads tboot with `multiboot`
    // (its `multiboot2` path loses modules and crashes GRUB under Bochs),
    // and tboot hands the kernel the protocol it was given. Flags: modules
    // page aligned (bit 0), memory information (bit 1); the ELF header
    // gives the load addresses.
    .set MB1_MAGIC, 0x1BADB002
    .set MB1_FLAGS, 0x3
    .balign 4
    .long MB1_MAGIC
    .long MB1_FLAGS
    .long 0x100000000 - MB1_MAGIC - MB1_FLAGS

    .section .text.boot32, "ax"
    .code32
    .global ctvm_entry32
ctvm_entry32:
    cli
    cld
    mov esp, offset boot_stack_top
    mov edi, eax                    // multiboot2 magic, first argument of ctvm_main
    mov esi, ebx                    // multiboot2 information, second argument

    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb no_long_mode
    mov eax, 0x80000001
    cpuid
    test edx, 1 << 29
    jz no_long_mode

    // 2048 entries of 2 MiB: the first 4 GiB, RAM and MMIO alike.
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83                    // present, writable, 2 MiB page
    mov [boot_pd + ecx * 8], eax
    mov edx, ecx
    shr edx, 11
    mov [boot_pd + ecx * 8 + 4], edx
    inc ecx
    cmp ecx, 2048
    jne 2b

    mov eax, offset boot_pd
    or eax, 3
    xor ecx, ecx
3:
    mov [boot_pdpt + ecx * 8], eax
    add eax, 4096
    inc ecx
    cmp ecx, 4
    jne 3b

    mov eax, offset boot_pdpt
    or eax, 3
    mov [boot_pml4], eax

    mov eax, cr4
    or eax, 1 << 5                  // PAE
    mov cr4, eax
    mov eax, offset boot_pml4
    mov cr3, eax
    mov ecx, 0xC0000080             // IA32_EFER
    rdmsr
    or eax, 1 << 8                  // LME
    wrmsr
    mov eax, cr0
    or eax, (1 << 31) | (1 << 16) | 1   // PG, WP, PE
    mov cr0, eax

    lgdt [boot_gdt_ptr]
    push 0x08
    mov eax, offset long_mode_entry
    push eax
    retf

no_long_mode:
    mov esi, offset no_long_mode_msg
4:
    mov al, [esi]
    test al, al
    jz 6f
    mov dx, 0x3FD
5:
    in al, dx
    test al, 0x20
    jz 5b
    mov al, [esi]
    mov dx, 0x3F8
    out dx, al
    inc esi
    jmp 4b
6:
    cli
    hlt
    jmp 6b

    .code64
long_mode_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    // The upper halves of the registers are undefined after the mode switch.
    mov edi, edi
    mov esi, esi
    mov rsp, offset boot_stack_top
    xor ebp, ebp                    // ends the frame-pointer chain for backtraces
    call ctvm_main
7:
    cli
    hlt
    jmp 7b

    .section .rodata.boot32, "a"
    .balign 8
    // The accessed bits are set: the processor would otherwise set them
    // itself when the segments are loaded, writing into read-only data the
    // hypervisor measures (its image digest in PCR 11).
boot_gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF        // 0x08: 64-bit code
    .quad 0x00CF93000000FFFF        // 0x10: data
boot_gdt_ptr:
    .short boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt
no_long_mode_msg:
    .asciz "CTVM: this CPU has no long mode (CPUID 0x80000001 EDX bit 29); halting.\r\n"

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
    .balign 16
    .global boot_stack_bottom
boot_stack_bottom:
    .skip {stack_size}
    .global boot_stack_top
boot_stack_top:
    "#,
    stack_size = const BOOT_STACK_SIZE,
);

/// The physical range the loaded image occupies, bss included.
#[cfg(target_os = "none")]
pub fn image_range() -> core::ops::Range<u64> {
    extern "C" {
        static __image_start: u8;
        static __image_end: u8;
    }
    // Only the addresses of the linker.ld symbols are taken.
    (core::ptr::addr_of!(__image_start) as u64)..(core::ptr::addr_of!(__image_end) as u64)
}

/// The image's code and read-only data as loaded: the bytes of its two
/// read-only ELF segments, which nothing writes at run time. The
/// hypervisor's measurement of itself (SHA-256 over both, in order) is
/// what `cargo xtask` computes from the ELF file's read-only PT_LOAD
/// segments.
#[cfg(target_os = "none")]
pub fn readonly_ranges() -> [core::ops::Range<u64>; 2] {
    extern "C" {
        static __image_start: u8;
        static __text_end: u8;
        static __rodata_start: u8;
        static __rodata_end: u8;
    }
    // Only the addresses of the linker.ld symbols are taken.
    let at = |s: *const u8| s as u64;
    [
        at(core::ptr::addr_of!(__image_start))..at(core::ptr::addr_of!(__text_end)),
        at(core::ptr::addr_of!(__rodata_start))..at(core::ptr::addr_of!(__rodata_end)),
    ]
}

/// The boot stack, for the hypervisor's fault handler to tell a stack overflow.
#[cfg(target_os = "none")]
pub fn boot_stack() -> core::ops::Range<u64> {
    extern "C" {
        static boot_stack_bottom: u8;
        static boot_stack_top: u8;
    }
    // Only the addresses of the symbols defined in the assembly above are taken.
    (core::ptr::addr_of!(boot_stack_bottom) as u64)..(core::ptr::addr_of!(boot_stack_top) as u64)
}
