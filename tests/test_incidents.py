"""Integrity incidents on the server's side (the device's side is tests/test_vm.py's
byte flip): a device without identity posts a dm-verity corruption it read from the
kernel's pstore record, an enrolled one sends it in its attested check-in; the server validates it against the kernel line it carries,
stores it once, logs it, and refuses forged, malformed and oversized ones with an
error naming the field, storing nothing."""
from __future__ import annotations

import json

from conftest import http_post, list_incidents

LINE = "<3>[   23.915531] device-mapper: verity: 254:3: data block 50558 is corrupted"


def incident(**changes) -> dict:
    body = {"device_id": "vm-9", "hardware_class": "qemu-x86_64", "kind": "verity_data", "dev": "254:3", "block": 50558,
            "slot": "B", "release": "2.0.0", "boot_at": "2026-12-05T19:23:47Z", "record": "dmesg-efi-179649862701001", "line": LINE}
    body.update(changes)
    return body


def post(server, body) -> tuple[int, dict | bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = http_post(f"{server.url}/api/v1/incidents", raw, None, "application/json")
    try:
        return status, json.loads(answer)
    except ValueError:
        return status, answer


def test_an_incident_is_stored_once_and_logged(outpost_server):
    server, _ = outpost_server
    assert post(server, incident()) == (200, {"recorded": True})
    # The agent crashed after sending, before forgetting: the same incident again.
    assert post(server, incident()) == (200, {"recorded": True})
    rows = list_incidents(server, "vm-9")
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["block"], row["dev"], row["slot"], row["kind"], row["attested"], row["line"]) == (50558, "254:3", "B", "verity_data", False, LINE)
    status, body = server_audit(server)
    assert status == 200
    logged = [e for e in json.loads(body)["entries"] if e["action"] == "integrity_incident"]
    assert len(logged) == 1 and logged[0]["actor"] == "device:vm-9" and logged[0]["detail"]["incident"]["block"] == 50558, logged


def server_audit(server):
    from conftest import http_get
    return http_get(f"{server.url}/api/v1/audit", token=server.token("auditor", role="viewer"))


def test_forged_malformed_and_oversized_incidents_are_refused_and_nothing_is_stored(outpost_server):
    server, _ = outpost_server
    cases = [
        # The fields must agree with the kernel's line: a forged block number is refused.
        (incident(block=1), "block 1 disagrees with the line, which says 50558"),
        (incident(dev="254:2"), "dev 254:2 disagrees with the line"),
        (incident(kind="verity_metadata"), "kind verity_metadata disagrees"),
        (incident(line="kernel: all is well"), "line is not a dm-verity corruption line"),
        (incident(line=LINE + "\n" + LINE), "line must be one line"),
        (incident(line="x" * 600), "line must be 1-512 characters"),
        (incident(record="../../../etc/passwd"), "is not a pstore dmesg record name"),
        (incident(boot_at="last tuesday"), "boot_at \"last tuesday\" is not an RFC 3339 time"),
        (incident(device_id=""), "device_id must be 1-128 characters"),
        (incident(block=2**63, line=LINE.replace("50558", str(2**63))), "is beyond any device"),
    ]
    for body, want in cases:
        status, answer = post(server, body)
        assert status == 422, (body, status, answer)
        assert answer["code"] == "invalid_incident" and want in answer["message"], (want, answer)
    # Not the wire form: unknown fields and kinds are refused by the decoder, naming them.
    status, answer = post(server, incident(rootkit=True))
    assert status in (400, 422) and "rootkit" in json.dumps(answer), answer
    status, answer = post(server, incident(kind="bad_ram"))
    assert status in (400, 422) and "bad_ram" in json.dumps(answer), answer
    # A body beyond the route's limit is refused before it is read whole.
    status, _ = post(server, json.dumps(incident(hardware_class="x" * 8192)).encode())
    assert status == 413, status
    assert list_incidents(server) == []


from test_attestation import agent, checkin, enrolled_device, ops  # noqa: E402,F401 (ops: the fixture)


def test_an_enrolled_device_s_incidents_come_only_in_its_attested_check_ins(fleet, tmp_path, ops, swtpm_factory):
    """An enrolled device's queued incident travels in its attested check-in (the quote
    covers it) and is stored as attested. One whose fields disagree with its kernel
    line (the queue file edited on the device) is refused by name and not stored, and
    the rest of that check-in still counts: the valid incident beside it is stored, the
    device is judged, and the refused one leaves the queue, so it cannot refuse every
    later check-in (and with them the device's updates). The unattested route is
    closed to an enrolled id."""
    server = fleet[1]
    dev, device_id, _ = enrolled_device(fleet, tmp_path, ops, swtpm_factory)
    queue = dev.state_dir / "incidents.json"
    genuine = incident(device_id=device_id, hardware_class="rpi4")
    queue.write_text(json.dumps({"pending": [dict(genuine, block=1), genuine]}))
    verdict = checkin(dev)
    assert verdict["verdict"] == "attested", verdict
    refused = verdict.get("refused_incidents") or []
    assert [r["index"] for r in refused] == [0], verdict
    assert "incidents[0]: block 1 disagrees with the line, which says 50558" in refused[0]["reason"], refused
    shown = ops.device(device_id)["incidents"]
    assert [(i["block"], i["dev"], i["attested"]) for i in shown] == [(50558, "254:3", True)], shown
    assert json.loads(queue.read_text())["pending"] == [], "the refused incident left the queue too"
    _, audit = server_audit(server)
    logged = [e for e in json.loads(audit)["entries"] if e["action"] == "integrity_incident_refused"]
    assert len(logged) == 1 and "block 1 disagrees" in json.dumps(logged[0]), logged
    # The next check-in is not refused.
    assert checkin(dev)["verdict"] == "attested"

    status, answer = post(server, genuine)
    assert status == 403 and answer["code"] == "device_enrolled", answer


def test_a_device_without_identity_drops_an_incident_the_server_finds_invalid_and_sends_the_rest(fleet, tmp_path):
    """A device that does not attest posts its queue one by one: one the server refuses
    as invalid (422: the queue file edited) is dropped with a warning naming why, and
    the valid one after it still reaches the server; before, the first refusal stopped
    every later flush, so nothing behind it was ever reported."""
    from test_install import new_device
    server = fleet[1]
    dev = new_device(fleet, tmp_path, name="vm-9")
    queue = dev.state_dir / "incidents.json"
    queue.parent.mkdir(parents=True, exist_ok=True)
    queue.write_text(json.dumps({"pending": [incident(block=1), incident()]}))
    res = dev.run_once()
    assert "block 1 disagrees with the line, which says 50558" in res.stdout + res.stderr, res.stderr[-3000:]
    rows = list_incidents(server, "vm-9")
    assert [(r["block"], r["attested"]) for r in rows] == [(50558, False)], rows
    assert json.loads(queue.read_text())["pending"] == []
