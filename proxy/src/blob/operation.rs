//! What a gateway request asks for, and whether its virtual account may. A request is
//! classified into one of the few data-plane operations backup tools use, by method, path
//! shape (container or blob) and the `restype`/`comp` query parameters; everything else is
//! refused, as are the calls that would reach beyond the account's containers (account-level
//! calls, `x-ms-copy-source*`) or change who can read them (container ACLs, public access).

use std::fmt;

use http::Method;
use http::request::Parts;

/// Headers that make Azure fetch data from another URL (Copy Blob, Put Blob and Put Block
/// from URL): the request would read from, or copy into, places beyond the account's
/// containers, so any header starting with this is refused.
const COPY_SOURCE_PREFIX: &str = "x-ms-copy-source";
/// The header that opens a container to anonymous readers on creation.
const PUBLIC_ACCESS_HEADER: &str = "x-ms-blob-public-access";

/// A right a virtual account can be given (`permissions:` in the config, lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Download blobs, read their properties and block lists, read container properties.
    Read,
    /// List the blobs of a container.
    List,
    /// Upload blobs and blocks, commit block lists, create the container.
    Write,
    /// Delete blobs (directly or in a batch). Without it a workload cannot destroy its own
    /// backups.
    Delete,
}

impl Permission {
    /// The word used in the config file and in refusals.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::List => "list",
            Self::Write => "write",
            Self::Delete => "delete",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A data-plane operation the gateway forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `PUT ?restype=container`.
    CreateContainer,
    /// `GET`/`HEAD ?restype=container`.
    GetContainerProperties,
    /// `GET ?restype=container&comp=list`.
    ListBlobs,
    /// `POST ?restype=container&comp=batch`: the parts are classified one by one.
    BlobBatch,
    /// `GET` a blob.
    GetBlob,
    /// `HEAD` a blob.
    GetBlobProperties,
    /// `GET ?comp=blocklist` on a blob.
    GetBlockList,
    /// `PUT` a blob.
    PutBlob,
    /// `PUT ?comp=block` on a blob.
    PutBlock,
    /// `PUT ?comp=blocklist` on a blob.
    PutBlockList,
    /// `DELETE` a blob.
    DeleteBlob,
}

impl Operation {
    /// Short stable name for the access log and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::CreateContainer => "create-container",
            Self::GetContainerProperties => "get-container-properties",
            Self::ListBlobs => "list-blobs",
            Self::BlobBatch => "blob-batch",
            Self::GetBlob => "get-blob",
            Self::GetBlobProperties => "get-blob-properties",
            Self::GetBlockList => "get-block-list",
            Self::PutBlob => "put-blob",
            Self::PutBlock => "put-block",
            Self::PutBlockList => "put-block-list",
            Self::DeleteBlob => "delete-blob",
        }
    }

    /// The permission the operation needs; `None` for a batch, whose parts each need their
    /// own.
    pub fn permission(self) -> Option<Permission> {
        Some(match self {
            Self::GetContainerProperties
            | Self::GetBlob
            | Self::GetBlobProperties
            | Self::GetBlockList => Permission::Read,
            Self::ListBlobs => Permission::List,
            Self::CreateContainer | Self::PutBlob | Self::PutBlock | Self::PutBlockList => {
                Permission::Write
            }
            Self::DeleteBlob => Permission::Delete,
            Self::BlobBatch => return None,
        })
    }
}

/// What a request addresses, as it appears in the path (still percent-encoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource<'a> {
    /// The container name.
    pub container: &'a str,
    /// The blob name; `None` for a container-level request.
    pub blob: Option<&'a str>,
}

/// A classified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// What it does.
    pub operation: Operation,
    /// What it does it to.
    pub resource: Resource<'a>,
}

