//! Calls to the hypervisor (SMCCC over HVC or SMC).

use core::arch::asm;

/// SMCCC_VERSION.
pub const SMCCC_VERSION: u32 = 0x8000_0000;
/// PSCI_VERSION.
pub const PSCI_VERSION: u32 = 0x8400_0000;
/// PSCI_FEATURES.
pub const PSCI_FEATURES: u32 = 0x8400_000a;
/// PSCI CPU_ON (SMC64).
pub const PSCI_CPU_ON_64: u32 = 0xc400_0003;
/// PSCI SYSTEM_OFF.
pub const PSCI_SYSTEM_OFF: u32 = 0x8400_0008;
/// lazyhyp: ABI version.
pub const HYP_VERSION: u32 = 0xc600_0000;
/// lazyhyp: report test results (x1 passed, x2 failed).
pub const HYP_REPORT_RESULT: u32 = 0xc600_0001;
/// SMCCC `NOT_SUPPORTED`.
pub const NOT_SUPPORTED: u64 = u64::MAX;

/// An SMCCC call through `HVC #0` with up to three arguments; returns x0..x3.
pub fn hvc(function: u32, a1: u64, a2: u64, a3: u64) -> [u64; 4] {
    let mut r = [u64::from(function), a1, a2, a3];
    // SAFETY: an SMCCC call to lazyhyp; x4..x17 are preserved by SMCCC 1.1,
    // but are still declared clobbered so nothing here relies on it (the
    // register-preservation test checks it separately).
    unsafe {
        asm!(
            "hvc #0",
            inout("x0") r[0], inout("x1") r[1], inout("x2") r[2], inout("x3") r[3],
            out("x4") _, out("x5") _, out("x6") _, out("x7") _,
            out("x8") _, out("x9") _, out("x10") _, out("x11") _,
            out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack),
        );
    }
    r
}

/// An SMCCC call through `SMC #0` (trapped by lazyhyp); returns x0..x3.
pub fn smc(function: u32, a1: u64, a2: u64, a3: u64) -> [u64; 4] {
    let mut r = [u64::from(function), a1, a2, a3];
    // SAFETY: as for `hvc`.
    unsafe {
        asm!(
            "smc #0",
            inout("x0") r[0], inout("x1") r[1], inout("x2") r[2], inout("x3") r[3],
            out("x4") _, out("x5") _, out("x6") _, out("x7") _,
            out("x8") _, out("x9") _, out("x10") _, out("x11") _,
            out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack),
        );
    }
    r
}

/// Reports the results and powers off. Never returns.
pub fn report_and_power_off(passed: u64, failed: u64) -> ! {
    hvc(HYP_REPORT_RESULT, passed, failed, 0);
    smc(PSCI_SYSTEM_OFF, 0, 0, 0);
    // SYSTEM_OFF does not return; if it did, stop here.
    loop {
        // SAFETY: waits for an interrupt; nothing else is left to do.
        unsafe { asm!("wfi", options(nomem, nostack, preserves_flags)) };
    }
}

/// lazyhyp: run a batch of stage-2 operations in one lazy section.
pub const HYP_MM_BATCH: u32 = 0xc600_0010;
/// lazyhyp (test builds): select the nesting policy.
pub const HYP_TEST_SET_POLICY: u32 = 0xc600_0f00;
/// lazyhyp (test builds): probe a freed table page.
pub const HYP_TEST_FREED_PAGE_PROBE: u32 = 0xc600_0f01;

/// Operation kinds of `HYP_MM_BATCH`.
pub mod op {
    /// Map the unmapped parts of the range to its own backing.
    pub const POPULATE: u32 = 1;
    /// Unmap.
    pub const UNMAP: u32 = 2;
    /// Set permissions.
    pub const PROTECT: u32 = 3;
    /// Alias another guest RAM range's backing.
    pub const REMAP_ALIAS: u32 = 4;
    /// Merge uniform 2 MiB regions into blocks.
    pub const MERGE: u32 = 5;
}

/// One `HYP_MM_BATCH` operation, laid out as the hypervisor reads it.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default)]
pub struct MmOp {
    /// One of [`op`].
    pub kind: u32,
    /// Permission bits for `PROTECT`: 1 read, 2 write, 4 execute.
    pub perm: u32,
    /// First IPA.
    pub ipa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Source IPA for `REMAP_ALIAS`.
    pub src_ipa: u64,
}

