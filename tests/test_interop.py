"""Interoperability: the three Outpost binaries against python-tuf, both ways.

(a) `outpost` builds and signs a repository, `outpost-server` serves it, and
    python-tuf's reference client (tuf.ngclient) plus `outpost-agent tuf-client`
    both verify and download the published firmware.
(b) `outpost-agent tuf-client` reads a repository written by python-tuf's
    Metadata API (the simulator), delegations and custom fields included.
(c) The server refuses uploads that are badly signed or stale, and keeps
    serving what it had.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
import urllib.request
from functools import partial
from pathlib import Path

from tuf.ngclient import Updater

from conftest import (  # noqa: F401 - fixtures outpost_repo/outpost_server/published live in conftest
    FW_BYTES,
    FW_PATH,
    OutpostRepo,
    OutpostServer,
    TufClient,
    assert_ok,
    http_get,
    http_post,
)


def _reference_updater(tmp_path: Path, root: bytes, metadata_url: str, targets_url: str,
                       name: str = "ref") -> Updater:
    md = tmp_path / f"{name}-metadata"
    tg = tmp_path / f"{name}-targets"
    md.mkdir()
    tg.mkdir()
    (md / "root.json").write_bytes(root)
    return Updater(str(md), metadata_url, str(tg), targets_url, bootstrap=None)


def _check_custom(info) -> None:
    custom = info.custom.get("outpost") if info.custom else None
    assert custom is not None, f"target has no 'outpost' custom metadata: {info.to_dict()}"
    assert custom.get("kind") == "firmware"
    assert custom.get("version") == "1.0.0"
    assert custom.get("hardware_class") == "rpi4"
    assert custom.get("expected_measurement", {}).get("sha256") == \
        hashlib.sha256(FW_BYTES).hexdigest()


# --------------------------------------------------------------------- (a)
def test_reference_client_downloads_firmware_published_through_server(tmp_path, published):
    repo, server, _ = published
    up = _reference_updater(tmp_path, repo.root1, f"{server.url}/metadata/",
                            f"{server.url}/targets/")
    up.refresh()
    info = up.get_targetinfo(FW_PATH)
    assert info is not None, "python-tuf cannot find the published firmware"
    assert info.length == len(FW_BYTES)
    _check_custom(info)
    path = up.download_target(info)
    assert Path(path).read_bytes() == FW_BYTES
    # the firmware target is signed by the delegated role, not top-level targets
    status, targets = server.metadata("targets.json")
    if status == 200:
        assert FW_PATH not in json.loads(targets)["signed"]["targets"]


def test_agent_downloads_firmware_published_through_server(tmp_path, published):
    repo, server, _ = published
    client = TufClient(tmp_path / "agent", metadata_url=f"{server.url}/metadata/",
                       targets_url=f"{server.url}/targets/")
    assert_ok(client.init(repo.root1))
    assert_ok(client.refresh())
    res = assert_ok(client.download(FW_PATH))
    assert client.stored_target(FW_PATH) == FW_BYTES, res.describe()
    assert (client.metadata_dir / "firmware.json").exists()


def test_reference_client_reads_role_whose_name_needs_quoting(tmp_path, outpost_repo, outpost_server):
    """A delegated role named "rpi4 boards": clients ask for `N.rpi4%20boards.json`
    (URL-quoted role name) and the server must serve that file (it answered 404, so no
    client could reach anything such a role signed)."""
    server, token = outpost_server
    outpost_repo.cli("repo", "delegate", "--repo", outpost_repo.dir, "--parent", "firmware",
                     "--role", "rpi4 boards", "--delegate-key", outpost_repo.key("rpi4"),
                     "--paths", "firmware/rpi4/*/*", "--sign-key", outpost_repo.key("firmware"))
    outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", server.url,
                     "--token", token)
    outpost_repo.publish(FW_BYTES, "1.0.0", key="rpi4", server=server, token=token,
                         extra=("--role", "rpi4 boards"))
    status, _ = server.metadata("1.rpi4%20boards.json")
    assert status == 200, f"GET /metadata/1.rpi4%20boards.json answered {status}"
    up = _reference_updater(tmp_path, outpost_repo.root1, f"{server.url}/metadata/",
                            f"{server.url}/targets/")
    up.refresh()
    info = up.get_targetinfo(FW_PATH)
    assert info is not None, "python-tuf cannot find the firmware signed by 'rpi4 boards'"
    assert Path(up.download_target(info)).read_bytes() == FW_BYTES


def test_server_serves_range_requests_for_targets(tmp_path, published):
    repo, server, _ = published
    up = _reference_updater(tmp_path, repo.root1, f"{server.url}/metadata/",
                            f"{server.url}/targets/")
    up.refresh()
    info = up.get_targetinfo(FW_PATH)
    digest = info.hashes["sha256"]
    url = f"{server.url}/targets/firmware/rpi4/1.0.0/{digest}.fw.img"
    req = urllib.request.Request(url, headers={"Range": "bytes=5-14"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 206
        assert r.read() == FW_BYTES[5:15]


def test_offline_repository_is_a_valid_static_tuf_repository(tmp_path, outpost_repo):
    """With private snapshot/timestamp keys the local DIR alone is a TUF repo."""
    fw = tmp_path / "fw.img"
    fw.write_bytes(FW_BYTES)
    outpost_repo.cli("release", "publish", "--repo", outpost_repo.dir, "--firmware", fw,
                     "--hardware-class", "rpi4", "--version", "1.0.0",
                     "--key", outpost_repo.key("firmware"))
    handler = partial(_QuietStaticHandler, directory=str(outpost_repo.dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        up = _reference_updater(tmp_path, outpost_repo.root1, f"{base}/metadata/",
                                f"{base}/targets/")
        up.refresh()
        info = up.get_targetinfo(FW_PATH)
        assert info is not None
        _check_custom(info)
        assert Path(up.download_target(info)).read_bytes() == FW_BYTES

        client = TufClient(tmp_path / "agent", metadata_url=f"{base}/metadata/",
                           targets_url=f"{base}/targets/")
        assert_ok(client.init(outpost_repo.root1))
        assert_ok(client.download(FW_PATH))
        assert client.stored_target(FW_PATH) == FW_BYTES
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietStaticHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


def test_root_rotation_made_by_cli_is_followed(tmp_path, outpost_repo):
    """`outpost repo rotate-root` output verifies with python-tuf from root v1."""
    # root1 is rotated out, root4 comes in; root2+root3 meet both thresholds.
    outpost_repo.cli("repo", "rotate-root", "--repo", outpost_repo.dir,
                     "--sign-key", outpost_repo.key("root2"), "--sign-key", outpost_repo.key("root3"),
                     "--root-key", outpost_repo.key("root2"), "--root-key", outpost_repo.key("root3"),
                     "--root-key", outpost_repo.key("root4"), "--threshold", "2")
    meta = outpost_repo.dir / "metadata"
    assert (meta / "2.root.json").exists()
    handler = partial(_QuietStaticHandler, directory=str(outpost_repo.dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        up = _reference_updater(tmp_path, outpost_repo.root1, f"{base}/metadata/",
                                f"{base}/targets/")
        up.refresh()
        trusted = (tmp_path / "ref-metadata" / "root.json").read_bytes()
        assert trusted == (meta / "2.root.json").read_bytes()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_cli_refuses_root_rotation_below_new_threshold(outpost_repo):
    # root1 + root2 sign, but only root2 is among the new keys (threshold 2).
    res = outpost_repo.cli("repo", "rotate-root", "--repo", outpost_repo.dir,
                           "--sign-key", outpost_repo.key("root1"),
                           "--sign-key", outpost_repo.key("root2"),
                           "--root-key", outpost_repo.key("root2"),
                           "--root-key", outpost_repo.key("root3"),
                           "--root-key", outpost_repo.key("root4"), "--threshold", "2",
                           check=False)
    assert res.returncode != 0, res.describe()
    assert "threshold" in res.stderr.lower() or "signature" in res.stderr.lower(), res.describe()
    assert not (outpost_repo.dir / "metadata" / "2.root.json").exists()


# --------------------------------------------------------------------- (b)
def test_agent_reads_repository_written_by_python_tuf(ready_client, sim):
    """The simulator is python-tuf's Metadata API: delegations, custom fields,
    hashes in snapshot/timestamp meta -- the agent must accept all of it."""
    sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
    sim.add_target("firmware", FW_PATH, FW_BYTES, custom={"outpost": {
        "kind": "firmware", "version": "1.0.0", "hardware_class": "rpi4",
        "expected_measurement": {"sha256": hashlib.sha256(FW_BYTES).hexdigest()}}})
    sim.publish("targets", "firmware", hashes=True)
    res = assert_ok(ready_client.download(FW_PATH))
    assert ready_client.stored_target(FW_PATH) == FW_BYTES, res.describe()
    assert ready_client.trusted("firmware") == sim.files["metadata/1.firmware.json"]


# --------------------------------------------------------------------- (c)
def _served_state(server: OutpostServer) -> dict[str, bytes]:
    state = {}
    for name in ("timestamp.json",):
        status, body = server.metadata(name)
        assert status == 200, f"server does not serve {name}: {status}"
        state[name] = body
    ts = json.loads(state["timestamp.json"])
    snap_v = ts["signed"]["meta"]["snapshot.json"]["version"]
    status, body = server.metadata(f"{snap_v}.snapshot.json")
    assert status == 200
    state["snapshot"] = body
    return state


def _copy_repo(repo: OutpostRepo, name: str) -> Path:
    dst = repo.base / name
    shutil.copytree(repo.dir, dst)
    return dst


def _corrupt_signatures(meta_file: Path) -> None:
    doc = json.loads(meta_file.read_bytes())
    for sig in doc["signatures"]:
        s = sig["sig"]
        sig["sig"] = ("0" if s[0] != "0" else "1") + s[1:]
    meta_file.write_text(json.dumps(doc))


def test_server_refuses_push_with_bad_signature(published):
    repo, server, token = published
    before = _served_state(server)
    bad = _copy_repo(repo, "bad-sig")
    repo.delegate_firmware(repo=bad, role="extra", paths="extra/*")  # new targets version
    meta = bad / "metadata"
    targets_files = [p for p in meta.iterdir() if p.name.endswith("targets.json")]
    assert targets_files
    for p in targets_files:
        _corrupt_signatures(p)
    res = repo.cli("repo", "push", "--repo", bad, "--server", server.url, "--token", token,
                   check=False)
    assert res.returncode != 0, "push of badly signed metadata succeeded\n" + res.describe()
    assert any(w in (res.stderr + res.stdout).lower() for w in ("signature", "threshold", "40")), \
        res.describe()
    assert _served_state(server) == before, "server changed what it serves after a bad push"


def test_server_refuses_stale_push(tmp_path, published):
    repo, server, token = published
    stale = _copy_repo(repo, "stale")
    fw = tmp_path / "fw.img"
    fw.write_bytes(FW_BYTES + b"-1.0.1")
    repo.cli("release", "publish", "--repo", repo.dir, "--firmware", fw,
             "--hardware-class", "rpi4", "--version", "1.0.1",
             "--key", repo.key("firmware"), "--server", server.url, "--token", token)
    after_good = _served_state(server)
    # The stale copy signs the same firmware role version with other content.
    fw.write_bytes(FW_BYTES + b"-1.0.2")
    res = repo.cli("release", "publish", "--repo", stale, "--firmware", fw,
                   "--hardware-class", "rpi4", "--version", "1.0.2",
                   "--key", repo.key("firmware"), "--server", server.url, "--token", token,
                   check=False)
    assert res.returncode != 0, "stale publish succeeded\n" + res.describe()
    out = (res.stderr + res.stdout).lower()
    assert any(w in out for w in ("version", "stale", "newer")), res.describe()
    assert _served_state(server) == after_good


def test_publish_api_requires_token(published):
    _, server, _ = published
    before = _served_state(server)
    status, _ = http_post(f"{server.url}/api/v1/publish", b"{}", None, "application/json")
    assert status == 401, f"POST /api/v1/publish without a token answered {status}"
    status, _ = http_post(f"{server.url}/api/v1/targets", b"data", "not-a-token",
                          "application/octet-stream")
    assert status in (401, 403), f"POST /api/v1/targets with a bad token answered {status}"
    assert _served_state(server) == before


def test_publish_api_rejects_garbage_with_4xx(published):
    _, server, token = published
    before = _served_state(server)
    status, body = http_post(f"{server.url}/api/v1/publish", b'{"not": "metadata"}', token,
                             "application/json")
    assert 400 <= status < 500, f"garbage publish answered {status}: {body[:300]!r}"
    assert _served_state(server) == before


def test_repository_api_describes_the_repository(published):
    _, server, token = published
    status, body = http_get(f"{server.url}/api/v1/repository", token=token)
    assert status == 200, body[:300]
    assert isinstance(json.loads(body), dict)


def _local_role(repo_dir: Path, role: str) -> dict:
    return json.loads((repo_dir / "metadata" / f"{role}.json").read_bytes())


def test_publish_api_refuses_bad_signature_with_4xx(published):
    repo, server, token = published
    before = _served_state(server)
    work = _copy_repo(repo, "bad-sig-api")
    repo.delegate_firmware(repo=work, role="extra", paths="extra/*")  # targets version + 1
    doc = _local_role(work, "targets")
    for sig in doc["signatures"]:
        sig["sig"] = ("0" if sig["sig"][0] != "0" else "1") + sig["sig"][1:]
    body = json.dumps({"roles": {"targets": doc, "extra": _local_role(work, "extra")}}).encode()
    status, answer = http_post(f"{server.url}/api/v1/publish", body, token, "application/json")
    assert 400 <= status < 500, f"badly signed publish answered {status}: {answer[:300]!r}"
    assert _served_state(server) == before, "server changed what it serves after a refused publish"


def test_publish_api_refuses_stale_version_with_4xx(published):
    repo, server, token = published
    stale_targets = _local_role(repo.dir, "targets")     # the version the server has now
    repo.delegate_firmware(role="extra", paths="extra/*")
    repo.cli("repo", "push", "--repo", repo.dir, "--server", server.url, "--token", token)
    after = _served_state(server)
    body = json.dumps({"roles": {"targets": stale_targets}}).encode()
    status, answer = http_post(f"{server.url}/api/v1/publish", body, token, "application/json")
    assert 400 <= status < 500, f"stale publish answered {status}: {answer[:300]!r}"
    assert _served_state(server) == after
