//! The `correct` column of `cargo xtask bench`: runs every benchmark
//! workload in every mode on the host model of the TLB and store buffer
//! (`lazyhyp::mm::model`), where a missing barrier or TLBI shows, and prints
//! one line per run: `MODEL workload=W1 policy=flatten correct=true`.
//!
//! `cargo run --release -p lazyhyp --features model --example model_check`

use lazyhyp::mm::lazy::NestPolicy;
use lazyhyp::mm::testkit::{Kit, VMID};
use lazyhyp::mm::{Ipa, PhysAddr};
use lazyhyp::vm::guest_mm::{FaultAction, GuestMemory, GuestRam};
use lazyhyp::workloads::{self, Mode, Workload};

const MIB: u64 = 1 << 20;

/// W1..W4: the workload runs without error, leaves the expected tables, and
/// nothing stale or pending.
fn check_workload(w: Workload, mode: Mode) -> bool {
    let mut kit = Kit::new(1100, true, NestPolicy::Flatten);
    let r = workloads::run(
        w,
        mode,
        &mut kit.s2,
        kit.mm,
        PhysAddr(0x8020_0000),
        &mut |_| {},
    );
    r == Ok(true) && kit.model.stale_entries().is_empty() && kit.model.is_quiescent()
}

/// W5 (on 8 MiB: the outcome does not depend on the size): the first touch
/// of every page is served by demand population, the retry succeeds, and the
/// tables end up correct.
fn check_first_touch(mode: Mode, fault_around: usize) -> bool {
    let mut kit = Kit::new(128, true, NestPolicy::Flatten);
    match mode {
        Mode::Eager => kit.mm.set_lazy_enabled(false),
        Mode::Lazy(p) => kit.mm.set_policy(p),
    }
    let base = 1u64 << 30;
    let mut mem = GuestMemory::new(
        GuestRam {
            ipa: Ipa(base)..Ipa(base + 64 * MIB),
            backing: PhysAddr(0x8000_0000),
            mem: lazyhyp::mm::stage2::MemType::Normal,
        },
        fault_around,
    );
    for ipa in (base..base + 8 * MIB).step_by(4096) {
        if kit.model.guest_access(VMID, ipa, false).is_err() {
            if mem.stage2_fault(&mut kit.s2, kit.mm, Ipa(ipa), 0x07) == FaultAction::Inject {
                return false;
            }
            if kit.model.guest_access(VMID, ipa, false) != Ok(0x8000_0000 + (ipa - base) as usize) {
                return false;
            }
        }
    }
    kit.model.stale_entries().is_empty() && kit.model.is_quiescent()
}

fn main() {
    for w in Workload::ALL {
        for mode in Mode::ALL {
            println!(
                "MODEL workload={} policy={} correct={}",
                w.name(),
                mode.name(),
                check_workload(w, mode)
            );
        }
    }
    for (name, fa) in [("W5-fa-off", 0), ("W5-fa-on", 2 << 20)] {
        for mode in Mode::ALL {
            println!(
                "MODEL workload={name} policy={} correct={}",
                mode.name(),
                check_first_touch(mode, fa)
            );
        }
    }
}
