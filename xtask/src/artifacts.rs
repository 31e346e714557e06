//! Building the hypervisor and the guest (the "Builds" part of the contract).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Target of the EL2 hypervisor (no FP/SIMD in EL2 code).
pub const HYPERVISOR_TARGET: &str = "aarch64-unknown-none-softfloat";
/// Target of the EL1 test guest.
pub const GUEST_TARGET: &str = "aarch64-unknown-none";

/// The two ELF files a run needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifacts {
    /// The hypervisor ELF, given to QEMU's `-kernel`.
    pub hypervisor: PathBuf,
    /// The guest ELF, loaded raw at the payload address.
    pub guest: PathBuf,
}

/// The workspace root: the parent of xtask's own manifest directory.
#[must_use]
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace
/// root when relative) or `<workspace root>/target`.
#[must_use]
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// A `cargo` command (`$CARGO` if set, else `cargo` from `PATH`) that runs in
/// the workspace root.
#[must_use]
pub fn cargo_command() -> Command {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// Targets that `rustup` reports as installed for the toolchain that applies
/// in the workspace root, or `None` when `rustup` cannot be run.
fn installed_targets() -> Option<Vec<String>> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect(),
    )
}

fn missing_targets() -> Option<Vec<&'static str>> {
    let installed = installed_targets()?;
    Some(
        [HYPERVISOR_TARGET, GUEST_TARGET]
            .into_iter()
            .filter(|t| !installed.iter().any(|i| i == t))
            .collect(),
    )
}

fn run_rustup(args: &[&str], from_toolchain_file: bool) -> Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null());
    if from_toolchain_file {
        // Let rustup read rust-toolchain.toml rather than an inherited override.
        cmd.env_remove("RUSTUP_TOOLCHAIN");
    }
    let status = cmd
        .status()
        .with_context(|| format!("could not run `rustup {}`", args.join(" ")))?;
    if !status.success() {
        bail!("`rustup {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Makes sure the bare-metal targets are installed for the toolchain in use.
///
/// rustup does not add the targets of `rust-toolchain.toml` to a toolchain
/// that is already installed, so when one is missing this runs
/// `rustup toolchain install` in the workspace root (which installs what the
/// toolchain file names) and, if that was not enough, `rustup target add`.
/// Without `rustup` on `PATH` it does nothing and leaves the error to cargo.
///
/// # Errors
/// When rustup fails or the targets are still missing afterwards.
pub fn ensure_targets() -> Result<()> {
    let Some(missing) = missing_targets() else {
        return Ok(());
    };
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: target(s) {} missing; running `rustup toolchain install` (rust-toolchain.toml)",
        missing.join(", ")
    );
    run_rustup(&["toolchain", "install", "--no-self-update"], true)?;
    let missing = missing_targets().unwrap_or_default();
    if missing.is_empty() {
        return Ok(());
    }
    let mut args = vec!["target", "add"];
    args.extend(missing.iter().copied());
    eprintln!("xtask: running `rustup {}`", args.join(" "));
    run_rustup(&args, false)?;
    let missing = missing_targets().unwrap_or_default();
    if !missing.is_empty() {
        bail!(
            "Rust target(s) {} still missing after rustup; try `rustup target add {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    Ok(())
}

fn cargo_build(package_args: &[&str], release: bool) -> Result<()> {
    let mut cmd = cargo_command();
    cmd.arg("build").args(package_args).stdin(Stdio::null());
    if release {
        cmd.arg("--release");
    }
    let shown = format!(
        "cargo build {}{}",
        package_args.join(" "),
        if release { " --release" } else { "" }
    );
    let status = cmd
        .status()
        .with_context(|| format!("could not run `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Builds the hypervisor and the guest as the contract says (one cargo
/// invocation each) and returns the paths of the two ELF files.
///
/// # Errors
/// When a target cannot be installed, a build fails or an ELF is missing.
pub fn build(release: bool) -> Result<Artifacts> {
    ensure_targets()?;
    cargo_build(
        &[
            "-p",
            "lazyhyp",
            "--bin",
            "lazyhyp",
            "--target",
            HYPERVISOR_TARGET,
        ],
        release,
    )?;
    cargo_build(&["-p", "guest", "--target", GUEST_TARGET], release)?;

    let profile = if release { "release" } else { "debug" };
    let dir = target_dir();
    let artifacts = Artifacts {
        hypervisor: dir.join(HYPERVISOR_TARGET).join(profile).join("lazyhyp"),
        guest: dir.join(GUEST_TARGET).join(profile).join("guest"),
    };
    for path in [&artifacts.hypervisor, &artifacts.guest] {
        if !path.is_file() {
            bail!("build succeeded but {} is missing", path.display());
        }
    }
    Ok(artifacts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let root = workspace_root();
        assert!(root.join("Cargo.toml").is_file(), "{}", root.display());
        assert!(root.join("xtask").join("Cargo.toml").is_file());
    }
}
