//! The stage-2 manager: a guest's IPA -> PA tables, built with
//! aarch64-paging's `Stage2` regime, with this layer owning all TLB
//! maintenance.
//!
//! # Who does TLB maintenance
//!
//! aarch64-paging's `Stage2` invalidation issues `TLBI IPAS2E1IS` without the
//! `TLBI VMALLE1IS` that combined stage-1+2 entries need, and without a VMID.
//! So the `Mapping` here is never marked active: aarch64-paging then treats
//! every change as a change to an inactive table (no barriers, no TLBIs), and
//! this module issues them itself, in the guest's VMID, through
//! [`MmArch`].
//!
//! # Table memory: prepare, then commit
//!
//! aarch64-paging's table allocation cannot fail. So, as in Hafnium's
//! prepare/commit, an operation first *prepares*: it takes from the pool as
//! many zeroed pages as the change can need at most (fallible; on failure
//! nothing has been written), then *commits* the change, drawing tables from
//! that reserve only, and gives the unused rest back. Table pages that the
//! change detaches are released to the pool only after the TLB maintenance
//! that hides them from walkers has completed.
//!
//! # IPA space
//!
//! 39-bit IPA space (512 GiB): `VTCR_EL2.T0SZ = 25`, walks start at level 1
//! with one 4 KiB root table (no concatenated roots), so aarch64-paging's
//! root-level-1 layout applies unchanged.

use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{PhysicalAddress, Stage2Attributes};
use aarch64_paging::paging::{self, Constraints, MemoryRegion, PageTable, Translation};
use alloc::vec::Vec;
use core::cell::RefCell;
use core::ptr::NonNull;
use spin::Mutex;

use super::arch::{MmArch, Vmid};
use super::counters::{MmCounters, add, inc};
use super::pool::{PagePool, PoolError};
use super::{BLOCK_1G, BLOCK_2M, Ipa, PAGE_SIZE, PhysAddr};

/// Bits of IPA space given to every guest.
pub const IPA_BITS: u32 = 39;

/// First IPA beyond the guest's IPA space.
pub const IPA_LIMIT: Ipa = 1 << IPA_BITS;

/// Level at which stage-2 walks start (with `IPA_BITS` and a 4 KiB granule).
const ROOT_LEVEL: usize = 1;

/// Stage-2 access permissions.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct S2Perm {
    /// The guest may read.
    pub read: bool,
    /// The guest may write.
    pub write: bool,
    /// The guest may execute.
    pub exec: bool,
}

impl S2Perm {
    /// Read, write and execute.
    pub const RWX: Self = Self {
        read: true,
        write: true,
        exec: true,
    };
    /// Read and write, no execute.
    pub const RW: Self = Self {
        read: true,
        write: true,
        exec: false,
    };
    /// Read only, no execute.
    pub const RO: Self = Self {
        read: true,
        write: false,
        exec: false,
    };
}

/// Stage-2 memory type.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum MemType {
    /// Normal memory, inner and outer write-back cacheable, inner shareable.
    Normal,
    /// Device-nGnRE memory (never executable).
    Device,
}

/// The attributes of a stage-2 mapping.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct S2Attrs {
    /// Access permissions.
    pub perm: S2Perm,
    /// Memory type.
    pub mem: MemType,
}

impl S2Attrs {
    /// Guest RAM: normal memory, read-write-execute.
    pub const RAM: Self = Self {
        perm: S2Perm::RWX,
        mem: MemType::Normal,
    };
    /// A passed-through device: device memory, read-write.
    pub const DEVICE: Self = Self {
        perm: S2Perm::RW,
        mem: MemType::Device,
    };

    fn descriptor_flags(self) -> Stage2Attributes {
        let mut flags = Stage2Attributes::VALID | Stage2Attributes::ACCESS_FLAG;
        flags |= match self.mem {
            MemType::Normal => {
                Stage2Attributes::MEMATTR_NORMAL_INNER_WB
                    | Stage2Attributes::MEMATTR_NORMAL_OUTER_WB
                    | Stage2Attributes::SH_INNER
            }
            MemType::Device => Stage2Attributes::MEMATTR_DEVICE_nGnRE,
        };
        flags |= match (self.perm.read, self.perm.write) {
            (true, true) => Stage2Attributes::S2AP_ACCESS_RW,
            (true, false) => Stage2Attributes::S2AP_ACCESS_RO,
            (false, true) => Stage2Attributes::S2AP_ACCESS_WO,
            (false, false) => Stage2Attributes::S2AP_ACCESS_NONE,
        };
        if !self.perm.exec || self.mem == MemType::Device {
            flags |= Stage2Attributes::XN;
        }
        flags
    }

