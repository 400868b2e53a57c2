//! The webhook's configuration: one YAML file, every key optional, validated in one place.
//!
//! Each setting sits next to its default below. An invalid file is rejected with a message
//! that names the key (`serviceCIDRs[1]: ...`), so a bad ConfigMap is caught before it matters.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use egress_gate_certs::pki::is_dns_label;

use crate::engine::profile::{PeerTemplate, Profile};
use crate::engine::selector::{LabelSelector, validate_key};

/// Kubernetes' default cluster DNS domain; most clusters keep it.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// kubeadm's default Service CIDR, so the default NO_PROXY covers Services on such clusters.
pub const DEFAULT_SERVICE_CIDRS: [&str; 1] = ["10.96.0.0/12"];
/// The Pod CIDR of kubeadm clusters using Flannel's default, the commonest starting point.
pub const DEFAULT_POD_CIDRS: [&str; 1] = ["10.244.0.0/16"];
/// The Service in front of the bundled proxy, as `deploy/` installs it.
pub const DEFAULT_PROXY_SERVICE: &str = "egress-proxy";
/// The namespace `deploy/` installs egress-gate into.
pub const DEFAULT_PROXY_NAMESPACE: &str = "egress-gate";
/// The port the bundled proxy listens on (Squid's conventional port, what admins expect).
pub const DEFAULT_PROXY_PORT: u16 = 3128;
/// The label the pod -> proxy network policy selects.
pub const DEFAULT_CLIENT_LABEL: &str = "egress-gate.io/client";
/// The annotation with which a pod opts in (`"true"`) or out (`"false"`).
pub const DEFAULT_INJECT_ANNOTATION: &str = "egress-gate.io/inject";
/// The annotation where the webhook records what it injected, for audits and idempotence.
pub const DEFAULT_STATUS_ANNOTATION: &str = "egress-gate.io/status";

/// The validated configuration the engine runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// The proxy URL written to `HTTPS_PROXY`/`https_proxy` (and `HTTP_PROXY` when enabled).
    pub proxy_url: String,
    /// `proxy_url` is the built-in default (the file names none), which points at the
    /// bundled proxy in egress-gate's namespace: [`Config::in_namespace`] may move it.
    pub proxy_url_defaulted: bool,
    /// The cluster DNS domain, for the `.svc.<domain>` and `.<domain>` NO_PROXY suffixes.
    pub cluster_domain: String,
    /// Service CIDRs: Services are reached directly, never through the proxy.
    pub service_cidrs: Vec<IpNet>,
    /// Pod CIDRs: pod-to-pod traffic (replication, metrics) stays direct.
    pub pod_cidrs: Vec<IpNet>,
    /// `service_cidrs` is the built-in guess (the file names none): ranges discovery finds
    /// replace it instead of joining it, so an AKS cluster's NO_PROXY does not carry
    /// kubeadm's range.
    pub service_cidrs_defaulted: bool,
    /// The same for `pod_cidrs`.
    pub pod_cidrs_defaulted: bool,
    /// API server names and IPs beyond the in-cluster ones (for example an AKS
    /// `*.azmk8s.io` name); client-go must never send API calls to the proxy.
    pub api_server: Vec<String>,
    /// The admin's extra NO_PROXY entries, appended last.
    pub no_proxy: Vec<String>,
    /// Profiles in order; the first that selects a pod names it in the status annotation.
    pub profiles: Vec<Profile>,
    /// Also set `HTTP_PROXY`/`http_proxy`. Off by default: the bundled proxy only tunnels.
    pub inject_http_proxy: bool,
    /// Label set on injected pods; the pod -> proxy network policy selects it.
    pub client_label: String,
    /// Annotation for per-pod opt-in and opt-out.
    pub inject_annotation: String,
    /// Annotation recording what was injected.
    pub status_annotation: String,
    /// Watch the cluster (Services, ServiceCIDRs, Nodes, the `kubernetes` Service) and add
    /// what it finds to NO_PROXY. Off by default so the webhook runs without API access.
    pub discovery: bool,
}

