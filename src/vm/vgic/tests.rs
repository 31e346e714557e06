//! Whole-vGIC tests: Linux's initialisation sequence through the MMIO
//! devices, and the world switch (list registers in, guest actions, fold
//! back) against the fake CPU interface.

use alloc::vec::Vec;
use core::sync::atomic::Ordering::Relaxed;

use super::cpuif::{FakeCpuInterface, hcr, lr, misr};
use super::dist::reg as gicd;
use super::qemu_virt::{UART_SPI, VTIMER_PPI};
use super::redist::{FRAME_SIZE, REDIST_SIZE, TYPER_LAST, WAKER_CHILDREN_ASLEEP, rd, sgi};
use super::*;
use crate::esr::{Esr, ec};
use crate::vm::mmio::emulate_or_abort;
use crate::vm::vcpu::GuestRegs;

fn vgic(nr_vcpus: usize) -> Vgic {
    Vgic::new(
        &VgicConfig::qemu_virt(nr_vcpus),
        FakeCpuInterface::qemu().vtr,
    )
}

/// Every access of the sequence must be accepted.
fn rd32(dev: &mut dyn MmioDevice, offset: u64) -> u32 {
    dev.try_read(offset, 4).expect("32-bit access accepted") as u32
}

fn wr32(dev: &mut dyn MmioDevice, offset: u64, value: u32) {
    dev.try_write(offset, u64::from(value), 4)
        .expect("32-bit access accepted");
}

/// Linux's `gic_dist_init` (irq-gic-v3.c and irq-gic-common.c's
/// `gic_dist_config`), in its order, for the boot CPU with MPIDR `mpidr`.
/// Returns the number of interrupt lines it configured.
fn linux_dist_init(v: &mut Vgic, mpidr: u64) -> u32 {
    let mut d = v.gicd();
    assert_eq!(rd32(&mut d, gicd::PIDR2) & 0xf0, 0x30, "GICv3");
    let typer = rd32(&mut d, gicd::TYPER);
    let lines = ((typer & 0x1f) + 1) * 32;
    let _iidr = rd32(&mut d, gicd::IIDR);
    let _typer2 = rd32(&mut d, gicd::TYPER2);
    // Disable, wait for RWP.
    wr32(&mut d, gicd::CTLR, 0);
    assert_eq!(rd32(&mut d, gicd::CTLR) >> 31, 0, "RWP clear");
    for i in (32..lines).step_by(32) {
        wr32(&mut d, gicd::IGROUPR + u64::from(i / 8), !0);
    }
    // gic_dist_config: level, default priority, deactivate and disable.
    for i in (32..lines).step_by(16) {
        wr32(&mut d, gicd::ICFGR + u64::from(i / 4), 0);
    }
    for i in (32..lines).step_by(4) {
        wr32(&mut d, gicd::IPRIORITYR + u64::from(i), 0xa0a0_a0a0);
    }
    for i in (32..lines).step_by(32) {
        wr32(&mut d, gicd::ICACTIVER + u64::from(i / 8), !0);
        wr32(&mut d, gicd::ICENABLER + u64::from(i / 8), !0);
    }
    // ARE_NS | ENABLE_G1A | ENABLE_G1, wait for RWP.
    wr32(&mut d, gicd::CTLR, 0x13);
    assert_eq!(rd32(&mut d, gicd::CTLR) >> 31, 0, "RWP clear");
    let affinity = mpidr & 0xff_00ff_ffff;
    let affinity = (affinity >> 32) << 32 | (affinity & 0xff_ffff);
    for i in 32..lines {
        d.try_write(gicd::IROUTER + 8 * u64::from(i), affinity, 8)
            .expect("64-bit IROUTER write accepted");
    }
    lines
}

