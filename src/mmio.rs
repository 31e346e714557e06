//! MMIO emulation: decoding a guest data abort into a register access, and
//! the emulated PL011 UART (the test guest's console by default,
//! `guest.uart=emulated`; `passthrough` maps the real one instead).

use crate::esr::{Esr, ec};
use crate::vcpu::GuestRegs;

/// A decoded MMIO access (from a data abort with a valid syndrome).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct MmioAccess {
    /// A store.
    pub write: bool,
    /// Access size in bytes (1, 2, 4, 8).
    pub size: u8,
    /// The general-purpose register (`SRT`; 31 is the zero register).
    pub reg: u8,
    /// A load sign-extends (`SSE`).
    pub sign_extend: bool,
    /// A load writes the whole 64-bit register (`SF`); else 32 bits.
    pub sixty_four: bool,
}

impl MmioAccess {
    /// Decodes a data abort from the guest. `None` when the syndrome does not
    /// describe the access (`ISV` = 0: a load/store pair, a writeback form,
    /// and so on), which cannot be emulated.
    #[must_use]
    pub fn decode(esr: Esr) -> Option<Self> {
        let iss = esr.iss();
        if esr.ec() != ec::DABT_LOWER || iss & (1 << 24) == 0 {
            return None;
        }
        Some(Self {
            write: iss & (1 << 6) != 0,
            size: 1 << ((iss >> 22) & 3),
            reg: ((iss >> 16) & 0x1f) as u8,
            sign_extend: iss & (1 << 21) != 0,
            sixty_four: iss & (1 << 15) != 0,
        })
    }

    /// The value a store writes (from the source register, zero for xzr).
    #[must_use]
    pub fn store_value(&self, regs: &GuestRegs) -> u64 {
        let v = if self.reg == 31 {
            0
        } else {
            regs.x[usize::from(self.reg)]
        };
        v & size_mask(self.size)
    }

    /// Completes a load: writes `value` to the target register as the
    /// instruction would (sign-extended if asked, 32 or 64 bits).
    pub fn complete_load(&self, regs: &mut GuestRegs, value: u64) {
        if self.reg == 31 {
            return;
        }
        let bits = u32::from(self.size) * 8;
        let mut v = value & size_mask(self.size);
        if self.sign_extend && bits < 64 && v >> (bits - 1) & 1 == 1 {
            v |= !size_mask(self.size);
        }
        if !self.sixty_four {
            v &= 0xffff_ffff;
        }
        regs.x[usize::from(self.reg)] = v;
    }
}

fn size_mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1 << (u32::from(size) * 8)) - 1
    }
}

/// Why an access to an emulated device was refused: the caller answers it
/// with a synchronous external abort to the guest (as a bus would answer an
/// access the device cannot take).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum MmioError {
    /// The syndrome does not describe the access (`ISV` = 0), so it cannot
    /// be emulated.
    NoSyndrome,
    /// An access size the register does not support, or a misaligned one.
    BadAccess,
}

/// A device whose registers the hypervisor emulates.
pub trait MmioDevice {
    /// Reads `size` bytes at `offset` into the device.
    fn read(&mut self, offset: u64, size: u8) -> u64;
    /// Writes `value` (`size` bytes) at `offset`.
    fn write(&mut self, offset: u64, value: u64, size: u8);

    /// Reads, or refuses an access the device does not take (a size the
    /// register does not support). Devices that take every access (the
    /// PL011) keep this default.
    ///
    /// # Errors
    ///
    /// [`MmioError::BadAccess`] for an access the caller must answer with
    /// an external abort.
    fn try_read(&mut self, offset: u64, size: u8) -> Result<u64, MmioError> {
        Ok(self.read(offset, size))
    }

    /// Writes, or refuses an access the device does not take; see
    /// [`MmioDevice::try_read`].
    ///
    /// # Errors
    ///
    /// [`MmioError::BadAccess`] for an access the caller must answer with
    /// an external abort.
    fn try_write(&mut self, offset: u64, value: u64, size: u8) -> Result<(), MmioError> {
        self.write(offset, value, size);
        Ok(())
    }
}

