//! A host model of the translation hardware behind [`MmArch`]: a store
//! buffer between page-table writes and the table walkers, and a TLB.
//!
//! QEMU's TCG makes every store visible to its walker at once and does not
//! model barriers, so a missing `DSB` never shows there. This model does: it
//! stands where the hardware stands (the [`MmArch`] boundary) and picks, among
//! the outcomes the architecture allows, the one that exposes a missing
//! barrier or TLBI. It never reports a fault or a stale entry that real
//! hardware could not produce for correct code (KVM/Hafnium's
//! `write; dsb ishst; tlbi ipas2e1is; dsb ish; tlbi vmalle1is; dsb ish; isb`
//! for a removed or changed entry, `write; dsb ishst; isb` for a new one).
//!
//! # What is modelled
//!
//! - **Store buffer.** Translation tables live in ordinary host memory (the
//!   regions given to [`Model::new`]; host addresses stand in for physical
//!   ones). The table walkers never read that memory: they read
//!   `committed`, a copy taken at the last `DSB` (either kind). A
//!   descriptor write is invisible to walks until a `DSB`.
//! - **Context synchronization.** The hypervisor's own (EL2) accesses walk
//!   `isb_view`, the committed copy as of the last `ISB`: a new EL2 entry that
//!   was made visible by a `DSB` but not followed by an `ISB` may still fault
//!   (an early, speculative walk), and a removed one may still translate.
//!   Guest accesses walk `committed` directly (entering the guest is a
//!   context synchronization event).
//! - **TLB.** Whole leaves are cached: stage-2-only entries (per VMID, by
//!   IPA), combined stage-1+2 entries (per VMID; the model's guest stage 1 is
//!   the identity, so a combined entry caches the stage-2 leaf's range and
//!   permissions) and EL2 entries (by VA). `TLBI IPAS2E1IS` and
//!   `TLBI RIPAS2E1IS` drop stage-2-only entries only; combined ones need
//!   `TLBI VMALLE1IS` (or `TLBI VMALLS12E1IS`).
//! - **TLBI completion.** A TLBI is pending until a `DSB ISH`. Completing it
//!   drops the matching entries and then refills them adversarially: the
//!   walker may have re-fetched between the TLBI's issue and the `DSB`, from
//!   the memory view that was committed when the TLBI was issued. So a TLBI
//!   issued before the descriptor write was made visible leaves the old
//!   translation cached. A combined entry dropped by `TLBI VMALLE1IS` is
//!   refilled from a stage-2-only entry that is still cached (the guest
//!   re-fetches through it), which is why the stage-2 invalidation has to
//!   complete first.
//! - **Conflicts.** Two different cached leaves of one kind that both cover
//!   an address can only arise from a break-before-make violation; the
//!   access reports [`Fault::TlbConflict`] (a TLB conflict abort, one of the
//!   outcomes the architecture allows then).
//!
//! - **Several CPUs** ([`Model::new_smp`], up to [`MAX_MODEL_CPUS`]), one
//!   running at a time ([`Model::set_cpu_id`]). Each has its own TLB, walk
//!   cache, `ISB` context, `VTTBR_EL2`, *store buffer* (the descriptor
//!   words it wrote, published to every walker by its own `DSB` only) and
//!   *pending TLBIs* (a broadcast TLBI acts on every CPU's TLB and walk
//!   cache, and is complete only at the issuing CPU's `DSB ISH`). A step
//!   hook ([`Model::set_step_hook`]) lets other CPUs run their guests
//!   between every barrier and TLBI of the changing CPU.
//!
//! # Not modelled
//!
//! The contiguous hint, partial or reordered visibility of one CPU's stores
//! before its `DSB` (all of them become visible at once), `DMB`, memory
//! attributes and shareability, hardware access-flag/dirty updates, the
//! guest's own stage 1, reordering of TLBIs completed by one `DSB` (they
//! complete in issue order), and truly simultaneous execution (the CPUs
//! interleave at barrier and access granularity).
//!
//! # Use
//!
//! ```ignore
//! // SAFETY: the pool's pages are leaked host memory that outlive the model.
//! let model = unsafe { Model::new(&[pool_region]) };
//! let s2 = Stage2::new(vmid, model.clone(), &pool, &counters)?;
//! model.set_stage2_root(vmid, root);
//! model.touch_all_guest(vmid, &[ram.clone()]);   // the guest ran
//! /* ... mm core operation through `s2` ... */
//! assert!(model.stale_entries().is_empty() && model.is_quiescent());
//! ```

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ops::Range;
use spin::Mutex;

use super::arch::{MmArch, Vmid};
use super::counters::MmCounters;
use super::{BLOCK_1G, BLOCK_2M, PAGE_SIZE};

/// Bits of input address (IPA or EL2 VA) the modelled tables translate:
/// walks start at level 1 with one 512-entry root table.
pub const INPUT_BITS: u32 = 39;

/// Input address bits of the EL2 regime (walks start at level 0).
pub const EL2_INPUT_BITS: u32 = 48;

const PAGE: u64 = PAGE_SIZE as u64;

/// The leaf sizes of a 4 KiB-granule table: page, 2 MiB block, 1 GiB block.
const LEAF_SIZES: [u64; 3] = [PAGE, BLOCK_2M as u64, BLOCK_1G as u64];

const DESC_VALID: u64 = 1 << 0;
const DESC_TABLE_OR_PAGE: u64 = 1 << 1;
/// Stage 2: S2AP[0], read allowed.
const DESC_S2AP_READ: u64 = 1 << 6;
/// Stage 2: S2AP[1], write allowed.
const DESC_S2AP_WRITE: u64 = 1 << 7;
/// EL2 stage 1: AP[2], read-only.
const DESC_AP_RO: u64 = 1 << 7;
const DESC_AF: u64 = 1 << 10;
const DESC_XN: u64 = 1 << 54;
/// Output address bits [47:12].
const DESC_OA_MASK: u64 = 0x0000_ffff_ffff_f000;

/// A translation regime, and with it a kind of TLB entry.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub enum Regime {
    /// Stage-2-only entries of a VMID (IPA -> PA).
    Stage2(Vmid),
    /// Combined stage-1+2 entries of a VMID (guest VA -> PA; the modelled
    /// guest's stage 1 is the identity, so VA = IPA). Walks go through the
    /// VMID's stage-2 tables.
    Combined(Vmid),
    /// The hypervisor's own EL2 stage-1 map (VA -> PA).
    El2,
}

/// Access permissions of a leaf.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "three independent permission bits"
)]
pub struct Perm {
    /// Loads allowed.
    pub read: bool,
    /// Stores allowed.
    pub write: bool,
    /// Instruction fetches allowed.
    pub exec: bool,
}

/// A leaf translation: a page or block entry, as walked or as cached.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct Leaf {
    /// First input address (IPA or VA) the leaf covers.
    pub base: u64,
    /// Bytes the leaf covers: 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    /// Output (physical, here host) address of `base`.
    pub out: usize,
    /// Permissions.
    pub perm: Perm,
    /// Table level of the entry: 3 page, 2 2-MiB block, 1 1-GiB block.
    pub level: u8,
}

/// One TLB entry.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct TlbEntry {
    /// Which kind of entry.
    pub regime: Regime,
    /// The cached leaf.
    pub leaf: Leaf,
}

/// Where a successful access got its translation.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum Source {
    /// A combined stage-1+2 TLB entry.
    CombinedTlb,
    /// A stage-2-only TLB entry (a combined entry was filled from it).
    Stage2Tlb,
    /// An EL2 TLB entry.
    El2Tlb,
    /// A table walk (the TLB was filled from it where the model allows).
    Walk,
}

/// A successful access.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct Access {
    /// The physical address accessed.
    pub pa: usize,
    /// The leaf that translated it.
    pub leaf: Leaf,
    /// Where that leaf came from.
    pub source: Source,
}

/// Why an access did not translate.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum Fault {
    /// No root table registered for the regime.
    NoRoot {
        /// The regime walked.
        regime: Regime,
    },
    /// The address is beyond the [`INPUT_BITS`]-bit input range.
    OutOfRange {
        /// The regime walked.
        regime: Regime,
        /// The address.
        addr: u64,
    },
    /// The walk met an invalid descriptor (or a level-3 block descriptor).
    Translation {
        /// The regime walked.
        regime: Regime,
        /// The address.
        addr: u64,
        /// The level of the invalid descriptor.
        level: u8,
    },
    /// The leaf has its access flag clear.
    AccessFlag {
        /// The regime walked.
        regime: Regime,
        /// The address.
        addr: u64,
        /// The level of the leaf.
        level: u8,
    },
    /// The leaf does not allow the access.
    Permission {
        /// The regime.
        regime: Regime,
        /// The address.
        addr: u64,
        /// Whether the access was a store.
        write: bool,
        /// The leaf that refused it.
        leaf: Leaf,
        /// Where the leaf came from.
        source: Source,
    },
    /// The walk read a descriptor outside every table region given to
    /// [`Model::new`]: a table descriptor points at something that is not a
    /// table (or a region is missing).
    WalkOutsideRegions {
        /// The regime walked.
        regime: Regime,
        /// The address.
        addr: u64,
        /// The level of the table being read.
        level: u8,
        /// Where the descriptor would have been.
        desc_addr: usize,
    },
    /// More than one different TLB entry of one kind covers the address: a
    /// break-before-make violation left an old leaf cached next to a new
    /// one (a TLB conflict abort).
    TlbConflict {
        /// The kind of entry.
        regime: Regime,
        /// The address.
        addr: u64,
        /// How many entries matched.
        entries: usize,
    },
}

/// Why a TLB entry is stale.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub enum StaleReason {
    /// Live memory translates nothing there any more.
    Unmapped,
    /// Live memory has a leaf of another size (or base) there.
    LeafSize,
    /// Live memory maps it to another output address.
    OutputAddress,
    /// Live memory gives other permissions.
    Permissions,
}

/// A TLB entry that disagrees with the tables as written.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Hash)]
pub struct StaleEntry {
    /// The cached entry.
    pub entry: TlbEntry,
    /// What a walk of live memory at the entry's base gives.
    pub live: Option<Leaf>,
    /// The first difference found.
    pub reason: StaleReason,
}

