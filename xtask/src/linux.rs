//! `cargo xtask linux`: boot Debian's arm64 kernel under lazyhyp with a small
//! initramfs (busybox), built here as a newc cpio archive (no host `cpio`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Artifacts, RunOptions, RunOutcome, run, run_with_input, run_with_timeout, target_dir};

/// Where the initramfs is loaded (physical; must not overlap the kernel at
/// `PAYLOAD_ADDR`, whose Debian image is about 35 MiB in memory).
pub const INITRD_ADDR: u64 = 0x4c00_0000;

/// Markers the initramfs prints.
pub const START_MARKER: &str = "LINUX-INIT-START";
/// Printed when `/init` waits for a console line.
pub const RX_READY_MARKER: &str = "LINUX-RX-READY";
/// The line xtask types then, and what `/init` prints when it read it.
pub const RX_LINE: &str = "lazyhyp-rx-ok";
/// The console input of a Linux run: [`RX_LINE`] once `/init` is ready.
#[must_use]
pub fn console_input() -> Vec<(String, Vec<u8>)> {
    vec![(
        RX_READY_MARKER.to_owned(),
        format!("{RX_LINE}\n").into_bytes(),
    )]
}
/// Printed after the four writers (16 MiB each, in parallel) wrote and
/// read back their files.
pub const END_MARKER: &str = "LINUX-INIT-END";

/// The `/init` of the initramfs.
pub const INIT_SCRIPT: &str = "#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t tmpfs -o size=96m tmpfs /tmp
echo LINUX-INIT-START
if /bin/busybox grep -q lazyhyp.reboot_test /proc/cmdline && ! /bin/busybox grep -q lazyhyp.resets= /proc/cmdline; then echo LINUX-REBOOTING; /bin/busybox reboot -f; fi
/bin/busybox grep MemTotal /proc/meminfo
echo LINUX-CPUS: $(/bin/busybox grep -c ^processor /proc/cpuinfo)
for i in 1 2 3 4; do
  ( /bin/busybox yes lazyhyp$i | /bin/busybox head -c 16777216 > /tmp/blob$i &&
    /bin/busybox yes lazyhyp$i | /bin/busybox head -c 16777216 | /bin/busybox cmp - /tmp/blob$i &&
    /bin/busybox touch /tmp/ok$i ) &
done
wait
if [ -e /tmp/ok1 ] && [ -e /tmp/ok2 ] && [ -e /tmp/ok3 ] && [ -e /tmp/ok4 ]; then echo LINUX-INIT-END; else echo LINUX-INIT-FAILED; fi
echo LINUX-RX-READY
if read -t 60 line; then echo \"LINUX-RX-GOT:$line\"; else echo LINUX-RX-NOTHING; fi
echo LINUX-INTERRUPTS-START
/bin/busybox cat /proc/interrupts
echo LINUX-INTERRUPTS-END
/bin/busybox poweroff -f
";

/// One file of a newc archive.
struct Entry<'a> {
    name: &'a str,
    mode: u32,
    data: &'a [u8],
    rdev: (u32, u32),
}

/// One archive member: name, mode, contents, device (major, minor).
pub type Member<'a> = (&'a str, u32, &'a [u8], (u32, u32));

