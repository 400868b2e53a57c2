//! Blob Batch (`POST ?restype=container&comp=batch`): a `multipart/mixed` body whose parts
//! are whole HTTP requests, each with its own Shared Key signature. barman-cloud deletes
//! through it (retention, `barman-cloud-backup-delete`), so the gateway reads the body
//! (bounded: it is small), and for every part checks the client's signature, classifies and
//! authorizes it like a request of its own, rewrites it for the real account and signs it
//! with the real key. The new body's length differs; the caller sets `Content-Length` from
//! it before signing the outer request.

use std::time::SystemTime;

use http::header::{HeaderName, HeaderValue};
use http::request::Parts;

use super::operation::{Operation, Refusal, Scope, classify};
use super::rewrite::{RewriteError, Upstream};
use super::shared_key::{AccountKey, AuthError, verify};
use super::upstream_auth::Credential;

/// Largest batch body read. Azure allows 256 sub-requests; one the SDK sends is about 450
/// bytes, and a blob name of the maximum 1,024 characters, percent-encoded, about 3 KiB, so
/// 256 of the longest still fit, and a client cannot make the gateway hold more.
pub const MAX_BATCH_BODY: usize = 2 * 1024 * 1024;
/// Azure's limit on sub-requests in one batch.
pub const MAX_PARTS: usize = 256;
/// RFC 2046's limit on a boundary's length.
const MAX_BOUNDARY_LEN: usize = 70;
/// Headers allowed in one part's MIME header block and in its request: the SDKs send three
/// and five; more is not a batch from a backup tool.
const MAX_HEADERS: usize = 32;

/// Why a batch is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// No `multipart/mixed` content type with a usable boundary.
    #[error("a batch needs Content-Type: multipart/mixed; boundary=...")]
    NoBoundary,
    /// The body is longer than [`MAX_BATCH_BODY`].
    #[error("the batch body is larger than {MAX_BATCH_BODY} bytes")]
    TooLarge,
    /// More than [`MAX_PARTS`] parts, or none.
    #[error("a batch has 1 to {MAX_PARTS} parts")]
    PartCount,
    /// The body is not a multipart body of HTTP requests.
    #[error("malformed batch body: {0}")]
    Malformed(&'static str),
    /// A part's signature does not hold.
    #[error("batch part {index}: {source}")]
    Auth {
        /// Position of the part, from 0 (its Content-ID as the SDKs number them).
        index: usize,
        /// Why.
        source: AuthError,
    },
    /// A part the account may not send.
    #[error("batch part {index}: {source}")]
    Refused {
        /// Position of the part, from 0.
        index: usize,
        /// Why.
        source: Refusal,
    },
    /// A part that is a valid request but not one a batch may carry (only Delete Blob).
    #[error("batch part {index}: {operation} cannot be sent in a batch")]
    NotBatchable {
        /// Position of the part, from 0.
        index: usize,
        /// What it was.
        operation: &'static str,
    },
    /// A part addressing a container other than the one the batch is sent to. The service
    /// runs a container-scoped batch's parts in that container only, and the gateway
    /// authorized the batch for it.
    #[error(
        "batch part {index}: the path is neither /{account}/{container}/<blob> nor /{container}/<blob>, the container the batch is sent to"
    )]
    OtherContainer {
        /// Position of the part, from 0.
        index: usize,
        /// The virtual account.
        account: String,
        /// The batch's container.
        container: String,
    },
    /// A part whose path reads both with and without the account segment, because the
    /// container is named like the virtual account: the two readings name different blobs.
    #[error(
        "batch part {index}: the path {path:?} names a different blob with and without the account segment, because container {container:?} is named like the account; use another container name"
    )]
    AmbiguousPath {
        /// Position of the part, from 0.
        index: usize,
        /// The part's path.
        path: String,
        /// The batch's container.
        container: String,
    },
}

impl BatchError {
    /// Short stable name for the access log and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoBoundary | Self::Malformed(_) | Self::PartCount => "malformed-batch",
            Self::TooLarge => "batch-too-large",
            Self::Auth { source, .. } => source.reason(),
            Self::Refused { source, .. } => source.reason(),
            Self::NotBatchable { .. } => "operation-not-allowed",
            Self::OtherContainer { .. } => "container-not-allowed",
            Self::AmbiguousPath { .. } => "ambiguous-path",
        }
    }
}

