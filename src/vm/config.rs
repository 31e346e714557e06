//! Which VMs to run: the `vms=` boot argument.
//!
//! `vms=KIND:CPUS:RAM_MIB[,KIND:CPUS:RAM_MIB...]`, e.g.
//! `vms=test:0:128,linux:1-2:512`: the test guest on physical CPU 0 with
//! 128 MiB, Linux with two vCPUs on CPUs 1 and 2 and 512 MiB. Each VM's
//! vCPU i runs on the i-th CPU of its range (static partitioning, as Bao and
//! Jailhouse do). Ranges may not overlap; at most one Linux VM (there is one
//! kernel payload and one initramfs).

use core::ops::Range;

/// Most VMs at once.
pub const MAX_VMS: usize = 4;

/// Most physical CPUs a configuration may name.
pub const MAX_CPUS: usize = 8;

/// What a VM runs.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum VmKind {
    /// The bundled test guest (its ELF payload).
    Test,
    /// An arm64 Linux Image with the initramfs.
    Linux,
}

impl VmKind {
    /// The name used in `vms=` and in the verdict.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Test => "test",
            Self::Linux => "linux",
        }
    }
}

/// One VM of the configuration.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct VmSpec {
    /// What it runs.
    pub kind: VmKind,
    /// First physical CPU; vCPU i runs on CPU `first_cpu + i`.
    pub first_cpu: usize,
    /// vCPUs (and so physical CPUs).
    pub vcpus: usize,
    /// Guest RAM in MiB.
    pub ram_mib: usize,
}

impl VmSpec {
    /// The physical CPUs it runs on.
    #[must_use]
    pub const fn cpus(&self) -> Range<usize> {
        self.first_cpu..self.first_cpu + self.vcpus
    }
}

/// The VMs to run, in order (VM 1 first).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct VmConfig {
    vms: [Option<VmSpec>; MAX_VMS],
}

/// Why a `vms=` value is refused.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ConfigError {
    /// A VM is not `KIND:CPUS:RAM_MIB`.
    Malformed,
    /// A kind other than `test` or `linux`.
    UnknownKind,
    /// A CPU range that is empty, reversed or beyond [`MAX_CPUS`].
    BadCpus,
    /// Two VMs share a CPU.
    Overlap,
    /// RAM of 0 or over 4096 MiB.
    BadRam,
    /// More than [`MAX_VMS`] VMs, or none.
    Count,
    /// More than one Linux VM.
    TwoLinux,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Malformed => "a VM is not KIND:CPUS:RAM_MIB (e.g. test:0:128,linux:1-2:512)",
            Self::UnknownKind => "a VM kind is neither `test` nor `linux`",
            Self::BadCpus => "a CPU range is empty, reversed or beyond CPU 7",
            Self::Overlap => "two VMs share a physical CPU",
            Self::BadRam => "a VM's RAM is 0 or above 4096 MiB",
            Self::Count => "between 1 and 4 VMs",
            Self::TwoLinux => "at most one Linux VM",
        })
    }
}

fn number(s: &str) -> Result<usize, ConfigError> {
    s.parse().map_err(|_| ConfigError::Malformed)
}

impl VmConfig {
    /// One VM.
    #[must_use]
    pub fn single(spec: VmSpec) -> Self {
        let mut vms = [None; MAX_VMS];
        vms[0] = Some(spec);
        Self { vms }
    }

    /// Parses a `vms=` value.
    ///
    /// # Errors
    /// What is wrong with it ([`ConfigError`]).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let mut vms = [None; MAX_VMS];
        for (n, vm) in s.split(',').enumerate() {
            if n == MAX_VMS {
                return Err(ConfigError::Count);
            }
            let mut fields = vm.split(':');
            let (Some(kind), Some(cpus), Some(ram), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(ConfigError::Malformed);
            };
            let kind = match kind {
                "test" => VmKind::Test,
                "linux" => VmKind::Linux,
                _ => return Err(ConfigError::UnknownKind),
            };
            let (first, last) = match cpus.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => (number(cpus)?, number(cpus)?),
            };
            if first > last || last >= MAX_CPUS {
                return Err(ConfigError::BadCpus);
            }
            let ram_mib = number(ram)?;
            if ram_mib == 0 || ram_mib > 4096 {
                return Err(ConfigError::BadRam);
            }
            vms[n] = Some(VmSpec {
                kind,
                first_cpu: first,
                vcpus: last - first + 1,
                ram_mib,
            });
        }
        // No heap here: boot arguments are parsed before the heap exists.
        let config = Self { vms };
        for (i, a) in config.iter().enumerate() {
            for b in config.iter().skip(i + 1) {
                if a.cpus().start < b.cpus().end && b.cpus().start < a.cpus().end {
                    return Err(ConfigError::Overlap);
                }
            }
        }
        if config.iter().filter(|v| v.kind == VmKind::Linux).count() > 1 {
            return Err(ConfigError::TwoLinux);
        }
        Ok(config)
    }

    /// The VMs, VM 1 first.
    pub fn iter(&self) -> impl Iterator<Item = VmSpec> + '_ {
        self.vms.iter().flatten().copied()
    }

    /// How many VMs.
    #[must_use]
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any VM is of `kind`.
    #[must_use]
    pub fn has(&self, kind: VmKind) -> bool {
        self.iter().any(|v| v.kind == kind)
    }

    /// The physical CPUs the VMs need: one past the highest.
    #[must_use]
    pub fn cpus_needed(&self) -> usize {
        self.iter().map(|v| v.cpus().end).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_readme_example() {
        let c = VmConfig::parse("test:0:128,linux:1-2:512").expect("valid");
        let v: alloc::vec::Vec<VmSpec> = c.iter().collect();
        assert_eq!(
            v,
            [
                VmSpec {
                    kind: VmKind::Test,
                    first_cpu: 0,
                    vcpus: 1,
                    ram_mib: 128
                },
                VmSpec {
                    kind: VmKind::Linux,
                    first_cpu: 1,
                    vcpus: 2,
                    ram_mib: 512
                }
            ]
        );
        assert_eq!(c.cpus_needed(), 3);
        assert!(c.has(VmKind::Linux));
    }

    #[test]
    fn refuses_what_cannot_run() {
        use ConfigError as E;
        for (s, e) in [
            ("test:0", E::Malformed),
            ("test:0:128:9", E::Malformed),
            ("bsd:0:128", E::UnknownKind),
            ("test:2-1:128", E::BadCpus),
            ("test:8:128", E::BadCpus),
            ("test:x:128", E::Malformed),
            ("test:0:0", E::BadRam),
            ("test:0:5000", E::BadRam),
            ("test:0-1:64,test:1:64", E::Overlap),
            ("linux:0:64,linux:1:64", E::TwoLinux),
            ("test:0:8,test:1:8,test:2:8,test:3:8,test:4:8", E::Count),
            ("", E::Malformed),
        ] {
            assert_eq!(VmConfig::parse(s), Err(e), "{s}");
        }
        assert!(VmConfig::parse("test:0:8,test:1:8,test:2:8,test:3:8").is_ok());
    }
}
