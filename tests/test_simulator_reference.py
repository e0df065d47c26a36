"""Check the repository simulator itself against python-tuf's reference client
(tuf.ngclient), so that a failure elsewhere points at outpost-agent, not at
the fixtures.  These tests need no Outpost binary."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from tuf.api.exceptions import ExpiredMetadataError, RepositoryError
from tuf.ngclient import Updater

from reposim import expires_in, path_hash_prefix


def _updater(sim, tmp_path, root: bytes | None = None) -> Updater:
    md = tmp_path / "ref-metadata"
    tg = tmp_path / "ref-targets"
    md.mkdir(exist_ok=True)
    tg.mkdir(exist_ok=True)
    (md / "root.json").write_bytes(root or sim.root_history[1])
    return Updater(str(md), sim.metadata_url, str(tg), sim.targets_url, bootstrap=None)


@pytest.mark.parametrize("consistent", [True, False], ids=["consistent", "plain"])
def test_reference_client_accepts_simulated_repository(make_sim, tmp_path, consistent):
    sim = make_sim(consistent)
    sim.add_delegation("targets", "fw", paths=["firmware/*/*"])
    sim.add_target("fw", "firmware/a/img.bin", b"firmware bytes")
    sim.publish("targets", "fw")
    up = _updater(sim, tmp_path)
    up.refresh()
    info = up.get_targetinfo("firmware/a/img.bin")
    assert info is not None
    path = up.download_target(info)
    with open(path, "rb") as f:
        assert f.read() == b"firmware bytes"
    expected_first = ["metadata/2.root.json", "metadata/timestamp.json"]
    assert sim.requests[:2] == expected_first


def test_reference_client_follows_root_rotation(sim, tmp_path):
    sim.rotate_root(lambda s: (s.add_key("root"), s.add_key("root"), s.set_threshold("root", 2)))
    sim.rotate_root(lambda s: s.replace_keys("timestamp"))
    sim.publish()
    up = _updater(sim, tmp_path)
    up.refresh()
    assert (tmp_path / "ref-metadata" / "root.json").read_bytes() == sim.root_history[3]


def test_reference_client_rejects_expired_timestamp(sim, tmp_path):
    sim.roles["timestamp"].signed.expires = expires_in(hours=-1)
    sim.update_timestamp()
    with pytest.raises(ExpiredMetadataError):
        _updater(sim, tmp_path).refresh()


def test_reference_client_rejects_bad_target_hash(sim, tmp_path):
    sim.add_target("targets", "x.bin", b"genuine")
    sim.publish("targets")
    sim.misbehave(sim.target_path("x.bin"), "bytes", data=b"evil!!!")
    up = _updater(sim, tmp_path)
    up.refresh()
    with pytest.raises(RepositoryError):
        up.download_target(up.get_targetinfo("x.bin"))


def test_hash_prefix_delegation_is_followed_by_reference_client(sim, tmp_path):
    target = "bins/tool"
    prefix = path_hash_prefix(target)
    other = "00" if prefix != "00" else "ff"
    sim.add_delegation("targets", "wrong", hash_prefixes=[other])
    sim.add_delegation("targets", "right", hash_prefixes=[prefix])
    sim.add_target("right", target, b"tool")
    sim.publish("targets", "wrong", "right")
    up = _updater(sim, tmp_path)
    up.refresh()
    assert up.get_targetinfo(target) is not None
    assert "metadata/1.right.json" in sim.requests
    assert "metadata/1.wrong.json" not in sim.requests


def test_server_records_requests_and_404s(sim):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(sim.metadata_url + "99.root.json", timeout=5)
    assert e.value.code == 404
    with urllib.request.urlopen(sim.metadata_url + "timestamp.json", timeout=5) as r:
        assert r.read() == sim.files["metadata/timestamp.json"]
    assert sim.requests == ["metadata/99.root.json", "metadata/timestamp.json"]
