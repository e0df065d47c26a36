"""Network policy enforced with eBPF, on the real kernel: a workload cgroup whose
processes live in a network namespace, echo servers across a veth pair, and
`outpost-agent policy enforce` (root). Drops look like timeouts, so every probe has one.

The signed path (publish under the `policy` delegation, agent fetching through TUF) is
in test_policy_signed.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import binary, free_port, run
from policy_net import (CGROUP_ROOT, Echo, Enforcer, Net, Workload, bundle, fetch_metrics, outpost_map_ids,
                        outpost_program_ids, remove_cgroup_tree, require_root, sh, workload_yaml)

TCP_A, TCP_B, TCP_C = 7001, 7002, 7003
UDP_A, UDP_B, UDP_C = 7101, 7102, 7103


@pytest.fixture(scope="module")
def net():
    require_root()
    n = Net(1)
    echo = Echo([n.host4, n.host6], [TCP_A, TCP_B, TCP_C], [UDP_A, UDP_B, UDP_C])
    yield n
    echo.close()
    n.close()


@pytest.fixture
def cg_base(request):
    rel = f"outpost-test-{os.getpid()}/{request.node.name[5:45]}"
    yield rel
    remove_cgroup_tree(CGROUP_ROOT / rel)
    remove_cgroup_tree(CGROUP_ROOT / f"outpost-test-{os.getpid()}")


@pytest.fixture
def enforcers(tmp_path):
    started: list[Enforcer] = []

    def start(text: str, **kw) -> Enforcer:
        d = tmp_path / f"enforcer{len(started)}"
        d.mkdir()
        e = Enforcer(binary("outpost-agent"), d, text, free_port(), **kw)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()
        res = e.detach()
        assert res.returncode == 0, res.stderr


def test_allowed_pass_denied_drop_and_counters_match(net, cg_base, enforcers):
    w = Workload(net, f"{cg_base}/app")
    pol = bundle(workloads=workload_yaml("app", w.rel, [
        f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}",
        f"{{name: dns, direction: egress, cidr: {net.net4}, protocol: udp, ports: {UDP_A}}}",
    ]))
    e = enforcers(pol)
    assert w.probe("tcp", net.host4, TCP_A) == 1
    assert w.probe("tcp", net.host4, TCP_B, timeout=1.0) == 0, "TCP to a port no rule allows must be dropped"
    before = (e.rule("workload/app/dns"), e.verdict("denied"), e.verdict("reply"))
    assert w.probe("udp", net.host4, UDP_A, count=5) == 5
    assert w.probe("udp", net.host4, UDP_B, count=3, timeout=0.5) == 0, "UDP to a port no rule allows must be dropped"
    after = (e.rule("workload/app/dns"), e.verdict("denied"), e.verdict("reply"))
    # 5 datagrams out (allowed by the rule) and their 5 echoes (replies of the same flow).
    assert after[0] - before[0] == 10, (before, after)
    assert after[2] - before[2] == 5, (before, after)
    # Exactly the 3 datagrams to the closed port were denied.
    assert after[1] - before[1] == 3, (before, after)
    # The server side of an allowed TCP connection cannot open one back: ingress to the
    # workload is denied by default (nothing listens there, but the SYN is what counts).
    m = e.metrics()
    assert m["outpost_policy_enforcing"] == 1
    assert m['outpost_policy_info{name="test",version="1",applied="bundle",mode="enforce"}'] == 1
    assert e.rule("workload/app/api") >= 4  # SYN, data, ACKs out and the replies


def test_runtime_update_switches_verdicts_without_reloading(net, cg_base, enforcers):
    w = Workload(net, f"{cg_base}/app")
    a = bundle(version=1, workloads=workload_yaml("app", w.rel, [
        f"{{name: a, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"]))
    b = bundle(version=2, workloads=workload_yaml("app", w.rel, [
        f"{{name: b, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_B}}}"]))
    before_start = outpost_program_ids()
    e = enforcers(a)
    # This enforcer's programs (others' may still be being freed by the kernel).
    ids_before = sorted(outpost_program_ids() - before_start)
    assert (w.probe("tcp", net.host4, TCP_A), w.probe("tcp", net.host4, TCP_B, timeout=0.7)) == (1, 0)
    ev = e.swap(b)
    assert ev["event"] == "applied" and ev["version"] == 2, ev
    assert (w.probe("tcp", net.host4, TCP_A, timeout=0.7), w.probe("tcp", net.host4, TCP_B)) == (0, 1)
    ids_after = sorted(outpost_program_ids() - before_start)
    assert ids_before == ids_after and len(ids_after) == 4, "the same four programs, not reloaded"
    assert ev["to_flip_ms"] < 1000


def test_no_window_of_mixed_or_missing_rules_during_swaps(net, cg_base, enforcers):
    """Bundles A and B both allow UDP to port A (written differently) and neither allows
    port C. While they are swapped back and forth, a stream to A loses nothing (there is
    no moment with no rules) and nothing reaches C (no moment with mixed rules)."""
    w = Workload(net, f"{cg_base}/app")
    a = workload_yaml("app", w.rel, [
        f"{{name: exact, direction: egress, cidr: {net.host4}/32, protocol: udp, ports: {UDP_A}}}"])
    b = workload_yaml("app", w.rel, [
        f"{{name: ranged, direction: egress, cidr: {net.net4}, protocol: udp, ports: \"{UDP_A - 1}-{UDP_A + 1}\"}}",
        f"{{name: other, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_B}}}"])
    e = enforcers(bundle(version=1, workloads=a))
    results: dict[str, int] = {}

    def stream(port: int, key: str, count: int) -> None:
        results[key] = w.probe("udp", net.host4, port, count=count, timeout=1.0)

    t_ok = threading.Thread(target=stream, args=(UDP_A, "allowed", 5000))
    t_ok.start()
    swaps = 0
    version = 1
    while t_ok.is_alive() and swaps < 40:
        version += 1
        ev = e.swap(bundle(version=version, workloads=b if version % 2 == 0 else a))
        assert ev["event"] == "applied", ev
        swaps += 1
    t_ok.join(120)
    assert swaps >= 10, f"only {swaps} swaps happened while streaming"
    assert results["allowed"] == 5000, f"{5000 - results['allowed']} of 5000 allowed datagrams lost during {swaps} swaps"
    # And a denied stream during swaps gets nothing through.
    t_no = threading.Thread(target=stream, args=(UDP_C, "denied", 30))
    t_no.start()
    while t_no.is_alive():
        version += 1
        e.swap(bundle(version=version, workloads=b if version % 2 == 0 else a))
    t_no.join(120)
    assert results["denied"] == 0


def test_audit_mode_passes_and_counts(net, cg_base, enforcers):
    w = Workload(net, f"{cg_base}/app")
    e = enforcers(bundle(mode="audit", workloads=workload_yaml("app", w.rel, [
        f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"])))
    before = e.verdict("audit_denied")
    assert w.probe("udp", net.host4, UDP_C, count=4) == 4, "audit mode must not drop"
    assert e.verdict("audit_denied") - before == 8  # 4 out and 4 echoes back, none allowed by a rule
    assert e.verdict("denied") == 0
    time.sleep(0.6)  # deny events are drained four times a second
    log = e.log_text()
    assert "would deny (audit mode)" in log and f"port={UDP_C}" in log, log[-2000:]
    assert e.metrics()['outpost_policy_info{name="test",version="1",applied="bundle",mode="audit"}'] == 1


def test_ipv6_rules(net, cg_base, enforcers):
    w = Workload(net, f"{cg_base}/app")
    e = enforcers(bundle(workloads=workload_yaml("app", w.rel, [
        f"{{name: v6web, direction: egress, cidr: \"{net.host6}/128\", protocol: tcp, ports: {TCP_A}}}",
        f"{{name: v6udp, direction: egress, cidr: \"{net.host6.rsplit(':', 2)[0]}::/64\", protocol: udp, ports: \"{UDP_A}-{UDP_B}\"}}",
    ])))
    assert w.probe("tcp", net.host6, TCP_A) == 1
    assert w.probe("tcp", net.host6, TCP_B, timeout=0.7) == 0
    assert w.probe("udp", net.host6, UDP_B, count=2) == 2
    assert w.probe("udp", net.host6, UDP_C, timeout=0.5) == 0
    # IPv4 to the same ports is not allowed by IPv6 rules.
    assert w.probe("tcp", net.host4, TCP_A, timeout=0.7) == 0
    assert e.rule("workload/app/v6web") > 0 and e.rule("workload/app/v6udp") == 4


def test_expired_bundle_falls_back_to_essential_profile(net, cg_base, enforcers):
    w = Workload(net, f"{cg_base}/app")
    soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    essential = "\n" + "  workloads:\n" + "\n".join("  " + line for line in workload_yaml("app", w.rel, [
        f"{{name: mgmt, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_C}}}"]).splitlines()) + "\n"
    e = enforcers(bundle(not_after=soon, essential=essential, workloads=workload_yaml("app", w.rel, [
        f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"])))
    assert (w.probe("tcp", net.host4, TCP_A), w.probe("tcp", net.host4, TCP_C, timeout=0.7)) == (1, 0)
    ev = e.wait_event(1, timeout=15)
    assert ev is not None and ev["event"] == "essential" and ev["applied"] == "essential", ev
    assert (w.probe("tcp", net.host4, TCP_A, timeout=0.7), w.probe("tcp", net.host4, TCP_C)) == (0, 1)
    assert e.metrics()['outpost_policy_info{name="test",version="1",applied="essential",mode="enforce"}'] == 1
    assert "essential profile (fail-secure)" in e.log_text()


def test_malformed_and_expired_bundles_are_refused_and_the_policy_stays(net, cg_base, enforcers, tmp_path):
    w = Workload(net, f"{cg_base}/app")
    good = bundle(version=2, workloads=workload_yaml("app", w.rel, [
        f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"]))
    e = enforcers(good)
    v3 = good.replace("version: 2", "version: 3")
    cases = {
        "cidr": v3.replace(f"{net.host4}/32", f"{net.host4}/40"),
        "ports": v3.replace(f"ports: {TCP_A}", "ports: 99999"),
        "not_after": v3.replace("2099-01-01T00:00:00Z", "2001-01-01T00:00:00Z"),
        "older": good.replace("version: 2", "version: 1"),
        "missing cgroup": v3.replace(w.rel, w.rel + "-absent"),
    }
    for field, text in cases.items():
        ev = e.swap(text)
        assert ev["event"] == "refused" and ev["version"] == 2, (field, ev)
        assert ev["refused"], (field, ev)
    log = e.log_text()
    assert "field \"cidr\"" in log and "rule \"api\"" in log, log[-3000:]
    assert "expired" in log and "older than the enforced version 2" in log and "No such file" in log, log[-3000:]
    # Still enforcing version 2.
    assert (w.probe("tcp", net.host4, TCP_A), w.probe("tcp", net.host4, TCP_B, timeout=0.7)) == (1, 0)
    # The offline checkers name the field too.
    bad = tmp_path / "bad.yaml"
    bad.write_text(cases["ports"])
    res = run([binary("outpost"), "policy", "check", bad])
    assert res.returncode != 0 and "rule \"api\"" in res.stderr and "\"ports\"" in res.stderr, res.describe()
    res = run([binary("outpost-agent"), "policy", "check", bad])
    assert res.returncode != 0 and "\"ports\"" in res.stderr, res.describe()


def _wait_for(cond, what: str, timeout: float = 10) -> None:
    """The kernel frees programs and maps a moment after their last reference goes
    (deferred work): poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.1)
    assert cond(), what


