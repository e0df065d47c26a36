"""Director and canary rollouts (issue 5) with real agents, swtpm and outpost-server.

The director signs, at every attested check-in, the device's own targets metadata
naming the image it should run now; the agent installs only when that assignment
and the image repository's offline-signed target agree. Rollouts decide the
assignment: waves from a stable hash of (device id, rollout id), feedback from the
install outcomes in check-ins, a failure threshold that pauses the rollout before
the next wave opens.

Covered here: a canary rollout across a fleet of real agents (late enrollment joins;
a bad release pauses itself in the first occupied wave and reaches nobody else; a
server killed mid-rollout loses and double-counts nothing); abort with roll back;
forged director assignments refused by the agent (another key, another device, a
replay, a target the image repository does not sign, a hash disagreement, a
downgrade); malformed rollout definitions and wrong roles refused by the server.
Wave maths, soak and the 10,000-device scenario are in repo-server's unit tests.
"""

from __future__ import annotations

import hashlib
import json
import signal

import pytest

from conftest import Proxy, assert_fails, assert_ok, http_get, http_post, sha256_hex
from test_attestation import Ops, checkin, enroll, enrolled_device, image, publish, results, tpm_device


@pytest.fixture
def ops(fleet) -> Ops:
    return Ops(fleet)


def wave_of(waves, rollout_id: str, device_id: str):
    """The same stable position the server computes (protocol::rollout::position)."""
    h = hashlib.sha256(rollout_id.encode() + b"\0" + device_id.encode()).digest()
    p = (int.from_bytes(h[:8], "big") >> 11) / float(1 << 53) * 100
    return next((i for i, w in enumerate(waves) if p < w), None)


def fleet_of(fleet, tmp_path, ops, swtpm_factory, n: int):
    """n enrolled devices running signed 1.0.0."""
    devices, v1 = [], None
    for i in range(n):
        dev, device_id, v1 = enrolled_device(fleet, tmp_path, ops, swtpm_factory, f"d{i}", v1=v1)
        devices.append((dev, device_id))
    return devices, v1


def kill_and_restart(server) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    server._logf.close()
    server._logf = None
    server.start()


