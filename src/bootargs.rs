//! The hypervisor's command line: `/chosen/bootargs` of the device tree that
//! QEMU builds from `-append`. Space-separated `key=value` words; an unknown
//! key or a malformed value is an error, never ignored.

use log::LevelFilter;

use crate::mm::PhysAddr;

/// Where xtask loads the guest payload when `payload=` is not given.
pub const DEFAULT_PAYLOAD: PhysAddr = PhysAddr(0x4800_0000);

/// Guest RAM size when `guest.ram_mib=` is not given.
pub const DEFAULT_GUEST_RAM_MIB: usize = 256;

/// Flag bits handed to the test guest in `x1`.
pub mod guest_flags {
    /// The guest adds a test that deliberately fails (for the failure-path test).
    pub const FAIL: u64 = 1 << 0;
    /// The guest runs the benchmark sequence instead of its tests
    /// (`cargo xtask bench`).
    pub const BENCH: u64 = 1 << 1;
    /// The guest resets its VM once (PSCI `SYSTEM_RESET`) before its tests,
    /// and checks that it restarted from a clean image (`guest.reset_test=1`).
    pub const RESET_TEST: u64 = 1 << 2;
}

/// Parsed boot arguments.
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent on/off boot options"
)]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct BootArgs {
    /// `log=`: maximum log level.
    pub log: LevelFilter,
    /// `payload=`: physical address of the raw guest ELF.
    pub payload: PhysAddr,
    /// `guest.ram_mib=`: guest RAM size in MiB.
    pub guest_ram_mib: usize,
    /// Flags for the test guest (see [`guest_flags`]).
    pub guest_flags: u64,
    /// `mm.guard=`: keep free page-table pages unmapped from the EL2 map
    /// (default: on).
    pub guard: bool,
    /// `guest.populate=demand|boot`: map guest RAM on first touch (default)
    /// or all at boot in one lazy section.
    pub populate_at_boot: bool,
    /// `guest.fault_around_kib=`: the window populated around a demand
    /// fault, in KiB (default 2048; 0 or 4: off).
    pub fault_around_kib: usize,
    /// `guest.uart=emulated|passthrough`: the guest's PL011 is emulated
    /// (default) or the real one is mapped into it.
    pub uart_passthrough: bool,
    /// `guest.kind=test|linux`: the payload is the test guest's ELF
    /// (default) or an arm64 Linux Image.
    pub linux: bool,
    /// `linux.initrd=<PA>` and `linux.initrd_size=<bytes>`: where the
    /// initramfs was loaded (size 0: none).
    pub initrd: (PhysAddr, usize),
    /// `run.token=<hex>`: the run's secret, carried by every marker line the
    /// hypervisor prints so xtask can tell them from guest output.
    pub run_token: RunToken,
    /// `test.hypercalls=0|1`: the test-only hypercalls (nesting policy,
    /// benchmarks, ...) are answered (default: off, `NOT_SUPPORTED`).
    pub test_hypercalls: bool,
    /// `mm.fwb=0|1`: use FEAT_S2FWB (forced write-back at stage 2) when
    /// the CPU has it (default), or keep guest memory coherent with
    /// explicit cache maintenance (`crate::coherency`).
    pub fwb: bool,
    /// `guest.unmap_bench_mib=<MiB>`: the test guest runs only the unmap
    /// benchmark (page-map this much guest RAM from IPA 0x4400_0000, give
    /// back every other page, unmap it in one call) and reports it (0: no).
    pub unmap_bench_mib: usize,
    /// `guest.vcpus=<1..=8>`: the guest's vCPUs, vCPU i pinned to physical
    /// CPU i (default 1).
    pub vcpus: usize,
    /// `vms=KIND:CPUS:RAM_MIB,...`: several VMs side by side (see
    /// [`crate::vm::config`]); without it, one VM from `guest.kind`,
    /// `guest.vcpus` and `guest.ram_mib`.
    pub vms: Option<crate::vm::config::VmConfig>,
    /// `linux.payload=<PA>`: where the Linux Image is when `vms=` has both a
    /// test VM (its ELF at `payload=`) and a Linux VM.
    pub linux_payload: Option<PhysAddr>,
}

/// The run's secret token: up to 32 hex digits from the bootargs, which
/// live only in the device tree QEMU gives the hypervisor (never in guest
/// memory). `Debug` does not show it, so logging the bootargs does not
/// leak it.
#[derive(Clone, Copy, Default, Eq, PartialEq)]
pub struct RunToken {
    digits: [u8; 32],
    len: u8,
}

