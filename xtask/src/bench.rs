//! `cargo xtask bench`: the barrier and TLBI economy of eager mode and of
//! every nesting policy, in one QEMU boot, with the correctness of each run
//! judged on the host model; and the host throughput of the manager against
//! raw aarch64-paging (criterion). See docs/benchmarks.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Artifacts, RunOptions, RunOutcome, cargo_command, run, run_with_timeout};

/// One run of one workload in one mode.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BenchRecord {
    /// `W1`..`W4`, `W6`, `W7`, `W1-rsv`, `W5-fa-off`, `W5-fa-on`.
    pub workload: String,
    /// `eager`, `flush_inner`, `naive`, `flatten`, `counted`.
    pub policy: String,
    /// How guest memory was kept coherent: `fwb` or `maintenance`.
    pub coherency: String,
    /// The counters the hypervisor reported for the measured phase.
    pub counters: BTreeMap<String, u64>,
    /// Wall time of the measured phase, in QEMU (ms; noisy, information only).
    pub wall_ms: f64,
    /// What the hypervisor (or guest) checked in QEMU.
    pub correct_qemu: bool,
    /// What the host model says (`None` if it has no verdict for the run).
    pub correct_model: Option<bool>,
}

impl BenchRecord {
    fn get(&self, key: &str) -> u64 {
        self.counters.get(key).copied().unwrap_or(0)
    }

    /// DSBs of both kinds.
    #[must_use]
    pub fn dsb(&self) -> u64 {
        self.get("dsb_ishst") + self.get("dsb_ish")
    }

    /// TLBI instructions of every kind.
    #[must_use]
    pub fn tlbi(&self) -> u64 {
        [
            "tlbi_ipas2e1is",
            "tlbi_ripas2e1is",
            "tlbi_vmalle1is",
            "tlbi_vmalls12e1is",
            "tlbi_vae2is",
            "tlbi_alle2is",
        ]
        .iter()
        .map(|k| self.get(k))
        .sum()
    }

    /// Correct in QEMU and in the model.
    #[must_use]
    pub fn correct(&self) -> bool {
        self.correct_qemu && self.correct_model.unwrap_or(false)
    }
}

/// Parses the `LAZYHYP-BENCH:` lines of a run.
#[must_use]
pub fn parse_bench_lines(output: &str) -> Vec<BenchRecord> {
    let mut records = Vec::new();
    for line in output.lines() {
        let Some(rest) = line.split("LAZYHYP-BENCH:").nth(1) else {
            continue;
        };
        let mut r = BenchRecord::default();
        for kv in rest.split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            match k {
                "workload" => v.clone_into(&mut r.workload),
                "policy" => v.clone_into(&mut r.policy),
                "wall_us" => r.wall_ms = v.parse::<f64>().unwrap_or(0.0) / 1000.0,
                "correct" => r.correct_qemu = v == "true",
                _ => {
                    if let Ok(n) = v.parse() {
                        r.counters.insert(k.to_owned(), n);
                    }
                }
            }
        }
        records.push(r);
    }
    records
}

