//! Loads and stores that survive a fault: the hypervisor answers a stage-2
//! abort on memory the guest does not have with a synchronous external
//! abort, which the guest's exception handler turns into a `None`/`false`
//! here instead of a panic.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

global_asm!(
    r#"
.section .text.guest_probe, "ax"
.global guest_probe_read
guest_probe_read:
    mov x1, #1
.global guest_probe_read_insn
guest_probe_read_insn:
    ldr x0, [x0]
    ret
.global guest_probe_write
guest_probe_write:
    mov x2, #1
.global guest_probe_write_insn
guest_probe_write_insn:
    str x1, [x0]
    mov x1, x2
    ret
.global guest_probe_fault
guest_probe_fault:
    mov x0, #0
    mov x1, #0
    ret
"#
);

unsafe extern "C" {
    static guest_probe_read_insn: u8;
    static guest_probe_write_insn: u8;
    static guest_probe_fault: u8;
}

/// `ESR_EL1` of the last fault a probe caught.
pub static LAST_ESR: AtomicU64 = AtomicU64::new(0);

/// If `elr` is a probe's access, returns where to resume (the probe's fault
/// path) and records the syndrome.
pub fn fixup(elr: usize, esr: u64) -> Option<usize> {
    let probes = [
        &raw const guest_probe_read_insn as usize,
        &raw const guest_probe_write_insn as usize,
    ];
    if probes.contains(&elr) {
        LAST_ESR.store(esr, Ordering::Relaxed);
        Some(&raw const guest_probe_fault as usize)
    } else {
        None
    }
}

/// Reads the word at `addr`, or `None` if the access faulted.
pub fn read(addr: usize) -> Option<u64> {
    let (value, ok): (u64, u64);
    // SAFETY: the routine loads from `addr`; a fault resumes at its fault
    // path (see `fixup`), which returns ok = 0.
    unsafe {
        asm!("bl guest_probe_read", inout("x0") addr as u64 => value, out("x1") ok, out("x30") _, options(nostack));
    }
    (ok == 1).then_some(value)
}

/// Writes `value` at `addr`; `false` if the access faulted.
pub fn write(addr: usize, value: u64) -> bool {
    let ok: u64;
    // SAFETY: as for `read`; the routine stores to `addr` and uses x2.
    unsafe {
        asm!(
            "bl guest_probe_write",
            inout("x0") addr as u64 => _,
            inout("x1") value => ok,
            out("x2") _,
            out("x30") _,
            options(nostack),
        );
    }
    ok == 1
}

/// The address an [`exec`] probe is calling, while it runs.
static EXEC_TARGET: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Calls the code at `addr` (which must be a function returning at once,
/// such as a lone `ret`), or returns `false` if fetching it faulted.
pub fn exec(addr: usize) -> bool {
    EXEC_TARGET.store(addr, Ordering::SeqCst);
    let ok: u64;
    // SAFETY: the callee is a lone `ret` the caller placed; if its fetch
    // faults, the handler (`exec_fixup`) resumes at the return address with
    // x1 = 0. x30 is the link register, declared clobbered.
    unsafe {
        asm!("mov x1, #1", "blr {target}", target = in(reg) addr, out("x1") ok, out("x30") _, options(nostack));
    }
    EXEC_TARGET.store(0, Ordering::SeqCst);
    ok == 1
}

/// If an instruction abort hit the running [`exec`] probe's target,
/// records the syndrome and says so: the handler then returns to the
/// probe's caller (the saved x30) with x1 = 0.
pub fn exec_fixup(elr: usize, esr: u64) -> bool {
    let target = EXEC_TARGET.load(Ordering::SeqCst);
    if target != 0 && elr == target && esr >> 26 == 0x21 {
        LAST_ESR.store(esr, Ordering::Relaxed);
        true
    } else {
        false
    }
}
