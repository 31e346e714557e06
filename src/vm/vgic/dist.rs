//! The emulated distributor (`GICD`, one 64 KiB frame): the state of the
//! SPIs given to the VM, their routing, and the global enables.
//!
//! Affinity routing is always on (`GICD_CTLR.ARE` reads as one and ignores
//! writes) and the GIC has one security state (`DS` reads as one), as KVM's
//! vgic-v3 presents it: the SGI/PPI registers live in the redistributors,
//! and the distributor's copies of them (INTIDs 0..31) are RAZ/WI.

use alloc::vec;
use alloc::vec::Vec;

use super::VgicCounters;
use super::irq::{
    BitReg, Irq, Width, read_config, read_part, read_priorities, write_config, write_part,
    write_priorities,
};
use crate::mm::counters::inc;
use crate::vm::mmio::MmioError;

/// Register offsets in the `GICD` frame.
pub mod reg {
    /// `GICD_CTLR`.
    pub const CTLR: u64 = 0x0000;
    /// `GICD_TYPER`.
    pub const TYPER: u64 = 0x0004;
    /// `GICD_IIDR`.
    pub const IIDR: u64 = 0x0008;
    /// `GICD_TYPER2`.
    pub const TYPER2: u64 = 0x000c;
    /// `GICD_STATUSR`.
    pub const STATUSR: u64 = 0x0010;
    /// `GICD_IGROUPR<n>`: the first of the bit arrays (see `BitReg::at`).
    pub const IGROUPR: u64 = 0x0080;
    /// `GICD_ISENABLER<n>`.
    pub const ISENABLER: u64 = 0x0100;
    /// `GICD_ICENABLER<n>`.
    pub const ICENABLER: u64 = 0x0180;
    /// `GICD_ISPENDR<n>`.
    pub const ISPENDR: u64 = 0x0200;
    /// `GICD_ICPENDR<n>`.
    pub const ICPENDR: u64 = 0x0280;
    /// `GICD_ISACTIVER<n>`.
    pub const ISACTIVER: u64 = 0x0300;
    /// `GICD_ICACTIVER<n>`.
    pub const ICACTIVER: u64 = 0x0380;
    /// `GICD_IPRIORITYR<n>`: one byte per interrupt.
    pub const IPRIORITYR: u64 = 0x0400;
    /// `GICD_ITARGETSR<n>`: RAZ/WI with affinity routing.
    pub const ITARGETSR: u64 = 0x0800;
    /// `GICD_ICFGR<n>`: two bits per interrupt.
    pub const ICFGR: u64 = 0x0c00;
    /// `GICD_IROUTER<n>`: 64 bits per SPI, at `IROUTER + 8 * INTID`.
    pub const IROUTER: u64 = 0x6000;
    /// `GICD_PIDR2`: the architecture revision in bits \[7:4\].
    pub const PIDR2: u64 = 0xffe8;
}

/// `GICD_CTLR.EnableGrp0` (with `DS` = 1).
pub const CTLR_ENABLE_GRP0: u32 = 1 << 0;
/// `GICD_CTLR.EnableGrp1` (with `DS` = 1; Linux calls it `ENABLE_G1A`).
pub const CTLR_ENABLE_GRP1: u32 = 1 << 1;
/// `GICD_CTLR.ARE`: affinity routing, always on here.
pub const CTLR_ARE: u32 = 1 << 4;
/// `GICD_CTLR.DS`: a single security state, always.
pub const CTLR_DS: u32 = 1 << 6;

/// `GICD_TYPER.No1N`: 1-of-N SPI routing is not supported (`IROUTER.IRM`
/// is RAZ/WI), so an SPI always has exactly one target vCPU.
pub const TYPER_NO1N: u32 = 1 << 25;
/// `GICD_TYPER.LPIS`: never set, there are no LPIs to emulate.
pub const TYPER_LPIS: u32 = 1 << 17;

/// `GICD_IIDR` and `GICR_IIDR`: product 0x4c ('L'), revision 0, and the
/// JEP106 code of Arm (0x43b) as the architecture's implementer field, as
/// KVM does; it matches none of Linux's GIC errata entries.
pub const IIDR: u32 = 0x4c00_043b;

/// `GICx_PIDR2` for a GICv3 (ArchRev 3), the only ID register Linux reads.
pub const PIDR2_GICV3: u32 = 0x30;

