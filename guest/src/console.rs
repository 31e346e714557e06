//! Output through the PL011 that lazyhyp passes through at IPA 0x0900_0000.

use arm_pl011_uart::{PL011Registers, Uart, UniqueMmioPointer};
use core::fmt::{self, Write};
use core::ptr::NonNull;
use spin::mutex::SpinMutex;

/// IPA of the passed-through PL011.
const PL011_IPA: usize = 0x0900_0000;

static UART: SpinMutex<Option<Uart<'static>>> = SpinMutex::new(None);

/// Sets up the console.
pub fn init() {
    // SAFETY: the PL011's page is mapped as device memory by the boot page
    // table (stage 1) and by lazyhyp (stage 2); this is the guest's only
    // `Uart` for it.
    let regs = unsafe {
        UniqueMmioPointer::new(NonNull::new(PL011_IPA as *mut PL011Registers).expect("non-null"))
    };
    *UART.lock() = Some(Uart::new(regs));
}

/// Writes formatted text.
pub fn print(args: fmt::Arguments<'_>) {
    if let Some(uart) = UART.lock().as_mut() {
        let _ = uart.write_fmt(args);
    }
}

/// For the panic path: takes the lock even if the panicking code held it.
pub fn print_in_panic(args: fmt::Arguments<'_>) {
    if UART.is_locked() {
        // SAFETY: one CPU; the holder is the code that panicked and never
        // resumes.
        unsafe { UART.force_unlock() };
    }
    print(args);
}

/// `println!` to the console.
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use println;
