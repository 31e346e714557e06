//! Event counters of the mm core, printed by the hypervisor at exit as
//! `key=value` pairs (the `LAZYHYP-STATS` line) and read by tests and
//! benchmarks.
//!
//! Counters are relaxed atomics: they count events, they order nothing.

use core::sync::atomic::{AtomicU64, Ordering};

/// Declares a counter set: a struct of `AtomicU64` fields with a doc line
/// each, plus iteration over `(name, value)` in declaration order.
#[macro_export]
macro_rules! counter_set {
    ($(#[$meta:meta])* $vis:vis struct $ty:ident { $($(#[doc = $doc:literal])* $field:ident,)* }) => {
        $(#[$meta])*
        #[derive(Debug)]
        $vis struct $ty {
            $($(#[doc = $doc])* pub $field: core::sync::atomic::AtomicU64,)*
        }

        impl $ty {
            /// All counters at zero.
            #[must_use]
            pub const fn new() -> Self {
                Self { $($field: core::sync::atomic::AtomicU64::new(0),)* }
            }

            /// Calls `f` with each counter's name and current value, in
            /// declaration order.
            pub fn for_each(&self, mut f: impl FnMut(&'static str, u64)) {
                $(f(stringify!($field), self.$field.load(core::sync::atomic::Ordering::Relaxed));)*
            }

            /// Sets every counter back to zero.
            pub fn reset(&self) {
                $(self.$field.store(0, core::sync::atomic::Ordering::Relaxed);)*
            }
        }

        impl Default for $ty {
            fn default() -> Self {
                Self::new()
            }
        }
    };
}

/// Adds `n` to a counter.
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Adds one to a counter.
#[inline]
pub fn inc(counter: &AtomicU64) {
    add(counter, 1);
}

/// Subtracts `n` from a gauge-like counter (such as pages currently mapped).
#[inline]
pub fn sub(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n, Ordering::Relaxed);
}

counter_set! {
    /// What the mm core did: table changes, barriers, TLB maintenance, pool use.
    pub struct MmCounters {
        /// Map operations that succeeded (one per call, whatever its size).
        mappings,
        /// 4 KiB pages currently mapped in stage 2 (a 2 MiB block counts 512).
        pages_mapped,
        /// Block (2 MiB or 1 GiB) leaf entries written by map operations.
        blocks_mapped,
        /// Descriptor writes made by the mm core.
        pte_writes,
        /// Lazy sections entered (outermost).
        sections,
        /// `enter` while a section was already active.
        nests,
        /// Nested `enter` under the `Flatten` policy (a caller bug).
        nest_warnings,
        /// Allocator updates run in a paused section (`Flatten`).
        flattenings,
        /// Break-before-make cycles (break, invalidate, make).
        bbm,
        /// Blocks split into smaller entries.
        splits,
        /// Tables of uniform entries merged back into a block.
        merges,
        /// `DSB ISHST` issued.
        dsb_ishst,
        /// `DSB ISH` issued.
        dsb_ish,
        /// `ISB` issued.
        isb,
        /// `TLBI IPAS2E1IS` issued.
        tlbi_ipas2e1is,
        /// `TLBI RIPAS2E1IS` issued.
        tlbi_ripas2e1is,
        /// `TLBI VMALLE1IS` issued.
        tlbi_vmalle1is,
        /// `TLBI VMALLS12E1IS` issued.
        tlbi_vmalls12e1is,
        /// `TLBI VAE2IS` issued (hypervisor's own map).
        tlbi_vae2is,
        /// `TLBI ALLE2IS` issued (hypervisor's own map).
        tlbi_alle2is,
        /// 4 KiB pages covered by stage-2 TLBIs by IPA (`IPAS2E1IS`,
        /// `RIPAS2E1IS`; whole-VMID invalidations are counted by kind only).
        tlbi_pages,
        /// Page-table pages taken from the pool.
        pool_allocs,
        /// Page-table pages given back to the pool.
        pool_frees,
        /// Guard mode: pool pages made valid in the EL2 map on allocation.
        guard_maps,
        /// Guard mode: pool pages made invalid in the EL2 map on free.
        guard_unmaps,
        /// Pages put in a CPU's reserve by `PagePool::top_up`.
        reserve_topped,
        /// Table pages taken from a CPU's reserve (no EL2 update, no nest).
        reserve_allocs,
        /// Stage-2 translation faults served by demand population.
        demand_faults,
        /// Pages mapped by demand population (fault-around included).
        demand_pages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_each_lists_in_declaration_order_and_reset_clears() {
        let c = MmCounters::new();
        inc(&c.mappings);
        add(&c.pages_mapped, 512);
        sub(&c.pages_mapped, 2);
        let mut seen = alloc::vec::Vec::new();
        c.for_each(|name, value| seen.push((name, value)));
        assert_eq!(seen[0], ("mappings", 1));
        assert_eq!(seen[1], ("pages_mapped", 510));
        assert_eq!(seen.last().map(|s| s.0), Some("demand_pages"));
        c.reset();
        c.for_each(|_, value| assert_eq!(value, 0));
    }
}