/// Why a request is not forwarded. Answered 403 with `x-ms-error-code` from
/// [`Refusal::error_code`] and the sentence in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The path does not start with `/<virtual account>/`.
    #[error("the path is not /{0}/<container>/...")]
    NotThisAccount(String),
    /// A service-level call (list containers, account properties, user delegation keys...).
    #[error("account-level operations are not forwarded; address a container")]
    AccountLevel,
    /// An empty, `.` or `..` segment, or a backslash: a path some layer could resolve
    /// differently from the gateway.
    #[error("the path has an empty, '.' or '..' segment or a backslash")]
    AmbiguousPath,
    /// The same `restype` or `comp` parameter given twice.
    #[error("query parameter {0} is given more than once")]
    RepeatedParameter(&'static str),
    /// A container the account does not list.
    #[error("container {0:?} is not one of this account's containers")]
    ContainerNotAllowed(String),
    /// Container ACLs and stored access policies (`comp=acl`).
    #[error("container access policies (comp=acl) are never forwarded")]
    Acl,
    /// Creating a container open to anonymous readers.
    #[error("x-ms-blob-public-access is never forwarded")]
    PublicAccess,
    /// Server-side copy from a URL.
    #[error("server-side copy (x-ms-copy-source*) is never forwarded")]
    CopySource,
    /// Anything outside the operations the gateway knows.
    #[error("{method} with {shape} is not an operation the gateway forwards")]
    UnknownOperation {
        /// The method.
        method: Method,
        /// The path shape and `restype`/`comp`, e.g. `container, comp=lease`.
        shape: String,
    },
    /// An operation the account lacks the permission for.
    #[error("{operation} needs the {permission} permission, which this account does not have")]
    MissingPermission {
        /// The operation's name.
        operation: &'static str,
        /// The permission it needs.
        permission: Permission,
    },
}

impl Refusal {
    /// Short stable name for the access log and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotThisAccount(_) => "wrong-account-path",
            Self::AccountLevel => "account-level",
            Self::AmbiguousPath => "ambiguous-path",
            Self::RepeatedParameter(_) => "repeated-parameter",
            Self::ContainerNotAllowed(_) => "container-not-allowed",
            Self::Acl => "container-acl",
            Self::PublicAccess => "public-access",
            Self::CopySource => "copy-source",
            Self::UnknownOperation { .. } => "operation-not-allowed",
            Self::MissingPermission { .. } => "permission-denied",
        }
    }

    /// The `x-ms-error-code` Azure itself uses for a request the credential may not make.
    pub fn error_code(&self) -> &'static str {
        "AuthorizationPermissionMismatch"
    }
}

/// What a virtual account may reach: the listed containers, with the listed permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Container names, exactly as in the path.
    pub containers: Vec<String>,
    /// The permissions.
    pub permissions: Vec<Permission>,
}

impl Scope {
    /// Whether `request` is within this scope. A batch is checked for its container only:
    /// each of its parts must be classified and authorized on its own.
    pub fn authorize(&self, request: &Request<'_>) -> Result<(), Refusal> {
        let container = request.resource.container;
        if !self.containers.iter().any(|c| c == container) {
            return Err(Refusal::ContainerNotAllowed(container.to_owned()));
        }
        match request.operation.permission() {
            Some(p) if !self.permissions.contains(&p) => Err(Refusal::MissingPermission {
                operation: request.operation.name(),
                permission: p,
            }),
            _ => Ok(()),
        }
    }
}

