"""Device identity and attestation with TPM 2.0 (issue 4), with real swtpm processes.

Each device is `outpost-agent` with the file A/B boot backend and its own
`swtpm socket --tpm2` on 127.0.0.1; the server is `outpost-server`; releases are
signed offline with `outpost release publish`. Where a test needs to see or spoil
the traffic, the conftest Proxy sits between agent and server.

Covered: enrollment (happy path with an EK certificate, token reuse and expiry, a
wrong credential answer, a server restart between challenge and proof), attested
check-ins (wrong, foreign, reused and expired nonces; a quote signed by another
device's AK; an event log that does not replay), measured boot (a tampered slot is
quarantined; the agent refuses to install from a state its TPM does not vouch for;
a measured digest differing from the release's expected measurement rolls back).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from conftest import (
    Device,
    ProxyAnswer,
    assert_fails,
    assert_ok,
    binary,
    http_get,
    http_post,
    run,
    sha256_hex,
    swtpm_localca_files,
)

MiB = 1 << 20


def image(seed: str, size: int = 64 * 1024) -> bytes:
    import hashlib
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def publish(fleet, data: bytes, version: str, *extra) -> dict:
    repo, server, token = fleet
    repo.publish(data, version, server=server, token=token, extra=tuple(str(e) for e in extra))
    return {"version": version, "sha256": sha256_hex(data), "length": len(data)}


class Ops:
    """The operator side: an operator API token and the `outpost device` CLI."""

    def __init__(self, fleet) -> None:
        self.repo, self.server, _ = fleet
        self.token = self.server.token("ops", role="operator")

    def enrollment_token(self, ttl: str = "1h", hardware_class: str = "rpi4",
                         labels: dict | None = None) -> str:
        extra = [a for k, v in (labels or {}).items() for a in ("--label", f"{k}={v}")]
        res = self.repo.cli("device", "token", "create", "--hardware-class", hardware_class,
                            "--ttl", ttl, "--server", self.server.url, "--token", self.token,
                            "--json", *extra)
        return json.loads(res.stdout)["token"]

    def rollout(self, version: str, *, waves=(100,), soak: str = "0s", failure: float = 0.5,
                success: float = 0.5, min_devices: int = 1, labels: dict | None = None,
                gate: str = "auto", start: bool = True, hardware_class: str = "rpi4") -> dict:
        """`outpost rollout create` (and start): by default everyone at once."""
        extra = [a for k, v in (labels or {}).items() for a in ("--label", f"{k}={v}")]
        if start:
            extra.append("--start")
        res = self.repo.cli("rollout", "create", "--version", version, "--hardware-class", hardware_class,
                            "--waves", ",".join(str(w) for w in waves), "--soak", soak,
                            "--failure-threshold", str(failure), "--success-threshold", str(success),
                            "--min-devices", str(min_devices), "--gate", gate,
                            "--server", self.server.url, "--token", self.token, "--json", *extra)
        return json.loads(res.stdout)

    def rollout_cli(self, *args: str, check: bool = True):
        return self.repo.cli("rollout", *args, "--server", self.server.url, "--token", self.token,
                             check=check)

    def rollout_status(self, rollout_id: str, devices: bool = False) -> dict:
        q = "?devices=true" if devices else ""
        status, body = http_get(f"{self.server.url}/api/v1/rollouts/{rollout_id}{q}", token=self.token)
        assert status == 200, body
        return json.loads(body)

    def device(self, device_id: str) -> dict:
        status, body = http_get(f"{self.server.url}/api/v1/devices/{device_id}", token=self.token)
        assert status == 200, body
        return json.loads(body)

    def devices(self) -> list[dict]:
        status, body = http_get(f"{self.server.url}/api/v1/devices", token=self.token)
        assert status == 200, body
        return json.loads(body)["devices"]


@pytest.fixture
def ops(fleet) -> Ops:
    return Ops(fleet)


def tpm_device(fleet, tmp_path: Path, tpm, name: str = "device", server_url: str | None = None,
               factory_image: bytes | None = None, **kw) -> Device:
    """A device with its own swtpm; `factory_image` is written to slot A (what it
    shipped with: for attestation to pass it must be a signed release)."""
    repo, server, _ = fleet
    dev = Device(tmp_path / name, server_url or server.url, repo.root1, device_id=name,
                 tpm={"tcti": tpm.tcti, "pcr": 23}, **kw)
    if factory_image is not None:
        dev.slot_path("A").parent.mkdir(parents=True, exist_ok=True)
        dev.slot_path("A").write_bytes(factory_image)
    return dev


def agent(dev: Device, *args: str, timeout: float = 60, env: dict | None = None):
    return run([dev.exe, "--config", dev.config, "--log-level", "info", "--json", *args],
               timeout=timeout, env=env)


def enroll(dev: Device, token: str) -> dict:
    res = assert_ok(agent(dev, "enroll", "--token", token))
    return json.loads(res.stdout)


def checkin(dev: Device) -> dict:
    res = assert_ok(agent(dev, "checkin"))
    return json.loads(res.stdout.strip().splitlines()[-1])


def results(res) -> list[dict]:
    return Device.results(res)


def enrolled_device(fleet, tmp_path, ops, swtpm_factory, name: str = "device",
                    server_url: str | None = None, v1: dict | None = None,
                    **kw) -> tuple[Device, str, dict]:
    """A device shipped with signed release 1.0.0 in slot A, enrolled, booted once."""
    data = image("v1")
    if v1 is None:
        v1 = publish(fleet, data, "1.0.0")
    tpm = swtpm_factory(f"{name}-tpm", **kw)
    dev = tpm_device(fleet, tmp_path, tpm, name, server_url=server_url, factory_image=data)
    device_id = enroll(dev, ops.enrollment_token())["device_id"]
    res = dev.run_once()
    assert res.returncode == 0, res.describe()
    assert {"result": "no_assignment", "version": "1.0.0"} in results(res), res.describe()
    dev.tpm_proc = tpm
    return dev, device_id, v1


# ============================================================== enrollment
def test_enrollment_and_attested_checkins_through_an_update(fleet, tmp_path, ops, swtpm_factory):
    v1_data = image("v1")
    v1 = publish(fleet, v1_data, "1.0.0")
    tpm = swtpm_factory("tpm", ek_cert=True)
    dev = tpm_device(fleet, tmp_path, tpm, factory_image=v1_data)

    enrolled = enroll(dev, ops.enrollment_token())
    device_id = enrolled["device_id"]
    assert device_id.startswith("dev-") and enrolled["hardware_class"] == "rpi4"
    identity = json.loads((dev.state_dir / "identity.json").read_text())
    assert identity["device_id"] == device_id
    rec = ops.device(device_id)["device"]
    assert rec["attestation"] == "pending" and rec["has_ek_certificate"] is True, rec
    # The EK certificate the server got is the one in the TPM's NV index.
    nv = tpm.tool("tpm2_nvread", "0x01c00002")
    assert nv.returncode == 0 and len(nv.stdout.encode("latin-1", "replace")) > 100

    # Boot (measures slot A into PCR 23), attested check-in, nothing to install.
    res = dev.run_once()
    assert res.returncode == 0, res.describe()
    verdicts = [r for r in results(res) if "verdict" in r]
    assert verdicts and verdicts[0]["verdict"] == "attested", res.describe()
    log = json.loads((dev.state_dir / "measurements.json").read_text())
    assert [e["sha256"] for e in log["events"]] == [v1["sha256"]]
    # PCR 23 as tpm2-tools reads it is the replay of that log.
    import hashlib
    pcr = tpm.tool("tpm2_pcrread", "sha256:23")
    assert hashlib.sha256(bytes(32) + bytes.fromhex(v1["sha256"])).hexdigest() in pcr.stdout.lower().replace("0x", ""), pcr.stdout

    # An update (the director assigns it through a rollout): trial boot measured,
    # committed, the report delivered in a check-in.
    v2 = publish(fleet, image("v2"), "2.0.0")
    ops.rollout("2.0.0")
    res = dev.run_once()
    assert {"result": "committed", "version": "2.0.0", "slot": "B"} in results(res), res.describe()
    assert checkin(dev)["verdict"] == "attested"
    shown = ops.device(device_id)
    assert shown["device"]["version"] == "2.0.0" and shown["device"]["image_sha256"] == v2["sha256"]
    assert shown["device"]["attestation"] == "attested" and not shown["device"]["quarantined"]
    assert shown["attestations"][0]["verdict"] == "attested"
    assert any(r["version"] == "2.0.0" and r["outcome"] == "committed" for r in shown["reports"]), shown
    # The operator CLI lists it.
    listing = ops.repo.cli("device", "list", "--server", ops.server.url, "--token", ops.token).stdout
    assert device_id in listing and "attested" in listing
    # This server has no device CA and its nonces say so: the agent made no TLS key
    # and asked for no client certificate (no TPM2_Certify spent on every check-in).
    assert not (dev.state_dir / "tls-key.json").exists()
    assert "client certificate not issued" not in fleet[1].log_text(), fleet[1].log_text()[-2000:]


def test_enrollment_token_works_once_and_expires(fleet, tmp_path, ops, swtpm_factory):
    t1, t2 = swtpm_factory("tpm1"), swtpm_factory("tpm2")
    d1 = tpm_device(fleet, tmp_path, t1, "d1")
    d2 = tpm_device(fleet, tmp_path, t2, "d2")
    token = ops.enrollment_token()
    enroll(d1, token)
    assert_fails(agent(d2, "enroll", "--token", token), "already used")
    assert not (d2.state_dir / "identity.json").exists()

    short = ops.enrollment_token(ttl="1s")
    import time
    time.sleep(2.2)
    assert_fails(agent(d2, "enroll", "--token", short), "expired")
    assert_fails(agent(d2, "enroll", "--token", "ote_" + "0" * 64), "unknown enrollment token")
    wrong_class = ops.enrollment_token(hardware_class="jetson")
    assert_fails(agent(d2, "enroll", "--token", wrong_class), "hardware class")
    assert [d["device_id"] for d in ops.devices()] == [json.loads((d1.state_dir / "identity.json").read_text())["device_id"]]
    # Only operators make tokens.
    res = ops.repo.cli("device", "token", "create", "--hardware-class", "rpi4", "--server",
                       ops.server.url, "--token", fleet[2], check=False)
    assert res.returncode != 0 and "operator" in res.stderr


def test_ak_not_resident_with_the_ek_is_refused(fleet, tmp_path, ops, swtpm_factory, proxy_factory):
    """Device 1 enrolls through a proxy that swaps its AK for device 2's: the server's
    credential names device 2's AK but is sealed to device 1's EK, so neither TPM can
    open it; a guessed answer is refused and burns the challenge."""
    repo, server, _ = fleet
    t1, t2 = swtpm_factory("tpm1"), swtpm_factory("tpm2")
    d2 = tpm_device(fleet, tmp_path, t2, "d2")
    enroll(d2, ops.enrollment_token())
    ak2 = json.loads((d2.state_dir / "identity.json").read_text())["ak_public"]

    proxy = proxy_factory(server.url)

    def swap_ak(req, body):
        if req.path == "/api/v1/enroll":
            doc = json.loads(body)
            doc["ak_public"] = ak2
            return json.dumps(doc).encode()
        return body

    proxy.request_rule = swap_ak
    d1 = tpm_device(fleet, tmp_path, t1, "d1", server_url=proxy.url)
    token = ops.enrollment_token()
    res = assert_fails(agent(d1, "enroll", "--token", token), "activate credential")
    assert not (d1.state_dir / "identity.json").exists()
    challenge = json.loads(next(r.answer for r in proxy.requests if r.path == "/api/v1/enroll"))
    # Whoever lacks the TPM can only guess.
    url = f"{server.url}/api/v1/enroll/{challenge['challenge_id']}"
    status, body = http_post(url, json.dumps({"secret": secrets.token_hex(32)}).encode(), None, "application/json")
    assert status == 403 and b"not resident" in body, body
    status, body = http_post(url, json.dumps({"secret": secrets.token_hex(32)}).encode(), None, "application/json")
    assert status == 409 and b"failed" in body, body
    assert challenge["device_id"] not in [d["device_id"] for d in ops.devices()]
    # The token was not consumed: the honest device 1 enrolls with it.
    proxy.request_rule = None
    enroll(d1, token)


def test_server_restart_mid_enrollment_loses_nothing_and_accepts_nothing_twice(
        fleet, tmp_path, ops, swtpm_factory, proxy_factory):
    repo, server, _ = fleet
    tpm = swtpm_factory("tpm")
    proxy = proxy_factory(server.url)
    restarted = []

    def restart_before_proof(req):
        if req.method == "POST" and req.path.startswith("/api/v1/enroll/") and not restarted:
            server.terminate()
            assert server.start()
            restarted.append(True)
        return None

    proxy.intercept = restart_before_proof
    dev = tpm_device(fleet, tmp_path, tpm, server_url=proxy.url)
    token = ops.enrollment_token()
    device_id = enroll(dev, token)["device_id"]
    assert restarted, "the server was restarted between challenge and proof"
    proof = next(r for r in proxy.requests if r.path.startswith("/api/v1/enroll/"))
    # The same proof again: the challenge is closed.
    status, body = http_post(f"{server.url}{proof.path}", proof.body, None, "application/json")
    assert status == 409 and b"completed" in body, body
    # The token is spent.
    assert_fails(agent(dev, "enroll", "--token", token), "already used")
    assert [d["device_id"] for d in ops.devices()] == [device_id]


# ============================================================== check-ins
def test_checkin_nonces_are_single_use_fresh_and_this_devices(fleet, tmp_path, ops, swtpm_factory,
                                                             proxy_factory, server_factory):
    repo, _, _ = fleet
    server, token = server_factory(repo, name="short", attestation={"nonce_lifetime": "1s"})
    repo.cli("repo", "push", "--repo", repo.dir, "--server", server.url, "--token", token)
    sfleet = (repo, server, token)
    sops = Ops(sfleet)
    proxy = proxy_factory(server.url)
    dev, device_id, v1 = enrolled_device(sfleet, tmp_path, sops, swtpm_factory, "d1", server_url=proxy.url)
    proxy2 = proxy_factory(server.url)
    other, other_id, _ = enrolled_device(sfleet, tmp_path, sops, swtpm_factory, "d2", v1=v1, server_url=proxy2.url)
    assert checkin(dev)["verdict"] == "attested"

    # Replayed: the same check-in body again.
    sent = [r for r in proxy.requests if r.path.endswith("/checkin")][-1]
    status, body = http_post(f"{server.url}{sent.path}", sent.body, None, "application/json")
    assert status == 409 and b"replayed" in body, body

    # Signed by another device's AK: device 1's check-in presented as device 2's.
    status, body = http_post(f"{server.url}/api/v1/devices/{other_id}/checkin", sent.body, None,
                             "application/json")
    assert status == 401 and b"attestation key" in body, body

    # A nonce the server never issued.
    def forge_nonce(req, answer):
        if req.path.endswith("/nonce"):
            answer.set_body(json.dumps({"nonce": secrets.token_hex(32),
                                        "expires_at": "2099-01-01T00:00:00Z"}).encode())

    proxy.rule = forge_nonce
    assert_fails(agent(dev, "checkin"), "not issued")

    # A nonce issued to device 2 (taken from device 2's own signed request, whose
    # check-in never reaches the server, so the nonce stays open).
    from conftest import ProxyAnswer
    proxy2.intercept = lambda req: ProxyAnswer(503, [], b"held back") if req.path.endswith("/checkin") else None
    assert_fails(agent(other, "checkin"), "503")
    proxy2.intercept = None
    foreign = [r.answer for r in proxy2.requests if r.path.endswith("/nonce")][-1]

    def foreign_nonce(req, answer):
        if req.path.endswith("/nonce"):
            answer.set_body(foreign)

    proxy.rule = foreign_nonce
    assert_fails(agent(dev, "checkin"), "another device")

    # An expired nonce: the check-in arrives after the nonce's 1 s lifetime.
    proxy.rule = None

    def late(req):
        if req.path.endswith("/checkin"):
            import time
            time.sleep(2.2)
        return None

    proxy.intercept = late
    assert_fails(agent(dev, "checkin"), "expired")
    proxy.intercept = None
    # None of that counted against the device; an honest check-in still attests.
    assert sops.device(device_id)["device"]["attestation"] == "attested"
    assert checkin(dev)["verdict"] == "attested"


def test_event_log_that_does_not_replay_fails_attestation(fleet, tmp_path, ops, swtpm_factory):
    dev, device_id, v1 = enrolled_device(fleet, tmp_path, ops, swtpm_factory)
    log_path = dev.state_dir / "measurements.json"
    log = json.loads(log_path.read_text())
    # Claim one more boot than the TPM measured.
    log["events"].append(dict(log["events"][0], slot="B"))
    log_path.write_text(json.dumps(log))
    verdict = checkin(dev)
    assert verdict["verdict"] == "failed" and verdict["quarantined"], verdict
    assert "does not replay" in verdict["reason"], verdict
    shown = ops.device(device_id)["device"]
    assert shown["quarantined"] and "does not replay" in shown["attestation_reason"]


# ============================================================== measured boot and gates
def test_tampered_slot_is_quarantined_and_gets_nothing(fleet, tmp_path, ops, swtpm_factory):
    dev, device_id, v1 = enrolled_device(fleet, tmp_path, ops, swtpm_factory)
    slot = dev.slot_path(dev.active())
    data = bytearray(slot.read_bytes())
    data[100] ^= 0xFF
    slot.write_bytes(bytes(data))
    tampered = sha256_hex(bytes(data))

    publish(fleet, image("v2"), "2.0.0")
    rollout = ops.rollout("2.0.0")
    res = dev.run_once()       # boot measures the tampered image, checks in
    kinds = results(res)
    verdicts = [r for r in kinds if "verdict" in r]
    assert verdicts and verdicts[0]["verdict"] == "failed" and verdicts[0]["quarantined"], res.describe()
    assert tampered in verdicts[0]["reason"] and "expected measurement" in verdicts[0]["reason"]
    assert any(r.get("result") == "quarantined" for r in kinds), res.describe()
    assert dev.active() == "A" and sha256_hex(dev.slot_path("A").read_bytes()) == tampered
    assert dev.slot_path("B").read_bytes() == b"", "nothing was installed"
    shown = ops.device(device_id)["device"]
    assert shown["quarantined"] and shown["image_sha256"] == tampered
    listing = ops.repo.cli("device", "list", "--server", ops.server.url, "--token", ops.token).stdout
    assert "QUARANTINED" in listing
    audit = json.loads(http_get(f"{ops.server.url}/api/v1/log", token=ops.token)[1])["entries"]
    assert any(e["action"] == "device_quarantine" and e["detail"]["device_id"] == device_id for e in audit)
    # The rollout never assigned it: a quarantined device is not part of any wave.
    assert ops.rollout_status(rollout["id"], devices=True)["devices"] == []


def test_agent_refuses_to_install_from_a_state_its_tpm_does_not_vouch_for(fleet, tmp_path, swtpm_factory):
    """Not enrolled (no server verdict to lean on): the agent's own check stops it."""
    data = image("v1")
    publish(fleet, data, "1.0.0")
    tpm = swtpm_factory("tpm")
    dev = tpm_device(fleet, tmp_path, tpm, factory_image=data)
    res = dev.run_once()
    assert {"result": "up_to_date", "version": "1.0.0"} in results(res), res.describe()
    slot = dev.slot_path("A")
    slot.write_bytes(slot.read_bytes()[:-1] + b"\x00")
    publish(fleet, image("v2"), "2.0.0")
    res = assert_fails(dev.run_once(), "refusing to install")
    assert "expected measurement" in res.stderr
    assert dev.slot_path("B").read_bytes() == b"" and dev.active() == "A"


