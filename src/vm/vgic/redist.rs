//! The emulated redistributors: one per vCPU, each two 64 KiB frames
//! (`RD_base`: control, identification, power; `SGI_base`: the SGI and PPI
//! registers), laid out contiguously as on QEMU `virt`, the last one
//! flagged by `GICR_TYPER.Last`.
//!
//! No LPIs: `GICR_TYPER.PLPIS` is clear, and `GICR_CTLR.EnableLPIs`,
//! `PROPBASER`, `PENDBASER` and the direct-LPI registers read as zero and
//! ignore writes, so nothing a guest writes here makes the GIC read or write
//! memory.

use super::VgicCounters;
use super::dist::{IIDR, checked, id_register};
use super::irq::{
    BitReg, Irq, Width, read_config, read_part, read_priorities, write_config, write_priorities,
};
use crate::mm::counters::inc;
use crate::vm::mmio::MmioError;

/// Size of one frame.
pub const FRAME_SIZE: u64 = 0x1_0000;
/// Size of one redistributor (`RD_base` + `SGI_base`, no VLPI frames).
pub const REDIST_SIZE: u64 = 2 * FRAME_SIZE;

/// Register offsets in the `RD_base` frame.
pub mod rd {
    /// `GICR_CTLR`.
    pub const CTLR: u64 = 0x0000;
    /// `GICR_IIDR`.
    pub const IIDR: u64 = 0x0004;
    /// `GICR_TYPER` (64 bits).
    pub const TYPER: u64 = 0x0008;
    /// `GICR_STATUSR`.
    pub const STATUSR: u64 = 0x0010;
    /// `GICR_WAKER`.
    pub const WAKER: u64 = 0x0014;
    /// `GICR_PROPBASER` (64 bits).
    pub const PROPBASER: u64 = 0x0070;
    /// `GICR_PENDBASER` (64 bits).
    pub const PENDBASER: u64 = 0x0078;
    /// `GICR_PIDR2`.
    pub const PIDR2: u64 = 0xffe8;
}

/// Register offsets in the `SGI_base` frame (from its start).
pub mod sgi {
    /// `GICR_IGROUPR0`.
    pub const IGROUPR0: u64 = 0x0080;
    /// `GICR_ISENABLER0`.
    pub const ISENABLER0: u64 = 0x0100;
    /// `GICR_ICENABLER0`.
    pub const ICENABLER0: u64 = 0x0180;
    /// `GICR_ISPENDR0`.
    pub const ISPENDR0: u64 = 0x0200;
    /// `GICR_ICPENDR0`.
    pub const ICPENDR0: u64 = 0x0280;
    /// `GICR_ISACTIVER0`.
    pub const ISACTIVER0: u64 = 0x0300;
    /// `GICR_ICACTIVER0`.
    pub const ICACTIVER0: u64 = 0x0380;
    /// `GICR_IPRIORITYR0..7`.
    pub const IPRIORITYR: u64 = 0x0400;
    /// `GICR_ICFGR0` (SGIs), `ICFGR1` at +4 (PPIs).
    pub const ICFGR0: u64 = 0x0c00;
}

/// `GICR_TYPER.Last`.
pub const TYPER_LAST: u64 = 1 << 4;
/// `GICR_TYPER.PLPIS`: never set.
pub const TYPER_PLPIS: u64 = 1 << 0;
/// `GICR_WAKER.ProcessorSleep`.
pub const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
/// `GICR_WAKER.ChildrenAsleep`.
pub const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;

/// Which private interrupts a vCPU's redistributor gives the guest.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct PrivateConfig {
    /// PPIs (bit n = INTID n, 16..=31) given to the VM; all 16 SGIs always
    /// are, being purely virtual.
    pub ppis: u32,
    /// PPIs among them backed by the physical PPI of the same INTID.
    pub hw_ppis: u32,
}

/// A redistributor register.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Reg {
    Ctlr,
    Iidr,
    Typer,
    Waker,
    /// Registers of absent features (LPIs, `STATUSR`, MPAM, the SGI_base
    /// frame's `IGRPMODR0` and `NSACR`): RAZ/WI.
    Ignored,
    Bits(BitReg),
    Priority(u32),
    /// `ICFGR0` (SGIs: always edge) or `ICFGR1` (PPIs: fixed by the device
    /// behind them), read-only.
    Config(u32),
    Id(u32),
    Reserved,
}

