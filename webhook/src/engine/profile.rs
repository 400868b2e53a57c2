//! Profiles: which pods are injected, and which peer services they talk to directly.

use std::collections::BTreeMap;

use super::selector::{LabelSelector, Operator, Requirement};

/// A named set of pods that egress-gate injects, with the peer services those pods reach
/// without the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Recorded in the status annotation and in metrics, so admins see why a pod was injected.
    pub name: String,
    /// A pod belongs to the profile when any of these selectors matches its labels; one
    /// Kubernetes selector cannot express "instance pods or recovery jobs".
    pub selectors: Vec<LabelSelector>,
    /// Service names added to NO_PROXY, rendered from the pod's labels (see [`PeerTemplate`]),
    /// so traffic to them stays direct even before the Services exist.
    pub peer_services: Vec<PeerTemplate>,
}

impl Profile {
    /// Whether a pod with these labels belongs to this profile.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selectors.iter().any(|s| s.matches(labels))
    }

    /// The names of the profiles compiled into egress-gate.
    pub const BUILT_IN: [&'static str; 2] = ["cnpg", "velero"];

    /// A built-in profile by name.
    pub fn built_in(name: &str) -> Option<Profile> {
        match name {
            "cnpg" => Some(cnpg()),
            "velero" => Some(velero()),
            _ => None,
        }
    }
}

/// CloudNativePG: instance pods (they archive WAL and take base backups) and the recovery
/// jobs that read backups. Not pooler pods, and never selected on `role`, which the operator
/// adds only after the pod exists.
fn cnpg() -> Profile {
    Profile {
        name: "cnpg".into(),
        selectors: vec![
            labels(&[("cnpg.io/podRole", "instance")]),
            expression(
                "cnpg.io/jobRole",
                Operator::In,
                &["full-recovery", "snapshot-recovery"],
            ),
        ],
        peer_services: ["-rw", "-ro", "-r", "-any"]
            .iter()
            .map(|suffix| PeerTemplate::cnpg_service(suffix))
            .collect(),
    }
}

/// Velero: the server and node-agent pods from `velero install` and from the Helm chart, and
/// the pods Velero derives from templates (data-mover exposers, file-system backup and
/// restore pods, repository maintenance jobs),
/// which copy env from their templates rather than from injected pods.
fn velero() -> Profile {
    Profile {
        name: "velero".into(),
        selectors: vec![
            labels(&[("component", "velero")]),
            LabelSelector {
                match_labels: BTreeMap::from([(
                    "app.kubernetes.io/name".to_string(),
                    "velero".to_string(),
                )]),
                match_expressions: vec![Requirement {
                    key: "name".into(),
                    operator: Operator::In,
                    values: vec!["velero".into(), "node-agent".into()],
                }],
            },
            expression("velero.io/exposer-pod-group", Operator::Exists, &[]),
            expression("velero.io/repo-name", Operator::Exists, &[]),
            // File-system backup and restore pods (Velero 1.17's pod-volume data movers)
            // carry only these labels, not the exposer group.
            expression("velero.io/pod-volume-backup", Operator::Exists, &[]),
            expression("velero.io/pod-volume-restore", Operator::Exists, &[]),
        ],
        peer_services: Vec::new(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        match_expressions: Vec::new(),
    }
}

fn expression(key: &str, operator: Operator, values: &[&str]) -> LabelSelector {
    LabelSelector {
        match_labels: BTreeMap::new(),
        match_expressions: vec![Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }],
    }
}

/// A peer service name template such as `"{cnpg.io/cluster}-rw"`: literal text with label
/// keys in braces, replaced by the pod's label values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTemplate {
    /// The template as written, for messages.
    source: String,
    /// The template split into literal text and label lookups.
    parts: Vec<TemplatePart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    Label(String),
}

