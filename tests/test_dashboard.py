"""The web dashboard (issue 5) in headless Debian Chromium against outpost-server on
loopback: it loads rollouts with their waves, devices with version, health and
attestation, and the audit log; an operator pauses a rollout with a mouse click and
sees the change; changes made elsewhere appear without a reload; a viewer sees no
actions and the server refuses them anyway."""

from __future__ import annotations

import json

import pytest

from cdp import Browser
from conftest import http_get
from test_attestation import Ops, checkin, enrolled_device, image, publish, results


@pytest.fixture
def ops(fleet) -> Ops:
    return Ops(fleet)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "chromium-profile")
    yield b
    b.close()


def text_of(selector: str) -> str:
    return f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''"


def test_dashboard_shows_the_fleet_and_pauses_a_rollout(fleet, tmp_path, ops, swtpm_factory, browser):
    repo, server, _ = fleet
    dev, device_id, _ = enrolled_device(fleet, tmp_path, ops, swtpm_factory)
    publish(fleet, image("v2"), "2.0.0")
    rollout = ops.rollout("2.0.0", min_devices=5)   # stays running: 5 healthy devices needed
    rid = rollout["id"]
    assert {"result": "committed", "version": "2.0.0", "slot": "B"} in results(dev.run_once())
    assert checkin(dev)["verdict"] == "attested"

    browser.open(f"{server.url}/dashboard#token={ops.token}")
    browser.wait_for("document.body.dataset.loaded === 'true'", what="the first refresh")
    assert "ops (operator)" in browser.eval(text_of("#who"))
    assert browser.eval("location.hash") == "", "the token left the address bar"
    state = f"[data-id='{rid}'] [data-state]"
    assert browser.wait_for(f"(document.querySelector(\"{state}\") || {{}}).dataset?.state") == "running"
    rollouts = browser.eval(text_of("#rollouts"))
    assert "2.0.0" in rollouts and "running in wave 0" in rollouts
    row = browser.eval(text_of(f"[data-device='{device_id}']"))
    assert "2.0.0" in row and "attested" in row and "healthy" in row, row
    assert "rollout_start" in browser.eval(text_of("#audit"))

    # The operator pauses it with a click; the page shows the new state.
    browser.click(f"button[data-action='pause'][data-id='{rid}']")
    browser.wait_for(f"document.querySelector(\"{state}\").dataset.state === 'paused'", what="paused")
    assert "paused in wave 0 by ops" in browser.eval(text_of(f"[data-id='{rid}']"))
    shown = ops.rollout_status(rid)
    assert shown["state_name"] == "paused" and shown["state"]["reason"] == {"kind": "operator", "by": "ops"}
    audit = json.loads(http_get(f"{server.url}/api/v1/audit", token=ops.token)[1])["entries"]
    assert (audit[0]["actor"], audit[0]["action"], audit[0]["detail"]["rollout"]) == ("ops", "rollout_pause", rid)

    # Changed elsewhere (the CLI): the page follows without a reload.
    ops.rollout_cli("resume", rid)
    browser.wait_for(f"document.querySelector(\"{state}\").dataset.state === 'running'", what="running again")
    browser.wait_for(f"{text_of('#audit')}.includes('rollout_resume')", what="the resume in the audit log")

    # A viewer reads everything but gets no actions, and the server refuses them.
    viewer = server.token("wall-screen", role="viewer")
    browser.open(f"{server.url}/dashboard#token={viewer}")
    browser.wait_for("document.body.dataset.loaded === 'true'", what="the viewer's first refresh")
    assert "wall-screen (viewer)" in browser.eval(text_of("#who"))
    assert browser.eval("document.querySelectorAll('button[data-action]').length") == 0
    status = browser.eval(f"fetch('/api/v1/rollouts/{rid}/pause', {{method: 'POST', headers: "
                          f"{{Authorization: 'Bearer {viewer}'}}}}).then(r => r.status)")
    assert status == 403

    # A wrong token: a clear error and the sign-in form, nothing else.
    browser.open(f"{server.url}/dashboard#token=opt_wrong")
    err = browser.wait_for(text_of("#error"), what="an error")
    assert "401" in err and "unknown API token" in err, err
    assert browser.eval("document.getElementById('login').hidden") is False
    assert browser.eval("document.getElementById('main').hidden") is True