/// The Arm component ID (`CIDR0..3`), at 0xfff0..0xfffc of both frames.
pub const CIDR: [u32; 4] = [0x0d, 0xf0, 0x05, 0xb1];

/// The `IROUTER` bits kept: `Aff2.Aff1.Aff0`. `IRM` (bit 31) is RAZ/WI
/// (`No1N`), and `Aff3` is zero as `GICD_TYPER.A3V` is clear.
pub const IROUTER_MASK: u64 = 0x00ff_ffff;

/// A distributor register.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Reg {
    Ctlr,
    Typer,
    Iidr,
    /// A register this GIC has and ignores: its fields are RES0 or belong
    /// to features it lacks (`STATUSR`, the message-based SPI registers,
    /// `ITARGETSR`, `IGRPMODR`, `NSACR`, `SGIR`, `C/SPENDSGIR`, `TYPER2`).
    Ignored,
    Bits(BitReg, u32),
    Priority(u32),
    Config(u32),
    Router(u32),
    Id(u32),
    /// No register here: RAZ/WI, counted.
    Reserved,
}

/// Decodes a `GICD` offset into the register and the sizes it takes.
fn decode(offset: u64) -> (Reg, Width) {
    let first_intid = |base: u64, per_byte: u64| ((offset - base) * per_byte) as u32;
    match offset {
        reg::CTLR => (Reg::Ctlr, Width::Word),
        reg::TYPER => (Reg::Typer, Width::Word),
        reg::IIDR => (Reg::Iidr, Width::Word),
        // TYPER2, STATUSR, SETSPI_NSR, CLRSPI_NSR, SETSPI_SR, CLRSPI_SR;
        // IGRPMODR (RAZ/WI with DS = 1), NSACR (likewise), SGIR (WI with ARE).
        reg::TYPER2
        | reg::STATUSR
        | 0x40
        | 0x48
        | 0x50
        | 0x58
        | 0x0d00..=0x0d7f
        | 0x0e00..=0x0eff
        | 0x0f00 => (Reg::Ignored, Width::Word),
        0x0080..=0x03ff => match BitReg::at(offset) {
            Some((kind, rel)) => (Reg::Bits(kind, (rel * 8) as u32), Width::Word),
            None => (Reg::Reserved, Width::Reserved),
        },
        0x0400..=0x07ff => (
            Reg::Priority(first_intid(reg::IPRIORITYR, 1)),
            Width::ByteOrWord,
        ),
        // ITARGETSR (RAZ/WI with ARE), CPENDSGIR, SPENDSGIR (likewise).
        0x0800..=0x0bff | 0x0f10..=0x0f2f => (Reg::Ignored, Width::ByteOrWord),
        0x0c00..=0x0cff => (Reg::Config(first_intid(reg::ICFGR, 4)), Width::Word),
        // IROUTER<32..1019>; 0x6000..0x60ff would be SGIs and PPIs: reserved.
        0x6100..=0x7fdf => (
            Reg::Router(((offset - reg::IROUTER) / 8) as u32),
            Width::Double,
        ),
        0xffd0..=0xffff => (Reg::Id(id_register(offset)), Width::Word),
        _ => (Reg::Reserved, Width::Reserved),
    }
}

/// The identification registers at 0xffd0..0xffff of a `GICD` or `GICR`
/// frame: `PIDR2` names the architecture, `CIDR0..3` the component class;
/// the rest read as zero.
#[must_use]
pub fn id_register(offset: u64) -> u32 {
    match offset & !3 {
        reg::PIDR2 => PIDR2_GICV3,
        o @ 0xfff0..=0xfffc => CIDR[((o - 0xfff0) / 4) as usize],
        _ => 0,
    }
}

/// The distributor's state.
#[derive(Clone, Debug)]
pub struct Distributor {
    /// The group enables written to `GICD_CTLR`.
    ctlr: u32,
    /// INTIDs 32.. in order, up to the last 32-interrupt block holding an
    /// SPI of the VM (what `ITLinesNumber` reports).
    spis: Vec<Irq>,
    /// `IROUTER` of each entry of `spis`.
    routers: Vec<u64>,
    /// Implemented priority bits.
    priority_mask: u8,
    /// Number of vCPUs (for `CPUNumber`).
    nr_vcpus: usize,
    /// Hardware-backed SPIs the guest deactivated through `ICACTIVER`,
    /// which the arch layer must deactivate physically.
    hw_deactivations: Vec<u32>,
}

