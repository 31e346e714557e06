//! The mm core: stage-2 tables, the page pool, TLB maintenance and counters.
//!
//! Everything here builds and is unit-tested on the host. The only way out to
//! the hardware is the [`arch::MmArch`] trait (barriers and TLBIs); the
//! translation tables themselves are built with aarch64-paging.

pub mod arch;
pub mod counters;
pub mod lazy;
#[cfg(any(test, feature = "model"))]
pub mod model;
pub mod pool;
#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod smp_scenarios;
pub mod stage2;
#[cfg(any(test, feature = "model"))]
pub mod testkit;

/// Defines one of the two address newtypes and its helpers. The two types get
/// the same helpers but no conversion between them.
macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident($raw:ty)) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $raw);

        impl $name {
            /// The address `raw`.
            #[must_use]
            pub const fn new(raw: $raw) -> Self {
                Self(raw)
            }

            /// The raw address.
            #[must_use]
            pub const fn get(self) -> $raw {
                self.0
            }

            /// The address `bytes` further on, or `None` on overflow.
            #[must_use]
            pub const fn checked_add(self, bytes: $raw) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(raw) => Some(Self(raw)),
                    None => None,
                }
            }

            /// The address `bytes` further on. Overflow is a bug (it panics
            /// in debug builds).
            #[must_use]
            pub const fn add(self, bytes: $raw) -> Self {
                Self(self.0 + bytes)
            }

            /// The number of bytes from `base` up to `self`; `base` must not
            /// be above `self` (it panics in debug builds).
            #[must_use]
            pub const fn offset_from(self, base: Self) -> $raw {
                self.0 - base.0
            }

            /// Rounds down to a multiple of `align` (a power of two).
            #[must_use]
            pub const fn align_down(self, align: $raw) -> Self {
                Self(self.0 & !(align - 1))
            }

            /// Rounds up to a multiple of `align` (a power of two).
            #[must_use]
            pub const fn align_up(self, align: $raw) -> Self {
                Self((self.0 + align - 1) & !(align - 1))
            }

            /// Whether the address is a multiple of `align` (a power of two).
            #[must_use]
            pub const fn is_aligned(self, align: $raw) -> bool {
                self.0 & (align - 1) == 0
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Display::fmt(&self.0, f)
            }
        }

        impl core::fmt::LowerHex for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type! {
    /// A physical address (or, on the host, the address of memory standing
    /// in for one).
    ///
    /// Not interchangeable with an [`Ipa`]: there is no conversion between
    /// the two. An IPA becomes a physical address only through a translation
    /// (the stage-2 tables, [`stage2::Stage2::query`]) or a VM's RAM mapping
    /// (`vm::guest_mm::GuestRam::backing_of`). Mixing them does not compile:
    ///
    /// ```compile_fail,E0308
    /// use lazyhyp::mm::{Ipa, PhysAddr};
    /// fn takes_ipa(_: Ipa) {}
    /// takes_ipa(PhysAddr::new(0x8000_0000));
    /// ```
    ///
    /// ```compile_fail,E0277
    /// use lazyhyp::mm::{Ipa, PhysAddr};
    /// let _: PhysAddr = Ipa::new(0x4000_0000).into();
    /// ```
    ///
    /// whereas the same call with an IPA does:
    ///
    /// ```
    /// use lazyhyp::mm::{Ipa, PhysAddr};
    /// fn takes_ipa(_: Ipa) {}
    /// takes_ipa(Ipa::new(0x4000_0000));
    /// let pa = PhysAddr::new(0x8000_0000).add(0x1000);
    /// assert_eq!(pa.offset_from(PhysAddr::new(0x8000_0000)), 0x1000);
    /// ```
    PhysAddr(usize)
}

address_type! {
    /// An intermediate physical address: what a guest at EL1 believes is
    /// physical. See [`PhysAddr`] for why the two do not mix.
    Ipa(u64)
}

/// The translation granule: 4 KiB.
pub const PAGE_SIZE: usize = 4096;

/// Size of a level-2 block with a 4 KiB granule.
pub const BLOCK_2M: usize = 2 << 20;

/// Size of a level-1 block with a 4 KiB granule.
pub const BLOCK_1G: usize = 1 << 30;

/// Rounds `x` up to a multiple of `align` (a power of two).
#[must_use]
pub const fn align_up(x: usize, align: usize) -> usize {
    (x + align - 1) & !(align - 1)
}

/// Rounds `x` down to a multiple of `align` (a power of two).
#[must_use]
pub const fn align_down(x: usize, align: usize) -> usize {
    x & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::{Ipa, PAGE_SIZE, PhysAddr};

    #[test]
    fn address_helpers() {
        let pa = PhysAddr::new(0x8000_1234);
        assert_eq!(pa.get(), 0x8000_1234);
        assert_eq!(pa.0, pa.get());
        assert_eq!(pa.align_down(PAGE_SIZE), PhysAddr(0x8000_1000));
        assert_eq!(pa.align_up(PAGE_SIZE), PhysAddr(0x8000_2000));
        assert!(!pa.is_aligned(PAGE_SIZE));
        assert!(PhysAddr(0x8000_2000).is_aligned(PAGE_SIZE));
        assert_eq!(pa.add(0x10), PhysAddr(0x8000_1244));
        assert_eq!(pa.checked_add(1), Some(PhysAddr(0x8000_1235)));
        assert_eq!(PhysAddr(usize::MAX).checked_add(1), None);
        assert_eq!(pa.offset_from(PhysAddr(0x8000_0000)), 0x1234);
        assert_eq!(PhysAddr::default(), PhysAddr(0));

        let ipa = Ipa::new(0x4000_0fff);
        assert_eq!(ipa.align_down(0x1000), Ipa(0x4000_0000));
        assert_eq!(ipa.align_up(0x1000), Ipa(0x4000_1000));
        assert_eq!(Ipa(0x4000_0000).align_up(0x1000), Ipa(0x4000_0000));
        assert!(Ipa(0).is_aligned(1 << 30));
        assert_eq!(Ipa(u64::MAX).checked_add(1), None);
        assert_eq!(ipa.add(1).offset_from(Ipa(0x4000_0000)), 0x1000);
        assert!(Ipa(1) < Ipa(2));

        assert_eq!(
            format!("{pa:#x} {ipa:x} {}", Ipa(10)),
            "0x80001234 40000fff 10"
        );
    }
}
