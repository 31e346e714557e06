//! The VMs as this CPU runs them: the list of VMs (the only VM state in a
//! static), building each (VMID, stage 2, memory, devices, virtual GIC,
//! image), the per-CPU loop that waits for a vCPU to be turned on and
//! enters it, parking a vCPU, and a VM's end and reset.

#[allow(
    clippy::wildcard_imports,
    reason = "a part of the parent module, split for size: it uses the parent's items and imports"
)]
use super::*;
/// The VMs (VM 1 first): the only VM state outside the VMs themselves.
pub(crate) static VMS: Once<Vec<Vm>> = Once::new();
/// The VM (index in [`VMS`]) each physical CPU serves (`usize::MAX`:
/// none), fixed at boot (static partitioning).
pub(crate) static PCPU_VM: [AtomicUsize; smp::MAX_PCPUS] =
    [const { AtomicUsize::new(usize::MAX) }; smp::MAX_PCPUS];

/// A VM: its shared state under one lock, its vCPUs' power states, and
/// what each of its physical CPUs needs to enter it.
pub(crate) struct Vm {
    /// Index in [`VMS`] (the VM's name is `vm<index + 1>`).
    pub(crate) index: usize,
    /// What it runs, where, with how much RAM.
    pub(crate) spec: VmSpec,
    /// Stage 2, memory, devices, virtual GIC: the VM lock. Every exit that
    /// touches them takes it; stage-2 changes are serialised by it (the
    /// locking design: docs/lazy-mmu.md, "SMP").
    pub(crate) state: SpinMutex<VmState>,
    /// The vCPUs' PSCI power states (never held with `state`).
    pub(crate) power: SpinMutex<PowerTable>,
    /// `VTTBR_EL2` (its VMID and root), `VTCR_EL2` and `HCR_EL2.FWB`.
    pub(crate) vttbr: u64,
    pub(crate) vtcr: u64,
    pub(crate) fwb: bool,
    /// Guest RAM's IPA range (where `CPU_ON` entry points may be).
    pub(crate) ram_ipa: Range<Ipa>,
    /// Where the VM's RAM lives (its own slice of the guest backing).
    pub(crate) backing: Range<PhysAddr>,
    /// Where each vCPU's previous exit sent it with an injected abort
    /// (`u64::MAX`: it did not).
    pub(crate) last_vector: Vec<AtomicU64>,
    /// Set while the VM stops or resets: its vCPUs leave for the idle loop
    /// at their next exit (each is kicked).
    pub(crate) stopping: AtomicBool,
    /// Its vCPUs in a guest or a trap handler (not parked).
    pub(crate) running: AtomicU32,
    /// The VM ended: (status as in `exit_code`, reason).
    pub(crate) ended: SpinMutex<Option<(u32, &'static str)>>,
    /// Times it was reset (PSCI `SYSTEM_RESET`).
    pub(crate) resets: AtomicU32,
}

impl Vm {
    /// Takes the VM lock (counted: `vm_lock_uncontended`,
    /// `vm_lock_contended`). A change to the virtual GIC made under it must
    /// be followed by its kicks (`Vgic::take_kicks`), which is how the
    /// vCPUs it concerns learn of it (see `traps::VGIC_DIRTY`).
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

/// A VM's emulated PL011: what the guest writes goes to a console queue.
pub(crate) type GuestUart = crate::vm::mmio::Pl011<Box<dyn FnMut(u8) + Send>>;

/// A VM's state under its lock.
pub(crate) struct VmState {
    /// The guest's stage 2.
    pub(crate) stage2: Stage2<'static, HwMmArch>,
    /// The guest's RAM: backing, given-back pages, fault-around.
    pub(crate) mem: GuestMemory,
    /// The emulated PL011 (`None` with `guest.uart=passthrough`).
    pub(crate) uart: Option<GuestUart>,
    /// The virtual GIC: the guest's distributor and redistributors are
    /// emulated here, its interrupts delivered through list registers.
    pub(crate) vgic: Vgic,
    /// The real PL011 is the guest's (`guest.uart=passthrough`): its SPI is
    /// delivered hardware-backed.
    pub(crate) uart_hw_irq: bool,
    /// The emulated UART's receive FIFO was full: the real UART's receive
    /// interrupt is off until the guest makes room.
    pub(crate) rx_paused: bool,
    /// The test guest's report, once it made it.
    pub(crate) report: Option<GuestReport>,
}

/// The VM CPU `cpu` serves, if any.
pub(crate) fn vm_of(cpu: usize) -> Option<&'static Vm> {
    let index = PCPU_VM.get(cpu)?.load(Ordering::Relaxed);
    VMS.get()?.get(index)
}

/// The VM the executing CPU runs.
pub(crate) fn current_vm() -> &'static Vm {
    vm_of(smp::this_cpu()).expect("a guest exists while one runs")
}