def test_enforcement_outlives_the_agent_until_policy_detach(net, cg_base, enforcers):
    """SIGTERM ends the agent, not the policy: the links and maps are pinned, so the
    denied port stays denied. Only `policy detach` ends enforcement, and then
    nothing of Outpost's stays loaded."""
    w = Workload(net, f"{cg_base}/app")
    progs_before, maps_before = outpost_program_ids(), outpost_map_ids()
    e = enforcers(bundle(workloads=workload_yaml("app", w.rel, [
        f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"])))
    mine_progs, mine_maps = outpost_program_ids() - progs_before, outpost_map_ids() - maps_before
    assert (len(mine_progs), len(mine_maps)) == (4, 11), (mine_progs, mine_maps)
    attached = sh("bpftool", "cgroup", "show", str(w.path)).stdout
    assert "outpost_cg_egre" in attached and "outpost_cg_ingr" in attached, attached
    assert w.probe("tcp", net.host4, TCP_B, timeout=0.7) == 0
    assert e.stop() == 0
    assert e.lines[-1].get("event") == "stopped", e.lines
    # The agent is gone; its two cgroup programs stay attached and enforcing (the tc
    # ones, attached nowhere, are freed with the process).
    _wait_for(lambda: len(outpost_program_ids() & mine_progs) == 2, "the attached programs outlive the agent")
    attached = sh("bpftool", "cgroup", "show", str(w.path)).stdout
    assert "outpost_cg_egre" in attached and "outpost_cg_ingr" in attached, attached
    assert (w.probe("tcp", net.host4, TCP_A), w.probe("tcp", net.host4, TCP_B, timeout=0.7)) == (1, 0)
    res = e.detach()
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["event"] == "detached" and len(out["links"]) == 2 and out["maps"] == 11, out
    assert "removed by policy detach" in res.stderr, res.stderr
    _wait_for(lambda: not sh("bpftool", "cgroup", "show", str(w.path)).stdout.strip(), "the cgroup is left bare")
    _wait_for(lambda: not (outpost_program_ids() & mine_progs), "no program of the enforcer stays loaded")
    _wait_for(lambda: not (outpost_map_ids() & mine_maps), "no map of the enforcer stays loaded")
    assert not e.pin_dir.exists()
    # Nothing enforced any more: the port that was denied answers.
    assert w.probe("tcp", net.host4, TCP_B) == 1


def test_sigkilled_agent_leaves_the_device_filtered_and_a_restart_adopts_without_a_gap(net, cg_base, enforcers):
    """The crash loop that used to be a fail-open loop: two workloads, the agent
    SIGKILLed. Both stay filtered. A restarted agent on the same pins adopts the maps
    and links: while it starts, a stream to the allowed port loses nothing and a probe
    of the denied port gets nothing through."""
    a, b = Workload(net, f"{cg_base}/a"), Workload(net, f"{cg_base}/b")
    text = bundle(workloads=workload_yaml("a", a.rel, [
        f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: udp, ports: {UDP_A}}}"])
        + workload_yaml("b", b.rel, [
            f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"]))
    e = enforcers(text)
    assert (a.probe("tcp", net.host4, TCP_B, timeout=0.7), b.probe("tcp", net.host4, TCP_B, timeout=0.7)) == (0, 0)
    e.kill()
    for w in (a, b):
        assert w.probe("tcp", net.host4, TCP_B, timeout=0.7) == 0, f"{w.rel} unfiltered after the agent was killed"
    assert b.probe("tcp", net.host4, TCP_A) == 1, "the allowed port must stay allowed"

    results: dict[str, int] = {}

    def stream() -> None:
        results["allowed"] = a.probe("udp", net.host4, UDP_A, count=400, timeout=1.0)

    def denied() -> None:
        results["denied"] = b.probe("tcp", net.host4, TCP_B, count=10, timeout=0.5)

    threads = [threading.Thread(target=stream), threading.Thread(target=denied)]
    for t in threads:
        t.start()
    e2 = enforcers(text, pin_dir=e.pin_dir)
    for t in threads:
        t.join(120)
    assert results == {"allowed": 400, "denied": 0}, results
    assert "adopted the pinned network-policy maps" in e2.log_text(), e2.log_text()[-2000:]
    assert (a.probe("udp", net.host4, UDP_A), a.probe("tcp", net.host4, TCP_B, timeout=0.7)) == (1, 0)


@pytest.mark.parametrize("essential", ["named-one", "empty"])
def test_fallback_to_essential_keeps_every_scope_of_the_bundle_filtered(net, cg_base, enforcers, essential):
    """At not_after the essential profile applies. A workload the bundle names and the
    essential profile does not is not released: it is denied everything (`essential:
    {}` denies everything to every scope the bundle named)."""
    a, b = Workload(net, f"{cg_base}/a"), Workload(net, f"{cg_base}/b")
    soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    rule_a = f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"
    if essential == "named-one":
        ess = "\n  workloads:\n" + "\n".join("  " + line for line in workload_yaml("a", a.rel, [rule_a]).splitlines()) + "\n"
    else:
        ess = "{}"
    e = enforcers(bundle(not_after=soon, essential=ess, workloads=workload_yaml("a", a.rel, [rule_a])
                         + workload_yaml("b", b.rel, [
                             f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"])))
    assert (a.probe("tcp", net.host4, TCP_A), b.probe("tcp", net.host4, TCP_A)) == (1, 1)
    ev = e.wait_event(1, timeout=15)
    assert ev is not None and ev["event"] == "essential", ev
    # b: no rule of the essential profile, so nothing at all; never a port no rule allows.
    assert b.probe("tcp", net.host4, TCP_A, timeout=0.7) == 0
    assert b.probe("tcp", net.host4, TCP_B, timeout=0.7) == 0
    assert b.probe("udp", net.host4, UDP_B, timeout=0.7) == 0
    assert a.probe("tcp", net.host4, TCP_B, timeout=0.7) == 0
    assert a.probe("tcp", net.host4, TCP_A, timeout=0.7) == (1 if essential == "named-one" else 0)


def test_interface_rules_with_tc(net, enforcers):
    """An interface scope: TC (tcx) programs on the host end of the veth pair. Traffic
    from the namespace (no workload cgroup) is filtered as it arrives."""
    e = enforcers(bundle(interfaces=(
        f"  - name: lab\n    interface: {net.host_if}\n    rules:\n"
        f"      - {{name: echo, direction: ingress, cidr: {net.ns4}/32, protocol: tcp, ports: {TCP_A}}}\n"
        f"      - {{name: echo6, direction: ingress, cidr: \"{net.ns6}/128\", protocol: udp, ports: {UDP_A}}}\n")))
    # (Debian 12's bpftool does not list tcx links; the verdicts below show them.)

    def from_ns(proto: str, host: str, port: int, timeout: float = 1.0) -> int:
        from policy_net import PROBE
        p = subprocess.run(["ip", "netns", "exec", net.ns, "python3", "-c", PROBE, proto, host, str(port), "1", str(timeout)],
                           capture_output=True, text=True, timeout=30)
        return int(p.stdout.strip())

    assert from_ns("tcp", net.host4, TCP_A) == 1
    assert from_ns("tcp", net.host4, TCP_B, timeout=0.7) == 0
    assert from_ns("udp", net.host6, UDP_A) == 1
    assert from_ns("udp", net.host6, UDP_B, timeout=0.7) == 0
    assert e.rule("interface/lab/echo") > 0 and e.verdict("denied") > 0
    assert e.stop() == 0
    assert from_ns("tcp", net.host4, TCP_B, timeout=0.7) == 0, "the interface stays filtered after the agent exits"
    assert e.detach().returncode == 0
    assert from_ns("tcp", net.host4, TCP_B) == 1, "after policy detach nothing is filtered on the interface"


def test_without_root_the_agent_refuses_to_claim_enforcement(tmp_path, net, cg_base):
    w = Workload(net, f"{cg_base}/app")
    f = tmp_path / "b.yaml"
    f.write_text(bundle(workloads=workload_yaml("app", w.rel, [
        f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"])))
    os.chmod(tmp_path, 0o755)
    os.chmod(f, 0o644)
    exe = binary("outpost-agent")
    res = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
               exe, "policy", "enforce", f, "--cgroup-root", CGROUP_ROOT], timeout=30)
    assert res.returncode != 0, res.describe()
    assert "eBPF enforcement is not available" in res.stderr and "root" in res.stderr, res.describe()
    assert "applied" not in res.stdout
    assert not Path("/sys/fs/bpf/outpost").exists() or Path("/sys/fs/bpf/outpost").stat().st_uid == 0, \
        "an unprivileged agent must not create the pin directory"


def test_a_pin_directory_another_user_made_is_refused(tmp_path, net, cg_base):
    """bpffs's root is world-writable: an unprivileged user can make the pin directory
    before the agent does, and would own (and could unlink) the pins inside, ending
    enforcement. The agent refuses to pin there and says why."""
    from policy_net import new_pin_dir
    w = Workload(net, f"{cg_base}/app")
    f = tmp_path / "b.yaml"
    f.write_text(bundle(workloads=workload_yaml("app", w.rel, [
        f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"])))
    squat = new_pin_dir()
    sh("sh", "-c", "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf")
    made = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "mkdir", "-m", "0755", squat], timeout=30)
    try:
        assert made.returncode == 0, made.describe()
        res = run([binary("outpost-agent"), "policy", "enforce", f, "--cgroup-root", CGROUP_ROOT, "--pin-dir", squat],
                  timeout=30)
        assert res.returncode != 0, res.describe()
        assert "refusing to pin there" in res.stderr and "uid 65534" in res.stderr, res.describe()
        assert w.probe("tcp", net.host4, TCP_B) == 1, "nothing may have been attached"
    finally:
        subprocess.run(["rm", "-rf", str(squat)], capture_output=True)


# ------------------------------------------------------------ the /metrics listener
class SlowLoris:
    """`count` connections to 127.0.0.1:port from each of `sources`, each sending a
    request head one byte every `every` seconds and never finishing it. Records when
    the server closed each one."""

    def __init__(self, port: int, sources: list[str], count: int, every: float = 2.0, send: bool = True) -> None:
        import socket
        self.socks = []
        for src in sources:
            for _ in range(count):
                s = socket.socket()
                s.bind((src, 0))
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                self.socks.append(s)
        self.opened = time.monotonic()
        self.closed: dict[int, float] = {}
        self.every, self.send = every, send
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100000
        pos = 0
        while True:
            for i, s in enumerate(self.socks):
                if i in self.closed:
                    continue
                try:
                    if s.recv(4096) == b"":
                        self.closed[i] = time.monotonic()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    self.closed[i] = time.monotonic()
                    continue
                if self.send:
                    try:
                        s.send(head[pos:pos + 1])
                    except BlockingIOError:
                        pass
                    except OSError:
                        self.closed[i] = time.monotonic()
            pos += 1
            if self.stop_event.wait(self.every):
                return

    def open_count(self) -> int:
        return len(self.socks) - len(self.closed)

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
        for s in self.socks:
            s.close()


def _simple_bundle(net, w) -> str:
    return bundle(workloads=workload_yaml("app", w.rel, [
        f"{{name: api, direction: egress, cidr: {net.host4}/32, protocol: tcp, ports: {TCP_A}}}"]))


def test_slow_loris_connections_are_closed_and_scrapes_still_answer(net, cg_base, enforcers):
    """100 connections from one address each send their request head a byte every 2 s.
    A scrape from another address answers meanwhile, and every slow connection is closed
    by the header timeout (5 s by default; 2d9746a's listener waited up to 5 s per byte,
    so one byte every 2 s held each descriptor for hours)."""
    w = Workload(net, f"{cg_base}/app")
    e = enforcers(_simple_bundle(net, w))
    loris = SlowLoris(e.metrics_port, ["127.0.0.2"], 100)
    try:
        time.sleep(1)
        m = fetch_metrics(e.metrics_port)
        assert m.get("outpost_policy_enforcing") == 1, m
        assert 'outpost_policy_info{name="test",version="1",applied="bundle",mode="enforce"}' in m, m
        deadline = time.monotonic() + 25
        while loris.open_count() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert loris.open_count() == 0, (
            f"{loris.open_count()} of 100 slow connections still open "
            f"{time.monotonic() - loris.opened:.0f} s after they were opened")
        m = fetch_metrics(e.metrics_port)
        assert m.get("outpost_policy_enforcing") == 1, m
    finally:
        loris.close()


def test_accept_failing_with_no_descriptors_left_does_not_spin(net, cg_base, enforcers):
    """The agent's descriptor limit is lowered to what it has open plus three, and 40
    clients from 10 addresses connect: accept() fails with EMFILE. The listener must back
    off (2d9746a retried at once, in a busy loop burning a core), and serve again once
    descriptors are free."""
    import resource
    w = Workload(net, f"{cg_base}/app")
    e = enforcers(_simple_bundle(net, w))
    pid = e.proc.pid
    fetch_metrics(e.metrics_port)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 3, hard))
    tick = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    loris = SlowLoris(e.metrics_port, [f"127.0.0.{i}" for i in range(2, 12)], 4, every=1.0, send=False)
    try:
        time.sleep(1)
        before = cpu_seconds()
        time.sleep(3)
        used = cpu_seconds() - before
        assert used < 1.0, f"the agent used {used:.2f} s of CPU in 3 s while accept() failed: a busy loop"
    finally:
        loris.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    deadline = time.monotonic() + 20
    while True:
        try:
            m = fetch_metrics(e.metrics_port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert m.get("outpost_policy_enforcing") == 1, m
    assert "EMFILE" in e.log_text() or "Too many open files" in e.log_text() or "backing off" in e.log_text(), \
        e.log_text()[-2000:]

