//! The hardware side of the mm core's arch boundary: real barriers and TLB
//! maintenance instructions.
//!
//! # The VMID in effect is the VMID asked for
//!
//! Stage-2 TLBIs (`IPAS2E1IS`, `VMALLE1IS`, ...) act on the VMID held in
//! `VTTBR_EL2`, not on an operand. [`MmArch`] names the VMID, so a TLBI for
//! a VMID other than the installed one installs that VMID's `VTTBR_EL2`
//! value (registered by [`MmArch::stage2_root`] when its tables were made),
//! synchronizes (`ISB`), issues the TLBI and puts the old value back (with
//! its `ISB`), as KVM's `__tlb_switch_to_guest` / `__tlb_switch_to_host` do.
//! This holds in release builds too. A TLBI takes its VMID when it executes,
//! so restoring `VTTBR_EL2` before the `DSB ISH` that completes it does not
//! change what it invalidates. While the other VTTBR is installed this CPU
//! runs at EL2 only: no EL1&0 translation (and no guest) uses it.
//!
//! # VMID width
//!
//! VMIDs are 8 bits unless FEAT_VMID16 is implemented
//! (`ID_AA64MMFR1_EL1.VMIDBits` = 0b0010) and enabled (`VTCR_EL2.VS`); a
//! stage-2 TLBI for a VMID that does not fit panics (it would act on another
//! guest's entries), and `Stage2::new` refuses such a VMID.
//!
//! # TTL hints
//!
//! With FEAT_TTL (`ID_AA64MMFR2_EL1.TTL` nonzero) the by-IPA TLBIs carry the
//! level of the leaf to drop in their TTL field: bits \[47:44\] of the
//! operand (TG = 0b01 for the 4 KiB granule in \[47:46\], the level in
//! \[45:44\]); range TLBIs in bits \[38:37\] of theirs (used only with FEAT_TTL
//! as well, to stay on the side of "any level" where in doubt). Without a
//! hint (table removals, mixed levels) the field is 0: any level.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::mm::arch::{MmArch, Vmid};

use super::sysreg::{read_sysreg, write_sysreg};

/// Issues the real instructions. Zero-sized.
#[derive(Clone, Copy, Debug, Default)]
pub struct HwMmArch;

/// Most stage 2s that may exist at once (VTTBR values kept for the switch).
const VTTBR_SLOTS: usize = 16;

/// The `VTTBR_EL2` value of each live stage 2 (0: free slot; a root is never
/// at address 0).
static VTTBRS: [AtomicU64; VTTBR_SLOTS] = [const { AtomicU64::new(0) }; VTTBR_SLOTS];

/// `VTTBR_EL2.VMID` starts at bit 48.
const VMID_SHIFT: u32 = 48;

/// The VMID field of a `VTTBR_EL2` value, `bits` wide.
fn vmid_field(vttbr: u64, bits: u32) -> u64 {
    (vttbr >> VMID_SHIFT) & ((1 << bits) - 1)
}

/// Bits of VMID in effect: 16 with FEAT_VMID16 enabled by `VTCR_EL2.VS`
/// (bit 19), else 8.
fn vmid_width() -> u32 {
    let vmid16 = (read_sysreg!("id_aa64mmfr1_el1") >> 4) & 0xf == 0b0010;
    let vs = read_sysreg!("vtcr_el2") & (1 << 19) != 0;
    if vmid16 && vs { 16 } else { 8 }
}

/// FEAT_TTL: `ID_AA64MMFR2_EL1.TTL`, bits \[51:48\], nonzero.
fn has_ttl() -> bool {
    (read_sysreg!("id_aa64mmfr2_el1") >> 48) & 0xf != 0
}

/// The registered `VTTBR_EL2` value of `vmid`, if any.
fn registered_vttbr(vmid: Vmid) -> Option<u64> {
    VTTBRS
        .iter()
        .map(|s| s.load(Ordering::Acquire))
        .find(|&v| v != 0 && (v >> VMID_SHIFT) as u16 == vmid.0)
}

/// What [`HwMmArch::switch_vmid`] replaced, to put back.
#[must_use]
#[derive(Clone, Copy, Debug)]
struct SavedVttbr(Option<u64>);

