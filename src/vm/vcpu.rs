//! Handling of the guest's traps: SMCCC calls (PSCI and this hypervisor's
//! own), and the decision to stop on anything unexpected.
//!
//! Portable: the vector code (in [`crate::arch`]) saves the guest's registers
//! in a [`GuestRegs`], reads the syndrome registers into a [`Trap`], and acts
//! on the [`Exit`] returned here.

use core::fmt;

use crate::counter_set;
use crate::esr::{Esr, ec, fault_ipa};
use crate::mm::counters::inc;
use crate::vm::sysreg_emul::SysregAccess;

/// The guest's general-purpose registers and return state, as the lower-EL
/// vectors save them on the EL2 stack. The layout is shared with the
/// assembly in `arch::aarch64::vectors`.
#[repr(C)]
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct GuestRegs {
    /// `x0` to `x30`.
    pub x: [u64; 31],
    /// `ELR_EL2`: where the guest resumes.
    pub elr: u64,
    /// `SPSR_EL2`: the guest's PSTATE to restore.
    pub spsr: u64,
    /// Keeps the frame a multiple of 16 bytes (AArch64 stack alignment).
    pub pad: u64,
}

/// Size of [`GuestRegs`] in bytes, used by the vector assembly.
pub const GUEST_REGS_SIZE: usize = core::mem::size_of::<GuestRegs>();
const _: () = assert!(GUEST_REGS_SIZE == 34 * 8 && GUEST_REGS_SIZE.is_multiple_of(16));

/// The syndrome of a synchronous trap from the guest.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Trap {
    /// `ESR_EL2`.
    pub esr: Esr,
    /// `FAR_EL2`.
    pub far: u64,
    /// `HPFAR_EL2`.
    pub hpfar: u64,
}

/// SMCCC function identifiers and return codes used here.
pub mod smccc {
    /// SMCCC_VERSION.
    pub const VERSION: u32 = 0x8000_0000;
    /// SMCCC_ARCH_FEATURES.
    pub const ARCH_FEATURES: u32 = 0x8000_0001;
    /// PSCI_VERSION.
    pub const PSCI_VERSION: u32 = 0x8400_0000;
    /// PSCI CPU_SUSPEND, SMC32 form.
    pub const PSCI_CPU_SUSPEND_32: u32 = 0x8400_0001;
    /// PSCI CPU_SUSPEND, SMC64 form.
    pub const PSCI_CPU_SUSPEND_64: u32 = 0xc400_0001;
    /// PSCI CPU_OFF.
    pub const PSCI_CPU_OFF: u32 = 0x8400_0002;
    /// PSCI AFFINITY_INFO, SMC32 form.
    pub const PSCI_AFFINITY_INFO_32: u32 = 0x8400_0004;
    /// PSCI AFFINITY_INFO, SMC64 form.
    pub const PSCI_AFFINITY_INFO_64: u32 = 0xc400_0004;
    /// PSCI MIGRATE_INFO_TYPE.
    pub const PSCI_MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
    /// PSCI CPU_ON, SMC32 form.
    pub const PSCI_CPU_ON_32: u32 = 0x8400_0003;
    /// PSCI CPU_ON, SMC64 form.
    pub const PSCI_CPU_ON_64: u32 = 0xc400_0003;
    /// PSCI SYSTEM_OFF.
    pub const PSCI_SYSTEM_OFF: u32 = 0x8400_0008;
    /// PSCI SYSTEM_RESET.
    pub const PSCI_SYSTEM_RESET: u32 = 0x8400_0009;
    /// PSCI_FEATURES.
    pub const PSCI_FEATURES: u32 = 0x8400_000a;
    /// Vendor hypervisor service: this hypervisor's ABI version.
    pub const HYP_VERSION: u32 = 0xc600_0000;
    /// Vendor hypervisor service: the test guest reports `x1` passed, `x2`
    /// failed tests.
    pub const HYP_REPORT_RESULT: u32 = 0xc600_0001;
    /// Vendor hypervisor service: `x1` = the calling VM's number (1
    /// first), `x2` = the calling vCPU's index.
    pub const HYP_VM_INFO: u32 = 0xc600_0003;
    /// Vendor hypervisor service: copy the counters into the guest buffer
    /// at IPA `x1` of `x2` bytes.
    pub const HYP_STATS: u32 = 0xc600_0002;
    /// Vendor hypervisor service: run the stage-2 operations listed at IPA
    /// `x1` (`x2` of them) in one lazy section (see `guest_mm`).
    pub const HYP_MM_BATCH: u32 = 0xc600_0010;
    /// Vendor hypervisor service: populate `[x1, x1 + x2)` of guest RAM.
    pub const HYP_MAP: u32 = 0xc600_0011;
    /// Vendor hypervisor service: give `[x1, x1 + x2)` back.
    pub const HYP_UNMAP: u32 = 0xc600_0012;
    /// Vendor hypervisor service: set the permissions of `[x1, x1 + x2)` to
    /// `x3` (bit 0 read, 1 write, 2 execute).
    pub const HYP_PROTECT: u32 = 0xc600_0013;
    /// Test builds: set the fault-around window to `x1` bytes (0: off).
    pub const HYP_TEST_SET_FAULT_AROUND: u32 = 0xc600_0f02;
    /// Test builds: run benchmark workload `x1` (0..=6: W1..W4, W6, W7, W1-rsv) in mode
    /// `x2` (0 eager, 1 FlushInner, 2 Naive, 3 Flatten, 4 Counted) on a
    /// scratch stage 2; prints a `LAZYHYP-BENCH` line; `x1` = correct.
    pub const HYP_TEST_RUN_WORKLOAD: u32 = 0xc600_0f03;
    /// Test builds: bracket a guest-driven benchmark phase. `x1` = 0 start
    /// (`x2` = mode as above, selected now; `x3` = workload number), 1 stop
    /// (`x3` = 1 if the guest found the result correct): prints a
    /// `LAZYHYP-BENCH` line with the counter deltas.
    pub const HYP_TEST_BENCH_MARK: u32 = 0xc600_0f04;
    /// Test builds: forget that `[x1, x1 + x2)` was given back, so that
    /// (unmapped) it is demand-populated again on its next touch.
    pub const HYP_TEST_FORGET: u32 = 0xc600_0f05;
    /// Test builds: `x1` = a checksum of the hypervisor's text, read-only
    /// data and a canary page, `x2` = the canary page's physical address
    /// (a target for a guest trying to make a device write to it).
    pub const HYP_TEST_CHECKSUM: u32 = 0xc600_0f06;
    /// Test builds: select the lazy-mode nesting policy `x1` (0 Flatten,
    /// 1 FlushInner, 2 Naive, 3 Counted).
    pub const HYP_TEST_SET_POLICY: u32 = 0xc600_0f00;
    /// Test builds: allocate and free a table page inside a lazy section and
    /// report whether the hypervisor could still read it after the free
    /// (bit 0: inside the section, bit 1: after it).
    pub const HYP_TEST_FREED_PAGE_PROBE: u32 = 0xc600_0f01;

