//! Kubernetes label selectors (`matchLabels` and `matchExpressions`), as profiles use them.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A label selector with the semantics of `metav1.LabelSelector`: every `matchLabels` entry
/// and every requirement must hold. An empty selector matches every pod, as in Kubernetes.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements; all must hold.
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

/// One set-based requirement of a [`LabelSelector`].
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirement {
    /// The label key the requirement is about.
    pub key: String,
    /// How the label's value is compared with `values`.
    pub operator: Operator,
    /// The values for `In` and `NotIn`; must be empty for `Exists` and `DoesNotExist`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// The operators Kubernetes label selectors support.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Operator {
    /// The label is present and its value is one of `values`.
    In,
    /// The label is absent, or present with a value not in `values`.
    NotIn,
    /// The label is present, whatever its value.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// Label lookup used for matching; implemented for the maps the engine reads from pods.
pub trait Labels {
    /// The value of label `key`, if the pod has it.
    fn get(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<&str> {
        BTreeMap::get(self, key).map(String::as_str)
    }
}

impl LabelSelector {
    /// Whether a pod with `labels` is selected.
    pub fn matches(&self, labels: &impl Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value.as_str()))
            && self.match_expressions.iter().all(|req| req.matches(labels))
    }

    /// Checks the selector the way the API server would, naming the offending field
    /// relative to the selector (for example `matchExpressions[1].values`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (key, value) in &self.match_labels {
            validate_key(key).map_err(|m| (format!("matchLabels.{key}"), m))?;
            validate_value(value).map_err(|m| (format!("matchLabels.{key}"), m))?;
        }
        for (i, req) in self.match_expressions.iter().enumerate() {
            let at = |field: &str| format!("matchExpressions[{i}].{field}");
            validate_key(&req.key).map_err(|m| (at("key"), m))?;
            match req.operator {
                Operator::In | Operator::NotIn if req.values.is_empty() => {
                    return Err((
                        at("values"),
                        format!("operator {:?} needs at least one value", req.operator),
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !req.values.is_empty() => {
                    return Err((
                        at("values"),
                        format!("operator {:?} takes no values", req.operator),
                    ));
                }
                _ => {}
            }
            for value in &req.values {
                validate_value(value).map_err(|m| (at("values"), m))?;
            }
        }
        Ok(())
    }
}

impl Requirement {
    fn matches(&self, labels: &impl Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.iter().any(|w| w == v)),
            Operator::NotIn => value.is_none_or(|v| self.values.iter().all(|w| w != v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// Longest label name part (after an optional DNS prefix and `/`), as Kubernetes allows.
const MAX_NAME_LEN: usize = 63;
/// Longest DNS prefix of a label key, as Kubernetes allows.
const MAX_PREFIX_LEN: usize = 253;

/// A label key: an optional DNS subdomain prefix and `/`, then a name of at most 63
/// alphanumerics, `-`, `_` or `.`, starting and ending alphanumeric.
pub(crate) fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let dns_ok = !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX_LEN
            && prefix.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !dns_ok {
            return Err(format!(
                "label key {key:?} has an invalid prefix (must be a DNS subdomain)"
            ));
        }
    }
    if name.is_empty() || !is_label_value(name) {
        return Err(format!(
            "label key {key:?} is invalid (name part: 1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends)"
        ));
    }
    Ok(())
}

/// A label value: empty, or up to 63 alphanumerics, `-`, `_` or `.`, alphanumeric at both ends.
pub(crate) fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_value(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} is invalid (up to 63 alphanumerics, '-', '_' or '.', alphanumeric at both ends)"
        ))
    }
}

fn is_label_value(s: &str) -> bool {
    let bytes = s.as_bytes();
    s.len() <= MAX_NAME_LEN
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::default().matches(&labels(&[])));
        assert!(LabelSelector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_need_exact_values() {
        let sel = LabelSelector {
            match_labels: labels(&[("cnpg.io/podRole", "instance")]),
            ..Default::default()
        };
        assert!(sel.matches(&labels(&[("cnpg.io/podRole", "instance"), ("x", "y")])));
        assert!(!sel.matches(&labels(&[("cnpg.io/podRole", "pooler")])));
        assert!(!sel.matches(&labels(&[])));
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        let pod = labels(&[("name", "velero")]);
        let none = labels(&[]);
        let cases = [
            (
                req("name", Operator::In, &["velero", "node-agent"]),
                true,
                false,
            ),
            (req("name", Operator::In, &["other"]), false, false),
            (req("name", Operator::NotIn, &["other"]), true, true),
            (req("name", Operator::NotIn, &["velero"]), false, true),
            (req("name", Operator::Exists, &[]), true, false),
            (req("name", Operator::DoesNotExist, &[]), false, true),
        ];
        for (r, on_pod, on_empty) in cases {
            let sel = LabelSelector {
                match_expressions: vec![r.clone()],
                ..Default::default()
            };
            assert_eq!(sel.matches(&pod), on_pod, "{r:?} on labelled pod");
            assert_eq!(sel.matches(&none), on_empty, "{r:?} on unlabelled pod");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let sel = LabelSelector {
            match_expressions: vec![req("a", Operator::Exists, &[]), req("b", Operator::In, &[])],
            ..Default::default()
        };
        let (field, message) = sel.validate().unwrap_err();
        assert_eq!(field, "matchExpressions[1].values");
        assert!(message.contains("at least one value"), "{message}");

        let sel = LabelSelector {
            match_labels: labels(&[("Bad Key", "x")]),
            ..Default::default()
        };
        assert_eq!(sel.validate().unwrap_err().0, "matchLabels.Bad Key");
        assert!(validate_key("egress-gate.io/client").is_ok());
        assert!(validate_key("-x").is_err());
        assert!(validate_key("UPPER.io/x").is_err());
        assert!(validate_value("").is_ok());
        assert!(validate_value(&"a".repeat(64)).is_err());
    }
}
