//! AArch64 EL2: boot, the hypervisor's main flow, trap entry points, panic.
//!
//! Boot, in order:
//! 1. aarch64-rt's entry (before any Rust): boot page table (1 GiB identity
//!    blocks: device memory below RAM, normal memory for the first GiB of
//!    RAM), MMU and caches on, `.bss` zeroed, boot stack set.
//! 2. [`main`]: console; device tree (QEMU puts it at the start of RAM for an
//!    ELF kernel) for RAM and bootargs; the guest payload's extent; the
//!    memory layout; heap; the EL2 map, switched to with the MMU off; the
//!    page pool; the guest's stage 2; the guest image copied in; EL2 controls
//!    for the guest; `ERET` into it.

pub mod cache;
pub mod console;
pub mod el2map;
pub mod gic;
pub mod mm_hw;
mod services;
pub mod smp;
pub mod sysreg;
pub mod vectors;
pub mod vgic_hw;
pub mod vm;

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
use crate::guest_mm::{FaultAction, GuestMemory};
use crate::layout::{Layout, LayoutInput};
use crate::loader::GuestElf;
use crate::mm::arch::Vmid;
use crate::mm::lazy::MmCtx;
use crate::mm::pool::{El2PageMap, PagePool};
use crate::mm::stage2::{S2Attrs, Stage2};
use crate::mm::{PAGE_SIZE, PhysAddr, align_up};
use crate::sysreg_emul::SysregAction;
use crate::vcpu::{
    Exit, ExitCounters, GuestRegs, GuestReport, Injection, PsciCall, Stop, Trap, TrapReport, Vcpu,
};
use crate::vgic::{CpuInterface, SysregTrap, Vgic, VgicConfig, qemu_virt};
use crate::vm::config::{VmKind, VmSpec};
use crate::vm::psci::{PowerTable, Start};
use console::{PL011_BASE, println};
use mm_hw::HwMmArch;
use sysreg::{read_sysreg, write_sysreg};
use vgic_hw::HwCpuInterface;

/// IPA at which guest RAM starts (as RAM does on QEMU `virt`).
pub const GUEST_RAM_IPA: u64 = 0x4000_0000;

/// Largest guest payload accepted.
const MAX_PAYLOAD: usize = 64 << 20;

/// Where QEMU places the device tree for an ELF kernel: the start of RAM.
const DTB_ADDR: usize = 0x4000_0000;

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

/// The hypervisor's heap: a buddy allocator that also keeps the high-water
/// mark of bytes in use (`heap_peak_bytes`), so a test can show that no
/// guest call makes the heap grow with what the guest asks for.
struct TrackedHeap {
    heap: LockedHeap<32>,
    in_use: AtomicUsize,
}

