//! Azure Storage Shared Key for the Blob service (versions 2009-09-19 and later): the
//! string-to-sign, the HMAC-SHA256 signature, and the check of a client's `Authorization:
//! SharedKey <account>:<signature>` header. It works on [`http::request::Parts`], the head
//! of a hyper request, so the gateway can verify what arrived and re-sign what it forwards
//! without copying the request.
//!
//! The string-to-sign is the verb, eleven standard headers (`Content-Length: 0` written as
//! empty), every `x-ms-*` header as `name:value`, then the canonicalized resource: `/`, the
//! account, the path exactly as sent (path-style URLs carry the account a second time), and
//! each query parameter as `name:value` on its own line, names lowercased and sorted,
//! values decoded and, when repeated, sorted and joined with commas.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use http::request::Parts;
use sha2::Sha256;

use super::collation::service_order;

/// How far `x-ms-date` (or `Date`) may be from the gateway's clock either way: the window
/// the service allows, and so the window in which a captured request can be replayed.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);
/// The `x-ms-error-code` Azure answers for every failed Shared Key check; clients and their
/// users recognise it, so the gateway uses it too.
pub const ERROR_CODE: &str = "AuthenticationFailed";
/// The standard headers in the string-to-sign, in their fixed order, after the verb.
const SIGNED_HEADERS: [&str; 11] = [
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
];
/// The scheme word this module signs and verifies.
const SCHEME: &str = "SharedKey";
/// Prefix of the headers that are signed by name (canonicalized headers).
const MS_HEADER_PREFIX: &str = "x-ms-";

/// HMAC-SHA256, the Shared Key MAC.
type HmacSha256 = Hmac<Sha256>;

/// A storage account key: the bytes behind the base64 text Azure shows (and the gateway's
/// client keys, made the same way), held as a keyed MAC ready to sign.
#[derive(Clone)]
pub struct AccountKey {
    /// HMAC-SHA256 keyed with the decoded key, cloned per signature: the key schedule is
    /// done once, when the key file is read.
    mac: HmacSha256,
}

/// Why a key file's text is not a usable key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Nothing but whitespace.
    #[error("the key is empty")]
    Empty,
    /// Not standard base64 (with padding), as Azure prints keys.
    #[error("the key is not base64: {0}")]
    NotBase64(String),
    /// HMAC refused the key. HMAC takes keys of any length, so this is not expected; it is
    /// an error rather than a panic path.
    #[error("the key cannot key HMAC-SHA256")]
    Unusable,
}

impl AccountKey {
    /// Decodes a key as Azure prints it; surrounding whitespace (a file's trailing newline) is
    /// ignored.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(KeyError::Empty);
        }
        let bytes = BASE64
            .decode(text)
            .map_err(|e| KeyError::NotBase64(e.to_string()))?;
        if bytes.is_empty() {
            return Err(KeyError::Empty);
        }
        let mac = HmacSha256::new_from_slice(&bytes).map_err(|_| KeyError::Unusable)?;
        Ok(Self { mac })
    }

    /// A fresh MAC keyed with this key.
    fn mac(&self) -> HmacSha256 {
        self.mac.clone()
    }
}

impl fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccountKey(<redacted>)")
    }
}

/// How the `x-ms-*` headers are ordered in the string-to-sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderOrder {
    /// The service's collation ([`service_order`]): what Azure computes, and so what the
    /// gateway signs with.
    Service,
    /// Plain byte order: what the Go SDK (Velero, Kopia) signs with. It differs from the
    /// service's order only where punctuation decides, as in `x-ms-meta-a-b` and
    /// `x-ms-meta-ab`.
    Bytes,
}

/// Why a request's Shared Key authorization was not accepted. Every variant is answered
/// `403` with [`ERROR_CODE`]; [`AuthError::reason`] tells them apart in logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header: an anonymous request.
    #[error("no Authorization header; anonymous requests are not accepted")]
    Anonymous,
    /// Another scheme (`Bearer`, `SharedKeyLite`, ...).
    #[error("Authorization scheme {0:?} is not accepted; use SharedKey")]
    UnsupportedScheme(String),
    /// `SharedKey` without `<account>:<signature>`, or a signature that is not base64.
    #[error("malformed SharedKey authorization: {0}")]
    Malformed(&'static str),
    /// The header names another account than the request path.
    #[error("the Authorization header is for account {got:?}, the request is for {expected:?}")]
    WrongAccount {
        /// The account of the request path.
        expected: String,
        /// The account in the header.
        got: String,
    },
    /// Neither `x-ms-date` nor `Date`.
    #[error("the request has neither x-ms-date nor Date")]
    NoDate,
    /// The date header is not an HTTP date.
    #[error("{header} is not an HTTP date")]
    BadDate {
        /// `x-ms-date` or `date`.
        header: &'static str,
    },
    /// The date is more than [`MAX_CLOCK_SKEW`] from the gateway's clock.
    #[error(
        "the request date is {skew_secs} s from the gateway's clock (at most {} s allowed)",
        MAX_CLOCK_SKEW.as_secs()
    )]
    StaleDate {
        /// How far off, in seconds, either way.
        skew_secs: u64,
    },
    /// A signed header's value is not text (it cannot be signed as a string).
    #[error("header {0} is not UTF-8 text")]
    HeaderNotText(String),
    /// The signature does not match the request under either header order.
    #[error("the signature does not match the request")]
    BadSignature,
}

