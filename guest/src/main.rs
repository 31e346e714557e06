//! The EL1 test guest. It runs under lazyhyp's stage 2, prints one line per
//! test and a closing `guest: N passed, M failed` line, reports the counts to
//! the hypervisor (`HYP_REPORT_RESULT`) and powers off with PSCI
//! `SYSTEM_OFF` through a (trapped) SMC.
//!
//! Entry (see `docs/run-contract.md`): `x0` = device tree IPA (0: none),
//! `x1` = flags (bit 0: add a test that deliberately fails).

#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod bench;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod gic_tests;
#[cfg(target_os = "none")]
mod hostile;
#[cfg(target_os = "none")]
mod hyp;
#[cfg(target_os = "none")]
mod iface_tests;
#[cfg(target_os = "none")]
mod probe;
#[cfg(target_os = "none")]
mod reset_test;
#[cfg(target_os = "none")]
mod rt;
#[cfg(target_os = "none")]
mod smp_tests;
#[cfg(target_os = "none")]
mod tests;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the test guest is a bare-metal AArch64 image, run by `cargo xtask qemu`");
    std::process::exit(2);
}