/// What the model saw, counted independently of the mm core's counters.
///
/// The fields named like [`MmCounters`] fields count the same instructions;
/// [`ModelStats::mismatches`] compares them.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Hash)]
pub struct ModelStats {
    /// `DSB ISHST` executed.
    pub dsb_ishst: u64,
    /// `DSB ISH` executed.
    pub dsb_ish: u64,
    /// `ISB` executed.
    pub isb: u64,
    /// `TLBI IPAS2E1IS` executed.
    pub tlbi_ipas2e1is: u64,
    /// `TLBI RIPAS2E1IS` executed.
    pub tlbi_ripas2e1is: u64,
    /// `TLBI VMALLE1IS` executed.
    pub tlbi_vmalle1is: u64,
    /// `TLBI VMALLS12E1IS` executed.
    pub tlbi_vmalls12e1is: u64,
    /// `TLBI VAE2IS` executed.
    pub tlbi_vae2is: u64,
    /// `TLBI ALLE2IS` executed.
    pub tlbi_alle2is: u64,
    /// Of the by-IPA stage-2 TLBIs, the leaf-only (`...LE1IS`) ones
    /// (counted in `tlbi_ipas2e1is` / `tlbi_ripas2e1is` too, as the mm
    /// core's counters do).
    pub tlbi_leaf_only: u64,
    /// 4 KiB pages covered by by-IPA stage-2 TLBIs (1 per `IPAS2E1IS`,
    /// `pages` per `RIPAS2E1IS`).
    pub tlbi_pages: u64,
    /// `DSB`s that published at least one changed table byte.
    pub commits: u64,
    /// Guest accesses (including [`Model::touch_all_guest`]'s).
    pub guest_accesses: u64,
    /// Stage-2 table walks made for guest accesses.
    pub guest_walks: u64,
    /// EL2 accesses (including [`MmArch::el2_access_ok`] queries).
    pub el2_accesses: u64,
    /// EL2 table walks.
    pub el2_walks: u64,
    /// TLB entries re-inserted by the adversarial refill at TLBI completion.
    pub refills: u64,
    /// Walk-cache entries re-inserted by the adversarial refill (the table
    /// descriptor was still in the TLBI's view: legitimate when the table
    /// stays, a bug when it was being removed).
    pub walk_refills: u64,
}

impl ModelStats {
    /// The counter named `name` (the field names above), if there is one.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<u64> {
        Some(match name {
            "dsb_ishst" => self.dsb_ishst,
            "dsb_ish" => self.dsb_ish,
            "isb" => self.isb,
            "tlbi_ipas2e1is" => self.tlbi_ipas2e1is,
            "tlbi_ripas2e1is" => self.tlbi_ripas2e1is,
            "tlbi_vmalle1is" => self.tlbi_vmalle1is,
            "tlbi_vmalls12e1is" => self.tlbi_vmalls12e1is,
            "tlbi_vae2is" => self.tlbi_vae2is,
            "tlbi_alle2is" => self.tlbi_alle2is,
            "tlbi_pages" => self.tlbi_pages,
            "commits" => self.commits,
            "guest_accesses" => self.guest_accesses,
            "guest_walks" => self.guest_walks,
            "el2_accesses" => self.el2_accesses,
            "el2_walks" => self.el2_walks,
            "refills" => self.refills,
            "tlbi_leaf_only" => self.tlbi_leaf_only,
            "walk_refills" => self.walk_refills,
            _ => return None,
        })
    }

    /// Counters that both the model and `counters` keep, as
    /// `(name, model's value, mm core's value)`, where the two differ.
    /// Empty when the mm core counted every barrier and TLBI it issued
    /// through the model (and the model saw nothing else since both were
    /// reset).
    #[must_use]
    pub fn mismatches(&self, counters: &MmCounters) -> Vec<(&'static str, u64, u64)> {
        let mut core = Vec::new();
        counters.for_each(|name, value| core.push((name, value)));
        self.mismatches_in(core)
    }

    /// [`mismatches`](Self::mismatches) against `(name, value)` pairs, such
    /// as the per-CPU totals of `MmCtx::for_each_total`.
    #[must_use]
    pub fn mismatches_in(
        &self,
        core: impl IntoIterator<Item = (&'static str, u64)>,
    ) -> Vec<(&'static str, u64, u64)> {
        core.into_iter()
            .filter_map(|(name, core)| {
                let model = self.get(name)?;
                (model != core).then_some((name, model, core))
            })
            .collect()
    }
}

/// A copy of every table region, page by page. Pages are shared between
/// snapshots that agree on them, so a `DSB` copies only changed pages and a
/// pending TLBI keeps its issue-time view for the price of a pointer.
#[derive(Clone, Debug)]
struct Snapshot {
    /// `pages[region][page]`: `PAGE_SIZE` bytes each.
    pages: Vec<Vec<Arc<[u8]>>>,
}

/// Where a walk reads descriptors from.
#[derive(Clone, Copy)]
enum View<'a> {
    /// The tables as written (host memory).
    Live,
    /// A snapshot.
    Snap(&'a Snapshot),
}

/// A TLBI waiting for the `DSB ISH` that completes it.
#[derive(Debug)]
struct Pending {
    op: TlbiOp,
    /// `committed` when the TLBI was issued: what the walker may re-fetch
    /// from between issue and completion.
    view: Arc<Snapshot>,
}

#[derive(Clone, Copy, Debug)]
enum TlbiOp {
    /// `IPAS2E1IS` / `RIPAS2E1IS` (and the leaf-only `...LE1IS` forms):
    /// stage-2-only entries overlapping `[start, end)`, of level `ttl` if
    /// hinted; the non-leaf forms also drop the walk-cache entries.
    Ipas2 {
        vmid: Vmid,
        start: u64,
        end: u64,
        leaf_only: bool,
        ttl: Option<u8>,
    },
    /// `VMALLE1IS`: the VMID's combined entries.
    Vmalle1 { vmid: Vmid },
    /// `VMALLS12E1IS`: all of the VMID's entries.
    Vmalls12 { vmid: Vmid },
    /// `VAE2IS`: EL2 entries covering the page at `va`.
    Vae2 { va: u64 },
    /// `ALLE2IS`: every EL2 entry.
    Alle2,
}

/// A TLB key; ordered by regime, then size, then base, so that "entries of
/// one regime and size with a base in a range" is one B-tree range.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd)]
struct Key {
    regime: Regime,
    size: u64,
    base: u64,
}

/// A TLB value.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
struct Cached {
    out: usize,
    perm: Perm,
    level: u8,
}

impl Cached {
    fn leaf(self, key: Key) -> Leaf {
        Leaf {
            base: key.base,
            size: key.size,
            out: self.out,
            perm: self.perm,
            level: self.level,
        }
    }
}

/// CPUs a model has unless made with [`Model::new_smp`]: the one running
/// the mm core and an observer.
pub const MODEL_CPUS: usize = 2;

/// Most CPUs a model can have (as many as the mm core's per-CPU state).
pub const MAX_MODEL_CPUS: usize = crate::mm::lazy::MAX_CPUS;

/// Called after every barrier and TLBI the model executes, with the CPU
/// that executed it (see [`Model::set_step_hook`]).
pub type StepHook = Arc<dyn Fn(usize) + Send + Sync>;

/// A [`StepHook`] in the state (which is `Debug`).
#[derive(Clone)]
struct HookSlot(StepHook);

impl core::fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("StepHook")
    }
}

/// A walk-cache key: the table descriptor at `level` that translates
/// `[base, base + size of a level-`level` entry)` in `regime` (stage-2
/// walks are shared by the stage-2-only and combined regimes).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd)]
struct WalkKey {
    regime: Regime,
    level: u8,
    base: u64,
}

/// One CPU's caches and context.
#[derive(Debug)]
struct CpuCaches {
    /// More than one value under a key only after a break-before-make
    /// violation (same range, different output or permissions).
    tlb: BTreeMap<Key, Vec<Cached>>,
    /// Walk cache: intermediate (table) descriptors, the address of the
    /// next-level table they point at.
    walk: BTreeMap<WalkKey, usize>,
    /// The committed view as of this CPU's last `ISB` (its EL2 accesses).
    isb_view: Arc<Snapshot>,
    /// This CPU's store buffer: descriptor words it wrote (address, value)
    /// that no `DSB` of its own has made visible to the walkers yet.
    store_buf: BTreeMap<usize, u64>,
    /// TLBIs this CPU issued that no `DSB ISH` of its own has completed.
    pending: Vec<Pending>,
    /// Whether this CPU issued a TLBI since its last DSB (the store-buffer
    /// check at TLBI issue is made for the first one only).
    tlbi_since_dsb: bool,
    /// The VMID its `VTTBR_EL2` holds (the guest it runs, or last ran):
    /// only CPUs with a VMID installed walk (and refill from) its tables.
    vttbr: Option<Vmid>,
}

impl CpuCaches {
    fn new(view: &Arc<Snapshot>) -> Self {
        Self {
            tlb: BTreeMap::new(),
            walk: BTreeMap::new(),
            isb_view: Arc::clone(view),
            store_buf: BTreeMap::new(),
            pending: Vec::new(),
            tlbi_since_dsb: false,
            vttbr: None,
        }
    }
}

#[derive(Debug)]
struct State {
    regions: Vec<Range<usize>>,
    committed: Arc<Snapshot>,
    /// Live memory as of the last attribution of stores to a CPU: what
    /// changed since was written by `cpu` (see `State::attribute`).
    seen: Arc<Snapshot>,
    s2_roots: BTreeMap<Vmid, usize>,
    el2_root: Option<usize>,
    cpus: Vec<CpuCaches>,
    stats: ModelStats,
    /// What `has_tlbi_range` answers.
    tlbi_range: bool,
    /// What `cpu_id` answers: the CPU the mm core runs on.
    cpu: usize,
    /// Rule violations seen (see [`Model::violations`]).
    violations: Vec<alloc::string::String>,
    /// Broken hardware, for tests of the tests: TLBIs act on the issuing
    /// CPU only (as the non-broadcast `TLBI VMALLE1` etc. would).
    local_tlbis: bool,
    /// See [`Model::set_step_hook`].
    step_hook: Option<HookSlot>,
    /// The step hook is running (its own accesses call no hook).
    in_hook: bool,
}

/// The model: a cloneable handle (all clones share one state), usable as the
/// mm core's [`MmArch`].
///
/// `Send + Sync` (the state sits behind one spin lock), because the mm core
/// shares its arch through `Sync` bounds (the pool's free hook). The lock is
/// not re-entrant; the model never calls out while holding it.
#[derive(Clone)]
pub struct Model(Arc<Mutex<State>>);

impl core::fmt::Debug for Model {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let st = self.0.lock();
        f.debug_struct("Model")
            .field("regions", &st.regions)
            .field("tlb_keys", &st.cpus[0].tlb.len())
            .field("pending_tlbis", &st.pending_count())
            .field("stats", &st.stats)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// A model whose translation tables live in `regions` (host memory
    /// standing in for physical memory). Walks and snapshots read only these
    /// regions; a table descriptor pointing elsewhere makes the walk fail
    /// with [`Fault::WalkOutsideRegions`]. The current contents become the
    /// initial committed view; the TLB starts empty.
    ///
    /// # Safety
    ///
    /// Every region must stay allocated and readable for as long as any
    /// clone of the model exists, and must not be written by another thread
    /// while a model method runs (the model reads it with plain loads).
    ///
    /// # Panics
    ///
    /// If a region is empty, not page-aligned, or overlaps another.
    #[must_use]
    pub unsafe fn new(regions: &[Range<usize>]) -> Self {
        // SAFETY: the caller's contract, passed on.
        unsafe { Self::new_smp(regions, MODEL_CPUS) }
    }