/// Why a configuration was rejected. Every variant names the file (or `config` for text
/// without one); a key the file holds comes with its line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown key or a value of the wrong type.
    #[error("{}: {}", at(origin, *line), key_message(key, message))]
    Syntax {
        /// The file, or `config` for text from elsewhere.
        origin: String,
        /// Where the parser stopped (1-based), when it says.
        line: Option<usize>,
        /// The key path the parser was in (`profiles[0].selector`), empty at the top.
        key: String,
        /// What the parser said, without its own position suffix.
        message: String,
    },
    /// A key has a value that parses but is not acceptable.
    #[error("{}: {key}: {message}", at(origin, *line))]
    Invalid {
        /// The file, or `config` for text from elsewhere.
        origin: String,
        /// The line of the key in the file (1-based), when the file has it.
        line: Option<usize>,
        /// The key, with list indexes (`profiles[0].selector`).
        key: String,
        /// What is wrong and, where it helps, what to write instead.
        message: String,
    },
}

impl ConfigError {
    /// The key at fault, for messages and tests (`None` for an unreadable file).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
        }
    }

    /// The line of the key or of the syntax error, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => *line,
        }
    }
}

/// `file:line` (or just `file`) in the form compilers and editors use.
fn at(origin: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{origin}:{line}"),
        None => origin.to_string(),
    }
}

/// `key: message`, or the message alone for the document itself.
fn key_message(key: &str, message: &str) -> String {
    if key.is_empty() {
        message.to_string()
    } else {
        format!("{key}: {message}")
    }
}

/// What [`Config::from_yaml`] calls text that came from no file.
const NO_FILE: &str = "config";

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: NO_FILE.to_string(),
        line: None,
        key: key.into(),
        message: message.into(),
    }
}

/// The file as written; every key optional. Unknown keys are errors so typos are caught.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigFile {
    #[serde(rename = "proxyURL")]
    proxy_url: Option<String>,
    cluster_domain: Option<String>,
    #[serde(rename = "serviceCIDRs")]
    service_cidrs: Option<Vec<String>>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Option<Vec<String>>,
    api_server: Option<Vec<String>>,
    no_proxy: Option<Vec<String>>,
    profiles: Option<Vec<ProfileFile>>,
    #[serde(rename = "injectHTTPProxy")]
    inject_http_proxy: Option<bool>,
    client_label: Option<String>,
    inject_annotation: Option<String>,
    status_annotation: Option<String>,
    discovery: Option<bool>,
}

/// A profile as written. With only a `name` that is built in, it stands for the built-in.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProfileFile {
    name: String,
    selector: Option<LabelSelector>,
    selectors: Option<Vec<LabelSelector>>,
    peer_services: Option<Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        // The defaults are valid by construction; validating them keeps one code path.
        match Config::from_file(ConfigFile::default()) {
            Ok(config) => config,
            Err(e) => unreachable!("built-in defaults are invalid: {e}"),
        }
    }
}

impl Config {
    /// The configuration for a webhook running in `namespace`: a default `proxyURL` names
    /// the bundled proxy's Service in that namespace, which is where `deploy/` puts both.
    /// A `proxyURL` the file gives is left alone.
    pub fn in_namespace(mut self, namespace: &str) -> Result<Self, ConfigError> {
        // A namespace name is one lower-case DNS label (RFC 1123).
        if !is_dns_label(namespace) {
            return Err(invalid(
                "namespace",
                format!("{namespace:?} (--namespace or POD_NAMESPACE) is not a namespace name"),
            ));
        }
        if self.proxy_url_defaulted {
            self.proxy_url = bundled_proxy_url(namespace, &self.cluster_domain);
        }
        Ok(self)
    }

