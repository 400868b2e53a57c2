//! The proxy's configuration: one YAML file (camelCase keys), read and validated here and
//! nowhere else. Every setting sits next to its default; an invalid file is rejected with a
//! message that names the offending field, and the binary exits 64 (`EX_USAGE`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::blob::operation::Permission;
use crate::identity::{IdentityConfig, WorkloadSelector, config::validate_from};
use crate::per_source::PerSourceConfig;
use crate::policy::{AllowRule, DEFAULT_PORT, HostPattern, Policy, normalize_name};

/// Where the proxy listens by default. Loopback, so that running the binary without a config
/// never exposes a proxy to the network by accident; the Deployment sets `0.0.0.0:3128`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3128";
/// Admin port (`/healthz`, `/readyz`, `/metrics`), loopback for the same reason as above.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// The one destination family egress-gate exists for: Azure Blob Storage.
pub const DEFAULT_ALLOW_HOST: &str = "*.blob.core.windows.net";

/// Why 10,000: each tunnel holds two descriptors; 10,000 tunnels stay under the usual
/// container open-files limit (1 Mi hard, often 65,536 soft) with room for the rest.
const DEFAULT_MAX_TUNNELS: usize = 10_000;
/// A CONNECT head is one line plus a few headers (Host, User-Agent, Proxy-Authorization);
/// 16 KiB leaves room for long tokens and still bounds what a client can make us buffer.
const DEFAULT_MAX_HEAD_BYTES: usize = 16 * 1024;
/// A client that has not finished its head in 10 s is broken or hostile (slowloris).
const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Covers DNS resolution and the TCP handshake to the destination; a private endpoint in the
/// same VNet answers in milliseconds, so 10 s only expires for a black-holed address.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Closes tunnels on which neither side has sent a byte for an hour: long enough for a
/// pooled HTTP client between backups, short enough that leaked tunnels do not pile up.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Azure's load balancer silently drops flows idle for 4 minutes; probing every 60 s keeps
/// both legs alive and detects dead peers well before that.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);
/// Azure's load balancer idle limit: keepalive must be strictly below it.
const KEEPALIVE_CEILING: Duration = Duration::from_secs(240);
/// On SIGTERM open tunnels may finish for 10 minutes (a WAL segment upload or the tail of a
/// base backup); the pod's `terminationGracePeriodSeconds` must be at least this.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
/// splice(2) for bulk directions; see docs/performance.md for the measurement behind it.
const DEFAULT_SPLICE: bool = true;
/// Bounds on `maxHeadBytes`: below 1 KiB real clients break, above 1 MiB it is no limit.
const HEAD_BYTES_RANGE: (usize, usize) = (1024, 1024 * 1024);
/// A blob request on which no byte has moved for a minute is stuck, not slow: barman-cloud
/// and the Azure SDKs write their bodies continuously, and Azure answers within seconds of
/// the last byte. A minute still rides out a congested link or a long GC pause.
pub const DEFAULT_BLOB_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Gateway connections at once, both listeners together. A backup holds a handful (barman
/// uploads a few files in parallel), so 1,000 serves hundreds of clusters; each holds up to
/// two descriptors (client and upstream), which keeps the gateway's share of a 65,536
/// open-files limit small beside 10,000 tunnels.
const DEFAULT_BLOB_MAX_CONNECTIONS: usize = 1000;

/// Access-log and diagnostic output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for a log pipeline.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Plain-TCP CONNECT listener; pods reach it through the `egress-proxy` Service.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Admin HTTP listener, kept off the proxy port so probes and scrapes never compete with
    /// (or get mistaken for) tunnels.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Optional second listener speaking TLS, for clients that want the pod -> proxy leg
    /// encrypted too (an `https://` proxy URL). Off by default: the tunnelled bytes are TLS
    /// already and only the CONNECT line travels in clear.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Tunnels served at once; past it clients get 503 instead of the proxy running out of
    /// descriptors.
    #[serde(default = "default_max_tunnels")]
    pub max_tunnels: usize,
    /// Largest request head accepted (431 past it).
    #[serde(default = "default_max_head_bytes")]
    pub max_head_bytes: usize,
    /// Time allowed to receive the whole request head (408 past it).
    #[serde(default = "default_head_timeout")]
    pub head_timeout: HumanDuration,
    /// Time allowed to resolve and connect to the destination: past it, 502 while DNS has
    /// not answered, 504 while the connect has not finished.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// A tunnel on which neither direction moved a byte for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// TCP keepalive idle time and probe interval on both legs.
    #[serde(default = "default_keepalive")]
    pub keepalive: HumanDuration,
    /// How long open tunnels may continue after SIGTERM before they are cut.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
    /// Upper bound on a tunnel's life; none by default (base backups upload for hours).
    #[serde(default)]
    pub max_tunnel_duration: Option<HumanDuration>,
    /// Log output format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Relay bulk data with splice(2) (kernel to kernel, no copy through the proxy's memory)
    /// once a direction shows bulk traffic. Off: always copy through a buffer.
    #[serde(default = "default_splice")]
    pub splice: bool,
    /// Runtime worker threads; absent: one per CPU the process may use. Fewer threads mean
    /// fewer cross-thread wake-ups per tunnel (lower latency), more mean more parallel copying.
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// What may be reached. Nothing else can be: the proxy is never open.
    #[serde(default = "default_allow")]
    pub allow: Vec<AllowRule>,
    /// Ranges never dialled whatever the rules say: the cluster's pod and service CIDRs.
    #[serde(default, rename = "denyCIDRs")]
    pub deny_cidrs: Vec<IpNet>,
    /// Static name -> addresses overrides, used instead of DNS for these names: for clusters
    /// without the private DNS zone, and for tests. The addresses are still checked.
    #[serde(default)]
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// The blob gateway (docs/blob-gateway.md): off unless this section names a listener.
    #[serde(default)]
    pub blob: Option<BlobConfig>,
    /// Workload identity (which pod is calling). Absent: no Kubernetes client at all, and
    /// no rule may have `from:`.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    /// Limits per client address (fair share of the one door), always on.
    #[serde(default)]
    pub per_source: PerSourceConfig,
}

