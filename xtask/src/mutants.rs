//! `cargo xtask mutants`: mutation testing of the mm core.
//!
//! Without `--full`: a short list of hand-written mutants ([`MUTANTS`]),
//! each a textual replacement in one file, applied to a copy of the
//! workspace under `target/mutants/work` (the tree itself is never
//! modified), each followed by `cargo test -p lazyhyp --lib` in that copy.
//! Every mutant must be killed (the tests fail), except those listed as
//! equivalent, which must survive (else their reason is out of date). The
//! copy builds into `target/mutants/target`, kept between runs, so only the
//! mutated crate recompiles.
//!
//! With `--full`: `cargo mutants` over `src/mm/` (configuration in
//! `.cargo/mutants.toml`), installed with `cargo install cargo-mutants
//! --locked` if missing, with a time budget for a 2-core machine; its
//! report lands in `target/mutants/full`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What a mutant is expected to do to the host tests.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Expect {
    /// The tests must fail.
    Killed,
    /// The tests pass: the mutant is equivalent as far as the host model
    /// can see (the reason says why). None of the current list is; a new
    /// mutant the model cannot see is listed so, with its reason.
    #[allow(dead_code, reason = "for mutants the model cannot see; none now")]
    Equivalent(&'static str),
}

/// One hand-written mutant: `find` (which must occur exactly once in
/// `file`) replaced by `replace`.
#[derive(Clone, Copy, Debug)]
pub struct Mutant {
    /// Short name.
    pub name: &'static str,
    /// File, relative to the workspace root.
    pub file: &'static str,
    /// Text replaced.
    pub find: &'static str,
    /// Replacement.
    pub replace: &'static str,
    /// What it breaks.
    pub what: &'static str,
    /// What the tests must do.
    pub expect: Expect,
}