/// Linux's `gic_populate_rdist`: walks the redistributor region from its
/// start until the frame whose `GICR_TYPER` affinity is the CPU's, stopping
/// at `Last`. Returns the offset of the CPU's redistributor.
fn linux_populate_rdist(v: &mut Vgic, mpidr: u64) -> Option<u64> {
    let aff = ((mpidr >> 32 & 0xff) << 24 | (mpidr & 0xff_ffff)) as u32;
    let mut r = v.gicr();
    let mut ptr = 0;
    loop {
        if rd32(&mut r, ptr + rd::PIDR2) & 0xf0 != 0x30 {
            return None;
        }
        let typer = r.try_read(ptr + rd::TYPER, 8).expect("64-bit GICR_TYPER");
        if (typer >> 32) as u32 == aff {
            return Some(ptr);
        }
        if typer & TYPER_LAST != 0 {
            return None;
        }
        // Two frames per redistributor, four with VLPIs.
        ptr += if typer & 0b10 != 0 { 4 } else { 2 } * FRAME_SIZE;
    }
}

/// Linux's `gic_enable_redist(true)`, `gic_cpu_init`'s SGI/PPI setup
/// (`gic_cpu_config`), and enabling the virtual timer PPI. Returns the
/// number of `WAKER` polls the handshake took.
fn linux_cpu_init(v: &mut Vgic, rbase: u64) -> u32 {
    let mut r = v.gicr();
    let waker = rd32(&mut r, rbase + rd::WAKER);
    wr32(&mut r, rbase + rd::WAKER, waker & !2);
    let mut polls = 0;
    loop {
        polls += 1;
        assert!(polls < 1000, "ChildrenAsleep never cleared");
        if rd32(&mut r, rbase + rd::WAKER) & WAKER_CHILDREN_ASLEEP == 0 {
            break;
        }
    }
    let sgi_base = rbase + FRAME_SIZE;
    wr32(&mut r, sgi_base + sgi::IGROUPR0, !0);
    wr32(&mut r, sgi_base + sgi::ICACTIVER0, !0);
    wr32(&mut r, sgi_base + sgi::ICENABLER0, !0);
    for i in (0..32).step_by(4) {
        wr32(&mut r, sgi_base + sgi::IPRIORITYR + i, 0xa0a0_a0a0);
    }
    // gic_redist_wait_for_rwp.
    assert_eq!(rd32(&mut r, rbase + rd::CTLR) & (1 << 3), 0, "RWP clear");
    // The arch timer driver: gic_set_type (level: ICFGR1 bit stays 0),
    // then unmask (ISENABLER0).
    let icfgr1 = sgi_base + sgi::ICFGR0 + 4;
    let cfg = rd32(&mut r, icfgr1);
    wr32(&mut r, icfgr1, cfg & !(2 << (2 * (VTIMER_PPI - 16))));
    assert_eq!(rd32(&mut r, icfgr1), cfg, "level, as Linux wants it");
    wr32(&mut r, sgi_base + sgi::ISENABLER0, 1 << VTIMER_PPI);
    polls
}

#[test]
fn linux_init_sequence_gets_what_linux_expects() {
    let mut v = vgic(2);
    let lines = linux_dist_init(&mut v, Vgic::mpidr(0));
    assert!(lines > UART_SPI, "ITLinesNumber covers the UART's SPI");
    assert!(v.dist.group_enabled(true));
    let uart = v.irq(0, UART_SPI).expect("exists");
    assert_eq!((uart.priority, uart.group1, uart.edge), (0xa0, true, false));
    assert_eq!(v.spi_target(UART_SPI), Some(0));
    for cpu in 0..2 {
        let rbase = linux_populate_rdist(&mut v, Vgic::mpidr(cpu)).expect("found");
        assert_eq!(rbase, cpu as u64 * REDIST_SIZE);
        assert_eq!(linux_cpu_init(&mut v, rbase), 1, "WAKER handshake at once");
        let timer = v.irq(cpu, VTIMER_PPI).expect("exists");
        assert!(timer.enabled && timer.group1 && timer.hw);
        assert_eq!(timer.priority, 0xa0);
        assert!(v.redists[cpu].awake());
    }
    // Last on the last redistributor only.
    let mut r = v.gicr();
    assert_eq!(r.read(rd::TYPER, 8) & TYPER_LAST, 0);
    assert_ne!(r.read(REDIST_SIZE + rd::TYPER, 8) & TYPER_LAST, 0);
    // A CPU with no redistributor is not found (the walk stops at Last).
    assert_eq!(linux_populate_rdist(&mut v, Vgic::mpidr(2)), None);
    let c = v.counters();
    assert_eq!(c.unemulated_reads.load(Relaxed), 0);
    assert_eq!(c.unemulated_writes.load(Relaxed), 0);
    assert_eq!(c.bad_accesses.load(Relaxed), 0);
}

