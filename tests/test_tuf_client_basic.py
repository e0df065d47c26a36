"""`outpost-agent tuf-client`: init, refresh, request order, trusted metadata on disk."""

from __future__ import annotations

import json
import re

import pytest

from conftest import TufClient, assert_fails, assert_ok, trusted_version

TOP_LEVEL_FILES = {"root.json", "timestamp.json", "snapshot.json", "targets.json"}


def test_init_stores_trusted_root_without_network(client, sim):
    res = assert_ok(client.init())
    assert sim.requests == [], f"init must not contact the repository\n{res.describe()}"
    assert client.trusted("root") == sim.root_history[1], "root.json is not a copy of the given root"


def test_init_fails_for_missing_root_file(client, sim, tmp_path):
    from conftest import run
    missing = tmp_path / "does-not-exist.json"
    res = run([str(client.exe), "tuf-client", "--metadata-dir", str(client.metadata_dir),
               "init", str(missing)])
    assert_fails(res)


@pytest.mark.parametrize("consistent", [True, False], ids=["consistent", "plain"])
def test_refresh_requests_exactly_the_expected_files(make_sim, tmp_path, consistent):
    sim = make_sim(consistent)
    client = TufClient(tmp_path / "c", sim)
    assert_ok(client.init())
    res = assert_ok(client.refresh())
    if consistent:
        expected = ["metadata/2.root.json", "metadata/timestamp.json",
                    "metadata/1.snapshot.json", "metadata/1.targets.json"]
    else:
        expected = ["metadata/2.root.json", "metadata/timestamp.json",
                    "metadata/snapshot.json", "metadata/targets.json"]
    assert sim.requests == expected, res.describe()


def test_refresh_with_metadata_url_without_trailing_slash(sim, tmp_path):
    client = TufClient(tmp_path / "c", sim, metadata_url=sim.metadata_url.rstrip("/"))
    assert_ok(client.init())
    res = assert_ok(client.refresh())
    assert sim.requests[:2] == ["metadata/2.root.json", "metadata/timestamp.json"], res.describe()


def test_second_refresh_does_not_refetch_unchanged_metadata(ready_client, sim):
    assert_ok(ready_client.refresh())
    sim.clear_requests()
    res = assert_ok(ready_client.refresh())
    assert sim.requests == ["metadata/2.root.json", "metadata/timestamp.json"], res.describe()


def test_refresh_follows_new_versions(ready_client, sim):
    assert_ok(ready_client.refresh())
    sim.add_target("targets", "new.txt", b"new")
    sim.publish("targets")  # targets 2, snapshot 2, timestamp 2
    sim.clear_requests()
    res = assert_ok(ready_client.refresh())
    assert sim.requests == ["metadata/2.root.json", "metadata/timestamp.json",
                            "metadata/2.snapshot.json", "metadata/2.targets.json"], res.describe()
    assert trusted_version(ready_client.trusted("targets")) == 2


def test_timestamp_only_change_does_not_refetch_snapshot(ready_client, sim):
    assert_ok(ready_client.refresh())
    sim.publish(snapshot=False)  # new timestamp version, same snapshot
    sim.clear_requests()
    res = assert_ok(ready_client.refresh())
    assert sim.requests == ["metadata/2.root.json", "metadata/timestamp.json"], res.describe()
    assert ready_client.trusted("timestamp") == sim.files["metadata/timestamp.json"]


def test_trusted_metadata_is_byte_exact_and_unversioned(ready_client, sim):
    sim.add_delegation("targets", "apps", paths=["apps/*"])
    sim.add_target("apps", "apps/a.txt", b"a")
    sim.publish("targets", "apps")
    assert_ok(ready_client.refresh())
    files = ready_client.trusted_files()
    assert TOP_LEVEL_FILES <= set(files), f"trusted files: {sorted(files)}"
    versioned = [n for n in files if re.match(r"^\d+\.", n)]
    assert not versioned, f"metadata dir must use unversioned names, found {versioned}"
    assert files["root.json"] == sim.root_history[1]
    assert files["timestamp.json"] == sim.files["metadata/timestamp.json"]
    assert files["snapshot.json"] == sim.files[sim.role_path("snapshot")]
    assert files["targets.json"] == sim.files[sim.role_path("targets")]
    # refresh only covers top-level roles: the delegated role is fetched lazily
    assert "apps.json" not in files
    assert_ok(ready_client.download("apps/a.txt"))
    assert ready_client.trusted("apps") == sim.files[sim.role_path("apps")]


def test_metadata_with_hashes_and_lengths_is_accepted(ready_client, sim):
    sim.publish("targets", hashes=True)
    res = assert_ok(ready_client.refresh())
    assert ready_client.trusted("snapshot") == sim.files[sim.role_path("snapshot")], res.describe()


def test_invalid_initial_root_fails_refresh_without_requests(client, sim):
    root = json.loads(sim.root_history[1])
    del root["signed"]["version"]
    client.init(json.dumps(root).encode())  # may or may not fail
    assert_fails(client.refresh())
    assert sim.requests == []


def test_badly_signed_initial_root_fails_refresh(client, sim):
    root = json.loads(sim.root_history[1])
    sig = root["signatures"][0]["sig"]
    root["signatures"][0]["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    client.init(json.dumps(root).encode())
    assert_fails(client.refresh())
    assert sim.requests == []


def test_missing_timestamp_fails_refresh(ready_client, sim):
    sim.misbehave("metadata/timestamp.json", "status", status=404)
    assert_fails(ready_client.refresh())
    assert ready_client.trusted("timestamp") is None


def test_wrong_metadata_type_is_rejected(ready_client, sim):
    # Serve the (validly signed) snapshot where the timestamp belongs.
    sim.misbehave("metadata/timestamp.json", "bytes", data=sim.files["metadata/1.snapshot.json"])
    assert_fails(ready_client.refresh(), "type", "timestamp", "snapshot")
    assert ready_client.trusted("timestamp") is None