/// The hand-written mutants (docs/mutation.md lists them with their
/// results).
pub const MUTANTS: &[Mutant] = &[
    Mutant {
        name: "free-before-tlbi",
        file: "src/mm/lazy.rs",
        find: "        let tlbis = self.issue_tlbis(&owed.batch, counters);\n        let made = !owed.makes.is_empty();\n        if made {\n            // Deferred break-before-make: every break's invalidation has\n            // completed (the `DSB ISH` after `VMALLE1IS` above), so the new\n            // entries may now be written; one `DSB ISHST` makes them all\n            // visible, the `ISB` below synchronizes this CPU.\n            debug_assert!(tlbis, \"deferred makes without their breaks' TLBIs\");\n            Self::write_makes(&owed.makes, counters);\n            self.dsb_ishst(counters);\n        }\n        if owed.need_isb || tlbis || made {\n            // This CPU's later instructions (and the return to a guest) see\n            // the completed maintenance and the new entries.\n            self.isb(counters);\n        }\n        if !owed.deferred_free.is_empty() {\n            let hook = *self.free_hook.lock();\n            if let Some(free) = hook {\n                free(&owed.deferred_free);\n            }\n        }",
        replace: "        if !owed.deferred_free.is_empty() {\n            let hook = *self.free_hook.lock();\n            if let Some(free) = hook {\n                free(&owed.deferred_free);\n            }\n        }\n        let tlbis = self.issue_tlbis(&owed.batch, counters);\n        let made = !owed.makes.is_empty();\n        if made {\n            // Deferred break-before-make: every break's invalidation has\n            // completed (the `DSB ISH` after `VMALLE1IS` above), so the new\n            // entries may now be written; one `DSB ISHST` makes them all\n            // visible, the `ISB` below synchronizes this CPU.\n            debug_assert!(tlbis, \"deferred makes without their breaks' TLBIs\");\n            Self::write_makes(&owed.makes, counters);\n            self.dsb_ishst(counters);\n        }\n        if owed.need_isb || tlbis || made {\n            // This CPU's later instructions (and the return to a guest) see\n            // the completed maintenance and the new entries.\n            self.isb(counters);\n        }",
        what: "flush() frees detached tables before issuing the TLBIs that hide them",
        expect: Expect::Killed,
    },
    Mutant {
        name: "no-dsb-ishst-before-tlbi",
        file: "src/mm/lazy.rs",
        find: "if owed.unsynced_writes || !owed.batch.is_empty() {",
        replace: "if owed.unsynced_writes && owed.batch.is_empty() {",
        what: "flush() issues TLBIs without the DSB ISHST that makes the writes visible first",
        expect: Expect::Killed,
    },
    Mutant {
        name: "leaf-only-tlbi-for-tables",
        file: "src/mm/lazy.rs",
        find: "let (leaf, ttl) = (kind.leaf_only(), kind.ttl());",
        replace: "let (leaf, ttl) = (true, kind.ttl());",
        what: "table removals invalidated with the leaf-only (...LE1IS) forms",
        expect: Expect::Killed,
    },
    Mutant {
        name: "no-vmalle1is",
        file: "src/mm/lazy.rs",
        find: "                self.arch.tlbi_vmalle1is(*vmid);\n",
        replace: "",
        what: "combined stage-1+2 entries never invalidated",
        expect: Expect::Killed,
    },
    Mutant {
        name: "wrong-ttl-level",
        file: "src/mm/lazy.rs",
        find: "            Self::Leaf(level) => Some(level),",
        replace: "            Self::Leaf(_) => Some(3),",
        what: "every leaf TLBI hinted as level 3 (blocks left cached)",
        expect: Expect::Killed,
    },
    Mutant {
        name: "threshold-gt",
        file: "src/mm/lazy.rs",
        find: "Budget::RangeOps(limit) => self.range_ops >= limit,",
        replace: "Budget::RangeOps(limit) => self.range_ops > limit,",
        what: "whole-VMID switch one range TLBI late (issue 10 asks for >=)",
        expect: Expect::Killed,
    },
    Mutant {
        name: "table-removal-as-leaf",
        file: "src/mm/stage2.rs",
        find: "            _ if detached_table => InvalKind::Table,\n            Some(level) => InvalKind::Leaf(level as u8),\n            None => InvalKind::Table,\n",
        replace: "            _ if detached_table => InvalKind::Leaf(3),\n            Some(level) => InvalKind::Leaf(level as u8),\n            None => InvalKind::Leaf(3),\n",
        what: "an unmap that detaches a table (a whole 2 MiB window of pages, an empty table under a new block, a merged region) queues a leaf-kind invalidation, which leaves the table entry in walk caches",
        expect: Expect::Killed,
    },
    Mutant {
        name: "pause-unchecked",
        file: "src/mm/lazy.rs",
        find: "        if cfg!(debug_assertions) {\n            let paused = self.is_paused();",
        replace: "        if false {\n            let paused = self.is_paused();",
        what: "stage-2 operations accepted between pause() and resume()",
        expect: Expect::Killed,
    },
    Mutant {
        name: "one-dsb-for-both-tlbi-rounds",
        file: "src/mm/lazy.rs",
        find: "        // entry from a stage-2 entry not yet gone.\n        self.dsb_ish(counters);\n",
        replace: "        // entry from a stage-2 entry not yet gone.\n        if !any_vmid {\n            self.dsb_ish(counters);\n        }\n",
        what: "VMALLE1IS issued before the stage-2 TLBIs completed (one DSB ISH for both rounds)",
        // The model completes the TLBIs one DSB ISH completes in issue
        // order, so it does not see this; the barrier-count tests do.
        expect: Expect::Killed,
    },
    Mutant {
        name: "make-before-break-completes",
        file: "src/mm/stage2.rs",
        find: "            self.mm.note_writes(windows.len() as u64, false);\n            self.complete_break();",
        replace: "            self.mm.note_writes(windows.len() as u64, false);\n            self.hand_over_detached();",
        what: "map over an empty table makes the block before the table's invalidation completed",
        expect: Expect::Killed,
    },
    Mutant {
        name: "deferred-make-before-break-flush",
        file: "src/mm/lazy.rs",
        find: "        cpu.owed.makes.extend(makes);",
        replace: "        let makes: Vec<DeferredMake> = makes.into_iter().collect();\n        Self::write_makes(&makes, self.counters());\n        cpu.owed.makes.extend(makes);",
        what: "a deferred make is written as it is recorded, before the flush that completes its break's invalidation",
        expect: Expect::Killed,
    },
    Mutant {
        name: "map-keeps-empty-tables",
        file: "src/mm/stage2.rs",
        find: "                    self.walk_leaves(&(start..start + PAGE_SIZE), |l| table = l.level > level);",
        replace: "                    self.walk_leaves(&(start..start + PAGE_SIZE), |l| table = l.level > 3);",
        what: "map and remap write pages into an empty (or replaced) table instead of one block",
        expect: Expect::Killed,
    },
    Mutant {
        name: "no-gib-merge",
        file: "src/mm/stage2.rs",
        find: "        for (gran, level) in [(BLOCK_1G, 1), (BLOCK_2M, 2)] {\n            let first = super::align_up(region.start, gran);",
        replace: "        for (gran, level) in [(BLOCK_2M, 2)] {\n            let first = super::align_up(region.start, gran);",
        what: "merge never builds a 1 GiB block",
        expect: Expect::Killed,
    },
    Mutant {
        name: "reserve-page-not-zeroed",
        file: "src/mm/pool.rs",
        find: "            unsafe { core::ptr::write_bytes(pa as *mut u8, 0, PAGE_SIZE) };\n        }\n        // The zeroes",
        replace: "            let _ = pa;\n        }\n        // The zeroes",
        what: "pages put in the reserve are not zeroed (a dirty freed page becomes a table)",
        expect: Expect::Killed,
    },
    Mutant {
        name: "reserve-pages-left-unmapped",
        file: "src/mm/pool.rs",
        find: "            self.guard_update(&taken, true);\n",
        replace: "",
        what: "reserve pages not made valid in the EL2 map (guard mode)",
        expect: Expect::Killed,
    },
    Mutant {
        name: "reserve-zeroing-not-owed",
        file: "src/mm/pool.rs",
        find: "        self.mm.note_stores();\n",
        replace: "",
        what: "the zeroing of reserve pages is never made visible by a DSB",
        expect: Expect::Killed,
    },
    Mutant {
        name: "no-final-dsb-ish",
        file: "src/mm/lazy.rs",
        find: "            // anything after the flush (a free, a make) relies on it.\n            self.dsb_ish(counters);\n",
        replace: "            // anything after the flush (a free, a make) relies on it.\n",
        what: "flush() returns before the DSB ISH that completes TLBI VMALLE1IS: other CPUs keep combined entries after the call returned",
        expect: Expect::Killed,
    },
    Mutant {
        name: "rebuild-prepares-after-breaking",
        file: "src/mm/stage2.rs",
        find: "        self.prepare(needed)?;\n        // A nest in the prepare step may have ended the section\n        // (`FlushInner`'s inner leave): then this pays at once, as the\n        // eager path does (break, flush, make). It may also have paid what\n        // the section owed (`Counted`'s inner leave): then entries that were\n        // invalid already have nothing left to wait for.\n        let now = !self.mm.in_lazy_mode();\n        let must_wait = rebuilds.iter().any(|r| {\n            !matches!(r.old, Old::Invalid)\n                || self.mm.stage2_invalidation_pending(\n                    self.vmid,\n                    r.entry.start as u64,\n                    (r.entry.end - r.entry.start) as u64,\n                )\n        });\n        // Break.\n        let mut breaks = 0;\n        for r in rebuilds {\n            match r.old {\n                Old::Leaf => self.unmap_entries(&r.entry, Some(r.level)),\n                Old::Table => self.unmap_entries(&r.entry, None),\n                Old::Invalid => continue,\n            }\n            breaks += 1;\n        }\n",
        replace: "        // A nest in the prepare step may have ended the section\n        // (`FlushInner`'s inner leave): then this pays at once, as the\n        // eager path does (break, flush, make). It may also have paid what\n        // the section owed (`Counted`'s inner leave): then entries that were\n        // invalid already have nothing left to wait for.\n        let now = !self.mm.in_lazy_mode();\n        let must_wait = rebuilds.iter().any(|r| {\n            !matches!(r.old, Old::Invalid)\n                || self.mm.stage2_invalidation_pending(\n                    self.vmid,\n                    r.entry.start as u64,\n                    (r.entry.end - r.entry.start) as u64,\n                )\n        });\n        // Break.\n        let mut breaks = 0;\n        for r in rebuilds {\n            match r.old {\n                Old::Leaf => self.unmap_entries(&r.entry, Some(r.level)),\n                Old::Table => self.unmap_entries(&r.entry, None),\n                Old::Invalid => continue,\n            }\n            breaks += 1;\n        }\n        self.prepare(needed)?;\n",
        what: "defer_rebuild takes its tables only after the breaks (moved below them): a failed allocation leaves broken entries behind",
        expect: Expect::Killed,
    },
    Mutant {
        name: "map-over-queued-invalidation-not-waiting",
        file: "src/mm/stage2.rs",
        find: "                || self.mm.stage2_invalidation_pending(",
        replace: "                || false && self.mm.stage2_invalidation_pending(",
        what: "a map over entries whose invalidation is still queued writes its entries at once instead of after the section's flush",
        expect: Expect::Killed,
    },
    Mutant {
        name: "no-clean-before-guest-map",
        file: "src/coherency.rs",
        find: "    pub fn before_guest_map(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {\n        self.after_hyp_write(ops, pa, len);",
        replace: "    pub fn before_guest_map(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {\n        let _ = (ops, pa, len);",
        what: "memory given to a guest without the clean to the point of coherency (no FWB)",
        expect: Expect::Killed,
    },
    Mutant {
        name: "no-clean-after-hyp-write",
        file: "src/coherency.rs",
        find: "    pub fn after_hyp_write(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {\n        if self == Self::Maintenance && len > 0 {",
        replace: "    pub fn after_hyp_write(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {\n        if false && len > 0 {",
        what: "a hypercall's result left in the cache, unseen by a guest with its caches off",
        expect: Expect::Killed,
    },
    Mutant {
        name: "no-clean-before-hyp-write",
        file: "src/coherency.rs",
        find: "    pub fn before_hyp_write(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {\n        self.before_hyp_read(ops, pa, len);",
        replace: "    pub fn before_hyp_write(self, ops: &dyn CacheOps, pa: PhysAddr, len: usize) {\n        let _ = (ops, pa, len);",
        what: "the hypervisor writes into a stale cached line, whose write-back undoes the guest's bytes",
        expect: Expect::Killed,
    },
];

