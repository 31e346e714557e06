//! The virtual GICv3, as a guest sees it: a minimal GICv3 driver (the
//! distributor at IPA 0x0800_0000, this vCPU's redistributor at
//! 0x080a_0000, the CPU interface through the `ICC_*_EL1` registers, which
//! the hypervisor's `HCR_EL2.IMO` turns into the virtual interface) and the
//! tests that run against the hypervisor's emulation (`src/vgic/`).
//!
//! Every GIC register access goes through a fault-catching probe (below):
//! a register the hypervisor refuses is an injected external abort, which
//! a test expects or reports as a failure, never a panic. Every wait is
//! bounded by the virtual counter, so a missing interrupt is a failure,
//! not a hang. The IRQ handler ([`handle_irq`], called from `rt.rs`) only
//! counts: what it did not expect goes into counters the tests assert on,
//! and an interrupt storm masks IRQs instead of livelocking the guest.
//! Each test puts back the enables, masks and priorities it changed.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::console::println;
use crate::hyp::hvc;

type TestResult = Result<(), &'static str>;

/// A named test.
type Test = (&'static str, fn() -> TestResult);

/// The suite, in the order it runs.
pub const TESTS: &[Test] = &[
    (
        "gic_distributor_and_redistributor_look_like_a_gicv3",
        distributor_and_redistributor_look_like_a_gicv3,
    ),
    (
        "virtual_timer_interrupts_are_delivered",
        virtual_timer_interrupts_are_delivered,
    ),
    ("self_sgis_are_delivered", self_sgis_are_delivered),
    (
        "lpi_registers_cannot_make_the_gic_touch_memory",
        lpi_registers_cannot_make_the_gic_touch_memory,
    ),
    (
        "gic_bad_accesses_are_contained",
        gic_bad_accesses_are_contained,
    ),
    (
        "interrupt_floods_do_not_stall_the_hypervisor",
        interrupt_floods_do_not_stall_the_hypervisor,
    ),
];

fn check(cond: bool, reason: &'static str) -> TestResult {
    if cond { Ok(()) } else { Err(reason) }
}

/// The distributor's IPA.
const GICD: usize = 0x0800_0000;
/// This vCPU's redistributor (`RD_base`; the only one: vCPU 0).
const GICR: usize = 0x080a_0000;
/// Its `SGI_base` frame.
const GICR_SGI: usize = GICR + 0x1_0000;

/// Distributor registers and fields.
mod gicd {
    pub const CTLR: usize = 0x0000;
    pub const TYPER: usize = 0x0004;
    pub const PIDR2: usize = 0xffe8;
    /// `GICD_CTLR.EnableGrp1` (one security state).
    pub const CTLR_ENABLE_GRP1: u32 = 1 << 1;
    /// `GICD_CTLR.ARE`.
    pub const CTLR_ARE: u32 = 1 << 4;
    /// `GICD_TYPER.ITLinesNumber`.
    pub const TYPER_IT_LINES: u32 = 0x1f;
    /// `GICD_TYPER.LPIS`.
    pub const TYPER_LPIS: u32 = 1 << 17;
    /// An offset in the frame where no register lives.
    pub const UNEMULATED: usize = 0xc000;
}

/// Redistributor registers (`RD_base` frame) and fields.
mod gicr {
    pub const CTLR: usize = 0x0000;
    pub const TYPER: usize = 0x0008;
    pub const WAKER: usize = 0x0014;
    pub const SETLPIR: usize = 0x0040;
    pub const PROPBASER: usize = 0x0070;
    pub const PENDBASER: usize = 0x0078;
    pub const PIDR2: usize = 0xffe8;
    /// `GICR_CTLR.EnableLPIs`.
    pub const CTLR_ENABLE_LPIS: u32 = 1 << 0;
    /// `GICR_TYPER.PLPIS`.
    pub const TYPER_PLPIS: u64 = 1 << 0;
    /// `GICR_TYPER.Last`.
    pub const TYPER_LAST: u64 = 1 << 4;
    /// `GICR_WAKER.ProcessorSleep`.
    pub const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
    /// `GICR_WAKER.ChildrenAsleep`.
    pub const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
}

/// `SGI_base` frame registers (SGIs and PPIs, INTIDs 0..31).
mod sgi {
    pub const IGROUPR0: usize = 0x0080;
    pub const ISENABLER0: usize = 0x0100;
    pub const ICENABLER0: usize = 0x0180;
    pub const ISPENDR0: usize = 0x0200;
    pub const ICPENDR0: usize = 0x0280;
    pub const ISACTIVER0: usize = 0x0300;
    pub const ICACTIVER0: usize = 0x0380;
    pub const IPRIORITYR: usize = 0x0400;
}

/// The EL1 virtual timer's PPI.
const VTIMER_PPI: u32 = 27;
/// The priority the tests give their interrupts (below the PMR's 0xff).
const TEST_PRIORITY: u8 = 0xa0;

// ---------------------------------------------------------------------------
// Fault-catching MMIO accesses of every size.

global_asm!(
    r#"
.section .text.gic_probe, "ax"
// Reads: x0 = address in, value out; x1 = 1 on success, 0 after a fault.
.global gic_probe_read8
gic_probe_read8:
    mov x1, #1
.global gic_probe_read8_insn
gic_probe_read8_insn:
    ldrb w0, [x0]
    ret
.global gic_probe_read16
gic_probe_read16:
    mov x1, #1
.global gic_probe_read16_insn
gic_probe_read16_insn:
    ldrh w0, [x0]
    ret
.global gic_probe_read32
gic_probe_read32:
    mov x1, #1
.global gic_probe_read32_insn
gic_probe_read32_insn:
    ldr w0, [x0]
    ret
.global gic_probe_read64
gic_probe_read64:
    mov x1, #1
.global gic_probe_read64_insn
gic_probe_read64_insn:
    ldr x0, [x0]
    ret
// A load pair: no valid syndrome (ISV = 0), so it cannot be emulated.
.global gic_probe_read_pair
gic_probe_read_pair:
    mov x1, #1
.global gic_probe_read_pair_insn
gic_probe_read_pair_insn:
    ldp w0, w2, [x0]
    ret
// Writes: x0 = address, x1 = value in, 1 (success) or 0 (fault) out.
.global gic_probe_write8
gic_probe_write8:
    mov x2, #1
.global gic_probe_write8_insn
gic_probe_write8_insn:
    strb w1, [x0]
    mov x1, x2
    ret
.global gic_probe_write16
gic_probe_write16:
    mov x2, #1
.global gic_probe_write16_insn
gic_probe_write16_insn:
    strh w1, [x0]
    mov x1, x2
    ret
.global gic_probe_write32
gic_probe_write32:
    mov x2, #1
.global gic_probe_write32_insn
gic_probe_write32_insn:
    str w1, [x0]
    mov x1, x2
    ret
.global gic_probe_write64
gic_probe_write64:
    mov x2, #1
.global gic_probe_write64_insn
gic_probe_write64_insn:
    str x1, [x0]
    mov x1, x2
    ret
// Where a faulting access resumes (see `fixup`).
.global gic_probe_fault
gic_probe_fault:
    mov x0, #0
    mov x1, #0
    ret
"#
);

unsafe extern "C" {
    static gic_probe_read8: u8;
    static gic_probe_read8_insn: u8;
    static gic_probe_read16: u8;
    static gic_probe_read16_insn: u8;
    static gic_probe_read32: u8;
    static gic_probe_read32_insn: u8;
    static gic_probe_read64: u8;
    static gic_probe_read64_insn: u8;
    static gic_probe_read_pair: u8;
    static gic_probe_read_pair_insn: u8;
    static gic_probe_write8: u8;
    static gic_probe_write8_insn: u8;
    static gic_probe_write16: u8;
    static gic_probe_write16_insn: u8;
    static gic_probe_write32: u8;
    static gic_probe_write32_insn: u8;
    static gic_probe_write64: u8;
    static gic_probe_write64_insn: u8;
    static gic_probe_fault: u8;
}

/// `ESR_EL1` of the last fault a GIC probe caught.
static FAULT_ESR: AtomicU64 = AtomicU64::new(0);
/// `FAR_EL1` of the last fault a GIC probe caught.
static FAULT_FAR: AtomicU64 = AtomicU64::new(0);

/// From the EL1 synchronous exception handler: if `elr` is a GIC probe's
/// access, records the syndrome and fault address and returns where to
/// resume (the probes' fault path, which reports the failure).
pub fn fixup(elr: usize, esr: u64, far: u64) -> Option<usize> {
    let accesses = [
        &raw const gic_probe_read8_insn as usize,
        &raw const gic_probe_read16_insn as usize,
        &raw const gic_probe_read32_insn as usize,
        &raw const gic_probe_read64_insn as usize,
        &raw const gic_probe_read_pair_insn as usize,
        &raw const gic_probe_write8_insn as usize,
        &raw const gic_probe_write16_insn as usize,
        &raw const gic_probe_write32_insn as usize,
        &raw const gic_probe_write64_insn as usize,
    ];
    if accesses.contains(&elr) {
        FAULT_ESR.store(esr, Ordering::SeqCst);
        FAULT_FAR.store(far, Ordering::SeqCst);
        Some(&raw const gic_probe_fault as usize)
    } else {
        None
    }
}

/// An access width a probe can make.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Width {
    Byte,
    Half,
    Word,
    Double,
    /// `LDP` of two words (reads only).
    PairOfWords,
}

