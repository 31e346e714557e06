//! Map then unmap 1 GiB of 4 KiB pages, two ways, on the same stage-2 layout
//! (root at level 1, 39-bit IPA space, IPA 1 GiB, a PA that is 4 KiB but not
//! 2 MiB aligned, so every entry is a page):
//!
//! - through the stage-2 manager (`lazyhyp::mm::stage2::Stage2` on
//!   [`NoopArch`]: its bookkeeping and counters, no barrier issued), eager
//!   and inside one lazy section; tables from a [`PagePool`] without guard
//!   mode;
//! - directly with aarch64-paging's `Mapping` in the `Stage2` regime, never
//!   activated (so it does no TLB maintenance either), tables from a free
//!   list over the global allocator.
//!
//! Each variant is one `map` of the whole GiB and one `unmap` of it. After
//! criterion, a plain timing loop (median of 5 cycles per variant) prints the
//! `RATIO ...` line that `cargo xtask bench` parses.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{PhysicalAddress, Stage2Attributes};
use aarch64_paging::paging::{self, Constraints, MemoryRegion};
use criterion::Criterion;
use lazyhyp::mm::stage2::S2Attrs;
use lazyhyp::mm::{Ipa, PAGE_SIZE, PhysAddr};

mod common;
use common::{FreeListTables, Ours, RAM_FLAGS};

const GIB: usize = 1 << 30;
/// The IPA mapped: 1 GiB (one whole level-1 entry).
const IPA: Ipa = Ipa(1 << 30);
/// The PA mapped: 4 KiB aligned, not 2 MiB aligned, so no block fits.
const PA: PhysAddr = PhysAddr(0x8000_1000);
/// Tables 1 GiB of pages needs below the root: 512 level-3 and one level-2.
const TABLES: usize = 513;
/// Pool pages: the root, the tables, some slack.
const POOL_PAGES: usize = 600;
/// Timed cycles per variant for the `RATIO` line.
const RUNS: usize = 5;

/// The raw leaf descriptor translating `ipa` in level-1-rooted tables at
/// `root` (identity-mapped host memory), if the walk reaches level 3.
fn leaf_descriptor(root: usize, ipa: u64) -> Option<u64> {
    let mut table = root;
    for level in 1..=3 {
        let index = (ipa >> (12 + 9 * (3 - level))) as usize & 511;
        // SAFETY: `table` is a live, page-aligned table page of 512
        // descriptors (the root, or reached from it through a table
        // descriptor); nothing writes the tables during this walk.
        let desc = unsafe { std::ptr::read_volatile((table as *const u64).add(index)) };
        if level == 3 {
            return Some(desc);
        }
        if desc & 3 != 3 {
            return None;
        }
        table = (desc & 0x0000_ffff_ffff_f000) as usize;
    }
    None
}

impl Ours {
    fn new() -> Self {
        Self::with_pool(POOL_PAGES)
    }

    /// One map and one unmap of the whole GiB, eager.
    fn map_unmap(&mut self) {
        self.s2
            .map(black_box(IPA), GIB, black_box(PA), S2Attrs::RAM)
            .expect("map");
        self.s2.unmap(black_box(IPA), GIB).expect("unmap");
    }

    /// The same inside one lazy section.
    fn map_unmap_section(&mut self) {
        self.mm.enter();
        self.map_unmap();
        self.mm.leave();
    }
}

/// aarch64-paging's side: one `Stage2` mapping, root at level 1, never
/// activated.
struct Theirs {
    mapping: Mapping<FreeListTables, paging::Stage2>,
}

impl Theirs {
    fn new() -> Self {
        let tables = FreeListTables {
            free: Vec::with_capacity(TABLES + 1),
        };
        Self {
            mapping: Mapping::new(tables, 1, paging::Stage2),
        }
    }

    /// One map and one unmap of the whole GiB (unmap: invalid flags, the
    /// region's own start as the PA, as the manager does).
    fn map_unmap(&mut self) {
        let ipa = black_box(IPA).0 as usize;
        let region = MemoryRegion::new(ipa, ipa + GIB);
        self.mapping
            .map_range(
                &region,
                PhysicalAddress(black_box(PA).0),
                RAM_FLAGS,
                Constraints::NO_CONTIGUOUS_HINT,
            )
            .expect("map_range");
        self.mapping
            .map_range(
                &region,
                PhysicalAddress(ipa),
                Stage2Attributes::empty(),
                Constraints::NO_CONTIGUOUS_HINT,
            )
            .expect("unmap");
    }
}