/// One part: its MIME headers, kept as sent, and the request it carries.
#[derive(Debug, Clone)]
pub struct Part {
    /// `Content-Type: application/http`, `Content-ID`, `Content-Transfer-Encoding` lines,
    /// each without its CRLF.
    mime_headers: Vec<String>,
    /// The sub-request's head (it has no body).
    pub request: Parts,
}

/// A parsed batch body.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The boundary from the Content-Type.
    boundary: String,
    /// The parts in order.
    pub parts: Vec<Part>,
}

/// The boundary of a `multipart/mixed` Content-Type, unquoted.
pub fn boundary(content_type: &HeaderValue) -> Result<String, BatchError> {
    let text = content_type.to_str().map_err(|_| BatchError::NoBoundary)?;
    let mut params = text.split(';');
    let media = params.next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("multipart/mixed") {
        return Err(BatchError::NoBoundary);
    }
    let value = params
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim())
        .ok_or(BatchError::NoBoundary)?;
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    let allowed = |c: char| c.is_ascii_alphanumeric() || "'()+_,-./:=? ".contains(c);
    if value.is_empty()
        || value.len() > MAX_BOUNDARY_LEN
        || value.ends_with(' ')
        || !value.chars().all(allowed)
    {
        return Err(BatchError::NoBoundary);
    }
    Ok(value.to_owned())
}

impl Batch {
    /// Parses a batch body. Pure and bounded; never panics.
    pub fn parse(body: &[u8], boundary: &str) -> Result<Self, BatchError> {
        if body.len() > MAX_BATCH_BODY {
            return Err(BatchError::TooLarge);
        }
        let delimiter = format!("--{boundary}");
        let next_delimiter = format!("\r\n--{boundary}");
        let mut rest = body
            .strip_prefix(delimiter.as_bytes())
            .ok_or(BatchError::Malformed(
                "the body does not start with the boundary",
            ))?;
        let mut parts = Vec::new();
        loop {
            if let Some(after) = rest.strip_prefix(b"--") {
                if !after.iter().all(u8::is_ascii_whitespace) {
                    return Err(BatchError::Malformed("bytes after the closing boundary"));
                }
                break;
            }
            rest = rest.strip_prefix(b"\r\n").ok_or(BatchError::Malformed(
                "a boundary line does not end in CRLF",
            ))?;
            let end = find(rest, next_delimiter.as_bytes())
                .ok_or(BatchError::Malformed("no closing boundary"))?;
            if parts.len() == MAX_PARTS {
                return Err(BatchError::PartCount);
            }
            parts.push(parse_part(&rest[..end])?);
            rest = &rest[end + next_delimiter.len()..];
        }
        if parts.is_empty() {
            return Err(BatchError::PartCount);
        }
        Ok(Self {
            boundary: boundary.to_owned(),
            parts,
        })
    }

