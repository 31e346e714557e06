//! Cross-CPU correctness on the host model (issue 12): one CPU changes a
//! stage 2 (eagerly, or in a lazy section under each nesting policy that
//! claims correctness) while the other CPUs run the guest and translate
//! addresses of the range it changes between *every* barrier and TLBI it
//! executes (the model's step hook) and between its operations. Once the
//! changing CPU's call (eager) or its section's `leave` has returned, no CPU
//! may use a stale translation: reach the old backing, write a page that is
//! now read-only, or walk through a table that was detached; and no table
//! page may have been freed while another CPU's walk cache still held it.
//!
//! The properties are checked against broken variants: the model's
//! non-broadcast TLBIs (`Model::set_local_tlbis`, kept here as tests that
//! must fail) and, by hand and in `cargo xtask mutants`, the mm core without
//! its final `DSB ISH` (mutant `no-final-dsb-ish`) and freeing before the
//! TLBIs (`free-before-tlbi`).

use alloc::sync::Arc;
use alloc::vec::Vec;
use proptest::prelude::*;
use spin::Mutex;

use super::arch::{MmArch, Vmid};
use super::lazy::NestPolicy;
use super::model::Fault;
use super::scenarios::{Op, WINDOW, WINDOW_PAGES, apply, sections};
use super::stage2::{S2Perm, Stage2};
use super::testkit::{Kit, VMID, ram};
use super::{Ipa, PAGE_SIZE, PhysAddr};

/// The physical address a guest access on `cpu` reaches.
fn pa_on(
    model: &super::model::Model,
    cpu: usize,
    vmid: Vmid,
    ipa: u64,
    write: bool,
) -> Result<usize, Fault> {
    model.guest_access_on(cpu, vmid, ipa, write).map(|a| a.pa)
}

/// CPUs of the model: CPU 0 changes the stage 2, CPUs 1..3 run its guest.
const CPUS: usize = 4;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = PAGE_SIZE as u64;

/// How the changing CPU pays: eagerly (lazy mode off), or in sections
/// under a policy.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Eager,
    Lazy(NestPolicy),
}

/// Pages (indices into `WINDOW`) the observers translate while `op` runs:
/// both ends of its range, its middle and its two neighbours; for a merge,
/// two pages of every 2 MiB region.
fn focus_of(op: &Op) -> Vec<u64> {
    let range = |page: u64, pages: u64| {
        let end = (page + pages).min(WINDOW_PAGES);
        let mut v = alloc::vec![page, end - 1, page + (end - page) / 2, end];
        if page > 0 {
            v.push(page - 1);
        }
        v
    };
    let mut v = match *op {
        Op::Map { page, pages, .. }
        | Op::Unmap { page, pages }
        | Op::Protect { page, pages, .. }
        | Op::Remap { page, pages, .. } => range(page, pages),
        Op::Query { page } => alloc::vec![page],
        Op::Merge => (0..WINDOW_PAGES / 512)
            .flat_map(|b| [b * 512, b * 512 + 300])
            .collect(),
        Op::Touch | Op::FailNextMap(_) | Op::TopUp(_) => Vec::new(),
    };
    v.retain(|&p| p < WINDOW_PAGES);
    v
}

/// The observers' view: every CPU but `changer` reads each focus page
/// (filling its TLB and walk cache from whatever the walkers see now).
fn observe(kit_model: &super::model::Model, changer: usize, focus: &[u64]) {
    for cpu in (0..kit_model.cpus()).filter(|&c| c != changer) {
        for &p in focus {
            let _ = kit_model.guest_access_on(cpu, VMID, WINDOW.start + p * PAGE, false);
        }
    }
}

