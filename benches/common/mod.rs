//! What both host benchmarks share: the leak helper for the manager's
//! `'static` fixtures, host memory for its pool, and aarch64-paging's table
//! allocator and RAM flags for the raw comparison.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

use aarch64_paging::descriptor::{PhysicalAddress, Stage2Attributes};
use aarch64_paging::paging::{PageTable, Translation};
use lazyhyp::mm::arch::{NoopArch, Vmid};
use lazyhyp::mm::lazy::MmCtx;
use lazyhyp::mm::pool::PagePool;
use lazyhyp::mm::stage2::Stage2;
use lazyhyp::mm::{PAGE_SIZE, PhysAddr};

/// `S2Attrs::RAM` as aarch64-paging flags: normal memory, inner and outer
/// write-back, inner shareable, read-write, access flag (executable).
pub const RAM_FLAGS: Stage2Attributes = Stage2Attributes::VALID
    .union(Stage2Attributes::ACCESS_FLAG)
    .union(Stage2Attributes::MEMATTR_NORMAL_INNER_WB)
    .union(Stage2Attributes::MEMATTR_NORMAL_OUTER_WB)
    .union(Stage2Attributes::SH_INNER)
    .union(Stage2Attributes::S2AP_ACCESS_RW);

/// Leaks `x`, for the `'static` borrows the manager's fixtures need.
pub fn leak<T>(x: T) -> &'static T {
    Box::leak(Box::new(x))
}

/// `pages` pages of zeroed, page-aligned host memory, leaked.
pub fn host_region(pages: usize) -> std::ops::Range<PhysAddr> {
    let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("layout");
    // SAFETY: the layout has a non-zero size.
    let base = unsafe { alloc_zeroed(layout) } as usize;
    assert_ne!(base, 0, "host allocation failed");
    PhysAddr(base)..PhysAddr(base + pages * PAGE_SIZE)
}

/// The manager's side: context, pool, one guest's tables.
pub struct Ours {
    pub mm: &'static MmCtx<'static, NoopArch>,
    pub pool: &'static PagePool<'static, NoopArch>,
    pub s2: Stage2<'static, NoopArch>,
}

impl Ours {
    /// A context without hardware, a pool of `pool_pages` pages whose frees
    /// go back to it, and the tables of VMID 1.
    pub fn with_pool(pool_pages: usize) -> Self {
        let mm = leak(MmCtx::new(NoopArch));
        // SAFETY: fresh, leaked, page-aligned host memory that only this
        // pool uses; on the host it is "mapped" read-write at its address.
        let pool = leak(unsafe { PagePool::new(host_region(pool_pages), mm, None) });
        mm.set_free_hook(leak(move |pages: &[PhysAddr]| {
            // All of them at once, as the hypervisor's hook does.
            // SAFETY: the mm core hands over only detached tables whose TLB
            // maintenance has completed.
            unsafe { pool.free_many(pages) };
        }));
        let s2 = Stage2::new(Vmid(1), mm, pool).expect("root table");
        Self { mm, pool, s2 }
    }
}

/// Table pages for aarch64-paging: a free list over the global allocator.
/// Pages are zeroed as they are handed out (as the pool does).
pub struct FreeListTables {
    pub free: Vec<NonNull<PageTable<Stage2Attributes>>>,
}

impl Translation<Stage2Attributes> for FreeListTables {
    fn allocate_table(&mut self) -> (NonNull<PageTable<Stage2Attributes>>, PhysicalAddress) {
        let table = if let Some(table) = self.free.pop() {
            // SAFETY: a page from `PageTable::new` that aarch64-paging gave
            // back and no table refers to any more; all zeroes is an empty
            // table.
            unsafe { std::ptr::write_bytes(table.as_ptr(), 0, 1) };
            table
        } else {
            PageTable::new()
        };
        // Identity: the host address stands in for the physical one.
        (table, PhysicalAddress(table.as_ptr() as usize))
    }

    unsafe fn deallocate_table(&mut self, page_table: NonNull<PageTable<Stage2Attributes>>) {
        self.free.push(page_table);
    }

    fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<Stage2Attributes>> {
        NonNull::new(pa.0 as *mut PageTable<Stage2Attributes>).expect("table at address 0")
    }
}

impl Drop for FreeListTables {
    fn drop(&mut self) {
        let layout = Layout::new::<PageTable<Stage2Attributes>>();
        for table in self.free.drain(..) {
            // SAFETY: every page on the list came from `PageTable::new`
            // (the global allocator, `PageTable`'s layout) and is no longer
            // part of any table.
            unsafe { dealloc(table.as_ptr().cast(), layout) };
        }
    }
}
