//! A virtual GICv3 (tracker issue 11): the emulated distributor and
//! redistributors a guest programs, and the list-register scheduling that
//! delivers its interrupts through the GICv3 virtualisation extensions.
//! Portable and host-tested; the aarch64 layer supplies the `ICH_*_EL2`
//! accesses ([`CpuInterface`]) and the traps.
//!
//! # Why
//!
//! A Linux guest used to get the physical `GICD` and `GICR` frames mapped
//! at stage 2. A guest that enables LPIs there points `GICR_PROPBASER` and
//! `GICR_PENDBASER` at any physical page and has the GIC read and clear
//! bits of it; it can also re-route, disable or trigger every interrupt of
//! the machine, the hypervisor's included.
//!
//! # What the guest sees
//!
//! - A GICv3 distributor at [`qemu_virt::GICD_BASE`] (64 KiB) and one
//!   redistributor per vCPU from [`qemu_virt::GICR_BASE`] (128 KiB each:
//!   `RD_base` + `SGI_base`), neither mapped at stage 2: every access traps
//!   and is emulated ([`GicdDevice`], [`GicrDevice`], both
//!   [`MmioDevice`]s).
//! - Affinity routing always on, one security state (`GICD_CTLR.ARE` and
//!   `DS` read as one), no LPIs (`GICD_TYPER.LPIS` = 0,
//!   `GICR_TYPER.PLPIS` = 0; `GICR_CTLR.EnableLPIs`, `PROPBASER`,
//!   `PENDBASER` and the direct-LPI registers read as zero and ignore
//!   writes), no message-based SPIs, no extended SPI/PPI ranges, no 1-of-N
//!   routing (`No1N`).
//! - Registers emulated (what Linux's irq-gic-v3 uses): `GICD_CTLR`
//!   (group enables; `RWP` always 0), `TYPER` (`ITLinesNumber` covering
//!   the VM's SPIs), `IIDR`, `PIDR2`, `IGROUPR`, `IS/ICENABLER`,
//!   `IS/ICPENDR`, `IS/ICACTIVER`, `IPRIORITYR` (bytes or words, masked to
//!   the implemented priority bits), `ICFGR`, `IROUTER` (64 bits or either
//!   half; `Aff2.Aff1.Aff0` kept); `GICR_CTLR`, `IIDR`, `TYPER` (affinity,
//!   processor number, `Last`), `WAKER` (`ChildrenAsleep` follows
//!   `ProcessorSleep` at once), `PIDR2`, and the `SGI_base` frame's
//!   `IGROUPR0`, `IS/IC*R0`, `IPRIORITYR0..7`, `ICFGR0/1` (read-only: SGIs
//!   edge, PPIs level). Known registers of absent features (`ITARGETSR`,
//!   `IGRPMODR`, `NSACR`, `SGIR`, `STATUSR`, `TYPER2`, ...) are RAZ/WI.
//! - Only the VM's interrupts exist for it: every SGI (purely virtual),
//!   the PPIs it is given (the virtual timer, 27), the SPIs it is given
//!   (the emulated PL011's, 33). The bits and bytes of every other
//!   interrupt read as zero and ignore writes, including the maintenance
//!   interrupt (25), which is the hypervisor's.
//!
//! # What a guest cannot do
//!
//! - Touch the physical GIC through these frames: the emulation writes only
//!   the structures here. The physical state it can reach is the one the
//!   architecture gives it: the virtual CPU interface (`ICV_*` registers,
//!   in hardware) and, through a hardware-backed list register, the
//!   deactivation of the physical interrupt behind it (the timer's).
//! - Make the GIC access memory: no LPIs, no ITS.
//! - Break the emulation with odd accesses: an offset where no register
//!   lives reads as zero and ignores writes, and is counted
//!   ([`VgicCounters`]); an access of a size a register does not take
//!   (a byte to a 32-bit-only register, a 64-bit access to anything but
//!   `IROUTER`/`GICR_TYPER`/`PROPBASER`/`PENDBASER`, any 16-bit or
//!   misaligned access) and an access without a valid syndrome are refused
//!   with [`MmioError`], which the caller turns into a synchronous external
//!   abort (`mmio::emulate_or_abort`).
//!
//! # How it maps to the hardware
//!
//! Interrupts reach the guest through list registers: before each entry,
//! [`Vgic::enter`] picks the vCPU's active interrupts and its most urgent
//! pending ones ([`lr::plan`]) and writes `ICH_LR<n>_EL2` (as many as
//! `ICH_VTR_EL2` says) and `ICH_HCR_EL2`; after each exit, [`Vgic::exit`]
//! folds the list registers back (taken, finished, still pending) and
//! empties them. When more interrupts wait than fit, `ICH_HCR_EL2.NPIE` or
//! `UIE` raises the maintenance interrupt (PPI 25) once registers can be
//! reused; taking it is an exit like any other, and the next entry refills.
//! `ICH_VMCR_EL2` and `ICH_AP0R/AP1R<n>_EL2` are per-vCPU state that only
//! changes while the guest runs, so [`Vgic::vcpu_put`]/[`Vgic::vcpu_load`]
//! save and restore them when a physical CPU switches between vCPUs.
//!
//! Design decisions:
//! - **SGIs** trap: with `HCR_EL2.IMO` set, EL1 writes to `ICC_SGI1R_EL1`
//!   (and `ASGI1R`, `SGI0R`) trap to EL2 as EC 0x18 whatever
//!   `ICH_HCR_EL2.TC` says (see [`sgi`]). [`Vgic::send_sgi`] decodes the
//!   value (target list with range selector and `Aff3.Aff2.Aff1`, or
//!   `IRM` for all but self) against the vCPUs' affinities and latches the
//!   SGI pending in each target's redistributor. `TC` stays clear.
//! - **The virtual timer** is hardware-backed: its list register has
//!   `HW` = 1 and `pINTID` = 27. The hypervisor takes the physical PPI 27
//!   at EL2 (`IMO`), acknowledges it and drops its priority (`EOImode` = 1
//!   at EL2) but leaves it active, and calls [`Vgic::inject_hw_ppi`]; the
//!   guest's deactivation of the virtual interrupt deactivates the physical
//!   one, so the timer cannot fire again before the guest has handled it,
//!   with no masking of `CNTV_CTL_EL0.IMASK` by the hypervisor and no exit
//!   at EOI. A guest's `ICACTIVER0` write that clears it is passed on
//!   ([`Vgic::take_hw_deactivations`]): the hypervisor deactivates the
//!   physical interrupt (`ICC_DIR_EL1`).
//! - **Level-sensitive emulated interrupts** (the PL011's SPI) follow a
//!   line ([`Vgic::set_spi_level`]); their list registers ask for an EOI
//!   maintenance interrupt so the line is sampled again when the guest
//!   deactivates them.
//! - **List registers** are all folded back at every exit and chosen again
//!   at every entry (KVM's approach): between an exit and the next entry
//!   the state in memory is the whole truth, so the MMIO emulation never
//!   looks into list registers. Active interrupts first (the guest must
//!   find them to deactivate them), then pending ones by priority.
//!
//! # What the aarch64 integration must do
//!
//! Once, on each physical CPU, before the first guest entry:
//! 1. `ICC_SRE_EL2` = `SRE | Enable | DIB | DFB` (already done), and
//!    `ICC_CTLR_EL1.EOImode` = 1 at EL2 so the hypervisor can drop the
//!    priority of the timer PPI without deactivating it; enable group 1 at
//!    EL2 (`ICC_IGRPEN1_EL1` = 1), `ICC_PMR_EL1` = 0xff.
//! 2. Read `ICH_VTR_EL2` and build the [`Vgic`] with it
//!    ([`Vgic::new`]); set `VMPIDR_EL2` of vCPU i to [`Vgic::mpidr`]`(i)`
//!    (the redistributor affinities match it; Linux pairs them by it).
//! 3. The physical GIC is now the hypervisor's to initialise (a Linux
//!    guest used to do it): `GICD_CTLR` = `ARE_NS | EnableGrp1NS` (wait for
//!    `RWP`), this CPU's `GICR_WAKER` handshake (clear `ProcessorSleep`,
//!    wait for `ChildrenAsleep` to clear), then in its `SGI_base` frame
//!    PPI 27 (the virtual timer) and PPI 25 (the maintenance interrupt)
//!    group 1 (`IGROUPR0`), enabled (`ISENABLER0`), so they reach EL2.
//!    Hardware-backed SPIs ([`SpiConfig::hw`]: a passed-through device)
//!    are enabled and routed (`IROUTER`) by the hypervisor to the physical
//!    CPU running their target vCPU; the guest's writes change only the
//!    virtual state.
//! 4. Stage 2: do not map `GICD` (0x0800_0000, 64 KiB) and `GICR`
//!    (0x080a_0000, 128 KiB per vCPU): the translation faults on them go to
//!    [`Vgic::gicd`] / [`Vgic::gicr`] through `mmio::emulate_or_abort`,
//!    an `Err` becoming an injected synchronous external abort (as for
//!    unbacked RAM). Then [`Vgic::take_kicks`]: the vCPUs, other than the
//!    one that wrote, whose deliverable interrupts may have changed and
//!    that are running must be sent a physical IPI to exit.
//! 5. `HCR_EL2`: set `IMO` and `FMO` (physical IRQs/FIQs go to EL2,
//!    virtual ones to the guest, and the guest's `ICC_*` accesses go to the
//!    virtual interface; SGI writes trap). Device tree: the GIC node's
//!    `reg` covers `GICR` for all vCPUs ([`Vgic::gicr_size`]); the PL011
//!    node already has `interrupts = <0 1 4>` (SPI 1, level high).
//! 6. The PL011's interrupt: [`VgicConfig::qemu_virt`] gives the VM SPI 33
//!    as a software, level-sensitive interrupt for the emulated PL011,
//!    whose model must then drive it (`set_spi_level` with its
//!    `RIS & IMSC`; today's model is transmit-only and has no interrupt
//!    state). A Linux guest with the PL011 passed through instead needs
//!    SPI 33 with `hw: true` and the hypervisor taking it at EL2
//!    ([`Vgic::inject_hw_spi`]).
//!
//! On every guest entry, with interrupts masked at EL2, after all exit
//! handling: [`Vgic::enter`] (writes every `ICH_LR<n>_EL2`, then
//! `ICH_HCR_EL2` = `En` + maintenance enables). On switching the physical
//! CPU to another vCPU, before that: [`Vgic::vcpu_put`] of the old,
//! [`Vgic::vcpu_load`] of the new (`ICH_VMCR_EL2`, `ICH_AP0R<n>`,
//! `ICH_AP1R<n>`).
//!
//! On every guest exit, first thing after saving the general-purpose
//! registers (before anything may inject or emulate): [`Vgic::exit`]
//! (reads `ICH_MISR_EL2`, `ICH_HCR_EL2.EOIcount`, the used `ICH_LR<n>`;
//! empties them; writes `ICH_HCR_EL2` = 0, which also drops the level
//! maintenance interrupt). Then by exit kind:
//! - IRQ (the lower-EL IRQ vector, now expected): read `ICC_IAR1_EL1`.
//!   25 (maintenance): `ICC_EOIR1_EL1` then `ICC_DIR_EL1` (nothing else;
//!   the refill is the next [`Vgic::enter`]). 27 (timer): `ICC_EOIR1_EL1`
//!   only (priority drop), then [`Vgic::inject_hw_ppi`]`(vcpu, 27)`; the
//!   guest deactivates it. A hypervisor IPI: EOIR + DIR (its purpose, an
//!   exit, is served). 1023: spurious, nothing.
//! - EC 0x18: [`Vgic::handle_sysreg_trap`] (an SGI register write is
//!   emulated and `ELR_EL2` stepped; kick the vCPUs it returns); `Undefined`
//!   means inject an undefined instruction exception, `NotVgic` that the
//!   trap is someone else's.
//! - After any MMIO emulation of the guest's own devices (the PL011's
//!   interrupt line): [`Vgic::set_spi_level`].
//! - [`Vgic::take_hw_deactivations`] of the vCPU: `ICC_DIR_EL1` for each
//!   PPI set in it; [`Vgic::take_hw_spi_deactivations`]: likewise for
//!   SPIs.
//!
//! [`Vgic::enter`] and [`Vgic::exit`] must pair: an entry's list
//! registers are folded back by the next exit of the same vCPU.
//!
//! Limits: an interrupt the guest makes active through `ISACTIVER` while
//! more interrupts are active than there are list registers cannot be
//! deactivated by the guest's EOI (`EOIcount` counts it, as for KVM); with
//! a single list register a waiting interrupt behind an active
//! hardware-backed one enters at the next exit of any kind.