    /// [`new`](Self::new) with `cpus` CPUs (2 ..= [`MAX_MODEL_CPUS`]),
    /// each with its own TLB, walk cache, store buffer, pending TLBIs,
    /// `ISB` context and `VTTBR_EL2`.
    ///
    /// # Safety
    ///
    /// As for [`new`](Self::new).
    ///
    /// # Panics
    ///
    /// As for [`new`](Self::new), and if `cpus` is out of range.
    #[must_use]
    pub unsafe fn new_smp(regions: &[Range<usize>], cpus: usize) -> Self {
        assert!(
            (1..=MAX_MODEL_CPUS).contains(&cpus),
            "model CPUs {cpus} not in 1..={MAX_MODEL_CPUS}"
        );
        let mut sorted: Vec<Range<usize>> = regions.to_vec();
        sorted.sort_by_key(|r| r.start);
        for r in &sorted {
            assert!(
                r.start < r.end
                    && r.start.is_multiple_of(PAGE_SIZE)
                    && r.end.is_multiple_of(PAGE_SIZE),
                "model region {:#x}..{:#x} must be non-empty and page-aligned",
                r.start,
                r.end
            );
        }
        for w in sorted.windows(2) {
            assert!(
                w[0].end <= w[1].start,
                "model regions {:#x}..{:#x} and {:#x}..{:#x} overlap",
                w[0].start,
                w[0].end,
                w[1].start,
                w[1].end
            );
        }
        let mut state = State {
            committed: Arc::new(Snapshot { pages: Vec::new() }),
            regions: sorted,
            s2_roots: BTreeMap::new(),
            el2_root: None,
            seen: Arc::new(Snapshot { pages: Vec::new() }),
            cpus: Vec::new(),
            stats: ModelStats::default(),
            tlbi_range: true,
            cpu: 0,
            violations: Vec::new(),
            local_tlbis: false,
            step_hook: None,
            in_hook: false,
        };
        let initial = Snapshot {
            pages: state
                .regions
                .iter()
                .map(|r| {
                    (r.start..r.end)
                        .step_by(PAGE_SIZE)
                        .map(|page| Arc::from(state.live_page(page)))
                        .collect()
                })
                .collect(),
        };
        state.committed = Arc::new(initial);
        state.seen = Arc::clone(&state.committed);
        state.cpus = (0..cpus)
            .map(|_| CpuCaches::new(&state.committed))
            .collect();
        Self(Arc::new(Mutex::new(state)))
    }

    /// Registers the stage-2 root table of `vmid` (what `VTTBR_EL2.BADDR`
    /// holds when that guest runs). Changing a root does not touch the TLB.
    ///
    /// # Panics
    ///
    /// If `root` is not a page-aligned address inside the model's regions.
    pub fn set_stage2_root(&self, vmid: Vmid, root: usize) {
        let mut st = self.0.lock();
        st.assert_table(root);
        st.s2_roots.insert(vmid, root);
    }

    /// Registers the EL2 root table (`TTBR0_EL2`).
    ///
    /// # Panics
    ///
    /// If `root` is not a page-aligned address inside the model's regions.
    pub fn set_el2_root(&self, root: usize) {
        let mut st = self.0.lock();
        st.assert_table(root);
        st.el2_root = Some(root);
    }

    /// A guest load (`write == false`) or store at `ipa` of `vmid`: the
    /// physical address reached.
    ///
    /// # Errors
    ///
    /// The [`Fault`] the access takes.
    pub fn guest_access(&self, vmid: Vmid, ipa: u64, write: bool) -> Result<usize, Fault> {
        self.guest_access_detail(vmid, ipa, write).map(|a| a.pa)
    }

    /// [`guest_access`](Self::guest_access), also saying which leaf
    /// translated it and where that leaf came from.
    ///
    /// A combined TLB entry is used if one covers `ipa`; else a stage-2-only
    /// entry (filling a combined entry from it); else a walk of the committed
    /// tables (filling both). A leaf that refuses the access is cached all
    /// the same (the architecture allows caching any valid leaf).
    ///
    /// # Errors
    ///
    /// The [`Fault`] the access takes.
    pub fn guest_access_detail(&self, vmid: Vmid, ipa: u64, write: bool) -> Result<Access, Fault> {
        let cpu = self.0.lock().cpu;
        self.guest_access_on(cpu, vmid, ipa, write)
    }

    /// [`guest_access_detail`](Self::guest_access_detail) by the guest
    /// running on CPU `cpu` (below [`MODEL_CPUS`]): its own TLB and walk
    /// cache. A walk starts from the deepest walk-cache entry covering the
    /// address, and caches every table descriptor it reads.
    ///
    /// # Errors
    ///
    /// The [`Fault`] the access takes.
    ///
    /// # Panics
    ///
    /// If `cpu` is not below [`MODEL_CPUS`].
    pub fn guest_access_on(
        &self,
        cpu: usize,
        vmid: Vmid,
        ipa: u64,
        write: bool,
    ) -> Result<Access, Fault> {
        let mut st = self.0.lock();
        assert!(
            cpu < st.cpus.len(),
            "model CPU {cpu} beyond the model's CPUs"
        );
        // The guest runs there: its VTTBR is installed.
        st.cpus[cpu].vttbr = Some(vmid);
        st.stats.guest_accesses += 1;
        let combined = Regime::Combined(vmid);
        let stage2 = Regime::Stage2(vmid);
        if let Some(leaf) = st.lookup(cpu, combined, ipa)? {
            return check(combined, ipa, write, leaf, Source::CombinedTlb);
        }
        if let Some(leaf) = st.lookup(cpu, stage2, ipa)? {
            st.insert(cpu, combined, leaf);
            return check(combined, ipa, write, leaf, Source::Stage2Tlb);
        }
        st.stats.guest_walks += 1;
        let committed = Arc::clone(&st.committed);
        let leaf = st.walk_cached(cpu, &committed, stage2, ipa, true)?;
        st.insert(cpu, stage2, leaf);
        st.insert(cpu, combined, leaf);
        check(combined, ipa, write, leaf, Source::Walk)
    }

    /// The hypervisor's own load or store at `va`: the physical address
    /// reached.
    ///
    /// # Errors
    ///
    /// The [`Fault`] the access takes.
    pub fn el2_access(&self, va: usize, write: bool) -> Result<usize, Fault> {
        self.el2_access_detail(va, write).map(|a| a.pa)
    }

    /// [`el2_access`](Self::el2_access) with the leaf and its source.
    ///
    /// An EL2 TLB entry is used if one covers `va`. Else the EL2 tables are
    /// walked as of the last `ISB` (an early walk); the result is cached
    /// only where a walk of the committed tables agrees (the early result is
    /// used once by the instruction that was already in flight, a walker
    /// fetching now sees committed memory).
    ///
    /// # Errors
    ///
    /// The [`Fault`] the access takes.
    pub fn el2_access_detail(&self, va: usize, write: bool) -> Result<Access, Fault> {
        let mut st = self.0.lock();
        let cpu = st.cpu;
        st.stats.el2_accesses += 1;
        let addr = va as u64;
        if let Some(leaf) = st.lookup(cpu, Regime::El2, addr)? {
            return check(Regime::El2, addr, write, leaf, Source::El2Tlb);
        }
        st.stats.el2_walks += 1;
        let early = Arc::clone(&st.cpus[cpu].isb_view);
        let committed = Arc::clone(&st.committed);
        let leaf = st.walk_cached(cpu, &early, Regime::El2, addr, false)?;
        if st.walk_cached(cpu, &committed, Regime::El2, addr, true) == Ok(leaf) {
            st.insert(cpu, Regime::El2, leaf);
        }
        check(Regime::El2, addr, write, leaf, Source::Walk)
    }

    /// Reads every page of `ranges` (IPAs of `vmid`) as the guest, filling
    /// the TLB as a guest that touched its memory would. Faulting pages are
    /// skipped. Returns how many 4 KiB pages translated.
    #[must_use = "the count says whether every page was mapped"]
    pub fn touch_all_guest(&self, vmid: Vmid, ranges: &[Range<u64>]) -> u64 {
        ranges
            .iter()
            .map(|r| self.touch_guest(vmid, r.clone()))
            .sum()
    }

    /// [`touch_all_guest`](Self::touch_all_guest) for one range.
    #[must_use = "the count says whether every page was mapped"]
    pub fn touch_guest(&self, vmid: Vmid, range: Range<u64>) -> u64 {
        let cpu = self.0.lock().cpu;
        self.touch_guest_on(cpu, vmid, range)
    }

    /// [`touch_guest`](Self::touch_guest) by the guest on CPU `cpu`.
    #[must_use = "the count says whether every page was mapped"]
    pub fn touch_guest_on(&self, cpu: usize, vmid: Vmid, range: Range<u64>) -> u64 {
        let mut ok = 0;
        let end = range.end.next_multiple_of(PAGE);
        let mut addr = range.start & !(PAGE - 1);
        while addr < end {
            addr = match self.guest_access_on(cpu, vmid, addr, false) {
                // Every page of the leaf would hit the entry just used.
                Ok(a) => {
                    let next = (a.leaf.base + a.leaf.size).min(end);
                    ok += (next - addr) / PAGE;
                    next
                }
                Err(_) => addr + PAGE,
            };
        }
        ok
    }

    /// Walks the tables as written in memory right now (no store buffer, no
    /// TLB). `Regime::Combined(v)` walks `v`'s stage-2 tables, like
    /// `Regime::Stage2(v)`.
    #[must_use]
    pub fn walk_live(&self, regime: Regime, addr: u64) -> Option<Leaf> {
        self.0.lock().walk(View::Live, regime, addr).ok()
    }

    /// Every TLB entry that disagrees with a walk of live memory at its base:
    /// live says invalid, or gives another leaf size, output address or
    /// permissions. Empty after a correct unmap/change and its maintenance.
    #[must_use]
    pub fn stale_entries(&self) -> Vec<StaleEntry> {
        let st = self.0.lock();
        let mut out = Vec::new();
        for (key, values) in st.cpus.iter().flat_map(|c| &c.tlb) {
            let live = st.walk(View::Live, key.regime, key.base).ok();
            for cached in values {
                let leaf = cached.leaf(*key);
                let reason = match live {
                    None => Some(StaleReason::Unmapped),
                    Some(l) if (l.base, l.size) != (leaf.base, leaf.size) => {
                        Some(StaleReason::LeafSize)
                    }
                    Some(l) if l.out != leaf.out => Some(StaleReason::OutputAddress),
                    Some(l) if l.perm != leaf.perm => Some(StaleReason::Permissions),
                    Some(_) => None,
                };
                if let Some(reason) = reason {
                    out.push(StaleEntry {
                        entry: TlbEntry {
                            regime: key.regime,
                            leaf,
                        },
                        live,
                        reason,
                    });
                }
            }
        }
        out
    }

    /// No TLBI is pending and every table write has been made visible to
    /// the walkers (committed memory equals live memory).
    #[must_use]
    pub fn is_quiescent(&self) -> bool {
        let st = self.0.lock();
        st.pending_count() == 0 && st.changed_pages().is_empty()
    }

