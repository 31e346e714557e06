//! SGI generation: decoding the guest's trapped `ICC_SGI1R_EL1`,
//! `ICC_ASGI1R_EL1` and `ICC_SGI0R_EL1` writes.
//!
//! With `HCR_EL2.IMO` set (needed for virtual interrupts at all), EL1
//! writes to these registers trap to EL2 as `MSR` (EC 0x18), whatever
//! `ICH_HCR_EL2.TC` says: the architecture's access pseudocode and QEMU
//! (`gicv3_sgi_access` in `hw/intc/arm_gicv3_cpuif.c`: `IMO` or `FMO` set
//! at EL1 gives `CP_ACCESS_TRAP_EL2`) agree. So the guest never reaches the
//! physical GIC's SGI logic, and `TC` (which would also trap `ICC_DIR`,
//! `ICC_PMR`, `ICC_RPR` and `ICC_CTLR`, all handled by the virtual interface
//! in hardware) stays clear.

/// Which SGI register a trapped `MSR` wrote.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum SgiRegister {
    /// `ICC_SGI1R_EL1`: SGIs of either group, as each SGI is configured
    /// (one security state).
    Sgi1r,
    /// `ICC_ASGI1R_EL1`: with one security state there is no other group
    /// 1, so like `ICC_SGI0R_EL1` (as KVM treats it).
    Asgi1r,
    /// `ICC_SGI0R_EL1`: group-0 SGIs only.
    Sgi0r,
}

impl SgiRegister {
    /// Whether a write may generate an SGI that is configured group 1.
    #[must_use]
    pub fn allows_group1(self) -> bool {
        self == Self::Sgi1r
    }
}

/// A trapped access to an SGI register, from the syndrome of an EC 0x18
/// trap.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct SgiTrap {
    /// The register.
    pub register: SgiRegister,
    /// The general-purpose register written from (31: `xzr`).
    pub rt: u8,
    /// An `MRS`: these registers are write-only, so the caller answers it
    /// as an undefined instruction.
    pub read: bool,
}

impl SgiTrap {
    /// Decodes `ESR_EL2.ISS` of a trapped `MSR`/`MRS` (EC 0x18): `Op0`
    /// \[21:20\], `Op2` \[19:17\], `Op1` \[16:14\], `CRn` \[13:10\], `Rt`
    /// \[9:5\], `CRm` \[4:1\], `Direction` \[0\] (1 = read). `None` for any
    /// other register.
    #[must_use]
    pub fn decode(iss: u32) -> Option<Self> {
        let op0 = (iss >> 20) & 3;
        let op2 = (iss >> 17) & 7;
        let op1 = (iss >> 14) & 7;
        let crn = (iss >> 10) & 0xf;
        let crm = (iss >> 1) & 0xf;
        // S3_0_C12_C11_{5,6,7}.
        if (op0, op1, crn, crm) != (3, 0, 12, 11) {
            return None;
        }
        let register = match op2 {
            5 => SgiRegister::Sgi1r,
            6 => SgiRegister::Asgi1r,
            7 => SgiRegister::Sgi0r,
            _ => return None,
        };
        Some(Self {
            register,
            rt: ((iss >> 5) & 0x1f) as u8,
            read: iss & 1 == 1,
        })
    }
}

/// The targets of an SGI.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum SgiTargets {
    /// `IRM` = 1: every PE but the sender.
    AllButSelf,
    /// `IRM` = 0: the PEs `Aff3.Aff2.Aff1.<16 * RS + n>` for each bit n of
    /// the target list.
    List {
        /// `Aff3.Aff2.Aff1` in bits \[31:8\], as in a packed affinity.
        aff321: u32,
        /// Range selector: which 16 `Aff0` values the list covers.
        range: u8,
        /// One bit per `Aff0` in the range.
        target_list: u16,
    },
}

/// A decoded `ICC_SGI1R_EL1` (or `ASGI1R`/`SGI0R`; same layout) value.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct SgiRequest {
    /// The SGI, 0..=15.
    pub intid: u32,
    /// Who receives it.
    pub targets: SgiTargets,
}