pub mod cpuif;
pub mod dist;
mod irq;
pub mod lr;
pub mod redist;
pub mod sgi;

#[cfg(test)]
mod tests;

use alloc::vec;
use alloc::vec::Vec;

pub use cpuif::{CpuInterface, Vtr};
pub use irq::Irq;
pub use sgi::{SgiRegister, SgiRequest, SgiTrap};

use crate::counter_set;
use crate::mm::counters::{add, inc};
use crate::vm::mmio::{MmioDevice, MmioError};
use crate::vm::vcpu::GuestRegs;
use dist::Distributor;
use irq::Width;
use redist::{PrivateConfig, REDIST_SIZE, Redistributor};

/// QEMU `virt`'s GICv3 layout and the interrupts given to a VM there.
pub mod qemu_virt {
    /// The distributor's IPA (and PA), one 64 KiB frame.
    pub const GICD_BASE: u64 = 0x0800_0000;
    /// Size of the distributor frame.
    pub const GICD_SIZE: u64 = 0x1_0000;
    /// The first redistributor's IPA; each is 128 KiB.
    pub const GICR_BASE: u64 = 0x080a_0000;
    /// The GICv3 maintenance interrupt (PPI 9).
    pub const MAINTENANCE_PPI: u32 = 25;
    /// The EL1 virtual timer (PPI 11).
    pub const VTIMER_PPI: u32 = 27;
    /// The PL011's interrupt: SPI 1.
    pub const UART_SPI: u32 = 33;
}

