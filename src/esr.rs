//! Decoding of exception syndromes (`ESR_EL2`) for trap handling and for the
//! crash report.

use core::fmt;

/// Exception classes (`ESR_ELx.EC`) this hypervisor names.
pub mod ec {
    /// Unknown reason.
    pub const UNKNOWN: u8 = 0x00;
    /// WFI or WFE trapped.
    pub const WFX: u8 = 0x01;
    /// SVE, SIMD or FP access trapped.
    pub const FP_SIMD: u8 = 0x07;
    /// Illegal execution state.
    pub const ILLEGAL_STATE: u8 = 0x0e;
    /// HVC from AArch64.
    pub const HVC64: u8 = 0x16;
    /// SMC from AArch64 (trapped by `HCR_EL2.TSC`).
    pub const SMC64: u8 = 0x17;
    /// MSR, MRS or system instruction trapped.
    pub const SYSREG: u8 = 0x18;
    /// Instruction abort from a lower EL.
    pub const IABT_LOWER: u8 = 0x20;
    /// Instruction abort from the current EL.
    pub const IABT_CURRENT: u8 = 0x21;
    /// PC alignment fault.
    pub const PC_ALIGN: u8 = 0x22;
    /// Data abort from a lower EL.
    pub const DABT_LOWER: u8 = 0x24;
    /// Data abort from the current EL.
    pub const DABT_CURRENT: u8 = 0x25;
    /// SP alignment fault.
    pub const SP_ALIGN: u8 = 0x26;
    /// SError interrupt.
    pub const SERROR: u8 = 0x2f;
    /// BRK instruction from AArch64.
    pub const BRK64: u8 = 0x3c;
}

/// What to do with an SError taken to EL2 while a guest ran.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum SErrorAction {
    /// Hand the guest a virtual SError: the error is its to handle.
    Inject,
    /// Nothing to do: the error was corrected, or is restartable and was
    /// taken precisely enough for the guest to go on (KVM ignores these).
    Ignore,
    /// The machine's state, the hypervisor's included, cannot be trusted:
    /// end the run.
    Fatal,
}

/// The policy for an SError with syndrome `esr` on a CPU with FEAT_RAS
/// (`has_ras`), as KVM's `kvm_handle_guest_serror` /
/// `arm64_ras_serror_get_severity`: without RAS, or with an IMPLEMENTATION
/// DEFINED syndrome (`IDS`), the guest gets it; with RAS an architected
/// syndrome that is not "asynchronous SError" (`DFSC` != 0x11, so no error
/// type) is fatal; by error type (`AET`): Uncontainable is fatal,
/// Unrecoverable and Recoverable go to the guest, Restartable and
/// Corrected are ignored.
#[must_use]
pub const fn serror_action(esr: u64, has_ras: bool) -> SErrorAction {
    const IDS: u64 = 1 << 24;
    if !has_ras || esr & IDS != 0 {
        return SErrorAction::Inject;
    }
    if esr & 0x3f != 0x11 {
        return SErrorAction::Fatal;
    }
    match (esr >> 10) & 0b111 {
        // UC.
        0b000 => SErrorAction::Fatal,
        // UEU, UER.
        0b001 | 0b011 => SErrorAction::Inject,
        // UEO, CE (and reserved values, treated as the least severe).
        _ => SErrorAction::Ignore,
    }
}

/// A raw `ESR_EL2` value with accessors for its fields.
#[derive(Clone, Copy, Eq, PartialEq)]
pub struct Esr(pub u64);

impl Esr {
    /// Exception class, bits \[31:26\].
    #[must_use]
    pub const fn ec(self) -> u8 {
        ((self.0 >> 26) & 0x3f) as u8
    }

    /// Instruction length bit: 1 for a 32-bit instruction.
    #[must_use]
    pub const fn il(self) -> bool {
        self.0 & (1 << 25) != 0
    }

    /// Instruction-specific syndrome, bits \[24:0\].
    #[must_use]
    pub const fn iss(self) -> u32 {
        (self.0 & 0x1ff_ffff) as u32
    }

    /// Fault status code of an abort (`DFSC`/`IFSC`, bits \[5:0\]).
    #[must_use]
    pub const fn fault_status(self) -> u8 {
        (self.0 & 0x3f) as u8
    }

    /// For a data abort: whether the access was a write (`WnR`).
    #[must_use]
    pub const fn is_write(self) -> bool {
        self.0 & (1 << 6) != 0
    }

    /// For an abort: whether `FAR` is not valid (`FnV`, bit 10).
    #[must_use]
    pub const fn far_not_valid(self) -> bool {
        self.0 & (1 << 10) != 0
    }

    /// For an abort: whether the fault happened on a stage-2 walk for a
    /// stage-1 table access (`S1PTW`, bit 7).
    #[must_use]
    pub const fn s1ptw(self) -> bool {
        self.0 & (1 << 7) != 0
    }

    /// Data aborts: `WnR`, the access was a write.
    #[must_use]
    pub const fn wnr(self) -> bool {
        self.0 & (1 << 6) != 0
    }

