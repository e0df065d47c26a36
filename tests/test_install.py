"""A/B installs with `outpost-agent --config agent.toml run --once` (issue 3).

Real processes, real files, real HTTP on 127.0.0.1: releases are signed with
`outpost release publish` and served by `outpost-server`; the device is the
agent with its file boot backend (state_dir/boot/slot-a.img, slot-b.img,
bootenv.json) and its install journal (state_dir/journal.json). A "reboot" is
the agent re-executing itself; a power cut is SIGKILL of its process group.
Where a test needs to see or spoil the traffic, a small proxy (conftest.Proxy)
sits between the agent and the server.

1. every state transition: install + commit, signed health check failing ->
   rollback, a rolled-back release not retried, a newer one installed, trial boot
   not confirmed before the boot counter ran out, trial deadline, config checks
   (command, http, stays_up), signed checks when the server is unreachable;
2. power cuts at >= 200 random instants (seed printed; OUTPOST_POWERCUT_ITERATIONS,
   OUTPOST_POWERCUT_SEED, OUTPOST_POWERCUT_WORKERS), and several cuts in a row;
3. resume after a dropped connection and after an agent restart, wrong bytes
   after a resume;
4. delta updates, a corrupted delta falling back to the full image, a device not
   on the base;
5. zstd releases, corrupt and truncated zstd targets;
6. bad input: disk full (tmpfs; needs root), corrupt journal, corrupt bootenv.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import (
    HASH_WORDS,
    LENGTH_WORDS,
    Device,
    OutpostRepo,
    ProxyAnswer,
    assert_fails,
    assert_ok,
    file_sha256,
    free_port,
    list_reports,
    quote_all,
    run,
    sha256_hex,
    tree_files,
)

MiB = 1 << 20


# ------------------------------------------------------------------ helpers
def image(seed: int | str, size: int) -> bytes:
    """Incompressible, reproducible firmware bytes."""
    return random.Random(f"image {seed}").randbytes(size)


def changed(base: bytes, seed: int | str, edits: int = 8, span: int = 4096) -> bytes:
    """`base` with a few regions rewritten (a realistic next version for deltas)."""
    rnd = random.Random(f"edit {seed}")
    out = bytearray(base)
    for _ in range(edits):
        at = rnd.randrange(0, len(out) - span)
        out[at:at + span] = rnd.randbytes(span)
    return bytes(out) + f"version {seed}\n".encode()


def compressible(seed: int | str, size: int) -> bytes:
    """Text-like bytes zstd shrinks a lot."""
    rnd = random.Random(f"text {seed}")
    words = [rnd.randbytes(6).hex() for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rnd.choice(words) for _ in range(12)) + "\n").encode()
    return bytes(out[:size])


def publish(fleet, data: bytes, version: str, *extra) -> dict:
    """Signs and uploads `data` as firmware/rpi4/<version>/fw.img."""
    repo, server, token = fleet
    repo.publish(data, version, server=server, token=token, extra=tuple(str(e) for e in extra))
    return {"version": version, "sha256": sha256_hex(data), "length": len(data),
            "target": f"firmware/rpi4/{version}/fw.img", "file": build_file(repo, version)}


def build_file(repo: OutpostRepo, version: str) -> Path:
    return repo.base / "builds" / version / "fw.img"


def new_device(fleet, tmp_path: Path, name: str = "device", server_url: str | None = None,
               **kw) -> Device:
    repo, server, _ = fleet
    return Device(tmp_path / name, server_url or server.url, repo.root1, device_id=name, **kw)


def results(res) -> list[dict]:
    return Device.results(res)


def result_kinds(res) -> list[str]:
    return [r.get("result") for r in results(res)]


def expect_committed(dev: Device, res, rel: dict, slot: str) -> None:
    """`run --once` ended with `rel` committed in `slot`, which is active and holds
    exactly the signed image; no trial is pending."""
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0, "expected exit code 0\n" + ctx
    assert {"result": "committed", "version": rel["version"], "slot": slot} in results(res), ctx
    j = dev.journal()
    assert j["phase"]["phase"] == "committed", ctx
    assert j["phase"]["release"]["version"] == rel["version"] and j["phase"]["slot"] == slot, ctx
    assert j["running"] is not None and j["running"]["sha256"] == rel["sha256"], ctx
    assert j["running"]["version"] == rel["version"], ctx
    env = dev.bootenv()
    assert env["active"] == slot and env["trial"] is None, ctx
    assert dev.slot_sha(slot) == rel["sha256"], ctx


def journal_parses(dev: Device) -> dict:
    raw = dev.journal_path.read_bytes()
    try:
        return json.loads(raw)
    except ValueError:
        pytest.fail(f"journal.json is not valid JSON any more: {raw[:300]!r}", pytrace=False)


def installed_v1(fleet, tmp_path, size: int = 256 * 1024, name: str = "device",
                 server_url: str | None = None, **kw) -> tuple[Device, dict]:
    """A device that installed and committed 1.0.0 (in slot B: a fresh device runs A)."""
    v1 = publish(fleet, image("v1", size), "1.0.0")
    dev = new_device(fleet, tmp_path, name, server_url=server_url, **kw)
    res = dev.run_once()
    expect_committed(dev, res, v1, "B")
    return dev, v1


def wait_for(pred, timeout: float, what: str, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)


def safe_phase(dev: Device) -> str | None:
    try:
        return dev.phase()
    except (OSError, ValueError, KeyError):
        return None


def target_gets(proxy, contains: str) -> list:
    return [r for r in proxy.target_requests(contains) if r.method == "GET"]


def full_image_gets(proxy, version: str) -> list:
    return [r for r in target_gets(proxy, f"/{version}/") if r.path.endswith(".fw.img")]


# =============================================== 1. every state transition
def test_v1_installs_into_inactive_slot_and_commits(fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    v1 = publish(fleet, image("v1", 300_000), "1.0.0")
    facts = tmp_path / "facts.txt"
    check = ('{ echo "$OUTPOST_SLOT"; echo "$OUTPOST_SLOT_PATH"; echo "$OUTPOST_VERSION"; '
             'echo "$OUTPOST_TARGET"; sha256sum "$OUTPOST_SLOT_PATH"; } > ' + str(facts))
    dev = new_device(fleet, tmp_path, server_url=proxy.url,
                     health=[{"kind": "command", "run": check, "timeout_secs": 10}])

    res = dev.run_once()
    expect_committed(dev, res, v1, "B")
    assert result_kinds(res) == ["committed", "up_to_date"], res.describe()
    j = dev.journal()
    running = {k: j["running"].get(k) for k in ("target", "version", "sha256", "length")}
    assert running == {"target": v1["target"], "version": "1.0.0", "sha256": v1["sha256"],
                       "length": v1["length"]}, j
    assert j["failed"] == [] and j["pending_reports"] == [], j
    # The health check ran on the trial boot of slot B, with the boot facts.
    lines = facts.read_text().splitlines()
    assert lines[:4] == ["B", str(dev.slot_path("B")), "1.0.0", v1["target"]], lines
    assert lines[4].split()[0] == v1["sha256"], "the check saw a slot that is not the image"
    # The previously running slot was not touched; nothing is left staged.
    assert dev.slot_path("A").read_bytes() == b""
    assert [p.name for p in dev.downloads.iterdir()] == [], list(dev.downloads.iterdir())
    metrics = (dev.state_dir / "metrics.prom").read_text()
    assert 'outpost_agent_install_phase{phase="committed"} 1' in metrics, metrics
    assert f'sha256="{v1["sha256"]}"' in metrics, metrics
    # The server heard about it.
    reports = list_reports(server, device="device")
    assert [(r["version"], r["outcome"], r["slot"], r["target"], r["reason"]) for r in reports] == \
        [("1.0.0", "committed", "B", v1["target"], None)], reports
    assert reports[0]["hardware_class"] == "rpi4"
    assert len(target_gets(proxy, "/1.0.0/")) == 1

    # Nothing newer: up to date, no download, nothing changes.
    proxy.clear()
    before = (dev.bootenv()["active"], dev.slot_sha("A"), dev.slot_sha("B"))
    res = assert_ok(dev.run_once(as_json=False))
    assert "up to date (1.0.0)" in res.stdout, res.describe()
    assert proxy.target_requests() == [], [r.path for r in proxy.target_requests()]
    assert (dev.bootenv()["active"], dev.slot_sha("A"), dev.slot_sha("B")) == before
    assert len(list_reports(server, device="device")) == 1


def test_failing_signed_health_check_rolls_back_is_not_retried_and_newer_release_installs(
        fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url)

    v2 = publish(fleet, image("v2", 280_000), "2.0.0",
                 "--health-command", 'echo "v2 self-test failed" >&2; exit 3')
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0, ctx
    kinds = results(res)
    assert [k["result"] for k in kinds] == ["rolled_back", "skipped_failed_release"], ctx
    reason = kinds[0]["reason"]
    assert kinds[0]["version"] == "2.0.0" and "v2 self-test failed" in reason, ctx
    assert "3" in reason, ctx
    # The previous slot stays active with its verified image; no trial pending.
    env = dev.bootenv()
    assert env["active"] == "B" and env["trial"] is None, ctx
    assert dev.slot_sha("B") == v1["sha256"], ctx
    assert dev.slot_sha("A") == v2["sha256"], "v2 was not written to the inactive slot\n" + ctx
    j = dev.journal()
    assert j["phase"]["phase"] == "rolled_back" and j["phase"]["release"]["version"] == "2.0.0", ctx
    assert "v2 self-test failed" in j["phase"]["reason"], ctx
    assert j["running"]["version"] == "1.0.0", ctx
    assert [f["version"] for f in j["failed"]] == ["2.0.0"], ctx
    reports = list_reports(server, device="device")
    assert [(r["version"], r["outcome"]) for r in reports] == \
        [("2.0.0", "rolled_back"), ("1.0.0", "committed")], reports
    assert "v2 self-test failed" in reports[0]["reason"], reports[0]
    assert reports[0]["slot"] == "A", reports[0]

    # Not retried: the next check skips it without downloading it again.
    proxy.clear()
    res = assert_ok(dev.run_once(as_json=False))
    assert "release 2.0.0 was rolled back on this device; waiting for a newer one" in res.stdout, \
        res.describe()
    assert proxy.target_requests() == [], [r.path for r in proxy.target_requests()]
    assert dev.bootenv()["active"] == "B" and dev.slot_sha("B") == v1["sha256"]
    assert len(list_reports(server, device="device")) == 2

    # A newer release installs into the inactive slot (A) and commits.
    v3 = publish(fleet, image("v3", 260_000), "3.0.0")
    res = dev.run_once()
    expect_committed(dev, res, v3, "A")
    assert dev.slot_sha("B") == v1["sha256"], "the previous slot changed"
    j = dev.journal()
    assert [f["version"] for f in j["failed"]] == ["2.0.0"], j
    reports = list_reports(server, device="device")
    assert [(r["version"], r["outcome"], r["slot"]) for r in reports] == \
        [("3.0.0", "committed", "A"), ("2.0.0", "rolled_back", "A"), ("1.0.0", "committed", "B")]


def test_trial_boot_not_confirmed_before_boot_counter_runs_out_rolls_back(fleet, tmp_path):
    repo, server, token = fleet
    dev, v1 = installed_v1(fleet, tmp_path)
    marker = tmp_path / "check-started"
    dev.write_config(install={"trial_attempts": 1},
                     health=[{"kind": "command", "run": f"touch {marker}; sleep 30",
                              "timeout_secs": 60}])
    v2 = publish(fleet, image("v2", 200_000), "2.0.0")

    agent = dev.start()
    wait_for(lambda: marker.exists() or not agent.alive(), 20, "the trial's health check")
    assert agent.power_cut(), "the agent ended before the power cut\n" + agent.wait().describe()
    ctx = dev.state_summary()
    assert dev.phase() == "trial_boot", ctx
    assert dev.bootenv()["trial"] == {"slot": "A", "attempts_left": 0}, ctx
    assert dev.bootenv()["active"] == "B", ctx

    # Power on again: the bootloader has no attempt left, boots B, the agent rolls back.
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0, ctx
    kinds = results(res)
    assert [k["result"] for k in kinds] == ["rolled_back", "skipped_failed_release"], ctx
    assert "not confirmed" in kinds[0]["reason"], ctx
    env = dev.bootenv()
    assert env["active"] == "B" and env["trial"] is None, ctx
    assert env["last_boot"] == {"TrialExhausted": {"failed": "A", "slot": "B"}}, ctx
    assert dev.slot_sha("B") == v1["sha256"], ctx
    j = dev.journal()
    assert j["phase"]["phase"] == "rolled_back" and j["running"]["version"] == "1.0.0", ctx
    assert v2["version"] in [f["version"] for f in j["failed"]], ctx
    report = list_reports(server, device="device")[0]
    assert (report["version"], report["outcome"]) == ("2.0.0", "rolled_back"), report
    assert "not confirmed" in report["reason"], report


def test_trial_deadline_from_config_rolls_back(fleet, tmp_path):
    repo, server, token = fleet
    dev, v1 = installed_v1(fleet, tmp_path)
    dev.write_config(install={"trial_deadline": "1s"},
                     health=[{"kind": "command", "run": "sleep 5", "timeout_secs": 30}])
    publish(fleet, image("v2", 200_000), "2.0.0")
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0 and result_kinds(res)[0] == "rolled_back", ctx
    assert "deadline" in results(res)[0]["reason"], ctx
    assert res.elapsed < 5, "the deadline did not stop the 5 s check\n" + ctx
    assert dev.bootenv()["active"] == "B" and dev.active_sha() == v1["sha256"], ctx


def test_signed_trial_deadline_is_honoured(fleet, tmp_path):
    """`release publish --trial-deadline 1s` signs the deadline into the release;
    a device whose own config allows 5 minutes must still hold the release to it."""
    dev, v1 = installed_v1(fleet, tmp_path)
    publish(fleet, image("v2", 200_000), "2.0.0",
            "--trial-deadline", "1s", "--health-command", "sleep 3")
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0, ctx
    assert result_kinds(res)[:1] == ["rolled_back"], \
        "a health check outlasting the signed trial deadline (1s) was accepted\n" + ctx
    assert "deadline" in results(res)[0]["reason"], ctx
    assert dev.bootenv()["active"] == "B" and dev.active_sha() == v1["sha256"], ctx


@pytest.mark.parametrize("ca_store", ["system", "none"])
def test_config_http_health_check(fleet, tmp_path, ca_store, monkeypatch):
    """Also on a device without a system CA store (the agent's TLS stack then trusts
    no server, and still checks plain-HTTP endpoints: it once failed to build its
    client there, and every trial rolled back)."""
    if ca_store == "none":
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "no-store.pem"))
        monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-store"))
    repo, server, token = fleet
    dev, v1 = installed_v1(fleet, tmp_path,
                           health=[{"kind": "http", "url": f"{server.url}/healthz",
                                    "timeout_secs": 5}])
    closed = f"http://127.0.0.1:{free_port()}/healthz"
    dev.write_config(health=[{"kind": "http", "url": closed, "timeout_secs": 5}])
    publish(fleet, image("v2", 200_000), "2.0.0")
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0 and result_kinds(res) == ["rolled_back", "skipped_failed_release"], ctx
    assert closed in results(res)[0]["reason"], ctx
    assert dev.bootenv() | {"last_boot": None} == {"active": "B", "trial": None, "last_boot": None}
    assert dev.active_sha() == v1["sha256"], ctx
    report = list_reports(server, device="device")[0]
    assert report["outcome"] == "rolled_back" and closed in report["reason"], report


def test_config_stays_up_health_check(fleet, tmp_path):
    repo, server, token = fleet
    pidfile = tmp_path / "service.pid"
    dev, v1 = installed_v1(fleet, tmp_path,
                           health=[{"kind": "stays_up", "run": f"echo $$ > {pidfile}; exec sleep 30",
                                    "seconds": 1}])
    # The service that passed was stopped afterwards, not left running.
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", "stays_up service left running"
    dev.write_config(health=[{"kind": "stays_up", "run": "echo crashing >&2; exit 1",
                              "seconds": 1}])
    publish(fleet, image("v2", 200_000), "2.0.0")
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0 and result_kinds(res)[:1] == ["rolled_back"], ctx
    assert "stays up" in results(res)[0]["reason"], ctx
    assert dev.bootenv()["active"] == "B" and dev.active_sha() == v1["sha256"], ctx


def test_signed_health_checks_still_apply_when_server_is_unreachable_at_trial_boot(
        fleet, tmp_path):
    """The device reboots into the new slot and the network is not up yet: the
    release's own (signed) health check is known from trusted local metadata and
    must still run; it fails, so the release must be rolled back, not committed."""
    repo, server, token = fleet
    dev, v1 = installed_v1(fleet, tmp_path)
    marker = tmp_path / "check-started"
    dev.write_config(health=[{"kind": "command", "run": f"touch {marker}; sleep 30",
                              "timeout_secs": 60}])
    publish(fleet, image("v2", 200_000), "2.0.0",
            "--health-command", 'echo "v2 is broken" >&2; exit 1')
    agent = dev.start()
    wait_for(lambda: marker.exists() or not agent.alive(), 20, "the trial's health check")
    assert agent.power_cut(), agent.wait().describe()
    assert dev.phase() == "trial_boot" and dev.bootenv()["trial"]["attempts_left"] == 1, \
        dev.state_summary()

    server.terminate()           # offline from here on
    dev.write_config(health=[])  # only the signed check remains
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert dev.phase() == "rolled_back", \
        "the release's signed health check was skipped while offline\n" + ctx
    assert dev.bootenv()["active"] == "B" and dev.active_sha() == v1["sha256"], ctx
    assert "v2 is broken" in dev.journal()["phase"]["reason"], ctx
    # The report waits for the server.
    assert any(r["outcome"] == "rolled_back" for r in dev.journal()["pending_reports"]), ctx


def test_reports_queued_while_server_unreachable_are_delivered_later(fleet, tmp_path,
                                                                     proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    v1 = publish(fleet, image("v1", 200_000), "1.0.0")
    dev = new_device(fleet, tmp_path, server_url=proxy.url)

    def refuse_reports(req):
        if req.path.startswith("/api/v1/reports"):
            return ProxyAnswer(503, [("Content-Length", "20")], b"down for maintenance")
        return None
    proxy.intercept = refuse_reports
    res = dev.run_once()
    expect_committed(dev, res, v1, "B")
    assert [r["outcome"] for r in dev.journal()["pending_reports"]] == ["committed"], \
        dev.state_summary()
    assert list_reports(server, device="device") == []

    proxy.intercept = None
    assert_ok(dev.run_once())
    assert dev.journal()["pending_reports"] == [], dev.state_summary()
    reports = list_reports(server, device="device")
    assert [(r["version"], r["outcome"]) for r in reports] == [("1.0.0", "committed")], reports


# ============================================================ 2. power cuts
POWERCUT_SIZE = 5 * MiB          # > the agent's 4 MiB checkpoint: late cuts resume
POWERCUT_RATE = 10 * MiB         # bandwidth_limit_bytes_per_sec: ~0.5 s per download
POWERCUT_HEALTH = [{"kind": "command", "run": "sleep 0.2", "timeout_secs": 10}]


def powercut_setup(fleet, tmp_path) -> tuple[Device, dict, dict]:
    """A device with 1.0.0 committed (slot B) and 2.0.0 published, not yet seen."""
    data1 = image("pc-v1", POWERCUT_SIZE)
    v1 = publish(fleet, data1, "1.0.0")
    dev = new_device(fleet, tmp_path, "pristine",
                     install={"bandwidth_limit_bytes_per_sec": POWERCUT_RATE},
                     health=POWERCUT_HEALTH)
    res = dev.run_once()
    expect_committed(dev, res, v1, "B")
    v2 = publish(fleet, changed(data1, "pc-v2", edits=64), "2.0.0")
    return dev, v1, v2


def measure_run(pristine: Device, tmp_path: Path, v2: dict, workers: int) -> float:
    """Median duration of uninterrupted v1->v2 runs, `workers` at a time (the load
    the power-cut loop runs under)."""
    clones = [pristine.clone(tmp_path / f"measure-{i}") for i in range(workers)]
    with ThreadPoolExecutor(workers) as ex:
        runs = list(ex.map(lambda d: d.run_once(timeout=60), clones))
    for d, res in zip(clones, runs):
        expect_committed(d, res, v2, "A")
        shutil.rmtree(d.workdir)
    return statistics.median(r.elapsed for r in runs)


def check_after_cut(dev: Device, v1: dict, v2: dict) -> list[str]:
    """Invariants at the instant of a power cut: the active slot holds a signed
    image; the new slot is active only once its trial passed."""
    problems = []
    env = dev.bootenv()
    active_sha = dev.slot_sha(env["active"])
    if active_sha not in (v1["sha256"], v2["sha256"]):
        problems.append(f"active slot {env['active']} holds sha256 {active_sha}: not a signed image")
    if env["active"] == "A":
        phase = safe_phase(dev)
        if phase not in ("trial_boot", "committed") or active_sha != v2["sha256"]:
            problems.append(f"slot A active in phase {phase} with sha256 {active_sha}")
    if dev.slot_sha("B") != v1["sha256"]:
        problems.append("the committed v1 slot B was modified")
    return problems


def check_finished(dev: Device, res, v1: dict, v2: dict, allow_rollback: bool) -> list[str]:
    problems = []
    if res.returncode != 0:
        return [f"restart exited {res.returncode}"]
    try:
        j = dev.journal()
        env = dev.bootenv()
    except (OSError, ValueError) as e:
        return [f"state unreadable: {e}"]
    phase = j["phase"]["phase"]
    if phase == "committed":
        if j["phase"]["release"]["sha256"] != v2["sha256"] or j["phase"]["slot"] != "A":
            problems.append(f"committed something else: {j['phase']}")
        if env["active"] != "A" or dev.slot_sha("A") != v2["sha256"]:
            problems.append(f"committed v2 but active {env['active']} has {dev.slot_sha(env['active'])}")
        if (j.get("running") or {}).get("sha256") != v2["sha256"]:
            problems.append(f"running is {j.get('running')}")
    elif phase == "rolled_back" and allow_rollback:
        if "confirm" not in j["phase"].get("reason", ""):
            problems.append(f"rolled back for another reason: {j['phase'].get('reason')}")
        if env["active"] != "B" or dev.slot_sha("B") != v1["sha256"]:
            problems.append(f"rolled back but active {env['active']} has {dev.slot_sha(env['active'])}")
    else:
        problems.append(f"run ended in phase {phase}")
    if env.get("trial") is not None:
        problems.append(f"a trial is still pending: {env['trial']}")
    if dev.slot_sha("B") != v1["sha256"]:
        problems.append("the committed v1 slot B was modified")
    return problems


def powercut_loop(pristine: Device, tmp_path: Path, v1: dict, v2: dict, *, iterations: int,
                  kills: tuple[int, int], seed: int, workers: int, span: float,
                  allow_rollback: bool) -> tuple[list, list]:
    """Runs `iterations` installs on copies of `pristine`, each cut `kills` times
    (inclusive range) after uniform random delays in [0, span]. Returns
    (cuts: [(phase at cut, agent was running)], failures: [text])."""
    rnd = random.Random(seed)
    plans = [[rnd.uniform(0, span) for _ in range(rnd.randint(*kills))] for _ in range(iterations)]
    cuts: list[tuple[str | None, bool]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        for i in range(w, iterations, workers):
            if len(failures) >= 5:
                return
            where = tmp_path / f"cut-{w}"
            if where.exists():
                shutil.rmtree(where)
            dev = pristine.clone(where)
            notes = []
            for k, delay in enumerate(plans[i]):
                agent = dev.start(tag=f"cut{k}")
                time.sleep(delay)
                alive = agent.power_cut()
                phase = safe_phase(dev)
                problems = check_after_cut(dev, v1, v2)
                with lock:
                    cuts.append((phase, alive))
                notes.append(f"cut {k} after {delay:.3f}s in phase {phase} (running: {alive})")
                if problems:
                    with lock:
                        failures.append(f"iteration {i} (seed {seed}): {'; '.join(notes)}: "
                                        f"{problems}\n{dev.state_summary()}")
                    return
            res = dev.run_once(timeout=60)
            problems = check_finished(dev, res, v1, v2, allow_rollback)
            if problems:
                with lock:
                    failures.append(f"iteration {i} (seed {seed}): {'; '.join(notes)}; restart: "
                                    f"{problems}\n{res.describe()}\n{dev.state_summary()}")

    with ThreadPoolExecutor(workers) as ex:
        for f in [ex.submit(worker, w) for w in range(workers)]:
            f.result()
    return cuts, failures


def powercut_params(name: str, default_iterations: int) -> tuple[int, int, int]:
    iterations = int(os.environ.get(f"OUTPOST_{name}_ITERATIONS", default_iterations))
    seed = int(os.environ.get("OUTPOST_POWERCUT_SEED") or random.SystemRandom().randrange(2**32))
    workers = max(1, int(os.environ.get("OUTPOST_POWERCUT_WORKERS", "5")))
    return iterations, seed, workers


def phase_counts(cuts) -> dict[str, int]:
    counts: dict[str, int] = {}
    for phase, alive in cuts:
        key = phase if alive else f"{phase} (after exit)"
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_power_cut_at_random_points_never_leaves_an_unverified_active_slot(fleet, tmp_path):
    iterations, seed, workers = powercut_params("POWERCUT", 200)
    pristine, v1, v2 = powercut_setup(fleet, tmp_path)
    span = measure_run(pristine, tmp_path, v2, workers)
    print(f"power-cut seed {seed} (OUTPOST_POWERCUT_SEED), {iterations} iterations, "
          f"{workers} workers, uninterrupted v1->v2 run T = {span:.3f}s")
    started = time.monotonic()
    cuts, failures = powercut_loop(pristine, tmp_path, v1, v2, iterations=iterations,
                                   kills=(1, 1), seed=seed, workers=workers, span=span,
                                   allow_rollback=False)
    counts = phase_counts(cuts)
    print(f"power cuts by phase: {counts} in {time.monotonic() - started:.1f}s")
    assert not failures, f"seed {seed}: {len(failures)} failed iteration(s):\n" + \
        "\n\n".join(failures[:3])
    assert len(cuts) == iterations, (len(cuts), iterations)
    if iterations >= 200:
        live = {phase for phase, alive in cuts if alive}
        missing = {"downloading", "committed"} - live
        if not live & {"installed", "trial_boot"}:
            missing.add("installed/trial_boot")
        assert not missing, f"seed {seed}: no power cut landed in {missing}: {counts}"


def test_several_power_cuts_within_one_install(fleet, tmp_path):
    iterations, seed, workers = powercut_params("POWERCUT_MULTI", 30)
    pristine, v1, v2 = powercut_setup(fleet, tmp_path)
    span = measure_run(pristine, tmp_path, v2, workers)
    print(f"multi power-cut seed {seed}, {iterations} installs cut 2-4 times, T = {span:.3f}s")
    cuts, failures = powercut_loop(pristine, tmp_path, v1, v2, iterations=iterations,
                                   kills=(2, 4), seed=seed, workers=workers, span=span,
                                   allow_rollback=True)
    print(f"power cuts by phase: {phase_counts(cuts)}")
    assert not failures, f"seed {seed}: {len(failures)} failed iteration(s):\n" + \
        "\n\n".join(failures[:3])


def journal_downloading(dev, v2, durable: int) -> None:
    """Journals that the device is downloading v2 (sent as-is) with `durable` bytes
    checkpointed, as a power cut during that phase leaves it."""
    release = {"target": v2["target"], "version": "2.0.0", "sha256": v2["sha256"],
               "length": v2["length"]}
    j = dev.journal()
    j["phase"] = {"phase": "downloading", "release": release,
                  "transfer": {"target": v2["target"], "encoding": "identity",
                               "length": v2["length"]},
                  "durable": durable}
    dev.journal_path.write_text(json.dumps(j, indent=2))


def test_power_cut_after_last_checkpoint_before_download_is_closed(fleet, tmp_path,
                                                                   proxy_factory):
    """The instant after the final checkpoint journaled `durable == length` and
    before the complete partial file was set aside: the restart must not ask the
    server for bytes past the end, and must finish the install."""
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url)
    v2 = publish(fleet, image("v2", 300_000), "2.0.0")
    journal_downloading(dev, v2, durable=v2["length"])
    (dev.downloads / f"{quote_all(v2['target'])}.partial").write_bytes(v2["file"].read_bytes())

    res = dev.run_once()
    gets = [(r.range, r.status) for r in target_gets(proxy, "/2.0.0/")]
    ctx = res.describe() + f"\ntarget requests (Range, status): {gets}\n" + dev.state_summary()
    if res.returncode != 0:
        again = dev.run_once()
        pytest.fail(f"the restart failed; a second restart: exit {again.returncode}, "
                    f"{again.stderr.strip().splitlines()[-1:]}\n{ctx}", pytrace=False)
    expect_committed(dev, res, v2, "A")
    assert all(st in (200, 206) for _, st in gets), ctx


def power_cut_after_transfer(dev, v2, staged: bytes) -> None:
    """The state a power cut leaves between the end of v2's transfer (partial file
    renamed to the staged image) and the journal's `verified`: the journal still says
    `downloading` from its last checkpoint, no partial file, `staged` as the image."""
    journal_downloading(dev, v2, durable=v2["length"] // 2)
    (dev.downloads / f"{quote_all(v2['target'])}.image").write_bytes(staged)


def test_power_cut_after_the_staged_image_replaced_the_partial(fleet, tmp_path, proxy_factory):
    """The restart finds the staged image, checks its length and hash, and installs it
    without fetching the image again."""
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url)
    v2 = publish(fleet, image("v2", 300_000), "2.0.0")
    power_cut_after_transfer(dev, v2, v2["file"].read_bytes())
    proxy.clear()

    res = dev.run_once()
    expect_committed(dev, res, v2, "A")
    gets = full_image_gets(proxy, "2.0.0")
    assert gets == [], res.describe() + f"\nthe verified staged image was fetched again: {gets}"
    assert "not downloading it again" in res.stderr, res.describe()


def test_power_cut_leaves_a_wrong_staged_image_that_is_fetched_again(fleet, tmp_path,
                                                                      proxy_factory):
    """A staged image that does not match the release (here: one byte changed) is never
    installed: the restart fetches the image whole and installs the right bytes."""
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url)
    v2 = publish(fleet, image("v2", 300_000), "2.0.0")
    staged = bytearray(v2["file"].read_bytes())
    staged[1234] ^= 0x01
    power_cut_after_transfer(dev, v2, bytes(staged))
    proxy.clear()

    res = dev.run_once()
    expect_committed(dev, res, v2, "A")
    gets = full_image_gets(proxy, "2.0.0")
    ctx = res.describe() + f"\ntarget requests: {gets}"
    assert len(gets) == 1 and gets[0].range is None and gets[0].sent == v2["length"], ctx


@pytest.mark.parametrize("phase", ["verified", "writing"])
def test_a_staged_image_corrupted_after_verified_is_discarded_and_fetched_again(fleet, tmp_path,
                                                                                  proxy_factory, phase):
    """The journal says `verified` (or `writing`) and the staged image has rotted since:
    it is not written again and again into the slot; it is thrown away and the release
    fetched once more."""
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url)
    v2 = publish(fleet, image("v2", 300_000), "2.0.0")
    release = {"target": v2["target"], "version": "2.0.0", "sha256": v2["sha256"], "length": v2["length"]}
    j = dev.journal()
    j["phase"] = {"phase": "verified", "release": release} if phase == "verified" else \
        {"phase": "writing", "release": release, "slot": "A"}
    dev.journal_path.write_text(json.dumps(j, indent=2))
    staged = bytearray(v2["file"].read_bytes())
    staged[4321] ^= 0x01
    (dev.downloads / f"{quote_all(v2['target'])}.image").write_bytes(bytes(staged))
    proxy.clear()
    res = dev.run_once()
    expect_committed(dev, res, v2, "A")
    assert "no longer verifies" in res.stderr, res.describe()
    assert len(full_image_gets(proxy, "2.0.0")) == 1, res.describe()


def test_downloads_no_journal_entry_owns_are_cleaned(fleet, tmp_path):
    """Staged images and partial transfers of releases given up on stay forever
    otherwise: the next install removes what no journal entry owns (and nothing else)."""
    dev, v1 = installed_v1(fleet, tmp_path)
    stale = [dev.downloads / "firmware%2Frpi4%2F0.9.0%2Ffw.img.image",
             dev.downloads / "firmware%2Frpi4%2F0.9.1%2Ffw.img.partial"]
    for f in stale:
        f.write_bytes(b"x" * 4096)
    unrelated = dev.downloads / "notes.txt"
    unrelated.write_text("not the installer's")
    v2 = publish(fleet, image("v2", 200_000), "2.0.0")
    res = dev.run_once()
    expect_committed(dev, res, v2, "A")
    assert not any(f.exists() for f in stale), list(dev.downloads.iterdir())
    assert unrelated.exists()


@pytest.fixture
def loop_slot(tmp_path):
    """A 4 MiB loop block device (root), like a partition: larger than the image."""
    backing = tmp_path / "partition.img"
    backing.write_bytes(b"\xee" * (4 * MiB))
    p = run(["losetup", "--find", "--show", str(backing)])
    assert p.returncode == 0, p.describe()
    dev_path = Path(p.stdout.strip())
    yield dev_path
    run(["losetup", "--detach", str(dev_path)])


def test_a_partition_slot_is_verified_over_exactly_the_signed_length(fleet, tmp_path, loop_slot):
    """A block-device slot is larger than the image: hashing it to its end never equals
    the release, so every pass rewrote the whole slot (flash wear). The image's signed
    length is what is hashed; the install commits and the next pass writes nothing."""
    v1 = publish(fleet, image("v1", 300_000), "1.0.0")
    dev = new_device(fleet, tmp_path)
    dev.slot_path("B").parent.mkdir(parents=True, exist_ok=True)
    if dev.slot_path("B").exists():
        dev.slot_path("B").unlink()
    dev.slot_path("B").symlink_to(loop_slot)
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert {"result": "committed", "version": "1.0.0", "slot": "B"} in results(res), ctx
    with open(loop_slot, "rb") as f:
        head = f.read(v1["length"])
        tail = f.read(16)
    assert sha256_hex(head) == v1["sha256"] and tail == b"\xee" * 16, "the image, then the partition's old bytes"
    res = dev.run_once()
    assert result_kinds(res)[-1] == "up_to_date", res.describe()
    assert dev.journal()["running"]["version"] == "1.0.0"


# ================================================================ 3. resume
def test_dropped_connection_resumes_from_received_offset(fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url)
    v2 = publish(fleet, image("v2", 1 * MiB), "2.0.0")
    cut = 300_000

    def drop_first(req, answer):
        if req.is_target and "/2.0.0/" in req.path and req.nth == 0:
            answer.cut_after = cut
    proxy.rule = drop_first

    res = dev.run_once()
    expect_committed(dev, res, v2, "A")
    gets = target_gets(proxy, "/2.0.0/")
    ctx = res.describe() + "\n" + str(gets)
    assert len(gets) == 2, ctx
    assert gets[0].range is None and gets[0].sent == cut, ctx
    m = re.fullmatch(r"bytes=(\d+)-", gets[1].range or "")
    assert m, f"the retry is not a Range request from an offset\n{ctx}"
    k = int(m.group(1))
    assert 0 < k <= cut, ctx
    assert gets[1].status == 206 and gets[1].sent == v2["length"] - k, ctx
    total = sum(r.sent for r in gets)
    assert total < 2 * v2["length"], ctx
    assert total == cut + v2["length"] - k, ctx


def test_wrong_bytes_after_resume_are_caught(fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url)
    v2 = publish(fleet, image("v2", 1 * MiB), "2.0.0")
    slot_a_before = dev.slot_sha("A")

    def drop_then_lie(req, answer):
        if req.is_target and "/2.0.0/" in req.path:
            if req.nth == 0:
                answer.cut_after = 300_000
            elif req.range:
                bad = bytearray(answer.body)
                for i in range(100, len(bad), 4099):
                    bad[i] ^= 0xFF
                answer.body = bytes(bad)
    proxy.rule = drop_then_lie

    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    if res.returncode == 0:
        # Acceptable only if the agent noticed and fetched everything again.
        expect_committed(dev, res, v2, "A")
        later = target_gets(proxy, "/2.0.0/")[2:]
        assert any(r.range is None for r in later), ctx
    else:
        assert_fails(res, *HASH_WORDS)
        assert "2.0.0" in res.stderr and "fw.img" in res.stderr, \
            "the error does not name the target\n" + ctx
        env = dev.bootenv()
        assert env["active"] == "B" and env["trial"] is None, ctx
        assert dev.slot_sha("B") == v1["sha256"], ctx
        assert dev.slot_sha("A") == slot_a_before, "unverified bytes reached a slot\n" + ctx
        j = journal_parses(dev)
        assert j["phase"]["phase"] in ("idle", "downloading", "committed"), ctx
        assert j["running"]["version"] == "1.0.0", ctx

        # The server behaves again: the bad bytes are not resumed from.
        proxy.rule = None
        proxy.clear()
        res = dev.run_once()
        expect_committed(dev, res, v2, "A")
        gets = target_gets(proxy, "/2.0.0/")
        assert gets and gets[0].range in (None, "bytes=0-"), \
            f"resumed on top of bytes that failed verification: {gets}"


def test_agent_restart_resumes_from_journaled_offset(fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    size = 6 * MiB  # past the agent's 4 MiB durable checkpoint
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url,
                           install={"bandwidth_limit_bytes_per_sec": 5 * MiB})
    v2 = publish(fleet, image("v2", size), "2.0.0")

    def durable():
        try:
            j = dev.journal()
        except (OSError, ValueError):
            return 0
        return j["phase"].get("durable", 0) if j["phase"]["phase"] == "downloading" else 0

    agent = dev.start()
    d = wait_for(lambda: durable() or (not agent.alive() and -1), 30, "a durable checkpoint")
    assert agent.power_cut(), "the download finished before a checkpoint was seen"
    d = durable()
    assert 0 < d < size, dev.state_summary()
    metrics = (dev.state_dir / "metrics.prom").read_text()
    assert f"outpost_agent_download_durable_bytes {d}" in metrics, metrics
    assert f"outpost_agent_download_total_bytes {size}" in metrics, metrics
    first = sum(r.sent for r in target_gets(proxy, "/2.0.0/"))

    proxy.clear()
    res = dev.run_once()
    expect_committed(dev, res, v2, "A")
    gets = target_gets(proxy, "/2.0.0/")
    assert gets and gets[0].range == f"bytes={d}-", \
        f"restart did not resume from the journaled offset {d}: {[(r.range, r.sent) for r in gets]}"
    assert gets[0].status == 206
    assert sum(r.sent for r in gets) == size - d
    assert first + size - d < 2 * size


# ================================================================= 4. delta
def delta_setup(fleet, tmp_path, proxy):
    dev, v1 = installed_v1(fleet, tmp_path, size=2 * MiB, server_url=proxy.url)
    data2 = changed(v1["file"].read_bytes(), "v2")
    v2 = publish(fleet, data2, "2.0.0", "--delta-from", "1.0.0", "--delta-base", v1["file"])
    return dev, v1, v2


def test_delta_update_reconstructs_the_new_image(fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1, v2 = delta_setup(fleet, tmp_path, proxy)
    proxy.clear()
    res = dev.run_once()
    expect_committed(dev, res, v2, "A")
    patches = target_gets(proxy, "zst-patch")
    assert len(patches) == 1 and "/2.0.0/" in patches[0].path, [r.path for r in proxy.requests]
    assert full_image_gets(proxy, "2.0.0") == [], "the full image was downloaded too"
    assert patches[0].sent < v2["length"] // 10, f"patch of {patches[0].sent} bytes"
    assert dev.slot_path("A").read_bytes() == v2["file"].read_bytes()


def test_corrupted_delta_falls_back_to_full_image(fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1, v2 = delta_setup(fleet, tmp_path, proxy)

    def spoil_patch(req, answer):
        if req.is_target and "zst-patch" in req.path:
            bad = bytearray(answer.body)
            bad[len(bad) // 2] ^= 0x55
            answer.body = bytes(bad)
    proxy.rule = spoil_patch
    proxy.clear()
    res = dev.run_once()
    expect_committed(dev, res, v2, "A")
    assert target_gets(proxy, "zst-patch"), "the delta was not tried"
    assert len(full_image_gets(proxy, "2.0.0")) == 1, [r.path for r in proxy.requests]
    assert dev.slot_sha("B") == v1["sha256"]


def test_device_not_running_the_delta_base_uses_the_full_image(fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1 = installed_v1(fleet, tmp_path, size=1 * MiB, server_url=proxy.url)
    data2 = changed(v1["file"].read_bytes(), "v2")
    v2 = publish(fleet, data2, "2.0.0")
    v3 = publish(fleet, changed(data2, "v3"), "3.0.0", "--delta-from", "2.0.0",
                 "--delta-base", v2["file"])
    proxy.clear()
    res = dev.run_once()
    expect_committed(dev, res, v3, "A")
    assert target_gets(proxy, "zst-patch") == [], "a patch for another base was fetched"
    assert len(full_image_gets(proxy, "3.0.0")) == 1, [r.path for r in proxy.requests]


# ================================================================== 5. zstd
def test_zstd_release_installs_the_decompressed_image(fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    data = compressible("z1", 2 * MiB)
    v1 = publish(fleet, data, "1.0.0", "--zstd")
    dev = new_device(fleet, tmp_path, server_url=proxy.url)
    res = dev.run_once()
    expect_committed(dev, res, v1, "B")
    assert dev.slot_path("B").read_bytes() == data
    gets = target_gets(proxy, "/1.0.0/")
    assert len(gets) == 1 and gets[0].path.endswith(".fw.img.zst"), [r.path for r in gets]
    assert gets[0].sent < len(data) // 2, f"{gets[0].sent} bytes for a {len(data)} byte image"


def zstd_v2(fleet, tmp_path, proxy):
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url, install={"retries": 1})
    v2 = publish(fleet, compressible("z2", 1 * MiB), "2.0.0", "--zstd")
    return dev, v1, v2


def assert_stays_on_v1(dev: Device, res, v1: dict, slot_a_before: str | None) -> None:
    ctx = res.describe() + "\n" + dev.state_summary()
    env = dev.bootenv()
    assert env["active"] == "B" and env["trial"] is None, ctx
    assert dev.slot_sha("B") == v1["sha256"], ctx
    assert dev.slot_sha("A") == slot_a_before, "unverified bytes reached a slot\n" + ctx
    j = journal_parses(dev)
    assert j["running"]["version"] == "1.0.0", ctx
    assert j["phase"]["phase"] not in ("verified", "writing", "installed", "trial_boot"), ctx


def test_corrupt_zstd_target_is_refused(fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1, v2 = zstd_v2(fleet, tmp_path, proxy)
    slot_a = dev.slot_sha("A")

    def spoil(req, answer):
        if req.is_target and req.path.endswith(".zst") and "/2.0.0/" in req.path:
            bad = bytearray(answer.body)
            bad[len(bad) // 3] ^= 0x01
            answer.body = bytes(bad)
    proxy.rule = spoil
    res = dev.run_once()
    assert_fails(res, *HASH_WORDS, "decode", "zstd")
    assert "2.0.0" in res.stderr and "fw.img.zst" in res.stderr, res.describe()
    assert_stays_on_v1(dev, res, v1, slot_a)
    # No unverified decoded image is kept around.
    staged = {k: len(v) for k, v in tree_files(dev.downloads).items()}
    assert not any(k.endswith(".image") for k in staged), \
        f"unverified staged image left in downloads: {staged}\n" + res.describe()

    proxy.rule = None
    res = dev.run_once()
    expect_committed(dev, res, v2, "A")
    assert dev.slot_path("A").read_bytes() == v2["file"].read_bytes()


def test_truncated_zstd_target_is_refused(fleet, tmp_path, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1, v2 = zstd_v2(fleet, tmp_path, proxy)
    slot_a = dev.slot_sha("A")

    full: dict[str, bytes] = {}

    def truncate(req, answer):
        # A server whose copy of the file is cut short, and that ignores Range.
        if req.is_target and req.path.endswith(".zst") and "/2.0.0/" in req.path:
            if req.range is None:
                full["zst"] = answer.body
            whole = full["zst"]
            answer.headers = [(k, v) for k, v in answer.headers if k.lower() != "content-range"]
            answer.set_body(whole[: len(whole) * 2 // 3], status=200)
    proxy.rule = truncate
    res = dev.run_once(timeout=90)
    assert_fails(res, *LENGTH_WORDS, *HASH_WORDS)
    assert "2.0.0" in res.stderr, res.describe()
    assert_stays_on_v1(dev, res, v1, slot_a)


def test_zstd_frame_asking_for_a_2_gib_window_is_refused_at_its_header(fleet, tmp_path, proxy_factory):
    """The server rewrites the window descriptor of the (signed) zstd frame to ask for
    2^31 bytes. The bytes are not verified until the end; the decoder must refuse the
    frame at its header, naming the limit (2^27 for an image this small), instead of
    allocating a 2 GiB window for it (2d9746a accepted up to 2^31)."""
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1, v2 = zstd_v2(fleet, tmp_path, proxy)
    slot_a = dev.slot_sha("A")

    def big_window(req, answer):
        if req.is_target and req.path.endswith(".zst") and "/2.0.0/" in req.path:
            body = bytearray(answer.body)
            assert body[:4] == bytes.fromhex("28b52ffd") and not body[4] & 0x20, "expected a windowed zstd frame"
            body[5] = (31 - 10) << 3
            answer.body = bytes(body)
    proxy.rule = big_window
    res = dev.run_once()
    assert_fails(res, "window")
    assert "2147483648" in res.stderr and "window log 27" in res.stderr, res.describe()
    assert "2.0.0" in res.stderr, res.describe()
    assert_stays_on_v1(dev, res, v1, slot_a)
    staged = {k: len(v) for k, v in tree_files(dev.downloads).items()}
    assert not any(k.endswith(".image") for k in staged), staged

    proxy.rule = None
    res = dev.run_once()
    expect_committed(dev, res, v2, "A")


def test_a_resumed_start_does_not_decode_the_kept_bytes_again(fleet, tmp_path, proxy_factory):
    """A zstd download cut short at 90 %: the next start resumes with a Range request.
    The kept bytes are not verified yet; 2d9746a decoded all of them again (rewriting
    the staged image) at every start before asking for the rest, so a server that cuts
    every attempt short near its end cost a full decode and image rewrite per check
    interval. Measured from outside: the bytes the agent has written (/proc/PID/io
    wchar) when its Range request arrives."""
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url, install={"retries": 0})
    data = compressible("resume", 24 * MiB)
    v2 = publish(fleet, data, "2.0.0", "--zstd")

    def cut(req, answer):
        if req.is_target and req.path.endswith(".zst") and "/2.0.0/" in req.path and req.range is None:
            answer.cut_after = len(answer.body) * 9 // 10
    proxy.rule = cut
    res = dev.run_once()
    assert res.returncode != 0, res.describe()
    j = journal_parses(dev)
    assert j["phase"]["phase"] == "downloading" and j["phase"]["durable"] > 0, dev.state_summary()

    asked, release = threading.Event(), threading.Event()

    def hold(req):
        if req.is_target and "/2.0.0/" in req.path and req.range:
            asked.set()
            release.wait(30)
        return None
    proxy.rule = None
    proxy.intercept = hold
    agent = dev.start()
    try:
        wait_for(lambda: asked.is_set() or not agent.alive(), 60, "the Range request")
        assert asked.is_set(), "the agent ended without resuming"
        io = dict(line.split(": ") for line in Path(f"/proc/{agent.pid}/io").read_text().splitlines())
    finally:
        release.set()
    res = agent.wait(120)
    expect_committed(dev, res, v2, "A")
    written = int(io["wchar"])
    assert written < 4 * MiB, (f"the agent wrote {written} bytes before asking for the rest: the kept, unverified "
                               f"bytes were decoded again ({len(data) * 9 // 10} bytes of image)")


# ============================================================= 6. bad input
@pytest.fixture
def tmpfs():
    """mount(dir, size) -> a tmpfs of that size at dir (unmounted after the test)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str = "3m") -> Path:
        if os.geteuid() != 0:
            pytest.fail("the disk-full tests mount a small tmpfs: run the suite as root "
                        "(CI does), with util-linux `mount`", pytrace=False)
        if shutil.which("mount") is None:
            pytest.fail("`mount` not found: apt-get install mount", pytrace=False)
        path.mkdir(parents=True, exist_ok=True)
        res = run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path])
        assert res.returncode == 0, "cannot mount a tmpfs (needs root / CAP_SYS_ADMIN)\n" + \
            res.describe()
        mounted.append(path)
        return path

    yield mount
    for p in reversed(mounted):
        run(["umount", "-l", p])