impl PeerTemplate {
    /// Parses a template; the error says what is wrong with it.
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(TemplatePart::Literal(rest.to_string()));
                    rest = "";
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(format!("{source:?} has a '}}' without a matching '{{'"));
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(TemplatePart::Literal(rest[..i].to_string()));
                    }
                    let after = &rest[i + 1..];
                    let end = after
                        .find('}')
                        .ok_or_else(|| format!("{source:?} has a '{{' that is never closed"))?;
                    let key = &after[..end];
                    super::selector::validate_key(key)
                        .map_err(|m| format!("{source:?} names an invalid label: {m}"))?;
                    parts.push(TemplatePart::Label(key.to_string()));
                    rest = &after[end + 1..];
                }
            }
        }
        if parts.is_empty() {
            return Err("a peer service template cannot be empty".into());
        }
        Ok(Self {
            source: source.to_string(),
            parts,
        })
    }

    fn cnpg_service(suffix: &str) -> Self {
        Self {
            source: format!("{{cnpg.io/cluster}}{suffix}"),
            parts: vec![
                TemplatePart::Label("cnpg.io/cluster".into()),
                TemplatePart::Literal(suffix.into()),
            ],
        }
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The service name for a pod with these labels, or `None` when a label it needs is
    /// missing (a pod that is not part of a cluster has no peers to name).
    pub fn render(&self, labels: &BTreeMap<String, String>) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => out.push_str(text),
                TemplatePart::Label(key) => out.push_str(labels.get(key)?),
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cnpg_selects_instances_and_recovery_jobs_only() {
        let p = Profile::built_in("cnpg").unwrap();
        assert!(p.matches(&pod(&[
            ("cnpg.io/podRole", "instance"),
            ("cnpg.io/cluster", "pg")
        ])));
        assert!(p.matches(&pod(&[("cnpg.io/jobRole", "full-recovery")])));
        assert!(p.matches(&pod(&[("cnpg.io/jobRole", "snapshot-recovery")])));
        assert!(!p.matches(&pod(&[("cnpg.io/jobRole", "initdb")])));
        assert!(!p.matches(&pod(&[("cnpg.io/podRole", "pooler")])));
        assert!(!p.matches(&pod(&[("role", "primary")])));
    }

    #[test]
    fn velero_selects_both_installers_and_derived_pods() {
        let p = Profile::built_in("velero").unwrap();
        assert!(p.matches(&pod(&[("component", "velero"), ("deploy", "velero")])));
        assert!(p.matches(&pod(&[
            ("app.kubernetes.io/name", "velero"),
            ("name", "velero")
        ])));
        assert!(p.matches(&pod(&[
            ("app.kubernetes.io/name", "velero"),
            ("name", "node-agent")
        ])));
        assert!(!p.matches(&pod(&[
            ("app.kubernetes.io/name", "velero"),
            ("name", "upgrade-crds")
        ])));
        assert!(p.matches(&pod(&[("velero.io/exposer-pod-group", "snapshot-exposer")])));
        assert!(p.matches(&pod(&[("velero.io/repo-name", "default-kopia")])));
        assert!(p.matches(&pod(&[("velero.io/pod-volume-backup", "pvb-1")])));
        assert!(p.matches(&pod(&[("velero.io/pod-volume-restore", "pvr-1")])));
        assert!(!p.matches(&pod(&[("app", "harbor")])));
    }

    #[test]
    fn templates_render_from_labels() {
        let t = PeerTemplate::parse("{cnpg.io/cluster}-rw").unwrap();
        assert_eq!(
            t.render(&pod(&[("cnpg.io/cluster", "pg")])).as_deref(),
            Some("pg-rw")
        );
        assert_eq!(t.render(&pod(&[])), None);
        assert_eq!(t, PeerTemplate::cnpg_service("-rw"));
        let t = PeerTemplate::parse("db-{app}-{tier}").unwrap();
        assert_eq!(
            t.render(&pod(&[("app", "a"), ("tier", "b")])).as_deref(),
            Some("db-a-b")
        );
        assert_eq!(
            PeerTemplate::parse("fixed")
                .unwrap()
                .render(&pod(&[]))
                .as_deref(),
            Some("fixed")
        );
    }

    #[test]
    fn bad_templates_say_why() {
        assert!(
            PeerTemplate::parse("{app")
                .unwrap_err()
                .contains("never closed")
        );
        assert!(
            PeerTemplate::parse("app}")
                .unwrap_err()
                .contains("without a matching")
        );
        assert!(
            PeerTemplate::parse("{}")
                .unwrap_err()
                .contains("invalid label")
        );
        assert!(PeerTemplate::parse("").unwrap_err().contains("empty"));
    }
}
