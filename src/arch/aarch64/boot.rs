//! What boot reads (device tree, bootargs, payloads), the switch to the EL2
//! map, and loading guest images (the test guest's ELF, an arm64 Linux
//! Image with its device tree and initramfs) into a VM's RAM.

#[allow(
    clippy::wildcard_imports,
    reason = "a part of the parent module, split for size: it uses the parent's items and imports"
)]
use super::*;

/// Largest guest payload accepted.
pub(crate) const MAX_PAYLOAD: usize = 64 << 20;

/// Where QEMU places the device tree for an ELF kernel: the start of RAM.
pub(crate) const DTB_ADDR: usize = 0x4000_0000;

/// What boot finds in the device tree and the payloads.
pub(crate) struct BootInfo {
    pub(crate) args: BootArgs,
    pub(crate) ram: Range<PhysAddr>,
    pub(crate) dtb: Range<PhysAddr>,
    /// The test guest's ELF (if a VM runs it) and where it lies.
    pub(crate) test_elf: Option<GuestElf<'static>>,
    pub(crate) test_payload: Range<PhysAddr>,
    /// The Linux Image (if a VM runs it) and where it lies.
    pub(crate) linux: Option<(crate::vm::linux::ImageHeader, &'static [u8])>,
    pub(crate) linux_payload: Range<PhysAddr>,
    /// The initramfs xtask loaded (empty: none).
    pub(crate) initrd: Range<PhysAddr>,
    /// All VMs' RAM together (each rounded up to 2 MiB).
    pub(crate) guest_ram: usize,
    /// `linux.append=`, still percent-encoded (empty: none).
    pub(crate) linux_append: &'static str,
}

/// Reads the device tree (RAM, bootargs) and parses the guest payload.
pub(crate) fn read_boot_info() -> BootInfo {
    // SAFETY: QEMU placed a device tree at the start of RAM (checked by the
    // parser's magic and size checks); the boot map covers it, and nothing
    // writes it.
    let fdt = unsafe { fdt::Fdt::from_ptr(DTB_ADDR as *const u8) }
        .unwrap_or_else(|e| setup_error(format_args!("no device tree at {DTB_ADDR:#x}: {e:?}")));
    let (ncpus, in_tree) = smp::init_cpu_table(&fdt);
    let cmdline = fdt.chosen().bootargs().unwrap_or("");
    // The token first, so that even a bootargs error reaches xtask as this
    // run's marker.
    if let Some(token) = crate::bootargs::run_token(cmdline) {
        console::set_token(token);
    }
    let args = BootArgs::parse(cmdline).unwrap_or_else(|e| setup_error(format_args!("{e}")));
    let linux_append = crate::bootargs::linux_append(cmdline).unwrap_or("");
    log::set_max_level(args.log);
    TEST_HYPERCALLS.store(args.test_hypercalls, Ordering::Relaxed);
    log::info!(
        "lazyhyp {} at EL2, bootargs {args:?}",
        env!("CARGO_PKG_VERSION")
    );

    let ram = fdt
        .memory()
        .regions()
        .next()
        .and_then(|r| {
            let start = PhysAddr(r.starting_address as usize);
            Some(start..start.checked_add(r.size?)?)
        })
        .unwrap_or_else(|| setup_error(format_args!("device tree has no memory region")));
    let dtb = PhysAddr(DTB_ADDR)..PhysAddr(DTB_ADDR + fdt.total_size()).align_up(PAGE_SIZE);
    log::info!("RAM {:#x}..{:#x}", ram.start, ram.end);
    if in_tree > ncpus {
        log::warn!(
            "{in_tree} CPUs in the device tree; the hypervisor brings up {ncpus} (MAX_PCPUS)"
        );
    }

    // The boot map covers the first GiB of RAM: the payloads must be there.
    let boot_ram_end = ram.end.min(ram.start.add(1 << 30));
    let config = args.vm_config();
    // The payload at `addr`, read-only, up to the end of the first GiB.
    let boot_ram = ram.start..boot_ram_end;
    let payload_at = |addr: PhysAddr, what: &str| payload_bytes(&boot_ram, addr, what);
    let (mut test_elf, mut test_payload) = (None, Range::default());
    if config.has(VmKind::Test) {
        let elf = GuestElf::parse(payload_at(args.payload, "payload")).unwrap_or_else(|e| {
            setup_error(format_args!("guest payload at {:#x}: {e}", args.payload))
        });
        test_payload = args.payload..args.payload.add(elf.file_size()).align_up(PAGE_SIZE);
        test_elf = Some(elf);
    }
    let (linux, linux_payload) = if config.has(VmKind::Linux) {
        read_linux_payload(&args, config.has(VmKind::Test), &payload_at)
    } else {
        (None, Range::default())
    };
    let guest_ram = config
        .iter()
        .map(|v| align_up(v.ram_mib << 20, 2 << 20))
        .sum();
    let (initrd_pa, initrd_size) = args.initrd;
    let initrd = if initrd_size == 0 {
        Range::default()
    } else if initrd_pa
        .checked_add(initrd_size)
        .is_some_and(|end| initrd_pa >= ram.start && end <= boot_ram_end)
    {
        initrd_pa..initrd_pa.add(initrd_size).align_up(PAGE_SIZE)
    } else {
        setup_error(format_args!(
            "initrd {initrd_pa:#x}+{initrd_size:#x} is not in the first GiB of RAM"
        ))
    };
    BootInfo {
        args,
        ram,
        dtb,
        test_elf,
        test_payload,
        linux,
        linux_payload,
        initrd,
        guest_ram,
        linux_append,
    }
}

/// The payload bytes at `addr`, read-only, up to the end of the first GiB
/// of RAM (`boot_ram`, what the boot map covers) or [`MAX_PAYLOAD`].
fn payload_bytes(boot_ram: &Range<PhysAddr>, addr: PhysAddr, what: &str) -> &'static [u8] {
    if !boot_ram.contains(&addr) {
        setup_error(format_args!(
            "{what} address {addr:#x} is not in the first GiB of RAM"
        ));
    }
    let len = boot_ram.end.offset_from(addr).min(MAX_PAYLOAD);
    // SAFETY: the range is RAM covered by the boot map and the EL2 map
    // (read only); the layout keeps everything else out of the payload's
    // extent.
    unsafe { core::slice::from_raw_parts(addr.0 as *const u8, len) }
}

