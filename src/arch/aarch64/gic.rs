//! The physical GICv3, owned by the hypervisor: distributor and this CPU's
//! redistributor through MMIO (mapped device-nGnRE in the EL2 map, never in
//! any stage 2), the CPU interface through `ICC_*` system registers at EL2.
//!
//! QEMU `virt` (no `secure=on`) gives a GIC with a single security state
//! (`GICD_CTLR.DS` reads 1), so every interrupt the hypervisor uses is group
//! 1 and goes to EL2 through `HCR_EL2.IMO`. `ICC_CTLR_EL1.EOImode` is 1 at
//! EL2: an `ICC_EOIR1_EL1` write only drops the running priority, and a
//! separate `ICC_DIR_EL1` deactivates. That split lets the hypervisor
//! leave the virtual timer's physical interrupt active while the guest
//! handles the virtual one behind a hardware-backed list register.

use core::ptr::{read_volatile, write_volatile};

use super::sysreg::{read_sysreg, write_sysreg};

/// The distributor's physical (and EL2 virtual) address on QEMU `virt`.
pub const GICD_BASE: usize = 0x0800_0000;
/// Size of the distributor frame.
pub const GICD_SIZE: usize = 0x1_0000;
/// The first redistributor on QEMU `virt`; each is 128 KiB.
pub const GICR_BASE: usize = 0x080a_0000;
/// Size of one redistributor (`RD_base` + `SGI_base`).
pub const GICR_STRIDE: usize = 0x2_0000;
/// The redistributor frames the EL2 map covers (8 CPUs).
pub const GICR_MAPPED: usize = 8 * GICR_STRIDE;

/// `ICC_IAR1_EL1` when nothing is pending.
pub const SPURIOUS: u32 = 1023;

/// Priority of every interrupt the hypervisor enables (group 1; any value
/// above the `ICC_PMR_EL1` of 0xff passes).
const PRIORITY: u8 = 0xa0;

mod gicd {
    pub const CTLR: usize = 0x0;
    pub const TYPER: usize = 0x4;
    pub const IGROUPR: usize = 0x80;
    pub const ISENABLER: usize = 0x100;
    pub const ICENABLER: usize = 0x180;
    pub const ICPENDR: usize = 0x280;
    pub const ICACTIVER: usize = 0x380;
    pub const IPRIORITYR: usize = 0x400;
    pub const ICFGR: usize = 0xc00;
    pub const IROUTER: usize = 0x6000;
    /// `CTLR.RWP`: a write is still taking effect.
    pub const CTLR_RWP: u32 = 1 << 31;
    /// `CTLR.ARE` (with `DS` = 1: the only ARE bit).
    pub const CTLR_ARE: u32 = 1 << 4;
    /// `CTLR.EnableGrp1` (with `DS` = 1).
    pub const CTLR_ENABLE_GRP1: u32 = 1 << 1;
}

mod gicr {
    pub const TYPER: usize = 0x8;
    pub const WAKER: usize = 0x14;
    /// `SGI_base` frame offset.
    pub const SGI: usize = 0x1_0000;
    pub const IGROUPR0: usize = SGI + 0x80;
    pub const ISENABLER0: usize = SGI + 0x100;
    pub const ICENABLER0: usize = SGI + 0x180;
    pub const ICPENDR0: usize = SGI + 0x280;
    pub const ICACTIVER0: usize = SGI + 0x380;
    pub const IPRIORITYR: usize = SGI + 0x400;
    /// `WAKER.ProcessorSleep`.
    pub const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
    /// `WAKER.ChildrenAsleep`.
    pub const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
    /// `TYPER.Last`.
    pub const TYPER_LAST: u64 = 1 << 4;
}

fn read32(addr: usize) -> u32 {
    // SAFETY: `addr` is a register of the GIC frames, mapped device-nGnRE
    // in the EL2 map and owned by the hypervisor.
    unsafe { read_volatile(addr as *const u32) }
}

fn write32(addr: usize, value: u32) {
    // SAFETY: as for `read32`.
    unsafe { write_volatile(addr as *mut u32, value) }
}

fn read64(addr: usize) -> u64 {
    // SAFETY: as for `read32`; the 64-bit registers used here are 8-aligned.
    unsafe { read_volatile(addr as *const u64) }
}

fn write64(addr: usize, value: u64) {
    // SAFETY: as for `read64`.
    unsafe { write_volatile(addr as *mut u64, value) }
}

