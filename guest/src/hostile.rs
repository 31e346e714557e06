//! The hostile-guest suite: what an attacker at EL1 (and EL0) would try,
//! each case asserting that the hypervisor answered as documented and kept
//! running: semihosting, SVE/SME, PMU, debug, RAS, implementation-defined
//! registers, set/way and other maintenance, malformed call encodings,
//! forged verdict lines, and a give-back pattern built to make one
//! hypercall expensive.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::console::println;
use crate::hyp::{self, hvc, stat};
use crate::probe;

type TestResult = Result<(), &'static str>;

/// A named test.
type Test = (&'static str, fn() -> TestResult);

/// The suite, in the order it runs (last in the guest's run: the give-back
/// pattern leaves fault-around as it found it, but unmaps a 64 MiB area).
pub const TESTS: &[Test] = &[
    (
        "hostile_semihosting_is_undefined_at_el1_and_el0",
        semihosting_is_undefined_at_el1_and_el0,
    ),
    (
        "hostile_sve_sme_are_hidden_and_undefined",
        sve_sme_are_hidden_and_undefined,
    ),
    (
        "hostile_pmu_ras_impdef_undefined_debug_raz_wi",
        pmu_ras_impdef_undefined_debug_raz_wi,
    ),
    (
        "hostile_maintenance_from_el1_is_contained",
        maintenance_from_el1_is_contained,
    ),
    (
        "hostile_upper_half_of_x0_is_ignored",
        upper_half_of_x0_is_ignored,
    ),
    (
        "hostile_report_result_twice_last_one_stands",
        report_result_twice_last_one_stands,
    ),
    (
        "hostile_forged_marker_lines_are_just_guest_output",
        forged_marker_lines_are_just_guest_output,
    ),
    (
        "hostile_alternating_give_back_then_one_big_unmap",
        alternating_give_back_then_one_big_unmap,
    ),
];

fn check(cond: bool, reason: &'static str) -> TestResult {
    if cond { Ok(()) } else { Err(reason) }
}

/// A 4-bit ID register field.
fn field(reg: u64, shift: u32) -> u64 {
    (reg >> shift) & 0xf
}

/// Set while a test expects its next instruction to be UNDEFINED.
static EXPECT_UNDEF: AtomicBool = AtomicBool::new(false);
/// `ESR_EL1` of the last UNDEFINED exception caught for a test.
static UNDEF_ESR: AtomicU64 = AtomicU64::new(0);

/// From the EL1 synchronous handler: if a test expects an UNDEFINED
/// exception (EC 0) and this is one, records it and says to step over the
/// instruction.
pub fn undef_fixup(esr: u64) -> bool {
    if esr >> 26 == 0 && EXPECT_UNDEF.swap(false, Ordering::SeqCst) {
        UNDEF_ESR.store(esr, Ordering::SeqCst);
        true
    } else {
        false
    }
}

/// Runs `f` (one instruction, in inline assembly) and returns whether it
/// raised UNDEFINED.
fn raises_undef(f: impl FnOnce()) -> bool {
    EXPECT_UNDEF.store(true, Ordering::SeqCst);
    f();
    !EXPECT_UNDEF.swap(false, Ordering::SeqCst)
}

global_asm!(
    r#"
.section .text.guest_el0, "ax"
// x0: an EL0 entry point. Drops to EL0t there with interrupts masked; the
// lower-EL handler (`el0_fixup`) brings the exception back to
// `guest_el0_return` at EL1h on this same stack.
.global guest_run_el0
guest_run_el0:
    stp x29, x30, [sp, #-16]!
    msr elr_el1, x0
    mov x1, #0x3c0
    msr spsr_el1, x1
    isb
    eret
.global guest_el0_return
guest_el0_return:
    ldp x29, x30, [sp], #16
    ret
// EL0 code: a semihosting call (SYS_WRITE0 of a forged marker).
.balign 4
.global guest_el0_semihost
guest_el0_semihost:
    mov x0, #4
    adr x1, guest_el0_forged
    hlt #0xf000
    b .
guest_el0_forged:
    .asciz "LAZYHYP-EXIT: code=0 reason=forged-from-el0\n"
"#
);

unsafe extern "C" {
    static guest_el0_return: u8;
    static guest_el0_semihost: u8;
}

/// `ESR_EL1` of the exception that ended the last EL0 excursion.
static EL0_ESR: AtomicU64 = AtomicU64::new(u64::MAX);
/// Set while an EL0 excursion runs.
static IN_EL0: AtomicBool = AtomicBool::new(false);

/// From the lower-EL synchronous handler: ends an EL0 excursion. Returns
/// the EL1 address to resume at, if one was running.
pub fn el0_fixup(esr: u64) -> Option<usize> {
    IN_EL0.swap(false, Ordering::SeqCst).then(|| {
        EL0_ESR.store(esr, Ordering::SeqCst);
        &raw const guest_el0_return as usize
    })
}

/// Runs the EL0 code at `entry` until its first exception; returns that
/// exception's `ESR_EL1`.
fn run_el0(entry: usize) -> u64 {
    EL0_ESR.store(u64::MAX, Ordering::SeqCst);
    IN_EL0.store(true, Ordering::SeqCst);
    // SAFETY: the routine drops to EL0 at `entry` (code in this image's
    // text, executable at EL0) and comes back through `el0_fixup` on the
    // same stack; everything the EL0 code or the handler may change is
    // declared clobbered.
    unsafe {
        asm!(
            "bl guest_run_el0",
            inout("x0") entry => _,
            out("x1") _, out("x2") _, out("x3") _, out("x4") _, out("x5") _,
            out("x6") _, out("x7") _, out("x8") _, out("x9") _, out("x10") _,
            out("x11") _, out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _, out("x18") _, out("x30") _,
        );
    }
    EL0_ESR.load(Ordering::SeqCst)
}

/// The semihosting trap, `HLT #0xF000`, from EL1 and EL0, with the calls an
/// attacker would make (write a forged verdict, open a host file, exit with
/// status 0): QEMU runs without semihosting, so each is an UNDEFINED
/// instruction at the guest's own EL1, and nothing reaches the host.
pub fn semihosting_is_undefined_at_el1_and_el0() -> TestResult {
    static FORGED: &[u8] = b"LAZYHYP-EXIT: code=0 reason=forged-by-semihosting\n\0";
    static NAME: &[u8] = b"lazyhyp-semihosting-probe\0";
    // SYS_OPEN's parameter block: name, mode 4 ("w"), name length.
    static mut OPEN_BLOCK: [u64; 3] = [0; 3];
    // SYS_EXIT_EXTENDED's block: ADP_Stopped_ApplicationExit, status 0.
    static EXIT_BLOCK: [u64; 2] = [0x2_0026, 0];
    // SAFETY: written once here, before the call that reads it.
    unsafe {
        OPEN_BLOCK = [NAME.as_ptr() as u64, 4, (NAME.len() - 1) as u64];
    }
    for (op, arg) in [
        (0x04_u64, FORGED.as_ptr() as u64),                  // SYS_WRITE0
        (0x01, (&raw const OPEN_BLOCK).cast::<u8>() as u64), // SYS_OPEN
        (0x20, EXIT_BLOCK.as_ptr() as u64),                  // SYS_EXIT_EXTENDED
        (0x18, 0x2_0026),                                    // SYS_EXIT
    ] {
        let undef = raises_undef(|| {
            // SAFETY: a semihosting call, which here is an UNDEFINED
            // instruction (stepped over by the handler); x0 may be written.
            unsafe {
                asm!("hlt #0xf000", inout("x0") op => _, in("x1") arg, options(nostack));
            }
        });
        check(undef, "HLT #0xF000 at EL1 was not UNDEFINED")?;
    }
    let esr = run_el0(&raw const guest_el0_semihost as usize);
    check(esr >> 26 == 0, "HLT #0xF000 at EL0 was not UNDEFINED")?;
    Ok(())
}

/// Reads an ID register the guest sees (through the hypervisor's
/// sanitised view: `HCR_EL2.TID3`).
macro_rules! mrs {
    ($reg:literal) => {{
        let v: u64;
        // SAFETY: reading a system register (emulated by the hypervisor).
        unsafe { asm!(concat!("mrs {0}, ", $reg), out(reg) v, options(nomem, nostack)) };
        v
    }};
}

/// SVE and SME: hidden in the ID registers, and UNDEFINED when used anyway
/// (the guest enables them in `CPACR_EL1` first, as an attacker would).
pub fn sve_sme_are_hidden_and_undefined() -> TestResult {
    let pfr0 = mrs!("id_aa64pfr0_el1");
    let pfr1 = mrs!("id_aa64pfr1_el1");
    check(field(pfr0, 32) == 0, "ID_AA64PFR0_EL1.SVE is visible")?;
    check(field(pfr1, 24) == 0, "ID_AA64PFR1_EL1.SME is visible")?;
    check(field(pfr1, 8) == 0, "ID_AA64PFR1_EL1.MTE is visible")?;
    check(field(pfr0, 28) == 0, "ID_AA64PFR0_EL1.RAS is visible")?;
    check(mrs!("S3_0_C0_C4_4") == 0, "ID_AA64ZFR0_EL1 is not zero")?;
    check((pfr0 >> 16) & 0xf != 0xf, "FP must stay visible")?;
    let cpacr = mrs!("cpacr_el1");
    // ZEN [17:16] and SMEN [25:24]: no EL1/EL0 trap.
    let open = cpacr | (3 << 16) | (3 << 24);
    // SAFETY: only changes which FP/SVE/SME accesses trap to EL1.
    unsafe { asm!("msr cpacr_el1, {0}", "isb", in(reg) open, options(nostack)) };
    let before = stat("undef_injected").unwrap_or(0);
    let rdvl = raises_undef(|| {
        // SAFETY: RDVL x0, #1 (an SVE instruction): UNDEFINED here.
        unsafe { asm!(".inst 0x04bf5020", out("x0") _, options(nostack)) };
    });
    let smstart = raises_undef(|| {
        // SAFETY: SMSTART (SME): UNDEFINED here.
        unsafe { asm!(".inst 0xd503477f", options(nostack)) };
    });
    // SAFETY: puts CPACR_EL1 back.
    unsafe { asm!("msr cpacr_el1, {0}", "isb", in(reg) cpacr, options(nostack)) };
    check(rdvl, "RDVL was not UNDEFINED")?;
    check(smstart, "SMSTART was not UNDEFINED")?;
    let after = stat("undef_injected").unwrap_or(0);
    check(
        after >= before + 2,
        "the hypervisor did not count the injected UNDEFINEDs",
    )
}

/// PMU, RAS error records, implementation-defined registers, `ACTLR_EL1`:
/// UNDEFINED. Debug registers: RAZ/WI (no breakpoint ever arms), and the
/// OS lock reads as implemented and unlocked.
pub fn pmu_ras_impdef_undefined_debug_raz_wi() -> TestResult {
    let dfr0 = mrs!("id_aa64dfr0_el1");
    check(field(dfr0, 8) == 0, "ID_AA64DFR0_EL1.PMUVer is visible")?;
    check(field(dfr0, 32) == 0, "ID_AA64DFR0_EL1.PMSVer is visible")?;
    check(dfr0 & 0xf >= 6, "DebugVer must stay visible")?;
    macro_rules! undef_read {
        ($reg:literal, $why:literal) => {
            check(
                raises_undef(|| {
                    // SAFETY: reading a register that is UNDEFINED here.
                    unsafe { asm!(concat!("mrs x0, ", $reg), out("x0") _, options(nostack)) };
                }),
                $why,
            )?;
        };
    }
    macro_rules! undef_write {
        ($reg:literal, $why:literal) => {
            check(
                raises_undef(|| {
                    // SAFETY: writing a register that is UNDEFINED here.
                    unsafe { asm!(concat!("msr ", $reg, ", xzr"), options(nostack)) };
                }),
                $why,
            )?;
        };
    }
    undef_read!("S3_3_C9_C12_0", "PMCR_EL0 read was not UNDEFINED");
    undef_write!("S3_3_C9_C12_0", "PMCR_EL0 write was not UNDEFINED");
    undef_read!("S3_3_C9_C13_0", "PMCCNTR_EL0 read was not UNDEFINED");
    undef_read!("S3_0_C5_C3_0", "ERRIDR_EL1 read was not UNDEFINED");
    undef_read!(
        "S3_0_C15_C0_0",
        "an IMPLEMENTATION DEFINED register was readable"
    );
    // CPUACTLR_EL1 of the Cortex-A57 (S3_1_C15_C2_0): HCR_EL2.TIDCP traps it
    // on hardware; QEMU 7.2 does not implement the TIDCP trap and models
    // the register as RAZ/WI. Either way nothing may stick.
    let undef = raises_undef(|| {
        // SAFETY: an IMPLEMENTATION DEFINED register: UNDEFINED, or RAZ/WI.
        unsafe { asm!("msr S3_1_C15_C2_0, {0}", in(reg) u64::MAX, options(nostack)) };
    });
    if !undef {
        check(
            mrs!("S3_1_C15_C2_0") == 0,
            "an IMPLEMENTATION DEFINED register kept a value",
        )?;
    }
    undef_read!("S3_0_C1_C0_1", "ACTLR_EL1 was readable");
    undef_read!("S3_0_C1_C2_1", "TRFCR_EL1 (trace filter) was readable");
    // ID registers are read-only: a write is UNDEFINED (an MSR to them is
    // not even encodable as such; use the encoding).
    undef_write!(
        "S3_0_C0_C4_0",
        "a write to ID_AA64PFR0_EL1 was not UNDEFINED"
    );
    // Debug: a breakpoint written, MDSCR_EL1 with MDE and KDE: all ignored.
    let mut undef = raises_undef(|| {
        // SAFETY: debug register writes, emulated as ignored.
        unsafe {
            asm!(
                "msr S2_0_C0_C0_4, {addr}", // DBGBVR0_EL1
                "msr S2_0_C0_C0_5, {ctl}",  // DBGBCR0_EL1: enabled, EL1
                "msr S2_0_C0_C2_2, {mdscr}", // MDSCR_EL1: MDE | KDE
                "msr S2_0_C1_C0_4, xzr",    // OSLAR_EL1: unlock
                "isb",
                addr = in(reg) u64::from(hyp::PSCI_VERSION),
                ctl = in(reg) 0x1e7_u64,
                mdscr = in(reg) (1_u64 << 15) | (1 << 13),
                options(nostack),
            );
        }
    });
    let (bcr, mdscr, oslsr): (u64, u64, u64);
    undef |= raises_undef(|| {});
    // SAFETY: debug register reads, emulated.
    unsafe {
        asm!(
            "mrs {0}, S2_0_C0_C0_5",
            "mrs {1}, S2_0_C0_C2_2",
            "mrs {2}, S2_0_C1_C1_4",
            out(reg) bcr, out(reg) mdscr, out(reg) oslsr,
            options(nostack),
        );
    }
    check(!undef, "a debug register access was UNDEFINED")?;
    check(bcr == 0 && mdscr == 0, "debug registers kept a value")?;
    check(oslsr == 0b1000, "OSLSR_EL1 is not 'implemented, unlocked'")?;
    Ok(())
}

/// Set/way maintenance is emulated (one clean of guest memory per run of
/// consecutive operations); TLBI, AT, DC IVAC and IC from EL1 act on the
/// guest's own VMID and memory; nothing traps as UNDEFINED and the guest's
/// memory is intact afterwards.
pub fn maintenance_from_el1_is_contained() -> TestResult {
    let mut pattern = [0_u64; 64];
    for (i, w) in pattern.iter_mut().enumerate() {
        *w = 0x5eed_0000 + i as u64;
    }
    let flushes = || stat("setway_flushes").unwrap_or(u64::MAX);
    let f0 = flushes();
    let undef = raises_undef(|| {
        // SAFETY: set/way maintenance (level 1, set 0, way 0, and two
        // more), trapped and emulated.
        unsafe {
            asm!(
                "dc cisw, {sw}",
                "dc isw, {sw}",
                "dc csw, {sw}",
                sw = in(reg) 0_u64,
                options(nostack),
            );
        }
    });
    check(!undef, "set/way operations were UNDEFINED")?;
    let f1 = flushes();
    let addr = pattern.as_ptr() as u64;
    let par: u64;
    let undef = raises_undef(|| {
        // SAFETY: maintenance of the guest's own translations and memory.
        unsafe {
            asm!(
                "dc isw, {sw}",
                "tlbi vmalle1is",
                "tlbi vmalle1",
                "dsb ish",
                "ic iallu",
                "dc ivac, {a}",
                "dc civac, {a}",
                "at s1e1r, {a}",
                "isb",
                sw = in(reg) 0_u64,
                a = in(reg) addr,
                options(nostack),
            );
        }
    });
    // SAFETY: reads the result of the AT above.
    unsafe { asm!("mrs {0}, par_el1", out(reg) par, options(nomem, nostack)) };
    check(!undef, "TLBI/AT/DC/IC from EL1 was UNDEFINED")?;
    let f2 = flushes();
    // Without FEAT_S2FWB (`mm.fwb=0` on QEMU) the hypervisor cleans guest
    // RAM at the first set/way operation and then watches SCTLR_EL1 (TVM):
    // each cache toggle cleans, and once the caches are on again the next
    // set/way operation starts over (as KVM). With FWB nothing is cleaned.
    let maintenance = f1 == f0 + 1;
    check(
        f1 == f0 || maintenance,
        "three consecutive set/way ops cost more than one clean",
    )?;
    check(
        f2 == f1,
        "a set/way op before any cache toggle cleaned again",
    )?;
    let sctlr = mrs!("sctlr_el1");
    let setway = || {
        // SAFETY: a set/way operation (trapped and emulated).
        unsafe { asm!("dc cisw, {0}", in(reg) 0_u64, options(nostack)) };
    };
    // SAFETY: only the data cacheability of this guest's own accesses
    // changes; it is restored below.
    unsafe { asm!("msr sctlr_el1, {0}", "isb", in(reg) sctlr & !(1 << 2), options(nostack)) };
    setway();
    // SAFETY: restores SCTLR_EL1.
    unsafe { asm!("msr sctlr_el1, {0}", "isb", in(reg) sctlr, options(nostack)) };
    let f3 = flushes();
    check(
        mrs!("sctlr_el1") == sctlr,
        "SCTLR_EL1 did not keep what the guest wrote",
    )?;
    setway();
    let f4 = flushes();
    let step = u64::from(maintenance);
    check(
        f3 == f2 + 2 * step,
        "turning the caches off and on again did not clean once each",
    )?;
    check(
        f4 == f3 + step,
        "a set/way op with the caches back on did not start over",
    )?;
    check(par & 1 == 0, "AT S1E1R of mapped memory failed")?;
    // Read back through volatile loads: the maintenance above is opaque to
    // the compiler only as far as `asm!` says.
    let pattern: [u64; 64] = core::array::from_fn(|i| {
        // SAFETY: an element of this function's own array.
        unsafe { core::ptr::read_volatile(&raw const pattern[i]) }
    });
    check(
        pattern
            .iter()
            .enumerate()
            .all(|(i, w)| *w == 0x5eed_0000 + i as u64),
        "guest memory changed across the maintenance",
    )
}

/// SMCCC passes the function ID in `W0`: the upper half of `X0` is ignored
/// (as KVM and TF-A do), so every call answers exactly as without it.
pub fn upper_half_of_x0_is_ignored() -> TestResult {
    fn raw(x0: u64, a1: u64, a2: u64) -> [u64; 2] {
        let (mut r0, mut r1) = (x0, a1);
        // SAFETY: an SMCCC call with a raw X0; results in x0, x1.
        unsafe {
            asm!(
                "hvc #0",
                inout("x0") r0, inout("x1") r1, inout("x2") a2 => _, inout("x3") 0_u64 => _,
                out("x4") _, out("x5") _, out("x6") _, out("x7") _,
                out("x8") _, out("x9") _, out("x10") _, out("x11") _,
                out("x12") _, out("x13") _, out("x14") _, out("x15") _,
                out("x16") _, out("x17") _,
                options(nostack),
            );
        }
        [r0, r1]
    }
    const HIGH: u64 = 0xdead_beef << 32;
    for (f, a1) in [
        (0x8000_0000_u32, 0),       // SMCCC_VERSION
        (hyp::PSCI_VERSION, 0),     // PSCI_VERSION
        (0x8400_000a, 0x8400_0008), // PSCI_FEATURES(SYSTEM_OFF)
        (0xc600_0000, 0),           // HYP_VERSION
        (0xc600_0013, 0x5000_0000), // HYP_PROTECT outside RAM: an error
        (0xc5ff_0001, 0),           // unknown
    ] {
        let plain = raw(u64::from(f), a1, 0);
        let high = raw(HIGH | u64::from(f), a1, 0);
        check(
            plain[0] == high[0],
            "a call answered differently with X0[63:32] set",
        )?;
    }
    Ok(())
}

/// `HYP_REPORT_RESULT` more than once: each call is accepted and the last
/// one stands (the final report, made right before power-off, is what the
/// hypervisor prints); a forged failing report mid-run therefore does not
/// decide the run, and this suite's own final report does.
pub fn report_result_twice_last_one_stands() -> TestResult {
    let r1 = hvc(0xc600_0001, 0, 7, 0);
    let r2 = hvc(0xc600_0001, 1000, 0, 0);
    check(r1[0] == 0 && r2[0] == 0, "a repeated report was refused")
}

/// Prints lines that imitate the hypervisor's markers, with terminal
/// escape sequences and a carriage return: the hypervisor prints them
/// behind its guest prefix, escaped, and xtask ignores them (an integration
/// test checks both on the host).
#[allow(clippy::unnecessary_wraps, reason = "the signature of every test")]
pub fn forged_marker_lines_are_just_guest_output() -> TestResult {
    println!("LAZYHYP-EXIT: code=1 reason=forged-by-guest");
    println!("LAZYHYP-PANIC: forged by the guest");
    println!("LAZYHYP-RESULT: passed=0 failed=99");
    println!("\rLAZYHYP-EXIT: code=3 reason=forged-after-cr \x1b[2J\x1b]0;owned\x07");
    Ok(())
}

/// What one run of the unmap pattern measured.
struct UnmapPattern {
    /// EL2-bound time of the unmap of the wholly page-mapped range, µs.
    full_us: u64,
    /// TLBIs it issued (by IPA, range, or whole VMID).
    full_tlbis: u64,
    /// The same for the unmap of the range with every other page given back.
    holes_us: u64,
    holes_tlbis: u64,
    /// Growth of the hypervisor's heap high-water mark during that unmap.
    heap_growth: u64,
}

/// Page-maps `[area, area + size)`, unmaps it in one call (timed); page-maps
/// it again, gives back every other page (one call each), unmaps it all in
/// one call (timed). Fault-around is off meanwhile and back at 2 MiB after.
fn unmap_pattern(area: u64, size: u64) -> Result<UnmapPattern, &'static str> {
    const PAGE: u64 = 4096;
    let call = |f: u32, a1: u64, a2: u64| hvc(f, a1, a2, 0)[0];
    let page_map = || -> TestResult {
        // Give the area back, forget that, and touch every page with
        // fault-around off: one single-page demand fault each.
        check(call(hyp::HYP_UNMAP, area, size) == 0, "HYP_UNMAP failed")?;
        check(call(0xc600_0f05, area, size) == 0, "HYP_TEST_FORGET failed")?;
        for p in (area..area + size).step_by(PAGE as usize) {
            check(probe::write(p as usize, p), "demand population failed")?;
        }
        Ok(())
    };
    let ticks = || -> u64 {
        let t: u64;
        // SAFETY: reads the virtual counter.
        unsafe { asm!("isb", "mrs {0}, cntvct_el0", out(reg) t, options(nomem, nostack)) };
        t
    };
    let tlbis = || {
        ["tlbi_ipas2e1is", "tlbi_ripas2e1is", "tlbi_vmalls12e1is"]
            .iter()
            .map(|c| stat(c).unwrap_or(0))
            .sum::<u64>()
    };
    let freq = mrs!("cntfrq_el0").max(1);
    let us = |t: u64| t * 1_000_000 / freq;
    check(
        call(hyp::HYP_TEST_SET_FAULT_AROUND, 0, 0) == 0,
        "fault-around off",
    )?;
    page_map()?;
    let (t0, i0) = (ticks(), tlbis());
    check(
        call(hyp::HYP_UNMAP, area, size) == 0,
        "HYP_UNMAP (full) failed",
    )?;
    let (full_us, full_tlbis) = (us(ticks() - t0), tlbis() - i0);
    page_map()?;
    for p in (area..area + size).step_by(2 * PAGE as usize) {
        check(
            call(hyp::HYP_UNMAP, p, PAGE) == 0,
            "single-page HYP_UNMAP failed",
        )?;
    }
    let heap0 = stat("heap_peak_bytes").unwrap_or(u64::MAX);
    let (t0, i0) = (ticks(), tlbis());
    check(
        call(hyp::HYP_UNMAP, area, size) == 0,
        "HYP_UNMAP (holes) failed",
    )?;
    let (holes_us, holes_tlbis) = (us(ticks() - t0), tlbis() - i0);
    let heap1 = stat("heap_peak_bytes").unwrap_or(u64::MAX);
    check(
        call(hyp::HYP_TEST_SET_FAULT_AROUND, 2 << 20, 0) == 0,
        "fault-around on",
    )?;
    Ok(UnmapPattern {
        full_us,
        full_tlbis,
        holes_us,
        holes_tlbis,
        heap_growth: heap1.saturating_sub(heap0),
    })
}

/// The give-back pattern built to make one `HYP_UNMAP` expensive: page-map
/// 64 MiB, give back every other page (8192 calls), then unmap the whole
/// range in one call. Compared with unmapping the same range wholly
/// page-mapped: the invalidations stay bounded (whole-VMID past the
/// thresholds) and the heap does not grow with the number of holes. The
/// time is printed, not asserted (timing belongs to the benchmark:
/// `guest.unmap_bench_mib`).
pub fn alternating_give_back_then_one_big_unmap() -> TestResult {
    let r = unmap_pattern(0x4800_0000, 64 << 20)?;
    println!(
        "hostile: HYP_UNMAP of 64 MiB: page-mapped {} us / {} TLBIs, \
         every other page given back {} us / {} TLBIs, heap peak +{} bytes",
        r.full_us, r.full_tlbis, r.holes_us, r.holes_tlbis, r.heap_growth
    );
    // Bounded by the range, not by the holes: at most one range TLBI per
    // 2 MiB window up to the whole-VMID threshold (64), then one.
    check(
        r.holes_tlbis <= 64 + 1 && r.full_tlbis <= 64 + 1,
        "unbounded TLBIs for one HYP_UNMAP",
    )?;
    check(
        r.heap_growth < 64 << 10,
        "the heap grew with the number of holes",
    )
}

/// The unmap benchmark (`guest.unmap_bench_mib=N`): the pattern above over
/// N MiB from IPA 0x4400_0000, printed as one `unmap-bench:` line for
/// `cargo xtask bench`. Returns (passed, failed) as a test run would.
pub fn unmap_bench(mib: u64) -> (u64, u64) {
    match unmap_pattern(0x4400_0000, mib << 20) {
        Ok(r) => {
            println!(
                "unmap-bench: size_mib={mib} full_us={} full_tlbis={} holes_us={} holes_tlbis={} heap_growth={} ratio={}.{:02}",
                r.full_us,
                r.full_tlbis,
                r.holes_us,
                r.holes_tlbis,
                r.heap_growth,
                r.holes_us / r.full_us.max(1),
                (r.holes_us * 100 / r.full_us.max(1)) % 100
            );
            (1, 0)
        }
        Err(why) => {
            println!("unmap-bench: FAILED: {why}");
            (0, 1)
        }
    }
}
