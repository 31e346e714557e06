//! Emulation of the guest's trapped system register accesses (`ESR_EL2.EC`
//! = 0x18): the sanitised ID register view, storage-free debug registers,
//! set/way cache maintenance, and UNDEFINED for everything else.
//!
//! Which accesses trap is decided by [`crate::el2_controls`]; this module
//! decides what each trapped access does. Portable: the aarch64 side reads
//! the real ID register a [`SysregAction::IdRead`] names, and performs the
//! cache maintenance a [`SysregAction::SetWay`] asks for.

/// A decoded MSR/MRS/SYS access (the ISS of EC 0x18).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct SysregAccess {
    /// `Op0`.
    pub op0: u8,
    /// `Op1`.
    pub op1: u8,
    /// `CRn`.
    pub crn: u8,
    /// `CRm`.
    pub crm: u8,
    /// `Op2`.
    pub op2: u8,
    /// The general-purpose register (31: the zero register).
    pub rt: u8,
    /// An MRS (read); else an MSR or SYS (write).
    pub read: bool,
}

impl SysregAccess {
    /// Decodes the ISS of a trapped MSR, MRS or system instruction.
    #[must_use]
    pub const fn decode(iss: u32) -> Self {
        Self {
            op0: ((iss >> 20) & 3) as u8,
            op2: ((iss >> 17) & 7) as u8,
            op1: ((iss >> 14) & 7) as u8,
            crn: ((iss >> 10) & 0xf) as u8,
            rt: ((iss >> 5) & 0x1f) as u8,
            crm: ((iss >> 1) & 0xf) as u8,
            read: iss & 1 != 0,
        }
    }

    /// The encoding as (op0, op1, CRn, CRm, op2).
    #[must_use]
    pub const fn encoding(&self) -> (u8, u8, u8, u8, u8) {
        (self.op0, self.op1, self.crn, self.crm, self.op2)
    }
}

/// What to do with a trapped access.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum SysregAction {
    /// A read of the ID register `S3_0_C0_C<crm>_<op2>`: the caller reads
    /// the real one and returns [`sanitise_id`] of it in `rt`.
    IdRead {
        /// `CRm` (1..=7).
        crm: u8,
        /// `Op2`.
        op2: u8,
    },
    /// A read that returns this value (RAZ: 0).
    ReadValue(u64),
    /// A write that is ignored.
    WriteIgnored,
    /// Data cache maintenance by set/way: the caller cleans and invalidates
    /// the guest's memory to the point of coherency by address.
    SetWay,
    /// A write to a stage-1 "virtual memory" register, trapped while
    /// `HCR_EL2.TVM` is set (to watch the guest's cache state around
    /// set/way maintenance): the caller performs it on the real register.
    VmRegisterWrite(VmRegister),
    /// Inject UNDEFINED.
    Undefined,
}

/// The EL1 registers `HCR_EL2.TVM` traps writes to.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum VmRegister {
    /// `SCTLR_EL1`.
    Sctlr,
    /// `TTBR0_EL1`.
    Ttbr0,
    /// `TTBR1_EL1`.
    Ttbr1,
    /// `TCR_EL1`.
    Tcr,
    /// `ESR_EL1`.
    Esr,
    /// `FAR_EL1`.
    Far,
    /// `AFSR0_EL1`.
    Afsr0,
    /// `AFSR1_EL1`.
    Afsr1,
    /// `MAIR_EL1`.
    Mair,
    /// `AMAIR_EL1`.
    Amair,
    /// `CONTEXTIDR_EL1`.
    Contextidr,
}

impl VmRegister {
    /// The register with encoding (op0, op1, CRn, CRm, op2), if it is one.
    #[must_use]
    pub const fn from_encoding(e: (u8, u8, u8, u8, u8)) -> Option<Self> {
        Some(match e {
            (3, 0, 1, 0, 0) => Self::Sctlr,
            (3, 0, 2, 0, 0) => Self::Ttbr0,
            (3, 0, 2, 0, 1) => Self::Ttbr1,
            (3, 0, 2, 0, 2) => Self::Tcr,
            (3, 0, 5, 2, 0) => Self::Esr,
            (3, 0, 6, 0, 0) => Self::Far,
            (3, 0, 5, 1, 0) => Self::Afsr0,
            (3, 0, 5, 1, 1) => Self::Afsr1,
            (3, 0, 10, 2, 0) => Self::Mair,
            (3, 0, 10, 3, 0) => Self::Amair,
            (3, 0, 13, 0, 1) => Self::Contextidr,
            _ => return None,
        })
    }
}

