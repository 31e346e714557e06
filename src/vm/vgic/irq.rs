//! Per-interrupt state, and the register shapes the distributor and the
//! redistributor share: one bit per interrupt (`IGROUPR`, `IS/ICENABLER`,
//! `IS/ICPENDR`, `IS/ICACTIVER`), one byte (`IPRIORITYR`), two bits
//! (`ICFGR`), and the access sizes each shape accepts.

use crate::vm::mmio::MmioError;

/// The emulated state of one virtual interrupt.
///
/// An interrupt that is not the VM's (`owned` false) keeps its reset state
/// forever: every bit of it reads as zero and ignores writes, so a guest
/// cannot even observe which interrupts exist on the machine.
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent architectural state bits of one interrupt"
)]
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Irq {
    /// Given to the VM; everything else about an unowned interrupt is RAZ/WI.
    pub owned: bool,
    /// Backed by the physical interrupt with the same INTID (the virtual
    /// timer): delivered with `ICH_LR.HW` set, so the guest's deactivation
    /// deactivates the physical interrupt too.
    pub hw: bool,
    /// `IGROUPR`: group 1 (Linux puts everything in group 1).
    pub group1: bool,
    /// `ISENABLER`/`ICENABLER`.
    pub enabled: bool,
    /// Edge-triggered (`ICFGR` field bit 1); level-sensitive otherwise.
    pub edge: bool,
    /// A latched pending state: an edge, an SGI, a software `ISPENDR`
    /// write, or (for `hw`) the physical interrupt taken at EL2.
    pub pending_latch: bool,
    /// The input line of a level-sensitive emulated device.
    pub line_level: bool,
    /// Active (acknowledged by the guest, not yet deactivated).
    pub active: bool,
    /// `IPRIORITYR`, with the unimplemented low bits zero.
    pub priority: u8,
    /// Currently in a list register of the running vCPU: a new assertion
    /// while it is there must survive the fold-back of that list register.
    pub in_lr: bool,
    /// Asserted again while `in_lr`.
    pub asserted_in_lr: bool,
}

impl Irq {
    /// An interrupt given to the VM, in its reset state (disabled, inactive,
    /// priority 0, group 0 as the architecture resets `IGROUPR`).
    #[must_use]
    pub fn owned(edge: bool, hw: bool) -> Self {
        Self {
            owned: true,
            hw,
            edge,
            ..Self::default()
        }
    }

    /// Pending as the GIC sees it: latched, or a level-sensitive line high.
    #[must_use]
    pub fn pending(&self) -> bool {
        self.pending_latch || (!self.edge && self.line_level)
    }

    /// Latches a pending state (an edge, an SGI, a physical interrupt).
    pub fn assert(&mut self) {
        self.pending_latch = true;
        if self.in_lr {
            self.asserted_in_lr = true;
        }
    }
}

/// The one-bit-per-interrupt register arrays.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum BitReg {
    /// `IGROUPR`.
    Group,
    /// `ISENABLER`.
    SetEnable,
    /// `ICENABLER`.
    ClearEnable,
    /// `ISPENDR`.
    SetPending,
    /// `ICPENDR`.
    ClearPending,
    /// `ISACTIVER`.
    SetActive,
    /// `ICACTIVER`.
    ClearActive,
}

impl BitReg {
    /// The register array at `offset - base` for the arrays at the same
    /// offsets in `GICD` and in the SGI_base frame: `0x080` IGROUPR, `0x100`
    /// ISENABLER, ... `0x380` ICACTIVER, each 0x80 bytes long.
    #[must_use]
    pub fn at(offset: u64) -> Option<(Self, u64)> {
        let kind = match offset & !0x7f {
            0x080 => Self::Group,
            0x100 => Self::SetEnable,
            0x180 => Self::ClearEnable,
            0x200 => Self::SetPending,
            0x280 => Self::ClearPending,
            0x300 => Self::SetActive,
            0x380 => Self::ClearActive,
            _ => return None,
        };
        Some((kind, offset & 0x7f))
    }

    /// The bits of up to 32 interrupts, `irqs[0]` in bit 0.
    #[must_use]
    pub fn read(self, irqs: &[Irq]) -> u32 {
        let mut value = 0;
        for (bit, irq) in irqs.iter().enumerate().filter(|(_, irq)| irq.owned) {
            let set = match self {
                Self::Group => irq.group1,
                Self::SetEnable | Self::ClearEnable => irq.enabled,
                Self::SetPending | Self::ClearPending => irq.pending(),
                Self::SetActive | Self::ClearActive => irq.active,
            };
            value |= u32::from(set) << bit;
        }
        value
    }