/// Decodes an offset into a redistributor (0..`REDIST_SIZE`).
fn decode(offset: u64) -> (Reg, Width) {
    if offset < FRAME_SIZE {
        match offset {
            rd::CTLR => (Reg::Ctlr, Width::Word),
            rd::IIDR => (Reg::Iidr, Width::Word),
            rd::TYPER | 0x000c => (Reg::Typer, Width::Double),
            rd::WAKER => (Reg::Waker, Width::Word),
            // STATUSR, MPAMIDR, PARTIDR, SYNCR (Busy reads as zero).
            rd::STATUSR | 0x0018 | 0x001c | 0x00c0 => (Reg::Ignored, Width::Word),
            // SETLPIR, CLRLPIR, PROPBASER, PENDBASER, INVLPIR, INVALLR: no
            // LPIs, so these never make the GIC touch memory.
            0x0040 | 0x0044 | 0x0048 | 0x004c | 0x0070..=0x007f | 0x00a0..=0x00b7 => {
                (Reg::Ignored, Width::Double)
            }
            0xffd0..=0xffff => (Reg::Id(id_register(offset)), Width::Word),
            _ => (Reg::Reserved, Width::Reserved),
        }
    } else {
        let offset = offset - FRAME_SIZE;
        match offset {
            0x0080..=0x03ff if offset.trailing_zeros() >= 7 => match BitReg::at(offset) {
                Some((kind, _)) => (Reg::Bits(kind), Width::Word),
                None => (Reg::Reserved, Width::Reserved),
            },
            0x0400..=0x041f => (
                Reg::Priority((offset - sgi::IPRIORITYR) as u32),
                Width::ByteOrWord,
            ),
            0x0c00 | 0x0c04 => (
                Reg::Config(((offset - sgi::ICFGR0) * 4) as u32),
                Width::Word,
            ),
            // IGRPMODR0 (RAZ/WI with DS = 1), NSACR (likewise).
            0x0d00 | 0x0e00 => (Reg::Ignored, Width::Word),
            _ => (Reg::Reserved, Width::Reserved),
        }
    }
}

/// One vCPU's redistributor.
#[derive(Clone, Debug)]
pub struct Redistributor {
    /// `Aff3.Aff2.Aff1.Aff0` of the vCPU, as in `GICR_TYPER[63:32]`.
    affinity: u32,
    /// The vCPU's index (`GICR_TYPER.Processor_Number`).
    index: u16,
    /// The last redistributor of the region.
    last: bool,
    /// `GICR_WAKER.ProcessorSleep`.
    sleep: bool,
    /// INTIDs 0..31.
    pub(super) private: [Irq; 32],
    /// Hardware-backed PPIs the guest deactivated through `ICACTIVER0`,
    /// which the arch layer must deactivate physically.
    hw_deactivations: u32,
    /// Implemented priority bits.
    priority_mask: u8,
}

impl Redistributor {
    /// The redistributor of vCPU `index` with `affinity`, in its reset
    /// state (asleep, every interrupt disabled).
    #[must_use]
    pub fn new(
        index: u16,
        affinity: u32,
        last: bool,
        config: PrivateConfig,
        priority_mask: u8,
    ) -> Self {
        let mut private = [Irq::default(); 32];
        for (intid, irq) in private.iter_mut().enumerate() {
            if intid < 16 {
                // SGIs are always edge-triggered.
                *irq = Irq::owned(true, false);
            } else if config.ppis >> intid & 1 == 1 {
                // The PPIs given to VMs (the timers) are level-sensitive.
                *irq = Irq::owned(false, config.hw_ppis >> intid & 1 == 1);
            }
        }
        Self {
            affinity,
            index,
            last,
            sleep: true,
            private,
            hw_deactivations: 0,
            priority_mask,
        }
    }

    /// The vCPU's affinity, `Aff3.Aff2.Aff1.Aff0`.
    #[must_use]
    pub fn affinity(&self) -> u32 {
        self.affinity
    }

    /// `GICR_TYPER`: affinity, processor number, `Last`; no LPIs, no VLPIs,
    /// 16 PPIs.
    #[must_use]
    pub fn typer(&self) -> u64 {
        u64::from(self.affinity) << 32
            | u64::from(self.index) << 8
            | if self.last { TYPER_LAST } else { 0 }
    }

