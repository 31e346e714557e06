//! The mm core as a library, on the host, through its public API only: a
//! page pool over page-aligned host memory, one guest's stage 2, a lazy
//! section, and what each operation did. Nothing is leaked and nothing is
//! `'static`: the memory, the context, the pool, the free hook and the
//! stage 2 all live on `main`'s stack and are dropped in reverse order.
//!
//! `cargo run --example library_use`
//!
//! `NoopArch` issues no barriers or TLBIs (there is no hardware here); a
//! hypervisor plugs in its own `MmArch`, and tests plug in the host model
//! (`--features model`).

use lazyhyp::mm::arch::{NoopArch, Vmid};
use lazyhyp::mm::lazy::MmCtx;
use lazyhyp::mm::pool::{PageBuffer, PagePool};
use lazyhyp::mm::stage2::{S2Attrs, S2Perm, Stage2};
use lazyhyp::mm::{BLOCK_2M, Ipa, PAGE_SIZE, PhysAddr};

const GIB: u64 = 1 << 30;

fn main() {
    // Table memory: 64 zeroed, 4 KiB-aligned pages from the global
    // allocator, freed when `memory` drops (after everything below).
    let mut memory = PageBuffer::new(64).expect("64 pages of host memory");
    println!(
        "table memory: {} pages at {:#x?}",
        memory.pages(),
        memory.range()
    );

    let mm = MmCtx::new(NoopArch);
    let pool = PagePool::with_buffer(&mut memory, &mm);
    // Detached tables go back to this pool once their TLB maintenance has
    // completed; the hook borrows the pool, the context borrows the hook.
    let free = |pages: &[PhysAddr]| {
        // SAFETY: the mm core hands over only table pages it detached and
        // whose invalidation has completed.
        unsafe { pool.free_many(pages) }
    };
    mm.set_free_hook(&free);

    let mut s2 = Stage2::new(Vmid(1), &mm, &pool).expect("a root table");
    println!(
        "stage 2 of VMID 1: root {:#x}, VTTBR {:#x}",
        s2.root(),
        s2.vttbr()
    );

    // 4 MiB of guest RAM at IPA 1 GiB, backed 2 MiB-aligned: two blocks.
    let backing: PhysAddr = PhysAddr(0x8000_0000);
    let c = s2
        .map(Ipa(GIB), 2 * BLOCK_2M, backing, S2Attrs::RAM)
        .expect("map");
    println!("map 4 MiB:                {c:?}");

    // One lazy section: the barriers and TLBIs are paid once, at `leave`.
    mm.enter();
    let c = s2.unmap(Ipa(GIB + 0x5000), PAGE_SIZE).expect("unmap");
    println!("unmap a page (splits):    {c:?}");
    let c = s2
        .protect(Ipa(GIB + BLOCK_2M as u64), BLOCK_2M, S2Perm::RO)
        .expect("protect");
    println!("write-protect a block:    {c:?}");
    let c = s2
        .remap(
            Ipa(GIB + 0x10_0000),
            16 * PAGE_SIZE,
            PhysAddr(0x9000_0000),
            S2Attrs::RAM,
        )
        .expect("remap");
    println!("remap 16 pages:           {c:?}");
    let c = s2.unmap(Ipa(GIB), BLOCK_2M).expect("unmap");
    println!("unmap the split 2 MiB:    {c:?}");
    mm.leave();

    for ipa in [GIB, GIB + 0x10_0000, GIB + BLOCK_2M as u64] {
        match s2.query(Ipa(ipa)) {
            Some(t) => println!(
                "IPA {ipa:#x} -> PA {:#x}, {:?}, level {}",
                t.pa, t.attrs.perm, t.level
            ),
            None => println!("IPA {ipa:#x} -> unmapped"),
        }
    }
    print!("counters:");
    mm.for_each_total(|name, value| {
        if value != 0 {
            print!(" {name}={value}");
        }
    });
    println!();
    println!(
        "pool: {} of {} pages free while the stage 2 lives",
        pool.free_pages(),
        pool.total_pages()
    );
    drop(s2);
    println!(
        "pool: {} of {} pages free after the stage 2 is dropped",
        pool.free_pages(),
        pool.total_pages()
    );
}
