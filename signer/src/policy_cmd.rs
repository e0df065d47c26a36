//! `outpost policy check|publish`: validate a network-policy bundle and sign it as a
//! target of the `policy` delegation (its own keys, distinct from firmware keys).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use outpost_protocol::policy::{PolicyBundle, PolicyTargetCustom, Selector, POLICY_ROLE};
use outpost_protocol::tuf::Targets;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Result, SignerError};
use crate::output::Output;
use crate::role_edit::{pushed_note, role_for_path, target_file, RoleSignArgs};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a bundle; errors name the scope, rule and field.
    Check { file: PathBuf },
    /// Sign a bundle under the `policy` delegation (offline), then upload it when
    /// --server is given.
    Publish(PublishArgs),
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub sign: RoleSignArgs,
    /// Select devices of this hardware class (repeatable; none: every class).
    #[arg(long = "hardware-class")]
    pub hardware_classes: Vec<String>,
    /// Select devices with this label, KEY=VALUE (repeatable; all must match).
    #[arg(long = "label", value_parser = crate::device_cmd::parse_label)]
    pub labels: Vec<(String, String)>,
    /// The bundle (YAML or JSON).
    pub file: PathBuf,
}

pub async fn run(cmd: PolicyCommand, out: &Output) -> Result<()> {
    match cmd {
        PolicyCommand::Check { file } => {
            let b = read(&file)?.1;
            out.emit(
                &json!({"valid": true, "name": b.name, "version": b.version, "mode": b.mode, "not_after": b.not_after,
                        "rules": b.profile.rule_count(), "essential_rules": b.essential.rule_count()}),
                &format!("{}: valid; {} v{}, {} rule(s), essential profile {} rule(s), valid until {}", file.display(), b.name, b.version, b.profile.rule_count(), b.essential.rule_count(), b.not_after),
            );
            Ok(())
        }
        PolicyCommand::Publish(a) => publish(a, out).await,
    }
}

fn read(file: &Path) -> Result<(Vec<u8>, PolicyBundle)> {
    let bytes = std::fs::read(file).map_err(|e| SignerError::io("read", file, e))?;
    let bundle = PolicyBundle::parse(&bytes).map_err(|e| SignerError::input(file.display(), e))?;
    Ok((bytes, bundle))
}

async fn publish(a: PublishArgs, out: &Output) -> Result<()> {
    let s = a.sign.open()?;
    let (bytes, bundle) = read(&a.file)?;
    if bundle.not_after <= chrono::Utc::now() {
        return Err(SignerError::input(
            a.file.display(),
            format!("not_after {} has passed; devices would fall back to its essential profile at once", bundle.not_after),
        ));
    }
    let selector = Selector { hardware_classes: a.hardware_classes.clone(), labels: a.labels.iter().cloned().collect::<BTreeMap<_, _>>() };
    let custom = PolicyTargetCustom::from_bundle(&bundle, selector);
    let path = custom.target_path();
    let role = role_for_path(&s.repo, &path)?;
    if role != POLICY_ROLE {
        return Err(SignerError::repo(&s.repo.dir, format!(
            "{path} is not delegated to a `{POLICY_ROLE}` role in this repository (found {role}); create it with `outpost repo delegate --role {POLICY_ROLE} --paths 'policy/*/*' --delegate-key KEY ...` using keys that are not the firmware keys"
        )));
    }
    let mut body = s.role_body(&role)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    check_new_version(&s.repo.dir, &body, &bundle, &path, &sha256)?;
    let custom_json = serde_json::to_value(&custom).map_err(SignerError::encode("policy custom metadata"))?;
    body.targets.insert(path.clone(), target_file(bytes.len() as u64, &sha256, Some(custom_json)));
    let fresh = [(path.as_str(), a.file.as_path(), sha256.as_str())];
    let pushed = s.commit(&role, &mut body, &fresh, out).await?;
    out.emit(
        &json!({"target": path, "role": role, "role_version": body.version, "sha256": sha256, "length": bytes.len(), "name": bundle.name,
                "version": bundle.version, "selector": custom.selector, "not_after": bundle.not_after, "pushed": pushed}),
        &format!("signed policy {} v{} as {path} into {role} v{}{}", bundle.name, bundle.version, body.version, pushed_note(pushed.as_ref(), &s.repo)),
    );
    Ok(())
}

/// A bundle name's versions only go up, and a published path never changes content
/// (refusals name the repository `dir`).
fn check_new_version(dir: &Path, body: &Targets, bundle: &PolicyBundle, path: &str, sha256: &str) -> Result<()> {
    for (p, t) in &body.targets {
        if let Some(c) = t.custom.as_ref().and_then(|c| serde_json::from_value::<PolicyTargetCustom>(c.clone()).ok()) {
            if c.name == bundle.name && c.version >= bundle.version && p != path {
                return Err(SignerError::repo(dir, format!("policy {} version {} is already published ({p}); bump `version`", c.name, c.version)));
            }
        }
    }
    if let Some(existing) = body.targets.get(path) {
        if existing.hashes.get("sha256").map(String::as_str) != Some(sha256) {
            return Err(SignerError::repo(dir, format!("{path} is already published with different content; bump `version`")));
        }
    }
    Ok(())
}