/// Reads `width` at `addr`, or `None` if the access faulted.
fn probe_read(addr: usize, width: Width) -> Option<u64> {
    let routine = match width {
        Width::Byte => &raw const gic_probe_read8,
        Width::Half => &raw const gic_probe_read16,
        Width::Word => &raw const gic_probe_read32,
        Width::Double => &raw const gic_probe_read64,
        Width::PairOfWords => &raw const gic_probe_read_pair,
    } as usize;
    let (value, ok): (u64, u64);
    // SAFETY: the routine loads from `addr` (GIC frames are mapped device
    // memory by the boot page table) and returns; a fault there resumes at
    // `gic_probe_fault` (see `fixup`), which returns ok = 0. It writes only
    // x0, x1, x2 and the link register, all declared.
    unsafe {
        asm!(
            "blr {routine}",
            routine = in(reg) routine,
            inout("x0") addr as u64 => value,
            out("x1") ok,
            out("x2") _,
            out("x30") _,
            options(nostack),
        );
    }
    (ok == 1).then_some(value)
}

/// Writes `value` (`width`) at `addr`; `false` if the access faulted.
fn probe_write(addr: usize, value: u64, width: Width) -> bool {
    let routine = match width {
        Width::Byte => &raw const gic_probe_write8,
        Width::Half => &raw const gic_probe_write16,
        Width::Word => &raw const gic_probe_write32,
        Width::Double | Width::PairOfWords => &raw const gic_probe_write64,
    } as usize;
    let ok: u64;
    // SAFETY: as for `probe_read`; the routine stores to `addr`.
    unsafe {
        asm!(
            "blr {routine}",
            routine = in(reg) routine,
            inout("x0") addr as u64 => _,
            inout("x1") value => ok,
            out("x2") _,
            out("x30") _,
            options(nostack),
        );
    }
    ok == 1
}

/// What a test reports when a register access it needs faulted.
const ACCESS_FAULTED: &str = "a GIC register access faulted (is the GIC emulated for this guest?)";

fn rd32(addr: usize) -> Result<u32, &'static str> {
    probe_read(addr, Width::Word)
        .map(|v| v as u32)
        .ok_or_else(|| {
            println!("  32-bit read of {addr:#x} faulted");
            ACCESS_FAULTED
        })
}

fn rd64(addr: usize) -> Result<u64, &'static str> {
    probe_read(addr, Width::Double).ok_or_else(|| {
        println!("  64-bit read of {addr:#x} faulted");
        ACCESS_FAULTED
    })
}