    fn from_descriptor_flags(flags: Stage2Attributes) -> Self {
        let ap = flags & Stage2Attributes::S2AP_ACCESS_RW;
        let mem = if (flags & Stage2Attributes::MEMATTR_NORMAL_OUTER_WB).is_empty() {
            MemType::Device
        } else {
            MemType::Normal
        };
        Self {
            perm: S2Perm {
                read: ap.contains(Stage2Attributes::S2AP_ACCESS_RO),
                write: ap.contains(Stage2Attributes::S2AP_ACCESS_WO),
                exec: !flags.contains(Stage2Attributes::XN),
            },
            mem,
        }
    }
}

/// What an IPA translates to.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct S2Translation {
    /// The physical address the IPA maps to.
    pub pa: PhysAddr,
    /// The attributes of the leaf entry.
    pub attrs: S2Attrs,
    /// Level of the leaf entry: 3 for a page, 2 for a 2 MiB block, 1 for a
    /// 1 GiB block.
    pub level: usize,
}

/// Every reason a stage-2 operation is refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Stage2Error {
    /// The IPA, PA or size is not a multiple of 4 KiB.
    Unaligned,
    /// The size is zero.
    EmptyRange,
    /// `ipa + size` or `pa + size` overflows.
    Overflow,
    /// The range reaches beyond the guest's IPA space.
    OutsideIpaSpace,
    /// Part of the range is already mapped; replacing a live mapping needs
    /// break-before-make, which `map` does not do.
    AlreadyMapped,
    /// The page pool could not supply the translation tables the change needs.
    OutOfTableMemory(PoolError),
    /// The CPU's physical address range is too small for the IPA space.
    PaRangeTooSmall,
}

/// Pages a [`TableReserve`] holds.
#[derive(Debug, Default)]
struct ReservePages {
    /// Zeroed pool pages prepared for the operation in progress.
    reserve: Vec<PhysAddr>,
    /// Table pages aarch64-paging detached; they are freed only after the
    /// TLB maintenance that hides them from walkers.
    detached: Vec<PhysAddr>,
}

/// The table-page source handed to aarch64-paging.
///
/// aarch64-paging only lends its translation out by shared reference, so the
/// pages sit in a `RefCell` that this module borrows between calls into
/// aarch64-paging (never during one).
#[derive(Debug, Default)]
struct TableReserve(RefCell<ReservePages>);

impl Translation<Stage2Attributes> for TableReserve {
    fn allocate_table(&mut self) -> (NonNull<PageTable<Stage2Attributes>>, PhysicalAddress) {
        // The prepare step sized the reserve for the worst case; running dry
        // means that bound is wrong, which is a bug, not a runtime condition.
        let pa = self
            .0
            .get_mut()
            .reserve
            .pop()
            .expect("stage-2 table reserve exhausted: prepare step under-counted");
        let ptr = NonNull::new(pa as *mut PageTable<Stage2Attributes>)
            .expect("pool pages are never at address 0");
        (ptr, PhysicalAddress(pa))
    }

    unsafe fn deallocate_table(&mut self, page_table: NonNull<PageTable<Stage2Attributes>>) {
        self.0
            .get_mut()
            .detached
            .push(page_table.as_ptr() as PhysAddr);
    }

    fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<Stage2Attributes>> {
        // Pool pages are identity-mapped.
        NonNull::new(pa.0 as *mut PageTable<Stage2Attributes>)
            .expect("table descriptors never point at address 0")
    }
}

/// One guest's stage-2 translation tables.
pub struct Stage2<'p, A: MmArch> {
    mapping: Mapping<TableReserve, paging::Stage2>,
    vmid: Vmid,
    arch: A,
    pool: &'p Mutex<PagePool>,
    counters: &'p MmCounters,
}

impl<A: MmArch> core::fmt::Debug for Stage2<'_, A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Stage2")
            .field("vmid", &self.vmid)
            .field(
                "root",
                &format_args!("{:#x}", self.mapping.root_address().0),
            )
            .finish_non_exhaustive()
    }
}

