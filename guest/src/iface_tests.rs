//! Tests of the guest interface: every memory call with valid arguments,
//! checked by touching memory (read, write, execute); demand faults and
//! fault-around; and malformed calls, each answered with its documented
//! error while the hypervisor keeps running.

use core::arch::asm;

use crate::console::println;
use crate::hyp::{self, MmOp, hvc, op, smc};
use crate::probe;

type TestResult = Result<(), &'static str>;

fn check(cond: bool, reason: &'static str) -> TestResult {
    if cond { Ok(()) } else { Err(reason) }
}

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// A 2 MiB area for the map/unmap/protect tests.
const AREA_C: u64 = 0x4700_0000;
/// Two 64 MiB areas never touched before the demand-fault test.
const AREA_D1: u64 = 0x4800_0000;
const AREA_D2: u64 = 0x4c00_0000;
/// End of guest RAM (256 MiB from 0x4000_0000).
const RAM_END: u64 = 0x5000_0000;

/// SMCCC status codes (docs/hypercalls.md).
const NOT_SUPPORTED: i64 = -1;
const INVALID_PARAMETER: i64 = -2;
const DENIED: i64 = -3;
const NOT_MAPPED: i64 = -5;

fn status(r: [u64; 4]) -> i64 {
    i64::from_ne_bytes(r[0].to_ne_bytes())
}

fn call(f: u32, a1: u64, a2: u64, a3: u64) -> i64 {
    status(hvc(f, a1, a2, a3))
}

/// `ret`.
const RET: u32 = 0xd65f_03c0;

/// Writes a lone `ret` at `addr` and makes it visible to instruction fetch.
fn plant_ret(addr: u64) {
    // SAFETY: `addr` is a mapped, writable page of guest RAM this test owns;
    // the cache maintenance makes the store visible to instruction fetch.
    unsafe {
        core::ptr::write_volatile(addr as *mut u32, RET);
        asm!(
            "dc cvau, {a}",
            "dsb ish",
            "ic ivau, {a}",
            "dsb ish",
            "isb",
            a = in(reg) addr,
            options(nostack, preserves_flags),
        );
    }
}

/// HYP_MAP, HYP_UNMAP and HYP_PROTECT, each checked by touching memory.
pub fn map_unmap_protect_by_touch() -> TestResult {
    check(
        call(hyp::HYP_MAP, AREA_C, 2 * MIB, 0) == 0,
        "HYP_MAP failed",
    )?;
    for p in (AREA_C..AREA_C + 2 * MIB).step_by(PAGE as usize) {
        check(probe::write(p as usize, p), "a mapped page refused a write")?;
    }
    let (gone, ro, code) = (AREA_C + PAGE, AREA_C + 2 * PAGE, AREA_C + 3 * PAGE);
    plant_ret(code);
    check(
        probe::exec(code as usize),
        "code in a mapped RWX page did not run",
    )?;
    // Touch again so the translations are cached, then change them.
    check(
        probe::read(gone as usize) == Some(gone),
        "read before unmap",
    )?;
    check(probe::write(ro as usize, ro), "write before protect")?;
    check(call(hyp::HYP_UNMAP, gone, PAGE, 0) == 0, "HYP_UNMAP failed")?;
    check(
        call(hyp::HYP_PROTECT, ro, PAGE, 0b001) == 0,
        "HYP_PROTECT RO failed",
    )?;
    check(
        call(hyp::HYP_PROTECT, code, PAGE, 0b011) == 0,
        "HYP_PROTECT RW (XN) failed",
    )?;
    check(
        probe::read(gone as usize).is_none(),
        "a given-back page is still readable",
    )?;
    check(
        probe::read(ro as usize) == Some(ro),
        "a read-only page lost its contents",
    )?;
    check(
        !probe::write(ro as usize, 0),
        "a read-only page took a write",
    )?;
    check(
        !probe::exec(code as usize),
        "an execute-never page ran code",
    )?;
    let esr = probe::LAST_ESR.load(core::sync::atomic::Ordering::Relaxed);
    check(
        esr >> 26 == 0x21 && esr & 0x3f == 0x10,
        "instruction fetch fault was not an injected SEA",
    )?;
    check(
        probe::read(code as usize).is_some(),
        "an execute-never page is still readable",
    )?;
    // Back to normal.
    check(
        call(hyp::HYP_MAP, gone, PAGE, 0) == 0,
        "HYP_MAP of the given-back page failed",
    )?;
    check(
        call(hyp::HYP_PROTECT, AREA_C, 2 * MIB, 0b111) == 0,
        "HYP_PROTECT RWX failed",
    )?;
    check(
        probe::read(gone as usize) == Some(gone),
        "a repopulated page lost its contents",
    )?;
    check(
        probe::write(ro as usize, ro),
        "a page made writable again refused a write",
    )?;
    check(
        probe::exec(code as usize),
        "a page made executable again did not run",
    )
}

