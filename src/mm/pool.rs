//! The page pool: 4 KiB pages for translation tables, handed out by a buddy
//! allocator (`buddy_system_allocator::FrameAllocator`) over one region that
//! the hypervisor reserved for it at boot, behind a bounded cache of single
//! free pages (a stack: freed pages are pushed on it, allocations pop it
//! first, so the bursts of table frees and allocations of a large map or
//! unmap rarely reach the buddy allocator's ordered sets).
//!
//! Pool pages are identity-mapped in the hypervisor's EL2 map, so a page's
//! physical address is also the address the hypervisor writes it through. On
//! the host, tests back the pool with a heap allocation and its addresses
//! stand in for physical ones.
//!
//! # Guard mode
//!
//! With guard mode on (debug builds and tests; switchable), free pool pages
//! are *not mapped* in the EL2 map: allocating a page makes its EL2 entry
//! valid and then zeroes it; freeing makes it invalid (with its TLBI), so a
//! use after free faults. Those EL2-map updates are lazy sections of their
//! own, and may happen while a stage-2 section is open (a map that needs a
//! new table). How they combine with the open section is the nesting
//! policy's business (see [`super::lazy`]): under `Flatten` the pool pauses
//! the section, updates eagerly and resumes.
//!
//! # The reserve (KVM's memcache)
//!
//! Each CPU may keep a reserve of zeroed pages that are already valid in the
//! EL2 map. [`PagePool::top_up`] fills it before a section opens, with the
//! count the section may need (what prepare would compute:
//! `Stage2::tables_for_maps`), in one EL2 update: every page's entry written,
//! then one `DSB ISHST; ISB` for all of them, then each page zeroed.
//! [`PagePool::alloc_zeroed`] takes from this CPU's reserve first, which
//! changes no map: nothing nests. Only when the reserve is empty does an
//! allocation inside a section take the nesting path (counted as
//! `flattenings` under `Flatten`). Reserve pages are mapped (they are as
//! good as handed out); free pages stay unmapped, so guard mode still
//! catches a use after free. As KVM tops up its `kvm_mmu_memory_cache`
//! before it takes the MMU lock (`kvm_mmu_topup_memory_cache`), so that
//! nothing under the lock allocates with side effects.

use buddy_system_allocator::FrameAllocator;
use core::ops::Range;
use spin::mutex::SpinMutex;

use alloc::vec::Vec;

use super::arch::MmArch;
use super::counters::{add, inc};
use super::lazy::{MAX_CPUS, MmCtx, NestPolicy};
use super::{PAGE_SIZE, PhysAddr};

/// Why the pool could not hand out a page.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum PoolError {
    /// Every page of the pool is in use.
    Exhausted,
    /// A test asked for this allocation to fail (see [`PagePool::fail_after`]).
    Injected,
    /// Guard mode: the page was made valid in the EL2 map, but writing it
    /// would fault: the update was not complete when the pool zeroed it (a
    /// nesting bug, shown under `Naive`). The page is back in the pool.
    GuardFault,
}

/// The EL2-map side of guard mode: makes one pool page valid or invalid in
/// the hypervisor's map.
pub trait El2PageMap: Sync {
    /// Writes the EL2 leaf entry of the page at `va`: valid (normal memory,
    /// read-write, execute-never) or invalid. Returns how many descriptors
    /// were written. Issues no barrier or TLBI: the caller pays for them.
    fn set_page(&self, va: PhysAddr, valid: bool) -> u64;
}

/// Most free pages the free-page cache holds (its stack is allocated once,
/// at the pool's creation: 8 bytes a page).
const CACHE_PAGES: usize = 1024;

struct PoolState {
    frames: FrameAllocator<32>,
    /// The free-page cache: single free pages in the order they were freed,
    /// taken before the buddy allocator is asked (which end: see
    /// `oldest_first`). Table pages are freed and allocated one at a
    /// time, in bursts of hundreds (a GiB of pages is 512 tables); a ring
    /// makes each a push or a pop, where the buddy
    /// allocator's ordered sets cost a tree update (and often a node
    /// allocation) per page and per merge of buddies. Its pages are free
    /// pages like the buddy allocator's: counted in `free_pages`, and
    /// unmapped from the EL2 map in guard mode.
    ///
    /// The pool only ever allocates single pages, and takes from the cache
    /// first; so a page in the cache is never missing from an allocation
    /// the buddy allocator cannot serve (it is only asked once the cache is
    /// empty), and no contiguous allocation needs the cached pages merged
    /// back into blocks.
    cache: alloc::collections::VecDeque<PhysAddr>,
    /// Pages the cache may hold: `CACHE_PAGES`, or the pool's size if
    /// smaller; the rest of a burst of frees goes to the buddy allocator.
    cache_cap: usize,
    /// In guard mode the cache hands out its least recently freed page
    /// (first in, first out), so a freed table page stays unmapped from the
    /// EL2 map as long as possible and a use after free keeps faulting;
    /// without guard mode, its most recently freed one (still in the CPU's
    /// caches, cheaper to zero: 15 µs of 410 on the 1 GiB map-unmap bench).
    oldest_first: bool,
    free_pages: usize,
    /// Allocations left before an injected failure; `None` when not injecting.
    fail_after: Option<usize>,
}

