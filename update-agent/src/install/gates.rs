//! Gates a release passes before it is installed: its SBOM (signed, and describing the
//! release's image) and the signed vulnerability deny-list checked against the SBOM's
//! components.

use outpost_sbom::ComponentRef;
use sha2::{Digest, Sha256};

use super::journal::Release;
use super::{Installer, PassResult};
use crate::error::{AgentError, Result};
use crate::updater::{TargetInfo, Updater};

impl Installer {
    /// The signed deny-list (`security/denylist.json`, under the `security`
    /// delegation), or None when the repository has none. A deny-list that does not
    /// verify or parse is an error: nothing is installed past a broken gate.
    async fn denylist(&self, updater: &mut Updater) -> Result<Option<outpost_sbom::denylist::DenyList>> {
        let target = outpost_sbom::denylist::DENYLIST_TARGET;
        let Some(info) = updater.get_target_info(target).await? else { return Ok(None) };
        let url = updater.target_url(&info, &format!("{}/targets/", self.config.server_url))?;
        let bytes = self.fetcher.fetch_bytes(&url, info.file.length).await?;
        outpost_protocol::hashing::verify_bytes(&bytes, Some(info.file.length), Some(&info.file.hashes), target)
            .map_err(|e| AgentError::tuf(format!("verify {target}"), e))?;
        outpost_sbom::denylist::DenyList::parse(&bytes)
            .map(Some)
            .map_err(|e| AgentError::DenyListUnreadable { list: format!("{target} (signed by {})", info.role), reason: e.to_string() })
    }

    /// Defense in depth: the release is refused (`RefusedVulnerable`) when the signed
    /// deny-list lists one of its SBOM's components. None: the release may be installed.
    pub(super) async fn deny_list_gate(&self, updater: &mut Updater, components: &[ComponentRef], release: &Release) -> Result<Option<PassResult>> {
        let Some(list) = self.denylist(updater).await? else { return Ok(None) };
        // A component whose version cannot be placed against an entry's range is a
        // finding too (fail closed); its advisory says why.
        let findings = list.findings(components).map_err(|e| {
            AgentError::DenyListUnreadable { list: outpost_sbom::denylist::DENYLIST_TARGET.to_owned(), reason: e.to_string() }
        })?;
        if findings.is_empty() {
            return Ok(None);
        }
        let advisories: Vec<String> = findings.iter().map(ToString::to_string).collect();
        tracing::warn!(version = %release.version, ?advisories, "newest release is affected by the signed deny-list; not installing");
        Ok(Some(PassResult::RefusedVulnerable { version: release.version.clone(), advisories }))
    }

    /// Fetches the release's SBOM (once; kept under state_dir/sbom), checks it against
    /// its signed hash and that it describes this release's image. Returns its components.
    pub(super) async fn verify_sbom(&self, updater: &Updater, info: &TargetInfo, release: &Release) -> Result<Vec<outpost_sbom::ComponentRef>> {
        let err = |reason: String| AgentError::Sbom { release: release.target.clone(), reason };
        let dir = self.config.state_dir.join("sbom");
        let want = info.file.hashes.get("sha256").cloned().unwrap_or_default();
        let kept = dir.join(format!("{want}.cdx.json"));
        let bytes = match std::fs::read(&kept) {
            Ok(b) if hex::encode(Sha256::digest(&b)) == want => b,
            _ => {
                let url = updater.target_url(info, &format!("{}/targets/", self.config.server_url))?;
                let b = self.fetcher.fetch_bytes(&url, info.file.length).await.map_err(|e| err(e.to_string()))?;
                outpost_protocol::hashing::verify_bytes(&b, Some(info.file.length), Some(&info.file.hashes), &info.path)
                    .map_err(|e| err(format!("does not match its signed target: {e}")))?;
                b
            }
        };
        // The CycloneDX document is parsed and validated as `outpost release publish`
        // validated it (off the async workers: a rootfs SBOM lists many components).
        let (bytes, summary) = tokio::task::spawn_blocking(move || {
            let summary = outpost_sbom::validate(&bytes);
            (bytes, summary)
        })
        .await
        .map_err(|e| err(format!("validation task: {e}")))?;
        let summary = summary.map_err(|e| err(format!("{}: {e}", info.path)))?;
        if !summary.subject_sha256.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(&release.sha256)) {
            return Err(err(format!("{} does not describe the image with sha256 {}", info.path, release.sha256)));
        }
        if !kept.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| AgentError::io("create", &dir, e))?;
            outpost_fsio::write_atomic(&kept, &bytes).map_err(|e| AgentError::io("write", &kept, e))?;
        }
        tracing::info!(sbom = %info.path, sha256 = %want, "SBOM verified");
        Ok(summary.packages)
    }
}