/// Bounded spin on a GIC condition: a GIC that never settles is a setup
/// error, not a hang.
fn wait_until(what: &'static str, mut done: impl FnMut() -> bool) -> Result<(), GicError> {
    for _ in 0..1_000_000 {
        if done() {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(GicError::Timeout(what))
}

/// Why the GIC could not be brought up.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum GicError {
    /// A register did not settle (the name says which).
    Timeout(&'static str),
    /// No redistributor has this CPU's affinity.
    NoRedistributor(u64),
}

impl core::fmt::Display for GicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Timeout(what) => write!(f, "GIC: {what} did not settle"),
            Self::NoRedistributor(aff) => {
                write!(f, "GIC: no redistributor with affinity {aff:#x}")
            }
        }
    }
}

/// The physical GIC as this CPU sees it.
#[derive(Clone, Copy, Debug)]
pub struct Gic {
    /// This CPU's redistributor (`RD_base`).
    redist: usize,
    /// Number of interrupt IDs the distributor implements (SPIs included).
    lines: u32,
}

/// `Aff3.Aff2.Aff1.Aff0` of this CPU, as `GICR_TYPER[63:32]` holds it.
fn my_affinity() -> u64 {
    let mpidr = read_sysreg!("mpidr_el1");
    ((mpidr >> 8) & 0xff00_0000) | (mpidr & 0xff_ffff)
}

impl Gic {
    /// Initialises the distributor (once, by the boot CPU): everything
    /// disabled, group 1, affinity routing on.
    ///
    /// # Errors
    /// If the distributor does not settle.
    pub fn init_distributor() -> Result<u32, GicError> {
        let d = GICD_BASE;
        write32(d + gicd::CTLR, 0);
        wait_until("GICD_CTLR.RWP", || {
            read32(d + gicd::CTLR) & gicd::CTLR_RWP == 0
        })?;
        let lines = ((read32(d + gicd::TYPER) & 0x1f) + 1) * 32;
        // SPIs: disabled, not pending or active, group 1, level, priority.
        for n in (32..lines).step_by(32) {
            let reg = (n / 32) as usize * 4;
            write32(d + gicd::ICENABLER + reg, u32::MAX);
            write32(d + gicd::ICPENDR + reg, u32::MAX);
            write32(d + gicd::ICACTIVER + reg, u32::MAX);
            write32(d + gicd::IGROUPR + reg, u32::MAX);
        }
        for n in (32..lines).step_by(16) {
            write32(d + gicd::ICFGR + (n / 16) as usize * 4, 0);
        }
        for n in (32..lines).step_by(4) {
            write32(
                d + gicd::IPRIORITYR + n as usize,
                u32::from_ne_bytes([PRIORITY; 4]),
            );
        }
        wait_until("GICD_CTLR.RWP", || {
            read32(d + gicd::CTLR) & gicd::CTLR_RWP == 0
        })?;
        write32(d + gicd::CTLR, gicd::CTLR_ARE | gicd::CTLR_ENABLE_GRP1);
        wait_until("GICD_CTLR.RWP", || {
            read32(d + gicd::CTLR) & gicd::CTLR_RWP == 0
        })?;
        Ok(lines)
    }

    /// Brings up this CPU's redistributor and CPU interface: wakes the
    /// redistributor, disables and clears every SGI and PPI, makes them
    /// group 1, and enables the EL2 CPU interface (`SRE`, `EOImode` = 1,
    /// group 1 on, every priority unmasked).
    ///
    /// # Errors
    /// If the redistributor is missing or does not wake.
    pub fn init_cpu(lines: u32) -> Result<Self, GicError> {
        let aff = my_affinity();
        let mut rd = GICR_BASE;
        let redist = loop {
            let typer = read64(rd + gicr::TYPER);
            if typer >> 32 == aff {
                break rd;
            }
            if typer & gicr::TYPER_LAST != 0 || rd + GICR_STRIDE >= GICR_BASE + GICR_MAPPED {
                return Err(GicError::NoRedistributor(aff));
            }
            rd += GICR_STRIDE;
        };
        let waker = read32(redist + gicr::WAKER);
        write32(redist + gicr::WAKER, waker & !gicr::WAKER_PROCESSOR_SLEEP);
        wait_until("GICR_WAKER.ChildrenAsleep", || {
            read32(redist + gicr::WAKER) & gicr::WAKER_CHILDREN_ASLEEP == 0
        })?;
        write32(redist + gicr::ICENABLER0, u32::MAX);
        write32(redist + gicr::ICPENDR0, u32::MAX);
        write32(redist + gicr::ICACTIVER0, u32::MAX);
        REDIST[super::smp::this_cpu() % super::smp::MAX_PCPUS]
            .store(redist, core::sync::atomic::Ordering::Relaxed);
        write32(redist + gicr::IGROUPR0, u32::MAX);
        for n in (0..32).step_by(4) {
            write32(
                redist + gicr::IPRIORITYR + n,
                u32::from_ne_bytes([PRIORITY; 4]),
            );
        }
        // The CPU interface at EL2: system registers.
        enable_sysregs();
        write_sysreg!("icc_pmr_el1", 0xff);
        write_sysreg!("icc_bpr1_el1", 0);
        // EOImode = 1: EOIR drops priority only; DIR deactivates.
        write_sysreg!("icc_ctlr_el1", 1 << 1);
        write_sysreg!("icc_igrpen1_el1", 1);
        // SAFETY: the CPU interface writes take effect before any IRQ.
        unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
        Ok(Self { redist, lines })
    }