impl PoolState {
    /// Takes a free page: one from the cache (see `oldest_first`), else one from
    /// the buddy allocator. `None` when neither has one (every page is
    /// handed out or in a CPU's reserve).
    fn take(&mut self) -> Option<PhysAddr> {
        let cached = if self.oldest_first {
            self.cache.pop_front()
        } else {
            self.cache.pop_back()
        };
        let pa = match cached {
            Some(pa) => pa,
            None => PhysAddr(self.frames.alloc(1)? * PAGE_SIZE),
        };
        self.free_pages -= 1;
        Some(pa)
    }

    /// Gives back a free page (already unmapped from the EL2 map in guard
    /// mode): to the cache while it has room, else to the buddy allocator.
    fn put(&mut self, pa: PhysAddr) {
        debug_assert!(!self.cache.contains(&pa), "page {pa:?} freed twice");
        if self.cache.len() < self.cache_cap {
            self.cache.push_back(pa);
        } else {
            self.frames.dealloc(pa.0 / PAGE_SIZE, 1);
        }
        self.free_pages += 1;
    }
}

/// A buddy allocator of 4 KiB page frames, behind a cache of single free
/// pages, optionally guarding free pages.
pub struct PagePool<'m, A: MmArch> {
    state: SpinMutex<PoolState>,
    /// Per CPU: zeroed pages, valid in the EL2 map, taken first by
    /// [`alloc_zeroed`](Self::alloc_zeroed).
    reserve: [SpinMutex<Vec<PhysAddr>>; MAX_CPUS],
    region: Range<PhysAddr>,
    mm: &'m MmCtx<'m, A>,
    guard: Option<&'m dyn El2PageMap>,
}

impl<A: MmArch> core::fmt::Debug for PagePool<'_, A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PagePool")
            .field(
                "region",
                &format_args!("{:#x}..{:#x}", self.region.start, self.region.end),
            )
            .field("free_pages", &self.free_pages())
            .field("guard", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}

/// Page-aligned, zeroed memory from the global allocator (`alloc::alloc`,
/// a 4096-aligned `Layout`), freed when dropped: table memory for a pool
/// outside the hypervisor (a host harness, another hypervisor's heap).
///
/// Its addresses are used as the tables' addresses: on hardware the memory
/// must be identity-mapped (virtual = physical) for a walker to use tables
/// built in it; on the host nothing walks them but the model.
#[derive(Debug)]
pub struct PageBuffer {
    base: core::ptr::NonNull<u8>,
    pages: usize,
}

// SAFETY: the buffer is plain memory owned by this value alone; moving it to
// another thread moves that ownership, and `&PageBuffer` only hands out its
// address range.
unsafe impl Send for PageBuffer {}
// SAFETY: as above: shared references give out only the address range.
unsafe impl Sync for PageBuffer {}

impl PageBuffer {
    fn layout(pages: usize) -> Option<alloc::alloc::Layout> {
        let size = pages.checked_mul(PAGE_SIZE)?;
        alloc::alloc::Layout::from_size_align(size, PAGE_SIZE).ok()
    }

    /// `pages` zeroed 4 KiB pages, 4 KiB-aligned; `None` if `pages` is 0,
    /// the size overflows, or the allocator has no memory.
    #[must_use]
    pub fn new(pages: usize) -> Option<Self> {
        if pages == 0 {
            return None;
        }
        let layout = Self::layout(pages)?;
        // SAFETY: the layout has a non-zero size (pages > 0).
        let base = core::ptr::NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        Some(Self { base, pages })
    }

    /// The buffer's address range (page-aligned).
    #[must_use]
    pub fn range(&self) -> Range<PhysAddr> {
        let start = PhysAddr(self.base.as_ptr() as usize);
        start..start.add(self.pages * PAGE_SIZE)
    }

