//! Guest memory the way a hypervisor drives it, on the host: the stage-2
//! manager behind [`GuestMemory`] (on the counting-only [`NoopArch`], no
//! barrier issued, tables from a [`PagePool`] without guard mode) against the
//! same table changes made directly with aarch64-paging's `Mapping` (never
//! activated, tables from a free list over the global allocator), both with
//! the layout of `map_unmap.rs` (root at level 1, 39-bit IPA space).
//!
//! 1 GiB of guest RAM at IPA 1 GiB, backed by a 2 MiB-aligned physical range
//! (so aligned windows become blocks). Phases, each timed alone:
//!
//! - `fault_around_1g`: `stage2_fault` once in every 2 MiB window of the GiB,
//!   fault-around 2 MiB (512 faults, a block each); raw: one `map_range` per
//!   window;
//! - `fault_4k_64m`: `stage2_fault` on every 4 KiB page of 64 MiB,
//!   fault-around off (16384 faults, a page each); raw: one `map_range` per
//!   page;
//! - `unmap_every_other_64m`: 64 MiB mapped as blocks, then `run_batch` of
//!   `UNMAP` ops, one per every other page (8192 ops in batches of 64, each
//!   block split); raw: one invalid `map_range` per page;
//! - `repopulate_64m`: `run_batch` of `POPULATE` ops giving back the holes
//!   (8192 ops); raw: one `map_range` per page;
//! - `merge_64m`: one `run_batch` `MERGE` over the 64 MiB, 32 blocks made
//!   (ops counts the blocks); aarch64-paging has no merge, so no ratio.
//!
//! Prints one `GUESTMEM phase=.. ops=.. ns_per_op=.. aarch64_paging_ns_per_op=..
//! ratio_vs_aarch64_paging=..` line per phase (medians of `RUNS` cycles; `na`
//! where there is no raw counterpart), which `cargo xtask bench` parses.
//! Outside `cargo bench` (e.g. `cargo test --benches`) one cycle runs, as a
//! check.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{PhysicalAddress, Stage2Attributes};
use aarch64_paging::paging::{self, Constraints, MemoryRegion};
use lazyhyp::mm::stage2::MemType;
use lazyhyp::mm::{BLOCK_2M, Ipa, PAGE_SIZE, PhysAddr};
use lazyhyp::vm::guest_mm::{FaultAction, GuestMemory, GuestRam, MAX_BATCH_OPS, MmOp, kind};

mod common;
use common::{FreeListTables, Ours, RAM_FLAGS};

const GIB: usize = 1 << 30;
const MIB: usize = 1 << 20;
/// First IPA of guest RAM.
const RAM_IPA: u64 = 1 << 30;
/// Its backing: 2 MiB aligned.
const BACKING: PhysAddr = PhysAddr(0x8020_0000);
/// The span of the 4 KiB and give-back phases.
const SPAN_64M: usize = 64 * MIB;
/// A level-3 translation fault.
const FSC_TRANSLATION_L3: u8 = 0x07;
/// Pool pages: the root, a level-2 table, 32 level-3 tables, slack.
const POOL_PAGES: usize = 128;
/// Timed cycles per phase under `cargo bench`.
const RUNS: usize = 5;

fn guest_ram() -> GuestRam {
    GuestRam {
        ipa: Ipa(RAM_IPA)..Ipa(RAM_IPA + GIB as u64),
        backing: BACKING,
        mem: MemType::Normal,
    }
}

/// Times of one give-back cycle: unmap, repopulate, merge.
type Fragment = [Duration; 3];

impl Ours {
    fn new() -> Self {
        Self::with_pool(POOL_PAGES)
    }

