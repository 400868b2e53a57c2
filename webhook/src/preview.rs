//! The offline preview's input and output, in kubectl's conventions: `-f` files,
//! directories (with `-R`, recursively) and `-`; output as a YAML stream, JSON, a unified
//! diff of each changed object or its JSON patch; one report line per object.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::engine::Decision;
use crate::manifest::{InjectedObject, Outcome, Preview, Skipped};

/// File name extensions kubectl reads from a directory.
const MANIFEST_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// An input that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct InputError {
    /// The file or directory as named.
    pub path: String,
    /// What the OS said.
    pub source: std::io::Error,
}

/// One input file's text, with the name messages use for it.
#[derive(Debug)]
pub struct Input {
    /// The path as found (or `-` for standard input).
    pub name: String,
    /// Its contents.
    pub text: String,
}

/// Reads every `-f` argument: files as they are, directories' `.yaml`, `.yml` and `.json`
/// files in name order (with `recursive`, those of subdirectories too), `-` as stdin.
pub fn read_inputs(paths: &[PathBuf], recursive: bool) -> Result<Vec<Input>, InputError> {
    let mut inputs = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|source| InputError {
                    path: "-".into(),
                    source,
                })?;
            inputs.push(Input {
                name: "-".into(),
                text,
            });
        } else if path.is_dir() {
            let mut files = Vec::new();
            list_dir(path, recursive, &mut files)?;
            for file in files {
                inputs.push(read_file(&file)?);
            }
        } else {
            inputs.push(read_file(path)?);
        }
    }
    Ok(inputs)
}

fn read_file(path: &Path) -> Result<Input, InputError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| InputError {
        path: name.clone(),
        source,
    })?;
    Ok(Input { name, text })
}

fn list_dir(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<(), InputError> {
    let error = |source| InputError {
        path: dir.display().to_string(),
        source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(error)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(error)?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            if recursive {
                list_dir(&entry, recursive, out)?;
            }
        } else if entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| MANIFEST_EXTENSIONS.contains(&e))
        {
            out.push(entry);
        }
    }
    Ok(())
}

/// How the preview prints the objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// The patched objects as a YAML stream, `---` between them.
    Yaml,
    /// One patched object as JSON, several as a `kind: List`.
    Json,
    /// A unified diff of each object the webhook changes, as YAML.
    Diff,
    /// Each changed object's RFC 6902 patch, as the webhook returns it.
    JsonPatch,
}

/// The preview printed in `format`.
pub fn render(preview: &Preview, format: OutputFormat) -> Result<String, serde_json::Error> {
    let objects = &preview.objects;
    let mut out = String::new();
    match format {
        OutputFormat::Yaml => {
            for object in objects {
                out.push_str("---\n");
                out.push_str(&to_yaml(&object.object));
            }
        }
        OutputFormat::Json => {
            let value = match objects.as_slice() {
                [one] => one.object.clone(),
                many => serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": many.iter().map(|o| o.object.clone()).collect::<Vec<Value>>(),
                }),
            };
            out = serde_json::to_string_pretty(&value)?;
            out.push('\n');
        }
        OutputFormat::Diff => {
            for object in objects.iter().filter(|o| !o.patch.is_empty()) {
                let before = to_yaml(&object.original);
                let after = to_yaml(&object.object);
                let label = format!("{} {}", object.kind, object.display_name);
                out.push_str(
                    &similar::TextDiff::from_lines(&before, &after)
                        .unified_diff()
                        .context_radius(3)
                        .header(&format!("{label} (given)"), &format!("{label} (admitted)"))
                        .to_string(),
                );
            }
        }
        OutputFormat::JsonPatch => {
            for object in objects.iter().filter(|o| !o.patch.is_empty()) {
                out.push_str(&format!(
                    "--- # {}: {} {}\n",
                    object.document, object.kind, object.display_name
                ));
                out.push_str(&serde_json::to_string_pretty(&object.patch)?);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

/// YAML of a JSON value; a value serde_yaml cannot print does not exist (JSON maps to YAML).
fn to_yaml(value: &Value) -> String {
    serde_yaml_ng::to_string(value).unwrap_or_else(|e| format!("# cannot print as YAML: {e}\n"))
}

/// One line per object (and per skipped document) saying what happened and why, plus the
/// engine's warnings indented below it.
pub fn report_lines(preview: &Preview, inject_annotation: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for object in &preview.objects {
        lines.push(format!(
            "{}: {} {}: {}",
            object.document,
            object.kind,
            object.display_name,
            verdict(object, inject_annotation)
        ));
        if let Some(m) = object.mutation() {
            lines.extend(m.warnings.iter().map(|w| format!("  warning: {w}")));
        }
    }
    for Skipped { document, reason } in &preview.skipped {
        lines.push(format!(
            "{document}: skipped: not a Kubernetes object ({reason})"
        ));
    }
    lines
}

fn verdict(object: &InjectedObject, inject_annotation: &str) -> String {
    match &object.outcome {
        Outcome::Reviewed(m) => match &m.decision {
            Decision::Injected { profile } if object.patch.is_empty() => {
                format!("injected (profile {profile}), 0 patch operations: already up to date")
            }
            Decision::Injected { profile } => format!(
                "injected (profile {profile}), {} patch operations",
                object.patch.len()
            ),
            Decision::NotSelected => format!(
                "not-selected: no profile selects its labels and it has no {inject_annotation}: \"true\" annotation"
            ),
            Decision::OptedOut => {
                format!("opted-out: {inject_annotation}: \"false\"")
            }
            other => other.as_str().to_string(),
        },
        Outcome::NamespaceExcluded { reason } => format!("excluded: {reason}"),
        Outcome::PassedThrough { reason } => format!("passed through: {reason}"),
    }
}
