//! Data cache maintenance by address.

/// Cache line size of the smallest data cache, from `CTR_EL0.DminLine`.
pub(crate) fn dcache_line() -> usize {
    let ctr = super::sysreg::read_sysreg!("ctr_el0");
    4 << ((ctr >> 16) & 0xf)
}

/// The hardware's cache maintenance for [`crate::coherency`], counted in
/// the exit counters (`cmo_lines`, `icache_invalidations`).
#[derive(Debug, Default)]
pub struct HwCacheOps;

impl crate::coherency::CacheOps for HwCacheOps {
    fn clean_invalidate_to_poc(&self, pa: crate::mm::PhysAddr, len: usize) {
        let line = dcache_line();
        // The EL2 map is an identity map: the physical address is the VA
        // `DC CIVAC` takes.
        let (mut addr, end) = (pa.align_down(line).0, pa.0 + len);
        let mut lines = 0;
        while addr < end {
            // SAFETY: clean+invalidate by VA only moves data between cache
            // and memory; the range is guest RAM backing, mapped in the EL2
            // map (the caller's range is inside it).
            unsafe {
                core::arch::asm!("dc civac, {0}", in(reg) addr, options(nostack, preserves_flags));
            }
            addr += line;
            lines += 1;
        }
        // SAFETY: a barrier: the maintenance completes (the data is at the
        // point of coherency for every observer in the inner shareable
        // domain, a Non-cacheable guest view included) before what follows.
        unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
        crate::mm::counters::add(&super::exits().cmo_lines, lines);
    }

    fn invalidate_icache(&self) {
        // CTR_EL0.DIC (bit 29): instruction caches are coherent with data
        // to the point of unification; no invalidation is needed, only the
        // barriers that order the data writes before the guest's fetches.
        if super::sysreg::read_sysreg!("ctr_el0") & (1 << 29) != 0 {
            // SAFETY: barriers only.
            unsafe { core::arch::asm!("dsb ish", "isb", options(nostack, preserves_flags)) };
            return;
        }
        // SAFETY: barriers and I-cache invalidation change no state Rust
        // sees.
        unsafe {
            core::arch::asm!(
                // Earlier data writes (and cleans) complete before the
                // invalidation, so no CPU refetches stale instructions.
                "dsb ish",
                "ic ialluis",
                // The invalidation completes everywhere, and this PE
                // refetches, before the ERET into the guest.
                "dsb ish",
                "isb",
                options(nostack, preserves_flags),
            );
        }
        crate::mm::counters::inc(&super::exits().icache_invalidations);
    }
}
