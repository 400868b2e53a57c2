//! One upstream attempt of the blob gateway: the request for the real account built from
//! the client's head and the account's [`Credential`], sent, and what a retry needs. A 401
//! with a bearer challenge is retried once with a new token, which only works for a body
//! that can be sent twice ([`Replay`]: none, or a Blob Batch, read whole anyway and
//! rewritten per attempt because every part carries the credential).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, TRANSFER_ENCODING};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Incoming};

use super::accounts::Account;
use super::batch::{self, BatchError, MAX_BATCH_BODY, PartCheck};
use super::metered::Metered;
use super::serve::{Refuse, stalled};
use super::shared_key;
use super::stall::{IdleBody, Progress};
use super::token::TokenCache;
use super::upstream::UpBody;
use super::upstream_auth::Credential;

/// A request body that can be sent again.
pub(super) enum Replay {
    /// No body.
    Empty,
    /// A Blob Batch: the client's body (rewritten again per attempt, since every part
    /// carries the credential) and its Content-Type.
    Batch(Bytes, HeaderValue),
}

/// Everything one upstream attempt is built from.
pub(super) struct Attempt<'a> {
    /// The client's head, hop-by-hop headers removed; cloned per attempt.
    pub(super) template: &'a http::request::Parts,
    /// The virtual account.
    pub(super) name: &'a str,
    /// The container in the request's path; a batch's parts must stay in it.
    pub(super) container: &'a str,
    /// Its settings.
    pub(super) account: &'a Account,
    /// The body, when it can be sent more than once.
    pub(super) replay: Option<&'a Replay>,
    /// Request-body bytes counter.
    pub(super) up: &'a Arc<AtomicU64>,
    /// The clock batch parts are checked against.
    pub(super) now: SystemTime,
    /// The request's progress: a stalled upstream ends the attempt (`bodyIdleTimeout`).
    pub(super) progress: &'a Arc<Progress>,
}

/// Splits the client's body into what can be sent twice and what streams once: a batch is
/// read whole (bounded), an empty body is replayable under a bearer credential (the only
/// one a retry is for), anything else streams.
pub(super) async fn split_body(
    parts: &http::request::Parts,
    body: IdleBody<Incoming>,
    is_batch: bool,
    credential: &Credential,
    progress: &Progress,
) -> Result<(Option<Replay>, Option<IdleBody<Incoming>>), Refuse> {
    if is_batch {
        Ok((Some(read_batch(parts, body, progress).await?), None))
    } else if matches!(credential, Credential::Bearer(_)) && body.is_end_stream() {
        Ok((Some(Replay::Empty), None))
    } else {
        Ok((None, Some(body)))
    }
}

impl Attempt<'_> {
    /// Sends the request with `credential`. On a 401 with a bearer challenge the token is
    /// dropped; when the body can be sent again, the request is retried once with a new
    /// token, and whatever that answers is the answer.
    pub(super) async fn run(
        &self,
        credential: &Credential,
        stream: Option<IdleBody<Incoming>>,
        tokens: &TokenCache,
    ) -> Result<Response<Incoming>, Refuse> {
        let response = self.send(self.request(credential, stream)?).await?;
        let (Credential::Bearer(rejected), Some(token)) =
            (credential, self.account.auth.token_entry(tokens))
        else {
            return Ok(response);
        };
        if response.status() != StatusCode::UNAUTHORIZED || !bearer_challenge(&response) {
            return Ok(response);
        }
        if self.replay.is_none() {
            token.invalidate(rejected);
            return Ok(response);
        }
        let fresh = token
            .refresh_after_rejection(rejected)
            .await
            .map_err(token_refusal)?;
        let retry = self.request(&Credential::Bearer(fresh), None)?;
        self.send(retry).await
    }

    /// Sends one request upstream; a failure to get an answer is a 502, an upstream that
    /// stops reading the body or does not begin its answer within `bodyIdleTimeout` a 504
    /// (dropping the request closes its connection), a client whose body stops a 408.
    async fn send(&self, request: Request<UpBody>) -> Result<Response<Incoming>, Refuse> {
        let progress = self.progress;
        let sent = tokio::select! {
            r = send(self.account, request, self.name) => r,
            () = progress.upstream_stalled() => return Err(stalled_refusal(progress)),
        };
        if progress.stall().is_some() {
            return Err(stalled_refusal(progress));
        }
        sent
    }

    /// The upstream request with `credential`; `stream` is the client's body when it is
    /// not replayable.
    fn request(
        &self,
        credential: &Credential,
        stream: Option<IdleBody<Incoming>>,
    ) -> Result<Request<UpBody>, Refuse> {
        let mut parts = self.template.clone();
        let body: UpBody = match (self.replay, stream) {
            (Some(Replay::Batch(client, content_type)), _) => {
                let check = PartCheck {
                    virtual_account: self.name,
                    container: self.container,
                    client_key: &self.account.client_key,
                    scope: &self.account.scope,
                    upstream: &self.account.upstream,
                    credential,
                    now: self.now,
                };
                let new_body =
                    batch::rewrite_body(client, content_type, &check).map_err(batch_refusal)?;
                parts.headers.remove(TRANSFER_ENCODING);
                parts
                    .headers
                    .insert(CONTENT_LENGTH, HeaderValue::from(new_body.len()));
                self.up.fetch_add(new_body.len() as u64, Ordering::Relaxed);
                Either::Right(Full::new(Bytes::from(new_body)))
            }
            (None, Some(body)) => Either::Left(Metered::new(body, self.up.clone())),
            _ => Either::Right(Full::new(Bytes::new())),
        };
        self.account
            .upstream
            .rewrite(&mut parts, self.name, credential)
            .map_err(|e| {
                Refuse::forbidden(shared_key::ERROR_CODE, "rewrite-failed", e.to_string())
            })?;
        Ok(Request::from_parts(parts, body))
    }
}

