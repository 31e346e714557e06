//! `cargo xtask`: build, boot under QEMU, and test lazyhyp.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use xtask::{RunOptions, Verdict};

mod mutants;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Build, boot and test lazyhyp", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the hypervisor and the guest, boot them under QEMU, judge the run.
    Qemu(QemuArgs),
    /// Run the host tests, the QEMU integration tests among them.
    Test,
    /// Build the hypervisor and the guest and print where the ELF files are.
    Build {
        /// Debug build instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Boot Debian's arm64 Linux kernel with a busybox initramfs under the
    /// hypervisor (fetched with apt-get and cached under target/linux unless
    /// given).
    Linux {
        /// Kernel Image to boot instead of Debian's.
        #[arg(long, value_name = "PATH", requires = "initrd")]
        kernel: Option<std::path::PathBuf>,
        /// Initramfs (newc cpio) to use instead of the built one.
        #[arg(long, value_name = "PATH", requires = "kernel")]
        initrd: Option<std::path::PathBuf>,
        /// Kill QEMU and report a hang (with the phase it was in) after
        /// this many seconds.
        #[arg(long, default_value_t = 600, value_name = "SECS")]
        timeout: u64,
        /// Also boot N times under the hypervisor and N times on bare QEMU,
        /// interleaved, and print the median and spread of the wall and
        /// QEMU CPU times and their ratios.
        #[arg(long, value_name = "N")]
        compare: Option<usize>,
        /// Extra kernel command-line words, after the hypervisor's own
        /// (`console=ttyAMA0 earlycon=... panic=-1 rdinit=/init`).
        #[arg(long, value_name = "WORDS", default_value = "")]
        append: String,
        /// QEMU CPUs (`-smp`, 1..=8), each one vCPU of the Linux guest.
        #[arg(long, default_value_t = 1, value_name = "N",
              value_parser = clap::value_parser!(u8).range(1..=8))]
        smp: u8,
    },
    /// Run several VMs side by side (the hypervisor's `vms=`), by default
    /// the test guest on CPU 0 and Linux with 2 vCPUs on CPUs 1-2, and
    /// judge each VM.
    Vms {
        /// The VMs: KIND:CPUS:RAM_MIB,... (KIND test or linux; CPUS N or
        /// N-M; at most one Linux VM).
        #[arg(long, default_value = xtask::vms::DEFAULT_CONFIG, value_name = "VMS")]
        config: String,
        /// Kill QEMU and report a hang after this many seconds.
        #[arg(long, default_value_t = 600, value_name = "SECS")]
        timeout: u64,
        /// Extra bootarg for the hypervisor (repeatable).
        #[arg(long = "bootarg", value_name = "KEY=VAL", value_parser = parse_bootarg)]
        bootargs: Vec<String>,
    },
    /// Run the benchmarks: W1..W5 in eager mode and under every nesting
    /// policy in one QEMU boot (correctness from the host model), then the
    /// host throughput of the manager against raw aarch64-paging.
    Bench {
        /// Also write the records as JSON to this file.
        #[arg(long, value_name = "PATH")]
        json: Option<std::path::PathBuf>,
        /// Skip the host (criterion) benchmark.
        #[arg(long)]
        no_host: bool,
    },
    /// Mutation testing of the mm core: the hand-written mutants against
    /// the host tests (a copy of the tree is mutated, never the tree), or
    /// with --full cargo-mutants over src/mm/ (docs/mutation.md).
    Mutants {
        /// Run cargo-mutants over src/mm/ instead (installed if missing).
        #[arg(long)]
        full: bool,
        /// Only the hand-written mutants with these names (repeatable).
        #[arg(long = "only", value_name = "NAME", conflicts_with = "full")]
        only: Vec<String>,
        /// With --full: only these files (repeatable; default: what
        /// .cargo/mutants.toml selects).
        #[arg(long = "file", value_name = "PATH", requires = "full")]
        files: Vec<String>,
        /// With --full: seconds before a mutant's test run counts as a hang.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        timeout: u64,
        /// With --full: mutants built and tested at once (2 cores: 1).
        #[arg(long, default_value_t = 1, value_name = "N")]
        jobs: usize,
    },
}

