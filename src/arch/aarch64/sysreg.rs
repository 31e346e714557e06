//! System register access that the `aarch64-cpu` crate does not cover, and
//! CPU feature checks.

/// Reads a system register by name.
macro_rules! read_sysreg {
    ($name:literal) => {{
        let value: u64;
        // SAFETY: reading a system register has no side effect on memory.
        unsafe {
            core::arch::asm!(concat!("mrs {0}, ", $name), out(reg) value, options(nomem, nostack, preserves_flags));
        }
        value
    }};
}

/// Writes a system register by name.
///
/// Not `nomem`: callers rely on the compiler keeping memory accesses (such as
/// page-table writes) on their side of a register write.
macro_rules! write_sysreg {
    ($name:literal, $value:expr) => {{
        let value: u64 = $value;
        // SAFETY: the caller's comment says why this value is safe for this
        // register at this point; the write touches no Rust-visible memory.
        unsafe {
            core::arch::asm!(concat!("msr ", $name, ", {0}"), in(reg) value, options(nostack, preserves_flags));
        }
    }};
}

pub(crate) use read_sysreg;
pub(crate) use write_sysreg;

/// `ID_AA64MMFR0_EL1.PARange`, bits \[3:0\].
#[must_use]
pub fn pa_range() -> u64 {
    read_sysreg!("id_aa64mmfr0_el1") & 0xf
}

/// FEAT_PAuth: `ID_AA64ISAR1_EL1.{APA,API,GPA,GPI}` or `ID_AA64ISAR2_EL1.{APA3,GPA3}`.
#[must_use]
pub fn has_pauth() -> bool {
    let isar1 = read_sysreg!("id_aa64isar1_el1");
    let isar2 = read_sysreg!("id_aa64isar2_el1");
    // APA [7:4], API [11:8], GPA [27:24], GPI [31:28]; APA3 [15:12], GPA3 [11:8].
    isar1 & 0xff00_0ff0 != 0 || isar2 & 0xff00 != 0
}

/// GICv3 system register interface: `ID_AA64PFR0_EL1.GIC`, bits \[27:24\].
#[must_use]
pub fn has_gic_sysregs() -> bool {
    (read_sysreg!("id_aa64pfr0_el1") >> 24) & 0xf != 0
}

/// FEAT_TLBIRANGE: `ID_AA64ISAR0_EL1.TLB`, bits \[59:56\], equals 2.
#[must_use]
pub fn has_tlbi_range() -> bool {
    (read_sysreg!("id_aa64isar0_el1") >> 56) & 0xf == 2
}

/// The current exception level.
#[must_use]
pub fn current_el() -> u64 {
    (read_sysreg!("CurrentEL") >> 2) & 3
}

/// The ID registers the EL2 controls and the guest's ID view depend on.
#[must_use]
pub fn cpu_id_regs() -> crate::el2_controls::CpuIdRegs {
    let mut regs = crate::el2_controls::CpuIdRegs {
        pfr0: read_sysreg!("id_aa64pfr0_el1"),
        pfr1: read_sysreg!("id_aa64pfr1_el1"),
        dfr0: read_sysreg!("id_aa64dfr0_el1"),
        isar1: read_sysreg!("id_aa64isar1_el1"),
        isar2: read_sysreg!("id_aa64isar2_el1"),
        mmfr0: read_sysreg!("id_aa64mmfr0_el1"),
        mmfr1: read_sysreg!("id_aa64mmfr1_el1"),
        mmfr2: read_sysreg!("id_aa64mmfr2_el1"),
        pmu_counters: 0,
    };
    if regs.has_pmuv3() {
        // PMCR_EL0 exists only with a PMU (UNDEFINED otherwise).
        regs.pmu_counters = (read_sysreg!("pmcr_el0") >> 11) & 0x1f;
    }
    regs
}

/// Reads ID register `S3_0_C0_C<crm>_<op2>` (CRm 1..=7), the ID space
/// whose reserved encodings the architecture makes RAZ; 0 for other
/// arguments.
#[must_use]
pub fn read_id_reg(crm: u8, op2: u8) -> u64 {
    macro_rules! id_space {
        ($($crm:literal: [$($op2:literal),*]),*) => {
            match (crm, op2) {
                $($(($crm, $op2) => {
                    let value: u64;
                    // SAFETY: reading an ID register has no side effect;
                    // every encoding of this space reads at EL2 (reserved
                    // ones as zero).
                    unsafe {
                        core::arch::asm!(
                            concat!("mrs {0}, S3_0_C0_C", stringify!($crm), "_", stringify!($op2)),
                            out(reg) value,
                            options(nomem, nostack, preserves_flags),
                        );
                    }
                    value
                })*)*
                _ => 0,
            }
        };
    }
    id_space!(
        1: [0, 1, 2, 3, 4, 5, 6, 7],
        2: [0, 1, 2, 3, 4, 5, 6, 7],
        3: [0, 1, 2, 3, 4, 5, 6, 7],
        4: [0, 1, 2, 3, 4, 5, 6, 7],
        5: [0, 1, 2, 3, 4, 5, 6, 7],
        6: [0, 1, 2, 3, 4, 5, 6, 7],
        7: [0, 1, 2, 3, 4, 5, 6, 7]
    )
}

/// The IPA the guest's stage 1 gives `va` now (`AT S1E1R` from EL2, which
/// walks the guest's EL1&0 regime with the registers in the CPU), or `None`
/// if it does not translate. A read check: whatever access faulted at stage
/// 2 was allowed by stage 1, and every EL1 mapping is readable at EL1, so a
/// failure means the guest's tables changed. `PAR_EL1` is the guest's: it
/// is saved and restored around the walk.
#[must_use]
pub fn stage1_ipa(va: u64) -> Option<u64> {
    let saved = read_sysreg!("par_el1");
    // SAFETY: address translation changes only PAR_EL1, restored below;
    // the ISB makes the result visible to the read.
    unsafe {
        core::arch::asm!("at s1e1r, {0}", "isb", in(reg) va, options(nostack, preserves_flags));
    }
    let par = read_sysreg!("par_el1");
    write_sysreg!("par_el1", saved);
    // PAR_EL1.F (bit 0): the walk failed. PA[51:12] otherwise.
    (par & 1 == 0).then_some((par & 0x000f_ffff_ffff_f000) | (va & 0xfff))
}