    /// Whether the EL2 view lags behind committed memory: a `DSB` published
    /// table changes that no `ISB` has synchronized yet.
    #[must_use]
    pub fn isb_outstanding(&self) -> bool {
        let st = self.0.lock();
        st.committed
            .pages
            .iter()
            .flatten()
            .zip(st.cpus[st.cpu].isb_view.pages.iter().flatten())
            .any(|(a, b)| !Arc::ptr_eq(a, b) && a[..] != b[..])
    }

    /// TLBIs issued and not yet completed by a `DSB ISH`.
    #[must_use]
    pub fn pending_tlbis(&self) -> usize {
        self.0.lock().pending_count()
    }

    /// Every TLB entry of every CPU, CPU by CPU, in (regime, size, base)
    /// order.
    #[must_use]
    pub fn tlb_entries(&self) -> Vec<TlbEntry> {
        let st = self.0.lock();
        st.cpus
            .iter()
            .flat_map(|c| &c.tlb)
            .flat_map(|(key, values)| {
                values.iter().map(|c| TlbEntry {
                    regime: key.regime,
                    leaf: c.leaf(*key),
                })
            })
            .collect()
    }

    /// The model's own counts.
    #[must_use]
    pub fn stats(&self) -> ModelStats {
        self.0.lock().stats
    }

    /// Sets the model's counts back to zero.
    pub fn reset_stats(&self) {
        self.0.lock().stats = ModelStats::default();
    }

    /// Sets what [`MmArch::has_tlbi_range`] answers (default `true`). With
    /// `false`, a `TLBI RIPAS2E1IS` panics (it would be an undefined
    /// instruction).
    pub fn set_tlbi_range(&self, available: bool) {
        self.0.lock().tlbi_range = available;
    }

    /// Sets what [`MmArch::cpu_id`] answers (default 0): the CPU the mm
    /// core runs on, whose stores, barriers, TLBIs, `ISB`s and EL2 accesses
    /// these are. Table stores made since the last switch (or barrier) are
    /// put in the store buffer of the CPU that was running: only that CPU's
    /// `DSB` makes them visible to the walkers. A broadcast TLBI acts on
    /// every CPU's TLB and walk cache, and is complete only once the issuing
    /// CPU executes a `DSB ISH`.
    ///
    /// # Panics
    ///
    /// If `cpu` is not one of the model's CPUs.
    pub fn set_cpu_id(&self, cpu: usize) {
        let mut st = self.0.lock();
        assert!(
            cpu < st.cpus.len(),
            "model CPU {cpu} beyond the model's CPUs"
        );
        st.attribute();
        st.cpu = cpu;
    }

    /// How many CPUs the model has.
    #[must_use]
    pub fn cpus(&self) -> usize {
        self.0.lock().cpus.len()
    }

    /// Broken hardware, to show the tests need the broadcast: with `true`,
    /// every TLBI acts on the issuing CPU's TLB and walk cache only (as a
    /// non-shareable `TLBI VMALLE1` / `IPAS2E1` would), so other CPUs keep
    /// what they cached.
    pub fn set_local_tlbis(&self, local: bool) {
        self.0.lock().local_tlbis = local;
    }

    /// Installs `hook`, called after every barrier and TLBI the model
    /// executes (with the executing CPU), outside the model's lock: a test
    /// lets other CPUs run their guests between every step of an operation
    /// (interleaving at barrier granularity). Barriers and TLBIs the hook
    /// itself executes call no hook.
    pub fn set_step_hook(&self, hook: Option<StepHook>) {
        self.0.lock().step_hook = hook.map(HookSlot);
    }

    /// Walk-cache entries of any CPU that live memory no longer has: the
    /// table descriptor they cache no longer points at that table (the
    /// table was detached or replaced). Each as (CPU, regime, level, base,
    /// cached next-level table). Empty once every removal's invalidation
    /// has completed.
    #[must_use]
    pub fn stale_walks(&self) -> Vec<(usize, Regime, u8, u64, usize)> {
        let st = self.0.lock();
        let mut out = Vec::new();
        for (cpu, c) in st.cpus.iter().enumerate() {
            for (k, &next) in &c.walk {
                let Ok((root, _, first)) = st.root_of(k.regime) else {
                    out.push((cpu, k.regime, k.level, k.base, next));
                    continue;
                };
                let mut path = Vec::new();
                let _ = st.walk_from(View::Live, k.regime, k.base, first, root, &mut |l, t| {
                    path.push((l, t));
                });
                if !path.contains(&(k.level, next)) {
                    out.push((cpu, k.regime, k.level, k.base, next));
                }
            }
        }
        out
    }

    /// Sets what CPU `cpu`'s `VTTBR_EL2` holds: `vmid`'s tables, or
    /// nothing of any guest (`None`: switched away, as `Drop for Stage2`
    /// requires of every CPU). A guest access on a CPU installs its VMID
    /// there. Only CPUs with a VMID installed walk its tables (so only they
    /// refill its entries adversarially); a root installed on a CPU must not
    /// be freed.
    ///
    /// # Panics
    ///
    /// If `cpu` is not below [`MODEL_CPUS`].
    pub fn set_vttbr(&self, cpu: usize, vmid: Option<Vmid>) {
        self.0.lock().cpus[cpu].vttbr = vmid;
    }

    /// Every walk-cache entry of CPU `cpu`: (regime, level, base, next
    /// table).
    #[must_use]
    pub fn walk_entries(&self, cpu: usize) -> Vec<(Regime, u8, u64, usize)> {
        self.0.lock().cpus[cpu]
            .walk
            .iter()
            .map(|(k, &next)| (k.regime, k.level, k.base, next))
            .collect()
    }

    /// The rules the model saw broken, in order. Two are checked:
    /// - a TLBI issued while a descriptor write is not yet visible (no
    ///   `DSB` since it): the walkers may refetch the old entry between the
    ///   TLBI and its completion (the project's rule: every flush that
    ///   issues a TLBI is preceded by `DSB ISHST`);
    /// - a table page handed back to the pool ([`MmArch::table_page_freed`])
    ///   while a live or committed table points at it, a registered root is
    ///   it, a CPU's walk cache points at it, or a TLBI is still pending.
    #[must_use]
    pub fn violations(&self) -> Vec<alloc::string::String> {
        self.0.lock().violations.clone()
    }

    fn issue(&self, op: TlbiOp) {
        {
            let mut st = self.0.lock();
            let cpu = st.cpu;
            if !st.cpus[cpu].tlbi_since_dsb {
                st.cpus[cpu].tlbi_since_dsb = true;
                st.attribute();
                let unsynced = st.cpus[cpu].store_buf.len();
                if unsynced > 0 {
                    let msg = alloc::format!(
                        "TLBI {op:?} issued by CPU {cpu} with {unsynced} descriptor(s) it wrote since its last DSB"
                    );
                    st.violations.push(msg);
                }
            }
            let view = Arc::clone(&st.committed);
            st.cpus[cpu].pending.push(Pending { op, view });
        }
        self.step();
    }

    /// Runs the step hook (if any, and not from inside it) for the CPU that
    /// just executed a barrier or TLBI.
    fn step(&self) {
        let (hook, cpu) = {
            let mut st = self.0.lock();
            if st.in_hook {
                return;
            }
            let Some(HookSlot(hook)) = st.step_hook.clone() else {
                return;
            };
            st.in_hook = true;
            (hook, st.cpu)
        };
        hook(cpu);
        self.0.lock().in_hook = false;
    }
}

/// Checks `leaf`'s permissions for the access and computes the PA.
fn check(
    regime: Regime,
    addr: u64,
    write: bool,
    leaf: Leaf,
    source: Source,
) -> Result<Access, Fault> {
    let allowed = if write {
        leaf.perm.write
    } else {
        leaf.perm.read
    };
    if allowed {
        Ok(Access {
            pa: leaf.out + (addr - leaf.base) as usize,
            leaf,
            source,
        })
    } else {
        Err(Fault::Permission {
            regime,
            addr,
            write,
            leaf,
            source,
        })
    }
}

/// The permissions a leaf descriptor grants in `regime`'s format.
fn decode_perm(regime: Regime, desc: u64) -> Perm {
    let exec = desc & DESC_XN == 0;
    match regime {
        Regime::Stage2(_) | Regime::Combined(_) => Perm {
            read: desc & DESC_S2AP_READ != 0,
            write: desc & DESC_S2AP_WRITE != 0,
            exec,
        },
        Regime::El2 => Perm {
            read: true,
            write: desc & DESC_AP_RO == 0,
            exec,
        },
    }
}