/// The Linux Image a Linux VM runs: at `linux.payload=`, or at `payload=`
/// when no test VM needs that address; and where it lies.
fn read_linux_payload(
    args: &BootArgs,
    with_test_vm: bool,
    payload_at: &dyn Fn(PhysAddr, &str) -> &'static [u8],
) -> (
    Option<(crate::vm::linux::ImageHeader, &'static [u8])>,
    Range<PhysAddr>,
) {
    let addr = if with_test_vm {
        args.linux_payload.unwrap_or_else(|| {
            setup_error(format_args!(
                "a test VM and a Linux VM need linux.payload= for the kernel"
            ))
        })
    } else {
        args.linux_payload.unwrap_or(args.payload)
    };
    let bytes = payload_at(addr, "linux.payload");
    let header = crate::vm::linux::parse_image_header(bytes)
        .unwrap_or_else(|e| setup_error(format_args!("guest payload at {addr:#x}: {e}")));
    let size = usize::try_from(header.image_size).unwrap_or(usize::MAX);
    if size > bytes.len() {
        setup_error(format_args!(
            "kernel image_size {size:#x} reaches past the first GiB of RAM"
        ));
    }
    (
        Some((header, &bytes[..size])),
        addr..addr.add(size).align_up(PAGE_SIZE),
    )
}

/// Starts the heap, builds the EL2 map and switches to it.
pub(crate) fn switch_to_el2_map(
    image: &el2map::ImageLayout,
    boot: &BootInfo,
    layout: &Layout,
    pa_range: u64,
) {
    // SAFETY: the layout gave the heap region to the heap alone; it is RAM
    // mapped read-write by the boot map and by the EL2 map built next.
    unsafe {
        HEAP.heap.lock().init(
            layout.heap.start.0,
            layout.heap.end.offset_from(layout.heap.start),
        );
    }
    let map = el2map::build(
        image,
        &el2map::El2Regions {
            read_only: [
                boot.dtb.clone(),
                boot.test_payload.clone(),
                boot.linux_payload.clone(),
                boot.initrd.clone(),
            ],
            read_write: [layout.heap.clone(), layout.guest_backing.clone()],
            pool: layout.pool.clone(),
        },
    );
    // SAFETY: the map covers the image, stacks, heap and console at their
    // addresses, and is kept in a static forever below.
    unsafe { el2map::activate(&map, pa_range) };
    EL2_MAP.call_once(|| SpinMutex::new(map));
    log::info!("EL2 map active");
}

/// The kernel command line of a Linux guest.
pub(crate) const LINUX_CMDLINE: &str =
    "console=ttyAMA0 earlycon=pl011,0x9000000 panic=-1 rdinit=/init";

/// Loads a Linux guest per the arm64 boot protocol: the Image at guest RAM's
/// (2 MiB-aligned) base plus `text_offset`, the initramfs 64 MiB below the
/// end of guest RAM, the device tree 2 MiB below it. Returns (entry, x0 =
/// the tree's IPA).
pub(crate) fn load_linux(
    header: &crate::vm::linux::ImageHeader,
    image: &[u8],
    boot: &BootInfo,
    vm: &Vm,
) -> (u64, u64) {
    let backing = &vm.backing;
    let guest_ram = vm.spec.ram_mib << 20;
    // IPAs as the device tree and the boot registers carry them; each
    // becomes a physical address only through `to_pa` (guest RAM's backing).
    let ram_end = GUEST_RAM_IPA.0 + guest_ram as u64;
    let to_pa = |ipa: u64| {
        backing
            .start
            .add(Ipa(ipa).offset_from(GUEST_RAM_IPA) as usize)
    };
    let dtb_ipa = ram_end - (2 << 20);
    let initrd_ipa = ram_end.saturating_sub(64 << 20);
    // Checked: text_offset comes from the Image header.
    let kernel = GUEST_RAM_IPA.0.checked_add(header.text_offset).filter(|k| {
        k.checked_add(image.len() as u64)
            .is_some_and(|end| end <= initrd_ipa)
    });
    let Some(kernel) = kernel else {
        setup_error(format_args!(
            "the kernel (text_offset {:#x}) does not fit below the initramfs in guest RAM",
            header.text_offset
        ))
    };
    let initrd_len = boot.initrd.end.offset_from(boot.initrd.start);
    if initrd_len > (62 << 20) {
        setup_error(format_args!("initramfs larger than 62 MiB"));
    }
    // The user's words (`cargo xtask linux --append`) after ours.
    let mut cmdline = alloc::string::String::from(LINUX_CMDLINE);
    if !boot.linux_append.is_empty() {
        let extra = crate::bootargs::percent_decode(boot.linux_append)
            .unwrap_or_else(|| setup_error(format_args!("linux.append is not percent-encoded")));
        cmdline.push(' ');
        cmdline.push_str(&extra);
    }
    // After a reset, the kernel is told which start this is (an init
    // may want to know; the reboot test does).
    let resets = vm.resets.load(Ordering::Relaxed);
    if resets > 0 {
        let _ = write!(cmdline, " lazyhyp.resets={resets}");
    }
    log::info!("Linux command line: {cmdline}");
    let tree = crate::vm::linux::build_tree(&crate::vm::linux::GuestTree {
        ram: GUEST_RAM_IPA.0..ram_end,
        initrd: (initrd_len > 0).then(|| initrd_ipa..initrd_ipa + boot.args.initrd.1 as u64),
        bootargs: &cmdline,
        gicd: (qemu_virt::GICD_BASE, qemu_virt::GICD_SIZE),
        gicr: (qemu_virt::GICR_BASE, 0x2_0000 * vm.spec.vcpus as u64),
        uart: PL011_BASE as u64,
        mpidrs: &(0..vm.spec.vcpus)
            .map(|v| Vgic::mpidr(v) & smp::MPIDR_AFFINITY)
            .collect::<Vec<_>>(),
    })
    .unwrap_or_else(|e| setup_error(format_args!("{e}")));
    // SAFETY: the backing is ours alone and mapped read-write by the EL2
    // map; the sources (payload, initrd: read-only in the EL2 map; the tree
    // on the heap) are disjoint from it, and every destination range was
    // checked to lie in guest RAM above.
    unsafe {
        core::ptr::write_bytes(backing.start.0 as *mut u8, 0, guest_ram);
        core::ptr::copy_nonoverlapping(image.as_ptr(), to_pa(kernel).0 as *mut u8, image.len());
        core::ptr::copy_nonoverlapping(
            boot.initrd.start.0 as *const u8,
            to_pa(initrd_ipa).0 as *mut u8,
            initrd_len,
        );
        core::ptr::copy_nonoverlapping(tree.as_ptr(), to_pa(dtb_ipa).0 as *mut u8, tree.len());
    }
    // The image, initramfs and tree reach a guest that starts with its
    // caches off.
    coherency().after_code_load(&cache::HwCacheOps, backing.start, guest_ram);
    log::info!(
        "Linux: kernel at IPA {kernel:#x}, initramfs {initrd_ipa:#x} ({initrd_len:#x} bytes), tree {dtb_ipa:#x}"
    );
    (kernel, dtb_ipa)
}

/// Copies the guest's segments into its RAM backing and zeroes the rest of
/// it, then makes it all visible to a guest running with caches off.
/// Returns the entry point.
pub(crate) fn load_guest(elf: &GuestElf<'_>, backing: &Range<PhysAddr>, guest_ram: usize) -> u64 {
    let to_pa = |ipa: Ipa| backing.start.add(ipa.offset_from(GUEST_RAM_IPA) as usize);
    // Fresh RAM may hold anything: the guest gets zeroes.
    // SAFETY: the backing is ours alone and mapped read-write by the EL2 map.
    unsafe { core::ptr::write_bytes(backing.start.0 as *mut u8, 0, guest_ram) };
    let image = elf
        .load(
            &(GUEST_RAM_IPA..GUEST_RAM_IPA.add(guest_ram as u64)),
            |ipa, bytes| {
                // SAFETY: `load` checked the segment lies in guest RAM, whose
                // backing is ours and mapped read-write; source (payload) and
                // destination (backing) are disjoint regions of the layout.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        to_pa(ipa).0 as *mut u8,
                        bytes.len(),
                    );
                }
            },
            |ipa, len| {
                // SAFETY: as above.
                unsafe { core::ptr::write_bytes(to_pa(ipa).0 as *mut u8, 0, len) };
            },
        )
        .unwrap_or_else(|e| setup_error(format_args!("loading the guest: {e}")));
    coherency().after_code_load(&cache::HwCacheOps, backing.start, guest_ram);
    image.entry.0
}
