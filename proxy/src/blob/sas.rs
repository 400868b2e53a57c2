//! Service SAS from clients: a blob or container shared access signature (service version
//! 2020-12-06 and later) that the workload signed with its gateway-only client key, as
//! Velero's Azure plugin signs the download URLs behind `velero backup logs`. It works on
//! [`http::request::Parts`], like [`super::shared_key`].
//!
//! The string-to-sign is sixteen lines: `sp`, `st`, `se`, the canonicalized resource
//! (`/blob/<account>/<container>` for `sr=c`, `/blob/<account>/<container>/<blob>` for
//! `sr=b`, names decoded), `si`, `sip`, `spr`, `sv`, `sr`, the `snapshot` parameter, `ses`,
//! then the five response-header overrides `rscc`, `rscd`, `rsce`, `rscl`, `rsct`; values are
//! the decoded query values, absent ones empty, joined with `\n` and no newline at the end.
//!
//! A SAS is accepted only when its signature holds, the gateway's clock is inside its
//! `st`..`se` window (give or take [`MAX_CLOCK_SKEW`], as for Shared Key), the listener's
//! protocol is one `spr` allows, the client's address is inside `sip` when given, and `sp`
//! grants what the request does ([`Grant::permits`]). Account SAS (`ss`/`srt`) would widen
//! scope beyond one container and user delegation SAS (`skoid`...) is signed with an Entra ID
//! key the gateway does not have: both are refused, as are the fields whose meaning the
//! gateway would drop on the way upstream (stored policies, encryption scopes, response
//! header overrides).

use std::fmt;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::header::{AUTHORIZATION, HeaderValue};
use http::request::Parts;

use super::operation::{Operation, Request};
use super::shared_key::{AccountKey, MAX_CLOCK_SKEW, matches};

/// The oldest service version whose string-to-sign this module builds (the one that added
/// the encryption-scope line); older SAS are refused rather than checked against a layout
/// they were not signed with.
pub const MIN_VERSION: &str = "2020-12-06";
/// Query parameters that only an account SAS carries (signed services, resource types).
const ACCOUNT_SAS_PARAMETERS: [&str; 2] = ["ss", "srt"];
/// Query parameters that only a user delegation SAS carries: its key's identity and
/// validity, and the delegated identities.
const USER_DELEGATION_PARAMETERS: [&str; 11] = [
    "skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid", "sduoid", "skdutid",
];
/// Every parameter this module reads: a repeated one is refused, since one reader taking
/// the first value and another the last would disagree on what was signed.
const READ_PARAMETERS: [&str; 17] = [
    "sig", "sv", "sr", "sp", "st", "se", "si", "sip", "spr", "ses", "snapshot", "rscc", "rscd",
    "rsce", "rscl", "rsct", "sdd",
];
/// The permission letters a blob or container SAS may carry (Azure's "Create a service
/// SAS" table); any other letter makes the SAS malformed.
const KNOWN_PERMISSIONS: &str = "racwdxyltfmeopi";

/// The listener a request arrived on: what `spr` is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The plain HTTP listener: only a SAS that allows `http` is accepted here.
    Plain,
    /// The TLS listener.
    Tls,
}

/// What a service SAS is for (`sr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedResource {
    /// `sr=c`: every blob of one container, and listing it.
    Container,
    /// `sr=b`: one blob.
    Blob,
}

impl SignedResource {
    /// The `sr` value.
    pub fn code(self) -> &'static str {
        match self {
            Self::Container => "c",
            Self::Blob => "b",
        }
    }
}

