//! MMIO emulation: decoding a guest data abort into a register access, and
//! the emulated PL011 UART (the test guest's console by default,
//! `guest.uart=emulated`; `passthrough` maps the real one instead).

use crate::esr::{Esr, ec};
use crate::vm::vcpu::GuestRegs;

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

/// Depth of the receive FIFO with `UARTLCR_H.FEN` set (a PL011's; with the
/// FIFOs disabled it is a 1-byte holding register).
pub const PL011_FIFO_DEPTH: usize = 16;

/// An emulated PL011, modelled on QEMU's (`hw/char/pl011.c`), enough for
/// Linux's `amba-pl011` driver with interrupts.
///
/// - Transmit is instant: a write to `UARTDR` goes to `out` at once, so the
///   flag register always says the transmit FIFO is empty (`TXFE`), never
///   full nor busy; each write latches the transmit interrupt (`TXRIS`),
///   which stays set until `UARTICR.TXIC` clears it (as QEMU's does: Linux
///   turns `TXIM` on only while it has more to send, and then expects the
///   interrupt at once).
/// - Receive: bytes the hypervisor takes from the host console are pushed
///   with [`Pl011::push_rx`] into a FIFO of [`PL011_FIFO_DEPTH`] bytes (1
///   with `UARTLCR_H.FEN` clear, as on the hardware; changing `FEN` empties
///   it, as QEMU does). A byte that does not fit is dropped and counted
///   ([`Pl011::rx_dropped`]), with the overrun reported in `UARTRSR.OE`
///   and `UARTRIS.OEIS`. Reading `UARTDR` pops the oldest byte, with the
///   error bits \[11:8\] zero (0 when the FIFO is empty).
/// - The receive interrupt (`RXRIS`) is a level: set while the FIFO holds
///   a byte. There is no receive timeout: like QEMU, the trigger level is
///   one byte whatever `UARTIFLS` says (kept for reading back), so no byte
///   waits below a trigger level for a timeout that would never come;
///   `RTRIS` stays clear. `UARTICR.RXIC` cannot clear a level.
/// - `UARTMIS` = `UARTRIS` & `UARTIMSC`; the interrupt output
///   ([`Pl011::irq_line`]) is high while it is non-zero.
/// - `UARTCR.LBE` (loopback): what is transmitted is also received.
/// - `UARTILPR`, `UARTIBRD`, `UARTFBRD`, `UARTLCR_H`, `UARTCR`, `UARTIFLS`
///   keep what is written (masked to their fields); the enable bits of
///   `UARTCR` are not enforced (QEMU's are not either; the test guest
///   transmits without ever setting them). `UARTDMACR` is RAZ/WI (no DMA),
///   and so is every offset where no register lives. The identification
///   registers read as QEMU's PL011.
#[derive(Debug)]
pub struct Pl011<F: FnMut(u8)> {
    out: F,
    /// The receive FIFO, a ring: `rx_len` bytes from `rx_head`.
    rx: [u8; PL011_FIFO_DEPTH],
    rx_head: usize,
    rx_len: usize,
    /// Bytes dropped because the receive FIFO was full.
    rx_dropped: u64,
    /// `UARTRSR`: the overrun bit only.
    rsr: u32,
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    /// The latched raw interrupt bits (`TXRIS`, `OERIS`); `RXRIS` is
    /// derived from the FIFO.
    latched: u32,
}

/// Register offsets and bits.
mod reg {
    pub const DR: u64 = 0x000;
    pub const RSR: u64 = 0x004;
    pub const FR: u64 = 0x018;
    pub const ILPR: u64 = 0x020;
    pub const IBRD: u64 = 0x024;
    pub const FBRD: u64 = 0x028;
    pub const LCR_H: u64 = 0x02c;
    pub const CR: u64 = 0x030;
    pub const IFLS: u64 = 0x034;
    pub const IMSC: u64 = 0x038;
    pub const RIS: u64 = 0x03c;
    pub const MIS: u64 = 0x040;
    pub const ICR: u64 = 0x044;
    pub const PERIPH_ID0: u64 = 0xfe0;
    pub const CELL_ID3: u64 = 0xffc;