def test_canary_rollout_across_a_fleet_and_a_bad_release_pauses_itself(fleet, tmp_path, ops, swtpm_factory):
    devices, v1 = fleet_of(fleet, tmp_path, ops, swtpm_factory, 3)

    # 2.0.0 to everyone: each device installs it, reports, and the rollout completes.
    v2 = publish(fleet, image("v2"), "2.0.0")
    good = ops.rollout("2.0.0", min_devices=3, success=1.0)
    for dev, _ in devices:
        res = dev.run_once()
        assert {"result": "committed", "version": "2.0.0", "slot": "B"} in results(res), res.describe()
    for dev, _ in devices:
        assert checkin(dev)["verdict"] == "attested"
    shown = ops.rollout_status(good["id"])
    assert shown["state_name"] == "completed", shown
    assert (shown["waves"][0]["assigned"], shown["waves"][0]["healthy"]) == (3, 3), shown
    assert shown["events"][-1]["cause"]["kind"] == "passed_after_soak"
    out = ops.rollout_cli("status", good["id"]).stdout
    assert "completed" in out and "2.0.0" in out

    # A device enrolled later joins the rollout at its first check-in.
    late = tpm_device(fleet, tmp_path, swtpm_factory("late-tpm"), "late", factory_image=image("v1"))
    late_id = enroll(late, ops.enrollment_token())["device_id"]
    res = late.run_once()
    assert {"result": "committed", "version": "2.0.0", "slot": "B"} in results(res), res.describe()
    devices.append((late, late_id))

    # 3.0.0 fails its signed health check everywhere. Waves of a third each; the test
    # opens the first wave that holds a device, so exactly those devices are exposed.
    publish(fleet, image("v3"), "3.0.0", "--health-command", 'echo "v3 self-test failed" >&2; exit 3')
    waves = [34, 67, 100]
    bad = ops.rollout("3.0.0", waves=waves, soak="1h", failure=0.3, start=False)
    where = {did: wave_of(waves, bad["id"], did) for _, did in devices}
    first = min(where.values())
    ops.rollout_cli("start", bad["id"])
    for _ in range(first):
        ops.rollout_cli("advance", bad["id"])
    exposed = [(d, did) for d, did in devices if where[did] == first]
    others = [(d, did) for d, did in devices if where[did] != first]
    # The first exposed device installs it, fails its trial, rolls back and reports.
    dev, did = exposed[0]
    res = dev.run_once()
    rolled = [r for r in results(res) if r.get("result") == "rolled_back"]
    assert rolled and rolled[0]["version"] == "3.0.0" and "v3 self-test failed" in rolled[0]["reason"], res.describe()
    shown = ops.rollout_status(bad["id"], devices=True)
    assert shown["state_name"] == "paused", shown
    assert shown["state"]["reason"]["kind"] == "failure_threshold", shown
    assert [d["device_id"] for d in shown["devices"]] == [did]
    assert shown["devices"][0]["status"] == "rolled_back" and "v3 self-test failed" in shown["devices"][0]["reason"]
    out = ops.rollout_cli("status", bad["id"]).stdout
    assert "paused in wave" in out and "failure threshold" in out, out

    # The server is killed and restarted: the rollout, its counters and history stand.
    before = ops.rollout_status(bad["id"], devices=True)
    kill_and_restart(ops.server)
    assert ops.rollout_status(bad["id"], devices=True) == before

    # Nobody else gets 3.0.0: those not assigned before the pause stay on 2.0.0.
    for dev, _ in exposed[1:] + others:
        res = dev.run_once()
        assert res.returncode == 0, res.describe()
        assert all(r.get("version") != "3.0.0" for r in results(res)), res.describe()
        assert dev.journal()["running"]["version"] == "2.0.0"
    shown = ops.rollout_status(bad["id"], devices=True)
    assert [d["device_id"] for d in shown["devices"]] == [did], "no device outside the paused wave was assigned"
    assert shown["waves"][first]["rolled_back"] == 1 and shown["waves"][first]["assigned"] == 1, shown
    # Every transition and operator action is in the audit log with who did it.
    audit = json.loads(http_get(f"{ops.server.url}/api/v1/audit", token=ops.token)[1])["entries"]
    actions = [(e["actor"], e["action"]) for e in audit if e["detail"].get("rollout") == bad["id"]]
    assert ("ops", "rollout_create") in actions and ("ops", "rollout_start") in actions
    assert ("server", "rollout_paused") in actions, actions


def test_abort_with_roll_back_sends_devices_to_their_previous_release(fleet, tmp_path, ops, swtpm_factory):
    dev, device_id, v1 = enrolled_device(fleet, tmp_path, ops, swtpm_factory)
    publish(fleet, image("v2"), "2.0.0")
    r = ops.rollout("2.0.0", min_devices=5)
    assert {"result": "committed", "version": "2.0.0", "slot": "B"} in results(dev.run_once())
    out = ops.rollout_cli("abort", r["id"], "--roll-back").stdout
    assert "aborted by ops (rolling back)" in out
    # The director's rollback assignment alone does not move the device back: a
    # downgrade needs the offline keys' word.
    res = dev.run_once()
    assert "no rollback allowance signed by the image repository's offline keys" in res.stderr, res.describe()
    assert dev.active() == "B" and dev.journal()["running"]["version"] == "2.0.0"
    repo, server, token = fleet
    out = json.loads(repo.cli("--json", "release", "allow-rollback", "--repo", repo.dir, "--hardware-class", "rpi4",
                              "--version", "1.0.0", "--key", repo.key("firmware"), "--server", server.url,
                              "--token", token).stdout)
    assert out["rollback_allowed"] is True and out["targets"] == ["firmware/rpi4/1.0.0/fw.img"], out
    # The signed assignment is an explicit rollback the image repository allows.
    res = dev.run_once()
    assert {"result": "committed", "version": "1.0.0", "slot": "A"} in results(res), res.describe()
    assert dev.slot_sha("A") == v1["sha256"]
    assert checkin(dev)["verdict"] == "attested"
    assert ops.device(device_id)["device"]["version"] == "1.0.0"
    # An aborted rollout takes no more actions.
    assert_fails(ops.rollout_cli("resume", r["id"], check=False), "aborted")