/// An emulated PL011: transmit only. Writes to the data register go to
/// `out`; the flag register says the transmit FIFO is empty and the receive
/// FIFO is empty; the control registers keep what is written; the
/// identification registers read as QEMU's PL011.
#[derive(Debug)]
pub struct Pl011<F: FnMut(u8)> {
    out: F,
    /// IBRD, FBRD, LCR_H, CR, IFLS, IMSC, DMACR, in register order.
    control: [u32; 7],
}

mod reg {
    pub const DR: u64 = 0x000;
    pub const FR: u64 = 0x018;
    pub const IBRD: u64 = 0x024;
    pub const DMACR: u64 = 0x048;
    pub const IMSC: u64 = 0x038;
    pub const PERIPH_ID0: u64 = 0xfe0;
    pub const FR_RXFE: u64 = 1 << 4;
    pub const FR_TXFE: u64 = 1 << 7;
}

/// `PeriphID0..3`, `PCellID0..3` of a PL011, as QEMU's reads.
const PL011_ID: [u64; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

impl<F: FnMut(u8)> Pl011<F> {
    /// A UART that sends what the guest transmits to `out`.
    pub fn new(out: F) -> Self {
        Self {
            out,
            control: [0; 7],
        }
    }

    /// Index into `control` of a control register offset.
    fn control_index(offset: u64) -> Option<usize> {
        match offset {
            // IBRD, FBRD, LCR_H, CR, IFLS, IMSC
            reg::IBRD..=reg::IMSC if offset.is_multiple_of(4) => {
                Some(((offset - reg::IBRD) / 4) as usize)
            }
            reg::DMACR => Some(6),
            _ => None,
        }
    }
}

impl<F: FnMut(u8)> MmioDevice for Pl011<F> {
    fn read(&mut self, offset: u64, _size: u8) -> u64 {
        match offset {
            reg::FR => reg::FR_RXFE | reg::FR_TXFE,
            reg::PERIPH_ID0..=0xffc if offset.is_multiple_of(4) => {
                PL011_ID[((offset - reg::PERIPH_ID0) / 4) as usize]
            }
            _ => Self::control_index(offset).map_or(0, |i| u64::from(self.control[i])),
        }
    }

    fn write(&mut self, offset: u64, value: u64, _size: u8) {
        if offset == reg::DR {
            (self.out)(value as u8);
        } else if let Some(i) = Self::control_index(offset) {
            self.control[i] = value as u32;
        }
        // Everything else (RSR/ECR, ICR, read-only registers) is ignored.
    }
}

/// Emulates the access `esr` describes at `offset` into `device`, updating
/// the guest's registers and stepping past the instruction. Returns `false`
/// (and changes nothing) when the access cannot be emulated.
pub fn emulate(device: &mut dyn MmioDevice, esr: Esr, offset: u64, regs: &mut GuestRegs) -> bool {
    let Some(access) = MmioAccess::decode(esr) else {
        return false;
    };
    if access.write {
        device.write(offset, access.store_value(regs), access.size);
    } else {
        let v = device.read(offset, access.size);
        access.complete_load(regs, v);
    }
    // A 32-bit instruction (IL = 1) the guest is past.
    regs.elr = regs.elr.wrapping_add(if esr.il() { 4 } else { 2 });
    true
}

/// Like [`emulate`], for devices that refuse some accesses (the virtual
/// GIC): emulates the access or says why not, in which case nothing changed
/// and the caller injects a synchronous external abort.
///
/// # Errors
///
/// [`MmioError::NoSyndrome`] when the syndrome does not describe the access,
/// [`MmioError::BadAccess`] when the device refuses it.
pub fn emulate_or_abort(
    device: &mut dyn MmioDevice,
    esr: Esr,
    offset: u64,
    regs: &mut GuestRegs,
) -> Result<(), MmioError> {
    let access = MmioAccess::decode(esr).ok_or(MmioError::NoSyndrome)?;
    if access.write {
        device.try_write(offset, access.store_value(regs), access.size)?;
    } else {
        let v = device.try_read(offset, access.size)?;
        access.complete_load(regs, v);
    }
    regs.elr = regs.elr.wrapping_add(if esr.il() { 4 } else { 2 });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// ESR of a data abort with a valid syndrome.
    fn dabt(write: bool, size_log2: u64, reg: u64, sse: bool, sf: bool) -> Esr {
        Esr((u64::from(ec::DABT_LOWER) << 26)
            | (1 << 25)
            | (1 << 24)
            | (size_log2 << 22)
            | (u64::from(sse) << 21)
            | (reg << 16)
            | (u64::from(sf) << 15)
            | (u64::from(write) << 6)
            | 0x07)
    }

    #[test]
    fn decodes_the_syndrome_and_refuses_isv_zero() {
        let a = MmioAccess::decode(dabt(true, 2, 5, false, false)).expect("valid");
        assert_eq!(
            a,
            MmioAccess {
                write: true,
                size: 4,
                reg: 5,
                sign_extend: false,
                sixty_four: false
            }
        );
        let no_isv = Esr(dabt(true, 2, 5, false, false).0 & !(1 << 24));
        assert_eq!(MmioAccess::decode(no_isv), None);
    }

    #[test]
    fn uart_transmits_and_identifies() {
        let mut sent = Vec::new();
        let mut uart = Pl011::new(|b| sent.push(b));
        let mut regs = GuestRegs {
            elr: 0x1000,
            ..GuestRegs::default()
        };
        regs.x[3] = u64::from(b'A') | 0xffff_ff00;
        assert!(emulate(
            &mut uart,
            dabt(true, 2, 3, false, false),
            0x000,
            &mut regs
        ));
        assert_eq!(regs.elr, 0x1004);
        // FR: transmit FIFO empty, never full.
        assert!(emulate(
            &mut uart,
            dabt(false, 2, 7, false, false),
            0x018,
            &mut regs
        ));
        assert_eq!(regs.x[7], 0x90);
        // PeriphID0, and a control register that keeps its value.
        assert!(emulate(
            &mut uart,
            dabt(false, 2, 8, false, true),
            0xfe0,
            &mut regs
        ));
        assert_eq!(regs.x[8], 0x11);
        regs.x[9] = 0x301;
        assert!(emulate(
            &mut uart,
            dabt(true, 2, 9, false, false),
            0x030,
            &mut regs
        ));
        assert!(emulate(
            &mut uart,
            dabt(false, 2, 10, false, false),
            0x030,
            &mut regs
        ));
        assert_eq!(regs.x[10], 0x301);
        assert_eq!(sent, b"A");
    }

    #[test]
    fn loads_sign_extend_and_xzr_is_discarded() {
        let mut regs = GuestRegs::default();
        let a = MmioAccess::decode(dabt(false, 0, 4, true, true)).expect("valid");
        a.complete_load(&mut regs, 0x80);
        assert_eq!(regs.x[4], 0xffff_ffff_ffff_ff80);
        let a = MmioAccess::decode(dabt(false, 0, 4, true, false)).expect("valid");
        a.complete_load(&mut regs, 0x80);
        assert_eq!(regs.x[4], 0xffff_ff80, "W register: upper half cleared");
        let a = MmioAccess::decode(dabt(false, 2, 31, false, false)).expect("valid");
        let before = regs.clone();
        a.complete_load(&mut regs, 0x1234);
        assert_eq!(regs, before);
        let a = MmioAccess::decode(dabt(true, 3, 31, false, true)).expect("valid");
        assert_eq!(a.store_value(&regs), 0, "xzr stores zero");
    }
}
