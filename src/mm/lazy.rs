//! Lazy MMU mode: sections in which page-table writes do not each pay for
//! their barriers and TLB invalidations, and the section's end pays once.
//!
//! # The idea (Linux arm64 `arch_enter/leave_lazy_mmu_mode`)
//!
//! Outside a section every operation pays as it goes ("eager"): a write that
//! makes an entry valid is followed by `DSB ISHST; ISB`, a write that removes
//! or changes a live entry by `DSB ISHST; TLBI...; DSB ISH; [TLBI VMALLE1IS;
//! DSB ISH]; ISB`. Inside a section ([`MmCtx::enter`] .. [`MmCtx::leave`]) a
//! write only *records* what it owes: "writes not yet made visible", "an ISB
//! is due", and invalidations, queued in a per-CPU [`TlbBatch`] that
//! coalesces adjacent and overlapping ranges. [`MmCtx::flush`] (and the
//! outermost `leave`) pays once:
//!
//! ```text
//! DSB ISHST                       if any write is not yet visible
//! TLBI VAE2IS / ALLE2IS           queued EL2-map invalidations
//! TLBI RIPAS2E1IS | IPAS2E1IS     queued stage-2 ranges (or VMALLS12E1IS
//!                                 for a VMID above the threshold)
//! DSB ISH                         if any TLBI was issued
//! TLBI VMALLE1IS                  per VMID whose stage-2 entries changed:
//! DSB ISH                           combined stage-1+2 entries are not
//!                                   invalidated by IPA
//! ISB                             if a valid entry was written or a TLBI issued
//! ```
//!
//! # Nesting: why it is wrong, and the policies
//!
//! The page-table pool may have to change the hypervisor's own map while a
//! section is open (guard mode: a free page is unmapped from the EL2 map, so
//! allocating one makes it valid and then zeroes it). That change is a
//! section of its own. The seed thread (Ryan Roberts, "arm64/mm: Ensure
//! lazy_mmu_mode never nests", 2025) shows why plain nesting is wrong:
//!
//! ```text
//! enter                       (outer)
//!   write pte; alloc_page:
//!     enter                   (inner)
//!     make page valid
//!     leave                   (inner: with nesting, a no-op)
//!     write to page           <- the valid entry is not yet visible: fault
//! leave
//! ```
//!
//! The "make page valid" must be complete when the inner `leave` returns.
//! [`NestPolicy`] selects, at run time, how an allocator request inside a
//! section is handled:
//!
//! | policy | what the allocator does | correct | cost |
//! |---|---|---|---|
//! | [`Flatten`](NestPolicy::Flatten) (default) | [`pause`](MmCtx::pause), update (eager), [`resume`](MmCtx::resume) | yes | one DSB per nest, the outer batch kept |
//! | [`FlushInner`](NestPolicy::FlushInner) | nested `enter`/`leave`; the inner leave flushes and ends lazy mode (Linux 1ef3095b1405) | yes | the rest of the outer section runs eager |
//! | [`Naive`](NestPolicy::Naive) | nested `enter`/`leave`, counted; the inner leave does nothing | **no** | (kept to prove it wrong) |
//! | [`Counted`](NestPolicy::Counted) | nested `enter`/`leave`; a nested leave flushes everything and stays lazy (Kevin Brodsky's generic design) | yes | the outer batch is paid at every nest |
//!
//! # Flattening, and why a pause need not pay
//!
//! The seed's flattening is `if in_lazy_mode() { leave }; update; if it was
//! { enter }`. Its `leave` pays for the outer section's pending work, so a
//! nest costs two DSBs (the leave's and the update's own). [`MmCtx::pause`]
//! leaves lazy mode *without* paying: the outer section's pending state is
//! set aside, the update runs eager (its own `DSB ISHST; ISB`), and
//! [`MmCtx::resume`] puts the outer state back. Nothing the outer section
//! owes has to be complete at the pause, only by its own end; and the
//! update's `DSB ISHST` completes every earlier store, the outer section's
//! included, so after the update's `DSB; ISB` the outer section no longer
//! owes a DSB or ISB for the writes it made before the pause (its queued
//! TLBIs are still owed, and still batched). That makes a section with `n`
//! allocator nests pay `n + 1` DSBs, however many pages it maps. The host
//! model (`mm::model`) checks the claim.
//!
//! A nested [`MmCtx::enter`] under `Flatten` is a caller bug: it is logged
//! once, counted (`nest_warnings`), and handled like `FlushInner` (safe).

