//! Guest-driven stage-2 changes: the `HYP_MM_BATCH` hypercall's operations,
//! validated against the guest's RAM and run in one lazy section.
//!
//! Every physical address used here is guest RAM backing, derived from an
//! IPA inside guest RAM: nothing a guest asks for can map hypervisor, pool
//! or device memory into it. The operation list itself is read from guest
//! memory through the guest's own stage-2 translation.

use core::ops::Range;

use crate::mm::arch::MmArch;
use crate::mm::lazy::MmCtx;
use crate::mm::stage2::{MemType, S2Attrs, S2Perm, Stage2, Stage2Error};
use crate::mm::{BLOCK_2M, Ipa, PAGE_SIZE, PhysAddr};

/// Most operations one batch may hold.
pub const MAX_BATCH_OPS: usize = 64;

/// Size of one operation in guest memory.
pub const OP_SIZE: usize = 32;

/// Operation kinds.
pub mod kind {
    /// Map the unmapped parts of the range to its own backing.
    pub const POPULATE: u32 = 1;
    /// Unmap the range (give it back).
    pub const UNMAP: u32 = 2;
    /// Set the permissions of the (wholly mapped) range to `perm`.
    pub const PROTECT: u32 = 3;
    /// Point the (wholly mapped) range at the backing of `src_ipa..`: an
    /// alias of other guest RAM (break-before-make).
    pub const REMAP_ALIAS: u32 = 4;
    /// Merge uniform 2 MiB regions of the range back into blocks.
    pub const MERGE: u32 = 5;
}

/// One operation as the guest lays it out (little-endian, 32 bytes):
/// `kind: u32, perm: u32, ipa: u64, size: u64, src_ipa: u64`.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct MmOp {
    /// One of [`kind`].
    pub kind: u32,
    /// For `PROTECT`: bit 0 read, bit 1 write, bit 2 execute.
    pub perm: u32,
    /// First IPA.
    pub ipa: u64,
    /// Size in bytes.
    pub size: u64,
    /// For `REMAP_ALIAS`: first IPA of the guest RAM whose backing to use.
    pub src_ipa: u64,
}

impl MmOp {
    /// Decodes one operation.
    #[must_use]
    pub fn from_bytes(b: &[u8; OP_SIZE]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Self {
            kind: u32_at(0),
            perm: u32_at(4),
            ipa: u64_at(8),
            size: u64_at(16),
            src_ipa: u64_at(24),
        }
    }
}

/// Why a batch (or one of its operations) was refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum BatchError {
    /// Unknown operation kind.
    UnknownKind,
    /// Address or size not page-aligned, zero size, or overflow.
    BadRange,
    /// The range (or source range) is not inside guest RAM.
    OutsideGuestRam,
    /// Permission bits other than R, W, X, or no read permission.
    BadPermission,
    /// The operation list is empty, too long, misaligned or not in mapped
    /// guest RAM.
    BadList,
    /// The operation needs a range that is wholly mapped.
    NotMapped,
    /// No memory for translation tables.
    NoMemory,
}

impl BatchError {
    /// The SMCCC-style return code (see docs/hypercalls.md).
    #[must_use]
    pub const fn code(self) -> i64 {
        match self {
            Self::UnknownKind => -1,
            Self::BadRange | Self::BadPermission | Self::BadList => -2,
            Self::OutsideGuestRam => -3,
            Self::NotMapped => -5,
            Self::NoMemory => -4,
        }
    }
}

/// Guest RAM: an IPA range backed by one contiguous physical range.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct GuestRam {
    /// IPAs of guest RAM.
    pub ipa: Range<Ipa>,
    /// Physical address backing its first byte.
    pub backing: PhysAddr,
    /// The stage-2 memory type it is mapped with: `Normal`, or
    /// `NormalForcedWriteBack` under FEAT_S2FWB (`crate::coherency`).
    pub mem: MemType,
}

impl GuestRam {
    /// RWX guest RAM of this memory type.
    #[must_use]
    pub fn attrs(&self) -> S2Attrs {
        S2Attrs {
            perm: S2Perm::RWX,
            mem: self.mem,
        }
    }

    /// The physical range backing all of guest RAM.
    #[must_use]
    pub fn backing_range(&self) -> Range<PhysAddr> {
        self.backing..self.backing.add(self.size() as usize)
    }

    /// Bytes of guest RAM.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.ipa.end.offset_from(self.ipa.start)
    }

    /// The backing of `ipa` (inside guest RAM): the one place an IPA of
    /// guest RAM becomes a physical address without a stage-2 walk.
    #[must_use]
    pub fn backing_of(&self, ipa: Ipa) -> PhysAddr {
        debug_assert!(self.ipa.start <= ipa && ipa <= self.ipa.end);
        self.backing.add(ipa.offset_from(self.ipa.start) as usize)
    }

    fn check(&self, ipa: Ipa, size: u64) -> Result<(), BatchError> {
        if size == 0 || !ipa.is_aligned(PAGE_SIZE as u64) || !size.is_multiple_of(PAGE_SIZE as u64)
        {
            return Err(BatchError::BadRange);
        }
        let end = ipa.checked_add(size).ok_or(BatchError::BadRange)?;
        if ipa < self.ipa.start || end > self.ipa.end {
            return Err(BatchError::OutsideGuestRam);
        }
        Ok(())
    }
}