impl Distributor {
    /// A distributor owning the SPIs `owned` (INTIDs 32..=1019, each with
    /// its trigger and whether it is hardware-backed), for `nr_vcpus` vCPUs, with priorities masked to
    /// `priority_mask`. Every SPI routes to affinity 0 (vCPU 0) at reset.
    ///
    /// # Panics
    ///
    /// If an INTID is not an SPI: the configuration is the hypervisor's.
    #[must_use]
    pub fn new(owned: &[super::SpiConfig], nr_vcpus: usize, priority_mask: u8) -> Self {
        let last = owned.iter().map(|s| s.intid).max().unwrap_or(31);
        let blocks = (last as usize + 1).div_ceil(32) - 1;
        let mut spis = vec![Irq::default(); 32 * blocks];
        for spi in owned {
            assert!(
                (32..1020).contains(&spi.intid),
                "SPI {} out of range",
                spi.intid
            );
            spis[spi.intid as usize - 32] = Irq::owned(spi.edge, spi.hw);
        }
        Self {
            ctlr: 0,
            routers: vec![0; spis.len()],
            spis,
            priority_mask,
            nr_vcpus,
            hw_deactivations: Vec::new(),
        }
    }

    /// Takes the hardware-backed SPIs the guest deactivated.
    pub fn take_hw_deactivations(&mut self) -> Vec<u32> {
        core::mem::take(&mut self.hw_deactivations)
    }

    /// `GICD_TYPER`: `ITLinesNumber` covering the VM's SPIs, 10 INTID bits
    /// (no LPIs), `No1N`, everything else (LPIS, MBIS, ESPI, A3V, RSS,
    /// SecurityExtn) clear.
    #[must_use]
    pub fn typer(&self) -> u32 {
        const ID_BITS_10: u32 = 9 << 19;
        let it_lines = (self.spis.len() / 32) as u32;
        let cpu_number = (self.nr_vcpus.clamp(1, 8) - 1) as u32;
        it_lines | cpu_number << 5 | ID_BITS_10 | TYPER_NO1N
    }

    /// Whether the distributor forwards interrupts of this group.
    #[must_use]
    pub fn group_enabled(&self, group1: bool) -> bool {
        let bit = if group1 {
            CTLR_ENABLE_GRP1
        } else {
            CTLR_ENABLE_GRP0
        };
        self.ctlr & bit != 0
    }

    /// The INTIDs this distributor has state for: 32..32 + this.
    #[must_use]
    pub fn nr_spis(&self) -> usize {
        self.spis.len()
    }

    /// The state of SPI `intid`, if this distributor has it.
    #[must_use]
    pub fn spi(&self, intid: u32) -> Option<&Irq> {
        self.spis.get((intid as usize).checked_sub(32)?)
    }

    /// The state of SPI `intid`, mutable.
    pub fn spi_mut(&mut self, intid: u32) -> Option<&mut Irq> {
        self.spis.get_mut((intid as usize).checked_sub(32)?)
    }

    /// The affinity (`Aff2.Aff1.Aff0`) SPI `intid` routes to.
    #[must_use]
    pub fn route(&self, intid: u32) -> Option<u64> {
        self.routers.get((intid as usize).checked_sub(32)?).copied()
    }

    /// The SPIs of the VM (INTID, state, routed affinity).
    pub fn owned_spis(&self) -> impl Iterator<Item = (u32, &Irq, u64)> {
        self.spis
            .iter()
            .zip(&self.routers)
            .enumerate()
            .filter(|(_, (irq, _))| irq.owned)
            .map(|(i, (irq, &route))| (i as u32 + 32, irq, route))
    }

    /// The entries of `spis` for `count` interrupts from `first_intid`:
    /// empty for the private INTIDs and beyond the last.
    fn range(&self, first_intid: u32, count: u32) -> core::ops::Range<usize> {
        let Some(start) = (first_intid as usize).checked_sub(32) else {
            return 0..0;
        };
        let start = start.min(self.spis.len());
        start..(start + count as usize).min(self.spis.len())
    }

