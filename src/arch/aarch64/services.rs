//! The hypervisor's memory services to the guest (docs/hypercalls.md):
//! `HYP_STATS`, `HYP_MM_BATCH`, `HYP_MAP`, `HYP_UNMAP`, `HYP_PROTECT`, and in
//! test builds (feature `test-hypercalls`) the nesting-policy and
//! fault-around switches and the freed-page probe.

use crate::mm::lazy::NestPolicy;
use crate::mm::{Ipa, PhysAddr};
use crate::vm::guest_mm::{self, BatchError, MAX_BATCH_OPS, MmOp, kind};
use crate::vm::vcpu::{GuestRegs, smccc};

use super::{MM, POOL, current_vm, for_each_counter, vectors};

/// A signed SMCCC status in a register.
fn status(code: i64) -> u64 {
    u64::from_ne_bytes(code.to_ne_bytes())
}

/// `INVALID_PARAMETER` (-2).
fn invalid() -> (u64, u64) {
    (status(BatchError::BadRange.code()), 0)
}

/// Answers a memory-service call; results go to `x0` (status) and `x1`.
pub(super) fn mm_call(function: u32, regs: &mut GuestRegs) {
    let (a1, a2, a3) = (regs.x[1], regs.x[2], regs.x[3]);
    // Test calls exist in test builds, only with `test.hypercalls=1`, and
    // never for a Linux guest (they select a known-wrong policy, use the
    // shared table pool, swap VTTBR_EL2, and so on).
    let test = cfg!(feature = "test-hypercalls")
        && super::TEST_HYPERCALLS.load(core::sync::atomic::Ordering::Relaxed)
        && !current_vm().is_linux();
    let (x0, x1) = match function {
        smccc::HYP_STATS => stats(a1, a2),
        smccc::HYP_VM_INFO => {
            regs.x[2] = super::current_vcpu() as u64;
            (smccc::SUCCESS, current_vm().index as u64 + 1)
        }
        smccc::HYP_MM_BATCH => batch(a1, a2),
        smccc::HYP_MAP => single(MmOp {
            kind: kind::POPULATE,
            perm: 0,
            ipa: a1,
            size: a2,
            src_ipa: 0,
        }),
        smccc::HYP_UNMAP => single(MmOp {
            kind: kind::UNMAP,
            perm: 0,
            ipa: a1,
            size: a2,
            src_ipa: 0,
        }),
        smccc::HYP_PROTECT => match u32::try_from(a3) {
            Ok(perm) => single(MmOp {
                kind: kind::PROTECT,
                perm,
                ipa: a1,
                size: a2,
                src_ipa: 0,
            }),
            Err(_) => (status(BatchError::BadPermission.code()), 0),
        },
        smccc::HYP_TEST_SET_POLICY if test => set_policy(a1),
        smccc::HYP_TEST_SET_FAULT_AROUND if test => set_fault_around(a1),
        smccc::HYP_TEST_RUN_WORKLOAD if test => bench::run_workload(a1, a2),
        smccc::HYP_TEST_BENCH_MARK if test => bench::mark(a1, a2, a3),
        smccc::HYP_TEST_FORGET if test => {
            match current_vm().lock().mem.forget_given_back(Ipa(a1), a2) {
                Ok(()) => (smccc::SUCCESS, 0),
                Err(e) => (status(e.code()), 0),
            }
        }
        smccc::HYP_TEST_CHECKSUM if test => {
            regs.x[2] = core::ptr::from_ref(&CANARY) as u64;
            (smccc::SUCCESS, checksum())
        }
        smccc::HYP_TEST_FREED_PAGE_PROBE if test => {
            if POOL.get().is_some_and(crate::mm::pool::PagePool::guarded) {
                (smccc::SUCCESS, freed_page_probe())
            } else {
                // Without guard mode a free page stays mapped: nothing to probe.
                (smccc::NOT_SUPPORTED, 0)
            }
        }
        _ => (smccc::NOT_SUPPORTED, 0),
    };
    regs.x[0] = x0;
    regs.x[1] = x1;
}

/// A page of the hypervisor's own memory with known contents: a target for
/// a guest that tries to make a device (the GIC's LPI tables) write to
/// hypervisor memory; [`checksum`] covers it.
#[repr(C, align(4096))]
struct Canary([u8; 4096]);
static CANARY: Canary = Canary([0xa5; 4096]);

