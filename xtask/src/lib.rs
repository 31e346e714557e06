//! Host-side tool for lazyhyp: builds the hypervisor and the test guest, boots
//! them under QEMU and judges the run, as `docs/run-contract.md` describes.
//!
//! The `cargo xtask` binary (`src/main.rs`) and the root package's integration
//! tests (`tests/`) both use this library.

mod artifacts;
pub mod bench;
pub mod linux;
mod outcome;
mod process;
mod qemu;
mod test_runner;
pub mod vms;

pub use artifacts::{
    Artifacts, GUEST_TARGET, HYPERVISOR_TARGET, build, cargo_command, ensure_targets, target_dir,
    workspace_root,
};
pub use outcome::{
    ExitMarker, GUEST_PREFIX, GuestSummary, RunOutcome, TestLine, Verdict, VmMarker,
    exit_code_meaning, parse_exit_marker, parse_guest_summary, parse_result_marker, parse_stats,
    parse_test_line, parse_vm_marker, trusted_marker,
};
pub use process::{Captured, run_with_input, run_with_timeout};
pub use qemu::{
    DEFAULT_TIMEOUT, GDB_PORT, PAYLOAD_ADDR, QEMU, RunOptions, ensure_qemu, new_run_token,
    qemu_args, qemu_command, run, run_with_qemu,
};
pub use test_runner::{TestTotals, parse_test_result_line, run_host_tests};
