//! AArch64 EL2: the hypervisor's main flow, its statics, exit and panic.
//!
//! Boot, in order:
//! 1. aarch64-rt's entry (before any Rust): boot page table (1 GiB identity
//!    blocks: device memory below RAM, normal memory for the first GiB of
//!    RAM), MMU and caches on, `.bss` zeroed, boot stack set.
//! 2. [`main`]: console; device tree (QEMU puts it at the start of RAM for an
//!    ELF kernel) for RAM, CPUs and bootargs; the payloads' extent; the
//!    memory layout; heap; the EL2 map, switched to with the MMU off
//!    ([`boot`]); the page pool and every VM with its image loaded
//!    ([`vmm`]); the GIC; the other CPUs through PSCI `CPU_ON` ([`smp`]).
//! 3. Every CPU then waits for its vCPU to be turned on and enters it
//!    ([`vmm`]); the guest's exits come back through [`vectors`] to
//!    [`traps`].
//!
//! The part files: [`boot`] (device tree, payloads, image loading),
//! [`vmm`] (VMs, vCPU start/park, VM end and reset), [`traps`] (exits,
//! injection, interrupts, the virtual GIC's world switch), [`services`]
//! (the memory hypercalls), [`smp`] (CPU bring-up, kicks).

mod boot;
pub mod cache;
pub mod console;
pub mod el2map;
pub mod gic;
pub mod mm_hw;
mod services;
pub mod smp;
pub mod sysreg;
mod traps;
pub mod vectors;
pub mod vgic_hw;
pub mod vm;
mod vmm;

#[allow(
    clippy::wildcard_imports,
    reason = "the parts of this module, split for size"
)]
use boot::*;
#[allow(
    clippy::wildcard_imports,
    reason = "the parts of this module, split for size"
)]
use traps::*;
#[allow(
    clippy::wildcard_imports,
    reason = "the parts of this module, split for size"
)]
use vmm::*;

use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::El2;
use aarch64_rt::InitialPagetable;
use alloc::boxed::Box;
use alloc::vec::Vec;
use buddy_system_allocator::LockedHeap;
use core::fmt::Write;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use spin::Once;
use spin::mutex::SpinMutex;

use crate::bootargs::BootArgs;
use crate::coherency::{CacheOps, Coherency};
use crate::esr::Esr;
use crate::layout::{Layout, LayoutInput};
use crate::mm::arch::Vmid;
use crate::mm::lazy::MmCtx;
use crate::mm::pool::{El2PageMap, PagePool};
use crate::mm::stage2::{S2Attrs, Stage2};
use crate::mm::{Ipa, PAGE_SIZE, PhysAddr, align_up};
use crate::vm::config::{VmKind, VmSpec};
use crate::vm::guest_mm::{FaultAction, GuestMemory};
use crate::vm::loader::GuestElf;
use crate::vm::psci::{PowerTable, Start};
use crate::vm::sysreg_emul::SysregAction;
use crate::vm::vcpu::{
    Exit, ExitCounters, GuestRegs, GuestReport, Injection, PsciCall, Stop, Trap, TrapReport, Vcpu,
};
use crate::vm::vgic::{CpuInterface, SysregTrap, Vgic, VgicConfig, qemu_virt};
use console::{PL011_BASE, println};
use mm_hw::HwMmArch;
use sysreg::{read_sysreg, write_sysreg};
use vgic_hw::HwCpuInterface;

/// IPA at which guest RAM starts (as RAM does on QEMU `virt`).
pub const GUEST_RAM_IPA: Ipa = Ipa(0x4000_0000);

/// Exit statuses of QEMU, as documented in `docs/run-contract.md`.
mod exit_code {
    pub const PASS: u32 = 0;
    pub const GUEST_FAILED: u32 = 1;
    pub const NO_REPORT: u32 = 2;
    pub const CRASH: u32 = 3;
    pub const SETUP: u32 = 4;
}

