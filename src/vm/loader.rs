//! Loading the test guest: an AArch64 ELF executable that xtask places, as
//! raw bytes, in RAM (`-device loader,...,force-raw=on`). Its `PT_LOAD`
//! segments are copied into guest RAM at their physical (IPA) addresses.

use core::ops::Range;
use elf::ElfBytes;
use elf::abi::{EM_AARCH64, ET_EXEC, PT_LOAD};
use elf::endian::LittleEndian;

use crate::mm::Ipa;

/// Why the guest image was refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum LoadError {
    /// Not a parsable little-endian ELF file (no payload was placed there?).
    NotElf,
    /// An ELF file, but not an AArch64 executable.
    WrongKind,
    /// A table or segment reaches beyond the bytes available.
    Truncated,
    /// A segment would land outside guest RAM.
    SegmentOutsideGuestRam {
        /// The segment's first IPA.
        start: Ipa,
        /// Its size in memory.
        size: u64,
    },
    /// The entry point is not inside a loaded segment.
    EntryOutsideImage(Ipa),
    /// The file has no loadable segment.
    NothingToLoad,
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotElf => write!(f, "guest payload is not an ELF file"),
            Self::WrongKind => write!(f, "guest payload is not an AArch64 ELF executable"),
            Self::Truncated => write!(f, "guest payload is truncated"),
            Self::SegmentOutsideGuestRam { start, size } => write!(
                f,
                "guest segment {start:#x}..{:#x} is outside guest RAM",
                start.0.saturating_add(*size)
            ),
            Self::EntryOutsideImage(e) => write!(f, "guest entry point {e:#x} is not in the image"),
            Self::NothingToLoad => write!(f, "guest payload has no loadable segment"),
        }
    }
}

/// What was loaded.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct LoadedImage {
    /// Entry point (IPA).
    pub entry: Ipa,
    /// IPA range spanned by the loaded segments.
    pub span: Range<Ipa>,
    /// Bytes of the payload file (its extent in RAM).
    pub file_size: usize,
}

/// A parsed guest ELF, borrowed from the payload bytes.
#[derive(Debug)]
pub struct GuestElf<'a> {
    elf: ElfBytes<'a, LittleEndian>,
    file_size: usize,
}