impl SgiRequest {
    /// Decodes the value written: `TargetList` \[15:0\], `Aff1` \[23:16\],
    /// `INTID` \[27:24\], `Aff2` \[39:32\], `IRM` \[40\], `RS` \[47:44\],
    /// `Aff3` \[55:48\].
    #[must_use]
    pub fn decode(value: u64) -> Self {
        let field = |shift: u32, bits: u32| ((value >> shift) & ((1 << bits) - 1)) as u32;
        let targets = if field(40, 1) == 1 {
            SgiTargets::AllButSelf
        } else {
            SgiTargets::List {
                aff321: field(48, 8) << 24 | field(32, 8) << 16 | field(16, 8) << 8,
                range: field(44, 4) as u8,
                target_list: field(0, 16) as u16,
            }
        };
        Self {
            intid: field(24, 4),
            targets,
        }
    }

    /// Whether the PE with packed affinity `Aff3.Aff2.Aff1.Aff0` receives
    /// the SGI that the PE with affinity `sender` sent.
    #[must_use]
    pub fn targets(&self, affinity: u32, sender: u32) -> bool {
        match self.targets {
            SgiTargets::AllButSelf => affinity != sender,
            SgiTargets::List {
                aff321,
                range,
                target_list,
            } => {
                let aff0 = affinity & 0xff;
                let first = 16 * u32::from(range);
                affinity & !0xff == aff321
                    && (first..first + 16).contains(&aff0)
                    && target_list >> (aff0 - first) & 1 == 1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ISS of `MSR ICC_SGI1R_EL1, x<rt>` (or another op2).
    pub(crate) fn msr_iss(op2: u32, rt: u32) -> u32 {
        3 << 20 | op2 << 17 | 12 << 10 | rt << 5 | 11 << 1
    }

    #[test]
    fn decodes_the_trapped_sgi_registers_only() {
        assert_eq!(
            SgiTrap::decode(msr_iss(5, 3)),
            Some(SgiTrap {
                register: SgiRegister::Sgi1r,
                rt: 3,
                read: false
            })
        );
        assert_eq!(
            SgiTrap::decode(msr_iss(7, 31) | 1).map(|t| (t.register, t.read)),
            Some((SgiRegister::Sgi0r, true))
        );
        assert_eq!(
            SgiTrap::decode(msr_iss(6, 0)).map(|t| t.register),
            Some(SgiRegister::Asgi1r)
        );
        // ICC_DIR_EL1 is S3_0_C12_C11_1: not an SGI register.
        assert_eq!(SgiTrap::decode(msr_iss(1, 0)), None);
        // ICC_PMR_EL1 (S3_0_C4_C6_0).
        assert_eq!(SgiTrap::decode(3 << 20 | 4 << 10 | 6 << 1), None);
    }

    #[test]
    fn decodes_target_lists_and_affinity_fields() {
        // SGI 9 to Aff3.Aff2.Aff1 = 4.3.2, Aff0 in {1, 3} + 16 * 1.
        let value = 4 << 48 | 1 << 44 | 3 << 32 | 9 << 24 | 2 << 16 | 0b1010;
        let req = SgiRequest::decode(value);
        assert_eq!(req.intid, 9);
        let aff = |aff0: u32| 0x0403_0200 | aff0;
        assert!(req.targets(aff(17), 0));
        assert!(req.targets(aff(19), 0));
        assert!(!req.targets(aff(18), 0));
        assert!(!req.targets(aff(1), 0), "range selector 1: Aff0 16..31");
        assert!(!req.targets(0x0403_0311, 0), "other Aff1");
    }

    #[test]
    fn irm_targets_everyone_but_the_sender() {
        let req = SgiRequest::decode(1 << 40 | 2 << 24 | 0xffff);
        assert_eq!(req.targets, SgiTargets::AllButSelf);
        assert!(req.targets(1, 0));
        assert!(!req.targets(0, 0));
    }
}
