//! SMP tests: secondary vCPUs started with PSCI `CPU_ON`, concurrent
//! demand faults, and stage-2 changes made by one vCPU inside a lazy batch
//! while the others touch the range in a loop.
//!
//! A secondary starts at [`guest_secondary_entry`] with the MMU off; it
//! takes the primary's EL1 translation registers (copied to [`BOOT`] and
//! cleaned to the point of coherency first), its own stack, and then runs
//! [`secondary_main`]: a loop that runs each task the primary posts
//! (`TASK`, `EPOCH`) once and counts it done.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::console::println;
use crate::hyp::{self, MmOp, hvc, op};
use crate::probe;

/// Most vCPUs the tests drive.
pub const MAX_VCPUS: usize = 8;
/// PSCI `CPU_ON` (SMC64).
const CPU_ON: u32 = 0xc400_0003;
/// PSCI `AFFINITY_INFO` (SMC64).
const AFFINITY_INFO: u32 = 0xc400_0004;
/// PSCI `CPU_SUSPEND` (SMC64).
const CPU_SUSPEND: u32 = 0xc400_0001;
const PAGE: u64 = 4096;
/// A 2 MiB region no other test touches, for the concurrent faults.
const FAULT_REGION: u64 = 0x4e00_0000;
/// Pages no other test touches, for the stage-2 changes.
const CHANGE_AREA: u64 = 0x4e40_0000;

/// Stack pages of each secondary.
const STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stacks([[u8; STACK_SIZE]; MAX_VCPUS]);
#[unsafe(no_mangle)]
static mut GUEST_SECONDARY_STACKS: Stacks = Stacks([[0; STACK_SIZE]; MAX_VCPUS]);

/// The primary's EL1 registers a secondary installs (MMU off) before it can
/// use anything else.
#[repr(C, align(64))]
struct Boot {
    mair: u64,
    tcr: u64,
    ttbr0: u64,
    sctlr: u64,
    vbar: u64,
    cpacr: u64,
}
#[unsafe(no_mangle)]
static mut GUEST_SECONDARY_BOOT: Boot = Boot {
    mair: 0,
    tcr: 0,
    ttbr0: 0,
    sctlr: 0,
    vbar: 0,
    cpacr: 0,
};