/// The outcome of one mutant.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The mutant.
    pub mutant: Mutant,
    /// Whether the tests failed.
    pub killed: bool,
    /// How long build and tests took.
    pub elapsed: Duration,
}

impl Outcome {
    /// Whether the outcome is what the mutant expects.
    #[must_use]
    pub fn as_expected(&self) -> bool {
        match self.mutant.expect {
            Expect::Killed => self.killed,
            Expect::Equivalent(_) => !self.killed,
        }
    }
}

/// Applies `m` to `text`.
///
/// # Errors
///
/// If `m.find` does not occur exactly once (the mutant is out of date).
pub fn apply(m: &Mutant, text: &str) -> Result<String> {
    let n = text.matches(m.find).count();
    if n != 1 {
        bail!(
            "mutant {} is out of date: its text occurs {n} times in {} (want once)",
            m.name,
            m.file
        );
    }
    Ok(text.replacen(m.find, m.replace, 1))
}

/// Copies the workspace at `from` to `to` (which is emptied first),
/// skipping `target`, `.git` and the copy itself.
fn copy_workspace(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        fs::remove_dir_all(to).with_context(|| format!("emptying {}", to.display()))?;
    }
    copy_dir(from, to, &[from.join("target"), from.join(".git")])
}

fn copy_dir(from: &Path, to: &Path, skip: &[PathBuf]) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let path = entry.path();
        if skip.contains(&path) {
            continue;
        }
        let dest = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_dir(&path, &dest, skip)?;
        } else if kind.is_file() {
            fs::copy(&path, &dest).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// `cargo test -p lazyhyp --lib` in `work`, building into `target`.
/// Returns whether it passed.
fn host_tests(work: &Path, target: &Path, log: &Path) -> Result<bool> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = fs::File::create(log)?;
    let status = Command::new(cargo)
        .args(["test", "-p", "lazyhyp", "--lib", "--quiet"])
        .current_dir(work)
        .env("CARGO_TARGET_DIR", target)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("running cargo test")?;
    Ok(status.success())
}