/// Checks one operation without running it.
///
/// # Errors
///
/// The first reason the operation is invalid.
pub fn validate(op: &MmOp, ram: &GuestRam) -> Result<(), BatchError> {
    ram.check(Ipa(op.ipa), op.size)?;
    match op.kind {
        kind::POPULATE | kind::UNMAP | kind::MERGE => Ok(()),
        kind::PROTECT => {
            if op.perm & !0b111 != 0 || op.perm & 1 == 0 {
                Err(BatchError::BadPermission)
            } else {
                Ok(())
            }
        }
        kind::REMAP_ALIAS => ram.check(Ipa(op.src_ipa), op.size),
        _ => Err(BatchError::UnknownKind),
    }
}

fn perm_of(bits: u32) -> S2Perm {
    S2Perm {
        read: bits & 1 != 0,
        write: bits & 2 != 0,
        exec: bits & 4 != 0,
    }
}

fn stage2_error(e: Stage2Error) -> BatchError {
    match e {
        Stage2Error::NotMapped => BatchError::NotMapped,
        Stage2Error::OutOfTableMemory(_) => BatchError::NoMemory,
        // Ranges were validated against guest RAM; anything else is a range
        // the stage-2 manager refuses, reported as such.
        _ => BatchError::BadRange,
    }
}

/// Runs one (validated) operation.
fn run_op<A: MmArch>(
    s2: &mut Stage2<'_, A>,
    ram: &GuestRam,
    op: &MmOp,
    on_map: Option<OnMap>,
) -> Result<(), BatchError> {
    let size = op.size as usize;
    let ipa = Ipa(op.ipa);
    let ram_attrs = ram.attrs();
    match op.kind {
        kind::POPULATE => {
            // Map each unmapped run to its own backing, one 2 MiB window at
            // a time (bounded memory whatever the range).
            let end = ipa.add(op.size);
            let mut window = ipa;
            while window < end {
                let window_end = window
                    .align_down(BLOCK_2M as u64)
                    .add(BLOCK_2M as u64)
                    .min(end);
                for h in unmapped_runs(s2, window..window_end) {
                    let len = h.end.offset_from(h.start) as usize;
                    if let Some(hook) = on_map {
                        hook(ram.backing_of(h.start), len);
                    }
                    s2.map(h.start, len, ram.backing_of(h.start), ram_attrs)
                        .map_err(stage2_error)?;
                }
                window = window_end;
            }
            Ok(())
        }
        kind::UNMAP => s2.unmap(ipa, size).map(|_| ()).map_err(stage2_error),
        kind::PROTECT => s2
            .protect(ipa, size, perm_of(op.perm))
            .map(|_| ())
            .map_err(stage2_error),
        kind::REMAP_ALIAS => s2
            .remap(ipa, size, ram.backing_of(Ipa(op.src_ipa)), ram_attrs)
            .map(|_| ())
            .map_err(stage2_error),
        kind::MERGE => s2.merge(ipa, size).map(|_| ()).map_err(stage2_error),
        _ => Err(BatchError::UnknownKind),
    }
}

/// Guest RAM's state: which pages the guest gave back, and how stage-2
/// faults are served.
#[derive(Clone, Debug)]
pub struct GuestMemory {
    /// Where guest RAM is and what backs it.
    pub ram: GuestRam,
    /// Bytes of the aligned window populated around a faulting page
    /// (`PAGE_SIZE`: fault-around off).
    pub fault_around: usize,
    /// One bit per page: given back with `UNMAP` (a fault there is the
    /// guest's error, answered with an external abort, not populated).
    given_back: alloc::vec::Vec<u64>,
    /// Called with the backing of each run of pages just before it is
    /// mapped for the guest (demand faults, `POPULATE`), and only those:
    /// the hypervisor's cache maintenance (`crate::coherency`), bounded by
    /// what is newly mapped.
    on_map: Option<OnMap>,
}

/// The hook [`GuestMemory`] calls before mapping backing `(pa, len)`.
pub type OnMap = fn(PhysAddr, usize);

/// What to do about a stage-2 abort.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum FaultAction {
    /// Memory was mapped (this many pages); the guest retries the access.
    Populated(usize),
    /// Not the guest's to have: inject a synchronous external abort.
    Inject,
}

/// Default fault-around window: 2 MiB (one block).
pub const DEFAULT_FAULT_AROUND: usize = 2 << 20;

impl GuestMemory {
    /// Guest RAM `ram`, nothing given back, fault-around `fault_around`
    /// bytes (rounded to a power of two of at least a page).
    #[must_use]
    pub fn new(ram: GuestRam, fault_around: usize) -> Self {
        let pages = (ram.size() as usize) / PAGE_SIZE;
        let mut m = Self {
            ram,
            fault_around: PAGE_SIZE,
            given_back: alloc::vec![0; pages.div_ceil(64)],
            on_map: None,
        };
        m.set_fault_around(fault_around);
        m
    }

