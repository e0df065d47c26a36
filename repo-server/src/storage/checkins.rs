//! Check-ins: the nonce used up, the verdict and device state recorded, the install
//! reports the device signed, and the director's decision, in one transaction.

use outpost_protocol::api::devices::{Attestation, BootEvents};
use outpost_protocol::attest::{AttestationState, DeviceHealth, Verdict};
use outpost_protocol::slot::Slot;
use sha2::{Digest, Sha256};

use super::assignments::{director_tx, Decided, DirectorView};
use super::nonces::{consume_nonce_tx, NonceRefusal};
use super::reports::{report_args, ReportSource, INSERT_REPORT};
use super::{json, parse, rfc3339_ms, InstallReport, SqlEnum, Store};
use crate::args;
use crate::error::ServerError;
use crate::storage::db::{Mode, Tx};

/// A check-in's verdict as recorded. Measured-boot events are kept only with an
/// attested one: they are what a log that replayed to an authentic quote matched. A
/// failed one keeps its reason, which names the event that is not golden.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    Attested { boot_events: Option<BootEvents> },
    Failed { reason: String },
}

impl Judged {
    pub fn verdict(&self) -> Verdict {
        match self {
            Judged::Attested { .. } => Verdict::Attested,
            Judged::Failed { .. } => Verdict::Failed,
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Judged::Attested { .. } => None,
            Judged::Failed { reason } => Some(reason),
        }
    }
}

/// One check-in's outcome, recorded with the device's state.
pub struct CheckinRecord {
    pub device_id: String,
    pub judged: Judged,
    pub slot: Slot,
    pub version: Option<String>,
    pub image_sha256: Option<String>,
    pub sbom_sha256: Option<String>,
    pub health: DeviceHealth,
    pub reports: Vec<InstallReport>,
    /// Integrity incidents the device signed (validated), each stored once.
    pub incidents: Vec<outpost_protocol::incident::IntegrityIncident>,
    /// The policy status (JSON) the device reported.
    pub policy: Option<String>,
}

/// Keeps a boot's events once however many check-ins report the same boot (a device
/// checks in every few minutes, and its events change only when it boots): the set is
/// stored under the SHA-256 of its JSON, and the attestation names that digest.
async fn store_boot_events_tx(tx: &mut dyn Tx, events: &BootEvents) -> Result<String, ServerError> {
    let text = json(events);
    let digest = hex::encode(Sha256::digest(text.as_bytes()));
    tx.execute("INSERT INTO boot_event_sets (sha256, events) VALUES (?1, ?2) ON CONFLICT DO NOTHING", args![&digest, &text]).await?;
    Ok(digest)
}

async fn record_checkin_tx(tx: &mut dyn Tx, c: &CheckinRecord, now_ms: i64) -> Result<(), ServerError> {
    let now = rfc3339_ms(now_ms);
    let boot_events = match &c.judged {
        Judged::Attested { boot_events: Some(events) } => Some(store_boot_events_tx(tx, events).await?),
        Judged::Attested { boot_events: None } | Judged::Failed { .. } => None,
    };
    let (verdict, reason) = (c.judged.verdict(), c.judged.reason());
    tx.execute(
        "INSERT INTO attestations (device_id, at, verdict, reason, slot, version, image_sha256, boot_events_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        args![&c.device_id, &now, verdict.as_sql(), reason, c.slot.as_sql(), c.version.as_deref(), c.image_sha256.as_deref(), boot_events.as_deref()],
    )
    .await?;
    tx.execute(
        "UPDATE devices SET last_checkin_at = ?1, slot = ?2, version = ?3, image_sha256 = ?4, health = ?5,
           attestation = ?6, attestation_reason = ?7, attested_at = ?1, sbom_sha256 = ?9, policy = ?10 WHERE device_id = ?8",
        args![&now, c.slot.as_sql(), c.version.as_deref(), c.image_sha256.as_deref(), c.health.as_sql(), AttestationState::from(verdict).as_sql(), reason, &c.device_id, c.sbom_sha256.as_deref(), c.policy.as_deref()],
    )
    .await?;
    for r in &c.reports {
        tx.execute(INSERT_REPORT, report_args(&now, r, ReportSource::AttestedCheckin)).await?;
    }
    for i in &c.incidents {
        super::incidents::insert_incident_tx(tx, &now, i, ReportSource::AttestedCheckin).await?;
    }
    Ok(())
}