/// Why a SAS was not accepted. Each variant is answered 403 with
/// [`SasError::error_code`]; [`SasError::reason`] names it in logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// `ss` or `srt`: an account SAS, which would reach beyond one container.
    #[error("account SAS (ss/srt) is not accepted; sign a service SAS (sr=c or sr=b)")]
    AccountSas,
    /// `skoid` and friends: signed with an Entra ID user delegation key, not the client key.
    #[error("user delegation SAS is not accepted; sign a service SAS with the client key")]
    UserDelegation,
    /// A parameter given twice.
    #[error("SAS parameter {0} is given more than once")]
    Repeated(&'static str),
    /// A required field missing, a value that does not parse, a path that is not UTF-8.
    #[error("malformed SAS: {0}")]
    Malformed(&'static str),
    /// `sv` older than [`MIN_VERSION`] (or not a date).
    #[error("SAS version {0:?} is not accepted; use {MIN_VERSION} or later")]
    Version(String),
    /// `sr` other than `b` or `c` (`bs`, `bv`, `d`...).
    #[error("signed resource sr={0:?} is not accepted; use sr=b or sr=c")]
    Resource(String),
    /// The signature does not match the request under the client key.
    #[error("the SAS signature does not match")]
    BadSignature,
    /// `st` is later than now, beyond the allowed skew.
    #[error("the SAS is not valid before {0}")]
    NotYetValid(String),
    /// `se` has passed, beyond the allowed skew.
    #[error("the SAS expired at {0}")]
    Expired(String),
    /// `spr=https` on the plain listener.
    #[error("the SAS allows https only; this listener is plain http")]
    Protocol,
    /// The client's address is outside `sip`.
    #[error("the client address {0} is outside the SAS's allowed addresses")]
    SourceIp(IpAddr),
    /// A signed field whose effect would be lost when the gateway strips the SAS.
    #[error("SAS field {0} is not supported by the gateway")]
    Unsupported(&'static str),
    /// The operation is not one a service SAS can authorize at the gateway.
    #[error("{0} cannot be authorized with a SAS; use Shared Key")]
    NotWithSas(&'static str),
    /// `sr=b` on a request that is not about that blob (listing, container calls).
    #[error("{0} needs a container SAS (sr=c)")]
    ResourceType(&'static str),
    /// `sp` lacks the permission the operation needs.
    #[error("{operation} needs SAS permission '{needed}', the SAS grants {granted:?}")]
    Permission {
        /// The operation's name.
        operation: &'static str,
        /// The letter it needs.
        needed: char,
        /// What `sp` says.
        granted: String,
    },
}

impl SasError {
    /// Short stable name for the access log and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::AccountSas => "account-sas",
            Self::UserDelegation => "user-delegation-sas",
            Self::Repeated(_) => "repeated-parameter",
            Self::Malformed(_) => "malformed-sas",
            Self::Version(_) => "sas-version",
            Self::Resource(_) => "sas-resource",
            Self::BadSignature => "bad-signature",
            Self::NotYetValid(_) => "sas-not-yet-valid",
            Self::Expired(_) => "sas-expired",
            Self::Protocol => "sas-protocol",
            Self::SourceIp(_) => "sas-source-ip",
            Self::Unsupported(_) => "sas-unsupported-field",
            Self::NotWithSas(_) => "not-with-sas",
            Self::ResourceType(_) => "sas-resource-type",
            Self::Permission { .. } => "sas-permission",
        }
    }

    /// The `x-ms-error-code` Azure answers for the same failure.
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::Protocol => "AuthorizationProtocolMismatch",
            Self::SourceIp(_) => "AuthorizationSourceIPMismatch",
            Self::ResourceType(_) => "AuthorizationResourceTypeMismatch",
            Self::Permission { .. } | Self::NotWithSas(_) => "AuthorizationPermissionMismatch",
            _ => "AuthenticationFailed",
        }
    }
}

/// A service SAS as the request's query carries it: every signed field, decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceSas {
    /// `sp`: permission letters.
    pub permissions: String,
    /// `st`: start of validity, as signed.
    pub start: Option<String>,
    /// `se`: end of validity, as signed.
    pub expiry: String,
    /// `si`: a stored access policy's name.
    pub identifier: Option<String>,
    /// `sip`: an address or `low-high` range.
    pub ip: Option<String>,
    /// `spr`: `https` or `https,http`.
    pub protocol: Option<String>,
    /// `sv`: the service version the SAS was signed for.
    pub version: String,
    /// `sr`.
    pub resource: SignedResource,
    /// `snapshot`: signed as the snapshot-time line.
    pub snapshot: Option<String>,
    /// `ses`: an encryption scope.
    pub encryption_scope: Option<String>,
    /// `rscc`, `rscd`, `rsce`, `rscl`, `rsct`: response-header overrides, in that order.
    pub response_headers: [Option<String>; 5],
    /// `sig`, base64-decoded.
    pub signature: Vec<u8>,
}