use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicU8, Ordering};
use spin::mutex::SpinMutex;

use super::arch::{MmArch, Vmid};
use super::counters::{MmCounters, add, inc};
use super::{PAGE_SIZE, PhysAddr};

/// Most CPUs the per-CPU state is sized for.
pub const MAX_CPUS: usize = 4;

/// Above this many pages queued for one VMID, a flush without
/// FEAT_TLBIRANGE invalidates the whole VMID (`TLBI VMALLS12E1IS`) instead of
/// page by page (as Linux's `MAX_DVM_OPS`: one table's worth).
pub const PAGE_TLBI_THRESHOLD: u64 = 512;

/// Above this many range TLBIs for one VMID, a flush invalidates the whole
/// VMID instead.
pub const RANGE_TLBI_THRESHOLD: usize = 64;

/// Most pages one `TLBI RIPAS2E1IS` covers (4 KiB granule: NUM = 31 at
/// SCALE = 3, `(31 + 1) << 16` pages).
pub const MAX_RANGE_TLBI_PAGES: u64 = 32 << 16;

/// Above this many EL2 pages queued, a flush uses `TLBI ALLE2IS`.
pub const EL2_TLBI_THRESHOLD: u64 = 64;

/// How an allocator request inside a lazy section is handled. See the
/// module docs for the cost and correctness of each.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Hash)]
#[repr(u8)]
pub enum NestPolicy {
    /// Pause the section, update eagerly, resume (correct, cheapest).
    #[default]
    Flatten = 0,
    /// Nest; the inner leave flushes and ends lazy mode (correct).
    FlushInner = 1,
    /// Nest; the inner leave does nothing (WRONG: kept to prove it).
    Naive = 2,
    /// Nest; a nested leave flushes and stays lazy (correct).
    Counted = 3,
}

impl NestPolicy {
    /// Every policy, in declaration order.
    pub const ALL: [Self; 4] = [Self::Flatten, Self::FlushInner, Self::Naive, Self::Counted];

    fn from_raw(raw: u8) -> Self {
        match raw {
            1 => Self::FlushInner,
            2 => Self::Naive,
            3 => Self::Counted,
            _ => Self::Flatten,
        }
    }

    /// Lower-case name (`flatten`, `flush_inner`, `naive`, `counted`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Flatten => "flatten",
            Self::FlushInner => "flush_inner",
            Self::Naive => "naive",
            Self::Counted => "counted",
        }
    }
}

/// Queued TLB invalidations, coalesced: per VMID a sorted list of disjoint,
/// non-adjacent IPA page ranges; for the EL2 map a list of VA page ranges.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct TlbBatch {
    stage2: Vec<(Vmid, Range<u64>)>,
    el2: Vec<Range<u64>>,
}

/// Inserts `new` into sorted, disjoint, non-adjacent `ranges`, merging it
/// with every range it overlaps or touches.
fn insert_coalesced(ranges: &mut Vec<Range<u64>>, mut new: Range<u64>) {
    // First range that ends at or after new.start (could touch or overlap).
    let first = ranges.partition_point(|r| r.end < new.start);
    let mut last = first;
    while last < ranges.len() && ranges[last].start <= new.end {
        new.start = new.start.min(ranges[last].start);
        new.end = new.end.max(ranges[last].end);
        last += 1;
    }
    ranges.splice(first..last, core::iter::once(new));
}

