//! Kubernetes names and label selectors, checked the way the API server checks them, so a
//! typo in the config file is an error at load time instead of a watch that selects nothing.

use std::collections::BTreeMap;
use std::fmt;

/// Longest DNS label (a namespace name), RFC 1123.
const MAX_DNS_LABEL: usize = 63;
/// Longest DNS subdomain (a service account name, a label key prefix), RFC 1123.
const MAX_DNS_SUBDOMAIN: usize = 253;
/// Longest label value and label key name part, as Kubernetes allows.
const MAX_LABEL_NAME: usize = 63;

/// One requirement of an equality-based label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelRequirement {
    /// `key=value` (or `key==value`): present with this value.
    Equals(String, String),
    /// `key!=value`: absent, or present with another value.
    NotEquals(String, String),
    /// `key`: present, any value.
    Exists(String),
    /// `!key`: absent.
    Absent(String),
}

impl LabelRequirement {
    /// Whether a pod with these labels meets the requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Equals(k, v) => labels.get(k) == Some(v),
            Self::NotEquals(k, v) => labels.get(k) != Some(v),
            Self::Exists(k) => labels.contains_key(k),
            Self::Absent(k) => !labels.contains_key(k),
        }
    }
}

impl fmt::Display for LabelRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Equals(k, v) => write!(f, "{k}={v}"),
            Self::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Self::Exists(k) => f.write_str(k),
            Self::Absent(k) => write!(f, "!{k}"),
        }
    }
}

/// Parses a selector in `kubectl -l` syntax, equality-based forms only: `k=v`, `k==v`,
/// `k!=v`, `k`, `!k`, comma-separated. Set-based forms (`k in (a,b)`) are refused by name.
pub fn parse_selector(text: &str) -> Result<Vec<LabelRequirement>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    if text.contains('(') || text.contains(" in ") || text.contains(" notin ") {
        return Err(format!(
            "{text:?}: set-based selectors (in, notin) are not supported; use k=v, k!=v, k or !k"
        ));
    }
    text.split(',')
        .map(|part| {
            let part = part.trim();
            let req = if let Some((k, v)) = part.split_once("!=") {
                LabelRequirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                LabelRequirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some(k) = part.strip_prefix('!') {
                LabelRequirement::Absent(k.trim().to_owned())
            } else {
                LabelRequirement::Exists(part.to_owned())
            };
            match &req {
                LabelRequirement::Equals(k, v) | LabelRequirement::NotEquals(k, v) => {
                    validate_label_key(k)?;
                    validate_label_value(v)?;
                }
                LabelRequirement::Exists(k) | LabelRequirement::Absent(k) => validate_label_key(k)?,
            }
            Ok(req)
        })
        .collect()
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of 1-63 alphanumerics,
/// `-`, `_` or `.`, alphanumeric at both ends.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            validate_dns_subdomain(prefix).map_err(|_| {
                format!("label key {key:?} has an invalid prefix (must be a DNS subdomain)")
            })?;
            name
        }
        None => key,
    };
    if name.is_empty() || !is_label_value(name) {
        return Err(format!(
            "label key {key:?} is invalid (name part: 1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends)"
        ));
    }
    Ok(())
}

/// A label value: empty, or up to 63 alphanumerics, `-`, `_` or `.`, alphanumeric at both ends.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_value(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} is invalid (up to 63 alphanumerics, '-', '_' or '.', alphanumeric at both ends)"
        ))
    }
}

/// An RFC 1123 label, as namespace names are: 1-63 lower-case alphanumerics or `-`,
/// alphanumeric at both ends.
pub fn validate_dns_label(name: &str) -> Result<(), String> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (1-63 lower-case letters, digits or '-', starting and ending with a letter or digit)"
        ))
    }
}

/// An RFC 1123 subdomain, as service account names are: dot-separated labels, at most 253
/// characters in all.
pub fn validate_dns_subdomain(name: &str) -> Result<(), String> {
    if !name.is_empty() && name.len() <= MAX_DNS_SUBDOMAIN && name.split('.').all(is_dns_label) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (lower-case letters, digits, '-' and '.', at most 253 characters)"
        ))
    }
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !s.is_empty()
        && s.len() <= MAX_DNS_LABEL
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() <= MAX_LABEL_NAME
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn selectors_parse_and_match() {
        let reqs = parse_selector("egress-gate.io/client=true, tier!=x,app,!legacy").unwrap();
        assert_eq!(
            reqs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            "egress-gate.io/client=true,tier!=x,app,!legacy"
        );
        let mut labels = BTreeMap::new();
        labels.insert("egress-gate.io/client".to_owned(), "true".to_owned());
        labels.insert("app".to_owned(), "pg".to_owned());
        assert!(reqs.iter().all(|r| r.matches(&labels)));
        labels.insert("legacy".to_owned(), String::new());
        assert!(!reqs.iter().all(|r| r.matches(&labels)));
        assert_eq!(
            parse_selector("a==b").unwrap(),
            vec![LabelRequirement::Equals("a".into(), "b".into())]
        );
    }

    #[test]
    fn bad_selectors_are_refused() {
        assert!(
            parse_selector("env in (a,b)")
                .unwrap_err()
                .contains("set-based")
        );
        assert!(parse_selector("a=b,").is_err());
        assert!(parse_selector("Bad_Prefix/x=y").is_err());
        assert!(parse_selector("x=-y").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_dns_label("db-a").is_ok());
        assert!(validate_dns_label("DB").is_err());
        assert!(validate_dns_label("-a").is_err());
        assert!(validate_dns_subdomain("system.velero").is_ok());
        assert!(validate_dns_subdomain("a..b").is_err());
        assert!(validate_label_key("cnpg.io/cluster").is_ok());
        assert!(validate_label_key("cnpg.io/").is_err());
        assert!(validate_label_value("").is_ok());
    }
}