    /// Pages in the buffer.
    #[must_use]
    pub fn pages(&self) -> usize {
        self.pages
    }
}

impl Drop for PageBuffer {
    fn drop(&mut self) {
        let layout = Self::layout(self.pages).expect("the layout `new` allocated with");
        // SAFETY: `base` came from `alloc_zeroed` with this layout and is
        // freed once, here; nothing borrows the buffer any more (a pool made
        // by `PagePool::with_buffer` borrowed it mutably for its lifetime).
        unsafe { alloc::alloc::dealloc(self.base.as_ptr(), layout) };
    }
}

impl<'m, A: MmArch> PagePool<'m, A> {
    /// A pool over `buffer`, without guard mode: the safe way to get a pool
    /// from host memory. The pool borrows the buffer mutably for as long as
    /// it (and every table built from it) lives, so nothing else uses the
    /// memory and it is not freed under them.
    pub fn with_buffer(buffer: &'m mut PageBuffer, mm: &'m MmCtx<'m, A>) -> Self {
        // SAFETY: the buffer is memory nothing else uses while the mutable
        // borrow lasts (as long as the pool), readable and writable at its
        // own addresses (it is ours), and page-aligned and non-empty.
        unsafe { Self::new(buffer.range(), mm, None) }
    }

    /// Creates a pool over `region` (page-aligned physical addresses). With
    /// `guard`, every page of the region is made invalid in the EL2 map now
    /// (one flush), and pages are mapped one by one as they are allocated.
    ///
    /// # Safety
    ///
    /// `region` must be memory that nothing else uses for as long as the pool
    /// and the tables built from it live. Without `guard` it must be mapped
    /// read-write at the same address (identity); with `guard`, `guard` must
    /// control those EL2 entries and nothing else may rely on them.
    ///
    /// # Panics
    ///
    /// If `region` is empty or not page-aligned.
    pub unsafe fn new(
        region: Range<PhysAddr>,
        mm: &'m MmCtx<'m, A>,
        guard: Option<&'m dyn El2PageMap>,
    ) -> Self {
        assert!(
            region.start < region.end
                && region.start.is_aligned(PAGE_SIZE)
                && region.end.is_aligned(PAGE_SIZE),
            "pool region {:#x}..{:#x} must be non-empty and page-aligned",
            region.start,
            region.end
        );
        let mut frames = FrameAllocator::new();
        frames.add_frame(region.start.0 / PAGE_SIZE, region.end.0 / PAGE_SIZE);
        let pages = region.end.offset_from(region.start) / PAGE_SIZE;
        let cache_cap = pages.min(CACHE_PAGES);
        let pool = Self {
            state: SpinMutex::new(PoolState {
                free_pages: pages,
                frames,
                cache: alloc::collections::VecDeque::with_capacity(cache_cap),
                cache_cap,
                oldest_first: guard.is_some(),
                fail_after: None,
            }),
            reserve: core::array::from_fn(|_| SpinMutex::new(Vec::new())),
            region,
            mm,
            guard,
        };
        if let Some(el2) = pool.guard {
            let mut writes = 0;
            for va in (pool.region.start.0..pool.region.end.0).step_by(PAGE_SIZE) {
                writes += el2.set_page(PhysAddr(va), false);
            }
            mm.note_writes(writes, false);
            mm.queue_el2_invalidation(
                pool.region.start.0 as u64,
                pool.region.end.offset_from(pool.region.start) as u64,
            );
            mm.flush();
        }
        pool
    }

    /// The region this pool hands pages out of.
    #[must_use]
    pub fn region(&self) -> Range<PhysAddr> {
        self.region.clone()
    }

    /// Whether guard mode is on.
    #[must_use]
    pub fn guarded(&self) -> bool {
        self.guard.is_some()
    }

    /// Pages not currently handed out.
    #[must_use]
    pub fn free_pages(&self) -> usize {
        self.state.lock().free_pages + self.reserve.iter().map(|r| r.lock().len()).sum::<usize>()
    }

    /// Pages in this CPU's reserve.
    #[must_use]
    pub fn reserved(&self) -> usize {
        self.reserve[self.mm.arch.cpu_id()].lock().len()
    }