counter_set! {
    /// What the virtual GIC saw that a well-behaved driver does not do,
    /// and what it did.
    pub struct VgicCounters {
        /// Reads at offsets where no register lives (RAZ).
        unemulated_reads,
        /// Writes at offsets where no register lives (WI).
        unemulated_writes,
        /// Accesses refused for their size or alignment (external abort).
        bad_accesses,
        /// SGIs latched pending by a trapped `ICC_SGI*R_EL1` write.
        sgis_sent,
        /// Guest EOIs of interrupts in no list register (`EOIcount`).
        eoi_without_lr,
        /// Entries where some interrupt did not fit in the list registers.
        lr_overflows,
        /// Exits with a maintenance condition raised.
        maintenance_exits,
    }
}

/// An SPI given to the VM.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct SpiConfig {
    /// Its INTID (32..=1019).
    pub intid: u32,
    /// Edge-triggered at reset (the guest may change it through `ICFGR`
    /// unless `hw`).
    pub edge: bool,
    /// Backed by the physical SPI of the same INTID (a passed-through
    /// device): delivered with `ICH_LR.HW`. The hypervisor keeps the
    /// physical SPI routed to the physical CPU that runs its target vCPU;
    /// the guest's `IROUTER` only chooses that vCPU.
    pub hw: bool,
}

