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
