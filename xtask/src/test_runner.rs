//! `cargo xtask test`: the host test suite, which includes the QEMU
//! integration tests of `tests/`.

use std::env;
use std::io::{self, Read, Write};
use std::process::Stdio;

use anyhow::{Context, Result};

use crate::artifacts::{build, cargo_command};
use crate::qemu::ensure_qemu;

/// Test threads: the machine has 2 cores and each QEMU test keeps one busy.
const TEST_THREADS: &str = "2";

/// Totals over the `test result:` lines of one `cargo test` run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestTotals {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests that were ignored.
    pub ignored: u64,
    /// Number of `test result:` lines (test binaries and doctest runs).
    pub suites: u64,
    /// Whether `cargo test` exited successfully.
    pub success: bool,
}

/// Parses libtest's `test result: ok. 5 passed; 0 failed; 1 ignored; ...`
/// into (passed, failed, ignored).
#[must_use]
pub fn parse_test_result_line(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    let (mut passed, mut failed, mut ignored) = (None, None, None);
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse() else { continue };
        match what {
            "passed" => passed = Some(n),
            "failed" => failed = Some(n),
            "ignored" => ignored = Some(n),
            _ => {}
        }
    }
    Some((passed?, failed?, ignored.unwrap_or(0)))
}

/// Runs the host test suite: makes sure QEMU is there, builds the hypervisor
/// and guest once (so build errors show up plainly), then runs
/// `cargo test --workspace --exclude guest --no-fail-fast` with at most 2
/// test threads,
/// streaming its output and adding up its `test result:` lines.
///
/// # Errors
/// When QEMU cannot be had, the build fails or cargo cannot be started; a
/// failing test is reported through [`TestTotals::success`].
pub fn run_host_tests() -> Result<TestTotals> {
    let qemu = ensure_qemu()?;
    eprintln!("xtask: using {}", qemu.display());
    build(true)?;

    let mut cmd = cargo_command();
    // Every suite runs even after one fails, so the summary counts them all.
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        "guest",
        "--no-fail-fast",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    if env::var_os("RUST_TEST_THREADS").is_none() {
        cmd.env("RUST_TEST_THREADS", TEST_THREADS);
    }
    eprintln!(
        "xtask: cargo test --workspace --exclude guest --no-fail-fast (RUST_TEST_THREADS={TEST_THREADS})"
    );
    let mut child = cmd.spawn().context("could not run `cargo test`")?;

    // Copy cargo test's stdout through as it comes, keeping it for the totals.
    let mut seen = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let mut buf = [0_u8; 8192];
        let stdout = io::stdout();
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading cargo test's output"),
            };
            let mut lock = stdout.lock();
            lock.write_all(&buf[..n])?;
            lock.flush()?;
            seen.extend_from_slice(&buf[..n]);
        }
    }
    let status = child.wait().context("waiting for cargo test")?;

    let mut totals = TestTotals {
        success: status.success(),
        ..TestTotals::default()
    };
    for line in String::from_utf8_lossy(&seen).lines() {
        if let Some((passed, failed, ignored)) = parse_test_result_line(line) {
            totals.passed += passed;
            totals.failed += failed;
            totals.ignored += ignored;
            totals.suites += 1;
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_result_lines() {
        assert_eq!(
            parse_test_result_line(
                "test result: ok. 15 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some((15, 0, 2))
        );
        assert_eq!(
            parse_test_result_line(
                "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 12.50s"
            ),
            Some((1, 1, 0))
        );
        assert_eq!(parse_test_result_line("test foo ... ok"), None);
        assert_eq!(parse_test_result_line("guest: 1 passed, 0 failed"), None);
    }
}
