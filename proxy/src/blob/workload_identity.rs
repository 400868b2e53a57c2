//! Azure Workload Identity: the proxy's projected service account token (audience
//! `api://AzureADTokenExchange`, rotated by the kubelet) is the client assertion of an
//! OAuth client-credentials request to Entra ID, which answers with a storage token. The
//! file is read again for every request, so a rotated token is always the one sent.

use std::path::PathBuf;
use std::time::Duration;

use super::token::{FetchError, Fetched, STORAGE_SCOPE, TokenKey, http_client, read_answer};
use crate::config::WorkloadIdentityConfig;

/// Entra's public-cloud authority, when neither the config nor `AZURE_AUTHORITY_HOST` says.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com/";
/// What the assertion is, in the form field `client_assertion_type`.
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A configured exchange.
#[derive(Debug)]
pub struct WorkloadIdentity {
    /// Authority, tenant, client and scope.
    key: TokenKey,
    /// `{authority}{tenant}/oauth2/v2.0/token`.
    url: String,
    /// The federated token file.
    token_file: PathBuf,
    /// No proxy, no redirects, the upstream's extra CAs.
    client: reqwest::Client,
}

/// A setting that is neither configured nor in the environment, or is unusable:
/// the field (below `workloadIdentity.`) and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SettingError {
    /// `clientId`, `tenantId`, `tokenFile` or `authorityHost`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl WorkloadIdentity {
    /// Resolves the config against the environment (`lookup` is `std::env::var` outside
    /// tests) and builds the client.
    pub fn new(
        config: &WorkloadIdentityConfig,
        lookup: impl Fn(&str) -> Option<String>,
        ca_file: Option<&std::path::Path>,
        connect_timeout: Duration,
    ) -> Result<Self, SettingError> {
        let pick = |given: &Option<String>, field: &'static str, var: &str| {
            given
                .clone()
                .or_else(|| lookup(var))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| SettingError {
                    field,
                    message: format!("not set, and {var} is empty"),
                })
        };
        let client_id = pick(&config.client_id, "clientId", "AZURE_CLIENT_ID")?;
        let tenant = pick(&config.tenant_id, "tenantId", "AZURE_TENANT_ID")?;
        let token_file = match &config.token_file {
            Some(p) => p.clone(),
            None => PathBuf::from(pick(&None, "tokenFile", "AZURE_FEDERATED_TOKEN_FILE")?),
        };
        let authority = config
            .authority_host
            .clone()
            .or_else(|| lookup("AZURE_AUTHORITY_HOST").filter(|v| !v.trim().is_empty()))
            .unwrap_or_else(|| DEFAULT_AUTHORITY.to_owned());
        let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
        if !tenant.chars().all(plain) {
            return Err(SettingError {
                field: "tenantId",
                message: format!("{tenant:?} is not a tenant ID or domain"),
            });
        }
        if !client_id.chars().all(plain) {
            return Err(SettingError {
                field: "clientId",
                message: format!("{client_id:?} is not a client ID"),
            });
        }
        let uri: http::Uri = authority.parse().map_err(|_| SettingError {
            field: "authorityHost",
            message: format!("{authority:?} is not a URL"),
        })?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() || uri.query().is_some() {
            return Err(SettingError {
                field: "authorityHost",
                message: format!("{authority:?} is not an https:// URL"),
            });
        }
        let base = authority.trim_end_matches('/');
        let url = format!("{base}/{tenant}/oauth2/v2.0/token");
        std::fs::metadata(&token_file).map_err(|e| SettingError {
            field: "tokenFile",
            message: format!("cannot read {}: {e}", token_file.display()),
        })?;
        let client = http_client(ca_file, connect_timeout).map_err(|message| SettingError {
            field: "authorityHost",
            message,
        })?;
        Ok(Self {
            key: TokenKey {
                authority: format!("{base}/"),
                tenant,
                client: client_id,
                scope: STORAGE_SCOPE.to_owned(),
            },
            url,
            token_file,
            client,
        })
    }

    /// The cache key.
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// One exchange, with the token file as it is now.
    pub async fn fetch(&self) -> Result<Fetched, FetchError> {
        let assertion =
            std::fs::read_to_string(&self.token_file).map_err(|source| FetchError::TokenFile {
                path: self.token_file.display().to_string(),
                source,
            })?;
        let form = [
            ("client_id", self.key.client.as_str()),
            ("grant_type", "client_credentials"),
            ("scope", self.key.scope.as_str()),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", assertion.trim()),
        ];
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let response = self
            .client
            .post(&self.url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|source| FetchError::Request {
                endpoint: self.url.clone(),
                source,
            })?;
        read_answer(&self.url, response).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn settings_come_from_the_file_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t").unwrap();
        let token_var = token.display().to_string();
        let aks = env(&[
            ("AZURE_CLIENT_ID", "env-client"),
            ("AZURE_TENANT_ID", "env-tenant"),
            ("AZURE_FEDERATED_TOKEN_FILE", &token_var),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/"),
        ]);
        let t = Duration::from_secs(1);
        let w = WorkloadIdentity::new(&WorkloadIdentityConfig::default(), &aks, None, t).unwrap();
        assert_eq!(w.key().client, "env-client");
        assert_eq!(w.key().tenant, "env-tenant");
        assert_eq!(w.key().authority, "https://login.microsoftonline.us/");
        assert_eq!(
            w.url,
            "https://login.microsoftonline.us/env-tenant/oauth2/v2.0/token"
        );
        assert_eq!(w.token_file, token);
        let given = WorkloadIdentityConfig {
            client_id: Some("file-client".into()),
            tenant_id: Some("contoso.onmicrosoft.com".into()),
            token_file: Some(token.clone()),
            authority_host: None,
        };
        let w = WorkloadIdentity::new(&given, env(&[]), None, t).unwrap();
        assert_eq!(w.key().client, "file-client");
        assert_eq!(
            w.url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(w.key().scope, STORAGE_SCOPE);

        let field = |c: &WorkloadIdentityConfig, vars: &[(&str, &str)]| {
            WorkloadIdentity::new(c, env(vars), None, t)
                .unwrap_err()
                .field
        };
        assert_eq!(field(&WorkloadIdentityConfig::default(), &[]), "clientId");
        assert_eq!(
            field(
                &WorkloadIdentityConfig::default(),
                &[("AZURE_CLIENT_ID", "c")]
            ),
            "tenantId"
        );
        let bad = |f: fn(&mut WorkloadIdentityConfig)| {
            let mut c = given.clone();
            f(&mut c);
            field(&c, &[])
        };
        assert_eq!(bad(|c| c.tenant_id = Some("../evil".into())), "tenantId");
        assert_eq!(bad(|c| c.client_id = Some("a b".into())), "clientId");
        assert_eq!(
            bad(|c| c.authority_host = Some("http://login.example".into())),
            "authorityHost"
        );
        assert_eq!(
            bad(|c| c.token_file = Some("/nonexistent/token".into())),
            "tokenFile"
        );
    }
}
