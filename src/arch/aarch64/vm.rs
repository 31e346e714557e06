//! The EL2 controls for running the guest at EL1 behind stage 2.

use crate::mm::stage2::IPA_BITS;

use crate::el2_controls::{self, CpuIdRegs};

use super::sysreg::{read_sysreg, write_sysreg};

/// `VTCR_EL2` for this hypervisor's IPA space: T0SZ = 64 - `IPA_BITS`
/// (25), SL0 = 1 (walks start at level 1 with a 4 KiB granule), inner and
/// outer write-back read/write-allocate, inner-shareable walks, 4 KiB
/// granule, 8-bit VMID, and PS = the CPU's `PARange` capped at 48 bits
/// (the 52-bit output format is not used).
///
/// Returns `None` if the CPU's physical range is below 40 bits, too small
/// for a 39-bit IPA space whose output addresses are physical.
#[must_use]
pub fn vtcr_el2(pa_range: u64) -> Option<u64> {
    const RES1: u64 = 1 << 31;
    const SL0_LEVEL1: u64 = 1 << 6;
    const IRGN0_WBWA: u64 = 1 << 8;
    const ORGN0_WBWA: u64 = 1 << 10;
    const SH0_INNER: u64 = 3 << 12;
    // PARange 2 = 40 bits.
    if pa_range < 2 {
        return None;
    }
    let t0sz = u64::from(64 - IPA_BITS);
    Some(RES1 | t0sz | SL0_LEVEL1 | IRGN0_WBWA | ORGN0_WBWA | SH0_INNER | (pa_range.min(5) << 16))
}

/// `SCTLR_EL1` at guest entry: MMU and caches off, RES1 bits set.
const SCTLR_EL1_RESET: u64 = 0x30d0_0800;

/// `CNTHCTL_EL2` (E2H = 0): `EL1PCTEN` set (EL1 may read the physical
/// counter: it carries no state), `EL1PCEN` clear (the EL1 physical timer
/// traps and is UNDEFINED: the guest gets the virtual timer, whose
/// interrupt the hypervisor delivers through the virtual GIC; the physical
/// one stays the hypervisor's).
const CNTHCTL_EL2: u64 = 0b01;

/// Programs the EL2 controls for the guest, installs its stage 2 and
/// drops any stale translation for its VMID on this CPU.
///
/// # Safety
///
/// `vttbr` must be the value of a stage-2 table that stays alive and maps no
/// hypervisor memory; `vtcr` must describe it; `fwb` must be set exactly
/// when its normal memory uses the FEAT_S2FWB encoding (and the CPU has
/// FEAT_S2FWB).
pub unsafe fn configure(vttbr: u64, vtcr: u64, cpu: &CpuIdRegs, vmpidr: u64, fwb: bool) {
    // The guest sees the real CPU's identification (these reset to
    // UNKNOWN), and the vCPU's affinity, which its virtual redistributor
    // reports too.
    write_sysreg!("vpidr_el2", read_sysreg!("midr_el1"));
    write_sysreg!("vmpidr_el2", vmpidr);
    // Each value's bits and reasons: crate::el2_controls.
    write_sysreg!("cptr_el2", el2_controls::cptr_el2(cpu));
    write_sysreg!("mdcr_el2", el2_controls::mdcr_el2(cpu));
    if cpu.has_hcx() {
        // HCRX_EL2 (S3_4_C1_C2_2), by encoding for assemblers without it.
        write_sysreg!("S3_4_C1_C2_2", el2_controls::HCRX_EL2);
    }
    if cpu.has_fgt() {
        // HFGRTR_EL2, HFGWTR_EL2, HFGITR_EL2, HDFGRTR_EL2, HDFGWTR_EL2.
        write_sysreg!("S3_4_C1_C1_4", el2_controls::FGT_EL2);
        write_sysreg!("S3_4_C1_C1_5", el2_controls::FGT_EL2);
        write_sysreg!("S3_4_C1_C1_6", el2_controls::FGT_EL2);
        write_sysreg!("S3_4_C3_C1_4", el2_controls::FGT_EL2);
        write_sysreg!("S3_4_C3_C1_5", el2_controls::FGT_EL2);
        if cpu.has_amu_v1p1() {
            // HAFGRTR_EL2.
            write_sysreg!("S3_4_C3_C1_6", el2_controls::FGT_EL2);
        }
    }
    if cpu.has_fgt2() {
        // HDFGRTR2_EL2, HDFGWTR2_EL2, HFGRTR2_EL2, HFGWTR2_EL2, HFGITR2_EL2.
        write_sysreg!("S3_4_C3_C1_0", el2_controls::FGT_EL2);
        write_sysreg!("S3_4_C3_C1_1", el2_controls::FGT_EL2);
        write_sysreg!("S3_4_C3_C1_2", el2_controls::FGT_EL2);
        write_sysreg!("S3_4_C3_C1_3", el2_controls::FGT_EL2);
        write_sysreg!("S3_4_C3_C1_7", el2_controls::FGT_EL2);
    }
    write_sysreg!("cnthctl_el2", CNTHCTL_EL2);
    reset_debug(cpu);
    // HSTR_EL2: no AArch32 EL0 CP15 access traps (reset leaves it UNKNOWN;
    // a set bit would make a 32-bit process's CP15 accesses UNDEFINED).
    write_sysreg!("hstr_el2", 0);
    if cpu.has_ras() {
        // VSESR_EL2: the syndrome of a virtual SError the hypervisor hands
        // the guest (HCR_EL2.VSE): 0, "uncategorized".
        write_sysreg!("S3_4_C5_C2_3", 0);
    }
    if cpu.has_mpam() {
        // MPAM2_EL2 (S3_4_C10_C5_0): EL1 and EL0 MPAM register accesses
        // trap (TRAPMPAM1EL1, TRAPMPAM0EL1; UNDEFINED: MPAM is hidden);
        // MPAMHCR_EL2 (S3_4_C10_C4_0): no virtual partitions.
        write_sysreg!("S3_4_C10_C5_0", (1 << 49) | (1 << 48));
        write_sysreg!("S3_4_C10_C4_0", 0);
    }
    write_sysreg!("cntvoff_el2", 0);
    write_sysreg!("sctlr_el1", SCTLR_EL1_RESET);
    write_sysreg!("vtcr_el2", vtcr);
    // The stage-2 tables were completed with DSB ISHST by the mm core.
    write_sysreg!("vttbr_el2", vttbr);
    // FWB: with FEAT_S2FWB in use (crate::coherency), the stage-2 tables
    // were written with the forced write-back MemAttr encoding.
    let fwb_bit = if fwb { el2_controls::hcr::FWB } else { 0 };
    write_sysreg!("hcr_el2", el2_controls::hcr_el2(cpu) | fwb_bit);
    // SAFETY: barriers and TLB maintenance only.
    unsafe {
        core::arch::asm!(
            // The VTTBR/VTCR/HCR writes take effect for what follows.
            "isb",
            // Nothing cached for this VMID may predate its tables (reset
            // leaves TLB contents UNKNOWN): local, since no other CPU ran it.
            "tlbi vmalls12e1",
            "dsb nsh",
            "isb",
            options(nostack, preserves_flags),
        );
    }
}

