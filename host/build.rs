//! Link settings for the `edgeward` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // Packed relative relocations (DT_RELR; binutils >= 2.38, glibc >=
        // 2.36): the binary stays position-independent (ASLR), but its
        // 75,000 relative relocations take kilobytes instead of 1.4 MB that
        // every start reads and walks.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
