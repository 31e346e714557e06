//! Booting an unmodified arm64 Linux kernel as the guest: the Image header
//! (Documentation/arch/arm64/booting.rst) and the device tree it is given.
//!
//! The tree is written here (vm-fdt) rather than copied from QEMU's: it
//! describes exactly what the guest gets (its RAM, one CPU with PSCI over
//! SMC, the architected timer, the GICv3 distributor and redistributor and
//! the PL011 passed through) and nothing of the hypervisor or of devices it
//! does not map.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

/// Why a kernel image or tree was refused.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum LinuxError {
    /// No `ARM\x64` magic at offset 56: not an arm64 Image.
    NotAnImage,
    /// A big-endian kernel (flags bit 0).
    BigEndian,
    /// The kernel does not run with 4 KiB pages (flags bits 1..2).
    PageSize,
    /// The device tree could not be written.
    Fdt(String),
}

impl core::fmt::Display for LinuxError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotAnImage => {
                write!(f, "payload is not an arm64 Linux Image (no ARM\\x64 magic)")
            }
            Self::BigEndian => write!(f, "big-endian kernels are not supported"),
            Self::PageSize => write!(f, "the kernel does not support 4 KiB pages"),
            Self::Fdt(e) => write!(f, "device tree: {e}"),
        }
    }
}

/// The fields of the arm64 Image header the loader uses.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ImageHeader {
    /// Offset from a 2 MiB-aligned base at which the image must be placed.
    pub text_offset: u64,
    /// Bytes the image occupies in memory, from its start (BSS included).
    pub image_size: u64,
}

