//! Parsing a run's output markers and judging it (the "Output markers" and
//! "Exit status" parts of the contract).

use std::fmt;
use std::time::Duration;

const RESULT_MARKER: &str = "LAZYHYP-RESULT:";
const STATS_MARKER: &str = "LAZYHYP-STATS:";
const EXIT_MARKER: &str = "LAZYHYP-EXIT:";
const VM_MARKER: &str = "LAZYHYP-VM:";
const MARKER_PREFIX: &str = "LAZYHYP-";
/// The prefix the hypervisor puts in front of every line of the guest's
/// console output (emulated UART).
pub const GUEST_PREFIX: &str = "vm1| ";

/// A marker line of this run: `LAZYHYP-<KIND>: token=<token> <rest>` at the
/// very start of the line, with the token xtask gave the hypervisor. Returns
/// (kind, rest). Anything else (another token, none, text before it) is not
/// the hypervisor's and is not believed.
#[must_use]
pub fn trusted_marker<'a>(line: &'a str, token: &str) -> Option<(&'a str, &'a str)> {
    let line = line.trim_end_matches(['\r', '\n']);
    let rest = line.strip_prefix(MARKER_PREFIX)?;
    let (kind, rest) = rest.split_once(": ")?;
    if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_uppercase()) || token.is_empty() {
        return None;
    }
    let rest = rest.strip_prefix("token=")?.strip_prefix(token)?;
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    Some((kind, rest.trim_start()))
}

/// A guest console line without the hypervisor's prefix (lines printed
/// through a passed-through UART have none).
fn guest_line(line: &str) -> &str {
    line.strip_prefix(GUEST_PREFIX).unwrap_or(line)
}

/// Pass and fail counts, from the guest's closing line or `LAZYHYP-RESULT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSummary {
    /// Tests that passed.
    pub passed: u32,
    /// Tests that failed.
    pub failed: u32,
}

/// The `LAZYHYP-EXIT: code=N reason=<word>` marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitMarker {
    /// The exit code the hypervisor is about to hand to QEMU.
    pub code: i32,
    /// The reason word (empty when absent).
    pub reason: String,
}

/// One guest line `test <name> ... ok` / `test <name> ... FAILED`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestLine {
    /// The test's name.
    pub name: String,
    /// `true` for `ok`, `false` for `FAILED`.
    pub ok: bool,
}

/// The judgement of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything the contract asks for was seen.
    Pass,
    /// Anything else, with the reason.
    Fail(String),
}

impl Verdict {
    /// `true` for [`Verdict::Pass`].
    #[must_use]
    pub fn is_pass(&self) -> bool {
        matches!(self, Self::Pass)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pass => f.write_str("PASS"),
            Self::Fail(reason) => write!(f, "FAIL: {reason}"),
        }
    }
}

/// What a run status ([`RunOutcome::status`], the exit status of
/// `cargo xtask qemu`) means under the contract.
#[must_use]
pub fn exit_code_meaning(code: i32) -> &'static str {
    match code {
        0 => "the guest reported no failures and powered off",
        1 => "the guest reported one or more failures",
        2 => {
            "no report: the guest powered off without reporting results, or the run hung or ended without the hypervisor's exit marker"
        }
        3 => "hypervisor panic or unexpected exception",
        4 => "hypervisor setup error",
        _ => "not a code of the run contract (xtask itself failed?)",
    }
}

/// `key=value` tokens after a marker, in order; tokens without `=` are skipped.
fn key_values(rest: &str) -> impl Iterator<Item = (&str, &str)> {
    rest.split_whitespace().filter_map(|t| t.split_once('='))
}

/// The text after `marker` when the line carries it.
fn after_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// Parses the guest's closing line `guest: N passed, M failed`.
#[must_use]
pub fn parse_guest_summary(line: &str) -> Option<GuestSummary> {
    let rest = line.trim().strip_prefix("guest:")?.trim();
    let (passed, failed) = rest.split_once(',')?;
    let passed = passed.trim().strip_suffix("passed")?.trim().parse().ok()?;
    let failed = failed.trim().strip_suffix("failed")?.trim().parse().ok()?;
    Some(GuestSummary { passed, failed })
}

