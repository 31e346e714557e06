//! The page pool: 4 KiB pages for translation tables, handed out by a buddy
//! allocator (`buddy_system_allocator::FrameAllocator`) over one region that
//! the hypervisor reserved for it at boot.
//!
//! Pool pages are identity-mapped in the hypervisor's EL2 map, so a page's
//! physical address is also the address the hypervisor writes it through. On
//! the host, tests back the pool with a heap allocation and its addresses
//! stand in for physical ones.

use buddy_system_allocator::FrameAllocator;
use core::ops::Range;

use super::counters::{MmCounters, inc};
use super::{PAGE_SIZE, PhysAddr};

/// Why the pool could not hand out a page.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum PoolError {
    /// Every page of the pool is in use.
    Exhausted,
    /// A test asked for this allocation to fail (see [`PagePool::fail_after`]).
    Injected,
}

/// A buddy allocator of 4 KiB page frames.
pub struct PagePool {
    frames: FrameAllocator<32>,
    region: Range<PhysAddr>,
    free_pages: usize,
    /// Allocations left before an injected failure; `None` when not injecting.
    fail_after: Option<usize>,
}

impl core::fmt::Debug for PagePool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PagePool")
            .field(
                "region",
                &format_args!("{:#x}..{:#x}", self.region.start, self.region.end),
            )
            .field("free_pages", &self.free_pages)
            .finish_non_exhaustive()
    }
}

impl PagePool {
    /// Creates a pool over `region` (page-aligned physical addresses).
    ///
    /// # Safety
    ///
    /// `region` must be memory that nothing else uses for as long as the pool
    /// and the tables built from it live, and it must be mapped read-write at
    /// the same address (identity) for the code that uses the pool.
    ///
    /// # Panics
    ///
    /// If `region` is empty or not page-aligned.
    #[must_use]
    pub unsafe fn new(region: Range<PhysAddr>) -> Self {
        assert!(
            region.start < region.end
                && region.start.is_multiple_of(PAGE_SIZE)
                && region.end.is_multiple_of(PAGE_SIZE),
            "pool region {:#x}..{:#x} must be non-empty and page-aligned",
            region.start,
            region.end
        );
        let mut frames = FrameAllocator::new();
        frames.add_frame(region.start / PAGE_SIZE, region.end / PAGE_SIZE);
        Self {
            free_pages: (region.end - region.start) / PAGE_SIZE,
            frames,
            region,
            fail_after: None,
        }
    }

    /// The region this pool hands pages out of.
    #[must_use]
    pub fn region(&self) -> Range<PhysAddr> {
        self.region.clone()
    }

    /// Pages not currently handed out.
    #[must_use]
    pub fn free_pages(&self) -> usize {
        self.free_pages
    }

    /// Pages in the pool.
    #[must_use]
    pub fn total_pages(&self) -> usize {
        (self.region.end - self.region.start) / PAGE_SIZE
    }

    /// Makes the allocation after `n` more successful ones fail with
    /// [`PoolError::Injected`] (and every one after it, until cleared with
    /// `None`). For failure-injection tests.
    pub fn fail_after(&mut self, n: Option<usize>) {
        self.fail_after = n;
    }

    /// Takes one page out of the pool and zeroes it.
    ///
    /// # Errors
    ///
    /// [`PoolError::Exhausted`] when no page is free, [`PoolError::Injected`]
    /// when a test asked for this allocation to fail.
    pub fn alloc_zeroed(&mut self, counters: &MmCounters) -> Result<PhysAddr, PoolError> {
        if let Some(left) = self.fail_after.as_mut() {
            if *left == 0 {
                return Err(PoolError::Injected);
            }
            *left -= 1;
        }
        let frame = self.frames.alloc(1).ok_or(PoolError::Exhausted)?;
        let pa = frame * PAGE_SIZE;
        // SAFETY: `pa` is a page of the pool's region, which `new`'s contract
        // says is ours alone and mapped read-write at this address; the
        // allocator just handed it out, so no one else refers to it.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, PAGE_SIZE) };
        self.free_pages -= 1;
        inc(&counters.pool_allocs);
        Ok(pa)
    }

    /// Gives a page back to the pool.
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
    pub unsafe fn free(&mut self, pa: PhysAddr, counters: &MmCounters) {
        assert!(
            self.region.contains(&pa) && pa.is_multiple_of(PAGE_SIZE),
            "freeing {pa:#x}, which is not a page of the pool"
        );
        self.frames.dealloc(pa / PAGE_SIZE, 1);
        self.free_pages += 1;
        inc(&counters.pool_frees);
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A pool backed by leaked, page-aligned host memory.

    use super::PagePool;
    use crate::mm::PAGE_SIZE;
    use alloc::alloc::{Layout, alloc_zeroed};

    /// A pool of `pages` pages of host memory, leaked for the test's lifetime.
    pub fn host_pool(pages: usize) -> PagePool {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) } as usize;
        assert_ne!(base, 0, "host allocation failed");
        // SAFETY: the memory was just allocated, is page-aligned and is never
        // freed or used by anything but this pool.
        unsafe { PagePool::new(base..base + pages * PAGE_SIZE) }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::host_pool;
    use super::*;

    #[test]
    fn alloc_zeroes_and_free_balances() {
        let counters = MmCounters::new();
        let mut pool = host_pool(4);
        let a = pool.alloc_zeroed(&counters).expect("page");
        // SAFETY: `a` is a pool page we own.
        unsafe { core::ptr::write_bytes(a as *mut u8, 0xaa, PAGE_SIZE) };
        // SAFETY: nothing refers to `a`.
        unsafe { pool.free(a, &counters) };
        let b = pool.alloc_zeroed(&counters).expect("page");
        // SAFETY: `b` is a pool page we own, PAGE_SIZE long.
        let bytes = unsafe { core::slice::from_raw_parts(b as *const u8, PAGE_SIZE) };
        assert!(
            bytes.iter().all(|&x| x == 0),
            "a reused page must come back zeroed"
        );
        assert_eq!(pool.free_pages(), 3);
    }

    #[test]
    fn exhaustion_and_injection_are_errors() {
        let counters = MmCounters::new();
        let mut pool = host_pool(2);
        pool.fail_after(Some(1));
        assert!(pool.alloc_zeroed(&counters).is_ok());
        assert_eq!(pool.alloc_zeroed(&counters), Err(PoolError::Injected));
        pool.fail_after(None);
        assert!(pool.alloc_zeroed(&counters).is_ok());
        assert_eq!(pool.alloc_zeroed(&counters), Err(PoolError::Exhausted));
    }
}
