//! The fleet's SBOM index: components of every signed release's SBOM, kept in the
//! store and searched by name or purl with an optional version range, answering which
//! releases contain a component and which devices (by attested image digest) run them;
//! and the signed deny-list's view of the fleet.

use outpost_protocol::api::sbom::{AffectedAnswer, AffectedEntry, DenylistEntry, DenylistRef, DenylistStatus};

use super::Refusal;
use crate::error::ServerError;
use crate::repository::Repository;
use crate::storage::{SbomRelease, SbomSearch, Store};

/// Indexes the SBOMs of signed releases not indexed yet; returns how many were added.
/// An SBOM that cannot be read or parsed is logged and skipped (it was validated when
/// published; the release stays installable).
pub async fn index_release_sboms(repo: &Repository, store: &Store) -> usize {
    let mut added = 0;
    for (target, class, version, image_sha256, sref) in repo.sbom_refs().await {
        match store.sbom_indexed(&sref.sha256).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "SBOM index lookup failed");
                continue;
            }
        }
        let file = repo.target_file(&sref.path, &sref.sha256);
        let summary = match std::fs::read(&file).map_err(|e| e.to_string()).and_then(|b| outpost_sbom::validate(&b).map_err(|e| e.to_string())) {
            Ok(s) => s,
            Err(reason) => {
                tracing::warn!(sbom = %sref.path, %reason, "cannot index SBOM");
                continue;
            }
        };
        let rel = SbomRelease { sbom_sha256: sref.sha256.clone(), target, hardware_class: class, version, image_sha256 };
        match store.index_sbom(&rel, &summary.packages).await {
            Ok(()) => {
                added += 1;
                tracing::info!(sbom = %sref.path, components = summary.packages.len(), "SBOM indexed");
            }
            Err(e) => tracing::error!(sbom = %sref.path, error = %e, "SBOM index write failed"),
        }
    }
    added
}

/// Keeps the releases the signed metadata offers now: the index remembers every SBOM
/// it read, and a release whose role was revoked (or whose path the delegations no
/// longer give it) is no longer a signed release. Devices found by image digest stay:
/// a device may still run it.
pub async fn only_signed(repo: &Repository, found: &mut SbomSearch) {
    let signed: std::collections::BTreeSet<String> = repo.sbom_refs().await.into_iter().map(|(.., sref)| sref.sha256).collect();
    found.releases.retain(|r| signed.contains(&r.sbom_sha256));
}

/// The signed deny-list's `affected` entries with what each hits: (sha256 of the
/// deny-list, [(entry, search result)]), or None when none is published. A component
/// whose version cannot be placed against an entry's range is among the hits (with
/// `undecided` saying why), as the device counts it: the views and the rollout gate
/// fail closed like the device does.
pub async fn affected_entries(repo: &Repository, store: &Store) -> Result<Option<(String, Vec<(outpost_sbom::denylist::Entry, SbomSearch)>)>, Refusal> {
    let target = outpost_sbom::denylist::DENYLIST_TARGET;
    let Some(sha) = repo.target_sha256(target).await else { return Ok(None) };
    let bytes = std::fs::read(repo.target_file(target, &sha)).map_err(|e| ServerError::io("read", target, e))?;
    let list = outpost_sbom::denylist::DenyList::parse(&bytes).map_err(|e| Refusal::invalid("invalid_denylist", e.to_string()))?;
    let mut out = Vec::new();
    for e in list.entries.into_iter().filter(|e| e.status == outpost_sbom::denylist::Status::Affected) {
        let query = e.query().map_err(|err| Refusal::invalid("invalid_denylist", err.to_string()))?;
        let mut found = store.sbom_search(&query).await?;
        only_signed(repo, &mut found).await;
        out.push((e, found));
    }
    Ok(Some((sha, out)))
}

/// Device id -> the deny-list entries whose affected releases it runs.
pub async fn vulnerable_devices(repo: &Repository, store: &Store) -> Result<std::collections::BTreeMap<String, Vec<String>>, Refusal> {
    let mut map: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for (entry, found) in affected_entries(repo, store).await?.map(|(_, e)| e).unwrap_or_default() {
        for d in found.devices {
            let ids = map.entry(d.device_id).or_default();
            if !ids.contains(&entry.id) {
                ids.push(entry.id.clone());
            }
        }
    }
    Ok(map)
}

/// Releases (signed now) with a component matching `query`, and the devices running them.
pub async fn search(repo: &Repository, store: &Store, query: &outpost_sbom::query::Query) -> Result<SbomSearch, ServerError> {
    let mut result = store.sbom_search(query).await?;
    only_signed(repo, &mut result).await;
    Ok(result)
}

/// The deny-list entries affecting `release_path`, by id.
pub async fn denied(repo: &Repository, store: &Store, release_path: &str) -> Result<Vec<String>, Refusal> {
    let Some((_, entries)) = affected_entries(repo, store).await? else { return Ok(Vec::new()) };
    Ok(entries.iter().filter(|(_, found)| found.releases.iter().any(|r| r.target == release_path)).map(|(e, _)| e.id.clone()).collect())
}

/// A deny-list entry as the API shows it.
pub fn entry_view(e: outpost_sbom::denylist::Entry) -> DenylistEntry {
    use outpost_sbom::denylist::Status;
    let status = match e.status {
        Status::Affected => DenylistStatus::Affected,
        Status::NotAffected => DenylistStatus::NotAffected,
        Status::Fixed => DenylistStatus::Fixed,
        Status::UnderInvestigation => DenylistStatus::UnderInvestigation,
    };
    DenylistEntry { id: e.id, component: e.component, purl: e.purl, affected: e.affected, status, detail: e.detail }
}

/// `GET /api/v1/sbom/affected`: the signed deny-list's `affected` entries, each with the
/// releases that carry the component and the devices running them.
pub async fn affected_answer(repo: &Repository, store: &Store) -> Result<AffectedAnswer, Refusal> {
    let Some((sha, found)) = affected_entries(repo, store).await? else {
        return Ok(AffectedAnswer { denylist: None, entries: Vec::new() });
    };
    let entries = found.into_iter().map(|(e, f)| AffectedEntry { entry: entry_view(e), releases: f.releases, devices: f.devices }).collect();
    Ok(AffectedAnswer { denylist: Some(DenylistRef { target: outpost_sbom::denylist::DENYLIST_TARGET.to_owned(), sha256: sha }), entries })
}