impl State {
    /// The region index and offset of `addr`, if `[addr, addr + len)` lies in
    /// one region.
    fn locate(&self, addr: usize, len: usize) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (addr >= r.start && addr.checked_add(len)? <= r.end).then(|| (i, addr - r.start))
        })
    }

    fn assert_table(&self, root: usize) {
        assert!(
            root.is_multiple_of(PAGE_SIZE) && self.locate(root, PAGE_SIZE).is_some(),
            "table {root:#x} is not a page of the model's regions"
        );
    }

    /// The live bytes of the region page at `page`.
    fn live_page(&self, page: usize) -> &[u8] {
        debug_assert!(self.locate(page, PAGE_SIZE).is_some());
        // SAFETY: `page` is a page of one of the regions (callers iterate
        // over them), which `Model::new`'s contract keeps allocated and
        // readable, and no other thread writes while a model method runs.
        // The slice lives only as long as this borrow of the locked state,
        // which the single thread running the model does not write tables.
        unsafe { core::slice::from_raw_parts(page as *const u8, PAGE_SIZE) }
    }

    /// Pages whose live contents differ from `committed`, with a copy of
    /// the live contents.
    fn changed_pages(&self) -> Vec<(usize, usize, Arc<[u8]>)> {
        let mut changed = Vec::new();
        for (r, region) in self.regions.iter().enumerate() {
            for (p, old) in self.committed.pages[r].iter().enumerate() {
                let live = self.live_page(region.start + p * PAGE_SIZE);
                if live != &old[..] {
                    changed.push((r, p, Arc::from(live)));
                }
            }
        }
        changed
    }

    fn pending_count(&self) -> usize {
        self.cpus.iter().map(|c| c.pending.len()).sum()
    }

    /// Puts every descriptor word that changed in live memory since the last
    /// attribution in the store buffer of the CPU running now (`cpu`): the
    /// model runs one CPU at a time, so what changed since the last switch
    /// or barrier was written by it.
    fn attribute(&mut self) {
        let cpu = self.cpu;
        let mut seen: Option<Snapshot> = None;
        for (r, region) in self.regions.iter().enumerate() {
            for (p, old) in self.seen.pages[r].iter().enumerate() {
                let addr = region.start + p * PAGE_SIZE;
                if self.live_page(addr) == &old[..] {
                    continue;
                }
                let live: Arc<[u8]> = Arc::from(self.live_page(addr));
                for (i, (new, was)) in live.chunks_exact(8).zip(old.chunks_exact(8)).enumerate() {
                    if new != was {
                        let mut word = [0; 8];
                        word.copy_from_slice(new);
                        self.cpus[cpu]
                            .store_buf
                            .insert(addr + i * 8, u64::from_ne_bytes(word));
                    }
                }
                seen.get_or_insert_with(|| (*self.seen).clone()).pages[r][p] = live;
            }
        }
        if let Some(seen) = seen {
            self.seen = Arc::new(seen);
        }
    }

    /// A DSB's effect on stores, on the CPU running now: everything it wrote
    /// so far becomes visible to every walker (other CPUs' buffered stores
    /// stay buffered).
    fn commit(&mut self) {
        self.attribute();
        let cpu = self.cpu;
        let buf = core::mem::take(&mut self.cpus[cpu].store_buf);
        if buf.is_empty() {
            return;
        }
        let mut snap = (*self.committed).clone();
        let mut page: Option<(usize, usize, Vec<u8>)> = None;
        for (addr, value) in buf {
            let (r, off) = self
                .locate(addr, 8)
                .expect("buffered store inside a region");
            let p = off / PAGE_SIZE;
            if page.as_ref().is_none_or(|(pr, pp, _)| (*pr, *pp) != (r, p)) {
                if let Some((pr, pp, bytes)) = page.take() {
                    snap.pages[pr][pp] = Arc::from(bytes);
                }
                page = Some((r, p, snap.pages[r][p].to_vec()));
            }
            let bytes = &mut page.as_mut().expect("page just set").2;
            let at = off % PAGE_SIZE;
            bytes[at..at + 8].copy_from_slice(&value.to_ne_bytes());
        }
        if let Some((pr, pp, bytes)) = page {
            snap.pages[pr][pp] = Arc::from(bytes);
        }
        self.committed = Arc::new(snap);
        self.stats.commits += 1;
        self.check_makes();
    }

    /// The "make" rule of break-before-make, checked as a DSB makes writes
    /// visible: a valid stage-2 leaf the walkers can now fetch must not
    /// disagree (in range or output address; permissions may change in
    /// place) with a leaf a CPU still caches for that address, and a block
    /// must not appear where a CPU's walk cache still holds a table entry.
    /// Either means the new entry was made before the invalidation of the
    /// broken one had completed (a walker could combine both: a TLB
    /// conflict, or a stale table walked next to the new block).
    fn check_makes(&mut self) {
        let view = Arc::clone(&self.committed);
        let mut found = Vec::new();
        for (cpu, caches) in self.cpus.iter().enumerate() {
            for (key, values) in &caches.tlb {
                if matches!(key.regime, Regime::El2) {
                    continue;
                }
                let Ok(now) = self.walk(View::Snap(&view), key.regime, key.base) else {
                    continue;
                };
                for cached in values {
                    let old = cached.leaf(*key);
                    if (now.base, now.size, now.out) != (old.base, old.size, old.out) {
                        found.push(alloc::format!(
                            "make before break: CPU {cpu} caches {old:?} ({:?}) while {now:?} is made visible",
                            key.regime
                        ));
                    }
                }
            }
            for key in caches.walk.keys() {
                if matches!(key.regime, Regime::El2) {
                    continue;
                }
                if let Ok(now) = self.walk(View::Snap(&view), key.regime, key.base)
                    && now.level <= key.level
                {
                    found.push(alloc::format!(
                        "make before break: CPU {cpu}'s walk cache holds a level-{} table entry at {:#x} ({:?}) while {now:?} is made visible",
                        key.level, key.base, key.regime
                    ));
                }
            }
        }
        self.violations.extend(found);
    }

    fn read_desc(&self, view: View<'_>, addr: usize) -> Option<u64> {
        let (r, off) = self.locate(addr, 8)?;
        if !addr.is_multiple_of(8) {
            return None;
        }
        match view {
            View::Live => {
                // SAFETY: `addr..addr + 8` lies in a region (checked by
                // `locate`), which `Model::new`'s contract keeps allocated
                // and readable; `addr` is 8-aligned.
                Some(unsafe { (addr as *const u64).read_volatile() })
            }
            View::Snap(snap) => {
                let page = &snap.pages[r][off / PAGE_SIZE];
                let at = off % PAGE_SIZE;
                let mut bytes = [0; 8];
                bytes.copy_from_slice(&page[at..at + 8]);
                Some(u64::from_ne_bytes(bytes))
            }
        }
    }

    /// The root table and walk parameters of `regime`: (root, input bits,
    /// first level).
    fn root_of(&self, regime: Regime) -> Result<(usize, u32, u8), Fault> {
        let root = match regime {
            Regime::Stage2(vmid) | Regime::Combined(vmid) => self.s2_roots.get(&vmid).copied(),
            Regime::El2 => self.el2_root,
        }
        .ok_or(Fault::NoRoot { regime })?;
        // Stage 2: 39-bit IPAs, walks from level 1 (as the hypervisor's
        // VTCR_EL2). EL2: 48-bit VAs from level 0, so host addresses (which
        // stand in for physical ones, identity-mapped) fit.
        Ok(match regime {
            Regime::El2 => (root, EL2_INPUT_BITS, 0),
            Regime::Stage2(_) | Regime::Combined(_) => (root, INPUT_BITS, 1),
        })
    }

    /// Walks `regime`'s tables in `view` for `addr` (no walk cache).
    fn walk(&self, view: View<'_>, regime: Regime, addr: u64) -> Result<Leaf, Fault> {
        let (root, bits, level) = self.root_of(regime)?;
        if addr >> bits != 0 {
            return Err(Fault::OutOfRange { regime, addr });
        }
        self.walk_from(view, regime, addr, level, root, &mut |_, _| {})
    }

    /// Walks from the table `table` at `level` for `addr`, calling
    /// `on_table(level, next_table)` for every table descriptor read.
    fn walk_from(
        &self,
        view: View<'_>,
        regime: Regime,
        addr: u64,
        mut level: u8,
        mut table: usize,
        on_table: &mut dyn FnMut(u8, usize),
    ) -> Result<Leaf, Fault> {
        loop {
            let shift = 12 + 9 * u32::from(3 - level);
            let index = ((addr >> shift) & 511) as usize;
            let desc_addr = table + index * 8;
            let desc = self
                .read_desc(view, desc_addr)
                .ok_or(Fault::WalkOutsideRegions {
                    regime,
                    addr,
                    level,
                    desc_addr,
                })?;
            if desc & DESC_VALID == 0 {
                return Err(Fault::Translation {
                    regime,
                    addr,
                    level,
                });
            }
            let table_or_page = desc & DESC_TABLE_OR_PAGE != 0;
            if level < 3 && table_or_page {
                table = (desc & DESC_OA_MASK) as usize;
                on_table(level, table);
                level += 1;
                continue;
            }
            if (level == 3 && !table_or_page) || level == 0 {
                // A block descriptor at level 3 is reserved, and level 0 has
                // no blocks with a 4 KiB granule: invalid.
                return Err(Fault::Translation {
                    regime,
                    addr,
                    level,
                });
            }
            if desc & DESC_AF == 0 {
                return Err(Fault::AccessFlag {
                    regime,
                    addr,
                    level,
                });
            }
            let size = 1u64 << shift;
            return Ok(Leaf {
                base: addr & !(size - 1),
                size,
                out: (desc & DESC_OA_MASK & !(size - 1)) as usize,
                perm: decode_perm(regime, desc),
                level,
            });
        }
    }

    /// A walk by CPU `cpu`'s walker: it starts from the deepest walk-cache
    /// entry covering `addr` (a stale one included: that is the point), and
    /// with `fill` caches every table descriptor it reads from `view`.
    fn walk_cached(
        &mut self,
        cpu: usize,
        view: &Snapshot,
        regime: Regime,
        addr: u64,
        fill: bool,
    ) -> Result<Leaf, Fault> {
        let (root, bits, first) = self.root_of(regime)?;
        if addr >> bits != 0 {
            return Err(Fault::OutOfRange { regime, addr });
        }
        let wregime = walk_regime(regime);
        let mut start = (first, root);
        for level in (first..3).rev() {
            let key = WalkKey {
                regime: wregime,
                level,
                base: addr & !(entry_size(level) - 1),
            };
            if let Some(&next) = self.cpus[cpu].walk.get(&key) {
                start = (level + 1, next);
                break;
            }
        }
        let mut read = Vec::new();
        let r = self.walk_from(
            View::Snap(view),
            regime,
            addr,
            start.0,
            start.1,
            &mut |l, t| {
                read.push((l, t));
            },
        );
        if fill {
            for (level, next) in read {
                let key = WalkKey {
                    regime: wregime,
                    level,
                    base: addr & !(entry_size(level) - 1),
                };
                self.cpus[cpu].walk.insert(key, next);
            }
        }
        r
    }

    /// Table pages reachable from the registered roots in `view` (roots
    /// included).
    fn reachable_tables(&self, view: View<'_>) -> Vec<usize> {
        let mut out = Vec::new();
        let mut todo: Vec<(usize, u8)> = self
            .s2_roots
            .values()
            .map(|&r| (r, 1))
            .chain(self.el2_root.map(|r| (r, 0)))
            .collect();
        while let Some((table, level)) = todo.pop() {
            if out.contains(&table) {
                continue;
            }
            out.push(table);
            if level >= 3 {
                continue;
            }
            for i in 0..512 {
                let Some(desc) = self.read_desc(view, table + i * 8) else {
                    break;
                };
                if desc & (DESC_VALID | DESC_TABLE_OR_PAGE) == DESC_VALID | DESC_TABLE_OR_PAGE {
                    let next = (desc & DESC_OA_MASK) as usize;
                    if self.locate(next, PAGE_SIZE).is_some() {
                        todo.push((next, level + 1));
                    }
                }
            }
        }
        out
    }

    /// The check of [`MmArch::table_page_freed`].
    fn check_freed(&mut self, pa: usize) {
        let mut why = Vec::new();
        if self.s2_roots.values().any(|&r| r == pa) || self.el2_root == Some(pa) {
            why.push("it is a registered root (a VTTBR may hold it)".into());
        }
        for (cpu, c) in self.cpus.iter().enumerate() {
            if c.vttbr.and_then(|v| self.s2_roots.get(&v)) == Some(&pa) {
                why.push(alloc::format!("CPU {cpu}'s VTTBR_EL2 holds it"));
            }
        }
        if self.reachable_tables(View::Live).contains(&pa) {
            why.push("a live table points at it".into());
        } else if self
            .reachable_tables(View::Snap(&self.committed))
            .contains(&pa)
        {
            why.push("the walkers still see a table pointing at it (no DSB since)".into());
        }
        for (cpu, c) in self.cpus.iter().enumerate() {
            if let Some((k, _)) = c.walk.iter().find(|&(_, &next)| next == pa) {
                why.push(alloc::format!(
                    "CPU {cpu}'s walk cache points at it ({k:?})"
                ));
            }
        }
        let mine = self.cpus[self.cpu].pending.len();
        if mine > 0 {
            why.push(alloc::format!(
                "{mine} TLBI(s) of CPU {} (the freeing CPU) still pending (no DSB ISH of its own since)",
                self.cpu
            ));
        }
        if !why.is_empty() {
            let msg = alloc::format!("table page {pa:#x} freed while {}", why.join("; "));
            self.violations.push(msg);
        }
    }

    /// Whether CPU `cpu`'s walker may walk `regime`'s tables now (and so
    /// refill its entries between a TLBI and its completion): EL2 always,
    /// a VMID's stage 2 only where its VTTBR is installed.
    fn may_walk(&self, cpu: usize, regime: Regime) -> bool {
        match regime {
            Regime::El2 => true,
            Regime::Stage2(vmid) | Regime::Combined(vmid) => self.cpus[cpu].vttbr == Some(vmid),
        }
    }

    /// Every cached leaf of `regime` covering `addr` in CPU `cpu`'s TLB.
    fn matches(&self, cpu: usize, regime: Regime, addr: u64) -> Vec<Leaf> {
        LEAF_SIZES
            .iter()
            .flat_map(|&size| {
                let key = Key {
                    regime,
                    size,
                    base: addr & !(size - 1),
                };
                self.cpus[cpu]
                    .tlb
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .map(move |c| c.leaf(key))
            })
            .collect()
    }

    /// The entry of `regime` covering `addr` in CPU `cpu`'s TLB, if any.
    fn lookup(&self, cpu: usize, regime: Regime, addr: u64) -> Result<Option<Leaf>, Fault> {
        let found = self.matches(cpu, regime, addr);
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            _ => Err(Fault::TlbConflict {
                regime,
                addr,
                entries: found.len(),
            }),
        }
    }

    fn insert(&mut self, cpu: usize, regime: Regime, leaf: Leaf) {
        let key = Key {
            regime,
            size: leaf.size,
            base: leaf.base,
        };
        let value = Cached {
            out: leaf.out,
            perm: leaf.perm,
            level: leaf.level,
        };
        let values = self.cpus[cpu].tlb.entry(key).or_default();
        if !values.contains(&value) {
            values.push(value);
        }
    }

    /// Drops CPU `cpu`'s entries of `regime` overlapping `[start, end)`
    /// (all of the regime when `None`), of level `ttl` only if hinted.
    fn drop_leaves(
        &mut self,
        cpu: usize,
        regime: Regime,
        span: Option<(u64, u64)>,
        ttl: Option<u8>,
    ) -> Vec<Leaf> {
        let mut dropped = Vec::new();
        let tlb = &mut self.cpus[cpu].tlb;
        let keys: Vec<Key> = tlb
            .range(
                Key {
                    regime,
                    size: 0,
                    base: 0,
                }..=Key {
                    regime,
                    size: u64::MAX,
                    base: u64::MAX,
                },
            )
            .map(|(k, _)| *k)
            .filter(|k| span.is_none_or(|(s, e)| k.base < e && s < k.base + k.size))
            .collect();
        for key in keys {
            let values = tlb.get_mut(&key).expect("key just listed");
            values.retain(|c| {
                let hit = ttl.is_none_or(|l| l == c.level);
                if hit {
                    dropped.push(c.leaf(key));
                }
                !hit
            });
            if values.is_empty() {
                tlb.remove(&key);
            }
        }
        dropped
    }

    /// Drops CPU `cpu`'s walk-cache entries of `regime` overlapping
    /// `[start, end)` (all when `None`), at levels above `ttl` only if
    /// hinted (the walk to a level-`ttl` leaf). Returns the keys dropped.
    fn drop_walks(
        &mut self,
        cpu: usize,
        regime: Regime,
        span: Option<(u64, u64)>,
        ttl: Option<u8>,
    ) -> Vec<WalkKey> {
        let walk = &mut self.cpus[cpu].walk;
        let keys: Vec<WalkKey> = walk
            .keys()
            .filter(|k| k.regime == regime)
            .filter(|k| ttl.is_none_or(|l| k.level < l))
            .filter(|k| span.is_none_or(|(s, e)| k.base < e && s < k.base + entry_size(k.level)))
            .copied()
            .collect();
        for k in &keys {
            walk.remove(k);
        }
        keys
    }

    /// The adversarial refill: for each dropped leaf, what a walk of `view`
    /// at its base yields, re-inserted as an entry of `regime`.
    fn refill_from_view(&mut self, cpu: usize, view: &Snapshot, regime: Regime, dropped: &[Leaf]) {
        if !self.may_walk(cpu, regime) {
            return;
        }
        for old in dropped {
            if let Ok(leaf) = self.walk(View::Snap(view), regime, old.base) {
                self.insert(cpu, regime, leaf);
                self.stats.refills += 1;
            }
        }
    }

    /// The adversarial refill of walk-cache entries: each dropped one whose
    /// table descriptor `view` still holds is fetched again.
    fn refill_walks(&mut self, cpu: usize, view: &Snapshot, dropped: &[WalkKey]) {
        for k in dropped {
            let regime = k.regime;
            if !self.may_walk(cpu, regime) {
                continue;
            }
            let Ok((root, _, first)) = self.root_of(regime) else {
                continue;
            };
            let mut path = Vec::new();
            let _ = self.walk_from(
                View::Snap(view),
                regime,
                k.base,
                first,
                root,
                &mut |l, t| {
                    path.push((l, t));
                },
            );
            if let Some(&(_, next)) = path.iter().find(|(l, _)| *l == k.level) {
                self.cpus[cpu].walk.insert(*k, next);
                self.stats.walk_refills += 1;
            }
        }
    }

    /// A DSB ISH's effect on TLB maintenance: completes every TLBI the
    /// running CPU issued and has not completed yet, in issue order, on
    /// every CPU (they are broadcast; with `local_tlbis`, on the issuing
    /// CPU only). Other CPUs' pending TLBIs wait for their own `DSB ISH`.
    fn complete_tlbis(&mut self) {
        let issuer = self.cpu;
        for Pending { op, view } in core::mem::take(&mut self.cpus[issuer].pending) {
            for cpu in 0..self.cpus.len() {
                if self.local_tlbis && cpu != issuer {
                    continue;
                }
                self.complete_one(cpu, op, &view);
            }
        }
    }

    fn complete_one(&mut self, cpu: usize, op: TlbiOp, view: &Snapshot) {
        match op {
            TlbiOp::Ipas2 {
                vmid,
                start,
                end,
                leaf_only,
                ttl,
            } => {
                let regime = Regime::Stage2(vmid);
                let dropped = self.drop_leaves(cpu, regime, Some((start, end)), ttl);
                if !leaf_only {
                    let walks = self.drop_walks(cpu, regime, Some((start, end)), ttl);
                    self.refill_walks(cpu, view, &walks);
                }
                self.refill_from_view(cpu, view, regime, &dropped);
            }
            TlbiOp::Vmalle1 { vmid } => {
                let dropped = self.drop_leaves(cpu, Regime::Combined(vmid), None, None);
                if !self.may_walk(cpu, Regime::Combined(vmid)) {
                    return;
                }
                for old in &dropped {
                    // The guest re-fetches through a stage-2-only entry
                    // still cached, else through a walk.
                    let from_tlb = self
                        .matches(cpu, Regime::Stage2(vmid), old.base)
                        .first()
                        .copied();
                    let leaf = from_tlb.or_else(|| {
                        self.walk(View::Snap(view), Regime::Combined(vmid), old.base)
                            .ok()
                    });
                    if let Some(leaf) = leaf {
                        self.insert(cpu, Regime::Combined(vmid), leaf);
                        self.stats.refills += 1;
                    }
                }
            }
            TlbiOp::Vmalls12 { vmid } => {
                let walks = self.drop_walks(cpu, Regime::Stage2(vmid), None, None);
                self.refill_walks(cpu, view, &walks);
                for regime in [Regime::Stage2(vmid), Regime::Combined(vmid)] {
                    let dropped = self.drop_leaves(cpu, regime, None, None);
                    self.refill_from_view(cpu, view, regime, &dropped);
                }
            }
            TlbiOp::Vae2 { va } => {
                let span = Some((va, va + PAGE));
                let walks = self.drop_walks(cpu, Regime::El2, span, None);
                self.refill_walks(cpu, view, &walks);
                let dropped = self.drop_leaves(cpu, Regime::El2, span, None);
                self.refill_from_view(cpu, view, Regime::El2, &dropped);
            }
            TlbiOp::Alle2 => {
                let walks = self.drop_walks(cpu, Regime::El2, None, None);
                self.refill_walks(cpu, view, &walks);
                let dropped = self.drop_leaves(cpu, Regime::El2, None, None);
                self.refill_from_view(cpu, view, Regime::El2, &dropped);
            }
        }
    }
}