/// Untimed: both sides build the same tables (same leaf descriptors for
/// every sampled IPA), and a map-unmap cycle leaks no table page (checked over
/// two cycles: the manager may keep an emptied level-2 table after the first).
/// Returns the pool's free pages between cycles, for the later leak checks.
fn check_same_layout(ours: &mut Ours, theirs: &mut Theirs) -> usize {
    let ipa_region = MemoryRegion::new(IPA.0 as usize, IPA.0 as usize + GIB);
    let mut free_between = Vec::new();
    for _ in 0..2 {
        let free_before = ours.pool.free_pages();
        ours.s2
            .map(IPA, GIB, PA, S2Attrs::RAM)
            .expect("map (check)");
        theirs
            .mapping
            .map_range(
                &ipa_region,
                PhysicalAddress(PA.0),
                RAM_FLAGS,
                Constraints::NO_CONTIGUOUS_HINT,
            )
            .expect("map_range (check)");
        assert!(free_before - ours.pool.free_pages() <= TABLES);
        for off in [0, 0x1000, 0x1234_5000, GIB - PAGE_SIZE] {
            let ipa = IPA.add(off as u64);
            let t = ours.s2.query(ipa).expect("mapped");
            assert_eq!((t.pa, t.level), (PA.add(off), 3), "IPA {ipa:#x}");
            let a = leaf_descriptor(ours.s2.root().0, ipa.0);
            let b = leaf_descriptor(theirs.mapping.root_address().0, ipa.0);
            assert!(a.is_some() && a == b, "IPA {ipa:#x}: {a:x?} != {b:x?}");
        }
        ours.s2.unmap(IPA, GIB).expect("unmap (check)");
        theirs
            .mapping
            .map_range(
                &ipa_region,
                PhysicalAddress(IPA.0 as usize),
                Stage2Attributes::empty(),
                Constraints::NO_CONTIGUOUS_HINT,
            )
            .expect("unmap (check)");
        assert!(ours.mm.nothing_pending());
        assert_eq!(leaf_descriptor(ours.s2.root().0, IPA.0), None);
        assert_eq!(
            leaf_descriptor(theirs.mapping.root_address().0, IPA.0),
            None
        );
        free_between.push(ours.pool.free_pages());
    }
    assert_eq!(
        free_between[0], free_between[1],
        "a map-unmap cycle leaks table pages"
    );
    free_between[1]
}

/// Median duration of `RUNS` runs of `f`.
fn median(mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[RUNS / 2]
}

fn main() {
    let mut ours = Ours::new();
    let mut theirs = Theirs::new();
    let free_between = check_same_layout(&mut ours, &mut theirs);

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .configure_from_args();
    {
        let mut group = c.benchmark_group("map_unmap_1gib_4k");
        group.bench_function("lazyhyp_eager", |b| b.iter(|| ours.map_unmap()));
        group.bench_function("lazyhyp_section", |b| {
            b.iter(|| ours.map_unmap_section());
        });
        group.bench_function("aarch64_paging", |b| b.iter(|| theirs.map_unmap()));
        group.finish();
    }
    c.final_summary();
    assert_eq!(ours.pool.free_pages(), free_between, "table pages leaked");

    // The timing loop only under `cargo bench` (criterion's test mode, under
    // `cargo test --benches`, runs each benchmark once and stops there).
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--list") {
        return;
    }
    let eager = median(|| ours.map_unmap());
    let section = median(|| ours.map_unmap_section());
    let direct = median(|| theirs.map_unmap());
    assert_eq!(ours.pool.free_pages(), free_between, "table pages leaked");
    println!(
        "RATIO lazyhyp_eager/aarch64_paging={:.2} lazyhyp_section/aarch64_paging={:.2} \
         (medians of {RUNS}: {:.2} ms, {:.2} ms, {:.2} ms)",
        eager.as_secs_f64() / direct.as_secs_f64(),
        section.as_secs_f64() / direct.as_secs_f64(),
        eager.as_secs_f64() * 1e3,
        section.as_secs_f64() * 1e3,
        direct.as_secs_f64() * 1e3,
    );
}
