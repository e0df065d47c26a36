//! The client workflow's delegation search (TUF 5.6.7.2), pure and synchronous, over
//! targets roles already loaded: who signs a target path is decided here exactly as a
//! conformant client decides it. Pre-order depth first from `targets`, children in the
//! order their delegator lists them, a role entered only through a delegation whose
//! `paths` / `path_hash_prefixes` match the path (at every hop, not only the last),
//! `terminating` ending the search at that role, succinct hash bins terminating
//! (TAP 15), cycles skipped, at most [`MAX_DELEGATIONS`] roles visited.
//!
//! The agent walks the same order lazily over the network (`get_target_info`); the
//! server, which holds every role, uses [`RoleGraph`] to decide what a device will be
//! offered: firmware releases, expected measurements and the deny-list are read only
//! from what this search returns for their path.
//!
//! Each delegation edge (delegator -> delegated role, both in the set) is verified
//! once when the graph is built: the delegated role's signatures must meet the keys
//! and threshold *that* delegator names for it. A role reached through an edge that
//! does not verify, or a delegated role with no metadata, ends the search with an
//! error, as it ends a client's. The top-level `targets` role must have been verified
//! against root by the caller.

use std::collections::{BTreeMap, BTreeSet};

use super::metadata::{verify_threshold, Envelope, TargetFile, Targets};
use crate::error::{Error, Result};

/// The most roles one search visits (python-tuf's and the agent's default).
pub const MAX_DELEGATIONS: usize = 32;

/// The top-level targets role's name; the search starts there.
const TOP: &str = "targets";

/// What the search found for a path: the role whose metadata lists it first.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved<'a> {
    /// The role that signs the target.
    pub role: &'a str,
    pub target: &'a TargetFile,
    /// The roles from `targets` down to `role`, each delegating the path to the next.
    pub chain: Vec<&'a str>,
}

/// Loaded targets roles, by name, with every delegation edge between them verified.
pub struct RoleGraph<'a> {
    roles: BTreeMap<&'a str, &'a Envelope<Targets>>,
    /// (delegator, delegated) -> why the delegated role does not verify under the
    /// delegator's keys (absent: it verifies, or the delegated role is not loaded).
    bad_edges: BTreeMap<(&'a str, &'a str), String>,
    max_roles: usize,
}

impl<'a> RoleGraph<'a> {
    /// `roles` holds `targets` (verified by the caller) and any delegated roles.
    pub fn new(roles: impl IntoIterator<Item = (&'a str, &'a Envelope<Targets>)>) -> Self {
        let roles: BTreeMap<&'a str, &'a Envelope<Targets>> = roles.into_iter().collect();
        let mut bad_edges = BTreeMap::new();
        for (&parent, env) in &roles {
            let Some(d) = &env.signed.delegations else { continue };
            for (&child, child_env) in &roles {
                if child == TOP {
                    continue;
                }
                let Some((keyids, threshold)) = d.role_keys(child) else { continue };
                if let Err(e) = verify_threshold(child, &child_env.canonical_signed, &child_env.signatures, &keyids, threshold, &d.keys) {
                    bad_edges.insert((parent, child), e.to_string());
                }
            }
        }
        RoleGraph { roles, bad_edges, max_roles: MAX_DELEGATIONS }
    }

    /// Another limit on the roles one search visits.
    pub fn with_max_roles(mut self, max_roles: usize) -> Self {
        self.max_roles = max_roles;
        self
    }

