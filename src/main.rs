//! The lazyhyp binary: on the bare-metal target, the EL2 image QEMU boots; on
//! the host, a stub that says how to run it.

#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
aarch64_rt::entry!(lazyhyp::arch::aarch64::main, 64);

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "lazyhyp is a bare-metal AArch64 image: build and boot it with `cargo xtask qemu` \
         (the host build exists only so `cargo test` can build the workspace)"
    );
    std::process::exit(2);
}