    /// Fills this CPU's reserve up to `pages` zeroed pages that are valid in
    /// the EL2 map, in one EL2 update (one `DSB ISHST; ISB` for all the
    /// pages it maps). Call it right before a section opens, with what the
    /// section may allocate: the zeroing's own `DSB ISHST` is left owed
    /// (`MmCtx::note_stores`) and paid by that section's end. With no
    /// section to follow, pay it with `MmCtx::op_done`. Inside a section it
    /// nests like any allocation would.
    ///
    /// # Errors
    ///
    /// [`PoolError::Exhausted`] when the pool cannot supply them (the
    /// reserve is left as it was); [`PoolError::GuardFault`] if a page would
    /// not be writable (a nesting bug).
    pub fn top_up(&self, pages: usize) -> Result<(), PoolError> {
        let cpu = self.mm.arch.cpu_id();
        let have = self.reserve[cpu].lock().len();
        let want = pages.saturating_sub(have);
        if want == 0 {
            return Ok(());
        }
        let mut taken = Vec::with_capacity(want);
        {
            let mut st = self.state.lock();
            // `free_pages` counts exactly the cache's pages and the buddy
            // allocator's: all or nothing, decided before taking any.
            if st.free_pages < want {
                return Err(PoolError::Exhausted);
            }
            taken.extend(core::iter::from_fn(|| st.take()).take(want));
            debug_assert_eq!(taken.len(), want, "`free_pages` miscounted");
        }
        if self.guard.is_some() {
            self.guard_update(&taken, true);
            add(&self.mm.counters().guard_maps, taken.len() as u64);
            if taken
                .iter()
                .any(|&pa| !self.mm.arch.el2_access_ok(pa.0, true))
            {
                // SAFETY: never handed out.
                unsafe { self.free_many(&taken) };
                return Err(PoolError::GuardFault);
            }
        }
        for &PhysAddr(pa) in &taken {
            // SAFETY: a page of the pool's region, ours alone, mapped
            // read-write (identity, or by guard mode just above).
            unsafe { core::ptr::write_bytes(pa as *mut u8, 0, PAGE_SIZE) };
        }
        // The zeroes must reach the walkers before a table pointer to the
        // page does: owed to the section about to open (its end's DSB), not
        // paid here (that would be a second DSB for the top-up).
        self.mm.note_stores();
        add(&self.mm.counters().reserve_topped, taken.len() as u64);
        self.reserve[cpu].lock().extend(taken);
        Ok(())
    }

    /// Gives this CPU's reserve back to the pool (unmapping it from the EL2
    /// map in guard mode).
    pub fn release_reserve(&self) {
        let pages = core::mem::take(&mut *self.reserve[self.mm.arch.cpu_id()].lock());
        // SAFETY: reserve pages were never handed out.
        unsafe { self.free_many(&pages) };
    }

    /// Pages in the pool.
    #[must_use]
    pub fn total_pages(&self) -> usize {
        self.region.end.offset_from(self.region.start) / PAGE_SIZE
    }

    /// Makes the allocation after `n` more successful ones fail with
    /// [`PoolError::Injected`] (and every one after it, until cleared with
    /// `None`). For failure-injection tests.
    pub fn fail_after(&self, n: Option<usize>) {
        self.state.lock().fail_after = n;
    }

    /// Takes one page out of the pool, makes it valid in the EL2 map (guard
    /// mode), and zeroes it.
    ///
    /// # Errors
    ///
    /// [`PoolError::Exhausted`] when no page is free, [`PoolError::Injected`]
    /// when a test asked for this allocation to fail,
    /// [`PoolError::GuardFault`] when the page would not be writable.
    pub fn alloc_zeroed(&self) -> Result<PhysAddr, PoolError> {
        let pa = {
            let mut st = self.state.lock();
            if let Some(left) = st.fail_after.as_mut() {
                if *left == 0 {
                    return Err(PoolError::Injected);
                }
                *left -= 1;
            }
            // The reserve first: zeroed and mapped already, nothing nests.
            if let Some(pa) = self.reserve[self.mm.arch.cpu_id()].lock().pop() {
                let c = self.mm.counters();
                inc(&c.reserve_allocs);
                inc(&c.pool_allocs);
                return Ok(pa);
            }
            st.take().ok_or(PoolError::Exhausted)?
        };
        if self.guard.is_some() {
            self.guard_update(&[pa], true);
            inc(&self.mm.counters().guard_maps);
            // On hardware a write to a page whose EL2 entry is not yet in
            // effect would fault here; the model tells us instead.
            if !self.mm.arch.el2_access_ok(pa.0, true) {
                // SAFETY: the page was never handed out.
                unsafe { self.free(pa) };
                return Err(PoolError::GuardFault);
            }
        }
        // SAFETY: `pa` is a page of the pool's region, ours alone (`new`'s
        // contract) and mapped read-write (identity, or by guard mode just
        // above); the allocator just handed it out, so no one else uses it.
        unsafe { core::ptr::write_bytes(pa.0 as *mut u8, 0, PAGE_SIZE) };
        inc(&self.mm.counters().pool_allocs);
        Ok(pa)
    }