impl RunToken {
    /// The token's hex digits (empty: none given).
    #[must_use]
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are stored.
        core::str::from_utf8(&self.digits[..usize::from(self.len)]).unwrap_or("")
    }

    fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut t = Self::default();
        t.digits[..s.len()].copy_from_slice(s.as_bytes());
        t.len = s.len() as u8;
        Some(t)
    }
}

impl core::fmt::Debug for RunToken {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(if self.len == 0 { "none" } else { "<hidden>" })
    }
}

impl Default for BootArgs {
    fn default() -> Self {
        Self {
            log: LevelFilter::Info,
            payload: DEFAULT_PAYLOAD,
            guest_ram_mib: DEFAULT_GUEST_RAM_MIB,
            guest_flags: 0,
            guard: true,
            populate_at_boot: false,
            fault_around_kib: 2048,
            uart_passthrough: false,
            linux: false,
            initrd: (PhysAddr(0), 0),
            vcpus: 1,
            vms: None,
            linux_payload: None,
            run_token: RunToken::default(),
            test_hypercalls: false,
            fwb: true,
            unmap_bench_mib: 0,
        }
    }
}

/// Why the boot arguments were rejected.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum BootArgsError<'a> {
    /// A word without `=`.
    NotKeyValue(&'a str),
    /// A key this hypervisor does not know.
    UnknownKey(&'a str),
    /// A value that does not parse for its key.
    BadValue {
        /// The key.
        key: &'a str,
        /// The value given.
        value: &'a str,
    },
}

impl core::fmt::Display for BootArgsError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotKeyValue(w) => write!(f, "boot argument `{w}` is not key=value"),
            Self::UnknownKey(k) => write!(
                f,
                "unknown boot argument `{k}` (known: log, payload, mm.guard, mm.fwb, guest.ram_mib, guest.populate, guest.fault_around_kib, guest.uart, guest.kind, linux.initrd, linux.initrd_size, guest.fail, guest.bench, guest.unmap_bench_mib, guest.vcpus, guest.reset_test, vms, linux.payload, linux.append, run.token, test.hypercalls)"
            ),
            Self::BadValue { key, value } => write!(f, "bad value `{value}` for `{key}`"),
        }
    }
}

impl BootArgs {
    /// The VMs to run: `vms=`, or the one VM `guest.kind`, `guest.vcpus`
    /// and `guest.ram_mib` describe (on CPUs 0..vcpus).
    #[must_use]
    pub fn vm_config(&self) -> crate::vm::config::VmConfig {
        use crate::vm::config::{VmConfig, VmKind, VmSpec};
        self.vms.unwrap_or_else(|| {
            VmConfig::single(VmSpec {
                kind: if self.linux {
                    VmKind::Linux
                } else {
                    VmKind::Test
                },
                first_cpu: 0,
                vcpus: self.vcpus,
                ram_mib: self.guest_ram_mib,
            })
        })
    }