    /// The delegated roles this graph's delegators list, with their delegator, that
    /// are loaded and do not verify under that delegator's keys: (delegator, role, why).
    pub fn unverified_edges(&self) -> impl Iterator<Item = (&'a str, &'a str, &str)> + '_ {
        self.bad_edges.iter().map(|((p, c), why)| (*p, *c, why.as_str()))
    }

    /// Why `role`'s metadata does not verify under the keys `delegator` names for it
    /// (None: it verifies, or `delegator` does not delegate it).
    pub fn edge_error(&self, delegator: &str, role: &str) -> Option<&str> {
        self.bad_edges.iter().find(|((p, c), _)| *p == delegator && *c == role).map(|(_, why)| why.as_str())
    }

    /// The loaded roles some delegation chain from `targets` names (whatever the
    /// paths), `targets` included. Roles outside this set are orphans no client can
    /// reach: a revoked delegation leaves its role (and what only it delegated) here.
    pub fn reachable(&self) -> BTreeSet<&'a str> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&'a str> = self.roles.keys().copied().filter(|r| *r == TOP).collect();
        while let Some(role) = stack.pop() {
            if !seen.insert(role) {
                continue;
            }
            let Some(d) = self.roles.get(role).and_then(|e| e.signed.delegations.as_ref()) else { continue };
            for &child in self.roles.keys() {
                if child != TOP && !seen.contains(child) && d.role_keys(child).is_some() {
                    stack.push(child);
                }
            }
        }
        seen
    }

    /// The conformant search for `target_path`: the target as the first role in
    /// search order lists it, or None when the search ends without it.
    pub fn find(&self, target_path: &str) -> Result<Option<Resolved<'a>>> {
        let search_err = |reason: String| Error::Search { target: target_path.to_owned(), reason };
        // (role name as its delegator wrote it, the chain that reached it)
        let mut to_visit: Vec<(String, Vec<&'a str>)> = vec![(TOP.to_owned(), Vec::new())];
        let mut visited: BTreeSet<&'a str> = BTreeSet::new();
        while let Some((name, via)) = to_visit.pop() {
            if visited.contains(name.as_str()) {
                continue;
            }
            if visited.len() >= self.max_roles {
                return Err(search_err(format!("it visits more than {} roles (next: {name})", self.max_roles)));
            }
            let delegator = via.last().copied();
            let Some((&role, env)) = self.roles.get_key_value(name.as_str()) else {
                return Err(search_err(format!("role {name}, delegated by {}, has no metadata", delegator.unwrap_or("root"))));
            };
            if let Some(parent) = delegator {
                if let Some(why) = self.bad_edges.get(&(parent, role)) {
                    return Err(search_err(format!("role {role} does not verify under the keys {parent} delegates to it: {why}")));
                }
            }
            let mut chain = via;
            chain.push(role);
            if let Some(target) = env.signed.targets.get(target_path) {
                return Ok(Some(Resolved { role, target, chain }));
            }
            visited.insert(role);
            let Some(d) = &env.signed.delegations else { continue };
            let mut children = Vec::new();
            for (child, terminating) in d.roles_for_target(target_path) {
                children.push((child, chain.clone()));
                if terminating {
                    to_visit.clear();
                    break;
                }
            }
            children.reverse();
            to_visit.extend(children);
        }
        Ok(None)
    }

    /// Whether some chain of delegations from `targets` to `role` delegates
    /// `target_path` at every hop, through edges that verify (order and `terminating`
    /// aside): a role listing a path no such chain gives it signs nothing a client
    /// will ever see for that path.
    pub fn may_delegate(&self, role: &str, target_path: &str) -> bool {
        if role == TOP {
            return true;
        }
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut stack = vec![TOP];
        while let Some(r) = stack.pop() {
            if !seen.insert(r) {
                continue;
            }
            let Some(d) = self.roles.get(r).and_then(|e| e.signed.delegations.as_ref()) else { continue };
            for (child, _) in d.roles_for_target(target_path) {
                let Some((&child, _)) = self.roles.get_key_value(child.as_str()) else { continue };
                if self.bad_edges.contains_key(&(r, child)) {
                    continue;
                }
                if child == role {
                    return true;
                }
                stack.push(child);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;
    use crate::tuf::metadata::{new_targets, sign, DelegatedRole, Delegations, SuccinctRoles};
    use std::collections::BTreeMap;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed(&[n; 32]).unwrap()
    }

    fn target(tag: &str) -> TargetFile {
        let mut hashes = BTreeMap::new();
        hashes.insert("sha256".to_owned(), hex::encode(sha2::Sha256::digest(tag.as_bytes())));
        TargetFile { length: tag.len() as u64, hashes, custom: None, extra: BTreeMap::new() }
    }

    /// A role body: targets listed, and (name, key seed, paths or hash prefixes,
    /// terminating) delegations.
    struct Body {
        targets: Vec<(&'static str, &'static str)>,
        delegations: Vec<(&'static str, u8, Vec<&'static str>, bool)>,
        succinct: Option<(u8, u32, &'static str)>,
    }

    fn body(targets: &[(&'static str, &'static str)]) -> Body {
        Body { targets: targets.to_vec(), delegations: Vec::new(), succinct: None }
    }

    impl Body {
        fn delegate(mut self, name: &'static str, seed: u8, paths: &[&'static str], terminating: bool) -> Self {
            self.delegations.push((name, seed, paths.to_vec(), terminating));
            self
        }

        fn sign(self, seed: u8) -> Envelope<Targets> {
            let mut t = new_targets(1, chrono::Utc::now() + chrono::Duration::days(1));
            for (path, tag) in &self.targets {
                t.targets.insert((*path).to_owned(), target(tag));
            }
            if let Some((kseed, bits, prefix)) = self.succinct {
                let k = key(kseed);
                let mut keys = BTreeMap::new();
                keys.insert(k.key_id().to_owned(), k.public().clone());
                let succinct = SuccinctRoles { keyids: vec![k.key_id().to_owned()], threshold: 1, bit_length: bits, name_prefix: prefix.into(), extra: BTreeMap::new() };
                t.delegations = Some(Delegations { keys, roles: None, succinct_roles: Some(succinct), extra: BTreeMap::new() });
            } else if !self.delegations.is_empty() {
                let mut keys = BTreeMap::new();
                let mut roles = Vec::new();
                for (name, kseed, paths, terminating) in &self.delegations {
                    let k = key(*kseed);
                    keys.insert(k.key_id().to_owned(), k.public().clone());
                    let (paths, prefixes) = match paths.first().and_then(|p| p.strip_prefix("hash:")) {
                        Some(prefix) => (None, Some(vec![prefix.to_owned()])),
                        None => (Some(paths.iter().map(|p| (*p).to_owned()).collect()), None),
                    };
                    roles.push(DelegatedRole {
                        name: (*name).into(),
                        keyids: vec![k.key_id().to_owned()],
                        threshold: 1,
                        terminating: *terminating,
                        paths,
                        path_hash_prefixes: prefixes,
                        extra: BTreeMap::new(),
                    });
                }
                t.delegations = Some(Delegations { keys, roles: Some(roles), succinct_roles: None, extra: BTreeMap::new() });
            }
            Envelope::parse(&sign(&t, &[&key(seed)]).unwrap(), "t").unwrap()
        }
    }

    fn graph(roles: &[(&'static str, Envelope<Targets>)]) -> Vec<(&'static str, Envelope<Targets>)> {
        roles.to_vec()
    }

    fn found<'a>(g: &RoleGraph<'a>, path: &str) -> Option<(&'a str, String)> {
        g.find(path).unwrap().map(|r| (r.role, r.chain.join(">")))
    }

    use sha2::Digest;

    const P999: &str = "firmware/rpi4/9.9.9/image.bin";
    const PBETA: &str = "firmware/rpi4/2.0.0-beta/image.bin";

    #[test]
    fn every_hop_must_match_the_path() {
        let roles = graph(&[
            ("targets", body(&[]).delegate("fw-beta", 2, &["firmware/rpi4/*-beta/*"], false).sign(1)),
            ("fw-beta", body(&[]).delegate("X", 3, &["firmware/rpi4/*/*"], false).sign(2)),
            ("X", body(&[(P999, "evil"), (PBETA, "beta")]).sign(3)),
        ]);
        let g = RoleGraph::new(roles.iter().map(|(n, e)| (*n, e)));
        assert_eq!(found(&g, P999), None, "fw-beta does not delegate 9.9.9, so X is never entered for it");
        assert_eq!(found(&g, PBETA), Some(("X", "targets>fw-beta>X".into())));
        assert!(!g.may_delegate("X", P999));
        assert!(g.may_delegate("X", PBETA));
    }

    #[test]
    fn a_terminating_role_ends_the_search_and_order_decides() {
        let roles = graph(&[
            (
                "targets",
                body(&[])
                    .delegate("first", 2, &["firmware/rpi4/*/*"], false)
                    .delegate("stable", 3, &["firmware/rpi4/*/*"], true)
                    .delegate("late", 4, &["firmware/rpi4/*/*"], false)
                    .sign(1),
            ),
            ("first", body(&[(PBETA, "first")]).sign(2)),
            ("stable", body(&[]).sign(3)),
            ("late", body(&[(P999, "late"), (PBETA, "late")]).sign(4)),
        ]);
        let g = RoleGraph::new(roles.iter().map(|(n, e)| (*n, e)));
        assert_eq!(found(&g, P999), None, "late is listed after the terminating stable");
        assert_eq!(g.find(PBETA).unwrap().unwrap().target, &target("first"), "the first role in order wins");
        assert!(g.may_delegate("late", P999), "order and terminating aside, late is delegated the path");
    }

    #[test]
    fn hash_prefixes_and_succinct_bins_are_followed_and_bins_terminate() {
        let digest = hex::encode(sha2::Sha256::digest(P999.as_bytes()));
        let prefix: &'static str = Box::leak(format!("hash:{}", &digest[..2]).into_boxed_str());
        let other: &'static str = Box::leak(format!("hash:{}", if &digest[..2] == "00" { "01" } else { "00" }).into_boxed_str());
        let mut bins = body(&[]);
        bins.succinct = Some((5, 1, "bin"));
        let bins_env = bins.sign(2);
        let bin_name = bins_env.signed.delegations.as_ref().unwrap().succinct_roles.as_ref().unwrap().role_for_target(P999);
        let bin_name: &'static str = Box::leak(bin_name.into_boxed_str());
        let roles = graph(&[
            (
                "targets",
                body(&[]).delegate("wrong-bin", 3, &[other], false).delegate("hashed", 2, &[prefix], false).delegate("after", 4, &["*/*/*/*"], false).sign(1),
            ),
            ("wrong-bin", body(&[(P999, "wrong")]).sign(3)),
            ("hashed", bins_env),
            (bin_name, body(&[(PBETA, "bin")]).sign(5)),
            ("after", body(&[(P999, "after")]).sign(4)),
        ]);
        let g = RoleGraph::new(roles.iter().map(|(n, e)| (*n, e)));
        // hashed -> its bin (terminating): "after" is never visited for P999.
        assert_eq!(found(&g, P999), None);
        assert!(g.may_delegate(bin_name, P999));
        assert!(!g.may_delegate("wrong-bin", P999));
    }

    #[test]
    fn a_role_must_verify_under_the_delegator_it_is_reached_through() {
        // Both delegate X; only "a" names the key X signs with. Through "b" X does not verify.
        let roles = graph(&[
            ("targets", body(&[]).delegate("b", 3, &["firmware/*/*/*"], false).delegate("a", 2, &["firmware/*/*/*"], false).sign(1)),
            ("a", body(&[]).delegate("X", 4, &["firmware/*/*/*"], false).sign(2)),
            ("b", body(&[]).delegate("X", 9, &["firmware/*/*/*"], false).sign(3)),
            ("X", body(&[(P999, "x")]).sign(4)),
        ]);
        let g = RoleGraph::new(roles.iter().map(|(n, e)| (*n, e)));
        let err = g.find(P999).unwrap_err().to_string();
        assert!(err.contains("does not verify under the keys b delegates"), "{err}");
        assert!(g.edge_error("b", "X").is_some() && g.edge_error("a", "X").is_none());
        assert!(g.may_delegate("X", P999), "through a, X verifies");
    }

    #[test]
    fn missing_roles_limits_and_orphans() {
        let roles = graph(&[
            ("targets", body(&[]).delegate("ghost", 2, &["firmware/*/*/*"], false).sign(1)),
            ("orphan", body(&[(P999, "o")]).sign(3)),
        ]);
        let g = RoleGraph::new(roles.iter().map(|(n, e)| (*n, e)));
        assert!(g.find(P999).unwrap_err().to_string().contains("ghost"));
        assert_eq!(g.reachable().into_iter().collect::<Vec<_>>(), vec!["targets"]);
        assert!(!g.may_delegate("orphan", P999));

        // A chain longer than the limit is an error, not "absent".
        let names: Vec<&'static str> = (0..40).map(|i| &*Box::leak(format!("r{i}").into_boxed_str())).collect();
        let mut roles = vec![("targets", body(&[]).delegate(names[0], 2, &["*/*/*/*"], false).sign(1))];
        for i in 0..names.len() {
            let b = if i + 1 < names.len() { body(&[]).delegate(names[i + 1], 2, &["*/*/*/*"], false) } else { body(&[(P999, "deep")]) };
            roles.push((names[i], b.sign(2)));
        }
        let g = RoleGraph::new(roles.iter().map(|(n, e)| (*n, e)));
        assert!(g.find(P999).unwrap_err().to_string().contains("more than 32 roles"));
        assert_eq!(g.reachable().len(), 41);
    }
}
