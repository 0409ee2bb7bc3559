// Link settings for an `edgeward` executable: the shipped one
// (host/build.rs) and the tests' copy (tests/build.rs), which must be
// linked alike for the benchmarks to measure what ships. Included by both
// build scripts; `emit` prefixes each linker argument with the cargo
// directive that selects the binary.

fn edgeward_link_args(emit: &str, order: &std::path::Path) {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    // Packed relative relocations (DT_RELR; binutils >= 2.38, glibc >=
    // 2.36): the binary stays position-independent (ASLR), but its 75,000
    // relative relocations take kilobytes instead of 1.4 MB that every
    // start reads and walks.
    println!("{emit}-Wl,-z,pack-relative-relocs");

    // Code layout: the functions a one-shot run executes, packed together
    // at the start of the code (scripts/orderfile writes the list). A start
    // then faults in one contiguous stretch instead of 64 KiB windows
    // scattered over the executable: less resident memory and fewer faults
    // (docs/performance.md, "Code layout"). Only with rust-lld, the default
    // linker of this target since Rust 1.90 (GNU ld, gold and mold have no
    // such option: a configured `linker` or `-fuse-ld` turns it off, as
    // EDGEWARD_NO_ORDERFILE does), and only in optimized builds (the list
    // holds an optimized build's names; debug builds keep their layout).
    println!("cargo:rerun-if-env-changed=EDGEWARD_NO_ORDERFILE");
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    let default_linker = std::env::var_os("RUSTC_LINKER").is_none()
        && !["linker", "link-self-contained", "fuse-ld"]
            .iter()
            .any(|f| flags.contains(f));
    if var("TARGET") == "x86_64-unknown-linux-gnu"
        && var("PROFILE") == "release"
        && default_linker
        && std::env::var_os("EDGEWARD_NO_ORDERFILE").is_none()
        && order.is_file()
    {
        println!("cargo:rerun-if-changed={}", order.display());
        // Two arguments: a path is never split at its commas, as `-Wl,`
        // would split it.
        println!("{emit}-Xlinker");
        println!("{emit}--symbol-ordering-file={}", order.display());
        // Names the list has and this build lacks (another build's) are
        // skipped, not warned about one by one.
        println!("{emit}-Xlinker");
        println!("{emit}--no-warn-symbol-ordering");
    }
}