/// Parses `LAZYHYP-RESULT: passed=N failed=M`.
#[must_use]
pub fn parse_result_marker(line: &str) -> Option<GuestSummary> {
    let rest = after_marker(line, RESULT_MARKER)?;
    let (mut passed, mut failed) = (None, None);
    for (key, value) in key_values(rest) {
        match key {
            "passed" => passed = value.parse().ok(),
            "failed" => failed = value.parse().ok(),
            _ => {}
        }
    }
    Some(GuestSummary {
        passed: passed?,
        failed: failed?,
    })
}

/// Parses `LAZYHYP-EXIT: code=N reason=<word>`.
#[must_use]
pub fn parse_exit_marker(line: &str) -> Option<ExitMarker> {
    let rest = after_marker(line, EXIT_MARKER)?;
    let (mut code, mut reason) = (None, String::new());
    for (key, value) in key_values(rest) {
        match key {
            "code" => code = value.parse().ok(),
            "reason" => value.clone_into(&mut reason),
            _ => {}
        }
    }
    Some(ExitMarker {
        code: code?,
        reason,
    })
}

/// One VM's verdict: `LAZYHYP-VM: vm=N kind=K status=S reason=R passed=P
/// failed=F resets=X`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmMarker {
    /// The VM's number (1 first).
    pub vm: usize,
    /// `test` or `linux`.
    pub kind: String,
    /// Its status under the run contract (0 pass).
    pub status: i32,
    /// Why it ended.
    pub reason: String,
    /// The test guest's report (0, 0 for Linux).
    pub passed: u64,
    /// The test guest's failures.
    pub failed: u64,
    /// Times it was reset.
    pub resets: u64,
}

/// Parses a `LAZYHYP-VM:` marker.
#[must_use]
pub fn parse_vm_marker(line: &str) -> Option<VmMarker> {
    let rest = after_marker(line, VM_MARKER)?;
    let mut m = VmMarker {
        vm: 0,
        kind: String::new(),
        status: -1,
        reason: String::new(),
        passed: 0,
        failed: 0,
        resets: 0,
    };
    for (key, value) in key_values(rest) {
        match key {
            "vm" => m.vm = value.parse().ok()?,
            "kind" => value.clone_into(&mut m.kind),
            "status" => m.status = value.parse().ok()?,
            "reason" => value.clone_into(&mut m.reason),
            "passed" => m.passed = value.parse().ok()?,
            "failed" => m.failed = value.parse().ok()?,
            "resets" => m.resets = value.parse().ok()?,
            _ => {}
        }
    }
    (m.vm > 0 && m.status >= 0).then_some(m)
}