#[derive(Debug, Args)]
struct QemuArgs {
    /// Debug build instead of release.
    #[arg(long)]
    debug: bool,
    /// Hypervisor log level (the `log=` bootarg).
    #[arg(long, default_value = "info", value_name = "LEVEL",
          value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    log: String,
    /// Kill QEMU and report a hang after this many seconds.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    timeout: u64,
    /// Start QEMU's gdb stub on :1234 and wait for gdb (no timeout).
    #[arg(long)]
    gdb: bool,
    /// QEMU CPUs (`-smp`, 1..=8); the test guest gets as many vCPUs, one
    /// per CPU, and runs its SMP tests when there are two or more.
    #[arg(long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=8))]
    smp: u8,
    /// Extra bootarg for the hypervisor (repeatable), e.g. `guest.fail=1`.
    #[arg(long = "bootarg", value_name = "KEY=VAL", value_parser = parse_bootarg)]
    bootargs: Vec<String>,
    /// Extra QEMU arguments.
    #[arg(last = true, value_name = "EXTRA QEMU ARGS")]
    extra: Vec<String>,
}

fn parse_bootarg(arg: &str) -> Result<String, String> {
    match arg.split_once('=') {
        Some((key, _)) if !key.is_empty() && !arg.contains(char::is_whitespace) => {
            Ok(arg.to_owned())
        }
        _ => Err(format!("`{arg}` is not KEY=VALUE (without spaces)")),
    }
}

/// Runs the test guest; returns the run's status (docs/run-contract.md):
/// 0 pass, 1 guest failures, 2 no report, 3 crash, 4 setup error.
fn qemu(args: QemuArgs) -> Result<i32> {
    xtask::ensure_qemu()?;
    let artifacts = xtask::build(!args.debug)?;
    let opts = RunOptions {
        log: args.log,
        timeout: Duration::from_secs(args.timeout),
        gdb: args.gdb,
        bootargs: args.bootargs,
        extra_qemu_args: args.extra,
        echo: true,
        test_hypercalls: true,
        console_input: Vec::new(),
        smp: usize::from(args.smp),
    };
    let outcome = xtask::run(&artifacts, &opts)?;
    println!("{}", outcome.stage2_line());
    let verdict = outcome.verdict();
    match &verdict {
        Verdict::Pass => {
            let passed = outcome.summary.map_or(0, |s| s.passed);
            println!(
                "xtask qemu: PASS ({passed} guest tests, {:.1} s)",
                outcome.elapsed.as_secs_f64()
            );
        }
        Verdict::Fail(reason) => {
            println!(
                "xtask qemu: FAIL (status {}: {})",
                outcome.status(),
                xtask::exit_code_meaning(outcome.status())
            );
            eprintln!("xtask qemu: {reason}");
        }
    }
    if !outcome.forged.is_empty() {
        println!(
            "xtask qemu: ignored {} guest line(s) imitating hypervisor markers",
            outcome.forged.len()
        );
    }
    Ok(outcome.status())
}

fn test() -> Result<bool> {
    let totals = xtask::run_host_tests()?;
    let counts = format!(
        "{} tests passed, {} failed, {} ignored in {} suites",
        totals.passed, totals.failed, totals.ignored, totals.suites
    );
    if totals.success && totals.failed == 0 {
        println!("xtask test: all passed ({counts})");
        Ok(true)
    } else {
        println!("xtask test: FAILED ({counts})");
        eprintln!("xtask test: cargo test failed");
        Ok(false)
    }
}