impl<'p, A: MmArch> Stage2<'p, A> {
    /// Creates empty tables for `vmid`, taking the root table from `pool`.
    ///
    /// # Errors
    ///
    /// [`Stage2Error::OutOfTableMemory`] if the pool has no page for the root.
    pub fn new(
        vmid: Vmid,
        arch: A,
        pool: &'p Mutex<PagePool>,
        counters: &'p MmCounters,
    ) -> Result<Self, Stage2Error> {
        let root = pool
            .lock()
            .alloc_zeroed(counters)
            .map_err(Stage2Error::OutOfTableMemory)?;
        let tables = TableReserve(RefCell::new(ReservePages {
            reserve: alloc::vec![root],
            detached: Vec::new(),
        }));
        let mapping = Mapping::new(tables, ROOT_LEVEL, paging::Stage2);
        Ok(Self {
            mapping,
            vmid,
            arch,
            pool,
            counters,
        })
    }

    /// The VMID these tables are tagged with.
    #[must_use]
    pub fn vmid(&self) -> Vmid {
        self.vmid
    }

    /// The value for `VTTBR_EL2`: root table address and VMID.
    #[must_use]
    pub fn vttbr(&self) -> u64 {
        self.mapping.root_address().0 as u64 | (u64::from(self.vmid.0) << 48)
    }

    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)` with `attrs`, using
    /// 2 MiB and 1 GiB blocks where both addresses are aligned to them.
    ///
    /// The range must be unmapped: making an invalid entry valid needs no
    /// TLB maintenance (the architecture never caches a translation that
    /// faults), only a `DSB ISHST` so the walker sees the new entries.
    ///
    /// # Errors
    ///
    /// Any [`Stage2Error`] but `PaRangeTooSmall`; on error the tables are as
    /// they were before the call.
    ///
    /// # Panics
    ///
    /// Only on a broken internal invariant (aarch64-paging refusing a range
    /// this function already checked).
    pub fn map(
        &mut self,
        ipa: Ipa,
        size: usize,
        pa: PhysAddr,
        attrs: S2Attrs,
    ) -> Result<(), Stage2Error> {
        let region = Self::checked_region(ipa, size)?;
        if !pa.is_multiple_of(PAGE_SIZE) {
            return Err(Stage2Error::Unaligned);
        }
        pa.checked_add(size).ok_or(Stage2Error::Overflow)?;
        if self.any_valid(&region) {
            return Err(Stage2Error::AlreadyMapped);
        }

        let prepared = tables_needed_upper_bound(ipa as usize, size, pa);
        self.prepare(prepared)?;
        let result = self.mapping.map_range(
            &region,
            PhysicalAddress(pa),
            attrs.descriptor_flags(),
            Constraints::NO_CONTIGUOUS_HINT,
        );
        let used = self.finish_prepare(prepared);
        // The range was checked above; aarch64-paging has nothing left to refuse.
        result.expect("map_range on a checked, unmapped region");

        let (leaves, blocks) = self.count_leaves(&region);
        add(&self.counters.pte_writes, (leaves + used) as u64);
        add(&self.counters.blocks_mapped, blocks as u64);
        add(&self.counters.pages_mapped, (size / PAGE_SIZE) as u64);
        inc(&self.counters.mappings);

        // Invalid -> valid: no TLBI. The DSB makes the new entries visible to
        // the table walkers before the guest next runs; the ISB keeps this
        // PE's later instructions behind them (the ERET into the guest would
        // also do it, but the mm core does not assume how it is left).
        self.dsb_ishst();
        self.isb();
        Ok(())
    }

    /// Looks up what `ipa` translates to, if it is mapped.
    ///
    /// # Panics
    ///
    /// Only if aarch64-paging refuses to walk an in-range page (a bug).
    #[must_use]
    pub fn query(&self, ipa: Ipa) -> Option<S2Translation> {
        if ipa >= IPA_LIMIT {
            return None;
        }
        let page = ipa as usize & !(PAGE_SIZE - 1);
        let region = MemoryRegion::new(page, page + PAGE_SIZE);
        let mut found = None;
        self.mapping
            .walk_range(&region, &mut |_, desc, level| {
                if desc.is_valid() {
                    let span = paging_granularity(level);
                    let offset = ipa as usize & (span - 1);
                    found = Some(S2Translation {
                        pa: desc.output_address().0 + offset,
                        attrs: S2Attrs::from_descriptor_flags(desc.flags()),
                        level,
                    });
                }
                Ok(())
            })
            .expect("walk of a checked in-range region");
        found
    }

    /// Validates an IPA range and turns it into aarch64-paging's region type.
    fn checked_region(ipa: Ipa, size: usize) -> Result<MemoryRegion, Stage2Error> {
        if size == 0 {
            return Err(Stage2Error::EmptyRange);
        }
        if !ipa.is_multiple_of(PAGE_SIZE as u64) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(Stage2Error::Unaligned);
        }
        let end = ipa.checked_add(size as u64).ok_or(Stage2Error::Overflow)?;
        if end > IPA_LIMIT {
            return Err(Stage2Error::OutsideIpaSpace);
        }
        Ok(MemoryRegion::new(ipa as usize, end as usize))
    }

    fn any_valid(&self, region: &MemoryRegion) -> bool {
        let mut valid = false;
        self.mapping
            .walk_range(region, &mut |_, desc, _| {
                valid |= desc.is_valid();
                Ok(())
            })
            .expect("walk of a checked in-range region");
        valid
    }

    /// Leaf entries covering `region`, and how many of them are blocks.
    fn count_leaves(&self, region: &MemoryRegion) -> (usize, usize) {
        let (mut leaves, mut blocks) = (0, 0);
        self.mapping
            .walk_range(region, &mut |_, desc, level| {
                if desc.is_valid() {
                    leaves += 1;
                    blocks += usize::from(level < 3);
                }
                Ok(())
            })
            .expect("walk of a checked in-range region");
        (leaves, blocks)
    }

    /// Prepare: fills the reserve with `pages` zeroed pool pages, or takes
    /// none at all.
    fn prepare(&mut self, pages: usize) -> Result<(), Stage2Error> {
        let mut pool = self.pool.lock();
        let mut taken = Vec::with_capacity(pages);
        for _ in 0..pages {
            match pool.alloc_zeroed(self.counters) {
                Ok(pa) => taken.push(pa),
                Err(e) => {
                    for pa in taken {
                        // SAFETY: just allocated above and never published
                        // in any table.
                        unsafe { pool.free(pa, self.counters) };
                    }
                    return Err(Stage2Error::OutOfTableMemory(e));
                }
            }
        }
        drop(pool);
        let mut pages = self.reserve_pages();
        debug_assert!(
            pages.reserve.is_empty(),
            "reserve left over from an earlier operation"
        );
        pages.reserve.extend(taken);
        Ok(())
    }

    /// Commit's end: gives unused reserve pages back and returns how many of
    /// the `prepared` pages were used (each became a table, whose descriptor
    /// was written).
    fn finish_prepare(&mut self, prepared: usize) -> usize {
        let leftover: Vec<PhysAddr> = core::mem::take(&mut self.reserve_pages().reserve);
        let detached = core::mem::take(&mut self.reserve_pages().detached);
        // `map` only fills unmapped ranges, so nothing is ever detached
        // here; operations that detach tables must free them after their
        // TLB maintenance instead.
        assert!(
            detached.is_empty(),
            "tables detached by a map of an unmapped range"
        );
        let used = prepared - leftover.len();
        let mut pool = self.pool.lock();
        for pa in leftover {
            // SAFETY: reserve pages still in the reserve were never
            // published in a table (the used ones were popped off it).
            unsafe { pool.free(pa, self.counters) };
        }
        used
    }

    fn reserve_pages(&self) -> core::cell::RefMut<'_, ReservePages> {
        self.mapping.translation().0.borrow_mut()
    }

    fn dsb_ishst(&self) {
        self.arch.dsb_ishst();
        inc(&self.counters.dsb_ishst);
    }

    fn isb(&self) {
        self.arch.isb();
        inc(&self.counters.isb);
    }
}

/// Size of the address range one entry at `level` covers.
fn paging_granularity(level: usize) -> usize {
    match level {
        1 => BLOCK_1G,
        2 => BLOCK_2M,
        _ => PAGE_SIZE,
    }
}

/// Most tables a map of `[ipa, ipa + size)` to `pa` can create: one level-2
/// table per 1 GiB region it touches that will not be a 1 GiB block, and one
/// level-3 table per 2 MiB region that will not be a 2 MiB block.
fn tables_needed_upper_bound(ipa: usize, size: usize, pa: usize) -> usize {
    let end = ipa + size;
    let needs_table = |gran: usize| {
        let blockable = (ipa ^ pa).is_multiple_of(gran);
        let first = ipa / gran;
        let last = (end - 1) / gran;
        (first..=last)
            .filter(|&i| {
                let (lo, hi) = (i * gran, (i + 1) * gran);
                !(blockable && ipa <= lo && end >= hi)
            })
            .count()
    };
    needs_table(BLOCK_1G) + needs_table(BLOCK_2M)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::arch::NoopArch;
    use crate::mm::pool::test_support::host_pool;
    use core::sync::atomic::Ordering::Relaxed;

    const GIB: usize = 1 << 30;

    fn leak<T>(x: T) -> &'static T {
        alloc::boxed::Box::leak(alloc::boxed::Box::new(x))
    }

    fn setup(pool_pages: usize) -> Stage2<'static, NoopArch> {
        let pool = leak(Mutex::new(host_pool(pool_pages)));
        let counters = leak(MmCounters::new());
        Stage2::new(Vmid(1), NoopArch, pool, counters).expect("root table")
    }

    #[test]
    fn vttbr_carries_root_and_vmid() {
        let s2 = setup(4);
        assert_eq!(s2.vttbr() >> 48, 1);
        assert_eq!(s2.vttbr() & 0xfff, 0, "root table is page-aligned");
    }

    #[test]
    fn aligned_map_uses_blocks_and_unaligned_uses_pages() {
        let mut s2 = setup(64);
        // 2 MiB-congruent IPA and PA: blocks.
        s2.map(0x4000_0000, 4 << 20, 0x8000_0000, S2Attrs::RAM)
            .expect("map");
        let t = s2.query(0x4012_3456).expect("mapped");
        assert_eq!((t.pa, t.level, t.attrs), (0x8012_3456, 2, S2Attrs::RAM));
        // PA only 4 KiB-congruent: pages.
        s2.map(0x4040_0000, 8 << 12, 0x9000_1000, S2Attrs::DEVICE)
            .expect("map");
        let t = s2.query(0x4040_1008).expect("mapped");
        assert_eq!((t.pa, t.level, t.attrs), (0x9000_2008, 3, S2Attrs::DEVICE));
        assert_eq!(
            s2.query(0x4040_8000),
            None,
            "one past the end stays unmapped"
        );
        assert_eq!(s2.counters.blocks_mapped.load(Relaxed), 2);
        assert_eq!(s2.counters.pages_mapped.load(Relaxed), (4 << 20) / 4096 + 8);
    }

    #[test]
    fn a_gib_aligned_map_is_one_block_and_takes_no_table_pages() {
        let mut s2 = setup(8);
        let free_before = s2.pool.lock().free_pages();
        s2.map(GIB as u64, GIB, 2 * GIB, S2Attrs::RAM).expect("map");
        assert_eq!(s2.query(GIB as u64 + 5).map(|t| t.level), Some(1));
        assert_eq!(
            s2.pool.lock().free_pages(),
            free_before,
            "reserve fully returned"
        );
    }

    #[test]
    fn bad_ranges_are_refused_with_their_reason() {
        let mut s2 = setup(8);
        let r = S2Attrs::RAM;
        assert_eq!(s2.map(0x1000, 0, 0x1000, r), Err(Stage2Error::EmptyRange));
        assert_eq!(s2.map(0x1001, 4096, 0x1000, r), Err(Stage2Error::Unaligned));
        assert_eq!(s2.map(0x1000, 4096, 0x1001, r), Err(Stage2Error::Unaligned));
        assert_eq!(
            s2.map(IPA_LIMIT - 4096, 8192, 0, r),
            Err(Stage2Error::OutsideIpaSpace)
        );
        assert_eq!(
            s2.map(u64::MAX - 4095, 8192, 0, r),
            Err(Stage2Error::Overflow)
        );
        s2.map(0x4000_0000, 4096, 0x1000, r).expect("map");
        assert_eq!(
            s2.map(0x3fff_f000, 8192, 0x1000, r),
            Err(Stage2Error::AlreadyMapped)
        );
    }

    #[test]
    fn table_allocation_failure_at_every_point_leaves_tables_and_pool_unchanged() {
        // A 4 MiB page-granular map needs one level-2 and two level-3 tables.
        for fail_at in 0..3 {
            let mut s2 = setup(16);
            s2.map(0x4000_0000, 4096, 0x1000, S2Attrs::RAM)
                .expect("first map");
            let free_before = s2.pool.lock().free_pages();
            s2.pool.lock().fail_after(Some(fail_at));
            let r = s2.map(0x8000_0000, 4 << 20, 0x1000, S2Attrs::RAM);
            assert_eq!(r, Err(Stage2Error::OutOfTableMemory(PoolError::Injected)));
            s2.pool.lock().fail_after(None);
            assert_eq!(s2.pool.lock().free_pages(), free_before, "no page leaked");
            assert_eq!(s2.query(0x8000_0000), None, "nothing mapped");
            assert!(s2.query(0x4000_0000).is_some(), "earlier mapping intact");
        }
    }
}