    /// The body again, with each part's request as it is now (names lowercased, no body).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512 * self.parts.len());
        for part in &self.parts {
            out.extend_from_slice(format!("--{}\r\n", self.boundary).as_bytes());
            for line in &part.mime_headers {
                out.extend_from_slice(line.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            let r = &part.request;
            let target = r.uri.path_and_query().map_or("/", |p| p.as_str());
            out.extend_from_slice(format!("{} {target} HTTP/1.1\r\n", r.method).as_bytes());
            for (name, value) in &r.headers {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n\r\n");
        }
        out.extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        out
    }
}

/// What checking a batch's parts needs: who the client is and where the parts go.
#[derive(Debug, Clone, Copy)]
pub struct PartCheck<'a> {
    /// The virtual account the outer request was verified for.
    pub virtual_account: &'a str,
    /// The container the batch is sent to (`POST /<account>/<container>?...comp=batch`),
    /// as in its path: every part must address a blob in it.
    pub container: &'a str,
    /// That account's client key, which every part must be signed with.
    pub client_key: &'a AccountKey,
    /// What the account may reach.
    pub scope: &'a Scope,
    /// The real account the parts are rewritten for.
    pub upstream: &'a Upstream,
    /// What the parts carry upstream (the outer request's credential).
    pub credential: &'a Credential,
    /// The clock for the parts' date check.
    pub now: SystemTime,
}

/// Verifies, authorizes, rewrites and re-signs every part of a batch body; returns the new
/// body. The first part that fails stops the whole batch, so nothing of it is forwarded.
pub fn rewrite_body(
    body: &[u8],
    content_type: &HeaderValue,
    check: &PartCheck<'_>,
) -> Result<Vec<u8>, BatchError> {
    let mut batch = Batch::parse(body, &boundary(content_type)?)?;
    for (index, part) in batch.parts.iter_mut().enumerate() {
        let r = &mut part.request;
        // The client signed `/<virtual account>` + the path as sent, in either form, and
        // that is what `verify` rebuilds; the path is put in account form only after.
        verify(r, check.virtual_account, check.client_key, check.now)
            .map_err(|source| BatchError::Auth { index, source })?;
        match part_path(r.uri.path(), check.virtual_account, check.container) {
            PartPath::WithAccount => {}
            PartPath::Relative => {
                let target = format!(
                    "/{}{}",
                    check.virtual_account,
                    r.uri.path_and_query().map_or("/", |p| p.as_str())
                );
                r.uri = http::Uri::try_from(target)
                    .map_err(|_| BatchError::Malformed("a part's path"))?;
            }
            PartPath::Ambiguous => {
                return Err(BatchError::AmbiguousPath {
                    index,
                    path: r.uri.path().to_owned(),
                    container: check.container.to_owned(),
                });
            }
            PartPath::OtherContainer => {
                return Err(BatchError::OtherContainer {
                    index,
                    account: check.virtual_account.to_owned(),
                    container: check.container.to_owned(),
                });
            }
        }
        let request = classify(r, check.virtual_account)
            .map_err(|source| BatchError::Refused { index, source })?;
        if request.operation != Operation::DeleteBlob {
            return Err(BatchError::NotBatchable {
                index,
                operation: request.operation.name(),
            });
        }
        check
            .scope
            .authorize(&request)
            .map_err(|source| BatchError::Refused { index, source })?;
        check
            .upstream
            .rewrite_part(r, check.virtual_account, check.credential)
            .map_err(|e| match e {
                RewriteError::Sign(source) => BatchError::Auth { index, source },
                RewriteError::NotThisAccount => BatchError::Malformed("a part's path"),
            })?;
    }
    Ok(batch.to_bytes())
}

/// How a part's path addresses the batch's container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartPath {
    /// `/<virtual account>/<container>/<blob>`: path style, as SDKs send it to a path-style
    /// endpoint they recognise (azure-storage-blob 12.x: only for hosts `localhost` and
    /// `127.0.0.1`).
    WithAccount,
    /// `/<container>/<blob>`: relative to the account, as the service's own endpoints take
    /// it and as azure-storage-blob sends it for every other host (a Service name).
    Relative,
    /// Both readings fit: the container is named like the virtual account.
    Ambiguous,
    /// Neither reading is in the batch's container.
    OtherContainer,
}

/// Reads a part's path against the batch's `container`. A part may be in the batch's
/// container only, so at most one reading can fit unless the container is named like the
/// virtual account: then `/<account>/<account>/x` is blob `x` path style and blob
/// `<account>/x` relative, and the signature, made over the same bytes for both, cannot
/// tell which the client meant. Such a part is refused rather than guessed: a guess could
/// delete a blob the client did not name, and a refusal can never reach more than the
/// client asked for. Either reading fitting only in the batch's container keeps every part
/// within the container the batch itself was authorized for.
fn part_path(path: &str, virtual_account: &str, container: &str) -> PartPath {
    let with_account = path
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(virtual_account))
        .is_some_and(|rest| under_container(rest, container));
    let relative = under_container(path, container);
    match (with_account, relative) {
        (true, true) => PartPath::Ambiguous,
        (true, false) => PartPath::WithAccount,
        (false, true) => PartPath::Relative,
        (false, false) => PartPath::OtherContainer,
    }
}