/// After the changing CPU's call or section returned: the kit's own check
/// (no rule broken, nothing pending, no stale TLB or walk-cache entry on
/// any CPU, tables equal the reference) and, on every observer, each focus
/// page reaches exactly the reference's backing, writes only where the
/// reference allows them, and faults where nothing is mapped.
fn check_all_cpus(kit: &Kit, focus: &[u64]) -> Result<(), alloc::string::String> {
    kit.check(&WINDOW)?;
    for cpu in 1..kit.model.cpus() {
        for &p in focus {
            let ipa = WINDOW.start + p * PAGE;
            let read = pa_on(&kit.model, cpu, VMID, ipa, false);
            let write = pa_on(&kit.model, cpu, VMID, ipa, true);
            match kit.reference.get(&Ipa(ipa)) {
                Some(&(pa, perm)) => {
                    if read != Ok(pa.0) {
                        return Err(alloc::format!(
                            "CPU {cpu}: read of {ipa:#x} gives {read:?}, want {pa:#x}"
                        ));
                    }
                    if write.is_ok() != perm.write {
                        return Err(alloc::format!(
                            "CPU {cpu}: write of {ipa:#x} gives {write:?}, reference {perm:?}"
                        ));
                    }
                }
                None => {
                    if !matches!(read, Err(Fault::Translation { .. })) {
                        return Err(alloc::format!(
                            "CPU {cpu}: read of unmapped {ipa:#x} gives {read:?}"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs `sections` on CPU 0 of a 4-CPU kit in `mode`, with CPUs 1..3
/// translating the focus pages between every barrier and TLBI of CPU 0 and
/// between its operations; checks every CPU after each eager operation and
/// each section. `local_tlbis`: the broken, non-broadcast hardware.
fn run_smp(
    mode: Mode,
    sections: &[(bool, Vec<Op>)],
    local_tlbis: bool,
) -> Result<(), alloc::string::String> {
    let policy = match mode {
        Mode::Eager => NestPolicy::Flatten,
        Mode::Lazy(p) => p,
    };
    let mut kit = Kit::new_smp(256, true, policy, CPUS);
    let eager = matches!(mode, Mode::Eager);
    kit.mm.set_lazy_enabled(!eager);
    kit.model.set_local_tlbis(local_tlbis);
    let focus: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    {
        let model = kit.model.clone();
        let focus = Arc::clone(&focus);
        kit.model.set_step_hook(Some(Arc::new(move |cpu| {
            let pages = focus.lock().clone();
            observe(&model, cpu, &pages);
        })));
    }
    let result = (|| {
        let mut fail_next = None;
        for (lazy, ops) in sections {
            let lazy = *lazy && !eager;
            if lazy {
                kit.mm.enter();
            }
            for op in ops {
                focus.lock().extend(focus_of(op));
                let pages = focus.lock().clone();
                observe(&kit.model, 0, &pages);
                apply(&mut kit, op, &mut fail_next, lazy);
                observe(&kit.model, 0, &pages);
                if !lazy {
                    check_all_cpus(&kit, &pages)
                        .map_err(|e| alloc::format!("after {op:?}: {e}"))?;
                    focus.lock().clear();
                }
            }
            if lazy {
                kit.mm.leave();
                let pages = core::mem::take(&mut *focus.lock());
                check_all_cpus(&kit, &pages)
                    .map_err(|e| alloc::format!("after section {ops:?}: {e}"))?;
            }
        }
        Ok(())
    })();
    // The hook holds a clone of the model: drop it (the cycle).
    kit.model.set_step_hook(None);
    result
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn other_cpus_never_use_a_stale_translation_eager(s in sections()) {
        run_smp(Mode::Eager, &s, false).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn other_cpus_never_use_a_stale_translation_flatten(s in sections()) {
        run_smp(Mode::Lazy(NestPolicy::Flatten), &s, false).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn other_cpus_never_use_a_stale_translation_counted(s in sections()) {
        run_smp(Mode::Lazy(NestPolicy::Counted), &s, false).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn other_cpus_never_use_a_stale_translation_flush_inner(s in sections()) {
        run_smp(Mode::Lazy(NestPolicy::FlushInner), &s, false).map_err(TestCaseError::fail)?;
    }
}

/// A fixed sequence covering every kind of change: blocks and pages mapped
/// and touched by every CPU, then (in one section, or eagerly) an unmap
/// that splits a block, a write-protect, a remap, a merge and an unmap of a
/// whole table.
fn every_change() -> Vec<(bool, Vec<Op>)> {
    alloc::vec![
        (
            false,
            alloc::vec![
                Op::Map {
                    page: 0,
                    pages: 1024,
                    pa_page: 0,
                    perm: 1
                },
                Op::Map {
                    page: 1024,
                    pages: 600,
                    pa_page: 1024,
                    perm: 1
                },
                Op::Touch,
            ],
        ),
        (
            true,
            alloc::vec![
                Op::Unmap { page: 10, pages: 5 },
                Op::Protect {
                    page: 600,
                    pages: 40,
                    perm: 0
                },
                Op::Remap {
                    page: 1100,
                    pages: 64,
                    pa_page: 7
                },
                Op::Unmap {
                    page: 1536,
                    pages: 512
                },
                Op::Merge,
            ],
        ),
    ]
}

/// The property holds for the fixed sequence in every correct mode, and
/// fails for each once TLBIs stop being broadcast: the observers keep the
/// old backing, or a write permission, or a walk through a detached table.
#[test]
fn cross_cpu_checks_fail_without_broadcast_tlbis() {
    let modes = [
        Mode::Eager,
        Mode::Lazy(NestPolicy::Flatten),
        Mode::Lazy(NestPolicy::Counted),
        Mode::Lazy(NestPolicy::FlushInner),
    ];
    for mode in modes {
        run_smp(mode, &every_change(), false).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let broken = run_smp(mode, &every_change(), true);
        assert!(broken.is_err(), "{mode:?}: local TLBIs went unseen");
    }
}

/// A table page is freed only once no CPU's walk cache can hold it: three
/// observers walk through a level-3 table, CPU 0 unmaps the whole 2 MiB it
/// maps (the table is detached) in a section; at the free, the model finds
/// no walk cache pointing at it. With non-broadcast TLBIs the observers'
/// walk caches keep it and the free is a violation.
#[test]
fn a_detached_table_is_freed_only_after_every_cpu_dropped_it() {
    for local in [false, true] {
        let mut kit = Kit::new_smp(64, true, NestPolicy::Flatten, CPUS);
        kit.model.set_local_tlbis(local);
        kit.s2
            .map(
                Ipa(GIB),
                2 * MIB as usize,
                PhysAddr(0x8000_1000),
                ram(S2Perm::RW),
            )
            .expect("map pages");
        let table = kit.table_pages();
        assert_eq!(table, 3, "root, level-2 and level-3 tables");
        for cpu in 1..CPUS {
            let _pages = kit.model.touch_guest_on(cpu, VMID, GIB..GIB + 2 * MIB);
            assert!(!kit.model.walk_entries(cpu).is_empty());
        }
        kit.mm.enter();
        kit.s2.unmap(Ipa(GIB), 2 * MIB as usize).expect("unmap");
        kit.mm.leave();
        assert_eq!(kit.table_pages(), 2, "the level-3 table was detached");
        let freed_early = kit
            .model
            .violations()
            .iter()
            .any(|v| v.contains("walk cache points at it"));
        assert_eq!(freed_early, local, "local TLBIs: {local}");
    }
}

/// Two CPUs in lazy sections at once, on two VMs (the per-VM lock lets
/// them): each CPU's batch, store buffer and TLBIs are its own. CPU 1's
/// section end publishes nothing of CPU 0's (its maps stay invisible to
/// VM 1's guest until CPU 0 leaves), and VM 2's changes never touch what
/// VM 1's guest caches.
#[test]
fn two_cpus_in_sections_on_two_vms_pay_only_their_own() {
    let kit = Kit::new_smp(64, true, NestPolicy::Flatten, CPUS);
    let vm2 = Vmid(2);
    let mut s2b = Stage2::new(vm2, kit.mm, kit.pool).expect("VM 2");
    let mut s2a = kit.s2;
    let (a, b) = (GIB, 2 * GIB);
    s2a.map(
        Ipa(a),
        16 * PAGE_SIZE,
        PhysAddr(0x8000_0000),
        ram(S2Perm::RW),
    )
    .expect("VM 1");
    s2b.map(
        Ipa(b),
        16 * PAGE_SIZE,
        PhysAddr(0x9000_0000),
        ram(S2Perm::RW),
    )
    .expect("VM 2");
    // VM 1 runs on CPU 2, VM 2 on CPU 3.
    assert_eq!(kit.model.touch_guest_on(2, VMID, a..a + 16 * PAGE), 16);
    assert_eq!(kit.model.touch_guest_on(3, vm2, b..b + 16 * PAGE), 16);

    kit.model.set_cpu_id(0);
    kit.mm.enter();
    s2a.map(
        Ipa(a + 64 * PAGE),
        4 * PAGE_SIZE,
        PhysAddr(0x8010_0000),
        ram(S2Perm::RW),
    )
    .expect("map VM 1");
    s2a.unmap(Ipa(a), PAGE_SIZE).expect("unmap VM 1");
    kit.model.set_cpu_id(1);
    assert!(kit.mm.nothing_pending(), "CPU 1 owes nothing of CPU 0's");
    kit.mm.enter();
    s2b.protect(Ipa(b), 16 * PAGE_SIZE, S2Perm::RO)
        .expect("protect VM 2");
    kit.mm.leave();
    // CPU 1's DSBs did not publish CPU 0's descriptors: VM 1's new pages
    // still fault, its unmapped page is still reachable (legitimately: CPU
    // 0's section has not ended), and CPU 0 still owes its batch.
    assert!(pa_on(&kit.model, 2, VMID, a + 64 * PAGE, false).is_err());
    assert_eq!(pa_on(&kit.model, 2, VMID, a, false), Ok(0x8000_0000));
    assert!(
        pa_on(&kit.model, 3, vm2, b, true).is_err(),
        "VM 2 is read-only"
    );
    kit.model.set_cpu_id(0);
    assert!(!kit.mm.nothing_pending());
    kit.mm.leave();
    assert_eq!(
        pa_on(&kit.model, 2, VMID, a + 64 * PAGE, true),
        Ok(0x8010_0000)
    );
    assert!(pa_on(&kit.model, 2, VMID, a, false).is_err());
    // VM 1's maintenance left VM 2's guest alone, and the other way round.
    assert_eq!(pa_on(&kit.model, 3, vm2, b + PAGE, false), Ok(0x9000_1000));
    assert!(
        kit.model.violations().is_empty(),
        "{:?}",
        kit.model.violations()
    );
    assert!(kit.model.stale_entries().is_empty());
    assert!(kit.model.stale_walks().is_empty());
    assert!(kit.model.is_quiescent());
    // Both VMs torn down (switched away from every CPU first).
    kit.model.set_vttbr(2, None);
    kit.model.set_vttbr(3, None);
    drop(s2b);
    drop(s2a);
    assert!(
        kit.model.violations().is_empty(),
        "{:?}",
        kit.model.violations()
    );
}

/// The model's per-CPU store buffer: a descriptor CPU 0 wrote is published
/// by CPU 0's DSB only, not by another CPU's.
#[test]
fn a_store_is_published_by_its_own_cpus_dsb_only() {
    let mut kit = Kit::new_smp(16, false, NestPolicy::Flatten, CPUS);
    kit.mm.enter();
    kit.s2
        .map(Ipa(GIB), PAGE_SIZE, PhysAddr(0x8000_0000), ram(S2Perm::RW))
        .expect("map");
    kit.model.set_cpu_id(1);
    kit.model.dsb_ish();
    assert!(
        pa_on(&kit.model, 2, VMID, GIB, false).is_err(),
        "CPU 1's DSB published CPU 0's store"
    );
    kit.model.set_cpu_id(0);
    kit.mm.leave();
    assert_eq!(pa_on(&kit.model, 2, VMID, GIB, false), Ok(0x8000_0000));
    kit.ref_map(Ipa(GIB), PAGE_SIZE, PhysAddr(0x8000_0000), S2Perm::RW);
    kit.check(&(GIB..GIB + 2 * MIB)).expect("check");
}
