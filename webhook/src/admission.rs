//! AdmissionReview `admission.k8s.io/v1` in and out: the bytes the API server sends and the
//! bytes it expects back. Synchronous and free of I/O so it can be fuzzed directly.
//!
//! The pod stays raw JSON from the request to the engine; the response is built with
//! explicit field order and the patch is base64 of the engine's RFC 6902 operations.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::engine::patch::push_json;
use crate::engine::pod::{PodFields, PodShapeError, PodView};
use crate::engine::{Decision, Injector, Operation, PodContext};

/// The only AdmissionReview version egress-gate speaks (the only one current API servers send
/// when the configuration lists `admissionReviewVersions: [v1]`).
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// Where the names of Services come from for peer-service NO_PROXY entries.
pub trait ServiceDirectory: Send + Sync {
    /// Names of the Services in `namespace`, sorted. Empty when unknown.
    fn services_in(&self, namespace: &str) -> Vec<String>;
}

/// A directory that knows no Services (discovery off).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoServices;

impl ServiceDirectory for NoServices {
    fn services_in(&self, _namespace: &str) -> Vec<String> {
        Vec::new()
    }
}

/// How a review ended, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReviewResult {
    /// Allowed with a non-empty patch.
    Patched,
    /// Allowed, nothing to change (not selected, opted out, or already injected).
    Unchanged,
    /// Allowed unchanged: the request is not a pod CREATE (a misconfigured webhook rule).
    NotPodCreate,
    /// Allowed unchanged: the pod could not be read.
    Unparseable,
    /// Rejected with 400: the body is not an AdmissionReview.
    BadRequest,
}

impl ReviewResult {
    /// The label value used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewResult::Patched => "patched",
            ReviewResult::Unchanged => "unchanged",
            ReviewResult::NotPodCreate => "not-pod-create",
            ReviewResult::Unparseable => "unparseable",
            ReviewResult::BadRequest => "bad-request",
        }
    }
}

/// What the server logs and counts about one review.
#[derive(Clone, Debug, Default)]
pub struct ReviewRecord {
    /// The request uid.
    pub uid: String,
    /// The request namespace.
    pub namespace: String,
    /// The pod's name, or its generateName followed by `*`.
    pub pod: String,
    /// The selecting profile, if any.
    pub profile: Option<String>,
    /// The engine's decision (`injected`, `not-selected`, ...), if it ran.
    pub decision: Option<String>,
    /// Number of patch operations returned.
    pub patch_ops: usize,
    /// Whether the API server marked the request as a dry run.
    pub dry_run: bool,
    /// Why the pod was allowed unchanged, for `NotPodCreate` and `Unparseable`.
    pub reason: Option<String>,
}

/// The HTTP answer for one review body.
#[derive(Clone, Debug)]
pub struct Reply {
    /// 200 for any AdmissionReview (allowed), 400 for a body that is not one.
    pub status: u16,
    /// JSON for 200, a one-line text message for 400.
    pub body: Vec<u8>,
    /// How it ended.
    pub result: ReviewResult,
    /// What to log.
    pub record: ReviewRecord,
}

/// The request as received, with the pod as `P`: [`PodFields`] on the fast path (one pass
/// over the body, skipping what the engine does not read), or [`RawValue`] when that pass
/// fails, to tell a malformed pod (allowed, with a warning) from a malformed review (400).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn<'a, P> {
    #[serde(borrow)]
    api_version: Option<Cow<'a, str>>,
    #[serde(borrow)]
    kind: Option<Cow<'a, str>>,
    request: Option<RequestIn<P>>,
}

/// A pod inside a request, read into a [`PodView`] once the request is known to be a pod
/// CREATE.
trait PodSource<'a> {
    fn view(self) -> Result<PodView<'a>, PodShapeError>;
}

impl<'a> PodSource<'a> for PodFields<'a> {
    fn view(self) -> Result<PodView<'a>, PodShapeError> {
        self.into_view()
    }
}

impl<'a> PodSource<'a> for &'a RawValue {
    fn view(self) -> Result<PodView<'a>, PodShapeError> {
        PodView::from_json(self.get().as_bytes())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn<P> {
    uid: String,
    kind: Option<GroupVersionKind>,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    operation: Option<String>,
    #[serde(default = "none")]
    object: Option<P>,
    #[serde(default)]
    dry_run: Option<bool>,
}

fn none<P>() -> Option<P> {
    None
}

#[derive(Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// Answers one AdmissionReview body. Never panics; every AdmissionReview is allowed, with
/// a patch when egress-gate has something to add.
pub fn review(injector: &Injector, services: &dyn ServiceDirectory, body: &[u8]) -> Reply {
    // JSON is UTF-8 (RFC 8259), and serde_json does not check the strings it skips. One pass
    // over the whole body here, and the parser need not check each string it keeps.
    let body = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(e) => return bad_request(format!("body is not UTF-8: {e}")),
    };
    if let Ok(parsed) = serde_json::from_str::<ReviewIn<PodFields<'_>>>(body) {
        return answer(injector, services, parsed);
    }
    match serde_json::from_str::<ReviewIn<&RawValue>>(body) {
        Ok(parsed) => answer(injector, services, parsed),
        Err(e) => bad_request(format!("body is not an AdmissionReview: {e}")),
    }
}