    /// One fault in every `window` of the first `span` bytes of guest RAM,
    /// fault-around `window`; checked, then unmapped (untimed).
    fn fault_storm(&mut self, window: usize, span: usize) -> Duration {
        let mut gm = GuestMemory::new(guest_ram(), window);
        let mut pages = 0;
        let start = Instant::now();
        for ipa in (RAM_IPA..RAM_IPA + span as u64).step_by(window) {
            // A fault in the middle of the window (its first page when the
            // window is one page).
            let at = black_box(ipa + ((window as u64 / 2) & !(PAGE_SIZE as u64 - 1)));
            match gm.stage2_fault(&mut self.s2, self.mm, Ipa(at), FSC_TRANSLATION_L3) {
                FaultAction::Populated(n) => pages += n,
                FaultAction::Inject => panic!("fault at {at:#x} not served"),
            }
        }
        let elapsed = start.elapsed();
        assert_eq!(pages * PAGE_SIZE, span, "pages populated");
        let level = if window >= BLOCK_2M { 2 } else { 3 };
        for off in [0, PAGE_SIZE, span / 2, span - PAGE_SIZE] {
            let t = self.s2.query(Ipa(RAM_IPA + off as u64)).expect("mapped");
            assert_eq!((t.pa, t.level), (BACKING.add(off), level));
        }
        self.s2.unmap(Ipa(RAM_IPA), span).expect("unmap (teardown)");
        assert!(self.mm.nothing_pending());
        elapsed
    }

