//! The append-only audit log of publishes, re-signs and admin actions.

use outpost_protocol::api::reports::AuditEntry;

use super::Store;
use crate::args;
use crate::error::ServerError;

impl Store {
    /// Appends `actor`'s `action` with its `detail` (any value that serializes to JSON).
    pub async fn log<D: serde::Serialize + Sync + ?Sized>(&self, actor: &str, action: &str, detail: &D) -> Result<(), ServerError> {
        let detail = serde_json::to_string(detail).map_err(|e| ServerError::State(format!("audit detail of {action}: {e}")))?;
        self.execute(
            "INSERT INTO repository_log (at, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
            args![chrono::Utc::now().to_rfc3339(), actor, action, detail],
        )
        .await?;
        Ok(())
    }

    pub async fn recent_log(&self, limit: u32) -> Result<Vec<AuditEntry>, ServerError> {
        let rows = self.query("SELECT at, actor, action, detail FROM repository_log ORDER BY id DESC LIMIT ?1", args![limit]).await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: r.text(0)?,
                    actor: r.text(1)?,
                    action: r.text(2)?,
                    detail: serde_json::from_str::<serde_json::Value>(&r.text(3)?).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::on_both_backends;
    use crate::storage::Backend;

    on_both_backends! {
        the_audit_log_is_append_only;
    }

    async fn store_with(b: Backend, _devices: usize) -> Store {
        Store::open(&b).await.unwrap_or_else(|e| panic!("{e}"))
    }

    async fn the_audit_log_is_append_only(b: Backend) {
        let s = store_with(b, 0).await;
        s.log("ops", "rollout_start", &serde_json::json!({"rollout": "r"})).await.unwrap_or_else(|e| panic!("{e}"));
        for sql in ["UPDATE repository_log SET actor = 'someone else'", "DELETE FROM repository_log"] {
            let err = s.execute(sql, args![]).await.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("append-only"), "{sql}: {err}");
        }
        assert_eq!(s.recent_log(10).await.unwrap_or_default().len(), 1);
    }

}