# ------------------------------------------------------------ forged assignments

def _key(server):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    k = json.loads(server.director_key.read_text())
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(k["keyval"]["private"]))


def _resign(doc: dict, key, keyid: str) -> str:
    from securesystemslib.formats import encode_canonical
    sig = key.sign(encode_canonical(doc["signed"]).encode()).hex()
    return json.dumps({"signatures": [{"keyid": keyid, "sig": sig}], "signed": doc["signed"]})


def test_agent_refuses_forged_director_assignments(fleet, tmp_path, ops, swtpm_factory):
    """A compromised server holds the director key but not the offline keys: whatever
    it signs, the device installs only what the image repository signs, for this
    device, not older than what it runs. Without the director key nothing counts."""
    repo, server, _ = fleet
    proxy = Proxy(server.url)
    dev, device_id, v1 = enrolled_device(fleet, tmp_path, ops, swtpm_factory, server_url=proxy.url)
    v2 = publish(fleet, image("v2"), "2.0.0")
    ops.rollout("2.0.0")
    director_key = _key(server)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    def forge(change, key=None, keyid=None):
        """Rewrite the director targets in check-in answers with change(signed)."""
        def rule(req, answer):
            if req.path.endswith("/checkin") and answer.status == 200:
                verdict = json.loads(answer.body)
                doc = json.loads(verdict["director_targets"])
                change(doc["signed"])
                verdict["director_targets"] = _resign(doc, key or director_key, keyid or doc["signatures"][0]["keyid"])
                answer.set_body(json.dumps(verdict).encode())
        proxy.rule = rule

    def assigned(signed):
        return next(iter(signed["targets"].values()))

    cases = [
        ("another key", lambda s: None, Ed25519PrivateKey.generate(), "ab" * 32, "signature"),
        ("another device", lambda s: s.update({"x-outpost-device-id": "dev-other"}), None, None, "not this device"),
        ("not in the image repo", lambda s: s.update({"targets": {"firmware/rpi4/6.6.6/fw.img": assigned(s)}}), None, None,
         "does not sign"),
        ("hash disagreement", lambda s: assigned(s)["hashes"].update({"sha256": "00" * 32}), None, None, "disagrees"),
    ]
    for name, change, key, keyid, words in cases:
        forge(change, key, keyid)
        res = dev.run_once()
        assert words in res.stderr, f"{name}: " + res.describe()
        assert dev.active() == "A" and dev.slot_sha("A") == v1["sha256"], name
        assert not any(r.get("result") == "committed" for r in results(res)), name

    # Honest again: 2.0.0 installs.
    proxy.rule = None
    assert {"result": "committed", "version": "2.0.0", "slot": "B"} in results(dev.run_once())
    # A downgrade without a signed rollback, and a replay of an older assignment.
    v1_path = "firmware/rpi4/1.0.0/fw.img"
    signed_v1 = json.loads((repo.dir / "metadata" / "firmware.json").read_text())["signed"]["targets"][v1_path]

    def downgrade(s):
        a = assigned(s)
        a.update({"length": signed_v1["length"], "hashes": {"sha256": signed_v1["hashes"]["sha256"]}})
        a["custom"]["version"] = "1.0.0"
        s["targets"] = {v1_path: a}
    forge(downgrade)
    res = dev.run_once()
    assert "do not go backwards" in res.stderr, res.describe()

    # The online key alone orders an explicit rollback: refused, the offline keys
    # allowed no rollback to 1.0.0.
    def ordered_rollback(s):
        downgrade(s)
        assigned(s)["custom"]["rollback"] = True
    forge(ordered_rollback)
    res = dev.run_once()
    assert "no rollback allowance signed by the image repository's offline keys" in res.stderr, res.describe()
    assert dev.active() == "B" and dev.slot_sha("B") == v2["sha256"]

    # A device that lost its journal still has a floor: the release its active slot
    # holds (2.0.0, measured), not "anything goes".
    dev.journal_path.unlink()
    forge(downgrade)
    res = dev.run_once()
    assert "do not go backwards" in res.stderr, res.describe()
    assert dev.active() == "B" and dev.slot_sha("B") == v2["sha256"]
    assert dev.journal()["running"]["version"] == "2.0.0", "the measured slot's release became the floor"
    forge(lambda s: s.update({"version": 1}))
    res = dev.run_once()
    assert "replayed" in res.stderr, res.describe()
    assert dev.active() == "B" and dev.journal()["running"]["version"] == "2.0.0"
    proxy.rule = None
    assert results(dev.run_once())[-1]["result"] in ("up_to_date", "no_assignment")


