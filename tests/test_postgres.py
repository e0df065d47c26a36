"""The PostgreSQL state store (issue 5): two `outpost-server` processes on one
PostgreSQL database, with simulated devices checking in through both (each check-in
takes its nonce from one server and reports to the other). Rollout state stays
consistent: no device is assigned twice, the failure threshold is crossed once and
counted once, and both servers show the same rollout, counters and audit log.

Needs OUTPOST_TEST_POSTGRES=postgres://USER@HOST:PORT (scripts/test.sh starts a
throwaway server with scripts/postgres.sh and sets it)."""

from __future__ import annotations

import json
import os
import secrets
from collections import Counter

import pytest

from conftest import OutpostServer, assert_ok, binary, http_get, run, sha256_hex, toml_str
from test_attestation import Ops, image


def postgres_database() -> str:
    """A fresh database on the test PostgreSQL server; its URL."""
    base = os.environ.get("OUTPOST_TEST_POSTGRES")
    if not base:
        pytest.fail("OUTPOST_TEST_POSTGRES is not set: run the suite with scripts/test.sh, "
                    "or start a server with scripts/postgres.sh and export its URL", pytrace=False)
    name = f"outpost_{secrets.token_hex(6)}"
    assert_ok(run(["psql", "-q", f"{base}/postgres", "-c", f"CREATE DATABASE {name}"]))
    return f"{base}/{name}"


def sim(*args: str, timeout: float = 300):
    return run([binary("outpost-fleet-sim"), *args], timeout=timeout)


@pytest.fixture
def two_servers(tmp_path, outpost_repo):
    """Servers a and b on one PostgreSQL database and one director key, both holding
    the pushed repository: (repo, a, b, pipeline token)."""
    url = postgres_database()
    extra = f"\n[database]\npostgres = {toml_str(url)}\nmax_connections = 8\n"
    # The simulated devices have software keys and no EK certificate: an explicit opt-in.
    opt_in = {"accept_uncertified_eks": True}
    a = OutpostServer(tmp_path, outpost_repo, name="a", extra_toml=extra, attestation=opt_in)
    b = OutpostServer(tmp_path, outpost_repo, name="b", extra_toml=extra, attestation=opt_in)
    try:
        token = a.token()
        a.start()  # both sign with the director key `outpost director init` named
        b.start()
        for s in (a, b):
            outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", s.url, "--token", token)
        yield outpost_repo, a, b, token
    finally:
        a.stop()
        b.stop()


def rollout_view(server: OutpostServer, token: str, rollout_id: str) -> dict:
    status, body = http_get(f"{server.url}/api/v1/rollouts/{rollout_id}?devices=true", token=token)
    assert status == 200, body
    return json.loads(body)


def test_two_servers_on_one_postgres_keep_rollout_state_consistent(two_servers, tmp_path):
    repo, a, b, token = two_servers
    assert 'backend="postgres"' in a.log_text() and 'backend="postgres"' in b.log_text()
    # Releases signed offline into the repository directory, then pushed to both
    # servers (each serves the repository from its own data_dir).
    for seed, version in (("v1", "1.0.0"), ("v2", "2.0.0")):
        repo.publish(image(seed), version)
    for s in (a, b):
        repo.cli("repo", "push", "--repo", repo.dir, "--server", s.url, "--token", token)
    v1 = {"sha256": sha256_hex(image("v1"))}

    ops_a, ops_b = Ops((repo, a, token)), Ops((repo, b, token))
    state = tmp_path / "fleet.json"
    assert_ok(sim("enroll", "--server", a.url, "--token", ops_a.token, "--devices", "200",
                  "--image-sha256", v1["sha256"], "--version", "1.0.0", "--state", str(state),
                  "--ek-pool", "2"))
    # Devices enrolled through a are known to b.
    assert len(ops_b.devices()) == 200

    both = ("--server", a.url, "--server", b.url)
    out = json.loads(assert_ok(sim("run", "--state", str(state), "--max-checkins", "200", "--json", *both)).stdout)
    assert (out["checkins"], out["attested"], out["errors"]) == (200, 200, 0), out

    # A rollout created through b; 2.0.0 fails on 60 % of devices (enough that the
    # first wave, about 20 devices drawn by hash, always holds more than the 10 %
    # threshold of failures). Check-ins through both servers at once, 32 in flight.
    r = ops_b.rollout("2.0.0", waves=(10, 100), failure=0.1, success=0.9, min_devices=5, soak="1h")
    out = json.loads(assert_ok(sim("run", "--state", str(state), "--max-checkins", "800", "--concurrency", "32",
                                   "--fail", "2.0.0=0.6", "--json", *both)).stdout)
    assert out["errors"] == 0 and out["installs"]["assigned"] > 0, out

    va, vb = rollout_view(a, ops_a.token, r["id"]), rollout_view(b, ops_b.token, r["id"])
    # Both servers show one state: paused in wave 0 by the failure threshold.
    assert va["state"] == vb["state"] and va["waves"] == vb["waves"] and va["events"] == vb["events"]
    assert va["state_name"] == "paused" and va["state"]["wave"] == 0, va["state"]
    assert va["state"]["reason"]["kind"] == "failure_threshold"
    # No device assigned twice, nothing outside wave 0.
    assigned = [d["device_id"] for d in va["devices"]]
    assert assigned and len(assigned) == len(set(assigned)), assigned
    assert all(d["wave"] == 0 for d in va["devices"])
    # Thresholds counted once: the counters are the assignments' statuses, and the
    # pause was recorded once.
    statuses = Counter(d["status"] for d in va["devices"])
    w0 = va["waves"][0]
    assert w0["assigned"] == len(assigned)
    assert (w0["healthy"], w0["rolled_back"], w0["installing"]) == \
        (statuses["healthy"], statuses["rolled_back"], statuses["installing"]), (w0, statuses)
    pauses = [e for e in va["events"] if e["to"] == "paused"]
    assert len(pauses) == 1, va["events"]
    # The audit log is one log, whichever server is asked.
    status, la = http_get(f"{a.url}/api/v1/audit", token=ops_a.token)
    status_b, lb = http_get(f"{b.url}/api/v1/audit", token=ops_b.token)
    assert status == status_b == 200
    actions = [e["action"] for e in json.loads(la)["entries"]]
    assert json.loads(la)["entries"] == json.loads(lb)["entries"]
    assert actions.count("rollout_create") == 1 and actions.count("rollout_paused") == 1, actions


def test_postgres_settings_are_checked(tmp_path, outpost_repo):
    """A malformed or unreachable database is refused at start with a message naming it."""
    cases = [
        ('[database]\npostgres = "mysql://x@127.0.0.1/db"\n', "database.postgres"),
        ('[database]\nsqlite = "a.db"\npostgres = "postgres://x@127.0.0.1/db"\n', "either sqlite or postgres"),
        ('[database]\nmax_connections = 4\n', "postgres only"),
        ('[database]\npostgres = "postgres://nobody:secret@127.0.0.1:1/none"\n', "connecting to PostgreSQL at postgres://nobody:***@127.0.0.1:1/none"),
    ]
    for i, (extra, message) in enumerate(cases):
        s = OutpostServer(tmp_path, outpost_repo, name=f"bad{i}", extra_toml="\n" + extra)
        assert s.start(allow_exit=True) is False, extra
        assert message in s.log_text(), (extra, s.log_text()[-2000:])
        assert "secret" not in s.log_text()
