//! API tokens, stored hashed, and their roles.

use serde::{Deserialize, Serialize};

use super::{hash_token, random_hex, Store};
use crate::args;
use crate::error::ServerError;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Publish releases and metadata.
    Pipeline,
    /// Rollouts and devices (later issues).
    Operator,
    /// Read only.
    Viewer,
}

impl TokenRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Pipeline => "pipeline",
            TokenRole::Operator => "operator",
            TokenRole::Viewer => "viewer",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "pipeline" => Some(TokenRole::Pipeline),
            "operator" => Some(TokenRole::Operator),
            "viewer" => Some(TokenRole::Viewer),
            _ => None,
        }
    }
}

impl std::str::FromStr for TokenRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TokenRole::parse(s).ok_or_else(|| format!("unknown role {s:?} (pipeline, operator or viewer)"))
    }
}

#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: TokenRole,
}

impl Store {
    /// Creates a token and returns it; only its hash is stored.
    pub async fn create_token(&self, name: &str, role: TokenRole) -> Result<String, ServerError> {
        let token = format!("opt_{}", random_hex()?);
        self.execute(
            "INSERT INTO api_tokens (name, role, token_sha256, created_at) VALUES (?1, ?2, ?3, ?4)",
            args![name, role.as_str(), hash_token(&token), chrono::Utc::now().to_rfc3339()],
        )
        .await?;
        Ok(token)
    }

    pub async fn authenticate(&self, token: &str) -> Result<Option<Principal>, ServerError> {
        let rows = self.query("SELECT name, role FROM api_tokens WHERE token_sha256 = ?1", args![hash_token(token)]).await?;
        let Some(r) = rows.first() else { return Ok(None) };
        let (name, role) = (r.text(0)?, r.text(1)?);
        Ok(TokenRole::parse(&role).map(|role| Principal { name, role }))
    }
}