impl fmt::Debug for ServiceSas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceSas")
            .field("permissions", &self.permissions)
            .field("start", &self.start)
            .field("expiry", &self.expiry)
            .field("version", &self.version)
            .field("resource", &self.resource)
            .field("signature", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What the gateway checks a SAS against besides the request itself.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// The gateway's clock.
    pub now: SystemTime,
    /// The listener the request came in on.
    pub transport: Transport,
    /// The client's address (for `sip`).
    pub client: IpAddr,
}

/// A verified SAS: what it allows, for the authorization step after classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `sr`.
    resource: SignedResource,
    /// `sp`.
    permissions: String,
    /// `sv`: the version the upstream request is made with when the client sent none.
    version: String,
}

/// Whether a request authenticates with a SAS: it has no `Authorization` header and its
/// query has a `sig`. (With an `Authorization` header, Shared Key decides.)
pub fn carries_sas(parts: &Parts) -> bool {
    !parts.headers.contains_key(AUTHORIZATION)
        && form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .any(|(name, _)| name.eq_ignore_ascii_case("sig"))
}

/// Reads the SAS in a query. Account and user delegation SAS, repeated parameters, missing
/// fields, versions before [`MIN_VERSION`] and resources other than `b` and `c` are refused
/// here, before any signature is computed.
pub fn parse(query: &str) -> Result<ServiceSas, SasError> {
    let mut found: [Option<String>; READ_PARAMETERS.len()] = Default::default();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if ACCOUNT_SAS_PARAMETERS
            .iter()
            .any(|p| p.eq_ignore_ascii_case(&name))
        {
            return Err(SasError::AccountSas);
        }
        if USER_DELEGATION_PARAMETERS
            .iter()
            .any(|p| p.eq_ignore_ascii_case(&name))
        {
            return Err(SasError::UserDelegation);
        }
        if let Some(i) = READ_PARAMETERS
            .iter()
            .position(|p| p.eq_ignore_ascii_case(&name))
        {
            if found[i].is_some() {
                return Err(SasError::Repeated(READ_PARAMETERS[i]));
            }
            found[i] = Some(value.into_owned());
        }
    }
    let mut take = |name: &str| {
        READ_PARAMETERS
            .iter()
            .position(|p| *p == name)
            .and_then(|i| found[i].take())
    };
    let signature = take("sig").ok_or(SasError::Malformed("no sig"))?;
    let signature = BASE64
        .decode(signature)
        .map_err(|_| SasError::Malformed("sig is not base64"))?;
    let version = take("sv").ok_or(SasError::Malformed("no sv"))?;
    if !is_date(&version) || version.as_str() < MIN_VERSION {
        return Err(SasError::Version(version.chars().take(32).collect()));
    }
    let resource = match take("sr").as_deref() {
        Some("c") => SignedResource::Container,
        Some("b") => SignedResource::Blob,
        Some(other) => return Err(SasError::Resource(other.chars().take(8).collect())),
        None => return Err(SasError::Malformed("no sr")),
    };
    let permissions = take("sp").ok_or(SasError::Malformed("no sp"))?;
    if permissions.is_empty() || !permissions.chars().all(|c| KNOWN_PERMISSIONS.contains(c)) {
        return Err(SasError::Malformed("sp has an unknown permission"));
    }
    let expiry = take("se").ok_or(SasError::Malformed("no se"))?;
    if take("sdd").is_some() {
        return Err(SasError::Resource("d".into()));
    }
    Ok(ServiceSas {
        permissions,
        start: take("st"),
        expiry,
        identifier: take("si"),
        ip: take("sip"),
        protocol: take("spr"),
        version,
        resource,
        snapshot: take("snapshot"),
        encryption_scope: take("ses"),
        response_headers: [
            take("rscc"),
            take("rscd"),
            take("rsce"),
            take("rscl"),
            take("rsct"),
        ],
        signature,
    })
}

