"""Delegated targets roles: lazy, path-matched, depth-first search."""

from __future__ import annotations

from conftest import assert_fails, assert_ok
from reposim import path_hash_prefix, quote_all

TOP = ["metadata/2.root.json", "metadata/timestamp.json"]


def _delegated_requests(sim) -> list[str]:
    """Metadata requests for delegated roles (everything but the top level)."""
    top = {"root", "timestamp", "snapshot", "targets"}
    out = []
    for r in sim.metadata_requests():
        name = r[len("metadata/"):-len(".json")]
        role = name.split(".", 1)[1] if name[0].isdigit() and "." in name else name
        if role not in top:
            out.append(r)
    return out


def test_only_roles_matching_the_target_path_are_fetched(ready_client, sim):
    sim.add_delegation("targets", "apps", paths=["apps/*"])
    sim.add_delegation("targets", "fw", paths=["firmware/*/*"])
    sim.add_delegation("targets", "docs", paths=["docs/*"])
    sim.add_target("fw", "firmware/rpi4/fw.img", b"\x7fELF firmware")
    sim.publish("targets", "apps", "fw", "docs")

    res = assert_ok(ready_client.download("firmware/rpi4/fw.img"))
    assert _delegated_requests(sim) == ["metadata/1.fw.json"], res.describe()
    assert ready_client.stored_target("firmware/rpi4/fw.img") == b"\x7fELF firmware"
    assert ready_client.trusted("fw") == sim.files["metadata/1.fw.json"]
    assert ready_client.trusted("apps") is None and ready_client.trusted("docs") is None


def test_search_is_depth_first_in_delegation_order(ready_client, sim):
    # targets -> [a, d]; a -> [a1, a2]; only d lists the target.
    sim.add_delegation("targets", "a", paths=["*/*"])
    sim.add_delegation("targets", "d", paths=["*/*"])
    sim.add_delegation("a", "a1", paths=["*/*"])
    sim.add_delegation("a", "a2", paths=["*/*"])
    sim.add_target("d", "pkg/file.bin", b"from d")
    sim.publish("targets", "a", "d", "a1", "a2")

    res = assert_ok(ready_client.download("pkg/file.bin"))
    assert _delegated_requests(sim) == ["metadata/1.a.json", "metadata/1.a1.json",
                                        "metadata/1.a2.json", "metadata/1.d.json"], res.describe()
    assert ready_client.stored_target("pkg/file.bin") == b"from d"


def test_first_match_wins_in_depth_first_order(ready_client, sim):
    sim.add_delegation("targets", "a", paths=["*/*"])
    sim.add_delegation("targets", "b", paths=["*/*"])
    sim.add_delegation("a", "a1", paths=["*/*"])
    sim.add_target("a1", "pkg/x", b"from a1")
    sim.add_target("b", "pkg/x", b"from b")
    sim.publish("targets", "a", "b", "a1")

    res = assert_ok(ready_client.download("pkg/x"))
    assert ready_client.stored_target("pkg/x") == b"from a1", res.describe()
    assert "metadata/1.b.json" not in sim.requests


def test_terminating_delegation_stops_the_search(ready_client, sim):
    sim.add_delegation("targets", "term", paths=["*/*"], terminating=True)
    sim.add_delegation("targets", "later", paths=["*/*"])
    sim.add_target("later", "pkg/x", b"should never be found")
    sim.publish("targets", "term", "later")

    res = assert_fails(ready_client.download("pkg/x"))
    assert _delegated_requests(sim) == ["metadata/1.term.json"], res.describe()
    assert ready_client.target_files() == {}


def test_nested_terminating_delegation_stops_backtracking(ready_client, sim):
    # targets -> [a, d]; a -> [a1 (terminating), a2]; target only in d.
    sim.add_delegation("targets", "a", paths=["*/*"])
    sim.add_delegation("targets", "d", paths=["*/*"])
    sim.add_delegation("a", "a1", paths=["*/*"], terminating=True)
    sim.add_delegation("a", "a2", paths=["*/*"])
    sim.add_target("d", "pkg/x", b"unreachable")
    sim.publish("targets", "a", "d", "a1", "a2")

    res = assert_fails(ready_client.download("pkg/x"))
    assert _delegated_requests(sim) == ["metadata/1.a.json", "metadata/1.a1.json"], res.describe()
    assert ready_client.target_files() == {}


def test_non_matching_terminating_delegation_does_not_stop_search(ready_client, sim):
    sim.add_delegation("targets", "other", paths=["other/*"], terminating=True)
    sim.add_delegation("targets", "pkg", paths=["pkg/*"])
    sim.add_target("pkg", "pkg/x", b"found")
    sim.publish("targets", "other", "pkg")
    res = assert_ok(ready_client.download("pkg/x"))
    assert _delegated_requests(sim) == ["metadata/1.pkg.json"], res.describe()


