//! lazyhyp: an EL2 mini-hypervisor for AArch64 whose heart is a stage-2
//! page-table manager with a lazy-update batching mode.
//!
//! The crate is split along one boundary:
//! - portable code, built and unit-tested on the host: the mm core
//!   ([`mm`]), boot argument parsing ([`bootargs`]), the memory layout
//!   ([`layout`]), guest image loading ([`loader`]), exception syndrome
//!   decoding ([`esr`]), trap handling ([`vcpu`]), MMIO emulation
//!   ([`mmio`]) and the virtual GICv3 ([`vgic`]);
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
pub mod guest_mm;
pub mod layout;
pub mod linux;
pub mod loader;
pub mod mm;
pub mod mmio;
pub mod sysreg_emul;
pub mod vcpu;
pub mod vgic;
pub mod vm;
pub mod workloads;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod arch;