def test_measured_digest_differing_from_the_release_rolls_back(fleet, tmp_path, ops, swtpm_factory):
    """The trial slot changes on disk after its first trial boot (the health check
    spoils it and cuts the power); the next boot measures something the release does
    not expect, and the device goes back to the previous slot."""
    dev, device_id, v1 = enrolled_device(fleet, tmp_path, ops, swtpm_factory,
                                         )
    spoil = (f"if [ ! -e {dev.workdir}/spoiled ]; then touch {dev.workdir}/spoiled; "
             f"printf X | dd of={dev.slot_path('B')} bs=1 seek=10 conv=notrunc 2>/dev/null; "
             "kill -9 $PPID; fi")
    dev.write_config(health=[{"kind": "command", "run": spoil, "timeout_secs": 10}],
                     install={"trial_attempts": 3})
    publish(fleet, image("v2"), "2.0.0")
    ops.rollout("2.0.0")
    first = dev.run_once()
    assert first.returncode != 0, "the power cut ended the first run"
    res = dev.run_once()
    rolled = [r for r in results(res) if r.get("result") == "rolled_back"]
    assert rolled and "measured boot digest" in rolled[0]["reason"] and "expected measurement" in rolled[0]["reason"], res.describe()
    assert dev.active() == "A" and sha256_hex(dev.slot_path("A").read_bytes()) == v1["sha256"]
    # Back on the signed image: attested again, and the rollback was reported.
    assert checkin(dev)["verdict"] == "attested"
    shown = ops.device(device_id)
    assert any(r["outcome"] == "rolled_back" and r["version"] == "2.0.0" for r in shown["reports"]), shown