/// The first touch of 64 MiB takes at most 32 stage-2 faults with 2 MiB
/// fault-around, and one per page (16384) with fault-around off, in the
/// same run, counted by the hypervisor's own counter.
pub fn demand_faults_and_fault_around() -> TestResult {
    let faults = || hyp::stat("demand_faults").ok_or("HYP_STATS has no demand_faults");
    let touch = |area: u64| {
        for p in (area..area + 64 * MIB).step_by(PAGE as usize) {
            // SAFETY: guest RAM this test owns; the first touch faults and
            // the hypervisor populates it before the load retries.
            unsafe { core::ptr::read_volatile(p as *const u64) };
        }
    };
    let before = faults()?;
    touch(AREA_D1);
    let with_fa = faults()? - before;
    check(
        call(hyp::HYP_TEST_SET_FAULT_AROUND, 0, 0, 0) == 0,
        "could not turn fault-around off",
    )?;
    let before = faults()?;
    touch(AREA_D2);
    let without = faults()? - before;
    check(
        call(hyp::HYP_TEST_SET_FAULT_AROUND, 2 * MIB, 0, 0) == 0,
        "could not restore fault-around",
    )?;
    println!(
        "  first touch of 64 MiB: {with_fa} faults with 2 MiB fault-around, {without} without"
    );
    check(with_fa <= 32, "more than 32 faults with 2 MiB fault-around")?;
    check(
        without == 16384,
        "fault-around off did not take one fault per page",
    )?;
    // The 2 MiB windows were mapped as blocks, the single pages were not
    // merged: the page count is what was touched.
    check(
        hyp::stat("demand_pages").is_some_and(|p| p >= 2 * 16384),
        "demand_pages too low",
    )
}

/// SMCCC_ARCH_FEATURES and the calls a guest probes first.
pub fn smccc_arch_features() -> TestResult {
    check(
        call(
            hyp::SMCCC_ARCH_FEATURES,
            u64::from(hyp::SMCCC_VERSION),
            0,
            0,
        ) == 0,
        "ARCH_FEATURES(VERSION)",
    )?;
    check(
        call(hyp::SMCCC_ARCH_FEATURES, 0x8000_8000, 0, 0) == NOT_SUPPORTED,
        "ARCH_FEATURES(workaround)",
    )?;
    check(
        call(hyp::PSCI_FEATURES, u64::from(hyp::SMCCC_VERSION), 0, 0) == 0,
        "PSCI_FEATURES(SMCCC_VERSION)",
    )
}