/// `blob:`: the gateway that signs Azure Blob requests for workloads holding no real key.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlobConfig {
    /// Plain HTTP listener; off unless set (the body of a Shared Key request is not signed,
    /// so production clients should use `tls`).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// HTTPS listener, with a certificate reloaded like the CONNECT TLS listener's.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The virtual accounts clients may call; each maps to one real account.
    pub accounts: Vec<BlobAccountConfig>,
    /// A request is aborted when no byte of its body or its answer has moved for this long
    /// (a client stalled mid-upload, an upstream stalled mid-download or not answering), so
    /// a stuck peer cannot hold a gateway and an upstream connection for ever.
    #[serde(default = "default_blob_body_idle_timeout")]
    pub body_idle_timeout: HumanDuration,
    /// Gateway connections served at once; past it new ones wait in the kernel's backlog
    /// until one closes. Bounds the gateway's descriptors apart from `maxTunnels`.
    #[serde(default = "default_blob_max_connections")]
    pub max_connections: usize,
}

/// One virtual account: what clients call `AccountName`, and what it may reach.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlobAccountConfig {
    /// The virtual account name, the first path segment of every request.
    pub name: String,
    /// File holding the workload's gateway-only key (base64), re-read on every reload so a
    /// rotated Secret takes effect without a restart.
    pub client_key_file: PathBuf,
    /// The only containers reachable through this account.
    pub containers: Vec<String>,
    /// Of `read`, `list`, `write`, `delete`; without `delete` a workload cannot destroy its
    /// own backups.
    pub permissions: Vec<Permission>,
    /// The real account behind it.
    pub upstream: BlobUpstreamConfig,
    /// Which workloads may use the account, as an allow rule's `from:` (identity as a second
    /// factor beside the client key); empty: any holder of the key.
    #[serde(default)]
    pub from: Vec<WorkloadSelector>,
}

/// The real storage account a virtual one is served from.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlobUpstreamConfig {
    /// `https://<account>.blob.core.windows.net`, or a path-style endpoint such as
    /// `https://127.0.0.1:10000/<account>` (Azurite). Dialled through the `allow` policy.
    pub endpoint: String,
    /// The real account name the requests are signed for.
    pub account: String,
    /// File holding the real account key (base64), re-read on every reload. This and the
    /// next three are the upstream auth modes: exactly one is set.
    #[serde(default)]
    pub shared_key_file: Option<PathBuf>,
    /// Azure Workload Identity: the proxy's own federated token exchanged for an Entra
    /// token; no secret held anywhere. Each field defaults to the variable AKS injects.
    #[serde(default)]
    pub workload_identity: Option<WorkloadIdentityConfig>,
    /// A managed identity from the instance metadata service (VMs; on AKS this is the
    /// node's identity, shared by every pod that can reach IMDS).
    #[serde(default)]
    pub managed_identity: Option<ManagedIdentityConfig>,
    /// File holding a container-scoped SAS (query string, with or without `?`),
    /// re-read when it changes.
    #[serde(default)]
    pub sas_file: Option<PathBuf>,
    /// Extra PEM CA certificates trusted for this upstream, besides the public roots (and
    /// for its token endpoint: a test authority, or a private one).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `workloadIdentity:`; absent fields come from the environment the AKS webhook injects.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadIdentityConfig {
    /// The Entra application (client) ID; default `AZURE_CLIENT_ID`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The Entra tenant ID; default `AZURE_TENANT_ID`.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// The projected service account token the kubelet rotates; default
    /// `AZURE_FEDERATED_TOKEN_FILE`. Re-read for every exchange.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The Entra authority; default `AZURE_AUTHORITY_HOST`, else
    /// `https://login.microsoftonline.com/`.
    #[serde(default)]
    pub authority_host: Option<String>,
}