impl HwMmArch {
    /// Makes `vmid` the VMID in effect for the next stage-2 TLBI: nothing
    /// to do if it is the installed one, else its registered VTTBR is
    /// installed. Returns what to [`restore`](Self::restore).
    ///
    /// # Panics
    ///
    /// If `vmid` does not fit the VMID width in effect, or is not installed
    /// and has no registered tables (a TLBI for it would hit another
    /// guest's entries).
    fn switch_vmid(vmid: Vmid) -> SavedVttbr {
        let bits = vmid_width();
        assert!(
            u32::from(vmid.0) >> bits == 0,
            "VMID {} does not fit the {bits}-bit VMID width",
            vmid.0
        );
        let current = read_sysreg!("vttbr_el2");
        if vmid_field(current, bits) == u64::from(vmid.0) {
            return SavedVttbr(None);
        }
        let vttbr = registered_vttbr(vmid).unwrap_or_else(|| {
            panic!(
                "stage-2 TLBI for VMID {} with another VMID installed and no tables registered for it",
                vmid.0
            )
        });
        // The VMID's own tables (still allocated: `Stage2` deregisters only
        // after its last invalidation); only EL2 code runs meanwhile.
        write_sysreg!("vttbr_el2", vttbr);
        // SAFETY: a context synchronization barrier; orders the VTTBR write
        // before this CPU's next instruction (the TLBI takes its VMID).
        unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
        SavedVttbr(Some(current))
    }

    /// Puts back the `VTTBR_EL2` value [`switch_vmid`](Self::switch_vmid)
    /// replaced.
    fn restore(saved: SavedVttbr) {
        if let Some(vttbr) = saved.0 {
            // The value that was installed before the switch.
            write_sysreg!("vttbr_el2", vttbr);
            // SAFETY: a context synchronization barrier; this CPU's later
            // instructions (and a later return to the guest) use the
            // restored VTTBR.
            unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
        }
    }
}

/// Converts an address to the operand of a by-address TLBI: bits \[55:12\]
/// of the address in bits \[43:0\].
fn tlbi_operand(addr: u64) -> u64 {
    (addr >> 12) & ((1 << 44) - 1)
}

/// The TTL field of a by-IPA TLBI operand, bits \[47:44\]: TG = 0b01 (4 KiB)
/// and the level, when FEAT_TTL is implemented and the level is 1..=3;
/// else 0 (any level).
fn ttl_field(ttl: Option<u8>, feat_ttl: bool) -> u64 {
    match ttl {
        Some(level @ 1..=3) if feat_ttl => (0b01 << 46) | (u64::from(level) << 44),
        _ => 0,
    }
}

/// The TTL field of a range TLBI operand, bits \[38:37\]: the level, or 0.
fn range_ttl_field(ttl: Option<u8>, feat_ttl: bool) -> u64 {
    match ttl {
        Some(level @ 1..=3) if feat_ttl => u64::from(level) << 37,
        _ => 0,
    }
}

/// The operand of `TLBI RIPAS2(L)E1IS` (4 KiB granule): TG \[47:46\] = 0b01,
/// SCALE \[45:44\], NUM \[43:39\], TTL \[38:37\], BaseADDR \[36:0\].
fn range_operand(ipa: u64, pages: u64, ttl: Option<u8>, feat_ttl: bool) -> u64 {
    let (scale, num) = range_scale_num(pages);
    (1 << 46)
        | (scale << 44)
        | (num << 39)
        | range_ttl_field(ttl, feat_ttl)
        | (tlbi_operand(ipa) & ((1 << 37) - 1))
}

impl MmArch for HwMmArch {
    fn dsb_ishst(&self) {
        // SAFETY: a barrier; it changes no state Rust can see.
        unsafe { core::arch::asm!("dsb ishst", options(nostack, preserves_flags)) };
    }

    fn dsb_ish(&self) {
        // SAFETY: a barrier; it changes no state Rust can see.
        unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
    }

    fn isb(&self) {
        // SAFETY: a barrier; it changes no state Rust can see.
        unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
    }

    fn tlbi_ipas2e1is(&self, vmid: Vmid, ipa: u64, ttl: Option<u8>) {
        let operand = tlbi_operand(ipa) | ttl_field(ttl, has_ttl());
        let saved = Self::switch_vmid(vmid);
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe {
            core::arch::asm!("tlbi ipas2e1is, {0}", in(reg) operand, options(nostack, preserves_flags));
        }
        Self::restore(saved);
    }