fn answer<'a, P: PodSource<'a>>(
    injector: &Injector,
    services: &dyn ServiceDirectory,
    parsed: ReviewIn<'a, P>,
) -> Reply {
    if parsed.api_version.as_deref() != Some(API_VERSION)
        || parsed.kind.as_deref() != Some("AdmissionReview")
    {
        return bad_request(format!(
            "expected apiVersion {API_VERSION} and kind AdmissionReview, got {:?} and {:?}",
            parsed.api_version.unwrap_or_default(),
            parsed.kind.unwrap_or_default()
        ));
    }
    let Some(request) = parsed.request else {
        return bad_request("AdmissionReview has no request".into());
    };
    if request.uid.is_empty() {
        return bad_request("AdmissionReview request has an empty uid".into());
    }

    let mut record = ReviewRecord {
        uid: request.uid.clone(),
        namespace: request.namespace.clone().unwrap_or_default(),
        pod: request.name.clone().unwrap_or_default(),
        dry_run: request.dry_run.unwrap_or(false),
        ..Default::default()
    };

    let is_pod = request
        .kind
        .as_ref()
        .is_some_and(|k| k.group.is_empty() && k.kind == "Pod")
        && request
            .sub_resource
            .as_deref()
            .unwrap_or_default()
            .is_empty();
    let operation = request.operation.as_deref().and_then(parse_operation);
    let (Some(object), true, Some(operation @ Operation::Create)) =
        (request.object, is_pod, operation)
    else {
        let reason = format!(
            "egress-gate: not a pod CREATE (kind {:?}, subresource {:?}, operation {:?}); allowed unchanged",
            request
                .kind
                .as_ref()
                .map(|k| k.kind.as_str())
                .unwrap_or_default(),
            request.sub_resource.as_deref().unwrap_or_default(),
            request.operation.as_deref().unwrap_or_default(),
        );
        return unchanged(&request.uid, ReviewResult::NotPodCreate, reason, record);
    };
    let view = match object.view() {
        Ok(view) => view,
        Err(e) => {
            let reason = format!("egress-gate: pod not injected: {e}");
            return unchanged(&request.uid, ReviewResult::Unparseable, reason, record);
        }
    };
    if record.pod.is_empty() {
        record.pod = match (&view.name, &view.generate_name) {
            (Some(name), _) => name.to_string(),
            (None, Some(prefix)) => format!("{prefix}*"),
            (None, None) => String::new(),
        };
    }
    let namespace = request
        .namespace
        .as_deref()
        .or(view.namespace.as_deref())
        .unwrap_or_default()
        .to_string();
    let services = services.services_in(&namespace);
    let ctx = PodContext {
        namespace: &namespace,
        operation,
        services: &services,
    };
    let mutation = injector.review_view(&view, &ctx);
    record.profile = mutation.decision.profile().map(str::to_string);
    record.decision = Some(mutation.decision.as_str().to_string());
    record.patch_ops = mutation.patch.len();
    let result = match (&mutation.decision, mutation.patch.is_empty()) {
        (Decision::NotCreate, _) => ReviewResult::NotPodCreate,
        (_, true) => ReviewResult::Unchanged,
        (_, false) => ReviewResult::Patched,
    };
    let patch = (!mutation.patch.is_empty()).then(|| mutation.patch.as_bytes());
    allowed(&request.uid, patch, mutation.warnings, result, record)
}

impl ReviewRecord {
    fn with_reason(mut self, reason: String) -> Self {
        self.reason = Some(reason);
        self
    }
}

fn parse_operation(op: &str) -> Option<Operation> {
    match op {
        "CREATE" => Some(Operation::Create),
        "UPDATE" => Some(Operation::Update),
        "DELETE" => Some(Operation::Delete),
        "CONNECT" => Some(Operation::Connect),
        _ => None,
    }
}

/// Allowed without a patch, for a reason that goes to the user as a warning and to the log.
fn unchanged(uid: &str, result: ReviewResult, reason: String, record: ReviewRecord) -> Reply {
    allowed(
        uid,
        None,
        vec![reason.clone()],
        result,
        record.with_reason(reason),
    )
}

/// The 200 answer: `response.uid` echoed, `allowed: true`, and the patch when there is one.
fn allowed(
    uid: &str,
    patch: Option<&[u8]>,
    warnings: Vec<String>,
    result: ReviewResult,
    record: ReviewRecord,
) -> Reply {
    Reply {
        status: 200,
        body: response_bytes(uid, patch, &warnings),
        result,
        record,
    }
}