impl ServiceSas {
    /// The canonicalized resource for a request to `path` (`/<account>/<container>[/<blob>]`,
    /// percent-encoded as sent): `/blob/<account>/<container>` for a container SAS,
    /// `/blob/<account>/<container>/<blob>` for a blob SAS, names decoded.
    pub fn canonicalized_resource(&self, account: &str, path: &str) -> Result<String, SasError> {
        let rest = path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(account))
            .and_then(|p| p.strip_prefix('/'))
            .filter(|p| !p.is_empty())
            .ok_or(SasError::Malformed("the path does not name a container"))?;
        let signed = match self.resource {
            SignedResource::Container => rest.split('/').next().unwrap_or(rest),
            SignedResource::Blob => rest,
        };
        let decoded = percent_encoding::percent_decode_str(signed)
            .decode_utf8()
            .map_err(|_| SasError::Malformed("the path is not UTF-8 once decoded"))?;
        Ok(format!("/blob/{account}/{decoded}"))
    }

    /// The string-to-sign for a request to `path` under `account`.
    pub fn string_to_sign(&self, account: &str, path: &str) -> Result<String, SasError> {
        let resource = self.canonicalized_resource(account, path)?;
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        let mut lines = vec![
            self.permissions.clone(),
            opt(&self.start),
            self.expiry.clone(),
            resource,
            opt(&self.identifier),
            opt(&self.ip),
            opt(&self.protocol),
            self.version.clone(),
            self.resource.code().to_owned(),
            opt(&self.snapshot),
            opt(&self.encryption_scope),
        ];
        lines.extend(self.response_headers.iter().map(opt));
        Ok(lines.join("\n"))
    }
}

/// Checks the SAS a request carries, signed for `account` with `key`: signature (constant
/// time), validity window, protocol, client address, then the fields the gateway cannot
/// honour. What `sp` allows is checked later, against the classified operation, by
/// [`Grant::permits`].
pub fn verify(
    parts: &Parts,
    account: &str,
    key: &AccountKey,
    context: &Context,
) -> Result<Grant, SasError> {
    let sas = parse(parts.uri.query().unwrap_or(""))?;
    let string_to_sign = sas.string_to_sign(account, parts.uri.path())?;
    if !matches(key, &string_to_sign, &sas.signature) {
        return Err(SasError::BadSignature);
    }
    let now = unix_seconds(context.now);
    let skew = i64::try_from(MAX_CLOCK_SKEW.as_secs()).unwrap_or(i64::MAX);
    if let Some(start) = &sas.start
        && parse_time(start)? > now.saturating_add(skew)
    {
        return Err(SasError::NotYetValid(start.clone()));
    }
    if parse_time(&sas.expiry)?.saturating_add(skew) < now {
        return Err(SasError::Expired(sas.expiry.clone()));
    }
    match sas.protocol.as_deref() {
        None | Some("https,http") | Some("http,https") => {}
        Some("https") if context.transport == Transport::Tls => {}
        Some("https") => return Err(SasError::Protocol),
        Some(_) => return Err(SasError::Malformed("spr is neither https nor https,http")),
    }
    if let Some(range) = &sas.ip
        && !ip_in_range(range, context.client)?
    {
        return Err(SasError::SourceIp(context.client.to_canonical()));
    }
    if sas.identifier.is_some() {
        return Err(SasError::Unsupported("si (stored access policies)"));
    }
    if sas.encryption_scope.is_some() {
        return Err(SasError::Unsupported("ses (encryption scope)"));
    }
    if sas.response_headers.iter().any(Option::is_some) {
        return Err(SasError::Unsupported(
            "rscc/rscd/rsce/rscl/rsct (response header overrides)",
        ));
    }
    Ok(Grant {
        resource: sas.resource,
        permissions: sas.permissions,
        version: sas.version,
    })
}

impl Grant {
    /// Whether the SAS's `sr` and `sp` cover the classified request: read (`r`) for
    /// downloads, properties and block lists, write (`w`) for uploads, delete (`d`) for
    /// deletes, list (`l`) with a container SAS for listing. Container calls and Blob Batch
    /// are refused: a service SAS does not authorize the first at Azure, and a batch's parts
    /// each carry their own Shared Key.
    pub fn permits(&self, request: &Request<'_>) -> Result<(), SasError> {
        let operation = request.operation;
        let needed = match operation {
            Operation::GetBlob | Operation::GetBlobProperties | Operation::GetBlockList => 'r',
            Operation::PutBlob | Operation::PutBlock | Operation::PutBlockList => 'w',
            Operation::DeleteBlob => 'd',
            Operation::ListBlobs => 'l',
            Operation::CreateContainer
            | Operation::GetContainerProperties
            | Operation::BlobBatch => return Err(SasError::NotWithSas(operation.name())),
        };
        if operation == Operation::ListBlobs && self.resource != SignedResource::Container {
            return Err(SasError::ResourceType(operation.name()));
        }
        if !self.permissions.contains(needed) {
            return Err(SasError::Permission {
                operation: operation.name(),
                needed,
                granted: self.permissions.clone(),
            });
        }
        Ok(())
    }