/// The regime whose walk cache a walk of `regime` uses (stage-2-only and
/// combined walks go through the same stage-2 tables).
fn walk_regime(regime: Regime) -> Regime {
    match regime {
        Regime::Combined(vmid) => Regime::Stage2(vmid),
        r => r,
    }
}

/// Bytes one entry at `level` covers (4 KiB granule).
fn entry_size(level: u8) -> u64 {
    1 << (12 + 9 * u32::from(3 - level))
}

impl MmArch for Model {
    fn dsb_ishst(&self) {
        {
            let mut st = self.0.lock();
            st.stats.dsb_ishst += 1;
            let cpu = st.cpu;
            st.cpus[cpu].tlbi_since_dsb = false;
            st.commit();
        }
        self.step();
    }

    fn dsb_ish(&self) {
        {
            let mut st = self.0.lock();
            st.stats.dsb_ish += 1;
            let cpu = st.cpu;
            st.cpus[cpu].tlbi_since_dsb = false;
            st.complete_tlbis();
            st.commit();
        }
        self.step();
    }

    fn isb(&self) {
        {
            let mut st = self.0.lock();
            st.stats.isb += 1;
            let cpu = st.cpu;
            st.cpus[cpu].isb_view = Arc::clone(&st.committed);
        }
        self.step();
    }

    fn tlbi_ipas2e1is(&self, vmid: Vmid, ipa: u64, ttl: Option<u8>) {
        self.ipas2(vmid, ipa, ttl, false);
    }

    fn tlbi_ipas2le1is(&self, vmid: Vmid, ipa: u64, ttl: Option<u8>) {
        self.ipas2(vmid, ipa, ttl, true);
    }

    fn tlbi_ripas2e1is(&self, vmid: Vmid, ipa: u64, pages: u64, ttl: Option<u8>) {
        self.ripas2(vmid, ipa, pages, ttl, false);
    }

    fn tlbi_ripas2le1is(&self, vmid: Vmid, ipa: u64, pages: u64, ttl: Option<u8>) {
        self.ripas2(vmid, ipa, pages, ttl, true);
    }

    fn tlbi_vmalle1is(&self, vmid: Vmid) {
        self.0.lock().stats.tlbi_vmalle1is += 1;
        self.issue(TlbiOp::Vmalle1 { vmid });
    }