def test_disk_full_is_refused_before_downloading(fleet, tmp_path, tmpfs):
    repo, server, token = fleet
    v1 = publish(fleet, image("v1", 256 * 1024), "1.0.0")
    dev = new_device(fleet, tmp_path)
    tmpfs(dev.state_dir, "3m")
    res = dev.run_once()
    expect_committed(dev, res, v1, "B")
    journal_before = dev.journal_path.read_bytes()

    publish(fleet, image("v2", 4 * MiB), "2.0.0")
    res = dev.run_once()
    assert_fails(res, "free space", "no space")
    ctx = res.describe() + "\n" + dev.state_summary()
    assert str(dev.state_dir) in res.stderr, ctx
    env = dev.bootenv()
    assert env["active"] == "B" and env["trial"] is None, ctx
    assert dev.slot_sha("B") == v1["sha256"] and dev.slot_path("A").read_bytes() == b"", ctx
    j = journal_parses(dev)
    assert j["phase"]["phase"] == "committed" and j["running"]["version"] == "1.0.0", ctx
    assert dev.journal_path.read_bytes() == journal_before, ctx
    assert tree_files(dev.downloads) == {}, ctx

    # Still refused the same way next time (nothing was left filling the disk).
    res = dev.run_once()
    assert_fails(res, "free space", "no space")


