//! Physical CPUs: the dense CPU index, secondary bring-up through PSCI
//! `CPU_ON` to QEMU's firmware, per-CPU stacks, and kicks between CPUs.
//!
//! **Boot protocol.** QEMU's `virt` machine with `virtualization=on` and an
//! ELF `-kernel` starts only the first CPU, at the ELF entry, at EL2; the
//! others are held powered off. QEMU implements PSCI itself (conduit SMC,
//! as its device tree says): `CPU_ON(target MPIDR, entry PA, context id)`
//! from EL2 starts the target at `entry`, at EL2 (the highest non-secure
//! EL, as PSCI requires), AArch64, MMU and caches off, with `x0` = the
//! context id. This module passes the target's dense index as the context.
//!
//! **Dense index.** The device tree's `/cpus` nodes give every CPU's MPIDR
//! affinity; the boot CPU is index 0 and the others follow in tree order.
//! Each CPU keeps its index in `TPIDR_EL2` (nothing else uses it), read by
//! [`this_cpu`], by the mm core's per-CPU lazy state
//! ([`crate::mm::arch::MmArch::cpu_id`]) and by the EL2 exception vectors
//! to find the CPU's emergency stack. Indices come from the full affinity
//! (Aff3..Aff0), not Aff0 alone.
//!
//! **A secondary's first instructions** run with the MMU off, so every
//! load is a non-cacheable access to memory: the values it needs (the EL2
//! map's `TTBR0_EL2`, `TCR_EL2`, `MAIR_EL2`, `SCTLR_EL2`, its stack) are
//! written by the boot CPU with its caches on and then cleaned to the point
//! of coherency ([`SecondaryBoot`]) before `CPU_ON`, so the secondary reads
//! them from memory and not a stale copy.

use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

use spin::Once;

use super::sysreg::{read_sysreg, write_sysreg};

/// Most physical CPUs the hypervisor brings up (QEMU `-smp` up to 8).
pub const MAX_PCPUS: usize = 8;

const _: () = assert!(MAX_PCPUS <= crate::mm::lazy::MAX_CPUS);

/// Pages of each secondary CPU's EL2 stack; its lowest page is left out of
/// the EL2 map as a guard (see [`super::el2map::build`]).
pub const SECONDARY_STACK_PAGES: usize = 24;

/// The secondaries' EL2 stacks, one per index 1.. (the boot CPU runs on
/// aarch64-rt's boot stack).
#[unsafe(link_section = ".stack.secondary")]
#[unsafe(no_mangle)]
static mut SECONDARY_STACKS: [aarch64_rt::Stack<SECONDARY_STACK_PAGES>; MAX_PCPUS - 1] =
    [const { aarch64_rt::Stack::new() }; MAX_PCPUS - 1];

/// The secondaries' stacks as address ranges, index 1.. at `[i - 1]`.
#[must_use]
pub fn secondary_stacks() -> [core::ops::Range<usize>; MAX_PCPUS - 1] {
    let base = (&raw const SECONDARY_STACKS) as usize;
    let size = SECONDARY_STACK_PAGES * crate::mm::PAGE_SIZE;
    core::array::from_fn(|i| base + i * size..base + (i + 1) * size)
}

/// The MPIDR affinity (Aff3..Aff0, MPIDR layout) of each CPU, by dense
/// index; the boot CPU first.
static CPUS: Once<CpuTable> = Once::new();

/// The CPUs by dense index (a fixed array: the table is made before the
/// heap exists).
struct CpuTable {
    mpidr: [u64; MAX_PCPUS],
    count: usize,
}

/// Mask of the affinity fields in `MPIDR_EL1`.
pub const MPIDR_AFFINITY: u64 = 0xff_00ff_ffff;

/// This CPU's MPIDR affinity.
#[must_use]
pub fn my_mpidr() -> u64 {
    read_sysreg!("mpidr_el1") & MPIDR_AFFINITY
}

/// The index of the executing CPU (`TPIDR_EL2`).
#[must_use]
pub fn this_cpu() -> usize {
    read_sysreg!("tpidr_el2") as usize
}

/// How many CPUs there are (1 before [`init_cpu_table`]).
#[must_use]
pub fn cpu_count() -> usize {
    CPUS.get().map_or(1, |t| t.count)
}