/// What a VM is given.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct VgicConfig {
    /// Number of vCPUs, 1..=128 (the vCPU masks are `u128`s). vCPU i has
    /// `Aff1` = i / 16 and `Aff0` = i % 16, as SGI target lists address
    /// `Aff0` 0..15 only while `RSS` is 0.
    pub nr_vcpus: usize,
    /// Its SPIs.
    pub spis: Vec<SpiConfig>,
    /// Its PPIs (bit n = INTID n) and which are hardware-backed.
    pub private: PrivateConfig,
}

impl VgicConfig {
    /// A VM on QEMU `virt`: the virtual timer (hardware-backed), the
    /// emulated PL011's SPI (level), every SGI.
    #[must_use]
    pub fn qemu_virt(nr_vcpus: usize) -> Self {
        Self {
            nr_vcpus,
            spis: vec![SpiConfig {
                intid: qemu_virt::UART_SPI,
                edge: false,
                hw: false,
            }],
            private: PrivateConfig {
                ppis: 1 << qemu_virt::VTIMER_PPI,
                hw_ppis: 1 << qemu_virt::VTIMER_PPI,
            },
        }
    }
}

/// Per-vCPU state of the virtual CPU interface kept while it does not run.
#[derive(Clone, Debug, Default)]
struct VcpuInterface {
    /// What [`Vgic::enter`] put into each list register.
    loaded: Vec<Option<lr::Loaded>>,
    /// `ICH_VMCR_EL2`.
    vmcr: u64,
    /// `ICH_AP0R<n>_EL2`.
    ap0r: [u32; 4],
    /// `ICH_AP1R<n>_EL2`.
    ap1r: [u32; 4],
}