/// Whether `path` is `/<container>/...`.
fn under_container(path: &str, container: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(container))
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Parses one part: MIME headers, a blank line, then an HTTP/1.1 request without a body.
/// Lines end in CRLF only: httparse also takes a bare LF, and a line after one could start
/// with the boundary, which would end the part early once written back with CRLF.
fn parse_part(bytes: &[u8]) -> Result<Part, BatchError> {
    let bare_lf = bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'));
    if bare_lf {
        return Err(BatchError::Malformed(
            "a line in a part does not end in CRLF",
        ));
    }
    let split =
        find(bytes, b"\r\n\r\n").ok_or(BatchError::Malformed("a part has no blank line"))?;
    let mime = std::str::from_utf8(&bytes[..split])
        .map_err(|_| BatchError::Malformed("a part's headers are not text"))?;
    let mime_headers: Vec<String> = mime.split("\r\n").map(str::to_owned).collect();
    if mime_headers.len() > MAX_HEADERS || mime_headers.iter().any(|l| !l.contains(':')) {
        return Err(BatchError::Malformed("a part's headers"));
    }
    let is_http = mime_headers.iter().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("content-type")
                && v.trim().eq_ignore_ascii_case("application/http")
        })
    });
    if !is_http {
        return Err(BatchError::Malformed(
            "a part is not Content-Type: application/http",
        ));
    }
    let inner = &bytes[split + 4..];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(inner) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return Err(BatchError::Malformed("a part's request head")),
    };
    if len != inner.len() {
        return Err(BatchError::Malformed("a part's request has a body"));
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(BatchError::Malformed("a part's request line"));
    };
    let mut builder = http::Request::builder().method(method).uri(target);
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| BatchError::Malformed("a part's header name"))?;
        if name == http::header::CONTENT_LENGTH && h.value != b"0" {
            return Err(BatchError::Malformed("a part's request has a body"));
        }
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| BatchError::Malformed("a part's header value"))?;
        builder = builder.header(name, value);
    }
    let request = builder
        .body(())
        .map_err(|_| BatchError::Malformed("a part's request line"))?
        .into_parts()
        .0;
    if !target.starts_with('/') {
        return Err(BatchError::Malformed(
            "a part's request target is not a path",
        ));
    }
    Ok(Part {
        mime_headers,
        request,
    })
}

