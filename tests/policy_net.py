"""Test hosts for the network-policy tests: a network namespace joined to the host by
a veth pair, workload cgroups (v2), echo servers on the host side, probes run inside
a workload, and `outpost-agent policy enforce` driven through SIGHUP, pinned in a bpffs
directory of its own and detached by `policy detach` when the test ends.

Everything is created with names unique to this process and removed afterwards;
traffic goes only between the host end and the namespace end of the veth pair.
Needs root (CI runs as root)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

CGROUP_ROOT = Path(os.environ.get("OUTPOST_CGROUP_ROOT", "/sys/fs/cgroup/unified"))

PROBE = r"""
import socket, sys, time
proto, host, port, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
ok = 0
for i in range(count):
    msg = b'probe-%d' % i
    try:
        if proto == 'tcp':
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect((host, port))
            s.sendall(msg)
            got = s.recv(100)
            s.close()
        else:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            s.sendto(msg, (host, port))
            got, _ = s.recvfrom(100)
            s.close()
        if got == msg:
            ok += 1
    except OSError:
        pass
print(ok)
"""


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the network-policy tests need root (network namespaces, cgroups, eBPF)", pytrace=False)
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        pytest.fail(f"no cgroup v2 hierarchy at {CGROUP_ROOT} (set OUTPOST_CGROUP_ROOT)", pytrace=False)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()}")
    return p


class Net:
    """A namespace and a veth pair: host end HOST4/HOST6, namespace end NS4/NS6."""

    def __init__(self, n: int) -> None:
        tag = f"{os.getpid() % 100000}{n}"
        self.ns = f"opns{tag}"
        self.host_if = f"opa{tag}"
        self.ns_if = f"opb{tag}"
        octet = 100 + (os.getpid() + n) % 100
        self.host4, self.ns4 = f"10.{octet}.77.1", f"10.{octet}.77.2"
        self.net4 = f"10.{octet}.77.0/24"
        self.host6, self.ns6 = f"fd00:{octet}:77::1", f"fd00:{octet}:77::2"
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host4}/24", "dev", self.host_if)
        sh("ip", "-6", "addr", "add", f"{self.host6}/64", "dev", self.host_if, "nodad")
        sh("ip", "link", "set", self.host_if, "up")
        for cmd in (["ip", "addr", "add", f"{self.ns4}/24", "dev", self.ns_if],
                    ["ip", "-6", "addr", "add", f"{self.ns6}/64", "dev", self.ns_if, "nodad"],
                    ["ip", "link", "set", self.ns_if, "up"], ["ip", "link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", self.ns, *cmd)

    def close(self) -> None:
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


class Echo:
    """TCP and UDP echo servers on the host end of the veth pair (v4 and v6)."""

    def __init__(self, addrs: list[str], tcp_ports: list[int], udp_ports: list[int]) -> None:
        self.socks: list[socket.socket] = []
        self.stop = False
        for a in addrs:
            fam = socket.AF_INET6 if ":" in a else socket.AF_INET
            for p in tcp_ports:
                s = socket.socket(fam, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((a, p))
                s.listen(64)
                s.settimeout(0.2)
                self.socks.append(s)
                threading.Thread(target=self._tcp, args=(s,), daemon=True).start()
            for p in udp_ports:
                s = socket.socket(fam, socket.SOCK_DGRAM)
                s.bind((a, p))
                s.settimeout(0.2)
                self.socks.append(s)
                threading.Thread(target=self._udp, args=(s,), daemon=True).start()

    def _tcp(self, s: socket.socket) -> None:
        while not self.stop:
            try:
                c, _ = s.accept()
            except OSError:
                continue
            try:
                c.settimeout(2)
                data = c.recv(100)
                c.sendall(data)
            except OSError:
                pass
            finally:
                c.close()

    def _udp(self, s: socket.socket) -> None:
        while not self.stop:
            try:
                data, peer = s.recvfrom(100)
                s.sendto(data, peer)
            except OSError:
                continue

    def close(self) -> None:
        self.stop = True
        for s in self.socks:
            s.close()


class Workload:
    """A cgroup under CGROUP_ROOT whose processes run in the test namespace."""

    def __init__(self, net: Net, rel: str) -> None:
        self.net = net
        self.rel = rel
        self.path = CGROUP_ROOT / rel
        self.path.mkdir(parents=True, exist_ok=True)

    def argv(self, *cmd: str) -> list[str]:
        # Join the cgroup first: `ip netns exec` remounts /sys, hiding cgroupfs.
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec ip netns exec "$0" "$@"',
                self.net.ns, *cmd]

    def probe(self, proto: str, host: str, port: int, count: int = 1, timeout: float = 1.0) -> int:
        """How many of `count` echoes came back (a dropped packet looks like a timeout)."""
        p = subprocess.run(self.argv("python3", "-c", PROBE, proto, host, str(port), str(count), str(timeout)),
                           capture_output=True, text=True, timeout=30 + count * (timeout + 1))
        assert p.returncode == 0, p.stderr
        return int(p.stdout.strip())

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def remove_cgroup_tree(root: Path) -> None:
    if not root.exists():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        root.rmdir()
    except OSError:
        pass


class Enforcer:
    """`outpost-agent policy enforce FILE` in the background; `swap` rewrites FILE and
    sends SIGHUP, then waits for the agent's answer line."""

    def __init__(self, exe: Path, workdir: Path, bundle: str, metrics_port: int, extra_env: dict | None = None,
                 pin_dir: Path | None = None) -> None:
        self.exe = exe
        self.file = workdir / "bundle.yaml"
        self.file.write_text(bundle)
        self.metrics_port = metrics_port
        self.pin_dir = pin_dir or new_pin_dir()
        self.log = workdir / "enforce.log"
        env = dict(os.environ, OUTPOST_LOG="info", **(extra_env or {}))
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(exe), "--json", "policy", "enforce", str(self.file), "--cgroup-root", str(CGROUP_ROOT),
             "--metrics-listen", f"127.0.0.1:{metrics_port}", "--pin-dir", str(self.pin_dir)],
            stdout=subprocess.PIPE, stderr=self._logf, env=env, text=True)
        self.lines: list[dict] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = self.wait_event(0)
        if first is None or first.get("event") != "applied":
            self.proc.kill()
            raise AssertionError(f"enforce did not apply the bundle: {first}\n{self.log_text()[-3000:]}")
        self._wait_metrics()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            with self._cv:
                self.lines.append(doc)
                self._cv.notify_all()

    def wait_event(self, index: int, timeout: float = 20) -> dict | None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self.lines) <= index:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and len(self.lines) <= index):
                    return None
                self._cv.wait(min(left, 0.2))
            return self.lines[index]

    def _wait_metrics(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.metrics()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the metrics endpoint did not answer")

    def swap(self, bundle: str, timeout: float = 20) -> dict:
        n = len(self.lines)
        self.file.write_text(bundle)
        self.proc.send_signal(signal.SIGHUP)
        ev = self.wait_event(n, timeout)
        assert ev is not None, "no answer to SIGHUP:\n" + self.log_text()[-3000:]
        return ev

    def metrics(self) -> dict[str, float]:
        return fetch_metrics(self.metrics_port)

    def verdict(self, name: str) -> int:
        return int(self.metrics().get(f'outpost_policy_packets_total{{verdict="{name}"}}', 0))

    def rule(self, rule_id: str) -> int:
        return int(self.metrics().get(f'outpost_policy_rule_packets_total{{rule="{rule_id}"}}', 0))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the crash an agent does not see coming."""
        self.proc.kill()
        self.proc.wait(5)
        self._logf.close()

    def detach(self) -> subprocess.CompletedProcess:
        """`outpost-agent policy detach`: the explicit end of enforcement."""
        return subprocess.run([str(self.exe), "--json", "policy", "detach", "--pin-dir", str(self.pin_dir)],
                              capture_output=True, text=True, timeout=30)

    def stop(self) -> int | None:
        if self._logf.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # The process has exited; its last lines (the "stopped" event) may still be on
        # their way through the pipe to the reader: wait for it to reach the end.
        self._reader.join(5)
        self._logf.close()
        return self.proc.returncode


BPFFS = Path("/sys/fs/bpf")
_pin_dirs = 0


def new_pin_dir() -> Path:
    """A pin directory of its own for one enforcer of this test process (the agent
    mounts bpffs at /sys/fs/bpf when nothing is mounted there)."""
    global _pin_dirs
    _pin_dirs += 1
    return BPFFS / f"outpost-test-{os.getpid()}-{_pin_dirs}"


def fetch_metrics(port: int) -> dict[str, float]:
    """GET /metrics from an agent on 127.0.0.1:port, as {series: value}."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    out = {}
    for line in body.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def policy_info(metrics: dict[str, float]) -> dict[str, str] | None:
    """The labels of outpost_policy_info, or None."""
    for k in metrics:
        if k.startswith("outpost_policy_info{"):
            return dict(re.findall(r'(\w+)="([^"]*)"', k))
    return None


def outpost_programs() -> list[str]:
    """Names of loaded BPF programs that are Outpost's (bpftool)."""
    p = sh("bpftool", "-j", "prog", "show")
    progs = json.loads(p.stdout or "[]")
    return [x.get("name", "") for x in progs if str(x.get("name", "")).startswith("outpost_")]


def outpost_program_ids() -> set[int]:
    """Ids of loaded BPF programs that are Outpost's (bpftool)."""
    p = sh("bpftool", "-j", "prog", "show")
    return {int(x["id"]) for x in json.loads(p.stdout or "[]") if str(x.get("name", "")).startswith("outpost_")}


def outpost_map_ids() -> set[int]:
    """Ids of loaded BPF maps with Outpost's map names (bpftool)."""
    p = sh("bpftool", "-j", "map", "show")
    names = {"CONFIG", "GENERATIONS", "SCOPES", "PREFIXES", "PORTS", "RANGES", "RULE_COUNTERS",
             "VERDICT_COUNTERS", "FLOWS", "EVENTS", "DENY_SEQ"}
    # The kernel keeps 15 characters of a name (VERDICT_COUNTERS shows as VERDICT_COUNTER).
    names = {n[:15] for n in names}
    return {int(x["id"]) for x in json.loads(p.stdout or "[]") if x.get("name", "") in names}


def outpost_maps() -> list[str]:
    p = sh("bpftool", "-j", "map", "show")
    names = {"CONFIG", "GENERATIONS", "SCOPES", "PREFIXES", "PORTS", "RANGES", "RULE_COUNTERS",
             "VERDICT_COUNTERS", "FLOWS", "EVENTS", "DENY_SEQ"}
    return [x.get("name", "") for x in json.loads(p.stdout or "[]") if x.get("name", "") in names]


def bundle(*, workloads: str = "", interfaces: str = "", essential: str = "{}", mode: str = "enforce",
           version: int = 1, not_after: str = "2099-01-01T00:00:00Z", name: str = "test") -> str:
    text = (f"schema: outpost.policy/v1\nname: {name}\nversion: {version}\nmode: {mode}\n"
            f"not_after: {not_after}\n")
    if workloads:
        text += "workloads:\n" + workloads
    if interfaces:
        text += "interfaces:\n" + interfaces
    text += f"essential: {essential}\n" if not essential.startswith("\n") else f"essential:{essential}"
    return text


def workload_yaml(name: str, cgroup: str, rules: list[str]) -> str:
    out = f"  - name: {name}\n    cgroup: {cgroup}\n    rules:\n"
    for r in rules:
        out += f"      - {r}\n"
    return out


def ansi_free(s: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", s)