# ------------------------------------------------------------ director trust

def test_a_director_key_no_director_root_names_cannot_assign_anything(tmp_path, outpost_repo, swtpm_factory):
    """Whoever answers a device's enrollment (a lost data directory that minted a key,
    or an attacker on the path once) does not become its director: devices learn the
    director from the image repository's offline-signed director root, so assignments
    signed by any other key are refused, however they were delivered."""
    from conftest import OutpostServer
    rogue_key = outpost_repo.key("rogue-director")
    server = OutpostServer(tmp_path, outpost_repo, name="rogue",
                           extra_toml=f"\n[director]\nkey = {json.dumps(str(rogue_key))}\n")
    token = server.token()
    server.start()
    try:
        outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", server.url, "--token", token)
        fleet = (outpost_repo, server, token)
        ops = Ops(fleet)
        data = image("v1")
        publish(fleet, data, "1.0.0")
        dev = tpm_device(fleet, tmp_path, swtpm_factory("tpm"), factory_image=data)
        enroll(dev, ops.enrollment_token())
        # The device trusts director root v1 from the image repository, whose director
        # key is not the one this server signs with.
        pinned = json.loads((dev.state_dir / "director-root.json").read_text())
        assert pinned["signed"]["version"] == 1, pinned
        publish(fleet, image("v2"), "2.0.0")
        ops.rollout("2.0.0")
        res = dev.run_once()
        assert "director assignment refused" in res.stderr and "threshold" in res.stderr, res.describe()
        assert dev.active() == "A", "nothing signed by an unknown director key may be installed"
    finally:
        server.stop()


def test_a_server_without_its_director_key_refuses_to_start_and_says_what_to_do(tmp_path, outpost_repo):
    from conftest import OutpostServer
    server = OutpostServer(tmp_path, outpost_repo, name="lost",
                           extra_toml=f"\n[director]\nkey = {json.dumps(str(tmp_path / 'gone.key'))}\n")
    assert server.start(allow_exit=True) is False
    log = server.log_text()
    assert "director key is missing" in log and "Restore the key" in log and "outpost director rotate" in log, log


def test_director_key_rotation_follows_the_offline_chain(fleet, tmp_path, ops, swtpm_factory):
    """The director key is replaced by director root v2 (signed by the offline director
    root key, listed by the offline targets role); devices follow the chain and accept
    the new key's assignments, and the old key's no longer count."""
    repo, server, token = fleet
    dev, device_id, v1 = enrolled_device(fleet, tmp_path, ops, swtpm_factory)
    new_key = repo.key("director-2")
    out = json.loads(repo.cli("--json", "director", "rotate", "--repo", repo.dir, "--root-key", repo.key("director-root"),
                              "--director-key", f"{new_key}.pub", "--sign-key", repo.key("targets"),
                              "--server", server.url, "--token", token).stdout)
    assert out["version"] == 2 and out["target"] == "director/2.root.json", out
    # The server still signs with the old key: the device, now on root v2, refuses it.
    publish(fleet, image("v2"), "2.0.0")
    ops.rollout("2.0.0")
    res = dev.run_once()
    assert "director assignment refused" in res.stderr, res.describe()
    assert json.loads((dev.state_dir / "director-root.json").read_text())["signed"]["version"] == 2
    # The operator gives the server the new key: assignments flow again.
    server.stop()
    text = server.config.read_text().replace(str(server.director_key), str(new_key))
    server.config.write_text(text)
    server.director_key = new_key
    server.start()
    res = dev.run_once()
    assert {"result": "committed", "version": "2.0.0", "slot": "B"} in results(res), res.describe()


