//! The hypervisor's memory services to the guest: `HYP_MM_BATCH`, and in
//! test builds (feature `test-hypercalls`) the nesting-policy switch and the
//! freed-page probe.

use crate::guest_mm::{self, MAX_BATCH_OPS, MmOp};
use crate::mm::lazy::NestPolicy;
use crate::vcpu::{GuestRegs, smccc};

use super::{MM, POOL, VM, vectors};

/// `INVALID_PARAMETER` for the test calls.
const INVALID_PARAMETER: u64 = u64::from_ne_bytes((-2i64).to_ne_bytes());

/// Answers a memory-service call; results go to `x0` (status) and `x1`.
pub(super) fn mm_call(function: u32, regs: &mut GuestRegs) {
    let (a1, a2) = (regs.x[1], regs.x[2]);
    let (x0, x1) = match function {
        smccc::HYP_MM_BATCH => batch(a1, a2),
        smccc::HYP_TEST_SET_POLICY if cfg!(feature = "test-hypercalls") => set_policy(a1),
        smccc::HYP_TEST_FREED_PAGE_PROBE if cfg!(feature = "test-hypercalls") => {
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

/// `HYP_MM_BATCH(list_ipa, count)`: `x0` = 0 or an error code, `x1` = the
/// index of the operation the error is about.
fn batch(list_ipa: u64, count: u64) -> (u64, u64) {
    let mm = MM.get().expect("mm exists while the guest runs");
    let mut vm = VM.get().expect("guest exists").lock();
    let vm = &mut *vm;
    let mut ops = [MmOp::default(); MAX_BATCH_OPS];
    let read = guest_mm::read_ops(
        &vm.stage2,
        &vm.ram,
        list_ipa,
        count,
        |pa, buf| {
            // SAFETY: `read_ops` hands out only addresses inside the guest
            // RAM backing, which the EL2 map maps read-write; the guest does
            // not run while we read.
            unsafe { core::ptr::copy_nonoverlapping(pa as *const u8, buf.as_mut_ptr(), buf.len()) };
        },
        &mut ops,
    );
    let n = match read {
        Ok(n) => n,
        Err(e) => return (status(e.code()), 0),
    };
    match guest_mm::run_batch(&mut vm.stage2, mm, &vm.ram, &ops[..n]) {
        Ok(()) => (smccc::SUCCESS, 0),
        Err((i, e)) => (status(e.code()), i as u64),
    }
}

/// A signed SMCCC status in a register.
fn status(code: i64) -> u64 {
    u64::from_ne_bytes(code.to_ne_bytes())
}

fn set_policy(raw: u64) -> (u64, u64) {
    let Some(&policy) = usize::try_from(raw)
        .ok()
        .and_then(|i| NestPolicy::ALL.get(i))
    else {
        return (INVALID_PARAMETER, 0);
    };
    MM.get().expect("mm exists").set_policy(policy);
    log::info!("nesting policy: {}", policy.name());
    (smccc::SUCCESS, 0)
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
    let Ok(page) = pool.alloc_zeroed() else {
        return u64::MAX;
    };
    mm.enter();
    // SAFETY: the page was just allocated here and nothing refers to it.
    unsafe { pool.free(page) };
    let inside = vectors::probe_read(page).is_some();
    mm.leave();
    let after = vectors::probe_read(page).is_some();
    u64::from(inside) | (u64::from(after) << 1)
}