/// A Linux-initialised VM with `n` vCPUs.
fn booted(n: usize) -> Vgic {
    let mut v = vgic(n);
    linux_dist_init(&mut v, Vgic::mpidr(0));
    for cpu in 0..n {
        linux_cpu_init(&mut v, cpu as u64 * REDIST_SIZE);
        // Linux enables its IPIs (SGIs 0..7).
        wr32(
            &mut v.gicr(),
            cpu as u64 * REDIST_SIZE + FRAME_SIZE + sgi::ISENABLER0,
            0xff,
        );
    }
    v
}

#[test]
fn the_timer_goes_in_with_the_hw_bit_and_the_guests_eoi_finishes_it() {
    let mut v = booted(1);
    let mut cpu = FakeCpuInterface::qemu();
    v.inject_hw_ppi(0, VTIMER_PPI);
    let entry = v.enter(0, &mut cpu);
    assert_eq!(entry.loaded, 1);
    assert_eq!(entry.hcr, hcr::EN, "everything fits: no maintenance");
    let expected = u64::from(VTIMER_PPI)
        | u64::from(VTIMER_PPI) << lr::PINTID_SHIFT
        | 0xa0 << lr::PRIORITY_SHIFT
        | lr::GROUP1
        | lr::HW
        | lr::PENDING;
    assert_eq!(cpu.lrs[0], expected);
    assert_eq!(cpu.lrs[1..4], [0, 0, 0]);
    assert!(v.irq(0, VTIMER_PPI).expect("exists").in_lr);
    assert_eq!(cpu.guest_acknowledge(), Some(VTIMER_PPI));
    // An exit while the guest handles it: active in memory, reloaded active.
    v.exit(0, &mut cpu);
    assert_eq!(cpu.hcr, 0, "interface off while the hypervisor runs");
    assert_eq!(cpu.lrs[0], 0, "emptied");
    let timer = v.irq(0, VTIMER_PPI).expect("exists");
    assert!(timer.active && !timer.pending() && !timer.in_lr);
    v.enter(0, &mut cpu);
    assert_eq!(cpu.lrs[0] >> 62, 0b10, "active");
    assert!(cpu.guest_eoi(VTIMER_PPI));
    v.exit(0, &mut cpu);
    let timer = v.irq(0, VTIMER_PPI).expect("exists");
    assert!(!timer.active && !timer.pending());
    assert_eq!(v.enter(0, &mut cpu).loaded, 0);
}

/// Pends SGIs `intids` on vCPU 0 with the given priorities.
fn pend_sgis(v: &mut Vgic, sgis: &[(u32, u8)]) {
    let mut r = v.gicr();
    for &(intid, priority) in sgis {
        r.try_write(
            FRAME_SIZE + sgi::IPRIORITYR + u64::from(intid),
            u64::from(priority),
            1,
        )
        .expect("byte");
        wr32(&mut r, FRAME_SIZE + sgi::ISPENDR0, 1 << intid);
    }
}