impl AuthError {
    /// Short stable name for the access log and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Anonymous => "anonymous",
            Self::UnsupportedScheme(_) => "unsupported-scheme",
            Self::Malformed(_) => "malformed-authorization",
            Self::WrongAccount { .. } => "wrong-account",
            Self::NoDate => "missing-date",
            Self::BadDate { .. } => "bad-date",
            Self::StaleDate { .. } => "stale-date",
            Self::HeaderNotText(_) => "malformed-header",
            Self::BadSignature => "bad-signature",
        }
    }

    /// The `x-ms-error-code` Azure gives for it.
    pub fn error_code(&self) -> &'static str {
        ERROR_CODE
    }
}

/// The `Authorization: SharedKey <account>:<signature>` header, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedKeyCredential<'a> {
    /// The account the client signed for.
    pub account: &'a str,
    /// The signature, still base64.
    pub signature: &'a str,
}

/// Reads the Shared Key authorization of a request, without checking it.
pub fn credential(headers: &HeaderMap) -> Result<SharedKeyCredential<'_>, AuthError> {
    let value = headers.get(AUTHORIZATION).ok_or(AuthError::Anonymous)?;
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("the header is not text"))?;
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if scheme != SCHEME {
        return Err(AuthError::UnsupportedScheme(
            scheme.chars().take(32).collect(),
        ));
    }
    let (account, signature) = rest
        .trim()
        .split_once(':')
        .ok_or(AuthError::Malformed("expected <account>:<signature>"))?;
    if account.is_empty() || signature.is_empty() {
        return Err(AuthError::Malformed("expected <account>:<signature>"));
    }
    Ok(SharedKeyCredential { account, signature })
}

/// Builds the string-to-sign of a request for `account`, with `x-ms-*` headers in `order`.
pub fn string_to_sign(
    parts: &Parts,
    account: &str,
    order: HeaderOrder,
) -> Result<String, AuthError> {
    let mut out = String::with_capacity(512);
    out.push_str(parts.method.as_str());
    out.push('\n');
    for name in SIGNED_HEADERS {
        let value = joined_value(&parts.headers, name)?;
        // Since version 2015-02-21 a zero length is signed as an empty line, like no header.
        if !(name == "content-length" && value == "0") {
            out.push_str(&value);
        }
        out.push('\n');
    }
    for (name, value) in ms_headers(&parts.headers, order)? {
        out.push_str(name);
        out.push(':');
        out.push_str(&value);
        out.push('\n');
    }
    out.push('/');
    out.push_str(account);
    out.push_str(parts.uri.path());
    for (name, mut values) in query_parameters(parts.uri.query()) {
        values.sort();
        out.push('\n');
        out.push_str(&name);
        out.push(':');
        out.push_str(&values.join(","));
    }
    Ok(out)
}

