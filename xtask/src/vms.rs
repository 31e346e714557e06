//! Several VMs side by side (`cargo xtask vms`): the hypervisor's `vms=`
//! boot argument, the payloads each kind needs, and a verdict per VM.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::linux::INITRD_ADDR;
use crate::{Artifacts, PAYLOAD_ADDR, RunOptions, RunOutcome, run};

/// The README's example: the test guest on CPU 0, Linux with 2 vCPUs on
/// CPUs 1 and 2.
pub const DEFAULT_CONFIG: &str = "test:0:256,linux:1-2:256";

/// Where the test guest's ELF goes when the Linux Image takes
/// [`PAYLOAD_ADDR`] (the Image is about 35 MiB in memory; the initramfs is
/// at [`INITRD_ADDR`]).
pub const TEST_PAYLOAD_ADDR: u64 = 0x4b00_0000;

/// One VM of a `vms=` value, as xtask needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPlan {
    /// `test` or `linux`.
    pub kind: String,
    /// Its vCPUs.
    pub vcpus: usize,
    /// One past its highest CPU.
    pub cpu_end: usize,
}

/// Reads a `vms=` value (the hypervisor checks it in full; this only needs
/// the kinds and CPUs).
///
/// # Errors
///
/// If a VM is not `KIND:FIRST[-LAST]:RAM_MIB`.
pub fn plan(config: &str) -> Result<Vec<VmPlan>> {
    config
        .split(',')
        .map(|vm| {
            let f: Vec<&str> = vm.split(':').collect();
            let [kind, cpus, _ram] = f[..] else {
                bail!("`{vm}` is not KIND:CPUS:RAM_MIB");
            };
            let (a, b) = cpus.split_once('-').unwrap_or((cpus, cpus));
            let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
            if b < a {
                bail!("`{cpus}`: reversed CPU range");
            }
            Ok(VmPlan {
                kind: kind.to_owned(),
                vcpus: b - a + 1,
                cpu_end: b + 1,
            })
        })
        .collect()
}

/// Boots the VMs of `config`: the test guest's ELF (and, with a Linux VM,
/// `kernel` and `initrd`) loaded where the hypervisor's bootargs say; as
/// many QEMU CPUs as the VMs use.
///
/// # Errors
///
/// A bad `config`, a Linux VM without a kernel, or QEMU failing to run.
pub fn boot(
    artifacts: &Artifacts,
    linux: Option<(&Path, &Path)>,
    config: &str,
    timeout: Duration,
    echo: bool,
    extra_bootargs: &[String],
) -> Result<RunOutcome> {
    let vms = plan(config)?;
    let smp = vms.iter().map(|v| v.cpu_end).max().unwrap_or(1);
    let has_linux = vms.iter().any(|v| v.kind == "linux");
    let mut bootargs = vec![format!("vms={config}")];
    let mut extra_qemu_args = Vec::new();
    let mut artifacts = artifacts.clone();
    if has_linux {
        let Some((kernel, initrd)) = linux else {
            bail!("a Linux VM needs the kernel and initramfs");
        };
        let size = std::fs::metadata(initrd)?.len();
        // The kernel at PAYLOAD_ADDR (qemu_args loads `artifacts.guest`
        // there), the test guest above it.
        extra_qemu_args.extend([
            "-device".to_owned(),
            format!(
                "loader,file={},addr={TEST_PAYLOAD_ADDR:#x},force-raw=on",
                artifacts.guest.display()
            ),
            "-device".to_owned(),
            format!(
                "loader,file={},addr={INITRD_ADDR:#x},force-raw=on",
                initrd.display()
            ),
        ]);
        artifacts.guest = kernel.to_path_buf();
        bootargs.extend([
            format!("payload={TEST_PAYLOAD_ADDR:#x}"),
            format!("linux.payload={PAYLOAD_ADDR}"),
            format!("linux.initrd={INITRD_ADDR:#x}"),
            format!("linux.initrd_size={size}"),
        ]);
    }
    bootargs.extend(extra_bootargs.iter().cloned());
    let opts = RunOptions {
        timeout,
        bootargs,
        extra_qemu_args,
        echo,
        // Answered for test VMs only: the hypervisor never gives a Linux
        // VM the test hypercalls.
        test_hypercalls: true,
        console_input: if has_linux {
            crate::linux::console_input()
        } else {
            Vec::new()
        },
        smp,
        ..RunOptions::default()
    };
    run(&artifacts, &opts)
}

/// The lines VM `vm` (1 first) printed, without their `vm<N>| ` prefix.
#[must_use]
pub fn vm_output(output: &str, vm: usize) -> String {
    let prefix = format!("vm{vm}| ");
    output
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .fold(String::new(), |mut s, l| {
            s.push_str(l);
            s.push('\n');
            s
        })
}

/// The verdict of each VM of `config` in `outcome`: a line per VM, or what
/// went wrong. A test VM passes with its tests reported and none failed;
/// the Linux VM as `cargo xtask linux` judges its output.
///
/// # Errors
///
/// The first VM (or the run) that did not pass.
pub fn judge(outcome: &RunOutcome, config: &str) -> Result<Vec<String>, String> {
    let vms = plan(config).map_err(|e| e.to_string())?;
    if outcome.timed_out {
        return Err(format!(
            "timed out after {:.0} s",
            outcome.elapsed.as_secs_f64()
        ));
    }
    if let Some(p) = &outcome.panic {
        return Err(format!("hypervisor panic: {p}"));
    }
    let mut lines = Vec::new();
    for (i, plan) in vms.iter().enumerate() {
        let n = i + 1;
        let marker = outcome
            .vms
            .iter()
            .find(|m| m.vm == n)
            .ok_or_else(|| format!("vm{n}: no LAZYHYP-VM verdict"))?;
        if marker.kind != plan.kind {
            return Err(format!(
                "vm{n}: ran {} instead of {}",
                marker.kind, plan.kind
            ));
        }
        if marker.status != 0 {
            return Err(format!(
                "vm{n} ({}): status {} ({})",
                marker.kind, marker.status, marker.reason
            ));
        }
        if plan.kind == "test" {
            if marker.passed == 0 || marker.failed != 0 {
                return Err(format!(
                    "vm{n}: {} passed, {} failed",
                    marker.passed, marker.failed
                ));
            }
            lines.push(format!(
                "vm{n}: test guest, {} vCPU(s): {} tests passed",
                plan.vcpus, marker.passed
            ));
        } else {
            crate::linux::judge_output(&vm_output(&outcome.output, n), plan.vcpus)
                .map_err(|e| format!("vm{n} (linux): {e}"))?;
            lines.push(format!(
                "vm{n}: Linux, {} vCPUs: booted, ran its init, powered off",
                plan.vcpus
            ));
        }
    }
    if outcome.exit.as_ref().map(|e| e.code) != Some(0) {
        return Err("the run did not end with status 0".to_owned());
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_the_default_config() {
        let p = plan(DEFAULT_CONFIG).expect("the default parses");
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].kind.as_str(), p[0].vcpus, p[0].cpu_end),
            ("test", 1, 1)
        );
        assert_eq!(
            (p[1].kind.as_str(), p[1].vcpus, p[1].cpu_end),
            ("linux", 2, 3)
        );
        assert!(plan("test:0").is_err());
        assert!(plan("test:2-1:64").is_err());
    }

    #[test]
    fn vm_output_keeps_one_vms_lines() {
        let out = "vm1| a\nvm2| b\nLAZYHYP-X\nvm2| c\n";
        assert_eq!(vm_output(out, 2), "b\nc\n");
        assert_eq!(vm_output(out, 1), "a\n");
    }
}
