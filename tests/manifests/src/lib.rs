//! Helpers for the manifest tests: find and render the kustomizations under `deploy/`, and
//! read the objects they produce as JSON values.
//!
//! Rendering uses `kubectl kustomize`: the `kubectl` on `PATH`, or the one that
//! `scripts/test-manifests.sh` installs into `.venv/` where none is installed.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `kubectl` to render with.
pub fn kubectl() -> Result<PathBuf, String> {
    let on_path = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return Ok(PathBuf::from("kubectl"));
    }
    let venv = repo_root().join(".venv/bin/kubectl");
    if venv.exists() {
        return Ok(venv);
    }
    Err(
        "kubectl not found: install it, or run scripts/test-manifests.sh once \
         (it installs a pinned kubectl into .venv/)"
            .to_owned(),
    )
}

/// Every directory under `deploy/` that holds a `kustomization.yaml`, sorted.
pub fn kustomizations() -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk(&repo_root().join("deploy"), &mut |path| {
        if path.file_name().is_some_and(|n| n == "kustomization.yaml")
            && let Some(dir) = path.parent()
        {
            found.push(dir.to_path_buf());
        }
    });
    found.sort();
    found
}

/// Every manifest file under `deploy/`: YAML files other than `kustomization.yaml` and the
/// program configs under `config/` directories, sorted.
pub fn manifest_files() -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk(&repo_root().join("deploy"), &mut |path| {
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        let kustomization = path.file_name().is_some_and(|n| n == "kustomization.yaml");
        let config = path
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == "config");
        if yaml && !kustomization && !config {
            found.push(path.to_path_buf());
        }
    });
    found.sort();
    found
}

fn walk(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, visit);
        } else {
            visit(&path);
        }
    }
}

/// Renders the kustomization in `dir` and parses the output.
pub fn render(dir: &Path) -> Result<Vec<Value>, String> {
    let output = Command::new(kubectl()?)
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| format!("running kubectl kustomize {}: {e}", dir.display()))?;
    if !output.status.success() {
        return Err(format!(
            "kubectl kustomize {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let text = String::from_utf8(output.stdout).map_err(|e| e.to_string())?;
    parse_documents(&text).map_err(|e| format!("{}: {e}", dir.display()))
}

/// The YAML blocks of a doc that start with a `# dir/file` comment, as (path, text). A
/// block indented under a list item loses the fence's indentation. Unreadable files read as
/// empty; `doc` is relative to the repository root.
pub fn doc_files(doc: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join(doc)).unwrap_or_default();
    let mut files = Vec::new();
    // The fence's indentation and the lines so far, inside a YAML block.
    let mut block: Option<(usize, Vec<&str>)> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        let indent = line.len() - line.trim_start().len();
        match &mut block {
            None if trimmed == "```yaml" => block = Some((indent, Vec::new())),
            None => {}
            Some((_, lines)) if trimmed == "```" => {
                let first = lines.first().and_then(|l| l.strip_prefix("# "));
                if let Some(path) = first.filter(|p| p.contains('/') && !p.contains(' ')) {
                    files.push((path.to_owned(), lines.join("\n") + "\n"));
                }
                block = None;
            }
            Some((fence, lines)) => lines.push(line.get(*fence..).unwrap_or("")),
        }
    }
    files
}

/// Parses a multi-document YAML stream, skipping empty documents.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc).map_err(|e| e.to_string())?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Parses a manifest file.
pub fn parse_file(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_documents(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// `kind/name` of an object, for messages.
pub fn id(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["kind"].as_str().unwrap_or("?"),
        obj["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The one object of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value, String> {
    let mut matches = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name);
    let first = matches.next().ok_or_else(|| format!("no {kind}/{name}"))?;
    if matches.next().is_some() {
        return Err(format!("more than one {kind}/{name}"));
    }
    Ok(first)
}

/// Checks that `path` exists in `obj` and is not null. `path` is dotted; a segment ending in
/// `[]` must be a non-empty list, and the rest of the path must hold for every element.
pub fn require(obj: &Value, path: &str) -> Result<(), String> {
    fn go(value: &Value, segments: &[&str], walked: &str) -> Result<(), String> {
        let Some((first, rest)) = segments.split_first() else {
            return if value.is_null() {
                Err(format!("{walked} is missing"))
            } else {
                Ok(())
            };
        };
        let (key, each) = match first.strip_suffix("[]") {
            Some(key) => (key, true),
            None => (*first, false),
        };
        let here = format!("{walked}.{key}");
        let child = &value[key];
        if child.is_null() {
            return Err(format!("{here} is missing"));
        }
        if !each {
            return go(child, rest, &here);
        }
        let list = child
            .as_array()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| format!("{here} must be a non-empty list"))?;
        for (i, item) in list.iter().enumerate() {
            go(item, rest, &format!("{here}[{i}]"))?;
        }
        Ok(())
    }
    let segments: Vec<&str> = path.split('.').collect();
    go(obj, &segments, "")
}
