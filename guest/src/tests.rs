//! The guest's tests. Each returns `Err(reason)` on failure.

use core::arch::asm;

use crate::console::println;
use crate::hyp::{self, MmOp, hvc, op, smc};
use crate::{gic_tests, hostile, iface_tests, probe};

type TestResult = Result<(), &'static str>;

/// A named test.
type Test = (&'static str, fn() -> TestResult);

fn check(cond: bool, reason: &'static str) -> TestResult {
    if cond { Ok(()) } else { Err(reason) }
}

/// Runs every test, printing a line each; returns (passed, failed).
pub fn run_all(add_failing: bool) -> (u64, u64) {
    let tests: &[Test] = &[
        ("runs_at_el1", runs_at_el1),
        ("smccc_version_over_hvc", smccc_version_over_hvc),
        (
            "psci_version_over_hvc_and_smc",
            psci_version_over_hvc_and_smc,
        ),
        ("psci_features", psci_features),
        (
            "unknown_call_is_not_supported",
            unknown_call_is_not_supported,
        ),
        ("hyp_version", hyp_version),
        ("gprs_survive_an_exit", gprs_survive_an_exit),
        ("fp_registers_survive_an_exit", fp_registers_survive_an_exit),
        (
            "guest_ram_is_writable_throughout",
            guest_ram_is_writable_throughout,
        ),
        ("lazy_batch_under_flatten", || {
            lazy_batch_under(Policy::Flatten)
        }),
        ("lazy_batch_under_flush_inner", || {
            lazy_batch_under(Policy::FlushInner)
        }),
        ("lazy_batch_under_counted", || {
            lazy_batch_under(Policy::Counted)
        }),
        (
            "naive_leaves_a_freed_page_reachable_flatten_does_not",
            naive_vs_flatten_freed_page,
        ),
        (
            "malformed_batches_are_refused",
            malformed_batches_are_refused,
        ),
        (
            "map_unmap_protect_by_touch",
            iface_tests::map_unmap_protect_by_touch,
        ),
        (
            "demand_faults_and_fault_around",
            iface_tests::demand_faults_and_fault_around,
        ),
        ("smccc_arch_features", iface_tests::smccc_arch_features),
        (
            "vm_memory_is_its_own",
            crate::smp_tests::vm_memory_is_its_own,
        ),
        (
            "malformed_calls_are_refused",
            iface_tests::malformed_calls_are_refused,
        ),
        (
            "emulated_uart_is_a_pl011",
            iface_tests::emulated_uart_is_a_pl011,
        ),
    ];
    let mut passed = 0;
    let mut failed = 0;
    let mut run = |name: &str, f: fn() -> TestResult| match f() {
        Ok(()) => {
            println!("test {name} ... ok");
            passed += 1;
        }
        Err(reason) => {
            println!("test {name} ... FAILED: {reason}");
            failed += 1;
        }
    };
    for &(name, f) in tests.iter().chain(gic_tests::TESTS).chain(hostile::TESTS) {
        run(name, f);
    }
    // With more than one vCPU (QEMU -smp and guest.vcpus), the SMP tests.
    if crate::smp_tests::count_vcpus() > 1 {
        for &(name, f) in crate::smp_tests::TESTS {
            run(name, f);
        }
    } else {
        println!("guest: one vCPU: the SMP tests need guest.vcpus >= 2");
    }
    if add_failing {
        run("deliberate_failure", || Err("asked to fail (guest.fail=1)"));
    }
    (passed, failed)
}

fn runs_at_el1() -> TestResult {
    let el: u64;
    // SAFETY: reads CurrentEL.
    unsafe { asm!("mrs {0}, CurrentEL", out(reg) el, options(nomem, nostack)) };
    check((el >> 2) & 3 == 1, "CurrentEL is not 1")
}

fn smccc_version_over_hvc() -> TestResult {
    check(
        hvc(hyp::SMCCC_VERSION, 0, 0, 0)[0] == 0x1_0001,
        "SMCCC_VERSION is not 1.1",
    )
}

fn psci_version_over_hvc_and_smc() -> TestResult {
    check(
        hvc(hyp::PSCI_VERSION, 0, 0, 0)[0] == 0x1_0001,
        "PSCI_VERSION over HVC is not 1.1",
    )?;
    check(
        smc(hyp::PSCI_VERSION, 0, 0, 0)[0] == 0x1_0001,
        "PSCI_VERSION over SMC is not 1.1",
    )
}

fn psci_features() -> TestResult {
    let f = |id: u32| hvc(hyp::PSCI_FEATURES, id.into(), 0, 0)[0];
    check(
        f(hyp::PSCI_SYSTEM_OFF) == 0,
        "SYSTEM_OFF not reported supported",
    )?;
    check(f(hyp::PSCI_CPU_ON_64) == 0, "CPU_ON not reported supported")?;
    check(
        f(0x8400_0005) == hyp::NOT_SUPPORTED,
        "MIGRATE reported supported",
    )
}

fn unknown_call_is_not_supported() -> TestResult {
    check(
        hvc(0xc600_fff0, 1, 2, 3)[0] == hyp::NOT_SUPPORTED,
        "unknown HVC not NOT_SUPPORTED",
    )?;
    check(
        smc(0x8200_0000, 0, 0, 0)[0] == hyp::NOT_SUPPORTED,
        "unknown SMC not NOT_SUPPORTED",
    )
}

fn hyp_version() -> TestResult {
    check(
        hvc(hyp::HYP_VERSION, 0, 0, 0)[0] == 1,
        "lazyhyp ABI version is not 0.1",
    )
}

/// SMCCC 1.1 preserves x4-x17 and x19-x28 across a call: the exit path must
/// save and restore every guest register, not only the caller-saved ones.
fn gprs_survive_an_exit() -> TestResult {
    let mut after = [0u64; 24];
    // SAFETY: x19 (reserved by LLVM) and x30 are saved and restored on the
    // stack by the block itself; every other register it writes is declared.
    unsafe {
        asm!(
            "stp x19, x30, [sp, #-32]!",
            "str {buf}, [sp, #16]",
            "mov x4, #0x404", "mov x5, #0x505", "mov x6, #0x606", "mov x7, #0x707",
            "mov x8, #0x808", "mov x9, #0x909", "mov x10, #0xa0a", "mov x11, #0xb0b",
            "mov x12, #0xc0c", "mov x13, #0xd0d", "mov x14, #0xe0e", "mov x15, #0xf0f",
            "mov x16, #0x1616", "mov x17, #0x1717",
            "mov x19, #0x1919", "mov x20, #0x2020", "mov x21, #0x2121", "mov x22, #0x2222",
            "mov x23, #0x2323", "mov x24, #0x2424", "mov x25, #0x2525", "mov x26, #0x2626",
            "mov x27, #0x2727", "mov x28, #0x2828",
            // SMCCC_VERSION
            "mov x0, #0x80000000",
            "hvc #0",
            "ldr x0, [sp, #16]",
            "stp x4, x5, [x0, #0]", "stp x6, x7, [x0, #16]", "stp x8, x9, [x0, #32]",
            "stp x10, x11, [x0, #48]", "stp x12, x13, [x0, #64]", "stp x14, x15, [x0, #80]",
            "stp x16, x17, [x0, #96]", "stp x19, x20, [x0, #112]", "stp x21, x22, [x0, #128]",
            "stp x23, x24, [x0, #144]", "stp x25, x26, [x0, #160]", "stp x27, x28, [x0, #176]",
            "ldp x19, x30, [sp], #32",
            buf = in(reg) after.as_mut_ptr(),
            out("x0") _, out("x1") _, out("x2") _, out("x3") _,
            out("x4") _, out("x5") _, out("x6") _, out("x7") _,
            out("x8") _, out("x9") _, out("x10") _, out("x11") _,
            out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _, out("x20") _, out("x21") _,
            out("x22") _, out("x23") _, out("x24") _, out("x25") _,
            out("x26") _, out("x27") _, out("x28") _,
        );
    }
    let regs = [
        4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
    ];
    for (value, reg) in after.iter().zip(regs) {
        // Each register was set to its number repeated in two bytes, in hex.
        let expected = if reg < 16 {
            reg * 0x101
        } else {
            (reg / 10) * 0x1010 + (reg % 10) * 0x101
        };
        if *value != expected {
            println!("  x{reg} = {value:#x}, expected {expected:#x}");
            return Err("a general-purpose register changed across an HVC");
        }
    }
    Ok(())
}

/// The hypervisor is built softfloat and never saves FP/SIMD state: it must
/// never change it either.
fn fp_registers_survive_an_exit() -> TestResult {
    let (a, b): (u64, u64) = (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
    let (ra, rb): (u64, u64);
    // SAFETY: uses d0, d7 and d31 (declared) and an SMCCC call.
    unsafe {
        asm!(
            "fmov d0, {a}",
            "fmov d7, {b}",
            "fmov d31, {a}",
            "mov x0, #0x80000000",
            "hvc #0",
            "fmov {ra}, d0",
            "fmov {rb}, d7",
            "fmov x1, d31",
            "cmp x1, {ra}",
            "csel {ra}, {ra}, xzr, eq",
            a = in(reg) a,
            b = in(reg) b,
            ra = out(reg) ra,
            rb = out(reg) rb,
            out("x0") _, out("x1") _, out("x2") _, out("x3") _,
            out("v0") _, out("v7") _, out("v31") _,
        );
    }
    check(
        ra == a && rb == b,
        "an FP/SIMD register changed across an HVC",
    )
}

/// Writes and reads back a word in every page of guest RAM above the image:
/// every page is mapped, writable, and keeps what was written.
fn guest_ram_is_writable_throughout() -> TestResult {
    const START: usize = 0x4100_0000;
    const END: usize = 0x4000_0000 + (128 << 20);
    const MAGIC: usize = 0x5a5a_0000_0000_0000;
    for page in (START..END).step_by(4096) {
        // SAFETY: guest RAM above the image (which ends well below 16 MiB)
        // is unused by this program; the boot map maps it normal memory.
        unsafe { core::ptr::write_volatile(page as *mut usize, page ^ MAGIC) };
    }
    for page in (START..END).step_by(4096) {
        // SAFETY: as above.
        let v = unsafe { core::ptr::read_volatile(page as *const usize) };
        if v != page ^ MAGIC {
            return Err("guest RAM did not keep a written value");
        }
    }
    Ok(())
}

/// The nesting policies, numbered as `HYP_TEST_SET_POLICY` takes them.
#[derive(Clone, Copy, Debug)]
enum Policy {
    Flatten = 0,
    FlushInner = 1,
    Naive = 2,
    Counted = 3,
}

fn set_policy(p: Policy) -> TestResult {
    check(
        hvc(hyp::HYP_TEST_SET_POLICY, p as u64, 0, 0)[0] == 0,
        "HYP_TEST_SET_POLICY refused",
    )
}

const PAGE: usize = 4096;
/// Two 2 MiB regions of guest RAM, well above the image and the RAM test.
const AREA_A: usize = 0x4400_0000;
const AREA_B: usize = 0x4420_0000;
const MARK_A: u64 = 0xa5a5_0000_0000_0000;
const MARK_B: u64 = 0xb6b6_0000_0000_0000;

fn mark(area: usize, tag: u64) {
    for p in (area..area + 512 * PAGE).step_by(PAGE) {
        // SAFETY: guest RAM this program does not otherwise use.
        unsafe { core::ptr::write_volatile(p as *mut u64, p as u64 ^ tag) };
    }
}

fn batch(ops: &[MmOp]) -> TestResult {
    let (status, index) = hyp::mm_batch(ops);
    if status == 0 {
        Ok(())
    } else {
        println!("  HYP_MM_BATCH: status {status}, op {index}");
        Err("HYP_MM_BATCH failed")
    }
}

fn mm_op(kind: u32, perm: u32, ipa: usize, pages: usize, src: usize) -> MmOp {
    MmOp {
        kind,
        perm,
        ipa: ipa as u64,
        size: (pages * PAGE) as u64,
        src_ipa: src as u64,
    }
}

/// One lazy section that unmaps, write-protects and re-points parts of a
/// 2 MiB block the guest has touched (a split: break-before-make with a
/// table allocation, which nests in guard mode), then one that undoes it
/// all and merges the block back. After each, the guest checks every page.
fn lazy_batch_under(policy: Policy) -> TestResult {
    set_policy(policy)?;
    mark(AREA_A, MARK_A);
    mark(AREA_B, MARK_B);
    // Touch (and write) the 48 pages the batch changes, last, so the TLB
    // holds exactly the translations the batch must kill (QEMU's TLB is
    // small and direct-mapped: touching more would evict them and hide a
    // missing invalidation).
    for p in (AREA_A..AREA_A + 48 * PAGE).step_by(PAGE) {
        check(
            probe::write(p, p as u64 ^ MARK_A),
            "area not writable before the batch",
        )?;
    }
    batch(&[
        mm_op(op::UNMAP, 0, AREA_A, 16, 0),
        mm_op(op::PROTECT, 1, AREA_A + 16 * PAGE, 16, 0),
        mm_op(op::REMAP_ALIAS, 0, AREA_A + 32 * PAGE, 16, AREA_B),
    ])?;
    // The changed pages first, while their stale translations (if any
    // survived) are still in the TLB.
    for i in 0..512 {
        let p = AREA_A + i * PAGE;
        let v = probe::read(p);
        match i {
            0..16 => check(v.is_none(), "an unmapped page is still readable")?,
            16..32 => {
                check(
                    v == Some(p as u64 ^ MARK_A),
                    "a protected page lost its contents",
                )?;
                check(!probe::write(p, 0), "a read-only page took a write")?;
            }
            32..48 => {
                let src = AREA_B + (i - 32) * PAGE;
                check(
                    v == Some(src as u64 ^ MARK_B),
                    "a re-pointed page shows the old backing",
                )?;
            }
            _ => check(v == Some(p as u64 ^ MARK_A), "an untouched page changed")?,
        }
    }
    // The abort the guest got is a synchronous external abort (DFSC 0x10).
    let esr = probe::LAST_ESR.load(core::sync::atomic::Ordering::Relaxed);
    check(
        esr >> 26 == 0x25 && esr & 0x3f == 0x10,
        "fault was not an injected SEA",
    )?;
    batch(&[
        mm_op(op::POPULATE, 0, AREA_A, 16, 0),
        mm_op(op::PROTECT, 7, AREA_A + 16 * PAGE, 16, 0),
        mm_op(
            op::REMAP_ALIAS,
            0,
            AREA_A + 32 * PAGE,
            16,
            AREA_A + 32 * PAGE,
        ),
        mm_op(op::MERGE, 0, AREA_A, 512, 0),
    ])?;
    for i in 0..512 {
        let p = AREA_A + i * PAGE;
        check(
            probe::read(p) == Some(p as u64 ^ MARK_A),
            "a restored page reads wrong",
        )?;
        check(
            probe::write(p, p as u64 ^ MARK_A),
            "a restored page refuses writes",
        )?;
    }
    set_policy(Policy::Flatten)
}

/// The hypervisor frees a table page inside a lazy section and probes it:
/// under Naive the unmapping is left pending and the stale translation lets
/// the read through; under Flatten it is complete when the free returns.
fn naive_vs_flatten_freed_page() -> TestResult {
    let probe_under = |p: Policy| -> Result<u64, &'static str> {
        set_policy(p)?;
        let r = hvc(hyp::HYP_TEST_FREED_PAGE_PROBE, 0, 0, 0);
        if r[0] == 0 {
            Ok(r[1])
        } else {
            Err("HYP_TEST_FREED_PAGE_PROBE failed (guard mode off?)")
        }
    };
    let naive = probe_under(Policy::Naive)?;
    let flatten = probe_under(Policy::Flatten)?;
    println!(
        "  freed page readable (bit 0 in section, bit 1 after): naive {naive:#b}, flatten {flatten:#b}"
    );
    check(
        naive == 0b01,
        "Naive: the freed page should be reachable inside the section only",
    )?;
    check(
        flatten == 0,
        "Flatten: the freed page must be unreachable at once",
    )
}

/// Bad batches get an error code and change nothing.
fn malformed_batches_are_refused() -> TestResult {
    let good = mm_op(op::UNMAP, 0, AREA_A, 1, 0);
    let cases: [(MmOp, i64); 5] = [
        (mm_op(99, 0, AREA_A, 1, 0), -1),
        (mm_op(op::UNMAP, 0, AREA_A + 1, 1, 0), -2),
        (mm_op(op::UNMAP, 0, AREA_A, 0, 0), -2),
        (mm_op(op::UNMAP, 0, 0x0900_0000, 1, 0), -3),
        (
            mm_op(op::REMAP_ALIAS, 0, AREA_A, 1, 0x4020_0000 - 0x4000_0000),
            -3,
        ),
    ];
    for (bad, code) in cases {
        let (status, index) = hyp::mm_batch(&[good, bad]);
        if (status, index) != (code, 1) {
            println!("  {bad:?}: got ({status}, {index}), want ({code}, 1)");
            return Err("malformed op not refused as documented");
        }
        check(
            probe::read(AREA_A).is_some(),
            "a refused batch still ran its first op",
        )?;
    }
    Ok(())
}