fn wr32(addr: usize, value: u32) -> TestResult {
    if probe_write(addr, value.into(), Width::Word) {
        Ok(())
    } else {
        println!("  32-bit write of {value:#x} to {addr:#x} faulted");
        Err(ACCESS_FAULTED)
    }
}

fn wr64(addr: usize, value: u64) -> TestResult {
    if probe_write(addr, value, Width::Double) {
        Ok(())
    } else {
        println!("  64-bit write of {value:#x} to {addr:#x} faulted");
        Err(ACCESS_FAULTED)
    }
}

// ---------------------------------------------------------------------------
// System registers.

/// Reads a system register by name.
macro_rules! mrs {
    ($reg:literal) => {{
        let value: u64;
        // SAFETY: reads a system register the guest may read at EL1 (the
        // GIC CPU interface, the generic timer, MPIDR, DAIF); no side
        // effect except for ICC_IAR1_EL1, read only by the IRQ handler.
        unsafe { asm!(concat!("mrs {0}, ", $reg), out(reg) value, options(nostack)) };
        value
    }};
}

/// Writes a system register by name, then synchronises the context.
macro_rules! msr {
    ($reg:literal, $value:expr) => {{
        let value: u64 = $value;
        // SAFETY: writes a GIC CPU interface or virtual timer register of
        // this guest; what it changes is interrupt delivery, which the
        // tests set up and take down around their use.
        unsafe { asm!(concat!("msr ", $reg, ", {0}"), "isb", in(reg) value, options(nostack)) };
    }};
}

/// `ICC_SRE_EL1.SRE`: the system register interface is in use.
const SRE: u64 = 1 << 0;
/// `ICC_CTLR_EL1.EOImode`.
const CTLR_EOIMODE: u64 = 1 << 1;
/// `CNTV_CTL_EL0.ENABLE`.
const CNTV_ENABLE: u64 = 1 << 0;
/// `CNTV_CTL_EL0.IMASK`.
const CNTV_IMASK: u64 = 1 << 1;
/// `DAIF.I`.
const DAIF_I: u64 = 1 << 7;

/// The virtual counter.
fn now() -> u64 {
    // SAFETY: an ISB so the read is not hoisted above earlier code.
    unsafe { asm!("isb", options(nostack)) };
    mrs!("cntvct_el0")
}

/// Counter ticks in `us` microseconds.
fn ticks(us: u64) -> u64 {
    mrs!("cntfrq_el0") * us / 1_000_000
}

/// MPIDR_EL1's affinity as `GICR_TYPER[63:32]` holds it:
/// `Aff3.Aff2.Aff1.Aff0`.
fn my_affinity() -> u64 {
    let mpidr = mrs!("mpidr_el1");
    ((mpidr >> 32) & 0xff) << 24 | (mpidr & 0xff_ffff)
}

/// Runs `f` with IRQs unmasked at EL1 (`DAIF.I` clear), masking them again
/// afterwards.
fn with_irqs_unmasked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: the EL1 vector table has an IRQ handler (rt.rs), which only
    // counts and returns; no lock is held across this call.
    unsafe { asm!("msr daifclr, #2", "isb", options(nostack)) };
    let result = f();
    // SAFETY: masks IRQs again.
    unsafe { asm!("msr daifset, #2", "isb", options(nostack)) };
    result
}

/// Spins until `cond` holds or `us` microseconds have passed (or the IRQ
/// handler declared a storm); returns whether it held.
fn wait_until(us: u64, cond: impl Fn() -> bool) -> bool {
    let deadline = now() + ticks(us);
    while !cond() {
        if now() >= deadline || STORM.load(Ordering::SeqCst) {
            return cond();
        }
        core::hint::spin_loop();
    }
    true
}

/// Spins for `us` microseconds.
fn delay(us: u64) {
    let deadline = now() + ticks(us);
    while now() < deadline {
        core::hint::spin_loop();
    }
}

// ---------------------------------------------------------------------------
// The IRQ handler and what it counts.

/// Interrupts taken (acknowledged or spurious) since the last reset.
static IRQS: AtomicU32 = AtomicU32::new(0);
/// After this many interrupts in one test, the handler masks IRQs in the
/// interrupted context (a storm: a line that never drops).
const STORM_LIMIT: u32 = 10_000;
/// The storm limit was hit.
static STORM: AtomicBool = AtomicBool::new(false);
/// `ICC_IAR1_EL1` returned a special INTID (1020..=1023): nothing pending.
static SPURIOUS: AtomicU32 = AtomicU32::new(0);
/// Interrupts no test expected (including timer interrupts outside the
/// timer test).
static UNEXPECTED: AtomicU32 = AtomicU32::new(0);
/// The INTID of the last unexpected interrupt.
static LAST_UNEXPECTED: AtomicU32 = AtomicU32::new(0);
/// Deliveries of each SGI.
static SGIS: [AtomicU32; 16] = [const { AtomicU32::new(0) }; 16];
/// Virtual timer interrupts taken while one was expected.
static TIMER_TICKS: AtomicU32 = AtomicU32::new(0);
/// How many timer interrupts the running test wants (0: none expected).
static TIMER_WANTED: AtomicU32 = AtomicU32::new(0);
/// The timer's period in counter ticks.
static TIMER_PERIOD: AtomicU64 = AtomicU64::new(0);

/// Clears every count (at the start of a test).
fn reset_counts() {
    for c in [
        &IRQS,
        &SPURIOUS,
        &UNEXPECTED,
        &LAST_UNEXPECTED,
        &TIMER_TICKS,
    ]
    .into_iter()
    .chain(&SGIS)
    {
        c.store(0, Ordering::SeqCst);
    }
    TIMER_WANTED.store(0, Ordering::SeqCst);
    STORM.store(false, Ordering::SeqCst);
}