#[test]
fn more_pending_than_list_registers_refills_on_maintenance_in_priority_order() {
    let mut v = booted(1);
    let mut cpu = FakeCpuInterface::qemu();
    // Six SGIs for four list registers.
    let sgis = [
        (0, 0x50),
        (1, 0x10),
        (2, 0x40),
        (3, 0x20),
        (4, 0x30),
        (5, 0x60),
    ];
    pend_sgis(&mut v, &sgis);
    let entry = v.enter(0, &mut cpu);
    assert_eq!((entry.loaded, entry.left_out), (4, 2));
    assert_eq!(entry.hcr, hcr::EN | hcr::NPIE);
    let mut in_lrs: Vec<u64> = cpu.lrs[..4].iter().map(|l| l & 0xf).collect();
    in_lrs.sort_unstable();
    assert_eq!(in_lrs, [1, 2, 3, 4], "the four most urgent");
    assert_eq!(cpu.misr(), 0, "pending ones loaded: no maintenance yet");
    // The guest takes all four (nested: each preempts nothing, just acks).
    let taken: Vec<u32> = (0..4).filter_map(|_| cpu.guest_acknowledge()).collect();
    assert_eq!(taken, [1, 3, 4, 2], "by priority");
    assert_eq!(cpu.misr(), misr::NP, "nothing pending: maintenance");
    let exit = v.exit(0, &mut cpu);
    assert_eq!(exit.misr, misr::NP);
    // All four are active and must stay resident: underflow this time.
    let entry = v.enter(0, &mut cpu);
    assert_eq!((entry.loaded, entry.left_out), (4, 2));
    assert_eq!(entry.hcr, hcr::EN | hcr::UIE);
    assert_eq!(cpu.misr(), 0);
    for intid in [2, 4] {
        assert!(cpu.guest_eoi(intid));
    }
    assert_eq!(cpu.misr(), 0, "two still valid");
    assert!(cpu.guest_eoi(3));
    assert_eq!(cpu.misr(), misr::U, "one valid: underflow");
    v.exit(0, &mut cpu);
    // Refill: the active one, then the two that waited, by priority.
    let entry = v.enter(0, &mut cpu);
    assert_eq!((entry.loaded, entry.left_out, entry.hcr), (3, 0, hcr::EN));
    assert_eq!(cpu.guest_acknowledge(), Some(0));
    assert_eq!(cpu.guest_acknowledge(), Some(5));
    assert_eq!(cpu.guest_acknowledge(), None);
    for intid in [5, 0, 1] {
        assert!(cpu.guest_eoi(intid));
    }
    v.exit(0, &mut cpu);
    assert_eq!(v.enter(0, &mut cpu).loaded, 0, "all six delivered once");
    assert_eq!(v.counters().lr_overflows.load(Relaxed), 2);
    assert_eq!(v.counters().maintenance_exits.load(Relaxed), 2);
}

#[test]
fn disabled_ungrouped_or_asleep_interrupts_stay_out_of_list_registers() {
    let mut v = booted(1);
    let mut cpu = FakeCpuInterface::qemu();
    // SGI 9 is not enabled by Linux's IPI setup above.
    pend_sgis(&mut v, &[(9, 0)]);
    assert_eq!(v.enter(0, &mut cpu).loaded, 0);
    v.exit(0, &mut cpu);
    pend_sgis(&mut v, &[(1, 0)]);
    // Group 1 disabled at the distributor: nothing forwarded.
    wr32(&mut v.gicd(), gicd::CTLR, 0);
    assert_eq!(v.enter(0, &mut cpu).loaded, 0);
    v.exit(0, &mut cpu);
    wr32(&mut v.gicd(), gicd::CTLR, 0x13);
    // Redistributor asleep: nothing forwarded.
    wr32(&mut v.gicr(), rd::WAKER, 2);
    assert_eq!(v.enter(0, &mut cpu).loaded, 0);
    v.exit(0, &mut cpu);
    wr32(&mut v.gicr(), rd::WAKER, 0);
    assert_eq!(v.enter(0, &mut cpu).loaded, 1);
    assert_eq!(cpu.guest_acknowledge(), Some(1));
}