    /// Parses a command line.
    ///
    /// # Errors
    ///
    /// The first word that is not a known `key=value` with a valid value.
    pub fn parse(cmdline: &str) -> Result<Self, BootArgsError<'_>> {
        let mut args = Self::default();
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word
                .split_once('=')
                .ok_or(BootArgsError::NotKeyValue(word))?;
            let bad = BootArgsError::BadValue { key, value };
            match key {
                "log" => args.log = parse_level(value).ok_or(bad)?,
                "payload" => args.payload = PhysAddr(parse_number(value).ok_or(bad)?),
                "vms" => {
                    args.vms = Some(crate::vm::config::VmConfig::parse(value).map_err(|_| bad)?);
                }
                "linux.payload" => {
                    args.linux_payload = Some(PhysAddr(parse_number(value).ok_or(bad)?));
                }
                "guest.vcpus" => {
                    args.vcpus = parse_number(value)
                        .filter(|n| (1..=8).contains(n))
                        .ok_or(bad)?;
                }
                "guest.ram_mib" => {
                    args.guest_ram_mib = parse_number(value).filter(|&m| m > 0).ok_or(bad)?;
                }
                "mm.guard" => args.guard = parse_bool(value).ok_or(bad)?,
                "mm.fwb" => args.fwb = parse_bool(value).ok_or(bad)?,
                "guest.populate" => {
                    args.populate_at_boot = match value {
                        "boot" => true,
                        "demand" => false,
                        _ => return Err(bad),
                    };
                }
                "guest.kind" => {
                    args.linux = match value {
                        "linux" => true,
                        "test" => false,
                        _ => return Err(bad),
                    };
                }
                "linux.initrd" => args.initrd.0 = PhysAddr(parse_number(value).ok_or(bad)?),
                "linux.initrd_size" => args.initrd.1 = parse_number(value).ok_or(bad)?,
                "guest.uart" => {
                    args.uart_passthrough = match value {
                        "passthrough" => true,
                        "emulated" => false,
                        _ => return Err(bad),
                    };
                }
                "guest.fault_around_kib" => {
                    args.fault_around_kib = parse_number(value)
                        .filter(|&k| k <= (1 << 20) && (k == 0 || k.is_power_of_two()))
                        .ok_or(bad)?;
                }
                "guest.bench" => match value {
                    "0" => args.guest_flags &= !guest_flags::BENCH,
                    "1" => args.guest_flags |= guest_flags::BENCH,
                    _ => return Err(bad),
                },
                "guest.unmap_bench_mib" => {
                    args.unmap_bench_mib = parse_number(value).ok_or(bad)?;
                }
                // Kept as text (see `linux_append`); checked here.
                "linux.append" => {
                    if !is_percent_encoded(value) {
                        return Err(bad);
                    }
                }
                "run.token" => args.run_token = RunToken::parse(value).ok_or(bad)?,
                "test.hypercalls" => args.test_hypercalls = parse_bool(value).ok_or(bad)?,
                "guest.reset_test" => match value {
                    "0" => args.guest_flags &= !guest_flags::RESET_TEST,
                    "1" => args.guest_flags |= guest_flags::RESET_TEST,
                    _ => return Err(bad),
                },
                "guest.fail" => match value {
                    "0" => args.guest_flags &= !guest_flags::FAIL,
                    "1" => args.guest_flags |= guest_flags::FAIL,
                    _ => return Err(bad),
                },
                _ => return Err(BootArgsError::UnknownKey(key)),
            }
        }
        // The unmap benchmark's area starts 64 MiB into guest RAM.
        if args.unmap_bench_mib > 0 && args.unmap_bench_mib.saturating_add(64) > args.guest_ram_mib
        {
            return Err(BootArgsError::BadValue {
                key: "guest.unmap_bench_mib",
                value: "larger than guest RAM minus 64 MiB",
            });
        }
        Ok(args)
    }
}

/// The run token in `cmdline`, if a valid one is there, found without
/// parsing the rest (so that a bootargs error can still be reported with
/// it).
#[must_use]
pub fn run_token(cmdline: &str) -> Option<RunToken> {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix("run.token="))
        .and_then(RunToken::parse)
}

/// The value of `linux.append=` in `cmdline`, still percent-encoded: extra
/// kernel command-line words for a Linux guest (a space is `%20`, a `%` is
/// `%25`; bootargs are split at spaces). The last one wins.
#[must_use]
pub fn linux_append(cmdline: &str) -> Option<&str> {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix("linux.append="))
}

/// Whether `s` is printable ASCII without spaces whose every `%` starts a
/// two-hex-digit escape.
fn is_percent_encoded(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let escape = b.get(i + 1..i + 3);
                if !escape.is_some_and(|e| e.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' => i += 1,
            _ => return false,
        }
    }
    true
}

/// Decodes a percent-encoded value (see [`linux_append`]); `None` if it is
/// not one, or decodes to something other than printable ASCII.
#[must_use]
pub fn percent_decode(s: &str) -> Option<alloc::string::String> {
    if !is_percent_encoded(s) {
        return None;
    }
    let b = s.as_bytes();
    let mut out = alloc::string::String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = core::str::from_utf8(&b[i + 1..i + 3]).ok()?;
            let c = u8::from_str_radix(hex, 16).ok()?;
            if !(b' '..=b'~').contains(&c) {
                return None;
            }
            out.push(char::from(c));
            i += 3;
        } else {
            out.push(char::from(b[i]));
            i += 1;
        }
    }
    Some(out)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