impl TlbBatch {
    /// Whether nothing is queued.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.stage2.is_empty() && self.el2.is_empty()
    }

    /// Queues `[ipa, ipa + size)` of `vmid` (page-aligned).
    pub fn add_stage2(&mut self, vmid: Vmid, ipa: u64, size: u64) {
        let start = self.stage2.partition_point(|(v, _)| *v < vmid);
        let end = self.stage2.partition_point(|(v, _)| *v <= vmid);
        let mut ranges: Vec<Range<u64>> = self.stage2[start..end]
            .iter()
            .map(|(_, r)| r.clone())
            .collect();
        insert_coalesced(&mut ranges, ipa..ipa + size);
        self.stage2
            .splice(start..end, ranges.into_iter().map(|r| (vmid, r)));
    }

    /// Queues the EL2-map pages `[va, va + size)`.
    pub fn add_el2(&mut self, va: u64, size: u64) {
        insert_coalesced(&mut self.el2, va..va + size);
    }

    /// The queued stage-2 ranges, by VMID.
    #[must_use]
    pub fn stage2_ranges(&self) -> &[(Vmid, Range<u64>)] {
        &self.stage2
    }

    /// The queued EL2 ranges.
    #[must_use]
    pub fn el2_ranges(&self) -> &[Range<u64>] {
        &self.el2
    }
}

/// What a CPU owes for page-table writes made but not yet paid for.
#[derive(Debug, Default)]
struct Owed {
    /// Writes not yet made visible by a DSB.
    unsynced_writes: bool,
    /// A valid entry was written: an ISB is due after its DSB.
    need_isb: bool,
    /// Invalidations due.
    batch: TlbBatch,
    /// Table pages detached from live tables, to be freed once the TLB
    /// maintenance hiding them has completed.
    deferred_free: Vec<PhysAddr>,
}

impl Owed {
    fn is_empty(&self) -> bool {
        !self.unsynced_writes
            && !self.need_isb
            && self.batch.is_empty()
            && self.deferred_free.is_empty()
    }
}

/// One CPU's lazy-mode state.
#[derive(Debug, Default)]
struct LazyCpu {
    active: bool,
    /// Nesting depth under `Naive` and `Counted` (1 = outermost section).
    depth: u32,
    owed: Owed,
    /// Bumped by every DSB / ISB this CPU issues (for `resume`).
    dsb_epoch: u64,
    isb_epoch: u64,
    warned: bool,
}

/// Frees table pages whose TLB maintenance has completed (the pool's free).
pub type FreeHook = &'static (dyn Fn(&[PhysAddr]) + Sync);

/// What [`MmCtx::pause`] set aside.
#[derive(Debug)]
#[must_use = "a paused section must be resumed"]
pub struct Paused {
    was_active: bool,
    depth: u32,
    owed: Owed,
    dsb_epoch: u64,
    isb_epoch: u64,
}

/// The mm core's context: the arch boundary, the counters, and each CPU's
/// lazy state. One per system; shared by the stage-2 managers, the pool and
/// the EL2-map updater.
pub struct MmCtx<A: MmArch> {
    /// The arch boundary.
    pub arch: A,
    cpus: [SpinMutex<LazyCpu>; MAX_CPUS],
    counters: [MmCounters; MAX_CPUS],
    policy: AtomicU8,
    /// Whether sections exist at all (off: eager mode, for comparison).
    lazy_enabled: core::sync::atomic::AtomicBool,
    /// Called to free table pages whose TLB maintenance completed.
    free_hook: SpinMutex<Option<FreeHook>>,
}

impl<A: MmArch> core::fmt::Debug for MmCtx<A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MmCtx")
            .field("policy", &self.policy())
            .finish_non_exhaustive()
    }
}

impl<A: MmArch> MmCtx<A> {
    /// A context with lazy mode off everywhere and the `Flatten` policy.
    pub fn new(arch: A) -> Self {
        Self {
            arch,
            cpus: core::array::from_fn(|_| SpinMutex::new(LazyCpu::default())),
            counters: core::array::from_fn(|_| MmCounters::new()),
            policy: AtomicU8::new(NestPolicy::Flatten as u8),
            lazy_enabled: core::sync::atomic::AtomicBool::new(true),
            free_hook: SpinMutex::new(None),
        }
    }

