"""Expiry checks, with the client's clock moved by libfaketime.

These tests FAIL (not skip) when `faketime` is missing: apt-get install faketime.
"""

from __future__ import annotations

from conftest import EXPIRY_WORDS, assert_fails, assert_ok, trusted_version
from reposim import expires_in


def _long_lived(sim, days=60):
    """Make timestamp/snapshot/targets valid for `days` (root stays 365 d)."""
    for role in ("timestamp", "snapshot", "targets"):
        sim.roles[role].signed.expires = expires_in(days=days)


def test_faketime_within_validity_still_refreshes(ready_client, sim):
    res = assert_ok(ready_client.refresh(faketime="+12h"))
    assert ready_client.trusted("timestamp") == sim.files["metadata/timestamp.json"], res.describe()


def test_timestamp_expired_ten_days_later(ready_client, sim):
    assert_ok(ready_client.refresh())
    before = ready_client.trusted_files()
    sim.publish(snapshot=False)  # a new, valid-today timestamp (1 day)
    res = assert_fails(ready_client.refresh(faketime="+10d"), *EXPIRY_WORDS)
    after = ready_client.trusted_files()
    assert after["timestamp.json"] == before["timestamp.json"], res.describe()


def test_expired_targets_is_refused(ready_client, sim):
    _long_lived(sim)
    sim.roles["targets"].signed.expires = expires_in(days=2)
    sim.publish("targets")
    assert_ok(ready_client.refresh())
    sim.add_target("targets", "x", b"x")
    sim.publish("targets")
    res = assert_fails(ready_client.download("x", faketime="+5d"), *EXPIRY_WORDS)
    assert ready_client.target_files() == {}, res.describe()


def test_expired_root_is_refused(ready_client, sim):
    _long_lived(sim, days=800)
    sim.publish("targets")
    res = assert_fails(ready_client.refresh(faketime="+400d"), *EXPIRY_WORDS)
    assert ready_client.trusted("timestamp") is None, res.describe()


def test_expired_intermediate_root_does_not_matter(ready_client, sim):
    # root v1 expires in 2 days; v2 is valid for a year; client starts from v1.
    sim.root.signed.expires = expires_in(days=2)
    sim.rotate_root()                       # v2 (still expiring in 2 days)
    sim.root.signed.expires = expires_in(days=365)
    sim.rotate_root()                       # v3, valid
    _long_lived(sim)
    sim.publish("targets")
    res = assert_ok(ready_client.refresh(faketime="+5d"))
    assert ready_client.trusted("root") == sim.root_history[3], res.describe()


def test_expired_final_root_is_refused_even_after_update(ready_client, sim):
    sim.root.signed.expires = expires_in(days=3)
    sim.rotate_root()
    _long_lived(sim)
    sim.publish("targets")
    res = assert_fails(ready_client.refresh(faketime="+5d"), *EXPIRY_WORDS)
    assert trusted_version(ready_client.trusted("timestamp")) is None, res.describe()
