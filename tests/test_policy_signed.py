"""Network policy over the TUF chain (root): bundles signed under the `policy`
delegation reach `outpost-agent` through its TUF client and are enforced with eBPF;
a wrongly signed or tampered bundle is refused and the current policy stays; when the
bundle expires while the server is gone, the essential profile takes over; the
attested check-in carries the policy status to the server.

The repository in the first test is tests/reposim.py (python-tuf's Metadata API), so
the test can play a server that signs with the wrong key or serves altered bytes."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time

import pytest

from conftest import binary, free_port, run, toml_str
from policy_net import (CGROUP_ROOT, Echo, Net, Workload, bundle, fetch_metrics, new_pin_dir, policy_info,
                        remove_cgroup_tree, require_root, workload_yaml)
from reposim import RepoSim, SimServer, new_signer

TCP_A, TCP_B, TCP_C = 7201, 7202, 7203


@pytest.fixture(scope="module")
def net():
    require_root()
    n = Net(2)
    echo = Echo([n.host4], [TCP_A, TCP_B, TCP_C], [])
    yield n
    echo.close()
    n.close()


@pytest.fixture
def workload(net, request):
    base = f"outpost-test-{os.getpid()}"
    w = Workload(net, f"{base}/{request.node.name[5:40]}/app")
    yield w
    remove_cgroup_tree(CGROUP_ROOT / base)


def iso(seconds_from_now: float) -> str:
    t = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds_from_now)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def custom(name: str, version: int, not_after: str, classes=("rpi4",)) -> dict:
    return {"kind": "policy", "name": name, "version": version, "not_after": not_after,
            "selector": {"hardware_classes": list(classes), "labels": {}}}


@pytest.fixture
def pin_dir():
    """A bpffs pin directory of the test's own; enforcement pinned there is detached
    when the test ends (the agent's exit does not end it)."""
    d = new_pin_dir()
    yield d
    subprocess.run([str(binary("outpost-agent")), "policy", "detach", "--pin-dir", str(d)], capture_output=True, timeout=30)


def wait_for(cond, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


def test_signed_bundles_wrong_key_tampering_and_offline_expiry(net, workload, tmp_path, pin_dir):
    sim = RepoSim()
    sim.add_delegation("targets", "policy", paths=["policy/*/*"])
    sim.publish("targets")
    server = SimServer(sim).start()
    w = workload
    allow = lambda port, name: workload_yaml("app", w.rel, [  # noqa: E731
        f"{{name: {name}, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {port}}}"])

    def add(version: int, port: int, not_after: str, essential: str = "{}") -> tuple[str, bytes]:
        text = bundle(name="edge", version=version, not_after=not_after, workloads=allow(port, f"p{port}"),
                      essential=essential).encode()
        path = f"policy/edge/v{version}.yaml"
        sim.add_target("policy", path, text, custom("edge", version, not_after))
        return path, text

    add(1, TCP_A, iso(3600))
    sim.publish("policy")
    port = free_port()
    workdir = tmp_path / "device"
    workdir.mkdir()
    (workdir / "root.json").write_bytes(sim.root_history[1])
    (workdir / "agent.toml").write_text(
        f"server_url = {toml_str(sim.base_url)}\nhardware_class = \"rpi4\"\nstate_dir = \"state\"\n"
        f"trusted_root = \"root.json\"\n\n[http]\ntimeout = \"3s\"\n\n[install]\ncheck_interval = \"1s\"\n\n"
        f"[policy]\ncgroup_root = {toml_str(str(CGROUP_ROOT))}\nmetrics_listen = \"127.0.0.1:{port}\"\n"
        f"pin_dir = {toml_str(str(pin_dir))}\n")
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen([str(binary("outpost-agent")), "--config", str(workdir / "agent.toml"),
                             "--log-level", "info", "policy", "run"], stdout=log, stderr=subprocess.STDOUT)
    info = lambda: policy_info(fetch_metrics(port)) or {}  # noqa: E731
    agent_log = lambda: (tmp_path / "agent.log").read_text(errors="replace")  # noqa: E731
    try:
        wait_for(lambda: info().get("version") == "1", what="bundle v1 enforced")
        assert (w.probe("tcp", net.host4, TCP_A), w.probe("tcp", net.host4, TCP_B, timeout=0.7)) == (1, 0)

        # v2 in a `policy` role signed by a key the delegation does not name.
        add(2, TCP_B, iso(3600))
        sim.roles["policy"].signed.version += 1
        sim.sign_and_serve("policy", signers=[new_signer()])
        sim.update_snapshot()
        sim.update_timestamp()
        wait_for(lambda: "policy" in agent_log() and "signature" in agent_log(), what="the wrongly signed role refused")
        time.sleep(1.5)
        assert info().get("version") == "1", "a wrongly signed bundle must not replace the enforced one"
        assert (w.probe("tcp", net.host4, TCP_A), w.probe("tcp", net.host4, TCP_B, timeout=0.7)) == (1, 0)

        # v3 signed correctly, but the server serves other bytes of the same length.
        path3, text3 = add(3, TCP_B, iso(3600))
        sim.publish("policy")
        sim.files[sim.target_path(path3, "policy")] = text3.replace(str(TCP_B).encode(), str(TCP_C).encode())
        wait_for(lambda: "v3.yaml" in agent_log() and "sha256" in agent_log(), what="the tampered bundle refused")
        time.sleep(1.5)
        assert info().get("version") == "1"
        status = json.loads((workdir / "state" / "policy" / "status.json").read_text())
        assert status["version"] == 1 and "v3.yaml" in (status["refused"] or ""), status

        # v4, correct, expiring soon; its essential profile allows only TCP_C.
        essential = "\n  workloads:\n" + "".join("  " + line + "\n" for line in allow(TCP_C, "mgmt").splitlines())
        add(4, TCP_B, iso(12), essential=essential)
        sim.publish("policy")
        wait_for(lambda: info().get("version") == "4", what="bundle v4 enforced")
        assert (w.probe("tcp", net.host4, TCP_A, timeout=0.7), w.probe("tcp", net.host4, TCP_B)) == (0, 1)

        # The server goes away; v4 expires; the device falls back on its own.
        server.stop()
        wait_for(lambda: info().get("applied") == "essential", timeout=30, what="essential profile")
        assert (w.probe("tcp", net.host4, TCP_B, timeout=0.7), w.probe("tcp", net.host4, TCP_C)) == (0, 1)
        status = wait_for(lambda: json.loads((workdir / "state" / "policy" / "status.json").read_text()) if
                          "essential" in (workdir / "state" / "policy" / "status.json").read_text() else None,
                          what="status written")
        assert status["applied"] == "essential" and status["fell_back_at"] and status["enforcing"], status
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - already stopped above
            pass
    # A restarted agent with no server enforces the stored policy (still essential) at once.
    res = run([binary("outpost-agent"), "--config", workdir / "agent.toml", "--json", "policy", "run", "--once"], timeout=60)
    assert "restored the enforced network policy" in res.stderr or res.returncode == 0, res.describe()


def test_publish_under_the_policy_role_and_report_in_attested_checkins(fleet, tmp_path, swtpm_factory, net, workload,
                                                                      pin_dir):
    from test_attestation import Ops, enrolled_device
    repo, server, token = fleet
    ops = Ops(fleet)
    bundle_file = tmp_path / "edge.yaml"
    bundle_file.write_text(bundle(name="edge", version=1, workloads=workload_yaml("app", workload.rel, [
        f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"])))
    # Without a policy role, publishing says how to make one.
    res = repo.cli("policy", "publish", "--repo", repo.dir, "--key", repo.key("firmware"), bundle_file, check=False)
    assert res.returncode != 0 and "repo delegate --role policy" in res.stderr, res.describe()
    repo.cli("repo", "delegate", "--repo", repo.dir, "--role", "policy", "--delegate-key", repo.key("policy"),
             "--threshold", "1", "--paths", "policy/*/*", "--sign-key", repo.key("targets"))
    # Firmware keys cannot sign the policy role.
    res = repo.cli("policy", "publish", "--repo", repo.dir, "--key", repo.key("firmware"), bundle_file, check=False)
    assert res.returncode != 0, res.describe()
    out = json.loads(repo.cli("--json", "policy", "publish", "--repo", repo.dir, "--key", repo.key("policy"),
                              "--hardware-class", "rpi4", "--server", server.url, "--token", token, bundle_file).stdout)
    assert out["target"] == "policy/edge/v1.yaml" and out["role"] == "policy", out
    dev, device_id, _ = enrolled_device(fleet, tmp_path, ops, swtpm_factory)
    dev.write_config(extra_toml=f"\n[policy]\ncgroup_root = {toml_str(str(CGROUP_ROOT))}\npin_dir = {toml_str(str(pin_dir))}\n")
    res = dev.run_once()
    assert res.returncode == 0, res.describe()
    record = ops.device(device_id)["device"]
    assert record["attestation"] == "attested", record
    pol = record["policy"]
    assert pol["name"] == "edge" and pol["version"] == 1 and pol["applied"] == "bundle", pol
    assert pol["enforcing"] is True and pol["target"] == "policy/edge/v1.yaml", pol
    assert "allowed" in pol["verdicts"], pol

    # The engine cannot start (its pin directory is not on bpffs): the device must not
    # go on reporting the enforcement it had. Its status and its next attested check-in
    # say enforcement is not running and why, and the server stores that instead of
    # keeping the old status.
    not_bpffs = tmp_path / "not-bpffs"
    dev.write_config(extra_toml=f"\n[policy]\ncgroup_root = {toml_str(str(CGROUP_ROOT))}\npin_dir = {toml_str(str(not_bpffs))}\n")
    res = dev.run_once()
    assert "NOT enforcing network policy" in res.stderr, res.describe()
    status = json.loads(run([binary("outpost-agent"), "--config", dev.config, "policy", "status"]).stdout)
    assert status["enforcing"] is False and "cannot start" in status["error"] and "BPF file system" in status["error"], status
    assert status["name"] == "edge" and status["version"] == 1, status
    record = ops.device(device_id)["device"]
    pol = record["policy"]
    assert pol["enforcing"] is False and "cannot start" in (pol.get("error") or ""), pol


def test_expiry_fallback_is_on_time_while_a_fetch_hangs(net, workload, tmp_path, pin_dir):
    """The server trickles timestamp.json at 2 bytes/s, above this device's configured
    floor (`min_bytes_per_sec = 1`, a link that is slow by configuration), so the
    policy step's fetch legitimately hangs for minutes. The bundle's not_after passes
    meanwhile: the device must fall back to the essential profile on time, not when
    the fetch ends (2d9746a checks the expiry only between network steps)."""
    sim = RepoSim()
    sim.add_delegation("targets", "policy", paths=["policy/*/*"])
    sim.publish("targets")
    server = SimServer(sim).start()
    w = workload
    allow = lambda port, name: workload_yaml("app", w.rel, [  # noqa: E731
        f"{{name: {name}, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {port}}}"])
    essential = "\n  workloads:\n" + "".join("  " + line + "\n" for line in allow(TCP_C, "mgmt").splitlines())
    not_after = iso(15)
    text = bundle(name="edge", version=1, not_after=not_after, workloads=allow(TCP_B, "api"),
                  essential=essential).encode()
    sim.add_target("policy", "policy/edge/v1.yaml", text, custom("edge", 1, not_after))
    sim.publish("policy")
    port = free_port()
    workdir = tmp_path / "device"
    workdir.mkdir()
    (workdir / "root.json").write_bytes(sim.root_history[1])
    (workdir / "agent.toml").write_text(
        f"server_url = {toml_str(sim.base_url)}\nhardware_class = \"rpi4\"\nstate_dir = \"state\"\n"
        f"trusted_root = \"root.json\"\n\n[http]\ntimeout = \"3s\"\nmin_bytes_per_sec = 1\n\n"
        f"[install]\ncheck_interval = \"1s\"\n\n"
        f"[policy]\ncgroup_root = {toml_str(str(CGROUP_ROOT))}\nmetrics_listen = \"127.0.0.1:{port}\"\n"
        f"pin_dir = {toml_str(str(pin_dir))}\n")
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen([str(binary("outpost-agent")), "--config", str(workdir / "agent.toml"),
                             "--log-level", "info", "policy", "run"], stdout=log, stderr=subprocess.STDOUT)
    info = lambda: policy_info(fetch_metrics(port)) or {}  # noqa: E731
    status_file = workdir / "state" / "policy" / "status.json"
    try:
        wait_for(lambda: info().get("version") == "1", what="bundle v1 enforced")
        assert (w.probe("tcp", net.host4, TCP_B), w.probe("tcp", net.host4, TCP_C, timeout=0.7)) == (1, 0)
        timestamp = sim.files["metadata/timestamp.json"]
        trickle = sim.misbehave("metadata/timestamp.json", "trickle", seconds=0.5)
        wait_for(lambda: trickle.sent > 0, what="a policy fetch caught in the trickle")
        expires = dt.datetime.strptime(not_after, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
        left = (expires - dt.datetime.now(dt.timezone.utc)).total_seconds()
        assert left > 0, "the bundle expired before the fetch started to hang; the test proves nothing"
        wait_for(lambda: info().get("applied") == "essential", timeout=left + 8,
                 what="the essential profile while the fetch hangs")
        assert trickle.sent < len(timestamp) and trickle.closed_at is None, \
            "the fetch was not hanging any more when the fallback came"
        assert (w.probe("tcp", net.host4, TCP_B, timeout=0.7), w.probe("tcp", net.host4, TCP_C)) == (0, 1)
        status = wait_for(lambda: json.loads(status_file.read_text()) if status_file.exists() and
                          "essential" in status_file.read_text() else None, what="status written")
        assert status["applied"] == "essential" and status["enforcing"], status
    finally:
        proc.terminate()
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(5)
        log.close()
        server.stop()
    assert code == 0, "SIGTERM did not end `policy run` while its fetch hung\n" + \
        (tmp_path / "agent.log").read_text(errors="replace")[-3000:]