def test_enroll_and_checkin_without_a_tpm_say_so(fleet, tmp_path, ops):
    repo, server, _ = fleet
    dev = Device(tmp_path / "plain", server.url, repo.root1)
    assert_fails(agent(dev, "enroll", "--token", ops.enrollment_token()), "[tpm]")
    assert_fails(agent(dev, "checkin"), "not enrolled")
    dev.write_config(tpm={"tcti": "swtpm:host=127.0.0.1,port=1", "pcr": 23})
    assert_fails(agent(dev, "enroll", "--token", ops.enrollment_token()), "TPM")
    dev.write_config(tpm={"tcti": "swtpm:host=127.0.0.1,port=1", "pcr": 7})
    assert_fails(agent(dev, "enroll", "--token", "x"), "pcr")


# ============================================================== EK certificates
def localca_files() -> list[str]:
    return swtpm_localca_files()


def test_ek_certificate_must_chain_to_a_configured_manufacturer_ca(fleet, tmp_path, swtpm_factory,
                                                                   server_factory):
    repo, _, _ = fleet
    certified = swtpm_factory("certified", ek_cert=True)
    plain = swtpm_factory("plain", ek_cert=False)
    server, token = server_factory(repo, name="strict", attestation={"ek_ca_certificates": localca_files()})
    repo.cli("repo", "push", "--repo", repo.dir, "--server", server.url, "--token", token)
    sops = Ops((repo, server, token))
    good = tpm_device((repo, server, token), tmp_path, certified, "good")
    device_id = enroll(good, sops.enrollment_token())["device_id"]
    assert sops.device(device_id)["device"]["has_ek_certificate"] is True
    bare = tpm_device((repo, server, token), tmp_path, plain, "bare")
    assert_fails(agent(bare, "enroll", "--token", sops.enrollment_token()), "requires an EK certificate")

    # A server that trusts only another manufacturer refuses the same certified TPM.
    ca = tmp_path / "other-ca"
    ca.mkdir()
    assert_ok(run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                   "-subj", "/CN=Other TPM Manufacturer Root", "-keyout", ca / "key.pem",
                   "-out", ca / "cert.pem", "-addext", "basicConstraints=critical,CA:TRUE"]))
    other, otoken = server_factory(repo, name="other", attestation={"ek_ca_certificates": [str(ca / "cert.pem")]})
    repo.cli("repo", "push", "--repo", repo.dir, "--server", other.url, "--token", otoken)
    oops = Ops((repo, other, otoken))
    moved = tpm_device((repo, other, otoken), tmp_path, certified, "moved")
    assert_fails(agent(moved, "enroll", "--token", oops.enrollment_token()), "not signed by a trusted EK CA")
    assert oops.devices() == []


