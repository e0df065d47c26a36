"""`tuf-client download`: storage names, caching, changed targets, quoting."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import pytest

from conftest import TufClient, assert_fails, assert_ok
from reposim import quote_all

FW = "firmware/rpi4/1.0.0/fw.img"


@pytest.mark.parametrize("consistent", [True, False], ids=["consistent", "plain"])
def test_download_stores_target_under_quoted_path(make_sim, tmp_path, consistent):
    sim = make_sim(consistent)
    data = bytes(range(256)) * 64
    sim.add_target("targets", FW, data)
    sim.publish("targets")
    client = TufClient(tmp_path / "c", sim)
    assert_ok(client.init())

    res = assert_ok(client.download(FW))
    assert client.target_files() == {"firmware%2Frpi4%2F1.0.0%2Ffw.img": data}, res.describe()
    info = sim.find_target(FW)
    expected = (f"targets/firmware/rpi4/1.0.0/{info.hashes['sha256']}.fw.img" if consistent
                else f"targets/{FW}")
    assert sim.target_requests() == [expected], res.describe()


def test_download_implies_refresh(ready_client, sim):
    sim.add_target("targets", "a.txt", b"alpha")
    sim.publish("targets")
    res = assert_ok(ready_client.download("a.txt"))
    assert sim.metadata_requests() == ["metadata/2.root.json", "metadata/timestamp.json",
                                       "metadata/2.snapshot.json", "metadata/2.targets.json"], \
        res.describe()
    assert ready_client.trusted("targets") == sim.files["metadata/2.targets.json"]


def test_second_download_of_unchanged_target_is_not_requested(ready_client, sim):
    sim.add_target("targets", FW, b"image v1")
    sim.publish("targets")
    assert_ok(ready_client.download(FW))
    sim.clear_requests()
    res = assert_ok(ready_client.download(FW))
    assert sim.target_requests() == [], res.describe()
    assert ready_client.stored_target(FW) == b"image v1"


def test_changed_target_replaces_file_under_same_name(ready_client, sim):
    sim.add_target("targets", FW, b"image v1")
    sim.publish("targets")
    assert_ok(ready_client.download(FW))
    sim.add_target("targets", FW, b"image v2, a bit longer")
    sim.publish("targets")
    sim.clear_requests()
    res = assert_ok(ready_client.download(FW))
    assert sim.target_requests() == [sim.target_path(FW)], res.describe()
    assert ready_client.target_files() == {quote_all(FW): b"image v2, a bit longer"}


def test_locally_corrupted_target_is_downloaded_again(ready_client, sim):
    sim.add_target("targets", FW, b"image v1")
    sim.publish("targets")
    assert_ok(ready_client.download(FW))
    (ready_client.target_dir / quote_all(FW)).write_bytes(b"image v0")  # same length
    sim.clear_requests()
    res = assert_ok(ready_client.download(FW))
    assert sim.target_requests() == [sim.target_path(FW)], res.describe()
    assert ready_client.stored_target(FW) == b"image v1"


def test_special_characters_in_target_path_are_quoted_in_requests(ready_client, sim):
    name = "dir with space/file #1?100%.txt"
    sim.add_target("targets", name, b"special")
    sim.publish("targets")
    res = assert_ok(ready_client.download(name))
    reqs = sim.target_requests()
    assert len(reqs) == 1, res.describe()
    raw = reqs[0]
    for ch in " #?":
        assert ch not in raw, f"unquoted {ch!r} in request path {raw!r}"
    assert unquote(urlsplit("/" + raw).path).lstrip("/") == sim.target_path(name)
    assert ready_client.stored_target(name) == b"special"
    assert quote_all(name) == "dir%20with%20space%2Ffile%20%231%3F100%25.txt"


def test_several_targets_in_one_invocation(ready_client, sim):
    sim.add_target("targets", "one", b"1")
    sim.add_target("targets", "sub/two", b"22")
    sim.publish("targets")
    res = assert_ok(ready_client.download("one", "sub/two"))
    assert ready_client.target_files() == {"one": b"1", "sub%2Ftwo": b"22"}, res.describe()


def test_unknown_target_fails_and_stops_processing(ready_client, sim):
    sim.add_target("targets", "known", b"k")
    sim.publish("targets")
    res = assert_fails(ready_client.download("unknown", "known"))
    assert ready_client.target_files() == {}, res.describe()
    assert sim.target_requests() == []
    # metadata was still refreshed
    assert ready_client.trusted("targets") == sim.files["metadata/2.targets.json"]


def test_empty_target(ready_client, sim):
    sim.add_target("targets", "empty.bin", b"")
    sim.publish("targets")
    res = assert_ok(ready_client.download("empty.bin"))
    assert ready_client.target_files() == {"empty.bin": b""}, res.describe()


def test_target_missing_on_server_fails(ready_client, sim):
    sim.add_target("targets", FW, b"image")
    sim.publish("targets")
    sim.misbehave(sim.target_path(FW), "status", status=404)
    res = assert_fails(ready_client.download(FW))
    assert ready_client.target_files() == {}, res.describe()