impl Store {
    /// A whole check-in in one write transaction (one fsync): the director's decision
    /// (see [`super::assignments::director_tx`]; `decide` is the director's, run on what
    /// this transaction reads), the nonce used up, the verdict and state recorded. A
    /// refused nonce changes nothing.
    pub async fn checkin<T, F>(
        &self,
        nonce: &str,
        c: CheckinRecord,
        hardware_class: &str,
        mut decide: F,
        now_ms: i64,
    ) -> Result<Result<(T, u64), NonceRefusal>, ServerError>
    where
        F: FnMut(&DirectorView) -> Decided<T> + Send + 'static,
        T: Send + 'static,
    {
        let (nonce, hardware_class) = (nonce.to_owned(), hardware_class.to_owned());
        self.transaction(Mode::Write, move |mut tx| async move {
            // The director first: it may have to wait for other servers' decisions, and a
            // transaction that waits must hold no rows they may need.
            let decision = director_tx(tx.as_mut(), &c.device_id, &hardware_class, c.judged.verdict(), &mut decide, now_ms.div_euclid(1000)).await?;
            if let Err(r) = consume_nonce_tx(tx.as_mut(), &nonce, &c.device_id, now_ms).await? {
                return Ok(Err(r));
            }
            record_checkin_tx(tx.as_mut(), &c, now_ms).await?;
            tx.commit().await?;
            Ok(Ok(decision))
        })
        .await
    }

