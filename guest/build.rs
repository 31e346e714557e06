//! Links the bare-metal guest with aarch64-rt's section layout and our load
//! address.

fn main() {
    println!("cargo::rerun-if-changed=memory.ld");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo::rustc-link-arg-bins=-Timage.ld");
        // Absolute: the linker runs in the workspace root, not this package.
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
        println!("cargo::rustc-link-arg-bins=-T{dir}/memory.ld");
    }
}