/// Writes a newc ("070701") cpio archive.
#[must_use]
pub fn newc(entries: &[Member<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let pad = |out: &mut Vec<u8>| {
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    };
    let entries = entries
        .iter()
        .map(|&(name, mode, data, rdev)| Entry {
            name,
            mode,
            data,
            rdev,
        })
        .chain(std::iter::once(Entry {
            name: "TRAILER!!!",
            mode: 0,
            data: &[],
            rdev: (0, 0),
        }));
    for (ino, e) in entries.enumerate() {
        let fields = [
            ino as u32 + 1,
            e.mode,
            0,
            0,
            if e.mode & 0o040_000 != 0 { 2 } else { 1 },
            0,
            e.data.len() as u32,
            0,
            0,
            e.rdev.0,
            e.rdev.1,
            e.name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(e.name.as_bytes());
        out.push(0);
        pad(&mut out);
        out.extend_from_slice(e.data);
        pad(&mut out);
    }
    out
}

/// The initramfs: `/init`, `/bin/busybox`, `/dev/console`, `/dev/null`,
/// mount points. `/init` writes 64 MiB to tmpfs (memory the guest was not
/// given at boot: it is demand-populated) and reads it back.
#[must_use]
pub fn initramfs(busybox: &[u8]) -> Vec<u8> {
    const DIR: u32 = 0o040_755;
    const EXE: u32 = 0o100_755;
    const CHR: u32 = 0o020_600;
    newc(&[
        ("bin", DIR, &[], (0, 0)),
        ("dev", DIR, &[], (0, 0)),
        ("proc", DIR, &[], (0, 0)),
        ("sys", DIR, &[], (0, 0)),
        ("tmp", DIR, &[], (0, 0)),
        ("dev/console", CHR, &[], (5, 1)),
        ("dev/null", 0o020_666, &[], (1, 3)),
        ("bin/busybox", EXE, busybox, (0, 0)),
        ("init", EXE, INIT_SCRIPT.as_bytes(), (0, 0)),
    ])
}

fn sh(cmd: &mut Command, what: &str) -> Result<String> {
    let out = run_with_timeout(
        std::mem::replace(cmd, Command::new("true")),
        Some(Duration::from_mins(10)),
        false,
    )
    .with_context(|| format!("running {what}"))?;
    if out.timed_out || !out.status.success() {
        bail!("{what} failed:\n{}", out.output);
    }
    Ok(out.output)
}

/// Fetches Debian's arm64 cloud kernel and busybox-static with `apt-get
/// download`, unpacks them, and builds the initramfs; cached under
/// `target/linux`. Returns (kernel Image, initramfs).
///
/// # Errors
///
/// If this is not Debian as root, or a step fails.
pub fn fetch() -> Result<(PathBuf, PathBuf)> {
    // One fetch at a time in this process: the integration tests that boot
    // Linux run in parallel threads, and two `apt-get` runs at once fail
    // on apt's lock (and two writers would race on the cache).
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FETCHING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = target_dir().join("linux");
    let (image, initrd) = (dir.join("Image"), dir.join("initramfs.cpio"));
    let busybox_copy = dir.join("busybox");
    let cached_busybox = [
        busybox_copy.clone(),
        dir.join("root/bin/busybox"),
        dir.join("root/usr/bin/busybox"),
    ]
    .into_iter()
    .find(|p| p.exists());
    if let Some(busybox) = cached_busybox.filter(|_| image.exists()) {
        // The initramfs is rebuilt every time (cheap), so a changed
        // `/init` is always the one that runs.
        std::fs::write(&initrd, initramfs(&std::fs::read(busybox)?))?;
        return Ok((image, initrd));
    }
    std::fs::create_dir_all(&dir)?;
    let root = sh(Command::new("id").arg("-u"), "id -u")?.trim() == "0";
    if !root || !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "fetching the kernel needs Debian as root; or pass --kernel and --initrd, or run:\n  \
             dpkg --add-architecture arm64 && apt-get update && apt-get download \
             linux-image-<version>-cloud-arm64:arm64 busybox-static:arm64"
        );
    }
    println!(
        "xtask linux: fetching Debian's arm64 kernel and busybox-static with apt-get download"
    );
    sh(
        Command::new("dpkg").args(["--add-architecture", "arm64"]),
        "dpkg --add-architecture arm64",
    )?;
    sh(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get update",
    )?;
    let list = sh(
        Command::new("apt-cache").args([
            "search",
            "--names-only",
            "^linux-image-[0-9].*-cloud-arm64$",
        ]),
        "apt-cache search",
    )?;
    let mut names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    names.sort_by_key(|n| version_key(n));
    let kernel_pkg = names
        .last()
        .context("no linux-image-*-cloud-arm64 package found")?;
    sh(
        Command::new("apt-get").current_dir(&dir).args([
            "download",
            &format!("{kernel_pkg}:arm64"),
            "busybox-static:arm64",
        ]),
        "apt-get download",
    )?;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            sh(
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&path)
                    .arg(dir.join("root")),
                "dpkg-deb -x",
            )?;
        }
    }
    let boot = dir.join("root/boot");
    let vmlinuz = std::fs::read_dir(&boot)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    std::fs::copy(&vmlinuz, &image)?;
    let busybox = std::fs::read(dir.join("root/bin/busybox"))
        .or_else(|_| std::fs::read(dir.join("root/usr/bin/busybox")))
        .context("no busybox in busybox-static")?;
    std::fs::write(&busybox_copy, &busybox)?;
    std::fs::write(&initrd, initramfs(&busybox))?;
    Ok((image, initrd))
}