    pub async fn attestations(&self, device_id: &str, limit: u32) -> Result<Vec<Attestation>, ServerError> {
        let rows = self
            .query(
                "SELECT a.at, a.verdict, a.reason, a.slot, a.version, a.image_sha256, b.events FROM attestations a
                 LEFT JOIN boot_event_sets b ON b.sha256 = a.boot_events_sha256 WHERE a.device_id = ?1 ORDER BY a.id DESC LIMIT ?2",
                args![device_id, limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Attestation {
                    at: r.text(0)?,
                    verdict: Verdict::from_sql("attestations.verdict", &r.text(1)?)?,
                    reason: r.opt_text(2)?,
                    slot: r.opt_text(3)?.map(|s| Slot::from_sql("attestations.slot", &s)).transpose()?,
                    version: r.opt_text(4)?,
                    image_sha256: r.opt_text(5)?,
                    boot_events: r.opt_text(6)?.map(|t| parse::<BootEvents>("attestations' boot_event_sets.events", &t)).transpose()?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use outpost_protocol::api::devices::{BootEvent, Role};
    use outpost_protocol::attest::DeviceHealth;

    use super::*;
    use crate::storage::schema::ALTERATIONS;
    use crate::storage::testing::{add_devices, ok, on_both_backends};
    use crate::storage::{Backend, DirectorChanges, NonceIssue};

    on_both_backends! {
        boot_events_are_kept_once_per_boot_and_only_with_an_attested_check_in;
        a_database_from_before_boot_events_migrates_and_keeps_its_attestations;
    }

    const NOW: i64 = 1_800_000_000_000;

    fn boot(kernel_sha256: &str) -> BootEvents {
        let event = |record, pcr, text: Option<&str>, sha256: &str, golden| BootEvent {
            record,
            pcr,
            event_type: "EV_IPL".into(),
            text: text.map(str::to_owned),
            sha256: sha256.into(),
            golden,
        };
        BootEvents {
            events: vec![
                event(29, 4, None, &"46".repeat(32), Role::Bootloader("BOOTX64.EFI".into())),
                event(56, 9, Some("/boot/vmlinuz"), kernel_sha256, Role::Kernel("vmlinuz".into())),
                event(57, 8, Some("kernel_cmdline: /boot/vmlinuz ro"), &"ee".repeat(32), Role::KernelCmdline),
            ],
            omitted: 0,
        }
    }

    /// One check-in of `device` judged `judged`, through the store's whole check-in.
    async fn check_in(s: &Store, device: &str, judged: Judged) {
        let nonce = match ok(s.issue_nonce(device, NOW + 60_000, NOW).await) {
            NonceIssue::Issued(n) => n,
            other => panic!("no nonce: {other:?}"),
        };
        let record = CheckinRecord {
            device_id: device.to_owned(),
            judged,
            slot: Slot::A,
            version: Some("1.0.0".into()),
            image_sha256: Some("11".repeat(32)),
            sbom_sha256: None,
            health: DeviceHealth::Healthy,
            reports: vec![],
            incidents: vec![],
            policy: None,
        };
        let decided = s.checkin(&nonce, record, "rpi4", |_| Ok((DirectorChanges::default(), ())), NOW).await;
        assert!(ok(decided).is_ok(), "the nonce was fresh");
    }

    async fn stored_sets(s: &Store) -> i64 {
        let n = s.transaction(Mode::Read, move |mut tx| async move { tx.one("SELECT count(*) FROM boot_event_sets", args![]).await?.int(0) });
        ok(n.await)
    }

    async fn boot_events_are_kept_once_per_boot_and_only_with_an_attested_check_in(b: Backend) {
        let s = ok(Store::open(&b).await);
        add_devices(&s, ["dev-a".to_owned(), "dev-b".to_owned()].into_iter()).await;
        let first = boot(&"3d".repeat(32));
        check_in(&s, "dev-a", Judged::Attested { boot_events: Some(first.clone()) }).await;
        check_in(&s, "dev-a", Judged::Attested { boot_events: Some(first.clone()) }).await;
        // Another device booting the same release: the same events, kept once.
        check_in(&s, "dev-b", Judged::Attested { boot_events: Some(first.clone()) }).await;
        assert_eq!(stored_sets(&s).await, 1, "the same boot is stored once");
        check_in(&s, "dev-a", Judged::Failed { reason: "record 56 (PCR 9): not the golden kernel".into() }).await;
        // An agent-measured class: attested, no boot events.
        check_in(&s, "dev-a", Judged::Attested { boot_events: None }).await;
        let rebooted = boot(&"4e".repeat(32));
        check_in(&s, "dev-a", Judged::Attested { boot_events: Some(rebooted.clone()) }).await;
        assert_eq!(stored_sets(&s).await, 2);
        let rows = ok(s.attestations("dev-a", 10).await);
        let shown: Vec<(Verdict, Option<BootEvents>)> = rows.into_iter().map(|a| (a.verdict, a.boot_events)).collect();
        assert_eq!(
            shown,
            vec![
                (Verdict::Attested, Some(rebooted)),
                (Verdict::Attested, None),
                (Verdict::Failed, None),
                (Verdict::Attested, Some(first.clone())),
                (Verdict::Attested, Some(first.clone())),
            ]
        );
        assert_eq!(ok(s.attestations("dev-b", 10).await).first().and_then(|a| a.boot_events.clone()), Some(first));
        // A stored set that is not BootEvents is an error naming where it is.
        ok(s.execute("UPDATE boot_event_sets SET events = '{\"events\": 1}'", args![]).await);
        let broken = s.attestations("dev-b", 10).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(broken.contains("boot_event_sets.events"), "{broken}");
    }

    /// The schema before boot events (version 5): its tables as that server made them.
    const BEFORE_BOOT_EVENTS: [&str; 5] = [ALTERATIONS[0], ALTERATIONS[1], ALTERATIONS[2], ALTERATIONS[3], ALTERATIONS[4]];

    async fn a_database_from_before_boot_events_migrates_and_keeps_its_attestations(b: Backend) {
        let old = ok(Store::open_migrated(&b, &BEFORE_BOOT_EVENTS).await);
        add_devices(&old, std::iter::once("dev-a".to_owned())).await;
        ok(old
            .execute(
                "INSERT INTO attestations (device_id, at, verdict, reason, slot, version, image_sha256) VALUES ('dev-a', 'then', 'attested', NULL, 'B', '0.9.0', 'cd')",
                args![],
            )
            .await);
        let no_column = old.execute("UPDATE attestations SET boot_events_sha256 = NULL", args![]).await;
        assert!(no_column.is_err(), "the old schema has no boot events");
        drop(old);
        let s = ok(Store::open(&b).await);
        let events = boot(&"3d".repeat(32));
        check_in(&s, "dev-a", Judged::Attested { boot_events: Some(events.clone()) }).await;
        let rows = ok(s.attestations("dev-a", 10).await);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].boot_events.as_ref(), rows[0].slot), (Some(&events), Some(Slot::A)));
        assert_eq!((rows[1].boot_events.as_ref(), rows[1].version.as_deref(), rows[1].slot), (None, Some("0.9.0"), Some(Slot::B)));
    }
}