/// Parses a decimal or `0x` hexadecimal number (`_` separators allowed in
/// hex). Runs before the heap exists: no allocation.
fn parse_number(s: &str) -> Option<usize> {
    let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) else {
        return s.parse().ok();
    };
    let mut value: usize = 0;
    let mut digits = 0;
    for c in hex.chars().filter(|&c| c != '_') {
        value = value
            .checked_mul(16)?
            .checked_add(c.to_digit(16)? as usize)?;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_gives_defaults() {
        assert_eq!(BootArgs::parse(""), Ok(BootArgs::default()));
    }

    #[test]
    fn parses_every_key() {
        let a = BootArgs::parse(
            "log=debug payload=0x4900_0000 guest.ram_mib=64 guest.fail=1 mm.guard=1",
        )
        .expect("valid");
        assert!(a.guard);
        assert!(BootArgs::default().guard, "guard mode is on by default");
        assert!(!BootArgs::parse("mm.guard=0").expect("valid").guard);
        let b = BootArgs::parse("guest.populate=boot guest.fault_around_kib=0").expect("valid");
        assert!(b.populate_at_boot);
        assert_eq!(b.fault_around_kib, 0);
        assert!(BootArgs::parse("guest.populate=lazy").is_err());
        assert!(BootArgs::parse("guest.fault_around_kib=3").is_err());
        assert!(
            BootArgs::parse("guest.uart=passthrough")
                .expect("valid")
                .uart_passthrough
        );
        assert!(!BootArgs::default().uart_passthrough);
        assert_eq!(a.log, LevelFilter::Debug);
        assert_eq!(a.payload, PhysAddr(0x4900_0000));
        assert_eq!(a.guest_ram_mib, 64);
        assert_eq!(a.guest_flags, guest_flags::FAIL);
    }

    #[test]
    fn rejects_unknown_malformed_and_bad_values() {
        assert_eq!(
            BootArgs::parse("lg=info"),
            Err(BootArgsError::UnknownKey("lg"))
        );
        assert_eq!(
            BootArgs::parse("quiet"),
            Err(BootArgsError::NotKeyValue("quiet"))
        );
        assert_eq!(
            BootArgs::parse("log=loud"),
            Err(BootArgsError::BadValue {
                key: "log",
                value: "loud"
            })
        );
        assert!(BootArgs::parse("guest.ram_mib=0").is_err());
        assert!(BootArgs::parse("guest.fail=yes").is_err());
        assert!(BootArgs::parse("payload=0xzz").is_err());
        assert!(BootArgs::parse("run.token=").is_err());
        assert!(BootArgs::parse("run.token=xyz").is_err());
        assert!(BootArgs::parse(&format!("run.token={}", "a".repeat(33))).is_err());
        assert!(BootArgs::parse("test.hypercalls=yes").is_err());
    }

    #[test]
    fn linux_append_is_percent_encoded() {
        let line = "log=info linux.append=quiet%20loglevel=3%20x%25y guest.kind=linux";
        assert!(BootArgs::parse(line).is_ok());
        let raw = linux_append(line).expect("present");
        assert_eq!(raw, "quiet%20loglevel=3%20x%25y");
        assert_eq!(percent_decode(raw).as_deref(), Some("quiet loglevel=3 x%y"));
        for bad in ["a%2", "a%zz", "a%", "%0a"] {
            assert!(
                BootArgs::parse(&format!("linux.append={bad}")).is_err()
                    || percent_decode(bad).is_none(),
                "{bad}"
            );
        }
        assert_eq!(percent_decode("%0a"), None, "no control characters");
        assert!(BootArgs::parse("linux.append=a%2").is_err());
        assert_eq!(linux_append("log=info"), None);
    }

    #[test]
    fn token_is_kept_but_never_shown_and_test_calls_default_off() {
        let a = BootArgs::parse("run.token=0123456789abcdef0123456789ABCDEF test.hypercalls=1")
            .expect("valid");
        assert_eq!(a.run_token.as_str(), "0123456789abcdef0123456789ABCDEF");
        assert!(a.test_hypercalls);
        let shown = alloc::format!("{a:?}");
        assert!(!shown.contains("0123456789"), "{shown}");
        assert!(shown.contains("<hidden>"), "{shown}");
        assert_eq!(
            run_token("bad=key run.token=abc").map(|t| t.as_str().to_owned()),
            Some("abc".into())
        );
        assert_eq!(run_token("run.token=xyz"), None);
        let d = BootArgs::default();
        assert!(!d.test_hypercalls);
        assert_eq!(d.run_token.as_str(), "");
    }
}