/// Disarms every breakpoint and watchpoint and the debug events in
/// `MDSCR_EL1` (reset leaves them UNKNOWN). The guest's debug register
/// accesses trap and are write-ignored (`MDCR_EL2.TDA`), so what is set
/// here is what the physical CPU keeps: nothing armed.
fn reset_debug(cpu: &CpuIdRegs) {
    macro_rules! zero_numbered {
        ($count:expr, [$($i:literal => $name:literal),*]) => {
            $(if $i < $count {
                write_sysreg!($name, 0);
            })*
        };
    }
    write_sysreg!("mdscr_el1", 0);
    // BRPs [15:12] and WRPs [23:20] hold the number minus one.
    let brps = crate::el2_controls::field(cpu.dfr0, 12) + 1;
    let wrps = crate::el2_controls::field(cpu.dfr0, 20) + 1;
    zero_numbered!(brps, [
        0 => "dbgbcr0_el1", 1 => "dbgbcr1_el1", 2 => "dbgbcr2_el1", 3 => "dbgbcr3_el1",
        4 => "dbgbcr4_el1", 5 => "dbgbcr5_el1", 6 => "dbgbcr6_el1", 7 => "dbgbcr7_el1",
        8 => "dbgbcr8_el1", 9 => "dbgbcr9_el1", 10 => "dbgbcr10_el1", 11 => "dbgbcr11_el1",
        12 => "dbgbcr12_el1", 13 => "dbgbcr13_el1", 14 => "dbgbcr14_el1", 15 => "dbgbcr15_el1"
    ]);
    zero_numbered!(wrps, [
        0 => "dbgwcr0_el1", 1 => "dbgwcr1_el1", 2 => "dbgwcr2_el1", 3 => "dbgwcr3_el1",
        4 => "dbgwcr4_el1", 5 => "dbgwcr5_el1", 6 => "dbgwcr6_el1", 7 => "dbgwcr7_el1",
        8 => "dbgwcr8_el1", 9 => "dbgwcr9_el1", 10 => "dbgwcr10_el1", 11 => "dbgwcr11_el1",
        12 => "dbgwcr12_el1", 13 => "dbgwcr13_el1", 14 => "dbgwcr14_el1", 15 => "dbgwcr15_el1"
    ]);
}