/// Boot page table for aarch64-rt, used until the EL2 map is built: a level-1
/// table of 1 GiB identity blocks with MAIR indices as in [`el2map::MAIR_EL2`].
const fn boot_pagetable() -> InitialPagetable {
    const VALID: usize = 1;
    const ATTR_DEVICE: usize = 0 << 2;
    const ATTR_NORMAL: usize = 1 << 2;
    const AP1_RES1: usize = 1 << 6;
    const SH_INNER: usize = 3 << 8;
    const AF: usize = 1 << 10;
    const XN: usize = 1 << 54;
    let mut table = [0; 512];
    // 0..1 GiB: GIC, PL011 and the other devices of `virt`.
    table[0] = VALID | ATTR_DEVICE | AP1_RES1 | AF | XN;
    // 1..2 GiB: the first GiB of RAM (image, device tree, payload).
    table[1] = (1 << 30) | VALID | ATTR_NORMAL | AP1_RES1 | SH_INNER | AF;
    InitialPagetable(table)
}

// The boot map is RWX (1 GiB blocks), so the boot SCTLR leaves WXN off; its
// TCR uses PS = 40 bits, enough for the first 2 GiB it maps.
aarch64_rt::initial_pagetable!(
    boot_pagetable(),
    el2map::MAIR_EL2,
    el2map::SCTLR_EL2 & !(1 << 19),
    el2map::tcr_el2(2)
);

/// The hypervisor's heap: a buddy allocator that also keeps, per CPU, the
/// high-water mark of bytes its own allocations hold (`heap_peak_bytes`),
/// so a test can show that no guest call makes the heap grow with what the
/// guest asks for, whatever another VM allocates on its own CPUs meanwhile.
/// (A block freed on another CPU than the one that allocated it lowers the
/// freeing CPU's count: the per-CPU figure is the net, an approximation
/// that holds for the per-operation allocations it is used for.)
struct TrackedHeap {
    heap: LockedHeap<32>,
    in_use: [core::sync::atomic::AtomicI64; smp::MAX_PCPUS],
}

