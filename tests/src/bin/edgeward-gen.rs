//! Writes what the Debian package ships beside the binaries, generated from
//! the CLI's own definition so that they never drift from `--help`:
//!
//! - `edgeward-gen man DIR`: `edgeward.1` and one page per subcommand
//!   (`edgeward-module.1`, `edgeward-module-add.1`, ...), roff;
//! - `edgeward-gen completions DIR`: `edgeward.bash`, `_edgeward` (zsh),
//!   `edgeward.fish`.
//!
//! A tool of the build, not of the device: the shipped binary links
//! neither generator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory as _;
use clap_complete::Shell;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (what, dir) = match args.as_slice() {
        [what, dir] => (what.as_str(), PathBuf::from(dir)),
        _ => {
            eprintln!("usage: edgeward-gen man|completions DIR");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("edgeward-gen: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let cmd = edgeward::cli::Cli::command();
    let written = match what {
        "man" => clap_mangen::generate_to(cmd, &dir),
        "completions" => [Shell::Bash, Shell::Zsh, Shell::Fish]
            .into_iter()
            .try_for_each(|shell| {
                clap_complete::generate_to(shell, &mut cmd.clone(), "edgeward", &dir).map(drop)
            }),
        other => {
            eprintln!("edgeward-gen: {other:?}: write man or completions");
            return ExitCode::from(2);
        }
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeward-gen: cannot write into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