/// The outcome of [`Vgic::handle_sysreg_trap`].
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum SysregTrap {
    /// Not a register of the virtual GIC: the caller handles it.
    NotVgic,
    /// A read of a write-only SGI register: inject an undefined
    /// instruction exception (`ELR_EL2` unchanged).
    Undefined,
    /// Sent: the vCPUs that got the SGI (bit i = vCPU i), to kick if they
    /// run on other physical CPUs.
    SgiSent(u128),
}

/// What [`Vgic::enter`] did.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct EntryReport {
    /// List registers filled.
    pub loaded: usize,
    /// Interrupts waiting that did not fit.
    pub left_out: usize,
    /// `ICH_HCR_EL2` written.
    pub hcr: u64,
}

/// What [`Vgic::exit`] found.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ExitReport {
    /// `ICH_MISR_EL2`: the maintenance conditions that were raised.
    pub misr: u64,
    /// `ICH_HCR_EL2.EOIcount`.
    pub eoi_count: u32,
}

/// The virtual GIC of one VM.
#[derive(Debug)]
pub struct Vgic {
    dist: Distributor,
    redists: Vec<Redistributor>,
    cpus: Vec<VcpuInterface>,
    vtr: Vtr,
    /// vCPUs whose deliverable interrupts changed by MMIO (bit i = vCPU i).
    kicks: u128,
    counters: VgicCounters,
}

impl Vgic {
    /// The virtual GIC for `config` on CPUs whose `ICH_VTR_EL2` is `vtr`.
    ///
    /// # Panics
    ///
    /// If `config` has no vCPU or more than 128, or a bad SPI: the
    /// configuration is the hypervisor's, not the guest's.
    #[must_use]
    pub fn new(config: &VgicConfig, vtr: u64) -> Self {
        assert!(
            (1..=128).contains(&config.nr_vcpus),
            "1..=128 vCPUs supported"
        );
        let vtr = Vtr::decode(vtr);
        let mask = vtr.priority_mask();
        let n = config.nr_vcpus;
        let redists = (0..n)
            .map(|i| Redistributor::new(i as u16, affinity(i), i + 1 == n, config.private, mask))
            .collect();
        Self {
            dist: Distributor::new(&config.spis, n, mask),
            redists,
            cpus: vec![VcpuInterface::default(); n],
            vtr,
            kicks: 0,
            counters: VgicCounters::new(),
        }
    }

    /// `VMPIDR_EL2` for vCPU `vcpu`: bit 31 (RES1) and its affinity.
    #[must_use]
    pub fn mpidr(vcpu: usize) -> u64 {
        1 << 31 | u64::from(affinity(vcpu))
    }

    /// Number of vCPUs.
    #[must_use]
    pub fn nr_vcpus(&self) -> usize {
        self.redists.len()
    }

    /// The counters.
    #[must_use]
    pub fn counters(&self) -> &VgicCounters {
        &self.counters
    }

