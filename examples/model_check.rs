//! The `correct` column of `cargo xtask bench`: runs every benchmark
//! workload in every mode on the host model of the TLB and store buffer
//! (`lazyhyp::mm::model`), where a missing barrier or TLBI shows, and prints
//! one line per run: `MODEL workload=W1 policy=flatten correct=true`.
//!
//! With `--smp`, it also runs W1..W4 on a 4-CPU model where CPUs 1-3 run
//! the guest and touch the workload's range after every barrier and TLBI of
//! CPU 0, and prints what each run cost (barriers, TLBIs, the descriptor
//! writes made while the VM's lock would be held) and whether every CPU
//! ended with nothing stale: `MODEL-SMP workload=W1 policy=flatten ...`.
//!
//! `cargo run --release -p lazyhyp --features model --example model_check [-- --smp]`

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

/// The IPAs CPUs 1-3 touch while CPU 0 runs a workload: the first page of
/// every 2 MiB of the first 8 MiB of the scratch range (where W1..W4 work),
/// and one 2 MiB-aligned page further up.
fn observed() -> Vec<u64> {
    let base = workloads::SCRATCH_IPA.0;
    (0..4u64)
        .map(|i| base + i * 2 * MIB)
        .chain([base + 64 * MIB])
        .collect()
}

/// One workload on the 4-CPU model with observers; the line to print.
fn smp_workload(w: Workload, mode: Mode) -> String {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut kit = Kit::new_smp(1100, true, NestPolicy::Flatten, 4);
    let steps = Arc::new(AtomicU64::new(0));
    {
        let model = kit.model.clone();
        let steps = Arc::clone(&steps);
        let pages = observed();
        kit.model.set_step_hook(Some(Arc::new(move |cpu| {
            if cpu != 0 {
                return;
            }
            steps.fetch_add(1, Ordering::Relaxed);
            for observer in 1..4 {
                for &ipa in &pages {
                    // A fault is an answer too (nothing mapped there yet).
                    let _ = model.guest_access_on(observer, VMID, ipa, false);
                }
            }
        })));
    }
    kit.model.set_cpu_id(0);
    // The measured phase, as `cargo xtask bench` measures it in QEMU:
    // between the workload's two `measure` calls.
    let model = kit.model.clone();
    let mm = kit.mm;
    let phase = std::cell::RefCell::new(None);
    let steps_at = |steps: &AtomicU64| steps.load(Ordering::Relaxed);
    let r = workloads::run(
        w,
        mode,
        &mut kit.s2,
        kit.mm,
        PhysAddr(0x8020_0000),
        &mut |start| {
            let now = (model.stats(), mm.total("pte_writes"), steps_at(&steps));
            let mut p = phase.borrow_mut();
            *p = if start {
                Some((now, None))
            } else {
                p.take().map(|(s, _)| (s, Some(now)))
            };
        },
    );
    kit.model.set_step_hook(None);
    let correct = r == Ok(true)
        && kit.model.stale_entries().is_empty()
        && kit.model.stale_walks().is_empty()
        && kit.model.is_quiescent();
    let Some(((before, pte_before, steps_before), Some((after, pte_after, steps_after)))) =
        phase.into_inner()
    else {
        return format!(
            "MODEL-SMP workload={} policy={} cpus=4 correct={correct} (no measured phase)",
            w.name(),
            mode.name()
        );
    };
    let tlbis = (after.tlbi_ipas2e1is - before.tlbi_ipas2e1is)
        + (after.tlbi_ripas2e1is - before.tlbi_ripas2e1is)
        + (after.tlbi_vmalle1is - before.tlbi_vmalle1is)
        + (after.tlbi_vmalls12e1is - before.tlbi_vmalls12e1is);
    format!(
        "MODEL-SMP workload={} policy={} cpus=4 dsb_ishst={} dsb_ish={} stage2_tlbis={} pte_writes={} observed_steps={} correct={correct}",
        w.name(),
        mode.name(),
        after.dsb_ishst - before.dsb_ishst,
        after.dsb_ish - before.dsb_ish,
        tlbis,
        pte_after - pte_before,
        steps_after - steps_before,
    )
}

fn main() {
    if std::env::args().any(|a| a == "--smp") {
        for w in Workload::ALL {
            for mode in Mode::ALL {
                println!("{}", smp_workload(w, mode));
            }
        }
        return;
    }
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