/// `managedIdentity:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManagedIdentityConfig {
    /// A user-assigned identity's client ID; absent: the system-assigned identity.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The metadata service, `http://169.254.169.254` unless set. Only tests set it: a
    /// stand-in on loopback is the only IMDS a test may talk to.
    #[serde(default)]
    pub endpoint: Option<String>,
}

impl BlobUpstreamConfig {
    /// The upstream auth modes that are set, as written in YAML (valid: exactly one).
    pub fn auth_modes(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        if self.shared_key_file.is_some() {
            set.push("sharedKeyFile");
        }
        if self.workload_identity.is_some() {
            set.push("workloadIdentity");
        }
        if self.managed_identity.is_some() {
            set.push("managedIdentity");
        }
        if self.sas_file.is_some() {
            set.push("sasFile");
        }
        set
    }
}

/// A virtual account name: what Azure allows for account names plus `-`, so names like
/// `pg-prod` read well; it appears in paths and in the signature, so nothing else.
fn check_account_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1 to 63 characters of a-z, 0-9 and -"
        ))
    }
}

/// Azure's container naming rule: 3 to 63 characters of a-z, 0-9 and single `-`, starting
/// and ending with a letter or digit.
fn check_container_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let ok = (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a container name (3 to 63 of a-z, 0-9 and single -)"
        ))
    }
}

impl BlobConfig {
    /// Checks every constraint serde cannot express; fields are named from `blob.`.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_none() && self.tls.is_none() {
            return Err(invalid(
                "blob",
                "needs listen, tls or both: the gateway has no listener",
            ));
        }
        if self.accounts.is_empty() {
            return Err(invalid("blob.accounts", "must list at least one account"));
        }
        if self.body_idle_timeout.0.is_zero() {
            return Err(invalid("blob.bodyIdleTimeout", "must be greater than zero"));
        }
        if self.max_connections == 0 {
            return Err(invalid("blob.maxConnections", "must be at least 1"));
        }
        for (i, a) in self.accounts.iter().enumerate() {
            let at = |f: &str| format!("blob.accounts[{i}].{f}");
            check_account_name(&a.name).map_err(|m| invalid(at("name"), m))?;
            if self.accounts[..i].iter().any(|b| b.name == a.name) {
                return Err(invalid(at("name"), format!("{:?} is listed twice", a.name)));
            }
            if a.containers.is_empty() {
                return Err(invalid(
                    at("containers"),
                    "must list at least one container",
                ));
            }
            for (j, c) in a.containers.iter().enumerate() {
                check_container_name(c).map_err(|m| invalid(at(&format!("containers[{j}]")), m))?;
            }
            if a.permissions.is_empty() {
                return Err(invalid(
                    at("permissions"),
                    "must list at least one permission",
                ));
            }
            let up = &a.upstream;
            let uri: http::Uri = up.endpoint.parse().map_err(|_| {
                invalid(
                    at("upstream.endpoint"),
                    format!("{:?} is not a URL", up.endpoint),
                )
            })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(invalid(
                    at("upstream.endpoint"),
                    format!(
                        "{:?} is not an http:// or https:// URL with a host",
                        up.endpoint
                    ),
                ));
            }
            if uri.query().is_some() || (uri.path().len() > 1 && uri.path().ends_with('/')) {
                return Err(invalid(
                    at("upstream.endpoint"),
                    "must not have a query or end with a slash",
                ));
            }
            match up.auth_modes().as_slice() {
                [_] => {}
                [] => {
                    return Err(invalid(
                        at("upstream"),
                        "needs one of sharedKeyFile, workloadIdentity, managedIdentity, sasFile (`workloadIdentity: {}` takes every default)",
                    ));
                }
                many => {
                    return Err(invalid(
                        at("upstream"),
                        format!("{} are set: choose exactly one", many.join(" and ")),
                    ));
                }
            }
            let bearer = up.workload_identity.is_some() || up.managed_identity.is_some();
            if bearer && uri.scheme_str() != Some("https") {
                return Err(invalid(
                    at("upstream.endpoint"),
                    "workloadIdentity and managedIdentity need an https:// endpoint: a bearer token never goes over plain HTTP",
                ));
            }
            if up.account.is_empty()
                || !up
                    .account
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                return Err(invalid(
                    at("upstream.account"),
                    "an Azure account name: lower-case letters and digits",
                ));
            }
        }
        Ok(())
    }
}