// SAFETY: allocation and deallocation are the buddy allocator's (a sound
// `GlobalAlloc`); the wrapper only counts sizes on the side.
unsafe impl core::alloc::GlobalAlloc for TrackedHeap {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        let p = unsafe { self.heap.alloc(layout) };
        if !p.is_null() {
            let now = self.in_use.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            exits()
                .heap_peak_bytes
                .fetch_max(now as u64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: core::alloc::Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on unchanged.
        unsafe { self.heap.dealloc(ptr, layout) };
        self.in_use.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static HEAP: TrackedHeap = TrackedHeap {
    heap: LockedHeap::empty(),
    in_use: AtomicUsize::new(0),
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
/// The VMs (VM 1 first): the only VM state outside the VMs themselves.
static VMS: Once<Vec<Vm>> = Once::new();
/// The VM (index in [`VMS`]) each physical CPU serves (`usize::MAX`:
/// none), fixed at boot (static partitioning).
static PCPU_VM: [AtomicUsize; smp::MAX_PCPUS] =
    [const { AtomicUsize::new(usize::MAX) }; smp::MAX_PCPUS];
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

/// A VM: its shared state under one lock, its vCPUs' power states, and
/// what each of its physical CPUs needs to enter it.
pub(crate) struct Vm {
    /// Index in [`VMS`] (the VM's name is `vm<index + 1>`).
    index: usize,
    /// What it runs, where, with how much RAM.
    spec: VmSpec,
    /// Stage 2, memory, devices, virtual GIC: the VM lock. Every exit that
    /// touches them takes it; stage-2 changes are serialised by it (the
    /// locking design: docs/lazy-mmu.md, "SMP").
    state: SpinMutex<VmState>,
    /// The vCPUs' PSCI power states (never held with `state`).
    power: SpinMutex<PowerTable>,
    /// `VTTBR_EL2` (its VMID and root), `VTCR_EL2` and `HCR_EL2.FWB`.
    vttbr: u64,
    vtcr: u64,
    fwb: bool,
    /// Guest RAM's IPA range (where `CPU_ON` entry points may be).
    ram_ipa: Range<u64>,
    /// Where the VM's RAM lives (its own slice of the guest backing).
    backing: Range<PhysAddr>,
    /// Where each vCPU's previous exit sent it with an injected abort
    /// (`u64::MAX`: it did not).
    last_vector: Vec<AtomicU64>,
    /// Set while the VM stops or resets: its vCPUs leave for the idle loop
    /// at their next exit (each is kicked).
    stopping: AtomicBool,
    /// Its vCPUs in a guest or a trap handler (not parked).
    running: AtomicU32,
    /// The VM ended: (status as in `exit_code`, reason).
    ended: SpinMutex<Option<(u32, &'static str)>>,
    /// Times it was reset (PSCI `SYSTEM_RESET`).
    resets: AtomicU32,
}

impl Vm {
    /// Takes the VM lock.
    pub(crate) fn lock(&self) -> spin::mutex::SpinMutexGuard<'_, VmState> {
        if let Some(guard) = self.state.try_lock() {
            crate::mm::counters::inc(&exits().vm_lock_uncontended);
            return guard;
        }
        crate::mm::counters::inc(&exits().vm_lock_contended);
        self.state.lock()
    }

    /// Whether it runs Linux.
    pub(crate) fn is_linux(&self) -> bool {
        self.spec.kind == VmKind::Linux
    }

    /// Its physical CPUs.
    pub(crate) fn cpus(&self) -> Range<usize> {
        self.spec.cpus()
    }

    /// The physical CPU of `vcpu`.
    fn pcpu(&self, vcpu: usize) -> usize {
        self.spec.first_cpu + vcpu
    }
}

/// A VM's state under its lock.
pub(crate) struct VmState {
    /// The guest's stage 2.
    stage2: Stage2<'static, HwMmArch>,
    /// The guest's RAM: backing, given-back pages, fault-around.
    mem: GuestMemory,
    /// The emulated PL011 (`None` with `guest.uart=passthrough`).
    uart: Option<crate::mmio::Pl011<Box<dyn FnMut(u8) + Send>>>,
    /// The virtual GIC: the guest's distributor and redistributors are
    /// emulated here, its interrupts delivered through list registers.
    vgic: Vgic,
    /// The real PL011 is the guest's (`guest.uart=passthrough`): its SPI is
    /// delivered hardware-backed.
    uart_hw_irq: bool,
    /// The emulated UART's receive FIFO was full: the real UART's receive
    /// interrupt is off until the guest makes room.
    rx_paused: bool,
    /// The test guest's report, once it made it.
    report: Option<GuestReport>,
}

/// The VM CPU `cpu` serves, if any.
fn vm_of(cpu: usize) -> Option<&'static Vm> {
    let index = PCPU_VM.get(cpu)?.load(Ordering::Relaxed);
    VMS.get()?.get(index)
}

/// The VM the executing CPU runs.
pub(crate) fn current_vm() -> &'static Vm {
    vm_of(smp::this_cpu()).expect("a guest exists while one runs")
}

/// The vCPU (index in its VM) the executing CPU runs.
fn current_vcpu() -> usize {
    smp::this_cpu() - current_vm().spec.first_cpu
}

/// The VM that receives what is typed on the console (the real UART's
/// input): the Linux VM if there is one, else VM 1.
fn rx_vm() -> Option<&'static Vm> {
    let vms = VMS.get()?;
    vms.iter().find(|vm| vm.is_linux()).or_else(|| vms.first())
}

/// Kicks the physical CPUs of the vCPUs in `mask` (bit i = vCPU i), other
/// than the executing one: each exits its guest (or wakes from its wait)
/// and loads what is now pending for it.
fn kick_vcpus(vm: &Vm, mask: u128) {
    for vcpu in (0..vm.spec.vcpus).filter(|v| mask & (1 << v) != 0) {
        smp::kick(vm.pcpu(vcpu));
    }
}

/// Top of CPU `cpu`'s EL2 stack.
fn stack_top(cpu: usize) -> usize {
    if cpu == 0 {
        el2map::ImageLayout::get().boot_stack.end
    } else {
        smp::secondary_stacks()[cpu - 1].end
    }
}

/// The hypervisor's main function, called by aarch64-rt's entry on the boot
/// stack with the boot map active.
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
    switch_to_el2_map(&image, &boot, &layout, pa_range);
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
    build_vms(&layout, &boot, vtcr);
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

extern "C" fn idle_entry() -> ! {
    idle()
}

/// A physical CPU without a running vCPU: handles its interrupts and waits
/// until its vCPU is turned on (PSCI `CPU_ON`, the VM's start or reset).
fn idle() -> ! {
    let cpu = smp::this_cpu();
    loop {
        for _ in 0..64 {
            let intid = gic::acknowledge();
            if intid >= gic::SPURIOUS {
                break;
            }
            gic::priority_drop(intid);
            match intid {
                // Bytes for the emulated UART of the VM that gets console
                // input (the boot CPU takes the real UART's interrupt).
                qemu_virt::UART_SPI => {
                    gic::deactivate(intid);
                    if let Some(vm) = rx_vm() {
                        let mut state = vm.lock();
                        forward_rx(&mut state);
                        let kicks = state.vgic.take_kicks();
                        drop(state);
                        kick_vcpus(vm, kicks);
                    }
                }
                // A vCPU that was turned off left its timer running: it
                // stops (its next start resets it anyway).
                qemu_virt::VTIMER_PPI => {
                    write_sysreg!("cntv_ctl_el0", 0);
                    gic::deactivate(intid);
                }
                _ => gic::deactivate(intid),
            }
        }
        if let Some(vm) = vm_of(cpu)
            && !vm.stopping.load(Ordering::Acquire)
        {
            let vcpu = cpu - vm.spec.first_cpu;
            // The power lock is released before the start (which never
            // returns).
            let start = vm.power.lock().take_start(vcpu);
            if let Some(start) = start {
                start_vcpu(vm, vcpu, start);
            }
        }
        smp::wait_for_interrupt();
    }
}

/// Starts `vcpu` of `vm` on this CPU at `start`: the EL2 controls and
/// stage 2 of the VM, the vCPU's virtual MPIDR and GIC state, EL1 at reset.
fn start_vcpu(vm: &'static Vm, vcpu: usize, start: Start) -> ! {
    let cpu = smp::this_cpu();
    vm.running.fetch_add(1, Ordering::AcqRel);
    vm.last_vector[vcpu].store(u64::MAX, Ordering::Relaxed);
    // SAFETY: the VM's stage 2 lives as long as the VM (forever), maps only
    // its RAM backing and devices; vtcr describes it; fwb matches how its
    // normal memory is encoded.
    unsafe {
        vm::configure(
            vm.vttbr,
            vm.vtcr,
            CPU_ID.get().expect("read at boot"),
            Vgic::mpidr(vcpu),
            vm.fwb,
        );
    }
    // The vCPU's timer starts disabled (its EL1 state is at reset).
    write_sysreg!("cntv_ctl_el0", 0);
    // The virtual CPU interface starts from the vCPU's state, not from what
    // reset (or the previous vCPU) left in ICH_VMCR_EL2 and the
    // active-priority registers.
    vm.lock().vgic.vcpu_load(vcpu, &mut HwCpuInterface);
    let mut regs = GuestRegs::default();
    regs.x[..3].copy_from_slice(&start.args);
    // x3: how many times the VM was reset before this start.
    regs.x[3] = u64::from(vm.resets.load(Ordering::Relaxed));
    regs.elr = start.entry;
    regs.spsr = SPSR_EL1H_MASKED;
    log::info!(
        "CPU {cpu}: vm{} vCPU {vcpu} enters the guest at {:#x}",
        vm.index + 1,
        start.entry
    );
    vgic_enter();
    debug_assert!(
        MM.get().is_none_or(MmCtx::nothing_pending),
        "entering the guest with mm work pending"
    );
    // SAFETY: stage 2, EL2 controls and vectors are set up; nothing on this
    // CPU's stack is needed again.
    unsafe { vectors::enter_guest(&regs, stack_top(cpu)) }
}

/// The executing vCPU stops running (PSCI `CPU_OFF`, or its VM stops or
/// resets): its physical CPU goes back to waiting, on a fresh stack.
fn park() -> ! {
    let cpu = smp::this_cpu();
    let vm = current_vm();
    let vcpu = current_vcpu();
    vm.lock().vgic.vcpu_put(vcpu, &HwCpuInterface);
    write_sysreg!("cntv_ctl_el0", 0);
    vm.running.fetch_sub(1, Ordering::AcqRel);
    // SAFETY: this CPU's own stack; the trap frame on it belongs to a vCPU
    // that no longer runs.
    unsafe { vectors::reset_stack_and_call(stack_top(cpu), idle_entry) }
}

/// After an exit: if the vCPU's VM is stopping, the vCPU parks.
fn park_if_stopping() {
    if current_vm().stopping.load(Ordering::Acquire) {
        park();
    }
}

/// Asks every other vCPU of `vm` to park (they exit at the kick and see
/// `stopping`), and waits, bounded, until they did. Returns whether they
/// all parked.
fn stop_other_vcpus(vm: &Vm) -> bool {
    vm.stopping.store(true, Ordering::Release);
    // No vCPU starts from here on (an idle CPU checks `stopping` first,
    // and finds nothing pending).
    vm.power.lock().power_off_all();
    kick_vcpus(vm, u128::MAX);
    let freq = read_sysreg!("cntfrq_el0");
    let start = read_sysreg!("cntpct_el0");
    // This vCPU is the one left running.
    while vm.running.load(Ordering::Acquire) > 1 {
        if read_sysreg!("cntpct_el0").wrapping_sub(start) > freq {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// `vm` ended (`status` as in [`exit_code`], `reason`): its verdict is
/// printed, its vCPUs stop; when every VM has ended, so does the run
/// (with the worst status). The calling vCPU (of `vm`) parks.
fn end_vm(vm: &'static Vm, status: u32, reason: &'static str) -> ! {
    console::flush(vm.index);
    {
        let mut ended = vm.ended.lock();
        if ended.is_none() {
            *ended = Some((status, reason));
            let report = vm.lock().report;
            let (passed, failed) = report.map_or((0, 0), |r| (r.passed, r.failed));
            console::marker(
                "VM",
                format_args!(
                    "vm={} kind={} status={status} reason={reason} passed={passed} failed={failed} resets={}",
                    vm.index + 1,
                    vm.spec.kind.name(),
                    vm.resets.load(Ordering::Relaxed)
                ),
            );
        }
    }
    let all = VMS.get().expect("VMs exist");
    let worst = all
        .iter()
        .map(|v| *v.ended.lock())
        .try_fold((0, reason), |(w, r), e| {
            e.map(|(s, why)| if s > w { (s, why) } else { (w, r) })
        });
    if let Some((worst, why)) = worst {
        // Every VM has ended: the run's verdict. For one test VM the
        // report is also printed as the run's result.
        if all.len() == 1
            && let Some(r) = all[0].lock().report
        {
            console::marker(
                "RESULT",
                format_args!("passed={} failed={}", r.passed, r.failed),
            );
        }
        exit(worst, why);
    }
    let _ = stop_other_vcpus(vm);
    park()
}

/// `vm` resets (PSCI `SYSTEM_RESET` from a vCPU): every other vCPU parks,
/// its stage 2 is emptied (tables freed, TLB entries of its VMID
/// invalidated), its RAM zeroed and its image reloaded, its devices and
/// virtual GIC made anew, and vCPU 0 started as at boot. The other VMs run
/// on throughout.
fn reset_vm(vm: &'static Vm) -> ! {
    if !stop_other_vcpus(vm) {
        end_vm(vm, exit_code::CRASH, "reset-timeout");
    }
    let boot = BOOT.get().expect("kept at boot");
    {
        let mut state = vm.lock();
        let mm = MM.get().expect("mm exists");
        let size = vm.ram_ipa.end - vm.ram_ipa.start;
        if let Err(e) = state.stage2.unmap(vm.ram_ipa.start, size as usize) {
            log::warn!("vm{}: reset: emptying stage 2: {e:?}", vm.index + 1);
        }
        debug_assert!(mm.nothing_pending());
        let ram = state.mem.ram.clone();
        state.mem = new_guest_memory(ram, &boot.args);
        state.vgic = new_vgic(vm.spec.vcpus, state.uart_hw_irq);
        if state.uart.is_some() {
            state.uart = Some(new_uart(vm.index));
        }
        state.rx_paused = false;
        state.report = None;
    }
    let resets = vm.resets.fetch_add(1, Ordering::AcqRel) + 1;
    log::info!("vm{}: reset {resets}: reloading its image", vm.index + 1);
    let start = load_image(vm, boot);
    vm.power.lock().power_on(0, start);
    vm.stopping.store(false, Ordering::Release);
    kick_vcpus(vm, 1);
    park()
}

/// What boot finds in the device tree and the payloads.
struct BootInfo {
    args: BootArgs,
    ram: Range<PhysAddr>,
    dtb: Range<PhysAddr>,
    /// The test guest's ELF (if a VM runs it) and where it lies.
    test_elf: Option<GuestElf<'static>>,
    test_payload: Range<PhysAddr>,
    /// The Linux Image (if a VM runs it) and where it lies.
    linux: Option<(crate::linux::ImageHeader, &'static [u8])>,
    linux_payload: Range<PhysAddr>,
    /// The initramfs xtask loaded (empty: none).
    initrd: Range<PhysAddr>,
    /// All VMs' RAM together (each rounded up to 2 MiB).
    guest_ram: usize,
    /// `linux.append=`, still percent-encoded (empty: none).
    linux_append: &'static str,
}

/// Reads the device tree (RAM, bootargs) and parses the guest payload.
fn read_boot_info() -> BootInfo {
    // SAFETY: QEMU placed a device tree at the start of RAM (checked by the
    // parser's magic and size checks); the boot map covers it, and nothing
    // writes it.
    let fdt = unsafe { fdt::Fdt::from_ptr(DTB_ADDR as *const u8) }
        .unwrap_or_else(|e| setup_error(format_args!("no device tree at {DTB_ADDR:#x}: {e:?}")));
    let (ncpus, in_tree) = smp::init_cpu_table(&fdt);
    let cmdline = fdt.chosen().bootargs().unwrap_or("");
    // The token first, so that even a bootargs error reaches xtask as this
    // run's marker.
    if let Some(token) = crate::bootargs::run_token(cmdline) {
        console::set_token(token);
    }
    let args = BootArgs::parse(cmdline).unwrap_or_else(|e| setup_error(format_args!("{e}")));
    let linux_append = crate::bootargs::linux_append(cmdline).unwrap_or("");
    log::set_max_level(args.log);
    TEST_HYPERCALLS.store(args.test_hypercalls, Ordering::Relaxed);
    log::info!(
        "lazyhyp {} at EL2, bootargs {args:?}",
        env!("CARGO_PKG_VERSION")
    );

    let ram = fdt
        .memory()
        .regions()
        .next()
        .and_then(|r| {
            let start = r.starting_address as usize;
            Some(start..start.checked_add(r.size?)?)
        })
        .unwrap_or_else(|| setup_error(format_args!("device tree has no memory region")));
    let dtb = DTB_ADDR..align_up(DTB_ADDR + fdt.total_size(), PAGE_SIZE);
    log::info!("RAM {:#x}..{:#x}", ram.start, ram.end);
    if in_tree > ncpus {
        log::warn!(
            "{in_tree} CPUs in the device tree; the hypervisor brings up {ncpus} (MAX_PCPUS)"
        );
    }

    // The boot map covers the first GiB of RAM: the payloads must be there.
    let boot_ram_end = ram.end.min(ram.start + (1 << 30));
    let config = args.vm_config();
    // The payload at `addr`, read-only, up to the end of the first GiB.
    let payload_at = |addr: PhysAddr, what: &str| -> &'static [u8] {
        if !(ram.start..boot_ram_end).contains(&addr) {
            setup_error(format_args!(
                "{what} address {addr:#x} is not in the first GiB of RAM"
            ));
        }
        let len = (boot_ram_end - addr).min(MAX_PAYLOAD);
        // SAFETY: the range is RAM covered by the boot map and the EL2 map
        // (read only); the layout keeps everything else out of the
        // payload's extent.
        unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
    };
    let (mut test_elf, mut test_payload) = (None, 0..0);
    if config.has(VmKind::Test) {
        let elf = GuestElf::parse(payload_at(args.payload, "payload")).unwrap_or_else(|e| {
            setup_error(format_args!("guest payload at {:#x}: {e}", args.payload))
        });
        test_payload = args.payload..align_up(args.payload + elf.file_size(), PAGE_SIZE);
        test_elf = Some(elf);
    }
    let (mut linux, mut linux_payload) = (None, 0..0);
    if config.has(VmKind::Linux) {
        // With a test VM too, the test guest is at `payload=` and the
        // kernel at `linux.payload=`.
        let addr = if config.has(VmKind::Test) {
            args.linux_payload.unwrap_or_else(|| {
                setup_error(format_args!(
                    "a test VM and a Linux VM need linux.payload= for the kernel"
                ))
            })
        } else {
            args.linux_payload.unwrap_or(args.payload)
        };
        let bytes = payload_at(addr, "linux.payload");
        let header = crate::linux::parse_image_header(bytes)
            .unwrap_or_else(|e| setup_error(format_args!("guest payload at {addr:#x}: {e}")));
        let size = usize::try_from(header.image_size).unwrap_or(usize::MAX);
        if size > bytes.len() {
            setup_error(format_args!(
                "kernel image_size {size:#x} reaches past the first GiB of RAM"
            ));
        }
        linux_payload = addr..align_up(addr + size, PAGE_SIZE);
        linux = Some((header, &bytes[..size]));
    }
    let guest_ram = config
        .iter()
        .map(|v| align_up(v.ram_mib << 20, 2 << 20))
        .sum();
    let (initrd_pa, initrd_size) = args.initrd;
    let initrd = if initrd_size == 0 {
        0..0
    } else if initrd_pa
        .checked_add(initrd_size)
        .is_some_and(|end| initrd_pa >= ram.start && end <= boot_ram_end)
    {
        initrd_pa..align_up(initrd_pa + initrd_size, PAGE_SIZE)
    } else {
        setup_error(format_args!(
            "initrd {initrd_pa:#x}+{initrd_size:#x} is not in the first GiB of RAM"
        ))
    };
    BootInfo {
        linux_append,
        guest_ram,
        args,
        ram,
        dtb,
        test_elf,
        test_payload,
        linux,
        linux_payload,
        initrd,
    }
}

/// Starts the heap, builds the EL2 map and switches to it.
fn switch_to_el2_map(image: &el2map::ImageLayout, boot: &BootInfo, layout: &Layout, pa_range: u64) {
    // SAFETY: the layout gave the heap region to the heap alone; it is RAM
    // mapped read-write by the boot map and by the EL2 map built next.
    unsafe {
        HEAP.heap
            .lock()
            .init(layout.heap.start, layout.heap.end - layout.heap.start);
    }
    let map = el2map::build(
        image,
        &el2map::El2Regions {
            read_only: [
                boot.dtb.clone(),
                boot.test_payload.clone(),
                boot.linux_payload.clone(),
                boot.initrd.clone(),
            ],
            read_write: [layout.heap.clone(), layout.guest_backing.clone()],
            pool: layout.pool.clone(),
        },
    );
    // SAFETY: the map covers the image, stacks, heap and console at their
    // addresses, and is kept in a static forever below.
    unsafe { el2map::activate(&map, pa_range) };
    EL2_MAP.call_once(|| SpinMutex::new(map));
    log::info!("EL2 map active");
}

/// Creates the page pool and the VMs of the configuration: for each, its
/// own VMID, stage 2, slice of the guest backing, image, devices, virtual
/// GIC and vCPUs (vCPU i on CPU `first_cpu + i`), with vCPU 0 to start.
fn build_vms(layout: &Layout, boot: &BootInfo, vtcr: u64) {
    let args = &boot.args;
    let mm = MM.call_once(|| MmCtx::new(HwMmArch));
    let guard_map: Option<&'static dyn El2PageMap> = if args.guard {
        let el2 = EL2_MAP.get().expect("EL2 map built before the pool");
        Some(GUARD.call_once(|| el2map::GuardPages(el2)))
    } else {
        None
    };
    // SAFETY: the layout gave the pool region to the pool alone; the EL2 map
    // maps it read-write, page by page, at the same addresses, and with guard
    // mode the pool alone toggles those entries.
    POOL.call_once(|| unsafe { PagePool::new(layout.pool.clone(), mm, guard_map) });
    mm.set_free_hook(&FREE_TABLES);
    let config = args.vm_config();
    console::set_line_buffered(config.len() > 1);
    let vmid_bits = crate::mm::arch::MmArch::vmid_bits(&HwMmArch);
    let mut vms = Vec::new();
    let mut next_backing = layout.guest_backing.start;
    for (index, spec) in config.iter().enumerate() {
        // VMID 0 is never a guest's; each VM its own, within the width.
        let vmid = Vmid(u16::try_from(index + 1).expect("at most MAX_VMS"));
        if u32::from(vmid.0) >= 1 << vmid_bits {
            setup_error(format_args!("VMID {} beyond {vmid_bits} bits", vmid.0));
        }
        let size = align_up(spec.ram_mib << 20, 2 << 20);
        let backing = next_backing..next_backing + size;
        next_backing += size;
        vms.push(build_vm(index, spec, vmid, backing, boot, vtcr));
        for cpu in spec.cpus() {
            PCPU_VM[cpu].store(index, Ordering::Relaxed);
        }
    }
    VMS.call_once(|| vms);
}

/// Builds VM `index` (VMID `vmid`) over `backing` and loads its image.
fn build_vm(
    index: usize,
    spec: VmSpec,
    vmid: Vmid,
    backing: Range<PhysAddr>,
    boot: &BootInfo,
    vtcr: u64,
) -> Vm {
    let args = &boot.args;
    let mm = MM.get().expect("made by build_vms");
    let pool = POOL.get().expect("made by build_vms");
    let guest_ram = spec.ram_mib << 20;
    let ram_ipa = GUEST_RAM_IPA..GUEST_RAM_IPA + guest_ram as u64;
    let mut stage2 = Stage2::new(vmid, mm, pool)
        .unwrap_or_else(|e| setup_error(format_args!("stage-2 root table: {e:?}")));
    let ram = crate::guest_mm::GuestRam {
        ipa: ram_ipa.clone(),
        backing: backing.start,
        mem: if coherency() == Coherency::ForcedWriteBack {
            crate::mm::stage2::MemType::NormalForcedWriteBack
        } else {
            crate::mm::stage2::MemType::Normal
        },
    };
    if args.populate_at_boot {
        // All of guest RAM in one lazy section (blocks where aligned).
        mm.enter();
        stage2
            .map(GUEST_RAM_IPA, guest_ram, backing.start, ram.attrs())
            .unwrap_or_else(|e| setup_error(format_args!("mapping guest RAM: {e:?}")));
        mm.leave();
    }
    // Only one VM may have the real UART; the others get emulated ones.
    let uart_passthrough = args.uart_passthrough && index == 0;
    // The GIC frames are not mapped: every access traps to the virtual GIC.
    if uart_passthrough {
        stage2
            .map(PL011_BASE as u64, PAGE_SIZE, PL011_BASE, S2Attrs::DEVICE)
            .unwrap_or_else(|e| setup_error(format_args!("mapping the PL011: {e:?}")));
    }
    log::info!(
        "vm{}: {} on CPUs {:?}, RAM IPA {:#x}..{:#x} -> PA {:#x}, VMID {}, populated {}",
        index + 1,
        spec.kind.name(),
        spec.cpus(),
        ram_ipa.start,
        ram_ipa.end,
        backing.start,
        vmid.0,
        if args.populate_at_boot {
            "at boot"
        } else {
            "on demand"
        }
    );
    let vttbr = stage2.vttbr();
    let vm = Vm {
        index,
        spec,
        state: SpinMutex::new(VmState {
            stage2,
            mem: new_guest_memory(ram, args),
            uart: None,
            vgic: new_vgic(spec.vcpus, uart_passthrough),
            uart_hw_irq: uart_passthrough,
            rx_paused: false,
            report: None,
        }),
        power: SpinMutex::new(PowerTable::new((0..spec.vcpus).map(Vgic::mpidr).collect())),
        vttbr,
        vtcr,
        fwb: coherency() == Coherency::ForcedWriteBack,
        ram_ipa,
        backing,
        last_vector: (0..spec.vcpus).map(|_| AtomicU64::new(u64::MAX)).collect(),
        stopping: AtomicBool::new(false),
        running: AtomicU32::new(0),
        ended: SpinMutex::new(None),
        resets: AtomicU32::new(0),
    };
    let start = load_image(&vm, boot);
    {
        let mut state = vm.lock();
        state.uart = (!uart_passthrough).then(|| new_uart(index));
    }
    vm.power.lock().power_on(0, start);
    vm
}

/// Guest memory over `ram`, with the coherency hook.
fn new_guest_memory(ram: crate::guest_mm::GuestRam, args: &BootArgs) -> GuestMemory {
    let mut mem = GuestMemory::new(ram, args.fault_around_kib << 10);
    // Each run of backing newly mapped for the guest is cleaned first
    // (without FEAT_S2FWB): bounded by what is mapped.
    mem.set_on_map(|pa, len| coherency().before_guest_map(&cache::HwCacheOps, pa, len));
    mem
}

/// A virtual GIC for `vcpus` vCPUs (the UART's SPI hardware-backed if the
/// VM has the real UART).
fn new_vgic(vcpus: usize, uart_hw_irq: bool) -> Vgic {
    let mut config = VgicConfig::qemu_virt(vcpus);
    for spi in &mut config.spis {
        if spi.intid == qemu_virt::UART_SPI {
            spi.hw = uart_hw_irq;
        }
    }
    Vgic::new(&config, HwCpuInterface.vtr())
}

/// VM `index`'s emulated PL011: what the guest writes goes to the console
/// behind `vm<index + 1>| `.
fn new_uart(index: usize) -> crate::mmio::Pl011<Box<dyn FnMut(u8) + Send>> {
    crate::mmio::Pl011::new(Box::new(move |b| console::push(index, b)))
}

/// (Re)loads `vm`'s image into its backing, which it zeroes first, and
/// returns where vCPU 0 starts. The test guest gets its flags in `x1`, the
/// unmap benchmark size in `x2`; Linux the device tree in `x0`.
fn load_image(vm: &Vm, boot: &BootInfo) -> Start {
    let args = &boot.args;
    match vm.spec.kind {
        VmKind::Test => {
            let elf = boot.test_elf.as_ref().expect("parsed for a test VM");
            let entry = load_guest(elf, &vm.backing, vm.spec.ram_mib << 20);
            Start {
                entry,
                args: [0, args.guest_flags, args.unmap_bench_mib as u64],
            }
        }
        VmKind::Linux => {
            let (header, image) = boot.linux.as_ref().expect("parsed for a Linux VM");
            let (entry, dtb) = load_linux(header, image, boot, vm);
            Start {
                entry,
                args: [dtb, 0, 0],
            }
        }
    }
}

/// `SPSR_EL2` for entering the guest: EL1h, with D, A, I and F masked.
const SPSR_EL1H_MASKED: u64 = 0x3c5;

/// The kernel command line of a Linux guest.
const LINUX_CMDLINE: &str = "console=ttyAMA0 earlycon=pl011,0x9000000 panic=-1 rdinit=/init";

/// Loads a Linux guest per the arm64 boot protocol: the Image at guest RAM's
/// (2 MiB-aligned) base plus `text_offset`, the initramfs 64 MiB below the
/// end of guest RAM, the device tree 2 MiB below it. Returns (entry, x0 =
/// the tree's IPA).
fn load_linux(
    header: &crate::linux::ImageHeader,
    image: &[u8],
    boot: &BootInfo,
    vm: &Vm,
) -> (u64, u64) {
    let backing = &vm.backing;
    let guest_ram = vm.spec.ram_mib << 20;
    let ram_end = GUEST_RAM_IPA + guest_ram as u64;
    let to_pa = |ipa: u64| backing.start + (ipa - GUEST_RAM_IPA) as usize;
    let dtb_ipa = ram_end - (2 << 20);
    let initrd_ipa = ram_end.saturating_sub(64 << 20);
    // Checked: text_offset comes from the Image header.
    let kernel = GUEST_RAM_IPA.checked_add(header.text_offset).filter(|k| {
        k.checked_add(image.len() as u64)
            .is_some_and(|end| end <= initrd_ipa)
    });
    let Some(kernel) = kernel else {
        setup_error(format_args!(
            "the kernel (text_offset {:#x}) does not fit below the initramfs in guest RAM",
            header.text_offset
        ))
    };
    let initrd_len = boot.initrd.end - boot.initrd.start;
    if initrd_len > (62 << 20) {
        setup_error(format_args!("initramfs larger than 62 MiB"));
    }
    // The user's words (`cargo xtask linux --append`) after ours.
    let mut cmdline = alloc::string::String::from(LINUX_CMDLINE);
    if !boot.linux_append.is_empty() {
        let extra = crate::bootargs::percent_decode(boot.linux_append)
            .unwrap_or_else(|| setup_error(format_args!("linux.append is not percent-encoded")));
        cmdline.push(' ');
        cmdline.push_str(&extra);
    }
    // After a reset, the kernel is told which start this is (an init
    // may want to know; the reboot test does).
    let resets = vm.resets.load(Ordering::Relaxed);
    if resets > 0 {
        let _ = write!(cmdline, " lazyhyp.resets={resets}");
    }
    log::info!("Linux command line: {cmdline}");
    let tree = crate::linux::build_tree(&crate::linux::GuestTree {
        ram: GUEST_RAM_IPA..ram_end,
        initrd: (initrd_len > 0).then(|| initrd_ipa..initrd_ipa + boot.args.initrd.1 as u64),
        bootargs: &cmdline,
        gicd: (qemu_virt::GICD_BASE, qemu_virt::GICD_SIZE),
        gicr: (qemu_virt::GICR_BASE, 0x2_0000 * vm.spec.vcpus as u64),
        uart: PL011_BASE as u64,
        mpidrs: &(0..vm.spec.vcpus)
            .map(|v| Vgic::mpidr(v) & smp::MPIDR_AFFINITY)
            .collect::<Vec<_>>(),
    })
    .unwrap_or_else(|e| setup_error(format_args!("{e}")));
    // SAFETY: the backing is ours alone and mapped read-write by the EL2
    // map; the sources (payload, initrd: read-only in the EL2 map; the tree
    // on the heap) are disjoint from it, and every destination range was
    // checked to lie in guest RAM above.
    unsafe {
        core::ptr::write_bytes(backing.start as *mut u8, 0, guest_ram);
        core::ptr::copy_nonoverlapping(image.as_ptr(), to_pa(kernel) as *mut u8, image.len());
        core::ptr::copy_nonoverlapping(
            boot.initrd.start as *const u8,
            to_pa(initrd_ipa) as *mut u8,
            initrd_len,
        );
        core::ptr::copy_nonoverlapping(tree.as_ptr(), to_pa(dtb_ipa) as *mut u8, tree.len());
    }
    // The image, initramfs and tree reach a guest that starts with its
    // caches off.
    coherency().after_code_load(&cache::HwCacheOps, backing.start, guest_ram);
    log::info!(
        "Linux: kernel at IPA {kernel:#x}, initramfs {initrd_ipa:#x} ({initrd_len:#x} bytes), tree {dtb_ipa:#x}"
    );
    (kernel, dtb_ipa)
}

/// `test.hypercalls=1`: the test-only hypercalls are answered.
pub(crate) static TEST_HYPERCALLS: AtomicBool = AtomicBool::new(false);

/// Copies the guest's segments into its RAM backing and zeroes the rest of
/// it, then makes it all visible to a guest running with caches off.
/// Returns the entry point.
fn load_guest(elf: &GuestElf<'_>, backing: &Range<PhysAddr>, guest_ram: usize) -> u64 {
    let to_pa = |ipa: u64| backing.start + (ipa - GUEST_RAM_IPA) as usize;
    // Fresh RAM may hold anything: the guest gets zeroes.
    // SAFETY: the backing is ours alone and mapped read-write by the EL2 map.
    unsafe { core::ptr::write_bytes(backing.start as *mut u8, 0, guest_ram) };
    let image = elf
        .load(
            &(GUEST_RAM_IPA..GUEST_RAM_IPA + guest_ram as u64),
            |ipa, bytes| {
                // SAFETY: `load` checked the segment lies in guest RAM, whose
                // backing is ours and mapped read-write; source (payload) and
                // destination (backing) are disjoint regions of the layout.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        to_pa(ipa) as *mut u8,
                        bytes.len(),
                    );
                }
            },
            |ipa, len| {
                // SAFETY: as above.
                unsafe { core::ptr::write_bytes(to_pa(ipa) as *mut u8, 0, len) };
            },
        )
        .unwrap_or_else(|e| setup_error(format_args!("loading the guest: {e}")));
    coherency().after_code_load(&cache::HwCacheOps, backing.start, guest_ram);
    image.entry
}

/// Called from the lower-EL synchronous vector.
pub(crate) fn handle_guest_sync(regs: &mut GuestRegs) {
    vgic_exit();
    let suspend = handle_sync(regs);
    park_if_stopping();
    let loaded = vgic_enter();
    // PSCI CPU_SUSPEND (a standby, as WFI): nothing pending for the vCPU,
    // so wait here until a physical interrupt (its timer, a kick from
    // another CPU, a device) is pending; back in the guest, that interrupt
    // exits to EL2 at once and is handled as any other.
    if suspend && loaded == 0 {
        smp::wait_for_interrupt();
    }
    // Every change the hypervisor made is complete and in effect before the
    // guest runs again: no lazy section open, no barrier or TLBI owed.
    debug_assert!(
        MM.get().is_none_or(MmCtx::nothing_pending),
        "returning to the guest with mm work pending"
    );
}

/// Handles one synchronous exit (the virtual GIC's state already folded
/// back from the list registers). Returns whether the vCPU asked to be
/// suspended (PSCI `CPU_SUSPEND`).
fn handle_sync(regs: &mut GuestRegs) -> bool {
    let trap = Trap {
        esr: Esr(read_sysreg!("esr_el2")),
        far: read_sysreg!("far_el2"),
        hpfar: read_sysreg!("hpfar_el2"),
    };
    let vm = current_vm();
    let vcpu = current_vcpu();
    // Where the previous exit sent the guest with an injected abort,
    // forgotten now: the livelock check looks only at the exit right
    // before this one.
    let last_vector = vm.last_vector[vcpu].swap(u64::MAX, Ordering::Relaxed);
    let exit = Vcpu.handle_sync(regs, trap, exits());
    match exit {
        Exit::Resume => {}
        Exit::Stop(stop) => finish(stop, regs),
        Exit::Report(report) => vm.lock().report = Some(report),
        Exit::Psci(call) => return psci(vm, vcpu, call, regs),
        Exit::MmCall(function) => services::mm_call(function, regs),
        Exit::Sysreg(trap, access) => {
            // The virtual GIC's SGI registers first (trapped by IMO/FMO).
            let sgi = vm
                .lock()
                .vgic
                .handle_sysreg_trap(vcpu, trap.esr.iss(), regs);
            match sgi {
                SysregTrap::NotVgic => {}
                SysregTrap::Undefined => {
                    inject_undefined(trap, regs);
                    return false;
                }
                SysregTrap::SgiSent(targets) => {
                    crate::mm::counters::inc(&exits().sysreg_emulated);
                    kick_vcpus(vm, targets & !(1 << vcpu));
                    return false;
                }
            }
            sysreg(trap, access, regs);
        }
        Exit::Undefined(trap) => inject_undefined(trap, regs),
        Exit::Stage2Abort(trap) => {
            let fsc = trap.esr.fault_status();
            // Translation (0x04-0x07), access flag (0x08-0x0b) and permission
            // (0x0c-0x0f) faults are stage 2's to judge. HPFAR holds the IPA
            // for translation and access-flag faults (and any fault on a
            // stage-1 walk); a permission fault's HPFAR may not be valid,
            // and it is only ever answered with an abort, which needs the
            // VA in FAR, not the IPA. Anything else (a synchronous external
            // abort routed here by HCR_EL2.TEA, alignment, a TLB conflict)
            // is the guest's: it gets the abort.
            if !(0x04..=0x0f).contains(&fsc) {
                log::debug!("guest abort with FSC {fsc:#x} at {:#x}: injected", regs.elr);
                inject_abort(trap, regs, last_vector);
                return false;
            }
            let permission = (0x0c..=0x0f).contains(&fsc) && !trap.esr.s1ptw();
            let exec = trap.esr.ec() == crate::esr::ec::IABT_LOWER;
            let write = !exec && trap.esr.wnr();
            let ipa = if permission {
                // HPFAR_EL2 is not guaranteed for a permission fault: the
                // IPA comes from the guest's stage 1 (as KVM's
                // __translate_far_to_hpfar); if that no longer translates,
                // the guest changed its tables and retries.
                let Some(ipa) = sysreg::stage1_ipa(trap.far) else {
                    return false;
                };
                ipa
            } else {
                crate::esr::fault_ipa(trap.hpfar, trap.far)
            };
            let mut guard = vm.lock();
            let vm = &mut *guard;
            if permission
                && vm
                    .mem
                    .permission_fault_is_stale(&vm.stage2, ipa, write, exec)
            {
                // Another CPU changed the entry after this access faulted:
                // the access is retried, not aborted.
                crate::mm::counters::inc(&exits().stale_faults);
                return false;
            }
            // An MMIO access: a translation fault by a load or store, not by
            // a stage-1 table walk.
            let mmio = (0x04..=0x07).contains(&fsc) && !trap.esr.s1ptw();
            if mmio && let Some(result) = vgic_mmio(vm, trap, ipa, regs) {
                let kicks = vm.vgic.take_kicks() & !(1 << vcpu);
                drop(guard);
                kick_vcpus(current_vm(), kicks);
                if result.is_err() {
                    inject_abort(trap, regs, last_vector);
                }
                return false;
            }
            if let Some(uart) = vm.uart.as_mut().filter(|_| mmio) {
                let base = PL011_BASE as u64;
                if (base..base + PAGE_SIZE as u64).contains(&ipa)
                    && crate::mmio::emulate(uart, trap.esr, ipa - base, regs)
                {
                    crate::mm::counters::inc(&exits().mmio_emulated);
                    uart_accessed(vm);
                    let kicks = vm.vgic.take_kicks() & !(1 << vcpu);
                    drop(guard);
                    let vm = current_vm();
                    // Printed outside the VM lock.
                    console::flush(vm.index);
                    kick_vcpus(vm, kicks);
                    return false;
                }
            }
            let action =
                vm.mem
                    .stage2_fault(&mut vm.stage2, MM.get().expect("mm exists"), ipa, fsc);
            drop(guard);
            if action == FaultAction::Inject {
                inject_abort(trap, regs, last_vector);
            }
        }
    }
    false
}

/// A PSCI call about vCPUs from `vcpu` of `vm`. Returns whether the vCPU
/// suspends (`CPU_SUSPEND`).
fn psci(vm: &'static Vm, vcpu: usize, call: PsciCall, regs: &mut GuestRegs) -> bool {
    let status = |code: i64| u64::from_ne_bytes(code.to_ne_bytes());
    match call {
        PsciCall::CpuOn {
            target,
            entry,
            context,
        } => {
            let result = vm.power.lock().cpu_on(target, entry, context, &vm.ram_ipa);
            regs.x[0] = match result {
                Ok(started) => {
                    kick_vcpus(vm, 1 << started);
                    0
                }
                Err(code) => status(code),
            };
        }
        PsciCall::AffinityInfo { target, level } => {
            regs.x[0] = status(vm.power.lock().affinity_info(target, level));
        }
        PsciCall::CpuSuspend => {
            regs.x[0] = 0;
            return true;
        }
        PsciCall::CpuOff => {
            let all_off = vm.power.lock().cpu_off(vcpu);
            if all_off {
                // Nothing of the VM runs any more: it is off.
                finish(Stop::SystemOff, regs);
            }
            park();
        }
    }
    false
}

/// A trapped system register access the virtual GIC did not take.
fn sysreg(trap: Trap, access: crate::sysreg_emul::SysregAccess, regs: &mut GuestRegs) {
    match crate::sysreg_emul::classify(&access) {
        SysregAction::Undefined => inject_undefined(trap, regs),
        action => {
            let value = match action {
                SysregAction::IdRead { crm, op2 } => Some(crate::sysreg_emul::sanitise_id(
                    crm,
                    op2,
                    sysreg::read_id_reg(crm, op2),
                )),
                SysregAction::ReadValue(v) => Some(v),
                SysregAction::SetWay => {
                    setway_flush();
                    None
                }
                SysregAction::VmRegisterWrite(reg) => {
                    let v = if access.rt == 31 {
                        0
                    } else {
                        regs.x[usize::from(access.rt)]
                    };
                    vm_register_write(reg, v);
                    None
                }
                SysregAction::WriteIgnored | SysregAction::Undefined => None,
            };
            if let Some(v) = value
                && access.rt != 31
            {
                regs.x[usize::from(access.rt)] = v;
            }
            crate::mm::counters::inc(&exits().sysreg_emulated);
            // A trapped MSR/MRS leaves ELR at the instruction.
            regs.elr = regs.elr.wrapping_add(4);
        }
    }
}

/// Emulates data cache maintenance by set/way (trapped by `HCR_EL2.TSW`),
/// as KVM does (`kvm_set_way_flush`, `kvm_toggle_cache`).
///
/// Set/way operations act on the physical CPU's caches, which hold the
/// hypervisor's lines too, so they are not passed through. What a guest
/// wants from them is its memory at the point of coherency, around turning
/// its caches on or off. Under FEAT_S2FWB its memory is always coherent:
/// nothing to do. Otherwise the first set/way operation cleans and
/// invalidates all of guest RAM by address and sets `HCR_EL2.TVM`, so the
/// guest's next `SCTLR_EL1` writes trap ([`vm_register_write`]): each one
/// that turns its caches on or off cleans again, and once they are on,
/// `TVM` is cleared; set/way operations while `TVM` is set cost nothing.
/// The cost: one pass over guest RAM per set/way episode and per cache
/// toggle within it (documented in docs/hypercalls.md).
fn setway_flush() {
    if coherency() == Coherency::ForcedWriteBack {
        return;
    }
    let hcr = read_sysreg!("hcr_el2");
    if hcr & crate::el2_controls::hcr::TVM != 0 {
        return;
    }
    clean_guest_ram();
    // Takes effect at the ERET to the guest (context synchronizing).
    write_sysreg!("hcr_el2", hcr | crate::el2_controls::hcr::TVM);
}

/// All of guest RAM to the point of coherency, out of every data cache.
fn clean_guest_ram() {
    let backing = current_vm().lock().mem.ram.backing_range();
    cache::HwCacheOps.clean_invalidate_to_poc(backing.start, backing.end - backing.start);
    crate::mm::counters::inc(&exits().setway_flushes);
}

/// `SCTLR_EL1.M` and `C`: the guest's data accesses are cacheable.
const SCTLR_M_C: u64 = 0b101;

/// A guest write to a register `HCR_EL2.TVM` traps: performed as written.
/// For `SCTLR_EL1`, a change of the guest's cache state cleans guest RAM
/// (what it wrote cacheable must reach memory before it runs uncached, and
/// no stale line may shadow what it wrote uncached once the caches are on
/// again), and once its caches are on the trap is lifted.
fn vm_register_write(reg: crate::sysreg_emul::VmRegister, value: u64) {
    use crate::sysreg_emul::VmRegister as R;
    match reg {
        R::Sctlr => {
            let was_on = read_sysreg!("sctlr_el1") & SCTLR_M_C == SCTLR_M_C;
            write_sysreg!("sctlr_el1", value);
            let now_on = value & SCTLR_M_C == SCTLR_M_C;
            if was_on != now_on {
                clean_guest_ram();
            }
            if now_on {
                write_sysreg!(
                    "hcr_el2",
                    read_sysreg!("hcr_el2") & !crate::el2_controls::hcr::TVM
                );
            }
        }
        R::Ttbr0 => write_sysreg!("ttbr0_el1", value),
        R::Ttbr1 => write_sysreg!("ttbr1_el1", value),
        R::Tcr => write_sysreg!("tcr_el1", value),
        R::Esr => write_sysreg!("esr_el1", value),
        R::Far => write_sysreg!("far_el1", value),
        R::Afsr0 => write_sysreg!("afsr0_el1", value),
        R::Afsr1 => write_sysreg!("afsr1_el1", value),
        R::Mair => write_sysreg!("mair_el1", value),
        R::Amair => write_sysreg!("amair_el1", value),
        R::Contextidr => write_sysreg!("contextidr_el1", value),
    }
}

/// Writes an [`Injection`] into the guest's EL1 state and points the guest
/// at its vector.
fn deliver(inj: &Injection, regs: &mut GuestRegs) {
    // The guest's EL1 exception state, as if the exception had been taken
    // to EL1 directly; the ERET to the guest then enters its vector.
    write_sysreg!("esr_el1", inj.esr_el1);
    if let Some(far) = inj.far_el1 {
        write_sysreg!("far_el1", far);
    }
    write_sysreg!("elr_el1", inj.elr_el1);
    write_sysreg!("spsr_el1", inj.spsr_el1);
    regs.elr = inj.elr;
    regs.spsr = inj.spsr;
}

/// Injects UNDEFINED for an instruction the hypervisor does not emulate.
fn inject_undefined(trap: Trap, regs: &mut GuestRegs) {
    let inj = Injection::undefined(
        trap,
        regs.elr,
        regs.spsr,
        read_sysreg!("vbar_el1"),
        read_sysreg!("sctlr_el1"),
    );
    log::debug!("UNDEFINED injected: {:?} at {:#x}", trap.esr, regs.elr);
    crate::mm::counters::inc(&exits().undef_injected);
    deliver(&inj, regs);
}

/// Delivers a synchronous external abort to the guest's EL1 for a stage-2
/// abort it cannot be given memory for. `last_vector`: where the exit right
/// before this one sent the guest with an injected abort, if it did.
fn inject_abort(trap: Trap, regs: &mut GuestRegs, last_vector: u64) {
    // An abort fetching the very vector the previous exit sent the guest to
    // would be injected again forever: the guest cannot take exceptions.
    if trap.esr.ec() == crate::esr::ec::IABT_LOWER && regs.elr == last_vector {
        finish(Stop::UnhandledTrap(trap), regs);
    }
    let inj = Injection::sync_external_abort(
        trap,
        regs.elr,
        regs.spsr,
        read_sysreg!("vbar_el1"),
        read_sysreg!("sctlr_el1"),
    );
    log::debug!("injecting SEA: guest {:#x} at {:#x}", trap.far, regs.elr);
    crate::mm::counters::inc(&exits().abort_injected);
    deliver(&inj, regs);
    current_vm().last_vector[current_vcpu()].store(inj.elr, Ordering::Relaxed);
}

/// Called from the lower-EL IRQ, FIQ and SError vectors (and the AArch32
/// ones, which a guest with an AArch64 EL1 never reaches).
///
/// IRQs and FIQs: with `HCR_EL2.IMO`/`FMO` every physical interrupt comes
/// here while the guest runs; each pending one is acknowledged and handled
/// (see [`handle_irq`]). SErrors (`AMO`): reported, counted, and handed to
/// the guest as a virtual SError, as KVM does for an error it cannot
/// attribute: the guest's memory access caused it, the guest decides.
pub(crate) fn handle_guest_async(regs: &mut GuestRegs, kind: vectors::Kind) {
    vgic_exit();
    match kind {
        vectors::Kind::Irq | vectors::Kind::Fiq => {
            crate::mm::counters::inc(&exits().exits_irq);
            // Bounded: at most as many as could be pending at once; a
            // flood of one source cannot keep EL2 here, because each one
            // handled stays active (or is masked) until the guest is done.
            for _ in 0..64 {
                let intid = gic::acknowledge();
                if intid >= gic::SPURIOUS {
                    break;
                }
                crate::mm::counters::inc(&exits().irqs_taken);
                handle_irq(intid);
            }
        }
        vectors::Kind::SError => {
            let esr = read_sysreg!("esr_el2");
            let n = exits().serrors.fetch_add(1, Ordering::Relaxed);
            let has_ras = CPU_ID
                .get()
                .is_some_and(crate::el2_controls::CpuIdRegs::has_ras);
            let action = crate::esr::serror_action(esr, has_ras);
            if action == crate::esr::SErrorAction::Fatal {
                // Uncontainable, or uncategorized with RAS: the machine's
                // state cannot be trusted, the hypervisor's included (as
                // KVM panics for these).
                console::marker("PANIC", format_args!("fatal SError, ESR {esr:#x}"));
                report_trap("guest (EL1)", regs);
                exit(exit_code::CRASH, "fatal-serror");
            }
            // The first few are logged; a guest that provokes them in a
            // loop gets them counted, not a console flood.
            if n < 8 {
                log::warn!(
                    "SError while the guest ran (ESR {esr:#x}, guest at {:#x}): {action:?}",
                    regs.elr
                );
            }
            if action == crate::esr::SErrorAction::Inject {
                write_sysreg!(
                    "hcr_el2",
                    read_sysreg!("hcr_el2") | crate::el2_controls::hcr::VSE
                );
            }
        }
        vectors::Kind::Sync => {
            console::marker(
                "PANIC",
                format_args!("unexpected {kind:?} exception from the guest"),
            );
            report_trap("guest (EL1)", regs);
            exit(exit_code::CRASH, "guest-unexpected-exception");
        }
    }
    park_if_stopping();
    vgic_enter();
}

/// One physical interrupt acknowledged at EL2 (`ICC_CTLR_EL1.EOImode` = 1:
/// the EOI below drops the priority; deactivation is separate).
fn handle_irq(intid: u32) {
    gic::priority_drop(intid);
    if intid == smp::KICK_SGI {
        // Another CPU changed what this vCPU must see (an interrupt for
        // it, a stop): the exit itself was the point; the entry that
        // follows loads it.
        gic::deactivate(intid);
        return;
    }
    // The real UART's interrupt is for the VM that takes console input,
    // whichever CPU (the boot CPU) it is routed to; the rest is this vCPU's.
    let (target, vcpu) = if intid == qemu_virt::UART_SPI {
        (rx_vm().expect("VMs exist"), usize::MAX)
    } else {
        (current_vm(), current_vcpu())
    };
    let mut guard = target.lock();
    let vm = &mut *guard;
    match intid {
        // The virtual timer fired for the guest: deliver it hardware-backed;
        // the guest's deactivation deactivates the physical PPI, so it
        // cannot fire again before the guest handled it.
        qemu_virt::VTIMER_PPI => vm.vgic.inject_hw_ppi(vcpu, intid),
        // The real UART's interrupt, for a guest that has the UART.
        qemu_virt::UART_SPI if vm.uart_hw_irq => {
            // Routed to no vCPU (the guest's IROUTER): it stays active, so a
            // line the guest holds high cannot fire again and keep EL2
            // busy; the guest's UART interrupts stop until it handles them
            // (as KVM and Xen leave a hardware-mapped interrupt).
            let _ = vm.vgic.inject_hw_spi(intid);
        }
        // Bytes from the host for the guest's emulated UART.
        qemu_virt::UART_SPI => {
            gic::deactivate(intid);
            forward_rx(vm);
        }
        // The maintenance interrupt: its purpose, an exit, is served; the
        // refill is the next entry. Anything else: not ours to keep.
        _ => gic::deactivate(intid),
    }
    let kicks = vm.vgic.take_kicks();
    drop(guard);
    // This vCPU loads its own at the next entry.
    let me = if core::ptr::eq(target, current_vm()) {
        1u128.checked_shl(vcpu as u32).unwrap_or(0)
    } else {
        0
    };
    kick_vcpus(target, kicks & !me);
}

/// Moves what the real UART received into the guest's emulated UART, as
/// much as its receive FIFO takes, and updates the guest's interrupt line.
/// While the emulated FIFO is full the real UART's receive interrupt is off
/// (the bytes wait in the real UART, and the level-triggered interrupt
/// cannot keep firing); a guest read that makes room turns it back on
/// ([`uart_accessed`]).
fn forward_rx(vm: &mut VmState) {
    let Some(uart) = vm.uart.as_mut() else {
        return;
    };
    console::drain_rx(uart.rx_space(), |b| {
        uart.push_rx(b);
    });
    if uart.rx_space() == 0 {
        console::set_rx_interrupt(false);
        vm.rx_paused = true;
    }
    let _ = vm.vgic.set_spi_level(qemu_virt::UART_SPI, uart.irq_line());
}

/// After the guest accessed its emulated UART: its interrupt line follows
/// the UART's state, and reception resumes if it had paused.
fn uart_accessed(vm: &mut VmState) {
    let Some(uart) = vm.uart.as_ref() else {
        return;
    };
    let line = uart.irq_line();
    let room = uart.rx_space() > 0;
    let _ = vm.vgic.set_spi_level(qemu_virt::UART_SPI, line);
    if vm.rx_paused && room {
        vm.rx_paused = false;
        console::set_rx_interrupt(true);
    }
}

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
    gic.enable_spi(qemu_virt::UART_SPI);
    if rx_vm().is_some_and(|vm| !vm.lock().uart_hw_irq) {
        console::set_rx_interrupt(true);
    }
    log::info!(
        "GIC: physical GICv3 owned at EL2; virtual GIC with {} list registers",
        (HwCpuInterface.vtr() & 0x1f) + 1
    );
}