    fn tlbi_vmalls12e1is(&self, vmid: Vmid) {
        self.0.lock().stats.tlbi_vmalls12e1is += 1;
        self.issue(TlbiOp::Vmalls12 { vmid });
    }

    fn tlbi_vae2is(&self, va: u64) {
        self.0.lock().stats.tlbi_vae2is += 1;
        self.issue(TlbiOp::Vae2 {
            va: va & !(PAGE - 1),
        });
    }

    fn tlbi_alle2is(&self) {
        self.0.lock().stats.tlbi_alle2is += 1;
        self.issue(TlbiOp::Alle2);
    }

    fn has_tlbi_range(&self) -> bool {
        self.0.lock().tlbi_range
    }

    fn cpu_id(&self) -> usize {
        self.0.lock().cpu
    }

    fn el2_access_ok(&self, va: usize, write: bool) -> bool {
        self.el2_access(va, write).is_ok()
    }

    fn vmid_bits(&self) -> u32 {
        16
    }

    fn stage2_root(&self, vmid: Vmid, root: Option<usize>) {
        match root {
            Some(root) => self.set_stage2_root(vmid, root),
            None => {
                self.0.lock().s2_roots.remove(&vmid);
            }
        }
    }

    fn table_page_freed(&self, pa: usize) {
        self.0.lock().check_freed(pa);
    }
}

impl Model {
    fn ipas2(&self, vmid: Vmid, ipa: u64, ttl: Option<u8>, leaf_only: bool) {
        let covers = ttl.map_or(PAGE, entry_size);
        {
            let mut st = self.0.lock();
            st.stats.tlbi_ipas2e1is += 1;
            st.stats.tlbi_pages += covers / PAGE;
            st.stats.tlbi_leaf_only += u64::from(leaf_only);
        }
        // With a level hint the TLBI drops the entry of that level holding
        // `ipa`; without, whatever translates the page.
        let start = ipa & !(covers - 1);
        self.issue(TlbiOp::Ipas2 {
            vmid,
            start,
            end: start.saturating_add(covers),
            leaf_only,
            ttl,
        });
    }