    /// `n` calls of [`alloc_zeroed`](Self::alloc_zeroed), each page pushed
    /// onto `out`; at the first error, the pages already pushed stay there
    /// (for the caller to free) and the error is returned. Every counter and
    /// every page handed out is as those calls would leave them.
    ///
    /// Without guard mode the pages are taken under one lock and zeroed
    /// after it, one after the other: no atomic operation between two pages'
    /// zeroing (on the host, a locked instruction waits for every store
    /// before it to drain; hundreds of 4 KiB zeroings each followed by one
    /// serialize on it). With guard mode each page is its own EL2 update, as
    /// in `alloc_zeroed`, so this is that loop.
    ///
    /// # Errors
    ///
    /// As [`alloc_zeroed`](Self::alloc_zeroed).
    pub fn alloc_zeroed_many(&self, n: usize, out: &mut Vec<PhysAddr>) -> Result<(), PoolError> {
        if self.guard.is_some() {
            for _ in 0..n {
                out.push(self.alloc_zeroed()?);
            }
            return Ok(());
        }
        let start = out.len();
        let (from_reserve, result) = {
            let mut st = self.state.lock();
            let mut reserve = self.reserve[self.mm.arch.cpu_id()].lock();
            let mut from_reserve = 0;
            let mut result = Ok(());
            for _ in 0..n {
                if let Some(left) = st.fail_after.as_mut() {
                    if *left == 0 {
                        result = Err(PoolError::Injected);
                        break;
                    }
                    *left -= 1;
                }
                // The reserve first, as in `alloc_zeroed`: once it is empty
                // it stays so (only this CPU fills it), so its pages come
                // first in `out`, the pages to zero after them.
                if let Some(pa) = reserve.pop() {
                    from_reserve += 1;
                    out.push(pa);
                } else if let Some(pa) = st.take() {
                    out.push(pa);
                } else {
                    result = Err(PoolError::Exhausted);
                    break;
                }
            }
            (from_reserve, result)
        };
        for &PhysAddr(pa) in &out[start + from_reserve..] {
            // SAFETY: as in `alloc_zeroed`: a page of the pool's region,
            // ours alone and mapped read-write (no guard mode: identity),
            // just taken from the free pages, so no one else uses it.
            unsafe { core::ptr::write_bytes(pa as *mut u8, 0, PAGE_SIZE) };
        }
        let c = self.mm.counters();
        add(&c.reserve_allocs, from_reserve as u64);
        add(&c.pool_allocs, (out.len() - start) as u64);
        result
    }

    /// Gives a page back to the pool (unmapping it from the EL2 map first in
    /// guard mode).
    ///
    /// # Safety
    ///
    /// `pa` must have come from [`alloc_zeroed`](Self::alloc_zeroed) of this
    /// pool and must no longer be used: in particular no live translation
    /// table may point at it, and the TLB maintenance that removed it from
    /// every walker's view must have completed.
    ///
    /// # Panics
    ///
    /// If `pa` is not a page of the pool.
    pub unsafe fn free(&self, pa: PhysAddr) {
        // SAFETY: the caller's guarantees, for one page.
        unsafe { self.free_many(&[pa]) };
    }

    /// Gives pages back to the pool; in guard mode all of them are unmapped
    /// from the EL2 map in one update (one flush, however many pages).
    ///
    /// # Safety
    ///
    /// As for [`free`](Self::free), for every page.
    ///
    /// # Panics
    ///
    /// If a page is not a page of the pool.
    pub unsafe fn free_many(&self, pages: &[PhysAddr]) {
        for &pa in pages {
            assert!(
                self.region.contains(&pa) && pa.is_aligned(PAGE_SIZE),
                "freeing {pa:#x}, which is not a page of the pool"
            );
        }
        if pages.is_empty() {
            return;
        }
        for &pa in pages {
            self.mm.arch.table_page_freed(pa.0);
        }
        if self.guard.is_some() {
            self.guard_update(pages, false);
            add(&self.mm.counters().guard_unmaps, pages.len() as u64);
        }
        let mut st = self.state.lock();
        for &pa in pages {
            st.put(pa);
        }
        add(&self.mm.counters().pool_frees, pages.len() as u64);
    }

