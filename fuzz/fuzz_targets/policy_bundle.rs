//! Network-policy bundles (protocol/src/policy.rs `PolicyBundle::parse`): YAML or
//! JSON signed by the `policy` role, parsed by the agent before it compiles the rules
//! into BPF maps; a compromised policy key holder controls every byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_fuzz::now;
use outpost_protocol::policy::{Applied, PolicyBundle};

fuzz_target!(|data: &[u8]| {
    let Ok(bundle) = PolicyBundle::parse(data) else { return };
    let _ = bundle.applied(now());
    for applied in [Applied::Bundle, Applied::Essential] {
        let (profile, _mode) = bundle.profile_for(applied);
        let _ = profile.rule_ids();
        let _ = profile.rule_count();
    }
    // Fail-secure: every scope the bundle names stays under enforcement after expiry.
    let scopes = |p: &outpost_protocol::policy::Profile| p.scopes.iter().map(|s| (s.kind, s.target.clone())).collect::<std::collections::BTreeSet<_>>();
    let named = scopes(&bundle.profile);
    let essential = scopes(&bundle.essential);
    assert!(named.is_subset(&essential), "scopes {:?} leave enforcement when the bundle expires", named.difference(&essential).collect::<Vec<_>>());
});
