//! Coherency of guest memory between the guest's view and the hypervisor's.
//!
//! A guest may run with its MMU or data caches off (the test guest does;
//! every guest does early in boot), so its accesses are Non-cacheable,
//! while the hypervisor reaches the same pages through its cacheable EL2
//! map (copies in and out for hypercalls, the image it loads). Two aliases
//! with different cacheability are not coherent (Arm ARM, "mismatched
//! memory attributes"):
//!
//! - a line the hypervisor wrote may sit dirty in the cache while the guest
//!   reads the old bytes from memory, and its eviction later may overwrite
//!   what the guest wrote since;
//! - a line the hypervisor read (or the CPU fetched speculatively through
//!   the cacheable alias) may be stale when the hypervisor reads it again
//!   after the guest wrote memory directly.
//!
//! Two ways out, as KVM has:
//!
//! - [`Coherency::ForcedWriteBack`] (FEAT_S2FWB, `HCR_EL2.FWB` with the
//!   stage-2 MemAttr "forced write-back", `MemType::NormalForcedWriteBack`):
//!   whatever the guest's stage 1 says, its RAM accesses are Normal
//!   write-back cacheable, like the hypervisor's, and hardware keeps them
//!   coherent. No data cache maintenance is needed.
//! - [`Coherency::Maintenance`] (no FEAT_S2FWB, or `mm.fwb=off`): explicit
//!   maintenance by address to the point of coherency around each
//!   hypervisor access and before memory is first given to the guest.
//!
//! Either way the instruction cache is not coherent with data writes on
//! every CPU (without `CTR_EL0.DIC`), so it is invalidated when the
//! hypervisor loads code for the guest and when an alias re-points what an
//! address executes.
//!
//! Every operation here is bounded by the bytes it is asked about (one
//! `DC` per cache line), and the caller passes ranges bounded by what a
//! call changes.

use crate::mm::PhysAddr;

/// The cache maintenance instructions the policy needs, as the hardware
/// (`arch::aarch64::cache`) or a host model implements them.
pub trait CacheOps {
    /// `DC CIVAC` for every line of `[pa, pa + len)`, then `DSB ISH`: the
    /// data reaches the point of coherency (where a Non-cacheable observer
    /// reads it) and no line of the range stays in any data cache.
    fn clean_invalidate_to_poc(&self, pa: PhysAddr, len: usize);
    /// `IC IALLUIS; DSB ISH; ISB`: no stale instruction in any instruction
    /// cache of the inner shareable domain (after the data reached the
    /// point of unification, which the clean above or FWB's coherence
    /// gives).
    fn invalidate_icache(&self);
}

/// How guest memory is kept coherent (see the module docs).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Coherency {
    /// FEAT_S2FWB: stage 2 forces write-back; no data cache maintenance.
    ForcedWriteBack,
    /// Explicit maintenance by address.
    #[default]
    Maintenance,
}

impl Coherency {
    /// The policy for a CPU that has FEAT_S2FWB (`has_fwb`) when the user
    /// allows it (`allow_fwb`, the `mm.fwb` bootarg).
    #[must_use]
    pub const fn choose(has_fwb: bool, allow_fwb: bool) -> Self {
        if has_fwb && allow_fwb {
            Self::ForcedWriteBack
        } else {
            Self::Maintenance
        }
    }