/// The optional TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the TLS listener (the plain listener keeps running beside it).
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first. Re-read on reload (cert-manager rotates in place).
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

fn default_listen() -> SocketAddr {
    // The constant is a valid literal; the fallback only exists to avoid a panic path.
    DEFAULT_LISTEN
        .parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 3128)))
}
fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN
        .parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9090)))
}
fn default_max_tunnels() -> usize {
    DEFAULT_MAX_TUNNELS
}
fn default_max_head_bytes() -> usize {
    DEFAULT_MAX_HEAD_BYTES
}
fn default_head_timeout() -> HumanDuration {
    HumanDuration(DEFAULT_HEAD_TIMEOUT)
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(DEFAULT_CONNECT_TIMEOUT)
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(DEFAULT_IDLE_TIMEOUT)
}
fn default_keepalive() -> HumanDuration {
    HumanDuration(DEFAULT_KEEPALIVE)
}
fn default_drain_timeout() -> HumanDuration {
    HumanDuration(DEFAULT_DRAIN_TIMEOUT)
}
fn default_blob_body_idle_timeout() -> HumanDuration {
    HumanDuration(DEFAULT_BLOB_BODY_IDLE_TIMEOUT)
}
fn default_blob_max_connections() -> usize {
    DEFAULT_BLOB_MAX_CONNECTIONS
}
fn default_splice() -> bool {
    DEFAULT_SPLICE
}
fn default_allow() -> Vec<AllowRule> {
    vec![AllowRule {
        host: Some(DEFAULT_ALLOW_HOST.to_owned()),
        ports: vec![DEFAULT_PORT],
        cidrs: Vec::new(),
        only_cidrs: false,
        from: Vec::new(),
    }]
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            tls: None,
            max_tunnels: DEFAULT_MAX_TUNNELS,
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            head_timeout: default_head_timeout(),
            connect_timeout: default_connect_timeout(),
            idle_timeout: default_idle_timeout(),
            keepalive: default_keepalive(),
            drain_timeout: default_drain_timeout(),
            max_tunnel_duration: None,
            log_format: LogFormat::Text,
            worker_threads: None,
            splice: default_splice(),
            allow: default_allow(),
            deny_cidrs: Vec::new(),
            hosts: BTreeMap::new(),
            blob: None,
            identity: None,
            per_source: PerSourceConfig::default(),
        }
    }
}