/// Malformed calls: each gets its documented error, nothing changes, the
/// hypervisor keeps running.
#[allow(
    clippy::too_many_lines,
    reason = "a table of malformed calls, a few lines each"
)]
pub fn malformed_calls_are_refused() -> TestResult {
    static mut LIST: [MmOp; 65] = [MmOp {
        kind: 0,
        perm: 0,
        ipa: 0,
        size: 0,
        src_ipa: 0,
    }; 65];
    let list = &raw mut LIST;
    let list_ipa = list as u64;
    let set_op = |i: usize, o: MmOp| {
        // SAFETY: this test is the list's only user; the hypervisor reads it
        // only during the calls below.
        unsafe { (*list)[i] = o };
    };
    let unmap_one = MmOp {
        kind: op::UNMAP,
        perm: 0,
        ipa: AREA_C + 8 * PAGE,
        size: PAGE,
        src_ipa: 0,
    };
    set_op(0, unmap_one);
    // A page given back, and one made read-only, for the NOT_MAPPED cases.
    let (given_back, read_only) = (AREA_C + 10 * PAGE, AREA_C + 11 * PAGE);
    check(
        call(hyp::HYP_UNMAP, given_back, PAGE, 0) == 0,
        "setup: unmap",
    )?;
    check(
        call(hyp::HYP_PROTECT, read_only, PAGE, 1) == 0,
        "setup: protect",
    )?;
    let max = u64::MAX;
    let cases: &[(&str, u32, u64, u64, u64, i64)] = &[
        (
            "MAP unaligned IPA",
            hyp::HYP_MAP,
            AREA_C + 1,
            PAGE,
            0,
            INVALID_PARAMETER,
        ),
        (
            "MAP zero size",
            hyp::HYP_MAP,
            AREA_C,
            0,
            0,
            INVALID_PARAMETER,
        ),
        (
            "MAP unaligned size",
            hyp::HYP_MAP,
            AREA_C,
            PAGE + 8,
            0,
            INVALID_PARAMETER,
        ),
        (
            "MAP overflowing",
            hyp::HYP_MAP,
            max - 0xfff,
            2 * PAGE,
            0,
            INVALID_PARAMETER,
        ),
        ("MAP below RAM", hyp::HYP_MAP, 0x3fff_f000, PAGE, 0, DENIED),
        ("MAP at RAM end", hyp::HYP_MAP, RAM_END, PAGE, 0, DENIED),
        (
            "MAP across RAM end",
            hyp::HYP_MAP,
            RAM_END - PAGE,
            2 * PAGE,
            0,
            DENIED,
        ),
        (
            "MAP device (PL011)",
            hyp::HYP_MAP,
            0x0900_0000,
            PAGE,
            0,
            DENIED,
        ),
        (
            "MAP GIC distributor",
            hyp::HYP_MAP,
            0x0800_0000,
            0x1_0000,
            0,
            DENIED,
        ),
        (
            "MAP beyond IPA space",
            hyp::HYP_MAP,
            1 << 40,
            PAGE,
            0,
            DENIED,
        ),
        ("MAP huge size", hyp::HYP_MAP, AREA_C, 1 << 62, 0, DENIED),
        (
            "UNMAP unaligned",
            hyp::HYP_UNMAP,
            AREA_C + 0x800,
            PAGE,
            0,
            INVALID_PARAMETER,
        ),
        (
            "UNMAP zero",
            hyp::HYP_UNMAP,
            AREA_C,
            0,
            0,
            INVALID_PARAMETER,
        ),
        ("UNMAP outside", hyp::HYP_UNMAP, 0x1000, PAGE, 0, DENIED),
        (
            "PROTECT bad bits",
            hyp::HYP_PROTECT,
            AREA_C,
            PAGE,
            0b1001,
            INVALID_PARAMETER,
        ),
        (
            "PROTECT without read",
            hyp::HYP_PROTECT,
            AREA_C,
            PAGE,
            0b010,
            INVALID_PARAMETER,
        ),
        (
            "PROTECT perm > u32",
            hyp::HYP_PROTECT,
            AREA_C,
            PAGE,
            1 << 40,
            INVALID_PARAMETER,
        ),
        (
            "PROTECT given-back page",
            hyp::HYP_PROTECT,
            given_back,
            PAGE,
            1,
            NOT_MAPPED,
        ),
        (
            "PROTECT outside",
            hyp::HYP_PROTECT,
            0x0900_0000,
            PAGE,
            1,
            DENIED,
        ),
        (
            "BATCH zero count",
            hyp::HYP_MM_BATCH,
            list_ipa,
            0,
            0,
            INVALID_PARAMETER,
        ),
        (
            "BATCH 65 ops",
            hyp::HYP_MM_BATCH,
            list_ipa,
            65,
            0,
            INVALID_PARAMETER,
        ),
        (
            "BATCH misaligned list",
            hyp::HYP_MM_BATCH,
            list_ipa + 4,
            1,
            0,
            INVALID_PARAMETER,
        ),
        (
            "BATCH list outside RAM",
            hyp::HYP_MM_BATCH,
            0x0900_0000,
            1,
            0,
            INVALID_PARAMETER,
        ),
        (
            "BATCH list in given-back page",
            hyp::HYP_MM_BATCH,
            given_back,
            1,
            0,
            INVALID_PARAMETER,
        ),
        (
            "BATCH list overflowing",
            hyp::HYP_MM_BATCH,
            max - 7,
            1,
            0,
            INVALID_PARAMETER,
        ),
        (
            "STATS misaligned",
            hyp::HYP_STATS,
            AREA_C + 4,
            64,
            0,
            INVALID_PARAMETER,
        ),
        (
            "STATS zero length",
            hyp::HYP_STATS,
            AREA_C,
            0,
            0,
            INVALID_PARAMETER,
        ),
        (
            "STATS outside RAM",
            hyp::HYP_STATS,
            0x0900_0000,
            64,
            0,
            DENIED,
        ),
        (
            "STATS into read-only page",
            hyp::HYP_STATS,
            read_only,
            64,
            0,
            NOT_MAPPED,
        ),
        (
            "STATS into given-back page",
            hyp::HYP_STATS,
            given_back,
            64,
            0,
            NOT_MAPPED,
        ),
        ("unknown vendor call", 0xc600_0777, 0, 0, 0, NOT_SUPPORTED),
        (
            "SMC32 form of HYP_MAP",
            0x8600_0011,
            AREA_C,
            PAGE,
            0,
            NOT_SUPPORTED,
        ),
        ("other service range", 0xc500_0000, 0, 0, 0, NOT_SUPPORTED),
        // No VM has a vCPU with Aff0 = 0xff; vCPU 0 (MPIDR 0) is on.
        (
            "PSCI CPU_ON of a vCPU the VM lacks",
            hyp::PSCI_CPU_ON_64,
            0xff,
            0x4008_0000,
            0,
            INVALID_PARAMETER,
        ),
        (
            "PSCI CPU_ON with non-affinity MPIDR bits",
            hyp::PSCI_CPU_ON_64,
            1 << 31,
            0x4008_0000,
            0,
            INVALID_PARAMETER,
        ),
        (
            "PSCI CPU_ON of the running vCPU",
            hyp::PSCI_CPU_ON_64,
            0,
            0x4008_0000,
            0,
            -4,
        ),
        ("PSCI MIGRATE", 0xc400_0005, 0, 0, 0, NOT_SUPPORTED),
        (
            "SET_POLICY 9",
            hyp::HYP_TEST_SET_POLICY,
            9,
            0,
            0,
            INVALID_PARAMETER,
        ),
        (
            "SET_FAULT_AROUND 3",
            hyp::HYP_TEST_SET_FAULT_AROUND,
            3,
            0,
            0,
            INVALID_PARAMETER,
        ),
    ];
    let mut failures = 0;
    for &(what, f, a1, a2, a3, want) in cases {
        let got = call(f, a1, a2, a3);
        if got != want {
            println!("  {what}: got {got}, want {want}");
            failures += 1;
        }
    }
    // Batches with one bad operation: the error names it, and the good op
    // before it did not run.
    let batch_cases: &[(&str, MmOp, i64)] = &[
        (
            "unknown kind",
            MmOp {
                kind: 77,
                ..unmap_one
            },
            NOT_SUPPORTED,
        ),
        (
            "remap source outside RAM",
            MmOp {
                kind: op::REMAP_ALIAS,
                src_ipa: 0x4020_0000 - 0x4000_0000,
                ..unmap_one
            },
            DENIED,
        ),
        (
            "protect with write only",
            MmOp {
                kind: op::PROTECT,
                perm: 0b010,
                ..unmap_one
            },
            INVALID_PARAMETER,
        ),
        (
            "range across RAM end",
            MmOp {
                ipa: RAM_END - PAGE,
                size: 2 * PAGE,
                ..unmap_one
            },
            DENIED,
        ),
    ];
    for &(what, bad, want) in batch_cases {
        set_op(1, bad);
        // Make the list visible to the hypervisor (it reads through its own map).
        // SAFETY: a barrier.
        unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
        let r = hvc(hyp::HYP_MM_BATCH, list_ipa, 2, 0);
        if (status(r), r[1]) != (want, 1) {
            println!(
                "  batch {what}: got ({}, {}), want ({want}, 1)",
                status(r),
                r[1]
            );
            failures += 1;
        }
    }
    // A batch whose second op needs a mapped range fails while running:
    // the first op took effect (documented), the error names op 1.
    set_op(
        1,
        MmOp {
            kind: op::REMAP_ALIAS,
            src_ipa: AREA_C,
            ..MmOp {
                ipa: given_back,
                ..unmap_one
            }
        },
    );
    // SAFETY: a barrier.
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
    let r = hvc(hyp::HYP_MM_BATCH, list_ipa, 2, 0);
    if (status(r), r[1]) != (NOT_MAPPED, 1) {
        println!(
            "  batch remap of a given-back page: got ({}, {})",
            status(r),
            r[1]
        );
        failures += 1;
    }
    // HVC with a non-zero immediate is not an SMCCC call.
    let imm: u64;
    // SAFETY: an HVC the hypervisor answers NOT_SUPPORTED.
    unsafe { asm!("hvc #1", inout("x0") 0x8000_0000u64 => imm, options(nostack)) };
    if i64::from_ne_bytes(imm.to_ne_bytes()) != NOT_SUPPORTED {
        println!("  HVC #1: got {imm:#x}");
        failures += 1;
    }
    let total = cases.len() + batch_cases.len() + 2;
    println!("  {total} malformed calls, {failures} answered wrongly");
    // Everything still works: restore and touch.
    check(
        call(hyp::HYP_MAP, AREA_C, 2 * MIB, 0) == 0,
        "repopulate after the malformed calls",
    )?;
    check(
        call(hyp::HYP_PROTECT, AREA_C, 2 * MIB, 0b111) == 0,
        "restore permissions",
    )?;
    check(
        smc(hyp::PSCI_VERSION, 0, 0, 0)[0] == 0x1_0001,
        "hypervisor stopped answering",
    )?;
    check(
        probe::write(read_only as usize, 1),
        "memory not usable after the malformed calls",
    )?;
    check(
        failures == 0,
        "a malformed call was not answered with its documented error",
    )
}

/// The console UART is emulated (the default, `guest.uart=emulated`): its
/// registers read as a PL011, and each access is an emulated MMIO exit.
pub fn emulated_uart_is_a_pl011() -> TestResult {
    const UART: usize = 0x0900_0000;
    let read = |off: usize| {
        // SAFETY: the UART's page, mapped as device memory by the boot page
        // table; reads of its ID and flag registers have no side effect.
        unsafe { core::ptr::read_volatile((UART + off) as *const u32) }
    };
    let before = hyp::stat("mmio_emulated").ok_or("no mmio_emulated counter")?;
    let ids = [
        read(0xfe0),
        read(0xfe4),
        read(0xfe8),
        read(0xfec),
        read(0xff0),
        read(0xff4),
        read(0xff8),
        read(0xffc),
    ];
    let fr = read(0x018);
    let after = hyp::stat("mmio_emulated").ok_or("no mmio_emulated counter")?;
    check(
        ids == [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1],
        "PL011 ID registers read wrong",
    )?;
    check(
        fr & (1 << 5) == 0 && fr & (1 << 7) != 0,
        "flag register: TX FIFO not empty, or full",
    )?;
    check(
        after >= before + 9,
        "UART accesses were not emulated (guest.uart=passthrough?)",
    )
}