/// Sort key for package names by their numeric version parts.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The default time limit of a Linux run: generous enough for a loaded
/// 2-core CI machine (TCG's time for the 64 MiB write-and-compare alone
/// varies from 15 s to 75 s there).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_mins(10);

/// Percent-encodes extra kernel command-line words for the hypervisor's
/// `linux.append=` bootarg (bootargs are split at spaces).
#[must_use]
pub fn encode_append(words: &str) -> String {
    let mut out = String::new();
    for c in words.trim().chars() {
        match c {
            ' ' => out.push_str("%20"),
            '%' => out.push_str("%25"),
            c if c.is_ascii_graphic() => out.push(c),
            // Anything else (tabs, newlines, non-ASCII) would not survive
            // the bootargs: drop it, visibly.
            _ => out.push_str("%3F"),
        }
    }
    out
}

/// Boots `kernel` with `initrd` under the hypervisor; `append` adds kernel
/// command-line words after the hypervisor's own (empty: none).
///
/// # Errors
///
/// If QEMU cannot run.
pub fn boot(
    hypervisor: &Path,
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
    echo: bool,
    append: &str,
    smp: usize,
) -> Result<RunOutcome> {
    let size = std::fs::metadata(initrd)?.len();
    let artifacts = Artifacts {
        hypervisor: hypervisor.to_path_buf(),
        guest: kernel.to_path_buf(),
    };
    let opts = RunOptions {
        timeout,
        bootargs: {
            let mut b = vec![
                "guest.kind=linux".to_owned(),
                format!("linux.initrd={INITRD_ADDR:#x}"),
                format!("linux.initrd_size={size}"),
            ];
            if !append.trim().is_empty() {
                b.push(format!("linux.append={}", encode_append(append)));
            }
            b
        },
        extra_qemu_args: vec![
            "-device".to_owned(),
            format!(
                "loader,file={},addr={INITRD_ADDR:#x},force-raw=on",
                initrd.display()
            ),
        ],
        echo,
        test_hypercalls: false,
        console_input: console_input(),
        smp,
        ..RunOptions::default()
    };
    run(&artifacts, &opts)
}

/// The kernel command line (as the hypervisor gives it, for the bare run).
pub const CMDLINE: &str = "console=ttyAMA0 earlycon=pl011,0x9000000 panic=-1 rdinit=/init";

/// Wall and CPU time of one run to power-off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Wall time.
    pub wall: Duration,
    /// QEMU's CPU time (user + system).
    pub cpu: Duration,
}

/// Boots `kernel` with `initrd` on bare QEMU (no hypervisor), with the same
/// CPU options, as much RAM as the hypervisor gives the guest, the same
/// command line (ours, then `append`) and the same console input.
///
/// # Errors
///
/// If QEMU cannot run, or the run does not reach the end marker.
pub fn bare_boot(
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
    append: &str,
    smp: usize,
) -> Result<Sample> {
    let mut cmd = Command::new(crate::QEMU);
    let cmdline = if append.trim().is_empty() {
        CMDLINE.to_owned()
    } else {
        format!("{CMDLINE} {}", append.trim())
    };
    cmd.args([
        "-M",
        "virt,gic-version=3",
        "-cpu",
        "max,sve=off,sme=off",
        "-smp",
        &smp.to_string(),
        "-m",
        "256M",
    ])
    .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(cmdline);
    let out = run_with_input(cmd, Some(timeout), false, &console_input())?;
    if out.timed_out || !out.output.contains(END_MARKER) {
        bail!("bare QEMU run did not reach {END_MARKER}:\n{}", out.output);
    }
    Ok(Sample {
        wall: out.elapsed,
        cpu: out.cpu,
    })
}

/// Median of a few durations.
#[must_use]
pub fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d.get(d.len() / 2).copied().unwrap_or_default()
}

/// Median, minimum and maximum of a few durations, in seconds.
#[must_use]
pub fn spread(d: &[Duration]) -> (f64, f64, f64) {
    let secs: Vec<f64> = d.iter().map(Duration::as_secs_f64).collect();
    let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = secs.iter().copied().fold(0.0, f64::max);
    (median(d.to_vec()).as_secs_f64(), min, max)
}

