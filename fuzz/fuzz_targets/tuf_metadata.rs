//! TUF metadata as any mirror or man in the middle can send it (protocol/src/tuf):
//! the envelope and each role's schema, a root as the start of a trusted set, a
//! director root, and what the agent reads out of parsed targets (delegation
//! patterns and hash bins, Outpost's custom metadata, consistent-snapshot names).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_fuzz::now;
use outpost_protocol::pattern::{path_matches, pattern_may_match_prefix};
use outpost_protocol::release::FirmwareCustom;
use outpost_protocol::tuf::{quote_role, quote_target_path, Envelope, Root, Snapshot, Targets, Timestamp, TrustedSet};

fuzz_target!(|data: &[u8]| {
    if let Ok(root) = Envelope::<Root>::parse(data, "root") {
        for name in ["root", "timestamp", "snapshot", "targets"] {
            let _ = root.signed.role(name);
        }
        let _ = root.is_expired(now());
    }
    let _ = TrustedSet::new(data, now());
    let _ = outpost_protocol::director::check_first_root(data);
    if let Ok(ts) = Envelope::<Timestamp>::parse(data, "timestamp") {
        let meta = ts.signed.snapshot_meta();
        let _ = meta.verify(data, "snapshot.json");
    }
    if let Ok(snap) = Envelope::<Snapshot>::parse(data, "snapshot") {
        for (name, meta) in &snap.signed.meta {
            let _ = meta.verify(name.as_bytes(), name);
        }
    }
    let Ok(targets) = Envelope::<Targets>::parse(data, "targets") else { return };
    let t = &targets.signed;
    for (path, file) in &t.targets {
        let _ = file.naming_hash();
        let _ = quote_target_path(path);
        if let Ok(Some(custom)) = FirmwareCustom::from_custom(file.custom.as_ref(), path) {
            let _ = custom.validate(path);
            let _ = custom.to_custom();
        }
        if let Some(d) = &t.delegations {
            for (role, _terminating) in d.roles_for_target(path) {
                let _ = quote_role(&role);
                let _ = d.role_keys(&role);
            }
        }
    }
    if let Some(d) = &t.delegations {
        for r in d.roles.iter().flatten() {
            let _ = d.role_keys(&r.name);
            for pattern in r.paths.iter().flatten() {
                for path in t.targets.keys() {
                    let _ = path_matches(pattern, path);
                    let segments: Vec<&str> = path.split('/').collect();
                    let _ = pattern_may_match_prefix(pattern, &segments[..segments.len().saturating_sub(1)]);
                }
            }
        }
        if let Some(s) = &d.succinct_roles {
            for path in t.targets.keys() {
                let bin = s.role_for_target(path);
                assert!(s.is_delegated_role(&bin), "hash bin {bin} of {path} is not one of its own bins");
            }
        }
    }
});