#[test]
fn a_level_interrupt_is_resampled_at_deactivation() {
    let mut v = booted(1);
    let mut cpu = FakeCpuInterface::qemu();
    wr32(&mut v.gicd(), gicd::ISENABLER + 4, 1 << (UART_SPI - 32));
    assert_eq!(v.set_spi_level(UART_SPI, true), Some(0));
    v.enter(0, &mut cpu);
    assert_ne!(cpu.lrs[0] & lr::EOI, 0, "EOI maintenance requested");
    assert_eq!(cpu.lrs[0] & lr::HW, 0);
    assert_eq!(cpu.guest_acknowledge(), Some(UART_SPI));
    // The guest's handler reads the UART (an exit) but the line stays high.
    v.exit(0, &mut cpu);
    v.enter(0, &mut cpu);
    assert_eq!(cpu.lrs[0] >> 62, 0b11, "active and still pending");
    // It clears the interrupt at the device (another exit), then EOIs.
    v.exit(0, &mut cpu);
    assert_eq!(v.set_spi_level(UART_SPI, false), None);
    v.enter(0, &mut cpu);
    assert_eq!(cpu.lrs[0] >> 62, 0b10, "active only");
    assert!(cpu.guest_eoi(UART_SPI));
    assert_eq!(cpu.misr(), misr::EOI);
    v.exit(0, &mut cpu);
    assert_eq!(v.enter(0, &mut cpu).loaded, 0);
}

#[test]
fn an_spi_the_guest_made_edge_triggered_latches_on_the_rising_edge() {
    let mut v = booted(1);
    let mut cpu = FakeCpuInterface::qemu();
    wr32(&mut v.gicd(), gicd::ISENABLER + 4, 1 << (UART_SPI - 32));
    // ICFGR2 covers INTIDs 32..47: INTID 33 is field 1, bit 3 = edge.
    wr32(&mut v.gicd(), gicd::ICFGR + 8, 0b10 << 2);
    assert_eq!(v.set_spi_level(UART_SPI, true), Some(0));
    // The line drops before the guest runs: the edge was still seen.
    assert_eq!(v.set_spi_level(UART_SPI, false), None);
    assert!(v.irq(0, UART_SPI).expect("exists").pending());
    assert_eq!(v.enter(0, &mut cpu).loaded, 1);
    assert_eq!(cpu.guest_acknowledge(), Some(UART_SPI));
    assert!(cpu.guest_eoi(UART_SPI));
    v.exit(0, &mut cpu);
    assert_eq!(v.enter(0, &mut cpu).loaded, 0, "delivered once");
}

#[test]
fn sgis_route_by_affinity_and_group() {
    let mut v = booted(3);
    let mut cpu = FakeCpuInterface::qemu();
    // vCPU 0 sends SGI 3 to Aff0 1 and 2 (target list bits 1, 2).
    let value = 3 << 24 | 0b110;
    assert_eq!(v.send_sgi(0, SgiRegister::Sgi1r, value), 0b110);
    assert!(v.irq(1, 3).expect("exists").pending());
    assert!(v.irq(2, 3).expect("exists").pending());
    assert!(!v.irq(0, 3).expect("exists").pending());
    v.enter(1, &mut cpu);
    assert_eq!(cpu.guest_acknowledge(), Some(3));
    // IRM: everyone but the sender.
    assert_eq!(v.send_sgi(1, SgiRegister::Sgi1r, 1 << 40 | 4 << 24), 0b101);
    // SGI0R cannot raise a group-1 SGI.
    assert_eq!(v.send_sgi(0, SgiRegister::Sgi0r, 5 << 24 | 0b10), 0);
    assert_eq!(v.send_sgi(0, SgiRegister::Asgi1r, 5 << 24 | 0b10), 0);
    // An affinity with no vCPU, a sender that does not exist.
    assert_eq!(v.send_sgi(0, SgiRegister::Sgi1r, 1 << 16 | 3 << 24 | 1), 0);
    assert_eq!(v.send_sgi(7, SgiRegister::Sgi1r, 3 << 24 | 1), 0);
    assert_eq!(v.counters().sgis_sent.load(Relaxed), 4);
}