    /// SMCCC 1.1 in `SMCCC_VERSION`'s encoding.
    pub const SMCCC_VERSION_1_1: u64 = 0x1_0001;
    /// PSCI 1.1 in `PSCI_VERSION`'s encoding.
    pub const PSCI_VERSION_1_1: u64 = 0x1_0001;
    /// This hypervisor's ABI version (major 0, minor 1).
    pub const HYP_ABI_VERSION: u64 = 0x0_0001;
    /// `SUCCESS` (SMCCC and PSCI).
    pub const SUCCESS: u64 = 0;
    /// `NOT_SUPPORTED` (-1), sign-extended.
    pub const NOT_SUPPORTED: u64 = u64::MAX;
}

counter_set! {
    /// Guest exits to the hypervisor, by kind.
    pub struct ExitCounters {
        /// HVC calls.
        exits_hvc,
        /// SMC calls trapped by `HCR_EL2.TSC`.
        exits_smc,
        /// Data aborts (stage 2).
        exits_dabt,
        /// Instruction aborts (stage 2).
        exits_iabt,
        /// Trapped system register accesses.
        exits_sysreg,
        /// IRQs and FIQs taken to EL2.
        exits_irq,
        /// Anything else.
        exits_other,
        /// Data aborts on an emulated device, emulated.
        mmio_emulated,
        /// Trapped system register accesses emulated (sanitised ID reads,
        /// RAZ/WI debug registers, set/way operations).
        sysreg_emulated,
        /// Set/way cache maintenance emulated by a clean of guest memory.
        setway_flushes,
        /// UNDEFINED exceptions injected for traps the hypervisor does not
        /// emulate.
        undef_injected,
        /// Synchronous external aborts injected for stage-2 aborts the
        /// guest cannot be given memory for.
        abort_injected,
        /// The most bytes this CPU's own heap allocations have held at once
        /// (a high-water mark, not a count; net of what the CPU freed).
        heap_peak_bytes,
        /// Physical SErrors taken while the guest ran (reported, and handed
        /// to the guest as a virtual SError).
        serrors,
        /// Physical interrupts acknowledged at EL2.
        irqs_taken,
        /// Data cache lines cleaned and invalidated to the point of
        /// coherency for guest memory (`DC CIVAC`; 0 under FEAT_S2FWB).
        cmo_lines,
        /// Instruction cache invalidations (`IC IALLUIS`).
        icache_invalidations,
        /// Stage-2 permission faults the tables no longer explained (another
        /// CPU changed the entry first): retried, not aborted.
        stale_faults,
        /// VM-lock acquisitions that found it free.
        vm_lock_uncontended,
        /// VM-lock acquisitions that had to wait (another CPU held it).
        vm_lock_contended,
        /// Entries that loaded no list register without taking the VM lock
        /// (nothing in them, nothing changed for the vCPU).
        vgic_entries_skipped,
    }
}

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Stop {
    /// PSCI `SYSTEM_OFF` (or `CPU_OFF` of the only CPU).
    SystemOff,
    /// PSCI `SYSTEM_RESET`; this hypervisor does not restart guests.
    SystemReset,
    /// A trap the hypervisor does not handle yet.
    UnhandledTrap(Trap),
}

/// What to do after a trap.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Exit {
    /// Return to the guest.
    Resume,
    /// Stop running the guest.
    Stop(Stop),
    /// A call the hypervisor's memory services answer (function ID in `w0`,
    /// arguments in `x1..`); the caller writes the results.
    MmCall(u32),
    /// A stage-2 abort: populated on demand if it is the guest's memory,
    /// answered with a synchronous external abort otherwise.
    Stage2Abort(Trap),
    /// A trapped system register access (EC 0x18), decoded; the caller
    /// acts as [`crate::vm::sysreg_emul::classify`] says.
    Sysreg(Trap, SysregAccess),
    /// A trap the hypervisor does not emulate: inject UNDEFINED (see
    /// [`Injection::undefined`]).
    Undefined(Trap),
    /// A PSCI call that needs the VM's other vCPUs; the caller answers it
    /// (writes `x0`, or does not return to this vCPU).
    Psci(PsciCall),
    /// The test guest reported its results (`x0` already written).
    Report(GuestReport),
}

/// A PSCI call about vCPUs (arguments already narrowed for the SMC32
/// forms).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum PsciCall {
    /// `CPU_ON(target MPIDR, entry, context id)`.
    CpuOn {
        /// The target vCPU's MPIDR.
        target: u64,
        /// Its entry point (IPA).
        entry: u64,
        /// Its `x0` at entry.
        context: u64,
    },
    /// `CPU_OFF` of the calling vCPU.
    CpuOff,
    /// `AFFINITY_INFO(target affinity, lowest affinity level)`.
    AffinityInfo {
        /// The affinity asked about.
        target: u64,
        /// The lowest affinity level (0..=3).
        level: u64,
    },
    /// `CPU_SUSPEND`: a standby (treated as `WFI`; every power-down
    /// request is served as a standby, which PSCI allows, as KVM does).
    CpuSuspend,
}

/// The test guest's report of its results.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct GuestReport {
    /// Tests passed.
    pub passed: u64,
    /// Tests failed.
    pub failed: u64,
}

/// A vCPU's trap handling: decodes an exit into what the hypervisor must
/// do ([`Exit`]). It keeps no state of its own; what calls change lives in
/// the VM (its power table, its report).
#[derive(Debug, Default)]
pub struct Vcpu;