    /// The distributor, as an MMIO device (offsets from `GICD_BASE`).
    pub fn gicd(&mut self) -> GicdDevice<'_> {
        GicdDevice(self)
    }

    /// The redistributor region, as an MMIO device (offsets from
    /// `GICR_BASE`; vCPU i's frames at `i * 128 KiB`).
    pub fn gicr(&mut self) -> GicrDevice<'_> {
        GicrDevice(self)
    }

    /// The size of the redistributor region.
    #[must_use]
    pub fn gicr_size(&self) -> u64 {
        REDIST_SIZE * self.redists.len() as u64
    }

    /// The state of interrupt `intid` as vCPU `vcpu` sees it.
    #[must_use]
    pub fn irq(&self, vcpu: usize, intid: u32) -> Option<&Irq> {
        if intid < 32 {
            self.redists.get(vcpu)?.private.get(intid as usize)
        } else {
            self.dist.spi(intid)
        }
    }

    fn irq_mut(&mut self, vcpu: usize, intid: u32) -> Option<&mut Irq> {
        if intid < 32 {
            self.redists.get_mut(vcpu)?.private.get_mut(intid as usize)
        } else {
            self.dist.spi_mut(intid)
        }
    }

    /// The vCPU an SPI is routed to: the one whose affinity its `IROUTER`
    /// names (none if none does; it then stays pending).
    #[must_use]
    pub fn spi_target(&self, intid: u32) -> Option<usize> {
        let route = self.dist.route(intid)?;
        self.redists
            .iter()
            .position(|r| u64::from(r.affinity()) == route)
    }

    /// The physical PPI `intid` (hardware-backed, such as the virtual
    /// timer) was taken at EL2 on `vcpu`'s physical CPU and left active:
    /// make it pending for the guest.
    pub fn inject_hw_ppi(&mut self, vcpu: usize, intid: u32) {
        if let Some(irq) = self.irq_mut(vcpu, intid).filter(|i| i.owned && i.hw) {
            irq.assert();
        }
    }

    /// The physical SPI `intid` (hardware-backed: a passed-through
    /// device's) was taken at EL2 and left active: make it pending for the
    /// guest. Returns the vCPU to kick.
    pub fn inject_hw_spi(&mut self, intid: u32) -> Option<usize> {
        let irq = self.dist.spi_mut(intid).filter(|i| i.owned && i.hw)?;
        irq.assert();
        self.kick_spi_target(intid)
    }

    /// Takes the hardware-backed SPIs the guest deactivated through
    /// `GICD_ICACTIVER`: the caller deactivates them physically.
    pub fn take_hw_spi_deactivations(&mut self) -> Vec<u32> {
        self.dist.take_hw_deactivations()
    }

    /// Latches an edge on an SPI of the VM. Returns the vCPU to kick.
    pub fn inject_spi(&mut self, intid: u32) -> Option<usize> {
        let irq = self.dist.spi_mut(intid).filter(|i| i.owned && !i.hw)?;
        irq.assert();
        self.kick_spi_target(intid)
    }

    /// Sets the input line of a level-sensitive SPI of the VM (an emulated
    /// device's). Returns the vCPU to kick when the line rises.
    pub fn set_spi_level(&mut self, intid: u32, level: bool) -> Option<usize> {
        let irq = self.dist.spi_mut(intid).filter(|i| i.owned && !i.hw)?;
        let rose = level && !irq.line_level;
        irq.line_level = level;
        // A guest may configure the interrupt edge-triggered (ICFGR): then
        // the rising edge latches it pending, as a GIC samples an edge;
        // level-triggered, `pending()` follows the line.
        if rose && irq.edge {
            irq.assert();
        }
        if rose {
            self.kick_spi_target(intid)
        } else {
            None
        }
    }

    /// The vCPU SPI `intid` is routed to, also recorded for
    /// [`take_kicks`](Self::take_kicks): a caller on another vCPU's CPU
    /// must kick it, or the interrupt waits for its next exit.
    fn kick_spi_target(&mut self, intid: u32) -> Option<usize> {
        let target = self.spi_target(intid)?;
        self.kicks |= 1 << target;
        Some(target)
    }

    /// Handles a trapped `MSR`/`MRS` (EC 0x18) of vCPU `vcpu` with syndrome
    /// `iss`, if it is one of the SGI registers: a write sends the SGI and
    /// steps `ELR_EL2` past the instruction (a trapped system register
    /// access leaves it at the instruction).
    pub fn handle_sysreg_trap(
        &mut self,
        vcpu: usize,
        iss: u32,
        regs: &mut GuestRegs,
    ) -> SysregTrap {
        let Some(trap) = SgiTrap::decode(iss) else {
            return SysregTrap::NotVgic;
        };
        if trap.read {
            // Write-only registers: the caller injects an undefined
            // instruction exception.
            return SysregTrap::Undefined;
        }
        let value = if trap.rt == 31 {
            0
        } else {
            regs.x[usize::from(trap.rt)]
        };
        regs.elr = regs.elr.wrapping_add(4);
        SysregTrap::SgiSent(self.send_sgi(vcpu, trap.register, value))
    }

    /// Emulates vCPU `sender`'s write of `value` to `register` (a trapped
    /// `ICC_SGI1R_EL1`, `ASGI1R` or `SGI0R`). Returns the vCPUs that got
    /// the SGI (bit i = vCPU i): the caller kicks those running elsewhere.
    pub fn send_sgi(&mut self, sender: usize, register: SgiRegister, value: u64) -> u128 {
        let request = SgiRequest::decode(value);
        let Some(sender_affinity) = self.redists.get(sender).map(Redistributor::affinity) else {
            return 0;
        };
        let mut targets = 0;
        for (i, redist) in self.redists.iter_mut().enumerate() {
            if !request.targets(redist.affinity(), sender_affinity) {
                continue;
            }
            let irq = &mut redist.private[request.intid as usize];
            if irq.group1 && !register.allows_group1() {
                continue;
            }
            irq.assert();
            targets |= 1 << i;
            inc(&self.counters.sgis_sent);
        }
        targets
    }

    /// Takes the vCPUs (bit i = vCPU i) whose deliverable interrupts an
    /// MMIO write may have changed since the last call.
    pub fn take_kicks(&mut self) -> u128 {
        core::mem::take(&mut self.kicks)
    }

    /// Takes the hardware-backed PPIs (bit n = INTID n) of `vcpu` that the
    /// guest deactivated through `GICR_ICACTIVER0`: the caller deactivates
    /// them physically (`ICC_DIR_EL1`) on that vCPU's physical CPU.
    pub fn take_hw_deactivations(&mut self, vcpu: usize) -> u32 {
        self.redists
            .get_mut(vcpu)
            .map_or(0, Redistributor::take_hw_deactivations)
    }

    /// The interrupts of `vcpu` that want a list register.
    fn candidates(&self, vcpu: usize) -> Vec<lr::Candidate> {
        let redist = &self.redists[vcpu];
        // An asleep redistributor forwards nothing new to its PE; what is
        // active must still be found by the guest's deactivation.
        let forwards = |group1: bool| redist.awake() && self.dist.group_enabled(group1);
        let private = redist
            .private
            .iter()
            .enumerate()
            .filter_map(|(intid, irq)| lr::Candidate::of(intid as u32, irq, forwards(irq.group1)));
        let affinity = u64::from(redist.affinity());
        let spis = self
            .dist
            .owned_spis()
            .filter(|&(_, _, route)| route == affinity)
            .filter_map(|(intid, irq, _)| lr::Candidate::of(intid, irq, forwards(irq.group1)));
        private.chain(spis).collect()
    }

    /// Before entering `vcpu`'s guest: chooses and writes its list
    /// registers (all of them: unused ones are emptied, whatever another
    /// vCPU left there) and `ICH_HCR_EL2`.
    pub fn enter(&mut self, vcpu: usize, cpu: &mut dyn CpuInterface) -> EntryReport {
        let plan = lr::plan(self.candidates(vcpu), self.vtr.list_regs);
        for (n, &value) in plan.lrs.iter().enumerate() {
            cpu.set_lr(n, value);
        }
        for loaded in plan.loaded.iter().flatten() {
            if let Some(irq) = self.irq_mut(vcpu, loaded.intid) {
                irq.in_lr = true;
            }
        }
        if plan.left_out > 0 {
            inc(&self.counters.lr_overflows);
        }
        let hcr = cpuif::hcr::EN | plan.maintenance;
        cpu.set_hcr(hcr);
        let loaded = plan.loaded.iter().flatten().count();
        self.cpus[vcpu].loaded = plan.loaded;
        EntryReport {
            loaded,
            left_out: plan.left_out,
            hcr,
        }
    }

    /// After `vcpu`'s guest exited: folds its list registers back into the
    /// emulated state, empties them, and turns the virtual interface off
    /// (`ICH_HCR_EL2` = 0) while the hypervisor runs.
    pub fn exit(&mut self, vcpu: usize, cpu: &mut dyn CpuInterface) -> ExitReport {
        let misr = cpu.misr();
        let eoi_count = ((cpu.hcr() >> cpuif::hcr::EOICOUNT_SHIFT) & 0x1f) as u32;
        let loaded = core::mem::take(&mut self.cpus[vcpu].loaded);
        for (n, slot) in loaded.iter().enumerate() {
            let Some(l) = *slot else { continue };
            let value = cpu.lr(n);
            cpu.set_lr(n, 0);
            if let Some(irq) = self.irq_mut(vcpu, l.intid) {
                lr::fold(irq, l, value);
            }
        }
        cpu.set_hcr(0);
        if misr != 0 {
            inc(&self.counters.maintenance_exits);
        }
        add(&self.counters.eoi_without_lr, u64::from(eoi_count));
        ExitReport { misr, eoi_count }
    }

    /// `vcpu` starts afresh (PSCI `CPU_ON` after a `CPU_OFF`): its
    /// hardware-backed private interrupts (the virtual timer) are neither
    /// pending nor active any more (their physical side was deactivated
    /// when it stopped; a new guest context would never deactivate them),
    /// and nothing of it is in a list register.
    pub fn vcpu_restart(&mut self, vcpu: usize) {
        for intid in 16..32 {
            if let Some(irq) = self.irq_mut(vcpu, intid).filter(|i| i.hw) {
                irq.active = false;
                irq.pending_latch = false;
                irq.line_level = false;
                irq.in_lr = false;
                irq.asserted_in_lr = false;
            }
        }
        self.cpus[vcpu].loaded = Vec::new();
    }

    /// Restores `vcpu`'s `ICH_VMCR_EL2` and active priority registers on
    /// the physical CPU about to run it.
    pub fn vcpu_load(&self, vcpu: usize, cpu: &mut dyn CpuInterface) {
        let state = &self.cpus[vcpu];
        cpu.set_vmcr(state.vmcr);
        for n in 0..self.vtr.apr_count() {
            cpu.set_ap0r(n, state.ap0r[n]);
            cpu.set_ap1r(n, state.ap1r[n]);
        }
    }

    /// Saves `vcpu`'s `ICH_VMCR_EL2` and active priority registers before
    /// the physical CPU runs another vCPU.
    pub fn vcpu_put(&mut self, vcpu: usize, cpu: &dyn CpuInterface) {
        let n_apr = self.vtr.apr_count();
        let state = &mut self.cpus[vcpu];
        state.vmcr = cpu.vmcr();
        for n in 0..n_apr {
            state.ap0r[n] = cpu.ap0r(n);
            state.ap1r[n] = cpu.ap1r(n);
        }
    }
}