    /// Emulates a read.
    ///
    /// # Errors
    ///
    /// [`MmioError::BadAccess`] for a size the register does not take.
    pub fn read(&self, offset: u64, size: u8, counters: &VgicCounters) -> Result<u64, MmioError> {
        let (reg, width) = decode(offset);
        checked(width, offset, size, counters)?;
        Ok(match reg {
            Reg::Ctlr => u64::from(self.ctlr | CTLR_ARE | CTLR_DS),
            Reg::Typer => u64::from(self.typer()),
            Reg::Iidr => u64::from(IIDR),
            Reg::Ignored => 0,
            Reg::Bits(kind, first) => u64::from(kind.read(&self.spis[self.range(first, 32)])),
            Reg::Priority(first) => read_priorities(&self.spis[self.range(first, u32::from(size))]),
            Reg::Config(first) => u64::from(read_config(&self.spis[self.range(first, 16)])),
            Reg::Router(intid) => match self.range(intid, 1) {
                r if r.len() == 1 && self.spis[r.start].owned => {
                    read_part(self.routers[r.start], offset, size)
                }
                _ => 0,
            },
            Reg::Id(value) => u64::from(value),
            Reg::Reserved => {
                inc(&counters.unemulated_reads);
                0
            }
        })
    }

    /// Emulates a write.
    ///
    /// # Errors
    ///
    /// [`MmioError::BadAccess`] for a size the register does not take.
    pub fn write(
        &mut self,
        offset: u64,
        value: u64,
        size: u8,
        counters: &VgicCounters,
    ) -> Result<(), MmioError> {
        let (reg, width) = decode(offset);
        checked(width, offset, size, counters)?;
        match reg {
            Reg::Ctlr => self.ctlr = value as u32 & (CTLR_ENABLE_GRP0 | CTLR_ENABLE_GRP1),
            Reg::Bits(kind, first) => {
                let range = self.range(first, 32);
                let mut deactivated = kind.write(&mut self.spis[range], value as u32);
                while deactivated != 0 {
                    self.hw_deactivations
                        .push(first + deactivated.trailing_zeros());
                    deactivated &= deactivated - 1;
                }
            }
            Reg::Priority(first) => {
                let range = self.range(first, u32::from(size));
                write_priorities(&mut self.spis[range], value, self.priority_mask);
            }
            Reg::Config(first) => {
                let range = self.range(first, 16);
                write_config(&mut self.spis[range], value as u32, |irq| !irq.hw);
            }
            Reg::Router(intid) => {
                let r = self.range(intid, 1);
                if r.len() == 1 && self.spis[r.start].owned {
                    let merged = write_part(self.routers[r.start], offset, value, size);
                    self.routers[r.start] = merged & IROUTER_MASK;
                }
            }
            Reg::Typer | Reg::Iidr | Reg::Id(_) | Reg::Ignored => {}
            Reg::Reserved => inc(&counters.unemulated_writes),
        }
        Ok(())
    }
}