    fn ripas2(&self, vmid: Vmid, ipa: u64, pages: u64, ttl: Option<u8>, leaf_only: bool) {
        {
            let mut st = self.0.lock();
            assert!(
                st.tlbi_range,
                "TLBI RIPAS2(L)E1IS without FEAT_TLBIRANGE (has_tlbi_range() is false)"
            );
            st.stats.tlbi_ripas2e1is += 1;
            st.stats.tlbi_pages += pages;
            st.stats.tlbi_leaf_only += u64::from(leaf_only);
        }
        let start = ipa & !(PAGE - 1);
        self.issue(TlbiOp::Ipas2 {
            vmid,
            start,
            end: start.saturating_add(pages.saturating_mul(PAGE)),
            leaf_only,
            ttl,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aarch64_paging::Mapping;
    use aarch64_paging::descriptor::{
        El23Attributes, PagingAttributes, PhysicalAddress, Stage2Attributes,
    };
    use aarch64_paging::paging::{self, Constraints, MemoryRegion, PageTable, Translation};
    use alloc::alloc::{Layout, alloc_zeroed};
    use core::ptr::NonNull;

    const VMID: Vmid = Vmid(7);
    /// A guest IPA with a 2 MiB-aligned neighbourhood.
    const IPA: u64 = 0x4020_0000;
    /// Stand-in output addresses (the model never touches them).
    const PA: usize = 0x8_0000_0000;
    const PA2: usize = 0x9_0000_0000;
    const MIB2: usize = BLOCK_2M;

    /// `pages` pages of zeroed, page-aligned host memory, leaked.
    fn host_region(pages: usize) -> Range<usize> {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) } as usize;
        assert_ne!(base, 0, "host allocation failed");
        base..base + pages * PAGE_SIZE
    }

    /// Table pages handed out in order from a leaked host region (zeroed,
    /// never reused: detached tables are leaked).
    struct HostTables {
        next: usize,
        end: usize,
    }

    impl<A: PagingAttributes> Translation<A> for HostTables {
        fn allocate_table(&mut self) -> (NonNull<PageTable<A>>, PhysicalAddress) {
            assert!(self.next < self.end, "test table region exhausted");
            let pa = self.next;
            self.next += PAGE_SIZE;
            let ptr = NonNull::new(pa as *mut PageTable<A>).expect("non-null page");
            (ptr, PhysicalAddress(pa))
        }

        unsafe fn deallocate_table(&mut self, _table: NonNull<PageTable<A>>) {}

        fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<A>> {
            NonNull::new(pa.0 as *mut PageTable<A>).expect("non-null table")
        }
    }

    /// Tables of `R` in a fresh host region, and a model over the region.
    fn tables<R>(regime: R) -> (Mapping<HostTables, R>, Model)
    where
        R: paging::TranslationRegime<Asid = (), VaRange = ()>,
    {
        // The model walks EL2 from level 0 (48-bit VAs), stage 2 from level 1.
        let root_level = usize::from(!core::any::type_name::<R>().ends_with("El2"));
        let region = host_region(32);
        let tables = HostTables {
            next: region.start,
            end: region.end,
        };
        let mapping = Mapping::new(tables, root_level, regime);
        // SAFETY: `host_region` leaks its memory, so the region stays
        // allocated for the rest of the process, and only this test's
        // thread writes it.
        let model = unsafe { Model::new(&[region]) };
        (mapping, model)
    }

    fn ram() -> Stage2Attributes {
        Stage2Attributes::VALID
            | Stage2Attributes::ACCESS_FLAG
            | Stage2Attributes::S2AP_ACCESS_RW
            | Stage2Attributes::MEMATTR_NORMAL_INNER_WB
            | Stage2Attributes::MEMATTR_NORMAL_OUTER_WB
            | Stage2Attributes::SH_INNER
    }

    fn read_only() -> Stage2Attributes {
        (ram() - Stage2Attributes::S2AP_ACCESS_RW) | Stage2Attributes::S2AP_ACCESS_RO
    }

    /// A guest's stage-2 tables, plain stores only (the Mapping is never
    /// active, so aarch64-paging issues no barriers or TLBIs).
    struct Guest {
        tables: Mapping<HostTables, paging::Stage2>,
        model: Model,
    }

    impl Guest {
        fn new() -> Self {
            let (tables, model) = tables(paging::Stage2);
            model.set_stage2_root(VMID, tables.root_address().0);
            Self { tables, model }
        }

        /// Writes descriptors for `[ipa, ipa + size)`: no barrier.
        fn write(&mut self, ipa: u64, size: usize, pa: usize, flags: Stage2Attributes) {
            let start = ipa as usize;
            self.tables
                .map_range(
                    &MemoryRegion::new(start, start + size),
                    PhysicalAddress(pa),
                    flags,
                    Constraints::NO_CONTIGUOUS_HINT,
                )
                .expect("map_range");
        }

        fn unmap(&mut self, ipa: u64, size: usize) {
            self.write(ipa, size, 0, Stage2Attributes::empty());
        }

        /// Mapped with the correct new-entry sequence, and touched by the
        /// guest (TLB filled).
        fn mapped_and_touched(ipa: u64, size: usize, pa: usize) -> Self {
            let mut g = Self::new();
            g.write(ipa, size, pa, ram());
            g.model.dsb_ishst();
            g.model.isb();
            let pages = g.model.touch_guest(VMID, ipa..ipa + size as u64);
            assert_eq!(pages, (size / PAGE_SIZE) as u64);
            assert!(g.model.stale_entries().is_empty());
            g
        }

        fn access(&self, ipa: u64) -> Result<usize, Fault> {
            self.model.guest_access(VMID, ipa, false)
        }
    }

    /// The KVM/Hafnium sequence after a descriptor write.
    fn flush_ipa(m: &Model, ipa: u64) {
        m.dsb_ishst();
        m.tlbi_ipas2e1is(VMID, ipa, None);
        m.dsb_ish();
        m.tlbi_vmalle1is(VMID);
        m.dsb_ish();
        m.isb();
    }

    fn regimes(stale: &[StaleEntry]) -> Vec<Regime> {
        stale.iter().map(|s| s.entry.regime).collect()
    }

    #[test]
    fn walker_decodes_aarch64_paging_descriptors() {
        let mut g = Guest::new();
        g.write(0, BLOCK_1G, PA, ram());
        g.write(IPA, MIB2, PA2, read_only());
        g.write(IPA + MIB2 as u64, PAGE_SIZE, PA + 0x5000, ram());
        let no_af = ram() - Stage2Attributes::ACCESS_FLAG;
        g.write(IPA + 2 * MIB2 as u64, PAGE_SIZE, PA, no_af);
        let m = &g.model;
        let walk = |a| m.walk_live(Regime::Stage2(VMID), a).expect("mapped");
        let l1 = walk(0x1234_5678);
        assert_eq!((l1.base, l1.size, l1.out, l1.level), (0, 1 << 30, PA, 1));
        let rw_x = Perm {
            read: true,
            write: true,
            exec: true,
        };
        assert_eq!(l1.perm, rw_x);
        let l2 = walk(IPA + 0x1234);
        assert_eq!((l2.base, l2.size, l2.out, l2.level), (IPA, 2 << 20, PA2, 2));
        assert!(l2.perm.read && !l2.perm.write);
        let l3 = walk(IPA + MIB2 as u64 + 8);
        assert_eq!((l3.size, l3.out, l3.level), (4096, PA + 0x5000, 3));

        m.dsb_ishst();
        assert_eq!(
            m.guest_access(VMID, IPA + 0x10, true),
            Err(Fault::Permission {
                regime: Regime::Combined(VMID),
                addr: IPA + 0x10,
                write: true,
                leaf: l2,
                source: Source::Walk,
            })
        );
        assert_eq!(m.guest_access(VMID, IPA + 0x10, false), Ok(PA2 + 0x10));
        assert!(matches!(
            m.guest_access(VMID, IPA + 2 * MIB2 as u64, false),
            Err(Fault::AccessFlag { level: 3, .. })
        ));
        assert!(matches!(
            m.guest_access(VMID, 1 << 31, false),
            Err(Fault::Translation { level: 1, .. })
        ));
        assert!(matches!(
            m.guest_access(VMID, 1 << 40, false),
            Err(Fault::OutOfRange { .. })
        ));
        assert!(matches!(
            m.guest_access(Vmid(99), 0, false),
            Err(Fault::NoRoot { .. })
        ));
    }

    /// 1. A new valid entry is invisible to the guest until `DSB ISHST`.
    #[test]
    fn new_mapping_is_invisible_until_dsb_ishst() {
        let mut g = Guest::new();
        g.write(IPA, PAGE_SIZE, PA, ram());
        assert!(matches!(g.access(IPA), Err(Fault::Translation { .. })));
        assert!(!g.model.is_quiescent(), "the write is still buffered");
        g.model.dsb_ishst();
        assert_eq!(g.access(IPA + 0x18), Ok(PA + 0x18));
        g.model.isb();
        assert!(g.model.is_quiescent());
        assert!(g.model.stale_entries().is_empty());
    }

    /// 2. The full KVM/Hafnium sequence: the guest faults, nothing stale.
    #[test]
    fn full_unmap_sequence_faults_and_leaves_nothing_stale() {
        let mut g = Guest::mapped_and_touched(IPA, PAGE_SIZE, PA);
        assert_eq!(g.model.tlb_entries().len(), 2, "stage-2 and combined");
        g.model.reset_stats();
        g.unmap(IPA, PAGE_SIZE);
        flush_ipa(&g.model, IPA);
        assert!(matches!(
            g.access(IPA),
            Err(Fault::Translation { level: 3, .. })
        ));
        assert!(g.model.stale_entries().is_empty());
        assert!(g.model.is_quiescent());
        assert!(!g.model.isb_outstanding());
        let s = g.model.stats();
        assert_eq!(
            (
                s.dsb_ishst,
                s.dsb_ish,
                s.isb,
                s.tlbi_ipas2e1is,
                s.tlbi_vmalle1is
            ),
            (1, 2, 1, 1, 1)
        );
        assert_eq!(s.refills, 0);
    }

    /// 3. Without `TLBI VMALLE1IS` the combined entry survives.
    #[test]
    fn without_vmalle1is_the_combined_entry_survives() {
        let mut g = Guest::mapped_and_touched(IPA, PAGE_SIZE, PA);
        g.unmap(IPA, PAGE_SIZE);
        g.model.dsb_ishst();
        g.model.tlbi_ipas2e1is(VMID, IPA, None);
        g.model.dsb_ish();
        g.model.isb();
        let a = g
            .model
            .guest_access_detail(VMID, IPA + 4, false)
            .expect("stale");
        assert_eq!((a.pa, a.source), (PA + 4, Source::CombinedTlb));
        let stale = g.model.stale_entries();
        assert_eq!(regimes(&stale), [Regime::Combined(VMID)]);
        assert_eq!(stale[0].reason, StaleReason::Unmapped);
        assert!(
            g.model.is_quiescent(),
            "stores and TLBIs are done; the TLB is wrong"
        );
    }

    /// 4. TLBI before the `DSB ISHST`: the walker refetched the old entry.
    #[test]
    fn tlbi_before_the_store_is_visible_is_refilled_stale() {
        let mut g = Guest::mapped_and_touched(IPA, PAGE_SIZE, PA);
        g.unmap(IPA, PAGE_SIZE);
        g.model.tlbi_ipas2e1is(VMID, IPA, None);
        g.model.dsb_ish();
        g.model.tlbi_vmalle1is(VMID);
        g.model.dsb_ish();
        g.model.isb();
        assert_eq!(g.access(IPA), Ok(PA));
        let stale = g.model.stale_entries();
        assert_eq!(
            regimes(&stale),
            [Regime::Stage2(VMID), Regime::Combined(VMID)]
        );
        assert!(g.model.stats().refills >= 2);
    }

    /// 5. No TLBI at all: both entries stay.
    #[test]
    fn without_any_tlbi_everything_stays_stale() {
        let mut g = Guest::mapped_and_touched(IPA, PAGE_SIZE, PA);
        g.unmap(IPA, PAGE_SIZE);
        g.model.dsb_ishst();
        g.model.dsb_ish();
        g.model.isb();
        assert_eq!(g.access(IPA), Ok(PA));
        assert_eq!(g.model.stale_entries().len(), 2);
    }

    /// 6. EL2: a new entry needs the ISB, a removed one the TLBI (and ISB).
    #[test]
    fn el2_new_entries_need_isb_and_removed_ones_need_tlbi() {
        const VA: usize = 0x4000_0000;
        let attrs = El23Attributes::VALID
            | El23Attributes::ACCESSED
            | El23Attributes::ATTRIBUTE_INDEX_0
            | El23Attributes::INNER_SHAREABLE;
        let region = MemoryRegion::new(VA, VA + PAGE_SIZE);
        let (mut map, m) = tables(paging::El2);
        m.set_el2_root(map.root_address().0);
        let c = Constraints::NO_CONTIGUOUS_HINT;

        map.map_range(&region, PhysicalAddress(VA), attrs, c)
            .expect("map");
        m.dsb_ishst();
        assert!(matches!(
            m.el2_access(VA, true),
            Err(Fault::Translation { .. })
        ));
        assert!(!m.el2_access_ok(VA, false), "no ISB yet: early walk");
        assert!(m.isb_outstanding());
        m.isb();
        assert_eq!(m.el2_access(VA + 8, true), Ok(VA + 8));
        assert!(m.el2_access_ok(VA, false));

        // Unmap, correctly.
        map.map_range(&region, PhysicalAddress(0), El23Attributes::empty(), c)
            .expect("unmap");
        m.dsb_ishst();
        m.tlbi_vae2is(VA as u64);
        m.dsb_ish();
        // Until the ISB, this PE's later instructions may still use the old
        // translation (their walk happened before the DSB).
        assert!(m.el2_access_ok(VA, false));
        m.isb();
        assert!(matches!(
            m.el2_access(VA, false),
            Err(Fault::Translation { level: 3, .. })
        ));
        assert!(m.stale_entries().is_empty());

        // Map again, touch, unmap without the TLBI: the entry stays.
        map.map_range(&region, PhysicalAddress(VA), attrs, c)
            .expect("map");
        m.dsb_ishst();
        m.isb();
        assert!(m.el2_access_ok(VA, true));
        map.map_range(&region, PhysicalAddress(0), El23Attributes::empty(), c)
            .expect("unmap");
        m.dsb_ishst();
        m.dsb_ish();
        m.isb();
        let a = m.el2_access_detail(VA, true).expect("stale");
        assert_eq!(a.source, Source::El2Tlb);
        assert_eq!(regimes(&m.stale_entries()), [Regime::El2]);
    }

    /// 7. A TLBI by IPA of any page in a cached block drops the block.
    #[test]
    fn one_page_tlbi_drops_the_whole_block() {
        let mut g = Guest::mapped_and_touched(IPA, MIB2, PA);
        let entries = g.model.tlb_entries();
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|e| e.leaf.size == MIB2 as u64));
        g.unmap(IPA, MIB2);
        flush_ipa(&g.model, IPA + 0x5_5000);
        for ipa in [IPA, IPA + 0x5_5000, IPA + MIB2 as u64 - 8] {
            assert!(matches!(
                g.access(ipa),
                Err(Fault::Translation { level: 2, .. })
            ));
        }
        assert!(g.model.stale_entries().is_empty());
        assert!(g.model.tlb_entries().is_empty());
    }

    #[test]
    fn write_protect_without_vmalle1is_lets_stores_through() {
        let mut g = Guest::mapped_and_touched(IPA, PAGE_SIZE, PA);
        g.write(IPA, PAGE_SIZE, PA, read_only());
        g.model.dsb_ishst();
        g.model.tlbi_ipas2e1is(VMID, IPA, None);
        g.model.dsb_ish();
        g.model.isb();
        assert_eq!(g.model.guest_access(VMID, IPA, true), Ok(PA));
        let stale = g.model.stale_entries();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].reason, StaleReason::Permissions);

        // The full sequence fixes it; the stage-2 entry refilled meanwhile
        // is the new, read-only one.
        flush_ipa(&g.model, IPA);
        assert!(matches!(
            g.model.guest_access(VMID, IPA, true),
            Err(Fault::Permission { .. })
        ));
        assert_eq!(g.access(IPA), Ok(PA));
        assert!(g.model.stale_entries().is_empty());
    }

    #[test]
    fn vmalle1is_before_the_stage2_tlbi_is_refilled_from_the_stage2_entry() {
        let mut g = Guest::mapped_and_touched(IPA, PAGE_SIZE, PA);
        g.unmap(IPA, PAGE_SIZE);
        g.model.dsb_ishst();
        g.model.tlbi_vmalle1is(VMID);
        g.model.dsb_ish();
        g.model.tlbi_ipas2e1is(VMID, IPA, None);
        g.model.dsb_ish();
        g.model.isb();
        assert_eq!(g.access(IPA), Ok(PA));
        assert_eq!(regimes(&g.model.stale_entries()), [Regime::Combined(VMID)]);
    }

    #[test]
    fn a_tlbi_without_dsb_ish_stays_pending() {
        let mut g = Guest::mapped_and_touched(IPA, PAGE_SIZE, PA);
        g.unmap(IPA, PAGE_SIZE);
        g.model.dsb_ishst();
        g.model.tlbi_ipas2e1is(VMID, IPA, None);
        g.model.tlbi_vmalle1is(VMID);
        g.model.dsb_ishst();
        g.model.isb();
        assert_eq!(g.model.pending_tlbis(), 2);
        assert!(!g.model.is_quiescent());
        assert_eq!(g.access(IPA), Ok(PA));
        g.model.dsb_ish();
        assert!(g.access(IPA).is_err());
        assert!(g.model.is_quiescent());
    }

    #[test]
    fn range_and_vmid_tlbis() {
        let size = 8 * PAGE_SIZE;
        let mut g = Guest::mapped_and_touched(IPA, size, PA);
        assert_eq!(g.model.tlb_entries().len(), 16);
        // Unmap pages 2..6; invalidate exactly them by range.
        g.unmap(IPA + 2 * PAGE, 4 * PAGE_SIZE);
        g.model.dsb_ishst();
        g.model.tlbi_ripas2e1is(VMID, IPA + 2 * PAGE, 4, None);
        g.model.dsb_ish();
        g.model.tlbi_vmalle1is(VMID);
        g.model.dsb_ish();
        g.model.isb();
        assert!(g.model.stale_entries().is_empty());
        assert_eq!(g.access(IPA + PAGE), Ok(PA + PAGE_SIZE));
        assert!(g.access(IPA + 5 * PAGE).is_err());
        assert_eq!(g.model.stats().tlbi_pages, 4);

        // Remap the rest elsewhere (after BBM) in one go with VMALLS12E1IS.
        g.unmap(IPA, size);
        g.model.dsb_ishst();
        g.model.tlbi_vmalls12e1is(VMID);
        g.model.dsb_ish();
        g.write(IPA, size, PA2, ram());
        g.model.dsb_ishst();
        g.model.isb();
        assert_eq!(g.access(IPA + 7 * PAGE + 1), Ok(PA2 + 7 * PAGE_SIZE + 1));
        assert!(g.model.stale_entries().is_empty());
    }

    #[test]
    fn the_model_can_be_shared_like_the_mm_core_shares_its_arch() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Model>();
    }

    #[test]
    fn stats_cross_check_against_mm_counters() {
        let g = Guest::new();
        let c = MmCounters::new();
        flush_ipa(&g.model, IPA);
        for counter in [
            &c.dsb_ishst,
            &c.dsb_ish,
            &c.isb,
            &c.tlbi_ipas2e1is,
            &c.tlbi_vmalle1is,
        ] {
            crate::mm::counters::inc(counter);
        }
        assert_eq!(
            g.model.stats().mismatches(&c),
            [("dsb_ish", 2, 1), ("tlbi_pages", 1, 0)]
        );
    }
}