impl<'a> GuestElf<'a> {
    /// Parses the ELF at the start of `bytes`, which may extend past the end
    /// of the file (the rest of RAM): the file's extent is found from its
    /// headers.
    ///
    /// # Errors
    ///
    /// [`LoadError::NotElf`], [`LoadError::WrongKind`] or
    /// [`LoadError::Truncated`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self, LoadError> {
        let elf = ElfBytes::<LittleEndian>::minimal_parse(bytes).map_err(|_| LoadError::NotElf)?;
        let h = &elf.ehdr;
        if h.e_machine != EM_AARCH64 || h.e_type != ET_EXEC || h.class != elf::file::Class::ELF64 {
            return Err(LoadError::WrongKind);
        }
        let table_end = |off: u64, n: u64, size: u64| off.checked_add(n.checked_mul(size)?);
        let mut end = table_end(h.e_phoff, h.e_phnum.into(), h.e_phentsize.into())
            .ok_or(LoadError::Truncated)?;
        end = end.max(
            table_end(h.e_shoff, h.e_shnum.into(), h.e_shentsize.into())
                .ok_or(LoadError::Truncated)?,
        );
        for ph in elf.segments().ok_or(LoadError::NothingToLoad)?.iter() {
            end = end.max(
                ph.p_offset
                    .checked_add(ph.p_filesz)
                    .ok_or(LoadError::Truncated)?,
            );
        }
        let file_size = usize::try_from(end).map_err(|_| LoadError::Truncated)?;
        if file_size > bytes.len() {
            return Err(LoadError::Truncated);
        }
        Ok(Self { elf, file_size })
    }

    /// Bytes of the file.
    #[must_use]
    pub fn file_size(&self) -> usize {
        self.file_size
    }

    /// Copies every `PT_LOAD` segment into guest RAM through `write(ipa,
    /// bytes)` and zero-fills its tail (`.bss`) through `zero(ipa, len)`.
    /// Every segment is checked against `guest_ram` before anything is
    /// written.
    ///
    /// # Errors
    ///
    /// A [`LoadError`] naming the offending segment or entry point.
    pub fn load(
        &self,
        guest_ram: &Range<Ipa>,
        mut write: impl FnMut(Ipa, &[u8]),
        mut zero: impl FnMut(Ipa, usize),
    ) -> Result<LoadedImage, LoadError> {
        let segments = self.elf.segments().ok_or(LoadError::NothingToLoad)?;
        let loads = || {
            segments
                .iter()
                .filter(|ph| ph.p_type == PT_LOAD && ph.p_memsz > 0)
        };
        let mut span: Option<Range<Ipa>> = None;
        for ph in loads() {
            // A segment's physical address is where the guest believes it
            // is: an IPA.
            let start = Ipa(ph.p_paddr);
            let outside = LoadError::SegmentOutsideGuestRam {
                start,
                size: ph.p_memsz,
            };
            let end = start.checked_add(ph.p_memsz).ok_or(outside)?;
            if start < guest_ram.start || end > guest_ram.end || ph.p_filesz > ph.p_memsz {
                return Err(outside);
            }
            span = Some(match span {
                None => start..end,
                Some(s) => s.start.min(start)..s.end.max(end),
            });
        }
        let span = span.ok_or(LoadError::NothingToLoad)?;
        let entry = Ipa(self.elf.ehdr.e_entry);
        if !span.contains(&entry) {
            return Err(LoadError::EntryOutsideImage(entry));
        }
        for ph in loads() {
            let data = self
                .elf
                .segment_data(&ph)
                .map_err(|_| LoadError::Truncated)?;
            write(Ipa(ph.p_paddr), data);
            let tail =
                usize::try_from(ph.p_memsz - ph.p_filesz).map_err(|_| LoadError::Truncated)?;
            if tail > 0 {
                zero(Ipa(ph.p_paddr + ph.p_filesz), tail);
            }
        }
        Ok(LoadedImage {
            entry,
            span,
            file_size: self.file_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A minimal ELF64 AArch64 executable with one PT_LOAD segment of
    /// `data` (file) + `bss` (memory only) bytes at `paddr`.
    fn tiny_elf(paddr: u64, entry: u64, data: &[u8], bss: u64) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little endian
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        f[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(data.len() as u64 + bss).to_le_bytes());
        f.extend_from_slice(data);
        f
    }

    const RAM: Range<Ipa> = Ipa(0x4000_0000)..Ipa(0x4800_0000);

    #[test]
    fn loads_segment_and_zeroes_bss_with_trailing_ram_ignored() {
        let mut bytes = tiny_elf(0x4008_0000, 0x4008_0000, b"code", 12);
        let file_len = bytes.len();
        bytes.extend_from_slice(&[0xee; 100]); // whatever follows in RAM
        let elf = GuestElf::parse(&bytes).expect("parses");
        assert_eq!(elf.file_size(), file_len);
        let (mut writes, mut zeroes) = (Vec::new(), Vec::new());
        let img = elf
            .load(
                &RAM,
                |ipa, d| writes.push((ipa, d.to_vec())),
                |ipa, n| zeroes.push((ipa, n)),
            )
            .expect("loads");
        assert_eq!(writes, vec![(Ipa(0x4008_0000), b"code".to_vec())]);
        assert_eq!(zeroes, vec![(Ipa(0x4008_0004), 12)]);
        assert_eq!(img.entry, Ipa(0x4008_0000));
        assert_eq!(img.span, Ipa(0x4008_0000)..Ipa(0x4008_0010));
    }

    #[test]
    fn refuses_segments_outside_guest_ram_before_writing() {
        let bytes = tiny_elf(0x3fff_f000, 0x3fff_f000, b"code", 0);
        let elf = GuestElf::parse(&bytes).expect("parses");
        let r = elf.load(&RAM, |_, _| panic!("wrote"), |_, _| panic!("zeroed"));
        assert!(matches!(r, Err(LoadError::SegmentOutsideGuestRam { .. })));
    }

    #[test]
    fn refuses_bad_entry_garbage_and_truncation() {
        let bytes = tiny_elf(0x4008_0000, 0x4100_0000, b"code", 0);
        let elf = GuestElf::parse(&bytes).expect("parses");
        assert_eq!(
            elf.load(&RAM, |_, _| {}, |_, _| {}),
            Err(LoadError::EntryOutsideImage(Ipa(0x4100_0000)))
        );
        assert_eq!(GuestElf::parse(&[0u8; 256]).err(), Some(LoadError::NotElf));
        let bytes = tiny_elf(0x4008_0000, 0x4008_0000, b"code", 0);
        assert_eq!(
            GuestElf::parse(&bytes[..bytes.len() - 1]).err(),
            Some(LoadError::Truncated)
        );
    }
}