impl Vcpu {
    /// Handles a synchronous trap from the guest. `regs` is updated in place
    /// (results of a call, return address).
    pub fn handle_sync(&mut self, regs: &mut GuestRegs, trap: Trap, exits: &ExitCounters) -> Exit {
        match trap.esr.ec() {
            ec::HVC64 => {
                inc(&exits.exits_hvc);
                // ELR already points after the HVC. SMCCC calls use `HVC #0`.
                if trap.esr.iss() & 0xffff != 0 {
                    regs.x[0] = smccc::NOT_SUPPORTED;
                    return Exit::Resume;
                }
                Self::smccc_call(regs)
            }
            ec::SMC64 => {
                inc(&exits.exits_smc);
                // A trapped SMC leaves ELR at the SMC itself: step over it.
                regs.elr = regs.elr.wrapping_add(4);
                // SMCCC calls use `SMC #0`.
                if trap.esr.iss() & 0xffff != 0 {
                    regs.x[0] = smccc::NOT_SUPPORTED;
                    return Exit::Resume;
                }
                Self::smccc_call(regs)
            }
            // A stage-2 abort: demand population or an injected abort, as the
            // guest's memory state says.
            ec::DABT_LOWER | ec::IABT_LOWER => {
                inc(if trap.esr.ec() == ec::DABT_LOWER {
                    &exits.exits_dabt
                } else {
                    &exits.exits_iabt
                });
                Exit::Stage2Abort(trap)
            }
            ec::SYSREG => {
                inc(&exits.exits_sysreg);
                Exit::Sysreg(trap, SysregAccess::decode(trap.esr.iss()))
            }
            // An AArch32 EL0 coprocessor access that traps (PMU, debug, ID
            // registers, set/way) even though its condition code fails:
            // the architecture lets such a trap be taken; the instruction
            // is then skipped, as the CPU would have done (KVM's
            // `kvm_condition_valid32`).
            class if is_aarch32_trap(class) && !condition_passes(trap.esr, regs.spsr) => {
                inc(&exits.exits_other);
                step_over(regs, trap.esr.il());
                Exit::Resume
            }
            // Anything else that reaches EL2 from the guest is an
            // instruction or access the hypervisor does not offer (SVE and
            // SME through CPTR_EL2, and whatever a future trap bit adds):
            // UNDEFINED, as on a CPU without it. It never ends the run.
            _ => {
                inc(&exits.exits_other);
                Exit::Undefined(trap)
            }
        }
    }

    /// Dispatches an SMCCC call (function ID in `w0`, arguments in `x1..`),
    /// writing results to `x0..`.
    fn smccc_call(regs: &mut GuestRegs) -> Exit {
        let function = regs.x[0] as u32;
        let (a1, a2) = (regs.x[1], regs.x[2]);
        regs.x[0] = match function {
            smccc::VERSION => smccc::SMCCC_VERSION_1_1,
            smccc::PSCI_VERSION => smccc::PSCI_VERSION_1_1,
            smccc::ARCH_FEATURES => match a1 as u32 {
                smccc::VERSION | smccc::ARCH_FEATURES => smccc::SUCCESS,
                _ => smccc::NOT_SUPPORTED,
            },
            smccc::PSCI_FEATURES => match a1 as u32 {
                smccc::VERSION
                | smccc::PSCI_VERSION
                | smccc::PSCI_FEATURES
                | smccc::PSCI_CPU_ON_32
                | smccc::PSCI_CPU_ON_64
                | smccc::PSCI_CPU_OFF
                | smccc::PSCI_AFFINITY_INFO_32
                | smccc::PSCI_AFFINITY_INFO_64
                | smccc::PSCI_MIGRATE_INFO_TYPE
                | smccc::PSCI_SYSTEM_OFF
                | smccc::PSCI_SYSTEM_RESET => smccc::SUCCESS,
                // Feature flags 0: the original power_state format, no
                // OS-initiated mode.
                smccc::PSCI_CPU_SUSPEND_32 | smccc::PSCI_CPU_SUSPEND_64 => 0,
                _ => smccc::NOT_SUPPORTED,
            },
            // No trusted OS to migrate (2: "not present or does not need
            // migration"), as KVM answers.
            smccc::PSCI_MIGRATE_INFO_TYPE => 2,
            smccc::PSCI_CPU_ON_32 => {
                return Exit::Psci(PsciCall::CpuOn {
                    target: a1 & 0xffff_ffff,
                    entry: a2 & 0xffff_ffff,
                    context: regs.x[3] & 0xffff_ffff,
                });
            }
            smccc::PSCI_CPU_ON_64 => {
                return Exit::Psci(PsciCall::CpuOn {
                    target: a1,
                    entry: a2,
                    context: regs.x[3],
                });
            }
            smccc::PSCI_AFFINITY_INFO_32 => {
                return Exit::Psci(PsciCall::AffinityInfo {
                    target: a1 & 0xffff_ffff,
                    level: a2 & 0xffff_ffff,
                });
            }
            smccc::PSCI_AFFINITY_INFO_64 => {
                return Exit::Psci(PsciCall::AffinityInfo {
                    target: a1,
                    level: a2,
                });
            }
            smccc::PSCI_CPU_SUSPEND_32 | smccc::PSCI_CPU_SUSPEND_64 => {
                return Exit::Psci(PsciCall::CpuSuspend);
            }
            smccc::PSCI_CPU_OFF => return Exit::Psci(PsciCall::CpuOff),
            smccc::PSCI_SYSTEM_OFF => return Exit::Stop(Stop::SystemOff),
            smccc::PSCI_SYSTEM_RESET => return Exit::Stop(Stop::SystemReset),
            smccc::HYP_VERSION => smccc::HYP_ABI_VERSION,
            // The rest of this hypervisor's vendor range: memory services.
            0xc600_0002..=0xc600_ffff => return Exit::MmCall(function),
            smccc::HYP_REPORT_RESULT => {
                regs.x[0] = smccc::SUCCESS;
                return Exit::Report(GuestReport {
                    passed: a1,
                    failed: a2,
                });
            }
            _ => smccc::NOT_SUPPORTED,
        };
        Exit::Resume
    }
}

/// The exception classes of trapped AArch32 instructions that carry a
/// condition code (`CV`, `COND`): MCR/MRC and MCRR/MRRC to CP15 and CP14,
/// LDC/STC, VMRS.
const fn is_aarch32_trap(ec: u8) -> bool {
    matches!(ec, 0x03..=0x06 | 0x08 | 0x0c)
}

