//! Extractors: the bearer token's principal ([`Auth`]) and a JSON body that answers
//! malformed input in the API's error format ([`ApiJson`]).

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use axum::Json;

use super::{ApiError, AppState};
use crate::storage::{Principal, TokenRole};

/// A bearer token's principal.
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> header"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthorized("Authorization header must be 'Bearer <token>'"))?;
        match state.store.authenticate(token.trim()).await? {
            Some(p) => Ok(Auth(p)),
            None => Err(ApiError::unauthorized("unknown API token")),
        }
    }
}

impl Auth {
    pub(crate) fn require(&self, role: TokenRole) -> Result<(), ApiError> {
        self.require_any(&[role])
    }

    /// Passes when the token has one of `roles`.
    pub(crate) fn require_any(&self, roles: &[TokenRole]) -> Result<(), ApiError> {
        if roles.contains(&self.0.role) {
            Ok(())
        } else {
            let want: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            Err(ApiError::forbidden(format!("this needs a {} token; {:?} is a {} token", want.join(" or "), self.0.name, self.0.role.as_str())))
        }
    }

    /// Reading fleet state (devices, rollouts, audit, SBOM search): operators and viewers.
    pub(crate) fn require_reader(&self) -> Result<(), ApiError> {
        self.require_any(&[TokenRole::Operator, TokenRole::Viewer])
    }
}

/// The device CA certificate the caller's TLS connection presented, if any (None on a
/// plain listener, or in tests that drive the router without a socket).
pub struct ClientCert(pub Option<std::sync::Arc<crate::fleet::deviceca::ClientIdentity>>);

impl<S: Send + Sync> FromRequestParts<S> for ClientCert {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<crate::tls::Peer>>();
        Ok(ClientCert(peer.and_then(|p| p.0.client.clone())))
    }
}

/// JSON body extractor that answers malformed bodies in the API's error format.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(ApiError::new(rejection.status(), "invalid_body", rejection.body_text())),
        }
    }
}