def test_target_outside_delegated_paths_is_ignored(ready_client, sim):
    # 'apps' may only sign apps/*, yet it also lists firmware/fw.img with
    # other bytes; 'fw' legitimately lists it.
    sim.add_delegation("targets", "apps", paths=["apps/*"])
    sim.add_delegation("targets", "fw", paths=["firmware/*"])
    sim.add_target("apps", "apps/tool", b"a tool")
    sim.add_target("apps", "firmware/fw.img", b"malicious image")
    sim.add_target("apps", "misc/other", b"not allowed either")
    sim.add_target("fw", "firmware/fw.img", b"genuine image")
    sim.publish("targets", "apps", "fw")

    res = assert_ok(ready_client.download("firmware/fw.img"))
    assert ready_client.stored_target("firmware/fw.img") == b"genuine image", res.describe()

    res = assert_fails(ready_client.download("misc/other"))
    assert ready_client.stored_target("misc/other") is None, res.describe()

    res = assert_ok(ready_client.download("apps/tool"))
    assert ready_client.stored_target("apps/tool") == b"a tool", res.describe()


def test_path_hash_prefix_delegations(ready_client, sim):
    target = "bin/tool-1.2"
    prefix = path_hash_prefix(target)
    other = format((int(prefix, 16) + 1) % 256, "02x")
    sim.add_delegation("targets", "bins-other", hash_prefixes=[other])
    sim.add_delegation("targets", "bins-mine", hash_prefixes=[prefix, other])
    sim.add_target("bins-mine", target, b"tool")
    sim.publish("targets", "bins-other", "bins-mine")

    res = assert_ok(ready_client.download(target))
    assert _delegated_requests(sim) == ["metadata/1.bins-mine.json"], res.describe()
    assert ready_client.stored_target(target) == b"tool"


def test_unusual_role_names_are_url_quoted(ready_client, sim):
    role = "ops team/fw?#%"
    sim.add_delegation("targets", role, paths=["fw/*"])
    sim.add_target(role, "fw/x.bin", b"x")
    sim.publish("targets", role)

    res = assert_ok(ready_client.download("fw/x.bin"))
    quoted = quote_all(role)
    assert quoted == "ops%20team%2Ffw%3F%23%25"
    assert f"metadata/1.{quoted}.json" in sim.requests, res.describe()
    assert (ready_client.metadata_dir / f"{quoted}.json").read_bytes() == \
        sim.files[sim.role_path(role)]
    assert ready_client.stored_target("fw/x.bin") == b"x"


def test_unchanged_delegated_role_is_not_refetched(ready_client, sim):
    sim.add_delegation("targets", "fw", paths=["fw/*"])
    sim.add_target("fw", "fw/a", b"a")
    sim.add_target("fw", "fw/b", b"b")
    sim.publish("targets", "fw")
    assert_ok(ready_client.download("fw/a"))
    sim.clear_requests()
    res = assert_ok(ready_client.download("fw/b"))
    assert _delegated_requests(sim) == [], res.describe()
    assert ready_client.stored_target("fw/b") == b"b"


def test_updated_delegated_role_is_refetched(ready_client, sim):
    sim.add_delegation("targets", "fw", paths=["fw/*"])
    sim.add_target("fw", "fw/a", b"a")
    sim.publish("targets", "fw")
    assert_ok(ready_client.download("fw/a"))
    sim.add_target("fw", "fw/new", b"new")
    sim.publish("fw")  # fw v2, targets unchanged
    sim.clear_requests()
    res = assert_ok(ready_client.download("fw/new"))
    assert _delegated_requests(sim) == ["metadata/2.fw.json"], res.describe()
    assert ready_client.trusted("fw") == sim.files["metadata/2.fw.json"]


def _diamond(sim):
    """parent-a (team-a/*) and parent-b (team-b/*) both delegate a role named
    'release', each with its own key; 'release' is signed by parent-a's key only."""
    sim.add_delegation("targets", "parent-a", paths=["team-a/*"])
    sim.add_delegation("targets", "parent-b", paths=["team-b/*"])
    sim.add_delegation("parent-a", "release", paths=["team-a/*"])
    key_a = sim.signers["release"][-1]
    sim.add_delegation("parent-b", "release", paths=["team-b/*"])
    sim.signers["release"] = [key_a]
    sim.add_target("release", "team-a/app", b"trusted via parent-a")
    sim.add_target("release", "team-b/app", b"not authorised via parent-b")
    sim.publish("targets", "parent-a", "parent-b", "release")


def test_cached_role_is_checked_against_each_delegator_same_run(ready_client, sim):
    _diamond(sim)
    res = assert_fails(ready_client.download("team-a/app", "team-b/app"))
    assert ready_client.stored_target("team-b/app") is None, res.describe()


def test_cached_role_is_checked_against_each_delegator_later_run(ready_client, sim):
    _diamond(sim)
    assert_ok(ready_client.download("team-a/app"))
    assert ready_client.stored_target("team-a/app") == b"trusted via parent-a"
    res = assert_fails(ready_client.download("team-b/app"))
    assert ready_client.stored_target("team-b/app") is None, res.describe()
