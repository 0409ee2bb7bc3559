// Link settings for an `edgeward` executable: the shipped one
// (host/build.rs) and the tests' copy (tests/build.rs), which must be
// linked alike for the benchmarks to measure what ships. Included by both
// build scripts; `emit` prefixes each linker argument with the cargo
// directive that selects the binary.

fn edgeward_link_args(emit: &str) {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    // Packed relative relocations (DT_RELR; binutils >= 2.38, glibc >=
    // 2.36): the binary stays position-independent (ASLR), but its 75,000
    // relative relocations take kilobytes instead of 1.4 MB that every
    // start reads and walks.
    println!("{emit}-Wl,-z,pack-relative-relocs");
}
