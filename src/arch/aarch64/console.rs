//! The console: QEMU virt's first PL011 (through arm-pl011-uart), a `log`
//! backend over it, and the unconditional marker lines xtask reads.
//!
//! The UART sits at the fixed address of the `virt` board (0x0900_0000),
//! which the boot map and the EL2 map both cover as device memory. Guest
//! output through the emulated PL011 arrives here byte by byte ([`putc`])
//! and is printed behind a prefix, escaped; a guest given the real UART
//! (`guest.uart=passthrough`, a Linux guest) writes it directly, which is
//! why every marker the hypervisor prints carries the run's secret token.

use arm_pl011_uart::{PL011Registers, Uart, UniqueMmioPointer};
use core::fmt::{self, Write};
use core::ptr::NonNull;
use log::{LevelFilter, Log, Metadata, Record};
use spin::mutex::SpinMutex;

/// Physical (and EL2 virtual) address of the PL011 on QEMU `virt`.
pub const PL011_BASE: usize = 0x0900_0000;

/// The console: the UART, and which VM's line is open (its bytes printed
/// since its last newline), if any.
struct Console {
    uart: Uart<'static>,
    guest_line_open: Option<usize>,
}

impl Console {
    /// Ends an open guest line, so what the hypervisor prints next starts a
    /// line of its own: no guest byte can precede a marker on its line.
    fn end_guest_line(&mut self) {
        if self.guest_line_open.take().is_some() {
            self.uart.write_word(b'\n');
        }
    }
}

static CONSOLE: SpinMutex<Option<Console>> = SpinMutex::new(None);

/// The prefix of every line of VM 1's output on the console (VM n's is
/// `vm<n>| `). A guest can therefore never print a line that starts like
/// one of the hypervisor's (`LAZYHYP-...`, log lines), and xtask reads
/// guest lines only after it.
pub const GUEST_PREFIX: &str = "vm1| ";

/// The run's token (`run.token=`), carried by every marker line.
static TOKEN: spin::Once<crate::bootargs::RunToken> = spin::Once::new();

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
    *CONSOLE.lock() = Some(Console {
        uart: Uart::new(regs),
        guest_line_open: None,
    });
    // Only fails if a logger is already set, which would mean init ran twice.
    log::set_logger(&LOGGER).expect("console::init called twice");
    log::set_max_level(level);
}

/// Records the run's token for [`marker`]. Call once, when the bootargs are
/// known.
pub fn set_token(token: crate::bootargs::RunToken) {
    TOKEN.call_once(|| token);
}

/// Writes formatted text to the console, whatever the log level, starting
/// on a fresh line if guest output left one open.
pub fn print(args: fmt::Arguments<'_>) {
    if let Some(console) = CONSOLE.lock().as_mut() {
        console.end_guest_line();
        // The PL011 writer never fails.
        let _ = console.uart.write_fmt(args);
    }
}

/// Prints one marker line, `LAZYHYP-<kind>: token=<token> <text>`, for
/// xtask: only lines with this run's token count (docs/run-contract.md).
/// Safe to call on the panic path (see [`print_in_panic`]).
pub fn marker(kind: &str, args: fmt::Arguments<'_>) {
    let token = TOKEN.get().map_or("none", |t| match t.as_str() {
        "" => "none",
        s => s,
    });
    print_in_panic(format_args!("LAZYHYP-{kind}: token={token} {args}\n"));
}

/// Queues one byte VM `vm` (its index, 0 for VM 1) sent to its emulated
/// UART. Nothing is printed here: the trap handler calls this under the VM
/// lock, and writing the real UART (an MMIO access QEMU serialises) while
/// holding it would make every other vCPU of the VM wait; [`flush`], called
/// after the lock is released, prints.
pub fn push(vm: usize, byte: u8) {
    let Some(out) = OUT.get(vm) else { return };
    let mut out = out.lock();
    if out.len == OUT_MAX {
        // Not flushed since OUT_MAX bytes (no exit path left out a flush):
        // print what there is first.
        print_queued(vm, &mut out, true);
    }
    let len = out.len;
    out.bytes[len] = byte;
    out.len += 1;
}

/// Prints what VM `vm` queued: with one VM, every byte as it comes (a
/// line of its own begins with `vm<n>| `); with several VMs, whole lines
/// only (the rest waits for its newline), so lines of VMs printing at the
/// same time never mix. Bytes are escaped: printable ASCII and newline as
/// they are; carriage return dropped (it could move the terminal's cursor
/// back over the prefix); every other byte (escape sequences, control
/// characters, non-ASCII) and the backslash as `\xNN` / `\\`, so a guest
/// can neither drive the host's terminal nor forge a hypervisor line.
pub fn flush(vm: usize) {
    let Some(out) = OUT.get(vm) else { return };
    let mut out = out.lock();
    if out.len > 0 {
        print_queued(vm, &mut out, false);
    }
}

