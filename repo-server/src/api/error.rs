//! HTTP error answers: a status, a stable machine-readable code and a message naming
//! what is wrong. Every refusal type of the layers below converts into one here, so
//! handlers use `?`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_protocol::api::ErrorBody;

use crate::error::ServerError;
use crate::fleet::Refusal;
use crate::repository::PublishError;
use crate::storage::{EnrollRefusal, NonceRefusal};

/// An HTTP error answer: `{"code": "...", "message": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        // Internal details are logged once here and shown to clients generically.
        tracing::error!(error = %e, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error; see server logs")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { code: self.code.to_owned(), message: self.message })).into_response()
    }
}

impl From<EnrollRefusal> for ApiError {
    fn from(r: EnrollRefusal) -> Self {
        let rfc3339 = crate::fleet::rfc3339;
        match r {
            EnrollRefusal::UnknownToken => ApiError::unauthorized("unknown enrollment token"),
            EnrollRefusal::TokenUsed => ApiError::conflict("token_used", "enrollment token was already used"),
            EnrollRefusal::TokenExpired(at) => ApiError::new(StatusCode::UNAUTHORIZED, "token_expired", format!("enrollment token expired at {}", rfc3339(at))),
            EnrollRefusal::WrongClass { token } => {
                ApiError::forbidden(format!("enrollment token is for hardware class {token:?}, not the class this device claims"))
            }
            EnrollRefusal::UnknownChallenge => ApiError::new(StatusCode::NOT_FOUND, "unknown_challenge", "no such enrollment challenge"),
            EnrollRefusal::ChallengeClosed(state) => ApiError::conflict("challenge_closed", format!("enrollment challenge is already {}", state.as_str())),
            EnrollRefusal::ChallengeExpired => ApiError::new(StatusCode::GONE, "challenge_expired", "enrollment challenge expired; enroll again"),
            EnrollRefusal::WrongSecret => ApiError::forbidden(
                "credential activation failed: the secret does not match, so the attestation key is not resident in the TPM of this endorsement key",
            ),
        }
    }
}

impl From<NonceRefusal> for ApiError {
    fn from(r: NonceRefusal) -> Self {
        match r {
            NonceRefusal::Unknown => ApiError::new(StatusCode::UNAUTHORIZED, "unknown_nonce", "nonce was not issued by this server"),
            NonceRefusal::OtherDevice => ApiError::new(StatusCode::UNAUTHORIZED, "foreign_nonce", "nonce was issued to another device"),
            NonceRefusal::Used => ApiError::conflict("nonce_used", "nonce was already used: a replayed check-in"),
            NonceRefusal::Expired(at) => ApiError::new(StatusCode::UNAUTHORIZED, "nonce_expired", format!("nonce expired at {}", crate::fleet::rfc3339_ms(at))),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Invalid { code, message } => ApiError::unprocessable(code, message),
            Refusal::Unauthenticated { code, message } => ApiError::new(StatusCode::UNAUTHORIZED, code, message),
            Refusal::Forbidden { code, message } => ApiError::new(StatusCode::FORBIDDEN, code, message),
            Refusal::NotFound { code, message } => ApiError::new(StatusCode::NOT_FOUND, code, message),
            Refusal::TooMany { code, message } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message),
            Refusal::Enroll(r) => r.into(),
            Refusal::Nonce(r) => r.into(),
            Refusal::Internal(e) => e.into(),
        }
    }
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Refused { code, message } => ApiError::unprocessable(code, message),
            PublishError::Internal(e) => e.into(),
        }
    }
}