/// `OSLSR_EL1` as read by the guest: OSLM = 0b10 (the OS lock is
/// implemented), unlocked.
pub const OSLSR_EL1_VALUE: u64 = 0b1000;

/// `ICC_SRE_EL1` as read by the guest: `SRE`, `DFB`, `DIB` set (system
/// register interface, FIQ and IRQ bypass disabled), as KVM emulates it.
pub const ICC_SRE_EL1_VALUE: u64 = 0b111;

/// Decides what a trapped access does.
///
/// - The ID space (op0 3, op1 0, CRn 0, CRm 1..=7), trapped by
///   `HCR_EL2.TID3`: reads get the sanitised view; writes are UNDEFINED.
/// - Debug registers (op0 2, op1 0 or 3: `DBGB*`, `DBGW*`, `MDSCR_EL1`,
///   `OSLAR_EL1`, `OSDLR_EL1`, `DBGPRCR_EL1`, the claim tags, the debug
///   communications channel, `MDRAR_EL1`), trapped by `MDCR_EL2.TDA`,
///   `TDOSA`, `TDRA`, `TDCC`: RAZ/WI, except `OSLSR_EL1`. No breakpoint,
///   watchpoint or single-step control ever reaches the physical CPU, and a
///   guest that probes them (Linux clears the OS lock and resets the
///   breakpoints at boot) runs on.
/// - `DC ISW`, `DC CSW`, `DC CISW` (and the MTE tag forms), trapped by
///   `HCR_EL2.TSW`: [`SysregAction::SetWay`].
/// - Writes to the stage-1 registers `HCR_EL2.TVM` traps (`SCTLR_EL1`,
///   `TTBR0/1_EL1`, `TCR_EL1`, `ESR_EL1`, `FAR_EL1`, `AFSR0/1_EL1`,
///   `MAIR_EL1`, `AMAIR_EL1`, `CONTEXTIDR_EL1`), set only while the
///   hypervisor watches the guest's cache state after a set/way operation:
///   [`SysregAction::VmRegisterWrite`], performed as written.
/// - Everything else (PMU, trace, SPE, TRBE, AMU, RAS error records, MTE,
///   LORegions, SME, `ACTLR_EL1`, implementation-defined registers, ...):
///   UNDEFINED, as the architecture makes them for a CPU without the
///   feature, which is what the ID view says this one is.
#[must_use]
pub fn classify(a: &SysregAccess) -> SysregAction {
    if !a.read
        && let Some(r) = VmRegister::from_encoding(a.encoding())
    {
        return SysregAction::VmRegisterWrite(r);
    }
    match a.encoding() {
        (3, 0, 0, crm @ 1..=7, op2) => {
            if a.read {
                SysregAction::IdRead { crm, op2 }
            } else {
                SysregAction::Undefined
            }
        }
        // OSLSR_EL1.
        (2, 0, 1, 1, 4) if a.read => SysregAction::ReadValue(OSLSR_EL1_VALUE),
        // ICC_SRE_EL1 (ICC_SRE_EL2.Enable is clear): the system register
        // interface is on and stays on.
        (3, 0, 12, 12, 5) => {
            if a.read {
                SysregAction::ReadValue(ICC_SRE_EL1_VALUE)
            } else {
                SysregAction::WriteIgnored
            }
        }
        // Debug (op1 0) and the debug communications channel (op1 3).
        (2, 0 | 3, _, _, _) => {
            if a.read {
                SysregAction::ReadValue(0)
            } else {
                SysregAction::WriteIgnored
            }
        }
        // DC ISW/IGSW/IGDSW (CRm 6), CSW/CGSW/CGDSW (10), CISW/CIGSW/CIGDSW (14).
        (1, 0, 7, 6 | 10 | 14, 2 | 4 | 6) if !a.read => SysregAction::SetWay,
        _ => SysregAction::Undefined,
    }
}

/// Keeps the 4-bit fields at `shifts` of `value`, zeroes the rest (an
/// allowlist: a field this code does not know is hidden).
const fn keep(value: u64, shifts: &[u32]) -> u64 {
    let mut out = 0;
    let mut i = 0;
    while i < shifts.len() {
        out |= value & (0xf << shifts[i]);
        i += 1;
    }
    out
}

/// Zeroes the 4-bit fields at `shifts` of `value` (a denylist: for the
/// AArch32 views and the registers whose every other field is safe).
const fn clear(value: u64, shifts: &[u32]) -> u64 {
    let mut out = value;
    let mut i = 0;
    while i < shifts.len() {
        out &= !(0xf << shifts[i]);
        i += 1;
    }
    out
}