/// The EL1 IRQ handler's body (called from `rt.rs`): acknowledges one
/// interrupt, counts it, handles the timer, and ends it (`EOImode` 0: the
/// EOI also deactivates). Never panics and never prints. Returns `true`
/// when IRQs must stay masked in the interrupted context (a storm).
pub fn handle_irq() -> bool {
    let taken = IRQS.fetch_add(1, Ordering::SeqCst) + 1;
    let iar = mrs!("icc_iar1_el1");
    // SAFETY: a barrier, as Linux has after the acknowledge (the
    // interrupt's side effects are ordered after it).
    unsafe { asm!("dsb sy", options(nostack)) };
    let intid = (iar & 0xff_ffff) as u32;
    match intid {
        1020..=1023 => {
            // Nothing to acknowledge, nothing to end.
            SPURIOUS.fetch_add(1, Ordering::SeqCst);
            return storm(taken);
        }
        VTIMER_PPI => timer_tick(),
        0..=15 => {
            SGIS[intid as usize].fetch_add(1, Ordering::SeqCst);
        }
        _ => {
            UNEXPECTED.fetch_add(1, Ordering::SeqCst);
            LAST_UNEXPECTED.store(intid, Ordering::SeqCst);
        }
    }
    msr!("icc_eoir1_el1", iar);
    storm(taken)
}

/// Whether `taken` interrupts make a storm (recorded).
fn storm(taken: u32) -> bool {
    if taken >= STORM_LIMIT {
        STORM.store(true, Ordering::SeqCst);
        true
    } else {
        false
    }
}

/// A virtual timer interrupt: counted and re-armed for the next period, or
/// stopped after the last one wanted (and when none is wanted, stopped and
/// counted as unexpected). Either way the timer's output is low before the
/// EOI, so it does not fire again at once.
fn timer_tick() {
    let wanted = TIMER_WANTED.load(Ordering::SeqCst);
    if wanted == 0 {
        msr!("cntv_ctl_el0", CNTV_IMASK);
        UNEXPECTED.fetch_add(1, Ordering::SeqCst);
        LAST_UNEXPECTED.store(VTIMER_PPI, Ordering::SeqCst);
        return;
    }
    let ticks = TIMER_TICKS.fetch_add(1, Ordering::SeqCst) + 1;
    if ticks < wanted {
        msr!("cntv_tval_el0", TIMER_PERIOD.load(Ordering::SeqCst));
    } else {
        msr!("cntv_ctl_el0", CNTV_IMASK);
    }
}