    /// Selects the nesting policy (tests and benchmarks).
    pub fn set_policy(&self, policy: NestPolicy) {
        self.policy.store(policy as u8, Ordering::Relaxed);
    }

    /// Turns lazy sections on (the default) or off: off, `enter` and `leave`
    /// do nothing and every operation pays as it goes (eager mode, the
    /// baseline of the benchmarks).
    pub fn set_lazy_enabled(&self, on: bool) {
        self.lazy_enabled.store(on, Ordering::Relaxed);
    }

    /// The nesting policy in force.
    pub fn policy(&self) -> NestPolicy {
        NestPolicy::from_raw(self.policy.load(Ordering::Relaxed))
    }

    /// Sets what frees table pages after their TLB maintenance (the pool).
    pub fn set_free_hook(&self, hook: FreeHook) {
        *self.free_hook.lock() = Some(hook);
    }

    fn cpu(&self) -> usize {
        let id = self.arch.cpu_id();
        assert!(id < MAX_CPUS, "CPU {id} beyond MAX_CPUS");
        id
    }

    /// This CPU's counters.
    pub fn counters(&self) -> &MmCounters {
        &self.counters[self.cpu()]
    }

    /// Counters of CPU `cpu`.
    pub fn cpu_counters(&self, cpu: usize) -> &MmCounters {
        &self.counters[cpu]
    }

