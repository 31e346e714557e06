//! Test fixtures: the mm core on the host model (`mm::model`), with a guarded
//! pool, an EL2 map for guard mode, one guest's stage 2, and a reference
//! model (a plain IPA page -> PA + permission map) to check against.

#![allow(
    clippy::must_use_candidate,
    clippy::missing_panics_doc,
    clippy::missing_errors_doc,
    reason = "test fixtures: a failing setup is a failing test"
)]

use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{El23Attributes, PhysicalAddress};
use aarch64_paging::paging::{Constraints, El2, MemoryRegion, PageTable, Translation};
use alloc::collections::BTreeMap;
use core::ops::Range;
use core::ptr::NonNull;
use spin::mutex::SpinMutex;

use super::arch::{MmArch, Vmid};
use super::lazy::{MmCtx, NestPolicy};
use super::model::{Model, Regime};
use super::pool::test_support::{host_region, leak};
use super::pool::{El2PageMap, PagePool};
use super::stage2::{S2Attrs, S2Perm, Stage2};
use super::{Ipa, PAGE_SIZE, PhysAddr};

/// Table pages for the host EL2 map: a bump allocator over a host region.
#[derive(Debug)]
struct BumpTables {
    next: usize,
    end: usize,
}

impl Translation<El23Attributes> for BumpTables {
    fn allocate_table(&mut self) -> (NonNull<PageTable<El23Attributes>>, PhysicalAddress) {
        assert!(
            self.next < self.end,
            "EL2 table region of the test kit is too small"
        );
        let pa = self.next;
        self.next += PAGE_SIZE;
        (
            NonNull::new(pa as *mut _).expect("non-null"),
            PhysicalAddress(pa),
        )
    }

    unsafe fn deallocate_table(&mut self, _page_table: NonNull<PageTable<El23Attributes>>) {}

    fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<El23Attributes>> {
        NonNull::new(pa.0 as *mut _).expect("non-null")
    }
}

/// The hypervisor's EL2 map on the host: identity over the pool region,
/// page-granular, tables in a region the model snapshots.
#[allow(missing_debug_implementations, reason = "test fixture")]
pub struct HostEl2(SpinMutex<Mapping<BumpTables, El2>>);

const EL2_DATA: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::USER_RES1)
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::ATTRIBUTE_INDEX_1)
    .union(El23Attributes::INNER_SHAREABLE)
    .union(El23Attributes::XN);

impl HostEl2 {
    fn new(tables: Range<usize>, pool: &Range<usize>) -> Self {
        // Root level 0: 48-bit VAs, so host addresses fit (the model walks EL2
        // from level 0 too).
        let mut map = Mapping::new(
            BumpTables {
                next: tables.start,
                end: tables.end,
            },
            0,
            El2,
        );
        map.map_range(
            &MemoryRegion::new(pool.start, pool.end),
            PhysicalAddress(pool.start),
            EL2_DATA,
            Constraints::NO_BLOCK_MAPPINGS,
        )
        .expect("host pool inside the EL2 map's VA space");
        Self(SpinMutex::new(map))
    }

    fn root(&self) -> usize {
        self.0.lock().root_address().0
    }
}

impl El2PageMap for HostEl2 {
    fn set_page(&self, va: PhysAddr, valid: bool) -> u64 {
        let flags = if valid {
            EL2_DATA
        } else {
            EL2_DATA - El23Attributes::VALID
        };
        self.0
            .lock()
            .map_range(
                &MemoryRegion::new(va.0, va.0 + PAGE_SIZE),
                PhysicalAddress(va.0),
                flags,
                Constraints::NO_BLOCK_MAPPINGS,
            )
            .expect("pool page inside the EL2 map");
        1
    }
}

/// The VMID of the kit's guest.
pub const VMID: Vmid = Vmid(1);

/// A model-backed mm core with one guest.
#[allow(missing_debug_implementations, reason = "test fixture")]
pub struct Kit {
    /// The hardware model.
    pub model: Model,
    /// The mm context.
    pub mm: &'static MmCtx<'static, Model>,
    /// The table pool (guarded or not).
    pub pool: &'static PagePool<'static, Model>,
    /// The guest's stage 2.
    pub s2: Stage2<'static, Model>,
    /// What the guest's stage 2 must translate to.
    pub reference: BTreeMap<Ipa, (PhysAddr, S2Perm)>,
}

impl Kit {
    /// A kit with `pool_pages` pages of table memory, on a model of two
    /// CPUs (the mm core's and an observer).
    pub fn new(pool_pages: usize, guard: bool, policy: NestPolicy) -> Self {
        Self::new_smp(pool_pages, guard, policy, super::model::MODEL_CPUS)
    }

    /// [`new`](Self::new) on a model of `cpus` CPUs.
    pub fn new_smp(pool_pages: usize, guard: bool, policy: NestPolicy, cpus: usize) -> Self {
        let pool_region = host_region(pool_pages);
        let el2_tables = host_region(8);
        // The model and the EL2 map work on raw addresses.
        let raw = |r: &Range<PhysAddr>| r.start.0..r.end.0;
        // SAFETY: both regions are leaked host memory that outlive the model.
        let model = unsafe { Model::new_smp(&[raw(&pool_region), raw(&el2_tables)], cpus) };
        let mm = leak(MmCtx::new(model.clone()));
        mm.set_policy(policy);
        let el2: &'static HostEl2 = leak(HostEl2::new(raw(&el2_tables), &raw(&pool_region)));
        model.set_el2_root(el2.root());
        // The EL2 map as built is in effect (as on the hypervisor, where it
        // is switched to before the pool exists).
        model.dsb_ishst();
        model.isb();
        let guard: Option<&'static dyn El2PageMap> = if guard { Some(el2) } else { None };
        // SAFETY: the region is leaked host memory used by this pool alone;
        // `el2` maps it and only the pool changes those entries.
        let pool: &'static PagePool<'static, Model> =
            leak(unsafe { PagePool::new(pool_region, mm, guard) });
        mm.set_free_hook(leak(move |pages: &[PhysAddr]| {
            // SAFETY: the mm core hands over only detached tables whose TLB
            // maintenance has completed.
            unsafe { pool.free_many(pages) };
        }));
        let s2 = Stage2::new(VMID, mm, pool).expect("root table");
        model.set_stage2_root(VMID, s2.root().0);
        mm.reset_counters();
        model.reset_stats();
        Self {
            model,
            mm,
            pool,
            s2,
            reference: BTreeMap::new(),
        }
    }

