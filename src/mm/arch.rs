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
/// The stage-2 `tlbi_*` operations act on the VMID passed in. On hardware
/// they use the VMID held in `VTTBR_EL2`; the hardware implementation
/// installs the asked VMID's `VTTBR_EL2` (registered with
/// [`stage2_root`](MmArch::stage2_root)) around a TLBI for a VMID other than
/// the installed one, and restores it after, as KVM's
/// `__tlb_switch_to_guest`/`__tlb_switch_to_host` do.
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

    /// `TLBI IPAS2E1IS`: drops stage-2-only entries of `vmid` used to
    /// translate `ipa` (a leaf of any size containing it), and the stage-2
    /// walk-cache entries for it. Does not touch combined stage-1+2 entries.
    ///
    /// `ttl` is the FEAT_TTL hint: the level (1..=3) of the leaf entries to
    /// drop, or `None` for any level. A hint that does not match the cached
    /// entry's level may leave it cached; pass `None` when unsure (table
    /// removals always do). Ignored where FEAT_TTL is absent.
    fn tlbi_ipas2e1is(&self, vmid: Vmid, ipa: u64, ttl: Option<u8>);

    /// `TLBI IPAS2LE1IS`: as [`tlbi_ipas2e1is`](Self::tlbi_ipas2e1is) but
    /// leaf entries only: walk-cache (table) entries stay cached, so it must
    /// never be used after removing a table entry.
    fn tlbi_ipas2le1is(&self, vmid: Vmid, ipa: u64, ttl: Option<u8>);

    /// `TLBI RIPAS2E1IS` (FEAT_TLBIRANGE): drops stage-2-only entries (and
    /// walk-cache entries) for `pages` 4 KiB granules starting at `ipa`.
    /// The caller splits ranges that the instruction's encoding cannot
    /// express in one go. `ttl` as for `tlbi_ipas2e1is`.
    fn tlbi_ripas2e1is(&self, vmid: Vmid, ipa: u64, pages: u64, ttl: Option<u8>);

    /// `TLBI RIPAS2LE1IS`: the leaf-only form of
    /// [`tlbi_ripas2e1is`](Self::tlbi_ripas2e1is).
    fn tlbi_ripas2le1is(&self, vmid: Vmid, ipa: u64, pages: u64, ttl: Option<u8>);

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

    /// Bits of VMID in effect (8, or 16 with FEAT_VMID16 and
    /// `VTCR_EL2.VS`). A [`Vmid`] that does not fit is refused.
    fn vmid_bits(&self) -> u32 {
        8
    }

    /// `vmid`'s stage-2 tables now have the root `root` (`Some`), or are
    /// about to be freed (`None`, after the VMID's invalidation completed).
    /// Hardware keeps the `VTTBR_EL2` value of each VMID so that a TLBI for
    /// a VMID other than the installed one can install it for the TLBI; a
    /// model registers the root for its walkers and checks the root is not
    /// freed while registered.
    fn stage2_root(&self, vmid: Vmid, root: Option<usize>) {
        let _ = (vmid, root);
    }

    /// Model hook, not an instruction: the page-table page `pa` is about to
    /// go back to the pool. Hardware needs nothing; a model checks that no
    /// live table, cached walk or pending TLBI still refers to it.
    fn table_page_freed(&self, pa: usize) {
        let _ = pa;
    }

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
    fn tlbi_ipas2e1is(&self, _vmid: Vmid, _ipa: u64, _ttl: Option<u8>) {}
    fn tlbi_ipas2le1is(&self, _vmid: Vmid, _ipa: u64, _ttl: Option<u8>) {}
    fn tlbi_ripas2e1is(&self, _vmid: Vmid, _ipa: u64, _pages: u64, _ttl: Option<u8>) {}
    fn tlbi_ripas2le1is(&self, _vmid: Vmid, _ipa: u64, _pages: u64, _ttl: Option<u8>) {}
    fn tlbi_vmalle1is(&self, _vmid: Vmid) {}
    fn tlbi_vmalls12e1is(&self, _vmid: Vmid) {}
    fn tlbi_vae2is(&self, _va: u64) {}
    fn tlbi_alle2is(&self) {}
    fn has_tlbi_range(&self) -> bool {
        true
    }
}
