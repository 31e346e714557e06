//! The hypervisor's own EL2 stage-1 map, built with aarch64-paging's `El2`
//! regime (identity: VA = PA), and the switch from the boot map to it.
//!
//! | region | attributes |
//! |---|---|
//! | image text | read-only, executable |
//! | image rodata | read-only, execute-never |
//! | image data, bss, stacks | read-write, execute-never; lowest boot-stack page left unmapped (guard) |
//! | device tree, guest payload | read-only, execute-never |
//! | heap, page-table pool, guest RAM backing | read-write, execute-never |
//! | PL011 | device-nGnRE, execute-never |
//! | GIC distributor, redistributors (8 CPUs) | device-nGnRE, execute-never |

use aarch64_paging::descriptor::El23Attributes;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{Constraints, El2, MemoryRegion};
use core::ops::Range;

use crate::mm::{PAGE_SIZE, PhysAddr};

use super::console::PL011_BASE;
use super::gic::{GICD_BASE, GICD_SIZE, GICR_BASE, GICR_MAPPED};

/// MAIR_EL2 attribute index of Device-nGnRE.
const MAIR_IDX_DEVICE: El23Attributes = El23Attributes::ATTRIBUTE_INDEX_0;
/// MAIR_EL2 attribute index of Normal write-back.
const MAIR_IDX_NORMAL: El23Attributes = El23Attributes::ATTRIBUTE_INDEX_1;
/// MAIR_EL2: index 0 Device-nGnRE (0x04), index 1 Normal inner/outer
/// write-back read/write-allocate non-transient (0xff). The same as the boot
/// map's, so the switch changes no memory type.
pub const MAIR_EL2: u64 = 0x04 | (0xff << 8);

/// Attributes every valid EL2 entry carries: `AP[1]` is RES1 in the EL2
/// regime; the access flag is set so no access-flag fault is ever taken.
const BASE: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::USER_RES1)
    .union(El23Attributes::ACCESSED);
const NORMAL: El23Attributes = BASE
    .union(MAIR_IDX_NORMAL)
    .union(El23Attributes::INNER_SHAREABLE);
/// Code: read-only, executable.
pub const TEXT: El23Attributes = NORMAL.union(El23Attributes::READ_ONLY);
/// Read-only data.
pub const RODATA: El23Attributes = NORMAL
    .union(El23Attributes::READ_ONLY)
    .union(El23Attributes::XN);
/// Read-write data.
pub const DATA: El23Attributes = NORMAL.union(El23Attributes::XN);
/// Device registers.
pub const DEVICE: El23Attributes = BASE.union(MAIR_IDX_DEVICE).union(El23Attributes::XN);

/// Symbols of aarch64-rt's linker script (`image.ld`).
mod symbols {
    unsafe extern "C" {
        pub static text_begin: u8;
        pub static text_end: u8;
        pub static rodata_begin: u8;
        pub static rodata_end: u8;
        pub static data_begin: u8;
        pub static boot_stack_begin: u8;
        pub static boot_stack_end: u8;
        /// End of the image (first byte after stacks), page-aligned.
        pub static dma_region: u8;
    }
}

/// Where the image's sections are.
#[derive(Clone, Debug)]
pub struct ImageLayout {
    /// Code.
    pub text: Range<PhysAddr>,
    /// Read-only data.
    pub rodata: Range<PhysAddr>,
    /// Data, bss and stacks.
    pub data: Range<PhysAddr>,
    /// The boot CPU's stack.
    pub boot_stack: Range<PhysAddr>,
}

impl ImageLayout {
    /// Reads the linker symbols.
    #[must_use]
    pub fn get() -> Self {
        let addr = |s: *const u8| PhysAddr(s as usize);
        // Only the addresses of the linker-defined symbols are taken (`&raw
        // const` of an extern static needs no `unsafe`).
        {
            Self {
                text: addr(&raw const symbols::text_begin)..addr(&raw const symbols::text_end),
                rodata: addr(&raw const symbols::rodata_begin)
                    ..addr(&raw const symbols::rodata_end),
                data: addr(&raw const symbols::data_begin)..addr(&raw const symbols::dma_region),
                boot_stack: addr(&raw const symbols::boot_stack_begin)
                    ..addr(&raw const symbols::boot_stack_end),
            }
        }
    }

