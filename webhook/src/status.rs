//! `egress-webhook status`: the drift detector's picture for a human, read once from a
//! cluster. Per opted-in namespace the pods selected, injected and missing (the same rule
//! as `serve --watch-pods`, through [`DriftTracker`]), and whether the API server can reach
//! a working webhook: its Service's ready endpoints, the serving certificate's expiry, and
//! the MutatingWebhookConfiguration's `caBundle` against that certificate.
//!
//! [`gather`] reads the cluster; [`Report`] is plain data that renders itself and says
//! whether anything needs an operator ([`Report::problems`]).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, ResourceExt};
use kube::runtime::watcher::Event;

use crate::admission::ServiceDirectory;
use crate::cluster::ClusterError;
use crate::drift::{self, Counts, DriftTracker, Missing, OPT_IN_LABEL, OPT_IN_VALUE};
use crate::engine::Injector;

/// A certificate that expires sooner than this is a problem: the alert in
/// deploy/monitoring fires at the same point.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 86_400);
/// Page size of the pod listing, so a large cluster is read in bounded responses.
const PAGE: u32 = 500;

/// What to read, beside the client.
#[derive(Clone, Debug)]
pub struct StatusOptions {
    /// The webhook's own namespace (never counted; holds its Secret).
    pub webhook_namespace: String,
    /// The MutatingWebhookConfiguration to check.
    pub webhook_config_name: String,
    /// The Secret holding the serving certificate (`tls.crt`).
    pub secret_name: String,
    /// Only this namespace, when given.
    pub namespace: Option<String>,
}

/// How the API server reaches the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// The configuration is not installed.
    NotInstalled,
    /// Service form: the Service and its ready endpoints.
    Service {
        /// `namespace/name` of the Service.
        service: String,
        /// Endpoints marked ready in its EndpointSlices.
        ready: usize,
    },
    /// URL form: nothing in the cluster to check.
    Url(String),
}

/// What the serving certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Certificate {
    /// The Secret or its `tls.crt` is absent or unreadable (cert-manager not done yet, or
    /// another Secret name): why.
    Unreadable(String),
    /// The certificate's end of validity, and whether the configuration's caBundle holds a
    /// CA that issued it (or the certificate itself).
    Read {
        /// End of validity.
        not_after: SystemTime,
        /// The caBundle verifies the certificate.
        bundle_matches: bool,
    },
}

/// Counts of one opted-in namespace, summed over profiles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceRow {
    /// The namespace.
    pub namespace: String,
    /// Its counts.
    pub counts: Counts,
}

/// Everything `status` found.
#[derive(Clone, Debug)]
pub struct Report {
    /// The configuration checked.
    pub webhook_config_name: String,
    /// How the API server reaches the webhook.
    pub reachability: Reachability,
    /// The serving certificate.
    pub certificate: Certificate,
    /// Opted-in namespaces, sorted.
    pub namespaces: Vec<NamespaceRow>,
    /// Every selected pod admitted without injection.
    pub missing: Vec<Missing>,
    /// When the report was made, for the expiry.
    pub now: SystemTime,
}

