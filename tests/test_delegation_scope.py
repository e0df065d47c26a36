"""What the server offers devices is what a conformant TUF client resolves.

The director offers a release (an operator can create a rollout for it), the SBOM
search lists it and attestation accepts its expected measurement only when the
delegation search of the TUF client workflow (5.6.7.2: pre-order, every hop
delegates the path, `terminating` honoured) reaches the role that signs it, and the
release's path names the hardware class its metadata claims. python-tuf's ngclient is
the referee in each case. Revoking a delegation (`outpost repo undelegate`) works
with the parent's keys alone, and clients then no longer see the revoked role's
targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuf.ngclient import Updater

from conftest import REPO_ROOT, OutpostRepo, TufClient, http_get

CARGO_LOCK = REPO_ROOT / "Cargo.lock"


@pytest.fixture
def setup(outpost_repo, server_factory):
    """`outpost_repo` (targets -> firmware firmware/rpi4/*/*) pushed to a server; an
    operator token."""
    server, token = server_factory(outpost_repo)
    push(outpost_repo, server, token)
    return outpost_repo, server, token, server.token("ops", role="operator")


def push(repo: OutpostRepo, server, token, check: bool = True):
    return repo.cli("repo", "push", "--repo", repo.dir, "--server", server.url, "--token", token, check=check)


def delegate(repo: OutpostRepo, role: str, paths: str, parent: str = "targets", terminating: bool = False,
             key: str | None = None):
    repo.cli("repo", "delegate", "--repo", repo.dir, "--parent", parent, "--role", role,
             "--delegate-key", repo.key(key or role), "--threshold", "1", "--paths", paths,
             "--sign-key", repo.key(parent), *(["--terminating"] if terminating else []))


def release(repo: OutpostRepo, version: str, role: str, server=None, token=None, check=True,
            hardware_class: str = "rpi4", key: str | None = None):
    """`outpost release publish` of a small image with an SBOM (this repository's
    Cargo.lock), signed by `role`; pushed when `server` is given."""
    fw = repo.base / "builds" / role / version / "fw.img"
    fw.parent.mkdir(parents=True, exist_ok=True)
    fw.write_bytes(f"{role} {version}".encode())
    args = ["release", "publish", "--repo", repo.dir, "--firmware", fw, "--hardware-class", hardware_class,
            "--version", version, "--role", role, "--key", repo.key(key or role),
            "--sbom-cargo-lock", CARGO_LOCK]
    if server is not None:
        args += ["--server", server.url, "--token", token]
    return repo.cli(*args, check=check)


def offered(repo: OutpostRepo, server, op: str, version: str, hardware_class: str = "rpi4") -> bool:
    """Whether the director offers `version`: an operator can create a rollout of it."""
    res = repo.cli("rollout", "create", "--version", version, "--hardware-class", hardware_class,
                   "--waves", "100", "--server", server.url, "--token", op, "--json", check=False)
    if res.returncode == 0:
        return True
    assert "no signed full-image release" in res.stderr, res.describe()
    return False


def sbom_releases(repo: OutpostRepo, server, op: str) -> set[str]:
    res = repo.cli("sbom", "search", "serde", "--server", server.url, "--token", op, "--json")
    return {r["target"] for r in json.loads(res.stdout)["releases"]}


def reference(repo: OutpostRepo, server, tmp_path: Path, path: str, name: str):
    """python-tuf's ngclient, from root v1: the target it resolves for `path`."""
    md, tg = tmp_path / f"ng-{name}", tmp_path / f"ng-{name}-targets"
    md.mkdir()
    tg.mkdir()
    (md / "root.json").write_bytes(repo.root1)
    up = Updater(str(md), f"{server.url}/metadata/", str(tg), f"{server.url}/targets/", bootstrap=None)
    up.refresh()
    return up.get_targetinfo(path)


def fw_path(version: str, hardware_class: str = "rpi4") -> str:
    return f"firmware/{hardware_class}/{version}/fw.img"


def test_sub_delegation_escaping_its_parents_paths_is_not_offered(tmp_path, setup):
    """targets gives fw-beta only firmware/rpi4/*-beta/*; fw-beta delegates X
    firmware/rpi4/*/*. X's 9.9.9 is outside its chain (fw-beta's hop does not match)."""
    repo, server, token, op = setup
    delegate(repo, "fw-beta", "firmware/rpi4/*-beta/*")
    delegate(repo, "X", "firmware/rpi4/*/*", parent="fw-beta")
    push(repo, server, token)
    release(repo, "2.0.0-beta", "X", server, token)
    assert offered(repo, server, op, "2.0.0-beta"), "a release inside every hop's paths must be offered"
    assert fw_path("2.0.0-beta") in sbom_releases(repo, server, op)

    res = release(repo, "9.9.9", "X", server, token, check=False)
    # The server refuses the upload or keeps it out of what it offers; either way:
    assert reference(repo, server, tmp_path, fw_path("9.9.9"), "ref") is None
    assert not offered(repo, server, op, "9.9.9"), "the director offers a release no client resolves\n" + res.describe()
    assert fw_path("9.9.9") not in sbom_releases(repo, server, op)


def test_narrowing_a_delegation_stops_offering_what_falls_outside(tmp_path, setup):
    """The parent narrows fw-beta after X signed 9.9.9: without X's keys, X's 9.9.9
    is no longer reachable, and no longer offered."""
    repo, server, token, op = setup
    delegate(repo, "fw-beta", "firmware/rpi4/*/*")
    delegate(repo, "X", "firmware/rpi4/*/*", parent="fw-beta")
    push(repo, server, token)
    release(repo, "9.9.9", "X", server, token)
    assert offered(repo, server, op, "9.9.9")
    delegate(repo, "fw-beta", "firmware/rpi4/*-beta/*")   # targets re-signed, X untouched
    push(repo, server, token)
    assert reference(repo, server, tmp_path, fw_path("9.9.9"), "ref") is None
    assert not offered(repo, server, op, "9.9.9"), "the director still offers a release the narrowed chain does not reach"
    assert fw_path("9.9.9") not in sbom_releases(repo, server, op)


def test_role_behind_a_terminating_sibling_is_not_offered(tmp_path, setup):
    """targets delegates firmware, then stable (terminating), then late, all
    firmware/rpi4/*/*: the search ends at stable, so late's 9.9.9 is no target."""
    repo, server, token, op = setup
    delegate(repo, "stable", "firmware/rpi4/*/*", terminating=True)
    delegate(repo, "late", "firmware/rpi4/*/*")
    push(repo, server, token)
    release(repo, "9.9.9", "late", server, token, check=False)
    assert reference(repo, server, tmp_path, fw_path("9.9.9"), "ref") is None
    assert not offered(repo, server, op, "9.9.9"), "the director offers a release behind a terminating role"
    assert fw_path("9.9.9") not in sbom_releases(repo, server, op)
    # What the terminating role signs itself is offered.
    release(repo, "1.5.0", "stable", server, token)
    assert offered(repo, server, op, "1.5.0")