    /// Calls `f` with each counter's name and its total over all CPUs.
    pub fn for_each_total(&self, mut f: impl FnMut(&'static str, u64)) {
        let mut totals = [0u64; 64];
        let mut names = [""; 64];
        let mut n = 0;
        for c in &self.counters {
            let mut i = 0;
            c.for_each(|name, v| {
                names[i] = name;
                totals[i] += v;
                i += 1;
            });
            n = i;
        }
        for i in 0..n {
            f(names[i], totals[i]);
        }
    }

    /// The total of one counter over all CPUs.
    pub fn total(&self, name: &str) -> u64 {
        let mut t = 0;
        self.for_each_total(|n, v| {
            if n == name {
                t = v;
            }
        });
        t
    }

    /// Sets every counter of every CPU to zero.
    pub fn reset_counters(&self) {
        self.counters.iter().for_each(MmCounters::reset);
    }

    /// Whether this CPU is in a lazy section.
    pub fn in_lazy_mode(&self) -> bool {
        self.cpus[self.cpu()].lock().active
    }

    /// Whether this CPU owes nothing: no write, ISB, TLBI or deferred free
    /// is outstanding. Checked before every entry to a guest in debug builds.
    pub fn nothing_pending(&self) -> bool {
        let cpu = self.cpus[self.cpu()].lock();
        !cpu.active && cpu.owed.is_empty()
    }

    /// Starts a lazy section on this CPU.
    pub fn enter(&self) {
        if !self.lazy_enabled.load(Ordering::Relaxed) {
            return;
        }
        let policy = self.policy();
        let counters = self.counters();
        let mut cpu = self.cpus[self.cpu()].lock();
        if !cpu.active {
            cpu.active = true;
            cpu.depth = 1;
            inc(&counters.sections);
            return;
        }
        inc(&counters.nests);
        match policy {
            NestPolicy::Naive | NestPolicy::Counted => cpu.depth += 1,
            // 1ef3095b1405: a nested enter is tolerated; the inner leave
            // will end the section.
            NestPolicy::FlushInner => {}
            NestPolicy::Flatten => {
                // Under Flatten nothing should nest: callers pause instead.
                inc(&counters.nest_warnings);
                if !cpu.warned {
                    cpu.warned = true;
                    log::warn!(
                        "lazy MMU section entered while already active (a caller should pause)"
                    );
                }
            }
        }
    }

    /// Ends a lazy section on this CPU (or one level of nesting), paying
    /// what the policy says is due.
    pub fn leave(&self) {
        if !self.lazy_enabled.load(Ordering::Relaxed) {
            return;
        }
        let policy = self.policy();
        let flush = {
            let mut cpu = self.cpus[self.cpu()].lock();
            if !cpu.active {
                // FlushInner's outer leave after an inner one: nothing left.
                return;
            }
            match policy {
                NestPolicy::Flatten | NestPolicy::FlushInner => {
                    cpu.active = false;
                    cpu.depth = 0;
                    true
                }
                NestPolicy::Naive => {
                    cpu.depth -= 1;
                    if cpu.depth == 0 {
                        cpu.active = false;
                    }
                    // The bug: a nested leave pays nothing.
                    cpu.depth == 0
                }
                NestPolicy::Counted => {
                    cpu.depth -= 1;
                    if cpu.depth == 0 {
                        cpu.active = false;
                    }
                    // A nested leave completes everything, and stays lazy.
                    true
                }
            }
        };
        if flush {
            self.flush();
        }
    }

    /// Leaves lazy mode without paying what the section owes, setting it
    /// aside for [`resume`](Self::resume). Works whether or not a section is
    /// open (then it sets aside nothing).
    pub fn pause(&self) -> Paused {
        let mut cpu = self.cpus[self.cpu()].lock();
        let paused = Paused {
            was_active: cpu.active,
            depth: cpu.depth,
            owed: core::mem::take(&mut cpu.owed),
            dsb_epoch: cpu.dsb_epoch,
            isb_epoch: cpu.isb_epoch,
        };
        cpu.active = false;
        cpu.depth = 0;
        paused
    }

    /// Re-enters what [`pause`](Self::pause) left. If a DSB and then an ISB
    /// were issued meanwhile, the section's earlier writes are visible and
    /// synchronized, so it no longer owes a DSB or ISB for them.
    ///
    /// # Panics
    ///
    /// If work was left unpaid between `pause` and `resume` (the update in
    /// between must run eager and pay for itself).
    pub fn resume(&self, paused: Paused) {
        let counters = self.counters();
        let mut cpu = self.cpus[self.cpu()].lock();
        assert!(
            !cpu.active && cpu.owed.is_empty(),
            "work left unpaid inside a pause"
        );
        let mut owed = paused.owed;
        let dsb_since = cpu.dsb_epoch != paused.dsb_epoch;
        if dsb_since {
            owed.unsynced_writes = false;
            // The ISB must come after that DSB; the eager update's flush
            // issues DSB then ISB, so an ISB since the pause is after it.
            if cpu.isb_epoch != paused.isb_epoch {
                owed.need_isb = false;
            }
        }
        cpu.owed = owed;
        cpu.active = paused.was_active;
        cpu.depth = paused.depth;
        if paused.was_active {
            inc(&counters.flattenings);
        }
    }

    /// Records `n` descriptor writes; `made_valid` if any made an entry
    /// valid.
    pub fn note_writes(&self, n: u64, made_valid: bool) {
        if n == 0 {
            return;
        }
        add(&self.counters().pte_writes, n);
        let mut cpu = self.cpus[self.cpu()].lock();
        cpu.owed.unsynced_writes = true;
        cpu.owed.need_isb |= made_valid;
    }

    /// Queues invalidation of `[ipa, ipa + size)` of `vmid`'s stage 2.
    pub fn queue_stage2_invalidation(&self, vmid: Vmid, ipa: u64, size: u64) {
        self.cpus[self.cpu()]
            .lock()
            .owed
            .batch
            .add_stage2(vmid, ipa, size);
    }

    /// Whether an invalidation of `vmid`'s stage 2 overlapping
    /// `[ipa, ipa + size)` is queued on this CPU.
    pub fn stage2_invalidation_pending(&self, vmid: Vmid, ipa: u64, size: u64) -> bool {
        let cpu = self.cpus[self.cpu()].lock();
        cpu.owed
            .batch
            .stage2
            .iter()
            .any(|(v, r)| *v == vmid && r.start < ipa + size && ipa < r.end)
    }

    /// Queues invalidation of EL2-map pages `[va, va + size)`.
    pub fn queue_el2_invalidation(&self, va: u64, size: u64) {
        self.cpus[self.cpu()].lock().owed.batch.add_el2(va, size);
    }

    /// Queues a detached table page to be freed after the TLB maintenance
    /// owed at this point has completed.
    pub fn defer_free(&self, pa: PhysAddr) {
        self.cpus[self.cpu()].lock().owed.deferred_free.push(pa);
    }

    /// Ends an operation: outside a section it pays now (eager mode);
    /// inside one it leaves the payment to the section.
    pub fn op_done(&self) {
        if !self.in_lazy_mode() {
            self.flush();
        }
    }

    /// Pays everything this CPU owes now, whether or not a section is open
    /// (a section stays open). Then frees the table pages whose maintenance
    /// just completed.
    pub fn flush(&self) {
        let counters = self.counters();
        let owed = core::mem::take(&mut self.cpus[self.cpu()].lock().owed);
        if owed.unsynced_writes {
            self.dsb_ishst(counters);
        }
        let tlbis = self.issue_tlbis(&owed.batch, counters);
        if owed.need_isb || tlbis {
            self.isb(counters);
        }
        if !owed.deferred_free.is_empty() {
            let hook = *self.free_hook.lock();
            if let Some(free) = hook {
                free(&owed.deferred_free);
            }
        }
    }

    /// Issues the queued TLBIs and waits for them. Returns whether any was
    /// issued.
    fn issue_tlbis(&self, batch: &TlbBatch, counters: &MmCounters) -> bool {
        if batch.is_empty() {
            return false;
        }
        let el2_pages: u64 = batch
            .el2
            .iter()
            .map(|r| (r.end - r.start) / PAGE_SIZE as u64)
            .sum();
        if el2_pages > EL2_TLBI_THRESHOLD {
            self.arch.tlbi_alle2is();
            inc(&counters.tlbi_alle2is);
        } else {
            for r in &batch.el2 {
                for va in (r.start..r.end).step_by(PAGE_SIZE) {
                    self.arch.tlbi_vae2is(va);
                    inc(&counters.tlbi_vae2is);
                }
            }
        }
        let mut vmids: Vec<Vmid> = batch.stage2.iter().map(|(v, _)| *v).collect();
        vmids.dedup();
        for &vmid in &vmids {
            let ranges = batch
                .stage2
                .iter()
                .filter(|(v, _)| *v == vmid)
                .map(|(_, r)| r);
            self.invalidate_stage2_ranges(vmid, ranges, counters);
        }
        // Stage-2-only (and EL2) invalidations complete before the combined
        // entries are dropped: otherwise a walk in between could rebuild a
        // combined entry from a stage-2 entry not yet gone.
        self.dsb_ish(counters);
        if !vmids.is_empty() {
            for &vmid in &vmids {
                self.arch.tlbi_vmalle1is(vmid);
                inc(&counters.tlbi_vmalle1is);
            }
            self.dsb_ish(counters);
        }
        true
    }

    /// Stage-2-only invalidation of `ranges` of `vmid`: range TLBIs with
    /// FEAT_TLBIRANGE, page TLBIs without, the whole VMID above the
    /// thresholds.
    fn invalidate_stage2_ranges<'r>(
        &self,
        vmid: Vmid,
        ranges: impl Iterator<Item = &'r Range<u64>> + Clone,
        counters: &MmCounters,
    ) {
        let pages: u64 = ranges
            .clone()
            .map(|r| (r.end - r.start) / PAGE_SIZE as u64)
            .sum();
        let range_ops: usize = ranges
            .clone()
            .map(|r| ((r.end - r.start) / PAGE_SIZE as u64).div_ceil(MAX_RANGE_TLBI_PAGES) as usize)
            .sum();
        let use_range = self.arch.has_tlbi_range();
        if (use_range && range_ops > RANGE_TLBI_THRESHOLD)
            || (!use_range && pages > PAGE_TLBI_THRESHOLD)
        {
            self.arch.tlbi_vmalls12e1is(vmid);
            inc(&counters.tlbi_vmalls12e1is);
            return;
        }
        // Pages covered by by-IPA invalidations (the whole-VMID one above
        // covers everything and is counted by kind only).
        add(&counters.tlbi_pages, pages);
        for r in ranges {
            let mut ipa = r.start;
            while ipa < r.end {
                let left = (r.end - ipa) / PAGE_SIZE as u64;
                if use_range {
                    let n = left.min(MAX_RANGE_TLBI_PAGES);
                    self.arch.tlbi_ripas2e1is(vmid, ipa, n);
                    inc(&counters.tlbi_ripas2e1is);
                    ipa += n * PAGE_SIZE as u64;
                } else {
                    self.arch.tlbi_ipas2e1is(vmid, ipa);
                    inc(&counters.tlbi_ipas2e1is);
                    ipa += PAGE_SIZE as u64;
                }
            }
        }
    }