    /// Sets the hook called before each run of backing is mapped.
    pub fn set_on_map(&mut self, hook: OnMap) {
        self.on_map = Some(hook);
    }

    /// Sets the fault-around window (0 or `PAGE_SIZE`: off), rounded up to
    /// a power of two and capped at 1 GiB.
    pub fn set_fault_around(&mut self, bytes: usize) {
        self.fault_around = bytes.clamp(PAGE_SIZE, 1 << 30).next_power_of_two();
    }

    fn page_index(&self, ipa: Ipa) -> usize {
        (ipa.offset_from(self.ram.ipa.start) as usize) / PAGE_SIZE
    }

    /// Forgets that `[ipa, ipa + size)` was given back (benchmarks: the
    /// range is demand-populated again on its next touch).
    ///
    /// # Errors
    ///
    /// The range's problem, as for a batch operation.
    pub fn forget_given_back(&mut self, ipa: Ipa, size: u64) -> Result<(), BatchError> {
        self.ram.check(ipa, size)?;
        self.set_given_back(ipa, size, false);
        Ok(())
    }

    fn is_given_back(&self, ipa: Ipa) -> bool {
        let i = self.page_index(ipa);
        self.given_back[i / 64] & (1 << (i % 64)) != 0
    }

    fn set_given_back(&mut self, ipa: Ipa, size: u64, given_back: bool) {
        for off in (0..size).step_by(PAGE_SIZE) {
            let i = self.page_index(ipa.add(off));
            if given_back {
                self.given_back[i / 64] |= 1 << (i % 64);
            } else {
                self.given_back[i / 64] &= !(1 << (i % 64));
            }
        }
    }

    /// Validates every operation, then runs them all in one lazy section.
    ///
    /// # Errors
    ///
    /// `(index, reason)` of the first invalid operation (then nothing ran),
    /// or of the operation that failed (then the ones before it took effect,
    /// and the section was closed, so the tables are consistent and in
    /// effect).
    pub fn run_batch<A: MmArch>(
        &mut self,
        s2: &mut Stage2<'_, A>,
        mm: &MmCtx<A>,
        ops: &[MmOp],
    ) -> Result<(), (usize, BatchError)> {
        if ops.is_empty() || ops.len() > MAX_BATCH_OPS {
            return Err((0, BatchError::BadList));
        }
        for (i, op) in ops.iter().enumerate() {
            validate(op, &self.ram).map_err(|e| (i, e))?;
        }
        mm.enter();
        let result = ops.iter().enumerate().try_for_each(|(i, op)| {
            run_op(s2, &self.ram, op, self.on_map).map_err(|e| (i, e))?;
            match op.kind {
                kind::UNMAP => self.set_given_back(Ipa(op.ipa), op.size, true),
                kind::POPULATE => self.set_given_back(Ipa(op.ipa), op.size, false),
                _ => {}
            }
            Ok(())
        });
        mm.leave();
        result
    }

    /// The aligned window a fault at `ipa` populates (within guest RAM).
    #[must_use]
    pub fn fault_window(&self, ipa: Ipa) -> Range<Ipa> {
        let fa = self.fault_around as u64;
        let start = ipa.align_down(fa).max(self.ram.ipa.start);
        let end = ipa.align_down(fa).add(fa).min(self.ram.ipa.end);
        start..end
    }

    /// Whether a permission fault at `ipa`, for a write (`write`), an
    /// instruction fetch (`exec`) or a read, is stale: the stage-2 entry
    /// now allows the access. With several vCPUs, another CPU may have
    /// changed the entry (under the VM lock) after this vCPU's access
    /// faulted and before its handler took the lock; the guest retries the
    /// access instead of getting an abort (as KVM's `kvm_handle_guest_abort`
    /// returns to the guest for a fault the tables no longer explain).
    pub fn permission_fault_is_stale<A: MmArch>(
        &self,
        s2: &Stage2<'_, A>,
        ipa: Ipa,
        write: bool,
        exec: bool,
    ) -> bool {
        s2.query(ipa).is_some_and(|t| {
            let p = t.attrs.perm;
            if exec {
                p.exec
            } else if write {
                p.write
            } else {
                p.read
            }
        })
    }

