//! PSCI for a VM's vCPUs: the power state of each vCPU and the rules of
//! `CPU_ON`, `CPU_OFF`, `AFFINITY_INFO` (PSCI 1.1, Arm DEN 0022).
//!
//! Portable and host-tested: the hypervisor keeps one [`PowerTable`] per VM
//! under a lock, calls these methods from the trap handler of the calling
//! vCPU, and starts a vCPU on its physical CPU once [`PowerTable::take_start`]
//! hands it over. A VM can only name its own vCPUs (by their virtual MPIDR),
//! so it can only start its own vCPUs, on its own physical CPUs.

use alloc::vec::Vec;
use core::ops::Range;

/// PSCI return codes (signed, in `x0`).
pub mod code {
    /// `SUCCESS`.
    pub const SUCCESS: i64 = 0;
    /// `NOT_SUPPORTED`.
    pub const NOT_SUPPORTED: i64 = -1;
    /// `INVALID_PARAMETERS`.
    pub const INVALID_PARAMETERS: i64 = -2;
    /// `ALREADY_ON`.
    pub const ALREADY_ON: i64 = -4;
    /// `ON_PENDING`.
    pub const ON_PENDING: i64 = -5;
    /// `INVALID_ADDRESS`.
    pub const INVALID_ADDRESS: i64 = -9;
}

/// `AFFINITY_INFO` results.
pub mod affinity {
    /// At least one matching vCPU is on.
    pub const ON: i64 = 0;
    /// All matching vCPUs are off.
    pub const OFF: i64 = 1;
    /// A matching vCPU is being turned on.
    pub const ON_PENDING: i64 = 2;
}

/// Where a vCPU starts: `entry` (the PC, at EL1h with the MMU off and
/// interrupts masked) and `x0..x2`.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Start {
    /// The entry point (an IPA).
    pub entry: u64,
    /// `x0`, `x1`, `x2` at entry (`CPU_ON`: the context id, 0, 0).
    pub args: [u64; 3],
}

/// A vCPU's power state.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Power {
    /// Off: its physical CPU waits.
    Off,
    /// Turned on, not yet running: its physical CPU takes the start.
    OnPending(Start),
    /// Running (or in a trap handler).
    On,
}

/// The power states of one VM's vCPUs, indexed by vCPU.
#[derive(Debug)]
pub struct PowerTable {
    /// Each vCPU's MPIDR affinity as the guest sees it (`VMPIDR_EL2`).
    mpidr: Vec<u64>,
    state: Vec<Power>,
}

/// Affinity bits of an MPIDR value (Aff3 [39:32], Aff2..Aff0 [23:0]).
const AFFINITY: u64 = 0xff_00ff_ffff;

/// The MPIDR bits compared at `AFFINITY_INFO` level `level` (0..=3): the
/// affinity fields from `level` up.
fn level_mask(level: u64) -> Option<u64> {
    Some(match level {
        0 => AFFINITY,
        1 => 0xff_00ff_ff00,
        2 => 0xff_00ff_0000,
        3 => 0xff_0000_0000,
        _ => return None,
    })
}

impl PowerTable {
    /// A table of vCPUs with these MPIDRs (only their affinity fields
    /// count), all off.
    #[must_use]
    pub fn new(mut mpidr: Vec<u64>) -> Self {
        for m in &mut mpidr {
            *m &= AFFINITY;
        }
        let state = alloc::vec![Power::Off; mpidr.len()];
        Self { mpidr, state }
    }

    /// How many vCPUs.
    #[must_use]
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// vCPU `vcpu`'s state.
    #[must_use]
    pub fn state(&self, vcpu: usize) -> Power {
        self.state[vcpu]
    }

    /// The vCPU with MPIDR affinity `mpidr`.
    #[must_use]
    pub fn vcpu_of(&self, mpidr: u64) -> Option<usize> {
        self.mpidr.iter().position(|&m| m == mpidr & AFFINITY)
    }

    /// Every vCPU off, then `vcpu` (the boot vCPU) to start at `start`: a
    /// VM's power-on and its reset.
    pub fn power_on(&mut self, vcpu: usize, start: Start) {
        self.state.fill(Power::Off);
        self.state[vcpu] = Power::OnPending(start);
    }

    /// Every vCPU off: the VM stops (or resets).
    pub fn power_off_all(&mut self) {
        self.state.fill(Power::Off);
    }

    /// `CPU_ON(target, entry, context)`. `ram`: the IPA range the entry
    /// must lie in. `Ok(vcpu)`: `vcpu` is now pending on, its physical CPU
    /// to be kicked; `Err`: the PSCI error code.
    ///
    /// # Errors
    /// `INVALID_PARAMETERS` for an MPIDR that names none of this VM's
    /// vCPUs (or has non-affinity bits set), `INVALID_ADDRESS` for an entry
    /// outside guest RAM or not 4-byte aligned, `ALREADY_ON` / `ON_PENDING`
    /// for a vCPU that is.
    pub fn cpu_on(
        &mut self,
        target: u64,
        entry: u64,
        context: u64,
        ram: &Range<u64>,
    ) -> Result<usize, i64> {
        if target & !AFFINITY != 0 {
            return Err(code::INVALID_PARAMETERS);
        }
        let vcpu = self.vcpu_of(target).ok_or(code::INVALID_PARAMETERS)?;
        match self.state[vcpu] {
            Power::On => return Err(code::ALREADY_ON),
            Power::OnPending(_) => return Err(code::ON_PENDING),
            Power::Off => {}
        }
        if !ram.contains(&entry) || !entry.is_multiple_of(4) {
            return Err(code::INVALID_ADDRESS);
        }
        self.state[vcpu] = Power::OnPending(Start {
            entry,
            args: [context, 0, 0],
        });
        Ok(vcpu)
    }