    fn dsb_ishst(&self, counters: &MmCounters) {
        self.arch.dsb_ishst();
        inc(&counters.dsb_ishst);
        self.cpus[self.cpu()].lock().dsb_epoch += 1;
    }

    fn dsb_ish(&self, counters: &MmCounters) {
        self.arch.dsb_ish();
        inc(&counters.dsb_ish);
        self.cpus[self.cpu()].lock().dsb_epoch += 1;
    }

    fn isb(&self, counters: &MmCounters) {
        self.arch.isb();
        inc(&counters.isb);
        self.cpus[self.cpu()].lock().isb_epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::arch::NoopArch;

    #[test]
    fn batch_coalesces_adjacent_and_overlapping_ranges_per_vmid() {
        let mut b = TlbBatch::default();
        b.add_stage2(Vmid(1), 0x1000, 0x1000);
        b.add_stage2(Vmid(1), 0x3000, 0x1000);
        b.add_stage2(Vmid(2), 0x2000, 0x1000);
        b.add_stage2(Vmid(1), 0x2000, 0x1000); // fills the hole: one range
        b.add_stage2(Vmid(1), 0x1800, 0x4000); // overlaps and extends
        assert_eq!(
            b.stage2_ranges(),
            &[(Vmid(1), 0x1000..0x5800), (Vmid(2), 0x2000..0x3000)]
        );
        b.add_el2(0x9000, 0x1000);
        b.add_el2(0x8000, 0x1000);
        assert_eq!(b.el2_ranges().len(), 1);
        assert_eq!(b.el2_ranges()[0], 0x8000..0xa000);
    }

    fn counts(mm: &MmCtx<NoopArch>) -> (u64, u64, u64) {
        (
            mm.total("dsb_ishst") + mm.total("dsb_ish"),
            mm.total("isb"),
            mm.total("tlbi_ripas2e1is") + mm.total("tlbi_vmalle1is"),
        )
    }

    #[test]
    fn eager_pays_per_operation_and_a_section_pays_once() {
        let mm = MmCtx::new(NoopArch);
        for i in 0..10 {
            mm.note_writes(1, false);
            mm.queue_stage2_invalidation(Vmid(1), i * 0x1000, 0x1000);
            mm.op_done();
        }
        // Each: DSB ISHST, RIPAS, DSB ISH, VMALLE1IS, DSB ISH, ISB.
        assert_eq!(counts(&mm), (30, 10, 20));
        mm.reset_counters();
        mm.enter();
        for i in 0..10 {
            mm.note_writes(1, false);
            mm.queue_stage2_invalidation(Vmid(1), i * 0x1000, 0x1000);
            mm.op_done();
        }
        assert_eq!(counts(&mm), (0, 0, 0), "nothing paid inside the section");
        mm.leave();
        assert_eq!(counts(&mm), (3, 1, 2), "one coalesced range TLBI");
        assert!(mm.nothing_pending());
    }

    #[test]
    fn pause_resume_keeps_the_batch_and_drops_a_covered_dsb() {
        let mm = MmCtx::new(NoopArch);
        mm.enter();
        mm.note_writes(5, true);
        mm.queue_stage2_invalidation(Vmid(1), 0, 0x1000);
        let p = mm.pause();
        assert!(!mm.in_lazy_mode());
        mm.note_writes(1, true); // the eager inner update
        mm.op_done();
        mm.resume(p);
        assert!(mm.in_lazy_mode());
        assert_eq!(mm.total("flattenings"), 1);
        mm.reset_counters();
        mm.leave();
        // Writes already made visible by the inner DSB: no DSB ISHST, but
        // the TLBIs are still owed: RIPAS, DSB ISH, VMALLE1IS, DSB ISH, ISB.
        assert_eq!(mm.total("dsb_ishst"), 0);
        assert_eq!(mm.total("dsb_ish"), 2);
        assert_eq!(mm.total("isb"), 1);
    }

    #[test]
    fn policies_differ_in_what_the_inner_leave_pays() {
        for policy in NestPolicy::ALL {
            let mm = MmCtx::new(NoopArch);
            mm.set_policy(policy);
            mm.enter();
            mm.note_writes(1, true);
            mm.enter();
            mm.note_writes(1, true);
            mm.leave();
            let paid_at_inner = mm.total("dsb_ishst");
            let lazy_after_inner = mm.in_lazy_mode();
            mm.leave();
            match policy {
                NestPolicy::Naive => assert_eq!((paid_at_inner, lazy_after_inner), (0, true)),
                NestPolicy::Counted => assert_eq!((paid_at_inner, lazy_after_inner), (1, true)),
                NestPolicy::FlushInner | NestPolicy::Flatten => {
                    assert_eq!((paid_at_inner, lazy_after_inner), (1, false));
                }
            }
            assert_eq!(
                mm.total("nest_warnings"),
                u64::from(policy == NestPolicy::Flatten)
            );
            assert!(mm.nothing_pending(), "{policy:?}");
        }
    }

    #[test]
    fn thresholds_switch_to_whole_vmid_invalidation() {
        struct NoRange;
        impl MmArch for NoRange {
            fn dsb_ishst(&self) {}
            fn dsb_ish(&self) {}
            fn isb(&self) {}
            fn tlbi_ipas2e1is(&self, _: Vmid, _: u64) {}
            fn tlbi_ripas2e1is(&self, _: Vmid, _: u64, _: u64) {
                panic!("no FEAT_TLBIRANGE");
            }
            fn tlbi_vmalle1is(&self, _: Vmid) {}
            fn tlbi_vmalls12e1is(&self, _: Vmid) {}
            fn tlbi_vae2is(&self, _: u64) {}
            fn tlbi_alle2is(&self) {}
            fn has_tlbi_range(&self) -> bool {
                false
            }
        }
        let mm = MmCtx::new(NoRange);
        mm.queue_stage2_invalidation(Vmid(1), 0, PAGE_TLBI_THRESHOLD * 4096);
        mm.flush();
        assert_eq!(mm.total("tlbi_ipas2e1is"), PAGE_TLBI_THRESHOLD);
        mm.queue_stage2_invalidation(Vmid(1), 0, (PAGE_TLBI_THRESHOLD + 1) * 4096);
        mm.flush();
        assert_eq!(mm.total("tlbi_vmalls12e1is"), 1);
        // Range TLBIs: 1 GiB of pages is one RIPAS2E1IS.
        let mm = MmCtx::new(NoopArch);
        mm.queue_stage2_invalidation(Vmid(1), 1 << 30, 1 << 30);
        mm.flush();
        assert_eq!(
            (mm.total("tlbi_ripas2e1is"), mm.total("tlbi_vmalle1is")),
            (1, 1)
        );
        assert_eq!(mm.total("tlbi_pages"), 262_144);
    }
}