    /// Makes the request ready for the upstream's own authentication: a SAS request
    /// carries its date and version in the query, which the gateway strips, so it gets an
    /// `x-ms-date` (now) and, unless the client sent one, `x-ms-version` from `sv`.
    pub fn prepare_upstream(&self, parts: &mut Parts, now: SystemTime) {
        if let Ok(date) = HeaderValue::try_from(httpdate::fmt_http_date(now)) {
            parts.headers.insert("x-ms-date", date);
        }
        if !parts.headers.contains_key("x-ms-version")
            && let Ok(version) = HeaderValue::try_from(self.version.as_str())
        {
            parts.headers.insert("x-ms-version", version);
        }
    }
}

/// `YYYY-MM-DD` with digits where digits belong.
fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// Seconds since the epoch (negative before it).
fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// A SAS time in one of the ISO 8601 forms Azure accepts (`YYYY-MM-DD`,
/// `YYYY-MM-DDThh:mmZ`, `YYYY-MM-DDThh:mm:ssZ`, with fractional seconds or an offset), as
/// seconds since the epoch.
pub fn parse_time(text: &str) -> Result<i64, SasError> {
    let full;
    let text = if is_date(text) {
        full = format!("{text}T00:00:00Z");
        full.as_str()
    } else {
        text
    };
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .map_err(|_| SasError::Malformed("st or se is not an ISO 8601 UTC time"))
}