/// Checks the access size, counting refusals.
pub(super) fn checked(
    width: Width,
    offset: u64,
    size: u8,
    counters: &VgicCounters,
) -> Result<(), MmioError> {
    width
        .check(offset, size)
        .inspect_err(|_| inc(&counters.bad_accesses))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vgic::SpiConfig;
    use core::sync::atomic::Ordering::Relaxed;

    const UART: u32 = 33;

    fn dist() -> (Distributor, VgicCounters) {
        let owned = [SpiConfig {
            intid: UART,
            edge: false,
            hw: false,
        }];
        (Distributor::new(&owned, 2, 0xf8), VgicCounters::new())
    }

    #[test]
    fn typer_covers_the_spis_and_has_no_lpis() {
        let (d, c) = dist();
        let typer = d.read(reg::TYPER, 4, &c).expect("word");
        assert_eq!(typer & 0x1f, 1, "ITLinesNumber: INTIDs up to 63");
        assert_eq!(typer & u64::from(TYPER_LPIS), 0);
        assert_eq!((typer >> 19) & 0x1f, 9, "10 INTID bits");
        assert_eq!((typer >> 5) & 7, 1, "two vCPUs");
        assert_ne!(typer & u64::from(TYPER_NO1N), 0);
        let many = Distributor::new(
            &[SpiConfig {
                intid: 100,
                edge: true,
                hw: false,
            }],
            1,
            0xf8,
        );
        assert_eq!(many.typer() & 0x1f, 3, "INTID 100 needs 128 INTIDs");
    }

    #[test]
    fn ctlr_keeps_group_enables_and_reads_are_ds_and_rwp_zero() {
        let (mut d, c) = dist();
        assert_eq!(d.read(reg::CTLR, 4, &c), Ok(u64::from(CTLR_ARE | CTLR_DS)));
        d.write(reg::CTLR, 0xffff_ffff, 4, &c).expect("word");
        let ctlr = d.read(reg::CTLR, 4, &c).expect("word");
        assert_eq!(ctlr, 0x53, "Grp0, Grp1, ARE, DS; RWP (bit 31) clear");
        assert!(d.group_enabled(true) && d.group_enabled(false));
        d.write(reg::CTLR, 0, 4, &c).expect("word");
        assert!(!d.group_enabled(true));
        assert_eq!(
            d.read(reg::CTLR, 4, &c),
            Ok(u64::from(CTLR_ARE | CTLR_DS)),
            "ARE is RAO/WI"
        );
    }

    #[test]
    fn only_the_vms_spi_bits_stick() {
        let (mut d, c) = dist();
        let isenabler1 = reg::ISENABLER + 4;
        d.write(isenabler1, 0xffff_ffff, 4, &c).expect("word");
        assert_eq!(d.read(isenabler1, 4, &c), Ok(1 << 1), "only INTID 33");
        assert!(d.spi(UART).expect("exists").enabled);
        d.write(reg::ICENABLER + 4, 1 << 1, 4, &c).expect("word");
        assert!(!d.spi(UART).expect("exists").enabled);
        // INTIDs 0..31 live in the redistributor: RAZ/WI here.
        d.write(reg::ISENABLER, 0xffff_ffff, 4, &c).expect("word");
        assert_eq!(d.read(reg::ISENABLER, 4, &c), Ok(0));
        // Beyond ITLinesNumber: RAZ/WI too.
        d.write(reg::ISENABLER + 8, 0xffff_ffff, 4, &c)
            .expect("word");
        assert_eq!(d.read(reg::ISENABLER + 8, 4, &c), Ok(0));
        // Pending and active through their set/clear pairs.
        d.write(reg::ISPENDR + 4, 1 << 1, 4, &c).expect("word");
        assert_eq!(d.read(reg::ICPENDR + 4, 4, &c), Ok(1 << 1));
        d.write(reg::ICPENDR + 4, 1 << 1, 4, &c).expect("word");
        assert_eq!(d.read(reg::ISPENDR + 4, 4, &c), Ok(0));
        d.write(reg::ISACTIVER + 4, 1 << 1, 4, &c).expect("word");
        assert_eq!(d.read(reg::ICACTIVER + 4, 4, &c), Ok(1 << 1));
        d.write(reg::IGROUPR + 4, 0xffff_ffff, 4, &c).expect("word");
        assert_eq!(d.read(reg::IGROUPR + 4, 4, &c), Ok(1 << 1));
    }

    #[test]
    fn a_hw_spi_is_not_guest_pendable_nor_reconfigurable_and_its_deactivation_is_passed_on() {
        let owned = [SpiConfig {
            intid: 40,
            edge: false,
            hw: true,
        }];
        let (mut d, c) = (Distributor::new(&owned, 1, 0xf8), VgicCounters::new());
        let bit = 1 << (40 - 32);
        d.write(reg::ISPENDR + 4, bit, 4, &c).expect("word");
        assert_eq!(d.read(reg::ISPENDR + 4, 4, &c), Ok(0));
        d.write(reg::ICFGR + 8, 0xffff_ffff, 4, &c).expect("word");
        assert_eq!(d.read(reg::ICFGR + 8, 4, &c), Ok(0), "stays level");
        d.spi_mut(40).expect("exists").active = true;
        d.write(reg::ICACTIVER + 4, u64::MAX, 4, &c).expect("word");
        assert_eq!(d.take_hw_deactivations(), [40]);
        assert!(d.take_hw_deactivations().is_empty());
    }

    #[test]
    fn ipriorityr_takes_bytes_and_words_but_not_halfwords() {
        let (mut d, c) = dist();
        // INTID 33 is byte 1 of IPRIORITYR8 (offset 0x420).
        d.write(reg::IPRIORITYR + 33, 0xa7, 1, &c).expect("byte");
        assert_eq!(
            d.read(reg::IPRIORITYR + 33, 1, &c),
            Ok(0xa0),
            "5 priority bits"
        );
        assert_eq!(d.read(reg::IPRIORITYR + 32, 4, &c), Ok(0xa000));
        d.write(reg::IPRIORITYR + 32, 0x1122_3344, 4, &c)
            .expect("word");
        assert_eq!(d.spi(UART).expect("exists").priority, 0x30);
        assert_eq!(
            d.read(reg::IPRIORITYR + 32, 4, &c),
            Ok(0x3000),
            "unowned bytes RAZ"
        );
        assert_eq!(
            d.write(reg::IPRIORITYR + 32, 0, 2, &c),
            Err(MmioError::BadAccess)
        );
        assert_eq!(
            d.read(reg::IPRIORITYR + 33, 4, &c),
            Err(MmioError::BadAccess),
            "misaligned"
        );
        assert_eq!(c.bad_accesses.load(Relaxed), 2);
        // ITARGETSR: byte-accessible, RAZ/WI under affinity routing.
        d.write(reg::ITARGETSR + 33, 0xff, 1, &c).expect("byte");
        assert_eq!(d.read(reg::ITARGETSR + 33, 1, &c), Ok(0));
        assert_eq!(
            d.read(reg::ITARGETSR + 32, 8, &c),
            Err(MmioError::BadAccess)
        );
    }

    #[test]
    fn word_registers_refuse_bytes_and_doublewords() {
        let (mut d, c) = dist();
        assert_eq!(d.read(reg::ISENABLER + 4, 1, &c), Err(MmioError::BadAccess));
        assert_eq!(d.write(reg::CTLR, 3, 8, &c), Err(MmioError::BadAccess));
        assert_eq!(d.read(reg::TYPER, 2, &c), Err(MmioError::BadAccess));
        assert!(!d.group_enabled(true), "a refused write changes nothing");
        assert_eq!(c.bad_accesses.load(Relaxed), 3);
    }

    #[test]
    fn irouter_is_64_bit_or_two_halves_and_keeps_only_affinity() {
        let (mut d, c) = dist();
        let irouter33 = reg::IROUTER + 8 * u64::from(UART);
        d.write(irouter33, 0xff_8001_0203, 8, &c).expect("double");
        assert_eq!(
            d.read(irouter33, 8, &c),
            Ok(0x01_0203),
            "IRM and Aff3 dropped"
        );
        assert_eq!(d.route(UART), Some(0x01_0203));
        d.write(irouter33, 0x0004_0506, 4, &c).expect("low half");
        d.write(irouter33 + 4, 0xff, 4, &c)
            .expect("high half (Aff3) ignored");
        assert_eq!(d.read(irouter33, 4, &c), Ok(0x04_0506));
        assert_eq!(d.read(irouter33 + 4, 4, &c), Ok(0));
        assert_eq!(d.read(irouter33, 1, &c), Err(MmioError::BadAccess));
        // An SPI that is not the VM's: RAZ/WI.
        let irouter34 = irouter33 + 8;
        d.write(irouter34, 0x0102, 8, &c).expect("double");
        assert_eq!(d.read(irouter34, 8, &c), Ok(0));
        // The SGI/PPI slots of IROUTER are reserved.
        assert_eq!(d.read(reg::IROUTER + 8, 8, &c), Ok(0));
        assert_eq!(c.unemulated_reads.load(Relaxed), 1);
    }

    #[test]
    fn icfgr_of_an_spi_is_writable_and_reserved_offsets_are_counted() {
        let (mut d, c) = dist();
        let icfgr2 = reg::ICFGR + 8; // INTIDs 32..47
        d.write(icfgr2, 0xffff_ffff, 4, &c).expect("word");
        assert_eq!(d.read(icfgr2, 4, &c), Ok(0b10 << 2), "INTID 33 edge");
        d.write(icfgr2, 0, 4, &c).expect("word");
        assert!(!d.spi(UART).expect("exists").edge);
        d.write(0x2000, 1, 4, &c).expect("reserved: WI");
        assert_eq!(d.read(0x2000, 8, &c), Ok(0));
        assert_eq!(d.read(0x20, 1, &c), Ok(0));
        assert_eq!(c.unemulated_writes.load(Relaxed), 1);
        assert_eq!(c.unemulated_reads.load(Relaxed), 2);
        assert_eq!(d.read(reg::PIDR2, 4, &c), Ok(0x30));
        assert_eq!(d.read(reg::IIDR, 4, &c), Ok(u64::from(IIDR)));
        assert_eq!(
            c.unemulated_reads.load(Relaxed),
            2,
            "ID registers are not reserved"
        );
    }
}
