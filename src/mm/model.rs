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
//! # Not modelled
//!
//! Walk caches (intermediate table entries), the contiguous hint, partial or
//! reordered visibility of stores before a `DSB` (all of them become visible
//! at once), `DMB`, memory attributes and shareability, hardware
//! access-flag/dirty updates, the guest's own stage 1, and reordering of
//! TLBIs completed by one `DSB` (they complete in issue order).
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
    /// `IPAS2E1IS` / `RIPAS2E1IS`: stage-2-only entries overlapping
    /// `[start, end)`.
    Ipas2 { vmid: Vmid, start: u64, end: u64 },
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

#[derive(Debug)]
struct State {
    regions: Vec<Range<usize>>,
    committed: Arc<Snapshot>,
    isb_view: Arc<Snapshot>,
    s2_roots: BTreeMap<Vmid, usize>,
    el2_root: Option<usize>,
    /// More than one value under a key only after a break-before-make
    /// violation (same range, different output or permissions).
    tlb: BTreeMap<Key, Vec<Cached>>,
    pending: Vec<Pending>,
    stats: ModelStats,
    /// What `has_tlbi_range` answers.
    tlbi_range: bool,
    /// What `cpu_id` answers.
    cpu: usize,
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
            .field("tlb_keys", &st.tlb.len())
            .field("pending_tlbis", &st.pending.len())
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
            isb_view: Arc::new(Snapshot { pages: Vec::new() }),
            regions: sorted,
            s2_roots: BTreeMap::new(),
            el2_root: None,
            tlb: BTreeMap::new(),
            pending: Vec::new(),
            stats: ModelStats::default(),
            tlbi_range: true,
            cpu: 0,
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
        state.isb_view = Arc::clone(&state.committed);
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
        let mut st = self.0.lock();
        st.stats.guest_accesses += 1;
        let combined = Regime::Combined(vmid);
        let stage2 = Regime::Stage2(vmid);
        if let Some(leaf) = st.lookup(combined, ipa)? {
            return check(combined, ipa, write, leaf, Source::CombinedTlb);
        }
        if let Some(leaf) = st.lookup(stage2, ipa)? {
            st.insert(combined, leaf);
            return check(combined, ipa, write, leaf, Source::Stage2Tlb);
        }
        st.stats.guest_walks += 1;
        let committed = Arc::clone(&st.committed);
        let leaf = st.walk(View::Snap(&committed), stage2, ipa)?;
        st.insert(stage2, leaf);
        st.insert(combined, leaf);
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
        st.stats.el2_accesses += 1;
        let addr = va as u64;
        if let Some(leaf) = st.lookup(Regime::El2, addr)? {
            return check(Regime::El2, addr, write, leaf, Source::El2Tlb);
        }
        st.stats.el2_walks += 1;
        let early = Arc::clone(&st.isb_view);
        let committed = Arc::clone(&st.committed);
        let leaf = st.walk(View::Snap(&early), Regime::El2, addr)?;
        if st.walk(View::Snap(&committed), Regime::El2, addr) == Ok(leaf) {
            st.insert(Regime::El2, leaf);
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
        let mut ok = 0;
        let end = range.end.next_multiple_of(PAGE);
        let mut addr = range.start & !(PAGE - 1);
        while addr < end {
            addr = match self.guest_access_detail(vmid, addr, false) {
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
        for (key, values) in &st.tlb {
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
        st.pending.is_empty() && st.changed_pages().is_empty()
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
            .zip(st.isb_view.pages.iter().flatten())
            .any(|(a, b)| !Arc::ptr_eq(a, b) && a[..] != b[..])
    }

    /// TLBIs issued and not yet completed by a `DSB ISH`.
    #[must_use]
    pub fn pending_tlbis(&self) -> usize {
        self.0.lock().pending.len()
    }

    /// Every TLB entry, in (regime, size, base) order.
    #[must_use]
    pub fn tlb_entries(&self) -> Vec<TlbEntry> {
        let st = self.0.lock();
        st.tlb
            .iter()
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

    /// Sets what [`MmArch::cpu_id`] answers (default 0). The model has one
    /// TLB and one store buffer whatever the CPU: it checks the barriers a
    /// CPU issues, not races between CPUs.
    pub fn set_cpu_id(&self, cpu: usize) {
        self.0.lock().cpu = cpu;
    }

    fn issue(&self, op: TlbiOp) {
        let mut st = self.0.lock();
        let view = Arc::clone(&st.committed);
        st.pending.push(Pending { op, view });
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

    /// A DSB's effect on stores: everything written so far becomes visible
    /// to the walkers.
    fn commit(&mut self) {
        let changed = self.changed_pages();
        if changed.is_empty() {
            return;
        }
        let mut snap = (*self.committed).clone();
        for (r, p, page) in changed {
            snap.pages[r][p] = page;
        }
        self.committed = Arc::new(snap);
        self.stats.commits += 1;
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

    /// Walks `regime`'s tables in `view` for `addr`.
    fn walk(&self, view: View<'_>, regime: Regime, addr: u64) -> Result<Leaf, Fault> {
        let root = match regime {
            Regime::Stage2(vmid) | Regime::Combined(vmid) => self.s2_roots.get(&vmid).copied(),
            Regime::El2 => self.el2_root,
        }
        .ok_or(Fault::NoRoot { regime })?;
        // Stage 2: 39-bit IPAs, walks from level 1 (as the hypervisor's
        // VTCR_EL2). EL2: 48-bit VAs from level 0, so host addresses (which
        // stand in for physical ones, identity-mapped) fit.
        let (bits, mut level) = match regime {
            Regime::El2 => (EL2_INPUT_BITS, 0u8),
            Regime::Stage2(_) | Regime::Combined(_) => (INPUT_BITS, 1u8),
        };
        if addr >> bits != 0 {
            return Err(Fault::OutOfRange { regime, addr });
        }
        let mut table = root;
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

    /// Every cached leaf of `regime` covering `addr`.
    fn matches(&self, regime: Regime, addr: u64) -> Vec<Leaf> {
        LEAF_SIZES
            .iter()
            .flat_map(|&size| {
                let key = Key {
                    regime,
                    size,
                    base: addr & !(size - 1),
                };
                self.tlb
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .map(move |c| c.leaf(key))
            })
            .collect()
    }

    /// The entry of `regime` covering `addr`, if any.
    fn lookup(&self, regime: Regime, addr: u64) -> Result<Option<Leaf>, Fault> {
        let found = self.matches(regime, addr);
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

    fn insert(&mut self, regime: Regime, leaf: Leaf) {
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
        let values = self.tlb.entry(key).or_default();
        if !values.contains(&value) {
            values.push(value);
        }
    }

    fn remove_keys(&mut self, keys: Vec<Key>) -> Vec<Leaf> {
        let mut dropped = Vec::new();
        for key in keys {
            for c in self.tlb.remove(&key).unwrap_or_default() {
                dropped.push(c.leaf(key));
            }
        }
        dropped
    }

    /// Drops the entries of `regime` overlapping `[start, end)`.
    fn drop_overlapping(&mut self, regime: Regime, start: u64, end: u64) -> Vec<Leaf> {
        if start >= end {
            return Vec::new();
        }
        let mut keys = Vec::new();
        for size in LEAF_SIZES {
            let lo = Key {
                regime,
                size,
                base: start & !(size - 1),
            };
            let hi = Key {
                regime,
                size,
                base: end,
            };
            keys.extend(self.tlb.range(lo..hi).map(|(k, _)| *k));
        }
        self.remove_keys(keys)
    }

    /// Drops every entry of `regime`.
    fn drop_regime(&mut self, regime: Regime) -> Vec<Leaf> {
        let lo = Key {
            regime,
            size: 0,
            base: 0,
        };
        let hi = Key {
            regime,
            size: u64::MAX,
            base: u64::MAX,
        };
        let keys = self.tlb.range(lo..=hi).map(|(k, _)| *k).collect();
        self.remove_keys(keys)
    }

    /// The adversarial refill: for each dropped leaf, what a walk of `view`
    /// at its base yields, re-inserted as an entry of `regime`.
    fn refill_from_view(&mut self, view: &Snapshot, regime: Regime, dropped: &[Leaf]) {
        for old in dropped {
            if let Ok(leaf) = self.walk(View::Snap(view), regime, old.base) {
                self.insert(regime, leaf);
                self.stats.refills += 1;
            }
        }
    }

    /// A DSB ISH's effect on TLB maintenance: completes every pending TLBI,
    /// in issue order.
    fn complete_tlbis(&mut self) {
        for Pending { op, view } in core::mem::take(&mut self.pending) {
            match op {
                TlbiOp::Ipas2 { vmid, start, end } => {
                    let regime = Regime::Stage2(vmid);
                    let dropped = self.drop_overlapping(regime, start, end);
                    self.refill_from_view(&view, regime, &dropped);
                }
                TlbiOp::Vmalle1 { vmid } => {
                    let dropped = self.drop_regime(Regime::Combined(vmid));
                    for old in &dropped {
                        // The guest re-fetches through a stage-2-only entry
                        // still cached, else through a walk.
                        let from_tlb = self
                            .matches(Regime::Stage2(vmid), old.base)
                            .first()
                            .copied();
                        let leaf = from_tlb.or_else(|| {
                            self.walk(View::Snap(&view), Regime::Combined(vmid), old.base)
                                .ok()
                        });
                        if let Some(leaf) = leaf {
                            self.insert(Regime::Combined(vmid), leaf);
                            self.stats.refills += 1;
                        }
                    }
                }
                TlbiOp::Vmalls12 { vmid } => {
                    for regime in [Regime::Stage2(vmid), Regime::Combined(vmid)] {
                        let dropped = self.drop_regime(regime);
                        self.refill_from_view(&view, regime, &dropped);
                    }
                }
                TlbiOp::Vae2 { va } => {
                    let dropped = self.drop_overlapping(Regime::El2, va, va + PAGE);
                    self.refill_from_view(&view, Regime::El2, &dropped);
                }
                TlbiOp::Alle2 => {
                    let dropped = self.drop_regime(Regime::El2);
                    self.refill_from_view(&view, Regime::El2, &dropped);
                }
            }
        }
    }
}

impl MmArch for Model {
    fn dsb_ishst(&self) {
        let mut st = self.0.lock();
        st.stats.dsb_ishst += 1;
        st.commit();
    }

    fn dsb_ish(&self) {
        let mut st = self.0.lock();
        st.stats.dsb_ish += 1;
        st.complete_tlbis();
        st.commit();
    }

    fn isb(&self) {
        let mut st = self.0.lock();
        st.stats.isb += 1;
        st.isb_view = Arc::clone(&st.committed);
    }

    fn tlbi_ipas2e1is(&self, vmid: Vmid, ipa: u64) {
        {
            let mut st = self.0.lock();
            st.stats.tlbi_ipas2e1is += 1;
            st.stats.tlbi_pages += 1;
        }
        let start = ipa & !(PAGE - 1);
        self.issue(TlbiOp::Ipas2 {
            vmid,
            start,
            end: start.saturating_add(PAGE),
        });
    }

    fn tlbi_ripas2e1is(&self, vmid: Vmid, ipa: u64, pages: u64) {
        {
            let mut st = self.0.lock();
            assert!(
                st.tlbi_range,
                "TLBI RIPAS2E1IS without FEAT_TLBIRANGE (has_tlbi_range() is false)"
            );
            st.stats.tlbi_ripas2e1is += 1;
            st.stats.tlbi_pages += pages;
        }
        let start = ipa & !(PAGE - 1);
        self.issue(TlbiOp::Ipas2 {
            vmid,
            start,
            end: start.saturating_add(pages.saturating_mul(PAGE)),
        });
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
        m.tlbi_ipas2e1is(VMID, ipa);
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
        g.model.tlbi_ipas2e1is(VMID, IPA);
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
        g.model.tlbi_ipas2e1is(VMID, IPA);
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
        g.model.tlbi_ipas2e1is(VMID, IPA);
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
        g.model.tlbi_ipas2e1is(VMID, IPA);
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
        g.model.tlbi_ipas2e1is(VMID, IPA);
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
        g.model.tlbi_ripas2e1is(VMID, IPA + 2 * PAGE, 4);
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