/// The base64 HMAC-SHA256 of `string_to_sign` under `key`: the part after the colon.
pub fn signature(key: &AccountKey, string_to_sign: &str) -> String {
    let mut mac = key.mac();
    mac.update(string_to_sign.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Signs a request for `account` in the service's header order and sets its
/// `Authorization` header, replacing any there was.
pub fn sign(parts: &mut Parts, account: &str, key: &AccountKey) -> Result<(), AuthError> {
    let sts = string_to_sign(parts, account, HeaderOrder::Service)?;
    let value = HeaderValue::try_from(format!("{SCHEME} {account}:{}", signature(key, &sts)))
        .map_err(|_| AuthError::Malformed("the account name cannot appear in a header"))?;
    parts.headers.insert(AUTHORIZATION, value);
    Ok(())
}

/// Checks a client's Shared Key authorization: signed for `account`, dated within
/// [`MAX_CLOCK_SKEW`] of `now`, and a signature made with `key` over this very request in
/// either header order. The comparison is constant-time.
pub fn verify(
    parts: &Parts,
    account: &str,
    key: &AccountKey,
    now: SystemTime,
) -> Result<(), AuthError> {
    let credential = credential(&parts.headers)?;
    if credential.account != account {
        return Err(AuthError::WrongAccount {
            expected: account.to_owned(),
            got: credential.account.to_owned(),
        });
    }
    let claimed = BASE64
        .decode(credential.signature)
        .map_err(|_| AuthError::Malformed("the signature is not base64"))?;
    check_date(&parts.headers, now)?;
    let service = string_to_sign(parts, account, HeaderOrder::Service)?;
    if matches(key, &service, &claimed) {
        return Ok(());
    }
    let bytes = string_to_sign(parts, account, HeaderOrder::Bytes)?;
    if bytes != service && matches(key, &bytes, &claimed) {
        return Ok(());
    }
    Err(AuthError::BadSignature)
}

/// Constant-time check of `claimed` against the MAC of `string_to_sign` (also the check
/// of a SAS's `sig`).
pub(crate) fn matches(key: &AccountKey, string_to_sign: &str, claimed: &[u8]) -> bool {
    let mut mac = key.mac();
    mac.update(string_to_sign.as_bytes());
    mac.verify_slice(claimed).is_ok()
}

/// `x-ms-date`, else `Date`, must be an HTTP date within [`MAX_CLOCK_SKEW`] of `now`.
fn check_date(headers: &HeaderMap, now: SystemTime) -> Result<(), AuthError> {
    let (header, value) = match (headers.get("x-ms-date"), headers.get(http::header::DATE)) {
        (Some(v), _) => ("x-ms-date", v),
        (None, Some(v)) => ("date", v),
        (None, None) => return Err(AuthError::NoDate),
    };
    let date = value
        .to_str()
        .ok()
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
        .ok_or(AuthError::BadDate { header })?;
    let skew = now
        .duration_since(date)
        .unwrap_or_else(|early| early.duration());
    if skew > MAX_CLOCK_SKEW {
        return Err(AuthError::StaleDate {
            skew_secs: skew.as_secs(),
        });
    }
    Ok(())
}

/// A header's values as text, repeated ones joined with commas, trimmed; empty when absent.
fn joined_value(headers: &HeaderMap, name: &str) -> Result<String, AuthError> {
    let mut out = String::new();
    for (i, value) in headers.get_all(name).iter().enumerate() {
        let text = std::str::from_utf8(value.as_bytes())
            .map_err(|_| AuthError::HeaderNotText(name.to_owned()))?;
        if i > 0 {
            out.push(',');
        }
        out.push_str(text.trim());
    }
    Ok(out)
}

/// Every `x-ms-*` header (names are lowercase in [`HeaderMap`]) with its joined value, in
/// `order`.
fn ms_headers(headers: &HeaderMap, order: HeaderOrder) -> Result<Vec<(&str, String)>, AuthError> {
    let mut out = Vec::new();
    for name in headers.keys() {
        let name = name.as_str();
        if name.starts_with(MS_HEADER_PREFIX) {
            out.push((name, joined_value(headers, name)?));
        }
    }
    match order {
        HeaderOrder::Service => out.sort_by(|a, b| service_order(a.0, b.0)),
        HeaderOrder::Bytes => out.sort_by(|a, b| a.0.cmp(b.0)),
    }
    Ok(out)
}

/// The query's parameters, decoded (`+` is a space), names lowercased, values of the same
/// name collected; sorted by name.
fn query_parameters(query: Option<&str>) -> BTreeMap<String, Vec<String>> {
    let mut params: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        params
            .entry(name.to_lowercase())
            .or_default()
            .push(value.into_owned());
    }
    params
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The emulator's published development key: public, so fine in a test.
    const KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    const DATE: &str = "Sun, 06 Dec 2026 17:19:43 GMT";

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder()
            .method("GET")
            .uri("/acct/c/b?comp=list");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn now() -> SystemTime {
        httpdate::parse_http_date(DATE).unwrap()
    }

    fn check(headers: &[(&str, &str)]) -> Result<(), AuthError> {
        verify(
            &parts(headers),
            "acct",
            &AccountKey::from_base64(KEY).unwrap(),
            now(),
        )
    }

    #[test]
    fn refusals_name_their_reason() {
        let date = ("x-ms-date", DATE);
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[date], "anonymous"),
            (
                &[date, ("authorization", "Bearer eyJ0eXAi")],
                "unsupported-scheme",
            ),
            (
                &[date, ("authorization", "SharedKeyLite acct:AAAA")],
                "unsupported-scheme",
            ),
            (
                &[date, ("authorization", "SharedKey acct")],
                "malformed-authorization",
            ),
            (
                &[date, ("authorization", "SharedKey :AAAA")],
                "malformed-authorization",
            ),
            (
                &[date, ("authorization", "SharedKey acct:not base64!")],
                "malformed-authorization",
            ),
            (
                &[date, ("authorization", "SharedKey other:AAAA")],
                "wrong-account",
            ),
            (&[("authorization", "SharedKey acct:AAAA")], "missing-date"),
            (
                &[
                    ("x-ms-date", "yesterday"),
                    ("authorization", "SharedKey acct:AAAA"),
                ],
                "bad-date",
            ),
            (
                &[date, ("authorization", "SharedKey acct:AAAA")],
                "bad-signature",
            ),
        ];
        for (headers, reason) in cases {
            let e = check(headers).unwrap_err();
            assert_eq!(e.reason(), *reason, "{headers:?}: {e}");
            assert_eq!(e.error_code(), "AuthenticationFailed");
        }
    }

    #[test]
    fn date_header_serves_when_x_ms_date_is_absent() {
        let key = AccountKey::from_base64(KEY).unwrap();
        let mut p = parts(&[("date", DATE)]);
        sign(&mut p, "acct", &key).unwrap();
        assert_eq!(verify(&p, "acct", &key, now()), Ok(()));
        let late = now() + MAX_CLOCK_SKEW + Duration::from_secs(1);
        let e = verify(&p, "acct", &key, late).unwrap_err();
        assert_eq!(e, AuthError::StaleDate { skew_secs: 901 });
        assert_eq!(
            e.to_string(),
            "the request date is 901 s from the gateway's clock (at most 900 s allowed)"
        );
    }

    #[test]
    fn byte_order_signatures_are_accepted_too() {
        // The Go SDK sorts x-ms-* names bytewise; for these names that differs from the
        // service's collation, and both must verify.
        let key = AccountKey::from_base64(KEY).unwrap();
        let mut p = parts(&[
            ("x-ms-date", DATE),
            ("x-ms-meta-a-b", "1"),
            ("x-ms-meta-ab", "2"),
        ]);
        let bytes = string_to_sign(&p, "acct", HeaderOrder::Bytes).unwrap();
        let service = string_to_sign(&p, "acct", HeaderOrder::Service).unwrap();
        assert_ne!(bytes, service);
        let header = format!("SharedKey acct:{}", signature(&key, &bytes));
        p.headers
            .insert(AUTHORIZATION, HeaderValue::try_from(header).unwrap());
        assert_eq!(verify(&p, "acct", &key, now()), Ok(()));
    }

    #[test]
    fn repeated_headers_and_query_values_are_joined() {
        let mut b = http::Request::builder()
            .method("GET")
            .uri("/acct/c?include=snapshots&Include=metadata&prefix=a%2Bb+c&flag");
        for (k, v) in [
            ("x-ms-meta-x", "2"),
            ("x-ms-meta-x", " 1 "),
            ("range", "bytes=0-1"),
        ] {
            b = b.header(k, v);
        }
        let p = b.body(()).unwrap().into_parts().0;
        let sts = string_to_sign(&p, "acct", HeaderOrder::Service).unwrap();
        assert_eq!(
            sts,
            "GET\n\n\n\n\n\n\n\n\n\n\nbytes=0-1\nx-ms-meta-x:2,1\n/acct/acct/c\nflag:\ninclude:metadata,snapshots\nprefix:a+b c"
        );
    }

    #[test]
    fn header_values_that_are_not_text_are_refused() {
        let mut p = parts(&[("x-ms-date", DATE)]);
        p.headers.insert(
            "x-ms-meta-bin",
            HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        );
        assert_eq!(
            string_to_sign(&p, "acct", HeaderOrder::Service),
            Err(AuthError::HeaderNotText("x-ms-meta-bin".into()))
        );
    }

    #[test]
    fn keys() {
        assert_eq!(AccountKey::from_base64(" \n").unwrap_err(), KeyError::Empty);
        assert!(matches!(
            AccountKey::from_base64("not base64!"),
            Err(KeyError::NotBase64(_))
        ));
        let key = AccountKey::from_base64(&format!("{KEY}\n")).unwrap();
        assert_eq!(format!("{key:?}"), "AccountKey(<redacted>)");
    }
}
