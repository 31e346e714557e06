//! The EL2 trap and control registers for running a guest, computed from the
//! CPU's ID registers: every bit of `HCR_EL2`, `MDCR_EL2`, `CPTR_EL2`,
//! `HCRX_EL2` and the fine-grained trap registers is chosen here, with its
//! reason, so nothing is left as reset happened to leave it.
//!
//! The rule: the guest owns exactly the state that the hypervisor never
//! touches and that dies with the guest (its general registers, FP/SIMD,
//! its EL1 system registers, its stage-1 translation). Everything else
//! (performance monitors, debug, trace, statistical profiling, activity
//! monitors, RAS error records, SVE/SME state, implementation-defined
//! registers, the cache geometry by set/way) either traps to EL2 and is
//! emulated, or traps and is answered with UNDEFINED. The ID registers the
//! guest reads are a sanitised view ([`crate::vm::sysreg_emul`]) that hides
//! every feature whose use would be UNDEFINED.
//!
//! Portable: the aarch64 side reads the ID registers into [`CpuIdRegs`] and
//! writes the values computed here.

/// The CPU's ID registers this module (and the sanitised view) depends on,
/// as read at EL2.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct CpuIdRegs {
    /// `ID_AA64PFR0_EL1`.
    pub pfr0: u64,
    /// `ID_AA64PFR1_EL1`.
    pub pfr1: u64,
    /// `ID_AA64DFR0_EL1`.
    pub dfr0: u64,
    /// `ID_AA64ISAR1_EL1`.
    pub isar1: u64,
    /// `ID_AA64ISAR2_EL1`.
    pub isar2: u64,
    /// `ID_AA64MMFR0_EL1`.
    pub mmfr0: u64,
    /// `ID_AA64MMFR1_EL1`.
    pub mmfr1: u64,
    /// `ID_AA64MMFR2_EL1`.
    pub mmfr2: u64,
    /// `PMCR_EL0.N` (bits \[15:11\]): the number of event counters, if a
    /// PMU exists (0 otherwise).
    pub pmu_counters: u64,
}

/// A 4-bit ID register field.
#[must_use]
pub const fn field(reg: u64, shift: u32) -> u64 {
    (reg >> shift) & 0xf
}

impl CpuIdRegs {
    /// FEAT_SVE: `ID_AA64PFR0_EL1.SVE` \[35:32\].
    #[must_use]
    pub const fn has_sve(&self) -> bool {
        field(self.pfr0, 32) != 0
    }

    /// FEAT_SME: `ID_AA64PFR1_EL1.SME` \[27:24\].
    #[must_use]
    pub const fn has_sme(&self) -> bool {
        field(self.pfr1, 24) != 0
    }

    /// FEAT_RAS: `ID_AA64PFR0_EL1.RAS` \[31:28\].
    #[must_use]
    pub const fn has_ras(&self) -> bool {
        field(self.pfr0, 28) != 0
    }

    /// FEAT_AMUv1: `ID_AA64PFR0_EL1.AMU` \[47:44\].
    #[must_use]
    pub const fn has_amu(&self) -> bool {
        field(self.pfr0, 44) != 0
    }

    /// FEAT_AMUv1p1 (`HAFGRTR_EL2` exists with FEAT_FGT).
    #[must_use]
    pub const fn has_amu_v1p1(&self) -> bool {
        field(self.pfr0, 44) >= 2
    }

    /// FEAT_MTE2: `ID_AA64PFR1_EL1.MTE` \[11:8\] >= 2 (`GMID_EL1` exists).
    #[must_use]
    pub const fn has_mte2(&self) -> bool {
        field(self.pfr1, 8) >= 2
    }

    /// FEAT_PAuth: `ID_AA64ISAR1_EL1.{APA,API,GPA,GPI}` or
    /// `ID_AA64ISAR2_EL1.{APA3,GPA3}`.
    #[must_use]
    pub const fn has_pauth(&self) -> bool {
        self.isar1 & 0xff00_0ff0 != 0 || self.isar2 & 0xff00 != 0
    }

    /// FEAT_S2FWB: `ID_AA64MMFR2_EL1.FWB` \[43:40\].
    #[must_use]
    pub const fn has_fwb(&self) -> bool {
        field(self.mmfr2, 40) != 0
    }