/// Whether `client` is `range` (`a`) or inside it (`low-high`, inclusive), same family.
fn ip_in_range(range: &str, client: IpAddr) -> Result<bool, SasError> {
    let bad = || SasError::Malformed("sip is not an address or a low-high range");
    let (low, high) = range.split_once('-').unwrap_or((range, range));
    let low: IpAddr = low.trim().parse().map_err(|_| bad())?;
    let high: IpAddr = high.trim().parse().map_err(|_| bad())?;
    let client = client.to_canonical();
    Ok(match (low, high, client) {
        (IpAddr::V4(l), IpAddr::V4(h), IpAddr::V4(c)) => l <= c && c <= h,
        (IpAddr::V6(l), IpAddr::V6(h), IpAddr::V6(c)) => l <= c && c <= h,
        (IpAddr::V4(_), IpAddr::V4(_), _) | (IpAddr::V6(_), IpAddr::V6(_), _) => false,
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::blob::operation::classify;
    use crate::blob::shared_key::signature;
    use std::time::Duration;

    /// The emulator's published development key: public, so fine in a test.
    const KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(parse_time("2026-12-06T20:00:00Z").unwrap() as u64)
    }

    fn context() -> Context {
        Context {
            now: now(),
            transport: Transport::Tls,
            client: "10.1.2.3".parse().unwrap(),
        }
    }

    /// Signs `fields` (a query without sig) for `path` and returns the request's parts.
    fn signed(method: &str, path: &str, fields: &str) -> Parts {
        let key = AccountKey::from_base64(KEY).unwrap();
        let sas = parse(&format!("{fields}&sig=AAAA")).unwrap();
        let sts = sas.string_to_sign("pg-prod", path).unwrap();
        let sig = signature(&key, &sts);
        let query: String = form_urlencoded::Serializer::new(fields.to_owned())
            .append_pair("sig", &sig)
            .finish();
        http::Request::builder()
            .method(method)
            .uri(format!("{path}?{query}"))
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn check(parts: &Parts, context: &Context) -> Result<Grant, SasError> {
        verify(
            parts,
            "pg-prod",
            &AccountKey::from_base64(KEY).unwrap(),
            context,
        )
    }

    const BLOB_R: &str =
        "sv=2020-12-06&sr=b&sp=r&st=2026-12-06T19:50:00Z&se=2026-12-06T21:00:00Z&spr=https";

    #[test]
    fn a_blob_sas_is_accepted_and_grants_what_sp_says() {
        let p = signed("GET", "/pg-prod/velero/backups/b1/b1-logs.gz", BLOB_R);
        assert!(carries_sas(&p));
        let grant = check(&p, &context()).unwrap();
        let req = classify(&p, "pg-prod").unwrap();
        assert_eq!(grant.permits(&req), Ok(()));
        let put = http::Request::builder()
            .method("PUT")
            .uri(p.uri.clone())
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let e = grant
            .permits(&classify(&put, "pg-prod").unwrap())
            .unwrap_err();
        assert_eq!(e.reason(), "sas-permission");
        assert_eq!(e.error_code(), "AuthorizationPermissionMismatch");
        assert_eq!(
            e.to_string(),
            "put-blob needs SAS permission 'w', the SAS grants \"r\""
        );
    }

    #[test]
    fn the_signature_binds_path_and_fields() {
        let p = signed("GET", "/pg-prod/velero/a", BLOB_R);
        let other_blob = p.uri.to_string().replace("/velero/a", "/velero/b");
        let wider = p.uri.to_string().replace("sp=r", "sp=rw");
        for uri in [other_blob, wider] {
            let q = http::Request::get(uri).body(()).unwrap().into_parts().0;
            assert_eq!(check(&q, &context()), Err(SasError::BadSignature));
        }
    }

    #[test]
    fn window_protocol_and_address() {
        let p = signed("GET", "/pg-prod/velero/a", BLOB_R);
        let at = |secs: i64| Context {
            now: UNIX_EPOCH + Duration::from_secs(secs as u64),
            ..context()
        };
        let st = parse_time("2026-12-06T19:50:00Z").unwrap();
        let se = parse_time("2026-12-06T21:00:00Z").unwrap();
        let skew = MAX_CLOCK_SKEW.as_secs() as i64;
        assert!(check(&p, &at(st - skew)).is_ok());
        assert_eq!(
            check(&p, &at(st - skew - 1)).unwrap_err().reason(),
            "sas-not-yet-valid"
        );
        assert!(check(&p, &at(se + skew)).is_ok());
        assert_eq!(
            check(&p, &at(se + skew + 1)).unwrap_err().reason(),
            "sas-expired"
        );
        let plain = Context {
            transport: Transport::Plain,
            ..context()
        };
        let e = check(&p, &plain).unwrap_err();
        assert_eq!(
            (e.reason(), e.error_code()),
            ("sas-protocol", "AuthorizationProtocolMismatch")
        );
        let both = signed(
            "GET",
            "/pg-prod/velero/a",
            &BLOB_R.replace("spr=https", "spr=https,http&sip=10.1.2.0-10.1.2.9"),
        );
        assert!(check(&both, &plain).is_ok());
        let outside = Context {
            client: "10.1.3.1".parse().unwrap(),
            ..plain
        };
        assert_eq!(
            check(&both, &outside),
            Err(SasError::SourceIp("10.1.3.1".parse().unwrap()))
        );
        let mapped = Context {
            client: "::ffff:10.1.2.9".parse().unwrap(),
            ..plain
        };
        assert!(check(&both, &mapped).is_ok());
    }

    #[test]
    fn refusals_name_their_reason() {
        let base = "sv=2020-12-06&sr=c&sp=rl&se=2026-12-07&sig=AAAA";
        for (query, reason) in [
            (
                "sv=2022-11-02&ss=b&srt=sco&sp=rl&se=2026-12-07&sig=AAAA",
                "account-sas",
            ),
            (
                &format!("{base}&skoid=x&sktid=y") as &str,
                "user-delegation-sas",
            ),
            (&format!("{base}&SP=r"), "repeated-parameter"),
            ("sv=2020-12-06&sr=c&sp=rl&se=2026-12-07", "malformed-sas"),
            (&base.replace("sig=AAAA", "sig=!!"), "malformed-sas"),
            (&base.replace("sp=rl", "sp=rZ"), "malformed-sas"),
            (&base.replace("sp=rl&", ""), "malformed-sas"),
            (&base.replace("se=2026-12-07&", ""), "malformed-sas"),
            (&base.replace("sr=c&", ""), "malformed-sas"),
            (&base.replace("2020-12-06", "2019-12-12"), "sas-version"),
            (&base.replace("2020-12-06", "latest"), "sas-version"),
            (&base.replace("sr=c", "sr=bs"), "sas-resource"),
            (&format!("{base}&sdd=1"), "sas-resource"),
        ] {
            let e = parse(query).unwrap_err();
            assert_eq!(e.reason(), reason, "{query}: {e}");
        }
        assert_eq!(
            parse("ss=b&sig=AAAA").unwrap_err().to_string(),
            "account SAS (ss/srt) is not accepted; sign a service SAS (sr=c or sr=b)"
        );
    }

    #[test]
    fn fields_the_gateway_cannot_honour_are_refused_after_the_signature() {
        for (extra, what) in [
            ("&si=policy1", "si (stored access policies)"),
            ("&ses=scope1", "ses (encryption scope)"),
            (
                "&rsct=text%2Fplain",
                "rscc/rscd/rsce/rscl/rsct (response header overrides)",
            ),
        ] {
            let p = signed("GET", "/pg-prod/velero/a", &format!("{BLOB_R}{extra}"));
            assert_eq!(check(&p, &context()), Err(SasError::Unsupported(what)));
        }
    }

    #[test]
    fn container_sas_lists_and_blob_sas_does_not() {
        let c = "sv=2020-12-06&sr=c&sp=rl&se=2026-12-06T21:00:00Z";
        let list = signed(
            "GET",
            "/pg-prod/velero",
            &format!("restype=container&comp=list&{c}"),
        );
        let grant = check(&list, &context()).unwrap();
        assert_eq!(grant.permits(&classify(&list, "pg-prod").unwrap()), Ok(()));
        let blob = signed("GET", "/pg-prod/velero/x/y", c);
        let grant = check(&blob, &context()).unwrap();
        assert_eq!(grant.permits(&classify(&blob, "pg-prod").unwrap()), Ok(()));

        let b = "sv=2020-12-06&sr=b&sp=rl&se=2026-12-06T21:00:00Z";
        let list = signed(
            "GET",
            "/pg-prod/velero",
            &format!("restype=container&comp=list&{b}"),
        );
        let grant = check(&list, &context()).unwrap();
        let e = grant
            .permits(&classify(&list, "pg-prod").unwrap())
            .unwrap_err();
        assert_eq!(e.error_code(), "AuthorizationResourceTypeMismatch");
        let create = signed("PUT", "/pg-prod/velero", &format!("restype=container&{c}"));
        let grant = check(&create, &context()).unwrap();
        assert_eq!(
            grant.permits(&classify(&create, "pg-prod").unwrap()),
            Err(SasError::NotWithSas("create-container"))
        );
    }

    #[test]
    fn string_to_sign_layout() {
        let sas = parse(
            "sv=2026-10-06&sr=b&sp=rw&st=2026-12-06&se=2026-12-07&sip=10.0.0.1&spr=https&snapshot=2026-12-06T00%3A00%3A00.0000000Z&rsct=text%2Fplain&sig=AAAA",
        )
        .unwrap();
        assert_eq!(
            sas.string_to_sign("acct", "/acct/c/dir%20a/%C3%BC%2Bx.txt")
                .unwrap(),
            "rw\n2026-12-06\n2026-12-07\n/blob/acct/c/dir a/ü+x.txt\n\n10.0.0.1\nhttps\n2026-10-06\nb\n2026-12-06T00:00:00.0000000Z\n\n\n\n\n\ntext/plain"
        );
        assert_eq!(
            sas.canonicalized_resource("acct", "/acct"),
            Err(SasError::Malformed("the path does not name a container"))
        );
        assert!(sas.canonicalized_resource("acct", "/acct/c/%FF").is_err());
    }

    #[test]
    fn times() {
        let t = parse_time("2026-12-06T20:00:00Z").unwrap();
        assert_eq!(parse_time("2026-12-06T20:00Z"), Ok(t));
        assert_eq!(parse_time("2026-12-06T20:00:00.0000000Z"), Ok(t));
        assert_eq!(parse_time("2026-12-06T21:00:00+01:00"), Ok(t));
        assert_eq!(parse_time("2026-12-06"), Ok(t - 20 * 3600));
        for bad in ["", "2026-12-06T20:00:00", "tomorrow", "2026-13-01"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstream_gets_a_date_and_the_signed_version() {
        let p = signed("GET", "/pg-prod/velero/a", BLOB_R);
        let grant = check(&p, &context()).unwrap();
        let mut q = p.clone();
        grant.prepare_upstream(&mut q, now());
        assert_eq!(q.headers["x-ms-version"], "2020-12-06");
        assert_eq!(q.headers["x-ms-date"], "Sun, 06 Dec 2026 20:00:00 GMT");
        let mut r = p;
        r.headers
            .insert("x-ms-version", HeaderValue::from_static("2025-01-05"));
        grant.prepare_upstream(&mut r, now());
        assert_eq!(r.headers["x-ms-version"], "2025-01-05");
    }
}