/// `HYP_TEST_CHECKSUM`: FNV-1a over the hypervisor's text and read-only
/// data (which hold the canary).
fn checksum() -> u64 {
    let image = super::el2map::ImageLayout::get();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for range in [image.text, image.rodata] {
        // SAFETY: the hypervisor's own text and read-only data, mapped
        // readable in the EL2 map and never written.
        let bytes = unsafe {
            core::slice::from_raw_parts(
                range.start.0 as *const u8,
                range.end.offset_from(range.start),
            )
        };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Copies one guest-memory slice out of the RAM backing (after making what
/// a guest with its caches off wrote visible to the cacheable read).
fn read_backing(pa: PhysAddr, buf: &mut [u8]) {
    super::coherency().before_hyp_read(&super::cache::HwCacheOps, pa, buf.len());
    // SAFETY: `guest_mm` hands out only addresses inside the guest RAM
    // backing, which the EL2 map maps read-write; the guest does not run
    // while we copy.
    unsafe { core::ptr::copy_nonoverlapping(pa.0 as *const u8, buf.as_mut_ptr(), buf.len()) };
}

/// Copies one slice into the guest RAM backing (and makes it what a guest
/// with its caches off reads).
fn write_backing(pa: PhysAddr, bytes: &[u8]) {
    super::coherency().before_hyp_write(&super::cache::HwCacheOps, pa, bytes.len());
    // SAFETY: as for `read_backing`, for writes.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), pa.0 as *mut u8, bytes.len()) };
    super::coherency().after_hyp_write(&super::cache::HwCacheOps, pa, bytes.len());
}

/// `HYP_MM_BATCH(list_ipa, count)`: `x0` = 0 or an error code, `x1` = the
/// index of the operation the error is about.
fn batch(list_ipa: u64, count: u64) -> (u64, u64) {
    let mut ops = [MmOp::default(); MAX_BATCH_OPS];
    let n = {
        let vm = current_vm().lock();
        match guest_mm::read_ops(
            &vm.stage2,
            &vm.mem.ram,
            Ipa(list_ipa),
            count,
            read_backing,
            &mut ops,
        ) {
            Ok(n) => n,
            Err(e) => return (status(e.code()), 0),
        }
    };
    run(&ops[..n])
}

fn single(op: MmOp) -> (u64, u64) {
    run(core::slice::from_ref(&op))
}

fn run(ops: &[MmOp]) -> (u64, u64) {
    let mm = MM.get().expect("mm exists while the guest runs");
    let mut guard = current_vm().lock();
    let vm = &mut *guard;
    let result = vm.mem.run_batch(&mut vm.stage2, mm, ops);
    // Executable content that moved (also after a failure: the operations
    // before it took effect). Memory newly mapped was cleaned run by run
    // through the GuestMemory hook.
    let done = match result {
        Ok(()) => ops.len(),
        Err((i, _)) => i + 1,
    };
    if ops[..done.min(ops.len())]
        .iter()
        .any(|op| op.kind == kind::REMAP_ALIAS)
    {
        super::coherency().after_exec_remap(&super::cache::HwCacheOps);
    }
    match result {
        Ok(()) => (smccc::SUCCESS, 0),
        Err((i, e)) => (status(e.code()), i as u64),
    }
}

/// `HYP_STATS(buf_ipa, buf_len)`: writes as many counters as fit (u64
/// little-endian, in the order of docs/hypercalls.md) and returns how many in
/// `x1`.
fn stats(buf_ipa: u64, buf_len: u64) -> (u64, u64) {
    let mut values = [0u64; 64];
    let mut n = 0;
    let mut push = |_: &'static str, v: u64| {
        if n < values.len() {
            values[n] = v;
            n += 1;
        }
    };
    // This VM's CPUs only: its counters are its own.
    for_each_counter(current_vm().cpus(), &mut push);
    // The buffer holds whole counters (docs/hypercalls.md).
    let Ok(len) = usize::try_from(buf_len) else {
        return invalid();
    };
    if !len.is_multiple_of(8) {
        return invalid();
    }
    let count = (len / 8).min(n);
    if count == 0 {
        return invalid();
    }
    let mut bytes = [0u8; 64 * 8];
    for (chunk, v) in bytes.chunks_exact_mut(8).zip(&values[..count]) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    let vm = current_vm().lock();
    match guest_mm::copy_to_guest(
        &vm.stage2,
        &vm.mem.ram,
        Ipa(buf_ipa),
        &bytes[..count * 8],
        write_backing,
    ) {
        Ok(()) => (smccc::SUCCESS, count as u64),
        Err(e) => (status(e.code()), 0),
    }
}

fn set_policy(raw: u64) -> (u64, u64) {
    let Some(&policy) = usize::try_from(raw)
        .ok()
        .and_then(|i| NestPolicy::ALL.get(i))
    else {
        return invalid();
    };
    // This VM's CPUs only, under its lock: none of them is in a section,
    // and other VMs' CPUs keep their own policy.
    let vm = current_vm();
    let _guard = vm.lock();
    MM.get()
        .expect("mm exists")
        .set_policy_on(vm.cpus(), policy);
    log::info!("nesting policy: {}", policy.name());
    (smccc::SUCCESS, 0)
}

fn set_fault_around(bytes: u64) -> (u64, u64) {
    match usize::try_from(bytes) {
        Ok(b) if b <= 1 << 30 && (b == 0 || b.is_power_of_two()) => {
            current_vm().lock().mem.set_fault_around(b);
            (smccc::SUCCESS, 0)
        }
        _ => invalid(),
    }
}

/// Allocates a table page (so the hypervisor has just written it, and the
/// TLB holds its translation), then frees it inside a lazy section and
/// probes whether the hypervisor can still read it: bit 0 = still readable
/// inside the section, bit 1 = still readable after the section ended.
/// Under a correct policy the free's unmapping is complete when `free`
/// returns, so both bits are 0 (with guard mode on).
fn freed_page_probe() -> u64 {
    let mm = MM.get().expect("mm exists");
    let pool = POOL.get().expect("pool exists");
    // No other CPU may take a page from the shared pool meanwhile: it could
    // be the freed one, mapped again in guard mode, and the probe would
    // read it. Every VM's lock is held for the probe, in VM order (a CPU
    // never holds two VM locks otherwise, and this one holds none here);
    // the pool gives guests pages only under their VM's lock.
    let _all_vms: alloc::vec::Vec<_> = super::VMS
        .get()
        .expect("VMs exist")
        .iter()
        .map(super::Vm::lock)
        .collect();
    let Ok(page) = pool.alloc_zeroed() else {
        return u64::MAX;
    };
    mm.enter();
    // SAFETY: the page was just allocated here and nothing refers to it.
    unsafe { pool.free(page) };
    let inside = vectors::probe_read(page.0).is_some();
    mm.leave();
    let after = vectors::probe_read(page.0).is_some();
    u64::from(inside) | (u64::from(after) << 1)
}

/// Benchmarks (test builds): the scratch stage 2 the workloads run on, and
/// the counter snapshot a guest-driven phase started from.
pub(super) mod bench {
    use spin::Once;
    use spin::mutex::SpinMutex;

    use crate::mm::PhysAddr;
    use crate::mm::arch::Vmid;
    use crate::mm::lazy::NestPolicy;
    use crate::mm::stage2::Stage2;
    use crate::vm::vcpu::smccc;
    use crate::workloads::{self, Mode, Workload};

    use super::super::mm_hw::HwMmArch;
    use super::super::sysreg::{read_sysreg, write_sysreg};
    use super::super::{MM, POOL, current_vm, for_each_counter};
    use super::{invalid, status};

    /// A stage 2 no guest ever runs on: workloads may map any PA. Its VMID
    /// is the last 8-bit one, which no VM gets (VMs have 1..=MAX_VMS).
    const SCRATCH_VMID: Vmid = Vmid(0xff);
    /// The scratch stage 2.
    static SCRATCH: Once<SpinMutex<Stage2<'static, HwMmArch>>> = Once::new();
    /// Physical addresses the scratch tables point at: never accessed.
    const SCRATCH_PA: PhysAddr = PhysAddr(0x40_0020_0000);

    /// Counter totals (mm, then exits) and the counter value of a moment.
    struct Snapshot {
        values: [u64; 64],
        ticks: u64,
    }

    static STARTED: SpinMutex<Option<(Snapshot, &'static str, Mode)>> = SpinMutex::new(None);

    fn snapshot() -> Snapshot {
        let mut values = [0; 64];
        let mut i = 0;
        let mut push = |_: &'static str, v: u64| {
            values[i] = v;
            i += 1;
        };
        for_each_counter(current_vm().cpus(), &mut push);
        Snapshot {
            values,
            ticks: read_sysreg!("cntpct_el0"),
        }
    }

    /// Prints the `LAZYHYP-BENCH` line: the counters' change from `from` to
    /// `to`.
    fn report(from: &Snapshot, to: &Snapshot, workload: &str, mode: Mode, correct: bool) {
        let mut names = [""; 64];
        let mut i = 0;
        let mut name = |n: &'static str, _: u64| {
            names[i] = n;
            i += 1;
        };
        for_each_counter(current_vm().cpus(), &mut name);
        let delta = |key: &str| {
            names[..i]
                .iter()
                .position(|n| *n == key)
                .map_or(0, |j| to.values[j] - from.values[j])
        };
        let exits: u64 = names[..i]
            .iter()
            .enumerate()
            .filter(|(_, n)| n.starts_with("exits_"))
            .map(|(j, _)| to.values[j] - from.values[j])
            .sum();
        let freq = read_sysreg!("cntfrq_el0").max(1);
        let micros = (u128::from(to.ticks - from.ticks) * 1_000_000 / u128::from(freq)) as u64;
        super::super::console::marker(
            "BENCH",
            format_args!(
                "workload={workload} policy={} pte_writes={} dsb_ishst={} dsb_ish={} isb={} \
             tlbi_ipas2e1is={} tlbi_ripas2e1is={} tlbi_vmalle1is={} tlbi_vmalls12e1is={} tlbi_vae2is={} \
             tlbi_alle2is={} tlbi_pages={} bbm={} flattened={} demand_faults={} cmo_lines={} \
             icache_invalidations={} exits={exits} wall_us={micros} correct={correct}",
                mode.name(),
                delta("pte_writes"),
                delta("dsb_ishst"),
                delta("dsb_ish"),
                delta("isb"),
                delta("tlbi_ipas2e1is"),
                delta("tlbi_ripas2e1is"),
                delta("tlbi_vmalle1is"),
                delta("tlbi_vmalls12e1is"),
                delta("tlbi_vae2is"),
                delta("tlbi_alle2is"),
                delta("tlbi_pages"),
                delta("bbm"),
                delta("flattenings"),
                delta("demand_faults"),
                delta("cmo_lines"),
                delta("icache_invalidations"),
            ),
        );
    }

    fn mode_of(raw: u64) -> Option<Mode> {
        usize::try_from(raw)
            .ok()
            .and_then(|i| Mode::ALL.get(i))
            .copied()
    }

    /// Sets `mode` on the calling VM's CPUs only, under its lock (none of
    /// them is in a section; other VMs keep theirs).
    fn apply(mode: Mode) {
        let mm = MM.get().expect("mm exists");
        let vm = current_vm();
        let _guard = vm.lock();
        match mode {
            Mode::Eager => mm.set_lazy_enabled_on(vm.cpus(), false),
            Mode::Lazy(p) => {
                mm.set_lazy_enabled_on(vm.cpus(), true);
                mm.set_policy_on(vm.cpus(), p);
            }
        }
    }

    fn restore() {
        let mm = MM.get().expect("mm exists");
        let vm = current_vm();
        let _guard = vm.lock();
        mm.set_lazy_enabled_on(vm.cpus(), true);
        mm.set_policy_on(vm.cpus(), NestPolicy::Flatten);
    }

    /// `HYP_TEST_RUN_WORKLOAD(workload, mode)`.
    pub(in super::super) fn run_workload(w: u64, mode: u64) -> (u64, u64) {
        let (Some(&w), Some(mode)) = (
            usize::try_from(w).ok().and_then(|i| Workload::ALL.get(i)),
            mode_of(mode),
        ) else {
            return invalid();
        };
        let mm = MM.get().expect("mm exists");
        let pool = POOL.get().expect("pool exists");
        let Ok(scratch) =
            SCRATCH.try_call_once(|| Stage2::new(SCRATCH_VMID, mm, pool).map(SpinMutex::new))
        else {
            return (status(-4), 0);
        };
        let mut s2 = scratch.lock();
        let guest_vttbr = current_vm().lock().stage2.vttbr();
        // The stage-2 TLBIs act on the VMID in VTTBR_EL2: install the
        // scratch tables while the workload runs (no guest runs meanwhile).
        write_sysreg!("vttbr_el2", s2.vttbr());
        // SAFETY: a context synchronization barrier after the VTTBR write.
        unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
        // The counters at the start and the end of the measured phase.
        let mut start = None;
        let mut end = None;
        let r = workloads::run(w, mode, &mut s2, mm, SCRATCH_PA, &mut |begin| {
            if begin {
                start = Some(snapshot());
            } else {
                end = Some(snapshot());
            }
        });
        write_sysreg!("vttbr_el2", guest_vttbr);
        // SAFETY: as above.
        unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
        restore();
        let correct = r == Ok(true);
        if let (Some(from), Some(to)) = (start, end) {
            report(&from, &to, w.name(), mode, correct);
        }
        (smccc::SUCCESS, u64::from(correct))
    }

    /// `HYP_TEST_BENCH_MARK(0, mode, workload)` / `(1, _, correct)`.
    pub(in super::super) fn mark(which: u64, arg: u64, arg2: u64) -> (u64, u64) {
        match which {
            0 => {
                let Some(mode) = mode_of(arg) else {
                    return invalid();
                };
                let name = match arg2 {
                    0 => "W5-fa-off",
                    1 => "W5-fa-on",
                    _ => return invalid(),
                };
                apply(mode);
                STARTED.lock().replace((snapshot(), name, mode));
                (smccc::SUCCESS, 0)
            }
            1 => {
                let Some((from, name, mode)) = STARTED.lock().take() else {
                    return invalid();
                };
                report(&from, &snapshot(), name, mode, arg2 == 1);
                restore();
                (smccc::SUCCESS, 0)
            }
            _ => invalid(),
        }
    }
}