impl Report {
    /// What needs an operator, one sentence each; empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.reachability {
            Reachability::NotInstalled => out.push(format!(
                "MutatingWebhookConfiguration {} is not installed: no pod is injected",
                self.webhook_config_name
            )),
            Reachability::Service { service, ready: 0 } => out.push(format!(
                "Service {service} has no ready endpoint: the API server admits pods without injection (failurePolicy Ignore)"
            )),
            _ => {}
        }
        match &self.certificate {
            Certificate::Unreadable(why) => out.push(format!("serving certificate: {why}")),
            Certificate::Read {
                not_after,
                bundle_matches,
            } => {
                if *not_after <= self.now + EXPIRY_WARNING {
                    out.push(format!(
                        "serving certificate expires {}: renew it",
                        humantime::format_rfc3339_seconds(*not_after)
                    ));
                }
                if !bundle_matches {
                    out.push(format!(
                        "the caBundle of MutatingWebhookConfiguration {} does not verify the serving certificate: the API server's calls fail TLS",
                        self.webhook_config_name
                    ));
                }
            }
        }
        if !self.missing.is_empty() {
            out.push(format!(
                "{} selected pod(s) were admitted without injection: recreate them",
                self.missing.len()
            ));
        }
        out
    }

    /// The report as text for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let reach = match &self.reachability {
            Reachability::NotInstalled => "not installed".to_string(),
            Reachability::Service { service, ready } => {
                format!("Service {service}, {ready} ready endpoint(s)")
            }
            Reachability::Url(url) => format!("URL {url} (readiness not checked)"),
        };
        let _ = writeln!(
            out,
            "webhook:     MutatingWebhookConfiguration {}: {reach}",
            self.webhook_config_name
        );
        let cert = match &self.certificate {
            Certificate::Unreadable(why) => why.clone(),
            Certificate::Read {
                not_after,
                bundle_matches,
            } => {
                let left = not_after
                    .duration_since(self.now)
                    .map(|d| format!("in {} days", d.as_secs() / 86_400))
                    .unwrap_or_else(|_| "already expired".into());
                format!(
                    "expires {} ({left}); caBundle {}",
                    humantime::format_rfc3339_seconds(*not_after),
                    if *bundle_matches {
                        "matches"
                    } else {
                        "does NOT match"
                    }
                )
            }
        };
        let _ = writeln!(out, "certificate: {cert}");
        let width = self
            .namespaces
            .iter()
            .map(|r| r.namespace.len())
            .max()
            .unwrap_or(0)
            .max("NAMESPACE".len());
        let _ = writeln!(
            out,
            "\n{:width$}  SELECTED  INJECTED  STALE  MISSING",
            "NAMESPACE"
        );
        for row in &self.namespaces {
            let c = row.counts;
            let _ = writeln!(
                out,
                "{:width$}  {:>8}  {:>8}  {:>5}  {:>7}",
                row.namespace, c.selected, c.injected, c.stale, c.uninjected
            );
        }
        if self.namespaces.is_empty() {
            let _ = writeln!(out, "(no namespace labelled {OPT_IN_LABEL}={OPT_IN_VALUE})");
        }
        if !self.missing.is_empty() {
            let _ = writeln!(out, "\nadmitted without injection:");
            for m in &self.missing {
                let _ = writeln!(out, "  {}/{} (profile {})", m.namespace, m.name, m.profile);
            }
        }
        let problems = self.problems();
        if problems.is_empty() {
            let _ = writeln!(out, "\nok: every selected pod goes through egress-gate");
        } else {
            let _ = writeln!(out);
            for p in problems {
                let _ = writeln!(out, "problem: {p}");
            }
        }
        out
    }
}

fn api_error(what: String) -> impl FnOnce(kube::Error) -> ClusterError {
    move |source| ClusterError::Api { what, source }
}