/// A configuration that cannot be used, with the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not match the schema.
    #[error("config file {path}: {detail}")]
    Parse {
        /// The file.
        path: String,
        /// serde's message, prefixed with the path of the field it stopped at (for example
        /// `allow[0].ports`) unless the message already starts with it.
        detail: String,
    },
    /// A field has a value the proxy cannot use.
    #[error("{}field `{field}`: {message}", located(origin, *line))]
    Invalid {
        /// The file, empty when the value did not come from one.
        origin: String,
        /// The field's line in the file (1-based), when found.
        line: Option<usize>,
        /// Path of the field, e.g. `allow[1].host`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

/// `config file proxy.yaml:12: ` before a field, or `config ` without a file.
fn located(origin: &str, line: Option<usize>) -> String {
    match (origin, line) {
        ("", _) => "config ".to_string(),
        (origin, Some(line)) => format!("config file {origin}:{line}: "),
        (origin, None) => format!("config file {origin}: "),
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: String::new(),
        line: None,
        field: field.into(),
        message: message.into(),
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `origin` names it in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        // An empty file means "all defaults", which serde would otherwise reject.
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text)).map_err(
                |e| {
                    let field = e.path().to_string();
                    let message = e.into_inner().to_string();
                    ConfigError::Parse {
                        path: origin.to_owned(),
                        detail: if message.starts_with(&field) {
                            message
                        } else {
                            format!("field `{field}`: {message}")
                        },
                    }
                },
            )?
        };
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { field, message, .. } => ConfigError::Invalid {
                origin: origin.to_owned(),
                line: yaml_location::line_of(text, &field),
                field,
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// The access policy this file describes, compiled.
    pub fn policy(&self) -> Policy {
        Policy::new(&self.allow, &self.deny_cidrs, &self.hosts)
    }

    /// Checks every constraint serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_tunnels == 0 {
            return Err(invalid("maxTunnels", "must be at least 1"));
        }
        let (lo, hi) = HEAD_BYTES_RANGE;
        if !(lo..=hi).contains(&self.max_head_bytes) {
            return Err(invalid(
                "maxHeadBytes",
                format!("must be between {lo} and {hi}"),
            ));
        }
        for (name, d) in [
            ("headTimeout", self.head_timeout),
            ("connectTimeout", self.connect_timeout),
            ("idleTimeout", self.idle_timeout),
            ("keepalive", self.keepalive),
        ] {
            if d.0.is_zero() {
                return Err(invalid(name, "must be greater than zero"));
            }
        }
        if self.keepalive.0 >= KEEPALIVE_CEILING {
            return Err(invalid(
                "keepalive",
                "must be below 4m: Azure's load balancer drops flows idle for 4 minutes",
            ));
        }
        if self.worker_threads == Some(0) {
            return Err(invalid("workerThreads", "must be at least 1"));
        }
        if let Some(d) = self.max_tunnel_duration
            && d.0.is_zero()
        {
            return Err(invalid("maxTunnelDuration", "must be greater than zero"));
        }
        for (i, rule) in self.allow.iter().enumerate() {
            if let Some(host) = &rule.host {
                HostPattern::parse(host).map_err(|m| invalid(format!("allow[{i}].host"), m))?;
            } else if rule.cidrs.is_empty() {
                return Err(invalid(
                    format!("allow[{i}]"),
                    "a rule needs a host, or cidrs for IP-literal targets",
                ));
            }
            if rule.only_cidrs && rule.cidrs.is_empty() {
                return Err(invalid(
                    format!("allow[{i}].onlyCIDRs"),
                    "needs cidrs: with onlyCIDRs every address must lie inside the rule's cidrs, and it lists none",
                ));
            }
            if rule.ports.is_empty() {
                return Err(invalid(format!("allow[{i}].ports"), "must not be empty"));
            }
            if rule.ports.contains(&0) {
                return Err(invalid(format!("allow[{i}].ports"), "0 is not a port"));
            }
            validate_from(&rule.from, self.identity.as_ref())
                .map_err(|(field, m)| invalid(format!("allow[{i}].{field}"), m))?;
        }
        for (name, addrs) in &self.hosts {
            normalize_name(name).map_err(|m| invalid(format!("hosts.{name}"), m))?;
            if addrs.is_empty() {
                return Err(invalid(
                    format!("hosts.{name}"),
                    "needs at least one address",
                ));
            }
        }
        if let Some(blob) = &self.blob {
            blob.validate()?;
            for (i, a) in blob.accounts.iter().enumerate() {
                validate_from(&a.from, self.identity.as_ref())
                    .map_err(|(field, m)| invalid(format!("blob.accounts[{i}].{field}"), m))?;
            }
        }
        self.per_source
            .validate()
            .map_err(|(field, m)| invalid(format!("perSource.{field}"), m))?;
        if let Some(identity) = &self.identity {
            identity
                .validate()
                .map_err(|(field, m)| invalid(format!("identity.{field}"), m))?;
        }
        Ok(())
    }
}

/// A duration written as `500ms`, `10s`, `5m` or `1h` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (try 500ms, 10s, 5m, 1h)"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
        };
        Ok(Self(d))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(Self(Duration::from_secs(n))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(c.allow.len(), 1);
        assert_eq!(c.allow[0].host.as_deref(), Some(DEFAULT_ALLOW_HOST));
        assert_eq!(c.allow[0].ports, vec![443]);
        assert_eq!(c.idle_timeout.0, Duration::from_secs(3600));
        assert_eq!(c.keepalive.0, Duration::from_secs(60));
        assert_eq!(c.drain_timeout.0, Duration::from_secs(600));
        assert!(c.max_tunnel_duration.is_none());
    }

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
listen: 0.0.0.0:3128
adminListen: 0.0.0.0:9090
maxTunnels: 5
headTimeout: 500ms
connectTimeout: 2s
idleTimeout: 5m
keepalive: 30
drainTimeout: 1h
logFormat: json
allow:
  - host: "*.blob.core.windows.net"
    cidrs: [10.20.0.0/16]
  - cidrs: [10.30.0.0/24]
    ports: [443, 8443]