/// The AdmissionReview response, written field by field in the order the tests pin:
/// `apiVersion`, `kind`, then `response` with `uid`, `allowed`, `patchType`, `patch`,
/// `warnings`. The patch's base64 goes in as is: its alphabet needs no JSON escaping, and it
/// is the largest part of the answer.
fn response_bytes(uid: &str, patch: Option<&[u8]>, warnings: &[String]) -> Vec<u8> {
    let patch_len = patch.map_or(0, |p| base64::encoded_len(p.len(), true).unwrap_or(0));
    let mut out = Vec::with_capacity(256 + uid.len() + patch_len);
    out.extend_from_slice(br#"{"apiVersion":""#);
    out.extend_from_slice(API_VERSION.as_bytes());
    out.extend_from_slice(br#"","kind":"AdmissionReview","response":{"uid":"#);
    push_json(&mut out, uid);
    out.extend_from_slice(br#","allowed":true"#);
    if let Some(patch) = patch {
        out.extend_from_slice(br#","patchType":"JSONPatch","patch":""#);
        let start = out.len();
        out.resize(start + patch_len, 0);
        // The buffer was sized by `encoded_len` for this input, so this cannot fail; if it
        // ever did, the patch would be dropped rather than the answer corrupted.
        match BASE64.encode_slice(patch, &mut out[start..]) {
            Ok(written) => out.truncate(start + written),
            Err(_) => out.truncate(start),
        }
        out.push(b'"');
    }
    if !warnings.is_empty() {
        out.extend_from_slice(br#","warnings":"#);
        push_json(&mut out, warnings);
    }
    out.extend_from_slice(b"}}");
    out
}

fn bad_request(message: String) -> Reply {
    Reply {
        status: 400,
        body: format!("{message}\n").into_bytes(),
        result: ReviewResult::BadRequest,
        record: ReviewRecord {
            reason: Some(message),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::config::Config;
    use crate::engine::ClusterFacts;

    fn injector() -> Injector {
        let config = Config::default();
        Injector::new(&config, &ClusterFacts::from_config(&config))
    }

    fn body(request: Value) -> Vec<u8> {
        json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "request": request})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn not_selected_pod_gets_exact_minimal_answer() {
        let b = body(json!({
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "namespace": "db",
            "object": {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "a"}]}}
        }));
        let reply = review(&injector(), &NoServices, &b);
        assert_eq!(reply.status, 200);
        assert_eq!(
            String::from_utf8(reply.body).unwrap(),
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"705ab4f5-6393-11e8-b7cc-42010a800002","allowed":true}}"#
        );
        assert_eq!(reply.result, ReviewResult::Unchanged);
    }

    #[test]
    fn bad_bodies_are_400_with_a_message() {
        for (b, needle) in [
            (b"not json".to_vec(), "not an AdmissionReview"),
            (
                br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#.to_vec(),
                "v1beta1",
            ),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
                "no request",
            ),
            (body(json!({"uid": ""})), "empty uid"),
            (body(json!({"kind": {}})), "uid"),
            (not_utf8_in_a_skipped_field(), "not UTF-8"),
        ] {
            let reply = review(&injector(), &NoServices, &b);
            assert_eq!(reply.status, 400);
            let text = String::from_utf8(reply.body).unwrap();
            assert!(text.contains(needle), "{text}");
        }
    }

    /// A pod review whose only flaw is a byte that is not UTF-8 inside a field the engine
    /// skips (found by the fuzzer: serde_json does not check strings it skips).
    fn not_utf8_in_a_skipped_field() -> Vec<u8> {
        let mut b = body(json!({
            "uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "object": {"spec": {"containers": [{"name": "c"}], "volumes": [{"name": "v~"}]}}
        }));
        let at = b.iter().position(|&c| c == b'~').unwrap();
        b[at] = 0xff;
        b
    }

    #[test]
    fn other_kinds_and_operations_are_allowed_with_a_warning() {
        for request in [
            json!({"uid": "u", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"}, "operation": "CREATE", "object": {}}),
            json!({"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "UPDATE", "object": {"spec": {"containers": []}}}),
            json!({"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "subResource": "status", "operation": "CREATE", "object": {}}),
            json!({"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "DELETE"}),
        ] {
            let reply = review(&injector(), &NoServices, &body(request.clone()));
            assert_eq!(reply.status, 200, "{request}");
            let v: Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(v["response"]["allowed"], true);
            assert!(v["response"].get("patch").is_none());
            assert!(
                v["response"]["warnings"][0]
                    .as_str()
                    .unwrap()
                    .contains("not a pod CREATE"),
                "{v}"
            );
            assert_eq!(reply.result, ReviewResult::NotPodCreate);
        }
    }

    #[test]
    fn unparseable_pod_is_allowed_unchanged_with_the_field_named() {
        let b = body(json!({
            "uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
            "object": {"metadata": {"labels": {"cnpg.io/podRole": "instance"}}, "spec": {"containers": "nope"}}
        }));
        let reply = review(&injector(), &NoServices, &b);
        let v: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["response"]["allowed"], true);
        assert!(
            v["response"]["warnings"][0]
                .as_str()
                .unwrap()
                .contains("/spec/containers"),
            "{v}"
        );
        assert_eq!(reply.result, ReviewResult::Unparseable);
    }
}
