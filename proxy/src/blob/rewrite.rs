//! Turning a verified client request into the request the real account receives: the path
//! loses the virtual account and gains the upstream's (for path-style endpoints), the Host
//! becomes the upstream's, the client's `Authorization` and any SAS parameters are dropped,
//! and the request carries the account's own credential ([`Credential`]: signed with the
//! real key, a bearer token, or the upstream SAS). Headers and body are otherwise
//! untouched, so the body can stream through.

use http::header::{AUTHORIZATION, HOST, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};

use super::shared_key::AuthError;
use super::upstream_auth::Credential;

/// Query parameters that make up a SAS token (account, service and user delegation SAS,
/// and the response-header overrides a SAS may carry). A client's SAS is for the gateway,
/// never for the real account, and the upstream request is signed with the key instead.
const SAS_PARAMETERS: &[&str] = &[
    "sv", "ss", "srt", "sp", "se", "st", "spr", "sip", "si", "sr", "sig", "sdd", "ses", "skoid",
    "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid", "sduoid", "rscc", "rscd",
    "rsce", "rscl", "rsct",
];

/// The real account behind a virtual one: where it is and what it is called.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `https` (Azure) or `http` (a local emulator).
    scheme: Scheme,
    /// Host and port requests go to; also the Host header.
    authority: Authority,
    /// Path prefix of a path-style endpoint (`/realacct` for Azurite's
    /// `http://host:10000/realacct`); empty for `https://realacct.blob.core.windows.net`.
    base_path: String,
    /// The real account name, which the signature names.
    account: String,
}

/// Why an upstream endpoint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not an absolute `http(s)://host[:port][/path]` URL.
    #[error("endpoint {0:?} is not an http:// or https:// URL with a host")]
    NotAnEndpoint(String),
    /// A query or a trailing slash would be glued onto every request path.
    #[error("endpoint {0:?} must not have a query or end with a slash")]
    Trailing(String),
}

impl Upstream {
    /// An upstream at `endpoint` (`https://realacct.blob.core.windows.net`, or a path-style
    /// `http://127.0.0.1:10000/realacct`) for `account`.
    pub fn new(endpoint: &str, account: &str) -> Result<Self, EndpointError> {
        let bad = || EndpointError::NotAnEndpoint(endpoint.to_owned());
        let uri: Uri = endpoint.parse().map_err(|_| bad())?;
        let scheme = uri.scheme().cloned().ok_or_else(bad)?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(bad());
        }
        let authority = uri.authority().cloned().ok_or_else(bad)?;
        if authority.as_str().contains('@') {
            return Err(bad());
        }
        let path = uri.path();
        if uri.query().is_some() || (path.len() > 1 && path.ends_with('/')) {
            return Err(EndpointError::Trailing(endpoint.to_owned()));
        }
        Ok(Self {
            scheme,
            authority,
            base_path: path.trim_end_matches('/').to_owned(),
            account: account.to_owned(),
        })
    }

    /// Host and port to dial.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Whether the upstream leg is TLS.
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// The real account name.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The upstream path and query for a client's `/<virtual>/<rest>?<query>`: the
    /// virtual account replaced by the base path, SAS parameters removed, everything else
    /// byte for byte. `None` when the path is not under `/<virtual>/`.
    pub fn target(&self, path: &str, query: Option<&str>, virtual_account: &str) -> Option<String> {
        let rest = path
            .strip_prefix('/')?
            .strip_prefix(virtual_account)
            .filter(|r| r.starts_with('/'))?;
        let mut out = format!("{}{rest}", self.base_path);
        let kept: Vec<&str> = query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty() && !is_sas_parameter(pair))
            .collect();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
        Some(out)
    }

    /// Rewrites a verified client request for this upstream and authenticates it with
    /// `credential`.
    pub fn rewrite(
        &self,
        parts: &mut Parts,
        virtual_account: &str,
        credential: &Credential,
    ) -> Result<(), RewriteError> {
        let target = self
            .target(parts.uri.path(), parts.uri.query(), virtual_account)
            .ok_or(RewriteError::NotThisAccount)?;
        let target = credential.with_sas(target);
        let path_and_query =
            PathAndQuery::try_from(target).map_err(|_| RewriteError::NotThisAccount)?;
        parts.uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| RewriteError::NotThisAccount)?;
        let host = HeaderValue::from_str(self.authority.as_str())
            .map_err(|_| RewriteError::NotThisAccount)?;
        parts.headers.insert(HOST, host);
        parts.headers.remove(AUTHORIZATION);
        credential.authenticate(parts, &self.account, true)?;
        Ok(())
    }
}

impl Upstream {
    /// Rewrites a verified Blob Batch sub-request: like [`Upstream::rewrite`], but the
    /// target stays a path (sub-requests carry no scheme, host or Host header).
    pub fn rewrite_part(
        &self,
        parts: &mut Parts,
        virtual_account: &str,
        credential: &Credential,
    ) -> Result<(), RewriteError> {
        let target = self
            .target(parts.uri.path(), parts.uri.query(), virtual_account)
            .ok_or(RewriteError::NotThisAccount)?;
        let target = credential.with_sas(target);
        parts.uri = Uri::try_from(target).map_err(|_| RewriteError::NotThisAccount)?;
        parts.headers.remove(AUTHORIZATION);
        credential.authenticate(parts, &self.account, false)?;
        Ok(())
    }
}