    /// Writes `value` to up to 32 interrupts. Returns the mask of
    /// hardware-backed interrupts whose active state the guest cleared:
    /// the caller must deactivate the physical interrupt too.
    ///
    /// Pending and set-active writes to hardware-backed interrupts are
    /// ignored: their pending state comes from the hardware alone, and a
    /// virtual active state without a physical one would deactivate nothing.
    pub fn write(self, irqs: &mut [Irq], value: u32) -> u32 {
        let mut hw_deactivated = 0;
        for (bit, irq) in irqs.iter_mut().enumerate().filter(|(_, irq)| irq.owned) {
            let one = value >> bit & 1 == 1;
            match self {
                Self::Group => irq.group1 = one,
                Self::SetEnable if one => irq.enabled = true,
                Self::ClearEnable if one => irq.enabled = false,
                Self::SetPending if one && !irq.hw => irq.assert(),
                // Clears the latch; a level-sensitive line that is still
                // high keeps the interrupt pending, as on hardware.
                Self::ClearPending if one && !irq.hw => {
                    irq.pending_latch = false;
                    irq.asserted_in_lr = false;
                }
                Self::SetActive if one && !irq.hw => irq.active = true,
                Self::ClearActive if one => {
                    if irq.hw && irq.active {
                        hw_deactivated |= 1 << bit;
                    }
                    irq.active = false;
                }
                _ => {}
            }
        }
        hw_deactivated
    }
}

/// Reads `IPRIORITYR` bytes: one per interrupt, little-endian.
#[must_use]
pub fn read_priorities(irqs: &[Irq]) -> u64 {
    irqs.iter().enumerate().fold(0, |acc, (i, irq)| {
        acc | u64::from(if irq.owned { irq.priority } else { 0 }) << (8 * i)
    })
}

/// Writes `IPRIORITYR` bytes, keeping only the priority bits the virtual
/// CPU interface implements (`mask`), as the unimplemented ones are RAZ/WI.
pub fn write_priorities(irqs: &mut [Irq], value: u64, mask: u8) {
    for (i, irq) in irqs.iter_mut().enumerate().filter(|(_, irq)| irq.owned) {
        irq.priority = (value >> (8 * i)) as u8 & mask;
    }
}

/// Reads an `ICFGR` register: two bits per interrupt, bit 1 of each set
/// for edge-triggered.
#[must_use]
pub fn read_config(irqs: &[Irq]) -> u32 {
    irqs.iter().enumerate().fold(0, |acc, (i, irq)| {
        acc | u32::from(irq.owned && irq.edge) << (2 * i + 1)
    })
}

/// Writes an `ICFGR` register for the interrupts whose trigger the guest
/// may choose (`writable`); the others keep theirs.
pub fn write_config(irqs: &mut [Irq], value: u32, writable: impl Fn(&Irq) -> bool) {
    for (i, irq) in irqs.iter_mut().enumerate() {
        if irq.owned && writable(irq) {
            irq.edge = value >> (2 * i + 1) & 1 == 1;
        }
    }
}

/// The access sizes a register accepts.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Width {
    /// 32-bit only: most GIC registers.
    Word,
    /// 8 or 32 bits: `IPRIORITYR`, `ITARGETSR`.
    ByteOrWord,
    /// 64 bits, or 32 bits to either half: `IROUTER`, `GICR_TYPER`,
    /// `PROPBASER`, `PENDBASER`.
    Double,
    /// An offset no register lives at: any size the GIC could take (8, 32
    /// or 64 bits), read as zero and ignored.
    Reserved,
}

impl Width {
    /// Checks an access of `size` bytes at `offset`: the size must be one
    /// the register takes and the access naturally aligned. The GIC has no
    /// 16-bit registers, so 2-byte accesses are always refused.
    ///
    /// # Errors
    ///
    /// [`MmioError::BadAccess`] otherwise.
    pub fn check(self, offset: u64, size: u8) -> Result<(), MmioError> {
        let size_ok = match self {
            Self::Word => size == 4,
            Self::ByteOrWord => size == 1 || size == 4,
            Self::Double => size == 4 || size == 8,
            Self::Reserved => matches!(size, 1 | 4 | 8),
        };
        if size_ok && offset.is_multiple_of(u64::from(size)) {
            Ok(())
        } else {
            Err(MmioError::BadAccess)
        }
    }
}