def test_agent_refuses_to_install_when_its_pcr_does_not_match_its_event_log(fleet, tmp_path, swtpm_factory):
    """The daemon boots (measuring slot A), then something extends the measurement PCR
    behind its back: at its next update check the PCR no longer equals the replay of the
    event log, and it refuses to install the new release."""
    import subprocess
    import time
    data = image("v1")
    publish(fleet, data, "1.0.0")
    tpm = swtpm_factory("tpm")
    dev = tpm_device(fleet, tmp_path, tpm, factory_image=data, install={"check_interval": "1s"})
    log = dev.workdir / "daemon.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(dev.exe), "--config", str(dev.config), "--log-level", "info", "--json", "run"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while b"the active slot already holds the newest release" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert_ok(tpm.tool("tpm2_pcrextend", "23:sha256=" + "ab" * 32))
        publish(fleet, image("v2"), "2.0.0")
        while b"does not match the measurement log" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert b"refusing to install" in log.read_bytes()
    assert dev.slot_path("B").read_bytes() == b"" and dev.active() == "A"


def test_outstanding_nonces_per_device_are_bounded(fleet, tmp_path, ops, swtpm_factory, proxy_factory):
    """Only the device's AK-quoted requests get nonces, and even those are bounded: a
    genuine request replayed within its few minutes of validity (what an attacker on
    the path could do) makes the server store at most 16 open nonces."""
    proxy = proxy_factory(ops.server.url)
    dev, device_id, _ = enrolled_device(fleet, tmp_path, ops, swtpm_factory, server_url=proxy.url)
    signed = [r.body for r in proxy.requests if r.path.endswith("/nonce")][-1]
    url = f"{ops.server.url}/api/v1/devices/{device_id}/nonce"
    for _ in range(16):
        status, body = http_post(url, signed, None, "application/json")
        assert status == 200, body
    status, body = http_post(url, signed, None, "application/json")
    assert status == 429 and b"unused nonces" in body, body
    assert_fails(agent(dev, "checkin"), "unused nonces")
    status, body = http_post(f"{ops.server.url}/api/v1/devices/dev-nope/nonce", signed, None, "application/json")
    assert status == 404, body