// SAFETY: allocation and deallocation are the buddy allocator's (a sound
// `GlobalAlloc`); the wrapper only counts sizes on the side.
unsafe impl core::alloc::GlobalAlloc for TrackedHeap {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        let p = unsafe { self.heap.alloc(layout) };
        if !p.is_null() {
            let size = i64::try_from(layout.size()).unwrap_or(i64::MAX);
            let cpu = smp::this_cpu() % smp::MAX_PCPUS;
            let now = self.in_use[cpu].fetch_add(size, Ordering::Relaxed) + size;
            exits()
                .heap_peak_bytes
                .fetch_max(now.max(0).unsigned_abs(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: core::alloc::Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on unchanged.
        unsafe { self.heap.dealloc(ptr, layout) };
        let cpu = smp::this_cpu() % smp::MAX_PCPUS;
        let size = i64::try_from(layout.size()).unwrap_or(i64::MAX);
        self.in_use[cpu].fetch_sub(size, Ordering::Relaxed);
    }
}

#[global_allocator]
static HEAP: TrackedHeap = TrackedHeap {
    heap: LockedHeap::empty(),
    in_use: [const { core::sync::atomic::AtomicI64::new(0) }; smp::MAX_PCPUS],
};

/// The EL2 map; kept forever once active.
static EL2_MAP: Once<SpinMutex<IdMap<El2>>> = Once::new();
/// The page pool for translation tables.
static POOL: Once<PagePool<'static, HwMmArch>> = Once::new();
/// Guard mode's handle on the EL2 map.
static GUARD: Once<el2map::GuardPages> = Once::new();
/// The mm core's context: lazy state, policy, counters.
static MM: Once<MmCtx<HwMmArch>> = Once::new();
/// Guest exit counters, per physical CPU (a VM's are those of its CPUs).
static EXITS: [ExitCounters; smp::MAX_PCPUS] = [const { ExitCounters::new() }; smp::MAX_PCPUS];

/// The executing CPU's exit counters.
pub(crate) fn exits() -> &'static ExitCounters {
    &EXITS[smp::this_cpu() % smp::MAX_PCPUS]
}

/// Calls `f` with each counter's name (mm counters, then exit counters)
/// and its total over the CPUs `cpus` (`heap_peak_bytes`: the maximum).
pub(crate) fn for_each_counter(cpus: Range<usize>, mut f: impl FnMut(&'static str, u64)) {
    let mut names = [""; 128];
    let mut totals = [0u64; 128];
    let mut n = 0;
    for cpu in cpus.filter(|&c| c < smp::MAX_PCPUS) {
        let mut i = 0;
        let mut add = |name: &'static str, v: u64| {
            if i < names.len() {
                names[i] = name;
                totals[i] = if name == "heap_peak_bytes" {
                    totals[i].max(v)
                } else {
                    totals[i] + v
                };
                i += 1;
            }
        };
        if let Some(mm) = MM.get() {
            mm.cpu_counters(cpu).for_each(&mut add);
        }
        EXITS[cpu].for_each(&mut add);
        n = i;
    }
    for i in 0..n {
        f(names[i], totals[i]);
    }
}
/// What boot found (kept for VM resets, which reload a VM's image).
static BOOT: Once<BootInfo> = Once::new();
/// Interrupt lines of the physical distributor (for each CPU's setup).
static GIC_LINES: AtomicU32 = AtomicU32::new(0);
/// The CPU's ID registers, read once at boot.
static CPU_ID: Once<crate::el2_controls::CpuIdRegs> = Once::new();
/// How guest memory is kept coherent (FEAT_S2FWB or maintenance), chosen
/// once at boot.
static COHERENCY: Once<Coherency> = Once::new();

/// The coherency policy in force.
fn coherency() -> Coherency {
    COHERENCY.get().copied().unwrap_or_default()
}

/// Frees table pages whose TLB maintenance has completed (the mm core's
/// deferred frees).
static FREE_TABLES: fn(&[PhysAddr]) = |pages| {
    let pool = POOL.get().expect("tables exist only once the pool does");
    // SAFETY: the mm core hands over only table pages it detached and whose
    // invalidation has completed.
    unsafe { pool.free_many(pages) };
};

/// The hypervisor's main function, called by aarch64-rt's entry on the boot
/// stack with the boot map active.
///
/// # Panics
///
/// Never on a good boot: what it builds exists when it is used (a setup
/// failure is reported and ends the run instead).
pub fn main(_x0: u64, _x1: u64, _x2: u64, _x3: u64) -> ! {
    // The boot CPU is index 0; the EL2 vectors find its emergency stack
    // by it.
    write_sysreg!("tpidr_el2", 0);
    vectors::install();
    console::init(log::LevelFilter::Info);
    if sysreg::current_el() != 2 {
        setup_error(format_args!(
            "entered at EL{}, not EL2",
            sysreg::current_el()
        ));
    }
    let boot = BOOT.call_once(read_boot_info);
    let image = el2map::ImageLayout::get();
    let layout = Layout::new(&LayoutInput {
        ram: boot.ram.clone(),
        in_use: [
            ("device tree", boot.dtb.clone()),
            ("hypervisor image", image.whole()),
            ("test guest payload", boot.test_payload.clone()),
            ("Linux payload", boot.linux_payload.clone()),
            ("initrd", boot.initrd.clone()),
        ],
        guest_ram: boot.guest_ram,
    })
    .unwrap_or_else(|e| setup_error(format_args!("memory layout: {e}")));
    log::info!(
        "heap {:#x?}, pool {:#x?}, guest RAM backing {:#x?}",
        layout.heap,
        layout.pool,
        layout.guest_backing,
    );
    let pa_range = sysreg::pa_range();
    switch_to_el2_map(&image, boot, &layout, pa_range);
    let cpu = CPU_ID.call_once(sysreg::cpu_id_regs);
    log::debug!("CPU ID registers: {cpu:#x?}");
    let coherency = *COHERENCY.call_once(|| Coherency::choose(cpu.has_fwb(), boot.args.fwb));
    log::info!(
        "guest memory coherency: {} (FEAT_S2FWB {}, mm.fwb={})",
        coherency.name(),
        if cpu.has_fwb() { "present" } else { "absent" },
        u8::from(boot.args.fwb)
    );
    if !sysreg::has_gic_sysregs() {
        setup_error(format_args!(
            "the CPU has no GICv3 system register interface"
        ));
    }
    // Before any ICC_*/ICH_* access (building a VM reads ICH_VTR_EL2).
    gic::enable_sysregs();
    let ncpus = smp::cpu_count();
    let config = boot.args.vm_config();
    if config.cpus_needed() > ncpus {
        setup_error(format_args!(
            "the VMs need {} CPUs but the machine has {ncpus} (QEMU -smp)",
            config.cpus_needed()
        ));
    }
    let vtcr = vm::vtcr_el2(pa_range)
        .unwrap_or_else(|| setup_error(format_args!("PARange {pa_range} is below 40 bits")));
    build_vms(&layout, boot, vtcr);
    init_gic();
    let online = smp::start_secondaries();
    let needed = (1u32 << config.cpus_needed()) - 1;
    log::info!(
        "{} of {ncpus} CPUs online (mask {online:#x}); {} VMs",
        online.count_ones(),
        config.len()
    );
    if online & needed != needed {
        setup_error(format_args!(
            "CPUs {:#x} did not come up for the VMs",
            needed & !online
        ));
    }
    // Every VM's vCPU 0 starts; its CPU (idle, or this one below) picks
    // the start up.
    for vm in VMS.get().expect("built above") {
        kick_vcpus(vm, 1);
    }
    // SAFETY: this CPU's own stack; nothing on it is needed again
    // (everything `main` set up lives in statics).
    unsafe { vectors::reset_stack_and_call(stack_top(0), idle_entry) }
}

/// A secondary CPU's Rust entry (from [`smp`]), on its own stack with the
/// EL2 map on: its GIC redistributor and CPU interface, then the wait for
/// its vCPU.
pub(crate) fn secondary_main(cpu: usize) -> ! {
    gic::enable_sysregs();
    let gic = gic::Gic::init_cpu(GIC_LINES.load(Ordering::Relaxed))
        .unwrap_or_else(|e| setup_error(format_args!("CPU {cpu}: {e}")));
    gic.enable_private(qemu_virt::MAINTENANCE_PPI);
    gic.enable_private(qemu_virt::VTIMER_PPI);
    gic.enable_private(smp::KICK_SGI);
    log::debug!("CPU {cpu} (MPIDR {:#x}) up", smp::my_mpidr());
    idle()
}

/// `test.hypercalls=1`: the test-only hypercalls are answered.
pub(crate) static TEST_HYPERCALLS: AtomicBool = AtomicBool::new(false);

/// Brings up the physical GIC for the guest: the distributor, this CPU's
/// redistributor and CPU interface, and the interrupts the guest's virtual
/// GIC is backed by: the maintenance PPI, the virtual timer PPI, and the
/// UART's SPI (delivered hardware-backed to a guest that has the real UART;
/// otherwise the hypervisor's, which forwards received bytes to the guest's
/// emulated UART).
fn init_gic() {
    let lines = gic::Gic::init_distributor().unwrap_or_else(|e| setup_error(format_args!("{e}")));
    GIC_LINES.store(lines, Ordering::Relaxed);
    let gic = gic::Gic::init_cpu(lines).unwrap_or_else(|e| setup_error(format_args!("{e}")));
    gic.enable_private(qemu_virt::MAINTENANCE_PPI);
    gic.enable_private(qemu_virt::VTIMER_PPI);
    gic.enable_private(smp::KICK_SGI);
    // The real UART's interrupt goes to a CPU of the VM that takes console
    // input, so that taking it never makes another VM's CPU wait for that
    // VM's lock.
    let rx_cpu = rx_vm().map_or(0, |vm| vm.spec.first_cpu);
    gic.enable_spi(
        qemu_virt::UART_SPI,
        smp::mpidr_of(rx_cpu).unwrap_or_else(smp::my_mpidr),
    );
    if rx_vm().is_some_and(|vm| !vm.lock().uart_hw_irq) {
        console::set_rx_interrupt(true);
    }
    log::info!(
        "GIC: physical GICv3 owned at EL2; virtual GIC with {} list registers",
        (HwCpuInterface.vtr() & 0x1f) + 1
    );
}

fn print_stats() {
    let mut line = heapless_line();
    let mut add = |name: &str, value: u64| {
        let _ = write!(line, " {name}={value}");
    };
    for_each_counter(0..smp::MAX_PCPUS, &mut add);
    console::marker("STATS", format_args!("{}", line.as_str().trim_start()));
    // Each CPU's exits (so each vCPU's: one per CPU), one line a CPU.
    for cpu in 0..smp::cpu_count() {
        let mut line = heapless_line();
        let mut add = |name: &str, value: u64| {
            if name.starts_with("exits_") || name == "mmio_emulated" {
                let _ = write!(line, " {name}={value}");
            }
        };
        EXITS[cpu].for_each(&mut add);
        let vm = PCPU_VM[cpu].load(Ordering::Relaxed);
        if vm != usize::MAX {
            console::marker(
                "CPU",
                format_args!(
                    "cpu={cpu} vm={} vcpu={}{}",
                    vm + 1,
                    VMS.get()
                        .and_then(|v| v.get(vm))
                        .map_or(0, |v| cpu - v.spec.first_cpu),
                    line.as_str()
                ),
            );
        }
    }
}

/// A fixed-capacity string for the stats line, so printing it needs no heap
/// (it is also printed on the panic path).
fn heapless_line() -> LineBuf {
    LineBuf {
        buf: [0; 4096],
        len: 0,
    }
}

struct LineBuf {
    buf: [u8; 4096],
    len: usize,
}

impl LineBuf {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<stats line not UTF-8>")
    }
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self
            .len
            .checked_add(s.len())
            .filter(|&e| e <= self.buf.len())
            .ok_or(core::fmt::Error)?;
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Prints the counters and the exit marker with the run's status `code`
/// (docs/run-contract.md), then powers the machine off.
///
/// The status travels in the marker, which carries the run's token, not in
/// QEMU's exit status: QEMU's semihosting, the other way to set that, would
/// be open to the guest too (EL2 cannot trap `HLT` from EL1), so QEMU runs
/// without it and always exits 0 on `SYSTEM_OFF`.
fn exit(code: u32, reason: &str) -> ! {
    // Once: two VMs ending together (or a panic during the exit) must not
    // print two exit markers; a second caller waits for the power-off.
    static EXITING: AtomicBool = AtomicBool::new(false);
    if EXITING.swap(true, Ordering::AcqRel) {
        loop {
            smp::wait_for_interrupt();
        }
    }
    print_stats();
    console::marker("EXIT", format_args!("code={code} reason={reason}"));
    psci_system_off()
}

/// Reports a setup failure and ends QEMU with the setup status.
fn setup_error(args: core::fmt::Arguments<'_>) -> ! {
    console::print_in_panic(format_args!("lazyhyp: setup error: {args}\n"));
    exit(exit_code::SETUP, "setup-error")
}

/// PSCI `SYSTEM_OFF` to QEMU's firmware (conduit SMC at EL2).
pub fn psci_system_off() -> ! {
    let _ = smccc::psci::system_off::<smccc::Smc>();
    loop {
        // SAFETY: waiting for an interrupt that will not come; nothing else
        // is left to do.
        unsafe { core::arch::asm!("wfi", options(nomem, nostack, preserves_flags)) };
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::marker("PANIC", format_args!("{info}"));
    exit(exit_code::CRASH, "panic")
}