/// Runs the hand-written mutants; returns whether every one did what it
/// expects. `only` restricts the run to the mutants with those names.
///
/// # Errors
///
/// If the copy cannot be made, cargo cannot be run, the unmutated tests
/// fail, or a mutant is out of date.
pub fn run_hand(root: &Path, only: &[String]) -> Result<bool> {
    let base = root.join("target").join("mutants");
    let work = base.join("work");
    let target = base.join("target");
    let logs = base.join("logs");
    copy_workspace(root, &work)?;
    fs::create_dir_all(&logs)?;
    let selected: Vec<&Mutant> = MUTANTS
        .iter()
        .filter(|m| only.is_empty() || only.iter().any(|n| n == m.name))
        .collect();
    if selected.is_empty() {
        bail!("no mutant named {only:?}");
    }
    // Every mutant applies to the tree as it is (before spending time).
    for m in &selected {
        apply(m, &fs::read_to_string(work.join(m.file))?)?;
    }
    let t = Instant::now();
    println!(
        "xtask mutants: baseline (unmutated) host tests in {}",
        work.display()
    );
    if !host_tests(&work, &target, &logs.join("baseline.log"))? {
        bail!(
            "the unmutated host tests fail (log: {}): fix them first",
            logs.join("baseline.log").display()
        );
    }
    println!(
        "xtask mutants: baseline passed ({:.0} s)",
        t.elapsed().as_secs_f64()
    );
    let mut outcomes = Vec::new();
    for m in selected {
        let path = work.join(m.file);
        let original = fs::read_to_string(&path)?;
        fs::write(&path, apply(m, &original)?)?;
        let t = Instant::now();
        let passed = host_tests(&work, &target, &logs.join(format!("{}.log", m.name)));
        // Put the file back whatever happened.
        fs::write(&path, &original)?;
        let o = Outcome {
            mutant: *m,
            killed: !passed?,
            elapsed: t.elapsed(),
        };
        println!(
            "xtask mutants: {:<30} {:<8} {:>4.0} s  {}",
            m.name,
            if o.killed { "killed" } else { "SURVIVED" },
            o.elapsed.as_secs_f64(),
            if o.as_expected() {
                "as expected"
            } else {
                "NOT AS EXPECTED"
            }
        );
        outcomes.push(o);
    }
    let report = report(&outcomes);
    fs::write(base.join("hand.md"), &report)?;
    print!("{report}");
    println!(
        "xtask mutants: report in {}; total {:.0} s",
        base.join("hand.md").display(),
        t.elapsed().as_secs_f64()
    );
    Ok(outcomes.iter().all(Outcome::as_expected))
}

