//! Finding (or installing) QEMU and running the hypervisor under it (the
//! "QEMU command line" part of the contract).

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::artifacts::Artifacts;
use crate::outcome::RunOutcome;
use crate::process::run_with_input;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-aarch64";
/// The guest-physical address QEMU's loader puts the raw guest ELF at (the
/// hypervisor's default `payload=`).
pub const PAYLOAD_ADDR: &str = "0x48000000";
/// The port of QEMU's gdb stub under `-s`.
pub const GDB_PORT: u16 = 1234;
/// Default time limit of a run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_mins(1);

/// The Debian package that holds `qemu-system-aarch64`.
const QEMU_PACKAGE: &str = "qemu-system-arm";

/// How to run the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// Log level for the `log=` bootarg (`off`, `error`, `warn`, `info`,
    /// `debug`, `trace`); left out when `bootargs` already has a `log=`.
    pub log: String,
    /// Kill QEMU after this long and report a hang (ignored with `gdb`).
    pub timeout: Duration,
    /// Add `-s -S` (gdb stub on port 1234, wait for gdb) and run with no time limit.
    pub gdb: bool,
    /// Further `key=value` bootargs, e.g. `guest.fail=1`.
    pub bootargs: Vec<String>,
    /// Arguments appended to QEMU's command line.
    pub extra_qemu_args: Vec<String>,
    /// Print QEMU's output line by line as it arrives.
    pub echo: bool,
    /// Add `test.hypercalls=1`: the bundled test guest and the benchmark
    /// need the test-only hypercalls; a Linux guest never gets them.
    pub test_hypercalls: bool,
    /// Console input: when an output line contains the first string, type
    /// the second (see [`crate::process::run_with_input`]).
    pub console_input: Vec<(String, Vec<u8>)>,
    /// QEMU's CPUs (`-smp`); above 1 the guest gets as many vCPUs
    /// (`guest.vcpus=`) unless the bootargs say otherwise.
    pub smp: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            log: "info".to_owned(),
            timeout: DEFAULT_TIMEOUT,
            gdb: false,
            bootargs: Vec::new(),
            extra_qemu_args: Vec::new(),
            echo: false,
            test_hypercalls: true,
            console_input: Vec::new(),
            smp: 1,
        }
    }
}

impl RunOptions {
    /// The `-append` string: `log=<level>`, `test.hypercalls=1` if asked,
    /// the other bootargs, and the run's `run.token=`.
    #[must_use]
    pub fn append_line(&self, token: &str) -> String {
        let mut args = Vec::new();
        if !self.bootargs.iter().any(|a| a.starts_with("log=")) {
            args.push(format!("log={}", self.log));
        }
        if self.test_hypercalls
            && !self
                .bootargs
                .iter()
                .any(|a| a.starts_with("test.hypercalls="))
        {
            args.push("test.hypercalls=1".to_owned());
        }
        if self.smp > 1 && !self.bootargs.iter().any(|a| a.starts_with("guest.vcpus=")) {
            args.push(format!("guest.vcpus={}", self.smp));
        }
        args.extend(self.bootargs.iter().cloned());
        args.push(format!("run.token={token}"));
        args.join(" ")
    }
}

