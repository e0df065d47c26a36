"""Attacks from the TUF threat model against `outpost-agent tuf-client`.

Every attack must end with exit code 1, an error on stderr naming the problem,
nothing in the target dir, and the attacked role's trusted metadata untouched.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta

import pytest

from conftest import (EXPIRY_WORDS, HASH_WORDS, LENGTH_WORDS, SIG_WORDS, VERSION_WORDS,
                      TufClient, assert_fails, assert_ok, trusted_version)
from reposim import expires_in, new_signer

FW = "firmware/rpi4/1.0.0/fw.img"
IMAGE = b"genuine firmware image " * 100



@pytest.fixture
def fw_client(ready_client, sim) -> TufClient:
    """A client that has refreshed once against a repo listing FW."""
    sim.add_target("targets", FW, IMAGE)
    sim.publish("targets")
    assert_ok(ready_client.refresh())
    return ready_client


def _attack(client: TufClient, *words: str, role: str | None = None, **kw):
    """Run a download of FW, expect the failure, nothing written, `role` untouched."""
    before = client.trusted_files()
    res = assert_fails(client.download(FW, **kw), *words)
    assert client.target_files() == {}, "target dir must stay empty\n" + res.describe()
    if role is not None:
        name = f"{role}.json"
        assert client.trusted_files().get(name) == before.get(name), (
            f"trusted {name} was replaced by the attacker's\n" + res.describe())
    return res


# ------------------------------------------------------------------ rollback
def test_timestamp_rollback(fw_client, sim):
    old = sim.files["metadata/timestamp.json"]        # v2
    sim.publish(snapshot=False)                        # v3
    assert_ok(fw_client.refresh())
    sim.misbehave("metadata/timestamp.json", "bytes", data=old)
    _attack(fw_client, *VERSION_WORDS, role="timestamp")
    assert trusted_version(fw_client.trusted("timestamp")) == 3


def test_snapshot_rollback_in_new_timestamp(fw_client, sim):
    sim.publish()                                      # snapshot v3, timestamp v3
    assert_ok(fw_client.refresh())
    # timestamp v4 points back at snapshot v2 (still served)
    ts = sim.roles["timestamp"].signed
    ts.snapshot_meta.version = 2
    ts.version += 1
    sim.sign_and_serve("timestamp")
    _attack(fw_client, *VERSION_WORDS, role="timestamp")
    assert trusted_version(fw_client.trusted("snapshot")) == 3


def test_snapshot_rollback_served_in_place_plain_repo(make_sim, tmp_path):
    sim = make_sim(consistent_snapshot=False)
    sim.add_target("targets", FW, IMAGE)
    sim.publish("targets")
    client = TufClient(tmp_path / "c", sim)
    assert_ok(client.init())
    assert_ok(client.refresh())
    old_snapshot = sim.files["metadata/snapshot.json"]  # v2
    sim.publish()                                        # snapshot v3, timestamp v3
    sim.misbehave("metadata/snapshot.json", "bytes", data=old_snapshot)
    _attack(client, *VERSION_WORDS, role="snapshot")
    assert trusted_version(client.trusted("snapshot")) == 2


def test_targets_rollback(fw_client, sim):
    sim.publish("targets")                             # targets v3
    assert_ok(fw_client.refresh())
    assert trusted_version(fw_client.trusted("targets")) == 3
    snap = sim.roles["snapshot"].signed
    snap.meta["targets.json"].version = 2             # new snapshot lists old targets
    snap.version += 1
    sim.sign_and_serve("snapshot")
    sim.update_timestamp()
    _attack(fw_client, *VERSION_WORDS, role="snapshot")
    assert trusted_version(fw_client.trusted("targets")) == 3


def test_delegated_role_rollback(ready_client, sim):
    sim.add_delegation("targets", "fw", paths=["firmware/*/*/*"])
    sim.add_target("fw", FW, IMAGE)
    sim.publish("targets", "fw")
    sim.publish("fw")                                  # fw v2
    assert_ok(ready_client.download(FW))
    for f in ready_client.target_dir.iterdir():
        f.unlink()
    snap = sim.roles["snapshot"].signed
    snap.meta["fw.json"].version = 1
    snap.version += 1
    sim.sign_and_serve("snapshot")
    sim.update_timestamp()
    _attack(ready_client, *VERSION_WORDS, role="snapshot")


# -------------------------------------------------------------------- freeze
def test_freeze_expired_timestamp(fw_client, sim):
    sim.roles["timestamp"].signed.expires = expires_in(hours=-1)
    sim.update_timestamp()
    _attack(fw_client, *EXPIRY_WORDS, role="timestamp")


def test_freeze_expired_snapshot(fw_client, sim):
    sim.roles["snapshot"].signed.expires = expires_in(minutes=-5)
    sim.publish()
    _attack(fw_client, *EXPIRY_WORDS, role="snapshot")


def test_freeze_first_refresh_with_expired_timestamp(ready_client, sim):
    sim.add_target("targets", FW, IMAGE)
    sim.roles["timestamp"].signed.expires = expires_in(seconds=-30)
    sim.publish("targets")
    _attack(ready_client, *EXPIRY_WORDS, role="timestamp")
    assert ready_client.trusted("timestamp") is None


# ------------------------------------------------------- arbitrary software
def test_arbitrary_software_wrong_target_hash(fw_client, sim):
    evil = bytearray(IMAGE)
    evil[10] ^= 0xFF
    sim.misbehave(sim.target_path(FW), "bytes", data=bytes(evil))
    _attack(fw_client, *HASH_WORDS)


def test_arbitrary_software_shorter_target(fw_client, sim):
    sim.misbehave(sim.target_path(FW), "bytes", data=IMAGE[:-7])
    _attack(fw_client, *(LENGTH_WORDS + HASH_WORDS))


# ------------------------------------------------------------- endless data
def test_endless_target_data(fw_client, sim):
    bad = sim.misbehave(sim.target_path(FW), "endless", data=b"E")
    start = time.monotonic()
    _attack(fw_client, *LENGTH_WORDS)
    assert time.monotonic() - start < 30
    assert bad.sent < bad.limit, "client read far beyond the target's length"


def test_endless_timestamp(ready_client, sim):
    bad = sim.misbehave("metadata/timestamp.json", "endless", data=b" ")
    _attack(ready_client, *LENGTH_WORDS, role="timestamp")
    assert bad.sent < bad.limit, "client read far beyond the timestamp size limit"


def test_oversized_timestamp(ready_client, sim):
    # A valid timestamp padded with whitespace to 20 KiB (limit: 16 KiB).
    padded = sim.files["metadata/timestamp.json"] + b" " * (20 * 1024)
    sim.misbehave("metadata/timestamp.json", "bytes", data=padded)
    _attack(ready_client, *LENGTH_WORDS, role="timestamp")
    assert ready_client.trusted("timestamp") is None


def test_endless_snapshot_beyond_length_in_timestamp(ready_client, sim):
    sim.add_target("targets", FW, IMAGE)
    sim.publish("targets", hashes=True)  # timestamp records snapshot length
    bad = sim.misbehave(sim.role_path("snapshot"), "endless", data=b" ")
    _attack(ready_client, *(LENGTH_WORDS + HASH_WORDS), role="snapshot")
    assert bad.sent < bad.limit


# ------------------------------------------------------------ mix-and-match
def test_mix_and_match_old_targets_under_new_name(fw_client, sim):
    old_targets = sim.files["metadata/2.targets.json"]
    sim.publish("targets")                             # snapshot says targets v3
    sim.misbehave("metadata/3.targets.json", "bytes", data=old_targets)
    _attack(fw_client, *VERSION_WORDS, role="targets")
    assert trusted_version(fw_client.trusted("targets")) == 2


def test_mix_and_match_hash_mismatch(fw_client, sim):
    sim.add_target("targets", "other", b"other")
    sim.publish("targets", hashes=True)                # snapshot pins targets v3 hash
    genuine = sim.files["metadata/3.targets.json"]
    # A different, validly signed targets v3 (as if from another snapshot).
    sim.add_target("targets", FW, b"a different image")
    forged = sim.sign_and_serve("targets")
    assert forged != genuine
    sim.files["metadata/3.targets.json"] = genuine
    sim.misbehave("metadata/3.targets.json", "bytes", data=forged)
    _attack(fw_client, *(HASH_WORDS + LENGTH_WORDS), role="targets")


# ----------------------------------------------------------- bad signatures
def test_root_update_below_old_threshold(ready_client, sim):
    # v2 is 2-of-2 (k1, k2); v3 (2-of-3) is signed by k1 and the new k3 only:
    # enough for v3's own threshold, one short of v2's.
    sim.rotate_root(lambda s: (s.add_key("root"), s.set_threshold("root", 2)))
    sim.publish()
    assert_ok(ready_client.refresh())
    assert trusted_version(ready_client.trusted("root")) == 2
    k1, k2 = sim.signers["root"]
    sim.rotate_root(lambda s: s.add_key("root"))       # v3: 2-of-3
    k3 = sim.signers["root"][-1]
    sim.publish_root([k1, k3])                         # only 1 of v2's keys signed
    sim.clear_requests()
    res = _attack(ready_client, *SIG_WORDS, role="root")
    assert trusted_version(ready_client.trusted("root")) == 2
    assert "metadata/timestamp.json" not in sim.requests, \
        "client went on after a bad root\n" + res.describe()


def test_root_update_not_signed_by_new_keys(ready_client, sim):
    old = list(sim.signers["root"])
    sim.rotate_root(lambda s: s.replace_keys("root"), signers=old)  # new key didn't sign
    _attack(ready_client, *SIG_WORDS, role="root")
    assert ready_client.trusted("root") == sim.root_history[1]


def test_timestamp_signed_by_key_not_in_root(fw_client, sim):
    ts = sim.roles["timestamp"].signed
    ts.version += 1
    sim.sign_and_serve("timestamp", signers=[new_signer()])
    _attack(fw_client, *SIG_WORDS, role="timestamp")


def test_targets_signed_by_key_not_in_root(fw_client, sim):
    sim.add_target("targets", "more", b"more")
    sim.roles["targets"].signed.version += 1
    sim.sign_and_serve("targets", signers=[new_signer()])
    sim.update_snapshot()
    sim.update_timestamp()
    _attack(fw_client, *SIG_WORDS, role="targets")


def test_delegated_role_signed_by_wrong_key(ready_client, sim):
    sim.add_delegation("targets", "fw", paths=["firmware/*/*/*"])
    sim.add_target("fw", FW, IMAGE)
    sim.publish("targets")
    sim.sign_and_serve("fw", signers=[new_signer()])
    sim.published.add("fw")
    sim.publish()
    _attack(ready_client, *SIG_WORDS)
    assert ready_client.trusted("fw") is None


def test_tampered_signed_content_is_rejected(fw_client, sim):
    sim.publish(snapshot=False)
    doc = json.loads(sim.files["metadata/timestamp.json"])
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    later = datetime.strptime(doc["signed"]["expires"], fmt) + timedelta(days=30)
    doc["signed"]["expires"] = later.strftime(fmt)  # signature no longer covers the content
    sim.misbehave("metadata/timestamp.json", "bytes", data=json.dumps(doc).encode())
    _attack(fw_client, *SIG_WORDS, role="timestamp")


def test_garbage_timestamp_is_rejected(fw_client, sim):
    sim.misbehave("metadata/timestamp.json", "bytes", data=b"\x00not json at all{")
    _attack(fw_client, role="timestamp")


# -------------------------------------------------------------- slow retrieval
def test_stalled_metadata_server_times_out(ready_client, sim):
    sim.misbehave("metadata/timestamp.json", "stall", seconds=60)
    start = time.monotonic()
    res = _attack(ready_client, "timeout", "timed out", "time out", "slow", timeout_flag=2, timeout=40)
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"took {elapsed:.1f}s with --timeout 2\n" + res.describe()


def test_stalled_target_download_times_out(fw_client, sim):
    sim.misbehave(sim.target_path(FW), "stall", seconds=60)
    start = time.monotonic()
    res = _attack(fw_client, "timeout", "timed out", "time out", "slow", timeout_flag=2, timeout=40)
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"took {elapsed:.1f}s with --timeout 2\n" + res.describe()


def test_trickled_metadata_is_cut_off_as_slow_retrieval(ready_client, sim):
    """One byte of timestamp.json per second: never quiet for the 3 s stall timeout,
    but far below the minimum average rate (1 KiB/s by default). The refresh must
    end as a slow retrieval soon after the grace, not hold for the ~700 s the file
    takes at that pace."""
    before = ready_client.trusted("timestamp")
    sim.publish(snapshot=False)
    m = sim.misbehave("metadata/timestamp.json", "trickle", seconds=1.0)
    start = time.monotonic()
    res = assert_fails(ready_client.refresh(timeout_flag=3, timeout=120), "slow retrieval")
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"took {elapsed:.1f}s with --timeout 3\n" + res.describe()
    assert "bytes/s" in res.stderr and "timestamp.json" in res.stderr, res.describe()
    assert m.sent < len(sim.files["metadata/timestamp.json"]), "the whole file was waited for"
    assert ready_client.trusted("timestamp") == before, res.describe()


def test_trickled_target_is_cut_off_as_slow_retrieval(fw_client, sim):
    """The same against a 2.3 KB target: a file of L bytes may take at most
    timeout + L / rate seconds, and falls behind long before."""
    sim.misbehave(sim.target_path(FW), "trickle", seconds=0.5)
    start = time.monotonic()
    res = _attack(fw_client, "slow retrieval", timeout_flag=3, timeout=120)
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"took {elapsed:.1f}s with --timeout 3\n" + res.describe()
    assert "fw.img" in res.stderr, res.describe()


# ------------------------------------------- one key listed under two key ids
def _alias(sim, md, signer, alias_id: str):
    """List `signer`'s public key a second time under `alias_id` and copy its
    signature under that id: one key holder posing as two."""
    from tuf.api.metadata import Signature
    k = signer.public_key
    return type(k)(alias_id, k.keytype, k.scheme, dict(k.keyval)), \
        lambda: md.signatures.__setitem__(alias_id, Signature(alias_id, md.signatures[k.keyid].signature))


def test_threshold_counts_keys_not_key_ids_root(ready_client, sim):
    """Root v2 demands 2 root signatures and lists the one root key twice, under its
    real id and an alias, with the one signature copied under both ids. A threshold
    counts key holders: v2 must be refused and v1 kept."""
    (signer,) = sim.signers["root"]
    alias_id = "ab" * 32
    key, copy_sig = _alias(sim, sim.root, signer, alias_id)
    sim.root.signed.add_key(key, "root")
    sim.set_threshold("root", 2)
    sim.root.signed.version += 1
    sim.sign(sim.root, [signer])
    copy_sig()
    data = sim.root.to_bytes(sim.serializer)
    assert len(json.loads(data)["signatures"]) == 2
    sim.files["metadata/2.root.json"] = data
    sim.files["metadata/root.json"] = data
    res = _attack(ready_client, "threshold", role="root")
    assert ready_client.trusted("root") == sim.root_history[1], res.describe()


def test_threshold_counts_keys_not_key_ids_delegation(ready_client, sim):
    """`targets` delegates `fw` with threshold 2 over two key ids that are one key;
    fw's single signature, copied under both ids, must not make fw trusted, so the
    target fw lists does not exist."""
    sim.add_delegation("targets", "fw", paths=["firmware/*/*/*"], threshold=2)
    (signer,) = sim.signers["fw"]
    alias_id = "cd" * 32
    key, copy_sig = _alias(sim, sim.roles["fw"], signer, alias_id)
    sim.roles["targets"].signed.add_key(key, "fw")
    sim.add_target("fw", FW, IMAGE)
    sim.publish("targets", "fw")
    copy_sig()
    sim.files[sim.role_path("fw")] = sim.roles["fw"].to_bytes(sim.serializer)
    assert len(json.loads(sim.files[sim.role_path("fw")])["signatures"]) == 2
    res = assert_fails(ready_client.download(FW), "threshold")
    assert ready_client.target_files() == {}, res.describe()
    assert ready_client.trusted("fw") is None, res.describe()
