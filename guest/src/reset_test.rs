//! The VM reset test (`guest.reset_test=1`): on its first start the guest
//! dirties memory (a word of RAM, a static), starts its secondary vCPUs if it
//! has any, and resets its VM with PSCI `SYSTEM_RESET`. The hypervisor must
//! park every vCPU, scrub and reload the VM, and start vCPU 0 again with the
//! reset count in `x3`; the second start checks that nothing survived.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::console::println;
use crate::hyp;

/// A word of guest RAM no other test uses.
const DIRTY_WORD: u64 = 0x4600_0000;
const PATTERN: u64 = 0x5245_5345_545f_4d45;
/// A static in `.data` (a non-zero initial value, so it comes from the
/// image, not from zeroed `.bss`): reloaded, it is [`INITIAL`] again after
/// the reset.
static DIRTY_STATIC: AtomicU64 = AtomicU64::new(INITIAL);
const INITIAL: u64 = 0x1717_1717;
/// PSCI `SYSTEM_RESET`.
const SYSTEM_RESET: u32 = 0x8400_0009;

/// First start: dirty memory, bring the secondaries up, reset.
pub fn dirty_and_reset() -> ! {
    // SAFETY: guest RAM no other code uses.
    unsafe { (DIRTY_WORD as *mut u64).write_volatile(PATTERN) };
    DIRTY_STATIC.store(PATTERN, Ordering::SeqCst);
    // With several vCPUs, they are running (spinning in their task loop)
    // when the reset comes: the hypervisor must stop them.
    if crate::smp_tests::count_vcpus() > 1 {
        let up = crate::smp_tests::vcpus_come_up_through_psci();
        println!("guest: secondaries before the reset: {up:?}");
    }
    println!("guest: resetting the VM");
    hyp::smc(SYSTEM_RESET, 0, 0, 0);
    panic!("PSCI SYSTEM_RESET returned");
}

/// Second start: the reset count is 1 and nothing of the first start is
/// left (RAM scrubbed, image reloaded). The secondaries were parked: the
/// SMP test that follows finds them off (`AFFINITY_INFO`) and starts them
/// again with `CPU_ON`; the GIC tests that follow find the timer working.
pub fn check(resets: u64) -> Result<(), &'static str> {
    if resets != 1 {
        return Err("x3 does not say the VM was reset once");
    }
    // SAFETY: guest RAM no other code uses.
    let word = unsafe { (DIRTY_WORD as *const u64).read_volatile() };
    if word != 0 {
        return Err("guest RAM was not scrubbed by the reset");
    }
    if DIRTY_STATIC.load(Ordering::SeqCst) != INITIAL {
        return Err("the image was not reloaded by the reset");
    }
    Ok(())
}