/// Whether a trapped AArch32 instruction with syndrome `esr` passes its
/// condition check under the guest's PSTATE `spsr` (N, Z, C, V in bits
/// \[31:28\]). The condition is `ESR.COND` when `CV` is set; otherwise
/// (a T32 instruction may report `CV` = 0) it is the current IT block's
/// (`IT[7:4]`), and outside an IT block the instruction is unconditional
/// (as KVM's `kvm_condition_valid32`).
#[must_use]
pub fn condition_passes(esr: Esr, spsr: u64) -> bool {
    let iss = esr.iss();
    let cond = if iss & (1 << 24) != 0 {
        u64::from((iss >> 20) & 0xf)
    } else {
        let it = ((spsr >> 25) & 0b11) | (((spsr >> 10) & 0x3f) << 2);
        if it == 0 {
            return true;
        }
        it >> 4
    };
    let (n, z, c, v) = (
        spsr >> 31 & 1 == 1,
        spsr >> 30 & 1 == 1,
        spsr >> 29 & 1 == 1,
        spsr >> 28 & 1 == 1,
    );
    let base = match cond >> 1 {
        0 => z,
        1 => c,
        2 => n,
        3 => v,
        4 => c && !z,
        5 => n == v,
        6 => !z && n == v,
        _ => true,
    };
    if cond & 1 == 1 && cond != 0xf {
        !base
    } else {
        base
    }
}

/// Steps the guest over the instruction that trapped (`il`: 32-bit), and
/// for AArch32 T32 code inside an IT block advances its IT state, as
/// executing the instruction would (KVM's `kvm_adjust_itstate`).
pub fn step_over(regs: &mut GuestRegs, il: bool) {
    const AARCH32: u64 = 1 << 4;
    const T32: u64 = 1 << 5;
    regs.elr = regs.elr.wrapping_add(if il { 4 } else { 2 });
    if regs.spsr & (AARCH32 | T32) != (AARCH32 | T32) {
        return;
    }
    // IT[1:0] in SPSR[26:25], IT[7:2] in SPSR[15:10].
    let it = ((regs.spsr >> 25) & 0b11) | (((regs.spsr >> 10) & 0x3f) << 2);
    if it == 0 {
        return;
    }
    let next = if it.trailing_zeros() >= 3 {
        0
    } else {
        (it & 0b1110_0000) | ((it << 1) & 0b1_1111)
    };
    regs.spsr &= !((0b11 << 25) | (0x3f << 10));
    regs.spsr |= ((next & 0b11) << 25) | (((next >> 2) & 0x3f) << 10);
}

/// How to deliver an exception to the guest's EL1 as if the CPU had taken
/// it there: the EL1 syndrome registers to write and where the guest
/// resumes (its vector).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Injection {
    /// `ESR_EL1`.
    pub esr_el1: u64,
    /// `FAR_EL1`, for aborts; `None`: left as it is (UNKNOWN for the
    /// exception being delivered).
    pub far_el1: Option<u64>,
    /// `ELR_EL1`: the instruction that took the exception.
    pub elr_el1: u64,
    /// `SPSR_EL1`: the guest's PSTATE at the exception.
    pub spsr_el1: u64,
    /// New `ELR_EL2`: the guest's vector entry.
    pub elr: u64,
    /// New `SPSR_EL2`: PSTATE on entry to EL1h (see [`entry_pstate`]).
    pub spsr: u64,
}

/// Whether a saved PSTATE (`SPSR_EL2`) is AArch32 (`M[4]`).
const fn is_aarch32(spsr: u64) -> bool {
    spsr & 0b1_0000 != 0
}

/// Whether a saved PSTATE is EL0 (AArch64 `M[3:0]` = 0, or any AArch32
/// mode: EL1 is AArch64 here, so AArch32 is always EL0).
const fn is_el0(spsr: u64) -> bool {
    is_aarch32(spsr) || spsr.trailing_zeros() >= 4
}

/// The offset of the synchronous vector for an exception taken to EL1 from
/// PSTATE `spsr`.
const fn sync_vector_offset(spsr: u64) -> u64 {
    match spsr & 0b1_1111 {
        0b0_0100 => 0x000,               // EL1t: current EL with SP_EL0
        0b0_0101 => 0x200,               // EL1h: current EL with SP_ELx
        m if m & 0b1_0000 != 0 => 0x600, // AArch32 EL0: lower EL, AArch32
        _ => 0x400,                      // EL0: lower EL, AArch64
    }
}

impl Injection {
    fn new(
        esr_el1: u64,
        far_el1: Option<u64>,
        elr: u64,
        spsr: u64,
        vbar_el1: u64,
        sctlr_el1: u64,
    ) -> Self {
        Self {
            esr_el1,
            far_el1,
            elr_el1: elr,
            spsr_el1: spsr,
            // VBAR_EL1 bits [10:0] are RES0 to the CPU (not cleared by every
            // implementation on write): use bits [63:11].
            elr: (vbar_el1 & !0x7ff) | sync_vector_offset(spsr),
            spsr: entry_pstate(spsr, sctlr_el1),
        }
    }

    /// The injection for stage-2 abort `trap` taken at `elr`/`spsr` with the
    /// guest's `VBAR_EL1` and `SCTLR_EL1`, as the architecture delivers a
    /// synchronous external abort: the exception class of an abort taken to
    /// EL1 from the guest's EL (same EL: 0x25/0x21, from EL0: 0x24/0x20),
    /// the fault status "synchronous external abort" (0x10), or "... on a
    /// translation table walk" (0x14 + level) when the stage-2 fault was on
    /// the guest's own stage-1 walk (`S1PTW`; EL2 does not know which
    /// stage-1 level was walking, so the level is that of the stage-2
    /// lookup that failed for it), `WnR` kept for data aborts, `FAR_EL1`
    /// the faulting VA, and PSTATE on entry as for any exception to EL1.
    #[must_use]
    pub fn sync_external_abort(
        trap: Trap,
        elr: u64,
        spsr: u64,
        vbar_el1: u64,
        sctlr_el1: u64,
    ) -> Self {
        const SEA: u64 = 0x10;
        const SEA_ON_WALK: u64 = 0x14;
        let from_el0 = is_el0(spsr);
        let data = trap.esr.ec() == ec::DABT_LOWER;
        let ec = match (data, from_el0) {
            (true, false) => ec::DABT_CURRENT,
            (true, true) => ec::DABT_LOWER,
            (false, false) => ec::IABT_CURRENT,
            (false, true) => ec::IABT_LOWER,
        };
        let fsc = if trap.esr.s1ptw() {
            SEA_ON_WALK | u64::from(trap.esr.fault_status() & 3)
        } else {
            SEA
        };
        // WnR is meaningful for a data abort not on a walk (a walk reads).
        let wnr = if data && !trap.esr.s1ptw() {
            trap.esr.0 & (1 << 6)
        } else {
            0
        };
        let esr = (u64::from(ec) << 26) | (1 << 25) | wnr | fsc;
        Self::new(esr, Some(trap.far), elr, spsr, vbar_el1, sctlr_el1)
    }

