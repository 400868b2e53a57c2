//! The `blob:` section compiled for serving: every key read from its file, every upstream
//! parsed and given its client. Built at start and on every reload (so a rotated Secret
//! takes effect without a restart); a key that cannot be read fails the start with exit 64,
//! or the reload, keeping the running settings.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::operation::Scope;
use super::rewrite::Upstream;
use super::shared_key::AccountKey;
use super::upstream::{Client, ClientSettings};
use crate::config::BlobConfig;
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
    /// The real account, with the real key.
    pub upstream: Upstream,
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
}

impl Accounts {
    /// Reads every key file and builds every upstream client.
    pub fn load(config: &BlobConfig, client: &ClientSettings) -> Result<Self, LoadError> {
        let mut by_name = HashMap::new();
        for (i, a) in config.accounts.iter().enumerate() {
            let field = |f: &str| format!("blob.accounts[{i}].{f}");
            let client_key = read_key(&a.client_key_file, &field("clientKeyFile"))?;
            let real_key = read_key(
                &a.upstream.shared_key_file,
                &field("upstream.sharedKeyFile"),
            )?;
            let upstream = Upstream::new(&a.upstream.endpoint, &a.upstream.account, real_key)
                .map_err(|e| LoadError {
                    field: field("upstream.endpoint"),
                    message: e.to_string(),
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
                client,
                from: a.from.clone(),
            };
            by_name.insert(a.name.clone(), Arc::new(account));
        }
        Ok(Self { by_name })
    }

    /// The account called `name`, if configured.
    pub fn get(&self, name: &str) -> Option<Arc<Account>> {
        self.by_name.get(name).cloned()
    }
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