    /// FEAT_MPAM: `ID_AA64PFR0_EL1.MPAM` \[43:40\] or
    /// `ID_AA64PFR1_EL1.MPAM_frac` \[19:16\].
    #[must_use]
    pub const fn has_mpam(&self) -> bool {
        field(self.pfr0, 40) != 0 || field(self.pfr1, 16) != 0
    }

    /// FEAT_LOR: `ID_AA64MMFR1_EL1.LO` \[19:16\].
    #[must_use]
    pub const fn has_lor(&self) -> bool {
        field(self.mmfr1, 16) != 0
    }

    /// FEAT_HCX: `ID_AA64MMFR1_EL1.HCX` \[43:40\] (`HCRX_EL2` exists).
    #[must_use]
    pub const fn has_hcx(&self) -> bool {
        field(self.mmfr1, 40) != 0
    }

    /// FEAT_FGT: `ID_AA64MMFR0_EL1.FGT` \[59:56\] >= 1.
    #[must_use]
    pub const fn has_fgt(&self) -> bool {
        field(self.mmfr0, 56) >= 1
    }

    /// FEAT_FGT2: `ID_AA64MMFR0_EL1.FGT` \[59:56\] >= 2.
    #[must_use]
    pub const fn has_fgt2(&self) -> bool {
        field(self.mmfr0, 56) >= 2
    }

    /// `ID_AA64DFR0_EL1.PMUVer` \[11:8\]: 0 none, 0xf IMPLEMENTATION
    /// DEFINED, else the PMUv3 version.
    #[must_use]
    pub const fn pmu_version(&self) -> u64 {
        field(self.dfr0, 8)
    }

    /// An architected PMU (PMUv3) exists.
    #[must_use]
    pub const fn has_pmuv3(&self) -> bool {
        let v = self.pmu_version();
        v != 0 && v != 0xf
    }

    /// FEAT_PMUv3p1 (`MDCR_EL2.HPMD`).
    #[must_use]
    pub const fn has_pmuv3p1(&self) -> bool {
        self.has_pmuv3() && self.pmu_version() >= 4
    }

    /// FEAT_PMUv3p5 (`MDCR_EL2.HCCD`).
    #[must_use]
    pub const fn has_pmuv3p5(&self) -> bool {
        self.has_pmuv3() && self.pmu_version() >= 6
    }

    /// FEAT_SPE: `ID_AA64DFR0_EL1.PMSVer` \[35:32\].
    #[must_use]
    pub const fn has_spe(&self) -> bool {
        field(self.dfr0, 32) != 0
    }

    /// FEAT_TRF: `ID_AA64DFR0_EL1.TraceFilt` \[43:40\].
    #[must_use]
    pub const fn has_trace_filter(&self) -> bool {
        field(self.dfr0, 40) != 0
    }

    /// FEAT_TRBE: `ID_AA64DFR0_EL1.TraceBuffer` \[47:44\].
    #[must_use]
    pub const fn has_trbe(&self) -> bool {
        field(self.dfr0, 44) != 0
    }
}

/// `HCR_EL2` bits, by name.
pub mod hcr {
    /// Stage 2 on.
    pub const VM: u64 = 1 << 0;
    /// Set/way invalidation is upgraded to clean+invalidate.
    pub const SWIO: u64 = 1 << 1;
    /// Protected table walk.
    pub const PTW: u64 = 1 << 2;
    /// Physical FIQs to EL2; virtual FIQs to the guest.
    pub const FMO: u64 = 1 << 3;
    /// Physical IRQs to EL2; virtual IRQs to the guest.
    pub const IMO: u64 = 1 << 4;
    /// Physical SErrors to EL2; virtual SErrors to the guest.
    pub const AMO: u64 = 1 << 5;
    /// A virtual SError is pending for the guest.
    pub const VSE: u64 = 1 << 8;
    /// Broadcast the guest's TLBIs and I-cache invalidations.
    pub const FB: u64 = 1 << 9;
    /// Barrier shareability upgrade: inner shareable.
    pub const BSU_INNER: u64 = 1 << 10;
    /// Trap writes to the stage-1 "virtual memory" registers.
    pub const TVM: u64 = 1 << 26;
    /// Trap ID group 3 (the feature ID registers).
    pub const TID3: u64 = 1 << 18;
    /// Trap SMC.
    pub const TSC: u64 = 1 << 19;
    /// Trap implementation-defined system registers.
    pub const TIDCP: u64 = 1 << 20;
    /// Trap `ACTLR_EL1`.
    pub const TACR: u64 = 1 << 21;
    /// Trap data cache maintenance by set/way.
    pub const TSW: u64 = 1 << 22;
    /// EL1 is AArch64.
    pub const RW: u64 = 1 << 31;
    /// Trap LORegion registers.
    pub const TLOR: u64 = 1 << 35;
    /// Trap RAS error record registers.
    pub const TERR: u64 = 1 << 36;
    /// Route synchronous external aborts to EL2.
    pub const TEA: u64 = 1 << 37;
    /// Do not trap pointer-authentication key registers.
    pub const APK: u64 = 1 << 40;
    /// Do not trap pointer-authentication instructions.
    pub const API: u64 = 1 << 41;
    /// Forced write-back: stage 2 can force Normal write-back cacheable
    /// (FEAT_S2FWB; the stage-2 MemAttr encoding changes with it).
    pub const FWB: u64 = 1 << 46;
    /// Trap `GMID_EL1` (ID group 5).
    pub const TID5: u64 = 1 << 58;
}