# ------------------------------------------------------------ the operator API

def test_rollout_definitions_and_roles_are_checked(fleet, ops):
    repo, server, pipeline = fleet
    publish(fleet, image("v1"), "1.0.0")
    viewer = server.token("dash", role="viewer")
    url = f"{server.url}/api/v1/rollouts"

    def post(body, token=ops.token, path=url):
        return http_post(path, json.dumps(body).encode(), token, "application/json")

    wave = {"percent": 100, "success_threshold": 0.9, "failure_threshold": 0.1, "min_devices": 1, "soak_secs": 0}
    base = {"version": "1.0.0", "hardware_class": "rpi4", "waves": [wave]}
    bad = [
        ({**base, "waves": [{**wave, "percent": 50}, {**wave, "percent": 10}]}, "wave 1: percent 10"),
        ({**base, "waves": [{**wave, "percent": 120}]}, "waves[0].percent 120"),
        ({**base, "waves": [{**wave, "soak_secs": -5}]}, "waves[0].soak_secs -5"),
        ({**base, "waves": [{**wave, "failure_threshold": 2}]}, "failure_threshold 2"),
        ({**base, "waves": []}, "at least one wave"),
        ({**base, "version": "9.9.9"}, "version: no signed"),
        ({**base, "labels": {"bad key": "x"}}, "labels"),
        ({**base, "surprise": 1}, "surprise"),
    ]
    for body, words in bad:
        status, answer = post(body)
        assert status == 422 and words.encode() in answer, (body, status, answer)
    # The CLI names the flag it cannot parse.
    res = ops.rollout_cli("create", "--version", "1.0.0", "--hardware-class", "rpi4", "--soak=-5s", check=False)
    assert res.returncode != 0 and "--soak" in res.stderr, res.describe()
    # Roles: pipeline tokens publish only, viewers read, operators act.
    assert post(base, token=pipeline)[0] == 403
    assert post(base, token=viewer)[0] == 403
    assert post(base, token=None)[0] == 401
    assert http_get(url, token=pipeline)[0] == 403
    assert http_get(f"{server.url}/api/v1/devices", token=pipeline)[0] == 403
    status, created = post(base)
    assert status == 201, created
    rid = json.loads(created)["id"]
    assert http_get(url, token=viewer)[0] == 200
    assert post({}, token=viewer, path=f"{url}/{rid}/start")[0] == 403
    status, answer = post({}, path=f"{url}/{rid}/resume")
    assert status == 409 and b"cannot resume a rollout that is draft" in answer, answer
    status, answer = post({}, path=f"{url}/{rid}/explode")
    assert status == 404 and b"no rollout action" in answer
    assert post({}, path=f"{url}/ro_nope/start")[0] == 404
    status, answer = post({"roll_back": "yes"}, path=f"{url}/{rid}/abort")
    assert status == 422 and b"roll_back" in answer
    assert_ok(ops.rollout_cli("start", rid))
    listing = ops.rollout_cli("list").stdout
    assert rid in listing and "running in wave 0 of 1" in listing
    # `status --watch --json` prints one document per refresh and ends with the rollout.
    import subprocess
    watch = subprocess.Popen([str(repo.exe), "rollout", "status", rid, "--watch", "--interval", "200ms", "--json",
                              "--server", server.url, "--token", ops.token], stdout=subprocess.PIPE, text=True)
    try:
        import time
        time.sleep(1)
        assert watch.poll() is None, "still watching a running rollout"
        ops.rollout_cli("abort", rid)
        out, _ = watch.communicate(timeout=15)
    finally:
        if watch.poll() is None:
            watch.kill()
    docs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(docs) >= 2 and docs[0]["state_name"] == "running" and docs[-1]["state_name"] == "aborted", out
    audit = json.loads(http_get(f"{server.url}/api/v1/audit", token=viewer)[1])["entries"]
    assert [e["action"] for e in audit[:3]] == ["rollout_abort", "rollout_start", "rollout_create"]
    assert all(e["actor"] == "ops" for e in audit[:3])