fn linux(
    kernel: Option<std::path::PathBuf>,
    initrd: Option<std::path::PathBuf>,
    timeout: u64,
    compare: Option<usize>,
    append: &str,
    smp: usize,
) -> Result<bool> {
    use xtask::linux::{Sample, spread};
    xtask::ensure_qemu()?;
    let artifacts = xtask::build(true)?;
    let (kernel, initrd) = match (kernel, initrd) {
        (Some(k), Some(i)) => (k, i),
        _ => xtask::linux::fetch()?,
    };
    let t = Duration::from_secs(timeout);
    let outcome = xtask::linux::boot(
        &artifacts.hypervisor,
        &kernel,
        &initrd,
        t,
        true,
        append,
        smp,
    )?;
    println!("{}", outcome.stage2_line());
    if let Err(why) = xtask::linux::judge(&outcome, smp) {
        println!("xtask linux: FAIL");
        eprintln!("xtask linux: {why}");
        return Ok(false);
    }
    println!(
        "xtask linux: PASS ({:.1} s wall, {:.1} s QEMU CPU)",
        outcome.elapsed.as_secs_f64(),
        outcome.cpu.as_secs_f64()
    );
    println!("xtask linux: {}", xtask::linux::exit_rates(&outcome));
    for line in xtask::linux::exits_per_vcpu(&outcome) {
        println!("xtask linux: {line}");
    }
    let Some(n) = compare else {
        return Ok(true);
    };
    // Interleaved (hypervisor, bare, hypervisor, bare, ...) so that a load
    // change on the machine hits both sides alike.
    let (mut hyp, mut bare): (Vec<Sample>, Vec<Sample>) = (Vec::new(), Vec::new());
    for i in 0..n {
        let o = xtask::linux::boot(
            &artifacts.hypervisor,
            &kernel,
            &initrd,
            t,
            false,
            append,
            smp,
        )?;
        if let Err(why) = xtask::linux::judge(&o, smp) {
            anyhow::bail!("hypervisor run {i}: {why}");
        }
        hyp.push(Sample {
            wall: o.elapsed,
            cpu: o.cpu,
        });
        bare.push(xtask::linux::bare_boot(&kernel, &initrd, t, append, smp)?);
        println!(
            "xtask linux: run {i}: hypervisor {:.2} s wall / {:.2} s CPU, bare QEMU {:.2} s wall / {:.2} s CPU",
            hyp[i].wall.as_secs_f64(),
            hyp[i].cpu.as_secs_f64(),
            bare[i].wall.as_secs_f64(),
            bare[i].cpu.as_secs_f64()
        );
    }
    for (what, h, b) in [
        (
            "wall",
            hyp.iter().map(|s| s.wall).collect::<Vec<_>>(),
            bare.iter().map(|s| s.wall).collect::<Vec<_>>(),
        ),
        (
            "QEMU CPU",
            hyp.iter().map(|s| s.cpu).collect(),
            bare.iter().map(|s| s.cpu).collect(),
        ),
    ] {
        let (hm, hlo, hhi) = spread(&h);
        let (bm, blo, bhi) = spread(&b);
        println!(
            "xtask linux: {what} over {n} runs each: hypervisor median {hm:.2} s (min {hlo:.2}, max {hhi:.2}), \
             bare QEMU median {bm:.2} s (min {blo:.2}, max {bhi:.2}), ratio of medians {:.3}",
            hm / bm.max(f64::EPSILON)
        );
    }
    Ok(true)
}

fn vms(config: &str, timeout: u64, bootargs: &[String]) -> Result<bool> {
    xtask::ensure_qemu()?;
    let artifacts = xtask::build(true)?;
    let plan = xtask::vms::plan(config)?;
    let linux = if plan.iter().any(|v| v.kind == "linux") {
        Some(xtask::linux::fetch()?)
    } else {
        None
    };
    let outcome = xtask::vms::boot(
        &artifacts,
        linux.as_ref().map(|(k, i)| (k.as_path(), i.as_path())),
        config,
        Duration::from_secs(timeout),
        true,
        bootargs,
    )?;
    println!("{}", outcome.stage2_line());
    match xtask::vms::judge(&outcome, config) {
        Ok(lines) => {
            for l in lines {
                println!("xtask vms: {l}");
            }
            println!(
                "xtask vms: PASS ({} VMs, {:.1} s)",
                plan.len(),
                outcome.elapsed.as_secs_f64()
            );
            Ok(true)
        }
        Err(why) => {
            println!("xtask vms: FAIL");
            eprintln!("xtask vms: {why}");
            Ok(false)
        }
    }
}

