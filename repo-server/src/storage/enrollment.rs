//! Enrollment: one-time tokens for a hardware class, challenges made for them, and the
//! device recorded when it proves its TPM holds the attestation key.

use super::{hash_token, random_hex, rfc3339, ChallengeState, SqlEnum, Store};
use crate::storage::db::{Mode, Tx};
use crate::args;
use crate::error::ServerError;

/// A new enrollment challenge, before the device proves it.
pub struct NewChallenge<'a> {
    pub id: &'a str,
    pub token: &'a str,
    pub device_id: &'a str,
    pub hardware_class: &'a str,
    pub ek_public: &'a [u8],
    pub ek_certificate: Option<&'a [u8]>,
    pub ak_public: &'a [u8],
    pub secret_sha256: &'a str,
    pub expires_at: i64,
}

/// Why an enrollment step is refused (each maps to an API error).
#[derive(Debug)]
pub enum EnrollRefusal {
    UnknownToken,
    TokenUsed,
    TokenExpired(i64),
    WrongClass { token: String },
    UnknownChallenge,
    ChallengeClosed(ChallengeState),
    ChallengeExpired,
    WrongSecret,
}

impl Store {
    /// A one-time enrollment token for `hardware_class`, valid until `expires_at` (Unix s).
    /// The device enrolled with it gets `labels`.
    pub async fn create_enrollment_token(
        &self,
        hardware_class: &str,
        labels: &std::collections::BTreeMap<String, String>,
        created_by: &str,
        expires_at: i64,
    ) -> Result<String, ServerError> {
        let token = format!("ote_{}", random_hex()?);
        let labels = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        self.execute(
            "INSERT INTO enrollment_tokens (token_sha256, hardware_class, created_by, created_at, expires_at, labels) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            args![hash_token(&token), hardware_class, created_by, chrono::Utc::now().to_rfc3339(), expires_at, labels],
        )
        .await?;
        Ok(token)
    }

    /// Whether an enrollment token may be used now for `hardware_class`.
    async fn enrollment_token_refusal(tx: &mut dyn Tx, token: &str, hardware_class: &str, now: i64) -> Result<Option<EnrollRefusal>, ServerError> {
        let row = tx.opt("SELECT hardware_class, expires_at, used_at FROM enrollment_tokens WHERE token_sha256 = ?1", args![hash_token(token)]).await?;
        let Some(r) = row else { return Ok(Some(EnrollRefusal::UnknownToken)) };
        let (class, exp, used) = (r.text(0)?, r.int(1)?, r.opt_text(2)?);
        Ok(if used.is_some() {
            Some(EnrollRefusal::TokenUsed)
        } else if exp <= now {
            Some(EnrollRefusal::TokenExpired(exp))
        } else if class != hardware_class {
            Some(EnrollRefusal::WrongClass { token: class })
        } else {
            None
        })
    }

    /// Whether an enrollment token may be used now for `hardware_class` (checked before
    /// any expensive work; `open_challenge` checks again).
    pub async fn check_enrollment_token(&self, token: &str, hardware_class: &str, now: i64) -> Result<Result<(), EnrollRefusal>, ServerError> {
        let (token, hardware_class) = (token.to_owned(), hardware_class.to_owned());
        self.transaction(Mode::Read, move |mut tx| async move {
            Ok(match Self::enrollment_token_refusal(tx.as_mut(), &token, &hardware_class, now).await? {
                Some(r) => Err(r),
                None => Ok(()),
            })
        })
        .await
    }

    /// Checks an enrollment token (unused, unexpired, for this class) and records the
    /// challenge made for it. The token is consumed only when the device proves itself.
    pub async fn open_challenge(&self, c: &NewChallenge<'_>, now: i64) -> Result<Result<(), EnrollRefusal>, ServerError> {
        let (token, hardware_class) = (c.token.to_owned(), c.hardware_class.to_owned());
        let insert = args![c.id, hash_token(c.token), c.device_id, c.hardware_class, c.ek_public, c.ek_certificate, c.ak_public, c.secret_sha256, c.expires_at];
        self.transaction(Mode::Shared, move |mut tx| async move {
            if let Some(r) = Self::enrollment_token_refusal(tx.as_mut(), &token, &hardware_class, now).await? {
                return Ok(Err(r));
            }
            tx.execute(
                "INSERT INTO enrollment_challenges (id, token_sha256, device_id, hardware_class, ek_public, ek_certificate, ak_public, secret_sha256, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                insert,
            )
            .await?;
            tx.commit().await?;
            Ok(Ok(()))
        })
        .await
    }

    /// Completes a challenge with the secret the device's TPM recovered: in one
    /// transaction the challenge closes, the token is consumed and the device is
    /// recorded (a re-enrolled device gets its new AK and starts over as pending).
    /// A wrong secret closes the challenge for good.
    pub async fn complete_challenge(&self, id: &str, secret_sha256: &str, now: i64) -> Result<Result<(String, String), EnrollRefusal>, ServerError> {
        let (id, secret_sha256) = (id.to_owned(), secret_sha256.to_owned());
        self.transaction(Mode::Shared, move |mut tx| async move {
            let id = id.as_str();
            let row = tx
                .opt(
                    "SELECT token_sha256, device_id, hardware_class, ek_public, ek_certificate, ak_public, secret_sha256, expires_at, state
                     FROM enrollment_challenges WHERE id = ?1",
                    args![id],
                )
                .await?;
            let Some(r) = row else { return Ok(Err(EnrollRefusal::UnknownChallenge)) };
            let (token, device_id, class) = (r.text(0)?, r.text(1)?, r.text(2)?);
            let (ek, ek_cert, ak, want, expires) = (r.blob(3)?, r.opt_blob(4)?, r.blob(5)?, r.text(6)?, r.int(7)?);
            let state = ChallengeState::from_sql("enrollment_challenges.state", &r.text(8)?)?;
            if state != ChallengeState::Open {
                return Ok(Err(EnrollRefusal::ChallengeClosed(state)));
            }
            if expires <= now {
                return Ok(Err(EnrollRefusal::ChallengeExpired));
            }
            if want != secret_sha256 {
                tx.execute("UPDATE enrollment_challenges SET state = 'failed' WHERE id = ?1", args![id]).await?;
                tx.commit().await?;
                return Ok(Err(EnrollRefusal::WrongSecret));
            }
            let consumed = tx
                .execute(
                    "UPDATE enrollment_tokens SET used_at = ?1, used_by = ?2 WHERE token_sha256 = ?3 AND used_at IS NULL",
                    args![rfc3339(now), &device_id, &token],
                )
                .await?;
            if consumed != 1 {
                return Ok(Err(EnrollRefusal::TokenUsed));
            }
            tx.execute("UPDATE enrollment_challenges SET state = 'completed' WHERE id = ?1", args![id]).await?;
            let labels = tx.one("SELECT labels FROM enrollment_tokens WHERE token_sha256 = ?1", args![&token]).await?.text(0)?;
            tx.execute(
                "INSERT INTO devices (device_id, hardware_class, ek_public, ek_certificate, ak_public, enrolled_at, labels) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (device_id) DO UPDATE SET hardware_class = excluded.hardware_class, ek_certificate = excluded.ek_certificate,
                   ak_public = excluded.ak_public, enrolled_at = excluded.enrolled_at, attestation = 'pending', attestation_reason = NULL,
                   labels = excluded.labels",
                args![&device_id, &class, &ek, ek_cert.as_ref(), &ak, rfc3339(now), labels],
            )
            .await?;
            tx.commit().await?;
            Ok(Ok((device_id, class)))
        })
        .await
    }
}