/// First position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const B: &str = "batch_1";

    fn part(target: &str) -> String {
        format!(
            "--{B}\r\nContent-Type: application/http\r\nContent-ID: 0\r\n\r\nDELETE {target} HTTP/1.1\r\nx-ms-date: Sun, 06 Dec 2026 17:29:27 GMT\r\nContent-Length: 0\r\n\r\n\r\n"
        )
    }

    fn body(parts: &[String]) -> Vec<u8> {
        format!("{}--{B}--\r\n", parts.concat()).into_bytes()
    }

    fn malformed(body: &[u8]) -> BatchError {
        Batch::parse(body, B).unwrap_err()
    }

    #[test]
    fn part_paths_with_and_without_the_account() {
        use PartPath::*;
        let read = |path: &str, container: &str| part_path(path, "pg-prod", container);
        assert_eq!(read("/pg-prod/pgbackups/base/x", "pgbackups"), WithAccount);
        assert_eq!(read("/pgbackups/base/x", "pgbackups"), Relative);
        assert_eq!(read("/pgbackups/pg-prod/x", "pgbackups"), Relative);
        // Another container, in either form, another account, or a prefix of a name.
        for other in [
            "/pg-prod/velero/x",
            "/velero/x",
            "/other/pgbackups/x",
            "/pg-prodx/pgbackups/x",
            "/pgbackupsx/x",
            "/pg-prod/pgbackupsx/x",
            "/pgbackups",
            "/pg-prod/pgbackups",
            "/",
        ] {
            assert_eq!(read(other, "pgbackups"), OtherContainer, "{other}");
        }
        // A container named like the account: `/pg-prod/pg-prod/x` is blob `x` with the
        // account segment and blob `pg-prod/x` without; neither is picked.
        assert_eq!(read("/pg-prod/pg-prod/x", "pg-prod"), Ambiguous);
        assert_eq!(read("/pg-prod/x", "pg-prod"), Relative);
        assert_eq!(read("/pg-prod/pgbackups/x", "pg-prod"), Relative);
    }

    #[test]
    fn boundaries() {
        let ok = |v: &str| boundary(&HeaderValue::from_str(v).unwrap());
        assert_eq!(
            ok("multipart/mixed; boundary=batch_x-1").unwrap(),
            "batch_x-1"
        );
        assert_eq!(ok("Multipart/Mixed;Boundary=\"a b\"").unwrap(), "a b");
        for bad in [
            "application/json",
            "multipart/mixed",
            "multipart/mixed; boundary=",
            "multipart/mixed; boundary=\"\"",
            "multipart/mixed; boundary=a\"b",
        ] {
            assert_eq!(ok(bad), Err(BatchError::NoBoundary), "{bad}");
        }
        // Other parameters are ignored.
        assert_eq!(ok("multipart/mixed; charset=x; boundary=a").unwrap(), "a");
        let long = format!("multipart/mixed; boundary={}", "b".repeat(71));
        assert_eq!(ok(&long), Err(BatchError::NoBoundary));
    }

    #[test]
    fn parses_and_writes_back() {
        let b = body(&[part("/acct/c/one?"), part("/acct/c/two")]);
        let batch = Batch::parse(&b, B).unwrap();
        assert_eq!(batch.parts.len(), 2);
        assert_eq!(batch.parts[0].request.method, http::Method::DELETE);
        assert_eq!(batch.parts[1].request.uri.path(), "/acct/c/two");
        // Written back, it parses to the same requests.
        let again = Batch::parse(&batch.to_bytes(), B).unwrap();
        for (a, b) in batch.parts.iter().zip(&again.parts) {
            assert_eq!(a.request.uri, b.request.uri);
            assert_eq!(a.request.headers, b.request.headers);
            assert_eq!(a.mime_headers, b.mime_headers);
        }
    }

    #[test]
    fn malformed_bodies() {
        let one = part("/acct/c/one");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "the body does not start with the boundary"),
            (
                format!("preamble\r\n{one}--{B}--").into_bytes(),
                "the body does not start with the boundary",
            ),
            (one.clone().into_bytes(), "no closing boundary"),
            (
                format!("{one}--{B}--junk").into_bytes(),
                "bytes after the closing boundary",
            ),
            (
                format!("--{B}x\r\n").into_bytes(),
                "a boundary line does not end in CRLF",
            ),
            (
                body(&[one.replace("Content-Type: application/http", "Content-Type: text/plain")]),
                "a part is not Content-Type: application/http",
            ),
            (
                body(&[one.replace("Content-Length: 0\r\n\r\n", "Content-Length: 3\r\n\r\nabc")]),
                "a part's request has a body",
            ),
            (
                body(&[one.replace("Content-Length: 0", "Content-Length: 5")]),
                "a part's request has a body",
            ),
            (
                body(&[one.replace("HTTP/1.1", "HTTP/1.0")]),
                "a part's request line",
            ),
            (
                body(&[one.replace("DELETE /acct/c/one", "DELETE http://evil/acct/c/one")]),
                "a part's request target is not a path",
            ),
            (
                body(&[one.replace("\r\n\r\nDELETE", "\r\nDELETE")]),
                "a part's headers",
            ),
            (
                body(&[one.replace("DELETE /acct", "DELETE\x01 /acct")]),
                "a part's request head",
            ),
            // Found by the fuzzer: after a bare LF, a header named like the boundary
            // became a delimiter once the part was written back with CRLF.
            (
                body(&[one.replace(
                    "Content-Length: 0\r\n",
                    &format!("x-ms-date: Sun\n--{B}1: x\r\nContent-Length: 0\r\n"),
                )]),
                "a line in a part does not end in CRLF",
            ),
            (
                body(&[one.replace("\r\nContent-ID", "\nContent-ID")]),
                "a line in a part does not end in CRLF",
            ),
        ];
        for (b, expected) in cases {
            assert_eq!(
                malformed(&b),
                BatchError::Malformed(expected),
                "{}",
                String::from_utf8_lossy(&b)
            );
        }
        assert_eq!(
            malformed(format!("--{B}--\r\n").as_bytes()),
            BatchError::PartCount
        );
        let many: Vec<String> = (0..=MAX_PARTS)
            .map(|i| part(&format!("/acct/c/{i}")))
            .collect();
        assert_eq!(malformed(&body(&many)), BatchError::PartCount);
        let full: Vec<String> = (0..MAX_PARTS)
            .map(|i| part(&format!("/acct/c/{i}")))
            .collect();
        assert_eq!(
            Batch::parse(&body(&full), B).unwrap().parts.len(),
            MAX_PARTS
        );
        let huge = vec![b'x'; MAX_BATCH_BODY + 1];
        assert_eq!(malformed(&huge), BatchError::TooLarge);
    }
}