/// Classifies a request addressed to `/<account>/<container>[/<blob>]`.
pub fn classify<'a>(parts: &'a Parts, account: &str) -> Result<Request<'a>, Refusal> {
    let resource = resource(parts.uri.path(), account)?;
    for name in parts.headers.keys() {
        if name.as_str().starts_with(COPY_SOURCE_PREFIX) {
            return Err(Refusal::CopySource);
        }
        if name.as_str() == PUBLIC_ACCESS_HEADER {
            return Err(Refusal::PublicAccess);
        }
    }
    let restype = single_parameter(parts.uri.query(), "restype")?;
    let comp = single_parameter(parts.uri.query(), "comp")?;
    if comp.as_deref() == Some("acl") {
        return Err(Refusal::Acl);
    }
    let method = &parts.method;
    let operation = match (&resource.blob, restype.as_deref(), comp.as_deref()) {
        (None, Some("container"), None) => match *method {
            Method::PUT => Some(Operation::CreateContainer),
            Method::GET | Method::HEAD => Some(Operation::GetContainerProperties),
            _ => None,
        },
        (None, Some("container"), Some("list")) if method == Method::GET => {
            Some(Operation::ListBlobs)
        }
        (None, Some("container"), Some("batch")) if method == Method::POST => {
            Some(Operation::BlobBatch)
        }
        (Some(_), None, None) => match *method {
            Method::GET => Some(Operation::GetBlob),
            Method::HEAD => Some(Operation::GetBlobProperties),
            Method::PUT => Some(Operation::PutBlob),
            Method::DELETE => Some(Operation::DeleteBlob),
            _ => None,
        },
        (Some(_), None, Some("block")) if method == Method::PUT => Some(Operation::PutBlock),
        (Some(_), None, Some("blocklist")) => match *method {
            Method::PUT => Some(Operation::PutBlockList),
            Method::GET => Some(Operation::GetBlockList),
            _ => None,
        },
        _ => None,
    };
    let operation = operation.ok_or_else(|| Refusal::UnknownOperation {
        method: method.clone(),
        shape: shape(&resource, restype.as_deref(), comp.as_deref()),
    })?;
    Ok(Request {
        operation,
        resource,
    })
}

/// Splits `/<account>/<container>[/<blob>]`, refusing other accounts, account-level paths
/// and segments that a later layer could resolve to another container.
fn resource<'a>(path: &'a str, account: &str) -> Result<Resource<'a>, Refusal> {
    let rest = path
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(account))
        .ok_or_else(|| Refusal::NotThisAccount(account.to_owned()))?;
    let rest = match rest {
        "" | "/" => return Err(Refusal::AccountLevel),
        r => r
            .strip_prefix('/')
            .ok_or_else(|| Refusal::NotThisAccount(account.to_owned()))?,
    };
    if rest.split('/').any(ambiguous_segment) {
        return Err(Refusal::AmbiguousPath);
    }
    Ok(match rest.split_once('/') {
        None => Resource {
            container: rest,
            blob: None,
        },
        Some((container, blob)) => Resource {
            container,
            blob: Some(blob),
        },
    })
}

/// An empty, `.` or `..` segment (also percent-encoded), or one with a backslash.
fn ambiguous_segment(segment: &str) -> bool {
    // Lossy: only the segment's shape matters here, and the bytes that decide it are ASCII.
    let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
    decoded.is_empty() || decoded == "." || decoded == ".." || decoded.contains('\\')
}

/// The value of `name` in the query (compared without case, as the service does), refusing
/// a repetition: one layer reading the first and another the last would disagree on the
/// operation.
fn single_parameter(query: Option<&str>, name: &'static str) -> Result<Option<String>, Refusal> {
    let mut found = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if k.eq_ignore_ascii_case(name) {
            if found.is_some() {
                return Err(Refusal::RepeatedParameter(name));
            }
            found = Some(v.into_owned());
        }
    }
    Ok(found)
}

