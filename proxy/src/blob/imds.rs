//! Managed identity through the instance metadata service (IMDS): a plain HTTP GET to the
//! link-local `169.254.169.254` with `Metadata: true`. On AKS every pod that can reach it
//! gets the **node's** identity, so workload identity is the mode to prefer there. The
//! proxy's tunnels refuse 169.254.0.0/16; this client reaches exactly this one endpoint.

use std::time::Duration;

use super::token::{FetchError, Fetched, TokenKey, http_client, read_answer};
use crate::config::ManagedIdentityConfig;

/// The metadata service.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// The token API version every SDK uses for IMDS.
const API_VERSION: &str = "2018-02-01";
/// IMDS takes a resource, not a scope.
const STORAGE_RESOURCE: &str = "https://storage.azure.com/";

/// A configured IMDS token source.
#[derive(Debug)]
pub struct Imds {
    /// Endpoint, client, resource.
    key: TokenKey,
    /// The full token URL.
    url: String,
    /// No proxy, no redirects.
    client: reqwest::Client,
}

impl Imds {
    /// From the config; the error is a message about `endpoint` or `clientId`.
    pub fn new(
        config: &ManagedIdentityConfig,
        connect_timeout: Duration,
    ) -> Result<Self, (&'static str, String)> {
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|_| ("endpoint", format!("{endpoint:?} is not a URL")))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() || uri.query().is_some() {
            return Err(("endpoint", format!("{endpoint:?} is not an http:// URL")));
        }
        let client_id = config.client_id.clone().unwrap_or_default();
        if !client_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(("clientId", format!("{client_id:?} is not a client ID")));
        }
        let base = endpoint.trim_end_matches('/');
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("api-version", API_VERSION);
        query.append_pair("resource", STORAGE_RESOURCE);
        if !client_id.is_empty() {
            query.append_pair("client_id", &client_id);
        }
        let url = format!("{base}/metadata/identity/oauth2/token?{}", query.finish());
        let client = http_client(None, connect_timeout).map_err(|m| ("endpoint", m))?;
        Ok(Self {
            key: TokenKey {
                authority: format!("{base}/"),
                tenant: String::new(),
                client: client_id,
                scope: STORAGE_RESOURCE.to_owned(),
            },
            url,
            client,
        })
    }

    /// The cache key.
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// One token request.
    pub async fn fetch(&self) -> Result<Fetched, FetchError> {
        let response = self
            .client
            .get(&self.url)
            .header("Metadata", "true")
            .send()
            .await
            .map_err(|source| FetchError::Request {
                endpoint: self.url.clone(),
                source,
            })?;
        read_answer(&self.url, response).await
    }
}
