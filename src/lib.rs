//! lazyhyp: an EL2 mini-hypervisor for AArch64 whose heart is a stage-2
//! page-table manager with a lazy-update batching mode.
//!
//! The crate is split along one boundary:
//! - portable code, built and unit-tested on the host: the mm core
//!   ([`mm`], usable as a library by another hypervisor), the VM layer
//!   ([`vm`]: vCPU trap decoding and PSCI, guest memory, the emulated
//!   devices behind one MMIO trait, the virtual GICv3, guest images, the VM
//!   configuration), boot argument parsing ([`bootargs`]), the memory
//!   layout ([`layout`]), exception syndrome decoding ([`esr`]), the EL2
//!   trap controls ([`el2_controls`]) and guest-memory coherency
//!   ([`coherency`]);
//! - [`arch`]: everything that only exists on AArch64 at EL2 (boot, vectors,
//!   system registers, the console), compiled only for the
//!   bare-metal target.

#![cfg_attr(not(test), no_std)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod bootargs;
pub mod coherency;
pub mod el2_controls;
pub mod esr;
pub mod layout;
pub mod mm;
pub mod vm;
pub mod workloads;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod arch;
