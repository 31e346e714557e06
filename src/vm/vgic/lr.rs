//! The list-register scheduler: which of a vCPU's interrupts go into its
//! N list registers before it runs, the `ICH_LR<n>_EL2` values, the
//! maintenance interrupt that brings the vCPU back when more wait than fit,
//! and folding the list registers' states back after it ran.
//!
//! Every interrupt is folded back at each exit and chosen again at each
//! entry (as KVM does): between an exit and the next entry the emulated
//! state in memory is the whole truth, so the distributor and redistributor
//! emulation never has to look into list registers.

use alloc::vec::Vec;

use super::cpuif::{hcr, lr};
use super::irq::Irq;

/// An interrupt that wants a list register: active ones (which must stay
/// where the guest can deactivate them), and pending ones that are enabled
/// and whose group the distributor forwards.
#[allow(
    clippy::struct_excessive_bools,
    reason = "the independent fields of one list register"
)]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Candidate {
    /// The INTID (virtual, and physical for `hw`).
    pub intid: u32,
    /// Priority (lower is more urgent).
    pub priority: u8,
    /// Group 1.
    pub group1: bool,
    /// Pending.
    pub pending: bool,
    /// Active.
    pub active: bool,
    /// Backed by the physical interrupt of the same INTID.
    pub hw: bool,
    /// Level-sensitive: the line is sampled again when the guest
    /// deactivates it, so a software interrupt asks for an EOI maintenance
    /// interrupt.
    pub level: bool,
}

impl Candidate {
    /// The candidate for `irq`, if it needs a list register.
    #[must_use]
    pub fn of(intid: u32, irq: &Irq, group_enabled: bool) -> Option<Self> {
        let pending = irq.pending() && irq.enabled && group_enabled;
        (irq.owned && (pending || irq.active)).then_some(Self {
            intid,
            priority: irq.priority,
            group1: irq.group1,
            pending,
            active: irq.active,
            hw: irq.hw,
            level: !irq.edge,
        })
    }

    /// The `ICH_LR<n>_EL2` value.
    ///
    /// A hardware-backed interrupt is never written pending and active: its
    /// physical counterpart is active until the guest deactivates the
    /// virtual one, so it cannot have become pending again; the state in
    /// memory keeps the pending part for after the deactivation.
    #[must_use]
    pub fn lr_value(&self) -> u64 {
        let mut value = u64::from(self.intid)
            | u64::from(self.priority) << lr::PRIORITY_SHIFT
            | if self.group1 { lr::GROUP1 } else { 0 };
        if self.hw {
            value |= lr::HW | u64::from(self.intid & 0x3ff) << lr::PINTID_SHIFT;
            value |= if self.active { lr::ACTIVE } else { lr::PENDING };
        } else {
            if self.level {
                value |= lr::EOI;
            }
            value |= if self.pending { lr::PENDING } else { 0 };
            value |= if self.active { lr::ACTIVE } else { 0 };
        }
        value
    }

    /// Whether the list register says pending (what the guest can take).
    #[must_use]
    fn loads_pending(&self) -> bool {
        self.lr_value() & lr::PENDING != 0
    }
}

/// An interrupt put into a list register.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Loaded {
    /// The INTID.
    pub intid: u32,
    /// It went in pending: if it comes back not pending, the guest took it.
    pub pending: bool,
}

/// What to write before entering the guest.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Plan {
    /// `ICH_LR<n>_EL2` for every implemented list register (zero: empty).
    pub lrs: Vec<u64>,
    /// What each list register holds.
    pub loaded: Vec<Option<Loaded>>,
    /// Maintenance enables for `ICH_HCR_EL2` (`NPIE`, `UIE`).
    pub maintenance: u64,
    /// Candidates that did not fit.
    pub left_out: usize,
}