    /// The injection of an UNDEFINED exception (EC 0x00) for the trapped
    /// instruction `trap` at `elr`/`spsr`: `ESR_EL1.IL` as the trap's (a
    /// 16-bit T32 instruction from AArch32 EL0 has IL = 0), `ELR_EL1` the
    /// instruction itself (not stepped over), `FAR_EL1` untouched.
    #[must_use]
    pub fn undefined(trap: Trap, elr: u64, spsr: u64, vbar_el1: u64, sctlr_el1: u64) -> Self {
        let il = if trap.esr.il() { 1 << 25 } else { 0 };
        Self::new(
            (u64::from(ec::UNKNOWN) << 26) | il,
            None,
            elr,
            spsr,
            vbar_el1,
            sctlr_el1,
        )
    }
}

/// PSTATE on taking an exception to EL1h from PSTATE `old`, with the
/// guest's `SCTLR_EL1` (Arm ARM, "PSTATE on exception entry"; as KVM's
/// `get_except64_cpsr`): N, Z, C, V kept; D, A, I, F masked; PAN kept, and
/// set if `SCTLR_EL1.SPAN` is 0; DIT kept (from bit 21 of an AArch32
/// SPSR, bit 24 of an AArch64 one); SSBS from `SCTLR_EL1.DSSBS`; UAO, SS,
/// IL, BTYPE and the rest cleared. (No MTE for the guest: TCO is left
/// clear.)
#[must_use]
pub fn entry_pstate(old: u64, sctlr_el1: u64) -> u64 {
    const EL1H: u64 = 0b0101;
    const DAIF: u64 = 0b1111 << 6;
    const NZCV: u64 = 0b1111 << 28;
    const PAN: u64 = 1 << 22;
    const DIT: u64 = 1 << 24;
    const DIT_AARCH32: u64 = 1 << 21;
    const SSBS: u64 = 1 << 12;
    const SCTLR_SPAN: u64 = 1 << 23;
    const SCTLR_DSSBS: u64 = 1 << 44;
    let dit = if is_aarch32(old) {
        if old & DIT_AARCH32 != 0 { DIT } else { 0 }
    } else {
        old & DIT
    };
    let mut new = EL1H | DAIF | (old & (NZCV | PAN)) | dit;
    if sctlr_el1 & SCTLR_SPAN == 0 {
        new |= PAN;
    }
    if sctlr_el1 & SCTLR_DSSBS != 0 {
        new |= SSBS;
    }
    new
}

/// The decoded crash report for a trap or exception the hypervisor cannot
/// handle: exception class by name, ISS, FAR, ELR, SPSR, and HPFAR with the
/// faulting IPA for stage-2 aborts.
#[derive(Clone, Copy, Debug)]
pub struct TrapReport<'a> {
    /// Where the exception came from ("guest (EL1)", "hypervisor (EL2)").
    pub origin: &'a str,
    /// The syndrome.
    pub trap: Trap,
    /// `ELR_EL2`.
    pub elr: u64,
    /// `SPSR_EL2`.
    pub spsr: u64,
}