/// Parses `LAZYHYP-STATS: key=value ...` into its pairs, in order.
#[must_use]
pub fn parse_stats(line: &str) -> Option<Vec<(String, String)>> {
    let rest = after_marker(line, STATS_MARKER)?;
    Some(
        key_values(rest)
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// Parses a guest line `test <name> ... ok` or `test <name> ... FAILED`.
#[must_use]
pub fn parse_test_line(line: &str) -> Option<TestLine> {
    let rest = line.trim().strip_prefix("test ")?;
    let (name, status) = rest.rsplit_once(" ... ")?;
    let status = status.trim();
    let ok = match status {
        "ok" => true,
        // The guest adds the reason: `FAILED: <reason>`.
        s if s == "FAILED" || s.starts_with("FAILED:") => false,
        _ => return None,
    };
    Some(TestLine {
        name: name.trim().to_owned(),
        ok,
    })
}

/// A finished QEMU run: what it printed, how it ended, and what the markers say.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Everything QEMU printed (stdout and stderr), line by line.
    pub output: String,
    /// QEMU's exit code; `None` when it was ended by a signal (e.g. killed).
    pub exit_code: Option<i32>,
    /// The run exceeded its time limit and QEMU was killed.
    pub timed_out: bool,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// QEMU's CPU time (user + system), where the run measured it.
    pub cpu: Duration,
    /// The last guest closing line `guest: N passed, M failed`.
    pub summary: Option<GuestSummary>,
    /// The last `LAZYHYP-RESULT` marker.
    pub result: Option<GuestSummary>,
    /// The last `LAZYHYP-EXIT` marker.
    pub exit: Option<ExitMarker>,
    /// The pairs of the last `LAZYHYP-STATS` marker, in printed order.
    pub stats: Option<Vec<(String, String)>>,
    /// The first line carrying `LAZYHYP-PANIC`.
    pub panic: Option<String>,
    /// The guest's per-test lines, in order.
    pub tests: Vec<TestLine>,
    /// The run's marker lines, as (kind, text after the token), in order.
    pub markers: Vec<(String, String)>,
    /// Lines that carry `LAZYHYP-` but are not this run's markers (guest
    /// output that imitates them): shown, never believed.
    pub forged: Vec<String>,
    /// Each VM's verdict, in the order the VMs ended.
    pub vms: Vec<VmMarker>,
}

impl RunOutcome {
    /// Parses the markers out of `output`: only lines that
    /// [`trusted_marker`] accepts with `token` are the hypervisor's.
    #[must_use]
    pub fn from_output(
        output: String,
        exit_code: Option<i32>,
        timed_out: bool,
        elapsed: Duration,
        token: &str,
    ) -> Self {
        let mut outcome = Self {
            output: String::new(),
            exit_code,
            timed_out,
            elapsed,
            cpu: Duration::ZERO,
            summary: None,
            result: None,
            exit: None,
            stats: None,
            panic: None,
            tests: Vec::new(),
            markers: Vec::new(),
            forged: Vec::new(),
            vms: Vec::new(),
        };
        for line in output.lines() {
            if let Some((kind, rest)) = trusted_marker(line, token) {
                let normalised = format!("{MARKER_PREFIX}{kind}: {rest}");
                if kind == "PANIC" && outcome.panic.is_none() {
                    outcome.panic = Some(normalised.clone());
                } else if let Some(r) = parse_result_marker(&normalised) {
                    outcome.result = Some(r);
                } else if let Some(e) = parse_exit_marker(&normalised) {
                    outcome.exit = Some(e);
                } else if let Some(s) = parse_stats(&normalised) {
                    outcome.stats = Some(s);
                } else if let Some(v) = parse_vm_marker(&normalised) {
                    outcome.vms.push(v);
                }
                outcome.markers.push((kind.to_owned(), rest.to_owned()));
                continue;
            }
            if line.contains(MARKER_PREFIX) {
                outcome.forged.push(line.to_owned());
            }
            let line = guest_line(line);
            if let Some(s) = parse_guest_summary(line) {
                outcome.summary = Some(s);
            } else if let Some(t) = parse_test_line(line) {
                outcome.tests.push(t);
            }
        }
        outcome.output = output;
        outcome
    }

    /// The run's status under the contract (docs/run-contract.md): the
    /// code of this run's `LAZYHYP-EXIT` marker; 2 (no report) when there
    /// is none (a hang, a QEMU that died, a hypervisor that never got to
    /// say).
    #[must_use]
    pub fn status(&self) -> i32 {
        match (&self.exit, self.verdict()) {
            (_, Verdict::Pass) => 0,
            (Some(e), _) if e.code != 0 => e.code,
            // The hypervisor said 0 but something contradicts it (the
            // closing line, a FAILED test, QEMU's own status).
            (Some(_), _) => 1,
            (None, _) => 2,
        }
    }

    /// The value of one `LAZYHYP-STATS` key.
    #[must_use]
    pub fn stat(&self, key: &str) -> Option<&str> {
        self.stats
            .as_ref()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The one-line stage-2 summary: `stage2: key=value key=value ...` in the
    /// order the hypervisor printed them.
    #[must_use]
    pub fn stage2_line(&self) -> String {
        match &self.stats {
            None => "stage2: (no LAZYHYP-STATS line)".to_owned(),
            Some(stats) => {
                let mut line = String::from("stage2:");
                for (k, v) in stats {
                    line.push(' ');
                    line.push_str(k);
                    line.push('=');
                    line.push_str(v);
                }
                line
            }
        }
    }

    /// Names of the guest tests that printed `FAILED`.
    #[must_use]
    pub fn failed_tests(&self) -> Vec<&str> {
        self.tests
            .iter()
            .filter(|t| !t.ok)
            .map(|t| t.name.as_str())
            .collect()
    }

    fn failure_context(&self) -> String {
        let mut context = Vec::new();
        if let Some(s) = self.summary {
            context.push(format!("guest: {} passed, {} failed", s.passed, s.failed));
        }
        let failed = self.failed_tests();
        if !failed.is_empty() {
            context.push(format!("failed tests: {}", failed.join(", ")));
        }
        if let Some(e) = &self.exit {
            context.push(format!("LAZYHYP-EXIT code={} reason={}", e.code, e.reason));
        }
        if context.is_empty() {
            String::new()
        } else {
            format!(" [{}]", context.join("; "))
        }
    }

    /// Pass only when QEMU exited 0, `LAZYHYP-EXIT: code=0` was seen and the
    /// guest's closing line says `N passed, 0 failed` with N > 0 (and nothing
    /// contradicts that: no panic marker, no `FAILED` test line, no
    /// `LAZYHYP-RESULT` that disagrees). A timed-out run is a hang.
    #[must_use]
    pub fn verdict(&self) -> Verdict {
        let ctx = self.failure_context();
        if self.timed_out {
            return Verdict::Fail(format!(
                "hang: no exit after {:.1} s, QEMU was killed{ctx}",
                self.elapsed.as_secs_f64()
            ));
        }
        if let Some(panic) = &self.panic {
            return Verdict::Fail(format!("hypervisor panic: {panic}{ctx}"));
        }
        let Some(code) = self.exit_code else {
            return Verdict::Fail(format!("QEMU was ended by a signal{ctx}"));
        };
        if code != 0 {
            return Verdict::Fail(format!(
                "QEMU itself exited with status {code} (the hypervisor powers off with status 0){ctx}"
            ));
        }
        let Some(exit) = &self.exit else {
            return Verdict::Fail(format!(
                "no LAZYHYP-EXIT line with this run's token{}{ctx}",
                if self.forged.is_empty() {
                    String::new()
                } else {
                    format!(" ({} forged marker lines ignored)", self.forged.len())
                }
            ));
        };
        if exit.code != 0 {
            return Verdict::Fail(format!(
                "LAZYHYP-EXIT code={} reason={}{ctx}",
                exit.code, exit.reason
            ));
        }
        if let Some(vm) = self.vms.iter().find(|v| v.status != 0) {
            return Verdict::Fail(format!(
                "vm{} ({}) ended with status {} ({}){ctx}",
                vm.vm, vm.kind, vm.status, vm.reason
            ));
        }
        let Some(summary) = self.summary else {
            return Verdict::Fail(format!(
                "the guest's closing line `guest: N passed, M failed` is missing{ctx}"
            ));
        };
        if summary.failed > 0 {
            return Verdict::Fail(format!("guest reported failures{ctx}"));
        }
        if summary.passed == 0 {
            return Verdict::Fail(format!("guest ran zero tests{ctx}"));
        }
        if !self.failed_tests().is_empty() {
            return Verdict::Fail(format!(
                "a test printed FAILED but the closing line says 0 failed{ctx}"
            ));
        }
        if let Some(result) = self.result
            && result != summary
        {
            return Verdict::Fail(format!(
                "LAZYHYP-RESULT passed={} failed={} disagrees with the guest's closing line{ctx}",
                result.passed, result.failed
            ));
        }
        Verdict::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSING: &str = "\
lazyhyp: EL2 entered, log=info
[ INFO] stage-2: root at 0x40400000
test stage2_map_lazy ... ok
test stage2_unmap_tlbi ... ok
test fp_state_survives_exits ... ok
guest: 3 passed, 0 failed
LAZYHYP-RESULT: token=t0k passed=3 failed=0
LAZYHYP-STATS: token=t0k mappings=12 pages_mapped=4096 batches=3 tlbi=5 exits_hvc=7 exits_dabt=2
LAZYHYP-EXIT: token=t0k code=0 reason=system_off
";

    const FAILING: &str = "\
test stage2_map_lazy ... ok
test deliberate_failure ... FAILED
guest: 1 passed, 1 failed
LAZYHYP-RESULT: token=t0k passed=1 failed=1
LAZYHYP-STATS: token=t0k mappings=3 pages_mapped=16 exits_hvc=2
LAZYHYP-EXIT: token=t0k code=1 reason=failures
";

    const PANICKING: &str = "\
test stage2_map_lazy ... ok
LAZYHYP-PANIC: token=t0k unexpected exception ESR=0x96000045 FAR=0x0 ELR=0x40201234
LAZYHYP-EXIT: token=t0k code=3 reason=panic
";

    fn outcome(output: &str, code: Option<i32>) -> RunOutcome {
        RunOutcome::from_output(
            output.to_owned(),
            code,
            false,
            Duration::from_secs(1),
            "t0k",
        )
    }

    fn reason(v: &Verdict) -> &str {
        match v {
            Verdict::Pass => panic!("expected a failure"),
            Verdict::Fail(r) => r,
        }
    }

    #[test]
    fn guest_summary_line() {
        assert_eq!(
            parse_guest_summary("guest: 12 passed, 0 failed"),
            Some(GuestSummary {
                passed: 12,
                failed: 0
            })
        );
        assert_eq!(
            parse_guest_summary("  guest: 1 passed, 2 failed\r"),
            Some(GuestSummary {
                passed: 1,
                failed: 2
            })
        );
        assert_eq!(parse_guest_summary("guest: 1 passed"), None);
        assert_eq!(parse_guest_summary("guest: x passed, 0 failed"), None);
        assert_eq!(parse_guest_summary("test result: 1 passed, 0 failed"), None);
        assert_eq!(parse_guest_summary("guest: -1 passed, 0 failed"), None);
    }

    #[test]
    fn vm_marker() {
        assert_eq!(
            parse_vm_marker(
                "LAZYHYP-VM: vm=2 kind=linux status=0 reason=system-off passed=0 failed=0 resets=1"
            ),
            Some(VmMarker {
                vm: 2,
                kind: "linux".into(),
                status: 0,
                reason: "system-off".into(),
                passed: 0,
                failed: 0,
                resets: 1
            })
        );
        assert_eq!(parse_vm_marker("LAZYHYP-VM: kind=test status=0"), None);
        assert_eq!(parse_vm_marker("LAZYHYP-VM: vm=1 status=x"), None);
    }

    #[test]
    fn result_marker() {
        assert_eq!(
            parse_result_marker("LAZYHYP-RESULT: passed=4 failed=1"),
            Some(GuestSummary {
                passed: 4,
                failed: 1
            })
        );
        assert_eq!(parse_result_marker("LAZYHYP-RESULT: passed=4"), None);
        assert_eq!(parse_result_marker("guest: 4 passed, 0 failed"), None);
    }

    #[test]
    fn exit_marker() {
        assert_eq!(
            parse_exit_marker("LAZYHYP-EXIT: code=0 reason=system_off"),
            Some(ExitMarker {
                code: 0,
                reason: "system_off".into()
            })
        );
        assert_eq!(
            parse_exit_marker("LAZYHYP-EXIT: code=4"),
            Some(ExitMarker {
                code: 4,
                reason: String::new()
            })
        );
        assert_eq!(parse_exit_marker("LAZYHYP-EXIT: reason=x"), None);
        assert_eq!(parse_exit_marker("LAZYHYP-EXIT: code=zero"), None);
        assert_eq!(parse_exit_marker("nothing here"), None);
    }

    #[test]
    fn stats_marker_keeps_order() {
        let stats = parse_stats("LAZYHYP-STATS: b=2 a=1 junk exits_hvc=0x10").expect("stats");
        let keys: Vec<_> = stats.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a", "exits_hvc"]);
        assert_eq!(stats[2].1, "0x10");
        assert_eq!(parse_stats("LAZYHYP-STATS:"), Some(vec![]));
        assert_eq!(parse_stats("LAZYHYP-EXIT: code=0"), None);
    }

    #[test]
    fn test_lines() {
        assert_eq!(
            parse_test_line("test stage2::map ... ok"),
            Some(TestLine {
                name: "stage2::map".into(),
                ok: true
            })
        );
        assert_eq!(
            parse_test_line("test a ... b ... FAILED"),
            Some(TestLine {
                name: "a ... b".into(),
                ok: false
            })
        );
        assert_eq!(parse_test_line("test x ... maybe"), None);
        assert_eq!(
            parse_test_line("test x ... FAILED: no luck"),
            Some(TestLine {
                name: "x".into(),
                ok: false
            })
        );
        assert_eq!(parse_test_line("test x ... FAILEDX"), None);
        assert_eq!(parse_test_line("testing ... ok"), None);
    }

    #[test]
    fn passing_run_passes() {
        let o = outcome(PASSING, Some(0));
        assert_eq!(o.verdict(), Verdict::Pass);
        assert_eq!(
            o.summary,
            Some(GuestSummary {
                passed: 3,
                failed: 0
            })
        );
        assert_eq!(o.result, o.summary);
        assert_eq!(o.exit.as_ref().map(|e| e.code), Some(0));
        assert_eq!(o.tests.len(), 3);
        assert_eq!(o.stat("pages_mapped"), Some("4096"));
        assert_eq!(o.stat("nope"), None);
        assert_eq!(
            o.stage2_line(),
            "stage2: mappings=12 pages_mapped=4096 batches=3 tlbi=5 exits_hvc=7 exits_dabt=2"
        );
        assert!(o.panic.is_none());
        assert!(o.output.contains("root at 0x40400000"));
    }

    #[test]
    fn failing_run_fails() {
        let o = outcome(FAILING, Some(1));
        let v = o.verdict();
        let r = reason(&v);
        assert!(r.contains("code=1"), "{r}");
        assert_eq!(o.status(), 1);
        assert!(r.contains("deliberate_failure"), "{r}");
        assert_eq!(o.failed_tests(), ["deliberate_failure"]);
        assert_eq!(o.exit.as_ref().map(|e| e.code), Some(1));
        assert_eq!(o.summary.map(|s| s.failed), Some(1));
    }

    #[test]
    fn failures_fail_even_with_exit_code_zero() {
        let o = outcome(&FAILING.replace("code=1", "code=0"), Some(0));
        assert!(reason(&o.verdict()).contains("guest reported failures"));
    }

    #[test]
    fn panic_marker_fails() {
        let o = outcome(PANICKING, Some(3));
        let v = o.verdict();
        assert!(
            reason(&v).starts_with("hypervisor panic: LAZYHYP-PANIC"),
            "{v}"
        );
        assert_eq!(o.status(), 3);
        // Even if the exit code were 0, a panic line is a failure.
        let o = outcome(
            &format!("{PASSING}LAZYHYP-PANIC: token=t0k late\n"),
            Some(0),
        );
        assert!(!o.verdict().is_pass());
    }

    #[test]
    fn timeout_is_a_hang() {
        let o = RunOutcome::from_output(PASSING.into(), None, true, Duration::from_mins(1), "t0k");
        assert!(reason(&o.verdict()).starts_with("hang"));
    }

    #[test]
    fn nonzero_exit_code_fails() {
        let o = outcome(PASSING, Some(2));
        assert!(reason(&o.verdict()).contains("QEMU itself exited"));
        assert_eq!(o.status(), 1);
        let o = outcome(PASSING, None);
        assert!(reason(&o.verdict()).contains("signal"));
    }

    #[test]
    fn missing_markers_fail() {
        let without = |marker: &str| {
            let mut kept = String::new();
            for line in PASSING.lines().filter(|l| !l.starts_with(marker)) {
                kept.push_str(line);
                kept.push('\n');
            }
            kept
        };
        let o = outcome(&without("LAZYHYP-EXIT"), Some(0));
        assert!(reason(&o.verdict()).contains("no LAZYHYP-EXIT"));
        assert_eq!(o.status(), 2, "no report");
        let o = outcome(&without("guest:"), Some(0));
        assert!(reason(&o.verdict()).contains("closing line"));
        // STATS and RESULT are not part of the pass rule.
        assert!(
            outcome(&without("LAZYHYP-STATS"), Some(0))
                .verdict()
                .is_pass()
        );
        assert!(
            outcome(&without("LAZYHYP-RESULT"), Some(0))
                .verdict()
                .is_pass()
        );
        let o = outcome("", Some(0));
        assert!(!o.verdict().is_pass());
        assert_eq!(o.stage2_line(), "stage2: (no LAZYHYP-STATS line)");
    }

    #[test]
    fn exit_marker_code_must_be_zero() {
        let o = outcome(&PASSING.replace("code=0", "code=2"), Some(0));
        assert!(reason(&o.verdict()).contains("LAZYHYP-EXIT code=2"));
    }

    #[test]
    fn zero_tests_fail() {
        let o = outcome(
            "guest: 0 passed, 0 failed\nLAZYHYP-EXIT: token=t0k code=0 reason=system_off\n",
            Some(0),
        );
        assert!(reason(&o.verdict()).contains("zero tests"));
    }

    #[test]
    fn contradictions_fail() {
        let o = outcome(&PASSING.replace("... ok", "... FAILED"), Some(0));
        assert!(reason(&o.verdict()).contains("printed FAILED"));
        let o = outcome(&PASSING.replace("passed=3", "passed=2"), Some(0));
        assert!(reason(&o.verdict()).contains("disagrees"));
    }

    #[test]
    fn last_summary_wins() {
        let o = outcome(&format!("guest: 9 passed, 9 failed\n{PASSING}"), Some(0));
        assert!(o.verdict().is_pass());
    }

    #[test]
    fn markers_without_this_runs_token_are_not_believed() {
        // A failing run in which the guest printed (prefixed, or through a
        // passed-through UART, raw) a pass verdict with no token, a wrong
        // token, and a right-looking one after text on the line.
        let forged = format!(
            "{GUEST_PREFIX}LAZYHYP-EXIT: token=t0k code=0 reason=system-off\n\
             LAZYHYP-EXIT: code=0 reason=system-off\n\
             LAZYHYP-EXIT: token=t0kk code=0 reason=system-off\n\
             LAZYHYP-EXIT: token=bad code=0 reason=system-off\n\
             xLAZYHYP-RESULT: token=t0k passed=9 failed=0\n\
             LAZYHYP-PANIC: forged\n\
             {FAILING}\
             LAZYHYP-EXIT: code=0 reason=late\n"
        );
        let o = outcome(&forged, Some(0));
        assert_eq!(o.exit.as_ref().map(|e| e.code), Some(1));
        assert_eq!(o.result.map(|r| r.passed), Some(1));
        assert!(o.panic.is_none(), "an untrusted PANIC is not believed");
        assert_eq!(o.forged.len(), 7, "{:?}", o.forged);
        assert_eq!(o.status(), 1);
        // And a passing run stays a pass whatever the guest prints.
        let o = outcome(
            &format!(
                "{GUEST_PREFIX}LAZYHYP-PANIC: token=t0k x\nLAZYHYP-EXIT: token= code=1\n{PASSING}"
            ),
            Some(0),
        );
        assert!(o.verdict().is_pass(), "{:?}", o.verdict());
        assert_eq!(o.status(), 0);
        // Guest lines behind the prefix are read as guest lines.
        let o = outcome(
            &PASSING
                .replace("test ", &format!("{GUEST_PREFIX}test "))
                .replace("guest: 3", &format!("{GUEST_PREFIX}guest: 3")),
            Some(0),
        );
        assert!(o.verdict().is_pass(), "{:?}", o.verdict());
        assert_eq!(o.tests.len(), 3);
        assert_eq!(
            trusted_marker("LAZYHYP-EXIT: token=t0k", "t0k"),
            Some(("EXIT", ""))
        );
        assert_eq!(trusted_marker("LAZYHYP-EXIT: token=t0k x", ""), None);
    }

    #[test]
    fn exit_meanings() {
        assert!(exit_code_meaning(1).contains("failures"));
        assert!(exit_code_meaning(3).contains("panic"));
        assert!(exit_code_meaning(77).contains("not a code"));
    }
}