/// `container` or `blob`, with the `restype`/`comp` given, for a refusal's message.
fn shape(resource: &Resource<'_>, restype: Option<&str>, comp: Option<&str>) -> String {
    let mut out = String::from(if resource.blob.is_some() {
        "a blob path"
    } else {
        "a container path"
    });
    for (k, v) in [("restype", restype), ("comp", comp)] {
        if let Some(v) = v {
            out.push_str(&format!(", {k}={v}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parts(method: &str, target: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn op(method: &str, target: &str) -> Result<Operation, Refusal> {
        let p = parts(method, target, &[]);
        classify(&p, "pg-prod").map(|r| r.operation)
    }

    fn reason(method: &str, target: &str, headers: &[(&str, &str)]) -> &'static str {
        let p = parts(method, target, headers);
        classify(&p, "pg-prod").unwrap_err().reason()
    }

    #[test]
    fn the_operations_backup_tools_use() {
        use Operation::*;
        let c = "/pg-prod/pgbackups";
        let b = "/pg-prod/pgbackups/base/2026/data.tar";
        for (method, target, expected) in [
            ("PUT", format!("{c}?restype=container"), CreateContainer),
            (
                "GET",
                format!("{c}?restype=container"),
                GetContainerProperties,
            ),
            (
                "HEAD",
                format!("{c}?restype=container&timeout=30"),
                GetContainerProperties,
            ),
            (
                "GET",
                format!("{c}?restype=container&comp=list&prefix=base%2F"),
                ListBlobs,
            ),
            ("GET", format!("{c}?comp=list&restype=container"), ListBlobs),
            (
                "POST",
                format!("{c}?restype=container&comp=batch"),
                BlobBatch,
            ),
            ("GET", b.to_owned(), GetBlob),
            (
                "GET",
                format!("{b}?snapshot=2026-12-06T17%3A00%3A00Z"),
                GetBlob,
            ),
            ("HEAD", b.to_owned(), GetBlobProperties),
            ("PUT", b.to_owned(), PutBlob),
            (
                "PUT",
                format!("{b}?comp=block&blockid=YmxvY2s%3D"),
                PutBlock,
            ),
            ("PUT", format!("{b}?comp=blocklist"), PutBlockList),
            (
                "GET",
                format!("{b}?comp=blocklist&blocklisttype=all"),
                GetBlockList,
            ),
            ("DELETE", b.to_owned(), DeleteBlob),
            ("DELETE", format!("{b}?"), DeleteBlob),
        ] {
            assert_eq!(op(method, &target), Ok(expected), "{method} {target}");
        }
    }

    #[test]
    fn everything_else_is_refused_with_its_reason() {
        let c = "/pg-prod/pgbackups";
        let b = "/pg-prod/pgbackups/x";
        for (method, target, headers, expected) in [
            ("GET", "/pg-prod?comp=list", vec![], "account-level"),
            (
                "GET",
                "/pg-prod/?restype=service&comp=properties",
                vec![],
                "account-level",
            ),
            (
                "POST",
                "/pg-prod?restype=service&comp=userdelegationkey",
                vec![],
                "account-level",
            ),
            ("GET", "/other/pgbackups/x", vec![], "wrong-account-path"),
            ("GET", "/pg-prodx/pgbackups/x", vec![], "wrong-account-path"),
            (
                "GET",
                "/pg-prod/pgbackups/../other/x",
                vec![],
                "ambiguous-path",
            ),
            (
                "GET",
                "/pg-prod/pgbackups/%2E%2e/other/x",
                vec![],
                "ambiguous-path",
            ),
            ("GET", "/pg-prod/pgbackups/./x", vec![], "ambiguous-path"),
            ("GET", "/pg-prod//x", vec![], "ambiguous-path"),
            ("GET", "/pg-prod/pgbackups/", vec![], "ambiguous-path"),
            (
                "GET",
                "/pg-prod/pgbackups/a%5C..%5Cb",
                vec![],
                "ambiguous-path",
            ),
            (
                "PUT",
                &format!("{c}?restype=container&comp=acl") as &str,
                vec![],
                "container-acl",
            ),
            (
                "GET",
                &format!("{c}?restype=container&comp=acl"),
                vec![],
                "container-acl",
            ),
            (
                "PUT",
                &format!("{c}?restype=container"),
                vec![("x-ms-blob-public-access", "blob")],
                "public-access",
            ),
            (
                "PUT",
                b,
                vec![(
                    "x-ms-copy-source",
                    "https://other.blob.core.windows.net/c/b",
                )],
                "copy-source",
            ),
            (
                "PUT",
                &format!("{b}?comp=block&blockid=AA%3D%3D"),
                vec![("x-ms-copy-source", "https://a/b")],
                "copy-source",
            ),
            (
                "PUT",
                b,
                vec![("x-ms-copy-source-authorization", "Bearer x")],
                "copy-source",
            ),
            (
                "DELETE",
                &format!("{c}?restype=container"),
                vec![],
                "operation-not-allowed",
            ),
            (
                "PUT",
                &format!("{c}?restype=container&comp=metadata"),
                vec![],
                "operation-not-allowed",
            ),
            (
                "PUT",
                &format!("{c}?restype=container&comp=lease"),
                vec![],
                "operation-not-allowed",
            ),
            ("GET", c, vec![], "operation-not-allowed"),
            (
                "PUT",
                &format!("{b}?comp=lease"),
                vec![],
                "operation-not-allowed",
            ),
            (
                "PUT",
                &format!("{b}?comp=properties"),
                vec![],
                "operation-not-allowed",
            ),
            (
                "PUT",
                &format!("{b}?comp=snapshot"),
                vec![],
                "operation-not-allowed",
            ),
            (
                "PUT",
                &format!("{b}?comp=tier"),
                vec![],
                "operation-not-allowed",
            ),
            (
                "PUT",
                &format!("{b}?comp=page"),
                vec![],
                "operation-not-allowed",
            ),
            (
                "PUT",
                &format!("{b}?comp=appendblock"),
                vec![],
                "operation-not-allowed",
            ),
            ("POST", b, vec![], "operation-not-allowed"),
            (
                "GET",
                &format!("{b}?restype=container"),
                vec![],
                "operation-not-allowed",
            ),
            (
                "GET",
                &format!("{c}?restype=container&comp=list&comp=acl"),
                vec![],
                "repeated-parameter",
            ),
            (
                "GET",
                &format!("{c}?restype=container&Comp=list&comp=batch"),
                vec![],
                "repeated-parameter",
            ),
        ] {
            assert_eq!(
                reason(method, target, &headers),
                expected,
                "{method} {target}"
            );
        }
    }

    #[test]
    fn resources_keep_the_path_encoding() {
        let p = parts("PUT", "/pg-prod/pgbackups/dir%20a/%C3%BC%2Bx.txt", &[]);
        let r = classify(&p, "pg-prod").unwrap();
        assert_eq!(r.resource.container, "pgbackups");
        assert_eq!(r.resource.blob, Some("dir%20a/%C3%BC%2Bx.txt"));
    }

    #[test]
    fn scope_checks_container_and_permission() {
        let scope = Scope {
            containers: vec!["pgbackups".into()],
            permissions: vec![Permission::Read, Permission::List, Permission::Write],
        };
        let check = |method: &str, target: &str| {
            let p = parts(method, target, &[]);
            scope.authorize(&classify(&p, "pg-prod").unwrap())
        };
        assert_eq!(check("PUT", "/pg-prod/pgbackups/x"), Ok(()));
        assert_eq!(
            check("GET", "/pg-prod/pgbackups?restype=container&comp=list"),
            Ok(())
        );
        assert_eq!(
            check("POST", "/pg-prod/pgbackups?restype=container&comp=batch"),
            Ok(())
        );
        let e = check("DELETE", "/pg-prod/pgbackups/x").unwrap_err();
        assert_eq!(e.reason(), "permission-denied");
        assert_eq!(
            e.to_string(),
            "delete-blob needs the delete permission, which this account does not have"
        );
        assert_eq!(
            check("GET", "/pg-prod/velero/x"),
            Err(Refusal::ContainerNotAllowed("velero".into()))
        );
        assert_eq!(
            check("GET", "/pg-prod/PGBACKUPS/x").unwrap_err().reason(),
            "container-not-allowed"
        );
        assert_eq!(
            check("GET", "/pg-prod/pg%62ackups/x").unwrap_err().reason(),
            "container-not-allowed"
        );
    }
}