/// Chooses list register contents for `candidates` on an interface with
/// `nr_lrs` list registers.
///
/// Active interrupts go first (the guest must find them to deactivate
/// them), then pending ones by priority, then by INTID. When some do not
/// fit, a maintenance interrupt brings the vCPU back once a list register
/// can be reused:
/// - `NPIE` while some loaded interrupt is pending: once the guest has
///   taken them all, the ones it finished free their registers;
/// - otherwise (all loaded are active) `UIE`: once at most one is still
///   valid, i.e. the guest deactivated the others. `NPIE` would fire at
///   once here, and again after every refill, as nothing loaded is pending;
/// - with a single list register `UIE` would fire at once too, so a
///   software interrupt asks for an EOI maintenance interrupt instead (a
///   hardware-backed one cannot; the waiting interrupt then goes in at the
///   next exit of any kind).
#[must_use]
pub fn plan(mut candidates: Vec<Candidate>, nr_lrs: usize) -> Plan {
    // Active hardware-backed interrupts first of all: only from a list
    // register does the guest's deactivation reach the physical interrupt
    // (the timer's); then the other active ones, then pending ones by
    // priority.
    candidates.sort_by_key(|c| (!(c.active && c.hw), !c.active, c.priority, c.intid));
    let left_out = candidates.len().saturating_sub(nr_lrs);
    candidates.truncate(nr_lrs);
    let mut lrs: Vec<u64> = candidates.iter().map(Candidate::lr_value).collect();
    let mut loaded: Vec<Option<Loaded>> = candidates
        .iter()
        .map(|c| {
            Some(Loaded {
                intid: c.intid,
                pending: c.loads_pending(),
            })
        })
        .collect();
    let mut maintenance = 0;
    if left_out > 0 {
        if loaded.iter().flatten().any(|l| l.pending) {
            maintenance = hcr::NPIE;
        } else if nr_lrs >= 2 {
            maintenance = hcr::UIE;
        } else if let Some(only) = lrs.first_mut().filter(|v| **v & lr::HW == 0) {
            *only |= lr::EOI;
        }
    }
    lrs.resize(nr_lrs, 0);
    loaded.resize(nr_lrs, None);
    Plan {
        lrs,
        loaded,
        maintenance,
        left_out,
    }
}

