//! The hypervisor's physical memory layout, worked out at boot from the RAM
//! range in the device tree and the regions already in use (device tree,
//! hypervisor image, guest payload).
//!
//! With QEMU's `virt` board and `-m 1G` this gives (see the README for the
//! full map):
//!
//! | region | where |
//! |---|---|
//! | device tree (QEMU) | RAM base, 0x4000_0000 |
//! | hypervisor image | linked at 0x4020_0000 |
//! | heap | first 2 MiB-aligned free range after the image |
//! | page-table pool | right after the heap |
//! | guest payload (raw ELF, placed by xtask) | 0x4800_0000 |
//! | guest RAM backing | first 2 MiB-aligned free range that fits |

use core::ops::Range;

use crate::mm::{BLOCK_2M, PhysAddr};

/// Size of the hypervisor heap (the global allocator).
pub const HEAP_SIZE: usize = 8 << 20;

/// Size of the page pool for translation tables.
pub const POOL_SIZE: usize = 16 << 20;

/// Regions the layout is worked out from.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct LayoutInput {
    /// All of RAM.
    pub ram: Range<PhysAddr>,
    /// Regions in use that must not be given out (empty ranges are
    /// ignored).
    pub in_use: [(&'static str, Range<PhysAddr>); 5],
    /// Guest RAM size to back.
    pub guest_ram: usize,
}

/// The regions given to each user.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Layout {
    /// The hypervisor's heap.
    pub heap: Range<PhysAddr>,
    /// The page-table pool.
    pub pool: Range<PhysAddr>,
    /// Physical memory backing guest RAM (2 MiB aligned, so stage 2 can use
    /// blocks).
    pub guest_backing: Range<PhysAddr>,
}

/// Why no layout could be made.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum LayoutError {
    /// A region in use lies (partly) outside RAM.
    OutsideRam(&'static str, Range<PhysAddr>),
    /// Two regions in use overlap.
    Overlap(&'static str, &'static str),
    /// No free range of RAM is large enough.
    NoRoom {
        /// What was being placed.
        what: &'static str,
        /// Its size.
        size: usize,
    },
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutsideRam(what, r) => {
                write!(f, "{what} {:#x}..{:#x} is not inside RAM", r.start, r.end)
            }
            Self::Overlap(a, b) => write!(f, "{a} overlaps {b}"),
            Self::NoRoom { what, size } => {
                write!(f, "no free RAM for the {what} ({} MiB)", size >> 20)
            }
        }
    }
}

fn overlaps(a: &Range<PhysAddr>, b: &Range<PhysAddr>) -> bool {
    a.start < b.end && b.start < a.end
}

/// First `align`-aligned range of `size` bytes in `ram` that overlaps none of
/// `taken`.
fn first_fit(
    ram: &Range<PhysAddr>,
    taken: &[Range<PhysAddr>],
    size: usize,
    align: usize,
) -> Option<Range<PhysAddr>> {
    // A fitting range, if any, starts at RAM's start or right after a taken
    // range (rounded up), so only those candidates need trying.
    core::iter::once(ram.start)
        .chain(taken.iter().map(|t| t.end))
        .map(|start| start.align_up(align))
        .filter_map(|start| Some(start..start.checked_add(size)?))
        .filter(|r| r.start >= ram.start && r.end <= ram.end)
        .filter(|r| taken.iter().all(|t| !overlaps(r, t)))
        .min_by_key(|r| r.start)
}

impl Layout {
    /// Places heap, pool and guest backing.
    ///
    /// # Errors
    ///
    /// A [`LayoutError`] naming the region that does not fit.
    pub fn new(input: &LayoutInput) -> Result<Self, LayoutError> {
        for (i, (name, r)) in input.in_use.iter().enumerate() {
            if r.is_empty() {
                continue;
            }
            if r.start < input.ram.start || r.end > input.ram.end || r.start > r.end {
                return Err(LayoutError::OutsideRam(name, r.clone()));
            }
            for (other, o) in &input.in_use[i + 1..] {
                if !o.is_empty() && overlaps(r, o) {
                    return Err(LayoutError::Overlap(name, other));
                }
            }
        }
        // Runs before the heap exists: no allocation. The in-use regions,
        // then each region placed, in a fixed array.
        let mut taken: [Range<PhysAddr>; 8] = core::array::from_fn(|_| PhysAddr(0)..PhysAddr(0));
        for (slot, (_, r)) in taken.iter_mut().zip(&input.in_use) {
            *slot = r.clone();
        }
        let mut used = input.in_use.len();
        let mut place = |what, size| {
            let r = first_fit(&input.ram, &taken[..used], size, BLOCK_2M)
                .ok_or(LayoutError::NoRoom { what, size })?;
            taken[used] = r.clone();
            used += 1;
            Ok(r)
        };
        let heap = place("heap", HEAP_SIZE)?;
        let pool = place("page-table pool", POOL_SIZE)?;
        let guest_backing = place("guest RAM backing", input.guest_ram)?;
        Ok(Self {
            heap,
            pool,
            guest_backing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pa(r: Range<usize>) -> Range<PhysAddr> {
        PhysAddr(r.start)..PhysAddr(r.end)
    }

    fn qemu_1g(guest_ram: usize) -> LayoutInput {
        LayoutInput {
            ram: pa(0x4000_0000..0x8000_0000),
            in_use: [
                ("device tree", pa(0x4000_0000..0x4010_0000)),
                ("hypervisor image", pa(0x4020_0000..0x4031_0000)),
                ("guest payload", pa(0x4800_0000..0x4802_0000)),
                ("Linux payload", pa(0..0)),
                ("initrd", pa(0..0)),
            ],
            guest_ram,
        }
    }

    #[test]
    fn qemu_layout_is_disjoint_aligned_and_in_ram() {
        let l = Layout::new(&qemu_1g(128 << 20)).expect("fits");
        assert_eq!(l.heap, pa(0x4040_0000..0x40c0_0000));
        assert_eq!(l.pool, pa(0x40c0_0000..0x41c0_0000));
        // The backing skips the payload at 0x4800_0000.
        assert_eq!(l.guest_backing, pa(0x4820_0000..0x5020_0000));
        let input = qemu_1g(128 << 20);
        for r in [&l.heap, &l.pool, &l.guest_backing] {
            assert!(r.start.is_aligned(BLOCK_2M));
            for (_, used) in &input.in_use {
                assert!(!overlaps(r, used), "{r:x?} overlaps {used:x?}");
            }
        }
    }

    #[test]
    fn too_much_guest_ram_is_named() {
        assert_eq!(
            Layout::new(&qemu_1g(1 << 30)),
            Err(LayoutError::NoRoom {
                what: "guest RAM backing",
                size: 1 << 30
            })
        );
    }

    #[test]
    fn overlapping_inputs_are_rejected() {
        let mut input = qemu_1g(1 << 20);
        input.in_use[2].1 = pa(0x4030_0000..0x4040_0000);
        assert_eq!(
            Layout::new(&input),
            Err(LayoutError::Overlap("hypervisor image", "guest payload"))
        );
        input.in_use[2].1 = pa(0x8000_0000..0x8000_1000);
        assert!(matches!(
            Layout::new(&input),
            Err(LayoutError::OutsideRam("guest payload", _))
        ));
    }
}