/// The run's guest exits per second of wall time, by kind (the `exits_*`
/// counters and the emulated accesses), as one line.
#[must_use]
pub fn exit_rates(outcome: &RunOutcome) -> String {
    let secs = outcome.elapsed.as_secs_f64().max(f64::EPSILON);
    let mut line = String::from("exits per second:");
    for (k, v) in outcome.stats.iter().flatten() {
        if k.starts_with("exits_") || k == "mmio_emulated" || k == "sysreg_emulated" {
            let n: f64 = v.parse().unwrap_or(0.0);
            let _ = std::fmt::Write::write_fmt(&mut line, format_args!(" {k}={:.0}", n / secs));
        }
    }
    line
}

/// Each vCPU's exits in the run, from the hypervisor's `LAZYHYP-CPU`
/// markers, one line a vCPU: `vm1 vCPU 0 (CPU 0): exits_dabt=... ...`.
#[must_use]
pub fn exits_per_vcpu(outcome: &RunOutcome) -> Vec<String> {
    outcome
        .markers
        .iter()
        .filter(|(kind, _)| kind == "CPU")
        .map(|(_, rest)| {
            let mut cpu = "";
            let mut vm = "";
            let mut vcpu = "";
            let mut counts = Vec::new();
            for (k, v) in rest.split_whitespace().filter_map(|t| t.split_once('=')) {
                match k {
                    "cpu" => cpu = v,
                    "vm" => vm = v,
                    "vcpu" => vcpu = v,
                    _ => counts.push(format!("{k}={v}")),
                }
            }
            format!("vm{vm} vCPU {vcpu} (CPU {cpu}): {}", counts.join(" "))
        })
        .collect()
}

/// Where a Linux run was when it stopped printing: the last phase marker.
#[must_use]
pub fn phase(output: &str) -> &'static str {
    let last = |m: &str| output.rfind(m);
    let phases = [
        (
            START_MARKER,
            "init: the four parallel 16 MiB tmpfs writers and compares",
        ),
        (END_MARKER, "init: waiting for the console line"),
        (RX_READY_MARKER, "init: waiting for the console line"),
        (
            "LINUX-RX-GOT",
            "init: printing /proc/interrupts and powering off",
        ),
        ("LINUX-INTERRUPTS-END", "power-off"),
    ];
    phases
        .iter()
        .filter_map(|(m, what)| last(m).map(|at| (at, *what)))
        .max_by_key(|(at, _)| *at)
        .map_or(
            "kernel boot (before /init printed anything)",
            |(_, what)| what,
        )
}

/// Whether a Linux run reached the init's end marker and powered off cleanly.
///
/// # Errors
///
/// What went wrong with the run.
pub fn judge(outcome: &RunOutcome, smp: usize) -> Result<(), String> {
    if outcome.timed_out {
        return Err(format!(
            "timed out after {:.0} s, in phase: {} (raise --timeout on a slow machine)",
            outcome.elapsed.as_secs_f64(),
            phase(&outcome.output)
        ));
    }
    if let Some(p) = &outcome.panic {
        return Err(format!("hypervisor panic: {p}"));
    }
    judge_output(&outcome.output, smp)?;
    if outcome.exit_code != Some(0) || outcome.exit.as_ref().map(|e| e.code) != Some(0) {
        return Err(format!(
            "no clean power-off (QEMU exit code {:?})",
            outcome.exit_code
        ));
    }
    Ok(())
}

/// What the Linux guest printed (its console lines, prefix or not): the
/// init's markers, `smp` CPUs, timer and UART interrupts, the console line
/// read back.
///
/// # Errors
///
/// What is missing.
pub fn judge_output(output: &str, smp: usize) -> Result<(), String> {
    for marker in [START_MARKER, "MemTotal:", END_MARKER] {
        if !output.contains(marker) {
            return Err(format!("no `{marker}` in the output"));
        }
    }
    // Every vCPU came up (PSCI CPU_ON through the hypervisor).
    let cpus = format!("LINUX-CPUS: {smp}\n");
    if !output.replace('\r', "").contains(&cpus) {
        return Err(format!(
            "/proc/cpuinfo does not show {smp} CPUs (want the line `{}`)",
            cpus.trim_end()
        ));
    }
    // The guest's interrupts arrived through the virtual GIC: the arch
    // timer's count in /proc/interrupts is not zero.
    if interrupt_count(output, "arch_timer") == 0 {
        return Err("no arch_timer interrupts in /proc/interrupts".to_owned());
    }
    // The console works both ways: the line xtask typed reached `/init`
    // through the (emulated) UART's receive path and its interrupt.
    if !output.contains(&format!("LINUX-RX-GOT:{RX_LINE}")) {
        return Err(format!("`/init` did not read the console line `{RX_LINE}`"));
    }
    if interrupt_count(output, "uart-pl011") == 0 {
        return Err("no uart-pl011 interrupts in /proc/interrupts".to_owned());
    }
    Ok(())
}

