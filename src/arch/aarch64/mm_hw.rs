//! The hardware side of the mm core's arch boundary: real barriers and TLB
//! maintenance instructions.

use crate::mm::arch::{MmArch, Vmid};

use super::sysreg::read_sysreg;

/// Issues the real instructions. Zero-sized.
#[derive(Clone, Copy, Debug, Default)]
pub struct HwMmArch;

impl HwMmArch {
    /// Stage-2 TLBIs act on the VMID in `VTTBR_EL2`; check it is `vmid`.
    fn check_vmid(vmid: Vmid) {
        debug_assert_eq!(
            (read_sysreg!("vttbr_el2") >> 48) as u16,
            vmid.0,
            "stage-2 TLBI issued with another guest's VTTBR_EL2 installed"
        );
    }
}

/// Converts an address to the operand of a by-address TLBI: bits \[55:12\]
/// of the address in bits \[43:0\].
fn tlbi_operand(addr: u64) -> u64 {
    (addr >> 12) & ((1 << 44) - 1)
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

    fn tlbi_ipas2e1is(&self, vmid: Vmid, ipa: u64) {
        Self::check_vmid(vmid);
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe {
            core::arch::asm!("tlbi ipas2e1is, {0}", in(reg) tlbi_operand(ipa), options(nostack, preserves_flags));
        }
    }

    fn tlbi_ripas2e1is(&self, vmid: Vmid, ipa: u64, pages: u64) {
        Self::check_vmid(vmid);
        // Range operand (4 KiB granule): TG [47:46] = 0b01, SCALE [45:44],
        // NUM [43:39], TTL [38:37] = 0 (any level), BaseADDR [36:0]. Covers
        // (NUM + 1) * 2^(5 * SCALE + 1) pages; the caller keeps `pages`
        // within what one operation expresses.
        let (scale, num) = range_scale_num(pages);
        let operand = (1 << 46) | (scale << 44) | (num << 39) | tlbi_operand(ipa) & ((1 << 37) - 1);
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe {
            core::arch::asm!(
                ".arch_extension tlb-rmi",
                "tlbi ripas2e1is, {0}",
                in(reg) operand,
                options(nostack, preserves_flags),
            );
        }
    }

    fn tlbi_vmalle1is(&self, vmid: Vmid) {
        Self::check_vmid(vmid);
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe { core::arch::asm!("tlbi vmalle1is", options(nostack, preserves_flags)) };
    }

    fn tlbi_vmalls12e1is(&self, vmid: Vmid) {
        Self::check_vmid(vmid);
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe { core::arch::asm!("tlbi vmalls12e1is", options(nostack, preserves_flags)) };
    }

    fn tlbi_alle2is(&self) {
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe { core::arch::asm!("tlbi alle2is", options(nostack, preserves_flags)) };
    }

    fn has_tlbi_range(&self) -> bool {
        super::sysreg::has_tlbi_range()
    }

    fn cpu_id(&self) -> usize {
        // Single cluster on QEMU virt: Aff0 numbers the CPUs.
        (read_sysreg!("mpidr_el1") & 0xff) as usize
    }

    fn tlbi_vae2is(&self, va: u64) {
        // SAFETY: TLB maintenance only drops cached translations.
        unsafe {
            core::arch::asm!("tlbi vae2is, {0}", in(reg) tlbi_operand(va), options(nostack, preserves_flags));
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
