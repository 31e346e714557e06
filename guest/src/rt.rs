//! Entry (aarch64-rt at EL1), the boot page table, exceptions and panics.

use aarch64_rt::{
    ExceptionHandlers, InitialPagetable, RegisterStateRef, entry, exception_handlers,
    initial_pagetable,
};
use core::arch::asm;

use crate::console::{self, println};
use crate::hyp;

/// Stage-1 page table used from the first instruction: 1 GiB identity
/// blocks, device memory below RAM (the PL011), normal memory for RAM.
/// MAIR index 0 is Device-nGnRE, index 1 Normal write-back (aarch64-rt's
/// `DEFAULT_MAIR`).
const fn pagetable() -> InitialPagetable {
    const VALID: usize = 1;
    const ATTR_DEVICE: usize = 0 << 2;
    const ATTR_NORMAL: usize = 1 << 2;
    const SH_INNER: usize = 3 << 8;
    const AF: usize = 1 << 10;
    const PXN: usize = 1 << 53;
    const UXN: usize = 1 << 54;
    let mut table = [0; 512];
    table[0] = VALID | ATTR_DEVICE | AF | PXN | UXN;
    table[1] = (1 << 30) | VALID | ATTR_NORMAL | SH_INNER | AF;
    InitialPagetable(table)
}

initial_pagetable!(pagetable());

/// Exceptions: a synchronous one at a probe's access resumes the probe
/// (see `probe` and `gic_tests`); an IRQ goes to the GIC tests' handler;
/// anything else is unexpected, panics, and the panic handler reports a
/// failure.
struct Exceptions;
impl ExceptionHandlers for Exceptions {
    extern "C" fn sync_current(mut state: RegisterStateRef) {
        let (esr, far): (u64, u64);
        // SAFETY: reads the EL1 syndrome registers.
        unsafe {
            asm!("mrs {0}, esr_el1", "mrs {1}, far_el1", out(reg) esr, out(reg) far, options(nomem, nostack));
        }
        if crate::probe::exec_fixup(state.elr, esr) {
            // SAFETY: the exec probe's callee faulted on fetch: return to the
            // probe (its saved x30, which aarch64-rt calls `sp`) with x1 = 0,
            // as the probe expects.
            unsafe {
                let regs = state.get_mut();
                regs.elr = regs.sp as usize;
                regs.registers[1] = 0;
            }
            return;
        }
        if crate::hostile::undef_fixup(esr) {
            // SAFETY: a test expected this instruction to be UNDEFINED:
            // step over it (every instruction it uses is 4 bytes).
            unsafe { state.get_mut().elr += 4 };
            return;
        }
        if let Some(resume) = crate::gic_tests::fixup(state.elr, esr, far) {
            // SAFETY: a GIC test's probe access faulted, as the test may
            // expect: resume at the probes' fault path, which reports the
            // failure to the probe's caller (its registers are its own).
            unsafe { state.get_mut().elr = resume };
            return;
        }
        if let Some(resume) = crate::probe::fixup(state.elr, esr) {
            // SAFETY: resuming at the probe's fault path, which expects to be
            // entered exactly this way (its registers are its own).
            unsafe { state.get_mut().elr = resume };
            return;
        }
        panic!(
            "unexpected synchronous exception: ESR {esr:#x}, FAR {far:#x}, ELR {:#x}",
            state.elr
        );
    }

    /// An IRQ at EL1: the GIC tests' handler acknowledges, counts and ends
    /// it (anything unexpected is counted, never a panic). After an
    /// interrupt storm it asks for IRQs to stay masked in the interrupted
    /// code, which the tests then report.
    extern "C" fn irq_current(mut state: RegisterStateRef) {
        if crate::gic_tests::handle_irq() {
            // SAFETY: sets only PSTATE.I in the interrupted context's saved
            // SPSR: it resumes where it was with IRQs masked, which code
            // that unmasked them must (and the GIC tests do) cope with.
            unsafe { state.get_mut().spsr |= 1 << 7 };
        }
    }

    extern "C" fn sync_lower(mut state: RegisterStateRef) {
        let esr: u64;
        // SAFETY: reads the EL1 syndrome register.
        unsafe { asm!("mrs {0}, esr_el1", out(reg) esr, options(nomem, nostack)) };
        if let Some(resume) = crate::hostile::el0_fixup(esr) {
            // SAFETY: an EL0 excursion of the hostile suite ended: return to
            // its EL1 continuation, at EL1h with interrupts masked, on the
            // stack it left (SP_EL1 is unchanged by the excursion).
            unsafe {
                let regs = state.get_mut();
                regs.elr = resume;
                regs.spsr = 0x3c5;
            }
            return;
        }
        panic!(
            "unexpected synchronous exception from EL0: ESR {esr:#x}, ELR {:#x}",
            state.elr
        );
    }
}
exception_handlers!(Exceptions);

entry!(main, 16);

/// Flag bit 0 in `x1`: add a deliberately failing test.
const FLAG_FAIL: u64 = 1;
/// Flag bit 1 in `x1`: run the benchmark sequence instead of the tests.
const FLAG_BENCH: u64 = 2;
/// Flag bit 2 in `x1`: reset the VM once first (see `crate::reset_test`).
const FLAG_RESET_TEST: u64 = 4;

/// `x3`: how many times the hypervisor reset this VM before this start.
fn main(_dtb: u64, flags: u64, unmap_bench_mib: u64, resets: u64) -> ! {
    console::init();
    println!("guest: running at EL1 under lazyhyp (flags {flags:#x}, resets {resets})");
    if flags & FLAG_RESET_TEST != 0 && resets == 0 {
        crate::reset_test::dirty_and_reset();
    }
    let (passed, failed) = if unmap_bench_mib != 0 {
        crate::hostile::unmap_bench(unmap_bench_mib)
    } else if flags & FLAG_BENCH != 0 {
        crate::bench::run()
    } else {
        let reset = (flags & FLAG_RESET_TEST != 0).then(|| crate::reset_test::check(resets));
        let (p, f) = crate::tests::run_all(flags & FLAG_FAIL != 0);
        match reset {
            Some(Ok(())) => {
                println!("test vm_reset_restarts_from_a_clean_image ... ok");
                (p + 1, f)
            }
            Some(Err(why)) => {
                println!("test vm_reset_restarts_from_a_clean_image ... FAILED: {why}");
                (p, f + 1)
            }
            None => (p, f),
        }
    };
    println!("guest: {passed} passed, {failed} failed");
    hyp::report_and_power_off(passed, failed)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::print_in_panic(format_args!("guest: PANIC: {info}\n"));
    // A panicking guest counts as a failed run.
    hyp::report_and_power_off(0, 1)
}