#[test]
fn an_sgi_sent_again_while_its_first_is_in_a_list_register_is_not_lost() {
    let mut v = booted(2);
    let mut cpu1 = FakeCpuInterface::qemu();
    v.send_sgi(0, SgiRegister::Sgi1r, 2 << 24 | 0b10);
    v.enter(1, &mut cpu1);
    assert_eq!(cpu1.guest_acknowledge(), Some(2));
    // vCPU 0 (on another physical CPU) sends it again before vCPU 1 exits.
    v.send_sgi(0, SgiRegister::Sgi1r, 2 << 24 | 0b10);
    v.exit(1, &mut cpu1);
    let irq = v.irq(1, 2).expect("exists");
    assert!(irq.active && irq.pending(), "the second one waits");
    v.enter(1, &mut cpu1);
    assert_eq!(cpu1.lrs[0] >> 62, 0b11);
}

#[test]
fn spis_go_to_the_vcpu_their_irouter_names() {
    let mut v = booted(2);
    let mut cpu = FakeCpuInterface::qemu();
    let irouter = gicd::IROUTER + 8 * u64::from(UART_SPI);
    v.gicd()
        .try_write(irouter, Vgic::mpidr(1) & 0xff_ffff, 8)
        .expect("double");
    wr32(&mut v.gicd(), gicd::ISENABLER + 4, 1 << (UART_SPI - 32));
    assert_eq!(v.take_kicks(), 0b11, "GICD writes may concern every vCPU");
    assert_eq!(v.inject_spi(UART_SPI), Some(1));
    assert_eq!(v.enter(0, &mut cpu).loaded, 0);
    v.exit(0, &mut cpu);
    assert_eq!(v.enter(1, &mut cpu).loaded, 1);
    // A route naming no vCPU: delivered nowhere, kept pending.
    v.exit(1, &mut cpu);
    v.gicd().try_write(irouter, 0x0100, 8).expect("double");
    assert_eq!(v.spi_target(UART_SPI), None);
    assert_eq!(v.enter(1, &mut cpu).loaded, 0);
    assert!(v.irq(1, UART_SPI).expect("exists").pending());
}

#[test]
fn vcpu_switch_saves_and_restores_vmcr_and_active_priorities() {
    let mut v = booted(2);
    let mut cpu = FakeCpuInterface::qemu();
    cpu.vmcr = 0xf000_0003;
    cpu.ap1r[0] = 1 << 20;
    v.vcpu_put(0, &cpu);
    v.vcpu_load(1, &mut cpu);
    assert_eq!((cpu.vmcr, cpu.ap1r[0]), (0, 0), "vCPU 1's reset state");
    cpu.vmcr = 0xa000_0002;
    v.vcpu_put(1, &cpu);
    v.vcpu_load(0, &mut cpu);
    assert_eq!((cpu.vmcr, cpu.ap1r[0]), (0xf000_0003, 1 << 20));
    // Entering vCPU 1 on this CPU empties what vCPU 0 left in the LRs.
    cpu.lrs[3] = lr::PENDING | 7;
    v.enter(1, &mut cpu);
    assert_eq!(cpu.lrs[3], 0);
}

#[test]
fn the_mmio_path_refuses_bad_sizes_and_missing_syndromes_with_nothing_changed() {
    let mut v = booted(1);
    let dabt = |write: bool, size_log2: u64, isv: bool| {
        Esr(u64::from(ec::DABT_LOWER) << 26
            | 1 << 25
            | u64::from(isv) << 24
            | size_log2 << 22
            | 2 << 16
            | u64::from(write) << 6)
    };
    let mut regs = GuestRegs {
        elr: 0x1000,
        ..GuestRegs::default()
    };
    regs.x[2] = 0;
    let before = regs.clone();
    // A byte store to GICD_CTLR.
    assert_eq!(
        emulate_or_abort(&mut v.gicd(), dabt(true, 0, true), gicd::CTLR, &mut regs),
        Err(MmioError::BadAccess)
    );
    // A load pair (no syndrome).
    assert_eq!(
        emulate_or_abort(&mut v.gicd(), dabt(false, 2, false), gicd::CTLR, &mut regs),
        Err(MmioError::NoSyndrome)
    );
    assert_eq!(regs, before);
    assert!(
        v.dist.group_enabled(true),
        "the byte store of 0 did nothing"
    );
    // A good load: the value and the step past the instruction.
    assert_eq!(
        emulate_or_abort(&mut v.gicd(), dabt(false, 2, true), gicd::CTLR, &mut regs),
        Ok(())
    );
    assert_eq!((regs.x[2], regs.elr), (0x53, 0x1004));
    // Beyond the last redistributor: reserved, counted, but sizes checked.
    let mut r = v.gicr();
    assert_eq!(r.try_read(REDIST_SIZE, 4), Ok(0));
    assert_eq!(
        r.try_write(REDIST_SIZE + 2, 0, 2),
        Err(MmioError::BadAccess)
    );
    assert_eq!(v.counters().unemulated_reads.load(Relaxed), 1);
    assert_eq!(v.gicr_size(), REDIST_SIZE);
    // The infallible API reads zero for what the fallible one refuses.
    assert_eq!(v.gicd().read(gicd::TYPER, 1), 0);
    assert_eq!(v.counters().bad_accesses.load(Relaxed), 3);
}

