//! Boots Debian's arm64 Linux kernel with the busybox initramfs under the
//! hypervisor with 4 vCPUs on 4 CPUs (`cargo xtask linux --smp 4`): it must
//! show 4 CPUs in /proc/cpuinfo, reach the init's end marker (after four
//! parallel writers wrote and read back 16 MiB each of demand-populated
//! memory) and power off cleanly, within the timeout. On its first start the
//! init reboots (`reboot -f`); the hypervisor restarts the VM from its
//! image and the second start runs to the end. Fetching the kernel needs
//! Debian/Ubuntu as root (as CI is); elsewhere the test fails with the
//! command to run.

#[test]
fn debian_linux_boots_to_init_end_and_powers_off() {
    xtask::ensure_qemu().unwrap_or_else(|e| panic!("{e:#}"));
    let artifacts = xtask::build(true).unwrap_or_else(|e| panic!("{e:#}"));
    let (kernel, initrd) = xtask::linux::fetch().unwrap_or_else(|e| panic!("{e:#}"));
    let outcome = xtask::linux::boot(
        &artifacts.hypervisor,
        &kernel,
        &initrd,
        xtask::linux::DEFAULT_TIMEOUT,
        false,
        // The init reboots once (`reboot -f`: PSCI SYSTEM_RESET), and the
        // hypervisor restarts the VM from its image.
        "lazyhyp.reboot_test",
        4,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(why) = xtask::linux::judge(&outcome, 4) {
        panic!("{why}\n---- output ----\n{}", outcome.output);
    }
    assert!(
        outcome.output.contains("LINUX-REBOOTING"),
        "the init did not reboot\n{}",
        outcome.output
    );
    assert_eq!(
        outcome.vms.first().map(|v| v.resets),
        Some(1),
        "the VM was not reset exactly once\n{}",
        outcome.output
    );
    let demand: u64 = outcome
        .stat("demand_faults")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        demand > 0,
        "guest RAM was not demand-populated\n{}",
        outcome.output
    );
    // The hypervisor owns the GIC: the guest's timer interrupts came
    // through EL2 and the virtual GIC.
    let irqs: u64 = outcome
        .stat("exits_irq")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        irqs > 0,
        "no IRQ exits: is the GIC still the guest's?\n{}",
        outcome.output
    );
    assert!(
        xtask::linux::interrupt_count(&outcome.output, "arch_timer") > 0,
        "{}",
        outcome.output
    );
}

/// The README's two-VM example (`cargo xtask vms`): the test guest on CPU 0
/// and Linux with 2 vCPUs on CPUs 1-2, side by side, each judged on its
/// own: the test guest's suite passes, Linux shows 2 CPUs, runs its init
/// (and reads the console line: input goes to the Linux VM) and powers off.
#[test]
fn test_guest_and_linux_side_by_side() {
    xtask::ensure_qemu().unwrap_or_else(|e| panic!("{e:#}"));
    let artifacts = xtask::build(true).unwrap_or_else(|e| panic!("{e:#}"));
    let (kernel, initrd) = xtask::linux::fetch().unwrap_or_else(|e| panic!("{e:#}"));
    let config = xtask::vms::DEFAULT_CONFIG;
    let outcome = xtask::vms::boot(
        &artifacts,
        Some((&kernel, &initrd)),
        config,
        xtask::linux::DEFAULT_TIMEOUT,
        false,
        &[],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    if let Err(why) = xtask::vms::judge(&outcome, config) {
        panic!("{why}\n---- output ----\n{}", outcome.output);
    }
}