    fn tlbi_ipas2le1is(&self, vmid: Vmid, ipa: u64, ttl: Option<u8>) {
        let operand = tlbi_operand(ipa) | ttl_field(ttl, has_ttl());
        let saved = Self::switch_vmid(vmid);
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe {
            core::arch::asm!("tlbi ipas2le1is, {0}", in(reg) operand, options(nostack, preserves_flags));
        }
        Self::restore(saved);
    }

    fn tlbi_ripas2e1is(&self, vmid: Vmid, ipa: u64, pages: u64, ttl: Option<u8>) {
        // Covers (NUM + 1) * 2^(5 * SCALE + 1) pages; the caller keeps
        // `pages` within what one operation expresses.
        let operand = range_operand(ipa, pages, ttl, has_ttl());
        let saved = Self::switch_vmid(vmid);
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe {
            core::arch::asm!(
                ".arch_extension tlb-rmi",
                "tlbi ripas2e1is, {0}",
                in(reg) operand,
                options(nostack, preserves_flags),
            );
        }
        Self::restore(saved);
    }

    fn tlbi_ripas2le1is(&self, vmid: Vmid, ipa: u64, pages: u64, ttl: Option<u8>) {
        let operand = range_operand(ipa, pages, ttl, has_ttl());
        let saved = Self::switch_vmid(vmid);
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe {
            core::arch::asm!(
                ".arch_extension tlb-rmi",
                "tlbi ripas2le1is, {0}",
                in(reg) operand,
                options(nostack, preserves_flags),
            );
        }
        Self::restore(saved);
    }

    fn tlbi_vmalle1is(&self, vmid: Vmid) {
        let saved = Self::switch_vmid(vmid);
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe { core::arch::asm!("tlbi vmalle1is", options(nostack, preserves_flags)) };
        Self::restore(saved);
    }

    fn tlbi_vmalls12e1is(&self, vmid: Vmid) {
        let saved = Self::switch_vmid(vmid);
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe { core::arch::asm!("tlbi vmalls12e1is", options(nostack, preserves_flags)) };
        Self::restore(saved);
    }

    fn tlbi_alle2is(&self) {
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe { core::arch::asm!("tlbi alle2is", options(nostack, preserves_flags)) };
    }

    fn has_tlbi_range(&self) -> bool {
        super::sysreg::has_tlbi_range()
    }

    fn cpu_id(&self) -> usize {
        // The dense index from the full MPIDR affinity (super::smp).
        super::smp::this_cpu()
    }

    fn tlbi_vae2is(&self, va: u64) {
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe {
            core::arch::asm!("tlbi vae2is, {0}", in(reg) tlbi_operand(va), options(nostack, preserves_flags));
        }
    }

    fn vmid_bits(&self) -> u32 {
        vmid_width()
    }

    fn stage2_root(&self, vmid: Vmid, root: Option<usize>) {
        let slot_of = |vmid: Vmid| {
            VTTBRS.iter().find(|s| {
                let v = s.load(Ordering::Acquire);
                v != 0 && (v >> VMID_SHIFT) as u16 == vmid.0
            })
        };
        if let Some(root) = root {
            let vttbr = root as u64 | (u64::from(vmid.0) << VMID_SHIFT);
            let slot = slot_of(vmid)
                .or_else(|| VTTBRS.iter().find(|s| s.load(Ordering::Acquire) == 0))
                .expect("more live stage 2s than VTTBR_SLOTS");
            slot.store(vttbr, Ordering::Release);
        } else {
            // The contract of `Drop for Stage2`: the VMID is installed
            // nowhere when its tables go (this CPU is checked).
            let current = read_sysreg!("vttbr_el2");
            assert!(
                registered_vttbr(vmid) != Some(current),
                "stage-2 tables of VMID {} dropped while installed in VTTBR_EL2",
                vmid.0
            );
            if let Some(slot) = slot_of(vmid) {
                slot.store(0, Ordering::Release);
            }
        }
    }
}

/// The smallest (SCALE, NUM) whose range covers `pages` pages.
///
/// # Panics
///
/// If `pages` is 0 or more than one range TLBI covers (8 GiB of 4 KiB pages
/// at SCALE 3: (31 + 1) << 16 pages). Rounding NUM up may cover up to one
/// unit more than asked: over-invalidation, always safe.
fn range_scale_num(pages: u64) -> (u64, u64) {
    assert!(pages > 0);
    for scale in 0..4 {
        let unit = 1u64 << (5 * scale + 1);
        let num = pages.div_ceil(unit);
        if num <= 32 {
            return (scale, num - 1);
        }
    }
    panic!("{pages} pages exceed one range TLBI");
}
