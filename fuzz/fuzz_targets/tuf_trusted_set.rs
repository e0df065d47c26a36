//! The trusted metadata set (protocol/src/tuf/trusted.rs) driven through the client
//! workflow with fuzzed documents: a root, then any sequence of root, timestamp,
//! snapshot and targets updates, each one a line naming the step and a document.
//!
//! Mode byte bit 0 set: every document is a `signed` body that the harness signs with
//! its own key (fuzz/src/lib.rs), so the fuzzer gets past signature checks and into
//! version, expiry, meta-hash and delegation logic. Clear: documents are fed as they
//! are (envelopes, signatures and all).
//!
//! Steps: `root`, `timestamp`, `snapshot`, `local-snapshot`, `targets [ROLE DELEGATOR]`,
//! `again ROLE DELEGATOR` (a loaded role reached through another delegator).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_fuzz::{mode, now, parts, sign_body, trace};
use outpost_protocol::release::FirmwareCustom;
use outpost_protocol::tuf::{SnapshotSource, TrustedSet};

fuzz_target!(|data: &[u8]| {
    let (m, rest) = mode(data);
    let sign = m & 1 == 1;
    let doc = |d: &[u8]| if sign { sign_body(d).unwrap_or_else(|| d.to_vec()) } else { d.to_vec() };
    let docs = parts(rest, 24);
    let Some((first, steps)) = docs.split_first() else { return };
    let mut set = match TrustedSet::new(&doc(first), now()) {
        Ok(set) => set,
        Err(e) => return trace("initial root", &e),
    };
    for step in steps {
        let (tag, body) = match step.iter().position(|b| *b == b'\n') {
            Some(i) => (&step[..i], &step[i + 1..]),
            None => (*step, &[][..]),
        };
        let tag = String::from_utf8_lossy(tag);
        let words: Vec<&str> = tag.split(' ').collect();
        let bytes = doc(body);
        let outcome = match words.as_slice() {
            ["root"] => set.update_root(&bytes),
            ["timestamp"] => set.update_timestamp(&bytes),
            ["snapshot"] => set.update_snapshot(&bytes, SnapshotSource::Fetched),
            ["local-snapshot"] => set.update_snapshot(&bytes, SnapshotSource::LocalCopy),
            ["targets"] => set.update_delegated_targets(&bytes, "targets", "root"),
            ["targets", role, delegator] => set.update_delegated_targets(&bytes, role, delegator),
            ["again", role, delegator] => set.check_loaded_for_delegator(role, delegator),
            _ => continue,
        };
        trace(&tag, &outcome);
    }
    // Read what became trusted the way the agent does.
    let _ = set.root().role("targets");
    let _ = set.timestamp().map(|t| t.snapshot_meta().version);
    let roles: Vec<String> = set
        .snapshot()
        .map(|s| s.meta.keys().filter_map(|k| k.strip_suffix(".json")).map(str::to_owned).collect())
        .unwrap_or_default();
    for role in roles {
        let Some(t) = set.targets(&role) else { continue };
        for (path, file) in &t.targets {
            let _ = file.naming_hash();
            if let Ok(Some(custom)) = FirmwareCustom::from_custom(file.custom.as_ref(), path) {
                let _ = custom.validate(path);
            }
            if let Some(d) = &t.delegations {
                for (child, _) in d.roles_for_target(path) {
                    let _ = d.role_keys(&child);
                }
            }
        }
    }
});