/// CPU `cpu`'s MPIDR affinity.
#[must_use]
pub fn mpidr_of(cpu: usize) -> Option<u64> {
    CPUS.get()
        .and_then(|t| t.mpidr[..t.count].get(cpu).copied())
}

/// Numbers the CPUs from the device tree's `/cpus` (the boot CPU 0) and
/// sets the boot CPU's `TPIDR_EL2`. Returns the count; CPUs beyond
/// [`MAX_PCPUS`] are left off (reported by the caller).
pub fn init_cpu_table(fdt: &fdt::Fdt<'_>) -> (usize, usize) {
    let me = my_mpidr();
    let mut table = CpuTable {
        mpidr: [0; MAX_PCPUS],
        count: 1,
    };
    table.mpidr[0] = me;
    let mut found = 0;
    for id in fdt.cpus().map(|c| c.ids().first() as u64 & MPIDR_AFFINITY) {
        found += 1;
        if id != me && table.count < MAX_PCPUS {
            table.mpidr[table.count] = id;
            table.count += 1;
        }
    }
    let n = table.count;
    CPUS.call_once(|| table);
    write_sysreg!("tpidr_el2", 0);
    (n, found)
}

/// What a secondary reads, MMU off, before it can use anything else: the
/// EL2 map's translation registers and its stack. Written by the boot CPU,
/// cleaned to the point of coherency, never written again.
#[repr(C, align(64))]
struct SecondaryBoot {
    mair: u64,
    tcr: u64,
    ttbr0: u64,
    sctlr: u64,
    /// Top of each CPU's stack, by index (0 unused).
    stack_top: [u64; MAX_PCPUS],
}

struct BootCell(UnsafeCell<SecondaryBoot>);
// SAFETY: written once by the boot CPU before any secondary exists (in
// `start_secondaries`), read-only afterwards.
unsafe impl Sync for BootCell {}

#[unsafe(no_mangle)]
static LAZYHYP_SECONDARY_BOOT: BootCell = BootCell(UnsafeCell::new(SecondaryBoot {
    mair: 0,
    tcr: 0,
    ttbr0: 0,
    sctlr: 0,
    stack_top: [0; MAX_PCPUS],
}));

/// Secondaries that reached Rust (bit i = CPU i).
static ONLINE: AtomicU32 = AtomicU32::new(1);

