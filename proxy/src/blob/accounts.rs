//! The `blob:` section compiled for serving: every key read from its file, every upstream
//! parsed and given its client. Built at start and on every reload (so a rotated Secret
//! takes effect without a restart); a key that cannot be read fails the start with exit 64,
//! or the reload, keeping the running settings.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::imds::Imds;
use super::operation::Scope;
use super::rewrite::Upstream;
use super::sas_file::SasFile;
use super::shared_key::AccountKey;
use super::upstream::{Client, ClientSettings};
use super::upstream_auth::UpstreamAuth;
use super::workload_identity::WorkloadIdentity;
use crate::config::{BlobConfig, BlobUpstreamConfig};
use crate::identity::WorkloadSelector;

/// Why the `blob:` section could not be put into service; names the field.
#[derive(Debug, thiserror::Error)]
#[error("blob gateway: field `{field}`: {message}")]
pub struct LoadError {
    /// Path of the field, e.g. `blob.accounts[0].clientKeyFile`.
    field: String,
    /// What is wrong (the file and the reason; never the key).
    message: String,
}

/// One virtual account, ready to serve.
#[derive(Debug)]
pub struct Account {
    /// The key the workload signs with.
    pub client_key: AccountKey,
    /// Its containers and permissions.
    pub scope: Scope,
    /// The real account.
    pub upstream: Upstream,
    /// How requests to it are authenticated.
    pub auth: UpstreamAuth,
    /// Pooled connections to the real account, dialled through the policy.
    pub client: Client,
    /// `from:`: which workloads may use the account besides holding its key; empty: any.
    pub from: Vec<WorkloadSelector>,
}

/// Every virtual account by name.
#[derive(Debug)]
pub struct Accounts {
    /// Keyed by the virtual account name (the first path segment).
    by_name: HashMap<String, Arc<Account>>,
    /// `blob.bodyIdleTimeout`: reloadable, so it travels with the accounts.
    pub body_idle_timeout: Duration,
}

impl Accounts {
    /// Reads every key file and builds every upstream client.
    pub fn load(config: &BlobConfig, client: &ClientSettings) -> Result<Self, LoadError> {
        let mut by_name = HashMap::new();
        for (i, a) in config.accounts.iter().enumerate() {
            let field = |f: &str| format!("blob.accounts[{i}].{f}");
            let client_key = read_key(&a.client_key_file, &field("clientKeyFile"))?;
            let auth = upstream_auth(&a.upstream, client, &|f| field(&format!("upstream.{f}")))?;
            let upstream =
                Upstream::new(&a.upstream.endpoint, &a.upstream.account).map_err(|e| {
                    LoadError {
                        field: field("upstream.endpoint"),
                        message: e.to_string(),
                    }
                })?;
            let client = Client::new(client, &upstream, a.upstream.ca_file.as_deref()).map_err(
                |message| LoadError {
                    field: field("upstream.caFile"),
                    message,
                },
            )?;
            let scope = Scope {
                containers: a.containers.clone(),
                permissions: a.permissions.clone(),
            };
            let account = Account {
                client_key,
                scope,
                upstream,
                auth,
                client,
                from: a.from.clone(),
            };
            by_name.insert(a.name.clone(), Arc::new(account));
        }
        Ok(Self {
            by_name,
            body_idle_timeout: config.body_idle_timeout.0,
        })
    }

    /// The account called `name`, if configured.
    pub fn get(&self, name: &str) -> Option<Arc<Account>> {
        self.by_name.get(name).cloned()
    }
}

/// Builds the upstream auth mode (validation has made sure exactly one is set): reads the
/// key or SAS file, or resolves the identity against the environment.
fn upstream_auth(
    up: &BlobUpstreamConfig,
    client: &ClientSettings,
    field: &dyn Fn(&str) -> String,
) -> Result<UpstreamAuth, LoadError> {
    use super::token::TokenSource;
    if let Some(path) = &up.shared_key_file {
        return read_key(path, &field("sharedKeyFile")).map(UpstreamAuth::SharedKey);
    }
    if let Some(path) = &up.sas_file {
        return SasFile::open(path)
            .map(UpstreamAuth::Sas)
            .map_err(|e| LoadError {
                field: field("sasFile"),
                message: e.to_string(),
            });
    }
    if let Some(wi) = &up.workload_identity {
        let env = |var: &str| std::env::var(var).ok();
        let source = WorkloadIdentity::new(wi, env, up.ca_file.as_deref(), client.connect_timeout)
            .map_err(|e| LoadError {
                field: field(&format!("workloadIdentity.{}", e.field)),
                message: e.message,
            })?;
        return Ok(UpstreamAuth::Bearer(Arc::new(
            TokenSource::WorkloadIdentity(source),
        )));
    }
    if let Some(mi) = &up.managed_identity {
        let source = Imds::new(mi, client.connect_timeout).map_err(|(f, message)| LoadError {
            field: field(&format!("managedIdentity.{f}")),
            message,
        })?;
        return Ok(UpstreamAuth::Bearer(Arc::new(
            TokenSource::ManagedIdentity(source),
        )));
    }
    Err(LoadError {
        field: field("sharedKeyFile"),
        message: "no upstream auth mode is set".into(),
    })
}

/// Every file the `blob:` section reads and a change to which must reload it: the TLS
/// listener's certificate and key, and each account's key files and CA file. Derived from
/// the configuration being loaded, so accounts a reload adds are watched from then on.
pub fn watched_files(config: &BlobConfig) -> Vec<&Path> {
    let mut paths = Vec::new();
    if let Some(t) = &config.tls {
        paths.push(t.cert_file.as_path());
        paths.push(t.key_file.as_path());
    }
    for a in &config.accounts {
        paths.push(a.client_key_file.as_path());
        paths.extend(a.upstream.shared_key_file.as_deref());
        paths.extend(a.upstream.sas_file.as_deref());
        paths.extend(a.upstream.ca_file.as_deref());
    }
    paths
}

/// Reads a base64 key file (surrounding whitespace ignored, as `kubectl create secret`
/// and editors leave a newline).
fn read_key(path: &Path, field: &str) -> Result<AccountKey, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError {
        field: field.to_owned(),
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    AccountKey::from_base64(text.trim()).map_err(|e| LoadError {
        field: field.to_owned(),
        message: format!("{}: {e}", path.display()),
    })
}