impl fmt::Display for TrapReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let esr = self.trap.esr;
        writeln!(f, "unexpected exception from {}", self.origin)?;
        writeln!(f, "  {esr:?}")?;
        writeln!(f, "  ELR  {:#018x}  SPSR {:#010x}", self.elr, self.spsr)?;
        if esr.is_abort() {
            if esr.far_not_valid() {
                writeln!(f, "  FAR  (not valid)")?;
            } else {
                writeln!(f, "  FAR  {:#018x}", self.trap.far)?;
            }
            if matches!(esr.ec(), ec::DABT_LOWER | ec::IABT_LOWER) {
                write!(
                    f,
                    "  HPFAR {:#018x}  faulting IPA {:#x}",
                    self.trap.hpfar,
                    fault_ipa(self.trap.hpfar, self.trap.far)
                )?;
            }
        } else {
            write!(f, "  FAR  {:#018x}", self.trap.far)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    fn hvc(function: u32, a1: u64, a2: u64) -> (Vcpu, GuestRegs, Exit) {
        let mut vcpu = Vcpu;
        let mut regs = GuestRegs::default();
        regs.x[0] = u64::from(function);
        regs.x[1] = a1;
        regs.x[2] = a2;
        regs.elr = 0x4008_1000;
        let trap = Trap {
            esr: Esr(u64::from(ec::HVC64) << 26),
            far: 0,
            hpfar: 0,
        };
        let exit = vcpu.handle_sync(&mut regs, trap, &ExitCounters::new());
        (vcpu, regs, exit)
    }

    #[test]
    fn psci_version_features_and_off() {
        assert_eq!(
            hvc(smccc::PSCI_VERSION, 0, 0).1.x[0],
            smccc::PSCI_VERSION_1_1
        );
        let feat = |f: u32| hvc(smccc::PSCI_FEATURES, f.into(), 0).1.x[0];
        assert_eq!(feat(smccc::PSCI_SYSTEM_OFF), smccc::SUCCESS);
        assert_eq!(feat(smccc::PSCI_CPU_ON_64), smccc::SUCCESS);
        assert_eq!(feat(smccc::PSCI_AFFINITY_INFO_32), smccc::SUCCESS);
        assert_eq!(feat(0x8400_0005), smccc::NOT_SUPPORTED, "MIGRATE");
        assert_eq!(
            hvc(smccc::PSCI_SYSTEM_OFF, 0, 0).2,
            Exit::Stop(Stop::SystemOff)
        );
        assert_eq!(
            hvc(smccc::PSCI_CPU_OFF, 0, 0).2,
            Exit::Psci(PsciCall::CpuOff)
        );
        assert_eq!(
            hvc(smccc::PSCI_SYSTEM_RESET, 0, 0).2,
            Exit::Stop(Stop::SystemReset)
        );
        assert_eq!(hvc(smccc::PSCI_MIGRATE_INFO_TYPE, 0, 0).1.x[0], 2);
    }

    #[test]
    fn psci_cpu_calls_are_decoded_and_smc32_narrowed() {
        let mut regs = GuestRegs::default();
        regs.x[0] = u64::from(smccc::PSCI_CPU_ON_32);
        regs.x[1] = 0xffff_ffff_0000_0001;
        regs.x[2] = 0x1_4000_1000;
        regs.x[3] = 0x5_0000_0007;
        let trap = Trap {
            esr: Esr(u64::from(ec::HVC64) << 26),
            far: 0,
            hpfar: 0,
        };
        assert_eq!(
            Vcpu.handle_sync(&mut regs, trap, &ExitCounters::new()),
            Exit::Psci(PsciCall::CpuOn {
                target: 1,
                entry: 0x4000_1000,
                context: 7
            })
        );
        regs.x[0] = u64::from(smccc::PSCI_CPU_ON_64);
        regs.x[1] = 0x100;
        regs.x[2] = 0x1_4000_1000;
        regs.x[3] = 0x5_0000_0007;
        assert_eq!(
            Vcpu.handle_sync(&mut regs, trap, &ExitCounters::new()),
            Exit::Psci(PsciCall::CpuOn {
                target: 0x100,
                entry: 0x1_4000_1000,
                context: 0x5_0000_0007
            })
        );
        assert_eq!(
            hvc(smccc::PSCI_AFFINITY_INFO_64, 0x1, 0).2,
            Exit::Psci(PsciCall::AffinityInfo {
                target: 1,
                level: 0
            })
        );
        assert_eq!(
            hvc(smccc::PSCI_CPU_SUSPEND_64, 0, 0).2,
            Exit::Psci(PsciCall::CpuSuspend)
        );
    }

    #[test]
    fn unknown_function_is_not_supported_and_guest_resumes() {
        // The vendor range goes to the memory services (which answer
        // NOT_SUPPORTED for what they do not know); any other range here.
        assert_eq!(hvc(0xc600_ffff, 0, 0).2, Exit::MmCall(0xc600_ffff));
        let (_, regs, exit) = hvc(0xc500_0001, 0, 0);
        assert_eq!(regs.x[0], smccc::NOT_SUPPORTED);
        assert_eq!(exit, Exit::Resume);
        assert_eq!(regs.elr, 0x4008_1000, "HVC's ELR already points past it");
    }

    #[test]
    fn report_is_recorded() {
        let (_, regs, exit) = hvc(smccc::HYP_REPORT_RESULT, 7, 1);
        assert_eq!(
            exit,
            Exit::Report(GuestReport {
                passed: 7,
                failed: 1
            })
        );
        assert_eq!(regs.x[0], smccc::SUCCESS);
    }

    #[test]
    fn trapped_smc_steps_over_the_instruction() {
        let mut vcpu = Vcpu;
        let mut regs = GuestRegs {
            elr: 0x4008_0000,
            ..GuestRegs::default()
        };
        regs.x[0] = u64::from(smccc::PSCI_VERSION);
        let trap = Trap {
            esr: Esr(u64::from(ec::SMC64) << 26),
            far: 0,
            hpfar: 0,
        };
        let exits = ExitCounters::new();
        assert_eq!(vcpu.handle_sync(&mut regs, trap, &exits), Exit::Resume);
        assert_eq!(regs.elr, 0x4008_0004);
        assert_eq!(
            exits.exits_smc.load(core::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn stage2_abort_is_injected_and_the_report_names_the_ipa() {
        let mut vcpu = Vcpu;
        let mut regs = GuestRegs::default();
        let esr = Esr((u64::from(ec::DABT_LOWER) << 26) | (1 << 25) | (1 << 6) | 0x06);
        let trap = Trap {
            esr,
            far: 0x5000_0123,
            hpfar: (0x5000_0000 >> 12) << 4,
        };
        let exit = vcpu.handle_sync(&mut regs, trap, &ExitCounters::new());
        assert_eq!(exit, Exit::Stage2Abort(trap));
        // Taken from EL1h: the guest's current-EL SPx vector, EC 0x25,
        // DFSC 0x10 (SEA), WnR kept.
        // SCTLR_EL1.SPAN set: PAN is not forced.
        let span = 1 << 23;
        let inj = Injection::sync_external_abort(trap, 0x4008_1234, 0x3c5, 0x4008_0800, span);
        assert_eq!(inj.elr, 0x4008_0a00);
        assert_eq!(inj.esr_el1, (0x25 << 26) | (1 << 25) | (1 << 6) | 0x10);
        assert_eq!(
            (inj.far_el1, inj.elr_el1, inj.spsr_el1, inj.spsr),
            (Some(0x5000_0123), 0x4008_1234, 0x3c5, 0x3c5)
        );
        // From EL0 with SPAN clear: the lower-EL vector, EC 0x24, PAN set.
        let inj = Injection::sync_external_abort(trap, 0x1000, 0, 0x4008_0800, 0);
        assert_eq!(
            (inj.elr, inj.esr_el1 >> 26, inj.spsr),
            (0x4008_0c00, 0x24, 0x3c5 | (1 << 22))
        );
        // From AArch32 EL0: the AArch32 lower-EL vector, and the lower-EL
        // class (AArch32 is always EL0 here).
        let inj = Injection::sync_external_abort(trap, 0x1000, 0b1_0000, 0x4008_0800, span);
        assert_eq!((inj.elr, inj.esr_el1 >> 26), (0x4008_0e00, 0x24));
        let text = format!(
            "{}",
            TrapReport {
                origin: "guest (EL1)",
                trap,
                elr: 0x4008_0000,
                spsr: 0x3c5
            }
        );
        assert!(text.contains("Data abort from lower EL"), "{text}");
        assert!(text.contains("translation fault level 2"), "{text}");
        assert!(text.contains("faulting IPA 0x50000123"), "{text}");
    }

    #[test]
    fn a_failed_condition_skips_an_aarch32_trap_and_advances_it_state() {
        // MRC p15 (EC 0x03) with CV = 1, COND = EQ (0b0000), Z clear:
        // skipped, not UNDEFINED; with Z set it is UNDEFINED (not offered).
        let esr = |cond: u64| Esr((0x03 << 26) | (1 << 25) | (1 << 24) | (cond << 20));
        let exits = ExitCounters::new();
        let mut vcpu = Vcpu;
        let mut regs = GuestRegs {
            elr: 0x8000,
            spsr: 0b1_0000,
            ..GuestRegs::default()
        };
        let trap = Trap {
            esr: esr(0b0000),
            far: 0,
            hpfar: 0,
        };
        assert_eq!(vcpu.handle_sync(&mut regs, trap, &exits), Exit::Resume);
        assert_eq!(regs.elr, 0x8004);
        regs.spsr |= 1 << 30;
        assert_eq!(
            vcpu.handle_sync(&mut regs, trap, &exits),
            Exit::Undefined(trap)
        );
        // Conditions: NE with Z set fails; GE with N == V passes; AL passes;
        // no CV: passes.
        assert!(!condition_passes(esr(0b0001), 1 << 30));
        assert!(condition_passes(esr(0b1010), (1 << 31) | (1 << 28)));
        assert!(!condition_passes(esr(0b1010), 1 << 31));
        assert!(condition_passes(esr(0b1110), 0));
        assert!(condition_passes(Esr(0x03 << 26), 0), "CV = 0, no IT block");
        // CV = 0 inside an IT block: the block's condition (IT[7:4] = EQ
        // here, IT = 0b0000_1100), Z clear: fails.
        let in_it = 0b11_0000 | (0b00_0011 << 10);
        assert!(!condition_passes(Esr(0x03 << 26), in_it));
        assert!(condition_passes(Esr(0x03 << 26), in_it | (1 << 30)));
        // T32 in an IT block (ITSTATE 0b0000_1100: an ITE EQ, two left):
        // after one instruction, one left; after the last, none.
        let mut t32 = GuestRegs {
            elr: 0x9000,
            // IT[1:0] (SPSR[26:25]) = 0b00, IT[7:2] (SPSR[15:10]) = 0b00_0011.
            spsr: 0b11_0000 | (0b00_0011 << 10),
            ..GuestRegs::default()
        };
        step_over(&mut t32, false);
        assert_eq!(t32.elr, 0x9002);
        let it = |spsr: u64| ((spsr >> 25) & 0b11) | (((spsr >> 10) & 0x3f) << 2);
        assert_eq!(it(t32.spsr), 0b0001_1000);
        step_over(&mut t32, false);
        assert_eq!(
            it(t32.spsr),
            0,
            "the block ended (ITAdvance: IT[2:0] was 0)"
        );
        step_over(&mut t32, false);
        assert_eq!(
            (it(t32.spsr), t32.elr),
            (0, 0x9006),
            "outside a block: unchanged"
        );
    }

    #[test]
    fn entry_pstate_keeps_nzcv_and_reads_aarch32_dit_from_bit_21() {
        let nzcv = 0b1010 << 28;
        let span = 1 << 23;
        // AArch64 EL1h with N and C set and DIT (bit 24): all kept.
        assert_eq!(
            entry_pstate(nzcv | (1 << 24) | 0x5, span),
            nzcv | (1 << 24) | 0x3c5
        );
        // AArch32 EL0 (M = 0b10000) with DIT in bit 21: DIT lands in bit 24,
        // and bit 21 (AArch64 SS) does not survive.
        let a32 = nzcv | (1 << 21) | 0b1_0000;
        assert_eq!(entry_pstate(a32, span), nzcv | (1 << 24) | 0x3c5);
        // AArch64 SS (bit 21) is cleared on entry.
        assert_eq!(entry_pstate((1 << 21) | 0x5, span), 0x3c5);
    }

    #[test]
    fn abort_on_a_stage1_walk_reports_walk_fsc_with_level() {
        // S1PTW (bit 7) set, stage-2 translation fault level 2.
        let esr = Esr((u64::from(ec::DABT_LOWER) << 26) | (1 << 25) | (1 << 7) | (1 << 6) | 0x06);
        let trap = Trap {
            esr,
            far: 0x1234_5000,
            hpfar: 0,
        };
        let inj = Injection::sync_external_abort(trap, 0x4008_0000, 0x3c5, 0, 1 << 23);
        assert_eq!(inj.esr_el1 & 0x3f, 0x16, "SEA on walk, level 2");
        assert_eq!(inj.esr_el1 & (1 << 6), 0, "a walk is a read");
    }

    #[test]
    fn unknown_traps_become_undefined_and_sysregs_are_decoded() {
        let exits = ExitCounters::new();
        let mut vcpu = Vcpu;
        let mut regs = GuestRegs {
            elr: 0x4008_2000,
            spsr: 0x3c5,
            ..GuestRegs::default()
        };
        // An SVE instruction trapped by CPTR_EL2.TZ (EC 0x19), and SME
        // (EC 0x1d): never a stop.
        for class in [0x19_u64, 0x1d, 0x07, 0x00] {
            let trap = Trap {
                esr: Esr((class << 26) | (1 << 25)),
                far: 0,
                hpfar: 0,
            };
            assert_eq!(
                vcpu.handle_sync(&mut regs, trap, &exits),
                Exit::Undefined(trap)
            );
        }
        assert_eq!(regs.elr, 0x4008_2000, "the caller injects, at the insn");
        // MRS x3, ID_AA64PFR0_EL1.
        // Op0 3, Op1 0, CRn 0, CRm 4, Op2 0, Rt 3, read.
        let iss = (3 << 20) | (3 << 5) | (4 << 1) | 1;
        let trap = Trap {
            esr: Esr((u64::from(ec::SYSREG) << 26) | (1 << 25) | iss),
            far: 0,
            hpfar: 0,
        };
        match vcpu.handle_sync(&mut regs, trap, &exits) {
            Exit::Sysreg(t, a) => {
                assert_eq!(t, trap);
                assert_eq!((a.encoding(), a.rt, a.read), ((3, 0, 0, 4, 0), 3, true));
            }
            other => panic!("{other:?}"),
        }
        // The UNDEFINED injection: EC 0, IL kept, the current-EL vector,
        // ELR_EL1 at the instruction, FAR untouched.
        let trap = Trap {
            esr: Esr((0x19 << 26) | (1 << 25)),
            far: 0,
            hpfar: 0,
        };
        let inj = Injection::undefined(trap, 0x4008_2000, 0x3c5, 0x4008_0800, 1 << 23);
        assert_eq!(inj.esr_el1, 1 << 25);
        assert_eq!(
            (inj.elr, inj.elr_el1, inj.far_el1),
            (0x4008_0a00, 0x4008_2000, None)
        );
        // A 16-bit T32 instruction from AArch32 EL0: IL = 0, AArch32 vector.
        let t16 = Trap {
            esr: Esr(0x19 << 26),
            far: 0,
            hpfar: 0,
        };
        let inj = Injection::undefined(t16, 0x8000, 0b1_0000, 0x4008_0800, 1 << 23);
        assert_eq!((inj.esr_el1, inj.elr), (0, 0x4008_0e00));
    }
}

#[cfg(test)]
mod abi_doc_tests {
    //! docs/hypercalls.md must say what the code does.

    use super::smccc;
    use crate::mm::counters::MmCounters;
    use crate::vm::guest_mm::{BatchError, kind};
    use alloc::format;
    use alloc::string::String;
    use alloc::vec::Vec;

    const DOC: &str = include_str!("../../docs/hypercalls.md");

    fn id(v: u32) -> String {
        format!("0x{:04X}_{:04X}", v >> 16, v & 0xffff)
    }

    #[test]
    fn every_function_id_is_documented_with_its_name() {
        for (name, v) in [
            ("SMCCC_VERSION", smccc::VERSION),
            ("SMCCC_ARCH_FEATURES", smccc::ARCH_FEATURES),
            ("PSCI_VERSION", smccc::PSCI_VERSION),
            ("PSCI_FEATURES", smccc::PSCI_FEATURES),
            ("CPU_OFF", smccc::PSCI_CPU_OFF),
            ("SYSTEM_OFF", smccc::PSCI_SYSTEM_OFF),
            ("SYSTEM_RESET", smccc::PSCI_SYSTEM_RESET),
            ("HYP_VERSION", smccc::HYP_VERSION),
            ("HYP_REPORT_RESULT", smccc::HYP_REPORT_RESULT),
            ("HYP_STATS", smccc::HYP_STATS),
            ("HYP_MM_BATCH", smccc::HYP_MM_BATCH),
            ("HYP_MAP", smccc::HYP_MAP),
            ("HYP_UNMAP", smccc::HYP_UNMAP),
            ("HYP_PROTECT", smccc::HYP_PROTECT),
            ("HYP_TEST_SET_POLICY", smccc::HYP_TEST_SET_POLICY),
            (
                "HYP_TEST_FREED_PAGE_PROBE",
                smccc::HYP_TEST_FREED_PAGE_PROBE,
            ),
            (
                "HYP_TEST_SET_FAULT_AROUND",
                smccc::HYP_TEST_SET_FAULT_AROUND,
            ),
            ("HYP_TEST_RUN_WORKLOAD", smccc::HYP_TEST_RUN_WORKLOAD),
            ("HYP_TEST_BENCH_MARK", smccc::HYP_TEST_BENCH_MARK),
            ("HYP_TEST_FORGET", smccc::HYP_TEST_FORGET),
            ("HYP_TEST_CHECKSUM", smccc::HYP_TEST_CHECKSUM),
        ] {
            // The row that starts with the name.
            let row = DOC.lines().find(|l| l.starts_with(&format!("| `{name}")));
            let row = row.unwrap_or_else(|| panic!("{name} not documented"));
            assert!(
                row.contains(&id(v)),
                "{name}: the doc row does not give {}: {row}",
                id(v)
            );
        }
        assert!(
            DOC.contains(&id(smccc::PSCI_CPU_ON_32)) && DOC.contains(&id(smccc::PSCI_CPU_ON_64))
        );
    }

    #[test]
    fn status_codes_and_batch_kinds_match() {
        for (e, name) in [
            (BatchError::UnknownKind, "NOT_SUPPORTED"),
            (BatchError::BadRange, "INVALID_PARAMETER"),
            (BatchError::BadList, "INVALID_PARAMETER"),
            (BatchError::BadPermission, "INVALID_PARAMETER"),
            (BatchError::OutsideGuestRam, "DENIED"),
            (BatchError::NoMemory, "NO_MEMORY"),
            (BatchError::NotMapped, "NOT_MAPPED"),
        ] {
            assert!(
                DOC.contains(&format!("| {} | `{name}` |", e.code())),
                "{e:?} = {} {name}",
                e.code()
            );
        }
        for (k, name) in [
            (kind::POPULATE, "POPULATE"),
            (kind::UNMAP, "UNMAP"),
            (kind::PROTECT, "PROTECT"),
            (kind::REMAP_ALIAS, "REMAP_ALIAS"),
            (kind::MERGE, "MERGE"),
        ] {
            assert!(
                DOC.contains(&format!("| {k} | `{name}` |")),
                "kind {k} {name}"
            );
        }
    }

    #[test]
    fn counter_order_matches_the_stats_call() {
        let mut names: Vec<&str> = Vec::new();
        MmCounters::new().for_each(|n, _| names.push(n));
        super::ExitCounters::new().for_each(|n, _| names.push(n));
        let documented = DOC
            .split("<!-- counters -->")
            .nth(1)
            .and_then(|s| s.split("<!-- /counters -->").next())
            .expect("counter list in the doc")
            .trim()
            .trim_matches('`');
        assert_eq!(documented.split_whitespace().collect::<Vec<_>>(), names);
        // The test guest's copy of the order, too.
        let guest = include_str!("../../guest/src/hyp.rs");
        let list = guest
            .split("pub const COUNTERS: &[&str] = &[")
            .nth(1)
            .and_then(|s| s.split("];").next())
            .expect("COUNTERS in guest/src/hyp.rs");
        let guest_names: Vec<&str> = list
            .split(',')
            .map(|n| n.trim().trim_matches('"'))
            .filter(|n| !n.is_empty())
            .collect();
        assert_eq!(
            guest_names, names,
            "guest/src/hyp.rs COUNTERS is out of date"
        );
    }
}
