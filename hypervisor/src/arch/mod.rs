//! Architecture-specific code. Only x86-64 with VT-x exists today.
pub mod x86_64;