/// Parses `MODEL workload=.. policy=.. correct=..` lines.
#[must_use]
pub fn parse_model_lines(output: &str) -> BTreeMap<(String, String), bool> {
    let mut verdicts = BTreeMap::new();
    for line in output.lines().filter(|l| l.starts_with("MODEL ")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .map(str::to_owned)
        };
        if let (Some(w), Some(p), Some(c)) = (field("workload"), field("policy"), field("correct"))
        {
            verdicts.insert((w, p), c == "true");
        }
    }
    verdicts
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The records as a JSON array (fields: workload, policy, pte_writes, dsb,
/// dsb_ishst, dsb_ish, isb, tlbi, tlbi_pages, each TLBI kind, bbm,
/// flattened, exits, demand_faults, wall_ms, correct, correct_qemu,
/// correct_model).
#[must_use]
pub fn to_json(records: &[BenchRecord]) -> String {
    let mut out = String::from("[\n");
    for (i, r) in records.iter().enumerate() {
        let _ = write!(
            out,
            "  {{\"workload\": {}, \"policy\": {}, \"coherency\": {}, \"pte_writes\": {}, \"dsb\": {}, \"dsb_ishst\": {}, \
             \"dsb_ish\": {}, \"isb\": {}, \"tlbi\": {}, \"tlbi_pages\": {}",
            json_string(&r.workload),
            json_string(&r.policy),
            json_string(&r.coherency),
            r.get("pte_writes"),
            r.dsb(),
            r.get("dsb_ishst"),
            r.get("dsb_ish"),
            r.get("isb"),
            r.tlbi(),
            r.get("tlbi_pages"),
        );
        for k in [
            "tlbi_ipas2e1is",
            "tlbi_ripas2e1is",
            "tlbi_vmalle1is",
            "tlbi_vmalls12e1is",
            "tlbi_vae2is",
            "tlbi_alle2is",
            "cmo_lines",
            "icache_invalidations",
        ] {
            let _ = write!(out, ", \"{k}\": {}", r.get(k));
        }
        let model = r
            .correct_model
            .map_or_else(|| "null".to_owned(), |c| c.to_string());
        let _ = write!(
            out,
            ", \"bbm\": {}, \"flattened\": {}, \"exits\": {}, \"demand_faults\": {}, \"wall_ms\": {:.3}, \
             \"correct\": {}, \"correct_qemu\": {}, \"correct_model\": {model}}}",
            r.get("bbm"),
            r.get("flattened"),
            r.get("exits"),
            r.get("demand_faults"),
            r.wall_ms,
            r.correct(),
            r.correct_qemu,
        );
        out.push_str(if i + 1 < records.len() { ",\n" } else { "\n" });
    }
    out.push(']');
    out.push('\n');
    out
}

/// The table printed by `cargo xtask bench`.
#[must_use]
pub fn table(records: &[BenchRecord]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<12} {:<11} {:>9} {:>7} {:>6} {:>7} {:>10} {:>5} {:>6} {:>6} {:>9} {:>9} {:>6} {:>8}  correct",
        "workload",
        "policy",
        "coherency",
        "pte_wr",
        "dsb",
        "isb",
        "tlbi",
        "tlbi_pages",
        "bbm",
        "flat",
        "exits",
        "faults",
        "cmo_lines",
        "ic_inv",
        "wall_ms"
    );
    for r in records {
        let _ = writeln!(
            out,
            "{:<10} {:<12} {:<11} {:>9} {:>7} {:>6} {:>7} {:>10} {:>5} {:>6} {:>6} {:>9} {:>9} {:>6} {:>8.2}  {}",
            r.workload,
            r.policy,
            r.coherency,
            r.get("pte_writes"),
            r.dsb(),
            r.get("isb"),
            r.tlbi(),
            r.get("tlbi_pages"),
            r.get("bbm"),
            r.get("flattened"),
            r.get("exits"),
            r.get("demand_faults"),
            r.get("cmo_lines"),
            r.get("icache_invalidations"),
            r.wall_ms,
            match (r.correct_qemu, r.correct_model) {
                (true, Some(true)) => "yes",
                (true, Some(false)) => "NO (model)",
                (false, _) => "NO (qemu)",
                (true, None) => "? (no model verdict)",
            }
        );
    }
    out
}

/// Boots the test guest quietly (`log=warn`) with `bootargs` within
/// `timeout`, and requires a passing verdict (`what` names the boot in the
/// error).
fn bench_boot(
    artifacts: &Artifacts,
    what: &str,
    timeout: Duration,
    mut bootargs: Vec<String>,
) -> Result<RunOutcome> {
    bootargs.push("log=warn".to_owned());
    let opts = RunOptions {
        timeout,
        bootargs,
        echo: false,
        ..RunOptions::default()
    };
    let outcome = run(artifacts, &opts)?;
    if !outcome.verdict().is_pass() {
        bail!("{what} failed: {}\n{}", outcome.verdict(), outcome.output);
    }
    Ok(outcome)
}

/// Boots the bench sequence in QEMU and returns its records.
///
/// # Errors
///
/// If QEMU cannot run, the run fails, or it reports no record.
pub fn qemu_records(artifacts: &Artifacts, fwb: bool) -> Result<Vec<BenchRecord>> {
    let outcome = bench_boot(
        artifacts,
        "the bench boot",
        Duration::from_mins(10),
        vec![
            "guest.bench=1".to_owned(),
            "mm.guard=1".to_owned(),
            format!("mm.fwb={}", u8::from(fwb)),
        ],
    )?;
    // Only this run's markers (the guest's output cannot add records).
    let mut lines = String::new();
    for (_, rest) in outcome.markers.iter().filter(|(kind, _)| kind == "BENCH") {
        lines.push_str("LAZYHYP-BENCH: ");
        lines.push_str(rest);
        lines.push('\n');
    }
    let mut records = parse_bench_lines(&lines);
    for r in &mut records {
        if fwb { "fwb" } else { "maintenance" }.clone_into(&mut r.coherency);
    }
    if records.is_empty() {
        bail!(
            "the bench boot printed no LAZYHYP-BENCH line\n{}",
            outcome.output
        );
    }
    Ok(records)
}

