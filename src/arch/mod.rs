//! The thin boundary to the hardware: everything that only exists on
//! AArch64 at EL2. Nothing outside this module issues an instruction the host
//! cannot run.

pub mod aarch64;