# ======================================================= forgeable measurements
PRODUCTION_RPI4 = '\n[attestation.classes.rpi4]\npcrs = [4, 8, 9]\nevent_types = ["slot_boot"]\n'


def _forge_pcr23(dev: Device, tpm, claimed_sha256: str) -> None:
    """Root on the device: tamper with slot A, then reset PCR 23 (locality 0 may) and
    extend the digest of the genuine release, so quote and event log agree on a boot
    that did not happen."""
    slot = dev.slot_path("A")
    data = bytearray(slot.read_bytes())
    data[100] ^= 0xFF
    slot.write_bytes(bytes(data))
    assert_ok(tpm.tool("tpm2_pcrreset", "23"))
    assert_ok(tpm.tool("tpm2_pcrextend", f"23:sha256={claimed_sha256}"))


@pytest.mark.parametrize("policy", ["testbed", "production"])
def test_a_forged_resettable_pcr_is_accepted_only_for_a_testbed_class(tmp_path, outpost_repo, swtpm_factory,
                                                                      server_factory, policy):
    """The agent proves its slot with PCR 23, which root on the device can reset and
    extend at will. A class marked as a testbed accepts that (the server warns at
    start); a class whose policy trusts only the boot chain's PCRs refuses the
    measurement, so the forgery quarantines the device instead of attesting it."""
    from conftest import OutpostServer
    server = OutpostServer(tmp_path, outpost_repo, name=policy, measurement=None if policy == "testbed" else PRODUCTION_RPI4)
    token = server.token()
    server.start()
    try:
        outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", server.url, "--token", token)
        fleet = (outpost_repo, server, token)
        ops = Ops(fleet)
        data = image("v1")
        v1 = publish(fleet, data, "1.0.0")
        tpm = swtpm_factory("tpm")
        dev = tpm_device(fleet, tmp_path, tpm, factory_image=data)
        device_id = enroll(dev, ops.enrollment_token())["device_id"]
        res = dev.run_once()
        assert res.returncode == 0, res.describe()
        _forge_pcr23(dev, tpm, v1["sha256"])
        verdict = json.loads(agent(dev, "checkin").stdout.strip().splitlines()[-1])
        record = ops.device(device_id)["device"]
        if policy == "testbed":
            assert verdict["verdict"] == "attested", verdict
            assert "testbed" in server.log_text() and "forge" in server.log_text()
        else:
            assert verdict["verdict"] == "failed" and verdict["quarantined"], verdict
            assert "PCR 23" in verdict["reason"] and "software can reset it" in verdict["reason"], verdict
            assert record["attestation"] == "failed", record
    finally:
        server.stop()