/// `HCR_EL2` while a guest runs. Set:
/// - `VM`: stage 2 on.
/// - `SWIO`: a set/way *invalidate* by the guest cleans too (never throws
///   away dirty lines of memory the hypervisor shares); with `TSW` the ops
///   trap anyway, this covers the window on CPUs that honour it first.
/// - `FMO`, `IMO`: physical FIQs and IRQs go to EL2 (the hypervisor owns
///   the GIC), virtual ones (list registers) to the guest, and the guest's
///   `ICC_*` accesses reach the virtual CPU interface; SGI generation by
///   the guest traps (emulated by the virtual GIC).
/// - `AMO`: physical SErrors go to EL2, which reports them and hands the
///   guest a virtual SError (`VSE`) instead of dying.
/// - `PTW`: a guest stage-1 table walk that lands in Device memory at stage 2
///   is a permission fault (as KVM): no speculative walks into devices.
/// - `FB`: the guest's TLBIs and I-cache invalidations are broadcast in the
///   inner shareable domain, so they reach every CPU the VM may run on.
/// - `BSU` = inner shareable: the guest's barriers cover that domain too.
/// - `TID3`: the guest's ID register reads trap and get the sanitised view.
/// - `TSC`: SMCs trap; PSCI is emulated here, never passed to firmware.
/// - `TIDCP`: implementation-defined system registers trap (UNDEFINED):
///   they may control CPU-wide behaviour.
/// - `TACR`: `ACTLR_EL1` traps (UNDEFINED): implementation-defined controls.
/// - `TSW`: set/way cache maintenance traps and is emulated by cleaning the
///   guest's memory by address (set/way acts on the physical CPU's caches,
///   shared with the hypervisor; see [`crate::vm::sysreg_emul`]).
/// - `RW`: the guest's EL1 is AArch64.
/// - `TLOR` (FEAT_LOR): LORegion registers trap (UNDEFINED; hidden in the ID
///   registers).
/// - `TERR`, `TEA` (FEAT_RAS): error record registers trap (UNDEFINED;
///   RAS is hidden) and synchronous external aborts from the guest come to
///   EL2, which reports them and injects an abort.
/// - `APK`, `API` (FEAT_PAuth): pointer authentication is the guest's; its
///   keys are EL1 registers the hypervisor never uses (built without
///   pointer authentication).
/// - `TID5` (FEAT_MTE2): `GMID_EL1` traps (UNDEFINED; MTE is hidden).
///
/// Left clear, with the reason:
/// - `TWI`, `TWE`: one vCPU per physical CPU: WFI/WFE idle that CPU directly.
/// - `TID0`, `TID1`, `TID2`: the AArch32 `JIDR`, `AIDR`/`REVIDR`, and the
///   cache geometry (`CTR_EL0`, `CLIDR`, `CCSIDR`) carry no state and expose
///   nothing the guest can use against another context.
/// - `TTLB`, `TPU`, `TPCP`, `TDZ`: TLB and cache maintenance by address act
///   on the guest's own VMID and memory (stage 2 confines them; with `VM` a
///   guest `DC IVAC` is performed as `DC CIVAC`).
/// - `TVM`, `TRVM`: the guest's stage-1 registers are its own. (`TVM` is set
///   on the fly, without FEAT_S2FWB, from a set/way operation until the
///   guest's caches are on again, to see it toggle them: the set/way
///   emulation.)
/// - `TGE`, `E2H`, `NV*`, `DC`, `CD`, `ID`: not used.
/// - `FWB`: stage-2 attributes are combined with the guest's (the forced
///   write-back mode is tracked separately).
/// - `ATA`: MTE tag access traps (UNDEFINED; MTE is hidden).
/// - `EnSCXT`: `SCXTNUM_EL0/1` trap (UNDEFINED).
/// - `FIEN`: RAS fault injection registers trap.
#[must_use]
pub fn hcr_el2(cpu: &CpuIdRegs) -> u64 {
    use hcr::{
        AMO, API, APK, BSU_INNER, FB, FMO, IMO, PTW, RW, SWIO, TACR, TEA, TERR, TID3, TID5, TIDCP,
        TLOR, TSC, TSW, VM,
    };
    let mut v =
        VM | SWIO | PTW | FMO | IMO | AMO | FB | BSU_INNER | TID3 | TSC | TIDCP | TACR | TSW | RW;
    if cpu.has_lor() {
        v |= TLOR;
    }
    if cpu.has_ras() {
        v |= TERR | TEA;
    }
    if cpu.has_pauth() {
        v |= APK | API;
    }
    if cpu.has_mte2() {
        v |= TID5;
    }
    v
}

