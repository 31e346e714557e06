//! The GICv3 virtual CPU interface control registers (`ICH_*_EL2`) behind a
//! trait: the aarch64 layer implements it with `mrs`/`msr`, host tests with
//! `FakeCpuInterface` (test builds only), which models the parts of the
//! hardware the world switch relies on (list register states, the
//! maintenance conditions).

/// `ICH_HCR_EL2` fields.
pub mod hcr {
    /// `En`: the virtual CPU interface is enabled.
    pub const EN: u64 = 1 << 0;
    /// `UIE`: maintenance interrupt while at most one list register holds
    /// a valid interrupt (underflow).
    pub const UIE: u64 = 1 << 1;
    /// `LRENPIE`: maintenance interrupt while `EOIcount` is not zero.
    pub const LRENPIE: u64 = 1 << 2;
    /// `NPIE`: maintenance interrupt while no list register is pending.
    pub const NPIE: u64 = 1 << 3;
    /// `TC`: trap the guest's accesses to the common registers (`ICC_DIR`,
    /// `ICC_PMR`, ...): not needed, SGI generation traps through
    /// `HCR_EL2.IMO` (see the module documentation of `vgic`).
    pub const TC: u64 = 1 << 10;
    /// `EOIcount`, bits \[31:27\]: EOIs the guest did for interrupts in no
    /// list register.
    pub const EOICOUNT_SHIFT: u32 = 27;
}

/// `ICH_LR<n>_EL2` fields.
pub mod lr {
    /// `vINTID`, bits \[31:0\].
    pub const VINTID_MASK: u64 = 0xffff_ffff;
    /// `pINTID`, bits \[41:32\] (with `HW`).
    pub const PINTID_SHIFT: u32 = 32;
    /// `EOI`, bit 41 (without `HW`): maintenance interrupt on deactivation.
    pub const EOI: u64 = 1 << 41;
    /// `Priority`, bits \[55:48\].
    pub const PRIORITY_SHIFT: u32 = 48;
    /// `Group`: group 1.
    pub const GROUP1: u64 = 1 << 60;
    /// `HW`: backed by a physical interrupt, deactivated with it.
    pub const HW: u64 = 1 << 61;
    /// `State`, bits \[63:62\]: pending.
    pub const PENDING: u64 = 1 << 62;
    /// `State`: active.
    pub const ACTIVE: u64 = 1 << 63;
}

/// `ICH_MISR_EL2` fields (which maintenance condition fired).
pub mod misr {
    /// An EOI maintenance interrupt (some `ICH_EISR_EL2` bit).
    pub const EOI: u64 = 1 << 0;
    /// Underflow (`UIE`).
    pub const U: u64 = 1 << 1;
    /// `EOIcount` not zero (`LRENPIE`).
    pub const LRENP: u64 = 1 << 2;
    /// No pending (`NPIE`).
    pub const NP: u64 = 1 << 3;
}

/// What `ICH_VTR_EL2` tells about the virtual CPU interface.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Vtr {
    /// Number of list registers (`ListRegs` + 1).
    pub list_regs: usize,
    /// Virtual priority bits (`PRIbits` + 1).
    pub pri_bits: u32,
    /// Virtual preemption bits (`PREbits` + 1), which size the active
    /// priority registers.
    pub pre_bits: u32,
}

impl Vtr {
    /// Decodes `ICH_VTR_EL2`.
    #[must_use]
    pub fn decode(vtr: u64) -> Self {
        Self {
            list_regs: (vtr & 0x1f) as usize + 1,
            pri_bits: ((vtr >> 29) & 7) as u32 + 1,
            pre_bits: ((vtr >> 26) & 7) as u32 + 1,
        }
    }

    /// How many `ICH_AP0R<n>`/`ICH_AP1R<n>` registers exist: one 32-bit
    /// register per 32 preemption levels (5 bits: 1, 6: 2, 7: 4).
    #[must_use]
    pub fn apr_count(self) -> usize {
        1 << self.pre_bits.clamp(5, 7).saturating_sub(5)
    }

    /// The implemented bits of an 8-bit priority.
    #[must_use]
    pub fn priority_mask(self) -> u8 {
        0xffu8 << (8 - self.pri_bits.clamp(1, 8))
    }
}

