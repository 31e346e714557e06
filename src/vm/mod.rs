//! The VM layer: what a VM and its vCPUs are, independent of the CPU that
//! runs them. Portable and host-tested; `arch::aarch64` drives it.
//!
//! - [`config`]: which VMs run, on which physical CPUs, with how much RAM;
//! - [`psci`]: each vCPU's power state (`CPU_ON`, `CPU_OFF`,
//!   `AFFINITY_INFO`);
//! - [`vcpu`]: decoding a vCPU's synchronous exit into what to do (SMCCC and
//!   PSCI calls, aborts, system registers), exception injection, the crash
//!   report;
//! - [`sysreg_emul`]: trapped system registers (sanitised ID view, debug
//!   RAZ/WI, set/way);
//! - [`guest_mm`]: guest memory (demand faults, fault-around, given-back
//!   pages, the memory hypercalls' batches);
//! - [`mmio`]: the MMIO device trait, access decoding, the emulated PL011;
//! - [`vgic`]: the virtual GICv3 (distributor and redistributors as MMIO
//!   devices, list-register scheduling);
//! - [`loader`], [`linux`]: guest images (the test guest's ELF; an arm64
//!   Image and its device tree).

pub mod config;
pub mod guest_mm;
pub mod linux;
pub mod loader;
pub mod mmio;
pub mod psci;
pub mod sysreg_emul;
pub mod vcpu;
pub mod vgic;
