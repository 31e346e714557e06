//! EL2 exception vectors, guest entry and exit.
//!
//! Exceptions from the guest (lower EL, AArch64) save all of `x0..x30`,
//! `ELR_EL2` and `SPSR_EL2` as a [`GuestRegs`] frame on the EL2 stack, call a
//! Rust handler with it, restore from it (so the handler can change results
//! and the return address) and `ERET`. The guest's `SP_EL1` and system
//! registers stay in the CPU; the hypervisor is built for the softfloat
//! target, so it never touches the guest's FP/SIMD registers.
//!
//! Exceptions taken at EL2 itself are always fatal: their vectors switch to a
//! separate emergency stack first (the fault may be a stack overflow into the
//! guard page), save the same frame for the report, and never return.

use core::arch::global_asm;

use spin::mutex::SpinMutex;

use crate::vm::vcpu::{GUEST_REGS_SIZE, GuestRegs};

/// Kind of exception, passed to the handlers in `x1`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[repr(u64)]
pub enum Kind {
    /// Synchronous.
    Sync = 0,
    /// IRQ.
    Irq = 1,
    /// FIQ.
    Fiq = 2,
    /// SError.
    SError = 3,
}

impl Kind {
    fn from_raw(raw: u64) -> Self {
        match raw {
            0 => Self::Sync,
            1 => Self::Irq,
            2 => Self::Fiq,
            _ => Self::SError,
        }
    }
}

/// Pages of each CPU's emergency stack used by EL2-internal exception
/// handlers (a power of two: the vector computes its offset by a shift).
const EMERGENCY_STACK_PAGES: usize = 4;
const EMERGENCY_STACK_SHIFT: usize = 14;
const _: () = assert!(EMERGENCY_STACK_PAGES * 4096 == 1 << EMERGENCY_STACK_SHIFT);

/// One emergency stack per CPU, by index (`TPIDR_EL2`).
#[unsafe(link_section = ".stack.emergency")]
#[unsafe(no_mangle)]
static mut EMERGENCY_STACK: [aarch64_rt::Stack<EMERGENCY_STACK_PAGES>; super::smp::MAX_PCPUS] =
    [const { aarch64_rt::Stack::new() }; super::smp::MAX_PCPUS];

