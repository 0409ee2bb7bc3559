//! The `edgeward` binary, built inside the test package so integration
//! tests can run it through `CARGO_BIN_EXE_edgeward-under-test`. It is the
//! same one-line `main` as `host/src/main.rs`.

fn main() -> std::process::ExitCode {
    edgeward::cli::main()
}
