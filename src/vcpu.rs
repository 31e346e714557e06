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
    /// PSCI_VERSION.
    pub const PSCI_VERSION: u32 = 0x8400_0000;
    /// PSCI CPU_OFF.
    pub const PSCI_CPU_OFF: u32 = 0x8400_0002;
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
}

/// The test guest's report of its results.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct GuestReport {
    /// Tests passed.
    pub passed: u64,
    /// Tests failed.
    pub failed: u64,
}

/// Per-guest state that trap handling reads and updates.
#[derive(Debug, Default)]
pub struct Vcpu {
    /// Set once the guest reported its results.
    pub report: Option<GuestReport>,
}

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
                self.smccc_call(regs)
            }
            ec::SMC64 => {
                inc(&exits.exits_smc);
                // A trapped SMC leaves ELR at the SMC itself: step over it.
                regs.elr += 4;
                self.smccc_call(regs)
            }
            // Nothing else is handled yet: count it by kind, then stop with
            // a report.
            other => {
                inc(match other {
                    ec::DABT_LOWER => &exits.exits_dabt,
                    ec::IABT_LOWER => &exits.exits_iabt,
                    ec::SYSREG => &exits.exits_sysreg,
                    _ => &exits.exits_other,
                });
                Exit::Stop(Stop::UnhandledTrap(trap))
            }
        }
    }

    /// Dispatches an SMCCC call (function ID in `w0`, arguments in `x1..`),
    /// writing results to `x0..`.
    fn smccc_call(&mut self, regs: &mut GuestRegs) -> Exit {
        let function = regs.x[0] as u32;
        let (a1, a2) = (regs.x[1], regs.x[2]);
        regs.x[0] = match function {
            smccc::VERSION => smccc::SMCCC_VERSION_1_1,
            smccc::PSCI_VERSION => smccc::PSCI_VERSION_1_1,
            smccc::PSCI_FEATURES => match a1 as u32 {
                smccc::PSCI_VERSION
                | smccc::PSCI_FEATURES
                | smccc::PSCI_CPU_OFF
                | smccc::PSCI_SYSTEM_OFF
                | smccc::PSCI_SYSTEM_RESET => smccc::SUCCESS,
                _ => smccc::NOT_SUPPORTED,
            },
            // One vCPU: turning it off turns the system off.
            smccc::PSCI_CPU_OFF | smccc::PSCI_SYSTEM_OFF => return Exit::Stop(Stop::SystemOff),
            smccc::PSCI_SYSTEM_RESET => return Exit::Stop(Stop::SystemReset),
            smccc::HYP_VERSION => smccc::HYP_ABI_VERSION,
            smccc::HYP_REPORT_RESULT => {
                self.report = Some(GuestReport {
                    passed: a1,
                    failed: a2,
                });
                smccc::SUCCESS
            }
            // Everything else, CPU_ON included (no secondary vCPUs until
            // multi-CPU support exists), is not supported.
            _ => smccc::NOT_SUPPORTED,
        };
        Exit::Resume
    }
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
        let mut vcpu = Vcpu::default();
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
        assert_eq!(feat(smccc::PSCI_CPU_ON_64), smccc::NOT_SUPPORTED);
        assert_eq!(
            hvc(smccc::PSCI_SYSTEM_OFF, 0, 0).2,
            Exit::Stop(Stop::SystemOff)
        );
        assert_eq!(
            hvc(smccc::PSCI_CPU_OFF, 0, 0).2,
            Exit::Stop(Stop::SystemOff)
        );
        assert_eq!(
            hvc(smccc::PSCI_SYSTEM_RESET, 0, 0).2,
            Exit::Stop(Stop::SystemReset)
        );
        assert_eq!(
            hvc(smccc::PSCI_CPU_ON_64, 0, 0).1.x[0],
            smccc::NOT_SUPPORTED
        );
    }

    #[test]
    fn unknown_function_is_not_supported_and_guest_resumes() {
        let (_, regs, exit) = hvc(0xc600_ffff, 0, 0);
        assert_eq!(regs.x[0], smccc::NOT_SUPPORTED);
        assert_eq!(exit, Exit::Resume);
        assert_eq!(regs.elr, 0x4008_1000, "HVC's ELR already points past it");
    }

    #[test]
    fn report_is_recorded() {
        let (vcpu, regs, _) = hvc(smccc::HYP_REPORT_RESULT, 7, 1);
        assert_eq!(
            vcpu.report,
            Some(GuestReport {
                passed: 7,
                failed: 1
            })
        );
        assert_eq!(regs.x[0], smccc::SUCCESS);
    }

    #[test]
    fn trapped_smc_steps_over_the_instruction() {
        let mut vcpu = Vcpu::default();
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
    fn stage2_abort_stops_with_a_report_naming_the_ipa() {
        let mut vcpu = Vcpu::default();
        let mut regs = GuestRegs::default();
        let esr = Esr((u64::from(ec::DABT_LOWER) << 26) | (1 << 25) | 0x06);
        let trap = Trap {
            esr,
            far: 0x5000_0123,
            hpfar: (0x5000_0000 >> 12) << 4,
        };
        let exit = vcpu.handle_sync(&mut regs, trap, &ExitCounters::new());
        assert_eq!(exit, Exit::Stop(Stop::UnhandledTrap(trap)));
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
}