/// Several VMs: guest output is printed by whole lines ([`flush`]).
static LINE_BUFFERED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Bytes a VM's queue holds; a longer line is printed in pieces.
const OUT_MAX: usize = 256;

/// One VM's queued output.
struct OutQueue {
    bytes: [u8; OUT_MAX],
    len: usize,
}

static OUT: [SpinMutex<OutQueue>; crate::vm::config::MAX_VMS] = [const {
    SpinMutex::new(OutQueue {
        bytes: [0; OUT_MAX],
        len: 0,
    })
}; crate::vm::config::MAX_VMS];

/// Line-buffers guest output (several VMs): call once, before any VM runs.
pub fn set_line_buffered(on: bool) {
    LINE_BUFFERED.store(on, core::sync::atomic::Ordering::Relaxed);
}

/// Prints `out` (VM `vm`'s queue) as [`flush`] says; `all`: partial lines
/// too (a full queue).
fn print_queued(vm: usize, out: &mut OutQueue, all: bool) {
    let mut guard = CONSOLE.lock();
    let Some(console) = guard.as_mut() else {
        out.len = 0;
        return;
    };
    let len = out.len;
    let whole_lines = LINE_BUFFERED.load(core::sync::atomic::Ordering::Relaxed) && !all;
    let printable = if whole_lines {
        out.bytes[..len]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
    } else {
        len
    };
    for i in 0..printable {
        let byte = out.bytes[i];
        if byte == b'\r' {
            continue;
        }
        if console.guest_line_open.is_some_and(|open| open != vm) {
            console.end_guest_line();
        }
        if console.guest_line_open.is_none() {
            let _ = write!(console.uart, "vm{}| ", vm + 1);
            console.guest_line_open = Some(vm);
        }
        match byte {
            b'\n' => {
                console.uart.write_word(b'\n');
                console.guest_line_open = None;
            }
            b'\\' => {
                console.uart.write_word(b'\\');
                console.uart.write_word(b'\\');
            }
            b' '..=b'~' | b'\t' => console.uart.write_word(byte),
            _ => {
                let _ = write!(console.uart, "\\x{byte:02x}");
            }
        }
    }
    if whole_lines {
        // A line of its own: the next VM's bytes start on a fresh line.
        console.end_guest_line();
    }
    out.bytes.copy_within(printable..len, 0);
    out.len = len - printable;
}

/// Turns the real UART's receive interrupt on or off (the hypervisor takes
/// it at EL2 and forwards the bytes to a guest's emulated UART).
pub fn set_rx_interrupt(on: bool) {
    if let Some(console) = CONSOLE.lock().as_mut() {
        let masks = console.uart.interrupt_masks();
        let rx = arm_pl011_uart::Interrupts::RXI | arm_pl011_uart::Interrupts::RTI;
        console
            .uart
            .set_interrupt_masks(if on { masks | rx } else { masks - rx });
    }
}

/// Hands at most `max` bytes the real UART received to `sink`, oldest
/// first; what does not fit stays in the UART. Returns how many.
pub fn drain_rx(max: usize, mut sink: impl FnMut(u8)) -> usize {
    let mut guard = CONSOLE.lock();
    let Some(console) = guard.as_mut() else {
        return 0;
    };
    let mut n = 0;
    // Bounded by `max` and by the UART's FIFO (32 on QEMU) and then some.
    for _ in 0..max.min(64) {
        match console.uart.read_word() {
            Ok(Some(b)) => {
                sink(b);
                n += 1;
            }
            // An error (framing, overrun, break) loses that byte; go on.
            Err(_) => {}
            Ok(None) => break,
        }
    }
    n
}

/// Like [`print`], for markers and the panic path: waits (bounded) for the
/// console lock, then takes it anyway, so a report gets out even if the
/// code that failed held it.
pub fn print_in_panic(args: fmt::Arguments<'_>) {
    // Several CPUs print: a holder on another CPU finishes its line within
    // microseconds, so the lock is waited for, for at most 50 ms. Held
    // longer, its holder is this CPU's own interrupted print (a panic or an
    // exception inside it), which never resumes, or a CPU that is stuck.
    let freq = super::sysreg::read_sysreg!("cntfrq_el0");
    let start = super::sysreg::read_sysreg!("cntpct_el0");
    loop {
        if let Some(mut guard) = CONSOLE.try_lock() {
            if let Some(console) = guard.as_mut() {
                console.end_guest_line();
                let _ = console.uart.write_fmt(args);
            }
            return;
        }
        if super::sysreg::read_sysreg!("cntpct_el0").wrapping_sub(start) > freq / 20 {
            break;
        }
        core::hint::spin_loop();
    }
    // SAFETY: see above: after 50 ms the holder is taken to be the code
    // that failed (it never resumes) or a stuck CPU; the report matters
    // more than a garbled line.
    unsafe { CONSOLE.force_unlock() };
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
