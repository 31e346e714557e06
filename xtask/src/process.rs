//! Spawning a process, streaming and capturing its output, and killing it
//! when a time limit passes.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What a finished (or killed) process left behind.
#[derive(Debug, Clone)]
pub struct Captured {
    /// stdout and stderr, line by line in the order the lines arrived, each
    /// line ending in `\n` (a trailing `\r` is dropped).
    pub output: String,
    /// The exit status (after the kill, when it timed out).
    pub status: ExitStatus,
    /// The time limit passed and the process was killed.
    pub timed_out: bool,
    /// Wall time from spawn until the process was reaped.
    pub elapsed: Duration,
    /// CPU time (user + system) of the process and of the children it
    /// waited for, as the kernel accounted them when it was reaped.
    pub cpu: Duration,
}

/// The CPU time (user + system) of every child this process has reaped so
/// far (`getrusage(RUSAGE_CHILDREN)`); zero where it cannot be read.
#[must_use]
pub fn reaped_children_cpu() -> Duration {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed value we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_CHILDREN, &raw mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// How long to keep collecting lines that were already read when the process
/// ended (a grandchild may hold the pipes open; we do not wait for it).
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Poll interval while waiting for a process whose outputs are closed.
const POLL: Duration = Duration::from_millis(20);

fn spawn_reader<R: Read + Send + 'static>(pipe: R, tx: Sender<String>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while matches!(buf.last(), Some(b'\n' | b'\r')) {
                        buf.pop();
                    }
                    if tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Waits for `child` until `deadline`; kills it when the deadline passes.
/// Returns the status and whether it had to be killed.
fn wait_until(child: &mut Child, deadline: Option<Instant>) -> Result<(ExitStatus, bool)> {
    let Some(deadline) = deadline else {
        return Ok((child.wait().context("waiting for the process")?, false));
    };
    loop {
        if let Some(status) = child.try_wait().context("waiting for the process")? {
            return Ok((status, false));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok((kill(child)?, true));
        }
        thread::sleep(POLL.min(deadline - now));
    }
}

fn kill(child: &mut Child) -> Result<ExitStatus> {
    // An error here means it already exited; wait() tells either way.
    let _ = child.kill();
    child.wait().context("waiting for the killed process")
}

/// Runs `cmd` with stdin closed and stdout/stderr piped, collects every line
/// (echoing each one to our stdout when `echo`), and kills the process when
/// `timeout` passes (`None`: no limit). The process is always reaped.
///
/// # Errors
/// When the process cannot be spawned or waited for.
pub fn run_with_timeout(cmd: Command, timeout: Option<Duration>, echo: bool) -> Result<Captured> {
    run_with_input(cmd, timeout, echo, &[])
}

/// Like [`run_with_timeout`], and when an output line contains the first
/// string of an `input` pair, writes the second to the process's stdin
/// (once each, in order; stdin is closed after the last). With no `input`,
/// stdin is closed from the start.
///
/// # Errors
/// When the process cannot be spawned or waited for.
pub fn run_with_input(
    mut cmd: Command,
    timeout: Option<Duration>,
    echo: bool,
    input: &[(String, Vec<u8>)],
) -> Result<Captured> {
    cmd.stdin(if input.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // Children are reaped one at a time here, so the growth of the reaped
    // children's CPU time over this call is this process's.
    let cpu_before = reaped_children_cpu();
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {}", cmd.get_program().display()))?;

    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        spawn_reader(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        spawn_reader(err, tx.clone());
    }
    drop(tx);

    let mut stdin = child.stdin.take();
    let mut pending = input.iter();
    let mut next_input = pending.next();
    let mut output = String::new();
    let mut take = |line: String| {
        if echo {
            println!("{line}");
        }
        if let Some((trigger, bytes)) = next_input
            && line.contains(trigger.as_str())
        {
            if let Some(pipe) = stdin.as_mut() {
                // A process that stopped reading is not an error here: the
                // run's own output says what happened.
                let _ = std::io::Write::write_all(pipe, bytes);
                let _ = std::io::Write::flush(pipe);
            }
            next_input = pending.next();
            if next_input.is_none() {
                stdin = None;
            }
        }
        output.push_str(&line);
        output.push('\n');
    };

    let mut timed_out = false;
    loop {
        let next = match deadline {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => rx.recv_timeout(left),
                _ => Err(RecvTimeoutError::Timeout),
            },
        };
        match next {
            Ok(line) => take(line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
        }
    }

    // Both outputs are closed, or the deadline passed. The process may still
    // run with its outputs closed, so the deadline still applies.
    let status = if timed_out {
        kill(&mut child)?
    } else {
        let (status, killed) = wait_until(&mut child, deadline)?;
        timed_out = killed;
        status
    };
    let elapsed = start.elapsed();

    let grace_end = Instant::now() + DRAIN_GRACE;
    while let Some(left) = grace_end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => take(line),
            Err(_) => break,
        }
    }

    Ok(Captured {
        output,
        status,
        timed_out,
        elapsed,
        cpu: reaped_children_cpu().saturating_sub(cpu_before),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn captures_both_streams_and_the_exit_code() {
        let got = run_with_timeout(
            sh("echo one; echo two >&2; printf 'three\\r\\n'; printf four; exit 3"),
            Some(Duration::from_secs(20)),
            false,
        )
        .expect("sh runs");
        assert!(!got.timed_out);
        assert_eq!(got.status.code(), Some(3));
        for line in ["one", "two", "three", "four"] {
            assert!(
                got.output.lines().any(|l| l == line),
                "{line:?} missing from {:?}",
                got.output
            );
        }
        assert!(!got.output.contains('\r'));
    }

    #[test]
    fn keeps_stdout_order() {
        let got = run_with_timeout(sh("for i in 1 2 3 4 5; do echo $i; done"), None, false)
            .expect("sh runs");
        assert_eq!(got.output, "1\n2\n3\n4\n5\n");
        assert!(got.status.success());
    }

    #[test]
    fn a_hang_is_killed_at_the_timeout() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let got = run_with_timeout(cmd, Some(Duration::from_secs(1)), false).expect("sleep runs");
        assert!(got.timed_out);
        assert!(!got.status.success());
        assert!(
            got.elapsed < Duration::from_secs(10),
            "took {:?}",
            got.elapsed
        );
    }

    #[test]
    fn a_hang_with_closed_outputs_is_killed_at_the_timeout() {
        let got = run_with_timeout(
            sh("echo before; exec >/dev/null 2>&1; exec sleep 30"),
            Some(Duration::from_secs(1)),
            false,
        )
        .expect("sh runs");
        assert!(got.timed_out);
        assert!(got.output.contains("before\n"));
        assert!(
            got.elapsed < Duration::from_secs(10),
            "took {:?}",
            got.elapsed
        );
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let cmd = Command::new("/nonexistent/xtask-no-such-program");
        assert!(run_with_timeout(cmd, Some(Duration::from_secs(1)), false).is_err());
    }
}