#[test]
fn mpidr_and_redistributor_affinity_agree() {
    let v = vgic(18);
    for (i, r) in v.redists.iter().enumerate() {
        assert_eq!(Vgic::mpidr(i) & 0xff_ffff, u64::from(r.affinity()));
    }
    assert_eq!(Vgic::mpidr(17), 1 << 31 | 1 << 8 | 1);
}

#[test]
fn a_trapped_sgi1r_write_is_emulated_and_stepped_over_and_a_read_is_undefined() {
    let mut v = booted(2);
    let iss = |op2: u32, rt: u32, read: bool| {
        3 << 20 | op2 << 17 | 12 << 10 | rt << 5 | 11 << 1 | u32::from(read)
    };
    let mut regs = GuestRegs {
        elr: 0x2000,
        ..GuestRegs::default()
    };
    regs.x[4] = 6 << 24 | 0b10;
    assert_eq!(
        v.handle_sysreg_trap(0, iss(5, 4, false), &mut regs),
        SysregTrap::SgiSent(0b10)
    );
    assert_eq!(regs.elr, 0x2004);
    assert!(v.irq(1, 6).expect("exists").pending());
    // xzr: SGI 0 to Aff0 0 is not in an empty target list.
    assert_eq!(
        v.handle_sysreg_trap(1, iss(5, 31, false), &mut regs),
        SysregTrap::SgiSent(0)
    );
    assert_eq!(
        v.handle_sysreg_trap(0, iss(5, 4, true), &mut regs),
        SysregTrap::Undefined
    );
    // ICC_DIR_EL1 (op2 1) is not the vGIC's business.
    assert_eq!(
        v.handle_sysreg_trap(0, iss(1, 4, false), &mut regs),
        SysregTrap::NotVgic
    );
    assert_eq!(regs.elr, 0x2008, "only the two writes stepped");
}

/// An SPI raised on behalf of another vCPU (the UART's line, rising while
/// vCPU 0 handles an exit) records a kick for the vCPU it is routed to, so
/// the caller's `take_kicks` makes that vCPU's CPU exit and load it instead
/// of leaving it until that vCPU's next exit.
#[test]
fn an_spi_routed_to_another_vcpu_kicks_it() {
    let mut v = booted(2);
    wr32(&mut v.gicd(), gicd::ISENABLER + 4, 1 << (UART_SPI - 32));
    // Routed to vCPU 1 (affinity 0.0.0.1).
    v.gicd()
        .try_write(gicd::IROUTER + 8 * u64::from(UART_SPI), 1, 8)
        .expect("64-bit IROUTER write accepted");
    let _ = v.take_kicks();
    assert_eq!(v.set_spi_level(UART_SPI, true), Some(1));
    assert_eq!(v.take_kicks(), 0b10);
    // A line that stays high raises nothing new.
    assert_eq!(v.set_spi_level(UART_SPI, true), None);
    assert_eq!(v.take_kicks(), 0);
    assert_eq!(v.set_spi_level(UART_SPI, false), None);
}