/// Reads the `size`-byte part at `offset` (4-aligned for a 4-byte access
/// into 8) of a 64-bit register.
#[must_use]
pub fn read_part(reg: u64, offset: u64, size: u8) -> u64 {
    if size == 8 {
        reg
    } else {
        (reg >> (8 * (offset & 4))) & 0xffff_ffff
    }
}

/// Merges a `size`-byte write at `offset` into a 64-bit register.
#[must_use]
pub fn write_part(reg: u64, offset: u64, value: u64, size: u8) -> u64 {
    if size == 8 {
        value
    } else {
        let shift = 8 * (offset & 4);
        (reg & !(0xffff_ffff << shift)) | ((value & 0xffff_ffff) << shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bank() -> [Irq; 4] {
        [
            Irq::owned(true, false),
            Irq::default(),
            Irq::owned(false, false),
            Irq::owned(false, true),
        ]
    }

    #[test]
    fn set_and_clear_registers_touch_only_the_ones_written_and_owned() {
        let mut irqs = bank();
        BitReg::SetEnable.write(&mut irqs, 0b1111);
        assert_eq!(
            BitReg::SetEnable.read(&irqs),
            0b1101,
            "bit 1 is not the VM's"
        );
        BitReg::ClearEnable.write(&mut irqs, 0b0100);
        assert_eq!(BitReg::ClearEnable.read(&irqs), 0b1001);
        // Writing zeros to a set/clear register changes nothing.
        BitReg::ClearEnable.write(&mut irqs, 0);
        assert_eq!(BitReg::SetEnable.read(&irqs), 0b1001);
    }

    #[test]
    fn pending_of_level_follows_the_line_and_hw_pending_is_not_guest_writable() {
        let mut irqs = bank();
        irqs[2].line_level = true;
        assert_eq!(BitReg::SetPending.read(&irqs), 0b0100);
        // Clearing the latch does not lower a line that is still high.
        BitReg::ClearPending.write(&mut irqs, 0b0100);
        assert_eq!(BitReg::SetPending.read(&irqs), 0b0100);
        irqs[2].line_level = false;
        assert_eq!(BitReg::SetPending.read(&irqs), 0);
        BitReg::SetPending.write(&mut irqs, 0b1001);
        assert_eq!(BitReg::SetPending.read(&irqs), 0b0001, "hw-backed: WI");
    }

    #[test]
    fn clearing_an_active_hw_interrupt_asks_for_a_physical_deactivation() {
        let mut irqs = bank();
        irqs[3].active = true;
        irqs[0].active = true;
        assert_eq!(BitReg::ClearActive.write(&mut irqs, 0b1001), 0b1000);
        assert_eq!(BitReg::SetActive.read(&irqs), 0);
        assert_eq!(
            BitReg::ClearActive.write(&mut irqs, 0b1000),
            0,
            "no longer active"
        );
    }

    #[test]
    fn priorities_keep_implemented_bits_and_config_only_writable_ones() {
        let mut irqs = bank();
        write_priorities(&mut irqs, 0xffff_ffff, 0xf8);
        assert_eq!(read_priorities(&irqs), 0xf8f8_00f8);
        write_config(&mut irqs, 0xff, |irq| !irq.hw);
        // irq 0 edge (bit 1), irq 1 unowned, irq 2 now edge, irq 3 hw: level.
        assert_eq!(read_config(&irqs), 0b0010_0010);
    }

    #[test]
    fn widths_refuse_wrong_sizes_and_misalignment() {
        assert!(Width::Word.check(0x100, 4).is_ok());
        assert_eq!(Width::Word.check(0x100, 1), Err(MmioError::BadAccess));
        assert_eq!(Width::Word.check(0x100, 8), Err(MmioError::BadAccess));
        assert_eq!(Width::Word.check(0x102, 4), Err(MmioError::BadAccess));
        assert!(Width::ByteOrWord.check(0x403, 1).is_ok());
        assert_eq!(Width::ByteOrWord.check(0x402, 2), Err(MmioError::BadAccess));
        assert!(Width::Double.check(0x6104, 4).is_ok());
        assert_eq!(Width::Double.check(0x6104, 8), Err(MmioError::BadAccess));
        assert_eq!(Width::Reserved.check(0x20, 2), Err(MmioError::BadAccess));
        assert_eq!(read_part(0x1111_2222_3333_4444, 4, 4), 0x1111_2222);
        assert_eq!(
            write_part(0x1111_2222_3333_4444, 0, 0xaaaa, 4),
            0x1111_2222_0000_aaaa
        );
    }
}