/// A Markdown table of `outcomes` and the closing count line.
#[must_use]
pub fn report(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| mutant | file | what it breaks | expected | result |\n|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let expected = match o.mutant.expect {
            Expect::Killed => "killed",
            Expect::Equivalent(_) => "equivalent (survives)",
        };
        let result = if o.killed { "killed" } else { "survived" };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {expected} | {result} |",
            o.mutant.name, o.mutant.file, o.mutant.what
        );
    }
    let as_expected = outcomes.iter().filter(|o| o.as_expected()).count();
    let _ = writeln!(
        s,
        "mutants: {} passed, {} failed",
        as_expected,
        outcomes.len() - as_expected
    );
    s
}

/// `cargo mutants` over `src/mm/` (`.cargo/mutants.toml`), in the
/// workspace, with `budget` per mutant as timeout and `jobs` parallel
/// builds. Installs cargo-mutants if missing.
///
/// # Errors
///
/// If cargo-mutants cannot be installed or run.
pub fn run_full(root: &Path, files: &[String], budget: Duration, jobs: usize) -> Result<bool> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let have = Command::new(&cargo)
        .args(["mutants", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        println!("xtask mutants: installing cargo-mutants (cargo install cargo-mutants --locked)");
        let ok = Command::new(&cargo)
            .args(["install", "cargo-mutants", "--locked"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("could not install cargo-mutants; run: cargo install cargo-mutants --locked");
        }
    }
    let out = root.join("target").join("mutants").join("full");
    fs::create_dir_all(&out)?;
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root).args([
        "mutants",
        "--output",
        &out.display().to_string(),
        "--timeout",
        &budget.as_secs().to_string(),
        "--jobs",
        &jobs.to_string(),
    ]);
    for f in files {
        cmd.args(["--file", f]);
    }
    println!("xtask mutants: {cmd:?}");
    let status = cmd.status().context("running cargo mutants")?;
    println!(
        "xtask mutants: report in {} (outcomes.json, caught.txt, missed.txt)",
        out.join("mutants.out").display()
    );
    // cargo-mutants exits 2 when some mutants survived: a report, not an
    // error of the command.
    Ok(matches!(status.code(), Some(0 | 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mutant_applies_exactly_once_to_the_tree() {
        let root = xtask::workspace_root();
        for m in MUTANTS {
            let text = fs::read_to_string(root.join(m.file)).expect("source file");
            let mutated = apply(m, &text).unwrap_or_else(|e| panic!("{e}"));
            assert_ne!(mutated, text, "{} changes nothing", m.name);
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, m) in MUTANTS.iter().enumerate() {
            assert!(
                MUTANTS[i + 1..].iter().all(|o| o.name != m.name),
                "{} twice",
                m.name
            );
        }
    }

    #[test]
    fn a_stale_mutant_is_an_error() {
        let m = Mutant {
            name: "x",
            file: "f",
            find: "a",
            replace: "b",
            what: "",
            expect: Expect::Killed,
        };
        assert!(apply(&m, "aa").is_err());
        assert!(apply(&m, "c").is_err());
        assert_eq!(apply(&m, "cac").expect("applies"), "cbc");
    }

    #[test]
    fn the_report_counts_expected_outcomes() {
        let o = |expect, killed| Outcome {
            mutant: Mutant {
                name: "m",
                file: "f",
                find: "",
                replace: "",
                what: "",
                expect,
            },
            killed,
            elapsed: Duration::ZERO,
        };
        let r = report(&[
            o(Expect::Killed, true),
            o(Expect::Killed, false),
            o(Expect::Equivalent("why"), false),
        ]);
        assert!(r.ends_with("mutants: 2 passed, 1 failed\n"), "{r}");
    }

    #[test]
    fn the_copy_leaves_out_target_and_git() {
        let tmp = std::env::temp_dir().join(format!("xtask-mutants-{}", std::process::id()));
        let src = tmp.join("src");
        fs::create_dir_all(src.join("target/x")).expect("mkdir");
        fs::create_dir_all(src.join(".git")).expect("mkdir");
        fs::create_dir_all(src.join("a/b")).expect("mkdir");
        fs::write(src.join("a/b/f.rs"), "x").expect("write");
        let dst = tmp.join("dst");
        copy_workspace(&src, &dst).expect("copy");
        assert!(dst.join("a/b/f.rs").is_file());
        assert!(!dst.join("target").exists() && !dst.join(".git").exists());
        fs::remove_dir_all(&tmp).expect("cleanup");
    }
}