    /// Serves a stage-2 abort at `ipa` with fault status `fsc`: a
    /// translation fault on guest RAM that was never given back is populated
    /// with fault-around (the aligned window around it, unmapped and not
    /// given-back pages only, as blocks where aligned) in one lazy section;
    /// anything else (permission fault, outside guest RAM, given back) is the
    /// guest's error.
    pub fn stage2_fault<A: MmArch>(
        &mut self,
        s2: &mut Stage2<'_, A>,
        mm: &MmCtx<A>,
        ipa: Ipa,
        fsc: u8,
    ) -> FaultAction {
        let translation = (0x04..=0x07).contains(&fsc);
        if !translation || !self.ram.ipa.contains(&ipa) || self.is_given_back(ipa) {
            return FaultAction::Inject;
        }
        let Range { start, end } = self.fault_window(ipa);
        // Runs of pages to map: not mapped (one walk of the window), and
        // not given back (split further at given-back pages).
        let mut runs: alloc::vec::Vec<Range<Ipa>> = alloc::vec::Vec::new();
        for hole in unmapped_runs(s2, start..end) {
            let mut page = hole.start;
            while page < hole.end {
                // 64 pages at once where a whole bitmap word is in the hole
                // and clear (the common case: nothing given back).
                let i = self.page_index(page);
                let word = (64 * PAGE_SIZE) as u64;
                let step = if i.is_multiple_of(64)
                    && hole.end.offset_from(page) >= word
                    && self.given_back[i / 64] == 0
                {
                    word
                } else if self.is_given_back(page) {
                    page = page.add(PAGE_SIZE as u64);
                    continue;
                } else {
                    PAGE_SIZE as u64
                };
                match runs.last_mut() {
                    Some(r) if r.end == page => r.end = r.end.add(step),
                    _ => runs.push(page..page.add(step)),
                }
                page = page.add(step);
            }
        }
        let ram_attrs = self.ram.attrs();
        mm.enter();
        let mut pages = 0;
        for r in &runs {
            let size = r.end.offset_from(r.start) as usize;
            if let Some(hook) = self.on_map {
                hook(self.ram.backing_of(r.start), size);
            }
            if s2
                .map(r.start, size, self.ram.backing_of(r.start), ram_attrs)
                .is_err()
            {
                // Out of table memory: the guest gets an abort rather than a
                // retry loop; what was mapped stays.
                mm.leave();
                return FaultAction::Inject;
            }
            pages += size / PAGE_SIZE;
        }
        mm.leave();
        let c = mm.counters();
        crate::mm::counters::inc(&c.demand_faults);
        crate::mm::counters::add(&c.demand_pages, pages as u64);
        FaultAction::Populated(pages)
    }
}

/// Reads the operation list at `list_ipa` from guest memory, through the
/// guest's stage-2 translation. `read_pa` copies from a physical address
/// (guest RAM backing, mapped in the hypervisor).
///
/// # Errors
///
/// [`BatchError::BadList`] if the list is empty, longer than
/// [`MAX_BATCH_OPS`], not 8-byte aligned, or not wholly in guest RAM that is
/// mapped and readable.
pub fn read_ops<A: MmArch>(
    s2: &Stage2<'_, A>,
    ram: &GuestRam,
    list_ipa: Ipa,
    count: u64,
    mut read_pa: impl FnMut(PhysAddr, &mut [u8]),
    out: &mut [MmOp; MAX_BATCH_OPS],
) -> Result<usize, BatchError> {
    let count = usize::try_from(count).map_err(|_| BatchError::BadList)?;
    if count == 0 || count > MAX_BATCH_OPS || !list_ipa.is_aligned(8) {
        return Err(BatchError::BadList);
    }
    let len = (count * OP_SIZE) as u64;
    let end = list_ipa.checked_add(len).ok_or(BatchError::BadList)?;
    if list_ipa < ram.ipa.start || end > ram.ipa.end {
        return Err(BatchError::BadList);
    }
    for (i, slot) in out.iter_mut().take(count).enumerate() {
        let mut bytes = [0u8; OP_SIZE];
        // An op may straddle a page boundary: translate each byte's page.
        let mut done = 0;
        while done < OP_SIZE {
            let ipa = list_ipa.add((i * OP_SIZE + done) as u64);
            let t = s2.query(ipa).ok_or(BatchError::BadList)?;
            // The translation must lead into guest RAM backing, readable.
            if !t.attrs.perm.read || !ram.backing_range().contains(&t.pa) {
                return Err(BatchError::BadList);
            }
            let in_page = PAGE_SIZE - (ipa.0 as usize % PAGE_SIZE);
            let n = in_page.min(OP_SIZE - done);
            read_pa(t.pa, &mut bytes[done..done + n]);
            done += n;
        }
        *slot = MmOp::from_bytes(&bytes);
    }
    Ok(count)
}

/// The unmapped runs of `range` (in order), from one walk of it.
fn unmapped_runs<A: MmArch>(s2: &Stage2<'_, A>, range: Range<Ipa>) -> alloc::vec::Vec<Range<Ipa>> {
    let mut holes = alloc::vec::Vec::new();
    let mut cursor = range.start;
    s2.for_each_mapping(
        range.start,
        range.end.offset_from(range.start) as usize,
        |r, _| {
            if r.start > cursor {
                holes.push(cursor..r.start);
            }
            cursor = r.end;
        },
    );
    if cursor < range.end {
        holes.push(cursor..range.end);
    }
    holes
}