/// Folds the list register `value` that held `loaded` back into `irq`:
/// its active state is the list register's; a pending state the guest took
/// is consumed, unless the interrupt was asserted again meanwhile.
pub fn fold(irq: &mut Irq, loaded: Loaded, value: u64) {
    irq.active = value & lr::ACTIVE != 0;
    if loaded.pending && value & lr::PENDING == 0 {
        irq.pending_latch = irq.asserted_in_lr;
    }
    irq.in_lr = false;
    irq.asserted_in_lr = false;
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn pending(intid: u32, priority: u8) -> Candidate {
        Candidate {
            intid,
            priority,
            group1: true,
            pending: true,
            active: false,
            hw: false,
            level: false,
        }
    }

    #[test]
    fn an_active_hardware_interrupt_keeps_its_list_register() {
        // Four software interrupts the guest made active (ISACTIVER) and the
        // timer, active and hardware-backed, at a lower priority; four LRs.
        let mut c: Vec<Candidate> = (1..=4)
            .map(|i| Candidate {
                active: true,
                pending: false,
                ..pending(i, 0x10)
            })
            .collect();
        c.push(Candidate {
            active: true,
            pending: false,
            hw: true,
            level: true,
            ..pending(27, 0xa0)
        });
        let p = plan(c, 4);
        assert!(
            p.loaded.iter().flatten().any(|l| l.intid == 27),
            "the timer must stay where the guest's EOI deactivates it physically"
        );
        assert_eq!(p.left_out, 1);
    }

    #[test]
    fn lr_values_encode_intid_priority_group_state_and_hw() {
        let sgi = pending(5, 0xa0);
        assert_eq!(sgi.lr_value(), 5 | 0xa0 << 48 | lr::GROUP1 | lr::PENDING);
        let timer = Candidate {
            hw: true,
            level: true,
            ..pending(27, 0x80)
        };
        assert_eq!(
            timer.lr_value(),
            0x1b | 0x1b << 32 | 0x80 << 48 | lr::GROUP1 | lr::HW | lr::PENDING,
            "pINTID = vINTID, no EOI bit (bit 41 is pINTID's with HW)"
        );
        let timer_both = Candidate {
            active: true,
            ..timer
        };
        assert_eq!(
            timer_both.lr_value() >> 62,
            0b10,
            "hw: never pending+active"
        );
        let uart = Candidate {
            level: true,
            group1: false,
            active: true,
            ..pending(33, 0)
        };
        assert_eq!(uart.lr_value(), 0x21 | lr::EOI | lr::PENDING | lr::ACTIVE);
    }

    #[test]
    fn highest_priority_first_actives_before_all_and_nothing_more_than_fits() {
        let cands = vec![
            pending(1, 0x80),
            pending(2, 0x10),
            Candidate {
                active: true,
                pending: false,
                ..pending(3, 0xf0)
            },
            pending(4, 0x10),
            pending(5, 0x40),
            pending(6, 0x20),
        ];
        let p = plan(cands, 4);
        let intids: Vec<u32> = p.loaded.iter().flatten().map(|l| l.intid).collect();
        assert_eq!(intids, [3, 2, 4, 6], "active, then 0x10 (by INTID), 0x20");
        assert_eq!(p.left_out, 2);
        assert_eq!(p.maintenance, hcr::NPIE, "pending ones loaded: NPIE");
        assert_eq!(p.lrs.len(), 4);
    }

    #[test]
    fn all_loaded_active_with_more_waiting_uses_underflow() {
        let active = |i| Candidate {
            active: true,
            pending: false,
            ..pending(i, 0x80)
        };
        let cands = vec![active(1), active(2), pending(3, 0)];
        let p = plan(cands, 2);
        assert_eq!(p.maintenance, hcr::UIE);
        assert_eq!(p.left_out, 1);
    }

    #[test]
    fn no_maintenance_when_everything_fits_and_free_registers_are_zero() {
        let p = plan(vec![pending(9, 0)], 4);
        assert_eq!(p.maintenance, 0);
        assert_eq!(&p.lrs[1..], &[0, 0, 0]);
        assert_eq!(p.loaded[1..], [None, None, None]);
        let empty = plan(Vec::new(), 4);
        assert_eq!((empty.maintenance, empty.lrs), (0, vec![0; 4]));
    }

    #[test]
    fn a_single_list_register_asks_for_an_eoi_maintenance_instead_of_underflow() {
        let active = Candidate {
            active: true,
            pending: false,
            ..pending(1, 0)
        };
        let p = plan(vec![active, pending(2, 0)], 1);
        assert_eq!(p.maintenance, 0, "UIE would fire at once with one LR");
        assert_ne!(p.lrs[0] & lr::EOI, 0);
    }

    #[test]
    fn fold_consumes_taken_pending_but_keeps_a_new_assertion() {
        let mut irq = Irq::owned(true, false);
        irq.assert();
        irq.in_lr = true;
        let loaded = Loaded {
            intid: 1,
            pending: true,
        };
        // Taken: the LR went pending -> active.
        fold(&mut irq, loaded, lr::ACTIVE);
        assert!(irq.active && !irq.pending());
        // Taken and asserted again while in the LR: stays pending.
        let mut irq = Irq::owned(true, false);
        irq.assert();
        irq.in_lr = true;
        irq.assert();
        fold(&mut irq, loaded, 0);
        assert!(!irq.active && irq.pending());
        assert!(!irq.in_lr && !irq.asserted_in_lr);
        // Not taken: still pending.
        let mut irq = Irq::owned(true, false);
        irq.assert();
        fold(&mut irq, loaded, lr::PENDING);
        assert!(irq.pending());
    }
}