fn bench(json: Option<&std::path::Path>, no_host: bool) -> Result<bool> {
    use xtask::bench;
    xtask::ensure_qemu()?;
    let artifacts = xtask::build(true)?;
    println!("xtask bench: booting the bench sequence in QEMU (guard mode on)");
    // Once with FEAT_S2FWB (QEMU's -cpu max has it), once with explicit
    // cache maintenance (mm.fwb=0): the CMO columns differ.
    let mut records = bench::qemu_records(&artifacts, true)?;
    records.extend(bench::qemu_records(&artifacts, false)?);
    println!("xtask bench: checking every run on the host model");
    let verdicts = bench::model_verdicts()?;
    bench::merge(&mut records, &verdicts);
    print!("{}", bench::table(&records));
    if let Some(path) = json {
        bench::write_json(path, &records)?;
        println!("xtask bench: wrote {}", path.display());
    }
    println!(
        "xtask bench: one HYP_UNMAP over a page-mapped range vs the same range with every other page given back"
    );
    let rows = [
        bench::unmap_bench(&artifacts, 512, 256)?,
        bench::unmap_bench(&artifacts, 768, 704)?,
    ];
    print!("{}", bench::unmap_table(&rows));
    if !no_host {
        println!("xtask bench: host benchmark (criterion), manager vs raw aarch64-paging");
        println!("{}", bench::host_ratio()?);
        println!(
            "xtask bench: host guest-memory benchmark (fault storms, give-back, merge), ns per op"
        );
        print!("{}", bench::guestmem_table(&bench::host_guest_memory()?));
    }
    // Only what must hold fails the command; the numbers are reported.
    let missing: Vec<_> = records
        .iter()
        .filter(|r| r.correct_model.is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask bench: no model verdict for {} runs", missing.len());
        return Ok(false);
    }
    Ok(true)
}

fn build(debug: bool) -> Result<bool> {
    let artifacts = xtask::build(!debug)?;
    println!("hypervisor: {}", artifacts.hypervisor.display());
    println!("guest:      {}", artifacts.guest.display());
    Ok(true)
}

/// `cargo xtask qemu`'s status when xtask itself fails (build error, no
/// QEMU): outside the run contract's 0..=4.
const XTASK_ERROR: u8 = 5;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Qemu(args) => {
            return match qemu(args) {
                Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(2)),
                Err(e) => {
                    eprintln!("xtask: error: {e:#}");
                    // Not a run status: xtask itself could not run.
                    ExitCode::from(XTASK_ERROR)
                }
            };
        }
        Cmd::Test => test(),
        Cmd::Build { debug } => build(debug),
        Cmd::Bench { json, no_host } => bench(json.as_deref(), no_host),
        Cmd::Mutants {
            full,
            only,
            files,
            timeout,
            jobs,
        } => {
            let root = xtask::workspace_root();
            if full {
                mutants::run_full(&root, &files, Duration::from_secs(timeout), jobs)
            } else {
                mutants::run_hand(&root, &only)
            }
        }
        Cmd::Linux {
            kernel,
            initrd,
            timeout,
            compare,
            append,
            smp,
        } => linux(kernel, initrd, timeout, compare, &append, usize::from(smp)),
        Cmd::Vms {
            config,
            timeout,
            bootargs,
        } => vms(&config, timeout, &bootargs),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn qemu_arguments_parse() {
        let cli = Cli::try_parse_from([
            "xtask",
            "qemu",
            "--debug",
            "--log",
            "trace",
            "--timeout",
            "5",
            "--bootarg",
            "guest.fail=1",
            "--",
            "-d",
            "int",
        ])
        .expect("parses");
        let Cmd::Qemu(args) = cli.command else {
            panic!("not qemu");
        };
        assert!(args.debug && !args.gdb);
        assert_eq!(args.log, "trace");
        assert_eq!(args.timeout, 5);
        assert_eq!(args.bootargs, ["guest.fail=1"]);
        assert_eq!(args.extra, ["-d", "int"]);
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(Cli::try_parse_from(["xtask", "qemu", "--bootarg", "nokey"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "qemu", "--log", "loud"]).is_err());
    }
}