denyCIDRs: [10.244.0.0/16, 10.96.0.0/12]
hosts:
  acct.blob.core.windows.net: [10.20.0.4]
"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.max_tunnels, 5);
        assert_eq!(c.head_timeout.0, Duration::from_millis(500));
        assert_eq!(c.keepalive.0, Duration::from_secs(30));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.allow[1].ports, vec![443, 8443]);
        assert_eq!(c.deny_cidrs.len(), 2);
        assert!(!c.allow[0].only_cidrs);
        let c = Config::parse(
            "allow: [{host: a.blob.core.windows.net, cidrs: [10.20.0.0/24], onlyCIDRs: true}]",
            "t",
        )
        .unwrap();
        assert!(c.allow[0].only_cidrs);
    }

    fn err(text: &str) -> String {
        Config::parse(text, "t").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err("maxTunnel: 3").contains("maxTunnel"));
        assert!(err("maxTunnels: 0").contains("`maxTunnels`"));
        assert!(err("keepalive: 5m").contains("`keepalive`"));
        assert!(err("headTimeout: 0s").contains("`headTimeout`"));
        assert!(err("headTimeout: 3 fortnights").contains("headTimeout"));
        assert!(err("maxHeadBytes: 10").contains("`maxHeadBytes`"));
        assert!(err("allow: [{ports: [443]}]").contains("`allow[0]`"));
        assert!(err("allow: [{host: 'a b'}]").contains("`allow[0].host`"));
        assert!(err("allow: [{host: '*.x.com', ports: []}]").contains("`allow[0].ports`"));
        assert!(err("allow: [{host: 'x.com', port: [1]}]").contains("port"));
        assert!(err("hosts: {'bad name': [127.0.0.1]}").contains("hosts.bad name"));
        assert!(err("denyCIDRs: [10.0.0.0/33]").contains("denyCIDRs"));
        assert!(
            err("allow: [{host: x.com, onlyCIDRs: true}]")
                .contains("`allow[0].onlyCIDRs`: needs cidrs")
        );
        assert!(err("allow: [{host: x.com, onlyCidrs: true}]").contains("onlyCidrs"));
    }

    #[test]
    fn invalid_values_name_the_file_and_the_line() {
        let e = Config::parse(
            "listen: 0.0.0.0:3128\nallow:\n  - host: a.example\n  - host: 'b c'\n",
            "proxy.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("config file proxy.yaml:4: field `allow[1].host`: "),
            "{e}"
        );
        let e = Config::parse("maxTunnels: 0\n", "p.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config file p.yaml:1: field `maxTunnels`"),
            "{e}"
        );
    }

    const BLOB: &str = r#"
blob:
  listen: 127.0.0.1:10000
  tls: {listen: 127.0.0.1:10443, certFile: /c, keyFile: /k}
  accounts:
    - name: pg-prod
      clientKeyFile: /secrets/pg-prod/key
      containers: [pgbackups]
      permissions: [read, list, write]
      upstream:
        endpoint: https://realacct.blob.core.windows.net
        account: realacct
        sharedKeyFile: /secrets/realacct/key