global_asm!(
    r#"
.macro save_guest_regs
    sub sp, sp, #{frame}
    stp x0, x1, [sp, #16 * 0]
    stp x2, x3, [sp, #16 * 1]
    stp x4, x5, [sp, #16 * 2]
    stp x6, x7, [sp, #16 * 3]
    stp x8, x9, [sp, #16 * 4]
    stp x10, x11, [sp, #16 * 5]
    stp x12, x13, [sp, #16 * 6]
    stp x14, x15, [sp, #16 * 7]
    stp x16, x17, [sp, #16 * 8]
    stp x18, x19, [sp, #16 * 9]
    stp x20, x21, [sp, #16 * 10]
    stp x22, x23, [sp, #16 * 11]
    stp x24, x25, [sp, #16 * 12]
    stp x26, x27, [sp, #16 * 13]
    stp x28, x29, [sp, #16 * 14]
    mrs x0, elr_el2
    stp x30, x0, [sp, #16 * 15]
    mrs x1, spsr_el2
    str x1, [sp, #16 * 16]
.endm

/* An exception from the guest: save, handle, restore, return. */
.macro lower_vector kind, handler
    save_guest_regs
    mov x0, sp
    mov x1, #\kind
    bl \handler
    b lazyhyp_restore_guest_regs_and_eret
.endm

/*
 * An exception at EL2: fatal. The vector entry only branches (a vector has
 * room for 32 instructions); the report runs from this CPU's emergency
 * stack, the top of EMERGENCY_STACK[TPIDR_EL2]. SP_EL0 (the guest's EL0
 * stack pointer) is the scratch register: the run ends here, nothing
 * resumes the guest.
 */
.macro current_vector kind
    b lazyhyp_current_fatal_\kind
.endm

.macro current_fatal kind
lazyhyp_current_fatal_\kind:
    msr sp_el0, x0
    mrs x0, tpidr_el2
    and x0, x0, #{cpu_mask}
    add x0, x0, #1
    lsl x0, x0, #{emergency_shift}
    mov sp, x0
    adrp x0, {emergency_stack}
    add x0, x0, :lo12:{emergency_stack}
    add sp, sp, x0
    mrs x0, sp_el0
    save_guest_regs
    mov x0, sp
    mov x1, #\kind
    b {current_handler}
.endm

.section .text.lazyhyp_vectors, "ax"
.balign 0x800
.global lazyhyp_vectors
lazyhyp_vectors:
/*
 * Current EL with SP_EL0: EL2 code runs on SP_EL0 only inside
 * lazyhyp_probe_read; a synchronous fault there is the probe's expected
 * outcome: resume at its fault path. x0 is the probe's scratch.
 */
.balign 0x80
    adr x0, lazyhyp_probe_read_fault
    msr elr_el2, x0
    eret
    dsb nsh
    isb
.balign 0x80
    current_vector 1
.balign 0x80
    current_vector 2
.balign 0x80
    current_vector 3
/* Current EL with SP_ELx: always fatal. */
.balign 0x80
    current_vector 0
.balign 0x80
    current_vector 1
.balign 0x80
    current_vector 2
.balign 0x80
    current_vector 3
/* Lower EL, AArch64: the guest. */
.balign 0x80
    lower_vector 0, {lower_sync}
.balign 0x80
    lower_vector 1, {lower_async}
.balign 0x80
    lower_vector 2, {lower_async}
.balign 0x80
    lower_vector 3, {lower_async}
/* Lower EL, AArch32: impossible with HCR_EL2.RW = 1; reported if seen. */
.balign 0x80
    lower_vector 0, {lower_async}
.balign 0x80
    lower_vector 1, {lower_async}
.balign 0x80
    lower_vector 2, {lower_async}
.balign 0x80
    lower_vector 3, {lower_async}

.balign 4
current_fatal 0
current_fatal 1
current_fatal 2
current_fatal 3

.balign 4
.global lazyhyp_restore_guest_regs_and_eret
lazyhyp_restore_guest_regs_and_eret:
    ldp x30, x0, [sp, #16 * 15]
    ldr x1, [sp, #16 * 16]
    msr elr_el2, x0
    msr spsr_el2, x1
    ldp x0, x1, [sp, #16 * 0]
    ldp x2, x3, [sp, #16 * 1]
    ldp x4, x5, [sp, #16 * 2]
    ldp x6, x7, [sp, #16 * 3]
    ldp x8, x9, [sp, #16 * 4]
    ldp x10, x11, [sp, #16 * 5]
    ldp x12, x13, [sp, #16 * 6]
    ldp x14, x15, [sp, #16 * 7]
    ldp x16, x17, [sp, #16 * 8]
    ldp x18, x19, [sp, #16 * 9]
    ldp x20, x21, [sp, #16 * 10]
    ldp x22, x23, [sp, #16 * 11]
    ldp x24, x25, [sp, #16 * 12]
    ldp x26, x27, [sp, #16 * 13]
    ldp x28, x29, [sp, #16 * 14]
    add sp, sp, #{frame}
    eret
    /* Nothing after ERET runs; stop straight-line speculation into it. */
    dsb nsh
    isb

/*
 * lazyhyp_probe_read(addr: x0) -> (value: x0, ok: x1)
 * Reads the 64-bit word at `addr`, surviving a fault. The load runs with
 * SPSel = 0 so that a fault is taken to the "current EL with SP_EL0"
 * vector, which nothing else uses, and comes back to the fault path. SP_EL0
 * belongs to the guest (its EL0 stack): it is saved in x2 and restored.
 */
.balign 4
.global lazyhyp_probe_read
lazyhyp_probe_read:
    mrs x2, sp_el0
    mov x3, sp
    msr sp_el0, x3
    msr spsel, #0
    ldr x0, [x0]
    msr spsel, #1
    msr sp_el0, x2
    mov x1, #1
    ret
.global lazyhyp_probe_read_fault
lazyhyp_probe_read_fault:
    msr spsel, #1
    msr sp_el0, x2
    mov x0, #0
    mov x1, #0
    ret

/*
 * lazyhyp_enter_guest(regs: *const GuestRegs, stack_top: usize) -> !
 * Resets SP_EL2 to `stack_top` (the hypervisor keeps no frames while the
 * guest runs), copies the initial frame below it and returns into the guest.
 */
.balign 4
.global lazyhyp_enter_guest
lazyhyp_enter_guest:
    mov sp, x1
    sub sp, sp, #{frame}
    mov x2, sp
    mov x3, #({frame} / 16)
0:  ldp x4, x5, [x0], #16
    stp x4, x5, [x2], #16
    subs x3, x3, #1
    b.ne 0b
    b lazyhyp_restore_guest_regs_and_eret

/*
 * lazyhyp_reset_stack_and_call(stack_top: usize, f: extern "C" fn() -> !) -> !
 * Discards every frame on this CPU's stack and calls `f` on it afresh.
 */
.balign 4
.global lazyhyp_reset_stack_and_call
lazyhyp_reset_stack_and_call:
    mov sp, x0
    blr x1
    b .
"#,
    frame = const GUEST_REGS_SIZE,
    emergency_stack = sym EMERGENCY_STACK,
    emergency_shift = const EMERGENCY_STACK_SHIFT,
    cpu_mask = const super::smp::MAX_PCPUS - 1,
    lower_sync = sym lower_sync,
    lower_async = sym lower_async,
    current_handler = sym current_el_exception,
);

/// Reads the word at `addr` through the EL2 map, returning `None` if the
/// access faults (instead of the fatal report an EL2 fault otherwise gives).
/// Used by tests to observe whether a page is (still) mapped at EL2.
#[must_use]
pub fn probe_read(addr: usize) -> Option<u64> {
    let (value, ok): (u64, u64);
    // SAFETY: the routine only loads from `addr`; a fault is caught by the
    // SP_EL0 vector and reported as `ok == 0`. It clobbers x2 and x3, and
    // restores SP_EL0 and SPSel before returning. A caught fault overwrites
    // ELR_EL2, SPSR_EL2, ESR_EL2 and FAR_EL2: callers run inside a trap
    // handler whose guest state was saved in its frame on entry, and read
    // no syndrome register after probing.
    unsafe {
        core::arch::asm!(
            "bl lazyhyp_probe_read",
            inout("x0") addr as u64 => value,
            out("x1") ok,
            out("x2") _,
            out("x3") _,
            out("x30") _,
            options(nostack),
        );
    }
    (ok == 1).then_some(value)
}

unsafe extern "C" {
    static lazyhyp_vectors: u8;
    fn lazyhyp_enter_guest(regs: *const GuestRegs, stack_top: usize) -> !;
    fn lazyhyp_reset_stack_and_call(stack_top: usize, f: extern "C" fn() -> !) -> !;
}

/// Discards every frame on this CPU's stack (top `stack_top`) and runs `f`.
///
/// # Safety
///
/// `stack_top` must be the top of the executing CPU's own stack and no live
/// data may remain on it.
pub unsafe fn reset_stack_and_call(stack_top: usize, f: extern "C" fn() -> !) -> ! {
    // SAFETY: as the caller guarantees.
    unsafe { lazyhyp_reset_stack_and_call(stack_top, f) }
}

/// Installs the vectors in `VBAR_EL2`.
pub fn install() {
    let vbar = (&raw const lazyhyp_vectors) as u64;
    // Points VBAR_EL2 at our table, which is 2 KiB aligned and mapped
    // executable in both the boot map and the EL2 map.
    super::sysreg::write_sysreg!("vbar_el2", vbar);
    // SAFETY: a context synchronization barrier.
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}

/// Enters the guest with `regs` (its initial registers, `ELR` and `SPSR`),
/// resetting the EL2 stack to `stack_top`.
///
/// # Safety
///
/// Stage 2, the guest's EL2 controls and the vectors must be set up, and no
/// live data may remain on the EL2 stack below `stack_top`.
pub unsafe fn enter_guest(regs: &GuestRegs, stack_top: usize) -> ! {
    // `regs` may itself live on the stack about to be reset: stage it in
    // this CPU's slot of a static first, so the copy onto the fresh stack
    // never reads memory it is overwriting.
    static ENTRY_FRAMES: [SpinMutex<GuestRegs>; super::smp::MAX_PCPUS] = [const {
        SpinMutex::new(GuestRegs {
            x: [0; 31],
            elr: 0,
            spsr: 0,
            pad: 0,
        })
    };
        super::smp::MAX_PCPUS];
    let mut frame = ENTRY_FRAMES[super::smp::this_cpu()].lock();
    frame.clone_from(regs);
    let staged: *const GuestRegs = &raw const *frame;
    // Released before the jump: only this CPU uses its slot, and it reads
    // the slot in the copy below before anything can stage into it again.
    drop(frame);
    // SAFETY: the caller guarantees the conditions above; the staged frame
    // is in a static, away from the stack being reset.
    unsafe { lazyhyp_enter_guest(staged, stack_top) }
}

extern "C" fn lower_sync(regs: &mut GuestRegs, _kind: u64) {
    super::handle_guest_sync(regs);
}

extern "C" fn lower_async(regs: &mut GuestRegs, kind: u64) {
    super::handle_guest_async(regs, Kind::from_raw(kind));
}

extern "C" fn current_el_exception(regs: &GuestRegs, kind: u64) -> ! {
    super::handle_el2_exception(regs, Kind::from_raw(kind))
}
