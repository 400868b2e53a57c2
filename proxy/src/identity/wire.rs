//! The pod as the watch reads it off the wire: only the fields the index needs, deserialised
//! directly from the API server's JSON. The full `k8s_openapi` `Pod` (container specs,
//! volumes, managed fields, conditions) is never built: serde skips what is not named here
//! without allocating it, so a 50,000-pod relist leaves no large transient objects behind.
//!
//! kube-rs needs a [`kube::Resource`] with an `ObjectMeta`; the one [`WatchedPod`] carries
//! holds only uid, namespace, name, labels, resourceVersion (the watcher resumes from it) and
//! deletionTimestamp.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::{Deserialize, Deserializer};

/// A pod, as far as the identity index cares.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct WatchedPod {
    /// The identifying metadata only (see [`slim_meta`]).
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    /// `spec`: service account and host networking.
    #[serde(default)]
    pub spec: WatchedSpec,
    /// `status`: addresses and phase.
    #[serde(default)]
    pub status: WatchedStatus,
}

/// The two `spec` fields the index reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedSpec {
    /// `spec.serviceAccountName`, matched by `from[].serviceAccounts`.
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// `spec.hostNetwork`: such a pod has its node's address and claims none.
    #[serde(default)]
    pub host_network: Option<bool>,
}

/// The `status` fields the index reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedStatus {
    /// `status.phase`: finished pods claim no address.
    #[serde(default)]
    pub phase: Option<String>,
    /// `status.podIP`: the first address, for API servers that fill only this one.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    /// `status.podIPs`: every address (both families on a dual-stack cluster).
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<WatchedIp>>,
    /// `status.hostIP`: the node's first address.
    #[serde(default, rename = "hostIP")]
    pub host_ip: Option<String>,
    /// `status.hostIPs`: the node's addresses, to recognise SNATed connections.
    #[serde(default, rename = "hostIPs")]
    pub host_ips: Option<Vec<WatchedIp>>,
}

/// One entry of `podIPs` / `hostIPs`.
#[derive(Debug, Clone, Deserialize)]
pub struct WatchedIp {
    /// The address, as text.
    pub ip: String,
}

/// The metadata fields kept; everything else in `metadata` is skipped unread.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimMeta {
    /// `metadata.uid`.
    #[serde(default)]
    uid: Option<String>,
    /// `metadata.namespace`.
    #[serde(default)]
    namespace: Option<String>,
    /// `metadata.name`.
    #[serde(default)]
    name: Option<String>,
    /// `metadata.labels`.
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    /// `metadata.resourceVersion`: the watcher resumes from the last one it saw.
    #[serde(default)]
    resource_version: Option<String>,
    /// `metadata.deletionTimestamp`: the pod is terminating.
    #[serde(default)]
    deletion_timestamp: Option<Time>,
}

/// Reads `metadata` through [`SlimMeta`], so `managedFields`, annotations and owner
/// references are never built.
fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = SlimMeta::deserialize(d)?;
    Ok(ObjectMeta {
        uid: m.uid,
        namespace: m.namespace,
        name: m.name,
        labels: m.labels,
        resource_version: m.resource_version,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

impl kube::Resource for WatchedPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind((): &()) -> Cow<'_, str> {
        Cow::Borrowed("Pod")
    }
    fn group((): &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn version((): &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }
    fn plural((): &()) -> Cow<'_, str> {
        Cow::Borrowed("pods")
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kube::Resource;

    #[test]
    fn reads_the_identity_fields_and_skips_the_rest() {
        let pod: WatchedPod = serde_json::from_str(
            r#"{"apiVersion":"v1","kind":"Pod",
                "metadata":{"uid":"u1","namespace":"db-a","name":"pg-a-1","resourceVersion":"42",
                  "labels":{"cnpg.io/cluster":"pg-a"},"annotations":{"a":"b"},
                  "managedFields":[{"manager":"kubelet","fieldsV1":{"f:status":{}}}],
                  "deletionTimestamp":"2026-01-01T00:00:00Z"},
                "spec":{"serviceAccountName":"pg-a","hostNetwork":false,
                  "containers":[{"name":"postgres","image":"x"}]},
                "status":{"phase":"Running","podIP":"10.0.0.1",
                  "podIPs":[{"ip":"10.0.0.1"},{"ip":"fd00::1"}],"hostIPs":[{"ip":"192.168.0.1"}],
                  "conditions":[{"type":"Ready","status":"True"}]}}"#,
        )
        .unwrap();
        assert_eq!(pod.meta().uid.as_deref(), Some("u1"));
        assert_eq!(pod.meta().resource_version.as_deref(), Some("42"));
        assert!(pod.meta().annotations.is_none());
        assert!(pod.meta().managed_fields.is_none());
        assert!(pod.metadata.deletion_timestamp.is_some());
        assert_eq!(pod.spec.service_account_name.as_deref(), Some("pg-a"));
        assert_eq!(pod.status.pod_ips.as_ref().map(Vec::len), Some(2));
        assert_eq!(
            WatchedPod::url_path(&(), Some("db-a")),
            "/api/v1/namespaces/db-a/pods"
        );
    }
}
