//! The documentation says what the binary does: every `edgeward ...`
//! command line in the README's and `docs/`'s code blocks names commands
//! that exist and flags that its `--help` lists. A renamed flag or a
//! removed command fails here, not in an operator's shell.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;

fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut v = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            v.push(p);
        }
    }
    v.sort();
    v
}

/// The command lines in `text`'s fenced code blocks: a line that starts
/// with `edgeward` (or `sudo edgeward`), with the indented `[--flag ...]`
/// lines after it and `\` continuations joined on; comments dropped.
fn command_lines(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut in_block = false;
    let mut continuing = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continuing = false;
            continue;
        }
        if !in_block {
            continue;
        }
        let code = line.split(" #").next().unwrap_or_default();
        let code = if code.trim_start().starts_with('#') {
            ""
        } else {
            code
        };
        let t = code.trim();
        let t = t.strip_prefix("sudo ").unwrap_or(t);
        if t.starts_with("edgeward ") {
            out.push(t.trim_end_matches('\\').to_owned());
            continuing = true;
        } else if continuing && line.starts_with(' ') && (t.starts_with('[') || t.starts_with("--"))
        {
            let last = out.last_mut().unwrap();
            last.push(' ');
            last.push_str(t.trim_end_matches('\\'));
        } else {
            continuing = false;
        }
    }
    out
}

/// `edgeward PATH... --help`, and the subcommands it lists.
struct Help {
    text: String,
    commands: Vec<String>,
}

fn help<'a>(cache: &'a mut HashMap<Vec<String>, Help>, path: &[String]) -> &'a Help {
    cache.entry(path.to_vec()).or_insert_with(|| {
        let o = std::process::Command::new(EDGEWARD)
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "edgeward {} --help: {}",
            path.join(" "),
            stderr(&o)
        );
        let text = stdout(&o);
        let commands = text
            .split("Commands:")
            .nth(1)
            .map(|rest| {
                rest.lines()
                    .skip(1)
                    .take_while(|l| l.starts_with("  "))
                    .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Help { text, commands }
    })
}

#[test]
fn every_documented_command_and_flag_exists() {
    let mut cache = HashMap::new();
    let mut checked = 0;
    let mut problems = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        for line in command_lines(&text) {
            let words: Vec<&str> = line.split_whitespace().skip(1).collect();
            // The command path: the words naming subcommands, in order (of
            // `a|b` alternatives, each must exist; the first is followed).
            // Flags are checked against the path where they stand; a bare
            // `--` ends it (what follows is the module's).
            let mut path: Vec<String> = Vec::new();
            for w in words.iter().take_while(|w| **w != "--") {
                if let Some(start) = w.find("--") {
                    let flag: String = w[start..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    if flag.len() <= 2 || flag == "--help" {
                        continue;
                    }
                    // A flag of this command or of any command above it
                    // (global flags are listed there).
                    let known = (0..=path.len()).any(|n| {
                        help(&mut cache, &path[..n])
                            .text
                            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                            .any(|t| t == flag)
                    });
                    checked += 1;
                    if !known {
                        problems.push(format!(
                            "{name}: `{line}`: edgeward {} has no {flag}",
                            path.join(" ")
                        ));
                    }
                    continue;
                }
                let commands = help(&mut cache, &path).commands.clone();
                if commands.is_empty() {
                    continue;
                }
                let alternatives: Vec<&str> = w.split('|').collect();
                let known = alternatives
                    .iter()
                    .filter(|a| commands.iter().any(|c| c == *a))
                    .count();
                if known == alternatives.len() {
                    path.push(alternatives[0].to_owned());
                } else if known > 0 {
                    problems.push(format!("{name}: `{line}`: no command {w}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked > 60, "only {checked} flags found in the docs");
}

#[test]
fn the_readme_stays_short_and_links_every_page() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.lines().count() < 200,
        "README.md is {} lines: move reference into docs/",
        readme.lines().count()
    );
    for page in pages()
        .iter()
        .filter(|p| p.parent().unwrap().ends_with("docs"))
    {
        let link = format!("docs/{}", page.file_name().unwrap().to_string_lossy());
        assert!(readme.contains(&link), "README.md does not link {link}");
    }
    // Links between pages resolve.
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for (_, rest) in text.match_indices("](").map(|(i, _)| ((), &text[i + 2..])) {
            let target = rest.split(')').next().unwrap_or_default();
            let target = target.split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.contains(' ') {
                continue;
            }
            assert!(
                page.parent().unwrap().join(target).exists(),
                "{}: a link to {target} goes nowhere",
                page.display()
            );
        }
    }
}