/// Runs the model check (`examples/model_check.rs`) and returns its verdicts.
///
/// # Errors
///
/// If it cannot be built or run.
pub fn model_verdicts() -> Result<BTreeMap<(String, String), bool>> {
    let mut cmd = cargo_command();
    cmd.args([
        "run",
        "--release",
        "-q",
        "-p",
        "lazyhyp",
        "--features",
        "model",
        "--example",
        "model_check",
    ]);
    let out = run_with_timeout(cmd, Some(Duration::from_mins(15)), false)?;
    if out.timed_out || !out.status.success() {
        bail!("model_check failed:\n{}", out.output);
    }
    Ok(parse_model_lines(&out.output))
}

/// Runs the criterion benchmark and returns its `RATIO` line.
///
/// # Errors
///
/// If it cannot be run or prints no `RATIO` line.
pub fn host_ratio() -> Result<String> {
    let mut cmd = cargo_command();
    cmd.args(["bench", "-p", "lazyhyp", "--bench", "map_unmap"]);
    let out = run_with_timeout(cmd, Some(Duration::from_mins(20)), true)?;
    out.output
        .lines()
        .find(|l| l.starts_with("RATIO "))
        .map(str::to_owned)
        .context("the criterion benchmark printed no RATIO line")
}

/// One phase of the guest-memory host benchmark (`benches/guest_memory.rs`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuestMemPhase {
    /// `fault_around_1g`, `fault_4k_64m`, `unmap_every_other_64m`, ...
    pub phase: String,
    /// Operations timed (faults, batch ops, blocks merged).
    pub ops: u64,
    /// Manager time per operation, ns.
    pub ns_per_op: f64,
    /// The same operations with raw aarch64-paging, ns (`None`: no
    /// counterpart).
    pub aarch64_paging_ns_per_op: Option<f64>,
    /// `ns_per_op` over the raw time (`None`: no counterpart).
    pub ratio: Option<f64>,
}

/// Parses the `GUESTMEM phase=.. ops=.. ns_per_op=.. aarch64_paging_ns_per_op=..
/// ratio_vs_aarch64_paging=..` lines (`na` for no counterpart); lines
/// without a phase, ops or a manager time are skipped.
#[must_use]
pub fn parse_guestmem_lines(output: &str) -> Vec<GuestMemPhase> {
    let mut phases = Vec::new();
    for line in output.lines() {
        let Some(rest) = line.strip_prefix("GUESTMEM ") else {
            continue;
        };
        let mut p = GuestMemPhase::default();
        let (mut ops, mut ns) = (None, None);
        for (k, v) in rest.split_whitespace().filter_map(|kv| kv.split_once('=')) {
            match k {
                "phase" => v.clone_into(&mut p.phase),
                "ops" => ops = v.parse().ok(),
                "ns_per_op" => ns = v.parse().ok(),
                "aarch64_paging_ns_per_op" => p.aarch64_paging_ns_per_op = v.parse().ok(),
                "ratio_vs_aarch64_paging" => p.ratio = v.parse().ok(),
                _ => {}
            }
        }
        if let (false, Some(ops), Some(ns)) = (p.phase.is_empty(), ops, ns) {
            p.ops = ops;
            p.ns_per_op = ns;
            phases.push(p);
        }
    }
    phases
}

/// Runs the guest-memory host benchmark and returns its `GUESTMEM` lines,
/// parsed.
///
/// # Errors
///
/// If it cannot be run or prints no `GUESTMEM` line.
pub fn host_guest_memory() -> Result<Vec<GuestMemPhase>> {
    let mut cmd = cargo_command();
    cmd.args(["bench", "-p", "lazyhyp", "--bench", "guest_memory"]);
    let out = run_with_timeout(cmd, Some(Duration::from_mins(10)), true)?;
    if out.timed_out || !out.status.success() {
        bail!("the guest-memory benchmark failed:\n{}", out.output);
    }
    let phases = parse_guestmem_lines(&out.output);
    if phases.is_empty() {
        bail!("the guest-memory benchmark printed no GUESTMEM line");
    }
    Ok(phases)
}