@pytest.mark.parametrize("pcr", [16, 23, 17])
def test_a_class_policy_on_a_resettable_pcr_without_testbed_stops_the_server(tmp_path, outpost_repo, pcr):
    from conftest import OutpostServer
    server = OutpostServer(tmp_path, outpost_repo, measurement=f'\n[attestation.classes.rpi4]\npcrs = [{pcr}]\n')
    assert server.start(allow_exit=True) is False
    log = server.log_text()
    assert f"PCR {pcr} can be reset by software" in log and "rpi4" in log and "testbed" in log, log


def test_enrollment_needs_an_ek_ca_or_an_explicit_opt_in(tmp_path, outpost_repo, swtpm_factory, server_factory):
    """Without EK CAs, anyone holding a token could enroll a software TPM: that is now
    an opt-in (warned about at start); a server with neither enrolls nobody."""
    from conftest import OutpostServer
    plain = swtpm_factory("plain", ek_cert=False)
    for name, attestation in (("none", {"ek_ca_certificates": []}), ("optin", {"accept_uncertified_eks": True})):
        server = OutpostServer(tmp_path, outpost_repo, name=name, attestation=attestation)
        token = server.token()
        server.start()
        try:
            outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", server.url, "--token", token)
            fleet = (outpost_repo, server, token)
            dev = tpm_device(fleet, tmp_path, plain, f"dev-{name}")
            res = agent(dev, "enroll", "--token", Ops(fleet).enrollment_token())
            if name == "none":
                assert res.returncode != 0 and "trusts no TPM maker" in res.stderr, res.describe()
                assert "no device can enroll" in server.log_text()
            else:
                assert_ok(res)
                assert "accept_uncertified_eks = true" in server.log_text() and "software TPM" in server.log_text()
        finally:
            server.stop()
    # Both at once is a contradiction, refused at start.
    both = OutpostServer(tmp_path, outpost_repo, name="both",
                         attestation={"accept_uncertified_eks": True, "ek_ca_certificates": swtpm_localca_files()})
    assert both.start(allow_exit=True) is False
    assert "contradict" in both.log_text()