def test_as_is_release_needs_room_for_one_copy(fleet, tmp_path, tmpfs):
    """A release sent as-is becomes the staged image by rename, so the download
    directory needs room for one copy of it. The same size sent zstd-compressed is
    decoded beside its compressed file and needs room for both: refused up front."""
    repo, server, token = fleet
    v1 = publish(fleet, image("v1", 256 * 1024), "1.0.0")
    dev = new_device(fleet, tmp_path, install={"boot_dir": "bootpart"})
    tmpfs(dev.state_dir, "3m")
    res = dev.run_once()
    expect_committed(dev, res, v1, "B")

    # Random bytes: zstd cannot shrink them, so this needs about 2 x 2 MiB.
    publish(fleet, image("v2", 2 * MiB), "2.0.0", "--zstd")
    res = dev.run_once()
    assert_fails(res, "free space", "no space")
    ctx = res.describe() + "\n" + dev.state_summary()
    assert journal_parses(dev)["phase"]["phase"] == "committed", ctx
    assert tree_files(dev.downloads) == {}, ctx

    v3 = publish(fleet, image("v3", 2 * MiB), "3.0.0")
    res = dev.run_once()
    expect_committed(dev, res, v3, "A")


def test_disk_full_while_writing_the_slot(fleet, tmp_path, tmpfs):
    """The slots live on a small partition (boot_dir on a 3 MiB tmpfs): the check on
    the download directory passes, writing the inactive slot runs out of space."""
    repo, server, token = fleet
    v1 = publish(fleet, image("v1", 1 * MiB), "1.0.0")
    dev = new_device(fleet, tmp_path, install={"boot_dir": "bootpart"})
    tmpfs(dev.boot_dir, "3m")
    res = dev.run_once()
    expect_committed(dev, res, v1, "B")

    publish(fleet, image("v2", int(2.5 * MiB)), "2.0.0")
    res = dev.run_once()
    assert_fails(res, "free space", "no space")
    ctx = res.describe() + "\n" + dev.state_summary()
    assert "slot" in res.stderr.lower(), ctx
    env = dev.bootenv()
    assert env["active"] == "B" and env["trial"] is None, ctx
    assert dev.slot_sha("B") == v1["sha256"], ctx
    j = journal_parses(dev)
    assert j["running"]["version"] == "1.0.0", ctx
    assert j["phase"]["phase"] not in ("installed", "trial_boot", "committed"), ctx

    # The next start still works: the same clear error, not a failure to boot.
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert_fails(res, "free space", "no space")
    assert "boot environment" not in res.stderr and "bootenv" not in res.stderr, \
        "a failed slot write left the boot partition too full to record a boot\n" + ctx
    assert dev.bootenv()["active"] == "B" and dev.slot_sha("B") == v1["sha256"], ctx