/// vCPU i's affinity: `Aff0` = i mod 16 (SGI target lists cover 16 `Aff0`
/// values and `RSS` is 0), `Aff1` = i / 16.
fn affinity(vcpu: usize) -> u32 {
    (((vcpu / 16) << 8) | (vcpu % 16)) as u32
}

/// The distributor of a [`Vgic`] as an MMIO device.
#[derive(Debug)]
pub struct GicdDevice<'a>(&'a mut Vgic);

impl MmioDevice for GicdDevice<'_> {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        self.try_read(offset, size).unwrap_or(0)
    }

    fn write(&mut self, offset: u64, value: u64, size: u8) {
        // A refused write is counted and changes nothing.
        let _ = self.try_write(offset, value, size);
    }

    fn try_read(&mut self, offset: u64, size: u8) -> Result<u64, MmioError> {
        self.0.dist.read(offset, size, &self.0.counters)
    }

    fn try_write(&mut self, offset: u64, value: u64, size: u8) -> Result<(), MmioError> {
        self.0.dist.write(offset, value, size, &self.0.counters)?;
        // Enables, pending states and routes are global: any vCPU may now
        // have something new to take.
        self.0.kicks |= u128::MAX >> (128 - self.0.redists.len());
        Ok(())
    }
}

/// The redistributor region of a [`Vgic`] as an MMIO device.
#[derive(Debug)]
pub struct GicrDevice<'a>(&'a mut Vgic);

