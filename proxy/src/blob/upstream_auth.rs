//! How the gateway proves itself to the real account, per virtual account: exactly one of
//! the real key (Shared Key), a bearer token of its own identity (workload identity or
//! managed identity, from [`super::token`]), or a SAS from a file. [`UpstreamAuth`] is the
//! configured mode; [`Credential`] is what one request carries, resolved before the
//! rewrite so the rewrite stays synchronous.

use std::sync::Arc;

use http::HeaderValue;
use http::header::AUTHORIZATION;
use http::request::Parts;

use super::sas_file::SasFile;
use super::shared_key::{AccountKey, AuthError, sign};
use super::token::{FetchError, TokenCache, TokenEntry, TokenSource};

/// The oldest service version that accepts bearer tokens (Authorize with Microsoft Entra
/// ID); a client's newer version is kept.
pub const MIN_BEARER_VERSION: &str = "2017-11-09";

/// An account's configured upstream auth.
#[derive(Debug)]
pub enum UpstreamAuth {
    /// Signed with the real key.
    SharedKey(AccountKey),
    /// `Authorization: Bearer` from the token cache.
    Bearer(Arc<TokenSource>),
    /// A SAS appended to every request.
    Sas(SasFile),
}

/// The credential one upstream request carries.
#[derive(Clone)]
pub enum Credential {
    /// Sign with this key.
    SharedKey(AccountKey),
    /// Send this token.
    Bearer(Arc<str>),
    /// Append this SAS (without `?`).
    Sas(Arc<str>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, token or signature.
        f.write_str(match self {
            Self::SharedKey(_) => "Credential::SharedKey",
            Self::Bearer(_) => "Credential::Bearer",
            Self::Sas(_) => "Credential::Sas",
        })
    }
}

impl UpstreamAuth {
    /// The credential for the next request; a bearer upstream may wait for a fetch.
    pub async fn credential(&self, tokens: &TokenCache) -> Result<Credential, FetchError> {
        Ok(match self {
            Self::SharedKey(key) => Credential::SharedKey(key.clone()),
            Self::Bearer(source) => Credential::Bearer(tokens.entry(source).token().await?),
            Self::Sas(file) => Credential::Sas(file.current()),
        })
    }

    /// The token cache entry of a bearer upstream (for the 401 retry).
    pub fn token_entry(&self, tokens: &TokenCache) -> Option<Arc<TokenEntry>> {
        match self {
            Self::Bearer(source) => Some(tokens.entry(source)),
            _ => None,
        }
    }
}

impl Credential {
    /// `target` (path and query) with the SAS appended in SAS mode.
    pub fn with_sas(&self, target: String) -> String {
        match self {
            Self::Sas(sas) => {
                let sep = if target.contains('?') { '&' } else { '?' };
                format!("{target}{sep}{sas}")
            }
            _ => target,
        }
    }

    /// Adds the credential's header to a request already rewritten (and, in SAS mode,
    /// already carrying the SAS). `outer`: the request itself, not a batch part, so it
    /// also gets a bearer-capable `x-ms-version`.
    pub fn authenticate(
        &self,
        parts: &mut Parts,
        account: &str,
        outer: bool,
    ) -> Result<(), AuthError> {
        match self {
            Self::SharedKey(key) => sign(parts, account, key),
            Self::Bearer(token) => {
                let mut value = HeaderValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| AuthError::Malformed("the token cannot appear in a header"))?;
                value.set_sensitive(true);
                parts.headers.insert(AUTHORIZATION, value);
                if outer {
                    ensure_bearer_version(parts);
                }
                Ok(())
            }
            Self::Sas(_) => Ok(()),
        }
    }
}

/// Sets `x-ms-version` to [`MIN_BEARER_VERSION`] unless the client sent a newer one
/// (versions are dates, so text order is time order).
fn ensure_bearer_version(parts: &mut Parts) {
    let newer = parts
        .headers
        .get("x-ms-version")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() == MIN_BEARER_VERSION.len() && v >= MIN_BEARER_VERSION);
    if !newer {
        parts
            .headers
            .insert("x-ms-version", HeaderValue::from_static(MIN_BEARER_VERSION));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parts(version: Option<&str>) -> Parts {
        let mut b = http::Request::builder().uri("/c/b");
        if let Some(v) = version {
            b = b.header("x-ms-version", v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn bearer_keeps_newer_versions_and_raises_older_ones() {
        let c = Credential::Bearer("abc".into());
        for (sent, expected) in [
            (None, "2017-11-09"),
            (Some("2015-02-21"), "2017-11-09"),
            (Some("2017-11-09"), "2017-11-09"),
            (Some("2021-08-06"), "2021-08-06"),
            (Some("garbage"), "2017-11-09"),
        ] {
            let mut p = parts(sent);
            c.authenticate(&mut p, "a", true).unwrap();
            assert_eq!(p.headers["x-ms-version"], expected, "{sent:?}");
            assert_eq!(p.headers["authorization"], "Bearer abc");
            assert!(p.headers["authorization"].is_sensitive());
        }
        let mut part = parts(None);
        c.authenticate(&mut part, "a", false).unwrap();
        assert!(!part.headers.contains_key("x-ms-version"));
        assert!(format!("{c:?}").find("abc").is_none());
    }

    #[test]
    fn sas_is_appended_after_the_query() {
        let c = Credential::Sas("sv=1&sig=x".into());
        assert_eq!(c.with_sas("/c/b".into()), "/c/b?sv=1&sig=x");
        assert_eq!(
            c.with_sas("/c?restype=container".into()),
            "/c?restype=container&sv=1&sig=x"
        );
        assert_eq!(
            Credential::Bearer("t".into()).with_sas("/c/b".into()),
            "/c/b"
        );
    }
}
