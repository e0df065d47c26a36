//! CycloneDX SBOMs and the deny-list (sbom crate): `validate` reads the SBOM a
//! pipeline uploads (the server indexes it, the signer checks it); the deny-list is
//! signed by the `security` role and matched against SBOM components by each
//! ecosystem's version rules. Input: the SBOM, then (after `\n---\n`) a deny-list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_fuzz::{parts, trace};
use outpost_sbom::denylist::{components_of, DenyList};

fuzz_target!(|data: &[u8]| {
    let docs = parts(data, 2);
    let components = match outpost_sbom::validate(docs[0]) {
        Ok(summary) => summary.packages,
        Err(e) => {
            trace("validate", &e);
            serde_json::from_slice(docs[0]).map(|doc| components_of(&doc)).unwrap_or_default()
        }
    };
    let Some(list) = docs.get(1) else { return };
    let list = match DenyList::parse(list) {
        Ok(l) => l,
        Err(e) => return trace("deny-list", &e),
    };
    trace("findings", &list.findings(&components));
});