    /// The whole image.
    #[must_use]
    pub fn whole(&self) -> Range<PhysAddr> {
        self.text.start..self.data.end
    }
}

/// Regions of the EL2 map besides the image.
#[derive(Debug)]
pub struct El2Regions {
    /// Read-only: device tree, test guest payload, Linux payload, initrd
    /// (empty: none).
    pub read_only: [Range<PhysAddr>; 4],
    /// Read-write: heap, guest RAM backing.
    pub read_write: [Range<PhysAddr>; 2],
    /// The page-table pool: read-write, mapped with pages (no blocks) so
    /// guard mode can unmap single pages.
    pub pool: Range<PhysAddr>,
}

fn region(r: &Range<PhysAddr>) -> MemoryRegion {
    MemoryRegion::new(r.start.align_down(PAGE_SIZE).0, r.end.align_up(PAGE_SIZE).0)
}

/// Builds the EL2 map. Tables come from the heap (aarch64-paging's
/// `IdTranslation`), which is identity-mapped.
///
/// # Panics
///
/// If a region is outside the 39-bit VA space (a layout bug).
#[must_use]
pub fn build(image: &ImageLayout, regions: &El2Regions) -> IdMap<El2> {
    let mut map = IdMap::new(1, El2);
    map.map_range_with_constraints(&region(&regions.pool), DATA, Constraints::NO_BLOCK_MAPPINGS)
        .expect("EL2 region inside the 39-bit VA space");
    let mut map_region = |r: &Range<PhysAddr>, flags| {
        map.map_range(&region(r), flags)
            .expect("EL2 region inside the 39-bit VA space");
    };
    map_region(&image.text, TEXT);
    map_region(&image.rodata, RODATA);
    // The boot stack grows down: its lowest page stays unmapped, so an
    // overflow faults (and is reported from the emergency stack) instead of
    // overwriting .bss.
    // From the page-aligned start of .data: the rodata's last, partial page
    // stays read-only.
    // The same for each secondary CPU's stack.
    let mut guards: alloc::vec::Vec<PhysAddr> = core::iter::once(image.boot_stack.start)
        .chain(
            super::smp::secondary_stacks()
                .iter()
                .map(|s| PhysAddr(s.start)),
        )
        .collect();
    guards.sort_unstable();
    let mut from = image.data.start;
    for guard in guards {
        if from < guard {
            map_region(&(from..guard), DATA);
        }
        from = guard.add(PAGE_SIZE);
    }
    map_region(&(from..image.data.end), DATA);
    for r in regions.read_only.iter().filter(|r| !r.is_empty()) {
        map_region(r, RODATA);
    }
    for r in &regions.read_write {
        map_region(r, DATA);
    }
    let device = |base: usize, size: usize| PhysAddr(base)..PhysAddr(base + size);
    map_region(&device(PL011_BASE, PAGE_SIZE), DEVICE);
    // The physical GIC is the hypervisor's alone (never in a stage 2).
    map_region(&device(GICD_BASE, GICD_SIZE), DEVICE);
    map_region(&device(GICR_BASE, GICR_MAPPED), DEVICE);
    map
}

/// TCR_EL2 for the EL2 map: T0SZ = 25 (39-bit VA, walks start at level 1),
/// 4 KiB granule, inner-shareable write-back walks, PS from `pa_range`.
#[must_use]
pub const fn tcr_el2(pa_range: u64) -> u64 {
    const RES1: u64 = (1 << 31) | (1 << 23);
    const T0SZ: u64 = 64 - 39;
    const IRGN0_WBWA: u64 = 1 << 8;
    const ORGN0_WBWA: u64 = 1 << 10;
    const SH0_INNER: u64 = 3 << 12;
    let ps = if pa_range < 5 { pa_range } else { 5 };
    RES1 | T0SZ | IRGN0_WBWA | ORGN0_WBWA | SH0_INNER | (ps << 16)
}