    /// Reads and validates the file at `path`; errors name the file and the line.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; an empty document gives the defaults.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, NO_FILE)
    }

    /// Parses and validates YAML text; `origin` (a file name) and the line of the key at
    /// fault are in every error.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let file: Option<ConfigFile> =
            serde_path_to_error::deserialize(deserializer).map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                let line = inner.location().map(|l| l.line());
                let mut message = inner.to_string();
                if let Some(cut) = message.find(" at line ") {
                    message.truncate(cut);
                }
                // serde_yaml_ng starts some messages with the path already.
                if let Some(rest) = message.strip_prefix(&format!("{key}: ")) {
                    message = rest.to_string();
                }
                ConfigError::Syntax {
                    origin: origin.to_string(),
                    line,
                    key: if key == "." { String::new() } else { key },
                    message,
                }
            })?;
        Self::from_file(file.unwrap_or_default()).map_err(|e| match e {
            ConfigError::Invalid { key, message, .. } => ConfigError::Invalid {
                origin: origin.to_string(),
                line: yaml_location::line_of(text, &key),
                key,
                message,
            },
            other => other,
        })
    }

    fn from_file(file: ConfigFile) -> Result<Self, ConfigError> {
        let cluster_domain = match file.cluster_domain {
            Some(domain) => {
                let domain = domain.trim().trim_matches('.').to_ascii_lowercase();
                validate_dns_name(&domain).map_err(|m| invalid("clusterDomain", m))?;
                domain
            }
            None => DEFAULT_CLUSTER_DOMAIN.to_string(),
        };
        let proxy_url_defaulted = file.proxy_url.is_none();
        let proxy_url = match file.proxy_url {
            Some(url) => validate_proxy_url(&url).map_err(|m| invalid("proxyURL", m))?,
            None => bundled_proxy_url(DEFAULT_PROXY_NAMESPACE, &cluster_domain),
        };
        let service_cidrs_defaulted = file.service_cidrs.is_none();
        let pod_cidrs_defaulted = file.pod_cidrs.is_none();
        let service_cidrs =
            parse_cidrs("serviceCIDRs", file.service_cidrs, &DEFAULT_SERVICE_CIDRS)?;
        let pod_cidrs = parse_cidrs("podCIDRs", file.pod_cidrs, &DEFAULT_POD_CIDRS)?;

        let api_server = file.api_server.unwrap_or_default();
        for (i, entry) in api_server.iter().enumerate() {
            validate_host(entry).map_err(|m| invalid(format!("apiServer[{i}]"), m))?;
        }
        let no_proxy = file.no_proxy.unwrap_or_default();
        for (i, entry) in no_proxy.iter().enumerate() {
            validate_no_proxy_entry(entry).map_err(|m| invalid(format!("noProxy[{i}]"), m))?;
        }

        let profiles = match file.profiles {
            Some(list) => resolve_profiles(list)?,
            None => Profile::BUILT_IN
                .iter()
                .filter_map(|name| Profile::built_in(name))
                .collect(),
        };

        let client_label = annotation_key("clientLabel", file.client_label, DEFAULT_CLIENT_LABEL)?;
        let inject_annotation = annotation_key(
            "injectAnnotation",
            file.inject_annotation,
            DEFAULT_INJECT_ANNOTATION,
        )?;
        let status_annotation = annotation_key(
            "statusAnnotation",
            file.status_annotation,
            DEFAULT_STATUS_ANNOTATION,
        )?;
        if inject_annotation == status_annotation {
            return Err(invalid(
                "statusAnnotation",
                "must differ from injectAnnotation",
            ));
        }

        Ok(Config {
            proxy_url,
            proxy_url_defaulted,
            cluster_domain,
            service_cidrs,
            pod_cidrs,
            service_cidrs_defaulted,
            pod_cidrs_defaulted,
            api_server,
            no_proxy,
            profiles,
            inject_http_proxy: file.inject_http_proxy.unwrap_or(false),
            client_label,
            inject_annotation,
            status_annotation,
            discovery: file.discovery.unwrap_or(false),
        })
    }
}

fn parse_cidrs(
    key: &str,
    given: Option<Vec<String>>,
    default: &[&str],
) -> Result<Vec<IpNet>, ConfigError> {
    let texts: Vec<String> = match given {
        Some(list) => list,
        None => default.iter().map(|s| s.to_string()).collect(),
    };
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            text.trim()
                .parse::<IpNet>()
                .map(|net| net.trunc())
                .map_err(|_| {
                    invalid(
                        format!("{key}[{i}]"),
                        format!(
                            "{text:?} is not a CIDR (write it like 10.96.0.0/12 or fd00::/108)"
                        ),
                    )
                })
        })
        .collect()
}