/// `MDCR_EL2` bits, by name.
pub mod mdcr {
    /// Trap `PMCR_EL0`.
    pub const TPMCR: u64 = 1 << 5;
    /// Trap every PMU register.
    pub const TPM: u64 = 1 << 6;
    /// Trap debug registers (`DBG*`, `MDSCR_EL1`, ...).
    pub const TDA: u64 = 1 << 9;
    /// Trap the OS lock and power-down registers.
    pub const TDOSA: u64 = 1 << 10;
    /// Trap the debug ROM address registers.
    pub const TDRA: u64 = 1 << 11;
    /// Trap the statistical profiling control registers.
    pub const TPMS: u64 = 1 << 14;
    /// Prohibit event counting at EL2.
    pub const HPMD: u64 = 1 << 17;
    /// Trap `TRFCR_EL1`.
    pub const TTRF: u64 = 1 << 19;
    /// Prohibit cycle counting at EL2.
    pub const HCCD: u64 = 1 << 23;
    /// Trap the debug communications channel registers (FEAT_FGT).
    pub const TDCC: u64 = 1 << 27;
}

/// `MDCR_EL2` while a guest runs: PMU, debug, trace filter, statistical
/// profiling and trace buffer registers all trap.
/// - `HPMN` = `PMCR_EL0.N`: every counter stays in the EL0/EL1 range (none
///   reserved for EL2, which uses none); with `TPM` the guest reaches none.
/// - `TPM`, `TPMCR`: PMU registers trap (UNDEFINED; the PMU is hidden), so
///   the guest cannot count events of EL2, of other guests, or read the
///   cycle counter's EL2 share.
/// - `HPMD` (PMUv3p1), `HCCD` (PMUv3p5): nothing counts at EL2 whatever a
///   counter's filter says.
/// - `TDA`, `TDOSA`, `TDRA`: debug registers trap; they are emulated as
///   storage-free RAZ/WI (breakpoints and watchpoints never arm), so the
///   guest's debug state never reaches the physical CPU.
/// - `TPMS` (SPE), `E2PB` = 0b00: profiling buffer and controls are EL2's;
///   EL1 accesses trap (UNDEFINED).
/// - `TTRF` (FEAT_TRF), `E2TB` = 0b00 (TRBE): trace filter and trace buffer
///   registers trap (UNDEFINED).
/// - `TDCC` (FEAT_FGT): the debug communications channel traps (RAZ/WI).
/// - `TDE` clear: debug exceptions the guest raises (BRK, software step)
///   are its own and go to its EL1.
#[must_use]
pub fn mdcr_el2(cpu: &CpuIdRegs) -> u64 {
    use mdcr::{HCCD, HPMD, TDA, TDCC, TDOSA, TDRA, TPM, TPMCR, TPMS, TTRF};
    let mut v = TDA | TDOSA | TDRA;
    if cpu.has_pmuv3() {
        v |= (cpu.pmu_counters & 0x1f) | TPM | TPMCR;
    }
    if cpu.has_pmuv3p1() {
        v |= HPMD;
    }
    if cpu.has_pmuv3p5() {
        v |= HCCD;
    }
    if cpu.has_spe() {
        v |= TPMS;
    }
    if cpu.has_trace_filter() {
        v |= TTRF;
    }
    if cpu.has_fgt() {
        v |= TDCC;
    }
    v
}

