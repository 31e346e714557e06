//! The mm core: stage-2 tables, the page pool, TLB maintenance and counters.
//!
//! Everything here builds and is unit-tested on the host. The only way out to
//! the hardware is the [`arch::MmArch`] trait (barriers and TLBIs); the
//! translation tables themselves are built with aarch64-paging.

pub mod arch;
pub mod counters;
pub mod lazy;
#[cfg(any(test, feature = "model"))]
pub mod model;
pub mod pool;
#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod smp_scenarios;
pub mod stage2;
#[cfg(any(test, feature = "model"))]
pub mod testkit;

/// A physical address (or, on the host, the address of memory standing in
/// for one).
pub type PhysAddr = usize;

/// An intermediate physical address: what a guest at EL1 believes is physical.
pub type Ipa = u64;

/// The translation granule: 4 KiB.
pub const PAGE_SIZE: usize = 4096;

/// Size of a level-2 block with a 4 KiB granule.
pub const BLOCK_2M: usize = 2 << 20;

/// Size of a level-1 block with a 4 KiB granule.
pub const BLOCK_1G: usize = 1 << 30;

/// Rounds `x` up to a multiple of `align` (a power of two).
#[must_use]
pub const fn align_up(x: usize, align: usize) -> usize {
    (x + align - 1) & !(align - 1)
}

/// Rounds `x` down to a multiple of `align` (a power of two).
#[must_use]
pub const fn align_down(x: usize, align: usize) -> usize {
    x & !(align - 1)
}