    /// Name of the exception class.
    #[must_use]
    pub const fn ec_name(self) -> &'static str {
        match self.ec() {
            ec::UNKNOWN => "Unknown reason",
            ec::WFX => "WFI/WFE trapped",
            ec::FP_SIMD => "SIMD/FP access trapped",
            ec::ILLEGAL_STATE => "Illegal execution state",
            ec::HVC64 => "HVC from AArch64",
            ec::SMC64 => "SMC from AArch64",
            ec::SYSREG => "MSR/MRS/system instruction trapped",
            ec::IABT_LOWER => "Instruction abort from lower EL",
            ec::IABT_CURRENT => "Instruction abort from current EL",
            ec::PC_ALIGN => "PC alignment fault",
            ec::DABT_LOWER => "Data abort from lower EL",
            ec::DABT_CURRENT => "Data abort from current EL",
            ec::SP_ALIGN => "SP alignment fault",
            ec::SERROR => "SError",
            ec::BRK64 => "BRK from AArch64",
            _ => "Other exception class",
        }
    }

    /// Whether this is an instruction or data abort (at any EL).
    #[must_use]
    pub const fn is_abort(self) -> bool {
        matches!(
            self.ec(),
            ec::IABT_LOWER | ec::IABT_CURRENT | ec::DABT_LOWER | ec::DABT_CURRENT
        )
    }
}

/// Name of an abort's fault status code.
#[must_use]
pub const fn fault_status_name(fsc: u8) -> &'static str {
    match fsc {
        0x00..=0x03 => "address size fault",
        0x04..=0x07 => "translation fault",
        0x08..=0x0b => "access flag fault",
        0x0c..=0x0f => "permission fault",
        0x10 => "synchronous external abort",
        0x11 => "synchronous tag check fault",
        0x14..=0x17 => "synchronous external abort on table walk",
        0x21 => "alignment fault",
        0x30 => "TLB conflict abort",
        _ => "other fault",
    }
}

impl fmt::Debug for Esr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ESR {:#x}: EC {:#04x} ({}), IL {}, ISS {:#09x}",
            self.0,
            self.ec(),
            self.ec_name(),
            u8::from(self.il()),
            self.iss()
        )?;
        if self.is_abort() {
            let fsc = self.fault_status();
            write!(
                f,
                ", FSC {fsc:#04x} ({} level {}){}{}",
                fault_status_name(fsc),
                fsc & 3,
                if self.ec() == ec::DABT_LOWER || self.ec() == ec::DABT_CURRENT {
                    if self.is_write() { ", write" } else { ", read" }
                } else {
                    ""
                },
                if self.s1ptw() {
                    ", on stage-1 table walk"
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }
}

/// The faulting IPA of a stage-2 abort: `HPFAR_EL2.FIPA` gives the page,
/// `FAR_EL2` the offset within it.
#[must_use]
pub const fn fault_ipa(hpfar: u64, far: u64) -> u64 {
    ((hpfar & 0x0fff_ffff_fff0) << 8) | (far & 0xfff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serror_policy_follows_kvm() {
        let serror = (u64::from(ec::SERROR) << 26) | (1 << 25);
        let aet = |a: u64| serror | (a << 10) | 0x11;
        assert_eq!(serror_action(aet(0b000), true), SErrorAction::Fatal, "UC");
        assert_eq!(serror_action(aet(0b001), true), SErrorAction::Inject, "UEU");
        assert_eq!(serror_action(aet(0b011), true), SErrorAction::Inject, "UER");
        assert_eq!(serror_action(aet(0b010), true), SErrorAction::Ignore, "UEO");
        assert_eq!(serror_action(aet(0b110), true), SErrorAction::Ignore, "CE");
        assert_eq!(
            serror_action(serror | (1 << 24), true),
            SErrorAction::Inject,
            "IDS: IMPLEMENTATION DEFINED, the guest's"
        );
        assert_eq!(
            serror_action(serror, true),
            SErrorAction::Fatal,
            "RAS, but uncategorized"
        );
        assert_eq!(
            serror_action(aet(0b000), false),
            SErrorAction::Inject,
            "no RAS"
        );
    }
    use alloc::format;

    #[test]
    fn decodes_a_stage2_write_translation_fault() {
        // EC 0x24, IL, WnR, DFSC 0x07 (translation fault level 3).
        let esr = Esr((0x24 << 26) | (1 << 25) | (1 << 6) | 0x07);
        assert_eq!(esr.ec(), ec::DABT_LOWER);
        assert!(esr.is_write());
        let text = format!("{esr:?}");
        assert!(text.contains("Data abort from lower EL"), "{text}");
        assert!(text.contains("translation fault level 3"), "{text}");
        assert!(text.contains("write"), "{text}");
    }

    #[test]
    fn fault_ipa_combines_hpfar_page_and_far_offset() {
        // HPFAR_EL2.FIPA holds IPA[47:12] in bits [43:4].
        let ipa = 0x4123_4567_u64;
        let hpfar = (ipa >> 12) << 4;
        assert_eq!(fault_ipa(hpfar, 0xffff_0000_0000_0567), ipa);
    }

    #[test]
    fn names_hvc() {
        assert_eq!(
            Esr(u64::from(ec::HVC64) << 26).ec_name(),
            "HVC from AArch64"
        );
    }
}