/// Sends one request upstream; a failure to get an answer is a 502.
async fn send(
    account: &Account,
    request: Request<UpBody>,
    name: &str,
) -> Result<Response<Incoming>, Refuse> {
    account.client.send(request).await.map_err(|e| {
        let source = std::error::Error::source(&e).map(ToString::to_string);
        tracing::warn!(account = %name, error = %e, source = ?source, "blob upstream request failed");
        Refuse {
            status: StatusCode::BAD_GATEWAY,
            code: "UpstreamUnavailable",
            reason: "upstream-failed",
            message: format!(
                "the gateway could not reach the storage account: {}",
                source.unwrap_or_else(|| e.to_string())
            ),
        }
    })
}

/// Whether a 401 carries `WWW-Authenticate: Bearer ...` (Azure Storage's challenge).
fn bearer_challenge<B>(response: &Response<B>) -> bool {
    response
        .headers()
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .any(|v| {
            v.as_bytes()
                .get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"bearer "))
        })
}

/// No token for a bearer upstream: 502, the reason in the message (no secret in it).
pub(super) fn token_refusal(e: super::token::FetchError) -> Refuse {
    Refuse {
        status: StatusCode::BAD_GATEWAY,
        code: "UpstreamUnavailable",
        reason: "token-failed",
        message: format!("the gateway has no token for the storage account: {e}"),
    }
}

/// A batch the gateway does not forward.
fn batch_refusal(e: BatchError) -> Refuse {
    let (status, code) = match &e {
        BatchError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "RequestBodyTooLarge"),
        BatchError::Auth { source, .. } => (StatusCode::FORBIDDEN, source.error_code()),
        BatchError::Refused { source, .. } => (StatusCode::FORBIDDEN, source.error_code()),
        BatchError::NotBatchable { .. }
        | BatchError::OtherContainer { .. }
        | BatchError::AmbiguousPath { .. } => {
            (StatusCode::FORBIDDEN, "AuthorizationPermissionMismatch")
        }
        _ => (StatusCode::BAD_REQUEST, "InvalidInput"),
    };
    Refuse {
        status,
        code,
        reason: e.reason(),
        message: e.to_string(),
    }
}

/// The refusal for the stall `progress` recorded (an upstream stall when the watchdog fired
/// first).
fn stalled_refusal(progress: &Progress) -> Refuse {
    stalled(
        progress.stall().unwrap_or(super::stall::Stall::Upstream),
        progress.limit(),
    )
}

/// Reads a batch body (bounded) with its Content-Type; the parts are checked and
/// rewritten per attempt.
async fn read_batch(
    parts: &http::request::Parts,
    body: IdleBody<Incoming>,
    progress: &Progress,
) -> Result<Replay, Refuse> {
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .ok_or_else(|| batch_refusal(BatchError::NoBoundary))?
        .clone();
    let bytes = Limited::new(body, MAX_BATCH_BODY)
        .collect()
        .await
        .map_err(|e| {
            if let Some(stall) = progress.stall() {
                stalled(stall, progress.limit())
            } else if e.is::<http_body_util::LengthLimitError>() {
                batch_refusal(BatchError::TooLarge)
            } else {
                batch_refusal(BatchError::Malformed("the body could not be read"))
            }
        })?
        .to_bytes();
    Ok(Replay::Batch(bytes, content_type))
}