/// The vCPU (index in its VM) the executing CPU runs.
pub(crate) fn current_vcpu() -> usize {
    smp::this_cpu() - current_vm().spec.first_cpu
}

/// The VM that receives what is typed on the console (the real UART's
/// input): the Linux VM if there is one, else VM 1.
pub(crate) fn rx_vm() -> Option<&'static Vm> {
    let vms = VMS.get()?;
    vms.iter().find(|vm| vm.is_linux()).or_else(|| vms.first())
}

/// Kicks the physical CPUs of the vCPUs in `mask` (bit i = vCPU i), other
/// than the executing one: each exits its guest (or wakes from its wait)
/// and loads what is now pending for it.
pub(crate) fn kick_vcpus(vm: &Vm, mask: u128) {
    for vcpu in (0..vm.spec.vcpus).filter(|v| mask & (1 << v) != 0) {
        smp::kick(vm.pcpu(vcpu));
    }
}

/// Top of CPU `cpu`'s EL2 stack.
pub(crate) fn stack_top(cpu: usize) -> usize {
    if cpu == 0 {
        el2map::ImageLayout::get().boot_stack.end.0
    } else {
        smp::secondary_stacks()[cpu - 1].end
    }
}

pub(crate) extern "C" fn idle_entry() -> ! {
    idle()
}

/// A physical CPU without a running vCPU: handles its interrupts and waits
/// until its vCPU is turned on (PSCI `CPU_ON`, the VM's start or reset).
pub(crate) fn idle() -> ! {
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
        if let Some(vm) = vm_of(cpu) {
            let vcpu = cpu - vm.spec.first_cpu;
            // Under the power lock, as a stop claims it (`claim_stop`): a
            // vCPU starts only while its VM is not stopping, and counts as
            // running from that moment. The lock is released before the
            // start (which never returns).
            let start = {
                let mut power = vm.power.lock();
                let start = (!vm.stopping.load(Ordering::Acquire))
                    .then(|| power.take_start(vcpu))
                    .flatten();
                if start.is_some() {
                    vm.running.fetch_add(1, Ordering::AcqRel);
                }
                start
            };
            if let Some(start) = start {
                start_vcpu(vm, vcpu, start);
            }
        }
        smp::wait_for_interrupt();
    }
}

