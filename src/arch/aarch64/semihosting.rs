//! Ending QEMU with an exit status, through Arm semihosting
//! (`SYS_EXIT_EXTENDED`). xtask starts QEMU with
//! `-semihosting-config enable=on,target=native`.

use super::psci_system_off;

/// `SYS_EXIT_EXTENDED` operation number.
const SYS_EXIT_EXTENDED: u64 = 0x20;
/// `ADP_Stopped_ApplicationExit`: the application exited with a status.
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x2_0026;

/// Ends QEMU with `code` as its exit status.
///
/// If semihosting is not enabled the `HLT` would be an undefined
/// instruction; to keep a run without it from looping, a returning call is
/// followed by PSCI `SYSTEM_OFF` (exit status 0, so xtask's marker check is
/// what catches a failure then).
pub fn exit(code: u32) -> ! {
    let block: [u64; 2] = [ADP_STOPPED_APPLICATION_EXIT, u64::from(code)];
    // SAFETY: `HLT #0xf000` is the AArch64 semihosting trap; QEMU reads the
    // two-word parameter block at x1 and ends the process. `block` lives on
    // this stack frame for the duration of the call.
    unsafe {
        core::arch::asm!(
            "hlt #0xf000",
            inout("x0") SYS_EXIT_EXTENDED => _,
            in("x1") block.as_ptr(),
            options(nostack),
        );
    }
    psci_system_off()
}