    /// Records in the reference that `[ipa, ipa + size)` maps to `pa` with `perm`.
    pub fn ref_map(&mut self, ipa: Ipa, size: usize, pa: PhysAddr, perm: S2Perm) {
        for off in (0..size).step_by(PAGE_SIZE) {
            self.reference
                .insert(ipa.add(off as u64), (pa.add(off), perm));
        }
    }

    /// Records in the reference that `[ipa, ipa + size)` is unmapped.
    pub fn ref_unmap(&mut self, ipa: Ipa, size: usize) {
        for off in (0..size).step_by(PAGE_SIZE) {
            self.reference.remove(&ipa.add(off as u64));
        }
    }

    /// The guest reads every mapped page of `window`, filling the model's
    /// TLBs as a running guest would.
    pub fn touch(&self, window: &Range<u64>) {
        let _pages_touched = self.model.touch_guest(VMID, window.clone());
    }

    /// [`touch`](Self::touch) by the guest on every model CPU (the
    /// observer's TLB and walk cache filled too).
    pub fn touch_all_cpus(&self, window: &Range<u64>) {
        for cpu in 0..self.model.cpus() {
            let _pages_touched = self.model.touch_guest_on(cpu, VMID, window.clone());
        }
    }

    /// Table pages reachable from the stage-2 root, the root included.
    pub fn table_pages(&self) -> usize {
        fn count(table: usize, level: usize) -> usize {
            let mut n = 1;
            if level < 3 {
                for i in 0..512 {
                    // SAFETY: `table` is a live table page of the kit's pool
                    // (reached from the root through table descriptors).
                    let d = unsafe { core::ptr::read_volatile((table as *const u64).add(i)) };
                    if d & 3 == 3 {
                        n += count((d & 0x0000_ffff_ffff_f000) as usize, level + 1);
                    }
                }
            }
            n
        }
        count(self.s2.root().0, 1)
    }

    /// Checks the state a guest would run on (after an eager operation or a
    /// section's end): the live tables equal the reference over `window`,
    /// every TLB entry agrees with the live tables, nothing is left in the
    /// store buffer or pending, every reference page is reachable by the
    /// guest with its permissions, and the pool balances.
    pub fn check(&self, window: &Range<u64>) -> Result<(), alloc::string::String> {
        use alloc::format;
        let violations = self.model.violations();
        if !violations.is_empty() {
            return Err(format!(
                "{} model rule violation(s), first: {}",
                violations.len(),
                violations[0]
            ));
        }
        if !self.mm.nothing_pending() {
            return Err("mm core still owes barriers or TLBIs".into());
        }
        self.s2.check_valid_counts()?;
        if !self.model.is_quiescent() {
            return Err("model not quiescent: stores or TLBIs outstanding".into());
        }
        let stale = self.model.stale_entries();
        if !stale.is_empty() {
            return Err(format!(
                "{} stale TLB entries, first {:?}",
                stale.len(),
                stale[0]
            ));
        }
        let walks = self.model.stale_walks();
        if !walks.is_empty() {
            return Err(format!(
                "{} stale walk-cache entries, first (cpu, regime, level, base, table) {:?}",
                walks.len(),
                walks[0]
            ));
        }
        for ipa in (window.start..window.end).step_by(PAGE_SIZE) {
            let live = self.model.walk_live(Regime::Stage2(VMID), ipa);
            let want = self.reference.get(&Ipa(ipa));
            match (live, want) {
                (None, None) => {}
                (Some(l), Some(&(pa, perm))) => {
                    let got = l.out + (ipa - l.base) as usize;
                    if got != pa.0
                        || l.perm.read != perm.read
                        || l.perm.write != perm.write
                        || l.perm.exec != perm.exec
                    {
                        return Err(format!(
                            "IPA {ipa:#x}: tables give {l:?}, reference {pa:#x} {perm:?}"
                        ));
                    }
                    // The guest gets there, with the right permissions.
                    match self.model.guest_access(VMID, ipa, false) {
                        Ok(got) if got == pa.0 => {}
                        other => {
                            return Err(format!(
                                "IPA {ipa:#x}: guest read gives {other:?}, want {pa:#x}"
                            ));
                        }
                    }
                    if self.model.guest_access(VMID, ipa, true).is_ok() != perm.write {
                        return Err(format!(
                            "IPA {ipa:#x}: guest write allowed != {}",
                            perm.write
                        ));
                    }
                }
                (l, w) => return Err(format!("IPA {ipa:#x}: tables give {l:?}, reference {w:?}")),
            }
        }
        let used = self.table_pages();
        if self.pool.free_pages() + used != self.pool.total_pages() {
            return Err(format!(
                "pool does not balance: {} free + {used} tables != {}",
                self.pool.free_pages(),
                self.pool.total_pages()
            ));
        }
        Ok(())
    }
}

/// The attributes of guest RAM with `perm`.
pub fn ram(perm: S2Perm) -> S2Attrs {
    S2Attrs {
        perm,
        mem: super::stage2::MemType::Normal,
    }
}