/// The `ICH_*_EL2` registers of the physical CPU a vCPU runs on.
pub trait CpuInterface {
    /// `ICH_VTR_EL2`.
    fn vtr(&self) -> u64;
    /// `ICH_HCR_EL2`.
    fn hcr(&self) -> u64;
    /// Writes `ICH_HCR_EL2`.
    fn set_hcr(&mut self, value: u64);
    /// `ICH_VMCR_EL2`: the guest's `ICC_PMR`, `ICC_BPR*`, `ICC_IGRPEN*`,
    /// `ICC_CTLR.EOImode` as the virtual interface keeps them.
    fn vmcr(&self) -> u64;
    /// Writes `ICH_VMCR_EL2`.
    fn set_vmcr(&mut self, value: u64);
    /// `ICH_LR<n>_EL2`.
    fn lr(&self, n: usize) -> u64;
    /// Writes `ICH_LR<n>_EL2`.
    fn set_lr(&mut self, n: usize, value: u64);
    /// `ICH_AP0R<n>_EL2` (group 0 active priorities).
    fn ap0r(&self, n: usize) -> u32;
    /// Writes `ICH_AP0R<n>_EL2`.
    fn set_ap0r(&mut self, n: usize, value: u32);
    /// `ICH_AP1R<n>_EL2` (group 1 active priorities).
    fn ap1r(&self, n: usize) -> u32;
    /// Writes `ICH_AP1R<n>_EL2`.
    fn set_ap1r(&mut self, n: usize, value: u32);
    /// `ICH_MISR_EL2`: the maintenance conditions now true.
    fn misr(&self) -> u64;
}

/// A virtual CPU interface in memory, for host tests: list registers,
/// control registers, and the guest's actions on them (acknowledge, EOI)
/// with the hardware's effects on the list registers and `ICH_MISR_EL2`.
#[cfg(test)]
#[derive(Clone, Debug)]
pub struct FakeCpuInterface {
    /// `ICH_VTR_EL2`.
    pub vtr: u64,
    /// `ICH_HCR_EL2`.
    pub hcr: u64,
    /// `ICH_VMCR_EL2`.
    pub vmcr: u64,
    /// `ICH_LR<n>_EL2`.
    pub lrs: [u64; 16],
    /// `ICH_AP0R<n>_EL2`.
    pub ap0r: [u32; 4],
    /// `ICH_AP1R<n>_EL2`.
    pub ap1r: [u32; 4],
}

#[cfg(test)]
impl FakeCpuInterface {
    /// A CPU interface like QEMU's: 4 list registers, 5 priority and 5
    /// preemption bits.
    #[must_use]
    pub fn qemu() -> Self {
        Self::with_list_regs(4)
    }

    /// A CPU interface with `n` list registers (1..=16).
    #[must_use]
    pub fn with_list_regs(n: u64) -> Self {
        Self {
            vtr: (n - 1) | 4 << 29 | 4 << 26,
            hcr: 0,
            vmcr: 0,
            lrs: [0; 16],
            ap0r: [0; 4],
            ap1r: [0; 4],
        }
    }

    fn list_regs(&self) -> &[u64] {
        &self.lrs[..Vtr::decode(self.vtr).list_regs]
    }

    /// The guest acknowledges its highest-priority pending interrupt (what
    /// reading `ICC_IAR1_EL1` does in the virtual interface): pending
    /// becomes active. Returns the vINTID, or `None` when none is pending
    /// or the interface is disabled.
    pub fn guest_acknowledge(&mut self) -> Option<u32> {
        if self.hcr & hcr::EN == 0 {
            return None;
        }
        let n = Vtr::decode(self.vtr).list_regs;
        let best = (0..n)
            .filter(|&i| self.lrs[i] & lr::PENDING != 0 && self.lrs[i] & lr::ACTIVE == 0)
            .min_by_key(|&i| ((self.lrs[i] >> lr::PRIORITY_SHIFT) & 0xff, i))?;
        self.lrs[best] = (self.lrs[best] & !lr::PENDING) | lr::ACTIVE;
        Some((self.lrs[best] & lr::VINTID_MASK) as u32)
    }

