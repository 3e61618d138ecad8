//! Every `herald` command in the README's and docs' code blocks parses: run with `--help`
//! appended, clap accepts its subcommands, flags and values (it refuses an unknown one even
//! with `--help`) and exits 0. Optional parts `[...]` are taken as written, the first of
//! alternatives `a|b` is taken, and `$PEERS` stands for a peer list.

mod common;

use std::process::Command;

use common::BIN;

/// The `herald ...` invocations in the fenced code blocks of `text`, as argument lists.
fn commands(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let Some(at) = line.find("herald ").filter(|_| fenced) else { continue };
        let before = &line[..at];
        // A command, not a word in a comment or a path: at the start, or after a pipe.
        if !(before.trim().is_empty() || before.trim_end().ends_with('|')) {
            continue;
        }
        let command = line[at..].split("  #").next().unwrap();
        // Alternatives at the top level (`--to-earliest | --to-latest`): the first.
        let command = command.split(" | ").next().unwrap();
        out.push(words(command)[1..].to_vec());
    }
    out
}

/// Splits on whitespace, keeping '...' together, dropping `[` `]` and taking the first of
/// `a|b|c`.
fn words(command: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in command.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    out.push(std::mem::take(&mut word));
                }
                started = false;
            }
            '[' | ']' if !quoted => {}
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(word);
    }
    out.into_iter()
        .map(|w| {
            if w.contains('|') && !w.starts_with('|') {
                w.split('|').next().unwrap().to_string()
            } else {
                w
            }
        })
        .map(|w| if w == "$PEERS" { "1=127.0.0.1:7400,2=127.0.0.1:7410".to_string() } else { w })
        .collect()
}

#[test]
fn every_command_in_the_readme_and_docs_parses() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        files.push(entry.unwrap().path());
    }
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for args in commands(&text) {
            let out = Command::new(BIN).args(&args).arg("--help").output().unwrap();
            assert!(
                out.status.success(),
                "{}: `herald {}` does not parse:\n{}",
                file.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} commands found: is the extraction broken?");
}

#[test]
fn the_extraction_takes_optional_parts_and_first_alternatives() {
    let text = "```sh\nseq 3 | herald produce t   # a comment\nherald x --a [--b 1|2] | --c\nnot herald here\n```\nherald outside\n";
    assert_eq!(
        commands(text),
        vec![vec!["produce", "t"], vec!["x", "--a", "--b", "1"]]
            .into_iter()
            .map(|c| c.into_iter().map(String::from).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
}
