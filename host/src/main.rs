fn main() -> std::process::ExitCode {
    edgeward::cli::main()
}