fn resolve_profiles(list: Vec<ProfileFile>) -> Result<Vec<Profile>, ConfigError> {
    let mut names = HashSet::new();
    let mut profiles = Vec::with_capacity(list.len());
    for (i, p) in list.into_iter().enumerate() {
        let at = |field: &str| format!("profiles[{i}].{field}");
        validate_dns_label(&p.name).map_err(|m| invalid(at("name"), m))?;
        if !names.insert(p.name.clone()) {
            return Err(invalid(
                at("name"),
                format!("profile {:?} is defined twice", p.name),
            ));
        }
        if p.selector.is_none() && p.selectors.is_none() && p.peer_services.is_none() {
            let profile = Profile::built_in(&p.name).ok_or_else(|| {
                invalid(
                    at("selector"),
                    format!(
                        "profile {:?} is not built in, so it needs a selector (built-in profiles: {})",
                        p.name,
                        Profile::BUILT_IN.join(", ")
                    ),
                )
            })?;
            profiles.push(profile);
            continue;
        }
        let mut selectors = Vec::new();
        if let Some(selector) = p.selector {
            selector
                .validate()
                .map_err(|(field, m)| invalid(at(&format!("selector.{field}")), m))?;
            selectors.push(selector);
        }
        for (j, selector) in p.selectors.into_iter().flatten().enumerate() {
            selector
                .validate()
                .map_err(|(field, m)| invalid(at(&format!("selectors[{j}].{field}")), m))?;
            selectors.push(selector);
        }
        if selectors.is_empty() {
            return Err(invalid(
                at("selector"),
                "a profile with peerServices also needs a selector (use {} to select every pod)",
            ));
        }
        let peer_services = p
            .peer_services
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(j, t)| {
                PeerTemplate::parse(t).map_err(|m| invalid(at(&format!("peerServices[{j}]")), m))
            })
            .collect::<Result<_, _>>()?;
        profiles.push(Profile {
            name: p.name,
            selectors,
            peer_services,
        });
    }
    Ok(profiles)
}

fn annotation_key(key: &str, given: Option<String>, default: &str) -> Result<String, ConfigError> {
    let value = given.unwrap_or_else(|| default.to_string());
    validate_key(&value).map_err(|m| invalid(key, m))?;
    Ok(value)
}

/// Longest DNS name.
const MAX_DNS_NAME: usize = 253;

fn validate_dns_label(label: &str) -> Result<(), String> {
    if is_dns_label(label) {
        Ok(())
    } else {
        Err(format!(
            "{label:?} is not a DNS label (1-63 lower-case letters, digits or '-')"
        ))
    }
}

/// A DNS name, compared case-insensitively as DNS does.
fn validate_dns_name(name: &str) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    if lower.is_empty() || lower.len() > MAX_DNS_NAME {
        return Err(format!("{name:?} is not a DNS name"));
    }
    match lower.split('.').find(|label| !is_dns_label(label)) {
        Some(label) => Err(format!("{name:?} is not a DNS name (bad part {label:?})")),
        None => Ok(()),
    }
}

/// A hostname or an IP address (no scheme, no port): what NO_PROXY can match.
fn validate_host(host: &str) -> Result<(), String> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if host.contains("://") || host.contains(':') || host.contains('/') {
        return Err(format!(
            "{host:?} must be a bare hostname or IP address, without scheme or port"
        ));
    }
    // apiServer entries go into NO_PROXY as they are.
    refuse_blob_domain(
        host,
        host.trim_end_matches('.').to_ascii_lowercase().as_str(),
    )?;
    validate_dns_name(host)
}

/// Domains whose names are Azure Blob endpoints. Putting any of them (or a parent domain) in
/// NO_PROXY would send backups around the proxy, where no network policy lets them out.
const BLOB_ENDPOINT_PROBE: &str = "account.blob.core.windows.net";

fn validate_no_proxy_entry(entry: &str) -> Result<(), String> {
    if entry.is_empty() || entry.contains(|c: char| c == ',' || c.is_whitespace()) {
        return Err(format!(
            "{entry:?} must be one non-empty entry without commas or spaces"
        ));
    }
    if entry == "*" {
        return Err("\"*\" would send nothing through the proxy".into());
    }
    if let Some(rest) = entry.strip_prefix("*.") {
        return Err(format!(
            "{entry:?}: write \".{rest}\" instead; Python's urllib and requests do not understand \"*.\""
        ));
    }
    if entry.parse::<IpNet>().is_ok() || entry.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    // Drop a `:port` suffix (Go accepts host:port entries) before comparing domains.
    let host = match entry.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => entry,
    };
    let domain = host
        .trim_start_matches('.')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    refuse_blob_domain(entry, &domain)?;
    validate_dns_name(&domain)
}