/// The guest-memory phases as a table.
#[must_use]
pub fn guestmem_table(phases: &[GuestMemPhase]) -> String {
    let mut t = format!(
        "{:<24} {:>7} {:>10} {:>16} {:>7}\n",
        "phase", "ops", "ns/op", "aarch64-paging", "ratio"
    );
    let na =
        |x: Option<f64>, prec: usize| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.prec$}"));
    for p in phases {
        let _ = writeln!(
            t,
            "{:<24} {:>7} {:>10.1} {:>16} {:>7}",
            p.phase,
            p.ops,
            p.ns_per_op,
            na(p.aarch64_paging_ns_per_op, 1),
            na(p.ratio, 2)
        );
    }
    t
}

/// Merges model verdicts into the QEMU records.
pub fn merge(records: &mut [BenchRecord], verdicts: &BTreeMap<(String, String), bool>) {
    for r in records {
        r.correct_model = verdicts
            .get(&(r.workload.clone(), r.policy.clone()))
            .copied();
    }
}

/// Writes the JSON document to `path`.
///
/// # Errors
///
/// If the file cannot be written.
pub fn write_json(path: &Path, records: &[BenchRecord]) -> Result<()> {
    std::fs::write(path, to_json(records)).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "LAZYHYP-BENCH: workload=W1 policy=flatten pte_writes=528 dsb_ishst=9 dsb_ish=0 isb=9 \
        tlbi_ipas2e1is=0 tlbi_ripas2e1is=0 tlbi_vmalle1is=0 tlbi_vmalls12e1is=0 tlbi_vae2is=0 tlbi_alle2is=0 \
        tlbi_pages=0 bbm=0 flattened=8 demand_faults=0 exits=0 wall_us=623 correct=true";

    #[test]
    fn parses_bench_and_model_lines_and_merges() {
        let mut records = parse_bench_lines(&format!("noise\n{LINE}\n"));
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(
            (
                r.workload.as_str(),
                r.policy.as_str(),
                r.dsb(),
                r.get("flattened")
            ),
            ("W1", "flatten", 9, 8)
        );
        assert!((r.wall_ms - 0.623).abs() < 1e-9);
        let verdicts = parse_model_lines(
            "MODEL workload=W1 policy=flatten correct=true\nMODEL workload=W1 policy=naive correct=false\n",
        );
        merge(&mut records, &verdicts);
        assert!(records[0].correct());
    }

    #[test]
    fn json_has_the_required_fields_and_is_well_formed() {
        let mut records = parse_bench_lines(LINE);
        records[0].correct_model = Some(false);
        let json = to_json(&records);
        for field in [
            "\"workload\": \"W1\"",
            "\"policy\": \"flatten\"",
            "\"pte_writes\": 528",
            "\"dsb\": 9",
            "\"isb\": 9",
            "\"tlbi\": 0",
            "\"tlbi_pages\": 0",
            "\"bbm\": 0",
            "\"flattened\": 8",
            "\"exits\": 0",
            "\"wall_ms\": 0.623",
            "\"correct\": false",
        ] {
            assert!(json.contains(field), "{field} missing in {json}");
        }
        // Balanced brackets and braces, one object.
        assert_eq!(json.matches('{').count(), 1);
        assert!(json.trim_start().starts_with('[') && json.trim_end().ends_with(']'));
    }
}

/// One run of the unmap benchmark (`guest.unmap_bench_mib`): the EL2-bound
/// time and TLBIs of one `HYP_UNMAP` over a range wholly page-mapped and
/// over the same range with every other page given back, and the heap
/// growth of the latter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnmapBench {
    /// Guest RAM of the run, MiB.
    pub ram_mib: u64,
    /// The unmapped range, MiB.
    pub size_mib: u64,
    /// Microseconds for the wholly page-mapped range.
    pub full_us: u64,
    /// TLBIs for it.
    pub full_tlbis: u64,
    /// Microseconds with every other page given back.
    pub holes_us: u64,
    /// TLBIs for it.
    pub holes_tlbis: u64,
    /// Heap high-water growth during that call, bytes.
    pub heap_growth: u64,
}