impl GicrDevice<'_> {
    /// The redistributor `offset` falls in, and the offset inside it.
    fn locate(&self, offset: u64) -> Option<(usize, u64)> {
        let index = usize::try_from(offset / REDIST_SIZE).ok()?;
        (index < self.0.redists.len()).then_some((index, offset % REDIST_SIZE))
    }

    /// An access beyond the last redistributor: reserved space.
    fn outside(&self, offset: u64, size: u8) -> Result<(), MmioError> {
        dist::checked(Width::Reserved, offset, size, &self.0.counters)
    }
}

impl MmioDevice for GicrDevice<'_> {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        self.try_read(offset, size).unwrap_or(0)
    }

    fn write(&mut self, offset: u64, value: u64, size: u8) {
        // A refused write is counted and changes nothing.
        let _ = self.try_write(offset, value, size);
    }

    fn try_read(&mut self, offset: u64, size: u8) -> Result<u64, MmioError> {
        let Some((index, offset)) = self.locate(offset) else {
            self.outside(offset, size)?;
            inc(&self.0.counters.unemulated_reads);
            return Ok(0);
        };
        self.0.redists[index].read(offset, size, &self.0.counters)
    }

    fn try_write(&mut self, offset: u64, value: u64, size: u8) -> Result<(), MmioError> {
        let Some((index, offset)) = self.locate(offset) else {
            self.outside(offset, size)?;
            inc(&self.0.counters.unemulated_writes);
            return Ok(());
        };
        self.0.redists[index].write(offset, value, size, &self.0.counters)?;
        self.0.kicks |= 1 << index;
        Ok(())
    }
}