/// Starts `vcpu` of `vm` on this CPU at `start`: the EL2 controls and
/// stage 2 of the VM, the vCPU's virtual MPIDR and GIC state, EL1 at reset.
pub(crate) fn start_vcpu(vm: &'static Vm, vcpu: usize, start: Start) -> ! {
    let cpu = smp::this_cpu();
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
    // Its first entry loads the list registers in full.
    mark_vgic_dirty();
    LR_IN_USE[cpu].store(true, Ordering::Relaxed);
    // The vCPU's timer starts disabled (its EL1 state is at reset).
    write_sysreg!("cntv_ctl_el0", 0);
    // The virtual CPU interface starts from the vCPU's state, not from what
    // reset (or the previous vCPU) left in ICH_VMCR_EL2 and the
    // active-priority registers; its hardware-backed interrupts start
    // inactive (the physical side was cleared when it last stopped).
    {
        let mut state = vm.lock();
        state.vgic.vcpu_restart(vcpu);
        state.vgic.vcpu_load(vcpu, &mut HwCpuInterface);
    }
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
/// resets): its physical CPU goes back to waiting, on a fresh stack. Its
/// virtual timer is stopped and the timer's physical interrupt cleared (a
/// hardware-backed interrupt left active would never fire again for the
/// next vCPU context on this CPU). Its virtual CPU interface state is kept
/// for a `CPU_OFF` only: a stopping VM's is discarded (after a reset the
/// VM's virtual GIC is a new one).
pub(crate) fn park() -> ! {
    let vm = current_vm();
    if !vm.stopping.load(Ordering::Acquire) {
        vm.lock().vgic.vcpu_put(current_vcpu(), &HwCpuInterface);
    }
    park_discarding_state()
}

/// [`park`] without saving the vCPU's virtual CPU interface state.
fn park_discarding_state() -> ! {
    let cpu = smp::this_cpu();
    let vm = current_vm();
    write_sysreg!("cntv_ctl_el0", 0);
    gic::clear_private(qemu_virt::VTIMER_PPI);
    vm.running.fetch_sub(1, Ordering::AcqRel);
    // SAFETY: this CPU's own stack; the trap frame on it belongs to a vCPU
    // that no longer runs.
    unsafe { vectors::reset_stack_and_call(stack_top(cpu), idle_entry) }
}

/// After an exit: if the vCPU's VM is stopping, the vCPU parks.
pub(crate) fn park_if_stopping() {
    if current_vm().stopping.load(Ordering::Acquire) {
        park();
    }
}

/// Claims the stop of `vm` for the calling vCPU: one stop at a time
/// (`SYSTEM_OFF`, `SYSTEM_RESET`, the last `CPU_OFF`, a guest that cannot
/// take exceptions). Under the power lock it sets `stopping` and turns
/// every vCPU off, so no vCPU starts from here on. Returns false if another
/// vCPU claimed it first: the caller parks (its own request is overtaken).
pub(crate) fn claim_stop(vm: &Vm) -> bool {
    let mut power = vm.power.lock();
    if vm.stopping.swap(true, Ordering::AcqRel) {
        return false;
    }
    power.power_off_all();
    true
}

/// After [`claim_stop`]: kicks every other vCPU of `vm` (each exits, sees
/// `stopping` and parks) and waits, bounded by 10 s of the counter, until
/// they all did. Returns whether they did.
pub(crate) fn wait_others_parked(vm: &Vm) -> bool {
    kick_vcpus(vm, u128::MAX);
    let freq = read_sysreg!("cntfrq_el0");
    let start = read_sysreg!("cntpct_el0");
    // This vCPU is the one left running.
    while vm.running.load(Ordering::Acquire) > 1 {
        if read_sysreg!("cntpct_el0").wrapping_sub(start) > 10 * freq {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// `vm` ended (`status` as in [`exit_code`], `reason`): its verdict is
/// printed, its vCPUs stop; when every VM has ended, so does the run
/// (with the worst status). The calling vCPU (of `vm`) parks.
pub(crate) fn end_vm(vm: &'static Vm, status: u32, reason: &'static str) -> ! {
    if !claim_stop(vm) {
        park();
    }
    end_claimed_vm(vm, status, reason)
}

/// [`end_vm`] once the stop is claimed.
fn end_claimed_vm(vm: &'static Vm, status: u32, reason: &'static str) -> ! {
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
    let _ = wait_others_parked(vm);
    park()
}

/// `vm` resets (PSCI `SYSTEM_RESET` from a vCPU): every other vCPU parks,
/// its stage 2 is emptied (tables freed, TLB entries of its VMID
/// invalidated), its RAM zeroed and its image reloaded, its devices and
/// virtual GIC made anew, and vCPU 0 started as at boot. The other VMs run
/// on throughout.
pub(crate) fn reset_vm(vm: &'static Vm) -> ! {
    if !claim_stop(vm) {
        park();
    }
    if !wait_others_parked(vm) {
        // A vCPU that does not exit within 10 s: the VM cannot be reset
        // safely; it ends (the others go on).
        end_claimed_vm(vm, exit_code::NO_REPORT, "reset-timeout");
    }
    let boot = BOOT.get().expect("kept at boot");
    {
        let mut state = vm.lock();
        let mm = MM.get().expect("mm exists");
        let size = vm.ram_ipa.end.offset_from(vm.ram_ipa.start);
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
        if core::mem::take(&mut state.rx_paused) {
            // The old UART's full FIFO had turned the real UART's receive
            // interrupt off: the new one is empty.
            console::set_rx_interrupt(true);
        }
        state.report = None;
    }
    let resets = vm.resets.fetch_add(1, Ordering::AcqRel) + 1;
    log::info!("vm{}: reset {resets}: reloading its image", vm.index + 1);
    let start = load_image(vm, boot);
    if vm.lock().uart_hw_irq {
        // A passed-through UART's interrupt the old guest left active.
        gic::clear_active_spi(qemu_virt::UART_SPI);
    }
    {
        // As a start checks them: under the power lock.
        let mut power = vm.power.lock();
        power.power_on(0, start);
        vm.stopping.store(false, Ordering::Release);
    }
    kick_vcpus(vm, 1);
    // The old guest's virtual CPU interface state is not carried into the
    // new virtual GIC.
    park_discarding_state()
}

/// Creates the page pool and the VMs of the configuration: for each, its
/// own VMID, stage 2, slice of the guest backing, image, devices, virtual
/// GIC and vCPUs (vCPU i on CPU `first_cpu + i`), with vCPU 0 to start.
pub(crate) fn build_vms(layout: &Layout, boot: &BootInfo, vtcr: u64) {
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
    if args.uart_passthrough && config.len() > 1 {
        // A VM with the real UART could silence every other VM's console
        // and the run's markers.
        setup_error(format_args!(
            "guest.uart=passthrough gives one VM the console UART: not with several VMs"
        ));
    }
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
        let backing = next_backing..next_backing.add(size);
        next_backing = backing.end;
        vms.push(build_vm(index, spec, vmid, backing, boot, vtcr));
        for cpu in spec.cpus() {
            PCPU_VM[cpu].store(index, Ordering::Relaxed);
        }
    }
    VMS.call_once(|| vms);
}

/// Builds VM `index` (VMID `vmid`) over `backing` and loads its image.
pub(crate) fn build_vm(
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
    let ram_ipa = GUEST_RAM_IPA..GUEST_RAM_IPA.add(guest_ram as u64);
    let mut stage2 = Stage2::new(vmid, mm, pool)
        .unwrap_or_else(|e| setup_error(format_args!("stage-2 root table: {e:?}")));
    let ram = crate::vm::guest_mm::GuestRam {
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
            // Passed through at its physical address: IPA = PA.
            .map(
                Ipa(PL011_BASE as u64),
                PAGE_SIZE,
                PhysAddr(PL011_BASE),
                S2Attrs::DEVICE,
            )
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
pub(crate) fn new_guest_memory(ram: crate::vm::guest_mm::GuestRam, args: &BootArgs) -> GuestMemory {
    let mut mem = GuestMemory::new(ram, args.fault_around_kib << 10);
    // Each run of backing newly mapped for the guest is cleaned first
    // (without FEAT_S2FWB): bounded by what is mapped.
    mem.set_on_map(|pa, len| coherency().before_guest_map(&cache::HwCacheOps, pa, len));
    mem
}

/// A virtual GIC for `vcpus` vCPUs (the UART's SPI hardware-backed if the
/// VM has the real UART).
pub(crate) fn new_vgic(vcpus: usize, uart_hw_irq: bool) -> Vgic {
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
pub(crate) fn new_uart(index: usize) -> GuestUart {
    crate::vm::mmio::Pl011::new(Box::new(move |b| console::push(index, b)))
}

/// (Re)loads `vm`'s image into its backing, which it zeroes first, and
/// returns where vCPU 0 starts. The test guest gets its flags in `x1`, the
/// unmap benchmark size in `x2`; Linux the device tree in `x0`.
pub(crate) fn load_image(vm: &Vm, boot: &BootInfo) -> Start {
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
pub(crate) const SPSR_EL1H_MASKED: u64 = 0x3c5;

/// Ends the run after the guest stopped: its report, the counters, the exit
/// status.
pub(crate) fn finish(stop: Stop, regs: &GuestRegs) -> ! {
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