    /// Whether the redistributor is awake (`GICR_WAKER.ProcessorSleep`
    /// clear); an asleep one forwards nothing to its vCPU.
    #[must_use]
    pub fn awake(&self) -> bool {
        !self.sleep
    }

    /// Takes the mask of hardware-backed PPIs the guest deactivated.
    pub fn take_hw_deactivations(&mut self) -> u32 {
        core::mem::take(&mut self.hw_deactivations)
    }

    /// Emulates a read at `offset` into this redistributor.
    ///
    /// # Errors
    ///
    /// [`MmioError::BadAccess`] for a size the register does not take.
    pub fn read(&self, offset: u64, size: u8, counters: &VgicCounters) -> Result<u64, MmioError> {
        let (reg, width) = decode(offset);
        checked(width, offset, size, counters)?;
        Ok(match reg {
            // EnableLPIs, RWP, UWP all zero: writes complete at once.
            Reg::Ctlr | Reg::Ignored => 0,
            Reg::Iidr => u64::from(IIDR),
            Reg::Typer => read_part(self.typer(), offset, size),
            // ChildrenAsleep follows ProcessorSleep at once: there is no
            // interface to quiesce.
            Reg::Waker => {
                if self.sleep {
                    u64::from(WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP)
                } else {
                    0
                }
            }
            Reg::Bits(kind) => u64::from(kind.read(&self.private)),
            Reg::Priority(first) => {
                let first = first as usize;
                read_priorities(&self.private[first..first + usize::from(size)])
            }
            Reg::Config(first) => {
                let first = first as usize;
                u64::from(read_config(&self.private[first..first + 16]))
            }
            Reg::Id(value) => u64::from(value),
            Reg::Reserved => {
                inc(&counters.unemulated_reads);
                0
            }
        })
    }

    /// Emulates a write at `offset` into this redistributor.
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
            Reg::Waker => self.sleep = value as u32 & WAKER_PROCESSOR_SLEEP != 0,
            Reg::Bits(kind) => self.hw_deactivations |= kind.write(&mut self.private, value as u32),
            Reg::Priority(first) => {
                let first = first as usize;
                let irqs = &mut self.private[first..first + usize::from(size)];
                write_priorities(irqs, value, self.priority_mask);
            }
            Reg::Config(first) => {
                // SGIs are edge by definition; the PPIs' trigger is the
                // device's (the timer is level): read-only, as the
                // architecture allows for PPIs.
                let first = first as usize;
                write_config(&mut self.private[first..first + 16], value as u32, |_| {
                    false
                });
            }
            Reg::Ctlr | Reg::Iidr | Reg::Typer | Reg::Ignored | Reg::Id(_) => {}
            Reg::Reserved => inc(&counters.unemulated_writes),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::Ordering::Relaxed;

    const SGI: u64 = FRAME_SIZE;
    const VTIMER: u32 = 27;

    fn redist(last: bool) -> (Redistributor, VgicCounters) {
        let config = PrivateConfig {
            ppis: 1 << VTIMER,
            hw_ppis: 1 << VTIMER,
        };
        (
            Redistributor::new(3, 0x0001_0203, last, config, 0xf8),
            VgicCounters::new(),
        )
    }

    #[test]
    fn typer_has_affinity_processor_number_last_and_no_lpis() {
        let (r, c) = redist(true);
        let typer = r.read(rd::TYPER, 8, &c).expect("double");
        assert_eq!(typer >> 32, 0x0001_0203);
        assert_eq!((typer >> 8) & 0xffff, 3);
        assert_ne!(typer & TYPER_LAST, 0);
        assert_eq!(typer & TYPER_PLPIS, 0);
        assert_eq!(typer & 0b10, 0, "no VLPIs: Linux steps 2 frames");
        assert_eq!((typer >> 27) & 0x1f, 0, "PPInum: 16 PPIs");
        assert_eq!(r.read(rd::TYPER + 4, 4, &c), Ok(0x0001_0203), "high half");
        assert_eq!(r.read(rd::TYPER, 4, &c), Ok(typer & 0xffff_ffff));
        let (r, c) = redist(false);
        assert_eq!(r.read(rd::TYPER, 8, &c).expect("double") & TYPER_LAST, 0);
        assert_eq!(r.read(rd::TYPER, 1, &c), Err(MmioError::BadAccess));
    }

