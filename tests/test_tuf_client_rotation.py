"""Root chain updates and key rotations (incl. fast-forward recovery)."""

from __future__ import annotations

from conftest import SIG_WORDS, assert_fails, assert_ok, trusted_version


def _grow_root_to_2_of_3(sim):
    sim.add_key("root")
    sim.add_key("root")
    sim.set_threshold("root", 2)


def test_root_chain_1_to_3_with_threshold_change(ready_client, sim):
    sim.rotate_root(_grow_root_to_2_of_3)          # v2: 2-of-3, signed by v1 key + new keys

    def rotate_one_root_key(s):                    # v3: one of the three keys replaced
        s.revoke_key("root", s.signers["root"][0])
        s.add_key("root")
    sim.rotate_root(rotate_one_root_key)
    sim.publish()

    res = assert_ok(ready_client.refresh())
    md = sim.metadata_requests()
    assert md[:4] == ["metadata/2.root.json", "metadata/3.root.json", "metadata/4.root.json",
                      "metadata/timestamp.json"], res.describe()
    assert ready_client.trusted("root") == sim.root_history[3]


def test_root_rotation_signed_by_exact_thresholds(ready_client, sim):
    """v2 is 2-of-3; v3 is signed by exactly 2 of the v2 keys and 2 of its own."""
    sim.rotate_root(_grow_root_to_2_of_3)
    k1, k2, k3 = sim.signers["root"]

    def swap(s):
        s.revoke_key("root", k1)
        s.add_key("root")
    sim.rotate_root(swap)
    k4 = sim.signers["root"][-1]
    # k2 + k4: meets the new threshold but only one v2 key signed: refused
    sim.publish_root([k2, k4])
    res = assert_fails(ready_client.refresh(), *SIG_WORDS)
    assert trusted_version(ready_client.trusted("root")) == 2, res.describe()
    # ... and k2+k3 (2 old, 2 new) is accepted
    sim.publish_root([k2, k3])
    sim.publish()
    assert_ok(ready_client.refresh())
    assert ready_client.trusted("root") == sim.root_history[3]


def test_timestamp_key_rotation_allows_version_fast_forward_recovery(ready_client, sim):
    # The repository's timestamp was pushed far ahead (e.g. by an attacker
    # holding the old timestamp key).
    sim.roles["timestamp"].signed.version = 99
    sim.update_timestamp()                       # v100
    assert_ok(ready_client.refresh())
    assert trusted_version(ready_client.trusted("timestamp")) == 100

    sim.rotate_root(lambda s: s.replace_keys("timestamp"))
    sim.roles["timestamp"].signed.version = 0
    sim.update_timestamp()                       # v1 signed with the new key
    res = assert_ok(ready_client.refresh())
    assert trusted_version(ready_client.trusted("timestamp")) == 1, res.describe()
    assert ready_client.trusted("timestamp") == sim.files["metadata/timestamp.json"]


def test_snapshot_key_rotation_allows_version_fast_forward_recovery(ready_client, sim):
    sim.roles["snapshot"].signed.version = 49
    sim.publish()                                # snapshot v50
    assert_ok(ready_client.refresh())
    assert trusted_version(ready_client.trusted("snapshot")) == 50

    def rotate(s):
        s.replace_keys("snapshot")
        s.replace_keys("timestamp")
    sim.rotate_root(rotate)
    sim.roles["snapshot"].signed.version = 0
    sim.roles["timestamp"].signed.version = 0
    sim.publish()                                # snapshot v1, timestamp v1, new keys
    res = assert_ok(ready_client.refresh())
    assert trusted_version(ready_client.trusted("snapshot")) == 1, res.describe()


def test_targets_version_fast_forward_recovery_via_snapshot_key_rotation(ready_client, sim):
    sim.roles["targets"].signed.version = 49
    sim.publish("targets")                       # targets v50
    assert_ok(ready_client.refresh())
    assert trusted_version(ready_client.trusted("targets")) == 50

    sim.rotate_root(lambda s: s.replace_keys("snapshot"))
    sim.roles["targets"].signed.version = 0
    sim.publish("targets")                       # targets v1, listed by new-key snapshot
    res = assert_ok(ready_client.refresh())
    assert trusted_version(ready_client.trusted("targets")) == 1, res.describe()


def test_rotated_out_timestamp_key_is_no_longer_trusted(ready_client, sim):
    assert_ok(ready_client.refresh())
    old = list(sim.signers["timestamp"])
    sim.rotate_root(lambda s: s.replace_keys("timestamp"))
    sim.roles["timestamp"].signed.version += 1
    sim.sign_and_serve("timestamp", signers=old)  # still signed with the revoked key
    before = ready_client.trusted("timestamp")
    assert_fails(ready_client.refresh(), *SIG_WORDS)
    assert ready_client.trusted("root") == sim.root_history[2]
    assert ready_client.trusted("timestamp") in (before, None)
    assert ready_client.trusted("timestamp") != sim.files["metadata/timestamp.json"]