    /// Enables private interrupt `intid` (an SGI or PPI, < 32) on this CPU.
    pub fn enable_private(&self, intid: u32) {
        debug_assert!(intid < 32);
        write32(self.redist + gicr::ISENABLER0, 1 << intid);
    }

    /// Enables shared interrupt `intid` (an SPI), routed to the CPU with
    /// MPIDR affinity `mpidr`.
    pub fn enable_spi(&self, intid: u32, mpidr: u64) {
        if !(32..self.lines).contains(&intid) {
            return;
        }
        // GICD_IROUTER: Aff3 in [39:32], Aff2.Aff1.Aff0 in [23:0] (the
        // MPIDR layout, not GICR_TYPER's); IRM (bit 31) clear.
        write64(
            GICD_BASE + gicd::IROUTER + intid as usize * 8,
            mpidr & 0xff_00ff_ffff,
        );
        write32(
            GICD_BASE + gicd::ISENABLER + (intid / 32) as usize * 4,
            1 << (intid % 32),
        );
    }
}

/// Each CPU's redistributor (`RD_base`), by CPU index, once brought up.
static REDIST: [core::sync::atomic::AtomicUsize; super::smp::MAX_PCPUS] =
    [const { core::sync::atomic::AtomicUsize::new(0) }; super::smp::MAX_PCPUS];

/// Clears the active (and pending) state of private interrupt `intid` on
/// the executing CPU's redistributor (`GICR_ICACTIVER0`, `GICR_ICPENDR0`):
/// a hardware-backed interrupt a vCPU left active when it stopped, which no
/// guest will deactivate any more.
pub fn clear_private(intid: u32) {
    debug_assert!(intid < 32);
    let rd = REDIST[super::smp::this_cpu() % super::smp::MAX_PCPUS]
        .load(core::sync::atomic::Ordering::Relaxed);
    if rd != 0 {
        write32(rd + gicr::ICACTIVER0, 1 << intid);
        write32(rd + gicr::ICPENDR0, 1 << intid);
    }
}

/// Clears the active state of shared interrupt `intid` at the distributor
/// (`GICD_ICACTIVER`): a passed-through device's SPI its VM left active.
pub fn clear_active_spi(intid: u32) {
    if intid >= 32 {
        write32(
            GICD_BASE + gicd::ICACTIVER + (intid / 32) as usize * 4,
            1 << (intid % 32),
        );
    }
}

/// Acknowledges the highest-priority pending group-1 interrupt at EL2;
/// [`SPURIOUS`] if none.
#[must_use]
pub fn acknowledge() -> u32 {
    (read_sysreg!("icc_iar1_el1") & 0xff_ffff) as u32
}

/// Drops the running priority of `intid` (without deactivating it).
pub fn priority_drop(intid: u32) {
    write_sysreg!("icc_eoir1_el1", u64::from(intid));
    // The next acknowledge sees the dropped running priority (as Linux's
    // gic_write_eoir): without it an IAR read may still see the old
    // priority and return spurious.
    isb();
}

/// Deactivates `intid`.
pub fn deactivate(intid: u32) {
    write_sysreg!("icc_dir_el1", u64::from(intid));
    // The deactivation takes effect before anything that depends on it
    // (as Linux's gic_write_dir).
    isb();
}

/// Turns the system register interface on at EL2 (`ICC_SRE_EL2.SRE`, and
/// `DFB`, `DIB`) before any `ICC_*`/`ICH_*` access: on a GIC that also has
/// the memory-mapped interface those are UNDEFINED until it is set (Linux's
/// `init_el2_state` does it first too). `Enable` stays clear: the guest's
/// `ICC_SRE_EL1` accesses trap and read as "system registers on" (it may
/// not switch its interface to a memory-mapped one nobody maps).
pub fn enable_sysregs() {
    write_sysreg!("icc_sre_el2", 0b0111);
    isb();
    // The guest's own copy (its writes now trap and are ignored): the
    // system register interface, on a GIC where SRE is not fixed at 1.
    write_sysreg!("icc_sre_el1", 0b0111);
    isb();
}

fn isb() {
    // SAFETY: a context synchronization barrier.
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}