/// Why a request could not be rewritten for its upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// The path is not under the virtual account (classification refuses these first).
    #[error("the path is not under the virtual account")]
    NotThisAccount,
    /// The request cannot be signed.
    #[error(transparent)]
    Sign(#[from] AuthError),
}

/// Whether a raw `name=value` query pair is a SAS parameter (name compared decoded and
/// without case).
fn is_sas_parameter(pair: &str) -> bool {
    let name = pair.split_once('=').map_or(pair, |(n, _)| n);
    let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    SAS_PARAMETERS.iter().any(|s| s.eq_ignore_ascii_case(&name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::blob::shared_key::AccountKey;

    const KEY: &str = "c3RvcmFnZWFjY291bnRrZXk=";

    fn upstream(endpoint: &str) -> Upstream {
        Upstream::new(endpoint, "realacct").unwrap()
    }

    #[test]
    fn endpoints() {
        let azure = upstream("https://realacct.blob.core.windows.net");
        assert!(azure.is_https());
        assert_eq!(azure.authority().as_str(), "realacct.blob.core.windows.net");
        assert_eq!(
            azure.target("/pg-prod/c/b", None, "pg-prod").unwrap(),
            "/c/b"
        );
        let azurite = upstream("http://127.0.0.1:10000/realacct");
        assert!(!azurite.is_https());
        assert_eq!(
            azurite
                .target("/pg-prod/c/b", Some("comp=block"), "pg-prod")
                .unwrap(),
            "/realacct/c/b?comp=block"
        );
        for bad in [
            "realacct.blob.core.windows.net",
            "ftp://a/b",
            "https://user@a.blob.core.windows.net",
            "/realacct",
        ] {
            assert!(
                matches!(
                    Upstream::new(bad, "a"),
                    Err(EndpointError::NotAnEndpoint(_))
                ),
                "{bad}"
            );
        }
        for bad in [
            "https://a.blob.core.windows.net/x/",
            "https://a.blob.core.windows.net?sv=1",
        ] {
            assert!(
                matches!(Upstream::new(bad, "a"), Err(EndpointError::Trailing(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn sas_parameters_are_dropped_and_the_rest_kept_verbatim() {
        let u = upstream("https://realacct.blob.core.windows.net");
        let q = "restype=container&SIG=abc%3D&comp=list&sv=2022-11-02&prefix=a%2Bb+c&sp=rl&se=2026-12-07&%73ig=x";
        assert_eq!(
            u.target("/pg-prod/c", Some(q), "pg-prod").unwrap(),
            "/c?restype=container&comp=list&prefix=a%2Bb+c"
        );
        assert_eq!(
            u.target("/pg-prod/c/b", Some("sig=x"), "pg-prod").unwrap(),
            "/c/b"
        );
        assert_eq!(
            u.target("/pg-prod/c/b", Some(""), "pg-prod").unwrap(),
            "/c/b"
        );
        assert_eq!(u.target("/other/c/b", None, "pg-prod"), None);
        assert_eq!(u.target("/pg-prodx/c/b", None, "pg-prod"), None);
        assert_eq!(u.target("/pg-prod", None, "pg-prod"), None);
    }

    #[test]
    fn rewrite_replaces_host_and_authorization() {
        let u = upstream("https://realacct.blob.core.windows.net");
        let (parts, ()) = http::Request::builder()
            .method("PUT")
            .uri("/pg-prod/pgbackups/wal?sig=x")
            .header("host", "egress-gate-blob.egress-gate.svc:10000")
            .header("authorization", "SharedKey pg-prod:AAAA")
            .header("x-ms-date", "Sun, 06 Dec 2026 17:19:43 GMT")
            .body(())
            .unwrap()
            .into_parts();
        let key = Credential::SharedKey(AccountKey::from_base64(KEY).unwrap());
        u.rewrite(&mut parts.clone(), "pg-prod", &key).unwrap();
        let mut signed = parts.clone();
        u.rewrite(&mut signed, "pg-prod", &key).unwrap();
        let mut bearer = parts.clone();
        u.rewrite(&mut bearer, "pg-prod", &Credential::Bearer("t0k".into()))
            .unwrap();
        assert_eq!(bearer.headers["authorization"], "Bearer t0k");
        assert_eq!(bearer.headers["x-ms-version"], "2017-11-09");
        let mut sas = parts.clone();
        u.rewrite(
            &mut sas,
            "pg-prod",
            &Credential::Sas("sv=2022-11-02&sig=up".into()),
        )
        .unwrap();
        assert!(!sas.headers.contains_key("authorization"));
        assert_eq!(
            sas.uri.to_string(),
            "https://realacct.blob.core.windows.net/pgbackups/wal?sv=2022-11-02&sig=up"
        );
        let parts = signed;
        assert_eq!(
            parts.uri.to_string(),
            "https://realacct.blob.core.windows.net/pgbackups/wal"
        );
        assert_eq!(parts.headers["host"], "realacct.blob.core.windows.net");
        let auth = parts.headers["authorization"].to_str().unwrap();
        assert!(auth.starts_with("SharedKey realacct:"), "{auth}");
        assert_eq!(parts.headers.get_all("authorization").iter().count(), 1);
    }
}
