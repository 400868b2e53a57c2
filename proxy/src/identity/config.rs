//! The `identity:` section of the config file and the `from:` field of an allow rule: the
//! schema and every check serde cannot express. Pure data; nothing here talks to Kubernetes.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::config::HumanDuration;
use crate::identity::index::{PodLabels, SlimPod};
use crate::identity::labels::{
    LabelRequirement, parse_selector, validate_dns_label, validate_dns_subdomain,
    validate_label_key, validate_label_value,
};

/// The label the webhook puts on every pod it injects (`egress-gate.io/client=true`): the
/// pods that may use the proxy at all, so the only ones worth watching.
pub const DEFAULT_POD_SELECTOR: &str = "egress-gate.io/client=true";
/// Why 2 s: the kubelet posts a new pod's IP, the API server fans it out to watches, and
/// barman-cloud archives its first WAL segment right after start; in a healthy cluster the
/// watch event arrives well under a second after the IP is set, so 2 s covers a slow API
/// server without making a truly unknown client wait long for its 403.
const DEFAULT_UNKNOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Past 30 s a waiting client holds a connection slot longer than any client library's
/// connect timeout is likely to allow, and the wait stops being a race cover.
const MAX_UNKNOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The `identity:` section: present, the proxy watches the labelled pods and maps each
/// connection's source address to one; absent, there is no Kubernetes client at all.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    /// Label selector of the pods to watch, in `kubectl -l` syntax (`k=v`, `k!=v`, `k`,
    /// `!k`, comma-separated). The webhook's client label by default: only those pods are
    /// sent to the proxy, so only they need an identity, and the index stays small.
    #[serde(default = "default_pod_selector")]
    pub pod_selector: String,
    /// Namespaces to watch; empty means cluster-wide (a ClusterRole). Listing them lets the
    /// proxy run with per-namespace Roles.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// On a source address the index does not know, how long to wait for the watch to catch
    /// up before a last direct lookup: a new pod can connect before its IP event arrives.
    #[serde(default = "default_unknown_wait")]
    pub unknown_wait: HumanDuration,
    /// What a connection that maps to no single pod may do.
    #[serde(default)]
    pub unidentified: Unidentified,
}

/// What happens to a connection whose source is not one known pod (unknown, ambiguous, or a
/// node address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Unidentified {
    /// 403: identity is required. The default, because failing closed is the point.
    #[default]
    Deny,
    /// Only the rules without `from:` apply: a migration mode for clusters where some
    /// clients cannot be identified yet.
    Global,
}

impl fmt::Display for Unidentified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Deny => "deny",
            Self::Global => "global",
        })
    }
}

/// One entry of a rule's `from:` list. Entries are alternatives (any may match); the fields
/// inside one entry must all hold. An absent field does not constrain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// The pod's namespace must be one of these.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// The pod must carry every one of these labels with exactly this value.
    #[serde(default)]
    pub pod_labels: BTreeMap<String, String>,
    /// The pod's service account, written `namespace/name`, must be one of these.
    #[serde(default)]
    pub service_accounts: Vec<String>,
}

impl fmt::Display for WorkloadSelector {
    /// `namespaces db-a & podLabels cnpg.io/cluster=pg-a & serviceAccounts velero/velero`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.namespaces.is_empty() {
            parts.push(format!("namespaces {}", self.namespaces.join(",")));
        }
        if !self.pod_labels.is_empty() {
            let labels: Vec<String> = self
                .pod_labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            parts.push(format!("podLabels {}", labels.join(",")));
        }
        if !self.service_accounts.is_empty() {
            parts.push(format!(
                "serviceAccounts {}",
                self.service_accounts.join(",")
            ));
        }
        f.write_str(&parts.join(" & "))
    }
}

