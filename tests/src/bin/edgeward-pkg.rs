//! The `edgeward` binary as `host/src/main.rs` builds it, built with the
//! tests (`cargo test` builds a package's binaries only for that package's
//! own integration tests): `tests/tests/package.rs` packages it as
//! `/usr/bin/edgeward`. No test seams (those are `edgeward-under-test`'s).

fn main() -> std::process::ExitCode {
    edgeward::cli::main()
}