/// `CPTR_EL2` bits (with `HCR_EL2.E2H` = 0), by name.
pub mod cptr {
    /// The bits that are RES1 whatever the features: \[7:0\], 9, 13, and
    /// 8 (`TZ`) and 12 (`TSM`), which trap when set and are RES1 without
    /// SVE / SME.
    pub const RES1_AND_TZ_TSM: u64 = 0x33ff;
    /// Trap FP/SIMD.
    pub const TFP: u64 = 1 << 10;
    /// Trap trace registers.
    pub const TTA: u64 = 1 << 20;
    /// Trap activity monitor registers.
    pub const TAM: u64 = 1 << 30;
    /// Trap `CPACR_EL1`.
    pub const TCPAC: u64 = 1 << 31;
}

/// `CPTR_EL2` while a guest runs:
/// - `TZ`, `TSM`: SVE and SME trap (UNDEFINED): their state (Z/P/ZA
///   registers, vector length) is not context-switched, and they are hidden.
/// - `TTA`: trace registers trap (UNDEFINED).
/// - `TAM` (AMU): activity monitors trap (UNDEFINED): they count across
///   every context on the CPU.
/// - `TFP` clear: FP/SIMD is the guest's; EL2 is built softfloat and never
///   touches those registers.
/// - `TCPAC` clear: `CPACR_EL1` is the guest's (it only governs EL1/EL0).
#[must_use]
pub fn cptr_el2(cpu: &CpuIdRegs) -> u64 {
    let mut v = cptr::RES1_AND_TZ_TSM | cptr::TTA;
    if cpu.has_amu() {
        v |= cptr::TAM;
    }
    v
}

/// `HCRX_EL2` (FEAT_HCX) while a guest runs: 0. Every enable stays off, so
/// each feature it gates traps or is UNDEFINED for the guest: `EnAS0`,
/// `EnALS`, `EnASR` (LS64), `MSCEn` (memory copy and set), `TCR2En`,
/// `SCTLR2En`, `PTTWI`, `D128En`, `GCSEn`, `EnFPM`, `EnIDCP128`, the NMI
/// controls (`TALLINT` clear: `ALLINT` is the guest's only with FEAT_NMI,
/// which is hidden), `SMPME`, `FnXS`/`FGTnXS` (XS TLBIs behave as the
/// non-XS ones), `CMOW`, `MCE2`, `EnSNERR`, `EnSDERR`, `TMEA`.
pub const HCRX_EL2: u64 = 0;

