//! Finds the line of a key path (`profiles[1].selector.matchLabels`) in YAML text, so a
//! config error found after parsing can still point at the line to fix.
//!
//! The YAML parser records where each node starts and attaches that position to an error
//! raised while the node is being read. Walking the document with a visitor that raises an
//! error at the node the path names gives that node's line without a second YAML parser.
#![forbid(unsafe_code)]

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The message for "the first key of the path is not in the file": no line to point at.
const ABSENT: &str = "egress-gate: key absent";

/// One step of a key path.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// A mapping key.
    Key(String),
    /// A sequence index.
    Index(usize),
}

/// `profiles[0].selector.matchExpressions[1].values` as steps.
fn steps(path: &str) -> Vec<Step> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !name.is_empty() {
            out.push(Step::Key(name.to_string()));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let Some(end) = inner.find(']') else { break };
            match inner[..end].parse() {
                Ok(i) => out.push(Step::Index(i)),
                Err(_) => return out,
            }
            rest = &inner[end + 1..];
        }
    }
    out
}

/// The 1-based line where the node `path` names starts, or where the deepest part of the
/// path that exists starts; `None` when the text lacks the first key.
pub fn line_of(text: &str, path: &str) -> Option<usize> {
    let steps = steps(path);
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    match (Seek {
        steps: &steps,
        depth: 0,
    })
    .deserialize(deserializer)
    {
        Ok(()) => None,
        Err(e) if e.to_string().contains(ABSENT) => None,
        Err(e) => e.location().map(|l| l.line()),
    }
}

/// Walks towards the node the remaining steps name.
struct Seek<'a> {
    /// The steps not taken yet.
    steps: &'a [Step],
    /// How many steps were taken, to tell a missing top-level key from a missing inner one.
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.steps.is_empty() {
            // Reached: every visit of `Here` fails, so the error carries this node's start.
            return d.deserialize_any(Here);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or a sequence on the key path")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let want = match self.steps.first() {
            Some(Step::Key(k)) => Some(k.as_str()),
            _ => None,
        };
        while let Some(key) = map.next_key::<serde_yaml_ng::Value>()? {
            if want.is_some() && key.as_str() == want {
                return map.next_value_seed(Seek {
                    steps: &self.steps[1..],
                    depth: self.depth + 1,
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(not_found(self.depth))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let want = match self.steps.first() {
            Some(Step::Index(i)) => Some(*i),
            _ => None,
        };
        let mut index = 0;
        loop {
            if Some(index) == want {
                return match seq.next_element_seed(Seek {
                    steps: &self.steps[1..],
                    depth: self.depth + 1,
                })? {
                    Some(()) => Ok(()),
                    None => Err(not_found(self.depth)),
                };
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(not_found(self.depth));
            }
            index += 1;
        }
    }
}

fn not_found<E: de::Error>(depth: usize) -> E {
    if depth == 0 {
        E::custom(ABSENT)
    } else {
        // The enclosing node exists: its position is the nearest line to point at.
        E::custom("egress-gate: key path ends here")
    }
}

/// Fails on whatever it is given; see [`Seek::deserialize`].
struct Here;

impl Visitor<'_> for Here {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nothing (the located node)")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TEXT: &str = "\
clusterDomain: cluster.local
podCIDRs:
  - 10.244.0.0/16
  - 10.0.0.0/33
profiles:
  - name: cnpg
  - name: reports
    selector:
      matchExpressions:
        - {key: a, operator: In}
noProxy: [a, b]
";

    #[test]
    fn finds_nested_keys_and_indexes() {
        assert_eq!(line_of(TEXT, "clusterDomain"), Some(1));
        assert_eq!(line_of(TEXT, "podCIDRs[1]"), Some(4));
        assert_eq!(line_of(TEXT, "profiles[1].name"), Some(7));
        assert_eq!(
            line_of(TEXT, "profiles[1].selector.matchExpressions[0].values"),
            Some(10)
        );
        assert_eq!(line_of(TEXT, "noProxy[1]"), Some(11));
        assert_eq!(line_of(TEXT, "apiServer[0]"), None);
    }
}
