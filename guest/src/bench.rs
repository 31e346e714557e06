//! The benchmark sequence (`cargo xtask bench`, flag bit 1): W1..W4, W6, W7, W1-rsv run by
//! the hypervisor on a scratch stage 2 in every mode, then W5, the first
//! touch of 64 MiB, driven from here with fault-around off and on in every
//! mode. The hypervisor prints one `LAZYHYP-BENCH` line per run.

use crate::console::println;
use crate::hyp::{self, hvc};

const MODES: u64 = 5;
const AREA: u64 = 0x4800_0000;
const SIZE: u64 = 64 << 20;
const PAGE: u64 = 4096;

fn ok(r: [u64; 4]) -> bool {
    r[0] == 0
}

/// Runs the sequence; returns (runs completed, runs refused).
pub fn run() -> (u64, u64) {
    let (mut done, mut refused) = (0, 0);
    let mut count = |what: &str, good: bool| {
        if good {
            done += 1;
        } else {
            refused += 1;
            println!("bench: {what} refused");
        }
    };
    for w in 0..7 {
        for mode in 0..MODES {
            count(
                "HYP_TEST_RUN_WORKLOAD",
                ok(hvc(hyp::HYP_TEST_RUN_WORKLOAD, w, mode, 0)),
            );
        }
    }
    // W5: each page gets a marker once; each run gives the area back, makes
    // the hypervisor forget that, and touches it all again.
    for p in (AREA..AREA + SIZE).step_by(PAGE as usize) {
        // SAFETY: guest RAM this sequence owns.
        unsafe { core::ptr::write_volatile(p as *mut u64, p ^ 0x5eed) };
    }
    for fault_around in [0u64, 1] {
        for mode in 0..MODES {
            count("HYP_UNMAP", ok(hvc(hyp::HYP_UNMAP, AREA, SIZE, 0)));
            count(
                "HYP_TEST_FORGET",
                ok(hvc(hyp::HYP_TEST_FORGET, AREA, SIZE, 0)),
            );
            let bytes = if fault_around == 1 { 2 << 20 } else { 0 };
            count(
                "HYP_TEST_SET_FAULT_AROUND",
                ok(hvc(hyp::HYP_TEST_SET_FAULT_AROUND, bytes, 0, 0)),
            );
            count(
                "HYP_TEST_BENCH_MARK start",
                ok(hvc(hyp::HYP_TEST_BENCH_MARK, 0, mode, fault_around)),
            );
            let mut correct = true;
            for p in (AREA..AREA + SIZE).step_by(PAGE as usize) {
                // SAFETY: guest RAM this sequence owns; the first touch faults
                // and is populated before the load retries.
                correct &= unsafe { core::ptr::read_volatile(p as *const u64) } == p ^ 0x5eed;
            }
            count(
                "HYP_TEST_BENCH_MARK stop",
                ok(hvc(hyp::HYP_TEST_BENCH_MARK, 1, 0, u64::from(correct))),
            );
        }
    }
    count(
        "HYP_TEST_SET_FAULT_AROUND",
        ok(hvc(hyp::HYP_TEST_SET_FAULT_AROUND, 2 << 20, 0, 0)),
    );
    (done, refused)
}
