//! RFC 6902 JSON patches, kept as the JSON text the API server receives.
//!
//! The engine writes each operation once, straight into that text: env entries are rendered
//! once per review and copied into every container's operations, so a review costs one
//! escape of each value rather than one per container. Callers that want typed operations
//! (the offline `inject` command, tests) parse them back with [`Patch::operations`].

use json_patch::PatchOperation;
use serde::Serialize;

/// A JSON patch: an array of `add` and `replace` operations, as JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// The JSON array, compact (UTF-8).
    json: Vec<u8>,
    /// How many operations it holds.
    ops: usize,
}

impl Default for Patch {
    fn default() -> Self {
        Self {
            json: b"[]".to_vec(),
            ops: 0,
        }
    }
}

impl Patch {
    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops
    }

    /// Whether there are no operations.
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// The patch as compact JSON, the bytes the admission response carries in base64.
    pub fn as_bytes(&self) -> &[u8] {
        &self.json
    }

    /// The operations, typed.
    pub fn operations(&self) -> Result<Vec<PatchOperation>, serde_json::Error> {
        serde_json::from_slice(&self.json)
    }
}

/// Serializes as the JSON array itself.
impl Serialize for Patch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = std::str::from_utf8(&self.json).map_err(serde::ser::Error::custom)?;
        match serde_json::value::RawValue::from_string(text.to_string()) {
            Ok(raw) => raw.serialize(serializer),
            Err(e) => Err(serde::ser::Error::custom(e)),
        }
    }
}

/// Builds a [`Patch`] one operation at a time.
#[derive(Debug)]
pub(crate) struct PatchWriter {
    /// The array so far, without its closing bracket.
    json: Vec<u8>,
    /// Operations written.
    ops: usize,
}

impl PatchWriter {
    /// An empty patch with room for about `bytes` of operations, so that writing them does
    /// not grow (and copy) the buffer again and again.
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        let mut json = Vec::with_capacity(bytes + 2);
        json.push(b'[');
        Self { json, ops: 0 }
    }

    /// Appends `{"op":OP,"path":PATH,"value":VALUE}`: `path` is the pointer's reference
    /// tokens, unescaped; `value_json` is already JSON.
    pub(crate) fn op(&mut self, op: Op, path: &[&str], value_json: &[u8]) {
        if self.ops > 0 {
            self.json.push(b',');
        }
        self.json.extend_from_slice(br#"{"op":""#);
        self.json.extend_from_slice(op.as_str().as_bytes());
        self.json.extend_from_slice(br#"","path":"#);
        push_json(&mut self.json, &pointer(path));
        self.json.extend_from_slice(br#","value":"#);
        self.json.extend_from_slice(value_json);
        self.json.push(b'}');
        self.ops += 1;
    }

    /// The finished patch.
    pub(crate) fn finish(mut self) -> Patch {
        self.json.push(b']');
        Patch {
            json: self.json,
            ops: self.ops,
        }
    }
}

/// The operations the engine writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Create a member, or insert into an array.
    Add,
    /// Overwrite an existing member.
    Replace,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Replace => "replace",
        }
    }
}

/// A JSON pointer from reference tokens, escaped as RFC 6901 requires (`~` as `~0`, then `/`
/// as `~1`).
pub(crate) fn pointer(tokens: &[&str]) -> String {
    let mut out = String::with_capacity(tokens.iter().map(|t| t.len() + 1).sum());
    for token in tokens {
        out.push('/');
        if !token.contains(['~', '/']) {
            out.push_str(token);
            continue;
        }
        for c in token.chars() {
            match c {
                '~' => out.push_str("~0"),
                '/' => out.push_str("~1"),
                c => out.push(c),
            }
        }
    }
    out
}

/// Appends `value` as JSON (strings escaped as RFC 8259 requires).
pub(crate) fn push_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing strings and lists of strings into a Vec cannot fail: no I/O, no map keys.
    let _infallible = serde_json::to_writer(out, value);
}

/// A JSON object of string members, in the given order.
pub(crate) fn json_object<'a>(members: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let mut out = vec![b'{'];
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json(&mut out, key);
        out.push(b':');
        push_json(&mut out, value);
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_operations_that_parse_as_rfc6902() {
        let mut w = PatchWriter::with_capacity(0);
        w.op(Op::Add, &["metadata", "labels", "a/b~c"], br#""true""#);
        w.op(Op::Replace, &["spec", "containers", "0", "env", "-"], b"[]");
        let patch = w.finish();
        assert_eq!(patch.len(), 2);
        assert_eq!(
            std::str::from_utf8(patch.as_bytes()).unwrap(),
            r#"[{"op":"add","path":"/metadata/labels/a~1b~0c","value":"true"},{"op":"replace","path":"/spec/containers/0/env/-","value":[]}]"#
        );
        let ops = patch.operations().unwrap();
        assert_eq!(
            serde_json::to_string(&ops).unwrap(),
            serde_json::to_string(&patch).unwrap()
        );
    }

    #[test]
    fn empty_patch_is_an_empty_array() {
        let patch = PatchWriter::with_capacity(0).finish();
        assert!(patch.is_empty());
        assert_eq!(patch, Patch::default());
        assert!(patch.operations().unwrap().is_empty());
    }

    #[test]
    fn strings_are_escaped() {
        let object = json_object([("k\"", "line\nbreak \u{1}")]);
        assert_eq!(object, br#"{"k\"":"line\nbreak \u0001"}"#);
        let parsed: serde_json::Value = serde_json::from_slice(&object).unwrap();
        assert_eq!(parsed["k\""], "line\nbreak \u{1}");
    }
}
