//! The arch boundary of the mm core: every barrier and TLB maintenance
//! instruction that the page-table code issues goes through [`MmArch`].
//!
//! On the target, [`crate::arch::aarch64::HwMmArch`] issues the real
//! instructions. On the host, tests plug in a model (a store buffer and a TLB
//! simulation) or a counting stub. Keeping the boundary this narrow is what
//! lets the mm core be built and tested on the host, and what lets a test see a
//! missing DSB or TLBI, which QEMU's TCG never shows.
//!
//! Methods take `&self`: a hardware implementation is a zero-sized value, a
//! model keeps its state behind interior mutability.

/// A VMID: the tag that stage-2 TLB entries carry (8 bits unless
/// `ID_AA64MMFR1_EL1.VMIDBits` says 16).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub struct Vmid(pub u16);

/// Barriers and TLB maintenance used by the mm core.
///
/// The stage-2 `tlbi_*` operations act on the VMID passed in. On hardware they
/// use the VMID held in `VTTBR_EL2`; the hardware implementation checks that
/// the two agree (this hypervisor keeps the running guest's VTTBR installed
/// whenever it changes that guest's tables).
pub trait MmArch {
    /// `DSB ISHST`: completes earlier stores (page-table writes) so that the
    /// table walkers of all inner-shareable PEs observe them, and orders them
    /// before later TLB maintenance.
    fn dsb_ishst(&self);

    /// `DSB ISH`: waits for earlier TLB maintenance to complete on all
    /// inner-shareable PEs (and completes earlier stores).
    fn dsb_ish(&self);

    /// `ISB`: makes this PE's later instructions see the completed maintenance
    /// and table updates (context synchronization).
    fn isb(&self);

    /// `TLBI IPAS2E1IS`: drops stage-2-only entries for one 4 KiB IPA granule
    /// of `vmid`. Does not touch combined stage-1+2 entries.
    fn tlbi_ipas2e1is(&self, vmid: Vmid, ipa: u64);

    /// `TLBI RIPAS2E1IS` (FEAT_TLBIRANGE): drops stage-2-only entries for
    /// `pages` 4 KiB granules starting at `ipa`. The caller splits ranges that
    /// the instruction's encoding cannot express in one go.
    fn tlbi_ripas2e1is(&self, vmid: Vmid, ipa: u64, pages: u64);

    /// `TLBI VMALLE1IS`: drops all stage-1 entries of `vmid`, including combined
    /// stage-1+2 entries, which cannot be invalidated by IPA.
    fn tlbi_vmalle1is(&self, vmid: Vmid);

    /// `TLBI VMALLS12E1IS`: drops every stage-1 and stage-2 entry of `vmid`.
    fn tlbi_vmalls12e1is(&self, vmid: Vmid);

    /// `TLBI VAE2IS`: drops the EL2 entry for one 4 KiB page of the
    /// hypervisor's own map.
    fn tlbi_vae2is(&self, va: u64);

    /// `TLBI ALLE2IS`: drops every entry of the hypervisor's own map.
    fn tlbi_alle2is(&self);

    /// Whether FEAT_TLBIRANGE (`TLBI RIPAS2E1IS`) may be used.
    fn has_tlbi_range(&self) -> bool;

    /// Index of the executing CPU (for per-CPU lazy state), below
    /// [`crate::mm::lazy::MAX_CPUS`].
    fn cpu_id(&self) -> usize {
        0
    }

    /// Model hook, not an instruction: the hypervisor is about to access
    /// `va` through its EL2 map (`write` for a store). Hardware needs nothing
    /// here (a bad access faults by itself), so the default says yes; a model
    /// answers whether its simulated TLB and table walker would translate the
    /// access, so a missing barrier or TLBI shows up as `false`.
    fn el2_access_ok(&self, va: usize, write: bool) -> bool {
        let _ = (va, write);
        true
    }
}

/// An [`MmArch`] that does nothing: for host code that only needs the mm
/// core's bookkeeping (counters, table contents), not a barrier model.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopArch;

impl MmArch for NoopArch {
    fn dsb_ishst(&self) {}
    fn dsb_ish(&self) {}
    fn isb(&self) {}
    fn tlbi_ipas2e1is(&self, _vmid: Vmid, _ipa: u64) {}
    fn tlbi_ripas2e1is(&self, _vmid: Vmid, _ipa: u64, _pages: u64) {}
    fn tlbi_vmalle1is(&self, _vmid: Vmid) {}
    fn tlbi_vmalls12e1is(&self, _vmid: Vmid) {}
    fn tlbi_vae2is(&self, _va: u64) {}
    fn tlbi_alle2is(&self) {}
    fn has_tlbi_range(&self) -> bool {
        true
    }
}