/// Fails when `domain` (lower-case, no leading or trailing dot) is a Blob endpoint or a
/// parent of one: as a NO_PROXY entry it would send backups around the proxy.
fn refuse_blob_domain(entry: &str, domain: &str) -> Result<(), String> {
    let covers_blob = BLOB_ENDPOINT_PROBE == domain
        || BLOB_ENDPOINT_PROBE.ends_with(&format!(".{domain}"))
        || domain.ends_with(".blob.core.windows.net");
    if covers_blob {
        return Err(format!(
            "{entry:?} would send Azure Blob traffic around the egress proxy"
        ));
    }
    Ok(())
}

/// The bundled proxy's Service URL, as `deploy/` names and exposes it.
fn bundled_proxy_url(namespace: &str, cluster_domain: &str) -> String {
    format!("http://{DEFAULT_PROXY_SERVICE}.{namespace}.svc.{cluster_domain}:{DEFAULT_PROXY_PORT}")
}

fn validate_proxy_url(text: &str) -> Result<String, String> {
    let text = text.trim();
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{text:?} must use http:// (or https:// for a TLS listener), not {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?} must have no path, query or fragment"));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(yaml: &str) -> String {
        Config::from_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        for text in ["", "# nothing\n", "{}"] {
            let c = Config::from_yaml(text).unwrap();
            assert_eq!(c, Config::default());
        }
        let c = Config::default();
        assert_eq!(
            c.proxy_url,
            "http://egress-proxy.egress-gate.svc.cluster.local:3128"
        );
        assert_eq!(c.cluster_domain, "cluster.local");
        assert_eq!(c.service_cidrs, ["10.96.0.0/12".parse::<IpNet>().unwrap()]);
        assert_eq!(c.pod_cidrs, ["10.244.0.0/16".parse::<IpNet>().unwrap()]);
        let names: Vec<_> = c.profiles.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["cnpg", "velero"]);
        assert!(!c.inject_http_proxy);
        assert_eq!(c.client_label, "egress-gate.io/client");
    }

    #[test]
    fn proxy_url_default_follows_cluster_domain() {
        let c = Config::from_yaml("clusterDomain: k8s.example.\n").unwrap();
        assert_eq!(c.cluster_domain, "k8s.example");
        assert_eq!(
            c.proxy_url,
            "http://egress-proxy.egress-gate.svc.k8s.example:3128"
        );
    }

    #[test]
    fn the_default_proxy_url_follows_the_webhooks_namespace_a_given_one_stays() {
        let c = Config::from_yaml("clusterDomain: k8s.example\n")
            .unwrap()
            .in_namespace("platform-egress")
            .unwrap();
        assert_eq!(
            c.proxy_url,
            "http://egress-proxy.platform-egress.svc.k8s.example:3128"
        );
        let given = "proxyURL: http://squid.corp.svc:3128\n";
        let c = Config::from_yaml(given)
            .unwrap()
            .in_namespace("platform-egress")
            .unwrap();
        assert_eq!(c.proxy_url, "http://squid.corp.svc:3128");
        for bad in ["", "Egress", "a.b", "-a", &"a".repeat(64)] {
            let e = Config::default().in_namespace(bad).unwrap_err().to_string();
            assert!(
                e.contains("namespace") && e.contains("POD_NAMESPACE"),
                "{e}"
            );
        }
    }

    #[test]
    fn full_file_parses() {
        let c = Config::from_yaml(
            r#"
proxyURL: http://envoy-egress.gateway.svc.cluster.local:3128
clusterDomain: cluster.local
serviceCIDRs: [10.0.0.0/16, "fd00:10::/108"]
podCIDRs: [10.244.0.0/16]
apiServer: [aks-abc.hcp.westeurope.azmk8s.io, 10.1.0.4]
noProxy: [.corp.example, 192.168.0.0/16]
injectHTTPProxy: true
profiles:
  - name: cnpg
  - name: reports
    selector:
      matchLabels: {app: reports}
      matchExpressions:
        - {key: tier, operator: NotIn, values: [test]}
    peerServices: ["{app}-db"]
"#,
        )
        .unwrap();
        assert_eq!(c.profiles.len(), 2);
        assert_eq!(c.profiles[0], Profile::built_in("cnpg").unwrap());
        assert_eq!(c.profiles[1].peer_services[0].source(), "{app}-db");
        assert!(c.inject_http_proxy);
        assert_eq!(c.service_cidrs.len(), 2);
    }

    #[test]
    fn errors_name_the_key() {
        assert!(
            err("proxyUrl: x\n").contains("proxyUrl"),
            "{}",
            err("proxyUrl: x\n")
        );
        assert!(err("serviceCIDRs: [10.96.0.0/12, 10.0.0.0/33]\n").contains("serviceCIDRs[1]"));
        assert!(err("podCIDRs: [nope]\n").contains("podCIDRs[0]"));
        assert!(err("proxyURL: egress-proxy:3128\n").contains("proxyURL"));
        assert!(err("proxyURL: socks5://p:1080\n").contains("proxyURL"));
        assert!(err("proxyURL: http://p:3128/path\n").contains("proxyURL"));
        assert!(err("noProxy: ['*.corp.example']\n").contains("noProxy[0]"));
        assert!(err("noProxy: [a, .core.windows.net]\n").contains("noProxy[1]"));
        assert!(err("noProxy: [acct.blob.core.windows.net]\n").contains("around the egress proxy"));
        let apiserver = err("apiServer: [Acct.Blob.Core.Windows.Net]\n");
        assert!(
            apiserver.contains("apiServer[0]") && apiserver.contains("around the egress proxy"),
            "{apiserver}"
        );
        assert!(err("apiServer: [https://api:6443]\n").contains("apiServer[0]"));
        assert!(err("clusterDomain: 'bad domain'\n").contains("clusterDomain"));
        assert!(err("profiles: [{name: mine}]\n").contains("profiles[0].selector"));
        assert!(err("profiles: [{name: cnpg}, {name: cnpg}]\n").contains("profiles[1].name"));
        let e =
            err("profiles: [{name: x, selector: {matchExpressions: [{key: a, operator: In}]}}]\n");
        assert!(
            e.contains("profiles[0].selector.matchExpressions[0].values"),
            "{e}"
        );
        let e = err("profiles: [{name: x, selector: {}, peerServices: ['{app']}]\n");
        assert!(e.contains("profiles[0].peerServices[0]"), "{e}");
        let e = err(
            "profiles: [{name: x, selector: {matchExpressions: [{key: a, operator: Maybe}]}}]\n",
        );
        assert!(e.contains("Maybe"), "{e}");
        assert!(err("clientLabel: 'not a key!'\n").contains("clientLabel"));
    }

    #[test]
    fn errors_name_the_file_and_the_line() {
        let text = "clusterDomain: cluster.local\nprofiles:\n  - name: cnpg\n  - name: mine\npodCIDRs: [10.0.0.0/8]\n";
        let e = Config::parse(text, "webhook.yaml").unwrap_err();
        assert_eq!(e.line(), Some(4), "{e}");
        assert!(
            e.to_string()
                .starts_with("webhook.yaml:4: profiles[1].selector: "),
            "{e}"
        );
        let e = Config::parse("clusterDomain: a\nproxyUrl: x\n", "w.yaml").unwrap_err();
        assert_eq!(e.line(), Some(2), "{e}");
        assert!(
            e.to_string().starts_with("w.yaml:2: ") && e.to_string().contains("proxyUrl"),
            "{e}"
        );
        let e = Config::parse(
            "profiles:\n  - name: x\n    selector: {matchLabels: 3}\n",
            "w.yaml",
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("profiles[0].selector.matchLabels"), "{e}");
        assert_eq!(e.to_string().matches("matchLabels").count(), 1, "{e}");
        assert_eq!(e.line(), Some(3), "{e}");
    }

    #[test]
    fn no_proxy_entries_other_clients_understand_pass() {
        for ok in [
            ".corp.example",
            "corp.example",
            "10.0.0.0/8",
            "10.1.2.3",
            "::1",
            "db:5432",
            "storage.example",
        ] {
            assert!(validate_no_proxy_entry(ok).is_ok(), "{ok}");
        }
    }
}
