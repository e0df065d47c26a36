//! Director metadata (protocol/src/director.rs): the director roots a device takes from
//! the image repository (the first, then the chain of newer versions) and the
//! per-device targets it verifies at every check-in, from the server's answers. Mode
//! byte bit 0 set: the fuzzed targets body is signed by the director key of a root the
//! harness made, so verification reaches the device binding, version floor, expiry and
//! assignment checks. Clear: the input is a first director root, a next version and
//! targets (separated by `\n---\n`), all as they are.
#![no_main]

use chrono::Duration;
use libfuzzer_sys::fuzz_target;
use outpost_fuzz::{key, mode, now, parts, sign_body, trace};
use outpost_protocol::director::{check_first_root, check_next_root, root, verify_targets};

fuzz_target!(|data: &[u8]| {
    let (m, rest) = mode(data);
    let min_version = u64::from(m >> 1);
    if m & 1 == 1 {
        let k = key();
        let Ok(root_bytes) = root(&[k.public().clone()], 1, k.public(), 1, now() + Duration::days(365), &[k]) else { return };
        let Ok(pinned) = check_first_root(&root_bytes) else { panic!("the harness's own director root is refused") };
        let targets = sign_body(rest).unwrap_or_else(|| rest.to_vec());
        let verified = verify_targets(&pinned, &targets, "dev-fuzz", min_version, now());
        trace("director targets", &verified);
        if let Ok(view) = verified {
            assert!(view.version >= min_version, "accepted version {} below the floor {min_version}", view.version);
            assert!(view.expires > now(), "accepted expired director targets");
            if let Some(a) = view.assignment {
                assert_eq!(a.custom.device_id, "dev-fuzz", "accepted another device's assignment");
            }
        }
    } else {
        let docs = parts(rest, 3);
        let mut pinned = match check_first_root(docs[0]) {
            Ok(p) => p,
            Err(e) => return trace("director root", &e),
        };
        if let Some(next) = docs.get(1) {
            match check_next_root(docs[0], next) {
                Ok(p) => {
                    assert_eq!(p.signed.version, pinned.signed.version + 1, "a root chain skipped a version");
                    pinned = p;
                }
                Err(e) => trace("next director root", &e),
            }
        }
        if let Some(targets) = docs.get(2) {
            trace("director targets", &verify_targets(&pinned, targets, "dev-fuzz", min_version, now()));
        }
    }
});