    /// The EL2-map update of guard mode, as a lazy section of its own,
    /// combined with an open section as the nesting policy says.
    fn guard_update(&self, pages: &[PhysAddr], valid: bool) {
        let Some(el2) = self.guard else { return };
        let update = || {
            for &pa in pages {
                let writes = el2.set_page(pa, valid);
                self.mm.note_writes(writes, valid);
                if !valid {
                    self.mm
                        .queue_el2_invalidation(pa.0 as u64, PAGE_SIZE as u64);
                }
            }
        };
        match self.mm.policy() {
            NestPolicy::Flatten => {
                // The seed's flattening: out of the section, update (eager:
                // it pays for itself before returning), back in.
                let paused = self.mm.pause();
                update();
                self.mm.op_done();
                self.mm.resume(paused);
            }
            NestPolicy::FlushInner | NestPolicy::Naive | NestPolicy::Counted => {
                self.mm.enter();
                update();
                self.mm.op_done();
                self.mm.leave();
            }
        }
    }
}

#[cfg(any(test, feature = "model"))]
#[allow(
    clippy::must_use_candidate,
    clippy::missing_panics_doc,
    reason = "test fixtures"
)]
pub mod test_support {
    //! Host memory for pools, and an EL2-page map that only counts.

    use super::{El2PageMap, MmArch, MmCtx, PagePool};
    use crate::mm::{PAGE_SIZE, PhysAddr};
    use alloc::alloc::{Layout, alloc_zeroed};
    use core::ops::Range;