    /// Name for logs and docs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::ForcedWriteBack => "fwb",
            Self::Maintenance => "maintenance",
        }
    }

    /// Before the hypervisor reads `[pa, pa + len)` of guest memory
    /// (a hypercall's argument list, say): with maintenance, clean and
    /// invalidate, so the read misses and fetches what a Non-cacheable
    /// guest wrote. `DC CIVAC`, not `DC IVAC`: a line the hypervisor itself
    /// dirtied (it should have none here) must not be thrown away.
    pub fn before_hyp_read(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {
        if self == Self::Maintenance && len > 0 {
            ops.clean_invalidate_to_poc(pa, len);
        }
    }

    /// Before the hypervisor writes `[pa, pa + len)` of guest memory: with
    /// maintenance, clean and invalidate, so no stale line (left by an
    /// earlier read, or fetched speculatively through the cacheable alias)
    /// is dirtied by the write and later written back whole over bytes of
    /// the same line the guest wrote meanwhile.
    pub fn before_hyp_write(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {
        self.before_hyp_read(ops, pa, len);
    }

    /// After the hypervisor wrote `[pa, pa + len)` of guest data (a
    /// hypercall's result): with maintenance, clean and invalidate to the
    /// point of coherency, so a Non-cacheable guest reads the new bytes and
    /// no dirty line is evicted over its later writes.
    pub fn after_hyp_write(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {
        if self == Self::Maintenance && len > 0 {
            ops.clean_invalidate_to_poc(pa, len);
        }
    }

    /// After the hypervisor wrote code the guest will execute (the image it
    /// loads): as [`after_hyp_write`](Self::after_hyp_write), and in both
    /// modes the instruction cache is invalidated.
    pub fn after_code_load(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {
        if len == 0 {
            return;
        }
        self.after_hyp_write(ops, pa, len);
        ops.invalidate_icache();
    }

    /// Before memory `[pa, pa + len)` is mapped for the guest (each run a
    /// demand fault or `POPULATE` installs, and only those): with
    /// maintenance, clean and invalidate to the point of coherency, so no
    /// dirty or stale line of the hypervisor's alias (or of the guest's own
    /// cacheable use before it gave the page back) survives into its use.
    /// No instruction cache maintenance: the backing of an address never
    /// changes, the hypervisor wrote no code there, and the guest maintains
    /// its instruction cache for code it writes itself.
    pub fn before_guest_map(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {
        self.after_hyp_write(ops, pa, len);
    }

    /// When the executable content behind guest addresses changes without
    /// the hypervisor writing it (an alias re-pointed): the instruction
    /// cache only (the data is the guest's, already in its view).
    pub fn after_exec_remap(self, ops: &dyn CacheOps) {
        ops.invalidate_icache();
    }
}

#[cfg(test)]
mod tests {
    //! A model of the two aliases: memory, one write-back data cache in
    //! front of it for cacheable accesses, and Non-cacheable accesses that
    //! go to memory directly. A missing clean or invalidate shows as the
    //! guest or the hypervisor reading the wrong bytes.

    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec;
    use alloc::vec::Vec;
    use core::cell::{Cell, RefCell};

    const LINE: usize = 64;

    struct Line {
        data: [u8; LINE],
        dirty: bool,
    }

    /// Memory and a data cache. Addresses are offsets into `memory`.
    struct Machine {
        memory: RefCell<Vec<u8>>,
        cache: RefCell<BTreeMap<usize, Line>>,
        /// `DC CIVAC` lines issued.
        lines_maintained: Cell<usize>,
        /// `IC IALLUIS` issued.
        icache_invalidations: Cell<usize>,
        /// How the guest's accesses are made (FWB: cacheable too).
        guest_cacheable: bool,
    }

    impl Machine {
        fn new(size: usize, policy: Coherency) -> Self {
            Self {
                memory: RefCell::new(vec![0; size]),
                cache: RefCell::new(BTreeMap::new()),
                lines_maintained: Cell::new(0),
                icache_invalidations: Cell::new(0),
                guest_cacheable: policy == Coherency::ForcedWriteBack,
            }
        }

        fn fill(&self, line: usize) {
            let mut cache = self.cache.borrow_mut();
            cache.entry(line).or_insert_with(|| {
                let mut data = [0; LINE];
                data.copy_from_slice(&self.memory.borrow()[line..line + LINE]);
                Line { data, dirty: false }
            });
        }

        fn cached_read(&self, addr: usize) -> u8 {
            let line = addr & !(LINE - 1);
            self.fill(line);
            self.cache.borrow()[&line].data[addr - line]
        }

        fn cached_write(&self, addr: usize, v: u8) {
            let line = addr & !(LINE - 1);
            self.fill(line);
            let mut cache = self.cache.borrow_mut();
            let l = cache.get_mut(&line).expect("filled");
            l.data[addr - line] = v;
            l.dirty = true;
        }

        /// The hypervisor's (cacheable) accesses.
        fn hyp_read(&self, addr: usize) -> u8 {
            self.cached_read(addr)
        }
        fn hyp_write(&self, addr: usize, v: u8) {
            self.cached_write(addr, v);
        }

        /// The guest's accesses: Non-cacheable unless FWB forces them.
        fn guest_read(&self, addr: usize) -> u8 {
            if self.guest_cacheable {
                self.cached_read(addr)
            } else {
                self.memory.borrow()[addr]
            }
        }
        fn guest_write(&self, addr: usize, v: u8) {
            if self.guest_cacheable {
                self.cached_write(addr, v);
            } else {
                self.memory.borrow_mut()[addr] = v;
            }
        }

        /// The cache evicts everything, writing dirty lines back (which it
        /// may do at any time).
        fn evict_all(&self) {
            let mut cache = self.cache.borrow_mut();
            let mut memory = self.memory.borrow_mut();
            for (line, l) in core::mem::take(&mut *cache) {
                if l.dirty {
                    memory[line..line + LINE].copy_from_slice(&l.data);
                }
            }
        }
    }

    impl CacheOps for Machine {
        fn clean_invalidate_to_poc(&self, pa: PhysAddr, len: usize) {
            let mut cache = self.cache.borrow_mut();
            let mut memory = self.memory.borrow_mut();
            let mut line = pa.0 & !(LINE - 1);
            while line < pa.0 + len {
                if let Some(l) = cache.remove(&line)
                    && l.dirty
                {
                    memory[line..line + LINE].copy_from_slice(&l.data);
                }
                self.lines_maintained.set(self.lines_maintained.get() + 1);
                line += LINE;
            }
        }

        fn invalidate_icache(&self) {
            self.icache_invalidations
                .set(self.icache_invalidations.get() + 1);
        }
    }

    const BOTH: [Coherency; 2] = [Coherency::Maintenance, Coherency::ForcedWriteBack];

    /// A stale line the hypervisor read earlier is not written back over
    /// a byte the guest wrote since, in the same line, when the hypervisor
    /// writes another byte of it (the clean before the write).
    #[test]
    fn a_write_into_a_stale_line_does_not_undo_the_guests_writes() {
        for policy in BOTH {
            let m = Machine::new(4096, policy);
            policy.before_hyp_read(&m, PhysAddr(128), 8);
            let _ = m.hyp_read(128);
            m.guest_write(160, 0x77);
            policy.before_hyp_write(&m, PhysAddr(128), 1);
            m.hyp_write(128, 0x40);
            policy.after_hyp_write(&m, PhysAddr(128), 1);
            m.evict_all();
            assert_eq!(m.guest_read(160), 0x77, "{policy:?}");
            assert_eq!(m.guest_read(128), 0x40, "{policy:?}");
        }
        // Without the clean before the write, the guest's byte is lost.
        let m = Machine::new(4096, Coherency::Maintenance);
        let _ = m.hyp_read(128);
        m.guest_write(160, 0x77);
        m.hyp_write(128, 0x40);
        Coherency::Maintenance.after_hyp_write(&m, PhysAddr(128), 1);
        assert_eq!(m.guest_read(160), 0, "the stale line was written back");
    }

    /// A hypercall result written by the hypervisor is what the guest reads.
    #[test]
    fn the_guest_reads_what_the_hypervisor_wrote() {
        for policy in BOTH {
            let m = Machine::new(4096, policy);
            // The guest touched the buffer first (its old contents).
            m.guest_write(128, 1);
            policy.before_hyp_write(&m, PhysAddr(128), 8);
            for (i, a) in (128..136).enumerate() {
                m.hyp_write(a, 0x40 + i as u8);
            }
            policy.after_hyp_write(&m, PhysAddr(128), 8);
            assert_eq!(m.guest_read(128), 0x40, "{policy:?}");
            assert_eq!(m.guest_read(135), 0x47, "{policy:?}");
        }
    }

    /// Without the clean, the Non-cacheable guest reads stale bytes: the
    /// model sees a missing clean to the point of coherency.
    #[test]
    fn a_missing_clean_is_seen() {
        let m = Machine::new(4096, Coherency::Maintenance);
        m.hyp_write(128, 0x40);
        assert_eq!(m.guest_read(128), 0, "stale: nothing cleaned");
    }

    /// An argument list the guest wrote after the hypervisor had read that
    /// memory once is read fresh.
    #[test]
    fn the_hypervisor_reads_what_the_guest_wrote() {
        for policy in BOTH {
            let m = Machine::new(4096, policy);
            m.guest_write(256, 1);
            policy.before_hyp_read(&m, PhysAddr(256), 1);
            assert_eq!(m.hyp_read(256), 1, "{policy:?}");
            // The guest changes it; the hypervisor's line is now stale.
            m.guest_write(256, 2);
            policy.before_hyp_read(&m, PhysAddr(256), 1);
            assert_eq!(m.hyp_read(256), 2, "{policy:?}");
        }
        // Without the invalidate, the stale line is read.
        let m = Machine::new(4096, Coherency::Maintenance);
        assert_eq!(m.hyp_read(256), 0);
        m.guest_write(256, 2);
        assert_eq!(m.hyp_read(256), 0, "a missing invalidate is seen");
    }

    /// Memory the hypervisor dirtied (loading, zeroing) and then gives to
    /// the guest: after `before_guest_map` no eviction can overwrite what
    /// the guest writes.
    #[test]
    fn a_late_eviction_cannot_overwrite_the_guests_writes() {
        for policy in BOTH {
            let m = Machine::new(8192, policy);
            for a in 4096..8192 {
                m.hyp_write(a, 0xee);
            }
            policy.before_guest_map(&m, PhysAddr(4096), 4096);
            m.guest_write(4100, 7);
            m.evict_all();
            assert_eq!(m.guest_read(4100), 7, "{policy:?}");
            assert_eq!(m.guest_read(4101), 0xee, "{policy:?}");
        }
        // Without the clean, the eviction wins.
        let m = Machine::new(8192, Coherency::Maintenance);
        m.hyp_write(4100, 0xee);
        m.guest_write(4100, 7);
        m.evict_all();
        assert_eq!(m.guest_read(4100), 0xee, "the eviction overwrote the guest");
    }

    /// The cost: with FWB no data cache maintenance at all; with maintenance
    /// one line per 64 bytes asked about; the instruction cache only for
    /// loaded code and re-pointed aliases, in both modes.
    #[test]
    fn maintenance_is_counted_and_bounded_by_the_range() {
        let m = Machine::new(1 << 16, Coherency::ForcedWriteBack);
        let fwb = Coherency::ForcedWriteBack;
        fwb.before_hyp_read(&m, PhysAddr(0), 4096);
        fwb.before_hyp_write(&m, PhysAddr(0), 4096);
        fwb.after_hyp_write(&m, PhysAddr(0), 4096);
        fwb.before_guest_map(&m, PhysAddr(0), 1 << 16);
        assert_eq!(m.lines_maintained.get(), 0);
        assert_eq!(m.icache_invalidations.get(), 0);
        fwb.after_code_load(&m, PhysAddr(0), 4096);
        fwb.after_exec_remap(&m);
        assert_eq!(
            (m.lines_maintained.get(), m.icache_invalidations.get()),
            (0, 2)
        );
        let m = Machine::new(1 << 16, Coherency::Maintenance);
        let cmo = Coherency::Maintenance;
        cmo.before_hyp_read(&m, PhysAddr(0), 4096);
        assert_eq!(
            (m.lines_maintained.get(), m.icache_invalidations.get()),
            (64, 0)
        );
        cmo.before_guest_map(&m, PhysAddr(0), 1 << 16);
        assert_eq!(m.lines_maintained.get(), 64 + 1024);
        assert_eq!(m.icache_invalidations.get(), 0);
        cmo.after_code_load(&m, PhysAddr(0), 4096);
        assert_eq!(
            (m.lines_maintained.get(), m.icache_invalidations.get()),
            (64 + 1024 + 64, 1)
        );
        cmo.after_code_load(&m, PhysAddr(0), 0);
        assert_eq!(
            m.icache_invalidations.get(),
            1,
            "nothing written, nothing to do"
        );
        assert_eq!(Coherency::choose(true, true), Coherency::ForcedWriteBack);
        assert_eq!(Coherency::choose(true, false), Coherency::Maintenance);
        assert_eq!(Coherency::choose(false, true), Coherency::Maintenance);
    }
}
