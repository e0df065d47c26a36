//! Single-use check-in nonces, bounded per device.

use super::{random_hex, Store};
use crate::storage::db::{Mode, Tx};
use crate::args;
use crate::error::ServerError;

/// What a nonce request came to.
#[derive(Debug, PartialEq, Eq)]
pub enum NonceIssue {
    Issued(String),
    UnknownDevice,
    /// The device has `MAX_OPEN_NONCES` unused, unexpired nonces already.
    TooMany,
}

/// Why a nonce cannot be used.
#[derive(Debug)]
pub enum NonceRefusal {
    Unknown,
    OtherDevice,
    Used,
    Expired(i64),
}

/// Unused, unexpired nonces one device may have at a time.
pub const MAX_OPEN_NONCES: i64 = 16;

pub(super) async fn consume_nonce_tx(tx: &mut dyn Tx, nonce: &str, device_id: &str, now: i64) -> Result<Result<(), NonceRefusal>, ServerError> {
    // The guarded update makes use-once hold under concurrent check-ins too.
    let used = tx
        .execute("UPDATE nonces SET used = 1 WHERE nonce = ?1 AND device_id = ?2 AND used = 0 AND expires_at > ?3", args![nonce, device_id, now])
        .await?;
    if used == 1 {
        return Ok(Ok(()));
    }
    // Refused: say why.
    let row = tx.opt("SELECT device_id, expires_at, used FROM nonces WHERE nonce = ?1", args![nonce]).await?;
    let Some(r) = row else { return Ok(Err(NonceRefusal::Unknown)) };
    let (d, exp, used) = (r.text(0)?, r.int(1)?, r.int(2)?);
    Ok(Err(if d != device_id {
        NonceRefusal::OtherDevice
    } else if used != 0 {
        NonceRefusal::Used
    } else if exp <= now {
        NonceRefusal::Expired(exp)
    } else {
        NonceRefusal::Used
    }))
}

impl Store {
    /// A single-use nonce for `device_id`, valid until `expires_at` (Unix milliseconds,
    /// like `now`). Refused for a device that is not enrolled, and for one that already
    /// has `MAX_OPEN_NONCES` unused, unexpired nonces (the endpoint is unauthenticated;
    /// this bounds what anyone can make the server store).
    pub async fn issue_nonce(&self, device_id: &str, expires_at: i64, now: i64) -> Result<NonceIssue, ServerError> {
        let nonce = random_hex()?;
        // An issued nonce lost to a power cut costs the device one retry, so this commit
        // does not wait for the disk; the check-in that uses it (and every commit after
        // it) is synced in full, which makes this one durable too.
        let device_id = device_id.to_owned();
        self.transaction(Mode::Lazy, move |mut tx| async move {
            let device_id = device_id.as_str();
            let r = tx
                .one(
                    "SELECT (SELECT count(*) FROM devices WHERE device_id = ?1),
                            (SELECT count(*) FROM nonces WHERE device_id = ?1 AND used = 0 AND expires_at > ?2)",
                    args![device_id, now],
                )
                .await?;
            if r.int(0)? == 0 {
                return Ok(NonceIssue::UnknownDevice);
            }
            if r.int(1)? >= MAX_OPEN_NONCES {
                return Ok(NonceIssue::TooMany);
            }
            tx.execute("INSERT INTO nonces (nonce, device_id, expires_at) VALUES (?1, ?2, ?3)", args![&nonce, device_id, expires_at]).await?;
            tx.commit().await?;
            Ok(NonceIssue::Issued(nonce))
        })
        .await
    }

    /// Removes nonces expired for an hour (the server's ticker calls it); the number
    /// removed.
    pub async fn purge_nonces(&self, now: i64) -> Result<u64, ServerError> {
        self.execute("DELETE FROM nonces WHERE expires_at < ?1", args![now - 3_600_000]).await
    }

    /// Uses a nonce up: it must have been issued to `device_id`, be unused and unexpired.
    pub async fn consume_nonce(&self, nonce: &str, device_id: &str, now: i64) -> Result<Result<(), NonceRefusal>, ServerError> {
        let (nonce, device_id) = (nonce.to_owned(), device_id.to_owned());
        self.transaction(Mode::Exclusive, move |mut tx| async move {
            let r = consume_nonce_tx(tx.as_mut(), &nonce, &device_id, now).await?;
            if r.is_ok() {
                tx.commit().await?;
            }
            Ok(r)
        })
        .await
    }
}