/// Caps the 4-bit field at `shift` to `max`.
const fn cap(value: u64, shift: u32, max: u64) -> u64 {
    if (value >> shift) & 0xf > max {
        (value & !(0xf << shift)) | (max << shift)
    } else {
        value
    }
}

/// The guest's view of ID register `S3_0_C0_C<crm>_<op2>` whose real value
/// is `real`: every feature whose state the hypervisor does not
/// context-switch or virtualise is hidden (as KVM's sanitised view):
/// SVE, SME, MTE, the PMU, SPE, trace and TRBE, AMU, RAS, MPAM, LORegions,
/// transactional memory, LS64, memory copy/set (MOPS), the 128-bit system
/// registers, EL2 itself and its features (nested virtualisation, FGT,
/// HCX, forced write-back, VHE). Debug stays visible (its registers are
/// emulated RAZ/WI). Registers this function does not know read as zero.
#[must_use]
pub const fn sanitise_id(crm: u8, op2: u8, real: u64) -> u64 {
    match (crm, op2) {
        // ID_PFR0_EL1: AMU [23:20], RAS [31:28] hidden.
        (1, 0) => clear(real, &[20, 28]),
        // ID_DFR0_EL1: CopTrc [15:12], MMapTrc [19:16], PerfMon [27:24],
        // TraceFilt [31:28] hidden.
        (1, 2) => clear(real, &[12, 16, 24, 28]),
        // The other AArch32 ID registers (ID_PFR1, ID_AFR0, ID_MMFR0-3,
        // ID_ISAR0-6, ID_MMFR4, MVFR0-2, ID_MMFR5): instruction set and
        // memory model facts for AArch32 EL0.
        (1, 1 | 3..=7) | (2, 0..=7) | (3, 0..=2 | 6) => real,
        // ID_PFR2_EL1: RAS_frac [11:8] hidden; CSV3 [3:0], SSBS [7:4] kept.
        (3, 4) => keep(real, &[0, 4]),
        // ID_AA64PFR0_EL1: EL0 [3:0], EL1 [7:4], EL3 [15:12], FP [19:16],
        // AdvSIMD [23:20], GIC [27:24], DIT [51:48], CSV2 [59:56], CSV3
        // [63:60]. Hidden: EL2 [11:8], RAS, SVE, SEL2, MPAM, AMU, RME.
        (4, 0) => keep(real, &[0, 4, 12, 16, 20, 24, 48, 56, 60]),
        // ID_AA64PFR1_EL1: BT [3:0], SSBS [7:4], CSV2_frac [35:32]. Hidden:
        // MTE, RAS_frac, MPAM_frac, SME, RNDR_trap, NMI, GCS, and the rest.
        (4, 1) => keep(real, &[0, 4, 32]),
        // ID_AA64DFR0_EL1: DebugVer [3:0], BRPs [15:12], WRPs [23:20],
        // CTX_CMPs [31:28], DoubleLock [39:36]. Hidden: TraceVer, PMUVer,
        // PMSVer, TraceFilt, TraceBuffer, MTPMU, BRBE, HPMN0, ...
        (5, 0) => keep(real, &[0, 12, 20, 28, 36]),
        // ID_AA64ISAR0_EL1: all but TME [27:24].
        (6, 0) => clear(real, &[24]),
        // ID_AA64ISAR1_EL1: all but LS64 [63:60] (its enables in HCRX_EL2
        // are off).
        (6, 1) => clear(real, &[60]),
        // ID_AA64ISAR2_EL1: WFxT [3:0], RPRES [7:4], GPA3 [11:8], APA3
        // [15:12], BC [23:20], PAC_frac [27:24], CLRBHB [31:28], RPRFM
        // [51:48], CSSC [55:52]. Hidden: MOPS, SYSREG_128, SYSINSTR_128,
        // PRFMSLC, ATS1A, LUT, ...
        (6, 2) => keep(real, &[0, 4, 8, 12, 20, 24, 28, 48, 52]),
        // ID_AA64MMFR0_EL1: all but FGT [59:56]; ECV [63:60] capped at 1
        // (CNTPOFF is an EL2 control).
        (7, 0) => cap(clear(real, &[56]), 60, 1),
        // ID_AA64MMFR1_EL1: HAFDBS [3:0], VMIDBits [7:4], HPDS [15:12], PAN
        // [23:20], SpecSEI [27:24], XNX [31:28], ETS [39:36], AFP [47:44],
        // nTLBPA [51:48], ECBHB [63:60]. Hidden: VH, LO, TWED, HCX,
        // TIDCP1, CMOW, ...
        (7, 1) => keep(real, &[0, 4, 12, 20, 24, 28, 36, 44, 48, 60]),
        // ID_AA64MMFR2_EL1: all but NV [27:24], FWB [43:40], EVT [59:56].
        (7, 2) => clear(real, &[24, 40, 56]),
        // ID_AA64ZFR0 (SVE), ID_AA64SMFR0 (SME), ID_AA64FPFR0, ID_AA64PFR2,
        // ID_AA64DFR1/2, ID_AA64AFR0/1, ID_AA64ISAR3, ID_AA64MMFR3/4, ID_DFR1,
        // and every reserved encoding: zero.
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ISS of an access, as the CPU encodes it.
    fn iss(op0: u32, op1: u32, crn: u32, crm: u32, op2: u32, rt: u32, read: bool) -> u32 {
        (op0 << 20)
            | (op2 << 17)
            | (op1 << 14)
            | (crn << 10)
            | (rt << 5)
            | (crm << 1)
            | u32::from(read)
    }

    fn action(op0: u32, op1: u32, crn: u32, crm: u32, op2: u32, read: bool) -> SysregAction {
        classify(&SysregAccess::decode(iss(op0, op1, crn, crm, op2, 7, read)))
    }

    #[test]
    fn decode_round_trips() {
        let a = SysregAccess::decode(iss(3, 0, 0, 4, 1, 12, true));
        assert_eq!(
            a,
            SysregAccess {
                op0: 3,
                op1: 0,
                crn: 0,
                crm: 4,
                op2: 1,
                rt: 12,
                read: true
            }
        );
        let w = SysregAccess::decode(iss(1, 0, 7, 14, 2, 31, false));
        assert_eq!((w.encoding(), w.rt, w.read), ((1, 0, 7, 14, 2), 31, false));
    }

    #[test]
    fn id_space_reads_are_sanitised_writes_undefined() {
        // ID_AA64PFR0_EL1.
        assert_eq!(
            action(3, 0, 0, 4, 0, true),
            SysregAction::IdRead { crm: 4, op2: 0 }
        );
        assert_eq!(action(3, 0, 0, 4, 0, false), SysregAction::Undefined);
        // MIDR_EL1 (CRm 0) is not in the trapped group: UNDEFINED if it
        // ever came here.
        assert_eq!(action(3, 0, 0, 0, 0, true), SysregAction::Undefined);
    }

    #[test]
    fn debug_registers_are_raz_wi_oslsr_says_lock_implemented() {
        // MDSCR_EL1 = S2_0_C0_C2_2, DBGBCR0_EL1 = S2_0_C0_C0_5,
        // OSLAR_EL1 = S2_0_C1_C0_4, MDCCSR_EL0 = S2_3_C0_C1_0.
        assert_eq!(action(2, 0, 0, 2, 2, true), SysregAction::ReadValue(0));
        assert_eq!(action(2, 0, 0, 2, 2, false), SysregAction::WriteIgnored);
        assert_eq!(action(2, 0, 0, 0, 5, false), SysregAction::WriteIgnored);
        assert_eq!(action(2, 0, 1, 0, 4, false), SysregAction::WriteIgnored);
        assert_eq!(action(2, 3, 0, 1, 0, true), SysregAction::ReadValue(0));
        assert_eq!(
            action(2, 0, 1, 1, 4, true),
            SysregAction::ReadValue(OSLSR_EL1_VALUE)
        );
        // ICC_SRE_EL1 = S3_0_C12_C12_5: reads "on", writes ignored.
        assert_eq!(
            action(3, 0, 12, 12, 5, true),
            SysregAction::ReadValue(ICC_SRE_EL1_VALUE)
        );
        assert_eq!(action(3, 0, 12, 12, 5, false), SysregAction::WriteIgnored);
        // Trace (op1 1) is not debug: UNDEFINED.
        assert_eq!(action(2, 1, 0, 0, 0, true), SysregAction::Undefined);
    }

    #[test]
    fn set_way_ops_are_emulated_everything_else_undefined() {
        for crm in [6, 10, 14] {
            assert_eq!(action(1, 0, 7, crm, 2, false), SysregAction::SetWay);
        }
        // SCTLR_EL1 and MAIR_EL1 writes (trapped by TVM) are performed.
        assert_eq!(
            action(3, 0, 1, 0, 0, false),
            SysregAction::VmRegisterWrite(VmRegister::Sctlr)
        );
        assert_eq!(
            action(3, 0, 10, 2, 0, false),
            SysregAction::VmRegisterWrite(VmRegister::Mair)
        );
        // DC IVAC (CRm 6, op2 1) does not trap; if it came here: UNDEFINED.
        assert_eq!(action(1, 0, 7, 6, 1, false), SysregAction::Undefined);
        // PMCR_EL0 = S3_3_C9_C12_0; ERRIDR_EL1 = S3_0_C5_C3_0;
        // ACTLR_EL1 = S3_0_C1_C0_1; an implementation-defined S3_1_C15_C2_0.
        for (op0, op1, crn, crm, op2) in [
            (3, 3, 9, 12, 0),
            (3, 0, 5, 3, 0),
            (3, 0, 1, 0, 1),
            (3, 1, 15, 2, 0),
        ] {
            assert_eq!(
                action(op0, op1, crn, crm, op2, true),
                SysregAction::Undefined
            );
            assert_eq!(
                action(op0, op1, crn, crm, op2, false),
                SysregAction::Undefined
            );
        }
    }

    #[test]
    fn id_view_hides_what_is_not_virtualised() {
        let all = u64::MAX;
        let pfr0 = sanitise_id(4, 0, all);
        assert_eq!((pfr0 >> 32) & 0xf, 0, "SVE");
        assert_eq!((pfr0 >> 28) & 0xf, 0, "RAS");
        assert_eq!((pfr0 >> 44) & 0xf, 0, "AMU");
        assert_eq!((pfr0 >> 8) & 0xf, 0, "EL2");
        assert_eq!((pfr0 >> 24) & 0xf, 0xf, "GIC kept");
        assert_eq!(pfr0 & 0xff, 0xff, "EL0/EL1 kept");
        let pfr1 = sanitise_id(4, 1, all);
        assert_eq!((pfr1 >> 8) & 0xf, 0, "MTE");
        assert_eq!((pfr1 >> 24) & 0xf, 0, "SME");
        assert_eq!(pfr1 & 0xff, 0xff, "BT, SSBS kept");
        let dfr0 = sanitise_id(5, 0, all);
        assert_eq!((dfr0 >> 8) & 0xf, 0, "PMUVer");
        assert_eq!((dfr0 >> 32) & 0xf, 0, "PMSVer");
        assert_eq!((dfr0 >> 4) & 0xf, 0, "TraceVer");
        assert_eq!((dfr0 >> 44) & 0xf, 0, "TraceBuffer");
        assert_eq!(dfr0 & 0xf, 0xf, "DebugVer kept");
        assert_eq!(sanitise_id(4, 4, all), 0, "ID_AA64ZFR0");
        assert_eq!(sanitise_id(4, 5, all), 0, "ID_AA64SMFR0");
        let mmfr0 = sanitise_id(7, 0, all);
        assert_eq!((mmfr0 >> 56) & 0xf, 0, "FGT");
        assert_eq!(mmfr0 >> 60, 1, "ECV capped");
        assert_eq!(mmfr0 & 0xf, 0xf, "PARange kept");
        let mmfr1 = sanitise_id(7, 1, all);
        assert_eq!((mmfr1 >> 16) & 0xf, 0, "LO");
        assert_eq!((mmfr1 >> 8) & 0xf, 0, "VH");
        assert_eq!((mmfr1 >> 40) & 0xf, 0, "HCX");
        let mmfr2 = sanitise_id(7, 2, all);
        assert_eq!((mmfr2 >> 24) & 0xf, 0, "NV");
        assert_eq!((mmfr2 >> 40) & 0xf, 0, "FWB");
        assert_eq!(sanitise_id(6, 0, all) >> 24 & 0xf, 0, "TME");
        assert_eq!(sanitise_id(6, 1, all) >> 60, 0, "LS64");
        assert_eq!(sanitise_id(6, 2, all) >> 16 & 0xf, 0, "MOPS");
        let dfr0_32 = sanitise_id(1, 2, all);
        assert_eq!((dfr0_32 >> 24) & 0xf, 0, "AArch32 PerfMon");
        assert_eq!(sanitise_id(3, 0, 0x1234), 0x1234, "MVFR0 kept");
        // An ECV of 1 is kept as is.
        assert_eq!(sanitise_id(7, 0, 1 << 60), 1 << 60);
        // Reserved encodings read as zero.
        assert_eq!(sanitise_id(5, 7, all), 0);
        assert_eq!(sanitise_id(3, 7, all), 0);
    }
}