    /// The guest's EOI (priority drop and deactivation, `EOImode` 0) of
    /// `intid`: its list register loses the active state. Returns whether
    /// the interrupt was in a list register (else `EOIcount` counts it).
    pub fn guest_eoi(&mut self, intid: u32) -> bool {
        let n = Vtr::decode(self.vtr).list_regs;
        let hit = (0..n).find(|&i| {
            self.lrs[i] & lr::ACTIVE != 0 && self.lrs[i] & lr::VINTID_MASK == u64::from(intid)
        });
        if let Some(i) = hit {
            self.lrs[i] &= !lr::ACTIVE;
            // An EOI-maintenance request stays set until the hypervisor
            // rewrites the list register; ICH_EISR reports it meanwhile.
        } else {
            let count = (self.hcr >> hcr::EOICOUNT_SHIFT) & 0x1f;
            self.hcr = (self.hcr & !(0x1f << hcr::EOICOUNT_SHIFT))
                | ((count + 1) & 0x1f) << hcr::EOICOUNT_SHIFT;
        }
        hit.is_some()
    }

    /// `ICH_EISR_EL2`: list registers with a completed EOI maintenance
    /// request (invalid, not `HW`, `EOI` set).
    #[must_use]
    pub fn eisr(&self) -> u64 {
        self.list_regs()
            .iter()
            .enumerate()
            .filter(|(_, v)| *v >> 62 == 0 && *v & lr::HW == 0 && *v & lr::EOI != 0)
            .fold(0, |acc, (i, _)| acc | 1 << i)
    }
}

#[cfg(test)]
impl CpuInterface for FakeCpuInterface {
    fn vtr(&self) -> u64 {
        self.vtr
    }
    fn hcr(&self) -> u64 {
        self.hcr
    }
    fn set_hcr(&mut self, value: u64) {
        self.hcr = value;
    }
    fn vmcr(&self) -> u64 {
        self.vmcr
    }
    fn set_vmcr(&mut self, value: u64) {
        self.vmcr = value;
    }
    fn lr(&self, n: usize) -> u64 {
        self.lrs[n]
    }
    fn set_lr(&mut self, n: usize, value: u64) {
        assert!(
            n < Vtr::decode(self.vtr).list_regs,
            "LR{n} is not implemented"
        );
        self.lrs[n] = value;
    }
    fn ap0r(&self, n: usize) -> u32 {
        self.ap0r[n]
    }
    fn set_ap0r(&mut self, n: usize, value: u32) {
        self.ap0r[n] = value;
    }
    fn ap1r(&self, n: usize) -> u32 {
        self.ap1r[n]
    }
    fn set_ap1r(&mut self, n: usize, value: u32) {
        self.ap1r[n] = value;
    }
    /// The maintenance conditions as the architecture defines them, gated
    /// by their enables in `ICH_HCR_EL2` (and `En`).
    fn misr(&self) -> u64 {
        if self.hcr & hcr::EN == 0 {
            return 0;
        }
        let lrs = self.list_regs();
        let valid = lrs.iter().filter(|v| *v >> 62 != 0).count();
        let pending = lrs.iter().any(|v| v & lr::PENDING != 0);
        let mut misr = 0;
        if self.eisr() != 0 {
            misr |= misr::EOI;
        }
        if self.hcr & hcr::UIE != 0 && valid <= 1 {
            misr |= misr::U;
        }
        if self.hcr & hcr::LRENPIE != 0 && (self.hcr >> hcr::EOICOUNT_SHIFT) != 0 {
            misr |= misr::LRENP;
        }
        if self.hcr & hcr::NPIE != 0 && !pending {
            misr |= misr::NP;
        }
        misr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtr_decodes_qemus_interface() {
        let vtr = Vtr::decode(FakeCpuInterface::qemu().vtr);
        assert_eq!(
            vtr,
            Vtr {
                list_regs: 4,
                pri_bits: 5,
                pre_bits: 5
            }
        );
        assert_eq!(vtr.apr_count(), 1);
        assert_eq!(vtr.priority_mask(), 0xf8);
        let seven = Vtr::decode(15 | 6 << 29 | 6 << 26);
        assert_eq!((seven.list_regs, seven.apr_count()), (16, 4));
        assert_eq!(seven.priority_mask(), 0xfe);
    }
}
