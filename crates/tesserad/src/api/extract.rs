//! The typed extractors every handler starts with, as in axum's `customize-extractor-error`
//! and `jwt` examples: [`Auth`] for "an authenticated principal with at least role R",
//! [`Body`], [`Param`] and [`Q`] for the JSON body, path and query with our 400 message,
//! and [`Synced`] for the read barrier. A handler's signature is its preamble:
//! `(Auth<Operator>, Param<String>, Synced, Body<NewVm>)` checks credentials first, then
//! the path, then waits for the barrier, then reads the body. [`Peer`] is the caller's
//! address.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use tessera_api::Role;

use super::auth::{authorize, Principal};
use super::{ApiError, ApiState};

/// The least role an endpoint needs, as a type.
pub trait Least: Send + Sync + 'static {
    /// The role.
    const ROLE: Role;
    /// Whether a principal whose password must change may call (only logout and the
    /// password change itself may).
    const WHILE_PASSWORD_CHANGE_REQUIRED: bool = false;
}

/// Any authenticated principal.
pub struct Auditor;
/// Operators and administrators.
pub struct Operator;
/// Administrators.
pub struct Administrator;
/// Any authenticated principal, even one that must change its password first.
pub struct Anyone;

impl Least for Auditor {
    const ROLE: Role = Role::Auditor;
}
impl Least for Operator {
    const ROLE: Role = Role::Operator;
}
impl Least for Administrator {
    const ROLE: Role = Role::Administrator;
}
impl Least for Anyone {
    const ROLE: Role = Role::Auditor;
    const WHILE_PASSWORD_CHANGE_REQUIRED: bool = true;
}

/// The authenticated caller, with at least role `R` (401 without valid credentials, 403
/// with too small a role).
pub struct Auth<R: Least>(pub Principal, PhantomData<R>);

impl<R: Least> std::ops::Deref for Auth<R> {
    type Target = Principal;
    fn deref(&self) -> &Principal {
        &self.0
    }
}

impl<R: Least> FromRequestParts<Arc<ApiState>> for Auth<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &Arc<ApiState>) -> Result<Self, ApiError> {
        let p = authorize(
            st,
            &parts.headers,
            R::ROLE,
            R::WHILE_PASSWORD_CHANGE_REQUIRED,
        )
        .await?;
        Ok(Auth(p, PhantomData))
    }
}

/// The JSON body; bad JSON, a non-object, unknown fields and wrong types are 400 with
/// serde's message (which names the field).
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &S) -> Result<Self, ApiError> {
        axum::Json::<T>::from_request(req, st)
            .await
            .map(|axum::Json(v)| Body(v))
            .map_err(|e| ApiError::bad(e.body_text()))
    }
}

/// The path parameters, or 400.
pub struct Param<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Param<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, st)
            .await
            .map(|Path(v)| Param(v))
            .map_err(|e| ApiError::bad(e.body_text()))
    }
}

/// The query parameters, or 400.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, st)
            .await
            .map(|Query(v)| Q(v))
            .map_err(|e| ApiError::bad(e.body_text()))
    }
}

/// This node's state after a read barrier: every write committed before the request is
/// visible (503 while the cluster cannot confirm it).
pub struct Synced(pub Arc<tessera_state::Node>);

impl std::ops::Deref for Synced {
    type Target = tessera_state::Node;
    fn deref(&self) -> &tessera_state::Node {
        &self.0
    }
}

impl FromRequestParts<Arc<ApiState>> for Synced {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, st: &Arc<ApiState>) -> Result<Self, ApiError> {
        super::synced(st).await.map(Synced)
    }
}

/// The caller's address, as the daemon's listener reports each connection's (see
/// [`Peer`]).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// The caller's address, when the server was started with connection info (the daemon's
/// listener is; a router driven directly, as in unit tests, has none).
pub struct Peer(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<PeerAddr>>()
                .map(|c| c.0 .0.ip()),
        ))
    }
}

/// The `Idempotency-Key` header, if any: 1 to 64 characters of `A-Za-z0-9._:-`, else 400.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(v) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyKey(None));
        };
        let ok = v.to_str().ok().filter(|k| {
            (1..=64).contains(&k.len())
                && k.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(&c))
        });
        match ok {
            Some(k) => Ok(IdempotencyKey(Some(k.to_string()))),
            None => Err(ApiError::bad(
                "Idempotency-Key: 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'",
            )),
        }
    }
}