    /// `UARTFR`: receive FIFO empty.
    pub const FR_RXFE: u32 = 1 << 4;
    /// `UARTFR`: receive FIFO full.
    pub const FR_RXFF: u32 = 1 << 6;
    /// `UARTFR`: transmit FIFO empty.
    pub const FR_TXFE: u32 = 1 << 7;

    /// `UARTRSR`: overrun error.
    pub const RSR_OE: u32 = 1 << 3;
    /// `UARTLCR_H`: FIFOs enabled.
    pub const LCR_H_FEN: u32 = 1 << 4;
    /// `UARTCR`: loopback.
    pub const CR_LBE: u32 = 1 << 7;
    /// `UARTCR` at reset: `TXE` and `RXE`.
    pub const CR_RESET: u32 = 0x300;
    /// `UARTIFLS` at reset: both trigger levels at half full.
    pub const IFLS_RESET: u32 = 0x12;

    /// Interrupt bits (`UARTIMSC`, `UARTRIS`, `UARTMIS`, `UARTICR`).
    pub const INT_RX: u32 = 1 << 4;
    pub const INT_TX: u32 = 1 << 5;
    pub const INT_OE: u32 = 1 << 10;
    /// Every interrupt bit (modem status, RX, TX, timeout, errors).
    pub const INT_ALL: u32 = 0x7ff;
}