    /// `pages` pages of zeroed, page-aligned host memory, leaked.
    pub fn host_region(pages: usize) -> Range<PhysAddr> {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) } as usize;
        assert_ne!(base, 0, "host allocation failed");
        PhysAddr(base)..PhysAddr(base + pages * PAGE_SIZE)
    }

    /// A pool of `pages` pages of host memory, without guard mode.
    pub fn host_pool<'m, A: MmArch>(pages: usize, mm: &'m MmCtx<'m, A>) -> PagePool<'m, A> {
        // SAFETY: the memory was just allocated, is page-aligned and is never
        // freed or used by anything but this pool.
        unsafe { PagePool::new(host_region(pages), mm, None) }
    }

    /// Leaks `x`, for `'static` test fixtures.
    pub fn leak<T>(x: T) -> &'static T {
        alloc::boxed::Box::leak(alloc::boxed::Box::new(x))
    }

    /// An EL2-page map that only counts its writes.
    #[derive(Debug, Default)]
    pub struct CountingEl2;

    impl El2PageMap for CountingEl2 {
        fn set_page(&self, _va: PhysAddr, _valid: bool) -> u64 {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{CountingEl2, host_pool, host_region, leak};
    use super::*;
    use crate::mm::arch::NoopArch;

    #[test]
    fn alloc_zeroes_and_free_balances() {
        let mm = MmCtx::new(NoopArch);
        let pool = host_pool(4, &mm);
        let a = pool.alloc_zeroed().expect("page");
        // SAFETY: `a` is a pool page we own.
        unsafe { core::ptr::write_bytes(a.0 as *mut u8, 0xaa, PAGE_SIZE) };
        // SAFETY: nothing refers to `a`.
        unsafe { pool.free(a) };
        let b = pool.alloc_zeroed().expect("page");
        // SAFETY: `b` is a pool page we own, PAGE_SIZE long.
        let bytes = unsafe { core::slice::from_raw_parts(b.0 as *const u8, PAGE_SIZE) };
        assert!(
            bytes.iter().all(|&x| x == 0),
            "a reused page must come back zeroed"
        );
        assert_eq!(pool.free_pages(), 3);
    }

    #[test]
    fn exhaustion_and_injection_are_errors() {
        let mm = MmCtx::new(NoopArch);
        let pool = host_pool(2, &mm);
        pool.fail_after(Some(1));
        assert!(pool.alloc_zeroed().is_ok());
        assert_eq!(pool.alloc_zeroed(), Err(PoolError::Injected));
        pool.fail_after(None);
        assert!(pool.alloc_zeroed().is_ok());
        assert_eq!(pool.alloc_zeroed(), Err(PoolError::Exhausted));
    }

    /// An EL2-page map that remembers which pages it left valid.
    #[derive(Debug, Default)]
    struct TrackingEl2(SpinMutex<alloc::collections::BTreeSet<usize>>);

    impl TrackingEl2 {
        fn mapped(&self, pa: PhysAddr) -> bool {
            self.0.lock().contains(&pa.0)
        }
    }

    impl El2PageMap for TrackingEl2 {
        fn set_page(&self, va: PhysAddr, valid: bool) -> u64 {
            let mut mapped = self.0.lock();
            if valid {
                mapped.insert(va.0);
            } else {
                mapped.remove(&va.0);
            }
            1
        }
    }

    #[test]
    fn cached_free_pages_are_unmapped_and_counted() {
        let mm = leak(MmCtx::new(NoopArch));
        let el2 = leak(TrackingEl2::default());
        let region = host_region(8);
        // SAFETY: fresh host memory, only this pool uses it.
        let pool = unsafe { PagePool::new(region.clone(), mm, Some(el2)) };
        let all_unmapped = || {
            (region.start.0..region.end.0)
                .step_by(PAGE_SIZE)
                .all(|pa| !el2.mapped(PhysAddr(pa)))
        };
        assert!(all_unmapped());
        mm.reset_counters();
        let pages: Vec<PhysAddr> = (0..3).map(|_| pool.alloc_zeroed().expect("page")).collect();
        assert!(pages.iter().all(|&pa| el2.mapped(pa)));
        assert_eq!(pool.free_pages(), 5);
        // SAFETY: unused pages from this pool.
        unsafe { pool.free_many(&pages[1..]) };
        assert_eq!(pool.state.lock().cache, [pages[1], pages[2]]);
        assert!(!el2.mapped(pages[1]) && !el2.mapped(pages[2]));
        assert_eq!(pool.free_pages(), 7);
        // The least recently freed page first (a freed page stays unmapped
        // as long as possible), mapped again.
        assert_eq!(pool.alloc_zeroed(), Ok(pages[1]));
        assert!(el2.mapped(pages[1]));
        assert_eq!(pool.free_pages(), 6);
        // The reserve takes from the cache too; its pages are mapped.
        pool.top_up(2).expect("reserve");
        assert!(pool.state.lock().cache.is_empty());
        assert!(el2.mapped(pages[2]));
        assert_eq!((pool.free_pages(), pool.reserved()), (6, 2));
        pool.release_reserve();
        assert_eq!(pool.free_pages(), 6);
        // SAFETY: unused pages from this pool.
        unsafe { pool.free_many(&[pages[0], pages[1]]) };
        assert_eq!(pool.free_pages(), 8);
        assert!(all_unmapped(), "a free page is still mapped");
        assert_eq!(
            (
                mm.total("guard_maps"),
                mm.total("guard_unmaps"),
                mm.total("pool_allocs"),
                mm.total("pool_frees")
            ),
            (6, 6, 4, 6)
        );
    }

    #[test]
    fn exhaustion_takes_the_cache_and_the_buddy_allocator() {
        let mm = MmCtx::new(NoopArch);
        let pool = host_pool(6, &mm);
        // A cache smaller than the burst of frees below: the rest goes to
        // the buddy allocator.
        pool.state.lock().cache_cap = 2;
        let take_all = || {
            let mut pages = Vec::new();
            while let Ok(pa) = pool.alloc_zeroed() {
                pages.push(pa);
                assert_eq!(pool.free_pages(), 6 - pages.len());
            }
            pages
        };
        let mut pages = take_all();
        assert_eq!(pages.len(), 6);
        assert_eq!(pool.alloc_zeroed(), Err(PoolError::Exhausted));
        // SAFETY: unused pages from this pool.
        unsafe { pool.free_many(&pages) };
        assert_eq!(pool.state.lock().cache.len(), 2);
        assert_eq!(pool.free_pages(), 6);
        // Every page comes back out, from both, each once.
        let mut again = take_all();
        assert_eq!(pool.alloc_zeroed(), Err(PoolError::Exhausted));
        pages.sort_unstable();
        again.sort_unstable();
        assert_eq!(pages, again);
        // A top-up the pool cannot supply leaves cache, buddy and count as
        // they were.
        // SAFETY: unused pages from this pool.
        unsafe { pool.free_many(&again[..3]) };
        let cache_before = pool.state.lock().cache.clone();
        assert_eq!(pool.top_up(4), Err(PoolError::Exhausted));
        assert_eq!(pool.state.lock().cache, cache_before);
        assert_eq!((pool.free_pages(), pool.reserved()), (3, 0));
        // An injected failure takes nothing either.
        pool.fail_after(Some(1));
        assert!(pool.alloc_zeroed().is_ok());
        assert_eq!(pool.alloc_zeroed(), Err(PoolError::Injected));
        assert_eq!(pool.free_pages(), 2);
        pool.fail_after(None);
        pool.top_up(2).expect("the last two");
        // Reserve pages count as free (not handed out).
        assert_eq!((pool.free_pages(), pool.reserved()), (2, 2));
        assert_eq!(pool.state.lock().free_pages, 0);
    }

    /// Pages handed out (offset in the region, zeroed), the error, the
    /// `pool_allocs` and `reserve_allocs` counters, and free pages after.
    type Outcome = (Vec<(usize, bool)>, Option<PoolError>, [u64; 2], usize);

    /// One pool's allocation of `n` pages, after `reserve` pages were put in
    /// the reserve and `fail_after` set, every page scribbled on first: the
    /// pages (as offsets in the region), whether each came back zeroed, the
    /// error, and the counters and free pages after.
    fn allocation_outcome(
        region: &Range<PhysAddr>,
        reserve: usize,
        fail_after: Option<usize>,
        n: usize,
        many: bool,
    ) -> Outcome {
        let mm = leak(MmCtx::new(NoopArch));
        let pages = region.end.offset_from(region.start) / PAGE_SIZE;
        // SAFETY: host memory of this test that only this pool uses while it
        // lives (the caller's previous pool over it is gone).
        let pool = unsafe { PagePool::new(region.clone(), mm, None) };
        // SAFETY: the whole region is free host memory of this test (nothing
        // handed out yet), writable at its address.
        unsafe { core::ptr::write_bytes(region.start.0 as *mut u8, 0x5a, pages * PAGE_SIZE) };
        pool.top_up(reserve).expect("reserve");
        pool.fail_after(fail_after);
        mm.reset_counters();
        let mut out = Vec::new();
        let err = if many {
            pool.alloc_zeroed_many(n, &mut out).err()
        } else {
            (0..n)
                .try_for_each(|_| pool.alloc_zeroed().map(|pa| out.push(pa)))
                .err()
        };
        let seen = out
            .iter()
            .map(|&pa| {
                // SAFETY: a page just handed out, PAGE_SIZE long.
                let bytes = unsafe { core::slice::from_raw_parts(pa.0 as *const u8, PAGE_SIZE) };
                (pa.offset_from(region.start), bytes.iter().all(|&b| b == 0))
            })
            .collect();
        let counts = [mm.total("pool_allocs"), mm.total("reserve_allocs")];
        (seen, err, counts, pool.free_pages())
    }

    #[test]
    fn alloc_zeroed_many_is_that_many_alloc_zeroed() {
        for (pages, reserve, fail_after, n) in [
            (8, 0, None, 5),
            (8, 3, None, 6),
            (8, 3, None, 8),
            (8, 2, None, 9),
            (8, 2, Some(1), 4),
            (8, 2, Some(3), 4),
            (8, 0, Some(0), 2),
            (4, 4, None, 4),
            (4, 0, None, 0),
        ] {
            // The same region for both (the buddy allocator's choices depend
            // on the addresses).
            let region = host_region(pages);
            let one_by_one = allocation_outcome(&region, reserve, fail_after, n, false);
            let many = allocation_outcome(&region, reserve, fail_after, n, true);
            assert_eq!(
                many, one_by_one,
                "{pages} pages, {reserve} reserved, {fail_after:?}, {n}"
            );
            assert!(many.0.iter().all(|&(_, zeroed)| zeroed));
        }
    }

    #[test]
    fn guard_mode_maps_on_alloc_and_unmaps_with_tlbi_on_free() {
        let mm = leak(MmCtx::new(NoopArch));
        let el2 = leak(CountingEl2);
        // SAFETY: fresh host memory, only this pool uses it.
        let pool = unsafe { PagePool::new(host_region(8), mm, Some(el2)) };
        mm.reset_counters();
        let pa = pool.alloc_zeroed().expect("page");
        // Eager (no section): DSB ISHST + ISB for the new valid entry.
        assert_eq!(
            (
                mm.total("dsb_ishst"),
                mm.total("isb"),
                mm.total("guard_maps")
            ),
            (1, 1, 1)
        );
        // SAFETY: unused page from this pool.
        unsafe { pool.free(pa) };
        assert_eq!(mm.total("tlbi_vae2is"), 1);
        assert_eq!(mm.total("guard_unmaps"), 1);
        assert!(mm.nothing_pending());
    }
}