# ================================================== endpoints only the device may use
def test_nobody_but_the_device_can_take_its_nonces(fleet, tmp_path, ops, swtpm_factory):
    """Knowing a device id used to be enough to take all its open nonces every minute
    and lock it out. Nonce requests are now quoted by the device's AK: unsigned,
    forged, replayed-stale or foreign ones get nothing, and the device checks in."""
    repo, server, _ = fleet
    dev, device_id, v1 = enrolled_device(fleet, tmp_path, ops, swtpm_factory)
    other, other_id, _ = enrolled_device(fleet, tmp_path, ops, swtpm_factory, "other", v1=v1)
    url = f"{server.url}/api/v1/devices/{device_id}/nonce"
    for _ in range(20):
        status, body = http_post(url, b"{}", None, "application/json")
        assert status in (400, 401, 422), (status, body)
    status, body = http_post(url, b"", None, "application/json")
    assert status in (400, 401, 415, 422), (status, body)
    # Another device's genuine request, presented for this device.
    proxy_seen = {}

    def grab(req, answer):
        if req.path.endswith("/nonce"):
            proxy_seen["body"] = req.body
    from conftest import Proxy
    p = Proxy(server.url)
    try:
        other.write_config(server_url=p.url)
        p.rule = grab
        checkin(other)
    finally:
        p.stop()
    status, body = http_post(url, proxy_seen["body"], None, "application/json")
    assert status == 401 and b"not" in body, (status, body)
    # A request from device's own past, signed but stale, is refused too.
    doc = json.loads(proxy_seen["body"])
    doc["request"]["at"] = "2020-01-01T00:00:00Z"
    status, body = http_post(f"{server.url}/api/v1/devices/{other_id}/nonce", json.dumps(doc).encode(), None,
                             "application/json")
    assert status == 401, (status, body)
    assert checkin(dev)["verdict"] == "attested"