impl WorkloadSelector {
    /// Whether a pod with this namespace, labels and service account is selected.
    pub fn matches(&self, namespace: &str, labels: &PodLabels, service_account: &str) -> bool {
        (self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace))
            && self
                .pod_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v.as_str()))
            && (self.service_accounts.is_empty()
                || self.service_accounts.iter().any(|sa| {
                    sa.split_once('/')
                        .is_some_and(|(ns, name)| ns == namespace && name == service_account)
                }))
    }

    /// Checks one entry; the error names the field relative to the entry.
    fn validate(&self, watched: &[String]) -> Result<(), (String, String)> {
        if self.namespaces.is_empty()
            && self.pod_labels.is_empty()
            && self.service_accounts.is_empty()
        {
            return Err((
                String::new(),
                "an empty entry would admit every identified pod; name namespaces, podLabels or serviceAccounts (a rule for everyone has no from:)".into(),
            ));
        }
        let unwatched = |ns: &str| !watched.is_empty() && !watched.iter().any(|w| w == ns);
        for (i, ns) in self.namespaces.iter().enumerate() {
            validate_dns_label(ns).map_err(|m| (format!("namespaces[{i}]"), m))?;
            if unwatched(ns) {
                return Err((
                    format!("namespaces[{i}]"),
                    format!(
                        "namespace {ns:?} is not in identity.namespaces, so no pod of it can ever be identified"
                    ),
                ));
            }
        }
        for (k, v) in &self.pod_labels {
            validate_label_key(k).map_err(|m| (format!("podLabels.{k}"), m))?;
            validate_label_value(v).map_err(|m| (format!("podLabels.{k}"), m))?;
        }
        for (i, sa) in self.service_accounts.iter().enumerate() {
            let at = format!("serviceAccounts[{i}]");
            let Some((ns, name)) = sa.split_once('/') else {
                return Err((at, format!("{sa:?} is not namespace/name")));
            };
            validate_dns_label(ns).map_err(|m| (at.clone(), m))?;
            validate_dns_subdomain(name).map_err(|m| (at.clone(), m))?;
            if unwatched(ns) {
                return Err((
                    at,
                    format!(
                        "namespace {ns:?} is not in identity.namespaces, so no pod of it can ever be identified"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether a `from:` list admits `caller` (`None`: not identified as one pod): an empty
/// list admits every client; otherwise some entry must select the pod. Fail-closed: a list
/// never admits an unidentified caller.
pub fn admits(from: &[WorkloadSelector], caller: Option<&SlimPod>) -> bool {
    from.is_empty()
        || caller.is_some_and(|pod| {
            from.iter()
                .any(|f| f.matches(&pod.namespace, &pod.labels, &pod.service_account))
        })
}

/// Checks a rule's `from:` list against the `identity:` section; the error's field is
/// relative to the rule (`from[1].namespaces[0]`).
pub fn validate_from(
    from: &[WorkloadSelector],
    identity: Option<&IdentityConfig>,
) -> Result<(), (String, String)> {
    if from.is_empty() {
        return Ok(());
    }
    let Some(identity) = identity else {
        return Err((
            "from".into(),
            "needs the identity: section: without it the proxy cannot tell which pod is calling"
                .into(),
        ));
    };
    for (i, entry) in from.iter().enumerate() {
        entry.validate(&identity.namespaces).map_err(|(field, m)| {
            let at = if field.is_empty() {
                format!("from[{i}]")
            } else {
                format!("from[{i}].{field}")
            };
            (at, m)
        })?;
    }
    Ok(())
}

impl IdentityConfig {
    /// The pod selector, parsed (validation guarantees it parses).
    pub fn selector(&self) -> Result<Vec<LabelRequirement>, String> {
        parse_selector(&self.pod_selector)
    }

    /// Checks the section; the error's field is relative to `identity`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let requirements = self.selector().map_err(|m| ("podSelector".to_owned(), m))?;
        if requirements.is_empty() {
            return Err((
                "podSelector".into(),
                "must select something: watching every pod costs memory for pods that never use the proxy (the webhook's label is egress-gate.io/client=true)".into(),
            ));
        }
        for (i, ns) in self.namespaces.iter().enumerate() {
            validate_dns_label(ns).map_err(|m| (format!("namespaces[{i}]"), m))?;
            if self.namespaces[..i].contains(ns) {
                return Err((
                    format!("namespaces[{i}]"),
                    format!("{ns:?} is listed twice"),
                ));
            }
        }
        if self.unknown_wait.0 > MAX_UNKNOWN_WAIT {
            return Err((
                "unknownWait".into(),
                format!(
                    "must be at most {MAX_UNKNOWN_WAIT:?}: a client waiting longer holds its connection slot past any sensible connect timeout"
                ),
            ));
        }
        Ok(())
    }
}

fn default_pod_selector() -> String {
    DEFAULT_POD_SELECTOR.to_owned()
}
fn default_unknown_wait() -> HumanDuration {
    HumanDuration(DEFAULT_UNKNOWN_WAIT)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> PodLabels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn fields_inside_an_entry_all_must_hold() {
        let sel = WorkloadSelector {
            namespaces: vec!["db-a".into()],
            pod_labels: [("cnpg.io/cluster".to_owned(), "pg-a".to_owned())].into(),
            service_accounts: vec![],
        };
        let pg_a = labels(&[("cnpg.io/cluster", "pg-a"), ("x", "y")]);
        assert!(sel.matches("db-a", &pg_a, "pg-a"));
        assert!(!sel.matches("db-b", &pg_a, "pg-a"));
        assert!(!sel.matches("db-a", &labels(&[("cnpg.io/cluster", "pg-b")]), "pg-a"));
        assert!(!sel.matches("db-a", &labels(&[]), "pg-a"));
    }

    #[test]
    fn service_accounts_name_namespace_and_name() {
        let sel = WorkloadSelector {
            service_accounts: vec!["velero/velero".into()],
            ..Default::default()
        };
        assert!(sel.matches("velero", &labels(&[]), "velero"));
        assert!(!sel.matches("db-a", &labels(&[]), "velero"));
        assert!(!sel.matches("velero", &labels(&[]), "default"));
    }

    #[test]
    fn from_checks() {
        let identity = IdentityConfig {
            pod_selector: DEFAULT_POD_SELECTOR.into(),
            namespaces: vec!["db-a".into()],
            unknown_wait: default_unknown_wait(),
            unidentified: Unidentified::Deny,
        };
        let entry = |ns: &str| WorkloadSelector {
            namespaces: vec![ns.into()],
            ..Default::default()
        };
        assert!(validate_from(&[entry("db-a")], Some(&identity)).is_ok());
        assert_eq!(validate_from(&[entry("db-a")], None).unwrap_err().0, "from");
        assert_eq!(
            validate_from(&[entry("db-a"), entry("db-b")], Some(&identity))
                .unwrap_err()
                .0,
            "from[1].namespaces[0]"
        );
        assert_eq!(
            validate_from(&[WorkloadSelector::default()], Some(&identity))
                .unwrap_err()
                .0,
            "from[0]"
        );
        let sa = WorkloadSelector {
            service_accounts: vec!["velero".into()],
            ..Default::default()
        };
        assert_eq!(
            validate_from(&[sa], Some(&identity)).unwrap_err().0,
            "from[0].serviceAccounts[0]"
        );
    }
}