/// Copies `bytes` into guest memory at `ipa`, through the guest's stage-2
/// translation: every page must be mapped, writable, and backed by guest
/// RAM. `write_pa` copies to a physical address (guest RAM backing).
///
/// # Errors
///
/// [`BatchError::BadRange`] for a misaligned (8 bytes) or overflowing
/// buffer, [`BatchError::OutsideGuestRam`] if it is not inside guest RAM,
/// [`BatchError::NotMapped`] if a page is not mapped writable to guest RAM
/// backing. Nothing is written unless every page checks out.
pub fn copy_to_guest<A: MmArch>(
    s2: &Stage2<'_, A>,
    ram: &GuestRam,
    ipa: Ipa,
    bytes: &[u8],
    mut write_pa: impl FnMut(PhysAddr, &[u8]),
) -> Result<(), BatchError> {
    if !ipa.is_aligned(8) {
        return Err(BatchError::BadRange);
    }
    let end = ipa
        .checked_add(bytes.len() as u64)
        .ok_or(BatchError::BadRange)?;
    if ipa < ram.ipa.start || end > ram.ipa.end {
        return Err(BatchError::OutsideGuestRam);
    }
    let backing = ram.backing_range();
    let translate = |at: Ipa| {
        s2.query(at)
            .filter(|t| t.attrs.perm.write && backing.contains(&t.pa))
            .map(|t| t.pa)
            .ok_or(BatchError::NotMapped)
    };
    // Check every page first, then copy.
    let mut at = ipa.align_down(PAGE_SIZE as u64);
    while at < end {
        translate(at)?;
        at = at.add(PAGE_SIZE as u64);
    }
    let mut done = 0;
    while done < bytes.len() {
        let at = ipa.add(done as u64);
        let n = (PAGE_SIZE - (at.0 as usize % PAGE_SIZE)).min(bytes.len() - done);
        write_pa(translate(at)?, &bytes[done..done + n]);
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::lazy::NestPolicy;
    use crate::mm::stage2::S2Perm;
    use crate::mm::testkit::{Kit, ram};

    const GIB: u64 = 1 << 30;

    /// An operation, briefly.
    pub(super) fn op(kind: u32, perm: u32, ipa: u64, size: u64, src_ipa: u64) -> MmOp {
        MmOp {
            kind,
            perm,
            ipa,
            size,
            src_ipa,
        }
    }

    pub(super) fn kit() -> (Kit, GuestMemory) {
        let mut kit = Kit::new(64, true, NestPolicy::Flatten);
        let ram_ = GuestRam {
            ipa: Ipa(GIB)..Ipa(GIB + (16 << 20)),
            backing: PhysAddr(0x8000_0000),
            mem: MemType::Normal,
        };
        kit.s2
            .map(Ipa(GIB), 16 << 20, PhysAddr(0x8000_0000), ram(S2Perm::RWX))
            .expect("guest RAM");
        kit.ref_map(Ipa(GIB), 16 << 20, PhysAddr(0x8000_0000), S2Perm::RWX);
        (kit, GuestMemory::new(ram_, DEFAULT_FAULT_AROUND))
    }

    #[test]
    fn op_decoding_is_little_endian() {
        let mut b = [0u8; OP_SIZE];
        b[0] = 3;
        b[4] = 1;
        b[8..16].copy_from_slice(&0x4000_1000u64.to_le_bytes());
        b[16..24].copy_from_slice(&0x2000u64.to_le_bytes());
        assert_eq!(
            MmOp::from_bytes(&b),
            MmOp {
                kind: 3,
                perm: 1,
                ipa: 0x4000_1000,
                size: 0x2000,
                src_ipa: 0
            }
        );
    }

    #[test]
    fn every_malformed_op_is_refused_before_anything_runs() {
        let (mut kit, mut ram_) = kit();
        let good = op(kind::UNMAP, 0, GIB, 0x1000, 0);
        let cases = [
            (MmOp { kind: 99, ..good }, BatchError::UnknownKind),
            (
                MmOp {
                    ipa: GIB + 1,
                    ..good
                },
                BatchError::BadRange,
            ),
            (MmOp { size: 0, ..good }, BatchError::BadRange),
            (
                MmOp {
                    size: 0x1001,
                    ..good
                },
                BatchError::BadRange,
            ),
            (
                MmOp {
                    ipa: u64::MAX - 0xfff,
                    ..good
                },
                BatchError::BadRange,
            ),
            (
                MmOp {
                    ipa: GIB - 0x1000,
                    ..good
                },
                BatchError::OutsideGuestRam,
            ),
            (
                MmOp {
                    ipa: GIB + (16 << 20),
                    ..good
                },
                BatchError::OutsideGuestRam,
            ),
            (
                MmOp {
                    kind: kind::PROTECT,
                    perm: 0b1000 | 1,
                    ..good
                },
                BatchError::BadPermission,
            ),
            (
                MmOp {
                    kind: kind::PROTECT,
                    perm: 0b10,
                    ..good
                },
                BatchError::BadPermission,
            ),
            (
                MmOp {
                    kind: kind::REMAP_ALIAS,
                    src_ipa: 0x1000,
                    ..good
                },
                BatchError::OutsideGuestRam,
            ),
        ];
        for (bad, why) in cases {
            // The good op first: it must not run either.
            assert_eq!(
                ram_.run_batch(&mut kit.s2, kit.mm, &[good, bad]),
                Err((1, why)),
                "{bad:?}"
            );
            assert!(kit.s2.query(Ipa(GIB)).is_some(), "nothing ran");
        }
        assert_eq!(
            ram_.run_batch(&mut kit.s2, kit.mm, &[]),
            Err((0, BatchError::BadList))
        );
        let many = [good; MAX_BATCH_OPS + 1];
        assert_eq!(
            ram_.run_batch(&mut kit.s2, kit.mm, &many),
            Err((0, BatchError::BadList))
        );
    }

    #[test]
    fn a_batch_runs_in_one_section_and_its_effects_hold() {
        let (mut kit, mut ram_) = kit();
        let mib = 1u64 << 20;
        let ops = [
            op(kind::UNMAP, 0, GIB, 0x4000, 0),
            op(kind::PROTECT, 1, GIB + 0x4000, 0x4000, 0),
            op(kind::REMAP_ALIAS, 0, GIB + 0x8000, 0x2000, GIB + 4 * mib),
        ];
        kit.touch(&(GIB..GIB + 16 * mib));
        ram_.run_batch(&mut kit.s2, kit.mm, &ops).expect("batch");
        assert_eq!(kit.mm.total("sections"), 1);
        kit.ref_unmap(Ipa(GIB), 0x4000);
        kit.ref_map(Ipa(GIB + 0x4000), 0x4000, PhysAddr(0x8000_4000), S2Perm::RO);
        kit.ref_map(
            Ipa(GIB + 0x8000),
            0x2000,
            PhysAddr(0x8040_0000),
            S2Perm::RWX,
        );
        kit.check(&(GIB..GIB + 16 * mib)).expect("effects");
        // Undo: populate, protect back, alias back, merge.
        let ops = [
            op(kind::POPULATE, 0, GIB, 2 * mib, 0),
            op(kind::PROTECT, 7, GIB + 0x4000, 0x4000, 0),
            op(kind::REMAP_ALIAS, 0, GIB + 0x8000, 0x2000, GIB + 0x8000),
            op(kind::MERGE, 0, GIB, 2 * mib, 0),
        ];
        ram_.run_batch(&mut kit.s2, kit.mm, &ops).expect("batch");
        kit.ref_map(Ipa(GIB), 16 << 20, PhysAddr(0x8000_0000), S2Perm::RWX);
        kit.check(&(GIB..GIB + 16 * mib)).expect("restored");
        assert_eq!(
            kit.s2.query(Ipa(GIB)).map(|t| t.level),
            Some(2),
            "merged back into a block"
        );
    }

    #[test]
    fn copies_out_go_through_stage2_and_need_write_permission() {
        let (mut kit, ram_) = kit();
        let mut writes = alloc::vec::Vec::new();
        let data = [7u8; 24];
        copy_to_guest(&kit.s2, &ram_.ram, Ipa(GIB + 0xff8), &data, |pa, b| {
            writes.push((pa, b.len()));
        })
        .expect("copy");
        assert_eq!(
            writes,
            [(PhysAddr(0x8000_0ff8), 8), (PhysAddr(0x8000_1000), 16)],
            "split at the page boundary"
        );
        assert_eq!(
            copy_to_guest(&kit.s2, &ram_.ram, Ipa(GIB + 4), &data, |_, _| {}),
            Err(BatchError::BadRange)
        );
        assert_eq!(
            copy_to_guest(&kit.s2, &ram_.ram, Ipa(0x1000), &data, |_, _| {}),
            Err(BatchError::OutsideGuestRam)
        );
        kit.s2
            .protect(Ipa(GIB + 0x1000), 0x1000, S2Perm::RO)
            .expect("protect");
        let mut wrote = false;
        let r = copy_to_guest(&kit.s2, &ram_.ram, Ipa(GIB + 0xff8), &data, |_, _| {
            wrote = true;
        });
        assert_eq!(r, Err(BatchError::NotMapped));
        assert!(!wrote, "nothing written when a page is read-only");
    }

    #[test]
    fn the_op_list_is_read_through_stage2_and_must_be_in_guest_ram() {
        let (mut kit, ram_) = kit();
        let mut out = [MmOp::default(); MAX_BATCH_OPS];
        let mut reads = alloc::vec::Vec::new();
        let n = read_ops(
            &kit.s2,
            &ram_.ram,
            Ipa(GIB + 0x10),
            2,
            |pa, buf| {
                reads.push(pa);
                buf.fill(0);
            },
            &mut out,
        );
        assert_eq!(n, Ok(2));
        assert_eq!(
            reads,
            [PhysAddr(0x8000_0010), PhysAddr(0x8000_0030)],
            "read at the backing, via stage 2"
        );
        assert_eq!(
            read_ops(&kit.s2, &ram_.ram, Ipa(GIB + 4), 1, |_, _| {}, &mut out),
            Err(BatchError::BadList)
        );
        assert_eq!(
            read_ops(&kit.s2, &ram_.ram, Ipa(GIB), 0, |_, _| {}, &mut out),
            Err(BatchError::BadList)
        );
        assert_eq!(
            read_ops(&kit.s2, &ram_.ram, Ipa(GIB), 65, |_, _| {}, &mut out),
            Err(BatchError::BadList)
        );
        assert_eq!(
            read_ops(&kit.s2, &ram_.ram, Ipa(0x1000), 1, |_, _| {}, &mut out),
            Err(BatchError::BadList)
        );
        // A list in a page the guest gave back is refused.
        kit.s2.unmap(Ipa(GIB), 0x1000).expect("unmap");
        assert_eq!(
            read_ops(&kit.s2, &ram_.ram, Ipa(GIB), 1, |_, _| {}, &mut out),
            Err(BatchError::BadList)
        );
    }
}

#[cfg(test)]
mod fault_tests {
    use super::tests::op;
    use super::*;
    use crate::mm::lazy::NestPolicy;
    use crate::mm::stage2::S2Perm;
    use crate::mm::testkit::{Kit, VMID};

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn a_permission_fault_the_tables_no_longer_explain_is_stale() {
        let (mut kit, mem) = super::tests::kit();
        let page = GIB + 0x5000;
        // Read-only: a write fault is real, a read fault is not.
        kit.s2
            .protect(Ipa(page), PAGE_SIZE, S2Perm::RO)
            .expect("protect");
        assert!(!mem.permission_fault_is_stale(&kit.s2, Ipa(page), true, false));
        assert!(mem.permission_fault_is_stale(&kit.s2, Ipa(page), false, false));
        assert!(!mem.permission_fault_is_stale(&kit.s2, Ipa(page), false, true));
        // Another CPU made it writable before this fault's handler ran.
        kit.s2
            .protect(Ipa(page), PAGE_SIZE, S2Perm::RWX)
            .expect("protect");
        assert!(mem.permission_fault_is_stale(&kit.s2, Ipa(page), true, false));
        // Unmapped since: not a stale permission fault (the translation
        // fault path decides).
        kit.s2.unmap(Ipa(page), PAGE_SIZE).expect("unmap");
        assert!(!mem.permission_fault_is_stale(&kit.s2, Ipa(page), false, false));
    }

    fn demand_kit(fault_around: usize) -> (Kit, GuestMemory) {
        let kit = Kit::new(128, true, NestPolicy::Flatten);
        let ram = GuestRam {
            ipa: Ipa(GIB)..Ipa(GIB + 64 * MIB),
            backing: PhysAddr(0x8000_0000),
            mem: MemType::Normal,
        };
        (kit, GuestMemory::new(ram, fault_around))
    }

    /// Touches every page of `range` as a guest would: on a stage-2 fault
    /// the hypervisor serves it and the guest retries. Returns the faults.
    fn first_touch(kit: &mut Kit, mem: &mut GuestMemory, range: Range<u64>) -> usize {
        let mut faults = 0;
        for ipa in (range.start..range.end).step_by(PAGE_SIZE) {
            if kit.model.guest_access(VMID, ipa, true).is_err() {
                faults += 1;
                assert!(matches!(
                    mem.stage2_fault(&mut kit.s2, kit.mm, Ipa(ipa), 0x07),
                    FaultAction::Populated(_)
                ));
                kit.model
                    .guest_access(VMID, ipa, true)
                    .expect("retry succeeds");
            }
        }
        faults
    }

    #[test]
    fn fault_around_populates_blocks_and_off_populates_pages() {
        let (mut kit, mut mem) = demand_kit(DEFAULT_FAULT_AROUND);
        assert_eq!(
            first_touch(&mut kit, &mut mem, GIB..GIB + 8 * MIB),
            4,
            "one fault per 2 MiB"
        );
        assert_eq!(
            kit.s2.query(Ipa(GIB)).map(|t| t.level),
            Some(2),
            "populated as blocks"
        );
        mem.set_fault_around(0);
        assert_eq!(
            first_touch(&mut kit, &mut mem, GIB + 8 * MIB..GIB + 9 * MIB),
            256
        );
        kit.ref_map(
            Ipa(GIB),
            9 * MIB as usize,
            PhysAddr(0x8000_0000),
            S2Perm::RWX,
        );
        kit.check(&(GIB..GIB + 10 * MIB))
            .expect("state after demand faults");
        assert_eq!(kit.mm.total("demand_faults"), 260);
    }

    /// Fault-around maps exactly the unmapped pages of its window that were
    /// not given back, whether the given-back bitmap is checked a word (64
    /// pages) at a time or page by page.
    #[test]
    fn fault_around_skips_exactly_the_given_back_pages() {
        let (mut kit, mut mem) = demand_kit(DEFAULT_FAULT_AROUND);
        let page = |i: u64| GIB + i * PAGE_SIZE as u64;
        mem.stage2_fault(&mut kit.s2, kit.mm, Ipa(GIB), 0x07);
        // Give back pages 0..130, 300..400 and 511; forget 0..64 (a whole
        // clear word), 65 (alone in a word with given-back pages) and
        // 300..400 (a hole starting and ending inside words).
        for (first, n) in [(0, 130), (300, 100), (511, 1)] {
            let unmap = op(kind::UNMAP, 0, page(first), n * PAGE_SIZE as u64, 0);
            mem.run_batch(&mut kit.s2, kit.mm, &[unmap]).expect("unmap");
        }
        for (first, n) in [(0, 64), (65, 1), (300, 100)] {
            mem.forget_given_back(Ipa(page(first)), n * PAGE_SIZE as u64)
                .expect("forget");
        }
        assert_eq!(
            mem.stage2_fault(&mut kit.s2, kit.mm, Ipa(page(10)), 0x07),
            FaultAction::Populated(64 + 1 + 100)
        );
        for i in 0..512 {
            let mapped = kit.s2.query(Ipa(page(i))).is_some();
            let expected = !((64..130).contains(&i) && i != 65 || i == 511);
            assert_eq!(mapped, expected, "page {i}");
        }
        assert_eq!(
            mem.stage2_fault(&mut kit.s2, kit.mm, Ipa(page(64)), 0x07),
            FaultAction::Inject,
            "still given back"
        );
    }

    /// The coherency hook sees exactly the backing newly mapped: a fault's
    /// unmapped, not given-back runs and a `POPULATE`'s holes, never what
    /// was mapped already.
    #[test]
    fn the_map_hook_sees_only_what_is_newly_mapped() {
        use core::sync::atomic::{AtomicU64, Ordering};
        static BYTES: AtomicU64 = AtomicU64::new(0);
        static LOWEST: AtomicU64 = AtomicU64::new(u64::MAX);
        fn hook(pa: PhysAddr, len: usize) {
            BYTES.fetch_add(len as u64, Ordering::SeqCst);
            LOWEST.fetch_min(pa.0 as u64, Ordering::SeqCst);
        }
        let (mut kit, mut mem) = demand_kit(DEFAULT_FAULT_AROUND);
        mem.set_on_map(hook);
        // One fault: its 2 MiB window.
        mem.stage2_fault(&mut kit.s2, kit.mm, Ipa(GIB + 0x1000), 0x07);
        assert_eq!(BYTES.load(Ordering::SeqCst), 2 * MIB);
        assert_eq!(LOWEST.load(Ordering::SeqCst), 0x8000_0000);
        // Give one page back, forget nothing: POPULATE over 4 MiB maps the
        // page and the next 2 MiB window, not the mapped rest.
        let unmap = op(kind::UNMAP, 0, GIB + 0x3000, 0x1000, 0);
        mem.run_batch(&mut kit.s2, kit.mm, &[unmap]).expect("unmap");
        let populate = op(kind::POPULATE, 0, GIB, 4 * MIB, 0);
        mem.run_batch(&mut kit.s2, kit.mm, &[populate])
            .expect("populate");
        assert_eq!(BYTES.load(Ordering::SeqCst), 2 * MIB + 0x1000 + 2 * MIB);
        // Everything mapped now: nothing more.
        mem.run_batch(&mut kit.s2, kit.mm, &[populate])
            .expect("populate");
        assert_eq!(BYTES.load(Ordering::SeqCst), 4 * MIB + 0x1000);
    }

    #[test]
    fn given_back_permission_and_outside_faults_are_injected() {
        let (mut kit, mut mem) = demand_kit(DEFAULT_FAULT_AROUND);
        first_touch(&mut kit, &mut mem, GIB..GIB + 2 * MIB);
        let unmap = op(kind::UNMAP, 0, GIB, 0x1000, 0);
        mem.run_batch(&mut kit.s2, kit.mm, &[unmap]).expect("unmap");
        assert_eq!(
            mem.stage2_fault(&mut kit.s2, kit.mm, Ipa(GIB), 0x07),
            FaultAction::Inject,
            "given back"
        );
        assert_eq!(
            mem.stage2_fault(&mut kit.s2, kit.mm, Ipa(GIB + 0x1000), 0x0f),
            FaultAction::Inject,
            "permission"
        );
        assert_eq!(
            mem.stage2_fault(&mut kit.s2, kit.mm, Ipa(GIB + 64 * MIB), 0x07),
            FaultAction::Inject,
            "outside RAM"
        );
        // Fault-around skips the given-back page, and populating it again
        // makes it the guest's once more.
        assert_eq!(
            mem.stage2_fault(&mut kit.s2, kit.mm, Ipa(GIB + 4 * MIB), 0x07),
            FaultAction::Populated(512)
        );
        let populate = MmOp {
            kind: kind::POPULATE,
            ..unmap
        };
        mem.run_batch(&mut kit.s2, kit.mm, &[populate])
            .expect("populate");
        assert!(kit.s2.query(Ipa(GIB)).is_some());
    }
}