    /// `AFFINITY_INFO(affinity, lowest level)`.
    #[must_use]
    pub fn affinity_info(&self, target: u64, level: u64) -> i64 {
        let Some(mask) = level_mask(level) else {
            return code::INVALID_PARAMETERS;
        };
        if target & !AFFINITY != 0 {
            return code::INVALID_PARAMETERS;
        }
        let mut matched = false;
        let mut pending = false;
        for (m, s) in self.mpidr.iter().zip(&self.state) {
            if m & mask != target & mask {
                continue;
            }
            matched = true;
            match s {
                Power::On => return affinity::ON,
                Power::OnPending(_) => pending = true,
                Power::Off => {}
            }
        }
        match (matched, pending) {
            (false, _) => code::INVALID_PARAMETERS,
            (true, true) => affinity::ON_PENDING,
            (true, false) => affinity::OFF,
        }
    }

    /// `CPU_OFF` of `vcpu`. Returns whether every vCPU is now off (the VM
    /// has nothing left running).
    pub fn cpu_off(&mut self, vcpu: usize) -> bool {
        self.state[vcpu] = Power::Off;
        self.state.iter().all(|s| *s == Power::Off)
    }

    /// Hands `vcpu`'s pending start to its physical CPU (the vCPU is on from
    /// here), or `None` if it is not pending.
    pub fn take_start(&mut self, vcpu: usize) -> Option<Start> {
        match self.state[vcpu] {
            Power::OnPending(start) => {
                self.state[vcpu] = Power::On;
                Some(start)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: Range<u64> = 0x4000_0000..0x5000_0000;

    fn table() -> PowerTable {
        // Bit 31 (RES1 in MPIDR_EL1) is not part of the affinity.
        let mut t = PowerTable::new(alloc::vec![1 << 31, 0x1, 0x2, 0x100]);
        t.power_on(
            0,
            Start {
                entry: 0x4008_0000,
                args: [0; 3],
            },
        );
        assert!(t.take_start(0).is_some());
        t
    }

    #[test]
    fn cpu_on_starts_an_off_vcpu_once() {
        let mut t = table();
        assert_eq!(t.cpu_on(0x1, 0x4000_1000, 7, &RAM), Ok(1));
        assert_eq!(t.cpu_on(0x1, 0x4000_1000, 7, &RAM), Err(code::ON_PENDING));
        assert_eq!(
            t.take_start(1),
            Some(Start {
                entry: 0x4000_1000,
                args: [7, 0, 0]
            })
        );
        assert_eq!(t.take_start(1), None);
        assert_eq!(t.cpu_on(0x1, 0x4000_1000, 7, &RAM), Err(code::ALREADY_ON));
        assert_eq!(t.cpu_on(0x0, 0x4000_1000, 7, &RAM), Err(code::ALREADY_ON));
    }

    #[test]
    fn cpu_on_refuses_foreign_mpidrs_and_bad_entries() {
        let mut t = table();
        // Not one of this VM's vCPUs.
        assert_eq!(
            t.cpu_on(0x3, 0x4000_1000, 0, &RAM),
            Err(code::INVALID_PARAMETERS)
        );
        // Non-affinity bits (MT, U) set.
        assert_eq!(
            t.cpu_on(1 << 30 | 0x1, 0x4000_1000, 0, &RAM),
            Err(code::INVALID_PARAMETERS)
        );
        assert_eq!(t.cpu_on(0x1, 0x1000, 0, &RAM), Err(code::INVALID_ADDRESS));
        assert_eq!(t.cpu_on(0x1, RAM.end, 0, &RAM), Err(code::INVALID_ADDRESS));
        assert_eq!(
            t.cpu_on(0x1, 0x4000_1002, 0, &RAM),
            Err(code::INVALID_ADDRESS)
        );
        // Nothing changed.
        assert_eq!(t.state(1), Power::Off);
    }

    #[test]
    fn affinity_info_by_level() {
        let mut t = table();
        assert_eq!(t.affinity_info(0x0, 0), affinity::ON);
        assert_eq!(t.affinity_info(0x1, 0), affinity::OFF);
        assert_eq!(t.affinity_info(0x3, 0), code::INVALID_PARAMETERS);
        t.cpu_on(0x100, 0x4000_0000, 0, &RAM).expect("off vCPU");
        assert_eq!(t.affinity_info(0x100, 0), affinity::ON_PENDING);
        // Level 1: cluster 0 has vCPU 0 on; cluster 1 only a pending one.
        assert_eq!(t.affinity_info(0x5, 1), affinity::ON);
        assert_eq!(t.affinity_info(0x1ff, 1), affinity::ON_PENDING);
        assert_eq!(t.affinity_info(0x0, 4), code::INVALID_PARAMETERS);
    }

    #[test]
    fn cpu_off_reports_the_last_one() {
        let mut t = table();
        t.cpu_on(0x1, 0x4000_0000, 0, &RAM).expect("off vCPU");
        t.take_start(1);
        assert!(!t.cpu_off(0));
        assert_eq!(t.affinity_info(0x0, 0), affinity::OFF);
        assert!(t.cpu_off(1));
    }
}
