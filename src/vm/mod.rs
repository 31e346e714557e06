//! The VM layer: what a VM and its vCPUs are, independent of the CPU that
//! runs them. Portable and host-tested.

pub mod config;
pub mod psci;