    #[test]
    fn waker_handshake() {
        let (mut r, c) = redist(true);
        let asleep = u64::from(WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP);
        assert_eq!(r.read(rd::WAKER, 4, &c), Ok(asleep), "reset: asleep");
        assert!(!r.awake());
        r.write(rd::WAKER, asleep & !u64::from(WAKER_PROCESSOR_SLEEP), 4, &c)
            .expect("word");
        assert_eq!(r.read(rd::WAKER, 4, &c), Ok(0), "awake, children too");
        assert!(r.awake());
        r.write(rd::WAKER, u64::from(WAKER_PROCESSOR_SLEEP), 4, &c)
            .expect("word");
        assert_eq!(r.read(rd::WAKER, 4, &c), Ok(asleep));
    }

    #[test]
    fn lpi_registers_read_zero_and_ignore_writes() {
        let (mut r, c) = redist(true);
        for (offset, size) in [
            (rd::PROPBASER, 8),
            (rd::PENDBASER, 8),
            (rd::PENDBASER + 4, 4),
            (0x40, 8), // SETLPIR
            (rd::CTLR, 4),
        ] {
            r.write(offset, u64::MAX, size, &c).expect("accepted");
            assert_eq!(r.read(offset, size, &c), Ok(0), "{offset:#x}");
        }
        assert_eq!(c.unemulated_writes.load(Relaxed), 0, "known registers");
        assert_eq!(r.read(rd::PIDR2, 4, &c), Ok(0x30));
    }

    #[test]
    fn sgi_frame_owns_sgis_and_the_timer_ppi_only() {
        let (mut r, c) = redist(true);
        r.write(SGI + sgi::ISENABLER0, 0xffff_ffff, 4, &c)
            .expect("word");
        assert_eq!(
            r.read(SGI + sgi::ISENABLER0, 4, &c),
            Ok(0xffff | 1 << VTIMER),
            "SGIs and PPI 27; the maintenance PPI 25 is not the guest's"
        );
        r.write(SGI + sgi::ICENABLER0, 1 << 3, 4, &c).expect("word");
        assert!(!r.private[3].enabled);
        // Priorities, byte and word.
        r.write(SGI + sgi::IPRIORITYR + 27, 0x80, 1, &c)
            .expect("byte");
        assert_eq!(r.private[27].priority, 0x80);
        r.write(SGI + sgi::IPRIORITYR + 24, 0xa0a0_a0a0, 4, &c)
            .expect("word");
        assert_eq!(r.read(SGI + sgi::IPRIORITYR + 24, 4, &c), Ok(0xa000_0000));
        assert_eq!(
            r.read(SGI + sgi::IPRIORITYR, 2, &c),
            Err(MmioError::BadAccess)
        );
        // ICFGR: SGIs edge, timer level, both read-only.
        assert_eq!(r.read(SGI + sgi::ICFGR0, 4, &c), Ok(0xaaaa_aaaa));
        r.write(SGI + sgi::ICFGR0 + 4, 0xffff_ffff, 4, &c)
            .expect("word");
        assert_eq!(r.read(SGI + sgi::ICFGR0 + 4, 4, &c), Ok(0));
        // SGI pending through ISPENDR0; the hw-backed timer's is not.
        r.write(SGI + sgi::ISPENDR0, 1 << 5 | 1 << VTIMER, 4, &c)
            .expect("word");
        assert_eq!(r.read(SGI + sgi::ICPENDR0, 4, &c), Ok(1 << 5));
        // Extended PPI registers do not exist: reserved, counted.
        r.write(SGI + 0x0104, 1, 4, &c).expect("reserved: WI");
        assert_eq!(c.unemulated_writes.load(Relaxed), 1);
    }

    #[test]
    fn clearing_the_active_timer_queues_a_physical_deactivation() {
        let (mut r, c) = redist(true);
        r.private[VTIMER as usize].active = true;
        r.write(SGI + sgi::ICACTIVER0, 0xffff_ffff, 4, &c)
            .expect("word");
        assert_eq!(r.take_hw_deactivations(), 1 << VTIMER);
        assert_eq!(r.take_hw_deactivations(), 0, "taken");
        assert!(!r.private[VTIMER as usize].active);
    }
}