/// Fails if the handler saw anything it did not expect.
fn no_surprises(spurious_allowed: u32) -> TestResult {
    let unexpected = UNEXPECTED.load(Ordering::SeqCst);
    let spurious = SPURIOUS.load(Ordering::SeqCst);
    if STORM.load(Ordering::SeqCst) {
        println!("  {STORM_LIMIT} interrupts: a storm, IRQs masked by the handler");
        return Err("interrupt storm");
    }
    if unexpected != 0 {
        println!(
            "  {unexpected} unexpected interrupt(s), the last INTID {}",
            LAST_UNEXPECTED.load(Ordering::SeqCst)
        );
        return Err("an unexpected interrupt was delivered");
    }
    if spurious > spurious_allowed {
        println!("  {spurious} spurious acknowledges (INTID 1023)");
        return Err("too many spurious interrupts");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The driver: bring-up and take-down.

/// Wakes the redistributor: clears `ProcessorSleep`, waits (bounded) for
/// `ChildrenAsleep` to clear.
fn wake_redistributor() -> TestResult {
    let waker = rd32(GICR + gicr::WAKER)?;
    wr32(GICR + gicr::WAKER, waker & !gicr::WAKER_PROCESSOR_SLEEP)?;
    for _ in 0..1000 {
        if rd32(GICR + gicr::WAKER)? & gicr::WAKER_CHILDREN_ASLEEP == 0 {
            return Ok(());
        }
    }
    Err("GICR_WAKER.ChildrenAsleep stayed set after clearing ProcessorSleep")
}

/// What [`gic_up`] changed, for [`gic_down`].
#[derive(Clone, Copy, Debug)]
struct Saved {
    gicd_ctlr: u32,
    pmr: u64,
    igrpen1: u64,
    ctlr: u64,
}

/// Brings up what delivering an interrupt to this vCPU needs: the
/// redistributor awake, group 1 enabled in the distributor, the CPU
/// interface's system registers in use, `EOImode` 0, the priority mask
/// open, group 1 enabled at the CPU interface. IRQs stay masked.
fn gic_up() -> Result<Saved, &'static str> {
    reset_counts();
    wake_redistributor()?;
    let gicd_ctlr = rd32(GICD + gicd::CTLR)?;
    wr32(GICD + gicd::CTLR, gicd_ctlr | gicd::CTLR_ENABLE_GRP1)?;
    check(
        rd32(GICD + gicd::CTLR)? & gicd::CTLR_ENABLE_GRP1 != 0,
        "GICD_CTLR.EnableGrp1 does not stick",
    )?;
    let sre = mrs!("icc_sre_el1");
    if sre & SRE == 0 {
        msr!("icc_sre_el1", sre | SRE);
    }
    check(
        mrs!("icc_sre_el1") & SRE != 0,
        "ICC_SRE_EL1.SRE is 0: no system register interface",
    )?;
    let saved = Saved {
        gicd_ctlr,
        pmr: mrs!("icc_pmr_el1"),
        igrpen1: mrs!("icc_igrpen1_el1"),
        ctlr: mrs!("icc_ctlr_el1"),
    };
    msr!("icc_ctlr_el1", saved.ctlr & !CTLR_EOIMODE);
    check(
        mrs!("icc_ctlr_el1") & CTLR_EOIMODE == 0,
        "ICC_CTLR_EL1.EOImode stays 1",
    )?;
    msr!("icc_pmr_el1", 0xff);
    check(
        mrs!("icc_pmr_el1") != 0,
        "ICC_PMR_EL1 stays 0: every interrupt masked",
    )?;
    msr!("icc_igrpen1_el1", 1);
    check(
        mrs!("icc_igrpen1_el1") & 1 == 1,
        "ICC_IGRPEN1_EL1.Enable does not stick",
    )?;
    Ok(saved)
}

/// Configures private interrupts `mask` (bit n = INTID n) as group 1 with
/// [`TEST_PRIORITY`], not pending, and enables them.
fn enable_private(mask: u32) -> TestResult {
    let group = rd32(GICR_SGI + sgi::IGROUPR0)?;
    wr32(GICR_SGI + sgi::IGROUPR0, group | mask)?;
    check(
        rd32(GICR_SGI + sgi::IGROUPR0)? & mask == mask,
        "GICR_IGROUPR0: the interrupts do not go to group 1",
    )?;
    for intid in (0..32).filter(|i| mask >> i & 1 == 1) {
        let reg = GICR_SGI + sgi::IPRIORITYR + (intid / 4) * 4;
        let shift = (intid % 4) * 8;
        let word = rd32(reg)?;
        let word = (word & !(0xff << shift)) | u32::from(TEST_PRIORITY) << shift;
        wr32(reg, word)?;
        check(
            rd32(reg)? >> shift & 0xff == u32::from(TEST_PRIORITY),
            "GICR_IPRIORITYR does not keep the priority",
        )?;
    }
    wr32(GICR_SGI + sgi::ICPENDR0, mask)?;
    wr32(GICR_SGI + sgi::ISENABLER0, mask)?;
    check(
        rd32(GICR_SGI + sgi::ISENABLER0)? & mask == mask,
        "GICR_ISENABLER0: the interrupts are not enabled",
    )
}

/// Disables private interrupts `mask` and clears their pending and active
/// states.
fn disable_private(mask: u32) -> TestResult {
    wr32(GICR_SGI + sgi::ICENABLER0, mask)?;
    wr32(GICR_SGI + sgi::ICPENDR0, mask)?;
    wr32(GICR_SGI + sgi::ICACTIVER0, mask)?;
    check(
        rd32(GICR_SGI + sgi::ISENABLER0)? & mask == 0,
        "GICR_ICENABLER0 did not disable the interrupts",
    )
}

/// Undoes [`gic_up`] (IRQs masked first); the redistributor stays awake,
/// as a driver leaves it.
fn gic_down(saved: Saved) -> TestResult {
    // SAFETY: masks IRQs.
    unsafe { asm!("msr daifset, #2", "isb", options(nostack)) };
    msr!("icc_igrpen1_el1", saved.igrpen1);
    msr!("icc_pmr_el1", saved.pmr);
    msr!("icc_ctlr_el1", saved.ctlr);
    wr32(GICD + gicd::CTLR, saved.gicd_ctlr)
}

/// Runs `body` between [`gic_up`] (with `private` enabled) and
/// [`gic_down`], which runs whatever `body` returned; the first error
/// wins.
fn with_gic(private: u32, body: impl FnOnce() -> TestResult) -> TestResult {
    let saved = gic_up()?;
    let result = enable_private(private).and_then(|()| body());
    let disabled = disable_private(private);
    let down = gic_down(saved);
    result.and(disabled).and(down)
}

// ---------------------------------------------------------------------------
// The tests.

/// The identification and type registers describe a GICv3 without LPIs,
/// one redistributor (the last) whose affinity is this vCPU's MPIDR, and
/// the `GICR_WAKER` handshake works both ways.
fn distributor_and_redistributor_look_like_a_gicv3() -> TestResult {
    check(
        (rd32(GICD + gicd::PIDR2)? >> 4) & 0xf == 3,
        "GICD_PIDR2.ArchRev is not 3 (GICv3)",
    )?;
    let typer = rd32(GICD + gicd::TYPER)?;
    check(
        typer & gicd::TYPER_IT_LINES >= 1,
        "GICD_TYPER.ITLinesNumber is 0: no SPIs (the UART's SPI 33 needs 1)",
    )?;
    check(
        typer & gicd::TYPER_LPIS == 0,
        "GICD_TYPER.LPIS is set: LPIs offered",
    )?;
    check(
        rd32(GICD + gicd::CTLR)? & gicd::CTLR_ARE != 0,
        "GICD_CTLR.ARE is 0: no affinity routing",
    )?;
    check(
        (rd32(GICR + gicr::PIDR2)? >> 4) & 0xf == 3,
        "GICR_PIDR2.ArchRev is not 3 (GICv3)",
    )?;
    let rtyper = rd64(GICR + gicr::TYPER)?;
    check(
        rtyper & gicr::TYPER_PLPIS == 0,
        "GICR_TYPER.PLPIS is set: LPIs offered",
    )?;
    // Last marks the last vCPU's redistributor only (frames 128 KiB apart).
    let last = crate::smp_tests::count_vcpus() - 1;
    if last > 0 {
        check(
            rtyper & gicr::TYPER_LAST == 0,
            "GICR_TYPER.Last is set on the first of several redistributors",
        )?;
    }
    let last_typer = rd64(GICR + last * 0x2_0000 + gicr::TYPER)?;
    check(
        last_typer >> 32 == last as u64,
        "the last redistributor's GICR_TYPER affinity is not the last vCPU's",
    )?;
    check(
        last_typer & gicr::TYPER_LAST != 0,
        "GICR_TYPER.Last is 0 for the last redistributor",
    )?;
    let affinity = my_affinity();
    if rtyper >> 32 != affinity {
        println!(
            "  GICR_TYPER {rtyper:#x}, MPIDR_EL1 {:#x}",
            mrs!("mpidr_el1")
        );
        return Err("GICR_TYPER's affinity is not MPIDR_EL1's");
    }
    check(
        u64::from(rd32(GICR + gicr::TYPER + 4)?) == affinity,
        "GICR_TYPER's upper half read alone differs",
    )?;
    // The handshake: asleep, then awake.
    let waker = rd32(GICR + gicr::WAKER)?;
    wr32(GICR + gicr::WAKER, waker | gicr::WAKER_PROCESSOR_SLEEP)?;
    check(
        rd32(GICR + gicr::WAKER)? & gicr::WAKER_CHILDREN_ASLEEP != 0,
        "GICR_WAKER.ChildrenAsleep not set with ProcessorSleep",
    )?;
    wake_redistributor()?;
    check(
        rd32(GICR + gicr::WAKER)? & (gicr::WAKER_PROCESSOR_SLEEP | gicr::WAKER_CHILDREN_ASLEEP)
            == 0,
        "GICR_WAKER does not read awake",
    )
}

/// The number of timer interrupts the timer test waits for.
const TIMER_TICKS_WANTED: u32 = 10;

/// The virtual timer (PPI 27, hardware-backed by the hypervisor) fires
/// every millisecond; the handler re-arms it each time and stops it at the
/// tenth. Exactly ten interrupts, all INTID 27, nothing else, and none
/// after the timer and the PPI are off.
fn virtual_timer_interrupts_are_delivered() -> TestResult {
    let period = ticks(1000);
    check(period > 0, "CNTFRQ_EL0 is zero")?;
    with_gic(1 << VTIMER_PPI, || {
        TIMER_PERIOD.store(period, Ordering::SeqCst);
        TIMER_WANTED.store(TIMER_TICKS_WANTED, Ordering::SeqCst);
        msr!("cntv_tval_el0", period);
        msr!("cntv_ctl_el0", CNTV_ENABLE);
        let done = with_irqs_unmasked(|| {
            let done = wait_until(2_000_000, || {
                TIMER_TICKS.load(Ordering::SeqCst) >= TIMER_TICKS_WANTED
            });
            // Room for an eleventh interrupt, which must not come.
            delay(5_000);
            done
        });
        let ctl = mrs!("cntv_ctl_el0");
        msr!("cntv_ctl_el0", 0);
        let taken = TIMER_TICKS.load(Ordering::SeqCst);
        if taken != TIMER_TICKS_WANTED {
            println!("  {taken} timer interrupts, want {TIMER_TICKS_WANTED} (done: {done})");
            no_surprises(TIMER_TICKS_WANTED)?;
            return Err("not exactly the timer interrupts asked for");
        }
        check(
            ctl & CNTV_IMASK != 0,
            "the handler did not stop the timer after the last interrupt",
        )?;
        no_surprises(TIMER_TICKS_WANTED)?;
        // Off: the timer stopped and PPI 27 disabled, nothing more comes
        // even with IRQs unmasked.
        TIMER_WANTED.store(0, Ordering::SeqCst);
        wr32(GICR_SGI + sgi::ICENABLER0, 1 << VTIMER_PPI)?;
        let irqs = IRQS.load(Ordering::SeqCst);
        with_irqs_unmasked(|| delay(3_000));
        check(
            IRQS.load(Ordering::SeqCst) == irqs,
            "an interrupt came after the timer and PPI 27 were turned off",
        )?;
        check(
            rd32(GICR_SGI + sgi::ISACTIVER0)? & 1 << VTIMER_PPI == 0,
            "PPI 27 still active after its EOI",
        )
    })?;
    check(mrs!("daif") & DAIF_I != 0, "IRQs not masked after the test")?;
    check(
        mrs!("cntv_ctl_el0") & CNTV_ENABLE == 0,
        "the virtual timer still enabled after the test",
    )
}

/// The SGIs the SGI test enables.
const TEST_SGIS: [u32; 3] = [1, 2, 3];
/// An SGI the SGI test leaves disabled.
const DISABLED_SGI: u32 = 4;

/// `ICC_SGI1R_EL1` naming this vCPU in its target list: `Aff3.Aff2.Aff1`
/// from MPIDR, the range selector and target list bit for its `Aff0`.
fn sgi1r_to_self(intid: u32) -> u64 {
    let mpidr = mrs!("mpidr_el1");
    let aff0 = mpidr & 0xff;
    let aff1 = (mpidr >> 8) & 0xff;
    let aff2 = (mpidr >> 16) & 0xff;
    let aff3 = (mpidr >> 32) & 0xff;
    aff3 << 48
        | (aff0 / 16) << 44
        | aff2 << 32
        | u64::from(intid) << 24
        | aff1 << 16
        | 1 << (aff0 % 16)
}

/// `ICC_SGI1R_EL1.IRM`: every PE but the sender.
const SGI1R_IRM: u64 = 1 << 40;

/// Sends an SGI (a trapped system register write).
fn send_sgi(value: u64) {
    // SAFETY: a barrier: memory writes before the SGI are visible to its
    // handler, as Linux orders them.
    unsafe { asm!("dsb ishst", options(nostack)) };
    msr!("icc_sgi1r_el1", value);
}

/// SGIs 1..3 sent to this vCPU by its affinity arrive once each with their
/// INTID, and end inactive; an SGI to "all but self" reaches nobody (one
/// vCPU); a disabled SGI stays pending and is not delivered.
fn self_sgis_are_delivered() -> TestResult {
    let enabled = TEST_SGIS.iter().fold(0, |m, i| m | 1 << i);
    with_gic(enabled, || {
        wr32(GICR_SGI + sgi::ICPENDR0, 1 << DISABLED_SGI)?;
        with_irqs_unmasked(|| -> TestResult {
            for intid in TEST_SGIS {
                send_sgi(sgi1r_to_self(intid));
                let count = &SGIS[intid as usize];
                if !wait_until(100_000, || count.load(Ordering::SeqCst) >= 1) {
                    println!("  SGI {intid} not delivered");
                    return Err("an SGI sent to self was not delivered");
                }
            }
            // All but self: with one vCPU, nobody.
            send_sgi(SGI1R_IRM | u64::from(TEST_SGIS[1]) << 24);
            // Disabled: latched pending, not delivered.
            send_sgi(sgi1r_to_self(DISABLED_SGI));
            delay(10_000);
            Ok(())
        })?;
        for intid in TEST_SGIS {
            let n = SGIS[intid as usize].load(Ordering::SeqCst);
            if n != 1 {
                println!("  SGI {intid} delivered {n} times");
                return Err("an SGI was not delivered exactly once (IRM=1 must skip self)");
            }
        }
        check(
            SGIS[DISABLED_SGI as usize].load(Ordering::SeqCst) == 0,
            "a disabled SGI was delivered",
        )?;
        // A spurious acknowledge per SGI at most (none is expected).
        no_surprises(TEST_SGIS.len() as u32)?;
        let pending = rd32(GICR_SGI + sgi::ISPENDR0)?;
        check(
            pending & enabled == 0,
            "an SGI stays pending after delivery (or IRM=1 latched one for self)",
        )?;
        check(
            pending & 1 << DISABLED_SGI != 0,
            "a disabled SGI sent to self is not pending",
        )?;
        check(
            rd32(GICR_SGI + sgi::ISACTIVER0)? & enabled == 0,
            "an SGI stays active after its EOI (EOImode 0)",
        )?;
        wr32(GICR_SGI + sgi::ICPENDR0, 1 << DISABLED_SGI)?;
        check(
            rd32(GICR_SGI + sgi::ISPENDR0)? & 1 << DISABLED_SGI == 0,
            "GICR_ICPENDR0 does not clear a pending SGI",
        )
    })?;
    check(mrs!("daif") & DAIF_I != 0, "IRQs not masked after the test")
}

/// lazyhyp (test builds): a checksum of the hypervisor's image, heap and
/// page-table pool, in x1.
// TODO: move to hyp.rs with the other test calls once the hypervisor
// implements it (until then it answers NOT_SUPPORTED and the LPI test
// fails on that check alone, after its register checks).
const HYP_TEST_CHECKSUM: u32 = 0xc600_0f06;

/// Physical addresses of the hypervisor's own memory (README memory map):
/// its image, its heap, its page-table pool.
const HYPERVISOR_PAS: [u64; 3] = [0x4020_0000, 0x4040_0000, 0x40c0_0000];

/// `GICR_PROPBASER`/`PENDBASER` attributes a Linux driver would write:
/// inner-shareable, write-back cacheable; `IDbits` = 15 (16 bits of
/// INTIDs) in `PROPBASER`, `PTZ` in `PENDBASER`.
const PROPBASER_ATTRS: u64 = 1 << 10 | 7 << 7 | 15;
const PENDBASER_ATTRS: u64 = 1 << 62 | 1 << 10 | 7 << 7;

/// A guest points the LPI tables at hypervisor memory and enables LPIs:
/// the registers read as zero, `EnableLPIs` stays clear, and the
/// hypervisor's memory is unchanged (by its own checksum, before and
/// after).
fn lpi_registers_cannot_make_the_gic_touch_memory() -> TestResult {
    let before = hvc(HYP_TEST_CHECKSUM, 0, 0, 0);
    let rd = GICR;
    for (i, &pa) in HYPERVISOR_PAS.iter().enumerate() {
        let other = HYPERVISOR_PAS[(i + 1) % HYPERVISOR_PAS.len()];
        wr64(rd + gicr::PROPBASER, pa | PROPBASER_ATTRS)?;
        wr64(rd + gicr::PENDBASER, other | PENDBASER_ATTRS)?;
        wr32(rd + gicr::CTLR, gicr::CTLR_ENABLE_LPIS)?;
        // Again with LPIs (nominally) on, and as 32-bit halves.
        wr32(rd + gicr::PROPBASER, (pa | PROPBASER_ATTRS) as u32)?;
        wr32(rd + gicr::PROPBASER + 4, (pa >> 32) as u32)?;
        wr32(rd + gicr::PENDBASER, (other | PENDBASER_ATTRS) as u32)?;
        wr32(
            rd + gicr::PENDBASER + 4,
            ((other | PENDBASER_ATTRS) >> 32) as u32,
        )?;
        // An LPI (the first INTID, 8192) made pending directly.
        wr64(rd + gicr::SETLPIR, 8192)?;
        let prop = rd64(rd + gicr::PROPBASER)?;
        let pend = rd64(rd + gicr::PENDBASER)?;
        let ctlr = rd32(rd + gicr::CTLR)?;
        if prop != 0 || pend != 0 || ctlr & gicr::CTLR_ENABLE_LPIS != 0 {
            println!("  PROPBASER {prop:#x}, PENDBASER {pend:#x}, GICR_CTLR {ctlr:#x}");
            return Err("an LPI register kept what the guest wrote");
        }
    }
    // Give a GIC that did take the tables time to read and write them.
    delay(2_000);
    let after = hvc(HYP_TEST_CHECKSUM, 0, 0, 0);
    wr32(rd + gicr::CTLR, 0)?;
    wr64(rd + gicr::PROPBASER, 0)?;
    wr64(rd + gicr::PENDBASER, 0)?;
    check(
        rd64(rd + gicr::TYPER)? & gicr::TYPER_PLPIS == 0,
        "GICR_TYPER.PLPIS is set",
    )?;
    if before[0] != 0 || after[0] != 0 {
        println!(
            "  HYP_TEST_CHECKSUM: x0 = {:#x}, then {:#x}",
            before[0], after[0]
        );
        return Err("HYP_TEST_CHECKSUM failed (not implemented?)");
    }
    if before[1] != after[1] {
        println!("  checksum {:#x} before, {:#x} after", before[1], after[1]);
        return Err("hypervisor memory changed while the guest programmed LPIs");
    }
    Ok(())
}

/// Exception class of a data abort taken from the current EL.
const EC_DABT_CURRENT: u64 = 0x25;
/// Fault status of a synchronous external abort.
const FSC_SEA: u64 = 0x10;
/// `ESR_ELx.WnR`.
const ESR_WNR: u64 = 1 << 6;

/// Makes an access the GIC must refuse and checks the guest got a
/// synchronous external abort for it, at that address, with the direction
/// right.
fn refused(
    what: &'static str,
    addr: usize,
    write: bool,
    access: impl FnOnce() -> bool,
) -> TestResult {
    FAULT_ESR.store(0, Ordering::SeqCst);
    FAULT_FAR.store(0, Ordering::SeqCst);
    if access() {
        println!("  {what}: accepted");
        return Err("an access the GIC does not take was not refused");
    }
    let esr = FAULT_ESR.load(Ordering::SeqCst);
    let far = FAULT_FAR.load(Ordering::SeqCst);
    if esr >> 26 != EC_DABT_CURRENT || esr & 0x3f != FSC_SEA {
        println!("  {what}: ESR {esr:#x}");
        return Err("a refused GIC access was not a synchronous external abort");
    }
    if (esr & ESR_WNR != 0) != write {
        println!("  {what}: ESR {esr:#x}");
        return Err("a refused GIC access reports the wrong direction (WnR)");
    }
    if far != addr as u64 {
        println!("  {what}: FAR {far:#x}, want {addr:#x}");
        return Err("a refused GIC access reports the wrong address");
    }
    Ok(())
}

/// Where no register lives, reads are zero and writes vanish; an access of
/// a size a register does not take, or one without a syndrome, is an
/// external abort that changes nothing; the GIC works afterwards.
fn gic_bad_accesses_are_contained() -> TestResult {
    let hole = GICD + gicd::UNEMULATED;
    check(
        rd32(hole)? == 0,
        "an unemulated GICD offset does not read 0",
    )?;
    wr32(hole, 0xffff_ffff)?;
    wr64(hole + 8, u64::MAX)?;
    check(
        rd32(hole)? == 0 && rd64(hole + 8)? == 0,
        "an unemulated GICD offset kept a write",
    )?;
    let ctlr = rd32(GICD + gicd::CTLR)?;
    refused("byte write to GICD_CTLR", GICD + gicd::CTLR, true, || {
        probe_write(GICD + gicd::CTLR, 0xff, Width::Byte)
    })?;
    check(
        rd32(GICD + gicd::CTLR)? == ctlr,
        "a refused byte write changed GICD_CTLR",
    )?;
    refused(
        "16-bit read of GICD_TYPER",
        GICD + gicd::TYPER,
        false,
        || probe_read(GICD + gicd::TYPER, Width::Half).is_some(),
    )?;
    refused("64-bit read of GICD_CTLR", GICD + gicd::CTLR, false, || {
        probe_read(GICD + gicd::CTLR, Width::Double).is_some()
    })?;
    refused("load pair from GICD_CTLR", GICD + gicd::CTLR, false, || {
        probe_read(GICD + gicd::CTLR, Width::PairOfWords).is_some()
    })?;
    refused("byte read of GICR_WAKER", GICR + gicr::WAKER, false, || {
        probe_read(GICR + gicr::WAKER, Width::Byte).is_some()
    })?;
    refused(
        "16-bit write to GICR_ISENABLER0",
        GICR_SGI + sgi::ISENABLER0,
        true,
        || probe_write(GICR_SGI + sgi::ISENABLER0, 0xffff, Width::Half),
    )?;
    check(
        // The SGIs' bits, [15:0].
        rd32(GICR_SGI + sgi::ISENABLER0)? as u16 == 0,
        "a refused write enabled SGIs",
    )?;
    check(
        (rd32(GICD + gicd::PIDR2)? >> 4) & 0xf == 3,
        "the GIC no longer answers after the bad accesses",
    )
}

/// A guest that floods interrupts cannot keep the hypervisor busy: a
/// virtual timer that fires at once and is never acknowledged (IRQs masked
/// at EL1) costs EL2 one exit, because the physical PPI stays active until
/// the guest deactivates the virtual one behind the hardware-backed list
/// register; a thousand self-SGIs cost one trapped write each and are
/// delivered once (SGIs latch). After unmasking, each source is delivered
/// exactly once.
fn interrupt_floods_do_not_stall_the_hypervisor() -> TestResult {
    const FLOOD_SGI: u32 = 5;
    let irq_exits = || crate::hyp::stat("exits_irq").unwrap_or(u64::MAX);
    with_gic(1 << VTIMER_PPI | 1 << FLOOD_SGI, || {
        // The timer "at 0": expired at once, and left expired while masked.
        TIMER_WANTED.store(1, Ordering::SeqCst);
        let before = irq_exits();
        msr!("cntv_tval_el0", 0);
        msr!("cntv_ctl_el0", CNTV_ENABLE);
        delay(20_000);
        let timer_exits = irq_exits().saturating_sub(before);
        // A thousand self-SGIs while masked.
        for _ in 0..1000 {
            send_sgi(sgi1r_to_self(FLOOD_SGI));
        }
        let after_sgis = irq_exits();
        let sgi_irq_exits = after_sgis.saturating_sub(before + timer_exits);
        with_irqs_unmasked(|| {
            wait_until(100_000, || {
                TIMER_TICKS.load(Ordering::SeqCst) >= 1
                    && SGIS[FLOOD_SGI as usize].load(Ordering::SeqCst) >= 1
            });
            delay(5_000);
        });
        msr!("cntv_ctl_el0", 0);
        TIMER_WANTED.store(0, Ordering::SeqCst);
        println!(
            "  timer at 0 for 20 ms masked: {timer_exits} IRQ exits; 1000 self-SGIs: {sgi_irq_exits} IRQ exits"
        );
        check(
            timer_exits <= 2,
            "an unacknowledged timer kept exiting to EL2",
        )?;
        check(sgi_irq_exits <= 1, "self-SGIs caused physical interrupts")?;
        check(
            TIMER_TICKS.load(Ordering::SeqCst) == 1,
            "the flooding timer was not delivered exactly once",
        )?;
        check(
            SGIS[FLOOD_SGI as usize].load(Ordering::SeqCst) == 1,
            "a thousand latched self-SGIs were not delivered exactly once",
        )?;
        no_surprises(1)
    })
}