def _resign(repo: OutpostRepo, role: str, key: str, change) -> None:
    """Edits the local `role` metadata with change(signed) and signs it again with
    `key` (what a holder of that role's key can do)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.formats import encode_canonical
    meta = repo.dir / "metadata"
    doc = json.loads((meta / f"{role}.json").read_bytes())
    change(doc["signed"])
    k = json.loads(repo.key(key).read_text())
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(k["keyval"]["private"]))
    sig = private.sign(encode_canonical(doc["signed"]).encode()).hex()
    doc["signatures"] = [{"keyid": doc["signatures"][0]["keyid"], "sig": sig}]
    data = json.dumps(doc, indent=2).encode()
    (meta / f"{role}.json").write_bytes(data)
    (meta / f"{doc['signed']['version']}.{role}.json").write_bytes(data)


def test_firmware_whose_class_differs_from_its_path_is_not_offered(tmp_path, setup):
    """The firmware role (firmware/rpi4/*/*) signs firmware/rpi4/9.9.9/fw.img with
    hardware_class x86: it cannot speak for x86 devices (nor is it an rpi4 release)."""
    repo, server, token, op = setup
    release(repo, "9.9.9", "firmware")            # offline: signed, not pushed
    _resign(repo, "firmware", "firmware",
            lambda s: s["targets"][fw_path("9.9.9")]["custom"]["outpost"].update({"hardware_class": "x86"}))
    push(repo, server, token, check=False)
    assert not offered(repo, server, op, "9.9.9", "x86"), "an rpi4 delegation put a release into class x86"
    assert not offered(repo, server, op, "9.9.9", "rpi4")


def test_revoking_a_delegation_then_publishing_works(tmp_path, setup):
    """A compromised delegated role is revoked with the parent's keys alone; the push
    lands, the role leaves the snapshot, clients and the director no longer see its
    targets, later publishes work, and the role can be delegated again (new keys)."""
    repo, server, token, op = setup
    delegate(repo, "compromised", "firmware/rpi4/*/*")
    push(repo, server, token)
    release(repo, "5.0.0", "compromised", server, token)
    assert offered(repo, server, op, "5.0.0")
    assert reference(repo, server, tmp_path, fw_path("5.0.0"), "before") is not None

    res = repo.cli("repo", "undelegate", "--repo", repo.dir, "--role", "compromised",
                   "--sign-key", repo.key("targets"), "--json")
    assert json.loads(res.stdout)["removed_roles"] == ["compromised"], res.describe()
    res = push(repo, server, token, check=False)
    assert res.returncode == 0, "the push revoking a delegation was refused\n" + res.describe()

    status, body = http_get(f"{server.url}/metadata/timestamp.json")
    snapshot_version = json.loads(body)["signed"]["meta"]["snapshot.json"]["version"]
    status, body = http_get(f"{server.url}/metadata/{snapshot_version}.snapshot.json")
    assert "compromised.json" not in json.loads(body)["signed"]["meta"], "the revoked role is still in the snapshot"
    assert reference(repo, server, tmp_path, fw_path("5.0.0"), "after") is None
    client = TufClient(tmp_path / "tc", metadata_url=f"{server.url}/metadata/", targets_url=f"{server.url}/targets/")
    assert client.init(root=repo.root1).returncode == 0
    res = client.download(fw_path("5.0.0"))
    assert res.returncode != 0 and client.stored_target(fw_path("5.0.0")) is None, res.describe()
    assert not offered(repo, server, op, "5.0.0"), "the director still offers the revoked role's release"
    assert fw_path("5.0.0") not in sbom_releases(repo, server, op)

    # Publishing goes on.
    release(repo, "1.0.1", "firmware", server, token)
    assert offered(repo, server, op, "1.0.1")
    # Delegated again, with a new key: its numbering continues past what was served.
    delegate(repo, "compromised", "firmware/rpi4/*/*", key="compromised-2")
    release(repo, "5.0.1", "compromised", server, token, key="compromised-2")
    assert offered(repo, server, op, "5.0.1")
    assert not offered(repo, server, op, "5.0.0")
    assert reference(repo, server, tmp_path, fw_path("5.0.1"), "again") is not None
