//! The GICv3 virtual CPU interface registers (`ICH_*_EL2`) behind the
//! portable [`CpuInterface`] trait the virtual GIC (`crate::vm::vgic`) drives.

use crate::vm::vgic::CpuInterface;

use super::sysreg::{read_sysreg, write_sysreg};

/// This CPU's `ICH_*_EL2` registers. Zero-sized.
#[derive(Debug, Default)]
pub struct HwCpuInterface;

/// Expands to a `match` over `n` reading or writing the `n`th register of a
/// numbered family, by literal name (the assembler needs the name).
macro_rules! numbered {
    (read $n:expr, [$($i:literal => $name:literal),*]) => {
        match $n {
            $($i => read_sysreg!($name),)*
            _ => 0,
        }
    };
    (write $n:expr, $v:expr, [$($i:literal => $name:literal),*]) => {
        match $n {
            $($i => write_sysreg!($name, $v),)*
            _ => {}
        }
    };
}

macro_rules! lrs {
    ($mode:ident $n:expr $(, $v:expr)?) => {
        numbered!($mode $n $(, $v)?, [
            0 => "ich_lr0_el2", 1 => "ich_lr1_el2", 2 => "ich_lr2_el2", 3 => "ich_lr3_el2",
            4 => "ich_lr4_el2", 5 => "ich_lr5_el2", 6 => "ich_lr6_el2", 7 => "ich_lr7_el2",
            8 => "ich_lr8_el2", 9 => "ich_lr9_el2", 10 => "ich_lr10_el2", 11 => "ich_lr11_el2",
            12 => "ich_lr12_el2", 13 => "ich_lr13_el2", 14 => "ich_lr14_el2", 15 => "ich_lr15_el2"
        ])
    };
}

macro_rules! ap0rs {
    ($mode:ident $n:expr $(, $v:expr)?) => {
        numbered!($mode $n $(, $v)?, [
            0 => "ich_ap0r0_el2", 1 => "ich_ap0r1_el2", 2 => "ich_ap0r2_el2", 3 => "ich_ap0r3_el2"
        ])
    };
}

macro_rules! ap1rs {
    ($mode:ident $n:expr $(, $v:expr)?) => {
        numbered!($mode $n $(, $v)?, [
            0 => "ich_ap1r0_el2", 1 => "ich_ap1r1_el2", 2 => "ich_ap1r2_el2", 3 => "ich_ap1r3_el2"
        ])
    };
}

impl CpuInterface for HwCpuInterface {
    fn vtr(&self) -> u64 {
        read_sysreg!("ich_vtr_el2")
    }

    fn hcr(&self) -> u64 {
        read_sysreg!("ich_hcr_el2")
    }

    fn set_hcr(&mut self, value: u64) {
        write_sysreg!("ich_hcr_el2", value);
    }

    fn vmcr(&self) -> u64 {
        read_sysreg!("ich_vmcr_el2")
    }

    fn set_vmcr(&mut self, value: u64) {
        write_sysreg!("ich_vmcr_el2", value);
    }

    fn lr(&self, n: usize) -> u64 {
        lrs!(read n)
    }

    fn set_lr(&mut self, n: usize, value: u64) {
        lrs!(write n, value);
    }

    fn ap0r(&self, n: usize) -> u32 {
        ap0rs!(read n) as u32
    }

    fn set_ap0r(&mut self, n: usize, value: u32) {
        ap0rs!(write n, u64::from(value));
    }

    fn ap1r(&self, n: usize) -> u32 {
        ap1rs!(read n) as u32
    }

    fn set_ap1r(&mut self, n: usize, value: u32) {
        ap1rs!(write n, u64::from(value));
    }

    fn misr(&self) -> u64 {
        read_sysreg!("ich_misr_el2")
    }
}