"#;

    #[test]
    fn blob_section_parses() {
        let c = Config::parse(BLOB, "t").unwrap();
        let b = c.blob.unwrap();
        assert_eq!(b.listen.unwrap().port(), 10000);
        assert_eq!(b.tls.unwrap().listen.port(), 10443);
        let a = &b.accounts[0];
        assert_eq!(a.name, "pg-prod");
        assert_eq!(
            a.permissions,
            [Permission::Read, Permission::List, Permission::Write]
        );
        assert_eq!(a.upstream.account, "realacct");
        assert!(a.upstream.ca_file.is_none());
        assert_eq!(b.body_idle_timeout.0, Duration::from_secs(60));
        assert_eq!(b.max_connections, 1000);
        assert!(Config::parse("", "t").unwrap().blob.is_none());
    }

    #[test]
    fn blob_errors_name_the_field() {
        let e = |from: &str, to: &str| err(&BLOB.replace(from, to));
        assert!(
            e(
                "      permissions: [read, list, write]",
                "      permissions: [read, own]"
            )
            .contains("blob.accounts[0].permissions")
        );
        assert!(e("account: realacct", "acount: realacct").contains("acount"));
        let limit = |line: &str| e("  accounts:\n", &format!("  {line}\n  accounts:\n"));
        assert!(limit("bodyIdleTimeout: 0s").contains("`blob.bodyIdleTimeout`"));
        assert!(limit("bodyIdleTimeout: soon").contains("bodyIdleTimeout"));
        assert!(limit("maxConnections: 0").contains("`blob.maxConnections`"));
        assert!(e("name: pg-prod", "name: PG").contains("`blob.accounts[0].name`"));
        assert!(
            e("[pgbackups]", "[pgbackups, Bad_Name]").contains("`blob.accounts[0].containers[1]`")
        );
        assert!(e("[pgbackups]", "[]").contains("`blob.accounts[0].containers`"));
        assert!(e("[read, list, write]", "[]").contains("`blob.accounts[0].permissions`"));
        assert!(
            e("https://realacct.blob.core.windows.net", "ftp://x")
                .contains("`blob.accounts[0].upstream.endpoint`")
        );
        assert!(
            e("https://realacct.blob.core.windows.net", "https://h/acct/")
                .contains("`blob.accounts[0].upstream.endpoint`")
        );
        assert!(
            e("account: realacct", "account: Real-Acct")
                .contains("`blob.accounts[0].upstream.account`")
        );
        let no_listener = BLOB.replace("  listen: 127.0.0.1:10000\n", "").replace(
            "  tls: {listen: 127.0.0.1:10443, certFile: /c, keyFile: /k}\n",
            "",
        );
        assert!(err(&no_listener).contains("`blob`: needs listen, tls or both"));
        assert!(
            e("        sharedKeyFile: /secrets/realacct/key\n", "")
                .contains("`blob.accounts[0].upstream`: needs one of sharedKeyFile")
        );
        assert!(
            e(
                "        sharedKeyFile: /secrets/realacct/key\n",
                "        sharedKeyFile: /k\n        sasFile: /s\n"
            )
            .contains("`blob.accounts[0].upstream`: sharedKeyFile and sasFile are set")
        );
        assert!(
            e(
                "        sharedKeyFile: /secrets/realacct/key\n",
                "        workloadIdentity: {clientId: c, tenantIdd: t}\n"
            )
            .contains("tenantIdd")
        );
        let plain_bearer = BLOB
            .replace("https://realacct.blob", "http://realacct.blob")
            .replace(
                "sharedKeyFile: /secrets/realacct/key",
                "managedIdentity: {}",
            );
        assert!(
            err(&plain_bearer).contains("`blob.accounts[0].upstream.endpoint`: workloadIdentity and managedIdentity need an https:// endpoint")
        );
        for mode in [
            "workloadIdentity: {}",
            "managedIdentity: {clientId: abc}",
            "sasFile: /s",
        ] {
            let c = Config::parse(
                &BLOB.replace("sharedKeyFile: /secrets/realacct/key", mode),
                "t",
            )
            .unwrap();
            assert_eq!(
                c.blob.unwrap().accounts[0].upstream.auth_modes().len(),
                1,
                "{mode}"
            );
        }
        let e = Config::parse(
            &BLOB.replace("pg-prod\n", "pg-prod\n      clientKeyFile: /x\n"),
            "t",
        );
        assert!(e.unwrap_err().to_string().contains("clientKeyFile"));
        let second = "    - name: pg-prod\n      clientKeyFile: /k\n      containers: [pgbackups]\n      permissions: [read]\n      upstream: {endpoint: https://a.blob.core.windows.net, account: a, sharedKeyFile: /s}\n";
        let e = err(&format!("{BLOB}{second}"));
        assert!(
            e.contains("`blob.accounts[1].name`: \"pg-prod\" is listed twice"),
            "{e}"
        );
    }

    const IDENTITY: &str = r#"
identity:
  podSelector: egress-gate.io/client=true
  namespaces: [db-a, velero]
  unknownWait: 500ms
  unidentified: global
allow:
  - host: acct-a.blob.core.windows.net
    cidrs: [10.20.0.0/16]
    from:
      - namespaces: [db-a]
        podLabels: {cnpg.io/cluster: pg-a}
      - serviceAccounts: [velero/velero]
  - host: shared.blob.core.windows.net