/// The total count, over all CPUs, of the `/proc/interrupts` line the
/// guest printed whose name contains `name` (0 if none).
#[must_use]
pub fn interrupt_count(output: &str, name: &str) -> u64 {
    let Some(table) = output
        .split("LINUX-INTERRUPTS-START")
        .nth(1)
        .and_then(|s| s.split("LINUX-INTERRUPTS-END").next())
    else {
        return 0;
    };
    table
        .lines()
        .filter(|l| l.contains(name))
        .map(|l| {
            // "  11:       1234   GICv3  27 Level     arch_timer": the
            // numbers after the first colon, up to the first word.
            l.split_once(':').map_or(0, |(_, rest)| {
                rest.split_whitespace()
                    .map_while(|w| w.parse::<u64>().ok())
                    .sum()
            })
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_is_percent_encoded_and_phases_are_named() {
        assert_eq!(
            encode_append(" quiet  loglevel=3%\t"),
            "quiet%20%20loglevel=3%25"
        );
        assert!(phase("booting...").starts_with("kernel boot"));
        assert!(phase("LINUX-INIT-START\n").contains("parallel 16 MiB"));
        assert!(
            phase("LINUX-INIT-START\nLINUX-INIT-END\nLINUX-RX-READY\n").contains("console line")
        );
        let (m, lo, hi) = spread(&[
            Duration::from_secs(3),
            Duration::from_secs(1),
            Duration::from_secs(2),
        ]);
        assert_eq!((m, lo, hi), (2.0, 1.0, 3.0));
    }

    #[test]
    fn exits_per_vcpu_from_the_cpu_markers() {
        let out = "LAZYHYP-CPU: token=t cpu=1 vm=1 vcpu=1 exits_hvc=2 exits_dabt=30\n\
                   vm1| LAZYHYP-CPU: token=t cpu=9 vm=1 vcpu=9 exits_hvc=666\n";
        let o = RunOutcome::from_output(out.into(), Some(0), false, Duration::ZERO, "t");
        assert_eq!(
            exits_per_vcpu(&o),
            ["vm1 vCPU 1 (CPU 1): exits_hvc=2 exits_dabt=30"],
            "a guest's imitation is not believed"
        );
    }

    #[test]
    fn interrupt_counts_from_proc_interrupts() {
        let out = "LINUX-INTERRUPTS-START\n           CPU0       \n 11:       1234      GICv3  27 Level     arch_timer\n \
                   13:         56      GICv3  33 Level     uart-pl011\nIPI0:  0 Rescheduling interrupts\n\
                   LINUX-INTERRUPTS-END\n";
        assert_eq!(interrupt_count(out, "arch_timer"), 1234);
        assert_eq!(interrupt_count(out, "uart-pl011"), 56);
        assert_eq!(interrupt_count(out, "virtio"), 0);
        assert_eq!(interrupt_count("no table", "arch_timer"), 0);
    }

    #[test]
    fn newc_archive_is_well_formed() {
        let a = newc(&[
            ("init", 0o100_755, b"#!/bin/sh\n", (0, 0)),
            ("dev/console", 0o020_600, &[], (5, 1)),
        ]);
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(
            text.contains("init\0")
                && text.contains("dev/console\0")
                && text.contains("TRAILER!!!\0")
        );
        // The console's rdev major/minor fields (10th and 11th).
        let second = text.find("dev/console").expect("entry") - 110;
        assert_eq!(
            &text[second + 6 + 9 * 8..second + 6 + 11 * 8],
            "0000000500000001"
        );
    }
}