/// The fine-grained trap registers (FEAT_FGT, and FGT2) while a guest runs:
/// all 0. The coarse traps above decide; where a fine-grained bit is an
/// `n...` bit (0 = trap) the register it guards belongs to a hidden feature
/// (SME's `TPIDR2_EL0`/`SMPRI_EL1`, LS64's `ACCDATA_EL1`, permission
/// indirection, permission overlays), so trapping it (UNDEFINED) is right.
pub const FGT_EL2: u64 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 7.2 `-cpu max` as the hypervisor read it at EL2 (`--log
    /// debug` prints it): SVE, SME, RAS, PAuth, LOR, HCX, S2FWB, TTL,
    /// PMUv3p5 with 6 counters; no FGT, AMU, SPE, TRBE, TRF, MPAM or MTE.
    fn qemu_max() -> CpuIdRegs {
        CpuIdRegs {
            pfr0: 0x1201_0011_2111_0222,
            pfr1: 0x0100_0021,
            dfr0: 0x1030_5609,
            isar1: 0x0011_1111_0121_1012,
            isar2: 0,
            mmfr0: 0x0000_0323_1020_1126,
            mmfr1: 0x0000_0110_1021_1122,
            mmfr2: 0x1021_0110_1001_1011,
            pmu_counters: 6,
        }
    }

    #[test]
    fn hcr_traps_what_the_guest_must_not_own() {
        let cpu = qemu_max();
        let v = hcr_el2(&cpu);
        for (bit, name) in [
            (hcr::VM, "VM"),
            (hcr::IMO | hcr::FMO | hcr::AMO, "IMO/FMO/AMO"),
            (hcr::TSC, "TSC"),
            (hcr::TID3, "TID3"),
            (hcr::TSW, "TSW"),
            (hcr::TACR, "TACR"),
            (hcr::TIDCP, "TIDCP"),
            (hcr::RW, "RW"),
            (hcr::TLOR, "TLOR"),
            (hcr::TERR, "TERR"),
            (hcr::TEA, "TEA"),
            (hcr::API | hcr::APK, "API/APK"),
        ] {
            assert_eq!(v & bit, bit, "{name} not set in {v:#x}");
        }
        // E2H, TGE, TVM, TTLB, FWB stay clear.
        for bit in [34, 27, 26, 25, 46] {
            assert_eq!(v & (1 << bit), 0, "bit {bit} set in {v:#x}");
        }
        // Without RAS, LOR, PAuth, the bits that are RES0 then stay clear.
        let bare = CpuIdRegs::default();
        let v = hcr_el2(&bare);
        assert_eq!(
            v & (hcr::TLOR | hcr::TERR | hcr::TEA | hcr::API | hcr::TID5),
            0
        );
        let mte = CpuIdRegs {
            pfr1: 2 << 8,
            ..CpuIdRegs::default()
        };
        assert_ne!(hcr_el2(&mte) & hcr::TID5, 0);
    }

    #[test]
    fn mdcr_traps_pmu_debug_trace_and_profiling() {
        let v = mdcr_el2(&qemu_max());
        assert_eq!(v & 0x1f, 6, "HPMN = PMCR_EL0.N");
        for bit in [mdcr::TPM, mdcr::TPMCR, mdcr::TDA, mdcr::TDOSA, mdcr::TDRA] {
            assert_ne!(v & bit, 0, "{bit:#x} in {v:#x}");
        }
        assert_ne!(v & mdcr::HPMD, 0);
        assert_ne!(v & mdcr::HCCD, 0);
        assert_eq!(
            v & (mdcr::TTRF | mdcr::TPMS | mdcr::TDCC),
            0,
            "no TRF, SPE, FGT"
        );
        // TDE clear, E2PB and E2TB = 0b00 (EL1 accesses trap).
        assert_eq!(v & ((1 << 8) | (3 << 12) | (3 << 24)), 0);
        // No PMU: HPMN and the PMU traps are left out (RES0 bits stay 0).
        let none = mdcr_el2(&CpuIdRegs::default());
        assert_eq!(none, mdcr::TDA | mdcr::TDOSA | mdcr::TDRA);
        let spe_fgt = CpuIdRegs {
            dfr0: (1 << 32) | (1 << 40),
            mmfr0: 1 << 56,
            ..CpuIdRegs::default()
        };
        let v = mdcr_el2(&spe_fgt);
        assert_ne!(v & mdcr::TPMS, 0);
        assert_ne!(v & mdcr::TDCC, 0);
        assert_ne!(v & mdcr::TTRF, 0);
    }

    #[test]
    fn cptr_traps_sve_sme_trace_and_amu_not_fp() {
        let v = cptr_el2(&qemu_max());
        assert_ne!(v & (1 << 8), 0, "TZ");
        assert_ne!(v & (1 << 12), 0, "TSM");
        assert_ne!(v & cptr::TTA, 0);
        assert_eq!(v & cptr::TFP, 0, "FP/SIMD is the guest's");
        assert_eq!(v & cptr::TCPAC, 0);
        assert_eq!(v & cptr::TAM, 0, "no AMU: RES0");
        let amu = CpuIdRegs {
            pfr0: 1 << 44,
            ..CpuIdRegs::default()
        };
        assert_ne!(cptr_el2(&amu) & cptr::TAM, 0);
    }

    #[test]
    fn feature_fields() {
        let cpu = qemu_max();
        assert!(cpu.has_sve() && cpu.has_sme() && cpu.has_ras() && cpu.has_pauth());
        assert!(cpu.has_lor() && cpu.has_hcx() && !cpu.has_fgt() && !cpu.has_amu());
        assert!(cpu.has_pmuv3p5() && !cpu.has_spe() && !cpu.has_trbe());
        assert!(cpu.has_fwb() && !cpu.has_mpam());
        let imp_def_pmu = CpuIdRegs {
            dfr0: 0xf << 8,
            ..CpuIdRegs::default()
        };
        assert!(!imp_def_pmu.has_pmuv3());
    }
}