def test_corrupt_journal_is_set_aside_and_the_device_keeps_its_slot(fleet, tmp_path):
    repo, server, token = fleet
    dev, v1 = installed_v1(fleet, tmp_path)
    garbage = b"\x00\xffnot a journal{{{" + os.urandom(64)
    dev.journal_path.write_bytes(garbage)

    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0, ctx
    err = res.stderr.lower()
    assert "journal" in err and "corrupt" in err, "the corrupt journal is not reported\n" + ctx
    aside = sorted(dev.state_dir.glob("journal.json.corrupt-*")) + \
        sorted(dev.state_dir.glob("journal.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage, \
        f"corrupt journal not kept aside: {sorted(p.name for p in dev.state_dir.iterdir())}"
    j = journal_parses(dev)
    assert j["phase"]["phase"] in ("idle", "committed"), ctx
    assert dev.active_sha() == v1["sha256"], ctx
    assert dev.bootenv()["trial"] is None, ctx


def test_corrupt_journal_does_not_reinstall_the_running_release(fleet, tmp_path, proxy_factory):
    """Losing the journal loses no fact the device cannot re-establish: the active
    slot's digest is the newest signed release's, so the device is up to date and
    keeps its active slot (no new download, no trial boot of a copy in the other slot)."""
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, v1 = installed_v1(fleet, tmp_path, server_url=proxy.url)
    dev.journal_path.write_bytes(b"\x00\x01 not json")
    proxy.clear()
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0, ctx
    assert dev.bootenv()["active"] == "B", "the active slot changed\n" + ctx
    assert target_gets(proxy, "/1.0.0/") == [], \
        "the release the device already runs was downloaded again\n" + ctx


def test_corrupt_bootenv_is_a_clear_error_and_nothing_changes(fleet, tmp_path):
    repo, server, token = fleet
    dev, v1 = installed_v1(fleet, tmp_path)
    publish(fleet, image("v2", 200_000), "2.0.0")
    dev.bootenv_path.write_bytes(b"{\"active\": \"B\", \x00 garbage")
    before = tree_files(dev.boot_dir)
    journal_before = dev.journal_path.read_bytes()
    res = dev.run_once()
    assert_fails(res, "bootenv.json")
    assert "corrupt" in res.stderr.lower(), res.describe()
    assert tree_files(dev.boot_dir) == before, "the boot partition changed"
    assert dev.journal_path.read_bytes() == journal_before