/// Runs `ops` in one lazy section; returns (status, index of the op an
/// error is about).
pub fn mm_batch(ops: &[MmOp]) -> (i64, u64) {
    // The list is read by the hypervisor through stage 2 at its IPA, which
    // is its address here (the boot map is the identity). Make the stores
    // visible to it first (it reads through its own cacheable map, so a
    // barrier suffices).
    // SAFETY: a barrier.
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
    let r = hvc(HYP_MM_BATCH, ops.as_ptr() as u64, ops.len() as u64, 0);
    // SMCCC status codes are signed: reinterpret the register's bits.
    (i64::from_ne_bytes(r[0].to_ne_bytes()), r[1])
}

/// lazyhyp: the calling VM's number (`x1`) and vCPU index (`x2`).
pub const HYP_VM_INFO: u32 = 0xc600_0003;

/// lazyhyp: copy the counters into a guest buffer.
pub const HYP_STATS: u32 = 0xc600_0002;
/// lazyhyp: populate a range.
pub const HYP_MAP: u32 = 0xc600_0011;
/// lazyhyp: give a range back.
pub const HYP_UNMAP: u32 = 0xc600_0012;
/// lazyhyp: set a range's permissions.
pub const HYP_PROTECT: u32 = 0xc600_0013;
/// lazyhyp (test builds): set the fault-around window.
pub const HYP_TEST_SET_FAULT_AROUND: u32 = 0xc600_0f02;
/// SMCCC_ARCH_FEATURES.
pub const SMCCC_ARCH_FEATURES: u32 = 0x8000_0001;

/// The counters `HYP_STATS` writes, in order (docs/hypercalls.md; a host
/// test checks this list against the document).
pub const COUNTERS: &[&str] = &[
    "mappings",
    "pages_mapped",
    "blocks_mapped",
    "pte_writes",
    "sections",
    "nests",
    "nest_warnings",
    "flattenings",
    "bbm",
    "splits",
    "merges",
    "dsb_ishst",
    "dsb_ish",
    "isb",
    "tlbi_ipas2e1is",
    "tlbi_ripas2e1is",
    "tlbi_vmalle1is",
    "tlbi_vmalls12e1is",
    "tlbi_vae2is",
    "tlbi_alle2is",
    "tlbi_pages",
    "pool_allocs",
    "pool_frees",
    "guard_maps",
    "guard_unmaps",
    "reserve_topped",
    "reserve_allocs",
    "demand_faults",
    "demand_pages",
    "exits_hvc",
    "exits_smc",
    "exits_dabt",
    "exits_iabt",
    "exits_sysreg",
    "exits_irq",
    "exits_other",
    "mmio_emulated",
    "sysreg_emulated",
    "setway_flushes",
    "undef_injected",
    "abort_injected",
    "heap_peak_bytes",
    "serrors",
    "irqs_taken",
    "cmo_lines",
    "icache_invalidations",
    "stale_faults",
    "vm_lock_uncontended",
    "vm_lock_contended",
    "vgic_entries_skipped",
];

/// Reads one counter through `HYP_STATS`.
pub fn stat(name: &str) -> Option<u64> {
    #[repr(C, align(8))]
    struct Buf([u64; 64]);
    static BUF: spin::mutex::SpinMutex<Buf> = spin::mutex::SpinMutex::new(Buf([0; 64]));
    let index = COUNTERS.iter().position(|c| *c == name)?;
    let mut buf = BUF.lock();
    let r = hvc(HYP_STATS, buf.0.as_mut_ptr() as u64, 64 * 8, 0);
    // SAFETY: a barrier: the hypervisor's writes (through its own map) are
    // complete before we read.
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
    (r[0] == 0 && (index as u64) < r[1]).then(|| {
        // SAFETY: the buffer is ours; read it as memory another agent wrote.
        unsafe { core::ptr::read_volatile(&raw const buf.0[index]) }
    })
}

/// lazyhyp (test builds): run a benchmark workload on a scratch stage 2.
pub const HYP_TEST_RUN_WORKLOAD: u32 = 0xc600_0f03;
/// lazyhyp (test builds): start or stop a guest-driven benchmark phase.
pub const HYP_TEST_BENCH_MARK: u32 = 0xc600_0f04;
/// lazyhyp (test builds): forget that a range was given back.
pub const HYP_TEST_FORGET: u32 = 0xc600_0f05;