/// After every exit, before anything may inject or emulate: fold the list
/// registers back into the virtual GIC.
fn vgic_exit() {
    let Some(vm) = vm_of(smp::this_cpu()) else {
        return;
    };
    vm.lock().vgic.exit(current_vcpu(), &mut HwCpuInterface);
}

/// Before every entry: physically deactivate what the guest deactivated
/// through the emulated registers, then load the list registers. Returns
/// how many interrupts are loaded.
fn vgic_enter() -> usize {
    let Some(vm) = vm_of(smp::this_cpu()) else {
        return 0;
    };
    let vcpu = current_vcpu();
    let mut vm = vm.lock();
    let ppis = vm.vgic.take_hw_deactivations(vcpu);
    for intid in (0..32).filter(|i| ppis & (1 << i) != 0) {
        gic::deactivate(intid);
    }
    for intid in vm.vgic.take_hw_spi_deactivations() {
        gic::deactivate(intid);
    }
    vm.vgic.enter(vcpu, &mut HwCpuInterface).loaded
}

/// A trapped access to the virtual GIC's frames: `None` if `ipa` is not in
/// them; `Some(Err)` if it must be answered with an external abort.
fn vgic_mmio(
    vm: &mut VmState,
    trap: Trap,
    ipa: u64,
    regs: &mut GuestRegs,
) -> Option<Result<(), crate::mmio::MmioError>> {
    let distributor = qemu_virt::GICD_BASE..qemu_virt::GICD_BASE + qemu_virt::GICD_SIZE;
    let redistributors = qemu_virt::GICR_BASE..qemu_virt::GICR_BASE + vm.vgic.gicr_size();
    let result = if distributor.contains(&ipa) {
        let offset = ipa - distributor.start;
        crate::mmio::emulate_or_abort(&mut vm.vgic.gicd(), trap.esr, offset, regs)
    } else if redistributors.contains(&ipa) {
        let offset = ipa - redistributors.start;
        crate::mmio::emulate_or_abort(&mut vm.vgic.gicr(), trap.esr, offset, regs)
    } else {
        return None;
    };
    crate::mm::counters::inc(&exits().mmio_emulated);
    Some(result)
}

