"""Key types: Outpost signs with ed25519, but as a TUF client the agent must
verify the standard key schemes other repositories use (the tuf-conformance
suite signs with ecdsa-sha2-nistp256 by default)."""

from __future__ import annotations

import json

import pytest

from conftest import SIG_WORDS, TufClient, assert_fails, assert_ok
from reposim import KEY_GENERATORS

SCHEMES = list(KEY_GENERATORS)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_repository_signed_with_key_scheme(make_sim, tmp_path, scheme):
    sim = make_sim(scheme=scheme)
    sim.add_delegation("targets", "apps", paths=["apps/*"])
    sim.add_target("apps", "apps/x", b"payload")
    sim.rotate_root()
    sim.publish("targets", "apps")
    client = TufClient(tmp_path / "c", sim)
    assert_ok(client.init())
    res = assert_ok(client.download("apps/x"))
    assert client.stored_target("apps/x") == b"payload", res.describe()
    assert client.trusted("root") == sim.root_history[2]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bad_signature_with_key_scheme_is_rejected(make_sim, tmp_path, scheme):
    sim = make_sim(scheme=scheme)
    client = TufClient(tmp_path / "c", sim)
    assert_ok(client.init())
    assert_ok(client.refresh())
    before = client.trusted("timestamp")
    sim.publish(snapshot=False)
    doc = json.loads(sim.files["metadata/timestamp.json"])
    sig = doc["signatures"][0]["sig"]
    doc["signatures"][0]["sig"] = sig[:-4] + ("0000" if sig[-4:] != "0000" else "1111")
    sim.misbehave("metadata/timestamp.json", "bytes", data=json.dumps(doc).encode())
    assert_fails(client.refresh(), *SIG_WORDS)
    assert client.trusted("timestamp") == before