/// Parses the guest's `unmap-bench:` line.
#[must_use]
pub fn parse_unmap_bench(output: &str, ram_mib: u64) -> Option<UnmapBench> {
    let line = output.lines().find_map(|l| {
        l.strip_prefix(crate::GUEST_PREFIX)
            .unwrap_or(l)
            .strip_prefix("unmap-bench: ")
    })?;
    let mut b = UnmapBench {
        ram_mib,
        ..UnmapBench::default()
    };
    for (k, v) in line.split_whitespace().filter_map(|t| t.split_once('=')) {
        let n = v.parse().ok();
        match k {
            "size_mib" => b.size_mib = n?,
            "full_us" => b.full_us = n?,
            "full_tlbis" => b.full_tlbis = n?,
            "holes_us" => b.holes_us = n?,
            "holes_tlbis" => b.holes_tlbis = n?,
            "heap_growth" => b.heap_growth = n?,
            _ => {}
        }
    }
    (b.size_mib > 0).then_some(b)
}

/// Boots the unmap benchmark over `size_mib` MiB with `ram_mib` MiB of guest
/// RAM.
///
/// # Errors
/// If QEMU cannot run, the run fails, or it prints no result.
pub fn unmap_bench(artifacts: &Artifacts, ram_mib: u64, size_mib: u64) -> Result<UnmapBench> {
    let outcome = bench_boot(
        artifacts,
        "the unmap bench boot",
        Duration::from_mins(15),
        vec![
            format!("guest.ram_mib={ram_mib}"),
            format!("guest.unmap_bench_mib={size_mib}"),
        ],
    )?;
    parse_unmap_bench(&outcome.output, ram_mib)
        .with_context(|| format!("no unmap-bench line\n{}", outcome.output))
}

/// The unmap benchmark's rows as a table.
#[must_use]
pub fn unmap_table(rows: &[UnmapBench]) -> String {
    let mut t = String::from(
        "| guest RAM | range | page-mapped: us | TLBIs | every other page given back: us | TLBIs | ratio | heap growth |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        // Two decimals in integer arithmetic (microsecond counts).
        let hundredths = r.holes_us * 100 / r.full_us.max(1);
        let _ = writeln!(
            t,
            "| {} MiB | {} MiB | {} | {} | {} | {} | {}.{:02} | {} B |",
            r.ram_mib,
            r.size_mib,
            r.full_us,
            r.full_tlbis,
            r.holes_us,
            r.holes_tlbis,
            hundredths / 100,
            hundredths % 100,
            r.heap_growth
        );
    }
    t
}

#[cfg(test)]
mod guestmem_tests {
    use super::*;

    #[test]
    fn guestmem_lines_parse() {
        let out = "   Compiling lazyhyp\n\
            GUESTMEM phase=fault_around_1g ops=512 ns_per_op=654.6 aarch64_paging_ns_per_op=13.3 ratio_vs_aarch64_paging=49.16\n\
            noise GUESTMEM phase=ignored ops=1 ns_per_op=1\n\
            GUESTMEM phase=broken ops=x ns_per_op=1\n\
            GUESTMEM phase=merge_64m ops=32 ns_per_op=1452.1 aarch64_paging_ns_per_op=na ratio_vs_aarch64_paging=na\n";
        let p = parse_guestmem_lines(out);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0],
            GuestMemPhase {
                phase: "fault_around_1g".to_owned(),
                ops: 512,
                ns_per_op: 654.6,
                aarch64_paging_ns_per_op: Some(13.3),
                ratio: Some(49.16),
            }
        );
        assert_eq!((p[1].phase.as_str(), p[1].ops), ("merge_64m", 32));
        assert_eq!((p[1].aarch64_paging_ns_per_op, p[1].ratio), (None, None));
        let t = guestmem_table(&p);
        assert!(t.contains("fault_around_1g"), "{t}");
        assert!(t.contains("49.16") && t.contains("1452.1"), "{t}");
    }
}

#[cfg(test)]
mod unmap_tests {
    use super::*;

    #[test]
    fn unmap_bench_line_parses() {
        let out = "vm1| guest: running\nvm1| unmap-bench: size_mib=256 full_us=10 full_tlbis=1 \
                   holes_us=15 holes_tlbis=1 heap_growth=0 ratio=1.50\n";
        let b = parse_unmap_bench(out, 512).expect("parses");
        assert_eq!(
            (b.size_mib, b.full_us, b.holes_us, b.ram_mib),
            (256, 10, 15, 512)
        );
        assert!(unmap_table(&[b]).contains("| 512 MiB | 256 MiB | 10 | 1 | 15 | 1 | 1.50 | 0 B |"));
        assert_eq!(parse_unmap_bench("unmap-bench: FAILED: x", 1), None);
    }
}
