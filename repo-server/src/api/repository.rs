//! The pipeline's repository API: status, target uploads into staging, and publishing
//! offline-signed metadata.

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use outpost_protocol::api::repository::{PublishOutcome, PublishRequest, RepositoryStatus, StagedTarget};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{ApiError, ApiJson, AppState, Auth};
use crate::error::ServerError;
use crate::repository::PublishError;
use crate::storage::TokenRole;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/repository", get(status))
        .route("/api/v1/targets", post(upload_target).layer(DefaultBodyLimit::disable()))
        .route("/api/v1/publish", post(publish).layer(DefaultBodyLimit::max(256 << 20)))
}

async fn status(State(s): State<AppState>, _auth: Auth) -> Json<RepositoryStatus> {
    Json(s.repo.status().await)
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    path: Option<String>,
}

/// Streams one target file into staging, hashing as it arrives. The file becomes
/// visible only when signed metadata naming its sha256 is published.
async fn upload_target(
    State(s): State<AppState>,
    auth: Auth,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Json<StagedTarget>, ApiError> {
    auth.require(TokenRole::Pipeline)?;
    let dir = s.repo.staging_dir().to_owned();
    let mut rnd = [0u8; 8];
    getrandom::getrandom(&mut rnd).map_err(|e| ServerError::State(e.to_string()))?;
    let tmp = dir.join(format!("upload-{}.part", hex::encode(rnd)));
    let result = async {
        let file = tokio::fs::File::create(&tmp).await.map_err(|e| ServerError::io("create", &tmp, e))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut length: u64 = 0;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad_request("upload_interrupted", format!("upload body broke off after {length} bytes: {e}")))?;
            length += chunk.len() as u64;
            if length > s.max_upload_bytes {
                return Err(ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("target is larger than max_upload_bytes ({})", s.max_upload_bytes),
                ));
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(|e| ServerError::io("write", &tmp, e))?;
        }
        out.flush().await.map_err(|e| ServerError::io("write", &tmp, e))?;
        out.get_ref().sync_all().await.map_err(|e| ServerError::io("fsync", &tmp, e))?;
        let sha256 = hex::encode(hasher.finalize());
        let dest = dir.join(&sha256);
        tokio::fs::rename(&tmp, &dest).await.map_err(|e| ServerError::io("rename", &dest, e))?;
        Ok::<_, ApiError>((sha256, length))
    }
    .await;
    match result {
        Ok((sha256, length)) => {
            tracing::info!(path = q.path.as_deref().unwrap_or(""), %sha256, length, by = %auth.0.name, "target uploaded to staging");
            Ok(Json(StagedTarget { sha256, length }))
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

async fn publish(State(s): State<AppState>, auth: Auth, ApiJson(body): ApiJson<PublishRequest>) -> Result<Json<PublishOutcome>, ApiError> {
    auth.require(TokenRole::Pipeline)?;
    match s.repo.publish(&body.roots, &body.roles, chrono::Utc::now()).await {
        Ok(outcome) => {
            s.store.log(&auth.0.name, "publish", &outcome).await?;
            crate::fleet::sbom::index_release_sboms(&s.repo, &s.store).await;
            tracing::info!(by = %auth.0.name, roles = ?outcome.roles, snapshot = outcome.snapshot_version, "published");
            Ok(Json(outcome))
        }
        Err(PublishError::Refused { code, message }) => {
            tracing::warn!(by = %auth.0.name, code, %message, "publish refused");
            Err(ApiError::unprocessable(code, message))
        }
        Err(PublishError::Internal(e)) => Err(e.into()),
    }
}