/// Parses the 64-byte header at the start of an arm64 Image.
///
/// # Errors
///
/// A [`LinuxError`] naming what is wrong with it.
pub fn parse_image_header(bytes: &[u8]) -> Result<ImageHeader, LinuxError> {
    let u64_at = |i: usize| {
        bytes
            .get(i..i + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(56..60) != Some(b"ARM\x64".as_slice()) {
        return Err(LinuxError::NotAnImage);
    }
    let (text_offset, image_size, flags) = (
        u64_at(8).unwrap_or(0),
        u64_at(16).unwrap_or(0),
        u64_at(24).unwrap_or(0),
    );
    if flags & 1 != 0 {
        return Err(LinuxError::BigEndian);
    }
    // Page size: 0 unspecified, 1 = 4K, 2 = 16K, 3 = 64K.
    if !matches!((flags >> 1) & 3, 0 | 1) {
        return Err(LinuxError::PageSize);
    }
    // image_size 0: a kernel older than 3.17; assume a generous 64 MiB.
    let image_size = if image_size == 0 {
        64 << 20
    } else {
        image_size
    };
    // Kernels before 3.17 may also give text_offset 0x80000 with no flags;
    // both are honoured as written.
    Ok(ImageHeader {
        text_offset,
        image_size,
    })
}

/// What the guest's device tree describes.
#[derive(Clone, Debug)]
pub struct GuestTree<'a> {
    /// Guest RAM (IPA).
    pub ram: Range<u64>,
    /// Where the initramfs is (IPA), if any.
    pub initrd: Option<Range<u64>>,
    /// The kernel command line.
    pub bootargs: &'a str,
    /// GICv3 distributor (IPA, size).
    pub gicd: (u64, u64),
    /// GICv3 redistributor region for all vCPUs (IPA, size: 128 KiB each).
    pub gicr: (u64, u64),
    /// PL011 (IPA).
    pub uart: u64,
    /// Each vCPU's MPIDR affinity (the `reg` of its cpu node), vCPU 0
    /// first.
    pub mpidrs: &'a [u64],
}

const GIC_PHANDLE: u32 = 1;
const CLOCK_PHANDLE: u32 = 2;

/// Writes the device tree.
///
/// # Errors
///
/// [`LinuxError::Fdt`] if vm-fdt refuses it.
pub fn build_tree(t: &GuestTree<'_>) -> Result<Vec<u8>, LinuxError> {
    build(t).map_err(|e| LinuxError::Fdt(alloc::format!("{e:?}")))
}

fn build(t: &GuestTree<'_>) -> Result<Vec<u8>, vm_fdt::Error> {
    use vm_fdt::FdtWriter;
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let uart_name = alloc::format!("pl011@{:x}", t.uart);
    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", t.bootargs)?;
    fdt.property_string("stdout-path", &alloc::format!("/{uart_name}"))?;
    if let Some(initrd) = &t.initrd {
        fdt.property_u64("linux,initrd-start", initrd.start)?;
        fdt.property_u64("linux,initrd-end", initrd.end)?;
    }
    fdt.end_node(chosen)?;

    let memory = fdt.begin_node(&alloc::format!("memory@{:x}", t.ram.start))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[t.ram.start, t.ram.end - t.ram.start])?;
    fdt.end_node(memory)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for &mpidr in t.mpidrs {
        let cpu = fdt.begin_node(&alloc::format!("cpu@{mpidr:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,armv8")?;
        fdt.property_array_u32("reg", &[(mpidr >> 32) as u32, mpidr as u32])?;
        fdt.property_string("enable-method", "psci")?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    // The hypervisor traps SMC (HCR_EL2.TSC) and emulates PSCI.
    fdt.property_string("method", "smc")?;
    fdt.end_node(psci)?;

    // PPIs: secure physical 13, physical 14, virtual 11, hypervisor 10;
    // level high (GICv3 flags carry no CPU mask, unlike GICv2's 0x104).
    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_array_u32("interrupts", &[1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4])?;
    fdt.property_null("always-on")?;
    fdt.end_node(timer)?;

    let gic = fdt.begin_node(&alloc::format!("intc@{:x}", t.gicd.0))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_array_u64("reg", &[t.gicd.0, t.gicd.1, t.gicr.0, t.gicr.1])?;
    fdt.property_u32("#redistributor-regions", 1)?;
    // The maintenance interrupt: PPI 9 (INTID 25), level high, as QEMU's
    // own tree describes it. The hypervisor uses it; only a guest that were
    // itself a hypervisor would.
    fdt.property_array_u32("interrupts", &[1, 9, 4])?;
    fdt.property_phandle(GIC_PHANDLE)?;
    fdt.end_node(gic)?;

    let clock = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", 24_000_000)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(CLOCK_PHANDLE)?;
    fdt.end_node(clock)?;

    let uart = fdt.begin_node(&uart_name)?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,pl011".into(), "arm,primecell".into()],
    )?;
    fdt.property_array_u64("reg", &[t.uart, 0x1000])?;
    // SPI 1, level high: QEMU virt's UART0.
    fdt.property_array_u32("interrupts", &[0, 1, 4])?;
    fdt.property_array_u32("clocks", &[CLOCK_PHANDLE, CLOCK_PHANDLE])?;
    fdt.property_string_list("clock-names", vec!["uartclk".into(), "apb_pclk".into()])?;
    fdt.end_node(uart)?;

    fdt.end_node(root)?;
    fdt.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_image_header_and_refuses_others() {
        let mut h = [0u8; 64];
        h[8..16].copy_from_slice(&0u64.to_le_bytes());
        h[16..24].copy_from_slice(&0x224_0000u64.to_le_bytes());
        h[24..32].copy_from_slice(&0xau64.to_le_bytes());
        h[56..60].copy_from_slice(b"ARM\x64");
        assert_eq!(
            parse_image_header(&h),
            Ok(ImageHeader {
                text_offset: 0,
                image_size: 0x224_0000
            })
        );
        let mut be = h;
        be[24] = 0xb;
        assert_eq!(parse_image_header(&be), Err(LinuxError::BigEndian));
        let mut big_pages = h;
        big_pages[24] = 0x6;
        assert_eq!(parse_image_header(&big_pages), Err(LinuxError::PageSize));
        assert_eq!(parse_image_header(&[0u8; 64]), Err(LinuxError::NotAnImage));
    }

    #[test]
    fn the_tree_describes_ram_initrd_and_devices() {
        let tree = GuestTree {
            ram: 0x4000_0000..0x5000_0000,
            initrd: Some(0x4c00_0000..0x4c20_0000),
            bootargs: "console=ttyAMA0",
            gicd: (0x0800_0000, 0x1_0000),
            gicr: (0x080a_0000, 0x2_0000),
            uart: 0x0900_0000,
            mpidrs: &[0, 1, 0x100],
        };
        let blob = build_tree(&tree).expect("tree");
        let fdt = fdt::Fdt::new(&blob).expect("parses back");
        assert_eq!(fdt.chosen().bootargs(), Some("console=ttyAMA0"));
        let mem = fdt.memory().regions().next().expect("memory");
        assert_eq!(
            (mem.starting_address as u64, mem.size),
            (0x4000_0000, Some(0x1000_0000))
        );
        let initrd = fdt
            .find_node("/chosen")
            .and_then(|c| c.property("linux,initrd-start"))
            .expect("initrd");
        assert_eq!(initrd.as_usize(), Some(0x4c00_0000));
        assert!(fdt.find_compatible(&["arm,gic-v3"]).is_some());
        assert!(fdt.find_compatible(&["arm,pl011"]).is_some());
        assert!(fdt.find_node("/psci").is_some());
        let cpus: Vec<usize> = fdt.cpus().map(|c| c.ids().first()).collect();
        assert_eq!(cpus, [0, 1, 0x100]);
    }
}
