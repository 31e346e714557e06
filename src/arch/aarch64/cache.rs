//! Data cache maintenance by address.

/// Cache line size of the smallest data cache, from `CTR_EL0.DminLine`.
fn dcache_line() -> usize {
    let ctr = super::sysreg::read_sysreg!("ctr_el0");
    4 << ((ctr >> 16) & 0xf)
}

/// Cleans and invalidates `[start, start + len)` to the point of coherency,
/// then invalidates the instruction caches: memory the hypervisor wrote
/// through its cacheable map becomes what a non-cacheable observer (a guest
/// running with its MMU off) reads and executes.
pub fn clean_invalidate_to_poc_and_sync_icache(start: usize, len: usize) {
    let line = dcache_line();
    let mut addr = start & !(line - 1);
    while addr < start + len {
        // SAFETY: clean+invalidate by VA only moves data between cache and
        // memory; the range is mapped in the EL2 map.
        unsafe {
            core::arch::asm!("dc civac, {0}", in(reg) addr, options(nostack, preserves_flags));
        }
        addr += line;
    }
    // SAFETY: barriers and I-cache invalidation change no state Rust sees.
    unsafe {
        core::arch::asm!(
            // The cleaning completes before the I-cache invalidation.
            "dsb ish",
            "ic ialluis",
            // The invalidation completes, and this PE refetches, before any
            // later instruction (such as the ERET into the guest).
            "dsb ish",
            "isb",
            options(nostack, preserves_flags),
        );
    }
}
