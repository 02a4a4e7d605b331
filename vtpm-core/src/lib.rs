//! A `no_std` + `alloc` TPM 1.2 engine (work in progress, see the README's status table).
#![no_std]