/// Reads the cluster once and classifies every pod as `serve --watch-pods` does.
pub async fn gather(
    client: &kube::Client,
    injector: &Injector,
    services: &dyn ServiceDirectory,
    options: &StatusOptions,
) -> Result<Report, ClusterError> {
    let mut tracker = DriftTracker::new(&options.webhook_namespace);

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let opted_in = namespaces
        .list_metadata(&ListParams::default().labels(&format!("{OPT_IN_LABEL}={OPT_IN_VALUE}")))
        .await
        .map_err(api_error("listing namespaces".into()))?;
    tracker.namespace_event(Event::Init);
    for ns in opted_in.items {
        let name = ns.name_any();
        if options.namespace.as_ref().is_none_or(|only| *only == name) {
            tracker.namespace_event(Event::InitApply(name));
        }
    }
    tracker.namespace_event(Event::InitDone);

    let pods: Api<Pod> = match &options.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    tracker.pod_event(Event::Init);
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = pods
            .list_metadata(&params)
            .await
            .map_err(api_error("listing pods".into()))?;
        for pod in page.items {
            let ns = pod.namespace().unwrap_or_default();
            let found = drift::classify(
                injector,
                services,
                &ns,
                &pod.metadata.labels.unwrap_or_default(),
                &pod.metadata.annotations.unwrap_or_default(),
            );
            let name = pod.metadata.name.unwrap_or_default();
            tracker.pod_event(Event::InitApply(((ns, name), found)));
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    tracker.pod_event(Event::InitDone);

    let mut rows: Vec<NamespaceRow> = tracker
        .namespaces()
        .map(|ns| NamespaceRow {
            namespace: ns.to_string(),
            counts: Counts::default(),
        })
        .collect();
    for ((ns, _profile), c) in tracker.counts() {
        if let Some(row) = rows.iter_mut().find(|r| r.namespace == ns) {
            row.counts.selected += c.selected;
            row.counts.injected += c.injected;
            row.counts.stale += c.stale;
            row.counts.uninjected += c.uninjected;
        }
    }

    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = &options.webhook_config_name;
    let config = configs.get_opt(name).await.map_err(api_error(format!(
        "reading MutatingWebhookConfiguration {name}"
    )))?;
    let hook = config
        .and_then(|c| c.webhooks)
        .and_then(|w| w.into_iter().next());
    let reachability = match &hook {
        None => Reachability::NotInstalled,
        Some(hook) => match (&hook.client_config.service, &hook.client_config.url) {
            (Some(svc), _) => {
                let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &svc.namespace);
                let list = slices
                    .list(
                        &ListParams::default()
                            .labels(&format!("kubernetes.io/service-name={}", svc.name)),
                    )
                    .await
                    .map_err(api_error(format!(
                        "listing EndpointSlices of Service {}/{}",
                        svc.namespace, svc.name
                    )))?;
                let ready = list
                    .items
                    .iter()
                    .filter_map(|s| s.endpoints.as_ref())
                    .flatten()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                    .map(|e| e.addresses.len())
                    .sum();
                Reachability::Service {
                    service: format!("{}/{}", svc.namespace, svc.name),
                    ready,
                }
            }
            (None, Some(url)) => Reachability::Url(url.clone()),
            (None, None) => Reachability::NotInstalled,
        },
    };

    let bundle = hook
        .and_then(|h| h.client_config.ca_bundle)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default();
    let certificate = read_certificate(client, options, &bundle).await?;

    Ok(Report {
        webhook_config_name: name.clone(),
        reachability,
        certificate,
        namespaces: rows,
        missing: tracker.missing(),
        now: SystemTime::now(),
    })
}

/// The serving certificate from its Secret, checked against the caBundle (PEM text).
async fn read_certificate(
    client: &kube::Client,
    options: &StatusOptions,
    bundle: &str,
) -> Result<Certificate, ClusterError> {
    let (ns, name) = (&options.webhook_namespace, &options.secret_name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(api_error(format!("reading Secret {ns}/{name}")))?;
    let Some(pem) = secret
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove("tls.crt"))
    else {
        return Ok(Certificate::Unreadable(format!(
            "Secret {ns}/{name} with tls.crt not found (--secret-name)"
        )));
    };
    let pem = String::from_utf8_lossy(&pem.0).into_owned();
    let what = format!("Secret {ns}/{name} tls.crt");
    let leaf = match egress_gate_certs::pki::parse_certificates(&pem, &what) {
        Ok(certs) => certs.into_iter().next(),
        Err(e) => return Ok(Certificate::Unreadable(e.to_string())),
    };
    let Some(leaf) = leaf else {
        return Ok(Certificate::Unreadable(format!("{what}: no certificate")));
    };
    let info = match egress_gate_certs::CertInfo::from_der(&leaf) {
        Ok(i) => i,
        Err(e) => return Ok(Certificate::Unreadable(format!("{what}: {e}"))),
    };
    let cas = egress_gate_certs::pki::parse_certificates(bundle, "caBundle").unwrap_or_default();
    let bundle_matches = cas
        .iter()
        .any(|ca| ca.as_ref() == leaf.as_ref() || egress_gate_certs::pki::is_issued_by(&leaf, ca));
    Ok(Certificate::Read {
        not_after: info.not_after,
        bundle_matches,
    })
}
