//! Links the bare-metal hypervisor with aarch64-rt's section layout
//! (`image.ld`, put on the search path by aarch64-rt) and our load address
//! (`memory.ld`). Host builds (tests) link normally.

fn main() {
    println!("cargo::rerun-if-changed=memory.ld");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo::rustc-link-arg-bins=-Timage.ld");
        // Absolute: the linker runs in the workspace root, not this package.
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
        println!("cargo::rustc-link-arg-bins=-T{dir}/memory.ld");
    }
}
