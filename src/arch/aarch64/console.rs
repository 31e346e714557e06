//! The console: QEMU virt's first PL011 (through arm-pl011-uart), a `log`
//! backend over it, and the unconditional marker lines xtask reads.
//!
//! The UART sits at the fixed address of the `virt` board (0x0900_0000),
//! which the boot map and the EL2 map both cover as device memory; the guest
//! shares it through a stage-2 pass-through mapping.

use arm_pl011_uart::{PL011Registers, Uart, UniqueMmioPointer};
use core::fmt::{self, Write};
use core::ptr::NonNull;
use log::{LevelFilter, Log, Metadata, Record};
use spin::mutex::SpinMutex;

/// Physical (and EL2 virtual) address of the PL011 on QEMU `virt`.
pub const PL011_BASE: usize = 0x0900_0000;

static CONSOLE: SpinMutex<Option<Uart<'static>>> = SpinMutex::new(None);

/// Sets up the console and the logger. Call once, first thing.
///
/// # Panics
///
/// If called twice (a logger is already set).
pub fn init(level: LevelFilter) {
    // SAFETY: PL011_BASE is the PL011's MMIO page, mapped as device memory by
    // the boot page table; this is the only `Uart` made for it in the
    // hypervisor, and it lives in the console lock from here on.
    let regs = unsafe {
        UniqueMmioPointer::new(
            NonNull::new(PL011_BASE as *mut PL011Registers).expect("PL011_BASE is not null"),
        )
    };
    *CONSOLE.lock() = Some(Uart::new(regs));
    // Only fails if a logger is already set, which would mean init ran twice.
    log::set_logger(&LOGGER).expect("console::init called twice");
    log::set_max_level(level);
}

/// Writes formatted text to the console, whatever the log level.
pub fn print(args: fmt::Arguments<'_>) {
    if let Some(uart) = CONSOLE.lock().as_mut() {
        // The PL011 writer never fails.
        let _ = uart.write_fmt(args);
    }
}

/// Writes one byte the guest sent to its (emulated) UART.
pub fn putc(byte: u8) {
    if let Some(uart) = CONSOLE.lock().as_mut() {
        uart.write_word(byte);
    }
}

/// Like [`print`], for the panic path: if the panicking code held the
/// console lock, take it anyway. Only one CPU runs, and it is the one that
/// panicked, so the holder will never run again.
pub fn print_in_panic(args: fmt::Arguments<'_>) {
    if CONSOLE.is_locked() {
        // SAFETY: see above: the lock holder is the code that panicked, on
        // this (the only) CPU, and it never resumes.
        unsafe { CONSOLE.force_unlock() };
    }
    print(args);
}

/// `println!` to the console.
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::arch::aarch64::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use println;

struct Logger;

static LOGGER: Logger = Logger;

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            print(format_args!(
                "[{:<5} {}] {}\n",
                record.level(),
                record.target(),
                record.args()
            ));
        }
    }

    fn flush(&self) {}
}