global_asm!(
    r#"
.section .text.guest_secondary, "ax"
.global guest_secondary_entry
guest_secondary_entry:
    adrp x1, GUEST_SECONDARY_BOOT
    add x1, x1, :lo12:GUEST_SECONDARY_BOOT
    ldr x2, [x1, #0]
    msr mair_el1, x2
    ldr x2, [x1, #8]
    msr tcr_el1, x2
    ldr x2, [x1, #16]
    msr ttbr0_el1, x2
    ldr x2, [x1, #32]
    msr vbar_el1, x2
    ldr x2, [x1, #40]
    msr cpacr_el1, x2
    isb
    tlbi vmalle1
    dsb nsh
    isb
    ldr x2, [x1, #24]
    msr sctlr_el1, x2
    isb
    adrp x3, GUEST_SECONDARY_STACKS
    add x3, x3, :lo12:GUEST_SECONDARY_STACKS
    add x4, x0, #1
    lsl x4, x4, #14
    add x3, x3, x4
    mov sp, x3
    bl {main}
    b .
"#,
    main = sym secondary_main,
);

unsafe extern "C" {
    fn guest_secondary_entry();
}

/// vCPUs running (bit i = vCPU i).
static ONLINE: AtomicU32 = AtomicU32::new(1);
/// The task the secondaries run once per epoch.
static TASK: AtomicUsize = AtomicUsize::new(0);
static EPOCH: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);
/// vCPUs in the VM (set by the first test).
static VCPUS: AtomicUsize = AtomicUsize::new(1);

extern "C" fn secondary_main(index: u64) -> ! {
    ONLINE.fetch_or(1 << index, Ordering::Release);
    let mut seen = 0;
    loop {
        let epoch = EPOCH.load(Ordering::Acquire);
        if epoch != seen {
            seen = epoch;
            let task = TASK.load(Ordering::Acquire);
            if task != 0 {
                // SAFETY: TASK only ever holds a `fn(usize)` (see `run_on_all`).
                let f: fn(usize) = unsafe { core::mem::transmute(task) };
                f(index as usize);
            }
            DONE.fetch_add(1, Ordering::AcqRel);
        }
        core::hint::spin_loop();
    }
}

/// The virtual counter.
fn now() -> u64 {
    let t: u64;
    // SAFETY: reads the virtual counter.
    unsafe { asm!("isb", "mrs {0}, cntvct_el0", out(reg) t, options(nomem, nostack)) };
    t
}

/// Ticks of the counter per second.
fn freq() -> u64 {
    let f: u64;
    // SAFETY: reads the counter frequency.
    unsafe { asm!("mrs {0}, cntfrq_el0", out(reg) f, options(nomem, nostack)) };
    f
}

/// Waits (at most `secs` seconds) until `done()`.
fn wait_until(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    let end = now() + secs * freq();
    while now() < end {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// Runs `f(i)` on every secondary and `f(0)` here; waits (bounded) for all.
fn run_on_all(f: fn(usize)) -> bool {
    let n = VCPUS.load(Ordering::Relaxed) as u64;
    DONE.store(0, Ordering::Release);
    TASK.store(f as usize, Ordering::Release);
    EPOCH.fetch_add(1, Ordering::AcqRel);
    f(0);
    wait_until(20, || DONE.load(Ordering::Acquire) == n - 1)
}

fn status(r: [u64; 4]) -> i64 {
    i64::from_ne_bytes(r[0].to_ne_bytes())
}

fn check(cond: bool, reason: &'static str) -> Result<(), &'static str> {
    if cond { Ok(()) } else { Err(reason) }
}

/// Copies this vCPU's EL1 translation state for the secondaries.
fn publish_boot_state() {
    let (mair, tcr, ttbr0, sctlr, vbar, cpacr): (u64, u64, u64, u64, u64, u64);
    // SAFETY: reads EL1 system registers.
    unsafe {
        asm!(
            "mrs {0}, mair_el1", "mrs {1}, tcr_el1", "mrs {2}, ttbr0_el1",
            "mrs {3}, sctlr_el1", "mrs {4}, vbar_el1", "mrs {5}, cpacr_el1",
            out(reg) mair, out(reg) tcr, out(reg) ttbr0, out(reg) sctlr, out(reg) vbar,
            out(reg) cpacr, options(nomem, nostack)
        );
    }
    let boot = &raw mut GUEST_SECONDARY_BOOT;
    // SAFETY: no secondary runs yet; this is the only writer.
    unsafe {
        *boot = Boot {
            mair,
            tcr,
            ttbr0,
            sctlr,
            vbar,
            cpacr,
        };
        // To the point of coherency: secondaries read it with the MMU off.
        asm!("dc cvac, {0}", "dsb sy", in(reg) boot as u64, options(nostack));
    }
}

/// The vCPU count: vCPUs 1.. answer `AFFINITY_INFO` with OFF until one
/// that does not exist answers `INVALID_PARAMETERS`.
#[must_use]
pub fn count_vcpus() -> usize {
    let mut n = 1;
    while n < MAX_VCPUS && status(hvc(AFFINITY_INFO, n as u64, 0, 0)) != -2 {
        n += 1;
    }
    n
}

/// All vCPUs come up through PSCI; the error cases of `CPU_ON` and
/// `AFFINITY_INFO` are answered as PSCI says.
pub fn vcpus_come_up_through_psci() -> Result<(), &'static str> {
    let n = count_vcpus();
    VCPUS.store(n, Ordering::Relaxed);
    println!("  {n} vCPUs");
    check(n >= 2, "fewer than 2 vCPUs: run with -smp and guest.vcpus")?;
    publish_boot_state();
    let entry = guest_secondary_entry as *const () as u64;
    for i in 1..n as u64 {
        check(
            status(hvc(AFFINITY_INFO, i, 0, 0)) == 1,
            "AFFINITY_INFO of an off vCPU is not OFF",
        )?;
        check(
            status(hvc(CPU_ON, i, 0x1000, i)) == -9,
            "CPU_ON with an entry outside RAM is not INVALID_ADDRESS",
        )?;
        check(status(hvc(CPU_ON, i, entry, i)) == 0, "CPU_ON failed")?;
        let again = status(hvc(CPU_ON, i, entry, i));
        check(
            again == -4 || again == -5,
            "CPU_ON of a started vCPU is not ALREADY_ON/ON_PENDING",
        )?;
    }
    check(
        status(hvc(CPU_ON, n as u64, entry, 0)) == -2,
        "CPU_ON of a vCPU beyond the VM is not INVALID_PARAMETERS",
    )?;
    let all = (1u32 << n) - 1;
    check(
        wait_until(10, || ONLINE.load(Ordering::Acquire) == all),
        "not every vCPU came up",
    )?;
    for i in 1..n as u64 {
        check(
            status(hvc(AFFINITY_INFO, i, 0, 0)) == 0,
            "AFFINITY_INFO of a running vCPU is not ON",
        )?;
    }
    check(run_on_all(|_| {}), "a vCPU did not run its task")
}

/// Every vCPU writes its word into each page of one untouched 2 MiB region
/// at the same time (fault-around off: a fault per page, many raced): all
/// writes land, and no vCPU gets an abort for a page another vCPU mapped.
pub fn concurrent_demand_faults_on_one_region() -> Result<(), &'static str> {
    fn touch(i: usize) {
        for page in 0..512u64 {
            let word = (FAULT_REGION + page * PAGE + 8 * i as u64) as *mut u64;
            // SAFETY: guest RAM no other code uses; each vCPU its own word.
            unsafe { word.write_volatile((i as u64) << 32 | page) };
        }
    }
    let aborts = hyp::stat("abort_injected").ok_or("no abort_injected counter")?;
    let faults = hyp::stat("demand_faults").ok_or("no demand_faults counter")?;
    // Earlier tests touched all of RAM: give the region back and forget
    // that, so every page demand-faults again.
    check(
        status(hvc(hyp::HYP_UNMAP, FAULT_REGION, 2 << 20, 0)) == 0,
        "HYP_UNMAP failed",
    )?;
    check(
        status(hvc(hyp::HYP_TEST_FORGET, FAULT_REGION, 2 << 20, 0)) == 0,
        "HYP_TEST_FORGET failed",
    )?;
    check(
        status(hvc(hyp::HYP_TEST_SET_FAULT_AROUND, 0, 0, 0)) == 0,
        "setting fault-around off failed",
    )?;
    let ok = run_on_all(touch);
    hvc(hyp::HYP_TEST_SET_FAULT_AROUND, 2 << 20, 0, 0);
    check(ok, "a vCPU did not finish")?;
    let n = VCPUS.load(Ordering::Relaxed);
    for i in 0..n {
        for page in 0..512u64 {
            let word = (FAULT_REGION + page * PAGE + 8 * i as u64) as *const u64;
            // SAFETY: as in `touch`.
            let v = unsafe { word.read_volatile() };
            check(v == (i as u64) << 32 | page, "a vCPU's write was lost")?;
        }
    }
    let faults = hyp::stat("demand_faults").ok_or("no counter")? - faults;
    println!("  {n} vCPUs, 512 pages: {faults} demand faults");
    check(
        hyp::stat("abort_injected").ok_or("no counter")? == aborts,
        "a vCPU got an abort while another populated the region",
    )?;
    check(faults >= 512, "fewer demand faults than pages")
}

/// What the readers saw (`STALE`: a use of the old translation after the
/// call returned; `AFTER`: accesses after it, so the test is not vacuous).
static STALE: AtomicU64 = AtomicU64::new(0);
static AFTER: AtomicU64 = AtomicU64::new(0);
static BEFORE: AtomicU64 = AtomicU64::new(0);
/// 0: before the change; 1: the change's call returned; 2: stop.
static PHASE: AtomicU64 = AtomicU64::new(0);

const OLD: u64 = 0xa0a0_a0a0_0000_0000;
const NEW: u64 = 0xb0b0_b0b0_0000_0000;

/// Runs `reader` on every secondary while this vCPU makes `change` (one
/// `HYP_MM_BATCH`, one lazy section); then lets them run on for a while
/// and stops them. Returns (stale uses, accesses after, accesses before).
fn change_under_readers(
    change: &[MmOp],
    reader: fn(usize),
) -> Result<(u64, u64, u64), &'static str> {
    STALE.store(0, Ordering::Relaxed);
    AFTER.store(0, Ordering::Relaxed);
    BEFORE.store(0, Ordering::Relaxed);
    PHASE.store(0, Ordering::Release);
    let n = VCPUS.load(Ordering::Relaxed) as u64;
    DONE.store(0, Ordering::Release);
    TASK.store(reader as usize, Ordering::Release);
    EPOCH.fetch_add(1, Ordering::AcqRel);
    // Every reader has used the old translation (so its TLB may hold it).
    check(
        wait_until(10, || BEFORE.load(Ordering::Acquire) >= 1000 * (n - 1)),
        "readers did not start",
    )?;
    let (st, _) = hyp::mm_batch(change);
    PHASE.store(1, Ordering::Release);
    check(st == 0, "the change failed")?;
    wait_until(2, || AFTER.load(Ordering::Acquire) >= 1000 * (n - 1));
    PHASE.store(2, Ordering::Release);
    check(
        wait_until(20, || DONE.load(Ordering::Acquire) == n - 1),
        "a reader did not stop",
    )?;
    Ok((
        STALE.load(Ordering::Acquire),
        AFTER.load(Ordering::Acquire),
        BEFORE.load(Ordering::Acquire),
    ))
}

/// One vCPU re-points a page (`REMAP_ALIAS`) while the others read it in a
/// loop: once the call returned, no vCPU reads the old backing.
pub fn remap_under_concurrent_readers() -> Result<(), &'static str> {
    fn reader(_: usize) {
        loop {
            let phase = PHASE.load(Ordering::Acquire);
            // SAFETY: guest RAM that stays mapped (to one backing or the other).
            let v = unsafe { (CHANGE_AREA as *const u64).read_volatile() };
            match phase {
                0 => {
                    BEFORE.fetch_add(1, Ordering::Relaxed);
                }
                1 => {
                    AFTER.fetch_add(1, Ordering::Relaxed);
                    if v != NEW {
                        STALE.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => return,
            }
        }
    }

    let (x, y) = (CHANGE_AREA, CHANGE_AREA + PAGE);
    // SAFETY: guest RAM no other code uses.
    unsafe {
        (x as *mut u64).write_volatile(OLD);
        (y as *mut u64).write_volatile(NEW);
    }
    let change = [MmOp {
        kind: op::REMAP_ALIAS,
        perm: 0,
        ipa: x,
        size: PAGE,
        src_ipa: y,
    }];
    let (stale, after, before) = change_under_readers(&change, reader)?;
    println!("  remap: {before} reads before, {after} after, {stale} stale");
    check(
        after > 0,
        "no read after the change: the test proves nothing",
    )?;
    check(
        stale == 0,
        "a vCPU read the old backing after the remap returned",
    )
}

/// One vCPU write-protects a page while the others write it in a loop:
/// once the call returned, no vCPU's write lands.
pub fn protect_under_concurrent_writers() -> Result<(), &'static str> {
    fn writer(i: usize) {
        loop {
            let phase = PHASE.load(Ordering::Acquire);
            let landed = probe::write((Z + 8 * i as u64) as usize, phase + 1);
            match phase {
                0 => {
                    BEFORE.fetch_add(1, Ordering::Relaxed);
                }
                1 => {
                    AFTER.fetch_add(1, Ordering::Relaxed);
                    if landed {
                        STALE.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => return,
            }
        }
    }

    const Z: u64 = CHANGE_AREA + 4 * PAGE;
    // SAFETY: guest RAM no other code uses.
    unsafe { (Z as *mut u64).write_volatile(0) };
    let change = [MmOp {
        kind: op::PROTECT,
        perm: 1,
        ipa: Z,
        size: PAGE,
        src_ipa: 0,
    }];
    let (stale, after, before) = change_under_readers(&change, writer)?;
    println!("  protect: {before} writes before, {after} after, {stale} landed");
    check(
        after > 0,
        "no write after the change: the test proves nothing",
    )?;
    check(
        stale == 0,
        "a vCPU wrote a page after it was made read-only",
    )?;
    // And none landed in memory either (phase 1 writes the value 2).
    let n = VCPUS.load(Ordering::Relaxed) as u64;
    for i in 1..n {
        // SAFETY: readable guest RAM.
        let v = unsafe { ((Z + 8 * i) as *const u64).read_volatile() };
        check(v != 2, "a write after the protect reached memory")?;
    }
    Ok(())
}

/// One vCPU unmaps (gives back) a page while the others read it in a loop:
/// once the call returned, every read faults.
pub fn unmap_under_concurrent_readers() -> Result<(), &'static str> {
    fn reader(_: usize) {
        loop {
            let phase = PHASE.load(Ordering::Acquire);
            let v = probe::read(W as usize);
            match phase {
                0 => {
                    BEFORE.fetch_add(1, Ordering::Relaxed);
                }
                1 => {
                    AFTER.fetch_add(1, Ordering::Relaxed);
                    if v.is_some() {
                        STALE.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => return,
            }
        }
    }

    const W: u64 = CHANGE_AREA + 8 * PAGE;
    // SAFETY: guest RAM no other code uses.
    unsafe { (W as *mut u64).write_volatile(OLD) };
    let change = [MmOp {
        kind: op::UNMAP,
        perm: 0,
        ipa: W,
        size: PAGE,
        src_ipa: 0,
    }];
    let (stale, after, before) = change_under_readers(&change, reader)?;
    println!("  unmap: {before} reads before, {after} after, {stale} succeeded");
    check(
        after > 0,
        "no read after the change: the test proves nothing",
    )?;
    check(stale == 0, "a vCPU read a page after it was unmapped")
}

fn mmio_read(addr: usize) -> u32 {
    // SAFETY: a GIC register (trapped and emulated by the hypervisor).
    unsafe { (addr as *const u32).read_volatile() }
}

fn mmio_write(addr: usize, value: u32) {
    // SAFETY: as for `mmio_read`.
    unsafe { (addr as *mut u32).write_volatile(value) }
}

/// SGI the suspend test sends.
const WAKE_SGI: u32 = 3;

/// Makes vCPU `i` (the caller) able to take [`WAKE_SGI`]: its
/// redistributor awake, the SGI group 1 and enabled, its CPU interface's
/// priority mask open and group 1 on. IRQs stay masked.
fn sgi_receiver_up(i: usize) {
    let rd = 0x080a_0000 + i * 0x2_0000;
    let sgi = rd + 0x1_0000;
    // GICR_WAKER.ProcessorSleep off.
    mmio_write(rd + 0x14, mmio_read(rd + 0x14) & !2);
    // GICR_IGROUPR0, GICR_IPRIORITYR (SGI 3: byte 3 of the first word),
    // GICR_ISENABLER0.
    mmio_write(sgi + 0x80, mmio_read(sgi + 0x80) | 1 << WAKE_SGI);
    let prio = mmio_read(sgi + 0x400) & !(0xff << 24) | 0xa0 << 24;
    mmio_write(sgi + 0x400, prio);
    mmio_write(sgi + 0x100, 1 << WAKE_SGI);
    // SAFETY: the vCPU's own (virtual) CPU interface registers.
    unsafe {
        asm!(
            "msr icc_pmr_el1, {0}",
            "msr icc_igrpen1_el1, {1}",
            "isb",
            in(reg) 0xffu64, in(reg) 1u64, options(nostack)
        );
    }
}

/// A vCPU in PSCI `CPU_SUSPEND` stays suspended while nothing is pending
/// for it and wakes for an SGI another vCPU sends it.
pub fn suspend_wakes_on_an_sgi() -> Result<(), &'static str> {
    static WOKE: AtomicU64 = AtomicU64::new(0);
    static READY: AtomicU64 = AtomicU64::new(0);
    fn sleeper(i: usize) {
        if i != 1 {
            return;
        }
        sgi_receiver_up(1);
        READY.store(1, Ordering::Release);
        // Standby; returns once an interrupt is pending for this vCPU
        // (IRQs are masked here, so it stays pending).
        let r = hvc(CPU_SUSPEND, 0, 0, 0);
        WOKE.store(if r[0] == 0 { 1 } else { 2 }, Ordering::Release);
        // Acknowledge and end it, so nothing stays pending.
        let intid: u64;
        // SAFETY: the vCPU's own CPU interface.
        unsafe {
            asm!("mrs {0}, icc_iar1_el1", out(reg) intid, options(nostack));
            asm!("msr icc_eoir1_el1, {0}", "isb", in(reg) intid, options(nostack));
        }
        if intid != u64::from(WAKE_SGI) {
            WOKE.store(3, Ordering::Release);
        }
    }
    WOKE.store(0, Ordering::Release);
    READY.store(0, Ordering::Release);
    // Group 1 on in the (shared) distributor: GICD_CTLR.EnableGrp1NS.
    let ctlr = mmio_read(0x0800_0000);
    mmio_write(0x0800_0000, ctlr | 2);
    let n = VCPUS.load(Ordering::Relaxed) as u64;
    DONE.store(0, Ordering::Release);
    TASK.store(sleeper as fn(usize) as usize, Ordering::Release);
    EPOCH.fetch_add(1, Ordering::AcqRel);
    check(
        wait_until(10, || READY.load(Ordering::Acquire) == 1),
        "vCPU 1 did not get ready",
    )?;
    // Give vCPU 1 time to suspend: it must not wake by itself.
    wait_until(1, || false);
    check(
        WOKE.load(Ordering::Acquire) == 0,
        "CPU_SUSPEND returned with nothing pending",
    )?;
    // ICC_SGI1R_EL1: INTID [27:24], target list bit 1 (Aff0 = 1).
    // SAFETY: a barrier and a (trapped) SGI register write.
    unsafe {
        asm!(
            "dsb ishst",
            "msr icc_sgi1r_el1, {0}",
            "isb",
            in(reg) u64::from(WAKE_SGI) << 24 | 0b10,
            options(nostack)
        );
    }
    check(
        wait_until(10, || WOKE.load(Ordering::Acquire) != 0),
        "the suspended vCPU did not wake for the SGI",
    )?;
    let woke = WOKE.load(Ordering::Acquire);
    mmio_write(0x0800_0000, ctlr);
    check(woke != 2, "CPU_SUSPEND did not return SUCCESS")?;
    check(
        woke == 1,
        "vCPU 1 acknowledged something other than the SGI",
    )?;
    check(
        wait_until(10, || DONE.load(Ordering::Acquire) == n - 1),
        "a vCPU did not finish",
    )
}

/// A region of guest RAM no other test uses, for the isolation test.
const OWN_REGION: u64 = 0x4f00_0000;

/// This VM's memory is its own: the VM writes its number into every page of
/// a region, waits while any other VM (running the same suite at the same
/// time, at the same IPAs) does the same, and reads back only its own
/// number. A backing shared with another VM, or a translation of another
/// VM's (a VMID mix-up), would show the other VM's number.
pub fn vm_memory_is_its_own() -> Result<(), &'static str> {
    let r = hvc(hyp::HYP_VM_INFO, 0, 0, 0);
    check(r[0] == 0, "HYP_VM_INFO failed")?;
    let vm = r[1];
    check((1..=4).contains(&vm), "HYP_VM_INFO: VM number out of range")?;
    let tag = |page: u64| vm << 48 | page;
    for round in 0..2u64 {
        for page in 0..512u64 {
            let word = (OWN_REGION + page * PAGE) as *mut u64;
            // SAFETY: guest RAM no other test uses.
            unsafe { word.write_volatile(tag(page) | round << 40) };
        }
        // Let another VM write its own at the same IPAs meanwhile.
        wait_until(1, || false);
        for page in 0..512u64 {
            let word = (OWN_REGION + page * PAGE) as *const u64;
            // SAFETY: as above.
            let v = unsafe { word.read_volatile() };
            if v >> 48 != vm {
                return Err("a page holds another VM's number");
            }
            check(v == tag(page) | round << 40, "a page lost this VM's write")?;
        }
    }
    println!("  vm{vm}: 2 rounds over 512 pages, every word this VM's own");
    Ok(())
}

/// A named test.
type Test = (&'static str, fn() -> Result<(), &'static str>);

/// The SMP tests, in order (the first starts the secondaries).
pub const TESTS: &[Test] = &[
    ("smp_vcpus_come_up_through_psci", vcpus_come_up_through_psci),
    (
        "smp_concurrent_demand_faults_on_one_region",
        concurrent_demand_faults_on_one_region,
    ),
    (
        "smp_remap_under_concurrent_readers",
        remap_under_concurrent_readers,
    ),
    (
        "smp_protect_under_concurrent_writers",
        protect_under_concurrent_writers,
    ),
    (
        "smp_unmap_under_concurrent_readers",
        unmap_under_concurrent_readers,
    ),
    ("smp_suspend_wakes_on_an_sgi", suspend_wakes_on_an_sgi),
];