/// `PeriphID0..3`, `PCellID0..3` of a PL011, as QEMU's reads.
const PL011_ID: [u64; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

impl<F: FnMut(u8)> Pl011<F> {
    /// A UART, in its reset state, that sends what the guest transmits to
    /// `out`.
    pub fn new(out: F) -> Self {
        Self {
            out,
            rx: [0; PL011_FIFO_DEPTH],
            rx_head: 0,
            rx_len: 0,
            rx_dropped: 0,
            rsr: 0,
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: reg::CR_RESET,
            ifls: reg::IFLS_RESET,
            imsc: 0,
            latched: 0,
        }
    }

    /// The receive FIFO's depth now: 16 with `FEN`, else 1.
    fn rx_depth(&self) -> usize {
        if self.lcr_h & reg::LCR_H_FEN != 0 {
            PL011_FIFO_DEPTH
        } else {
            1
        }
    }

    /// Receives `byte` (from the host console): appends it to the receive
    /// FIFO. Returns `false`, and drops and counts the byte, when the FIFO
    /// is full (an overrun: `UARTRSR.OE` and `UARTRIS.OEIS` are set). The
    /// caller then samples [`Pl011::irq_line`].
    pub fn push_rx(&mut self, byte: u8) -> bool {
        if self.rx_len >= self.rx_depth() {
            self.rx_dropped += 1;
            self.rsr |= reg::RSR_OE;
            self.latched |= reg::INT_OE;
            return false;
        }
        self.rx[(self.rx_head + self.rx_len) % PL011_FIFO_DEPTH] = byte;
        self.rx_len += 1;
        true
    }

    /// How many more bytes [`Pl011::push_rx`] would take now (the caller
    /// can leave the rest in the host's buffer instead of dropping them).
    #[must_use]
    pub fn rx_space(&self) -> usize {
        self.rx_depth().saturating_sub(self.rx_len)
    }

    /// Bytes dropped so far because the receive FIFO was full.
    #[must_use]
    pub fn rx_dropped(&self) -> u64 {
        self.rx_dropped
    }

    /// Pops the oldest received byte.
    fn pop_rx(&mut self) -> Option<u8> {
        if self.rx_len == 0 {
            return None;
        }
        let byte = self.rx[self.rx_head];
        self.rx_head = (self.rx_head + 1) % PL011_FIFO_DEPTH;
        self.rx_len -= 1;
        Some(byte)
    }

    /// Empties the receive FIFO.
    fn reset_rx(&mut self) {
        self.rx_head = 0;
        self.rx_len = 0;
    }

    /// `UARTFR`.
    fn flags(&self) -> u32 {
        let mut fr = reg::FR_TXFE;
        if self.rx_len == 0 {
            fr |= reg::FR_RXFE;
        }
        if self.rx_len >= self.rx_depth() {
            fr |= reg::FR_RXFF;
        }
        fr
    }

    /// `UARTRIS`: the latched bits, and `RXRIS` while the FIFO holds a
    /// byte (the trigger level is one byte; see the type's documentation).
    #[must_use]
    pub fn raw_interrupts(&self) -> u32 {
        self.latched | if self.rx_len > 0 { reg::INT_RX } else { 0 }
    }

    /// `UARTMIS`: the raw interrupts the guest unmasked.
    #[must_use]
    pub fn masked_interrupts(&self) -> u32 {
        self.raw_interrupts() & self.imsc
    }

    /// The level of the interrupt output (`UARTINTR`): high while
    /// `UARTMIS` is not zero. The hypervisor passes it to the virtual GIC
    /// (`Vgic::set_spi_level`) after every access and every
    /// [`Pl011::push_rx`].
    #[must_use]
    pub fn irq_line(&self) -> bool {
        self.masked_interrupts() != 0
    }

    /// Transmits `byte`: out at once, latching `TXRIS`; with loopback, also
    /// received.
    fn transmit(&mut self, byte: u8) {
        (self.out)(byte);
        if self.cr & reg::CR_LBE != 0 {
            self.push_rx(byte);
        }
        self.latched |= reg::INT_TX;
    }
}

impl<F: FnMut(u8)> MmioDevice for Pl011<F> {
    fn read(&mut self, offset: u64, _size: u8) -> u64 {
        let value = match offset {
            reg::DR => self.pop_rx().map_or(0, u32::from),
            reg::RSR => self.rsr,
            reg::FR => self.flags(),
            reg::ILPR => self.ilpr,
            reg::IBRD => self.ibrd,
            reg::FBRD => self.fbrd,
            reg::LCR_H => self.lcr_h,
            reg::CR => self.cr,
            reg::IFLS => self.ifls,
            reg::IMSC => self.imsc,
            reg::RIS => self.raw_interrupts(),
            reg::MIS => self.masked_interrupts(),
            reg::PERIPH_ID0..=reg::CELL_ID3 if offset.is_multiple_of(4) => {
                return PL011_ID[((offset - reg::PERIPH_ID0) / 4) as usize];
            }
            // ICR is write-only; DMACR (0x048) is RAZ/WI; nothing else lives
            // here.
            _ => 0,
        };
        u64::from(value)
    }

    fn write(&mut self, offset: u64, value: u64, _size: u8) {
        let value = value as u32;
        match offset {
            reg::DR => self.transmit(value as u8),
            // UARTECR: any write clears the errors.
            reg::RSR => self.rsr = 0,
            reg::ILPR => self.ilpr = value & 0xff,
            reg::IBRD => self.ibrd = value & 0xffff,
            reg::FBRD => self.fbrd = value & 0x3f,
            reg::LCR_H => {
                let value = value & 0xff;
                if (self.lcr_h ^ value) & reg::LCR_H_FEN != 0 {
                    self.reset_rx();
                }
                self.lcr_h = value;
            }
            reg::CR => self.cr = value & 0xffff,
            reg::IFLS => self.ifls = value & 0x3f,
            reg::IMSC => self.imsc = value & reg::INT_ALL,
            reg::ICR => self.latched &= !value,
            // FR, RIS, MIS and the ID registers are read-only; DMACR (0x048)
            // is RAZ/WI (no DMA); nothing else lives here.
            _ => {}
        }
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
    crate::vm::vcpu::step_over(regs, esr.il());
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
    crate::vm::vcpu::step_over(regs, esr.il());
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

    /// What a test UART transmitted.
    type Sent = alloc::rc::Rc<core::cell::RefCell<Vec<u8>>>;

    /// A UART whose output goes to a shared buffer.
    fn uart() -> (Pl011<impl FnMut(u8)>, Sent) {
        let sent = alloc::rc::Rc::new(core::cell::RefCell::new(Vec::new()));
        let out = sent.clone();
        (Pl011::new(move |b| out.borrow_mut().push(b)), sent)
    }

    /// `UARTLCR_H`: 8 bits, FIFOs enabled (what Linux writes).
    const LCR_H_8N1_FIFO: u64 = 0x70;
    /// Interrupt bits.
    const RXIM: u64 = 1 << 4;
    const TXIM: u64 = 1 << 5;
    const RTIM: u64 = 1 << 6;
    const OEIM: u64 = 1 << 10;

    #[test]
    fn rx_fifo_keeps_order_and_counts_what_overflows() {
        let (mut u, _) = uart();
        u.write(reg::LCR_H, LCR_H_8N1_FIFO, 4);
        assert_eq!(u.rx_space(), PL011_FIFO_DEPTH);
        for b in 0..PL011_FIFO_DEPTH as u8 {
            assert!(u.push_rx(b'a' + b));
        }
        assert_eq!(u.rx_space(), 0);
        assert!(!u.push_rx(b'!'), "full: dropped");
        assert!(!u.push_rx(b'?'));
        assert_eq!(u.rx_dropped(), 2);
        assert_eq!(u.read(reg::RSR, 4), 1 << 3, "RSR.OE");
        assert_ne!(u.read(reg::RIS, 4) & OEIM, 0, "RIS.OEIS");
        for b in 0..PL011_FIFO_DEPTH as u8 {
            assert_eq!(u.read(reg::DR, 4), u64::from(b'a' + b), "error bits 0");
        }
        assert_eq!(u.read(reg::DR, 4), 0, "empty FIFO reads 0");
        // The ring wraps: push and pop across its end.
        for round in 0..3u8 {
            for b in 0..10 {
                assert!(u.push_rx(round * 10 + b));
            }
            for b in 0..10 {
                assert_eq!(u.read(reg::DR, 2), u64::from(round * 10 + b));
            }
        }
        // ECR clears the error, ICR the latched overrun interrupt.
        u.write(reg::RSR, 0, 4);
        assert_eq!(u.read(reg::RSR, 4), 0);
        u.write(reg::ICR, OEIM, 4);
        assert_eq!(u.read(reg::RIS, 4) & OEIM, 0);
        assert_eq!(u.rx_dropped(), 2, "the count stays");
    }

    #[test]
    fn without_fifo_enable_the_receiver_holds_one_byte() {
        let (mut u, _) = uart();
        assert_eq!(u.rx_space(), 1, "reset: FEN clear");
        assert!(u.push_rx(1));
        assert!(!u.push_rx(2));
        assert_eq!(u.read(reg::FR, 4) & 0x50, 0x40, "RXFF, not RXFE");
        // Changing FEN empties the FIFO (as QEMU's does).
        u.write(reg::LCR_H, LCR_H_8N1_FIFO, 4);
        assert_eq!(u.read(reg::FR, 4) & 0x50, 0x10, "RXFE");
        assert!(u.push_rx(3));
        u.write(reg::LCR_H, LCR_H_8N1_FIFO, 4);
        assert_eq!(u.read(reg::DR, 4), 3, "the same FEN keeps the FIFO");
    }

    #[test]
    fn flag_register_follows_the_fifo_and_tx_is_always_empty() {
        let (mut u, sent) = uart();
        u.write(reg::LCR_H, LCR_H_8N1_FIFO, 4);
        let fr = |u: &mut Pl011<_>| u.read(reg::FR, 4);
        assert_eq!(fr(&mut u), 0x90, "TXFE | RXFE");
        u.push_rx(b'x');
        assert_eq!(fr(&mut u), 0x80, "not empty, not full");
        while u.push_rx(b'y') {}
        assert_eq!(fr(&mut u), 0xc0, "RXFF");
        u.write(reg::DR, u64::from(b'z'), 4);
        assert_eq!(fr(&mut u) & 0xa8, 0x80, "TX: empty, not full, not busy");
        u.read(reg::DR, 4);
        assert_eq!(fr(&mut u), 0x80);
        assert_eq!(*sent.borrow(), b"z");
    }

    #[test]
    fn imsc_ris_mis_icr() {
        let (mut u, _) = uart();
        u.write(reg::LCR_H, LCR_H_8N1_FIFO, 4);
        u.write(reg::IMSC, 0xffff_ffff, 4);
        assert_eq!(u.read(reg::IMSC, 4), 0x7ff, "IMSC keeps its 11 bits");
        u.write(reg::IMSC, 0, 4);
        assert_eq!(u.read(reg::RIS, 4), 0, "reset: nothing raised");
        u.push_rx(b'a');
        u.write(reg::DR, u64::from(b'b'), 4);
        assert_eq!(u.read(reg::RIS, 4), RXIM | TXIM);
        assert_eq!(u.read(reg::MIS, 4), 0, "all masked");
        assert!(!u.irq_line());
        u.write(reg::IMSC, TXIM, 4);
        assert_eq!(u.read(reg::MIS, 4), TXIM);
        // ICR is write-1-to-clear of the latched bits; RXRIS is a level.
        u.write(reg::ICR, RXIM | RTIM, 4);
        assert_eq!(u.read(reg::RIS, 4), RXIM | TXIM, "RX level stays");
        u.write(reg::ICR, TXIM, 4);
        assert_eq!(u.read(reg::RIS, 4), RXIM);
        assert_eq!(u.read(reg::MIS, 4), 0);
        assert_eq!(u.read(reg::ICR, 4), 0, "ICR is write-only");
        // Writes to read-only registers change nothing.
        u.write(reg::RIS, 0x7ff, 4);
        u.write(reg::MIS, 0x7ff, 4);
        u.write(reg::FR, 0, 4);
        assert_eq!(u.read(reg::RIS, 4), RXIM);
        assert_eq!(u.read(reg::FR, 4), 0x80);
    }

    #[test]
    fn the_line_rises_on_rx_with_rxim_and_falls_when_the_fifo_is_read_empty() {
        let (mut u, _) = uart();
        u.write(reg::LCR_H, LCR_H_8N1_FIFO, 4);
        u.push_rx(b'1');
        assert!(!u.irq_line(), "RXIM clear");
        u.write(reg::IMSC, RXIM, 4);
        assert!(u.irq_line(), "unmasking a raised interrupt");
        u.push_rx(b'2');
        assert_eq!(u.read(reg::DR, 4), u64::from(b'1'));
        assert!(u.irq_line(), "a byte left");
        assert_eq!(u.read(reg::DR, 4), u64::from(b'2'));
        assert!(!u.irq_line(), "read empty");
        assert_eq!(u.read(reg::MIS, 4), 0);
        u.push_rx(b'3');
        assert!(u.irq_line(), "again");
        u.write(reg::IMSC, 0, 4);
        assert!(!u.irq_line(), "masked");
    }

    #[test]
    fn tx_interrupt_is_raised_by_a_write_and_cleared_by_icr() {
        let (mut u, sent) = uart();
        u.write(reg::IMSC, TXIM, 4);
        assert!(!u.irq_line(), "nothing sent yet");
        u.write(reg::DR, u64::from(b'a'), 4);
        assert!(u.irq_line());
        u.write(reg::ICR, TXIM, 4);
        assert!(!u.irq_line());
        u.write(reg::DR, u64::from(b'b'), 4);
        assert!(u.irq_line());
        // Linux's stop_tx masks it instead of clearing it.
        u.write(reg::IMSC, 0, 4);
        assert!(!u.irq_line());
        assert_ne!(u.read(reg::RIS, 4) & TXIM, 0, "still raised");
        assert_eq!(*sent.borrow(), b"ab");
    }

    #[test]
    fn registers_keep_their_fields_and_the_rest_is_raz_wi() {
        let (mut u, _) = uart();
        assert_eq!(u.read(reg::CR, 4), 0x300, "reset: TXE | RXE");
        assert_eq!(u.read(reg::IFLS, 4), 0x12, "reset: half full");
        for (offset, mask) in [
            (reg::ILPR, 0xff),
            (reg::IBRD, 0xffff),
            (reg::FBRD, 0x3f),
            (reg::LCR_H, 0xff),
            (reg::CR, 0xffff),
            (reg::IFLS, 0x3f),
            (reg::IMSC, 0x7ff),
        ] {
            u.write(offset, u64::MAX, 4);
            assert_eq!(u.read(offset, 4), mask, "{offset:#x}");
        }
        // DMACR (no DMA), then offsets where no register lives.
        for offset in [0x048, 0x008, 0x01c, 0x04c, 0x800, 0xfdc, 0x031] {
            u.write(offset, u64::MAX, 4);
            assert_eq!(u.read(offset, 4), 0, "{offset:#x}");
        }
        // The ID registers are read-only.
        u.write(reg::PERIPH_ID0, 0xff, 4);
        assert_eq!(u.read(reg::PERIPH_ID0, 4), 0x11);
        assert_eq!(u.read(reg::CELL_ID3, 4), 0xb1);
    }

    #[test]
    fn loopback_receives_what_is_sent() {
        let (mut u, sent) = uart();
        u.write(reg::LCR_H, LCR_H_8N1_FIFO, 4);
        u.write(reg::CR, 0x381, 4);
        u.write(reg::DR, u64::from(b'q'), 4);
        assert_eq!(u.read(reg::DR, 4), u64::from(b'q'));
        u.write(reg::CR, 0x301, 4);
        u.write(reg::DR, u64::from(b'r'), 4);
        assert_eq!(u.read(reg::FR, 4) & 0x10, 0x10, "no loopback: RXFE");
        assert_eq!(*sent.borrow(), b"qr");
    }

    /// Linux's amba-pl011 bring-up and first I/O, through the trap path
    /// with the 16-bit accesses it makes on QEMU `virt` (no `reg-io-width`
    /// in the device tree).
    #[test]
    fn linux_like_init_transmit_and_receive() {
        let (mut u, sent) = uart();
        let mut regs = GuestRegs::default();
        let mut write = |u: &mut Pl011<_>, offset: u64, value: u64| {
            regs.x[1] = value;
            assert!(emulate(
                u,
                dabt(true, 1, 1, false, false),
                offset,
                &mut regs
            ));
        };
        let mut regs_r = GuestRegs::default();
        let mut read = |u: &mut Pl011<_>, offset: u64| -> u64 {
            assert!(emulate(
                u,
                dabt(false, 1, 2, false, false),
                offset,
                &mut regs_r
            ));
            regs_r.x[2]
        };
        // pl011_hwinit: clear every interrupt, mask them all.
        write(&mut u, reg::ICR, 0x7ff);
        write(&mut u, reg::IMSC, 0);
        // pl011_startup: IFLS, CR = 0 then the line settings and baud rate.
        write(&mut u, reg::IFLS, 0x12);
        write(&mut u, reg::CR, 0);
        write(&mut u, reg::IBRD, 13);
        write(&mut u, reg::FBRD, 1);
        write(&mut u, reg::LCR_H, LCR_H_8N1_FIFO);
        write(&mut u, reg::CR, 0x301);
        // pl011_enable_interrupts: clear RX, drain, unmask RX and timeout.
        write(&mut u, reg::ICR, RTIM | RXIM);
        assert_ne!(read(&mut u, reg::FR) & 0x10, 0, "nothing to drain");
        write(&mut u, reg::IMSC, RTIM | RXIM);
        assert!(!u.irq_line());
        assert_eq!(read(&mut u, reg::IBRD), 13);
        assert_eq!(read(&mut u, reg::LCR_H), LCR_H_8N1_FIFO);
        // Transmit: the FIFO is never full, the byte goes out at once; TXIM
        // stays masked so the line stays low.
        assert_eq!(read(&mut u, reg::FR) & 0x20, 0, "TXFF clear");
        write(&mut u, reg::DR, u64::from(b'L'));
        assert!(!u.irq_line());
        assert_eq!(*sent.borrow(), b"L");
        // More to send: start_tx unmasks TXIM and expects the interrupt.
        write(&mut u, reg::IMSC, RTIM | RXIM | TXIM);
        assert!(u.irq_line());
        assert_eq!(read(&mut u, reg::MIS), TXIM);
        write(&mut u, reg::DR, u64::from(b'!'));
        write(&mut u, reg::IMSC, RTIM | RXIM); // stop_tx
        assert!(!u.irq_line());
        // Receive: the line rises, the handler reads MIS, drains the FIFO
        // until RXFE, and the line falls.
        assert!(u.push_rx(b'k'));
        assert!(u.irq_line());
        assert_eq!(read(&mut u, reg::MIS), RXIM);
        write(&mut u, reg::ICR, 0); // status & !(TXIS | RTIS | RXIS)
        assert_eq!(read(&mut u, reg::FR) & 0x10, 0);
        assert_eq!(read(&mut u, reg::DR), u64::from(b'k'));
        assert_ne!(read(&mut u, reg::FR) & 0x10, 0, "RXFE");
        assert!(!u.irq_line());
        assert_eq!(read(&mut u, reg::MIS), 0);
        assert_eq!(*sent.borrow(), b"L!");
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
