//! Trap entry points from the vectors: a vCPU's synchronous exits (SMCCC
//! and PSCI, stage-2 aborts and MMIO, system registers), exception
//! injection, physical interrupts at EL2, and the virtual GIC's world
//! switch around every exit.

#[allow(
    clippy::wildcard_imports,
    reason = "a part of the parent module, split for size: it uses the parent's items and imports"
)]
use super::*;

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
pub(crate) fn handle_sync(regs: &mut GuestRegs) -> bool {
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
                    let targets = others_after_self(targets, vcpu);
                    crate::mm::counters::inc(&exits().sysreg_emulated);
                    kick_vcpus(vm, targets);
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
                    .permission_fault_is_stale(&vm.stage2, Ipa(ipa), write, exec)
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
                let kicks = others_after_self(vm.vgic.take_kicks(), vcpu);
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
                    && crate::vm::mmio::emulate(uart, trap.esr, ipa - base, regs)
                {
                    crate::mm::counters::inc(&exits().mmio_emulated);
                    uart_accessed(vm);
                    let kicks = others_after_self(vm.vgic.take_kicks(), vcpu);
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
                    .stage2_fault(&mut vm.stage2, MM.get().expect("mm exists"), Ipa(ipa), fsc);
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
pub(crate) fn psci(vm: &'static Vm, vcpu: usize, call: PsciCall, regs: &mut GuestRegs) -> bool {
    let status = |code: i64| u64::from_ne_bytes(code.to_ne_bytes());
    match call {
        PsciCall::CpuOn {
            target,
            entry,
            context,
        } => {
            let result = vm.power.lock().cpu_on(
                target,
                entry,
                context,
                &(vm.ram_ipa.start.0..vm.ram_ipa.end.0),
            );
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
pub(crate) fn sysreg(
    trap: Trap,
    access: crate::vm::sysreg_emul::SysregAccess,
    regs: &mut GuestRegs,
) {
    match crate::vm::sysreg_emul::classify(&access) {
        SysregAction::Undefined => inject_undefined(trap, regs),
        action => {
            let value = match action {
                SysregAction::IdRead { crm, op2 } => Some(crate::vm::sysreg_emul::sanitise_id(
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
pub(crate) fn setway_flush() {
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
pub(crate) fn clean_guest_ram() {
    let backing = current_vm().lock().mem.ram.backing_range();
    cache::HwCacheOps
        .clean_invalidate_to_poc(backing.start, backing.end.offset_from(backing.start));
    crate::mm::counters::inc(&exits().setway_flushes);
}

/// `SCTLR_EL1.M` and `C`: the guest's data accesses are cacheable.
pub(crate) const SCTLR_M_C: u64 = 0b101;

/// A guest write to a register `HCR_EL2.TVM` traps: performed as written.
/// For `SCTLR_EL1`, a change of the guest's cache state cleans guest RAM
/// (what it wrote cacheable must reach memory before it runs uncached, and
/// no stale line may shadow what it wrote uncached once the caches are on
/// again), and once its caches are on the trap is lifted.
pub(crate) fn vm_register_write(reg: crate::vm::sysreg_emul::VmRegister, value: u64) {
    use crate::vm::sysreg_emul::VmRegister as R;
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
pub(crate) fn deliver(inj: &Injection, regs: &mut GuestRegs) {
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
pub(crate) fn inject_undefined(trap: Trap, regs: &mut GuestRegs) {
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
pub(crate) fn inject_abort(trap: Trap, regs: &mut GuestRegs, last_vector: u64) {
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
pub(crate) fn handle_irq(intid: u32) {
    gic::priority_drop(intid);
    if intid == smp::KICK_SGI {
        // Another CPU changed what this vCPU must see (an interrupt for
        // it, a stop): the exit itself was the point; the entry that
        // follows loads it.
        mark_vgic_dirty();
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
        qemu_virt::VTIMER_PPI => {
            vm.vgic.inject_hw_ppi(vcpu, intid);
            mark_vgic_dirty();
        }
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
    let kicks = if core::ptr::eq(target, current_vm()) {
        others_after_self(kicks, current_vcpu())
    } else {
        kicks
    };
    kick_vcpus(target, kicks);
}

/// Of the vCPUs a virtual GIC change concerns (`kicks`, bit i = vCPU i),
/// the executing `vcpu` reloads at its next entry ([`mark_vgic_dirty`]);
/// returns the others, to be kicked.
fn others_after_self(kicks: u128, vcpu: usize) -> u128 {
    let me = 1u128.checked_shl(vcpu as u32).unwrap_or(0);
    if kicks & me != 0 {
        mark_vgic_dirty();
    }
    kicks & !me
}

/// Moves what the real UART received into the guest's emulated UART, as
/// much as its receive FIFO takes, and updates the guest's interrupt line.
/// While the emulated FIFO is full the real UART's receive interrupt is off
/// (the bytes wait in the real UART, and the level-triggered interrupt
/// cannot keep firing); a guest read that makes room turns it back on
/// ([`uart_accessed`]).
pub(crate) fn forward_rx(vm: &mut VmState) {
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
pub(crate) fn uart_accessed(vm: &mut VmState) {
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

/// Per CPU: the last entry left something in the list registers, or asked
/// for a maintenance interrupt. When not, the exit has nothing to fold.
pub(crate) static LR_IN_USE: [AtomicBool; smp::MAX_PCPUS] =
    [const { AtomicBool::new(true) }; smp::MAX_PCPUS];

/// Per CPU: the virtual GIC state of its vCPU may have changed since its
/// last entry. Every change the virtual GIC makes for a vCPU names it
/// (`Vgic::take_kicks`: distributor and redistributor writes, SPI lines
/// and edges; `SgiSent`); a change for the executing vCPU sets this
/// ([`others_after_self`]), one for another vCPU kicks its CPU, whose kick
/// handler sets it there. Also set by the virtual timer's injection, by
/// folding list registers back at an exit (what is still pending must be
/// loaded again), and at a vCPU's start; cleared by the entry that loads
/// the list registers.
static VGIC_DIRTY: [AtomicBool; smp::MAX_PCPUS] = [const { AtomicBool::new(true) }; smp::MAX_PCPUS];

/// The executing CPU's vCPU must reload its list registers at its next
/// entry.
pub(crate) fn mark_vgic_dirty() {
    if let Some(flag) = VGIC_DIRTY.get(smp::this_cpu()) {
        flag.store(true, Ordering::Relaxed);
    }
}

/// After every exit, before anything may inject or emulate: fold the list
/// registers back into the virtual GIC. Skipped (no VM lock taken) when the
/// last entry loaded nothing and asked for no maintenance: every list
/// register is empty and the virtual interface raised nothing to read. (A
/// guest EOI without a list register, counted by `ICH_HCR_EL2.EOIcount`,
/// is then not counted: it only feeds the `eoi_without_lr` statistic.)
pub(crate) fn vgic_exit() {
    let cpu = smp::this_cpu();
    let Some(vm) = vm_of(cpu) else {
        return;
    };
    if !LR_IN_USE[cpu].load(Ordering::Relaxed) {
        return;
    }
    vm.lock().vgic.exit(current_vcpu(), &mut HwCpuInterface);
    LR_IN_USE[cpu].store(false, Ordering::Relaxed);
    // What was in the list registers may still be pending (or have become
    // pending again): the next entry loads it.
    VGIC_DIRTY[cpu].store(true, Ordering::Relaxed);
}

/// Before every entry: physically deactivate what the guest deactivated
/// through the emulated registers, then load the list registers. Returns
/// how many interrupts are loaded. Skipped (no VM lock taken) when the list
/// registers are empty and nothing concerning this vCPU changed since its
/// last entry ([`VGIC_DIRTY`]): the load would find nothing either.
pub(crate) fn vgic_enter() -> usize {
    let cpu = smp::this_cpu();
    let Some(vm) = vm_of(cpu) else {
        return 0;
    };
    if !VGIC_DIRTY[cpu].load(Ordering::Relaxed) && !LR_IN_USE[cpu].load(Ordering::Relaxed) {
        crate::mm::counters::inc(&exits().vgic_entries_skipped);
        return 0;
    }
    // Cleared before the load: a kick that lands from here on sets it
    // again and is seen at the next exit.
    VGIC_DIRTY[cpu].store(false, Ordering::Relaxed);
    let vcpu = current_vcpu();
    let mut vm = vm.lock();
    let ppis = vm.vgic.take_hw_deactivations(vcpu);
    for intid in (0..32).filter(|i| ppis & (1 << i) != 0) {
        gic::deactivate(intid);
    }
    for intid in vm.vgic.take_hw_spi_deactivations() {
        gic::deactivate(intid);
    }
    let report = vm.vgic.enter(vcpu, &mut HwCpuInterface);
    let maintenance = report.hcr & !crate::vm::vgic::cpuif::hcr::EN != 0;
    LR_IN_USE[cpu].store(report.loaded > 0 || maintenance, Ordering::Relaxed);
    report.loaded
}

/// A trapped access to the virtual GIC's frames: `None` if `ipa` is not in
/// them; `Some(Err)` if it must be answered with an external abort.
pub(crate) fn vgic_mmio(
    vm: &mut VmState,
    trap: Trap,
    ipa: u64,
    regs: &mut GuestRegs,
) -> Option<Result<(), crate::vm::mmio::MmioError>> {
    let distributor = qemu_virt::GICD_BASE..qemu_virt::GICD_BASE + qemu_virt::GICD_SIZE;
    let redistributors = qemu_virt::GICR_BASE..qemu_virt::GICR_BASE + vm.vgic.gicr_size();
    let result = if distributor.contains(&ipa) {
        let offset = ipa - distributor.start;
        crate::vm::mmio::emulate_or_abort(&mut vm.vgic.gicd(), trap.esr, offset, regs)
    } else if redistributors.contains(&ipa) {
        let offset = ipa - redistributors.start;
        crate::vm::mmio::emulate_or_abort(&mut vm.vgic.gicr(), trap.esr, offset, regs)
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

pub(crate) fn report_trap(origin: &str, regs: &GuestRegs) {
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

pub(crate) fn print_registers(regs: &GuestRegs) {
    for (i, pair) in regs.x.chunks(2).enumerate() {
        match pair {
            [a, b] => println!("  x{:<2} {a:#018x}  x{:<2} {b:#018x}", 2 * i, 2 * i + 1),
            [a] => println!("  x{:<2} {a:#018x}", 2 * i),
            _ => {}
        }
    }
}