/// SCTLR_EL2 (E2H = 0): MMU, data and instruction caches, stack alignment
/// check, write-implies-execute-never, and the RES1 bits.
pub const SCTLR_EL2: u64 = {
    const M: u64 = 1 << 0;
    const C: u64 = 1 << 2;
    const SA: u64 = 1 << 3;
    const I: u64 = 1 << 12;
    const WXN: u64 = 1 << 19;
    const RES1: u64 = (1 << 4)
        | (1 << 5)
        | (1 << 11)
        | (1 << 16)
        | (1 << 18)
        | (1 << 22)
        | (1 << 23)
        | (1 << 28)
        | (1 << 29);
    M | C | SA | I | WXN | RES1
};

/// Guard mode's view of the EL2 map: page valid/invalid toggles in the pool
/// region (whose level-3 tables exist from boot, so no table is allocated).
#[derive(Debug)]
pub struct GuardPages(pub &'static spin::mutex::SpinMutex<IdMap<El2>>);

impl crate::mm::pool::El2PageMap for GuardPages {
    fn set_page(&self, va: PhysAddr, valid: bool) -> u64 {
        let flags = if valid {
            DATA
        } else {
            DATA - El23Attributes::VALID
        };
        self.0
            .lock()
            .map_range_with_constraints(
                &MemoryRegion::new(va.0, va.0 + PAGE_SIZE),
                flags,
                Constraints::NO_BLOCK_MAPPINGS,
            )
            .expect("pool page inside the EL2 map");
        1
    }
}

core::arch::global_asm!(
    r#"
/*
 * lazyhyp_switch_el2_map(ttbr0: x0, mair: x1, tcr: x2, sctlr: x3)
 * Runs from the identity-mapped text, touches no memory.
 */
.section .text.lazyhyp_switch_el2_map, "ax"
.global lazyhyp_switch_el2_map
lazyhyp_switch_el2_map:
    /* The new tables, written through the cache, are visible to the walker. */
    dsb ishst
    /*
     * Turn the MMU off while the tables change under us: the boot map's
     * 1 GiB blocks and the new map's pages for the same addresses must never
     * both be in the TLB (that would be a TLB conflict, as a live block split
     * without break-before-make is).
     */
    mrs x9, sctlr_el2
    bic x9, x9, #1
    msr sctlr_el2, x9
    isb
    msr mair_el2, x1
    msr tcr_el2, x2
    msr ttbr0_el2, x0
    isb
    /* Drop every EL2 translation of the boot map, then wait for it. */
    tlbi alle2
    dsb nsh
    isb
    msr sctlr_el2, x3
    isb
    ret
"#
);

unsafe extern "C" {
    fn lazyhyp_switch_el2_map(ttbr0: u64, mair: u64, tcr: u64, sctlr: u64);
}

/// Switches EL2 from the boot map to `map`.
///
/// The map is not marked active in aarch64-paging: as for stage 2, the mm
/// core owns its barriers and TLB maintenance (aarch64-paging would issue
/// its own `TLBI VAE2IS; DSB; ISB` per change otherwise, outside any lazy
/// section). The only later changes are guard mode's page valid/invalid
/// toggles, which need no break-before-make.
///
/// # Safety
///
/// `map` must map everything the hypervisor uses from here on (image,
/// stack, heap, console) at the same addresses, and must never be dropped.
pub unsafe fn activate(map: &IdMap<El2>, pa_range: u64) {
    // SAFETY: the caller guarantees the map covers all that EL2 uses; the
    // switch routine runs from text that both maps identity-map.
    unsafe {
        lazyhyp_switch_el2_map(
            map.root_address().0 as u64,
            MAIR_EL2,
            tcr_el2(pa_range),
            SCTLR_EL2,
        );
    }
}