"#;

    #[test]
    fn identity_section_and_from_parse() {
        let c = Config::parse(IDENTITY, "t").unwrap();
        let identity = c.identity.as_ref().unwrap();
        assert_eq!(identity.namespaces, vec!["db-a", "velero"]);
        assert_eq!(identity.unknown_wait.0, Duration::from_millis(500));
        assert_eq!(identity.unidentified, crate::identity::Unidentified::Global);
        assert_eq!(c.allow[0].from.len(), 2);
        assert_eq!(c.allow[0].from[1].service_accounts, vec!["velero/velero"]);
        assert!(c.allow[1].from.is_empty());
        let c = Config::parse("identity: {}", "t").unwrap();
        let identity = c.identity.unwrap();
        assert_eq!(identity.pod_selector, "egress-gate.io/client=true");
        assert_eq!(identity.unknown_wait.0, Duration::from_secs(2));
        assert_eq!(identity.unidentified, crate::identity::Unidentified::Deny);
        assert!(Config::parse("", "t").unwrap().identity.is_none());
    }

    #[test]
    fn rules_with_from_apply_only_to_the_workloads_they_select() {
        use crate::identity::SlimPod;
        use crate::identity::index::Phase;
        use crate::policy::Denial;
        let policy = Config::parse(IDENTITY, "t").unwrap().policy();
        let target = |h: &str| crate::policy::Target {
            host: crate::policy::Host::Name(h.to_owned()),
            port: 443,
        };
        let pod = |ns: &str, cluster: &str, sa: &str| SlimPod {
            uid: "u".into(),
            namespace: ns.into(),
            name: "p".into(),
            labels: [("cnpg.io/cluster".to_owned(), cluster.to_owned())]
                .into_iter()
                .collect(),
            service_account: sa.into(),
            ips: vec![],
            host_ips: vec![],
            phase: Phase::Running,
            terminating: false,
        };
        let acct_a = target("acct-a.blob.core.windows.net");
        let shared = target("shared.blob.core.windows.net");
        // Not identified: only the rule without from: applies.
        assert_eq!(
            policy.authorize(&acct_a).err(),
            Some(Denial::WorkloadNotAllowed)
        );
        assert_eq!(policy.authorize(&shared).unwrap().rules, vec![1]);
        // The first entry: namespace and label both.
        let pg_a = pod("db-a", "pg-a", "pg-a");
        assert_eq!(
            policy.authorize_for(&acct_a, Some(&pg_a)).unwrap().rules,
            vec![0]
        );
        let pg_b = pod("db-a", "pg-b", "pg-b");
        assert_eq!(
            policy.authorize_for(&acct_a, Some(&pg_b)).err(),
            Some(Denial::WorkloadNotAllowed)
        );
        assert!(policy.authorize_for(&shared, Some(&pg_b)).is_ok());
        // The second entry: the service account, in its namespace.
        let velero = pod("velero", "", "velero");
        assert!(policy.authorize_for(&acct_a, Some(&velero)).is_ok());
        let impostor = pod("db-b", "", "velero");
        assert!(policy.authorize_for(&acct_a, Some(&impostor)).is_err());
        assert_eq!(
            policy
                .authorize_for(&target("other.example"), Some(&pg_a))
                .err(),
            Some(Denial::HostNotAllowed)
        );
    }

    #[test]
    fn identity_errors_name_the_field() {
        assert!(err("identity: {podSelectr: a=b}").contains("podSelectr"));
        assert!(err("identity: {unidentified: allow}").contains("identity.unidentified"));
        assert!(err("identity: {unknownWait: 1m}").contains("`identity.unknownWait`"));
        assert!(err("identity: {podSelector: ''}").contains("`identity.podSelector`"));
        assert!(err("identity: {podSelector: 'a in (b)'}").contains("`identity.podSelector`"));
        assert!(err("identity: {namespaces: [Db]}").contains("`identity.namespaces[0]`"));
        assert!(
            err("allow: [{host: x.com, from: [{namespaces: [a]}]}]")
                .contains("`allow[0].from`: needs the identity: section")
        );
        assert!(
            err("identity: {}\nallow: [{host: x.com, from: [{}]}]").contains("`allow[0].from[0]`")
        );
        assert!(
            err("identity: {}\nallow: [{host: x.com, from: [{podLabels: {'a/': b}}]}]")
                .contains("`allow[0].from[0].podLabels.a/`")
        );
        assert!(
            err("identity: {}\nallow: [{host: x.com, from: [{namespace: [a]}]}]")
                .contains("namespace")
        );
        let e = Config::parse(
            "identity:\n  namespaces: [db-a]\nallow:\n  - host: x.com\n    from:\n      - serviceAccounts: [db-b/pg]\n",
            "p.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("config file p.yaml:6: field `allow[0].from[0].serviceAccounts[0]`"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        let p = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(p("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(p("7"), Ok(Duration::from_secs(7)));
        assert_eq!(p("2h"), Ok(Duration::from_secs(7200)));
        assert!(p("h").is_err());
        assert!(p("-1s").is_err());
        assert!(p("1d").is_err());
    }
}