global_asm!(
    r#"
.section .text.lazyhyp_secondary, "ax"
.balign 4
.global lazyhyp_secondary_entry
/*
 * A secondary CPU's first instruction (PSCI CPU_ON from the boot CPU):
 * EL2, MMU and caches off, x0 = its dense index.
 */
lazyhyp_secondary_entry:
    msr tpidr_el2, x0
    adrp x1, LAZYHYP_SECONDARY_BOOT
    add x1, x1, :lo12:LAZYHYP_SECONDARY_BOOT
    ldr x2, [x1, #0]
    msr mair_el2, x2
    ldr x2, [x1, #8]
    msr tcr_el2, x2
    ldr x2, [x1, #16]
    msr ttbr0_el2, x2
    isb
    /*
     * Nothing this CPU's TLB or instruction cache holds from before may be
     * used (their contents after reset are not architecturally known):
     * local invalidation, completed (dsb nsh) before the MMU goes on.
     */
    tlbi alle2
    ic iallu
    dsb nsh
    isb
    ldr x2, [x1, #24]
    msr sctlr_el2, x2
    isb
    add x3, x1, #32
    ldr x2, [x3, x0, lsl #3]
    mov sp, x2
    bl {rust_entry}
    b .
"#,
    rust_entry = sym secondary_rust_entry,
);

unsafe extern "C" {
    fn lazyhyp_secondary_entry();
}

/// The secondary's Rust entry, on its own stack with the EL2 map on.
extern "C" fn secondary_rust_entry(index: u64) -> ! {
    super::vectors::install();
    ONLINE.fetch_or(1 << index, Ordering::Release);
    super::secondary_main(index as usize)
}

/// Starts every other CPU of the table through PSCI `CPU_ON`, each at
/// [`lazyhyp_secondary_entry`] with its index, and waits (bounded) until
/// each is running Rust code. Returns the CPUs that came up.
///
/// # Panics
///
/// Never: every index below the count has an MPIDR.
pub fn start_secondaries() -> u32 {
    let n = cpu_count();
    if n == 1 {
        return 1;
    }
    let stacks = secondary_stacks();
    // SAFETY: no secondary runs yet; this is the only writer, once.
    let boot = unsafe { &mut *LAZYHYP_SECONDARY_BOOT.0.get() };
    boot.mair = read_sysreg!("mair_el2");
    boot.tcr = read_sysreg!("tcr_el2");
    boot.ttbr0 = read_sysreg!("ttbr0_el2");
    boot.sctlr = read_sysreg!("sctlr_el2");
    for i in 1..n {
        boot.stack_top[i] = stacks[i - 1].end as u64;
    }
    // To the point of coherency: the secondaries read it with the MMU (and
    // so the caches) off.
    clean_to_poc(
        (&raw const LAZYHYP_SECONDARY_BOOT) as usize,
        size_of::<SecondaryBoot>(),
    );
    let entry = lazyhyp_secondary_entry as *const () as u64;
    for i in 1..n {
        let mpidr = mpidr_of(i).expect("index below the count");
        if let Err(e) = smccc::psci::cpu_on::<smccc::Smc>(mpidr, entry, i as u64) {
            log::warn!("CPU {i} (MPIDR {mpidr:#x}): PSCI CPU_ON failed: {e:?}");
        }
    }
    let all = (1u32 << n) - 1;
    // Bounded: about a second of the counter.
    let freq = read_sysreg!("cntfrq_el0");
    let start = read_sysreg!("cntpct_el0");
    while ONLINE.load(Ordering::Acquire) != all
        && read_sysreg!("cntpct_el0").wrapping_sub(start) < freq
    {
        core::hint::spin_loop();
    }
    ONLINE.load(Ordering::Acquire)
}

/// Cleans `[addr, addr + len)` to the point of coherency.
fn clean_to_poc(addr: usize, len: usize) {
    let line = super::cache::dcache_line();
    let mut a = addr & !(line - 1);
    while a < addr + len {
        // SAFETY: cleaning by VA only writes dirty data back; the range is
        // a static mapped in the EL2 map.
        unsafe { core::arch::asm!("dc cvac, {0}", in(reg) a, options(nostack, preserves_flags)) };
        a += line;
    }
    // SAFETY: a barrier: the cleans complete before the CPU_ON SMC that
    // lets another CPU read the memory.
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// The physical SGI that kicks a CPU out of its guest (or its idle wait):
/// the receiver only needs to exit; what it must do next is in memory.
pub const KICK_SGI: u32 = 8;

/// Kicks CPU `cpu` with [`KICK_SGI`] (no-op for the executing CPU or an
/// unknown index).
pub fn kick(cpu: usize) {
    if cpu == this_cpu() {
        return;
    }
    let Some(mpidr) = mpidr_of(cpu) else { return };
    // ICC_SGI1R_EL1: Aff3 [55:48], Aff2 [39:32], INTID [27:24], Aff1
    // [23:16], target list [15:0] (one bit per Aff0 value below 16).
    let aff0 = mpidr & 0xff;
    if aff0 >= 16 {
        log::warn!("cannot kick CPU {cpu}: Aff0 {aff0} beyond the target list");
        return;
    }
    let aff1 = (mpidr >> 8) & 0xff;
    let aff2 = (mpidr >> 16) & 0xff;
    let aff3 = (mpidr >> 32) & 0xff;
    let value =
        (aff3 << 48) | (aff2 << 32) | (u64::from(KICK_SGI) << 24) | (aff1 << 16) | (1 << aff0);
    // SAFETY: barriers and a GIC system register write; the DSB orders the
    // sender's memory writes (the request the kick announces) before the
    // SGI, so the receiver, once interrupted, sees them (as Linux's
    // gic_ipi_send_mask: "ensure stores to Normal memory are visible to
    // other CPUs before issuing the IPI").
    unsafe {
        core::arch::asm!("dsb ishst", options(nostack, preserves_flags));
    }
    write_sysreg!("icc_sgi1r_el1", value);
    // SAFETY: a context synchronization barrier (the SGI is sent).
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}

/// Waits for an interrupt (`WFI`). Interrupts stay masked at EL2: a
/// pending one ends the wait and is then acknowledged by the caller.
pub fn wait_for_interrupt() {
    // SAFETY: waits; changes no state Rust sees.
    unsafe { core::arch::asm!("dsb sy", "wfi", options(nostack, preserves_flags)) };
}
