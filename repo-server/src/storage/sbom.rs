//! The SBOM index: components of every signed release, searched by name or purl.

use outpost_protocol::attest::AttestationState;
use outpost_protocol::api::sbom::{SbomDevice, SbomHit};

use super::{SqlEnum, Store};
use crate::storage::db::Mode;
use crate::args;
use crate::error::ServerError;

/// A release whose SBOM is indexed.
#[derive(Debug, Clone)]
pub struct SbomRelease {
    pub sbom_sha256: String,
    pub target: String,
    pub hardware_class: String,
    pub version: String,
    pub image_sha256: String,
}

/// What [`Store::sbom_search`] found: releases and the devices running them.
#[derive(Debug, Clone)]
pub struct SbomSearch {
    pub releases: Vec<SbomHit>,
    pub devices: Vec<SbomDevice>,
}

/// `sbom_components.purl_base` of a component whose purl cannot be read (no canonical
/// purl starts with `-`): every purl search considers these, since any of them may be
/// the package searched for. NULL is a component without a purl.
const UNREADABLE_PURL: &str = "-";

impl Store {
    pub async fn sbom_indexed(&self, sbom_sha256: &str) -> Result<bool, ServerError> {
        Ok(!self.query("SELECT 1 FROM sbom_releases WHERE sbom_sha256 = ?1", args![sbom_sha256]).await?.is_empty())
    }

    /// Records one release's SBOM components (one transaction; idempotent per SBOM).
    pub async fn index_sbom(&self, r: &SbomRelease, components: &[outpost_sbom::ComponentRef]) -> Result<(), ServerError> {
        let (r, components) = (r.clone(), components.to_vec());
        self.transaction(Mode::Shared, move |mut tx| async move {
            let fresh = tx
                .execute(
                    "INSERT INTO sbom_releases (sbom_sha256, target, hardware_class, version, image_sha256, components, indexed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
                    args![&r.sbom_sha256, &r.target, &r.hardware_class, &r.version, &r.image_sha256, components.len() as i64, chrono::Utc::now().to_rfc3339()],
                )
                .await?;
            if fresh == 1 {
                for c in &components {
                    let base = c.purl.as_deref().map(|p| outpost_sbom::query::purl_base(p).unwrap_or_else(|_| UNREADABLE_PURL.to_owned()));
                    tx.execute(
                        "INSERT INTO sbom_components (sbom_sha256, name, version, purl, purl_base) VALUES (?1, ?2, ?3, ?4, ?5)",
                        args![&r.sbom_sha256, &c.name, c.version.as_deref(), c.purl.as_deref(), base],
                    )
                    .await?;
                }
            }
            tx.commit().await
        })
        .await
    }

    /// Releases whose SBOM has a component matching `query`, and the devices whose
    /// attested image is one of those releases. The rows SQL finds are decided by
    /// [`outpost_sbom::query::Query::check`], as on devices; a component that cannot be
    /// decided is kept, with the reason in [`SbomHit::undecided`].
    pub async fn sbom_search(&self, query: &outpost_sbom::query::Query) -> Result<SbomSearch, ServerError> {
        use outpost_sbom::query::{Match, Subject};
        let query = query.clone();
        self.transaction(Mode::Shared, move |mut tx| async move {
            let (sql, args) = match &query.subject {
                Subject::Name(n) => (
                    "SELECT c.name, c.version, c.purl, r.sbom_sha256, r.target, r.hardware_class, r.version, r.image_sha256
                     FROM sbom_components c JOIN sbom_releases r ON r.sbom_sha256 = c.sbom_sha256 WHERE c.name = ?1",
                    args![n.as_str()],
                ),
                // A purl that cannot be read may be this one.
                Subject::Purl { base, .. } => (
                    "SELECT c.name, c.version, c.purl, r.sbom_sha256, r.target, r.hardware_class, r.version, r.image_sha256
                     FROM sbom_components c JOIN sbom_releases r ON r.sbom_sha256 = c.sbom_sha256 WHERE c.purl_base IN (?1, ?2)",
                    args![base.as_str(), UNREADABLE_PURL],
                ),
            };
            let rows = tx.query(sql, args).await?;
            let mut releases: Vec<SbomHit> = Vec::new();
            for r in rows {
                let component = outpost_sbom::ComponentRef { name: r.text(0)?, version: r.opt_text(1)?, purl: r.opt_text(2)? };
                let undecided = match query.check(&component) {
                    Match::No => continue,
                    Match::Yes => None,
                    Match::Undecided(why) => Some(why),
                };
                releases.push(SbomHit {
                    component: component.name,
                    component_version: component.version,
                    purl: component.purl,
                    sbom_sha256: r.text(3)?,
                    target: r.text(4)?,
                    hardware_class: r.text(5)?,
                    version: r.text(6)?,
                    image_sha256: r.text(7)?,
                    undecided,
                });
            }
            let mut devices = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            for rel in &releases {
                if !seen.insert(rel.image_sha256.clone()) {
                    continue;
                }
                let rows = tx
                    .query(
                        "SELECT device_id, hardware_class, version, attestation FROM devices WHERE image_sha256 = ?1 ORDER BY device_id",
                        args![&rel.image_sha256],
                    )
                    .await?;
                for r in rows {
                    devices.push(SbomDevice {
                        device_id: r.text(0)?,
                        hardware_class: r.text(1)?,
                        version: r.opt_text(2)?,
                        quarantined: AttestationState::from_sql("devices.attestation", &r.text(3)?)? == AttestationState::Failed,
                        release: rel.target.clone(),
                    });
                }
            }
            Ok(SbomSearch { releases, devices })
        })
        .await
    }
}