def test_install_reports_of_an_enrolled_device_come_only_from_its_checkins(fleet, tmp_path, ops, swtpm_factory):
    """POST /api/v1/reports took any outcome for any device id from anyone, and those
    rows sat beside attested ones. Now: refused for enrolled ids; for ids nobody
    enrolled they are recorded as unattested, bounded, and kept out of device views."""
    repo, server, token = fleet
    dev, device_id, v1 = enrolled_device(fleet, tmp_path, ops, swtpm_factory)
    report = {"device_id": device_id, "hardware_class": "rpi4", "target": "firmware/rpi4/1.0.0/fw.img",
              "version": "1.0.0", "outcome": "rolled_back", "reason": "forged", "slot": "B",
              "at": "2026-01-01T00:00:00Z"}
    status, body = http_post(f"{server.url}/api/v1/reports", json.dumps(report).encode(), None, "application/json")
    assert status == 403 and b"attested check-ins" in body, (status, body)
    assert all(r["reason"] != "forged" for r in ops.device(device_id)["reports"])
    # An unenrolled id: recorded as unattested, at most 100 kept for it.
    for i in range(110):
        r = dict(report, device_id="testbed-1", reason=f"n{i}")
        status, body = http_post(f"{server.url}/api/v1/reports", json.dumps(r).encode(), None, "application/json")
        assert status == 200, body
    status, body = http_get(f"{server.url}/api/v1/reports?device=testbed-1", token=ops.token)
    kept = json.loads(body)["reports"]
    assert len(kept) == 100 and kept[0]["reason"] == "n109" and not any(r["attested"] for r in kept), kept[:2]


# ======================================================= endless answers
API_ANSWER_BOUND = 1 << 20  # the agent's MAX_API_ANSWER


def endless_answer(req) -> ProxyAnswer:
    """An answer that starts like JSON and never ends."""
    return ProxyAnswer(200, [("Content-Type", "application/json")], b'{"nonce": "', endless=True)


def assert_cut_off(res, proxy, path_end: str, step: str) -> None:
    assert_fails(res, str(API_ANSWER_BOUND))
    assert "endless" in res.stderr and step in res.stderr, res.describe()
    sent = [r.sent for r in proxy.requests if r.path.endswith(path_end)]
    # The agent stops reading at the bound; what the socket buffers took is a few MiB.
    assert sent and max(sent) < 32 * MiB, f"the agent read {sent} bytes of an endless answer\n" + res.describe()


def test_an_endless_enrollment_answer_is_cut_off_at_the_bound(fleet, tmp_path, ops, swtpm_factory, proxy_factory):
    repo, server, _ = fleet
    proxy = proxy_factory(server.url)
    proxy.intercept = lambda req: endless_answer(req) if req.path == "/api/v1/enroll" else None
    dev = tpm_device(fleet, tmp_path, swtpm_factory("tpm"), server_url=proxy.url, factory_image=image("v1"))
    res = agent(dev, "enroll", "--token", ops.enrollment_token())
    assert_cut_off(res, proxy, "/api/v1/enroll", "enroll")
    assert not (dev.state_dir / "identity.json").exists(), res.describe()


@pytest.mark.parametrize("endpoint,step", [("/nonce", "get check-in nonce"), ("/checkin", "check in")])
def test_an_endless_nonce_or_checkin_answer_is_cut_off_at_the_bound(fleet, tmp_path, ops, swtpm_factory,
                                                                    proxy_factory, endpoint, step):
    repo, server, _ = fleet
    proxy = proxy_factory(server.url)
    dev, device_id, _ = enrolled_device(fleet, tmp_path, ops, swtpm_factory, server_url=proxy.url)
    proxy.intercept = lambda req: endless_answer(req) if req.path.endswith(endpoint) else None
    res = agent(dev, "checkin")
    assert_cut_off(res, proxy, endpoint, step)
    # The device is fine otherwise: with an honest answer it checks in.
    proxy.intercept = None
    assert checkin(dev)["verdict"] == "attested"