/// A fresh secret for one run: 32 hex digits from the OS's random source
/// (falling back to the clock and process id, which a guest cannot read
/// either). It reaches the hypervisor in its device tree's bootargs, which
/// no guest can read, and the hypervisor prints it on every marker line.
#[must_use]
pub fn new_run_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let from_os = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_os.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mixed = nanos ^ (u128::from(std::process::id()) << 64);
        bytes = mixed.to_le_bytes();
    }
    let digits = b"0123456789abcdef";
    let mut hex = String::with_capacity(32);
    for b in bytes {
        hex.push(char::from(digits[usize::from(b >> 4)]));
        hex.push(char::from(digits[usize::from(b & 0xf)]));
    }
    hex
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Whether an `/etc/os-release` text names Debian or a derivative.
fn is_debian_like(os_release: &str) -> bool {
    os_release.lines().any(|line| {
        let Some((key, value)) = line.split_once('=') else {
            return false;
        };
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        matches!(key.trim(), "ID" | "ID_LIKE")
            && value
                .split_whitespace()
                .any(|id| id == "debian" || id == "ubuntu")
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn apt_get(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not run `apt-get {}`", args.join(" ")))?;
    if !status.success() {
        bail!("`apt-get {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Finds `qemu-system-aarch64` on `PATH`. When it is missing on Debian or
/// Ubuntu and we are root, installs `qemu-system-arm` with apt-get;
/// otherwise fails with the command to run.
///
/// # Errors
/// When QEMU is missing and cannot be installed here.
pub fn ensure_qemu() -> Result<PathBuf> {
    if let Some(qemu) = find_on_path(QEMU) {
        return Ok(qemu);
    }
    let debian = fs::read_to_string("/etc/os-release").is_ok_and(|s| is_debian_like(&s));
    if !debian {
        bail!(
            "{QEMU} not found on PATH; install QEMU's AArch64 system emulator \
             (the package is usually named qemu-system-arm or qemu-system-aarch64)"
        );
    }
    if !is_root() {
        bail!(
            "{QEMU} not found on PATH; install it with: sudo apt-get install -y --no-install-recommends {QEMU_PACKAGE}"
        );
    }
    eprintln!("xtask: {QEMU} not found; installing {QEMU_PACKAGE} with apt-get");
    apt_get(&["update"])?;
    // Without the recommended desktop, audio and firmware packages (about
    // 200 of them): the runs here use none of them (`-nographic`, no NIC).
    apt_get(&["install", "-y", "--no-install-recommends", QEMU_PACKAGE])?;
    find_on_path(QEMU)
        .with_context(|| format!("{QEMU} still not found on PATH after installing {QEMU_PACKAGE}"))
}

/// QEMU's option syntax needs `,` doubled inside a value.
fn qemu_escape(path: &Path) -> OsString {
    let text = path.as_os_str().to_string_lossy();
    if text.contains(',') {
        text.replace(',', ",,").into()
    } else {
        path.as_os_str().to_owned()
    }
}

/// QEMU's arguments for a run with token `token`, as the contract gives
/// them. No semihosting (a guest could reach the host's files and end QEMU
/// with any status through it: EL2 cannot trap it) and no network.
#[must_use]
pub fn qemu_args(artifacts: &Artifacts, opts: &RunOptions, token: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        "max",
        "-smp",
        &opts.smp.to_string(),
        "-m",
        "1G",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    args.push(artifacts.hypervisor.clone().into_os_string());
    args.push("-device".into());
    let mut loader = OsString::from("loader,file=");
    loader.push(qemu_escape(&artifacts.guest));
    loader.push(format!(",addr={PAYLOAD_ADDR},force-raw=on"));
    args.push(loader);
    args.push("-append".into());
    args.push(opts.append_line(token).into());
    if opts.gdb {
        args.push("-s".into());
        args.push("-S".into());
    }
    args.extend(opts.extra_qemu_args.iter().map(OsString::from));
    args
}

/// The QEMU command for a run with token `token`, with `qemu` as the binary.
#[must_use]
pub fn qemu_command(qemu: &Path, artifacts: &Artifacts, opts: &RunOptions, token: &str) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(qemu_args(artifacts, opts, token));
    cmd
}

/// Runs the hypervisor and guest under QEMU (found with [`ensure_qemu`]).
///
/// # Errors
/// When QEMU cannot be found or started; a failing run is not an error (see
/// [`RunOutcome::verdict`]).
pub fn run(artifacts: &Artifacts, opts: &RunOptions) -> Result<RunOutcome> {
    let qemu = ensure_qemu()?;
    run_with_qemu(&qemu, artifacts, opts)
}

/// Like [`run`] with an explicit QEMU binary.
///
/// # Errors
/// When QEMU cannot be started or waited for.
pub fn run_with_qemu(qemu: &Path, artifacts: &Artifacts, opts: &RunOptions) -> Result<RunOutcome> {
    let timeout = if opts.gdb {
        println!(
            "xtask: QEMU waits for gdb on port {GDB_PORT}; attach with:\n  \
             gdb-multiarch {} -ex 'target remote :{GDB_PORT}'\n  \
             (guest symbols: -ex 'add-symbol-file {}')",
            artifacts.hypervisor.display(),
            artifacts.guest.display()
        );
        None
    } else {
        Some(opts.timeout)
    };
    let token = new_run_token();
    let captured = run_with_input(
        qemu_command(qemu, artifacts, opts, &token),
        timeout,
        opts.echo,
        &opts.console_input,
    )?;
    let mut outcome = RunOutcome::from_output(
        captured.output,
        captured.status.code(),
        captured.timed_out,
        captured.elapsed,
        &token,
    );
    outcome.cpu = captured.cpu;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifacts() -> Artifacts {
        Artifacts {
            hypervisor: PathBuf::from("/t/hyp"),
            guest: PathBuf::from("/t/a,b/guest"),
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn command_line_follows_the_contract() {
        let opts = RunOptions {
            bootargs: vec!["guest.fail=1".into()],
            extra_qemu_args: vec!["-d".into(), "int".into()],
            ..RunOptions::default()
        };
        let args = strings(&qemu_args(&artifacts(), &opts, "abc"));
        assert_eq!(
            args.join(" "),
            "-M virt,virtualization=on,gic-version=3 -cpu max -smp 1 -m 1G -nographic -no-reboot \
             -nic none -kernel /t/hyp \
             -device loader,file=/t/a,,b/guest,addr=0x48000000,force-raw=on \
             -append log=info test.hypercalls=1 guest.fail=1 run.token=abc -d int"
        );
        assert!(!args.iter().any(|a| a.contains("semihosting")));
        let linux = RunOptions {
            test_hypercalls: false,
            ..RunOptions::default()
        };
        assert_eq!(linux.append_line("x"), "log=info run.token=x");
    }

    #[test]
    fn smp_gives_the_guest_as_many_vcpus_unless_told() {
        let opts = RunOptions {
            smp: 4,
            ..RunOptions::default()
        };
        let args = strings(&qemu_args(&artifacts(), &opts, "t"));
        assert!(args.windows(2).any(|w| w == ["-smp", "4"]));
        assert_eq!(
            opts.append_line("t"),
            "log=info test.hypercalls=1 guest.vcpus=4 run.token=t"
        );
        let two = RunOptions {
            smp: 4,
            bootargs: vec!["guest.vcpus=2".into()],
            ..RunOptions::default()
        };
        assert!(!two.append_line("t").contains("guest.vcpus=4"));
    }

    #[test]
    fn gdb_adds_the_stub() {
        let opts = RunOptions {
            gdb: true,
            log: "trace".into(),
            ..RunOptions::default()
        };
        let args = strings(&qemu_args(&artifacts(), &opts, "t"));
        let n = args.len();
        assert_eq!(args[n - 2..], ["-s", "-S"]);
        assert!(args.iter().any(|a| a.starts_with("log=trace ")));
    }

    #[test]
    fn explicit_log_bootarg_wins() {
        let opts = RunOptions {
            bootargs: vec!["log=debug".into(), "payload=0x48000000".into()],
            ..RunOptions::default()
        };
        assert_eq!(
            opts.append_line("t"),
            "test.hypercalls=1 log=debug payload=0x48000000 run.token=t"
        );
    }

    #[test]
    fn run_tokens_are_fresh_hex() {
        let (a, b) = (new_run_token(), new_run_token());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn debian_detection() {
        assert!(is_debian_like(
            "PRETTY_NAME=\"Debian GNU/Linux 12\"\nID=debian\n"
        ));
        assert!(is_debian_like("ID=ubuntu\nID_LIKE=debian\n"));
        assert!(is_debian_like("ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n"));
        assert!(!is_debian_like("ID=fedora\nID_LIKE=\"rhel centos\"\n"));
        assert!(!is_debian_like("NAME=debian\n"));
    }

    #[test]
    fn a_qemu_that_fails_to_boot_is_a_failure() {
        // `false` stands in for a QEMU that exits 1 at once.
        let Some(fake) = find_on_path("false") else {
            return;
        };
        let outcome = run_with_qemu(&fake, &artifacts(), &RunOptions::default()).expect("runs");
        assert_eq!(outcome.exit_code, Some(1));
        assert!(!outcome.verdict().is_pass());
    }

    #[test]
    fn real_qemu_with_a_missing_kernel_is_a_failure() {
        let Some(qemu) = find_on_path(QEMU) else {
            return;
        };
        let missing = Artifacts {
            hypervisor: PathBuf::from("/nonexistent/lazyhyp"),
            guest: PathBuf::from("/nonexistent/guest"),
        };
        let opts = RunOptions {
            timeout: Duration::from_secs(30),
            ..RunOptions::default()
        };
        let outcome = run_with_qemu(&qemu, &missing, &opts).expect("QEMU starts");
        assert!(!outcome.timed_out, "{}", outcome.output);
        assert_ne!(outcome.exit_code, Some(0), "{}", outcome.output);
        assert!(
            outcome.output.contains("/nonexistent/"),
            "{}",
            outcome.output
        );
        assert!(!outcome.verdict().is_pass());
    }
}