/// Called from the current-EL vectors, on the emergency stack.
pub(crate) fn handle_el2_exception(regs: &GuestRegs, kind: vectors::Kind) -> ! {
    console::marker("PANIC", format_args!("{kind:?} exception at EL2"));
    report_trap("hypervisor (EL2)", regs);
    exit(exit_code::CRASH, "hypervisor-exception")
}

fn report_trap(origin: &str, regs: &GuestRegs) {
    let trap = Trap {
        esr: Esr(read_sysreg!("esr_el2")),
        far: read_sysreg!("far_el2"),
        hpfar: read_sysreg!("hpfar_el2"),
    };
    let report = TrapReport {
        origin,
        trap,
        elr: regs.elr,
        spsr: regs.spsr,
    };
    console::print_in_panic(format_args!("{report}\n"));
    print_registers(regs);
}

fn print_registers(regs: &GuestRegs) {
    for (i, pair) in regs.x.chunks(2).enumerate() {
        match pair {
            [a, b] => println!("  x{:<2} {a:#018x}  x{:<2} {b:#018x}", 2 * i, 2 * i + 1),
            [a] => println!("  x{:<2} {a:#018x}", 2 * i),
            _ => {}
        }
    }
}

/// Ends the run after the guest stopped: its report, the counters, the exit
/// status.
fn finish(stop: Stop, regs: &GuestRegs) -> ! {
    let vm = current_vm();
    match stop {
        Stop::SystemReset => reset_vm(vm),
        Stop::SystemOff => {
            let report = vm.lock().report;
            let status = match report {
                // A Linux guest does not report: powering off is its end.
                None if vm.is_linux() => exit_code::PASS,
                Some(r) if r.failed == 0 && r.passed > 0 => exit_code::PASS,
                Some(_) => exit_code::GUEST_FAILED,
                None => exit_code::NO_REPORT,
            };
            end_vm(vm, status, "system-off")
        }
        Stop::UnhandledTrap(trap) => {
            // The guest's own failure (its vector faults at once, so it can
            // take no exception): not a hypervisor crash. Reported, and the
            // VM ends without the guest's report.
            println!(
                "lazyhyp: vm{}: the guest cannot take exceptions (its vector faults); stopping it",
                vm.index + 1
            );
            let report = TrapReport {
                origin: "guest (EL1)",
                trap,
                elr: regs.elr,
                spsr: regs.spsr,
            };
            println!("{report}");
            print_registers(regs);
            end_vm(vm, exit_code::NO_REPORT, "guest-vector-faults")
        }
    }
}

fn print_stats() {
    let mut line = heapless_line();
    let mut add = |name: &str, value: u64| {
        let _ = write!(line, " {name}={value}");
    };
    for_each_counter(0..smp::MAX_PCPUS, &mut add);
    console::marker("STATS", format_args!("{}", line.as_str().trim_start()));
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