    /// 64 MiB mapped as blocks; every other page given back, the holes
    /// repopulated, the whole merged; checked, then unmapped (untimed).
    fn fragment(&mut self) -> Fragment {
        let ram = guest_ram();
        let mut gm = GuestMemory::new(ram.clone(), BLOCK_2M);
        self.s2
            .map(Ipa(RAM_IPA), SPAN_64M, BACKING, ram.attrs())
            .expect("map (setup)");
        let holes = |k: u32| -> Vec<MmOp> {
            (RAM_IPA..RAM_IPA + SPAN_64M as u64)
                .step_by(2 * PAGE_SIZE)
                .map(|ipa| MmOp {
                    kind: k,
                    ipa,
                    size: PAGE_SIZE as u64,
                    ..MmOp::default()
                })
                .collect()
        };
        let (unmaps, populates) = (holes(kind::UNMAP), holes(kind::POPULATE));
        let merge = [MmOp {
            kind: kind::MERGE,
            ipa: RAM_IPA,
            size: SPAN_64M as u64,
            ..MmOp::default()
        }];
        let mut batches = |ops: &[MmOp], gm: &mut GuestMemory| {
            let start = Instant::now();
            for batch in ops.chunks(MAX_BATCH_OPS) {
                gm.run_batch(&mut self.s2, self.mm, black_box(batch))
                    .expect("batch");
            }
            start.elapsed()
        };
        let unmap = batches(&unmaps, &mut gm);
        let repopulate = batches(&populates, &mut gm);
        let merge = batches(&merge, &mut gm);
        for off in (0..SPAN_64M).step_by(BLOCK_2M / 2 + PAGE_SIZE) {
            let t = self.s2.query(Ipa(RAM_IPA + off as u64)).expect("mapped");
            assert_eq!((t.pa, t.level), (BACKING.add(off), 2), "merged");
        }
        self.s2
            .unmap(Ipa(RAM_IPA), SPAN_64M)
            .expect("unmap (teardown)");
        assert!(self.mm.nothing_pending());
        [unmap, repopulate, merge]
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
            free: Vec::with_capacity(64),
        };
        Self {
            mapping: Mapping::new(tables, 1, paging::Stage2),
        }
    }

    fn map(&mut self, ipa: u64, size: usize, pa: PhysAddr) {
        let ipa = ipa as usize;
        self.mapping
            .map_range(
                &MemoryRegion::new(ipa, ipa + size),
                PhysicalAddress(pa.0),
                RAM_FLAGS,
                Constraints::NO_CONTIGUOUS_HINT,
            )
            .expect("map_range");
    }

    /// Unmap as `map_unmap.rs` does: invalid flags, the region's own start
    /// as the PA.
    fn unmap(&mut self, ipa: u64, size: usize) {
        let ipa = ipa as usize;
        self.mapping
            .map_range(
                &MemoryRegion::new(ipa, ipa + size),
                PhysicalAddress(ipa),
                Stage2Attributes::empty(),
                Constraints::NO_CONTIGUOUS_HINT,
            )
            .expect("unmap");
    }

    fn fault_storm(&mut self, window: usize, span: usize) -> Duration {
        let start = Instant::now();
        for ipa in (RAM_IPA..RAM_IPA + span as u64).step_by(window) {
            let ipa = black_box(ipa);
            self.map(ipa, window, BACKING.add((ipa - RAM_IPA) as usize));
        }
        let elapsed = start.elapsed();
        self.unmap(RAM_IPA, span);
        elapsed
    }

    /// Unmap and repopulate every other page of 64 MiB mapped as blocks.
    fn fragment(&mut self) -> [Duration; 2] {
        self.map(RAM_IPA, SPAN_64M, BACKING);
        let holes = (RAM_IPA..RAM_IPA + SPAN_64M as u64).step_by(2 * PAGE_SIZE);
        let start = Instant::now();
        for ipa in holes.clone() {
            self.unmap(black_box(ipa), PAGE_SIZE);
        }
        let unmap = start.elapsed();
        let start = Instant::now();
        for ipa in holes {
            self.map(
                black_box(ipa),
                PAGE_SIZE,
                BACKING.add((ipa - RAM_IPA) as usize),
            );
        }
        let repopulate = start.elapsed();
        self.unmap(RAM_IPA, SPAN_64M);
        [unmap, repopulate]
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

fn ns_per_op(d: Duration, ops: usize) -> f64 {
    d.as_secs_f64() * 1e9 / f64::from(u32::try_from(ops).expect("ops fit u32"))
}

/// One `GUESTMEM` line.
fn report(phase: &str, ops: usize, ours: Duration, theirs: Option<Duration>) {
    let ns = ns_per_op(ours, ops);
    let (raw, ratio) = theirs.map_or_else(
        || ("na".to_owned(), "na".to_owned()),
        |t| {
            let raw = ns_per_op(t, ops);
            (format!("{raw:.1}"), format!("{:.2}", ns / raw))
        },
    );
    println!(
        "GUESTMEM phase={phase} ops={ops} ns_per_op={ns:.1} aarch64_paging_ns_per_op={raw} \
         ratio_vs_aarch64_paging={ratio}"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let runs = if args.iter().any(|a| a == "--bench") {
        RUNS
    } else {
        1
    };
    let mut ours = Ours::new();
    let mut theirs = Theirs::new();
    let free_pages = ours.pool.free_pages();

    let t = |f: &mut dyn FnMut() -> Duration| median((0..runs).map(|_| f()).collect());
    let fa_ours = t(&mut || ours.fault_storm(BLOCK_2M, GIB));
    let fa_theirs = t(&mut || theirs.fault_storm(BLOCK_2M, GIB));
    let pg_ours = t(&mut || ours.fault_storm(PAGE_SIZE, SPAN_64M));
    let pg_theirs = t(&mut || theirs.fault_storm(PAGE_SIZE, SPAN_64M));
    let ours_frag: Vec<Fragment> = (0..runs).map(|_| ours.fragment()).collect();
    let theirs_frag: Vec<[Duration; 2]> = (0..runs).map(|_| theirs.fragment()).collect();
    // The manager may keep emptied tables; the pool must not shrink further
    // than the tables 64 MiB of pages needs.
    assert!(free_pages - ours.pool.free_pages() <= 1 + SPAN_64M / BLOCK_2M);

    let col = |v: &[Fragment], i: usize| median(v.iter().map(|f| f[i]).collect());
    let col2 = |v: &[[Duration; 2]], i: usize| median(v.iter().map(|f| f[i]).collect());
    let holes = SPAN_64M / PAGE_SIZE / 2;
    report("fault_around_1g", GIB / BLOCK_2M, fa_ours, Some(fa_theirs));
    report(
        "fault_4k_64m",
        SPAN_64M / PAGE_SIZE,
        pg_ours,
        Some(pg_theirs),
    );
    report(
        "unmap_every_other_64m",
        holes,
        col(&ours_frag, 0),
        Some(col2(&theirs_frag, 0)),
    );
    report(
        "repopulate_64m",
        holes,
        col(&ours_frag, 1),
        Some(col2(&theirs_frag, 1)),
    );
    report("merge_64m", SPAN_64M / BLOCK_2M, col(&ours_frag, 2), None);
}
