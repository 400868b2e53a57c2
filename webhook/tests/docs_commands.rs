//! The commands the docs tell users to type, run as written (issue 20, item 6): a renamed
//! flag or a wrong path in README.md, docs/*.md or a README beside the manifests fails here.
//!
//! The list is derived, not kept by hand: every command in a fenced `sh` block whose first
//! word is `egress-webhook` or `egress-proxy` (or `cargo run -p egress-webhook --`, which
//! runs the same binary) is run with `bash -o pipefail` in a scratch directory where
//! `deploy/`, `docs/` and `webhook/` of the repository are visible, and must exit 0. Other
//! commands (`kubectl`, `make`, `velero`) need a cluster or a long build and are counted as
//! not run. A block fenced as ```` ```sh no-run ```` is left out on purpose: serving commands
//! that would not return, with the reason in the text around them.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The binaries the docs' commands call, as `cargo run -p NAME --` or by name.
const BINARIES: [&str; 2] = ["egress-webhook", "egress-proxy"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A command from the docs: where it is and its text (continuation lines joined).
#[derive(Debug)]
struct DocCommand {
    /// `file:line` of its first line.
    at: String,
    /// The command as bash reads it.
    text: String,
}

/// Where a line of Markdown is.
#[derive(Clone, Copy)]
enum Fence {
    /// In the text.
    Outside,
    /// In a fenced `sh` block; `no_run` when it is marked so.
    Commands { no_run: bool },
    /// In a fenced block of anything else (YAML, output, a synopsis).
    Other,
}

/// Every command of every fenced `sh` block, and whether the block is marked `no-run`.
fn commands(file: &Path) -> Vec<(DocCommand, bool)> {
    let text = std::fs::read_to_string(file).unwrap();
    let name = file
        .strip_prefix(repo())
        .unwrap_or(file)
        .display()
        .to_string();
    let mut out = Vec::new();
    let mut fence = Fence::Outside;
    let mut pending: Option<DocCommand> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            fence = match fence {
                Fence::Outside => {
                    let mut words = info.split_whitespace();
                    match words.next() {
                        Some("sh" | "bash") => Fence::Commands {
                            no_run: words.any(|w| w == "no-run"),
                        },
                        _ => Fence::Other,
                    }
                }
                Fence::Commands { .. } | Fence::Other => Fence::Outside,
            };
            continue;
        }
        let Fence::Commands { no_run } = fence else {
            continue;
        };
        match pending.as_mut() {
            Some(cmd) => {
                cmd.text.push('\n');
                cmd.text.push_str(line);
            }
            None => {
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                pending = Some(DocCommand {
                    at: format!("{name}:{}", i + 1),
                    text: line.to_string(),
                });
            }
        }
        if !line.trim_end().ends_with('\\')
            && let Some(done) = pending.take()
        {
            out.push((done, no_run));
        }
    }
    out
}

/// The Markdown files users read: README.md, docs/*.md and the READMEs under deploy/.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    let mut dirs = vec![repo().join("docs"), repo().join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The command with `cargo run -p NAME --` replaced by `NAME`, when it calls one of
/// [`BINARIES`] first; `None` for other commands.
fn runnable(text: &str) -> Option<String> {
    let mut rewritten = text.trim_start().to_string();
    for bin in BINARIES {
        let cargo = format!("cargo run -p {bin} -- ");
        if let Some(rest) = rewritten.strip_prefix(&cargo) {
            rewritten = format!("{bin} {rest}");
        }
    }
    let first = rewritten.split_whitespace().next()?;
    BINARIES.contains(&first).then_some(rewritten)
}

/// Builds egress-proxy beside this crate's binary (cargo builds only the tested package's
/// binaries for a test), and returns the directory holding both.
fn binaries_dir() -> PathBuf {
    let webhook = PathBuf::from(env!("CARGO_BIN_EXE_egress-webhook"));
    let dir = webhook.parent().unwrap().to_path_buf();
    // <target>/<profile>/egress-webhook: the profile is "debug" unless cargo test --release.
    let target = dir.parent().unwrap();
    let mut build = Command::new(env!("CARGO"));
    build
        .current_dir(repo())
        .args([
            "build",
            "--quiet",
            "-p",
            "egress-proxy",
            "--bin",
            "egress-proxy",
        ])
        .arg("--target-dir")
        .arg(target);
    if dir.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    let status = build.status().unwrap();
    assert!(status.success(), "cargo build -p egress-proxy failed");
    assert!(dir.join("egress-proxy").exists());
    dir
}

#[test]
fn every_command_of_ours_in_the_docs_runs_as_written() {
    let bins = binaries_dir();
    let scratch = tempfile::tempdir().unwrap();
    for shared in ["deploy", "docs", "webhook"] {
        std::os::unix::fs::symlink(repo().join(shared), scratch.path().join(shared)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (mut ran, mut other, mut marked) = (Vec::new(), 0, 0);
    let mut failures = Vec::new();
    for file in markdown_files() {
        for (command, no_run) in commands(&file) {
            if no_run {
                marked += 1;
                continue;
            }
            let Some(text) = runnable(&command.text) else {
                other += 1;
                continue;
            };
            let out = Command::new("bash")
                .args(["-o", "pipefail", "-c", &text])
                .current_dir(scratch.path())
                .env("PATH", &path)
                .env_remove("POD_NAMESPACE")
                .env_remove("EGRESS_PROXY_CONFIG")
                .output()
                .unwrap();
            if !out.status.success() {
                failures.push(format!(
                    "{}: `{}` exited {:?}: {}",
                    command.at,
                    text,
                    out.status.code(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            ran.push(command.at);
        }
    }
    eprintln!(
        "ran {} commands from the docs ({}), {other} need a cluster or other tools, {marked} marked no-run",
        ran.len(),
        ran.join(", ")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The docs show both binaries' offline commands; finding none means the extraction broke.
    assert!(ran.len() >= 8, "only {} commands found: {ran:?}", ran.len());
}

#[test]
fn the_extraction_reads_continuations_skips_comments_and_honours_no_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.md");
    std::fs::write(
        &file,
        "text\n```sh\n# a comment\negress-webhook certs \\\n  --namespace a\n\nkubectl get pods\n```\n\
         ```yaml\negress-webhook: not a command\n```\n```sh no-run\negress-proxy\n```\n",
    )
    .unwrap();
    let found = commands(&file);
    let texts: Vec<(&str, bool)> = found.iter().map(|(c, n)| (c.text.as_str(), *n)).collect();
    assert_eq!(
        texts,
        [
            ("egress-webhook certs \\\n  --namespace a", false),
            ("kubectl get pods", false),
            ("egress-proxy", true),
        ]
    );
    assert!(found[0].0.at.ends_with("t.md:4"));
    assert_eq!(
        runnable("cargo run -p egress-webhook -- check-config").as_deref(),
        Some("egress-webhook check-config")
    );
    assert_eq!(runnable("kubectl apply -k deploy/base"), None);
}
